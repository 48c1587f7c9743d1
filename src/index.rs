//! Image indexes stitched from images that already exist: `lathe index create` makes one index
//! of per-platform images built elsewhere (on native runners, or by other tools), and `lathe
//! index add` adds platforms to an existing index or replaces them.
//!
//! What this module owns:
//! - Reading each `--add` image (any transport): a single image gives one child, an index all
//!   its platform children (or those `--platform` names); each child's platform is taken from
//!   its image config (os, architecture, variant, `os.version`, `os.features`). Index entries
//!   whose config names no platform (attestations) are left out, with a note.
//! - The rules: two different images of one platform are an error naming both references; in
//!   `add` a new image replaces the existing child of its platform (said in a note), and
//!   attestations of a replaced child go with it. An index names manifests of one family: OCI
//!   children give an OCI index, Docker schema 2 children a Docker manifest list.
//! - The index itself: children named by their manifests' exact digests (the manifests are
//!   copied byte for byte, never rewritten), `--annotation`s, and for `add` the existing
//!   index's own fields and annotations kept.
//!
//! The index is made with [`crate::assembly`]: manifests, configs and layers are served from
//! the images they come from, so a destination is sent only what it lacks, and a registry
//! mounts the blobs that another repository of the same registry has. `add` writes the index
//! back where it was read, replaced atomically by the destination's sink.

use std::fmt;
use std::path::PathBuf;

use oci_spec::image::{Descriptor, MediaType};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::assembly::Assembly;
use crate::content::{self, Kind};
use crate::image::{self, ImageError};
use crate::layout;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::ImageRef;

/// The annotation by which an attestation manifest (BuildKit's) names the image it is about.
const ATTESTATION_SUBJECT: &str = "vnd.docker.reference.digest";

/// What `create` or `add` is asked to do.
#[derive(Debug, Clone)]
pub struct IndexRequest {
    /// `create`: where the new index goes. `add`: the index to change, written back in place.
    pub index: ImageRef,
    /// The images (or indexes) whose platforms become children, in order.
    pub add: Vec<ImageRef>,
    /// Only these platforms of the added images; empty: every platform.
    pub platforms: Vec<Platform>,
    /// Annotations of the index itself.
    pub annotations: Vec<(String, String)>,
    /// Where the staged index goes (the system's temporary directory when `None`).
    pub staging_parent: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The user's arguments are at fault (exit code 3).
    #[error("{0}")]
    Usage(String),
    /// An image to add (or the index to change) could not be read.
    #[error("{}", prefixed(reference, error))]
    Input {
        reference: String,
        error: ImageError,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// `error`'s message, prefixed with `reference` unless it names it already.
fn prefixed(reference: &str, error: &ImageError) -> String {
    let text = error.to_string();
    if text.contains(reference) {
        text
    } else {
        format!("{reference}: {text}")
    }
}

impl IndexError {
    pub fn exit_code(&self) -> i32 {
        match self {
            IndexError::Usage(_) => 3,
            IndexError::Input { error: e, .. } | IndexError::Image(e) if e.is_usage() => 3,
            _ => 1,
        }
    }
}

fn usage(text: impl Into<String>) -> IndexError {
    IndexError::Usage(text.into())
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct IndexOutcome {
    /// The index's digest.
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Where it was written.
    pub reference: String,
    /// Its platform children, in order.
    pub children: Vec<IndexChild>,
    /// Children of the existing index that `add` replaced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<ReplacedChild>,
    /// Blobs (and their bytes) the destination did not have and was sent; mounted and existing
    /// blobs are not counted.
    pub blobs_written: usize,
    pub bytes_written: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One platform child of the index.
#[derive(Debug, Clone, Serialize)]
pub struct IndexChild {
    /// `os/arch[/variant]`.
    pub platform: String,
    #[serde(rename = "os.version", skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// The child manifest's digest.
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The reference it was taken from (for `add`, the index itself for children it kept).
    pub from: String,
}

/// A child `add` replaced.
#[derive(Debug, Clone, Serialize)]
pub struct ReplacedChild {
    pub platform: String,
    /// The manifest that was there.
    pub digest: String,
    /// The manifest that replaced it, and where it came from.
    pub replaced_by: String,
    pub from: String,
}

/// A child's platform as an index records it: what lathe's [`Platform`] compares, plus the
/// OS version and features, which tell apart images of one os/arch (Windows releases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildPlatform {
    pub platform: Platform,
    pub os_version: Option<String>,
    /// Sorted.
    pub os_features: Vec<String>,
}

impl ChildPlatform {
    /// The platform an image config (or an index entry's `platform`) declares; `None` when it
    /// names no os or architecture (or `unknown`, as attestation manifests do).
    pub fn from_json(value: &Value) -> Option<ChildPlatform> {
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let os = text("os").filter(|s| *s != "unknown")?;
        let arch = text("architecture").filter(|s| *s != "unknown")?;
        let mut os_features: Vec<String> = value
            .get("os.features")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        os_features.sort();
        os_features.dedup();
        Some(ChildPlatform {
            platform: Platform::new(os, arch, text("variant")),
            os_version: text("os.version").map(str::to_string),
            os_features,
        })
    }

    /// The `platform` of an index entry (arm64 with its `v8` variant spelled out, as
    /// [`Platform::to_oci`] writes it).
    pub fn to_json(&self) -> Value {
        let mut p = Map::new();
        p.insert("architecture".into(), json!(self.platform.arch));
        p.insert("os".into(), json!(self.platform.os));
        if let Some(variant) = self.platform.oci_variant() {
            p.insert("variant".into(), json!(variant));
        }
        if let Some(version) = &self.os_version {
            p.insert("os.version".into(), json!(version));
        }
        if !self.os_features.is_empty() {
            p.insert("os.features".into(), json!(self.os_features));
        }
        Value::Object(p)
    }
}

impl fmt::Display for ChildPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.platform)?;
        if let Some(version) = &self.os_version {
            write!(f, " (os.version {version})")?;
        }
        if !self.os_features.is_empty() {
            write!(f, " (os.features {})", self.os_features.join(","))?;
        }
        Ok(())
    }
}

/// A child to name in the index.
#[derive(Debug, Clone)]
struct Child {
    platform: ChildPlatform,
    /// The manifest (media type, digest and size only).
    manifest: Descriptor,
    /// The annotations of its entry in the index it came from (ref names left out).
    annotations: Option<Map<String, Value>>,
    /// The reference it came from.
    from: String,
}

impl Child {
    fn entry(&self) -> Value {
        let mut entry = json!({
            "mediaType": self.manifest.media_type().to_string(),
            "digest": self.manifest.digest().to_string(),
            "size": self.manifest.size(),
            "platform": self.platform.to_json(),
        });
        if let Some(annotations) = self.annotations.as_ref().filter(|a| !a.is_empty()) {
            entry["annotations"] = Value::Object(annotations.clone());
        }
        entry
    }

    fn report(&self) -> IndexChild {
        IndexChild {
            platform: self.platform.platform.to_string(),
            os_version: self.platform.os_version.clone(),
            os_features: self.platform.os_features.clone(),
            digest: self.manifest.digest().to_string(),
            media_type: self.manifest.media_type().to_string(),
            from: self.from.clone(),
        }
    }

    fn is_docker(&self) -> bool {
        self.manifest.media_type().to_string() == content::DOCKER_MANIFEST
    }
}

/// Makes a new index at `request.index` of the platforms of the `request.add` images.
/// Nothing is written unless every image can be read and no platform is given twice.
pub fn create(request: &IndexRequest, progress: &Progress) -> Result<IndexOutcome, IndexError> {
    if matches!(request.index, ImageRef::DockerArchive { .. }) {
        return Err(usage(format!(
            "{}: a docker-archive holds single images, not an index; write the index to a \
             registry, oci:DIR[:ref] or oci-archive:FILE[:ref]",
            request.index
        )));
    }
    let mut assembly = Assembly::new("the new index", request.staging_parent.as_deref())?;
    let mut notes = Vec::new();
    let children = read_added(&mut assembly, request, &mut notes)?;
    let media_type = index_media_type(&children)?;
    let mut index = json!({
        "schemaVersion": 2,
        "mediaType": media_type.to_string(),
        "manifests": children.iter().map(Child::entry).collect::<Vec<_>>(),
    });
    add_annotations(&mut index, &request.annotations);
    let root = assembly.write_json(&index, media_type)?;
    assembly.set_root_descriptor(root);
    let report = assembly.write_to(&request.index, progress)?;
    Ok(IndexOutcome {
        digest: report.digest,
        media_type: report.media_type,
        reference: request.index.to_string(),
        children: children.iter().map(Child::report).collect(),
        replaced: vec![],
        blobs_written: report.blobs_copied,
        bytes_written: report.bytes_copied,
        notes,
    })
}

/// Adds the platforms of the `request.add` images to the index `request.index`, replacing the
/// child of a platform it has already, and writes it back in place. Nothing is written unless
/// every image can be read and the new ones give no platform twice.
pub fn add(request: &IndexRequest, progress: &Progress) -> Result<IndexOutcome, IndexError> {
    let what = request.index.to_string();
    let input_error = |error| IndexError::Input {
        reference: what.clone(),
        error,
    };
    let source = image::open_source(&request.index).map_err(input_error)?;
    let root = source.root();
    if content::kind_of(root.media_type()) != Kind::Index {
        return Err(usage(format!(
            "{what} is a single image ({} {}), not an index; `lathe index create` makes an \
             index of it and the images to add",
            root.media_type(),
            root.digest()
        )));
    }
    let destination = image::in_place_destination(&request.index, &root)?;
    let mut assembly = Assembly::new("the changed index", request.staging_parent.as_deref())?;
    let existing_input = assembly.add_input(source);
    let bytes = assembly
        .take_manifest(existing_input, &root)
        .map_err(input_error)?;
    let mut index: Value = serde_json::from_slice(&bytes).map_err(|e| {
        input_error(ImageError::Invalid {
            what: what.clone(),
            why: format!("index {}: {e}", root.digest()),
        })
    })?;
    let entries: Vec<Value> = index
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    let mut notes = Vec::new();
    let added = read_added(&mut assembly, request, &mut notes)?;
    let docker_index = root.media_type().to_string() == content::DOCKER_MANIFEST_LIST;
    if let Some(other) = added.iter().find(|c| c.is_docker() != docker_index) {
        return Err(usage(format!(
            "{what} is a {} but {} is a {} manifest ({}); an index names manifests of one \
             kind (convert it first, e.g. with skopeo copy --format)",
            root.media_type(),
            other.from,
            other.manifest.media_type(),
            other.platform
        )));
    }

    let (entries, replaced) = merge_children(entries, &added, &what, &mut notes);
    let children = reported_children(&entries, &added, &what);
    index["manifests"] = Value::Array(entries);
    add_annotations(&mut index, &request.annotations);
    let new_root = assembly.write_json(&index, root.media_type().clone())?;
    assembly.set_root_descriptor(new_root);
    let report = assembly.write_to(&destination, progress)?;
    Ok(IndexOutcome {
        digest: report.digest,
        media_type: report.media_type,
        reference: destination.to_string(),
        children,
        replaced,
        blobs_written: report.blobs_copied,
        bytes_written: report.bytes_copied,
        notes,
    })
}

/// The `entries` of the index `what` with the `added` children merged in: each replaces the
/// entries of its platform (the first in place), or is appended when there is none; the
/// attestations of a replaced child are removed with it. Says what it did in `notes`.
fn merge_children(
    mut entries: Vec<Value>,
    added: &[Child],
    what: &str,
    notes: &mut Vec<String>,
) -> (Vec<Value>, Vec<ReplacedChild>) {
    let mut replaced = Vec::new();
    let mut removed_digests = Vec::new();
    for child in added {
        let same_platform: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.get("platform")
                    .and_then(ChildPlatform::from_json)
                    .as_ref()
                    == Some(&child.platform)
            })
            .map(|(i, _)| i)
            .collect();
        let Some(&first) = same_platform.first() else {
            entries.push(child.entry());
            continue;
        };
        let old_digest = entry_digest(&entries[first]);
        if same_platform.len() == 1 && old_digest == child.manifest.digest().to_string() {
            notes.push(format!(
                "{what} already has {} from {} ({old_digest}); left as it is",
                child.platform, child.from
            ));
            continue;
        }
        for &i in &same_platform {
            let old_digest = entry_digest(&entries[i]);
            notes.push(format!(
                "replaced {} {old_digest} with {} from {}",
                child.platform,
                child.manifest.digest(),
                child.from
            ));
            replaced.push(ReplacedChild {
                platform: child.platform.platform.to_string(),
                digest: old_digest.clone(),
                replaced_by: child.manifest.digest().to_string(),
                from: child.from.clone(),
            });
            removed_digests.push(old_digest);
        }
        entries[first] = child.entry();
        for &i in same_platform[1..].iter().rev() {
            entries.remove(i);
        }
    }
    entries.retain(|entry| {
        let subject = entry
            .pointer(&format!("/annotations/{ATTESTATION_SUBJECT}"))
            .and_then(Value::as_str);
        let stale = subject.is_some_and(|s| removed_digests.iter().any(|d| d == s));
        if stale {
            notes.push(format!(
                "removed {} {}, which is about a replaced child ({})",
                entry
                    .pointer("/annotations/vnd.docker.reference.type")
                    .and_then(Value::as_str)
                    .unwrap_or("the entry"),
                entry_digest(entry),
                subject.unwrap_or_default()
            ));
        }
        !stale
    });
    (entries, replaced)
}

fn entry_digest(entry: &Value) -> String {
    entry
        .get("digest")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The platform children of the changed index's `entries`, each from the added image that
/// gave it, or from the index `what` itself.
fn reported_children(entries: &[Value], added: &[Child], what: &str) -> Vec<IndexChild> {
    entries
        .iter()
        .filter_map(|entry| {
            let platform = ChildPlatform::from_json(entry.get("platform")?)?;
            let digest = entry_digest(entry);
            let from = added
                .iter()
                .find(|c| c.manifest.digest().to_string() == digest && c.platform == platform)
                .map_or_else(|| what.to_string(), |c| c.from.clone());
            Some(IndexChild {
                platform: platform.platform.to_string(),
                os_version: platform.os_version,
                os_features: platform.os_features,
                digest,
                media_type: entry
                    .get("mediaType")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                from,
            })
        })
        .collect()
}

fn add_annotations(index: &mut Value, annotations: &[(String, String)]) {
    if annotations.is_empty() {
        return;
    }
    let map = index
        .as_object_mut()
        .expect("an index is a JSON object")
        .entry("annotations")
        .or_insert_with(|| json!({}));
    if !map.is_object() {
        *map = json!({});
    }
    for (key, value) in annotations {
        map[key] = json!(value);
    }
}

/// OCI children give an OCI index, Docker schema 2 children a Docker manifest list; a mix is
/// refused, naming an image of each kind.
fn index_media_type(children: &[Child]) -> Result<MediaType, IndexError> {
    let docker = children.iter().find(|c| c.is_docker());
    let oci = children.iter().find(|c| !c.is_docker());
    match (docker, oci) {
        (Some(d), Some(o)) => Err(usage(format!(
            "{} is a {} manifest and {} a {} manifest; an index names manifests of one kind \
             (convert one first, e.g. with skopeo copy --format)",
            d.from,
            d.manifest.media_type(),
            o.from,
            o.manifest.media_type()
        ))),
        (Some(_), None) => Ok(MediaType::Other(content::DOCKER_MANIFEST_LIST.to_string())),
        _ => Ok(MediaType::ImageIndex),
    }
}

/// The children the `--add` images give, in order: each read (and its blobs taken into
/// `assembly`), filtered by `--platform`, and checked for a platform given twice.
fn read_added(
    assembly: &mut Assembly,
    request: &IndexRequest,
    notes: &mut Vec<String>,
) -> Result<Vec<Child>, IndexError> {
    if request.add.is_empty() {
        return Err(usage("give at least one image to add (--add REF)"));
    }
    let mut children: Vec<Child> = Vec::new();
    for reference in &request.add {
        let what = reference.to_string();
        let input_error = |error| IndexError::Input {
            reference: what.clone(),
            error,
        };
        let source = image::open_source(reference).map_err(input_error)?;
        let input = assembly.add_input(source);
        let found = read_image(assembly, input, &what, notes).map_err(|e| match e {
            IndexError::Image(error) => input_error(error),
            e => e,
        })?;
        let mut kept = Vec::new();
        for child in found.iter() {
            if request.platforms.is_empty() || request.platforms.contains(&child.platform.platform)
            {
                kept.push(child.clone());
            }
        }
        if kept.is_empty() {
            let has: Vec<String> = found.iter().map(|c| c.platform.to_string()).collect();
            let asked: Vec<String> = request.platforms.iter().map(|p| p.to_string()).collect();
            return Err(usage(format!(
                "{what} has none of the platforms asked for ({}); it has {}",
                asked.join(", "),
                if has.is_empty() {
                    "no platform image".to_string()
                } else {
                    has.join(", ")
                }
            )));
        }
        for child in kept {
            match children.iter().find(|c| c.platform == child.platform) {
                Some(c) if c.manifest.digest() == child.manifest.digest() => notes.push(format!(
                    "{} {} is given by both {} and {}; named once",
                    child.platform,
                    child.manifest.digest(),
                    c.from,
                    child.from
                )),
                Some(c) => {
                    return Err(usage(format!(
                        "{} is given twice: by {} ({}) and by {} ({}); an index has one image \
                         per platform",
                        child.platform,
                        c.from,
                        c.manifest.digest(),
                        child.from,
                        child.manifest.digest()
                    )));
                }
                None => children.push(child),
            }
        }
    }
    for wanted in &request.platforms {
        if !children.iter().any(|c| &c.platform.platform == wanted) {
            let has: Vec<String> = children.iter().map(|c| c.platform.to_string()).collect();
            return Err(usage(format!(
                "no image to add is {wanted} (they are {})",
                has.join(", ")
            )));
        }
    }
    Ok(children)
}

/// The platform images of input `input` (`what` in messages): the image itself, or each
/// platform child of its index. Their manifests and blobs are taken into `assembly`.
fn read_image(
    assembly: &mut Assembly,
    input: usize,
    what: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Child>, IndexError> {
    let root = assembly.input(input).root();
    content::check_descriptor(&root).map_err(|why| ImageError::Invalid {
        what: what.to_string(),
        why,
    })?;
    match content::kind_of(root.media_type()) {
        Kind::Manifest => {
            let platform = read_platform(assembly, input, &root, what)?.ok_or_else(|| {
                ImageError::Invalid {
                    what: what.to_string(),
                    why: format!(
                        "the config of image {} names no os and architecture, which an \
                         index needs",
                        root.digest()
                    ),
                }
            })?;
            Ok(vec![Child {
                platform,
                manifest: bare(&root),
                annotations: None,
                from: what.to_string(),
            }])
        }
        Kind::Index => {
            let bytes = assembly.input(input).read_blob(&root)?;
            image::parse_index(&bytes, &root, what)?;
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
                what: what.to_string(),
                why: format!("index {}: {e}", root.digest()),
            })?;
            let entries = value
                .get("manifests")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut children = Vec::new();
            for entry in &entries {
                let desc: Descriptor =
                    serde_json::from_value(entry.clone()).map_err(|e| ImageError::Invalid {
                        what: what.to_string(),
                        why: format!("index {}: {e}", root.digest()),
                    })?;
                if content::kind_of(desc.media_type()) != Kind::Manifest {
                    return Err(ImageError::Invalid {
                        what: what.to_string(),
                        why: format!(
                            "index {} names {} ({}), which is not an image manifest; lathe \
                             does not nest indexes",
                            root.digest(),
                            desc.digest(),
                            desc.media_type()
                        ),
                    }
                    .into());
                }
                let Some(platform) = read_platform(assembly, input, &desc, what)? else {
                    notes.push(format!(
                        "{what}: left out {} {}, whose config names no platform",
                        entry
                            .pointer("/annotations/vnd.docker.reference.type")
                            .and_then(Value::as_str)
                            .unwrap_or("index entry"),
                        desc.digest()
                    ));
                    continue;
                };
                if let Some(said) = entry.get("platform").and_then(ChildPlatform::from_json)
                    && said != platform
                {
                    notes.push(format!(
                        "{what}: the index says {} is {said}, its config {platform}; the \
                         config's platform is used",
                        desc.digest()
                    ));
                }
                let mut annotations = desc.annotations().clone().map(|a| {
                    a.into_iter()
                        .filter(|(k, _)| k != layout::REF_NAME)
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect::<Map<String, Value>>()
                });
                if annotations.as_ref().is_some_and(Map::is_empty) {
                    annotations = None;
                }
                children.push(Child {
                    platform,
                    manifest: bare(&desc),
                    annotations,
                    from: what.to_string(),
                });
            }
            Ok(children)
        }
        Kind::Other => Err(ImageError::Invalid {
            what: what.to_string(),
            why: format!(
                "{} is a {}, not an image manifest or index",
                root.digest(),
                root.media_type()
            ),
        }
        .into()),
    }
}

/// Takes the image manifest `desc` of input `input` into `assembly` and reads the platform its
/// config declares (`None` when it declares none).
fn read_platform(
    assembly: &mut Assembly,
    input: usize,
    desc: &Descriptor,
    what: &str,
) -> Result<Option<ChildPlatform>, IndexError> {
    let bytes = assembly.take_manifest(input, desc)?;
    let manifest = image::parse_manifest(&bytes, desc, what)?;
    let config = assembly.input(input).read_blob(manifest.config())?;
    let config: Value = serde_json::from_slice(&config).map_err(|e| ImageError::Invalid {
        what: what.to_string(),
        why: format!("config {}: {e}", manifest.config().digest()),
    })?;
    Ok(ChildPlatform::from_json(&config))
}

/// `desc` with only its media type, digest and size.
fn bare(desc: &Descriptor) -> Descriptor {
    Descriptor::new(
        desc.media_type().clone(),
        desc.size(),
        desc.digest().clone(),
    )
}

/// A summary for people.
pub fn describe(outcome: &IndexOutcome) -> String {
    let mut text = String::new();
    for child in &outcome.children {
        text += &format!("{}  {}  {}\n", child.platform, child.digest, child.from);
    }
    text += &format!(
        "Wrote the index {} to {} ({} children; {} blobs, {} bytes sent)\n",
        outcome.digest,
        outcome.reference,
        outcome.children.len(),
        outcome.blobs_written,
        outcome.bytes_written
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_compare_with_os_version_and_features() {
        let amd64 = ChildPlatform::from_json(&json!({"os": "linux", "architecture": "amd64"}));
        let arm64 = ChildPlatform::from_json(
            &json!({"os": "linux", "architecture": "arm64", "variant": "v8"}),
        )
        .unwrap();
        assert_eq!(
            ChildPlatform::from_json(&json!({"os": "linux", "architecture": "aarch64"})).unwrap(),
            arm64
        );
        assert_eq!(
            arm64.to_json(),
            json!({"os": "linux", "architecture": "arm64", "variant": "v8"})
        );
        assert_eq!(
            amd64.unwrap().to_json(),
            json!({"os": "linux", "architecture": "amd64"})
        );
        let ltsc2019 = ChildPlatform::from_json(&json!({
            "os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1",
            "os.features": ["win32k"]
        }))
        .unwrap();
        let ltsc2022 = ChildPlatform::from_json(&json!({
            "os": "windows", "architecture": "amd64", "os.version": "10.0.20348.1"
        }))
        .unwrap();
        assert_ne!(ltsc2019, ltsc2022);
        assert_eq!(
            ltsc2019.to_json(),
            json!({"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1",
                   "os.features": ["win32k"]})
        );
        assert_eq!(
            ltsc2019.to_string(),
            "windows/amd64 (os.version 10.0.17763.1) (os.features win32k)"
        );
        for none in [
            json!({"os": "unknown", "architecture": "unknown"}),
            json!({"architecture": "amd64"}),
            json!({"os": "linux", "architecture": ""}),
        ] {
            assert!(ChildPlatform::from_json(&none).is_none(), "{none}");
        }
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn entry(c: char, platform: Value) -> Value {
        json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "digest": digest(c), "size": 10, "platform": platform})
    }

    fn attestation(c: char, about: char) -> Value {
        let mut e = entry(c, json!({"os": "unknown", "architecture": "unknown"}));
        e["annotations"] = json!({
            "vnd.docker.reference.type": "attestation-manifest",
            ATTESTATION_SUBJECT: digest(about),
        });
        e
    }

    fn child(c: char, platform: Value, from: &str) -> Child {
        Child {
            platform: ChildPlatform::from_json(&platform).unwrap(),
            manifest: Descriptor::new(
                MediaType::ImageManifest,
                10,
                digest(c).parse::<oci_spec::image::Digest>().unwrap(),
            ),
            annotations: None,
            from: from.into(),
        }
    }

    #[test]
    fn add_replaces_in_place_appends_and_drops_stale_attestations() {
        let amd64 = json!({"os": "linux", "architecture": "amd64"});
        let arm64 = json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let v7 = json!({"os": "linux", "architecture": "arm", "variant": "v7"});
        let entries = vec![
            entry('a', amd64.clone()),
            attestation('1', 'a'),
            entry('b', arm64.clone()),
            attestation('2', 'b'),
        ];
        let added = [
            child(
                'c',
                json!({"os": "linux", "architecture": "arm64"}),
                "new-arm64",
            ),
            child('d', v7.clone(), "new-v7"),
            child('a', amd64.clone(), "same-amd64"),
        ];
        let mut notes = Vec::new();
        let (merged, replaced) = merge_children(entries, &added, "idx", &mut notes);
        let digests: Vec<String> = merged.iter().map(entry_digest).collect();
        assert_eq!(
            digests,
            [digest('a'), digest('1'), digest('c'), digest('d')]
        );
        assert_eq!(merged[2]["platform"], arm64);
        assert_eq!(merged[3]["platform"], v7);
        assert_eq!(replaced.len(), 1);
        assert_eq!(replaced[0].digest, digest('b'));
        assert_eq!(replaced[0].replaced_by, digest('c'));
        assert_eq!(replaced[0].from, "new-arm64");
        let notes = notes.join("\n");
        assert!(
            notes.contains(&format!("replaced linux/arm64 {}", digest('b'))),
            "{notes}"
        );
        assert!(
            notes.contains(&format!("removed attestation-manifest {}", digest('2'))),
            "{notes}"
        );
        assert!(
            notes.contains("idx already has linux/amd64 from same-amd64"),
            "{notes}"
        );

        let reported = reported_children(&merged, &added, "idx");
        let froms: Vec<&str> = reported.iter().map(|c| c.from.as_str()).collect();
        // A child given again is reported as given; attestations are not children.
        assert_eq!(froms, ["same-amd64", "new-arm64", "new-v7"]);
    }

    #[test]
    fn annotations_are_added_to_the_index() {
        let mut index = json!({"schemaVersion": 2, "annotations": {"a": "1"}});
        add_annotations(
            &mut index,
            &[("b".into(), "2".into()), ("a".into(), "3".into())],
        );
        assert_eq!(index["annotations"], json!({"a": "3", "b": "2"}));
        let mut bare = json!({"schemaVersion": 2});
        add_annotations(&mut bare, &[]);
        assert!(bare.get("annotations").is_none());
    }
}
