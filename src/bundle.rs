//! `lathe bundle`: what a build needs with no registry, gathered into one OCI archive or
//! layout — the builder, the run images its `io.buildpacks.builder.metadata` label names and
//! any others given — for the platforms asked, with only those platforms' blobs. Each image is
//! named by its fully qualified reference (`registry.example.com:5000/lathe/run:1`,
//! `docker.io/library/busybox:latest`), so that the registry names in the builder's run.toml
//! resolve inside the bundle: a build whose builder comes from a layout or archive takes its
//! run image from there ([`crate::build`]), and `--offline` keeps it off every registry.
//!
//! The images are copied with [`image::put_resolved`] into one sink and made visible together
//! by [`image::ImageSink::commit_named`]: the bundle is written whole (a temporary file or
//! staging directory renamed into place) or not at all.

use std::fmt::Write as _;

use serde::Serialize;

use crate::attachments::Attachment;
use crate::build::recorded_name;
use crate::content::{self, Kind};
use crate::distribution;
use crate::image::{self, ImageError, ImageSource, NamedImage, Resolved, Selection, Transferred};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::{ImageRef, check_ref_name};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The user's arguments are at fault (exit code 3).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Invalid(String),
}

impl BundleError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BundleError::Usage(_) => 3,
            BundleError::Image(e) if e.is_usage() => 3,
            _ => 1,
        }
    }
}

pub struct BundleRequest {
    pub builder: ImageRef,
    /// More run images to put in, beside the builder's own.
    pub run_images: Vec<ImageRef>,
    /// The platforms to keep (default: every platform of the builder).
    pub platforms: Vec<Platform>,
    /// `oci-archive:FILE` or `oci:DIR`, with no ref name.
    pub output: ImageRef,
}

/// One image in the bundle.
#[derive(Debug, Serialize)]
pub struct BundledImage {
    /// Its ref name in the bundle.
    pub name: String,
    /// `builder`, `run image` (named by the builder) or `--run-image`.
    pub role: &'static str,
    /// Where it was read from.
    pub source: String,
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub platforms: Vec<String>,
    /// The size of every blob and manifest the image is made of.
    pub bytes: u64,
    /// What was attached to it (signatures, attestations, SBOMs) and went with it.
    pub attachments: Vec<crate::attachments::AttachmentReport>,
}

#[derive(Debug, Serialize)]
pub struct BundleReport {
    pub output: String,
    pub images: Vec<BundledImage>,
    /// Blobs and bytes written (a blob several images share is written once).
    pub blobs_written: usize,
    pub bytes_written: u64,
    pub notes: Vec<String>,
}

/// An image chosen for the bundle, before anything is written.
struct Chosen {
    reference: ImageRef,
    role: &'static str,
    name: String,
    source: Box<dyn ImageSource>,
    resolved: Resolved,
}

/// Writes the bundle `request` asks for.
pub fn bundle(request: &BundleRequest, progress: &Progress) -> Result<BundleReport, BundleError> {
    let output = &request.output;
    if !matches!(
        output,
        ImageRef::Layout { name: None, .. } | ImageRef::OciArchive { name: None, .. }
    ) {
        return Err(BundleError::Usage(format!(
            "--output {output}: a bundle is an OCI archive (oci-archive:FILE) or layout \
             (oci:DIR), with no ref name: each image in it is named by its own reference"
        )));
    }
    let builder = image::open_source(&request.builder)?;
    let mut platforms: Vec<Platform> = Vec::new();
    for platform in &request.platforms {
        if !platforms.contains(platform) {
            platforms.push(platform.clone());
        }
    }
    if platforms.is_empty() {
        platforms = image_platforms(builder.as_ref())?;
    }
    let resolved = resolve_for(builder.as_ref(), &platforms, false)?;
    let named_run_images = builder_run_images(builder.as_ref(), &resolved)?;
    if named_run_images.is_empty() && request.run_images.is_empty() {
        return Err(BundleError::Invalid(format!(
            "{}: the builder's labels name no run image; give --run-image",
            request.builder
        )));
    }
    let mut chosen = vec![Chosen {
        name: bundle_name(&request.builder)?,
        reference: request.builder.clone(),
        role: "builder",
        source: builder,
        resolved,
    }];
    let wanted = named_run_images
        .into_iter()
        .map(|r| (r, "run image"))
        .chain(
            request
                .run_images
                .iter()
                .map(|r| (r.clone(), "--run-image")),
        );
    for (reference, role) in wanted {
        let name = bundle_name(&reference)?;
        if let Some(other) = chosen.iter().find(|c| c.name == name) {
            if other.reference == reference {
                continue;
            }
            return Err(BundleError::Usage(format!(
                "{reference} and {} would both be named {name:?} in the bundle",
                other.reference
            )));
        }
        let source = image::open_beside(&reference, Some(&request.builder))?;
        let resolved = resolve_for(source.as_ref(), &platforms, true)?;
        chosen.push(Chosen {
            reference,
            role,
            name,
            source,
            resolved,
        });
    }

    let mut sink = image::open_sink(output)?;
    let mut written = Transferred::default();
    let mut images = Vec::new();
    let mut named = Vec::new();
    let mut notes = Vec::new();
    for c in &chosen {
        let put = image::put_resolved(
            c.source.as_ref(),
            &c.resolved,
            sink.as_mut(),
            true,
            progress,
        )?;
        written.blobs += put.transferred.blobs;
        written.bytes += put.transferred.bytes;
        images.push(BundledImage {
            name: c.name.clone(),
            role: c.role,
            source: c.source.describe(),
            digest: c.resolved.root.digest().to_string(),
            media_type: c.resolved.root.media_type().to_string(),
            platforms: resolved_platforms(c.source.as_ref(), &c.resolved)?
                .iter()
                .map(Platform::to_string)
                .collect(),
            bytes: put.size,
            attachments: put.carried.iter().map(Attachment::report).collect(),
        });
        notes.extend(put.notes);
        named.push(NamedImage {
            name: c.name.clone(),
            root: c.resolved.root.clone(),
            children: c.resolved.children.clone(),
        });
    }
    sink.commit_named(&named)?;
    Ok(BundleReport {
        output: output.to_string(),
        images,
        blobs_written: written.blobs,
        bytes_written: written.bytes,
        notes,
    })
}

/// What `lathe bundle` prints on stderr.
pub fn describe(report: &BundleReport) -> String {
    let mut text = format!(
        "Bundled {} images into {} ({} blobs, {} bytes written):\n",
        report.images.len(),
        report.output,
        report.blobs_written,
        report.bytes_written
    );
    for i in &report.images {
        let _ = writeln!(
            text,
            "  {} ({}): {} for {}, {} bytes, {} attachments",
            i.name,
            i.role,
            i.digest,
            i.platforms.join(", "),
            i.bytes,
            i.attachments.len()
        );
    }
    for note in &report.notes {
        let _ = writeln!(text, "note: {note}");
    }
    text
}

/// The ref name an image gets in the bundle: a registry reference fully qualified, an image
/// from a layout or archive its ref name there.
fn bundle_name(reference: &ImageRef) -> Result<String, BundleError> {
    let name = recorded_name(reference);
    check_ref_name(&name)
        .map_err(|why| BundleError::Usage(format!("{reference}: {why}; it can't name an image")))?;
    Ok(name)
}

/// The platforms of an image: an index's children, or a single image's own.
fn image_platforms(source: &dyn ImageSource) -> Result<Vec<Platform>, ImageError> {
    let whole = image::resolve_selection(source, &Selection::default())?;
    resolved_platforms(source, &whole)
}

/// The platforms of a resolved image: its children, or its config's platform.
fn resolved_platforms(
    source: &dyn ImageSource,
    resolved: &Resolved,
) -> Result<Vec<Platform>, ImageError> {
    if content::kind_of(resolved.root.media_type()) == Kind::Index {
        return Ok(resolved.children.iter().map(|(p, _)| p.clone()).collect());
    }
    let image = image::read_manifest_and_config(source, resolved.root.clone(), &Platform::host())?;
    Ok(vec![image.platform])
}

/// `source` for `platforms`: the whole image when it has no other platform (so its digest
/// is kept), else an index of those (or the one image) it has. With `every`, an index must
/// have every platform asked for (a run image is needed for each target); otherwise at least
/// one (a builder builds foreign targets with this machine's image). A single-platform image
/// must be for one of them.
fn resolve_for(
    source: &dyn ImageSource,
    platforms: &[Platform],
    every: bool,
) -> Result<Resolved, ImageError> {
    let whole = image::resolve_selection(source, &Selection::default())?;
    let has = resolved_platforms(source, &whole)?;
    let listed = |list: &[Platform]| {
        list.iter()
            .map(Platform::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = |why: String| ImageError::PlatformMissing {
        what: source.describe(),
        why,
    };
    if content::kind_of(whole.root.media_type()) != Kind::Index {
        if platforms.iter().any(|p| has.contains(p)) {
            return Ok(whole);
        }
        return Err(missing(format!(
            "the image is {}; the bundle is for {}",
            listed(&has),
            listed(platforms)
        )));
    }
    let kept: Vec<Platform> = platforms
        .iter()
        .filter(|p| has.contains(p))
        .cloned()
        .collect();
    if kept.is_empty() || (every && kept.len() < platforms.len()) {
        let absent: Vec<Platform> = platforms
            .iter()
            .filter(|p| !has.contains(p))
            .cloned()
            .collect();
        return Err(missing(format!(
            "the index has no {} image (it has: {})",
            listed(&absent),
            listed(&has)
        )));
    }
    if has.iter().all(|p| kept.contains(p)) {
        return Ok(whole);
    }
    image::resolve_selection(
        source,
        &Selection {
            platforms: kept,
            single_image: false,
        },
    )
}

/// The run images the builder's `io.buildpacks.builder.metadata` label names, for every
/// platform of it that goes into the bundle, each once, in order.
fn builder_run_images(
    builder: &dyn ImageSource,
    resolved: &Resolved,
) -> Result<Vec<ImageRef>, BundleError> {
    let manifests: Vec<_> = if resolved.children.is_empty() {
        vec![resolved.root.clone()]
    } else {
        resolved.children.iter().map(|(_, d)| d.clone()).collect()
    };
    let what = builder.describe();
    let mut found: Vec<ImageRef> = Vec::new();
    for manifest in manifests {
        let image = image::read_manifest_and_config(builder, manifest, &Platform::host())?;
        let config = serde_json::to_vec(&image.config).expect("a JSON value serialises");
        let info = distribution::read_builder_labels(&config)
            .map_err(|e| BundleError::Invalid(format!("{what} ({}): {e}", image.platform)))?;
        for run_image in info.run_images {
            let reference = run_image.image.parse::<ImageRef>().map_err(|e| {
                BundleError::Invalid(format!(
                    "{what}: the builder's run image {:?}: {e}",
                    run_image.image
                ))
            })?;
            if !found.contains(&reference) {
                found.push(reference);
            }
        }
    }
    Ok(found)
}
