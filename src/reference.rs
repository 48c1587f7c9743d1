//! Image references and transports, as `cli-conventions.md` fixes them:
//! `docker://[registry/]repo[:tag][@digest]` (also a bare name), `oci:DIR[:ref]`,
//! `oci-archive:FILE[:ref]` and `docker-archive:FILE[:ref]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use oci_spec::image::Digest;

use crate::content::parse_sha256;

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {text:?}: {why}")]
pub struct ReferenceError {
    pub text: String,
    pub why: String,
}

/// A registry reference after Docker normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Where an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Registry(RegistryRef),
    /// An OCI image layout directory and the `org.opencontainers.image.ref.name` inside it.
    Layout {
        dir: PathBuf,
        name: Option<String>,
    },
    /// A tar of an OCI layout.
    OciArchive {
        file: PathBuf,
        name: Option<String>,
    },
    /// The `docker save` format. `name` is a repo tag, or `@N` for the N-th image.
    DockerArchive {
        file: PathBuf,
        name: Option<String>,
    },
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<ImageRef, ReferenceError> {
        let err = |why: &str| ReferenceError {
            text: text.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = text.strip_prefix("docker://") {
            return RegistryRef::parse(rest)
                .map(ImageRef::Registry)
                .map_err(|why| err(&why));
        }
        for (prefix, make) in [
            (
                "oci:",
                make_layout as fn(PathBuf, Option<String>) -> ImageRef,
            ),
            ("oci-archive:", make_oci_archive),
            ("docker-archive:", make_docker_archive),
        ] {
            if let Some(rest) = text.strip_prefix(prefix) {
                let (path, name) = match rest.split_once(':') {
                    Some((path, name)) => (path, Some(name)),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(err(&format!("{prefix} needs a path")));
                }
                if let Some(name) = name {
                    if prefix == "docker-archive:" {
                        check_docker_archive_name(name).map_err(|why| err(&why))?;
                    } else {
                        check_ref_name(name).map_err(|why| err(&why))?;
                    }
                }
                return Ok(make(PathBuf::from(path), name.map(str::to_string)));
            }
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(err(&format!(
                "unknown transport {scheme:?} (use docker://, oci:, oci-archive: or docker-archive:)"
            )));
        }
        if text.starts_with('/') || text.starts_with('.') || text.starts_with('~') {
            return Err(err(
                "a path needs a transport: oci:DIR, oci-archive:FILE or docker-archive:FILE",
            ));
        }
        RegistryRef::parse(text)
            .map(ImageRef::Registry)
            .map_err(|why| err(&why))
    }
}

fn make_layout(dir: PathBuf, name: Option<String>) -> ImageRef {
    ImageRef::Layout { dir, name }
}
fn make_oci_archive(file: PathBuf, name: Option<String>) -> ImageRef {
    ImageRef::OciArchive { file, name }
}
fn make_docker_archive(file: PathBuf, name: Option<String>) -> ImageRef {
    ImageRef::DockerArchive { file, name }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, path, name) = match self {
            ImageRef::Registry(r) => return write!(f, "docker://{r}"),
            ImageRef::Layout { dir, name } => ("oci", dir, name),
            ImageRef::OciArchive { file, name } => ("oci-archive", file, name),
            ImageRef::DockerArchive { file, name } => ("docker-archive", file, name),
        };
        write!(f, "{prefix}:{}", path.display())?;
        if let Some(name) = name {
            write!(f, ":{name}")?;
        }
        Ok(())
    }
}

impl RegistryRef {
    /// Parses `[registry/]repo[:tag][@digest]` with Docker's normalisation.
    pub fn parse(text: &str) -> Result<RegistryRef, String> {
        let (rest, digest) = match text.split_once('@') {
            Some((rest, d)) => (rest, Some(parse_sha256(d)?)),
            None => (text, None),
        };
        // A tag is after the last ':' that comes after the last '/', so `host:5000/repo` works.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.into()
        } else {
            registry
        };
        check_registry(&registry)?;
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(&repository)?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'[' || b == b']');
    if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("{registry:?} is not a valid registry host[:port]"));
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), String> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
            && !c.contains("..")
    };
    if repo.len() > 255 || !repo.split('/').all(component_ok) {
        return Err(format!(
            "repository {repo:?} must be lowercase letters, digits and separators ('.', '_', '-', '/')"
        ));
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || b"_.-".contains(&x));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} is not valid ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
        ))
    }
}

/// Checks an OCI layout ref name against the image-spec grammar:
/// components of alphanumerics joined by `-._:@+` or `--`, separated by `/`.
pub fn check_ref_name(name: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "ref name {name:?} is not valid (letters, digits, separated by one of -._:@+/)"
        ))
    };
    if name.is_empty() {
        return bad();
    }
    for component in name.split('/') {
        let b = component.as_bytes();
        if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric()
        {
            return bad();
        }
        let mut prev_sep = false;
        for (i, &c) in b.iter().enumerate() {
            let sep = b"-._:@+".contains(&c);
            if !(c.is_ascii_alphanumeric() || sep) {
                return bad();
            }
            // Two separators in a row are only allowed as "--".
            if sep && prev_sep && !(c == b'-' && b[i - 1] == b'-') {
                return bad();
            }
            prev_sep = sep;
        }
    }
    Ok(())
}

fn check_docker_archive_name(name: &str) -> Result<(), String> {
    if let Some(index) = name.strip_prefix('@') {
        return index
            .parse::<usize>()
            .map(|_| ())
            .map_err(|_| format!("{name:?}: '@' must be followed by an image number"));
    }
    RegistryRef::parse(name).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(text: &str) -> RegistryRef {
        match text.parse::<ImageRef>().unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn docker_normalisation() {
        assert_eq!(
            reg("busybox").to_string(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            reg("docker://paketo/builder:base").to_string(),
            "docker.io/paketo/builder:base"
        );
        assert_eq!(
            reg("index.docker.io/x/y").to_string(),
            "docker.io/x/y:latest"
        );
        let r = reg("localhost:5000/a/b:v1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        let d = format!("sha256:{}", "0".repeat(64));
        let r = reg(&format!("127.0.0.1:5000/app@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.unwrap().to_string(), d);
    }

    #[test]
    fn local_transports() {
        assert_eq!(
            "oci:/tmp/x:run".parse::<ImageRef>().unwrap(),
            ImageRef::Layout {
                dir: "/tmp/x".into(),
                name: Some("run".into())
            }
        );
        assert_eq!(
            "oci-archive:b.tar".parse::<ImageRef>().unwrap(),
            ImageRef::OciArchive {
                file: "b.tar".into(),
                name: None
            }
        );
        assert_eq!(
            "docker-archive:c.tar:app:v1".parse::<ImageRef>().unwrap(),
            ImageRef::DockerArchive {
                file: "c.tar".into(),
                name: Some("app:v1".into())
            }
        );
        assert!("docker-archive:c.tar:@1".parse::<ImageRef>().is_ok());
        assert_eq!(
            "oci:/x:v1.0-linux-amd64"
                .parse::<ImageRef>()
                .unwrap()
                .to_string(),
            "oci:/x:v1.0-linux-amd64"
        );
    }

    #[test]
    fn bad_references_name_the_problem() {
        for (text, why) in [
            ("./dir", "needs a transport"),
            ("ftp://x/y", "unknown transport"),
            ("oci:", "needs a path"),
            ("oci:/x:bad name", "ref name"),
            ("Busybox", "repository"),
            ("busybox:bad/tag!", "not a valid registry"),
            ("busybox:-x", "tag"),
            ("busybox@sha256:abc", "64 lowercase hex"),
        ] {
            let err = text.parse::<ImageRef>().unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }
}
