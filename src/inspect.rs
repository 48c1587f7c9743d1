//! `lathe inspect`: what an image or index holds (platforms, layers, config, CNB labels), as
//! text for people or JSON for programs, read through any [`ImageSource`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use oci_spec::image::Descriptor;
use serde::Serialize;
use serde_json::Value;

use crate::content::{self, Kind};
use crate::image::{self, ImageError, ImageSource, Selection};
use crate::platform::Platform;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub reference: String,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub images: Vec<ImageReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    pub platform: Option<String>,
    pub digest: String,
    pub media_type: String,
    pub config: ConfigReport,
    pub layers: Vec<LayerReport>,
    /// Labels whose names start with `io.buildpacks.`, with JSON object and array values parsed.
    pub cnb_labels: BTreeMap<String, Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigReport {
    pub digest: String,
    pub os: Option<String>,
    pub architecture: Option<String>,
    pub variant: Option<String>,
    pub created: Option<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerReport {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub diff_id: Option<String>,
}

fn resolve(
    source: &dyn ImageSource,
    platforms: &[Platform],
) -> Result<image::Resolved, ImageError> {
    let selection = Selection {
        platforms: platforms.to_vec(),
        single_image: false,
    };
    image::resolve_selection(source, &selection)
}

/// The raw bytes of the manifest or index the reference (and platform) names.
pub fn raw(source: &dyn ImageSource, platforms: &[Platform]) -> Result<Vec<u8>, ImageError> {
    let resolved = resolve(source, platforms)?;
    match resolved.new_root_bytes {
        Some(bytes) => Ok(bytes),
        None => source.read_blob(&resolved.root),
    }
}

pub fn inspect(source: &dyn ImageSource, platforms: &[Platform]) -> Result<Report, ImageError> {
    let resolved = resolve(source, platforms)?;
    let root = &resolved.root;
    let mut images = Vec::new();
    if content::kind_of(root.media_type()) == Kind::Index {
        let bytes = match &resolved.new_root_bytes {
            Some(b) => b.clone(),
            None => source.read_blob(root)?,
        };
        let index = image::parse_index(&bytes, root, &source.describe())?;
        for child in index.manifests() {
            if content::kind_of(child.media_type()) == Kind::Manifest {
                let platform = child
                    .platform()
                    .as_ref()
                    .map(|p| Platform::from_oci(p).to_string());
                images.push(inspect_manifest(source, child, platform)?);
            }
        }
    } else {
        images.push(inspect_manifest(source, root, None)?);
    }
    Ok(Report {
        reference: source.describe(),
        digest: root.digest().to_string(),
        media_type: root.media_type().to_string(),
        size: root.size(),
        images,
    })
}

fn inspect_manifest(
    source: &dyn ImageSource,
    desc: &Descriptor,
    platform: Option<String>,
) -> Result<ImageReport, ImageError> {
    let manifest = image::parse_manifest(&source.read_blob(desc)?, desc, &source.describe())?;
    let config_bytes = source.read_blob(manifest.config())?;
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Invalid {
        what: source.describe(),
        why: format!(
            "config {} is not valid JSON: {e}",
            manifest.config().digest()
        ),
    })?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let list = |v: &Value| {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
    };
    let c = &config["config"];
    let labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let cnb_labels = labels
        .iter()
        .filter(|(k, _)| k.starts_with("io.buildpacks."))
        .map(|(k, v)| {
            let structured = v.starts_with('{') || v.starts_with('[');
            let parsed = structured.then(|| serde_json::from_str(v).ok()).flatten();
            (
                k.clone(),
                parsed.unwrap_or_else(|| Value::String(v.clone())),
            )
        })
        .collect();
    let diff_ids = list(&config["rootfs"]["diff_ids"]).unwrap_or_default();
    let layers = manifest
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| LayerReport {
            digest: l.digest().to_string(),
            size: l.size(),
            media_type: l.media_type().to_string(),
            diff_id: diff_ids.get(i).cloned(),
        })
        .collect();
    let platform =
        platform.or_else(|| image::config_platform(&config_bytes).map(|p| p.to_string()));
    Ok(ImageReport {
        platform,
        digest: desc.digest().to_string(),
        media_type: desc.media_type().to_string(),
        config: ConfigReport {
            digest: manifest.config().digest().to_string(),
            os: text(&config["os"]),
            architecture: text(&config["architecture"]),
            variant: text(&config["variant"]),
            created: text(&config["created"]),
            user: text(&c["User"]),
            working_dir: text(&c["WorkingDir"]),
            env: list(&c["Env"]).unwrap_or_default(),
            entrypoint: list(&c["Entrypoint"]),
            cmd: list(&c["Cmd"]),
            labels,
            diff_ids,
        },
        layers,
        cnb_labels,
    })
}

/// The report as text for a terminal.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Reference:  {}", report.reference);
    let _ = writeln!(out, "Digest:     {}", report.digest);
    let _ = writeln!(out, "Media type: {}", report.media_type);
    if content::kind_of(&report.media_type.as_str().into()) == Kind::Index {
        let _ = writeln!(out, "Platforms:");
        for img in &report.images {
            let _ = writeln!(
                out,
                "  {:<16} {}",
                img.platform.as_deref().unwrap_or("?"),
                img.digest
            );
        }
    }
    for img in &report.images {
        let c = &img.config;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Image {} ({})",
            img.platform.as_deref().unwrap_or("?"),
            img.digest
        );
        let _ = writeln!(out, "  Config:      {}", c.digest);
        for (k, v) in [
            ("Created", &c.created),
            ("User", &c.user),
            ("WorkingDir", &c.working_dir),
        ] {
            if let Some(v) = v {
                let _ = writeln!(out, "  {:<12} {v}", format!("{k}:"));
            }
        }
        for (k, v) in [("Entrypoint", &c.entrypoint), ("Cmd", &c.cmd)] {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "  {:<12} {}",
                    format!("{k}:"),
                    serde_json::to_string(v).unwrap_or_default()
                );
            }
        }
        if !c.env.is_empty() {
            let _ = writeln!(out, "  Env:");
            for e in &c.env {
                let _ = writeln!(out, "    {e}");
            }
        }
        let _ = writeln!(out, "  Layers ({}):", img.layers.len());
        for l in &img.layers {
            let _ = writeln!(
                out,
                "    {}  {:>10}  {}",
                l.digest,
                human_size(l.size),
                l.media_type
            );
        }
        if !img.cnb_labels.is_empty() {
            let _ = writeln!(out, "  Buildpacks labels:");
            for (k, v) in &img.cnb_labels {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(out, "    {k} = {v}");
            }
        }
        let other: Vec<_> = c
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("io.buildpacks."))
            .collect();
        if !other.is_empty() {
            let _ = writeln!(out, "  Labels:");
            for (k, v) in other {
                let _ = writeln!(out, "    {k} = {v}");
            }
        }
    }
    out
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
