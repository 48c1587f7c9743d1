//! lathe's Cloud Native Buildpacks launcher: the program every app image starts through, at
//! `/cnb/lifecycle/launcher` and behind each `/cnb/process/<type>` symlink. It owns the
//! launch contract (cnb-spec-digest §3, following the reference lifecycle where the spec
//! and it differ): picking the process (the symlink's name, the deprecated
//! CNB_PROCESS_TYPE, or a command given on the command line, direct after `--`, else through
//! bash), combining user and buildpack arguments per Platform and Buildpack API, the launch
//! environment (layer `bin`/`lib`, `env/` and `env.launch/` files with every suffix rule,
//! per-process directories, buildpack then layer order), exec.d programs over fd 3,
//! profile.d scripts and the app's `.profile` for shell processes, the working directory,
//! the Platform API check, and the exit codes: 11 and 12 for unsupported Platform and
//! Buildpack APIs, 82 for its own failures, otherwise the process's own (it replaces itself
//! with the process).
//!
//! It is hand-written and depends on nothing but std, because it ships as a static binary
//! for every platform lathe builds for: `launcher/build.sh` cross-compiles it with Debian's
//! rustc 1.63, the one toolchain here with an aarch64 std, so the code keeps to Rust 1.63.
//! That is also why it carries its own small TOML reader (`toml.rs`) for metadata.toml and
//! exec.d output, and its own copy of the env-file rules lathe's build phase applies
//! (`src/lifecycle/env.rs` in lathe).

mod env;
mod launch;
mod metadata;
mod toml;

use std::ffi::OsString;
use std::io::Write;

fn main() {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let environ: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let failure = launch::launch(&argv, environ);
    let _ = writeln!(std::io::stderr(), "ERROR: {}", failure.message);
    std::process::exit(failure.code);
}

#[cfg(test)]
pub mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory removed on drop (the crate has no dependencies, so no tempfile).
    pub struct TempDir(PathBuf);

    impl TempDir {
        #[allow(clippy::new_without_default)]
        pub fn new() -> TempDir {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let n = COUNT.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir()
                .join(format!("lathe-launcher-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        pub fn write(&self, name: &str, content: &str) {
            std::fs::write(self.0.join(name), content).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
