//! The detect phase: runs the buildpacks' `bin/detect` over the order's groups the way the
//! reference lifecycle does (`phase/detector.go`, `buildpack/detect.go`), resolves the
//! first group whose build plan works out, and writes group.toml and plan.toml.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write as _};
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde::Deserialize;

use super::descriptor::{self, Buildpack, OrderEntry};
use super::env::{Action, Env};
use super::order::{self, GroupEntry, Order};
use super::{
    ApiVersion, GroupFile, LifecycleError, Paths, PlanEntry, PlanFile, Provider, Require,
    TargetData,
};

/// The execution environment when the platform names none.
const DEFAULT_EXEC_ENV: &str = "production";

/// How long to keep reading a `bin/detect`'s output once its process group is dead: only a
/// process that left the group (`setsid`) can still hold the pipe open then.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// The most output kept per `bin/detect`; the rest is read and dropped.
const OUTPUT_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct DetectRequest<'a> {
    pub paths: &'a Paths,
    pub order: &'a Order,
    /// The run image's target as analyzed (empty fields are filled as LC fills them).
    pub target: &'a TargetData,
    /// The lifecycle's own environment, filtered ([`Env::filtered`]).
    pub env: &'a Env,
    /// `CNB_EXEC_ENV`; empty means `production`.
    pub exec_env: &'a str,
    /// The longest one `bin/detect` may run.
    pub timeout: Option<Duration>,
    /// The build container's os-release, for a run image without distro labels.
    pub os_release: &'a Path,
}

/// The group that passed and its build plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub group: Vec<Buildpack>,
    pub plan: PlanFile,
}

/// Tries the order's groups in turn and returns the first that passes. Fails with
/// [`LifecycleError::NoGroupPassed`] (whose report says what every buildpack of every group
/// tried did), or [`LifecycleError::Detect`] for a missing buildpack or an image extension.
pub fn detect(req: &DetectRequest) -> Result<Detected, LifecycleError> {
    let extensions = order::extension_names(req.order);
    if !extensions.is_empty() {
        return Err(refuse_extensions(&extensions));
    }
    let mut descriptors = HashMap::new();
    let mut lookup = |entry: &OrderEntry| lookup_buildpack(req.paths, &mut descriptors, entry);
    let mut groups = GroupRunner {
        req,
        base: order::build_target(req.target, req.os_release),
        exec_env: if req.exec_env.is_empty() {
            DEFAULT_EXEC_ENV
        } else {
            req.exec_env
        },
        runs: HashMap::new(),
        report: String::new(),
        errored: false,
        tried: 0,
    };
    for group in &req.order.groups {
        let flow = order::expand(group, &mut lookup, &mut |g| Ok(groups.try_group(g)))?;
        if let ControlFlow::Break(detected) = flow {
            return Ok(detected);
        }
    }
    if groups.tried == 0 {
        groups
            .report
            .push_str("the order holds no group of buildpacks\n");
    }
    Err(LifecycleError::NoGroupPassed {
        errored: groups.errored,
        report: groups.report,
    })
}

/// Writes `<layers>/group.toml` and `<layers>/plan.toml`, each replaced whole.
pub fn write_results(layers: &Path, detected: &Detected) -> Result<(), LifecycleError> {
    let group = GroupFile {
        group: detected.group.iter().map(Buildpack::group_member).collect(),
    };
    replace_file(&layers.join("group.toml"), &encode(&group, "group.toml")?)?;
    replace_file(
        &layers.join("plan.toml"),
        &encode(&detected.plan, "plan.toml")?,
    )
}

fn encode<T: serde::Serialize>(value: &T, name: &str) -> Result<String, LifecycleError> {
    toml::to_string(value).map_err(|e| LifecycleError::Detect(format!("encoding {name}: {e}")))
}

fn replace_file(path: &Path, text: &str) -> Result<(), LifecycleError> {
    let fail = |e: io::Error| LifecycleError::Detect(format!("writing {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".detect-")
        .tempfile_in(dir)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(fail)?;
    file.as_file().sync_all().map_err(fail)?;
    file.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

fn refuse_extensions(names: &[String]) -> LifecycleError {
    LifecycleError::Detect(format!(
        "the order uses image extensions ({}); lathe does not run Dockerfile extensions",
        names.join(", ")
    ))
}

/// Looks a buildpack up once per id and version; an id that is an image extension rather
/// than a buildpack is refused by name.
fn lookup_buildpack(
    paths: &Paths,
    cache: &mut HashMap<(String, String), Buildpack>,
    entry: &OrderEntry,
) -> Result<Buildpack, LifecycleError> {
    let key = (entry.id.clone(), entry.version.clone());
    if let Some(found) = cache.get(&key) {
        return Ok(found.clone());
    }
    let found = descriptor::find(&paths.buildpacks, &entry.id, &entry.version).map_err(|e| {
        if matches!(e, LifecycleError::Detect(_))
            && descriptor::is_extension(&paths.extensions, &entry.id)
        {
            refuse_extensions(&[format!("{}@{}", entry.id, entry.version)])
        } else {
            e
        }
    })?;
    cache.insert(key, found.clone());
    Ok(found)
}

/// What one `bin/detect` said.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Pass,
    Fail,
    Error(String),
}

#[derive(Debug, Clone)]
struct DetectRun {
    verdict: Verdict,
    /// stdout and stderr as they interleaved.
    output: String,
    /// The top-level provides/requires, then each `[[or]]` alternative.
    alternatives: Vec<PlanSections>,
}

impl DetectRun {
    fn error(why: String) -> DetectRun {
        DetectRun {
            verdict: Verdict::Error(why),
            output: String::new(),
            alternatives: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct PlanSections {
    provides: Vec<String>,
    requires: Vec<Require>,
}

/// How a buildpack of a group took part in it.
enum Participation {
    /// Left out before running: its exec-env excludes this one.
    Skipped(String),
    /// Judged without running (a target mismatch).
    Judged(DetectRun),
    /// Its run, by `id@version`.
    Ran(String),
}

/// The state of one detection: the runs so far (reused across groups) and the report.
struct GroupRunner<'a> {
    req: &'a DetectRequest<'a>,
    /// The run-image target with LC's defaults filled in.
    base: TargetData,
    exec_env: &'a str,
    runs: HashMap<String, DetectRun>,
    report: String,
    errored: bool,
    tried: usize,
}

impl GroupRunner<'_> {
    fn try_group(&mut self, entries: Vec<GroupEntry>) -> ControlFlow<Detected> {
        self.tried += 1;
        let mut taking_part = Vec::with_capacity(entries.len());
        let mut pending: Vec<&Buildpack> = Vec::new();
        for entry in &entries {
            let bp = &entry.buildpack;
            let how = if let Some(why) = excluded_by_exec_env(bp, self.exec_env) {
                Participation::Skipped(why)
            } else if !entry.optional && !order::supports_target(self.req.target, &self.base, bp) {
                Participation::Judged(DetectRun::error(format!(
                    "unable to satisfy target os/arch constraints; run image: {}, buildpack: {}",
                    describe_base(&self.base),
                    describe_targets(bp)
                )))
            } else {
                let key = bp.name_version();
                if !self.runs.contains_key(&key) && !pending.iter().any(|p| p.name_version() == key)
                {
                    pending.push(bp);
                }
                Participation::Ran(key)
            };
            taking_part.push(how);
        }
        self.run_in_parallel(&pending);

        let judged: Vec<(&GroupEntry, &DetectRun)> = entries
            .iter()
            .zip(&taking_part)
            .filter_map(|(entry, how)| match how {
                Participation::Skipped(_) => None,
                Participation::Judged(run) => Some((entry, run)),
                Participation::Ran(key) => Some((entry, &self.runs[key])),
            })
            .collect();
        match resolve(&judged) {
            Ok(detected) => ControlFlow::Break(detected),
            Err(failure) => {
                self.errored |= failure.errored;
                let report = self.describe_group(&entries, &taking_part, &failure.reason);
                self.report.push_str(&report);
                ControlFlow::Continue(())
            }
        }
    }

    fn run_in_parallel(&mut self, pending: &[&Buildpack]) {
        let ctx = RunContext {
            paths: self.req.paths,
            env: self.req.env,
            exec_env: self.exec_env,
            timeout: self.req.timeout,
            target: &self.base,
        };
        let finished: Vec<(String, DetectRun)> = std::thread::scope(|scope| {
            let handles: Vec<_> = pending
                .iter()
                .map(|bp| scope.spawn(|| run_detect(bp, &ctx)))
                .collect();
            pending
                .iter()
                .zip(handles)
                .map(|(bp, handle)| {
                    let run = handle.join().unwrap_or_else(|_| {
                        DetectRun::error("running bin/detect panicked".to_string())
                    });
                    (bp.name_version(), run)
                })
                .collect()
        });
        self.runs.extend(finished);
    }

    fn describe_group(
        &self,
        entries: &[GroupEntry],
        taking_part: &[Participation],
        reason: &str,
    ) -> String {
        let names: Vec<String> = entries.iter().map(|e| e.buildpack.name_version()).collect();
        let mut out = format!("group {}: {}\n", self.tried, names.join(", "));
        for (entry, how) in entries.iter().zip(taking_part) {
            let name = entry.buildpack.name_version();
            let optional = if entry.optional { " (optional)" } else { "" };
            let run = match how {
                Participation::Skipped(why) => {
                    let _ = writeln!(out, "  skip   {name}{optional}: {why}");
                    continue;
                }
                Participation::Judged(run) => run,
                Participation::Ran(key) => &self.runs[key],
            };
            let _ = match &run.verdict {
                Verdict::Pass => writeln!(out, "  pass   {name}{optional}"),
                Verdict::Fail => writeln!(out, "  fail   {name}{optional}"),
                Verdict::Error(why) => writeln!(out, "  error  {name}{optional}: {why}"),
            };
            for line in run.output.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
        let _ = writeln!(out, "  => {reason}");
        out
    }
}

/// A Buildpack API 0.12 buildpack that lists execution environments without `*` or the
/// current one is left out of the group.
fn excluded_by_exec_env(bp: &Buildpack, exec_env: &str) -> Option<String> {
    let excluded = bp.api >= ApiVersion::new(0, 12)
        && !bp.exec_env.is_empty()
        && !bp.exec_env.iter().any(|e| e == "*" || e == exec_env);
    excluded.then(|| {
        format!(
            "runs only in exec-env {}, not {exec_env}",
            bp.exec_env.join(", ")
        )
    })
}

fn describe_base(target: &TargetData) -> String {
    let mut out = format!("{}/{}", target.os, target.arch);
    if let Some(variant) = target.variant.as_deref().filter(|v| !v.is_empty()) {
        let _ = write!(out, "/{variant}");
    }
    if let Some(distro) = &target.distro {
        let _ = write!(out, " ({} {})", distro.name, distro.version);
    }
    out
}

fn describe_targets(bp: &Buildpack) -> String {
    let any = |v: &Option<String>| v.clone().unwrap_or_else(|| "*".into());
    let targets: Vec<String> = bp
        .targets
        .iter()
        .map(|t| {
            let mut out = format!("{}/{}", any(&t.os), any(&t.arch));
            if let Some(variant) = &t.variant {
                let _ = write!(out, "/{variant}");
            }
            if !t.distros.is_empty() {
                let distros: Vec<String> = t
                    .distros
                    .iter()
                    .map(|d| format!("{} {}", any(&d.name), any(&d.version)))
                    .collect();
                let _ = write!(out, " ({})", distros.join(" | "));
            }
            out
        })
        .collect();
    targets.join(", ")
}

/// Why a group did not pass.
struct GroupFailure {
    /// A buildpack errored where it counted (LC's exit 21 rather than 20).
    errored: bool,
    reason: String,
}

/// LC's resolver: every non-optional buildpack must pass and one at least must; then the
/// first trial (one plan alternative per passing buildpack, left to right, depth-first)
/// whose requires and provides all meet, after dropping optional buildpacks whose don't,
/// gives the group and the plan.
fn resolve(judged: &[(&GroupEntry, &DetectRun)]) -> Result<Detected, GroupFailure> {
    let mut errored = false;
    let mut not_passed = Vec::new();
    for (entry, run) in judged {
        match run.verdict {
            Verdict::Pass => continue,
            Verdict::Fail => {}
            Verdict::Error(_) => errored = true,
        }
        if !entry.optional {
            not_passed.push(entry.buildpack.name_version());
        }
    }
    if !not_passed.is_empty() {
        return Err(GroupFailure {
            errored,
            reason: format!(
                "required buildpacks did not pass: {}",
                not_passed.join(", ")
            ),
        });
    }
    let passed: Vec<(&GroupEntry, &DetectRun)> = judged
        .iter()
        .filter(|(_, run)| run.verdict == Verdict::Pass)
        .copied()
        .collect();
    if passed.is_empty() {
        return Err(GroupFailure {
            errored: false,
            reason: "no buildpack passed".into(),
        });
    }
    let mut last_failure = String::new();
    match first_trial_that_settles(&passed, &mut Vec::new(), &mut last_failure) {
        Some(detected) => Ok(detected),
        None => Err(GroupFailure {
            errored: false,
            reason: format!("no build plan: {last_failure}"),
        }),
    }
}

/// One buildpack's chosen plan alternative within a trial.
#[derive(Clone, Copy)]
struct Choice<'a> {
    /// Position in the passing buildpacks: a buildpack's identity within a trial.
    slot: usize,
    entry: &'a GroupEntry,
    /// Only a buildpack's last alternative keeps its optional flag.
    optional: bool,
    sections: &'a PlanSections,
}

fn first_trial_that_settles<'a>(
    passed: &[(&'a GroupEntry, &'a DetectRun)],
    trial: &mut Vec<Choice<'a>>,
    last_failure: &mut String,
) -> Option<Detected> {
    let Some(((entry, run), rest)) = passed.split_first() else {
        return match settle(trial.clone()) {
            Ok(detected) => Some(detected),
            Err(why) => {
                *last_failure = why;
                None
            }
        };
    };
    let count = run.alternatives.len();
    for (i, sections) in run.alternatives.iter().enumerate() {
        trial.push(Choice {
            slot: trial.len(),
            entry,
            optional: entry.optional && i + 1 == count,
            sections,
        });
        let found = first_trial_that_settles(rest, trial, last_failure);
        trial.pop();
        if found.is_some() {
            return found;
        }
    }
    None
}

/// One dependency name as the trial's buildpacks provide and require it, positions being
/// indices into the trial.
#[derive(Default)]
struct Dependency {
    providers: Vec<usize>,
    requires: Vec<Require>,
    /// Requirers with no provider at or before them.
    unmet_requires: Vec<usize>,
    /// Providers with no requirer at or after them.
    unmet_provides: Vec<usize>,
}

/// Drops optional buildpacks whose requires or provides don't meet until all meet (the
/// trial then settles) or a required buildpack's don't (it fails).
fn settle(mut trial: Vec<Choice>) -> Result<Detected, String> {
    loop {
        let deps = dependencies(&trial);
        let mut dropped = HashSet::new();
        for (name, dep) in &deps {
            for &i in &dep.unmet_requires {
                let choice = &trial[i];
                if !choice.optional {
                    return Err(format!(
                        "{} requires {name}, which no buildpack at or before it provides",
                        choice.entry.buildpack.name_version()
                    ));
                }
                dropped.insert(choice.slot);
            }
        }
        for (name, dep) in &deps {
            for &i in &dep.unmet_provides {
                let choice = &trial[i];
                if !choice.optional {
                    return Err(format!(
                        "{} provides {name}, which no buildpack at or after it requires",
                        choice.entry.buildpack.name_version()
                    ));
                }
                dropped.insert(choice.slot);
            }
        }
        if dropped.is_empty() {
            if trial.is_empty() {
                return Err("every buildpack was dropped for unmet requires or provides".into());
            }
            let plan = PlanFile {
                entries: deps
                    .into_iter()
                    .map(|(_, dep)| PlanEntry {
                        providers: dep
                            .providers
                            .iter()
                            .map(|&i| Provider {
                                id: trial[i].entry.buildpack.id.clone(),
                                version: trial[i].entry.buildpack.version.clone(),
                            })
                            .collect(),
                        requires: dep.requires,
                    })
                    .collect(),
            };
            let group = trial.iter().map(|c| c.entry.buildpack.clone()).collect();
            return Ok(Detected { group, plan });
        }
        trial.retain(|c| !dropped.contains(&c.slot));
    }
}

/// The trial's dependencies by name, in the order names first appear.
fn dependencies(trial: &[Choice]) -> Vec<(String, Dependency)> {
    let mut deps: Vec<(String, Dependency)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut position_of = |name: &str, deps: &mut Vec<(String, Dependency)>| -> usize {
        *index.entry(name.to_string()).or_insert_with(|| {
            deps.push((name.to_string(), Dependency::default()));
            deps.len() - 1
        })
    };
    for (i, choice) in trial.iter().enumerate() {
        for name in &choice.sections.provides {
            let at = position_of(name, &mut deps);
            deps[at].1.unmet_provides.push(i);
        }
        for require in &choice.sections.requires {
            let at = position_of(&require.name, &mut deps);
            let dep = &mut deps[at].1;
            let waiting = std::mem::take(&mut dep.unmet_provides);
            dep.providers.extend(waiting);
            if dep.providers.is_empty() {
                dep.unmet_requires.push(i);
            } else {
                dep.requires.push(require.clone());
            }
        }
    }
    deps
}

/// What every `bin/detect` of a detection shares.
struct RunContext<'a> {
    paths: &'a Paths,
    env: &'a Env,
    exec_env: &'a str,
    timeout: Option<Duration>,
    /// With LC's defaults filled in: what `CNB_TARGET_*` say.
    target: &'a TargetData,
}

fn run_detect(bp: &Buildpack, ctx: &RunContext) -> DetectRun {
    let plan_dir = match tempfile::Builder::new().prefix("plan.").tempdir() {
        Ok(dir) => dir,
        Err(e) => return DetectRun::error(format!("creating a plan directory: {e}")),
    };
    let plan_path = plan_dir.path().join("plan.toml");
    if let Err(e) = std::fs::write(&plan_path, "") {
        return DetectRun::error(format!("creating {}: {e}", plan_path.display()));
    }
    let env = match detect_env(bp, ctx, &plan_path) {
        Ok(env) => env,
        Err(e) => return DetectRun::error(format!("building the environment: {e}")),
    };
    let program = bp.dir.join("bin").join("detect");
    let mut command = Command::new(&program);
    command
        .arg(&ctx.paths.platform)
        .arg(&plan_path)
        .current_dir(&ctx.paths.app)
        .env_clear()
        .envs(env);
    let finished = match run_captured(command, ctx.timeout) {
        Ok(finished) => finished,
        Err(e) => return DetectRun::error(format!("cannot run {}: {e}", program.display())),
    };
    let output = finished.output_text();
    let verdict = if finished.timed_out {
        Verdict::Error(format!(
            "{}: bin/detect did not finish within {:?} and was killed",
            bp.name_version(),
            ctx.timeout.unwrap_or_default()
        ))
    } else {
        match finished.status {
            Err(e) => Verdict::Error(format!("waiting for bin/detect: {e}")),
            Ok(status) => match status.code() {
                Some(0) => Verdict::Pass,
                Some(100) => Verdict::Fail,
                Some(code) => Verdict::Error(format!("bin/detect exited with status {code}")),
                None => Verdict::Error(format!(
                    "bin/detect was killed by signal {}",
                    status.signal().unwrap_or(0)
                )),
            },
        }
    };
    let mut run = DetectRun {
        verdict,
        output,
        alternatives: Vec::new(),
    };
    if run.verdict == Verdict::Pass {
        match read_plan(&plan_path, bp) {
            Ok(alternatives) => run.alternatives = alternatives,
            Err(why) => run.verdict = Verdict::Error(why),
        }
    }
    run
}

/// The environment of `bin/detect`: the lifecycle's filtered environment, the user's
/// `<platform>/env` unless the buildpack clears it, the operator's `<build-config>/env`, then
/// the `CNB_*` variables the buildpack's API promises.
fn detect_env(
    bp: &Buildpack,
    ctx: &RunContext,
    plan_path: &Path,
) -> io::Result<Vec<(String, String)>> {
    let mut env = if bp.clear_env {
        ctx.env.clone()
    } else {
        ctx.env.with_user_env(&ctx.paths.platform)?
    };
    env.apply_env_dir(&ctx.paths.build_config.join("env"), Action::Default)?;
    let path_text = |p: &Path| p.to_string_lossy().into_owned();
    env.set("CNB_BUILDPACK_DIR", path_text(&bp.dir));
    if bp.api >= ApiVersion::new(0, 8) {
        env.set("CNB_PLATFORM_DIR", path_text(&ctx.paths.platform));
        env.set("CNB_BUILD_PLAN_PATH", path_text(plan_path));
    }
    if bp.api >= ApiVersion::new(0, 10) {
        let target = ctx.target;
        env.set("CNB_TARGET_OS", target.os.clone());
        env.set("CNB_TARGET_ARCH", target.arch.clone());
        let distro = target.distro.clone().unwrap_or_default();
        for (name, value) in [
            (
                "CNB_TARGET_ARCH_VARIANT",
                target.variant.clone().unwrap_or_default(),
            ),
            ("CNB_TARGET_DISTRO_NAME", distro.name),
            ("CNB_TARGET_DISTRO_VERSION", distro.version),
        ] {
            if !value.is_empty() {
                env.set(name, value);
            }
        }
    }
    if bp.api >= ApiVersion::new(0, 12) {
        env.set("CNB_EXEC_ENV", ctx.exec_env);
    }
    Ok(env.pairs())
}

#[derive(Deserialize)]
struct RawPlan {
    #[serde(default)]
    provides: Vec<RawProvide>,
    #[serde(default)]
    requires: Vec<RawRequire>,
    #[serde(default)]
    or: Vec<RawSections>,
}

#[derive(Deserialize)]
struct RawSections {
    #[serde(default)]
    provides: Vec<RawProvide>,
    #[serde(default)]
    requires: Vec<RawRequire>,
}

#[derive(Deserialize)]
struct RawProvide {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct RawRequire {
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    metadata: toml::Table,
}

/// Reads what `bin/detect` wrote to its plan path, with LC's checks on `version`.
fn read_plan(path: &Path, bp: &Buildpack) -> Result<Vec<PlanSections>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the build plan bin/detect wrote: {e}"))?;
    let raw: RawPlan = toml::from_str(&text).map_err(|e| {
        format!(
            "the build plan bin/detect wrote is not valid: {}",
            e.message()
        )
    })?;
    let mut alternatives = vec![RawSections {
        provides: raw.provides,
        requires: raw.requires,
    }];
    alternatives.extend(raw.or);
    let id = &bp.id;
    alternatives
        .into_iter()
        .map(|sections| {
            let mut requires = Vec::with_capacity(sections.requires.len());
            for require in sections.requires {
                if require.version.as_deref().is_some_and(|v| !v.is_empty()) {
                    return Err(if require.metadata.contains_key("version") {
                        format!(
                            "buildpack {id} has a \"version\" key and a \"metadata.version\" \
                             which cannot be specified together; use \"metadata.version\""
                        )
                    } else {
                        format!(
                            "buildpack {id} has a \"version\" key which is not supported; \
                             use \"metadata.version\""
                        )
                    });
                }
                requires.push(Require {
                    name: require.name,
                    metadata: require.metadata,
                });
            }
            Ok(PlanSections {
                provides: sections.provides.into_iter().map(|p| p.name).collect(),
                requires,
            })
        })
        .collect()
}

/// A finished child: its status, and what it wrote to stdout and stderr together.
struct Finished {
    status: io::Result<ExitStatus>,
    output: Vec<u8>,
    truncated: bool,
    timed_out: bool,
    /// The pipe was still open after the process group died; reading stopped.
    abandoned: bool,
}

impl Finished {
    fn output_text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.output).into_owned();
        if self.truncated {
            text.push_str("\n[output beyond 1 MiB dropped]");
        }
        if self.abandoned {
            text.push_str(
                "\n[stopped reading: a process that left bin/detect's process group holds the \
                 output open]",
            );
        }
        text
    }
}

/// Runs `command` in a process group of its own with stdout and stderr on one pipe. Once
/// the leader exits (or outlives `timeout`, and is killed), the whole group is killed, so a
/// daemon it started neither survives nor keeps the pipe open; the leader is reaped only
/// after that, so its pid, which names the group, cannot have been reused.
fn run_captured(mut command: Command, timeout: Option<Duration>) -> io::Result<Finished> {
    let (reader, writer) = io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0);
    let mut child = command.spawn()?;
    // The command holds the parent's copies of the write end: the reader sees end-of-file
    // only once they are closed too.
    drop(command);
    let group = Pid::from_raw(child.id() as i32);

    let captured = Arc::new(Mutex::new((Vec::new(), false)));
    let (read_done, output_finished) = mpsc::channel();
    {
        let captured = Arc::clone(&captured);
        std::thread::spawn(move || {
            drain(reader, &captured);
            let _ = read_done.send(());
        });
    }
    let (exit_seen, leader_exited) = mpsc::channel();
    std::thread::spawn(move || {
        wait_for_exit_without_reaping(group);
        let _ = exit_seen.send(());
    });

    let timed_out = match timeout {
        Some(limit) => leader_exited.recv_timeout(limit).is_err(),
        None => {
            let _ = leader_exited.recv();
            false
        }
    };
    if timed_out {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = leader_exited.recv();
    }
    // Whatever the leader left running in its group.
    let _ = killpg(group, Signal::SIGKILL);
    let status = child.wait();
    let abandoned = output_finished.recv_timeout(OUTPUT_GRACE).is_err();
    let (output, truncated) =
        std::mem::take(&mut *captured.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Finished {
        status,
        output,
        truncated,
        timed_out,
        abandoned,
    })
}

fn drain(mut reader: io::PipeReader, captured: &Mutex<(Vec<u8>, bool)>) {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut guard = captured.lock().unwrap_or_else(|e| e.into_inner());
        let (output, truncated) = &mut *guard;
        let room = OUTPUT_LIMIT.saturating_sub(output.len());
        output.extend_from_slice(&chunk[..n.min(room)]);
        *truncated |= n > room;
    }
}

/// Blocks until the child `pid` has exited, leaving it a zombie.
fn wait_for_exit_without_reaping(pid: Pid) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Distro;
    use super::*;
    use std::path::PathBuf;
    use std::time::Instant;

    /// A work area with the container's directories under one temp dir.
    struct Fixture {
        _root: tempfile::TempDir,
        paths: Paths,
        env: Env,
        os_release: PathBuf,
        /// Where test buildpacks leave what they saw.
        out: PathBuf,
        target: TargetData,
    }

    impl Fixture {
        fn new() -> Fixture {
            let root = tempfile::tempdir().unwrap();
            let at = |name: &str| {
                let dir = root.path().join(name);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            };
            let paths = Paths {
                app: at("workspace"),
                layers: at("layers"),
                platform: at("platform"),
                buildpacks: at("cnb/buildpacks"),
                extensions: at("cnb/extensions"),
                build_config: at("cnb/build-config"),
                order: root.path().join("cnb/order.toml"),
            };
            let os_release = root.path().join("os-release");
            std::fs::write(&os_release, "ID=\"testos\"\nVERSION_ID=\"1.0\"\n").unwrap();
            let lifecycle_env: Vec<(String, String)> = [
                ("PATH", "/usr/bin:/bin"),
                ("HOME", "/home/cnb"),
                ("LANG", "C.UTF-8"),
                ("CNB_PLATFORM_API", "0.13"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            Fixture {
                out: at("out"),
                paths,
                env: Env::filtered(&lifecycle_env),
                os_release,
                target: TargetData {
                    os: "linux".into(),
                    arch: "amd64".into(),
                    ..TargetData::default()
                },
                _root: root,
            }
        }

        /// Installs a buildpack whose `bin/detect` is `script` (bash); `extra` is appended
        /// to its buildpack.toml.
        fn buildpack(&self, id: &str, api: &str, extra: &str, script: &str) -> PathBuf {
            let dir = self.install(id, api, extra);
            let bin = dir.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            let staged = dir.join("detect.src");
            std::fs::write(&staged, format!("#!/bin/bash\n{script}\n")).unwrap();
            // A file this process wrote and exec's at once can fail with ETXTBSY while
            // another test thread forks; install(1) writes it in its own process instead.
            let status = Command::new("install")
                .args(["-m", "0755"])
                .arg(&staged)
                .arg(bin.join("detect"))
                .status()
                .unwrap();
            assert!(status.success());
            dir
        }

        fn install(&self, id: &str, api: &str, extra: &str) -> PathBuf {
            let dir = self
                .paths
                .buildpacks
                .join(super::super::escape_id(id))
                .join("1");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("buildpack.toml"),
                format!(
                    "api = \"{api}\"\n[buildpack]\nid = \"{id}\"\nversion = \"1\"\n\
                     homepage = \"https://{id}.example\"\n{extra}"
                ),
            )
            .unwrap();
            dir
        }

        /// A buildpack that passes, writing `plan` (TOML) as its build plan.
        fn planning(&self, id: &str, plan: &str) {
            self.buildpack(
                id,
                "0.10",
                "",
                &format!("cat > \"$2\" <<'PLAN'\n{plan}\nPLAN\nexit 0"),
            );
        }

        fn request<'a>(&'a self, order: &'a Order) -> DetectRequest<'a> {
            DetectRequest {
                paths: &self.paths,
                order,
                target: &self.target,
                env: &self.env,
                exec_env: "",
                timeout: Some(Duration::from_secs(20)),
                os_release: &self.os_release,
            }
        }

        fn detect(&self, order: &Order) -> Result<Detected, LifecycleError> {
            detect(&self.request(order))
        }

        /// The variables a buildpack that ran `record_env` saw.
        fn seen_env(&self, name: &str) -> Vec<(String, String)> {
            let text = std::fs::read_to_string(self.out.join(format!("{name}.env"))).unwrap();
            let mut vars: Vec<(String, String)> = text
                .lines()
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            vars.sort();
            vars
        }
    }

    /// Script lines that save the environment bash was started with, exactly.
    fn record_env(out: &Path, name: &str) -> String {
        format!(
            "while IFS= read -r -d '' var; do printf '%s\\n' \"$var\"; done \
             < /proc/$$/environ > {}/{name}.env",
            out.display()
        )
    }

    fn group(ids: &[&str]) -> Vec<OrderEntry> {
        ids.iter()
            .map(|id| OrderEntry {
                id: id.trim_end_matches('?').into(),
                version: "1".into(),
                optional: id.ends_with('?'),
            })
            .collect()
    }

    fn one_group(ids: &[&str]) -> Order {
        order::from_group(group(ids))
    }

    fn ids(detected: &Detected) -> Vec<String> {
        detected.group.iter().map(|b| b.id.clone()).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.sort();
        out
    }

    fn report_of(err: LifecycleError) -> (i32, String) {
        let code = err.exit_code();
        match err {
            LifecycleError::NoGroupPassed { report, .. } => (code, report),
            other => (code, other.to_string()),
        }
    }

    /// Env files for the user and operator layers, and a buildpack of `api` recording its env.
    fn env_fixture(api: &str, extra: &str) -> (Fixture, PathBuf) {
        let fx = Fixture::new();
        let user_env = fx.paths.platform.join("env");
        std::fs::create_dir_all(&user_env).unwrap();
        std::fs::write(user_env.join("BP_USER"), "from-user").unwrap();
        let operator_env = fx.paths.build_config.join("env");
        std::fs::create_dir_all(&operator_env).unwrap();
        std::fs::write(operator_env.join("OPERATOR"), "from-operator").unwrap();
        let dir = fx.buildpack("acme/bp", api, extra, &record_env(&fx.out, "bp"));
        (fx, dir)
    }

    fn base_env(dir: &Path) -> Vec<(String, String)> {
        pairs(&[
            ("BP_USER", "from-user"),
            ("CNB_BUILDPACK_DIR", dir.to_str().unwrap()),
            ("HOME", "/home/cnb"),
            ("OPERATOR", "from-operator"),
            ("PATH", "/usr/bin:/bin"),
        ])
    }

    fn plan_path_seen(fx: &Fixture) -> String {
        let env = fx.seen_env("bp");
        env.iter()
            .find(|(k, _)| k == "CNB_BUILD_PLAN_PATH")
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    #[test]
    fn api_0_7_sees_only_the_buildpack_dir_among_cnb_variables() {
        let (fx, dir) = env_fixture("0.7", "");
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        assert_eq!(fx.seen_env("bp"), base_env(&dir));
    }

    #[test]
    fn api_0_8_adds_platform_dir_and_a_fresh_plan_path() {
        let (fx, dir) = env_fixture("0.8", "");
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        let plan = plan_path_seen(&fx);
        assert!(plan.ends_with("/plan.toml"), "{plan}");
        assert!(
            !Path::new(&plan).exists(),
            "the plan's temp dir is removed afterwards"
        );
        let mut expected = base_env(&dir);
        expected.push((
            "CNB_PLATFORM_DIR".into(),
            fx.paths.platform.display().to_string(),
        ));
        expected.push(("CNB_BUILD_PLAN_PATH".into(), plan));
        expected.sort();
        assert_eq!(fx.seen_env("bp"), expected);
    }

    #[test]
    fn api_0_10_adds_the_target_with_the_distro_from_os_release() {
        let (fx, dir) = env_fixture("0.10", "");
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        let mut expected = base_env(&dir);
        expected.extend(pairs(&[
            ("CNB_PLATFORM_DIR", fx.paths.platform.to_str().unwrap()),
            ("CNB_BUILD_PLAN_PATH", &plan_path_seen(&fx)),
            ("CNB_TARGET_OS", "linux"),
            ("CNB_TARGET_ARCH", "amd64"),
            ("CNB_TARGET_DISTRO_NAME", "testos"),
            ("CNB_TARGET_DISTRO_VERSION", "1.0"),
        ]));
        expected.sort();
        assert_eq!(fx.seen_env("bp"), expected);
    }

    #[test]
    fn api_0_10_target_variables_come_from_the_run_image_when_it_has_them() {
        let (mut fx, _) = env_fixture("0.10", "");
        fx.target = TargetData {
            os: String::new(),
            arch: "arm64".into(),
            variant: Some("v8".into()),
            distro: Some(Distro {
                name: "ubuntu".into(),
                version: String::new(),
            }),
            id: None,
        };
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        let target: Vec<(String, String)> = fx
            .seen_env("bp")
            .into_iter()
            .filter(|(k, _)| k.starts_with("CNB_TARGET_"))
            .collect();
        assert_eq!(
            target,
            pairs(&[
                ("CNB_TARGET_ARCH", "arm64"),
                ("CNB_TARGET_ARCH_VARIANT", "v8"),
                ("CNB_TARGET_DISTRO_NAME", "ubuntu"),
                ("CNB_TARGET_OS", "linux"),
            ]),
            "empty os is linux; an empty distro version is left out"
        );
    }

    #[test]
    fn api_0_12_adds_the_exec_env() {
        let (fx, dir) = env_fixture("0.12", "");
        let order = one_group(&["acme/bp"]);
        detect(&DetectRequest {
            exec_env: "test",
            ..fx.request(&order)
        })
        .unwrap();
        let mut expected = base_env(&dir);
        expected.extend(pairs(&[
            ("CNB_PLATFORM_DIR", fx.paths.platform.to_str().unwrap()),
            ("CNB_BUILD_PLAN_PATH", &plan_path_seen(&fx)),
            ("CNB_TARGET_OS", "linux"),
            ("CNB_TARGET_ARCH", "amd64"),
            ("CNB_TARGET_DISTRO_NAME", "testos"),
            ("CNB_TARGET_DISTRO_VERSION", "1.0"),
            ("CNB_EXEC_ENV", "test"),
        ]));
        expected.sort();
        assert_eq!(fx.seen_env("bp"), expected);

        fx.detect(&order).unwrap();
        assert!(
            fx.seen_env("bp")
                .contains(&("CNB_EXEC_ENV".into(), "production".into())),
            "production when the platform names none"
        );
    }

    #[test]
    fn clear_env_drops_the_user_env_but_not_the_operators() {
        // The fixture's extra lines land in [buildpack].
        let (fx, dir) = env_fixture("0.7", "clear-env = true\n");
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        assert_eq!(
            fx.seen_env("bp"),
            pairs(&[
                ("CNB_BUILDPACK_DIR", dir.to_str().unwrap()),
                ("HOME", "/home/cnb"),
                ("OPERATOR", "from-operator"),
                ("PATH", "/usr/bin:/bin"),
            ])
        );
    }

    #[test]
    fn user_path_is_prepended_and_operator_defaults_do_not_override() {
        let (fx, _) = env_fixture("0.7", "");
        std::fs::write(fx.paths.platform.join("env/PATH"), "/user/bin").unwrap();
        std::fs::write(
            fx.paths.build_config.join("env/BP_USER"),
            "operator-default",
        )
        .unwrap();
        std::fs::write(fx.paths.build_config.join("env/FORCED.override"), "yes").unwrap();
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        let env = fx.seen_env("bp");
        assert!(env.contains(&("PATH".into(), "/user/bin:/usr/bin:/bin".into())));
        assert!(env.contains(&("BP_USER".into(), "from-user".into())));
        assert!(env.contains(&("FORCED".into(), "yes".into())));
    }

    #[test]
    fn detect_gets_two_arguments_and_runs_in_the_app_dir() {
        let fx = Fixture::new();
        let out = fx.out.display();
        let dir = fx.buildpack(
            "acme/bp",
            "0.8",
            "",
            &format!(
                "printf '%s\\n' \"$0\" \"$1\" \"$2\" \"$PWD\" \"$#\" > {out}/args\n\
                 [ -s \"$2\" ] && echo not-empty >> {out}/args\n\
                 [ \"$2\" = \"$CNB_BUILD_PLAN_PATH\" ] && echo same >> {out}/args\n\
                 exit 0"
            ),
        );
        fx.detect(&one_group(&["acme/bp"])).unwrap();
        let args = std::fs::read_to_string(fx.out.join("args")).unwrap();
        let lines: Vec<&str> = args.lines().collect();
        assert_eq!(lines[0], dir.join("bin/detect").to_str().unwrap());
        assert_eq!(lines[1], fx.paths.platform.to_str().unwrap());
        assert!(lines[2].ends_with("plan.toml"));
        assert_eq!(lines[3], fx.paths.app.to_str().unwrap());
        assert_eq!(lines[4], "2");
        assert_eq!(&lines[5..], ["same"], "the plan file starts empty");
    }

    #[test]
    fn requires_meet_provides_and_the_plan_lists_them() {
        let fx = Fixture::new();
        fx.planning("acme/jdk", "[[provides]]\nname = \"jdk\"");
        fx.planning(
            "acme/maven",
            "[[provides]]\nname = \"maven\"\n\
             [[requires]]\nname = \"jdk\"\n[requires.metadata]\nversion = \"21\"\n\
             [[requires]]\nname = \"maven\"",
        );
        fx.planning("acme/app", "[[requires]]\nname = \"jdk\"");
        let detected = fx
            .detect(&one_group(&["acme/jdk", "acme/maven", "acme/app"]))
            .unwrap();
        assert_eq!(ids(&detected), ["acme/jdk", "acme/maven", "acme/app"]);
        let jdk_provider = Provider {
            id: "acme/jdk".into(),
            version: "1".into(),
        };
        let mut version = toml::Table::new();
        version.insert("version".into(), "21".into());
        assert_eq!(
            detected.plan.entries,
            [
                PlanEntry {
                    providers: vec![jdk_provider],
                    requires: vec![
                        Require {
                            name: "jdk".into(),
                            metadata: version
                        },
                        Require {
                            name: "jdk".into(),
                            metadata: toml::Table::new()
                        },
                    ],
                },
                PlanEntry {
                    providers: vec![Provider {
                        id: "acme/maven".into(),
                        version: "1".into()
                    }],
                    requires: vec![Require {
                        name: "maven".into(),
                        metadata: toml::Table::new()
                    }],
                },
            ]
        );
    }

    #[test]
    fn or_alternatives_are_tried_left_to_right() {
        let fx = Fixture::new();
        fx.planning(
            "acme/node",
            "[[provides]]\nname = \"yarn\"\n\
             [[or]]\n[[or.provides]]\nname = \"node\"\n\
             [[or]]\n[[or.provides]]\nname = \"npm\"",
        );
        fx.planning("acme/app", "[[requires]]\nname = \"node\"");
        let detected = fx.detect(&one_group(&["acme/node", "acme/app"])).unwrap();
        assert_eq!(ids(&detected), ["acme/node", "acme/app"]);
        assert_eq!(detected.plan.entries.len(), 1);
        assert_eq!(detected.plan.entries[0].requires[0].name, "node");
    }

    #[test]
    fn an_optional_buildpack_with_unmet_requires_is_knocked_out() {
        let fx = Fixture::new();
        fx.planning(
            "acme/extra",
            "[[requires]]\nname = \"nothing-provides-this\"",
        );
        fx.planning("acme/app", "");
        let detected = fx.detect(&one_group(&["acme/extra?", "acme/app"])).unwrap();
        assert_eq!(ids(&detected), ["acme/app"]);
        assert!(detected.plan.entries.is_empty());
    }

    #[test]
    fn only_the_last_alternative_of_an_optional_buildpack_is_optional() {
        let fx = Fixture::new();
        // Its first alternative provides what nobody requires: as it is not the last
        // alternative, that trial fails outright; the second trial drops the buildpack.
        fx.planning(
            "acme/extra",
            "[[provides]]\nname = \"unused\"\n[[or]]\n[[or.requires]]\nname = \"missing\"",
        );
        fx.planning("acme/app", "");
        let detected = fx.detect(&one_group(&["acme/extra?", "acme/app"])).unwrap();
        assert_eq!(ids(&detected), ["acme/app"]);
    }

    #[test]
    fn an_unmet_require_fails_a_required_buildpack_and_the_next_group_runs() {
        let fx = Fixture::new();
        fx.planning("acme/app", "[[requires]]\nname = \"jdk\"");
        fx.planning("acme/other", "");
        let order = Order {
            groups: vec![group(&["acme/app"]), group(&["acme/other"])],
            extensions: vec![],
        };
        assert_eq!(ids(&fx.detect(&order).unwrap()), ["acme/other"]);

        let err = fx.detect(&one_group(&["acme/app"])).unwrap_err();
        let (code, report) = report_of(err);
        assert_eq!(code, 20);
        assert!(
            report.contains("acme/app@1 requires jdk, which no buildpack at or before it provides"),
            "{report}"
        );
    }

    #[test]
    fn a_provide_nobody_requires_fails_a_required_buildpack() {
        let fx = Fixture::new();
        fx.planning("acme/jdk", "[[provides]]\nname = \"jdk\"");
        let (code, report) = report_of(fx.detect(&one_group(&["acme/jdk"])).unwrap_err());
        assert_eq!(code, 20);
        assert!(report.contains("provides jdk"), "{report}");
    }

    #[test]
    fn a_require_before_its_provider_is_unmet() {
        let fx = Fixture::new();
        fx.planning("acme/app", "[[requires]]\nname = \"jdk\"");
        fx.planning("acme/jdk", "[[provides]]\nname = \"jdk\"");
        let (code, _) = report_of(
            fx.detect(&one_group(&["acme/app", "acme/jdk"]))
                .unwrap_err(),
        );
        assert_eq!(code, 20);
    }

    #[test]
    fn a_group_of_only_failed_optional_buildpacks_fails() {
        let fx = Fixture::new();
        fx.buildpack("acme/a", "0.10", "", "exit 100");
        let (code, report) = report_of(fx.detect(&one_group(&["acme/a?"])).unwrap_err());
        assert_eq!(code, 20);
        assert!(report.contains("no buildpack passed"), "{report}");
    }

    #[test]
    fn composites_expand_and_the_first_passing_inner_group_wins() {
        let fx = Fixture::new();
        fx.buildpack("acme/a", "0.10", "", "echo a says no\nexit 100");
        fx.planning("acme/b", "");
        fx.install(
            "acme/meta",
            "0.10",
            "[[order]]\n[[order.group]]\nid = \"acme/a\"\nversion = \"1\"\n\
             [[order]]\n[[order.group]]\nid = \"acme/b\"\n",
        );
        let detected = fx.detect(&one_group(&["acme/meta"])).unwrap();
        assert_eq!(ids(&detected), ["acme/b"]);
    }

    #[test]
    fn a_buildpack_already_in_the_group_is_not_repeated_and_runs_once() {
        let fx = Fixture::new();
        let count = |id: &str| format!("echo run >> {}/{id}.count\nexit 0", fx.out.display());
        fx.buildpack("acme/a", "0.10", "", &count("a"));
        fx.buildpack("acme/b", "0.10", "", &count("b"));
        fx.buildpack("acme/fails", "0.10", "", "exit 100");
        fx.install(
            "acme/meta",
            "0.10",
            "[[order]]\n[[order.group]]\nid = \"acme/a\"\nversion = \"1\"\n\
             [[order.group]]\nid = \"acme/b\"\nversion = \"1\"\n",
        );
        let order = Order {
            groups: vec![
                group(&["acme/a", "acme/fails"]),
                group(&["acme/a", "acme/meta"]),
            ],
            extensions: vec![],
        };
        let detected = fx.detect(&order).unwrap();
        assert_eq!(ids(&detected), ["acme/a", "acme/b"]);
        let runs = |id: &str| {
            std::fs::read_to_string(fx.out.join(format!("{id}.count")))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(runs("a"), 1, "detected once per run, reused across groups");
        assert_eq!(runs("b"), 1);
    }

    #[test]
    fn a_groups_buildpacks_detect_in_parallel() {
        let fx = Fixture::new();
        // Each waits (up to 10 s) for the other's marker: only concurrent runs both pass.
        let meet = |me: &str, other: &str| {
            let out = fx.out.display();
            format!(
                "touch {out}/{me}\nfor i in $(seq 100); do [ -e {out}/{other} ] && exit 0; \
                 sleep 0.1; done\nexit 1"
            )
        };
        fx.buildpack("acme/a", "0.10", "", &meet("a", "b"));
        fx.buildpack("acme/b", "0.10", "", &meet("b", "a"));
        let detected = fx.detect(&one_group(&["acme/a", "acme/b"])).unwrap();
        assert_eq!(ids(&detected), ["acme/a", "acme/b"]);
    }

    #[test]
    fn every_group_failing_is_exit_20_with_each_buildpacks_output() {
        let fx = Fixture::new();
        fx.buildpack(
            "acme/a",
            "0.10",
            "",
            "echo 'no package.json'\necho to-stderr >&2\nexit 100",
        );
        fx.buildpack("acme/b", "0.10", "", "exit 100");
        let order = Order {
            groups: vec![group(&["acme/a"]), group(&["acme/b?", "acme/a"])],
            extensions: vec![],
        };
        let err = fx.detect(&order).unwrap_err();
        assert!(matches!(
            err,
            LifecycleError::NoGroupPassed { errored: false, .. }
        ));
        let (code, report) = report_of(err);
        assert_eq!(code, 20);
        assert_eq!(
            report,
            "group 1: acme/a@1\n\
             \x20 fail   acme/a@1\n\
             \x20     no package.json\n\
             \x20     to-stderr\n\
             \x20 => required buildpacks did not pass: acme/a@1\n\
             group 2: acme/b@1, acme/a@1\n\
             \x20 fail   acme/b@1 (optional)\n\
             \x20 fail   acme/a@1\n\
             \x20     no package.json\n\
             \x20     to-stderr\n\
             \x20 => required buildpacks did not pass: acme/a@1\n"
        );
    }

    #[test]
    fn stdout_and_stderr_keep_their_interleaving() {
        let fx = Fixture::new();
        fx.buildpack(
            "acme/a",
            "0.10",
            "",
            "echo one\necho two >&2\necho three\necho four >&2\nexit 100",
        );
        let (_, report) = report_of(fx.detect(&one_group(&["acme/a"])).unwrap_err());
        assert!(
            report.contains("      one\n      two\n      three\n      four\n"),
            "{report}"
        );
    }

    #[test]
    fn an_error_exit_is_exit_21() {
        let fx = Fixture::new();
        fx.buildpack("acme/a", "0.10", "", "echo broken\nexit 3");
        let err = fx.detect(&one_group(&["acme/a"])).unwrap_err();
        assert!(matches!(
            err,
            LifecycleError::NoGroupPassed { errored: true, .. }
        ));
        let (code, report) = report_of(err);
        assert_eq!(code, 21);
        assert!(
            report.contains("  error  acme/a@1: bin/detect exited with status 3\n      broken\n"),
            "{report}"
        );
    }

    #[test]
    fn a_missing_buildpack_is_exit_22() {
        let fx = Fixture::new();
        let err = fx.detect(&one_group(&["acme/absent"])).unwrap_err();
        assert_eq!(err.exit_code(), 22);
        assert!(err.to_string().contains("acme/absent@1"), "{err}");
    }

    #[test]
    fn an_unsupported_buildpack_api_is_exit_12() {
        let fx = Fixture::new();
        fx.buildpack("acme/old", "0.6", "", "exit 0");
        let err = fx.detect(&one_group(&["acme/old"])).unwrap_err();
        assert_eq!(err.exit_code(), 12);
        assert!(err.to_string().contains("acme/old@1"), "{err}");
    }

    #[test]
    fn image_extensions_are_refused_by_name() {
        let fx = Fixture::new();
        fx.planning("acme/a", "");
        let order = Order {
            groups: vec![group(&["acme/a"])],
            extensions: vec![group(&["acme/curl"])],
        };
        let err = fx.detect(&order).unwrap_err();
        assert_eq!(err.exit_code(), 22);
        assert!(err.to_string().contains("acme/curl@1"), "{err}");
        assert!(err.to_string().contains("extension"), "{err}");

        std::fs::create_dir_all(fx.paths.extensions.join("acme_curl/1")).unwrap();
        let err = fx.detect(&one_group(&["acme/curl"])).unwrap_err();
        assert_eq!(err.exit_code(), 22);
        assert!(
            err.to_string().contains("image extensions (acme/curl@1)"),
            "{err}"
        );
    }

    #[test]
    fn a_required_buildpack_for_another_target_errors_without_running() {
        let fx = Fixture::new();
        let ran = fx.out.join("ran");
        let targets = "[[targets]]\nos = \"linux\"\narch = \"arm64\"\n";
        fx.buildpack(
            "acme/arm",
            "0.10",
            targets,
            &format!("touch {}\nexit 0", ran.display()),
        );
        let (code, report) = report_of(fx.detect(&one_group(&["acme/arm"])).unwrap_err());
        assert_eq!(code, 21);
        assert!(
            report.contains(
                "error  acme/arm@1: unable to satisfy target os/arch constraints; run image: \
                 linux/amd64 (testos 1.0), buildpack: linux/arm64"
            ),
            "{report}"
        );
        assert!(!ran.exists());

        // As LC does, an optional one is not checked and runs.
        fx.planning("acme/app", "");
        let detected = fx.detect(&one_group(&["acme/arm?", "acme/app"])).unwrap();
        assert_eq!(ids(&detected), ["acme/arm", "acme/app"]);
        assert!(ran.exists());
    }

    #[test]
    fn a_distro_constraint_is_checked_against_os_release() {
        let fx = Fixture::new();
        let targets = "[[targets]]\nos = \"linux\"\n[[targets.distros]]\nname = \"testos\"\n";
        fx.buildpack("acme/a", "0.10", targets, "exit 0");
        assert!(fx.detect(&one_group(&["acme/a"])).is_ok());
        std::fs::write(&fx.os_release, "ID=other\n").unwrap();
        assert_eq!(
            fx.detect(&one_group(&["acme/a"])).unwrap_err().exit_code(),
            21
        );
    }

    #[test]
    fn buildpacks_outside_the_exec_env_are_skipped() {
        let fx = Fixture::new();
        let ran = fx.out.join("ran");
        fx.buildpack(
            "acme/testing",
            "0.12",
            "exec-env = [\"test\"]\n",
            &format!("touch {}\nexit 0", ran.display()),
        );
        fx.planning("acme/app", "");
        let detected = fx
            .detect(&one_group(&["acme/testing", "acme/app"]))
            .unwrap();
        assert_eq!(ids(&detected), ["acme/app"]);
        assert!(!ran.exists());

        let order = one_group(&["acme/testing"]);
        let detected = detect(&DetectRequest {
            exec_env: "test",
            ..fx.request(&order)
        })
        .unwrap();
        assert_eq!(ids(&detected), ["acme/testing"]);

        let (_, report) = report_of(fx.detect(&order).unwrap_err());
        assert!(
            report.contains("skip   acme/testing@1: runs only in exec-env test, not production"),
            "{report}"
        );
    }

    #[test]
    fn a_top_level_version_in_requires_is_an_error() {
        let fx = Fixture::new();
        fx.planning("acme/a", "[[requires]]\nname = \"x\"\nversion = \"1\"");
        let (code, report) = report_of(fx.detect(&one_group(&["acme/a"])).unwrap_err());
        assert_eq!(code, 21);
        assert!(
            report.contains("has a \"version\" key which is not supported"),
            "{report}"
        );

        fx.planning(
            "acme/a",
            "[[or]]\n[[or.requires]]\nname = \"x\"\nversion = \"1\"\n\
             [or.requires.metadata]\nversion = \"1\"",
        );
        let (code, report) = report_of(fx.detect(&one_group(&["acme/a"])).unwrap_err());
        assert_eq!(code, 21);
        assert!(report.contains("cannot be specified together"), "{report}");
    }

    #[test]
    fn an_invalid_plan_is_an_error() {
        let fx = Fixture::new();
        fx.planning("acme/a", "[[provides]\nname = ");
        let (code, report) = report_of(fx.detect(&one_group(&["acme/a"])).unwrap_err());
        assert_eq!(code, 21);
        assert!(report.contains("is not valid"), "{report}");
    }

    #[test]
    fn a_missing_or_non_executable_bin_detect_is_an_error_result() {
        let fx = Fixture::new();
        fx.install("acme/nobin", "0.10", "");
        let dir = fx.buildpack("acme/noexec", "0.10", "", "exit 0");
        std::fs::set_permissions(
            dir.join("bin/detect"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        for id in ["acme/nobin", "acme/noexec"] {
            let (code, report) = report_of(fx.detect(&one_group(&[id])).unwrap_err());
            assert_eq!(code, 21, "{report}");
            assert!(report.contains("cannot run"), "{report}");
        }
    }

    /// Whether `pid` is still running (a zombie is not).
    fn running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap().trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            }
            Err(_) => false,
        }
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_detect_that_outlives_the_timeout_is_killed_with_its_children() {
        let fx = Fixture::new();
        let pid_file = fx.out.join("child.pid");
        fx.buildpack(
            "acme/slow",
            "0.10",
            "",
            &format!(
                "sleep 60 &\necho $! > {}\necho started\nwait\nexit 0",
                pid_file.display()
            ),
        );
        let order = one_group(&["acme/slow"]);
        let started = Instant::now();
        let err = detect(&DetectRequest {
            timeout: Some(Duration::from_millis(500)),
            ..fx.request(&order)
        })
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let (code, report) = report_of(err);
        assert_eq!(code, 21);
        assert!(
            report.contains("acme/slow@1: bin/detect did not finish within 500ms and was killed"),
            "{report}"
        );
        assert!(
            report.contains("      started"),
            "output before the kill is kept: {report}"
        );
        assert!(!running(read_pid(&pid_file)));
    }

    #[test]
    fn a_daemon_left_behind_is_killed_and_does_not_hold_the_output() {
        let fx = Fixture::new();
        let pid_file = fx.out.join("daemon.pid");
        fx.buildpack(
            "acme/forks",
            "0.10",
            "",
            &format!(
                "(sleep 60; echo late) &\necho $! > {}\necho passing\nexit 0",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        let detected = fx.detect(&one_group(&["acme/forks"])).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(ids(&detected), ["acme/forks"]);
        assert!(!running(read_pid(&pid_file)));
    }

    #[test]
    fn a_process_that_escapes_the_group_cannot_hold_detection_forever() {
        let fx = Fixture::new();
        let pid_file = fx.out.join("escaped.pid");
        fx.buildpack(
            "acme/escapes",
            "0.10",
            "",
            &format!(
                "setsid bash -c 'echo $$ > {pid}; exec sleep 30' &\n\
                 while [ ! -s {pid} ]; do sleep 0.01; done\necho partial\nexit 100",
                pid = pid_file.display()
            ),
        );
        let started = Instant::now();
        let (code, report) = report_of(fx.detect(&one_group(&["acme/escapes"])).unwrap_err());
        let elapsed = started.elapsed();
        let pid = read_pid(&pid_file);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(code, 20);
        assert!(report.contains("      partial"), "{report}");
        assert!(report.contains("stopped reading"), "{report}");
    }

    #[test]
    fn results_are_written_as_group_and_plan_toml() {
        let fx = Fixture::new();
        fx.planning("acme/jdk", "[[provides]]\nname = \"jdk\"");
        fx.planning(
            "acme/app",
            "[[requires]]\nname = \"jdk\"\n[requires.metadata]\nversion = \"21\"\nlaunch = true",
        );
        let detected = fx.detect(&one_group(&["acme/jdk", "acme/app"])).unwrap();
        write_results(&fx.paths.layers, &detected).unwrap();

        let group: toml::Table = std::fs::read_to_string(fx.paths.layers.join("group.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let expected_group: toml::Table = r#"
[[group]]
id = "acme/jdk"
version = "1"
api = "0.10"
homepage = "https://acme/jdk.example"

[[group]]
id = "acme/app"
version = "1"
api = "0.10"
homepage = "https://acme/app.example"
"#
        .parse()
        .unwrap();
        assert_eq!(group, expected_group);

        let plan: toml::Table = std::fs::read_to_string(fx.paths.layers.join("plan.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let expected_plan: toml::Table = r#"
[[entries]]
[[entries.providers]]
id = "acme/jdk"
version = "1"
[[entries.requires]]
name = "jdk"
[entries.requires.metadata]
version = "21"
launch = true
"#
        .parse()
        .unwrap();
        assert_eq!(plan, expected_plan);

        let mut leftovers: Vec<String> = std::fs::read_dir(&fx.paths.layers)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        leftovers.sort();
        assert_eq!(leftovers, ["group.toml", "plan.toml"]);

        std::fs::create_dir_all(fx.paths.buildpacks.join("acme_nohome/1")).unwrap();
        std::fs::write(
            fx.paths.buildpacks.join("acme_nohome/1/buildpack.toml"),
            "api = \"0.10\"\n[buildpack]\nid = \"acme/nohome\"\nversion = \"1\"\n",
        )
        .unwrap();
        let without_homepage = Detected {
            group: vec![descriptor::find(&fx.paths.buildpacks, "acme/nohome", "1").unwrap()],
            plan: PlanFile::default(),
        };
        write_results(&fx.paths.layers, &without_homepage).unwrap();
        let group: toml::Table = std::fs::read_to_string(fx.paths.layers.join("group.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let member = group["group"].as_array().unwrap()[0].as_table().unwrap();
        let keys: Vec<&String> = member.keys().collect();
        assert_eq!(keys, ["api", "id", "version"]);
    }

    #[test]
    fn an_empty_order_fails_detection() {
        let fx = Fixture::new();
        let (code, report) = report_of(fx.detect(&Order::default()).unwrap_err());
        assert_eq!(code, 20);
        assert!(report.contains("no group"), "{report}");
    }
}
