//! CNB-mode layers against Go's archive/tar: lathe and a small Go program that writes layers
//! the way the lifecycle does (testdata/cnb-tar/lifecycle_layers.go) must produce the same bytes
//! for the same trees, so the diffIDs are the same. Skipped, loudly, only where no Go toolchain
//! is installed; the hand-derived byte tests in src/layer/cnb.rs stand without it.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lathe::content::sha256_digest;
use lathe::layer::LayerCompression;
use lathe::layer::cnb::{
    Owner, write_cnb_dir_layer, write_launcher_layer, write_process_types_layer,
};

/// The Go program, built once per test process; `None` if `go` is not installed.
fn lifecycle_layers_bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cnb-tar-go");
        fs::create_dir_all(&out_dir).unwrap();
        let bin = out_dir.join("lifecycle_layers");
        let mut go = Command::new("go");
        go.arg("build")
            .arg("-o")
            .arg(&bin)
            .arg(common::repo_root().join("testdata/cnb-tar/lifecycle_layers.go"))
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GO111MODULE", "off");
        if std::env::var_os("GOCACHE").is_none() {
            go.env("GOCACHE", out_dir.join("gocache"));
        }
        match go.output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("running go build: {e}"),
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "go build of lifecycle_layers.go failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Some(bin)
            }
        }
    })
    .as_deref()
}

fn go_or_skip(test: &str) -> Option<&'static Path> {
    let bin = lifecycle_layers_bin();
    if bin.is_none() {
        eprintln!(
            "\n*** SKIPPED {test}: no `go` on PATH, so lathe's CNB-mode tars were NOT compared \
             with Go's archive/tar. Install Go (Debian: apt-get install golang-go) to run it. ***\n"
        );
    }
    bin
}

fn go_tar(bin: &Path, args: &[&std::ffi::OsStr], out: &Path) -> Vec<u8> {
    let output = Command::new(bin).args(args).arg(out).output().unwrap();
    assert!(
        output.status.success(),
        "lifecycle_layers {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fs::read(out).unwrap()
}

fn go_process_types_tar(bin: &Path, out: &Path, types: &[&str]) -> Vec<u8> {
    let output = Command::new(bin)
        .arg("process-types")
        .arg(out)
        .args(types)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lifecycle_layers process-types failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fs::read(out).unwrap()
}

fn assert_same_tar(lathe: &[u8], go: &[u8], what: &str) {
    if lathe == go {
        return;
    }
    let at = lathe
        .iter()
        .zip(go)
        .position(|(a, b)| a != b)
        .unwrap_or(lathe.len().min(go.len()));
    let block = |tar: &[u8]| {
        let start = (at / 512 * 512).min(tar.len());
        String::from_utf8_lossy(&tar[start..(start + 512).min(tar.len())])
            .escape_debug()
            .to_string()
    };
    panic!(
        "{what}: lathe's tar ({} bytes) differs from Go's ({} bytes) first at byte {at} \
         (byte {} of block {})\nlathe: {}\n   go: {}",
        lathe.len(),
        go.len(),
        at % 512,
        at / 512,
        block(lathe),
        block(go)
    );
}

/// How many PAX extended headers, and how many headers using the USTAR prefix field, a tar has.
fn count_pax_and_prefixed_headers(tar: &[u8]) -> (usize, usize) {
    let (mut pax, mut prefixed, mut offset) = (0, 0, 0);
    while tar[offset..offset + 512].iter().any(|&b| b != 0) {
        let header = &tar[offset..offset + 512];
        let size_field = String::from_utf8_lossy(&header[124..135]).into_owned();
        let size = usize::from_str_radix(&size_field, 8).unwrap();
        match header[156] {
            b'x' => pax += 1,
            _ if header[345] != 0 => prefixed += 1,
            _ => {}
        }
        offset += 512 + size.next_multiple_of(512);
    }
    (pax, prefixed)
}

fn write(path: &Path, len: usize, mode: u32) {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A layer directory with what trips tar writers up: sizes around the block size, special mode
/// bits, names needing the USTAR prefix or PAX, non-ASCII and non-UTF-8 names, symlinks short,
/// long, dangling and to directories, a hardlinked pair, a FIFO and a socket.
fn awkward_layer(layer: &Path) {
    for dir in ["a/deep", "B", "empty"] {
        fs::create_dir_all(layer.join(dir)).unwrap();
    }
    fs::create_dir(layer.join("sticky")).unwrap();
    fs::set_permissions(layer.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(layer.join("sgid")).unwrap();
    fs::set_permissions(layer.join("sgid"), fs::Permissions::from_mode(0o2750)).unwrap();
    for (name, len, mode) in [
        ("a.txt", 0, 0o644),
        ("a-b", 1, 0o600),
        ("a/x", 511, 0o644),
        ("a/deep/y", 512, 0o755),
        ("B/z", 513, 0o444),
        ("big", 70_000, 0o644),
        ("setuid", 3, 0o4755),
        ("caf\u{e9}", 4, 0o644),
    ] {
        write(&layer.join(name), len, mode);
    }
    write(
        &layer.join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe")),
        5,
        0o644,
    );
    write(&layer.join("c".repeat(120)), 6, 0o644);
    let splittable = layer.join("s".repeat(60));
    fs::create_dir(&splittable).unwrap();
    write(&splittable.join("f".repeat(40)), 7, 0o644);
    let mut deep = layer.to_path_buf();
    for level in 0..12 {
        deep.push(format!("level-{level:02}-{}", "d".repeat(12)));
    }
    fs::create_dir_all(&deep).unwrap();
    write(&deep.join("leaf"), 8, 0o644);

    std::os::unix::fs::symlink("a/x", layer.join("link-short")).unwrap();
    std::os::unix::fs::symlink(format!("/{}", "t".repeat(150)), layer.join("link-long")).unwrap();
    std::os::unix::fs::symlink("nowhere", layer.join("dangling")).unwrap();
    std::os::unix::fs::symlink("a", layer.join("dir-link")).unwrap();
    write(&layer.join("hard-1"), 9, 0o640);
    fs::hard_link(layer.join("hard-1"), layer.join("hard-2")).unwrap();
    nix::unistd::mkfifo(
        &layer.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    std::os::unix::net::UnixListener::bind(layer.join("sock")).unwrap();
}

#[test]
fn dir_layers_equal_the_lifecycles() {
    let Some(bin) = go_or_skip("dir_layers_equal_the_lifecycles") else {
        return;
    };
    let scratch = common::scratch();
    let layer = scratch.path().join("layers/buildpack_id/layer");
    fs::create_dir_all(&layer).unwrap();
    fs::set_permissions(
        scratch.path().join("layers"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    awkward_layer(&layer);
    // The lifecycle names entries by their on-disk path; give lathe the same image path.
    let image_path = layer.to_str().unwrap();

    for (uid, gid) in [(1000, 1001), (2_100_000, 5)] {
        let go = go_tar(
            bin,
            &[
                "dir".as_ref(),
                layer.as_os_str(),
                uid.to_string().as_ref(),
                gid.to_string().as_ref(),
            ],
            &scratch.path().join("go.tar"),
        );
        let owner = Owner { uid, gid };
        let (written, lathe) = write_cnb_dir_layer(
            &layer,
            image_path,
            owner,
            "none".parse().unwrap(),
            Vec::new(),
        )
        .unwrap();
        assert_same_tar(&lathe, &go, &format!("dir layer owned by {uid}:{gid}"));
        if uid < 0o7777777 {
            // With a uid too large for octal every owned entry is PAX; below it the tree must
            // still reach both long-name encodings.
            let (pax_headers, prefixed) = count_pax_and_prefixed_headers(&go);
            assert!(
                pax_headers >= 5 && prefixed >= 1,
                "the tree no longer exercises PAX ({pax_headers}) and the USTAR prefix ({prefixed})"
            );
        }
        assert_eq!(written.diff_id, sha256_digest(&go));

        let (gzipped, _) = write_cnb_dir_layer(
            &layer,
            image_path,
            owner,
            LayerCompression::default(),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(gzipped.diff_id, sha256_digest(&go), "diffID through gzip");
    }
}

#[test]
fn launcher_layer_equals_the_lifecycles() {
    let Some(bin) = go_or_skip("launcher_layer_equals_the_lifecycles") else {
        return;
    };
    let scratch = common::scratch();
    let launcher = scratch.path().join("launcher");
    write(&launcher, 100_001, 0o700);
    let go = go_tar(
        bin,
        &["launcher".as_ref(), launcher.as_os_str()],
        &scratch.path().join("go.tar"),
    );
    let (_, lathe) = write_launcher_layer(&launcher, "none".parse().unwrap(), Vec::new()).unwrap();
    assert_same_tar(&lathe, &go, "launcher layer");
}

#[test]
fn process_types_layer_equals_the_lifecycles() {
    let Some(bin) = go_or_skip("process_types_layer_equals_the_lifecycles") else {
        return;
    };
    let scratch = common::scratch();
    let long_type = "p".repeat(95);
    let unsplittable_type = "q".repeat(120);
    let types = ["web", "worker", &long_type, &unsplittable_type, "w\u{e9}b"];
    let go = go_process_types_tar(bin, &scratch.path().join("go.tar"), &types);
    let (_, lathe) =
        write_process_types_layer(&types, "none".parse().unwrap(), Vec::new()).unwrap();
    assert_same_tar(&lathe, &go, "process-types layer");
}
