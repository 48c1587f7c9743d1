//! ELF headers, and checking what goes into an image against the machine it is made for.
//!
//! This module owns lathe's reading of ELF headers (class, byte order, `e_type`, `e_machine`,
//! program header types; [`read_elf`], used for launchers too), the ELF machine each platform
//! runs ([`ElfMachine::for_platform`]), and the checks that make re-layering a build onto
//! another platform's run image safe (issue 9):
//!
//! - [`check_tree`] and [`check_tar`]: every ELF executable and shared object in a layer
//!   directory on disk, or in an uncompressed layer tar stream, whose machine is not the
//!   target's, named by its path relative to the layer.
//! - [`find_elf`] and [`find_elf_in_tar`]: the first ELF executable or shared object in a
//!   layer, if any (for `--cross-strategy auto`, which reuses one build's layers for every
//!   target only when they hold no ELF programs).
//!
//! Files are recognised by their first bytes, never by name: a file is an ELF program when
//! it starts with `\x7fELF` and its header says executable (`ET_EXEC`) or shared object
//! (`ET_DYN`: shared libraries and PIE programs). Only the first 64 bytes of each regular file
//! are read. No symlink is followed (a symlink to a program is not a program; its target is
//! checked where it is, if it is in the layer), and fifos, sockets and devices are never
//! opened. A file that starts with the ELF magic but whose header is cut short or unknown
//! cannot be run on any machine; it is listed as malformed, not as foreign. The check knows
//! machines, not variants: `linux/arm/v6` and `linux/arm/v7` programs look alike here.
//!
//! Trees are walked and read by several threads (a shared queue of directories); the result
//! does not depend on their number or order. Each directory is opened by its path and its
//! files relative to it, so a directory whose path is longer than `PATH_MAX` (4096 bytes) is
//! an error naming it, as it is for the layer writer, never a part of the tree skipped. The
//! tree must not change while it is checked (it is the build's own output by then).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::platform::Platform;

/// ELF `e_machine` values.
pub const EM_386: u16 = 3;
pub const EM_MIPS: u16 = 8;
pub const EM_PPC64: u16 = 21;
pub const EM_S390: u16 = 22;
pub const EM_ARM: u16 = 40;
pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;
pub const EM_RISCV: u16 = 243;
pub const EM_LOONGARCH: u16 = 258;

/// ELF `e_type` values.
pub const ET_REL: u16 = 1;
pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;

/// ELF program header types.
pub const PT_DYNAMIC: u32 = 2;
pub const PT_INTERP: u32 = 3;

/// How many bytes of a file the checks read: a whole 64-bit ELF header.
pub const HEAD_LEN: usize = 64;

/// The machine an ELF file is for: `e_machine`, class and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElfMachine {
    pub machine: u16,
    /// 32 or 64.
    pub class: u8,
    pub little_endian: bool,
}

/// Linux architectures (Go's names, as image configs use them) and their ELF machines.
const LINUX_MACHINES: &[(&str, ElfMachine)] = &[
    ("amd64", ElfMachine::new(EM_X86_64, 64, true)),
    ("arm64", ElfMachine::new(EM_AARCH64, 64, true)),
    ("arm", ElfMachine::new(EM_ARM, 32, true)),
    ("386", ElfMachine::new(EM_386, 32, true)),
    ("ppc64le", ElfMachine::new(EM_PPC64, 64, true)),
    ("ppc64", ElfMachine::new(EM_PPC64, 64, false)),
    ("s390x", ElfMachine::new(EM_S390, 64, false)),
    ("riscv64", ElfMachine::new(EM_RISCV, 64, true)),
    ("loong64", ElfMachine::new(EM_LOONGARCH, 64, true)),
    ("mips64le", ElfMachine::new(EM_MIPS, 64, true)),
    ("mips64", ElfMachine::new(EM_MIPS, 64, false)),
    ("mipsle", ElfMachine::new(EM_MIPS, 32, true)),
    ("mips", ElfMachine::new(EM_MIPS, 32, false)),
];

impl ElfMachine {
    pub const fn new(machine: u16, class: u8, little_endian: bool) -> ElfMachine {
        ElfMachine {
            machine,
            class,
            little_endian,
        }
    }

    /// The ELF machine that runs `platform`'s programs (its variant is not looked at).
    pub fn for_platform(platform: &Platform) -> Result<ElfMachine, String> {
        if platform.os != "linux" {
            return Err(format!(
                "ELF programs are for linux, not for {}",
                platform.os
            ));
        }
        LINUX_MACHINES
            .iter()
            .find(|(arch, _)| *arch == platform.arch)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!(
                    "lathe knows no ELF machine for architecture {}",
                    platform.arch
                )
            })
    }

    /// The platform this machine's programs run on, when lathe knows one.
    pub fn platform(&self) -> Option<Platform> {
        LINUX_MACHINES
            .iter()
            .find(|(_, m)| m == self)
            .map(|(arch, _)| Platform::new("linux", arch, None))
    }
}

/// `linux/amd64`, or `ELF machine 62 (32-bit, little-endian)` for a machine lathe has no
/// platform for.
impl fmt::Display for ElfMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.platform() {
            Some(p) => write!(f, "{p}"),
            None => write!(
                f,
                "ELF machine {} ({}-bit, {})",
                self.machine,
                self.class,
                if self.little_endian {
                    "little-endian"
                } else {
                    "big-endian"
                }
            ),
        }
    }
}

/// The fields of an ELF file header lathe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfHeader {
    pub machine: ElfMachine,
    /// `e_type`: [`ET_EXEC`], [`ET_DYN`] (shared object or PIE program), [`ET_REL`], …
    pub kind: u16,
    pub phoff: u64,
    pub phentsize: u16,
    pub phnum: u16,
}

impl ElfHeader {
    /// An executable or a shared object (including PIE programs): something a kernel or a
    /// dynamic loader maps, as opposed to an object file or a core dump.
    pub fn is_program(&self) -> bool {
        matches!(self.kind, ET_EXEC | ET_DYN)
    }
}

/// Whether `bytes` start with the ELF magic.
pub fn has_elf_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn u16_at(bytes: &[u8], at: usize, little_endian: bool) -> Option<u16> {
    let b: [u8; 2] = bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(if little_endian {
        u16::from_le_bytes(b)
    } else {
        u16::from_be_bytes(b)
    })
}

fn u32_at(bytes: &[u8], at: usize, little_endian: bool) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little_endian {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

fn u64_at(bytes: &[u8], at: usize, little_endian: bool) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(if little_endian {
        u64::from_le_bytes(b)
    } else {
        u64::from_be_bytes(b)
    })
}

/// Reads the ELF file header at the start of `bytes` (52 bytes for 32-bit files, 64 for
/// 64-bit ones; what follows is not needed).
pub fn read_elf_header(bytes: &[u8]) -> Result<ElfHeader, String> {
    if !has_elf_magic(bytes) {
        return Err("it is not an ELF file".into());
    }
    let truncated = || format!("its ELF header is truncated ({} bytes)", bytes.len());
    let class = match *bytes.get(4).ok_or_else(truncated)? {
        1 => 32,
        2 => 64,
        other => return Err(format!("unknown ELF class {other}")),
    };
    let little_endian = match *bytes.get(5).ok_or_else(truncated)? {
        1 => true,
        2 => false,
        other => return Err(format!("unknown ELF data encoding {other}")),
    };
    let header_len = if class == 64 { 64 } else { 52 };
    if bytes.len() < header_len {
        return Err(truncated());
    }
    let le = little_endian;
    // Both are in range: the header's length was checked above.
    let half = |at| u16_at(bytes, at, le).unwrap_or_default();
    let (phoff, phentsize, phnum) = if class == 64 {
        (
            u64_at(bytes, 32, le).unwrap_or_default(),
            half(54),
            half(56),
        )
    } else {
        (
            u64::from(u32_at(bytes, 28, le).unwrap_or_default()),
            half(42),
            half(44),
        )
    };
    Ok(ElfHeader {
        machine: ElfMachine::new(half(18), class, little_endian),
        kind: half(16),
        phoff,
        phentsize,
        phnum,
    })
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

impl ElfInfo {
    /// A static program: no interpreter, no dynamic section (so no shared libraries).
    pub fn is_static(&self) -> bool {
        !self.segments.contains(&PT_INTERP) && !self.segments.contains(&PT_DYNAMIC)
    }

    pub fn elf_machine(&self) -> ElfMachine {
        ElfMachine::new(self.machine, self.class, self.little_endian)
    }
}

/// Reads the ELF header and the program header types of the whole file `bytes`.
pub fn read_elf(bytes: &[u8]) -> Result<ElfInfo, String> {
    let header = read_elf_header(bytes)?;
    let le = header.machine.little_endian;
    let mut segments = Vec::new();
    for n in 0..u64::from(header.phnum) {
        let at = header
            .phoff
            .checked_add(n * u64::from(header.phentsize))
            .and_then(|at| usize::try_from(at).ok())
            .ok_or_else(|| "its program headers are out of range".to_string())?;
        segments.push(
            u32_at(bytes, at, le).ok_or_else(|| "its program headers are truncated".to_string())?,
        );
    }
    Ok(ElfInfo {
        class: header.machine.class,
        little_endian: header.machine.little_endian,
        machine: header.machine.machine,
        kind: header.kind,
        segments,
    })
}

/// What the first bytes of a file make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    NotElf,
    Elf(ElfHeader),
    /// The ELF magic, then a header cut short or with an unknown class or byte order.
    Malformed(String),
}

/// Classifies a file by its first bytes (up to [`HEAD_LEN`] are looked at).
pub fn classify(head: &[u8]) -> Head {
    if !has_elf_magic(head) {
        return Head::NotElf;
    }
    match read_elf_header(head) {
        Ok(header) => Head::Elf(header),
        Err(why) => Head::Malformed(why),
    }
}

/// An ELF program in a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfFile {
    /// Relative to the layer (a tar entry's name without a leading `/` or `./`).
    pub path: PathBuf,
    pub header: ElfHeader,
}

/// What [`check_tree`] or [`check_tar`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfReport {
    pub target: Platform,
    pub wanted: ElfMachine,
    /// Regular files looked at.
    pub files: u64,
    /// ELF executables and shared objects among them, of any machine.
    pub programs: u64,
    /// The programs for another machine than `wanted`, sorted by path.
    pub foreign: Vec<ElfFile>,
    /// Files with the ELF magic and a header cut short or unknown, with why, sorted by path.
    pub malformed: Vec<(PathBuf, String)>,
}

impl ElfReport {
    /// Ok when no program is for another machine; otherwise an error naming `what` (the
    /// layer, e.g. "layer lathe-test/x:bin") and every foreign file.
    pub fn require_target(self, what: &str) -> Result<ElfReport, ElfCheckError> {
        if self.foreign.is_empty() {
            return Ok(self);
        }
        Err(ElfCheckError::Foreign {
            what: what.to_string(),
            target: self.target,
            wanted: self.wanted,
            files: self.foreign,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ElfCheckError {
    #[error("{0}")]
    Target(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the layer tar: {0}")]
    Tar(#[source] io::Error),
    #[error("{}", foreign_message(what, target, wanted, files))]
    Foreign {
        what: String,
        target: Platform,
        wanted: ElfMachine,
        files: Vec<ElfFile>,
    },
}

fn foreign_message(
    what: &str,
    target: &Platform,
    wanted: &ElfMachine,
    files: &[ElfFile],
) -> String {
    let mut text = format!(
        "{what} holds {} program{} for another machine than {target} ({}):",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        describe(wanted)
    );
    for file in files {
        text.push_str(&format!(
            "\n  {}: {} ({})",
            file.path.display(),
            file.header.machine,
            describe(&file.header.machine)
        ));
    }
    text
}

/// `ELF machine 62, 64-bit`.
fn describe(m: &ElfMachine) -> String {
    format!("ELF machine {}, {}-bit", m.machine, m.class)
}

/// How a tree is scanned.
#[derive(Debug, Clone, Copy)]
pub struct ScanOptions {
    /// Threads that list directories and read files (at least 1).
    pub threads: usize,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        // Reading 64 bytes of a file the build just wrote is system calls on the page
        // cache: CPU-bound (about 7 µs of CPU a file), so one thread per core. On an idle
        // 2-core VM, benches/elfcheck.rs over 20k files of /usr: 135-141k files/s with one
        // thread, 259-267k with 2, no more with 4 or 8.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        ScanOptions {
            threads: cpus.clamp(1, 8),
        }
    }
}

/// Checks every ELF program below `root` (a layer directory) against `target`.
pub fn check_tree(root: &Path, target: &Platform) -> Result<ElfReport, ElfCheckError> {
    check_tree_with(root, target, ScanOptions::default())
}

pub fn check_tree_with(
    root: &Path,
    target: &Platform,
    options: ScanOptions,
) -> Result<ElfReport, ElfCheckError> {
    let wanted = ElfMachine::for_platform(target).map_err(ElfCheckError::Target)?;
    let mut report = new_report(target, wanted);
    let found = scan_tree(root, options, &|_, _| false)?;
    for part in found {
        merge(&mut report, part);
    }
    finish(&mut report);
    Ok(report)
}

/// The first ELF executable or shared object below `root` (of any machine; relative path),
/// if there is one. Stops at the first one found.
pub fn find_elf(root: &Path) -> Result<Option<PathBuf>, ElfCheckError> {
    find_elf_with(root, ScanOptions::default())
}

pub fn find_elf_with(root: &Path, options: ScanOptions) -> Result<Option<PathBuf>, ElfCheckError> {
    let found = scan_tree(root, options, &|_, header| header.is_program())?;
    // Several threads may each have found one before stopping: the first by name is
    // reported, so that the answer does not depend on timing more than it must.
    Ok(found
        .into_iter()
        .filter_map(|part| part.first_program)
        .min())
}

/// Checks every ELF program in an uncompressed layer tar read from `tar` against `target`.
/// Entries are named as the tar names them, without a leading `/` or `./`. Hard links are
/// not read again (their target is an earlier entry).
pub fn check_tar<R: Read>(tar: R, target: &Platform) -> Result<ElfReport, ElfCheckError> {
    let wanted = ElfMachine::for_platform(target).map_err(ElfCheckError::Target)?;
    let mut report = new_report(target, wanted);
    let mut part = Partial::default();
    scan_tar(tar, &mut part, &|_, _| false)?;
    merge(&mut report, part);
    finish(&mut report);
    Ok(report)
}

/// The first ELF executable or shared object in an uncompressed layer tar, if any.
pub fn find_elf_in_tar<R: Read>(tar: R) -> Result<Option<PathBuf>, ElfCheckError> {
    let mut part = Partial::default();
    scan_tar(tar, &mut part, &|_, header| header.is_program())?;
    Ok(part.first_program)
}

fn new_report(target: &Platform, wanted: ElfMachine) -> ElfReport {
    ElfReport {
        target: target.clone(),
        wanted,
        files: 0,
        programs: 0,
        foreign: Vec::new(),
        malformed: Vec::new(),
    }
}

/// What one thread found.
#[derive(Debug, Default)]
struct Partial {
    files: u64,
    programs: Vec<ElfFile>,
    malformed: Vec<(PathBuf, String)>,
    first_program: Option<PathBuf>,
}

fn merge(report: &mut ElfReport, part: Partial) {
    report.files += part.files;
    report.programs += part.programs.len() as u64;
    report.foreign.extend(
        part.programs
            .into_iter()
            .filter(|f| f.header.machine != report.wanted),
    );
    report.malformed.extend(part.malformed);
}

fn finish(report: &mut ElfReport) {
    report.foreign.sort_by(|a, b| a.path.cmp(&b.path));
    report.malformed.sort();
}

/// Records what `head` (a file's first bytes) is; returns true to stop the scan when `stop`
/// says so for an ELF program.
/// `path` makes the file's path, only for the files that are kept.
fn record(
    part: &mut Partial,
    path: impl FnOnce() -> PathBuf,
    head: &[u8],
    stop: &(dyn Fn(&Path, &ElfHeader) -> bool + Sync),
) -> bool {
    part.files += 1;
    match classify(head) {
        Head::NotElf => false,
        Head::Malformed(why) => {
            part.malformed.push((path(), why));
            false
        }
        Head::Elf(header) if header.is_program() => {
            let path = path();
            if part.first_program.is_none() {
                part.first_program = Some(path.clone());
            }
            let done = stop(&path, &header);
            part.programs.push(ElfFile { path, header });
            done
        }
        Head::Elf(_) => false,
    }
}

/// Reads up to [`HEAD_LEN`] bytes from the start of `reader`.
fn read_head<R: Read>(mut reader: R, buf: &mut [u8; HEAD_LEN]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The directories still to list and how many threads are listing one.
struct Queue {
    dirs: VecDeque<PathBuf>,
    busy: usize,
    /// Threads waiting for a directory: only they are woken, and only as many as there are
    /// directories (a wake-up is a system call even with no one to wake).
    waiting: usize,
}

struct Shared<'a> {
    root: &'a Path,
    queue: Mutex<Queue>,
    more: Condvar,
    stop: AtomicBool,
    error: Mutex<Option<ElfCheckError>>,
    done: &'a (dyn Fn(&Path, &ElfHeader) -> bool + Sync),
}

fn scan_tree(
    root: &Path,
    options: ScanOptions,
    done: &(dyn Fn(&Path, &ElfHeader) -> bool + Sync),
) -> Result<Vec<Partial>, ElfCheckError> {
    let meta = std::fs::symlink_metadata(root).map_err(|source| ElfCheckError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ElfCheckError::Io {
            path: root.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let shared = Shared {
        root,
        queue: Mutex::new(Queue {
            dirs: VecDeque::from([PathBuf::new()]),
            busy: 0,
            waiting: 0,
        }),
        more: Condvar::new(),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        done,
    };
    let threads = options.threads.max(1);
    let parts: Vec<Partial> = if threads == 1 {
        vec![worker(&shared)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| worker(&shared)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an ELF scan thread panicked"))
                .collect()
        })
    };
    if let Some(error) = shared.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(error);
    }
    Ok(parts)
}

fn worker(shared: &Shared) -> Partial {
    let mut part = Partial::default();
    let mut buf = [0u8; HEAD_LEN];
    let mut subdirs = Vec::new();
    loop {
        let dir = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return part;
                }
                if let Some(dir) = queue.dirs.pop_front() {
                    queue.busy += 1;
                    break dir;
                }
                if queue.busy == 0 {
                    return part;
                }
                queue.waiting += 1;
                queue = shared.more.wait(queue).unwrap_or_else(|e| e.into_inner());
                queue.waiting -= 1;
            }
        };
        let outcome = scan_dir(shared, &dir, &mut part, &mut buf, &mut subdirs);
        let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.busy -= 1;
        match outcome {
            Ok(false) => queue.dirs.extend(subdirs.drain(..)),
            Ok(true) => shared.stop.store(true, Ordering::Relaxed),
            Err(error) => {
                shared.stop.store(true, Ordering::Relaxed);
                let mut slot = shared.error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(error);
            }
        }
        subdirs.clear();
        let finished =
            shared.stop.load(Ordering::Relaxed) || (queue.busy == 0 && queue.dirs.is_empty());
        let wake = if finished {
            queue.waiting
        } else {
            queue.waiting.min(queue.dirs.len())
        };
        drop(queue);
        if finished && wake > 0 {
            shared.more.notify_all();
        } else {
            for _ in 0..wake {
                shared.more.notify_one();
            }
        }
    }
}

/// Lists `dir` (relative to the root), reads its regular files and collects its
/// subdirectories; true when the scan is to stop. Files are opened relative to the
/// directory (`openat`), so only directories are looked up by path.
fn scan_dir(
    shared: &Shared,
    dir: &Path,
    part: &mut Partial,
    buf: &mut [u8; HEAD_LEN],
    subdirs: &mut Vec<PathBuf>,
) -> Result<bool, ElfCheckError> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::Mode;

    let full = shared.root.join(dir);
    let io_err = |path: PathBuf| move |source: io::Error| ElfCheckError::Io { path, source };
    // O_NOFOLLOW: a directory replaced by a symlink since it was listed is not followed.
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir_fd =
        open(&full, flags, Mode::empty()).map_err(|e| io_err(full.clone())(io::Error::from(e)))?;
    for entry in std::fs::read_dir(&full).map_err(io_err(full.clone()))? {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let entry = entry.map_err(io_err(full.clone()))?;
        let name = entry.file_name();
        let relative = || dir.join(&name);
        // The directory entry's type where the file system gives one (no stat), else lstat:
        // a symlink is a symlink, never what it points to.
        let kind = entry
            .file_type()
            .map_err(|e| io_err(shared.root.join(relative()))(e))?;
        if kind.is_dir() {
            subdirs.push(relative());
        } else if kind.is_file() {
            // O_NOFOLLOW: a file replaced by a symlink since it was listed is not followed;
            // O_NONBLOCK: nor does one replaced by a fifo hang the scan.
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY;
            let n = openat(&dir_fd, name.as_os_str(), flags, Mode::empty())
                .map_err(io::Error::from)
                .and_then(|fd| read_head(std::fs::File::from(fd), buf))
                .map_err(|e| io_err(shared.root.join(relative()))(e))?;
            if record(part, relative, &buf[..n], shared.done) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn scan_tar<R: Read>(
    tar: R,
    part: &mut Partial,
    done: &(dyn Fn(&Path, &ElfHeader) -> bool + Sync),
) -> Result<(), ElfCheckError> {
    let mut archive = tar::Archive::new(tar);
    let mut buf = [0u8; HEAD_LEN];
    for entry in archive.entries().map_err(ElfCheckError::Tar)? {
        let mut entry = entry.map_err(ElfCheckError::Tar)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let path = layer_relative(&entry.path().map_err(ElfCheckError::Tar)?);
        let n = read_head(&mut entry, &mut buf).map_err(|e| ElfCheckError::Io {
            path: path.clone(),
            source: e,
        })?;
        if record(part, || path, &buf[..n], done) {
            break;
        }
    }
    Ok(())
}

/// A tar entry's name without a leading `/` or `./`.
fn layer_relative(name: &Path) -> PathBuf {
    name.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::{LATHE_LAUNCHER_AMD64, LATHE_LAUNCHER_ARM64};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::sync::OnceLock;

    fn platform(text: &str) -> Platform {
        text.parse().unwrap()
    }

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// The static busybox of the vendored busybox-static .deb for `arch`, extracted once
    /// per test process with `dpkg-deb -x`.
    fn busybox(arch: &str) -> Vec<u8> {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            for arch in ["amd64", "arm64"] {
                let debs: Vec<PathBuf> = std::fs::read_dir(repo().join("testdata/debs"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| {
                        let name = p.file_name().unwrap().to_string_lossy();
                        name.starts_with("busybox-static_")
                            && name.ends_with(&format!("_{arch}.deb"))
                    })
                    .collect();
                assert_eq!(
                    debs.len(),
                    1,
                    "one busybox-static .deb for {arch}: {debs:?}"
                );
                let out = std::process::Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&debs[0])
                    .arg(dir.path().join(arch))
                    .output()
                    .expect("dpkg-deb is needed to extract testdata/debs");
                assert!(out.status.success(), "{out:?}");
            }
            dir
        });
        std::fs::read(dir.path().join(arch).join("bin/busybox")).unwrap()
    }

    /// A complete i386 program (ELF32, one PT_LOAD segment) that exits 0: the smallest real
    /// 32-bit ELF, written by hand (`mov $1,%eax; xor %ebx,%ebx; int $0x80`).
    fn elf32_i386_exit0() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"\x7fELF\x01\x01\x01\x00");
        b.extend_from_slice(&[0; 8]);
        let code: &[u8] = &[0xb8, 1, 0, 0, 0, 0x31, 0xdb, 0xcd, 0x80];
        let base = 0x0804_8000u32;
        let entry = base + 52 + 32;
        let le16 = |b: &mut Vec<u8>, v: u16| b.extend_from_slice(&v.to_le_bytes());
        let le32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
        le16(&mut b, ET_EXEC);
        le16(&mut b, EM_386);
        le32(&mut b, 1); // e_version
        le32(&mut b, entry);
        le32(&mut b, 52); // e_phoff
        le32(&mut b, 0); // e_shoff
        le32(&mut b, 0); // e_flags
        le16(&mut b, 52); // e_ehsize
        le16(&mut b, 32); // e_phentsize
        le16(&mut b, 1); // e_phnum
        le16(&mut b, 40); // e_shentsize
        le16(&mut b, 0); // e_shnum
        le16(&mut b, 0); // e_shstrndx
        assert_eq!(b.len(), 52);
        let size = 52 + 32 + code.len() as u32;
        le32(&mut b, 1); // PT_LOAD
        le32(&mut b, 0); // p_offset
        le32(&mut b, base); // p_vaddr
        le32(&mut b, base); // p_paddr
        le32(&mut b, size); // p_filesz
        le32(&mut b, size); // p_memsz
        le32(&mut b, 5); // PF_R | PF_X
        le32(&mut b, 0x1000); // p_align
        b.extend_from_slice(code);
        b
    }

    fn write(root: &Path, rel: &str, bytes: &[u8], mode: u32) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A layer with programs for both machines, a 32-bit one, a script, a truncated ELF
    /// header, garbage after the magic, an object file, an empty file, symlinks to programs
    /// (inside and outside the layer), a fifo and deep directories.
    fn mixed_layer() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "bin/busybox", &busybox("amd64"), 0o755);
        write(root, "arm/bin/busybox", &busybox("arm64"), 0o755);
        write(root, "cnb/lifecycle/launcher", LATHE_LAUNCHER_AMD64, 0o755);
        write(root, "launcher-arm64", LATHE_LAUNCHER_ARM64, 0o644);
        write(root, "lib32/exit0", &elf32_i386_exit0(), 0o755);
        write(
            root,
            "bin/start.sh",
            b"#!/bin/sh\nexec busybox httpd\n",
            0o755,
        );
        write(root, "truncated", &LATHE_LAUNCHER_ARM64[..40], 0o755);
        let mut garbage = b"\x7fELF\x07\x09".to_vec();
        garbage.extend_from_slice(&[0xff; 100]);
        write(root, "garbage", &garbage, 0o644);
        let mut object = LATHE_LAUNCHER_ARM64[..64].to_vec();
        object[16] = ET_REL as u8;
        write(root, "obj/thing.o", &object, 0o644);
        write(root, "empty", b"", 0o644);
        write(root, "a/b/c/d/e/f/g/h/readme.txt", b"text\x7fELF", 0o644);
        symlink("../arm/bin/busybox", root.join("bin/arm-busybox")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "busybox", &busybox("arm64"), 0o755);
        symlink(outside.path().join("busybox"), root.join("bin/outside")).unwrap();
        symlink(outside.path(), root.join("outside-dir")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Kept alive by leaking: the symlinks point into it.
        std::mem::forget(outside);
        dir
    }

    fn paths(files: &[ElfFile]) -> Vec<String> {
        files.iter().map(|f| f.path.display().to_string()).collect()
    }

    #[test]
    fn real_programs_are_read_by_their_header() {
        for (arch, bytes) in [
            ("amd64", busybox("amd64")),
            ("arm64", busybox("arm64")),
            ("amd64", LATHE_LAUNCHER_AMD64.to_vec()),
            ("arm64", LATHE_LAUNCHER_ARM64.to_vec()),
        ] {
            let header = read_elf_header(&bytes[..HEAD_LEN]).unwrap();
            assert!(header.is_program(), "{arch}");
            assert_eq!(
                Some(header.machine),
                ElfMachine::for_platform(&platform(&format!("linux/{arch}"))).ok(),
                "{arch}"
            );
            assert_eq!(header.machine.to_string(), format!("linux/{arch}"));
            // The whole-file reader agrees with the header reader.
            let info = read_elf(&bytes).unwrap();
            assert_eq!(info.elf_machine(), header.machine);
            assert!(
                info.is_static(),
                "{arch}: busybox-static and the launcher are static"
            );
        }
        let i386 = read_elf(&elf32_i386_exit0()).unwrap();
        assert_eq!((i386.machine, i386.class, i386.kind), (EM_386, 32, ET_EXEC));
        assert_eq!(i386.segments, [1]);
        assert_eq!(i386.elf_machine().to_string(), "linux/386");
    }

    #[test]
    fn short_and_odd_headers_are_errors_not_panics() {
        let launcher = LATHE_LAUNCHER_AMD64;
        for n in 0..HEAD_LEN {
            let head = &launcher[..n];
            match classify(head) {
                Head::NotElf => assert!(n < 4, "{n} bytes"),
                Head::Malformed(why) => {
                    assert!(n >= 4, "{n} bytes");
                    assert!(why.contains("truncated"), "{n} bytes: {why}");
                }
                Head::Elf(_) => panic!("{n} bytes of a 64-bit header parsed"),
            }
        }
        assert!(matches!(classify(&launcher[..HEAD_LEN]), Head::Elf(_)));
        // A 32-bit header is complete at 52 bytes.
        let i386 = elf32_i386_exit0();
        assert!(matches!(classify(&i386[..51]), Head::Malformed(_)));
        assert!(matches!(classify(&i386[..52]), Head::Elf(_)));
        let mut bad = launcher[..HEAD_LEN].to_vec();
        bad[4] = 3;
        assert_eq!(
            classify(&bad),
            Head::Malformed("unknown ELF class 3".into())
        );
        bad[4] = 2;
        bad[5] = 0;
        assert_eq!(
            classify(&bad),
            Head::Malformed("unknown ELF data encoding 0".into())
        );
        assert_eq!(classify(b"#!/bin/sh\n"), Head::NotElf);
        // Program headers pointing past the end are the whole-file reader's error only.
        let mut header = launcher[..HEAD_LEN].to_vec();
        header[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_elf_header(&header).is_ok());
        assert!(
            read_elf(&header)
                .unwrap_err()
                .contains("its program headers are")
        );
    }

    #[test]
    fn machines_name_platforms_and_unknown_ones_by_number() {
        for (text, machine) in [
            ("linux/amd64", ElfMachine::new(EM_X86_64, 64, true)),
            ("linux/arm64/v8", ElfMachine::new(EM_AARCH64, 64, true)),
            ("linux/arm/v7", ElfMachine::new(EM_ARM, 32, true)),
            ("linux/ppc64le", ElfMachine::new(EM_PPC64, 64, true)),
            ("linux/s390x", ElfMachine::new(EM_S390, 64, false)),
        ] {
            assert_eq!(
                ElfMachine::for_platform(&platform(text)),
                Ok(machine),
                "{text}"
            );
        }
        // Big-endian ppc64 is not ppc64le; the x32 ABI is not amd64.
        assert_eq!(
            ElfMachine::new(EM_PPC64, 64, false).to_string(),
            "linux/ppc64"
        );
        assert_eq!(
            ElfMachine::new(EM_X86_64, 32, true).to_string(),
            "ELF machine 62 (32-bit, little-endian)"
        );
        assert!(
            ElfMachine::for_platform(&platform("windows/amd64"))
                .unwrap_err()
                .contains("not for windows")
        );
        assert!(
            ElfMachine::for_platform(&platform("linux/sparc64"))
                .unwrap_err()
                .contains("sparc64")
        );
    }

    #[test]
    fn a_tree_names_each_foreign_program_by_its_path_in_the_layer() {
        let layer = mixed_layer();
        for threads in [1, 2, 7] {
            let options = ScanOptions { threads };
            let report = check_tree_with(layer.path(), &platform("linux/arm64"), options).unwrap();
            assert_eq!(
                paths(&report.foreign),
                ["bin/busybox", "cnb/lifecycle/launcher", "lib32/exit0"],
                "{threads} threads"
            );
            assert_eq!(report.programs, 5, "{threads} threads");
            // Regular files only: not the symlinks, the fifo or what they point to.
            assert_eq!(report.files, 11, "{threads} threads");
            let malformed: Vec<String> = report
                .malformed
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect();
            assert_eq!(
                malformed,
                [
                    "garbage: unknown ELF class 7",
                    "truncated: its ELF header is truncated (40 bytes)"
                ]
            );
            let amd64 = check_tree_with(layer.path(), &platform("linux/amd64"), options).unwrap();
            assert_eq!(
                paths(&amd64.foreign),
                ["arm/bin/busybox", "launcher-arm64", "lib32/exit0"]
            );
        }
        let report = check_tree(layer.path(), &platform("linux/amd64")).unwrap();
        let err = report
            .require_target("layer lathe-test/wrong:bin")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "layer lathe-test/wrong:bin holds 3 programs for another machine than linux/amd64 \
             (ELF machine 62, 64-bit):\n  \
             arm/bin/busybox: linux/arm64 (ELF machine 183, 64-bit)\n  \
             launcher-arm64: linux/arm64 (ELF machine 183, 64-bit)\n  \
             lib32/exit0: linux/386 (ELF machine 3, 32-bit)"
        );
    }

    #[test]
    fn trees_without_programs_pass_and_have_no_elf() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "bin/run", b"#!/bin/sh\necho hi\n", 0o755);
        write(root, "htdocs/index.html", b"<p>hi</p>", 0o644);
        write(
            root,
            "obj/x.o",
            &{
                let mut o = LATHE_LAUNCHER_AMD64[..HEAD_LEN].to_vec();
                o[16] = ET_REL as u8;
                o
            },
            0o644,
        );
        symlink("/bin/sh", root.join("bin/sh")).unwrap();
        let report = check_tree(root, &platform("linux/arm64")).unwrap();
        assert_eq!((report.files, report.programs), (3, 0));
        assert!(report.foreign.is_empty() && report.malformed.is_empty());
        assert!(report.require_target("x").is_ok());
        // Object files are not programs; a symlink to the host's shell is not followed.
        assert_eq!(find_elf(root).unwrap(), None);
        write(root, "deep/er/lib/libx.so", LATHE_LAUNCHER_ARM64, 0o644);
        assert_eq!(
            find_elf(root).unwrap(),
            Some(PathBuf::from("deep/er/lib/libx.so"))
        );
        let layer = mixed_layer();
        let first = find_elf_with(layer.path(), ScanOptions { threads: 1 }).unwrap();
        assert!(first.is_some());
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(find_elf(empty.path()).unwrap(), None);
        let report = check_tree(empty.path(), &platform("linux/amd64")).unwrap();
        assert_eq!((report.files, report.programs), (0, 0));
    }

    #[test]
    fn unreadable_files_and_missing_roots_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_tree(&dir.path().join("missing"), &platform("linux/amd64")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        write(dir.path(), "file", b"x", 0o644);
        let err = check_tree(&dir.path().join("file"), &platform("linux/amd64")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        // A symlink to a directory is not followed, not even as the root.
        symlink(dir.path(), dir.path().join("link")).unwrap();
        assert!(check_tree(&dir.path().join("link"), &platform("linux/amd64")).is_err());
        let err = check_tree(dir.path(), &platform("windows/amd64")).unwrap_err();
        assert!(matches!(err, ElfCheckError::Target(_)), "{err}");
        if !nix::unistd::geteuid().is_root() {
            // Root reads files whatever their mode; the deep tree below fails for root too.
            write(dir.path(), "sub/secret", b"\x7fELF", 0o000);
            let err = check_tree(dir.path(), &platform("linux/amd64")).unwrap_err();
            assert!(err.to_string().contains("sub/secret"), "{err}");
            std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        }
        // A tree deeper than PATH_MAX can't be opened by path: an error, not a gap.
        let deep = tempfile::tempdir().unwrap();
        let name = "d".repeat(250);
        let mut fd = nix::fcntl::open(
            deep.path(),
            nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        for _ in 0..20 {
            nix::sys::stat::mkdirat(&fd, name.as_str(), nix::sys::stat::Mode::S_IRWXU).unwrap();
            fd = nix::fcntl::openat(
                &fd,
                name.as_str(),
                nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
        }
        let err = check_tree(deep.path(), &platform("linux/amd64")).unwrap_err();
        assert!(
            matches!(&err, ElfCheckError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENAMETOOLONG)),
            "{err}"
        );
    }

    /// An uncompressed layer tar of `layer` with every name written as `prefix` + its path
    /// (raw bytes, so that `/` and `./` prefixes survive), symlinks kept, and a hard link to
    /// `bin/busybox` as export writes one (no content: the earlier entry has it).
    fn tar_of(layer: &Path, prefix: &str) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::FileTypeExt;
        let mut builder = tar::Builder::new(Vec::new());
        let mut append = |name: &[u8], kind: tar::EntryType, data: &[u8], link: Option<&Path>| {
            let mut header = tar::Header::new_gnu();
            header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            header.set_entry_type(kind);
            header.set_mode(0o755);
            header.set_size(data.len() as u64);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            header.set_cksum();
            builder.append(&header, data).unwrap();
        };
        for entry in walkdir::WalkDir::new(layer)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.unwrap();
            let rel = entry.path().strip_prefix(layer).unwrap();
            let name = [prefix.as_bytes(), rel.as_os_str().as_bytes()].concat();
            let kind = entry.file_type();
            if kind.is_dir() {
                append(
                    &[&name[..], b"/"].concat(),
                    tar::EntryType::Directory,
                    b"",
                    None,
                );
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path()).unwrap();
                append(&name, tar::EntryType::Symlink, b"", Some(&target));
            } else if kind.is_file() {
                let data = std::fs::read(entry.path()).unwrap();
                append(&name, tar::EntryType::Regular, &data, None);
            } else {
                assert!(kind.is_fifo());
                append(&name, tar::EntryType::Fifo, b"", None);
            }
        }
        let name = format!("{prefix}bin/hardlink");
        let target = format!("{prefix}bin/busybox");
        append(
            name.as_bytes(),
            tar::EntryType::Link,
            b"",
            Some(Path::new(&target)),
        );
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_layer_tar_gives_the_same_answer_as_its_tree() {
        let layer = mixed_layer();
        for (prefix, shown) in [
            ("layers/bp/x/", "layers/bp/x/"),
            ("/layers/", "layers/"),
            ("./", ""),
        ] {
            let tar = tar_of(layer.path(), prefix);
            for target in ["linux/amd64", "linux/arm64"] {
                let target = platform(target);
                let from_tree = check_tree(layer.path(), &target).unwrap();
                let from_tar = check_tar(&tar[..], &target).unwrap();
                let with_prefix: Vec<String> = paths(&from_tree.foreign)
                    .iter()
                    .map(|p| format!("{shown}{p}"))
                    .collect();
                assert_eq!(paths(&from_tar.foreign), with_prefix, "{prefix} {target}");
                assert_eq!(
                    (from_tar.files, from_tar.programs, from_tar.malformed.len()),
                    (
                        from_tree.files,
                        from_tree.programs,
                        from_tree.malformed.len()
                    ),
                    "{prefix} {target}"
                );
            }
            assert!(find_elf_in_tar(&tar[..]).unwrap().is_some());
        }
        // A tar cut short in an entry's header or content is an error, not a partial answer.
        let tar = tar_of(layer.path(), "x/");
        let err = check_tar(&tar[..700], &platform("linux/amd64")).unwrap_err();
        assert!(
            matches!(err, ElfCheckError::Tar(_) | ElfCheckError::Io { .. }),
            "{err}"
        );
        let mut text_only = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(4);
        header.set_mode(0o755);
        header.set_cksum();
        text_only
            .append_data(&mut header, "bin/run", &b"echo"[..])
            .unwrap();
        let text_only = text_only.into_inner().unwrap();
        assert_eq!(find_elf_in_tar(&text_only[..]).unwrap(), None);
    }
}
