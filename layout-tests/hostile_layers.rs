//! The hostile-layer corpus (testdata/make-hostile-layers.py): every case unpacked with
//! `lathe unpack`, as the test user and as an unprivileged user with no capabilities, into a
//! root that sits beside sentinel files that user can write (so an escape would really land).
//! Refused cases must fail naming the layer digest and the entry, leave no target and change
//! nothing beside it; the others must give exactly the expected tree and change nothing
//! beside it either. Every failing case is reported, by name.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn every_hostile_case_as_the_test_user() {
    run_corpus(false);
}

#[test]
fn every_hostile_case_as_an_unprivileged_user_without_capabilities() {
    run_corpus(true);
}

/// Who runs `lathe unpack`: the test user, or (when the tests run as root and `unprivileged`
/// is asked) uid/gid 65534 with no groups and no capabilities, through setpriv.
struct Runner {
    lathe: PathBuf,
    setpriv: bool,
    uid: u32,
    label: &'static str,
}

impl Runner {
    fn new(lathe: PathBuf, unprivileged: bool) -> Runner {
        let euid = unsafe { libc::geteuid() };
        if unprivileged && euid == 0 {
            Runner {
                lathe,
                setpriv: true,
                uid: 65534,
                label: "as uid 65534 without capabilities",
            }
        } else {
            Runner {
                lathe,
                setpriv: false,
                uid: euid,
                label: if euid == 0 {
                    "as root"
                } else {
                    "as the test user"
                },
            }
        }
    }

    fn unpack(&self, cwd: &Path, image: &str, target: &Path) -> std::process::Output {
        let mut cmd = if self.setpriv {
            let mut c = setpriv_nobody();
            c.arg(&self.lathe);
            c
        } else {
            Command::new(&self.lathe)
        };
        cmd.args(["unpack", image, target.to_str().unwrap()])
            .current_dir(cwd)
            .output()
            .expect("run lathe")
    }

    /// Gives `path` to the user running the unpack (only needed when that is not us).
    fn own(&self, path: &Path) {
        if self.setpriv {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.uid)).unwrap();
        }
    }
}

fn run_corpus(unprivileged: bool) {
    // Directories the unpacker makes implicitly get 0755 under this umask (the corpus says so).
    unsafe { libc::umask(0o022) };
    let tmp = scratch();
    // The clone may sit where other users cannot read: work from a world-readable copy.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let world = tmp.path().join("world");
    fs::create_dir(&world).unwrap();
    fs::copy(lathe_bin(), world.join("lathe")).unwrap();
    let corpus = world.join("corpus");
    let arena = world.join("arena");
    let out = Command::new("python3")
        .arg(repo_root().join("testdata/make-hostile-layers.py"))
        .arg("--arena")
        .arg(&arena)
        .arg(&corpus)
        .output()
        .expect("python3 is needed to make the hostile-layer corpus");
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&fs::read(corpus.join("cases.json")).unwrap()).unwrap();
    assert_eq!(doc["arena"].as_str(), arena.to_str());
    let cases = doc["cases"].as_array().unwrap();
    let mut images = Vec::new();
    fs::create_dir(world.join("images")).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let tars: Vec<Vec<u8>> = case["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| fs::read(corpus.join(l.as_str().unwrap())).unwrap())
            .collect();
        // Half the images store their layers gzipped, half uncompressed.
        images.push(image_with_layer_blobs(
            &world.join("images").join(name),
            &tars,
            i % 2 == 1,
        ));
    }
    tool("chmod", &["-R", "a+rX", world.to_str().unwrap()]);

    let runner = Runner::new(world.join("lathe"), unprivileged);
    let root = arena.join(doc["root"].as_str().unwrap());
    let mut failures = Vec::new();
    for (case, (image, digests)) in cases.iter().zip(&images) {
        let name = case["name"].as_str().unwrap();
        reset_arena(&arena, &doc["sentinels"], &runner);
        let before = arena_snapshot(&arena, &root);
        let out = runner.unpack(&world, image, &root);
        let mut problems = Vec::new();
        if let Some(refused) = case["expect"].get("refused") {
            let err = stderr(&out);
            let layer = &digests[refused["layer"].as_u64().unwrap() as usize];
            let entry = refused["entry"].as_str().unwrap();
            let why = refused["why"].as_str().unwrap();
            if out.status.code() != Some(1) {
                problems.push(format!("exit {:?}, not 1 (refused)", out.status.code()));
            }
            for (what, text) in [
                ("layer digest", layer.as_str()),
                ("entry", entry),
                ("reason", why),
            ] {
                if !err.contains(text) {
                    problems.push(format!("the error does not name the {what} {text:?}"));
                }
            }
            if !problems.is_empty() {
                problems.push(format!("stderr: {}", err.trim_end()));
            }
            if fs::symlink_metadata(&root).is_ok() {
                problems.push("the target exists after a refused unpack".into());
            }
        } else if out.status.success() {
            let expected = expected_tree(&case["expect"]["tree"]);
            problems.extend(compare_trees(&root, &expected));
        } else {
            problems.push(format!(
                "refused, but the expected outcome is a tree: {}",
                stderr(&out).trim_end()
            ));
        }
        let after = arena_snapshot(&arena, &root);
        problems.extend(snapshot_changes(&before, &after));
        for p in problems {
            failures.push(format!("{name} ({}): {p}", runner.label));
        }
    }
    make_writable(&arena);
    assert!(
        failures.is_empty(),
        "{} problems in {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Empties the arena and puts the sentinels (from cases.json) back, owned by the runner.
fn reset_arena(arena: &Path, sentinels: &Value, runner: &Runner) {
    if arena.exists() {
        make_writable(arena);
        fs::remove_dir_all(arena).unwrap();
    }
    fs::create_dir(arena).unwrap();
    fs::set_permissions(arena, fs::Permissions::from_mode(0o755)).unwrap();
    runner.own(arena);
    for s in sentinels.as_array().unwrap() {
        let path = arena.join(s["path"].as_str().unwrap());
        match s["type"].as_str().unwrap() {
            "dir" => fs::create_dir(&path).unwrap(),
            "file" => fs::write(&path, s["content"].as_str().unwrap()).unwrap(),
            other => panic!("sentinel type {other}"),
        }
        let mode = u32::from_str_radix(s["mode"].as_str().unwrap(), 8).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        runner.own(&path);
    }
}

/// Makes every directory under `dir` writable by its owner, so it can be removed.
fn make_writable(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_dir() {
            let mode = entry.metadata().unwrap().mode();
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode | 0o700));
        }
    }
}

/// Everything in the arena except the root: type, permissions, owner, inode, link count,
/// size, mtime, ctime and contents (symlinks by target), so that a write, a chmod, a new
/// hardlink or a file created and removed again all show. The arena directory itself only by
/// type, permissions and owner (the unpacker makes and removes its temporary there).
fn arena_snapshot(arena: &Path, root: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let walk = walkdir::WalkDir::new(arena)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.path() != root);
    for entry in walk {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(arena)
            .unwrap()
            .display()
            .to_string();
        let meta = entry.path().symlink_metadata().unwrap();
        let kind = kind_of(&meta);
        let head = format!(
            "{kind} {:o} {}:{}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
        if rel.is_empty() {
            map.insert(".".into(), head);
            continue;
        }
        let body = match kind {
            "symlink" => format!("-> {}", fs::read_link(entry.path()).unwrap().display()),
            "file" => sha256_hex(&fs::read(entry.path()).unwrap()),
            _ => String::new(),
        };
        map.insert(
            rel,
            format!(
                "{head} ino {} nlink {} size {} mtime {}.{} ctime {}.{} {body}",
                meta.ino(),
                meta.nlink(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            ),
        );
    }
    map
}

fn snapshot_changes(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut changes = Vec::new();
    for (path, was) in before {
        match after.get(path) {
            None => changes.push(format!("beside the root: {path} removed (was {was})")),
            Some(now) if now != was => {
                changes.push(format!("beside the root: {path} changed: {was} => {now}"))
            }
            Some(_) => {}
        }
    }
    for (path, now) in after {
        if !before.contains_key(path) {
            changes.push(format!("beside the root: {path} appeared ({now})"));
        }
    }
    changes
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chardev"
    } else if ft.is_block_device() {
        "blockdev"
    } else {
        "other"
    }
}

/// One tree entry as cases.json describes it: its description (everything but `same_as`)
/// and the path it must share an inode with, if any.
struct Expected {
    facts: String,
    same_as: Option<String>,
}

fn describe(
    kind: &str,
    mode: Option<&str>,
    content: Option<&str>,
    target: Option<&str>,
    nlink: Option<u64>,
) -> String {
    let mut d = kind.to_string();
    if let Some(m) = mode {
        d += &format!(" mode {m}");
    }
    if let Some(n) = nlink {
        d += &format!(" nlink {n}");
    }
    if let Some(t) = target {
        d += &format!(" -> {t:?}");
    }
    if let Some(c) = content {
        d += &format!(" content {c:?}");
    }
    d
}

fn expected_tree(entries: &Value) -> BTreeMap<String, Expected> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().unwrap();
            (
                e["path"].as_str().unwrap().to_string(),
                Expected {
                    facts: describe(
                        kind,
                        e["mode"].as_str(),
                        e["content"].as_str(),
                        e["target"].as_str(),
                        e["nlink"].as_u64(),
                    ),
                    same_as: e["same_as"].as_str().map(str::to_string),
                },
            )
        })
        .collect()
}

/// The differences between the tree at `root` and `expected`, one line each.
fn compare_trees(root: &Path, expected: &BTreeMap<String, Expected>) -> Vec<String> {
    let mut actual: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return vec![format!("walking the root: {e}")],
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .display()
            .to_string();
        if rel.is_empty() {
            continue;
        }
        let meta = entry.path().symlink_metadata().unwrap();
        let kind = kind_of(&meta);
        let mode = format!("{:04o}", meta.mode() & 0o7777);
        let facts = match kind {
            "dir" => describe(kind, Some(&mode), None, None, None),
            "symlink" => {
                let target = fs::read_link(entry.path()).unwrap();
                describe(
                    kind,
                    None,
                    None,
                    Some(&target.display().to_string()),
                    Some(meta.nlink()),
                )
            }
            "file" => {
                let bytes = fs::read(entry.path()).unwrap();
                let content = String::from_utf8(bytes.clone())
                    .unwrap_or_else(|_| format!("(binary, sha256 {})", sha256_hex(&bytes)));
                describe(kind, Some(&mode), Some(&content), None, Some(meta.nlink()))
            }
            _ => describe(kind, Some(&mode), None, None, Some(meta.nlink())),
        };
        actual.insert(rel, (facts, meta.ino()));
    }
    let mut problems = Vec::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => problems.push(format!("missing {path}: want {}", want.facts)),
            Some((got, _)) if *got != want.facts => {
                problems.push(format!("{path}: got {got}, want {}", want.facts))
            }
            Some((_, ino)) => {
                if let Some(other) = &want.same_as
                    && actual.get(other).map(|(_, i)| i) != Some(ino)
                {
                    problems.push(format!("{path} is not a hardlink of {other}"));
                }
            }
        }
    }
    for (path, (got, _)) in &actual {
        if !expected.contains_key(path) {
            problems.push(format!("unexpected {path}: {got}"));
        }
    }
    problems
}
