//! What is attached to an image crosses with it: a cosign-style `.sig` tag and OCI 1.1
//! referrers (SBOMs whose `subject` is the image or one of its platforms), put on a fixture
//! index in an OCI layout, go to Debian's docker-registry (which has no referrers API, so the
//! `sha256-<hex>` fallback tags are kept), from there to an oci-archive and back to another
//! repository, with the same digests everywhere, as skopeo and raw HTTP GETs see them.
//! `--no-attachments` carries none, and a copy of some platforms carries only theirs. Debian
//! has no registry with the referrers API, so a proxy gives docker-registry one (answered, a
//! page at a time, from the fallback tags it then hides) to check that lathe reads through
//! the API and keeps no fallback tags where the API is.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use lathe::attachments::referrer_descriptor;
use lathe::content::{canonical_json, sha256_digest};
use lathe::layout::Transaction;
use oci_spec::image::{Descriptor, MediaType};
use registry_support::*;
use serde_json::{Value, json};

const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SPDX: &str = "application/spdx+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A descriptor as JSON: media type, digest and size.
fn plain(desc: &Value) -> Value {
    json!({"mediaType": desc["mediaType"], "digest": desc["digest"], "size": desc["size"]})
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// The image and what is attached to it in a source layout.
struct Attached {
    /// `oci:DIR:run`.
    reference: String,
    /// The index and its platform manifests.
    root: String,
    amd64: String,
    arm64: String,
    /// The cosign-style signature of the index, under `sha256-<root>.sig`.
    signature: String,
    /// The SBOM referrer of the index (unnamed in index.json), and the signature on it
    /// (its own `.sig` tag).
    sbom: String,
    sbom_signature: String,
    /// SBOM referrers of each platform: amd64's listed by the fallback tag
    /// `sha256-<amd64>` only, arm64's unnamed in index.json.
    amd64_sbom: String,
    arm64_sbom: String,
}

struct Writer {
    tx: Transaction,
}

impl Writer {
    fn blob(&mut self, bytes: &[u8], media_type: &str) -> Value {
        let desc = self
            .tx
            .write_bytes(bytes, MediaType::from(media_type))
            .unwrap();
        serde_json::to_value(desc).unwrap()
    }

    fn manifest(&mut self, manifest: &Value) -> (Descriptor, Vec<u8>) {
        let bytes = canonical_json(manifest);
        let desc = self
            .tx
            .write_bytes(
                &bytes,
                MediaType::from(manifest["mediaType"].as_str().unwrap()),
            )
            .unwrap();
        (desc, bytes)
    }

    /// A cosign-style signature of `subject`: a manifest whose one layer is the simple-signing
    /// payload, with the signature in the layer's annotation.
    fn signature(&mut self, subject: &str, marker: &str) -> Descriptor {
        let payload = canonical_json(&json!({
            "critical": {
                "identity": {"docker-reference": "registry.example/app"},
                "image": {"docker-manifest-digest": subject},
                "type": "cosign container image signature"
            },
            "optional": {"marker": marker}
        }));
        let mut layer = self.blob(&payload, SIMPLESIGNING);
        layer["annotations"] =
            json!({"dev.cosignproject.cosign/signature": format!("MEUCIQ{marker}==")});
        let config = canonical_json(&json!({
            "architecture": "", "os": "", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&payload).to_string()]}
        }));
        let config = self.blob(&config, "application/vnd.oci.image.config.v1+json");
        self.manifest(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [layer]
        }))
        .0
    }

    /// An OCI 1.1 artifact of `artifact_type` whose subject is `subject`; returns its
    /// descriptor as a referrers list gives it (with its artifactType).
    fn referrer(&mut self, subject: &Value, artifact_type: &str, body: &str) -> Descriptor {
        let empty = self.blob(b"{}", EMPTY);
        let layer = self.blob(body.as_bytes(), artifact_type);
        let (desc, bytes) = self.manifest(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": empty,
            "layers": [layer],
            "subject": plain(subject),
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
        }));
        referrer_descriptor(&desc, &bytes)
    }
}

fn index_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

fn entry(index: &Value, name: &str) -> Value {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no entry {name} in {index}"))
        .clone()
}

/// The fixture run index copied to `dir` (ref `run`), with a signature and SBOMs attached.
fn attached_layout(dir: &Path) -> Attached {
    lathe_ok(&[
        "copy",
        &format!("oci:{}:run", fixtures().display()),
        &format!("oci:{}:run", dir.display()),
    ]);
    let index = index_json(dir);
    let (root, amd64, arm64) = (
        entry(&index, "run"),
        entry(&index, "run-linux-amd64"),
        entry(&index, "run-linux-arm64"),
    );
    let digest = |d: &Value| d["digest"].as_str().unwrap().to_string();
    let mut w = Writer {
        tx: Transaction::begin(dir).unwrap(),
    };
    let signature = w.signature(&digest(&root), "root");
    let sbom = w.referrer(&root, SPDX, r#"{"spdxVersion":"SPDX-2.3","name":"run"}"#);
    let sbom_signature = w.signature(sbom.digest().as_ref(), "sbom");
    let amd64_sbom = w.referrer(&amd64, SPDX, r#"{"spdxVersion":"SPDX-2.3","name":"amd64"}"#);
    let arm64_sbom = w.referrer(&arm64, SPDX, r#"{"spdxVersion":"SPDX-2.3","name":"arm64"}"#);
    let (amd64_fallback, _) = w.manifest(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [serde_json::to_value(&amd64_sbom).unwrap()]
    }));
    let refs = vec![
        (
            format!("sha256-{}.sig", hex(&digest(&root))),
            signature.clone(),
        ),
        (
            format!("sha256-{}.sig", hex(sbom.digest().as_ref())),
            sbom_signature.clone(),
        ),
        (format!("sha256-{}", hex(&digest(&amd64))), amd64_fallback),
    ];
    w.tx.commit_with_unnamed(&refs, &[sbom.clone(), arm64_sbom.clone()])
        .unwrap();
    Attached {
        reference: format!("oci:{}:run", dir.display()),
        root: digest(&root),
        amd64: digest(&amd64),
        arm64: digest(&arm64),
        signature: signature.digest().to_string(),
        sbom: sbom.digest().to_string(),
        sbom_signature: sbom_signature.digest().to_string(),
        amd64_sbom: amd64_sbom.digest().to_string(),
        arm64_sbom: arm64_sbom.digest().to_string(),
    }
}

/// A GET (or HEAD) to the registry over plain HTTP: the status and the body.
fn http(method: &str, host: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, answer[split + 4..].to_vec())
}

/// A manifest or index by tag or digest, raw: its digest and parsed JSON; `None` for a 404.
fn get_manifest(host: &str, repo: &str, reference: &str) -> Option<(String, Value)> {
    let accept = format!(
        "{OCI_INDEX}, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    );
    let (status, body) = http(
        "GET",
        host,
        &format!("/v2/{repo}/manifests/{reference}"),
        &accept,
    );
    match status {
        200 => Some((
            format!("sha256:{}", sha256_hex(&body)),
            serde_json::from_slice(&body).unwrap(),
        )),
        404 => None,
        other => panic!("GET {repo}:{reference}: {other}"),
    }
}

/// The digests, with their artifactType, that the fallback tag of `subject` lists.
fn fallback_listing(host: &str, repo: &str, subject: &str) -> BTreeSet<(String, String)> {
    let (_, index) = get_manifest(host, repo, &format!("sha256-{}", hex(subject)))
        .unwrap_or_else(|| panic!("{repo} has no fallback tag for {subject}"));
    assert_eq!(index["mediaType"], OCI_INDEX);
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_string(),
                d["artifactType"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn skopeo_digest_of(reference: &str) -> String {
    let raw = tool(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", reference],
    );
    format!("sha256:{}", sha256_hex(raw.as_bytes()))
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// (digest, subject, tag) of each attachment a `--json` copy reports.
fn carried(report: &Value) -> BTreeSet<(String, String, String)> {
    report["attachments"]
        .as_array()
        .unwrap_or_else(|| panic!("no attachments list in {report}"))
        .iter()
        .map(|a| {
            (
                a["digest"].as_str().unwrap().to_string(),
                a["subject"].as_str().unwrap().to_string(),
                a["tag"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn sig_tag(digest: &str) -> String {
    format!("sha256-{}.sig", hex(digest))
}

/// Checks that repository `repo` holds the image and everything attached to it, as pushed.
fn assert_repository_has_all(host: &str, repo: &str, a: &Attached) {
    assert_eq!(
        skopeo_digest_of(&format!("docker://{host}/{repo}:v1")),
        a.root
    );
    assert_eq!(
        skopeo_digest_of(&format!("docker://{host}/{repo}:{}", sig_tag(&a.root))),
        a.signature,
        "{repo}: the .sig tag"
    );
    assert_eq!(
        get_manifest(host, repo, &sig_tag(&a.sbom)).map(|(d, _)| d),
        Some(a.sbom_signature.clone()),
        "{repo}: the signature on the SBOM"
    );
    assert!(
        fallback_listing(host, repo, &a.root).contains(&(a.sbom.clone(), SPDX.to_string())),
        "{repo}: the fallback tag lists the SBOM with its artifactType"
    );
    for (platform, sbom) in [(&a.amd64, &a.amd64_sbom), (&a.arm64, &a.arm64_sbom)] {
        assert_eq!(
            fallback_listing(host, repo, platform),
            BTreeSet::from([(sbom.clone(), SPDX.to_string())])
        );
    }
    // The SBOM came byte for byte: its subject still names the index.
    let (digest, sbom) = get_manifest(host, repo, &a.sbom).unwrap();
    assert_eq!(digest, a.sbom);
    assert_eq!(sbom["subject"]["digest"], a.root.as_str());
    // And the signature's blobs are there.
    let (_, signature) = get_manifest(host, repo, &a.signature).unwrap();
    for blob in std::iter::once(&signature["config"]).chain(signature["layers"].as_array().unwrap())
    {
        let path = format!("/v2/{repo}/blobs/{}", blob["digest"].as_str().unwrap());
        assert_eq!(http("HEAD", host, &path, "*/*").0, 200, "{path}");
    }
}

#[test]
fn attachments_cross_registry_archive_and_back_with_the_same_digests() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let tmp = scratch();
    let a = attached_layout(&tmp.path().join("src"));
    let everything = BTreeSet::from([
        (a.signature.clone(), a.root.clone(), sig_tag(&a.root)),
        (a.sbom.clone(), a.root.clone(), String::new()),
        (a.sbom_signature.clone(), a.sbom.clone(), sig_tag(&a.sbom)),
        (a.amd64_sbom.clone(), a.amd64.clone(), String::new()),
        (a.arm64_sbom.clone(), a.arm64.clone(), String::new()),
    ]);

    // Layout to registry. docker-registry 2.8 has no referrers API: the fallback tags it is.
    let out = lathe_ok(&[
        "copy",
        "--json",
        &a.reference,
        &format!("docker://{host}/a:v1"),
    ]);
    let report = json_of(&out);
    assert_eq!(report["digest"], a.root.as_str());
    assert_eq!(carried(&report), everything);
    let sbom_report = report["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["digest"] == a.sbom.as_str())
        .unwrap();
    assert_eq!(sbom_report["artifactType"], SPDX);
    assert_eq!(
        http(
            "GET",
            &host,
            &format!("/v2/a/referrers/{}", a.root),
            OCI_INDEX
        )
        .0,
        404,
        "the test registry lacks the referrers API"
    );
    assert_repository_has_all(&host, "a", &a);

    // Registry to an oci-archive: cosign tags become ref names, referrers unnamed entries.
    let archive = tmp.path().join("run.tar");
    let out = lathe_ok(&[
        "copy",
        "--json",
        &format!("docker://{host}/a:v1"),
        &format!("oci-archive:{}:run", archive.display()),
    ]);
    assert_eq!(carried(&json_of(&out)), everything);
    assert_eq!(
        skopeo_digest_of(&format!(
            "oci-archive:{}:{}",
            archive.display(),
            sig_tag(&a.root)
        )),
        a.signature
    );
    let index: Value = serde_json::from_str(&tool(
        "tar",
        &["-xOf", archive.to_str().unwrap(), "index.json"],
    ))
    .unwrap();
    let unnamed: BTreeSet<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"].is_null())
        .map(|m| {
            (
                m["digest"].as_str().unwrap().to_string(),
                m["artifactType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        unnamed,
        BTreeSet::from([
            (a.sbom.clone(), SPDX.to_string()),
            (a.amd64_sbom.clone(), SPDX.to_string()),
            (a.arm64_sbom.clone(), SPDX.to_string()),
        ])
    );

    // Repository b already has someone else's referrer of the index in its fallback tag.
    let other = tmp.path().join("other");
    lathe_ok(&[
        "copy",
        "--no-attachments",
        &a.reference,
        &format!("oci:{}:run", other.display()),
    ]);
    let mut w = Writer {
        tx: Transaction::begin(&other).unwrap(),
    };
    let root_entry = entry(&index_json(&other), "run");
    let attestation = w.referrer(
        &root_entry,
        IN_TOTO,
        r#"{"_type":"https://in-toto.io/Statement/v1"}"#,
    );
    w.tx.commit_with_unnamed(&[], std::slice::from_ref(&attestation))
        .unwrap();
    let out = lathe_ok(&[
        "copy",
        "--json",
        &format!("oci:{}:run", other.display()),
        &format!("docker://{host}/b:v1"),
    ]);
    assert_eq!(
        carried(&json_of(&out)),
        BTreeSet::from([(
            attestation.digest().to_string(),
            a.root.clone(),
            String::new()
        )])
    );

    // The archive back to the registry: everything again, and the fallback tag keeps theirs.
    let out = lathe_ok(&[
        "copy",
        "--json",
        &format!("oci-archive:{}:run", archive.display()),
        &format!("docker://{host}/b:v1"),
    ]);
    assert_eq!(carried(&json_of(&out)), everything);
    assert_repository_has_all(&host, "b", &a);
    assert_eq!(
        fallback_listing(&host, "b", &a.root),
        BTreeSet::from([
            (attestation.digest().to_string(), IN_TOTO.to_string()),
            (a.sbom.clone(), SPDX.to_string()),
        ])
    );

    // And into a layout, twice: the unnamed referrer entries are not repeated, and the
    // layout's one image is still what `oci:DIR` names.
    let back = tmp.path().join("back");
    for _ in 0..2 {
        lathe_ok(&[
            "copy",
            &format!("docker://{host}/b:v1"),
            &format!("oci:{}:run", back.display()),
        ]);
    }
    let entries = index_json(&back)["manifests"].as_array().unwrap().clone();
    let digests: Vec<&str> = entries
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&&str> = digests.iter().collect();
    assert_eq!(digests.len(), unique.len(), "{entries:?}");
    // run, its two platforms, two .sig tags, and four referrers (theirs included).
    assert_eq!(entries.len(), 9, "{entries:?}");
    let inspected = json_of(&lathe_ok(&[
        "inspect",
        "--json",
        &format!("oci:{}", back.display()),
    ]));
    assert_eq!(inspected["digest"], a.root.as_str(), "{inspected}");
    assert_eq!(
        skopeo_digest_of(&format!("oci:{}:{}", back.display(), sig_tag(&a.root))),
        a.signature
    );
}

#[test]
fn no_attachments_copies_none() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let tmp = scratch();
    let a = attached_layout(&tmp.path().join("src"));
    let out = lathe_ok(&[
        "copy",
        "--json",
        "--no-attachments",
        &a.reference,
        &format!("docker://{host}/c:v1"),
    ]);
    let report = json_of(&out);
    assert_eq!(report["digest"], a.root.as_str());
    assert_eq!(report["attachments"], json!([]));
    assert_eq!(skopeo_digest_of(&format!("docker://{host}/c:v1")), a.root);
    for digest in [&a.root, &a.amd64, &a.arm64, &a.sbom] {
        for tag in [sig_tag(digest), format!("sha256-{}", hex(digest))] {
            assert_eq!(get_manifest(&host, "c", &tag), None, "c:{tag}");
        }
    }
    for digest in [&a.signature, &a.sbom, &a.amd64_sbom] {
        assert_eq!(get_manifest(&host, "c", digest), None, "c@{digest}");
    }

    let layout = tmp.path().join("plain");
    lathe_ok(&[
        "copy",
        "--no-attachments",
        &a.reference,
        &format!("oci:{}:run", layout.display()),
    ]);
    let names: BTreeSet<String> = index_json(&layout)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap_or("(unnamed)")
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "run".into(),
            "run-linux-amd64".into(),
            "run-linux-arm64".into()
        ])
    );
}

#[test]
fn a_copy_of_some_platforms_carries_only_their_attachments() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let tmp = scratch();
    let a = attached_layout(&tmp.path().join("src"));

    let out = lathe_ok(&[
        "copy",
        "--json",
        "--platform",
        "linux/amd64",
        &a.reference,
        &format!("docker://{host}/d:v1"),
    ]);
    let report = json_of(&out);
    assert_eq!(report["digest"], a.amd64.as_str());
    assert_eq!(
        carried(&report),
        BTreeSet::from([(a.amd64_sbom.clone(), a.amd64.clone(), String::new())])
    );
    assert_eq!(
        fallback_listing(&host, "d", &a.amd64),
        BTreeSet::from([(a.amd64_sbom.clone(), SPDX.to_string())])
    );
    for digest in [&a.root, &a.arm64] {
        for tag in [sig_tag(digest), format!("sha256-{}", hex(digest))] {
            assert_eq!(get_manifest(&host, "d", &tag), None, "d:{tag}");
        }
    }
    for digest in [&a.signature, &a.sbom, &a.arm64_sbom] {
        assert_eq!(get_manifest(&host, "d", digest), None, "d@{digest}");
    }

    // Attachments go by digest: both platforms of this two-platform index give the index
    // back byte for byte, and with it everything attached to it.
    let out = lathe_ok(&[
        "copy",
        "--json",
        "--platform",
        "linux/amd64,linux/arm64",
        &a.reference,
        &format!("oci-archive:{}:run", tmp.path().join("two.tar").display()),
    ]);
    let report = json_of(&out);
    assert_eq!(report["digest"], a.root.as_str());
    assert_eq!(carried(&report).len(), 5, "{report}");

    // A docker-archive holds one image and nothing else: lathe says what it left behind.
    let out = lathe(&[
        "copy",
        "--json",
        "--platform",
        "linux/arm64",
        &a.reference,
        &format!("docker-archive:{}", tmp.path().join("arm64.tar").display()),
    ]);
    assert!(out.status.success(), "{}", common::report(&out));
    let report = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["attachments"], json!([]));
    assert!(
        report["note"]
            .as_str()
            .is_some_and(|n| n.contains("1 attachments") && n.contains("holds images only")),
        "{report}"
    );
}

/// docker-registry on `upstream` with the OCI referrers API in front of it, behaving as a
/// registry that has the API: `GET /v2/<repo>/referrers/<digest>` is answered one descriptor a
/// page, with `Link: rel="next"`, from what the registry keeps under the fallback tag, and the
/// fallback tags themselves are hidden (such a registry keeps none). Everything else is
/// relayed. Returns the server and the referrers requests it answered.
fn referrers_api_proxy(upstream: u16) -> (Server, Arc<Mutex<Vec<String>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let server = Server::start(move |req, conn| {
        let path = req.path().to_string();
        if req.method == "GET"
            && let Some((repo, subject)) = path
                .strip_prefix("/v2/")
                .and_then(|p| p.split_once("/referrers/"))
        {
            log.lock().unwrap().push(req.target.clone());
            let fallback = Request {
                method: "GET".into(),
                target: format!("/v2/{repo}/manifests/sha256-{}", hex(subject)),
                headers: vec![
                    ("Host".into(), format!("127.0.0.1:{upstream}")),
                    ("Accept".into(), OCI_INDEX.into()),
                ],
                body: vec![],
            };
            let (head, body) = forward(upstream, &fallback).unwrap();
            let listed: Vec<Value> = match head.split_whitespace().nth(1) {
                Some("200") => {
                    let index: Value = serde_json::from_slice(&body).unwrap();
                    index["manifests"].as_array().unwrap().clone()
                }
                Some("404") => vec![],
                _ => panic!("the registry answered {head}"),
            };
            let page: usize = req.query("page").first().map_or(0, |p| p.parse().unwrap());
            let mut headers = vec![("Content-Type", OCI_INDEX.to_string())];
            if page + 1 < listed.len() {
                headers.push((
                    "Link",
                    format!(
                        "</v2/{repo}/referrers/{subject}?page={}>; rel=\"next\"",
                        page + 1
                    ),
                ));
            }
            let answer = json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": listed.get(page).into_iter().collect::<Vec<_>>()
            });
            write_response(
                conn,
                "200 OK",
                &headers,
                &serde_json::to_vec(&answer).unwrap(),
            );
            return;
        }
        let is_fallback_tag = path.rsplit_once("/manifests/").is_some_and(|(_, tag)| {
            tag.strip_prefix("sha256-")
                .is_some_and(|h| h.len() == 64 && !h.contains('.'))
        });
        if is_fallback_tag && (req.method == "GET" || req.method == "HEAD") {
            let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
            write_response(conn, "404 Not Found", &[], body);
            return;
        }
        let Some((head, body)) = forward(upstream, &req) else {
            return;
        };
        let mut out = head
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                !l.starts_with("content-length:") && !l.starts_with("connection:")
            })
            .collect::<Vec<_>>()
            .join("\r\n");
        out += &format!(
            "\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(out.as_bytes());
        if req.method != "HEAD" {
            let _ = conn.write_all(&body);
        }
    });
    (server, asked)
}

#[test]
fn a_registry_with_the_referrers_api_is_read_through_it_and_gets_no_fallback_tags() {
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let (proxy, asked) = referrers_api_proxy(reg.port);
    let api_host = format!("127.0.0.1:{}", proxy.port);
    let tmp = scratch();
    let src = tmp.path().join("src");
    let a = attached_layout(&src);
    // A second referrer of the index, so that the API lists it in two pages.
    let mut w = Writer {
        tx: Transaction::begin(&src).unwrap(),
    };
    let attestation = w.referrer(
        &entry(&index_json(&src), "run"),
        IN_TOTO,
        r#"{"_type":"https://in-toto.io/Statement/v1"}"#,
    );
    w.tx.commit_with_unnamed(&[], std::slice::from_ref(&attestation))
        .unwrap();
    let everything = BTreeSet::from([
        (a.signature.clone(), a.root.clone(), sig_tag(&a.root)),
        (a.sbom.clone(), a.root.clone(), String::new()),
        (
            attestation.digest().to_string(),
            a.root.clone(),
            String::new(),
        ),
        (a.sbom_signature.clone(), a.sbom.clone(), sig_tag(&a.sbom)),
        (a.amd64_sbom.clone(), a.amd64.clone(), String::new()),
        (a.arm64_sbom.clone(), a.arm64.clone(), String::new()),
    ]);

    // Pushed to the registry itself (no API): fallback tags.
    lathe_ok(&["copy", &a.reference, &format!("docker://{host}/a:v1")]);
    assert_eq!(fallback_listing(&host, "a", &a.root).len(), 2);

    // Pulled through the API, with the fallback tags hidden: lathe finds every referrer there.
    let pulled = tmp.path().join("pulled");
    let out = lathe_ok(&[
        "copy",
        "--json",
        &format!("docker://{api_host}/a:v1"),
        &format!("oci:{}:run", pulled.display()),
    ]);
    assert_eq!(
        carried(&json_of(&out)),
        everything,
        "asked: {:?}",
        asked.lock().unwrap()
    );
    let asked_for_root: Vec<String> = asked
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.contains(&a.root))
        .cloned()
        .collect();
    assert!(
        asked_for_root.iter().any(|t| t.ends_with("?page=1")),
        "the second page was followed: {asked_for_root:?}"
    );

    // Pushed where the API is: referrers by digest and cosign tags, but no fallback tag.
    asked.lock().unwrap().clear();
    let out = lathe_ok(&[
        "copy",
        "--json",
        &format!("oci:{}:run", pulled.display()),
        &format!("docker://{api_host}/e:v1"),
    ]);
    assert_eq!(carried(&json_of(&out)), everything);
    assert!(
        !asked.lock().unwrap().is_empty(),
        "lathe asked whether the registry has the API"
    );
    for subject in [&a.root, &a.amd64, &a.arm64, &a.sbom] {
        let tag = format!("sha256-{}", hex(subject));
        assert_eq!(get_manifest(&host, "e", &tag), None, "e:{tag}");
    }
    for digest in [
        &a.sbom,
        &a.amd64_sbom,
        &a.arm64_sbom,
        attestation.digest().as_ref(),
    ] {
        assert_eq!(
            get_manifest(&host, "e", digest).map(|(d, _)| d).as_deref(),
            Some(digest),
            "e@{digest}"
        );
    }
    assert_eq!(
        get_manifest(&host, "e", &sig_tag(&a.root)).map(|(d, _)| d),
        Some(a.signature.clone())
    );
}

/// `lathe bundle` carries what is attached to the images it gathers: the run image's
/// signature and SBOMs go into the bundle with it and, copied out of the bundle on the other
/// side of the gap, reach the internal registry with the same digests.
#[test]
fn a_bundle_carries_the_run_images_attachments_across_the_gap() {
    let world = World::new();
    let reg = TestRegistry::start(RegistryConfig::default());
    let host = reg.host();
    let src = scratch();
    let a = attached_layout(src.path());
    let run = format!("{host}/outside/run:v1");
    lathe_ok(&["copy", &a.reference, &format!("docker://{run}")]);
    let images = world_readable_lathe_and_fixtures().join("images");
    let toml = world.path("builder.toml");
    std::fs::write(
        &toml,
        format!(
            "[[buildpacks]]\nuri = \"buildpacks/arch-neutral\"\n\n\
             [[order]]\n[[order.group]]\nid = \"lathe-test/arch-neutral\"\n\n\
             [build]\nimage = \"oci:{}:build\"\n\n[[run.images]]\nimage = \"{run}\"\n",
            images.display()
        ),
    )
    .unwrap();
    let builder = format!("docker://{host}/outside/builder:v1");
    let both = "linux/amd64,linux/arm64";
    lathe_ok(&[
        "builder",
        "create",
        "--config",
        toml.to_str().unwrap(),
        "--platform",
        both,
        "--output",
        &builder,
    ]);
    let bundle = format!("oci-archive:{}", world.path("bundle.tar").display());
    let report = json_of(&lathe_ok(&[
        "bundle",
        "--builder",
        &builder,
        "--platform",
        both,
        "--output",
        &bundle,
        "--json",
    ]));
    let entry = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == run.as_str())
        .unwrap_or_else(|| panic!("no {run} in {report:#}"));
    assert_eq!(
        entry["digest"],
        a.root.as_str(),
        "the run image is bundled whole"
    );
    let carried: BTreeSet<&str> = entry["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["digest"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        &a.signature,
        &a.sbom,
        &a.sbom_signature,
        &a.amd64_sbom,
        &a.arm64_sbom,
    ]
    .into_iter()
    .map(String::as_str)
    .collect();
    assert_eq!(carried, expected);

    lathe_ok(&[
        "copy",
        &format!("{bundle}:{run}"),
        &format!("docker://{host}/internal/run:v1"),
    ]);
    assert_repository_has_all(&host, "internal/run", &a);
}
