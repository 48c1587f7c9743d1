//! The launch environment, as the lifecycle's `env` package builds it at launch: the
//! container's environment minus the launcher's own inputs, with `/cnb/process` and
//! `/cnb/lifecycle` taken out of PATH; a layer's `bin` and `lib` prepended to PATH and
//! LD_LIBRARY_PATH; and env-file directories with their suffix rules. Names and values are
//! bytes: env files are used verbatim, whatever they hold.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The container variables the launcher consumes and does not pass on.
const EXCLUDED: [&str; 5] = [
    "CNB_LAYERS_DIR",
    "CNB_APP_DIR",
    "CNB_PROCESS_TYPE",
    "CNB_PLATFORM_API",
    "CNB_DEPRECATION_MODE",
];

/// The PATH entries the image's Env adds for the launcher's sake.
const LAUNCHER_PATH_DIRS: [&str; 2] = ["/cnb/process", "/cnb/lifecycle"];

/// A layer's subdirectories and the variables they are prepended to at launch.
const ROOT_DIRS: [(&str, &str); 2] = [("bin", "PATH"), ("lib", "LD_LIBRARY_PATH")];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Env {
    /// The launch environment's start: `environ` without the excluded variables, PATH
    /// without the launcher's directories.
    pub fn from_environ<I: IntoIterator<Item = (OsString, OsString)>>(environ: I) -> Env {
        let mut env = Env::default();
        for (name, value) in environ {
            if name.to_str().map_or(false, |n| EXCLUDED.contains(&n)) {
                continue;
            }
            env.vars.insert(name.into_vec(), value.into_vec());
        }
        if let Some(path) = env.vars.get(b"PATH".as_slice()) {
            let kept: Vec<&[u8]> = path
                .split(|b| *b == b':')
                .filter(|dir| {
                    let trimmed = trim_trailing_slashes(dir);
                    !LAUNCHER_PATH_DIRS.iter().any(|l| l.as_bytes() == trimmed)
                })
                .collect();
            let joined = kept.join(b":".as_slice());
            env.vars.insert(b"PATH".to_vec(), joined);
        }
        env
    }

    pub fn get(&self, name: &str) -> &[u8] {
        self.vars
            .get(name.as_bytes())
            .map(Vec::as_slice)
            .unwrap_or(b"")
    }

    pub fn set(&mut self, name: &[u8], value: Vec<u8>) {
        self.vars.insert(name.to_vec(), value);
    }

    /// Every variable, in name order, for a child's environment.
    pub fn pairs(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        self.vars
            .iter()
            .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v)))
    }

    /// Prepends the layer's `bin` to PATH and `lib` to LD_LIBRARY_PATH, each when it exists.
    pub fn add_root_dir(&mut self, layer: &Path) -> io::Result<()> {
        for (sub, var) in ROOT_DIRS {
            let dir = layer.join(sub);
            match std::fs::metadata(&dir) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(at(&dir, e)),
            }
            let joined = prepend(dir.as_os_str().as_bytes(), b":", self.get(var));
            self.set(var.as_bytes(), joined);
        }
        Ok(())
    }

    /// Applies an env-file directory (`env`, `env.launch`, `env.launch/<process>`): a file's
    /// name up to its first `.` is the variable, the rest the action: none or `override`
    /// sets, `default` sets an empty variable, `prepend` and `append` join with the
    /// directory's `<NAME>.delim` (nothing without one, and no delimiter next to an empty
    /// value); other suffixes (`.delim` among them) do nothing. Files apply in name order;
    /// directories are skipped; a missing directory changes nothing.
    pub fn add_env_dir(&mut self, dir: &Path) -> io::Result<()> {
        let files = env_files(dir)?;
        for (file, value) in &files {
            let (name, action) = match file.iter().position(|b| *b == b'.') {
                Some(dot) => (&file[..dot], &file[dot + 1..]),
                None => (file.as_slice(), b"override".as_slice()),
            };
            let delim = || -> Vec<u8> {
                let mut wanted = name.to_vec();
                wanted.extend_from_slice(b".delim");
                files
                    .iter()
                    .find(|(f, _)| *f == wanted)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let current = self.vars.get(name).cloned().unwrap_or_default();
            let new = match action {
                b"override" => value.clone(),
                b"default" if current.is_empty() => value.clone(),
                b"default" => continue,
                b"prepend" => prepend(value, &delim(), &current),
                b"append" => append(&current, &delim(), value),
                _ => continue,
            };
            self.set(name, new);
        }
        Ok(())
    }
}

fn trim_trailing_slashes(dir: &[u8]) -> &[u8] {
    let mut end = dir.len();
    while end > 1 && dir[end - 1] == b'/' {
        end -= 1;
    }
    &dir[..end]
}

/// `value + delim + existing`, or `value` alone when nothing exists yet.
fn prepend(value: &[u8], delim: &[u8], existing: &[u8]) -> Vec<u8> {
    if existing.is_empty() {
        return value.to_vec();
    }
    [value, delim, existing].concat()
}

/// `existing + delim + value`, or `value` alone when nothing exists yet.
fn append(existing: &[u8], delim: &[u8], value: &[u8]) -> Vec<u8> {
    if existing.is_empty() {
        return value.to_vec();
    }
    [existing, delim, value].concat()
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The files of `dir` (symlinks followed; directories skipped) in name order, with their
/// contents. A missing directory has none.
fn env_files(dir: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut files = Vec::new();
    for path in entries(dir)? {
        let meta = std::fs::metadata(&path).map_err(|e| at(&path, e))?;
        if meta.is_dir() {
            continue;
        }
        let value = std::fs::read(&path).map_err(|e| at(&path, e))?;
        let name = path.file_name().unwrap_or_default().as_bytes().to_vec();
        files.push((name, value));
    }
    Ok(files)
}

/// The entries of `dir` in byte order of their names (as Go's os.ReadDir gives them); a
/// missing directory has none.
pub fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(dir, e)),
    };
    let mut paths = Vec::new();
    for entry in read {
        paths.push(entry.map_err(|e| at(dir, e))?.path());
    }
    paths.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    Ok(paths)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::tests::TempDir;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn val(env: &Env, name: &str) -> String {
        String::from_utf8(env.get(name).to_vec()).unwrap()
    }

    #[test]
    fn the_launchers_inputs_and_path_entries_are_dropped() {
        let env = Env::from_environ(os(&[
            ("PATH", "/cnb/process:/cnb/lifecycle/:/usr/bin:/bin"),
            ("CNB_PLATFORM_API", "0.13"),
            ("CNB_LAYERS_DIR", "/layers"),
            ("CNB_APP_DIR", "/workspace"),
            ("CNB_PROCESS_TYPE", "web"),
            ("CNB_DEPRECATION_MODE", "quiet"),
            ("CNB_EXEC_ENV", "production"),
            ("HOME", "/home/cnb"),
        ]));
        let names: Vec<String> = env
            .pairs()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["CNB_EXEC_ENV", "HOME", "PATH"]);
        assert_eq!(val(&env, "PATH"), "/usr/bin:/bin");
    }

    #[test]
    fn every_suffix_rule() {
        let dir = TempDir::new();
        dir.write("OVR", "plain");
        dir.write("OVR2.override", "o");
        dir.write("DEF_SET.default", "ignored");
        dir.write("DEF_EMPTY.default", "d");
        dir.write("PRE.prepend", "front");
        dir.write("PRE.delim", ":");
        dir.write("APP.append", "back");
        dir.write("APP.delim", "<>");
        dir.write("NODELIM.prepend", "x");
        dir.write("FRESH.append", "only");
        dir.write("FRESH2.prepend", "only2");
        dir.write("ODD.unknown", "ignored");
        dir.write("ODD.prepend.more", "ignored");
        dir.write("WS", " two words\n");
        std::fs::create_dir(dir.path().join("DIRNAME")).unwrap();
        let mut env = Env::from_environ(os(&[
            ("OVR", "old"),
            ("DEF_SET", "kept"),
            ("PRE", "old"),
            ("APP", "old"),
            ("NODELIM", "y"),
            ("ODD", "same"),
        ]));
        env.add_env_dir(dir.path()).unwrap();
        assert_eq!(val(&env, "OVR"), "plain");
        assert_eq!(val(&env, "OVR2"), "o");
        assert_eq!(val(&env, "DEF_SET"), "kept");
        assert_eq!(val(&env, "DEF_EMPTY"), "d");
        assert_eq!(val(&env, "PRE"), "front:old");
        assert_eq!(val(&env, "APP"), "old<>back");
        assert_eq!(
            val(&env, "NODELIM"),
            "xy",
            "no delimiter without a .delim file"
        );
        assert_eq!(val(&env, "FRESH"), "only");
        assert_eq!(val(&env, "FRESH2"), "only2");
        assert_eq!(val(&env, "ODD"), "same");
        assert_eq!(val(&env, "WS"), " two words\n", "values are verbatim");
        assert_eq!(val(&env, "DIRNAME"), "", "directories are skipped");
        assert_eq!(env.get("PRE.delim"), b"");
        // A missing directory is no error and changes nothing.
        let before = env.clone();
        env.add_env_dir(&dir.path().join("absent")).unwrap();
        assert_eq!(env, before);
    }

    #[test]
    fn a_delimiter_counts_only_in_its_own_directory() {
        let a = TempDir::new();
        a.write("V.delim", ",");
        a.write("V.append", "1");
        let b = TempDir::new();
        b.write("V.append", "2");
        let mut env = Env::default();
        env.add_env_dir(a.path()).unwrap();
        env.add_env_dir(b.path()).unwrap();
        assert_eq!(val(&env, "V"), "12");
    }

    #[test]
    fn bin_and_lib_are_prepended_when_present() {
        let layer = TempDir::new();
        std::fs::create_dir(layer.path().join("bin")).unwrap();
        let mut env = Env::from_environ(os(&[("PATH", "/bin")]));
        env.add_root_dir(layer.path()).unwrap();
        let l = layer.path().display();
        assert_eq!(val(&env, "PATH"), format!("{l}/bin:/bin"));
        assert_eq!(val(&env, "LD_LIBRARY_PATH"), "");
        std::fs::create_dir(layer.path().join("lib")).unwrap();
        env.add_root_dir(layer.path()).unwrap();
        assert_eq!(val(&env, "LD_LIBRARY_PATH"), format!("{l}/lib"));
        assert_eq!(val(&env, "PATH"), format!("{l}/bin:{l}/bin:/bin"));
    }
}
