//! One lifecycle run in the build container, as the reference `creator` runs detect and build
//! (analyze, restore and export are the host's, which holds the images and the registry
//! credentials that buildpacks must never see). The request is all a run needs, so the same
//! call serves the sandbox's payload and `--sandbox none`.

use std::path::PathBuf;
use std::time::Duration;

use super::build::{self, BuildRequest};
use super::cache;
use super::detect::{self, DetectRequest};
use super::env::Env;
use super::order;
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
    /// The cache directory: its layers are restored before the build (unless
    /// `clear_cache`) and the build's cache layers saved to it after.
    pub cache: Option<PathBuf>,
    pub clear_cache: bool,
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
    if let Some(cache_dir) = &request.cache
        && !request.clear_cache
    {
        eprintln!("===> RESTORING");
        for layer in cache::restore(cache_dir, &detected.group, &paths.layers)? {
            eprintln!("Restored {layer} from the cache");
        }
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
    if let Some(cache_dir) = &request.cache {
        eprintln!("===> CACHING");
        for layer in cache::save(cache_dir, &detected.group, &paths.layers)? {
            eprintln!("Cached {layer}");
        }
    }
    Ok(())
}
