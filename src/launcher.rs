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

/// ELF `e_machine` values.
pub const EM_386: u16 = 3;
pub const EM_ARM: u16 = 40;
pub const EM_X86_64: u16 = 62;
pub const EM_PPC64: u16 = 21;
pub const EM_S390: u16 = 22;
pub const EM_AARCH64: u16 = 183;
pub const EM_RISCV: u16 = 243;

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

/// The ELF machine and class (32 or 64 bits) that run `platform`'s programs.
pub fn elf_machine_for(platform: &Platform) -> Result<(u16, u8), String> {
    if platform.os != "linux" {
        return Err(format!(
            "launchers are ELF programs for linux, not for {}",
            platform.os
        ));
    }
    match platform.arch.as_str() {
        "amd64" => Ok((EM_X86_64, 64)),
        "arm64" => Ok((EM_AARCH64, 64)),
        "arm" => Ok((EM_ARM, 32)),
        "386" => Ok((EM_386, 32)),
        "ppc64le" => Ok((EM_PPC64, 64)),
        "s390x" => Ok((EM_S390, 64)),
        "riscv64" => Ok((EM_RISCV, 64)),
        other => Err(format!(
            "lathe knows no ELF machine for architecture {other}"
        )),
    }
}

/// A readable name for an ELF machine: the platform lathe knows it as, or its number.
pub fn machine_name(machine: u16, class: u8) -> String {
    match (machine, class) {
        (EM_X86_64, _) => "linux/amd64".into(),
        (EM_AARCH64, _) => "linux/arm64".into(),
        (EM_ARM, _) => "linux/arm".into(),
        (EM_386, _) => "linux/386".into(),
        (EM_PPC64, _) => "linux/ppc64le".into(),
        (EM_S390, _) => "linux/s390x".into(),
        (EM_RISCV, 64) => "linux/riscv64".into(),
        (other, class) => format!("ELF machine {other} ({class}-bit)"),
    }
}

/// What lathe reads from an ELF header and its program headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// 32 or 64.
    pub class: u8,
    pub little_endian: bool,
    pub machine: u16,
    /// `e_type`: 2 executable, 3 shared object (PIE).
    pub kind: u16,
    /// `p_type` of each program header.
    pub segments: Vec<u32>,
}

pub const PT_DYNAMIC: u32 = 2;
pub const PT_INTERP: u32 = 3;

impl ElfInfo {
    /// A static program: no interpreter, no dynamic section (so no shared libraries).
    pub fn is_static(&self) -> bool {
        !self.segments.contains(&PT_INTERP) && !self.segments.contains(&PT_DYNAMIC)
    }
}

/// Reads the ELF header and program header types of `bytes`.
pub fn read_elf(bytes: &[u8]) -> Result<ElfInfo, String> {
    if bytes.len() < 52 || &bytes[..4] != b"\x7fELF" {
        return Err("it is not an ELF file".into());
    }
    let class = match bytes[4] {
        1 => 32,
        2 => 64,
        other => return Err(format!("unknown ELF class {other}")),
    };
    let little_endian = match bytes[5] {
        1 => true,
        2 => false,
        other => return Err(format!("unknown ELF data encoding {other}")),
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(if little_endian {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(if little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let u64_at = |at: usize| -> Option<u64> {
        let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
        Some(if little_endian {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let truncated = || "its ELF header is truncated".to_string();
    let kind = u16_at(16).ok_or_else(truncated)?;
    let machine = u16_at(18).ok_or_else(truncated)?;
    let (phoff, phentsize, phnum) = if class == 64 {
        (
            u64_at(32).ok_or_else(truncated)?,
            u16_at(54).ok_or_else(truncated)?,
            u16_at(56).ok_or_else(truncated)?,
        )
    } else {
        (
            u64::from(u32_at(28).ok_or_else(truncated)?),
            u16_at(42).ok_or_else(truncated)?,
            u16_at(44).ok_or_else(truncated)?,
        )
    };
    let mut segments = Vec::new();
    for n in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(n * u64::from(phentsize))
            .and_then(|at| usize::try_from(at).ok())
            .ok_or_else(|| "its program headers are out of range".to_string())?;
        segments.push(u32_at(at).ok_or_else(|| "its program headers are truncated".to_string())?);
    }
    Ok(ElfInfo {
        class,
        little_endian,
        machine,
        kind,
        segments,
    })
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
    let (wanted_machine, wanted_class) =
        elf_machine_for(platform).map_err(|why| LauncherError::UnknownMachine {
            platform: platform.clone(),
            why,
        })?;
    let elf = read_elf(bytes).map_err(|why| LauncherError::NotElf {
        path: path.to_path_buf(),
        platform: platform.clone(),
        why,
    })?;
    if elf.machine != wanted_machine || elf.class != wanted_class {
        return Err(LauncherError::WrongMachine {
            path: path.to_path_buf(),
            platform: platform.clone(),
            found: machine_name(elf.machine, elf.class),
            found_machine: elf.machine,
            wanted_machine,
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
