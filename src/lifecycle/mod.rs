//! The buildpack lifecycle: detect and build, run the way the CNB lifecycle runs them, inside
//! the build container. This code runs where the buildpacks run and knows only container
//! paths: inside a lathe sandbox (pid 1's payload runs it instead of exec'ing a program), or
//! directly in the CI job's own builder image with `--sandbox none`. The host side
//! ([`crate::build`]) prepares the work area beforehand and reads the files this writes
//! (group.toml, plan.toml, config/metadata.toml) afterwards.
//!
//! `../shared/cnb-spec-digest.md` §1–§2 is the contract; where the spec and the reference
//! lifecycle differ, this follows the lifecycle, because real buildpacks are tested against it.

pub mod build;
pub mod descriptor;
pub mod detect;
pub mod env;
pub mod launch;
pub mod order;
pub mod phase;
pub mod restore;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The Platform API lathe implements every rule of.
pub const PLATFORM_API: ApiVersion = ApiVersion {
    major: 0,
    minor: 13,
};
/// The oldest and newest Buildpack APIs lathe honours.
pub const BUILDPACK_APIS: (ApiVersion, ApiVersion) = (
    ApiVersion { major: 0, minor: 7 },
    ApiVersion {
        major: 0,
        minor: 12,
    },
);

/// A `<major>.<minor>` API version (`<major>` alone means `<major>.0`), compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
}

impl ApiVersion {
    pub const fn new(major: u32, minor: u32) -> ApiVersion {
        ApiVersion { major, minor }
    }

    /// Whether lathe honours this Buildpack API.
    pub fn is_supported_buildpack_api(self) -> bool {
        (BUILDPACK_APIS.0..=BUILDPACK_APIS.1).contains(&self)
    }
}

impl FromStr for ApiVersion {
    type Err = String;

    fn from_str(text: &str) -> Result<ApiVersion, String> {
        let bad = || format!("{text:?} is not an API version (<major>.<minor>)");
        let number = |part: &str| -> Result<u32, String> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        match text.split_once('.') {
            Some((major, minor)) => Ok(ApiVersion::new(number(major)?, number(minor)?)),
            None => Ok(ApiVersion::new(number(text)?, 0)),
        }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Where things are inside the build container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Paths {
    pub app: PathBuf,
    pub layers: PathBuf,
    pub platform: PathBuf,
    pub buildpacks: PathBuf,
    pub extensions: PathBuf,
    pub build_config: PathBuf,
    /// order.toml: `<layers>/order.toml` if it exists, else `/cnb/order.toml`.
    pub order: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            app: "/workspace".into(),
            layers: "/layers".into(),
            platform: "/platform".into(),
            buildpacks: "/cnb/buildpacks".into(),
            extensions: "/cnb/extensions".into(),
            build_config: "/cnb/build-config".into(),
            order: "/cnb/order.toml".into(),
        }
    }
}

/// The run image's target, which detection matches buildpacks against and buildpacks see as
/// `CNB_TARGET_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetData {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
    pub distro: Option<Distro>,
    /// `io.buildpacks.base.id`.
    pub id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Distro {
    pub name: String,
    pub version: String,
}

/// The lifecycle's failures, each with the exit code the reference lifecycle gives it.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Exit 12.
    #[error(
        "buildpack {buildpack}: Buildpack API {api} is not supported (lathe honours {min} \
         through {max})",
        min = BUILDPACK_APIS.0,
        max = BUILDPACK_APIS.1
    )]
    BuildpackApi { buildpack: String, api: String },
    /// Exit 20 (every group failed) or 21 (and at least one buildpack errored); `report`
    /// holds what each group's buildpacks said.
    #[error("no buildpack group passed detection\n{report}")]
    NoGroupPassed { errored: bool, report: String },
    /// Exit 22: anything else that stops detection (a bad order, a missing buildpack, an
    /// image extension lathe won't run).
    #[error("detect: {0}")]
    Detect(String),
    /// Exit 51: a `bin/build` exited non-zero (its output was shown as it ran).
    #[error("buildpack {buildpack}: bin/build failed with exit code {code}")]
    BuildpackFailed { buildpack: String, code: i32 },
    /// Exit 52: anything else that stops the build (bad TOML from a buildpack, say).
    #[error("build: {0}")]
    Build(String),
}

impl LifecycleError {
    pub fn exit_code(&self) -> i32 {
        match self {
            LifecycleError::BuildpackApi { .. } => 12,
            LifecycleError::NoGroupPassed { errored: false, .. } => 20,
            LifecycleError::NoGroupPassed { errored: true, .. } => 21,
            LifecycleError::Detect(_) => 22,
            LifecycleError::BuildpackFailed { .. } => 51,
            LifecycleError::Build(_) => 52,
        }
    }
}

/// A buildpack of the group detection chose (group.toml's `[[group]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupMember {
    pub id: String,
    pub version: String,
    pub api: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
}

/// group.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupFile {
    #[serde(default)]
    pub group: Vec<GroupMember>,
}

/// plan.toml: one entry per dependency name, with every provider and every requirement.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanFile {
    #[serde(default)]
    pub entries: Vec<PlanEntry>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanEntry {
    pub providers: Vec<Provider>,
    pub requires: Vec<Require>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Provider {
    pub id: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Require {
    pub name: String,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub metadata: toml::Table,
}

/// A buildpack id as a path segment (`/` becomes `_`), as in `/cnb/buildpacks/<id>` and
/// `<layers>/<id>`.
pub fn escape_id(id: &str) -> String {
    id.replace('/', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_parse_and_compare_numerically() {
        let v = |s: &str| s.parse::<ApiVersion>().unwrap();
        assert_eq!(v("0.10"), ApiVersion::new(0, 10));
        assert_eq!(v("1"), ApiVersion::new(1, 0));
        assert!(v("0.9") < v("0.10"));
        assert!(v("0.7").is_supported_buildpack_api());
        assert!(v("0.12").is_supported_buildpack_api());
        assert!(!v("0.6").is_supported_buildpack_api());
        assert!(!v("0.13").is_supported_buildpack_api());
        assert!(!v("1.0").is_supported_buildpack_api());
        for bad in ["", "0.", ".1", "0.x", "-1", "0.1.2", "v0.9"] {
            assert!(bad.parse::<ApiVersion>().is_err(), "{bad}");
        }
        assert_eq!(v("0.12").to_string(), "0.12");
    }

    #[test]
    fn ids_escape_slashes() {
        assert_eq!(escape_id("heroku/nodejs"), "heroku_nodejs");
    }
}
