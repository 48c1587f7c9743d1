//! The content store: unpacked root filesystems keyed by manifest digest, under
//! `$XDG_CACHE_HOME/lathe` (or `--store DIR`), shared by concurrent lathe processes.
//!
//! A root filesystem is unpacked once, under an exclusive per-digest lock, into a temporary
//! sibling that is renamed into place whole; afterwards it is only ever read: runs get an
//! overlay or a private copy in the store's scratch area. Every user of the store holds a
//! shared lock on it, and `prune` takes it exclusively, so nothing in use is removed.
//!
//! The store is made on first use, not on open: `ls` and `prune` of a store that does not
//! exist report it empty and create nothing.

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
    /// Shared from the handle's first use for as long as it lives; prune takes it
    /// exclusively.
    lock: std::sync::Mutex<Option<Flock<File>>>,
}

/// The file every user of a store locks; it exists once a store has been used.
const LOCK_FILE: &str = "locks/store.lock";

impl Store {
    /// `dir`, or `$XDG_CACHE_HOME/lathe`, or `~/.cache/lathe`.
    pub fn default_dir() -> PathBuf {
        if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(cache).join("lathe");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        PathBuf::from(home).join(".cache/lathe")
    }

    /// A handle on the store in `dir`. Nothing is created until it is used; a store that
    /// exists is locked (shared) at once.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            dir: dir.to_path_buf(),
            lock: std::sync::Mutex::new(None),
        };
        if store.exists() {
            store.ensure()?;
        }
        Ok(store)
    }

    /// Whether a lathe process has ever used this store.
    fn exists(&self) -> bool {
        self.dir.join(LOCK_FILE).is_file()
    }

    /// Makes the store's directories and takes the shared lock, once.
    fn ensure(&self) -> Result<(), StoreError> {
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if lock.is_none() {
            *lock = Some(Self::lock_dir(&self.dir, FlockArg::LockShared)?);
        }
        Ok(())
    }

    fn lock_dir(dir: &Path, how: FlockArg) -> Result<Flock<File>, StoreError> {
        for sub in ["rootfs", "tmp", "locks"] {
            fs::create_dir_all(dir.join(sub)).map_err(io_err(dir))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        Flock::lock(file, how).map_err(|(_, e)| StoreError::Io {
            path: lock_path.clone(),
            why: e.to_string(),
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
        self.ensure()?;
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
        self.ensure()?;
        let tmp = self.dir.join("tmp");
        tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp))
    }

    /// The root filesystems in the store, most recently used first (none, and nothing
    /// created, when the store does not exist).
    pub fn list(&self) -> Result<Vec<RootfsRecord>, StoreError> {
        if !self.exists() {
            return Ok(Vec::new());
        }
        self.ensure()?;
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
    /// them when `None`), and unfinished unpacks. Waits for running users of the store. A
    /// store that does not exist is left so.
    pub fn prune(dir: &Path, unused_for: Option<Duration>) -> Result<PruneReport, StoreError> {
        let mut report = PruneReport::default();
        if !dir.join(LOCK_FILE).is_file() {
            return Ok(report);
        }
        let _lock = Self::lock_dir(dir, FlockArg::LockExclusive)?;
        let tmp = dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            report.bytes += tree_size(&entry.path());
            crate::layout::remove_tree(&entry.path()).map_err(io_err(&entry.path()))?;
            report.scratch_dirs += 1;
        }
        let rootfs = dir.join("rootfs");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = walkdir::WalkDir::new(dir)
            .into_iter()
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn ls_and_prune_of_a_store_that_does_not_exist_create_nothing() {
        let parent = tempfile::tempdir().unwrap();
        let missing = parent.path().join("store");
        assert!(Store::open(&missing).unwrap().list().unwrap().is_empty());
        let report = Store::prune(&missing, None).unwrap();
        assert_eq!((report.root_filesystems, report.scratch_dirs), (0, 0));
        assert!(
            !missing.exists(),
            "ls or prune created {}",
            missing.display()
        );
        // An empty directory given as the store stays empty too.
        fs::create_dir(&missing).unwrap();
        assert!(Store::open(&missing).unwrap().list().unwrap().is_empty());
        Store::prune(&missing, Some(Duration::from_secs(1))).unwrap();
        assert_eq!(entries(&missing), [missing.display().to_string()]);
    }

    #[test]
    fn a_store_is_made_on_first_use_and_then_locked() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let store = Store::open(&dir).unwrap();
        assert!(!dir.exists());
        let scratch = store.scratch().unwrap();
        assert!(scratch.path().starts_with(dir.join("tmp")));
        assert!(dir.join(LOCK_FILE).is_file());
        // The shared lock is held: an exclusive one can't be had while the handle lives.
        let file = File::open(dir.join(LOCK_FILE)).unwrap();
        let refused = Flock::lock(file, FlockArg::LockExclusiveNonblock);
        assert!(refused.is_err(), "the handle holds no lock");
        drop(refused);
        drop(scratch);
        drop(store);
        let file = File::open(dir.join(LOCK_FILE)).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
        // Opening a store that exists locks it at once.
        let store = Store::open(&dir).unwrap();
        let file = File::open(dir.join(LOCK_FILE)).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err());
        drop(store);
    }
}
