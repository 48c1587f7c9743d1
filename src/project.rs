//! The project descriptor (`project.toml`) and the copy of the app directory it governs.
//!
//! This module owns two things: [`read`], which parses a project descriptor of schema 0.1 or
//! 0.2 into one normalised [`Project`], and [`copy_app`], which copies an app directory into
//! the build's work area applying the descriptor's `include`/`exclude` lists. The app
//! directory itself is only ever read.
//!
//! # Schemas
//!
//! Schema 0.1 (no `[_]` table, or `[_] schema-version = "0.1"`) keeps the project in
//! `[project]` (`id`, `name`, `version`, `authors`, `documentation-url`, `source-url`,
//! `[[project.licenses]]`), the build in `[build]` (`builder`, `include`, `exclude`,
//! `[[build.buildpacks]]`, `[[build.env]]`) and free-form data in `[metadata]`.
//!
//! Schema 0.2 (`[_] schema-version = "0.2"`) keeps the project in `[_]` (same keys,
//! `[[_.licenses]]`, free-form `[_.metadata]`) and the build in `[io.buildpacks]`: `builder`,
//! `include`, `exclude`, `[[io.buildpacks.group]]`, `[[io.buildpacks.pre.group]]`,
//! `[[io.buildpacks.post.group]]` (each entry `id`/`version`/`uri`, or an inline buildpack's
//! `[io.buildpacks.group.script]` with `api`, `inline` and optional `shell`) and
//! `[[io.buildpacks.build.env]]`. The 0.2 spec text names the env table two ways (its schema
//! block says `io.buildpacks.build.env`, its section heading `io.buildpacks.env.build`); as
//! pack does, both are read and `build.env` wins when both are present, with a warning.
//!
//! Neither schema defines image labels. [`Project::labels`] holds
//! `[[io.buildpacks.labels]]` (`key`/`value`) entries, a convention of community buildpacks
//! that pack does not read either; the caller decides whether to apply them. What pack does
//! with the project's `version` and `source-url` (a `project-metadata.toml` source of type
//! `"project"`, which the lifecycle turns into the `io.buildpacks.project.metadata` label) is
//! left to the caller too: both fields are here.
//!
//! Where lathe is stricter than pack, it is so that a descriptor is never half-applied: a
//! schema-0.2 table in a 0.1 descriptor (or `[build]` in a 0.2 one), whose `include`,
//! `exclude`, buildpacks or env pack would ignore, is an error naming the key.
//! Other unknown keys are listed in [`Project::warnings`]. Having both `include` and
//! `exclude` is an error (the spec says the build MUST fail).
//!
//! # Include and exclude
//!
//! Both lists hold `.gitignore` patterns: `*` and `?` never match `/`; `[...]` classes with
//! ranges, `!`/`^` negation and `[:alpha:]`-style names; `\` escapes; `**` as a whole path
//! component matches any number of directories; a pattern with a `/` other than a trailing
//! one is anchored at the app root (a leading `/` only anchors), otherwise it matches the
//! name at any depth; a trailing `/` matches directories only; `!` negates; blank lines and
//! `#` comments are skipped. A pattern matching a directory matches everything under it. A
//! symlink is never a directory to the patterns, whatever it points at.
//!
//! Each path is decided as pack (through go-gitignore) decides it: the last pattern that
//! matches the path or any directory above it wins. Unlike git, this lets a negation re-admit
//! a path below a matched directory (`exclude = ["build/", "!build/keep.txt"]` keeps
//! `build/keep.txt`). With `include`, a path is copied when the winning pattern is a plain
//! one; with `exclude`, unless it is. Directories above a copied path are always created; a
//! directory that is itself selected is copied even when empty. `project.toml` at the app
//! root is always kept, whatever the patterns say. An empty `include` list filters nothing
//! (as in pack); one of only comments keeps nothing but `project.toml`.
//!
//! # The copy
//!
//! Regular files are copied through `copy_file_range` (the path `std::fs::copy` takes), with
//! their permission bits (setuid/setgid/sticky included), access and modification times;
//! directories keep theirs too, applied after their contents (so read-only directories can
//! be filled); symlinks are recreated with the same target, whatever it points at, and never
//! followed. Files hard-linked together in the app become independent copies. Ownership is
//! not copied (the copy belongs to the caller, as lathe is rootless). Fifos, sockets and
//! device nodes are skipped with a warning, and listed in the [`CopyReport`].

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::UtimensatFlags;
use nix::sys::time::TimeSpec;
use toml::{Table, Value};

/// The descriptor's default name, at the root of the app directory.
pub const FILE_NAME: &str = "project.toml";

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a valid TOML document: {message}")]
    Toml { path: PathBuf, message: String },
    #[error(
        "{path}: unknown project descriptor schema version {version:?} (_.schema-version); \
         lathe reads 0.1 and 0.2"
    )]
    UnknownSchema { path: PathBuf, version: String },
    #[error(
        "{path}: {include_key} and {exclude_key} are both set; a project descriptor may have \
         only one of them"
    )]
    IncludeAndExclude {
        path: PathBuf,
        include_key: &'static str,
        exclude_key: &'static str,
    },
    #[error("{path}: {key}: {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("app directory {path} is not a directory")]
    AppNotDirectory { path: PathBuf },
    #[error("copy destination {path} exists and is not an empty directory")]
    DestNotEmpty { path: PathBuf },
    #[error("copy destination {dest} is inside the app directory {app}")]
    DestInsideApp { dest: PathBuf, app: PathBuf },
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ProjectError + '_ {
    move |source| ProjectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which project descriptor schema a file was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaVersion {
    V0_1,
    V0_2,
}

impl SchemaVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaVersion::V0_1 => "0.1",
            SchemaVersion::V0_2 => "0.2",
        }
    }

    /// The key of the include list in this schema, as errors name it.
    pub fn include_key(self) -> &'static str {
        match self {
            SchemaVersion::V0_1 => "build.include",
            SchemaVersion::V0_2 => "io.buildpacks.include",
        }
    }

    /// The key of the exclude list in this schema, as errors name it.
    pub fn exclude_key(self) -> &'static str {
        match self {
            SchemaVersion::V0_1 => "build.exclude",
            SchemaVersion::V0_2 => "io.buildpacks.exclude",
        }
    }
}

/// One buildpack the descriptor asks for. At least one of `id` and `uri` is set; `version`
/// never goes with `uri` or `script`; an inline buildpack has an `id` and a `script`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildpackRef {
    pub id: Option<String>,
    pub version: Option<String>,
    pub uri: Option<String>,
    pub script: Option<InlineScript>,
}

/// An inline buildpack's script (`[io.buildpacks.group.script]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineScript {
    /// The Buildpack API the script is written against.
    pub api: String,
    /// The shell that runs it; `/bin/sh` unless given.
    pub shell: String,
    pub inline: String,
}

/// One of the project's licenses: an SPDX expression, a URI, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct License {
    pub kind: Option<String>,
    pub uri: Option<String>,
}

/// A project descriptor, the same shape whichever schema it was written to.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// The file it was read from.
    pub path: PathBuf,
    pub schema_version: SchemaVersion,
    pub id: Option<String>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub authors: Vec<String>,
    pub documentation_url: Option<String>,
    pub source_url: Option<String>,
    pub licenses: Vec<License>,
    pub builder: Option<String>,
    /// `.gitignore` patterns of the files to copy (everything else is left out).
    pub include: Vec<String>,
    /// `.gitignore` patterns of the files to leave out.
    pub exclude: Vec<String>,
    /// Build-time environment, in file order.
    pub env: Vec<(String, String)>,
    /// The group of buildpacks to use instead of the builder's order.
    pub buildpacks: Vec<BuildpackRef>,
    /// Buildpacks to put before every group of the order (0.2 only).
    pub pre_buildpacks: Vec<BuildpackRef>,
    /// Buildpacks to put after every group of the order (0.2 only).
    pub post_buildpacks: Vec<BuildpackRef>,
    /// `[[io.buildpacks.labels]]` entries (not part of the spec; see the module docs).
    pub labels: Vec<(String, String)>,
    /// The free-form table: `[metadata]` (0.1) or `[_.metadata]` (0.2).
    pub metadata: Table,
    /// Keys that were ignored, deprecated spellings, and the like; for the caller to show.
    pub warnings: Vec<String>,
}

impl Project {
    /// `io.buildpacks.project.metadata` as pack fills it from the descriptor: a source of type
    /// `project` with the declared version and the source URL; `{}` when neither is set.
    pub fn source_metadata(&self) -> serde_json::Value {
        if self.version.is_none() && self.source_url.is_none() {
            return serde_json::json!({});
        }
        let mut source = serde_json::json!({"type": "project"});
        if let Some(version) = &self.version {
            source["version"] = serde_json::json!({ "declared": version });
        }
        if let Some(url) = &self.source_url {
            source["metadata"] = serde_json::json!({ "url": url });
        }
        serde_json::json!({ "source": source })
    }

    fn empty(path: &Path, schema_version: SchemaVersion) -> Project {
        Project {
            path: path.to_path_buf(),
            schema_version,
            id: None,
            name: None,
            version: None,
            authors: Vec::new(),
            documentation_url: None,
            source_url: None,
            licenses: Vec::new(),
            builder: None,
            include: Vec::new(),
            exclude: Vec::new(),
            env: Vec::new(),
            buildpacks: Vec::new(),
            pre_buildpacks: Vec::new(),
            post_buildpacks: Vec::new(),
            labels: Vec::new(),
            metadata: Table::new(),
            warnings: Vec::new(),
        }
    }
}

/// `<app>/project.toml` when it exists.
pub fn find(app: &Path) -> Option<PathBuf> {
    let path = app.join(FILE_NAME);
    path.is_file().then_some(path)
}

/// Reads a project descriptor; `path` may be anywhere (`--descriptor`).
pub fn read(path: &Path) -> Result<Project, ProjectError> {
    let text = fs::read_to_string(path).map_err(io_at(path))?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Project, ProjectError> {
    let doc: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ProjectError::Toml {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
    let mut r = Reader {
        path,
        warnings: Vec::new(),
    };
    let underscore = r.table(&doc, "", "_")?;
    let declared = match underscore {
        Some(t) => r.string(t, "_", "schema-version")?,
        None => None,
    };
    let schema = match declared.as_deref() {
        None => SchemaVersion::V0_1,
        Some("0.1") => SchemaVersion::V0_1,
        Some("0.2") => SchemaVersion::V0_2,
        Some(other) => {
            return Err(ProjectError::UnknownSchema {
                path: path.to_path_buf(),
                version: other.to_string(),
            });
        }
    };
    let mut project = Project::empty(path, schema);
    match schema {
        SchemaVersion::V0_1 => r.v01(&doc, declared.is_some(), &mut project)?,
        SchemaVersion::V0_2 => r.v02(&doc, &mut project)?,
    }
    project.warnings = r.warnings;
    validate_patterns(&project)?;
    Ok(project)
}

fn validate_patterns(project: &Project) -> Result<(), ProjectError> {
    // The spec's word is "present": an empty list counts.
    Filter::new(project).map(drop)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn key_of(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Typed access to the TOML document with errors naming the file and the dotted key.
struct Reader<'p> {
    path: &'p Path,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn invalid(&self, key: impl Into<String>, why: impl Into<String>) -> ProjectError {
        ProjectError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            why: why.into(),
        }
    }

    fn expected(&self, key: String, what: &str, found: &Value) -> ProjectError {
        let why = format!("expected {what}, found {}", type_name(found));
        self.invalid(key, why)
    }

    fn table<'t>(
        &self,
        t: &'t Table,
        prefix: &str,
        name: &str,
    ) -> Result<Option<&'t Table>, ProjectError> {
        match t.get(name) {
            None => Ok(None),
            Some(Value::Table(inner)) => Ok(Some(inner)),
            Some(v) => Err(self.expected(key_of(prefix, name), "a table", v)),
        }
    }

    fn string(&self, t: &Table, prefix: &str, name: &str) -> Result<Option<String>, ProjectError> {
        match t.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.expected(key_of(prefix, name), "a string", v)),
        }
    }

    fn required(&self, t: &Table, prefix: &str, name: &str) -> Result<String, ProjectError> {
        self.string(t, prefix, name)?
            .ok_or_else(|| self.invalid(key_of(prefix, name), "missing (it is required)"))
    }

    fn strings(
        &self,
        t: &Table,
        prefix: &str,
        name: &str,
    ) -> Result<Option<Vec<String>>, ProjectError> {
        let key = key_of(prefix, name);
        match t.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.expected(format!("{key}[{i}]"), "a string", v)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.expected(key, "an array of strings", v)),
        }
    }

    /// An array of tables, each with its key (`prefix.name[i]`).
    fn tables<'t>(
        &self,
        t: &'t Table,
        prefix: &str,
        name: &str,
    ) -> Result<Option<Vec<(String, &'t Table)>>, ProjectError> {
        let key = key_of(prefix, name);
        match t.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Table(inner) => Ok((format!("{key}[{i}]"), inner)),
                    v => Err(self.expected(format!("{key}[{i}]"), "a table", v)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.expected(key, "an array of tables", v)),
        }
    }

    fn warn_unknown(&mut self, t: &Table, prefix: &str, known: &[&str], schema: SchemaVersion) {
        for k in t.keys().filter(|k| !known.contains(&k.as_str())) {
            self.warnings.push(format!(
                "{}: {} is not a key of project descriptor schema {}; ignored",
                self.path.display(),
                key_of(prefix, k),
                schema.as_str()
            ));
        }
    }

    fn project_table(
        &mut self,
        t: &Table,
        prefix: &str,
        p: &mut Project,
        extra: &[&str],
    ) -> Result<(), ProjectError> {
        p.id = self.string(t, prefix, "id")?;
        p.name = self.string(t, prefix, "name")?;
        p.version = self.string(t, prefix, "version")?;
        p.authors = self.strings(t, prefix, "authors")?.unwrap_or_default();
        p.documentation_url = self.string(t, prefix, "documentation-url")?;
        p.source_url = self.string(t, prefix, "source-url")?;
        for (key, lt) in self.tables(t, prefix, "licenses")?.unwrap_or_default() {
            let license = License {
                kind: self.string(lt, &key, "type")?,
                uri: self.string(lt, &key, "uri")?,
            };
            if license.kind.is_none() && license.uri.is_none() {
                return Err(self.invalid(key, "a license needs a type, a uri, or both"));
            }
            self.warn_unknown(lt, &key, &["type", "uri"], p.schema_version);
            p.licenses.push(license);
        }
        let mut known = vec![
            "id",
            "name",
            "version",
            "authors",
            "documentation-url",
            "source-url",
            "licenses",
        ];
        known.extend_from_slice(extra);
        self.warn_unknown(t, prefix, &known, p.schema_version);
        Ok(())
    }

    fn buildpacks(
        &mut self,
        t: &Table,
        prefix: &str,
        name: &str,
        schema: SchemaVersion,
    ) -> Result<Vec<BuildpackRef>, ProjectError> {
        let mut out = Vec::new();
        for (key, bt) in self.tables(t, prefix, name)?.unwrap_or_default() {
            let script = match self.table(bt, &key, "script")? {
                None => None,
                Some(st) => {
                    let skey = key_of(&key, "script");
                    let script = InlineScript {
                        api: self.required(st, &skey, "api")?,
                        shell: self
                            .string(st, &skey, "shell")?
                            .unwrap_or_else(|| "/bin/sh".to_string()),
                        inline: self.required(st, &skey, "inline")?,
                    };
                    self.warn_unknown(st, &skey, &["api", "shell", "inline"], schema);
                    Some(script)
                }
            };
            let bp = BuildpackRef {
                id: self.string(bt, &key, "id")?,
                version: self.string(bt, &key, "version")?,
                uri: self.string(bt, &key, "uri")?,
                script,
            };
            if bp.id.is_none() && bp.uri.is_none() {
                return Err(self.invalid(key, "a buildpack needs an id or a uri"));
            }
            if bp.uri.is_some() && bp.version.is_some() {
                return Err(self.invalid(key, "a buildpack given by uri cannot have a version"));
            }
            if bp.script.is_some() {
                if bp.id.is_none() {
                    return Err(self.invalid(key, "an inline buildpack (script) needs an id"));
                }
                if bp.uri.is_some() || bp.version.is_some() {
                    return Err(self.invalid(
                        key,
                        "an inline buildpack (script) cannot have a uri or a version",
                    ));
                }
            }
            self.warn_unknown(bt, &key, &["id", "version", "uri", "script"], schema);
            out.push(bp);
        }
        Ok(out)
    }

    fn env(
        &mut self,
        t: &Table,
        prefix: &str,
        name: &str,
        schema: SchemaVersion,
    ) -> Result<Option<Vec<(String, String)>>, ProjectError> {
        let Some(entries) = self.tables(t, prefix, name)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(entries.len());
        for (key, et) in entries {
            let var = self.required(et, &key, "name")?;
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(self.invalid(
                    key_of(&key, "name"),
                    format!("{var:?} is not a valid environment variable name"),
                ));
            }
            let value = self.required(et, &key, "value")?;
            if value.contains('\0') {
                return Err(self.invalid(key_of(&key, "value"), "contains a NUL byte"));
            }
            self.warn_unknown(et, &key, &["name", "value"], schema);
            out.push((var, value));
        }
        Ok(Some(out))
    }

    /// Records include/exclude, refusing both.
    fn filters(&self, t: &Table, prefix: &str, p: &mut Project) -> Result<(), ProjectError> {
        let include = self.strings(t, prefix, "include")?;
        let exclude = self.strings(t, prefix, "exclude")?;
        if include.is_some() && exclude.is_some() {
            return Err(ProjectError::IncludeAndExclude {
                path: self.path.to_path_buf(),
                include_key: p.schema_version.include_key(),
                exclude_key: p.schema_version.exclude_key(),
            });
        }
        p.include = include.unwrap_or_default();
        p.exclude = exclude.unwrap_or_default();
        Ok(())
    }

    fn v01(&mut self, doc: &Table, declared: bool, p: &mut Project) -> Result<(), ProjectError> {
        let schema = SchemaVersion::V0_1;
        if !declared {
            self.warnings.push(format!(
                "{}: no _.schema-version; read as project descriptor schema 0.1",
                self.path.display()
            ));
            if doc.contains_key("_") {
                return Err(self.invalid(
                    "_.schema-version",
                    "missing; the [_] table belongs to schema 0.2, which requires \
                     schema-version = \"0.2\"",
                ));
            }
        }
        if let Some(io) = self.table(doc, "", "io")?
            && io.contains_key("buildpacks")
        {
            return Err(self.invalid(
                "io.buildpacks",
                "belongs to project descriptor schema 0.2, but this file is read as 0.1; \
                 declare [_] schema-version = \"0.2\" (or use [build])",
            ));
        }
        if let Some(u) = self.table(doc, "", "_")? {
            self.warn_unknown(u, "_", &["schema-version"], schema);
        }
        if let Some(t) = self.table(doc, "", "project")? {
            self.project_table(t, "project", p, &[])?;
        }
        if let Some(b) = self.table(doc, "", "build")? {
            p.builder = self.string(b, "build", "builder")?;
            self.filters(b, "build", p)?;
            p.buildpacks = self.buildpacks(b, "build", "buildpacks", schema)?;
            p.env = self.env(b, "build", "env", schema)?.unwrap_or_default();
            self.warn_unknown(
                b,
                "build",
                &["builder", "include", "exclude", "buildpacks", "env"],
                schema,
            );
        }
        if let Some(m) = self.table(doc, "", "metadata")? {
            p.metadata = m.clone();
        }
        self.warn_unknown(
            doc,
            "",
            &["_", "io", "project", "build", "metadata"],
            schema,
        );
        Ok(())
    }

    fn v02(&mut self, doc: &Table, p: &mut Project) -> Result<(), ProjectError> {
        let schema = SchemaVersion::V0_2;
        if doc.contains_key("build") {
            return Err(self.invalid(
                "build",
                "[build] belongs to project descriptor schema 0.1; in schema 0.2 its keys live \
                 in [io.buildpacks]",
            ));
        }
        for old in ["project", "metadata"] {
            if doc.contains_key(old) {
                self.warnings.push(format!(
                    "{}: [{old}] belongs to project descriptor schema 0.1 and is ignored in \
                     schema 0.2 (use [_]{})",
                    self.path.display(),
                    if old == "metadata" {
                        " and [_.metadata]"
                    } else {
                        ""
                    }
                ));
            }
        }
        // Other top-level tables are other platforms' reverse-domain namespaces.
        for (k, v) in doc {
            if !matches!(v, Value::Table(_)) {
                self.warnings.push(format!(
                    "{}: top-level key {k} is not a table; ignored",
                    self.path.display()
                ));
            }
        }
        if let Some(u) = self.table(doc, "", "_")? {
            self.project_table(u, "_", p, &["schema-version", "metadata"])?;
            if let Some(m) = self.table(u, "_", "metadata")? {
                p.metadata = m.clone();
            }
        }
        let Some(io) = self.table(doc, "", "io")? else {
            return Ok(());
        };
        let Some(cnb) = self.table(io, "io", "buildpacks")? else {
            return Ok(());
        };
        let pre = "io.buildpacks";
        p.builder = self.string(cnb, pre, "builder")?;
        self.filters(cnb, pre, p)?;
        p.buildpacks = self.buildpacks(cnb, pre, "group", schema)?;
        for (which, out) in [
            ("pre", &mut p.pre_buildpacks),
            ("post", &mut p.post_buildpacks),
        ] {
            if let Some(t) = self.table(cnb, pre, which)? {
                let key = key_of(pre, which);
                *out = self.buildpacks(t, &key, "group", schema)?;
                self.warn_unknown(t, &key, &["group"], schema);
            }
        }
        let build_env = match self.table(cnb, pre, "build")? {
            Some(b) => {
                let key = key_of(pre, "build");
                let env = self.env(b, &key, "env", schema)?;
                self.warn_unknown(b, &key, &["env"], schema);
                env
            }
            None => None,
        };
        let env_build = match self.table(cnb, pre, "env")? {
            Some(e) => {
                let key = key_of(pre, "env");
                let env = self.env(e, &key, "build", schema)?;
                self.warn_unknown(e, &key, &["build"], schema);
                env
            }
            None => None,
        };
        p.env = match (build_env, env_build) {
            (Some(env), None) => env,
            (Some(env), Some(_)) => {
                self.warnings.push(format!(
                    "{}: io.buildpacks.env.build is ignored because io.buildpacks.build.env is \
                     set",
                    self.path.display()
                ));
                env
            }
            (None, Some(env)) => {
                self.warnings.push(format!(
                    "{}: io.buildpacks.env.build is a deprecated spelling of \
                     io.buildpacks.build.env",
                    self.path.display()
                ));
                env
            }
            (None, None) => Vec::new(),
        };
        for (key, lt) in self.tables(cnb, pre, "labels")?.unwrap_or_default() {
            let k = self.required(lt, &key, "key")?;
            if k.is_empty() {
                return Err(self.invalid(key_of(&key, "key"), "a label key cannot be empty"));
            }
            let v = self.required(lt, &key, "value")?;
            self.warn_unknown(lt, &key, &["key", "value"], schema);
            p.labels.push((k, v));
        }
        self.warn_unknown(
            cnb,
            pre,
            &[
                "schema-version",
                "builder",
                "include",
                "exclude",
                "group",
                "pre",
                "post",
                "build",
                "env",
                "labels",
            ],
            schema,
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// .gitignore patterns
// ---------------------------------------------------------------------------------------

/// One compiled `.gitignore` line.
#[derive(Debug, Clone)]
struct Pattern {
    glob: Vec<u8>,
    negated: bool,
    dir_only: bool,
    /// Matched against the whole relative path rather than the last component.
    anchored: bool,
}

impl Pattern {
    /// `Ok(None)` for blank lines and comments.
    fn compile(line: &str) -> Result<Option<Pattern>, String> {
        let mut b = line.as_bytes();
        if b.is_empty() || b[0] == b'#' {
            return Ok(None);
        }
        // Trailing spaces are dropped unless escaped with a backslash.
        let mut end = b.len();
        while end > 0 && b[end - 1] == b' ' {
            let backslashes = b[..end - 1]
                .iter()
                .rev()
                .take_while(|&&c| c == b'\\')
                .count();
            if backslashes % 2 == 1 {
                break;
            }
            end -= 1;
        }
        b = &b[..end];
        let negated = b.first() == Some(&b'!');
        if negated {
            b = &b[1..];
        }
        let dir_only = b.last() == Some(&b'/');
        if dir_only {
            b = &b[..b.len() - 1];
        }
        let anchored = b.contains(&b'/');
        if b.first() == Some(&b'/') {
            b = &b[1..];
        }
        if b.is_empty() {
            return Ok(None);
        }
        check_glob(b)?;
        Ok(Some(Pattern {
            glob: b.to_vec(),
            negated,
            dir_only,
            anchored,
        }))
    }

    /// Whether this pattern names `rel` itself (not counting the directories above it).
    fn matches(&self, rel: &[u8], is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let text = if self.anchored {
            rel
        } else {
            match rel.iter().rposition(|&c| c == b'/') {
                Some(i) => &rel[i + 1..],
                None => rel,
            }
        };
        dowild(&self.glob, text) == Wild::Match
    }
}

/// Refuses what git would silently never match: a lone trailing backslash, an unterminated
/// `[` class, an unknown `[:name:]`.
fn check_glob(p: &[u8]) -> Result<(), String> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' if i + 1 == p.len() => return Err("ends with a lone backslash".into()),
            b'\\' => i += 1,
            b'[' => i = class(p, i, 0)?.1,
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wild {
    Match,
    NoMatch,
    /// The text ran out: no later start of a `*` can match either.
    AbortAll,
    /// A `*` reached a `/`: only an enclosing `**` can still match.
    AbortToStarStar,
}

/// git's wildmatch with `WM_PATHNAME`: `*`, `?` and classes stop at `/`; `**` between
/// slashes (or at either end) crosses them.
fn dowild(p: &[u8], t: &[u8]) -> Wild {
    let (mut pi, mut ti) = (0, 0);
    while pi < p.len() {
        let pc = p[pi];
        if ti >= t.len() && pc != b'*' {
            return Wild::AbortAll;
        }
        match pc {
            b'\\' => {
                pi += 1;
                if p.get(pi) != Some(&t[ti]) {
                    return Wild::NoMatch;
                }
            }
            b'?' => {
                if t[ti] == b'/' {
                    return Wild::NoMatch;
                }
            }
            b'*' => {
                let first = pi;
                while pi < p.len() && p[pi] == b'*' {
                    pi += 1;
                }
                let mut match_slash = false;
                if pi - first >= 2
                    && (first == 0 || p[first - 1] == b'/')
                    && (pi == p.len() || p[pi] == b'/')
                {
                    match_slash = true;
                    // `**/` also stands for no directory at all.
                    if pi < p.len() && dowild(&p[pi + 1..], &t[ti..]) == Wild::Match {
                        return Wild::Match;
                    }
                }
                if pi == p.len() {
                    return if !match_slash && t[ti..].contains(&b'/') {
                        Wild::AbortToStarStar
                    } else {
                        Wild::Match
                    };
                }
                while ti < t.len() {
                    match dowild(&p[pi..], &t[ti..]) {
                        Wild::NoMatch => {
                            if !match_slash && t[ti] == b'/' {
                                return Wild::AbortToStarStar;
                            }
                        }
                        Wild::AbortToStarStar if match_slash => {}
                        other => return other,
                    }
                    ti += 1;
                }
                return Wild::AbortAll;
            }
            b'[' => {
                let Ok((matched, close)) = class(p, pi, t[ti]) else {
                    return Wild::AbortAll;
                };
                if !matched || t[ti] == b'/' {
                    return Wild::NoMatch;
                }
                pi = close;
            }
            c => {
                if c != t[ti] {
                    return Wild::NoMatch;
                }
            }
        }
        pi += 1;
        ti += 1;
    }
    if ti == t.len() {
        Wild::Match
    } else {
        Wild::NoMatch
    }
}

/// Matches byte `c` against the class that opens at `p[open]`; returns whether it matched
/// and the index of the closing `]`.
fn class(p: &[u8], open: usize, c: u8) -> Result<(bool, usize), String> {
    let unterminated = || "unterminated character class '['".to_string();
    let mut i = open + 1;
    let negated = matches!(p.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut prev: Option<u8> = None;
    let mut first = true;
    loop {
        let pc = *p.get(i).ok_or_else(unterminated)?;
        if pc == b']' && !first {
            break;
        }
        first = false;
        if pc == b'\\' {
            i += 1;
            let e = *p.get(i).ok_or_else(unterminated)?;
            matched |= c == e;
            prev = Some(e);
        } else if pc == b'-' && prev.is_some() && p.get(i + 1).is_some_and(|&n| n != b']') {
            i += 1;
            let mut hi = p[i];
            if hi == b'\\' {
                i += 1;
                hi = *p.get(i).ok_or_else(unterminated)?;
            }
            let lo = prev.unwrap_or(0);
            matched |= lo <= c && c <= hi;
            prev = None;
        } else if pc == b'[' && p.get(i + 1) == Some(&b':') {
            let start = i + 2;
            let close = start
                + p[start..]
                    .iter()
                    .position(|&b| b == b']')
                    .ok_or_else(unterminated)?;
            if close > start && p[close - 1] == b':' {
                let name = &p[start..close - 1];
                let hit = match name {
                    b"alnum" => c.is_ascii_alphanumeric(),
                    b"alpha" => c.is_ascii_alphabetic(),
                    b"blank" => c == b' ' || c == b'\t',
                    b"cntrl" => c.is_ascii_control(),
                    b"digit" => c.is_ascii_digit(),
                    b"graph" => c.is_ascii_graphic(),
                    b"lower" => c.is_ascii_lowercase(),
                    b"print" => c.is_ascii_graphic() || c == b' ',
                    b"punct" => c.is_ascii_punctuation(),
                    b"space" => c.is_ascii_whitespace() || c == 0x0b,
                    b"upper" => c.is_ascii_uppercase(),
                    b"xdigit" => c.is_ascii_hexdigit(),
                    _ => {
                        return Err(format!(
                            "unknown character class [:{}:]",
                            String::from_utf8_lossy(name)
                        ));
                    }
                };
                matched |= hit;
                i = close;
                prev = None;
            } else {
                // Not a class name: a literal '['.
                matched |= c == b'[';
                prev = Some(b'[');
            }
        } else {
            matched |= c == pc;
            prev = Some(pc);
        }
        i += 1;
    }
    Ok((matched != negated, i))
}

/// A project's include or exclude list, compiled.
#[derive(Debug)]
struct Filter {
    include: bool,
    patterns: Vec<Pattern>,
    has_negation: bool,
}

impl Filter {
    /// `None` when the project filters nothing.
    fn new(project: &Project) -> Result<Option<Filter>, ProjectError> {
        let schema = project.schema_version;
        if !project.include.is_empty() && !project.exclude.is_empty() {
            return Err(ProjectError::IncludeAndExclude {
                path: project.path.clone(),
                include_key: schema.include_key(),
                exclude_key: schema.exclude_key(),
            });
        }
        let (include, lines, key) = if !project.include.is_empty() {
            (true, &project.include, schema.include_key())
        } else if !project.exclude.is_empty() {
            (false, &project.exclude, schema.exclude_key())
        } else {
            return Ok(None);
        };
        let mut patterns = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match Pattern::compile(line) {
                Ok(Some(p)) => patterns.push(p),
                Ok(None) => {}
                Err(why) => {
                    return Err(ProjectError::Invalid {
                        path: project.path.clone(),
                        key: format!("{key}[{i}]"),
                        why: format!("pattern {line:?}: {why}"),
                    });
                }
            }
        }
        let has_negation = patterns.iter().any(|p| p.negated);
        Ok(Some(Filter {
            include,
            patterns,
            has_negation,
        }))
    }

    /// The last pattern matching `rel` or a directory above it, given `above`, the last
    /// one matching a directory above it.
    fn winner(&self, rel: &[u8], is_dir: bool, above: Option<usize>) -> Option<usize> {
        for i in (0..self.patterns.len()).rev() {
            if Some(i) <= above {
                break;
            }
            if self.patterns[i].matches(rel, is_dir) {
                return Some(i);
            }
        }
        above
    }

    fn keeps(&self, winner: Option<usize>) -> bool {
        let matched = winner.is_some_and(|i| !self.patterns[i].negated);
        matched == self.include
    }
}

// ---------------------------------------------------------------------------------------
// The copy
// ---------------------------------------------------------------------------------------

/// What [`copy_app`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Regular files copied.
    pub files: u64,
    /// Directories created below the destination.
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// Entries left out by include/exclude (a directory left out whole counts once).
    pub excluded: u64,
    /// Special files that were not copied.
    pub skipped: Vec<Skipped>,
}

/// A special file [`copy_app`] did not copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Relative to the app directory.
    pub path: String,
    pub kind: SpecialKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpecialKind {
    Fifo,
    Socket,
    BlockDevice,
    CharDevice,
    Unknown,
}

impl SpecialKind {
    fn of(ft: fs::FileType) -> SpecialKind {
        if ft.is_fifo() {
            SpecialKind::Fifo
        } else if ft.is_socket() {
            SpecialKind::Socket
        } else if ft.is_block_device() {
            SpecialKind::BlockDevice
        } else if ft.is_char_device() {
            SpecialKind::CharDevice
        } else {
            SpecialKind::Unknown
        }
    }

    fn describe(self) -> &'static str {
        match self {
            SpecialKind::Fifo => "fifo",
            SpecialKind::Socket => "socket",
            SpecialKind::BlockDevice => "block device",
            SpecialKind::CharDevice => "character device",
            SpecialKind::Unknown => "file of unknown type",
        }
    }
}

/// Copies the app directory `app` into `dest` (absent, or an empty directory), applying
/// `project`'s include/exclude list. See the module docs for what is kept.
///
/// `dest` is created if absent (with its parents) and ends with the app directory's own
/// mode and times. A `dest` inside the app is refused before anything is written. On error
/// the partial copy is left in `dest` for the caller to remove.
pub fn copy_app(
    app: &Path,
    dest: &Path,
    project: Option<&Project>,
) -> Result<CopyReport, ProjectError> {
    let filter = match project {
        Some(p) => Filter::new(p)?,
        None => None,
    };
    // The root's own times are taken before reading it changes its atime.
    let app_meta = fs::metadata(app).map_err(io_at(app))?;
    if !app_meta.is_dir() {
        return Err(ProjectError::AppNotDirectory {
            path: app.to_path_buf(),
        });
    }
    let app_real = fs::canonicalize(app).map_err(io_at(app))?;
    prepare_dest(dest, &app_real)?;

    let mut walk = Walk {
        filter: filter.as_ref(),
        src: app.to_path_buf(),
        dst: dest.to_path_buf(),
        rel: Vec::new(),
        levels: vec![Level {
            dst_len: dest.as_os_str().len(),
            created: true,
        }],
        report: CopyReport::default(),
    };
    let scope = if filter.is_some() {
        Scope::Decide(None)
    } else {
        Scope::All
    };
    walk.walk_dir(scope)?;
    finish_dir(dest, &app_meta)?;
    Ok(walk.report)
}

/// Checks that `dest` is absent or empty and not inside the app, and creates it.
fn prepare_dest(dest: &Path, app_real: &Path) -> Result<(), ProjectError> {
    let inside = |real: &Path| {
        if real.starts_with(app_real) {
            Err(ProjectError::DestInsideApp {
                dest: dest.to_path_buf(),
                app: app_real.to_path_buf(),
            })
        } else {
            Ok(())
        }
    };
    match fs::symlink_metadata(dest) {
        Ok(meta) => {
            let empty = meta.is_dir() && fs::read_dir(dest).map_err(io_at(dest))?.next().is_none();
            if !empty {
                return Err(ProjectError::DestNotEmpty {
                    path: dest.to_path_buf(),
                });
            }
            inside(&fs::canonicalize(dest).map_err(io_at(dest))?)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Resolve the nearest existing ancestor: the components below it don't exist,
            // so they can't be symlinks.
            let mut base = dest;
            let real = loop {
                base = match base.parent() {
                    Some(p) if p.as_os_str().is_empty() => Path::new("."),
                    Some(p) => p,
                    None => break None,
                };
                if fs::symlink_metadata(base).is_ok() {
                    break Some(base);
                }
            };
            if let Some(base) = real {
                let rest = dest.strip_prefix(base).unwrap_or(dest);
                inside(&fs::canonicalize(base).map_err(io_at(base))?.join(rest))?;
            }
            fs::create_dir_all(dest).map_err(io_at(dest))
        }
        Err(e) => Err(io_at(dest)(e)),
    }
}

/// How the entries of a directory are decided.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Everything is copied.
    All,
    /// Each entry is matched; the value is the winning pattern over the directories above.
    Decide(Option<usize>),
}

/// A directory on the current path, root first.
struct Level {
    /// Length of its destination path, a prefix of `Walk::dst`.
    dst_len: usize,
    created: bool,
}

struct Walk<'f> {
    filter: Option<&'f Filter>,
    src: PathBuf,
    dst: PathBuf,
    /// The current entry relative to the app, `/`-separated.
    rel: Vec<u8>,
    levels: Vec<Level>,
    report: CopyReport,
}

impl Walk<'_> {
    fn walk_dir(&mut self, scope: Scope) -> Result<(), ProjectError> {
        // Read the whole directory first so that deep trees don't hold a descriptor per level.
        let mut entries: Vec<(OsString, fs::FileType)> = Vec::new();
        for entry in fs::read_dir(&self.src).map_err(io_at(&self.src))? {
            let entry = entry.map_err(io_at(&self.src))?;
            let ft = entry.file_type().map_err(io_at(&entry.path()))?;
            entries.push((entry.file_name(), ft));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, ft) in entries {
            let rel_len = self.rel.len();
            if rel_len > 0 {
                self.rel.push(b'/');
            }
            self.rel.extend_from_slice(name.as_bytes());
            self.src.push(&name);
            self.dst.push(&name);
            let result = self.entry(ft, scope);
            self.src.pop();
            self.dst.pop();
            self.rel.truncate(rel_len);
            result?;
        }
        Ok(())
    }

    fn entry(&mut self, ft: fs::FileType, scope: Scope) -> Result<(), ProjectError> {
        let is_dir = ft.is_dir();
        let (keep, below) = match (scope, self.filter) {
            (Scope::Decide(above), Some(f)) => {
                let winner = f.winner(&self.rel, is_dir, above);
                let keep = f.keeps(winner);
                let below = if !f.has_negation && winner.is_some() {
                    // Without negations every path below a matched directory is matched too.
                    keep.then_some(Scope::All)
                } else {
                    Some(Scope::Decide(winner))
                };
                let forced = self.levels.len() == 1 && self.rel == FILE_NAME.as_bytes();
                (keep || forced, below)
            }
            _ => (true, Some(Scope::All)),
        };
        if is_dir {
            return match below {
                Some(below) => self.copy_dir(keep, below),
                None => {
                    self.report.excluded += 1;
                    Ok(())
                }
            };
        }
        if !keep {
            self.report.excluded += 1;
            return Ok(());
        }
        if ft.is_file() {
            self.create_parents()?;
            self.copy_file()
        } else if ft.is_symlink() {
            self.create_parents()?;
            self.copy_symlink()
        } else {
            let kind = SpecialKind::of(ft);
            let path = String::from_utf8_lossy(&self.rel).into_owned();
            tracing::warn!("{}: {} not copied", self.src.display(), kind.describe());
            self.report.skipped.push(Skipped { path, kind });
            Ok(())
        }
    }

    fn copy_dir(&mut self, keep: bool, below: Scope) -> Result<(), ProjectError> {
        let meta = fs::symlink_metadata(&self.src).map_err(io_at(&self.src))?;
        self.levels.push(Level {
            dst_len: self.dst.as_os_str().len(),
            created: false,
        });
        let mut result = if keep { self.create_parents() } else { Ok(()) };
        if result.is_ok() {
            result = self.walk_dir(below);
        }
        let level = self.levels.pop();
        result?;
        if level.is_some_and(|l| l.created) {
            self.report.dirs += 1;
            finish_dir(&self.dst, &meta)
        } else {
            self.report.excluded += 1;
            Ok(())
        }
    }

    /// Creates the directories on the current path that were left for later.
    fn create_parents(&mut self) -> Result<(), ProjectError> {
        let Some(first) = self.levels.iter().position(|l| !l.created) else {
            return Ok(());
        };
        let dst = self.dst.as_os_str().as_bytes();
        for level in &mut self.levels[first..] {
            let path = Path::new(OsStr::from_bytes(&dst[..level.dst_len]));
            fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map_err(io_at(path))?;
            level.created = true;
        }
        Ok(())
    }

    fn copy_file(&mut self) -> Result<(), ProjectError> {
        // O_NOFOLLOW and O_NONBLOCK: an entry swapped for a symlink or a fifo since the
        // directory was read is neither followed nor waited on.
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.src)
            .map_err(io_at(&self.src))?;
        let meta = from.metadata().map_err(io_at(&self.src))?;
        if !meta.is_file() {
            return Err(io_at(&self.src)(io::Error::other(
                "changed from a regular file while being copied",
            )));
        }
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.dst)
            .map_err(io_at(&self.dst))?;
        // File to file, io::copy takes copy_file_range, as std::fs::copy does.
        let bytes = io::copy(&mut from, &mut to).map_err(|source| ProjectError::Copy {
            from: self.src.clone(),
            to: self.dst.clone(),
            source,
        })?;
        set_file_meta(&to, &meta).map_err(io_at(&self.dst))?;
        self.report.files += 1;
        self.report.bytes += bytes;
        Ok(())
    }

    fn copy_symlink(&mut self) -> Result<(), ProjectError> {
        let meta = fs::symlink_metadata(&self.src).map_err(io_at(&self.src))?;
        let target = fs::read_link(&self.src).map_err(io_at(&self.src))?;
        std::os::unix::fs::symlink(&target, &self.dst).map_err(io_at(&self.dst))?;
        set_times(&self.dst, &meta).map_err(io_at(&self.dst))?;
        self.report.symlinks += 1;
        Ok(())
    }
}

fn set_file_meta(to: &File, meta: &fs::Metadata) -> io::Result<()> {
    to.set_permissions(Permissions::from_mode(meta.mode() & 0o7777))?;
    to.set_times(
        FileTimes::new()
            .set_accessed(meta.accessed()?)
            .set_modified(meta.modified()?),
    )
}

/// Applies a directory's mode and times, once its contents are in place.
fn finish_dir(path: &Path, meta: &fs::Metadata) -> Result<(), ProjectError> {
    fs::set_permissions(path, Permissions::from_mode(meta.mode() & 0o7777)).map_err(io_at(path))?;
    set_times(path, meta).map_err(io_at(path))
}

/// Sets access and modification times without following a symlink.
fn set_times(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let atime = TimeSpec::new(meta.atime() as _, meta.atime_nsec() as _);
    let mtime = TimeSpec::new(meta.mtime() as _, meta.mtime_nsec() as _);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    // ---- descriptors ----

    fn parse_str(text: &str) -> Result<Project, ProjectError> {
        parse(Path::new("/app/project.toml"), text)
    }

    const V01: &str = r#"
[project]
id = "io.buildpacks.my-app"
name = "My App"
version = "1.2.3"
authors = ["A <a@example.com>"]
source-url = "https://example.com/src"
[[project.licenses]]
type = "MIT"

[build]
builder = "cnbs/sample-builder:bionic"
exclude = ["spec/", "*.log"]
[[build.buildpacks]]
id = "example/java"
version = "1.0"
[[build.buildpacks]]
uri = "docker://example/node:2"
[[build.env]]
name = "JAVA_OPTS"
value = "-Xmx1g"
[[build.env]]
name = "EMPTY"
value = ""

[metadata]
pipeline = "Lucerne"
"#;

    const V02: &str = r#"
[_]
schema-version = "0.2"
id = "io.buildpacks.my-app"
name = "My App"
version = "1.2.3"
authors = ["A <a@example.com>"]
source-url = "https://example.com/src"
[[_.licenses]]
type = "MIT"
[_.metadata]
pipeline = "Lucerne"

[io.buildpacks]
builder = "cnbs/sample-builder:bionic"
exclude = ["spec/", "*.log"]
[[io.buildpacks.group]]
id = "example/java"
version = "1.0"
[[io.buildpacks.group]]
uri = "docker://example/node:2"
[[io.buildpacks.build.env]]
name = "JAVA_OPTS"
value = "-Xmx1g"
[[io.buildpacks.build.env]]
name = "EMPTY"
value = ""

[com.example.other-platform]
anything = 1
"#;

    #[test]
    fn both_schemas_read_into_the_same_project() {
        let one = parse_str(V01).unwrap();
        let two = parse_str(V02).unwrap();
        assert_eq!(one.schema_version, SchemaVersion::V0_1);
        assert_eq!(two.schema_version, SchemaVersion::V0_2);
        assert_eq!(one.id.as_deref(), Some("io.buildpacks.my-app"));
        assert_eq!(one.name.as_deref(), Some("My App"));
        assert_eq!(one.version.as_deref(), Some("1.2.3"));
        assert_eq!(one.source_url.as_deref(), Some("https://example.com/src"));
        assert_eq!(one.authors, ["A <a@example.com>"]);
        assert_eq!(
            one.licenses,
            [License {
                kind: Some("MIT".into()),
                uri: None
            }]
        );
        assert_eq!(one.builder.as_deref(), Some("cnbs/sample-builder:bionic"));
        assert!(one.include.is_empty());
        assert_eq!(one.exclude, ["spec/", "*.log"]);
        assert_eq!(
            one.env,
            [
                ("JAVA_OPTS".to_string(), "-Xmx1g".to_string()),
                ("EMPTY".to_string(), String::new())
            ]
        );
        assert_eq!(
            one.buildpacks,
            [
                BuildpackRef {
                    id: Some("example/java".into()),
                    version: Some("1.0".into()),
                    ..Default::default()
                },
                BuildpackRef {
                    uri: Some("docker://example/node:2".into()),
                    ..Default::default()
                }
            ]
        );
        assert_eq!(
            one.metadata.get("pipeline").and_then(|v| v.as_str()),
            Some("Lucerne")
        );
        // Everything but the schema and the warnings is the same.
        let mut two_as_one = two.clone();
        two_as_one.schema_version = SchemaVersion::V0_1;
        two_as_one.warnings = one.warnings.clone();
        assert_eq!(one, two_as_one);
        assert!(two.warnings.is_empty(), "{:?}", two.warnings);
        // 0.1 without a declared version says so, as pack does.
        assert!(one.warnings.iter().any(|w| w.contains("schema 0.1")));
    }

    #[test]
    fn schema_0_2_groups_scripts_labels_and_env_spellings() {
        let p = parse_str(
            r#"
[_]
schema-version = "0.2"
[[io.buildpacks.pre.group]]
uri = "https://example.com/pre.tgz"
[[io.buildpacks.post.group]]
id = "example/procfile"
[[io.buildpacks.group]]
id = "me/rake"
[io.buildpacks.group.script]
api = "0.10"
inline = "rake package"
[[io.buildpacks.env.build]]
name = "OLD"
value = "deprecated"
[[io.buildpacks.labels]]
key = "org.example.team"
value = "platform"
"#,
        )
        .unwrap();
        assert_eq!(
            p.pre_buildpacks[0].uri.as_deref(),
            Some("https://example.com/pre.tgz")
        );
        assert_eq!(p.post_buildpacks[0].id.as_deref(), Some("example/procfile"));
        let script = p.buildpacks[0].script.as_ref().unwrap();
        assert_eq!(
            (
                script.api.as_str(),
                script.shell.as_str(),
                script.inline.as_str()
            ),
            ("0.10", "/bin/sh", "rake package")
        );
        assert_eq!(p.env, [("OLD".to_string(), "deprecated".to_string())]);
        assert!(p.warnings.iter().any(|w| w.contains("deprecated")));
        assert_eq!(
            p.labels,
            [("org.example.team".to_string(), "platform".to_string())]
        );

        // build.env wins over env.build, as in pack.
        let p = parse_str(
            r#"
[_]
schema-version = "0.2"
[[io.buildpacks.build.env]]
name = "A"
value = "new"
[[io.buildpacks.env.build]]
name = "A"
value = "old"
"#,
        )
        .unwrap();
        assert_eq!(p.env, [("A".to_string(), "new".to_string())]);
        assert!(p.warnings.iter().any(|w| w.contains("ignored")));
    }

    #[test]
    fn include_and_exclude_together_is_an_error_naming_the_file() {
        for text in [
            "[build]\ninclude = [\"a\"]\nexclude = [\"b\"]\n",
            "[_]\nschema-version = \"0.2\"\n[io.buildpacks]\ninclude = []\nexclude = [\"b\"]\n",
        ] {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.contains("/app/project.toml"), "{err}");
            assert!(err.contains("include") && err.contains("exclude"), "{err}");
        }
        // A hand-built project is refused by the copy too.
        let mut p = parse_str("").unwrap();
        p.include = vec!["a".into()];
        p.exclude = vec!["b".into()];
        let tmp = tempfile::tempdir().unwrap();
        let err = copy_app(tmp.path(), &tmp.path().join("x"), Some(&p)).unwrap_err();
        assert!(
            matches!(err, ProjectError::IncludeAndExclude { .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_schema_version_is_an_error_naming_it() {
        let err = parse_str("[_]\nschema-version = \"0.9\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ProjectError::UnknownSchema { .. }));
        assert!(
            msg.contains("\"0.9\"") && msg.contains("/app/project.toml"),
            "{msg}"
        );
        let msg = parse_str("[_]\nschema-version = 0.2\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("_.schema-version") && msg.contains("a float"),
            "{msg}"
        );
    }

    #[test]
    fn errors_name_the_key_at_fault() {
        let cases = [
            (
                "[_]\nschema-version = \"0.2\"\n[io.buildpacks]\ninclude = [\"ok\", 3]\n",
                "io.buildpacks.include[1]",
            ),
            (
                "[_]\nschema-version = \"0.2\"\n[io.buildpacks]\nexclude = [\"a\", \"[abc\"]\n",
                "io.buildpacks.exclude[1]",
            ),
            (
                "[_]\nschema-version = \"0.2\"\n[[io.buildpacks.group]]\nversion = \"1\"\n",
                "io.buildpacks.group[0]",
            ),
            (
                "[_]\nschema-version = \"0.2\"\n[[io.buildpacks.group]]\nuri = \"x\"\nversion = \"1\"\n",
                "io.buildpacks.group[0]",
            ),
            ("[[build.env]]\nname = \"A\"\n", "build.env[0].value"),
            (
                "[[build.env]]\nname = \"A=B\"\nvalue = \"x\"\n",
                "build.env[0].name",
            ),
            ("[[project.licenses]]\n", "project.licenses[0]"),
            ("[project]\nname = 1\n", "project.name"),
            ("build = 3\n", "build"),
            // io.buildpacks without a schema version would be silently dropped by pack.
            ("[io.buildpacks]\nexclude = [\"x\"]\n", "io.buildpacks"),
            ("[_]\nid = \"x\"\n", "_.schema-version"),
            (
                "[_]\nschema-version = \"0.2\"\n[build]\nexclude = [\"x\"]\n",
                "build",
            ),
        ];
        for (text, key) in cases {
            let err = parse_str(text).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("/app/project.toml: {key}:")),
                "{text:?}: {msg}"
            );
        }
        let msg = parse_str("[project\n").unwrap_err().to_string();
        assert!(
            msg.starts_with("/app/project.toml: not a valid TOML"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let p = parse_str(
            "[_]\nschema-version = \"0.2\"\nfoo = 1\n[io.buildpacks]\nbuilders = \"x\"\n",
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("_.foo"));
        assert!(p.warnings[1].contains("io.buildpacks.builders"));
    }

    #[test]
    fn read_and_find() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(find(tmp.path()), None);
        let path = tmp.path().join(FILE_NAME);
        fs::write(&path, V02).unwrap();
        assert_eq!(find(tmp.path()), Some(path.clone()));
        let p = read(&path).unwrap();
        assert_eq!(p.path, path);
        let missing = tmp.path().join("nope.toml");
        let msg = read(&missing).unwrap_err().to_string();
        assert!(msg.contains("nope.toml"), "{msg}");
    }

    // ---- patterns ----

    fn pat(line: &str) -> Pattern {
        Pattern::compile(line).unwrap().unwrap()
    }

    fn m(line: &str, path: &str) -> bool {
        pat(line).matches(path.as_bytes(), false)
    }

    fn md(line: &str, path: &str) -> bool {
        pat(line).matches(path.as_bytes(), true)
    }

    #[test]
    fn star_and_question_mark_stay_within_a_component() {
        assert!(m("*.go", "main.go"));
        assert!(m("*.go", "cmd/app/main.go"), "unanchored: matches the name");
        assert!(!m("*.go", "main.golang"));
        assert!(m("cmd/*.go", "cmd/main.go"));
        assert!(!m("cmd/*.go", "cmd/app/main.go"), "* does not cross /");
        assert!(m("ma?n.go", "main.go"));
        assert!(!m("ma?n.go", "man.go"));
        assert!(!m("a?b", "a/b"), "? does not match /");
        assert!(m("*", "anything"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXbY"));
        // Backtracking is bounded as in git (no exponential blow-up).
        let long = "a".repeat(200);
        assert!(!m("*a*a*a*a*a*a*a*a*a*a*b", &long));
        assert!(!m("/**/a/**/a/**/a/**/b", &["a"; 40].join("/")));
    }

    #[test]
    fn character_classes() {
        assert!(m("file[abc].txt", "filea.txt"));
        assert!(!m("file[abc].txt", "filed.txt"));
        assert!(m("file[a-c].txt", "fileb.txt"));
        assert!(!m("file[a-c].txt", "filez.txt"));
        assert!(m("file[!a-c].txt", "filez.txt"));
        assert!(!m("file[!a-c].txt", "fileb.txt"));
        assert!(m("file[^a-c].txt", "filez.txt"));
        assert!(m("v[[:digit:]]", "v7"));
        assert!(!m("v[[:digit:]]", "vx"));
        assert!(m("[[:upper:]]*", "README"));
        assert!(m("[]]", "]"), "a leading ] is literal");
        assert!(m("[a-]", "-"), "a trailing - is literal");
        assert!(!m("a[/]b", "a/b"), "classes never match /");
        for bad in ["[abc", "a[", "[[:nope:]]", "trailing\\"] {
            assert!(Pattern::compile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn escapes_comments_blank_lines_and_spaces() {
        assert!(Pattern::compile("").unwrap().is_none());
        assert!(Pattern::compile("# comment").unwrap().is_none());
        assert!(m("\\#hash", "#hash"));
        assert!(m("\\!bang", "!bang"));
        assert!(!pat("\\!bang").negated);
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "x"));
        assert!(
            m("trailing   ", "trailing"),
            "unescaped trailing spaces are dropped"
        );
        assert!(m("space\\ ", "space "), "an escaped one is kept");
    }

    #[test]
    fn anchoring_and_directory_only() {
        assert!(m("/main.go", "main.go"));
        assert!(!m("/main.go", "cmd/main.go"), "a leading / anchors");
        assert!(m("cmd/app", "cmd/app"));
        assert!(!m("cmd/app", "x/cmd/app"), "a middle / anchors");
        assert!(md("build/", "build"));
        assert!(
            md("build/", "src/build"),
            "a trailing / alone does not anchor"
        );
        assert!(
            !m("build/", "build"),
            "a trailing / matches directories only"
        );
        assert!(m("build", "src/build"));
    }

    #[test]
    fn double_star() {
        assert!(m("**/foo", "foo"));
        assert!(m("**/foo", "a/b/foo"));
        assert!(m("**/a/b", "x/y/a/b"));
        assert!(m("a/**/b", "a/b"), "/**/ matches zero directories");
        assert!(m("a/**/b", "a/x/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("a/**/b", "a/x/y/c"));
        assert!(m("abc/**", "abc/x/y"));
        assert!(!md("abc/**", "abc"), "abc/** is what is inside abc");
        assert!(m("**", "a/b/c"));
        assert!(!m("/a**b", "a/b"), "** not a whole component is a plain *");
        assert!(m("/a**b", "aXXb"));
    }

    #[test]
    fn negation_and_last_match_wins() {
        let project = |lines: &[&str]| {
            let mut p = parse_str("").unwrap();
            p.exclude = lines.iter().map(|s| s.to_string()).collect();
            Filter::new(&p).unwrap().unwrap()
        };
        // Decides a path as copy_app does: over the path and each directory above it.
        let keeps = |f: &Filter, path: &str, is_dir: bool| {
            let mut above = None;
            let parts: Vec<&str> = path.split('/').collect();
            for i in 1..parts.len() {
                above = f.winner(parts[..i].join("/").as_bytes(), true, above);
            }
            f.keeps(f.winner(path.as_bytes(), is_dir, above))
        };
        let f = project(&["*.log", "!keep.log"]);
        assert!(!keeps(&f, "a.log", false));
        assert!(keeps(&f, "keep.log", false));
        assert!(keeps(&f, "dir/keep.log", false));
        let f = project(&["!keep.log", "*.log"]);
        assert!(!keeps(&f, "keep.log", false), "the last match wins");
        let f = project(&["build/", "!build/keep.txt"]);
        assert!(!keeps(&f, "build/out.bin", false));
        assert!(
            keeps(&f, "build/keep.txt", false),
            "re-admitted below a matched dir (pack)"
        );
    }

    // ---- the copy ----

    fn write(root: &Path, rel: &str, content: &str, mode: u32) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
    }

    /// The standard app tree.
    fn app_tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let app = tmp.path();
        for rel in [
            "project.toml",
            "README.md",
            "main.go",
            "go.mod",
            "cmd/app/main.go",
            "cmd/app/main_test.go",
            "spec/a_spec.rb",
            "spec/helper/x.rb",
            "build/out.bin",
            "build/keep.txt",
            "logs/debug.log",
            "logs/important/keep.log",
            "src/build/gen.go",
            "src/lib/util.rb",
        ] {
            write(app, rel, rel, 0o644);
        }
        write(app, "bin/run.sh", "#!/bin/sh\necho hi\n", 0o755);
        write(app, "secret.key", "s3cret", 0o600);
        fs::create_dir_all(app.join("docs/empty")).unwrap();
        tmp
    }

    /// Sorted relative paths; directories end in `/`, symlinks show their target.
    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(root).min_depth(1) {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = e.file_type();
            out.push(if ft.is_dir() {
                format!("{rel}/")
            } else if ft.is_symlink() {
                format!("{rel} -> {}", fs::read_link(e.path()).unwrap().display())
            } else {
                rel
            });
        }
        out.sort();
        out
    }

    /// Every entry with its kind, mode, mtime and content: what "unchanged" means.
    fn full_listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(root) {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let content = if meta.is_file() {
                fs::read_to_string(e.path()).unwrap()
            } else if meta.is_symlink() {
                fs::read_link(e.path()).unwrap().display().to_string()
            } else {
                String::new()
            };
            out.push(format!(
                "{rel} {:o} {}.{} {content:?}",
                meta.mode(),
                meta.mtime(),
                meta.mtime_nsec(),
            ));
        }
        out.sort();
        out
    }

    fn copy_with(app: &Path, key: &str, patterns: &[&str]) -> (tempfile::TempDir, CopyReport) {
        let mut p = parse_str("").unwrap();
        let lines = patterns.iter().map(|s| s.to_string()).collect();
        match key {
            "include" => p.include = lines,
            _ => p.exclude = lines,
        }
        let out = tempfile::tempdir().unwrap();
        let report = copy_app(app, &out.path().join("app"), Some(&p)).unwrap();
        (out, report)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn copy_without_a_project_copies_everything() {
        let app = app_tree();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        let report = copy_app(app.path(), &dest, None).unwrap();
        assert_eq!(listing(&dest), listing(app.path()));
        assert!(listing(&dest).contains(&"docs/empty/".to_string()));
        assert_eq!(report.files, 16);
        assert_eq!(report.excluded, 0);
    }

    #[test]
    fn include_only() {
        let app = app_tree();
        let (out, report) = copy_with(app.path(), "include", &["cmd/", "go.mod", "*.go"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "cmd/",
                "cmd/app/",
                "cmd/app/main.go",
                "cmd/app/main_test.go",
                "go.mod",
                "main.go",
                "project.toml",
                "src/",
                "src/build/",
                "src/build/gen.go",
            ])
        );
        assert_eq!(report.files, 6);
    }

    #[test]
    fn exclude_only() {
        let app = app_tree();
        let (out, report) = copy_with(app.path(), "exclude", &["spec/", "*.log", "build", "docs"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "README.md",
                "bin/",
                "bin/run.sh",
                "cmd/",
                "cmd/app/",
                "cmd/app/main.go",
                "cmd/app/main_test.go",
                "go.mod",
                "logs/",
                "logs/important/",
                "main.go",
                "project.toml",
                "secret.key",
                "src/",
                "src/lib/",
                "src/lib/util.rb",
            ])
        );
        // spec/, build/, src/build/ and docs/ whole; the two logs one by one.
        assert_eq!(report.excluded, 6);
    }

    #[test]
    fn project_toml_is_kept_even_when_excluded() {
        let app = app_tree();
        let (out, _) = copy_with(app.path(), "exclude", &["*.toml", "*"]);
        assert_eq!(listing(&out.path().join("app")), strs(&["project.toml"]));
        let (out, _) = copy_with(app.path(), "include", &["README.md"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&["README.md", "project.toml"])
        );
    }

    #[test]
    fn negation() {
        let app = app_tree();
        let (out, _) = copy_with(
            app.path(),
            "exclude",
            &[
                "*.log",
                "!important/",
                "build/",
                "!build/keep.txt",
                "spec",
                "docs",
                "src",
                "cmd",
            ],
        );
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "README.md",
                "bin/",
                "bin/run.sh",
                "build/",
                "build/keep.txt",
                "go.mod",
                "logs/",
                "logs/important/",
                "logs/important/keep.log",
                "main.go",
                "project.toml",
                "secret.key",
            ])
        );
        // Include with a negation carves a hole.
        let (out, _) = copy_with(app.path(), "include", &["src/", "!src/build/"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&["project.toml", "src/", "src/lib/", "src/lib/util.rb"])
        );
    }

    #[test]
    fn anchored_and_directory_only_patterns() {
        let app = app_tree();
        // A file named like a directory-only pattern stays.
        write(app.path(), "src/lib/build", "a file named build", 0o644);
        let (out, _) = copy_with(
            app.path(),
            "exclude",
            &[
                "/main.go",
                "build/",
                "cmd/app/main_test.go",
                "/spec",
                "docs",
                "logs",
                "bin",
            ],
        );
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "README.md",
                "cmd/",
                "cmd/app/",
                "cmd/app/main.go",
                "go.mod",
                "project.toml",
                "secret.key",
                "src/",
                "src/lib/",
                "src/lib/build",
                "src/lib/util.rb",
            ])
        );
        // Anchored include: only the top-level build directory.
        let (out, _) = copy_with(app.path(), "include", &["/build/"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&["build/", "build/keep.txt", "build/out.bin", "project.toml"])
        );
    }

    #[test]
    fn double_star_patterns() {
        let app = app_tree();
        let (out, _) = copy_with(
            app.path(),
            "exclude",
            &[
                "**/helper",
                "logs/**",
                "cmd/**/*_test.go",
                "src/**/gen.go",
                "bin",
                "/build",
                "docs",
            ],
        );
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "README.md",
                "cmd/",
                "cmd/app/",
                "cmd/app/main.go",
                "go.mod",
                "logs/",
                "main.go",
                "project.toml",
                "secret.key",
                "spec/",
                "spec/a_spec.rb",
                "src/",
                "src/build/",
                "src/lib/",
                "src/lib/util.rb",
            ])
        );
        let (out, _) = copy_with(app.path(), "include", &["**/*.rb"]);
        assert_eq!(
            listing(&out.path().join("app")),
            strs(&[
                "project.toml",
                "spec/",
                "spec/a_spec.rb",
                "spec/helper/",
                "spec/helper/x.rb",
                "src/",
                "src/lib/",
                "src/lib/util.rb",
            ])
        );
    }

    #[test]
    fn symlinks_are_kept_as_symlinks_and_never_followed() {
        let app = app_tree();
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret/data.txt", "outside", 0o644);
        let link = |target: &Path, rel: &str| {
            std::os::unix::fs::symlink(target, app.path().join(rel)).unwrap();
        };
        link(Path::new("README.md"), "readme-link");
        link(Path::new("cmd"), "cmd-link");
        link(&outside.path().join("secret"), "escape-abs");
        link(Path::new("../../../../../etc"), "escape-rel");
        link(Path::new("does-not-exist"), "dangling");
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        // Links are files to the patterns: "*-link/" (directories only) does not match.
        let mut p = parse_str("").unwrap();
        p.exclude = vec!["*-link/".into()];
        let report = copy_app(app.path(), &dest, Some(&p)).unwrap();
        assert_eq!(report.symlinks, 5);
        for (rel, target) in [
            ("readme-link", PathBuf::from("README.md")),
            ("cmd-link", PathBuf::from("cmd")),
            ("escape-abs", outside.path().join("secret")),
            ("escape-rel", PathBuf::from("../../../../../etc")),
            ("dangling", PathBuf::from("does-not-exist")),
        ] {
            let meta = fs::symlink_metadata(dest.join(rel)).unwrap();
            assert!(meta.file_type().is_symlink(), "{rel}");
            assert_eq!(fs::read_link(dest.join(rel)).unwrap(), target, "{rel}");
        }
        // Nothing was copied through the links.
        assert!(!listing(&dest).iter().any(|l| l.contains("data.txt")));
        assert!(!listing(&dest).iter().any(|l| l.starts_with("cmd-link/")));
    }

    #[test]
    fn modes_times_and_empty_directories_are_kept() {
        let app = app_tree();
        let old = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
        let f = File::options()
            .write(true)
            .open(app.path().join("bin/run.sh"))
            .unwrap();
        f.set_times(FileTimes::new().set_modified(old)).unwrap();
        fs::set_permissions(app.path().join("docs"), Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(app.path().join("spec"), Permissions::from_mode(0o555)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        copy_app(app.path(), &dest, None).unwrap();
        let mode = |rel: &str| fs::symlink_metadata(dest.join(rel)).unwrap().mode() & 0o7777;
        assert_eq!(mode("bin/run.sh"), 0o755);
        assert_eq!(mode("secret.key"), 0o600);
        assert_eq!(mode("README.md"), 0o644);
        assert_eq!(mode("docs"), 0o750);
        assert_eq!(mode("spec"), 0o555, "a read-only directory is still filled");
        assert!(dest.join("spec/helper/x.rb").exists());
        assert!(dest.join("docs/empty").is_dir());
        let mtime = fs::metadata(dest.join("bin/run.sh"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mtime, old);
        for rel in ["", "docs", "cmd/app", "src/build"] {
            let a = fs::metadata(app.path().join(rel)).unwrap();
            let b = fs::metadata(dest.join(rel)).unwrap();
            assert_eq!(
                (a.mtime(), a.mtime_nsec()),
                (b.mtime(), b.mtime_nsec()),
                "{rel:?}"
            );
            assert_eq!(a.mode(), b.mode(), "{rel:?}");
        }
        fs::set_permissions(dest.join("spec"), Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(app.path().join("spec"), Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn source_is_unchanged() {
        let app = app_tree();
        std::os::unix::fs::symlink("README.md", app.path().join("link")).unwrap();
        let before = full_listing(app.path());
        let (out, _) = copy_with(app.path(), "exclude", &["*.log", "!keep.log", "spec/"]);
        assert_eq!(full_listing(app.path()), before);
        // And the copy of what was kept is faithful.
        let copied = full_listing(&out.path().join("app"));
        let kept = |l: &&String| !l.starts_with("spec") && !l.starts_with("logs/debug.log");
        assert_eq!(
            copied,
            before.iter().filter(kept).cloned().collect::<Vec<_>>()
        );
    }

    #[test]
    fn hardlinks_become_independent_files() {
        let app = app_tree();
        fs::hard_link(app.path().join("README.md"), app.path().join("README.hard")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        copy_app(app.path(), &dest, None).unwrap();
        let a = fs::metadata(dest.join("README.md")).unwrap();
        let b = fs::metadata(dest.join("README.hard")).unwrap();
        assert_ne!(a.ino(), b.ino());
        assert_eq!((a.nlink(), b.nlink()), (1, 1));
    }

    #[test]
    fn special_files_are_skipped() {
        let app = app_tree();
        nix::unistd::mkfifo(
            &app.path().join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let sock = std::os::unix::net::UnixListener::bind(app.path().join("sock")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        let report = copy_app(app.path(), &dest, None).unwrap();
        drop(sock);
        assert_eq!(
            report.skipped,
            [
                Skipped {
                    path: "pipe".into(),
                    kind: SpecialKind::Fifo
                },
                Skipped {
                    path: "sock".into(),
                    kind: SpecialKind::Socket
                }
            ]
        );
        assert!(fs::symlink_metadata(dest.join("pipe")).is_err());
        assert!(fs::symlink_metadata(dest.join("sock")).is_err());
    }

    #[test]
    fn destination_must_be_new_or_empty_and_outside_the_app() {
        let app = app_tree();
        let out = tempfile::tempdir().unwrap();
        // An empty existing directory is fine.
        copy_app(app.path(), out.path(), None).unwrap();
        // A non-empty one is not.
        let err = copy_app(app.path(), out.path(), None).unwrap_err();
        assert!(matches!(err, ProjectError::DestNotEmpty { .. }), "{err}");
        // Inside the app, existing or not: refused before anything is written.
        let before = full_listing(app.path());
        for dest in [app.path().join("docs/empty"), app.path().join("new/deeper")] {
            let err = copy_app(app.path(), &dest, None).unwrap_err();
            assert!(matches!(err, ProjectError::DestInsideApp { .. }), "{err}");
        }
        assert_eq!(full_listing(app.path()), before);
        let err = copy_app(&app.path().join("README.md"), &out.path().join("x"), None);
        assert!(matches!(err, Err(ProjectError::AppNotDirectory { .. })));
    }

    /// The speed the copy is meant for: 10,000 files well under a second on tmpfs. On
    /// other filesystems only the result is checked (a slow disk is as slow for `cp -a`).
    #[test]
    fn ten_thousand_files() {
        use nix::sys::statfs::{TMPFS_MAGIC, statfs};
        let shm = Path::new("/dev/shm");
        let on_tmpfs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC);
        let tmp = if on_tmpfs(shm) {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let app = tmp.path().join("app");
        for d in 0..100 {
            let dir = app.join(format!("d{d:03}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                fs::write(dir.join(format!("f{f:03}.txt")), b"some content\n").unwrap();
            }
        }
        let mut p = parse_str("").unwrap();
        p.exclude = vec!["d00[0-4]/".into(), "*7.txt".into(), "!d099/f077.txt".into()];
        let start = std::time::Instant::now();
        let report = copy_app(&app, &tmp.path().join("copy"), Some(&p)).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(report.files, 95 * 90 + 1);
        assert_eq!(report.dirs, 95);
        assert_eq!(report.bytes, (95 * 90 + 1) * 13);
        eprintln!("copied {} files in {elapsed:?}", report.files);
        if on_tmpfs(tmp.path()) {
            assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        }
    }
}
