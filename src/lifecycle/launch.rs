//! The files a buildpack's `bin/build` leaves behind and the one the build phase writes from
//! them: `<layer>.toml`, `build.toml` and `launch.toml` as each Buildpack API defines them, and
//! `<layers>/config/metadata.toml` exactly as the reference lifecycle writes it for the
//! exporter and the launcher.
//!
//! Parsers take the file's text and return the reason a file is bad as a plain string; the
//! caller knows which buildpack and path to blame. Warnings (things the lifecycle tolerates
//! but a buildpack author should hear about) come back alongside the parsed value.

use serde::{Deserialize, Serialize};

use super::{ApiVersion, GroupMember};

/// The `[types]` of a `<layer>.toml`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTypes {
    #[serde(default)]
    pub build: bool,
    #[serde(default)]
    pub launch: bool,
    #[serde(default)]
    pub cache: bool,
}

impl LayerTypes {
    /// A layer with no type is not exported, cached or used during the build.
    pub fn is_none(self) -> bool {
        !(self.build || self.launch || self.cache)
    }
}

/// A `<layer>.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerToml {
    #[serde(default)]
    pub types: LayerTypes,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub metadata: toml::Table,
}

/// The layer names a buildpack may not use: they are its `build.toml`, `launch.toml` and
/// `store.toml`.
pub const RESERVED_LAYER_NAMES: [&str; 3] = ["build", "launch", "store"];

/// A `<layer>.toml` found in a buildpack's layers directory.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFile {
    pub name: String,
    pub path: std::path::PathBuf,
    pub layer: LayerToml,
}

/// Every `<layer>.toml` (not build/launch/store.toml) of a buildpack's layers directory,
/// parsed, in name order; a missing directory has none. An error names the file at fault.
pub fn read_layer_files(
    bp_layers: &std::path::Path,
) -> Result<Vec<LayerFile>, (std::path::PathBuf, String)> {
    let entries = match std::fs::read_dir(bp_layers) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err((bp_layers.to_path_buf(), e.to_string())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| (bp_layers.to_path_buf(), e.to_string()))?;
        let path = entry.path();
        let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".toml"))
            .map(String::from)
        else {
            continue;
        };
        if RESERVED_LAYER_NAMES.contains(&name.as_str()) || path.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| (path.clone(), e.to_string()))?;
        let layer = parse_layer_toml(&text).map_err(|why| (path.clone(), why))?;
        found.push(LayerFile { name, path, layer });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// Parses a `<layer>.toml`. The flags belong under `[types]` for every Buildpack API lathe
/// honours; written at the top level (the pre-0.6 layout) they are an error, as in the
/// reference lifecycle.
pub fn parse_layer_toml(text: &str) -> Result<LayerToml, String> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        types: LayerTypes,
        #[serde(default)]
        metadata: toml::Table,
        build: Option<toml::Value>,
        launch: Option<toml::Value>,
        cache: Option<toml::Value>,
    }
    let raw: Raw = toml::from_str(text).map_err(|e| format!("{e}"))?;
    if raw.build.is_some() || raw.launch.is_some() || raw.cache.is_some() {
        return Err("the launch, build and cache flags belong in the [types] table".into());
    }
    Ok(LayerToml {
        types: raw.types,
        metadata: raw.metadata,
    })
}

/// `build.toml`'s `[[unmet]]`: plan entries the buildpack did not provide, left for later
/// providers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmet {
    #[serde(default)]
    pub name: String,
}

/// A `build.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildToml {
    pub unmet: Vec<Unmet>,
}

/// Parses a `build.toml`; the deprecated `[[bom]]` is ignored with a warning.
pub fn parse_build_toml(text: &str) -> Result<(BuildToml, Vec<String>), String> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        unmet: Vec<Unmet>,
        bom: Option<toml::Value>,
    }
    let raw: Raw = toml::from_str(text).map_err(|e| format!("{e}"))?;
    if raw.unmet.iter().any(|u| u.name.is_empty()) {
        return Err("an [[unmet]] entry has no name".into());
    }
    let mut warnings = Vec::new();
    if raw.bom.is_some() {
        warnings.push(LEGACY_BOM_WARNING.to_string());
    }
    Ok((BuildToml { unmet: raw.unmet }, warnings))
}

const LEGACY_BOM_WARNING: &str = "[[bom]] is deprecated and ignored; write <layer>.sbom.<ext>, \
                                  launch.sbom.<ext> or build.sbom.<ext> instead";

/// An image label from `launch.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// A `[[slices]]` entry: globs relative to the app dir whose matches get their own layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    #[serde(default)]
    pub paths: Vec<String>,
}

/// A process as a buildpack declared it, with the Buildpack API's rules already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchProcess {
    pub process_type: String,
    /// The executable and its always-passed arguments (a single element, the command string,
    /// for Buildpack API < 0.9).
    pub command: Vec<String>,
    /// Default arguments, which a user's arguments replace (Buildpack API ≥ 0.9).
    pub args: Vec<String>,
    /// Always true from Buildpack API 0.9; before, false (run through bash) unless declared.
    pub direct: bool,
    pub default: bool,
    /// Honoured from Buildpack API 0.8.
    pub working_dir: Option<String>,
    /// Buildpack API 0.12 execution environments (empty: all).
    pub exec_env: Vec<String>,
}

impl LaunchProcess {
    /// The metadata.toml form for `buildpack_id`'s process: from Platform API 0.10 the command
    /// is an array; before, a string, with the rest of the command moved in front of `args`.
    pub fn to_metadata(&self, buildpack_id: &str, platform_api: ApiVersion) -> Process {
        let (command, args) = if platform_api >= ApiVersion::new(0, 10) {
            (
                ProcessCommand::Tokens(self.command.clone()),
                self.args.clone(),
            )
        } else {
            let (first, rest) = self
                .command
                .split_first()
                .map(|(first, rest)| (first.clone(), rest.to_vec()))
                .unwrap_or_default();
            let args = rest.into_iter().chain(self.args.iter().cloned()).collect();
            (ProcessCommand::Single(first), args)
        };
        Process {
            process_type: self.process_type.clone(),
            command,
            args,
            direct: self.direct,
            buildpack_id: buildpack_id.to_string(),
            working_dir: self.working_dir.clone(),
            exec_env: self.exec_env.clone(),
        }
    }
}

/// A `launch.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchToml {
    pub labels: Vec<Label>,
    pub processes: Vec<LaunchProcess>,
    pub slices: Vec<Slice>,
}

/// Parses a `launch.toml` written by a buildpack of Buildpack API `api`:
/// - before 0.9 a process's `command` is a string and `direct` defaults to false; from 0.9
///   `command` is an array and a `direct` key is an error;
/// - `working-dir` is ignored, with a warning, before 0.8;
/// - `exec-env` is read from 0.12;
/// - at most one process may be the default.
pub fn parse_launch_toml(text: &str, api: ApiVersion) -> Result<(LaunchToml, Vec<String>), String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct RawProcess {
        #[serde(rename = "type", default)]
        process_type: String,
        command: Option<toml::Value>,
        #[serde(default)]
        args: Vec<String>,
        direct: Option<bool>,
        #[serde(default)]
        default: bool,
        working_dir: Option<String>,
        #[serde(default)]
        exec_env: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        labels: Vec<Label>,
        #[serde(default)]
        processes: Vec<RawProcess>,
        #[serde(default)]
        slices: Vec<Slice>,
        bom: Option<toml::Value>,
    }
    let raw: Raw = toml::from_str(text).map_err(|e| format!("{e}"))?;
    let mut warnings = Vec::new();
    if raw.bom.is_some() {
        warnings.push(LEGACY_BOM_WARNING.to_string());
    }
    let array_commands = api >= ApiVersion::new(0, 9);
    let mut processes = Vec::with_capacity(raw.processes.len());
    for p in raw.processes {
        if p.process_type.is_empty() {
            return Err("a [[processes]] entry has no type".into());
        }
        let bad = |why: &str| format!("process {:?}: {why}", p.process_type);
        let command = match (&p.command, array_commands) {
            (None, _) => return Err(bad("no command")),
            (Some(toml::Value::String(line)), false) => vec![line.clone()],
            (Some(_), false) => {
                return Err(bad("command must be a string before Buildpack API 0.9"));
            }
            (Some(toml::Value::Array(items)), true) => items
                .iter()
                .map(|item| item.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .filter(|tokens| !tokens.is_empty())
                .ok_or_else(|| bad("command must be a non-empty array of strings"))?,
            (Some(_), true) => {
                return Err(bad(
                    "command must be an array of strings from Buildpack API 0.9",
                ));
            }
        };
        let direct = match (p.direct, array_commands) {
            (Some(_), true) => {
                return Err(bad(
                    "direct is not allowed from Buildpack API 0.9 (processes are always direct)",
                ));
            }
            (None, true) => true,
            (direct, false) => direct.unwrap_or(false),
        };
        let working_dir = match p.working_dir {
            Some(dir) if api < ApiVersion::new(0, 8) => {
                warnings.push(format!(
                    "process {:?}: working-dir {dir:?} ignored (it needs Buildpack API 0.8)",
                    p.process_type
                ));
                None
            }
            other => other.filter(|dir| !dir.is_empty()),
        };
        let exec_env = if api >= ApiVersion::new(0, 12) {
            p.exec_env
        } else {
            Vec::new()
        };
        processes.push(LaunchProcess {
            process_type: p.process_type,
            command,
            args: p.args,
            direct,
            default: p.default,
            working_dir,
            exec_env,
        });
    }
    let defaults: Vec<&str> = processes
        .iter()
        .filter(|p| p.default)
        .map(|p| p.process_type.as_str())
        .collect();
    if defaults.len() > 1 {
        return Err(format!(
            "more than one default process ({})",
            defaults.join(", ")
        ));
    }
    Ok((
        LaunchToml {
            labels: raw.labels,
            processes,
            slices: raw.slices,
        },
        warnings,
    ))
}

/// A process's command in metadata.toml: an array from Platform API 0.10, a string before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProcessCommand {
    Tokens(Vec<String>),
    Single(String),
}

impl ProcessCommand {
    /// The command's elements, whichever form it has.
    pub fn tokens(&self) -> Vec<String> {
        match self {
            ProcessCommand::Tokens(tokens) => tokens.clone(),
            ProcessCommand::Single(line) => vec![line.clone()],
        }
    }
}

/// A `[[processes]]` entry of metadata.toml. The default process is not marked here (it is
/// `buildpack-default-process-type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Process {
    #[serde(rename = "type")]
    pub process_type: String,
    pub command: ProcessCommand,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub buildpack_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_env: Vec<String>,
}

/// `<layers>/config/metadata.toml`: what the build phase hands the exporter and the launcher.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BuildMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buildpack_default_process_type: Option<String>,
    #[serde(default)]
    pub buildpacks: Vec<GroupMember>,
    /// In buildpack order, repeats included: a later buildpack's label wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<Label>,
    /// Sorted by type.
    #[serde(default)]
    pub processes: Vec<Process>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<Slice>,
}

impl BuildMetadata {
    pub fn parse(text: &str) -> Result<BuildMetadata, String> {
        toml::from_str(text).map_err(|e| format!("{e}"))
    }

    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| format!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V0_7: ApiVersion = ApiVersion::new(0, 7);
    const V0_8: ApiVersion = ApiVersion::new(0, 8);
    const V0_9: ApiVersion = ApiVersion::new(0, 9);
    const V0_12: ApiVersion = ApiVersion::new(0, 12);

    #[test]
    fn layer_toml_flags_live_under_types() {
        let layer = parse_layer_toml(
            "[types]\nbuild = true\ncache = true\n[metadata]\nversion = \"1.2\"\n",
        )
        .unwrap();
        assert_eq!(
            layer.types,
            LayerTypes {
                build: true,
                launch: false,
                cache: true
            }
        );
        assert_eq!(layer.metadata["version"].as_str(), Some("1.2"));

        let restored = parse_layer_toml("[metadata]\nx = 1\n").unwrap();
        assert!(restored.types.is_none());

        for top_level in ["launch = true\n", "build = false\n", "cache = true\n"] {
            let err = parse_layer_toml(top_level).unwrap_err();
            assert!(err.contains("[types]"), "{top_level}: {err}");
        }
        assert!(parse_layer_toml("[types]\nlaunch = \"yes\"\n").is_err());
    }

    #[test]
    fn build_toml_unmet_entries_need_names() {
        let (build, warnings) =
            parse_build_toml("[[unmet]]\nname = \"node\"\n[[unmet]]\nname = \"npm\"\n").unwrap();
        assert_eq!(
            build.unmet,
            [
                Unmet {
                    name: "node".into()
                },
                Unmet { name: "npm".into() }
            ]
        );
        assert!(warnings.is_empty());
        assert!(parse_build_toml("[[unmet]]\n").is_err());
        let (_, warnings) = parse_build_toml("[[bom]]\nname = \"x\"\n").unwrap();
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn old_style_processes_have_string_commands_and_optional_direct() {
        let text = r#"
            [[processes]]
            type = "web"
            command = "bundle exec rackup"
            args = ["-p", "8080"]
            working-dir = "/workspace/sub"

            [[processes]]
            type = "worker"
            command = "sidekiq"
            direct = true
            default = true
        "#;
        let (launch, warnings) = parse_launch_toml(text, V0_8).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            launch.processes,
            [
                LaunchProcess {
                    process_type: "web".into(),
                    command: vec!["bundle exec rackup".into()],
                    args: vec!["-p".into(), "8080".into()],
                    direct: false,
                    default: false,
                    working_dir: Some("/workspace/sub".into()),
                    exec_env: vec![],
                },
                LaunchProcess {
                    process_type: "worker".into(),
                    command: vec!["sidekiq".into()],
                    args: vec![],
                    direct: true,
                    default: true,
                    working_dir: None,
                    exec_env: vec![],
                },
            ]
        );

        let (launch, warnings) = parse_launch_toml(text, V0_7).unwrap();
        assert_eq!(launch.processes[0].working_dir, None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("working-dir"));

        let err = parse_launch_toml("[[processes]]\ntype = \"web\"\ncommand = [\"x\"]\n", V0_8)
            .unwrap_err();
        assert!(err.contains("must be a string"), "{err}");
    }

    #[test]
    fn new_style_processes_have_array_commands_and_no_direct() {
        let text = r#"
            [[processes]]
            type = "web"
            command = ["python", "app.py"]
            args = ["--debug"]
            default = true
            exec-env = ["production"]
        "#;
        let (launch, _) = parse_launch_toml(text, V0_9).unwrap();
        let web = &launch.processes[0];
        assert_eq!(web.command, ["python", "app.py"]);
        assert!(web.direct);
        assert!(web.default);
        assert!(web.exec_env.is_empty(), "exec-env needs Buildpack API 0.12");
        let (launch, _) = parse_launch_toml(text, V0_12).unwrap();
        assert_eq!(launch.processes[0].exec_env, ["production"]);

        let direct = "[[processes]]\ntype = \"web\"\ncommand = [\"x\"]\ndirect = true\n";
        assert!(
            parse_launch_toml(direct, V0_9)
                .unwrap_err()
                .contains("direct")
        );
        let string = "[[processes]]\ntype = \"web\"\ncommand = \"x\"\n";
        assert!(
            parse_launch_toml(string, V0_9)
                .unwrap_err()
                .contains("array")
        );
        let empty = "[[processes]]\ntype = \"web\"\ncommand = []\n";
        assert!(parse_launch_toml(empty, V0_9).is_err());
        let missing = "[[processes]]\ntype = \"web\"\n";
        assert!(parse_launch_toml(missing, V0_9).is_err());
        let untyped = "[[processes]]\ncommand = [\"x\"]\n";
        assert!(parse_launch_toml(untyped, V0_9).is_err());
    }

    #[test]
    fn one_default_process_per_launch_toml() {
        let text = r#"
            [[processes]]
            type = "a"
            command = ["a"]
            default = true
            [[processes]]
            type = "b"
            command = ["b"]
            default = true
        "#;
        let err = parse_launch_toml(text, V0_9).unwrap_err();
        assert_eq!(err, "more than one default process (a, b)");
    }

    #[test]
    fn labels_and_slices_are_read() {
        let text = r#"
            [[labels]]
            key = "k"
            value = "v"
            [[slices]]
            paths = ["static/*", "*.css"]
        "#;
        let (launch, _) = parse_launch_toml(text, V0_9).unwrap();
        assert_eq!(
            launch.labels,
            [Label {
                key: "k".into(),
                value: "v".into()
            }]
        );
        assert_eq!(launch.slices[0].paths, ["static/*", "*.css"]);
    }

    #[test]
    fn metadata_commands_follow_the_platform_api() {
        let process = LaunchProcess {
            process_type: "web".into(),
            command: vec!["python".into(), "app.py".into()],
            args: vec!["--debug".into()],
            direct: true,
            default: true,
            working_dir: None,
            exec_env: vec![],
        };
        let new = process.to_metadata("bp", ApiVersion::new(0, 10));
        assert_eq!(
            new.command,
            ProcessCommand::Tokens(vec!["python".into(), "app.py".into()])
        );
        assert_eq!(new.args, ["--debug"]);
        let old = process.to_metadata("bp", V0_9);
        assert_eq!(old.command, ProcessCommand::Single("python".into()));
        assert_eq!(old.args, ["app.py", "--debug"]);
        assert_eq!(old.buildpack_id, "bp");
    }

    #[test]
    fn metadata_round_trips_in_both_command_forms() {
        let text = r#"buildpack-default-process-type = "web"

[[buildpacks]]
id = "a"
version = "1"
api = "0.8"

[[processes]]
type = "old"
command = "run"
args = []
direct = false
buildpack-id = "a"

[[processes]]
type = "web"
command = ["x", "y"]
args = ["z"]
direct = true
buildpack-id = "a"
working-dir = "/w"
exec-env = ["production"]
"#;
        let metadata = BuildMetadata::parse(text).unwrap();
        assert_eq!(metadata.processes[0].command.tokens(), ["run"]);
        assert_eq!(metadata.processes[1].command.tokens(), ["x", "y"]);
        assert_eq!(metadata.to_toml().unwrap(), text);
        assert_eq!(
            BuildMetadata::parse(&metadata.to_toml().unwrap()).unwrap(),
            metadata
        );
    }
}
