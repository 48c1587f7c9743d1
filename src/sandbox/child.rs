//! The processes inside the sandbox: lathe re-executed as `lathe __sandbox-init` (single
//! threaded, so `unshare(CLONE_NEWUSER)` is allowed), which makes the namespaces, waits for
//! the parent to write its id maps, and forks the namespace's pid 1. (The same re-execution
//! with a task instead of a spec is [`super::mapped`]'s helper.) Pid 1 sets up the mounts
//! ([`super::plan`]), forks the payload as the image user, forwards signals to it and exits
//! with its status, which takes every other process of the namespace with it.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

use super::plan::{Step, apply, plan};
use super::sys::RealSys;
use super::{Message, Network, SPEC_ENV, SYNC_FD, SandboxSpec};
use crate::idmap;

/// The exit code of a sandbox that could not be set up (the parent reports the reason).
pub const SETUP_FAILED: i32 = 125;

/// Entry point of `lathe __sandbox-init`. Never returns.
pub fn sandbox_init() -> ! {
    // SAFETY: fd SYNC_FD was set up by the parent for this process alone.
    let sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    let _ = nix::fcntl::fcntl(
        &sync,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    if std::env::var_os(super::mapped::TASK_ENV).is_some() {
        super::mapped::task_init(sync);
    }
    let mut report = Reporter { sync };
    let spec: SandboxSpec = match std::env::var(SPEC_ENV)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(why) => report.fail(Message::SetupFailed(format!("sandbox spec: {why}"))),
    };
    let mut flags = CloneFlags::from_bits_truncate(super::sys::SANDBOX_NAMESPACES);
    if spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(errno) = nix::sched::unshare(flags) {
        report.fail(Message::NoUserNamespace(errno.desc().to_string()));
    }
    report.send(&Message::Unshared);
    let nested = match report.receive() {
        Some(Message::Mapped { nested }) => nested,
        _ => std::process::exit(SETUP_FAILED),
    };
    // Pid 1 notices through this pipe if we die before it has set its parent-death signal.
    let (alive_read, alive_write) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => report.fail(Message::SetupFailed(format!("pipe: {e}"))),
    };
    // SAFETY: single-threaded; the child only runs pid1, which execs or exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(alive_write);
            pid1(spec, nested, report, alive_read)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_read);
            let code = wait_for_exit(child);
            drop(alive_write);
            std::process::exit(code)
        }
        Err(e) => report.fail(Message::SetupFailed(format!("fork: {e}"))),
    }
}

struct Reporter {
    sync: UnixStream,
}

impl Reporter {
    fn send(&mut self, message: &Message) {
        let mut line = serde_json::to_string(message).expect("messages serialize");
        line.push('\n');
        let _ = self.sync.write_all(line.as_bytes());
    }

    fn receive(&mut self) -> Option<Message> {
        let mut line = String::new();
        BufReader::new(&self.sync).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    fn fail(&mut self, message: Message) -> ! {
        self.send(&message);
        std::process::exit(SETUP_FAILED)
    }
}

fn wait_for_exit(child: Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return SETUP_FAILED,
        }
    }
}

fn pid1(spec: SandboxSpec, nested: bool, mut report: Reporter, parent_alive: OwnedFd) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&parent_alive),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        std::process::exit(SETUP_FAILED); // the pipe hung up: our parent is gone
    }
    if spec.network == Network::None {
        bring_up_loopback();
    }
    if let Err(failed) = apply(&plan(&spec), &mut RealSys) {
        report.fail(match failed.step {
            Step::MountOverlay { .. } => Message::OverlayUnavailable(failed.to_string()),
            _ => Message::SetupFailed(failed.to_string()),
        });
    }
    let forwarded: SigSet = [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ]
    .into_iter()
    .collect();
    let _ = forwarded.thread_block();
    // SAFETY: single-threaded; the child only prepares and execs.
    let payload = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = forwarded.thread_unblock();
            if let Some(request) = &spec.lifecycle {
                run_lifecycle(&spec, request, nested, report)
            }
            let (why, code) = exec_payload(&spec, nested);
            report.fail(Message::ExecFailed { why, code })
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => report.fail(Message::SetupFailed(format!("fork: {e}"))),
    };
    drop(report);
    loop {
        let Ok(signal) = forwarded.wait() else {
            continue;
        };
        if signal != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(payload, signal);
            continue;
        }
        // Reap everything; orphans of the payload are re-parented to us.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == payload => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == payload => {
                    std::process::exit(128 + signal as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Runs the lifecycle as the image user in the working directory and exits with its code,
/// telling the parent why when it fails.
fn run_lifecycle(
    spec: &SandboxSpec,
    request: &crate::lifecycle::phase::PhaseRequest,
    nested: bool,
    mut report: Reporter,
) -> ! {
    if let Err((why, _)) = become_image_user(spec, nested) {
        report.fail(Message::SetupFailed(why))
    }
    match crate::lifecycle::phase::run(request) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let code = e.exit_code();
            report.send(&Message::LifecycleFailed {
                message: e.to_string(),
                code,
            });
            std::process::exit(code)
        }
    }
}

/// Becomes the image user in the working directory and execs the payload; returns why not,
/// with 127 when the program is not there and 126 otherwise.
fn exec_payload(spec: &SandboxSpec, nested: bool) -> (String, i32) {
    match prepare_and_exec(spec, nested) {
        Err((why, Some(Errno::ENOENT))) | Err((why, Some(Errno::ENOTDIR))) => (why, 127),
        Err((why, _)) => (why, 126),
    }
}

type ExecFailure = (String, Option<Errno>);

fn prepare_and_exec(spec: &SandboxSpec, nested: bool) -> Result<Infallible, ExecFailure> {
    become_image_user(spec, nested)?;
    exec(spec)
}

/// Becomes `spec`'s uid:gid (through a nested user namespace when `nested`) in its working
/// directory.
fn become_image_user(spec: &SandboxSpec, nested: bool) -> Result<(), ExecFailure> {
    let gid = Gid::from_raw(spec.gid);
    let uid = Uid::from_raw(spec.uid);
    if nested && let Err(why) = nest_as_image_user(spec.uid, spec.gid) {
        let why = format!("becoming the image user {}:{}: {why}", spec.uid, spec.gid);
        return Err((why, None));
    }
    // Refused (EPERM) when setgroups is denied in a single-id map; there are no groups to drop
    // then anyway.
    let _ = nix::unistd::setgroups(&[gid]);
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| (format!("becoming group {}: {e}", spec.gid), None))?;
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|e| (format!("becoming user {}: {e}", spec.uid), None))?;
    nix::unistd::chdir(Path::new(&spec.cwd))
        .map_err(|e| (format!("working directory {}: {e}", spec.cwd), None))?;
    Ok(())
}

fn exec(spec: &SandboxSpec) -> Result<Infallible, ExecFailure> {
    let Some(program) = spec.argv.first() else {
        let why = "nothing to run: the image has no entrypoint or command";
        return Err((why.into(), Some(Errno::ENOENT)));
    };
    let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map_or(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        |(_, v)| v,
    );
    let Some(resolved) = find_program(program, path_var) else {
        let why = format!("{program}: not found in the image (PATH={path_var})");
        return Err((why, Some(Errno::ENOENT)));
    };
    let to_c = |s: &str| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = spec.argv.iter().map(|a| to_c(a)).collect();
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect();
    nix::unistd::execve(&to_c(&resolved), &argv, &env)
        .map_err(|errno| (format!("exec {resolved}: {}", errno.desc()), Some(errno)))
}

/// Enters a new user namespace in which this process (root of the sandbox's namespace) is
/// `uid`:`gid`.
fn nest_as_image_user(uid: u32, gid: u32) -> Result<(), String> {
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("unshare: {e}"))?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| format!("{file}: {e}"))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", idmap::format(&[(uid, 0, 1)]))?;
    write("gid_map", idmap::format(&[(gid, 0, 1)]))
}

/// `program` itself when it has a slash, else the first executable file of that name on PATH.
fn find_program(program: &str, path_var: &str) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_string());
    }
    path_var
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .find(|candidate| {
            nix::unistd::access(candidate.as_str(), nix::unistd::AccessFlags::X_OK).is_ok()
                && Path::new(candidate).is_file()
        })
}

/// A new network namespace starts with `lo` down; bring it up so localhost works.
fn bring_up_loopback() {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return;
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) == 0 {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request);
        }
    }
}
