//! Round trips between transports, checked with tools nobody here wrote: skopeo,
//! oci-image-tool and umoci.

mod common;

use common::*;
use serde_json::Value;

fn platform_child(index: &Value, arch: &str) -> Value {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .cloned()
        .unwrap_or_else(|| panic!("no {arch} child in {index}"))
}

#[test]
fn fixture_images_are_cnb_base_images_for_both_platforms() {
    let fx = fixtures();
    for (image, user) in [("build", "1000:1000"), ("run", "1001:1000")] {
        let report: Value = serde_json::from_str(&lathe_ok(&[
            "inspect",
            "--json",
            &format!("oci:{}:{image}", fx.display()),
        ]))
        .unwrap();
        assert_eq!(
            report["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let images = report["images"].as_array().unwrap();
        let platforms: Vec<&str> = images
            .iter()
            .map(|i| i["platform"].as_str().unwrap())
            .collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
        for img in images {
            let c = &img["config"];
            assert_eq!(c["user"], user, "{image}");
            assert_eq!(c["os"], "linux");
            let labels = &img["cnbLabels"];
            assert_eq!(labels["io.buildpacks.base.distro.name"], "debian");
            assert_eq!(labels["io.buildpacks.base.distro.version"], "12");
            assert_eq!(labels["io.buildpacks.stack.mixins"], serde_json::json!([]));
            assert_eq!(labels["io.buildpacks.base.id"], "io.lathe.testdata");
            assert_eq!(labels["io.buildpacks.stack.id"], "io.lathe.testdata");
        }
        assert_eq!(images[1]["config"]["architecture"], "arm64");
        assert_eq!(images[1]["config"]["variant"], "v8");
        if image == "build" {
            let env = images[0]["config"]["env"].as_array().unwrap();
            assert!(
                env.contains(&Value::from("CNB_USER_ID=1000"))
                    && env.contains(&Value::from("CNB_GROUP_ID=1000"))
            );
        } else {
            assert_eq!(images[0]["cnbLabels"]["io.buildpacks.rebasable"], "true");
        }
    }
    // The run image's base layer is the build image's first layer: one blob.
    let build: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("oci:{}:build", fx.display()),
    ]))
    .unwrap();
    let run: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("oci:{}:run", fx.display()),
    ]))
    .unwrap();
    assert_eq!(
        build["images"][0]["layers"][0]["digest"],
        run["images"][0]["layers"][0]["digest"]
    );
}

#[test]
fn fixtures_are_reproducible() {
    let tmp = scratch();
    let again = tmp.path().join("again");
    make_base_images(&again);
    assert_eq!(
        snapshot(fixtures()),
        snapshot(&again),
        "same debs, same digests"
    );
}

#[test]
fn layouts_lathe_writes_pass_oci_image_tool_and_umoci() {
    let tmp = scratch();
    let dest = tmp.path().join("copy");
    let fx = fixtures();
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", fx.display()),
        &format!("oci:{}:app", dest.display()),
    ]);
    lathe_ok(&[
        "copy",
        "--platform",
        "linux/arm64",
        &format!("oci:{}:build", fx.display()),
        &format!("oci:{}:b", dest.display()),
    ]);
    let out = tool(
        "oci-image-tool",
        &["validate", "--type", "image", dest.to_str().unwrap()],
    );
    assert!(out.contains("Validation succeeded"), "{out}");
    // rc1 skips nested indexes: validate each blob by type as well.
    let index: Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    let blob = |d: &Value| {
        dest.join("blobs/sha256")
            .join(d["digest"].as_str().unwrap().trim_start_matches("sha256:"))
    };
    for entry in index["manifests"].as_array().unwrap() {
        let kind = if entry["mediaType"].as_str().unwrap().contains("index") {
            "imageIndex"
        } else {
            "manifest"
        };
        tool(
            "oci-image-tool",
            &["validate", "--type", kind, blob(entry).to_str().unwrap()],
        );
        if kind == "manifest" {
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(blob(entry)).unwrap()).unwrap();
            tool(
                "oci-image-tool",
                &[
                    "validate",
                    "--type",
                    "config",
                    blob(&manifest["config"]).to_str().unwrap(),
                ],
            );
        }
    }
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names, ["app", "app-linux-amd64", "app-linux-arm64", "b"]);
    for child in ["app-linux-amd64", "app-linux-arm64", "b"] {
        let bundle = tmp.path().join(format!("bundle-{child}"));
        tool(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &format!("{}:{child}", dest.display()),
                bundle.to_str().unwrap(),
            ],
        );
        assert!(bundle.join("rootfs/bin/busybox").is_file());
        assert!(
            std::fs::read_to_string(bundle.join("rootfs/etc/passwd"))
                .unwrap()
                .contains("cnb:x:1000:1000")
        );
    }
    assert!(tmp.path().join("bundle-b/rootfs/bin/bash-static").is_file());
}

#[test]
fn oci_archive_keeps_the_index_digest_and_docker_archive_the_arm64_config_digest() {
    let tmp = scratch();
    let fx = fixtures();
    let (index_digest, index) = skopeo_raw(&format!("oci:{}:run", fx.display()));
    // A relative path, as a user would type it.
    let out = lathe_in(
        tmp.path(),
        &[
            "copy",
            &format!("oci:{}:run", fx.display()),
            "oci-archive:B.tar",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let b = tmp.path().join("B.tar");
    let (archived_digest, _) = skopeo_raw(&format!("oci-archive:{}:latest", b.display()));
    assert_eq!(archived_digest, index_digest);

    let arm = platform_child(&index, "arm64");
    let (arm_digest, arm_manifest) = skopeo_raw(&format!("oci:{}:run-linux-arm64", fx.display()));
    assert_eq!(arm["digest"], arm_digest.as_str());
    let arm_config_digest = arm_manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let c = tmp.path().join("C.tar");
    lathe_ok(&[
        "copy",
        "--platform",
        "linux/arm64",
        &format!("oci-archive:{}", b.display()),
        &format!("docker-archive:{}", c.display()),
    ]);
    let config = tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--config",
            &format!("docker-archive:{}", c.display()),
        ],
    );
    assert_eq!(
        format!("sha256:{}", sha256_hex(config.as_bytes())),
        arm_config_digest
    );
    let info: Value = serde_json::from_str(&tool(
        "skopeo",
        &["inspect", &format!("docker-archive:{}", c.display())],
    ))
    .unwrap();
    assert_eq!(info["Architecture"], "arm64");
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        info["Layers"], config["rootfs"]["diff_ids"],
        "docker-archive layers are the diffIDs"
    );
}

#[test]
fn docker_archive_round_trip_keeps_config_digest_and_diff_ids() {
    let tmp = scratch();
    let fx = fixtures();
    let c = tmp.path().join("c.tar");
    let back = tmp.path().join("back");
    lathe_ok(&[
        "copy",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:build", fx.display()),
        &format!("docker-archive:{}:lathe/build:v1", c.display()),
    ]);
    lathe_ok(&[
        "copy",
        &format!("docker-archive:{}:lathe/build:v1", c.display()),
        &format!("oci:{}:x", back.display()),
    ]);
    let orig: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:build", fx.display()),
    ]))
    .unwrap();
    let round: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("oci:{}:x", back.display()),
    ]))
    .unwrap();
    assert_eq!(
        orig["images"][0]["config"]["digest"],
        round["images"][0]["config"]["digest"]
    );
    assert_eq!(
        orig["images"][0]["config"]["diffIds"],
        round["images"][0]["config"]["diffIds"]
    );
    // Layers come back uncompressed, and the result is a valid layout.
    assert_eq!(
        round["images"][0]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    tool(
        "oci-image-tool",
        &["validate", "--type", "image", back.to_str().unwrap()],
    );
    // By image number, and an unknown tag names what is there.
    lathe_ok(&["inspect", &format!("docker-archive:{}:@0", c.display())]);
    let out = lathe(&[
        "inspect",
        &format!("docker-archive:{}:other:v2", c.display()),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("docker.io/lathe/build:v1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn skopeo_and_lathe_read_each_others_archives() {
    let tmp = scratch();
    let fx = fixtures();
    // skopeo writes, lathe reads.
    let sk_oci = tmp.path().join("sk-oci.tar");
    let sk_docker = tmp.path().join("sk-docker.tar");
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            &format!("oci:{}:run", fx.display()),
            &format!("oci-archive:{}:run", sk_oci.display()),
        ],
    );
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:run-linux-amd64", fx.display()),
            &format!("docker-archive:{}:sk/run:v1", sk_docker.display()),
        ],
    );
    let (index_digest, _) = skopeo_raw(&format!("oci:{}:run", fx.display()));
    let report: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("oci-archive:{}:run", sk_oci.display()),
    ]))
    .unwrap();
    assert_eq!(report["digest"], index_digest.as_str());
    let amd: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        "--platform",
        "linux/amd64",
        &format!("oci:{}:run", fx.display()),
    ]))
    .unwrap();
    let sk: Value = serde_json::from_str(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("docker-archive:{}", sk_docker.display()),
    ]))
    .unwrap();
    assert_eq!(
        sk["images"][0]["config"]["diffIds"],
        amd["images"][0]["config"]["diffIds"]
    );
    // lathe writes, skopeo copies on, lathe reads the result.
    let lathe_out = tmp.path().join("lathe.tar");
    lathe_ok(&[
        "copy",
        &format!("docker-archive:{}", sk_docker.display()),
        &format!("oci-archive:{}:v1", lathe_out.display()),
    ]);
    let relayed = tmp.path().join("relayed");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}:v1", lathe_out.display()),
            &format!("oci:{}:v1", relayed.display()),
        ],
    );
    lathe_ok(&["inspect", &format!("oci:{}:v1", relayed.display())]);
}

#[test]
fn several_platforms_make_a_new_index_and_raw_prints_stored_bytes() {
    let tmp = scratch();
    let fx = fixtures();
    let raw = std::process::Command::new(lathe_bin())
        .args(["inspect", "--raw", &format!("oci:{}:run", fx.display())])
        .output()
        .unwrap()
        .stdout;
    let (digest, _) = skopeo_raw(&format!("oci:{}:run", fx.display()));
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
    // Choosing both platforms gives an index with both; choosing the only one gives its manifest.
    let dest = tmp.path().join("d");
    let json: Value = serde_json::from_str(&lathe_ok(&[
        "copy",
        "--json",
        "--platform",
        "linux/amd64,linux/arm64",
        &format!("oci:{}:run", fx.display()),
        &format!("oci:{}:both", dest.display()),
    ]))
    .unwrap();
    assert_eq!(
        json["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let json: Value = serde_json::from_str(&lathe_ok(&[
        "copy",
        "--json",
        "--platform",
        "linux/arm64/v8",
        &format!("oci:{}:run", fx.display()),
        &format!("oci:{}:arm", dest.display()),
    ]))
    .unwrap();
    assert_eq!(
        json["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // A platform the index lacks is named along with what it has.
    let out = lathe(&[
        "copy",
        "--platform",
        "linux/s390x",
        &format!("oci:{}:run", fx.display()),
        &format!("oci:{}:x", dest.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no linux/s390x image (it has: linux/amd64, linux/arm64)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn writing_an_index_to_a_docker_archive_picks_the_host_platform() {
    let tmp = scratch();
    let fx = fixtures();
    let out = lathe(&[
        "copy",
        &format!("oci:{}:run", fx.display()),
        &format!("docker-archive:{}", tmp.path().join("h.tar").display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host = lathe::platform::Platform::host();
    assert!(
        stderr(&out).contains(&format!("picked the host platform {host}")),
        "{}",
        stderr(&out)
    );
    let info: Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            &format!("docker-archive:{}", tmp.path().join("h.tar").display()),
        ],
    ))
    .unwrap();
    assert_eq!(info["Architecture"], host.arch.as_str());
}

#[test]
fn gc_removes_what_no_ref_reaches() {
    let tmp = scratch();
    let dest = tmp.path().join("l");
    fixture_copy(&dest);
    let before = snapshot(&dest.join("blobs/sha256")).len();
    // Re-point `build` at the run image: the build layers and manifests become garbage.
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", dest.display()),
        &format!("oci:{}:build", dest.display()),
    ]);
    let out = lathe(&["gc", &format!("oci:{}", dest.display())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Removed 7 unreferenced blobs"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot(&dest.join("blobs/sha256")).len(), before - 7);
    tool(
        "oci-image-tool",
        &["validate", "--type", "image", dest.to_str().unwrap()],
    );
    lathe_ok(&[
        "inspect",
        &format!("oci:{}:build-linux-arm64", dest.display()),
    ]);
}

#[test]
fn concurrent_writers_share_a_layout() {
    let tmp = scratch();
    let fx = fixtures();
    // Eight processes write eight refs into one layout that does not exist yet.
    let dest = tmp.path().join("shared");
    let children: Vec<_> = (0..8)
        .map(|i| {
            let image = if i % 2 == 0 { "run" } else { "build" };
            std::process::Command::new(lathe_bin())
                .args([
                    "copy",
                    &format!("oci:{}:{image}", fx.display()),
                    &format!("oci:{}:r{i}", dest.display()),
                ])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for i in 0..8 {
        lathe_ok(&[
            "inspect",
            &format!("oci:{}:r{i}-linux-arm64", dest.display()),
        ]);
    }
    tool(
        "oci-image-tool",
        &["validate", "--type", "image", dest.to_str().unwrap()],
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["shared"],
        "no staging directories left beside the layout"
    );
}

#[test]
fn outputs_are_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = scratch();
    let fx = fixtures();
    let layout = tmp.path().join("l");
    let archive = tmp.path().join("a.tar");
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", fx.display()),
        &format!("oci:{}:x", layout.display()),
    ]);
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", fx.display()),
        &format!("oci-archive:{}", archive.display()),
    ]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&layout), 0o755);
    assert_eq!(mode(&archive), 0o644);
    for (path, _) in snapshot(&layout) {
        let p = layout.join(&path);
        let want = if p.is_dir() { 0o755 } else { 0o644 };
        assert_eq!(mode(&p), want, "{path}");
    }
}
