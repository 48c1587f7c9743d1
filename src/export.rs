//! Export: a finished build (the layers directory and the app directory the lifecycle left)
//! becomes a CNB app image on the run image, as the reference lifecycle's exporter builds it
//! (cnb-spec-digest §2.8–§2.9), assembled with [`crate::assembly`] so that the run image's
//! layers are served from the run image and only lathe's own layers are staged.
//!
//! Layers, in the lifecycle's order after the run image's: each buildpack's launch layers
//! (group order, then layer name), the launch SBOM layer, the app layers (one per slice, then
//! the rest), the launcher, the launcher config (`/layers/config`), the process types. Every
//! layer is a CNB-mode tar ([`crate::layer::cnb`]); their parent directories (`/layers`,
//! `/layers/<buildpack>`) are written as the CNB user's 0755 directories rather than read from
//! the host, so the same build gives the same bytes on any machine and in any directory.
//!
//! Config: the run image's, with the lifecycle's Env additions, WorkingDir, Entrypoint, no Cmd,
//! one history entry per added layer, `created` from SOURCE_DATE_EPOCH (else 1980-01-01), and
//! the labels `io.buildpacks.lifecycle.metadata`, `io.buildpacks.build.metadata`,
//! `io.buildpacks.project.metadata` and the buildpacks' launch.toml labels. Run image
//! references in labels are registry names or layout ref names, never host paths.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::Descriptor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::assembly::{Assembly, MadeLayer};
use crate::image::{ImageError, ImageSource};
use crate::layer::cnb::{CnbLayerWriter, LAUNCHER_PATH, Owner};
use crate::lifecycle::launch::{BuildMetadata, ProcessCommand, read_layer_files};
use crate::lifecycle::{GroupFile, PLATFORM_API, escape_id};
use crate::platform::Platform;

pub const LIFECYCLE_METADATA_LABEL: &str = "io.buildpacks.lifecycle.metadata";
pub const BUILD_METADATA_LABEL: &str = "io.buildpacks.build.metadata";
pub const PROJECT_METADATA_LABEL: &str = "io.buildpacks.project.metadata";
/// The lifecycle's normalized time, the default `created`.
pub const NORMALIZED_TIME: &str = "1980-01-01T00:00:01Z";
pub const LAYERS_DIR: &str = "/layers";
pub const APP_DIR: &str = "/workspace";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The build's output or an input image is at fault; `what` names it.
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

fn invalid(what: impl std::fmt::Display, why: impl Into<String>) -> ExportError {
    ExportError::Invalid {
        what: what.to_string(),
        why: why.into(),
    }
}

/// The run image the app image is built on, for one platform.
pub struct RunImage {
    pub source: Box<dyn ImageSource>,
    /// The run image's layers.
    pub layers: Vec<Descriptor>,
    /// The manifest's digest, for `runImage.reference`.
    pub manifest_digest: String,
    pub config: Value,
    pub platform: Platform,
    /// The name recorded in the labels (a registry name, or a layout's ref name).
    pub name: String,
    /// The builder's run.toml entry that names it, if any (else `name` is recorded).
    pub run_toml_image: Option<String>,
    /// Other names of the run image recorded for rebase: run.toml's mirrors, then
    /// `--run-image-mirror`s.
    pub mirrors: Vec<String>,
}

/// The image an earlier build of the app wrote, whose layers this one may reuse.
pub struct PreviousImage {
    pub source: Box<dyn ImageSource>,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<String>,
    /// Its `io.buildpacks.lifecycle.metadata` label.
    pub metadata: LifecycleMetadata,
}

/// What export needs from the build.
pub struct ExportRequest<'a> {
    /// The host directory the lifecycle saw as /layers.
    pub layers_dir: &'a Path,
    /// The host directory the lifecycle saw as /workspace.
    pub app_dir: &'a Path,
    /// The build image's CNB user, the owner of every buildpack and app layer entry.
    pub owner: Owner,
    pub run_image: RunImage,
    /// The previous image: a launch layer the buildpack kept without a directory is taken
    /// from it, and so is every layer whose diffID it already has.
    pub previous: Option<PreviousImage>,
    /// The launcher program's bytes.
    pub launcher: &'a [u8],
    /// The version recorded as the launcher's in the build metadata label.
    pub launcher_version: String,
    /// `io.buildpacks.project.metadata` (`{}` when the app has no project.toml source).
    pub project_metadata: Value,
    /// `--default-process`: the process type the image starts by default.
    pub default_process: Option<String>,
    /// The `created` time of the config and history (RFC 3339).
    pub created: String,
    /// Let programs for another machine than the run image's into launch and app layers
    /// (each is then a warning instead of an error).
    pub allow_foreign_binaries: bool,
}

/// The app image for one platform, staged in an [`Assembly`] (which may hold the images of
/// other platforms too: a layer they share is staged once).
pub struct Exported {
    pub manifest: Descriptor,
    pub platform: Platform,
    /// Every layer added on top of the run image, in order, as (what, diffID).
    pub added: Vec<(String, String)>,
    pub default_process: Option<String>,
    /// Programs for another machine let through by `allow_foreign_binaries`.
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------------- label schemas (§2.9)

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSha {
    pub sha: String,
}

/// `io.buildpacks.lifecycle.metadata`, in the lifecycle's field order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleMetadata {
    #[serde(default)]
    pub app: Vec<LayerSha>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<LayerSha>,
    #[serde(default)]
    pub buildpacks: Vec<BuildpackLayers>,
    #[serde(default)]
    pub config: LayerSha,
    #[serde(default)]
    pub launcher: LayerSha,
    #[serde(default, rename = "process-types")]
    pub process_types: LayerSha,
    #[serde(default, rename = "runImage")]
    pub run_image: RunImageForRebase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackMetadata>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildpackLayers {
    pub key: String,
    pub version: String,
    #[serde(default)]
    pub layers: BTreeMap<String, LayerMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreMetadata>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMetadata {
    pub sha: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub build: bool,
    #[serde(default)]
    pub launch: bool,
    #[serde(default)]
    pub cache: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMetadata {
    #[serde(default)]
    pub metadata: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunImageForRebase {
    #[serde(rename = "topLayer")]
    pub top_layer: String,
    pub reference: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackMetadata {
    #[serde(rename = "runImage")]
    pub run_image: StackRunImage,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackRunImage {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

/// `io.buildpacks.build.metadata`, in the lifecycle's field order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLabel {
    pub buildpacks: Vec<BuildLabelBuildpack>,
    pub launcher: LauncherInfo,
    pub processes: Vec<BuildLabelProcess>,
    #[serde(
        default,
        rename = "buildpack-default-process-type",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_process: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLabelBuildpack {
    pub id: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherInfo {
    pub version: String,
    pub source: LauncherSource,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherSource {
    pub git: GitSource,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitSource {
    pub repository: String,
    pub commit: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLabelProcess {
    #[serde(rename = "type")]
    pub process_type: String,
    pub command: Vec<String>,
    pub args: Option<Vec<String>>,
    pub direct: bool,
    #[serde(rename = "buildpackID")]
    pub buildpack_id: String,
    #[serde(
        default,
        rename = "working-dir",
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(default, rename = "exec-env", skip_serializing_if = "Vec::is_empty")]
    pub exec_env: Vec<String>,
}

// ------------------------------------------------------------------------------ export

/// Assembles the app image of the build in `request.layers_dir` on the run image, into
/// `assembly` (the caller sets its root: this image, or an index of it and others).
pub fn export(assembly: &mut Assembly, request: ExportRequest) -> Result<Exported, ExportError> {
    let layers_dir = request.layers_dir;
    let group_path = layers_dir.join("group.toml");
    let group: GroupFile = read_toml(&group_path)?;
    let metadata_path = layers_dir.join("config/metadata.toml");
    let metadata = BuildMetadata::parse(&read_text(&metadata_path)?)
        .map_err(|why| invalid(metadata_path.display(), why))?;
    let default_process = choose_default_process(&request, &metadata)?;

    let run = request.run_image;
    let run_what = run.source.describe();
    let run_input = assembly.add_input(run.source);
    let mut layers: Vec<Descriptor> = run.layers;
    for layer in &layers {
        assembly.take_blob(run_input, layer);
    }
    let mut config = run.config;
    let base_diff_ids = crate::image::config_diff_ids(&config);
    if base_diff_ids.len() != layers.len() {
        return Err(invalid(
            &run_what,
            format!(
                "its config lists {} diffIDs for {} layers",
                base_diff_ids.len(),
                layers.len()
            ),
        ));
    }
    let top_layer = base_diff_ids
        .last()
        .cloned()
        .ok_or_else(|| invalid(&run_what, "the run image has no layers"))?;

    let owner = request.owner;
    let mut warnings = Vec::new();
    // Every ELF program in a launch or app layer must be for the run image's machine (a
    // platform lathe knows no ELF machine for is not checked).
    let mut check_programs = |dir: &Path, what: &str| -> Result<(), ExportError> {
        match crate::elfcheck::check_tree(dir, &run.platform) {
            Ok(report) => match report.require_target(what) {
                Ok(_) => Ok(()),
                Err(e) if request.allow_foreign_binaries => {
                    warnings.push(format!("{e} (let through by --allow-foreign-binaries)"));
                    Ok(())
                }
                Err(e) => Err(invalid(
                    what,
                    format!("{e}\n(--allow-foreign-binaries lets such layers through)")
                        .trim_start_matches(&format!("{what} "))
                        .to_string(),
                )),
            },
            Err(crate::elfcheck::ElfCheckError::Target(_)) => Ok(()),
            Err(e) => Err(invalid(dir.display(), e.to_string())),
        }
    };
    let previous = request.previous.map(|previous| {
        let input = assembly.add_input(previous.source);
        let blobs: HashMap<String, Descriptor> =
            previous.diff_ids.into_iter().zip(previous.layers).collect();
        (input, blobs, previous.metadata)
    });
    let mut added: Vec<(String, String)> = Vec::new();
    let mut add = |made: MadeLayer, what: String, layers: &mut Vec<Descriptor>| {
        layers.push(made.blob);
        added.push((what, made.diff_id.clone()));
        made.diff_id
    };
    // A layer the previous image has (same diffID) is served from it and never compressed
    // again, so a destination that has the previous image receives nothing new.
    let known = previous
        .as_ref()
        .map(|(input, blobs, _)| move |diff_id: &str| Some((*input, blobs.get(diff_id)?.clone())));
    let previous_layer = |id: &str, name: &str| -> Option<(usize, MadeLayer)> {
        let (input, blobs, metadata) = previous.as_ref()?;
        let layer = metadata
            .buildpacks
            .iter()
            .find(|bp| bp.key == id)?
            .layers
            .get(name)
            .filter(|l| l.launch)?;
        let blob = blobs.get(&layer.sha)?.clone();
        Some((
            *input,
            MadeLayer {
                blob,
                diff_id: layer.sha.clone(),
            },
        ))
    };

    // Buildpack launch layers, group order then name.
    let mut lifecycle = LifecycleMetadata::default();
    for member in &group.group {
        let dir = layers_dir.join(escape_id(&member.id));
        let files = read_layer_files(&dir).map_err(|(path, why)| invalid(path.display(), why))?;
        let mut entry = BuildpackLayers {
            key: member.id.clone(),
            version: member.version.clone(),
            layers: BTreeMap::new(),
            store: read_store(&dir)?,
        };
        for file in files.into_iter().filter(|f| f.layer.types.launch) {
            let layer_dir = dir.join(&file.name);
            let what = format!(
                "Layer: '{}', Created by buildpack: {}@{}",
                file.name, member.id, member.version
            );
            let diff_id = if layer_dir.is_dir() {
                check_programs(
                    &layer_dir,
                    &format!(
                        "buildpack {}@{} layer {:?}",
                        member.id, member.version, file.name
                    ),
                )?;
                let image_path = format!("{LAYERS_DIR}/{}/{}", escape_id(&member.id), file.name);
                let made = assembly.write_layer_or_reuse(&image_path, known, |w| {
                    add_layers_dir(w, &layer_dir, &image_path, owner)
                })?;
                add(made, what, &mut layers)
            } else {
                // Kept without contents: the previous image's layer, as it was.
                let Some((input, kept)) = previous_layer(&member.id, &file.name) else {
                    return Err(invalid(
                        file.path.display(),
                        format!(
                            "buildpack {} marks layer {:?} launch = true but left no \
                             directory for it, and the previous image has no such layer to \
                             reuse",
                            member.id, file.name
                        ),
                    ));
                };
                assembly.take_blob(input, &kept.blob);
                add(kept, what, &mut layers)
            };
            let data = if file.layer.metadata.is_empty() {
                Value::Null
            } else {
                serde_json::to_value(&file.layer.metadata).unwrap_or(Value::Null)
            };
            entry.layers.insert(
                file.name.clone(),
                LayerMetadata {
                    sha: diff_id,
                    data,
                    build: file.layer.types.build,
                    launch: true,
                    cache: file.layer.types.cache,
                },
            );
        }
        lifecycle.buildpacks.push(entry);
    }

    // The launch SBOM layer.
    let sbom_dir = layers_dir.join("sbom/launch");
    if sbom_dir.is_dir() {
        let path = format!("{LAYERS_DIR}/sbom/launch");
        let made = assembly.write_layer_or_reuse("the launch SBOM layer", known, |w| {
            add_layers_dir(w, &sbom_dir, &path, owner)
        })?;
        let sha = add(made, "Software Bill-of-Materials".into(), &mut layers);
        lifecycle.sbom = Some(LayerSha { sha });
    }

    // App layers: one per slice, then the rest.
    check_programs(request.app_dir, "the app")?;
    let app = AppTree::read(request.app_dir, &metadata.slices)?;
    let slice_count = app.slices.len();
    for (i, slice) in app.slices.iter().enumerate() {
        let made = assembly.write_layer_or_reuse(&format!("app slice {}", i + 1), known, |w| {
            app.write_slice(w, slice, owner)
        })?;
        let what = format!("Application Slice: {}", i + 1);
        let sha = add(made, what, &mut layers);
        lifecycle.app.push(LayerSha { sha });
    }
    let made =
        assembly.write_layer_or_reuse("the app layer", known, |w| app.write_rest(w, owner))?;
    let what = if slice_count == 0 {
        "Application Layer".to_string()
    } else {
        format!("Application Slice: {}", slice_count + 1)
    };
    let sha = add(made, what, &mut layers);
    lifecycle.app.push(LayerSha { sha });

    // Launcher, launcher config, process types.
    let launcher = request.launcher;
    let made =
        assembly.write_layer_or_reuse("the launcher layer", known, |w| w.add_launcher(launcher))?;
    lifecycle.launcher.sha = add(made, "Buildpacks Application Launcher".into(), &mut layers);
    let config_dir = layers_dir.join("config");
    let config_path = format!("{LAYERS_DIR}/config");
    let made = assembly.write_layer_or_reuse("the launcher config layer", known, |w| {
        add_layers_dir(w, &config_dir, &config_path, owner)
    })?;
    lifecycle.config.sha = add(made, "Buildpacks Launcher Config".into(), &mut layers);
    let process_types: Vec<&str> = metadata
        .processes
        .iter()
        .map(|p| p.process_type.as_str())
        .collect();
    if !process_types.is_empty() {
        let made = assembly.write_layer_or_reuse("the process types layer", known, |w| {
            w.add_process_type_entries(&process_types)
        })?;
        lifecycle.process_types.sha = add(made, "Buildpacks Process Types".into(), &mut layers);
    }

    // Run image metadata for rebase.
    let label_image = run
        .run_toml_image
        .clone()
        .unwrap_or_else(|| run.name.clone());
    let label_mirrors = run.mirrors.clone();
    lifecycle.run_image = RunImageForRebase {
        top_layer,
        reference: format!(
            "{}@{}",
            strip_tag_and_digest(&run.name),
            run.manifest_digest
        ),
        image: label_image.clone(),
        mirrors: label_mirrors.clone(),
    };
    lifecycle.stack = Some(StackMetadata {
        run_image: StackRunImage {
            image: label_image,
            mirrors: label_mirrors,
        },
    });

    let build_label = BuildLabel {
        buildpacks: metadata
            .buildpacks
            .iter()
            .map(|bp| BuildLabelBuildpack {
                id: bp.id.clone(),
                version: bp.version.clone(),
                homepage: bp.homepage.clone().filter(|h| !h.is_empty()),
            })
            .collect(),
        launcher: LauncherInfo {
            version: request.launcher_version.clone(),
            source: LauncherSource {
                git: GitSource {
                    repository: env!("CARGO_PKG_REPOSITORY").to_string(),
                    commit: String::new(),
                },
            },
        },
        processes: metadata
            .processes
            .iter()
            .map(|p| BuildLabelProcess {
                process_type: p.process_type.clone(),
                command: match &p.command {
                    ProcessCommand::Tokens(tokens) => tokens.clone(),
                    ProcessCommand::Single(line) => vec![line.clone()],
                },
                args: (!p.args.is_empty()).then(|| p.args.clone()),
                direct: p.direct,
                buildpack_id: p.buildpack_id.clone(),
                working_dir: p.working_dir.clone(),
                exec_env: p.exec_env.clone(),
            })
            .collect(),
        default_process: metadata.buildpack_default_process_type.clone(),
    };

    let mut labels: Vec<(String, String)> = metadata
        .labels
        .iter()
        .map(|l| (l.key.clone(), l.value.clone()))
        .collect();
    labels.push((
        LIFECYCLE_METADATA_LABEL.into(),
        serde_json::to_string(&lifecycle).expect("labels serialize"),
    ));
    labels.push((
        BUILD_METADATA_LABEL.into(),
        serde_json::to_string(&build_label).expect("labels serialize"),
    ));
    labels.push((
        PROJECT_METADATA_LABEL.into(),
        serde_json::to_string(&request.project_metadata).expect("labels serialize"),
    ));
    let entrypoint = match &default_process {
        Some(process_type) => format!("/cnb/process/{process_type}"),
        None => LAUNCHER_PATH.to_string(),
    };
    set_app_config(
        &mut config,
        &AppConfig {
            entrypoint,
            labels,
            added: &added,
            created: &request.created,
        },
    );
    let manifest = assembly.write_image(&config, &layers)?;
    Ok(Exported {
        manifest,
        platform: run.platform,
        added,
        default_process,
        warnings,
    })
}

/// The process the image starts by default: `--default-process` (which must exist), else the
/// buildpacks' default when it names a process, else none (the launcher then needs a command).
fn choose_default_process(
    request: &ExportRequest,
    metadata: &BuildMetadata,
) -> Result<Option<String>, ExportError> {
    let exists = |t: &str| metadata.processes.iter().any(|p| p.process_type == t);
    if let Some(wanted) = &request.default_process {
        if !exists(wanted) {
            let known: Vec<&str> = metadata
                .processes
                .iter()
                .map(|p| p.process_type.as_str())
                .collect();
            return Err(invalid(
                format!("--default-process {wanted}"),
                format!(
                    "the build made no such process (it made: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        return Ok(Some(wanted.clone()));
    }
    Ok(metadata
        .buildpack_default_process_type
        .clone()
        .filter(|t| exists(t)))
}

struct AppConfig<'a> {
    entrypoint: String,
    labels: Vec<(String, String)>,
    added: &'a [(String, String)],
    created: &'a str,
}

/// The run image's config made the app image's (§2.8).
fn set_app_config(config: &mut Value, app: &AppConfig) {
    if !config.is_object() {
        *config = json!({});
    }
    let object = config.as_object_mut().expect("an object");
    object.remove("container");
    object.insert("created".into(), json!(app.created));
    let history = object
        .entry("history")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut history: Vec<Value> = history
        .into_iter()
        .map(|mut h| {
            if let Some(h) = h.as_object_mut() {
                h.insert("created".into(), json!(app.created));
            }
            h
        })
        .collect();
    for (what, _) in app.added {
        history.push(json!({"created": app.created, "created_by": what}));
    }
    object.insert("history".into(), Value::Array(history));
    let rootfs = object.entry("rootfs").or_insert_with(|| json!({}));
    rootfs["type"] = json!("layers");
    let mut diff_ids = rootfs["diff_ids"].as_array().cloned().unwrap_or_default();
    diff_ids.extend(app.added.iter().map(|(_, id)| json!(id)));
    rootfs["diff_ids"] = Value::Array(diff_ids);

    let inner = object.entry("config").or_insert_with(|| json!({}));
    if !inner.is_object() {
        *inner = json!({});
    }
    let mut env: Vec<(String, String)> = inner["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.to_string(), String::new()),
        })
        .collect();
    let run_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let path = if run_path.is_empty() {
        "/cnb/process:/cnb/lifecycle".to_string()
    } else {
        format!("/cnb/process:/cnb/lifecycle:{run_path}")
    };
    // Set in place when the run image has the variable (PATH keeps its position), else
    // appended, as imgutil's SetEnv does.
    for (key, value) in [
        ("CNB_LAYERS_DIR", LAYERS_DIR.to_string()),
        ("CNB_APP_DIR", APP_DIR.to_string()),
        ("CNB_PLATFORM_API", PLATFORM_API.to_string()),
        ("CNB_DEPRECATION_MODE", "quiet".to_string()),
        ("PATH", path),
    ] {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => env.push((key.to_string(), value)),
        }
    }
    inner["Env"] = json!(
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    );
    inner["WorkingDir"] = json!(APP_DIR);
    inner["Entrypoint"] = json!([app.entrypoint]);
    if let Some(inner) = inner.as_object_mut() {
        inner.remove("Cmd");
    }
    let labels = inner
        .as_object_mut()
        .expect("an object")
        .entry("Labels")
        .or_insert_with(|| json!({}));
    if !labels.is_object() {
        *labels = json!({});
    }
    for (key, value) in &app.labels {
        labels[key] = json!(value);
    }
}

/// A directory of the layers dir (a buildpack layer, the SBOM tree, the launcher config) as
/// the tar entries of its layer: its parents as the CNB user's 0755 directories, then the tree.
pub fn add_layers_dir<W: io::Write>(
    writer: &mut CnbLayerWriter<W>,
    source: &Path,
    image_path: &str,
    owner: Owner,
) -> io::Result<()> {
    add_layers_parents(writer, image_path, owner)?;
    writer.add_tree(source, image_path, owner)
}

/// `/layers` and every directory between it and `image_path`, as the CNB user's 0755
/// directories.
fn add_layers_parents<W: io::Write>(
    writer: &mut CnbLayerWriter<W>,
    image_path: &str,
    owner: Owner,
) -> io::Result<()> {
    let mut parent = String::new();
    let parts: Vec<&str> = image_path.trim_start_matches('/').split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        parent.push('/');
        parent.push_str(part);
        writer.add_dir(&parent, 0o755, owner)?;
    }
    Ok(())
}

/// `<buildpack layers>/store.toml`'s `[metadata]`, if there is one.
fn read_store(dir: &Path) -> Result<Option<StoreMetadata>, ExportError> {
    let path = dir.join("store.toml");
    if !path.is_file() {
        return Ok(None);
    }
    let table: toml::Table = read_toml(&path)?;
    let metadata = table
        .get("metadata")
        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
        .unwrap_or(json!({}));
    Ok(Some(StoreMetadata { metadata }))
}

fn read_text(path: &Path) -> Result<String, ExportError> {
    std::fs::read_to_string(path).map_err(|e| invalid(path.display(), e.to_string()))
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ExportError> {
    toml::from_str(&read_text(path)?).map_err(|e| invalid(path.display(), e.to_string()))
}

/// `registry/repo` of `registry/repo:tag@digest`; a layout name stays as it is.
pub fn strip_tag_and_digest(name: &str) -> String {
    let name = name.split('@').next().unwrap_or(name);
    match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => name[..colon].to_string(),
        _ => name.to_string(),
    }
}

/// The launcher version recorded in `io.buildpacks.build.metadata`: the lifecycle release whose
/// contract lathe's launcher implements (Buildpack APIs up to 0.12), with lathe's version as
/// build metadata. `pack inspect` hides run-image details for launchers older than 0.5.0, so
/// lathe's own version alone would misinform it.
pub fn launcher_version() -> String {
    format!("0.21.0+lathe.{}", env!("CARGO_PKG_VERSION"))
}

/// `SOURCE_DATE_EPOCH` as RFC 3339, or the lifecycle's normalized time when it is unset; an
/// invalid value is ignored with a note, as the lifecycle does.
pub fn created_time(source_date_epoch: Option<&str>, notes: &mut Vec<String>) -> String {
    let Some(text) = source_date_epoch.filter(|t| !t.is_empty()) else {
        return NORMALIZED_TIME.to_string();
    };
    match text.trim().parse::<i64>() {
        Ok(seconds) if seconds >= 0 => rfc3339(seconds),
        _ => {
            notes.push(format!(
                "SOURCE_DATE_EPOCH={text:?} is not a number of seconds; using {NORMALIZED_TIME}"
            ));
            NORMALIZED_TIME.to_string()
        }
    }
}

fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

// --------------------------------------------------------------------------- app layers

/// The app directory split into slices (`[[slices]]` of metadata.toml) and the rest. A path
/// belongs to the first slice one of whose globs (Go `filepath.Match` rules, relative to the
/// app directory) matches it, unless an ancestor already went to a slice.
struct AppTree {
    root: PathBuf,
    /// Per slice, the matched paths (relative, sorted).
    slices: Vec<Vec<PathBuf>>,
}

impl AppTree {
    fn read(
        root: &Path,
        slices: &[crate::lifecycle::launch::Slice],
    ) -> Result<AppTree, ExportError> {
        let mut out: Vec<Vec<PathBuf>> = vec![Vec::new(); slices.len()];
        if slices.is_empty() {
            return Ok(AppTree {
                root: root.to_path_buf(),
                slices: out,
            });
        }
        // One pre-order walk: a matched directory goes whole to its slice, so nothing under it
        // is looked at again (or put into a second slice).
        let mut walk = walkdir::WalkDir::new(root)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.map_err(|e| invalid(root.display(), e.to_string()))?;
            let relative = entry.path().strip_prefix(root).expect("under root");
            let text = relative.to_string_lossy();
            let matches = |slice: &crate::lifecycle::launch::Slice| {
                slice.paths.iter().any(|glob| {
                    let glob = glob.trim_start_matches("./");
                    glob_match(glob.as_bytes(), text.as_bytes())
                })
            };
            if let Some(i) = slices.iter().position(matches) {
                out[i].push(relative.to_path_buf());
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                }
            }
        }
        Ok(AppTree {
            root: root.to_path_buf(),
            slices: out,
        })
    }

    /// A slice's layer: `/workspace`, the directories leading to each match, then each match.
    fn write_slice<W: io::Write>(
        &self,
        writer: &mut CnbLayerWriter<W>,
        slice: &[PathBuf],
        owner: Owner,
    ) -> io::Result<()> {
        let mut written_dirs: Vec<PathBuf> = Vec::new();
        writer.add_dir(APP_DIR, app_dir_mode(&self.root)?, owner)?;
        for path in slice {
            let mut ancestor = PathBuf::new();
            for part in path.parent().into_iter().flat_map(|p| p.components()) {
                ancestor.push(part);
                if !written_dirs.contains(&ancestor) {
                    let mode = std::fs::metadata(self.root.join(&ancestor))?.permissions();
                    writer.add_dir(
                        &image_path_of(&ancestor),
                        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
                        owner,
                    )?;
                    written_dirs.push(ancestor.clone());
                }
            }
            writer.add_tree(&self.root.join(path), &image_path_of(path), owner)?;
        }
        Ok(())
    }

    /// The app directory without the sliced paths (all of it when there are no slices).
    fn write_rest<W: io::Write>(
        &self,
        writer: &mut CnbLayerWriter<W>,
        owner: Owner,
    ) -> io::Result<()> {
        let taken: Vec<&PathBuf> = self.slices.iter().flatten().collect();
        if taken.is_empty() {
            return writer.add_tree(&self.root, APP_DIR, owner);
        }
        writer.add_dir(APP_DIR, app_dir_mode(&self.root)?, owner)?;
        let mut walk = walkdir::WalkDir::new(&self.root)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.map_err(io::Error::other)?;
            let relative = entry.path().strip_prefix(&self.root).expect("under root");
            if taken.iter().any(|t| relative == t.as_path()) {
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                }
                continue;
            }
            if entry.file_type().is_dir() {
                let mode =
                    std::os::unix::fs::PermissionsExt::mode(&entry.metadata()?.permissions());
                writer.add_dir(&image_path_of(relative), mode & 0o7777, owner)?;
            } else {
                // add_tree on a single entry writes just that entry.
                writer.add_tree(entry.path(), &image_path_of(relative), owner)?;
            }
        }
        Ok(())
    }
}

fn app_dir_mode(root: &Path) -> io::Result<u32> {
    Ok(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root)?.permissions()) & 0o7777)
}

fn image_path_of(relative: &Path) -> String {
    format!("{APP_DIR}/{}", relative.to_string_lossy())
}

/// Go's `filepath.Match` on `/`-separated names: `*` (not across `/`), `?`, `[...]` classes
/// with ranges and `^` negation, `\` escapes. A malformed pattern matches nothing.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob_match(rest, &name[i..]) {
                    return true;
                }
                if i == name.len() || name[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some((b'?', rest)) => match name.split_first() {
            Some((c, tail)) if *c != b'/' => glob_match(rest, tail),
            _ => false,
        },
        Some((b'[', rest)) => {
            let Some((c, tail)) = name.split_first() else {
                return false;
            };
            let (negated, mut class) = match rest.split_first() {
                Some((b'^', r)) => (true, r),
                _ => (false, rest),
            };
            let mut matched = false;
            let mut first = true;
            loop {
                match class.split_first() {
                    None => return false,
                    Some((b']', r)) if !first => {
                        class = r;
                        break;
                    }
                    _ => {}
                }
                first = false;
                let (low, r) = match class.split_first() {
                    Some((b'\\', r)) => match r.split_first() {
                        Some((c, r)) => (*c, r),
                        None => return false,
                    },
                    Some((c, r)) => (*c, r),
                    None => return false,
                };
                let (high, r) = match r {
                    [b'-', h, r @ ..] if *h != b']' => (*h, r),
                    _ => (low, r),
                };
                if low <= *c && *c <= high {
                    matched = true;
                }
                class = r;
            }
            matched != negated && *c != b'/' && glob_match(class, tail)
        }
        Some((b'\\', rest)) => match (rest.split_first(), name.split_first()) {
            (Some((p, rest)), Some((c, tail))) if p == c => glob_match(rest, tail),
            _ => false,
        },
        Some((p, rest)) => match name.split_first() {
            Some((c, tail)) if c == p => glob_match(rest, tail),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_go_filepath_match() {
        let m = |p: &str, n: &str| glob_match(p.as_bytes(), n.as_bytes());
        assert!(m("*.txt", "a.txt"));
        assert!(!m("*.txt", "dir/a.txt"));
        assert!(m("dir/*", "dir/a"));
        assert!(m("static", "static"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "a/c"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[^a-c]x", "bx"));
        assert!(m("[^a-c]x", "dx"));
        assert!(m("\\*", "*"));
        assert!(!m("[a-", "a"));
    }

    #[test]
    fn each_app_path_goes_to_one_slice_at_most() {
        let app = tempfile::tempdir().unwrap();
        for file in ["a.txt", "static/b.txt", "static/c.css", "src/d.rs"] {
            let path = app.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, file).unwrap();
        }
        let slice = |globs: &[&str]| crate::lifecycle::launch::Slice {
            paths: globs.iter().map(|g| g.to_string()).collect(),
        };
        let tree = AppTree::read(
            app.path(),
            &[
                slice(&["*.txt", "static/*.txt"]),
                slice(&["./static"]),
                slice(&["none"]),
            ],
        )
        .unwrap();
        let names = |i: usize| -> Vec<String> {
            tree.slices[i]
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        };
        // static/b.txt matches the first slice, but static/ went whole to the second first.
        assert_eq!(names(0), ["a.txt"]);
        assert_eq!(names(1), ["static"]);
        assert!(names(2).is_empty());
    }

    #[test]
    fn source_date_epoch_becomes_rfc3339() {
        let mut notes = Vec::new();
        assert_eq!(created_time(None, &mut notes), NORMALIZED_TIME);
        assert_eq!(created_time(Some("0"), &mut notes), "1970-01-01T00:00:00Z");
        assert_eq!(created_time(Some("315532801"), &mut notes), NORMALIZED_TIME);
        assert_eq!(
            created_time(Some("1700000000"), &mut notes),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            created_time(Some("951782400"), &mut notes),
            "2000-02-29T00:00:00Z"
        );
        assert!(notes.is_empty());
        assert_eq!(created_time(Some("soon"), &mut notes), NORMALIZED_TIME);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn run_image_names_lose_tag_and_digest() {
        assert_eq!(
            strip_tag_and_digest("localhost:5000/run:1"),
            "localhost:5000/run"
        );
        assert_eq!(
            strip_tag_and_digest("docker.io/library/run@sha256:ab"),
            "docker.io/library/run"
        );
        assert_eq!(
            strip_tag_and_digest("localhost:5000/run"),
            "localhost:5000/run"
        );
        assert_eq!(strip_tag_and_digest("run"), "run");
    }

    #[test]
    fn labels_serialize_in_the_lifecycles_shape() {
        let label = LifecycleMetadata {
            app: vec![LayerSha {
                sha: "sha256:a".into(),
            }],
            buildpacks: vec![BuildpackLayers {
                key: "bp".into(),
                version: "1".into(),
                layers: BTreeMap::new(),
                store: None,
            }],
            process_types: LayerSha { sha: String::new() },
            run_image: RunImageForRebase {
                top_layer: "sha256:t".into(),
                reference: "r@sha256:d".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&label).unwrap(),
            r#"{"app":[{"sha":"sha256:a"}],"buildpacks":[{"key":"bp","version":"1","layers":{}}],"config":{"sha":""},"launcher":{"sha":""},"process-types":{"sha":""},"runImage":{"topLayer":"sha256:t","reference":"r@sha256:d"}}"#
        );
    }
}
