//! lathe's CNB launcher (`launcher/`): the launch contract case by case, run through the
//! committed launcher binaries inside lathe's sandbox on the fixture build image (which has
//! bash at /bin/bash and busybox), natively for linux/amd64 and emulated for linux/arm64,
//! with the same expected output on both; the binaries are static, small and for their
//! machine; and `launcher/build.sh` rebuilds exactly the committed bytes.
//!
//! Each case binds the launcher at /cnb/lifecycle/launcher, a directory of
//! `/cnb/process/<type>` symlinks to it, a fixture's layers at /layers and its app at
//! /workspace (all read-only), from `testdata/launcher/` (see testdata/README.md).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use lathe::launcher::{
    self, EM_AARCH64, EM_X86_64, LATHE_LAUNCHER_AMD64, LATHE_LAUNCHER_ARM64, PT_DYNAMIC, PT_INTERP,
};
use lathe::platform::Platform;

/// The process types of testdata/launcher/main, plus one the metadata does not have.
const LINKS: [&str; 12] = [
    "env",
    "execd-fails",
    "execd-garbage",
    "exit",
    "multi",
    "one-new",
    "one-old",
    "shell",
    "shell-args",
    "workdir",
    "workdir-shell",
    "nope",
];

/// The image's Env as the exporter sets it (PATH with the launcher's directories first, which
/// the launcher removes), plus two variables the layers' env files act on.
const BASE_ENV: [(&str, &str); 5] = [
    ("CNB_PLATFORM_API", "0.13"),
    ("CNB_DEPRECATION_MODE", "quiet"),
    (
        "PATH",
        "/cnb/process:/cnb/lifecycle:/usr/local/bin:/usr/bin:/bin",
    ),
    ("CONTAINER_VAR", "container"),
    ("CONTAINER_PREPEND", "container"),
];

const LAUNCHER: &str = "/cnb/lifecycle/launcher";

struct Case {
    name: &'static str,
    argv: &'static [&'static str],
    /// Added to (or, with an empty value, removing from) [`BASE_ENV`].
    env: &'static [(&'static str, &'static str)],
    /// The fixture whose layers are bound at /layers: `main/layers`, `bad-api`, `malformed`.
    layers: &'static str,
    code: i32,
    stdout: &'static str,
    stderr: &'static [&'static str],
}

const fn case(name: &'static str, argv: &'static [&'static str], stdout: &'static str) -> Case {
    Case {
        name,
        argv,
        env: &[],
        layers: "main/layers",
        code: 0,
        stdout,
        stderr: &[],
    }
}

const ENV_OUTPUT: &str = "ORDER=[first-a,first-b,second-c]
OVERRIDE=[second-c]
EXPLICIT=[first]
DEFAULT=[first-a]
PREPENDED=[second-c:first-a]
NO_DELIM=[first-asecond-c]
CONTAINER_VAR=[container]
CONTAINER_PREPEND=[layer:container]
WEIRD unset
VERBATIM=[two
lines
]
LAUNCH_ONLY=[launch only]
BUILD_ONLY unset
PER_PROCESS=[for the env process]
PATH=[/layers/test_second/c/bin:/layers/test_first/b/bin:/layers/test_first/a/bin:/usr/local/bin:/usr/bin:/bin:/appended]
LD_LIBRARY_PATH=[/layers/test_second/c/lib:/layers/test_first/a/lib]
CNB_PLATFORM_API unset
CNB_DEPRECATION_MODE unset
NO_USER_ARGS unset
";

/// The contract, one case per rule.
fn cases() -> Vec<Case> {
    vec![
        // Process selection.
        case(
            "the process named by the link",
            &["/cnb/process/one-new"],
            "process-arg\n",
        ),
        case(
            "an unknown link name runs the user's command (through the shell)",
            &["/cnb/process/nope", "echo $OVERRIDE"],
            "second-c\n",
        ),
        Case {
            env: &[("CNB_PROCESS_TYPE", "multi")],
            stderr: &["Warning: CNB_PROCESS_TYPE is deprecated"],
            ..case(
                "CNB_PROCESS_TYPE, deprecated, picks the process for a bare launcher",
                &[LAUNCHER],
                "always overridable\n",
            )
        },
        Case {
            env: &[("CNB_PROCESS_TYPE", "nope")],
            code: 82,
            stderr: &[
                "ERROR: failed to launch: determine start command: process type nope was not found",
            ],
            ..case("CNB_PROCESS_TYPE naming no process", &[LAUNCHER], "")
        },
        Case {
            code: 82,
            stderr: &[
                "ERROR: failed to launch: determine start command: when there is no default process a command is required",
            ],
            ..case("no default process and no command", &[LAUNCHER], "")
        },
        // User arguments.
        case(
            "one-element command, Buildpack API >= 0.9: user args replace the process's",
            &["/cnb/process/one-new", "u1", "u2"],
            "u1 u2\n",
        ),
        case(
            "one-element command, Buildpack API < 0.9: user args are appended",
            &["/cnb/process/one-old", "u1"],
            "process-arg u1\n",
        ),
        case(
            "multi-element command without user args: always-args then the process's",
            &["/cnb/process/multi"],
            "always overridable\n",
        ),
        case(
            "multi-element command with user args: always-args then the user's",
            &["/cnb/process/multi", "u1"],
            "always u1\n",
        ),
        Case {
            env: &[("CNB_PLATFORM_API", "0.9")],
            ..case(
                "Platform API < 0.10: user args are always appended",
                &["/cnb/process/one-new", "u1"],
                "process-arg u1\n",
            )
        },
        // Shell and direct.
        case(
            "a shell process sources profile.d, profile.d/<type> and the app's .profile",
            &["/cnb/process/shell"],
            "a,a-shell,b,app|shell only|from .profile|second-c|/workspace\n",
        ),
        case(
            "a shell process with args evaluates each token (eval echo)",
            &["/cnb/process/shell-args", "$OVERRIDE"],
            "a,b,app two words second-c\n",
        ),
        case(
            "a user shell command is a bash script, after the profiles",
            &[
                LAUNCHER,
                "echo \"$OVERRIDE|$PROFILE_ORDER|$APP_PROFILE|$PER_PROCESS_PROFILE\"",
            ],
            "second-c|a,b,app|from .profile|\n",
        ),
        case(
            "a user shell command with args evaluates each token",
            &[LAUNCHER, "echo", "$OVERRIDE", "$EXPLICIT"],
            "second-c first\n",
        ),
        case(
            "a user direct command (--): no shell, no profiles, no expansion",
            &[
                LAUNCHER,
                "--",
                "/workspace/show",
                "OVERRIDE",
                "PROFILE_ORDER",
                "EXECD_PROCESS",
            ],
            "OVERRIDE=[second-c]\nPROFILE_ORDER unset\nEXECD_PROCESS unset\n",
        ),
        case(
            "direct arguments are passed as they are",
            &[LAUNCHER, "--", "echo", "$OVERRIDE"],
            "$OVERRIDE\n",
        ),
        Case {
            code: 82,
            stderr: &["path lookup: exec: \"no-such-command\": executable file not found in $PATH"],
            ..case(
                "a direct command not on PATH",
                &[LAUNCHER, "--", "no-such-command"],
                "",
            )
        },
        // The environment.
        case(
            "env and env.launch files: every suffix, buildpack then layer order, bin and lib",
            &[
                "/cnb/process/env",
                "ORDER",
                "OVERRIDE",
                "EXPLICIT",
                "DEFAULT",
                "PREPENDED",
                "NO_DELIM",
                "CONTAINER_VAR",
                "CONTAINER_PREPEND",
                "WEIRD",
                "VERBATIM",
                "LAUNCH_ONLY",
                "BUILD_ONLY",
                "PER_PROCESS",
                "PATH",
                "LD_LIBRARY_PATH",
                "CNB_PLATFORM_API",
                "CNB_DEPRECATION_MODE",
                "NO_USER_ARGS",
            ],
            ENV_OUTPUT,
        ),
        case(
            "env.launch/<type> applies to that process only",
            &[
                LAUNCHER,
                "--",
                "/workspace/show",
                "PER_PROCESS",
                "LAUNCH_ONLY",
            ],
            "PER_PROCESS unset\nLAUNCH_ONLY=[launch only]\n",
        ),
        case(
            "layers' bin directories are on PATH",
            &[LAUNCHER, "first-a-tool; first-b-tool; second-c-tool"],
            "first-a-tool\nfirst-b-tool\nsecond-c-tool\n",
        ),
        // exec.d.
        case(
            "exec.d output (fd 3) overrides variables; exec.d/<type> runs for its process",
            &[
                "/cnb/process/env",
                "EXECD_VAR",
                "EXECD_SEES",
                "EXECD_PWD",
                "OVERRIDDEN_BY_EXECD",
                "EXECD_PROCESS",
            ],
            "EXECD_VAR=[from exec.d]\nEXECD_SEES=[second-c]\nEXECD_PWD=[/workspace]\n\
             OVERRIDDEN_BY_EXECD=[overridden by exec.d]\nEXECD_PROCESS=[only for env]\n",
        ),
        Case {
            code: 82,
            stderr: &[
                "exec.d failing on purpose",
                "ERROR: failed to launch: exec.d: failed to execute exec.d file at path \
                 '/layers/test_second/c/exec.d/execd-fails/30-fail': exit status: 3",
            ],
            ..case(
                "a failing exec.d program stops the launch",
                &["/cnb/process/execd-fails"],
                "",
            )
        },
        Case {
            code: 82,
            stderr: &[
                "ERROR: failed to launch: exec.d: failed to execute exec.d file at path \
                 '/layers/test_second/c/exec.d/execd-garbage/40-garbage': decoding its output: \
                 line 2: expected \"=\" after the key",
            ],
            ..case(
                "exec.d output that is not TOML stops the launch",
                &["/cnb/process/execd-garbage"],
                "",
            )
        },
        // Working directory and app directory.
        case(
            "working-dir, direct",
            &["/cnb/process/workdir"],
            "/workspace/sub\n",
        ),
        case(
            "working-dir relative to the app, shell",
            &["/cnb/process/workdir-shell"],
            "/workspace/sub\n",
        ),
        Case {
            env: &[("CNB_APP_DIR", "/workspace/sub")],
            ..case(
                "CNB_APP_DIR is where processes start",
                &[LAUNCHER, "pwd; echo \"[$APP_PROFILE]\""],
                "/workspace/sub\n[]\n",
            )
        },
        // Exit codes.
        Case {
            code: 7,
            ..case(
                "the process's exit code passes through",
                &["/cnb/process/exit"],
                "exiting\n",
            )
        },
        Case {
            code: 42,
            ..case(
                "a user command's exit code passes through",
                &[LAUNCHER, "exit 42"],
                "",
            )
        },
        Case {
            env: &[("CNB_PLATFORM_API", "")],
            code: 11,
            stderr: &["ERROR: CNB_PLATFORM_API is not set"],
            ..case("CNB_PLATFORM_API missing", &["/cnb/process/one-new"], "")
        },
        Case {
            env: &[("CNB_PLATFORM_API", "0.6")],
            code: 11,
            stderr: &["Platform API \"0.6\" (CNB_PLATFORM_API) is not supported"],
            ..case("CNB_PLATFORM_API too old", &["/cnb/process/one-new"], "")
        },
        Case {
            env: &[("CNB_PLATFORM_API", "0.14")],
            code: 11,
            stderr: &["Platform API \"0.14\" (CNB_PLATFORM_API) is not supported"],
            ..case("CNB_PLATFORM_API too new", &["/cnb/process/one-new"], "")
        },
        Case {
            layers: "bad-api",
            code: 12,
            stderr: &[
                "buildpack test/future has Buildpack API \"0.99\": the launcher supports 0.7 to 0.12",
            ],
            ..case(
                "an unsupported Buildpack API",
                &["/cnb/process/one-new"],
                "",
            )
        },
        Case {
            layers: "malformed",
            code: 82,
            stderr: &[
                "ERROR: failed to launch: read metadata /layers/config/metadata.toml: line 8: unterminated string",
            ],
            ..case(
                "a malformed metadata.toml, named",
                &["/cnb/process/one-new"],
                "",
            )
        },
    ]
}

/// A world-readable copy of the fixtures, the launcher for `arch` and the process links.
struct Stage {
    dir: tempfile::TempDir,
}

impl Stage {
    fn new(arch: &str) -> Stage {
        let dir = scratch();
        let root = repo_root();
        tool(
            "cp",
            &[
                "-a",
                root.join("testdata/launcher").to_str().unwrap(),
                dir.path().join("fixture").to_str().unwrap(),
            ],
        );
        std::fs::copy(
            root.join(format!("launcher/bin/launcher-{arch}")),
            dir.path().join("launcher"),
        )
        .unwrap();
        let links = dir.path().join("process");
        std::fs::create_dir(&links).unwrap();
        for link in LINKS {
            std::os::unix::fs::symlink(LAUNCHER, links.join(link)).unwrap();
        }
        std::fs::create_dir(dir.path().join("store")).unwrap();
        tool("chmod", &["-R", "a+rX", dir.path().to_str().unwrap()]);
        Stage { dir }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// `lathe run` of the fixture build image for `platform` with the launcher bound in.
    fn run(&self, platform: &str, layers: &str, env: &[(&str, &str)], argv: &[&str]) -> Output {
        let mut vars: Vec<(&str, &str)> = BASE_ENV.to_vec();
        for (k, v) in env {
            vars.retain(|(name, _)| name != k);
            if !v.is_empty() {
                vars.push((k, v));
            }
        }
        let bind = |host: PathBuf, inside: &str| format!("--volume={}:{inside}:ro", host.display());
        Command::new(lathe_bin())
            .args(["run", "--platform", platform])
            .arg(format!("--store={}", self.path("store").display()))
            .arg(bind(self.path("launcher"), LAUNCHER))
            .arg(bind(self.path("process"), "/cnb/process"))
            .arg(bind(self.path(&format!("fixture/{layers}")), "/layers"))
            .arg(bind(self.path("fixture/main/app"), "/workspace"))
            .args(vars.iter().map(|(k, v)| format!("--env={k}={v}")))
            .arg(format!("oci:{}:build", fixtures().display()))
            .arg("--")
            .args(argv)
            .output()
            .expect("run lathe")
    }
}

/// Runs every case for `platform`; returns the failures, each with its name and output.
fn run_contract(platform: &str, arch: &str) -> Vec<String> {
    let stage = Stage::new(arch);
    let mut failures = Vec::new();
    for case in cases() {
        let out = stage.run(platform, case.layers, case.env, case.argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ok = out.status.code() == Some(case.code)
            && out.stdout == case.stdout.as_bytes()
            && case.stderr.iter().all(|needle| stderr.contains(needle));
        if !ok {
            failures.push(format!(
                "{platform}: {}: {:?}\nwanted exit {} and stdout {:?}, stderr with {:?}\n{}",
                case.name,
                case.argv,
                case.code,
                case.stdout,
                case.stderr,
                report(&out)
            ));
        }
    }
    failures
}

#[test]
fn the_launch_contract_on_amd64() {
    let failures = run_contract("linux/amd64", "amd64");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The same cases under emulation: lathe's sandbox registers qemu in its own binfmt_misc,
/// which needs a kernel that allows binfmt_misc in a user namespace (6.7 and later); where it
/// does not, the test says so and passes.
#[test]
fn the_launch_contract_on_arm64_under_emulation() {
    let stage = Stage::new("arm64");
    let probe = stage.run(
        "linux/arm64",
        "main/layers",
        &[],
        &["/bin/busybox", "uname", "-m"],
    );
    if !probe.status.success() {
        let err = String::from_utf8_lossy(&probe.stderr);
        if err.contains("binfmt_misc") {
            println!("SKIPPED: this kernel cannot emulate linux/arm64 in the sandbox: {err}");
            return;
        }
        panic!("running the arm64 build image failed: {}", report(&probe));
    }
    assert_eq!(probe.stdout, b"aarch64\n", "{}", report(&probe));
    drop(stage);
    let failures = run_contract("linux/arm64", "arm64");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_launchers_are_static_small_and_for_their_machine() {
    for (arch, machine, embedded) in [
        ("amd64", EM_X86_64, LATHE_LAUNCHER_AMD64),
        ("arm64", EM_AARCH64, LATHE_LAUNCHER_ARM64),
    ] {
        let path = repo_root().join(format!("launcher/bin/launcher-{arch}"));
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes == embedded,
            "{arch}: lathe embeds launcher/bin's file"
        );
        let elf = launcher::read_elf(&bytes).unwrap();
        assert_eq!((elf.machine, elf.class), (machine, 64), "{arch}");
        assert!(!elf.segments.contains(&PT_INTERP), "{arch}: PT_INTERP");
        assert!(
            !elf.segments.contains(&PT_DYNAMIC),
            "{arch}: PT_DYNAMIC (shared libraries, DT_NEEDED)"
        );
        assert!(
            bytes.len() < 2 * 1024 * 1024,
            "{arch}: {} bytes",
            bytes.len()
        );
        let platform: Platform = format!("linux/{arch}").parse().unwrap();
        launcher::check_launcher(&platform, &path, &bytes).unwrap();
        // Given for the other platform, it is refused by name.
        let other: Platform = if arch == "amd64" {
            "linux/arm64"
        } else {
            "linux/amd64"
        }
        .parse()
        .unwrap();
        let err = launcher::choose_launcher(&other, Some(&path), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{} is a launcher for linux/{arch}",
                path.display()
            )),
            "{err}"
        );
    }
}

/// The committed binaries are the source's: launcher/build.sh (Debian's rustc 1.63, which CI
/// installs) rebuilds them byte for byte, here from wherever this clone is.
#[test]
fn build_sh_rebuilds_the_committed_launchers_byte_for_byte() {
    assert!(
        Path::new("/usr/bin/rustc").exists(),
        "/usr/bin/rustc (Debian's rustc 1.63) is missing: run .ci/install, which installs \
         it with the arm64 cross toolchain"
    );
    let out_dir = scratch();
    let out = Command::new("bash")
        .arg(repo_root().join("launcher/build.sh"))
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "launcher/build.sh failed: {}",
        report(&out)
    );
    for arch in ["amd64", "arm64"] {
        let name = format!("launcher-{arch}");
        let rebuilt = std::fs::read(out_dir.path().join(&name)).unwrap();
        let committed = std::fs::read(repo_root().join("launcher/bin").join(&name)).unwrap();
        assert!(
            rebuilt == committed,
            "{name}: launcher/build.sh gives sha256 {} but launcher/bin/{name} is {}: run \
             launcher/build.sh and commit launcher/bin (a Debian update of the toolchain or of \
             libc6-dev changes the bytes too: see the versions in launcher/build.sh)",
            sha256_hex(&rebuilt),
            sha256_hex(&committed)
        );
    }
}
