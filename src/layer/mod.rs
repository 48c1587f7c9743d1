//! Layer writing: a directory tree → deterministic tar → compressor → blob, with the diffID
//! (sha256 of the tar) and the blob digest computed in the same streaming pass; and
//! decompression of layer blobs by media type.
//!
//! Determinism: entries sorted by name, mtime fixed at 1980-01-01T00:00:01Z, no user or group
//! names, owners from explicit rules. gzip goes through zlib-rs, whose output depends on how
//! writes are split, so a fixed-size chunker sits in front of it (crates.md §5).

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Digest, MediaType};

use crate::content::{Compression, HashingWriter};

pub mod cnb;

/// 1980-01-01T00:00:01Z, the mtime the CNB lifecycle gives every layer entry.
pub const NORMALIZED_MTIME: u64 = 315_532_801;
const GZIP_CHUNK: usize = 64 * 1024;

/// Owner rules: the longest rule whose path is the entry's path or one of its ancestors (by
/// whole components) gives the uid:gid; everything else is 0:0.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    rules: Vec<(PathBuf, u64, u64)>,
}

impl Ownership {
    pub fn add(&mut self, path: impl Into<PathBuf>, uid: u64, gid: u64) {
        self.rules.push((path.into(), uid, gid));
    }

    fn owner_of(&self, path: &Path) -> (u64, u64) {
        self.rules
            .iter()
            .filter(|(prefix, _, _)| path.starts_with(prefix))
            .max_by_key(|(prefix, _, _)| prefix.components().count())
            .map_or((0, 0), |&(_, uid, gid)| (uid, gid))
    }
}

/// The result of writing one layer.
#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub media_type: MediaType,
}

/// Writes the tree under `dir` as a layer into `out`: a deterministic tar, gzip-compressed.
/// Entry names are relative (`bin/sh`), directories carry their on-disk modes.
pub fn write_dir_layer<W: Write>(
    dir: &Path,
    owners: &Ownership,
    compression: LayerCompression,
    out: W,
) -> io::Result<(WrittenLayer, W)> {
    let mut tar = tar::Builder::new(LayerStream::new(out, compression)?);
    tar.follow_symlinks(false);
    // A file with several links is written once; later names become hardlink entries to the
    // first name in sorted order (deterministic: the order does not depend on the walk).
    let mut first_links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let walker = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .sort_by_file_name()
        .follow_links(false);
    for entry in walker {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(dir)
            .expect("walkdir yields paths under its root");
        append_entry(&mut tar, entry.path(), rel, owners, &mut first_links)?;
    }
    tar.into_inner()?.finish()
}

/// The stream a layer's tar is written into: hashed (the diffID), buffered in chunks for the
/// compressor, compressed, and hashed again (the blob digest), all in one pass.
pub(crate) struct LayerStream<W: Write> {
    tar: HashingWriter<BufWriter<Encoder<HashingWriter<W>>>>,
    compression: LayerCompression,
}

impl<W: Write> LayerStream<W> {
    pub(crate) fn new(out: W, compression: LayerCompression) -> io::Result<Self> {
        let encoder = Encoder::new(HashingWriter::new(out), compression)?;
        Ok(LayerStream {
            tar: HashingWriter::new(BufWriter::with_capacity(GZIP_CHUNK, encoder)),
            compression,
        })
    }

    /// Flushes the compressor; the layer's diffID, digest, size and media type, and `out`.
    pub(crate) fn finish(self) -> io::Result<(WrittenLayer, W)> {
        let (diff_id, _, buffered) = self.tar.finish();
        let encoder = buffered.into_inner().map_err(|e| e.into_error())?;
        let (digest, size, out) = encoder.finish()?.finish();
        let media_type = match self.compression.kind {
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
            Compression::None => MediaType::ImageLayer,
        };
        Ok((
            WrittenLayer {
                digest,
                size,
                diff_id,
                media_type,
            },
            out,
        ))
    }
}

impl<W: Write> Write for LayerStream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tar.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tar.flush()
    }
}

/// Writes several directory trees as layers at once, on up to `jobs` threads (each layer's
/// bytes are the same as [`write_dir_layer`] gives alone). Results come back in input order;
/// the first error, naming its directory, is returned once every thread has stopped.
pub fn write_dir_layers<W: Write + Send>(
    layers: Vec<(PathBuf, W)>,
    owners: &Ownership,
    compression: LayerCompression,
    jobs: usize,
) -> io::Result<Vec<(WrittenLayer, W)>> {
    let count = layers.len();
    let queue = std::sync::Mutex::new(layers.into_iter().enumerate());
    let results = std::sync::Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, count.max(1)) {
            scope.spawn(|| {
                loop {
                    let Some((position, (dir, out))) = queue.lock().unwrap().next() else {
                        return;
                    };
                    let result = write_dir_layer(&dir, owners, compression, out).map_err(|e| {
                        io::Error::new(e.kind(), format!("layer {}: {e}", dir.display()))
                    });
                    let failed = result.is_err();
                    results.lock().unwrap().push((position, result));
                    if failed {
                        return;
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(position, _)| *position);
    results.into_iter().map(|(_, result)| result).collect()
}

/// `--compression gzip[:LEVEL]|zstd[:LEVEL]|none`; gzip level 6 is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCompression {
    pub kind: Compression,
    pub level: i32,
}

impl LayerCompression {
    /// A plain tar: what a diffID is computed over, and what the lifecycle's cache keeps.
    pub const NONE: LayerCompression = LayerCompression {
        kind: Compression::None,
        level: 0,
    };
}

impl Default for LayerCompression {
    fn default() -> Self {
        LayerCompression {
            kind: Compression::Gzip,
            level: 6,
        }
    }
}

impl std::str::FromStr for LayerCompression {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, level) = match text.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (text, None),
        };
        let (kind, default, range) = match name {
            "gzip" => (Compression::Gzip, 6, 1..=9),
            "zstd" => (Compression::Zstd, 3, 1..=19),
            "none" if level.is_none() => (Compression::None, 0, 0..=0),
            _ => {
                return Err(format!(
                    "compression {text:?}: use gzip[:1-9], zstd[:1-19] or none"
                ));
            }
        };
        let level = match level {
            None => default,
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| range.contains(l))
                .ok_or_else(|| format!("compression {text:?}: level must be in {range:?}"))?,
        };
        Ok(LayerCompression { kind, level })
    }
}

/// The compressor in a layer pipeline. zstd always runs with at least one worker thread:
/// single-threaded mode gives different bytes, and 1, 2 or 4 workers give the same ones.
enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<Chunker<W>>),
    Zstd(zstd::Encoder<'static, W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    fn new(out: W, c: LayerCompression) -> io::Result<Self> {
        Ok(match c.kind {
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Chunker::new(out, GZIP_CHUNK),
                flate2::Compression::new(c.level as u32),
            )),
            Compression::Zstd => {
                let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
                Encoder::Zstd(zstd_encoder(out, c.level, workers as u32)?)
            }
            Compression::None => Encoder::None(out),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(g) => g.finish()?.finish(),
            Encoder::Zstd(z) => z.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

/// A multithreaded zstd encoder. Jobs of 2 MiB that overlap by a full window keep the peak
/// memory near 30 MB instead of libzstd's default of about 80 MB, at the same ratio and speed
/// (benches/unpack.sh; measured on a 214 MB tree of docs and Python: 72.26 MB vs 72.46 MB).
/// The bytes depend on these two settings but not on `workers` (at least 1).
fn zstd_encoder<W: Write>(
    out: W,
    level: i32,
    workers: u32,
) -> io::Result<zstd::Encoder<'static, W>> {
    use zstd::stream::raw::CParameter;
    let mut z = zstd::Encoder::new(out, level)?;
    z.multithread(workers.max(1))?;
    z.set_parameter(CParameter::JobSize(2 << 20))?;
    z.set_parameter(CParameter::OverlapSizeLog(9))?;
    Ok(z)
}

fn append_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
    owners: &Ownership,
    first_links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    let mut header = tar::Header::new_gnu();
    let (uid, gid) = owners.owner_of(&Path::new("/").join(rel));
    header.set_uid(uid);
    header.set_gid(gid);
    header.set_mtime(NORMALIZED_MTIME);
    header.set_mode(meta.mode() & 0o7777);
    let ft = meta.file_type();
    if ft.is_file() && meta.nlink() > 1 {
        match first_links.entry((meta.dev(), meta.ino())) {
            std::collections::hash_map::Entry::Occupied(first) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                return tar.append_link(&mut header, rel, first.get());
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(rel.to_path_buf());
            }
        }
    }
    if ft.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        let mut name = rel.to_path_buf().into_os_string();
        name.push("/");
        tar.append_data(&mut header, name, io::empty())
    } else if ft.is_symlink() {
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, rel, fs::read_link(path)?)
    } else if ft.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(meta.len());
        tar.append_data(&mut header, rel, fs::File::open(path)?)
    } else {
        Err(io::Error::other(format!(
            "{}: only files, directories and symlinks can go into a layer",
            path.display()
        )))
    }
}

/// Passes writes on in chunks of exactly `size` bytes (the last one shorter), so the encoder
/// behind it sees the same split whatever the writer in front does.
struct Chunker<W: Write> {
    inner: W,
    buf: Vec<u8>,
    size: usize,
}

impl<W: Write> Chunker<W> {
    fn new(inner: W, size: usize) -> Self {
        Chunker {
            inner,
            buf: Vec::with_capacity(size),
            size,
        }
    }

    fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
        }
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Chunker<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(self.size - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == self.size {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(take)
    }

    // Flushing must not emit a short chunk (that would change the split); bytes stay buffered
    // until `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader of the uncompressed tar inside a layer blob.
pub fn decompress<'a>(
    reader: impl Read + 'a,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::Decoder::new(reader)?),
    })
}

/// Guesses a stream's compression from its first bytes.
pub fn sniff_compression(head: &[u8]) -> Compression {
    match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Normalises a path inside an archive: drops `.` and leading `/`; `None` if it climbs out.
pub fn normalize_archive_path(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, mtime_offset: i64) {
        fs::create_dir_all(root.join("home/cnb/.config")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/tool"), vec![7u8; 300_000]).unwrap();
        fs::write(root.join("home/cnb/.config/x"), b"x").unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/alias")).unwrap();
        let t = filetime_now(mtime_offset);
        for p in ["bin/tool", "home/cnb/.config/x"] {
            let f = fs::File::options().write(true).open(root.join(p)).unwrap();
            f.set_modified(t).unwrap();
        }
    }

    fn filetime_now(offset: i64) -> std::time::SystemTime {
        std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs((1_700_000_000 + offset) as u64)
    }

    #[test]
    fn same_tree_same_digests_whatever_the_mtimes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path(), 0);
        tree(b.path(), 99_999);
        let mut owners = Ownership::default();
        owners.add("/home/cnb", 1000, 1000);
        let gzip = LayerCompression::default();
        let (la, bytes) = write_dir_layer(a.path(), &owners, gzip, Vec::new()).unwrap();
        let (lb, _) = write_dir_layer(b.path(), &owners, gzip, Vec::new()).unwrap();
        assert_eq!(
            (la.digest.clone(), la.diff_id.clone()),
            (lb.digest, lb.diff_id)
        );
        assert_eq!(la.size, bytes.len() as u64);

        let mut archive = tar::Archive::new(decompress(&bytes[..], Compression::Gzip).unwrap());
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            seen.push((
                e.path().unwrap().display().to_string(),
                h.uid().unwrap(),
                h.mtime().unwrap(),
            ));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin/",
                "bin/alias",
                "bin/tool",
                "home/",
                "home/cnb/",
                "home/cnb/.config/",
                "home/cnb/.config/x"
            ]
        );
        assert!(seen.iter().all(|s| s.2 == NORMALIZED_MTIME));
        assert_eq!(seen[3].1, 0);
        assert_eq!(seen[4].1, 1000);
        assert_eq!(seen[6].1, 1000);
    }

    #[test]
    fn zstd_layers_are_deterministic_and_share_the_diff_id() {
        let a = tempfile::tempdir().unwrap();
        tree(a.path(), 0);
        let owners = Ownership::default();
        let zstd: LayerCompression = "zstd:3".parse().unwrap();
        let (z1, bytes) = write_dir_layer(a.path(), &owners, zstd, Vec::new()).unwrap();
        let (z2, _) = write_dir_layer(a.path(), &owners, zstd, Vec::new()).unwrap();
        let (g, _) =
            write_dir_layer(a.path(), &owners, LayerCompression::default(), Vec::new()).unwrap();
        let (n, raw) =
            write_dir_layer(a.path(), &owners, "none".parse().unwrap(), Vec::new()).unwrap();
        assert_eq!(z1.digest, z2.digest);
        assert_eq!(z1.media_type, MediaType::ImageLayerZstd);
        assert_eq!(z1.diff_id, g.diff_id, "same tar whatever the compressor");
        assert_eq!(n.digest, n.diff_id);
        let mut tar = Vec::new();
        decompress(&bytes[..], Compression::Zstd)
            .unwrap()
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(tar, raw);
    }

    #[test]
    fn parallel_layers_equal_sequential_ones_in_input_order() {
        let trees: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
        for (i, t) in trees.iter().enumerate() {
            tree(t.path(), i as i64);
            fs::write(t.path().join("which"), i.to_string()).unwrap();
        }
        let owners = Ownership::default();
        for compression in ["gzip", "zstd"] {
            let compression: LayerCompression = compression.parse().unwrap();
            let alone: Vec<String> = trees
                .iter()
                .map(|t| {
                    let (l, _) =
                        write_dir_layer(t.path(), &owners, compression, io::sink()).unwrap();
                    l.digest.to_string()
                })
                .collect();
            let jobs: Vec<_> = trees
                .iter()
                .map(|t| (t.path().to_path_buf(), Vec::new()))
                .collect();
            let together = write_dir_layers(jobs, &owners, compression, 3).unwrap();
            let together: Vec<String> =
                together.iter().map(|(l, _)| l.digest.to_string()).collect();
            assert_eq!(alone, together);
            assert_eq!(
                alone.iter().collect::<std::collections::HashSet<_>>().len(),
                5
            );
        }
        let missing = trees[0].path().join("missing");
        let jobs = vec![
            (trees[1].path().to_path_buf(), io::sink()),
            (missing.clone(), io::sink()),
        ];
        let err = write_dir_layers(jobs, &owners, LayerCompression::default(), 2).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn zstd_bytes_do_not_depend_on_the_number_of_workers() {
        let mut data = Vec::new();
        let mut x: u32 = 1;
        while data.len() < 12 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.extend_from_slice(format!("line {} of {}\n", x % 1000, x >> 20).as_bytes());
        }
        let compressed: Vec<Vec<u8>> = [1, 2, 4]
            .iter()
            .map(|&workers| {
                let mut z = zstd_encoder(Vec::new(), 3, workers).unwrap();
                z.write_all(&data).unwrap();
                z.finish().unwrap()
            })
            .collect();
        assert_eq!(compressed[0], compressed[1]);
        assert_eq!(compressed[0], compressed[2]);
        assert_eq!(zstd::decode_all(&compressed[0][..]).unwrap(), data);
    }

    #[test]
    fn hardlinked_files_are_written_once_then_linked_to_the_first_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b"), b"shared").unwrap();
        fs::hard_link(dir.path().join("b"), dir.path().join("a")).unwrap();
        fs::hard_link(dir.path().join("b"), dir.path().join("c")).unwrap();
        let (_, tar_bytes) = write_dir_layer(
            dir.path(),
            &Ownership::default(),
            "none".parse().unwrap(),
            Vec::new(),
        )
        .unwrap();
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let entries: Vec<(String, tar::EntryType, Option<String>, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                    e.size(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("a".into(), tar::EntryType::Regular, None, 6),
                ("b".into(), tar::EntryType::Link, Some("a".into()), 0),
                ("c".into(), tar::EntryType::Link, Some("a".into()), 0),
            ]
        );
    }

    #[test]
    fn compression_flag_parsing() {
        assert_eq!(
            "gzip".parse::<LayerCompression>().unwrap(),
            LayerCompression::default()
        );
        assert_eq!("zstd:19".parse::<LayerCompression>().unwrap().level, 19);
        for bad in ["gzip:0", "gzip:x", "brotli", "none:1", "zstd:20"] {
            let err = bad.parse::<LayerCompression>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn ownership_rules_match_whole_components() {
        let mut owners = Ownership::default();
        owners.add("/home/cnb", 1000, 1000);
        owners.add("/home/cnb-run", 1001, 1000);
        assert_eq!(owners.owner_of(Path::new("/home/cnb-run/x")), (1001, 1000));
        assert_eq!(owners.owner_of(Path::new("/home/cnb/x")), (1000, 1000));
        assert_eq!(owners.owner_of(Path::new("/home")), (0, 0));
    }

    #[test]
    fn archive_paths_never_climb_out() {
        assert_eq!(
            normalize_archive_path(Path::new("./a/b/../c")).as_deref(),
            Some("a/c")
        );
        assert_eq!(
            normalize_archive_path(Path::new("/a")).as_deref(),
            Some("a")
        );
        assert_eq!(normalize_archive_path(Path::new("../etc/passwd")), None);
    }
}
