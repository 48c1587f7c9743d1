//! Multi-platform builds end to end: `lathe build --platform linux/amd64,linux/arm64` of the
//! fixture app with the target-aware fixture buildpacks (testdata/buildpacks/arch-neutral,
//! prebuilt-busybox, wrong-binary) into one index on a registry (through a counting proxy) and
//! in an oci-archive. The buildpacks run on this machine for both targets; `--cross-strategy`
//! decides whether arm64 gets the amd64 build's layers (`reuse`) or its own (`rebuild`), and
//! the export's ELF check stops a program of the wrong machine. Each child is checked with
//! skopeo against its own run image, and both are run (arm64 under the sandbox's qemu).

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

use common::*;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry};
use serde_json::Value;

const APP: &str = "apps/multiarch-app";
const BOTH: &str = "--platform=linux/amd64,linux/arm64";

fn images() -> PathBuf {
    world_readable_lathe_and_fixtures().join("images")
}

impl World {
    /// `lathe build` of the multiarch app with `buildpacks/BUILDPACK` for both platforms, as
    /// an unprivileged user, to `output`.
    fn build_both(&self, buildpack: &str, output: &str, extra: &[&str]) -> Output {
        let mut args = vec![BOTH];
        args.extend(extra);
        self.build_app(Who::Unprivileged, &self.path(APP), buildpack, output, &args)
    }

    /// `lathe run --platform PLATFORM IMAGE` (its default process) as an unprivileged user;
    /// returns stdout.
    fn run_platform(&self, image: &str, platform: &str) -> String {
        tool("chmod", &["-R", "a+rX", &self.arg("out")]);
        let out = run_unprivileged(&["--platform", platform, image]);
        assert_eq!(out.status.code(), Some(0), "{}", report(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn oci(&self, name: &str) -> String {
        format!("oci:{}:{name}", self.path("out").display())
    }
}

/// The `--json` result of a build that must have worked.
fn result(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", report(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(out)))
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// The index's children by architecture: (os, digest).
fn children(index: &Value) -> BTreeMap<String, (String, String)> {
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index:#}"
    );
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                (
                    m["platform"]["os"].as_str().unwrap().to_string(),
                    m["digest"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The child manifest of `arch` in the index at `reference` (`repo@digest` on a registry, the
/// `-linux-ARCH` tag in a layout or an archive).
fn child_manifest(reference: &str, index: &Value, arch: &str) -> Value {
    let digest = &children(index)[arch].1;
    let child = match reference.strip_prefix("docker://") {
        Some(rest) => format!("docker://{}@{digest}", rest.rsplit_once(':').unwrap().0),
        None => format!("{reference}-linux-{arch}"),
    };
    let (found, manifest) = skopeo_raw(&child);
    assert_eq!(&found, digest, "{child}");
    manifest
}

/// Checks the index a build of the arch-neutral app wrote at `reference`: two platforms, each
/// child on its own run image's layers, the buildpack and app layers one blob for both.
fn check_arch_neutral_index(reference: &str, built: &Value) -> String {
    let (digest, index) = skopeo_raw(reference);
    assert_eq!(built["image"]["digest"], digest.as_str());
    let found = children(&index);
    assert_eq!(found.keys().collect::<Vec<_>>(), ["amd64", "arm64"]);
    assert!(found.values().all(|(os, _)| os == "linux"));
    let mut added = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layers = layer_digests(&child_manifest(reference, &index, arch));
        let run =
            layer_digests(&skopeo_raw(&format!("oci:{}:run-linux-{arch}", images().display())).1);
        assert_eq!(layers[..run.len()], run[..], "{arch}: not on its run image");
        added.push(layers[run.len()..].to_vec());
    }
    // Greeter layer, app layer, launcher, launcher config, process types: all but the
    // launcher are the same blob for both platforms.
    assert_eq!(added[0].len(), 5, "{added:#?}");
    for (i, (amd64, arm64)) in added[0].iter().zip(&added[1]).enumerate() {
        if i == 2 {
            assert_ne!(amd64, arm64, "the launcher is each platform's own");
        } else {
            assert_eq!(amd64, arm64, "layer {i} differs between platforms");
        }
    }
    digest
}

#[test]
fn an_arch_neutral_app_becomes_one_index_on_a_registry_and_in_an_archive() {
    let world = World::new();
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let app = format!("docker://{}/lathe/app:1", proxy.host());

    let out = world.build_both("arch-neutral", &app, &[]);
    let built = result(&out);
    assert_eq!(built["cross_strategy"]["strategy"], "reuse", "{built:#}");
    let why = built["cross_strategy"]["why"].as_str().unwrap();
    assert!(why.contains("hold no ELF program"), "{why}");
    let err = stderr(&out);
    assert!(err.contains("Cross-strategy: reuse ("), "{err}");
    // The buildpacks ran once, for the host.
    assert!(
        err.contains("Arch-neutral greeter (target linux/amd64)"),
        "{err}"
    );
    assert!(!err.contains("(target linux/arm64)"), "{err}");
    assert_eq!(
        platform_summaries(&built),
        [
            ("linux/amd64".to_string(), "built".to_string()),
            (
                "linux/arm64".to_string(),
                "reused the linux/amd64 build".to_string()
            )
        ]
    );
    let registry_digest = check_arch_neutral_index(&app, &built);

    // What was sent: children before the index, each blob once (a shared blob is not sent
    // again for the second platform).
    let seen = proxy.seen();
    let mut uploads = BTreeMap::new();
    for request in seen
        .iter()
        .filter(|s| s.method == "PUT" && s.is_blob_upload())
    {
        let digest = request
            .target
            .split("digest=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .replace("%3A", ":");
        *uploads.entry(digest).or_insert(0) += 1;
    }
    assert!(!uploads.is_empty());
    assert!(uploads.values().all(|n| *n == 1), "{uploads:#?}");
    let manifest_puts: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.path().contains("/manifests/"))
        .map(|s| s.path())
        .collect();
    assert_eq!(manifest_puts.len(), 3, "{manifest_puts:#?}");
    assert!(
        manifest_puts[2].ends_with("/manifests/1"),
        "{manifest_puts:#?}"
    );

    // The same build into an archive: the same index, byte for byte.
    let archive = format!("oci-archive:{}:app", world.path("app.tar").display());
    let built = result(&world.build_both("arch-neutral", &archive, &[]));
    assert_eq!(check_arch_neutral_index(&archive, &built), registry_digest);

    // Both run, each on its own machine.
    assert_eq!(
        world.run_platform(&archive, "linux/amd64"),
        "hello from a layer made of scripts (x86_64)\n"
    );
    assert_eq!(
        world.run_platform(&app, "linux/arm64"),
        "hello from a layer made of scripts (aarch64)\n"
    );
}

#[test]
fn rebuild_and_reuse_give_the_documented_results() {
    let world = World::new();
    world.vendor_busybox();

    // Arch-neutral layers: rebuilding for arm64 runs the buildpacks again and gives the very
    // image reuse gives.
    let reused = result(&world.build_both("arch-neutral", &world.oci("reused"), &[]));
    let out = world.build_both(
        "arch-neutral",
        &world.oci("rebuilt"),
        &["--cross-strategy=rebuild"],
    );
    let rebuilt = result(&out);
    let err = stderr(&out);
    for target in ["linux/amd64", "linux/arm64"] {
        assert!(
            err.contains(&format!("Arch-neutral greeter (target {target})")),
            "{err}"
        );
    }
    assert_eq!(rebuilt["cross_strategy"]["strategy"], "rebuild");
    assert_eq!(rebuilt["platforms"][1]["layers_from"], "built");
    assert_eq!(rebuilt["image"]["digest"], reused["image"]["digest"]);

    // A buildpack that declares per-architecture targets: auto rebuilds, and arm64 gets the
    // arm64 busybox.
    let out = world.build_both("prebuilt-busybox", &world.oci("busybox"), &[]);
    let built = result(&out);
    assert_eq!(built["cross_strategy"]["strategy"], "rebuild", "{built:#}");
    let why = built["cross_strategy"]["why"].as_str().unwrap();
    assert_eq!(
        why,
        "buildpack lathe-test/prebuilt-busybox declares per-architecture targets (amd64, arm64)"
    );
    let err = stderr(&out);
    assert!(
        err.contains("Prebuilt busybox for linux/arm64 (bin/build runs on x86_64)"),
        "{err}"
    );
    assert_eq!(
        world.run_platform(&world.oci("busybox"), "linux/arm64"),
        "aarch64\n"
    );
    assert_eq!(
        world.run_platform(&world.oci("busybox"), "linux/amd64"),
        "x86_64\n"
    );

    // Forced to reuse, the amd64 busybox would land in the arm64 image: the export refuses,
    // naming the platform, buildpack, layer and file, and writes nothing.
    let out = world.build_both(
        "prebuilt-busybox",
        &world.oci("forced"),
        &["--cross-strategy=reuse"],
    );
    assert_eq!(out.status.code(), Some(62), "{}", report(&out));
    let err = stderr(&out);
    for part in [
        "linux/arm64",
        "lathe-test/prebuilt-busybox",
        "\"busybox\"",
        "bin/busybox: linux/amd64",
        "--allow-foreign-binaries",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let refs = lathe::layout::Layout::open(world.path("out")).unwrap();
    assert!(refs.resolve(Some("forced")).is_err(), "forced was written");
}

#[test]
fn a_host_program_in_a_launch_layer_fails_for_arm64_unless_allowed() {
    let world = World::new();
    let out = world.build_both("wrong-binary", &world.oci("wrong"), &["--quiet"]);
    assert_eq!(out.status.code(), Some(62), "{}", report(&out));
    let err = stderr(&out);
    // auto saw the program and rebuilt; the arm64 build copied the host's busybox anyway.
    assert!(
        err.contains("copying this machine's x86_64 busybox")
            && err.contains("Wrong binary (target arm64"),
        "{err}"
    );
    for part in [
        "export: linux/arm64: buildpack lathe-test/wrong-binary@0.1.0 layer \"tools\"",
        "bin/busybox: linux/amd64 (ELF machine 62, 64-bit)",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    assert!(!world.path("out").join("index.json").exists());

    let out = world.build_both(
        "wrong-binary",
        &world.oci("wrong"),
        &["--allow-foreign-binaries"],
    );
    let built = result(&out);
    let why = built["cross_strategy"]["why"].as_str().unwrap();
    assert_eq!(
        why,
        "launch layer lathe-test/wrong-binary:tools holds the ELF program bin/busybox"
    );
    let err = stderr(&out);
    assert!(
        err.contains("let through by --allow-foreign-binaries"),
        "{err}"
    );
    let (_, index) = skopeo_raw(&world.oci("wrong"));
    assert_eq!(children(&index).len(), 2);
}

#[test]
fn a_build_image_without_this_machines_platform_needs_emulate() {
    let world = World::new();
    let arm64_only = format!("--build-image=oci:{}:build-linux-arm64", images().display());
    let args = ["--platform=linux/arm64", arm64_only.as_str()];
    let out = world.build_app(
        Who::Unprivileged,
        &world.path(APP),
        "arch-neutral",
        &world.oci("app"),
        &args,
    );
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the image is linux/arm64, not linux/amd64; lathe runs the buildpacks")
            && err.contains("--emulate to build linux/arm64"),
        "{err}"
    );
    assert!(!world.path("out").join("index.json").exists());

    let mut args = args.to_vec();
    args.push("--emulate");
    let out = world.build_app(
        Who::Unprivileged,
        &world.path(APP),
        "arch-neutral",
        &world.oci("app"),
        &args,
    );
    let built = result(&out);
    assert_eq!(built["platforms"][0]["built_on"], "linux/arm64");
    assert_eq!(built["image"]["platform"], "linux/arm64");
}

#[test]
fn each_platform_keeps_its_own_cache() {
    let world = World::new();
    let cache = world.path("cache");
    let cache_arg = format!("--cache-dir={}", cache.display());
    let build = || {
        let out = world.build_app(
            Who::Unprivileged,
            &world.path("apps/deps-app"),
            "cached-deps",
            &world.oci("deps"),
            &[BOTH, "--cross-strategy=rebuild", &cache_arg],
        );
        result(&out)
    };
    let first = build();
    for (i, platform) in ["linux-amd64", "linux-arm64"].iter().enumerate() {
        let metadata = cache
            .join(platform)
            .join("committed/io.buildpacks.lifecycle.cache.metadata");
        assert!(metadata.is_file(), "{}", metadata.display());
        let saved = &first["platforms"][i]["cache"];
        assert_eq!(saved["location"], cache.join(platform).to_str().unwrap());
        assert_eq!(saved["reused"], 0, "{saved}");
    }
    assert!(
        first["cache"].is_null(),
        "one cache per platform: {first:#}"
    );
    let second = build();
    for i in 0..2 {
        let saved = &second["platforms"][i]["cache"];
        assert!(saved["reused"].as_u64().unwrap() > 0, "{saved}");
    }

    // An archive holds one image: it can't keep a cache per platform.
    let archive = format!(
        "--cache-image=oci-archive:{}",
        world.path("cache.tar").display()
    );
    let out = world.build_both("arch-neutral", &world.oci("x"), &[&archive]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(
        stderr(&out).contains("one cache image per platform"),
        "{}",
        report(&out)
    );
}

/// A `--buildpack DIR` laid out per target (`DIR/linux/amd64`, `DIR/linux/arm64`, as pack
/// packages multi-target buildpacks): the folder of the machine the buildpacks run on is the
/// one that runs, for every target; with `--emulate` the target's own.
#[test]
fn a_multi_target_buildpack_runs_from_the_folder_of_the_machine_it_runs_on() {
    let world = World::new();
    let dir = world.path("buildpacks/per-target");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("buildpack.toml"),
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/per-target\"\nversion = \"1.0.0\"\n\
         [[targets]]\nos = \"linux\"\narch = \"amd64\"\n[[targets]]\nos = \"linux\"\narch = \"arm64\"\n",
    )
    .unwrap();
    for arch in ["amd64", "arm64"] {
        let bin = dir.join("linux").join(arch).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("detect"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(
            bin.join("build"),
            format!(
                "#!/bin/sh\necho \"folder {arch} on $(uname -m) for $CNB_TARGET_ARCH\"\n\
                 test -f \"$CNB_BUILDPACK_DIR/buildpack.toml\" || exit 9\n"
            ),
        )
        .unwrap();
        for program in ["detect", "build"] {
            tool("chmod", &["755", bin.join(program).to_str().unwrap()]);
        }
    }
    tool("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
    let out = world.build_both("per-target", &world.oci("app"), &[]);
    let built = result(&out);
    assert_eq!(built["cross_strategy"]["strategy"], "rebuild");
    let err = stderr(&out);
    for line in [
        "folder amd64 on x86_64 for amd64",
        "folder amd64 on x86_64 for arm64",
    ] {
        assert!(err.contains(line), "{line}: {err}");
    }
    let out = world.build_both("per-target", &world.oci("emulated"), &["--emulate"]);
    result(&out);
    let err = stderr(&out);
    assert!(err.contains("folder arm64 on aarch64 for arm64"), "{err}");

    // Several platforms can't go into a docker-archive: refused before anything runs.
    let archive = format!("docker-archive:{}", world.path("app.tar").display());
    let out = world.build_both("per-target", &archive, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(stderr(&out).contains("a docker-archive holds one platform"));
    assert!(!world.path("app.tar").exists());

    // A platform the run image lacks is named before any buildpack runs.
    let out = world.build_app(
        Who::Unprivileged,
        &world.path(APP),
        "per-target",
        &world.oci("s390x"),
        &["--platform=linux/amd64,linux/s390x"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    let err = stderr(&out);
    assert!(err.contains("the index has no linux/s390x image"), "{err}");
    assert!(!err.contains("folder amd64"), "a build ran first: {err}");
}
