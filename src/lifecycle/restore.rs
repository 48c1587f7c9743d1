//! The restorer: after detection and before the build, the group's buildpacks get back what
//! the previous image and the cache say they made last time, by the reference lifecycle's rules
//! (its `restorer` and layer metadata restorer; cnb-spec-digest §1.5 and §2.5):
//!
//! - `store.toml` from the previous image's label;
//! - `<layer>.toml` with `[metadata]` only (never `[types]`: a buildpack that wants to keep a
//!   layer declares it again) for the previous image's `launch = true` layers, except
//!   `build = true, cache = false` ones (always rebuilt) and `cache = true` ones the cache
//!   lacks; and for the cache's `cache = true, launch = false` layers;
//! - the contents of each restored `cache = true` layer, from the cache's `<diffID>.tar`, when
//!   the diffID the metadata came with is the cache's; otherwise the layer is removed (stale);
//! - the cache's layer SBOMs (`<layers>/sbom/cache/<bp>/<layer>/sbom.<ext>`) beside their
//!   layers as `<layer>.sbom.<ext>`.
//!
//! It runs in the build container (the host read the previous image's label and fetched the
//! cache's tars; see [`crate::cache`]). A cached tar that is missing or fails its diffID check
//! is a warning and a rebuilt layer, never a failed build.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::descriptor::Buildpack;
use super::{LifecycleError, escape_id};
use crate::cache::{CacheMetadata, tar_path};
use crate::export::{LayerMetadata, LifecycleMetadata};

/// What the restorer reads, prepared by the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInput {
    /// The previous image's `io.buildpacks.lifecycle.metadata` (empty without one).
    pub previous: LifecycleMetadata,
    /// The cache's metadata (empty without a cache, or with `--clear-cache`).
    pub cache: CacheMetadata,
    /// The directory, as the build container sees it, holding the cache's `<diffID>.tar`.
    pub cache_tars: Option<PathBuf>,
}

fn error(path: &Path, e: impl std::fmt::Display) -> LifecycleError {
    LifecycleError::Build(format!("restoring {}: {e}", path.display()))
}

/// Restores into `layers` for `group`; returns the lines to show (what was restored, what was
/// stale, what could not be read).
pub fn restore(
    layers: &Path,
    group: &[Buildpack],
    input: &RestoreInput,
) -> Result<Vec<String>, LifecycleError> {
    let mut log = Vec::new();
    let empty = BTreeMap::new();
    for buildpack in group {
        let previous = input
            .previous
            .buildpacks
            .iter()
            .find(|bp| bp.key == buildpack.id);
        let cached = input.cache.layers_of(&buildpack.id).unwrap_or(&empty);
        let dir = layers.join(escape_id(&buildpack.id));
        if let Some(store) = previous.and_then(|bp| bp.store.as_ref()) {
            fs::create_dir_all(&dir).map_err(|e| error(&dir, e))?;
            let mut table = toml::Table::new();
            if let Ok(toml::Value::Table(metadata)) = toml_value(&store.metadata) {
                table.insert("metadata".into(), toml::Value::Table(metadata));
            }
            write_toml(&dir.join("store.toml"), &table)?;
        }

        // The diffID each restored layer's metadata came with.
        let mut restored: Vec<(String, String)> = Vec::new();
        for (name, layer) in previous.map_or(&empty, |bp| &bp.layers) {
            if !layer.launch || (layer.build && !layer.cache) {
                continue;
            }
            if layer.cache && !cached.get(name).is_some_and(|c| c.cache) {
                continue;
            }
            write_layer_metadata(&dir, name, layer)?;
            log.push(format!(
                "Restoring metadata for \"{}:{name}\" from app image",
                buildpack.id
            ));
            restored.push((name.clone(), layer.sha.clone()));
        }
        for (name, layer) in cached {
            if !layer.cache || layer.launch {
                continue;
            }
            write_layer_metadata(&dir, name, layer)?;
            log.push(format!(
                "Restoring metadata for \"{}:{name}\" from cache",
                buildpack.id
            ));
            restored.push((name.clone(), layer.sha.clone()));
        }

        for (name, sha) in restored {
            let Some(cache_layer) = cached.get(&name).filter(|c| c.cache) else {
                continue;
            };
            let identifier = format!("{}:{name}", buildpack.id);
            if sha != cache_layer.sha {
                log.push(format!("Removing \"{identifier}\", wrong sha"));
                remove_layer(&dir, &name)?;
                continue;
            }
            match extract_layer(layers, input.cache_tars.as_deref(), &dir, &name, &sha) {
                Ok(()) => log.push(format!("Restoring data for \"{identifier}\" from cache")),
                Err(why) => {
                    log.push(format!(
                        "warning: skipping restore for layer {identifier}: {why}; the \
                         buildpack rebuilds it"
                    ));
                    remove_layer(&dir, &name)?;
                }
            }
        }
    }
    if !input.cache.sbom.sha.is_empty() {
        match restore_sboms(layers, input, group) {
            Ok(()) => log.push("Restoring data for SBOM from cache".into()),
            Err(why) => log.push(format!("warning: cache SBOMs not restored: {why}")),
        }
    }
    Ok(log)
}

fn toml_value(value: &serde_json::Value) -> Result<toml::Value, String> {
    toml::Value::try_from(value).map_err(|e| e.to_string())
}

fn write_toml(path: &Path, table: &toml::Table) -> Result<(), LifecycleError> {
    let text = toml::to_string(table).map_err(|e| error(path, e))?;
    fs::write(path, text).map_err(|e| error(path, e))
}

/// `<layer>.toml` with the layer's `[metadata]` only.
fn write_layer_metadata(
    dir: &Path,
    name: &str,
    layer: &LayerMetadata,
) -> Result<(), LifecycleError> {
    fs::create_dir_all(dir).map_err(|e| error(dir, e))?;
    let mut table = toml::Table::new();
    match toml_value(&layer.data) {
        Ok(toml::Value::Table(metadata)) if !metadata.is_empty() => {
            table.insert("metadata".into(), toml::Value::Table(metadata));
        }
        _ => {}
    }
    write_toml(&dir.join(format!("{name}.toml")), &table)
}

fn remove_layer(dir: &Path, name: &str) -> Result<(), LifecycleError> {
    let tree = dir.join(name);
    if tree.exists() {
        crate::layout::remove_tree(&tree).map_err(|e| error(&tree, e))?;
    }
    let toml = dir.join(format!("{name}.toml"));
    match fs::remove_file(&toml) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(&toml, e)),
        _ => Ok(()),
    }
}

/// Extracts the cached tar `<diffID>.tar` (entries `/layers/<bp>/<layer>/…`) into a private
/// directory beside the layers, then moves the layer into place.
fn extract_layer(
    layers: &Path,
    tars: Option<&Path>,
    dir: &Path,
    name: &str,
    diff_id: &str,
) -> Result<(), String> {
    let (root, file) = open_tar(layers, tars, diff_id)?;
    let buildpack_dir = dir.file_name().expect("a buildpack dir");
    let extracted = root.path().join("layers").join(buildpack_dir).join(name);
    crate::unpack::extract_tar(
        file,
        root.path(),
        &format!("cached layer {diff_id}"),
        diff_id,
    )
    .map_err(|e| e.to_string())?;
    if !extracted.is_dir() {
        return Err(format!(
            "the cached tar {diff_id} has no /layers/{}/{name}",
            buildpack_dir.to_string_lossy()
        ));
    }
    let target = dir.join(name);
    if target.exists() {
        crate::layout::remove_tree(&target).map_err(|e| e.to_string())?;
    }
    fs::rename(&extracted, &target).map_err(|e| format!("{}: {e}", target.display()))
}

/// The cached tar for `diff_id`, and an empty directory under `layers` to extract it into.
fn open_tar(
    layers: &Path,
    tars: Option<&Path>,
    diff_id: &str,
) -> Result<(tempfile::TempDir, fs::File), String> {
    let tars = tars.ok_or("the cache has no layer tars")?;
    let path = tar_path(tars, diff_id);
    let file = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let root = tempfile::Builder::new()
        .prefix(".restoring-")
        .tempdir_in(layers)
        .map_err(|e| format!("{}: {e}", layers.display()))?;
    Ok((root, file))
}

/// The cache SBOM layer's `sbom/cache/<bp>/<layer>/sbom.<ext>` files become
/// `<layers>/<bp>/<layer>.sbom.<ext>` for the group's layers that were restored.
fn restore_sboms(layers: &Path, input: &RestoreInput, group: &[Buildpack]) -> Result<(), String> {
    let diff_id = &input.cache.sbom.sha;
    let (root, file) = open_tar(layers, input.cache_tars.as_deref(), diff_id)?;
    crate::unpack::extract_tar(file, root.path(), "the cache SBOM layer", diff_id)
        .map_err(|e| e.to_string())?;
    let sboms = root.path().join("layers/sbom/cache");
    for buildpack in group {
        let escaped = escape_id(&buildpack.id);
        let Ok(entries) = fs::read_dir(sboms.join(&escaped)) else {
            continue;
        };
        for entry in entries.flatten() {
            let layer = entry.file_name().to_string_lossy().into_owned();
            let into = layers.join(&escaped);
            if !into.join(format!("{layer}.toml")).is_file() {
                continue; // not restored, or removed as stale
            }
            for sbom in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                let file_name = sbom.file_name().to_string_lossy().into_owned();
                let Some(extension) = file_name.strip_prefix("sbom.") else {
                    continue;
                };
                let to = into.join(format!("{layer}.sbom.{extension}"));
                fs::copy(sbom.path(), &to).map_err(|e| format!("{}: {e}", to.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::BuildpackLayers;
    use crate::layer::cnb::Owner;

    fn buildpack(id: &str) -> Buildpack {
        super::super::descriptor::parse(
            &format!("api = \"0.10\"\n[buildpack]\nid = \"{id}\"\nversion = \"1.0.0\"\n"),
            Path::new("/nowhere"),
        )
        .unwrap()
    }

    fn layer(layers: &Path, name: &str, types: &str, content: &str) {
        let dir = layers.join("acme_deps").join(name);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/tool"), content).unwrap();
        fs::write(
            layers.join("acme_deps").join(format!("{name}.toml")),
            format!("[types]\n{types}\n[metadata]\nversion = \"{content}\"\n"),
        )
        .unwrap();
    }

    /// The layers dir of a first build of `acme/deps` (with group.toml), and where its cache
    /// and a second build go.
    fn first_build(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let first = root.join("first");
        fs::create_dir_all(first.join("acme_deps")).unwrap();
        fs::write(
            first.join("group.toml"),
            "[[group]]\nid = \"acme/deps\"\nversion = \"1.0.0\"\napi = \"0.10\"\n",
        )
        .unwrap();
        (first, root.join("cache"), root.join("second"))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn restores_by_the_lifecycles_matrix() {
        let root = tempfile::tempdir().unwrap();
        let (first, cache_dir, second) = first_build(root.path());
        layer(&first, "cached", "cache = true\nbuild = true", "c1");
        layer(&first, "both", "cache = true\nlaunch = true", "b1");
        layer(&first, "stale", "cache = true\nlaunch = true", "s1");
        let owner = Owner {
            uid: 1000,
            gid: 1000,
        };
        crate::cache::save_dir(&cache_dir, &first, owner).unwrap();
        let read = crate::cache::read_dir(&cache_dir);
        let cached = read.metadata.layers_of("acme/deps").unwrap().clone();
        assert_eq!(
            cached.keys().collect::<Vec<_>>(),
            ["both", "cached", "stale"]
        );

        let launch = |sha: &str, build: bool, cache: bool, version: &str| LayerMetadata {
            sha: sha.into(),
            data: serde_json::json!({ "version": version }),
            build,
            launch: true,
            cache,
        };
        let mut previous_layers = BTreeMap::new();
        previous_layers.insert("launchonly".into(), launch("sha256:aa", false, false, "l1"));
        previous_layers.insert("buildlaunch".into(), launch("sha256:bb", true, false, "x"));
        previous_layers.insert(
            "both".into(),
            launch(&cached["both"].sha, false, true, "b1"),
        );
        previous_layers.insert("stale".into(), launch("sha256:old", false, true, "s0"));
        let input = RestoreInput {
            previous: LifecycleMetadata {
                buildpacks: vec![BuildpackLayers {
                    key: "acme/deps".into(),
                    version: "0.9.0".into(),
                    layers: previous_layers,
                    store: Some(crate::export::StoreMetadata {
                        metadata: serde_json::json!({"runs": 3}),
                    }),
                }],
                ..Default::default()
            },
            cache: read.metadata.clone(),
            cache_tars: read.tars.clone(),
        };
        fs::create_dir_all(&second).unwrap();
        let log = restore(&second, &[buildpack("acme/deps")], &input).unwrap();
        let restored = second.join("acme_deps");
        assert_eq!(
            names(&restored),
            [
                "both",
                "both.toml",
                "cached",
                "cached.toml",
                "launchonly.toml",
                "store.toml"
            ],
            "{log:?}"
        );
        assert_eq!(
            fs::read_to_string(restored.join("cached/bin/tool")).unwrap(),
            "c1"
        );
        assert_eq!(
            fs::read_to_string(restored.join("both/bin/tool")).unwrap(),
            "b1"
        );
        assert_eq!(
            fs::read_to_string(restored.join("launchonly.toml")).unwrap(),
            "[metadata]\nversion = \"l1\"\n",
            "metadata only, never [types]"
        );
        assert_eq!(
            fs::read_to_string(restored.join("store.toml")).unwrap(),
            "[metadata]\nruns = 3\n"
        );
        assert!(
            log.iter()
                .any(|l| l == "Removing \"acme/deps:stale\", wrong sha"),
            "{log:?}"
        );
        assert!(
            names(&second).iter().all(|n| !n.starts_with(".restoring")),
            "no extraction directory is left behind"
        );

        // Buildpacks outside the group get nothing.
        let other = root.path().join("other");
        fs::create_dir_all(&other).unwrap();
        restore(&other, &[buildpack("other/bp")], &input).unwrap();
        assert!(names(&other).is_empty());
    }

    #[test]
    fn a_missing_tar_is_a_warning_and_a_rebuilt_layer() {
        let root = tempfile::tempdir().unwrap();
        let (first, cache_dir, second) = first_build(root.path());
        layer(&first, "cached", "cache = true", "c1");
        crate::cache::save_dir(&cache_dir, &first, Owner { uid: 0, gid: 0 }).unwrap();
        let read = crate::cache::read_dir(&cache_dir);
        let sha = &read.metadata.layers_of("acme/deps").unwrap()["cached"].sha;
        fs::remove_file(crate::cache::tar_path(read.tars.as_ref().unwrap(), sha)).unwrap();
        fs::create_dir_all(&second).unwrap();
        let input = RestoreInput {
            cache: read.metadata.clone(),
            cache_tars: read.tars.clone(),
            ..Default::default()
        };
        let log = restore(&second, &[buildpack("acme/deps")], &input).unwrap();
        assert!(
            log.iter()
                .any(|l| l.starts_with("warning: skipping restore for layer acme/deps:cached")),
            "{log:?}"
        );
        assert!(names(&second.join("acme_deps")).is_empty());
    }
}
