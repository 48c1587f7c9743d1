//! Rebase: an app image moved onto a new run image without rebuilding it, as the reference
//! lifecycle's rebaser does (cnb-spec-digest §2.10), for a single image or a whole index.
//!
//! What this module owns:
//! - The checks before anything is written. Platform API ≥ 0.12 (the app config's
//!   `CNB_PLATFORM_API`): `io.buildpacks.rebasable = "false"` and a new run image whose target
//!   does not satisfy the app's (§2.6: os and arch equal, variant and distro equal or either
//!   empty) are refused unless `force`, and so is a new run image whose name is not among the
//!   run images the app's label names. Older or absent Platform API: the stack id must be the
//!   same and the new run image must have every mixin of the app.
//! - The new image: every layer up to and including `runImage.topLayer` replaced by the new run
//!   image's layers; the app's config kept (Env, Entrypoint, WorkingDir, User, labels, the app
//!   layers' history, `created`) with `os`, `architecture`, `os.version` and `variant` and the
//!   base layers' history taken from the new run image (history times set to the app's
//!   `created`, as export sets them, so a rebase gives the config a build on the new run image
//!   would), `io.buildpacks.base.*` labels (and `io.buildpacks.stack.*` before 0.12) replaced by
//!   the new run image's, and `runImage.topLayer` / `runImage.reference` (plus, when forced
//!   onto another run image, `runImage.image` / `mirrors` and `stack`) updated in the lifecycle
//!   label.
//! - Indexes: each platform child rebased onto the new run image's child for that platform
//!   (a platform the new run image lacks is an error naming it), in a new index that keeps the
//!   old one's annotations and each child's platform and annotations.
//! - Where the new run image comes from (`--run-image`, else the label's run image and mirrors,
//!   one on the app's registry first) and where the result goes (`--output`, else the image's
//!   own reference, replaced atomically by the destination's sink).
//!
//! The image is assembled with [`crate::assembly`], so no layer is copied into lathe: the app's
//! layers are served from the app image and the run image's from the run image, and a registry
//! destination HEAD-checks or cross-repository-mounts them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_spec::image::{Descriptor, MediaType};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::assembly::Assembly;
use crate::build::recorded_name;
use crate::content::{self, Kind};
use crate::export::{
    LIFECYCLE_METADATA_LABEL, LifecycleMetadata, StackMetadata, StackRunImage, strip_tag_and_digest,
};
use crate::image::{self, ImageError, ImageSource, PlatformImage};
use crate::lifecycle::ApiVersion;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::{ImageRef, RegistryRef};

/// The lifecycle's exit code for a failed rebase.
pub const EXIT_REBASE: i32 = 72;

pub const REBASABLE_LABEL: &str = "io.buildpacks.rebasable";
pub const STACK_ID_LABEL: &str = "io.buildpacks.stack.id";
pub const MIXINS_LABEL: &str = "io.buildpacks.stack.mixins";
pub const DISTRO_NAME_LABEL: &str = "io.buildpacks.base.distro.name";
pub const DISTRO_VERSION_LABEL: &str = "io.buildpacks.base.distro.version";
const BASE_LABEL_PREFIX: &str = "io.buildpacks.base.";
const STACK_LABEL_PREFIX: &str = "io.buildpacks.stack.";
/// The first Platform API without stacks (targets, `io.buildpacks.rebasable`, `--force`).
const TARGETS_API: ApiVersion = ApiVersion::new(0, 12);

/// What to rebase, onto what, and where to write it.
#[derive(Debug, Clone)]
pub struct RebaseRequest {
    /// The app image or index (any transport).
    pub image: ImageRef,
    /// The new run image (an image or an index); `None`: the one the app's label names.
    pub run_image: Option<ImageRef>,
    /// Where the rebased image goes; `None`: replace `image` itself.
    pub output: Option<ImageRef>,
    /// Rebase despite `io.buildpacks.rebasable = "false"`, a target mismatch or a run image the
    /// label does not name (each then a warning).
    pub force: bool,
    /// Where the staged config and manifests go (the system's temporary directory when
    /// `None`).
    pub staging_parent: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// The user's arguments are at fault (exit code 3).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A check refused the rebase; `what` names the image (and platform) at fault.
    #[error("{what}: {why}")]
    Refused { what: String, why: String },
    /// The app image or the run image is not what a rebase needs.
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

impl RebaseError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RebaseError::Usage(_) => 3,
            RebaseError::Image(e) if e.is_usage() => 3,
            _ => EXIT_REBASE,
        }
    }
}

fn refused(what: &str, why: impl Into<String>) -> RebaseError {
    RebaseError::Refused {
        what: what.to_string(),
        why: why.into(),
    }
}

fn invalid(what: &str, why: impl Into<String>) -> RebaseError {
    RebaseError::Invalid {
        what: what.to_string(),
        why: why.into(),
    }
}

/// What a rebase did.
#[derive(Debug, Clone, Serialize)]
pub struct RebaseOutcome {
    /// The rebased image's (or index's) digest.
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Where it was written.
    pub references: Vec<String>,
    /// The new run image, as given or as resolved from the label.
    pub run_image: String,
    pub platforms: Vec<RebasedPlatform>,
    /// Blobs (and their bytes) the destination did not have and was sent; mounted and existing
    /// blobs are not counted.
    pub blobs_written: usize,
    pub bytes_written: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One rebased image.
#[derive(Debug, Clone, Serialize)]
pub struct RebasedPlatform {
    pub platform: String,
    /// The rebased manifest's digest.
    pub digest: String,
    /// The manifest it replaces.
    pub previous_digest: String,
    /// `runImage.reference` before and after.
    pub old_run_image: String,
    pub new_run_image: String,
    /// `runImage.topLayer` before and after.
    pub old_top_layer: String,
    pub new_top_layer: String,
    /// Layers of the old run image removed, of the new one added, of the app kept.
    pub old_base_layers: usize,
    pub new_base_layers: usize,
    pub app_layers: usize,
}

/// One image of the app (the image itself, or one platform child of its index).
struct AppChild {
    /// Its descriptor in the index (the root itself for a single image).
    desc: Descriptor,
    image: PlatformImage,
    label: LifecycleMetadata,
    /// The image and platform, for messages.
    what: String,
}

/// Rebases `request.image` onto the new run image and writes it; nothing is written unless
/// every image rebases.
pub fn rebase(request: &RebaseRequest, progress: &Progress) -> Result<RebaseOutcome, RebaseError> {
    if let (None, ImageRef::Registry(r)) = (&request.output, &request.image)
        && r.tag.is_none()
    {
        return Err(RebaseError::Usage(format!(
            "{}: a digest names one image for good, so the rebased image can't replace it; \
             give --output",
            request.image
        )));
    }
    let app_source = image::open_source(&request.image)?;
    let destination = match &request.output {
        Some(output) => output.clone(),
        None => image::in_place_destination(&request.image, &app_source.root()).map_err(
            |e| match e {
                ImageError::NotReplaceable { reference, why } => {
                    RebaseError::Usage(format!("{reference}: {why}; give --output"))
                }
                e => e.into(),
            },
        )?,
    };
    let (index, children, mut notes) = read_app(app_source.as_ref())?;

    let (run_ref, run_source) = match &request.run_image {
        Some(reference) => (reference.clone(), image::open_source(reference)?),
        None => {
            let (reference, source) = resolve_run_image(&children, &request.image)?;
            notes.push(format!(
                "the new run image is {reference}, which the app's label names"
            ));
            (reference, source)
        }
    };
    let run_name = recorded_name(&run_ref);
    let bases = pick_bases(run_source.as_ref(), &children, index.is_some())?;

    let mut assembly = Assembly::new("the rebased image", request.staging_parent.as_deref())?;
    let app_input = assembly.add_input(app_source);
    let run_input = assembly.add_input(run_source);
    let mut warnings = Vec::new();
    let mut platforms = Vec::new();
    let mut rebased_children: Vec<(Descriptor, Descriptor)> = Vec::new();
    for (child, base) in children.iter().zip(&bases) {
        let rebased = rebase_image(child, base, &run_name, request.force, &mut warnings)?;
        for layer in &child.image.layers[child.image.layers.len() - rebased.report.app_layers..] {
            assembly.take_blob(app_input, layer);
        }
        for layer in &base.layers {
            assembly.take_blob(run_input, layer);
        }
        let manifest = assembly.write_image(&rebased.config, &rebased.layers)?;
        let mut report = rebased.report;
        report.digest = manifest.digest().to_string();
        platforms.push(report);
        rebased_children.push((child.desc.clone(), manifest));
    }
    for warning in &warnings {
        tracing::warn!("{warning}");
    }

    let root = match &index {
        None => rebased_children[0].1.clone(),
        Some(index_value) => {
            let value = rebased_index(index_value, &rebased_children);
            assembly.write_json(&value, MediaType::ImageIndex)?
        }
    };
    assembly.set_root_descriptor(root.clone());
    let report = assembly.write_to(&destination, progress)?;
    if let Some(note) = report.note {
        notes.push(note);
    }
    Ok(RebaseOutcome {
        digest: report.digest,
        media_type: report.media_type,
        references: vec![destination.to_string()],
        run_image: run_ref.to_string(),
        platforms,
        blobs_written: report.blobs_copied,
        bytes_written: report.bytes_copied,
        warnings,
        notes,
    })
}

/// A one-paragraph summary for people.
pub fn describe(outcome: &RebaseOutcome) -> String {
    let mut text = String::new();
    for p in &outcome.platforms {
        text += &format!(
            "{}: {} -> {} ({} run image layers replaced by {}, {} app layers kept)\n",
            p.platform,
            p.old_run_image,
            p.new_run_image,
            p.old_base_layers,
            p.new_base_layers,
            p.app_layers
        );
    }
    text += &format!(
        "Rebased onto {}: {} written to {} ({} blobs, {} bytes sent)\n",
        outcome.run_image,
        outcome.digest,
        outcome.references.join(", "),
        outcome.blobs_written,
        outcome.bytes_written
    );
    text
}

// ------------------------------------------------------------------------ reading the app

/// The app's index, when it is one.
type AppIndex = Option<Value>;

/// The app's images: the root itself, or every platform child of its index. Index entries
/// without a platform (attestations of the old images) are left out, with a note.
fn read_app(
    source: &dyn ImageSource,
) -> Result<(AppIndex, Vec<AppChild>, Vec<String>), RebaseError> {
    let root = source.root();
    let what = source.describe();
    content::check_descriptor(&root).map_err(|why| invalid(&what, why))?;
    let mut notes = Vec::new();
    match content::kind_of(root.media_type()) {
        Kind::Manifest => {
            let image = image::read_manifest_and_config(source, root.clone(), &Platform::host())?;
            let label = lifecycle_label(&image.config, &what)?;
            Ok((
                None,
                vec![AppChild {
                    desc: root,
                    image,
                    label,
                    what,
                }],
                notes,
            ))
        }
        Kind::Index => {
            let bytes = source.read_blob(&root)?;
            let index = image::parse_index(&bytes, &root, &what)?;
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|e| invalid(&what, e.to_string()))?;
            let platform_children = image::platform_children(&index);
            let mut children = Vec::new();
            for entry in index.manifests() {
                let Some((platform, desc)) = platform_children
                    .iter()
                    .find(|(_, d)| d.digest() == entry.digest())
                else {
                    notes.push(format!(
                        "{what}: left out index entry {} ({}), which names no platform",
                        entry.digest(),
                        entry.media_type()
                    ));
                    continue;
                };
                let child_what = format!("{what} ({platform})");
                if content::kind_of(desc.media_type()) != Kind::Manifest {
                    return Err(invalid(
                        &child_what,
                        format!(
                            "{} is a {}, not an image manifest",
                            desc.digest(),
                            desc.media_type()
                        ),
                    ));
                }
                let image = image::read_manifest_and_config(source, desc.clone(), platform)?;
                let label = lifecycle_label(&image.config, &child_what)?;
                children.push(AppChild {
                    desc: desc.clone(),
                    image,
                    label,
                    what: child_what,
                });
            }
            if children.is_empty() {
                return Err(invalid(&what, "the index has no platform images to rebase"));
            }
            Ok((Some(value), children, notes))
        }
        Kind::Other => Err(invalid(
            &what,
            format!(
                "{} is a {}, not an image manifest or index",
                root.digest(),
                root.media_type()
            ),
        )),
    }
}

fn labels_of(config: &Value) -> Map<String, Value> {
    config
        .pointer("/config/Labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn label_text<'a>(labels: &'a Map<String, Value>, key: &str) -> &'a str {
    labels.get(key).and_then(Value::as_str).unwrap_or("")
}

fn lifecycle_label(config: &Value, what: &str) -> Result<LifecycleMetadata, RebaseError> {
    let labels = labels_of(config);
    let text = labels
        .get(LIFECYCLE_METADATA_LABEL)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                what,
                format!(
                    "it has no {LIFECYCLE_METADATA_LABEL} label, so it is not a Buildpacks app \
                     image"
                ),
            )
        })?;
    serde_json::from_str(text)
        .map_err(|e| invalid(what, format!("its {LIFECYCLE_METADATA_LABEL} label: {e}")))
}

/// `CNB_PLATFORM_API` of the app config's Env, if set.
fn platform_api(config: &Value, what: &str) -> Result<Option<ApiVersion>, RebaseError> {
    let value = config
        .pointer("/config/Env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|e| e.strip_prefix("CNB_PLATFORM_API="))
        .next_back();
    match value {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<ApiVersion>()
            .map(Some)
            .map_err(|why| invalid(what, format!("CNB_PLATFORM_API in its Env: {why}"))),
    }
}

// ----------------------------------------------------------------------- the new run image

/// The run image the app's label names: `runImage.image` and its mirrors (else
/// `stack.runImage`), one on the app's registry first, the first that can be read.
fn resolve_run_image(
    children: &[AppChild],
    app: &ImageRef,
) -> Result<(ImageRef, Box<dyn ImageSource>), RebaseError> {
    let names = |label: &LifecycleMetadata| -> Vec<String> {
        let (image, mirrors) = if !label.run_image.image.is_empty() {
            (&label.run_image.image, &label.run_image.mirrors)
        } else if let Some(stack) = &label.stack {
            (&stack.run_image.image, &stack.run_image.mirrors)
        } else {
            return Vec::new();
        };
        std::iter::once(image)
            .chain(mirrors)
            .filter(|n| !n.is_empty())
            .cloned()
            .collect()
    };
    let first = &children[0];
    let mut candidates = names(&first.label);
    if let Some(other) = children.iter().find(|c| names(&c.label) != candidates) {
        return Err(RebaseError::Usage(format!(
            "{} and {} name different run images in their labels; give --run-image",
            first.what, other.what
        )));
    }
    if candidates.is_empty() {
        return Err(RebaseError::Usage(format!(
            "{}: its {LIFECYCLE_METADATA_LABEL} label names no run image (runImage.image, \
             stack.runImage.image); give --run-image",
            first.what
        )));
    }
    if let ImageRef::Registry(app) = app {
        let on_app_registry =
            |name: &String| RegistryRef::parse(name).is_ok_and(|r| r.registry == app.registry);
        candidates.sort_by_key(|name| !on_app_registry(name));
    }
    let mut failures = Vec::new();
    for name in &candidates {
        let reference = match name.parse::<ImageRef>() {
            Ok(r) => r,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        match image::open_source(&reference) {
            Ok(source) => return Ok((reference, source)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(refused(
        &first.what,
        format!(
            "none of the run images its label names can be read ({}); give --run-image",
            failures.join("; ")
        ),
    ))
}

/// Whether `base` can stand for `app`: os and arch equal, variants equal or either empty.
fn same_platform(base: &Platform, app: &Platform) -> bool {
    base.os == app.os
        && base.arch == app.arch
        && (base.variant.is_none() || app.variant.is_none() || base.variant == app.variant)
}

/// The new run image for each app image: the run image itself, or its index's child for the
/// app image's platform. A platform the run image lacks is an error naming it; a single run
/// image for a single app image is left to the target check (which `--force` overrides).
fn pick_bases(
    source: &dyn ImageSource,
    children: &[AppChild],
    app_is_index: bool,
) -> Result<Vec<PlatformImage>, RebaseError> {
    let root = source.root();
    let what = source.describe();
    content::check_descriptor(&root).map_err(|why| invalid(&what, why))?;
    match content::kind_of(root.media_type()) {
        Kind::Manifest => {
            let wanted = &children[0].image.platform;
            let base = image::read_manifest_and_config(source, root.clone(), wanted)?;
            let mut bases = Vec::new();
            for child in children {
                if app_is_index && !same_platform(&base.platform, &child.image.platform) {
                    return Err(refused(
                        &what,
                        format!(
                            "it is a single {} image, with nothing for {}",
                            base.platform, child.what
                        ),
                    ));
                }
                bases.push(PlatformImage {
                    manifest: base.manifest.clone(),
                    layers: base.layers.clone(),
                    config: base.config.clone(),
                    platform: base.platform.clone(),
                });
            }
            Ok(bases)
        }
        Kind::Index => {
            let bytes = source.read_blob(&root)?;
            let index = image::parse_index(&bytes, &root, &what)?;
            let available = image::platform_children(&index);
            let mut read: BTreeMap<String, PlatformImage> = BTreeMap::new();
            let mut bases = Vec::new();
            for child in children {
                let wanted = &child.image.platform;
                let found = available
                    .iter()
                    .find(|(p, _)| p == wanted)
                    .or_else(|| available.iter().find(|(p, _)| same_platform(p, wanted)))
                    .ok_or_else(|| {
                        refused(
                            &what,
                            format!(
                                "the run image has no {wanted} image for {} (it has: {})",
                                child.what,
                                available
                                    .iter()
                                    .map(|(p, _)| p.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                let (platform, desc) = found;
                let key = desc.digest().to_string();
                if !read.contains_key(&key) {
                    let image = image::read_manifest_and_config(source, desc.clone(), platform)?;
                    read.insert(key.clone(), image);
                }
                let base = &read[&key];
                bases.push(PlatformImage {
                    manifest: base.manifest.clone(),
                    layers: base.layers.clone(),
                    config: base.config.clone(),
                    platform: base.platform.clone(),
                });
            }
            Ok(bases)
        }
        Kind::Other => Err(invalid(
            &what,
            format!(
                "{} is a {}, not an image manifest or index",
                root.digest(),
                root.media_type()
            ),
        )),
    }
}

// ------------------------------------------------------------------------------ one image

struct Rebased {
    config: Value,
    layers: Vec<Descriptor>,
    report: RebasedPlatform,
}

/// A target as the lifecycle compares them at rebase (§2.6).
struct Target {
    platform: Platform,
    distro: Option<(String, String)>,
}

impl Target {
    fn of(image: &PlatformImage) -> Target {
        let labels = labels_of(&image.config);
        let name = label_text(&labels, DISTRO_NAME_LABEL);
        let version = label_text(&labels, DISTRO_VERSION_LABEL);
        Target {
            platform: image.platform.clone(),
            distro: (!name.is_empty() || !version.is_empty())
                .then(|| (name.to_string(), version.to_string())),
        }
    }

    /// The lifecycle's `TargetSatisfiedForRebase`: os and arch exactly equal, variant equal or
    /// either empty; when the new base declares a distro, the app must have one whose name and
    /// version each match (equal or either empty).
    fn satisfies(&self, app: &Target) -> bool {
        let matches = |a: &str, b: &str| a.is_empty() || b.is_empty() || a == b;
        if !same_platform(&self.platform, &app.platform) {
            return false;
        }
        match (&self.distro, &app.distro) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((name, version)), Some((app_name, app_version))) => {
                matches(name, app_name) && matches(version, app_version)
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.platform)?;
        match &self.distro {
            Some((name, version)) => write!(f, " ({name} {version})"),
            None => write!(f, " (no distro)"),
        }
    }
}

/// A name's repository (`registry/repo` without tag or digest), for comparing run image names.
fn repository_of(name: &str) -> String {
    match RegistryRef::parse(name) {
        Ok(r) => format!("{}/{}", r.registry, r.repository),
        Err(_) => strip_tag_and_digest(name),
    }
}

/// Mixins without their `build:`/`run:` stage prefix.
fn mixins(labels: &Map<String, Value>, what: &str) -> Result<Vec<String>, RebaseError> {
    let text = label_text(labels, MIXINS_LABEL);
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = serde_json::from_str(text)
        .map_err(|e| invalid(what, format!("its {MIXINS_LABEL} label: {e}")))?;
    Ok(list
        .into_iter()
        .map(|m| {
            m.strip_prefix("build:")
                .or_else(|| m.strip_prefix("run:"))
                .map(str::to_string)
                .unwrap_or(m)
        })
        .collect())
}

/// Checks `child` against `base` and makes its rebased config and layer list.
fn rebase_image(
    child: &AppChild,
    base: &PlatformImage,
    run_name: &str,
    force: bool,
    warnings: &mut Vec<String>,
) -> Result<Rebased, RebaseError> {
    let what = &child.what;
    let app = &child.image;
    let labels = labels_of(&app.config);
    let base_labels = labels_of(&base.config);
    let api = platform_api(&app.config, what)?;
    let targets = api.is_some_and(|v| v >= TARGETS_API);
    let mut overridden = |why: String| -> Result<(), RebaseError> {
        if force {
            warnings.push(format!("{what}: {why}; rebasing anyway (--force)"));
            Ok(())
        } else {
            Err(refused(
                what,
                format!("{why}; give --force to rebase anyway"),
            ))
        }
    };

    if targets {
        if label_text(&labels, REBASABLE_LABEL) == "false" {
            overridden(format!(
                "its label {REBASABLE_LABEL} is \"false\": its app layers may depend on the \
                 run image's files"
            ))?;
        }
        let app_target = Target::of(app);
        let base_target = Target::of(base);
        if !base_target.satisfies(&app_target) {
            overridden(format!(
                "the new run image {run_name} is {base_target}, which does not satisfy the \
                 app's target {app_target}"
            ))?;
        }
    } else {
        let app_stack = label_text(&labels, STACK_ID_LABEL);
        let base_stack = label_text(&base_labels, STACK_ID_LABEL);
        if app_stack.is_empty() {
            return Err(invalid(
                what,
                format!(
                    "its Platform API ({}) predates targets, and it has no {STACK_ID_LABEL} \
                     label to check the new run image against",
                    api.map_or("unset".to_string(), |v| v.to_string())
                ),
            ));
        }
        if app_stack != base_stack {
            return Err(refused(
                what,
                format!(
                    "its stack is {app_stack:?} but the new run image {run_name} is of stack \
                     {base_stack:?}"
                ),
            ));
        }
        let have = mixins(&base_labels, run_name)?;
        let missing: Vec<String> = mixins(&labels, what)?
            .into_iter()
            .filter(|m| !have.contains(m))
            .collect();
        if !missing.is_empty() {
            return Err(refused(
                what,
                format!(
                    "the new run image {run_name} lacks the mixins {}",
                    missing.join(", ")
                ),
            ));
        }
    }

    // The layers: the new run image's, then the app's above runImage.topLayer.
    let diff_ids = image::config_diff_ids(&app.config);
    if diff_ids.len() != app.layers.len() {
        return Err(invalid(
            what,
            format!(
                "its config lists {} diffIDs for {} layers",
                diff_ids.len(),
                app.layers.len()
            ),
        ));
    }
    let old_top = child.label.run_image.top_layer.clone();
    if old_top.is_empty() {
        return Err(invalid(
            what,
            format!("its {LIFECYCLE_METADATA_LABEL} label has no runImage.topLayer"),
        ));
    }
    let top_index = diff_ids.iter().position(|d| *d == old_top).ok_or_else(|| {
        invalid(
            what,
            format!(
                "runImage.topLayer {old_top} of its {LIFECYCLE_METADATA_LABEL} label is not \
                 the diffID of any of its {} layers, so lathe can't tell the run image's \
                 layers from the app's",
                diff_ids.len()
            ),
        )
    })?;
    let base_diff_ids = image::config_diff_ids(&base.config);
    if base_diff_ids.len() != base.layers.len() || base_diff_ids.is_empty() {
        return Err(invalid(
            run_name,
            format!(
                "its config lists {} diffIDs for {} layers",
                base_diff_ids.len(),
                base.layers.len()
            ),
        ));
    }
    let kept = top_index + 1..diff_ids.len();
    let layers: Vec<Descriptor> = base
        .layers
        .iter()
        .chain(&app.layers[kept.clone()])
        .cloned()
        .collect();
    let new_diff_ids: Vec<String> = base_diff_ids
        .iter()
        .chain(&diff_ids[kept.clone()])
        .cloned()
        .collect();
    let new_top = base_diff_ids.last().expect("not empty").clone();

    // The lifecycle label.
    let mut label = child.label.clone();
    let old_reference = label.run_image.reference.clone();
    label.run_image.top_layer = new_top.clone();
    label.run_image.reference = format!(
        "{}@{}",
        strip_tag_and_digest(run_name),
        base.manifest.digest()
    );
    if targets {
        let stack = label.stack.as_ref().map(|s| &s.run_image);
        let mut named: Vec<&String> = Vec::new();
        for name in std::iter::once(&label.run_image.image)
            .chain(&label.run_image.mirrors)
            .chain(stack.map(|s| &s.image))
            .chain(stack.into_iter().flat_map(|s| &s.mirrors))
        {
            if !name.is_empty() && !named.contains(&name) {
                named.push(name);
            }
        }
        let wanted = repository_of(run_name);
        if !named.iter().any(|n| repository_of(n) == wanted) {
            let listed = if named.is_empty() {
                "none".to_string()
            } else {
                named
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            overridden(format!(
                "the new run image {run_name} is not one its label names as its run image or \
                 a mirror ({listed})"
            ))?;
            label.run_image.image = run_name.to_string();
            label.run_image.mirrors = Vec::new();
            label.stack = Some(StackMetadata {
                run_image: StackRunImage {
                    image: run_name.to_string(),
                    mirrors: Vec::new(),
                },
            });
        }
    }

    // The config: the app's, with the new base's platform, layers, history and base labels.
    let mut config = app.config.clone();
    let object = config
        .as_object_mut()
        .ok_or_else(|| invalid(what, "its config is not a JSON object"))?;
    for key in ["os", "architecture", "os.version", "variant"] {
        match base.config.get(key) {
            Some(value) => {
                object.insert(key.to_string(), value.clone());
            }
            None => {
                object.remove(key);
            }
        }
    }
    object.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": new_diff_ids}),
    );
    match rebase_history(
        &app.config,
        top_index + 1,
        diff_ids.len(),
        &base.config,
        base_diff_ids.len(),
    ) {
        Some(history) => {
            object.insert("history".into(), Value::Array(history));
        }
        None => {
            if object.remove("history").is_some() {
                warnings.push(format!(
                    "{what}: its history does not match its layers, so the rebased image has none"
                ));
            }
        }
    }
    let inner = object.entry("config").or_insert_with(|| json!({}));
    if !inner.is_object() {
        *inner = json!({});
    }
    let mut new_labels = labels;
    let mut sync = |prefix: &str| {
        new_labels.retain(|k, _| !k.starts_with(prefix));
        for (k, v) in &base_labels {
            if k.starts_with(prefix) {
                new_labels.insert(k.clone(), v.clone());
            }
        }
    };
    sync(BASE_LABEL_PREFIX);
    if !targets {
        sync(STACK_LABEL_PREFIX);
    }
    new_labels.insert(
        LIFECYCLE_METADATA_LABEL.into(),
        json!(serde_json::to_string(&label).expect("labels serialize")),
    );
    inner["Labels"] = Value::Object(new_labels);

    Ok(Rebased {
        config,
        report: RebasedPlatform {
            platform: base.platform.to_string(),
            digest: String::new(),
            previous_digest: app.manifest.digest().to_string(),
            old_run_image: old_reference,
            new_run_image: label.run_image.reference.clone(),
            old_top_layer: old_top,
            new_top_layer: new_top,
            old_base_layers: top_index + 1,
            new_base_layers: base.layers.len(),
            app_layers: kept.len(),
        },
        layers,
    })
}

fn is_empty_layer(entry: &Value) -> bool {
    entry
        .get("empty_layer")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The rebased history: the new base's entries (one made up per layer when its history does
/// not match its layers), times set to the app's `created` as export sets them, then the app's
/// entries above its old base. `None` when the app's history does not match its layers (it
/// can't be split then) or it has none.
fn rebase_history(
    app: &Value,
    old_base_layers: usize,
    app_layer_count: usize,
    base: &Value,
    base_layer_count: usize,
) -> Option<Vec<Value>> {
    let history = app.get("history")?.as_array()?;
    if history.is_empty()
        || history.iter().filter(|h| !is_empty_layer(h)).count() != app_layer_count
    {
        return None;
    }
    let created = app.get("created").cloned();
    let base_history: Vec<Value> = match base.get("history").and_then(Value::as_array) {
        Some(h) if h.iter().filter(|e| !is_empty_layer(e)).count() == base_layer_count => h.clone(),
        _ => vec![json!({}); base_layer_count],
    };
    let mut out: Vec<Value> = base_history
        .into_iter()
        .map(|mut entry| {
            if let (Some(object), Some(created)) = (entry.as_object_mut(), &created) {
                object.insert("created".into(), created.clone());
            }
            entry
        })
        .collect();
    // The app's part starts at its first layer above the old base; empty entries before it
    // belong to the old base.
    let mut layers_seen = 0;
    let mut taking = false;
    for entry in history {
        if !is_empty_layer(entry) {
            taking = layers_seen >= old_base_layers;
            layers_seen += 1;
        }
        if taking {
            out.push(entry.clone());
        }
    }
    Some(out)
}

/// The app's index with each rebased child's descriptor replaced (platform and annotations
/// kept) and the entries that were left out removed; an OCI index whatever it was.
fn rebased_index(index: &Value, children: &[(Descriptor, Descriptor)]) -> Value {
    let mut index = index.clone();
    index["mediaType"] = json!("application/vnd.oci.image.index.v1+json");
    let entries = index
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut rebased = Vec::new();
    for mut entry in entries {
        let digest = entry.get("digest").and_then(Value::as_str).unwrap_or("");
        let Some((_, new)) = children
            .iter()
            .find(|(old, _)| old.digest().to_string() == digest)
        else {
            continue;
        };
        entry["mediaType"] = json!(new.media_type().to_string());
        entry["digest"] = json!(new.digest().to_string());
        entry["size"] = json!(new.size());
        rebased.push(entry);
    }
    index["manifests"] = Value::Array(rebased);
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(platform: &str, distro: Option<(&str, &str)>) -> Target {
        Target {
            platform: platform.parse().unwrap(),
            distro: distro.map(|(n, v)| (n.to_string(), v.to_string())),
        }
    }

    #[test]
    fn targets_match_as_the_lifecycle_matches_them_at_rebase() {
        let debian = Some(("debian", "12"));
        let app = target("linux/amd64", debian);
        assert!(target("linux/amd64", debian).satisfies(&app));
        assert!(target("linux/amd64", None).satisfies(&app));
        assert!(target("linux/amd64", Some(("debian", ""))).satisfies(&app));
        assert!(!target("linux/amd64", Some(("ubuntu", "22.04"))).satisfies(&app));
        assert!(!target("linux/amd64", Some(("debian", "11"))).satisfies(&app));
        assert!(!target("linux/arm64", debian).satisfies(&app));
        assert!(!target("windows/amd64", debian).satisfies(&app));
        assert!(!target("linux/amd64", debian).satisfies(&target("linux/amd64", None)));
        let arm = target("linux/arm/v7", None);
        assert!(target("linux/arm", None).satisfies(&arm));
        assert!(target("linux/arm/v7", None).satisfies(&arm));
        assert!(!target("linux/arm/v6", None).satisfies(&arm));
        // arm64 and arm64/v8 are one platform.
        assert!(target("linux/arm64/v8", None).satisfies(&target("linux/arm64", None)));
    }

    #[test]
    fn run_image_names_compare_by_repository() {
        assert_eq!(
            repository_of("127.0.0.1:5000/run:1"),
            repository_of(&format!("127.0.0.1:5000/run@sha256:{}", "a".repeat(64)))
        );
        assert_eq!(repository_of("run"), "docker.io/library/run");
        assert_ne!(repository_of("run"), repository_of("run-new"));
    }

    #[test]
    fn history_keeps_the_app_part_and_takes_the_new_base() {
        let app = json!({
            "created": "2000-01-01T00:00:00Z",
            "history": [
                {"created_by": "old base 1"},
                {"created_by": "old base env", "empty_layer": true},
                {"created_by": "old base 2"},
                {"created_by": "old base cmd", "empty_layer": true},
                {"created_by": "app 1"},
                {"created_by": "app env", "empty_layer": true},
                {"created_by": "app 2"},
            ],
        });
        let base = json!({"history": [
            {"created": "1999-01-01T00:00:00Z", "created_by": "new 1"},
            {"created_by": "new 2"},
            {"created_by": "new 3"},
        ]});
        let history = rebase_history(&app, 2, 4, &base, 3).unwrap();
        let by: Vec<&str> = history
            .iter()
            .map(|h| h["created_by"].as_str().unwrap())
            .collect();
        assert_eq!(by, ["new 1", "new 2", "new 3", "app 1", "app env", "app 2"]);
        assert!(
            history[..3]
                .iter()
                .all(|h| h["created"] == "2000-01-01T00:00:00Z")
        );
        // A base without a matching history gets an entry per layer; an app history that
        // does not match its layers can't be split.
        let history = rebase_history(&app, 2, 4, &json!({}), 2).unwrap();
        assert_eq!(history.len(), 5);
        assert_eq!(history[0], json!({"created": "2000-01-01T00:00:00Z"}));
        assert!(rebase_history(&app, 2, 5, &base, 3).is_none());
        assert!(rebase_history(&json!({}), 2, 4, &base, 3).is_none());
    }

    #[test]
    fn platform_api_comes_from_the_app_env() {
        let config = |env: Value| json!({"config": {"Env": env}});
        let v = platform_api(&config(json!(["A=1", "CNB_PLATFORM_API=0.13"])), "x").unwrap();
        assert_eq!(v, Some(ApiVersion::new(0, 13)));
        assert_eq!(platform_api(&config(json!(["A=1"])), "x").unwrap(), None);
        assert!(platform_api(&config(json!(["CNB_PLATFORM_API=new"])), "x").is_err());
    }

    #[test]
    fn the_index_keeps_annotations_and_platforms() {
        let old = |c: char| {
            Descriptor::new(
                MediaType::ImageManifest,
                1,
                content::parse_sha256(&format!("sha256:{}", c.to_string().repeat(64))).unwrap(),
            )
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "annotations": {"a": "b"},
            "manifests": [
                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                 "digest": old('a').digest().to_string(), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"},
                 "annotations": {"c": "d"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": old('c').digest().to_string(), "size": 1,
                 "platform": {"os": "unknown", "architecture": "unknown"}},
            ],
        });
        let new = Descriptor::new(
            MediaType::ImageManifest,
            7,
            content::parse_sha256(&format!("sha256:{}", "b".repeat(64))).unwrap(),
        );
        let out = rebased_index(&index, &[(old('a'), new.clone())]);
        assert_eq!(out["mediaType"], "application/vnd.oci.image.index.v1+json");
        assert_eq!(out["annotations"], json!({"a": "b"}));
        assert_eq!(
            out["manifests"],
            json!([{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": new.digest().to_string(), "size": 7,
                    "platform": {"os": "linux", "architecture": "amd64"},
                    "annotations": {"c": "d"}}])
        );
    }
}
