//! `lathe unpack`: the same tree as `umoci unpack --rootless` for real images; whiteouts,
//! replacements, read-only directories and diffIDs. Hostile layers: hostile_layers.rs.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use lathe::content::canonical_json;
use lathe::layout::{Transaction, refs_for};
use oci_spec::image::MediaType;
use serde_json::json;

/// Names, types, permission bits, symlink targets and contents of a tree.
fn tree_facts(root: &Path) -> Vec<String> {
    tree_entries(root)
        .into_iter()
        .map(|(rel, path, meta)| {
            let ft = meta.file_type();
            let what = if ft.is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if ft.is_dir() {
                format!("dir {:o}", meta.mode() & 0o7777)
            } else {
                format!(
                    "file {:o} {}",
                    meta.mode() & 0o7777,
                    sha256_hex(&fs::read(&path).unwrap())
                )
            };
            format!("{rel}: {what}")
        })
        .collect()
}

#[test]
fn unpack_matches_umoci_for_both_fixture_platforms() {
    let tmp = scratch();
    let fx = fixtures();
    for image in ["build", "run"] {
        for arch in ["amd64", "arm64"] {
            let mine = tmp.path().join(format!("lathe-{image}-{arch}"));
            let theirs = tmp.path().join(format!("umoci-{image}-{arch}"));
            lathe_ok(&[
                "unpack",
                "--platform",
                &format!("linux/{arch}"),
                &format!("oci:{}:{image}", fx.display()),
                mine.to_str().unwrap(),
            ]);
            tool(
                "umoci",
                &[
                    "unpack",
                    "--rootless",
                    "--image",
                    &format!("{}:{image}-linux-{arch}", fx.display()),
                    theirs.to_str().unwrap(),
                ],
            );
            assert_eq!(
                tree_facts(&mine),
                tree_facts(&theirs.join("rootfs")),
                "{image} {arch}"
            );
        }
    }
}

enum E<'a> {
    Dir(&'a str),
    ReadOnlyDir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A tar with raw entry names (the tar crate's checked setters would refuse `..`).
fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(315532801);
        let (name, data): (&str, &[u8]) = match e {
            E::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                (n, b"")
            }
            E::ReadOnlyDir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o555);
                (n, b"")
            }
            E::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                (n, d)
            }
            E::Symlink(n, t) | E::Hardlink(n, t) => {
                h.set_entry_type(if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (n, b"")
            }
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn whiteouts_replacements_and_read_only_dirs_give_the_right_tree() {
    let tmp = scratch();
    let lower = tar_of(&[
        E::Dir("etc/"),
        E::File("etc/motd", b"hello"),
        E::File("etc/keep", b"keep"),
        E::Dir("opaque/"),
        E::File("opaque/old", b"old"),
        E::Dir("becomes-file/"),
        E::File("becomes-file/x", b"x"),
        E::File("becomes-dir", b"file"),
        E::Symlink("bin", "/usr/bin"),
        E::Dir("usr/"),
        E::Dir("usr/bin/"),
        E::ReadOnlyDir("ro/"),
        E::File("ro/inside", b"in a read-only dir"),
    ]);
    let upper = tar_of(&[
        E::File("etc/.wh.motd", b""),
        E::File("etc/.wh.never-existed", b""),
        E::Dir("opaque/"),
        E::File("opaque/new", b"new"),
        E::File("opaque/.wh..wh..opq", b""),
        E::File("becomes-file", b"now a file"),
        E::Dir("becomes-dir/"),
        E::File("bin/tool", b"through the in-image absolute symlink"),
        E::Hardlink("etc/keep-link", "/etc/keep"),
        E::File("ro/added-later", b"a later layer writes into it"),
    ]);
    let image = image_with_layers(&tmp.path().join("img"), &[lower, upper]);
    let root = tmp.path().join("root");
    lathe_ok(&["unpack", &image, root.to_str().unwrap()]);
    assert!(!root.join("etc/motd").exists());
    assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"keep");
    assert!(
        !root.join("opaque/old").exists(),
        "opaque whiteout hides the lower layer"
    );
    assert_eq!(
        fs::read(root.join("opaque/new")).unwrap(),
        b"new",
        "but not this layer's entries"
    );
    assert_eq!(fs::read(root.join("becomes-file")).unwrap(), b"now a file");
    assert!(root.join("becomes-dir").is_dir());
    assert_eq!(
        fs::read(root.join("usr/bin/tool")).unwrap(),
        b"through the in-image absolute symlink"
    );
    assert_eq!(
        fs::read(root.join("ro/added-later")).unwrap(),
        b"a later layer writes into it"
    );
    assert_eq!(
        fs::metadata(root.join("ro")).unwrap().mode() & 0o777,
        0o555,
        "mode applied last"
    );
    let keep = fs::metadata(root.join("etc/keep")).unwrap();
    assert_eq!(
        keep.ino(),
        fs::metadata(root.join("etc/keep-link")).unwrap().ino(),
        "hardlink"
    );
}

#[test]
fn diff_id_mismatch_is_an_error_and_leaves_nothing() {
    let tmp = scratch();
    let layer = tar_of(&[E::File("a", b"a")]);
    let dir = tmp.path().join("img");
    let mut tx = Transaction::begin(&dir).unwrap();
    let desc = tx.write_bytes(&layer, MediaType::ImageLayer).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [wrong]}});
    let config = tx
        .write_bytes(&canonical_json(&config), MediaType::ImageConfig)
        .unwrap();
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": [desc]});
    let manifest = tx
        .write_bytes(&canonical_json(&manifest), MediaType::ImageManifest)
        .unwrap();
    tx.commit(&refs_for("img", &manifest, &[])).unwrap();
    let target = tmp.path().join("root");
    let out = lathe(&[
        "unpack",
        &format!("oci:{}:img", dir.display()),
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("not the diffID {wrong}")),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists());
}

/// Rootless for real: as an unprivileged user with no capabilities (via setpriv when the tests
/// run as root), the tree is the same and owners are recorded in `user.rootlesscontainers`.
#[test]
fn unpack_as_an_unprivileged_user_records_owners_in_xattrs() {
    let tmp = scratch();
    // The clone may sit where other users cannot read: work from a world-readable copy.
    let work = tmp.path().join("world");
    fs::create_dir(&work).unwrap();
    fs::copy(lathe_bin(), work.join("lathe")).unwrap();
    tool(
        "cp",
        &[
            "-a",
            fixtures().to_str().unwrap(),
            work.join("images").to_str().unwrap(),
        ],
    );
    tool("chmod", &["-R", "a+rX", tmp.path().to_str().unwrap()]);
    fs::set_permissions(&work, fs::Permissions::from_mode(0o1777)).unwrap();
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if as_root {
        let mut c = setpriv_nobody();
        c.arg(work.join("lathe"));
        c
    } else {
        std::process::Command::new(work.join("lathe"))
    };
    let out = cmd
        .args([
            "unpack",
            "--platform",
            "linux/arm64",
            "oci:images:build",
            "rootfs",
        ])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let root = work.join("rootfs");
    let caller = if as_root {
        65534
    } else {
        unsafe { libc::geteuid() }
    };
    assert_eq!(
        fs::metadata(root.join("home/cnb")).unwrap().uid(),
        caller,
        "files belong to the caller"
    );
    let xattr = |p: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", &format!("import os,sys; sys.stdout.write(os.getxattr({:?}, 'user.rootlesscontainers').hex())", root.join(p).display().to_string())])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(xattr("home/cnb"), "08e80710e807", "1000:1000 recorded");
    assert_eq!(xattr("home/cnb-run"), "08e90710e807", "1001:1000 recorded");
    assert_eq!(
        xattr("bin/busybox"),
        "",
        "root-owned entries carry no xattr"
    );
    let theirs = tmp.path().join("umoci");
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:build-linux-arm64", fixtures().display()),
            theirs.to_str().unwrap(),
        ],
    );
    assert_eq!(tree_facts(&root), tree_facts(&theirs.join("rootfs")));
}

/// The synthetic benchmark image at full size (~200 MB: 20k small files, large files, symlinks,
/// hardlinks, whiteouts and an opaque directory across three layers): the same tree as umoci's.
#[test]
fn unpack_matches_umoci_on_the_synthetic_image() {
    let tmp = scratch();
    let layout = tmp.path().join("img");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("testdata/make-synthetic-image.sh"))
        .arg(&layout)
        .env("MKIMAGE", mkimage_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mine = tmp.path().join("lathe");
    let theirs = tmp.path().join("umoci");
    lathe_ok(&[
        "unpack",
        &format!("oci:{}:synthetic", layout.display()),
        mine.to_str().unwrap(),
    ]);
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:synthetic-linux-amd64", layout.display()),
            theirs.to_str().unwrap(),
        ],
    );
    let facts = tree_facts(&mine);
    assert_eq!(facts, tree_facts(&theirs.join("rootfs")));
    assert!(
        !mine.join("app/pkg000/file00000.txt").exists(),
        "whiteout applied"
    );
    assert!(mine.join("app/pkg000/file00001.txt").exists());
    assert!(
        mine.join("app/pkg050/replaced.txt").exists()
            && !mine.join("app/pkg050/file10000.txt").exists(),
        "opaque dir"
    );
    assert!(facts.len() > 10_000, "{}", facts.len());
    for tree in [mine.clone(), theirs.join("rootfs")] {
        let ino = |p: &str| fs::metadata(tree.join(p)).unwrap().ino();
        assert_eq!(
            ino("app/pkg000/file00001.txt"),
            ino("app/pkg000/same00001.txt"),
            "hardlink in {}",
            tree.display()
        );
        assert_eq!(ino("data/blob1.bin"), ino("data/blob1-again.bin"));
    }

    // On a terminal the same unpack draws a progress bar; through a pipe (above) it does not.
    let piped = lathe(&[
        "unpack",
        &format!("oci:{}:synthetic", layout.display()),
        tmp.path().join("piped").to_str().unwrap(),
    ]);
    assert!(!stderr(&piped).contains("unpacking"), "{}", stderr(&piped));
    let on_terminal = tmp.path().join("on-terminal");
    let command = format!(
        "{} unpack oci:{}:synthetic {}",
        lathe_bin().display(),
        layout.display(),
        on_terminal.display()
    );
    let typescript = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&typescript.stdout);
    assert!(typescript.status.success(), "{shown}");
    assert!(shown.contains("unpacking ["), "no progress bar: {shown}");
    assert_eq!(tree_facts(&on_terminal), facts);
}

#[test]
fn a_directory_in_several_layers_takes_the_last_layers_mode() {
    let tmp = scratch();
    let lower = tar_of(&[E::ReadOnlyDir("d/"), E::File("d/x", b"x")]);
    let upper = tar_of(&[E::Dir("d/")]);
    let image = image_with_layers(&tmp.path().join("img"), &[lower, upper]);
    let root = tmp.path().join("root");
    lathe_ok(&["unpack", &image, root.to_str().unwrap()]);
    assert_eq!(fs::metadata(root.join("d")).unwrap().mode() & 0o777, 0o755);
}

#[test]
fn an_opaque_whiteout_hides_lower_contents_of_children_this_layer_recreates() {
    let tmp = scratch();
    let lower = tar_of(&[
        E::Dir("a/"),
        E::Dir("a/b/"),
        E::File("a/b/old", b"old"),
        E::File("a/gone", b"gone"),
    ]);
    // The marker after the entries it must keep, which tar writers are free to do.
    let upper = tar_of(&[
        E::Dir("a/"),
        E::Dir("a/b/"),
        E::File("a/b/new", b"new"),
        E::File("a/.wh..wh..opq", b""),
    ]);
    let image = image_with_layers(&tmp.path().join("img"), &[lower, upper]);
    let root = tmp.path().join("root");
    lathe_ok(&["unpack", &image, root.to_str().unwrap()]);
    assert!(!root.join("a/gone").exists());
    assert!(
        !root.join("a/b/old").exists(),
        "lower content under a re-created child is hidden too"
    );
    assert_eq!(fs::read(root.join("a/b/new")).unwrap(), b"new");
}

#[test]
fn a_non_empty_target_is_refused_and_left_alone() {
    let tmp = scratch();
    let target = tmp.path().join("busy");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("mine"), b"keep me").unwrap();
    let out = lathe(&[
        "unpack",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:run", fixtures().display()),
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "{} exists and is not an empty directory",
            target.display()
        )),
        "{}",
        stderr(&out)
    );
    let entries: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["busy"]);
    assert_eq!(
        snapshot(&target).len(),
        2,
        "only the directory and its one file"
    );
    // A platform the index lacks names what it has.
    let out = lathe(&[
        "unpack",
        "--platform",
        "linux/riscv64",
        &format!("oci:{}:run", fixtures().display()),
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no linux/riscv64 image (it has: linux/amd64, linux/arm64)"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("x").exists());
}

/// PAX `SCHILY.xattr.*` records become xattrs where the kernel allows; a layer can't forge
/// the ownership record lathe itself writes.
#[test]
fn pax_xattrs_are_applied_and_the_ownership_record_cannot_be_forged() {
    let tmp = scratch();
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([
            ("SCHILY.xattr.user.comment", &b"hello"[..]),
            ("SCHILY.xattr.user.rootlesscontainers", &[0x08, 0x01][..]),
        ])
        .unwrap();
    let mut header = tar::Header::new_ustar();
    header.set_path("etc/tagged").unwrap();
    header.set_mode(0o644);
    header.set_size(2);
    header.set_cksum();
    builder.append(&header, &b"hi"[..]).unwrap();
    let layer = builder.into_inner().unwrap();
    let image = image_with_layers(&tmp.path().join("img"), &[layer]);
    let root = tmp.path().join("root");
    let out = lathe(&["unpack", &image, root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tagged = root.join("etc/tagged");
    assert_eq!(fs::read(&tagged).unwrap(), b"hi");
    assert_eq!(
        xattr(&tagged, "user.comment").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(xattr(&tagged, "user.rootlesscontainers"), None);
    assert!(
        stderr(&out).contains("xattr user.rootlesscontainers from the layer ignored"),
        "{}",
        stderr(&out)
    );
}
