//! The content store: unpacked root filesystems keyed by manifest digest, under
//! `$XDG_CACHE_HOME/lathe` (or `--store DIR`), shared by concurrent lathe processes.
//!
//! A root filesystem is unpacked once, under an exclusive per-digest lock, into a temporary
//! sibling that is renamed into place whole; afterwards it is only ever read: runs get an
//! overlay or a private copy in the store's scratch area. Every user of the store holds a
//! shared lock on it, and `prune` takes it exclusively, so nothing in use is removed.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::Descriptor;

use crate::image::ImageSource;
use crate::progress::ByteProgress;
use crate::unpack::{self, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// What `ls` shows of one root filesystem.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RootfsRecord {
    pub digest: String,
    pub source: String,
    pub platform: String,
    #[serde(skip_deserializing)]
    pub bytes: u64,
    #[serde(skip_deserializing)]
    pub last_used_secs_ago: u64,
}

pub struct Store {
    dir: PathBuf,
    /// Shared for as long as this handle lives; prune takes it exclusively.
    _lock: Flock<File>,
}

impl Store {
    /// `dir`, or `$XDG_CACHE_HOME/lathe`, or `~/.cache/lathe`.
    pub fn default_dir() -> PathBuf {
        if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(cache).join("lathe");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        PathBuf::from(home).join(".cache/lathe")
    }

    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_locked(dir, FlockArg::LockShared)
    }

    fn open_locked(dir: &Path, how: FlockArg) -> Result<Store, StoreError> {
        for sub in ["rootfs", "tmp", "locks"] {
            fs::create_dir_all(dir.join(sub)).map_err(io_err(dir))?;
        }
        let lock_path = dir.join("locks/store.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = Flock::lock(file, how).map_err(|(_, e)| StoreError::Io {
            path: lock_path.clone(),
            why: e.to_string(),
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unpacked root filesystem of `manifest`, unpacking it first if the store lacks it.
    /// Returns the path and whether it was already there.
    pub fn rootfs(
        &self,
        source: &dyn ImageSource,
        manifest: &Descriptor,
        platform: &str,
        progress: &dyn ByteProgress,
    ) -> Result<(PathBuf, bool), StoreError> {
        let hex = manifest.digest().digest().to_string();
        let path = self.dir.join("rootfs").join(&hex);
        let record = self.dir.join("rootfs").join(format!("{hex}.json"));
        let lock_path = self.dir.join("locks").join(format!("{hex}.lock"));
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let _lock =
            Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| StoreError::Io {
                path: lock_path.clone(),
                why: e.to_string(),
            })?;
        let reused = path.is_dir() && record.is_file();
        if !reused {
            if path.exists() {
                // A tree without its record is from an older, interrupted store: redo it.
                crate::layout::remove_tree(&path).map_err(io_err(&path))?;
            }
            unpack::unpack(source, manifest, &path, progress)?;
            let meta = RootfsRecord {
                digest: manifest.digest().to_string(),
                source: source.describe(),
                platform: platform.to_string(),
                bytes: 0,
                last_used_secs_ago: 0,
            };
            crate::layout::write_atomically(
                &record,
                &serde_json::to_vec_pretty(&meta).expect("records serialize"),
            )
            .map_err(|e| StoreError::Io {
                path: record.clone(),
                why: e.to_string(),
            })?;
        }
        // The record's mtime is the last use, for prune.
        let _ = File::options()
            .write(true)
            .open(&record)
            .and_then(|f| f.set_modified(SystemTime::now()));
        Ok((path, reused))
    }

    /// A fresh scratch directory for one run, removed when dropped.
    pub fn scratch(&self) -> Result<tempfile::TempDir, StoreError> {
        let tmp = self.dir.join("tmp");
        tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp))
    }

    /// The root filesystems in the store, most recently used first.
    pub fn list(&self) -> Result<Vec<RootfsRecord>, StoreError> {
        let dir = self.dir.join("rootfs");
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(text) = fs::read(entry.path()) else {
                continue;
            };
            let Ok(mut record) = serde_json::from_slice::<RootfsRecord>(&text) else {
                continue;
            };
            record.bytes = tree_size(&dir.join(hex));
            record.last_used_secs_ago = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs());
            found.push(record);
        }
        found.sort_by_key(|r| r.last_used_secs_ago);
        Ok(found)
    }

    /// Removes what killed runs left behind, root filesystems unused for `unused_for` (all of
    /// them when `None`), and unfinished unpacks. Waits for running users of the store.
    pub fn prune(dir: &Path, unused_for: Option<Duration>) -> Result<PruneReport, StoreError> {
        let store = Store::open_locked(dir, FlockArg::LockExclusive)?;
        let mut report = PruneReport::default();
        let tmp = store.dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            report.bytes += tree_size(&entry.path());
            crate::layout::remove_tree(&entry.path()).map_err(io_err(&entry.path()))?;
            report.scratch_dirs += 1;
        }
        let rootfs = store.dir.join("rootfs");
        for entry in fs::read_dir(&rootfs).map_err(io_err(&rootfs))? {
            let entry = entry.map_err(io_err(&rootfs))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                continue;
            }
            let record = rootfs.join(format!("{name}.json"));
            let last_use = fs::metadata(&record)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            let stale = match (unused_for, last_use) {
                (None, _) | (_, None) => true,
                (Some(limit), Some(age)) => age > limit,
            };
            if stale {
                report.bytes += tree_size(&path);
                crate::layout::remove_tree(&path).map_err(io_err(&path))?;
                let _ = fs::remove_file(&record);
                report.root_filesystems += 1;
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PruneReport {
    pub root_filesystems: usize,
    pub scratch_dirs: usize,
    pub bytes: u64,
}

fn tree_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}
