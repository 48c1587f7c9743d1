//! The content store: unpacked root filesystems keyed by manifest digest, and the configs and
//! layers pulled from registries keyed by digest, under `$XDG_CACHE_HOME/lathe` (or `--store
//! DIR`), shared by concurrent lathe processes.
//!
//! Pulled blobs ([`Store::keep_pulled`]) are written to a temporary file as they stream past
//! and renamed to `blobs/sha256/HEX` only once the whole blob has matched its digest; they
//! are verified again whenever they are read back, and one that no longer matches is removed
//! so that the next read pulls it afresh. A second run or build of a registry image thus
//! asks the registry for its manifests only.
//!
//! A root filesystem is unpacked once, under an exclusive per-digest lock, into a temporary
//! sibling that is renamed into place whole; afterwards it is only ever read: runs get an
//! overlay or a private copy in the store's scratch area. Every user of the store holds a
//! shared lock on it, and `prune` takes it exclusively, so nothing in use is removed.
//!
//! A tree's files carry the image's owners where the caller can give them: root chowns; a
//! caller with subordinate ids has lathe's helper unpack as root of a user namespace mapping
//! them ([`Owners::Image`], the tree named `HEX-ids-UID-GID`, see [`crate::sandbox::mapped`]),
//! which is what `lathe run` uses; otherwise (and for builds, whose buildpacks run as the
//! caller's id) the files are the caller's, with the image's owners recorded in xattrs.
//!
//! The store is made on first use, not on open: `ls` and `prune` of a store that does not
//! exist report it empty and create nothing.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::Descriptor;

use crate::content::{self, Kind, VerifyingReader};
use crate::image::{ImageError, ImageSource};
use crate::progress::{ByteProgress, NoProgress};
use crate::reference::RegistryRef;
use crate::sandbox::SubordinateIds;
use crate::sandbox::mapped::{self, Task};
use crate::unpack::{self, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("{what}: {why}")]
    Helper { what: String, why: String },
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
    /// Whose ids its files carry: `caller` (this user's, or the image's when unpacked by
    /// root), or `ids-UID-GID` (the image's, through the subordinate ranges starting there).
    #[serde(default = "caller")]
    pub owners: String,
    /// The space it takes, measured when it was unpacked (trees never change).
    #[serde(default)]
    pub bytes: u64,
    #[serde(skip_deserializing)]
    pub last_used_secs_ago: u64,
}

fn caller() -> String {
    "caller".into()
}

/// Whose ids the files of a tree unpacked into the store carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owners {
    /// This process's: the image's when it may chown to them (root on a host, or root of a
    /// user namespace mapping ids 0–65535), otherwise the caller's, with the image's recorded
    /// in the `user.rootlesscontainers` xattr (see [`crate::unpack`]).
    Caller,
    /// The image's, through the caller's subordinate ids: unpacked, and removed, by a helper
    /// that is root of a user namespace mapping them ([`crate::sandbox::mapped`]), which
    /// `lathe_exe` (lathe itself) becomes.
    Image {
        ids: SubordinateIds,
        lathe_exe: PathBuf,
    },
}

impl Owners {
    /// The image's owners where the caller has subordinate ids, else the caller's.
    pub fn for_caller(lathe_exe: &Path) -> Owners {
        match crate::sandbox::subordinate_ids() {
            Some(ids) => Owners::Image {
                ids,
                lathe_exe: lathe_exe.to_path_buf(),
            },
            None => Owners::Caller,
        }
    }

    /// The record's `owners`, also the suffix of the tree's name (none for `caller`).
    fn tag(&self) -> Option<String> {
        match self {
            Owners::Caller => None,
            Owners::Image { ids, .. } => Some(ids.tag()),
        }
    }

    /// Removes `path`; trees of ids the caller does not own go to the helper.
    fn remove(&self, path: &Path) -> Result<(), StoreError> {
        match (self, crate::layout::remove_tree(path)) {
            (_, Ok(())) => Ok(()),
            (Owners::Caller, Err(e)) => Err(io_err(path)(e)),
            (Owners::Image { ids, lathe_exe }, Err(_)) => mapped::run_task(
                lathe_exe,
                ids,
                &Task::Remove {
                    path: path.to_path_buf(),
                },
                None,
                &NoProgress,
            )
            .map(drop)
            .map_err(|why| StoreError::Io {
                path: path.to_path_buf(),
                why,
            }),
        }
    }
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
        for sub in ["rootfs", "tmp", "locks", "blobs/sha256"] {
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

    /// The unpacked root filesystem of `manifest`, owned as this process unpacks
    /// ([`Owners::Caller`]), unpacking it first if the store lacks it. Returns the path and
    /// whether it was already there.
    pub fn rootfs(
        &self,
        source: &dyn ImageSource,
        manifest: &Descriptor,
        platform: &str,
        progress: &dyn ByteProgress,
    ) -> Result<(PathBuf, bool), StoreError> {
        self.rootfs_owned(source, manifest, platform, &Owners::Caller, progress)
    }

    /// The unpacked root filesystem of `manifest` with files owned as `owners` says,
    /// unpacking it first if the store lacks it. Returns the path and whether it was already
    /// there.
    pub fn rootfs_owned(
        &self,
        source: &dyn ImageSource,
        manifest: &Descriptor,
        platform: &str,
        owners: &Owners,
        progress: &dyn ByteProgress,
    ) -> Result<(PathBuf, bool), StoreError> {
        self.ensure()?;
        let name = match owners.tag() {
            None => manifest.digest().digest().to_string(),
            Some(tag) => format!("{}-{tag}", manifest.digest().digest()),
        };
        let path = self.dir.join("rootfs").join(&name);
        let record = self.dir.join("rootfs").join(format!("{name}.json"));
        let lock_path = self.dir.join("locks").join(format!("{name}.lock"));
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
            if fs::symlink_metadata(&path).is_ok() {
                // A tree without its record is from an older, interrupted store: redo it.
                owners.remove(&path)?;
            }
            let bytes = match owners {
                Owners::Caller => {
                    unpack::unpack(source, manifest, &path, progress)?;
                    tree_size(&path)
                }
                Owners::Image { ids, lathe_exe } => {
                    let task = Task::Unpack {
                        manifest: Box::new(manifest.clone()),
                        target: path.clone(),
                        describe: source.describe(),
                    };
                    let done = mapped::run_task(lathe_exe, ids, &task, Some(source), progress)
                        .map_err(|why| StoreError::Helper {
                            what: format!(
                                "unpacking {} with its owners (through subordinate ids {}:{})",
                                source.describe(),
                                ids.uids.0,
                                ids.gids.0
                            ),
                            why,
                        })?;
                    for warning in done["warnings"].as_array().into_iter().flatten() {
                        tracing::debug!("{}", warning.as_str().unwrap_or_default());
                    }
                    done["bytes"].as_u64().unwrap_or(0)
                }
            };
            let meta = RootfsRecord {
                digest: manifest.digest().to_string(),
                source: source.describe(),
                platform: platform.to_string(),
                owners: owners.tag().unwrap_or_else(caller),
                bytes,
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
        touch(&record);
        Ok((path, reused))
    }

    /// Removes a run's scratch directory, which holds files of the image's ids when the run
    /// had `owners`' ids.
    pub fn remove_scratch(&self, path: &Path, owners: &Owners) -> Result<(), StoreError> {
        owners.remove(path)
    }

    /// `source`, with the configs and layers it reads kept in the store when it is a registry
    /// (layouts and archives are local already, and read where they are).
    pub fn keep_pulled<'a>(
        &self,
        source: &'a dyn ImageSource,
    ) -> Result<Box<dyn ImageSource + 'a>, StoreError> {
        self.cached(Inner::Borrowed(source))
    }

    /// [`Store::keep_pulled`] for a source the result owns.
    pub fn keep_pulled_owned(
        &self,
        source: Box<dyn ImageSource>,
    ) -> Result<Box<dyn ImageSource>, StoreError> {
        self.cached(Inner::Owned(source))
    }

    fn cached<'a>(&self, inner: Inner<'a>) -> Result<Box<dyn ImageSource + 'a>, StoreError> {
        let keep = if inner.get().registry_location().is_some() {
            self.ensure()?;
            Some((self.dir.join("blobs"), self.dir.join("tmp")))
        } else {
            None
        };
        Ok(Box::new(CachedSource { inner, keep }))
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
            if record.bytes == 0 {
                record.bytes = tree_size(&dir.join(hex));
            }
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
        // What runs with subordinate ids left can hold files of those ids: lathe's helper
        // removes what the caller can't.
        let owners = match std::env::current_exe() {
            Ok(exe) => Owners::for_caller(&exe),
            Err(_) => Owners::Caller,
        };
        let tmp = dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            report.bytes += tree_size(&entry.path());
            owners.remove(&entry.path())?;
            report.scratch_dirs += 1;
        }
        let stale = |path: &Path| match (unused_for, last_use(path)) {
            (None, _) | (_, None) => true,
            (Some(limit), Some(age)) => age > limit,
        };
        let blobs = dir.join("blobs");
        for algorithm in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let algorithm = algorithm.path();
            for blob in fs::read_dir(&algorithm).map_err(io_err(&algorithm))? {
                let path = blob.map_err(io_err(&algorithm))?.path();
                if stale(&path) {
                    report.bytes += tree_size(&path);
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    report.blobs += 1;
                }
            }
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
            if stale(&record) {
                let recorded = fs::read(&record)
                    .ok()
                    .and_then(|text| serde_json::from_slice::<RootfsRecord>(&text).ok())
                    .map_or(0, |r| r.bytes);
                report.bytes += if recorded > 0 {
                    recorded
                } else {
                    tree_size(&path)
                };
                owners.remove(&path)?;
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
    /// Pulled configs and layers.
    pub blobs: usize,
    pub bytes: u64,
}

/// How long ago `path` was last used (its mtime, which every use sets).
fn last_use(path: &Path) -> Option<Duration> {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
}

/// Marks `path` as used now, for prune.
fn touch(path: &Path) {
    let _ = File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
}

enum Inner<'a> {
    Owned(Box<dyn ImageSource + 'a>),
    Borrowed(&'a dyn ImageSource),
}

impl Inner<'_> {
    fn get(&self) -> &dyn ImageSource {
        match self {
            Inner::Owned(source) => source.as_ref(),
            Inner::Borrowed(source) => *source,
        }
    }
}

/// A source whose configs and layers are read from the store when it has them, and kept
/// there when they are pulled (see the module's doc). Manifests, and what a tag names, always
/// come from the source itself.
struct CachedSource<'a> {
    inner: Inner<'a>,
    /// The store's `blobs` and `tmp` directories, when blobs are kept.
    keep: Option<(PathBuf, PathBuf)>,
}

impl ImageSource for CachedSource<'_> {
    fn describe(&self) -> String {
        self.inner.get().describe()
    }

    fn root(&self) -> Descriptor {
        self.inner.get().root()
    }

    fn registry_location(&self) -> Option<&RegistryRef> {
        self.inner.get().registry_location()
    }

    fn tagged(&self, tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
        self.inner.get().tagged(tag)
    }

    fn referrers_api(
        &self,
        subject: &oci_spec::image::Digest,
    ) -> Result<Option<Vec<Descriptor>>, ImageError> {
        self.inner.get().referrers_api(subject)
    }

    fn layout_entries(&self) -> Result<Option<Vec<Descriptor>>, ImageError> {
        self.inner.get().layout_entries()
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let inner = self.inner.get();
        let Some((blobs, tmp)) = &self.keep else {
            return inner.open_blob(desc);
        };
        if content::kind_of(desc.media_type()) != Kind::Other
            || content::check_descriptor(desc).is_err()
        {
            return inner.open_blob(desc);
        }
        let digest = desc.digest();
        let path = blobs
            .join(digest.algorithm().to_string())
            .join(digest.digest());
        let what = format!(
            "{} (kept in the store as {})",
            self.describe(),
            path.display()
        );
        match File::open(&path) {
            Ok(file) => {
                touch(&path);
                return Ok(Box::new(KeptBlob {
                    reader: VerifyingReader::new(file, desc, what),
                    path,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: {e}; pulling the blob again", path.display()),
        }
        let reader = inner.open_blob(desc)?;
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(tmp)
            .map_err(|e| tracing::warn!("{}: {e}; the blob is not kept", tmp.display()))
            .ok();
        Ok(Box::new(Keeping {
            reader: VerifyingReader::new(reader, desc, self.describe()),
            file,
            path,
        }))
    }
}

/// A blob read back from the store; removed when it no longer matches its digest.
struct KeptBlob {
    reader: VerifyingReader<File>,
    path: PathBuf,
}

impl Read for KeptBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf).inspect_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                let _ = fs::remove_file(&self.path);
            }
        })
    }
}

/// A blob on its way from the registry, copied to a temporary file that becomes the kept
/// blob once the whole blob has come through and matched its digest.
struct Keeping<'a> {
    reader: VerifyingReader<Box<dyn Read + Send + 'a>>,
    file: Option<tempfile::NamedTempFile>,
    path: PathBuf,
}

impl Read for Keeping<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.reader.read(buf) {
            Ok(n) => n,
            Err(e) => {
                self.file = None; // removes the partial copy
                return Err(e);
            }
        };
        if n > 0 {
            if let Some(file) = &mut self.file
                && let Err(e) = file.write_all(&buf[..n])
            {
                tracing::warn!("{}: {e}; the blob is not kept", file.path().display());
                self.file = None;
            }
        } else if let Some(file) = self.file.take()
            && let Err(e) = file.persist(&self.path)
        {
            tracing::warn!("{}: {e}; the blob is not kept", self.path.display());
        }
        Ok(n)
    }
}

/// The disk space a tree takes (what its reader can see of it).
pub fn tree_size(path: &Path) -> u64 {
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
    use oci_spec::image::MediaType;

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

    /// A registry-like source of in-memory blobs that counts what it is asked for.
    struct FakeRegistry {
        location: RegistryRef,
        blobs: std::collections::HashMap<String, Vec<u8>>,
        opened: std::sync::Mutex<Vec<String>>,
        registry: bool,
    }

    impl FakeRegistry {
        fn new(registry: bool) -> FakeRegistry {
            FakeRegistry {
                location: RegistryRef {
                    registry: "127.0.0.1:1".into(),
                    repository: "test/image".into(),
                    tag: Some("1".into()),
                    digest: None,
                },
                blobs: Default::default(),
                opened: Default::default(),
                registry,
            }
        }

        /// Adds a blob of `media_type` holding `bytes`; returns its descriptor.
        fn add(&mut self, media_type: MediaType, bytes: &[u8]) -> Descriptor {
            let desc = Descriptor::new(
                media_type,
                bytes.len() as u64,
                content::sha256_digest(bytes),
            );
            self.blobs.insert(desc.digest().to_string(), bytes.to_vec());
            desc
        }

        fn opened(&self) -> Vec<String> {
            self.opened.lock().unwrap().clone()
        }
    }

    impl ImageSource for FakeRegistry {
        fn describe(&self) -> String {
            "docker://127.0.0.1:1/test/image:1".into()
        }
        /// An empty manifest: the store's tests only open blobs.
        fn root(&self) -> Descriptor {
            Descriptor::new(MediaType::ImageManifest, 0, content::sha256_digest(b""))
        }
        fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
            self.opened.lock().unwrap().push(desc.digest().to_string());
            Ok(Box::new(io::Cursor::new(
                self.blobs[&desc.digest().to_string()].clone(),
            )))
        }
        fn registry_location(&self) -> Option<&RegistryRef> {
            self.registry.then_some(&self.location)
        }
    }

    fn read_all(source: &dyn ImageSource, desc: &Descriptor) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        source
            .open_blob(desc)
            .map_err(io::Error::other)?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    fn kept(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("blobs/sha256"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn tmp_is_empty(dir: &Path) -> bool {
        fs::read_dir(dir.join("tmp")).map_or(true, |mut d| d.next().is_none())
    }

    #[test]
    fn pulled_blobs_are_kept_once_whole_and_read_back_from_the_store() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let mut registry = FakeRegistry::new(true);
        let layer_bytes = vec![7u8; 300_000];
        let layer = registry.add(MediaType::ImageLayerGzip, &layer_bytes);
        let config = registry.add(MediaType::ImageConfig, b"{}");
        let manifest = registry.add(MediaType::ImageManifest, b"{\"m\":1}");
        let store = Store::open(&dir).unwrap();
        let source = store.keep_pulled(&registry).unwrap();
        assert_eq!(source.describe(), registry.describe());
        assert!(source.registry_location().is_some());

        // Read halfway and dropped: nothing is kept, nothing is left in tmp.
        let mut half = vec![0; 1000];
        source
            .open_blob(&layer)
            .unwrap()
            .read_exact(&mut half)
            .unwrap();
        assert!(kept(&dir).is_empty() && tmp_is_empty(&dir));

        for desc in [&layer, &config, &manifest] {
            read_all(source.as_ref(), desc).unwrap();
        }
        let mut want = vec![
            layer.digest().digest().to_string(),
            config.digest().digest().to_string(),
        ];
        want.sort();
        let mut have = kept(&dir);
        have.sort();
        assert_eq!(have, want, "layers and configs are kept; manifests are not");
        assert!(tmp_is_empty(&dir));
        assert_eq!(registry.opened().len(), 4);

        // Read back from the store, by this handle and by a new one.
        assert_eq!(read_all(source.as_ref(), &layer).unwrap(), layer_bytes);
        drop(source);
        let again = Store::open(&dir).unwrap();
        let source = again.keep_pulled(&registry).unwrap();
        assert_eq!(read_all(source.as_ref(), &config).unwrap(), b"{}");
        assert_eq!(read_all(source.as_ref(), &manifest).unwrap(), b"{\"m\":1}");
        assert_eq!(
            registry.opened()[4..],
            [manifest.digest().to_string()],
            "only the manifest came from the registry"
        );
    }

    #[test]
    fn a_blob_that_does_not_match_is_neither_kept_nor_served_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let mut registry = FakeRegistry::new(true);
        let layer = registry.add(MediaType::ImageLayer, b"the real bytes");
        let store = Store::open(&dir).unwrap();
        let source = store.keep_pulled(&registry).unwrap();

        // The registry sends other bytes: an error, and nothing kept.
        let good = registry.blobs.clone();
        let mut lying = FakeRegistry::new(true);
        lying.blobs = good
            .keys()
            .map(|k| (k.clone(), b"the fake bytes".to_vec()))
            .collect();
        let lying_source = store.keep_pulled(&lying).unwrap();
        let err = read_all(lying_source.as_ref(), &layer).unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        assert!(kept(&dir).is_empty() && tmp_is_empty(&dir));

        // A kept blob changed on disk: the read fails, the blob is removed, the next read
        // pulls it again.
        read_all(source.as_ref(), &layer).unwrap();
        let path = dir.join("blobs/sha256").join(layer.digest().digest());
        fs::write(&path, b"the evil bytes").unwrap();
        let err = read_all(source.as_ref(), &layer).unwrap_err();
        assert!(err.to_string().contains("kept in the store"), "{err}");
        assert!(!path.exists());
        assert_eq!(
            read_all(source.as_ref(), &layer).unwrap(),
            b"the real bytes"
        );
        assert_eq!(registry.opened().len(), 2);
        assert!(path.exists());
    }

    #[test]
    fn local_sources_are_read_where_they_are() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let mut layout = FakeRegistry::new(false);
        let layer = layout.add(MediaType::ImageLayer, b"bytes");
        let store = Store::open(&dir).unwrap();
        let source = store.keep_pulled(&layout).unwrap();
        read_all(source.as_ref(), &layer).unwrap();
        read_all(source.as_ref(), &layer).unwrap();
        assert_eq!(layout.opened().len(), 2);
        assert!(!dir.exists(), "nothing kept, no store made");
    }

    #[test]
    fn prune_removes_blobs_unused_for_long_enough_or_all() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let mut registry = FakeRegistry::new(true);
        let old = registry.add(MediaType::ImageLayer, b"old");
        let new = registry.add(MediaType::ImageLayer, b"new");
        {
            let store = Store::open(&dir).unwrap();
            let source = store.keep_pulled(&registry).unwrap();
            read_all(source.as_ref(), &old).unwrap();
            read_all(source.as_ref(), &new).unwrap();
        }
        let old_path = dir.join("blobs/sha256").join(old.digest().digest());
        File::options()
            .write(true)
            .open(&old_path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3 * 86_400))
            .unwrap();
        let report = Store::prune(&dir, Some(Duration::from_secs(86_400))).unwrap();
        assert_eq!(report.blobs, 1);
        assert_eq!(kept(&dir), [new.digest().digest().to_string()]);
        let report = Store::prune(&dir, None).unwrap();
        assert_eq!(report.blobs, 1);
        assert!(kept(&dir).is_empty());
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
