//! CNB mode of the layer writer: layer tars that are byte for byte what the reference lifecycle
//! writes for the same tree, so the diffIDs of lathe's exported layers equal those of
//! lifecycle-built images and layers can be reused across the two. This module owns the tar
//! entry conventions of the export phase (cnb-spec-digest §2.8) and a tar header encoder that
//! reproduces Go's `archive/tar` Writer; compression and the one-pass diffID/digest come from
//! the parent module's pipeline, as for [`super::write_dir_layer`].
//!
//! What the lifecycle does (buildpacks/lifecycle `layers/dir.go` DirLayer, `layers/factory.go`
//! parents and writeLayer, `layers/writer.go` tarWriter, `layers/launcher.go` LauncherLayer and
//! ProcessTypesLayer, `archive/write.go` AddDirToArchive and AddFileToArchive,
//! `archive/writer.go` NormalizingTarWriter):
//! - A directory layer (buildpack layers, the SBOM layer, the launcher-config layer) first holds
//!   every ancestor of the layer directory except `/`, outermost first, `os.Stat`ed (symlinks
//!   followed) with its on-disk mode, uid and gid; then the layer directory itself and
//!   everything under it in `filepath.Walk` order (lstat, names sorted bytewise within each
//!   directory, pre-order, symlinks not followed), uid/gid forced to the CNB user and group.
//!   Sockets are skipped. Hardlinks are not detected: every link is a regular file with its
//!   contents. Symlink targets are kept verbatim.
//! - Headers come from `tar.FileInfoHeader`: mode = permission bits plus setuid, setgid and
//!   sticky (never file-type bits), size for regular files only, device numbers for device
//!   nodes only. Name is then set to the absolute path, which drops the trailing `/` that
//!   FileInfoHeader gives directories. Every header gets ModTime 1980-01-01T00:00:01Z and empty
//!   Uname/Gname. FileInfoHeader also sets atime and ctime, but the writer drops both because no
//!   Format is requested, so they never force PAX.
//! - Launcher layer: `/cnb` and `/cnb/lifecycle` (directories 0755, 0:0), then
//!   `/cnb/lifecycle/launcher` (regular, 0755, 0:0, size from `os.Stat`). Process-types layer:
//!   `/cnb`, `/cnb/process` (0755, 0:0), then per process, in the order given, a symlink
//!   `/cnb/process/<type>` → `/cnb/lifecycle/launcher` with mode 0755.
//!
//! What Go's Writer makes of those headers (golang/go `src/archive/tar/writer.go`,
//! `common.go` allowedFormats, `format.go`, `strconv.go`):
//! - USTAR whenever it can hold every field: the name ASCII and at most 100 bytes, or split at a
//!   `/` (not the first byte) into a prefix of at most 155 and a name of at most 100 bytes, the
//!   split point being the last `/` within the first 156 bytes; the link target ASCII and at
//!   most 100 bytes; uid and gid below 8^7; size below 8^11. Otherwise PAX. GNU would only be
//!   chosen for a mode or device number too large for octal, which cannot happen here (modes
//!   are at most 07777; Linux majors and minors fit in 21 bits).
//! - Numeric fields are octal, zero-padded to the field width less one, then NUL
//!   (`0000755\0`, mtime `02263523001\0`); devmajor and devminor are written as `0000000\0` even
//!   for files; uname and gname stay all NUL. Magic `ustar\0`, version `00`. The checksum is six
//!   octal digits, NUL, space.
//! - PAX: an extended header of type `x` named `<dir>/PaxHeaders.0/<base>` (ASCII bytes only,
//!   cut to 100 bytes) whose mode, uid, gid and mtime fields are zeros and whose device fields
//!   are left NUL, carrying records `"<len> <key>=<value>\n"` sorted by key: `path` when the name
//!   is non-ASCII or longer than 100 bytes (even if it could be split), `linkpath` likewise,
//!   `uid`/`gid`/`size` when they overflow. The main header that follows has no prefix, the
//!   name's ASCII bytes cut to 100 (a cut ending in `/` is NUL-terminated before its trailing
//!   slashes), and 0 in any numeric field that overflowed.
//! - File data is padded to 512 bytes; `Close` writes two zero blocks and nothing else (no
//!   padding to a 10 KiB record).
//!
//! Why not the `tar` crate: its USTAR headers leave devmajor/devminor as NUL bytes where Go
//! writes `0000000\0`, and its Builder spills long names and targets into GNU `././@LongLink`
//! entries where Go splits into the prefix field or writes a PAX `PaxHeaders.0` header. Every
//! byte matters for the diffID, so the encoder here is written out against Go's rules.

use std::fs::{self, File, Metadata};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{LayerCompression, LayerStream, NORMALIZED_MTIME, WrittenLayer};

const BLOCK: usize = 512;
const NAME_FIELD: usize = 100;
const PREFIX_FIELD: usize = 155;
/// Go refuses PAX record data larger than this (`maxSpecialFileSize`).
const MAX_PAX_DATA: usize = 1 << 20;
const COPY_BUFFER: usize = 256 * 1024;

/// Where the lifecycle puts the launcher in every app image.
pub const LAUNCHER_PATH: &str = "/cnb/lifecycle/launcher";
const PROCESS_DIR: &str = "/cnb/process";
/// Characters the lifecycle refuses in a process type (`validateProcessType`).
const FORBIDDEN_IN_PROCESS_TYPE: &str = "/><:|&\\";

/// The uid and gid written into an entry's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u64,
    pub gid: u64,
}

impl Owner {
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };

    fn of(meta: &Metadata) -> Owner {
        Owner {
            uid: meta.uid().into(),
            gid: meta.gid().into(),
        }
    }
}

/// Writes one layer with the lifecycle's tar conventions into a compressor, computing the
/// diffID and the blob digest as the bytes stream through. Entries go into the tar in the order
/// the `add_*` calls make them; [`CnbLayerWriter::finish`] ends the archive.
///
/// Image paths are absolute and clean (`/layers/bp/layer`: no `.`, `..`, empty components or
/// trailing slash); anything else is refused with `InvalidInput`.
pub struct CnbLayerWriter<W: Write> {
    tar: LayerStream<W>,
    header: Vec<u8>,
    copy_buffer: Vec<u8>,
}

impl<W: Write> CnbLayerWriter<W> {
    pub fn new(out: W, compression: LayerCompression) -> io::Result<Self> {
        Ok(CnbLayerWriter {
            tar: LayerStream::new(out, compression)?,
            header: Vec::with_capacity(4 * BLOCK),
            copy_buffer: vec![0; COPY_BUFFER],
        })
    }

    /// The lifecycle's directory layer: [`Self::add_parents_from_disk`] then [`Self::add_tree`].
    pub fn add_dir_layer(
        &mut self,
        source: &Path,
        image_path: &str,
        owner: Owner,
    ) -> io::Result<()> {
        self.add_parents_from_disk(source, image_path)?;
        self.add_tree(source, image_path, owner)
    }

    /// One directory entry per ancestor of `image_path` except `/`, outermost first. Each takes
    /// the mode, uid and gid of the matching ancestor of `source` on disk (symlinks followed):
    /// `/layers/bp/layer` from `<dir>/layers/bp/layer` gives `/layers` with the metadata of
    /// `<dir>/layers` and `/layers/bp` with that of `<dir>/layers/bp`.
    pub fn add_parents_from_disk(&mut self, source: &Path, image_path: &str) -> io::Result<()> {
        let image_path = check_image_path(image_path)?;
        let image_parents: Vec<&[u8]> = image_path
            .iter()
            .enumerate()
            .skip(1)
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| &image_path[..i])
            .collect();
        let mut on_disk = std::path::absolute(source)?;
        let mut parents = Vec::with_capacity(image_parents.len());
        for image_parent in image_parents.iter().rev() {
            on_disk = match on_disk.parent() {
                Some(parent) => parent.to_path_buf(),
                None => {
                    return Err(io::Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "{}: too few ancestors on disk for the image path {}",
                            source.display(),
                            String::from_utf8_lossy(image_path)
                        ),
                    ));
                }
            };
            let meta = fs::metadata(&on_disk).map_err(|e| with_path(e, &on_disk))?;
            parents.push((*image_parent, on_disk.clone(), meta));
        }
        for (name, path, meta) in parents.into_iter().rev() {
            let owner = Owner::of(&meta);
            self.add_from_disk(&path, name, &meta, owner)?;
        }
        Ok(())
    }

    /// `source` and everything under it, named from `image_path` down, every entry owned by
    /// `owner`, in `filepath.Walk` order. `source` itself is not followed if it is a symlink.
    pub fn add_tree(&mut self, source: &Path, image_path: &str, owner: Owner) -> io::Result<()> {
        let mut name = check_image_path(image_path)?.to_vec();
        let meta = fs::symlink_metadata(source).map_err(|e| with_path(e, source))?;
        self.walk(source.to_path_buf(), &mut name, meta, owner)
    }

    pub fn add_dir(&mut self, image_path: &str, mode: u32, owner: Owner) -> io::Result<()> {
        let name = check_image_path(image_path)?;
        let entry = Entry {
            name,
            kind: Kind::Directory,
            mode: check_mode(mode)?,
            owner,
        };
        self.write_header(&entry)
    }

    pub fn add_file(
        &mut self,
        image_path: &str,
        mode: u32,
        owner: Owner,
        contents: &[u8],
    ) -> io::Result<()> {
        let name = check_image_path(image_path)?;
        let entry = Entry {
            name,
            kind: Kind::Regular {
                size: contents.len() as u64,
            },
            mode: check_mode(mode)?,
            owner,
        };
        self.write_header(&entry)?;
        self.tar.write_all(contents)?;
        self.pad(contents.len() as u64)
    }

    /// A regular file with the contents of `source` (symlinks followed) and the given mode and
    /// owner, as the lifecycle writes the launcher.
    pub fn add_file_from_path(
        &mut self,
        image_path: &str,
        mode: u32,
        owner: Owner,
        source: &Path,
    ) -> io::Result<()> {
        let name = check_image_path(image_path)?;
        let mode = check_mode(mode)?;
        let meta = fs::metadata(source).map_err(|e| with_path(e, source))?;
        if !meta.is_file() {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("{}: not a regular file", source.display()),
            ));
        }
        let entry = Entry {
            name,
            kind: Kind::Regular { size: meta.len() },
            mode,
            owner,
        };
        self.write_header(&entry)?;
        self.copy_contents(source, meta.len())
    }

    pub fn add_symlink(
        &mut self,
        image_path: &str,
        target: &str,
        mode: u32,
        owner: Owner,
    ) -> io::Result<()> {
        let name = check_image_path(image_path)?;
        let entry = Entry {
            name,
            kind: Kind::Symlink {
                target: target.as_bytes(),
            },
            mode: check_mode(mode)?,
            owner,
        };
        self.write_header(&entry)
    }

    /// The lifecycle's launcher layer entries with the launcher given as bytes (lathe's own
    /// is embedded): the same tar as [`write_launcher_layer`] of a file holding them.
    pub fn add_launcher(&mut self, launcher: &[u8]) -> io::Result<()> {
        self.add_dir("/cnb", 0o755, Owner::ROOT)?;
        self.add_dir("/cnb/lifecycle", 0o755, Owner::ROOT)?;
        self.add_file(LAUNCHER_PATH, 0o755, Owner::ROOT, launcher)
    }

    /// The entries of the lifecycle's `ProcessTypesLayer` (see [`write_process_types_layer`]).
    pub fn add_process_type_entries(&mut self, process_types: &[&str]) -> io::Result<()> {
        for process_type in process_types {
            if process_type.is_empty()
                || process_type.contains(|c| FORBIDDEN_IN_PROCESS_TYPE.contains(c))
            {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "invalid process type {process_type:?}: it must be non-empty and may not contain any of {FORBIDDEN_IN_PROCESS_TYPE}"
                    ),
                ));
            }
        }
        self.add_dir("/cnb", 0o755, Owner::ROOT)?;
        self.add_dir(PROCESS_DIR, 0o755, Owner::ROOT)?;
        for process_type in process_types {
            let link = format!("{PROCESS_DIR}/{process_type}");
            self.add_symlink(&link, LAUNCHER_PATH, 0o755, Owner::ROOT)?;
        }
        Ok(())
    }

    /// Ends the archive (two zero blocks, as Go's `Close`), flushes the compressor and returns
    /// the layer's diffID, digest, size and media type with the output.
    pub fn finish(mut self) -> io::Result<(WrittenLayer, W)> {
        self.tar.write_all(&[0; 2 * BLOCK])?;
        self.tar.finish()
    }

    /// Writes `path` (already lstat'ed as `meta`) under `name`, then its children in Go's
    /// `filepath.Walk` order. `name` is a scratch buffer that is left as it was found.
    fn walk(
        &mut self,
        path: PathBuf,
        name: &mut Vec<u8>,
        meta: Metadata,
        owner: Owner,
    ) -> io::Result<()> {
        if meta.file_type().is_socket() {
            return Ok(());
        }
        self.add_from_disk(&path, name, &meta, owner)?;
        if !meta.is_dir() {
            return Ok(());
        }
        let mut children = fs::read_dir(&path)
            .map_err(|e| with_path(e, &path))?
            .map(|child| child.map(|c| c.file_name()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| with_path(e, &path))?;
        children.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for child in children {
            let child_path = path.join(&child);
            let child_meta =
                fs::symlink_metadata(&child_path).map_err(|e| with_path(e, &child_path))?;
            let parent_len = name.len();
            name.push(b'/');
            name.extend_from_slice(child.as_bytes());
            self.walk(child_path, name, child_meta, owner)?;
            name.truncate(parent_len);
        }
        Ok(())
    }

    /// The entry `tar.FileInfoHeader` would make from `meta`, named `name` and owned by `owner`,
    /// with the file's contents if it is a regular file. Sockets are skipped.
    fn add_from_disk(
        &mut self,
        path: &Path,
        name: &[u8],
        meta: &Metadata,
        owner: Owner,
    ) -> io::Result<()> {
        let file_type = meta.file_type();
        let target;
        let kind = if file_type.is_file() {
            Kind::Regular { size: meta.len() }
        } else if file_type.is_dir() {
            Kind::Directory
        } else if file_type.is_symlink() {
            target = fs::read_link(path).map_err(|e| with_path(e, path))?;
            Kind::Symlink {
                target: target.as_os_str().as_bytes(),
            }
        } else if file_type.is_fifo() {
            Kind::Fifo
        } else if file_type.is_char_device() {
            let (major, minor) = device_numbers(meta.rdev());
            Kind::CharDevice { major, minor }
        } else if file_type.is_block_device() {
            let (major, minor) = device_numbers(meta.rdev());
            Kind::BlockDevice { major, minor }
        } else {
            return Ok(());
        };
        let entry = Entry {
            name,
            kind,
            mode: meta.mode() & 0o7777,
            owner,
        };
        self.write_header(&entry)?;
        match entry.kind {
            Kind::Regular { size } => self.copy_contents(path, size),
            _ => Ok(()),
        }
    }

    fn write_header(&mut self, entry: &Entry) -> io::Result<()> {
        self.header.clear();
        encode_header(entry, &mut self.header)?;
        self.tar.write_all(&self.header)
    }

    /// Copies exactly `size` bytes of the file at `path`: a file that shrank or grew since it
    /// was stat'ed is an error, as it is for the lifecycle (Go's "missed writing" and
    /// `ErrWriteTooLong`).
    fn copy_contents(&mut self, path: &Path, size: u64) -> io::Result<()> {
        let mut file = File::open(path).map_err(|e| with_path(e, path))?;
        let mut remaining = size;
        while remaining > 0 {
            let want = remaining.min(self.copy_buffer.len() as u64) as usize;
            let read = match file.read(&mut self.copy_buffer[..want]) {
                Ok(0) => {
                    return Err(io::Error::other(format!(
                        "{}: file shrank while being archived ({} of {size} bytes read)",
                        path.display(),
                        size - remaining
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(with_path(e, path)),
            };
            self.tar.write_all(&self.copy_buffer[..read])?;
            remaining -= read as u64;
        }
        let mut probe = [0u8; 1];
        if file.read(&mut probe).map_err(|e| with_path(e, path))? != 0 {
            return Err(io::Error::other(format!(
                "{}: file grew past its {size} bytes while being archived",
                path.display()
            )));
        }
        self.pad(size)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let padding = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        self.tar.write_all(&[0; BLOCK][..padding])
    }
}

/// The lifecycle's `DirLayer`: the tree at `source` placed at `image_path`, its parents first
/// with their on-disk metadata, the tree itself owned by `owner`.
pub fn write_cnb_dir_layer<W: Write>(
    source: &Path,
    image_path: &str,
    owner: Owner,
    compression: LayerCompression,
    out: W,
) -> io::Result<(WrittenLayer, W)> {
    let mut writer = CnbLayerWriter::new(out, compression)?;
    writer.add_dir_layer(source, image_path, owner)?;
    writer.finish()
}

/// The lifecycle's `LauncherLayer`: `/cnb`, `/cnb/lifecycle` and the launcher binary at
/// [`LAUNCHER_PATH`], all root-owned and 0755.
pub fn write_launcher_layer<W: Write>(
    launcher: &Path,
    compression: LayerCompression,
    out: W,
) -> io::Result<(WrittenLayer, W)> {
    let bytes = fs::read(launcher).map_err(|e| with_path(e, launcher))?;
    let mut writer = CnbLayerWriter::new(out, compression)?;
    writer.add_launcher(&bytes)?;
    writer.finish()
}

/// The lifecycle's `ProcessTypesLayer`: `/cnb`, `/cnb/process` and one symlink to the launcher
/// per process type, in the order given. Types that the lifecycle refuses (empty, or holding
/// one of `/><:|&\`) are refused here too.
pub fn write_process_types_layer<W: Write>(
    process_types: &[&str],
    compression: LayerCompression,
    out: W,
) -> io::Result<(WrittenLayer, W)> {
    let mut writer = CnbLayerWriter::new(out, compression)?;
    writer.add_process_type_entries(process_types)?;
    writer.finish()
}

/// One tar entry as Go's `tar.Header` would describe it after the lifecycle's normalisation.
struct Entry<'a> {
    name: &'a [u8],
    kind: Kind<'a>,
    /// Permission bits plus setuid, setgid and sticky; never above 07777.
    mode: u32,
    owner: Owner,
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    Regular { size: u64 },
    Directory,
    Symlink { target: &'a [u8] },
    Fifo,
    CharDevice { major: u64, minor: u64 },
    BlockDevice { major: u64, minor: u64 },
}

impl Kind<'_> {
    fn typeflag(self) -> u8 {
        match self {
            Kind::Regular { .. } => b'0',
            Kind::Symlink { .. } => b'2',
            Kind::CharDevice { .. } => b'3',
            Kind::BlockDevice { .. } => b'4',
            Kind::Directory => b'5',
            Kind::Fifo => b'6',
        }
    }
}

/// Field offsets and widths of a USTAR header block.
mod field {
    pub const NAME: (usize, usize) = (0, 100);
    pub const MODE: (usize, usize) = (100, 8);
    pub const UID: (usize, usize) = (108, 8);
    pub const GID: (usize, usize) = (116, 8);
    pub const SIZE: (usize, usize) = (124, 12);
    pub const MTIME: (usize, usize) = (136, 12);
    pub const CHECKSUM: (usize, usize) = (148, 8);
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: (usize, usize) = (157, 100);
    pub const MAGIC: (usize, usize) = (257, 6);
    pub const VERSION: (usize, usize) = (263, 2);
    pub const DEVMAJOR: (usize, usize) = (329, 8);
    pub const DEVMINOR: (usize, usize) = (337, 8);
    pub const PREFIX: (usize, usize) = (345, 155);
}

fn slot(block: &mut [u8; BLOCK], (offset, len): (usize, usize)) -> &mut [u8] {
    &mut block[offset..offset + len]
}

/// Appends the header block(s) Go's `Writer.WriteHeader` writes for `entry`: one USTAR block,
/// or a PAX extended header with its records followed by the main block.
fn encode_header(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    let target: &[u8] = match entry.kind {
        Kind::Symlink { target } => target,
        _ => b"",
    };
    if entry.name.contains(&0) || target.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: a NUL byte cannot go into a tar header",
                String::from_utf8_lossy(entry.name)
            ),
        ));
    }
    let size = match entry.kind {
        Kind::Regular { size } => size,
        _ => 0,
    };
    let (major, minor) = match entry.kind {
        Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => (major, minor),
        _ => (0, 0),
    };
    debug_assert!(entry.mode <= 0o7777 && fits_octal(8, major) && fits_octal(8, minor));

    let mut records: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut ustar = true;
    if !is_ascii(entry.name) || entry.name.len() > NAME_FIELD {
        ustar &= split_ustar_path(entry.name).is_some();
        records.push(("path", entry.name.to_vec()));
    }
    if !is_ascii(target) || target.len() > NAME_FIELD {
        ustar = false;
        records.push(("linkpath", target.to_vec()));
    }
    for (key, value, width) in [
        ("uid", entry.owner.uid, field::UID.1),
        ("gid", entry.owner.gid, field::GID.1),
        ("size", size, field::SIZE.1),
    ] {
        if !fits_octal(width, value) {
            ustar = false;
            records.push((key, value.to_string().into_bytes()));
        }
    }

    let mut block = [0u8; BLOCK];
    if ustar {
        match split_ustar_path(entry.name) {
            Some((prefix, name)) => {
                format_string(slot(&mut block, field::NAME), name);
                format_string(slot(&mut block, field::PREFIX), prefix);
            }
            None => format_string(slot(&mut block, field::NAME), entry.name),
        }
        format_string(slot(&mut block, field::LINKNAME), target);
    } else {
        records.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut data = Vec::new();
        for (key, value) in &records {
            push_pax_record(&mut data, key, value);
        }
        if data.len() > MAX_PAX_DATA {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: PAX records too large",
                    String::from_utf8_lossy(entry.name)
                ),
            ));
        }
        write_pax_extended_header(entry.name, &data, out);
        format_string(slot(&mut block, field::NAME), &to_ascii(entry.name));
        format_string(slot(&mut block, field::LINKNAME), &to_ascii(target));
    }
    block[field::TYPEFLAG] = entry.kind.typeflag();
    format_octal(slot(&mut block, field::MODE), entry.mode.into());
    format_octal(slot(&mut block, field::UID), entry.owner.uid);
    format_octal(slot(&mut block, field::GID), entry.owner.gid);
    format_octal(slot(&mut block, field::SIZE), size);
    format_octal(slot(&mut block, field::MTIME), NORMALIZED_MTIME);
    format_octal(slot(&mut block, field::DEVMAJOR), major);
    format_octal(slot(&mut block, field::DEVMINOR), minor);
    set_ustar_magic_and_checksum(&mut block);
    out.extend_from_slice(&block);
    Ok(())
}

/// Go's `writeRawFile` for a PAX `x` header: a minimal block (zero mode, owner and mtime, device
/// fields left NUL) followed by the record data, padded to a block.
fn write_pax_extended_header(name: &[u8], data: &[u8], out: &mut Vec<u8>) {
    // Go: path.Join(path.Split(name)…). The names reaching here are clean absolute paths, for
    // which Join's cleaning only removes the doubled slash after the directory part.
    let base_start = name.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    let mut header_name = name[..base_start].to_vec();
    header_name.extend_from_slice(b"PaxHeaders.0/");
    header_name.extend_from_slice(&name[base_start..]);
    let mut header_name = to_ascii(&header_name);
    header_name.truncate(NAME_FIELD);
    while header_name.last() == Some(&b'/') {
        header_name.pop();
    }

    let mut block = [0u8; BLOCK];
    block[field::TYPEFLAG] = b'x';
    format_string(slot(&mut block, field::NAME), &header_name);
    format_octal(slot(&mut block, field::MODE), 0);
    format_octal(slot(&mut block, field::UID), 0);
    format_octal(slot(&mut block, field::GID), 0);
    format_octal(slot(&mut block, field::SIZE), data.len() as u64);
    format_octal(slot(&mut block, field::MTIME), 0);
    set_ustar_magic_and_checksum(&mut block);
    out.extend_from_slice(&block);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(BLOCK), 0);
}

/// `"<len> <key>=<value>\n"`, where `<len>` counts the whole record including its own digits.
fn push_pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let without_length = key.len() + value.len() + 3;
    let mut length = without_length + decimal_digits(without_length);
    if without_length + decimal_digits(length) != length {
        length = without_length + decimal_digits(length);
    }
    out.extend_from_slice(length.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn decimal_digits(n: usize) -> usize {
    n.to_string().len()
}

fn set_ustar_magic_and_checksum(block: &mut [u8; BLOCK]) {
    slot(block, field::MAGIC).copy_from_slice(b"ustar\0");
    slot(block, field::VERSION).copy_from_slice(b"00");
    let (offset, len) = field::CHECKSUM;
    let checksum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (offset..offset + len).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    format_octal(&mut block[offset..offset + 7], checksum);
    block[offset + 7] = b' ';
}

/// Go's `formatter.formatString`: copies what fits; a NUL follows if there is room; when the
/// value was cut and the cut ends in `/`, the trailing slashes of the cut are NUL-terminated.
fn format_string(dst: &mut [u8], value: &[u8]) {
    let copied = value.len().min(dst.len());
    dst[..copied].copy_from_slice(&value[..copied]);
    if value.len() < dst.len() {
        dst[value.len()] = 0;
    }
    if value.len() > dst.len() && dst[dst.len() - 1] == b'/' {
        let kept = value[..dst.len()]
            .iter()
            .rposition(|&b| b != b'/')
            .map_or(0, |i| i + 1);
        dst[kept] = 0;
    }
}

/// Go's `formatter.formatOctal`: zero-padded to the field width less one, then NUL; a value that
/// does not fit is written as 0 (its real value then travels in a PAX record).
fn format_octal(dst: &mut [u8], value: u64) {
    let value = if fits_octal(dst.len(), value) {
        value
    } else {
        0
    };
    let digits = format!("{value:0width$o}", width = dst.len() - 1);
    format_string(dst, digits.as_bytes());
}

fn fits_octal(width: usize, value: u64) -> bool {
    width >= 22 || value < 1u64 << ((width - 1) * 3)
}

/// Go's `isASCII`: every byte a non-NUL ASCII character.
fn is_ascii(s: &[u8]) -> bool {
    s.iter().all(|&b| (1..0x80).contains(&b))
}

/// Go's `toASCII`. Go drops every rune at or above 0x80, and a byte at or above 0x80 is never
/// part of an ASCII rune, so keeping the non-NUL ASCII bytes is the same thing.
fn to_ascii(s: &[u8]) -> Vec<u8> {
    s.iter()
        .copied()
        .filter(|b| (1..0x80).contains(b))
        .collect()
}

/// Go's `splitUSTARPath`: the prefix and name fields for a name longer than 100 bytes, if the
/// last `/` within its first 156 bytes leaves a prefix of at most 155 bytes and a non-empty
/// name of at most 100.
fn split_ustar_path(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut length = name.len();
    if length <= NAME_FIELD || !is_ascii(name) {
        return None;
    }
    if length > PREFIX_FIELD + 1 {
        length = PREFIX_FIELD + 1;
    } else if name[length - 1] == b'/' {
        length -= 1;
    }
    let slash = name[..length].iter().rposition(|&b| b == b'/')?;
    let suffix_len = name.len() - slash - 1;
    if slash == 0 || suffix_len > NAME_FIELD || suffix_len == 0 || slash > PREFIX_FIELD {
        return None;
    }
    Some((&name[..slash], &name[slash + 1..]))
}

/// Major and minor numbers as Go's `statUnix` decodes `st_rdev` on Linux.
fn device_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev & 0x0000_0000_000f_ff00) >> 8) | ((rdev & 0xffff_f000_0000_0000) >> 32);
    let minor = (rdev & 0x0000_0000_0000_00ff) | ((rdev & 0x0000_0fff_fff0_0000) >> 12);
    (major, minor)
}

fn check_image_path(path: &str) -> io::Result<&[u8]> {
    let clean = path.len() > 1
        && path.starts_with('/')
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if clean {
        Ok(path.as_bytes())
    } else {
        Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("image path {path:?} is not a clean absolute path"),
        ))
    }
}

fn check_mode(mode: u32) -> io::Result<u32> {
    if mode <= 0o7777 {
        Ok(mode)
    } else {
        Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("mode {mode:o} has bits beyond permissions, setuid, setgid and sticky"),
        ))
    }
}

fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::MediaType;
    use std::os::unix::fs::PermissionsExt;

    /// 315532801 (1980-01-01T00:00:01Z) in octal, as Go writes a 12-byte numeric field.
    const MTIME_1980: &[u8] = b"02263523001\0";
    const ZERO_8: &[u8] = b"0000000\0";
    const ZERO_12: &[u8] = b"00000000000\0";
    const END_OF_ARCHIVE: [u8; 1024] = [0; 1024];

    /// A USTAR header block as Go writes it, assembled from literal field values. The checksums
    /// in the tests were computed separately from the same fields (sum of all bytes with the
    /// checksum field counted as spaces, in octal).
    #[derive(Default)]
    struct Ustar<'a> {
        name: &'a [u8],
        prefix: &'a [u8],
        mode: &'a [u8],
        uid: &'a [u8],
        gid: &'a [u8],
        size: &'a [u8],
        typeflag: u8,
        linkname: &'a [u8],
        checksum: &'a [u8],
    }

    impl Ustar<'_> {
        fn root_owned_empty() -> Self {
            Ustar {
                uid: ZERO_8,
                gid: ZERO_8,
                size: ZERO_12,
                ..Ustar::default()
            }
        }

        fn block(&self) -> Vec<u8> {
            assemble(&[
                (0, self.name),
                (100, self.mode),
                (108, self.uid),
                (116, self.gid),
                (124, self.size),
                (136, MTIME_1980),
                (148, self.checksum),
                (156, &[self.typeflag]),
                (157, self.linkname),
                (257, b"ustar\0"),
                (263, b"00"),
                (329, ZERO_8),
                (337, ZERO_8),
                (345, self.prefix),
            ])
        }
    }

    /// Go's PAX `x` header block: zero mode, owner and mtime, device fields left NUL.
    fn pax_header_block(name: &[u8], size: &[u8], checksum: &[u8]) -> Vec<u8> {
        assemble(&[
            (0, name),
            (100, ZERO_8),
            (108, ZERO_8),
            (116, ZERO_8),
            (124, size),
            (136, ZERO_12),
            (148, checksum),
            (156, b"x"),
            (257, b"ustar\0"),
            (263, b"00"),
        ])
    }

    fn assemble(fields: &[(usize, &[u8])]) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK];
        for (offset, value) in fields {
            block[*offset..offset + value.len()].copy_from_slice(value);
        }
        block
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.resize(data.len().next_multiple_of(BLOCK), 0);
        out
    }

    fn tar_of(add: impl FnOnce(&mut CnbLayerWriter<Vec<u8>>) -> io::Result<()>) -> Vec<u8> {
        let mut writer = CnbLayerWriter::new(Vec::new(), LayerCompression::NONE).unwrap();
        add(&mut writer).unwrap();
        let (layer, tar) = writer.finish().unwrap();
        assert_eq!(layer.diff_id, layer.digest);
        assert_eq!(layer.size, tar.len() as u64);
        tar
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn a_directory_is_one_ustar_block_and_the_archive_ends_with_two_zero_blocks() {
        let tar = tar_of(|w| w.add_dir("/cnb", 0o755, Owner::ROOT));
        let expected = Ustar {
            name: b"/cnb",
            mode: b"0000755\0",
            typeflag: b'5',
            checksum: b"007777\0 ",
            ..Ustar::root_owned_empty()
        };
        assert_eq!(tar, concat(&[&expected.block(), &END_OF_ARCHIVE]));
    }

    #[test]
    fn a_regular_file_keeps_setuid_and_owner_and_pads_its_data() {
        let owner = Owner {
            uid: 1000,
            gid: 1001,
        };
        let tar = tar_of(|w| w.add_file("/workspace/hello", 0o4755, owner, b"hello"));
        let expected = Ustar {
            name: b"/workspace/hello",
            mode: b"0004755\0",
            uid: b"0001750\0",
            gid: b"0001751\0",
            size: b"00000000005\0",
            typeflag: b'0',
            checksum: b"012375\0 ",
            ..Ustar::default()
        };
        assert_eq!(
            tar,
            concat(&[&expected.block(), &padded(b"hello"), &END_OF_ARCHIVE])
        );
    }

    #[test]
    fn process_types_layer_is_the_lifecycles_tar() {
        let (layer, tar) =
            write_process_types_layer(&["web", "worker"], LayerCompression::NONE, Vec::new())
                .unwrap();
        let dir = |name, checksum| Ustar {
            name,
            mode: b"0000755\0",
            typeflag: b'5',
            checksum,
            ..Ustar::root_owned_empty()
        };
        let link = |name, checksum| Ustar {
            name,
            mode: b"0000755\0",
            typeflag: b'2',
            linkname: b"/cnb/lifecycle/launcher",
            checksum,
            ..Ustar::root_owned_empty()
        };
        let expected = concat(&[
            &dir(b"/cnb", b"007777\0 ").block(),
            &dir(b"/cnb/process", b"011455\0 ").block(),
            &link(b"/cnb/process/web", b"016531\0 ").block(),
            &link(b"/cnb/process/worker", b"017265\0 ").block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
        assert_eq!(layer.diff_id, crate::content::sha256_digest(&expected));
        assert_eq!(layer.media_type, MediaType::ImageLayer);

        for refused in ["", "we/b", "a>b", "c:d"] {
            let err = write_process_types_layer(&[refused], LayerCompression::NONE, Vec::new())
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{refused:?}");
        }
    }

    #[test]
    fn launcher_layer_holds_the_launcher_root_owned_and_0755() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = dir.path().join("launcher");
        fs::write(&launcher, b"#!launcher").unwrap();
        fs::set_permissions(&launcher, fs::Permissions::from_mode(0o700)).unwrap();
        let (_, tar) = write_launcher_layer(&launcher, LayerCompression::NONE, Vec::new()).unwrap();
        let names: Vec<_> = parse_headers(&tar)
            .into_iter()
            .map(|h| (h.name, h.typeflag, h.mode, h.uid, h.size))
            .collect();
        assert_eq!(
            names,
            [
                ("/cnb".into(), b'5', 0o755, 0, 0),
                ("/cnb/lifecycle".into(), b'5', 0o755, 0, 0),
                ("/cnb/lifecycle/launcher".into(), b'0', 0o755, 0, 10),
            ]
        );
        assert_eq!(&tar[3 * BLOCK..3 * BLOCK + 10], b"#!launcher");
        let from_bytes = tar_of(|w| w.add_launcher(b"#!launcher"));
        assert_eq!(
            from_bytes, tar,
            "the same layer from bytes as from the file"
        );
    }

    #[test]
    fn long_names_use_the_ustar_prefix_when_they_split() {
        let name_149 = format!("/layers/{}/{}", "d".repeat(100), "f".repeat(40));
        let name_209 = format!("/layers/{}/{}", "d".repeat(140), "f".repeat(60));
        let tar = tar_of(|w| {
            w.add_file(&name_149, 0o644, Owner::ROOT, b"")?;
            w.add_file(&name_209, 0o644, Owner::ROOT, b"")
        });
        let prefix_149 = format!("/layers/{}", "d".repeat(100));
        let prefix_209 = format!("/layers/{}", "d".repeat(140));
        let file = |name, prefix, checksum| Ustar {
            name,
            prefix,
            mode: b"0000644\0",
            typeflag: b'0',
            checksum,
            ..Ustar::root_owned_empty()
        };
        let expected = concat(&[
            &file(&[b'f'; 40], prefix_149.as_bytes(), b"044203\0 ").block(),
            &file(&[b'f'; 60], prefix_209.as_bytes(), b"060033\0 ").block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
    }

    #[test]
    fn a_name_that_cannot_split_gets_a_pax_path_record() {
        let name = format!("/layers/bp/{}", "x".repeat(120));
        let tar = tar_of(|w| w.add_file(&name, 0o644, Owner::ROOT, b""));
        let header_name = format!("/layers/bp/PaxHeaders.0/{}", "x".repeat(76));
        let record = format!("141 path={name}\n");
        let main_name = format!("/layers/bp/{}", "x".repeat(89));
        let expected = concat(&[
            &pax_header_block(header_name.as_bytes(), b"00000000215\0", b"034040\0 "),
            &padded(record.as_bytes()),
            &Ustar {
                name: main_name.as_bytes(),
                mode: b"0000644\0",
                typeflag: b'0',
                checksum: b"036074\0 ",
                ..Ustar::root_owned_empty()
            }
            .block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
    }

    #[test]
    fn a_long_symlink_target_gets_a_pax_linkpath_record() {
        let target = format!("/{}", "t".repeat(150));
        let tar = tar_of(|w| w.add_symlink("/l", &target, 0o777, Owner::ROOT));
        let record = format!("165 linkpath={target}\n");
        let main_link = format!("/{}", "t".repeat(99));
        let expected = concat(&[
            &pax_header_block(b"/PaxHeaders.0/l", b"00000000245\0", b"010457\0 "),
            &padded(record.as_bytes()),
            &Ustar {
                name: b"/l",
                mode: b"0000777\0",
                typeflag: b'2',
                linkname: main_link.as_bytes(),
                checksum: b"036104\0 ",
                ..Ustar::root_owned_empty()
            }
            .block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
    }

    #[test]
    fn a_non_ascii_name_gets_a_pax_record_and_an_ascii_only_header_name() {
        let tar = tar_of(|w| w.add_dir("/layers/caf\u{e9}", 0o755, Owner::ROOT));
        let expected = concat(&[
            &pax_header_block(b"/layers/PaxHeaders.0/caf", b"00000000026\0", b"012251\0 "),
            &padded("22 path=/layers/caf\u{e9}\n".as_bytes()),
            &Ustar {
                name: b"/layers/caf",
                mode: b"0000755\0",
                typeflag: b'5',
                checksum: b"011265\0 ",
                ..Ustar::root_owned_empty()
            }
            .block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
    }

    #[test]
    fn a_uid_beyond_octal_gets_a_pax_record_and_zero_in_the_header() {
        let owner = Owner {
            uid: 3_000_000,
            gid: 1001,
        };
        let tar = tar_of(|w| w.add_dir("/big", 0o755, owner));
        let expected = concat(&[
            &pax_header_block(b"/PaxHeaders.0/big", b"00000000017\0", b"010762\0 "),
            &padded(b"15 uid=3000000\n"),
            &Ustar {
                name: b"/big",
                mode: b"0000755\0",
                uid: ZERO_8,
                gid: b"0001751\0",
                size: ZERO_12,
                typeflag: b'5',
                checksum: b"010014\0 ",
                ..Ustar::default()
            }
            .block(),
            &END_OF_ARCHIVE,
        ]);
        assert_eq!(tar, expected);
    }

    #[test]
    fn a_cut_name_ending_in_a_slash_is_terminated_before_the_slash() {
        // The 100-byte cut is "/aaa…a/": Go replaces that slash with NUL in the main header.
        let name = format!("/{}/{}", "a".repeat(98), "b".repeat(120));
        let tar = tar_of(|w| w.add_file(&name, 0o644, Owner::ROOT, b""));
        let main_header = &tar[2 * BLOCK..3 * BLOCK];
        let mut expected_name = format!("/{}", "a".repeat(98)).into_bytes();
        expected_name.push(0);
        assert_eq!(&main_header[..NAME_FIELD], expected_name);
    }

    #[test]
    fn ustar_split_matches_gos_own_vectors() {
        let r = |s: &str, n: usize| s.repeat(n);
        let cases: Vec<(String, Option<(String, String)>)> = vec![
            (String::new(), None),
            ("abc".into(), None),
            ("用戶名".into(), None),
            (r("a", 100), None),
            (r("a", 100) + "/", None),
            (r("a", 100) + "/a", Some((r("a", 100), "a".into()))),
            (r("a", 155) + "/", None),
            (r("a", 155) + "/a", Some((r("a", 155), "a".into()))),
            (r("a", 101), None),
            (r("/", 101), Some((r("/", 99), "/".into()))),
            (
                r("a", 155) + "/" + &r("b", 100),
                Some((r("a", 155), r("b", 100))),
            ),
            (r("a", 155) + "//" + &r("b", 100), None),
            (r("a/", 100), Some((r("a/", 77) + "a", r("a/", 22)))),
        ];
        for (input, expected) in cases {
            let got = split_ustar_path(input.as_bytes()).map(|(p, s)| {
                (
                    String::from_utf8(p.to_vec()).unwrap(),
                    String::from_utf8(s.to_vec()).unwrap(),
                )
            });
            assert_eq!(got, expected, "{input:?}");
        }
    }

    #[test]
    fn pax_records_match_gos_own_vectors() {
        let long = "AB".repeat(100);
        let medium = "CD".repeat(50);
        let cases = [
            ("k", "v".to_string(), "6 k=v\n".to_string()),
            ("path", "/etc/hosts".into(), "19 path=/etc/hosts\n".into()),
            ("path", long.clone(), format!("210 path={long}\n")),
            ("path", medium.clone(), format!("110 path={medium}\n")),
            ("foo", "ba".into(), "9 foo=ba\n".into()),
            ("foo", "bar".into(), "11 foo=bar\n".into()),
            ("☺☻☹", "日a本b語ç".into(), "27 ☺☻☹=日a本b語ç\n".into()),
        ];
        for (key, value, expected) in cases {
            let mut record = Vec::new();
            push_pax_record(&mut record, key, value.as_bytes());
            assert_eq!(String::from_utf8(record).unwrap(), expected);
        }
    }

    #[test]
    fn image_paths_and_modes_are_checked() {
        let mut writer = CnbLayerWriter::new(Vec::new(), LayerCompression::NONE).unwrap();
        for bad in [
            "", "/", "relative", "/a/", "/a//b", "/a/./b", "/a/../b", "/a\0b",
        ] {
            let err = writer.add_dir(bad, 0o755, Owner::ROOT).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        let err = writer.add_dir("/a", 0o40755, Owner::ROOT).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let err = writer
            .add_symlink("/a", "nul\0target", 0o777, Owner::ROOT)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn device_numbers_decode_like_gos_stat_unix() {
        // makedev(8, 1) and makedev(0x123, 0x45678) as glibc encodes them.
        assert_eq!(device_numbers(0x801), (8, 1));
        let rdev = (0x45678 & 0xff) | ((0x123 & 0xfff) << 8) | ((0x45678 & !0xff) << 12);
        assert_eq!(device_numbers(rdev), (0x123, 0x45678));
    }

    /// Name, typeflag, mode, uid, gid, size and link target of every entry, read back from the
    /// raw blocks (PAX records applied for path and linkpath).
    #[derive(Debug, PartialEq)]
    struct Parsed {
        name: String,
        typeflag: u8,
        mode: u32,
        uid: u64,
        gid: u64,
        size: u64,
        linkname: String,
    }

    fn parse_headers(tar: &[u8]) -> Vec<Parsed> {
        fn text(field: &[u8]) -> String {
            let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
            String::from_utf8_lossy(&field[..end]).into_owned()
        }
        fn octal(field: &[u8]) -> u64 {
            u64::from_str_radix(text(field).trim(), 8).unwrap()
        }
        let mut entries = Vec::new();
        let mut offset = 0;
        let mut pax_path = None;
        let mut pax_link = None;
        while tar[offset..offset + BLOCK] != [0; BLOCK] {
            let block = &tar[offset..offset + BLOCK];
            let size = octal(&block[124..136]);
            let data_blocks = (size as usize).next_multiple_of(BLOCK);
            let typeflag = block[156];
            if typeflag == b'x' {
                let mut records = &tar[offset + BLOCK..offset + BLOCK + size as usize];
                while !records.is_empty() {
                    let space = records.iter().position(|&b| b == b' ').unwrap();
                    let len: usize = text(&records[..space]).parse().unwrap();
                    let record = String::from_utf8(records[space + 1..len - 1].to_vec()).unwrap();
                    let (key, value) = record.split_once('=').unwrap();
                    match key {
                        "path" => pax_path = Some(value.to_string()),
                        "linkpath" => pax_link = Some(value.to_string()),
                        other => panic!("unexpected PAX record {other}"),
                    }
                    records = &records[len..];
                }
            } else {
                let prefix = text(&block[345..500]);
                let name = text(&block[..100]);
                let joined = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                entries.push(Parsed {
                    name: pax_path.take().unwrap_or(joined),
                    typeflag,
                    mode: octal(&block[100..108]) as u32,
                    uid: octal(&block[108..116]),
                    gid: octal(&block[116..124]),
                    size,
                    linkname: pax_link.take().unwrap_or_else(|| text(&block[157..257])),
                });
            }
            offset += BLOCK + data_blocks;
        }
        assert_eq!(
            &tar[offset..],
            &END_OF_ARCHIVE,
            "archive ends with two zero blocks"
        );
        entries
    }

    /// `<root>/layers/bp/layer` with children whose bytewise walk order differs from a sort of
    /// full paths, a symlink, a hardlinked pair, a setgid directory and a socket.
    fn layer_tree(root: &Path) -> PathBuf {
        let layer = root.join("layers/bp/layer");
        fs::create_dir_all(layer.join("a")).unwrap();
        fs::create_dir_all(layer.join("B")).unwrap();
        fs::write(layer.join("a/x"), b"in a").unwrap();
        fs::write(layer.join("a.txt"), b"dot").unwrap();
        fs::write(layer.join("b"), b"original").unwrap();
        fs::hard_link(layer.join("b"), layer.join("b-hardlink")).unwrap();
        std::os::unix::fs::symlink("../elsewhere/target", layer.join("link")).unwrap();
        std::os::unix::net::UnixListener::bind(layer.join("socket")).unwrap();
        fs::set_permissions(layer.join("B"), fs::Permissions::from_mode(0o2750)).unwrap();
        fs::set_permissions(layer.join("b"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(root.join("layers"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::set_permissions(root.join("layers/bp"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o755)).unwrap();
        layer
    }

    #[test]
    fn a_dir_layer_has_parents_first_then_the_walk_with_owner_forced() {
        let root = tempfile::tempdir().unwrap();
        let layer = layer_tree(root.path());
        let cnb = Owner {
            uid: 1000,
            gid: 1001,
        };
        let (written, tar) = write_cnb_dir_layer(
            &layer,
            "/layers/bp/layer",
            cnb,
            LayerCompression::NONE,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(written.diff_id, crate::content::sha256_digest(&tar));

        let on_disk = fs::metadata(root.path().join("layers")).unwrap();
        let entry = |name: &str, typeflag, mode, uid: u64, gid: u64, size, link: &str| Parsed {
            name: name.to_string(),
            typeflag,
            mode,
            uid,
            gid,
            size,
            linkname: link.to_string(),
        };
        let (disk_uid, disk_gid) = (on_disk.uid().into(), on_disk.gid().into());
        let expected = vec![
            entry("/layers", b'5', 0o751, disk_uid, disk_gid, 0, ""),
            entry("/layers/bp", b'5', 0o700, disk_uid, disk_gid, 0, ""),
            entry("/layers/bp/layer", b'5', 0o755, 1000, 1001, 0, ""),
            entry("/layers/bp/layer/B", b'5', 0o2750, 1000, 1001, 0, ""),
            entry("/layers/bp/layer/a", b'5', 0o755, 1000, 1001, 0, ""),
            entry("/layers/bp/layer/a/x", b'0', 0o644, 1000, 1001, 4, ""),
            entry("/layers/bp/layer/a.txt", b'0', 0o644, 1000, 1001, 3, ""),
            entry("/layers/bp/layer/b", b'0', 0o640, 1000, 1001, 8, ""),
            entry(
                "/layers/bp/layer/b-hardlink",
                b'0',
                0o640,
                1000,
                1001,
                8,
                "",
            ),
            entry(
                "/layers/bp/layer/link",
                b'2',
                0o777,
                1000,
                1001,
                0,
                "../elsewhere/target",
            ),
        ];
        let mut parsed = parse_headers(&tar);
        // The umask decides the modes of the files and directories created without an explicit
        // mode; compare those against the disk.
        for p in parsed.iter_mut().filter(|p| {
            p.name.ends_with("/a") || p.name.ends_with("/x") || p.name.ends_with(".txt")
        }) {
            let rel = p.name.strip_prefix("/layers/bp/layer/").unwrap();
            let mode = fs::metadata(layer.join(rel)).unwrap().mode() & 0o7777;
            assert_eq!(p.mode, mode, "{}", p.name);
            p.mode = if p.typeflag == b'5' { 0o755 } else { 0o644 };
        }
        assert_eq!(parsed, expected);
    }

    #[test]
    fn hardlinked_files_are_both_written_in_full() {
        let root = tempfile::tempdir().unwrap();
        let layer = layer_tree(root.path());
        let tar = tar_of(|w| w.add_tree(&layer, "/l", Owner::ROOT));
        let needle = b"original";
        let copies = tar.windows(needle.len()).filter(|w| w == needle).count();
        assert_eq!(copies, 2);
        assert!(parse_headers(&tar).iter().all(|p| p.typeflag != b'1'));
    }

    #[test]
    fn the_same_tree_elsewhere_with_other_mtimes_gives_the_same_layer() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let deeper = second.path().join("some/where/else");
        fs::create_dir_all(&deeper).unwrap();
        let layer_a = layer_tree(first.path());
        let layer_b = layer_tree(&deeper);
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for file in ["a/x", "b", "a.txt"] {
            File::options()
                .write(true)
                .open(layer_b.join(file))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        if nix::unistd::geteuid().is_root() {
            for file in ["a/x", "b", "a", "link"] {
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &layer_b.join(file),
                    Some(4242.into()),
                    Some(4343.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .unwrap();
            }
        }
        let cnb = Owner {
            uid: 1000,
            gid: 1000,
        };
        let gzip = LayerCompression::default();
        let (a, bytes_a) =
            write_cnb_dir_layer(&layer_a, "/layers/bp/layer", cnb, gzip, Vec::new()).unwrap();
        let (b, bytes_b) =
            write_cnb_dir_layer(&layer_b, "/layers/bp/layer", cnb, gzip, Vec::new()).unwrap();
        assert_eq!(a.diff_id, b.diff_id);
        assert_eq!(a.digest, b.digest);
        assert_eq!(bytes_a, bytes_b);
        assert_eq!(a.media_type, MediaType::ImageLayerGzip);

        fs::set_permissions(layer_b.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
        let (changed, _) =
            write_cnb_dir_layer(&layer_b, "/layers/bp/layer", cnb, gzip, Vec::new()).unwrap();
        assert_ne!(
            changed.diff_id, a.diff_id,
            "a mode change shows in the diffID"
        );
    }

    #[test]
    fn parents_need_enough_ancestors_on_disk() {
        let mut writer = CnbLayerWriter::new(Vec::new(), LayerCompression::NONE).unwrap();
        let err = writer
            .add_parents_from_disk(Path::new("/tmp"), "/a/b/c/d")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn a_fifo_is_a_header_only_entry() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let tar = tar_of(|w| w.add_tree(root.path(), "/t", Owner::ROOT));
        let parsed = parse_headers(&tar);
        assert_eq!(parsed[1].name, "/t/fifo");
        assert_eq!(
            (parsed[1].typeflag, parsed[1].mode, parsed[1].size),
            (b'6', 0o600, 0)
        );
    }
}
