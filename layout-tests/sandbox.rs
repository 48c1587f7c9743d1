//! `lathe run` end to end through the CLI: both platforms (arm64 through the sandbox's own
//! binfmt_misc + qemu) as the test user, as an unprivileged user with no capabilities, nested
//! in an unprivileged user namespace and with a subordinate id range (where images keep their
//! owners, also as root of a rootless container with a range, and builds still work); the
//! store's root filesystems never change and are reused; registry images are pulled once (a
//! second run or build asks for manifests only); `store ls`/`prune` of a missing store create
//! nothing; nothing (mounts, processes, scratch dirs) is left behind, also after timeouts and
//! signals; network, /dev, /proc, /tmp, hostname and volumes inside; a seccomp filter refusing
//! user namespaces, and the `auto` probe running no program; bad input.
//!
//! Every run carries a unique marker (an environment variable of the payload) and a unique
//! store path (in the sandbox init's environment), and after every run no process mentioning
//! either may be left, and no mount under the test's directory.

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use registry_support::{FaultProxy, RegistryConfig, TestRegistry};

const NOBODY: u32 = 65534;

fn world() -> &'static Path {
    world_readable_lathe_and_fixtures()
}

fn world_lathe() -> PathBuf {
    world().join("lathe")
}

/// The fixture image `name` (`run` or `build`), readable by every user.
fn fixture(name: &str) -> String {
    format!("oci:{}:{name}", world().join("images").display())
}

/// A command that runs lathe as `who`.
fn lathe_as(who: Who) -> Command {
    command_as(who, &world_lathe())
}

/// The host uid of files the image user (1001) writes through a read-write volume.
fn host_uid_of_image_user(who: Who) -> u32 {
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    match who {
        Who::TestUser if me == 0 => 1001,
        Who::TestUser => me,
        Who::Unprivileged | Who::Nested if me == 0 => NOBODY,
        Who::Unprivileged | Who::Nested => me,
        Who::SubordinateIds => subid_test_user().subuid_start + 1000,
    }
}

/// What a finished lathe process gave.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A lathe process still running; its output goes to files (a leaked process holding a
/// pipe open can't hang the test).
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl Running {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits up to `limit` for lathe to exit (killing it and failing the test otherwise).
    fn wait(mut self, limit: Duration) -> Ran {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return Ran {
                    code: status.code().or(status.signal().map(|s| 128 + s)),
                    stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
                    stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
                };
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lathe ran longer than {limit:?}: stdout {:?}, stderr {:?}",
                    fs::read_to_string(&self.stdout).unwrap_or_default(),
                    fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `command` with its output in files under `logs`.
fn start(mut command: Command, logs: &Path) -> Running {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let stdout = logs.join(format!("{n}.out"));
    let stderr = logs.join(format!("{n}.err"));
    let child = command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start lathe");
    Running {
        child,
        stdout,
        stderr,
        started: Instant::now(),
    }
}

const LIMIT: Duration = Duration::from_secs(240);

/// One test's world-writable directory (stores, volumes) and its unique marker.
struct Work {
    dir: tempfile::TempDir,
    logs: tempfile::TempDir,
    marker: String,
}

impl Work {
    fn new() -> Work {
        let dir = scratch();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let marker = format!(
            "lathe-marker-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        Work {
            dir,
            logs: scratch(),
            marker,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    fn store_arg(&self) -> String {
        self.store().display().to_string()
    }

    /// `lathe ARGS` as `who`, run from this directory.
    fn command(&self, who: Who, args: &[&str]) -> Command {
        let mut c = lathe_as(who);
        c.args(args).current_dir(self.path());
        c
    }

    /// `lathe run --store STORE --env MARKER OPTS` as `who`.
    fn run_command(&self, who: Who, opts: &[&str]) -> Command {
        let marker = format!("LATHE_TEST_MARKER={}", self.marker);
        let store = self.store_arg();
        let mut args = vec!["run", "--store", &store, "--env", &marker];
        args.extend_from_slice(opts);
        self.command(who, &args)
    }

    /// `lathe run --store STORE --env MARKER OPTS` as `who`, started.
    fn spawn_run(&self, who: Who, opts: &[&str]) -> Running {
        start(self.run_command(who, opts), self.logs.path())
    }

    /// Runs lathe to completion, then checks that nothing was left behind (no process, no
    /// mount, no scratch directory).
    fn run(&self, who: Who, opts: &[&str]) -> Ran {
        let ran = self.spawn_run(who, opts).wait(LIMIT);
        self.assert_nothing_left(&format!("after `lathe run {}` as {who:?}", opts.join(" ")));
        ran
    }

    /// `lathe ARGS` (not `run`) as `who`.
    fn lathe(&self, who: Who, args: &[&str]) -> Ran {
        start(self.command(who, args), self.logs.path()).wait(LIMIT)
    }

    /// No process mentions this test's marker or directory, no mount is under it, and the
    /// store's scratch area is empty.
    fn assert_nothing_left(&self, when: &str) {
        self.assert_no_leaks(when);
        let tmp = self.store().join("tmp");
        let left: Vec<_> = fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{when}: {} holds {left:?}", tmp.display());
    }

    /// No process mentions this test's marker or directory, and no mount is under it.
    fn assert_no_leaks(&self, when: &str) {
        let path = self.path().display().to_string();
        let needles = [self.marker.as_str(), path.as_str()];
        // A sandbox whose lathe was killed dies through its parent-death signal: give the
        // kernel a moment; a process still there after that is a leak.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let found = processes_mentioning(&needles);
            if found.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for (pid, _) in &found {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                panic!("{when}: processes left running: {found:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Read by a fresh process in the test's (the host's) mount namespace.
        let mountinfo = tool("cat", &["/proc/self/mountinfo"]);
        let mounts: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&path)).collect();
        assert!(mounts.is_empty(), "{when}: mounts left: {mounts:#?}");
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // Stores hold read-only directories; remove_tree makes them writable first.
        let _ = lathe::layout::remove_tree(self.dir.path());
    }
}

/// Processes (but this one) whose command line or environment contains one of `needles`:
/// (pid, command line).
fn processes_mentioning(needles: &[&str]) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let read = |what: &str| {
            let bytes = fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            String::from_utf8_lossy(&bytes).replace('\0', " ")
        };
        let cmdline = read("cmdline");
        let text = format!("{cmdline} {}", read("environ"));
        if needles.iter().any(|n| text.contains(n)) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits up to 60 s for a process of this test whose command line starts with `prefix`.
fn wait_for_payload(work: &Work, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if processes_mentioning(&[&work.marker])
            .iter()
            .any(|(_, cmdline)| cmdline.starts_with(prefix))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no process `{prefix}...` of this test started within 60 s");
}

/// A fork- and pipe-heavy busybox sh script (about 800 execs) and what it prints.
const PIPES: &str = r#"i=0; total=0
while [ $i -lt 200 ]; do
  n=$(echo "$i" | cat | wc -c)
  total=$((total + n))
  i=$((i + 1))
done
echo "total=$total"
echo abc | tr a-c x-z | sed 's/x/X/' | awk '{print $0 "!"}'
seq 1 50 | sort -rn | head -3 | xargs echo"#;
const PIPES_OUTPUT: &str = "total=690\nXyz!\n50 49 48\n";

const PLATFORMS: [(&str, &str); 2] = [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64")];

/// Both platforms as `who`: the machine, the image's user, a pipe-heavy script and the
/// process's exit code as lathe's.
fn runs_both_platforms(who: Who) {
    let work = Work::new();
    let image = fixture("run");
    for (platform, machine) in PLATFORMS {
        let script = format!("uname -m; id -u; id -g\n{PIPES}\nexit 7");
        let ran = work.run(
            who,
            &[
                "--platform",
                platform,
                &image,
                "--",
                "/bin/sh",
                "-c",
                &script,
            ],
        );
        assert_eq!(ran.code, Some(7), "{who:?} {platform}: {ran}");
        assert_eq!(
            ran.stdout,
            format!("{machine}\n1001\n1000\n{PIPES_OUTPUT}"),
            "{who:?} {platform}: {ran}"
        );
    }
    // Success is success too, and a payload killed by a signal gives 128 + N.
    let ran = work.run(who, &[&image, "--", "true"]);
    assert_eq!(ran.code, Some(0), "{ran}");
    let ran = work.run(who, &[&image, "--", "/bin/sh", "-c", "kill -KILL $$"]);
    assert_eq!(ran.code, Some(128 + libc::SIGKILL), "{ran}");
}

#[test]
fn runs_both_platforms_as_the_test_user() {
    runs_both_platforms(Who::TestUser);
}

#[test]
fn runs_both_platforms_as_an_unprivileged_user_without_capabilities() {
    runs_both_platforms(Who::Unprivileged);
}

#[test]
fn runs_both_platforms_nested_in_an_unprivileged_user_namespace() {
    runs_both_platforms(Who::Nested);
}

/// Whether an id map (as /proc/PID/uid_map shows it) maps ids 1–65535 to the range at `start`.
fn maps_the_subordinate_range(map: &str, start: u32) -> bool {
    let want = ["1".to_string(), start.to_string(), "65535".to_string()];
    map.lines()
        .any(|l| l.split_whitespace().eq(want.iter().map(String::as_str)))
}

#[test]
fn runs_both_platforms_with_a_subordinate_id_range() {
    let user = subid_test_user();
    runs_both_platforms(Who::SubordinateIds);
    // newuidmap/newgidmap were used: the range fills ids 1–65535, and the payload, needing no
    // nested namespace, sees that map; the user is still the image's.
    let work = Work::new();
    for (platform, _) in PLATFORMS {
        let ran = work.run(
            Who::SubordinateIds,
            &[
                "--platform",
                platform,
                &fixture("run"),
                "--",
                "/bin/sh",
                "-c",
                "echo uid; cat /proc/self/uid_map; echo gid; cat /proc/self/gid_map; id -u; id -g",
            ],
        );
        assert_eq!(ran.code, Some(0), "{ran}");
        let (uids, gids) = ran.stdout.split_once("gid\n").unwrap();
        assert!(
            maps_the_subordinate_range(uids, user.subuid_start),
            "uid_map: no `1 {} 65535` line: {ran}",
            user.subuid_start
        );
        assert!(
            maps_the_subordinate_range(gids, user.subgid_start),
            "gid_map: no `1 {} 65535` line: {ran}",
            user.subgid_start
        );
        assert!(ran.stdout.ends_with("1001\n1000\n"), "{ran}");
    }
}

/// "With newuidmap/newgidmap and a subuid range, a full 0–65535 map so that images keep their
/// real owners": the image user's home is its own, system files are root's; on disk the tree
/// belongs to the caller (the image's root) and to ids of its range, `store ls` says so, and
/// `store prune` (through lathe's helper) can remove it.
#[test]
fn a_subordinate_id_range_keeps_the_images_owners() {
    let user = subid_test_user();
    let work = Work::new();
    let ran = work.run(
        Who::SubordinateIds,
        &[
            &fixture("run"),
            "--",
            "/bin/sh",
            "-c",
            "stat -c '%u:%g %n' /home/cnb-run /etc/passwd /bin/busybox; \
             touch /home/cnb-run/mine && echo home-writable; \
             touch /etc/not-mine 2>/dev/null || echo etc-refused",
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(
        ran.stdout,
        "1001:1000 /home/cnb-run\n0:0 /etc/passwd\n0:0 /bin/busybox\nhome-writable\netc-refused\n",
        "{ran}"
    );

    let tree = the_stored_rootfs(&work.store());
    let name = tree.file_name().unwrap().to_string_lossy().into_owned();
    let tag = format!("ids-{}-{}", user.subuid_start, user.subgid_start);
    assert!(name.ends_with(&tag), "{name}");
    let host = |path: &str| {
        let meta = fs::symlink_metadata(tree.join(path)).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(
        host("home/cnb-run"),
        (user.subuid_start + 1000, user.subgid_start + 999),
        "the image user's home belongs to its id in the range"
    );
    assert_eq!(
        host("etc/passwd"),
        (user.uid, user.gid),
        "root's is the caller's"
    );
    assert_eq!(
        xattr(&tree.join("home/cnb-run"), "user.rootlesscontainers"),
        None,
        "owners are real, not recorded"
    );
    let listed = store_ls(&work, Who::SubordinateIds);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["owners"], tag.as_str(), "{listed:?}");
    assert!(
        listed[0]["bytes"].as_u64().unwrap() > 1_000_000,
        "{listed:?}"
    );
    let ran = work.lathe(
        Who::SubordinateIds,
        &["store", "prune", "--all", "--store", &work.store_arg()],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    let left: Vec<_> = fs::read_dir(work.store().join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "prune --all left {left:?}");
}

/// An image (linux/amd64, run as root) whose top layer has entries a rootless unpack
/// can't give their owners: a directory, a file and a symlink of the image user, a setuid
/// file, a setgid directory of another group, and a file of an id above 65535 (which lathe's
/// map does not reach: it stays root's, with a warning).
fn owners_image() -> &'static str {
    static REF: OnceLock<String> = OnceLock::new();
    REF.get_or_init(|| {
        let mut extra = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, ids: u64, link: &str| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(ids);
            header.set_gid(if ids == 1001 { 1000 } else { ids });
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"data\n"
            } else {
                b""
            };
            header.set_size(data.len() as u64);
            if kind == tar::EntryType::Symlink {
                extra.append_link(&mut header, path, link).unwrap();
            } else {
                extra.append_data(&mut header, path, data).unwrap();
            }
        };
        add("opt/owned/", tar::EntryType::Directory, 0o750, 1001, "");
        add("opt/owned/secret", tar::EntryType::Regular, 0o600, 1001, "");
        add(
            "opt/owned-link",
            tar::EntryType::Symlink,
            0o777,
            1001,
            "/opt/owned",
        );
        add("opt/setuid-tool", tar::EntryType::Regular, 0o4755, 0, "");
        add("opt/far", tar::EntryType::Regular, 0o644, 70000, "");
        let mut shared = tar::Header::new_gnu();
        shared.set_entry_type(tar::EntryType::Directory);
        shared.set_mode(0o2775);
        shared.set_uid(0);
        shared.set_gid(50);
        shared.set_size(0);
        extra
            .append_data(&mut shared, "opt/shared/", &[][..])
            .unwrap();
        let extra = extra.into_inner().unwrap();
        let dir = world().join("owners-image");
        let reference = image_with_layers(&dir, &[run_image_base_layer(), extra]);
        tool("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
        reference
    })
}

#[test]
fn a_subordinate_id_range_gives_every_entry_its_owner_and_mode() {
    subid_test_user();
    let work = Work::new();
    let ran = work.run(
        Who::SubordinateIds,
        &[
            owners_image(),
            "--",
            "/bin/sh",
            "-c",
            "cd /opt && stat -c '%u:%g %a %n' owned owned/secret owned-link setuid-tool far \
             shared",
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(
        ran.stdout,
        "1001:1000 750 owned\n1001:1000 600 owned/secret\n1001:1000 777 owned-link\n\
         0:0 4755 setuid-tool\n0:0 644 far\n0:50 2775 shared\n",
        "{ran}"
    );
    // Prune removes the tree, whose /opt/owned the caller itself may not empty.
    let tree = the_stored_rootfs(&work.store());
    let secret = tree.join("opt/owned/secret");
    assert_eq!(
        fs::metadata(&secret).unwrap().uid(),
        subid_test_user().subuid_start + 1000
    );
    let ran = work.lathe(
        Who::SubordinateIds,
        &["store", "prune", "--all", "--store", &work.store_arg()],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(!tree.exists(), "{} is still there", tree.display());
}

// ---------------------------------------------------------------------------------------
// The store.

/// The fixture run image's amd64 layer, uncompressed.
fn run_image_base_layer() -> Vec<u8> {
    let images = world().join("images");
    let blob = |digest: &str| {
        fs::read(
            images
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(images.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "run-linux-amd64")
        .expect("run-linux-amd64 in the fixtures");
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(manifest["digest"].as_str().unwrap())).unwrap();
    let layer = &manifest["layers"][0];
    let compressed = blob(layer["digest"].as_str().unwrap());
    assert!(layer["mediaType"].as_str().unwrap().ends_with("+gzip"));
    let mut base = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&compressed[..]),
        &mut base,
    )
    .unwrap();
    base
}

/// An image whose process runs as root: the fixture run image's amd64 layer, plus a layer
/// with `/data -> /lathe-volume-symlink-target` (a directory holding `from-image`).
fn root_image() -> &'static str {
    static REF: OnceLock<String> = OnceLock::new();
    REF.get_or_init(|| {
        let base = run_image_base_layer();
        let mut extra = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        extra
            .append_data(&mut dir, "lathe-volume-symlink-target/", &[][..])
            .unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_mode(0o644);
        file.set_size(3);
        extra
            .append_data(
                &mut file,
                "lathe-volume-symlink-target/from-image",
                &b"img"[..],
            )
            .unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        extra
            .append_link(&mut link, "data", "/lathe-volume-symlink-target")
            .unwrap();
        let extra = extra.into_inner().unwrap();

        let dir = world().join("root-image");
        let reference = image_with_layers(&dir, &[base, extra]);
        tool("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
        reference
    })
}

/// Every entry of a tree: name, type, mode, owner, size, mtime, the rootless ownership
/// xattr, contents' sha256 or link target.
fn tree_facts(root: &Path) -> Vec<String> {
    let top = (
        String::new(),
        root.to_path_buf(),
        root.symlink_metadata().unwrap(),
    );
    std::iter::once(top)
        .chain(tree_entries(root))
        .map(|(rel, path, meta)| {
            let ft = meta.file_type();
            let what = if ft.is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_file() {
                format!(
                    "file {} {}",
                    meta.size(),
                    sha256_hex(&fs::read(&path).unwrap())
                )
            } else {
                format!("special {:o}", meta.mode())
            };
            format!(
                "/{rel}: {what} mode {:o} owner {}:{} mtime {}.{} xattr {:?} ino {}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec(),
                xattr(&path, "user.rootlesscontainers"),
                meta.ino()
            )
        })
        .collect()
}

/// The one root filesystem tree in the store.
fn the_stored_rootfs(store: &Path) -> PathBuf {
    let mut trees: Vec<PathBuf> = fs::read_dir(store.join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(trees.len(), 1, "{trees:?}");
    trees.pop().unwrap()
}

fn store_ls(work: &Work, who: Who) -> Vec<serde_json::Value> {
    let ran = work.lathe(
        who,
        &["store", "ls", "--json", "--store", &work.store_arg()],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    serde_json::from_str::<serde_json::Value>(&ran.stdout)
        .unwrap_or_else(|e| panic!("{e}: {ran}"))
        .as_array()
        .unwrap()
        .clone()
}

/// A run that writes, deletes, renames, chmods and chowns all over / as root.
const VANDAL: &str = r#"set -e
rm -rf /home /etc/os-release /bin/ls /lathe-volume-symlink-target/from-image
echo changed > /etc/passwd
echo new > /newfile
mkdir -p /usr/new/deep && echo x > /usr/new/deep/file
touch /bin/new /etc/ssl/certs/ca-certificates.crt
mv /usr/bin/env /usr/bin/env-moved
ln -s /etc /etc-link
chmod 0700 /etc /bin/busybox
chmod 0000 /root
chmod 4755 /bin/sh
chown 5:5 /etc/passwd 2>/dev/null || true
rm -rf /etc/ssl
echo vandalised"#;

fn the_stored_rootfs_is_never_changed_and_is_reused(who: Who) {
    let work = Work::new();
    let image = root_image();
    let ran = work.run(who, &[image, "--", "true"]);
    assert_eq!(ran.code, Some(0), "{ran}");
    let rootfs = the_stored_rootfs(&work.store());
    let before = tree_facts(&rootfs);
    assert!(before.len() > 50, "{before:?}");

    let ran = work.run(who, &[image, "--", "/bin/sh", "-c", VANDAL]);
    assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
    assert_eq!(ran.stdout, "vandalised\n", "{ran}");
    let after = tree_facts(&rootfs);
    let gone: Vec<_> = before.iter().filter(|f| !after.contains(f)).collect();
    let new: Vec<_> = after.iter().filter(|f| !before.contains(f)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{who:?}: the run changed the stored rootfs: before {gone:#?}, after {new:#?}"
    );

    // The next run starts from the image again, from the same stored tree, and says so.
    let ran = work.run(
        who,
        &[
            "-v",
            image,
            "--",
            "/bin/sh",
            "-c",
            "head -1 /etc/os-release; ls /home; test ! -e /newfile && echo clean",
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(
        ran.stdout, "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\ncnb\ncnb-run\nclean\n",
        "{ran}"
    );
    assert!(
        ran.stderr
            .contains(&format!("reused {} from the store", rootfs.display())),
        "{ran}"
    );
    assert!(
        ran.stderr
            .contains("ran on an overlay of the stored root filesystem")
            || ran.stderr.contains("ran on a private copy"),
        "says how the root was made writable: {ran}"
    );
    assert_eq!(the_stored_rootfs(&work.store()), rootfs);
    assert_eq!(tree_facts(&rootfs), before, "reused as it was");
    let listed = store_ls(&work, who);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["platform"], "linux/amd64", "{listed:?}");

    let ran = work.lathe(
        who,
        &["store", "prune", "--all", "--store", &work.store_arg()],
    );
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(store_ls(&work, who).is_empty());
    let left: Vec<_> = fs::read_dir(work.store().join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "prune --all left {left:?}");
}

#[test]
fn the_stored_rootfs_is_never_changed_and_is_reused_as_the_test_user() {
    the_stored_rootfs_is_never_changed_and_is_reused(Who::TestUser);
}

#[test]
fn the_stored_rootfs_is_never_changed_and_is_reused_unprivileged() {
    the_stored_rootfs_is_never_changed_and_is_reused(Who::Unprivileged);
}

#[test]
fn the_stored_rootfs_is_never_changed_and_is_reused_nested() {
    the_stored_rootfs_is_never_changed_and_is_reused(Who::Nested);
}

#[test]
fn the_stored_rootfs_is_never_changed_and_is_reused_with_a_subordinate_id_range() {
    the_stored_rootfs_is_never_changed_and_is_reused(Who::SubordinateIds);
}

/// `store ls` and `store prune` of a store that does not exist (given, or the default one
/// under XDG_CACHE_HOME) say it is empty and leave the filesystem as it was.
#[test]
fn ls_and_prune_of_a_missing_store_create_nothing() {
    let work = Work::new();
    let cache = work.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let missing = work.path().join("no-store");
    let before = snapshot(work.path());
    for (args, env) in [
        (
            vec!["store", "ls", "--store", missing.to_str().unwrap()],
            None,
        ),
        (
            vec![
                "store",
                "ls",
                "--json",
                "--store",
                missing.to_str().unwrap(),
            ],
            None,
        ),
        (vec!["store", "ls"], Some(&cache)),
        (
            vec!["store", "prune", "--store", missing.to_str().unwrap()],
            None,
        ),
        (
            vec![
                "store",
                "prune",
                "--all",
                "--store",
                missing.to_str().unwrap(),
            ],
            None,
        ),
        (vec!["store", "prune", "--all"], Some(&cache)),
    ] {
        let mut command = work.command(Who::TestUser, &args);
        if let Some(cache) = env {
            command.env("XDG_CACHE_HOME", cache);
        }
        let ran = start(command, work.logs.path()).wait(LIMIT);
        assert_eq!(ran.code, Some(0), "{args:?}: {ran}");
        if args.contains(&"--json") {
            assert_eq!(ran.stdout.trim(), "[]", "{args:?}: {ran}");
        } else {
            assert_eq!(ran.stdout, "", "{args:?}: {ran}");
        }
        assert_eq!(
            snapshot(work.path()),
            before,
            "{args:?} changed the filesystem"
        );
    }
    assert!(!missing.exists() && !cache.join("lathe").exists());
}

#[test]
fn concurrent_runs_on_an_empty_store_share_one_rootfs() {
    for who in [Who::TestUser, Who::Unprivileged, Who::SubordinateIds] {
        let work = Work::new();
        let image = fixture("run");
        let opts = [
            "--platform",
            "linux/arm64",
            image.as_str(),
            "--",
            "/bin/sh",
            "-c",
            "uname -m",
        ];
        let first = work.spawn_run(who, &opts);
        let second = work.spawn_run(who, &opts);
        for ran in [first.wait(LIMIT), second.wait(LIMIT)] {
            assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
            assert_eq!(ran.stdout, "aarch64\n", "{ran}");
        }
        work.assert_nothing_left("after two concurrent runs");
        the_stored_rootfs(&work.store());
        let entries = fs::read_dir(work.store().join("rootfs")).unwrap().count();
        assert_eq!(entries, 2, "one tree and its record");
        assert_eq!(store_ls(&work, who).len(), 1);
    }
}

// ---------------------------------------------------------------------------------------
// Images from a registry: the store keeps what was pulled.

/// The blob GETs (configs and layers) a proxy saw, by digest.
fn blob_gets(proxy: &FaultProxy) -> Vec<String> {
    proxy
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path().contains("/blobs/sha256:"))
        .map(|s| s.path().rsplit('/').next().unwrap().to_string())
        .collect()
}

/// The layer digests of one platform of the fixture image `name`.
fn fixture_layers(name: &str, platform: &str) -> Vec<String> {
    let (os, arch) = platform.split_once('/').unwrap();
    let images = world().join("images");
    let blob = |digest: &str| -> serde_json::Value {
        let path = images
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(images.join("index.json")).unwrap()).unwrap();
    let wanted = format!("{name}-{os}-{arch}");
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == wanted.as_str())
        .unwrap_or_else(|| panic!("{wanted} in the fixtures"));
    blob(manifest["digest"].as_str().unwrap())["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// A registry holding the fixture run image (both platforms) behind a counting proxy.
fn registry_with_the_run_image() -> (TestRegistry, FaultProxy, String) {
    let registry = TestRegistry::start(RegistryConfig::default());
    let proxy = FaultProxy::start(registry.port, |_| None);
    let image = format!("docker://{}/lathe/run:1", proxy.host());
    let out = lathe(&["copy", &fixture("run"), &image]);
    assert!(out.status.success(), "{}", report(&out));
    (registry, proxy, image)
}

/// Runs from a registry image: the first pulls its layers; the second reuses the stored tree
/// and asks for manifests only; a third, with the tree gone, unpacks it again from the blobs
/// the store kept, still pulling nothing.
fn a_second_run_from_a_registry_downloads_nothing(who: Who) {
    let (_registry, proxy, image) = registry_with_the_run_image();
    let work = Work::new();
    let layers = fixture_layers("run", "linux/amd64");
    let opts = [
        "-v",
        "--platform",
        "linux/amd64",
        &image,
        "--",
        "/bin/sh",
        "-c",
        "uname -m; id -u",
    ];
    let mut timings = Vec::new();
    for n in 1..=3 {
        if n == 3 {
            lathe::layout::remove_tree(&work.store().join("rootfs")).unwrap();
        }
        proxy.clear();
        let started = Instant::now();
        let ran = work.run(who, &opts);
        timings.push(started.elapsed());
        assert_eq!(
            (ran.code, ran.stdout.as_str()),
            (Some(0), "x86_64\n1001\n"),
            "{who:?}, run {n}: {ran}"
        );
        assert_eq!(
            ran.stderr.contains("from the store"),
            n == 2,
            "{who:?}, run {n}: the tree is reused by the second run only: {ran}"
        );
        let pulled = blob_gets(&proxy);
        if n == 1 {
            for layer in &layers {
                assert!(
                    pulled.contains(layer),
                    "{who:?}: {layer} not pulled: {pulled:?}"
                );
            }
        } else {
            assert_eq!(
                pulled,
                Vec::<String>::new(),
                "{who:?}: run {n} pulled blobs; requests: {:#?}",
                proxy.seen()
            );
        }
    }
    eprintln!("{who:?}: runs took {timings:?}");
}

#[test]
fn a_second_run_from_a_registry_downloads_nothing_as_the_test_user() {
    a_second_run_from_a_registry_downloads_nothing(Who::TestUser);
}

#[test]
fn a_second_run_from_a_registry_downloads_nothing_unprivileged() {
    a_second_run_from_a_registry_downloads_nothing(Who::Unprivileged);
}

#[test]
fn a_second_run_from_a_registry_downloads_nothing_with_a_subordinate_id_range() {
    a_second_run_from_a_registry_downloads_nothing(Who::SubordinateIds);
}

/// Two builds from registry images into two new layouts: the second pulls no blob, neither
/// the build image's layers (unpacked in the store) nor the run image's (which export
/// copies), nor either config.
fn a_second_build_from_registry_images_pulls_no_blob(who: Who) {
    let (_registry, proxy, run_image) = registry_with_the_run_image();
    let build_image = format!("docker://{}/lathe/build:1", proxy.host());
    let out = lathe(&["copy", &fixture("build"), &build_image]);
    assert!(out.status.success(), "{}", report(&out));
    let world = World::new();
    let run_layers = fixture_layers("run", "linux/amd64");
    let layers: BTreeSet<String> = fixture_layers("build", "linux/amd64")
        .into_iter()
        .chain(run_layers.iter().cloned())
        .collect();
    for n in 1..=2 {
        proxy.clear();
        let started = Instant::now();
        let out = command_as(who, &world_lathe())
            .arg("build")
            .arg(world.path("apps/site"))
            .arg(format!("--build-image={build_image}"))
            .arg(format!("--run-image={run_image}"))
            .arg(format!(
                "--buildpack={}",
                world.arg("buildpacks/static-site")
            ))
            .arg(format!(
                "--output=oci:{}:app",
                world.arg(&format!("out-{n}"))
            ))
            .arg(format!("--store={}", world.arg("store")))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{who:?}: {}", report(&out));
        let pulled = blob_gets(&proxy);
        let pulled_layers: Vec<&String> = layers.iter().filter(|l| pulled.contains(l)).collect();
        eprintln!(
            "{who:?}: build {n} took {:?}, pulled {} blobs, {} of them layers",
            started.elapsed(),
            pulled.len(),
            pulled_layers.len()
        );
        if n == 1 {
            assert_eq!(pulled_layers.len(), layers.len(), "{who:?}: {pulled:?}");
        } else {
            assert_eq!(pulled, Vec::<String>::new(), "{who:?}: the second build");
        }
        let written = world.path(&format!("out-{n}/blobs/sha256"));
        for layer in &run_layers {
            let blob = written.join(layer.trim_start_matches("sha256:"));
            assert!(
                blob.is_file(),
                "{who:?}: {} is not in out-{n}",
                blob.display()
            );
        }
    }
}

#[test]
fn a_second_build_from_registry_images_pulls_no_blob_as_the_test_user() {
    a_second_build_from_registry_images_pulls_no_blob(Who::TestUser);
}

#[test]
fn a_second_build_from_registry_images_pulls_no_blob_unprivileged() {
    a_second_build_from_registry_images_pulls_no_blob(Who::Unprivileged);
}

/// `lathe ARGS` as root of a rootless container that has a subordinate range (`unshare
/// --map-auto --map-root-user` run by the subordinate-id user: ids 0–65535 mapped, as podman
/// maps them), from `dir`.
fn in_a_rootless_container_with_a_range(dir: &Path, args: &[&str]) -> Command {
    let user = subid_test_user();
    assert!(
        is_root(),
        "running lathe as {SUBID_USER} needs root (setpriv): run the tests as root"
    );
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--init-groups", "--inh-caps=-all"])
        .args(["unshare", "--map-auto", "--map-root-user"])
        .arg(world_lathe())
        .args(args)
        .current_dir(dir);
    c
}

/// Root of such a container unpacks with the image's owners (chown, its namespace maps them)
/// and runs the payload as the image user with no nested namespace; a build there chowns its
/// work area to the build user and runs the buildpacks as that user.
#[test]
fn root_of_a_rootless_container_with_a_range_keeps_the_images_owners() {
    let user = subid_test_user();
    let work = Work::new();
    let store = work.store_arg();
    let marker = format!("LATHE_TEST_MARKER={}", work.marker);
    let image = fixture("run");
    let command = in_a_rootless_container_with_a_range(
        work.path(),
        &[
            "run",
            "--store",
            &store,
            "--env",
            &marker,
            &image,
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/self/uid_map; stat -c '%u:%g %n' /home/cnb-run /etc/passwd; \
             touch /home/cnb-run/mine && echo home-writable; id -u",
        ],
    );
    let ran = start(command, work.logs.path()).wait(LIMIT);
    work.assert_nothing_left("after a run in a rootless container with a range");
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(
        ran.stdout
            .ends_with("1001:1000 /home/cnb-run\n0:0 /etc/passwd\nhome-writable\n1001\n"),
        "{ran}"
    );
    assert!(
        ran.stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["1", "1", "65535"])),
        "the payload sees its container's map, not a nested one: {ran}"
    );
    let tree = the_stored_rootfs(&work.store());
    assert_eq!(
        fs::metadata(tree.join("home/cnb-run")).unwrap().uid(),
        user.subuid_start + 1000
    );

    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let build_image = format!("--build-image=oci:{}:build", images.display());
    let run_image = format!("--run-image=oci:{}:run", images.display());
    let buildpack = format!("--buildpack={}", world.arg("buildpacks/cached-deps"));
    let output = format!("--output=oci:{}:app", world.arg("out"));
    let build_store = format!("--store={}", world.arg("store"));
    let out = in_a_rootless_container_with_a_range(
        world.dir.path(),
        &[
            "build",
            world.arg("apps/deps-app").as_str(),
            &build_image,
            &run_image,
            &buildpack,
            &output,
            &build_store,
            "--json",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["layers"][0]["name"], "deps", "{}", report(&out));
    let app = format!("oci:{}:app", world.arg("out"));
    let out = in_a_rootless_container_with_a_range(
        world.dir.path(),
        &["run", &build_store, "--process", "show", &app],
    )
    .output()
    .unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (
            Some(0),
            "2 dependencies in /layers/lathe-test_cached-deps/deps/lib\n"
        ),
        "{}",
        report(&out)
    );
}

// ---------------------------------------------------------------------------------------
// Builds with a subordinate range.

/// A build by a caller with a subordinate range runs its buildpacks as the caller's id (the
/// work area is the caller's) on a caller-owned tree of the build image, and the image it
/// writes runs with its owners: the site's layer belongs to the build user inside.
#[test]
fn a_build_with_a_subordinate_id_range_builds_and_its_image_runs() {
    let user = subid_test_user();
    let world = World::new();
    let images = world_readable_lathe_and_fixtures().join("images");
    let out = command_as(Who::SubordinateIds, &world_lathe())
        .arg("build")
        .arg(world.path("apps/deps-app"))
        .arg(format!("--build-image=oci:{}:build", images.display()))
        .arg(format!("--run-image=oci:{}:run", images.display()))
        .arg(format!(
            "--buildpack={}",
            world.arg("buildpacks/cached-deps")
        ))
        .arg(format!("--output=oci:{}:app", world.arg("out")))
        .arg(format!("--store={}", world.arg("store")))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    let app = format!("oci:{}:app", world.arg("out"));
    let store = world.arg("store");
    let out = command_as(Who::SubordinateIds, &world_lathe())
        .args(["run", "--store", &store, "--process", "show", &app])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 dependencies in /layers/lathe-test_cached-deps/deps/lib\n",
        "the layer's exec.d ran: {}",
        report(&out)
    );
    // The app image's tree: the buildpack's layer is the build user's (cnb, 1000:1000 inside,
    // ids of the range on disk); the run image's /etc is root's (the caller's).
    let rootfs = world.path("store/rootfs");
    let app_tree = fs::read_dir(&rootfs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .find(|p| p.join("layers/lathe-test_cached-deps/deps").is_dir())
        .unwrap_or_else(|| panic!("no app tree in {}", rootfs.display()));
    let layer = fs::metadata(app_tree.join("layers/lathe-test_cached-deps/deps")).unwrap();
    assert_eq!(
        (layer.uid(), layer.gid()),
        (user.subuid_start + 999, user.subgid_start + 999)
    );
    assert_eq!(fs::metadata(app_tree.join("etc")).unwrap().uid(), user.uid);
    assert_eq!(processes_mentioning(&[&store]), Vec::<(i32, String)>::new());
}

// ---------------------------------------------------------------------------------------
// Timeouts, signals, kills.

/// A payload that ignores the signals it is sent, as a hung process might.
const SLEEPER: &str = "trap '' INT TERM HUP; sleep 1000; :";

#[test]
fn a_timeout_kills_the_whole_sandbox() {
    for who in [Who::TestUser, Who::Nested] {
        let work = Work::new();
        let started = Instant::now();
        let ran = work.run(
            who,
            &[
                "--timeout",
                "2",
                &fixture("run"),
                "--",
                "/bin/sh",
                "-c",
                SLEEPER,
                &work.marker,
            ],
        );
        let took = started.elapsed();
        assert!(ran.code.is_some_and(|c| c != 0), "{who:?}: {ran}");
        assert!(
            took < Duration::from_secs(10) && took >= Duration::from_secs(2),
            "{who:?}: took {took:?}"
        );
        assert!(
            ran.stderr.contains("longer than 2s"),
            "the message names the timeout: {ran}"
        );
    }
}

/// Sends `signal` to lathe (or to its whole process group, as a terminal's Ctrl-C does)
/// while the payload sleeps: lathe exits non-zero promptly and leaves nothing.
fn a_signal_kills_the_whole_sandbox(who: Who, signal: i32, to_group: bool) {
    let work = Work::new();
    let image = fixture("run");
    let mut command =
        work.run_command(who, &[&image, "--", "/bin/sh", "-c", SLEEPER, &work.marker]);
    command.process_group(0);
    let running = start(command, work.logs.path());
    wait_for_payload(&work, "sleep 1000");
    let pid = running.pid();
    let sent = Instant::now();
    // SAFETY: kill has no memory preconditions.
    let r = unsafe { libc::kill(if to_group { -pid } else { pid }, signal) };
    assert_eq!(r, 0);
    let ran = running.wait(Duration::from_secs(60));
    let took = sent.elapsed();
    let what = format!("{who:?}, signal {signal}, to the group: {to_group}");
    assert!(ran.code.is_some_and(|c| c != 0), "{what}: {ran}");
    assert!(
        took < Duration::from_secs(5),
        "{what}: exited after {took:?}"
    );
    work.assert_nothing_left(&what);
}

#[test]
fn sigterm_and_sigint_kill_the_whole_sandbox() {
    for who in [Who::TestUser, Who::Unprivileged, Who::Nested] {
        a_signal_kills_the_whole_sandbox(who, libc::SIGTERM, false);
        a_signal_kills_the_whole_sandbox(who, libc::SIGINT, false);
    }
}

#[test]
fn ctrl_c_to_the_process_group_kills_the_whole_sandbox() {
    for who in [Who::TestUser, Who::Nested] {
        a_signal_kills_the_whole_sandbox(who, libc::SIGINT, true);
    }
}

/// SIGKILL: lathe can't clean up, but the sandbox dies with it (parent-death signals) and
/// leaves no mount; `store prune` then removes the scratch directory and what the image user
/// wrote there.
#[test]
fn a_killed_lathe_leaves_no_process_or_mount_and_prune_removes_its_scratch() {
    for who in [
        Who::TestUser,
        Who::Unprivileged,
        Who::Nested,
        Who::SubordinateIds,
    ] {
        let work = Work::new();
        let marker = work.marker.clone();
        let image = fixture("run");
        // The scratch left behind holds what the image user wrote (with a subordinate range:
        // files of an id the caller can't remove itself).
        let script = format!(
            "mkdir -p /home/cnb-run/d && echo x > /home/cnb-run/d/left-behind && chmod 500 \
             /home/cnb-run/d; {SLEEPER}"
        );
        let running = work.spawn_run(who, &[&image, "--", "/bin/sh", "-c", &script, &marker]);
        wait_for_payload(&work, "sleep 1000");
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(running.pid(), libc::SIGKILL) };
        let ran = running.wait(Duration::from_secs(10));
        assert_eq!(ran.code, Some(128 + libc::SIGKILL), "{ran}");
        work.assert_no_leaks(&format!("after SIGKILL of lathe as {who:?}"));
        let ran = work.lathe(who, &["store", "prune", "--store", &work.store_arg()]);
        assert_eq!(ran.code, Some(0), "{ran}");
        work.assert_nothing_left("after prune");
        assert_eq!(
            store_ls(&work, who).len(),
            1,
            "the rootfs, recently used, stays"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Inside the sandbox.

fn interfaces(proc_net_dev: &str) -> BTreeSet<String> {
    proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .collect()
}

#[test]
fn network_none_has_only_loopback_up_and_default_has_the_hosts() {
    let host = interfaces(&fs::read_to_string("/proc/net/dev").unwrap());
    assert!(host.len() > 1, "the host has more than lo: {host:?}");
    for who in [Who::TestUser, Who::Unprivileged, Who::Nested] {
        let work = Work::new();
        let image = fixture("run");
        for network in [None, Some("none")] {
            let mut opts = vec![];
            if let Some(n) = network {
                opts.extend(["--network", n]);
            }
            opts.extend([
                image.as_str(),
                "--",
                "/bin/sh",
                "-c",
                "cat /proc/net/dev; busybox ifconfig lo | grep -o UP",
            ]);
            let ran = work.run(who, &opts);
            assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
            let inside = interfaces(&ran.stdout);
            assert_eq!(
                inside,
                BTreeSet::from(["lo".to_string()]),
                "{who:?} {network:?}: {ran}"
            );
            assert!(ran.stdout.ends_with("UP\n"), "lo is up ({who:?}): {ran}");
        }
        let ran = work.run(
            who,
            &["--network", "default", &image, "--", "cat", "/proc/net/dev"],
        );
        assert_eq!(ran.code, Some(0), "{ran}");
        assert_eq!(interfaces(&ran.stdout), host, "{who:?}: {ran}");
    }
}

#[test]
fn dev_proc_tmp_hostname_and_resolv_conf_inside() {
    let script = r#"for d in null zero full random urandom tty; do [ -c /dev/$d ] && echo "dev $d"; done
head -c 16 /dev/urandom | wc -c
head -c 16 /dev/random | wc -c
head -c 8 /dev/zero | tr '\0' z
echo
echo x > /dev/null && echo null-takes-writes
(echo x > /dev/full) 2>/dev/null || echo full-is-full
echo "pid1 $(tr '\0' ' ' < /proc/1/cmdline)"
echo "self $$"
echo "pids $(ls -d /proc/[0-9]* | wc -l)"
touch /tmp/mine && stat -c 'tmp %u:%g %a' /tmp/mine
echo "host $(hostname)"
test -f /etc/resolv.conf && echo resolv-conf
id -u"#;
    for (who, platform) in [
        (Who::TestUser, "linux/amd64"),
        (Who::Unprivileged, "linux/arm64"),
        (Who::Nested, "linux/amd64"),
    ] {
        let work = Work::new();
        let ran = work.run(
            who,
            &[
                "--platform",
                platform,
                &fixture("run"),
                "--",
                "/bin/sh",
                "-c",
                script,
            ],
        );
        assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
        let lines: Vec<&str> = ran.stdout.lines().collect();
        let what = format!("{who:?} {platform}: {ran}");
        assert_eq!(
            lines[..6],
            [
                "dev null",
                "dev zero",
                "dev full",
                "dev random",
                "dev urandom",
                "dev tty"
            ],
            "{what}"
        );
        assert_eq!(
            lines[6..10],
            ["16", "16", "zzzzzzzz", "null-takes-writes"],
            "{what}"
        );
        assert_eq!(lines[10], "full-is-full", "{what}");
        assert_eq!(
            lines[11].trim_end(),
            format!("pid1 {} __sandbox-init", world_lathe().display()),
            "pid 1 is lathe's init: {what}"
        );
        assert_eq!(lines[12], "self 2", "the payload is pid 2: {what}");
        let pids: usize = lines[13].strip_prefix("pids ").unwrap().parse().unwrap();
        assert!(pids <= 6, "the sandbox's own /proc: {what}");
        assert_eq!(lines[14], "tmp 1001:1000 644", "{what}");
        assert_eq!(lines[15..], ["host lathe", "resolv-conf", "1001"], "{what}");
    }
}

#[test]
fn volumes_read_write_read_only_and_through_an_in_image_symlink() {
    for who in [Who::TestUser, Who::Unprivileged, Who::Nested] {
        let work = Work::new();
        let rw = work.path().join("rw");
        let ro = work.path().join("ro");
        for dir in [&rw, &ro] {
            fs::create_dir(dir).unwrap();
            fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        fs::write(ro.join("host-file"), "from the host\n").unwrap();
        fs::set_permissions(ro.join("host-file"), fs::Permissions::from_mode(0o666)).unwrap();
        let single = work.path().join("single");
        fs::write(&single, "one file\n").unwrap();
        fs::set_permissions(&single, fs::Permissions::from_mode(0o644)).unwrap();
        let volumes = [
            format!("{}:/mnt/rw", rw.display()),
            format!("{}:/mnt/ro:ro", ro.display()),
            format!("{}:/etc/single:ro", single.display()),
        ];
        let script = r#"echo hello > /mnt/rw/from-sandbox && echo wrote
cat /mnt/ro/host-file
echo no > /mnt/ro/new || echo ro-refuses-new
echo no >> /mnt/ro/host-file || echo ro-refuses-append
cat /etc/single"#;
        let ran = work.run(
            who,
            &[
                "--volume",
                &volumes[0],
                "--volume",
                &volumes[1],
                "--volume",
                &volumes[2],
                &fixture("run"),
                "--",
                "/bin/sh",
                "-c",
                script,
            ],
        );
        assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
        assert_eq!(
            ran.stdout, "wrote\nfrom the host\nro-refuses-new\nro-refuses-append\none file\n",
            "{who:?}: {ran}"
        );
        assert!(ran.stderr.contains("Read-only file system"), "{ran}");
        let written = rw.join("from-sandbox");
        assert_eq!(fs::read_to_string(&written).unwrap(), "hello\n");
        assert_eq!(
            fs::metadata(&written).unwrap().uid(),
            host_uid_of_image_user(who),
            "{who:?}: owner on the host"
        );
        assert!(!ro.join("new").exists());
        assert_eq!(
            fs::read_to_string(ro.join("host-file")).unwrap(),
            "from the host\n"
        );

        // /data is an absolute symlink in the image: the bind lands on its target inside the
        // root, never on the host's path of that name.
        let host_twin = Path::new("/lathe-volume-symlink-target");
        assert!(
            !host_twin.exists(),
            "{} exists on the host",
            host_twin.display()
        );
        let ran = work.run(
            who,
            &[
                "--volume",
                &format!("{}:/data", ro.display()),
                root_image(),
                "--",
                "/bin/sh",
                "-c",
                "ls /lathe-volume-symlink-target; readlink /data",
            ],
        );
        assert_eq!(ran.code, Some(0), "{who:?}: {ran}");
        assert_eq!(
            ran.stdout, "host-file\n/lathe-volume-symlink-target\n",
            "{who:?}: {ran}"
        );
        assert!(
            !host_twin.exists(),
            "{who:?}: the host got {}",
            host_twin.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// No user namespaces: a seccomp filter like Docker's default profile.

/// Installs (in a child, before exec) a seccomp filter that refuses `unshare` and `clone`
/// with CLONE_NEWUSER (EPERM), and `clone3` (ENOSYS, whose flags a filter can't inspect:
/// glibc then falls back to `clone`).
fn refuse_user_namespaces(command: &mut Command) {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let eq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (low half first).
    let filter: [libc::sock_filter; 13] = [
        stmt(load, 4),
        jump(eq, AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0),
        jump(eq, libc::SYS_unshare as u32, 0, 1),
        stmt(ret, errno(libc::EPERM)),
        jump(eq, libc::SYS_clone3 as u32, 0, 1),
        stmt(ret, errno(libc::ENOSYS)),
        jump(eq, libc::SYS_clone as u32, 0, 3),
        stmt(load, 16),
        jump(
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            libc::CLONE_NEWUSER as u32,
            0,
            1,
        ),
        stmt(ret, errno(libc::EPERM)),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: between fork and exec only prctl is called, on a filter owned by the closure.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn without_user_namespaces_lathe_says_why_and_what_to_do() {
    let work = Work::new();
    // The filter does what Docker's profile does, and nothing else: user namespaces are
    // refused; processes and threads still start.
    let mut c = Command::new("unshare");
    c.args(["--user", "true"]);
    refuse_user_namespaces(&mut c);
    let ran = start(c, work.logs.path()).wait(LIMIT);
    assert_ne!(ran.code, Some(0), "the filter refuses unshare: {ran}");
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import subprocess, threading\n\
         t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
         subprocess.run(['true'], check=True); print('ok')",
    ]);
    refuse_user_namespaces(&mut c);
    let ran = start(c, work.logs.path()).wait(LIMIT);
    assert_eq!((ran.code, ran.stdout.as_str()), (Some(0), "ok\n"), "{ran}");
    let mut c = work.command(
        Who::TestUser,
        &[
            "unpack",
            "--platform",
            "linux/arm64",
            &fixture("build"),
            "unpacked",
        ],
    );
    refuse_user_namespaces(&mut c);
    let ran = start(c, work.logs.path()).wait(LIMIT);
    assert_eq!(
        ran.code,
        Some(0),
        "lathe itself works under the filter: {ran}"
    );

    for mode in ["auto", "userns"] {
        let store = work.store_arg();
        let mut c = work.command(
            Who::TestUser,
            &[
                "run",
                "--store",
                &store,
                "--sandbox",
                mode,
                &fixture("run"),
                "--",
                "true",
            ],
        );
        refuse_user_namespaces(&mut c);
        let ran = start(c, work.logs.path()).wait(LIMIT);
        assert_eq!(ran.code, Some(1), "--sandbox {mode}: {ran}");
        for needle in [
            "user namespaces are not available",
            "seccomp",
            "allow unprivileged user namespaces",
            "--sandbox none",
        ] {
            assert!(
                ran.stderr.contains(needle),
                "--sandbox {mode}: {needle:?} in {ran}"
            );
        }
        work.assert_nothing_left(&format!("--sandbox {mode} under seccomp"));
    }
}

/// `--sandbox auto` probes user namespaces without running anything: with the host's `true`
/// made unexecutable (/dev/null bound over it, in a private mount namespace of a rootless
/// user namespace), `lathe run` still runs.
#[test]
fn the_auto_probe_runs_no_program() {
    let work = Work::new();
    let store = work.store_arg();
    let marker = format!("LATHE_TEST_MARKER={}", work.marker);
    let lathe = world_lathe();
    let script = r#"set -e
for p in /bin/true /usr/bin/true; do [ -e "$p" ] && mount --bind /dev/null "$p"; done
if /bin/true 2>/dev/null || /usr/bin/true 2>/dev/null; then echo "true still runs"; exit 99; fi
exec "$@""#;
    let mut command = Command::new("unshare");
    command
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&lathe)
        .args([
            "run",
            "--sandbox",
            "auto",
            "--store",
            &store,
            "--env",
            &marker,
            &fixture("run"),
            "--",
            "/bin/sh",
            "-c",
            "echo ran as $(id -u)",
        ])
        .current_dir(work.path());
    let ran = start(command, work.logs.path()).wait(LIMIT);
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(ran.stdout, "ran as 1001\n", "{ran}");
    work.assert_nothing_left("after the probe with `true` masked");
}

// ---------------------------------------------------------------------------------------
// Bad input.

#[test]
fn bad_input_gives_a_clear_error_and_a_non_zero_exit() {
    let work = Work::new();
    let image = fixture("run");
    let cases: [(&[&str], i32, &str); 9] = [
        (
            &["--platform", "linux/riscv64", &image, "--", "true"],
            1,
            "no linux/riscv64 image (it has: linux/amd64, linux/arm64)",
        ),
        (
            &["--platform", "riscv64", &image, "--", "true"],
            3,
            "invalid platform \"riscv64\"",
        ),
        (&[&image, "--", "/no/such"], 127, "/no/such"),
        (
            &[&image, "--", "no-such-program"],
            127,
            "no-such-program: not found",
        ),
        (&[&image, "--", "/etc/passwd"], 126, "exec /etc/passwd"),
        (&["--process", "web", &image], 127, "/cnb/process/web"),
        (
            &["--volume", "/tmp:relative/path", &image, "--", "true"],
            3,
            "the container path must be absolute",
        ),
        (
            &["--volume", "/no/such/dir:/x", &image, "--", "true"],
            3,
            "/no/such/dir",
        ),
        (
            &["--env", "NO_EQUALS", &image, "--", "true"],
            3,
            "NO_EQUALS",
        ),
    ];
    for (opts, code, needle) in cases {
        let ran = work.run(Who::TestUser, opts);
        assert_eq!(ran.code, Some(code), "{opts:?}: {ran}");
        assert!(ran.stderr.contains(needle), "{opts:?}: {needle:?} in {ran}");
        assert!(ran.stdout.is_empty(), "{opts:?}: {ran}");
    }
}

/// cli-conventions: 3 for bad arguments. `--sandbox none` is never valid for `lathe run`, and
/// a process type with a slash is never a process type.
#[test]
fn arguments_lathe_run_refuses_exit_3() {
    let work = Work::new();
    let image = fixture("run");
    let ran = work.run(Who::TestUser, &["--sandbox", "none", &image, "--", "true"]);
    assert!(ran.stderr.contains("--sandbox none"), "{ran}");
    assert_eq!(ran.code, Some(3), "--sandbox none is a bad argument: {ran}");
    let ran = work.run(Who::TestUser, &["--process", "../web", &image]);
    assert!(ran.stderr.contains("not a valid name"), "{ran}");
    assert_eq!(
        ran.code,
        Some(3),
        "--process ../web is a bad argument: {ran}"
    );
}
