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

/// Every file under `dir` with its contents' sha256 (symlinks by target), for "unchanged"
/// checks. A missing directory gives an empty map.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    if !dir.exists() {
        return map;
    }
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(dir)
            .unwrap()
            .display()
            .to_string();
        let ft = entry.file_type();
        let value = if ft.is_symlink() {
            format!(
                "link:{}",
                std::fs::read_link(entry.path()).unwrap().display()
            )
        } else if ft.is_file() {
            sha256_hex(&std::fs::read(entry.path()).unwrap())
        } else {
            "dir".into()
        };
        map.insert(rel, value);
    }
    map
}

/// The JSON `skopeo inspect --raw` prints, parsed.
pub fn skopeo_raw(reference: &str) -> (String, serde_json::Value) {
    let raw = tool("skopeo", &["inspect", "--raw", reference]);
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
