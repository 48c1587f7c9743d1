//! Layer unpacking: applies an image's layers to a root filesystem, rootless, and safe on
//! hostile layers.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` semantics through the `pathrs` crate
//! (never by joining strings), so absolute in-image symlinks such as `bin -> /usr/bin` resolve
//! inside the root and no entry can create, change or follow anything outside it. Entries whose
//! names climb out with `..` are refused with an error naming the layer and the entry.
//!
//! Owners: root on a host, or root of a user namespace that maps ids 0–65535 (a rootless
//! container's with a subordinate range, or the helper lathe runs for a caller with one, see
//! [`crate::sandbox::mapped`]), gives every entry its owner and mode; an owner that namespace
//! does not map is left to root and recorded as below, with a warning. Rootless: files are
//! created owned by the caller; each entry's owner is recorded the way umoci's rootless mode
//! does, in the `user.rootlesscontainers` xattr. Setuid/setgid bits are then not applied.
//! Device nodes become empty placeholder files either way. Directory modes are applied last,
//! deepest first, so read-only directories can still be filled.
//!
//! The image is unpacked into a temporary sibling of the target, renamed into place only when
//! every layer succeeded, and removed otherwise.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;

use oci_spec::image::Descriptor;
use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};
use sha2::{Digest as _, Sha256};

use crate::content::{self, ChannelReader, Kind};
use crate::image::{self, ImageError, ImageSource};
use crate::layer;
use crate::progress::ByteProgress;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{target} exists and is not an empty directory")]
    TargetNotEmpty { target: PathBuf },
    #[error("layer {layer}: entry {entry:?}: {why}")]
    Entry {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("layer {layer}: {why}")]
    Layer { layer: String, why: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What an unpack did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UnpackReport {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

/// Unpacks the image manifest `manifest` from `source` into `target`, which must not exist
/// or be an empty directory. `progress` counts compressed layer bytes.
pub fn unpack(
    source: &dyn ImageSource,
    manifest: &Descriptor,
    target: &Path,
    progress: &dyn ByteProgress,
) -> Result<UnpackReport, UnpackError> {
    let describe = source.describe();
    if content::kind_of(manifest.media_type()) != Kind::Manifest {
        return Err(ImageError::Invalid {
            what: describe,
            why: "unpack needs one image; choose a platform".into(),
        }
        .into());
    }
    let parsed = image::parse_manifest(&source.read_blob(manifest)?, manifest, &describe)?;
    let config: serde_json::Value = serde_json::from_slice(&source.read_blob(parsed.config())?)
        .map_err(|e| ImageError::Invalid {
            what: describe.clone(),
            why: format!("config: {e}"),
        })?;
    let diff_ids = image::config_diff_ids(&config);
    if diff_ids.len() != parsed.layers().len() {
        return Err(ImageError::Invalid {
            what: describe,
            why: format!(
                "the manifest has {} layers but the config {} diff_ids",
                parsed.layers().len(),
                diff_ids.len()
            ),
        }
        .into());
    }
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(UnpackError::TargetNotEmpty {
                    target: target.to_path_buf(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(UnpackError::Io {
                path: target.to_path_buf(),
                source: e,
            });
        }
    }
    let parent = crate::layout::parent_dir(target);
    let staging = tempfile::Builder::new()
        .prefix(&crate::layout::sibling_temp_prefix(target, "unpack"))
        .tempdir_in(parent)
        .map_err(|e| UnpackError::Io {
            path: parent.to_path_buf(),
            source: e,
        })?;
    fs::set_permissions(staging.path(), Permissions::from_mode(0o755)).map_err(|e| {
        UnpackError::Io {
            path: staging.path().to_path_buf(),
            source: e,
        }
    })?;
    let root = Root::open(staging.path()).map_err(|e| UnpackError::Io {
        path: staging.path().to_path_buf(),
        source: io::Error::other(chain(&e)),
    })?;

    let mut unpacker = Unpacker {
        root,
        dirs: DirCache {
            open: HashMap::new(),
        },
        copy_buffer: vec![0; 256 * 1024],
        dir_modes: Vec::new(),
        report: UnpackReport::default(),
        as_root: can_set_any_owner(),
        record_owners: true,
    };
    progress.start(parsed.layers().iter().map(|l| l.size()).sum());
    let applied = parsed
        .layers()
        .iter()
        .zip(&diff_ids)
        .try_for_each(|(layer_desc, diff_id)| {
            unpacker.apply_layer(source, layer_desc, diff_id, progress)
        });
    progress.finish();
    applied?;
    unpacker.finish_dirs()?;
    let _ = fs::remove_dir(target);
    let staging = staging.keep();
    if let Err(e) = fs::rename(&staging, target) {
        // Its directories now have the image's modes, possibly read-only.
        let _ = crate::layout::remove_tree(&staging);
        return Err(UnpackError::Io {
            path: target.to_path_buf(),
            source: e,
        });
    }
    Ok(unpacker.report)
}

/// Extracts one uncompressed layer tar into `target`, an existing directory, with the same
/// confinement as [`unpack`]; the tar must hash to `diff_id`. Owners are not recorded: the
/// build cache restores layers for the user who runs the build, who owns them. On failure
/// `target` may hold part of the tar; the caller extracts into a directory of its own.
pub fn extract_tar(
    tar: impl Read,
    target: &Path,
    what: &str,
    diff_id: &str,
) -> Result<UnpackReport, UnpackError> {
    let root = Root::open(target).map_err(|e| UnpackError::Io {
        path: target.to_path_buf(),
        source: io::Error::other(chain(&e)),
    })?;
    let mut unpacker = Unpacker {
        root,
        dirs: DirCache {
            open: HashMap::new(),
        },
        copy_buffer: vec![0; 256 * 1024],
        dir_modes: Vec::new(),
        report: UnpackReport::default(),
        as_root: false,
        record_owners: false,
    };
    unpacker.apply_tar(tar, what, diff_id)?;
    unpacker.finish_dirs()?;
    Ok(unpacker.report)
}

struct Unpacker {
    /// Rootless: keep each entry's owner in the `user.rootlesscontainers` xattr.
    record_owners: bool,
    root: Root,
    /// Open directories by path, so that most entries cost one `openat` of their final name.
    dirs: DirCache,
    /// Directories whose mode and mtime are applied at the end, deepest first.
    dir_modes: Vec<(String, u32, u64)>,
    report: UnpackReport,
    as_root: bool,
    copy_buffer: Vec<u8>,
}

/// An entry's owner and full mode, as its tar header gives them.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u64,
    gid: u64,
    mode: u32,
}

/// The xattrs lathe itself writes in rootless mode.
const ROOTLESS_XATTR: &str = "user.rootlesscontainers";
const MODE_XATTR: &str = "user.lathe.mode";

/// Directories already resolved inside the root, by their path in the image.
///
/// A cached descriptor stays right while nothing above it changes. Removing or replacing a
/// directory or a symlink can change what a path resolves to (a cached `bin` may have been
/// reached through `bin -> usr/bin`), so every such removal empties the whole cache; files
/// replacing files, the common case, keep it.
struct DirCache {
    open: HashMap<String, Rc<OwnedFd>>,
}

impl DirCache {
    /// Keeps the process well under the usual limit of 1024 open files.
    const CAPACITY: usize = 256;

    fn get(&self, path: &str) -> Option<Rc<OwnedFd>> {
        self.open.get(path).cloned()
    }

    fn insert(&mut self, path: String, fd: OwnedFd) -> Rc<OwnedFd> {
        if self.open.len() >= Self::CAPACITY {
            self.open.clear();
        }
        let fd = Rc::new(fd);
        self.open.insert(path, Rc::clone(&fd));
        fd
    }

    fn clear(&mut self) {
        self.open.clear();
    }
}

/// A reader that hashes what passes through it (for the diffID).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl Unpacker {
    fn apply_layer(
        &mut self,
        source: &dyn ImageSource,
        desc: &Descriptor,
        diff_id: &str,
        progress: &dyn ByteProgress,
    ) -> Result<(), UnpackError> {
        let layer_name = desc.digest().to_string();
        let layer_err = |why: String| UnpackError::Layer {
            layer: layer_name.clone(),
            why,
        };
        let compression = content::layer_compression(desc.media_type()).ok_or_else(|| {
            layer_err(format!(
                "unsupported layer media type {}",
                desc.media_type()
            ))
        })?;
        let blob = CountingReader {
            inner: source.open_blob(desc)?,
            progress,
        };
        // Decompression runs on its own thread, a bounded channel ahead of the file writes.
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(DECODE_QUEUE);
            scope.spawn(move || decode_into(blob, compression, sender));
            let tar_stream = ChannelReader::new(receiver);
            self.apply_tar(tar_stream, &layer_name, diff_id)
        })?;
        self.report.layers += 1;
        self.report.bytes += desc.size();
        Ok(())
    }

    fn apply_tar(
        &mut self,
        tar_stream: impl Read,
        layer_name: &str,
        diff_id: &str,
    ) -> Result<(), UnpackError> {
        let layer_err = |why: String| UnpackError::Layer {
            layer: layer_name.to_string(),
            why,
        };
        let mut archive = tar::Archive::new(HashingReader {
            inner: tar_stream,
            hasher: Sha256::new(),
        });
        let mut created: HashSet<String> = HashSet::new();
        for entry in archive.entries().map_err(|e| layer_err(e.to_string()))? {
            let mut entry = entry.map_err(|e| layer_err(format!("not a valid tar stream: {e}")))?;
            let raw = entry.path_bytes().into_owned();
            let raw_name = String::from_utf8_lossy(&raw).into_owned();
            let entry_err = |why: String| UnpackError::Entry {
                layer: layer_name.to_string(),
                entry: raw_name.clone(),
                why,
            };
            let path = layer::normalize_archive_path(Path::new(&raw_name))
                .ok_or_else(|| entry_err("its name climbs out of the root with '..'".into()))?;
            if path.is_empty() {
                continue; // the root itself ("./")
            }
            self.apply_entry(&mut entry, &path, &mut created)
                .map_err(entry_err)?;
            self.report.entries += 1;
        }
        // Read to the end so the blob's digest and the diffID are checked in full.
        let mut hashing = archive.into_inner();
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| layer_err(e.to_string()))?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != diff_id {
            return Err(layer_err(format!(
                "its uncompressed content hashes to {actual}, not the diffID {diff_id} the config gives"
            )));
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        path: &str,
        created: &mut HashSet<String>,
    ) -> Result<(), String> {
        let (parent, base) = match path.rsplit_once('/') {
            Some((p, b)) => (p, b),
            None => ("", path),
        };
        if base == ".wh..wh..opq" {
            self.dirs.clear();
            return self.clear_dir(parent, created);
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let victim = join(parent, hidden);
            self.dirs.clear();
            return match self.root.remove_all(&victim) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(format!("whiteout of {victim}: {}", chain(&e))),
            };
        }
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| e.to_string())? & 0o7777;
        let owner = Owner {
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            mode,
        };
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = pax_xattrs(entry)?;
        let parent_fd = self.parent_dir(parent)?;
        let kind = header.entry_type();
        created.insert(path.to_string());
        if kind.is_dir() {
            let dir = self.make_dir(&parent_fd, base, path)?;
            let owned = self.set_owner(&dir, path, owner)?;
            self.set_xattrs(&dir, path, &xattrs);
            let mode = if owned { mode } else { mode & 0o1777 };
            self.dir_modes.push((path.to_string(), mode, mtime));
            self.dirs.insert(path.to_string(), dir);
            return Ok(());
        }
        match kind {
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("symlink without a target")?
                    .into_owned();
                let target = std::ffi::OsStr::from_bytes(&target);
                self.replace_with(&parent_fd, base, path, |dir| {
                    nix::unistd::symlinkat(target, dir, base)
                })?;
                self.chown_at(&parent_fd, base, path, owner)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .ok_or("hardlink without a target")?;
                let target = layer::normalize_archive_path(&target)
                    .ok_or("its hardlink target climbs out of the root")?;
                self.remove_at(&parent_fd, base, path)?;
                self.root
                    .create(path, &InodeType::Hardlink(PathBuf::from(&target)))
                    .map_err(|e| format!("hardlink to {target}: {}", chain(&e)))
            }
            tar::EntryType::Fifo => {
                self.replace_with(&parent_fd, base, path, |dir| {
                    nix::unistd::mkfifoat(dir, base, Mode::from_bits_truncate(0o600))
                })?;
                // Just created by us, so following is safe (Linux has no fchmodat nofollow).
                nix::sys::stat::fchmodat(
                    &*parent_fd,
                    base,
                    Mode::from_bits_truncate(mode & 0o777),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| format!("chmod: {e}"))?;
                self.chown_at(&parent_fd, base, path, owner)
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                self.report.warnings.push(format!(
                    "{path}: device node replaced by an empty file (rootless)"
                ));
                let placeholder = Owner {
                    mode: mode & 0o666,
                    ..owner
                };
                self.write_file(
                    &parent_fd,
                    base,
                    path,
                    &mut io::empty(),
                    placeholder,
                    mtime,
                    &[],
                )
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.write_file(&parent_fd, base, path, entry, owner, mtime, &xattrs)
            }
            other => {
                self.report
                    .warnings
                    .push(format!("{path}: tar entry type {other:?} skipped"));
                Ok(())
            }
        }
    }

    /// The directory `parent` (resolved in the root, created if missing), from the cache when
    /// it is there.
    fn parent_dir(&mut self, parent: &str) -> Result<Rc<OwnedFd>, String> {
        if let Some(fd) = self.dirs.get(parent) {
            return Ok(fd);
        }
        let handle = if parent.is_empty() {
            self.root.resolve(".")
        } else {
            self.root.mkdir_all(parent, &Permissions::from_mode(0o755))
        }
        .map_err(|e| match e.kind() {
            pathrs::error::ErrorKind::OsError(Some(libc::ENOTDIR)) => format!(
                "parent {parent}: not a directory inside the root (a file, or a symlink to \
                 something that does not exist in the image); nothing is created through it"
            ),
            _ => format!("parent {parent}: {}", chain(&e)),
        })?;
        let fd: OwnedFd = handle.into();
        Ok(self.dirs.insert(parent.to_string(), fd))
    }

    /// Creates the directory `base` in `parent_fd` unless a directory is there; anything else
    /// there (a file, a symlink) is replaced. Returns the directory, opened.
    fn make_dir(&mut self, parent_fd: &OwnedFd, base: &str, path: &str) -> Result<OwnedFd, String> {
        match nix::sys::stat::mkdirat(parent_fd, base, Mode::from_bits_truncate(0o755)) {
            Ok(()) => {}
            Err(Errno::EEXIST) if is_dir_at(parent_fd, base) => {}
            Err(Errno::EEXIST) => {
                self.replace_with(parent_fd, base, path, |dir| {
                    nix::sys::stat::mkdirat(dir, base, Mode::from_bits_truncate(0o755))
                })?;
            }
            Err(e) => return Err(format!("mkdir: {e}")),
        }
        nix::fcntl::openat(
            parent_fd,
            base,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening the directory: {e}"))
    }

    /// Runs `create` for the final component `base`; when something is already there, removes
    /// it first (never following it) and runs `create` again.
    fn replace_with(
        &mut self,
        parent_fd: &OwnedFd,
        base: &str,
        path: &str,
        create: impl Fn(&OwnedFd) -> nix::Result<()>,
    ) -> Result<(), String> {
        match create(parent_fd) {
            Err(Errno::EEXIST) => {}
            other => return other.map_err(|e| e.to_string()),
        }
        self.remove_at(parent_fd, base, path)?;
        create(parent_fd).map_err(|e| e.to_string())
    }

    /// Removes whatever is at `base` in `parent_fd` (a whole tree for a directory).
    fn remove_at(&mut self, parent_fd: &OwnedFd, base: &str, path: &str) -> Result<(), String> {
        let stat = match nix::sys::stat::fstatat(
            parent_fd,
            base,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("replacing {path}: {e}")),
        };
        let file_type = stat.st_mode & libc::S_IFMT;
        if file_type == libc::S_IFDIR || file_type == libc::S_IFLNK {
            // Cached directories may sit below it or have been reached through it.
            self.dirs.clear();
        }
        if file_type == libc::S_IFDIR {
            self.root
                .remove_all(path)
                .map_err(|e| format!("replacing {path}: {}", chain(&e)))
        } else {
            nix::unistd::unlinkat(parent_fd, base, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(|e| format!("replacing {path}: {e}"))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file(
        &mut self,
        parent_fd: &OwnedFd,
        base: &str,
        path: &str,
        data: &mut dyn Read,
        owner: Owner,
        mtime: u64,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), String> {
        let open = |dir: &OwnedFd| {
            nix::fcntl::openat(
                dir,
                base,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
        };
        let file = match open(parent_fd) {
            Ok(fd) => fd,
            Err(Errno::EEXIST) => {
                self.remove_at(parent_fd, base, path)?;
                open(parent_fd).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut file = File::from(file);
        loop {
            let n = match data.read(&mut self.copy_buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            file.write_all(&self.copy_buffer[..n])
                .map_err(|e| e.to_string())?;
        }
        let owned = self.set_owner(&file, path, owner)?;
        let applied = if owned {
            owner.mode
        } else {
            owner.mode & 0o1777
        };
        if applied != owner.mode {
            self.report.warnings.push(format!(
                "{path}: setuid/setgid bits recorded, not applied (rootless)"
            ));
        }
        self.set_xattrs(&file, path, xattrs);
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(applied))
            .map_err(|e| format!("chmod: {e}"))?;
        let time = TimeSpec::new(mtime as i64, 0);
        nix::sys::stat::futimens(&file, &time, &time).map_err(|e| format!("utimens: {e}"))
    }

    /// As root: chown. Rootless: the `user.rootlesscontainers` xattr umoci writes, holding the
    /// owner (and for setuid files the full mode, in `user.lathe.mode`). Root of a user
    /// namespace that does not map the owner (an id above 65535 where lathe maps a subordinate
    /// range) records it as rootless does, with a warning. Returns whether the owner was set
    /// (setuid/setgid bits are applied only then).
    fn set_owner(&mut self, file: &impl AsFd, path: &str, owner: Owner) -> Result<bool, String> {
        if self.as_root {
            match nix::unistd::fchown(
                file,
                Some((owner.uid as u32).into()),
                Some((owner.gid as u32).into()),
            ) {
                Ok(()) => return Ok(true),
                Err(Errno::EINVAL) => self.unmapped_owner(path, owner),
                Err(e) => return Err(format!("chown: {e}")),
            }
        }
        if !self.record_owners {
            return Ok(false);
        }
        if owner.uid != 0 || owner.gid != 0 {
            set_xattr(
                file,
                ROOTLESS_XATTR,
                &rootless_xattr(owner.uid as u32, owner.gid as u32),
            )?;
        }
        if owner.mode & 0o6000 != 0 {
            set_xattr(file, MODE_XATTR, format!("{:o}", owner.mode).as_bytes())?;
        }
        Ok(false)
    }

    fn unmapped_owner(&mut self, path: &str, owner: Owner) {
        self.report.warnings.push(format!(
            "{path}: owner {}:{} is not mapped in this user namespace; left to root",
            owner.uid, owner.gid
        ));
    }

    /// As root, sets the owner of a symlink or fifo. Rootless there is nowhere to record it:
    /// the kernel refuses `user.*` xattrs on them (umoci has the same gap).
    fn chown_at(
        &mut self,
        parent_fd: &OwnedFd,
        base: &str,
        path: &str,
        owner: Owner,
    ) -> Result<(), String> {
        if !self.as_root {
            return Ok(());
        }
        match nix::unistd::fchownat(
            parent_fd,
            base,
            Some((owner.uid as u32).into()),
            Some((owner.gid as u32).into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL) => {
                self.unmapped_owner(path, owner);
                Ok(())
            }
            Err(e) => Err(format!("chown: {e}")),
        }
    }

    /// Applies the layer's extended attributes where the kernel allows; the ones it refuses
    /// (`security.*` and `trusted.*` without privilege) become warnings.
    fn set_xattrs(&mut self, file: &impl AsFd, path: &str, xattrs: &[(String, Vec<u8>)]) {
        for (name, value) in xattrs {
            if name == ROOTLESS_XATTR || name == MODE_XATTR {
                self.report.warnings.push(format!(
                    "{path}: xattr {name} from the layer ignored (lathe writes it itself)"
                ));
                continue;
            }
            if let Err(why) = set_xattr(file, name, value) {
                self.report.warnings.push(format!("{path}: {why}"));
            }
        }
    }

    /// An opaque whiteout: hides everything lower layers put under `dir`. What this layer
    /// created stays; in a directory this layer (re)created, lower contents go too.
    fn clear_dir(&mut self, dir: &str, created: &HashSet<String>) -> Result<(), String> {
        let handle = match self
            .root
            .resolve_nofollow(if dir.is_empty() { "." } else { dir })
        {
            Ok(h) => h,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(chain(&e)),
        };
        let Ok(file) = handle.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY) else {
            return Ok(()); // not a directory: nothing below it to hide
        };
        let listing = fs::read_dir(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| e.to_string())?;
        for child in listing {
            let child = child.map_err(|e| e.to_string())?;
            let rel = join(dir, &child.file_name().to_string_lossy());
            if !created.contains(&rel) {
                self.root
                    .remove_all(&rel)
                    .map_err(|e| format!("opaque whiteout of {rel}: {}", chain(&e)))?;
            } else if child.file_type().is_ok_and(|t| t.is_dir()) {
                self.clear_dir(&rel, created)?;
            }
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        // A directory listed in several layers takes its last mode; then deepest first, so a
        // read-only parent is made read-only after its children.
        let mut last: HashMap<&str, (u32, u64)> = HashMap::new();
        for (path, mode, mtime) in &self.dir_modes {
            last.insert(path, (*mode, *mtime));
        }
        let mut dirs: Vec<_> = last.into_iter().collect();
        dirs.sort_by_key(|(p, _)| (std::cmp::Reverse(p.matches('/').count()), *p));
        for (path, (mode, mtime)) in dirs {
            let Ok(dir) = self
                .root
                .resolve_nofollow(path)
                .and_then(|h| h.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY))
            else {
                continue; // removed by a later whiteout, or replaced by a file
            };
            let applied = if self.as_root { mode } else { mode & 0o1777 };
            let io = |e: io::Error| UnpackError::Io {
                path: PathBuf::from(path),
                source: e,
            };
            dir.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))
                .map_err(io)?;
            dir.set_permissions(Permissions::from_mode(applied))
                .map_err(io)?;
        }
        Ok(())
    }
}

/// Chunks of decompressed layer in flight between the decoding thread and the writer.
const DECODE_QUEUE: usize = 8;
const DECODE_CHUNK: usize = 256 * 1024;

/// Decompresses `blob` into `sender` in fixed-size chunks; an error is sent as the last item.
/// Stops quietly when the receiving side has gone (it failed and dropped the channel).
fn decode_into(
    blob: impl Read + Send,
    compression: content::Compression,
    sender: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
) {
    let mut reader = match layer::decompress(blob, compression) {
        Ok(r) => r,
        Err(e) => {
            let _ = sender.send(Err(e));
            return;
        }
    };
    loop {
        let mut chunk = vec![0u8; DECODE_CHUNK];
        let mut filled = 0;
        let result = loop {
            match reader.read(&mut chunk[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == chunk.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if filled > 0 {
            chunk.truncate(filled);
            if sender.send(Ok(chunk)).is_err() {
                return;
            }
        }
        match result {
            Err(e) => {
                let _ = sender.send(Err(e));
                return;
            }
            Ok(()) if filled < DECODE_CHUNK => return,
            Ok(()) => {}
        }
    }
}

/// Reports the bytes read through it.
struct CountingReader<'a, R> {
    inner: R,
    progress: &'a dyn ByteProgress,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Root on the host (or in a user namespace that maps at least ids 0–65535) can chown to the
/// image's owners; root of a rootless container's namespace, with a single id, cannot.
fn can_set_any_owner() -> bool {
    nix::unistd::geteuid().is_root() && crate::idmap::own_namespace_maps_image_ids()
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn is_not_found(e: &pathrs::error::Error) -> bool {
    e.kind() == pathrs::error::ErrorKind::OsError(Some(libc::ENOENT))
}

/// A pathrs error with its causes ("mkdirat failed: Permission denied").
fn chain(e: &pathrs::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn set_xattr(file: &impl AsFd, name: &str, value: &[u8]) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).expect("xattr names have no NUL");
    // SAFETY: the fd is valid for the call; name and value point to live buffers of the given length.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_fd().as_raw_fd(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setting {name}: {}", io::Error::last_os_error()))
    }
}

/// The `SCHILY.xattr.*` records of an entry's PAX header.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(extensions) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    let mut xattrs = Vec::new();
    for extension in extensions {
        let extension = extension.map_err(|e| format!("PAX header: {e}"))?;
        if let Ok(Some(name)) = extension.key().map(|k| k.strip_prefix("SCHILY.xattr.")) {
            xattrs.push((name.to_string(), extension.value_bytes().to_vec()));
        }
    }
    Ok(xattrs)
}

/// Whether `base` in `dir` is a directory (not a symlink to one).
fn is_dir_at(dir: &OwnedFd, base: &str) -> bool {
    nix::sys::stat::fstatat(dir, base, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// The rootlesscontainers.io `Resource` protobuf: field 1 uid, field 2 gid, as varints (zero
/// values omitted, as proto3 does).
pub fn rootless_xattr(uid: u32, gid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, value) in [(0x08u8, uid), (0x10u8, gid)] {
        if value != 0 {
            out.push(tag);
            let mut v = value;
            while v >= 0x80 {
                out.push((v as u8 & 0x7f) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_xattr_is_the_protobuf_umoci_writes() {
        assert_eq!(
            rootless_xattr(1000, 1000),
            [0x08, 0xe8, 0x07, 0x10, 0xe8, 0x07]
        );
        assert_eq!(rootless_xattr(0, 5), [0x10, 0x05]);
        assert!(rootless_xattr(0, 0).is_empty());
    }
}
