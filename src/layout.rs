//! The OCI image layout store: reading a layout directory with every blob verified, and
//! changing one atomically through a [`Transaction`].
//!
//! Built directly on oci-spec rather than ocidir: ocidir forces OpenSSL and flate2's C zlib on
//! the whole dependency graph (so gzip bytes, and with them layer digests, would depend on the
//! host's libz), never fsyncs, and has no locking, index-entry replacement or garbage
//! collection, all of which lathe needs.
//!
//! Crash safety: blobs are written to a staging directory, fsynced and renamed into
//! `blobs/sha256` before `index.json` is replaced (temp file, fsync, rename, fsync of the
//! directory). A crash at any point leaves the old index with every blob it names, or the new
//! one with every blob it names. Writers and the garbage collector take an exclusive `flock`
//! on the layout directory for the short commit step; readers need no lock because
//! `index.json` is replaced atomically and blobs never change.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest, MediaType};
use serde_json::{Value, json};

use crate::attachments;
use crate::content::{self, HashingWriter, Kind, VerifyingReader};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const STAGING_PREFIX: &str = ".lathe-staging-";
const TMP_PREFIX: &str = ".lathe-tmp-";
/// Tag of the staging directory a writer creating a new layout makes beside it.
const NEW_LAYOUT_TAG: &str = "new";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{dir} is not an OCI image layout: {why}")]
    NotALayout { dir: PathBuf, why: String },
    #[error("{path} is not valid: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("oci:{dir}: {why}")]
    Ambiguous { dir: PathBuf, why: String },
    #[error("oci:{dir}: blob {digest} is missing")]
    MissingBlob { dir: PathBuf, digest: Digest },
    #[error("oci:{dir}: {why}")]
    BadBlob { dir: PathBuf, why: String },
    #[error("{dir} exists and is not an empty directory or an OCI image layout")]
    NotEmpty { dir: PathBuf },
}

type Result<T, E = LayoutError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An existing OCI image layout directory, opened for reading.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Opens `dir`, checking `oci-layout` and that `index.json` parses.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Layout> {
        let layout = Layout { dir: dir.into() };
        layout.check_layout_file()?;
        layout.index_entries()?;
        Ok(layout)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_layout_file(&self) -> Result<()> {
        let path = self.dir.join(LAYOUT_FILE);
        let not_layout = |why: String| LayoutError::NotALayout {
            dir: self.dir.clone(),
            why,
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_layout(format!("it has no {LAYOUT_FILE} file")));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| LayoutError::BadFile {
            path: path.clone(),
            why: e.to_string(),
        })?;
        match value.get("imageLayoutVersion").and_then(Value::as_str) {
            Some(v) if v.starts_with("1.") => Ok(()),
            other => Err(LayoutError::BadFile {
                path,
                why: format!("unsupported imageLayoutVersion {other:?}"),
            }),
        }
    }

    /// The descriptors in `index.json`, in order.
    pub fn index_entries(&self) -> Result<Vec<Descriptor>> {
        let path = self.dir.join(INDEX_FILE);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| LayoutError::BadFile {
                path: path.clone(),
                why: e.to_string(),
            })?;
        for desc in index.manifests() {
            content::check_descriptor(desc).map_err(|why| LayoutError::BadFile {
                path: path.clone(),
                why,
            })?;
        }
        Ok(index.manifests().clone())
    }

    /// The descriptor for ref `name`; see [`resolve_ref`].
    pub fn resolve(&self, name: Option<&str>) -> Result<Descriptor> {
        resolve_ref(&self.index_entries()?, name).map_err(|why| LayoutError::Ambiguous {
            dir: self.dir.clone(),
            why,
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.dir, digest)
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob; the reader fails at end of stream unless size and digest match.
    pub fn open_blob(&self, desc: &Descriptor) -> Result<VerifyingReader<File>> {
        content::check_descriptor(desc).map_err(|why| LayoutError::BadBlob {
            dir: self.dir.clone(),
            why,
        })?;
        let path = self.blob_path(desc.digest());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob {
                    dir: self.dir.clone(),
                    digest: desc.digest().clone(),
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len != desc.size() {
            return Err(LayoutError::BadBlob {
                dir: self.dir.clone(),
                why: format!(
                    "blob {} is {len} bytes but its descriptor says {}",
                    desc.digest(),
                    desc.size()
                ),
            });
        }
        Ok(VerifyingReader::new(
            file,
            desc,
            format!("oci:{}", self.dir.display()),
        ))
    }

    /// Reads a manifest, index or config blob, verified.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let reader = self.open_blob(desc)?;
        content::read_small_blob(reader, desc, &format!("oci:{}", self.dir.display())).map_err(
            |e| LayoutError::BadBlob {
                dir: self.dir.clone(),
                why: e.to_string(),
            },
        )
    }

    fn lock(&self) -> Result<Flock<File>> {
        lock_dir(&self.dir, FlockArg::LockExclusive)
    }

    /// Removes every blob that no `index.json` entry reaches, and staging directories left by
    /// killed writers (inside the layout, and beside it for writers that were creating it).
    /// Returns the number of blobs removed and the bytes freed.
    pub fn gc(&self) -> Result<(usize, u64)> {
        let _lock = self.lock()?;
        let mut live = BTreeSet::new();
        let mut pending = self.index_entries()?;
        while let Some(desc) = pending.pop() {
            if !live.insert(desc.digest().to_string()) {
                continue;
            }
            match content::kind_of(desc.media_type()) {
                Kind::Index => {
                    let index: ImageIndex = parse_json(&self.read_blob(&desc)?, &self.dir, &desc)?;
                    pending.extend(index.manifests().iter().cloned());
                }
                Kind::Manifest => {
                    let manifest: ImageManifest =
                        parse_json(&self.read_blob(&desc)?, &self.dir, &desc)?;
                    pending.push(manifest.config().clone());
                    pending.extend(manifest.layers().iter().cloned());
                }
                Kind::Other => {}
            }
        }
        let blobs = self.dir.join("blobs/sha256");
        let (mut removed, mut freed) = (0, 0);
        for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let entry = entry.map_err(io_err(&blobs))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&format!("sha256:{name}")) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                removed += 1;
            }
        }
        remove_stale_staging(&self.dir, STAGING_PREFIX)?;
        // Temp files of an index.json write killed mid-way (they are only written under the
        // lock we hold, so none is live).
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
            }
        }
        // A writer killed while creating this layout left its staging directory beside it
        // (see `Transaction::begin`); best effort, as the parent is not the layout's.
        if let Ok(real) = fs::canonicalize(&self.dir)
            && let Some(parent) = real.parent()
        {
            let _ = remove_stale_staging(parent, &sibling_temp_prefix(&real, NEW_LAYOUT_TAG));
        }
        sync_dir(&blobs)?;
        Ok((removed, freed))
    }
}

/// Removes the directories in `dir` whose names start with `prefix` and that no live writer
/// holds locked (symlinks and files are left alone).
fn remove_stale_staging(dir: &Path, prefix: &str) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name().to_string_lossy().starts_with(prefix)
            && entry.file_type().is_ok_and(|t| t.is_dir())
            && lock_dir(&entry.path(), FlockArg::LockExclusiveNonblock).is_ok()
        {
            fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    dir: &Path,
    desc: &Descriptor,
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| LayoutError::BadBlob {
        dir: dir.to_path_buf(),
        why: format!("{} {} is not valid: {e}", desc.media_type(), desc.digest()),
    })
}

/// Picks the entry named `name` from an index. With no name: `latest`, else the only image
/// (per-platform refs `NAME-os-arch` of another entry do not count).
pub fn resolve_ref(entries: &[Descriptor], name: Option<&str>) -> Result<Descriptor, String> {
    let names: Vec<String> = entries.iter().filter_map(ref_name).collect();
    let available = || {
        if names.is_empty() {
            "no named images".to_string()
        } else {
            names.join(", ")
        }
    };
    if let Some(name) = name {
        return find_ref(entries, name)
            .ok_or_else(|| format!("no image named {name:?} (it has: {})", available()));
    }
    if let Some(found) = find_ref(entries, crate::reference::DEFAULT_TAG) {
        return Ok(found);
    }
    // Attachments are not images of their own: cosign tags and fallback tags by their names,
    // unnamed referrers by the artifactType their entries carry.
    let roots: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| match ref_name(d) {
            Some(n) => {
                !attachments::is_attachment_tag(&n)
                    && !names
                        .iter()
                        .any(|other| n.starts_with(&format!("{other}-")))
            }
            None => d.artifact_type().is_none(),
        })
        .collect();
    match roots.as_slice() {
        [only] => Ok((*only).clone()),
        [] => Err("it holds no image".into()),
        _ => Err(format!(
            "no image named \"latest\" and more than one image; name one of: {}",
            available()
        )),
    }
}

/// The last entry named `name` (a later entry of the same name wins, as lathe replaces them).
pub fn find_ref(entries: &[Descriptor], name: &str) -> Option<Descriptor> {
    entries
        .iter()
        .rev()
        .find(|d| ref_name(d).as_deref() == Some(name))
        .cloned()
}

/// The index entries to write for an image stored under `name`: the image itself and, for an
/// index, each platform child as `NAME-os-arch[-variant]` so that tools which cannot open an
/// index (umoci, oci-image-tool) reach every platform.
pub fn refs_for(
    name: &str,
    root: &Descriptor,
    children: &[(crate::platform::Platform, Descriptor)],
) -> Vec<(String, Descriptor)> {
    let mut refs = vec![(name.to_string(), root.clone())];
    let mut seen = BTreeSet::new();
    for (platform, child) in children {
        let child_name = format!("{name}-{}", platform.ref_suffix());
        if seen.insert(child_name.clone()) {
            let mut child = child.clone();
            child.set_platform(Some(platform.to_oci()));
            refs.push((child_name, child));
        }
    }
    refs
}

pub fn ref_name(desc: &Descriptor) -> Option<String> {
    desc.annotations().as_ref()?.get(REF_NAME).cloned()
}

/// A copy of `desc` annotated with ref name `name` (other annotations kept).
pub fn with_ref_name(desc: &Descriptor, name: &str) -> Descriptor {
    let mut desc = desc.clone();
    let mut annotations = desc.annotations().clone().unwrap_or_default();
    annotations.insert(REF_NAME.to_string(), name.to_string());
    desc.set_annotations(Some(annotations));
    desc
}

/// The prefix of a temporary file or directory made beside `path` while it is being written:
/// `.NAME.lathe-TAG-`. Hidden, and recognisable by gc.
pub fn sibling_temp_prefix(path: &Path, tag: &str) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.lathe-{tag}-")
}

/// The directory `path` sits in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn blob_path_in(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs")
        .join(digest.algorithm().to_string())
        .join(digest.digest())
}

fn lock_dir(dir: &Path, how: FlockArg) -> Result<Flock<File>> {
    let file = File::open(dir).map_err(io_err(dir))?;
    Flock::lock(file, how).map_err(|(_, errno)| io_err(dir)(io::Error::from(errno)))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the dir.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    sync_dir(dir)
}

/// A change to a layout: blobs are staged, and [`Transaction::commit`] makes them and the new
/// index entries visible at once. Dropping a transaction without committing leaves the
/// destination exactly as it was.
pub struct Transaction {
    target: PathBuf,
    /// `Some` when adding to an existing layout; `None` when creating a new one.
    existing: Option<Layout>,
    staging: tempfile::TempDir,
    _staging_lock: Flock<File>,
    staged: BTreeSet<String>,
}

impl Transaction {
    /// Starts a change to the layout at `dir`, which must be a layout, an empty directory, or
    /// not exist yet (its parent must).
    pub fn begin(dir: impl Into<PathBuf>) -> Result<Transaction> {
        let target: PathBuf = dir.into();
        let existing = match fs::read_dir(&target) {
            Ok(mut entries) => {
                if target.join(LAYOUT_FILE).exists() {
                    Some(Layout::open(&target)?)
                } else if entries.next().is_none() {
                    None
                } else {
                    return Err(LayoutError::NotEmpty { dir: target });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(LayoutError::NotEmpty { dir: target });
            }
            Err(e) => return Err(io_err(&target)(e)),
        };
        let staging = match &existing {
            Some(_) => tempfile::Builder::new()
                .prefix(STAGING_PREFIX)
                .tempdir_in(&target),
            None => tempfile::Builder::new()
                .prefix(&sibling_temp_prefix(&target, NEW_LAYOUT_TAG))
                .permissions(fs::Permissions::from_mode(0o755))
                .tempdir_in(parent_dir(&target)),
        }
        .map_err(io_err(&target))?;
        let staging_lock = lock_dir(staging.path(), FlockArg::LockExclusive)?;
        if existing.is_none() {
            let blobs = staging.path().join("blobs/sha256");
            fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        }
        Ok(Transaction {
            target,
            existing,
            staging,
            _staging_lock: staging_lock,
            staged: BTreeSet::new(),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    fn staged_path(&self, hex: &str) -> PathBuf {
        match self.existing {
            Some(_) => self.staging.path().join(hex),
            None => self.staging.path().join("blobs/sha256").join(hex),
        }
    }

    /// Whether the blob is already in the destination or staged.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.staged.contains(digest.digest())
            || self.existing.as_ref().is_some_and(|l| l.has_blob(digest))
    }

    /// Stages a blob read from `reader`, verifying it against `desc`.
    pub fn write_blob(&mut self, desc: &Descriptor, reader: impl Read, source: &str) -> Result<()> {
        content::check_descriptor(desc).map_err(|why| LayoutError::BadBlob {
            dir: self.target.clone(),
            why,
        })?;
        if self.has_blob(desc.digest()) {
            return Ok(());
        }
        self.stage_blob(desc, reader, source)?.finish(self)?;
        Ok(())
    }

    /// The part of [`Transaction::write_blob`] that several threads may run at once: streams
    /// `reader` into a temporary file in the staging area, verifying it against `desc`.
    /// [`BlobWriter::finish`] then gives it its name.
    pub fn stage_blob(
        &self,
        desc: &Descriptor,
        reader: impl Read,
        source: &str,
    ) -> Result<BlobWriter> {
        content::check_descriptor(desc).map_err(|why| LayoutError::BadBlob {
            dir: self.target.clone(),
            why,
        })?;
        let mut writer = self.blob_writer()?;
        // The writer hashes what it stores; `finish` compares that with `desc`, so the bytes
        // are hashed once here, not once to verify and once to name them. One byte past the
        // size is read so an over-long blob is caught without reading it all.
        copy_in_large_reads(&mut reader.take(desc.size() + 1), &mut writer.inner).map_err(|e| {
            LayoutError::BadBlob {
                dir: self.target.clone(),
                why: e.to_string(),
            }
        })?;
        writer.expected = Some((desc.clone(), source.to_string()));
        Ok(writer)
    }

    /// Stages a blob from bytes lathe made (a manifest, config or index).
    pub fn write_bytes(&mut self, bytes: &[u8], media_type: MediaType) -> Result<Descriptor> {
        let mut writer = self.blob_writer()?;
        writer
            .inner
            .write_all(bytes)
            .map_err(io_err(self.staging.path()))?;
        let (digest, size) = writer.finish(self)?;
        Ok(Descriptor::new(media_type, size, digest))
    }

    /// A writer for a blob whose digest is not known in advance (a layer being made).
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .permissions(fs::Permissions::from_mode(0o644))
            .tempfile_in(self.staging.path())
            .map_err(io_err(self.staging.path()))?;
        Ok(BlobWriter {
            inner: HashingWriter::new(tmp),
            expected: None,
        })
    }

    /// Makes the staged blobs and the entries `refs` (ref name, descriptor) visible at once.
    /// Entries with the same ref names are replaced; every other entry is kept.
    pub fn commit(self, refs: &[(String, Descriptor)]) -> Result<()> {
        self.commit_with_unnamed(refs, &[])
    }

    /// As [`Transaction::commit`], also listing `unnamed` in `index.json` without a ref name
    /// (image-layout 1.1 lists referrers so); an unnamed entry already there for the same
    /// digest is replaced.
    pub fn commit_with_unnamed(
        self,
        refs: &[(String, Descriptor)],
        unnamed: &[Descriptor],
    ) -> Result<()> {
        match &self.existing {
            Some(layout) => merge_into(layout, self.staging.path(), &self.staged, refs, unnamed),
            None => {
                self.check_refs_complete(refs, unnamed)?;
                let root = self.staging.path();
                sync_dir(&root.join("blobs/sha256"))?;
                write_atomically(
                    &root.join(LAYOUT_FILE),
                    br#"{"imageLayoutVersion":"1.0.0"}"#,
                )?;
                let mut index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []});
                merge_entries(&mut index, refs, unnamed);
                write_atomically(&root.join(INDEX_FILE), &content::canonical_json(&index))?;
                // An empty directory at the target is replaced. If another writer created the
                // layout meanwhile, merge into it as if it had been there from the start.
                let _ = fs::remove_dir(&self.target);
                if let Err(e) = fs::rename(root, &self.target) {
                    let Ok(layout) = Layout::open(&self.target) else {
                        return Err(io_err(&self.target)(e));
                    };
                    return merge_into(
                        &layout,
                        &root.join("blobs/sha256"),
                        &self.staged,
                        refs,
                        unnamed,
                    );
                }
                let _ = self.staging.keep();
                sync_dir(parent_dir(&self.target))
            }
        }
    }

    fn check_refs_complete(
        &self,
        refs: &[(String, Descriptor)],
        unnamed: &[Descriptor],
    ) -> Result<()> {
        for desc in refs.iter().map(|(_, d)| d).chain(unnamed) {
            if !self.staged.contains(desc.digest().digest()) {
                return Err(LayoutError::MissingBlob {
                    dir: self.target.clone(),
                    digest: desc.digest().clone(),
                });
            }
        }
        Ok(())
    }
}

/// `io::copy` with 1 MiB reads instead of 8 KiB ones: a read from a registry download is a
/// round trip to the HTTP client's thread, so fewer, larger reads are much cheaper.
fn copy_in_large_reads(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Moves staged blobs into an existing layout and adds `refs` to its index, under its lock.
fn merge_into(
    layout: &Layout,
    staged_dir: &Path,
    staged: &BTreeSet<String>,
    refs: &[(String, Descriptor)],
    unnamed: &[Descriptor],
) -> Result<()> {
    let _lock = layout.lock()?;
    let blobs = layout.dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    for hex in staged {
        let to = blobs.join(hex);
        fs::rename(staged_dir.join(hex), &to).map_err(io_err(&to))?;
    }
    sync_dir(&blobs)?;
    for desc in refs.iter().map(|(_, d)| d).chain(unnamed) {
        if !layout.has_blob(desc.digest()) {
            return Err(LayoutError::MissingBlob {
                dir: layout.dir.clone(),
                digest: desc.digest().clone(),
            });
        }
    }
    let index_path = layout.dir.join(INDEX_FILE);
    let old = fs::read(&index_path).map_err(io_err(&index_path))?;
    let mut index: Value = serde_json::from_slice(&old).map_err(|e| LayoutError::BadFile {
        path: index_path.clone(),
        why: e.to_string(),
    })?;
    merge_entries(&mut index, refs, unnamed);
    write_atomically(&index_path, &content::canonical_json(&index))
}

fn merge_entries(index: &mut Value, refs: &[(String, Descriptor)], unnamed: &[Descriptor]) {
    let new_names: BTreeMap<&str, ()> = refs.iter().map(|(n, _)| (n.as_str(), ())).collect();
    let manifests = index
        .as_object_mut()
        .expect("index.json was parsed as an ImageIndex")
        .entry("manifests")
        .or_insert_with(|| Value::Array(vec![]));
    let list = manifests.as_array_mut().expect("manifests is an array");
    let new_unnamed: BTreeSet<String> = unnamed.iter().map(|d| d.digest().to_string()).collect();
    list.retain(|entry| {
        let name = entry
            .pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str);
        match name {
            Some(n) => !new_names.contains_key(n),
            None => !entry
                .get("digest")
                .and_then(Value::as_str)
                .is_some_and(|d| new_unnamed.contains(d)),
        }
    });
    for (name, desc) in refs {
        list.push(
            serde_json::to_value(with_ref_name(desc, name)).expect("a descriptor serialises"),
        );
    }
    for desc in unnamed {
        list.push(serde_json::to_value(desc).expect("a descriptor serialises"));
    }
}

/// Streams a blob into a layout's staging area, hashing as it goes.
pub struct BlobWriter {
    inner: HashingWriter<tempfile::NamedTempFile>,
    /// For a blob with a known descriptor: that descriptor and where the bytes came from.
    expected: Option<(Descriptor, String)>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    /// Fsyncs the blob and moves it to its digest's name in the staging area; a blob staged
    /// for a descriptor must match it.
    pub fn finish(self, tx: &mut Transaction) -> Result<(Digest, u64)> {
        let (digest, size, tmp) = self.inner.finish();
        if let Some((desc, source)) = &self.expected {
            let why = if size > desc.size() {
                Some(format!(
                    "blob {} is longer than the {} bytes its descriptor gives",
                    desc.digest(),
                    desc.size()
                ))
            } else if size < desc.size() {
                Some(format!(
                    "blob {} is truncated: {size} of {} bytes",
                    desc.digest(),
                    desc.size()
                ))
            } else if &digest != desc.digest() {
                Some(format!(
                    "blob {} does not match its digest (its bytes hash to {digest})",
                    desc.digest()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(LayoutError::BadBlob {
                    dir: tx.target.clone(),
                    why: format!("{source}: {why}"),
                });
            }
        }
        let hex = digest.digest().to_string();
        if !tx.has_blob(&digest) {
            tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
            let path = tx.staged_path(&hex);
            tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
            tx.staged.insert(hex);
        }
        Ok((digest, size))
    }
}

/// Removes a tree whose directories may be read-only (unpacked images keep their modes).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => return fs::remove_file(path),
        Ok(_) => {}
    }
    for entry in walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
    {
        if entry.file_type().is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o700));
        }
    }
    fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap()
    }

    #[test]
    fn new_layout_appears_whole_and_refs_are_replaced() {
        let tmp = dir();
        let target = tmp.path().join("layout");
        let mut tx = Transaction::begin(&target).unwrap();
        let config = tx.write_bytes(b"{}", MediaType::ImageConfig).unwrap();
        assert!(!target.exists(), "nothing is visible before commit");
        tx.commit(&[("a".into(), config.clone())]).unwrap();
        let layout = Layout::open(&target).unwrap();
        assert_eq!(layout.resolve(Some("a")).unwrap().digest(), config.digest());
        assert_eq!(
            layout.resolve(None).unwrap().digest(),
            config.digest(),
            "the only image"
        );

        let mut tx = Transaction::begin(&target).unwrap();
        let other = tx
            .write_bytes(b"{\"x\":1}", MediaType::ImageConfig)
            .unwrap();
        tx.commit(&[("a".into(), other.clone()), ("b".into(), config.clone())])
            .unwrap();
        let entries = layout.index_entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(layout.resolve(Some("a")).unwrap().digest(), other.digest());
        let err = layout.resolve(None).unwrap_err().to_string();
        assert!(err.contains("name one of: a, b"), "{err}");
        let err = layout.resolve(Some("zz")).unwrap_err().to_string();
        assert!(
            err.contains("no image named \"zz\" (it has: a, b)"),
            "{err}"
        );
    }

    #[test]
    fn attachments_are_not_images_of_their_own() {
        let d = |c: char| {
            Descriptor::new(
                MediaType::ImageManifest,
                1,
                content::parse_sha256(&format!("sha256:{}", c.to_string().repeat(64))).unwrap(),
            )
        };
        let image = with_ref_name(&d('a'), "app");
        let signature = with_ref_name(&d('b'), &format!("sha256-{}.sig", "a".repeat(64)));
        let mut referrer = d('c');
        referrer.set_artifact_type(Some(MediaType::from("application/spdx+json")));
        let entries = [image.clone(), signature, referrer];
        assert_eq!(
            resolve_ref(&entries, None).unwrap().digest(),
            image.digest()
        );
        // An unnamed entry without an artifactType is an image, as before.
        let err = resolve_ref(&[image, d('d')], None).unwrap_err();
        assert!(err.contains("more than one image"), "{err}");
    }

    #[test]
    fn unnamed_entries_are_replaced_by_digest_not_repeated() {
        let tmp = dir();
        let target = tmp.path().join("layout");
        for _ in 0..2 {
            let mut tx = Transaction::begin(&target).unwrap();
            let image = tx.write_bytes(b"{}", MediaType::ImageConfig).unwrap();
            let referrer = tx.write_bytes(b"[2]", MediaType::ImageConfig).unwrap();
            tx.commit_with_unnamed(&[("a".into(), image)], &[referrer])
                .unwrap();
        }
        let entries = Layout::open(&target).unwrap().index_entries().unwrap();
        assert_eq!(entries.len(), 2, "{entries:?}");
    }

    #[test]
    fn dropped_transaction_leaves_nothing() {
        let tmp = dir();
        let target = tmp.path().join("layout");
        let mut tx = Transaction::begin(&target).unwrap();
        tx.write_bytes(b"{}", MediaType::ImageConfig).unwrap();
        drop(tx);
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn gc_removes_unreferenced_blobs_and_stale_staging() {
        let tmp = dir();
        let target = tmp.path().join("layout");
        let mut tx = Transaction::begin(&target).unwrap();
        let keep = tx.write_bytes(b"{}", MediaType::ImageConfig).unwrap();
        let drop_me = tx.write_bytes(b"[1]", MediaType::ImageConfig).unwrap();
        tx.commit(&[("a".into(), keep.clone())]).unwrap();
        fs::create_dir(target.join(format!("{STAGING_PREFIX}dead"))).unwrap();
        let layout = Layout::open(&target).unwrap();
        assert!(layout.has_blob(drop_me.digest()));
        let (removed, freed) = layout.gc().unwrap();
        assert_eq!((removed, freed), (1, 3));
        assert!(layout.has_blob(keep.digest()) && !layout.has_blob(drop_me.digest()));
        assert!(!target.join(format!("{STAGING_PREFIX}dead")).exists());
    }

    #[test]
    fn refuses_non_layout_directories() {
        let tmp = dir();
        fs::write(tmp.path().join("file"), b"x").unwrap();
        let err = Transaction::begin(tmp.path()).err().unwrap().to_string();
        assert!(
            err.contains("is not an empty directory or an OCI image layout"),
            "{err}"
        );
        let err = Layout::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("has no oci-layout file"), "{err}");
    }
}
