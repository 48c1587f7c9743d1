//! The image-store interface: every transport is an [`ImageSource`] to read from and an
//! [`ImageSink`] to write to, so every command works on every transport (the regclient /
//! go-containerregistry model). [`copy`] moves an image or a whole index between any two.
//!
//! Sinks stage what they receive and make it visible only in [`ImageSink::commit`]; an error
//! anywhere before that leaves the destination as it was. A layout or archive sink can also be
//! given several images and name them all in one [`ImageSink::commit_named`] (`lathe bundle`),
//! and [`open_beside`] finds a registry image in the bundle a builder comes from.
//!
//! [`copy`] first reads every manifest and index it needs, and what is attached to them
//! ([`crate::attachments`]), then hands the sink all the blobs at once (so layout and registry
//! sinks transfer them in parallel), then the manifests, children before the index that names
//! them and attachments after their subjects, and commits last.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};
use serde_json::Value;

use crate::archive::{
    ArchiveError, DockerArchiveSink, DockerArchiveSource, OciArchiveSink, OciArchiveSource,
    TarIndex,
};
use crate::attachments::{self, Attachment, AttachmentReport, Link};
use crate::content::{self, Kind};
use crate::layout::{self, Layout, LayoutError, Transaction};
use crate::platform::{Platform, PlatformError};
use crate::progress::{Progress, ProgressReader};
use crate::reference::{ImageRef, ReferenceError, RegistryRef};
use crate::registry::{RegistryError, RegistrySink, RegistrySource};

/// How many blobs layout and registry sinks transfer at once.
pub const PARALLEL_TRANSFERS: usize = 4;

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{reference}: {what} is not yet supported")]
    NotYetSupported {
        reference: String,
        what: &'static str,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    /// The image (or index) has no image for the platform asked for.
    #[error("{what}: {why}")]
    PlatformMissing { what: String, why: String },
    /// The image can't be written back where it is (see [`in_place_destination`]).
    #[error("{reference}: {why}")]
    NotReplaceable { reference: String, why: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl ImageError {
    /// True when the user's arguments, not the images, are at fault (exit code 3).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ImageError::Reference(_) | ImageError::Platform(_) | ImageError::NotReplaceable { .. }
        )
    }
}

/// Where images are read from. Sources are shared by the threads of a parallel copy.
pub trait ImageSource: Sync {
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

    /// The registry repository this source reads from, if it is one: a registry sink on the
    /// same registry mounts blobs from it instead of copying their bytes.
    fn registry_location(&self) -> Option<&RegistryRef> {
        None
    }

    /// The registry repository blob `desc` can be mounted from: this source's own by default;
    /// an assembled image answers per blob, for the input image that serves it.
    fn blob_location(&self, _desc: &Descriptor) -> Option<&RegistryRef> {
        self.registry_location()
    }

    /// The manifest or index another tag of this source's repository (a ref name of its
    /// layout) names, with its bytes, verified; `None` when there is no such tag or the
    /// transport has no tags. Attachments are found through it.
    fn tagged(&self, _tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
        Ok(None)
    }

    /// The OCI referrers API's list for `subject`; `None` when the source has no such API
    /// (only registries do, and not all of them).
    fn referrers_api(&self, _subject: &Digest) -> Result<Option<Vec<Descriptor>>, ImageError> {
        Ok(None)
    }

    /// The entries of `index.json` when the source is an OCI layout or oci-archive (image-layout
    /// 1.1 lists referrers there); `None` for other transports.
    fn layout_entries(&self) -> Result<Option<Vec<Descriptor>>, ImageError> {
        Ok(None)
    }
}

/// Blobs a sink wrote, and their bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    pub blobs: usize,
    pub bytes: u64,
}

impl Transferred {
    pub fn add(&mut self, desc: &Descriptor) {
        self.blobs += 1;
        self.bytes += desc.size();
    }
}

/// Where images are written to.
pub trait ImageSink {
    /// Whether the destination already has (or has been given) this blob.
    fn has_blob(&self, digest: &Digest) -> bool;
    /// Stores a blob; `reader` verifies itself, so an error mid-stream aborts the copy.
    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError>;

    /// Stores the configs and layers of what is being copied, each opened from `source` (more
    /// than once when a sink retries). Sinks that can transfer in parallel override this; by
    /// default they are copied one after the other.
    fn put_blobs(
        &mut self,
        source: &dyn ImageSource,
        blobs: &[Descriptor],
        progress: &Progress,
    ) -> Result<Transferred, ImageError> {
        let mut transferred = Transferred::default();
        for desc in blobs {
            let shown = progress.blob(desc);
            if self.has_blob(desc.digest()) {
                shown.finish_as("exists");
                continue;
            }
            let mut reader = ProgressReader::new(source.open_blob(desc)?, &shown);
            self.put_blob(desc, &mut reader)?;
            shown.finish_as("copied");
            transferred.add(desc);
        }
        Ok(transferred)
    }

    /// Stores a manifest or index (already verified); called for every child before the
    /// index that names it, and for the root last. Returns whether it was written.
    fn put_manifest(&mut self, desc: &Descriptor, bytes: &[u8]) -> Result<bool, ImageError> {
        if self.has_blob(desc.digest()) {
            return Ok(false);
        }
        let mut reader = content::VerifyingReader::new(bytes, desc, "manifest");
        self.put_blob(desc, &mut reader)?;
        Ok(true)
    }

    /// Whether this destination keeps attachments (OCI referrers, cosign tags) beside images.
    fn keeps_attachments(&self) -> bool {
        false
    }

    /// Records what is attached to the image (see [`crate::attachments`]), to be stored at
    /// [`ImageSink::commit`] as the transport keeps it: a registry pushes cosign tags and,
    /// without the referrers API, updates each subject's fallback tag; a layout names cosign
    /// tags as refs and lists referrers in `index.json`. Their manifests and blobs have been
    /// given to the sink already. Only called when [`ImageSink::keeps_attachments`].
    fn attach(&mut self, attachments: &[Attachment]) -> Result<(), ImageError> {
        Err(ImageError::Invalid {
            what: format!("{} attachments", attachments.len()),
            why: "this destination holds images only".into(),
        })
    }

    /// Makes the image visible under the sink's name; `children` are the platform manifests
    /// of an index, which layout-like sinks also name `NAME-os-arch`.
    fn commit(
        self: Box<Self>,
        root: &Descriptor,
        children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError>;

    /// Makes several images given to this sink visible at once, each under its own name
    /// (`lathe bundle`). Only sinks that hold several named images (an OCI layout or archive)
    /// can; the others refuse before anything is visible.
    fn commit_named(self: Box<Self>, images: &[NamedImage]) -> Result<(), ImageError> {
        let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
        Err(ImageError::Invalid {
            what: names.join(", "),
            why: "this destination holds one image; several named images go into an OCI \
                  layout (oci:DIR) or archive (oci-archive:FILE)"
                .into(),
        })
    }
}

/// An image a sink has been given, and the name it gets on commit.
#[derive(Debug, Clone)]
pub struct NamedImage {
    pub name: String,
    pub root: Descriptor,
    /// The platform manifests of an index (also named `NAME-os-arch` in a layout).
    pub children: Vec<(Platform, Descriptor)>,
}

pub fn open_source(reference: &ImageRef) -> Result<Box<dyn ImageSource>, ImageError> {
    Ok(match reference {
        ImageRef::Registry(r) => Box::new(RegistrySource::open(r)?),
        ImageRef::Layout { dir, name } => Box::new(LayoutSource::open(dir, name.as_deref())?),
        ImageRef::OciArchive { file, name } => {
            Box::new(OciArchiveSource::open(file, name.as_deref())?)
        }
        ImageRef::DockerArchive { file, name } => {
            Box::new(DockerArchiveSource::open(file, name.as_deref())?)
        }
    })
}

/// Opens `reference` if the image is there, `None` if it plainly is not (no such tag,
/// repository, layout, ref name or archive); any other failure is an error. Builds use it for
/// the images that are only read when they exist: the previous image and the cache image.
pub fn open_if_exists(reference: &ImageRef) -> Result<Option<Box<dyn ImageSource>>, ImageError> {
    match reference {
        ImageRef::Layout { dir, name } => {
            if !dir.join("index.json").exists() {
                return Ok(None);
            }
            let layout = Layout::open(dir)?;
            let wanted = name.as_deref().unwrap_or(crate::reference::DEFAULT_TAG);
            let named = layout
                .index_entries()?
                .iter()
                .any(|entry| layout::ref_name(entry).as_deref() == Some(wanted));
            if !named {
                return Ok(None);
            }
        }
        ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => {
            if !file.exists() {
                return Ok(None);
            }
        }
        ImageRef::Registry(_) => {}
    }
    match open_source(reference) {
        Ok(source) => Ok(Some(source)),
        Err(ImageError::Registry(RegistryError::NotFound { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `reference`. A registry reference is first looked for in the OCI layout or archive
/// `beside` reads from (a builder's), under its fully qualified name as `lathe bundle` names
/// images: an image found there needs no registry. With `--offline`, one that is not there is
/// refused, naming where it was looked for.
pub fn open_beside(
    reference: &ImageRef,
    beside: Option<&ImageRef>,
) -> Result<Box<dyn ImageSource>, ImageError> {
    let bundle =
        beside.filter(|r| matches!(r, ImageRef::Layout { .. } | ImageRef::OciArchive { .. }));
    let (ImageRef::Registry(wanted), Some(bundle)) = (reference, bundle) else {
        return open_source(reference);
    };
    let name = wanted.to_string();
    if let Some(found) = named_in_same_layout(bundle, &name)? {
        tracing::info!("{reference}: taken from {found}");
        return open_source(&found);
    }
    match open_source(reference) {
        Err(ImageError::Registry(RegistryError::Offline { .. })) => {
            let layout = match bundle {
                ImageRef::Layout { dir, .. } => format!("oci:{}", dir.display()),
                ImageRef::OciArchive { file, .. } => format!("oci-archive:{}", file.display()),
                other => other.to_string(),
            };
            Err(ImageError::Invalid {
                what: reference.to_string(),
                why: format!(
                    "{layout} holds no image named {name:?}, and lathe is --offline (no \
                     registry was contacted); put it into the bundle (lathe bundle)"
                ),
            })
        }
        opened => opened,
    }
}

/// The image named `name` in the OCI layout or archive that `reference` reads from (whatever
/// ref name `reference` itself gives), if that layout or archive holds an image by that name;
/// `None` for other transports. A build from a bundle finds its run image this way.
fn named_in_same_layout(reference: &ImageRef, name: &str) -> Result<Option<ImageRef>, ImageError> {
    let named = Some(name.to_string());
    let (entries, found) = match reference {
        ImageRef::Layout { dir, .. } => (
            Layout::open(dir)?.index_entries()?,
            ImageRef::Layout {
                dir: dir.clone(),
                name: named,
            },
        ),
        ImageRef::OciArchive { file, .. } => (
            OciArchiveSource::read_index(file)?.1,
            ImageRef::OciArchive {
                file: file.clone(),
                name: named,
            },
        ),
        ImageRef::Registry(_) | ImageRef::DockerArchive { .. } => return Ok(None),
    };
    let holds = entries
        .iter()
        .any(|entry| layout::ref_name(entry).as_deref() == Some(name));
    Ok(holds.then_some(found))
}

pub fn open_sink(reference: &ImageRef) -> Result<Box<dyn ImageSink>, ImageError> {
    Ok(match reference {
        ImageRef::Registry(r) => Box::new(RegistrySink::open(r)?),
        ImageRef::Layout { dir, name } => Box::new(LayoutSink {
            tx: Transaction::begin(dir)?,
            name: name
                .clone()
                .unwrap_or_else(|| crate::reference::DEFAULT_TAG.to_string()),
            attachments: vec![],
        }),
        ImageRef::OciArchive { file, name } => {
            Box::new(OciArchiveSink::create(file, name.as_deref())?)
        }
        ImageRef::DockerArchive { file, name } => {
            Box::new(DockerArchiveSink::create(file, name.as_deref())?)
        }
    })
}

/// Where an image is written back to replace itself (a rebase or `lathe index add` without
/// another destination): its own tag, layout ref or archive, which the destination's sink then
/// replaces atomically. A digest, an unnamed layout image, or an archive that holds other
/// images too is [`ImageError::NotReplaceable`] (the first can't be replaced, the others would
/// be lost).
pub fn in_place_destination(image: &ImageRef, root: &Descriptor) -> Result<ImageRef, ImageError> {
    let refuse = |why: String| ImageError::NotReplaceable {
        reference: image.to_string(),
        why,
    };
    let invalid = |why: String| ImageError::Invalid {
        what: image.to_string(),
        why,
    };
    let ref_name = |name: &Option<String>| {
        name.clone()
            .or_else(|| layout::ref_name(root))
            .ok_or_else(|| refuse("the image has no ref name to replace".into()))
    };
    match image {
        ImageRef::Registry(r) => match &r.tag {
            Some(_) => Ok(ImageRef::Registry(RegistryRef {
                digest: None,
                ..r.clone()
            })),
            None => Err(refuse(
                "a digest names one image for good, so a changed image can't replace it".into(),
            )),
        },
        ImageRef::Layout { dir, name } => Ok(ImageRef::Layout {
            dir: dir.clone(),
            name: Some(ref_name(name)?),
        }),
        ImageRef::OciArchive { file, name } => {
            let name = ref_name(name)?;
            let tar = TarIndex::open(file, "oci-archive")?;
            let bytes = tar.read_member("index.json", content::MAX_JSON_BLOB)?;
            let index: Value =
                serde_json::from_slice(&bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
            let others: Vec<String> = index
                .get("manifests")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|d| {
                    d.pointer(&format!(
                        "/annotations/{}",
                        layout::REF_NAME.replace('/', "~1")
                    ))
                    .and_then(Value::as_str)
                    .unwrap_or("(unnamed)")
                    .to_string()
                })
                .filter(|n| *n != name && !n.starts_with(&format!("{name}-")))
                .collect();
            if !others.is_empty() {
                return Err(refuse(format!(
                    "the archive also holds {}, which rewriting it would drop",
                    others.join(", ")
                )));
            }
            Ok(ImageRef::OciArchive {
                file: file.clone(),
                name: Some(name),
            })
        }
        ImageRef::DockerArchive { file, name } => {
            let tar = TarIndex::open(file, "docker-archive")?;
            let bytes = tar.read_member("manifest.json", content::MAX_JSON_BLOB)?;
            let entries: Vec<Value> = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("manifest.json: {e}")))?;
            if entries.len() > 1 {
                return Err(refuse(format!(
                    "the archive holds {} images, and rewriting it with one would drop the \
                     others",
                    entries.len()
                )));
            }
            let tag = match name {
                Some(n) if !n.starts_with('@') => Some(n.clone()),
                _ => entries
                    .first()
                    .and_then(|e| e.pointer("/RepoTags/0"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            Ok(ImageRef::DockerArchive {
                file: file.clone(),
                name: tag,
            })
        }
    }
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
    fn tagged(&self, tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
        match layout::find_ref(&self.layout.index_entries()?, tag) {
            Some(desc) => {
                let bytes = self.read_blob(&desc)?;
                Ok(Some((desc, bytes)))
            }
            None => Ok(None),
        }
    }
    fn layout_entries(&self) -> Result<Option<Vec<Descriptor>>, ImageError> {
        Ok(Some(self.layout.index_entries()?))
    }
}

struct LayoutSink {
    tx: Transaction,
    name: String,
    attachments: Vec<Attachment>,
}

impl ImageSink for LayoutSink {
    fn has_blob(&self, digest: &Digest) -> bool {
        self.tx.has_blob(digest)
    }
    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError> {
        let source = format!("copying to oci:{}", self.tx.target().display());
        Ok(self.tx.write_blob(desc, reader, &source)?)
    }
    fn put_blobs(
        &mut self,
        source: &dyn ImageSource,
        blobs: &[Descriptor],
        progress: &Progress,
    ) -> Result<Transferred, ImageError> {
        let mut todo: Vec<&Descriptor> = blobs
            .iter()
            .filter(|d| !self.tx.has_blob(d.digest()))
            .collect();
        todo.sort_by_key(|d| std::cmp::Reverse(d.size()));
        let what = format!("copying to oci:{}", self.tx.target().display());
        let tx = &self.tx;
        let staged = parallel_map(&todo, PARALLEL_TRANSFERS, |desc| {
            let shown = progress.blob(desc);
            let reader = ProgressReader::new(source.open_blob(desc)?, &shown);
            let writer = tx.stage_blob(desc, reader, &what)?;
            shown.finish_as("copied");
            Ok::<_, ImageError>(writer)
        })?;
        let mut transferred = Transferred::default();
        for (desc, writer) in todo.into_iter().zip(staged) {
            writer.finish(&mut self.tx)?;
            transferred.add(desc);
        }
        Ok(transferred)
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
    fn commit_named(self: Box<Self>, images: &[NamedImage]) -> Result<(), ImageError> {
        let (refs, unnamed) = layout_entries_for(images, &self.attachments);
        Ok(self.tx.commit_with_unnamed(&refs, &unnamed)?)
    }
}

/// The `index.json` entries of images stored under their names in a layout or oci-archive,
/// with their attachments: the named entries ([`layout::refs_for`], and each cosign tag as a
/// ref name) and the unnamed ones (each OCI referrer, described with its `artifactType`, as
/// image-layout 1.1 lists referrers).
pub fn layout_entries_for(
    images: &[NamedImage],
    attachments: &[Attachment],
) -> (Vec<(String, Descriptor)>, Vec<Descriptor>) {
    let mut refs: Vec<(String, Descriptor)> = images
        .iter()
        .flat_map(|i| layout::refs_for(&i.name, &i.root, &i.children))
        .collect();
    let mut unnamed: Vec<Descriptor> = Vec::new();
    for attachment in attachments {
        match &attachment.link {
            Link::Tag(tag) => refs.push((tag.clone(), attachment.descriptor.clone())),
            Link::Referrer => {
                if !unnamed
                    .iter()
                    .any(|d| d.digest() == attachment.descriptor.digest())
                {
                    unnamed.push(attachment.descriptor.clone());
                }
            }
        }
    }
    (refs, unnamed)
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

/// One platform's image of a source, as commands that need a single image read it.
pub struct PlatformImage {
    /// The image manifest's descriptor.
    pub manifest: Descriptor,
    /// The manifest's layers.
    pub layers: Vec<Descriptor>,
    /// The config, parsed.
    pub config: Value,
    /// The platform the config names (the one asked for when it names none).
    pub platform: Platform,
}

/// Picks `wanted` from `source` (an index's child, or the image itself) and reads its config.
pub fn read_platform_image(
    source: &dyn ImageSource,
    wanted: &Platform,
) -> Result<PlatformImage, ImageError> {
    let resolved = resolve_selection(
        source,
        &Selection {
            platforms: vec![wanted.clone()],
            single_image: true,
        },
    )?;
    read_manifest_and_config(source, resolved.root, wanted)
}

/// An image config's `rootfs.diff_ids`, in layer order.
pub fn config_diff_ids(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The image a command that needs one runs when no platform is asked for: a single image
/// whatever its platform, or the host's child of an index.
pub fn read_default_image(source: &dyn ImageSource) -> Result<PlatformImage, ImageError> {
    let root = source.root();
    if content::kind_of(root.media_type()) == Kind::Manifest {
        return read_manifest_and_config(source, root, &Platform::host());
    }
    read_platform_image(source, &Platform::host())
}

/// The manifest `desc` and its config; `fallback` is the platform when the config names none.
pub fn read_manifest_and_config(
    source: &dyn ImageSource,
    desc: Descriptor,
    fallback: &Platform,
) -> Result<PlatformImage, ImageError> {
    let what = source.describe();
    let manifest = parse_manifest(&source.read_blob(&desc)?, &desc, &what)?;
    let config_bytes = source.read_blob(manifest.config())?;
    let config = serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Invalid {
        what: what.clone(),
        why: format!("config: {e}"),
    })?;
    Ok(PlatformImage {
        manifest: desc,
        layers: manifest.layers().to_vec(),
        config,
        platform: config_platform(&config_bytes).unwrap_or_else(|| fallback.clone()),
    })
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
    /// What was attached to the copied manifests and went with them.
    pub attachments: Vec<AttachmentReport>,
    /// A choice lathe made for the user (such as picking the host platform of an index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How to copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Empty: the whole image or index; otherwise these platforms of an index.
    pub platforms: Vec<Platform>,
    /// Carry what is attached to each copied manifest (OCI referrers and cosign tags, see
    /// [`crate::attachments`]); `lathe copy` does unless told not to.
    pub attachments: bool,
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
                let found = children.iter().find(|(cp, _)| cp == p).ok_or_else(|| {
                    ImageError::PlatformMissing {
                        what: what.clone(),
                        why: format!("the index has no {p} image (it has: {})", available()),
                    }
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
                        return Err(ImageError::PlatformMissing {
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

/// Copies the image `src` names to `dst`, showing nothing.
pub fn copy(
    src: &ImageRef,
    dst: &ImageRef,
    options: &CopyOptions,
) -> Result<CopyReport, ImageError> {
    copy_with_progress(src, dst, options, &Progress::Silent)
}

/// Copies the image `src` names to `dst`: every blob first, then the manifests (children
/// before their index), then the commit that makes it visible.
pub fn copy_with_progress(
    src: &ImageRef,
    dst: &ImageRef,
    options: &CopyOptions,
    progress: &Progress,
) -> Result<CopyReport, ImageError> {
    let source = open_source(src)?;
    copy_from_source(source.as_ref(), dst, options, progress)
}

/// Copies the image an already open `source` serves (a transport, or an image lathe has just
/// assembled) to `dst`, as [`copy_with_progress`] does. With `options.attachments`, what is
/// attached to each manifest copied (the root, and an index's children) is found in `source`
/// and copied too, byte for byte, so every `subject` still names its manifest. Attachments
/// go by digest: an index made of some platforms of another is a new manifest, with nothing
/// attached to it unless the source has something for that very digest.
pub fn copy_from_source(
    source: &dyn ImageSource,
    dst: &ImageRef,
    options: &CopyOptions,
    progress: &Progress,
) -> Result<CopyReport, ImageError> {
    let selection = Selection {
        platforms: options.platforms.clone(),
        single_image: matches!(dst, ImageRef::DockerArchive { .. }),
    };
    let resolved = resolve_selection(source, &selection)?;
    let mut sink = open_sink(dst)?;
    let put = put_resolved(
        source,
        &resolved,
        sink.as_mut(),
        options.attachments,
        progress,
    )?;
    let mut notes: Vec<String> = resolved.note.iter().cloned().collect();
    notes.extend(put.notes);
    sink.commit(&resolved.root, &resolved.children)?;
    Ok(CopyReport {
        digest: resolved.root.digest().to_string(),
        media_type: resolved.root.media_type().to_string(),
        platforms: resolved
            .children
            .iter()
            .map(|(p, _)| p.to_string())
            .collect(),
        blobs_copied: put.transferred.blobs,
        bytes_copied: put.transferred.bytes,
        attachments: put.carried.iter().map(Attachment::report).collect(),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

/// What [`put_resolved`] gave a sink.
pub struct Put {
    pub transferred: Transferred,
    /// The image's whole size: every blob and manifest it is made of, written or already there.
    pub size: u64,
    /// The attachments given to the sink with the image.
    pub carried: Vec<Attachment>,
    pub notes: Vec<String>,
}

/// Gives `sink` every blob and manifest of the `resolved` image of `source` (configs and
/// layers first, then manifests, children before the index) and, with `attachments`, what is
/// attached to each of those manifests in `source` (when the sink can keep it), without
/// committing.
pub fn put_resolved(
    source: &dyn ImageSource,
    resolved: &Resolved,
    sink: &mut dyn ImageSink,
    attachments: bool,
    progress: &Progress,
) -> Result<Put, ImageError> {
    let mut plan = Plan::of(source, resolved)?;
    let size = plan.blobs.iter().map(Descriptor::size).sum::<u64>()
        + plan.manifests.iter().map(|(d, _)| d.size()).sum::<u64>();
    let mut notes = Vec::new();
    let mut carried: Vec<Attachment> = Vec::new();
    if attachments {
        let subjects: Vec<Digest> = plan
            .manifests
            .iter()
            .map(|(desc, _)| desc.digest().clone())
            .collect();
        let found = attachments::discover(source, &subjects)?;
        notes.extend(found.note);
        if sink.keeps_attachments() {
            for attachment in &found.attachments {
                plan.add_attachment(source, attachment)?;
            }
            carried = found.attachments;
        } else if !found.attachments.is_empty() {
            notes.push(format!(
                "{} attachments (signatures, attestations, SBOMs) were not copied: the \
                 destination holds images only",
                found.attachments.len()
            ));
        }
    }
    let mut transferred = sink.put_blobs(source, &plan.blobs, progress)?;
    for (desc, bytes) in &plan.manifests {
        if sink.put_manifest(desc, bytes)? {
            transferred.add(desc);
        }
    }
    if !carried.is_empty() {
        sink.attach(&carried)?;
    }
    Ok(Put {
        transferred,
        size,
        carried,
        notes,
    })
}

/// What a copy writes: the configs and layers, and the manifests and indexes with their
/// bytes, children before parents and the root last, then the attachments. Each digest
/// appears once.
struct Plan {
    blobs: Vec<Descriptor>,
    manifests: Vec<(Descriptor, Vec<u8>)>,
    seen: BTreeSet<String>,
}

impl Plan {
    fn of(source: &dyn ImageSource, resolved: &Resolved) -> Result<Plan, ImageError> {
        let mut plan = Plan {
            blobs: vec![],
            manifests: vec![],
            seen: BTreeSet::new(),
        };
        match &resolved.new_root_bytes {
            Some(bytes) => {
                for (_, child) in &resolved.children {
                    plan.walk(source, child, None)?;
                }
                plan.walk(source, &resolved.root, Some(bytes.clone()))?;
            }
            None => plan.walk(source, &resolved.root, None)?,
        }
        Ok(plan)
    }

    /// Adds an attachment's manifest (as it was read, byte for byte) and what it names.
    fn add_attachment(
        &mut self,
        source: &dyn ImageSource,
        attachment: &Attachment,
    ) -> Result<(), ImageError> {
        self.walk(
            source,
            &attachment.descriptor,
            Some(attachment.bytes.clone()),
        )
    }

    fn walk(
        &mut self,
        source: &dyn ImageSource,
        desc: &Descriptor,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), ImageError> {
        if !self.seen.insert(desc.digest().to_string()) {
            return Ok(());
        }
        let what = source.describe();
        match content::kind_of(desc.media_type()) {
            Kind::Index => {
                let bytes = match bytes {
                    Some(b) => b,
                    None => source.read_blob(desc)?,
                };
                for child in parse_index(&bytes, desc, &what)?.manifests() {
                    self.walk(source, child, None)?;
                }
                self.manifests.push((desc.clone(), bytes));
            }
            Kind::Manifest => {
                let bytes = match bytes {
                    Some(b) => b,
                    None => source.read_blob(desc)?,
                };
                let manifest = parse_manifest(&bytes, desc, &what)?;
                for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
                    if self.seen.insert(blob.digest().to_string()) {
                        self.blobs.push(blob.clone());
                    }
                }
                self.manifests.push((desc.clone(), bytes));
            }
            Kind::Other => self.blobs.push(desc.clone()),
        }
        Ok(())
    }
}

/// Runs `work` on every item with up to `threads` threads; the results come back in the
/// items' order. After the first error no new item is started, and that error is returned.
pub fn parallel_map<T: Sync, R: Send, E: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    match work(&items[i]) {
                        Ok(r) => results.lock().expect("results lock")[i] = Some(r),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().expect("error lock").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error lock") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_order_and_stops_at_the_first_error() {
        let items: Vec<u32> = (0..50).collect();
        let doubled = parallel_map(&items, 4, |i| Ok::<_, String>(i * 2)).unwrap();
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let started = AtomicUsize::new(0);
        let err = parallel_map(&items, 2, |i| {
            started.fetch_add(1, Ordering::Relaxed);
            if *i == 3 {
                Err(format!("item {i}"))
            } else {
                Ok(*i)
            }
        })
        .unwrap_err();
        assert_eq!(err, "item 3");
        assert!(started.load(Ordering::Relaxed) < items.len());
        assert!(
            parallel_map(&[] as &[u32], 4, |i| Ok::<_, ()>(*i))
                .unwrap()
                .is_empty()
        );
    }
}
