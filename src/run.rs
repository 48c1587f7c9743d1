//! `lathe run`: runs an image's process (a CNB image's process type, or the entrypoint and
//! command) in the sandbox, from the store's root filesystem, as the image's user, and
//! returns its exit code. Foreign platforms run through the sandbox's private binfmt_misc.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use pathrs::Root;
use serde_json::Value;

use crate::image::{self, ImageError, ImageSource};
use crate::platform::Platform;
use crate::progress::{ByteProgress, NoProgress};
use crate::sandbox::mapped::{self, Task};
use crate::sandbox::{self, Bind, Emulator, Network, RootFs, RunControl, SandboxSpec};
use crate::store::{Owners, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("{0}")]
    Invalid(String),
    /// The user's arguments are at fault (exit code 3).
    #[error("{0}")]
    Usage(String),
}

impl RunError {
    /// The exit code cli-conventions.md gives this error: 3 for bad arguments, 127/126 when
    /// the program can't be found or run (as shells and container engines do), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Usage(_) => 3,
            RunError::Image(e) if e.is_usage() => 3,
            RunError::Sandbox(sandbox::SandboxError::Exec { code, .. }) => *code,
            _ => 1,
        }
    }
}

/// `--sandbox auto|userns|none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    Auto,
    Userns,
    None,
}

pub struct RunRequest {
    pub platform: Option<Platform>,
    pub process: Option<String>,
    pub env: Vec<(String, String)>,
    pub volumes: Vec<Bind>,
    pub network: Network,
    pub sandbox: SandboxMode,
    pub timeout: Option<Duration>,
    pub args: Vec<String>,
    pub store: PathBuf,
}

/// How the run went, for the CLI to report.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit_code: i32,
    pub notes: Vec<String>,
}

/// What the image's config says to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub user: String,
}

/// The process to run for `config` (the image config JSON): for `--process TYPE`, the CNB
/// launcher's `/cnb/process/TYPE`; otherwise Entrypoint + Cmd, with `args` replacing Cmd.
pub fn process_from_config(
    config: &Value,
    process_type: Option<&str>,
    args: &[String],
    extra_env: &[(String, String)],
) -> Result<Process, String> {
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = match process_type {
        Some(kind) => {
            check_process_type(kind)?;
            vec![format!("/cnb/process/{kind}")]
        }
        None => strings(&c["Entrypoint"]),
    };
    if args.is_empty() && process_type.is_none() {
        argv.extend(strings(&c["Cmd"]));
    } else {
        argv.extend(args.iter().cloned());
    }
    if argv.is_empty() {
        return Err("the image has no entrypoint or command, and none was given".into());
    }
    let mut env: Vec<(String, String)> = strings(&c["Env"])
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    for (k, v) in extra_env {
        env.retain(|(existing, _)| existing != k);
        env.push((k.clone(), v.clone()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    let cwd = c["WorkingDir"]
        .as_str()
        .filter(|w| !w.is_empty())
        .unwrap_or("/")
        .to_string();
    let user = c["User"].as_str().unwrap_or("").to_string();
    Ok(Process {
        argv,
        env,
        cwd,
        user,
    })
}

/// A process type names one file in /cnb/process.
fn check_process_type(kind: &str) -> Result<(), String> {
    if kind.is_empty() || kind.contains('/') {
        return Err(format!("process type {kind:?} is not a valid name"));
    }
    Ok(())
}

/// Resolves the config's `User` (`name`, `uid`, `name:group`, `uid:gid`) against the image's
/// /etc/passwd and /etc/group; empty means root.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |file: &str| -> String {
        Root::open(rootfs)
            .and_then(|root| root.resolve(file))
            .and_then(|h| h.reopen(pathrs::flags::OpenFlags::O_RDONLY))
            .ok()
            .and_then(|mut f| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut f, &mut text).ok()?;
                Some(text)
            })
            .unwrap_or_default()
    };
    let passwd = read("/etc/passwd");
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == user_part)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user_part)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| format!("user {user_part:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group_part {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read("/etc/group")
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// Runs the image `source` names, per `request`.
pub fn run_image(
    source: &dyn ImageSource,
    request: &RunRequest,
    lathe_exe: &Path,
    cancel: &AtomicBool,
    progress: &dyn ByteProgress,
) -> Result<RunOutcome, RunError> {
    // The arguments are checked before anything is read.
    if let Some(kind) = &request.process {
        check_process_type(kind).map_err(|why| RunError::Usage(format!("--process: {why}")))?;
    }
    if request.sandbox == SandboxMode::None {
        return Err(RunError::Usage(
            "lathe run --sandbox none would run the host's programs, not the image's; it is \
             for builds inside the builder image (use --sandbox userns or auto)"
                .into(),
        ));
    }
    let mut notes = Vec::new();
    let host = Platform::host();
    // What is pulled from a registry is kept in the store for the next run.
    let store = Store::open(&request.store)?;
    let source = store.keep_pulled(source)?;
    let source = source.as_ref();
    // A single image runs whatever its platform (emulated when foreign); an index gives the
    // host's platform unless another is asked for.
    let image = match &request.platform {
        Some(platform) => image::read_platform_image(source, platform)?,
        None => image::read_default_image(source)?,
    };
    let (config, image_platform) = (image.config, image.platform);
    let process = process_from_config(
        &config,
        request.process.as_deref(),
        &request.args,
        &request.env,
    )
    .map_err(|why| RunError::Invalid(format!("{}: {why}", source.describe())))?;

    // `auto` means user namespaces for `lathe run` (`none` is refused above); where they are
    // unavailable, say why before unpacking anything.
    if request.sandbox == SandboxMode::Auto
        && let Err(why) = sandbox::probe_user_namespaces()
    {
        return Err(sandbox::SandboxError::NoUserNamespace {
            why,
            diagnosis: sandbox::diagnose_user_namespaces(),
        }
        .into());
    }
    // With subordinate ids the tree has the image's owners, and the sandbox maps them.
    let owners = Owners::for_caller(lathe_exe);
    let (rootfs, reused) = store.rootfs_owned(
        source,
        &image.manifest,
        &image_platform.to_string(),
        &owners,
        progress,
    )?;
    if reused {
        notes.push(format!("reused {} from the store", rootfs.display()));
    }
    let (uid, gid) = resolve_user(&rootfs, &process.user)
        .map_err(|why| RunError::Invalid(format!("{}: {why}", source.describe())))?;
    let emulator = if image_platform.arch != host.arch {
        Some(Emulator::find_for(&image_platform).map_err(RunError::Invalid)?)
    } else {
        None
    };
    let scratch = store.scratch()?;
    let spec = SandboxSpec {
        rootfs: RootFs::Private(rootfs.clone()),
        binds: request.volumes.clone(),
        argv: process.argv,
        env: process.env,
        cwd: process.cwd,
        uid,
        gid,
        network: request.network,
        emulator,
        hostname: "lathe".into(),
        user_is_caller: false,
        lifecycle: None,
    };
    let control = RunControl {
        lathe_exe: lathe_exe.to_path_buf(),
        timeout: request.timeout,
        cancel,
    };
    let result = writable_root_run(spec, &rootfs, &owners, scratch.path(), &control, &mut notes);
    let scratch_path = scratch.keep();
    if let Err(e) = store.remove_scratch(&scratch_path, &owners) {
        tracing::warn!("{e} (`lathe store prune` removes it)");
    }
    Ok(RunOutcome {
        exit_code: result?,
        notes,
    })
}

/// Runs `spec` on a writable view of the read-only tree `rootfs` (whatever `spec.rootfs`
/// says is replaced): an overlay in `scratch`, or where the kernel refuses overlayfs in a user
/// namespace, a private copy there. Says which in `notes`.
pub(crate) fn run_on_writable_root(
    spec: SandboxSpec,
    rootfs: &Path,
    scratch: &Path,
    control: &RunControl,
    notes: &mut Vec<String>,
) -> Result<i32, RunError> {
    writable_root_run(spec, rootfs, &Owners::Caller, scratch, control, notes)
}

/// [`run_on_writable_root`] for a tree owned as `owners` says (a private copy of a tree of
/// subordinate ids is made by lathe's helper, which may read and chown them).
fn writable_root_run(
    mut spec: SandboxSpec,
    rootfs: &Path,
    owners: &Owners,
    scratch: &Path,
    control: &RunControl,
    notes: &mut Vec<String>,
) -> Result<i32, RunError> {
    spec.rootfs = RootFs::Overlay {
        lower: rootfs.to_path_buf(),
        upper: make_dir(scratch, "upper")?,
        work: make_dir(scratch, "work")?,
        merged: make_dir(scratch, "merged")?,
    };
    match sandbox::run(&spec, control) {
        Err(e @ sandbox::SandboxError::OverlayUnavailable(_)) => {
            let copy = scratch.join("copy");
            match owners {
                Owners::Caller => copy_tree(rootfs, &copy)?,
                Owners::Image { ids, lathe_exe } => {
                    let task = Task::Copy {
                        from: rootfs.to_path_buf(),
                        to: copy.clone(),
                    };
                    mapped::run_task(lathe_exe, ids, &task, None, &NoProgress)
                        .map_err(RunError::Invalid)?;
                }
            }
            tracing::warn!("overlayfs is unavailable here ({e}); running on a private copy");
            notes.push("ran on a private copy of the stored root filesystem".into());
            spec.rootfs = RootFs::Private(copy);
            Ok(sandbox::run(&spec, control)?)
        }
        other => {
            notes.push("ran on an overlay of the stored root filesystem".into());
            Ok(other?)
        }
    }
}

fn make_dir(parent: &Path, name: &str) -> Result<PathBuf, RunError> {
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(|e| {
        RunError::Store(StoreError::Io {
            path: path.clone(),
            why: e.to_string(),
        })
    })?;
    Ok(path)
}

/// A private copy of a tree (reflinked where the filesystem can), for kernels without
/// overlayfs in user namespaces.
fn copy_tree(from: &Path, to: &Path) -> Result<(), RunError> {
    let out = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| RunError::Invalid(format!("cp: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RunError::Invalid(format!(
            "copying {} for the run: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entrypoint_and_cmd_with_args_replacing_cmd() {
        let config = json!({"config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
            "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/app", "User": "cnb"}});
        let p = process_from_config(&config, None, &[], &[]).unwrap();
        assert_eq!(p.argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(p.cwd, "/app");
        assert_eq!(p.user, "cnb");
        let p = process_from_config(
            &config,
            None,
            &["exit 3".into()],
            &[("A".into(), "2".into())],
        )
        .unwrap();
        assert_eq!(p.argv, ["/bin/sh", "-c", "exit 3"]);
        assert_eq!(
            p.env,
            [("PATH".into(), "/bin".into()), ("A".into(), "2".into())]
        );
    }

    #[test]
    fn a_process_type_goes_through_the_cnb_launcher_link() {
        let config = json!({"config": {"Entrypoint": ["/cnb/process/web"]}});
        let p = process_from_config(&config, Some("worker"), &["x".into()], &[]).unwrap();
        assert_eq!(p.argv, ["/cnb/process/worker", "x"]);
        assert!(process_from_config(&config, Some("../x"), &[], &[]).is_err());
        assert!(process_from_config(&json!({}), None, &[], &[]).is_err());
    }

    #[test]
    fn users_resolve_against_the_images_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\ncnb:x:1001:1000::/home/cnb:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "root:x:0:\ncnb:x:1000:\nstaff:x:50:\n",
        )
        .unwrap();
        assert_eq!(resolve_user(root.path(), "").unwrap(), (0, 0));
        assert_eq!(resolve_user(root.path(), "cnb").unwrap(), (1001, 1000));
        assert_eq!(resolve_user(root.path(), "1001").unwrap(), (1001, 1000));
        assert_eq!(resolve_user(root.path(), "cnb:staff").unwrap(), (1001, 50));
        assert_eq!(resolve_user(root.path(), "5:6").unwrap(), (5, 6));
        let err = resolve_user(root.path(), "nobody").unwrap_err();
        assert!(err.contains("nobody"), "{err}");
    }
}
