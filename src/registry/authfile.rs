//! Credentials from docker `config.json` and containers `auth.json` files, and the
//! `docker-credential-*` helpers they name.
//!
//! For one registry, as the docker CLI looks it up: `credHelpers[registry]`, else `credsStore`,
//! ask that helper (`docker-credential-NAME get`, the server address on stdin, JSON
//! `{"ServerURL", "Username", "Secret"}` on stdout; `Username` `<token>` makes `Secret` an
//! identity token). A helper that answers "credentials not found" means no credential from it,
//! and the `auths` entry (`auth`, `username`/`password` or `identitytoken`) is used if there is
//! one. Errors name the file or the helper, never a helper's output or an entry's value.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;
use super::auth::Credential;

/// The parts of a docker config.json (or containers auth.json) lathe reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthEntry(<hidden>)")
    }
}

/// The docker.io host names that share one credential.
pub fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The server address docker stores a registry's credential under (and gives helpers).
fn server_address(registry: &str) -> &str {
    if is_docker_hub(registry) {
        "https://index.docker.io/v1/"
    } else {
        registry
    }
}

/// Whether a config key (`host[:port]`, maybe with a scheme and a path) names `registry`.
fn key_names(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    host == registry || (is_docker_hub(host) && is_docker_hub(registry))
}

/// The credential `file` holds (or names a helper for) for `registry`. `Ok(None)` when the
/// file has nothing for it; an unreadable or malformed file is an error naming it.
pub fn credential_from_file(
    file: &Path,
    registry: &str,
) -> Result<Option<Credential>, RegistryError> {
    AuthFile::load(file)?.credential(file, registry)
}

impl AuthFile {
    /// Reads and parses `file`.
    pub fn load(file: &Path) -> Result<AuthFile, RegistryError> {
        let what = || format!("credentials file {}", file.display());
        let bytes = std::fs::read(file).map_err(|e| RegistryError::Config {
            what: what(),
            why: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|_| RegistryError::Config {
            what: what(),
            why: "not a valid docker config.json".into(),
        })
    }

    /// The credential for `registry`, from the helper this file names for it or from its
    /// `auths`. `file` is where it was read, for messages.
    pub fn credential(
        &self,
        file: &Path,
        registry: &str,
    ) -> Result<Option<Credential>, RegistryError> {
        let config = self;
        let what = || format!("credentials file {}", file.display());
        let helper = config
            .cred_helpers
            .iter()
            .find(|(key, name)| key_names(key, registry) && !name.is_empty())
            .map(|(_, name)| name.as_str())
            .or(config.creds_store.as_deref().filter(|s| !s.is_empty()));
        if let Some(name) = helper
            && let Some(found) = from_helper(name, server_address(registry), file)?
        {
            return Ok(Some(found));
        }
        let entry = config
            .auths
            .iter()
            .find(|(key, _)| key.as_str() == registry)
            .or_else(|| {
                config
                    .auths
                    .iter()
                    .find(|(key, _)| key_names(key, registry))
            });
        let Some((key, entry)) = entry else {
            return Ok(None);
        };
        let bad = |why: &str| RegistryError::Config {
            what: what(),
            why: format!("the entry for {key} {why}"),
        };
        if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential::IdentityToken(token.clone())));
        }
        if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            let decoded = engine
                .decode(auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad("has an `auth` that is not base64 of user:password"))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| bad("has an `auth` that is not base64 of user:password"))?;
            return Ok(Some(Credential::Basic {
                user: user.into(),
                password: password.into(),
            }));
        }
        match (&entry.username, &entry.password) {
            (Some(user), Some(password)) if !user.is_empty() => Ok(Some(Credential::Basic {
                user: user.clone(),
                password: password.clone(),
            })),
            _ => Ok(None),
        }
    }
}

/// The helpers' answer.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// Asks `docker-credential-NAME get` for `server`'s credential. `file` is the config that
/// named the helper, for messages.
fn from_helper(name: &str, server: &str, file: &Path) -> Result<Option<Credential>, RegistryError> {
    let program = format!("docker-credential-{name}");
    let what = || format!("credential helper {program} (named in {})", file.display());
    let fail = |why: String| RegistryError::Config { what: what(), why };
    if name.contains('/') || name.trim() != name {
        return Err(fail("not a helper name".into()));
    }
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::NotFound => format!("{program} is not on PATH"),
                _ => format!("cannot run it: {e}"),
            })
        })?;
    // A helper that exits without reading its input is answered by its exit status.
    let _ = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(server.as_bytes());
    let mut answer = Vec::new();
    let read = child
        .stdout
        .take()
        .expect("stdout is piped")
        .take(1 << 20)
        .read_to_end(&mut answer);
    let status = child
        .wait()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    read.map_err(|e| fail(format!("reading its answer: {e}")))?;
    if !status.success() {
        // The protocol's answer for "nothing stored for this server".
        if String::from_utf8_lossy(&answer).contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("it failed ({status}) for {server}")));
    }
    let answer: HelperAnswer = serde_json::from_slice(&answer)
        .map_err(|_| fail("its answer is not the helper protocol's JSON".into()))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if answer.username == "<token>" {
        Credential::IdentityToken(answer.secret)
    } else {
        Credential::Basic {
            user: answer.username,
            password: answer.secret,
        }
    }))
}

/// The docker config.json lathe reads by default: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(dir) => Some(Path::new(&dir).join("config.json")),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json")),
    }
}

/// containers' auth.json: `$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`,
/// else `~/.config/containers/auth.json` (the first of the last two that exists).
pub fn default_containers_auth() -> Option<PathBuf> {
    if let Some(file) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(file));
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(&d).join("containers/auth.json"));
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/containers/auth.json"));
    [runtime, home].into_iter().flatten().find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

    fn write(dir: &Path, json: &str) -> PathBuf {
        let file = dir.join("config.json");
        std::fs::write(&file, json).unwrap();
        file
    }

    #[test]
    fn auths_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let file = write(
            tmp.path(),
            &format!(
                r#"{{"auths": {{
                    "reg.example:5000": {{"auth": "{}"}},
                    "https://index.docker.io/v1/": {{"auth": "{}"}},
                    "plain.example": {{"username": "u", "password": "p"}},
                    "token.example": {{"identitytoken": "refresh"}},
                    "empty.example": {{}}
                }}}}"#,
                STANDARD.encode("alice:s3:cret"),
                STANDARD_NO_PAD.encode("hub:pw")
            ),
        );
        let get = |r| credential_from_file(&file, r).unwrap();
        assert_eq!(
            get("reg.example:5000"),
            Some(Credential::Basic {
                user: "alice".into(),
                password: "s3:cret".into()
            })
        );
        assert_eq!(
            get("docker.io"),
            Some(Credential::Basic {
                user: "hub".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            get("plain.example"),
            Some(Credential::Basic {
                user: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            get("token.example"),
            Some(Credential::IdentityToken("refresh".into()))
        );
        assert_eq!(get("empty.example"), None);
        assert_eq!(get("reg.example:5001"), None);
    }

    #[test]
    fn bad_files_and_missing_helpers_are_named_without_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let file = write(tmp.path(), r#"{"auths": {"x": {"auth": "!!secretvalue"}}}"#);
        let err = credential_from_file(&file, "x").unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("entry for x"),
            "{err}"
        );
        assert!(!err.contains("secretvalue"), "{err}");
        let file = write(tmp.path(), "{not json secretvalue");
        let err = credential_from_file(&file, "x").unwrap_err().to_string();
        assert!(err.contains("not a valid docker config.json"), "{err}");
        assert!(!err.contains("secretvalue"), "{err}");
        let file = write(
            tmp.path(),
            r#"{"credHelpers": {"x": "lathe-test-absent-helper"}}"#,
        );
        let err = credential_from_file(&file, "x").unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-lathe-test-absent-helper")
                && err.contains("not on PATH"),
            "{err}"
        );
        // The helper is only asked about its own registry.
        assert_eq!(credential_from_file(&file, "y").unwrap(), None);
    }
}
