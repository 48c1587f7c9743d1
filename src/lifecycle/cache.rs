//! The build cache in a directory (`--cache-dir`): the `cache = true` layers of the last
//! build, restored before the next build as the reference restorer does (contents and
//! `[metadata]`, never `[types]`, so a buildpack must re-declare a layer to keep it), and
//! saved after it.
//!
//! A save writes a whole new generation (`gen-<n>/`) and then swaps the `current` symlink
//! with one rename, so an interrupted or failed save leaves the previous cache as it was.
//! Layout of a generation: `<escaped buildpack id>/<layer>/` (the tree), `<layer>.toml` (its
//! metadata and types as the buildpack left them) and `<layer>.sbom.<ext>`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::descriptor::Buildpack;
use super::launch::{LayerFile, read_layer_files};
use super::{LifecycleError, escape_id};

const CURRENT: &str = "current";

fn error(path: &Path, e: impl std::fmt::Display) -> LifecycleError {
    LifecycleError::Build(format!("cache {}: {e}", path.display()))
}

/// Restores every cached layer of the group's buildpacks into `layers`; returns the restored
/// layers as `id/layer`. A cache that is missing or empty restores nothing.
pub fn restore(
    cache: &Path,
    group: &[Buildpack],
    layers: &Path,
) -> Result<Vec<String>, LifecycleError> {
    let generation = cache.join(CURRENT);
    if !generation.exists() {
        return Ok(Vec::new());
    }
    let mut restored = Vec::new();
    for buildpack in group {
        let escaped = escape_id(&buildpack.id);
        let cached = generation.join(&escaped);
        for LayerFile { name, layer, .. } in layer_files(&cached)? {
            if !layer.types.cache {
                continue;
            }
            let into = layers.join(&escaped);
            fs::create_dir_all(&into).map_err(|e| error(&into, e))?;
            copy_tree(&cached.join(&name), &into.join(&name))?;
            let mut metadata_only = toml::Table::new();
            if !layer.metadata.is_empty() {
                metadata_only.insert("metadata".into(), layer.metadata.into());
            }
            let toml_path = into.join(format!("{name}.toml"));
            fs::write(
                &toml_path,
                toml::to_string(&metadata_only).unwrap_or_default(),
            )
            .map_err(|e| error(&toml_path, e))?;
            for sbom in sbom_files(&cached, &name)? {
                let to = into.join(sbom.file_name().expect("a file"));
                fs::copy(&sbom, &to).map_err(|e| error(&sbom, e))?;
            }
            restored.push(format!("{}/{name}", buildpack.id));
        }
    }
    Ok(restored)
}

/// Saves the group's `cache = true` layers from `layers` as the cache's new generation;
/// returns the saved layers as `id/layer`.
pub fn save(
    cache: &Path,
    group: &[Buildpack],
    layers: &Path,
) -> Result<Vec<String>, LifecycleError> {
    let previous = fs::read_link(cache.join(CURRENT)).ok();
    let number = previous
        .as_ref()
        .and_then(|p| p.to_str()?.strip_prefix("gen-")?.parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let name = format!("gen-{number}");
    let generation = cache.join(&name);
    if generation.exists() {
        remove(&generation)?; // left by an interrupted save
    }
    fs::create_dir(&generation).map_err(|e| error(&generation, e))?;
    let mut saved = Vec::new();
    let written = (|| {
        for buildpack in group {
            let escaped = escape_id(&buildpack.id);
            let from = layers.join(&escaped);
            for LayerFile {
                name: layer, path, ..
            } in layer_files(&from)?
                .into_iter()
                .filter(|file| file.layer.types.cache)
            {
                if !from.join(&layer).is_dir() {
                    continue;
                }
                let into = generation.join(&escaped);
                fs::create_dir_all(&into).map_err(|e| error(&into, e))?;
                copy_tree(&from.join(&layer), &into.join(&layer))?;
                fs::copy(&path, into.join(format!("{layer}.toml"))).map_err(|e| error(&path, e))?;
                for sbom in sbom_files(&from, &layer)? {
                    fs::copy(&sbom, into.join(sbom.file_name().expect("a file")))
                        .map_err(|e| error(&sbom, e))?;
                }
                saved.push(format!("{}/{layer}", buildpack.id));
            }
        }
        // The new generation becomes current in one rename.
        let link = cache.join(format!(".{CURRENT}-{number}"));
        let _ = fs::remove_file(&link);
        symlink(&name, &link).map_err(|e| error(&link, e))?;
        fs::rename(&link, cache.join(CURRENT)).map_err(|e| error(cache, e))
    })();
    if let Err(e) = written {
        let _ = remove(&generation);
        return Err(e);
    }
    if let Some(previous) = previous {
        let _ = remove(&cache.join(previous));
    }
    Ok(saved)
}

fn layer_files(dir: &Path) -> Result<Vec<LayerFile>, LifecycleError> {
    read_layer_files(dir).map_err(|(path, why)| error(&path, why))
}

fn sbom_files(dir: &Path, layer: &str) -> Result<Vec<PathBuf>, LifecycleError> {
    let prefix = format!("{layer}.sbom.");
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| error(dir, e))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Copies a layer's tree (modes, symlinks as links, mtimes; fifos and sockets left out),
/// replacing what `to` held.
fn copy_tree(from: &Path, to: &Path) -> Result<(), LifecycleError> {
    if to.exists() {
        remove(to)?;
    }
    crate::project::copy_app(from, to, None)
        .map(|_| ())
        .map_err(|e| error(from, e))
}

fn remove(path: &Path) -> Result<(), LifecycleError> {
    crate::layout::remove_tree(path).map_err(|e| error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn buildpack(id: &str) -> Buildpack {
        super::super::descriptor::parse(
            &format!("api = \"0.10\"\n[buildpack]\nid = \"{id}\"\nversion = \"1.0.0\"\n"),
            Path::new("/nowhere"),
        )
        .unwrap()
    }

    fn layer(layers: &Path, bp: &str, name: &str, types: &str, file: &str) {
        let dir = layers.join(bp).join(name);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/tool"), file).unwrap();
        fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o750)).unwrap();
        symlink("bin/tool", dir.join("link")).unwrap();
        fs::write(
            layers.join(bp).join(format!("{name}.toml")),
            format!("[types]\n{types}\n[metadata]\nversion = \"{file}\"\n"),
        )
        .unwrap();
    }

    #[test]
    fn cache_layers_round_trip_with_metadata_only_and_others_are_left_out() {
        let root = tempfile::tempdir().unwrap();
        let (cache, first, second) = (
            root.path().join("cache"),
            root.path().join("first"),
            root.path().join("second"),
        );
        fs::create_dir_all(&cache).unwrap();
        let group = [buildpack("acme/deps")];
        layer(
            &first,
            "acme_deps",
            "deps",
            "cache = true\nbuild = true",
            "v1",
        );
        layer(&first, "acme_deps", "web", "launch = true", "w");
        fs::write(first.join("acme_deps/deps.sbom.cdx.json"), "{}").unwrap();
        fs::write(first.join("acme_deps/launch.toml"), "").unwrap();
        assert_eq!(save(&cache, &group, &first).unwrap(), ["acme/deps/deps"]);

        assert_eq!(
            restore(&cache, &group, &second).unwrap(),
            ["acme/deps/deps"]
        );
        let restored = second.join("acme_deps");
        assert_eq!(
            fs::read_to_string(restored.join("deps/bin/tool")).unwrap(),
            "v1"
        );
        let mode = fs::metadata(restored.join("deps/bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(
            fs::read_link(restored.join("deps/link")).unwrap(),
            Path::new("bin/tool")
        );
        assert_eq!(
            fs::read_to_string(restored.join("deps.toml")).unwrap(),
            "[metadata]\nversion = \"v1\"\n",
            "restored metadata never carries [types]"
        );
        assert!(restored.join("deps.sbom.cdx.json").is_file());
        assert!(
            !restored.join("web").exists(),
            "launch-only layers are not cached"
        );
        assert!(
            restore(&cache, &[buildpack("other/bp")], &root.path().join("x"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_save_replaces_the_generation_whole() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        fs::create_dir_all(&cache).unwrap();
        let group = [buildpack("acme/deps")];
        let layers = root.path().join("layers");
        layer(&layers, "acme_deps", "deps", "cache = true", "v1");
        save(&cache, &group, &layers).unwrap();
        assert_eq!(
            fs::read_link(cache.join(CURRENT)).unwrap(),
            Path::new("gen-1")
        );
        fs::write(layers.join("acme_deps/deps/bin/tool"), "v2").unwrap();
        save(&cache, &group, &layers).unwrap();
        assert_eq!(
            fs::read_link(cache.join(CURRENT)).unwrap(),
            Path::new("gen-2")
        );
        assert!(
            !cache.join("gen-1").exists(),
            "the old generation is removed"
        );
        let names: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // A save that fails part-way leaves the current generation as it was.
        fs::write(layers.join("acme_deps/zz-broken.toml"), "[types\n").unwrap();
        let err = save(&cache, &group, &layers).unwrap_err();
        assert!(err.to_string().contains("zz-broken.toml"), "{err}");
        assert_eq!(
            fs::read_link(cache.join(CURRENT)).unwrap(),
            Path::new("gen-2")
        );
        assert!(!cache.join("gen-3").exists());
        fs::remove_file(layers.join("acme_deps/zz-broken.toml")).unwrap();
        let out = root.path().join("out");
        restore(&cache, &group, &out).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("acme_deps/deps/bin/tool")).unwrap(),
            "v2"
        );
    }
}
