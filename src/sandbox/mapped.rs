//! Work on the store's trees as root of a user namespace that maps the caller's subordinate
//! ids, for an unprivileged caller with ranges in /etc/subuid and /etc/subgid: unpacking an
//! image with its real owners, and removing or copying such a tree.
//!
//! Why: with a subordinate range the sandbox maps ids 0–65535 (the caller as root, the range
//! from 1), so the image user is a real id inside, and files must carry the image's owners
//! on disk for root-owned `/etc` to stay root's and the user's home to be the user's. The
//! caller cannot chown to its subordinate ids; root of a user namespace mapping them can. So
//! lathe re-executes itself (`lathe __sandbox-init` with [`TASK_ENV`] set: a single-threaded
//! process, which `unshare(CLONE_NEWUSER)` requires), the parent maps the new namespace with
//! `newuidmap`/`newgidmap`, and the helper unpacks as root there: the unpacker chowns every
//! entry (symlinks included) and applies setuid bits, as it does for root on a host. On disk
//! the files belong to the caller (the image's root) and to ids of its range; only root of
//! such a namespace (the sandbox, or this helper) may remove them, so pruning them goes
//! through here too. The helper reads nothing itself: it asks the parent for each blob and
//! the parent streams it from its source (a registry through the store's kept blobs, a
//! layout, an archive) over the socket, so progress, credentials and errors stay with the
//! parent.
//!
//! The alternatives, tried on this kind of machine (kernel 6.18): an idmapped bind mount of
//! a caller-owned tree (`mount_setattr(MOUNT_ATTR_IDMAP)`) would show owners without changing
//! the tree, but it needs CAP_SYS_ADMIN in the user namespace that owns the filesystem (the
//! host's, for tmpfs and ext4): `EPERM` for an unprivileged caller, with or without a
//! subordinate range (it works for host root only). overlayfs maps nothing, and
//! fuse-overlayfs (which shows owners from xattrs) is a daemon and a FUSE device lathe does
//! not want to need.
//!
//! Measured (release build, store on /dev/shm; an image of the fixture run image's layer plus
//! one of 20,000 files of 4 KiB in 200 directories, half of them the image user's; `lathe run
//! --store NEW IMAGE -- true`, median of 5): root (chown in process) 0.435 s; nobody, no range
//! (caller-owned, owners in xattrs) 0.424 s; `lathe-subid-test` through this helper 0.457 s.
//! The helper (a re-execution, newuidmap and newgidmap, the blobs over a socket) is within the
//! spread of those runs (±50 ms). A run on the stored tree: 31, 40 and 42 ms.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_spec::image::Descriptor;
use serde_json::Value;

use super::{SubordinateIds, spawn_init};
use crate::content::{self, VerifyingReader};
use crate::image::{ImageError, ImageSource};
use crate::progress::ByteProgress;

/// The environment variable that carries a [`Task`] into `lathe __sandbox-init`.
pub const TASK_ENV: &str = "LATHE_SANDBOX_TASK";

/// What the helper does as root of the mapped namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Task {
    /// Unpacks the image `manifest` into `target` with its owners (see [`crate::unpack`]);
    /// `describe` names the source in messages. The blobs come from the parent.
    Unpack {
        manifest: Box<Descriptor>,
        target: PathBuf,
        describe: String,
    },
    /// Removes a tree whatever (mapped) ids own its files.
    Remove { path: PathBuf },
    /// Copies a tree with its owners, modes and times (`cp -a`).
    Copy { from: PathBuf, to: PathBuf },
}

/// Messages from the helper, one JSON line each.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum FromHelper {
    Unshared,
    /// unshare(CLONE_NEWUSER) was refused.
    Refused(String),
    /// Send this blob's bytes, as frames.
    Blob(Box<Descriptor>),
    /// Unpacking reads this many bytes of layers.
    Start(u64),
    Done(Value),
    Failed(String),
}

/// What the parent sends once the maps are written.
const MAPPED: &[u8] = b"mapped\n";

/// A blob goes to the helper as frames: a big-endian u32 length and that many bytes; length
/// 0 ends the blob; [`ERROR_FRAME`] is followed by a length and a message, and ends it too.
const ERROR_FRAME: u32 = u32::MAX;
const FRAME: usize = 256 * 1024;

/// Runs `task` in a helper mapped with `ids` and returns what it reports; `source` gives the
/// blobs of an unpack, and `progress` counts their layer bytes.
pub fn run_task(
    lathe_exe: &Path,
    ids: &SubordinateIds,
    task: &Task,
    source: Option<&dyn ImageSource>,
    progress: &dyn ByteProgress,
) -> Result<Value, String> {
    let task_json = serde_json::to_string(task).expect("tasks serialize");
    let (mut child, ours) =
        spawn_init(lathe_exe, TASK_ENV, task_json).map_err(|e| e.to_string())?;
    let served = ours
        .try_clone()
        .map_err(|e| format!("socket: {e}"))
        .and_then(|reading| {
            serve(
                &mut BufReader::new(reading),
                &mut &ours,
                child.id(),
                ids,
                source,
                progress,
            )
        });
    drop(ours);
    if served.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the helper: {e}"))?;
    match served {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("the helper ended early ({status})")),
        Err(why) => Err(why),
    }
}

/// The parent's side: maps the helper, then answers its requests until it is done.
/// `Ok(None)` when the helper went away without a word.
fn serve(
    from: &mut impl BufRead,
    to: &mut impl Write,
    pid: u32,
    ids: &SubordinateIds,
    source: Option<&dyn ImageSource>,
    progress: &dyn ByteProgress,
) -> Result<Option<Value>, String> {
    match receive(from)? {
        Some(FromHelper::Unshared) => {}
        Some(FromHelper::Refused(why)) => {
            return Err(format!("a user namespace was refused: {why}"));
        }
        Some(FromHelper::Failed(why)) => return Err(why),
        Some(other) => return Err(format!("the helper said {other:?} first")),
        None => return Ok(None),
    }
    super::map_subordinate_ids(pid, ids)?;
    to.write_all(MAPPED)
        .map_err(|e| format!("helper channel: {e}"))?;
    let mut started = false;
    let result = loop {
        match receive(from)? {
            Some(FromHelper::Blob(desc)) => {
                send_blob(to, source, &desc, progress).map_err(|e| format!("helper: {e}"))?
            }
            Some(FromHelper::Start(total)) => {
                progress.start(total);
                started = true;
            }
            Some(FromHelper::Done(value)) => break Ok(Some(value)),
            Some(FromHelper::Failed(why)) => break Err(why),
            Some(other) => break Err(format!("the helper said {other:?} out of turn")),
            None => break Ok(None),
        }
    };
    if started {
        progress.finish();
    }
    result
}

fn receive(from: &mut impl BufRead) -> Result<Option<FromHelper>, String> {
    let mut line = String::new();
    match from.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| format!("the helper said {line:?}: {e}")),
        Err(e) => Err(format!("helper channel: {e}")),
    }
}

/// Streams `desc` from `source` as frames; a failure to read it is sent as an error frame
/// (the helper reports it); `Err` only when the channel itself fails.
fn send_blob(
    to: &mut impl Write,
    source: Option<&dyn ImageSource>,
    desc: &Descriptor,
    progress: &dyn ByteProgress,
) -> io::Result<()> {
    let counts = content::layer_compression(desc.media_type()).is_some();
    let mut reader = match source
        .ok_or_else(|| "no blobs to give for this task".to_string())
        .and_then(|s| s.open_blob(desc).map_err(|e| e.to_string()))
    {
        Ok(reader) => reader,
        Err(why) => return send_error(to, &why),
    };
    let mut buf = vec![0u8; FRAME];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return send_error(to, &e.to_string()),
        };
        to.write_all(&(n as u32).to_be_bytes())?;
        if n == 0 {
            return to.flush();
        }
        to.write_all(&buf[..n])?;
        if counts {
            progress.advance(n as u64);
        }
    }
}

fn send_error(to: &mut impl Write, why: &str) -> io::Result<()> {
    to.write_all(&ERROR_FRAME.to_be_bytes())?;
    to.write_all(&(why.len() as u32).to_be_bytes())?;
    to.write_all(why.as_bytes())?;
    to.flush()
}

/// Reads one blob's frames. Dropped before the end, it reads the rest, so the next blob's
/// frames start where they should.
struct FrameReader<R: Read> {
    from: R,
    /// Bytes left in the current frame.
    left: usize,
    done: bool,
}

impl<R: Read> FrameReader<R> {
    fn new(from: R) -> FrameReader<R> {
        FrameReader {
            from,
            left: 0,
            done: false,
        }
    }

    fn header(&mut self) -> io::Result<u32> {
        let mut word = [0u8; 4];
        self.from.read_exact(&mut word)?;
        Ok(u32::from_be_bytes(word))
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            match self.header()? {
                0 => {
                    self.done = true;
                    return Ok(0);
                }
                ERROR_FRAME => {
                    self.done = true;
                    let len = self.header()? as usize;
                    let mut why = vec![0u8; len];
                    self.from.read_exact(&mut why)?;
                    return Err(io::Error::other(String::from_utf8_lossy(&why).into_owned()));
                }
                n => self.left = n as usize,
            }
        }
        let want = buf.len().min(self.left);
        let n = self.from.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

impl<R: Read> Drop for FrameReader<R> {
    fn drop(&mut self) {
        let mut sink = vec![0u8; FRAME];
        while !self.done {
            if self.read(&mut sink).is_err() {
                break;
            }
        }
    }
}

/// The helper's image source: every blob is asked of the parent.
struct ParentSource {
    describe: String,
    root: Descriptor,
    channel: Mutex<UnixStream>,
}

impl ImageSource for ParentSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> Descriptor {
        self.root.clone()
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let failed = |e: io::Error| ImageError::Invalid {
            what: self.describe.clone(),
            why: format!("the helper's channel: {e}"),
        };
        send(&mut &*channel, &FromHelper::Blob(Box::new(desc.clone()))).map_err(failed)?;
        let frames = FrameReader::new(channel.try_clone().map_err(failed)?);
        Ok(Box::new(VerifyingReader::new(
            frames,
            desc,
            self.describe.clone(),
        )))
    }
}

/// Tells the parent how many layer bytes the unpack reads.
struct StartOnly<'a> {
    channel: &'a Mutex<UnixStream>,
}

impl ByteProgress for StartOnly<'_> {
    fn start(&self, total_bytes: u64) {
        let channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let _ = send(&mut &*channel, &FromHelper::Start(total_bytes));
    }
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

fn send(to: &mut impl Write, message: &FromHelper) -> io::Result<()> {
    let mut line = serde_json::to_string(message).expect("messages serialize");
    line.push('\n');
    to.write_all(line.as_bytes())
}

/// The helper: `lathe __sandbox-init` with [`TASK_ENV`] set, talking to the parent over
/// `channel`. Never returns.
pub fn task_init(channel: UnixStream) -> ! {
    let channel = Mutex::new(channel);
    let say = |message: &FromHelper| {
        let channel = channel.lock().unwrap_or_else(|e| e.into_inner());
        let _ = send(&mut &*channel, message);
    };
    let task: Task = match std::env::var(TASK_ENV)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(task) => task,
        Err(why) => {
            say(&FromHelper::Failed(format!("helper task: {why}")));
            std::process::exit(1)
        }
    };
    if let Err(errno) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
        say(&FromHelper::Refused(errno.desc().to_string()));
        std::process::exit(1)
    }
    say(&FromHelper::Unshared);
    let mut line = Vec::new();
    {
        let channel = channel.lock().unwrap_or_else(|e| e.into_inner());
        let mut byte = [0u8; 1];
        // Byte by byte: what follows the line belongs to the blobs.
        while !line.ends_with(b"\n") {
            match (&*channel).read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                _ => std::process::exit(1),
            }
        }
    }
    if line != MAPPED {
        std::process::exit(1)
    }
    let done = if crate::idmap::own_namespace_maps_image_ids() {
        perform(task, &channel)
    } else {
        Err(format!(
            "the helper's user namespace does not map ids 0-65535 (uid_map: {:?})",
            std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default()
        ))
    };
    match done {
        Ok(value) => {
            say(&FromHelper::Done(value));
            std::process::exit(0)
        }
        Err(why) => {
            say(&FromHelper::Failed(why));
            std::process::exit(1)
        }
    }
}

fn perform(task: Task, channel: &Mutex<UnixStream>) -> Result<Value, String> {
    match task {
        Task::Unpack {
            manifest,
            target,
            describe,
        } => {
            let source = ParentSource {
                describe,
                root: (*manifest).clone(),
                channel: Mutex::new(
                    channel
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .try_clone()
                        .map_err(|e| format!("socket: {e}"))?,
                ),
            };
            let report = crate::unpack::unpack(
                &source,
                &manifest,
                &target,
                &StartOnly {
                    channel: &source.channel,
                },
            )
            .map_err(|e| e.to_string())?;
            Ok(serde_json::json!({
                "warnings": report.warnings,
                "bytes": crate::store::tree_size(&target),
            }))
        }
        Task::Remove { path } => crate::layout::remove_tree(&path)
            .map(|()| Value::Null)
            .map_err(|e| format!("removing {}: {e}", path.display())),
        Task::Copy { from, to } => {
            let out = std::process::Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&from)
                .arg(&to)
                .output()
                .map_err(|e| format!("cp: {e}"))?;
            if out.status.success() {
                Ok(Value::Null)
            } else {
                Err(format!(
                    "copying {}: {}",
                    from.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(blobs: &[Result<&[u8], &str>]) -> Vec<u8> {
        let mut out = Vec::new();
        for blob in blobs {
            match blob {
                Ok(bytes) => {
                    for chunk in bytes.chunks(3) {
                        out.extend((chunk.len() as u32).to_be_bytes());
                        out.extend_from_slice(chunk);
                    }
                    out.extend(0u32.to_be_bytes());
                }
                Err(why) => send_error(&mut out, why).unwrap(),
            }
        }
        out
    }

    #[test]
    fn frames_carry_blobs_and_errors_one_after_the_other() {
        let stream = frames_of(&[Ok(b"hello world"), Err("the registry went away"), Ok(b"")]);
        let mut from = io::Cursor::new(stream);
        let mut first = String::new();
        FrameReader::new(&mut from)
            .read_to_string(&mut first)
            .unwrap();
        assert_eq!(first, "hello world");
        let err = FrameReader::new(&mut from)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.to_string(), "the registry went away");
        let mut third = Vec::new();
        FrameReader::new(&mut from).read_to_end(&mut third).unwrap();
        assert!(third.is_empty());
        assert_eq!(from.position() as usize, from.get_ref().len());
    }

    #[test]
    fn a_reader_dropped_early_skips_the_rest_of_its_blob() {
        let mut from = io::Cursor::new(frames_of(&[Ok(b"a long first blob"), Ok(b"second")]));
        let mut two = [0u8; 2];
        FrameReader::new(&mut from).read_exact(&mut two).unwrap();
        assert_eq!(&two, b"a ");
        let mut second = String::new();
        FrameReader::new(&mut from)
            .read_to_string(&mut second)
            .unwrap();
        assert_eq!(second, "second");
    }

    #[test]
    fn a_cut_stream_is_an_error_not_a_short_blob() {
        let mut stream = frames_of(&[Ok(b"abcdef")]);
        stream.truncate(6);
        let err = FrameReader::new(io::Cursor::new(stream))
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A source of in-memory blobs, or of an error.
    struct Blobs(Result<Vec<u8>, String>);

    impl ImageSource for Blobs {
        fn describe(&self) -> String {
            "test".into()
        }
        /// The (empty) blob itself: these tests only open blobs.
        fn root(&self) -> Descriptor {
            Descriptor::new(
                oci_spec::image::MediaType::ImageManifest,
                0,
                content::sha256_digest(b""),
            )
        }
        fn open_blob(&self, _: &Descriptor) -> Result<Box<dyn Read + Send + '_>, ImageError> {
            match &self.0 {
                Ok(bytes) => Ok(Box::new(io::Cursor::new(bytes.clone()))),
                Err(why) => Err(ImageError::Invalid {
                    what: "test".into(),
                    why: why.clone(),
                }),
            }
        }
    }

    #[test]
    fn the_parent_sends_what_the_source_gives_or_why_not() {
        let bytes = vec![9u8; FRAME + 10];
        let desc = Descriptor::new(
            oci_spec::image::MediaType::ImageLayerGzip,
            bytes.len() as u64,
            content::sha256_digest(&bytes),
        );
        let mut out = Vec::new();
        let source = Blobs(Ok(bytes.clone()));
        send_blob(&mut out, Some(&source), &desc, &crate::progress::NoProgress).unwrap();
        let source = Blobs(Err("no such blob".into()));
        send_blob(&mut out, Some(&source), &desc, &crate::progress::NoProgress).unwrap();
        send_blob(&mut out, None, &desc, &crate::progress::NoProgress).unwrap();
        let mut from = io::Cursor::new(out);
        let mut got = Vec::new();
        VerifyingReader::new(FrameReader::new(&mut from), &desc, "test")
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, bytes);
        let err = FrameReader::new(&mut from)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("no such blob"), "{err}");
        let err = FrameReader::new(&mut from)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("no blobs"), "{err}");
    }
}
