//! Registry credentials and the auth flows.
//!
//! Where credentials come from, first match wins (cli-conventions.md): `--creds`, then
//! `CNB_REGISTRY_AUTH`, then `--authfile` alone, or else `$DOCKER_CONFIG/config.json` (else
//! `~/.docker/config.json`) and then containers' auth.json, each with its `credHelpers`,
//! `credsStore` and `auths` ([`authfile`](super::authfile)); else anonymous.
//!
//! The flows: a `Basic` challenge gets the credential on every request; a `Bearer` challenge
//! sends the credential to the token realm for the scopes lathe needs (pull on the source,
//! pull and push on the destination, pull on a mount source). The token is used until shortly
//! before its `expires_in` runs out, and a new one is fetched then, or at once when the
//! registry answers 401 with a new challenge. A `CNB_REGISTRY_AUTH` `Bearer` token is sent as
//! is and never exchanged. Credentials live in [`Credential`], whose `Debug` hides them; they
//! go out in headers marked sensitive, and no error built here quotes one, nor a token
//! server's or helper's output.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use super::RegistryError;
use super::authfile::{self, is_docker_hub};
use super::settings::Settings;

/// A credential for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (basic auth, or exchanged for a token).
    Basic { user: String, password: String },
    /// A docker `identitytoken`: a refresh token exchanged at the token realm.
    IdentityToken(String),
    /// A registry token used as is (`CNB_REGISTRY_AUTH` `Bearer …`).
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { user, .. } => write!(f, "Basic({user}, <hidden>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<hidden>)"),
            Credential::Bearer(_) => write!(f, "Bearer(<hidden>)"),
        }
    }
}

impl Credential {
    pub fn basic_header(user: &str, password: &str) -> String {
        format!("Basic {}", BASE64.encode(format!("{user}:{password}")))
    }

    /// An Authorization header value, marked sensitive (kept out of HTTP logs).
    /// `what` names the registry, for the error.
    pub fn sensitive(
        value: &str,
        what: &str,
    ) -> Result<reqwest::header::HeaderValue, RegistryError> {
        let mut header =
            reqwest::header::HeaderValue::from_str(value).map_err(|_| RegistryError::Config {
                what: what.into(),
                why: "the credential holds characters not allowed in an HTTP header".into(),
            })?;
        header.set_sensitive(true);
        Ok(header)
    }

    /// The sensitive `Basic` header for a user and password.
    pub fn sensitive_basic(
        user: &str,
        password: &str,
        what: &str,
    ) -> Result<reqwest::header::HeaderValue, RegistryError> {
        Credential::sensitive(&Credential::basic_header(user, password), what)
    }
}

/// The credential for `registry` (a host as written in references, `name[:port]`), or `None`
/// for anonymous access.
pub fn credential_for(
    settings: &Settings,
    registry: &str,
) -> Result<Option<Credential>, RegistryError> {
    if let Some((user, password)) = &settings.creds {
        return Ok(Some(Credential::Basic {
            user: user.clone(),
            password: password.clone(),
        }));
    }
    if let Some(json) = &settings.cnb_registry_auth
        && let Some(found) = from_cnb_registry_auth(json, registry)?
    {
        return Ok(Some(found));
    }
    if let Some(file) = &settings.authfile {
        return authfile::credential_from_file(file, registry);
    }
    // The default files: a missing one is skipped, one that is not JSON is warned about and
    // skipped (as docker does); a helper it names that fails, or a bad entry for this
    // registry, is an error.
    for file in [
        authfile::default_docker_config(),
        authfile::default_containers_auth(),
    ]
    .into_iter()
    .flatten()
    {
        if !file.is_file() {
            continue;
        }
        match authfile::AuthFile::load(&file) {
            Ok(config) => {
                if let Some(found) = config.credential(&file, registry)? {
                    return Ok(Some(found));
                }
            }
            Err(e) => tracing::warn!("{e}; ignoring it"),
        }
    }
    Ok(None)
}

/// `CNB_REGISTRY_AUTH`: `{"registry.example": "Basic base64(user:pass)" | "Bearer token"}`.
fn from_cnb_registry_auth(json: &str, registry: &str) -> Result<Option<Credential>, RegistryError> {
    let bad = |why: &str| RegistryError::Config {
        what: "CNB_REGISTRY_AUTH".into(),
        why: why.into(),
    };
    let map: serde_json::Map<String, Value> = serde_json::from_str(json)
        .map_err(|_| bad("not a JSON object of registry to \"Basic …\" or \"Bearer …\""))?;
    let entry = map.iter().find(|(key, _)| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        key == registry || (is_docker_hub(key) && is_docker_hub(registry))
    });
    let Some((key, value)) = entry else {
        return Ok(None);
    };
    let value = value
        .as_str()
        .ok_or_else(|| bad(&format!("the entry for {key} is not a string")))?;
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let decoded = BASE64
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad(&format!("the Basic entry for {key} is not base64")))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad(&format!("the Basic entry for {key} is not user:password")))?;
        return Ok(Some(Credential::Basic {
            user: user.into(),
            password: password.into(),
        }));
    }
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Ok(Some(Credential::Bearer(token.trim().into())));
    }
    Err(bad(&format!(
        "the entry for {key} must start with \"Basic \" or \"Bearer \""
    )))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(params);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
        })
    } else {
        None
    }
}

/// `key="value", key=value` pairs; quoted values may hold commas and `\"`.
fn parse_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
    out
}

/// A registry token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    /// When the token server said it expires (`expires_in` after the request was sent).
    pub expires: Instant,
    /// How long it was issued for.
    pub lifetime: Duration,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<hidden>)")
    }
}

impl Token {
    /// Still usable for a while: a token is renewed when less than a quarter of its lifetime,
    /// or 10 s, is left, whichever is shorter.
    pub fn is_fresh(&self) -> bool {
        let margin = (self.lifetime / 4).min(Duration::from_secs(10));
        Instant::now() + margin < self.expires
    }
}

/// Asks the token realm for a token covering `scopes`. `registry` is for messages.
pub fn fetch_token(
    http: &reqwest::blocking::Client,
    registry: &str,
    realm: &str,
    service: Option<&str>,
    scopes: &[String],
    credential: Option<&Credential>,
) -> Result<Token, RegistryError> {
    let what = format!("{registry}: token service");
    let mut url = reqwest::Url::parse(realm).map_err(|_| RegistryError::BadContent {
        what: registry.into(),
        why: "the registry's token realm is not a URL".into(),
    })?;
    let started = Instant::now();
    let request = match credential {
        Some(Credential::IdentityToken(refresh)) => {
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh.clone()),
                ("client_id", "lathe".to_string()),
                ("scope", scopes.join(" ")),
            ];
            if let Some(s) = service {
                form.push(("service", s.to_string()));
            }
            let body = form
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&");
            http.post(url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body)
        }
        other => {
            {
                let mut query = url.query_pairs_mut();
                if let Some(s) = service {
                    query.append_pair("service", s);
                }
                for s in scopes {
                    query.append_pair("scope", s);
                }
                if let Some(Credential::Basic { user, .. }) = other {
                    query.append_pair("account", user);
                }
            }
            let request = http.get(url);
            match other {
                Some(Credential::Basic { user, password }) => request.header(
                    "Authorization",
                    Credential::sensitive_basic(user, password, registry)?,
                ),
                _ => request,
            }
        }
    };
    let response = request.send().map_err(|e| RegistryError::Unreachable {
        what: what.clone(),
        why: super::client::describe_transport_error(&e),
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(RegistryError::Refused {
            what: registry.into(),
            why: match credential {
                Some(_) => "authentication failed: the registry refused the credentials".into(),
                None => "authentication required: no credentials for this registry (use --creds, --authfile or CNB_REGISTRY_AUTH)".into(),
            },
        });
    }
    if !status.is_success() {
        return Err(RegistryError::Refused {
            what,
            why: format!("the token service answered {status}"),
        });
    }
    let body: Value = response
        .json_limited()
        .map_err(|why| RegistryError::BadContent {
            what: what.clone(),
            why,
        })?;
    let value = body
        .get("token")
        .or_else(|| body.get("access_token"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| RegistryError::BadContent {
            what: what.clone(),
            why: "its answer has no token".into(),
        })?;
    let lifetime = body
        .get("expires_in")
        .and_then(Value::as_u64)
        .unwrap_or(60)
        .max(1);
    let lifetime = Duration::from_secs(lifetime);
    tracing::debug!("{registry}: a token for {} s", lifetime.as_secs());
    Ok(Token {
        value: value.to_string(),
        expires: started + lifetime,
        lifetime,
    })
}

/// Percent-encoding for a form value.
fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reading a small JSON answer without trusting its size.
pub trait JsonLimited {
    fn json_limited(self) -> Result<Value, String>;
}

impl JsonLimited for reqwest::blocking::Response {
    fn json_limited(self) -> Result<Value, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        self.take(1 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading its answer: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|_| "its answer is not JSON".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn cnb_registry_auth_entries() {
        let json = format!(
            r#"{{"reg.example:5000": "Basic {}", "index.docker.io": "Bearer tok"}}"#,
            BASE64.encode("me:pa:ss")
        );
        assert_eq!(
            from_cnb_registry_auth(&json, "reg.example:5000").unwrap(),
            Some(Credential::Basic {
                user: "me".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            from_cnb_registry_auth(&json, "docker.io").unwrap(),
            Some(Credential::Bearer("tok".into()))
        );
        assert_eq!(from_cnb_registry_auth(&json, "other").unwrap(), None);
        let err = from_cnb_registry_auth(r#"{"x": "Digest secretvalue"}"#, "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CNB_REGISTRY_AUTH") && !err.contains("secretvalue"),
            "{err}"
        );
        let err = from_cnb_registry_auth("not json secretvalue", "x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secretvalue"), "{err}");
    }

    #[test]
    fn authfile_auths_entries_are_read_and_flags_win() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("config.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths": {{"reg.example:5000": {{"auth": "{}"}}}}}}"#,
                BASE64.encode("alice:s3cret")
            ),
        )
        .unwrap();
        let mut s = Settings::from_env();
        s.cnb_registry_auth = None;
        s.authfile = Some(file.clone());
        assert_eq!(
            credential_for(&s, "reg.example:5000").unwrap(),
            Some(Credential::Basic {
                user: "alice".into(),
                password: "s3cret".into()
            })
        );
        assert_eq!(credential_for(&s, "other.example").unwrap(), None);
        s.cnb_registry_auth = Some(r#"{"reg.example:5000": "Bearer abc"}"#.into());
        assert_eq!(
            credential_for(&s, "reg.example:5000").unwrap(),
            Some(Credential::Bearer("abc".into()))
        );
        s.creds = Some(("bob".into(), "pw".into()));
        assert!(matches!(
            credential_for(&s, "reg.example:5000").unwrap(),
            Some(Credential::Basic { user, .. }) if user == "bob"
        ));
        std::fs::write(&file, "{not json").unwrap();
        s.creds = None;
        s.cnb_registry_auth = None;
        let err = credential_for(&s, "reg.example:5000")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("not a valid"),
            "{err}"
        );
    }

    #[test]
    fn tokens_are_renewed_a_quarter_of_their_life_early_at_most_10_s() {
        let token = |lifetime: u64, left: u64| Token {
            value: "t".into(),
            expires: Instant::now() + Duration::from_secs(left),
            lifetime: Duration::from_secs(lifetime),
        };
        assert!(token(300, 20).is_fresh());
        assert!(!token(300, 9).is_fresh());
        assert!(token(4, 2).is_fresh());
        assert!(!token(4, 0).is_fresh());
        assert!(!token(8, 1).is_fresh() && token(8, 3).is_fresh());
    }

    #[test]
    fn credentials_do_not_show_in_debug() {
        let c = Credential::Basic {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credential::Bearer("tok123".into())).contains("tok123"));
    }
}
