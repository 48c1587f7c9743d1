//! The CI and cluster examples in docs/: the GitHub Actions and GitLab CI jobs against their
//! vendored JSON schemas (check-jsonschema), the Kubernetes Job with kubernetes-validate
//! `--strict`, the Tekton Task structurally; each restricted as documented (non-root, no
//! privilege escalation, all capabilities dropped, seccomp RuntimeDefault, `--sandbox none`);
//! and every lathe command in them parses with lathe's own command line. The validators come
//! from PyPI into the virtual environment `.ci/install` makes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// A program of the validators' virtual environment (`.ci/install` makes it).
fn validator(name: &str) -> PathBuf {
    let venv = std::env::var_os("LATHE_CI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".cache/lathe/ci-venv")
        });
    let program = venv.join("bin").join(name);
    assert!(
        program.is_file(),
        "{} is missing: run `bash .ci/install`",
        program.display()
    );
    program
}

fn docs(relative: &str) -> PathBuf {
    repo_root().join("docs").join(relative)
}

/// Runs a validator; returns whether it accepted, and what it said.
fn validate(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(validator(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A YAML file as JSON (through the venv's ruamel.yaml; every document of it).
fn yaml(path: &Path) -> Value {
    let out = Command::new(validator("python"))
        .args([
            "-c",
            "import sys, json\nfrom ruamel.yaml import YAML\n\
             print(json.dumps(YAML(typ='safe').load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes `text` with `from` replaced by `to` into a scratch file named like `original`.
fn broken_copy(dir: &Path, original: &Path, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(original).unwrap();
    assert!(
        text.contains(from),
        "{from:?} is not in {}",
        original.display()
    );
    let path = dir.join(original.file_name().unwrap());
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn the_ci_jobs_match_their_schemas() {
    let tmp = scratch();
    for (file, schema, from, to) in [
        (
            "ci/github-actions.yml",
            "github-workflows.json",
            "runs-on:",
            "runs_on:",
        ),
        (
            "ci/gitlab-ci.yml",
            "gitlab-ci.json",
            "  script:",
            "  scripts:",
        ),
    ] {
        let schema = docs(&format!("schemas/{schema}"));
        let schema = schema.to_str().unwrap();
        let (ok, said) = validate(
            "check-jsonschema",
            &["--schemafile", schema, docs(file).to_str().unwrap()],
        );
        assert!(ok, "{file}: {said}");
        // The check can fail: a broken copy is refused.
        let broken = broken_copy(tmp.path(), &docs(file), from, to);
        let (ok, said) = validate(
            "check-jsonschema",
            &["--schemafile", schema, broken.to_str().unwrap()],
        );
        assert!(!ok, "{file} with {to:?} passed: {said}");
    }
}

/// The restricted Pod Security Standard's container settings.
fn assert_restricted(what: &str, security: &Value) {
    assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(
        security["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert!(
        security["capabilities"]["add"].is_null(),
        "{what} adds capabilities"
    );
    assert!(security["privileged"] != true, "{what} is privileged");
}

#[test]
fn the_kubernetes_job_is_valid_and_restricted() {
    let job = docs("kubernetes/job.yaml");
    let (ok, said) = validate("kubernetes-validate", &["--strict", job.to_str().unwrap()]);
    assert!(ok, "{said}");
    let tmp = scratch();
    let broken = broken_copy(
        tmp.path(),
        &job,
        "restartPolicy: Never",
        "restartPolicy: Never\n      hostUsers: maybe",
    );
    let (ok, said) = validate(
        "kubernetes-validate",
        &["--strict", broken.to_str().unwrap()],
    );
    assert!(!ok, "a broken Job passed: {said}");

    let job = yaml(&job);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["hostNetwork"] != true && pod["hostPID"] != true);
    let containers: Vec<&Value> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
        .collect();
    for container in &containers {
        assert_restricted(
            container["name"].as_str().unwrap(),
            &container["securityContext"],
        );
    }
    let build = containers.iter().find(|c| c["name"] == "build").unwrap();
    let args: Vec<&str> = build["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--sandbox=none"), "{args:?}");
    assert!(
        args.contains(&"--platform=linux/amd64,linux/arm64"),
        "{args:?}"
    );
    // /workspace and /layers are empty, writable volumes.
    let volumes = pod["volumes"].as_array().unwrap();
    for dir in ["/workspace", "/layers"] {
        let mount = build["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{dir} is not mounted"));
        assert!(mount["readOnly"] != true, "{dir}");
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert!(volume["emptyDir"].is_object(), "{dir}: {volume}");
    }
    let mut command: Vec<String> = build["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    command.extend(args.iter().map(|a| a.to_string()));
    assert_parses("the Kubernetes Job", &command);
}

/// Every `$(params.X)`, `$(workspaces.X.…)`, `$(results.X.…)` a text uses, by kind.
fn substitutions(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("$(") {
        rest = &rest[at + 2..];
        let end = rest.find(')').expect("closed $(");
        let mut parts = rest[..end].split('.');
        if let (Some(kind), Some(name)) = (parts.next(), parts.next())
            && ["params", "workspaces", "results"].contains(&kind)
        {
            found.push((kind.to_string(), name.to_string()));
        }
        rest = &rest[end..];
    }
    found
}

#[test]
fn the_tekton_task_is_sound() {
    let path = docs("tekton/task.yaml");
    let task = yaml(&path);
    assert_eq!(task["apiVersion"], "tekton.dev/v1");
    assert_eq!(task["kind"], "Task");
    let spec = &task["spec"];
    let declared = |kind: &str| -> Vec<String> {
        spec[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let used = substitutions(&text);
    assert!(!used.is_empty());
    for (kind, name) in &used {
        assert!(
            declared(kind).contains(name),
            "$({kind}.{name}) is not declared"
        );
    }
    for kind in ["params", "workspaces", "results"] {
        for name in declared(kind) {
            assert!(
                used.iter().any(|(k, n)| k == kind && *n == name),
                "{kind} {name} is declared but unused"
            );
        }
    }
    // The source is not under /workspace, which the buildpacks need empty.
    for workspace in spec["workspaces"].as_array().unwrap() {
        let mount = workspace["mountPath"].as_str().unwrap_or("/workspace/x");
        assert!(!mount.starts_with("/workspace"), "{workspace}");
    }
    let security = &spec["stepTemplate"]["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert_restricted("the step template", security);
    let volumes = declared("volumes");
    for step in spec["steps"].as_array().unwrap() {
        assert!(
            step["securityContext"].is_null(),
            "a step overrides the template"
        );
        let mounts: Vec<&str> = step["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert!(volumes.contains(&m["name"].as_str().unwrap().to_string()));
                m["mountPath"].as_str().unwrap()
            })
            .collect();
        assert!(mounts.contains(&"/workspace") && mounts.contains(&"/layers"));
        let script = step["script"].as_str().unwrap();
        assert!(script.starts_with("#!/bin/sh\n"));
        let (ok, said) = sh_syntax(script);
        assert!(ok, "{said}");
        let commands = lathe_commands(script, &tekton_values());
        assert_eq!(commands.len(), 1, "{script}");
        assert!(commands[0].contains(&"--sandbox".to_string()));
        assert_parses("the Tekton Task", &commands[0]);
    }
}

/// `sh -n`: the script's syntax.
fn sh_syntax(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tekton_values() -> Vec<(String, String)> {
    [
        (
            "$(params.APP_IMAGE)",
            "docker://registry.internal:5000/team/app:1",
        ),
        ("$(params.PLATFORMS)", "linux/amd64,linux/arm64"),
        (
            "$(params.CACHE_IMAGE)",
            "docker://registry.internal:5000/team/app:cache",
        ),
        (
            "$(results.IMAGE_DIGEST.path)",
            "/tekton/results/IMAGE_DIGEST",
        ),
        ("$(workspaces.source.path)", "/src"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// The lathe command lines in a shell script, as words: continuation lines joined,
/// `replacements` made first (CI expressions), then words split and variables expanded by
/// bash with example values, redirections and pipes dropped.
fn lathe_commands(script: &str, replacements: &[(String, String)]) -> Vec<Vec<String>> {
    let mut script = script.replace("\\\n", " ");
    for (from, to) in replacements {
        script = script.replace(from, to);
    }
    let mut commands = Vec::new();
    for line in script.lines().map(str::trim) {
        let first = line.split_whitespace().next().unwrap_or("");
        if first != "lathe" && !first.ends_with("/lathe") {
            continue;
        }
        let words_only = line.split(['>', '|']).next().unwrap();
        let out = Command::new("bash")
            .args([
                "-c",
                "eval \"set -- $0\"; printf '%s\\0' \"$@\"",
                words_only,
            ])
            .env("IMAGE", "ghcr.io/team/app")
            .env("BUILDER", "docker://ghcr.io/team/builder:1")
            .env("GITHUB_SHA", "0123abcd")
            .env("REGISTRY_CREDS", "user:token")
            .env("CI_PROJECT_DIR", "/builds/team/app")
            .env("CI_COMMIT_SHORT_SHA", "0123abcd")
            .env("CI_REGISTRY_USER", "ci")
            .env("CI_REGISTRY_PASSWORD", "secret")
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}");
        let words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split('\0')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        commands.push(words);
    }
    commands
}

/// lathe's own command line accepts `words` (the program name first).
fn assert_parses(what: &str, words: &[String]) {
    let mut argv = vec!["lathe".to_string()];
    argv.extend(words[1..].iter().cloned());
    if let Err(e) = lathe::cli::command().try_get_matches_from(&argv) {
        panic!("{what}: {argv:?}: {e}");
    }
    assert!(argv.len() > 3, "{what}: {argv:?}");
}

#[test]
fn every_lathe_command_in_the_ci_jobs_parses() {
    let github = yaml(&docs("ci/github-actions.yml"));
    let expressions = [
        ("${{ github.repository }}", "team/app"),
        ("${{ github.actor }}", "someone"),
        ("${{ secrets.GITHUB_TOKEN }}", "token"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let mut found = 0;
    for step in github["jobs"]["image"]["steps"].as_array().unwrap() {
        let Some(run) = step["run"].as_str() else {
            continue;
        };
        assert!(sh_syntax(run).0, "{run}");
        for command in lathe_commands(run, &expressions) {
            assert!(command.contains(&"--platform".to_string()));
            assert_parses("the GitHub Actions job", &command);
            found += 1;
        }
    }
    assert_eq!(found, 1, "one lathe build in the workflow");

    let gitlab = yaml(&docs("ci/gitlab-ci.yml"));
    let script = gitlab["build-image"]["script"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let commands = lathe_commands(&script, &[]);
    assert_eq!(commands.len(), 1, "{script}");
    assert!(
        commands[0].contains(&"none".to_string()),
        "{:?}",
        commands[0]
    );
    assert_parses("the GitLab CI job", &commands[0]);
}
