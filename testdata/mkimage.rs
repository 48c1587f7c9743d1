//! Test-fixture tool: builds a multi-platform OCI image index from directory trees, one
//! deterministic layer per directory (gzip unless --compression says otherwise, written
//! --jobs at a time), into an OCI layout. Used by
//! testdata/make-base-images.sh; not part of lathe's command line.
//!
//! mkimage --output oci:DIR:REF [--chown PATH=UID:GID ...] [--compression C] [--jobs N]
//!         --image OS/ARCH --config CONFIG.json --layer DIR [--layer DIR ...] [--image ...]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use lathe::content::canonical_json;
use lathe::layer::{LayerCompression, Ownership, write_dir_layers};
use lathe::layout::{Transaction, refs_for};
use lathe::platform::Platform;
use lathe::reference::ImageRef;
use oci_spec::image::{Descriptor, MediaType};
use serde_json::{Value, json};

const CREATED: &str = "1980-01-01T00:00:01Z";

struct ImageSpec {
    platform: Platform,
    config: Option<PathBuf>,
    layers: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut output = None;
    let mut owners = Ownership::default();
    let mut images: Vec<ImageSpec> = Vec::new();
    let mut compression = LayerCompression::default();
    let mut jobs = 1;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--output" => output = Some(value.parse::<ImageRef>()?),
            "--chown" => {
                let (path, ids) = value
                    .split_once('=')
                    .context("--chown takes PATH=UID:GID")?;
                let (uid, gid) = ids.split_once(':').context("--chown takes PATH=UID:GID")?;
                owners.add(path, uid.parse()?, gid.parse()?);
            }
            "--compression" => compression = value.parse().map_err(anyhow::Error::msg)?,
            "--jobs" => jobs = value.parse().context("--jobs takes a number")?,
            "--image" => images.push(ImageSpec {
                platform: value.parse()?,
                config: None,
                layers: vec![],
            }),
            "--config" => {
                images.last_mut().context("--config before --image")?.config = Some(value.into())
            }
            "--layer" => images
                .last_mut()
                .context("--layer before --image")?
                .layers
                .push(value.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    let Some(ImageRef::Layout { dir, name }) = output else {
        bail!("--output oci:DIR:REF is required")
    };
    let name = name.unwrap_or_else(|| "latest".into());

    let mut tx = Transaction::begin(&dir)?;
    let mut children = Vec::new();
    for image in &images {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        let writers = image
            .layers
            .iter()
            .map(|dir| Ok((dir.clone(), tx.blob_writer()?)))
            .collect::<Result<Vec<_>>>()?;
        for (dir, (layer, writer)) in
            image
                .layers
                .iter()
                .zip(write_dir_layers(writers, &owners, compression, jobs)?)
        {
            writer.finish(&mut tx)?;
            layers.push(Descriptor::new(layer.media_type, layer.size, layer.digest));
            diff_ids.push(layer.diff_id.to_string());
            let base = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            history.push(
                json!({"created": CREATED, "created_by": format!("lathe testdata: {base} layer")}),
            );
        }
        let user_config: Value = match &image.config {
            Some(path) => serde_json::from_slice(
                &std::fs::read(path).with_context(|| path.display().to_string())?,
            )?,
            None => json!({}),
        };
        let mut config = json!({
            "architecture": image.platform.arch,
            "os": image.platform.os,
            "created": CREATED,
            "config": user_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if let Some(v) = image.platform.oci_variant() {
            config["variant"] = json!(v);
        }
        let config_desc = tx.write_bytes(&canonical_json(&config), MediaType::ImageConfig)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layers,
        });
        let mut manifest_desc =
            tx.write_bytes(&canonical_json(&manifest), MediaType::ImageManifest)?;
        manifest_desc.set_platform(Some(image.platform.to_oci()));
        children.push((image.platform.clone(), manifest_desc));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": children.iter().map(|(_, d)| d).collect::<Vec<_>>(),
    });
    let index_desc = tx.write_bytes(&canonical_json(&index), MediaType::ImageIndex)?;
    tx.commit(&refs_for(&name, &index_desc, &children))?;
    println!("{name} {}", index_desc.digest());
    Ok(())
}
