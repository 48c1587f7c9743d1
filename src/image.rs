//! The image-store interface: every transport is an [`ImageSource`] to read from and an
//! [`ImageSink`] to write to, so every command works on every transport (the regclient /
//! go-containerregistry model). [`copy`] moves an image or a whole index between any two.
//!
//! Sinks stage what they receive and make it visible only in [`ImageSink::commit`]; an error
//! anywhere before that leaves the destination as it was.

use std::collections::BTreeSet;
use std::io::{self, Read};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};
use serde_json::Value;

use crate::archive::{
    ArchiveError, DockerArchiveSink, DockerArchiveSource, OciArchiveSink, OciArchiveSource,
};
use crate::content::{self, Kind};
use crate::layout::{self, Layout, LayoutError, Transaction};
use crate::platform::{Platform, PlatformError};
use crate::reference::{ImageRef, ReferenceError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("{reference}: {what} is not yet supported")]
    NotYetSupported {
        reference: String,
        what: &'static str,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl ImageError {
    /// True when the user's arguments, not the images, are at fault (exit code 3).
    pub fn is_usage(&self) -> bool {
        matches!(self, ImageError::Reference(_) | ImageError::Platform(_))
    }
}

/// Where images are read from.
pub trait ImageSource {
    /// The reference, for messages.
    fn describe(&self) -> String;
    /// The descriptor of the image or index the reference names.
    fn root(&self) -> Descriptor;
    /// A blob's bytes; the reader fails at end of stream unless size and digest match.
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError>;

    /// A manifest, index or config, read whole and verified.
    fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let reader = self.open_blob(desc)?;
        content::read_small_blob(reader, desc, &self.describe()).map_err(|e| ImageError::Invalid {
            what: self.describe(),
            why: e.to_string(),
        })
    }
}

/// Where images are written to.
pub trait ImageSink {
    /// Whether the destination already has (or has been given) this blob.
    fn has_blob(&self, digest: &Digest) -> bool;
    /// Stores a blob; `reader` verifies itself, so an error mid-stream aborts the copy.
    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError>;
    /// Makes the image visible under the sink's name; `children` are the platform manifests
    /// of an index, which layout-like sinks also name `NAME-os-arch`.
    fn commit(
        self: Box<Self>,
        root: &Descriptor,
        children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError>;
}

pub fn open_source(reference: &ImageRef) -> Result<Box<dyn ImageSource>, ImageError> {
    Ok(match reference {
        ImageRef::Registry(_) => {
            return Err(ImageError::NotYetSupported {
                reference: reference.to_string(),
                what: "reading from a registry (docker://)",
            });
        }
        ImageRef::Layout { dir, name } => Box::new(LayoutSource::open(dir, name.as_deref())?),
        ImageRef::OciArchive { file, name } => {
            Box::new(OciArchiveSource::open(file, name.as_deref())?)
        }
        ImageRef::DockerArchive { file, name } => {
            Box::new(DockerArchiveSource::open(file, name.as_deref())?)
        }
    })
}

pub fn open_sink(reference: &ImageRef) -> Result<Box<dyn ImageSink>, ImageError> {
    Ok(match reference {
        ImageRef::Registry(_) => {
            return Err(ImageError::NotYetSupported {
                reference: reference.to_string(),
                what: "writing to a registry (docker://)",
            });
        }
        ImageRef::Layout { dir, name } => Box::new(LayoutSink {
            tx: Transaction::begin(dir)?,
            name: name
                .clone()
                .unwrap_or_else(|| crate::reference::DEFAULT_TAG.to_string()),
        }),
        ImageRef::OciArchive { file, name } => {
            Box::new(OciArchiveSink::create(file, name.as_deref())?)
        }
        ImageRef::DockerArchive { file, name } => {
            Box::new(DockerArchiveSink::create(file, name.as_deref())?)
        }
    })
}

pub struct LayoutSource {
    layout: Layout,
    root: Descriptor,
    describe: String,
}

impl LayoutSource {
    pub fn open(dir: &std::path::Path, name: Option<&str>) -> Result<LayoutSource, ImageError> {
        let layout = Layout::open(dir)?;
        let root = layout.resolve(name)?;
        let describe = ImageRef::Layout {
            dir: dir.to_path_buf(),
            name: name.map(str::to_string),
        }
        .to_string();
        Ok(LayoutSource {
            layout,
            root,
            describe,
        })
    }
}

impl ImageSource for LayoutSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn root(&self) -> Descriptor {
        self.root.clone()
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        Ok(Box::new(self.layout.open_blob(desc)?))
    }
}

struct LayoutSink {
    tx: Transaction,
    name: String,
}

impl ImageSink for LayoutSink {
    fn has_blob(&self, digest: &Digest) -> bool {
        self.tx.has_blob(digest)
    }
    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError> {
        let source = format!("copying to oci:{}", self.tx.target().display());
        Ok(self.tx.write_blob(desc, reader, &source)?)
    }
    fn commit(
        self: Box<Self>,
        root: &Descriptor,
        children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError> {
        Ok(self
            .tx
            .commit(&layout::refs_for(&self.name, root, children))?)
    }
}

/// The platform children of an index (entries without a usable platform, such as
/// attestation manifests, are left out).
pub fn platform_children(index: &ImageIndex) -> Vec<(Platform, Descriptor)> {
    index
        .manifests()
        .iter()
        .filter_map(|d| {
            let p = Platform::from_oci(d.platform().as_ref()?);
            (p.os != "unknown" && p.arch != "unknown").then(|| (p, d.clone()))
        })
        .collect()
}

pub fn parse_index(
    bytes: &[u8],
    desc: &Descriptor,
    source: &str,
) -> Result<ImageIndex, ImageError> {
    let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid {
        what: source.to_string(),
        why: format!("index {} is not valid: {e}", desc.digest()),
    })?;
    for d in index.manifests() {
        content::check_descriptor(d).map_err(|why| ImageError::Invalid {
            what: source.into(),
            why: format!("index {}: {why}", desc.digest()),
        })?;
    }
    Ok(index)
}

pub fn parse_manifest(
    bytes: &[u8],
    desc: &Descriptor,
    source: &str,
) -> Result<ImageManifest, ImageError> {
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid {
            what: source.to_string(),
            why: format!("manifest {} is not valid: {e}", desc.digest()),
        })?;
    for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
        content::check_descriptor(d).map_err(|why| ImageError::Invalid {
            what: source.into(),
            why: format!("manifest {}: {why}", desc.digest()),
        })?;
    }
    Ok(manifest)
}

/// The platform an image's config declares.
pub fn config_platform(config: &[u8]) -> Option<Platform> {
    let c: ImageConfiguration = serde_json::from_slice(config).ok()?;
    Some(Platform::new(
        &c.os().to_string(),
        &c.architecture().to_string(),
        c.variant().as_deref(),
    ))
}

/// What to take from a source.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Empty: everything. Otherwise the platforms to keep; one platform gives that platform's
    /// image, several give an index of just those.
    pub platforms: Vec<Platform>,
    /// The destination holds one image only: with no platforms given, pick the host's.
    pub single_image: bool,
}

/// The result of a copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub platforms: Vec<String>,
    pub blobs_copied: usize,
    pub bytes_copied: u64,
    /// A choice lathe made for the user (such as picking the host platform of an index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The root to write after applying `selection` to `source`: an existing descriptor, or (when
/// several platforms of an index are chosen) a new index and its bytes.
pub struct Resolved {
    pub root: Descriptor,
    pub new_root_bytes: Option<Vec<u8>>,
    pub children: Vec<(Platform, Descriptor)>,
    pub note: Option<String>,
}

pub fn resolve_selection(
    source: &dyn ImageSource,
    selection: &Selection,
) -> Result<Resolved, ImageError> {
    let root = source.root();
    let what = source.describe();
    content::check_descriptor(&root).map_err(|why| ImageError::Invalid {
        what: what.clone(),
        why,
    })?;
    match content::kind_of(root.media_type()) {
        Kind::Index => {
            let bytes = source.read_blob(&root)?;
            let index = parse_index(&bytes, &root, &what)?;
            let children = platform_children(&index);
            let available = || {
                children
                    .iter()
                    .map(|(p, _)| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut wanted = selection.platforms.clone();
            let mut note = None;
            if wanted.is_empty() && selection.single_image {
                let host = Platform::host();
                note = Some(format!(
                    "{what} is an index; picked the host platform {host}"
                ));
                wanted.push(host);
            }
            if wanted.is_empty() {
                return Ok(Resolved {
                    root,
                    new_root_bytes: None,
                    children,
                    note,
                });
            }
            let mut picked = Vec::new();
            for p in &wanted {
                let found =
                    children
                        .iter()
                        .find(|(cp, _)| cp == p)
                        .ok_or_else(|| ImageError::Invalid {
                            what: what.clone(),
                            why: format!("the index has no {p} image (it has: {})", available()),
                        })?;
                picked.push(found.clone());
            }
            if let [(_, desc)] = picked.as_slice() {
                let mut desc = desc.clone();
                desc.set_platform(None);
                desc.set_annotations(None);
                return Ok(Resolved {
                    root: desc,
                    new_root_bytes: None,
                    children: vec![],
                    note,
                });
            }
            let mut value: Value =
                serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
                    what: what.clone(),
                    why: e.to_string(),
                })?;
            let keep: BTreeSet<String> =
                picked.iter().map(|(_, d)| d.digest().to_string()).collect();
            if let Some(list) = value.get_mut("manifests").and_then(Value::as_array_mut) {
                list.retain(|d| {
                    d.get("digest")
                        .and_then(Value::as_str)
                        .is_some_and(|s| keep.contains(s))
                });
            }
            let new_bytes = content::canonical_json(&value);
            let new_root = Descriptor::new(
                root.media_type().clone(),
                new_bytes.len() as u64,
                content::sha256_digest(&new_bytes),
            );
            Ok(Resolved {
                root: new_root,
                new_root_bytes: Some(new_bytes),
                children: picked,
                note,
            })
        }
        Kind::Manifest => {
            if let [want] = selection.platforms.as_slice() {
                let manifest = parse_manifest(&source.read_blob(&root)?, &root, &what)?;
                let config = source.read_blob(manifest.config())?;
                match config_platform(&config) {
                    Some(p) if &p == want => {}
                    Some(p) => {
                        return Err(ImageError::Invalid {
                            what,
                            why: format!("the image is {p}, not {want}"),
                        });
                    }
                    None => {
                        return Err(ImageError::Invalid {
                            what,
                            why: "the image config names no platform".into(),
                        });
                    }
                }
            } else if selection.platforms.len() > 1 {
                return Err(ImageError::Invalid {
                    what,
                    why: "the image is a single platform, not an index".into(),
                });
            }
            let mut root = root;
            root.set_annotations(None);
            root.set_platform(None);
            Ok(Resolved {
                root,
                new_root_bytes: None,
                children: vec![],
                note: None,
            })
        }
        Kind::Other => Err(ImageError::Invalid {
            what,
            why: format!(
                "{} is a {}, not an image manifest or index",
                root.digest(),
                root.media_type()
            ),
        }),
    }
}

/// Copies the image `src` names to `dst`.
pub fn copy(
    src: &ImageRef,
    dst: &ImageRef,
    platforms: &[Platform],
) -> Result<CopyReport, ImageError> {
    let source = open_source(src)?;
    let selection = Selection {
        platforms: platforms.to_vec(),
        single_image: matches!(dst, ImageRef::DockerArchive { .. }),
    };
    let resolved = resolve_selection(source.as_ref(), &selection)?;
    let mut sink = open_sink(dst)?;
    let mut copier = Copier {
        source: source.as_ref(),
        sink: sink.as_mut(),
        done: BTreeSet::new(),
        blobs: 0,
        bytes: 0,
    };
    match &resolved.new_root_bytes {
        Some(bytes) => {
            for (_, child) in &resolved.children {
                copier.copy_node(child)?;
            }
            let mut reader = content::VerifyingReader::new(&bytes[..], &resolved.root, "new index");
            copier.sink.put_blob(&resolved.root, &mut reader)?;
        }
        None => copier.copy_node(&resolved.root)?,
    }
    let (blobs, bytes) = (copier.blobs, copier.bytes);
    sink.commit(&resolved.root, &resolved.children)?;
    Ok(CopyReport {
        digest: resolved.root.digest().to_string(),
        media_type: resolved.root.media_type().to_string(),
        platforms: resolved
            .children
            .iter()
            .map(|(p, _)| p.to_string())
            .collect(),
        blobs_copied: blobs,
        bytes_copied: bytes,
        note: resolved.note,
    })
}

struct Copier<'a> {
    source: &'a dyn ImageSource,
    sink: &'a mut dyn ImageSink,
    done: BTreeSet<String>,
    blobs: usize,
    bytes: u64,
}

impl Copier<'_> {
    fn copy_node(&mut self, desc: &Descriptor) -> Result<(), ImageError> {
        if !self.done.insert(desc.digest().to_string()) {
            return Ok(());
        }
        let what = self.source.describe();
        match content::kind_of(desc.media_type()) {
            Kind::Index => {
                let bytes = self.source.read_blob(desc)?;
                let index = parse_index(&bytes, desc, &what)?;
                for child in index.manifests() {
                    self.copy_node(child)?;
                }
                self.put_bytes(desc, &bytes)
            }
            Kind::Manifest => {
                let bytes = self.source.read_blob(desc)?;
                let manifest = parse_manifest(&bytes, desc, &what)?;
                self.copy_blob(manifest.config())?;
                for l in manifest.layers() {
                    self.copy_blob(l)?;
                }
                self.put_bytes(desc, &bytes)
            }
            Kind::Other => self.copy_blob(desc),
        }
    }

    fn copy_blob(&mut self, desc: &Descriptor) -> Result<(), ImageError> {
        if self.sink.has_blob(desc.digest()) {
            return Ok(());
        }
        let mut reader = self.source.open_blob(desc)?;
        self.sink.put_blob(desc, &mut reader)?;
        self.blobs += 1;
        self.bytes += desc.size();
        Ok(())
    }

    fn put_bytes(&mut self, desc: &Descriptor, bytes: &[u8]) -> Result<(), ImageError> {
        if self.sink.has_blob(desc.digest()) {
            return Ok(());
        }
        let mut reader = content::VerifyingReader::new(bytes, desc, self.source.describe());
        self.sink.put_blob(desc, &mut reader)?;
        self.blobs += 1;
        self.bytes += desc.size();
        Ok(())
    }
}
