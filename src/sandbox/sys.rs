//! The one seam between the sandbox's logic and the kernel: every mount, symlink, hostname and
//! pivot_root the init process makes goes through [`Sys`]. [`RealSys`] makes the calls (paths
//! inside the new root are resolved with pathrs, so a hostile image's symlinks can't redirect
//! a mount onto the host); the tests use a recording double.

use std::fs::Permissions;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use pathrs::flags::OpenFlags;
use pathrs::{Handle, Root};

/// What to create at a mount point that does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeKind {
    Dir,
    File,
}

pub trait Sys {
    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String>;
    /// Mounts a new `fstype` filesystem at `inside` (an absolute path in `root`), creating the
    /// directory when missing.
    fn mount_inside(
        &mut self,
        root: &Path,
        inside: &str,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String>;
    /// Binds the host's `source` at `inside`, read-only if asked.
    fn bind_inside(
        &mut self,
        root: &Path,
        inside: &str,
        kind: NodeKind,
        source: &Path,
        read_only: bool,
    ) -> Result<(), String>;
    fn symlink_inside(&mut self, root: &Path, inside: &str, target: &str) -> Result<(), String>;
    fn ensure_dir_inside(&mut self, root: &Path, inside: &str) -> Result<(), String>;
    fn write_inside(&mut self, root: &Path, inside: &str, data: &[u8]) -> Result<(), String>;
    fn sethostname(&mut self, name: &str) -> Result<(), String>;
    /// Makes `root` the root of the mount namespace and detaches the old one.
    fn pivot_root(&mut self, root: &Path) -> Result<(), String>;
}

/// The namespaces the sandbox's init unshares (and a network namespace for `--network none`).
pub const SANDBOX_NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC;

/// Forks a child that calls `unshare(flags)` and exits at once, with 0 when that worked and
/// the errno when it did not; returns how the child ended. Nothing is executed: the child is
/// single-threaded whatever this process's threads (unshare refuses CLONE_NEWUSER in a
/// multithreaded process), and makes only async-signal-safe calls.
pub fn fork_and_unshare(flags: libc::c_int) -> Result<nix::sys::wait::WaitStatus, String> {
    // SAFETY: the child calls only unshare, reads errno and _exits (all async-signal-safe);
    // it touches no lock or allocation another thread may hold.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                (*libc::__errno_location()).clamp(1, 255)
            };
            libc::_exit(code)
        }
    }
    loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting for the user namespace probe: {e}")),
            Ok(status) => return Ok(status),
        }
    }
}

/// The kernel.
pub struct RealSys;

impl RealSys {
    fn open_root(root: &Path) -> Result<Root, String> {
        Root::open(root).map_err(|e| format!("{}: {e}", root.display()))
    }

    /// The node at `inside`, created as `kind` when missing; never outside `root`.
    fn ensure(root: &Path, inside: &str, kind: NodeKind) -> Result<Handle, String> {
        let root = Self::open_root(root)?;
        let dir_mode = Permissions::from_mode(0o755);
        match kind {
            NodeKind::Dir => root.mkdir_all(inside, &dir_mode).map_err(|e| e.to_string()),
            NodeKind::File => {
                if let Ok(handle) = root.resolve(inside) {
                    return Ok(handle);
                }
                if let Some((parent, _)) = inside.rsplit_once('/')
                    && !parent.is_empty()
                {
                    root.mkdir_all(parent, &dir_mode)
                        .map_err(|e| e.to_string())?;
                }
                root.create_file(
                    inside,
                    OpenFlags::O_WRONLY | OpenFlags::O_CREAT | OpenFlags::O_CLOEXEC,
                    &Permissions::from_mode(0o644),
                )
                .map_err(|e| e.to_string())?;
                root.resolve(inside).map_err(|e| e.to_string())
            }
        }
    }
}

/// The path through which a resolved handle can be named to mount(2).
fn fd_path(handle: &Handle) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd()))
}

impl Sys for RealSys {
    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(|e| e.to_string())
    }

    fn mount_inside(
        &mut self,
        root: &Path,
        inside: &str,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String> {
        let target = Self::ensure(root, inside, NodeKind::Dir)?;
        nix::mount::mount(Some(fstype), &fd_path(&target), Some(fstype), flags, data)
            .map_err(|e| e.to_string())
    }

    fn bind_inside(
        &mut self,
        root: &Path,
        inside: &str,
        kind: NodeKind,
        source: &Path,
        read_only: bool,
    ) -> Result<(), String> {
        let target = Self::ensure(root, inside, kind)?;
        nix::mount::mount(
            Some(source),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| e.to_string())?;
        if !read_only {
            return Ok(());
        }
        // A fresh lookup lands on the new mount (the old handle names what it covers). The
        // remount must keep the flags the kernel locked on the source mount.
        let mounted = Self::open_root(root)?
            .resolve(inside)
            .map_err(|e| e.to_string())?;
        let path = fd_path(&mounted);
        let locked = nix::sys::statvfs::statvfs(&path).map_err(|e| e.to_string())?;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        use nix::sys::statvfs::FsFlags;
        for (has, flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if locked.flags().contains(has) {
                flags |= flag;
            }
        }
        nix::mount::mount(None::<&str>, &path, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("read-only remount: {e}"))
    }

    fn symlink_inside(&mut self, root: &Path, inside: &str, target: &str) -> Result<(), String> {
        Self::open_root(root)?
            .create(inside, &pathrs::InodeType::Symlink(target.into()))
            .map_err(|e| e.to_string())
    }

    fn ensure_dir_inside(&mut self, root: &Path, inside: &str) -> Result<(), String> {
        Self::ensure(root, inside, NodeKind::Dir).map(drop)
    }

    fn write_inside(&mut self, root: &Path, inside: &str, data: &[u8]) -> Result<(), String> {
        let (parent, name) = inside
            .rsplit_once('/')
            .ok_or_else(|| format!("{inside}: not an absolute path"))?;
        let dir = Self::open_root(root)?
            .resolve(if parent.is_empty() { "/" } else { parent })
            .map_err(|e| e.to_string())?;
        // Opened relative to the resolved directory: no re-open through /proc (which pathrs
        // refuses for some files), and the final name is never followed.
        let fd = nix::fcntl::openat(
            &dir,
            name,
            nix::fcntl::OFlag::O_WRONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| e.to_string())?;
        std::fs::File::from(fd)
            .write_all(data)
            .map_err(|e| e.to_string())
    }

    fn sethostname(&mut self, name: &str) -> Result<(), String> {
        nix::unistd::sethostname(name).map_err(|e| e.to_string())
    }

    fn pivot_root(&mut self, root: &Path) -> Result<(), String> {
        nix::unistd::chdir(root).map_err(|e| e.to_string())?;
        nix::unistd::pivot_root(".", ".").map_err(|e| e.to_string())?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(|e| e.to_string())?;
        nix::unistd::chdir("/").map_err(|e| e.to_string())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Records each call as a line of text; fails any call whose line contains `fail_on`.
    #[derive(Default)]
    pub struct RecordingSys {
        pub calls: Vec<String>,
        pub fail_on: Option<String>,
    }

    impl RecordingSys {
        fn record(&mut self, call: String) -> Result<(), String> {
            let refused = self.fail_on.as_ref().is_some_and(|f| call.contains(f));
            self.calls.push(call);
            if refused {
                Err("refused by the test double".into())
            } else {
                Ok(())
            }
        }
    }

    fn flag_names(flags: MsFlags) -> String {
        flags
            .iter_names()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    impl Sys for RecordingSys {
        fn mount(
            &mut self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> Result<(), String> {
            let mut line = format!(
                "mount {} on {}",
                source.map_or("none".into(), |s| s.display().to_string()),
                target.display()
            );
            if let Some(t) = fstype {
                line += &format!(" type {t}");
            }
            if !flags.is_empty() {
                line += &format!(" flags {}", flag_names(flags));
            }
            if let Some(d) = data {
                line += &format!(" data {d}");
            }
            self.record(line)
        }

        fn mount_inside(
            &mut self,
            root: &Path,
            inside: &str,
            fstype: &str,
            _flags: MsFlags,
            _data: Option<&str>,
        ) -> Result<(), String> {
            self.record(format!(
                "mount {fstype} inside {} at {inside}",
                root.display()
            ))
        }

        fn bind_inside(
            &mut self,
            root: &Path,
            inside: &str,
            kind: NodeKind,
            source: &Path,
            read_only: bool,
        ) -> Result<(), String> {
            self.record(format!(
                "bind {} inside {} at {inside} ({kind:?}, {})",
                source.display(),
                root.display(),
                if read_only { "ro" } else { "rw" }
            ))
        }

        fn symlink_inside(
            &mut self,
            root: &Path,
            inside: &str,
            target: &str,
        ) -> Result<(), String> {
            self.record(format!(
                "symlink inside {} at {inside} -> {target}",
                root.display()
            ))
        }

        fn ensure_dir_inside(&mut self, root: &Path, inside: &str) -> Result<(), String> {
            self.record(format!("ensure dir inside {} at {inside}", root.display()))
        }

        fn write_inside(&mut self, root: &Path, inside: &str, data: &[u8]) -> Result<(), String> {
            self.record(format!(
                "write inside {} at {inside}: {}",
                root.display(),
                String::from_utf8_lossy(data)
            ))
        }

        fn sethostname(&mut self, name: &str) -> Result<(), String> {
            self.record(format!("sethostname {name}"))
        }

        fn pivot_root(&mut self, root: &Path) -> Result<(), String> {
            self.record(format!("pivot_root {}", root.display()))
        }
    }
}
