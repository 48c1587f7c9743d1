//! The CNB launcher that goes into builders and app images at `/cnb/lifecycle/launcher`:
//! lathe's own (the `launcher/` crate, built static for linux/amd64 and linux/arm64 by
//! `launcher/build.sh` and embedded here, so that lathe needs nothing from outside for the
//! platforms it builds for), and the choice between it and others, per platform, in this
//! order: a `--launcher PLATFORM=PATH` flag, the builder's own launcher for that platform,
//! lathe's. Whatever the source, a launcher whose ELF machine is not the platform's is
//! refused, naming the file.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::platform::Platform;

/// lathe's launcher for linux/amd64 (static, stripped; see `launcher/build.sh`).
pub static LATHE_LAUNCHER_AMD64: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/launcher/bin/launcher-amd64"
));
/// lathe's launcher for linux/arm64.
pub static LATHE_LAUNCHER_ARM64: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/launcher/bin/launcher-arm64"
));

// The ELF reading is shared with the layer checks; these names are kept here for the
// launcher's callers.
pub use crate::elfcheck::{
    EM_386, EM_AARCH64, EM_ARM, EM_PPC64, EM_RISCV, EM_S390, EM_X86_64, ElfInfo, ElfMachine,
    PT_DYNAMIC, PT_INTERP, read_elf,
};

/// Where a launcher came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LauncherSource {
    /// `--launcher PLATFORM=PATH`.
    Flag(PathBuf),
    /// The builder's `/cnb/lifecycle/launcher`, read into this file.
    Builder(PathBuf),
    /// lathe's own, embedded.
    Lathe,
}

impl fmt::Display for LauncherSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LauncherSource::Flag(path) => write!(f, "--launcher {}", path.display()),
            LauncherSource::Builder(path) => write!(
                f,
                "the builder's /cnb/lifecycle/launcher ({})",
                path.display()
            ),
            LauncherSource::Lathe => write!(f, "lathe's own launcher"),
        }
    }
}

/// The launcher chosen for one platform.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub platform: Platform,
    pub bytes: Cow<'static, [u8]>,
    pub source: LauncherSource,
}

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("{path}: cannot read the launcher: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{path} is not a launcher for {platform}: {why}")]
    NotElf {
        path: PathBuf,
        platform: Platform,
        why: String,
    },
    #[error(
        "{path} is a launcher for {found} (ELF machine {found_machine}), not for {platform} \
         (ELF machine {wanted_machine})"
    )]
    WrongMachine {
        path: PathBuf,
        platform: Platform,
        found: String,
        found_machine: u16,
        wanted_machine: u16,
    },
    #[error(
        "lathe has no launcher for {platform} (it has linux/amd64 and linux/arm64): give one \
         with --launcher {platform}=PATH"
    )]
    NoLauncher { platform: Platform },
    #[error("{platform}: {why}")]
    UnknownMachine { platform: Platform, why: String },
    /// `--launcher` flags that do not fit the platforms being made.
    #[error("{0}")]
    Flags(String),
}

/// lathe's own launcher for `platform`, if it has one.
pub fn lathe_launcher(platform: &Platform) -> Option<&'static [u8]> {
    match (platform.os.as_str(), platform.arch.as_str()) {
        ("linux", "amd64") => Some(LATHE_LAUNCHER_AMD64),
        ("linux", "arm64") => Some(LATHE_LAUNCHER_ARM64),
        _ => None,
    }
}

/// Refuses `bytes` (the launcher at `path`) unless it is an ELF program for `platform`.
pub fn check_launcher(platform: &Platform, path: &Path, bytes: &[u8]) -> Result<(), LauncherError> {
    let wanted =
        ElfMachine::for_platform(platform).map_err(|why| LauncherError::UnknownMachine {
            platform: platform.clone(),
            why,
        })?;
    let elf = read_elf(bytes).map_err(|why| LauncherError::NotElf {
        path: path.to_path_buf(),
        platform: platform.clone(),
        why,
    })?;
    let found = elf.elf_machine();
    if found != wanted {
        return Err(LauncherError::WrongMachine {
            path: path.to_path_buf(),
            platform: platform.clone(),
            found: found.to_string(),
            found_machine: found.machine,
            wanted_machine: wanted.machine,
        });
    }
    Ok(())
}

/// The launcher for `platform`: the `--launcher` file `flag`, else the builder's
/// (`builder_launcher`, a file holding the builder's `/cnb/lifecycle/launcher` for that
/// platform), else lathe's own. The one chosen must be an ELF program for the platform.
pub fn choose_launcher(
    platform: &Platform,
    flag: Option<&Path>,
    builder_launcher: Option<&Path>,
) -> Result<Launcher, LauncherError> {
    let (path, source) = match (flag, builder_launcher) {
        (Some(path), _) => (path, LauncherSource::Flag(path.to_path_buf())),
        (None, Some(path)) => (path, LauncherSource::Builder(path.to_path_buf())),
        (None, None) => {
            let bytes = lathe_launcher(platform).ok_or_else(|| LauncherError::NoLauncher {
                platform: platform.clone(),
            })?;
            return Ok(Launcher {
                platform: platform.clone(),
                bytes: Cow::Borrowed(bytes),
                source: LauncherSource::Lathe,
            });
        }
    };
    let bytes = std::fs::read(path).map_err(|e| LauncherError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    check_launcher(platform, path, &bytes)?;
    Ok(Launcher {
        platform: platform.clone(),
        bytes: Cow::Owned(bytes),
        source,
    })
}

/// A `--launcher PLATFORM=PATH` value (clap's value parser).
pub fn parse_launcher_arg(text: &str) -> Result<(Platform, PathBuf), String> {
    let (platform, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected PLATFORM=PATH, e.g. linux/arm64=./launcher"))?;
    let platform: Platform = platform.parse().map_err(|e| format!("{e}"))?;
    if path.is_empty() {
        return Err(format!("{text:?}: the launcher path is empty"));
    }
    Ok((platform, PathBuf::from(path)))
}

/// The `--launcher` file given for `platform`, if any.
pub fn flag_for<'a>(flags: &'a [(Platform, PathBuf)], platform: &Platform) -> Option<&'a Path> {
    flags
        .iter()
        .find(|(p, _)| p == platform)
        .map(|(_, path)| path.as_path())
}

/// Refuses `--launcher` flags that name a platform twice or one not in `platforms`.
pub fn check_flags(
    flags: &[(Platform, PathBuf)],
    platforms: &[Platform],
) -> Result<(), LauncherError> {
    for (n, (platform, path)) in flags.iter().enumerate() {
        if flags[..n].iter().any(|(p, _)| p == platform) {
            return Err(LauncherError::Flags(format!(
                "--launcher names {platform} more than once"
            )));
        }
        if !platforms.contains(platform) {
            let list: Vec<String> = platforms.iter().map(Platform::to_string).collect();
            return Err(LauncherError::Flags(format!(
                "--launcher {platform}={}: the image is made for {} only",
                path.display(),
                list.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(text: &str) -> Platform {
        text.parse().unwrap()
    }

    #[test]
    fn lathes_launchers_are_static_small_and_for_their_machine() {
        for (arch, bytes, machine) in [
            ("amd64", LATHE_LAUNCHER_AMD64, EM_X86_64),
            ("arm64", LATHE_LAUNCHER_ARM64, EM_AARCH64),
        ] {
            let elf = read_elf(bytes).unwrap();
            assert_eq!((elf.machine, elf.class), (machine, 64), "{arch}");
            assert!(elf.little_endian, "{arch}");
            assert!(
                !elf.segments.contains(&PT_INTERP),
                "{arch}: an interpreter (PT_INTERP)"
            );
            assert!(
                !elf.segments.contains(&PT_DYNAMIC),
                "{arch}: a dynamic section (PT_DYNAMIC), so possibly DT_NEEDED libraries"
            );
            assert!(elf.is_static());
            assert!(bytes.len() < 2 << 20, "{arch}: {} bytes", bytes.len());
            let p = platform(&format!("linux/{arch}"));
            assert_eq!(lathe_launcher(&p), Some(bytes));
            check_launcher(&p, Path::new("embedded"), bytes).unwrap();
        }
    }

    #[test]
    fn the_flag_wins_then_the_builders_then_lathes() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag");
        let builder = dir.path().join("builder");
        std::fs::write(&flag, LATHE_LAUNCHER_ARM64).unwrap();
        std::fs::write(&builder, LATHE_LAUNCHER_ARM64).unwrap();
        let arm64 = platform("linux/arm64/v8");
        let chosen = choose_launcher(&arm64, Some(&flag), Some(&builder)).unwrap();
        assert_eq!(chosen.source, LauncherSource::Flag(flag.clone()));
        let chosen = choose_launcher(&arm64, None, Some(&builder)).unwrap();
        assert_eq!(chosen.source, LauncherSource::Builder(builder.clone()));
        assert_eq!(&*chosen.bytes, LATHE_LAUNCHER_ARM64);
        let chosen = choose_launcher(&arm64, None, None).unwrap();
        assert_eq!(chosen.source, LauncherSource::Lathe);
        assert_eq!(&*chosen.bytes, LATHE_LAUNCHER_ARM64);
    }

    #[test]
    fn a_launcher_for_another_machine_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let wrong = dir.path().join("launcher-amd64");
        std::fs::write(&wrong, LATHE_LAUNCHER_AMD64).unwrap();
        let err = choose_launcher(&platform("linux/arm64"), Some(&wrong), None).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, LauncherError::WrongMachine { .. })
                && text.contains(&wrong.display().to_string())
                && text.contains("linux/amd64 (ELF machine 62)")
                && text.contains("not for linux/arm64 (ELF machine 183)"),
            "{text}"
        );
        let err = choose_launcher(
            &platform("linux/amd64"),
            None,
            Some(&wrong.with_extension("x")),
        )
        .unwrap_err();
        assert!(matches!(err, LauncherError::Read { .. }), "{err}");
        let script = dir.path().join("script");
        std::fs::write(&script, b"#!/bin/sh\necho not a launcher\n").unwrap();
        let err = choose_launcher(&platform("linux/amd64"), Some(&script), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("script is not a launcher for linux/amd64"),
            "{err}"
        );
        // An arm (32-bit) platform is not arm64.
        std::fs::write(&wrong, LATHE_LAUNCHER_ARM64).unwrap();
        let err = choose_launcher(&platform("linux/arm/v7"), Some(&wrong), None).unwrap_err();
        assert!(
            err.to_string().contains("is a launcher for linux/arm64"),
            "{err}"
        );
    }

    #[test]
    fn platforms_without_a_lathe_launcher_need_one_given() {
        let err = choose_launcher(&platform("linux/s390x"), None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lathe has no launcher for linux/s390x (it has linux/amd64 and linux/arm64): give \
             one with --launcher linux/s390x=PATH"
        );
        let err = check_launcher(
            &platform("windows/amd64"),
            Path::new("x"),
            LATHE_LAUNCHER_AMD64,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not for windows"), "{err}");
    }

    #[test]
    fn launcher_flags_parse_and_are_checked_against_the_platforms() {
        let (p, path) = parse_launcher_arg("linux/arm64=./bin/launcher").unwrap();
        assert_eq!(
            (p.to_string(), path),
            ("linux/arm64".into(), "./bin/launcher".into())
        );
        assert!(
            parse_launcher_arg("linux/arm64")
                .unwrap_err()
                .contains("PLATFORM=PATH")
        );
        assert!(
            parse_launcher_arg("linux=x")
                .unwrap_err()
                .contains("invalid platform")
        );
        assert!(
            parse_launcher_arg("linux/amd64=")
                .unwrap_err()
                .contains("empty")
        );
        let flags = vec![
            parse_launcher_arg("linux/amd64=a").unwrap(),
            parse_launcher_arg("linux/arm64/v8=b").unwrap(),
        ];
        let both = [platform("linux/amd64"), platform("linux/arm64")];
        check_flags(&flags, &both).unwrap();
        assert_eq!(flag_for(&flags, &both[1]), Some(Path::new("b")));
        let err = check_flags(&flags, &both[..1]).unwrap_err().to_string();
        assert!(err.contains("linux/amd64 only"), "{err}");
        let twice = vec![flags[0].clone(), flags[0].clone()];
        let err = check_flags(&twice, &both).unwrap_err().to_string();
        assert!(err.contains("more than once"), "{err}");
    }
}
