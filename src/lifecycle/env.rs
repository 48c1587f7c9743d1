//! The environment buildpacks see, built as the reference lifecycle builds it (`env/`):
//! the lifecycle's own environment filtered to a short allow-list, buildpack env-file
//! directories with their suffix rules, build layers' `bin`/`lib`/… prepended to the path
//! variables, the user's `<platform>/env` on top of every call (unless the buildpack clears
//! it) and the operator's `<build-config>/env` last.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

/// The variables of the lifecycle's own environment that reach buildpacks.
const PASSED_THROUGH: [&str; 9] = [
    "CNB_STACK_ID",
    "HOSTNAME",
    "HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// The path variables, and the layer subdirectory each is prepended from at build time.
pub const BUILD_PATH_DIRS: [(&str, &str); 5] = [
    ("PATH", "bin"),
    ("LD_LIBRARY_PATH", "lib"),
    ("LIBRARY_PATH", "lib"),
    ("CPATH", "include"),
    ("PKG_CONFIG_PATH", "pkgconfig"),
];

fn is_path_var(name: &str) -> bool {
    BUILD_PATH_DIRS.iter().any(|(var, _)| *var == name)
}

/// What an env file does to its variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Override,
    Default,
    Prepend,
    Append,
}

impl Action {
    fn from_suffix(suffix: &str) -> Option<Action> {
        match suffix {
            "override" => Some(Action::Override),
            "default" => Some(Action::Default),
            "prepend" => Some(Action::Prepend),
            "append" => Some(Action::Append),
            _ => None,
        }
    }
}

/// An environment: variable names in order, values as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The part of `lifecycle_env` that buildpacks may see: a few named variables and the
    /// path variables; everything else (LANG, TERM, CNB_PLATFORM_API, credentials…) is dropped.
    pub fn filtered<'a>(lifecycle_env: impl IntoIterator<Item = &'a (String, String)>) -> Env {
        let vars = lifecycle_env
            .into_iter()
            .filter(|(k, _)| PASSED_THROUGH.contains(&k.as_str()) || is_path_var(k))
            .cloned()
            .collect();
        Env { vars }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.vars.insert(name.to_string(), value.into());
    }

    pub fn remove(&mut self, name: &str) {
        self.vars.remove(name);
    }

    /// `NAME=value` pairs in name order.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn value(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    /// Prepends a build layer's `bin`, `lib`, `include` and `pkgconfig` (those that exist) to
    /// their path variables.
    pub fn prepend_layer_dirs(&mut self, layer: &Path) {
        for (var, sub) in BUILD_PATH_DIRS {
            let dir = layer.join(sub);
            if dir.is_dir() {
                let joined = prepend(&dir.to_string_lossy(), ":", self.value(var));
                self.set(var, joined);
            }
        }
    }

    /// Applies an env-file directory (`<layer>/env`, `env.build`, `<build-config>/env`): a
    /// file's name up to the first `.` is the variable, the rest its action (unsuffixed files
    /// take `plain`), its content the value, verbatim; `<NAME>.delim` gives the delimiter for
    /// prepend and append in the same directory (none by default). Files apply in name order;
    /// directories and unknown suffixes are skipped. A missing directory changes nothing.
    pub fn apply_env_dir(&mut self, dir: &Path, plain: Action) -> io::Result<()> {
        let files = env_files(dir)?;
        let delimiter = |name: &str| -> String {
            files
                .iter()
                .find(|(file, _)| *file == format!("{name}.delim"))
                .map(|(_, value)| value.clone())
                .unwrap_or_default()
        };
        for (file, value) in &files {
            let (name, action) = match file.split_once('.') {
                Some((name, suffix)) => match Action::from_suffix(suffix) {
                    Some(action) => (name, action),
                    None => continue,
                },
                None => (file.as_str(), plain),
            };
            let current = self.value(name).to_string();
            match action {
                Action::Override => self.set(name, value.clone()),
                Action::Default => {
                    if current.is_empty() {
                        self.set(name, value.clone());
                    }
                }
                Action::Prepend => self.set(name, prepend(value, &delimiter(name), &current)),
                Action::Append => self.set(name, append(&current, &delimiter(name), value)),
            }
        }
        Ok(())
    }

    /// This environment with the user's `<platform>/env` on top: each file (its whole name is
    /// the variable) overrides its variable, except that the path variables get the value
    /// prepended with `:`.
    pub fn with_user_env(&self, platform_dir: &Path) -> io::Result<Env> {
        let mut out = self.clone();
        for (name, value) in env_files(&platform_dir.join("env"))? {
            if is_path_var(&name) {
                let joined = prepend(&value, ":", out.value(&name));
                out.set(&name, joined);
            } else {
                out.set(&name, value);
            }
        }
        Ok(out)
    }
}

/// `value + delimiter + existing`, without the delimiter when nothing exists yet.
fn prepend(value: &str, delimiter: &str, existing: &str) -> String {
    if existing.is_empty() {
        value.to_string()
    } else {
        format!("{value}{delimiter}{existing}")
    }
}

/// `existing + delimiter + value`, without the delimiter when nothing exists yet.
fn append(existing: &str, delimiter: &str, value: &str) -> String {
    if existing.is_empty() {
        value.to_string()
    } else {
        format!("{existing}{delimiter}{value}")
    }
}

/// The regular files (symlinks followed) of `dir` in name order, with their contents.
fn env_files(dir: &Path) -> io::Result<Vec<(String, String)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let value = std::fs::read(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        files.push((
            name.to_string(),
            String::from_utf8_lossy(&value).into_owned(),
        ));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, value) in files {
            std::fs::write(dir.join(name), value).unwrap();
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::filtered(&owned)
    }

    #[test]
    fn only_the_allow_list_and_path_variables_pass() {
        let e = env(&[
            ("PATH", "/bin"),
            ("HOME", "/home/cnb"),
            ("LANG", "C"),
            ("CNB_PLATFORM_API", "0.13"),
            ("CNB_STACK_ID", "s"),
            ("PKG_CONFIG_PATH", "/p"),
            ("https_proxy", "http://p"),
        ]);
        let names: Vec<String> = e.pairs().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "CNB_STACK_ID",
                "HOME",
                "PATH",
                "PKG_CONFIG_PATH",
                "https_proxy"
            ]
        );
    }

    #[test]
    fn suffixes_apply_in_name_order_with_the_directorys_delimiter() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("A", "plain"),
                ("B.default", "b-default"),
                ("C.default", "c-default"),
                ("D.prepend", "front"),
                ("D.delim", ":"),
                ("E.append", "back"),
                ("F.prepend", "x"),
                ("G.override", "g"),
                ("H.unknown", "ignored"),
                ("I.append", "only"),
            ],
        );
        std::fs::create_dir(dir.path().join("J")).unwrap();
        let mut e = Env::default();
        e.set("C", "kept");
        e.set("D", "old");
        e.set("E", "old");
        e.set("F", "y");
        e.apply_env_dir(dir.path(), Action::Override).unwrap();
        assert_eq!(e.get("A"), Some("plain"));
        assert_eq!(e.get("B"), Some("b-default"));
        assert_eq!(e.get("C"), Some("kept"));
        assert_eq!(e.get("D"), Some("front:old"));
        assert_eq!(
            e.get("E"),
            Some("oldback"),
            "no delimiter without a .delim file"
        );
        assert_eq!(e.get("F"), Some("xy"));
        assert_eq!(e.get("G"), Some("g"));
        assert_eq!(e.get("H"), None);
        assert_eq!(
            e.get("I"),
            Some("only"),
            "no delimiter before an empty value"
        );
        assert_eq!(e.get("J"), None, "directories are skipped");

        let mut defaults = Env::default();
        defaults.set("A", "set");
        defaults.apply_env_dir(dir.path(), Action::Default).unwrap();
        assert_eq!(
            defaults.get("A"),
            Some("set"),
            "unsuffixed means default here"
        );
    }

    #[test]
    fn values_are_verbatim_and_missing_directories_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[("V", "two words\n")]);
        let mut e = Env::default();
        e.apply_env_dir(dir.path(), Action::Override).unwrap();
        assert_eq!(e.get("V"), Some("two words\n"));
        e.apply_env_dir(&dir.path().join("absent"), Action::Override)
            .unwrap();
        assert_eq!(e.pairs().len(), 1);
    }

    #[test]
    fn user_env_overrides_but_prepends_path_variables() {
        let platform = tempfile::tempdir().unwrap();
        write(
            &platform.path().join("env"),
            &[("PATH", "/u"), ("BP_X", "1"), ("CPATH", "/c")],
        );
        let e = env(&[("PATH", "/bin")]);
        let with = e.with_user_env(platform.path()).unwrap();
        assert_eq!(with.get("PATH"), Some("/u:/bin"));
        assert_eq!(with.get("CPATH"), Some("/c"));
        assert_eq!(with.get("BP_X"), Some("1"));
        assert_eq!(e.get("BP_X"), None, "the base is not changed");
    }

    #[test]
    fn layer_dirs_are_prepended_when_present() {
        let layer = tempfile::tempdir().unwrap();
        std::fs::create_dir(layer.path().join("bin")).unwrap();
        std::fs::create_dir(layer.path().join("lib")).unwrap();
        let mut e = env(&[("PATH", "/bin")]);
        e.prepend_layer_dirs(layer.path());
        let l = layer.path().display();
        assert_eq!(e.get("PATH").unwrap(), format!("{l}/bin:/bin"));
        assert_eq!(e.get("LD_LIBRARY_PATH").unwrap(), format!("{l}/lib"));
        assert_eq!(e.get("LIBRARY_PATH").unwrap(), format!("{l}/lib"));
        assert_eq!(e.get("CPATH"), None);
    }
}
