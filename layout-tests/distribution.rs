//! `lathe buildpack package` and `lathe builder create`: packages and builders that skopeo,
//! umoci and oci-image-tool read, the same digests from the same input, per-platform images and
//! folders, reused dependency layers, a builder's root filesystem as the lifecycle expects it,
//! and bad input refused with the thing at fault named and the destination left alone.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A bash buildpack: bin/detect (0700 on disk), bin/build (0644 on disk: pack makes it
/// executable anyway), a private README (0600) and an executable helper (0750).
fn write_buildpack(dir: &Path, id: &str, version: &str) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("lib")).unwrap();
    fs::write(
        dir.join("buildpack.toml"),
        format!(
            "api = \"0.10\"\n\n[buildpack]\nid = \"{id}\"\nversion = \"{version}\"\nname = \"Test {id}\"\n"
        ),
    )
    .unwrap();
    let files: [(&str, String, u32); 4] = [
        ("bin/detect", "#!/usr/bin/env bash\nexit 0\n".into(), 0o700),
        (
            "bin/build",
            format!("#!/usr/bin/env bash\necho building {id}\n"),
            0o644,
        ),
        ("README.md", format!("{id}\n"), 0o600),
        ("lib/helper.sh", "echo help\n".into(), 0o750),
    ];
    for (name, text, mode) in files {
        fs::write(dir.join(name), text).unwrap();
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// A composite buildpack whose one order group holds `group` (id, version, optional).
fn write_composite(dir: &Path, id: &str, version: &str, group: &[(&str, &str, bool)]) {
    fs::create_dir_all(dir).unwrap();
    let mut toml = format!(
        "api = \"0.10\"\n\n[buildpack]\nid = \"{id}\"\nversion = \"{version}\"\n\n[[order]]\n"
    );
    for (id, version, optional) in group {
        toml.push_str(&format!(
            "[[order.group]]\nid = \"{id}\"\nversion = \"{version}\"\noptional = {optional}\n"
        ));
    }
    fs::write(dir.join("buildpack.toml"), toml).unwrap();
}

/// Runs lathe with `--json` and no proxy or registry settings from the environment; fails
/// unless it succeeds; the parsed report and stderr.
fn lathe_json(args: &[&str]) -> (Value, String) {
    let mut all = args.to_vec();
    all.push("--json");
    let empty = scratch();
    let mut command = std::process::Command::new(lathe_bin());
    command
        .args(&all)
        .env("DOCKER_CONFIG", empty.path())
        .env_remove("CNB_REGISTRY_AUTH");
    for proxy in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        command.env_remove(proxy);
    }
    let out = command.output().expect("run lathe");
    assert!(
        out.status.success(),
        "lathe {args:?} failed: {}",
        stderr(&out)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), stderr(&out))
}

fn digest_of(report: &Value) -> String {
    report["digest"].as_str().unwrap().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// The image config `skopeo inspect --config` prints.
fn skopeo_config(reference: &str) -> (Value, Vec<u8>) {
    let raw = tool("skopeo", &["inspect", "--config", reference]);
    (serde_json::from_str(&raw).unwrap(), raw.into_bytes())
}

fn label(config: &Value, name: &str) -> Value {
    serde_json::from_str(config["config"]["Labels"][name].as_str().unwrap()).unwrap()
}

/// Name, mode, uid, gid, mtime and size of every entry of a gzip layer blob.
fn layer_entries(path: &Path) -> Vec<(String, u32, u64, u64, u64, u64)> {
    let file = fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                h.size().unwrap(),
            )
        })
        .collect()
}

/// The owner of a path in an unpacked tree: the rootless xattr when lathe recorded one, else
/// the real owner (an unpack as root chowns).
fn owner(path: &Path) -> (u64, u64) {
    match xattr(path, "user.rootlesscontainers") {
        Some(bytes) if !bytes.is_empty() => {
            let (mut uid, mut gid, mut i) = (0u64, 0u64, 0);
            while i < bytes.len() {
                let field = bytes[i] >> 3;
                i += 1;
                let (mut value, mut shift) = (0u64, 0);
                loop {
                    let b = bytes[i];
                    i += 1;
                    value |= u64::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                if field == 1 {
                    uid = value;
                } else {
                    gid = value;
                }
            }
            (uid, gid)
        }
        _ => {
            let meta = fs::symlink_metadata(path).unwrap();
            (meta.uid().into(), meta.gid().into())
        }
    }
}

fn validate_with_oci_image_tool(layout: &Path) {
    let index = read_json(&layout.join("index.json"));
    for entry in index["manifests"].as_array().unwrap() {
        let digest = entry["digest"].as_str().unwrap();
        if entry["mediaType"].as_str().unwrap().contains("index") {
            tool(
                "oci-image-tool",
                &[
                    "validate",
                    "--type",
                    "imageIndex",
                    path_str(&blob(layout, digest)),
                ],
            );
            continue;
        }
        tool(
            "oci-image-tool",
            &[
                "validate",
                "--type",
                "manifest",
                path_str(&blob(layout, digest)),
            ],
        );
        let manifest = read_json(&blob(layout, digest));
        tool(
            "oci-image-tool",
            &[
                "validate",
                "--type",
                "config",
                path_str(&blob(
                    layout,
                    manifest["config"]["digest"].as_str().unwrap(),
                )),
            ],
        );
    }
}

#[test]
fn a_package_is_valid_reproducible_and_laid_out_as_pack_lays_it_out() {
    let tmp = scratch();
    let bp = tmp.path().join("hello");
    write_buildpack(&bp, "test/hello", "0.0.1");
    // The same tree elsewhere, with other mtimes.
    let elsewhere = tmp.path().join("some/where/else");
    fs::create_dir_all(&elsewhere).unwrap();
    tool("cp", &["-a", path_str(&bp), path_str(&elsewhere)]);
    tool(
        "touch",
        &[
            "-d",
            "2001-02-03",
            path_str(&elsewhere.join("hello/bin/build")),
        ],
    );

    let first = tmp.path().join("first");
    let second = tmp.path().join("second");
    let cnb = tmp.path().join("hello.cnb");
    let (report, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&bp),
        "--output",
        &format!("oci:{}:pkg", first.display()),
    ]);
    let (again, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&elsewhere.join("hello")),
        "--output",
        &format!("oci:{}:pkg", second.display()),
    ]);
    let (archived, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&bp),
        "--output",
        &format!("oci-archive:{}", cnb.display()),
    ]);
    assert_eq!(digest_of(&report), digest_of(&again));
    assert_eq!(digest_of(&report), digest_of(&archived));
    assert_eq!(
        report["buildpacks"],
        serde_json::json!(["test/hello@0.0.1"])
    );
    let host = format!("linux/{}", lathe::platform::Platform::host().arch);
    assert_eq!(report["platforms"], serde_json::json!([host]));
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap()
            .contains("host's architecture"),
        "{report}"
    );

    let out = tool(
        "oci-image-tool",
        &["validate", "--type", "image", path_str(&first)],
    );
    assert!(out.contains("Validation succeeded"), "{out}");
    validate_with_oci_image_tool(&first);
    let (raw_digest, _) = skopeo_raw(&format!("oci-archive:{}", cnb.display()));
    assert_eq!(raw_digest, digest_of(&report));

    let (config, _) = skopeo_config(&format!("oci:{}:pkg", first.display()));
    assert_eq!(config["os"], "linux");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), 1);
    assert_eq!(
        label(&config, "io.buildpacks.buildpackage.metadata"),
        serde_json::json!({"id": "test/hello", "version": "0.0.1", "name": "Test test/hello", "stacks": []})
    );
    assert_eq!(
        label(&config, "io.buildpacks.buildpack.layers"),
        serde_json::json!({"test/hello": {"0.0.1": {
            "api": "0.10",
            "layerDiffID": diff_ids[0],
            "name": "Test test/hello",
        }}})
    );

    let manifest = read_json(&blob(&first, &digest_of(&report)));
    let layer = blob(&first, manifest["layers"][0]["digest"].as_str().unwrap());
    let entries = layer_entries(&layer);
    let base = "/cnb/buildpacks/test_hello/0.0.1";
    let expected: Vec<(String, u32)> = [
        ("/cnb", 0o755),
        ("/cnb/buildpacks", 0o755),
        ("/cnb/buildpacks/test_hello", 0o755),
        (base, 0o755),
        (&format!("{base}/README.md"), 0o644),
        (&format!("{base}/bin"), 0o755),
        (&format!("{base}/bin/build"), 0o755),
        (&format!("{base}/bin/detect"), 0o755),
        (&format!("{base}/buildpack.toml"), 0o644),
        (&format!("{base}/lib"), 0o755),
        (&format!("{base}/lib/helper.sh"), 0o755),
    ]
    .iter()
    .map(|(n, m)| (n.to_string(), *m))
    .collect();
    let got: Vec<(String, u32)> = entries.iter().map(|e| (e.0.clone(), e.1)).collect();
    assert_eq!(got, expected);
    for (name, _, uid, gid, mtime, _) in &entries {
        assert_eq!((*uid, *gid, *mtime), (0, 0, 315_532_801), "{name}");
    }
}

#[test]
fn several_platforms_give_an_index_with_per_target_folders() {
    let tmp = scratch();
    let bp = tmp.path().join("multi");
    write_buildpack(&bp, "test/multi", "1.2.3");
    for arch in ["amd64", "arm64"] {
        let folder = bp.join("linux").join(arch);
        fs::create_dir_all(folder.join("bin")).unwrap();
        fs::write(
            folder.join("bin/build"),
            format!("#!/bin/sh\necho {arch}\n"),
        )
        .unwrap();
        fs::write(folder.join("bin/detect"), "#!/bin/sh\n").unwrap();
    }
    let layout = tmp.path().join("layout");
    let (report, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&bp),
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "--output",
        &format!("oci:{}:pkg", layout.display()),
    ]);
    assert_eq!(
        report["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let (_, index) = skopeo_raw(&format!("oci:{}:pkg", layout.display()));
    let platforms: Vec<(String, String, Option<String>)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["os"].as_str().unwrap().to_string(),
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                m["platform"]["variant"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        [
            ("linux".into(), "amd64".into(), None),
            ("linux".into(), "arm64".into(), Some("v8".into())),
        ]
    );
    let names: Vec<String> = read_json(&layout.join("index.json"))["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["pkg", "pkg-linux-amd64", "pkg-linux-arm64"]);
    validate_with_oci_image_tool(&layout);

    let descriptor = fs::read(bp.join("buildpack.toml")).unwrap();
    for arch in ["amd64", "arm64"] {
        let reference = format!("oci:{}:pkg-linux-{arch}", layout.display());
        let (config, _) = skopeo_config(&reference);
        assert_eq!(config["architecture"], arch);
        let bundle = tmp.path().join(format!("bundle-{arch}"));
        tool(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &format!("{}:pkg-linux-{arch}", layout.display()),
                path_str(&bundle),
            ],
        );
        let dir = bundle.join("rootfs/cnb/buildpacks/test_multi/1.2.3");
        assert_eq!(
            fs::read_to_string(dir.join("bin/build")).unwrap(),
            format!("#!/bin/sh\necho {arch}\n")
        );
        assert_eq!(
            fs::read(dir.join("buildpack.toml")).unwrap(),
            descriptor,
            "buildpack.toml is copied into the per-target folder"
        );
        assert!(
            !dir.join("README.md").exists(),
            "only the folder is packaged"
        );
        assert_eq!(
            fs::metadata(dir.join("bin/build")).unwrap().mode() & 0o777,
            0o755
        );
    }
}

#[test]
fn a_composite_reuses_its_dependencies_layers_and_refuses_missing_or_unused_ones() {
    let tmp = scratch();
    let dep = tmp.path().join("dep");
    write_buildpack(&dep, "test/dep", "1.0.0");
    let dep_cnb = tmp.path().join("dep.cnb");
    lathe_json(&[
        "buildpack",
        "package",
        path_str(&dep),
        "--output",
        &format!("oci-archive:{}", dep_cnb.display()),
    ]);
    let (dep_config, _) = skopeo_config(&format!("oci-archive:{}", dep_cnb.display()));
    let dep_diff_id = dep_config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    write_buildpack(&tmp.path().join("other"), "test/other", "2.0.0");
    let meta = tmp.path().join("meta");
    write_composite(
        &meta,
        "test/meta",
        "0.1.0",
        &[("test/dep", "1.0.0", false), ("test/other", "2.0.0", true)],
    );
    let package_toml = tmp.path().join("package.toml");
    fs::write(
        &package_toml,
        "[buildpack]\nuri = \"meta\"\n\n[[dependencies]]\nuri = \"dep.cnb\"\n\n[[dependencies]]\nuri = \"other\"\n",
    )
    .unwrap();
    let layout = tmp.path().join("layout");
    let (report, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&meta),
        "--config",
        path_str(&package_toml),
        "--platform",
        "linux/amd64",
        "--output",
        &format!("oci:{}:meta", layout.display()),
    ]);
    assert_eq!(
        report["buildpacks"],
        serde_json::json!(["test/dep@1.0.0", "test/meta@0.1.0", "test/other@2.0.0"])
    );
    let (config, _) = skopeo_config(&format!("oci:{}:meta", layout.display()));
    let layers = label(&config, "io.buildpacks.buildpack.layers");
    assert_eq!(layers["test/dep"]["1.0.0"]["layerDiffID"], dep_diff_id);
    assert_eq!(
        layers["test/meta"]["0.1.0"]["order"],
        serde_json::json!([{"group": [
            {"id": "test/dep", "version": "1.0.0"},
            {"id": "test/other", "version": "2.0.0", "optional": true},
        ]}])
    );
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids[0], dep_diff_id.as_str(), "dependencies first");
    assert_eq!(
        diff_ids[2], layers["test/meta"]["0.1.0"]["layerDiffID"],
        "the composite last"
    );
    assert_eq!(
        label(&config, "io.buildpacks.buildpackage.metadata")["id"],
        "test/meta"
    );
    // The dependency's blob is reused as it is, not recompressed.
    let (_, dep_manifest) = skopeo_raw(&format!("oci-archive:{}", dep_cnb.display()));
    let manifest = read_json(&blob(&layout, &digest_of(&report)));
    assert_eq!(
        manifest["layers"][0]["digest"],
        dep_manifest["layers"][0]["digest"]
    );

    // A dependency missing, and one nobody uses: refused, naming the buildpacks.
    fs::write(&package_toml, "[[dependencies]]\nuri = \"dep.cnb\"\n").unwrap();
    let before = snapshot(&layout);
    let out = lathe(&[
        "buildpack",
        "package",
        path_str(&meta),
        "--config",
        path_str(&package_toml),
        "--output",
        &format!("oci:{}:meta", layout.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "buildpack test/meta@0.1.0: it references buildpack test/other@2.0.0 which is not present"
        ),
        "{}",
        stderr(&out)
    );
    fs::write(
        &package_toml,
        "[[dependencies]]\nuri = \"dep.cnb\"\n[[dependencies]]\nuri = \"other\"\n[[dependencies]]\nuri = \"unused\"\n",
    )
    .unwrap();
    write_buildpack(&tmp.path().join("unused"), "test/unused", "3.0.0");
    let out = lathe(&[
        "buildpack",
        "package",
        path_str(&meta),
        "--config",
        path_str(&package_toml),
        "--output",
        &format!("oci:{}:meta", layout.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("buildpack test/unused@3.0.0")
            && stderr(&out).contains("it is not used by buildpack test/meta@0.1.0"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot(&layout), before);
}

/// builder.toml for the fixture build image with a directory buildpack, a buildpackage of
/// both platforms, an order that leaves one version out, build env, and a [lifecycle] table.
fn write_builder_toml(dir: &Path, order: &str, buildpacks: &str) -> PathBuf {
    let path = dir.join("builder.toml");
    fs::write(
        &path,
        format!(
            r#"description = "lathe test builder"

{buildpacks}

{order}

[build]
image = "oci:{fixtures}:build"

[[build.env]]
name = "BP_GREETING"
value = "hello"

[[build.env]]
name = "EXTRA_PATH"
value = "/opt/bin"
suffix = "append"
delim = ":"

[[run.images]]
image = "registry.example/lathe/run:1"
mirrors = ["mirror.example/lathe/run:1"]

[lifecycle]
version = "0.20.0"
"#,
            fixtures = fixtures().display()
        ),
    )
    .unwrap();
    path
}

const BUILDPACKS: &str = r#"[[buildpacks]]
id = "test/hello"
uri = "hello"

[[buildpacks]]
uri = "dep.cnb""#;

const ORDER: &str = r#"[[order]]
[[order.group]]
id = "test/hello"

[[order]]
[[order.group]]
id = "test/dep"
version = "1.0.0"
optional = true"#;

fn builder_inputs(dir: &Path) {
    write_buildpack(&dir.join("hello"), "test/hello", "0.0.1");
    write_buildpack(&dir.join("dep"), "test/dep", "1.0.0");
    lathe_json(&[
        "buildpack",
        "package",
        path_str(&dir.join("dep")),
        "--platform",
        "linux/amd64,linux/arm64",
        "--output",
        &format!("oci-archive:{}", dir.join("dep.cnb").display()),
    ]);
}

#[test]
fn a_builder_is_the_build_image_plus_buildpacks_and_cnb_configuration() {
    let tmp = scratch();
    builder_inputs(tmp.path());
    let builder_toml = write_builder_toml(tmp.path(), ORDER, BUILDPACKS);
    let layout = tmp.path().join("layout");
    let create = |layout: &Path| {
        lathe_json(&[
            "builder",
            "create",
            "--config",
            path_str(&builder_toml),
            "--platform",
            "linux/amd64,linux/arm64",
            "--output",
            &format!("oci:{}:builder", layout.display()),
        ])
    };
    let (report, err) = create(&layout);
    let (again, _) = create(&tmp.path().join("again"));
    assert_eq!(digest_of(&report), digest_of(&again), "reproducible");
    assert!(
        err.contains("note:") && err.contains("[lifecycle] is ignored"),
        "{err}"
    );
    assert!(!err.contains("no launcher"), "{err}");
    assert_eq!(
        report["buildpacks"],
        serde_json::json!(["test/dep@1.0.0", "test/hello@0.0.1"])
    );

    let (_, index) = skopeo_raw(&format!("oci:{}:builder", layout.display()));
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    validate_with_oci_image_tool(&layout);

    let (build_config, _) =
        skopeo_config(&format!("oci:{}:build-linux-amd64", fixtures().display()));
    let (config, raw) = skopeo_config(&format!("oci:{}:builder-linux-amd64", layout.display()));
    assert_eq!(config["config"]["User"], "1000:1000");
    assert_eq!(config["config"]["Env"], build_config["config"]["Env"]);
    assert_eq!(config["config"]["WorkingDir"], "/layers");
    assert_eq!(
        config["config"]["Labels"]["io.buildpacks.stack.id"],
        "io.lathe.testdata"
    );
    let base_layers = build_config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(&layers[..base_layers.len()], &base_layers[..]);
    assert_eq!(
        layers.len(),
        base_layers.len() + 4,
        "the launcher, two buildpacks and /cnb"
    );

    let metadata = label(&config, "io.buildpacks.builder.metadata");
    assert_eq!(metadata["createdBy"]["name"], "lathe");
    assert_eq!(metadata["createdBy"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        metadata["lifecycle"]["apis"]["platform"]["supported"],
        serde_json::json!(["0.13"])
    );
    assert_eq!(
        metadata["lifecycle"]["apis"]["buildpack"]["supported"],
        serde_json::json!(["0.7", "0.8", "0.9", "0.10", "0.11", "0.12"])
    );
    assert_eq!(
        metadata["stack"]["runImage"]["image"],
        "registry.example/lathe/run:1"
    );
    assert_eq!(
        label(&config, "io.buildpacks.buildpack.order"),
        serde_json::json!([
            {"group": [{"id": "test/hello", "version": "0.0.1"}]},
            {"group": [{"id": "test/dep", "version": "1.0.0", "optional": true}]},
        ])
    );
    let info = lathe::distribution::read_builder_labels(&raw).unwrap();
    assert_eq!(info.order.len(), 2);
    assert_eq!(info.order[0][0].version, "0.0.1");
    assert_eq!(info.run_images[0].mirrors, ["mirror.example/lathe/run:1"]);
    let ids: Vec<&str> = info.buildpacks.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["test/dep", "test/hello"]);
    assert_eq!(info.platform_apis, ["0.13"]);

    let rootfs = tmp.path().join("rootfs");
    lathe_ok(&[
        "unpack",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:builder", layout.display()),
        path_str(&rootfs),
    ]);
    let order: toml::Table = fs::read_to_string(rootfs.join("cnb/order.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        order,
        r#"
[[order]]
[[order.group]]
id = "test/hello"
version = "0.0.1"

[[order]]
[[order.group]]
id = "test/dep"
version = "1.0.0"
optional = true
"#
        .parse::<toml::Table>()
        .unwrap()
    );
    let run: toml::Table = fs::read_to_string(rootfs.join("cnb/run.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        run["images"][0]["image"].as_str(),
        Some("registry.example/lathe/run:1")
    );
    let stack: toml::Table = fs::read_to_string(rootfs.join("cnb/stack.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        stack["run-image"]["mirrors"][0].as_str(),
        Some("mirror.example/lathe/run:1")
    );
    for (file, value) in [
        ("BP_GREETING", "hello"),
        ("EXTRA_PATH.append", "/opt/bin"),
        ("EXTRA_PATH.delim", ":"),
    ] {
        assert_eq!(
            fs::read_to_string(rootfs.join("cnb/build-config/env").join(file)).unwrap(),
            value
        );
    }
    for bp in ["test_hello/0.0.1", "test_dep/1.0.0"] {
        let build = rootfs.join("cnb/buildpacks").join(bp).join("bin/build");
        assert_eq!(fs::metadata(&build).unwrap().mode() & 0o777, 0o755, "{bp}");
    }
    for dir in ["workspace", "layers"] {
        let path = rootfs.join(dir);
        assert!(path.is_dir());
        assert_eq!(owner(&path), (1000, 1000), "/{dir}");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o755, "/{dir}");
    }
    assert_eq!(owner(&rootfs.join("platform")), (0, 0));
    assert!(
        rootfs.join("bin/bash-static").is_file(),
        "the build image's files"
    );
    assert!(
        rootfs.join("cnb/lifecycle/launcher").is_file(),
        "lathe's own launcher"
    );
}

/// Each platform's builder carries lathe's launcher for that platform at
/// /cnb/lifecycle/launcher (root-owned, 0755), [lifecycle] in builder.toml or not; `--launcher
/// PLATFORM=PATH` replaces it for that platform; a launcher for
/// another machine is refused naming the file, and the destination is not made.
#[test]
fn a_builder_carries_a_launcher_for_each_platform() {
    let tmp = scratch();
    builder_inputs(tmp.path());
    let with_lifecycle = write_builder_toml(tmp.path(), ORDER, BUILDPACKS);
    let builder_toml = tmp.path().join("no-lifecycle.toml");
    let text = fs::read_to_string(&with_lifecycle).unwrap();
    let without = text.replace("[lifecycle]\nversion = \"0.20.0\"\n", "");
    assert_ne!(text, without);
    fs::write(&builder_toml, without).unwrap();
    let lathes = |arch: &str| fs::read(repo_root().join(format!("launcher/bin/launcher-{arch}")));
    let launcher_of = |layout: &Path, arch: &str| -> (Vec<u8>, u32, (u64, u64)) {
        let rootfs = tmp.path().join(format!("rootfs-{arch}"));
        let _ = fs::remove_dir_all(&rootfs);
        lathe_ok(&[
            "unpack",
            "--platform",
            &format!("linux/{arch}"),
            &format!("oci:{}:builder", layout.display()),
            path_str(&rootfs),
        ]);
        let path = rootfs.join("cnb/lifecycle/launcher");
        let bytes = fs::read(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o7777;
        (bytes, mode, owner(&path))
    };
    let create = |config: &Path, layout: &Path, extra: &[&str]| {
        let output = format!("oci:{}:builder", layout.display());
        let mut args = vec!["builder", "create", "--config", path_str(config)];
        args.extend(["--platform", "linux/amd64,linux/arm64", "--output", &output]);
        args.extend(extra);
        lathe_json(&args)
    };

    let layout = tmp.path().join("lathes");
    let (report, err) = create(&builder_toml, &layout, &[]);
    assert!(!err.contains("no launcher"), "{err}");
    let (again, _) = create(&builder_toml, &tmp.path().join("again"), &[]);
    assert_eq!(digest_of(&report), digest_of(&again), "reproducible");
    for arch in ["amd64", "arm64"] {
        let (bytes, mode, owner) = launcher_of(&layout, arch);
        assert!(
            bytes == lathes(arch).unwrap(),
            "{arch}: not lathe's launcher"
        );
        assert_eq!((mode, owner), (0o755, (0, 0)), "{arch}");
        let (config, _) = skopeo_config(&format!("oci:{}:builder-linux-{arch}", layout.display()));
        let history: Vec<&str> = config["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|h| h["created_by"].as_str())
            .collect();
        assert!(
            history.contains(
                &format!(
                    "lathe builder create: lathe {} launcher at /cnb/lifecycle/launcher",
                    env!("CARGO_PKG_VERSION")
                )
                .as_str()
            ),
            "{history:?}"
        );
    }

    // A launcher of one's own for arm64 (still an aarch64 ELF file, with a byte more), given
    // where builder.toml names a lifecycle: amd64 keeps lathe's own.
    let own = tmp.path().join("my-launcher");
    let mut own_bytes = lathes("arm64").unwrap();
    own_bytes.push(0);
    fs::write(&own, &own_bytes).unwrap();
    let flag = format!("linux/arm64={}", own.display());
    let layout = tmp.path().join("own");
    let (_, err) = create(&with_lifecycle, &layout, &["--launcher", &flag]);
    assert!(err.contains("[lifecycle] is ignored"), "{err}");
    assert!(launcher_of(&layout, "arm64").0 == own_bytes);
    assert!(launcher_of(&layout, "amd64").0 == lathes("amd64").unwrap());

    // The amd64 launcher given for arm64, and a platform the builder is not made for.
    let amd64 = tmp.path().join("launcher-amd64");
    fs::write(&amd64, lathes("amd64").unwrap()).unwrap();
    for (flag, needle) in [
        (
            format!("linux/arm64={}", amd64.display()),
            format!(
                "{} is a launcher for linux/amd64 (ELF machine 62), not for linux/arm64 (ELF \
                 machine 183)",
                amd64.display()
            ),
        ),
        (
            format!("linux/s390x={}", amd64.display()),
            "the image is made for linux/amd64, linux/arm64 only".to_string(),
        ),
    ] {
        let refused = tmp.path().join("refused");
        let out = lathe(&[
            "builder",
            "create",
            "--config",
            path_str(&builder_toml),
            "--platform",
            "linux/amd64,linux/arm64",
            "--launcher",
            &flag,
            "--output",
            &format!("oci:{}:builder", refused.display()),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(&needle), "{}", stderr(&out));
        assert!(!refused.exists());
    }
}

#[test]
fn bad_input_is_refused_by_name_and_the_destination_is_left_alone() {
    let tmp = scratch();
    builder_inputs(tmp.path());
    let existing = tmp.path().join("existing");
    lathe_json(&[
        "buildpack",
        "package",
        path_str(&tmp.path().join("hello")),
        "--output",
        &format!("oci:{}:pkg", existing.display()),
    ]);
    let before = snapshot(&existing);
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let files_before = listing(tmp.path());

    let bad_api = tmp.path().join("bad-api");
    write_buildpack(&bad_api, "test/bad", "1.0.0");
    let descriptor = bad_api.join("buildpack.toml");
    let text = fs::read_to_string(&descriptor).unwrap();
    fs::write(
        &descriptor,
        text.replace("api = \"0.10\"", "api = \"0.99\""),
    )
    .unwrap();
    let no_uri = write_builder_toml(tmp.path(), ORDER, "[[buildpacks]]\nid = \"test/hello\"\n");
    let no_uri_text = fs::read_to_string(&no_uri).unwrap();
    let missing_bp = tmp.path().join("missing.toml");
    fs::write(
        &missing_bp,
        no_uri_text
            .replace("[[buildpacks]]\nid = \"test/hello\"\n", BUILDPACKS)
            .replace("id = \"test/dep\"", "id = \"test/absent\""),
    )
    .unwrap();

    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            ["buildpack", "package", path_str(&bad_api)]
                .map(String::from)
                .to_vec(),
            vec![
                descriptor.display().to_string(),
                "Buildpack API 0.99 is not supported".into(),
            ],
        ),
        (
            ["builder", "create", "--config", path_str(&no_uri)]
                .map(String::from)
                .to_vec(),
            vec![format!(
                "{}: [[buildpacks]] entry 1 (test/hello): it has no uri",
                no_uri.display()
            )],
        ),
        (
            ["builder", "create", "--config", path_str(&missing_bp)]
                .map(String::from)
                .to_vec(),
            vec![format!(
                "{}: [[order]] group 2: buildpack test/absent@1.0.0 is not in the builder (it \
                 has no version of it)",
                missing_bp.display()
            )],
        ),
    ];
    for (args, needles) in cases {
        for output in [
            format!("oci:{}:pkg", existing.display()),
            format!("oci:{}:new", tmp.path().join("new").display()),
            format!("oci-archive:{}", tmp.path().join("new.cnb").display()),
        ] {
            let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
            all.extend(["--output", &output]);
            let out = lathe(&all);
            assert_eq!(out.status.code(), Some(1), "{all:?}: {}", stderr(&out));
            for needle in &needles {
                assert!(
                    stderr(&out).contains(needle.as_str()),
                    "{all:?}: {}",
                    stderr(&out)
                );
            }
            assert_eq!(snapshot(&existing), before, "{all:?}");
        }
    }
    let mut files_after = listing(tmp.path());
    files_after.retain(|n| !["bad-api", "builder.toml", "missing.toml"].contains(&n.as_str()));
    assert_eq!(
        files_after, files_before,
        "nothing new beside the destinations"
    );
}

#[test]
fn packages_and_builders_go_to_and_come_from_a_registry() {
    use registry_support::{RegistryConfig, TestRegistry};
    let registry = TestRegistry::start(RegistryConfig::default());
    let host = registry.host();
    let tmp = scratch();
    write_buildpack(&tmp.path().join("dep"), "test/dep", "1.0.0");
    let dep_ref = format!("docker://{host}/lathe/dep:1");
    let (dep, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&tmp.path().join("dep")),
        "--platform",
        "linux/amd64,linux/arm64",
        "--output",
        &dep_ref,
    ]);
    let skopeo_digest = |reference: &str| {
        let raw = tool(
            "skopeo",
            &["inspect", "--raw", "--tls-verify=false", reference],
        );
        format!("sha256:{}", sha256_hex(raw.as_bytes()))
    };
    assert_eq!(skopeo_digest(&dep_ref), digest_of(&dep));

    let meta = tmp.path().join("meta");
    write_composite(&meta, "test/meta", "0.1.0", &[("test/dep", "1.0.0", false)]);
    let package_toml = tmp.path().join("package.toml");
    fs::write(
        &package_toml,
        format!("[[dependencies]]\nuri = \"{dep_ref}\"\n"),
    )
    .unwrap();
    let meta_ref = format!("docker://{host}/lathe/meta:1");
    let (meta_report, _) = lathe_json(&[
        "buildpack",
        "package",
        path_str(&meta),
        "--config",
        path_str(&package_toml),
        "--platform",
        "linux/arm64",
        "--output",
        &meta_ref,
    ]);
    assert_eq!(skopeo_digest(&meta_ref), digest_of(&meta_report));

    let build_ref = format!("docker://{host}/lathe/build:1");
    lathe_json(&[
        "copy",
        &format!("oci:{}:build", fixtures().display()),
        &build_ref,
    ]);
    let builder_toml = tmp.path().join("builder.toml");
    fs::write(
        &builder_toml,
        format!(
            "[[buildpacks]]\nuri = \"{meta_ref}\"\n\n[[order]]\n[[order.group]]\nid = \"test/meta\"\n\n\
             [build]\nimage = \"{build_ref}\"\n\n[[run.images]]\nimage = \"{host}/lathe/run:1\"\n"
        ),
    )
    .unwrap();
    let builder_ref = format!("docker://{host}/lathe/builder:1");
    let (builder, _) = lathe_json(&[
        "builder",
        "create",
        "--config",
        path_str(&builder_toml),
        "--platform",
        "linux/arm64",
        "--output",
        &builder_ref,
    ]);
    assert_eq!(skopeo_digest(&builder_ref), digest_of(&builder));
    assert_eq!(
        builder["buildpacks"],
        serde_json::json!(["test/dep@1.0.0", "test/meta@0.1.0"])
    );
    let raw = tool(
        "skopeo",
        &["inspect", "--config", "--tls-verify=false", &builder_ref],
    );
    let config: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(config["architecture"], "arm64");
    let info = lathe::distribution::read_builder_labels(raw.as_bytes()).unwrap();
    assert_eq!(info.order[0][0].version, "0.1.0");
}
