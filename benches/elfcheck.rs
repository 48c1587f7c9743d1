//! Benchmark (not a timed test) of the ELF layer check, `lathe::elfcheck`:
//!
//!     cargo bench --bench elfcheck [-- SOURCE [FILES]]
//!
//! Copies a sample of about FILES (default 20000) regular files of SOURCE (default /usr),
//! every n-th file in name order with the symlinks among them, to a tree on /dev/shm (each
//! file's first MiB: the check reads 64 bytes), then times over RUNS (default 5) runs each,
//! and prints the median:
//! - `check_tree` for linux/arm64 with 1, 2, 4 and 8 threads and the default;
//! - `find_elf` (stops at the first program);
//! - `check_tar` over an uncompressed tar of the same tree read from /dev/shm.
//!
//! `ELFCHECK_TREE=DIR` keeps the sample in DIR (made when missing; a DIR that exists, any
//! layer directory, is measured as it is).
//!
//! Wall times depend on what else the machine runs; files per CPU-second (user and system
//! time of all threads) much less so. Every run reads the same files from the page cache (tmpfs), as the check does right after
//! a build wrote the layer.

use std::io::BufReader;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lathe::elfcheck::{self, ScanOptions};
use lathe::platform::Platform;

const MAX_COPY: u64 = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let source = PathBuf::from(args.first().map_or("/usr", String::as_str));
    let wanted: usize = args.get(1).map_or(20_000, |n| n.parse().expect("FILES"));
    let runs: usize = std::env::var("RUNS").map_or(5, |r| r.parse().expect("RUNS"));
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let work = tempfile::Builder::new()
        .prefix("lathe-elfcheck-bench-")
        .tempdir_in(base)
        .unwrap();
    let (tree, files) = match std::env::var_os("ELFCHECK_TREE").map(PathBuf::from) {
        Some(tree) if tree.exists() => {
            let files = elfcheck::check_tree(&tree, &"linux/amd64".parse().unwrap())
                .unwrap()
                .files;
            println!("Tree: {} as it is; median of {runs} runs", tree.display());
            (tree, files)
        }
        kept => {
            let tree = kept.unwrap_or_else(|| work.path().join("tree"));
            let started = Instant::now();
            let (files, links, bytes) = copy_sample(&source, &tree, wanted);
            println!(
                "Tree: {files} regular files and {links} symlinks sampled from {} ({:.0} MB \
                 copied, at most 1 MiB each, in {:.1} s) to {}; median of {runs} runs",
                source.display(),
                bytes as f64 / 1e6,
                started.elapsed().as_secs_f64(),
                tree.display()
            );
            (tree, files)
        }
    };

    let arm64: Platform = "linux/arm64".parse().unwrap();
    let report = elfcheck::check_tree(&tree, &arm64).unwrap();
    println!(
        "  {} files, {} ELF programs, {} not for linux/arm64, {} malformed",
        report.files,
        report.programs,
        report.foreign.len(),
        report.malformed.len()
    );
    assert_eq!(report.files, files);

    let default = ScanOptions::default().threads;
    let mut thread_counts = vec![1, 2, 4, 8];
    if !thread_counts.contains(&default) {
        thread_counts.push(default);
    }
    println!("check_tree:");
    for threads in thread_counts {
        let (time, cpu) = median(runs, || {
            let r = elfcheck::check_tree_with(&tree, &arm64, ScanOptions { threads }).unwrap();
            assert_eq!(r.files, files);
        });
        let mark = if threads == default { " (default)" } else { "" };
        println!(
            "  {threads:>2} threads{mark:<10} {:>8.1} ms  {:>9.0} files/s  {:>9.0} files/CPU-s",
            time.as_secs_f64() * 1e3,
            files as f64 / time.as_secs_f64(),
            files as f64 / cpu.as_secs_f64()
        );
    }

    let mut first = None;
    let (time, _) = median(runs, || first = elfcheck::find_elf(&tree).unwrap());
    println!(
        "find_elf: {:.2} ms to {}",
        time.as_secs_f64() * 1e3,
        first.map_or("find none".to_string(), |p| format!("find {}", p.display()))
    );

    let tar_path = work.path().join("layer.tar");
    {
        let mut builder = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        builder.follow_symlinks(false);
        builder.append_dir_all("layer", &tree).unwrap();
        builder.finish().unwrap();
    }
    let tar_bytes = std::fs::metadata(&tar_path).unwrap().len();
    let (time, cpu) = median(runs, || {
        let file = BufReader::with_capacity(1 << 20, std::fs::File::open(&tar_path).unwrap());
        let r = elfcheck::check_tar(file, &arm64).unwrap();
        assert_eq!(r.files, files);
    });
    println!(
        "check_tar: {:.0} MB tar in {:.1} ms: {:.0} files/s, {:.0} files/CPU-s, {:.0} MB/s",
        tar_bytes as f64 / 1e6,
        time.as_secs_f64() * 1e3,
        files as f64 / time.as_secs_f64(),
        files as f64 / cpu.as_secs_f64(),
        tar_bytes as f64 / 1e6 / time.as_secs_f64()
    );
}

/// This process's CPU time so far (user and system, all threads).
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The median wall time and the median CPU time of `runs` calls of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let (mut wall, mut cpu): (Vec<Duration>, Vec<Duration>) = (0..runs.max(1))
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_time());
            f();
            (t.elapsed(), cpu_time() - c)
        })
        .unzip();
    wall.sort();
    cpu.sort();
    (wall[wall.len() / 2], cpu[cpu.len() / 2])
}

/// Copies every n-th regular file and symlink below `source` (one file system, name order,
/// n chosen to give about `wanted` files) to `dest`; returns the files, symlinks and bytes
/// copied.
fn copy_sample(source: &Path, dest: &Path, wanted: usize) -> (u64, u64, u64) {
    let device = std::fs::metadata(source).unwrap().dev();
    let walk = || {
        walkdir::WalkDir::new(source)
            .sort_by_file_name()
            .same_file_system(true)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| !e.file_type().is_dir())
    };
    let total = walk().filter(|e| e.file_type().is_file()).count();
    let every = (total / wanted.max(1)).max(1);
    let (mut files, mut links, mut bytes) = (0u64, 0u64, 0u64);
    std::fs::create_dir_all(dest).unwrap();
    for (n, entry) in walk().enumerate() {
        if n % every != 0 || (files as usize >= wanted && entry.file_type().is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(source).unwrap();
        let to = dest.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if entry.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path()).unwrap();
            std::os::unix::fs::symlink(target, &to).unwrap();
            links += 1;
        } else if entry.file_type().is_file() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != device {
                continue;
            }
            let Ok(file) = std::fs::File::open(entry.path()) else {
                continue;
            };
            let mut out = std::fs::File::create(&to).unwrap();
            bytes += std::io::copy(&mut std::io::Read::take(file, MAX_COPY), &mut out).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o777))
                .unwrap();
            files += 1;
        }
    }
    (files, links, bytes)
}
