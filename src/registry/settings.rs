//! The registry options of one lathe process: the global flags and environment variables of
//! `cli-conventions.md`, and `--offline`. The CLI sets them once with [`configure`]; library callers that never
//! do get [`Settings::from_env`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The certs.d directories searched for `<host[:port]>/*.crt` CA certificates.
pub const CERTS_D_DIRS: [&str; 2] = ["/etc/containers/certs.d", "/etc/docker/certs.d"];

/// Default for `--registry-timeout`: how long a registry may stay silent (connecting, or
/// between bytes of an answer) before the step is retried.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Settings {
    /// `--creds USER:PASS`, used for every registry.
    pub creds: Option<(String, String)>,
    /// `--authfile FILE`: a docker config.json (or containers auth.json).
    pub authfile: Option<PathBuf>,
    /// `CNB_REGISTRY_AUTH`: `{"registry": "Basic …" | "Bearer …"}`; wins over files.
    pub cnb_registry_auth: Option<String>,
    /// `--ca-cert FILE` (repeatable): CA certificates trusted for every registry.
    pub ca_certs: Vec<PathBuf>,
    /// Where `<host[:port]>/*.crt` CA certificates are looked up.
    pub certs_dirs: Vec<PathBuf>,
    /// `--insecure-registry HOST` and `CNB_INSECURE_REGISTRIES`: hosts whose certificates are
    /// not checked and that may be reached over plain http.
    pub insecure: Vec<String>,
    /// `--registry-timeout SECONDS`.
    pub timeout: Duration,
    /// `--offline`: every registry connection is refused before it is made.
    pub offline: bool,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("creds", &self.creds.as_ref().map(|_| "<hidden>"))
            .field("authfile", &self.authfile)
            .field(
                "cnb_registry_auth",
                &self.cnb_registry_auth.as_ref().map(|_| "<hidden>"),
            )
            .field("ca_certs", &self.ca_certs)
            .field("certs_dirs", &self.certs_dirs)
            .field("insecure", &self.insecure)
            .field("timeout", &self.timeout)
            .field("offline", &self.offline)
            .finish()
    }
}

impl Settings {
    /// What the environment alone gives: `CNB_REGISTRY_AUTH`, `CNB_INSECURE_REGISTRIES`, the
    /// standard certs.d directories, the default timeout.
    pub fn from_env() -> Settings {
        Settings {
            creds: None,
            authfile: None,
            cnb_registry_auth: std::env::var("CNB_REGISTRY_AUTH")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            ca_certs: vec![],
            certs_dirs: CERTS_D_DIRS.iter().map(PathBuf::from).collect(),
            insecure: std::env::var("CNB_INSECURE_REGISTRIES")
                .map(|v| parse_host_list(&v))
                .unwrap_or_default(),
            timeout: DEFAULT_TIMEOUT,
            offline: false,
        }
    }

    /// Whether `host` (as written in the reference, `name[:port]`) was named insecure. A name
    /// without a port covers every port of that host.
    pub fn is_insecure(&self, host: &str) -> bool {
        let bare = strip_port(host);
        self.insecure.iter().any(|h| h == host || h == bare)
    }

    /// The CA certificate files that apply to `host`: `--ca-cert` files, then the `*.crt`
    /// files of `<certs.d>/<host[:port]>/`.
    pub fn ca_files_for(&self, host: &str) -> Vec<PathBuf> {
        let mut files = self.ca_certs.clone();
        for dir in &self.certs_dirs {
            files.extend(crt_files(&dir.join(host)));
        }
        files
    }
}

fn crt_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    found.sort();
    found
}

/// `host[:port]` without its port (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Whether `host` is this machine, where plain http is tried when https fails.
pub fn is_loopback(host: &str) -> bool {
    let bare = strip_port(host);
    bare == "localhost" || bare == "[::1]" || bare.starts_with("127.")
}

/// A comma- or space-separated list of hosts, as `CNB_INSECURE_REGISTRIES` holds.
pub fn parse_host_list(text: &str) -> Vec<String> {
    text.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the process's registry settings; the first call wins.
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// The process's registry settings.
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::from_env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_hosts_match_with_or_without_port() {
        let mut s = Settings::from_env();
        s.insecure = parse_host_list("reg.example:5000, other.example");
        assert!(s.is_insecure("reg.example:5000"));
        assert!(!s.is_insecure("reg.example:5001"));
        assert!(s.is_insecure("other.example:443"));
        assert!(s.is_insecure("other.example"));
        assert!(!s.is_insecure("third.example"));
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost"));
        assert!(!is_loopback("registry.example"));
    }

    #[test]
    fn certs_d_gives_the_hosts_crt_files() {
        let tmp = tempfile::tempdir().unwrap();
        let host_dir = tmp.path().join("reg.example:5000");
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("ca.crt"), "x").unwrap();
        std::fs::write(host_dir.join("client.key"), "x").unwrap();
        let mut s = Settings::from_env();
        s.certs_dirs = vec![tmp.path().to_path_buf()];
        s.ca_certs = vec!["/given.pem".into()];
        assert_eq!(
            s.ca_files_for("reg.example:5000"),
            [PathBuf::from("/given.pem"), host_dir.join("ca.crt")]
        );
        assert_eq!(s.ca_files_for("other:1"), [PathBuf::from("/given.pem")]);
    }

    #[test]
    fn debug_hides_credentials() {
        let mut s = Settings::from_env();
        s.creds = Some(("user".into(), "hunter2".into()));
        s.cnb_registry_auth = Some(r#"{"x":"Basic c2VjcmV0"}"#.into());
        let text = format!("{s:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("c2VjcmV0"),
            "{text}"
        );
    }
}
