//! Distribution: buildpackages (`lathe buildpack package`) and builders (`lathe builder
//! create`) as pack writes them (cnb-spec-digest §4), and [`read_builder_labels`], the reader
//! of a builder's labels that a build uses to check `--builder` before unpacking it.
//!
//! Both commands assemble an image with [`crate::assembly`]: the layers lathe makes (one per
//! buildpack, and a builder's `/cnb` configuration layer), configs, manifests and the index,
//! with the blobs of input images (a builder's build image, the layers of dependency
//! buildpackages) served from those images.
//!
//! Buildpack layers follow pack's `toDistTar`: `/cnb`, `/cnb/buildpacks`,
//! `/cnb/buildpacks/<escaped id>` and `…/<version>` (directories 0755), then the buildpack's
//! tree in `filepath.Walk` order with directories 0755, files 0755 when any execute bit is set
//! or they are `bin/build`, `bin/detect` or `bin/generate`, other files 0644, symlinks 0755,
//! everything root-owned with mtime 1980-01-01T00:00:01Z. The same tree gives the same layer
//! wherever it sits and whatever its mtimes, so packages and builders are reproducible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageManifest};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::assembly::LayerWriter;
use crate::content::{self, Kind};
use crate::image::{self, ImageError};
use crate::launcher::{self, LauncherSource};
use crate::layer::cnb::{LAUNCHER_PATH, Owner};
use crate::lifecycle::descriptor::{self, Buildpack, OrderEntry, Target};
use crate::lifecycle::{ApiVersion, BUILDPACK_APIS, LifecycleError, PLATFORM_API, escape_id};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::ImageRef;

pub const BUILDPACKAGE_METADATA_LABEL: &str = "io.buildpacks.buildpackage.metadata";
pub const BUILDPACK_LAYERS_LABEL: &str = "io.buildpacks.buildpack.layers";
pub const BUILDER_METADATA_LABEL: &str = "io.buildpacks.builder.metadata";
pub const BUILDPACK_ORDER_LABEL: &str = "io.buildpacks.buildpack.order";

/// The `created` time of every config lathe writes here, as pack and the lifecycle write it.
const CREATED: &str = "1980-01-01T00:00:01Z";
const BUILDPACKS_DIR: &str = "/cnb/buildpacks";
/// Files pack makes executable whatever their mode on disk.
const ALWAYS_EXECUTABLE: [&str; 3] = ["bin/build", "bin/detect", "bin/generate"];

#[derive(Debug, thiserror::Error)]
pub enum DistributionError {
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Bad input: a buildpack.toml, package.toml or builder.toml, a buildpack directory, or an
    /// input image's labels. `what` names the thing at fault.
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what} is not yet supported")]
    NotYetSupported { what: String },
    #[error(transparent)]
    Launcher(Box<crate::launcher::LauncherError>),
}

impl From<crate::launcher::LauncherError> for DistributionError {
    fn from(e: crate::launcher::LauncherError) -> Self {
        DistributionError::Launcher(Box::new(e))
    }
}

fn invalid(what: impl Display, why: impl Into<String>) -> DistributionError {
    DistributionError::Invalid {
        what: what.to_string(),
        why: why.into(),
    }
}

fn io_error(what: impl Display) -> impl FnOnce(io::Error) -> DistributionError {
    move |source| DistributionError::Io {
        what: what.to_string(),
        source,
    }
}

/// What `lathe buildpack package` does.
#[derive(Debug, Clone)]
pub struct PackageRequest {
    /// The buildpack: a directory holding buildpack.toml.
    pub buildpack_dir: PathBuf,
    /// package.toml: `[[dependencies]]`, `[[targets]]`, `[platform] os`.
    pub config: Option<PathBuf>,
    /// Empty: package.toml's targets, else buildpack.toml's, else one image for the host's
    /// architecture.
    pub platforms: Vec<Platform>,
    pub output: ImageRef,
}

/// What `lathe builder create` does.
#[derive(Debug, Clone)]
pub struct BuilderRequest {
    /// builder.toml; relative buildpack uris are resolved from its directory.
    pub config: PathBuf,
    /// Empty: builder.toml's `[[targets]]`, else the build image's platform (the host's when
    /// it is an index).
    pub platforms: Vec<Platform>,
    pub output: ImageRef,
    /// `--launcher PLATFORM=PATH`: the launcher for a platform instead of lathe's own.
    pub launchers: Vec<(Platform, PathBuf)>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct DistributionReport {
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub platforms: Vec<String>,
    /// `id@version` of every buildpack in the image.
    pub buildpacks: Vec<String>,
    /// Choices lathe made and inputs it ignored.
    pub notes: Vec<String>,
}

// ------------------------------------------------------------------------- label shapes

/// One buildpack's entry in `io.buildpacks.buildpack.layers` (pack's `ModuleLayerInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub api: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub stacks: Vec<Value>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub targets: Vec<TargetEntry>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub order: Vec<OrderGroup>,
    #[serde(rename = "layerDiffID")]
    pub layer_diff_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `io.buildpacks.buildpack.layers`: id → version → entry.
pub type BuildpackLayers = BTreeMap<String, BTreeMap<String, LayerEntry>>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderGroup {
    #[serde(default, deserialize_with = "null_as_default")]
    pub group: Vec<OrderEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetEntry {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub distros: Vec<DistroEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistroEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A run image and its mirrors (builder.toml `[[run.images]]`, run.toml `[[images]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunImage {
    pub image: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub mirrors: Vec<String>,
}

/// Go writes a nil slice as `null`; read it as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

// --------------------------------------------------------------------- builder labels

/// What a builder's labels say, read before the builder is unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderInfo {
    pub description: String,
    /// `io.buildpacks.buildpack.order`.
    pub order: Vec<Vec<OrderEntry>>,
    /// The run images (`images`, or the legacy `stack.runImage` when there are none).
    pub run_images: Vec<RunImage>,
    /// Every buildpack in the builder, sorted by id and version.
    pub buildpacks: Vec<BuilderBuildpack>,
    /// The Platform APIs the builder's lifecycle supports (deprecated ones included).
    pub platform_apis: Vec<String>,
    /// The Buildpack APIs the builder's lifecycle supports (deprecated ones included).
    pub buildpack_apis: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuilderBuildpack {
    pub id: String,
    pub version: String,
    pub api: Option<String>,
    pub homepage: Option<String>,
    pub name: Option<String>,
    /// The diffID of the layer that holds it, from `io.buildpacks.buildpack.layers`.
    pub layer_diff_id: Option<String>,
    /// A composite buildpack's order.
    pub order: Vec<Vec<OrderEntry>>,
}

#[derive(Debug, Default, Deserialize)]
struct BuilderMetadata {
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    buildpacks: Vec<ModuleInfo>,
    #[serde(default)]
    stack: Option<StackMetadata>,
    #[serde(default, deserialize_with = "null_as_default")]
    images: Vec<RunImage>,
    #[serde(default)]
    lifecycle: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StackMetadata {
    #[serde(rename = "runImage", default)]
    run_image: Option<RunImage>,
}

#[derive(Debug, Deserialize)]
struct ModuleInfo {
    id: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    homepage: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// Reads a builder's order, run images and buildpacks from its image config's labels.
pub fn read_builder_labels(config_json: &[u8]) -> Result<BuilderInfo, DistributionError> {
    let config: Value = serde_json::from_slice(config_json)
        .map_err(|e| invalid("builder image config", e.to_string()))?;
    let labels = &config["config"]["Labels"];
    let label = |name: &str| labels.get(name).and_then(Value::as_str);
    let parse = |name: &str, text: &str| -> Result<Value, DistributionError> {
        serde_json::from_str(text)
            .map_err(|e| invalid(format!("builder label {name}"), e.to_string()))
    };
    let metadata_text = label(BUILDER_METADATA_LABEL).ok_or_else(|| {
        invalid(
            "builder image config",
            format!("not a builder: it has no {BUILDER_METADATA_LABEL} label"),
        )
    })?;
    let metadata: BuilderMetadata =
        serde_json::from_value(parse(BUILDER_METADATA_LABEL, metadata_text)?).map_err(|e| {
            invalid(
                format!("builder label {BUILDER_METADATA_LABEL}"),
                e.to_string(),
            )
        })?;
    let order: Vec<OrderGroup> = match label(BUILDPACK_ORDER_LABEL) {
        Some(text) => serde_json::from_value(parse(BUILDPACK_ORDER_LABEL, text)?).map_err(|e| {
            invalid(
                format!("builder label {BUILDPACK_ORDER_LABEL}"),
                e.to_string(),
            )
        })?,
        None => Vec::new(),
    };
    let layers: BuildpackLayers = match label(BUILDPACK_LAYERS_LABEL) {
        Some(text) => parse_layers_label(text)
            .map_err(|why| invalid(format!("builder label {BUILDPACK_LAYERS_LABEL}"), why))?,
        None => BTreeMap::new(),
    };
    let mut buildpacks: BTreeMap<(String, String), BuilderBuildpack> = BTreeMap::new();
    for (id, versions) in &layers {
        for (version, entry) in versions {
            buildpacks.insert(
                (id.clone(), version.clone()),
                BuilderBuildpack {
                    id: id.clone(),
                    version: version.clone(),
                    api: Some(entry.api.clone()),
                    homepage: entry.homepage.clone(),
                    name: entry.name.clone(),
                    layer_diff_id: Some(entry.layer_diff_id.clone()),
                    order: entry.order.iter().map(|g| g.group.clone()).collect(),
                },
            );
        }
    }
    for info in &metadata.buildpacks {
        buildpacks
            .entry((info.id.clone(), info.version.clone()))
            .or_insert_with(|| BuilderBuildpack {
                id: info.id.clone(),
                version: info.version.clone(),
                api: None,
                homepage: info.homepage.clone(),
                name: info.name.clone(),
                layer_diff_id: None,
                order: Vec::new(),
            });
    }
    let run_images = if metadata.images.is_empty() {
        metadata
            .stack
            .and_then(|s| s.run_image)
            .filter(|r| !r.image.is_empty())
            .into_iter()
            .collect()
    } else {
        metadata.images
    };
    let lifecycle = metadata.lifecycle.unwrap_or(Value::Null);
    let apis = |kind: &str| -> Vec<String> {
        let listed = &lifecycle["apis"][kind];
        let mut found: Vec<String> = ["deprecated", "supported"]
            .iter()
            .flat_map(|k| listed[k].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if found.is_empty()
            && let Some(single) = lifecycle["api"][kind].as_str()
        {
            found.push(single.to_string());
        }
        found
    };
    Ok(BuilderInfo {
        description: metadata.description.unwrap_or_default(),
        order: order.into_iter().map(|g| g.group).collect(),
        run_images,
        buildpacks: buildpacks.into_values().collect(),
        platform_apis: apis("platform"),
        buildpack_apis: apis("buildpack"),
    })
}

fn parse_layers_label(text: &str) -> Result<BuildpackLayers, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

// ------------------------------------------------------------------ staging and assembly

/// Blobs lathe makes for the image being assembled, named by digest in a temporary directory.
/// The image being made, and the buildpack layers already made for it, by (buildpack
/// directory, folder packaged).
struct Assembly {
    image: crate::assembly::Assembly,
    dir_layers: HashMap<(PathBuf, PathBuf), ModuleLayer>,
}

/// One image of an input, for one platform.
struct PickedImage {
    describe: String,
    manifest: ImageManifest,
    config: Value,
}

impl Assembly {
    fn new(describe: &str) -> Result<Assembly, DistributionError> {
        Ok(Assembly {
            image: crate::assembly::Assembly::new(describe, None)?,
            dir_layers: HashMap::new(),
        })
    }

    fn open_input(&mut self, reference: &ImageRef) -> Result<usize, DistributionError> {
        Ok(self.image.open_input(reference)?)
    }

    /// The image of input `input` for `platform`. An index must have it. A single image must
    /// be for that platform; with `any_arch` one of the same OS will do (a buildpackage made
    /// for one architecture, whose buildpacks are often scripts), with a note.
    fn pick(
        &self,
        input: usize,
        platform: &Platform,
        any_arch: bool,
        notes: &mut Vec<String>,
    ) -> Result<PickedImage, DistributionError> {
        let source = self.image.input(input);
        let describe = source.describe();
        let root = source.root();
        content::check_descriptor(&root).map_err(|why| invalid(&describe, why))?;
        let single = match content::kind_of(root.media_type()) {
            Kind::Index => false,
            Kind::Manifest => true,
            Kind::Other => {
                return Err(invalid(
                    &describe,
                    format!("{} is not an image manifest or index", root.media_type()),
                ));
            }
        };
        let manifest_desc = if single {
            root
        } else {
            let index = image::parse_index(&source.read_blob(&root)?, &root, &describe)?;
            let children = image::platform_children(&index);
            match children.iter().find(|(p, _)| p == platform) {
                Some((_, desc)) => desc.clone(),
                None => {
                    let available: Vec<String> =
                        children.iter().map(|(p, _)| p.to_string()).collect();
                    return Err(invalid(
                        &describe,
                        format!(
                            "the index has no {platform} image (it has: {})",
                            available.join(", ")
                        ),
                    ));
                }
            }
        };
        let manifest = image::parse_manifest(
            &source.read_blob(&manifest_desc)?,
            &manifest_desc,
            &describe,
        )?;
        let config_bytes = source.read_blob(manifest.config())?;
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(&describe, format!("its config is not valid JSON: {e}")))?;
        if single {
            match image::config_platform(&config_bytes) {
                Some(p) if &p == platform => {}
                Some(p) if any_arch && p.os == platform.os => notes.push(format!(
                    "{describe} is a {p} image only; its buildpacks are used for {platform} too"
                )),
                Some(p) => {
                    return Err(invalid(
                        &describe,
                        format!("the image is {p}, not {platform}"),
                    ));
                }
                None => return Err(invalid(&describe, "the image config names no platform")),
            }
        }
        Ok(PickedImage {
            describe,
            manifest,
            config,
        })
    }

    /// The buildpack in `dir` as a layer for `platform`, from its per-target folder
    /// `<dir>/<os>/<arch>[/<variant>]` when there is one (RFC 0128).
    fn dir_layer(
        &mut self,
        buildpack: &Buildpack,
        platform: &Platform,
    ) -> Result<ModuleLayer, DistributionError> {
        let folder = platform_folder(&buildpack.dir, platform);
        let key = (buildpack.dir.clone(), folder.clone());
        if let Some(done) = self.dir_layers.get(&key) {
            return Ok(done.clone());
        }
        if !buildpack.is_composite() && !folder.join("bin/build").exists() {
            return Err(invalid(
                folder.display(),
                format!(
                    "buildpack {} has no bin/build (a buildpack without [[order]] needs \
                     bin/detect and bin/build)",
                    buildpack.name_version()
                ),
            ));
        }
        let what = format!(
            "buildpack {} from {}",
            buildpack.name_version(),
            folder.display()
        );
        let made = self
            .image
            .write_layer(&what, |w| add_buildpack_tree(w, buildpack, &folder))?;
        let (blob, diff_id) = (made.blob, made.diff_id);
        let layer = ModuleLayer {
            id: buildpack.id.clone(),
            version: buildpack.version.clone(),
            entry: LayerEntry {
                api: buildpack.api.to_string(),
                stacks: Vec::new(),
                targets: buildpack
                    .declared_targets
                    .iter()
                    .map(target_entry)
                    .collect(),
                order: buildpack
                    .order
                    .iter()
                    .map(|group| OrderGroup {
                        group: group.clone(),
                    })
                    .collect(),
                layer_diff_id: diff_id,
                homepage: buildpack.homepage.clone(),
                name: buildpack.name.clone(),
            },
            blob,
            origin: buildpack.dir.display().to_string(),
        };
        self.dir_layers.insert(key, layer.clone());
        Ok(layer)
    }

    /// Every buildpack of the buildpackage `input` for `platform`, in the order of its layers,
    /// each reusing the package's own layer blob.
    fn package_layers(
        &mut self,
        input: usize,
        platform: &Platform,
        notes: &mut Vec<String>,
    ) -> Result<Vec<ModuleLayer>, DistributionError> {
        let picked = self.pick(input, platform, true, notes)?;
        let describe = &picked.describe;
        let text = picked.config["config"]["Labels"][BUILDPACK_LAYERS_LABEL]
            .as_str()
            .ok_or_else(|| {
                invalid(
                    describe,
                    format!("not a buildpackage: it has no {BUILDPACK_LAYERS_LABEL} label"),
                )
            })?;
        let layers = parse_layers_label(text)
            .map_err(|why| invalid(describe, format!("label {BUILDPACK_LAYERS_LABEL}: {why}")))?;
        let by_diff_id = layers_by_diff_id(&picked)?;
        let mut found = Vec::new();
        for (id, versions) in layers {
            for (version, entry) in versions {
                check_id(&id).map_err(|why| invalid(describe, why))?;
                check_version(&id, &version).map_err(|why| invalid(describe, why))?;
                let Some((position, blob)) = by_diff_id.get(&entry.layer_diff_id) else {
                    return Err(invalid(
                        describe,
                        format!(
                            "buildpack {id}@{version}: its layer {} is not in the image",
                            entry.layer_diff_id
                        ),
                    ));
                };
                self.image.take_blob(input, blob);
                found.push((
                    *position,
                    ModuleLayer {
                        id: id.clone(),
                        version,
                        entry,
                        blob: blob.clone(),
                        origin: describe.clone(),
                    },
                ));
            }
        }
        found.sort_by(|a, b| (a.0, &a.1.id, &a.1.version).cmp(&(b.0, &b.1.id, &b.1.version)));
        Ok(found.into_iter().map(|(_, layer)| layer).collect())
    }

    /// Writes the image to `output` and reports it. The platforms are those the destination
    /// got: every child of an index, or the one image a docker-archive takes from it.
    fn write_to(
        &self,
        output: &ImageRef,
        children: &[(Platform, Descriptor)],
        buildpacks: Vec<String>,
        mut notes: Vec<String>,
        progress: &Progress,
    ) -> Result<DistributionReport, DistributionError> {
        let report = self.image.write_to(output, progress)?;
        notes.extend(report.note);
        let platforms = if report.platforms.is_empty() {
            children
                .iter()
                .filter(|(_, desc)| desc.digest().to_string() == report.digest)
                .map(|(platform, _)| platform.to_string())
                .collect()
        } else {
            report.platforms
        };
        Ok(DistributionReport {
            digest: report.digest,
            media_type: report.media_type,
            platforms,
            buildpacks,
            notes,
        })
    }
}

/// Layer diffID → (position, layer descriptor) of an input image.
fn layers_by_diff_id(
    picked: &PickedImage,
) -> Result<HashMap<String, (usize, Descriptor)>, DistributionError> {
    let diff_ids: Vec<&str> = picked.config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let layers = picked.manifest.layers();
    if diff_ids.len() != layers.len() {
        return Err(invalid(
            &picked.describe,
            format!(
                "its config lists {} diffIDs for {} layers",
                diff_ids.len(),
                layers.len()
            ),
        ));
    }
    Ok(diff_ids
        .into_iter()
        .zip(layers)
        .enumerate()
        .map(|(i, (diff_id, desc))| (diff_id.to_string(), (i, desc.clone())))
        .collect())
}

// -------------------------------------------------------------------- buildpack layers

/// One buildpack and the layer that holds it.
#[derive(Debug, Clone)]
struct ModuleLayer {
    id: String,
    version: String,
    entry: LayerEntry,
    blob: Descriptor,
    /// Where it came from, for messages: a directory or an image reference.
    origin: String,
}

impl ModuleLayer {
    fn name_version(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }
}

/// The buildpacks going into one image, each once.
#[derive(Debug, Default)]
struct Modules {
    list: Vec<ModuleLayer>,
}

impl Modules {
    /// Adds a buildpack; one already present is kept if it has the same layer, and refused if
    /// it has another.
    fn add(&mut self, layer: ModuleLayer) -> Result<(), DistributionError> {
        if let Some(existing) = self.find(&layer.id, &layer.version) {
            if existing.entry.layer_diff_id == layer.entry.layer_diff_id {
                return Ok(());
            }
            return Err(invalid(
                format!("buildpack {}", layer.name_version()),
                format!(
                    "{} and {} hold different contents for it",
                    existing.origin, layer.origin
                ),
            ));
        }
        self.list.push(layer);
        Ok(())
    }

    fn find(&self, id: &str, version: &str) -> Option<&ModuleLayer> {
        self.list
            .iter()
            .find(|m| m.id == id && m.version == version)
    }

    fn versions_of(&self, id: &str) -> Vec<&str> {
        self.list
            .iter()
            .filter(|m| m.id == id)
            .map(|m| m.version.as_str())
            .collect()
    }

    /// Every composite's order must name buildpacks present, with versions.
    fn check_composites(&self) -> Result<(), DistributionError> {
        for module in &self.list {
            for entry in module.entry.order.iter().flat_map(|g| &g.group) {
                let what = format!("buildpack {}", module.name_version());
                if entry.version.is_empty() {
                    return Err(invalid(
                        what,
                        format!("its order must give a version for buildpack {}", entry.id),
                    ));
                }
                if self.find(&entry.id, &entry.version).is_none() {
                    return Err(invalid(
                        what,
                        format!(
                            "it references buildpack {}@{} which is not present",
                            entry.id, entry.version
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn labels(&self) -> BuildpackLayers {
        let mut layers = BuildpackLayers::new();
        for module in &self.list {
            layers
                .entry(module.id.clone())
                .or_default()
                .insert(module.version.clone(), module.entry.clone());
        }
        layers
    }

    /// The layers to add, in order, each once (a flattened package holds several buildpacks
    /// in one layer).
    fn layers(&self) -> Vec<(Descriptor, String, String)> {
        let mut seen = BTreeSet::new();
        self.list
            .iter()
            .filter(|m| seen.insert(m.entry.layer_diff_id.clone()))
            .map(|m| {
                (
                    m.blob.clone(),
                    m.entry.layer_diff_id.clone(),
                    m.name_version(),
                )
            })
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.list.iter().map(ModuleLayer::name_version).collect();
        names.sort();
        names
    }
}

fn target_entry(target: &Target) -> TargetEntry {
    TargetEntry {
        os: target.os.clone().unwrap_or_default(),
        arch: target.arch.clone().unwrap_or_default(),
        variant: target.variant.clone(),
        distros: target
            .distros
            .iter()
            .map(|d| DistroEntry {
                name: d.name.clone(),
                version: d.version.clone(),
            })
            .collect(),
    }
}

/// Reads and checks `dir/buildpack.toml` for packaging.
pub fn read_buildpack(dir: &Path) -> Result<Buildpack, DistributionError> {
    let path = dir.join("buildpack.toml");
    let what = path.display().to_string();
    let buildpack = descriptor::read(dir).map_err(|e| match e {
        LifecycleError::Detect(message) => {
            let why = message
                .strip_prefix(&format!("{what}: "))
                .unwrap_or(&message)
                .to_string();
            invalid(&what, why)
        }
        other => invalid(&what, other.to_string()),
    })?;
    check_id(&buildpack.id).map_err(|why| invalid(&what, why))?;
    check_version(&buildpack.id, &buildpack.version).map_err(|why| invalid(&what, why))?;
    if buildpack.is_composite() && buildpack.targets.iter().any(|t| *t != Target::default()) {
        return Err(invalid(
            &what,
            format!(
                "buildpack {}: a composite buildpack (with [[order]]) cannot have [[targets]]",
                buildpack.name_version()
            ),
        ));
    }
    Ok(buildpack)
}

/// Buildpack ids: letters, digits, `.`, `/` and `-`, and none of the lifecycle's reserved
/// names.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("[buildpack] has no id".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-'))
    {
        return Err(format!(
            "buildpack id {id:?} may hold only letters, digits, '.', '/' and '-'"
        ));
    }
    if matches!(id, "app" | "config" | "generated" | "sbom") {
        return Err(format!("buildpack id {id:?} is reserved"));
    }
    Ok(())
}

/// The version is a path segment in `/cnb/buildpacks/<id>/<version>`.
fn check_version(id: &str, version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err(format!(
            "buildpack {id} has no version ([buildpack] version)"
        ));
    }
    if version.contains(['/', '\0']) || version == "." || version == ".." {
        return Err(format!(
            "buildpack {id}: version {version:?} cannot be a directory name"
        ));
    }
    Ok(())
}

/// pack's platform root folder: `<dir>/<os>`, then `<arch>`, then `<variant>` below it, as far
/// as those directories exist; `dir` itself when there is none.
pub(crate) fn platform_folder(dir: &Path, platform: &Platform) -> PathBuf {
    let mut folder = dir.to_path_buf();
    let variant = platform.oci_variant();
    for part in [Some(&platform.os), Some(&platform.arch), variant.as_ref()]
        .into_iter()
        .flatten()
    {
        let deeper = folder.join(part);
        if !deeper.is_dir() {
            break;
        }
        folder = deeper;
    }
    folder
}

/// The buildpack's layer: its parents, then the tree of `folder` (with the buildpack's own
/// buildpack.toml in it when `folder` is a per-target folder, as pack copies it there).
fn add_buildpack_tree(
    writer: &mut LayerWriter,
    buildpack: &Buildpack,
    folder: &Path,
) -> io::Result<()> {
    let id_dir = format!("{BUILDPACKS_DIR}/{}", escape_id(&buildpack.id));
    let base = format!("{id_dir}/{}", buildpack.version);
    for dir in ["/cnb", BUILDPACKS_DIR, &id_dir, &base] {
        writer.add_dir(dir, 0o755, Owner::ROOT)?;
    }
    let descriptor = (folder != buildpack.dir).then(|| buildpack.dir.join("buildpack.toml"));
    add_children(writer, folder, &base, "", descriptor.as_deref())
}

fn add_children(
    writer: &mut LayerWriter,
    dir: &Path,
    image_dir: &str,
    rel_dir: &str,
    descriptor: Option<&Path>,
) -> io::Result<()> {
    let mut names = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    if descriptor.is_some() && !names.iter().any(|n| n == "buildpack.toml") {
        names.push("buildpack.toml".into());
    }
    names.sort_unstable_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let path = match descriptor {
            Some(descriptor) if name == "buildpack.toml" => descriptor.to_path_buf(),
            _ => dir.join(&name),
        };
        let name = name.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: the name is not UTF-8", path.display()),
            )
        })?;
        let rel = if rel_dir.is_empty() {
            name.to_string()
        } else {
            format!("{rel_dir}/{name}")
        };
        let image_path = format!("{image_dir}/{name}");
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            writer.add_dir(&image_path, 0o755, Owner::ROOT)?;
            add_children(writer, &path, &image_path, &rel, None)?;
        } else if file_type.is_file() {
            let executable = ALWAYS_EXECUTABLE.contains(&rel.as_str()) || meta.mode() & 0o111 != 0;
            let mode = if executable { 0o755 } else { 0o644 };
            writer.add_file_from_path(&image_path, mode, Owner::ROOT, &path)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path)?;
            let target = target.to_str().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the link target is not UTF-8", path.display()),
                )
            })?;
            writer.add_symlink(&image_path, target, 0o755, Owner::ROOT)?;
        } else if !file_type.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: only files, directories and symlinks can go into a buildpack",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------ input uris

/// Where a buildpack or a dependency comes from.
#[derive(Debug, Clone)]
enum ModuleSource {
    Dir(PathBuf),
    Image(ImageRef),
}

/// Resolves a `uri` of package.toml or builder.toml: a directory (relative to `base`), a
/// buildpackage file (`.cnb`, an oci-archive), or an image reference with or without its
/// transport.
fn resolve_uri(uri: &str, base: &Path, what: &str) -> Result<ModuleSource, DistributionError> {
    let uri = uri.trim();
    if uri.is_empty() {
        return Err(invalid(what, "the uri is empty"));
    }
    for transport in ["docker://", "oci:", "oci-archive:", "docker-archive:"] {
        if uri.starts_with(transport) {
            let mut reference: ImageRef = uri
                .parse()
                .map_err(|e: crate::reference::ReferenceError| invalid(what, e.to_string()))?;
            // Relative layout and archive paths are relative to the config file too.
            match &mut reference {
                ImageRef::Layout { dir: path, .. }
                | ImageRef::OciArchive { file: path, .. }
                | ImageRef::DockerArchive { file: path, .. } => *path = base.join(&*path),
                ImageRef::Registry(_) => {}
            }
            return Ok(ModuleSource::Image(reference));
        }
    }
    if uri.starts_with("urn:cnb:") || uri.starts_with("http://") || uri.starts_with("https://") {
        return Err(DistributionError::NotYetSupported {
            what: format!("{what}: uri {uri:?} (registry and download uris)"),
        });
    }
    let local = base.join(uri.strip_prefix("file://").unwrap_or(uri));
    if local.is_dir() {
        return Ok(ModuleSource::Dir(local));
    }
    if local.is_file() {
        if uri.ends_with(".tgz") || uri.ends_with(".tar.gz") {
            return Err(DistributionError::NotYetSupported {
                what: format!("{what}: uri {uri:?} (a buildpack as a .tgz)"),
            });
        }
        return Ok(ModuleSource::Image(ImageRef::OciArchive {
            file: local,
            name: None,
        }));
    }
    if uri.starts_with(['/', '.', '~']) || uri.starts_with("file://") {
        return Err(invalid(
            what,
            format!(
                "uri {uri:?}: no such file or directory ({})",
                local.display()
            ),
        ));
    }
    uri.parse::<ImageRef>()
        .map(ModuleSource::Image)
        .map_err(|e| {
            invalid(
                what,
                format!(
                    "uri {uri:?} is neither a file nor a directory ({}) nor an image: {}",
                    local.display(),
                    e.why
                ),
            )
        })
}

/// The uri of a `[[dependencies]]` or `[[buildpacks]]` entry: `uri`, or the older `image`.
fn entry_uri(uri: &Option<String>, image: &Option<String>) -> Option<String> {
    match (uri, image) {
        (Some(uri), _) => Some(uri.clone()),
        (None, Some(image)) => Some(format!(
            "docker://{}",
            image.trim_start_matches("docker://")
        )),
        (None, None) => None,
    }
}

/// An input buildpack source once opened: a directory's descriptor, or an image's index
/// in the assembly's inputs.
enum OpenedModule {
    Dir(Box<Buildpack>),
    Image { input: usize },
}

fn open_module(
    assembly: &mut Assembly,
    source: &ModuleSource,
) -> Result<OpenedModule, DistributionError> {
    Ok(match source {
        ModuleSource::Dir(dir) => OpenedModule::Dir(Box::new(read_buildpack(dir)?)),
        ModuleSource::Image(reference) => OpenedModule::Image {
            input: assembly.open_input(reference)?,
        },
    })
}

fn module_layers(
    assembly: &mut Assembly,
    module: &OpenedModule,
    platform: &Platform,
    notes: &mut Vec<String>,
) -> Result<Vec<ModuleLayer>, DistributionError> {
    match module {
        OpenedModule::Dir(buildpack) => Ok(vec![assembly.dir_layer(buildpack, platform)?]),
        OpenedModule::Image { input } => assembly.package_layers(*input, platform, notes),
    }
}

/// A `[[targets]]` entry of package.toml or builder.toml.
#[derive(Debug, Clone, Default, Deserialize)]
struct TargetConfig {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    arch: Option<String>,
    #[serde(default)]
    variant: Option<String>,
}

fn target_platforms(
    targets: &[TargetConfig],
    what: &str,
) -> Result<Vec<Platform>, DistributionError> {
    let mut platforms = Vec::new();
    for (n, target) in targets.iter().enumerate() {
        let (Some(os), Some(arch)) = (&target.os, &target.arch) else {
            return Err(invalid(
                what,
                format!("[[targets]] entry {} needs both os and arch", n + 1),
            ));
        };
        let text = match &target.variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        let platform: Platform = text
            .parse()
            .map_err(|e: crate::platform::PlatformError| invalid(what, e.to_string()))?;
        push_unique(&mut platforms, platform);
    }
    Ok(platforms)
}

fn unique_platforms(given: &[Platform]) -> Vec<Platform> {
    let mut platforms = Vec::new();
    for platform in given {
        push_unique(&mut platforms, platform.clone());
    }
    platforms
}

fn push_unique(platforms: &mut Vec<Platform>, platform: Platform) {
    if !platforms.contains(&platform) {
        platforms.push(platform);
    }
}

/// The platforms a buildpack's own `[[targets]]` name (those with both os and arch).
fn descriptor_platforms(buildpack: &Buildpack) -> Vec<Platform> {
    let mut platforms = Vec::new();
    for target in &buildpack.declared_targets {
        if let (Some(os), Some(arch)) = (&target.os, &target.arch) {
            push_unique(
                &mut platforms,
                Platform::new(os, arch, target.variant.as_deref()),
            );
        }
    }
    platforms
}

fn check_linux(platforms: &[Platform]) -> Result<(), DistributionError> {
    match platforms.iter().find(|p| p.os != "linux") {
        Some(p) => Err(DistributionError::NotYetSupported {
            what: format!("platform {p} (lathe makes linux images only)"),
        }),
        None => Ok(()),
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    known: &[&str],
    notes: &mut Vec<String>,
) -> Result<T, DistributionError> {
    let what = path.display().to_string();
    let text = fs::read_to_string(path).map_err(io_error(&what))?;
    let table: toml::Table = text.parse().map_err(|e| invalid(&what, format!("{e}")))?;
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            notes.push(format!("{what}: unknown key {key:?} ignored"));
        }
    }
    table
        .try_into()
        .map_err(|e: toml::de::Error| invalid(&what, format!("{e}")))
}

// ------------------------------------------------------------------------- packages

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PackageConfig {
    buildpack: Option<UriEntry>,
    dependencies: Vec<UriEntry>,
    platform: Option<PlatformSection>,
    targets: Vec<TargetConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct UriEntry {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PlatformSection {
    #[serde(default)]
    os: Option<String>,
}

/// Writes the buildpackage of `request.buildpack_dir` (and its package.toml dependencies) to
/// `request.output`: one image per platform, with an index when there are several.
pub fn package_buildpack(
    request: &PackageRequest,
    progress: &Progress,
) -> Result<DistributionReport, DistributionError> {
    let mut notes = Vec::new();
    let main = read_buildpack(&request.buildpack_dir)?;
    let (config, config_what, base) = match &request.config {
        Some(path) => (
            read_toml::<PackageConfig>(
                path,
                &["buildpack", "dependencies", "platform", "targets"],
                &mut notes,
            )?,
            path.display().to_string(),
            crate::layout::parent_dir(path).to_path_buf(),
        ),
        None => (PackageConfig::default(), String::new(), PathBuf::from(".")),
    };
    if let Some(uri) = config.buildpack.as_ref().and_then(|b| b.uri.as_deref()) {
        let given = base.join(uri);
        let same = fs::canonicalize(&given).ok() == fs::canonicalize(&request.buildpack_dir).ok();
        if !same {
            return Err(invalid(
                &config_what,
                format!(
                    "[buildpack] uri {uri:?} is not the directory being packaged ({})",
                    request.buildpack_dir.display()
                ),
            ));
        }
    }
    let mut dependencies = Vec::new();
    for (n, entry) in config.dependencies.iter().enumerate() {
        let what = format!("{config_what}: [[dependencies]] entry {}", n + 1);
        let uri =
            entry_uri(&entry.uri, &entry.image).ok_or_else(|| invalid(&what, "it has no uri"))?;
        dependencies.push(resolve_uri(&uri, &base, &what)?);
    }

    let platforms = if !request.platforms.is_empty() {
        unique_platforms(&request.platforms)
    } else if !config.targets.is_empty() {
        target_platforms(&config.targets, &config_what)?
    } else {
        let from_descriptor = descriptor_platforms(&main);
        if from_descriptor.is_empty() {
            let os = config
                .platform
                .as_ref()
                .and_then(|p| p.os.clone())
                .unwrap_or_else(|| "linux".into());
            let platform = Platform::new(&os, &Platform::host().arch, None);
            notes.push(format!(
                "packaged for {platform} only (the host's architecture): no --platform and \
                 no [[targets]] in buildpack.toml or package.toml"
            ));
            vec![platform]
        } else {
            from_descriptor
        }
    };
    check_linux(&platforms)?;

    let mut assembly = Assembly::new(&format!("buildpackage {}", main.name_version()))?;
    let opened: Vec<OpenedModule> = dependencies
        .iter()
        .map(|source| open_module(&mut assembly, source))
        .collect::<Result<_, _>>()?;
    let mut children = Vec::new();
    let mut names = Vec::new();
    for platform in &platforms {
        let mut modules = Modules::default();
        for module in &opened {
            for layer in module_layers(&mut assembly, module, platform, &mut notes)? {
                modules.add(layer)?;
            }
        }
        modules.add(assembly.dir_layer(&main, platform)?)?;
        modules.check_composites()?;
        check_all_used(&modules, &main)?;
        let labels = json!({
            BUILDPACKAGE_METADATA_LABEL: label_json(&package_metadata(&main)),
            BUILDPACK_LAYERS_LABEL: label_json(&modules.labels()),
        });
        let layers = modules.layers();
        let mut config = json!({
            "architecture": platform.arch,
            "os": platform.os,
            "created": CREATED,
            "config": {"Labels": labels},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|(_, diff_id, _)| diff_id).collect::<Vec<_>>(),
            },
            "history": layers.iter().map(|(_, _, name)| json!({
                "created": CREATED,
                "created_by": format!("lathe buildpack package: buildpack {name}"),
            })).collect::<Vec<_>>(),
        });
        if let Some(variant) = platform.oci_variant() {
            config["variant"] = json!(variant);
        }
        let blobs: Vec<Descriptor> = layers.into_iter().map(|(blob, _, _)| blob).collect();
        children.push((
            platform.clone(),
            assembly.image.write_image(&config, &blobs)?,
        ));
        names = modules.names();
    }
    assembly.image.set_root(&children)?;
    assembly.write_to(&request.output, &children, names, notes, progress)
}

/// pack's rule: every dependency must be used by the main buildpack or another one packaged.
fn check_all_used(modules: &Modules, main: &Buildpack) -> Result<(), DistributionError> {
    let used: BTreeSet<(&str, &str)> = modules
        .list
        .iter()
        .flat_map(|m| m.entry.order.iter().flat_map(|g| &g.group))
        .map(|e| (e.id.as_str(), e.version.as_str()))
        .collect();
    for module in &modules.list {
        let is_main = module.id == main.id && module.version == main.version;
        if !is_main && !used.contains(&(module.id.as_str(), module.version.as_str())) {
            return Err(invalid(
                format!(
                    "buildpack {} (from {})",
                    module.name_version(),
                    module.origin
                ),
                format!("it is not used by buildpack {}", main.name_version()),
            ));
        }
    }
    Ok(())
}

/// `io.buildpacks.buildpackage.metadata`: the package's entrypoint buildpack.
fn package_metadata(main: &Buildpack) -> Value {
    let mut metadata = json!({"id": main.id, "version": main.version, "stacks": []});
    if let Some(name) = &main.name {
        metadata["name"] = json!(name);
    }
    if let Some(homepage) = &main.homepage {
        metadata["homepage"] = json!(homepage);
    }
    metadata
}

/// A label's value: compact JSON with sorted keys.
fn label_json<T: Serialize>(value: &T) -> String {
    String::from_utf8(content::canonical_json(value)).expect("JSON is UTF-8")
}

// ------------------------------------------------------------------------- builders

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct BuilderConfig {
    description: Option<String>,
    buildpacks: Vec<BuilderBuildpackEntry>,
    order: Vec<OrderGroup>,
    stack: Option<StackSection>,
    build: Option<BuildSection>,
    run: Option<RunSection>,
    targets: Vec<TargetConfig>,
    lifecycle: Option<toml::Value>,
    extensions: Vec<toml::Value>,
    order_extensions: Vec<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BuilderBuildpackEntry {
    id: Option<String>,
    version: Option<String>,
    uri: Option<String>,
    image: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct StackSection {
    build_image: Option<String>,
    run_image: Option<String>,
    run_image_mirrors: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BuildSection {
    image: Option<String>,
    env: Vec<BuildEnv>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RunSection {
    images: Vec<RunImage>,
}

/// `[[build.env]]`: a file in `/cnb/build-config/env` (RFC 0109).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BuildEnv {
    name: String,
    value: String,
    suffix: Option<String>,
    delim: Option<String>,
}

const BUILDER_KEYS: &[&str] = &[
    "description",
    "buildpacks",
    "order",
    "stack",
    "build",
    "run",
    "targets",
    "lifecycle",
    "extensions",
    "order-extensions",
];

/// The files of `/cnb/build-config/env`, by name, as pack names them: `NAME[.SUFFIX]`, plus
/// `NAME.delim` when a delimiter is given.
fn build_env_files(
    env: &[BuildEnv],
    what: &str,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, DistributionError> {
    let mut files = BTreeMap::new();
    for (n, entry) in env.iter().enumerate() {
        let entry_what = format!("{what}: [[build.env]] entry {}", n + 1);
        let name = entry.name.as_str();
        if name.is_empty() || name.contains(['/', '=', '\0']) || name == "." || name == ".." {
            return Err(invalid(
                entry_what,
                format!("name {name:?} is not a variable name"),
            ));
        }
        let suffix = match entry.suffix.as_deref().unwrap_or("") {
            "" => String::new(),
            s @ ("default" | "override" | "append" | "prepend") => format!(".{s}"),
            other => {
                return Err(invalid(
                    entry_what,
                    format!(
                        "{name}: suffix {other:?} is not one of default, override, append, prepend"
                    ),
                ));
            }
        };
        let delim = entry.delim.as_deref().filter(|d| !d.is_empty());
        if matches!(suffix.as_str(), ".append" | ".prepend") && delim.is_none() {
            return Err(invalid(
                entry_what,
                format!("{name}: suffix {:?} needs a delim", &suffix[1..]),
            ));
        }
        if entry.value.is_empty() {
            notes.push(format!("{entry_what}: {name} has an empty value"));
        }
        let file = format!("{name}{suffix}");
        if files.insert(file.clone(), entry.value.clone()).is_some() {
            notes.push(format!(
                "{entry_what}: {file} given again; the last value is kept"
            ));
        }
        if let Some(delim) = delim {
            files.insert(format!("{name}.delim"), delim.to_string());
        }
    }
    Ok(files)
}

/// The builder's order with every version filled in from the builder's buildpacks; an entry
/// naming a buildpack the builder lacks is refused.
fn resolve_order(
    order: &[OrderGroup],
    modules: &Modules,
    what: &str,
) -> Result<Vec<OrderGroup>, DistributionError> {
    order
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let entries = group
                .group
                .iter()
                .map(|entry| {
                    let mut entry = entry.clone();
                    let versions = modules.versions_of(&entry.id);
                    let where_ = format!("{what}: [[order]] group {}", g + 1);
                    if entry.version.is_empty() {
                        match versions.as_slice() {
                            [only] => entry.version = only.to_string(),
                            [] => {
                                return Err(invalid(
                                    where_,
                                    format!(
                                        "buildpack {} is not in the builder (no [[buildpacks]] \
                                         entry or package holds it)",
                                        entry.id
                                    ),
                                ));
                            }
                            several => {
                                return Err(invalid(
                                    where_,
                                    format!(
                                        "buildpack {} has several versions in the builder ({}); \
                                         give one",
                                        entry.id,
                                        several.join(", ")
                                    ),
                                ));
                            }
                        }
                    } else if modules.find(&entry.id, &entry.version).is_none() {
                        let has = if versions.is_empty() {
                            "no version of it".to_string()
                        } else {
                            format!("only {}", versions.join(", "))
                        };
                        return Err(invalid(
                            where_,
                            format!(
                                "buildpack {}@{} is not in the builder (it has {has})",
                                entry.id, entry.version
                            ),
                        ));
                    }
                    Ok(entry)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(OrderGroup { group: entries })
        })
        .collect()
}

/// `KEY=value` from an image config's `Env`.
fn config_env<'a>(config: &'a Value, key: &str) -> Option<&'a str> {
    config["config"]["Env"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn user_id(config: &Value, key: &str, describe: &str) -> Result<u64, DistributionError> {
    let text = config_env(config, key).ok_or_else(|| {
        invalid(
            describe,
            format!("the build image sets no {key} (a CNB build image must)"),
        )
    })?;
    text.trim()
        .parse()
        .map_err(|_| invalid(describe, format!("{key}={text} is not a number")))
}

/// What goes into a builder's configuration layer.
struct BuilderFiles<'a> {
    order: &'a [OrderGroup],
    run_images: &'a [RunImage],
    env: &'a BTreeMap<String, String>,
    user: Owner,
}

fn to_toml<T: Serialize>(value: &T) -> String {
    toml::to_string(value).expect("lathe's own TOML serialises")
}

fn add_builder_files(writer: &mut LayerWriter, files: &BuilderFiles) -> io::Result<()> {
    #[derive(Serialize)]
    struct OrderToml<'a> {
        order: &'a [OrderGroup],
    }
    #[derive(Serialize)]
    struct RunToml<'a> {
        images: &'a [RunImage],
    }
    #[derive(Serialize)]
    struct StackToml<'a> {
        #[serde(rename = "run-image")]
        run_image: &'a RunImage,
    }
    let root = Owner::ROOT;
    writer.add_dir("/cnb", 0o755, root)?;
    writer.add_dir("/cnb/build-config", 0o755, root)?;
    writer.add_dir("/cnb/build-config/env", 0o755, root)?;
    for (name, value) in files.env {
        let path = format!("/cnb/build-config/env/{name}");
        writer.add_file(&path, 0o644, root, value.as_bytes())?;
    }
    let order = to_toml(&OrderToml { order: files.order });
    writer.add_file("/cnb/order.toml", 0o644, root, order.as_bytes())?;
    let run = to_toml(&RunToml {
        images: files.run_images,
    });
    writer.add_file("/cnb/run.toml", 0o644, root, run.as_bytes())?;
    let stack = to_toml(&StackToml {
        run_image: &files.run_images[0],
    });
    writer.add_file("/cnb/stack.toml", 0o644, root, stack.as_bytes())?;
    writer.add_dir("/layers", 0o755, files.user)?;
    writer.add_dir("/platform", 0o755, root)?;
    writer.add_dir("/platform/env", 0o755, root)?;
    writer.add_dir("/workspace", 0o755, files.user)?;
    Ok(())
}

/// `io.buildpacks.builder.metadata`, with the lifecycle APIs lathe implements.
fn builder_metadata(description: &str, modules: &Modules, run_images: &[RunImage]) -> Value {
    let mut buildpacks: Vec<Value> = modules
        .list
        .iter()
        .map(|m| {
            let mut info = json!({"id": m.id, "version": m.version});
            if let Some(homepage) = &m.entry.homepage {
                info["homepage"] = json!(homepage);
            }
            if let Some(name) = &m.entry.name {
                info["name"] = json!(name);
            }
            info
        })
        .collect();
    buildpacks.sort_by(|a, b| {
        (a["id"].as_str(), a["version"].as_str()).cmp(&(b["id"].as_str(), b["version"].as_str()))
    });
    let (oldest, newest) = BUILDPACK_APIS;
    let buildpack_apis: Vec<String> = (oldest.minor..=newest.minor)
        .map(|minor| ApiVersion::new(oldest.major, minor).to_string())
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "description": description,
        "buildpacks": buildpacks,
        "stack": {"runImage": run_images[0]},
        "images": run_images,
        "lifecycle": {
            "version": version,
            "api": {"buildpack": oldest.to_string(), "platform": PLATFORM_API.to_string()},
            "apis": {
                "buildpack": {"deprecated": [], "supported": buildpack_apis},
                "platform": {"deprecated": [], "supported": [PLATFORM_API.to_string()]},
            },
        },
        "createdBy": {"name": "lathe", "version": version},
    })
}

/// Writes the builder `request.config` describes to `request.output`: the build image plus a
/// layer per buildpack and the `/cnb` configuration layer, one image per platform.
pub fn create_builder(
    request: &BuilderRequest,
    progress: &Progress,
) -> Result<DistributionReport, DistributionError> {
    let mut notes = Vec::new();
    let what = request.config.display().to_string();
    let config: BuilderConfig = read_toml(&request.config, BUILDER_KEYS, &mut notes)?;
    let base = crate::layout::parent_dir(&request.config).to_path_buf();
    if !config.extensions.is_empty() || !config.order_extensions.is_empty() {
        return Err(DistributionError::NotYetSupported {
            what: format!("{what}: image extensions ([[extensions]], [[order-extensions]])"),
        });
    }
    if config.lifecycle.is_some() {
        notes.push(format!(
            "{what}: [lifecycle] is ignored: lathe runs the buildpacks with its own lifecycle and puts its own launcher in the builder"
        ));
    }
    let stack = config.stack.unwrap_or_default();
    let build = config.build.unwrap_or_default();
    let build_image = build
        .image
        .clone()
        .or(stack.build_image.clone())
        .ok_or_else(|| {
            invalid(
                &what,
                "no build image ([build] image or [stack] build-image)",
            )
        })?;
    let build_ref: ImageRef =
        build_image
            .parse()
            .map_err(|e: crate::reference::ReferenceError| {
                invalid(&what, format!("[build] image: {e}"))
            })?;
    let mut run_images = config.run.unwrap_or_default().images;
    if run_images.is_empty()
        && let Some(image) = stack.run_image.clone()
    {
        run_images.push(RunImage {
            image,
            mirrors: stack.run_image_mirrors.clone(),
        });
    }
    if run_images.is_empty() {
        return Err(invalid(
            &what,
            "no run image ([[run.images]] image or [stack] run-image)",
        ));
    }
    if let Some(n) = run_images.iter().position(|r| r.image.trim().is_empty()) {
        return Err(invalid(
            &what,
            format!("[[run.images]] entry {} has no image", n + 1),
        ));
    }
    let env_files = build_env_files(&build.env, &what, &mut notes)?;
    if config.order.is_empty() {
        notes.push(format!(
            "{what} has no [[order]]: builds with this builder must name their buildpacks"
        ));
    }

    let mut sources = Vec::new();
    for (n, entry) in config.buildpacks.iter().enumerate() {
        let entry_what = match &entry.id {
            Some(id) => format!("{what}: [[buildpacks]] entry {} ({id})", n + 1),
            None => format!("{what}: [[buildpacks]] entry {}", n + 1),
        };
        let uri = entry_uri(&entry.uri, &entry.image)
            .ok_or_else(|| invalid(&entry_what, "it has no uri"))?;
        sources.push((entry_what.clone(), resolve_uri(&uri, &base, &entry_what)?));
    }

    let mut assembly = Assembly::new("builder")?;
    let build_input = assembly.open_input(&build_ref)?;
    let mut opened = Vec::new();
    for ((entry_what, source), entry) in sources.iter().zip(&config.buildpacks) {
        let module = open_module(&mut assembly, source)?;
        if let OpenedModule::Dir(buildpack) = &module {
            let mismatch = |field: &str, given: &Option<String>, actual: &str| {
                given.as_deref().filter(|g| *g != actual).map(|g| {
                    invalid(
                        entry_what,
                        format!(
                            "{field} {g:?} does not match {}'s {field} {actual:?}",
                            buildpack.dir.join("buildpack.toml").display()
                        ),
                    )
                })
            };
            if let Some(err) = mismatch("id", &entry.id, &buildpack.id)
                .or_else(|| mismatch("version", &entry.version, &buildpack.version))
            {
                return Err(err);
            }
        }
        opened.push((entry_what.clone(), entry, module));
    }

    let platforms = if !request.platforms.is_empty() {
        unique_platforms(&request.platforms)
    } else if !config.targets.is_empty() {
        target_platforms(&config.targets, &what)?
    } else {
        vec![build_image_platform(&assembly, build_input, &mut notes)?]
    };
    check_linux(&platforms)?;
    launcher::check_flags(&request.launchers, &platforms)?;

    let mut children = Vec::new();
    let mut names = Vec::new();
    for platform in &platforms {
        let base_image = assembly.pick(build_input, platform, false, &mut notes)?;
        let user = Owner {
            uid: user_id(&base_image.config, "CNB_USER_ID", &base_image.describe)?,
            gid: user_id(&base_image.config, "CNB_GROUP_ID", &base_image.describe)?,
        };
        for layer in base_image.manifest.layers() {
            assembly.image.take_blob(build_input, layer);
        }
        let mut modules = Modules::default();
        for (entry_what, entry, module) in &opened {
            let layers = module_layers(&mut assembly, module, platform, &mut notes)?;
            if let (OpenedModule::Image { .. }, Some(id)) = (module, &entry.id) {
                let holds = layers
                    .iter()
                    .any(|l| &l.id == id && entry.version.as_ref().is_none_or(|v| *v == l.version));
                if !holds {
                    let wanted = match &entry.version {
                        Some(v) => format!("{id}@{v}"),
                        None => id.clone(),
                    };
                    let has: Vec<String> = layers.iter().map(ModuleLayer::name_version).collect();
                    return Err(invalid(
                        entry_what,
                        format!(
                            "the image holds no buildpack {wanted} (it has: {})",
                            has.join(", ")
                        ),
                    ));
                }
            }
            for layer in layers {
                modules.add(layer)?;
            }
        }
        modules.check_composites()?;
        let order = resolve_order(&config.order, &modules, &what)?;
        let files = BuilderFiles {
            order: &order,
            run_images: &run_images,
            env: &env_files,
            user,
        };
        let config_layer = assembly
            .image
            .write_layer("the builder's /cnb configuration layer", |w| {
                add_builder_files(w, &files)
            })?;
        let (config_layer, config_diff_id) = (config_layer.blob, config_layer.diff_id);

        let mut layers: Vec<Descriptor> = base_image.manifest.layers().to_vec();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        // The launcher: the --launcher file, else lathe's own (also when builder.toml names a
        // lifecycle, which lathe does not fetch: its own lifecycle runs the buildpacks).
        let flag = launcher::flag_for(&request.launchers, platform);
        let chosen = launcher::choose_launcher(platform, flag, None)?;
        let made = assembly
            .image
            .write_layer("the launcher layer", |w| w.add_launcher(&chosen.bytes))?;
        layers.push(made.blob);
        diff_ids.push(made.diff_id);
        history.push(match chosen.source {
            LauncherSource::Lathe => format!(
                "lathe builder create: lathe {} launcher at {LAUNCHER_PATH}",
                env!("CARGO_PKG_VERSION")
            ),
            _ => format!("lathe builder create: --launcher {platform} at {LAUNCHER_PATH}"),
        });
        for (blob, diff_id, name) in modules.layers() {
            layers.push(blob);
            diff_ids.push(diff_id);
            history.push(format!("lathe builder create: buildpack {name}"));
        }
        layers.push(config_layer);
        diff_ids.push(config_diff_id);
        history.push("lathe builder create: /cnb order, run images, build-config".to_string());

        let labels = [
            (
                BUILDER_METADATA_LABEL,
                label_json(&builder_metadata(
                    config.description.as_deref().unwrap_or(""),
                    &modules,
                    &run_images,
                )),
            ),
            (BUILDPACK_ORDER_LABEL, label_json(&order)),
            (BUILDPACK_LAYERS_LABEL, label_json(&modules.labels())),
        ];
        let image_config = builder_config(
            base_image.config,
            &labels,
            &diff_ids,
            &history,
            &base_image.describe,
        )?;
        children.push((
            platform.clone(),
            assembly.image.write_image(&image_config, &layers)?,
        ));
        names = modules.names();
    }
    assembly.image.set_root(&children)?;
    assembly.write_to(&request.output, &children, names, notes, progress)
}

/// The platform of the build image: its own, or the host's when it is an index.
fn build_image_platform(
    assembly: &Assembly,
    input: usize,
    notes: &mut Vec<String>,
) -> Result<Platform, DistributionError> {
    let source = assembly.image.input(input);
    let describe = source.describe();
    let root = source.root();
    match content::kind_of(root.media_type()) {
        Kind::Index => {
            let host = Platform::host();
            notes.push(format!(
                "{describe} is an index; made the builder for the host platform {host} \
                 (use --platform or [[targets]] for others)"
            ));
            Ok(host)
        }
        _ => {
            let manifest = image::parse_manifest(&source.read_blob(&root)?, &root, &describe)?;
            image::config_platform(&source.read_blob(manifest.config())?)
                .ok_or_else(|| invalid(&describe, "the image config names no platform"))
        }
    }
}

/// The build image's config with the builder's labels, layers and working directory; the
/// user, environment and other labels kept.
fn builder_config(
    mut config: Value,
    labels: &[(&str, String)],
    diff_ids: &[String],
    history: &[String],
    describe: &str,
) -> Result<Value, DistributionError> {
    let object = config
        .as_object_mut()
        .ok_or_else(|| invalid(describe, "its config is not a JSON object"))?;
    object.insert("created".into(), json!(CREATED));
    let inner = object.entry("config").or_insert_with(|| json!({}));
    if inner.is_null() {
        *inner = json!({});
    }
    let inner = inner
        .as_object_mut()
        .ok_or_else(|| invalid(describe, "its config's \"config\" is not an object"))?;
    inner.insert("WorkingDir".into(), json!("/layers"));
    let image_labels = inner.entry("Labels").or_insert_with(|| json!({}));
    if image_labels.is_null() {
        *image_labels = json!({});
    }
    let image_labels = image_labels
        .as_object_mut()
        .ok_or_else(|| invalid(describe, "its Labels are not an object"))?;
    for (name, value) in labels {
        image_labels.insert(name.to_string(), json!(value));
    }
    let rootfs_ids = object
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid(describe, "its config has no rootfs.diff_ids"))?;
    rootfs_ids.extend(diff_ids.iter().map(|d| json!(d)));
    if let Some(entries) = object.get_mut("history").and_then(Value::as_array_mut) {
        entries.extend(
            history
                .iter()
                .map(|created_by| json!({"created": CREATED, "created_by": created_by})),
        );
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::descriptor::TargetDistro;

    fn buildpack(dir: &Path, toml: &str) -> Buildpack {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("buildpack.toml"), toml).unwrap();
        fs::write(dir.join("bin/build"), "#!/bin/sh\n").unwrap();
        fs::write(dir.join("bin/detect"), "#!/bin/sh\n").unwrap();
        read_buildpack(dir).unwrap()
    }

    #[test]
    fn platforms_come_from_complete_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bp = buildpack(
            tmp.path(),
            "api = \"0.10\"\n[buildpack]\nid = \"a\"\nversion = \"1\"\n",
        );
        bp.declared_targets = vec![
            Target {
                os: Some("linux".into()),
                arch: Some("amd64".into()),
                ..Target::default()
            },
            Target {
                os: Some("linux".into()),
                arch: Some("arm64".into()),
                variant: Some("v8".into()),
                distros: vec![TargetDistro {
                    name: Some("ubuntu".into()),
                    version: Some("24.04".into()),
                }],
            },
            Target {
                os: Some("linux".into()),
                arch: Some("arm64".into()),
                ..Target::default()
            },
            Target {
                os: Some("linux".into()),
                ..Target::default()
            },
        ];
        let platforms: Vec<String> = descriptor_platforms(&bp)
            .iter()
            .map(Platform::to_string)
            .collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
        let entry = target_entry(&bp.declared_targets[1]);
        assert_eq!(
            label_json(&entry),
            r#"{"arch":"arm64","distros":[{"name":"ubuntu","version":"24.04"}],"os":"linux","variant":"v8"}"#
        );
    }

    #[test]
    fn per_target_folders_go_as_deep_as_they_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("linux/arm64/v8")).unwrap();
        fs::create_dir_all(root.join("linux/amd64")).unwrap();
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(platform_folder(root, &arm64), root.join("linux/arm64/v8"));
        assert_eq!(platform_folder(root, &amd64), root.join("linux/amd64"));
        assert_eq!(platform_folder(root, &arm), root.join("linux"));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(platform_folder(empty.path(), &amd64), empty.path());
    }

    #[test]
    fn build_env_files_are_named_as_pack_names_them() {
        let env = vec![
            BuildEnv {
                name: "PLAIN".into(),
                value: "1".into(),
                ..BuildEnv::default()
            },
            BuildEnv {
                name: "PATHLIKE".into(),
                value: "/x".into(),
                suffix: Some("append".into()),
                delim: Some(":".into()),
            },
            BuildEnv {
                name: "D".into(),
                value: "v".into(),
                suffix: Some("default".into()),
                delim: None,
            },
        ];
        let mut notes = Vec::new();
        let files = build_env_files(&env, "b.toml", &mut notes).unwrap();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["D.default", "PATHLIKE.append", "PATHLIKE.delim", "PLAIN"]
        );
        assert_eq!(files["PATHLIKE.delim"], ":");
        assert!(notes.is_empty());

        for (bad, needle) in [
            (
                BuildEnv {
                    name: "X".into(),
                    suffix: Some("prepend".into()),
                    ..BuildEnv::default()
                },
                "needs a delim",
            ),
            (
                BuildEnv {
                    name: "X".into(),
                    suffix: Some("later".into()),
                    ..BuildEnv::default()
                },
                "suffix \"later\"",
            ),
            (
                BuildEnv {
                    name: "../X".into(),
                    ..BuildEnv::default()
                },
                "not a variable name",
            ),
        ] {
            let err = build_env_files(&[bad], "b.toml", &mut notes).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            assert!(err.to_string().contains("[[build.env]] entry 1"), "{err}");
        }
    }

    #[test]
    fn builder_labels_round_trip_through_the_reader() {
        let layer = |diff: &str, order: Vec<OrderGroup>| LayerEntry {
            api: "0.10".into(),
            stacks: vec![],
            targets: vec![],
            order,
            layer_diff_id: diff.into(),
            homepage: None,
            name: Some("N".into()),
        };
        let entry = |id: &str, version: &str| OrderEntry {
            id: id.into(),
            version: version.into(),
            optional: false,
        };
        let mut modules = Modules::default();
        for (id, diff, order) in [
            ("b", "sha256:bb", vec![]),
            (
                "a",
                "sha256:aa",
                vec![OrderGroup {
                    group: vec![entry("b", "2")],
                }],
            ),
        ] {
            modules
                .add(ModuleLayer {
                    id: id.into(),
                    version: if id == "a" { "1" } else { "2" }.into(),
                    entry: layer(diff, order),
                    blob: Descriptor::new(
                        oci_spec::image::MediaType::ImageLayerGzip,
                        1,
                        content::sha256_digest(id.as_bytes()),
                    ),
                    origin: "test".into(),
                })
                .unwrap();
        }
        modules.check_composites().unwrap();
        let run = vec![RunImage {
            image: "example/run".into(),
            mirrors: vec!["mirror/run".into()],
        }];
        let order = resolve_order(
            &[OrderGroup {
                group: vec![OrderEntry {
                    version: String::new(),
                    ..entry("a", "")
                }],
            }],
            &modules,
            "b.toml",
        )
        .unwrap();
        assert_eq!(order[0].group[0].version, "1");
        let config = json!({"config": {"Labels": {
            BUILDER_METADATA_LABEL: label_json(&builder_metadata("d", &modules, &run)),
            BUILDPACK_ORDER_LABEL: label_json(&order),
            BUILDPACK_LAYERS_LABEL: label_json(&modules.labels()),
        }}});
        let info = read_builder_labels(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(info.description, "d");
        assert_eq!(info.order, vec![vec![entry("a", "1")]]);
        assert_eq!(info.run_images, run);
        assert_eq!(
            info.buildpacks
                .iter()
                .map(|b| format!("{}@{}", b.id, b.version))
                .collect::<Vec<_>>(),
            ["a@1", "b@2"]
        );
        assert_eq!(info.buildpacks[0].order, vec![vec![entry("b", "2")]]);
        assert_eq!(
            info.buildpacks[1].layer_diff_id.as_deref(),
            Some("sha256:bb")
        );
        assert_eq!(info.platform_apis, ["0.13"]);
        assert_eq!(info.buildpack_apis.first().map(String::as_str), Some("0.7"));
        assert_eq!(info.buildpack_apis.last().map(String::as_str), Some("0.12"));

        let missing = resolve_order(
            &[OrderGroup {
                group: vec![entry("c", "")],
            }],
            &modules,
            "b.toml",
        )
        .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("buildpack c is not in the builder"),
            "{missing}"
        );
        let wrong = resolve_order(
            &[OrderGroup {
                group: vec![entry("a", "9")],
            }],
            &modules,
            "b.toml",
        )
        .unwrap_err();
        assert!(
            wrong
                .to_string()
                .contains("a@9 is not in the builder (it has only 1)"),
            "{wrong}"
        );
        let not_a_builder = read_builder_labels(br#"{"config":{"Labels":{}}}"#).unwrap_err();
        assert!(not_a_builder.to_string().contains("not a builder"));
    }

    #[test]
    fn legacy_stack_run_image_and_null_lists_are_read() {
        let metadata = r#"{"description":"","buildpacks":null,"stack":{"runImage":{"image":"r","mirrors":null}},"images":null,"lifecycle":{"api":{"buildpack":"0.2","platform":"0.3"}}}"#;
        let config = json!({"config": {"Labels": {BUILDER_METADATA_LABEL: metadata}}});
        let info = read_builder_labels(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(
            info.run_images,
            vec![RunImage {
                image: "r".into(),
                mirrors: vec![]
            }]
        );
        assert_eq!(info.platform_apis, ["0.3"]);
        assert!(info.order.is_empty() && info.buildpacks.is_empty());
    }

    #[test]
    fn ids_and_versions_are_checked() {
        assert!(check_id("heroku/nodejs-1.0").is_ok());
        assert!(check_id("a b").unwrap_err().contains("letters, digits"));
        assert!(check_id("app").unwrap_err().contains("reserved"));
        assert!(check_version("a", "").unwrap_err().contains("no version"));
        assert!(check_version("a", "../x").is_err());
        assert!(check_version("a", "..").is_err());
    }

    #[test]
    fn uris_resolve_to_directories_archives_and_images() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("bp")).unwrap();
        fs::write(tmp.path().join("dep.cnb"), b"").unwrap();
        let base = tmp.path();
        assert!(matches!(
            resolve_uri("bp", base, "x").unwrap(),
            ModuleSource::Dir(d) if d == base.join("bp")
        ));
        assert!(matches!(
            resolve_uri("./dep.cnb", base, "x").unwrap(),
            ModuleSource::Image(ImageRef::OciArchive { file, .. }) if file == base.join("./dep.cnb")
        ));
        assert!(matches!(
            resolve_uri("oci:layout:pkg", base, "x").unwrap(),
            ModuleSource::Image(ImageRef::Layout { dir, name: Some(n) })
                if dir == base.join("layout") && n == "pkg"
        ));
        assert!(matches!(
            resolve_uri("docker://example.com/a/b:1", base, "x").unwrap(),
            ModuleSource::Image(ImageRef::Registry(_))
        ));
        let missing = resolve_uri("./nope", base, "entry 3").unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("entry 3: uri \"./nope\": no such file"),
            "{missing}"
        );
        assert!(matches!(
            resolve_uri("urn:cnb:registry:a/b", base, "x").unwrap_err(),
            DistributionError::NotYetSupported { .. }
        ));
    }
}
