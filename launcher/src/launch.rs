//! The launch itself, in the lifecycle's order (`launch/launcher.go`, `process.go`,
//! `shell.go`, `bash.go`, `exec_d.go`): check the Platform API, read metadata.toml and check
//! every Buildpack API, pick the process, build the environment, run exec.d, then replace
//! this process with the direct command or with bash.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::{entries, Env};
use crate::metadata::{self, Metadata};
use crate::toml::{self, Value};

/// CNB_PLATFORM_API missing or unsupported.
pub const EXIT_PLATFORM_API: i32 = 11;
/// A buildpack in metadata.toml has a Buildpack API the launcher does not support.
pub const EXIT_BUILDPACK_API: i32 = 12;
/// Any other failure of the launcher's own.
pub const EXIT_LAUNCH: i32 = 82;

/// The Platform APIs this launcher implements (lathe's lifecycle declares 0.13).
pub const PLATFORM_APIS: (Api, Api) = (Api(0, 7), Api(0, 13));
/// The Buildpack APIs whose processes and layers it understands.
pub const BUILDPACK_APIS: (Api, Api) = (Api(0, 7), Api(0, 12));

const DEFAULT_LAYERS_DIR: &str = "/layers";
const DEFAULT_APP_DIR: &str = "/workspace";

/// Why the launch stopped, and the exit code that says so.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_LAUNCH,
        message: format!("failed to launch: {}", message.into()),
    }
}

/// An API version `<major>.<minor>` (`<major>` alone is `<major>.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Api(pub u32, pub u32);

impl Api {
    pub fn parse(text: &str) -> Option<Api> {
        let number = |s: &str| -> Option<u32> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        match text.split_once('.') {
            Some((major, minor)) => Some(Api(number(major)?, number(minor)?)),
            None => Some(Api(number(text)?, 0)),
        }
    }

    fn within(self, range: (Api, Api)) -> bool {
        range.0 <= self && self <= range.1
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// The process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The process type; empty for a command given on the command line.
    pub kind: String,
    /// Never empty.
    pub command: Vec<OsString>,
    pub args: Vec<OsString>,
    pub direct: bool,
    pub buildpack_id: String,
    pub working_dir: Option<String>,
}

impl Process {
    fn from_metadata(p: &metadata::Process) -> Process {
        Process {
            kind: p.kind.clone(),
            command: p.command.iter().map(OsString::from).collect(),
            args: p.args.iter().map(OsString::from).collect(),
            direct: p.direct,
            buildpack_id: p.buildpack_id.clone(),
            working_dir: p.working_dir.clone(),
        }
    }
}

fn var<'a>(environ: &'a [(OsString, OsString)], name: &str) -> Option<&'a OsStr> {
    environ
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_os_str())
        .filter(|v| !v.is_empty())
}

fn warn(message: &str) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "Warning: {message}");
}

/// Launches the process `argv` asks for; returns only when that fails.
pub fn launch(argv: &[OsString], environ: Vec<(OsString, OsString)>) -> Failure {
    match prepare_and_exec(argv, environ) {
        Ok(never) => match never {},
        Err(failure) => failure,
    }
}

enum Never {}

fn prepare_and_exec(
    argv: &[OsString],
    environ: Vec<(OsString, OsString)>,
) -> Result<Never, Failure> {
    check_platform_api(var(&environ, "CNB_PLATFORM_API"))?;
    let platform = var(&environ, "CNB_PLATFORM_API")
        .and_then(OsStr::to_str)
        .and_then(Api::parse)
        .expect("checked");
    let layers_dir =
        PathBuf::from(var(&environ, "CNB_LAYERS_DIR").unwrap_or(DEFAULT_LAYERS_DIR.as_ref()));
    let app_dir = PathBuf::from(var(&environ, "CNB_APP_DIR").unwrap_or(DEFAULT_APP_DIR.as_ref()));
    let md = read_metadata(&layers_dir)?;
    check_buildpack_apis(&md)?;

    let argv0 = argv.first().cloned().unwrap_or_default();
    let args = argv.get(1..).unwrap_or(&[]);
    let mut warnings = Vec::new();
    let selected = select(
        &md,
        platform,
        &argv0,
        args,
        var(&environ, "CNB_PROCESS_TYPE"),
        &mut warnings,
    );
    for warning in &warnings {
        warn(warning);
    }
    let process = selected.map_err(|why| fail(format!("determine start command: {why}")))?;

    let mut env = Env::from_environ(environ);
    std::env::set_current_dir(&app_dir).map_err(|e| {
        fail(format!(
            "change to app directory {}: {e}",
            app_dir.display()
        ))
    })?;
    let buildpack_dirs = buildpack_dirs(&layers_dir, &md)?;
    for bp in &buildpack_dirs {
        let layers = layer_dirs(bp)?;
        for layer in &layers {
            env.add_root_dir(layer)
                .map_err(|e| fail(format!("modify env: add layer root: {e}")))?;
        }
        for layer in &layers {
            let mut dirs = vec![layer.join("env"), layer.join("env.launch")];
            if !process.kind.is_empty() {
                dirs.push(layer.join("env.launch").join(&process.kind));
            }
            for dir in dirs {
                env.add_env_dir(&dir)
                    .map_err(|e| fail(format!("modify env: add layer env: {e}")))?;
            }
        }
    }
    for bp in &buildpack_dirs {
        for layer in layer_dirs(bp)? {
            let mut programs = files(&layer.join("exec.d"))?;
            if !process.kind.is_empty() {
                programs.extend(files(&layer.join("exec.d").join(&process.kind))?);
            }
            for program in programs {
                run_exec_d(&program, &mut env)?;
            }
        }
    }
    let working_dir = match &process.working_dir {
        Some(dir) => app_dir.join(dir),
        None => app_dir.clone(),
    };
    if process.direct {
        exec_direct(&process, &env, &working_dir)
    } else {
        let profiles = profiles(&buildpack_dirs, &process.kind, &app_dir)?;
        let script = is_script(&md, &process)?;
        exec_shell(&process, &env, &argv0, &profiles, &working_dir, script)
    }
}

fn check_platform_api(value: Option<&OsStr>) -> Result<(), Failure> {
    let (lo, hi) = PLATFORM_APIS;
    let failure = |message: String| Failure {
        code: EXIT_PLATFORM_API,
        message,
    };
    let value = value.ok_or_else(|| {
        failure(format!(
            "CNB_PLATFORM_API is not set: the launcher needs the image's Platform API \
             (it supports {lo} to {hi})"
        ))
    })?;
    match value.to_str().and_then(Api::parse) {
        Some(api) if api.within(PLATFORM_APIS) => Ok(()),
        _ => Err(failure(format!(
            "Platform API {:?} (CNB_PLATFORM_API) is not supported: the launcher supports \
             {lo} to {hi}",
            value.to_string_lossy()
        ))),
    }
}

fn read_metadata(layers_dir: &Path) -> Result<Metadata, Failure> {
    let path = layers_dir.join("config").join("metadata.toml");
    let bytes =
        std::fs::read(&path).map_err(|e| fail(format!("read metadata {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| fail(format!("read metadata {}: it is not UTF-8", path.display())))?;
    metadata::parse(&text).map_err(|why| fail(format!("read metadata {}: {why}", path.display())))
}

fn check_buildpack_apis(md: &Metadata) -> Result<(), Failure> {
    let (lo, hi) = BUILDPACK_APIS;
    for bp in &md.buildpacks {
        let supported = Api::parse(&bp.api).map_or(false, |api| api.within(BUILDPACK_APIS));
        if !supported {
            return Err(Failure {
                code: EXIT_BUILDPACK_API,
                message: format!(
                    "buildpack {} has Buildpack API {:?}: the launcher supports {lo} to {hi}",
                    bp.id, bp.api
                ),
            });
        }
    }
    Ok(())
}

/// The process `argv` asks for: the process type named by argv[0]'s file name (the
/// `/cnb/process/<type>` symlink) or, when that names none and no command is given, by
/// CNB_PROCESS_TYPE (deprecated); otherwise the command given, direct after `--`, else
/// through the shell. User arguments extend or replace a process's own as its Platform and
/// Buildpack APIs say.
pub fn select(
    md: &Metadata,
    platform: Api,
    argv0: &OsStr,
    args: &[OsString],
    process_type: Option<&OsStr>,
    warnings: &mut Vec<String>,
) -> Result<Process, String> {
    let name = Path::new(argv0)
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("");
    let mut chosen = md.process(name);
    if let Some(wanted) = process_type {
        let wanted = wanted.to_string_lossy();
        if chosen.is_some() {
            warnings.push(format!(
                "CNB_PROCESS_TYPE is deprecated and ignored here: this is /cnb/process/{name}"
            ));
        } else if !args.is_empty() {
            warnings.push(format!(
                "CNB_PROCESS_TYPE is deprecated and ignored when a command is given \
                 (CNB_PROCESS_TYPE={wanted})"
            ));
        } else {
            warnings.push(format!(
                "CNB_PROCESS_TYPE is deprecated: start /cnb/process/{wanted} to run the \
                 {wanted:?} process"
            ));
            chosen = Some(
                md.process(&wanted)
                    .ok_or_else(|| format!("process type {wanted} was not found"))?,
            );
        }
    }
    let chosen = match chosen {
        Some(chosen) => chosen,
        None => return user_process(args),
    };
    let mut process = Process::from_metadata(chosen);
    if platform < Api(0, 10) {
        process.args.extend(args.iter().cloned());
        return Ok(process);
    }
    if process.command.len() > 1 {
        let overridable = std::mem::take(&mut process.args);
        process.args = process.command.split_off(1);
        if args.is_empty() {
            process.args.extend(overridable);
        } else {
            process.args.extend(args.iter().cloned());
        }
    } else if !args.is_empty() {
        let bp = md.buildpack(&process.buildpack_id).ok_or_else(|| {
            format!(
                "failed to find buildpack for process {} with buildpack ID {:?}",
                process.kind, process.buildpack_id
            )
        })?;
        if Api::parse(&bp.api).map_or(false, |api| api < Api(0, 9)) {
            process.args.extend(args.iter().cloned());
        } else {
            process.args = args.to_vec();
        }
    }
    Ok(process)
}

fn user_process(args: &[OsString]) -> Result<Process, String> {
    let (direct, command, rest) = match args {
        [] => return Err("when there is no default process a command is required".into()),
        [dashes] if dashes == "--" => return Err("-- must be followed by a command".into()),
        [dashes, command, rest @ ..] if dashes == "--" => (true, command, rest),
        [command, rest @ ..] => (false, command, rest),
    };
    Ok(Process {
        kind: String::new(),
        command: vec![command.clone()],
        args: rest.to_vec(),
        direct,
        buildpack_id: String::new(),
        working_dir: None,
    })
}

/// A shell process with no arguments is a script (`bash -c COMMAND`); with arguments, each
/// token is evaluated on its own. (Buildpack API < 0.4 processes were always scripts; the
/// launcher supports none of those.)
fn is_script(md: &Metadata, process: &Process) -> Result<bool, Failure> {
    if process.command.len() == 1 && process.args.is_empty() {
        return Ok(true);
    }
    if !process.buildpack_id.is_empty() && md.buildpack(&process.buildpack_id).is_none() {
        return Err(fail(format!(
            "process type {:?} provided by unknown buildpack {:?}",
            process.kind, process.buildpack_id
        )));
    }
    Ok(false)
}

/// `<layers>/<escaped id>` of each buildpack in metadata order, those that exist.
fn buildpack_dirs(layers_dir: &Path, md: &Metadata) -> Result<Vec<PathBuf>, Failure> {
    let mut dirs = Vec::new();
    for bp in &md.buildpacks {
        let dir = layers_dir.join(bp.id.replace('/', "_"));
        match std::fs::metadata(&dir) {
            Ok(_) => dirs.push(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(fail(format!(
                    "find buildpack directory {}: {e}",
                    dir.display()
                )))
            }
        }
    }
    Ok(dirs)
}

/// The layer directories of a buildpack directory, in name order (symlinks are not layers).
fn layer_dirs(bp_dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    children(bp_dir, true)
}

/// The files (anything but a directory) of `dir`, in name order; none when it is missing.
fn files(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    children(dir, false)
}

fn children(dir: &Path, want_dirs: bool) -> Result<Vec<PathBuf>, Failure> {
    let list = |e: io::Error| fail(format!("failed to list files in dir: {e}"));
    let mut out = Vec::new();
    for path in entries(dir).map_err(list)? {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        if meta.is_dir() == want_dirs {
            out.push(path);
        }
    }
    Ok(out)
}

/// profile.d scripts, per layer (`profile.d/*` then `profile.d/<type>/*`), then the app's
/// `.profile` when it is a file.
fn profiles(
    buildpack_dirs: &[PathBuf],
    kind: &str,
    app_dir: &Path,
) -> Result<Vec<PathBuf>, Failure> {
    let mut found = Vec::new();
    for bp in buildpack_dirs {
        for layer in layer_dirs(bp)? {
            found.extend(files(&layer.join("profile.d"))?);
            if !kind.is_empty() {
                found.extend(files(&layer.join("profile.d").join(kind))?);
            }
        }
    }
    let app_profile = app_dir.join(".profile");
    match std::fs::metadata(&app_profile) {
        Ok(meta) if !meta.is_dir() => found.push(app_profile),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("{}: {e}", app_profile.display()))),
    }
    Ok(found)
}

extern "C" {
    fn pipe2(fds: *mut i32, flags: i32) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
}

/// O_CLOEXEC and F_SETFD, the same on x86_64 and aarch64 Linux.
const O_CLOEXEC: i32 = 0o2_000_000;
const F_SETFD: i32 = 2;

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Runs one exec.d program with the environment so far, its stdout and stderr the
/// launcher's, and fd 3 the write end of a pipe; what it writes there (TOML `KEY = "value"`
/// pairs) overrides those variables.
fn run_exec_d(program: &Path, env: &mut Env) -> Result<(), Failure> {
    let what = program.display();
    let failed = |why: String| {
        fail(format!(
            "exec.d: failed to execute exec.d file at path '{what}': {why}"
        ))
    };
    let (mut read, write) = pipe().map_err(|e| failed(format!("pipe: {e}")))?;
    let fd: RawFd = write.as_raw_fd();
    let mut command = Command::new(program);
    command.env_clear().envs(env.pairs());
    // SAFETY: dup2 and fcntl are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let ok = if fd == 3 {
                fcntl(3, F_SETFD, 0) == 0
            } else {
                dup2(fd, 3) == 3
            };
            if ok {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    drop(write);
    let mut output = Vec::new();
    let read_result = read.read_to_end(&mut output);
    let status = child.wait().map_err(|e| failed(e.to_string()))?;
    if !status.success() {
        return Err(failed(status.to_string()));
    }
    read_result.map_err(|e| failed(format!("reading its output: {e}")))?;
    let text = String::from_utf8(output).map_err(|_| failed("its output is not UTF-8".into()))?;
    let vars = toml::parse(&text).map_err(|why| failed(format!("decoding its output: {why}")))?;
    for (name, value) in vars {
        match value {
            Value::String(value) => env.set(name.as_bytes(), value.into_bytes()),
            _ => {
                return Err(failed(format!(
                    "decoding its output: {name} is not a string"
                )))
            }
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).map_or(false, |m| {
        m.is_file() && m.permissions().mode() & 0o111 != 0
    })
}

/// `command` found as Go's exec.LookPath finds it: as given when it holds a `/`, otherwise
/// in PATH (an empty entry is the current directory). Relative results are made absolute
/// against the current directory (the app directory).
fn look_path(command: &OsStr, path_var: &[u8]) -> Result<PathBuf, String> {
    let cwd = std::env::current_dir().unwrap_or_default();
    if command.as_bytes().contains(&b'/') {
        let candidate = cwd.join(command);
        return if is_executable(&candidate) {
            Ok(candidate)
        } else {
            Err(format!(
                "exec: {:?}: not an executable file",
                command.to_string_lossy()
            ))
        };
    }
    for dir in path_var.split(|b| *b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let candidate = cwd.join(OsStr::from_bytes(dir)).join(command);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "exec: {:?}: executable file not found in $PATH",
        command.to_string_lossy()
    ))
}

fn exec_direct(process: &Process, env: &Env, working_dir: &Path) -> Result<Never, Failure> {
    let binary = look_path(&process.command[0], env.get("PATH"))
        .map_err(|why| fail(format!("path lookup: {why}")))?;
    std::env::set_current_dir(working_dir).map_err(|e| {
        fail(format!(
            "change to working directory {}: {e}",
            working_dir.display()
        ))
    })?;
    let err = Command::new(&binary)
        .arg0(&process.command[0])
        .args(&process.command[1..])
        .args(&process.args)
        .env_clear()
        .envs(env.pairs())
        .exec();
    Err(fail(format!("direct exec {}: {err}", binary.display())))
}

/// `'text'` for bash, single quotes inside escaped.
fn quote(text: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in text {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The script bash runs for a shell process: source each profile, change to the working
/// directory, then run the command as a script (no arguments) or as tokens that are each
/// evaluated with `eval echo`, so that `$VAR` in them expands.
pub fn shell_script(
    profiles: &[PathBuf],
    working_dir: &Path,
    script: bool,
    tokens: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for profile in profiles {
        out.extend_from_slice(b"source ");
        out.extend(quote(profile.as_os_str().as_bytes()));
        out.push(b'\n');
    }
    out.extend_from_slice(b"cd -- ");
    out.extend(quote(working_dir.as_os_str().as_bytes()));
    out.extend_from_slice(b" || exit 82\n");
    if script {
        out.extend_from_slice(br#"exec bash -c "$@""#);
    } else {
        let mut inner = String::from(r#""$(eval echo \"$0\")""#);
        for i in 1..tokens {
            inner.push_str(&format!(r#" "$(eval echo \"${i}\")""#));
        }
        out.extend_from_slice(format!(r#"exec bash -c '{inner}' "${{@:1}}""#).as_bytes());
    }
    out
}

fn exec_shell(
    process: &Process,
    env: &Env,
    argv0: &OsStr,
    profiles: &[PathBuf],
    working_dir: &Path,
    script: bool,
) -> Result<Never, Failure> {
    match std::fs::metadata(working_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(fail(format!(
                "change to working directory {}: not a directory",
                working_dir.display()
            )))
        }
        Err(e) => {
            return Err(fail(format!(
                "change to working directory {}: {e}",
                working_dir.display()
            )))
        }
    }
    let tokens = process.command.len() + process.args.len();
    let script = shell_script(profiles, working_dir, script, tokens);
    let err = Command::new("/bin/bash")
        .arg0("bash")
        .arg("-c")
        .arg(OsStr::from_bytes(&script))
        .arg(argv0)
        .args(&process.command)
        .args(&process.args)
        .env_clear()
        .envs(env.pairs())
        .exec();
    Err(fail(format!("bash exec: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Buildpack, Metadata};

    fn md() -> Metadata {
        metadata::parse(
            r#"
[[buildpacks]]
id = "old"
api = "0.8"
[[buildpacks]]
id = "new"
api = "0.10"
[[processes]]
type = "one-old"
command = ["run"]
args = ["a"]
direct = true
buildpack-id = "old"
[[processes]]
type = "one-new"
command = ["run"]
args = ["a"]
direct = true
buildpack-id = "new"
[[processes]]
type = "multi"
command = ["run", "always"]
args = ["a"]
direct = true
buildpack-id = "new"
[[processes]]
type = "orphan"
command = ["run"]
buildpack-id = "gone"
"#,
        )
        .unwrap()
    }

    fn os(items: &[&str]) -> Vec<OsString> {
        items.iter().map(OsString::from).collect()
    }

    fn pick(
        argv0: &str,
        args: &[&str],
        platform: Api,
        env_type: Option<&str>,
    ) -> Result<(Vec<OsString>, Vec<OsString>), String> {
        let mut warnings = Vec::new();
        select(
            &md(),
            platform,
            OsStr::new(argv0),
            &os(args),
            env_type.map(OsStr::new),
            &mut warnings,
        )
        .map(|p| (p.command, p.args))
    }

    const P13: Api = Api(0, 13);

    #[test]
    fn api_versions_parse_and_compare_numerically() {
        assert_eq!(Api::parse("0.10"), Some(Api(0, 10)));
        assert_eq!(Api::parse("1"), Some(Api(1, 0)));
        assert!(Api(0, 9) < Api(0, 10));
        for bad in ["", "0.", ".1", "0.x", "0.1.2", "-1.0", "+1", " 0.9"] {
            assert_eq!(Api::parse(bad), None, "{bad:?}");
        }
        assert!(check_platform_api(Some(OsStr::new("0.7"))).is_ok());
        assert!(check_platform_api(Some(OsStr::new("0.13"))).is_ok());
        for bad in [None, Some("0.6"), Some("0.14"), Some("1.0"), Some("x")] {
            let err = check_platform_api(bad.map(OsStr::new)).unwrap_err();
            assert_eq!(err.code, EXIT_PLATFORM_API);
            if let Some(bad) = bad {
                assert!(err.message.contains(&format!("{bad:?}")), "{}", err.message);
            }
        }
        let mut md = md();
        assert!(check_buildpack_apis(&md).is_ok());
        md.buildpacks.push(Buildpack {
            id: "future".into(),
            api: "0.13".into(),
        });
        let err = check_buildpack_apis(&md).unwrap_err();
        assert_eq!(err.code, EXIT_BUILDPACK_API);
        assert!(err.message.contains("future"), "{}", err.message);
    }

    #[test]
    fn process_by_link_name_with_user_args_by_api() {
        // One-element command: appended below Buildpack API 0.9, replacing from 0.9.
        assert_eq!(
            pick("/cnb/process/one-old", &["u"], P13, None).unwrap(),
            (os(&["run"]), os(&["a", "u"]))
        );
        assert_eq!(
            pick("/cnb/process/one-new", &["u"], P13, None).unwrap(),
            (os(&["run"]), os(&["u"]))
        );
        assert_eq!(
            pick("/cnb/process/one-new", &[], P13, None).unwrap(),
            (os(&["run"]), os(&["a"]))
        );
        // Several elements: the rest always, then the user's args or else the process's.
        assert_eq!(
            pick("multi", &["u", "v"], P13, None).unwrap(),
            (os(&["run"]), os(&["always", "u", "v"]))
        );
        assert_eq!(
            pick("multi", &[], P13, None).unwrap(),
            (os(&["run"]), os(&["always", "a"]))
        );
        // Platform API < 0.10: always appended.
        assert_eq!(
            pick("one-new", &["u"], Api(0, 9), None).unwrap(),
            (os(&["run"]), os(&["a", "u"]))
        );
        let err = pick("orphan", &["u"], P13, None).unwrap_err();
        assert!(err.contains("failed to find buildpack"), "{err}");
    }

    #[test]
    fn user_commands_and_the_deprecated_process_type_variable() {
        let err = pick("/cnb/lifecycle/launcher", &[], P13, None).unwrap_err();
        assert_eq!(
            err,
            "when there is no default process a command is required"
        );
        let mut warnings = Vec::new();
        let p = select(
            &md(),
            P13,
            OsStr::new("launcher"),
            &os(&["--", "ls", "-l"]),
            None,
            &mut warnings,
        )
        .unwrap();
        assert!(p.direct && p.kind.is_empty());
        assert_eq!((p.command, p.args), (os(&["ls"]), os(&["-l"])));
        let p = select(
            &md(),
            P13,
            OsStr::new("launcher"),
            &os(&["echo $X"]),
            None,
            &mut warnings,
        )
        .unwrap();
        assert!(!p.direct);
        assert_eq!((p.command, p.args), (os(&["echo $X"]), os(&[])));
        assert!(pick("launcher", &["--"], P13, None).is_err());
        assert!(warnings.is_empty());

        let mut warnings = Vec::new();
        let p = select(
            &md(),
            P13,
            OsStr::new("launcher"),
            &[],
            Some(OsStr::new("multi")),
            &mut warnings,
        )
        .unwrap();
        assert_eq!(p.kind, "multi");
        assert!(warnings[0].contains("deprecated"), "{warnings:?}");
        let err = pick("launcher", &[], P13, Some("nope")).unwrap_err();
        assert_eq!(err, "process type nope was not found");
        // A command, or a process link, wins over the variable.
        let mut warnings = Vec::new();
        let p = select(
            &md(),
            P13,
            OsStr::new("launcher"),
            &os(&["x"]),
            Some(OsStr::new("multi")),
            &mut warnings,
        )
        .unwrap();
        assert!(p.kind.is_empty() && warnings[0].contains("ignored"));
        let p = select(
            &md(),
            P13,
            OsStr::new("/cnb/process/one-new"),
            &[],
            Some(OsStr::new("multi")),
            &mut warnings,
        )
        .unwrap();
        assert_eq!(p.kind, "one-new");
        // An unknown link name is an ordinary user command.
        let p = select(
            &md(),
            P13,
            OsStr::new("/cnb/process/nope"),
            &os(&["true"]),
            None,
            &mut warnings,
        )
        .unwrap();
        assert!(p.kind.is_empty() && !p.direct);
    }

    #[test]
    fn the_shell_script_sources_profiles_then_runs_script_or_tokens() {
        let profiles = [
            PathBuf::from("/layers/bp/l/profile.d/a"),
            PathBuf::from("/workspace/it's/.profile"),
        ];
        let script = shell_script(&profiles, Path::new("/workspace"), true, 1);
        assert_eq!(
            String::from_utf8(script).unwrap(),
            "source '/layers/bp/l/profile.d/a'\nsource '/workspace/it'\\''s/.profile'\n\
             cd -- '/workspace' || exit 82\nexec bash -c \"$@\""
        );
        let tokens = shell_script(&[], Path::new("/w"), false, 3);
        assert_eq!(
            String::from_utf8(tokens).unwrap(),
            "cd -- '/w' || exit 82\nexec bash -c '\"$(eval echo \\\"$0\\\")\" \
             \"$(eval echo \\\"$1\\\")\" \"$(eval echo \\\"$2\\\")\"' \"${@:1}\""
        );
    }

    #[test]
    fn look_path_follows_path_and_refuses_non_executables() {
        let dir = crate::tests::TempDir::new();
        dir.write("tool", "#!/bin/sh\n");
        dir.write("data", "");
        std::fs::set_permissions(
            dir.path().join("tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(
            look_path(OsStr::new("tool"), path.as_bytes()).unwrap(),
            dir.path().join("tool")
        );
        assert!(look_path(OsStr::new("data"), path.as_bytes())
            .unwrap_err()
            .contains("not found in $PATH"));
        let abs = dir.path().join("data");
        assert!(look_path(abs.as_os_str(), b"")
            .unwrap_err()
            .contains("not an executable"));
    }
}
