//! The rootless sandbox: runs a process in new user, mount, pid, uts and ipc namespaces (and a
//! network namespace for `--network none`), rooted in an unpacked image via pivot_root, as one
//! of the image's users, with no daemon and no setuid helper unless one is there to use.
//!
//! `unshare(CLONE_NEWUSER)` is refused in a multithreaded process, so lathe re-executes itself
//! as `lathe __sandbox-init` ([`child`]); this side writes that process's id maps, relays its
//! setup errors, enforces the timeout and kills the whole sandbox on cancellation. Mount setup
//! is data ([`plan`]) applied through one syscall seam ([`sys`]).
//!
//! Id maps: as root, the identity map (files keep their real owners). Unprivileged, the
//! caller is root inside for the setup (mounts and binfmt_misc need it). With only the caller
//! mapped, the payload then nests a user namespace mapping that root to the image user, so
//! the caller's rootless-unpacked files are the image user's; with `newuidmap`/`newgidmap`
//! and a subordinate range in /etc/subuid and /etc/subgid, ids 1–65535 are mapped too and the
//! payload simply becomes the image user, on a tree that [`mapped`]'s helper unpacked with the
//! image's owners (ids of the range on disk). Builds still run their buildpacks as the caller
//! ([`SandboxSpec::user_is_caller`]) on a caller-owned tree.
//!
//! `--sandbox auto` asks [`probe_user_namespaces`], which forks a child that tries the
//! sandbox's `unshare` and exits: no program is run.

pub mod child;
pub mod mapped;
pub mod plan;
pub mod sys;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::idmap::{self, IdRange};
use crate::platform::Platform;

/// The environment variable that carries the spec into `lathe __sandbox-init`.
pub const SPEC_ENV: &str = "LATHE_SANDBOX_SPEC";
/// The hidden argument that makes lathe the sandbox's init.
pub const INIT_ARG: &str = "__sandbox-init";
/// The descriptor of the parent ↔ init channel in the re-executed process.
const SYNC_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "user namespaces are not available here ({why}).\n{diagnosis}\nEither allow \
         unprivileged user namespaces, or run lathe inside the builder image with \
         --sandbox none."
    )]
    NoUserNamespace { why: String, diagnosis: String },
    #[error("sandbox setup: {0}")]
    Setup(String),
    /// overlayfs could not be mounted here (the caller may run on a private copy instead).
    #[error("sandbox setup: {0}")]
    OverlayUnavailable(String),
    /// The payload could not be executed; `code` is 127 (not found) or 126.
    #[error("{why}")]
    Exec { why: String, code: i32 },
    #[error("the sandbox ran longer than {0:?} and was killed")]
    TimedOut(Duration),
    #[error("interrupted; the sandbox was killed")]
    Interrupted,
    #[error("{what}: {why}")]
    Io { what: String, why: String },
    /// The lifecycle payload failed; `code` is the lifecycle's exit code for it.
    #[error("{message}")]
    Lifecycle { message: String, code: i32 },
}

/// How the root filesystem is made writable without changing the tree it comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RootFs {
    /// overlayfs over a read-only lower tree.
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        merged: PathBuf,
    },
    /// A private tree (a copy) used as it is.
    Private(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    /// An absolute path inside the sandbox.
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Network {
    /// Only a loopback interface.
    None,
    /// The host's network.
    Host,
}

/// A user-mode emulator registered in the sandbox's own binfmt_misc.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Emulator {
    /// The Go-style architecture name it runs (`arm64`, `amd64`, `arm`).
    pub arch: String,
    pub interpreter: PathBuf,
}

impl Emulator {
    /// Finds `qemu-<machine>-static` (or `qemu-<machine>`) for `platform` on PATH.
    pub fn find_for(platform: &Platform) -> Result<Emulator, String> {
        let machine = match platform.arch.as_str() {
            "arm64" => "aarch64",
            "amd64" => "x86_64",
            "arm" => "arm",
            "riscv64" => "riscv64",
            "ppc64le" => "ppc64le",
            "s390x" => "s390x",
            other => return Err(format!("no emulator is known for architecture {other}")),
        };
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        for name in [format!("qemu-{machine}-static"), format!("qemu-{machine}")] {
            for dir in path.split(':').filter(|d| !d.is_empty()) {
                let candidate = Path::new(dir).join(&name);
                if candidate.is_file() {
                    return Ok(Emulator {
                        arch: platform.arch.clone(),
                        interpreter: candidate,
                    });
                }
            }
        }
        Err(format!(
            "running {platform} images needs qemu-{machine}-static on PATH (Debian: apt-get \
             install qemu-user-static)"
        ))
    }

    /// The binfmt_misc `register` line: ELF magic and mask for the architecture, flags `PF`
    /// (`P` keeps argv[0], which busybox applets need; `F` opens the interpreter now, from
    /// the host's filesystem, so the image needs no copy of it).
    pub fn registration(&self) -> Result<String, String> {
        let (magic, mask) = match self.arch.as_str() {
            "arm64" => (
                r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
                r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
            ),
            "amd64" => (
                r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
                r"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
            ),
            "arm" => (
                r"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
                r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
            ),
            other => return Err(format!("no ELF magic known for {other}")),
        };
        let interpreter = self
            .interpreter
            .to_str()
            .filter(|p| !p.contains(':'))
            .ok_or_else(|| format!("{}: unusable emulator path", self.interpreter.display()))?;
        Ok(format!(
            ":lathe-{}:M::{magic}:{mask}:{interpreter}:PF",
            self.arch
        ))
    }
}

/// Everything the sandbox needs to run one process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxSpec {
    pub rootfs: RootFs,
    pub binds: Vec<Bind>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The working directory inside the sandbox (created when missing).
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub network: Network,
    pub emulator: Option<Emulator>,
    pub hostname: String,
    /// Run the payload as the caller's own id (nesting a user namespace in which the caller
    /// is `uid`:`gid`) even where a subordinate range would allow the image's real ids: a
    /// build's work area, made by the caller, is then the buildpacks' to write, and what they
    /// write is the caller's to read and delete. Root needs no such help (it chowns).
    #[serde(default)]
    pub user_is_caller: bool,
    /// Run the lifecycle (detect and build) in the payload process instead of exec'ing `argv`:
    /// lathe's own code, already in memory, running inside the image.
    #[serde(default)]
    pub lifecycle: Option<crate::lifecycle::phase::PhaseRequest>,
}

/// Messages from the sandbox's processes to this side, one JSON line each.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Message {
    Unshared,
    /// The maps are written; `nested`: see [`nests_user_namespace`].
    Mapped {
        nested: bool,
    },
    NoUserNamespace(String),
    OverlayUnavailable(String),
    SetupFailed(String),
    ExecFailed {
        why: String,
        code: i32,
    },
    /// The lifecycle payload failed with this exit code and message.
    LifecycleFailed {
        message: String,
        code: i32,
    },
}

/// How a run is controlled from outside.
pub struct RunControl<'a> {
    /// The program to re-execute as the sandbox's init: lathe itself.
    pub lathe_exe: PathBuf,
    pub timeout: Option<Duration>,
    /// Set (by a signal handler, say) to kill the sandbox.
    pub cancel: &'a AtomicBool,
}

/// Runs `spec` and returns the process's exit code (128+N when killed by signal N).
pub fn run(spec: &SandboxSpec, control: &RunControl) -> Result<i32, SandboxError> {
    let spec_json = serde_json::to_string(spec).expect("specs serialize");
    let (mut child, ours) = spawn_init(&control.lathe_exe, SPEC_ENV, spec_json)?;
    let pid = child.id();
    let mut reader = BufReader::new(ours.try_clone().map_err(|e| io_error("socket", e))?);
    let mut writer = ours;
    let mut line = String::new();
    let first = reader
        .read_line(&mut line)
        .ok()
        .and_then(|_| serde_json::from_str::<Message>(&line).ok());
    match first {
        Some(Message::Unshared) => {}
        Some(Message::NoUserNamespace(why)) => {
            let _ = child.wait();
            return Err(SandboxError::NoUserNamespace {
                why,
                diagnosis: diagnose_user_namespaces(),
            });
        }
        Some(Message::SetupFailed(why)) => {
            let _ = child.wait();
            return Err(SandboxError::Setup(why));
        }
        _ => {
            let status = child.wait().map_err(|e| io_error("wait", e))?;
            return Err(SandboxError::Setup(format!(
                "the sandbox's init ended early ({status})"
            )));
        }
    }
    let nested = match write_id_maps(pid, spec.uid, spec.gid, spec.user_is_caller) {
        Ok(nested) => nested,
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SandboxError::Setup(why));
        }
    };
    let mapped = serde_json::to_string(&Message::Mapped { nested }).expect("serializes") + "\n";
    writer
        .write_all(mapped.as_bytes())
        .map_err(|e| io_error("sandbox channel", e))?;

    // Later messages (setup or exec failures) arrive until every holder of the socket is gone.
    let messages = std::thread::spawn(move || {
        let mut found = Vec::new();
        for line in reader.lines().map_while(Result::ok) {
            if let Ok(message) = serde_json::from_str::<Message>(&line) {
                found.push(message);
            }
        }
        found
    });
    let started = Instant::now();
    let ended = loop {
        if let Some(status) = child.try_wait().map_err(|e| io_error("wait", e))? {
            break Ok(status);
        }
        if control.cancel.load(Ordering::SeqCst) {
            break Err(SandboxError::Interrupted);
        }
        if let Some(limit) = control.timeout
            && started.elapsed() > limit
        {
            break Err(SandboxError::TimedOut(limit));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = match ended {
        Ok(status) => status,
        Err(e) => {
            // The init dies with its parent (PDEATHSIG), and the pid namespace with its init.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    drop(writer);
    let messages = messages.join().unwrap_or_default();
    for message in messages {
        match message {
            Message::SetupFailed(why) => return Err(SandboxError::Setup(why)),
            Message::OverlayUnavailable(why) => {
                return Err(SandboxError::OverlayUnavailable(why));
            }
            Message::ExecFailed { why, code } => return Err(SandboxError::Exec { why, code }),
            Message::LifecycleFailed { message, code } => {
                return Err(SandboxError::Lifecycle { message, code });
            }
            _ => {}
        }
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

/// Starts `lathe __sandbox-init` with `value` in the environment variable `key`, the other
/// end of the returned socket as its descriptor [`SYNC_FD`], and death with its parent.
fn spawn_init(
    lathe_exe: &Path,
    key: &str,
    value: String,
) -> Result<(std::process::Child, UnixStream), SandboxError> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| io_error("socketpair", e))?;
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut command = Command::new(lathe_exe);
    command.arg(INIT_ARG).env(key, value);
    // SAFETY: only async-signal-safe calls (dup2, prctl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(theirs_fd, SYNC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| io_error(&lathe_exe.display().to_string(), e))?;
    Ok((child, ours))
}

fn io_error(what: &str, e: std::io::Error) -> SandboxError {
    SandboxError::Io {
        what: what.to_string(),
        why: e.to_string(),
    }
}

/// The sandbox's id map for a caller with id `caller` and an optional subordinate range
/// (start, count): root keeps every id; anyone else is root inside (mounts and binfmt_misc
/// need it), with the subordinate range filling 1–65535 when there is one.
pub fn id_ranges(caller: u32, subordinate: Option<(u32, u32)>) -> Vec<IdRange> {
    if caller == 0 {
        return vec![(0, 0, u32::MAX)];
    }
    let mut ranges = vec![(0, caller, 1)];
    if let Some((start, count)) = subordinate {
        ranges.push((1, start, count.min(65535)));
    }
    ranges
}

/// Whether the payload runs in a nested user namespace that maps the sandbox's root (the
/// caller) to the image user: when nothing but the caller is mapped, that is the only way to
/// run as the image's user, and it makes the caller's files the image user's.
pub fn nests_user_namespace(caller: u32, subordinate: Option<(u32, u32)>) -> bool {
    caller != 0 && subordinate.is_none()
}

/// Writes the maps of process `pid`'s new user namespace; returns whether the payload must
/// nest a user namespace of its own (see [`nests_user_namespace`] and
/// [`SandboxSpec::user_is_caller`]).
fn write_id_maps(
    pid: u32,
    image_uid: u32,
    image_gid: u32,
    user_is_caller: bool,
) -> Result<bool, String> {
    if let Some(ids) = subordinate_ids() {
        map_subordinate_ids(pid, &ids)?;
        return Ok(user_is_caller);
    }
    let caller_uid = nix::unistd::getuid().as_raw();
    let caller_gid = nix::unistd::getgid().as_raw();
    let write = |file: &str, text: String| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))
    };
    if caller_uid == 0 {
        // Root keeps every id it has: all of them on a host, only some inside a rootless
        // container's user namespace (`unshare --user --map-root-user`, say).
        let uids = identity_of_own_ids("/proc/self/uid_map")?;
        let gids = identity_of_own_ids("/proc/self/gid_map")?;
        write("uid_map", idmap::format(&uids))?;
        write("gid_map", idmap::format(&gids))?;
        return Ok(!(idmap::covers(&uids, image_uid) && idmap::covers(&gids, image_gid)));
    }
    write("setgroups", "deny".into())?;
    write("uid_map", idmap::format(&id_ranges(caller_uid, None)))?;
    write("gid_map", idmap::format(&id_ranges(caller_gid, None)))?;
    Ok(nests_user_namespace(caller_uid, None))
}

/// An unprivileged caller's subordinate ids, from /etc/subuid and /etc/subgid, that the
/// setuid `newuidmap` and `newgidmap` map for it: with them the sandbox maps ids 0–65535
/// (the caller as root, the range from 1), so images keep their owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubordinateIds {
    /// The first host uid of the range and how many.
    pub uids: (u32, u32),
    /// The first host gid of the range and how many.
    pub gids: (u32, u32),
}

impl SubordinateIds {
    /// A name for what was made with these ids (store trees owned through them).
    pub fn tag(&self) -> String {
        format!("ids-{}-{}", self.uids.0, self.gids.0)
    }
}

const NEWUIDMAP: &str = "/usr/bin/newuidmap";
const NEWGIDMAP: &str = "/usr/bin/newgidmap";

/// The caller's subordinate ids, when it is not root, `newuidmap` and `newgidmap` are there
/// and /etc/subuid and /etc/subgid give it 65536 ids or more.
pub fn subordinate_ids() -> Option<SubordinateIds> {
    let uid = nix::unistd::getuid();
    if uid.is_root() || !Path::new(NEWUIDMAP).exists() || !Path::new(NEWGIDMAP).exists() {
        return None;
    }
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    let range = |file: &str| {
        let text = std::fs::read_to_string(file).ok()?;
        subordinate_range(&text, user.as_deref(), uid.as_raw())
    };
    Some(SubordinateIds {
        uids: range("/etc/subuid")?,
        gids: range("/etc/subgid")?,
    })
}

/// Maps process `pid`'s new user namespace through `newuidmap` and `newgidmap`: the caller
/// as root, `ids` from 1 (see [`id_ranges`]).
fn map_subordinate_ids(pid: u32, ids: &SubordinateIds) -> Result<(), String> {
    let caller_uid = nix::unistd::getuid().as_raw();
    let caller_gid = nix::unistd::getgid().as_raw();
    for (helper, ranges) in [
        (NEWUIDMAP, id_ranges(caller_uid, Some(ids.uids))),
        (NEWGIDMAP, id_ranges(caller_gid, Some(ids.gids))),
    ] {
        let mut args = vec![pid.to_string()];
        for (inside, outside, count) in ranges {
            args.extend([inside, outside, count].map(|n| n.to_string()));
        }
        let out = Command::new(helper)
            .args(&args)
            .output()
            .map_err(|e| format!("{helper}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{helper} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// An identity map of the ids this process's own user namespace has.
fn identity_of_own_ids(map_file: &str) -> Result<Vec<IdRange>, String> {
    Ok(idmap::read(map_file)?
        .into_iter()
        .map(|(inside, _, count)| (inside, inside, count))
        .collect())
}

/// The caller's range in the text of /etc/subuid or /etc/subgid (by name or uid), if it has
/// 65536 ids.
fn subordinate_range(text: &str, user: Option<&str>, uid: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let who = fields.next()?;
        let start = fields.next()?.trim().parse().ok()?;
        let count: u32 = fields.next()?.trim().parse().ok()?;
        let ours = Some(who) == user || who == uid.to_string();
        (ours && count >= 65536).then_some((start, count))
    })
}

/// What stops user namespaces here, read from the settings that can.
pub fn diagnose_user_namespaces() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut findings = Vec::new();
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        findings.push("sysctl kernel.unprivileged_userns_clone is 0 (set it to 1)".to_string());
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        findings.push("sysctl user.max_user_namespaces is 0 (raise it)".to_string());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        findings.push(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns=1; set it to 0 or give lathe a \
             profile that allows userns)"
                .to_string(),
        );
    }
    let seccomp = read("/proc/self/status").and_then(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
    });
    if seccomp.as_deref() == Some("2") {
        findings.push(
            "a seccomp filter is active (Docker's and Kubernetes' default profiles refuse \
             unshare: run the container with an unconfined seccomp profile or one that \
             allows CLONE_NEWUSER)"
                .to_string(),
        );
    }
    if findings.is_empty() {
        "No sysctl, AppArmor or seccomp setting explains it; the container runtime may \
         forbid nested user namespaces."
            .into()
    } else {
        format!("Found: {}.", findings.join("; "))
    }
}

/// Whether user namespaces (and the sandbox's other namespaces) can be made here: a forked
/// child of this process tries `unshare` and exits, executing nothing. `Err` says why not.
pub fn probe_user_namespaces() -> Result<(), String> {
    probe_verdict(sys::fork_and_unshare(sys::SANDBOX_NAMESPACES)?)
}

/// What the probe child's end says: exit 0 is success, exit N the errno of a refused
/// unshare.
pub fn probe_verdict(status: nix::sys::wait::WaitStatus) -> Result<(), String> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, 0) => Ok(()),
        WaitStatus::Exited(_, errno) => Err(format!(
            "unshare(CLONE_NEWUSER) was refused: {}",
            nix::errno::Errno::from_raw(errno).desc()
        )),
        WaitStatus::Signaled(_, signal, _) => Err(format!(
            "the user namespace probe was killed by {signal} (a seccomp filter that kills, \
             perhaps)"
        )),
        other => Err(format!("the user namespace probe ended oddly ({other:?})")),
    }
}

/// Whether user namespaces can be made here (see [`probe_user_namespaces`]).
pub fn user_namespaces_work() -> bool {
    probe_user_namespaces().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_keeps_every_id() {
        assert_eq!(id_ranges(0, None), vec![(0, 0, u32::MAX)]);
        assert!(!nests_user_namespace(0, None));
    }

    #[test]
    fn an_unprivileged_caller_is_root_inside_and_the_payload_nests() {
        assert_eq!(id_ranges(2000, None), vec![(0, 2000, 1)]);
        assert!(nests_user_namespace(2000, None));
        assert_eq!(idmap::format(&id_ranges(2000, None)), "0 2000 1\n");
    }

    #[test]
    fn a_subordinate_range_fills_1_to_65535() {
        let ranges = id_ranges(2000, Some((100_000, 65536)));
        assert_eq!(ranges, vec![(0, 2000, 1), (1, 100_000, 65535)]);
        assert!(!nests_user_namespace(2000, Some((100_000, 65536))));
    }

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid_and_need_65536_ids() {
        let text = "alice:100000:65536\n1002:200000:70000\nsmall:300000:1000\n";
        assert_eq!(
            subordinate_range(text, Some("alice"), 1001),
            Some((100_000, 65536))
        );
        assert_eq!(
            subordinate_range(text, Some("bob"), 1002),
            Some((200_000, 70000))
        );
        assert_eq!(subordinate_range(text, Some("small"), 1003), None);
        assert_eq!(subordinate_range(text, None, 1004), None);
        assert_eq!(subordinate_range("garbage\n:::\n", Some("alice"), 1), None);
        let ids = SubordinateIds {
            uids: (100_000, 65536),
            gids: (200_000, 65536),
        };
        assert_eq!(ids.tag(), "ids-100000-200000");
    }

    #[test]
    fn the_probe_verdict_names_the_errno_or_the_signal() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        let pid = nix::unistd::Pid::from_raw(42);
        assert_eq!(probe_verdict(WaitStatus::Exited(pid, 0)), Ok(()));
        let refused = probe_verdict(WaitStatus::Exited(pid, libc::EPERM)).unwrap_err();
        assert_eq!(
            refused,
            "unshare(CLONE_NEWUSER) was refused: Operation not permitted"
        );
        let too_many = probe_verdict(WaitStatus::Exited(pid, libc::ENOSPC)).unwrap_err();
        assert!(too_many.ends_with("No space left on device"), "{too_many}");
        let killed = probe_verdict(WaitStatus::Signaled(pid, Signal::SIGSYS, false)).unwrap_err();
        assert!(killed.contains("SIGSYS"), "{killed}");
    }

    /// The probe answers what `unshare --user` answers, from this test process, which has
    /// threads (unshare(CLONE_NEWUSER) itself would be refused in it).
    #[test]
    fn the_probe_agrees_with_unshare_and_works_in_a_threaded_process() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || stopped.recv());
        let threads = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse::<u32>()))
            .unwrap()
            .unwrap();
        assert!(threads > 1);
        // SAFETY: unshare has no memory preconditions; EINVAL is what a threaded process gets.
        let direct = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        assert_eq!(
            (direct, nix::errno::Errno::last()),
            (-1, nix::errno::Errno::EINVAL)
        );
        let oracle = Command::new("unshare")
            .args(["--user", "--mount", "--pid", "--uts", "--ipc", "true"])
            .status()
            .expect("unshare(1) from util-linux")
            .success();
        assert_eq!(
            probe_user_namespaces().is_ok(),
            oracle,
            "{:?}",
            probe_user_namespaces()
        );
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn registration_lines_name_the_interpreter_with_flags_pf() {
        let e = Emulator {
            arch: "arm64".into(),
            interpreter: "/usr/bin/qemu-aarch64-static".into(),
        };
        let line = e.registration().unwrap();
        assert!(line.starts_with(":lathe-arm64:M::\\x7fELF\\x02"), "{line}");
        assert!(line.ends_with(":/usr/bin/qemu-aarch64-static:PF"), "{line}");
        assert_eq!(line.matches(':').count(), 7);
    }
}
