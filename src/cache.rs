//! The build cache, in the reference lifecycle's two formats, so that a cache lathe writes is
//! one the lifecycle reads and the other way round (cnb-spec-digest §2.8, "Cache update"):
//!
//! - a directory (`--cache-dir`): `committed/<diffID>.tar`, the uncompressed tar of each cached
//!   layer, and `committed/io.buildpacks.lifecycle.cache.metadata`, the JSON that says which
//!   buildpack layer each tar is. A save is written to `staging/` and swapped with `committed/`
//!   in one `renameat2(RENAME_EXCHANGE)`, so a reader or an interrupted save only ever sees a
//!   whole cache (the lifecycle renames twice, with a moment between when there is none).
//! - an image (`--cache-image`): one layer per cached layer, and the same JSON in the label
//!   `io.buildpacks.lifecycle.cache.metadata`; written whole or not at all, like every image.
//!
//! This module is the host's side: reading a cache before the build (an image's layers are
//! fetched into a directory of `<diffID>.tar`, the one form the restorer reads) and saving it
//! after the export. Restoring runs in the build container, in [`crate::lifecycle::restore`].
//! A save computes each layer's diffID first and reuses the tar or blob the cache already has,
//! so an unchanged layer is hashed once and never written again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::Descriptor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::assembly::{Assembly, layer_diff_id};
use crate::export::{BuildpackLayers, LayerMetadata, LayerSha, NORMALIZED_TIME, add_layers_dir};
use crate::image::{self, ImageError, ImageSource};
use crate::layer::cnb::{CnbLayerWriter, Owner};
use crate::layer::{LayerCompression, WrittenLayer};
use crate::lifecycle::launch::read_layer_files;
use crate::lifecycle::{GroupFile, escape_id};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::ImageRef;

/// The cache's metadata: the file name in a cache directory, the label on a cache image.
pub const CACHE_METADATA_LABEL: &str = "io.buildpacks.lifecycle.cache.metadata";
const COMMITTED: &str = "committed";
const STAGING: &str = "staging";
/// Where the build's layers are, in the tars: the path the lifecycle gives them.
const LAYERS_DIR: &str = crate::export::LAYERS_DIR;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {what}: {why}")]
    Invalid { what: String, why: String },
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn invalid(what: impl std::fmt::Display, why: impl std::fmt::Display) -> CacheError {
    CacheError::Invalid {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// The lifecycle's cache metadata: the cache SBOM layer and each buildpack's cached layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMetadata {
    #[serde(default)]
    pub sbom: LayerSha,
    #[serde(default)]
    pub buildpacks: Vec<BuildpackLayers>,
}

impl CacheMetadata {
    /// The cached layers of buildpack `id`.
    pub fn layers_of(&self, id: &str) -> Option<&BTreeMap<String, LayerMetadata>> {
        self.buildpacks
            .iter()
            .find(|bp| bp.key == id)
            .map(|bp| &bp.layers)
    }

    /// The diffIDs the metadata names.
    fn diff_ids(&self) -> impl Iterator<Item = &str> {
        self.buildpacks
            .iter()
            .flat_map(|bp| bp.layers.values().map(|l| l.sha.as_str()))
            .chain(std::iter::once(self.sbom.sha.as_str()))
            .filter(|sha| !sha.is_empty())
    }
}

/// Where the cache is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    Dir(PathBuf),
    Image(ImageRef),
}

impl std::fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            CacheLocation::Dir(dir) => write!(f, "{}", dir.display()),
            CacheLocation::Image(reference) => write!(f, "{reference}"),
        }
    }
}

impl CacheLocation {
    /// The cache of one platform of a multi-platform build, which keeps one cache per
    /// platform: `DIR/<os>-<arch>[-<variant>]`, or the cache image's tag (a layout's ref name)
    /// with `-<os>-<arch>[-<variant>]` appended. An archive holds one image, so it can't.
    pub fn for_platform(&self, platform: &Platform) -> Result<CacheLocation, String> {
        let suffix = platform.ref_suffix();
        let suffixed = |name: &Option<String>| {
            let name = name.as_deref().unwrap_or(crate::reference::DEFAULT_TAG);
            Some(format!("{name}-{suffix}"))
        };
        Ok(match self {
            CacheLocation::Dir(dir) => CacheLocation::Dir(dir.join(&suffix)),
            CacheLocation::Image(ImageRef::Registry(registry)) if registry.digest.is_none() => {
                let mut registry = registry.clone();
                registry.tag = suffixed(&registry.tag);
                CacheLocation::Image(ImageRef::Registry(registry))
            }
            CacheLocation::Image(ImageRef::Layout { dir, name }) => {
                CacheLocation::Image(ImageRef::Layout {
                    dir: dir.clone(),
                    name: suffixed(name),
                })
            }
            CacheLocation::Image(other) => {
                return Err(format!(
                    "--cache-image {other}: a build for several platforms keeps one cache image \
                     per platform, as tags of a registry repository or ref names of an OCI \
                     layout (docker://REPO:TAG or oci:DIR:NAME, no digest)"
                ));
            }
        })
    }
}

/// A cache as the build found it.
pub struct CacheRead {
    pub metadata: CacheMetadata,
    /// The host directory holding `<diffID>.tar` for the layers the metadata names.
    pub tars: Option<PathBuf>,
    /// A cache image's blobs by diffID, so that a save reuses what did not change.
    previous_blobs: HashMap<String, Descriptor>,
    previous_source: Option<Box<dyn ImageSource>>,
    /// What was wrong with the cache (it is then read as empty), for the user.
    pub warnings: Vec<String>,
}

impl CacheRead {
    fn empty() -> CacheRead {
        CacheRead {
            metadata: CacheMetadata::default(),
            tars: None,
            previous_blobs: HashMap::new(),
            previous_source: None,
            warnings: Vec::new(),
        }
    }
}

/// Reads a cache directory's metadata (a missing cache is an empty one; undecodable metadata
/// is a warning and an empty cache, as in the lifecycle).
pub fn read_dir(dir: &Path) -> CacheRead {
    let committed = dir.join(COMMITTED);
    let path = committed.join(CACHE_METADATA_LABEL);
    let mut read = CacheRead::empty();
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(metadata) => {
                read.metadata = metadata;
                read.tars = Some(committed);
            }
            Err(e) => read.warnings.push(format!(
                "the cache's metadata {} is not valid ({e}); building without the cache",
                path.display()
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => read.warnings.push(format!(
            "{}: {e}; building without the cache",
            path.display()
        )),
    }
    read
}

/// Reads a cache image for `platform` and fetches the layers its metadata names into `tars`
/// as `<diffID>.tar`. A missing image is an empty cache; an image without a readable label
/// is a warning and an empty cache.
pub fn read_image(
    reference: &ImageRef,
    platform: &Platform,
    tars: &Path,
) -> Result<CacheRead, CacheError> {
    let mut read = CacheRead::empty();
    let Some(source) = image::open_if_exists(reference)? else {
        return Ok(read);
    };
    let found = image::read_platform_image(source.as_ref(), platform)?;
    let label = found.config["config"]["Labels"][CACHE_METADATA_LABEL].as_str();
    let metadata: CacheMetadata = match label.map(serde_json::from_str) {
        Some(Ok(metadata)) => metadata,
        Some(Err(e)) => {
            read.warnings.push(format!(
                "cache image {reference}: its {CACHE_METADATA_LABEL} label is not valid ({e}); \
                 building without the cache"
            ));
            return Ok(read);
        }
        None => {
            read.warnings.push(format!(
                "cache image {reference} has no {CACHE_METADATA_LABEL} label; building without \
                 the cache"
            ));
            return Ok(read);
        }
    };
    let diff_ids = image::config_diff_ids(&found.config);
    if diff_ids.len() != found.layers.len() {
        return Err(invalid(
            reference,
            format!(
                "its config lists {} diffIDs for {} layers",
                diff_ids.len(),
                found.layers.len()
            ),
        ));
    }
    fs::create_dir_all(tars).map_err(|e| invalid(tars.display(), e))?;
    let wanted: std::collections::HashSet<&str> = metadata.diff_ids().collect();
    for (desc, diff_id) in found.layers.iter().zip(&diff_ids) {
        read.previous_blobs.insert(diff_id.clone(), desc.clone());
        if !wanted.contains(diff_id.as_str()) {
            continue;
        }
        let compression = crate::content::layer_compression(desc.media_type())
            .ok_or_else(|| invalid(reference, format!("layer {} is not a layer", desc.digest())))?;
        let path = tar_path(tars, diff_id);
        let fetched = (|| -> Result<(), CacheError> {
            let blob = source.open_blob(desc)?;
            let mut tar =
                crate::layer::decompress(blob, compression).map_err(|e| invalid(reference, e))?;
            let mut file = File::create(&path).map_err(|e| invalid(path.display(), e))?;
            io::copy(&mut tar, &mut file)
                .map_err(|e| invalid(reference, format!("layer {}: {e}", desc.digest())))?;
            Ok(())
        })();
        if let Err(e) = fetched {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
    }
    read.metadata = metadata;
    read.tars = Some(tars.to_path_buf());
    read.previous_source = Some(source);
    Ok(read)
}

/// `<dir>/<diffID>.tar`, the lifecycle's name for a cached layer.
pub fn tar_path(dir: &Path, diff_id: &str) -> PathBuf {
    dir.join(format!("{diff_id}.tar"))
}

/// What a save did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SaveReport {
    /// The cached layers, as `buildpack/layer`.
    pub layers: Vec<String>,
    /// Layers the cache already held (not written again).
    pub reused: usize,
    /// cache = true layers left out because the buildpack left no directory for them.
    pub warnings: Vec<String>,
}

/// One layer to cache: where it is on disk and in the image, and its metadata.
struct Cached {
    source: PathBuf,
    image_path: String,
    buildpack: usize,
    name: String,
    metadata: LayerMetadata,
}

/// The `cache = true` layers the build left, in group order then layer name, and the cache
/// SBOM tree if there is one; the metadata has every buildpack of the group.
fn collect(
    layers_dir: &Path,
    report: &mut SaveReport,
) -> Result<(CacheMetadata, Vec<Cached>, Option<PathBuf>), CacheError> {
    let group_path = layers_dir.join("group.toml");
    let text = fs::read_to_string(&group_path).map_err(|e| invalid(group_path.display(), e))?;
    let group: GroupFile = toml::from_str(&text).map_err(|e| invalid(group_path.display(), e))?;
    let mut metadata = CacheMetadata::default();
    let mut cached = Vec::new();
    for (index, member) in group.group.iter().enumerate() {
        metadata.buildpacks.push(BuildpackLayers {
            key: member.id.clone(),
            version: member.version.clone(),
            layers: BTreeMap::new(),
            store: None,
        });
        let escaped = escape_id(&member.id);
        let dir = layers_dir.join(&escaped);
        let files = read_layer_files(&dir).map_err(|(path, why)| invalid(path.display(), why))?;
        for file in files.into_iter().filter(|f| f.layer.types.cache) {
            let source = dir.join(&file.name);
            if !source.is_dir() {
                report.warnings.push(format!(
                    "buildpack {} marks layer {:?} cache = true but left no directory for it; \
                     it is not cached",
                    member.id, file.name
                ));
                continue;
            }
            let data = if file.layer.metadata.is_empty() {
                Value::Null
            } else {
                serde_json::to_value(&file.layer.metadata).unwrap_or(Value::Null)
            };
            cached.push(Cached {
                image_path: format!("{LAYERS_DIR}/{escaped}/{}", file.name),
                source,
                buildpack: index,
                name: file.name,
                metadata: LayerMetadata {
                    sha: String::new(),
                    data,
                    build: file.layer.types.build,
                    launch: file.layer.types.launch,
                    cache: true,
                },
            });
        }
    }
    let sbom = layers_dir.join("sbom/cache");
    Ok((metadata, cached, sbom.is_dir().then_some(sbom)))
}

fn record(metadata: &mut CacheMetadata, report: &mut SaveReport, layer: Cached, diff_id: String) {
    let entry = &mut metadata.buildpacks[layer.buildpack];
    report.layers.push(format!("{}/{}", entry.key, layer.name));
    let mut layer_metadata = layer.metadata;
    layer_metadata.sha = diff_id;
    entry.layers.insert(layer.name, layer_metadata);
}

/// Saves the build in `layers_dir` (its group.toml, `cache = true` layers and cache SBOMs) as
/// the cache directory's new content, replacing the old one whole.
pub fn save_dir(dir: &Path, layers_dir: &Path, owner: Owner) -> Result<SaveReport, CacheError> {
    let mut report = SaveReport::default();
    let (mut metadata, cached, sbom) = collect(layers_dir, &mut report)?;
    fs::create_dir_all(dir).map_err(|e| invalid(dir.display(), e))?;
    let committed = dir.join(COMMITTED);
    let staging = dir.join(STAGING);
    if staging.exists() {
        crate::layout::remove_tree(&staging).map_err(|e| invalid(staging.display(), e))?;
    }
    fs::create_dir(&staging).map_err(|e| invalid(staging.display(), e))?;
    let staged = (|| -> Result<(), CacheError> {
        let put = |source: &Path, image_path: &str| -> Result<(String, bool), CacheError> {
            let diff_id = layer_diff_id(|w| add_layers_dir(w, source, image_path, owner))
                .map_err(|e| invalid(source.display(), e))?;
            let to = tar_path(&staging, &diff_id);
            if to.exists() {
                return Ok((diff_id, true));
            }
            let from = tar_path(&committed, &diff_id);
            if from.is_file() && (fs::hard_link(&from, &to).is_ok() || fs::copy(&from, &to).is_ok())
            {
                return Ok((diff_id, true));
            }
            let file = File::create(&to).map_err(|e| invalid(to.display(), e))?;
            let written = (|| -> io::Result<WrittenLayer> {
                let mut writer = CnbLayerWriter::new(&file, LayerCompression::NONE)?;
                add_layers_dir(&mut writer, source, image_path, owner)?;
                Ok(writer.finish()?.0)
            })()
            .map_err(|e| invalid(source.display(), e))?;
            if written.diff_id.to_string() != diff_id {
                return Err(invalid(
                    source.display(),
                    "the layer changed while it was being cached",
                ));
            }
            Ok((diff_id, false))
        };
        for layer in cached {
            let (diff_id, reused) = put(&layer.source, &layer.image_path)?;
            report.reused += usize::from(reused);
            record(&mut metadata, &mut report, layer, diff_id);
        }
        if let Some(sbom) = &sbom {
            let (diff_id, reused) = put(sbom, &format!("{LAYERS_DIR}/sbom/cache"))?;
            report.reused += usize::from(reused);
            metadata.sbom.sha = diff_id;
        }
        let path = staging.join(CACHE_METADATA_LABEL);
        let json = serde_json::to_vec(&metadata).expect("metadata serializes");
        fs::write(&path, json).map_err(|e| invalid(path.display(), e))?;
        commit(&staging, &committed)
    })();
    if let Err(e) = staged {
        let _ = crate::layout::remove_tree(&staging);
        return Err(e);
    }
    Ok(report)
}

/// Makes `staging` the committed cache in one step; the old one is then removed.
fn commit(staging: &Path, committed: &Path) -> Result<(), CacheError> {
    if !committed.exists() {
        return fs::rename(staging, committed).map_err(|e| invalid(committed.display(), e));
    }
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        staging,
        nix::fcntl::AT_FDCWD,
        committed,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(|e| invalid(committed.display(), e))?;
    // `staging` now holds the old cache.
    crate::layout::remove_tree(staging).map_err(|e| invalid(staging.display(), e))
}

/// Saves the build in `layers_dir` as a cache image for `platform` at `reference`. Layers the
/// previous cache image (in `previous`) had are taken from it, not compressed again.
pub fn save_image(
    reference: &ImageRef,
    platform: &Platform,
    layers_dir: &Path,
    owner: Owner,
    previous: CacheRead,
    staging_parent: Option<&Path>,
    progress: &Progress,
) -> Result<SaveReport, CacheError> {
    let mut report = SaveReport::default();
    let (mut metadata, cached, sbom) = collect(layers_dir, &mut report)?;
    let mut assembly = Assembly::new("the cache image", staging_parent)?;
    let previous_input = previous.previous_source.map(|s| assembly.add_input(s));
    let previous_blobs = previous.previous_blobs;
    let mut layers: Vec<Descriptor> = Vec::new();
    let mut diff_ids: Vec<String> = Vec::new();
    let mut put = |assembly: &mut Assembly,
                   source: &Path,
                   image_path: &str|
     -> Result<(String, bool), CacheError> {
        let blobs = &previous_blobs;
        let known = previous_input
            .map(|input| move |diff_id: &str| Some((input, blobs.get(diff_id)?.clone())));
        let made = assembly.write_layer_or_reuse(image_path, known, |w| {
            add_layers_dir(w, source, image_path, owner)
        })?;
        let reused = previous_blobs.contains_key(&made.diff_id);
        let (blob, diff_id) = (made.blob, made.diff_id);
        if !diff_ids.contains(&diff_id) {
            layers.push(blob);
            diff_ids.push(diff_id.clone());
        }
        Ok((diff_id, reused))
    };
    for layer in cached {
        let (diff_id, reused) = put(&mut assembly, &layer.source, &layer.image_path)?;
        report.reused += usize::from(reused);
        record(&mut metadata, &mut report, layer, diff_id);
    }
    if let Some(sbom) = &sbom {
        let (diff_id, reused) = put(&mut assembly, sbom, &format!("{LAYERS_DIR}/sbom/cache"))?;
        report.reused += usize::from(reused);
        metadata.sbom.sha = diff_id;
    }
    let mut config = json!({
        "created": NORMALIZED_TIME,
        "architecture": platform.arch,
        "os": platform.os,
        "config": {
            "Labels": {
                CACHE_METADATA_LABEL: serde_json::to_string(&metadata).expect("metadata serializes"),
            },
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(variant) = &platform.variant {
        config["variant"] = json!(variant);
    }
    let manifest = assembly.write_image(&config, &layers)?;
    assembly.set_root(&[(platform.clone(), manifest)])?;
    assembly.write_to(reference, progress)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers_with(root: &Path, content: &str) -> PathBuf {
        let layers = root.join(format!("layers-{content}"));
        let bp = layers.join("acme_deps");
        fs::create_dir_all(bp.join("deps")).unwrap();
        fs::write(bp.join("deps/lib"), content).unwrap();
        fs::write(
            bp.join("deps.toml"),
            "[types]\ncache = true\n[metadata]\nv = 1\n",
        )
        .unwrap();
        fs::create_dir_all(bp.join("gone")).unwrap();
        fs::write(bp.join("gone.toml"), "[types]\nlaunch = true\n").unwrap();
        fs::write(bp.join("kept.toml"), "[types]\ncache = true\n").unwrap();
        fs::write(
            layers.join("group.toml"),
            "[[group]]\nid = \"acme/deps\"\nversion = \"1.2.3\"\napi = \"0.10\"\n",
        )
        .unwrap();
        layers
    }

    #[test]
    fn a_save_replaces_the_committed_cache_whole_and_reuses_unchanged_tars() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        let owner = Owner {
            uid: 1000,
            gid: 1000,
        };
        let first = save_dir(&cache, &layers_with(root.path(), "v1"), owner).unwrap();
        assert_eq!(first.layers, ["acme/deps/deps"]);
        assert_eq!(first.reused, 0);
        assert_eq!(
            first.warnings.len(),
            1,
            "kept has cache = true and no directory"
        );
        let read = read_dir(&cache);
        let json = fs::read_to_string(cache.join("committed").join(CACHE_METADATA_LABEL)).unwrap();
        let sha = read.metadata.layers_of("acme/deps").unwrap()["deps"]
            .sha
            .clone();
        assert_eq!(
            json,
            format!(
                r#"{{"sbom":{{"sha":""}},"buildpacks":[{{"key":"acme/deps","version":"1.2.3","layers":{{"deps":{{"sha":"{sha}","data":{{"v":1}},"build":false,"launch":false,"cache":true}}}}}}]}}"#
            )
        );
        let tar = tar_path(&cache.join("committed"), &sha);
        assert_eq!(
            crate::content::sha256_digest(&fs::read(&tar).unwrap()).to_string(),
            sha,
            "the tar is the layer, uncompressed"
        );

        let again = save_dir(&cache, &layers_with(root.path(), "v1"), owner).unwrap();
        assert_eq!(again.reused, 1);
        let changed = save_dir(&cache, &layers_with(root.path(), "v2"), owner).unwrap();
        assert_eq!(changed.reused, 0);
        let mut names: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["committed"], "no staging or backup is left");
        assert!(!tar.exists(), "the old generation's tar is gone");

        // A save that fails leaves the committed cache as it was.
        let before = read_dir(&cache).metadata;
        let broken = layers_with(root.path(), "v3");
        fs::write(broken.join("acme_deps/zz.toml"), "[types\n").unwrap();
        let err = save_dir(&cache, &broken, owner).unwrap_err();
        assert!(err.to_string().contains("zz.toml"), "{err}");
        assert_eq!(read_dir(&cache).metadata, before);
        assert!(!cache.join(STAGING).exists());
    }
}
