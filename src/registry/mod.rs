//! The registry transport (`docker://`): an OCI distribution client and the registry
//! [`ImageSource`](crate::image::ImageSource) and [`ImageSink`](crate::image::ImageSink).
//!
//! What this module owns:
//! - [`settings`]: the registry flags of `cli-conventions.md` (`--creds`, `--authfile`,
//!   `--ca-cert`, `--insecure-registry`, `CNB_REGISTRY_AUTH`, `CNB_INSECURE_REGISTRIES`,
//!   certs.d) and the timeout, set once per process by the CLI.
//! - [`auth`]: where credentials come from, and the anonymous, basic and bearer-token flows
//!   (`WWW-Authenticate` challenges, pull/push/mount scopes, a token cache renewed before it
//!   expires and after a 401). Credentials are kept in types whose `Debug` hides them, sent in
//!   headers marked sensitive, and never put in an error.
//! - [`authfile`]: docker config.json and containers auth.json (`auths`, `credHelpers`,
//!   `credsStore`) and the `docker-credential-*` helpers they name.
//! - [`client`]: one registry host (refused before any connection, credential lookup or
//!   helper when `--offline` is set: [`client::Registry::connect`] is the one place lathe
//!   reaches a registry from): https with http fallback for loopback and insecure
//!   registries, retries with backoff on 5xx, 429 and dropped connections for the steps that
//!   may be repeated, and the distribution calls (manifests with their digests verified,
//!   resumable blob downloads, blob uploads by HEAD-skip, cross-repository mount, monolithic
//!   PUT or chunked PATCH, manifest PUT with the exact content type).
//! - [`transport`]: the registry source and sink that `lathe copy` drives; the sink uploads
//!   blobs in parallel, pushes every child manifest before its index, then what is attached
//!   to the image (cosign tags; the referrers fallback tags when the registry lacks the
//!   referrers API), and tags last, so a failed push leaves no tag.
//!
//! Written on blocking reqwest rather than oci-client: oci-client is async-only, keeps its own
//! manifest types and holds whole layers in memory when pushing an image.

pub mod auth;
pub mod authfile;
pub mod client;
pub mod settings;
pub mod transport;

pub use settings::{Settings, configure, settings};
pub use transport::{RegistrySink, RegistrySource};

/// A registry failure. Every message names the reference or repository at fault and never
/// contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered, and said no (unknown tag, denied, bad request…).
    #[error("{what}: {why}")]
    Refused { what: String, why: String },
    /// The manifest asked for does not exist (no such tag, digest or repository).
    #[error("{what}: {why}")]
    NotFound { what: String, why: String },
    /// The registry could not be reached, or kept failing after the retries.
    #[error("{what}: {why}")]
    Unreachable { what: String, why: String },
    /// Something the registry sent is not what it should be (a digest mismatch, a bad
    /// manifest, a short blob).
    #[error("{what}: {why}")]
    BadContent { what: String, why: String },
    /// A registry flag, credential file or certificate is unusable.
    #[error("{what}: {why}")]
    Config { what: String, why: String },
    /// `--offline` is given and this image is on a registry; nothing was sent.
    #[error(
        "{what}: lathe is --offline and this image is on a registry (no connection was made); \
         give it from an OCI layout or archive (`lathe bundle` gathers a build's images into one)"
    )]
    Offline { what: String },
}
