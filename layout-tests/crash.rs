//! kill -9 at arbitrary points of `lathe copy`: the destination layout must always be in the
//! old state or the new one, each complete and valid, never anything in between.
//!
//! The source is a single-platform image of four ~8 MB layers of random (incompressible)
//! bytes, so a copy takes long enough to be interrupted at many points. Each trial starts
//! lathe, sends SIGKILL after a delay spread over [0, 1.5 × the uninterrupted copy time] and
//! then checks the destination with oci-image-tool, lathe itself and an independent digest
//! check of every blob.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

const TRIALS: u64 = 30;
/// Kills are spread over [0, KILL_WINDOW × the uninterrupted copy time]. With 1.2 only a few
/// trials landed after the commit and timing noise could leave none; 1.5 puts about a third
/// of them there.
const KILL_WINDOW: f64 = 1.5;
const LAYERS: usize = 4;
const LAYER_BYTES: u64 = 8 << 20;

/// The two tests take turns, so that one's trials do not skew the other's timing.
static SERIAL: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------ source

/// A layout holding ref `big`, in a temporary directory removed when this is dropped.
struct BigSource {
    _tmp: tempfile::TempDir,
    layout: PathBuf,
}

impl BigSource {
    fn new() -> BigSource {
        let tmp = common::scratch();
        let mkimage = common::mkimage_bin();
        assert!(
            mkimage.exists(),
            "{} is missing: run `cargo build --examples`",
            mkimage.display()
        );
        let layout = tmp.path().join("big");
        let mut args = vec![
            "--output".to_string(),
            format!("oci:{}:big", layout.display()),
            "--image".into(),
            "linux/amd64".into(),
        ];
        let mut layer_dirs = Vec::new();
        for i in 0..LAYERS {
            let dir = tmp.path().join(format!("layer{i}"));
            fs::create_dir(&dir).unwrap();
            let mut random = fs::File::open("/dev/urandom").unwrap();
            let mut out = fs::File::create(dir.join("random.bin")).unwrap();
            let n = std::io::copy(&mut std::io::Read::take(&mut random, LAYER_BYTES), &mut out)
                .unwrap();
            assert_eq!(n, LAYER_BYTES);
            args.extend(["--layer".to_string(), dir.display().to_string()]);
            layer_dirs.push(dir);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::tool(mkimage.to_str().unwrap(), &args);
        for dir in layer_dirs {
            fs::remove_dir_all(dir).unwrap();
        }
        BigSource { _tmp: tmp, layout }
    }

    /// The arguments of `lathe copy` from here to ref `big` of `dest`.
    fn copy_args(&self, dest: &Path) -> [String; 3] {
        [
            "copy".into(),
            format!("oci:{}:big", self.layout.display()),
            format!("oci:{}:big", dest.display()),
        ]
    }
}

// ------------------------------------------------------------------ checks

fn blob_names(layout: &Path) -> BTreeSet<String> {
    fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn top_level_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Checks, independently of lathe, that every blob reachable from index.json is present with
/// the size and digest its descriptor gives; returns how many blobs were checked.
fn verify_every_reachable_blob(layout: &Path) -> usize {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut pending: Vec<Value> = index["manifests"].as_array().unwrap().clone();
    let mut seen = BTreeSet::new();
    while let Some(desc) = pending.pop() {
        let digest = desc["digest"].as_str().unwrap().to_string();
        if !seen.insert(digest.clone()) {
            continue;
        }
        let path = layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap());
        let bytes = fs::read(&path)
            .unwrap_or_else(|e| panic!("blob {digest} named in {}: {e}", layout.display()));
        assert_eq!(
            bytes.len() as u64,
            desc["size"].as_u64().unwrap(),
            "size of blob {digest}"
        );
        assert_eq!(
            format!("sha256:{}", common::sha256_hex(&bytes)),
            digest,
            "digest of blob {digest}"
        );
        match desc["mediaType"].as_str().unwrap() {
            "application/vnd.oci.image.index.v1+json" => {
                let child: Value = serde_json::from_slice(&bytes).unwrap();
                pending.extend(child["manifests"].as_array().unwrap().iter().cloned());
            }
            "application/vnd.oci.image.manifest.v1+json" => {
                let manifest: Value = serde_json::from_slice(&bytes).unwrap();
                pending.push(manifest["config"].clone());
                pending.extend(manifest["layers"].as_array().unwrap().iter().cloned());
            }
            _ => {}
        }
    }
    seen.len()
}

/// The whole-layout checks every surviving destination must pass.
fn assert_valid_layout(layout: &Path) {
    common::tool(
        "oci-image-tool",
        &["validate", "--type", "image", layout.to_str().unwrap()],
    );
    assert!(verify_every_reachable_blob(layout) > 0);
}

fn staging_dirs(layout: &Path) -> Vec<String> {
    top_level_names(layout)
        .into_iter()
        .filter(|n| n.starts_with(".lathe-staging-"))
        .collect()
}

/// `lathe gc` removes what killed writers left inside the layout, and leaves it valid with
/// exactly `blobs` and nothing but the layout's own files.
fn assert_gc_cleans_up(layout: &Path, blobs: &BTreeSet<String>) {
    common::lathe_ok(&["gc", &format!("oci:{}", layout.display())]);
    let expected: BTreeSet<String> = ["blobs", "index.json", "oci-layout"]
        .map(String::from)
        .into();
    assert_eq!(
        top_level_names(layout),
        expected,
        "gc left something behind in {}",
        layout.display()
    );
    assert_eq!(&blob_names(layout), blobs, "blobs after gc");
    assert_valid_layout(layout);
}

// ------------------------------------------------------------------ timing

/// Deterministic pseudo-random number in [0, 1) for `seed` (a 64-bit LCG, a few steps in).
fn lcg_unit(seed: u64) -> f64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0005_DEEC_E66D;
    for _ in 0..4 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay before the kill of trial `trial`: the trials split [0, KILL_WINDOW × duration]
/// into equal slots and each picks a pseudo-random point in its own, so the kills cover the
/// whole copy, its commit, and some time after it.
fn kill_delay(trial: u64, duration: Duration) -> Duration {
    let at = (trial as f64 + lcg_unit(trial)) / TRIALS as f64;
    duration.mul_f64(at * KILL_WINDOW)
}

/// Runs `lathe copy` into `dest` uninterrupted three times (each on a fresh destination made
/// by `prepare`), returns the median wall time and the index.json the copy writes.
fn measure(source: &BigSource, prepare: impl Fn(&Path)) -> (Duration, Vec<u8>) {
    let mut times = Vec::new();
    let mut index = None;
    for _ in 0..3 {
        let tmp = common::scratch();
        let dest = tmp.path().join("dest");
        prepare(&dest);
        let args = source.copy_args(&dest);
        let start = Instant::now();
        let out = Command::new(common::lathe_bin())
            .args(&args)
            .output()
            .unwrap();
        times.push(start.elapsed());
        assert!(
            out.status.success(),
            "uninterrupted copy failed: {}",
            common::stderr(&out)
        );
        let written = fs::read(dest.join("index.json")).unwrap();
        assert!(
            index.as_ref().is_none_or(|i| i == &written),
            "the same copy wrote different index.json files"
        );
        index = Some(written);
    }
    times.sort();
    (times[1], index.unwrap())
}

/// Starts `lathe copy` into `dest`, SIGKILLs it after `delay` and reaps it; returns whether it
/// had already finished successfully before the kill.
fn copy_and_kill(source: &BigSource, dest: &Path, delay: Duration) -> bool {
    let mut child = Command::new(common::lathe_bin())
        .args(source.copy_args(dest))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // The child is not reaped until wait(), so its pid cannot have been reused.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    child.wait().unwrap().success()
}

// ------------------------------------------------------------------- tests

#[test]
fn kill_9_during_copy_into_an_existing_layout_leaves_old_or_new_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = BigSource::new();
    let fixtures = common::fixtures();
    let old_index = fs::read(fixtures.join("index.json")).unwrap();
    let old_blobs = blob_names(fixtures);
    let new_blobs: BTreeSet<String> = old_blobs
        .union(&blob_names(&source.layout))
        .cloned()
        .collect();
    let (duration, new_index) = measure(&source, common::fixture_copy);
    println!("uninterrupted copy into an existing layout: {duration:?}");

    let (mut old_state, mut new_state, mut with_staging) = (0, 0, 0);
    for trial in 0..TRIALS {
        let tmp = common::scratch();
        let dest = tmp.path().join("dest");
        common::fixture_copy(&dest);
        let delay = kill_delay(trial, duration);
        let finished = copy_and_kill(&source, &dest, delay);

        assert_valid_layout(&dest);
        common::lathe_ok(&["inspect", &format!("oci:{}:run", dest.display())]);
        let other = tmp.path().join("other");
        common::lathe_ok(&[
            "copy",
            &format!("oci:{}:run", dest.display()),
            &format!("oci:{}:run", other.display()),
        ]);

        let big = common::lathe(&["inspect", &format!("oci:{}:big", dest.display())]);
        let index = fs::read(dest.join("index.json")).unwrap();
        let (state, blobs) = if big.status.success() {
            assert_eq!(
                index, new_index,
                "trial {trial}: `big` is there but index.json is not the copy's"
            );
            new_state += 1;
            ("new state", &new_blobs)
        } else {
            let err = common::stderr(&big);
            assert_eq!(big.status.code(), Some(1), "trial {trial}: {err}");
            assert!(
                err.contains("no image named \"big\""),
                "trial {trial}: inspect of big failed oddly: {err}"
            );
            assert!(
                !finished,
                "trial {trial}: lathe reported success but the image is not there"
            );
            assert_eq!(
                index, old_index,
                "trial {trial}: `big` is absent but index.json changed"
            );
            old_state += 1;
            ("old state", &old_blobs)
        };
        if !staging_dirs(&dest).is_empty() {
            with_staging += 1;
        }
        assert_gc_cleans_up(&dest, blobs);
        println!("trial {trial:2}: killed after {delay:?}: {state}");
    }
    println!(
        "{TRIALS} trials: {old_state} old state, {new_state} new state, {with_staging} left staging dirs (gc removed them)"
    );
    assert!(
        old_state > 0,
        "no kill landed before the commit; make the source bigger"
    );
    assert!(
        new_state > 0,
        "no kill landed after the commit; widen KILL_WINDOW"
    );
}

#[test]
fn kill_9_during_copy_into_a_new_layout_leaves_nothing_or_a_complete_layout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = BigSource::new();
    let new_blobs = blob_names(&source.layout);
    let (duration, new_index) = measure(&source, |_| {});
    println!("uninterrupted copy into a new layout: {duration:?}");

    let (mut absent, mut complete, mut leftovers) = (0, 0, 0);
    for trial in 0..TRIALS {
        let tmp = common::scratch();
        let parent = tmp.path().join("parent");
        fs::create_dir(&parent).unwrap();
        let dest = parent.join("dest");
        let delay = kill_delay(trial, duration);
        let finished = copy_and_kill(&source, &dest, delay);

        let state = if dest.exists() {
            assert_valid_layout(&dest);
            common::lathe_ok(&["inspect", &format!("oci:{}:big", dest.display())]);
            assert_eq!(
                fs::read(dest.join("index.json")).unwrap(),
                new_index,
                "trial {trial}: index.json"
            );
            complete += 1;
            "complete layout"
        } else {
            assert!(
                !finished,
                "trial {trial}: lathe reported success but the layout is not there"
            );
            absent += 1;
            "no layout"
        };
        // The staging directory of a writer killed while creating a layout lives beside it;
        // nothing else may appear there.
        let beside: Vec<String> = top_level_names(&parent)
            .into_iter()
            .filter(|n| n != "dest")
            .collect();
        for name in &beside {
            assert!(
                name.starts_with(".dest.lathe-new-"),
                "trial {trial}: unexpected {name} beside the layout"
            );
        }
        if !beside.is_empty() {
            leftovers += 1;
        }
        println!(
            "trial {trial:2}: killed after {delay:?}: {state}{}",
            if beside.is_empty() {
                ""
            } else {
                ", staging dir left beside it"
            }
        );

        // Running the copy again completes the layout, and gc then removes the leftovers.
        let out = Command::new(common::lathe_bin())
            .args(source.copy_args(&dest))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "trial {trial}: copy after the kill failed: {}",
            common::stderr(&out)
        );
        assert_gc_cleans_up(&dest, &new_blobs);
        assert_eq!(
            top_level_names(&parent),
            BTreeSet::from(["dest".to_string()]),
            "trial {trial}: gc left staging"
        );
    }
    println!(
        "{TRIALS} trials: {absent} no layout, {complete} complete layout, {leftovers} left a staging dir beside it"
    );
    assert!(
        absent > 0,
        "no kill landed before the commit; make the source bigger"
    );
    assert!(
        complete > 0,
        "no kill landed after the commit; widen KILL_WINDOW"
    );
}
