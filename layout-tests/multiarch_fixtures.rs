//! The target-aware fixture buildpacks of issue 9 (testdata/buildpacks/arch-neutral,
//! prebuilt-busybox and wrong-binary, on testdata/apps/multiarch-app) built with today's
//! `lathe build`, one platform per build, and what `lathe::elfcheck` says of the layers they
//! write: read from the exported image's layer tar and from the image unpacked to disk.
//!
//! - For linux/amd64 (the host) each builds and runs; the arch-neutral layer holds no ELF
//!   program, the prebuilt busybox is amd64, and the wrong binary is amd64: flagged, by its
//!   path in the layer, when checked for linux/arm64.
//! - For linux/arm64 (the buildpacks run on the host, with CNB_TARGET_* naming arm64)
//!   prebuilt-busybox installs the aarch64 busybox of CNB_TARGET_ARCH and the image prints
//!   aarch64; the arch-neutral layer is the same blob as the amd64 build's. With `--emulate`
//!   the buildpacks run in the emulated arm64 build image instead.
//!
//! layout-tests/multiarch.rs builds them for both platforms into one index.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use lathe::elfcheck::{self, EM_AARCH64, EM_X86_64, ElfCheckError};
use lathe::layout::Layout;
use lathe::platform::Platform;
use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde_json::Value;

const APP: &str = "apps/multiarch-app";

impl World {
    /// `lathe build` of the multiarch app with one buildpack for `platform`, as an
    /// unprivileged user, into `oci:OUT:REF`.
    fn build(&self, buildpack: &str, platform: &str, reference: &str) -> Output {
        self.build_with(buildpack, reference, &[&format!("--platform={platform}")])
    }

    fn build_with(&self, buildpack: &str, reference: &str, extra: &[&str]) -> Output {
        self.build_app(
            Who::Unprivileged,
            &self.path(APP),
            buildpack,
            &format!("oci:{}:{reference}", self.path("out").display()),
            extra,
        )
    }

    /// Builds and requires success; returns the build's `--json` result and its stderr.
    fn built(&self, buildpack: &str, platform: &str, reference: &str) -> (Value, String) {
        self.built_with(buildpack, reference, &[&format!("--platform={platform}")])
    }

    fn built_with(&self, buildpack: &str, reference: &str, extra: &[&str]) -> (Value, String) {
        let out = self.build_with(buildpack, reference, extra);
        assert_eq!(out.status.code(), Some(0), "{}", report(&out));
        let result =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(&out)));
        (result, stderr(&out))
    }

    /// The uncompressed tar of the layer of image `reference` whose history entry starts
    /// with `created_by` (e.g. "Layer: 'busybox'"), and its diffID.
    fn layer_tar(&self, reference: &str, created_by: &str) -> (Vec<u8>, String) {
        let layout = Layout::open(self.path("out")).unwrap();
        let desc = layout.resolve(Some(reference)).unwrap();
        let manifest: ImageManifest =
            serde_json::from_slice(&layout.read_blob(&desc).unwrap()).unwrap();
        let config: ImageConfiguration =
            serde_json::from_slice(&layout.read_blob(manifest.config()).unwrap()).unwrap();
        let layered: Vec<_> = config
            .history()
            .iter()
            .flatten()
            .filter(|h| !h.empty_layer().unwrap_or(false))
            .collect();
        assert_eq!(layered.len(), manifest.layers().len());
        let n = layered
            .iter()
            .position(|h| {
                h.created_by()
                    .as_deref()
                    .is_some_and(|c| c.starts_with(created_by))
            })
            .unwrap_or_else(|| panic!("{reference}: no layer created by {created_by:?}"));
        let layer = &manifest.layers()[n];
        let compression = lathe::content::layer_compression(layer.media_type())
            .unwrap_or_else(|| panic!("{:?} is not a layer", layer.media_type()));
        let mut tar = Vec::new();
        std::io::copy(
            &mut lathe::layer::decompress(layout.open_blob(layer).unwrap(), compression).unwrap(),
            &mut tar,
        )
        .unwrap();
        let diff_id = config.rootfs().diff_ids()[n].clone();
        assert_eq!(format!("sha256:{}", sha256_hex(&tar)), diff_id);
        (tar, diff_id)
    }

    /// `lathe unpack` of image `reference` into a new directory; returns its path.
    fn unpack(&self, reference: &str, platform: &str) -> PathBuf {
        let dir = self.path(&format!("unpacked-{reference}"));
        lathe_ok(&[
            "unpack",
            "--platform",
            platform,
            &format!("oci:{}:{reference}", self.path("out").display()),
            dir.to_str().unwrap(),
        ]);
        dir
    }

    /// `lathe run IMAGE` (its default process) as an unprivileged user; returns stdout.
    fn run(&self, reference: &str) -> String {
        tool("chmod", &["-R", "a+rX", &self.arg("out")]);
        let image = format!("oci:{}:{reference}", self.path("out").display());
        let out = run_unprivileged(&[&image]);
        assert_eq!(out.status.code(), Some(0), "{}", report(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}

fn platform(text: &str) -> Platform {
    text.parse().unwrap()
}

fn foreign_paths(report: &elfcheck::ElfReport) -> Vec<String> {
    report
        .foreign
        .iter()
        .map(|f| f.path.display().to_string())
        .collect()
}

fn host_is_amd64() {
    assert_eq!(
        Platform::host(),
        platform("linux/amd64"),
        "these tests build for linux/amd64 as the host platform and emulate linux/arm64"
    );
}

fn group_and_layers(result: &Value) -> (Vec<String>, Vec<String>) {
    let ids = result["group"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let layers = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["launch"], true, "{l}");
            format!(
                "{}:{}",
                l["buildpack"].as_str().unwrap(),
                l["name"].as_str().unwrap()
            )
        })
        .collect();
    (ids, layers)
}

#[test]
fn the_arch_neutral_buildpack_writes_no_elf_and_the_same_layer_for_both_platforms() {
    host_is_amd64();
    let world = World::new();
    let (result, err) = world.built("arch-neutral", "linux/amd64", "neutral-amd64");
    assert_eq!(
        group_and_layers(&result),
        (
            vec!["lathe-test/arch-neutral".to_string()],
            vec!["lathe-test/arch-neutral:greeter".to_string()]
        )
    );
    assert!(
        err.contains("Arch-neutral greeter (target linux/amd64)"),
        "{err}"
    );
    let (greeter, amd64_diff_id) = world.layer_tar("neutral-amd64", "Layer: 'greeter'");
    let (app, _) = world.layer_tar("neutral-amd64", "Application Layer");
    for (what, tar) in [("greeter", &greeter), ("app", &app)] {
        assert_eq!(elfcheck::find_elf_in_tar(&tar[..]).unwrap(), None, "{what}");
        for target in ["linux/amd64", "linux/arm64"] {
            let report = elfcheck::check_tar(&tar[..], &platform(target)).unwrap();
            assert!(report.files > 0, "{what}: no files");
            assert_eq!((report.programs, report.foreign.len()), (0, 0), "{what}");
        }
    }
    // The image itself has ELF programs (the launcher): the check sees them.
    let (launcher, _) = world.layer_tar("neutral-amd64", "Buildpacks Application Launcher");
    assert_eq!(
        elfcheck::find_elf_in_tar(&launcher[..]).unwrap(),
        Some(PathBuf::from("cnb/lifecycle/launcher"))
    );
    let root = world.unpack("neutral-amd64", "linux/amd64");
    let layer_dir = root.join("layers/lathe-test_arch-neutral/greeter");
    assert!(layer_dir.join("bin/greet").is_file());
    assert_eq!(elfcheck::find_elf(&layer_dir).unwrap(), None);
    assert_eq!(
        world.run("neutral-amd64"),
        "hello from a layer made of scripts (x86_64)\n"
    );

    // Built for arm64 its layer is the same bytes: one blob for both.
    let (_, err) = world.built("arch-neutral", "linux/arm64", "neutral-arm64");
    assert!(
        err.contains("Arch-neutral greeter (target linux/arm64)"),
        "{err}"
    );
    let (_, arm64_diff_id) = world.layer_tar("neutral-arm64", "Layer: 'greeter'");
    assert_eq!(arm64_diff_id, amd64_diff_id);
}

#[test]
fn prebuilt_busybox_installs_the_busybox_of_the_target_arch() {
    host_is_amd64();
    let world = World::new();
    world.vendor_busybox();
    let busybox = "layers/lathe-test_prebuilt-busybox/busybox/bin/busybox";
    for (target, other, machine, uname) in [
        ("linux/amd64", "linux/arm64", EM_X86_64, "x86_64"),
        ("linux/arm64", "linux/amd64", EM_AARCH64, "aarch64"),
    ] {
        let reference = format!("busybox-{}", platform(target).ref_suffix());
        let (result, err) = world.built("prebuilt-busybox", target, &reference);
        assert_eq!(
            group_and_layers(&result),
            (
                vec!["lathe-test/prebuilt-busybox".to_string()],
                vec!["lathe-test/prebuilt-busybox:busybox".to_string()]
            ),
            "{target}"
        );
        assert!(
            err.contains(&format!("Prebuilt busybox for {target}")),
            "{target}: {err}"
        );
        assert!(err.contains("installed busybox-static_"), "{target}: {err}");

        // The exported layer tar: one program, for the target's machine.
        let (tar, _) = world.layer_tar(&reference, "Layer: 'busybox'");
        let report = elfcheck::check_tar(&tar[..], &platform(target)).unwrap();
        assert_eq!((report.programs, report.foreign.len()), (1, 0), "{target}");
        let wrong = elfcheck::check_tar(&tar[..], &platform(other)).unwrap();
        assert_eq!(foreign_paths(&wrong), [busybox], "{target}");
        assert_eq!(wrong.foreign[0].header.machine.machine, machine, "{target}");
        assert_eq!(
            elfcheck::find_elf_in_tar(&tar[..]).unwrap(),
            Some(PathBuf::from(busybox))
        );

        // The same layer on disk, unpacked from the image.
        let root = world.unpack(&reference, target);
        let layer_dir = root.join("layers/lathe-test_prebuilt-busybox/busybox");
        let on_disk = elfcheck::check_tree(&layer_dir, &platform(target)).unwrap();
        assert_eq!(
            (on_disk.programs, on_disk.foreign.len()),
            (1, 0),
            "{target}"
        );
        let on_disk = elfcheck::check_tree(&layer_dir, &platform(other)).unwrap();
        assert_eq!(foreign_paths(&on_disk), ["bin/busybox"], "{target}");

        // And it runs: `busybox uname -m` (arm64 emulated).
        assert_eq!(world.run(&reference), format!("{uname}\n"), "{target}");
    }
}

#[test]
fn prebuilt_busybox_fails_clearly_without_its_vendored_debs() {
    let world = World::new();
    // Gone also when the clone's copy was vendored.
    let _ = std::fs::remove_dir_all(world.path("buildpacks/prebuilt-busybox/vendor"));
    let out = world.build("prebuilt-busybox", "linux/amd64", "no-vendor");
    assert_eq!(out.status.code(), Some(51), "{}", report(&out));
    assert!(
        stderr(&out).contains("is missing: run vendor.sh"),
        "{}",
        report(&out)
    );
}

#[test]
fn the_wrong_binary_is_flagged_for_arm64_by_its_path_in_the_layer() {
    host_is_amd64();
    let world = World::new();
    let (result, err) = world.built("wrong-binary", "linux/amd64", "wrong");
    assert_eq!(
        group_and_layers(&result),
        (
            vec!["lathe-test/wrong-binary".to_string()],
            vec!["lathe-test/wrong-binary:tools".to_string()]
        )
    );
    assert!(
        err.contains("copying this machine's x86_64 busybox"),
        "{err}"
    );
    let (tar, _) = world.layer_tar("wrong", "Layer: 'tools'");
    // Right for the machine it was built on.
    let amd64 = elfcheck::check_tar(&tar[..], &platform("linux/amd64")).unwrap();
    assert_eq!((amd64.programs, amd64.foreign.len()), (1, 0));
    // Wrong for arm64: the one program is named, its script neighbour is not.
    let arm64 = elfcheck::check_tar(&tar[..], &platform("linux/arm64")).unwrap();
    let path = "layers/lathe-test_wrong-binary/tools/bin/busybox";
    assert_eq!(foreign_paths(&arm64), [path]);
    assert_eq!(arm64.files, 2, "bin/busybox and bin/machine");
    let err = arm64
        .require_target("layer lathe-test/wrong-binary:tools")
        .unwrap_err();
    assert!(matches!(err, ElfCheckError::Foreign { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "layer lathe-test/wrong-binary:tools holds 1 program for another machine than \
             linux/arm64 (ELF machine 183, 64-bit):\n  {path}: linux/amd64 (ELF machine 62, \
             64-bit)"
        )
    );

    // On disk: the layer directory as the image unpacks it, paths relative to the layer.
    let root = world.unpack("wrong", "linux/amd64");
    let layer_dir = root.join("layers/lathe-test_wrong-binary/tools");
    let on_disk = elfcheck::check_tree(&layer_dir, &platform("linux/arm64")).unwrap();
    assert_eq!(foreign_paths(&on_disk), ["bin/busybox"]);
    assert_eq!(on_disk.foreign[0].header.machine.to_string(), "linux/amd64");
    assert_eq!(world.run("wrong"), "x86_64\n");
}

/// With `--emulate` a linux/arm64 build runs its buildpacks in the emulated arm64 build image,
/// so the "machine bin/build runs on" is the target and wrong-binary's copy happens to be
/// right; without it the buildpacks run on the host and the copy is caught (multiarch.rs).
#[test]
fn under_emulation_the_wrong_binary_copies_the_emulated_machines_busybox() {
    host_is_amd64();
    let world = World::new();
    let (_, err) = world.built_with(
        "wrong-binary",
        "wrong-arm64",
        &["--platform=linux/arm64", "--emulate"],
    );
    assert!(
        err.contains("copying this machine's aarch64 busybox"),
        "{err}"
    );
    let (tar, _) = world.layer_tar("wrong-arm64", "Layer: 'tools'");
    let arm64 = elfcheck::check_tar(&tar[..], &platform("linux/arm64")).unwrap();
    assert_eq!((arm64.programs, arm64.foreign.len()), (1, 0));
    let amd64 = elfcheck::check_tar(&tar[..], &platform("linux/amd64")).unwrap();
    assert_eq!(
        foreign_paths(&amd64),
        ["layers/lathe-test_wrong-binary/tools/bin/busybox"]
    );
    assert!(Path::new(&world.arg(APP)).join("tools.txt").is_file());
}
