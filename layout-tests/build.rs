//! `lathe build` end to end through the CLI with the testdata buildpacks and apps on the
//! fixture build and run images: the group, layers and processes the lifecycle reports, as
//! the test user, as an unprivileged user with no capabilities and nested in an unprivileged
//! user namespace; the app directory never changes; the lifecycle's exit codes for bad
//! buildpacks and bad input; nothing (processes, mounts) is left behind; `--sandbox none`
//! with lathe running inside the build image. The tests read the build's report (`--json`);
//! layout-tests/export.rs checks the images builds write.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::{Value, json};

impl World {
    /// `lathe build APP` as `who` on the fixture images with `extra` arguments.
    fn build(&self, who: Who, app: &str, extra: &[&str]) -> Output {
        let world = world_readable_lathe_and_fixtures();
        let images = world.join("images");
        let mut command = command_as(who, &world.join("lathe"));
        command
            .arg("build")
            .arg(self.path(&format!("apps/{app}")))
            .arg(format!("--build-image=oci:{}:build", images.display()))
            .arg(format!("--run-image=oci:{}:run", images.display()))
            .arg(format!("--output=oci:{}:app", self.path("out").display()))
            .arg(format!("--store={}", self.path("store").display()))
            .arg("--json")
            .args(extra);
        let out = command.output().expect("run lathe build");
        assert_no_leftovers(self.dir.path());
        out
    }
}

fn outcome(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", report(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", report(out)))
}

/// No process whose arguments or environment mention `dir`, and no mount under it.
fn assert_no_leftovers(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = fs::read(entry.path().join(file)).unwrap_or_default();
            if String::from_utf8_lossy(&bytes).contains(&needle) {
                let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{name}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
                break;
            }
        }
    }
    assert!(found.is_empty(), "processes left behind: {found:#?}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&needle),
        "mounts left behind under {needle}"
    );
}

fn site_build(who: Who) {
    let world = World::new();
    let before = snapshot(&world.path("apps/site"));
    let out = world.build(
        who,
        "site",
        &[
            "--buildpack",
            &world.arg("buildpacks/static-site"),
            "--buildpack",
            &world.arg("buildpacks/procfile"),
            "--env",
            "BP_GREETING=hello",
        ],
    );
    let result = outcome(&out);
    assert_eq!(
        result["group"],
        json!([
            {"id": "lathe-test/static-site", "version": "1.0.0", "api": "0.10"},
            {"id": "lathe-test/procfile", "version": "0.3.0", "api": "0.8"},
        ]),
        "{}",
        report(&out)
    );
    assert_eq!(
        result["layers"],
        json!([{"buildpack": "lathe-test/static-site", "name": "site",
                "launch": true, "build": false, "cache": false}])
    );
    let metadata = &result["metadata"];
    assert_eq!(metadata["buildpack-default-process-type"], "web");
    assert_eq!(
        metadata["processes"],
        json!([
            {"type": "web", "buildpack-id": "lathe-test/static-site", "direct": true,
             "command": ["busybox", "httpd", "-f", "-p", "8080", "-h",
                         "/layers/lathe-test_static-site/site/htdocs"],
             "args": []},
            {"type": "worker", "buildpack-id": "lathe-test/procfile", "direct": false,
             "command": ["echo \"working on $HOSTNAME\""], "args": []},
        ]),
        "{}",
        report(&out)
    );
    assert_eq!(
        metadata["labels"],
        json!([{"key": "io.lathe.test.site-files", "value": "2"}])
    );
    let err = stderr(&out);
    assert!(err.contains("---> Static site"), "{err}");
    assert!(err.contains("copied 2 files from public"), "{err}");
    assert!(err.contains("worker: echo"), "{err}");
    assert_eq!(
        snapshot(&world.path("apps/site")),
        before,
        "the app changed"
    );
    let digest = result["image"]["digest"].as_str().unwrap();
    let index = fs::read_to_string(world.path("out/index.json")).unwrap();
    assert!(index.contains(digest), "{digest} is not in {index}");
}

#[test]
fn a_site_builds_as_the_test_user() {
    site_build(Who::TestUser);
}

#[test]
fn a_site_builds_as_an_unprivileged_user() {
    site_build(Who::Unprivileged);
}

#[test]
fn a_site_builds_nested_in_an_unprivileged_user_namespace() {
    site_build(Who::Nested);
}

#[test]
fn build_layers_reach_later_buildpacks_and_apis_get_their_variables() {
    let world = World::new();
    let probe = world.buildpack(
        "probe",
        "api = \"0.12\"\n[buildpack]\nid = \"lathe-test/probe\"\nversion = \"0.0.1\"\n",
        "exit 0",
        "env | sort > \"$CNB_LAYERS_DIR/../probe-env\"\nlist-deps > \"$CNB_LAYERS_DIR/../probe-deps\"\n\
         cp \"$CNB_LAYERS_DIR/../probe-env\" \"$CNB_LAYERS_DIR/../probe-deps\" /workspace/",
    );
    // The probe writes into /workspace, which the test can't see afterwards; what it saw is
    // printed instead.
    let probe_build = fs::read_to_string(Path::new(&probe).join("bin/build")).unwrap();
    fs::write(
        Path::new(&probe).join("bin/build"),
        probe_build.replace(
            "cp \"$CNB_LAYERS_DIR/../probe-env\" \"$CNB_LAYERS_DIR/../probe-deps\" /workspace/",
            "sed 's/^/probe-env: /' \"$CNB_LAYERS_DIR/../probe-env\" >&2\n\
             sed 's/^/probe-deps: /' \"$CNB_LAYERS_DIR/../probe-deps\" >&2",
        ),
    )
    .unwrap();
    let out = world.build(
        Who::Unprivileged,
        "deps-app",
        &[
            "--buildpack",
            &world.arg("buildpacks/cached-deps"),
            "--buildpack",
            &probe,
            "--env",
            "BP_FLAVOUR=plain",
        ],
    );
    let result = outcome(&out);
    let err = stderr(&out);
    let env: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("probe-env: "))
        .collect();
    let value = |name: &str| {
        env.iter()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(String::from)
    };
    assert_eq!(
        value("PATH").unwrap(),
        "/layers/lathe-test_cached-deps/tools/bin:/usr/local/bin:/usr/bin:/bin",
        "{err}"
    );
    assert_eq!(
        value("DEPS_HOME").as_deref(),
        Some("/layers/lathe-test_cached-deps/deps/lib")
    );
    assert_eq!(
        value("LD_LIBRARY_PATH").as_deref(),
        Some("/layers/lathe-test_cached-deps/deps/lib")
    );
    assert_eq!(value("BP_FLAVOUR").as_deref(), Some("plain"));
    assert_eq!(value("CNB_EXEC_ENV").as_deref(), Some("production"));
    assert_eq!(value("CNB_TARGET_OS").as_deref(), Some("linux"));
    assert_eq!(value("CNB_TARGET_ARCH").as_deref(), Some("amd64"));
    assert_eq!(value("CNB_TARGET_DISTRO_NAME").as_deref(), Some("debian"));
    assert_eq!(value("CNB_TARGET_DISTRO_VERSION").as_deref(), Some("12"));
    assert_eq!(
        value("CNB_LAYERS_DIR").as_deref(),
        Some("/layers/lathe-test_probe")
    );
    assert_eq!(value("CNB_PLATFORM_DIR").as_deref(), Some("/platform"));
    assert_eq!(value("HOME").as_deref(), Some("/home/cnb"));
    assert_eq!(
        value("CNB_USER_ID"),
        None,
        "the build image's Env is filtered"
    );
    assert_eq!(value("CNB_PLATFORM_API"), None);
    let deps: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("probe-deps: "))
        .collect();
    assert_eq!(deps, ["is-even", "left-pad"], "{err}");
    assert_eq!(
        result["layers"],
        json!([
            {"buildpack": "lathe-test/cached-deps", "name": "deps",
             "launch": true, "build": true, "cache": true},
            {"buildpack": "lathe-test/cached-deps", "name": "tools",
             "launch": false, "build": true, "cache": false},
        ])
    );
    assert_eq!(
        result["metadata"]["processes"][0]["exec-env"],
        json!(["production"])
    );
}

#[test]
fn no_passing_group_exits_20_with_what_the_buildpacks_said() {
    let world = World::new();
    let out = world.build(
        Who::Unprivileged,
        "procfile-app",
        &["--buildpack", &world.arg("buildpacks/static-site")],
    );
    assert_eq!(out.status.code(), Some(20), "{}", report(&out));
    let err = stderr(&out);
    assert!(err.contains("lathe-test/static-site"), "{err}");
    assert!(
        err.contains("static-site: no index.html or public/index.html in the app"),
        "{err}"
    );
}

#[test]
fn a_failing_bin_build_exits_51_after_showing_its_output() {
    let world = World::new();
    let bp = world.buildpack(
        "fails",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/fails\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "echo 'compiling...'\necho 'error: the compiler broke' >&2\nexit 3",
    );
    let new_cache = world.path("out/new-cache");
    let out = world.build(
        Who::Unprivileged,
        "site",
        &[
            "--buildpack",
            &bp,
            "--cache-dir",
            new_cache.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(51), "{}", report(&out));
    assert!(
        !new_cache.exists(),
        "a failed build leaves no new cache directory"
    );
    let err = stderr(&out);
    assert!(err.contains("error: the compiler broke"), "{err}");
    assert!(err.contains("lathe-test/fails"), "{err}");
}

#[test]
fn an_unsupported_buildpack_api_exits_12_naming_the_buildpack() {
    let world = World::new();
    let bp = world.buildpack(
        "old",
        "api = \"0.6\"\n[buildpack]\nid = \"lathe-test/old\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "exit 0",
    );
    let out = world.build(Who::Unprivileged, "site", &["--buildpack", &bp]);
    assert_eq!(out.status.code(), Some(12), "{}", report(&out));
    let err = stderr(&out);
    assert!(
        err.contains("lathe-test/old") && err.contains("0.6"),
        "{err}"
    );
}

#[test]
fn a_layer_named_launch_is_a_build_error() {
    let world = World::new();
    let bp = world.buildpack(
        "reserved",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/reserved\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "mkdir -p \"$CNB_LAYERS_DIR/launch\"\nprintf '[types]\\nlaunch = true\\n' > \"$CNB_LAYERS_DIR/launch.toml\"",
    );
    let out = world.build(Who::Unprivileged, "site", &["--buildpack", &bp]);
    assert_eq!(out.status.code(), Some(52), "{}", report(&out));
    assert!(
        stderr(&out).contains("lathe-test/reserved"),
        "{}",
        report(&out)
    );
}

#[test]
fn a_detect_that_hangs_is_stopped_at_the_limit() {
    let world = World::new();
    let bp = world.buildpack(
        "hangs",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/hangs\"\nversion = \"1.0.0\"\n",
        "sleep 600",
        "exit 0",
    );
    let started = std::time::Instant::now();
    let out = world.build(
        Who::Unprivileged,
        "site",
        &["--buildpack", &bp, "--detect-timeout", "2"],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(21), "{}", report(&out));
    assert!(
        stderr(&out).contains("lathe-test/hangs"),
        "{}",
        report(&out)
    );
}

#[test]
fn a_buildpack_that_forks_a_daemon_leaves_nothing_running() {
    let world = World::new();
    // The daemon keeps the output pipes open and carries the world's path in its
    // environment (through --env), so a leak is found by assert_no_leftovers.
    let bp = world.buildpack(
        "daemon",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/daemon\"\nversion = \"1.0.0\"\n",
        "(sleep 600 &)\nexit 0",
        "(sleep 600 &)\necho started a daemon",
    );
    let out = world.build(
        Who::Unprivileged,
        "site",
        &[
            "--buildpack",
            &bp,
            "--env",
            &format!("WORLD={}", world.dir.path().display()),
        ],
    );
    let result = outcome(&out);
    assert_eq!(result["group"][0]["id"], "lathe-test/daemon");
}

#[test]
fn a_missing_buildpack_exits_22_naming_it() {
    let world = World::new();
    let out = world.build(
        Who::Unprivileged,
        "site",
        &["--buildpack", "lathe-test/not-there@1.0.0"],
    );
    assert_eq!(out.status.code(), Some(22), "{}", report(&out));
    assert!(
        stderr(&out).contains("lathe-test/not-there"),
        "{}",
        report(&out)
    );
}

#[test]
fn bad_arguments_exit_3_before_anything_runs() {
    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let build_image = format!("--build-image=oci:{}:build", images.display());
    let output = format!("--output=oci:{}:app", world.path("out").display());
    for (args, expected) in [
        (
            vec![build_image.clone(), output.clone()],
            "--build-image needs --run-image",
        ),
        (
            vec![
                "--builder=oci:/nowhere:b".to_string(),
                build_image.clone(),
                output.clone(),
            ],
            "either --builder or --build-image",
        ),
        (vec!["--builder=oci:/nowhere:b".to_string()], "--output"),
    ] {
        let mut all = vec!["build".to_string(), world.arg("apps/site")];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = lathe(&refs);
        assert_eq!(out.status.code(), Some(3), "{}", report(&out));
        assert!(stderr(&out).contains(expected), "{}", report(&out));
    }
    let out = lathe(&[
        "build",
        "/no/such/app",
        &build_image,
        &format!("--run-image=oci:{}:run", images.display()),
        "--buildpack",
        "x",
        &output,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", report(&out));
    assert!(stderr(&out).contains("/no/such/app"), "{}", report(&out));
}

/// lathe inside the build image (the CI job's image is the builder): `lathe run` the build
/// image with lathe, the host's C library, the buildpacks, the app and the run image bound
/// in, and `lathe build --sandbox none` there, for two platforms, each built in turn.
#[test]
fn sandbox_none_builds_inside_the_build_image() {
    let world = World::new();
    let shared = world_readable_lathe_and_fixtures();
    let images = shared.join("images");
    let mut volumes = vec![
        format!("{}:/opt/lathe/lathe:ro", shared.join("lathe").display()),
        format!("{}:/opt/buildpacks:ro", world.path("buildpacks").display()),
        format!("{}:/opt/app:ro", world.path("apps/site").display()),
        format!("{}:/opt/images:ro", images.display()),
    ];
    // lathe is linked against the host's C library: bind its loader and library directory
    // where the ELF interpreter path and the loader's default search path expect them.
    for wanted in ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu"] {
        let real = fs::canonicalize(wanted).unwrap_or_else(|e| panic!("{wanted}: {e}"));
        volumes.push(format!("{}:{wanted}:ro", real.display()));
    }
    let mut args = vec![
        "run".to_string(),
        format!("oci:{}:build", images.display()),
        format!("--store={}", world.path("store").display()),
    ];
    for volume in &volumes {
        args.push("--volume".into());
        args.push(volume.clone());
    }
    args.extend(
        [
            "--",
            "/opt/lathe/lathe",
            "build",
            "/opt/app",
            "--sandbox",
            "none",
            "--buildpack",
            "/opt/buildpacks/static-site",
            "--run-image",
            "oci:/opt/images:run",
            "--output",
            "oci:/tmp/out:app",
            "--json",
            "--platform=linux/amd64,linux/arm64",
            "--cross-strategy=rebuild",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = command_as(Who::Unprivileged, &shared.join("lathe"));
    command.args(&refs);
    let out = command.output().unwrap();
    assert_no_leftovers(world.dir.path());
    let result = outcome(&out);
    assert_eq!(result["group"][0]["id"], "lathe-test/static-site");
    assert_eq!(
        result["metadata"]["processes"][0]["command"][6],
        "/layers/lathe-test_static-site/site/htdocs"
    );
    // Both platforms were built in this container, one after the other.
    assert_eq!(
        stderr(&out).matches("copied 2 files from public").count(),
        2,
        "{}",
        report(&out)
    );
    assert_eq!(
        platform_summaries(&result),
        [
            ("linux/amd64".to_string(), "built".to_string()),
            ("linux/arm64".to_string(), "built".to_string())
        ]
    );
}

#[test]
fn a_cache_layer_is_reused_by_the_next_build() {
    let world = World::new();
    let cache = world.path("cache");
    fs::create_dir(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    let cache_arg = format!("--cache-dir={}", cache.display());
    let bp = world.arg("buildpacks/cached-deps");
    let build = |extra: &[&str]| {
        // Each build writes over the last one's image, the previous image of the next: the
        // lifecycle restores a launch + cache layer's metadata from there, its data from the
        // cache.
        let mut args = vec!["--buildpack", &bp, &cache_arg];
        args.extend(extra);
        let out = world.build(Who::Unprivileged, "deps-app", &args);
        (outcome(&out), stderr(&out))
    };
    let (first, first_err) = build(&[]);
    assert!(first_err.contains("installing dependencies"), "{first_err}");
    assert_eq!(
        first["cache"]["layers"],
        json!(["lathe-test/cached-deps/deps"]),
        "only cache = true layers are cached (not the build-only tools layer)"
    );
    assert_eq!(first["cache"]["reused"], 0);

    // The lifecycle's volume cache format: committed/<diffID>.tar and the metadata file.
    let committed = cache.join("committed");
    let metadata: Value = serde_json::from_slice(
        &fs::read(committed.join("io.buildpacks.lifecycle.cache.metadata")).unwrap(),
    )
    .unwrap();
    let deps = &metadata["buildpacks"][0]["layers"]["deps"];
    assert_eq!(metadata["buildpacks"][0]["key"], "lathe-test/cached-deps");
    assert_eq!(
        (&deps["build"], &deps["launch"], &deps["cache"]),
        (&json!(true), &json!(true), &json!(true))
    );
    assert!(deps["data"]["checksum"].is_string(), "{metadata}");
    let mut tars: Vec<String> = fs::read_dir(&committed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tar"))
        .collect();
    tars.sort();
    let mut expected = vec![
        format!("{}.tar", deps["sha"].as_str().unwrap()),
        format!("{}.tar", metadata["sbom"]["sha"].as_str().unwrap()),
    ];
    expected.sort();
    assert_eq!(
        tars, expected,
        "one tar per cached layer and one for the SBOMs"
    );
    let listing = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(committed.join(&expected[0]))
        .output()
        .unwrap();
    assert!(listing.status.success());
    assert!(!cache.join("staging").exists());

    let (second, second_err) = build(&[]);
    assert!(
        second_err.contains("Restoring data for \"lathe-test/cached-deps:deps\" from cache"),
        "{second_err}"
    );
    assert!(
        second_err.contains("reusing cached dependencies"),
        "{second_err}"
    );
    assert_eq!(
        second["cache"]["reused"], 2,
        "the layer and the SBOMs, unchanged"
    );
    let (_, cleared_err) = build(&["--clear-cache"]);
    assert!(
        cleared_err.contains("installing dependencies"),
        "{cleared_err}"
    );

    // A cache whose tar was tampered with is a warning and a rebuilt layer.
    let tar = committed.join(format!("{}.tar", deps["sha"].as_str().unwrap()));
    let mut bytes = fs::read(&tar).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&tar, bytes).unwrap();
    let (_, tampered_err) = build(&[]);
    assert!(
        tampered_err.contains("skipping restore for layer lathe-test/cached-deps:deps"),
        "{tampered_err}"
    );
    assert!(
        tampered_err.contains("installing dependencies"),
        "{tampered_err}"
    );

    // Undecodable metadata: a warning and a build without the cache.
    fs::write(
        committed.join("io.buildpacks.lifecycle.cache.metadata"),
        "{not json",
    )
    .unwrap();
    let (_, broken_err) = build(&[]);
    assert!(broken_err.contains("is not valid"), "{broken_err}");
    assert!(
        broken_err.contains("installing dependencies"),
        "{broken_err}"
    );
}

#[test]
fn an_arm64_build_runs_its_buildpacks_on_the_host_or_under_emulation() {
    let world = World::new();
    let bp = world.buildpack(
        "arch",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/arch\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "echo \"machine=$(uname -m) target=$CNB_TARGET_ARCH distro=$CNB_TARGET_DISTRO_NAME\"",
    );
    for (args, expected) in [
        (
            &["--platform", "linux/arm64", "--emulate"][..],
            "machine=aarch64 target=arm64 distro=debian",
        ),
        (
            &["--platform", "linux/arm64"][..],
            "machine=x86_64 target=arm64 distro=debian",
        ),
        (
            &["--platform", "linux/amd64"][..],
            "machine=x86_64 target=amd64 distro=debian",
        ),
    ] {
        let mut all = vec!["--buildpack", &bp];
        all.extend(args);
        let out = world.build(Who::Unprivileged, "site", &all);
        outcome(&out);
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            report(&out)
        );
    }
}

/// A two-platform builder made with `lathe builder create` from the testdata buildpacks: its
/// order (the first group fails on an app without deps.txt, the second passes), its run
/// image, and `--buildpack ID` replacing its order.
#[test]
fn a_builder_made_by_lathe_builds_for_both_platforms() {
    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let builder_toml = world.path("builder.toml");
    fs::write(
        &builder_toml,
        format!(
            r#"[[buildpacks]]
uri = "buildpacks/static-site"

[[buildpacks]]
uri = "buildpacks/procfile"

[[buildpacks]]
uri = "buildpacks/cached-deps"

[[order]]
[[order.group]]
id = "lathe-test/cached-deps"
[[order.group]]
id = "lathe-test/procfile"
optional = true

[[order]]
[[order.group]]
id = "lathe-test/static-site"
[[order.group]]
id = "lathe-test/procfile"
optional = true

[build]
image = "oci:{images}:build"

[[run.images]]
image = "oci:{images}:run"
"#,
            images = images.display()
        ),
    )
    .unwrap();
    let layout = world.path("builder");
    let created = lathe(&[
        "builder",
        "create",
        "--config",
        builder_toml.to_str().unwrap(),
        "--platform",
        "linux/amd64,linux/arm64",
        "--output",
        &format!("oci:{}:builder", layout.display()),
    ]);
    assert!(created.status.success(), "{}", report(&created));
    tool("chmod", &["-R", "a+rX", layout.to_str().unwrap()]);
    let builder = format!("oci:{}:builder", layout.display());
    let exe = world_readable_lathe_and_fixtures().join("lathe");
    for platform in ["linux/amd64", "linux/arm64"] {
        let out = command_as(Who::Unprivileged, &exe)
            .args(["build", &world.arg("apps/site"), "--builder", &builder])
            .args(["--platform", platform, "--json"])
            .arg(format!("--output=oci:{}:app", world.path("out").display()))
            .arg(format!("--store={}", world.path("store").display()))
            .output()
            .unwrap();
        let result = outcome(&out);
        let ids: Vec<&str> = result["group"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["lathe-test/static-site", "lathe-test/procfile"],
            "{platform}: {}",
            report(&out)
        );
    }
    let out = command_as(Who::Unprivileged, &exe)
        .args([
            "build",
            &world.arg("apps/procfile-app"),
            "--builder",
            &builder,
        ])
        .args(["--buildpack", "lathe-test/procfile", "--json"])
        .arg(format!("--output=oci:{}:app", world.path("out").display()))
        .arg(format!("--store={}", world.path("store").display()))
        .output()
        .unwrap();
    assert_no_leftovers(world.dir.path());
    let result = outcome(&out);
    assert_eq!(
        result["group"],
        json!([{"id": "lathe-test/procfile", "version": "0.3.0", "api": "0.8"}])
    );
    assert_eq!(
        result["metadata"]["processes"][1]["command"],
        json!(["busybox httpd -f -p \"${PORT:-8080}\""])
    );
}

#[test]
fn sandbox_none_refuses_what_only_a_sandbox_can_do() {
    let world = World::new();
    for (extra, expected) in [
        (
            vec!["--builder=oci:/nowhere:builder".to_string()],
            "--sandbox none builds with the builder image lathe runs in",
        ),
        (
            vec![format!("--volume={}:/data", world.arg("apps"))],
            "--volume and --network none need a sandbox",
        ),
        (
            vec!["--network=none".to_string()],
            "--volume and --network none need a sandbox",
        ),
    ] {
        let mut args = vec![
            "build".to_string(),
            world.arg("apps/site"),
            "--sandbox=none".to_string(),
            "--output=oci:/nowhere:app".to_string(),
        ];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lathe(&refs);
        assert_eq!(out.status.code(), Some(3), "{}", report(&out));
        assert!(stderr(&out).contains(expected), "{}", report(&out));
    }
}

/// `--platform-dir` seeds /platform, `--env-file` and `--env` add env files (later wins),
/// `--binding` appears read-only under /platform/bindings, and a bad one is refused first.
#[test]
fn platform_dir_env_files_and_bindings_reach_the_buildpacks() {
    let world = World::new();
    let seed = world.path("seed");
    fs::create_dir_all(seed.join("env")).unwrap();
    fs::write(seed.join("env/BP_SEEDED"), "from-seed").unwrap();
    fs::write(seed.join("env/BP_OVERRIDDEN"), "seed").unwrap();
    let binding = world.path("binding");
    fs::create_dir(&binding).unwrap();
    fs::write(binding.join("type"), "postgresql").unwrap();
    let env_file = world.path("build.env");
    fs::write(
        &env_file,
        "# a comment\n\nBP_FROM_FILE=file value\nBP_OVERRIDDEN=file\n",
    )
    .unwrap();
    tool("chmod", &["-R", "a+rX", world.dir.path().to_str().unwrap()]);
    let bp = world.buildpack(
        "platform",
        "api = \"0.10\"\n[buildpack]\nid = \"lathe-test/platform\"\nversion = \"1.0.0\"\n",
        "exit 0",
        "for f in BP_SEEDED BP_FROM_FILE BP_OVERRIDDEN; do echo \"env $f=${!f}\"; done\n\
         echo \"binding type=$(cat \"$CNB_PLATFORM_DIR/bindings/db/type\")\"\n\
         if touch \"$CNB_PLATFORM_DIR/bindings/db/x\" 2>/dev/null; then echo writable; fi",
    );
    let out = world.build(
        Who::Unprivileged,
        "site",
        &[
            "--buildpack",
            &bp,
            "--platform-dir",
            seed.to_str().unwrap(),
            "--env-file",
            env_file.to_str().unwrap(),
            "--env",
            "BP_OVERRIDDEN=flag",
            "--binding",
            &format!("db={}", binding.display()),
        ],
    );
    outcome(&out);
    let err = stderr(&out);
    for expected in [
        "env BP_SEEDED=from-seed",
        "env BP_FROM_FILE=file value",
        "env BP_OVERRIDDEN=flag",
        "binding type=postgresql",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    assert!(!err.contains("writable"), "bindings are read-only: {err}");
    assert_eq!(
        fs::read_dir(&binding).unwrap().count(),
        1,
        "the binding's directory is unchanged"
    );

    let bad = world.build(
        Who::Unprivileged,
        "site",
        &["--buildpack", &bp, "--env-file", "/no/such/file"],
    );
    assert_eq!(bad.status.code(), Some(3), "{}", report(&bad));
    assert!(stderr(&bad).contains("/no/such/file"), "{}", report(&bad));
}
