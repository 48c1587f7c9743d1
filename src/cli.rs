//! The command line: clap definitions and a thin dispatch onto the library. Man pages and
//! shell completions are generated from these same definitions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::image;
use crate::inspect;
use crate::layout::Layout;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry;

/// Exit code for bad arguments (cli-conventions.md).
pub const EXIT_USAGE: i32 = 3;
/// Exit code for every other failure.
pub const EXIT_FAILURE: i32 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "lathe",
    version,
    about = "Build OCI images from source with Cloud Native Buildpacks: no daemon, no root",
    long_about = "lathe turns application source into OCI images with real Cloud Native Buildpacks, \
                  with no Docker daemon, no root and no privileged container. It reads and writes \
                  images in registries (docker://), OCI layouts (oci:DIR[:ref]), OCI archives \
                  (oci-archive:FILE[:ref]) and docker save archives (docker-archive:FILE[:ref])."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Print only errors
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (repeat for more)
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Registry user name and password, used for every registry
    #[arg(
        long,
        global = true,
        value_name = "USER:PASS",
        help_heading = "Registry options"
    )]
    pub creds: Option<String>,
    /// Docker config.json with registry credentials [default: $DOCKER_CONFIG/config.json, then
    /// ~/.docker/config.json, then containers' auth.json; CNB_REGISTRY_AUTH wins over files]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Registry options"
    )]
    pub authfile: Option<PathBuf>,
    /// Trust this CA certificate (PEM) for registries, besides the system's and
    /// /etc/{containers,docker}/certs.d/HOST[:PORT]/*.crt (repeatable)
    #[arg(
        long = "ca-cert",
        global = true,
        value_name = "FILE",
        help_heading = "Registry options"
    )]
    pub ca_cert: Vec<PathBuf>,
    /// Do not verify this registry's TLS certificate, and allow plain http (repeatable or
    /// comma-separated; 127.0.0.1 and localhost always fall back to http)
    #[arg(
        long = "insecure-registry",
        global = true,
        value_name = "HOST",
        value_delimiter = ',',
        env = "CNB_INSECURE_REGISTRIES",
        hide_env_values = true,
        help_heading = "Registry options"
    )]
    pub insecure_registry: Vec<String>,
    /// Seconds a registry may stay silent (connecting, or within an answer) before the step is
    /// retried
    #[arg(
        long = "registry-timeout",
        global = true,
        value_name = "SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..),
        help_heading = "Registry options"
    )]
    pub registry_timeout: u64,
}

/// Bad arguments found after parsing (exit code 3). The message never quotes a credential.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl GlobalArgs {
    /// The registry settings these flags and the environment give.
    pub fn registry_settings(&self) -> Result<registry::Settings, UsageError> {
        let mut settings = registry::Settings::from_env();
        if let Some(creds) = &self.creds {
            let (user, password) = creds
                .split_once(':')
                .filter(|(u, _)| !u.is_empty())
                .ok_or_else(|| UsageError("--creds must be USER:PASSWORD".into()))?;
            settings.creds = Some((user.to_string(), password.to_string()));
        }
        settings.authfile = self.authfile.clone();
        settings.ca_certs = self.ca_cert.clone();
        settings.insecure = self
            .insecure_registry
            .iter()
            .flat_map(|h| registry::settings::parse_host_list(h))
            .collect();
        settings.timeout = std::time::Duration::from_secs(self.registry_timeout);
        Ok(settings)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy an image or a whole index between transports
    Copy(CopyArgs),
    /// Show an image or index: platforms, layers, config and Buildpacks labels
    Inspect(InspectArgs),
    /// Unpack an image's root filesystem into a directory, rootless
    Unpack(UnpackArgs),
    /// Remove blobs that no image in an OCI layout refers to
    Gc(GcArgs),
    /// Run an image's process in the rootless sandbox (any platform)
    Run(RunArgs),
    /// Build an app with buildpacks: detect and build in the build image, rootless
    Build(Box<BuildArgs>),
    /// Move an app image (or a whole index) onto a new run image without rebuilding it
    #[command(
        long_about = "Move an app image onto a new run image without rebuilding it, as the \
                      lifecycle's rebaser does: the layers up to the label's runImage.topLayer \
                      are replaced by the new run image's, the app's layers and config are kept, \
                      and the io.buildpacks.lifecycle.metadata label and the io.buildpacks.base.* \
                      labels are updated. For Platform API 0.12 and later, an image labelled \
                      io.buildpacks.rebasable=false, a run image whose os, arch, variant or \
                      distro does not satisfy the app's, or one the label does not name as its \
                      run image or a mirror is refused unless --force; for older ones the stack \
                      id and mixins must match. An index is rebased platform by platform onto \
                      the run image's matching children. Without --output IMAGE itself is \
                      replaced, atomically. On a registry no layer is downloaded or uploaded: the \
                      new run image's are mounted from its repository or already there. Exit code \
                      72 when the rebase fails."
    )]
    Rebase(RebaseArgs),
    /// List or prune the store of unpacked root filesystems
    #[command(subcommand)]
    Store(StoreCommand),
    /// Package buildpacks as buildpackage images
    #[command(subcommand)]
    Buildpack(BuildpackCommand),
    /// Create builder images
    #[command(subcommand)]
    Builder(BuilderCommand),
    /// Print a shell completion script
    Completions(CompletionsArgs),
}

#[derive(Debug, Subcommand)]
pub enum BuildpackCommand {
    /// Package a buildpack directory (and its package.toml dependencies) as a buildpackage
    /// image; oci-archive:FILE writes the .cnb format
    #[command(
        long_about = "Package a buildpack directory as a buildpackage image: one layer per \
                      buildpack at /cnb/buildpacks/<id>/<version>, with the \
                      io.buildpacks.buildpackage.metadata and io.buildpacks.buildpack.layers \
                      labels. A composite buildpack (with [[order]]) is packaged with the \
                      [[dependencies]] of --config package.toml (uri = a directory, a .cnb file \
                      or an image), whose layers are reused. Several platforms give one image \
                      each and an index; <DIR>/<os>/<arch>[/<variant>] folders, when present, \
                      are packaged for their platform. The same input always gives the same \
                      digests."
    )]
    Package(PackageArgs),
}

#[derive(Debug, Subcommand)]
pub enum BuilderCommand {
    /// Create a builder image from a pack-style builder.toml
    #[command(
        long_about = "Create a builder image from a pack-style builder.toml: the build image \
                      ([build] image) with a layer per buildpack ([[buildpacks]] uri = a \
                      directory, a .cnb file or an image) and a layer with /cnb/order.toml, \
                      /cnb/run.toml, /cnb/stack.toml, /cnb/build-config/env, /workspace, /layers \
                      and /platform, and the CNB launcher at /cnb/lifecycle/launcher (lathe's own, \
                      or --launcher). Several platforms (--platform or [[targets]]) give \
                      one image each and an index."
    )]
    Create(BuilderCreateArgs),
}

#[derive(Debug, Args)]
pub struct PackageArgs {
    /// The buildpack directory (holding buildpack.toml)
    pub dir: PathBuf,
    /// Where to write the buildpackage (any transport; oci-archive:FILE is a .cnb file)
    #[arg(long, value_name = "DEST", value_parser = parse_ref)]
    pub output: ImageRef,
    /// package.toml: [[dependencies]] uri, [[targets]], [platform] os
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Package for these platforms (os/arch[/variant]; repeatable or comma-separated)
    /// [default: the [[targets]] of package.toml or buildpack.toml, else the host's arch]
    #[arg(long, value_name = "PLATFORM", value_delimiter = ',', value_parser = parse_platform)]
    pub platform: Vec<Platform>,
    /// Print the result (digest, platforms, buildpacks) as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuilderCreateArgs {
    /// builder.toml (relative buildpack uris are relative to its directory)
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where to write the builder (any transport)
    #[arg(long, value_name = "DEST", value_parser = parse_ref)]
    pub output: ImageRef,
    /// Create the builder for these platforms (os/arch[/variant]; repeatable or
    /// comma-separated) [default: builder.toml's [[targets]], else the build image's platform]
    #[arg(long, value_name = "PLATFORM", value_delimiter = ',', value_parser = parse_platform)]
    pub platform: Vec<Platform>,
    /// The launcher (/cnb/lifecycle/launcher) for PLATFORM, instead of lathe's own (repeatable;
    /// required for platforms other than linux/amd64 and linux/arm64)
    #[arg(long, value_name = "PLATFORM=PATH", value_parser = crate::launcher::parse_launcher_arg)]
    pub launcher: Vec<(Platform, PathBuf)>,
    /// Print the result (digest, platforms, buildpacks) as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store directory (default: $XDG_CACHE_HOME/lathe or ~/.cache/lathe)
    #[arg(long, value_name = "DIR", env = "LATHE_STORE")]
    pub store: Option<PathBuf>,
}

impl StoreArgs {
    fn dir(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(crate::store::Store::default_dir)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image reference
    #[arg(value_parser = parse_ref)]
    pub image: ImageRef,
    /// The platform to run from an index (default: the host's); foreign ones are emulated
    #[arg(long, value_name = "PLATFORM", value_parser = parse_platform)]
    pub platform: Option<Platform>,
    /// Run this CNB process type (/cnb/process/TYPE) instead of the entrypoint
    #[arg(long, value_name = "TYPE")]
    pub process: Option<String>,
    /// Set an environment variable (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Bind a host file or directory (repeatable)
    #[arg(long, value_name = "HOST:CONTAINER[:ro]", value_parser = parse_volume)]
    pub volume: Vec<crate::sandbox::Bind>,
    /// The process's network: none (loopback only) or default (the host's)
    #[arg(long, value_enum, default_value = "none")]
    pub network: NetworkArg,
    /// How to isolate the process
    #[arg(long, value_enum, default_value = "auto")]
    pub sandbox: crate::run::SandboxMode,
    /// Kill the sandbox after this many seconds
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Arguments replacing the image's command (after --)
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The app's source directory (copied into the build; never changed)
    pub app: PathBuf,
    /// Where the image goes (required: there is no daemon to default to)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub output: ImageRef,
    /// The builder image (build image + buildpacks + order + run image)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub builder: Option<ImageRef>,
    /// A build image to use instead of a builder (with --run-image and --buildpack)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub build_image: Option<ImageRef>,
    /// The run image (default: the builder's)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub run_image: Option<ImageRef>,
    /// A buildpack directory, or ID[@VERSION] of one the builder has; repeatable, in order
    /// (replaces the builder's order with one group)
    #[arg(long, value_name = "DIR|ID[@VERSION]", value_parser = crate::build::BuildpackArg::parse)]
    pub buildpack: Vec<crate::build::BuildpackArg>,
    /// The platforms to build for (os/arch[/variant]; repeatable or comma-separated)
    /// [default: the host's]. Several make one image index; the buildpacks run on this machine
    /// for every target and see the target in CNB_TARGET_*
    #[arg(long, value_name = "PLATFORM", value_delimiter = ',', value_parser = parse_platform)]
    pub platform: Vec<Platform>,
    /// How platforms after the first get their layers: run the buildpacks again (rebuild),
    /// put the first build's layers onto each run image (reuse), or reuse when the first build
    /// made no ELF program and no buildpack declares per-architecture targets (auto)
    #[arg(long, value_enum, default_value = "auto")]
    pub cross_strategy: crate::build::CrossStrategy,
    /// Build a target of another machine in the builder's own image for it, under emulation
    /// (qemu in the sandbox's binfmt_misc), instead of running the buildpacks on this machine
    #[arg(long)]
    pub emulate: bool,
    /// A build-time environment variable for the buildpacks (repeatable; K alone takes
    /// lathe's own value)
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// A file of K=V lines for the buildpacks (repeatable; # comments and blank lines skipped)
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Bind a host file or directory into the build (repeatable)
    #[arg(long, value_name = "HOST:CONTAINER[:ro]", value_parser = parse_volume)]
    pub volume: Vec<crate::sandbox::Bind>,
    /// A service binding, at /platform/bindings/NAME (repeatable)
    #[arg(long, value_name = "NAME=DIR", value_parser = parse_binding)]
    pub binding: Vec<(String, PathBuf)>,
    /// A directory whose contents seed the buildpacks' platform directory
    #[arg(long, value_name = "DIR")]
    pub platform_dir: Option<PathBuf>,
    /// project.toml to use (default: the app's own)
    #[arg(long, value_name = "FILE")]
    pub descriptor: Option<PathBuf>,
    /// The buildpacks' network: default (the host's) or none (loopback only)
    #[arg(long, value_enum, default_value = "default")]
    pub network: NetworkArg,
    /// How to isolate the buildpacks
    #[arg(long, value_enum, default_value = "auto")]
    pub sandbox: crate::run::SandboxMode,
    /// Kill the build after this many seconds
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// The limit on each buildpack's bin/detect, in seconds
    #[arg(long, value_name = "SECONDS", default_value = "300")]
    pub detect_timeout: u64,
    /// Keep the buildpacks' cache layers in this directory between builds (the lifecycle's
    /// volume cache format: committed/<diffID>.tar)
    #[arg(long, value_name = "DIR", conflicts_with = "cache_image")]
    pub cache_dir: Option<PathBuf>,
    /// Keep the buildpacks' cache layers in this image between builds (the lifecycle's cache
    /// image format; any transport)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub cache_image: Option<ImageRef>,
    /// Don't restore the cache before building (it is still saved after)
    #[arg(long)]
    pub clear_cache: bool,
    /// Let programs (ELF) for another machine than the target's into the image's launch and
    /// app layers, with a warning (by default they fail the export, naming each file)
    #[arg(long)]
    pub allow_foreign_binaries: bool,
    /// Another registry name of the run image, recorded in the app's rebase metadata
    /// (repeatable): where a site copies the run image to, so that `lathe rebase` there
    /// finds it (one on the app's own registry is tried first)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub run_image_mirror: Vec<ImageRef>,
    /// The image whose layers this build reuses (default: --output, when it is a registry or
    /// an OCI layout)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub previous_image: Option<ImageRef>,
    /// The process type the image starts by default (default: the buildpacks' default)
    #[arg(long, value_name = "TYPE")]
    pub default_process: Option<String>,
    /// Another name for the image (repeatable)
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub tag: Vec<ImageRef>,
    /// The launcher (/cnb/lifecycle/launcher) for PLATFORM, instead of the builder's or
    /// lathe's own (repeatable)
    #[arg(long, value_name = "PLATFORM=PATH", value_parser = crate::launcher::parse_launcher_arg)]
    pub launcher: Vec<(Platform, PathBuf)>,
    /// Print the result (group, layers, processes, image digest) as JSON on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// The app image or index to rebase (any transport)
    #[arg(value_parser = parse_ref)]
    pub image: ImageRef,
    /// The new run image, an image or an index [default: the run image the app's label names,
    /// or a mirror of it, one on the app's registry first]
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub run_image: Option<ImageRef>,
    /// Where to write the rebased image (any transport) [default: replace IMAGE]
    #[arg(long, value_name = "DEST", value_parser = parse_ref)]
    pub output: Option<ImageRef>,
    /// Rebase even when the image is labelled not rebasable, the run image's target does not
    /// satisfy the app's, or the label does not name the run image (warnings instead)
    #[arg(long)]
    pub force: bool,
    /// Print the result (digest, platforms, old and new run images, blobs written) as JSON on
    /// stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum NetworkArg {
    None,
    Default,
}

impl From<NetworkArg> for crate::sandbox::Network {
    fn from(arg: NetworkArg) -> Self {
        match arg {
            NetworkArg::None => crate::sandbox::Network::None,
            NetworkArg::Default => crate::sandbox::Network::Host,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the unpacked root filesystems in the store
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Remove leftovers of killed runs and root filesystems unused for a while
    Prune {
        #[command(flatten)]
        store: StoreArgs,
        /// Remove every root filesystem
        #[arg(long)]
        all: bool,
        /// Keep root filesystems used within this many days
        #[arg(long, value_name = "DAYS", default_value_t = 7, conflicts_with = "all")]
        unused_days: u64,
    },
}

#[derive(Debug, Args)]
pub struct PlatformArgs {
    /// Only these platforms (os/arch[/variant]; repeatable or comma-separated)
    #[arg(long, value_name = "PLATFORM", value_delimiter = ',', value_parser = parse_platform)]
    pub platform: Vec<Platform>,
    /// Keep every platform of an index (the default)
    #[arg(long, conflicts_with = "platform")]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source image reference
    #[arg(value_parser = parse_ref)]
    pub source: ImageRef,
    /// Destination image reference
    #[arg(value_parser = parse_ref)]
    pub destination: ImageRef,
    #[command(flatten)]
    pub platforms: PlatformArgs,
    /// Print the result (digest, platforms) as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Image reference
    #[arg(value_parser = parse_ref)]
    pub image: ImageRef,
    #[command(flatten)]
    pub platforms: PlatformArgs,
    /// Print a JSON report on stdout
    #[arg(long, conflicts_with = "raw")]
    pub json: bool,
    /// Print the manifest or index exactly as stored
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// Image reference
    #[arg(value_parser = parse_ref)]
    pub image: ImageRef,
    /// Directory to create (it must not exist, or be empty)
    pub dir: PathBuf,
    /// The platform to unpack from an index (default: the host's)
    #[arg(long, value_name = "PLATFORM", value_parser = parse_platform)]
    pub platform: Option<Platform>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The layout: oci:DIR
    #[arg(value_parser = parse_ref)]
    pub layout: ImageRef,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell
    pub shell: clap_complete::Shell,
}

fn parse_ref(text: &str) -> Result<ImageRef, String> {
    text.parse()
        .map_err(|e: crate::reference::ReferenceError| e.why)
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?}: use K=V")),
    }
}

fn parse_binding(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("{text:?}: use NAME=DIR")),
    }
}

fn parse_volume(text: &str) -> Result<crate::sandbox::Bind, String> {
    let (spec, read_only) = match text.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    let (host, inside) = spec
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: use HOST:CONTAINER[:ro]"))?;
    if !inside.starts_with('/') {
        return Err(format!("{text:?}: the container path must be absolute"));
    }
    let source = std::fs::canonicalize(host).map_err(|e| format!("{host}: {e}"))?;
    Ok(crate::sandbox::Bind {
        source,
        target: inside.to_string(),
        read_only,
    })
}

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse()
        .map_err(|e: crate::platform::PlatformError| e.to_string())
}

pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs a parsed command line; errors carry the thing at fault.
/// Returns the process's exit code (0 unless `lathe run` says otherwise).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    registry::configure(cli.global.registry_settings()?);
    match cli.command {
        Command::Copy(args) => {
            let report = image::copy_with_progress(
                &args.source,
                &args.destination,
                &args.platforms.platform,
                &Progress::for_stderr(cli.global.quiet),
            )?;
            if let Some(note) = &report.note
                && !cli.global.quiet
            {
                eprintln!("{note}");
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if !cli.global.quiet {
                eprintln!(
                    "Copied {} to {}: {} ({} blobs, {} bytes written)",
                    args.source,
                    args.destination,
                    report.digest,
                    report.blobs_copied,
                    report.bytes_copied
                );
            }
        }
        Command::Inspect(args) => {
            let source = image::open_source(&args.image)?;
            let mut out = std::io::stdout().lock();
            if args.raw {
                out.write_all(&inspect::raw(source.as_ref(), &args.platforms.platform)?)?;
            } else {
                let report = inspect::inspect(source.as_ref(), &args.platforms.platform)?;
                if args.json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
                } else {
                    out.write_all(inspect::render(&report).as_bytes())?;
                }
            }
        }
        Command::Unpack(args) => {
            let source = image::open_source(&args.image)?;
            let selection = image::Selection {
                platforms: args.platform.into_iter().collect(),
                single_image: true,
            };
            let resolved = image::resolve_selection(source.as_ref(), &selection)?;
            if let Some(note) = &resolved.note
                && !cli.global.quiet
            {
                eprintln!("{note}");
            }
            let progress = crate::progress::TerminalProgress::new("unpacking", cli.global.quiet);
            let report =
                crate::unpack::unpack(source.as_ref(), &resolved.root, &args.dir, &progress)?;
            for warning in &report.warnings {
                tracing::warn!("{warning}");
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if !cli.global.quiet {
                eprintln!(
                    "Unpacked {} ({} layers, {} entries) into {}",
                    args.image,
                    report.layers,
                    report.entries,
                    args.dir.display()
                );
            }
        }
        Command::Gc(args) => {
            let ImageRef::Layout { dir, name: None } = &args.layout else {
                anyhow::bail!(
                    "{}: gc takes an OCI layout, oci:DIR (with no ref name)",
                    args.layout
                );
            };
            let (removed, freed) = Layout::open(dir)?
                .gc()
                .with_context(|| format!("gc of {}", args.layout))?;
            if !cli.global.quiet {
                eprintln!(
                    "Removed {removed} unreferenced blobs ({freed} bytes) from {}",
                    args.layout
                );
            }
        }
        Command::Run(args) => return run_command(args, cli.global.quiet),
        Command::Build(args) => return build_command(*args, cli.global.quiet),
        Command::Rebase(args) => {
            let request = crate::rebase::RebaseRequest {
                image: args.image,
                run_image: args.run_image,
                output: args.output,
                force: args.force,
                staging_parent: None,
            };
            let progress = Progress::for_stderr(cli.global.quiet || args.json);
            let outcome = crate::rebase::rebase(&request, &progress)?;
            if !cli.global.quiet {
                for note in &outcome.notes {
                    eprintln!("note: {note}");
                }
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else if !cli.global.quiet {
                eprint!("{}", crate::rebase::describe(&outcome));
            }
        }
        Command::Store(StoreCommand::Ls { store, json }) => {
            let dir = store.dir();
            let records = crate::store::Store::open(&dir)?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                for r in records {
                    println!(
                        "{}  {:<12} {:>10} bytes  used {}s ago  {}",
                        r.digest, r.platform, r.bytes, r.last_used_secs_ago, r.source
                    );
                }
            }
        }
        Command::Store(StoreCommand::Prune {
            store,
            all,
            unused_days,
        }) => {
            let unused_for = (!all).then(|| Duration::from_secs(unused_days * 86_400));
            let report = crate::store::Store::prune(&store.dir(), unused_for)?;
            if !cli.global.quiet {
                eprintln!(
                    "Removed {} root filesystems and {} scratch directories ({} bytes)",
                    report.root_filesystems, report.scratch_dirs, report.bytes
                );
            }
        }
        Command::Buildpack(BuildpackCommand::Package(args)) => {
            let request = crate::distribution::PackageRequest {
                buildpack_dir: args.dir,
                config: args.config,
                platforms: args.platform,
                output: args.output.clone(),
            };
            let progress = Progress::for_stderr(cli.global.quiet);
            let report = crate::distribution::package_buildpack(&request, &progress)?;
            print_distribution_report(&report, args.json, cli.global.quiet, |r| {
                format!(
                    "Packaged {} for {} into {}: {}",
                    r.buildpacks.join(", "),
                    r.platforms.join(", "),
                    args.output,
                    r.digest
                )
            })?;
        }
        Command::Builder(BuilderCommand::Create(args)) => {
            let request = crate::distribution::BuilderRequest {
                config: args.config,
                platforms: args.platform,
                output: args.output.clone(),
                launchers: args.launcher,
            };
            let progress = Progress::for_stderr(cli.global.quiet);
            let report = crate::distribution::create_builder(&request, &progress)?;
            print_distribution_report(&report, args.json, cli.global.quiet, |r| {
                format!(
                    "Created a builder for {} with {} into {}: {}",
                    r.platforms.join(", "),
                    r.buildpacks.join(", "),
                    args.output,
                    r.digest
                )
            })?;
        }
        Command::Completions(args) => {
            clap_complete::generate(args.shell, &mut command(), "lathe", &mut std::io::stdout());
        }
    }
    Ok(0)
}

/// Notes on stderr (unless quiet), then the JSON report on stdout or `summary` on stderr.
fn print_distribution_report(
    report: &crate::distribution::DistributionReport,
    json: bool,
    quiet: bool,
    summary: impl Fn(&crate::distribution::DistributionReport) -> String,
) -> anyhow::Result<()> {
    if !quiet {
        for note in &report.notes {
            eprintln!("note: {note}");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else if !quiet {
        eprintln!("{}", summary(report));
    }
    Ok(())
}

/// Set by SIGINT/SIGTERM while a sandbox runs; the sandbox is then killed.
static CANCELLED: AtomicBool = AtomicBool::new(false);

extern "C" fn cancel_on_signal(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
}

fn cancel_on_interrupt() -> anyhow::Result<()> {
    let handler = nix::sys::signal::SigHandler::Handler(cancel_on_signal);
    for signal in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::signal(signal, handler) }?;
    }
    Ok(())
}

/// `--env` and `--env-file` as K=V pairs, in order (a bare K takes lathe's own value).
fn build_env(args: &BuildArgs) -> Result<Vec<(String, String)>, UsageError> {
    let mut env = Vec::new();
    for file in &args.env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| UsageError(format!("--env-file {}: {e}", file.display())))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| {
                UsageError(format!(
                    "--env-file {} line {}: use K=V",
                    file.display(),
                    number + 1
                ))
            })?;
            env.push((k.trim().to_string(), v.to_string()));
        }
    }
    for text in &args.env {
        match text.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            Some(_) => return Err(UsageError(format!("--env {text:?}: use K=V"))),
            None => {
                if let Ok(v) = std::env::var(text) {
                    env.push((text.clone(), v));
                }
            }
        }
    }
    Ok(env)
}

fn build_command(args: BuildArgs, quiet: bool) -> anyhow::Result<i32> {
    let request = crate::build::BuildRequest {
        app: args.app.clone(),
        output: args.output.clone(),
        tags: args.tag.clone(),
        builder: args.builder.clone(),
        build_image: args.build_image.clone(),
        run_image: args.run_image.clone(),
        buildpacks: args.buildpack.clone(),
        platforms: args.platform.clone(),
        cross_strategy: args.cross_strategy,
        emulate: args.emulate,
        env: build_env(&args)?,
        volumes: args.volume.clone(),
        bindings: args.binding.clone(),
        platform_dir: args.platform_dir.clone(),
        descriptor: args.descriptor.clone(),
        network: args.network.into(),
        sandbox: args.sandbox,
        timeout: args.timeout.map(Duration::from_secs),
        detect_timeout: Some(Duration::from_secs(args.detect_timeout)),
        store: args.store.dir(),
        cache_dir: args.cache_dir.clone(),
        cache_image: args.cache_image.clone(),
        clear_cache: args.clear_cache,
        previous_image: args.previous_image.clone(),
        run_image_mirrors: args.run_image_mirror.clone(),
        allow_foreign_binaries: args.allow_foreign_binaries,
        default_process: args.default_process.clone(),
        launchers: args.launcher.clone(),
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH").ok(),
        quiet: quiet || args.json,
    };
    cancel_on_interrupt()?;
    let lathe_exe = std::env::current_exe().context("finding lathe's own executable")?;
    let progress = crate::progress::TerminalProgress::new("unpacking", quiet);
    let outcome = crate::build::build(&request, &lathe_exe, &CANCELLED, &progress)?;
    for note in &outcome.notes {
        tracing::info!("{note}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    }
    if !quiet {
        eprint!("{}", crate::build::describe(&outcome));
    }
    Ok(0)
}

fn run_command(args: RunArgs, quiet: bool) -> anyhow::Result<i32> {
    let source = image::open_source(&args.image)?;
    let request = crate::run::RunRequest {
        platform: args.platform,
        process: args.process,
        env: args.env,
        volumes: args.volume,
        network: args.network.into(),
        sandbox: args.sandbox,
        timeout: args.timeout.map(Duration::from_secs),
        args: args.args,
        store: args.store.dir(),
    };
    cancel_on_interrupt()?;
    let lathe_exe = std::env::current_exe().context("finding lathe's own executable")?;
    let progress = crate::progress::TerminalProgress::new("unpacking", quiet);
    let outcome =
        crate::run::run_image(source.as_ref(), &request, &lathe_exe, &CANCELLED, &progress)?;
    for note in &outcome.notes {
        tracing::info!("{note}");
    }
    Ok(outcome.exit_code)
}

/// Writes a man page for lathe, each subcommand and each nested subcommand into `dir`.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let cmd = command();
    let mut written = Vec::new();
    let mut render = |cmd: clap::Command, name: String| -> std::io::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.name(name.clone())).render(&mut buf)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, buf)?;
        written.push(path);
        Ok(())
    };
    render(cmd.clone(), "lathe".into())?;
    for sub in cmd.get_subcommands() {
        let name = format!("lathe-{}", sub.get_name());
        render(sub.clone(), name.clone())?;
        for nested in sub.get_subcommands() {
            render(nested.clone(), format!("{name}-{}", nested.get_name()))?;
        }
    }
    Ok(written)
}

/// The exit code for an error: 3 for bad arguments, 126/127 when `lathe run` can't execute
/// the program, the lifecycle's codes for `lathe build` and `lathe rebase` (72), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(e) = err.downcast_ref::<crate::run::RunError>() {
        return e.exit_code();
    }
    if let Some(e) = err.downcast_ref::<crate::build::BuildError>() {
        return e.exit_code();
    }
    if let Some(e) = err.downcast_ref::<crate::rebase::RebaseError>() {
        return e.exit_code();
    }
    if err.downcast_ref::<UsageError>().is_some() {
        return EXIT_USAGE;
    }
    match err.downcast_ref::<image::ImageError>() {
        Some(e) if e.is_usage() => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}
