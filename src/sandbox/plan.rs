//! What the sandbox's init process does to its new mount namespace, as data: [`plan`] turns a
//! spec into a list of [`Step`]s and [`apply`] performs them through the [`Sys`] seam, so the
//! order and contents of every mount can be checked without privileges.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::sys::{NodeKind, Sys};
use super::{Bind, Emulator, RootFs, SandboxSpec};

/// Device nodes bind-mounted from the host into the sandbox's fresh /dev.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// One action on the new mount namespace. Paths named `inside` are absolute paths in the new
/// root, resolved inside it (never by joining strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stop mount events from reaching the host.
    MakeAllPrivate,
    /// The writable root: an overlay of the read-only tree.
    MountOverlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        merged: PathBuf,
    },
    /// The writable root: a private copy, bound onto itself so it can be pivoted into.
    BindRootOntoItself {
        root: PathBuf,
    },
    /// A filesystem mounted at `inside` (created as a directory when missing).
    Mount {
        fstype: &'static str,
        inside: String,
        flags: MsFlags,
        data: Option<String>,
    },
    /// A host file or directory bound at `inside` (created as the same kind when missing).
    Bind {
        source: PathBuf,
        inside: String,
        kind: NodeKind,
        read_only: bool,
    },
    /// A symlink created at `inside`.
    Symlink {
        inside: String,
        target: String,
    },
    /// A directory created at `inside` when missing (the working directory).
    EnsureDir {
        inside: String,
    },
    /// binfmt_misc mounted inside the new /proc with this emulator registered, flags `PF`.
    RegisterEmulator(Emulator),
    SetHostname(String),
    /// pivot_root into the new root and detach the old one.
    PivotRoot,
}

/// The steps for `spec`, in order.
pub fn plan(spec: &SandboxSpec) -> Vec<Step> {
    let mut steps = vec![Step::MakeAllPrivate];
    steps.push(match &spec.rootfs {
        RootFs::Overlay {
            lower,
            upper,
            work,
            merged,
        } => Step::MountOverlay {
            lower: lower.clone(),
            upper: upper.clone(),
            work: work.clone(),
            merged: merged.clone(),
        },
        RootFs::Private(root) => Step::BindRootOntoItself { root: root.clone() },
    });
    let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    steps.push(Step::Mount {
        fstype: "proc",
        inside: "/proc".into(),
        flags: quiet,
        data: None,
    });
    steps.push(Step::Mount {
        fstype: "tmpfs",
        inside: "/dev".into(),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        data: Some("mode=755,size=65536k".into()),
    });
    for device in DEVICES {
        steps.push(Step::Bind {
            source: PathBuf::from(format!("/dev/{device}")),
            inside: format!("/dev/{device}"),
            kind: NodeKind::File,
            read_only: false,
        });
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        steps.push(Step::Symlink {
            inside: format!("/dev/{name}"),
            target: target.into(),
        });
    }
    steps.push(Step::Mount {
        fstype: "devpts",
        inside: "/dev/pts".into(),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        data: Some("newinstance,ptmxmode=0666,mode=620".into()),
    });
    for tmp in ["/dev/shm", "/tmp"] {
        steps.push(Step::Mount {
            fstype: "tmpfs",
            inside: tmp.into(),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777".into()),
        });
    }
    for file in ["/etc/resolv.conf", "/etc/hosts"] {
        if Path::new(file).is_file() {
            steps.push(Step::Bind {
                source: file.into(),
                inside: file.into(),
                kind: NodeKind::File,
                read_only: true,
            });
        }
    }
    for Bind {
        source,
        target,
        read_only,
    } in &spec.binds
    {
        steps.push(Step::Bind {
            source: source.clone(),
            inside: target.clone(),
            kind: if source.is_dir() {
                NodeKind::Dir
            } else {
                NodeKind::File
            },
            read_only: *read_only,
        });
    }
    steps.push(Step::EnsureDir {
        inside: spec.cwd.clone(),
    });
    if let Some(emulator) = &spec.emulator {
        steps.push(Step::RegisterEmulator(emulator.clone()));
    }
    steps.push(Step::SetHostname(spec.hostname.clone()));
    steps.push(Step::PivotRoot);
    steps
}

/// The step that stopped a plan, and why.
#[derive(Debug)]
pub struct StepFailed {
    pub step: Step,
    pub why: String,
}

impl std::fmt::Display for StepFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", describe(&self.step), self.why)
    }
}

/// Performs `steps` in order; the first failure stops it.
pub fn apply(steps: &[Step], sys: &mut dyn Sys) -> Result<(), StepFailed> {
    let mut root: Option<PathBuf> = None;
    for step in steps {
        apply_step(step, sys, &mut root).map_err(|why| StepFailed {
            step: step.clone(),
            why,
        })?;
    }
    Ok(())
}

/// One step; `root` is the new root once a step has mounted it.
fn apply_step(step: &Step, sys: &mut dyn Sys, root: &mut Option<PathBuf>) -> Result<(), String> {
    let new_root = |root: &Option<PathBuf>| {
        root.clone()
            .ok_or_else(|| "no root mounted yet".to_string())
    };
    match step {
        Step::MakeAllPrivate => sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        ),
        Step::MountOverlay {
            lower,
            upper,
            work,
            merged,
        } => {
            *root = Some(merged.clone());
            overlay_options(lower, upper, work).and_then(|data| {
                sys.mount(
                    Some(Path::new("overlay")),
                    merged,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(&data),
                )
            })
        }
        Step::BindRootOntoItself { root: dir } => {
            *root = Some(dir.clone());
            sys.mount(
                Some(dir),
                dir,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )
        }
        Step::Mount {
            fstype,
            inside,
            flags,
            data,
        } => sys.mount_inside(&new_root(root)?, inside, fstype, *flags, data.as_deref()),
        Step::Bind {
            source,
            inside,
            kind,
            read_only,
        } => sys.bind_inside(&new_root(root)?, inside, *kind, source, *read_only),
        Step::Symlink { inside, target } => sys.symlink_inside(&new_root(root)?, inside, target),
        Step::EnsureDir { inside } => sys.ensure_dir_inside(&new_root(root)?, inside),
        Step::RegisterEmulator(emulator) => {
            let root = new_root(root)?;
            sys.mount_inside(
                &root,
                "/proc/sys/fs/binfmt_misc",
                "binfmt_misc",
                MsFlags::empty(),
                None,
            )
            .and_then(|()| {
                sys.write_inside(
                    &root,
                    "/proc/sys/fs/binfmt_misc/register",
                    emulator.registration()?.as_bytes(),
                )
            })
        }
        Step::SetHostname(name) => sys.sethostname(name),
        Step::PivotRoot => sys.pivot_root(&new_root(root)?),
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::MakeAllPrivate => "making mounts private".into(),
        Step::MountOverlay { lower, .. } => format!("overlay on {}", lower.display()),
        Step::BindRootOntoItself { root } => format!("binding {}", root.display()),
        Step::Mount { fstype, inside, .. } => format!("mounting {fstype} on {inside}"),
        Step::Bind { source, inside, .. } => {
            format!("binding {} on {inside}", source.display())
        }
        Step::Symlink { inside, .. } => format!("symlink {inside}"),
        Step::EnsureDir { inside } => format!("working directory {inside}"),
        Step::RegisterEmulator(e) => format!(
            "registering {} for {} in a private binfmt_misc",
            e.interpreter.display(),
            e.arch
        ),
        Step::SetHostname(_) => "setting the hostname".into(),
        Step::PivotRoot => "pivot_root".into(),
    }
}

/// overlayfs options; `userxattr` because the mount happens inside a user namespace.
fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, String> {
    let mut parts = Vec::new();
    for (key, path) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let text = path
            .to_str()
            .filter(|t| !t.contains([',', ':', '\\']))
            .ok_or_else(|| {
                format!(
                    "{}: overlayfs can't take a path with ',', ':' or '\\'",
                    path.display()
                )
            })?;
        parts.push(format!("{key}={text}"));
    }
    parts.push("userxattr".into());
    Ok(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Network;
    use crate::sandbox::sys::tests::RecordingSys;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            rootfs: RootFs::Overlay {
                lower: "/store/rootfs/abc".into(),
                upper: "/tmp/x/upper".into(),
                work: "/tmp/x/work".into(),
                merged: "/tmp/x/merged".into(),
            },
            binds: vec![Bind {
                source: std::env::temp_dir(),
                target: "/workspace".into(),
                read_only: true,
            }],
            argv: vec!["sh".into()],
            env: vec![],
            cwd: "/workspace".into(),
            uid: 1000,
            gid: 1000,
            network: Network::None,
            emulator: Some(Emulator {
                arch: "arm64".into(),
                interpreter: "/usr/bin/qemu-aarch64-static".into(),
            }),
            hostname: "lathe".into(),
            user_is_caller: false,
            lifecycle: None,
        }
    }

    #[test]
    fn mounts_happen_in_the_new_root_in_order_and_end_with_pivot_root() {
        let mut sys = RecordingSys::default();
        apply(&plan(&spec()), &mut sys).unwrap();
        let calls = sys.calls.join("\n");
        let expected_prefix = [
            "mount none on / flags MS_REC | MS_PRIVATE",
            "mount overlay on /tmp/x/merged type overlay data lowerdir=/store/rootfs/abc,upperdir=/tmp/x/upper,workdir=/tmp/x/work,userxattr",
            "mount proc inside /tmp/x/merged at /proc",
            "mount tmpfs inside /tmp/x/merged at /dev",
            "bind /dev/null inside /tmp/x/merged at /dev/null (File, rw)",
        ];
        assert!(calls.starts_with(&expected_prefix.join("\n")), "{calls}");
        let order: Vec<usize> = [
            "at /dev/pts",
            "at /tmp",
            "at /workspace (Dir, ro)",
            "ensure dir inside /tmp/x/merged at /workspace",
            "mount binfmt_misc inside /tmp/x/merged at /proc/sys/fs/binfmt_misc",
            "write inside /tmp/x/merged at /proc/sys/fs/binfmt_misc/register: :lathe-arm64:M::\\x7fELF\\x02",
            "sethostname lathe",
            "pivot_root /tmp/x/merged",
        ]
        .iter()
        .map(|needle| calls.find(needle).unwrap_or_else(|| panic!("{needle} in {calls}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{calls}");
        assert!(calls.ends_with("pivot_root /tmp/x/merged"));
    }

    #[test]
    fn a_failing_step_stops_the_plan_and_is_named() {
        let mut sys = RecordingSys {
            fail_on: Some("/workspace".into()),
            ..Default::default()
        };
        let err = apply(&plan(&spec()), &mut sys).unwrap_err().to_string();
        assert!(err.contains("on /workspace"), "{err}");
        assert!(!sys.calls.iter().any(|c| c.starts_with("pivot_root")));
    }

    #[test]
    fn overlay_refuses_paths_it_cannot_express() {
        let err = overlay_options(Path::new("/a,b"), Path::new("/u"), Path::new("/w")).unwrap_err();
        assert!(err.contains("/a,b"), "{err}");
    }
}
