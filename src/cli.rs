//! The command line: clap definitions and a thin dispatch onto the library. Man pages and
//! shell completions are generated from these same definitions.

use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// Print a shell completion script
    Completions(CompletionsArgs),
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

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse()
        .map_err(|e: crate::platform::PlatformError| e.to_string())
}

pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs a parsed command line; errors carry the thing at fault.
pub fn run(cli: Cli) -> anyhow::Result<()> {
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
            let report = crate::unpack::unpack(source.as_ref(), &resolved.root, &args.dir)?;
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
        Command::Completions(args) => {
            clap_complete::generate(args.shell, &mut command(), "lathe", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// Writes a man page for lathe and for each subcommand into `dir`.
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
        render(sub.clone(), format!("lathe-{}", sub.get_name()))?;
    }
    Ok(written)
}

/// The exit code for an error: 3 for bad arguments, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<UsageError>().is_some() {
        return EXIT_USAGE;
    }
    match err.downcast_ref::<image::ImageError>() {
        Some(e) if e.is_usage() => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}
