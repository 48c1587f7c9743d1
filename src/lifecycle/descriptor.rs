//! buildpack.toml: a buildpack's descriptor, read and checked as the reference lifecycle
//! reads it (`buildpack/bp_descriptor.go`), target inference included, and the lookup of a
//! buildpack by id and version in the buildpacks directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ApiVersion, LifecycleError, escape_id};

/// A buildpack on disk and what its buildpack.toml says.
#[derive(Debug, Clone, PartialEq)]
pub struct Buildpack {
    /// The directory holding buildpack.toml (`<buildpacks>/<escaped id>/<version>`).
    pub dir: PathBuf,
    pub api: ApiVersion,
    pub id: String,
    pub version: String,
    pub name: Option<String>,
    pub homepage: Option<String>,
    pub clear_env: bool,
    /// Media types of the SBOM formats the buildpack may write.
    pub sbom_formats: Vec<String>,
    /// Buildpack API 0.12 execution environments (empty: all).
    pub exec_env: Vec<String>,
    /// After the lifecycle's inference (stacks, `bin/build`): what detection matches.
    pub targets: Vec<Target>,
    /// As buildpack.toml declares them: what buildpackage labels record.
    pub declared_targets: Vec<Target>,
    /// Non-empty for a composite buildpack.
    pub order: Vec<Vec<OrderEntry>>,
}

impl Buildpack {
    pub fn is_composite(&self) -> bool {
        !self.order.is_empty()
    }

    /// Its entry in group.toml and metadata.toml.
    pub fn group_member(&self) -> super::GroupMember {
        super::GroupMember {
            id: self.id.clone(),
            version: self.version.clone(),
            api: self.api.to_string(),
            homepage: self.homepage.clone(),
        }
    }

    /// `id@version`, as errors name it.
    pub fn name_version(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub os: Option<String>,
    pub arch: Option<String>,
    pub variant: Option<String>,
    pub distros: Vec<TargetDistro>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetDistro {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// An element of an order group (order.toml or a composite buildpack's `[[order.group]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderEntry {
    pub id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// The stack id that buildpacks without targets are taken to mean linux/amd64 Ubuntu 18.04 by.
const BIONIC_STACK: &str = "io.buildpacks.stacks.bionic";

/// Ids that would collide with the lifecycle's own directories under `<layers>`.
const RESERVED_IDS: [&str; 4] = ["app", "config", "generated", "sbom"];

#[derive(Deserialize)]
struct RawDescriptor {
    api: Option<toml::Value>,
    buildpack: Option<RawInfo>,
    #[serde(default)]
    order: Vec<RawGroup>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    stacks: Vec<RawStack>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    id: Option<String>,
    version: Option<String>,
    name: Option<String>,
    homepage: Option<String>,
    #[serde(default)]
    clear_env: bool,
    #[serde(default)]
    sbom_formats: Vec<String>,
    #[serde(default)]
    exec_env: Vec<RawExecEnv>,
}

/// LC and pack write `exec-env = ["test"]`; the spec writes `[[buildpack.exec-env]] name = "test"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawExecEnv {
    Name(String),
    Table { name: String },
}

#[derive(Deserialize)]
struct RawGroup {
    #[serde(default)]
    group: Vec<OrderEntry>,
}

#[derive(Deserialize)]
struct RawTarget {
    os: Option<String>,
    arch: Option<String>,
    variant: Option<String>,
    /// The key LC reads; pack and the spec write `variant`.
    #[serde(rename = "arch-variant")]
    arch_variant: Option<String>,
    #[serde(default)]
    distros: Vec<RawDistro>,
}

#[derive(Deserialize)]
struct RawDistro {
    name: Option<String>,
    version: Option<String>,
}

#[derive(Deserialize)]
struct RawStack {
    #[serde(default)]
    id: String,
}

/// Reads `dir/buildpack.toml`.
pub fn read(dir: &Path) -> Result<Buildpack, LifecycleError> {
    let path = dir.join("buildpack.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| LifecycleError::Detect(format!("{}: {e}", path.display())))?;
    parse(&text, dir)
}

/// Parses buildpack.toml text of the buildpack in `dir` (which is looked at for `bin/build`
/// when no targets are declared).
pub fn parse(text: &str, dir: &Path) -> Result<Buildpack, LifecycleError> {
    let bad = |why: String| {
        LifecycleError::Detect(format!("{}: {why}", dir.join("buildpack.toml").display()))
    };
    let raw: RawDescriptor = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let info = raw
        .buildpack
        .ok_or_else(|| bad("no [buildpack] table".into()))?;
    let id = info
        .id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| bad("[buildpack] has no id".into()))?;
    let version = info.version.unwrap_or_default();

    let api_text = match &raw.api {
        None => "(none)".to_string(),
        Some(toml::Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    let api = match &raw.api {
        Some(toml::Value::String(text)) => text.parse::<ApiVersion>().ok(),
        _ => None,
    }
    .filter(|api| api.is_supported_buildpack_api())
    .ok_or_else(|| LifecycleError::BuildpackApi {
        buildpack: format!("{id}@{version}"),
        api: api_text,
    })?;

    validate_id(&id).map_err(bad)?;
    if version.is_empty() {
        return Err(bad(format!("buildpack {id} has no version")));
    }

    let declared: Vec<Target> = raw.targets.into_iter().map(Target::from).collect();
    let stacks: Vec<String> = raw.stacks.into_iter().map(|s| s.id).collect();
    let targets = infer_targets(declared.clone(), &stacks, api, dir);

    Ok(Buildpack {
        dir: dir.to_path_buf(),
        api,
        id,
        version,
        name: info.name,
        homepage: info.homepage,
        clear_env: info.clear_env,
        sbom_formats: info.sbom_formats,
        exec_env: info
            .exec_env
            .into_iter()
            .map(|e| match e {
                RawExecEnv::Name(name) | RawExecEnv::Table { name } => name,
            })
            .collect(),
        targets,
        declared_targets: declared,
        order: raw.order.into_iter().map(|g| g.group).collect(),
    })
}

/// Checks a buildpack id: letters, digits, `.`, `/` and `-` only, and not one of the names
/// the lifecycle uses under `<layers>`.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the buildpack id is empty".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-')))
    {
        return Err(format!(
            "buildpack id {id:?} contains {c:?} (only letters, digits, '.', '/' and '-' are allowed)"
        ));
    }
    if RESERVED_IDS.contains(&id) {
        return Err(format!("buildpack id {id:?} is reserved"));
    }
    if !is_path_segment(&escape_id(id)) {
        return Err(format!(
            "buildpack id {id:?} is not usable as a directory name"
        ));
    }
    Ok(())
}

impl From<RawTarget> for Target {
    fn from(raw: RawTarget) -> Target {
        Target {
            os: non_empty(raw.os),
            arch: non_empty(raw.arch),
            variant: non_empty(raw.arch_variant).or(non_empty(raw.variant)),
            distros: raw
                .distros
                .into_iter()
                .map(|d| TargetDistro {
                    name: non_empty(d.name),
                    version: non_empty(d.version),
                })
                .collect(),
        }
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// LC's inference for buildpacks that declare no `[[targets]]`: the bionic stack (only for
/// Buildpack API 0.10+ or when it is the only stack) and the `*` stack, then `linux` when
/// the buildpack has a `bin/build`.
fn infer_targets(
    declared: Vec<Target>,
    stacks: &[String],
    api: ApiVersion,
    dir: &Path,
) -> Vec<Target> {
    if !declared.is_empty() {
        return declared;
    }
    let mut targets = Vec::new();
    for stack in stacks {
        if stack == BIONIC_STACK {
            if api >= ApiVersion::new(0, 10) || stacks.len() == 1 {
                targets.push(Target {
                    os: Some("linux".into()),
                    arch: Some("amd64".into()),
                    variant: None,
                    distros: vec![TargetDistro {
                        name: Some("ubuntu".into()),
                        version: Some("18.04".into()),
                    }],
                });
            }
        } else if stack == "*" {
            targets.push(Target::default());
        }
    }
    if targets.is_empty() && std::fs::symlink_metadata(dir.join("bin").join("build")).is_ok() {
        targets.push(Target {
            os: Some("linux".into()),
            ..Target::default()
        });
    }
    targets
}

/// Finds and reads `<buildpacks_dir>/<escaped id>/<version>/buildpack.toml`. An empty
/// `version` (order entries may leave it out) means the only version there is.
pub fn find(buildpacks_dir: &Path, id: &str, version: &str) -> Result<Buildpack, LifecycleError> {
    let wanted = format!("{id}@{version}");
    let escaped = escape_id(id);
    if !is_path_segment(&escaped) || (!version.is_empty() && !is_path_segment(version)) {
        return Err(LifecycleError::Detect(format!(
            "buildpack {wanted}: not a valid id and version"
        )));
    }
    let id_dir = buildpacks_dir.join(&escaped);
    let versions = subdirectories(&id_dir);
    let chosen = if version.is_empty() {
        match versions.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    } else {
        Some(version.to_string())
    };
    if let Some(chosen) = chosen {
        let dir = id_dir.join(&chosen);
        if dir.join("buildpack.toml").is_file() {
            return read(&dir);
        }
    }

    let there = if versions.is_empty() {
        let all: Vec<String> = subdirectories(buildpacks_dir)
            .into_iter()
            .flat_map(|escaped_id| {
                subdirectories(&buildpacks_dir.join(&escaped_id))
                    .into_iter()
                    .map(move |v| format!("{escaped_id}/{v}"))
            })
            .collect();
        if all.is_empty() {
            format!("{} holds no buildpacks", buildpacks_dir.display())
        } else {
            format!("{} holds {}", buildpacks_dir.display(), all.join(", "))
        }
    } else if version.is_empty() {
        format!(
            "no version was given and {id} has several: {}",
            versions.join(", ")
        )
    } else {
        format!("{id} has versions {}", versions.join(", "))
    };
    Err(LifecycleError::Detect(format!(
        "buildpack {wanted} not found in {}: {there}",
        buildpacks_dir.display()
    )))
}

/// Whether `<extensions_dir>/<escaped id>` exists: an order entry naming an image extension.
pub fn is_extension(extensions_dir: &Path, id: &str) -> bool {
    let escaped = escape_id(id);
    is_path_segment(&escaped) && extensions_dir.join(escaped).is_dir()
}

fn is_path_segment(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// The names of `dir`'s subdirectories, sorted; none when it can't be read.
fn subdirectories(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(dir: &Path, text: &str) -> Result<Buildpack, LifecycleError> {
        parse(text, dir)
    }

    fn minimal(api: &str) -> String {
        format!("api = \"{api}\"\n[buildpack]\nid = \"acme/node\"\nversion = \"1.2.3\"\n")
    }

    #[test]
    fn reads_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let bp = parse_in(
            dir.path(),
            r#"
api = "0.12"
[buildpack]
id = "acme/node"
version = "1.2.3"
name = "Node"
homepage = "https://example.com"
clear-env = true
sbom-formats = ["application/vnd.cyclonedx+json"]
exec-env = ["production", "test"]
description = "ignored"
[metadata]
anything = 1
"#,
        )
        .unwrap();
        assert_eq!(bp.api, ApiVersion::new(0, 12));
        assert_eq!(bp.id, "acme/node");
        assert_eq!(bp.version, "1.2.3");
        assert_eq!(bp.name_version(), "acme/node@1.2.3");
        assert_eq!(bp.name.as_deref(), Some("Node"));
        assert_eq!(bp.homepage.as_deref(), Some("https://example.com"));
        assert!(bp.clear_env);
        assert_eq!(bp.sbom_formats, ["application/vnd.cyclonedx+json"]);
        assert_eq!(bp.exec_env, ["production", "test"]);
        assert_eq!(bp.dir, dir.path());
        assert!(bp.targets.is_empty(), "no bin/build, no stacks");
        assert!(!bp.is_composite());
    }

    #[test]
    fn exec_env_as_tables_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}[[buildpack.exec-env]]\nname = \"test\"\n[[buildpack.exec-env]]\nname = \"*\"\n",
            minimal("0.12")
        );
        assert_eq!(parse_in(dir.path(), &text).unwrap().exec_env, ["test", "*"]);
    }

    #[test]
    fn unsupported_or_missing_api_is_exit_12_naming_the_buildpack() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            minimal("0.6"),
            minimal("0.13"),
            minimal("1.0"),
            minimal("zero"),
            "[buildpack]\nid = \"acme/node\"\nversion = \"1.2.3\"\n".to_string(),
            "api = 0.7\n[buildpack]\nid = \"acme/node\"\nversion = \"1.2.3\"\n".to_string(),
        ] {
            let err = parse_in(dir.path(), &text).unwrap_err();
            assert_eq!(err.exit_code(), 12, "{text}");
            assert!(err.to_string().contains("acme/node@1.2.3"), "{err}");
        }
        for api in ["0.7", "0.8", "0.9", "0.10", "0.11", "0.12"] {
            assert!(parse_in(dir.path(), &minimal(api)).is_ok(), "{api}");
        }
    }

    #[test]
    fn ids_follow_the_naming_rules() {
        let dir = tempfile::tempdir().unwrap();
        let with_id = |id: &str| {
            parse_in(
                dir.path(),
                &format!("api = \"0.10\"\n[buildpack]\nid = \"{id}\"\nversion = \"1\"\n"),
            )
        };
        for good in ["a", "heroku/nodejs", "io.buildpacks.x-y", "A9", "apps"] {
            assert!(with_id(good).is_ok(), "{good}");
        }
        for bad in [
            "app",
            "config",
            "generated",
            "sbom",
            "a_b",
            "a b",
            "a@b",
            "..",
            "ü",
        ] {
            let err = with_id(bad).unwrap_err();
            assert_eq!(err.exit_code(), 22, "{bad}");
        }
        let err =
            parse_in(dir.path(), "api = \"0.10\"\n[buildpack]\nversion = \"1\"\n").unwrap_err();
        assert!(err.to_string().contains("no id"), "{err}");
    }

    #[test]
    fn version_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let err = parse_in(dir.path(), "api = \"0.10\"\n[buildpack]\nid = \"a\"\n").unwrap_err();
        assert_eq!(err.exit_code(), 22);
        assert!(err.to_string().contains("no version"), "{err}");
    }

    #[test]
    fn targets_accept_variant_and_arch_variant_and_distros() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"{}
[[targets]]
os = "linux"
arch = "arm64"
variant = "v8"
[[targets.distros]]
name = "ubuntu"
version = "22.04"
[[targets.distros]]
name = "debian"

[[targets]]
os = "linux"
arch = "arm"
arch-variant = "v7"

[[targets]]
"#,
            minimal("0.10")
        );
        let bp = parse_in(dir.path(), &text).unwrap();
        assert_eq!(
            bp.targets,
            [
                Target {
                    os: Some("linux".into()),
                    arch: Some("arm64".into()),
                    variant: Some("v8".into()),
                    distros: vec![
                        TargetDistro {
                            name: Some("ubuntu".into()),
                            version: Some("22.04".into())
                        },
                        TargetDistro {
                            name: Some("debian".into()),
                            version: None
                        },
                    ],
                },
                Target {
                    os: Some("linux".into()),
                    arch: Some("arm".into()),
                    variant: Some("v7".into()),
                    distros: vec![],
                },
                Target::default(),
            ]
        );
    }

    fn bionic() -> Target {
        Target {
            os: Some("linux".into()),
            arch: Some("amd64".into()),
            variant: None,
            distros: vec![TargetDistro {
                name: Some("ubuntu".into()),
                version: Some("18.04".into()),
            }],
        }
    }

    #[test]
    fn stacks_are_translated_as_lc_does() {
        let dir = tempfile::tempdir().unwrap();
        let with_stacks = |api: &str, stacks: &[&str]| {
            let mut text = minimal(api);
            for s in stacks {
                text.push_str(&format!("[[stacks]]\nid = \"{s}\"\n"));
            }
            parse_in(dir.path(), &text).unwrap().targets
        };
        let bionic_id = "io.buildpacks.stacks.bionic";
        assert_eq!(with_stacks("0.9", &[bionic_id]), [bionic()]);
        assert_eq!(
            with_stacks("0.9", &[bionic_id, "io.paketo.stacks.tiny"]),
            [],
            "below 0.10 only a lone bionic stack is translated"
        );
        assert_eq!(
            with_stacks("0.10", &[bionic_id, "io.paketo.stacks.tiny"]),
            [bionic()]
        );
        assert_eq!(with_stacks("0.8", &["*"]), [Target::default()]);
        assert_eq!(
            with_stacks("0.10", &["*", bionic_id]),
            [Target::default(), bionic()]
        );
        assert_eq!(with_stacks("0.8", &["io.paketo.stacks.tiny"]), []);

        let declared = format!(
            "{}[[stacks]]\nid = \"{bionic_id}\"\n[[targets]]\nos = \"linux\"\n",
            minimal("0.10")
        );
        assert_eq!(
            parse_in(dir.path(), &declared).unwrap().targets,
            [Target {
                os: Some("linux".into()),
                ..Target::default()
            }],
            "declared targets win over stacks"
        );
    }

    #[test]
    fn bin_build_means_linux_when_nothing_else_says() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/build"), "#!/bin/sh\n").unwrap();
        let linux = Target {
            os: Some("linux".into()),
            ..Target::default()
        };
        assert_eq!(
            parse_in(dir.path(), &minimal("0.9")).unwrap().targets,
            [linux]
        );
        let tiny = format!(
            "{}[[stacks]]\nid = \"io.paketo.stacks.tiny\"\n",
            minimal("0.9")
        );
        assert_eq!(
            parse_in(dir.path(), &tiny).unwrap().targets.len(),
            1,
            "an untranslated stack still falls back to bin/build"
        );
        let star = format!("{}[[stacks]]\nid = \"*\"\n", minimal("0.9"));
        assert_eq!(
            parse_in(dir.path(), &star).unwrap().targets,
            [Target::default()]
        );
    }

    #[test]
    fn composite_buildpacks_read_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"{}
[[order]]
[[order.group]]
id = "a"
version = "1"
[[order.group]]
id = "b"
optional = true

[[order]]
[[order.group]]
id = "c"
version = "3"
"#,
            minimal("0.10")
        );
        let bp = parse_in(dir.path(), &text).unwrap();
        assert!(bp.is_composite());
        let entry = |id: &str, version: &str, optional| OrderEntry {
            id: id.into(),
            version: version.into(),
            optional,
        };
        assert_eq!(
            bp.order,
            [
                vec![entry("a", "1", false), entry("b", "", true)],
                vec![entry("c", "3", false)]
            ]
        );
    }

    fn install(root: &Path, id: &str, version: &str) -> PathBuf {
        let dir = root.join(escape_id(id)).join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("buildpack.toml"),
            format!("api = \"0.10\"\n[buildpack]\nid = \"{id}\"\nversion = \"{version}\"\n"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn find_reads_the_escaped_directory_and_infers_a_lone_version() {
        let root = tempfile::tempdir().unwrap();
        let node = install(root.path(), "acme/node", "1.0.0");
        install(root.path(), "acme/java", "1.0.0");
        install(root.path(), "acme/java", "2.0.0");

        let bp = find(root.path(), "acme/node", "1.0.0").unwrap();
        assert_eq!((bp.id.as_str(), bp.dir.as_path()), ("acme/node", &*node));
        assert_eq!(find(root.path(), "acme/node", "").unwrap().version, "1.0.0");
        assert_eq!(
            find(root.path(), "acme/java", "2.0.0").unwrap().version,
            "2.0.0"
        );

        let several = find(root.path(), "acme/java", "").unwrap_err();
        assert_eq!(several.exit_code(), 22);
        let text = several.to_string();
        assert!(text.contains("acme/java@"), "{text}");
        assert!(text.contains("1.0.0, 2.0.0"), "{text}");

        let wrong_version = find(root.path(), "acme/node", "9").unwrap_err().to_string();
        assert!(wrong_version.contains("acme/node@9"), "{wrong_version}");
        assert!(wrong_version.contains("versions 1.0.0"), "{wrong_version}");

        let absent = find(root.path(), "acme/go", "1").unwrap_err().to_string();
        assert!(absent.contains("acme/go@1"), "{absent}");
        assert!(
            absent.contains("acme_java/1.0.0, acme_java/2.0.0, acme_node/1.0.0"),
            "{absent}"
        );

        let escape = find(root.path(), "acme/node", "../../x").unwrap_err();
        assert_eq!(escape.exit_code(), 22);
    }

    #[test]
    fn extensions_are_noticed_by_directory() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("acme_curl/1")).unwrap();
        assert!(is_extension(root.path(), "acme/curl"));
        assert!(!is_extension(root.path(), "acme/node"));
        assert!(!is_extension(root.path(), ".."));
    }
}
