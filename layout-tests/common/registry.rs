//! Registry test helpers: Debian's docker-registry (the CNCF distribution registry) started on
//! 127.0.0.1 with its own config and storage on tmpfs, a test CA made with openssl, htpasswd
//! users, a token server that signs JWTs with a key the registry trusts, and a fault-injecting
//! HTTP proxy. Everything listens on 127.0.0.1 only and is stopped when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::{scratch, tool};

/// A free port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "docker-registry exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on 127.0.0.1:{port}");
}

/// A test CA and a server certificate for 127.0.0.1 and localhost, made with openssl.
pub struct TestCa {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path) -> TestCa {
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=lathe test CA",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.crt"),
            ],
        );
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-addext",
                "extendedKeyUsage=serverAuth",
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.crt"),
            ],
        );
        TestCa {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    /// A directory with the CA as `ca.crt`, as skopeo's `--cert-dir` wants.
    pub fn cert_dir(&self) -> PathBuf {
        let d = self.dir.join("certs.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&self.ca_cert, d.join("ca.crt")).unwrap();
        d
    }
}

/// How a test registry is set up.
#[derive(Default)]
pub struct RegistryConfig {
    /// Serve https with this CA's server certificate.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// An htpasswd file (bcrypt) for basic auth.
    pub htpasswd: Option<PathBuf>,
    /// Token auth: (realm URL, token-signing certificate).
    pub token: Option<(String, PathBuf)>,
    /// Send relative `Location` headers.
    pub relative_urls: bool,
}

pub const TOKEN_SERVICE: &str = "lathe-test-registry";
pub const TOKEN_ISSUER: &str = "lathe-test-issuer";

/// A running docker-registry.
pub struct TestRegistry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl TestRegistry {
    pub fn start(config: RegistryConfig) -> TestRegistry {
        let dir = scratch();
        let port = free_port();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: lathe-test-{port}\n  relativeurls: {}\n",
            dir.path().join("storage").display(),
            config.relative_urls
        );
        if let Some((cert, key)) = &config.tls {
            yaml += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        if let Some(file) = &config.htpasswd {
            yaml += &format!(
                "auth:\n  htpasswd:\n    realm: lathe-test\n    path: {}\n",
                file.display()
            );
        }
        if let Some((realm, cert)) = &config.token {
            yaml += &format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                cert.display()
            );
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, yaml).unwrap();
        let log = dir.path().join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .expect("docker-registry is needed by this test; .ci/install installs it");
        wait_for_port(port, &mut child, &dir.path().join("registry.err"));
        TestRegistry { port, dir, child }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An htpasswd file with one bcrypt user.
pub fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let line = tool("htpasswd", &["-Bbn", user, password]);
    let path = dir.join("htpasswd");
    std::fs::write(&path, line.trim_end().to_string() + "\n").unwrap();
    path
}

// ------------------------------------------------------------------ HTTP plumbing

/// One HTTP/1.1 request as read off a socket.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path with its query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    pub fn query(&self, key: &str) -> Vec<String> {
        let Some((_, q)) = self.target.split_once('?') else {
            return vec![];
        };
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a request; `None` for a closed connection or one that does not speak HTTP (a TLS
/// hello from a client trying https first).
fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let first = stream.fill_buf().ok()?;
    if first.is_empty() || !first[0].is_ascii_uppercase() {
        return None;
    }
    let mut line = String::new();
    stream.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    stream.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

pub fn write_response(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

/// A tiny threaded HTTP server on 127.0.0.1: `handle` answers each request on its own
/// connection (every answer closes the connection). Stops when dropped.
pub struct Server {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(handle: impl Fn(Request, &mut TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(handle);
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    if let Some(request) = read_request(&mut reader) {
                        handle(request, &mut conn);
                    }
                    let _ = conn.shutdown(Shutdown::Both);
                });
            }
        });
        Server { port, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

// ------------------------------------------------------------------ token server

/// How long the tokens a [`TokenServer`] issues last.
#[derive(Debug, Clone, Copy)]
pub struct TokenLife {
    /// How long the registry accepts a token, in seconds.
    pub valid: u64,
    /// The `expires_in` the token server tells the client (the truth, or not).
    pub expires_in: u64,
}

impl Default for TokenLife {
    fn default() -> TokenLife {
        TokenLife {
            valid: 300,
            expires_in: 300,
        }
    }
}

/// docker-registry accepts a JWT until this long after its `exp` (distribution's `Leeway`
/// for clock skew); short-lived test tokens set `exp` that much earlier.
pub const REGISTRY_EXP_LEEWAY: u64 = 60;

/// Signs RS256 JWTs (with `openssl dgst`) carrying an `x5c` chain of the certificate the
/// registry trusts.
struct TokenSigner {
    key: PathBuf,
    x5c: String,
    user: String,
    serial: AtomicUsize,
}

impl TokenSigner {
    /// A token for `scopes` (`repository:NAME:ACTIONS`) that the registry accepts for
    /// `valid` seconds from now.
    fn sign(&self, scopes: &[String], valid: u64) -> String {
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind, "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": self.user, "aud": TOKEN_SERVICE,
            "exp": now + valid - REGISTRY_EXP_LEEWAY,
            "nbf": now - 10, "iat": now, "jti": format!("t{n}-{now}"),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut openssl = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign", self.key.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        openssl
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let signature = openssl.wait_with_output().unwrap().stdout;
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// A token server for `auth: token`: checks basic credentials and signs JWTs the registry
/// trusts, counting what it is asked.
pub struct TokenServer {
    pub server: Server,
    pub cert: PathBuf,
    pub issued: Arc<AtomicUsize>,
    /// The scopes asked for, one entry per token request.
    pub requests: Arc<Mutex<Vec<Vec<String>>>>,
    signer: Arc<TokenSigner>,
}

impl TokenServer {
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        TokenServer::start_with(dir, user, password, TokenLife::default())
    }

    pub fn start_with(dir: &Path, user: &str, password: &str, life: TokenLife) -> TokenServer {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=lathe test token issuer",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in", cert.to_str().unwrap()])
            .output()
            .unwrap()
            .stdout;
        let signer = Arc::new(TokenSigner {
            key,
            x5c: STANDARD.encode(der),
            user: user.to_string(),
            serial: AtomicUsize::new(0),
        });
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let issued = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (issued2, requests2, signer2) = (issued.clone(), requests.clone(), signer.clone());
        let server = Server::start(move |req, conn| {
            let scopes = req.query("scope");
            requests2.lock().unwrap().push(scopes.clone());
            if req.header("authorization") != Some(expected.as_str()) {
                write_response(
                    conn,
                    "401 Unauthorized",
                    &[],
                    b"{\"details\":\"bad credentials\"}",
                );
                return;
            }
            let token = signer2.sign(&scopes, life.valid);
            issued2.fetch_add(1, Ordering::Relaxed);
            let body =
                serde_json::json!({"token": token, "expires_in": life.expires_in}).to_string();
            write_response(
                conn,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
        });
        TokenServer {
            server,
            cert,
            issued,
            requests,
            signer,
        }
    }

    pub fn realm(&self) -> String {
        format!("{}/token", self.server.url())
    }

    /// A token for `scopes`, valid for `valid` seconds, made without a request (as a CI
    /// system hands one to a build in `CNB_REGISTRY_AUTH`); not counted in `issued`.
    pub fn mint(&self, scopes: &[&str], valid: u64) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.signer.sign(&scopes, valid)
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::Relaxed)
    }
}

// ------------------------------------------------------------------ fault-injecting proxy

/// What the proxy does to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer this status (with `Retry-After: 1` for 429) without asking the registry.
    Status(u16),
    /// Close the connection without an answer.
    Drop,
    /// Forward, then hold the answer back this long.
    Stall(Duration),
    /// Forward, then send only the first half of the body (with a matching Content-Length).
    Truncate,
    /// Forward, then change one byte of the body.
    Corrupt,
}

/// One request the proxy saw, and what it did to it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub body_len: usize,
    pub fault: Option<Fault>,
    /// The status answered, when there was an answer.
    pub status: Option<u16>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    pub fn is_blob_upload(&self) -> bool {
        self.path().contains("/blobs/uploads/")
    }
}

/// The digest a request names: an upload's `digest=`, a mount's `mount=`, or a blob path's.
pub fn named_digest(seen: &Seen) -> Option<String> {
    let query = |key: &str| {
        seen.target
            .split_once('?')
            .and_then(|(_, q)| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            })
            .map(|v| v.replace("%3A", ":"))
    };
    query("digest").or_else(|| query("mount")).or_else(|| {
        let path = seen.path();
        (path.contains("/blobs/") && !seen.is_blob_upload())
            .then(|| path.rsplit('/').next().unwrap().to_string())
    })
}

type Decide = dyn Fn(&Request) -> Option<Fault> + Send + Sync;

/// An HTTP proxy in front of a registry that injects faults chosen by `decide`, and logs
/// every request.
pub struct FaultProxy {
    pub server: Server,
    pub log: Arc<Mutex<Vec<Seen>>>,
}

impl FaultProxy {
    pub fn start(
        upstream_port: u16,
        decide: impl Fn(&Request) -> Option<Fault> + Send + Sync + 'static,
    ) -> FaultProxy {
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let decide: Arc<Decide> = Arc::new(decide);
        let server = Server::start(move |req, conn| {
            let fault = decide(&req);
            let status = |code| {
                let mut log = log2.lock().unwrap();
                log.push(Seen {
                    method: req.method.clone(),
                    target: req.target.clone(),
                    body_len: req.body.len(),
                    fault: fault.clone(),
                    status: code,
                });
            };
            match fault.clone() {
                Some(Fault::Status(code)) => {
                    let reason = match code {
                        429 => "Too Many Requests",
                        500 => "Internal Server Error",
                        503 => "Service Unavailable",
                        413 => "Payload Too Large",
                        _ => "Injected",
                    };
                    let headers = if code == 429 {
                        vec![("Retry-After", "1".to_string())]
                    } else {
                        vec![]
                    };
                    status(Some(code));
                    write_response(conn, &format!("{code} {reason}"), &headers, b"");
                }
                Some(Fault::Drop) => status(None),
                other => {
                    let Some((head, mut body)) = forward(upstream_port, &req) else {
                        status(None);
                        return;
                    };
                    status(head.split_whitespace().nth(1).and_then(|c| c.parse().ok()));
                    match other {
                        Some(Fault::Stall(d)) => std::thread::sleep(d),
                        Some(Fault::Truncate) => body.truncate(body.len() / 2),
                        Some(Fault::Corrupt) if !body.is_empty() => {
                            let i = body.len() / 2;
                            body[i] = if body[i] == b' ' { b'\t' } else { b' ' };
                        }
                        _ => {}
                    }
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
                    let _ = conn.flush();
                }
            }
        });
        FaultProxy { server, log }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// Sends `req` to the registry on a new connection; returns the answer's head (status line
/// and headers, without the blank line) and body. For HEAD the body is empty but the head
/// keeps the registry's Content-Length.
pub fn forward(port: u16, req: &Request) -> Option<(String, Vec<u8>)> {
    let mut up = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        if !k.eq_ignore_ascii_case("connection") {
            head += &format!("{k}: {v}\r\n");
        }
    }
    head += "Connection: close\r\n\r\n";
    up.write_all(head.as_bytes()).ok()?;
    up.write_all(&req.body).ok()?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).ok()?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let body = answer[split + 4..].to_vec();
    if req.method == "HEAD" {
        // Keep the registry's Content-Length: the caller writes it back as is.
        let len = head
            .lines()
            .find_map(|l| {
                let lower = l.to_ascii_lowercase();
                lower
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| "0".into());
        return Some((head, vec![0; len.parse().unwrap_or(0)]));
    }
    Some((head, body))
}

/// A fault plan for "faults at random": a seeded generator picks 500, 503, 429 or a dropped
/// connection for about one request in four, but no request (method, path, and digest for
/// uploads) is failed more than twice, so every step succeeds within lathe's retries.
pub fn random_faults(seed: u64) -> impl Fn(&Request) -> Option<Fault> + Send + Sync + 'static {
    let state = Mutex::new((seed, HashMap::<String, u32>::new()));
    move |req: &Request| {
        let mut guard = state.lock().unwrap();
        let (rng, counts) = &mut *guard;
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let roll = *rng % 100;
        if req.path() == "/v2/" || roll >= 25 {
            return None;
        }
        let mut key = format!("{} {}", req.method, req.path());
        if let Some(i) = key.find("/blobs/uploads/") {
            key.truncate(i + "/blobs/uploads/".len());
        }
        key += &req.query("digest").join(",");
        let count = counts.entry(key).or_insert(0);
        if *count >= 2 {
            return None;
        }
        *count += 1;
        Some(match roll % 4 {
            0 => Fault::Status(500),
            1 => Fault::Status(503),
            2 => Fault::Status(429),
            _ => Fault::Drop,
        })
    }
}
