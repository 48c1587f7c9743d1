//! One registry host and the OCI distribution calls lathe makes to it.
//!
//! - Connection: https, trusting the system roots plus `--ca-cert` and certs.d; hosts named
//!   insecure skip certificate checks; loopback and insecure hosts fall back to plain http
//!   when https fails and http answers like a registry.
//! - Retries: steps that may be repeated (HEAD, GET, starting an upload, manifest PUT) are
//!   retried with exponential backoff on 5xx, 429 (honouring `Retry-After`) and dropped
//!   connections. A blob upload is retried as a whole, from a new session, after a HEAD shows
//!   the blob is still missing; a finalisation that times out is given time to land first.
//! - Downloads resume with a `Range` request after a dropped connection.
//! - Timeouts: `--registry-timeout` bounds connecting, each wait for an answer and each silent
//!   stretch of a download; an upload's request also gets time for its size.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use oci_spec::image::{Descriptor, Digest};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, HeaderValue};

use super::RegistryError;
use super::auth::{self, Challenge, Credential, Token};
use super::settings::{self, Settings};
use crate::content;
use crate::image::ImageError;
use crate::progress::BlobProgress;

/// Attempts for each retried step.
pub const MAX_ATTEMPTS: u32 = 6;
/// The size of each PATCH when a registry refuses monolithic uploads.
const CHUNK_SIZE: usize = 8 << 20;
/// The chunks the upload pipe carries from the source to the request body.
const PIPE_CHUNK: usize = 1 << 20;
/// The slowest upload rate lathe waits for before a blob PUT counts as stalled.
const MIN_UPLOAD_RATE: u64 = 1 << 20;

/// The OCI index media type (what the referrers API answers with).
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The most pages of a referrers list lathe follows.
const MAX_REFERRER_PAGES: usize = 64;

/// Every manifest type lathe reads, for `Accept`.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    content::DOCKER_MANIFEST_LIST,
    content::DOCKER_MANIFEST,
];

#[derive(Debug, Clone)]
enum AuthState {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        token: Option<Token>,
    },
}

/// A connection to one registry host, with the credential and the scopes its token asks for.
pub struct Registry {
    host: String,
    /// The reference this connection serves, for messages.
    name: String,
    base: reqwest::Url,
    http: Client,
    credential: Option<Credential>,
    scopes: Mutex<Vec<String>>,
    auth: Mutex<AuthState>,
    timeout: Duration,
    requests: AtomicU64,
    settings: Settings,
    uploader: OnceLock<Uploader>,
}

/// reqwest's async client on a small runtime of its own, for blob uploads only: its body
/// takes large chunks, where the blocking client's moves 8 KiB at a time (three times
/// skopeo's CPU on a 150 MB layer).
struct Uploader {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// Opens a blob's bytes, verified, once for each try of an upload.
pub type BlobOpener<'s> = dyn Fn() -> Result<Box<dyn Read + Send + 's>, ImageError> + Sync + 's;

/// How a blob reached the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploaded {
    /// It was there already (HEAD).
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Its bytes were sent.
    Sent,
}

/// Why one try of an upload stopped.
enum Attempt {
    /// Not worth retrying (the source is bad, or the registry said no for good).
    Fatal(ImageError),
    /// The registry will not take monolithic uploads: go chunked.
    UseChunked(ImageError),
    /// A passing fault; `maybe_landed` when the whole blob was sent and only the answer is
    /// missing, so the blob may appear shortly.
    Retry {
        error: ImageError,
        maybe_landed: bool,
    },
}

/// The scope string for a repository.
pub fn scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

/// A transport error in words, without the URL (which may carry upload state).
pub fn describe_transport_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "the connection failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    if !last.is_empty() && !last.contains("://") {
        text.push_str(&format!(": {last}"));
    }
    text
}

fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(d) = retry_after {
        return d.min(Duration::from_secs(30));
    }
    let base = Duration::from_millis(200) * 2u32.pow(attempt.saturating_sub(1).min(5));
    // A little jitter so parallel transfers do not retry in lockstep.
    let jitter = Instant::now().elapsed().subsec_nanos() as u64 % 100;
    (base + Duration::from_millis(jitter)).min(Duration::from_secs(5))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The target of a `Link` header value's `rel="next"` link (RFC 8288), as the referrers and
/// tags lists paginate.
fn next_link(value: &str) -> Option<String> {
    value.split(',').find_map(|link| {
        let (target, params) = link.trim().split_once('>')?;
        let target = target.trim().strip_prefix('<')?;
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .any(|(k, v)| k.trim() == "rel" && v.trim().trim_matches('"') == "next")
            .then(|| target.to_string())
    })
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The first MiB of an answer's body, for its error text.
fn read_error_body(response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = response.take(1 << 20).read_to_end(&mut body);
    body
}

/// The `errors[0]` of a registry error body, as "CODE: message".
fn registry_error_text(status: StatusCode, body: &[u8]) -> String {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or_default();
            let message = e
                .get("message")
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            Some(format!("{code}: {message}"))
        })
        .map(|t| t.chars().take(200).collect::<String>());
    match detail {
        Some(d) => format!("the registry answered {status} ({d})"),
        None => format!("the registry answered {status}"),
    }
}

impl Registry {
    /// Connects to `host` (as written in references), working out http or https and the
    /// auth scheme. `scopes` are what a token must cover.
    pub fn connect(
        host: &str,
        name: &str,
        scopes: Vec<String>,
        settings: &Settings,
    ) -> Result<Registry, RegistryError> {
        if settings.offline {
            return Err(RegistryError::Offline { what: name.into() });
        }
        let api_host = if host == crate::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            host
        };
        let credential = auth::credential_for(settings, host)?;
        let http = build_client(host, settings)?;
        let mut registry = Registry {
            host: host.to_string(),
            name: name.to_string(),
            base: reqwest::Url::parse(&format!("https://{api_host}/")).map_err(|_| {
                RegistryError::Config {
                    what: host.into(),
                    why: "not a valid registry host".into(),
                }
            })?,
            http,
            credential,
            scopes: Mutex::new(scopes),
            auth: Mutex::new(AuthState::Anonymous),
            timeout: settings.timeout,
            requests: AtomicU64::new(0),
            settings: settings.clone(),
            uploader: OnceLock::new(),
        };
        let may_use_http = settings::is_loopback(host) || settings.is_insecure(host);
        let https = registry.ping(!may_use_http);
        let response = match https {
            Ok(r) => r,
            Err(https_error) if may_use_http => {
                registry
                    .base
                    .set_scheme("http")
                    .expect("http is a valid scheme");
                match registry.ping(true) {
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::UNAUTHORIZED => {
                        tracing::info!("{host}: https failed ({https_error}); using plain http");
                        r
                    }
                    _ => return Err(https_error),
                }
            }
            Err(e) => return Err(e),
        };
        let state = match response.status() {
            StatusCode::UNAUTHORIZED => response
                .headers()
                .get("www-authenticate")
                .and_then(|h| h.to_str().ok())
                .and_then(auth::parse_challenge)
                .map(|c| match c {
                    Challenge::Basic => AuthState::Basic,
                    Challenge::Bearer { realm, service } => AuthState::Bearer {
                        realm,
                        service,
                        token: None,
                    },
                })
                .ok_or_else(|| RegistryError::Refused {
                    what: name.into(),
                    why: "the registry wants an authentication scheme lathe does not know".into(),
                })?,
            _ => AuthState::Anonymous,
        };
        *registry.auth.get_mut().expect("not shared yet") = state;
        Ok(registry)
    }

    /// The host as references name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// How many HTTP requests this connection has sent.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn ping(&self, retry_connection_errors: bool) -> Result<Response, RegistryError> {
        let url = self.url("v2/");
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            match self.http.get(url.clone()).send() {
                Ok(r) if is_transient(r.status()) && attempt < MAX_ATTEMPTS => {
                    std::thread::sleep(backoff(attempt, retry_after(r.headers())));
                }
                Ok(r) => return Ok(r),
                Err(e) if retry_connection_errors && attempt < MAX_ATTEMPTS => {
                    tracing::debug!("{}: {}; retrying", self.host, describe_transport_error(&e));
                    std::thread::sleep(backoff(attempt, None));
                }
                Err(e) => {
                    return Err(RegistryError::Unreachable {
                        what: self.name.clone(),
                        why: format!(
                            "{} over {}: {}",
                            self.host,
                            self.base.scheme(),
                            describe_transport_error(&e)
                        ),
                    });
                }
            }
        }
    }

    fn url(&self, path: &str) -> reqwest::Url {
        self.base.join(path).expect("registry paths are valid URLs")
    }

    /// A `Location` header, relative or absolute, as a URL.
    fn location(&self, response: &Response, what: &str) -> Result<reqwest::Url, ImageError> {
        let value = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::BadContent {
                what: what.into(),
                why: format!(
                    "the registry answered {} without a Location",
                    response.status()
                ),
            })?;
        Ok(self
            .base
            .join(value)
            .map_err(|_| RegistryError::BadContent {
                what: what.into(),
                why: "the registry's Location is not a URL".into(),
            })?)
    }

    /// The Authorization header for the next request, fetching a token if needed.
    fn authorization(&self) -> Result<Option<HeaderValue>, RegistryError> {
        if let Some(Credential::Bearer(token)) = &self.credential {
            return Credential::sensitive(&format!("Bearer {token}"), &self.name).map(Some);
        }
        let mut state = self.auth.lock().expect("auth lock");
        let value = match &mut *state {
            AuthState::Anonymous => return Ok(None),
            AuthState::Basic => match &self.credential {
                Some(Credential::Basic { user, password }) => {
                    Credential::basic_header(user, password)
                }
                _ => return Ok(None),
            },
            AuthState::Bearer {
                realm,
                service,
                token,
            } => {
                if !token.as_ref().is_some_and(Token::is_fresh) {
                    let scopes = self.scopes.lock().expect("scopes lock").clone();
                    *token = Some(auth::fetch_token(
                        &self.http,
                        &self.name,
                        realm,
                        service.as_deref(),
                        &scopes,
                        self.credential.as_ref(),
                    )?);
                }
                format!("Bearer {}", token.as_ref().expect("just set").value)
            }
        };
        Credential::sensitive(&value, &self.name).map(Some)
    }

    /// After a 401: learn the challenge, drop a stale token. False when trying again cannot
    /// help (no credential for a basic challenge, or a bearer token given as is).
    fn reauthenticate(&self, response: &Response) -> bool {
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|h| h.to_str().ok())
            .and_then(auth::parse_challenge);
        let mut state = self.auth.lock().expect("auth lock");
        match challenge {
            Some(Challenge::Basic) => {
                let changed = !matches!(*state, AuthState::Basic);
                *state = AuthState::Basic;
                changed && matches!(self.credential, Some(Credential::Basic { .. }))
            }
            Some(Challenge::Bearer { realm, service }) => {
                *state = AuthState::Bearer {
                    realm,
                    service,
                    token: None,
                };
                // A token given as is (CNB_REGISTRY_AUTH) cannot be renewed.
                !matches!(self.credential, Some(Credential::Bearer(_)))
            }
            None => false,
        }
    }

    /// Widens what the token must cover (a mount's source repository); the next request
    /// fetches a new token.
    pub fn add_scope(&self, scope: String) {
        {
            let mut scopes = self.scopes.lock().expect("scopes lock");
            if scopes.contains(&scope) {
                return;
            }
            scopes.push(scope);
        }
        self.forget_token();
    }

    fn forget_token(&self) {
        if let AuthState::Bearer { token, .. } = &mut *self.auth.lock().expect("auth lock") {
            *token = None;
        }
    }

    /// Sends the request `make` builds, with auth. Repeatable steps are retried on transient
    /// answers and connection failures. A 401 is answered once by re-authenticating.
    fn send(
        &self,
        what: &str,
        repeatable: bool,
        make: &dyn Fn() -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            let mut request = make();
            if let Some(h) = self.authorization()? {
                request = request.header("Authorization", h);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            match request.send() {
                Err(e) if repeatable && attempt < MAX_ATTEMPTS => {
                    tracing::debug!("{what}: {}; retrying", describe_transport_error(&e));
                    std::thread::sleep(backoff(attempt, None));
                }
                Err(e) => {
                    return Err(RegistryError::Unreachable {
                        what: what.into(),
                        why: format!("{} (after {attempt} tries)", describe_transport_error(&e)),
                    });
                }
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED && !reauthenticated => {
                    reauthenticated = true;
                    attempt -= 1;
                    if !self.reauthenticate(&r) {
                        return Ok(r);
                    }
                }
                Ok(r) if is_transient(r.status()) && repeatable && attempt < MAX_ATTEMPTS => {
                    tracing::debug!("{what}: the registry answered {}; retrying", r.status());
                    std::thread::sleep(backoff(attempt, retry_after(r.headers())));
                }
                Ok(r) => return Ok(r),
            }
        }
    }

    /// The error for an answer that is not what a step wanted.
    fn refusal(&self, what: &str, response: Response) -> RegistryError {
        let status = response.status();
        self.refusal_from(what, status, &read_error_body(response))
    }

    fn refusal_from(&self, what: &str, status: StatusCode, body: &[u8]) -> RegistryError {
        let why = match status {
            StatusCode::UNAUTHORIZED => match self.credential {
                Some(_) => "authentication failed: the registry refused the credentials".into(),
                None => "authentication required: no credentials for this registry (use --creds, --authfile or CNB_REGISTRY_AUTH)".into(),
            },
            StatusCode::FORBIDDEN => "access denied".into(),
            _ => registry_error_text(status, body),
        };
        if is_transient(status) {
            RegistryError::Unreachable {
                what: what.into(),
                why: format!("{why}, still after {MAX_ATTEMPTS} tries"),
            }
        } else {
            RegistryError::Refused {
                what: what.into(),
                why,
            }
        }
    }

    /// A manifest or index by tag or digest: its bytes, media type and digest. With a digest
    /// reference the bytes must hash to it; by tag, to the registry's `Docker-Content-Digest`.
    pub fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        what: &str,
    ) -> Result<(Vec<u8>, String, Digest), RegistryError> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"));
        let response = self.send(what, true, &|| {
            self.http
                .get(url.clone())
                .header("Accept", MANIFEST_TYPES.join(", "))
        })?;
        match response.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => {
                let text = registry_error_text(StatusCode::NOT_FOUND, &read_error_body(response));
                let why = if text.contains("NAME_UNKNOWN") {
                    format!("repository {repository} does not exist")
                } else if reference.starts_with("sha256:") {
                    format!("no manifest {reference} in repository {repository}")
                } else {
                    format!("no tag {reference:?} in repository {repository}")
                };
                return Err(RegistryError::NotFound {
                    what: what.into(),
                    why,
                });
            }
            _ => return Err(self.refusal(what, response)),
        }
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        response
            .take(content::MAX_JSON_BLOB + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Unreachable {
                what: what.into(),
                why: format!("reading the manifest: {e}"),
            })?;
        let bad = |why: String| RegistryError::BadContent {
            what: what.into(),
            why,
        };
        if bytes.len() as u64 > content::MAX_JSON_BLOB {
            return Err(bad("the manifest is larger than lathe reads".into()));
        }
        let digest = content::sha256_digest(&bytes);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected
            && expected != digest.to_string()
        {
            return Err(bad(format!(
                "the manifest the registry sent hashes to {digest}, not {expected}"
            )));
        }
        let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|_| bad(format!("manifest {digest} is not JSON")))?
            .get("mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let media_type = match declared {
            Some(t) => t,
            None if MANIFEST_TYPES.contains(&content_type.as_str()) => content_type,
            None => {
                return Err(bad(format!(
                    "manifest {digest} has media type {content_type:?}; lathe reads OCI and Docker schema 2 manifests and indexes"
                )));
            }
        };
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(bad(format!(
                "manifest {digest} has media type {media_type:?}; lathe reads OCI and Docker schema 2 manifests and indexes"
            )));
        }
        Ok((bytes, media_type, digest))
    }

    fn exists(&self, path: &str, what: &str, accept: Option<&str>) -> Result<bool, RegistryError> {
        let url = self.url(path);
        let response = self.send(what, true, &|| {
            let r = self.http.head(url.clone());
            match accept {
                Some(a) => r.header("Accept", a),
                None => r,
            }
        })?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal(what, response)),
        }
    }

    pub fn blob_exists(
        &self,
        repository: &str,
        digest: &Digest,
        what: &str,
    ) -> Result<bool, RegistryError> {
        self.exists(&format!("v2/{repository}/blobs/{digest}"), what, None)
    }

    pub fn manifest_exists(
        &self,
        repository: &str,
        digest: &Digest,
        what: &str,
    ) -> Result<bool, RegistryError> {
        self.exists(
            &format!("v2/{repository}/manifests/{digest}"),
            what,
            Some(&MANIFEST_TYPES.join(", ")),
        )
    }

    /// PUTs a manifest or index under `reference` (a tag or its digest) with `media_type` as
    /// its Content-Type, and checks the digest the registry reports.
    pub fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
        what: &str,
    ) -> Result<(), RegistryError> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"));
        let response = self.send(what, true, &|| {
            self.http
                .put(url.clone())
                .header("Content-Type", media_type)
                .body(bytes.to_vec())
        })?;
        if !response.status().is_success() {
            return Err(self.refusal(what, response));
        }
        let digest = content::sha256_digest(bytes);
        if let Some(reported) = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && reported != digest.as_ref()
        {
            return Err(RegistryError::BadContent {
                what: what.into(),
                why: format!("the registry stored manifest {digest} as {reported}"),
            });
        }
        Ok(())
    }

    /// The OCI referrers API's list for `subject` (every page, following `Link: rel="next"`):
    /// `None` when the registry does not implement the API. A registry that does never answers
    /// 404 there (distribution-spec 1.1); distribution 2.8 does, and some registries answer
    /// 400, 405 or 501 for a route they lack.
    pub fn get_referrers(
        &self,
        repository: &str,
        subject: &Digest,
        what: &str,
    ) -> Result<Option<Vec<Descriptor>>, RegistryError> {
        let bad = |why: String| RegistryError::BadContent {
            what: what.into(),
            why: format!("the referrers of {subject}: {why}"),
        };
        let mut url = self.url(&format!("v2/{repository}/referrers/{subject}"));
        let mut found = Vec::new();
        for page in 0..MAX_REFERRER_PAGES {
            let response = self.send(what, true, &|| {
                self.http.get(url.clone()).header("Accept", OCI_INDEX)
            })?;
            let status = response.status();
            if page == 0 && matches!(status.as_u16(), 400 | 404 | 405 | 501) {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(self.refusal(what, response));
            }
            let next = response
                .headers()
                .get_all("link")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(next_link)
                .map(|link| url.join(&link))
                .transpose()
                .map_err(|_| bad("its Link header is not a URL".into()))?;
            let mut bytes = Vec::new();
            response
                .take(content::MAX_JSON_BLOB + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| RegistryError::Unreachable {
                    what: what.into(),
                    why: format!("reading the referrers of {subject}: {e}"),
                })?;
            if bytes.len() as u64 > content::MAX_JSON_BLOB {
                return Err(bad("the list is larger than lathe reads".into()));
            }
            let index: oci_spec::image::ImageIndex = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("the list is not an image index: {e}")))?;
            for desc in index.manifests() {
                content::check_descriptor(desc).map_err(bad)?;
            }
            found.extend(index.manifests().iter().cloned());
            match next {
                Some(next) => url = next,
                None => return Ok(Some(found)),
            }
        }
        Err(bad(format!(
            "the registry gave more than {MAX_REFERRER_PAGES} pages"
        )))
    }

    /// Opens a blob for reading; the reader resumes after dropped connections. The caller
    /// verifies size and digest.
    pub fn open_blob(
        &self,
        repository: &str,
        desc: &Descriptor,
        what: &str,
    ) -> Result<BlobReader<'_>, RegistryError> {
        let mut reader = BlobReader {
            registry: self,
            url: self.url(&format!("v2/{repository}/blobs/{}", desc.digest())),
            what: format!("{what}: blob {}", desc.digest()),
            response: None,
            offset: 0,
            resumes_left: MAX_ATTEMPTS,
        };
        reader.response = Some(reader.request()?);
        Ok(reader)
    }

    /// Uploads a blob unless the repository has it: HEAD, then a mount from `mount_from` (a
    /// repository of this registry) or a new session, then one PUT of the whole blob, or
    /// PATCHes of [`CHUNK_SIZE`] when the registry refuses that. `open` gives the blob's bytes,
    /// verified, and is called again for each retry.
    pub fn upload_blob<'s>(
        &self,
        repository: &str,
        desc: &Descriptor,
        mount_from: Option<&str>,
        open: &BlobOpener<'s>,
        progress: &BlobProgress,
        what: &str,
    ) -> Result<Uploaded, ImageError> {
        let what = format!("{what}: blob {}", desc.digest());
        let mut chunked = false;
        let mut mount_from = mount_from;
        let mut last_error = None;
        for attempt in 1..=MAX_ATTEMPTS {
            if self.blob_exists(repository, desc.digest(), &what)? {
                if attempt == 1 {
                    progress.finish_as("exists");
                    return Ok(Uploaded::Present);
                }
                progress.finish_as("pushed");
                return Ok(Uploaded::Sent);
            }
            let (start, mounted) = self.start_upload(repository, desc, mount_from, &what)?;
            if mounted {
                progress.finish_as("mounted");
                return Ok(Uploaded::Mounted);
            }
            // A mount that turned into a plain session is not tried again.
            mount_from = None;
            progress.restart();
            let outcome = if chunked {
                self.upload_chunks(start, desc, open, progress, &what)
            } else {
                self.upload_whole(start, desc, open, progress, &what)
            };
            match outcome {
                Ok(()) => {
                    progress.finish_as("pushed");
                    return Ok(Uploaded::Sent);
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::UseChunked(e)) if !chunked => {
                    tracing::info!("{what}: {e}; uploading in chunks");
                    chunked = true;
                    last_error = Some(e);
                }
                Err(Attempt::UseChunked(e)) => return Err(e),
                Err(Attempt::Retry {
                    error,
                    maybe_landed,
                }) => {
                    tracing::debug!("{what}: {error}; retrying");
                    if maybe_landed && self.await_blob(repository, desc.digest(), &what)? {
                        progress.finish_as("pushed");
                        return Ok(Uploaded::Sent);
                    }
                    last_error = Some(error);
                    std::thread::sleep(backoff(attempt, None));
                }
            }
        }
        Err(last_error.expect("at least one attempt failed"))
    }

    /// After an upload whose answer never came: the registry may still be finishing it.
    /// Polls HEAD for up to the timeout.
    fn await_blob(
        &self,
        repository: &str,
        digest: &Digest,
        what: &str,
    ) -> Result<bool, RegistryError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.blob_exists(repository, digest, what)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// POSTs a new upload session, or a mount. Returns the session's URL and whether the
    /// blob was mounted (201) rather than given a session (202).
    fn start_upload(
        &self,
        repository: &str,
        desc: &Descriptor,
        mount_from: Option<&str>,
        what: &str,
    ) -> Result<(reqwest::Url, bool), ImageError> {
        let mut url = self.url(&format!("v2/{repository}/blobs/uploads/"));
        if let Some(from) = mount_from {
            url.query_pairs_mut()
                .append_pair("mount", desc.digest().as_ref())
                .append_pair("from", from);
        }
        let response = self.send(what, true, &|| {
            self.http.post(url.clone()).header("Content-Length", "0")
        })?;
        match response.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok((url, true)),
            StatusCode::ACCEPTED => Ok((self.location(&response, what)?, false)),
            _ => Err(self.refusal(what, response).into()),
        }
    }

    fn upload_timeout(&self, size: u64) -> Duration {
        self.timeout + Duration::from_secs(size / MIN_UPLOAD_RATE)
    }

    /// The error for an upload step's answer, sorted by what to do next.
    fn upload_failure(
        &self,
        what: &str,
        status: StatusCode,
        body: &[u8],
        whole_blob_sent: bool,
    ) -> Attempt {
        if status == StatusCode::UNAUTHORIZED {
            self.forget_token();
        }
        let retry = is_transient(status)
            || status == StatusCode::UNAUTHORIZED
            || status == StatusCode::NOT_FOUND;
        let error: ImageError = self.refusal_from(what, status, body).into();
        if retry {
            Attempt::Retry {
                error,
                maybe_landed: whole_blob_sent && status == StatusCode::GATEWAY_TIMEOUT,
            }
        } else if matches!(status.as_u16(), 400 | 405 | 411 | 413 | 415 | 416) {
            Attempt::UseChunked(error)
        } else {
            Attempt::Fatal(error)
        }
    }

    /// One PUT with the whole blob, streamed from the source by a producer thread in
    /// [`PIPE_CHUNK`] pieces through reqwest's async body (see [`Uploader`]).
    fn upload_whole<'s>(
        &self,
        session: reqwest::Url,
        desc: &Descriptor,
        open: &BlobOpener<'s>,
        progress: &BlobProgress,
        what: &str,
    ) -> Result<(), Attempt> {
        let mut url = session;
        url.query_pairs_mut()
            .append_pair("digest", desc.digest().as_ref());
        let auth = self.authorization().map_err(|e| Attempt::Fatal(e.into()))?;
        let uploader = self.uploader().map_err(|e| Attempt::Fatal(e.into()))?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(4);
        std::thread::scope(|scope| {
            let producer = scope.spawn(move || -> Result<(), ImageError> {
                let mut reader = open()?;
                loop {
                    let mut chunk = vec![0u8; PIPE_CHUNK];
                    match content::read_up_to(&mut reader, &mut chunk) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            chunk.truncate(n);
                            progress.advance(n as u64);
                            if sender.blocking_send(Ok(chunk.into())).is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            let _ =
                                sender.blocking_send(Err(io::Error::other("the source failed")));
                            return Err(ImageError::Io {
                                what: format!("{what}: reading the source"),
                                source: e,
                            });
                        }
                    }
                }
            });
            let body_stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|chunk| (chunk, receiver))
            });
            let mut request = uploader
                .client
                .put(url)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", desc.size())
                .timeout(self.upload_timeout(desc.size()))
                .body(reqwest::Body::wrap_stream(body_stream));
            if let Some(h) = auth {
                request = request.header("Authorization", h);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let result = uploader.runtime.block_on(async {
                let response = request.send().await?;
                let status = response.status();
                let body = response.bytes().await.unwrap_or_default();
                Ok::<_, reqwest::Error>((status, body))
            });
            let source = producer.join().expect("the upload pipe does not panic");
            if let Err(e) = source {
                return Err(Attempt::Fatal(e));
            }
            match result {
                Ok((status, _)) if status.is_success() => Ok(()),
                Ok((status, body)) => Err(self.upload_failure(what, status, &body, true)),
                // A timeout after the whole body went out may be a slow finalisation; a
                // dropped connection is simply retried (the next try starts with a HEAD).
                Err(e) => Err(Attempt::Retry {
                    maybe_landed: e.is_timeout(),
                    error: RegistryError::Unreachable {
                        what: what.into(),
                        why: describe_transport_error(&e),
                    }
                    .into(),
                }),
            }
        })
    }

    /// The async client and runtime for uploads, made on first use.
    fn uploader(&self) -> Result<&Uploader, RegistryError> {
        if let Some(u) = self.uploader.get() {
            return Ok(u);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lathe-upload")
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Config {
                what: self.name.clone(),
                why: format!("cannot start the upload runtime: {e}"),
            })?;
        let client = build_async_client(&self.host, &self.settings)?;
        let _ = self.uploader.set(Uploader { runtime, client });
        Ok(self.uploader.get().expect("just set"))
    }

    /// PATCHes of [`CHUNK_SIZE`] (or the registry's minimum), then a PUT with the digest.
    fn upload_chunks<'s>(
        &self,
        session: reqwest::Url,
        desc: &Descriptor,
        open: &BlobOpener<'s>,
        progress: &BlobProgress,
        what: &str,
    ) -> Result<(), Attempt> {
        let mut reader = open().map_err(Attempt::Fatal)?;
        let mut location = session;
        let mut offset = 0u64;
        let mut chunk = vec![0u8; CHUNK_SIZE];
        loop {
            let n = content::read_up_to(&mut reader, &mut chunk).map_err(|e| {
                Attempt::Fatal(ImageError::Io {
                    what: format!("{what}: reading the source"),
                    source: e,
                })
            })?;
            if n == 0 {
                break;
            }
            let body = chunk[..n].to_vec();
            let range = format!("{}-{}", offset, offset + n as u64 - 1);
            let url = location.clone();
            let response = self
                .send(what, false, &|| {
                    self.http
                        .patch(url.clone())
                        .header("Content-Type", "application/octet-stream")
                        .header("Content-Range", range.clone())
                        .timeout(self.upload_timeout(n as u64))
                        .body(body.clone())
                })
                .map_err(|e| Attempt::Retry {
                    error: e.into(),
                    maybe_landed: false,
                })?;
            if response.status() != StatusCode::ACCEPTED {
                let status = response.status();
                let body = read_error_body(response);
                return Err(match self.upload_failure(what, status, &body, false) {
                    Attempt::UseChunked(e) => Attempt::Fatal(e),
                    other => other,
                });
            }
            location = self.location(&response, what).map_err(Attempt::Fatal)?;
            offset += n as u64;
            progress.advance(n as u64);
        }
        let mut url = location;
        url.query_pairs_mut()
            .append_pair("digest", desc.digest().as_ref());
        let response = self
            .send(what, false, &|| {
                self.http
                    .put(url.clone())
                    .header("Content-Type", "application/octet-stream")
                    .header("Content-Length", "0")
            })
            .map_err(|e| Attempt::Retry {
                error: e.into(),
                maybe_landed: false,
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            let status = response.status();
            let body = read_error_body(response);
            Err(match self.upload_failure(what, status, &body, true) {
                Attempt::UseChunked(e) => Attempt::Fatal(e),
                other => other,
            })
        }
    }
}

/// The setup both clients share: user agent, proxies, connect timeout and TLS trust.
macro_rules! configure_client {
    ($builder:expr, $host:expr, $settings:expr) => {{
        // reqwest is built without a default crypto provider; ring is lathe's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = $builder
            .user_agent(concat!("lathe/", env!("CARGO_PKG_VERSION")))
            .connect_timeout($settings.timeout)
            .pool_max_idle_per_host(8);
        if settings::is_loopback($host) {
            builder = builder.no_proxy();
        }
        for certs in ca_certificates($host, $settings)? {
            builder = builder.tls_certs_merge(certs);
        }
        if $settings.is_insecure($host) {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        builder.build().map_err(|e| RegistryError::Config {
            what: $host.into(),
            why: format!("cannot set up the HTTP client: {}", e.without_url()),
        })
    }};
}

fn build_client(host: &str, settings: &Settings) -> Result<Client, RegistryError> {
    configure_client!(Client::builder().timeout(settings.timeout), host, settings)
}

fn build_async_client(host: &str, settings: &Settings) -> Result<reqwest::Client, RegistryError> {
    configure_client!(reqwest::Client::builder(), host, settings)
}

/// The CA certificates `--ca-cert` and certs.d give for `host`, one list per file.
fn ca_certificates(
    host: &str,
    settings: &Settings,
) -> Result<Vec<Vec<reqwest::Certificate>>, RegistryError> {
    let mut all = Vec::new();
    for file in settings.ca_files_for(host) {
        let what = || format!("CA certificate {}", file.display());
        let pem = std::fs::read(&file).map_err(|e| RegistryError::Config {
            what: what(),
            why: e.to_string(),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| RegistryError::Config {
                what: what(),
                why: "not a PEM certificate".into(),
            })?;
        if certs.is_empty() {
            return Err(RegistryError::Config {
                what: what(),
                why: "holds no PEM certificate".into(),
            });
        }
        all.push(certs);
    }
    Ok(all)
}

/// A blob download that resumes with a `Range` request when the connection drops.
pub struct BlobReader<'a> {
    registry: &'a Registry,
    url: reqwest::Url,
    what: String,
    response: Option<Response>,
    offset: u64,
    resumes_left: u32,
}

impl BlobReader<'_> {
    fn request(&self) -> Result<Response, RegistryError> {
        let offset = self.offset;
        let response = self.registry.send(&self.what, true, &|| {
            let r = self.registry.http.get(self.url.clone());
            if offset > 0 {
                r.header("Range", format!("bytes={offset}-"))
            } else {
                r
            }
        })?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => Ok(response),
            StatusCode::OK if offset > 0 => {
                // The registry ignored the Range: skip what was read already.
                let mut response = response;
                io::copy(&mut (&mut response).take(offset), &mut io::sink()).map_err(|e| {
                    RegistryError::Unreachable {
                        what: self.what.clone(),
                        why: e.to_string(),
                    }
                })?;
                Ok(response)
            }
            StatusCode::OK => Ok(response),
            StatusCode::NOT_FOUND => Err(RegistryError::Refused {
                what: self.what.clone(),
                why: "the registry does not have it".into(),
            }),
            _ => Err(self.registry.refusal(&self.what, response)),
        }
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.response.is_none() {
                self.response = Some(self.request().map_err(io::Error::other)?);
            }
            let response = self.response.as_mut().expect("just opened");
            match response.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.resumes_left > 0 => {
                    self.resumes_left -= 1;
                    tracing::debug!("{}: {e}; resuming at byte {}", self.what, self.offset);
                    self.response = None;
                    std::thread::sleep(backoff(MAX_ATTEMPTS - self.resumes_left, None));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e} (after {MAX_ATTEMPTS} resumes)", self.what),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_finds_the_rel_next_target() {
        assert_eq!(
            next_link(r#"</v2/a/referrers/sha256:1?n=2&last=x>; rel="next""#).as_deref(),
            Some("/v2/a/referrers/sha256:1?n=2&last=x")
        );
        assert_eq!(
            next_link(r#"<https://r.example/p1>; rel="prev", <https://r.example/p3>; rel=next"#)
                .as_deref(),
            Some("https://r.example/p3")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn backoff_grows_and_honours_retry_after() {
        assert!(backoff(1, None) < Duration::from_millis(400));
        assert!(backoff(4, None) >= Duration::from_millis(1600));
        assert!(backoff(20, None) <= Duration::from_secs(5));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
    }
}
