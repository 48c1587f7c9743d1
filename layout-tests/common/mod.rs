//! Shared helpers for the layout tests: the lathe binary, the fixture base images (made once
//! per test process by testdata/make-base-images.sh), outside tools, and tree snapshots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use lathe::content::{canonical_json, sha256_digest};
use lathe::layout::{Transaction, refs_for};
use oci_spec::image::{Descriptor, MediaType};
use serde_json::json;

pub fn lathe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lathe"))
}

pub fn mkimage_bin() -> PathBuf {
    lathe_bin().parent().unwrap().join("examples/mkimage")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory on tmpfs where there is one (ext4 on the CI machines is erratic).
pub fn scratch() -> tempfile::TempDir {
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    tempfile::Builder::new()
        .prefix("lathe-test-")
        .tempdir_in(base)
        .unwrap()
}

/// Runs lathe with `args`; returns the output whatever the exit status.
pub fn lathe(args: &[&str]) -> Output {
    lathe_in(Path::new("."), args)
}

pub fn lathe_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(lathe_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run lathe")
}

/// Runs lathe and fails the test unless it succeeds; returns stdout.
pub fn lathe_ok(args: &[&str]) -> String {
    let out = lathe(args);
    assert!(
        out.status.success(),
        "lathe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs an outside tool and fails the test unless it succeeds; returns stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed by this test ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The fixture base images (refs `build` and `run`, each an amd64+arm64 index), made once per
/// test process under the target directory. Tests copy from here and never write into it.
/// Statics are never dropped, so each process removes the fixtures of processes that are gone.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("fixtures-")
                .and_then(|p| p.parse::<i32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("fixtures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let images = dir.join("images");
        make_base_images(&images);
        images
    })
}

pub fn make_base_images(dest: &Path) {
    let out = Command::new("bash")
        .arg(repo_root().join("testdata/make-base-images.sh"))
        .arg(dest)
        .env("MKIMAGE", mkimage_bin())
        .output()
        .expect("run make-base-images.sh");
    assert!(
        out.status.success(),
        "make-base-images.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of the fixture layout, for tests that write into it.
pub fn fixture_copy(dest: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(fixtures())
        .arg(dest)
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Every entry below `root` (not `root` itself), sorted by name: its path relative to `root`,
/// its full path and its lstat metadata.
pub fn tree_entries(root: &Path) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .map(|entry| {
            let path = entry.unwrap().into_path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = path.symlink_metadata().unwrap();
            (rel, path, meta)
        })
        .collect()
}

/// An extended attribute of `path` itself (symlinks not followed), if it has one.
pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let cname = std::ffi::CString::new(name).unwrap();
    let mut value = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    (n >= 0).then(|| value[..n as usize].to_vec())
}

/// Every file under `dir` with its contents' sha256 (symlinks by target), for "unchanged"
/// checks. A missing directory gives an empty map.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    if !dir.exists() {
        return map;
    }
    map.insert(String::new(), "dir".into());
    for (rel, path, meta) in tree_entries(dir) {
        let ft = meta.file_type();
        let value = if ft.is_symlink() {
            format!("link:{}", std::fs::read_link(&path).unwrap().display())
        } else if ft.is_file() {
            sha256_hex(&std::fs::read(&path).unwrap())
        } else {
            "dir".into()
        };
        map.insert(rel, value);
    }
    map
}

/// `setpriv` set up to run its command as nobody (65534:65534) with no groups and no
/// capabilities, inheritable or bounding: an unprivileged user, as the rootless tests need.
pub fn setpriv_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]);
    c
}

/// The digest of what `skopeo inspect --raw` prints at `reference` (a test registry over plain
/// http), and that JSON, parsed.
pub fn skopeo_raw(reference: &str) -> (String, serde_json::Value) {
    let mut args = vec!["inspect".to_string(), "--raw".into()];
    args.extend(skopeo_ref(reference));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let raw = tool("skopeo", &args);
    (
        format!("sha256:{}", sha256_hex(raw.as_bytes())),
        serde_json::from_str(&raw).unwrap(),
    )
}

/// Writes an image (ref `img`, linux/amd64) whose layers are the raw tars `layers` into a new
/// layout at `dir`; returns the `oci:` reference.
pub fn image_with_layers(dir: &Path, layers: &[Vec<u8>]) -> String {
    image_with_layer_blobs(dir, layers, false).0
}

/// As [`image_with_layers`], the layers gzip-compressed when `gzip`; also returns the layer
/// digests (of the blobs as stored), in order.
pub fn image_with_layer_blobs(dir: &Path, layers: &[Vec<u8>], gzip: bool) -> (String, Vec<String>) {
    use std::io::Write;
    let mut tx = Transaction::begin(dir).unwrap();
    let mut descs = Vec::new();
    for tar in layers {
        descs.push(if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(tar).unwrap();
            tx.write_bytes(&gz.finish().unwrap(), MediaType::ImageLayerGzip)
                .unwrap()
        } else {
            tx.write_bytes(tar, MediaType::ImageLayer).unwrap()
        });
    }
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| sha256_digest(l).to_string())
        .collect();
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}});
    let config = tx
        .write_bytes(&canonical_json(&config), MediaType::ImageConfig)
        .unwrap();
    let digests = descs.iter().map(|d| d.digest().to_string()).collect();
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": descs});
    let manifest: Descriptor = tx
        .write_bytes(&canonical_json(&manifest), MediaType::ImageManifest)
        .unwrap();
    tx.commit(&refs_for("img", &manifest, &[])).unwrap();
    (format!("oci:{}:img", dir.display()), digests)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn report(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One test's copy of the testdata buildpacks and apps, readable by everyone, with a store
/// and an `out` directory that everyone may write (a new layout is staged beside its
/// directory, so the world directory itself is writable too). Test files add their own
/// `build` methods.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch();
        let root = repo_root();
        for what in ["buildpacks", "apps"] {
            tool(
                "cp",
                &[
                    "-a",
                    root.join("testdata").join(what).to_str().unwrap(),
                    dir.path().join(what).to_str().unwrap(),
                ],
            );
        }
        std::fs::create_dir(dir.path().join("store")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        tool("chmod", &["-R", "a+rX", dir.path().to_str().unwrap()]);
        for writable in ["store", "out", ""] {
            std::fs::set_permissions(
                dir.path().join(writable),
                std::fs::Permissions::from_mode(0o777),
            )
            .unwrap();
        }
        World { dir }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn arg(&self, relative: &str) -> String {
        self.path(relative).to_string_lossy().into_owned()
    }

    /// A bash buildpack written into this world: `detect` and `build` are script bodies.
    pub fn buildpack(&self, name: &str, toml: &str, detect: &str, build: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.path(&format!("buildpacks/{name}"));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("buildpack.toml"), toml).unwrap();
        for (file, body) in [("detect", detect), ("build", build)] {
            let path = dir.join("bin").join(file);
            std::fs::write(&path, format!("#!/bin/bash\nset -eu\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        tool("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
        dir.to_string_lossy().into_owned()
    }

    /// Copies the busybox-static .debs into this world's prebuilt-busybox/vendor.
    pub fn vendor_busybox(&self) {
        tool(
            "bash",
            &[
                &self.arg("buildpacks/prebuilt-busybox/vendor.sh"),
                repo_root().join("testdata/debs").to_str().unwrap(),
            ],
        );
        tool("chmod", &["-R", "a+rX", &self.arg("buildpacks")]);
    }

    /// `lathe build APP --buildpack buildpacks/BUILDPACK --output OUTPUT --json` as `who`, on
    /// the fixture build and run images (unless `extra` names others).
    pub fn build_app(
        &self,
        who: Who,
        app: &Path,
        buildpack: &str,
        output: &str,
        extra: &[&str],
    ) -> Output {
        let world = world_readable_lathe_and_fixtures();
        let images = world.join("images");
        let mut command = command_as(who, &world.join("lathe"));
        command.arg("build").arg(app);
        if !extra.iter().any(|a| a.starts_with("--build-image")) {
            command.arg(format!("--build-image=oci:{}:build", images.display()));
        }
        if !extra.iter().any(|a| a.starts_with("--run-image")) {
            command.arg(format!("--run-image=oci:{}:run", images.display()));
        }
        command
            .arg(format!(
                "--buildpack={}",
                self.arg(&format!("buildpacks/{buildpack}"))
            ))
            .arg(format!("--output={output}"))
            .arg(format!("--store={}", self.path("store").display()))
            .arg("--json")
            .args(extra)
            .output()
            .expect("run lathe build")
    }
}

/// The image digest a successful `--json` build reports.
pub fn built_digest(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", report(out));
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(out)));
    result["image"]["digest"].as_str().unwrap().to_string()
}

/// A world-readable copy of the lathe binary and the fixture images (`DIR/lathe` and
/// `DIR/images`), made once per test process under /dev/shm, for tests that run lathe as
/// another user (the clone and the target directory may not be readable by them). Copies
/// left by test processes that are gone are removed first.
pub fn world_readable_lathe_and_fixtures() -> &'static Path {
    use std::os::unix::fs::PermissionsExt;
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            Path::new("/dev/shm")
        } else {
            Path::new("/tmp")
        };
        let prefix = "lathe-world-";
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|p| p.parse::<i32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = lathe::layout::remove_tree(&entry.path());
            }
        }
        let dir = base.join(format!("{prefix}{}", std::process::id()));
        let _ = lathe::layout::remove_tree(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(lathe_bin(), dir.join("lathe")).unwrap();
        tool(
            "cp",
            &[
                "-a",
                fixtures().to_str().unwrap(),
                dir.join("images").to_str().unwrap(),
            ],
        );
        tool("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    })
}

/// A user with subordinate id ranges, for the sandbox's newuidmap/newgidmap path.
#[derive(Debug, Clone, Copy)]
pub struct SubidUser {
    pub uid: u32,
    pub gid: u32,
    /// The first host id of its /etc/subuid and /etc/subgid ranges (65536 ids each).
    pub subuid_start: u32,
    pub subgid_start: u32,
}

pub const SUBID_USER: &str = "lathe-subid-test";

/// The dedicated user `lathe-subid-test`, created when missing (needs root: the test fails
/// with a message saying so otherwise), with ranges of 65536 ids in /etc/subuid and
/// /etc/subgid (Debian's useradd adds them from login.defs; added explicitly otherwise).
/// No other user is touched.
pub fn subid_test_user() -> SubidUser {
    static USER: OnceLock<SubidUser> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let lookup = || {
            let out = Command::new("id").arg(SUBID_USER).output().unwrap();
            out.status.success().then(|| {
                let n = |flag: &str| {
                    String::from_utf8(
                        Command::new("id")
                            .args([flag, SUBID_USER])
                            .output()
                            .unwrap()
                            .stdout,
                    )
                    .unwrap()
                    .trim()
                    .parse::<u32>()
                    .unwrap()
                };
                (n("-u"), n("-g"))
            })
        };
        let range = |file: &str| -> Option<u32> {
            std::fs::read_to_string(file)
                .ok()?
                .lines()
                .find_map(|line| {
                    let mut f = line.split(':');
                    (f.next()? == SUBID_USER).then_some(())?;
                    let start = f.next()?.trim().parse().ok()?;
                    let count: u32 = f.next()?.trim().parse().ok()?;
                    (count >= 65536).then_some(start)
                })
        };
        if lookup().is_none() {
            assert!(
                root,
                "this test needs the user {SUBID_USER} with /etc/subuid and /etc/subgid ranges \
                 of 65536 ids: run the tests as root (as CI does) so that they can create it, \
                 or create it yourself (useradd {SUBID_USER})"
            );
            tool(
                "useradd",
                &[
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SUBID_USER,
                ],
            );
        }
        let (uid, gid) = lookup().expect("the subid test user exists");
        for (file, flag) in [
            ("/etc/subuid", "--add-subuids"),
            ("/etc/subgid", "--add-subgids"),
        ] {
            if range(file).is_some() {
                continue;
            }
            assert!(
                root,
                "{SUBID_USER} has no range of 65536 ids in {file}: run the tests as root so \
                 that they can add one, or add it yourself (usermod {flag} START-END)"
            );
            // Past every range already given out, so no other user's ids are shared.
            let end = std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some(
                        f.get(1)?.trim().parse::<u64>().ok()?
                            + f.get(2)?.trim().parse::<u64>().ok()?,
                    )
                })
                .max()
                .unwrap_or(0)
                .max(100_000);
            tool(
                "usermod",
                &[flag, &format!("{end}-{}", end + 65535), SUBID_USER],
            );
        }
        SubidUser {
            uid,
            gid,
            subuid_start: range("/etc/subuid").expect("a subuid range"),
            subgid_start: range("/etc/subgid").expect("a subgid range"),
        }
    })
}

/// Who runs lathe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The user running the tests (root in CI).
    TestUser,
    /// uid/gid 65534 with no capabilities at all (setpriv), or the test user when not root.
    Unprivileged,
    /// `unshare --user --map-root-user` run by [`Who::Unprivileged`]: root of a rootless
    /// container, without CAP_SYS_ADMIN on the host.
    Nested,
    /// The dedicated user with /etc/subuid and /etc/subgid ranges (newuidmap/newgidmap).
    SubordinateIds,
}

/// `lathe run --quiet ARGS` as an unprivileged user (the world-readable copy of lathe), with
/// a store of its own.
pub fn run_unprivileged(args: &[&str]) -> Output {
    let world = world_readable_lathe_and_fixtures();
    let store = scratch();
    tool("chmod", &["777", store.path().to_str().unwrap()]);
    command_as(Who::Unprivileged, &world.join("lathe"))
        .args(["run", "--quiet"])
        .arg(format!("--store={}", store.path().display()))
        .args(args)
        .output()
        .expect("run lathe run")
}

/// A `--json` build result's platforms, as (platform, where its layers came from).
pub fn platform_summaries(result: &serde_json::Value) -> Vec<(String, String)> {
    result["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().unwrap().to_string(),
                p["layers_from"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs `exe` (a world-readable lathe) as `who`.
pub fn command_as(who: Who, exe: &Path) -> Command {
    match who {
        Who::TestUser => Command::new(exe),
        Who::Unprivileged if is_root() => {
            let mut c = setpriv_nobody();
            c.arg(exe);
            c
        }
        Who::Unprivileged => Command::new(exe),
        Who::Nested => {
            let mut c = if is_root() {
                let mut c = setpriv_nobody();
                c.arg("unshare");
                c
            } else {
                Command::new("unshare")
            };
            c.args(["--user", "--map-root-user"]).arg(exe);
            c
        }
        Who::SubordinateIds => {
            let user = subid_test_user();
            assert!(
                is_root(),
                "running lathe as {SUBID_USER} needs root (setpriv): run the tests as root"
            );
            let mut c = Command::new("setpriv");
            // The bounding set stays: newuidmap and newgidmap are setuid root and need it.
            c.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .args(["--init-groups", "--inh-caps=-all"])
                .arg(exe);
            c
        }
    }
}

/// `reference` as skopeo arguments: registries (the test registries) over plain http.
pub fn skopeo_ref(reference: &str) -> Vec<String> {
    if reference.starts_with("docker://") {
        vec!["--tls-verify=false".into(), reference.into()]
    } else {
        vec![reference.into()]
    }
}

/// The config skopeo reads at `reference`.
pub fn config_of(reference: &str) -> serde_json::Value {
    let mut args = vec!["inspect".to_string(), "--config".into()];
    args.extend(skopeo_ref(reference));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&tool("skopeo", &args)).unwrap()
}

/// The ELF machine of a file (62 x86-64, 183 aarch64).
pub fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    u16::from_le_bytes([bytes[18], bytes[19]])
}

/// Writes to `dest` the single image `source` with its config changed by `change`.
pub fn patched_image(source: &str, dest: &str, change: impl FnOnce(&mut serde_json::Value)) {
    let source: lathe::reference::ImageRef = source.parse().unwrap();
    let mut assembly = lathe::assembly::Assembly::new("a patched image", None).unwrap();
    let input = assembly.open_input(&source).unwrap();
    let image = lathe::image::read_default_image(assembly.input(input)).unwrap();
    for layer in &image.layers {
        assembly.take_blob(input, layer);
    }
    let mut config = image.config.clone();
    change(&mut config);
    let manifest = assembly.write_image(&config, &image.layers).unwrap();
    assembly.set_root(&[(image.platform, manifest)]).unwrap();
    assembly
        .write_to(&dest.parse().unwrap(), &lathe::progress::Progress::Silent)
        .unwrap();
}
