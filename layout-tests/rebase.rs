//! Rebase end to end: an app image built by `lathe build` moved onto a new run image (the
//! fixture run image plus one layer, with other `io.buildpacks.base.*` labels) on a layout,
//! on a registry through a counting proxy, in archives and as a two-platform index. The
//! rebased image is compared field by field with the original and with a fresh build on the
//! new run image, checked by oci-image-tool and umoci, and run; the lifecycle's checks
//! (rebasable, target, run image name, topLayer) refuse what they should and leave the
//! destination as it was.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use lathe::assembly::Assembly;
use lathe::layer::cnb::Owner;
use lathe::layout::{Layout, Transaction};
use lathe::platform::Platform;
use lathe::progress::Progress;
use lathe::reference::ImageRef;
use oci_spec::image::MediaType;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry, named_digest};
use serde_json::{Value, json};

const LIFECYCLE: &str = "io.buildpacks.lifecycle.metadata";
const VERSION_FILE: &str = "/etc/lathe-run-version";

fn images() -> PathBuf {
    world_readable_lathe_and_fixtures().join("images")
}

/// The fixture run image (an amd64 + arm64 index).
fn fixture_run() -> String {
    format!("oci:{}:run", images().display())
}

impl World {
    /// `lathe build` of `apps/APP` with `buildpacks/BUILDPACK` on the fixture build image and
    /// `run_image`, to `output`.
    fn build(
        &self,
        app: &str,
        buildpack: &str,
        run_image: &str,
        output: &str,
        extra: &[&str],
    ) -> Output {
        let run_image = format!("--run-image={run_image}");
        let mut args = vec![run_image.as_str()];
        args.extend(extra);
        self.build_app(
            Who::TestUser,
            &self.path(&format!("apps/{app}")),
            buildpack,
            output,
            &args,
        )
    }

    /// `oci:WORLD/DIR:NAME`.
    fn oci(&self, dir: &str, name: &str) -> String {
        format!("oci:{}:{name}", self.path(dir).display())
    }
}

/// `lathe rebase ARGS --json`; the parsed outcome when it succeeds.
fn rebase(args: &[&str]) -> (Output, Option<Value>) {
    let mut all = vec!["rebase", "--json"];
    all.extend_from_slice(args);
    let out = lathe(&all);
    let parsed = out.status.success().then(|| {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(&out)))
    });
    (out, parsed)
}

fn rebase_ok(args: &[&str]) -> Value {
    let (out, parsed) = rebase(args);
    parsed.unwrap_or_else(|| panic!("lathe rebase {args:?}: {}", report(&out)))
}

/// A refused rebase: exit 72, and stderr for the caller to check.
fn rebase_refused(args: &[&str]) -> String {
    let (out, _) = rebase(args);
    assert_eq!(out.status.code(), Some(72), "{}", report(&out));
    stderr(&out)
}

fn labels(config: &Value) -> serde_json::Map<String, Value> {
    config["config"]["Labels"].as_object().unwrap().clone()
}

fn lifecycle_label(config: &Value) -> Value {
    serde_json::from_str(config["config"]["Labels"][LIFECYCLE].as_str().unwrap()).unwrap()
}

fn diff_ids(config: &Value) -> Vec<Value> {
    config["rootfs"]["diff_ids"].as_array().unwrap().clone()
}

/// Writes a new run image to `dest`: for each of `platforms`, the fixture run image's child
/// plus one layer holding /etc/lathe-run-version, with `io.buildpacks.base.maintainer`
/// dropped, `io.buildpacks.base.released` and `.description` added, and `more_labels` set.
/// One platform gives a single image, several an index. Returns the root digest.
fn new_run_image(dest: &str, platforms: &[&str], more_labels: &[(&str, &str)]) -> String {
    let source: ImageRef = fixture_run().parse().unwrap();
    let mut assembly = Assembly::new("the new run image", None).unwrap();
    let input = assembly.open_input(&source).unwrap();
    let mut children = Vec::new();
    for platform in platforms {
        let platform: Platform = platform.parse().unwrap();
        let image = lathe::image::read_platform_image(assembly.input(input), &platform).unwrap();
        for layer in &image.layers {
            assembly.take_blob(input, layer);
        }
        let made = assembly
            .write_layer("the extra layer", |w| {
                w.add_dir("/etc", 0o755, Owner::ROOT)?;
                w.add_file(VERSION_FILE, 0o644, Owner::ROOT, b"2\n")
            })
            .unwrap();
        let mut config = image.config.clone();
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(json!(made.diff_id));
        if let Some(history) = config["history"].as_array_mut() {
            history.push(json!({"created": "2024-01-01T00:00:00Z", "created_by": "run image 2"}));
        }
        let labels = config["config"]["Labels"].as_object_mut().unwrap();
        labels.remove("io.buildpacks.base.maintainer");
        labels.insert("io.buildpacks.base.released".into(), json!("2024-01-01"));
        labels.insert(
            "io.buildpacks.base.description".into(),
            json!("run image 2"),
        );
        for (k, v) in more_labels {
            labels.insert(k.to_string(), json!(v));
        }
        let mut layers = image.layers.clone();
        layers.push(made.blob);
        let manifest = assembly.write_image(&config, &layers).unwrap();
        children.push((platform, manifest));
    }
    assembly.set_root(&children).unwrap();
    let dest: ImageRef = dest.parse().unwrap();
    assembly.write_to(&dest, &Progress::Silent).unwrap().digest
}

/// A run image like the fixture's (same layers) with other labels, for builds.
fn relabelled_run_image(dest: &str, more_labels: &[(&str, &str)]) {
    let source: ImageRef = fixture_run().parse().unwrap();
    let mut assembly = Assembly::new("a relabelled run image", None).unwrap();
    let input = assembly.open_input(&source).unwrap();
    let platform: Platform = "linux/amd64".parse().unwrap();
    let image = lathe::image::read_platform_image(assembly.input(input), &platform).unwrap();
    for layer in &image.layers {
        assembly.take_blob(input, layer);
    }
    let mut config = image.config.clone();
    for (k, v) in more_labels {
        config["config"]["Labels"][*k] = json!(v);
    }
    let manifest = assembly.write_image(&config, &image.layers).unwrap();
    assembly.set_root(&[(platform, manifest)]).unwrap();
    assembly
        .write_to(&dest.parse().unwrap(), &Progress::Silent)
        .unwrap();
}

/// Names an index of the images `children` (ref names in the layout `dir`, with their
/// platforms) `name`, with an annotation on the index and on each child.
fn write_index(dir: &Path, name: &str, children: &[(&str, &str)]) -> String {
    let layout = Layout::open(dir).unwrap();
    let mut manifests = Vec::new();
    for (child, platform) in children {
        let desc = layout.resolve(Some(child)).unwrap();
        let platform: Platform = platform.parse().unwrap();
        manifests.push(json!({
            "mediaType": desc.media_type().to_string(),
            "digest": desc.digest().to_string(),
            "size": desc.size(),
            "platform": platform.to_oci(),
            "annotations": {"org.example.child": format!("{child}")},
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
        "annotations": {"org.opencontainers.image.title": "the site, twice"},
    });
    let mut tx = Transaction::begin(dir).unwrap();
    let desc = tx
        .write_bytes(
            &lathe::content::canonical_json(&index),
            MediaType::ImageIndex,
        )
        .unwrap();
    tx.commit(&[(name.to_string(), desc.clone())]).unwrap();
    desc.digest().to_string()
}

/// `lathe run IMAGE` as an unprivileged user.
#[test]
fn a_layout_rebase_swaps_the_run_image_and_keeps_the_app() {
    let world = World::new();
    let app = world.oci("out", "app");
    built_digest(&world.build("deps-app", "cached-deps", &fixture_run(), &app, &[]));
    let before = config_of(&app);
    let (before_digest, before_manifest) = skopeo_raw(&app);
    // The new run image under the same ref name ("run") in another layout: the label's
    // runImage.image is "run", so no --force is needed.
    let new_run = world.oci("new", "run");
    new_run_image(&new_run, &["linux/amd64", "linux/arm64"], &[]);
    let new_child = world.oci("new", "run-linux-amd64");
    let new_config = config_of(&new_child);
    let (new_digest, new_manifest) = skopeo_raw(&new_child);
    let old_config = config_of(&format!("oci:{}:run-linux-amd64", images().display()));
    let (old_digest, _) = skopeo_raw(&format!("oci:{}:run-linux-amd64", images().display()));

    let outcome = rebase_ok(&[&app, "--run-image", &new_run]);
    let (after_digest, after_manifest) = skopeo_raw(&app);
    assert_eq!(outcome["digest"], after_digest.as_str());
    assert_ne!(after_digest, before_digest);
    assert_eq!(outcome["references"], json!([app]));
    assert_eq!(outcome["run_image"], new_run.as_str());
    let platform = &outcome["platforms"][0];
    assert_eq!(platform["platform"], "linux/amd64");
    assert_eq!(platform["previous_digest"], before_digest.as_str());
    assert_eq!(platform["old_run_image"], format!("run@{old_digest}"));
    assert_eq!(platform["new_run_image"], format!("run@{new_digest}"));
    assert_eq!(platform["old_base_layers"], 1);
    assert_eq!(platform["new_base_layers"], 2);
    // Sent to the layout: the new run image's extra layer, the config and the manifest.
    assert_eq!(outcome["blobs_written"], 3, "{outcome:#}");

    // Layers: the new run image's, then the app's, the same blobs as before.
    let old_base = diff_ids(&old_config).len();
    let app_layers = &before_manifest["layers"].as_array().unwrap()[old_base..];
    let mut expected_layers = new_manifest["layers"].as_array().unwrap().clone();
    expected_layers.extend_from_slice(app_layers);
    assert_eq!(after_manifest["layers"], Value::Array(expected_layers));

    // The config: the app's, with the new base's layers, history and base labels, and the
    // lifecycle label's runImage updated.
    let after = config_of(&app);
    let mut expected = before.clone();
    let mut ids = diff_ids(&new_config);
    ids.extend_from_slice(&diff_ids(&before)[old_base..]);
    expected["rootfs"]["diff_ids"] = Value::Array(ids.clone());
    let mut history: Vec<Value> = new_config["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let mut h = h.clone();
            h["created"] = before["created"].clone();
            h
        })
        .collect();
    history.extend_from_slice(&before["history"].as_array().unwrap()[old_base..]);
    expected["history"] = Value::Array(history);
    let mut expected_labels = labels(&before);
    expected_labels.remove("io.buildpacks.base.maintainer");
    expected_labels.insert("io.buildpacks.base.released".into(), json!("2024-01-01"));
    expected_labels.insert(
        "io.buildpacks.base.description".into(),
        json!("run image 2"),
    );
    expected_labels.insert(LIFECYCLE.into(), labels(&after)[LIFECYCLE].clone());
    expected["config"]["Labels"] = Value::Object(expected_labels);
    assert_eq!(after, expected);
    assert_eq!(after["created"], before["created"]);

    // The lifecycle label, field by field: only runImage's topLayer and reference changed.
    let old_label = lifecycle_label(&before);
    let new_label = lifecycle_label(&after);
    for key in old_label.as_object().unwrap().keys() {
        if key != "runImage" {
            assert_eq!(new_label[key], old_label[key], "{key}");
        }
    }
    assert_eq!(
        new_label.as_object().unwrap().keys().collect::<Vec<_>>(),
        old_label.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    assert_eq!(old_label["runImage"]["topLayer"], diff_ids(&old_config)[0]);
    assert_eq!(
        new_label["runImage"],
        json!({"topLayer": ids[1], "reference": format!("run@{new_digest}"), "image": "run"})
    );
    assert_eq!(new_label["stack"], json!({"runImage": {"image": "run"}}));

    // The same image a build on the new run image makes.
    let direct = world.oci("out", "direct");
    let direct_digest =
        built_digest(&world.build("deps-app", "cached-deps", &new_run, &direct, &[]));
    assert_eq!(direct_digest, after_digest);

    // The validators accept it; the new run image's file is there, and so is the app.
    tool(
        "oci-image-tool",
        &["validate", "--type", "image", world.arg("out").as_str()],
    );
    let bundle = world.path("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:app", world.path("out").display()),
            bundle.to_str().unwrap(),
        ],
    );
    assert_eq!(
        fs::read_to_string(bundle.join(format!("rootfs{VERSION_FILE}"))).unwrap(),
        "2\n"
    );
    assert!(bundle.join("rootfs/cnb/lifecycle/launcher").is_file());
    assert!(bundle.join("rootfs/workspace/deps.txt").is_file());

    // And it runs, as an unprivileged user.
    tool(
        "chmod",
        &["-R", "a+rX", world.path("out").to_str().unwrap()],
    );
    let run = run_unprivileged(&[&app]);
    assert_eq!(run.status.code(), Some(0), "{}", report(&run));
    assert_eq!(String::from_utf8_lossy(&run.stdout), "is-even\nleft-pad\n");

    // Rebasing again onto the same run image gives the same image, and writes nothing new.
    let again = rebase_ok(&[&app, "--run-image", &new_run]);
    assert_eq!(again["digest"], after_digest.as_str());
    assert_eq!(again["blobs_written"], 0);
}

#[test]
fn a_registry_rebase_moves_no_layer() {
    let world = World::new();
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let host = proxy.host();
    let run = format!("docker://{host}/lathe/run:1");
    let app = format!("docker://{host}/lathe/app:1");
    lathe_ok(&["copy", "--quiet", &fixture_run(), &run]);

    // The build takes the run image's layers from the run repository by mounting them.
    proxy.clear();
    built_digest(&world.build("deps-app", "cached-deps", &run, &app, &[]));
    let old_run_child = skopeo_raw(&format!("oci:{}:run-linux-amd64", images().display())).1;
    let old_base_layer = old_run_child["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|s| s.method == "POST"
            && named_digest(s).as_deref() == Some(old_base_layer.as_str())
            && s.target.contains("from=lathe%2Frun")
            && s.status == Some(201)),
        "the run image's layer was not mounted: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|s| s.method == "PUT"
            && s.is_blob_upload()
            && named_digest(s).as_deref() == Some(old_base_layer.as_str())),
        "the run image's layer was uploaded: {seen:#?}"
    );
    let before = config_of(&app);
    let (before_digest, before_manifest) = skopeo_raw(&app);

    // The run image is updated under the tag the app's label names; a rebase with no
    // --run-image finds it there.
    new_run_image(&run, &["linux/amd64", "linux/arm64"], &[]);
    let (new_child_digest, new_child) = {
        let index = skopeo_raw(&run).1;
        let child = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let reference = format!("docker://{host}/lathe/run@{child}");
        (child, skopeo_raw(&reference).1)
    };
    let new_run_config = new_child["config"]["digest"].as_str().unwrap().to_string();

    proxy.clear();
    let started = std::time::Instant::now();
    let outcome = rebase_ok(&[&app]);
    let elapsed = started.elapsed();
    let seen = proxy.seen();
    let (after_digest, after_manifest) = skopeo_raw(&app);
    assert_eq!(outcome["digest"], after_digest.as_str());
    assert_ne!(after_digest, before_digest);
    assert_eq!(outcome["run_image"], run.as_str());
    assert_eq!(
        outcome["platforms"][0]["new_run_image"],
        format!("{host}/lathe/run@{new_child_digest}")
    );

    // What went over the wire: manifests, the two configs read, the new config and manifest
    // sent, the new run image's extra layer mounted; not one layer's bytes either way.
    let layers: BTreeSet<String> = after_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(before_manifest["layers"].as_array().unwrap())
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let config = after_manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let before_config = before_manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob_gets: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path().contains("/blobs/"))
        .filter_map(named_digest)
        .collect();
    assert_eq!(
        blob_gets,
        BTreeSet::from([before_config.clone(), new_run_config.clone()]),
        "{seen:#?}"
    );
    let sent: Vec<String> = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.is_blob_upload())
        .filter_map(named_digest)
        .collect();
    assert_eq!(sent, std::slice::from_ref(&config), "{seen:#?}");
    assert!(!seen.iter().any(|s| s.method == "PATCH"), "{seen:#?}");
    let mounted: Vec<String> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.target.contains("mount=") && s.status == Some(201))
        .filter_map(named_digest)
        .collect();
    let extra_layer = new_child["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(mounted, std::slice::from_ref(&extra_layer), "{seen:#?}");
    assert!(layers.contains(&extra_layer));
    let manifest_puts = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.path().contains("/manifests/"))
        .count();
    assert_eq!(manifest_puts, 1);
    assert_eq!(outcome["blobs_written"], 2, "{outcome:#}");
    let body_bytes: usize = seen.iter().map(|s| s.body_len).sum();
    let layer_bytes: u64 = after_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    eprintln!(
        "registry rebase: {:?}, {} requests ({} HEAD, {} GET, {} POST, {} PUT), {} bytes sent \
         in request bodies, {} blobs / {} bytes written; the image's layers: {} bytes",
        elapsed,
        seen.len(),
        seen.iter().filter(|s| s.method == "HEAD").count(),
        seen.iter().filter(|s| s.method == "GET").count(),
        seen.iter().filter(|s| s.method == "POST").count(),
        seen.iter().filter(|s| s.method == "PUT").count(),
        body_bytes,
        outcome["blobs_written"],
        outcome["bytes_written"],
        layer_bytes,
    );

    // The label and config, as on a layout.
    let after = config_of(&app);
    let label = lifecycle_label(&after);
    assert_eq!(label["runImage"]["image"], format!("{host}/lathe/run:1"));
    assert_eq!(
        label["runImage"]["reference"],
        format!("{host}/lathe/run@{new_child_digest}")
    );
    assert_eq!(label["runImage"]["topLayer"], diff_ids(&after)[1]);
    assert_eq!(after["config"]["Env"], before["config"]["Env"]);
    assert_eq!(
        after["config"]["Entrypoint"],
        before["config"]["Entrypoint"]
    );

    // It runs, pulled from the registry by an unprivileged user.
    let run_out = run_unprivileged(&[&app]);
    assert_eq!(run_out.status.code(), Some(0), "{}", report(&run_out));
    assert_eq!(
        String::from_utf8_lossy(&run_out.stdout),
        "is-even\nleft-pad\n"
    );

    // To another repository: the app's layers are mounted from the app's repository.
    proxy.clear();
    let elsewhere = format!("docker://{host}/lathe/app-rebased:1");
    let outcome = rebase_ok(&[&app, "--run-image", &run, "--output", &elsewhere]);
    assert_eq!(
        outcome["digest"],
        after_digest.as_str(),
        "rebasing again changes nothing"
    );
    let seen = proxy.seen();
    assert!(
        !seen.iter().any(|s| s.method == "PUT"
            && s.is_blob_upload()
            && named_digest(s).is_some_and(|d| layers.contains(&d))),
        "{seen:#?}"
    );
    assert_eq!(skopeo_raw(&elsewhere).0, after_digest);
}

/// Changes the lifecycle label of an app config.
fn patch_lifecycle_label(config: &mut Value, change: impl FnOnce(&mut Value)) {
    let mut label = lifecycle_label(config);
    change(&mut label);
    config["config"]["Labels"][LIFECYCLE] = json!(label.to_string());
}

#[test]
fn the_lifecycles_checks_refuse_and_force_overrides() {
    let world = World::new();
    let out_dir = world.path("out");
    let app = world.oci("out", "app");
    built_digest(&world.build("site", "static-site", &fixture_run(), &app, &[]));
    let new_run = world.oci("new", "run");
    new_run_image(&new_run, &["linux/amd64", "linux/arm64"], &[]);
    let unchanged = snapshot(&out_dir);

    // A run image for another architecture: refused, naming both platforms.
    let arm64 = format!("oci:{}:run-linux-arm64", images().display());
    let err = rebase_refused(&[&app, "--run-image", &arm64]);
    assert!(
        err.contains(&app)
            && err.contains("linux/arm64 (debian 12)")
            && err.contains("linux/amd64 (debian 12)")
            && err.contains("--force"),
        "{err}"
    );
    // Another distro version: refused the same way.
    let debian13 = world.oci("new13", "run");
    new_run_image(
        &debian13,
        &["linux/amd64"],
        &[("io.buildpacks.base.distro.version", "13")],
    );
    let err = rebase_refused(&[&app, "--run-image", &debian13]);
    assert!(
        err.contains("(debian 13)") && err.contains("(debian 12)"),
        "{err}"
    );
    // A run image the label does not name (runImage.image is "run"): refused.
    let other = world.oci("new", "other");
    new_run_image(&other, &["linux/amd64"], &[]);
    let err = rebase_refused(&[&app, "--run-image", &other]);
    assert!(
        err.contains("the new run image other is not one its label names") && err.contains("(run)"),
        "{err}"
    );
    assert_eq!(
        snapshot(&out_dir),
        unchanged,
        "a refused rebase changed the layout"
    );

    // Forced onto it: a warning, and the label names the new run image alone.
    let (out, outcome) = rebase(&[
        &app,
        "--run-image",
        &other,
        "--force",
        "--output",
        &world.oci("out", "forced"),
    ]);
    let outcome = outcome.unwrap_or_else(|| panic!("{}", report(&out)));
    assert!(
        stderr(&out).contains("rebasing anyway (--force)"),
        "{}",
        report(&out)
    );
    assert_eq!(
        outcome["warnings"].as_array().unwrap().len(),
        1,
        "{outcome:#}"
    );
    let label = lifecycle_label(&config_of(&world.oci("out", "forced")));
    assert_eq!(label["runImage"]["image"], "other");
    assert!(label["runImage"].get("mirrors").is_none());
    assert_eq!(label["stack"], json!({"runImage": {"image": "other"}}));

    // Forced onto another architecture: the image takes the run image's platform.
    let forced = world.oci("out", "forced-arm64");
    let outcome = rebase_ok(&[&app, "--run-image", &arm64, "--force", "--output", &forced]);
    assert_eq!(outcome["platforms"][0]["platform"], "linux/arm64");
    let config = config_of(&forced);
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["variant"], "v8");

    // An image labelled not rebasable (its run image was): refused unless forced.
    let pinned_run = world.oci("runs", "run");
    relabelled_run_image(&pinned_run, &[("io.buildpacks.rebasable", "false")]);
    let pinned = world.oci("out", "pinned");
    built_digest(&world.build("site", "static-site", &pinned_run, &pinned, &[]));
    let unchanged = snapshot(&out_dir);
    let err = rebase_refused(&[&pinned, "--run-image", &new_run]);
    assert!(
        err.contains(&pinned)
            && err.contains("io.buildpacks.rebasable is \"false\"")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(snapshot(&out_dir), unchanged);
    let (out, outcome) = rebase(&[&pinned, "--run-image", &new_run, "--force"]);
    let outcome = outcome.unwrap_or_else(|| panic!("{}", report(&out)));
    assert!(
        outcome["warnings"][0]
            .as_str()
            .unwrap()
            .contains("io.buildpacks.rebasable"),
        "{outcome:#}"
    );
    assert_eq!(skopeo_raw(&pinned).0, outcome["digest"].as_str().unwrap());
}

#[test]
fn older_platform_apis_check_the_stack_and_mixins() {
    let world = World::new();
    let built = world.oci("out", "built");
    built_digest(&world.build("site", "static-site", &fixture_run(), &built, &[]));
    let legacy = world.oci("out", "legacy");
    patched_image(&built, &legacy, |config| {
        for env in config["config"]["Env"].as_array_mut().unwrap() {
            if env.as_str().unwrap().starts_with("CNB_PLATFORM_API=") {
                *env = json!("CNB_PLATFORM_API=0.11");
            }
        }
        config["config"]["Labels"]["io.buildpacks.stack.mixins"] = json!(r#"["run:curl","git"]"#);
        config["config"]["Labels"]["io.buildpacks.rebasable"] = json!("false");
    });
    let unchanged = snapshot(&world.path("out"));
    // Stack ids and mixins are what counts: another name is fine (no name check before 0.12),
    // io.buildpacks.rebasable is not read, but a missing mixin is refused, not forceable.
    let lacking = world.oci("new", "lacking");
    new_run_image(
        &lacking,
        &["linux/amd64"],
        &[("io.buildpacks.stack.mixins", r#"["curl"]"#)],
    );
    let err = rebase_refused(&[&legacy, "--run-image", &lacking, "--force"]);
    assert!(err.contains("lacks the mixins git"), "{err}");
    let other_stack = world.oci("new", "other-stack");
    new_run_image(
        &other_stack,
        &["linux/amd64"],
        &[("io.buildpacks.stack.id", "io.example.other")],
    );
    let err = rebase_refused(&[&legacy, "--run-image", &other_stack]);
    assert!(
        err.contains("\"io.lathe.testdata\"") && err.contains("\"io.example.other\""),
        "{err}"
    );
    assert_eq!(snapshot(&world.path("out")), unchanged);

    let mixins = world.oci("new", "mixins");
    new_run_image(
        &mixins,
        &["linux/amd64"],
        &[
            ("io.buildpacks.stack.mixins", r#"["build:git","curl","jq"]"#),
            ("io.buildpacks.stack.released", "2024-01-01"),
        ],
    );
    let rebased = world.oci("out", "rebased");
    rebase_ok(&[&legacy, "--run-image", &mixins, "--output", &rebased]);
    let labels = labels(&config_of(&rebased));
    // The stack labels come from the new run image too, before 0.12.
    assert_eq!(
        labels["io.buildpacks.stack.mixins"],
        r#"["build:git","curl","jq"]"#
    );
    assert_eq!(labels["io.buildpacks.stack.released"], "2024-01-01");
    assert_eq!(labels["io.buildpacks.base.released"], "2024-01-01");
    let label: Value = serde_json::from_str(labels[LIFECYCLE].as_str().unwrap()).unwrap();
    assert_eq!(
        label["runImage"]["image"], "run",
        "no name check, no forced rename"
    );
}

#[test]
fn bad_app_images_are_named_and_nothing_is_written() {
    let world = World::new();
    let built = world.oci("out", "built");
    built_digest(&world.build("site", "static-site", &fixture_run(), &built, &[]));
    let new_run = world.oci("new", "run");
    new_run_image(&new_run, &["linux/amd64", "linux/arm64"], &[]);
    let bogus = format!("sha256:{}", "0".repeat(64));
    let broken = world.oci("out", "broken");
    patched_image(&built, &broken, |config| {
        patch_lifecycle_label(config, |label| label["runImage"]["topLayer"] = json!(bogus));
    });
    let unchanged = snapshot(&world.path("out"));

    let err = rebase_refused(&[&broken, "--run-image", &new_run]);
    assert!(
        err.contains(&broken)
            && err.contains(&format!("runImage.topLayer {bogus}"))
            && err.contains("is not the diffID of any of its"),
        "{err}"
    );
    let err = rebase_refused(&[
        &broken,
        "--run-image",
        &new_run,
        "--output",
        &world.oci("out", "elsewhere"),
    ]);
    assert!(err.contains(&bogus), "{err}");
    // The fixture run image is no app image.
    let err = rebase_refused(&[
        &format!("oci:{}:run-linux-amd64", images().display()),
        "--run-image",
        &new_run,
        "--output",
        &world.oci("out", "elsewhere"),
    ]);
    assert!(
        err.contains("no io.buildpacks.lifecycle.metadata label"),
        "{err}"
    );
    assert_eq!(snapshot(&world.path("out")), unchanged);

    // A digest can't be replaced in place: a usage error, before any registry is asked.
    let out = lathe(&[
        "rebase",
        &format!("docker://127.0.0.1:1/app@sha256:{}", "a".repeat(64)),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(stderr(&out).contains("give --output"), "{}", report(&out));
    let out = lathe(&["rebase", &built]);
    assert_eq!(out.status.code(), Some(72), "{}", report(&out));
}

#[test]
fn an_index_is_rebased_platform_by_platform() {
    let world = World::new();
    let out_dir = world.path("out");
    for arch in ["amd64", "arm64"] {
        built_digest(&world.build(
            "site",
            "static-site",
            &fixture_run(),
            &world.oci("out", &format!("site-{arch}")),
            &[&format!("--platform=linux/{arch}")],
        ));
    }
    let index_digest = write_index(
        &out_dir,
        "site",
        &[("site-amd64", "linux/amd64"), ("site-arm64", "linux/arm64")],
    );
    let site = world.oci("out", "site");
    let new_run = world.oci("new", "run");
    new_run_image(&new_run, &["linux/amd64", "linux/arm64"], &[]);

    let rebased = world.oci("out", "rebased");
    let outcome = rebase_ok(&[&site, "--run-image", &new_run, "--output", &rebased]);
    let (digest, index) = skopeo_raw(&rebased);
    assert_eq!(outcome["digest"], digest.as_str());
    assert_ne!(digest, index_digest);
    let (_, old_index) = skopeo_raw(&site);
    assert_eq!(index["annotations"], old_index["annotations"]);
    let children = index["manifests"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let old = &old_index["manifests"][i];
        let new = &children[i];
        assert_eq!(new["platform"], old["platform"]);
        assert_eq!(new["annotations"], old["annotations"]);
        assert_ne!(new["digest"], old["digest"]);
        let report = &outcome["platforms"][i];
        assert_eq!(report["platform"], format!("linux/{arch}"));
        assert_eq!(report["previous_digest"], old["digest"]);
        assert_eq!(report["digest"], new["digest"]);
        // Each child sits on the new run image's child for its platform.
        let child = format!("{rebased}-linux-{arch}");
        let config = config_of(&child);
        assert_eq!(config["architecture"], *arch);
        let base = config_of(&world.oci("new", &format!("run-linux-{arch}")));
        let base_ids = diff_ids(&base);
        assert_eq!(diff_ids(&config)[..base_ids.len()], base_ids[..]);
        let old_config = config_of(&world.oci("out", &format!("site-{arch}")));
        assert_eq!(
            diff_ids(&config)[base_ids.len()..],
            diff_ids(&old_config)[1..]
        );
        assert_eq!(
            lifecycle_label(&config)["runImage"]["reference"],
            format!(
                "run@{}",
                skopeo_raw(&world.oci("new", &format!("run-linux-{arch}"))).0
            )
        );
    }
    let bundle = world.path("bundle-arm64");
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:rebased-linux-arm64", out_dir.display()),
            bundle.to_str().unwrap(),
        ],
    );
    assert_eq!(elf_machine(&bundle.join("rootfs/bin/busybox")), 183);
    assert!(bundle.join(format!("rootfs{VERSION_FILE}")).is_file());
    assert!(bundle.join("rootfs/workspace/public/index.html").is_file());
    // The validators accept the index, and each child's manifest and config.
    let blob = |digest: &str| out_dir.join(format!("blobs/sha256/{}", &digest["sha256:".len()..]));
    let validate = |kind: &str, digest: &str| {
        tool(
            "oci-image-tool",
            &["validate", "--type", kind, blob(digest).to_str().unwrap()],
        );
    };
    validate("imageIndex", &digest);
    for child in children {
        let digest = child["digest"].as_str().unwrap();
        validate("manifest", digest);
        let manifest: Value = serde_json::from_slice(&fs::read(blob(digest)).unwrap()).unwrap();
        validate("config", manifest["config"]["digest"].as_str().unwrap());
    }

    // A run image without an arm64 image: the platform is named, and nothing is written.
    let unchanged = snapshot(&out_dir);
    let amd64_only = world.oci("new", "run-linux-amd64");
    let err = rebase_refused(&[
        &site,
        "--run-image",
        &amd64_only,
        "--output",
        &world.oci("out", "x"),
    ]);
    assert!(
        err.contains("linux/arm64") && err.contains("single linux/amd64 image"),
        "{err}"
    );
    write_index(
        &world.path("new"),
        "amd64-index",
        &[("run-linux-amd64", "linux/amd64")],
    );
    let err = rebase_refused(&[
        &site,
        "--run-image",
        &world.oci("new", "amd64-index"),
        "--force",
    ]);
    assert!(
        err.contains("has no linux/arm64 image") && err.contains("(it has: linux/amd64)"),
        "{err}"
    );
    assert_eq!(snapshot(&out_dir), unchanged);
}

#[test]
fn archives_are_rebased_in_place() {
    let world = World::new();
    let archive = world.path("app.tar");
    let oci_archive = format!("oci-archive:{}:app", archive.display());
    built_digest(&world.build("deps-app", "cached-deps", &fixture_run(), &oci_archive, &[]));
    let new_run = world.oci("new", "run");
    new_run_image(&new_run, &["linux/amd64", "linux/arm64"], &[]);
    let extra = diff_ids(&config_of(&world.oci("new", "run-linux-amd64")))[1].clone();

    // No ref name given: the archive's only image, rewritten under its own name.
    let outcome = rebase_ok(&[
        &format!("oci-archive:{}", archive.display()),
        "--run-image",
        &new_run,
    ]);
    assert_eq!(
        skopeo_raw(&oci_archive).0,
        outcome["digest"].as_str().unwrap()
    );
    assert_eq!(diff_ids(&config_of(&oci_archive))[1], extra);
    let leftovers: Vec<_> = fs::read_dir(world.path(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A docker-archive keeps its tag.
    let docker = world.path("app-docker.tar");
    let docker_archive = format!("docker-archive:{}", docker.display());
    lathe_ok(&[
        "copy",
        "--quiet",
        &oci_archive,
        &format!("{docker_archive}:example/app:1"),
    ]);
    let fresh = world.oci("fresh", "run");
    new_run_image(
        &fresh,
        &["linux/amd64"],
        &[("io.buildpacks.base.released", "2025-01-01")],
    );
    let outcome = rebase_ok(&[&docker_archive, "--run-image", &fresh]);
    assert_eq!(
        outcome["references"][0],
        format!("{docker_archive}:docker.io/example/app:1")
    );
    let config = config_of(&docker_archive);
    assert_eq!(
        config["config"]["Labels"]["io.buildpacks.base.released"],
        "2025-01-01"
    );
    let run = run_unprivileged(&[&docker_archive]);
    assert_eq!(run.status.code(), Some(0), "{}", report(&run));
    assert_eq!(String::from_utf8_lossy(&run.stdout), "is-even\nleft-pad\n");

    // An archive that holds another image too is not rewritten (that image would be lost).
    let two = world.path("two");
    lathe_ok(&[
        "copy",
        "--quiet",
        &oci_archive,
        &format!("oci:{}:app", two.display()),
    ]);
    lathe_ok(&[
        "copy",
        "--quiet",
        &fixture_run(),
        &format!("oci:{}:other", two.display()),
    ]);
    let two_tar = world.path("two.tar");
    tool(
        "tar",
        &[
            "-C",
            two.to_str().unwrap(),
            "-cf",
            two_tar.to_str().unwrap(),
            ".",
        ],
    );
    let before = sha256_hex(&fs::read(&two_tar).unwrap());
    let (out, _) = rebase(&[
        &format!("oci-archive:{}:app", two_tar.display()),
        "--run-image",
        &new_run,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(
        stderr(&out).contains("other") && stderr(&out).contains("give --output"),
        "{}",
        report(&out)
    );
    assert_eq!(sha256_hex(&fs::read(&two_tar).unwrap()), before);
}

/// An index made by one two-platform build, rebased on the registry: each child onto its
/// platform of the new run image index, with no layer blob moving either way; both run.
#[test]
fn a_two_platform_build_is_rebased_on_the_registry_moving_no_layer() {
    let world = World::new();
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let host = proxy.host();
    let run = format!("docker://{host}/lathe/run:1");
    let app = format!("docker://{host}/lathe/app:1");
    lathe_ok(&["copy", "--quiet", &fixture_run(), &run]);
    built_digest(&world.build(
        "deps-app",
        "cached-deps",
        &run,
        &app,
        &["--platform=linux/amd64,linux/arm64"],
    ));
    let (before_digest, before) = skopeo_raw(&app);
    assert_eq!(before["manifests"].as_array().unwrap().len(), 2);
    new_run_image(&run, &["linux/amd64", "linux/arm64"], &[]);
    let (_, new_run) = skopeo_raw(&run);

    proxy.clear();
    let outcome = rebase_ok(&[&app]);
    let seen = proxy.seen();
    let (after_digest, after) = skopeo_raw(&app);
    assert_eq!(outcome["digest"], after_digest.as_str());
    assert_ne!(after_digest, before_digest);
    let repository = format!("docker://{host}/lathe/app");
    let mut layers = BTreeSet::new();
    let mut configs = BTreeSet::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let child = &after["manifests"][i];
        assert_eq!(child["platform"]["architecture"], *arch);
        let digest = child["digest"].as_str().unwrap();
        let (_, manifest) = skopeo_raw(&format!("{repository}@{digest}"));
        configs.insert(manifest["config"]["digest"].as_str().unwrap().to_string());
        for layer in manifest["layers"].as_array().unwrap() {
            layers.insert(layer["digest"].as_str().unwrap().to_string());
        }
        // On its own platform's new run image.
        let config = config_of(&format!("{repository}@{digest}"));
        assert_eq!(config["architecture"], *arch);
        let base_digest = new_run["manifests"][i]["digest"].as_str().unwrap();
        assert_eq!(new_run["manifests"][i]["platform"]["architecture"], *arch);
        let base = config_of(&format!("docker://{host}/lathe/run@{base_digest}"));
        let base_ids = diff_ids(&base);
        assert_eq!(diff_ids(&config)[..base_ids.len()], base_ids[..]);
    }
    let uploaded: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.is_blob_upload())
        .filter_map(named_digest)
        .collect();
    assert_eq!(
        uploaded, configs,
        "only the new configs are sent: {seen:#?}"
    );
    let layer_gets: Vec<String> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path().contains("/blobs/"))
        .filter_map(named_digest)
        .filter(|d| layers.contains(d))
        .collect();
    assert!(layer_gets.is_empty(), "layers were read: {layer_gets:?}");
    assert!(!seen.iter().any(|s| s.method == "PATCH"), "{seen:#?}");

    // Both children run, pulled from the registry by an unprivileged user.
    for platform in ["linux/amd64", "linux/arm64"] {
        let out = run_unprivileged(&["--platform", platform, &app]);
        assert_eq!(out.status.code(), Some(0), "{platform}: {}", report(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "is-even\nleft-pad\n",
            "{platform}"
        );
    }
}

/// The air-gap workflow: a two-platform app built into an archive on the site's side of the
/// gap records the internal registry's run image as a mirror (`--run-image-mirror`); copied to
/// that registry whole, it is rebased there with no `--run-image`, onto the mirror.
#[test]
fn an_app_copied_across_the_air_gap_rebases_onto_its_run_image_mirror() {
    let world = World::new();
    let registry = TestRegistry::start(RegistryConfig::default());
    let host = registry.host();
    let mirror = format!("docker://{host}/internal/run:1");
    let archive = format!("oci-archive:{}:app", world.path("app.tar").display());
    built_digest(&world.build(
        "deps-app",
        "cached-deps",
        &fixture_run(),
        &archive,
        &[
            "--platform=linux/amd64,linux/arm64",
            &format!("--run-image-mirror={mirror}"),
        ],
    ));
    let recorded = format!("{host}/internal/run:1");
    for arch in ["amd64", "arm64"] {
        let label = lifecycle_label(&config_of(&format!("{archive}-linux-{arch}")));
        assert_eq!(label["runImage"]["image"], "run", "{label:#}");
        assert_eq!(label["runImage"]["mirrors"], json!([recorded]), "{label:#}");
    }

    // Inside: the run image and the app copied to the internal registry, then a new run image.
    lathe_ok(&["copy", "--quiet", &fixture_run(), &mirror]);
    let app = format!("docker://{host}/internal/app:1");
    lathe_ok(&["copy", "--quiet", &archive, &app]);
    new_run_image(&mirror, &["linux/amd64", "linux/arm64"], &[]);
    let (_, new_run) = skopeo_raw(&mirror);

    let outcome = rebase_ok(&[&app]);
    assert_eq!(outcome["run_image"], mirror.as_str(), "{outcome:#}");
    let (_, index) = skopeo_raw(&app);
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let child = index["manifests"][i]["digest"].as_str().unwrap();
        let config = config_of(&format!("docker://{host}/internal/app@{child}"));
        let base_child = new_run["manifests"][i]["digest"].as_str().unwrap();
        let base = config_of(&format!("docker://{host}/internal/run@{base_child}"));
        let base_ids = diff_ids(&base);
        assert_eq!(diff_ids(&config)[..base_ids.len()], base_ids[..], "{arch}");
        assert_eq!(config["architecture"], *arch);
    }
    let out = run_unprivileged(&["--platform", "linux/arm64", &app]);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "is-even\nleft-pad\n");

    // A mirror must be a registry name.
    let out = world.build(
        "deps-app",
        "cached-deps",
        &fixture_run(),
        &world.oci("out", "x"),
        &["--run-image-mirror=oci:/somewhere:run"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(stderr(&out).contains("a mirror is a registry reference"));
}
