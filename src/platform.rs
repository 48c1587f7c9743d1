//! Platforms (`os/arch[/variant]`): parsing, the host platform, and matching the way
//! container tools do (`linux/arm64` ≡ `linux/arm64/v8`).

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Arch, Os};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid platform {text:?}: {why} (expected os/arch[/variant], e.g. linux/arm64)")]
pub struct PlatformError {
    text: String,
    why: &'static str,
}

impl Platform {
    pub fn new(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        let arch = match arch {
            "x86_64" | "x86-64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        // Drop the variants that are the architecture's only or default one, so that equal
        // platforms compare equal.
        let variant = variant
            .filter(|v| !v.is_empty() && !matches!((arch, *v), ("arm64", "v8") | ("amd64", "v1")));
        Platform {
            os: os.to_string(),
            arch: arch.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// The platform lathe itself runs on.
    pub fn host() -> Platform {
        Platform::new(std::env::consts::OS, std::env::consts::ARCH, None)
    }

    pub fn from_oci(p: &oci_spec::image::Platform) -> Platform {
        Platform::new(
            &p.os().to_string(),
            &p.architecture().to_string(),
            p.variant().as_deref(),
        )
    }

    /// The descriptor platform to record in an index. arm64 gets its `v8` variant spelled out,
    /// as docker buildx and the registries' own tooling write it.
    pub fn to_oci(&self) -> oci_spec::image::Platform {
        let mut p = oci_spec::image::Platform::default();
        p.set_os(Os::from(self.os.as_str()));
        p.set_architecture(Arch::from(self.arch.as_str()));
        p.set_variant(self.oci_variant());
        p
    }

    /// The variant as image configs and indexes write it.
    pub fn oci_variant(&self) -> Option<String> {
        match (&self.variant, self.arch.as_str()) {
            (Some(v), _) => Some(v.clone()),
            (None, "arm64") => Some("v8".to_string()),
            (None, _) => None,
        }
    }

    /// `linux-arm64`, `linux-arm-v7`: the suffix of per-platform ref names.
    pub fn ref_suffix(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}-{}-{v}", self.os, self.arch),
            None => format!("{}-{}", self.os, self.arch),
        }
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(text: &str) -> Result<Platform, PlatformError> {
        let err = |why| PlatformError {
            text: text.to_string(),
            why,
        };
        let parts: Vec<&str> = text.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(err("it needs two or three parts separated by '/'"));
        }
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !parts.iter().all(|p| valid(p)) {
            return Err(err("each part must be lowercase letters, digits or '_'"));
        }
        Ok(Platform::new(parts[0], parts[1], parts.get(2).copied()))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm64_and_arm64_v8_are_the_same_platform() {
        let a: Platform = "linux/arm64".parse().unwrap();
        let b: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "linux/arm64");
        assert_eq!(a.oci_variant().as_deref(), Some("v8"));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(v7.ref_suffix(), "linux-arm-v7");
    }

    #[test]
    fn bad_platforms_name_the_input() {
        for bad in [
            "linux",
            "linux/",
            "Linux/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            let err = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn host_platform_uses_go_names() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert!(host.arch != "x86_64" && host.arch != "aarch64");
    }
}
