//! Air-gapped builds. A two-platform builder made by `lathe builder create`, whose run image
//! is named by its registry reference, and that run image are pushed to the test registry;
//! `lathe bundle` gathers both into one oci-archive, each under its fully qualified reference.
//! With the registry stopped, `lathe --offline build --builder oci-archive:FILE:<builder ref>`
//! run inside a network namespace with no interfaces (`unshare --user --map-root-user --net`)
//! builds the app for linux/amd64 and linux/arm64 from the bundle alone — the very image an
//! online build from the registry gives — and both platforms run there. A bundle without the
//! run image, a registry builder and a registry output are refused under `--offline`, naming
//! the reference, with no request reaching the registry (a counting proxy stands before it).

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry};
use serde_json::Value;

const APP: &str = "apps/multiarch-app";
const BOTH: &str = "linux/amd64,linux/arm64";

/// A world-readable lathe run by an unprivileged user inside new user and network namespaces:
/// root of a rootless container whose network namespace has no interface but a loopback that
/// is down.
fn no_network(args: &[&str]) -> Output {
    let exe = world_readable_lathe_and_fixtures().join("lathe");
    let mut command = if is_root() {
        let mut c = setpriv_nobody();
        c.arg("unshare");
        c
    } else {
        Command::new("unshare")
    };
    command
        .args(["--user", "--map-root-user", "--net"])
        .arg(exe)
        .args(args)
        .output()
        .expect("run lathe in a network namespace")
}

/// The `--json` result of a command that must have worked.
fn json_result(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", report(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(out)))
}

/// The builder.toml of a two-platform builder with the arch-neutral buildpack, the fixture
/// build image and `run_image` as its run image.
fn builder_toml(world: &World, run_image: &str) -> String {
    let images = world_readable_lathe_and_fixtures().join("images");
    let path = world.path("builder.toml");
    std::fs::write(
        &path,
        format!(
            "[[buildpacks]]\nuri = \"buildpacks/arch-neutral\"\n\n\
             [[order]]\n[[order.group]]\nid = \"lathe-test/arch-neutral\"\n\n\
             [build]\nimage = \"oci:{}:build\"\n\n[[run.images]]\nimage = \"{run_image}\"\n",
            images.display()
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// The blob digests an oci-archive holds (`blobs/sha256/HEX` members).
fn archive_blobs(file: &Path) -> BTreeSet<String> {
    tool("tar", &["-tf", file.to_str().unwrap()])
        .lines()
        .filter_map(|l| l.trim_start_matches("./").strip_prefix("blobs/sha256/"))
        .filter(|hex| !hex.is_empty())
        .map(|hex| format!("sha256:{hex}"))
        .collect()
}

/// The digests of the config and layers of the fixture run image for `arch`.
fn run_image_blobs(arch: &str) -> Vec<String> {
    let images = world_readable_lathe_and_fixtures().join("images");
    let (_, manifest) = skopeo_raw(&format!("oci:{}:run-linux-{arch}", images.display()));
    std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_bundle_builds_both_platforms_with_no_network() {
    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let run = format!("{}/lathe/run:1", proxy.host());
    let builder = format!("{}/lathe/builder:1", proxy.host());
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", images.display()),
        &format!("docker://{run}"),
    ]);
    let config = builder_toml(&world, &run);
    lathe_ok(&[
        "builder",
        "create",
        "--config",
        &config,
        "--platform",
        BOTH,
        "--output",
        &format!("docker://{builder}"),
    ]);
    let raw = tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{builder}"),
        ],
    );
    let builder_digest = format!("sha256:{}", sha256_hex(raw.as_bytes()));
    let (run_digest, _) = skopeo_raw(&format!("oci:{}:run", images.display()));

    // The bundle: the builder and the run image its label names, both whole (their digests
    // kept), each under its registry name.
    let bundle = world.path("bundle.tar");
    let out = lathe(&[
        "bundle",
        "--builder",
        &format!("docker://{builder}"),
        "--platform",
        BOTH,
        "--output",
        &format!("oci-archive:{}", bundle.display()),
        "--json",
    ]);
    let bundled = json_result(&out);
    let entries: Vec<(&str, &str, &str)> = bundled["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(
                i["platforms"],
                serde_json::json!(["linux/amd64", "linux/arm64"])
            );
            assert!(i["bytes"].as_u64().unwrap() > 0, "{i}");
            (
                i["name"].as_str().unwrap(),
                i["role"].as_str().unwrap(),
                i["digest"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (builder.as_str(), "builder", builder_digest.as_str()),
            (run.as_str(), "run image", run_digest.as_str()),
        ]
    );
    // skopeo reads each image from the archive by that name.
    for (name, digest) in [(&builder, &builder_digest), (&run, &run_digest)] {
        let (found, _) = skopeo_raw(&format!("oci-archive:{}:{name}", bundle.display()));
        assert_eq!(&found, digest, "{name}");
    }

    // The same into an OCI layout, with no --platform: every platform of the builder.
    let bundle_dir = world.path("bundle-dir");
    let out = lathe(&[
        "bundle",
        "--builder",
        &format!("docker://{builder}"),
        "--output",
        &format!("oci:{}", bundle_dir.display()),
        "--json",
    ]);
    let in_layout = json_result(&out);
    assert_eq!(in_layout["images"], bundled["images"]);
    let layout = lathe::layout::Layout::open(&bundle_dir).unwrap();
    for (name, digest) in [(&builder, &builder_digest), (&run, &run_digest)] {
        assert_eq!(
            layout.resolve(Some(name)).unwrap().digest().to_string(),
            *digest
        );
    }

    // One platform only: none of the other's blobs go in.
    let arm64_bundle = world.path("arm64.tar");
    let out = lathe(&[
        "bundle",
        "--builder",
        &format!("docker://{builder}"),
        "--platform",
        "linux/arm64",
        "--output",
        &format!("oci-archive:{}", arm64_bundle.display()),
        "--json",
    ]);
    let arm64 = json_result(&out);
    for image in arm64["images"].as_array().unwrap() {
        assert_eq!(image["platforms"], serde_json::json!(["linux/arm64"]));
    }
    let blobs = archive_blobs(&arm64_bundle);
    for digest in run_image_blobs("arm64") {
        assert!(blobs.contains(&digest), "arm64 blob {digest} missing");
    }
    for digest in run_image_blobs("amd64") {
        assert!(
            !blobs.contains(&digest),
            "amd64 blob {digest} in an arm64 bundle"
        );
    }

    // The image an online build from the registry makes, to compare with.
    tool("chmod", &["-R", "a+rX", world.dir.path().to_str().unwrap()]);
    let exe = world_readable_lathe_and_fixtures().join("lathe");
    let store = world.arg("store");
    let online = command_as(Who::Unprivileged, &exe)
        .args(["build", &world.arg(APP), "--builder"])
        .arg(format!("docker://{builder}"))
        .args(["--platform", BOTH, "--json", "--store", &store])
        .arg(format!(
            "--output=oci:{}:online",
            world.path("out").display()
        ))
        .output()
        .unwrap();
    let online = json_result(&online);

    // Refused under --offline before any request: a registry builder, a bundle without the
    // run image, a registry output (bad arguments, exit 3).
    let builder_only = world.path("builder-only.tar");
    lathe_ok(&[
        "copy",
        &format!("docker://{builder}"),
        &format!("oci-archive:{}:{builder}", builder_only.display()),
    ]);
    tool("chmod", &["a+r", builder_only.to_str().unwrap()]);
    proxy.clear();
    let refused_output = world.path("out/refused.tar");
    let offline_build = |builder_ref: &str, output: &str| {
        command_as(Who::Unprivileged, &exe)
            .args([
                "--offline",
                "build",
                &world.arg(APP),
                "--builder",
                builder_ref,
            ])
            .args(["--platform", BOTH, "--store", &store, "--output", output])
            .output()
            .unwrap()
    };
    let refused_to = format!("oci-archive:{}", refused_output.display());
    let out = offline_build(&format!("docker://{builder}"), &refused_to);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    assert!(
        stderr(&out).contains(&format!("docker://{builder}: lathe is --offline")),
        "{}",
        report(&out)
    );
    let out = offline_build(
        &format!("oci-archive:{}:{builder}", builder_only.display()),
        &refused_to,
    );
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    let expected = format!(
        "docker://{run}: oci-archive:{} holds no image named \"{run}\", and lathe is --offline",
        builder_only.display()
    );
    assert!(stderr(&out).contains(&expected), "{}", report(&out));
    let out = offline_build(
        &format!("oci-archive:{}:{builder}", bundle.display()),
        &format!("docker://{}/lathe/app:1", proxy.host()),
    );
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(
        stderr(&out).contains("--output docker://"),
        "{}",
        report(&out)
    );
    assert!(!refused_output.exists(), "a refused build wrote its output");
    let seen = proxy.seen();
    assert!(seen.is_empty(), "--offline reached the registry: {seen:#?}");

    // No registry at all, and no network: the bundle alone builds both platforms.
    drop(proxy);
    drop(registry);
    let interfaces = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "cat", "/proc/net/dev"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&interfaces.stdout).into_owned();
    let names: Vec<&str> = listed
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"], "{listed}");
    tool("chmod", &["-R", "a+rX", world.dir.path().to_str().unwrap()]);
    let app_tar = world.path("out/app.tar");
    let offline_store = world.path("out/offline-store");
    std::fs::create_dir(&offline_store).unwrap();
    tool("chmod", &["777", offline_store.to_str().unwrap()]);
    let out = no_network(&[
        "--offline",
        "build",
        &world.arg(APP),
        "--builder",
        &format!("oci-archive:{}:{builder}", bundle.display()),
        "--platform",
        BOTH,
        "--output",
        &format!("oci-archive:{}", app_tar.display()),
        "--store",
        offline_store.to_str().unwrap(),
        "--json",
    ]);
    let built = json_result(&out);
    assert_eq!(
        built["image"]["digest"], online["image"]["digest"],
        "the bundle gives the very image the registry does"
    );
    let platforms: Vec<&str> = built["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    // From the layout bundle too.
    let out = no_network(&[
        "--offline",
        "build",
        &world.arg(APP),
        "--builder",
        &format!("oci:{}:{builder}", bundle_dir.display()),
        "--platform",
        "linux/arm64",
        "--output",
        &format!("oci:{}:arm64", world.path("out").display()),
        "--store",
        offline_store.to_str().unwrap(),
        "--json",
    ]);
    let arm64_built = json_result(&out);
    assert_eq!(arm64_built["image"]["platform"], "linux/arm64");
    assert_eq!(
        arm64_built["image"]["digest"],
        built["platforms"][1]["digest"]
    );
    for (platform, machine) in [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64")] {
        let out = no_network(&[
            "--offline",
            "run",
            "--quiet",
            "--platform",
            platform,
            "--store",
            offline_store.to_str().unwrap(),
            &format!("oci-archive:{}", app_tar.display()),
        ]);
        assert_eq!(out.status.code(), Some(0), "{platform}: {}", report(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("hello from a layer made of scripts ({machine})\n")
        );
    }
}

/// The names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A bundle that can't be made whole is not made at all: bad destinations are refused (exit
/// 3), a run image without a platform asked for is refused before anything is written, and
/// a blob that fails its digest midway leaves neither the bundle nor a temporary file.
#[test]
fn a_bundle_is_written_whole_or_not_at_all() {
    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let config = builder_toml(&world, &format!("oci:{}:run", images.display()));
    let builder = format!("oci:{}:builder", world.path("builder").display());
    lathe_ok(&[
        "builder",
        "create",
        "--config",
        &config,
        "--platform",
        BOTH,
        "--output",
        &builder,
    ]);
    let out_dir = world.path("out");
    let bundle = |extra: &[&str]| {
        let mut args = vec!["bundle", "--builder", builder.as_str()];
        args.extend(extra);
        lathe(&args)
    };

    for output in [
        format!("oci-archive:{}:named", out_dir.join("b.tar").display()),
        format!("oci:{}:named", out_dir.join("b").display()),
        "docker://127.0.0.1:1/lathe/bundle:1".to_string(),
        format!("docker-archive:{}", out_dir.join("b.tar").display()),
    ] {
        let out = bundle(&["--output", &output]);
        assert_eq!(out.status.code(), Some(3), "{output}: {}", report(&out));
        assert!(
            stderr(&out).contains(&format!("--output {output}: a bundle is an OCI archive")),
            "{}",
            report(&out)
        );
    }

    let archive = format!("oci-archive:{}", out_dir.join("b.tar").display());
    let out = bundle(&[
        "--platform",
        "linux/amd64,linux/s390x",
        "--output",
        &archive,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    let expected = format!(
        "oci:{}:run: the index has no linux/s390x image (it has: linux/amd64, linux/arm64)",
        images.display()
    );
    assert!(stderr(&out).contains(&expected), "{}", report(&out));

    // A run image whose layer is damaged on disk: found while copying, after the builder's
    // blobs went into the temporary file.
    let damaged_dir = world.path("damaged");
    let (damaged, layers) = image_with_layer_blobs(&damaged_dir, &[b"x".repeat(4096)], true);
    let blob = damaged_dir
        .join("blobs/sha256")
        .join(layers[0].trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = bundle(&["--run-image", &damaged, "--output", &archive]);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    assert!(stderr(&out).contains(&layers[0]), "{}", report(&out));
    let layout_bundle = format!("oci:{}", out_dir.join("layout").display());
    let out = bundle(&["--run-image", &damaged, "--output", &layout_bundle]);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    assert_eq!(listing(&out_dir), Vec::<String>::new(), "leftovers");

    // Named as the builder's run image is, or as another image is: one entry, or refused.
    let out = bundle(&[
        "--run-image",
        &format!("oci:{}:run", images.display()),
        "--output",
        &archive,
        "--json",
    ]);
    let bundled = json_result(&out);
    let names: Vec<&str> = bundled["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["builder", "run"]);
    let other_run = world.path("other");
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", images.display()),
        &format!("oci:{}:run", other_run.display()),
    ]);
    let before = std::fs::read(out_dir.join("b.tar")).unwrap();
    let out = bundle(&[
        "--run-image",
        &format!("oci:{}:run", other_run.display()),
        "--output",
        &archive,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(
        stderr(&out).contains("would both be named \"run\""),
        "{}",
        report(&out)
    );
    assert_eq!(std::fs::read(out_dir.join("b.tar")).unwrap(), before);
    assert_eq!(listing(&out_dir), ["b.tar"]);
}
