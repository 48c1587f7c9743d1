//! buildpack.toml: a buildpack's descriptor, read and checked as the reference lifecycle
//! reads it (`buildpack/bp_descriptor.go`).

use std::path::{Path, PathBuf};

use super::{ApiVersion, LifecycleError};

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
    /// After the lifecycle's inference (stacks, `bin/build`).
    pub targets: Vec<Target>,
    /// Non-empty for a composite buildpack.
    pub order: Vec<Vec<OrderEntry>>,
}

impl Buildpack {
    pub fn is_composite(&self) -> bool {
        !self.order.is_empty()
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

/// Reads `dir/buildpack.toml`.
pub fn read(dir: &Path) -> Result<Buildpack, LifecycleError> {
    let path = dir.join("buildpack.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| LifecycleError::Detect(format!("{}: {e}", path.display())))?;
    parse(&text, dir)
}

/// Parses buildpack.toml text of the buildpack in `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<Buildpack, LifecycleError> {
    let bad = |why: String| {
        LifecycleError::Detect(format!("{}: {why}", dir.join("buildpack.toml").display()))
    };
    let doc: toml::Table = text.parse().map_err(|e| bad(format!("{e}")))?;
    let table = doc
        .get("buildpack")
        .and_then(toml::Value::as_table)
        .ok_or_else(|| bad("no [buildpack] table".into()))?;
    let string = |t: &toml::Table, key: &str| t.get(key).and_then(|v| v.as_str()).map(String::from);
    let id = string(table, "id").ok_or_else(|| bad("[buildpack] has no id".into()))?;
    let version = string(table, "version").unwrap_or_default();
    let api_text = string(&doc, "api").unwrap_or_default();
    let api: ApiVersion = api_text
        .parse()
        .ok()
        .filter(|api: &ApiVersion| api.is_supported_buildpack_api())
        .ok_or_else(|| LifecycleError::BuildpackApi {
            buildpack: format!("{id}@{version}"),
            api: api_text.clone(),
        })?;
    let order = match doc.get("order").and_then(toml::Value::as_array) {
        None => Vec::new(),
        Some(groups) => groups
            .iter()
            .map(|g| {
                let entries = g
                    .get("group")
                    .cloned()
                    .unwrap_or(toml::Value::Array(vec![]));
                entries
                    .try_into::<Vec<OrderEntry>>()
                    .map_err(|e| bad(format!("[[order.group]]: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Buildpack {
        dir: dir.to_path_buf(),
        api,
        id,
        version,
        name: string(table, "name"),
        homepage: string(table, "homepage"),
        clear_env: table
            .get("clear-env")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        sbom_formats: table
            .get("sbom-formats")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        exec_env: Vec::new(),
        targets: Vec::new(),
        order,
    })
}
