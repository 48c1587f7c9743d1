//! Export end to end: `lathe build` writes a CNB app image that runs through its launcher
//! (default process, another process type, env files and exec.d in effect) as an unprivileged
//! user; its config and labels follow the lifecycle's (cnb-spec-digest §2.8–§2.9) field by
//! field; two builds from two directories at two times give one digest; a rebuild of an
//! unchanged app sends no blob to a registry, and a one-file change sends only the app layer,
//! the config and the manifest; bad input leaves the destination as it was.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry};
use serde_json::Value;

fn label(config: &Value, key: &str) -> Value {
    let text = config["config"]["Labels"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no label {key}"));
    serde_json::from_str(text).unwrap()
}

#[test]
fn the_app_image_runs_its_processes_with_env_files_and_exec_d() {
    let world = World::new();
    let image = format!("oci:{}:app", world.path("out").display());
    let out = world.build_app(
        Who::TestUser,
        &world.path("apps/deps-app"),
        "cached-deps",
        &image,
        &[],
    );
    built_digest(&out);
    tool(
        "chmod",
        &["-R", "a+rX", world.path("out").to_str().unwrap()],
    );

    let default = run_unprivileged(&[&image]);
    assert_eq!(default.status.code(), Some(0), "{}", report(&default));
    assert_eq!(
        String::from_utf8_lossy(&default.stdout),
        "is-even\nleft-pad\n",
        "the default process lists $DEPS_HOME (an env file of the deps layer)"
    );

    let show = run_unprivileged(&[&image, "--process", "show"]);
    assert_eq!(show.status.code(), Some(0), "{}", report(&show));
    assert_eq!(
        String::from_utf8_lossy(&show.stdout),
        "2 dependencies in /layers/lathe-test_cached-deps/deps/lib\n",
        "DEPS_COUNT comes from the layer's exec.d over fd 3"
    );
}

#[test]
fn the_config_and_labels_follow_the_lifecycle() {
    let world = World::new();
    let image = format!("oci:{}:app", world.path("out").display());
    let out = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &image,
        &[],
    );
    let digest = built_digest(&out);
    let manifest: Value =
        serde_json::from_str(&tool("skopeo", &["inspect", "--raw", &image])).unwrap();
    assert_eq!(
        sha256_hex(tool("skopeo", &["inspect", "--raw", &image]).as_bytes()),
        digest.trim_start_matches("sha256:")
    );
    let config = config_of(&image);
    let images = world_readable_lathe_and_fixtures().join("images");
    let run_ref = format!("oci:{}:run-linux-amd64", images.display());
    let run_config = config_of(&run_ref);
    let run_manifest_digest = format!(
        "sha256:{}",
        sha256_hex(tool("skopeo", &["inspect", "--raw", &run_ref]).as_bytes())
    );

    // Layers: the run image's, then site, SBOM, app, launcher, config, process types.
    let run_diff_ids = run_config["rootfs"]["diff_ids"].as_array().unwrap().clone();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap().clone();
    assert_eq!(diff_ids.len(), run_diff_ids.len() + 6);
    assert_eq!(diff_ids[..run_diff_ids.len()], run_diff_ids[..]);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), diff_ids.len());
    let history: Vec<&str> = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .skip(run_diff_ids.len())
        .map(|h| h["created_by"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "Layer: 'site', Created by buildpack: lathe-test/static-site@1.0.0",
            "Software Bill-of-Materials",
            "Application Layer",
            "Buildpacks Application Launcher",
            "Buildpacks Launcher Config",
            "Buildpacks Process Types",
        ]
    );
    assert!(
        config["history"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["created"] == "1980-01-01T00:00:01Z")
    );
    assert_eq!(config["created"], "1980-01-01T00:00:01Z");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");

    // The process config.
    let inner = &config["config"];
    assert_eq!(inner["Entrypoint"], serde_json::json!(["/cnb/process/web"]));
    assert_eq!(inner["WorkingDir"], "/workspace");
    assert!(inner.get("Cmd").is_none_or(Value::is_null), "{inner}");
    assert_eq!(inner["User"], run_config["config"]["User"]);
    let env: Vec<&str> = inner["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for wanted in [
        "PATH=/cnb/process:/cnb/lifecycle:/usr/local/bin:/usr/bin:/bin",
        "CNB_LAYERS_DIR=/layers",
        "CNB_APP_DIR=/workspace",
        "CNB_PLATFORM_API=0.13",
        "CNB_DEPRECATION_MODE=quiet",
    ] {
        assert!(env.contains(&wanted), "{wanted} missing from {env:?}");
    }

    // Labels: the run image's kept, the buildpack's added, the lifecycle's three.
    let labels = &inner["Labels"];
    assert_eq!(labels["io.buildpacks.rebasable"], "true");
    assert_eq!(labels["io.buildpacks.base.id"], "io.lathe.testdata");
    assert_eq!(labels["io.lathe.test.site-files"], "2");
    assert_eq!(
        label(&config, "io.buildpacks.project.metadata"),
        serde_json::json!({})
    );
    let lifecycle = label(&config, "io.buildpacks.lifecycle.metadata");
    let added = &diff_ids[run_diff_ids.len()..];
    let site = &lifecycle["buildpacks"][0];
    assert_eq!(site["key"], "lathe-test/static-site");
    assert_eq!(site["version"], "1.0.0");
    assert_eq!(
        site["layers"]["site"],
        serde_json::json!({"sha": added[0], "data": {"files": 2}, "build": false,
                           "launch": true, "cache": false})
    );
    assert_eq!(lifecycle["sbom"]["sha"], added[1]);
    assert_eq!(lifecycle["app"], serde_json::json!([{"sha": added[2]}]));
    assert_eq!(lifecycle["launcher"]["sha"], added[3]);
    assert_eq!(lifecycle["config"]["sha"], added[4]);
    assert_eq!(lifecycle["process-types"]["sha"], added[5]);
    assert_eq!(
        lifecycle["runImage"],
        serde_json::json!({"topLayer": run_diff_ids.last().unwrap(),
                           "reference": format!("run@{run_manifest_digest}"),
                           "image": "run"})
    );
    assert_eq!(
        lifecycle["stack"],
        serde_json::json!({"runImage": {"image": "run"}})
    );
    let build = label(&config, "io.buildpacks.build.metadata");
    assert_eq!(
        build["buildpacks"],
        serde_json::json!([{"id": "lathe-test/static-site", "version": "1.0.0"}])
    );
    assert_eq!(build["buildpack-default-process-type"], "web");
    assert_eq!(build["processes"][0]["type"], "web");
    assert_eq!(
        build["processes"][0]["buildpackID"],
        "lathe-test/static-site"
    );
    assert_eq!(build["processes"][0]["direct"], true);
    assert_eq!(build["processes"][0]["args"], Value::Null);
    let version = build["launcher"]["version"].as_str().unwrap();
    assert!(version.starts_with("0.21.0+lathe."), "{version}");

    // No host path anywhere in the config.
    let text = config.to_string();
    for host_path in [
        world.path("").display().to_string(),
        images.display().to_string(),
    ] {
        assert!(!text.contains(&host_path), "{host_path} in {text}");
    }
    // And the layout passes the validators.
    tool(
        "oci-image-tool",
        &[
            "validate",
            "--type",
            "image",
            world.path("out").to_str().unwrap(),
        ],
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
    assert!(bundle.join("rootfs/cnb/lifecycle/launcher").is_file());
    assert_eq!(
        fs::read_link(bundle.join("rootfs/cnb/process/web")).unwrap(),
        Path::new("/cnb/lifecycle/launcher")
    );
    assert!(bundle.join("rootfs/layers/config/metadata.toml").is_file());
    assert!(bundle.join("rootfs/workspace/public/index.html").is_file());
}

#[test]
fn two_builds_from_two_directories_at_two_times_give_one_digest() {
    let world = World::new();
    let first_app = world.path("apps/site");
    let second_app = world.path("elsewhere/deeper/site");
    fs::create_dir_all(second_app.parent().unwrap()).unwrap();
    tool(
        "cp",
        &[
            "-a",
            first_app.to_str().unwrap(),
            second_app.to_str().unwrap(),
        ],
    );
    tool(
        "touch",
        &[
            "-d",
            "2020-05-05",
            second_app.join("public/index.html").to_str().unwrap(),
        ],
    );
    let first = world.build_app(
        Who::TestUser,
        &first_app,
        "static-site",
        &format!("oci:{}:app", world.path("one").display()),
        &[],
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = world.build_app(
        Who::TestUser,
        &second_app,
        "static-site",
        &format!("oci-archive:{}:app", world.path("two.tar").display()),
        &[],
    );
    assert_eq!(built_digest(&first), built_digest(&second));

    let dated = world_readable_lathe_and_fixtures();
    let out = command_as(Who::TestUser, &dated.join("lathe"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .arg("build")
        .arg(&first_app)
        .arg(format!(
            "--build-image=oci:{}:build",
            dated.join("images").display()
        ))
        .arg(format!(
            "--run-image=oci:{}:run",
            dated.join("images").display()
        ))
        .arg(format!(
            "--buildpack={}",
            world.path("buildpacks/static-site").display()
        ))
        .arg(format!(
            "--output=oci:{}:dated",
            world.path("one").display()
        ))
        .arg(format!("--store={}", world.path("store").display()))
        .arg("--json")
        .output()
        .unwrap();
    assert_ne!(built_digest(&out), built_digest(&first));
    let config = config_of(&format!("oci:{}:dated", world.path("one").display()));
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
}

/// Blob uploads the registry saw (one POST per blob sent).
fn uploads(proxy: &FaultProxy) -> usize {
    proxy
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.is_blob_upload())
        .count()
}

#[test]
fn a_rebuild_sends_only_what_changed_to_the_registry() {
    let world = World::new();
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let image = format!("docker://{}/app:1", proxy.host());
    let app = world.path("apps/site");

    let first = world.build_app(Who::TestUser, &app, "static-site", &image, &[]);
    let first_digest = built_digest(&first);
    assert!(uploads(&proxy) > 0);
    let check = tool(
        "skopeo",
        &["inspect", "--tls-verify=false", "--raw", &image],
    );
    assert_eq!(
        format!("sha256:{}", sha256_hex(check.as_bytes())),
        first_digest
    );

    proxy.clear();
    let again = world.build_app(Who::TestUser, &app, "static-site", &image, &[]);
    assert_eq!(built_digest(&again), first_digest);
    assert_eq!(uploads(&proxy), 0, "{:#?}", proxy.seen());

    proxy.clear();
    fs::write(app.join("public/extra.txt"), "one more file\n").unwrap();
    let changed = world.build_app(Who::TestUser, &app, "static-site", &image, &[]);
    assert_ne!(built_digest(&changed), first_digest);
    // The site layer and the app layer both hold the new file (the buildpack copies public/),
    // and the buildpack's label (files = 3) is in metadata.toml, the launcher config layer: so
    // the site layer, the app layer, the launcher config layer and the image config. Nothing
    // else (not the run image's layers, the SBOM, the launcher or the process types).
    assert_eq!(uploads(&proxy), 4, "{:#?}", proxy.seen());
    let manifests = proxy
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path().contains("/manifests/"))
        .count();
    assert_eq!(manifests, 1);
}

#[test]
fn bad_input_is_named_and_leaves_the_destination_alone() {
    let world = World::new();
    let out_dir = world.path("out");
    let image = format!("oci:{}:app", out_dir.display());
    built_digest(&world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &image,
        &[],
    ));
    let before = snapshot(&out_dir);
    let images = world_readable_lathe_and_fixtures().join("images");

    let wrong_platform = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &image,
        &[&format!(
            "--run-image=oci:{}:run-linux-arm64",
            images.display()
        )],
    );
    assert_ne!(wrong_platform.status.code(), Some(0));
    let err = String::from_utf8_lossy(&wrong_platform.stderr);
    assert!(
        err.contains("run-linux-arm64") && err.contains("linux/arm64"),
        "{err}"
    );

    let missing = world.path("no-such-launcher");
    let no_launcher = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &image,
        &[&format!("--launcher=linux/amd64={}", missing.display())],
    );
    assert_eq!(
        no_launcher.status.code(),
        Some(62),
        "{}",
        report(&no_launcher)
    );
    let err = String::from_utf8_lossy(&no_launcher.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let unknown = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &image,
        &["--default-process=nope"],
    );
    assert_eq!(unknown.status.code(), Some(62), "{}", report(&unknown));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("nope") && err.contains("web"), "{err}");
    assert_eq!(snapshot(&out_dir), before, "the layout changed");

    let own_store = scratch();
    tool("chmod", &["777", own_store.path().to_str().unwrap()]);
    let unwritable = world.path("read-only");
    fs::create_dir(&unwritable).unwrap();
    fs::set_permissions(&unwritable, fs::Permissions::from_mode(0o555)).unwrap();
    let denied = command_as(
        Who::Unprivileged,
        &world_readable_lathe_and_fixtures().join("lathe"),
    )
    .arg("build")
    .arg(world.path("apps/site"))
    .arg(format!("--build-image=oci:{}:build", images.display()))
    .arg(format!("--run-image=oci:{}:run", images.display()))
    .arg(format!(
        "--buildpack={}",
        world.path("buildpacks/static-site").display()
    ))
    .arg(format!("--output=oci:{}/layout:app", unwritable.display()))
    .arg(format!("--store={}", own_store.path().display()))
    .output()
    .unwrap();
    assert_eq!(denied.status.code(), Some(62), "{}", report(&denied));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains(&unwritable.display().to_string()), "{err}");
    assert_eq!(fs::read_dir(&unwritable).unwrap().count(), 0);
}

/// `--tag` adds names in the layout (or on the registry) of `--output`; an archive, which
/// holds one name, or another place is refused before anything is built or written.
#[test]
fn tags_name_the_image_where_the_output_is() {
    let world = World::new();
    let layout = world.path("out");
    let out = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &format!("oci:{}:app", layout.display()),
        &[&format!("--tag=oci:{}:v2", layout.display())],
    );
    let digest = built_digest(&out);
    let index = fs::read_to_string(layout.join("index.json")).unwrap();
    for name in ["\"app\"", "\"v2\""] {
        assert!(index.contains(name) && index.contains(&digest), "{index}");
    }

    let archive = world.path("app.tar");
    let refused = world.build_app(
        Who::TestUser,
        &world.path("apps/site"),
        "static-site",
        &format!("oci-archive:{}:app", archive.display()),
        &[&format!("--tag=oci-archive:{}:other", archive.display())],
    );
    assert_eq!(refused.status.code(), Some(3), "{}", report(&refused));
    assert!(
        stderr(&refused).contains("--tag oci-archive:"),
        "{}",
        report(&refused)
    );
    assert!(!archive.exists());
}

/// A buildpack with a launch layer it keeps (without a directory) when the previous image has
/// it at the same version, and a cache-only layer it reuses when the cache restored it.
fn keeper_buildpack(world: &World) {
    let build = r#"layers="$CNB_LAYERS_DIR"
if [ -n "${KEEP:-}" ] || grep -q 'version = "1"' "$layers/runtime.toml" 2>/dev/null; then
  [ ! -e "$layers/runtime" ] || { echo "the launch-only layer came back with contents"; exit 1; }
  echo "keeping runtime from the previous image"
else
  echo "making runtime"
  mkdir -p "$layers/runtime/bin"
  echo "hello from the runtime layer" > "$layers/runtime/bin/hello"
fi
printf '[types]\nlaunch = true\n[metadata]\nversion = "1"\n' > "$layers/runtime.toml"
if [ -f "$layers/downloads/file" ]; then
  echo "downloads restored: $(cat "$layers/downloads/file")"
else
  mkdir -p "$layers/downloads"
  echo "downloaded once" > "$layers/downloads/file"
fi
printf '[types]\ncache = true\n' > "$layers/downloads.toml"
cat > "$layers/launch.toml" <<'TOML'
[[processes]]
type = "web"
command = ["sh", "-c", "cat /layers/lathe-test_keeper/runtime/bin/hello"]
default = true
TOML"#;
    world.buildpack(
        "keeper",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/keeper\"\nversion = \"1.0.0\"\n",
        "exit 0",
        build,
    );
}

/// Replaces the lifecycle label of `oci:DIR:name` with text that is not JSON, as a damaged
/// previous image would have it.
fn break_lifecycle_label(dir: &Path, name: &str) {
    let blob = |digest: &str| {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let index_path = dir.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&fs::read(blob(entry["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: Value = serde_json::from_slice(
        &fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    config["config"]["Labels"]["io.buildpacks.lifecycle.metadata"] = "{broken".into();
    let (digest, size) = put(&serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = put(&serde_json::to_vec(&manifest).unwrap());
    entry["digest"] = digest.into();
    entry["size"] = size.into();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn the_previous_image_and_the_cache_image_give_back_what_a_rebuild_keeps() {
    let world = World::new();
    keeper_buildpack(&world);
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let image = format!("docker://{}/kept:1", proxy.host());
    let cache = format!("--cache-image=docker://{}/kept-cache:1", proxy.host());
    let app = world.path("apps/site");

    let first = world.build_app(Who::TestUser, &app, "keeper", &image, &[&cache]);
    let first_digest = built_digest(&first);
    let err = stderr(&first);
    assert!(err.contains("making runtime"), "{err}");
    let result: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(
        result["cache"]["layers"],
        serde_json::json!(["lathe-test/keeper/downloads"])
    );
    let cache_config: Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--config",
            &format!("docker://{}/kept-cache:1", proxy.host()),
        ],
    ))
    .unwrap();
    let cache_label = label(&cache_config, "io.buildpacks.lifecycle.cache.metadata");
    let downloads = &cache_label["buildpacks"][0]["layers"]["downloads"];
    assert_eq!(downloads["cache"], true);
    assert_eq!(
        cache_config["rootfs"]["diff_ids"][0], downloads["sha"],
        "the cache image's layer is the cached layer"
    );

    // The rebuild keeps the launch layer (no directory: the previous image's blob) and gets
    // the cache-only layer back from the cache image; nothing new is uploaded.
    proxy.clear();
    let second = world.build_app(Who::TestUser, &app, "keeper", &image, &[&cache]);
    assert_eq!(built_digest(&second), first_digest);
    let err = stderr(&second);
    assert!(
        err.contains("keeping runtime from the previous image"),
        "{err}"
    );
    assert!(err.contains("downloads restored: downloaded once"), "{err}");
    assert!(
        err.contains("Restoring metadata for \"lathe-test/keeper:runtime\" from app image"),
        "{err}"
    );
    assert_eq!(uploads(&proxy), 0, "{:#?}", proxy.seen());
    let ran = run_unprivileged(&[&image]);
    assert_eq!(ran.status.code(), Some(0), "{}", report(&ran));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hello from the runtime layer\n"
    );

    // A previous image whose label is damaged: a warning and a full rebuild.
    let layout = world.path("layout");
    lathe_ok(&["copy", &image, &format!("oci:{}:bad", layout.display())]);
    break_lifecycle_label(&layout, "bad");
    let damaged = world.build_app(
        Who::TestUser,
        &app,
        "keeper",
        &format!("oci:{}:new", world.path("out").display()),
        &[&format!("--previous-image=oci:{}:bad", layout.display())],
    );
    built_digest(&damaged);
    let err = stderr(&damaged);
    assert!(
        err.contains("io.buildpacks.lifecycle.metadata label is not valid")
            && err.contains("building without reusing its layers"),
        "{err}"
    );
    assert!(err.contains("making runtime"), "{err}");

    // A layer kept without contents that no previous image has: export names it (exit 62).
    let out_dir = world.path("out2");
    let orphan = world.build_app(
        Who::TestUser,
        &app,
        "keeper",
        &format!("oci:{}:app", out_dir.display()),
        &["--env=KEEP=1"],
    );
    assert_eq!(orphan.status.code(), Some(62), "{}", report(&orphan));
    let err = stderr(&orphan);
    assert!(
        err.contains("lathe-test/keeper") && err.contains("\"runtime\""),
        "{err}"
    );
    assert!(!out_dir.join("index.json").exists());
}

/// An ELF program for another machine in a launch layer (here lathe's arm64 launcher in an
/// amd64 image) fails the export naming the buildpack, layer and file, unless
/// `--allow-foreign-binaries`, which lets it through with a warning.
#[test]
fn a_program_for_another_machine_in_a_launch_layer_is_named() {
    let world = World::new();
    let dir = world.buildpack(
        "foreign",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/foreign\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "mkdir -p \"$CNB_LAYERS_DIR/tools/bin\"\n\
         cp \"$CNB_BUILDPACK_DIR/tool-arm64\" \"$CNB_LAYERS_DIR/tools/bin/tool\"\n\
         printf '[types]\\nlaunch = true\\n' > \"$CNB_LAYERS_DIR/tools.toml\"",
    );
    fs::copy(
        repo_root().join("launcher/bin/launcher-arm64"),
        Path::new(&dir).join("tool-arm64"),
    )
    .unwrap();
    let out_dir = world.path("out");
    let image = format!("oci:{}:app", out_dir.display());
    let app = world.path("apps/site");

    let refused = world.build_app(Who::TestUser, &app, "foreign", &image, &[]);
    assert_eq!(refused.status.code(), Some(62), "{}", report(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains("lathe-test/foreign@1.0.0 layer \"tools\"")
            && err.contains("bin/tool: linux/arm64")
            && err.contains("linux/amd64")
            && err.contains("--allow-foreign-binaries"),
        "{err}"
    );
    assert!(!out_dir.join("index.json").exists(), "nothing is written");

    let allowed = world.build_app(
        Who::TestUser,
        &app,
        "foreign",
        &image,
        &["--allow-foreign-binaries"],
    );
    built_digest(&allowed);
    assert!(
        stderr(&allowed).contains("bin/tool: linux/arm64"),
        "{}",
        report(&allowed)
    );
}
