//! `<layers>/config/metadata.toml` as the lifecycle writes it: the `[[buildpacks]]` (`id`,
//! `api`) and the `[[processes]]` (`type`, `command` as an array, or a string before Platform
//! API 0.10, `args`, `direct`, `buildpack-id`, `working-dir`, `exec-env`). Everything else
//! (`buildpack-default-process-type`, `[[labels]]`, `[[slices]]`, `[[bom]]`, unknown keys) is
//! skipped; a key the launcher reads with the wrong type is an error.

use crate::toml::{self, Table, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buildpack {
    pub id: String,
    /// As written; checked by the caller (an unsupported API has its own exit code).
    pub api: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub kind: String,
    /// Never empty.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub direct: bool,
    pub buildpack_id: String,
    pub working_dir: Option<String>,
    /// Read for its type only: execution environments need Platform API 0.15.
    pub exec_env: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub buildpacks: Vec<Buildpack>,
    pub processes: Vec<Process>,
}

impl Metadata {
    pub fn process(&self, kind: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.kind == kind)
    }

    pub fn buildpack(&self, id: &str) -> Option<&Buildpack> {
        self.buildpacks.iter().find(|b| b.id == id)
    }
}

/// Parses metadata.toml's text; the error says what is wrong and where (the caller names the
/// file).
pub fn parse(text: &str) -> Result<Metadata, String> {
    let doc = toml::parse(text)?;
    let mut metadata = Metadata::default();
    if let Some(value) = toml::get(&doc, "buildpacks") {
        for (n, table) in tables(value, "buildpacks")?.into_iter().enumerate() {
            let what = format!("[[buildpacks]] entry {}", n + 1);
            let id = optional_string(table, "id", &what)?
                .filter(|id| !id.is_empty())
                .ok_or_else(|| format!("{what} has no id"))?;
            let api = optional_string(table, "api", &what)?.unwrap_or_default();
            metadata.buildpacks.push(Buildpack { id, api });
        }
    }
    if let Some(value) = toml::get(&doc, "processes") {
        for (n, table) in tables(value, "processes")?.into_iter().enumerate() {
            let what = format!("[[processes]] entry {}", n + 1);
            let kind = optional_string(table, "type", &what)?
                .filter(|kind| !kind.is_empty())
                .ok_or_else(|| format!("{what} has no type"))?;
            let what = format!("process {kind:?}");
            let command = match toml::get(table, "command") {
                Some(Value::String(line)) => vec![line.clone()],
                Some(value @ Value::Array(_)) => strings(value, "command", &what)?,
                Some(_) => {
                    return Err(format!(
                        "{what}: command is neither a string nor an array of strings"
                    ))
                }
                None => Vec::new(),
            };
            if command.is_empty() {
                return Err(format!("{what} has no command"));
            }
            let args = match toml::get(table, "args") {
                Some(value) => strings(value, "args", &what)?,
                None => Vec::new(),
            };
            let direct = match toml::get(table, "direct") {
                Some(Value::Bool(direct)) => *direct,
                Some(_) => return Err(format!("{what}: direct is not a boolean")),
                None => false,
            };
            let exec_env = match toml::get(table, "exec-env") {
                Some(value) => strings(value, "exec-env", &what)?,
                None => Vec::new(),
            };
            metadata.processes.push(Process {
                command,
                args,
                direct,
                buildpack_id: optional_string(table, "buildpack-id", &what)?.unwrap_or_default(),
                working_dir: optional_string(table, "working-dir", &what)?
                    .filter(|dir| !dir.is_empty()),
                exec_env,
                kind,
            });
        }
    }
    Ok(metadata)
}

fn tables<'a>(value: &'a Value, key: &str) -> Result<Vec<&'a Table>, String> {
    let not = || format!("{key} is not an array of tables ([[{key}]])");
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Table(table) => Ok(table),
                _ => Err(not()),
            })
            .collect(),
        _ => Err(not()),
    }
}

fn optional_string(table: &Table, key: &str, what: &str) -> Result<Option<String>, String> {
    match toml::get(table, key) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{what}: {key} is not a string")),
        None => Ok(None),
    }
}

fn strings(value: &Value, key: &str, what: &str) -> Result<Vec<String>, String> {
    let not = || format!("{what}: {key} is not an array of strings");
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(not()),
            })
            .collect(),
        _ => Err(not()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the lifecycle (BurntSushi's encoder) writes, with the extras a launcher skips.
    const LIFECYCLE: &str = r#"buildpack-default-process-type = "web"

[[buildpacks]]
  api = "0.9"
  id = "samples/hello"
  version = "0.0.1"
  homepage = "https://example.com"

[[buildpacks]]
  api = "0.7"
  id = "samples/old"
  version = "1.0"

[[labels]]
  key = "k"
  value = "v"

[[processes]]
  type = "web"
  command = ["node", "server.js"]
  args = ["--port", "8080"]
  direct = true
  buildpack-id = "samples/hello"
  working-dir = "/workspace/sub"
  exec-env = ["production"]

[[processes]]
  type = "worker"
  command = "bundle exec sidekiq"
  args = []
  direct = false
  buildpack-id = "samples/old"

[[slices]]
  paths = ["*.txt"]

[[bom]]
  name = "dep"
  [bom.metadata]
    version = "1.2.3"
    count = 4
    [bom.metadata.nested]
      list = [{ a = 1 }, { b = 2 }]
"#;

    #[test]
    fn reads_what_the_lifecycle_writes_and_skips_the_rest() {
        let md = parse(LIFECYCLE).unwrap();
        assert_eq!(
            md.buildpacks,
            [
                Buildpack {
                    id: "samples/hello".into(),
                    api: "0.9".into()
                },
                Buildpack {
                    id: "samples/old".into(),
                    api: "0.7".into()
                },
            ]
        );
        assert_eq!(
            md.process("web").unwrap(),
            &Process {
                kind: "web".into(),
                command: vec!["node".into(), "server.js".into()],
                args: vec!["--port".into(), "8080".into()],
                direct: true,
                buildpack_id: "samples/hello".into(),
                working_dir: Some("/workspace/sub".into()),
                exec_env: vec!["production".into()],
            }
        );
        let worker = md.process("worker").unwrap();
        assert_eq!(worker.command, ["bundle exec sidekiq"]);
        assert!(!worker.direct && worker.args.is_empty() && worker.working_dir.is_none());
        assert!(md.process("missing").is_none());
        assert_eq!(parse("").unwrap(), Metadata::default());
    }

    #[test]
    fn wrong_types_and_missing_fields_are_errors() {
        for (text, why) in [
            ("buildpacks = 1\n", "buildpacks is not an array of tables"),
            (
                "[buildpacks]\nid = \"x\"\n",
                "buildpacks is not an array of tables",
            ),
            (
                "[[buildpacks]]\napi = \"0.9\"\n",
                "[[buildpacks]] entry 1 has no id",
            ),
            (
                "[[buildpacks]]\nid = \"a\"\napi = 0.9\n",
                "api is not a string",
            ),
            (
                "[[processes]]\ncommand = [\"x\"]\n",
                "[[processes]] entry 1 has no type",
            ),
            (
                "[[processes]]\ntype = \"web\"\n",
                "process \"web\" has no command",
            ),
            (
                "[[processes]]\ntype = \"web\"\ncommand = []\n",
                "has no command",
            ),
            (
                "[[processes]]\ntype = \"web\"\ncommand = [1]\n",
                "command is not an array of strings",
            ),
            (
                "[[processes]]\ntype = \"web\"\ncommand = 1\n",
                "command is neither a string nor an array",
            ),
            (
                "[[processes]]\ntype = \"w\"\ncommand = \"x\"\ndirect = \"yes\"\n",
                "direct is not a boolean",
            ),
            (
                "[[processes]]\ntype = \"w\"\ncommand = \"x\"\nargs = \"a b\"\n",
                "args is not an array of strings",
            ),
            (
                "[[processes]]\ntype = \"w\"\ncommand = \"x\n",
                "line 3: unterminated",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}
