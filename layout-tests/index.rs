//! `lathe index create` and `lathe index add`: per-platform images (the fixture run and build
//! images' children, as if built on native runners) stitched into an index in a layout, an
//! archive and a registry. skopeo reads the index and the exact child digests, umoci and
//! oci-image-tool reach each child through its `ref-os-arch` name, `lathe run` runs the arm64
//! child, a registry index moves no layer (a counting proxy sees mounts only), `add` replaces a
//! platform in place, and bad inputs are named with nothing written.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use common::*;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry, named_digest};
use serde_json::Value;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `oci:FIXTURES:NAME`.
fn fx(name: &str) -> String {
    format!("oci:{}:{name}", fixtures().display())
}

/// `oci:DIR:NAME`.
fn oci(dir: &Path, name: &str) -> String {
    format!("oci:{}:{name}", dir.display())
}

/// `lathe index ARGS --json`; the parsed outcome when it succeeds.
fn index(args: &[&str]) -> (Output, Option<Value>) {
    let mut all = vec!["index"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = lathe(&all);
    let parsed = out.status.success().then(|| {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(&out)))
    });
    (out, parsed)
}

fn index_ok(args: &[&str]) -> Value {
    let (out, parsed) = index(args);
    parsed.unwrap_or_else(|| panic!("lathe index {args:?}: {}", report(&out)))
}

/// A refused command: its exit code is `code`; returns stderr.
fn index_fails(args: &[&str], code: i32) -> String {
    let (out, _) = index(args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", report(&out));
    stderr(&out)
}

/// An index's children as (os/arch[/variant], digest, media type).
fn children(index: &Value) -> Vec<(String, String, String)> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut platform = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                platform += &format!("/{v}");
            }
            (
                platform,
                m["digest"].as_str().unwrap().to_string(),
                m["mediaType"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The digest of the manifest at `reference`.
fn digest_of(reference: &str) -> String {
    skopeo_raw(reference).0
}

/// The digests of the layers and config of the manifest at `reference`.
fn blobs_of(reference: &str) -> BTreeSet<String> {
    let manifest = skopeo_raw(reference).1;
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain([&manifest["config"]])
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

/// `lathe run --platform PLATFORM IMAGE -- uname -m`: what it prints.
fn machine(image: &str, platform: &str) -> String {
    let store = scratch();
    let store_arg = format!("--store={}", store.path().display());
    lathe_ok(&[
        "run",
        "--quiet",
        &store_arg,
        "--platform",
        platform,
        image,
        "--",
        "uname",
        "-m",
    ])
}

/// Unpacks `DIR:NAME` with umoci; the ELF machine of its /bin/busybox.
fn umoci_busybox_machine(dir: &Path, name: &str, bundle: &Path) -> u16 {
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:{name}", dir.display()),
            bundle.to_str().unwrap(),
        ],
    );
    elf_machine(&bundle.join("rootfs/bin/busybox"))
}

/// oci-image-tool's verdict on the layout, and on the index, each child manifest and config
/// blob by type (rc1 skips nested indexes).
fn validate_layout(dir: &Path, index_digest: &str) {
    let out = tool(
        "oci-image-tool",
        &["validate", "--type", "image", dir.to_str().unwrap()],
    );
    assert!(out.contains("Validation succeeded"), "{out}");
    let blob = |digest: &str| dir.join(format!("blobs/sha256/{}", &digest["sha256:".len()..]));
    let validate = |kind: &str, digest: &str| {
        tool(
            "oci-image-tool",
            &["validate", "--type", kind, blob(digest).to_str().unwrap()],
        );
    };
    validate("imageIndex", index_digest);
    let index: Value = serde_json::from_slice(&std::fs::read(blob(index_digest)).unwrap()).unwrap();
    for (_, digest, _) in children(&index) {
        validate("manifest", &digest);
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(blob(&digest)).unwrap()).unwrap();
        validate("config", manifest["config"]["digest"].as_str().unwrap());
    }
}

/// The ref names of a layout's index.json, in order.
fn ref_names(dir: &Path) -> Vec<String> {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string)
        .collect()
}

#[test]
fn two_single_platform_images_become_one_index_in_a_layout_and_an_archive() {
    let tmp = scratch();
    let out_dir = tmp.path().join("out");
    let dest = oci(&out_dir, "multi");
    let amd64 = fx("run-linux-amd64");
    let arm64 = fx("run-linux-arm64");
    let (amd64_digest, arm64_digest) = (digest_of(&amd64), digest_of(&arm64));

    let outcome = index_ok(&["create", &dest, "--add", &amd64, "--add", &arm64]);
    let (digest, raw) = skopeo_raw(&dest);
    assert_eq!(raw["mediaType"], OCI_INDEX);
    assert_eq!(outcome["digest"], digest.as_str(), "{outcome:#}");
    assert_eq!(outcome["mediaType"], OCI_INDEX);
    assert_eq!(
        children(&raw),
        [
            (
                "linux/amd64".to_string(),
                amd64_digest.clone(),
                "application/vnd.oci.image.manifest.v1+json".to_string()
            ),
            (
                "linux/arm64/v8".to_string(),
                arm64_digest.clone(),
                "application/vnd.oci.image.manifest.v1+json".to_string()
            ),
        ]
    );
    let reported: Vec<(&str, &str, &str)> = outcome["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["platform"].as_str().unwrap(),
                c["digest"].as_str().unwrap(),
                c["from"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            ("linux/amd64", amd64_digest.as_str(), amd64.as_str()),
            ("linux/arm64", arm64_digest.as_str(), arm64.as_str())
        ]
    );

    // Each child is reachable by the tools that cannot open an index, and unchanged.
    assert_eq!(
        ref_names(&out_dir),
        ["multi", "multi-linux-amd64", "multi-linux-arm64"]
    );
    assert_eq!(digest_of(&oci(&out_dir, "multi-linux-amd64")), amd64_digest);
    assert_eq!(digest_of(&oci(&out_dir, "multi-linux-arm64")), arm64_digest);
    validate_layout(&out_dir, &digest);
    assert_eq!(
        umoci_busybox_machine(&out_dir, "multi-linux-amd64", &tmp.path().join("b-amd64")),
        62
    );
    assert_eq!(
        umoci_busybox_machine(&out_dir, "multi-linux-arm64", &tmp.path().join("b-arm64")),
        183
    );
    assert_eq!(machine(&dest, "linux/arm64"), "aarch64\n");
    assert_eq!(machine(&dest, "linux/amd64"), "x86_64\n");

    // The same children into an archive give the same index.
    let archive = format!(
        "oci-archive:{}:multi",
        tmp.path().join("multi.tar").display()
    );
    let outcome = index_ok(&["create", &archive, "--add", &amd64, "--add", &arm64]);
    assert_eq!(outcome["digest"], digest.as_str());
    assert_eq!(digest_of(&archive), digest);

    // A docker-archive holds one image: a source, never the destination.
    let docker_tar = tmp.path().join("arm64.tar");
    let docker_archive = format!("docker-archive:{}", docker_tar.display());
    lathe_ok(&["copy", "--quiet", &arm64, &docker_archive]);
    let mixed_dir = tmp.path().join("mixed");
    let outcome = index_ok(&[
        "create",
        &oci(&mixed_dir, "m"),
        "--add",
        &amd64,
        "--add",
        &docker_archive,
    ]);
    assert_eq!(outcome["children"][1]["platform"], "linux/arm64");
    assert_eq!(outcome["children"][1]["from"], docker_archive.as_str());
    assert_eq!(
        config_of(&oci(&mixed_dir, "m-linux-arm64")),
        config_of(&arm64),
        "the docker-archive's image keeps its config"
    );
    let refused = tmp.path().join("refused.tar");
    let err = index_fails(
        &[
            "create",
            &format!("docker-archive:{}", refused.display()),
            "--add",
            &amd64,
            "--add",
            &arm64,
        ],
        3,
    );
    assert!(err.contains("docker-archive"), "{err}");
    assert!(!refused.exists());

    // An index given as a source gives its children, or those --platform names.
    let one_dir = tmp.path().join("one");
    let outcome = index_ok(&[
        "create",
        &oci(&one_dir, "arm"),
        "--add",
        &fx("run"),
        "--platform",
        "linux/arm64",
    ]);
    let (_, raw) = skopeo_raw(&oci(&one_dir, "arm"));
    assert_eq!(raw["mediaType"], OCI_INDEX);
    assert_eq!(children(&raw).len(), 1);
    assert_eq!(children(&raw)[0].1, arm64_digest);
    assert_eq!(outcome["children"][0]["from"], fx("run").as_str());
}

#[test]
fn add_replaces_a_platform_and_adds_new_ones_in_place() {
    let tmp = scratch();
    let dir = tmp.path().join("out");
    let multi = oci(&dir, "multi");
    let (run_amd64, run_arm64, build_arm64) = (
        fx("run-linux-amd64"),
        fx("run-linux-arm64"),
        fx("build-linux-arm64"),
    );
    index_ok(&[
        "create",
        &multi,
        "--add",
        &run_amd64,
        "--add",
        &run_arm64,
        "--annotation",
        "org.opencontainers.image.description=made of native builds",
    ]);
    // A third platform: the amd64 run image relabelled as linux/arm/v7 (its layers are not
    // run, only named).
    let v7 = oci(&tmp.path().join("v7"), "img");
    patched_image(&run_amd64, &v7, |config| {
        config["architecture"] = "arm".into();
        config["variant"] = "v7".into();
    });

    let (out, outcome) = index(&["add", &multi, "--add", &build_arm64, "--add", &v7]);
    let outcome = outcome.unwrap_or_else(|| panic!("{}", report(&out)));
    let (run_amd64_digest, run_arm64_digest, build_arm64_digest, v7_digest) = (
        digest_of(&run_amd64),
        digest_of(&run_arm64),
        digest_of(&build_arm64),
        digest_of(&v7),
    );
    assert!(
        stderr(&out).contains(&format!(
            "replaced linux/arm64 {run_arm64_digest} with {build_arm64_digest} from {build_arm64}"
        )),
        "{}",
        report(&out)
    );
    assert_eq!(outcome["replaced"][0]["digest"], run_arm64_digest.as_str());
    assert_eq!(
        outcome["replaced"][0]["replaced_by"],
        build_arm64_digest.as_str()
    );
    let (digest, raw) = skopeo_raw(&multi);
    assert_eq!(outcome["digest"], digest.as_str());
    let platforms: Vec<(String, String)> =
        children(&raw).into_iter().map(|(p, d, _)| (p, d)).collect();
    assert_eq!(
        platforms,
        [
            ("linux/amd64".to_string(), run_amd64_digest.clone()),
            ("linux/arm64/v8".to_string(), build_arm64_digest.clone()),
            ("linux/arm/v7".to_string(), v7_digest.clone()),
        ]
    );
    assert_eq!(
        raw["annotations"]["org.opencontainers.image.description"], "made of native builds",
        "the index's annotations are kept"
    );
    let froms: Vec<&str> = outcome["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["from"].as_str().unwrap())
        .collect();
    assert_eq!(froms, [multi.as_str(), build_arm64.as_str(), v7.as_str()]);
    // The per-platform names follow: the arm64 one is now the build image.
    assert_eq!(
        ref_names(&dir),
        [
            "multi",
            "multi-linux-amd64",
            "multi-linux-arm64",
            "multi-linux-arm-v7"
        ]
    );
    assert_eq!(
        digest_of(&oci(&dir, "multi-linux-arm64")),
        build_arm64_digest
    );
    validate_layout(&dir, &digest);
    let bundle = tmp.path().join("bundle");
    assert_eq!(
        umoci_busybox_machine(&dir, "multi-linux-arm64", &bundle),
        183
    );
    assert!(bundle.join("rootfs/bin/bash").exists(), "the build image");

    // Adding what is there already changes nothing.
    let (out, outcome) = index(&["add", &multi, "--add", &v7]);
    assert_eq!(outcome.unwrap()["digest"], digest.as_str());
    assert!(stderr(&out).contains("already has"), "{}", report(&out));
    assert_eq!(digest_of(&multi), digest);

    // An image that is not an index is named, and nothing changes.
    let before = snapshot(&dir);
    let single = oci(&dir, "multi-linux-amd64");
    let err = index_fails(&["add", &single, "--add", &run_arm64], 3);
    assert!(
        err.contains(&single) && err.contains("not an index"),
        "{err}"
    );
    assert_eq!(snapshot(&dir), before);

    // An archive is rewritten in place too.
    let tar = tmp.path().join("multi.tar");
    let archive = format!("oci-archive:{}:multi", tar.display());
    index_ok(&["create", &archive, "--add", &run_amd64, "--add", &run_arm64]);
    let outcome = index_ok(&["add", &archive, "--add", &build_arm64]);
    let (digest, raw) = skopeo_raw(&archive);
    assert_eq!(outcome["digest"], digest.as_str());
    assert_eq!(children(&raw)[1].1, build_arm64_digest);
    assert_eq!(
        digest_of(&format!("oci-archive:{}:multi-linux-arm64", tar.display())),
        build_arm64_digest
    );
}

#[test]
fn bad_inputs_are_named_and_nothing_is_written() {
    let tmp = scratch();
    let dir = tmp.path().join("out");
    let dest = oci(&dir, "multi");
    let (run_amd64, build_amd64) = (fx("run-linux-amd64"), fx("build-linux-amd64"));

    // Two images of one platform: both named, with their digests.
    let err = index_fails(
        &["create", &dest, "--add", &run_amd64, "--add", &build_amd64],
        3,
    );
    for named in [
        run_amd64.clone(),
        build_amd64.clone(),
        digest_of(&run_amd64),
        digest_of(&build_amd64),
    ] {
        assert!(err.contains(&named), "{named} not in {err}");
    }
    assert!(err.contains("linux/amd64"), "{err}");
    assert!(!dir.exists(), "nothing is written");
    // Also when one comes from an index.
    let err = index_fails(
        &["create", &dest, "--add", &fx("run"), "--add", &build_amd64],
        3,
    );
    assert!(
        err.contains(&fx("run")) && err.contains(&build_amd64),
        "{err}"
    );
    assert!(!dir.exists());

    // Into a layout that holds an image already: it is left as it was.
    lathe_ok(&["copy", "--quiet", &run_amd64, &oci(&dir, "kept")]);
    let before = snapshot(&dir);
    let missing = fx("no-such-image");
    let err = index_fails(
        &["create", &dest, "--add", &run_amd64, "--add", &missing],
        1,
    );
    assert!(err.contains(&missing), "{err}");
    let no_layout = oci(&tmp.path().join("no-such-dir"), "x");
    let err = index_fails(&["create", &dest, "--add", &no_layout], 1);
    assert!(err.contains(&no_layout), "{err}");
    let err = index_fails(
        &[
            "create",
            &dest,
            "--add",
            &fx("run"),
            "--platform",
            "linux/s390x",
        ],
        3,
    );
    assert!(
        err.contains("linux/s390x") && err.contains(&fx("run")),
        "{err}"
    );
    let err = index_fails(&["add", &oci(&dir, "absent"), "--add", &run_amd64], 1);
    assert!(err.contains(&oci(&dir, "absent")), "{err}");
    assert_eq!(snapshot(&dir), before);

    // The same image given twice is named once.
    let (out, outcome) = index(&["create", &dest, "--add", &fx("run"), "--add", &run_amd64]);
    assert_eq!(outcome.unwrap()["children"].as_array().unwrap().len(), 2);
    assert!(stderr(&out).contains("named once"), "{}", report(&out));
}

#[test]
fn a_registry_index_mounts_every_blob_and_moves_no_layer() {
    let tmp = scratch();
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let host = proxy.host();
    // As native runners would push them: one repository per platform.
    let amd64 = format!("docker://{host}/native/amd64:1");
    let arm64 = format!("docker://{host}/native/arm64:1");
    let build_arm64 = format!("docker://{host}/native/build-arm64:1");
    for (from, to) in [
        (fx("run-linux-amd64"), &amd64),
        (fx("run-linux-arm64"), &arm64),
        (fx("build-linux-arm64"), &build_arm64),
    ] {
        lathe_ok(&["copy", "--quiet", &from, to]);
    }
    let (amd64_digest, arm64_digest) = (digest_of(&amd64), digest_of(&arm64));
    let multi = format!("docker://{host}/app/multi:1");
    proxy.clear();
    let outcome = index_ok(&["create", &multi, "--add", &amd64, "--add", &arm64]);
    let seen = proxy.seen();
    let (digest, raw) = skopeo_raw(&multi);
    assert_eq!(outcome["digest"], digest.as_str());
    assert_eq!(raw["mediaType"], OCI_INDEX);
    let digests: Vec<String> = children(&raw).into_iter().map(|(_, d, _)| d).collect();
    assert_eq!(digests, [amd64_digest.clone(), arm64_digest.clone()]);
    // No layer or config went either way: every one was mounted from its repository.
    let blob_gets: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path().contains("/blobs/"))
        .filter_map(named_digest)
        .collect();
    let layers: BTreeSet<String> = [&amd64, &arm64]
        .into_iter()
        .flat_map(|r| {
            skopeo_raw(r).1["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(blob_gets.is_disjoint(&layers), "{seen:#?}");
    assert!(
        !seen
            .iter()
            .any(|s| (s.method == "PUT" || s.method == "PATCH") && s.is_blob_upload()),
        "a blob was uploaded: {seen:#?}"
    );
    let mounted: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.target.contains("mount=") && s.status == Some(201))
        .filter_map(named_digest)
        .collect();
    let wanted: BTreeSet<String> = blobs_of(&amd64).union(&blobs_of(&arm64)).cloned().collect();
    assert_eq!(mounted, wanted, "{seen:#?}");
    let manifest_puts: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.path().contains("/manifests/"))
        .map(|s| s.path())
        .collect();
    assert_eq!(
        manifest_puts.len(),
        3,
        "two children and the index: {seen:#?}"
    );
    assert_eq!(outcome["blobs_written"], 3, "{outcome:#}");
    let body_bytes: usize = seen.iter().map(|s| s.body_len).sum();
    eprintln!(
        "registry index create: {} requests ({} HEAD, {} GET, {} POST, {} PUT), {} bytes in \
         request bodies",
        seen.len(),
        seen.iter().filter(|s| s.method == "HEAD").count(),
        seen.iter().filter(|s| s.method == "GET").count(),
        seen.iter().filter(|s| s.method == "POST").count(),
        seen.iter().filter(|s| s.method == "PUT").count(),
        body_bytes
    );
    assert_eq!(machine(&multi, "linux/arm64"), "aarch64\n");

    // add: the arm64 child replaced in place, its blobs mounted too.
    proxy.clear();
    let (out, outcome) = index(&["add", &multi, "--add", &build_arm64]);
    let outcome = outcome.unwrap_or_else(|| panic!("{}", report(&out)));
    assert!(
        stderr(&out).contains("replaced linux/arm64"),
        "{}",
        report(&out)
    );
    let seen = proxy.seen();
    assert!(
        !seen
            .iter()
            .any(|s| (s.method == "PUT" || s.method == "PATCH") && s.is_blob_upload()),
        "{seen:#?}"
    );
    let build_config = skopeo_raw(&build_arm64).1["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob_gets: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path().contains("/blobs/"))
        .filter_map(named_digest)
        .collect();
    assert_eq!(blob_gets, BTreeSet::from([build_config]), "{seen:#?}");
    let (digest, raw) = skopeo_raw(&multi);
    assert_eq!(outcome["digest"], digest.as_str());
    let digests: Vec<String> = children(&raw).into_iter().map(|(_, d, _)| d).collect();
    assert_eq!(digests, [amd64_digest.clone(), digest_of(&build_arm64)]);

    // The registry index as a source: a layout gets the same index and every blob.
    let pulled = tmp.path().join("pulled");
    let outcome = index_ok(&["create", &oci(&pulled, "multi"), "--add", &multi]);
    assert_eq!(outcome["digest"], digest.as_str());
    validate_layout(&pulled, &digest);

    // Docker schema 2 manifests (as docker build pushes them) give a Docker manifest list,
    // and are not mixed with OCI ones.
    let docker_amd64 = format!("docker://{host}/docker/amd64:1");
    let docker_arm64 = format!("docker://{host}/docker/arm64:1");
    for (from, to) in [
        (fx("run-linux-amd64"), &docker_amd64),
        (fx("run-linux-arm64"), &docker_arm64),
    ] {
        tool(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--format",
                "v2s2",
                "--dest-tls-verify=false",
                &from,
                to,
            ],
        );
    }
    let docker_multi = format!("docker://{host}/docker/multi:1");
    index_ok(&[
        "create",
        &docker_multi,
        "--add",
        &docker_amd64,
        "--add",
        &docker_arm64,
    ]);
    let (_, raw) = skopeo_raw(&docker_multi);
    assert_eq!(raw["mediaType"], DOCKER_LIST);
    let kids = children(&raw);
    assert_eq!(kids[0].1, digest_of(&docker_amd64));
    assert_eq!(kids[1].1, digest_of(&docker_arm64));
    assert!(
        kids.iter().all(|(_, _, t)| t.contains("docker")),
        "{kids:?}"
    );
    let mixed = format!("docker://{host}/docker/mixed:1");
    let err = index_fails(
        &["create", &mixed, "--add", &docker_amd64, "--add", &arm64],
        3,
    );
    assert!(err.contains(&docker_amd64) && err.contains(&arm64), "{err}");

    // Nothing is pushed under a tag when an image is missing or a platform given twice.
    let missing = format!("docker://{host}/native/amd64:no-such-tag");
    let err = index_fails(&["create", &mixed, "--add", &arm64, "--add", &missing], 1);
    assert!(err.contains(&missing), "{err}");
    let err = index_fails(&["create", &mixed, "--add", &arm64, "--add", &multi], 3);
    assert!(err.contains(&arm64) && err.contains(&multi), "{err}");
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &mixed])
        .output()
        .unwrap();
    assert!(!inspect.status.success(), "{mixed} was pushed");
}
