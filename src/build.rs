//! `lathe build`, the host's side: reads the builder (or a build image and buildpack
//! directories), unpacks it into the store, prepares the work area (a copy of the app,
//! `/layers`, `/platform`), runs the lifecycle (detect, build) rooted in the build image — in
//! the sandbox, or with `--sandbox none` in this very process when lathe runs inside the
//! builder image — and reads back what it wrote, then exports the app image onto the run image
//! ([`crate::export`]) and writes it to `--output` and every `--tag`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde_json::Value;

use crate::cache::{self, CacheLocation, CacheRead, SaveReport};
use crate::export::{LIFECYCLE_METADATA_LABEL, LifecycleMetadata, PreviousImage};
use crate::image::{self, ImageError, ImageSource};
use crate::lifecycle::descriptor::{self, OrderEntry};
use crate::lifecycle::phase::PhaseRequest;
use crate::lifecycle::restore::RestoreInput;
use crate::lifecycle::{self, Distro, GroupFile, GroupMember, Paths, TargetData, escape_id};
use crate::platform::Platform;
use crate::progress::ByteProgress;
use crate::project::{self, Project};
use crate::reference::ImageRef;
use crate::run::{self, RunError, SandboxMode};
use crate::sandbox::{self, Bind, Emulator, Network, RunControl, SandboxSpec};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The user's arguments are at fault (exit code 3).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Run(#[from] RunError),
    /// The lifecycle failed; `code` is the reference lifecycle's exit code for it.
    #[error("{message}")]
    Lifecycle { message: String, code: i32 },
    #[error("{0}")]
    Invalid(String),
    /// Detect and build worked; making or writing the image failed (exit 62).
    #[error("export: {0}")]
    Export(String),
}

impl BuildError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Usage(_) => 3,
            BuildError::Image(e) if e.is_usage() => 3,
            BuildError::Lifecycle { code, .. } => *code,
            BuildError::Run(e) => e.exit_code(),
            BuildError::Export(_) => 62,
            _ => 1,
        }
    }
}

impl From<sandbox::SandboxError> for BuildError {
    fn from(e: sandbox::SandboxError) -> BuildError {
        match e {
            sandbox::SandboxError::Lifecycle { message, code } => {
                BuildError::Lifecycle { message, code }
            }
            other => BuildError::Run(RunError::Sandbox(other)),
        }
    }
}

impl From<lifecycle::LifecycleError> for BuildError {
    fn from(e: lifecycle::LifecycleError) -> BuildError {
        BuildError::Lifecycle {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

/// A `--buildpack` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildpackArg {
    /// A buildpack's directory (holding buildpack.toml).
    Dir(PathBuf),
    /// `ID[@VERSION]` of a buildpack the builder has.
    Id { id: String, version: String },
}

impl BuildpackArg {
    pub fn parse(text: &str) -> Result<BuildpackArg, String> {
        let path = Path::new(text);
        if path.is_dir() {
            return std::fs::canonicalize(path)
                .map(BuildpackArg::Dir)
                .map_err(|e| format!("{text}: {e}"));
        }
        if text.contains(':') || text.starts_with('.') || text.starts_with('/') {
            return Err(format!(
                "{text}: not a buildpack directory, and buildpack images are not yet supported \
                 as --buildpack (put the buildpack in the builder, or give its directory)"
            ));
        }
        let (id, version) = text.split_once('@').unwrap_or((text, ""));
        if id.is_empty() {
            return Err(format!("{text}: use a directory or ID[@VERSION]"));
        }
        Ok(BuildpackArg::Id {
            id: id.into(),
            version: version.into(),
        })
    }
}

pub struct BuildRequest {
    pub app: PathBuf,
    /// Where the image goes, and more names for it.
    pub output: ImageRef,
    pub tags: Vec<ImageRef>,
    pub builder: Option<ImageRef>,
    pub build_image: Option<ImageRef>,
    pub run_image: Option<ImageRef>,
    pub buildpacks: Vec<BuildpackArg>,
    /// The platforms to build for (default: the host's); several make one index.
    pub platforms: Vec<Platform>,
    /// How platforms after the first get their layers.
    pub cross_strategy: CrossStrategy,
    /// Build a target of another machine in the builder's own image for it, under emulation
    /// (otherwise the buildpacks run on this machine for every target).
    pub emulate: bool,
    pub env: Vec<(String, String)>,
    pub volumes: Vec<Bind>,
    /// Service bindings: `/platform/bindings/NAME` from a host directory.
    pub bindings: Vec<(String, PathBuf)>,
    /// A platform directory whose contents seed `/platform`.
    pub platform_dir: Option<PathBuf>,
    /// project.toml (default: the app's own, when it has one).
    pub descriptor: Option<PathBuf>,
    pub network: Network,
    pub sandbox: SandboxMode,
    pub timeout: Option<Duration>,
    pub detect_timeout: Option<Duration>,
    pub store: PathBuf,
    /// The build cache in a directory, in the lifecycle's format.
    pub cache_dir: Option<PathBuf>,
    /// The build cache as an image, in the lifecycle's format.
    pub cache_image: Option<ImageRef>,
    /// Start without the cache's layers (the cache is still written after the build).
    pub clear_cache: bool,
    /// More names of the run image for the app's rebase metadata (a registry an air-gapped
    /// site copies the run image to, say); a rebase prefers one on the app's own registry.
    pub run_image_mirrors: Vec<ImageRef>,
    /// The image whose layers the build may reuse (default: `--output`, when it is a registry
    /// or a layout).
    pub previous_image: Option<ImageRef>,
    /// The process the image starts by default (default: the buildpacks').
    pub default_process: Option<String>,
    /// `--launcher PLATFORM=PATH`: launchers to put into the image instead of the builder's
    /// or lathe's own.
    pub launchers: Vec<(Platform, PathBuf)>,
    /// `SOURCE_DATE_EPOCH`: the image's `created` time, in seconds.
    pub source_date_epoch: Option<String>,
    /// No progress output while writing the image.
    pub quiet: bool,
    /// Programs for another machine than the target's in launch or app layers are a warning,
    /// not an export error.
    pub allow_foreign_binaries: bool,
}

/// How the platforms after the first get their layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossStrategy {
    /// `reuse` when the first build made no ELF program and no buildpack declares
    /// per-architecture targets, else `rebuild`
    Auto,
    /// Run detect and build again for every platform
    Rebuild,
    /// Put the first build's layers onto every platform's run image
    Reuse,
}

impl std::fmt::Display for CrossStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            CrossStrategy::Auto => "auto",
            CrossStrategy::Rebuild => "rebuild",
            CrossStrategy::Reuse => "reuse",
        })
    }
}

/// A layer a buildpack made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerSummary {
    pub buildpack: String,
    pub name: String,
    pub launch: bool,
    pub build: bool,
    pub cache: bool,
}

/// The image a build wrote.
#[derive(Debug, serde::Serialize)]
pub struct ImageSummary {
    /// The manifest's digest.
    pub digest: String,
    pub platform: String,
    /// `--output` and every `--tag`.
    pub references: Vec<String>,
    /// The entrypoint's process type, if the image has a default process.
    pub default_process: Option<String>,
    /// Blobs and bytes sent to `--output` (zero when it had them all).
    pub blobs_written: usize,
    pub bytes_written: u64,
}

/// The cache a build saved.
#[derive(Debug, serde::Serialize)]
pub struct CacheSummary {
    pub location: String,
    #[serde(flatten)]
    pub report: SaveReport,
}

/// What the build made, read from the files the lifecycle wrote.
#[derive(Debug, serde::Serialize)]
pub struct BuildOutcome {
    pub group: Vec<GroupMember>,
    pub layers: Vec<LayerSummary>,
    /// config/metadata.toml as the lifecycle wrote it.
    pub metadata: Value,
    /// The image written (an index when there are several platforms).
    pub image: Option<ImageSummary>,
    /// Each platform's image, in the index's order.
    pub platforms: Vec<PlatformSummary>,
    /// With several platforms: how those after the first got their layers, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_strategy: Option<StrategyChoice>,
    /// What was saved to the cache (one platform; with several, each platform's `cache`).
    pub cache: Option<CacheSummary>,
    #[serde(skip)]
    pub notes: Vec<String>,
}

/// The build image, as far as a build needs it.
struct BuildImage {
    platform: Platform,
    config: Value,
    rootfs: PathBuf,
    uid: u32,
    gid: u32,
}

/// Runs detect and build for every platform of `request` and writes the app image (one
/// platform) or an index of them (several) to `--output` and every `--tag`.
pub fn build(
    request: &BuildRequest,
    lathe_exe: &Path,
    cancel: &AtomicBool,
    progress: &dyn ByteProgress,
) -> Result<BuildOutcome, BuildError> {
    check_arguments(request)?;
    let project = read_project(request)?;
    let mode = choose_sandbox(request)?;
    if mode == SandboxMode::None {
        if request.emulate {
            return Err(BuildError::Usage(
                "--emulate runs a target's build in the builder's image for it, in the \
                 sandbox; with --sandbox none the buildpacks run in this container"
                    .into(),
            ));
        }
        if !request.volumes.is_empty() || request.network == Network::None {
            return Err(BuildError::Usage(
                "--volume and --network none need a sandbox; with --sandbox none the \
                 buildpacks run as plain processes of this container"
                    .into(),
            ));
        }
    }
    let store = Store::open(&request.store)?;
    let scratch = store.scratch()?;
    let built = match mode {
        SandboxMode::None => {
            let mut runner = InContainer {
                request,
                project: project.as_ref(),
                runs: 0,
            };
            build_targets(
                request,
                project.as_ref(),
                &store,
                &mut runner,
                scratch.path(),
            )
        }
        _ => {
            let build_ref = request
                .builder
                .as_ref()
                .or(request.build_image.as_ref())
                .expect("checked");
            let source = store.keep_pulled_owned(image::open_source(build_ref)?)?;
            let mut runner = Sandboxed {
                request,
                project: project.as_ref(),
                store: &store,
                source,
                images: Vec::new(),
                control: RunControl {
                    lathe_exe: lathe_exe.to_path_buf(),
                    timeout: request.timeout,
                    cancel,
                },
                progress,
            };
            build_targets(
                request,
                project.as_ref(),
                &store,
                &mut runner,
                scratch.path(),
            )
        }
    };
    let scratch_path = scratch.keep();
    let _ = crate::layout::remove_tree(&scratch_path);
    built
}

/// The platforms to build, in the order of the index: `--platform`'s, else the host's.
fn target_platforms(request: &BuildRequest) -> Vec<Platform> {
    let mut platforms: Vec<Platform> = Vec::new();
    for platform in &request.platforms {
        if !platforms.contains(platform) {
            platforms.push(platform.clone());
        }
    }
    if platforms.is_empty() {
        platforms.push(Platform::host());
    }
    platforms
}

/// One run of the lifecycle, read back.
struct Built {
    /// The host directories the lifecycle saw as /layers and /workspace.
    layers: PathBuf,
    workspace: PathBuf,
    /// The build user, owner of every buildpack and app layer entry.
    owner: (u32, u32),
    /// The root of the build image the lifecycle ran in, and the buildpack directories bound
    /// into it.
    root: PathBuf,
    buildpack_binds: Vec<Bind>,
    /// The platform the buildpacks ran on, and the target they built for.
    platform: Platform,
    target: Platform,
    outcome: BuildOutcome,
}

impl Built {
    /// The host directory of a buildpack of the group.
    fn buildpack_dir(&self, id: &str, version: &str) -> PathBuf {
        let inside = format!("/cnb/buildpacks/{}/{version}", escape_id(id));
        self.buildpack_binds
            .iter()
            .find(|bind| bind.target == inside)
            .map(|bind| bind.source.clone())
            .unwrap_or_else(|| self.root.join(inside.trim_start_matches('/')))
    }

    /// Where the builder keeps its launcher (used when it has one and no --launcher is given;
    /// lathe's own otherwise).
    fn builder_launcher(&self) -> PathBuf {
        self.root.join("cnb/lifecycle/launcher")
    }
}

/// What one lifecycle run is given beside the request.
struct PhaseInputs {
    /// The target the buildpacks see (CNB_TARGET_*, target matching): the run image's.
    target: TargetData,
    restore: RestoreInput,
    /// The host directory of the cache's layer tars, bound at `restore.cache_tars`.
    cache_tars: Option<PathBuf>,
    notes: Vec<String>,
}

/// Runs the lifecycle (detect and build) for one target: in the sandbox, rooted in the build
/// image, or with `--sandbox none` in this very process inside the builder image.
trait LifecycleRunner {
    /// The root file system of the build image that builds `target` (its /cnb/run.toml names
    /// the run image).
    fn builder_root(&mut self, target: &Platform) -> Result<PathBuf, BuildError>;

    /// Runs detect and build for `target`; `work` is a new directory of its own.
    fn run(
        &mut self,
        target: &Platform,
        work: &Path,
        inputs: PhaseInputs,
    ) -> Result<Built, BuildError>;
}

/// What one platform of the image got.
#[derive(Debug, serde::Serialize)]
pub struct PlatformSummary {
    pub platform: String,
    /// The platform's manifest digest.
    pub digest: String,
    /// `built`, or `reused the <platform> build` (`--cross-strategy reuse`).
    pub layers_from: String,
    /// The platform the buildpacks ran on (the host's, or the target's with `--emulate`).
    pub built_on: String,
    /// The cache this platform's build saved (for a build of one platform: the outcome's
    /// `cache`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSummary>,
}

/// How the platforms after the first got their layers, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StrategyChoice {
    pub strategy: CrossStrategy,
    pub why: String,
}

/// Builds every target platform and writes the image (or the index) — the heart of `build`,
/// the same for both runners.
///
/// The first platform built is the host's when it is a target (else the first target); with
/// several targets, `--cross-strategy` then decides whether the others run the buildpacks
/// again (`rebuild`) or take the first build's layers onto their own run image (`reuse`).
/// Every platform's image is checked for programs of another machine by the export.
fn build_targets(
    request: &BuildRequest,
    project: Option<&Project>,
    store: &Store,
    runner: &mut dyn LifecycleRunner,
    scratch: &Path,
) -> Result<BuildOutcome, BuildError> {
    let platforms = target_platforms(request);
    let several = platforms.len() > 1;
    crate::launcher::check_flags(&request.launchers, &platforms)
        .map_err(|e| BuildError::Usage(e.to_string()))?;
    let host = Platform::host();
    let mut order: Vec<&Platform> = platforms.iter().collect();
    if let Some(at) = order
        .iter()
        .position(|p| p.os == host.os && p.arch == host.arch)
    {
        let host_target = order.remove(at);
        order.insert(0, host_target);
    }
    let mut notes = Vec::new();
    let mut exporting = Exporting {
        request,
        project,
        assembly: crate::assembly::Assembly::new("the app image", Some(scratch))
            .map_err(|e| BuildError::Export(e.to_string()))?,
        created: created_time(request, &mut notes),
        several,
    };
    let mut children: Vec<(Platform, oci_spec::image::Descriptor, PlatformSummary)> = Vec::new();
    let mut first: Option<Built> = None;
    let mut choice: Option<StrategyChoice> = None;
    let mut default_process = None;
    // Every platform's run image is found before anything is built, so that one missing is
    // named at once rather than after the other platforms' builds.
    let mut run_images = Vec::new();
    for platform in &order {
        let root = runner.builder_root(platform)?;
        run_images.push(open_run_image(request, &root, platform, store)?);
    }
    for (index, (platform, run_image)) in order.into_iter().zip(run_images).enumerate() {
        let target_platform = run_image.image.platform.clone();
        let reuse = choice
            .as_ref()
            .is_some_and(|c| c.strategy == CrossStrategy::Reuse);
        let (exported, built_on, layers_from, cache) = match first.as_ref().filter(|_| reuse) {
            Some(built) => {
                // The first build's layers name its own previous image's.
                let mut warn = |line: String| {
                    tracing::warn!("{line}");
                    notes.push(line);
                };
                let previous = read_previous_image(request, &built.target, &mut warn);
                let exported = exporting.export(built, run_image, previous, &mut notes)?;
                let from = format!("reused the {} build", built.target);
                (exported, built.platform.to_string(), from, None)
            }
            None => {
                let work = make_dir(scratch, &format!("target-{index}"))?;
                let mut run_notes = Vec::new();
                let location = cache_location(request, platform, several)?;
                let analysis = analyze(request, &target_platform, location, &work, &mut run_notes)?;
                let cache_tars = analysis.cache_tars().map(Path::to_path_buf);
                let inputs = PhaseInputs {
                    target: run_image.target()?,
                    restore: analysis
                        .restore_input(cache_tars.as_ref().map(|_| PathBuf::from(CACHE_INSIDE))),
                    cache_tars,
                    notes: run_notes,
                };
                let mut built = runner.run(platform, &work, inputs)?;
                built.target = target_platform.clone();
                let mut run_notes = std::mem::take(&mut built.outcome.notes);
                let exported =
                    exporting.export(&built, run_image, analysis.previous, &mut run_notes)?;
                let cache = save_cache(
                    request,
                    analysis.cache,
                    &built.layers,
                    built.owner,
                    &target_platform,
                    &work,
                    &mut run_notes,
                );
                let built_on = built.platform.to_string();
                if first.is_none() {
                    if several {
                        let chosen = choose_strategy(request, &built)?;
                        run_notes.push(format!(
                            "cross-strategy {}: {}",
                            chosen.strategy, chosen.why
                        ));
                        choice = Some(chosen);
                    }
                    built.outcome.notes = run_notes;
                    first = Some(built);
                } else {
                    notes.append(&mut run_notes);
                }
                (exported, built_on, "built".to_string(), cache)
            }
        };
        default_process = default_process.or(exported.default_process.clone());
        children.push((
            exported.platform.clone(),
            exported.manifest.clone(),
            PlatformSummary {
                platform: exported.platform.to_string(),
                digest: exported.manifest.digest().to_string(),
                layers_from,
                built_on,
                cache,
            },
        ));
    }
    let first = first.expect("at least one platform is built");
    let mut outcome = first.outcome;
    outcome.notes.extend(notes);
    // The index lists the platforms in the order they were asked for.
    children.sort_by_key(|(platform, _, _)| {
        platforms
            .iter()
            .position(|p| p.os == platform.os && p.arch == platform.arch)
    });
    let manifests: Vec<_> = children
        .iter()
        .map(|(platform, manifest, _)| (platform.clone(), manifest.clone()))
        .collect();
    outcome.image = Some(write_outputs(
        request,
        &mut exporting.assembly,
        &manifests,
        default_process,
    )?);
    let mut summaries: Vec<PlatformSummary> = children
        .into_iter()
        .map(|(_, _, summary)| summary)
        .collect();
    if !several {
        outcome.cache = summaries[0].cache.take();
    }
    outcome.platforms = summaries;
    outcome.cross_strategy = choice;
    Ok(outcome)
}

/// The sandbox runner: the lifecycle runs rooted in the build image, the host's child of the
/// builder (buildpacks run on this machine for every target), or with `--emulate` the target's
/// own child under qemu.
struct Sandboxed<'a> {
    request: &'a BuildRequest,
    project: Option<&'a Project>,
    store: &'a Store,
    /// The builder (or `--build-image`).
    source: Box<dyn ImageSource>,
    /// The build images unpacked so far.
    images: Vec<BuildImage>,
    control: RunControl<'a>,
    progress: &'a dyn ByteProgress,
}

impl Sandboxed<'_> {
    /// The platform whose build image builds `target`.
    fn build_platform(&self, target: &Platform) -> Platform {
        if self.request.emulate {
            target.clone()
        } else {
            Platform::host()
        }
    }

    /// The build image for `target`, unpacked on first use: its index in `images`.
    fn build_image(&mut self, target: &Platform) -> Result<usize, BuildError> {
        let wanted = self.build_platform(target);
        let same = |image: &BuildImage| {
            image.platform.os == wanted.os && image.platform.arch == wanted.arch
        };
        if let Some(at) = self.images.iter().position(same) {
            return Ok(at);
        }
        let what = self.source.describe();
        let emulate = self.request.emulate;
        let no_image = |found: String| {
            let hint = if emulate {
                String::new()
            } else {
                format!(
                    "; lathe runs the buildpacks on this machine ({wanted}) for every target: \
                     give a builder with a {wanted} image, or --emulate to build {target} in \
                     the builder's own {target} image under emulation"
                )
            };
            BuildError::Invalid(format!("{found}{hint}"))
        };
        let image = match read_build_image(self.source.as_ref(), &wanted, self.store, self.progress)
        {
            Ok(image) => image,
            Err(BuildError::Image(e @ ImageError::PlatformMissing { .. })) => {
                return Err(no_image(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        if !same(&image) {
            return Err(no_image(format!(
                "{what} is {}, not {wanted}",
                image.platform
            )));
        }
        self.images.push(image);
        Ok(self.images.len() - 1)
    }
}

impl LifecycleRunner for Sandboxed<'_> {
    fn builder_root(&mut self, target: &Platform) -> Result<PathBuf, BuildError> {
        let at = self.build_image(target)?;
        Ok(self.images[at].rootfs.clone())
    }

    fn run(
        &mut self,
        target: &Platform,
        work: &Path,
        inputs: PhaseInputs,
    ) -> Result<Built, BuildError> {
        let (request, project) = (self.request, self.project);
        let at = self.build_image(target)?;
        let build_image = &self.images[at];
        let workspace = make_dir(work, "workspace")?;
        let layers = make_dir(work, "layers")?;
        let platform_dir = make_dir(work, "platform")?;
        copy_app(request, project, &workspace)?;
        let mut binds = vec![
            bind(&workspace, "/workspace", false),
            bind(&layers, "/layers", false),
            bind(&platform_dir, "/platform", true),
        ];
        binds.extend(prepare_platform_dir(request, project, &platform_dir)?);
        let (buildpack_binds, order_written) =
            prepare_buildpacks(request, project, &layers, &build_image.platform, work)?;
        binds.extend(buildpack_binds.iter().cloned());
        binds.extend(request.volumes.iter().cloned());
        if let Some(tars) = &inputs.cache_tars {
            binds.push(bind(tars, CACHE_INSIDE, true));
        }
        // Root chowns the work area to the build user when its namespace has that user (a
        // rootless container's root may have only its own id; the sandbox then runs the build
        // as that id, which owns the work area already).
        let caller = nix::unistd::getuid().as_raw();
        if caller == 0 && crate::idmap::own_namespace_maps(build_image.uid, build_image.gid) {
            for dir in [&workspace, &layers] {
                chown_tree(dir, build_image.uid, build_image.gid)?;
            }
        }
        let emulator = if build_image.platform.arch != Platform::host().arch {
            Some(Emulator::find_for(&build_image.platform).map_err(BuildError::Invalid)?)
        } else {
            None
        };
        let lifecycle_env = lifecycle_env(build_image);
        let spec = SandboxSpec {
            rootfs: sandbox::RootFs::Private(build_image.rootfs.clone()),
            binds,
            argv: Vec::new(),
            env: lifecycle_env.clone(),
            cwd: "/workspace".into(),
            uid: build_image.uid,
            gid: build_image.gid,
            network: request.network,
            emulator,
            hostname: "lathe".into(),
            user_is_caller: caller != 0,
            lifecycle: Some(PhaseRequest {
                paths: Paths {
                    order: if order_written {
                        "/layers/order.toml".into()
                    } else {
                        "/cnb/order.toml".into()
                    },
                    ..Paths::default()
                },
                target: inputs.target,
                exec_env: "production".into(),
                lifecycle_env,
                detect_timeout: request.detect_timeout,
                os_release: "/etc/os-release".into(),
                restore: inputs.restore,
            }),
        };
        let mut notes = inputs.notes;
        let root = make_dir(work, "root")?;
        let ran =
            run::run_on_writable_root(spec, &build_image.rootfs, &root, &self.control, &mut notes);
        match ran {
            Ok(0) => Ok(Built {
                outcome: read_outcome(&layers, notes)?,
                layers,
                workspace,
                owner: (build_image.uid, build_image.gid),
                root: build_image.rootfs.clone(),
                buildpack_binds,
                platform: build_image.platform.clone(),
                target: target.clone(),
            }),
            Ok(code) => Err(BuildError::Lifecycle {
                message: format!("the lifecycle ended with exit code {code}"),
                code,
            }),
            Err(RunError::Sandbox(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// `--sandbox none`: lathe runs inside the builder image; the lifecycle runs in this process,
/// on the image's own /workspace and /layers (emptied again before each further target).
struct InContainer<'a> {
    request: &'a BuildRequest,
    project: Option<&'a Project>,
    runs: usize,
}

impl LifecycleRunner for InContainer<'_> {
    fn builder_root(&mut self, _target: &Platform) -> Result<PathBuf, BuildError> {
        Ok(PathBuf::from("/"))
    }

    fn run(
        &mut self,
        target: &Platform,
        work: &Path,
        inputs: PhaseInputs,
    ) -> Result<Built, BuildError> {
        let (request, project) = (self.request, self.project);
        let workspace = Path::new("/workspace");
        let layers = Path::new("/layers");
        for dir in [workspace, layers] {
            let writable = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok();
            if !dir.is_dir() || !writable {
                return Err(BuildError::Invalid(format!(
                    "--sandbox none builds in this container's {}, which is not a writable \
                     directory here (is lathe running inside a builder image?)",
                    dir.display()
                )));
            }
            if self.runs > 0 {
                empty_dir(dir)?; // the previous target's build, exported already
            } else if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
                return Err(BuildError::Invalid(format!(
                    "--sandbox none: {} is not empty; a build starts from an empty one",
                    dir.display()
                )));
            }
        }
        self.runs += 1;
        copy_app(request, project, workspace)?;
        let platform_dir = make_dir(work, "platform")?;
        let bindings = prepare_platform_dir(request, project, &platform_dir)?;
        for bind in bindings {
            let link = platform_dir.join(bind.target.trim_start_matches("/platform/"));
            std::fs::remove_dir(&link).map_err(io(&link))?;
            std::os::unix::fs::symlink(&bind.source, &link).map_err(io(&link))?;
        }
        // Buildpack directories join the image's own buildpacks through a directory of links.
        let host = Platform::host();
        let (buildpack_binds, order_written) =
            prepare_buildpacks(request, project, layers, &host, work)?;
        let mut paths = Paths {
            platform: platform_dir.clone(),
            order: if order_written {
                layers.join("order.toml")
            } else {
                "/cnb/order.toml".into()
            },
            ..Paths::default()
        };
        if !buildpack_binds.is_empty() {
            let links = make_dir(work, "buildpacks")?;
            if let Ok(entries) = std::fs::read_dir("/cnb/buildpacks") {
                for entry in entries.flatten() {
                    let link = links.join(entry.file_name());
                    std::os::unix::fs::symlink(entry.path(), &link).map_err(io(&link))?;
                }
            }
            for bind in &buildpack_binds {
                let relative = bind.target.trim_start_matches("/cnb/buildpacks/");
                let link = links.join(relative);
                let parent = link.parent().expect("id/version");
                if parent.is_symlink() {
                    return Err(BuildError::Invalid(format!(
                        "buildpack {relative} is also in /cnb/buildpacks; give it by id instead"
                    )));
                }
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                std::os::unix::fs::symlink(&bind.source, &link).map_err(io(&link))?;
            }
            paths.buildpacks = links;
        }
        let phase = PhaseRequest {
            paths,
            target: inputs.target,
            exec_env: "production".into(),
            lifecycle_env: std::env::vars().collect(),
            detect_timeout: request.detect_timeout,
            os_release: "/etc/os-release".into(),
            restore: RestoreInput {
                cache_tars: inputs.cache_tars,
                ..inputs.restore
            },
        };
        lifecycle::phase::run(&phase)?;
        let mut notes = inputs.notes;
        notes.insert(0, "ran in this container (--sandbox none)".to_string());
        let env_id = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse().ok());
        let owner = match (env_id("CNB_USER_ID"), env_id("CNB_GROUP_ID")) {
            (Some(uid), Some(gid)) => (uid, gid),
            _ => (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            ),
        };
        Ok(Built {
            outcome: read_outcome(layers, notes)?,
            layers: layers.to_path_buf(),
            workspace: workspace.to_path_buf(),
            owner,
            root: PathBuf::from("/"),
            buildpack_binds,
            platform: host,
            target: target.clone(),
        })
    }
}

/// Removes everything inside `dir`.
fn empty_dir(dir: &Path) -> Result<(), BuildError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io(&path))?;
    }
    Ok(())
}

/// `auto`'s choice after the first build: `reuse` when its launch and app layers hold no ELF
/// program and no buildpack of the group declares per-architecture targets; `rebuild`
/// otherwise. `rebuild` and `reuse` are taken as they are.
fn choose_strategy(request: &BuildRequest, built: &Built) -> Result<StrategyChoice, BuildError> {
    let chosen = |strategy, why: String| Ok(StrategyChoice { strategy, why });
    match request.cross_strategy {
        CrossStrategy::Rebuild => return chosen(CrossStrategy::Rebuild, "asked for".into()),
        CrossStrategy::Reuse => return chosen(CrossStrategy::Reuse, "asked for".into()),
        CrossStrategy::Auto => {}
    }
    for member in &built.outcome.group {
        let dir = built.buildpack_dir(&member.id, &member.version);
        let arches: Vec<String> = match descriptor::read(&dir) {
            Ok(buildpack) => buildpack
                .declared_targets
                .iter()
                .filter_map(|t| t.arch.clone())
                .collect(),
            Err(e) => {
                return chosen(
                    CrossStrategy::Rebuild,
                    format!("buildpack {}'s targets could not be read ({e})", member.id),
                );
            }
        };
        if !arches.is_empty() {
            return chosen(
                CrossStrategy::Rebuild,
                format!(
                    "buildpack {} declares per-architecture targets ({})",
                    member.id,
                    arches.join(", ")
                ),
            );
        }
    }
    let elf = |dir: &Path| {
        crate::elfcheck::find_elf(dir)
            .map_err(|e| BuildError::Invalid(format!("{}: {e}", dir.display())))
    };
    for layer in built.outcome.layers.iter().filter(|l| l.launch) {
        let dir = built
            .layers
            .join(escape_id(&layer.buildpack))
            .join(&layer.name);
        if let Some(program) = elf(&dir)? {
            return chosen(
                CrossStrategy::Rebuild,
                format!(
                    "launch layer {}:{} holds the ELF program {}",
                    layer.buildpack,
                    layer.name,
                    program.display()
                ),
            );
        }
    }
    if let Some(program) = elf(&built.workspace)? {
        return chosen(
            CrossStrategy::Rebuild,
            format!("the app holds the ELF program {}", program.display()),
        );
    }
    chosen(
        CrossStrategy::Reuse,
        format!(
            "the {} build's launch and app layers hold no ELF program and no buildpack declares \
             per-architecture targets",
            built.target
        ),
    )
}

/// The group, the layers and the processes, as lines for people.
pub fn describe(outcome: &BuildOutcome) -> String {
    let mut text = String::from("Group:\n");
    for member in &outcome.group {
        text += &format!("  {} {}\n", member.id, member.version);
    }
    text += "Layers:\n";
    for layer in &outcome.layers {
        let types: Vec<&str> = [
            (layer.launch, "launch"),
            (layer.build, "build"),
            (layer.cache, "cache"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        text += &format!(
            "  {}/{} [{}]\n",
            layer.buildpack,
            layer.name,
            types.join(",")
        );
    }
    text += "Processes:\n";
    let default = outcome.metadata["buildpack-default-process-type"].as_str();
    for process in outcome.metadata["processes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let kind = process["type"].as_str().unwrap_or("?");
        let command: Vec<String> = match &process["command"] {
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        };
        let args: Vec<String> = process["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(String::from))
            .collect();
        let mark = if Some(kind) == default {
            " (default)"
        } else {
            ""
        };
        text += &format!("  {kind}{mark}: {} {}\n", command.join(" "), args.join(" "));
    }
    if let Some(image) = &outcome.image {
        text += &format!(
            "Image: {} ({}), {} blobs ({} bytes) written\n",
            image.digest, image.platform, image.blobs_written, image.bytes_written
        );
        for reference in &image.references {
            text += &format!("  {reference}\n");
        }
    }
    if let Some(choice) = &outcome.cross_strategy {
        text += &format!("Cross-strategy: {} ({})\n", choice.strategy, choice.why);
    }
    if outcome.platforms.len() > 1 {
        text += "Platforms:\n";
        for platform in &outcome.platforms {
            let how = match platform.layers_from.as_str() {
                "built" => format!("built on {}", platform.built_on),
                reused => reused.to_string(),
            };
            text += &format!("  {} {} ({how})\n", platform.platform, platform.digest);
        }
    }
    text
}

/// Where the cache directory is bound in the sandbox.
const CACHE_INSIDE: &str = "/cache";

fn check_arguments(request: &BuildRequest) -> Result<(), BuildError> {
    if !request.app.is_dir() {
        return Err(BuildError::Usage(format!(
            "{}: the app must be a directory",
            request.app.display()
        )));
    }
    match (&request.builder, &request.build_image) {
        (Some(_), Some(_)) => {
            return Err(BuildError::Usage(
                "give either --builder or --build-image, not both".into(),
            ));
        }
        (None, Some(_)) if request.run_image.is_none() => {
            return Err(BuildError::Usage(
                "--build-image needs --run-image (a builder names its run image; a build image \
                 does not)"
                    .into(),
            ));
        }
        (None, Some(_))
            if request.buildpacks.is_empty()
                && request.descriptor.is_none()
                && project::find(&request.app).is_none() =>
        {
            return Err(BuildError::Usage(
                "--build-image needs at least one --buildpack (or a project.toml group)".into(),
            ));
        }
        _ => {}
    }
    for tag in &request.tags {
        let same_place = match (&request.output, tag) {
            (ImageRef::Registry(output), ImageRef::Registry(tag)) => {
                output.registry == tag.registry
            }
            (ImageRef::Layout { dir: output, .. }, ImageRef::Layout { dir: tag, .. }) => {
                output == tag
            }
            _ => false,
        };
        if !same_place {
            return Err(BuildError::Usage(format!(
                "--tag {tag}: a tag names the image on the registry (or in the OCI layout) of \
                 --output {}; an archive holds one name",
                request.output
            )));
        }
    }
    if target_platforms(request).len() > 1
        && let Some(archive) = std::iter::once(&request.output)
            .chain(&request.tags)
            .find(|r| matches!(r, ImageRef::DockerArchive { .. }))
    {
        return Err(BuildError::Usage(format!(
            "{archive}: a docker-archive holds one platform; several platforms make an index \
             (write it to a registry, oci: or oci-archive:)"
        )));
    }
    if let Some(mirror) = request
        .run_image_mirrors
        .iter()
        .find(|r| !matches!(r, ImageRef::Registry(_)))
    {
        return Err(BuildError::Usage(format!(
            "--run-image-mirror {mirror}: a mirror is a registry reference \
             (docker://REGISTRY/REPO:TAG), where a rebase can find the run image"
        )));
    }
    if crate::registry::settings().offline {
        let on_registry = std::iter::once(("--output", &request.output))
            .chain(request.tags.iter().map(|t| ("--tag", t)))
            .chain(request.cache_image.iter().map(|c| ("--cache-image", c)))
            .chain(
                request
                    .previous_image
                    .iter()
                    .map(|p| ("--previous-image", p)),
            )
            .find(|(_, r)| matches!(r, ImageRef::Registry(_)));
        if let Some((flag, reference)) = on_registry {
            return Err(BuildError::Usage(format!(
                "{flag} {reference}: lathe is --offline and contacts no registry; give an OCI \
                 layout or archive (oci:DIR[:ref], oci-archive:FILE[:ref]) and copy it later"
            )));
        }
    }
    if request.cache_dir.is_some() && request.cache_image.is_some() {
        return Err(BuildError::Usage(
            "give either --cache-dir or --cache-image, not both".into(),
        ));
    }
    if let Some(dir) = &request.cache_dir
        && dir.exists()
        && !dir.is_dir()
    {
        return Err(BuildError::Usage(format!(
            "--cache-dir {}: not a directory",
            dir.display()
        )));
    }
    for (name, _) in &request.bindings {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(BuildError::Usage(format!(
                "--binding {name:?}: a binding's name is one path segment"
            )));
        }
    }
    Ok(())
}

/// `auto`: user namespaces where they work; otherwise, inside a builder image with no other
/// builder asked for, `none`; otherwise an error naming what stops user namespaces.
fn choose_sandbox(request: &BuildRequest) -> Result<SandboxMode, BuildError> {
    let other_image = request.builder.is_some() || request.build_image.is_some();
    match request.sandbox {
        SandboxMode::Userns => {
            if !other_image {
                return Err(BuildError::Usage(
                    "a build needs --builder or --build-image (or --sandbox none inside a \
                     builder image)"
                        .into(),
                ));
            }
            Ok(SandboxMode::Userns)
        }
        SandboxMode::None => {
            if other_image {
                return Err(BuildError::Usage(
                    "--sandbox none builds with the builder image lathe runs in; drop \
                     --builder/--build-image, or use --sandbox userns"
                        .into(),
                ));
            }
            Ok(SandboxMode::None)
        }
        SandboxMode::Auto => {
            if !other_image {
                if Path::new("/cnb/order.toml").is_file() {
                    return Ok(SandboxMode::None);
                }
                return Err(BuildError::Usage(
                    "a build needs --builder or --build-image (or lathe running inside a \
                     builder image, with /cnb/order.toml)"
                        .into(),
                ));
            }
            if sandbox::user_namespaces_work() {
                return Ok(SandboxMode::Userns);
            }
            Err(RunError::Sandbox(sandbox::SandboxError::NoUserNamespace {
                why: "unshare(CLONE_NEWUSER) was refused".into(),
                diagnosis: sandbox::diagnose_user_namespaces(),
            })
            .into())
        }
    }
}

fn read_project(request: &BuildRequest) -> Result<Option<Project>, BuildError> {
    let path = match &request.descriptor {
        Some(path) => Some(path.clone()),
        None => project::find(&request.app),
    };
    path.map(|path| project::read(&path).map_err(|e| BuildError::Invalid(e.to_string())))
        .transpose()
}

fn read_build_image(
    source: &dyn ImageSource,
    wanted: &Platform,
    store: &Store,
    progress: &dyn ByteProgress,
) -> Result<BuildImage, BuildError> {
    let what = source.describe();
    let image = image::read_platform_image(source, wanted)?;
    let (config, platform) = (image.config, image.platform);
    let env_id = |name: &str| -> Result<u32, BuildError> {
        image_env(&config)
            .into_iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| {
                BuildError::Invalid(format!(
                    "{what}: not a build image: its Env has no numeric {name} (a CNB build \
                     image names its build user in CNB_USER_ID and CNB_GROUP_ID)"
                ))
            })
    };
    let (uid, gid) = (env_id("CNB_USER_ID")?, env_id("CNB_GROUP_ID")?);
    let (rootfs, _) = store.rootfs(source, &image.manifest, &platform.to_string(), progress)?;
    Ok(BuildImage {
        platform,
        config,
        rootfs,
        uid,
        gid,
    })
}

fn image_env(config: &Value) -> Vec<(String, String)> {
    config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The lifecycle's environment: the build image's Env, with HOME (the build user's, from the
/// image's /etc/passwd) and HOSTNAME when it has none.
fn lifecycle_env(build_image: &BuildImage) -> Vec<(String, String)> {
    let mut env = image_env(&build_image.config);
    if !env.iter().any(|(k, _)| k == "HOME") {
        let passwd =
            std::fs::read_to_string(build_image.rootfs.join("etc/passwd")).unwrap_or_default();
        let home = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 5 && f[2] == build_image.uid.to_string())
            .map_or("/".to_string(), |f| f[5].to_string());
        env.push(("HOME".into(), home));
    }
    if !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".into(), "lathe".into()));
    }
    env
}

/// The run image for one platform, opened.
struct OpenedRunImage {
    source: Box<dyn ImageSource>,
    image: image::PlatformImage,
    /// The name for the labels: a registry name, or a layout's ref name (never a host path).
    name: String,
    /// The run.toml entry it came from: image and mirrors, as recorded names.
    run_toml: Option<(String, Vec<String>)>,
}

impl OpenedRunImage {
    /// The run image's target: os/arch/variant from its config, distro and id from its
    /// `io.buildpacks.base.*` labels.
    fn target(&self) -> Result<TargetData, BuildError> {
        let config = &self.image.config;
        let label = |name: &str| {
            config["config"]["Labels"][name]
                .as_str()
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        let distro = match (
            label("io.buildpacks.base.distro.name"),
            label("io.buildpacks.base.distro.version"),
        ) {
            (None, None) => None,
            (name, version) => Some(Distro {
                name: name.unwrap_or_default(),
                version: version.unwrap_or_default(),
            }),
        };
        let platform = &self.image.platform;
        Ok(TargetData {
            os: platform.os.clone(),
            arch: platform.arch.clone(),
            variant: platform.variant.clone(),
            distro,
            id: label("io.buildpacks.base.id"),
        })
    }
}

/// How labels name an image: a registry reference as it is; a layout or archive by its ref
/// name, so that no host path ends up in an image.
pub fn recorded_name(reference: &ImageRef) -> String {
    match reference {
        ImageRef::Registry(r) => r.to_string(),
        ImageRef::Layout { name, .. }
        | ImageRef::OciArchive { name, .. }
        | ImageRef::DockerArchive { name, .. } => name
            .clone()
            .unwrap_or_else(|| crate::reference::DEFAULT_TAG.to_string()),
    }
}

/// `--run-image`, else the builder's /cnb/run.toml (or the older /cnb/stack.toml), for
/// `platform`, which it must be for.
fn open_run_image(
    request: &BuildRequest,
    rootfs: &Path,
    platform: &Platform,
    store: &Store,
) -> Result<OpenedRunImage, BuildError> {
    let (reference, run_toml) = match &request.run_image {
        Some(run_image) => (run_image.clone(), None),
        None => {
            let (image, mirrors) = builder_run_image(rootfs)?;
            let reference = image.parse::<ImageRef>().map_err(|e| {
                BuildError::Invalid(format!("the builder's run image {image:?}: {e}"))
            })?;
            let recorded = |text: &String| {
                text.parse::<ImageRef>()
                    .map(|r| recorded_name(&r))
                    .unwrap_or_else(|_| text.clone())
            };
            let mirrors = mirrors.iter().map(recorded).collect();
            (reference, Some((recorded(&image), mirrors)))
        }
    };
    // From the builder's own layout or archive when it holds it (a bundle).
    let beside = request.builder.as_ref().or(request.build_image.as_ref());
    let source = store.keep_pulled_owned(image::open_beside(&reference, beside)?)?;
    let what = source.describe();
    let image = image::read_platform_image(source.as_ref(), platform)?;
    let run_platform = &image.platform;
    if run_platform.os != platform.os
        || run_platform.arch != platform.arch
        || (platform.variant.is_some()
            && run_platform.variant.is_some()
            && run_platform.variant != platform.variant)
    {
        return Err(BuildError::Invalid(format!(
            "run image {what} is {run_platform}, but the build is for {platform}"
        )));
    }
    Ok(OpenedRunImage {
        source,
        image,
        name: recorded_name(&reference),
        run_toml,
    })
}

/// The first `[[images]]` entry of the builder's /cnb/run.toml (or /cnb/stack.toml's
/// `[run-image]`): image and mirrors.
fn builder_run_image(rootfs: &Path) -> Result<(String, Vec<String>), BuildError> {
    let read = |name: &str| -> Option<toml::Table> {
        let text = std::fs::read_to_string(rootfs.join("cnb").join(name)).ok()?;
        text.parse().ok()
    };
    let entry = |table: &toml::Value| -> Option<(String, Vec<String>)> {
        let image = table.get("image")?.as_str()?.to_string();
        let mirrors = table
            .get("mirrors")
            .and_then(|m| m.as_array())
            .map(|m| {
                m.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Some((image, mirrors))
    };
    read("run.toml")
        .and_then(|t| entry(t.get("images")?.as_array()?.first()?))
        .or_else(|| read("stack.toml").and_then(|t| entry(t.get("run-image")?)))
        .ok_or_else(|| {
            BuildError::Invalid(
                "the builder names no run image (/cnb/run.toml and /cnb/stack.toml are missing \
                 or empty); give --run-image"
                    .into(),
            )
        })
}

/// What a build reads before it runs, as the reference analyzer does: the app's previous image
/// and the cache.
struct Analysis {
    previous: Option<PreviousImage>,
    cache: Option<(CacheLocation, CacheRead)>,
    clear_cache: bool,
}

impl Analysis {
    /// The host directory of the cache's layer tars, when the restorer needs it.
    fn cache_tars(&self) -> Option<&Path> {
        match &self.cache {
            Some((_, read)) if !self.clear_cache => read.tars.as_deref(),
            _ => None,
        }
    }

    /// The restorer's input; `cache_tars` is where the build container sees the tars.
    fn restore_input(&self, cache_tars: Option<PathBuf>) -> RestoreInput {
        RestoreInput {
            previous: self
                .previous
                .as_ref()
                .map(|p| p.metadata.clone())
                .unwrap_or_default(),
            cache: match &self.cache {
                Some((_, read)) if !self.clear_cache => read.metadata.clone(),
                _ => Default::default(),
            },
            cache_tars,
        }
    }
}

fn analyze(
    request: &BuildRequest,
    platform: &Platform,
    cache: Option<CacheLocation>,
    scratch: &Path,
    notes: &mut Vec<String>,
) -> Result<Analysis, BuildError> {
    let mut warn = |line: String| {
        tracing::warn!("{line}");
        notes.push(line);
    };
    let previous = read_previous_image(request, platform, &mut warn);
    let cache = match cache {
        Some(CacheLocation::Dir(dir)) => {
            let read = cache::read_dir(&dir);
            Some((CacheLocation::Dir(dir), read))
        }
        Some(CacheLocation::Image(reference)) => {
            let read = cache::read_image(&reference, platform, &scratch.join("cache-tars"))
                .map_err(|e| BuildError::Invalid(format!("--cache-image: {e}")))?;
            Some((CacheLocation::Image(reference), read))
        }
        None => None,
    };
    if let Some((_, read)) = &cache {
        read.warnings.iter().cloned().for_each(&mut warn);
    }
    Ok(Analysis {
        previous,
        cache,
        clear_cache: request.clear_cache,
    })
}

/// `--previous-image`, else `--output` when it is a registry or a layout: its lifecycle label
/// and layers, when it exists and is for `platform`. Anything wrong with it is a warning and a
/// build without it, never a failed build.
fn read_previous_image(
    request: &BuildRequest,
    platform: &Platform,
    warn: &mut dyn FnMut(String),
) -> Option<PreviousImage> {
    let reference = request
        .previous_image
        .clone()
        .or_else(|| match &request.output {
            ImageRef::Registry(_) | ImageRef::Layout { .. } => Some(request.output.clone()),
            _ => None,
        })?;
    let mut without = |why: String| {
        warn(format!(
            "previous image {reference}: {why}; building without reusing its layers"
        ));
        None
    };
    let source = match image::open_if_exists(&reference) {
        Ok(Some(source)) => source,
        Ok(None) => return None,
        Err(e) => return without(e.to_string()),
    };
    let found = match image::read_platform_image(source.as_ref(), platform) {
        Ok(found) => found,
        Err(e) => return without(e.to_string()),
    };
    if found.platform.os != platform.os || found.platform.arch != platform.arch {
        return None; // another platform's image: nothing of it fits
    }
    let label = found.config["config"]["Labels"][LIFECYCLE_METADATA_LABEL].as_str()?;
    let metadata: LifecycleMetadata = match serde_json::from_str(label) {
        Ok(metadata) => metadata,
        Err(e) => {
            return without(format!(
                "its {LIFECYCLE_METADATA_LABEL} label is not valid ({e})"
            ));
        }
    };
    let diff_ids = image::config_diff_ids(&found.config);
    if diff_ids.len() != found.layers.len() {
        return without("its config and manifest disagree on the number of layers".into());
    }
    Some(PreviousImage {
        source,
        layers: found.layers,
        diff_ids,
        metadata,
    })
}

/// Saves the build's cache layers after the export; a failure is a warning, as in the
/// lifecycle (the image is written by then).
fn save_cache(
    request: &BuildRequest,
    cache: Option<(CacheLocation, CacheRead)>,
    layers: &Path,
    owner: (u32, u32),
    platform: &Platform,
    staging: &Path,
    notes: &mut Vec<String>,
) -> Option<CacheSummary> {
    let (location, read) = cache?;
    let owner = crate::layer::cnb::Owner {
        uid: owner.0.into(),
        gid: owner.1.into(),
    };
    let saved = match &location {
        CacheLocation::Dir(dir) => cache::save_dir(dir, layers, owner),
        CacheLocation::Image(reference) => cache::save_image(
            reference,
            platform,
            layers,
            owner,
            read,
            Some(staging),
            &crate::progress::Progress::for_stderr(request.quiet),
        ),
    };
    match saved {
        Ok(report) => {
            for warning in &report.warnings {
                tracing::warn!("{warning}");
            }
            notes.push(format!(
                "cached {} layers in {location} ({} unchanged)",
                report.layers.len(),
                report.reused
            ));
            Some(CacheSummary {
                location: location.to_string(),
                report,
            })
        }
        Err(e) => {
            let line = format!("the cache was not saved: {e}");
            tracing::warn!("{line}");
            notes.push(line);
            None
        }
    }
}

/// The `created` time of every platform's image: SOURCE_DATE_EPOCH, else the lifecycle's
/// normalized time. One that is not a time is ignored, as the lifecycle does, with a warning
/// (not a -v note: the image's time is then not what the user asked for).
fn created_time(request: &BuildRequest, notes: &mut Vec<String>) -> String {
    let mut warnings = Vec::new();
    let created = crate::export::created_time(request.source_date_epoch.as_deref(), &mut warnings);
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    notes.extend(warnings);
    created
}

/// The app image being made: every platform's image goes into one assembly, so a layer
/// several platforms share is staged and compressed once.
struct Exporting<'a> {
    request: &'a BuildRequest,
    project: Option<&'a Project>,
    assembly: crate::assembly::Assembly,
    /// The `created` time of every platform's image.
    created: String,
    /// More than one platform: errors name the platform at fault.
    several: bool,
}

impl Exporting<'_> {
    /// Exports one platform's app image from `built` onto `run_image`.
    fn export(
        &mut self,
        built: &Built,
        run_image: OpenedRunImage,
        previous: Option<PreviousImage>,
        notes: &mut Vec<String>,
    ) -> Result<crate::export::Exported, BuildError> {
        let request = self.request;
        let platform = run_image.image.platform.clone();
        // The build image's launcher is for the machine the buildpacks ran on: a target of
        // another machine gets lathe's own launcher for it (or --launcher's).
        let builder_launcher = built.builder_launcher();
        let same_machine = built.platform.os == platform.os && built.platform.arch == platform.arch;
        let export_error = |message: String| {
            BuildError::Export(if self.several {
                format!("{platform}: {message}")
            } else {
                message
            })
        };
        let launcher = crate::launcher::choose_launcher(
            &platform,
            crate::launcher::flag_for(&request.launchers, &platform),
            Some(builder_launcher.as_path()).filter(|path| same_machine && path.is_file()),
        )
        .map_err(|e| export_error(e.to_string()))?;
        let run = run_image;
        let (run_toml_image, mut mirrors) = match run.run_toml {
            Some((image, mirrors)) => (Some(image), mirrors),
            None => (None, Vec::new()),
        };
        mirrors.extend(request.run_image_mirrors.iter().map(recorded_name));
        let exported = crate::export::export(
            &mut self.assembly,
            crate::export::ExportRequest {
                layers_dir: &built.layers,
                app_dir: &built.workspace,
                owner: crate::layer::cnb::Owner {
                    uid: built.owner.0.into(),
                    gid: built.owner.1.into(),
                },
                run_image: crate::export::RunImage {
                    source: run.source,
                    layers: run.image.layers,
                    manifest_digest: run.image.manifest.digest().to_string(),
                    config: run.image.config,
                    platform: run.image.platform,
                    name: run.name,
                    run_toml_image,
                    mirrors,
                },
                previous,
                launcher: &launcher.bytes,
                launcher_version: crate::export::launcher_version(),
                project_metadata: self
                    .project
                    .map(Project::source_metadata)
                    .unwrap_or_else(|| serde_json::json!({})),
                default_process: request.default_process.clone(),
                created: self.created.clone(),
                allow_foreign_binaries: request.allow_foreign_binaries,
            },
        )
        .map_err(|e| export_error(e.to_string()))?;
        for warning in &exported.warnings {
            tracing::warn!("{warning}");
        }
        notes.extend(exported.warnings.iter().cloned());
        Ok(exported)
    }
}

/// Sets the image's root (the one platform's manifest, or an index of every platform's) and
/// writes it to `--output`, then to every `--tag`.
fn write_outputs(
    request: &BuildRequest,
    assembly: &mut crate::assembly::Assembly,
    manifests: &[(Platform, oci_spec::image::Descriptor)],
    default_process: Option<String>,
) -> Result<ImageSummary, BuildError> {
    let root = assembly
        .set_root(manifests)
        .map_err(|e| BuildError::Export(e.to_string()))?;
    let progress = crate::progress::Progress::for_stderr(request.quiet);
    let mut references = Vec::new();
    let mut written = None;
    for destination in std::iter::once(&request.output).chain(&request.tags) {
        let report = assembly
            .write_to(destination, &progress)
            .map_err(|e| BuildError::Export(format!("writing {destination}: {e}")))?;
        written.get_or_insert(report);
        references.push(destination.to_string());
    }
    let report = written.expect("--output is always written");
    let platforms: Vec<String> = manifests.iter().map(|(p, _)| p.to_string()).collect();
    Ok(ImageSummary {
        digest: root.digest().to_string(),
        platform: platforms.join(","),
        references,
        default_process,
        blobs_written: report.blobs_copied,
        bytes_written: report.bytes_copied,
    })
}

/// Where the cache of `platform`'s build is kept: `--cache-dir` or `--cache-image`, one per
/// platform when there are several ([`CacheLocation::for_platform`]).
fn cache_location(
    request: &BuildRequest,
    platform: &Platform,
    several: bool,
) -> Result<Option<CacheLocation>, BuildError> {
    let location = match (&request.cache_dir, &request.cache_image) {
        (Some(dir), _) => CacheLocation::Dir(dir.clone()),
        (None, Some(reference)) => CacheLocation::Image(reference.clone()),
        (None, None) => return Ok(None),
    };
    if !several {
        return Ok(Some(location));
    }
    location
        .for_platform(platform)
        .map(Some)
        .map_err(BuildError::Usage)
}

fn copy_app(
    request: &BuildRequest,
    project: Option<&Project>,
    workspace: &Path,
) -> Result<(), BuildError> {
    project::copy_app(&request.app, workspace, project)
        .map(|_| ())
        .map_err(|e| BuildError::Invalid(format!("copying the app: {e}")))
}

/// Fills the platform directory: the `--platform-dir` contents, then `env/` files from
/// project.toml and `--env` (later wins); returns the binds of the service bindings.
fn prepare_platform_dir(
    request: &BuildRequest,
    project: Option<&Project>,
    dir: &Path,
) -> Result<Vec<Bind>, BuildError> {
    if let Some(seed) = &request.platform_dir {
        if !seed.is_dir() {
            return Err(BuildError::Usage(format!(
                "--platform-dir {}: not a directory",
                seed.display()
            )));
        }
        project::copy_app(seed, dir, None)
            .map_err(|e| BuildError::Invalid(format!("--platform-dir {}: {e}", seed.display())))?;
    }
    let env_dir = dir.join("env");
    let env = project
        .map(|p| p.env.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(request.env.iter().cloned());
    for (name, value) in env {
        if name.is_empty() || name.contains('/') || name.contains('.') || name.contains('=') {
            return Err(BuildError::Usage(format!(
                "--env {name:?}: not a usable variable name"
            )));
        }
        std::fs::create_dir_all(&env_dir).map_err(io(&env_dir))?;
        let file = env_dir.join(&name);
        std::fs::write(&file, value).map_err(io(&file))?;
    }
    let mut binds = Vec::new();
    for (name, source) in &request.bindings {
        let source = std::fs::canonicalize(source).map_err(|e| {
            BuildError::Usage(format!("--binding {name}={}: {e}", source.display()))
        })?;
        let mount_point = dir.join("bindings").join(name);
        std::fs::create_dir_all(&mount_point).map_err(io(&mount_point))?;
        binds.push(bind(&source, &format!("/platform/bindings/{name}"), true));
    }
    make_readable(dir)?;
    Ok(binds)
}

/// Binds `--buildpack` directories into /cnb/buildpacks and, when the buildpacks are given
/// (on the command line or in project.toml), writes `<layers>/order.toml` with one group of
/// them; returns the binds and whether it wrote the order. A multi-target buildpack's folder
/// for `platform` (the one the buildpacks run on, `<dir>/<os>/<arch>`, as pack lays them out)
/// is copied into `work` with its buildpack.toml and bound instead of the whole directory.
fn prepare_buildpacks(
    request: &BuildRequest,
    project: Option<&Project>,
    layers: &Path,
    platform: &Platform,
    work: &Path,
) -> Result<(Vec<Bind>, bool), BuildError> {
    let mut args = request.buildpacks.clone();
    if args.is_empty()
        && let Some(project) = project
    {
        for reference in &project.buildpacks {
            let arg = match (&reference.uri, &reference.id) {
                (Some(uri), _) => {
                    let path = uri.strip_prefix("file://").unwrap_or(uri);
                    let path = if Path::new(path).is_absolute() {
                        PathBuf::from(path)
                    } else {
                        request.app.join(path)
                    };
                    BuildpackArg::parse(&path.to_string_lossy()).map_err(|why| {
                        BuildError::Invalid(format!("project.toml buildpack {uri}: {why}"))
                    })?
                }
                (None, Some(id)) => BuildpackArg::Id {
                    id: id.clone(),
                    version: reference.version.clone().unwrap_or_default(),
                },
                (None, None) => {
                    return Err(BuildError::Invalid(
                        "project.toml: a buildpack entry has neither id nor uri".into(),
                    ));
                }
            };
            args.push(arg);
        }
    }
    if args.is_empty() {
        return Ok((Vec::new(), false));
    }
    let mut binds = Vec::new();
    let mut group = Vec::new();
    for arg in args {
        match arg {
            BuildpackArg::Dir(dir) => {
                let buildpack = descriptor::read(&dir)?;
                let folder = crate::distribution::platform_folder(&dir, platform);
                let source = if folder == dir {
                    dir
                } else {
                    let copy = work
                        .join("buildpacks")
                        .join(escape_id(&buildpack.id))
                        .join(&buildpack.version);
                    std::fs::create_dir_all(&copy).map_err(io(&copy))?;
                    let copied = project::copy_app(&folder, &copy, None).map(|_| ());
                    copied
                        .map_err(|e| BuildError::Invalid(format!("{}: {e}", folder.display())))?;
                    let descriptor = copy.join("buildpack.toml");
                    if !descriptor.exists() {
                        std::fs::copy(dir.join("buildpack.toml"), &descriptor)
                            .map_err(io(&descriptor))?;
                    }
                    make_readable(&copy)?;
                    copy
                };
                binds.push(bind(
                    &source,
                    &format!(
                        "/cnb/buildpacks/{}/{}",
                        escape_id(&buildpack.id),
                        buildpack.version
                    ),
                    true,
                ));
                group.push(OrderEntry {
                    id: buildpack.id,
                    version: buildpack.version,
                    optional: false,
                });
            }
            BuildpackArg::Id { id, version } => group.push(OrderEntry {
                id,
                version,
                optional: false,
            }),
        }
    }
    #[derive(serde::Serialize)]
    struct OrderFile {
        order: Vec<OrderGroup>,
    }
    #[derive(serde::Serialize)]
    struct OrderGroup {
        group: Vec<OrderEntry>,
    }
    let text = toml::to_string(&OrderFile {
        order: vec![OrderGroup { group }],
    })
    .expect("orders serialize");
    let path = layers.join("order.toml");
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok((binds, true))
}

/// Reads group.toml, the layers' types and config/metadata.toml from the layers directory.
fn read_outcome(layers: &Path, notes: Vec<String>) -> Result<BuildOutcome, BuildError> {
    let read = |path: &Path| -> Result<String, BuildError> {
        std::fs::read_to_string(path)
            .map_err(|e| BuildError::Invalid(format!("{}: {e}", path.display())))
    };
    let bad =
        |path: &Path, e: toml::de::Error| BuildError::Invalid(format!("{}: {e}", path.display()));
    let group_path = layers.join("group.toml");
    let group: GroupFile = toml::from_str(&read(&group_path)?).map_err(|e| bad(&group_path, e))?;
    let metadata_path = layers.join("config/metadata.toml");
    let metadata: toml::Value =
        toml::from_str(&read(&metadata_path)?).map_err(|e| bad(&metadata_path, e))?;
    let mut summaries = Vec::new();
    for member in &group.group {
        let dir = layers.join(escape_id(&member.id));
        let files = lifecycle::launch::read_layer_files(&dir)
            .map_err(|(path, why)| BuildError::Invalid(format!("{}: {why}", path.display())))?;
        for file in files.into_iter().filter(|f| dir.join(&f.name).is_dir()) {
            let types = &file.layer.types;
            summaries.push(LayerSummary {
                buildpack: member.id.clone(),
                name: file.name,
                launch: types.launch,
                build: types.build,
                cache: types.cache,
            });
        }
    }
    Ok(BuildOutcome {
        group: group.group,
        layers: summaries,
        metadata: serde_json::to_value(metadata).unwrap_or_default(),
        image: None,
        platforms: Vec::new(),
        cross_strategy: None,
        cache: None,
        notes,
    })
}

fn bind(source: &Path, target: &str, read_only: bool) -> Bind {
    Bind {
        source: source.to_path_buf(),
        target: target.to_string(),
        read_only,
    }
}

fn make_dir(parent: &Path, name: &str) -> Result<PathBuf, BuildError> {
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(io(&path))?;
    Ok(path)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BuildError + '_ {
    move |e| BuildError::Invalid(format!("{}: {e}", path.display()))
}

/// Gives `uid:gid` everything under `dir` (root only: the build user must own its work area).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), BuildError> {
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|e| BuildError::Invalid(format!("{}: {e}", dir.display())))?;
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid)).map_err(io(entry.path()))?;
    }
    Ok(())
}

/// Directories 0755 and files at least 0644, so the build user can read what root wrote.
fn make_readable(dir: &Path) -> Result<(), BuildError> {
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|e| BuildError::Invalid(format!("{}: {e}", dir.display())))?;
        if entry.path_is_symlink() {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(|e| BuildError::Invalid(e.to_string()))?;
        let mode = meta.permissions().mode();
        let wanted = if meta.is_dir() {
            mode | 0o755
        } else {
            mode | 0o644
        };
        if wanted != mode {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(wanted))
                .map_err(io(entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildpack_arguments_are_directories_or_ids() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            BuildpackArg::parse(&dir.path().to_string_lossy()).unwrap(),
            BuildpackArg::Dir(std::fs::canonicalize(dir.path()).unwrap())
        );
        assert_eq!(
            BuildpackArg::parse("paketo-buildpacks/node@1.2.3").unwrap(),
            BuildpackArg::Id {
                id: "paketo-buildpacks/node".into(),
                version: "1.2.3".into()
            }
        );
        assert_eq!(
            BuildpackArg::parse("x").unwrap(),
            BuildpackArg::Id {
                id: "x".into(),
                version: String::new()
            }
        );
        let err = BuildpackArg::parse("docker://example/bp").unwrap_err();
        assert!(err.contains("not yet supported"), "{err}");
        assert!(BuildpackArg::parse("/no/such/dir").is_err());
    }
}
