//! Content addressing: sha256 digests, readers and writers that verify or compute them while
//! streaming, canonical JSON for everything lathe hashes, and the media types lathe knows.
//!
//! oci-spec's maps are `HashMap`s, so its own serialisers give different bytes on every run;
//! everything lathe hashes goes through [`canonical_json`] instead (sorted keys, no
//! insignificant white space).

use std::io::{self, Read, Write};

use oci_spec::image::{Descriptor, Digest, MediaType};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Largest manifest, index or config lathe will read into memory (registries cap manifests at
/// 4 MiB; configs of real images are far smaller).
pub const MAX_JSON_BLOB: u64 = 16 << 20;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// What a descriptor points at, as far as copying and unpacking care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Index,
    Manifest,
    Other,
}

pub fn kind_of(media_type: &MediaType) -> Kind {
    match media_type {
        MediaType::ImageIndex => Kind::Index,
        MediaType::ImageManifest => Kind::Manifest,
        MediaType::Other(s) if s == DOCKER_MANIFEST_LIST => Kind::Index,
        MediaType::Other(s) if s == DOCKER_MANIFEST => Kind::Manifest,
        _ => Kind::Other,
    }
}

/// Compression of a layer blob, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &MediaType) -> Option<Compression> {
    match media_type {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Some(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Some(Compression::Gzip)
        }
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
            Some(Compression::Zstd)
        }
        MediaType::Other(s) => match s.as_str() {
            DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN_GZIP => Some(Compression::Gzip),
            DOCKER_LAYER_TAR => Some(Compression::None),
            "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        },
        _ => None,
    }
}

/// The sha256 digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> Digest {
    digest_from_hasher(Sha256::new_with_prefix(bytes))
}

fn digest_from_hasher(hasher: Sha256) -> Digest {
    let hex = hex::encode(hasher.finalize());
    format!("sha256:{hex}")
        .parse()
        .expect("a sha256 hex string is a valid digest")
}

/// Parses a digest, refusing anything but a well-formed sha256 (the only algorithm lathe
/// writes; accepting others would let a hostile index name paths we never verify).
pub fn parse_sha256(s: &str) -> Result<Digest, String> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {s:?} is not a sha256 digest"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("digest {s:?} is not 64 lowercase hex digits"));
    }
    s.parse().map_err(|e| format!("digest {s:?}: {e}"))
}

/// Checks that a descriptor (from an untrusted manifest or index) names a sha256 digest.
pub fn check_descriptor(desc: &Descriptor) -> Result<(), String> {
    parse_sha256(desc.digest().as_ref()).map(|_| ())
}

/// Canonical JSON: keys sorted, compact. Everything lathe creates and hashes goes through here.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // serde_json's Map is a BTreeMap unless `preserve_order` is enabled somewhere in the
    // dependency graph; a unit test guards that.
    let value = serde_json::to_value(value).expect("serialising to a JSON value cannot fail");
    serde_json::to_vec(&value).expect("writing a JSON value cannot fail")
}

/// A reader that checks, at end of stream, that exactly `size` bytes with digest `digest` came
/// through. A mismatch is an `InvalidData` error naming the digest and `what`.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    expected_size: u64,
    seen: u64,
    what: String,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, desc: &Descriptor, what: impl Into<String>) -> Self {
        VerifyingReader {
            inner,
            hasher: Sha256::new(),
            expected: desc.digest().clone(),
            expected_size: desc.size(),
            seen: 0,
            what: what.into(),
            done: false,
        }
    }

    fn fail(&self, msg: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {msg}", self.what))
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        // Read at most one byte past the expected size so an over-long blob is caught without
        // reading it all.
        let room = (self.expected_size - self.seen.min(self.expected_size)) as usize + 1;
        let limit = buf.len().min(room);
        let n = self.inner.read(&mut buf[..limit])?;
        self.seen += n as u64;
        if self.seen > self.expected_size {
            return Err(self.fail(format!(
                "blob {} is longer than the {} bytes its descriptor gives",
                self.expected, self.expected_size
            )));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 {
            self.done = true;
            if self.seen != self.expected_size {
                return Err(self.fail(format!(
                    "blob {} is truncated: {} of {} bytes",
                    self.expected, self.seen, self.expected_size
                )));
            }
            let actual = digest_from_hasher(std::mem::take(&mut self.hasher));
            if actual != self.expected {
                return Err(self.fail(format!(
                    "blob {} does not match its digest (its bytes hash to {actual})",
                    self.expected
                )));
            }
        }
        Ok(n)
    }
}

/// A writer that counts and hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The digest and length of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (digest_from_hasher(self.hasher), self.written, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Fills `buf` as far as the reader allows; less than `buf.len()` only at end of stream.
pub fn read_up_to(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the chunks another thread sends; the channel closing is the end of the stream.
pub struct ChannelReader {
    receiver: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    pub fn new(receiver: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> ChannelReader {
        ChannelReader {
            receiver,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.receiver.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads a whole JSON blob through a verifying reader, refusing blobs over [`MAX_JSON_BLOB`].
pub fn read_small_blob(reader: impl Read, desc: &Descriptor, what: &str) -> io::Result<Vec<u8>> {
    if desc.size() > MAX_JSON_BLOB {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: blob {} is {} bytes, more than the {} lathe reads into memory",
                desc.digest(),
                desc.size(),
                MAX_JSON_BLOB
            ),
        ));
    }
    let mut out = Vec::with_capacity(desc.size() as usize);
    VerifyingReader::new(reader, desc, what).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc_of(bytes: &[u8]) -> Descriptor {
        Descriptor::new(
            MediaType::ImageConfig,
            bytes.len() as u64,
            sha256_digest(bytes),
        )
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let mut map = std::collections::HashMap::new();
        for k in ["zeta", "alpha", "mid"] {
            map.insert(
                k.to_string(),
                serde_json::json!({"b": 1, "a": [ {"y": 0, "x": 1} ]}),
            );
        }
        let text = String::from_utf8(canonical_json(&map)).unwrap();
        assert_eq!(
            text,
            r#"{"alpha":{"a":[{"x":1,"y":0}],"b":1},"mid":{"a":[{"x":1,"y":0}],"b":1},"zeta":{"a":[{"x":1,"y":0}],"b":1}}"#
        );
    }

    #[test]
    fn verifying_reader_accepts_exact_content() {
        let data = b"hello world";
        let got = read_small_blob(&data[..], &desc_of(data), "test").unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn verifying_reader_rejects_wrong_bytes_short_and_long_blobs() {
        let desc = desc_of(b"hello world");
        let err = read_small_blob(&b"hello WORLD"[..], &desc, "t").unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        let err = read_small_blob(&b"hello"[..], &desc, "t").unwrap_err();
        assert!(
            err.to_string().contains("truncated: 5 of 11 bytes"),
            "{err}"
        );
        let err = read_small_blob(&b"hello world!!"[..], &desc, "t").unwrap_err();
        assert!(
            err.to_string().contains("longer than the 11 bytes"),
            "{err}"
        );
    }

    #[test]
    fn parse_sha256_refuses_other_shapes() {
        assert!(parse_sha256(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(parse_sha256(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(parse_sha256(&format!("sha256:../../{}", "a".repeat(58))).is_err());
        assert!(parse_sha256(&format!("sha512:{}", "a".repeat(128))).is_err());
    }
}
