//! The registry as an image source and an image sink.
//!
//! The sink writes nothing visible until [`ImageSink::commit`]: blobs (invisible until a
//! manifest names them) go up in parallel, child manifests are pushed by digest, then (when
//! the image has attachments) the root by digest, the attachments' manifests, their cosign
//! tags and, on a registry without the referrers API, the fallback tags; only then is the root
//! pushed under its tag. A push that fails anywhere before that leaves the tag as it was.
//!
//! As a source, it answers the attachment lookups: other tags of its repository, and the
//! referrers API where the registry has it.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use oci_spec::image::{Descriptor, Digest, ImageIndex, MediaType};

use super::RegistryError;
use super::client::{Registry, Uploaded, scope};
use crate::attachments::{self, Attachment, Link};
use crate::content::{self, Kind, VerifyingReader};
use crate::image::{
    self, ImageError, ImageSink, ImageSource, PARALLEL_TRANSFERS, Transferred, parallel_map,
};
use crate::platform::Platform;
use crate::progress::{BlobProgress, Progress};
use crate::reference::RegistryRef;

fn describe(reference: &RegistryRef) -> String {
    format!("docker://{reference}")
}

/// An image or index in a registry, its manifest fetched and verified on open.
pub struct RegistrySource {
    registry: Registry,
    reference: RegistryRef,
    describe: String,
    root: Descriptor,
    root_bytes: Vec<u8>,
}

impl RegistrySource {
    pub fn open(reference: &RegistryRef) -> Result<RegistrySource, ImageError> {
        let describe = describe(reference);
        let registry = Registry::connect(
            &reference.registry,
            &describe,
            vec![scope(&reference.repository, "pull")],
            super::settings(),
        )?;
        let wanted = match (&reference.digest, &reference.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => crate::reference::DEFAULT_TAG.to_string(),
        };
        let (bytes, media_type, digest) =
            registry.get_manifest(&reference.repository, &wanted, &describe)?;
        let root = Descriptor::new(
            MediaType::from(media_type.as_str()),
            bytes.len() as u64,
            digest,
        );
        Ok(RegistrySource {
            registry,
            reference: reference.clone(),
            describe,
            root,
            root_bytes: bytes,
        })
    }

    /// HTTP requests sent so far.
    pub fn request_count(&self) -> u64 {
        self.registry.request_count()
    }
}

impl ImageSource for RegistrySource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> Descriptor {
        self.root.clone()
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        content::check_descriptor(desc).map_err(|why| ImageError::Invalid {
            what: self.describe.clone(),
            why,
        })?;
        let verified = |reader| verified(reader, desc, &self.describe);
        match content::kind_of(desc.media_type()) {
            Kind::Index | Kind::Manifest if desc.digest() == self.root.digest() => {
                Ok(verified(Box::new(Cursor::new(self.root_bytes.clone()))))
            }
            Kind::Index | Kind::Manifest => {
                let (bytes, _, _) = self.registry.get_manifest(
                    &self.reference.repository,
                    desc.digest().as_ref(),
                    &self.describe,
                )?;
                Ok(verified(Box::new(Cursor::new(bytes))))
            }
            Kind::Other => Ok(verified(Box::new(self.registry.open_blob(
                &self.reference.repository,
                desc,
                &self.describe,
            )?))),
        }
    }

    fn registry_location(&self) -> Option<&RegistryRef> {
        Some(&self.reference)
    }

    fn tagged(&self, tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
        match self
            .registry
            .get_manifest(&self.reference.repository, tag, &self.describe)
        {
            Ok((bytes, media_type, digest)) => {
                let desc = Descriptor::new(
                    MediaType::from(media_type.as_str()),
                    bytes.len() as u64,
                    digest,
                );
                Ok(Some((desc, bytes)))
            }
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn referrers_api(&self, subject: &Digest) -> Result<Option<Vec<Descriptor>>, ImageError> {
        Ok(self
            .registry
            .get_referrers(&self.reference.repository, subject, &self.describe)?)
    }
}

fn verified<'a>(
    reader: Box<dyn Read + Send + 'a>,
    desc: &Descriptor,
    describe: &str,
) -> Box<dyn Read + Send + 'a> {
    Box::new(VerifyingReader::new(reader, desc, describe.to_string()))
}

/// A manifest the sink was given, pushed at commit.
struct PendingManifest {
    desc: Descriptor,
    bytes: Vec<u8>,
    /// False when the registry has it already (only the root is then pushed, for its tag).
    missing: bool,
}

/// A push to a registry repository, tagged at commit.
pub struct RegistrySink {
    registry: Registry,
    reference: RegistryRef,
    describe: String,
    manifests: Vec<PendingManifest>,
    attachments: Vec<Attachment>,
}

impl RegistrySink {
    pub fn open(reference: &RegistryRef) -> Result<RegistrySink, ImageError> {
        let describe = describe(reference);
        let registry = Registry::connect(
            &reference.registry,
            &describe,
            vec![scope(&reference.repository, "pull,push")],
            super::settings(),
        )?;
        Ok(RegistrySink {
            registry,
            reference: reference.clone(),
            describe,
            manifests: vec![],
            attachments: vec![],
        })
    }

    /// HTTP requests sent so far.
    pub fn request_count(&self) -> u64 {
        self.registry.request_count()
    }

    /// The repository to mount `desc` from: the one `source` has it in, when that is on this
    /// registry and not this repository. An assembled image's blobs may come from several
    /// repositories (an app image's layers and a new run image's, on rebase).
    fn mount_source(&self, source: &dyn ImageSource, desc: &Descriptor) -> Option<String> {
        source
            .blob_location(desc)
            .filter(|r| {
                r.registry == self.reference.registry && r.repository != self.reference.repository
            })
            .map(|r| r.repository.clone())
    }

    /// Pushes the attachments' tags: each cosign tag, and, when the registry lacks the
    /// referrers API, each subject's fallback tag `sha256-<hex>`, merged with what it held
    /// (others' referrers are kept). Their manifests, and the subjects, are in the repository.
    fn push_attachment_tags(&self, root: &Descriptor) -> Result<(), ImageError> {
        let repository = &self.reference.repository;
        let mut referrers: BTreeMap<String, Vec<Descriptor>> = BTreeMap::new();
        for attachment in &self.attachments {
            match &attachment.link {
                Link::Tag(tag) => self.registry.put_manifest(
                    repository,
                    tag,
                    attachment.descriptor.media_type().as_ref(),
                    &attachment.bytes,
                    &self.describe,
                )?,
                Link::Referrer => referrers
                    .entry(attachment.subject.to_string())
                    .or_default()
                    .push(attachment.descriptor.clone()),
            }
        }
        if referrers.is_empty()
            || self
                .registry
                .get_referrers(repository, root.digest(), &self.describe)?
                .is_some()
        {
            return Ok(());
        }
        for (subject, descriptors) in referrers {
            let subject = content::parse_sha256(&subject).expect("a digest lathe checked");
            let tag = attachments::fallback_tag(&subject);
            let what = format!("{} (tag {tag})", self.describe);
            let existing = match self.registry.get_manifest(repository, &tag, &what) {
                Ok((bytes, media_type, _)) if media_type == attachments::OCI_INDEX => Some(bytes),
                Ok((_, media_type, _)) => {
                    return Err(ImageError::Invalid {
                        what,
                        why: format!(
                            "the tag holds a {media_type}, not the image index of referrers the referrers tag schema keeps there; lathe leaves it alone"
                        ),
                    });
                }
                Err(RegistryError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let merged = attachments::merge_fallback_index(existing.as_deref(), &descriptors)
                .map_err(|why| ImageError::Invalid {
                    what: what.clone(),
                    why,
                })?;
            if let Some(bytes) = merged {
                self.registry.put_manifest(
                    repository,
                    &tag,
                    attachments::OCI_INDEX,
                    &bytes,
                    &what,
                )?;
            }
        }
        Ok(())
    }
}

/// An OCI index must not name Docker-typed manifests (and a Docker list no OCI ones): the
/// media-type families of a pushed image are never mixed.
fn check_family(desc: &Descriptor, bytes: &[u8], what: &str) -> Result<(), ImageError> {
    let oci_index = *desc.media_type() == MediaType::ImageIndex;
    let docker_list = desc.media_type().to_string() == content::DOCKER_MANIFEST_LIST;
    if !oci_index && !docker_list {
        return Ok(());
    }
    let index: ImageIndex = image::parse_index(bytes, desc, what)?;
    for child in index.manifests() {
        let t = child.media_type().to_string();
        let mixed = (oci_index && t.starts_with("application/vnd.docker."))
            || (docker_list && t.starts_with("application/vnd.oci."));
        if mixed {
            return Err(ImageError::Invalid {
                what: what.into(),
                why: format!(
                    "index {} is a {} but names {} ({t}); lathe does not push an index that mixes OCI and Docker media types",
                    desc.digest(),
                    desc.media_type(),
                    child.digest()
                ),
            });
        }
    }
    Ok(())
}

impl ImageSink for RegistrySink {
    fn has_blob(&self, digest: &Digest) -> bool {
        self.registry
            .blob_exists(&self.reference.repository, digest, &self.describe)
            .unwrap_or(false)
    }

    /// One blob from a reader that cannot be read twice: spooled to a temporary file so an
    /// upload can be retried.
    fn put_blob(&mut self, desc: &Descriptor, reader: &mut dyn Read) -> Result<(), ImageError> {
        if content::kind_of(desc.media_type()) != Kind::Other {
            let bytes = content::read_small_blob(reader, desc, &self.describe).map_err(|e| {
                ImageError::Invalid {
                    what: self.describe.clone(),
                    why: e.to_string(),
                }
            })?;
            self.put_manifest(desc, &bytes)?;
            return Ok(());
        }
        let io_err = |source| ImageError::Io {
            what: format!("{}: spooling blob {}", self.describe, desc.digest()),
            source,
        };
        let mut spool = tempfile::NamedTempFile::new().map_err(io_err)?;
        std::io::copy(reader, &mut spool).map_err(io_err)?;
        let path = spool.path().to_path_buf();
        let open = || -> Result<Box<dyn Read + Send + '_>, ImageError> {
            let file = std::fs::File::open(&path).map_err(io_err)?;
            Ok(Box::new(VerifyingReader::new(file, desc, "spooled blob")))
        };
        self.registry.upload_blob(
            &self.reference.repository,
            desc,
            None,
            &open,
            &BlobProgress::hidden(),
            &self.describe,
        )?;
        Ok(())
    }

    fn put_blobs(
        &mut self,
        source: &dyn ImageSource,
        blobs: &[Descriptor],
        progress: &Progress,
    ) -> Result<Transferred, ImageError> {
        let mut order: Vec<(&Descriptor, Option<String>)> = blobs
            .iter()
            .map(|d| (d, self.mount_source(source, d)))
            .collect();
        order.sort_by_key(|(d, _)| std::cmp::Reverse(d.size()));
        let mounts: std::collections::BTreeSet<&String> =
            order.iter().filter_map(|(_, from)| from.as_ref()).collect();
        for from in mounts {
            self.registry.add_scope(scope(from, "pull"));
        }
        let this = &*self;
        let outcomes = parallel_map(&order, PARALLEL_TRANSFERS, |(desc, mount_from)| {
            let shown = progress.blob(desc);
            this.registry.upload_blob(
                &this.reference.repository,
                desc,
                mount_from.as_deref(),
                &|| source.open_blob(desc),
                &shown,
                &this.describe,
            )
        })?;
        let mut transferred = Transferred::default();
        for ((desc, _), how) in order.into_iter().zip(outcomes) {
            if how == Uploaded::Sent {
                transferred.add(desc);
            }
        }
        Ok(transferred)
    }

    fn put_manifest(&mut self, desc: &Descriptor, bytes: &[u8]) -> Result<bool, ImageError> {
        check_family(desc, bytes, &self.describe)?;
        let missing = !self.registry.manifest_exists(
            &self.reference.repository,
            desc.digest(),
            &self.describe,
        )?;
        self.manifests.push(PendingManifest {
            desc: desc.clone(),
            bytes: bytes.to_vec(),
            missing,
        });
        Ok(missing)
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
        _children: &[(Platform, Descriptor)],
    ) -> Result<(), ImageError> {
        if let Some(wanted) = &self.reference.digest
            && wanted != root.digest()
        {
            return Err(RegistryError::Refused {
                what: self.describe.clone(),
                why: format!(
                    "the image's digest is {}, not the one the reference names",
                    root.digest()
                ),
            }
            .into());
        }
        let repository = &self.reference.repository;
        let attaching = !self.attachments.is_empty();
        let mut root_bytes = None;
        // Children, then (by digest, when there are attachments, so their subject is there
        // before them) the root, then the attachments' manifests; the tag comes last.
        for m in &self.manifests {
            if m.desc.digest() == root.digest() {
                root_bytes = Some(m);
                if attaching && m.missing {
                    self.registry.put_manifest(
                        repository,
                        m.desc.digest().as_ref(),
                        m.desc.media_type().as_ref(),
                        &m.bytes,
                        &self.describe,
                    )?;
                }
            } else if m.missing {
                self.registry.put_manifest(
                    repository,
                    m.desc.digest().as_ref(),
                    m.desc.media_type().as_ref(),
                    &m.bytes,
                    &self.describe,
                )?;
            }
        }
        let root_manifest = root_bytes.ok_or_else(|| ImageError::Invalid {
            what: self.describe.clone(),
            why: format!("manifest {} was never given to the sink", root.digest()),
        })?;
        if attaching {
            self.push_attachment_tags(root)?;
        }
        let target = match &self.reference.tag {
            Some(tag) => tag.clone(),
            None => root.digest().to_string(),
        };
        self.registry.put_manifest(
            repository,
            &target,
            root.media_type().as_ref(),
            &root_manifest.bytes,
            &self.describe,
        )?;
        tracing::info!(
            "{}: {} HTTP requests",
            self.describe,
            self.registry.request_count()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(media_type: &str, child_type: &str) -> (Descriptor, Vec<u8>) {
        let child = format!("sha256:{}", "a".repeat(64));
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [{"mediaType": child_type, "digest": child, "size": 10}],
        }))
        .unwrap();
        let desc = Descriptor::new(
            MediaType::from(media_type),
            bytes.len() as u64,
            content::sha256_digest(&bytes),
        );
        (desc, bytes)
    }

    #[test]
    fn media_type_families_are_never_mixed() {
        let oci_index = "application/vnd.oci.image.index.v1+json";
        let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
        let (d, b) = index(oci_index, oci_manifest);
        assert!(check_family(&d, &b, "t").is_ok());
        let (d, b) = index(content::DOCKER_MANIFEST_LIST, content::DOCKER_MANIFEST);
        assert!(check_family(&d, &b, "t").is_ok());
        let (d, b) = index(oci_index, content::DOCKER_MANIFEST);
        let err = check_family(&d, &b, "t").unwrap_err().to_string();
        assert!(err.contains("mixes OCI and Docker"), "{err}");
        let (d, b) = index(content::DOCKER_MANIFEST_LIST, oci_manifest);
        assert!(check_family(&d, &b, "t").is_err());
    }
}
