//! Image archives: `oci-archive` (a tar of an OCI layout, the `.cnb` format too) and
//! `docker-archive` (the `docker save` format), read in place and written atomically.
//!
//! Reading indexes the tar's headers once and then reads members by offset, so nothing is
//! extracted and no member path can reach the file system. Writing streams blobs into a
//! temporary file beside the destination, which is renamed over it only when the whole
//! archive is complete.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::attachments::Attachment;
use crate::content::{self, Compression, HashingWriter, VerifyingReader};
use crate::image::{self, ImageError, ImageSink, ImageSource, NamedImage};
use crate::layer::{self, NORMALIZED_MTIME};
use crate::layout;
use crate::platform::Platform;

#[derive(Debug, thiserror::Error)]
#[error("{transport}:{}: {why}", file.display())]
pub struct ArchiveError {
    pub transport: &'static str,
    pub file: PathBuf,
    pub why: String,
}

/// The regular files of a tar archive and where their bytes are.
pub struct TarIndex {
    file: Arc<File>,
    path: PathBuf,
    transport: &'static str,
    members: BTreeMap<String, Member>,
}

#[derive(Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

impl TarIndex {
    pub fn open(path: &Path, transport: &'static str) -> Result<TarIndex, ArchiveError> {
        let err = |why: String| ArchiveError {
            transport,
            file: path.to_path_buf(),
            why,
        };
        let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
        let mut head = [0u8; 4];
        let n = file.read(&mut head).map_err(|e| err(e.to_string()))?;
        if layer::sniff_compression(&head[..n]) != Compression::None {
            return Err(err(
                "the archive is compressed; lathe reads uncompressed tar archives".into(),
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| err(e.to_string()))?;
        let mut members = BTreeMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            let entries = archive
                .entries_with_seek()
                .map_err(|e| err(format!("not a tar archive: {e}")))?;
            for entry in entries {
                let entry = entry.map_err(|e| err(format!("not a valid tar archive: {e}")))?;
                let raw_path = entry.path().map_err(|e| err(e.to_string()))?.into_owned();
                let Some(name) = layer::normalize_archive_path(&raw_path) else {
                    continue;
                };
                let member = match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                    tar::EntryType::Symlink | tar::EntryType::Link => {
                        let Some(target) = entry.link_name().ok().flatten() else {
                            continue;
                        };
                        let base = if entry.header().entry_type() == tar::EntryType::Symlink {
                            raw_path.parent().unwrap_or(Path::new("")).join(target)
                        } else {
                            target.into_owned()
                        };
                        match layer::normalize_archive_path(&base) {
                            Some(t) => Member::Link(t),
                            None => continue,
                        }
                    }
                    _ => continue,
                };
                members.insert(name, member);
            }
        }
        let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        for (name, m) in &members {
            if let Member::File { offset, size } = m
                && offset + size > file_len
            {
                return Err(err(format!("member {name} is truncated")));
            }
        }
        Ok(TarIndex {
            file: Arc::new(file),
            path: path.to_path_buf(),
            transport,
            members,
        })
    }

    pub fn error(&self, why: impl Into<String>) -> ArchiveError {
        ArchiveError {
            transport: self.transport,
            file: self.path.clone(),
            why: why.into(),
        }
    }

    /// Offset and size of a member, following links inside the archive.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = layer::normalize_archive_path(Path::new(name))?;
        for _ in 0..16 {
            match self.members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(target) => name = target.clone(),
            }
        }
        None
    }

    pub fn size_of(&self, name: &str) -> Option<u64> {
        self.locate(name).map(|(_, size)| size)
    }

    pub fn open_member(&self, name: &str) -> Result<RangeReader, ArchiveError> {
        let (offset, size) = self
            .locate(name)
            .ok_or_else(|| self.error(format!("{name:?} is not in the archive")))?;
        Ok(RangeReader {
            file: self.file.clone(),
            pos: offset,
            end: offset + size,
        })
    }

    pub fn read_member(&self, name: &str, limit: u64) -> Result<Vec<u8>, ArchiveError> {
        let size = self
            .size_of(name)
            .ok_or_else(|| self.error(format!("{name:?} is not in the archive")))?;
        if size > limit {
            return Err(self.error(format!(
                "{name} is {size} bytes, more than lathe reads into memory"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open_member(name)?
            .read_to_end(&mut out)
            .map_err(|e| self.error(format!("{name}: {e}")))?;
        Ok(out)
    }
}

/// Reads a byte range of a shared file with `pread`, so several readers can share one handle.
pub struct RangeReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ended inside a member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------- oci-archive

pub struct OciArchiveSource {
    tar: TarIndex,
    root: Descriptor,
    /// The entries of its `index.json`.
    entries: Vec<Descriptor>,
    describe: String,
}

impl OciArchiveSource {
    pub fn open(file: &Path, name: Option<&str>) -> Result<OciArchiveSource, ImageError> {
        let (tar, entries) = Self::read_index(file)?;
        let root = layout::resolve_ref(&entries, name).map_err(|why| tar.error(why))?;
        let describe = crate::reference::ImageRef::OciArchive {
            file: file.to_path_buf(),
            name: name.map(str::to_string),
        }
        .to_string();
        Ok(OciArchiveSource {
            tar,
            root,
            entries,
            describe,
        })
    }

    /// The archive's members and the entries of its `index.json` (checked).
    pub fn read_index(file: &Path) -> Result<(TarIndex, Vec<Descriptor>), ImageError> {
        let tar = TarIndex::open(file, "oci-archive")?;
        let layout_file = tar
            .read_member("oci-layout", 1 << 16)
            .map_err(|_| tar.error("it has no oci-layout file, so it is not an OCI archive"))?;
        let version: Value = serde_json::from_slice(&layout_file)
            .map_err(|e| tar.error(format!("oci-layout: {e}")))?;
        if !version["imageLayoutVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("1."))
        {
            return Err(tar
                .error("oci-layout: unsupported imageLayoutVersion")
                .into());
        }
        let index_bytes = tar.read_member("index.json", content::MAX_JSON_BLOB)?;
        let index: ImageIndex = serde_json::from_slice(&index_bytes)
            .map_err(|e| tar.error(format!("index.json is not valid: {e}")))?;
        for d in index.manifests() {
            content::check_descriptor(d).map_err(|why| tar.error(format!("index.json: {why}")))?;
        }
        Ok((tar, index.manifests().clone()))
    }
}

impl ImageSource for OciArchiveSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> Descriptor {
        self.root.clone()
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        content::check_descriptor(desc).map_err(|why| self.tar.error(why))?;
        let name = format!("blobs/sha256/{}", desc.digest().digest());
        let size = self
            .tar
            .size_of(&name)
            .ok_or_else(|| self.tar.error(format!("blob {} is missing", desc.digest())))?;
        if size != desc.size() {
            return Err(self
                .tar
                .error(format!(
                    "blob {} is {size} bytes but its descriptor says {}",
                    desc.digest(),
                    desc.size()
                ))
                .into());
        }
        Ok(Box::new(VerifyingReader::new(
            self.tar.open_member(&name)?,
            desc,
            self.describe.clone(),
        )))
    }

    fn tagged(&self, tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
        match layout::find_ref(&self.entries, tag) {
            Some(desc) => {
                let bytes = self.read_blob(&desc)?;
                Ok(Some((desc, bytes)))
            }
            None => Ok(None),
        }
    }

    fn layout_entries(&self) -> Result<Option<Vec<Descriptor>>, ImageError> {
        Ok(Some(self.entries.clone()))
    }
}

/// Writes an oci-archive: blobs stream into a temp file as they come; `index.json` last.
pub struct OciArchiveSink {
    dest: PathBuf,
    name: String,
    tar: tar::Builder<BufWriter<tempfile::NamedTempFile>>,
    written: BTreeSet<String>,
    attachments: Vec<Attachment>,
}

impl OciArchiveSink {
    pub fn create(dest: &Path, name: Option<&str>) -> Result<OciArchiveSink, ImageError> {
        let tmp = temp_beside(dest, "oci-archive")?;
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp));
        let wrap = |e: io::Error| archive_err("oci-archive", dest, e.to_string());
        append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(wrap)?;
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = header(tar::EntryType::Directory, 0, 0o755);
            tar.append_data(&mut h, dir, io::empty()).map_err(wrap)?;
        }
        Ok(OciArchiveSink {
            dest: dest.to_path_buf(),
            name: name.unwrap_or(crate::reference::DEFAULT_TAG).to_string(),
            tar,
            written: BTreeSet::new(),
            attachments: vec![],
        })
    }
}

impl ImageSink for OciArchiveSink {
    fn has_blob(&self, digest: &Digest) -> bool {
        self.written.contains(digest.digest())
    }

    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError> {
        if !self.written.insert(desc.digest().digest().to_string()) {
            return Ok(());
        }
        let mut h = header(tar::EntryType::Regular, desc.size(), 0o644);
        let name = format!("blobs/sha256/{}", desc.digest().digest());
        self.tar
            .append_data(&mut h, name, reader)
            .map_err(|e| ImageError::Io {
                what: format!(
                    "copying blob {} into oci-archive:{}",
                    desc.digest(),
                    self.dest.display()
                ),
                source: e,
            })
    }

    fn keeps_attachments(&self) -> bool {
        true
    }

    fn attach(&mut self, attachments: &[Attachment]) -> Result<(), ImageError> {
        self.attachments.extend_from_slice(attachments);
        Ok(())
    }

    fn commit(
        self: Box<Self>,
        root: &Descriptor,
        children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError> {
        let image = NamedImage {
            name: self.name.clone(),
            root: root.clone(),
            children: children.to_vec(),
        };
        self.commit_named(&[image])
    }

    fn commit_named(mut self: Box<Self>, images: &[NamedImage]) -> Result<(), ImageError> {
        let (refs, unnamed) = image::layout_entries_for(images, &self.attachments);
        let manifests: Vec<Descriptor> = refs
            .iter()
            .map(|(n, d)| layout::with_ref_name(d, n))
            .chain(unnamed)
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let wrap =
            |e: io::Error| ImageError::from(archive_err("oci-archive", &self.dest, e.to_string()));
        append_bytes(
            &mut self.tar,
            "index.json",
            &content::canonical_json(&index),
        )
        .map_err(wrap)?;
        let buffered = self.tar.into_inner().map_err(wrap)?;
        persist(buffered, &self.dest, "oci-archive")
    }
}

// ------------------------------------------------------------- docker-archive

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub struct DockerArchiveSource {
    tar: TarIndex,
    describe: String,
    manifest: Vec<u8>,
    manifest_desc: Descriptor,
    config_desc: Descriptor,
    config_member: String,
    layer_members: BTreeMap<String, String>,
}

impl DockerArchiveSource {
    pub fn open(file: &Path, name: Option<&str>) -> Result<DockerArchiveSource, ImageError> {
        let tar = TarIndex::open(file, "docker-archive")?;
        let manifest_json = tar
            .read_member("manifest.json", content::MAX_JSON_BLOB)
            .map_err(|_| tar.error("it has no manifest.json, so it is not a docker-archive"))?;
        let entries: Vec<DockerArchiveEntry> = serde_json::from_slice(&manifest_json)
            .map_err(|e| tar.error(format!("manifest.json is not valid: {e}")))?;
        let entry = pick_docker_entry(&entries, name).map_err(|why| tar.error(why))?;

        let config_member = member_name(&tar, &entry.config)?;
        let config = tar.read_member(&config_member, content::MAX_JSON_BLOB)?;
        let config_desc = Descriptor::new(
            MediaType::ImageConfig,
            config.len() as u64,
            content::sha256_digest(&config),
        );
        let config_value: Value = serde_json::from_slice(&config)
            .map_err(|e| tar.error(format!("{} is not a valid image config: {e}", entry.config)))?;
        let diff_ids: Vec<&str> = config_value
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if diff_ids.len() != entry.layers.len() {
            return Err(tar
                .error(format!(
                    "manifest.json lists {} layers but the config has {} diff_ids",
                    entry.layers.len(),
                    diff_ids.len()
                ))
                .into());
        }
        let mut layers = Vec::new();
        let mut layer_members = BTreeMap::new();
        for (path, diff_id) in entry.layers.iter().zip(diff_ids) {
            let member = member_name(&tar, path)?;
            let size = tar.size_of(&member).unwrap_or(0);
            let mut head = [0u8; 4];
            let n = content::read_up_to(&mut tar.open_member(&member)?, &mut head)
                .map_err(|e| tar.error(format!("{path}: {e}")))?;
            let compression = layer::sniff_compression(&head[..n]);
            let (digest, media_type) = match compression {
                Compression::None => {
                    let digest = content::parse_sha256(diff_id)
                        .map_err(|why| tar.error(format!("config: {why}")))?;
                    (digest, MediaType::ImageLayer)
                }
                other => {
                    // Newer `docker save` may store compressed layers; their digest is of the
                    // compressed bytes, which only hashing tells.
                    let mut hasher = HashingWriter::new(io::sink());
                    io::copy(&mut tar.open_member(&member)?, &mut hasher)
                        .map_err(|e| tar.error(format!("{path}: {e}")))?;
                    let media = if other == Compression::Gzip {
                        MediaType::ImageLayerGzip
                    } else {
                        MediaType::ImageLayerZstd
                    };
                    (hasher.finish().0, media)
                }
            };
            layer_members.insert(digest.to_string(), member);
            layers.push(Descriptor::new(media_type, size, digest));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layers,
        });
        let manifest = content::canonical_json(&manifest);
        let manifest_desc = Descriptor::new(
            MediaType::ImageManifest,
            manifest.len() as u64,
            content::sha256_digest(&manifest),
        );
        Ok(DockerArchiveSource {
            describe: crate::reference::ImageRef::DockerArchive {
                file: file.to_path_buf(),
                name: name.map(str::to_string),
            }
            .to_string(),
            tar,
            manifest,
            manifest_desc,
            config_desc,
            config_member,
            layer_members,
        })
    }
}

/// Checks that a path named by manifest.json stays inside the archive and exists.
fn member_name(tar: &TarIndex, path: &str) -> Result<String, ArchiveError> {
    let normalized = layer::normalize_archive_path(Path::new(path))
        .filter(|p| !path.starts_with('/') && !p.is_empty())
        .ok_or_else(|| {
            tar.error(format!(
                "manifest.json names {path:?}, which is outside the archive"
            ))
        })?;
    if tar.size_of(&normalized).is_none() {
        return Err(tar.error(format!(
            "manifest.json names {path:?}, which is not in the archive"
        )));
    }
    Ok(normalized)
}

fn pick_docker_entry<'a>(
    entries: &'a [DockerArchiveEntry],
    name: Option<&str>,
) -> Result<&'a DockerArchiveEntry, String> {
    let tags = || {
        entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        None => match entries {
            [only] => Ok(only),
            [] => Err("manifest.json lists no image".into()),
            _ => Err(format!(
                "it holds {} images; name one (@0, @1, … or a tag: {})",
                entries.len(),
                tags()
            )),
        },
        Some(n) if n.starts_with('@') => {
            let i: usize = n[1..]
                .parse()
                .map_err(|_| format!("{n:?} is not an image number"))?;
            entries
                .get(i)
                .ok_or_else(|| format!("it has no image {n} (it holds {})", entries.len()))
        }
        Some(n) => {
            let want = crate::reference::RegistryRef::parse(n)?;
            entries
                .iter()
                .find(|e| {
                    e.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| crate::reference::RegistryRef::parse(t).is_ok_and(|r| r == want))
                })
                .ok_or_else(|| format!("no image tagged {n:?} (tags: {})", tags()))
        }
    }
}

impl ImageSource for DockerArchiveSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> Descriptor {
        self.manifest_desc.clone()
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let describe = self.describe.clone();
        if desc.digest() == self.manifest_desc.digest() {
            return Ok(Box::new(VerifyingReader::new(
                io::Cursor::new(self.manifest.clone()),
                desc,
                describe,
            )));
        }
        let member = if desc.digest() == self.config_desc.digest() {
            &self.config_member
        } else {
            self.layer_members
                .get(&desc.digest().to_string())
                .ok_or_else(|| {
                    self.tar
                        .error(format!("blob {} is not in the archive", desc.digest()))
                })?
        };
        Ok(Box::new(VerifyingReader::new(
            self.tar.open_member(member)?,
            desc,
            describe,
        )))
    }
}

/// Writes a docker-archive: the config as `<hex>.json`, each layer uncompressed as
/// `<diffID hex>.tar`, and `manifest.json` last.
pub struct DockerArchiveSink {
    dest: PathBuf,
    repo_tag: Option<String>,
    tar: tar::Builder<BufWriter<tempfile::NamedTempFile>>,
    written: BTreeSet<String>,
    diff_ids: BTreeMap<String, String>,
    manifests: BTreeMap<String, Vec<u8>>,
}

impl DockerArchiveSink {
    pub fn create(dest: &Path, name: Option<&str>) -> Result<DockerArchiveSink, ImageError> {
        let tmp = temp_beside(dest, "docker-archive")?;
        let repo_tag = match name {
            Some(n) if n.starts_with('@') => {
                return Err(archive_err(
                    "docker-archive",
                    dest,
                    format!("{n:?} cannot name an image being written; give a tag"),
                )
                .into());
            }
            Some(n) => {
                let r = crate::reference::RegistryRef::parse(n)
                    .map_err(|why| archive_err("docker-archive", dest, why))?;
                Some(format!(
                    "{}/{}:{}",
                    r.registry,
                    r.repository,
                    r.tag.unwrap_or_else(|| "latest".into())
                ))
            }
            None => None,
        };
        Ok(DockerArchiveSink {
            dest: dest.to_path_buf(),
            repo_tag,
            tar: tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp)),
            written: BTreeSet::new(),
            diff_ids: BTreeMap::new(),
            manifests: BTreeMap::new(),
        })
    }

    fn err(&self, why: impl Into<String>) -> ImageError {
        archive_err("docker-archive", &self.dest, why.into()).into()
    }
}

impl ImageSink for DockerArchiveSink {
    fn has_blob(&self, digest: &Digest) -> bool {
        self.written.contains(&digest.to_string())
    }

    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError> {
        if !self.written.insert(desc.digest().to_string()) {
            return Ok(());
        }
        let hex = desc.digest().digest().to_string();
        match (
            content::kind_of(desc.media_type()),
            content::layer_compression(desc.media_type()),
        ) {
            (content::Kind::Index | content::Kind::Manifest, _) => {
                let mut bytes = Vec::new();
                reader
                    .read_to_end(&mut bytes)
                    .map_err(|e| self.err(e.to_string()))?;
                self.manifests.insert(desc.digest().to_string(), bytes);
            }
            (_, Some(compression)) => {
                // A tar header needs the size up front, so the layer is decompressed into a
                // temp file first, hashing it for the diffID on the way.
                let mut tmp = tempfile::tempfile_in(crate::layout::parent_dir(&self.dest))
                    .map_err(|e| self.err(e.to_string()))?;
                let mut hashing = HashingWriter::new(BufWriter::new(&mut tmp));
                let what = format!("layer {}", desc.digest());
                io::copy(
                    &mut layer::decompress(reader, compression)
                        .map_err(|e| self.err(format!("{what}: {e}")))?,
                    &mut hashing,
                )
                .map_err(|e| self.err(format!("{what}: {e}")))?;
                let (diff_id, size, buffered) = hashing.finish();
                buffered.into_inner().map_err(|e| self.err(e.to_string()))?;
                tmp.seek(SeekFrom::Start(0))
                    .map_err(|e| self.err(e.to_string()))?;
                let name = format!("{}.tar", diff_id.digest());
                if !self.diff_ids.values().any(|d| d == &diff_id.to_string()) {
                    let mut h = header(tar::EntryType::Regular, size, 0o644);
                    self.tar
                        .append_data(&mut h, &name, &mut tmp)
                        .map_err(|e| self.err(e.to_string()))?;
                }
                self.diff_ids
                    .insert(desc.digest().to_string(), diff_id.to_string());
            }
            _ => {
                let mut h = header(tar::EntryType::Regular, desc.size(), 0o644);
                let dest = self.dest.clone();
                self.tar
                    .append_data(&mut h, format!("{hex}.json"), reader)
                    .map_err(|e| ImageError::Io {
                        what: format!(
                            "copying blob {} into docker-archive:{}",
                            desc.digest(),
                            dest.display()
                        ),
                        source: e,
                    })?;
            }
        }
        Ok(())
    }

    fn commit(
        mut self: Box<Self>,
        root: &Descriptor,
        _children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError> {
        let bytes = self
            .manifests
            .get(&root.digest().to_string())
            .ok_or_else(|| self.err("the image manifest was not written"))?;
        if content::kind_of(root.media_type()) != content::Kind::Manifest {
            return Err(self.err("a docker-archive holds one platform; choose one with --platform"));
        }
        let manifest: ImageManifest = serde_json::from_slice(bytes)
            .map_err(|e| self.err(format!("manifest {}: {e}", root.digest())))?;
        let mut layers = Vec::new();
        for l in manifest.layers() {
            let diff_id = self
                .diff_ids
                .get(&l.digest().to_string())
                .ok_or_else(|| self.err(format!("layer {} was not written", l.digest())))?;
            layers.push(format!("{}.tar", diff_id.trim_start_matches("sha256:")));
        }
        let entry = vec![DockerArchiveEntry {
            config: format!("{}.json", manifest.config().digest().digest()),
            repo_tags: Some(self.repo_tag.clone().into_iter().collect()),
            layers,
        }];
        let wrap = |e: io::Error| {
            ImageError::from(archive_err("docker-archive", &self.dest, e.to_string()))
        };
        append_bytes(
            &mut self.tar,
            "manifest.json",
            &serde_json::to_vec(&entry).expect("serialises"),
        )
        .map_err(wrap)?;
        let buffered = self.tar.into_inner().map_err(wrap)?;
        persist(buffered, &self.dest, "docker-archive")
    }
}

// ------------------------------------------------------------------- helpers

fn archive_err(transport: &'static str, file: &Path, why: String) -> ArchiveError {
    ArchiveError {
        transport,
        file: file.to_path_buf(),
        why,
    }
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(NORMALIZED_MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
    tar.append_data(&mut h, name, bytes)
}

fn temp_beside(
    dest: &Path,
    transport: &'static str,
) -> Result<tempfile::NamedTempFile, ArchiveError> {
    let dir = crate::layout::parent_dir(dest);
    if dest.is_dir() {
        return Err(archive_err(transport, dest, "is a directory".into()));
    }
    tempfile::Builder::new()
        .prefix(&crate::layout::sibling_temp_prefix(dest, "archive"))
        .permissions(std::fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| {
            archive_err(
                transport,
                dest,
                format!("cannot create a file in {}: {e}", dir.display()),
            )
        })
}

fn persist(
    buffered: BufWriter<tempfile::NamedTempFile>,
    dest: &Path,
    transport: &'static str,
) -> Result<(), ImageError> {
    let err = |e: String| ImageError::from(archive_err(transport, dest, e));
    let tmp = buffered
        .into_inner()
        .map_err(|e| err(e.error().to_string()))?;
    tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
    tmp.persist(dest).map_err(|e| err(e.error.to_string()))?;
    let dir = crate::layout::parent_dir(dest);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(e.to_string()))
}
