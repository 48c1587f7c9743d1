//! What is attached to an image: signatures, attestations and SBOMs, so that they cross an air
//! gap with it. Two schemes are understood, on every transport:
//!
//! - OCI 1.1 referrers: manifests whose `subject` names the image's manifest. A registry lists
//!   them through the referrers API (`GET /v2/<name>/referrers/<digest>`) or, when it lacks
//!   the API (distribution 2.8), in the referrers tag schema: an image index under the tag
//!   `sha256-<hex>`. An OCI layout (image-layout 1.1) lists them in `index.json`.
//! - cosign's tags: `sha256-<hex>.sig`, `.att` and `.sbom` in the image's repository (ref
//!   names in a layout).
//!
//! [`discover`] finds what is attached to a set of manifests in any
//! [`ImageSource`](crate::image::ImageSource), following attachments of attachments (a
//! signature on an SBOM) down to [`MAX_DEPTH`]; [`crate::image::copy_from_source`] copies them
//! byte for byte beside the image, and each sink stores them as its transport does (see
//! [`crate::image::ImageSink::attach`]). This module owns the naming rules and the referrers
//! index's shape; [`merge_fallback_index`] is how a registry's fallback tag is kept up to date.

use std::collections::{BTreeMap, BTreeSet};

use oci_spec::image::{Descriptor, Digest, MediaType};
use serde::Serialize;
use serde_json::{Value, json};

use crate::content::{self, Kind};
use crate::image::{ImageError, ImageSource, parse_index};

/// cosign's tag suffixes: signatures, attestations and SBOMs.
pub const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];

/// How many levels of attachments of attachments are followed.
pub const MAX_DEPTH: usize = 8;

/// The most attachments one copy carries; a source listing more is refused rather than
/// followed (a hostile list could name any number of manifests to fetch).
pub const MAX_ATTACHMENTS: usize = 1000;

/// The OCI image index media type, the type of a fallback tag's index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// How an attachment is linked to its subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    /// An OCI referrer: its `subject` names the manifest.
    Referrer,
    /// A cosign tag (`sha256-<hex>.sig`, …) names it.
    Tag(String),
}

/// A manifest (or index) attached to a manifest being copied.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The attached manifest, described as a referrers list describes it: with its
    /// `artifactType` and its annotations.
    pub descriptor: Descriptor,
    /// Its bytes, verified against the descriptor.
    pub bytes: Vec<u8>,
    /// The manifest it is attached to.
    pub subject: Digest,
    pub link: Link,
}

impl Attachment {
    pub fn report(&self) -> AttachmentReport {
        AttachmentReport {
            digest: self.descriptor.digest().to_string(),
            media_type: self.descriptor.media_type().to_string(),
            artifact_type: self
                .descriptor
                .artifact_type()
                .as_ref()
                .map(|t| t.to_string()),
            subject: self.subject.to_string(),
            tag: match &self.link {
                Link::Referrer => None,
                Link::Tag(tag) => Some(tag.clone()),
            },
        }
    }
}

/// One attachment a copy carried, as `--json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentReport {
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    #[serde(rename = "artifactType", skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The digest of the manifest it is attached to.
    pub subject: String,
    /// The cosign tag it is under; absent for an OCI referrer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// What [`discover`] found.
#[derive(Debug, Default)]
pub struct Found {
    /// Subjects before what is attached to them.
    pub attachments: Vec<Attachment>,
    /// Set when attachments deeper than [`MAX_DEPTH`] were left behind.
    pub note: Option<String>,
}

/// The referrers tag schema's tag for `digest`: `sha256-<hex>`.
pub fn fallback_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm(), digest.digest())
}

/// A cosign tag for `digest`: `sha256-<hex>.<suffix>`.
pub fn cosign_tag(digest: &Digest, suffix: &str) -> String {
    format!("{}.{suffix}", fallback_tag(digest))
}

/// Whether a tag or ref name is one of the attachment schemes' (`sha256-<hex>` or
/// `sha256-<hex>.sig|.att|.sbom`): such names are never an image of their own.
pub fn is_attachment_tag(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("sha256-") else {
        return false;
    };
    let (hex, suffix) = match rest.split_once('.') {
        Some((hex, suffix)) => (hex, Some(suffix)),
        None => (rest, None),
    };
    hex.len() == 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && suffix.is_none_or(|s| COSIGN_SUFFIXES.contains(&s))
}

/// The descriptor a referrers list gives for the manifest or index `desc` with `bytes`: its
/// `artifactType` (else, for a manifest, its config's media type) and its annotations.
pub fn referrer_descriptor(desc: &Descriptor, bytes: &[u8]) -> Descriptor {
    let mut out = Descriptor::new(
        desc.media_type().clone(),
        desc.size(),
        desc.digest().clone(),
    );
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return out;
    };
    let artifact_type = value
        .get("artifactType")
        .or_else(|| value.pointer("/config/mediaType"))
        .and_then(Value::as_str);
    out.set_artifact_type(artifact_type.map(MediaType::from));
    let annotations: Option<std::collections::HashMap<String, String>> = value
        .get("annotations")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        });
    out.set_annotations(annotations.filter(|a| !a.is_empty()));
    out
}

/// The digest a manifest's or index's `subject` names, if it has one.
pub fn subject_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(bytes)
        .ok()?
        .pointer("/subject/digest")?
        .as_str()
        .map(str::to_string)
}

/// Everything attached to `subjects` (manifests or indexes of `source`), and to what is
/// attached to them, down to [`MAX_DEPTH`] levels. A referrer is kept only when its own
/// `subject` names the manifest it was listed for, so a stale or hostile list cannot bring in
/// anything else.
pub fn discover(source: &dyn ImageSource, subjects: &[Digest]) -> Result<Found, ImageError> {
    let mut finder = Finder {
        source,
        by_subject: None,
    };
    let mut found = Found::default();
    let mut known: BTreeSet<String> = subjects.iter().map(|d| d.to_string()).collect();
    let mut carried: BTreeSet<(String, Link)> = BTreeSet::new();
    let mut level = subjects.to_vec();
    let mut depth = 0;
    while !level.is_empty() {
        if depth == MAX_DEPTH {
            found.note = Some(format!(
                "{}: attachments more than {MAX_DEPTH} levels deep were not followed",
                source.describe()
            ));
            break;
        }
        let mut next = Vec::new();
        for subject in &level {
            for attachment in finder.attached_to(subject)? {
                let digest = attachment.descriptor.digest().clone();
                if !carried.insert((digest.to_string(), attachment.link.clone())) {
                    continue;
                }
                if known.insert(digest.to_string()) {
                    next.push(digest);
                }
                found.attachments.push(attachment);
                if found.attachments.len() > MAX_ATTACHMENTS {
                    return Err(too_many(source));
                }
            }
        }
        level = next;
        depth += 1;
    }
    Ok(found)
}

/// Manifests with a `subject`, with their bytes, by that subject's digest.
type BySubject = BTreeMap<String, Vec<(Descriptor, Vec<u8>)>>;

fn too_many(source: &dyn ImageSource) -> ImageError {
    ImageError::Invalid {
        what: source.describe(),
        why: format!(
            "more than {MAX_ATTACHMENTS} attachments; lathe does not follow that many (--no-attachments copies the image without them)"
        ),
    }
}

struct Finder<'a> {
    source: &'a dyn ImageSource,
    /// For a layout or oci-archive: every manifest reachable from `index.json` that has a
    /// `subject`, by that subject's digest (read once, on first use).
    by_subject: Option<BySubject>,
}

impl Finder<'_> {
    fn attached_to(&mut self, subject: &Digest) -> Result<Vec<Attachment>, ImageError> {
        let source = self.source;
        let what = source.describe();
        let mut listed: Vec<(Descriptor, Option<Vec<u8>>)> = Vec::new();
        if let Some(list) = source.referrers_api(subject)? {
            listed.extend(list.into_iter().map(|d| (d, None)));
        }
        for (desc, bytes) in self.layout_referrers(subject)? {
            listed.push((desc, Some(bytes)));
        }
        let tag = fallback_tag(subject);
        if let Some((desc, bytes)) = source.tagged(&tag)? {
            if content::kind_of(desc.media_type()) == Kind::Index {
                let index = parse_index(&bytes, &desc, &format!("{what} (tag {tag})"))?;
                listed.extend(index.manifests().iter().map(|d| (d.clone(), None)));
            } else {
                tracing::warn!(
                    "{what}: tag {tag} is a {}, not the index of referrers the tag schema wants; ignored",
                    desc.media_type()
                );
            }
        }
        let mut seen = BTreeSet::new();
        listed.retain(|(desc, _)| seen.insert(desc.digest().to_string()));
        if listed.len() > MAX_ATTACHMENTS {
            return Err(too_many(source));
        }
        let mut out = Vec::new();
        for (desc, bytes) in listed {
            if content::kind_of(desc.media_type()) == Kind::Other {
                tracing::warn!(
                    "{what}: referrer {} of {subject} is a {}, not a manifest or index; skipped",
                    desc.digest(),
                    desc.media_type()
                );
                continue;
            }
            let bytes = match bytes {
                Some(bytes) => bytes,
                None => source.read_blob(&desc)?,
            };
            if subject_of(&bytes).as_deref() != Some(subject.as_ref()) {
                tracing::warn!(
                    "{what}: {} is listed as a referrer of {subject} but its subject is not that; skipped",
                    desc.digest()
                );
                continue;
            }
            out.push(Attachment {
                descriptor: referrer_descriptor(&desc, &bytes),
                bytes,
                subject: subject.clone(),
                link: Link::Referrer,
            });
        }
        for suffix in COSIGN_SUFFIXES {
            let tag = cosign_tag(subject, suffix);
            let Some((desc, bytes)) = source.tagged(&tag)? else {
                continue;
            };
            if content::kind_of(desc.media_type()) == Kind::Other {
                tracing::warn!(
                    "{what}: tag {tag} is a {}, not a manifest or index; skipped",
                    desc.media_type()
                );
                continue;
            }
            out.push(Attachment {
                descriptor: referrer_descriptor(&desc, &bytes),
                bytes,
                subject: subject.clone(),
                link: Link::Tag(tag),
            });
        }
        Ok(out)
    }

    /// The manifests of a layout-like source whose `subject` is `subject`.
    fn layout_referrers(
        &mut self,
        subject: &Digest,
    ) -> Result<Vec<(Descriptor, Vec<u8>)>, ImageError> {
        if self.by_subject.is_none() {
            self.by_subject = Some(match self.source.layout_entries()? {
                Some(entries) => manifests_by_subject(self.source, entries),
                None => BTreeMap::new(),
            });
        }
        Ok(self
            .by_subject
            .as_ref()
            .and_then(|map| map.get(subject.as_ref()))
            .cloned()
            .unwrap_or_default())
    }
}

/// Every manifest and index reachable from `entries` that has a `subject`, by its subject.
/// One that cannot be read is left out with a warning: it belongs to another image of the
/// layout, and the image being copied is read (and checked) on its own.
fn manifests_by_subject(source: &dyn ImageSource, entries: Vec<Descriptor>) -> BySubject {
    let mut map = BySubject::new();
    let mut seen = BTreeSet::new();
    let mut pending = entries;
    while let Some(desc) = pending.pop() {
        let kind = content::kind_of(desc.media_type());
        if kind == Kind::Other || !seen.insert(desc.digest().to_string()) {
            continue;
        }
        let bytes = match source.read_blob(&desc) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!("looking for referrers: {e}");
                continue;
            }
        };
        if kind == Kind::Index
            && let Ok(index) = parse_index(&bytes, &desc, &source.describe())
        {
            pending.extend(index.manifests().iter().cloned());
        }
        if let Some(subject) = subject_of(&bytes) {
            let plain = Descriptor::new(
                desc.media_type().clone(),
                desc.size(),
                desc.digest().clone(),
            );
            map.entry(subject).or_default().push((plain, bytes));
        }
    }
    map
}

/// The fallback tag's index after adding `referrers` to what the tag held (`existing`, the
/// bytes of an image index, or `None` when there is no such tag): every entry already there is
/// kept as it is, and the new ones follow. `None` when nothing is new, so the tag is left alone.
pub fn merge_fallback_index(
    existing: Option<&[u8]>,
    referrers: &[Descriptor],
) -> Result<Option<Vec<u8>>, String> {
    let mut index = match existing {
        Some(bytes) => {
            let value: Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("the index it holds is not JSON: {e}"))?;
            if !value.get("manifests").is_some_and(Value::is_array) {
                return Err("what it holds is not an image index".into());
            }
            value
        }
        None => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
    };
    let list = index["manifests"]
        .as_array_mut()
        .expect("checked to be an array");
    let mut present: BTreeSet<String> = list
        .iter()
        .filter_map(|d| d.get("digest").and_then(Value::as_str).map(str::to_string))
        .collect();
    let mut added = false;
    for desc in referrers {
        if present.insert(desc.digest().to_string()) {
            list.push(serde_json::to_value(desc).expect("a descriptor serialises"));
            added = true;
        }
    }
    Ok((added || existing.is_none()).then(|| content::canonical_json(&index)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Read;

    use super::*;

    /// Manifests in memory, with tags.
    #[derive(Default)]
    struct Memory {
        blobs: HashMap<String, Vec<u8>>,
        tags: HashMap<String, Descriptor>,
    }

    impl Memory {
        fn add(&mut self, value: &Value) -> Descriptor {
            let bytes = content::canonical_json(value);
            let media_type = value["mediaType"].as_str().unwrap();
            let desc = Descriptor::new(
                MediaType::from(media_type),
                bytes.len() as u64,
                content::sha256_digest(&bytes),
            );
            self.blobs.insert(desc.digest().to_string(), bytes);
            desc
        }

        /// A referrer of `subject` (told apart by `n`).
        fn referrer_of(&mut self, subject: &Descriptor, n: usize) -> Descriptor {
            let config = json!({"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"});
            self.add(&json!({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/example", "config": config, "layers": [],
                "annotations": {"n": n.to_string()},
                "subject": {"mediaType": subject.media_type().to_string(),
                    "digest": subject.digest().to_string(), "size": subject.size()}
            }))
        }

        /// Lists `referrers` in `subject`'s fallback tag.
        fn list(&mut self, subject: &Descriptor, referrers: &[Descriptor]) {
            let index = self.add(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": referrers}));
            self.tags.insert(fallback_tag(subject.digest()), index);
        }
    }

    impl ImageSource for Memory {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn root(&self) -> Descriptor {
            Descriptor::new(MediaType::ImageManifest, 0, content::sha256_digest(b""))
        }
        fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
            Ok(Box::new(std::io::Cursor::new(
                self.blobs[&desc.digest().to_string()].clone(),
            )))
        }
        fn tagged(&self, tag: &str) -> Result<Option<(Descriptor, Vec<u8>)>, ImageError> {
            Ok(self
                .tags
                .get(tag)
                .map(|d| (d.clone(), self.blobs[&d.digest().to_string()].clone())))
        }
    }

    fn image(memory: &mut Memory, name: &str) -> Descriptor {
        memory.add(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "annotations": {"name": name},
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
            "layers": []}))
    }

    #[test]
    fn attachments_of_attachments_are_followed_down_to_the_bound() {
        let mut memory = Memory::default();
        let root = image(&mut memory, "root");
        let mut chain = vec![root.clone()];
        for n in 0..MAX_DEPTH + 2 {
            let subject = chain.last().unwrap().clone();
            let next = memory.referrer_of(&subject, n);
            memory.list(&subject, std::slice::from_ref(&next));
            chain.push(next);
        }
        let found = discover(&memory, std::slice::from_ref(root.digest())).unwrap();
        let digests: Vec<String> = found
            .attachments
            .iter()
            .map(|a| a.descriptor.digest().to_string())
            .collect();
        let expected: Vec<String> = chain[1..=MAX_DEPTH]
            .iter()
            .map(|d| d.digest().to_string())
            .collect();
        assert_eq!(
            digests, expected,
            "subjects before what is attached to them"
        );
        assert!(
            found
                .note
                .unwrap()
                .contains("levels deep were not followed")
        );
        for (attachment, subject) in found.attachments.iter().zip(&chain) {
            assert_eq!(&attachment.subject, subject.digest());
            assert_eq!(attachment.link, Link::Referrer);
        }
    }

    #[test]
    fn a_listed_manifest_whose_subject_is_another_is_not_carried() {
        let mut memory = Memory::default();
        let root = image(&mut memory, "root");
        let other = image(&mut memory, "other");
        let real = memory.referrer_of(&root, 0);
        let stray = memory.referrer_of(&other, 1);
        // The root's fallback tag also lists a referrer of something else.
        memory.list(&root, &[real.clone(), stray]);
        let found = discover(&memory, std::slice::from_ref(root.digest())).unwrap();
        assert_eq!(found.attachments.len(), 1);
        assert_eq!(found.attachments[0].descriptor.digest(), real.digest());
    }

    #[test]
    fn too_many_attachments_are_refused() {
        let mut memory = Memory::default();
        let root = image(&mut memory, "root");
        let many: Vec<Descriptor> = (0..=MAX_ATTACHMENTS)
            .map(|n| memory.referrer_of(&root, n))
            .collect();
        memory.list(&root, &many);
        let err = discover(&memory, std::slice::from_ref(root.digest()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 1000 attachments"), "{err}");
    }

    fn digest(c: char) -> Digest {
        content::parse_sha256(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn tag_names_follow_the_schemes() {
        let d = digest('a');
        assert_eq!(fallback_tag(&d), format!("sha256-{}", "a".repeat(64)));
        assert_eq!(
            cosign_tag(&d, "sig"),
            format!("sha256-{}.sig", "a".repeat(64))
        );
        assert!(is_attachment_tag(&fallback_tag(&d)));
        assert!(is_attachment_tag(&cosign_tag(&d, "att")));
        assert!(!is_attachment_tag(&cosign_tag(&d, "txt")));
        assert!(!is_attachment_tag("sha256-abc.sig"));
        assert!(!is_attachment_tag("latest"));
        assert!(!is_attachment_tag(&format!("sha256-{}", "A".repeat(64))));
    }

    #[test]
    fn a_referrer_is_described_by_its_artifact_type_else_its_config_type() {
        let sbom = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/spdx+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"annotations":{"org.example":"x"}}"#;
        let desc = Descriptor::new(
            MediaType::ImageManifest,
            sbom.len() as u64,
            content::sha256_digest(sbom),
        );
        let d = referrer_descriptor(&desc, sbom);
        assert_eq!(
            d.artifact_type().as_ref().map(|t| t.to_string()).as_deref(),
            Some("application/spdx+json")
        );
        assert_eq!(d.annotations().as_ref().unwrap()["org.example"], "x");
        let sig = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let d = referrer_descriptor(&desc, sig);
        assert_eq!(
            d.artifact_type().as_ref().map(|t| t.to_string()).as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert!(d.annotations().is_none());
    }

    #[test]
    fn the_fallback_index_keeps_what_it_had_and_adds_only_new_referrers() {
        let one = Descriptor::new(MediaType::ImageManifest, 10, digest('1'));
        let two = Descriptor::new(MediaType::ImageManifest, 20, digest('2'));
        let first = merge_fallback_index(None, std::slice::from_ref(&one))
            .unwrap()
            .unwrap();
        let value: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(value["mediaType"], OCI_INDEX);
        assert_eq!(value["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(
            merge_fallback_index(Some(&first), std::slice::from_ref(&one)).unwrap(),
            None,
            "nothing new: the tag is left alone"
        );
        // Someone else's entry, with a field lathe does not know, is kept as it is.
        let theirs = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":5,"x-other":true}]}"#;
        let merged = merge_fallback_index(Some(theirs), &[one, two])
            .unwrap()
            .unwrap();
        let value: Value = serde_json::from_slice(&merged).unwrap();
        let list = value["manifests"].as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0]["x-other"], true);
        assert!(merge_fallback_index(Some(b"[]"), &[]).is_err());
    }
}
