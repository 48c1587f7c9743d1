//! One lifecycle run in the build container, as the reference `creator` runs detect, restore
//! and build (analyze, export and the cache save are the host's, which holds the images and
//! the registry credentials that buildpacks must never see). The request is all a run needs, so the same
//! call serves the sandbox's payload and `--sandbox none`.

use std::path::PathBuf;
use std::time::Duration;

use super::build::{self, BuildRequest};
use super::detect::{self, DetectRequest};
use super::env::Env;
use super::order;
use super::restore::{self, RestoreInput};
use super::{LifecycleError, PLATFORM_API, Paths, TargetData};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhaseRequest {
    pub paths: Paths,
    /// The run image's target.
    pub target: TargetData,
    /// `CNB_EXEC_ENV` (`production` unless asked otherwise).
    pub exec_env: String,
    /// The lifecycle's own environment (the build image's `Env`), which buildpacks see
    /// filtered.
    pub lifecycle_env: Vec<(String, String)>,
    /// The limit on each `bin/detect`.
    pub detect_timeout: Option<Duration>,
    /// The build container's /etc/os-release (distro for targets that name none).
    pub os_release: PathBuf,
    /// What the previous image and the cache give back to the group before the build.
    pub restore: RestoreInput,
}

/// Detects a group, writes group.toml and plan.toml, builds, writes config/metadata.toml.
pub fn run(request: &PhaseRequest) -> Result<(), LifecycleError> {
    let paths = &request.paths;
    let order = order::read_order(&paths.order)?;
    let env = Env::filtered(&request.lifecycle_env);
    eprintln!("===> DETECTING");
    let detected = detect::detect(&DetectRequest {
        paths,
        order: &order,
        target: &request.target,
        env: &env,
        exec_env: &request.exec_env,
        timeout: request.detect_timeout,
        os_release: &request.os_release,
    })?;
    detect::write_results(&paths.layers, &detected)?;
    for buildpack in &detected.group {
        eprintln!("{} {}", buildpack.id, buildpack.version);
    }
    eprintln!("===> RESTORING");
    for line in restore::restore(&paths.layers, &detected.group, &request.restore)? {
        eprintln!("{line}");
    }
    eprintln!("===> BUILDING");
    build::build(&BuildRequest {
        paths,
        group: &detected.group,
        plan: &detected.plan,
        target: &request.target,
        os_release: &request.os_release,
        env: &env,
        exec_env: &request.exec_env,
        platform_api: PLATFORM_API,
    })?;
    Ok(())
}
