//! An image being made: the blobs lathe writes (layers, configs, manifests, an index) staged in
//! a private directory, and the blobs it takes from input images (a base image's layers, the
//! layers of a previous build) served from those images, never copied. The assembled image is
//! an [`ImageSource`], so [`image::copy_from_source`] writes it to any destination through that
//! destination's sink, which sends only what the destination lacks and makes the image visible
//! only when it is complete. Whole images can be taken from inputs too, their manifests kept
//! byte for byte so an index can name them by digest. `lathe buildpack package`, `lathe
//! builder create`, the export of `lathe build`, `lathe rebase` and `lathe index` all assemble
//! their images here.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, MediaType};
use serde_json::{Value, json};

use crate::content::{self, Kind};
use crate::image::{self, ImageError, ImageSource};
use crate::layer::LayerCompression;
use crate::layer::cnb::CnbLayerWriter;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::{ImageRef, RegistryRef};

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::Io {
        what: what.to_string(),
        source,
    }
}

/// What a layer's entries are written to (a compressor, or a hasher).
pub type LayerWriter<'a> = CnbLayerWriter<&'a mut dyn io::Write>;

/// The diffID of the layer `fill` writes, computed without storing it anywhere.
pub fn layer_diff_id(fill: impl FnOnce(&mut LayerWriter) -> io::Result<()>) -> io::Result<String> {
    let mut sink = io::sink();
    let mut writer = CnbLayerWriter::new(&mut sink as &mut dyn io::Write, LayerCompression::NONE)?;
    fill(&mut writer)?;
    let (written, _) = writer.finish()?;
    Ok(written.diff_id.to_string())
}

/// A layer lathe wrote: its blob and its diffID.
#[derive(Debug, Clone)]
pub struct MadeLayer {
    pub blob: Descriptor,
    pub diff_id: String,
}

pub struct Assembly {
    describe: String,
    dir: tempfile::TempDir,
    /// Digests of the blobs staged in `dir`: those lathe made, and the manifests taken whole
    /// from inputs.
    made: BTreeSet<String>,
    compression: LayerCompression,
    inputs: Vec<Box<dyn ImageSource>>,
    /// Blob digest → the input that serves it.
    origins: HashMap<String, usize>,
    /// The layers staged so far, by diffID.
    made_layers: HashMap<String, MadeLayer>,
    /// Manifests staged so far ([`Assembly::write_image`]).
    images: usize,
    root: Option<Descriptor>,
}

impl Assembly {
    /// An empty image called `describe` in messages, staged in a new directory under `parent`
    /// (the system's temporary directory when `None`).
    pub fn new(describe: &str, parent: Option<&Path>) -> Result<Assembly, ImageError> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("lathe-assembly-");
        let dir = match parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(io_error("creating a staging directory"))?;
        Ok(Assembly {
            describe: describe.to_string(),
            dir,
            made: BTreeSet::new(),
            compression: LayerCompression::default(),
            inputs: Vec::new(),
            origins: HashMap::new(),
            made_layers: HashMap::new(),
            images: 0,
            root: None,
        })
    }

    /// Opens an input image; its blobs can then be served with [`Assembly::take_blob`].
    pub fn open_input(&mut self, reference: &ImageRef) -> Result<usize, ImageError> {
        Ok(self.add_input(image::open_source(reference)?))
    }

    pub fn add_input(&mut self, source: Box<dyn ImageSource>) -> usize {
        self.inputs.push(source);
        self.inputs.len() - 1
    }

    pub fn input(&self, input: usize) -> &dyn ImageSource {
        self.inputs[input].as_ref()
    }

    /// The blob `desc` of input `input` becomes part of the image, served from that input.
    pub fn take_blob(&mut self, input: usize, desc: &Descriptor) {
        self.origins.insert(desc.digest().to_string(), input);
    }

    /// The manifest or index `desc` of input `input` becomes part of the image unchanged, with
    /// everything it names (child manifests, configs, layers), so that an index lathe writes can
    /// name it by its digest. Manifests are read (and verified) once here and kept; configs
    /// and layers are served from the input, or mounted from its repository on a registry.
    /// Returns the manifest's bytes.
    pub fn take_manifest(
        &mut self,
        input: usize,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, ImageError> {
        let source = self.inputs[input].as_ref();
        let what = source.describe();
        let bytes = source.read_blob(desc)?;
        let mut blobs = Vec::new();
        let mut children = Vec::new();
        match content::kind_of(desc.media_type()) {
            Kind::Manifest => {
                let manifest = image::parse_manifest(&bytes, desc, &what)?;
                blobs.push(manifest.config().clone());
                blobs.extend(manifest.layers().iter().cloned());
            }
            Kind::Index => {
                children = image::parse_index(&bytes, desc, &what)?
                    .manifests()
                    .to_vec();
            }
            Kind::Other => {
                return Err(ImageError::Invalid {
                    what,
                    why: format!(
                        "{} is a {}, not an image manifest or index",
                        desc.digest(),
                        desc.media_type()
                    ),
                });
            }
        }
        self.stage_bytes(desc, &bytes)?;
        for blob in &blobs {
            self.take_blob(input, blob);
        }
        for child in &children {
            self.take_manifest(input, child)?;
        }
        Ok(bytes)
    }

    fn path_of(&self, digest: &str) -> PathBuf {
        self.dir
            .path()
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// Stages `value` as canonical JSON.
    pub fn write_json(
        &mut self,
        value: &Value,
        media_type: MediaType,
    ) -> Result<Descriptor, ImageError> {
        let bytes = content::canonical_json(value);
        let desc = Descriptor::new(
            media_type,
            bytes.len() as u64,
            content::sha256_digest(&bytes),
        );
        self.stage_bytes(&desc, &bytes)?;
        Ok(desc)
    }

    /// Stages `bytes`, whose digest `desc` gives (already checked).
    fn stage_bytes(&mut self, desc: &Descriptor, bytes: &[u8]) -> Result<(), ImageError> {
        let key = desc.digest().to_string();
        if !self.made.contains(&key) {
            let path = self.path_of(&key);
            fs::write(&path, bytes).map_err(io_error(path.display()))?;
            self.made.insert(key);
        }
        Ok(())
    }

    /// Stages a layer whose entries `fill` adds, in the lifecycle's tar conventions; `what`
    /// names it in errors.
    pub fn write_layer(
        &mut self,
        what: &str,
        fill: impl FnOnce(&mut LayerWriter) -> io::Result<()>,
    ) -> Result<MadeLayer, ImageError> {
        let tmp = tempfile::NamedTempFile::new_in(self.dir.path())
            .map_err(io_error(self.dir.path().display()))?;
        let written = (|| {
            let mut file: &File = tmp.as_file();
            let mut writer =
                CnbLayerWriter::new(&mut file as &mut dyn io::Write, self.compression)?;
            fill(&mut writer)?;
            writer.finish().map(|(written, _)| written)
        })()
        .map_err(io_error(what))?;
        let blob = Descriptor::new(written.media_type, written.size, written.digest);
        let key = blob.digest().to_string();
        if !self.made.contains(&key) {
            let path = self.path_of(&key);
            tmp.persist(&path)
                .map_err(|e| io_error(path.display())(e.error))?;
            self.made.insert(key);
        }
        let made = MadeLayer {
            blob,
            diff_id: written.diff_id.to_string(),
        };
        self.made_layers.insert(made.diff_id.clone(), made.clone());
        Ok(made)
    }

    /// Like [`Assembly::write_layer`], but when there is a `known` (the blobs an input image
    /// has, by diffID), or when this assembly already holds another image (of another
    /// platform), the layer is first hashed uncompressed, which costs a fraction of compressing
    /// it: a layer staged before with that diffID, or a blob `known` gives for it, is taken and
    /// nothing is compressed. This is how a rebuild reuses the layers of the previous image, as
    /// the lifecycle's exporter does, and how a layer several platforms share becomes one blob
    /// compressed once; for the first image with no previous one nothing is hashed twice.
    pub fn write_layer_or_reuse(
        &mut self,
        what: &str,
        known: Option<impl Fn(&str) -> Option<(usize, Descriptor)>>,
        fill: impl Fn(&mut LayerWriter) -> io::Result<()>,
    ) -> Result<MadeLayer, ImageError> {
        if known.is_some() || self.images > 0 {
            let diff_id = layer_diff_id(&fill).map_err(io_error(what))?;
            if let Some(made) = self.made_layers.get(&diff_id) {
                return Ok(made.clone());
            }
            if let Some((input, blob)) = known.and_then(|known| known(&diff_id)) {
                self.take_blob(input, &blob);
                return Ok(MadeLayer { blob, diff_id });
            }
        }
        self.write_layer(what, fill)
    }

    /// Stages a config and the OCI manifest naming it and `layers`.
    pub fn write_image(
        &mut self,
        config: &Value,
        layers: &[Descriptor],
    ) -> Result<Descriptor, ImageError> {
        let config_desc = self.write_json(config, MediaType::ImageConfig)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layers,
        });
        self.images += 1;
        self.write_json(&manifest, MediaType::ImageManifest)
    }

    /// Sets the image's root: the one manifest, or an OCI index of one per platform.
    pub fn set_root(
        &mut self,
        children: &[(Platform, Descriptor)],
    ) -> Result<Descriptor, ImageError> {
        let root = match children {
            [(_, only)] => only.clone(),
            _ => {
                let manifests: Vec<Descriptor> = children
                    .iter()
                    .map(|(platform, desc)| {
                        let mut desc = desc.clone();
                        desc.set_platform(Some(platform.to_oci()));
                        desc
                    })
                    .collect();
                let index = json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": manifests,
                });
                self.write_json(&index, MediaType::ImageIndex)?
            }
        };
        self.root = Some(root.clone());
        Ok(root)
    }

    /// Sets the image's root to a manifest or index already staged with
    /// [`Assembly::write_json`] (an index lathe wrote itself, with annotations to keep).
    pub fn set_root_descriptor(&mut self, root: Descriptor) {
        self.root = Some(root);
    }

    /// Writes the image to `output` (after [`Assembly::set_root`]).
    pub fn write_to(
        &self,
        output: &ImageRef,
        progress: &Progress,
    ) -> Result<image::CopyReport, ImageError> {
        let options = image::CopyOptions {
            platforms: vec![],
            attachments: false,
        };
        image::copy_from_source(self, output, &options, progress)
    }
}

impl ImageSource for Assembly {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> Descriptor {
        self.root
            .clone()
            .expect("the root is set before the assembled image is read")
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let key = desc.digest().to_string();
        if self.made.contains(&key) {
            let path = self.path_of(&key);
            let file = File::open(&path).map_err(io_error(path.display()))?;
            return Ok(Box::new(content::VerifyingReader::new(
                file,
                desc,
                self.describe(),
            )));
        }
        match self.origins.get(&key) {
            Some(&input) => self.inputs[input].open_blob(desc),
            None => Err(ImageError::Invalid {
                what: self.describe(),
                why: format!("blob {key} was neither made nor found in an input image"),
            }),
        }
    }

    /// A blob taken from an input image in a registry can be mounted from that image's
    /// repository; a blob lathe made has to be sent.
    fn blob_location(&self, desc: &Descriptor) -> Option<&RegistryRef> {
        let key = desc.digest().to_string();
        if self.made.contains(&key) {
            return None;
        }
        let input = *self.origins.get(&key)?;
        self.inputs[input].blob_location(desc)
    }
}
