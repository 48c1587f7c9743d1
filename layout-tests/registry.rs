//! The registry transport against Debian's docker-registry on 127.0.0.1: round trips with
//! skopeo as the outside oracle, HEAD-skip and cross-repository mounts, https with a test CA
//! (given, or in certs.d), basic and token auth, every credential source (`--creds`,
//! `CNB_REGISTRY_AUTH`, config.json `auths`, `credHelpers` and `credsStore` with fake
//! `docker-credential-*` helpers), tokens that expire mid-transfer, a fault-injecting proxy,
//! and bad input. Runs that handle a credential log at `LATHE_LOG=trace` and are checked for
//! it.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use registry_support::*;
use serde_json::Value;

/// Runs lathe with a clean registry environment: no docker config, no CNB variables, no
/// proxies. `env` adds variables.
fn lathe_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let empty = scratch();
    let mut cmd = Command::new(lathe_bin());
    cmd.args(args);
    clean_registry_env(&mut cmd, empty.path(), env);
    cmd.output().expect("run lathe")
}

/// A registry environment with nothing in it but `env`: DOCKER_CONFIG and XDG_RUNTIME_DIR
/// point at the empty directory `empty`.
fn clean_registry_env(cmd: &mut Command, empty: &Path, env: &[(&str, &str)]) {
    cmd.env("DOCKER_CONFIG", empty)
        .env("XDG_RUNTIME_DIR", empty)
        .env("HOME", empty)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("CNB_REGISTRY_AUTH")
        .env_remove("CNB_INSECURE_REGISTRIES")
        .env_remove("LATHE_LOG");
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
}

/// Fails when any of `secrets` (or its base64) shows in what lathe printed.
fn assert_secret_free(out: &Output, secrets: &[&str], what: &str) {
    let all = format!("{}{}", stderr(out), String::from_utf8_lossy(&out.stdout));
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !all.contains(secret) && !all.contains(&b64(secret)),
            "{what}: a credential shows in lathe's output:\n{all}"
        );
    }
}

/// Runs lathe like [`lathe_env`] with every log on (`LATHE_LOG=trace`, lathe's own and its
/// HTTP and TLS libraries') and checks that none of `secrets` shows in its output.
fn lathe_traced(args: &[&str], env: &[(&str, &str)], secrets: &[&str]) -> Output {
    let mut env = env.to_vec();
    env.push(("LATHE_LOG", "trace"));
    let out = lathe_env(args, &env);
    assert_secret_free(&out, secrets, &args.join(" "));
    out
}

fn b64(text: &str) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text)
}

fn lathe_reg(args: &[&str]) -> Output {
    lathe_env(args, &[])
}

fn ok(out: Output, args: &str) -> String {
    if !out.status.success() {
        // The end of it: traced runs log a great deal.
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().collect();
        panic!(
            "lathe {args} failed: {}",
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    String::from_utf8(out.stdout).unwrap()
}

fn fixture(name: &str) -> String {
    format!("oci:{}:{name}", fixtures().display())
}

/// The digest of what skopeo reads at `reference` (registry over http or with `extra` flags).
fn skopeo_digest(reference: &str, extra: &[&str]) -> String {
    let mut args = vec!["inspect", "--raw"];
    args.extend_from_slice(extra);
    args.push(reference);
    let raw = tool("skopeo", &args);
    format!("sha256:{}", sha256_hex(raw.as_bytes()))
}

fn index_children(layout_ref: &str) -> Vec<String> {
    let (_, index) = skopeo_raw(layout_ref);
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn lathe_and_skopeo_read_each_others_pushes_with_the_same_digests() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let tmp = scratch();
    let (run_digest, _) = skopeo_raw(&fixture("run"));

    // lathe pushes the whole index; skopeo sees the same index and children.
    let report = json(&ok(
        lathe_reg(&[
            "copy",
            "--json",
            &fixture("run"),
            &format!("docker://{host}/lathe/run:v1"),
        ]),
        "push",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    assert_eq!(
        report["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let pushed = format!("docker://{host}/lathe/run:v1");
    assert_eq!(skopeo_digest(&pushed, &["--tls-verify=false"]), run_digest);
    for child in index_children(&fixture("run")) {
        assert_eq!(
            skopeo_digest(
                &format!("docker://{host}/lathe/run@{child}"),
                &["--tls-verify=false"]
            ),
            child
        );
    }
    // skopeo copies it on into a layout: every blob is there and verified by skopeo.
    let via_skopeo = tmp.path().join("via-skopeo");
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &pushed,
            &format!("oci:{}:x", via_skopeo.display()),
        ],
    );
    assert_eq!(
        skopeo_raw(&format!("oci:{}:x", via_skopeo.display())).0,
        run_digest
    );

    // lathe pulls it back into a layout: same digests, per-platform refs, valid layout.
    let back = tmp.path().join("back");
    ok(
        lathe_reg(&["copy", &pushed, &format!("oci:{}:x", back.display())]),
        "pull",
    );
    assert_eq!(
        skopeo_raw(&format!("oci:{}:x", back.display())).0,
        run_digest
    );
    tool(
        "oci-image-tool",
        &["validate", "--type", "image", back.to_str().unwrap()],
    );
    assert_eq!(
        snapshot(&back.join("blobs")),
        snapshot(&via_skopeo.join("blobs")),
        "lathe and skopeo pulled the same blobs"
    );

    // skopeo pushes the build index; lathe reads it with skopeo's digests.
    let (build_digest, _) = skopeo_raw(&fixture("build"));
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &fixture("build"),
            &format!("docker://{host}/sk/build:v2"),
        ],
    );
    let inspected = json(&ok(
        lathe_reg(&["inspect", "--json", &format!("docker://{host}/sk/build:v2")]),
        "inspect",
    ));
    assert_eq!(inspected["digest"], build_digest.as_str());
    let pulled = tmp.path().join("pulled");
    ok(
        lathe_reg(&[
            "copy",
            &format!("docker://{host}/sk/build:v2"),
            &format!("oci:{}:b", pulled.display()),
        ]),
        "pull skopeo's push",
    );
    assert_eq!(
        skopeo_raw(&format!("oci:{}:b", pulled.display())).0,
        build_digest
    );
    // By digest, and one platform of it into a docker-archive.
    let arm = index_children(&fixture("build"))[1].clone();
    let by_digest = json(&ok(
        lathe_reg(&[
            "inspect",
            "--json",
            &format!("docker://{host}/sk/build@{arm}"),
        ]),
        "inspect by digest",
    ));
    assert_eq!(by_digest["digest"], arm.as_str());
    let archive = tmp.path().join("arm.tar");
    ok(
        lathe_reg(&[
            "copy",
            "--platform",
            "linux/arm64",
            &format!("docker://{host}/sk/build:v2"),
            &format!("docker-archive:{}", archive.display()),
        ]),
        "pull arm64 to docker-archive",
    );
    let info = json(&tool(
        "skopeo",
        &["inspect", &format!("docker-archive:{}", archive.display())],
    ));
    assert_eq!(info["Architecture"], "arm64");

    // One platform pushed alone is that platform's manifest.
    let single = json(&ok(
        lathe_reg(&[
            "copy",
            "--json",
            "--platform",
            "linux/arm64",
            &fixture("run"),
            &format!("docker://{host}/lathe/run-arm:v1"),
        ]),
        "push one platform",
    ));
    let run_arm = index_children(&fixture("run"))[1].clone();
    assert_eq!(single["digest"], run_arm.as_str());
    assert_eq!(
        skopeo_digest(
            &format!("docker://{host}/lathe/run-arm:v1"),
            &["--tls-verify=false"]
        ),
        run_arm
    );
}

#[test]
fn a_second_push_sends_no_blob_and_a_copy_between_repositories_mounts() {
    // Relative Location headers here; the fault tests see absolute ones.
    let reg = TestRegistry::start(RegistryConfig {
        relative_urls: true,
        ..Default::default()
    });
    let proxy = FaultProxy::start(reg.port, |_| None);
    let host = proxy.host();
    let target = format!("docker://{host}/lathe/run:v1");
    let first = json(&ok(
        lathe_reg(&["copy", "--json", &fixture("run"), &target]),
        "first push",
    ));
    let uploads: Vec<Seen> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.is_blob_upload())
        .collect();
    assert_eq!(uploads.len(), 4, "two configs and two layers: {uploads:?}");
    assert_eq!(first["blobs_copied"], 7, "4 blobs, 2 manifests, 1 index");
    // Each blob went in one monolithic PUT, and the index was PUT after its children.
    assert!(uploads.iter().all(|s| s.body_len > 0));
    let manifest_puts: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path().contains("/manifests/"))
        .map(|s| s.path().rsplit('/').next().unwrap().to_string())
        .collect();
    let children = index_children(&fixture("run"));
    assert_eq!(manifest_puts.len(), 3, "{manifest_puts:?}");
    assert!(children.contains(&manifest_puts[0]) && children.contains(&manifest_puts[1]));
    assert_eq!(manifest_puts[2], "v1", "the tag is pushed last");

    proxy.clear();
    let again = json(&ok(
        lathe_reg(&["copy", "--json", &fixture("run"), &target]),
        "second push",
    ));
    assert_eq!(again["blobs_copied"], 0);
    let writes: Vec<Seen> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method != "HEAD" && s.method != "GET")
        .collect();
    assert_eq!(writes.len(), 1, "only the tag is PUT again: {writes:?}");
    assert!(writes[0].path().ends_with("/manifests/v1"));
    assert!(
        !proxy.seen().iter().any(|s| s.body_len > 10_000),
        "no layer bytes sent"
    );

    // Another repository on the same registry: every blob is mounted, none uploaded.
    proxy.clear();
    ok(
        lathe_reg(&["copy", &target, &format!("docker://{host}/other/run:v2")]),
        "copy between repositories",
    );
    let seen = proxy.seen();
    let mounts: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.target.contains("mount="))
        .collect();
    assert_eq!(mounts.len(), 4, "{seen:?}");
    assert!(mounts.iter().all(|s| s.target.contains("from=lathe%2Frun")));
    assert!(
        !seen
            .iter()
            .any(|s| (s.method == "PUT" || s.method == "PATCH") && s.is_blob_upload()),
        "no blob was uploaded: {seen:?}"
    );
    assert_eq!(
        skopeo_digest(
            &format!("docker://{}/other/run:v2", reg.host()),
            &["--tls-verify=false"]
        ),
        skopeo_raw(&fixture("run")).0
    );
}

#[test]
fn https_with_a_test_ca_and_basic_auth() {
    let tmp = scratch();
    let ca = TestCa::create(tmp.path());
    let password = "s3cret-Pa55word";
    let reg = TestRegistry::start(RegistryConfig {
        tls: Some((ca.server_cert.clone(), ca.server_key.clone())),
        htpasswd: Some(htpasswd(tmp.path(), "alice", password)),
        ..Default::default()
    });
    let host = reg.host();
    let target = format!("docker://{host}/private/run:v1");
    let ca_arg = ca.ca_cert.to_str().unwrap();
    let creds = format!("alice:{password}");
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &creds);
    let check_secret_free = |out: &Output| {
        let all = format!("{}{}", stderr(out), String::from_utf8_lossy(&out.stdout));
        assert!(
            !all.contains(password) && !all.contains(&encoded),
            "credential in output: {all}"
        );
    };

    // An untrusted certificate is refused, naming the reference.
    let out = lathe_reg(&["--creds", &creds, "copy", &fixture("run"), &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&target) && stderr(&out).contains("certificate"),
        "{}",
        stderr(&out)
    );
    check_secret_free(&out);

    // No credentials, then a wrong password: clear errors, nothing pushed, no secret shown.
    let out = lathe_reg(&["--ca-cert", ca_arg, "copy", &fixture("run"), &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("authentication required"),
        "{}",
        stderr(&out)
    );
    let wrong = "wrong-Pa55word";
    let out = lathe_reg(&[
        "--ca-cert",
        ca_arg,
        "--creds",
        &format!("alice:{wrong}"),
        "-vv",
        "copy",
        &fixture("run"),
        &target,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&target) && stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(wrong), "{}", stderr(&out));

    // --creds with --ca-cert, verbose: works, and no credential in the logs.
    let out = lathe_reg(&[
        "--ca-cert",
        ca_arg,
        "--creds",
        &creds,
        "-vv",
        "copy",
        "--json",
        &fixture("run"),
        &target,
    ]);
    check_secret_free(&out);
    let report = json(&ok(out, "push with --creds"));
    let cert_dir = ca.cert_dir();
    let skopeo_flags = ["--cert-dir", cert_dir.to_str().unwrap(), "--creds", &creds];
    assert_eq!(
        skopeo_digest(&target, &skopeo_flags),
        report["digest"].as_str().unwrap()
    );

    // An authfile with an `auths` entry, then CNB_REGISTRY_AUTH, then --insecure-registry.
    let authfile = tmp.path().join("config.json");
    std::fs::write(
        &authfile,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{encoded}"}}}}}}"#),
    )
    .unwrap();
    let pulled = tmp.path().join("pulled");
    let out = lathe_reg(&[
        "--ca-cert",
        ca_arg,
        "--authfile",
        authfile.to_str().unwrap(),
        "copy",
        &target,
        &format!("oci:{}:a", pulled.display()),
    ]);
    check_secret_free(&out);
    ok(out, "pull with --authfile");
    let out = lathe_env(
        &["--ca-cert", ca_arg, "inspect", &target],
        &[(
            "CNB_REGISTRY_AUTH",
            &format!(r#"{{"{host}": "Basic {encoded}"}}"#),
        )],
    );
    check_secret_free(&out);
    ok(out, "inspect with CNB_REGISTRY_AUTH");
    let out = lathe_reg(&[
        "--insecure-registry",
        &host,
        "--creds",
        &creds,
        "inspect",
        &target,
    ]);
    ok(out, "inspect with --insecure-registry");
    let out = lathe_env(
        &["--creds", &creds, "inspect", &target],
        &[("CNB_INSECURE_REGISTRIES", &format!("other.example,{host}"))],
    );
    ok(out, "inspect with CNB_INSECURE_REGISTRIES");
}

#[test]
fn token_auth_with_pull_push_and_mount_scopes() {
    let tmp = scratch();
    let password = "t0ken-Pa55word";
    let tokens = TokenServer::start(tmp.path(), "bob", password);
    let reg = TestRegistry::start(RegistryConfig {
        token: Some((tokens.realm(), tokens.cert.clone())),
        ..Default::default()
    });
    let host = reg.host();
    let creds = format!("bob:{password}");
    let target = format!("docker://{host}/team/run:v1");

    // Anonymous: the token server refuses, and lathe says what is missing.
    let out = lathe_reg(&["copy", &fixture("run"), &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("authentication required"),
        "{}",
        stderr(&out)
    );
    let out = lathe_reg(&["--creds", "bob:nope-nope", "copy", &fixture("run"), &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("authentication failed") && !stderr(&out).contains("nope-nope"),
        "{}",
        stderr(&out)
    );

    let before = tokens.issued.load(std::sync::atomic::Ordering::Relaxed);
    let out = lathe_reg(&[
        "--creds",
        &creds,
        "copy",
        "--json",
        &fixture("run"),
        &target,
    ]);
    assert!(!stderr(&out).contains(password));
    let report = json(&ok(out, "push with a token"));
    let issued = tokens.issued.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(issued, 1, "one token serves the whole push");
    let asked = tokens.requests.lock().unwrap().last().unwrap().clone();
    assert_eq!(asked, ["repository:team/run:pull,push"]);
    assert_eq!(
        skopeo_digest(&target, &["--tls-verify=false", "--creds", &creds]),
        report["digest"].as_str().unwrap()
    );

    // A copy to another repository asks for pull on the source as well, and mounts.
    let other = format!("docker://{host}/team/copy:v1");
    ok(
        lathe_reg(&["--creds", &creds, "copy", &target, &other]),
        "mount with a token",
    );
    let requests = tokens.requests.lock().unwrap().clone();
    assert!(
        requests.iter().any(
            |r| r.contains(&"repository:team/copy:pull,push".to_string())
                && r.contains(&"repository:team/run:pull".to_string())
        ),
        "{requests:?}"
    );
    let pulled = tmp.path().join("pulled");
    ok(
        lathe_reg(&[
            "--creds",
            &creds,
            "copy",
            &other,
            &format!("oci:{}:x", pulled.display()),
        ]),
        "pull with a token",
    );
    assert_eq!(
        skopeo_raw(&format!("oci:{}:x", pulled.display())).0,
        report["digest"].as_str().unwrap()
    );
}

#[test]
fn pushes_and_pulls_survive_random_faults() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(reg.port, random_faults(0x5eed_1a7e));
    let host = proxy.host();
    let target = format!("docker://{host}/faulty/build:v1");
    let report = json(&ok(
        lathe_reg(&["copy", "--json", &fixture("build"), &target]),
        "push through faults",
    ));
    let faults = proxy.seen().iter().filter(|s| s.fault.is_some()).count();
    assert!(faults >= 5, "the proxy injected {faults} faults");
    let (build_digest, _) = skopeo_raw(&fixture("build"));
    assert_eq!(report["digest"], build_digest.as_str());
    assert_eq!(
        skopeo_digest(
            &format!("docker://{}/faulty/build:v1", reg.host()),
            &["--tls-verify=false"]
        ),
        build_digest
    );
    proxy.clear();
    let tmp = scratch();
    let back = tmp.path().join("back");
    ok(
        lathe_reg(&["copy", &target, &format!("oci:{}:x", back.display())]),
        "pull through faults",
    );
    assert!(proxy.seen().iter().any(|s| s.fault.is_some()));
    assert_eq!(
        skopeo_raw(&format!("oci:{}:x", back.display())).0,
        build_digest
    );
}

#[test]
fn a_slow_blob_finalisation_does_not_fail_the_push() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(reg.port, |req| {
        (req.method == "PUT" && req.path().contains("/blobs/uploads/") && req.body.len() > 100_000)
            .then_some(Fault::Stall(Duration::from_secs(4)))
    });
    let target = format!("docker://{}/slow/run:v1", proxy.host());
    ok(
        lathe_reg(&["--registry-timeout", "1", "copy", &fixture("run"), &target]),
        "push with slow finalisation",
    );
    assert!(proxy.seen().iter().any(|s| s.fault.is_some()));
    assert_eq!(
        skopeo_digest(
            &format!("docker://{}/slow/run:v1", reg.host()),
            &["--tls-verify=false"]
        ),
        skopeo_raw(&fixture("run")).0
    );
}

#[test]
fn a_registry_refusing_monolithic_uploads_gets_chunks() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(reg.port, |req| {
        (req.method == "PUT" && req.path().contains("/blobs/uploads/") && !req.body.is_empty())
            .then_some(Fault::Status(413))
    });
    let target = format!("docker://{}/chunked/run:v1", proxy.host());
    ok(
        lathe_reg(&["copy", &fixture("run"), &target]),
        "chunked push",
    );
    let patches = proxy.seen().iter().filter(|s| s.method == "PATCH").count();
    assert_eq!(patches, 4, "one PATCH per blob (each under the chunk size)");
    assert_eq!(
        skopeo_digest(
            &format!("docker://{}/chunked/run:v1", reg.host()),
            &["--tls-verify=false"]
        ),
        skopeo_raw(&fixture("run")).0
    );
}

#[test]
fn a_push_that_keeps_failing_leaves_no_tag() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(reg.port, |req| {
        (req.method == "PUT" && req.path().contains("/blobs/uploads/") && req.body.len() > 100_000)
            .then_some(Fault::Status(500))
    });
    let target = format!("docker://{}/broken/run:v1", proxy.host());
    let out = lathe_reg(&["copy", &fixture("run"), &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&target) && stderr(&out).contains("500"),
        "{}",
        stderr(&out)
    );
    assert!(
        !proxy
            .seen()
            .iter()
            .any(|s| s.path().contains("/manifests/") && s.method == "PUT")
    );
    let out = lathe_reg(&["inspect", &format!("docker://{}/broken/run:v1", reg.host())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no tag \"v1\""), "{}", stderr(&out));
}

#[test]
fn bad_answers_and_bad_references_are_clear_errors_that_write_nothing() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    ok(
        lathe_reg(&[
            "copy",
            &fixture("run"),
            &format!("docker://{host}/good/run:v1"),
        ]),
        "seed",
    );
    let tmp = scratch();
    let dest = tmp.path().join("dest");
    let dest_ref = format!("oci:{}:x", dest.display());

    // A manifest whose bytes do not match its digest.
    let corrupting = FaultProxy::start(reg.port, |req| {
        (req.method == "GET" && req.path().contains("/manifests/")).then_some(Fault::Corrupt)
    });
    let src = format!("docker://{}/good/run:v1", corrupting.host());
    let out = lathe_reg(&["copy", &src, &dest_ref]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&src) && stderr(&out).contains("hashes to"),
        "{}",
        stderr(&out)
    );
    assert!(!dest.exists());

    // A short blob.
    let truncating = FaultProxy::start(reg.port, |req| {
        (req.method == "GET" && req.path().contains("/blobs/")).then_some(Fault::Truncate)
    });
    let src = format!("docker://{}/good/run:v1", truncating.host());
    let out = lathe_reg(&["copy", &src, &dest_ref]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(!dest.exists());

    // Unknown tag, unknown repository, unknown digest, and a malformed reference.
    for (reference, needle) in [
        (
            format!("docker://{host}/good/run:nope"),
            "no tag \"nope\" in repository good/run",
        ),
        (format!("docker://{host}/absent/repo:v1"), "absent/repo"),
        (
            format!("docker://{host}/good/run@sha256:{}", "0".repeat(64)),
            "no manifest sha256:0000",
        ),
    ] {
        let out = lathe_reg(&["copy", &reference, &dest_ref]);
        assert_eq!(out.status.code(), Some(1), "{reference}");
        assert!(
            stderr(&out).contains(&reference) && stderr(&out).contains(needle),
            "{}",
            stderr(&out)
        );
        assert!(!dest.exists());
    }
    let out = lathe_reg(&["copy", &format!("docker://{host}/Bad/Name:v1"), &dest_ref]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("Bad/Name"), "{}", stderr(&out));

    // Pushing by a digest that is not the image's.
    let wrong = format!("docker://{host}/good/other@sha256:{}", "1".repeat(64));
    let out = lathe_reg(&["copy", &fixture("run"), &wrong]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not the one the reference names"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn docker_schema2_lists_and_manifests_keep_their_type_and_digests() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    // skopeo converts the fixture index to a Docker manifest list with schema 2 children.
    let docker_ref = format!("docker://{host}/docker/run:v1");
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            &fixture("run"),
            &docker_ref,
        ],
    );
    let list_digest = skopeo_digest(&docker_ref, &["--tls-verify=false"]);
    let report = json(&ok(
        lathe_reg(&["inspect", "--json", &docker_ref]),
        "inspect list",
    ));
    assert_eq!(report["digest"], list_digest.as_str());
    assert_eq!(
        report["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    // Copied to another repository and into a layout, the list keeps its type and digest.
    let copy_ref = format!("docker://{host}/docker/copy:v1");
    let copied = json(&ok(
        lathe_reg(&["copy", "--json", &docker_ref, &copy_ref]),
        "copy list",
    ));
    assert_eq!(copied["digest"], list_digest.as_str());
    assert_eq!(
        skopeo_digest(&copy_ref, &["--tls-verify=false"]),
        list_digest
    );
    let tmp = scratch();
    let layout = format!("oci:{}:d", tmp.path().join("l").display());
    ok(lathe_reg(&["copy", &docker_ref, &layout]), "pull list");
    // (skopeo's oci: transport only reads OCI-typed refs, so lathe and the blob file check it.)
    let pulled = json(&ok(
        lathe_reg(&["inspect", "--json", &layout]),
        "inspect pulled list",
    ));
    assert_eq!(pulled["digest"], list_digest.as_str());
    let blob = tmp
        .path()
        .join("l/blobs/sha256")
        .join(list_digest.trim_start_matches("sha256:"));
    assert_eq!(
        format!("sha256:{}", sha256_hex(&std::fs::read(blob).unwrap())),
        list_digest
    );
    // One platform of it is a schema 2 manifest.
    let amd = json(&ok(
        lathe_reg(&[
            "copy",
            "--json",
            "--platform",
            "linux/amd64",
            &docker_ref,
            &format!("docker://{host}/docker/amd:v1"),
        ]),
        "copy one platform",
    ));
    assert_eq!(
        amd["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

/// The digest of the OCI layout image at `dir` (ref `x`), as skopeo reads it.
fn layout_digest(dir: &Path) -> String {
    skopeo_raw(&format!("oci:{}:x", dir.display())).0
}

#[test]
fn cnb_registry_auth_bearer_and_basic_against_token_and_htpasswd_registries() {
    let tmp = scratch();
    let (run_digest, _) = skopeo_raw(&fixture("run"));

    // Token auth: a Bearer value is sent as is, and the token server is never asked.
    let password = "cnb-t0ken-Pa55";
    let tokens = TokenServer::start(tmp.path(), "carol", password);
    let reg = TestRegistry::start(RegistryConfig {
        token: Some((tokens.realm(), tokens.cert.clone())),
        ..Default::default()
    });
    let host = reg.host();
    let target = format!("docker://{host}/ci/run:v1");
    let token = tokens.mint(&["repository:ci/run:pull,push"], 300);
    let basic = b64(&format!("carol:{password}"));
    let secrets = [password, basic.as_str(), token.as_str()];
    let bearer_auth = format!(r#"{{"{host}": "Bearer {token}"}}"#);
    let bearer = [("CNB_REGISTRY_AUTH", bearer_auth.as_str())];
    let before = tokens.requests.lock().unwrap().len();
    let report = json(&ok(
        lathe_traced(
            &["copy", "--json", &fixture("run"), &target],
            &bearer,
            &secrets,
        ),
        "push with a Bearer token",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    let pulled = tmp.path().join("bearer-pull");
    ok(
        lathe_traced(
            &["copy", &target, &format!("oci:{}:x", pulled.display())],
            &bearer,
            &secrets,
        ),
        "pull with a Bearer token",
    );
    assert_eq!(layout_digest(&pulled), run_digest);
    assert_eq!(
        tokens.requests.lock().unwrap().len(),
        before,
        "a Bearer token from CNB_REGISTRY_AUTH is used as is"
    );
    let creds = format!("carol:{password}");
    assert_eq!(
        skopeo_digest(&target, &["--tls-verify=false", "--creds", &creds]),
        run_digest
    );

    // A token for another repository: refused, clearly, with nothing written.
    let wrong_token = tokens.mint(&["repository:elsewhere/x:pull"], 300);
    let wrong_auth = format!(r#"{{"{host}": "Bearer {wrong_token}"}}"#);
    let denied = tmp.path().join("denied");
    let out = lathe_traced(
        &["copy", &target, &format!("oci:{}:x", denied.display())],
        &[("CNB_REGISTRY_AUTH", &wrong_auth)],
        &[&wrong_token],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&target) && stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(!denied.exists());

    // A Basic value is exchanged at the token realm, and wins over a config file's entry.
    let config_dir = tmp.path().join("docker-config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.json"),
        format!(
            r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
            b64("carol:not-the-password")
        ),
    )
    .unwrap();
    let basic_auth = format!(r#"{{"{host}": "Basic {basic}"}}"#);
    let before = tokens.issued();
    let basic_target = format!("docker://{host}/ci/basic:v1");
    let report = json(&ok(
        lathe_traced(
            &["copy", "--json", &fixture("run"), &basic_target],
            &[
                ("CNB_REGISTRY_AUTH", &basic_auth),
                ("DOCKER_CONFIG", config_dir.to_str().unwrap()),
            ],
            &secrets,
        ),
        "push with a Basic CNB_REGISTRY_AUTH to a token registry",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    assert!(
        tokens.issued() > before,
        "the credential went to the token realm"
    );

    // htpasswd over https: Basic works both ways; Bearer is refused without showing it.
    let ca = TestCa::create(&tmp.path().join("ca").tap_mkdir());
    let ht_password = "cnb-ht-Pa55word";
    let ht = TestRegistry::start(RegistryConfig {
        tls: Some((ca.server_cert.clone(), ca.server_key.clone())),
        htpasswd: Some(htpasswd(tmp.path(), "dave", ht_password)),
        ..Default::default()
    });
    let ht_host = ht.host();
    let ht_basic = b64(&format!("dave:{ht_password}"));
    let ht_secrets = [ht_password, ht_basic.as_str()];
    let ht_auth = format!(r#"{{"{ht_host}": "Basic {ht_basic}"}}"#);
    let ca_arg = ca.ca_cert.to_str().unwrap();
    let ht_target = format!("docker://{ht_host}/ci/run:v1");
    let report = json(&ok(
        lathe_traced(
            &[
                "--ca-cert",
                ca_arg,
                "copy",
                "--json",
                &fixture("run"),
                &ht_target,
            ],
            &[("CNB_REGISTRY_AUTH", &ht_auth)],
            &ht_secrets,
        ),
        "push with a Basic CNB_REGISTRY_AUTH to an htpasswd registry",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    let pulled = tmp.path().join("basic-pull");
    ok(
        lathe_traced(
            &[
                "--ca-cert",
                ca_arg,
                "copy",
                &ht_target,
                &format!("oci:{}:x", pulled.display()),
            ],
            &[("CNB_REGISTRY_AUTH", &ht_auth)],
            &ht_secrets,
        ),
        "pull with a Basic CNB_REGISTRY_AUTH from an htpasswd registry",
    );
    assert_eq!(layout_digest(&pulled), run_digest);
    let ht_bearer = format!(r#"{{"{ht_host}": "Bearer {token}"}}"#);
    let denied = tmp.path().join("ht-denied");
    let out = lathe_traced(
        &[
            "--ca-cert",
            ca_arg,
            "copy",
            &ht_target,
            &format!("oci:{}:x", denied.display()),
        ],
        &[("CNB_REGISTRY_AUTH", &ht_bearer)],
        &[&token],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(!denied.exists());
}

/// Creates the directory and gives it back.
trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// A fake `docker-credential-NAME` in `dir`: `get` answers `user`/`secret` for `server` and
/// "credentials not found" (exit 1) for any other, and appends every server it is asked
/// about to `dir/NAME.log`, which is returned.
fn credential_helper(dir: &Path, name: &str, server: &str, user: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        r#"#!/bin/sh
[ "$1" = get ] || exit 2
server=$(cat)
printf '%s\n' "$server" >> '{log}'
if [ "$server" = '{server}' ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\n' "$server"
else
  echo 'credentials not found in native keychain'
  exit 1
fi
"#,
        log = log.display()
    );
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    log
}

fn asked(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn docker_config_cred_helpers_and_creds_store_run_docker_credential_helpers() {
    let tmp = scratch();
    let bin = tmp.path().join("bin").tap_mkdir();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let (run_digest, _) = skopeo_raw(&fixture("run"));

    // An htpasswd registry over https, a token registry, and an open one.
    let ca = TestCa::create(&tmp.path().join("ca").tap_mkdir());
    let ca_arg = ca.ca_cert.to_str().unwrap();
    let ht_password = "helper-ht-Pa55";
    let ht = TestRegistry::start(RegistryConfig {
        tls: Some((ca.server_cert.clone(), ca.server_key.clone())),
        htpasswd: Some(htpasswd(tmp.path(), "erin", ht_password)),
        ..Default::default()
    });
    let tok_password = "helper-t0ken-Pa55";
    let tokens = TokenServer::start(tmp.path(), "frank", tok_password);
    let tok = TestRegistry::start(RegistryConfig {
        token: Some((tokens.realm(), tokens.cert.clone())),
        ..Default::default()
    });
    let open = TestRegistry::start(RegistryConfig::default());
    let secrets = [
        ht_password,
        tok_password,
        &b64(&format!("erin:{ht_password}")),
        &b64(&format!("frank:{tok_password}")),
    ]
    .map(str::to_string);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let ht_log = credential_helper(&bin, "lathe-ht", &ht.host(), "erin", ht_password);
    let store_log = credential_helper(&bin, "lathe-store", &tok.host(), "frank", tok_password);

    // credHelpers in the default config.json ($DOCKER_CONFIG): the helper for that registry.
    let config_dir = tmp.path().join("docker-config").tap_mkdir();
    std::fs::write(
        config_dir.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{}}}}, "credHelpers": {{"{}": "lathe-ht", "other.example": "lathe-absent"}}}}"#,
            ht.host(),
            ht.host()
        ),
    )
    .unwrap();
    let default_config = [
        ("DOCKER_CONFIG", config_dir.to_str().unwrap()),
        ("PATH", &path),
    ];
    let ht_target = format!("docker://{}/helped/run:v1", ht.host());
    let report = json(&ok(
        lathe_traced(
            &[
                "--ca-cert",
                ca_arg,
                "copy",
                "--json",
                &fixture("run"),
                &ht_target,
            ],
            &default_config,
            &secrets,
        ),
        "push with a credHelpers helper",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    assert_eq!(asked(&ht_log), [ht.host()], "asked once, for its registry");
    let pulled = tmp.path().join("ht-pull");
    ok(
        lathe_traced(
            &[
                "--ca-cert",
                ca_arg,
                "copy",
                &ht_target,
                &format!("oci:{}:x", pulled.display()),
            ],
            &default_config,
            &secrets,
        ),
        "pull with a credHelpers helper",
    );
    assert_eq!(layout_digest(&pulled), run_digest);

    // credsStore in an --authfile: the store's credential is exchanged at the token realm;
    // for a registry the store does not know, lathe goes on anonymously.
    let authfile = tmp.path().join("store.json");
    std::fs::write(&authfile, r#"{"credsStore": "lathe-store"}"#).unwrap();
    let authfile_arg = authfile.to_str().unwrap();
    let tok_target = format!("docker://{}/stored/run:v1", tok.host());
    let before = tokens.issued();
    let report = json(&ok(
        lathe_traced(
            &[
                "--authfile",
                authfile_arg,
                "copy",
                "--json",
                &fixture("run"),
                &tok_target,
            ],
            &[("PATH", &path)],
            &secrets,
        ),
        "push with a credsStore helper",
    ));
    assert_eq!(report["digest"], run_digest.as_str());
    assert!(tokens.issued() > before);
    let open_target = format!("docker://{}/public/run:v1", open.host());
    ok(
        lathe_traced(
            &[
                "--authfile",
                authfile_arg,
                "copy",
                &fixture("run"),
                &open_target,
            ],
            &[("PATH", &path)],
            &secrets,
        ),
        "push to a registry the store has nothing for",
    );
    assert_eq!(asked(&store_log), [tok.host(), open.host()]);

    // A helper that is not on PATH: an error naming it, exit 1, nothing written anywhere.
    let missing = tmp.path().join("missing.json");
    std::fs::write(
        &missing,
        format!(
            r#"{{"credHelpers": {{"{}": "lathe-absent"}}}}"#,
            open.host()
        ),
    )
    .unwrap();
    let dest = tmp.path().join("not-written");
    for args in [
        vec![
            "copy".to_string(),
            format!("docker://{}/public/run:v1", open.host()),
            format!("oci:{}:x", dest.display()),
        ],
        vec![
            "copy".to_string(),
            fixture("run"),
            format!("docker://{}/public/absent:v1", open.host()),
        ],
    ] {
        let mut full = vec!["--authfile", missing.to_str().unwrap()];
        full.extend(args.iter().map(String::as_str));
        let out = lathe_traced(&full, &[("PATH", &path)], &secrets);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("docker-credential-lathe-absent")
                && stderr(&out).contains("not on PATH")
                && stderr(&out).contains(missing.to_str().unwrap()),
            "{}",
            stderr(&out)
        );
    }
    assert!(!dest.exists());
    let out = lathe_reg(&[
        "inspect",
        &format!("docker://{}/public/absent:v1", open.host()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not exist") || stderr(&out).contains("no tag"),
        "{}",
        stderr(&out)
    );

    // A helper that fails: named, and its output (which may hold a secret) is not shown.
    use std::os::unix::fs::PermissionsExt;
    let broken = bin.join("docker-credential-lathe-broken");
    std::fs::write(
        &broken,
        format!("#!/bin/sh\ncat >/dev/null\necho 'leaked {ht_password}'\necho 'err {ht_password}' >&2\nexit 3\n"),
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&missing, r#"{"credsStore": "lathe-broken"}"#).unwrap();
    let out = lathe_traced(
        &[
            "--authfile",
            missing.to_str().unwrap(),
            "copy",
            &format!("docker://{}/public/run:v1", open.host()),
            &format!("oci:{}:x", dest.display()),
        ],
        &[("PATH", &path)],
        &secrets,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("docker-credential-lathe-broken") && stderr(&out).contains("failed"),
        "{}",
        stderr(&out)
    );
    assert!(!dest.exists());
}

/// Runs lathe in a private mount namespace (in a user namespace, so no privilege is needed)
/// where `replacement` is bind-mounted over the directory `over`: how the tests put files in
/// the fixed certs.d locations (`/etc/containers/certs.d`, `/etc/docker/certs.d`) without
/// touching the host's.
fn lathe_with_dir_over(
    over: &Path,
    replacement: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let empty = scratch();
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(replacement)
        .arg(over)
        .arg(lathe_bin())
        .args(args);
    clean_registry_env(&mut cmd, empty.path(), env);
    cmd.output().expect("run unshare")
}

#[test]
fn a_ca_in_certs_d_makes_an_https_registry_trusted() {
    let tmp = scratch();
    let ca = TestCa::create(&tmp.path().join("ca").tap_mkdir());
    let password = "certs-d-Pa55";
    let reg = TestRegistry::start(RegistryConfig {
        tls: Some((ca.server_cert.clone(), ca.server_key.clone())),
        htpasswd: Some(htpasswd(tmp.path(), "gina", password)),
        ..Default::default()
    });
    let host = reg.host();
    let creds = format!("gina:{password}");
    let secrets = [password, &b64(&creds)].map(str::to_string);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let (run_digest, _) = skopeo_raw(&fixture("run"));
    let target = format!("docker://{host}/certsd/run:v1");

    // A directory holding certs.d/<host:port>/ca.crt, mounted over /etc/containers.
    let containers = tmp.path().join("etc-containers").tap_mkdir();
    let host_dir = containers.join("certs.d").join(&host).tap_mkdir();
    let push = |over: &Path, replacement: &Path, target: &str| {
        let out = lathe_with_dir_over(
            over,
            replacement,
            &[
                "--creds",
                &creds,
                "-vv",
                "copy",
                "--json",
                &fixture("run"),
                target,
            ],
            &[("LATHE_LOG", "trace")],
        );
        assert_secret_free(&out, &secrets, "push trusting certs.d");
        out
    };

    // Without the CA (a certs.d entry for another port), the certificate is refused.
    let other = containers.join("certs.d").join("127.0.0.1:1").tap_mkdir();
    std::fs::copy(&ca.ca_cert, other.join("ca.crt")).unwrap();
    let out = push(Path::new("/etc/containers"), &containers, &target);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));

    std::fs::copy(&ca.ca_cert, host_dir.join("ca.crt")).unwrap();
    let out = push(Path::new("/etc/containers"), &containers, &target);
    assert!(
        !stderr(&out).contains("plain http"),
        "https was used: {}",
        stderr(&out)
    );
    let report = json(&ok(out, "push trusting /etc/containers/certs.d"));
    assert_eq!(report["digest"], run_digest.as_str());
    assert_eq!(
        skopeo_digest(
            &target,
            &["--cert-dir", host_dir.to_str().unwrap(), "--creds", &creds]
        ),
        run_digest
    );

    // The same through /etc/docker/certs.d, where the host has that directory.
    if Path::new("/etc/docker").is_dir() {
        let docker = tmp.path().join("etc-docker").tap_mkdir();
        let dir = docker.join("certs.d").join(&host).tap_mkdir();
        std::fs::copy(&ca.ca_cert, dir.join("ca.crt")).unwrap();
        let target = format!("docker://{host}/certsd/docker:v1");
        let out = push(Path::new("/etc/docker"), &docker, &target);
        ok(out, "push trusting /etc/docker/certs.d");
    } else {
        eprintln!("no /etc/docker here: only /etc/containers/certs.d was tested");
    }
}

/// Pushes and pulls the run image through a proxy that holds every answer back for a while,
/// so that each takes several token lifetimes, against a token server whose tokens the
/// registry accepts for `life.valid` seconds. Returns the token server, the proxy's log
/// (push then pull) and the time each took.
fn slow_push_and_pull_with(life: TokenLife) -> (TokenServer, Vec<Seen>, Duration, Duration) {
    let tmp = scratch();
    let password = "exp1ry-Pa55word";
    let tokens = TokenServer::start_with(tmp.path(), "hank", password, life);
    let reg = TestRegistry::start(RegistryConfig {
        token: Some((tokens.realm(), tokens.cert.clone())),
        ..Default::default()
    });
    let proxy = FaultProxy::start(reg.port, |req| {
        (req.path() != "/v2/").then_some(Fault::Stall(Duration::from_millis(800)))
    });
    let creds = format!("hank:{password}");
    let secrets = [password, &b64(&creds)].map(str::to_string);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let target = format!("docker://{}/slow/run:v1", proxy.host());
    let (run_digest, _) = skopeo_raw(&fixture("run"));

    let started = std::time::Instant::now();
    let report = json(&ok(
        lathe_traced(
            &[
                "--creds",
                &creds,
                "copy",
                "--json",
                &fixture("run"),
                &target,
            ],
            &[],
            &secrets,
        ),
        "slow push with short-lived tokens",
    ));
    let push_time = started.elapsed();
    assert_eq!(report["digest"], run_digest.as_str());

    let pulled = tmp.path().join("pulled");
    let started = std::time::Instant::now();
    ok(
        lathe_traced(
            &[
                "--creds",
                &creds,
                "copy",
                &target,
                &format!("oci:{}:x", pulled.display()),
            ],
            &[],
            &secrets,
        ),
        "slow pull with short-lived tokens",
    );
    let pull_time = started.elapsed();
    assert_eq!(layout_digest(&pulled), run_digest);
    let seen = proxy.seen();
    eprintln!(
        "push {push_time:?}, pull {pull_time:?}: {} requests, {} tokens, {} refused",
        seen.len(),
        tokens.issued(),
        unauthorized(&seen)
    );
    (tokens, seen, push_time, pull_time)
}

/// 401 answers to anything but the first ping.
fn unauthorized(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| s.status == Some(401) && s.path() != "/v2/")
        .count()
}

#[test]
fn tokens_are_renewed_before_they_expire_during_a_long_push_and_pull() {
    // The token server says 2 s; the registry would take them for 5.
    let (tokens, seen, push, pull) = slow_push_and_pull_with(TokenLife {
        valid: 5,
        expires_in: 2,
    });
    assert!(
        push > Duration::from_secs(4) && pull > Duration::from_secs(2),
        "push {push:?}, pull {pull:?}: not long enough to need renewals"
    );
    let issued = tokens.issued();
    let lifetimes = (push + pull).as_secs_f64() / 2.0;
    assert!(
        issued as f64 >= lifetimes,
        "{issued} tokens over {lifetimes:.1} token lifetimes"
    );
    // Each token serves until 1.5 s (three quarters of its 2 s) have passed, not less.
    let most = ((push + pull).as_secs_f64() / 1.5).floor() as usize + 2;
    assert!(
        issued <= most,
        "{issued} tokens: more than {most} means waste"
    );
    assert_eq!(
        unauthorized(&seen),
        0,
        "renewed before expiry, so the registry never refused one: {seen:?}"
    );
}

#[test]
fn a_token_the_registry_rejects_as_expired_is_replaced_and_the_push_goes_on() {
    // The token server promises 300 s, but the registry rejects its tokens after 3: only the
    // registry's 401 (with a new challenge) tells lathe to fetch another.
    let (tokens, seen, push, pull) = slow_push_and_pull_with(TokenLife {
        valid: 3,
        expires_in: 300,
    });
    assert!(
        push > Duration::from_secs(4),
        "push {push:?}, pull {pull:?}: not long enough for a token to expire"
    );
    assert!(unauthorized(&seen) >= 1, "no token expired: {seen:?}");
    assert!(
        tokens.issued() >= 3,
        "{} tokens: one per push or pull would mean no renewal",
        tokens.issued()
    );
}
