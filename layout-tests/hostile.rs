//! Hostile inputs: corrupted, truncated or missing blobs, a broken `index.json`, archives whose
//! manifests point outside themselves. Each test builds its bad input from a copy of the
//! fixtures and copies it into three destinations: a layout that does not exist yet, an
//! existing layout, and an existing oci-archive. Every copy must fail with exit status 1, name
//! the thing at fault, and leave every destination, the source and the working directory
//! exactly as they were.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

// ------------------------------------------------------------------ inputs

/// A scratch copy of the fixture layout to make hostile, alone in its own directory.
struct Source {
    _tmp: tempfile::TempDir,
    layout: PathBuf,
}

fn source_layout() -> Source {
    let tmp = common::scratch();
    let layout = tmp.path().join("src");
    common::fixture_copy(&layout);
    Source { _tmp: tmp, layout }
}

fn index_json(layout: &Path) -> Value {
    serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap()
}

/// The digest (`sha256:…`) index.json gives for ref `name`.
fn ref_digest(layout: &Path, name: &str) -> String {
    index_json(layout)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no ref {name} in {}", layout.display()))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn read_blob_json(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&fs::read(blob_path(layout, digest)).unwrap()).unwrap()
}

/// The manifest of the linux/amd64 `build` image.
fn build_amd64_manifest(layout: &Path) -> Value {
    read_blob_json(layout, &ref_digest(layout, "build-linux-amd64"))
}

/// The digest of the `build` layer of the linux/amd64 build image (its second layer; `run`
/// does not share it).
fn build_only_layer(layout: &Path) -> String {
    build_amd64_manifest(layout)["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Overwrites a file with the same number of different bytes.
fn scramble_same_length(path: &Path) {
    let bytes: Vec<u8> = fs::read(path).unwrap().iter().map(|b| b ^ 0x5a).collect();
    fs::write(path, bytes).unwrap();
}

/// `tar -xf archive -C dir`.
fn untar(archive: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    common::tool(
        "tar",
        &[
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            dir.to_str().unwrap(),
        ],
    );
}

/// Tars the contents of `dir` (top-level names, sorted) into `archive`, symlinks kept as links.
fn retar(dir: &Path, archive: &Path) {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut args = vec![
        "-cf".to_string(),
        archive.display().to_string(),
        "-C".into(),
        dir.display().to_string(),
    ];
    args.extend(names);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::tool("tar", &args);
}

/// A linux/amd64 `run` docker-archive, unpacked into `dir` for editing; returns its parsed
/// manifest.json.
fn unpacked_docker_archive(dir: &Path) -> Value {
    let tmp = common::scratch();
    let tar = tmp.path().join("run.tar");
    common::lathe_ok(&[
        "copy",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:run", common::fixtures().display()),
        &format!("docker-archive:{}", tar.display()),
    ]);
    untar(&tar, dir);
    serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Writes `manifest` as manifest.json of the unpacked archive in `dir` and tars it up as
/// `hostile.tar` in a directory of its own, returned with the archive path.
fn pack_docker_archive(dir: &Path, manifest: &Value) -> (tempfile::TempDir, PathBuf) {
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(manifest).unwrap(),
    )
    .unwrap();
    let out = common::scratch();
    let archive = out.path().join("hostile.tar");
    retar(dir, &archive);
    (out, archive)
}

/// A `build` oci-archive (both platforms), unpacked into `dir` for editing.
fn unpacked_oci_archive(dir: &Path) {
    let tmp = common::scratch();
    let tar = tmp.path().join("build.tar");
    common::lathe_ok(&[
        "copy",
        &format!("oci:{}:build", common::fixtures().display()),
        &format!("oci-archive:{}:build", tar.display()),
    ]);
    untar(&tar, dir);
}

// ------------------------------------------------------------ destinations

/// The three destinations every hostile copy is tried against.
struct Destinations {
    _tmp: tempfile::TempDir,
    /// Holds nothing; the layout `new_parent/layout` is not there yet.
    new_parent: PathBuf,
    /// An existing layout: the fixtures with the `build` images removed (and collected), so
    /// that copying `build` has to read its blobs from the source rather than finding them
    /// already there.
    existing: PathBuf,
    /// Holds only the existing oci-archive `dest.tar`.
    archive_dir: PathBuf,
    /// An empty directory lathe runs in: reading hostile input must not write here either.
    cwd: PathBuf,
}

fn destinations() -> Destinations {
    let tmp = common::scratch();
    let new_parent = tmp.path().join("new");
    let existing = tmp.path().join("existing");
    let archive_dir = tmp.path().join("archive");
    let cwd = tmp.path().join("cwd");
    for d in [&new_parent, &archive_dir, &cwd] {
        fs::create_dir(d).unwrap();
    }

    common::fixture_copy(&existing);
    let mut index = index_json(&existing);
    index["manifests"].as_array_mut().unwrap().retain(|d| {
        !d["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap()
            .starts_with("build")
    });
    fs::write(
        existing.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    common::lathe_ok(&["gc", &format!("oci:{}", existing.display())]);
    let build_layer = build_only_layer(common::fixtures());
    assert!(
        !blob_path(&existing, &build_layer).exists(),
        "gc should have removed the build layer"
    );

    common::lathe_ok(&[
        "copy",
        &format!("oci:{}:run", common::fixtures().display()),
        &format!("oci-archive:{}:run", archive_dir.join("dest.tar").display()),
    ]);
    Destinations {
        _tmp: tmp,
        new_parent,
        existing,
        archive_dir,
        cwd,
    }
}

impl Destinations {
    fn new_layout(&self) -> PathBuf {
        self.new_parent.join("layout")
    }

    /// (destination reference, directory that must not change).
    fn all(&self) -> Vec<(String, PathBuf)> {
        vec![
            (
                format!("oci:{}:hostile", self.new_layout().display()),
                self.new_parent.clone(),
            ),
            (
                format!("oci:{}:hostile", self.existing.display()),
                self.existing.clone(),
            ),
            (
                format!(
                    "oci-archive:{}:hostile",
                    self.archive_dir.join("dest.tar").display()
                ),
                self.archive_dir.clone(),
            ),
        ]
    }
}

// -------------------------------------------------------------- assertions

/// Copies `source` (which lives in `source_dir`) into each destination and checks that every
/// copy fails with status 1 and an error naming each of `culprits`, and that no destination,
/// nor the source, nor the working directory changed (no leftover temp files either).
fn assert_every_copy_refused(source: &str, source_dir: &Path, culprits: &[&str]) {
    let dests = destinations();
    let source_before = common::snapshot(source_dir);
    for (dest, dir) in dests.all() {
        let before = common::snapshot(&dir);
        let out = common::lathe_in(&dests.cwd, &["copy", source, &dest]);
        let err = common::stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "lathe copy {source} {dest} should fail with status 1: {err}"
        );
        assert!(err.contains("lathe: error: "), "{err}");
        for culprit in culprits {
            assert!(
                err.contains(culprit),
                "copying to {dest}: the error should name {culprit:?}: {err}"
            );
        }
        assert_eq!(
            common::snapshot(&dir),
            before,
            "a failed copy changed {}",
            dir.display()
        );
    }
    assert!(
        !dests.new_layout().exists(),
        "a failed copy created the new layout"
    );
    assert_eq!(
        fs::read_dir(&dests.new_parent).unwrap().count(),
        0,
        "leftovers beside the new layout"
    );
    assert_eq!(
        fs::read_dir(&dests.cwd).unwrap().count(),
        0,
        "lathe wrote into its working directory"
    );
    assert_eq!(
        common::snapshot(source_dir),
        source_before,
        "reading the source changed it"
    );
}

/// `lathe ARGS` fails with status 1 and an error naming each of `culprits`.
fn assert_lathe_fails_naming(args: &[&str], culprits: &[&str]) {
    let out = common::lathe(args);
    let err = common::stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lathe {args:?} should fail with status 1: {err}"
    );
    for culprit in culprits {
        assert!(
            err.contains(culprit),
            "lathe {args:?}: the error should name {culprit:?}: {err}"
        );
    }
}

fn oci(layout: &Path, name: &str) -> String {
    format!("oci:{}:{name}", layout.display())
}

// ------------------------------------------------------------------ layouts

#[test]
fn layer_blob_with_wrong_bytes_of_the_right_length_is_refused_naming_its_digest() {
    let src = source_layout();
    let layer = build_only_layer(&src.layout);
    scramble_same_length(&blob_path(&src.layout, &layer));
    assert_every_copy_refused(
        &oci(&src.layout, "build"),
        &src.layout,
        &[&layer, "does not match its digest"],
    );
}

#[test]
fn layer_blob_longer_than_its_descriptor_is_refused_naming_its_digest() {
    let src = source_layout();
    let layer = build_only_layer(&src.layout);
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(blob_path(&src.layout, &layer))
        .unwrap();
    std::io::Write::write_all(&mut file, b"trailing garbage").unwrap();
    assert_every_copy_refused(&oci(&src.layout, "build"), &src.layout, &[&layer]);
}

#[test]
fn layer_blob_shorter_than_its_descriptor_is_refused_naming_its_digest() {
    let src = source_layout();
    let layer = build_only_layer(&src.layout);
    let path = blob_path(&src.layout, &layer);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_every_copy_refused(&oci(&src.layout, "build"), &src.layout, &[&layer]);
}

#[test]
fn manifest_naming_a_missing_layer_blob_is_refused_naming_its_digest() {
    let src = source_layout();
    let layer = build_only_layer(&src.layout);
    fs::remove_file(blob_path(&src.layout, &layer)).unwrap();
    assert_every_copy_refused(
        &oci(&src.layout, "build"),
        &src.layout,
        &[&layer, "missing"],
    );
}

#[test]
fn truncated_index_json_is_refused_naming_the_file() {
    let src = source_layout();
    let path = src.layout.join("index.json");
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let culprit = path.display().to_string();
    assert_every_copy_refused(&oci(&src.layout, "build"), &src.layout, &[&culprit]);
    assert_lathe_fails_naming(&["inspect", &oci(&src.layout, "run")], &[&culprit]);
}

#[test]
fn corrupted_config_blob_fails_copy_and_inspect_naming_its_digest() {
    let src = source_layout();
    let config = build_amd64_manifest(&src.layout)["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    scramble_same_length(&blob_path(&src.layout, &config));
    assert_every_copy_refused(
        &oci(&src.layout, "build"),
        &src.layout,
        &[&config, "does not match its digest"],
    );
    let before = common::snapshot(&src.layout);
    for args in [
        vec!["inspect", &*oci(&src.layout, "build")],
        vec!["inspect", "--json", &*oci(&src.layout, "build")],
        vec!["inspect", &*oci(&src.layout, "build-linux-amd64")],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        assert_lathe_fails_naming(&args, &[&config, "does not match its digest"]);
    }
    assert_eq!(
        common::snapshot(&src.layout),
        before,
        "inspect changed the layout it read"
    );
}

#[test]
fn corrupted_manifest_blob_fails_copy_and_inspect_naming_its_digest() {
    let src = source_layout();
    let manifest = ref_digest(&src.layout, "build-linux-amd64");
    scramble_same_length(&blob_path(&src.layout, &manifest));
    assert_every_copy_refused(
        &oci(&src.layout, "build"),
        &src.layout,
        &[&manifest, "does not match its digest"],
    );
    assert_lathe_fails_naming(&["inspect", &oci(&src.layout, "build")], &[&manifest]);
    assert_lathe_fails_naming(
        &["inspect", "--raw", &oci(&src.layout, "build-linux-amd64")],
        &[&manifest],
    );
}

// -------------------------------------------------------------- oci-archive

#[test]
fn oci_archive_whose_index_names_a_blob_not_in_the_archive_is_refused() {
    let tmp = common::scratch();
    let unpacked = tmp.path().join("unpacked");
    unpacked_oci_archive(&unpacked);
    let root = ref_digest(&unpacked, "build");
    fs::remove_file(blob_path(&unpacked, &root)).unwrap();
    let out = common::scratch();
    let archive = out.path().join("hostile.tar");
    retar(&unpacked, &archive);
    let source = format!("oci-archive:{}:build", archive.display());
    assert_every_copy_refused(&source, out.path(), &[&root, "missing"]);
    assert_lathe_fails_naming(&["inspect", &source], &[&root]);
}

#[test]
fn oci_archive_missing_a_layer_blob_is_refused_naming_its_digest() {
    let tmp = common::scratch();
    let unpacked = tmp.path().join("unpacked");
    unpacked_oci_archive(&unpacked);
    let layer = build_only_layer(&unpacked);
    fs::remove_file(blob_path(&unpacked, &layer)).unwrap();
    let out = common::scratch();
    let archive = out.path().join("hostile.tar");
    retar(&unpacked, &archive);
    assert_every_copy_refused(
        &format!("oci-archive:{}:build", archive.display()),
        out.path(),
        &[&layer, "missing"],
    );
}

#[test]
fn oci_archive_with_a_corrupted_layer_is_refused_naming_its_digest() {
    let tmp = common::scratch();
    let unpacked = tmp.path().join("unpacked");
    unpacked_oci_archive(&unpacked);
    let layer = build_only_layer(&unpacked);
    scramble_same_length(&blob_path(&unpacked, &layer));
    let out = common::scratch();
    let archive = out.path().join("hostile.tar");
    retar(&unpacked, &archive);
    assert_every_copy_refused(
        &format!("oci-archive:{}:build", archive.display()),
        out.path(),
        &[&layer, "does not match its digest"],
    );
}

// ----------------------------------------------------------- docker-archive

/// Replaces the first layer path of the unpacked run docker-archive with `path`.
fn docker_archive_with_first_layer(path: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = common::scratch();
    let mut manifest = unpacked_docker_archive(tmp.path());
    manifest[0]["Layers"][0] = Value::from(path);
    pack_docker_archive(tmp.path(), &manifest)
}

#[test]
fn docker_archive_layer_path_with_dotdot_is_refused_as_outside_the_archive() {
    let (dir, archive) = docker_archive_with_first_layer("../../etc/passwd");
    assert_every_copy_refused(
        &format!("docker-archive:{}", archive.display()),
        dir.path(),
        &[r#""../../etc/passwd""#, "outside the archive"],
    );
}

#[test]
fn docker_archive_layer_path_hidden_dotdot_is_refused_as_outside_the_archive() {
    let (dir, archive) = docker_archive_with_first_layer("blobs/../../../etc/passwd");
    assert_every_copy_refused(
        &format!("docker-archive:{}", archive.display()),
        dir.path(),
        &[r#""blobs/../../../etc/passwd""#, "outside the archive"],
    );
}

#[test]
fn docker_archive_absolute_layer_path_is_refused_as_outside_the_archive() {
    let (dir, archive) = docker_archive_with_first_layer("/etc/passwd");
    assert_every_copy_refused(
        &format!("docker-archive:{}", archive.display()),
        dir.path(),
        &[r#""/etc/passwd""#, "outside the archive"],
    );
}

#[test]
fn docker_archive_config_path_outside_the_archive_is_refused() {
    let tmp = common::scratch();
    let mut manifest = unpacked_docker_archive(tmp.path());
    manifest[0]["Config"] = Value::from("../config.json");
    let (dir, archive) = pack_docker_archive(tmp.path(), &manifest);
    assert_every_copy_refused(
        &format!("docker-archive:{}", archive.display()),
        dir.path(),
        &[r#""../config.json""#, "outside the archive"],
    );
}

#[test]
fn docker_archive_layer_that_is_a_symlink_out_of_the_archive_is_refused() {
    let tmp = common::scratch();
    let manifest = unpacked_docker_archive(tmp.path());
    let layer = manifest[0]["Layers"][0].as_str().unwrap().to_string();
    fs::remove_file(tmp.path().join(&layer)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", tmp.path().join(&layer)).unwrap();
    let (dir, archive) = pack_docker_archive(tmp.path(), &manifest);
    let listing = Command::new("tar")
        .args(["-tvf", archive.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains(&format!("{layer} -> /etc/passwd")),
        "the archive should hold the layer as a symlink"
    );
    assert_every_copy_refused(
        &format!("docker-archive:{}", archive.display()),
        dir.path(),
        &[&format!("{layer:?}"), "not in the archive"],
    );
}
