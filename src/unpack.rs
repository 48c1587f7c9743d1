//! Layer unpacking: applies an image's layers to a root filesystem, rootless, and safe on
//! hostile layers.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` semantics through the `pathrs` crate
//! (never by joining strings), so absolute in-image symlinks such as `bin -> /usr/bin` resolve
//! inside the root and no entry can create, change or follow anything outside it. Entries whose
//! names climb out with `..` are refused with an error naming the layer and the entry.
//!
//! Rootless: files are created owned by the caller; each entry's owner is recorded the way
//! umoci's rootless mode does, in the `user.rootlesscontainers` xattr. Setuid/setgid bits are
//! not applied; device nodes become empty placeholder files. Directory modes are applied last,
//! deepest first, so read-only directories can still be filled.
//!
//! The image is unpacked into a temporary sibling of the target, renamed into place only when
//! every layer succeeded, and removed otherwise.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Descriptor;
use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};
use sha2::{Digest as _, Sha256};

use crate::content::{self, ChannelReader, Kind};
use crate::image::{self, ImageError, ImageSource};
use crate::layer;

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
/// or be an empty directory.
pub fn unpack(
    source: &dyn ImageSource,
    manifest: &Descriptor,
    target: &Path,
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
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
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
        dir_modes: Vec::new(),
        report: UnpackReport::default(),
        as_root: nix::unistd::geteuid().is_root(),
    };
    for (layer_desc, diff_id) in parsed.layers().iter().zip(&diff_ids) {
        unpacker.apply_layer(source, layer_desc, diff_id)?;
    }
    unpacker.finish_dirs()?;
    let _ = fs::remove_dir(target);
    fs::rename(staging.path(), target).map_err(|e| UnpackError::Io {
        path: target.to_path_buf(),
        source: e,
    })?;
    let _ = staging.keep();
    Ok(unpacker.report)
}

struct Unpacker {
    root: Root,
    /// Directories whose mode and mtime are applied at the end, deepest first.
    dir_modes: Vec<(String, u32, u64)>,
    report: UnpackReport,
    as_root: bool,
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
        let blob = source.open_blob(desc)?;
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
        let pe = |e: pathrs::error::Error| chain(&e);
        if base == ".wh..wh..opq" {
            return self.clear_dir(parent, created);
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let victim = join(parent, hidden);
            return match self.root.remove_all(&victim) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(format!("whiteout of {victim}: {}", chain(&e))),
            };
        }
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| e.to_string())? & 0o7777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mtime = header.mtime().unwrap_or(0);
        if !parent.is_empty() {
            self.root
                .mkdir_all(parent, &Permissions::from_mode(0o755))
                .map_err(|e| format!("parent {parent}: {}", chain(&e)))?;
        }
        let kind = header.entry_type();
        if kind.is_dir() {
            match self.root.resolve_nofollow(path) {
                Ok(h)
                    if h.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
                        .is_ok() => {}
                Ok(_) => {
                    self.root.remove_all(path).map_err(pe)?;
                    self.root
                        .create(path, &InodeType::Directory(Permissions::from_mode(0o755)))
                        .map_err(pe)?;
                }
                Err(_) => self
                    .root
                    .create(path, &InodeType::Directory(Permissions::from_mode(0o755)))
                    .map_err(pe)?,
            }
            self.record_owner_of_dir(path, uid, gid)?;
            self.dir_modes.push((path.to_string(), mode, mtime));
            created.insert(path.to_string());
            return Ok(());
        }
        // Anything else replaces what is there (a later layer may swap a directory for a
        // file); the final component is never followed.
        match self.root.remove_all(path) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("replacing {path}: {}", chain(&e))),
        }
        created.insert(path.to_string());
        match kind {
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .ok_or("symlink without a target")?;
                self.root
                    .create(path, &InodeType::Symlink(target.into_owned()))
                    .map_err(pe)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .ok_or("hardlink without a target")?;
                let target = layer::normalize_archive_path(&target)
                    .ok_or("its hardlink target climbs out of the root")?;
                self.root
                    .create(path, &InodeType::Hardlink(PathBuf::from(&target)))
                    .map_err(|e| format!("hardlink to {target}: {}", chain(&e)))
            }
            tar::EntryType::Fifo => self
                .root
                .create(path, &InodeType::Fifo(Permissions::from_mode(mode & 0o777)))
                .map_err(pe),
            tar::EntryType::Char | tar::EntryType::Block => {
                self.report.warnings.push(format!(
                    "{path}: device node replaced by an empty file (rootless)"
                ));
                self.write_file(path, &mut io::empty(), mode & 0o666, uid, gid, mtime)
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.write_file(path, entry, mode, uid, gid, mtime)
            }
            other => {
                self.report
                    .warnings
                    .push(format!("{path}: tar entry type {other:?} skipped"));
                Ok(())
            }
        }
    }

    fn write_file(
        &mut self,
        path: &str,
        data: &mut dyn Read,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), String> {
        let mut file = self
            .root
            .create_file(
                path,
                OpenFlags::O_WRONLY
                    | OpenFlags::O_EXCL
                    | OpenFlags::O_NOFOLLOW
                    | OpenFlags::O_CLOEXEC,
                &Permissions::from_mode(0o600),
            )
            .map_err(|e| chain(&e))?;
        let mut buf = io::BufWriter::with_capacity(256 * 1024, &mut file);
        io::copy(data, &mut buf).map_err(|e| e.to_string())?;
        buf.flush().map_err(|e| e.to_string())?;
        drop(buf);
        let applied = if self.as_root { mode } else { mode & 0o1777 };
        if applied != mode {
            self.report.warnings.push(format!(
                "{path}: setuid/setgid bits recorded, not applied (rootless)"
            ));
        }
        self.set_owner(&file, uid, gid, mode)?;
        file.set_permissions(Permissions::from_mode(applied))
            .map_err(|e| e.to_string())?;
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        file.set_modified(t).map_err(|e| e.to_string())
    }

    /// As root: chown. Rootless: the `user.rootlesscontainers` xattr umoci writes, holding the
    /// owner (and for setuid files the full mode, in `user.lathe.mode`).
    fn set_owner(&self, file: &File, uid: u64, gid: u64, mode: u32) -> Result<(), String> {
        if self.as_root {
            return nix::unistd::fchown(file, Some((uid as u32).into()), Some((gid as u32).into()))
                .map_err(|e| e.to_string());
        }
        if uid != 0 || gid != 0 {
            set_xattr(
                file,
                "user.rootlesscontainers",
                &rootless_xattr(uid as u32, gid as u32),
            )?;
        }
        if mode & 0o6000 != 0 {
            set_xattr(file, "user.lathe.mode", format!("{mode:o}").as_bytes())?;
        }
        Ok(())
    }

    fn record_owner_of_dir(&self, path: &str, uid: u64, gid: u64) -> Result<(), String> {
        let dir = self
            .root
            .resolve(path)
            .and_then(|h| h.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY))
            .map_err(|e| chain(&e))?;
        self.set_owner(&dir, uid, gid, 0)
    }

    /// An opaque whiteout: removes every child of `dir` that this layer did not create.
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
    blob: Box<dyn Read + Send + '_>,
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

fn set_xattr(file: &File, name: &str, value: &[u8]) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).expect("xattr names have no NUL");
    // SAFETY: the fd is valid for the call; name and value point to live buffers of the given length.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
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
