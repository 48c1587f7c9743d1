//! The build phase: each buildpack of the detected group runs its `bin/build` in group order,
//! the way the reference lifecycle's builder runs it (`phase/builder.go`,
//! `buildpack/build.go`), and what they leave behind becomes `<layers>/config/metadata.toml`
//! and the SBOM tree under `<layers>/sbom`.
//!
//! Per buildpack: its share of the plan goes to a fresh file, `bin/build` runs with the build
//! environment, then its layers are typed (untyped ones set aside as `<layer>.ignore`), its
//! build layers change the environment of every later buildpack, `build.toml` hands unmet
//! plan entries on, its SBOM files are checked, and `launch.toml` adds processes, labels and
//! slices.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use super::descriptor::Buildpack;
use super::env::{Action, Env};
use super::launch::{self, LayerFile, LayerTypes, Process, RESERVED_LAYER_NAMES};
use super::order;
use super::{ApiVersion, LifecycleError, Paths, PlanFile, Require, TargetData, escape_id};

pub use super::launch::BuildMetadata;

/// Everything the build phase needs.
pub struct BuildRequest<'a> {
    pub paths: &'a Paths,
    pub group: &'a [Buildpack],
    pub plan: &'a PlanFile,
    /// The run image's target, for `CNB_TARGET_*`; an empty distro is read from `os_release`.
    pub target: &'a TargetData,
    pub os_release: &'a Path,
    /// The lifecycle's own environment, filtered ([`Env::filtered`]).
    pub env: &'a Env,
    /// `CNB_EXEC_ENV` for Buildpack API ≥ 0.12.
    pub exec_env: &'a str,
    pub platform_api: ApiVersion,
}

/// Runs the group's `bin/build`s and writes `<layers>/config/metadata.toml`.
pub fn build(req: &BuildRequest) -> Result<BuildMetadata, LifecycleError> {
    let sbom_dir = req.paths.layers.join("sbom");
    remove_dir_if_present(&sbom_dir)
        .map_err(|e| LifecycleError::Build(format!("{}: {e}", sbom_dir.display())))?;
    // The same defaults detection used, so both phases show buildpacks the same target.
    let target = order::build_target(req.target, req.os_release);
    let mut running_env = req.env.clone();
    let mut plan = req.plan.clone();
    let mut processes = ProcessTable::default();
    let mut labels = Vec::new();
    let mut slices = Vec::new();
    let mut sboms = Vec::new();

    for bp in req.group {
        let fail =
            |why: String| LifecycleError::Build(format!("buildpack {}: {why}", bp.name_version()));
        let bp_layers = req.paths.layers.join(escape_id(&bp.id));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o777)
            .create(&bp_layers)
            .map_err(|e| fail(format!("{}: {e}", bp_layers.display())))?;
        let bp_plan = plan_for(&plan, &bp.id);
        let plan_dir = tempfile::Builder::new()
            .prefix(&format!("{}-", escape_id(&bp.id)))
            .tempdir()
            .map_err(|e| fail(format!("creating a directory for its plan: {e}")))?;
        let plan_path = plan_dir.path().join("plan.toml");
        write_plan(&plan_path, &bp_plan)
            .map_err(|why| fail(format!("{}: {why}", plan_path.display())))?;

        let env = buildpack_env(req, bp, &running_env, &target, &bp_layers, &plan_path)?;
        run_bin_build(
            bp,
            &bp_layers,
            &req.paths.platform,
            &plan_path,
            &req.paths.app,
            &env,
        )?;

        let layers = read_layers(bp, &bp_layers)?;
        apply_build_layers(&bp_layers, &layers, &mut running_env)
            .map_err(|e| fail(e.to_string()))?;
        let met = met_requires(bp, &bp_layers, &bp_plan)?;
        plan.entries
            .retain(|entry| !entry.requires.iter().any(|r| met.contains(&r.name)));
        sboms.extend(sbom_files(bp, &bp_layers, &layers)?);
        if let Some(launch) = read_launch_toml(bp, &bp_layers)? {
            for process in &launch.processes {
                let metadata = process.to_metadata(&bp.id, req.platform_api);
                processes.add(metadata, process.default);
            }
            labels.extend(launch.labels);
            slices.extend(launch.slices);
        }
    }

    if req.platform_api >= ApiVersion::new(0, 8) {
        place_sboms(&sbom_dir, &sboms)?;
    }
    let metadata = BuildMetadata {
        buildpack_default_process_type: processes.default_type,
        buildpacks: req.group.iter().map(Buildpack::group_member).collect(),
        labels,
        processes: processes.by_type.into_values().collect(),
        slices,
    };
    write_metadata(
        &req.paths.layers.join("config").join("metadata.toml"),
        &metadata,
    )?;
    Ok(metadata)
}

/// Reads a metadata.toml the build phase wrote.
pub fn read_metadata(path: &Path) -> Result<BuildMetadata, LifecycleError> {
    let bad = |why: String| LifecycleError::Build(format!("{}: {why}", path.display()));
    let text = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    BuildMetadata::parse(&text).map_err(bad)
}

fn write_metadata(path: &Path, metadata: &BuildMetadata) -> Result<(), LifecycleError> {
    let bad = |why: String| LifecycleError::Build(format!("{}: {why}", path.display()));
    let text = metadata.to_toml().map_err(bad)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
    let write = || -> io::Result<()> {
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
        file.as_file().sync_all()?;
        file.persist(path)?;
        Ok(())
    };
    write().map_err(|e| bad(e.to_string()))
}

fn remove_dir_if_present(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The buildpack plan: the requirements of every plan entry `id` may provide.
fn plan_for(plan: &PlanFile, id: &str) -> Vec<Require> {
    plan.entries
        .iter()
        .filter(|entry| entry.providers.iter().any(|p| p.id == id))
        .flat_map(|entry| entry.requires.iter().cloned())
        .collect()
}

fn write_plan(path: &Path, entries: &[Require]) -> Result<(), String> {
    #[derive(serde::Serialize)]
    struct BuildpackPlan<'a> {
        entries: &'a [Require],
    }
    let text = toml::to_string(&BuildpackPlan { entries }).map_err(|e| e.to_string())?;
    fs::write(path, text).map_err(|e| e.to_string())
}

/// The environment of one `bin/build` call: the running build environment, the user's
/// platform env unless the buildpack clears it, the operator's build-config env, then the
/// `CNB_*` variables its Buildpack API defines.
fn buildpack_env(
    req: &BuildRequest,
    bp: &Buildpack,
    running_env: &Env,
    target: &TargetData,
    bp_layers: &Path,
    plan_path: &Path,
) -> Result<Env, LifecycleError> {
    let fail =
        |e: io::Error| LifecycleError::Build(format!("buildpack {}: {e}", bp.name_version()));
    let mut env = if bp.clear_env {
        running_env.clone()
    } else {
        running_env
            .with_user_env(&req.paths.platform)
            .map_err(fail)?
    };
    env.apply_env_dir(&req.paths.build_config.join("env"), Action::Default)
        .map_err(fail)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    env.set("CNB_BUILDPACK_DIR", path(&bp.dir));
    if bp.api >= ApiVersion::new(0, 8) {
        env.set("CNB_LAYERS_DIR", path(bp_layers));
        env.set("CNB_PLATFORM_DIR", path(&req.paths.platform));
        env.set("CNB_BP_PLAN_PATH", path(plan_path));
    }
    if bp.api >= ApiVersion::new(0, 10) {
        env.set("CNB_TARGET_OS", target.os.as_str());
        env.set("CNB_TARGET_ARCH", target.arch.as_str());
        let distro = target.distro.clone().unwrap_or_default();
        let optional = [
            (
                "CNB_TARGET_ARCH_VARIANT",
                target.variant.clone().unwrap_or_default(),
            ),
            ("CNB_TARGET_DISTRO_NAME", distro.name),
            ("CNB_TARGET_DISTRO_VERSION", distro.version),
        ];
        for (name, value) in optional {
            // Not even a user's env file may make up a value the target lacks.
            if value.is_empty() {
                env.remove(name);
            } else {
                env.set(name, value);
            }
        }
    }
    if bp.api >= ApiVersion::new(0, 12) {
        env.set("CNB_EXEC_ENV", req.exec_env);
    }
    Ok(env)
}

/// Runs `bin/build` with the user watching its output. It runs in its own process group,
/// killed when `bin/build` exits, so that nothing it left running in the background outlives
/// it.
fn run_bin_build(
    bp: &Buildpack,
    bp_layers: &Path,
    platform: &Path,
    plan_path: &Path,
    app: &Path,
    env: &Env,
) -> Result<(), LifecycleError> {
    let fail =
        |why: String| LifecycleError::Build(format!("buildpack {}: {why}", bp.name_version()));
    let program = bp.dir.join("bin").join("build");
    if !program.is_file() {
        return Err(fail(format!("{} does not exist", program.display())));
    }
    // The build's output is progress, which goes to stderr: stdout is lathe's for results.
    let progress = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| fail(format!("stderr: {e}")))?;
    let mut command = Command::new(&program);
    command
        .args([bp_layers, platform, plan_path])
        .current_dir(app)
        .env_clear()
        .envs(env.pairs())
        .stdin(Stdio::null())
        .stdout(Stdio::from(progress))
        .process_group(0);
    let mut child =
        spawn(&mut command).map_err(|e| fail(format!("running {}: {e}", program.display())))?;
    let status = wait_and_kill_group(&mut child)
        .map_err(|e| fail(format!("waiting for {}: {e}", program.display())))?;
    if status.success() {
        return Ok(());
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    Err(LifecycleError::BuildpackFailed {
        buildpack: bp.name_version(),
        code,
    })
}

fn spawn(command: &mut Command) -> io::Result<Child> {
    // A buildpack executable written a moment ago may still be open for writing in a process
    // that another thread forked before closing it; that clears within milliseconds.
    let mut attempts = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 10 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Waits for `child` to exit, kills what is left of its process group, then reaps it. The
/// child stays a zombie until reaped, so its pid (the group's id) cannot be reused while the
/// group is killed.
fn wait_and_kill_group(child: &mut Child) -> io::Result<ExitStatus> {
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    // ESRCH: nothing else was left in the group.
    let _ = killpg(pid, Signal::SIGKILL);
    child.wait()
}

/// The buildpack's layers (every `<layer>.toml`) by name, in name order. A layer with no type
/// is renamed `<layer>.ignore` so that nothing exports or caches it.
fn read_layers(
    bp: &Buildpack,
    bp_layers: &Path,
) -> Result<BTreeMap<String, LayerTypes>, LifecycleError> {
    let fail = |path: &Path, why: String| {
        LifecycleError::Build(format!(
            "buildpack {}: {}: {why}",
            bp.name_version(),
            path.display()
        ))
    };
    for name in RESERVED_LAYER_NAMES {
        let dir = bp_layers.join(name);
        if dir.is_dir() && bp_layers.join(format!("{name}.toml")).is_file() {
            return Err(fail(
                &dir,
                format!("a layer may not be named {name:?} ({name}.toml is not layer metadata)"),
            ));
        }
    }
    let mut layers = BTreeMap::new();
    let files = launch::read_layer_files(bp_layers).map_err(|(path, why)| fail(&path, why))?;
    for LayerFile { name, layer, .. } in files {
        if layer.types.is_none() {
            let dir = bp_layers.join(&name);
            let ignored = bp_layers.join(format!("{name}.ignore"));
            if dir.exists() {
                // One left by an earlier build would make the rename fail.
                remove_dir_if_present(&ignored)
                    .map_err(|e| fail(&ignored, format!("removing: {e}")))?;
            }
            match fs::rename(&dir, &ignored) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(fail(
                        &dir,
                        format!("renaming to {}: {e}", ignored.display()),
                    ));
                }
                _ => {}
            }
        }
        layers.insert(name, layer.types);
    }
    Ok(layers)
}

/// Puts the build layers' directories on the path variables and applies their `env` and
/// `env.build`, layer by layer in name order, for every later buildpack.
fn apply_build_layers(
    bp_layers: &Path,
    layers: &BTreeMap<String, LayerTypes>,
    running_env: &mut Env,
) -> io::Result<()> {
    for (name, _) in layers.iter().filter(|(_, types)| types.build) {
        let dir = bp_layers.join(name);
        running_env.prepend_layer_dirs(&dir);
        running_env.apply_env_dir(&dir.join("env"), Action::Override)?;
        running_env.apply_env_dir(&dir.join("env.build"), Action::Override)?;
    }
    Ok(())
}

/// The names of the plan entries the buildpack met: its plan less `build.toml`'s unmet ones.
fn met_requires(
    bp: &Buildpack,
    bp_layers: &Path,
    bp_plan: &[Require],
) -> Result<BTreeSet<String>, LifecycleError> {
    let path = bp_layers.join("build.toml");
    let fail = |why: String| {
        LifecycleError::Build(format!(
            "buildpack {}: {}: {why}",
            bp.name_version(),
            path.display()
        ))
    };
    let build = match fs::read_to_string(&path) {
        Ok(text) => {
            let (build, warnings) = launch::parse_build_toml(&text).map_err(fail)?;
            warn_all(bp, &path, &warnings);
            build
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => launch::BuildToml::default(),
        Err(e) => return Err(fail(e.to_string())),
    };
    for unmet in &build.unmet {
        if !bp_plan.iter().any(|r| r.name == unmet.name) {
            return Err(fail(format!(
                "unmet entry {:?} is not in the buildpack's plan",
                unmet.name
            )));
        }
    }
    Ok(bp_plan
        .iter()
        .filter(|r| !build.unmet.iter().any(|u| u.name == r.name))
        .map(|r| r.name.clone())
        .collect())
}

fn read_launch_toml(
    bp: &Buildpack,
    bp_layers: &Path,
) -> Result<Option<launch::LaunchToml>, LifecycleError> {
    let path = bp_layers.join("launch.toml");
    let fail = |why: String| {
        LifecycleError::Build(format!(
            "buildpack {}: {}: {why}",
            bp.name_version(),
            path.display()
        ))
    };
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    let (launch, warnings) = launch::parse_launch_toml(&text, bp.api).map_err(fail)?;
    warn_all(bp, &path, &warnings);
    Ok(Some(launch))
}

fn warn_all(bp: &Buildpack, path: &Path, warnings: &[String]) {
    for warning in warnings {
        tracing::warn!(
            "buildpack {}: {}: {warning}",
            bp.name_version(),
            path.display()
        );
    }
}

/// The processes of every buildpack so far: a later buildpack's process replaces an earlier
/// one of the same type; the last default wins, and a later non-default process of the
/// default's type leaves no default.
#[derive(Default)]
struct ProcessTable {
    by_type: BTreeMap<String, Process>,
    default_type: Option<String>,
}

impl ProcessTable {
    fn add(&mut self, process: Process, default: bool) {
        if default {
            self.default_type = Some(process.process_type.clone());
        } else if self.default_type.as_deref() == Some(process.process_type.as_str()) {
            tracing::warn!(
                "buildpack {} redefines the default process type {:?} without marking it \
                 default: the image has no default process",
                process.buildpack_id,
                process.process_type
            );
            self.default_type = None;
        }
        self.by_type.insert(process.process_type.clone(), process);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SbomKind {
    Launch,
    Build,
    Cache,
}

impl SbomKind {
    fn dir_name(self) -> &'static str {
        match self {
            SbomKind::Launch => "launch",
            SbomKind::Build => "build",
            SbomKind::Cache => "cache",
        }
    }
}

/// An SBOM file a buildpack wrote and where it goes under `<layers>/sbom`.
struct SbomFile {
    source: PathBuf,
    kind: SbomKind,
    buildpack_id: String,
    /// None for `launch.sbom.*` and `build.sbom.*`.
    layer: Option<String>,
    /// `sbom.cdx.json`, `sbom.spdx.json` or `sbom.syft.json`.
    target_name: &'static str,
}

const SBOM_FORMATS: [(&str, &str); 3] = [
    ("cdx.json", "application/vnd.cyclonedx+json"),
    ("spdx.json", "application/spdx+json"),
    ("syft.json", "application/vnd.syft+json"),
];

/// The buildpack's SBOM files (named `*.sbom.*.json`, as the reference lifecycle globs them):
/// `launch.sbom.*`, `build.sbom.*`, and `<layer>.sbom.*` of its layers (a launch layer's
/// goes with the launch SBOMs, any other with the build ones, a cached layer's also with
/// the cache ones). Each must be a known format the buildpack declared in `sbom-formats`.
fn sbom_files(
    bp: &Buildpack,
    bp_layers: &Path,
    layers: &BTreeMap<String, LayerTypes>,
) -> Result<Vec<SbomFile>, LifecycleError> {
    let fail = |path: &Path, why: String| {
        LifecycleError::Build(format!(
            "buildpack {}: {}: {why}",
            bp.name_version(),
            path.display()
        ))
    };
    let declared: Vec<String> = bp
        .sbom_formats
        .iter()
        .map(|media_type| {
            let essence = media_type.split(';').next().unwrap_or_default();
            essence.trim().to_ascii_lowercase()
        })
        .collect();
    let mut names: Vec<String> = fs::read_dir(bp_layers)
        .map_err(|e| fail(bp_layers, e.to_string()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_file())
        .filter_map(|entry| entry.file_name().to_str().map(String::from))
        .filter(|name| is_sbom_name(name))
        .collect();
    names.sort();

    let mut files = Vec::new();
    for name in names {
        let source = bp_layers.join(&name);
        let owner = name.split('.').next().unwrap_or_default();
        let placements: Vec<(SbomKind, Option<String>)> = match owner {
            "launch" => vec![(SbomKind::Launch, None)],
            "build" => vec![(SbomKind::Build, None)],
            layer => match layers.get(layer) {
                None => {
                    tracing::warn!(
                        "buildpack {}: {}: no layer {layer:?}; SBOM ignored",
                        bp.name_version(),
                        source.display()
                    );
                    continue;
                }
                Some(types) => {
                    let main = if types.launch {
                        SbomKind::Launch
                    } else {
                        SbomKind::Build
                    };
                    let mut kinds = vec![(main, Some(layer.to_string()))];
                    if types.cache {
                        kinds.push((SbomKind::Cache, Some(layer.to_string())));
                    }
                    kinds
                }
            },
        };
        let Some((extension, media_type)) = SBOM_FORMATS
            .iter()
            .find(|(extension, _)| name.ends_with(&format!(".sbom.{extension}")))
        else {
            return Err(fail(
                &source,
                "unsupported SBOM format (known: .sbom.cdx.json, .sbom.spdx.json, \
                 .sbom.syft.json)"
                    .into(),
            ));
        };
        if !declared.iter().any(|d| d == media_type) {
            return Err(fail(
                &source,
                format!(
                    "SBOM media type {media_type} is not declared in buildpack.toml's sbom-formats"
                ),
            ));
        }
        let target_name = match *extension {
            "cdx.json" => "sbom.cdx.json",
            "spdx.json" => "sbom.spdx.json",
            _ => "sbom.syft.json",
        };
        for (kind, layer) in placements {
            files.push(SbomFile {
                source: source.clone(),
                kind,
                buildpack_id: bp.id.clone(),
                layer,
                target_name,
            });
        }
    }
    Ok(files)
}

/// `<name>.sbom.<anything>.json`.
fn is_sbom_name(name: &str) -> bool {
    const MARK: &str = ".sbom.";
    name.find(MARK)
        .is_some_and(|at| name[at + MARK.len()..].ends_with(".json"))
}

/// Copies the SBOM files to `<sbom>/<launch|build|cache>/<escaped id>[/<layer>]/sbom.<ext>`.
fn place_sboms(sbom_dir: &Path, files: &[SbomFile]) -> Result<(), LifecycleError> {
    for file in files {
        let mut dir = sbom_dir
            .join(file.kind.dir_name())
            .join(escape_id(&file.buildpack_id));
        if let Some(layer) = &file.layer {
            dir.push(layer);
        }
        let target = dir.join(file.target_name);
        let copy = || -> io::Result<()> {
            fs::create_dir_all(&dir)?;
            fs::copy(&file.source, &target)?;
            Ok(())
        };
        copy().map_err(|e| {
            LifecycleError::Build(format!(
                "buildpack {}: copying {} to {}: {e}",
                file.buildpack_id,
                file.source.display(),
                target.display()
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::lifecycle::{Distro, PLATFORM_API, PlanEntry, Provider, descriptor};

    /// A work area like the build container's, under a temp dir.
    struct Fixture {
        _root: tempfile::TempDir,
        root: PathBuf,
        paths: Paths,
        target: TargetData,
        env: Env,
        platform_api: ApiVersion,
    }

    const BASE_PATH: &str = "/usr/bin:/bin";

    impl Fixture {
        fn new() -> Fixture {
            let root_dir = tempfile::tempdir().unwrap();
            let root = root_dir.path().canonicalize().unwrap();
            let paths = Paths {
                app: root.join("app"),
                layers: root.join("layers"),
                platform: root.join("platform"),
                buildpacks: root.join("buildpacks"),
                extensions: root.join("extensions"),
                build_config: root.join("build-config"),
                order: root.join("order.toml"),
            };
            for dir in [&paths.app, &paths.layers, &paths.platform] {
                fs::create_dir_all(dir).unwrap();
            }
            let lifecycle_env = [
                ("PATH".to_string(), BASE_PATH.to_string()),
                ("HOME".to_string(), "/home/cnb".to_string()),
                ("LANG".to_string(), "C.UTF-8".to_string()),
            ];
            Fixture {
                _root: root_dir,
                root,
                paths,
                target: TargetData {
                    os: "linux".into(),
                    arch: "amd64".into(),
                    ..TargetData::default()
                },
                env: Env::filtered(&lifecycle_env),
                platform_api: PLATFORM_API,
            }
        }

        /// A buildpack whose `bin/build` is `script` under bash; `extra` goes into the
        /// `[buildpack]` table.
        fn buildpack(&self, id: &str, api: &str, extra: &str, script: &str) -> Buildpack {
            let dir = self.paths.buildpacks.join(escape_id(id)).join("1.0");
            fs::create_dir_all(dir.join("bin")).unwrap();
            fs::write(
                dir.join("buildpack.toml"),
                format!(
                    "api = \"{api}\"\n[buildpack]\nid = \"{id}\"\nversion = \"1.0\"\n{extra}\n"
                ),
            )
            .unwrap();
            let program = dir.join("bin").join("build");
            fs::write(&program, format!("#!/bin/bash\nset -eu\n{script}\n")).unwrap();
            fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
            descriptor::read(&dir).unwrap()
        }

        fn build(
            &self,
            group: &[Buildpack],
            plan: &PlanFile,
        ) -> Result<BuildMetadata, LifecycleError> {
            build(&BuildRequest {
                paths: &self.paths,
                group,
                plan,
                target: &self.target,
                os_release: &self.root.join("os-release"),
                env: &self.env,
                exec_env: "production",
                platform_api: self.platform_api,
            })
        }

        /// What a `dump_env(name)` line saw, without the variables bash adds itself.
        fn env_seen(&self, name: &str) -> BTreeMap<String, String> {
            let bytes = fs::read(self.paths.app.join(format!("env-{name}"))).unwrap();
            String::from_utf8(bytes)
                .unwrap()
                .split('\0')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .filter(|(k, _)| !["PWD", "SHLVL", "_", "OLDPWD"].contains(&k.as_str()))
                .collect()
        }

        fn layers(&self, rest: &str) -> String {
            format!("{}/{rest}", self.paths.layers.display())
        }

        fn write(&self, path: &Path, text: &str) {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }

    fn dump_env(name: &str) -> String {
        format!("/usr/bin/env -0 > env-{name}\n")
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn build_error(result: Result<BuildMetadata, LifecycleError>) -> String {
        match result {
            Err(e @ LifecycleError::Build(_)) => {
                assert_eq!(e.exit_code(), 52);
                e.to_string()
            }
            other => panic!("expected a build error, got {other:?}"),
        }
    }

    /// A bash line making a layer `name` with the given `[types]` lines.
    fn layer(name: &str, types: &str) -> String {
        format!("mkdir -p \"$1/{name}\"; printf '[types]\\n{types}\\n' > \"$1/{name}.toml\"\n")
    }

    #[test]
    fn the_environment_and_arguments_follow_the_buildpack_api() {
        let f = Fixture::new();
        f.write(
            &f.root.join("os-release"),
            "NAME=\"Ubuntu\"\nID=ubuntu\nVERSION_ID=\"22.04\"\n",
        );
        let record = |name: &str| {
            format!(
                "{}printf '%s\\n' \"$0\" \"$@\" > argv-{name}\npwd -P > cwd-{name}\n",
                dump_env(name)
            )
        };
        let group = [
            f.buildpack("v7", "0.7", "", &record("v7")),
            f.buildpack("v8", "0.8", "", &record("v8")),
            f.buildpack("v10", "0.10", "", &record("v10")),
            f.buildpack("v12", "0.12", "", &record("v12")),
        ];
        f.build(&group, &PlanFile::default()).unwrap();

        for bp in &group {
            let name = &bp.id;
            let seen = f.env_seen(name);
            let argv = fs::read_to_string(f.paths.app.join(format!("argv-{name}"))).unwrap();
            let argv: Vec<&str> = argv.lines().collect();
            let plan_path = argv[3];
            assert!(plan_path.ends_with("/plan.toml"), "{plan_path}");
            assert_eq!(
                argv,
                [
                    bp.dir.join("bin/build").to_str().unwrap(),
                    &f.layers(name),
                    f.paths.platform.to_str().unwrap(),
                    plan_path,
                ]
            );
            assert_eq!(
                fs::read_to_string(f.paths.app.join(format!("cwd-{name}"))).unwrap(),
                format!("{}\n", f.paths.app.display())
            );
            let mut expected = vars(&[
                ("CNB_BUILDPACK_DIR", bp.dir.to_str().unwrap()),
                ("HOME", "/home/cnb"),
                ("PATH", BASE_PATH),
            ]);
            if bp.api >= ApiVersion::new(0, 8) {
                expected.extend(vars(&[
                    ("CNB_LAYERS_DIR", &f.layers(name)),
                    ("CNB_PLATFORM_DIR", f.paths.platform.to_str().unwrap()),
                    ("CNB_BP_PLAN_PATH", plan_path),
                ]));
            }
            if bp.api >= ApiVersion::new(0, 10) {
                expected.extend(vars(&[
                    ("CNB_TARGET_OS", "linux"),
                    ("CNB_TARGET_ARCH", "amd64"),
                    ("CNB_TARGET_DISTRO_NAME", "ubuntu"),
                    ("CNB_TARGET_DISTRO_VERSION", "22.04"),
                ]));
            }
            if bp.api >= ApiVersion::new(0, 12) {
                expected.insert("CNB_EXEC_ENV".into(), "production".into());
            }
            assert_eq!(seen, expected, "{name}");
        }
    }

    #[test]
    fn the_run_images_variant_and_distro_win_over_os_release() {
        let mut f = Fixture::new();
        f.write(&f.root.join("os-release"), "ID=ubuntu\nVERSION_ID=22.04\n");
        f.target = TargetData {
            os: "linux".into(),
            arch: "arm".into(),
            variant: Some("v7".into()),
            distro: Some(Distro {
                name: "debian".into(),
                version: "12".into(),
            }),
            id: None,
        };
        let group = [f.buildpack("t", "0.10", "", &dump_env("t"))];
        f.build(&group, &PlanFile::default()).unwrap();
        let seen = f.env_seen("t");
        let target: BTreeMap<&str, &str> = seen
            .iter()
            .filter(|(k, _)| k.starts_with("CNB_TARGET_"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            target,
            BTreeMap::from([
                ("CNB_TARGET_ARCH", "arm"),
                ("CNB_TARGET_ARCH_VARIANT", "v7"),
                ("CNB_TARGET_DISTRO_NAME", "debian"),
                ("CNB_TARGET_DISTRO_VERSION", "12"),
                ("CNB_TARGET_OS", "linux"),
            ])
        );
    }

    #[test]
    fn target_variables_the_target_lacks_are_unset() {
        let f = Fixture::new();
        f.write(
            &f.paths.platform.join("env/CNB_TARGET_ARCH_VARIANT"),
            "bogus",
        );
        f.write(
            &f.paths.platform.join("env/CNB_TARGET_DISTRO_NAME"),
            "bogus",
        );
        let group = [f.buildpack("t", "0.10", "", &dump_env("t"))];
        f.build(&group, &PlanFile::default()).unwrap();
        let seen = f.env_seen("t");
        assert_eq!(seen.get("CNB_TARGET_ARCH_VARIANT"), None);
        assert_eq!(
            seen.get("CNB_TARGET_DISTRO_NAME"),
            None,
            "no os-release here"
        );
        assert_eq!(seen["CNB_TARGET_OS"], "linux");
    }

    #[test]
    fn build_layers_prepend_path_later_buildpacks_and_later_layers_first() {
        let f = Fixture::new();
        let group = [
            f.buildpack(
                "bp1",
                "0.10",
                "",
                &format!("{}mkdir \"$1/z/bin\"", layer("z", "build = true")),
            ),
            f.buildpack(
                "bp2",
                "0.10",
                "",
                &format!(
                    "{}{}mkdir \"$1/a/bin\" \"$1/a/lib\" \"$1/b/bin\"",
                    layer("a", "build = true"),
                    layer("b", "build = true")
                ),
            ),
            f.buildpack("bp3", "0.10", "", &dump_env("bp3")),
        ];
        f.build(&group, &PlanFile::default()).unwrap();
        let seen = f.env_seen("bp3");
        assert_eq!(
            seen["PATH"],
            format!(
                "{}:{}:{}:{BASE_PATH}",
                f.layers("bp2/b/bin"),
                f.layers("bp2/a/bin"),
                f.layers("bp1/z/bin")
            )
        );
        assert_eq!(seen["LD_LIBRARY_PATH"], f.layers("bp2/a/lib"));
        assert_eq!(seen["LIBRARY_PATH"], f.layers("bp2/a/lib"));
        assert!(!seen.contains_key("CPATH"));
    }

    #[test]
    fn build_layer_env_files_apply_in_order_for_later_buildpacks() {
        let f = Fixture::new();
        let script = format!(
            r#"{one}{two}
cd "$1/one"
mkdir env env.build env.launch
printf one > env/PRE.prepend; printf : > env/PRE.delim
printf one > env/APP.append; printf , > env/APP.delim
printf one > env/OVR
printf /nope > env/HOME.default
printf d1 > env/NEW.default
printf one-build > env.build/OVR.override
printf x > env.launch/LAUNCH_ONLY
cd "$1/two"
mkdir env
printf two > env/PRE.prepend; printf : > env/PRE.delim
printf two > env/APP.append; printf , > env/APP.delim
printf d2 > env/NEW.default
"#,
            one = layer("one", "build = true"),
            two = layer("two", "build = true"),
        );
        f.write(&f.paths.platform.join("env/OP"), "user");
        f.write(&f.paths.platform.join("env/USERVAR"), "u");
        f.write(&f.paths.build_config.join("env/OP.override"), "operator");
        f.write(&f.paths.build_config.join("env/BC"), "bc");
        f.write(&f.paths.build_config.join("env/HOME"), "/bc-home");
        let group = [
            f.buildpack("bp1", "0.10", "", &script),
            f.buildpack("bp2", "0.10", "", &dump_env("bp2")),
            f.buildpack("bp3", "0.10", "", &dump_env("bp3")),
        ];
        f.build(&group, &PlanFile::default()).unwrap();
        for name in ["bp2", "bp3"] {
            let seen = f.env_seen(name);
            let wanted = vars(&[
                ("PRE", "two:one"),
                ("APP", "one,two"),
                ("OVR", "one-build"),
                ("HOME", "/home/cnb"),
                ("NEW", "d1"),
                ("OP", "operator"),
                ("USERVAR", "u"),
                ("BC", "bc"),
            ]);
            for (k, v) in &wanted {
                assert_eq!(seen.get(k), Some(v), "{name}: {k}");
            }
            assert!(!seen.contains_key("LAUNCH_ONLY"), "{name}");
        }
    }

    #[test]
    fn layers_not_used_at_build_time_leave_the_environment_alone() {
        let f = Fixture::new();
        let script = format!(
            "{}mkdir \"$1/run/bin\" \"$1/run/env\"; printf 1 > \"$1/run/env/X\"",
            layer("run", "launch = true\\ncache = true")
        );
        let group = [
            f.buildpack("bp1", "0.10", "", &script),
            f.buildpack("bp2", "0.10", "", &dump_env("bp2")),
        ];
        f.build(&group, &PlanFile::default()).unwrap();
        let seen = f.env_seen("bp2");
        assert_eq!(seen.get("X"), None);
        assert_eq!(seen["PATH"], BASE_PATH);
    }

    #[test]
    fn clear_env_hides_the_users_env_but_not_the_operators() {
        let f = Fixture::new();
        f.write(&f.paths.platform.join("env/BP_USER"), "1");
        f.write(&f.paths.platform.join("env/PATH"), "/user");
        f.write(&f.paths.build_config.join("env/BC"), "bc");
        let group = [
            f.buildpack("clear", "0.10", "clear-env = true", &dump_env("clear")),
            f.buildpack("plain", "0.10", "", &dump_env("plain")),
        ];
        f.build(&group, &PlanFile::default()).unwrap();
        let clear = f.env_seen("clear");
        assert_eq!(clear.get("BP_USER"), None);
        assert_eq!(clear["PATH"], BASE_PATH);
        assert_eq!(clear["BC"], "bc");
        let plain = f.env_seen("plain");
        assert_eq!(plain["BP_USER"], "1");
        assert_eq!(plain["PATH"], format!("/user:{BASE_PATH}"));
        assert_eq!(plain["BC"], "bc");
    }

    fn write_launch_toml(text: &str) -> String {
        format!("cat > \"$1/launch.toml\" <<'EOF'\n{text}\nEOF\n")
    }

    fn launch_group(f: &Fixture) -> Vec<Buildpack> {
        vec![
            f.buildpack(
                "acme/old",
                "0.8",
                "homepage = \"https://old.example\"",
                &write_launch_toml(
                    r#"[[processes]]
type = "web"
command = "bundle exec rackup"
args = ["-p", "8080"]
working-dir = "sub"

[[processes]]
type = "script"
command = "bin/run"
direct = true

[[labels]]
key = "a"
value = "old"

[[slices]]
paths = ["public/*"]"#,
                ),
            ),
            f.buildpack(
                "acme/ancient",
                "0.7",
                "",
                &write_launch_toml(
                    "[[processes]]\ntype = \"legacy\"\ncommand = \"./legacy\"\nworking-dir = \"x\"",
                ),
            ),
            f.buildpack(
                "acme/new",
                "0.12",
                "",
                &write_launch_toml(
                    r#"[[processes]]
type = "worker"
command = ["python", "worker.py"]
args = ["--queue", "q"]
default = true
exec-env = ["production"]

[[labels]]
key = "a"
value = "new"

[[slices]]
paths = ["static/**"]"#,
                ),
            ),
        ]
    }

    #[test]
    fn launch_toml_becomes_metadata_toml() {
        let f = Fixture::new();
        let group = launch_group(&f);
        let metadata = f.build(&group, &PlanFile::default()).unwrap();
        let path = f.paths.layers.join("config/metadata.toml");
        let written = fs::read_to_string(&path).unwrap();
        assert_eq!(
            written,
            r#"buildpack-default-process-type = "worker"

[[buildpacks]]
id = "acme/old"
version = "1.0"
api = "0.8"
homepage = "https://old.example"

[[buildpacks]]
id = "acme/ancient"
version = "1.0"
api = "0.7"

[[buildpacks]]
id = "acme/new"
version = "1.0"
api = "0.12"

[[labels]]
key = "a"
value = "old"

[[labels]]
key = "a"
value = "new"

[[processes]]
type = "legacy"
command = ["./legacy"]
args = []
direct = false
buildpack-id = "acme/ancient"

[[processes]]
type = "script"
command = ["bin/run"]
args = []
direct = true
buildpack-id = "acme/old"

[[processes]]
type = "web"
command = ["bundle exec rackup"]
args = ["-p", "8080"]
direct = false
buildpack-id = "acme/old"
working-dir = "sub"

[[processes]]
type = "worker"
command = ["python", "worker.py"]
args = ["--queue", "q"]
direct = true
buildpack-id = "acme/new"
exec-env = ["production"]

[[slices]]
paths = ["public/*"]

[[slices]]
paths = ["static/**"]
"#
        );
        assert_eq!(read_metadata(&path).unwrap(), metadata);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["metadata.toml"], "no temp file is left behind");
    }

    #[test]
    fn before_platform_api_0_10_commands_are_strings() {
        let mut f = Fixture::new();
        f.platform_api = ApiVersion::new(0, 9);
        let group = launch_group(&f);
        let metadata = f.build(&group, &PlanFile::default()).unwrap();
        let worker = &metadata.processes[3];
        assert_eq!(
            worker.command,
            launch::ProcessCommand::Single("python".into())
        );
        assert_eq!(worker.args, ["worker.py", "--queue", "q"]);
        let written = fs::read_to_string(f.paths.layers.join("config/metadata.toml")).unwrap();
        assert!(
            written.contains(
                "type = \"worker\"\ncommand = \"python\"\nargs = [\"worker.py\", \"--queue\", \"q\"]\n"
            ),
            "{written}"
        );
    }

    fn process(process_type: &str, default: bool) -> String {
        format!(
            "[[processes]]\ntype = \"{process_type}\"\ncommand = [\"{process_type}\"]\ndefault = {default}\n"
        )
    }

    #[test]
    fn the_last_default_wins_and_a_plain_redefinition_clears_it() {
        let f = Fixture::new();
        let bp1 = f.buildpack(
            "bp1",
            "0.10",
            "",
            &write_launch_toml(&(process("web", true) + &process("worker", false))),
        );
        let bp2 = f.buildpack(
            "bp2",
            "0.10",
            "",
            &write_launch_toml(&process("worker", true)),
        );
        let bp3 = f.buildpack(
            "bp3",
            "0.10",
            "",
            &write_launch_toml(&process("worker", false)),
        );
        let bp4 = f.buildpack(
            "bp4",
            "0.10",
            "",
            &write_launch_toml(&process("other", false)),
        );
        let default_of = |group: &[Buildpack]| {
            f.build(group, &PlanFile::default())
                .unwrap()
                .buildpack_default_process_type
        };
        assert_eq!(default_of(std::slice::from_ref(&bp1)), Some("web".into()));
        assert_eq!(default_of(&[bp1.clone(), bp4.clone()]), Some("web".into()));
        assert_eq!(
            default_of(&[bp1.clone(), bp2.clone()]),
            Some("worker".into())
        );
        assert_eq!(default_of(&[bp1.clone(), bp2.clone(), bp3.clone()]), None);
        let metadata = f.build(&[bp1, bp2, bp3], &PlanFile::default()).unwrap();
        let worker = metadata
            .processes
            .iter()
            .find(|p| p.process_type == "worker")
            .unwrap();
        assert_eq!(
            worker.buildpack_id, "bp3",
            "the later buildpack's process replaces"
        );
    }

    #[test]
    fn two_defaults_from_one_buildpack_fail() {
        let f = Fixture::new();
        let bp = f.buildpack(
            "bp",
            "0.10",
            "",
            &write_launch_toml(&(process("web", true) + &process("worker", true))),
        );
        let err = build_error(f.build(&[bp], &PlanFile::default()));
        assert_eq!(
            err,
            format!(
                "build: buildpack bp@1.0: {}: more than one default process (web, worker)",
                f.layers("bp/launch.toml")
            )
        );
    }

    #[test]
    fn direct_is_refused_from_buildpack_api_0_9() {
        let f = Fixture::new();
        let bp = f.buildpack(
            "bp",
            "0.9",
            "",
            &write_launch_toml("[[processes]]\ntype = \"web\"\ncommand = [\"x\"]\ndirect = true"),
        );
        let err = build_error(f.build(&[bp], &PlanFile::default()));
        assert!(
            err.starts_with(&format!(
                "build: buildpack bp@1.0: {}: ",
                f.layers("bp/launch.toml")
            )),
            "{err}"
        );
        assert!(err.contains("direct"), "{err}");
    }

    fn entry(providers: &[&str], requires: &[(&str, &str)]) -> PlanEntry {
        PlanEntry {
            providers: providers
                .iter()
                .map(|id| Provider {
                    id: id.to_string(),
                    version: "1.0".into(),
                })
                .collect(),
            requires: requires
                .iter()
                .map(|(name, metadata)| Require {
                    name: name.to_string(),
                    metadata: metadata.parse().unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn unmet_entries_go_on_to_later_providers_and_met_ones_do_not() {
        let f = Fixture::new();
        let plan = PlanFile {
            entries: vec![
                entry(&["a", "b"], &[("node", "version = \"18\"")]),
                entry(&["a", "b"], &[("python", "")]),
                entry(&["c"], &[("ruby", "")]),
            ],
        };
        let group = [
            f.buildpack(
                "a",
                "0.10",
                "",
                "cp \"$3\" plan-a\nprintf '[[unmet]]\\nname = \"node\"\\n' > \"$1/build.toml\"",
            ),
            f.buildpack("b", "0.10", "", "cp \"$3\" plan-b"),
        ];
        f.build(&group, &plan).unwrap();
        let plan_of = |name: &str| -> toml::Table {
            fs::read_to_string(f.paths.app.join(name))
                .unwrap()
                .parse()
                .unwrap()
        };
        let expected_a: toml::Table =
            "[[entries]]\nname = \"node\"\n[entries.metadata]\nversion = \"18\"\n\n[[entries]]\nname = \"python\"\n"
                .parse()
                .unwrap();
        let expected_b: toml::Table =
            "[[entries]]\nname = \"node\"\n[entries.metadata]\nversion = \"18\"\n"
                .parse()
                .unwrap();
        assert_eq!(plan_of("plan-a"), expected_a);
        assert_eq!(plan_of("plan-b"), expected_b);
    }

    #[test]
    fn an_unmet_entry_outside_the_plan_fails() {
        let f = Fixture::new();
        let plan = PlanFile {
            entries: vec![entry(&["a"], &[("node", "")])],
        };
        let bp = f.buildpack(
            "a",
            "0.10",
            "",
            "printf '[[unmet]]\\nname = \"nope\"\\n' > \"$1/build.toml\"",
        );
        let err = build_error(f.build(&[bp], &plan));
        assert_eq!(
            err,
            format!(
                "build: buildpack a@1.0: {}: unmet entry \"nope\" is not in the buildpack's plan",
                f.layers("a/build.toml")
            )
        );
    }

    #[test]
    fn layers_without_a_type_are_set_aside() {
        let f = Fixture::new();
        let script = format!(
            "{}{}mkdir \"$1/restored\"; printf '[metadata]\\nv = 1\\n' > \"$1/restored.toml\"\n\
             touch \"$1/tmp/file\"; mkdir -p \"$1/no-toml\"",
            layer("tmp", "launch = false"),
            layer("keep", "cache = true"),
        );
        let bp = f.buildpack("bp", "0.10", "", &script);
        f.build(std::slice::from_ref(&bp), &PlanFile::default())
            .unwrap();
        // Again over the first build's leftovers.
        f.build(&[bp], &PlanFile::default()).unwrap();
        let mut names: Vec<String> = fs::read_dir(f.paths.layers.join("bp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "keep",
                "keep.toml",
                "no-toml",
                "restored.ignore",
                "restored.toml",
                "tmp.ignore",
                "tmp.toml"
            ]
        );
        assert!(f.paths.layers.join("bp/tmp.ignore/file").is_file());
    }

    #[test]
    fn layer_flags_at_the_top_level_fail() {
        let f = Fixture::new();
        let bp = f.buildpack(
            "bp",
            "0.10",
            "",
            "printf 'launch = true\\n' > \"$1/l.toml\"",
        );
        let err = build_error(f.build(&[bp], &PlanFile::default()));
        assert_eq!(
            err,
            format!(
                "build: buildpack bp@1.0: {}: the launch, build and cache flags belong in the \
                 [types] table",
                f.layers("bp/l.toml")
            )
        );
    }

    #[test]
    fn a_layer_named_launch_fails() {
        let f = Fixture::new();
        let bp = f.buildpack("bp", "0.10", "", &layer("launch", "launch = true"));
        let err = build_error(f.build(&[bp], &PlanFile::default()));
        assert_eq!(
            err,
            format!(
                "build: buildpack bp@1.0: {}: a layer may not be named \"launch\" (launch.toml \
                 is not layer metadata)",
                f.layers("bp/launch")
            )
        );
    }

    const SBOM_FORMATS_LINE: &str = "sbom-formats = [\"application/vnd.cyclonedx+json\", \"application/spdx+json; version=2.3\"]";

    #[test]
    fn sbom_files_are_placed_by_layer_type() {
        let f = Fixture::new();
        f.write(
            &f.paths.layers.join("sbom/launch/stale/sbom.cdx.json"),
            "{}",
        );
        let script = format!(
            "{}{}\ncd \"$1\"\necho L > L.sbom.cdx.json\necho B > B.sbom.spdx.json\n\
             echo launch > launch.sbom.cdx.json\necho build > build.sbom.spdx.json\n\
             echo orphan > orphan.sbom.cdx.json\necho other > notes.json",
            layer("L", "launch = true\\ncache = true"),
            layer("B", "build = true"),
        );
        let bp = f.buildpack("acme/sbom", "0.10", SBOM_FORMATS_LINE, &script);
        f.build(&[bp], &PlanFile::default()).unwrap();
        let sbom = f.paths.layers.join("sbom");
        let mut found: Vec<(String, String)> = walkdir::WalkDir::new(&sbom)
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                (
                    e.path().strip_prefix(&sbom).unwrap().display().to_string(),
                    fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        found.sort();
        let expected: Vec<(String, String)> = [
            ("build/acme_sbom/B/sbom.spdx.json", "B\n"),
            ("build/acme_sbom/sbom.spdx.json", "build\n"),
            ("cache/acme_sbom/L/sbom.cdx.json", "L\n"),
            ("launch/acme_sbom/L/sbom.cdx.json", "L\n"),
            ("launch/acme_sbom/sbom.cdx.json", "launch\n"),
        ]
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn sbom_files_must_be_a_known_and_declared_format() {
        let f = Fixture::new();
        let undeclared = f.buildpack(
            "bp",
            "0.10",
            SBOM_FORMATS_LINE,
            "echo '{}' > \"$1/launch.sbom.syft.json\"",
        );
        let err = build_error(f.build(&[undeclared], &PlanFile::default()));
        assert_eq!(
            err,
            format!(
                "build: buildpack bp@1.0: {}: SBOM media type application/vnd.syft+json is not \
                 declared in buildpack.toml's sbom-formats",
                f.layers("bp/launch.sbom.syft.json")
            )
        );

        let f = Fixture::new();
        let unknown = f.buildpack(
            "bp",
            "0.10",
            SBOM_FORMATS_LINE,
            "echo '{}' > \"$1/build.sbom.xml.json\"",
        );
        let err = build_error(f.build(&[unknown], &PlanFile::default()));
        assert!(
            err.starts_with(&format!(
                "build: buildpack bp@1.0: {}: unsupported SBOM format",
                f.layers("bp/build.sbom.xml.json")
            )),
            "{err}"
        );
    }

    #[test]
    fn a_failing_bin_build_stops_the_build_with_exit_51() {
        let f = Fixture::new();
        let group = [
            f.buildpack("fails", "0.10", "", "echo failing >&2; exit 3"),
            f.buildpack("never", "0.10", "", "touch never-ran"),
        ];
        match f.build(&group, &PlanFile::default()) {
            Err(e @ LifecycleError::BuildpackFailed { .. }) => {
                assert_eq!(e.exit_code(), 51);
                assert_eq!(
                    e.to_string(),
                    "buildpack fails@1.0: bin/build failed with exit code 3"
                );
            }
            other => panic!("expected a buildpack failure, got {other:?}"),
        }
        assert!(!f.paths.app.join("never-ran").exists());
        assert!(!f.paths.layers.join("config/metadata.toml").exists());
    }

    #[test]
    fn a_missing_bin_build_names_the_buildpack() {
        let f = Fixture::new();
        let bp = f.buildpack("gone", "0.10", "", "true");
        fs::remove_file(bp.dir.join("bin/build")).unwrap();
        let program = bp.dir.join("bin/build");
        let err = build_error(f.build(&[bp], &PlanFile::default()));
        assert_eq!(
            err,
            format!(
                "build: buildpack gone@1.0: {} does not exist",
                program.display()
            )
        );
    }

    /// The state letter of a process in /proc/<pid>/stat, or None once it is gone.
    fn process_state(pid: &str) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
    }

    #[test]
    fn background_processes_die_with_bin_build() {
        let f = Fixture::new();
        let bp = f.buildpack("forks", "0.10", "", "sleep 1000 &\necho $! > sleep.pid");
        let started = Instant::now();
        f.build(&[bp], &PlanFile::default()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid = fs::read_to_string(f.paths.app.join("sleep.pid")).unwrap();
        let pid = pid.trim();
        // Killed, it is a zombie until whatever adopted it reaps it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match process_state(pid) {
                None | Some('Z') => break,
                Some(state) if Instant::now() > deadline => {
                    panic!("sleep {pid} still running (state {state})")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    #[test]
    fn sbom_names_match_the_lifecycles_glob() {
        for name in [
            "l.sbom.cdx.json",
            "launch.sbom.x.json",
            "a.b.sbom.c.d.json",
            "x.sbom..json",
        ] {
            assert!(is_sbom_name(name), "{name}");
        }
        for name in ["l.sbom.json", "l.sbom.cdx.xml", "lsbom.cdx.json", "l.toml"] {
            assert!(!is_sbom_name(name), "{name}");
        }
    }
}
