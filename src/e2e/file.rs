//! File encryption (PROTOCOL.md E15): a file is sealed chunk by chunk with a key of its own,
//! uploaded as an opaque blob, and described to the recipient by an ordinary end-to-end message
//! of kind `file` whose plaintext is a [`FileRef`] (blob id, key, SHA-256, size, name, type).
//!
//! Chunk i of C = 65,536 plaintext bytes is sealed with ChaCha20-Poly1305 under the file key,
//! the nonce `0^7 ‖ u32-be(i) ‖ last` (last = 1 only on the final chunk) and the blob id as
//! associated data. The index in the nonce makes a reordered, dropped or duplicated chunk fail
//! authentication; the last flag makes a blob cut at a chunk boundary fail; the receiver knows
//! the size from the message, so it knows every chunk boundary and refuses extra bytes. The
//! SHA-256 of the whole plaintext, checked at the end, binds the file to the message.
//!
//! Everything here works on one chunk at a time ([`ChunkSealer`], [`ChunkOpener`]): nothing
//! ever holds a whole file. The file reference and its strict decoder are in `reference`.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::protocol::BlobId;

mod reference;

pub use reference::FileRef;

/// Plaintext bytes per chunk (C).
pub const FILE_CHUNK_LEN: usize = 65_536;
/// Bytes a sealed chunk adds to its plaintext (the Poly1305 tag).
pub const FILE_TAG_LEN: usize = 16;
/// A sealed full chunk.
pub const SEALED_CHUNK_LEN: usize = FILE_CHUNK_LEN + FILE_TAG_LEN;
/// Length of a file key.
pub const FILE_KEY_LEN: usize = 32;
/// Longest file name a [`FileRef`] carries, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Longest content type a [`FileRef`] carries, in bytes.
pub const MAX_FILE_TYPE_LEN: usize = 127;
/// Longest encoded [`FileRef`] accepted: the fields above with their MessagePack overhead and
/// room for a few unknown keys from later versions.
pub const MAX_FILE_REF_LEN: usize = 4096;
/// Most chunks a file may have: their index must fit the nonce's 32 bits.
const MAX_CHUNKS: u64 = 1 << 32;

/// Why a file could not be sealed, opened or described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The size needs more chunks than a nonce can number, or its sealed length overflows.
    #[error("a file of {size} bytes is too large to seal")]
    TooLarge {
        /// The size in bytes.
        size: u64,
    },
    /// A chunk given to the sealer is not the length its index requires.
    #[error("chunk {index} has {got} bytes where {expected} are required")]
    ChunkLength {
        /// The chunk's index.
        index: u64,
        /// The length the file's size requires.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Every chunk was already sealed, or a resume was asked past the last chunk.
    #[error("the file has only {chunks} chunks")]
    NoMoreChunks {
        /// The file's chunk count.
        chunks: u64,
    },
    /// A chunk does not authenticate: it was changed, or is not the chunk expected at this
    /// place (reordered, dropped, duplicated), or the key or blob id is wrong.
    #[error("chunk {index} does not authenticate (tampered, out of order, or the wrong key)")]
    BadChunk {
        /// The index the chunk was expected at.
        index: u64,
    },
    /// The last chunk lacks the last flag: the blob was cut at a chunk boundary (or its size
    /// is understated).
    #[error("chunk {index} should be the last but is not marked so: the file is truncated")]
    MissingLastFlag {
        /// The last chunk's index.
        index: u64,
    },
    /// A chunk before the last carries the last flag: the blob is shorter than announced.
    #[error("chunk {index} is marked last before the end of the file")]
    EarlyLastFlag {
        /// The chunk's index.
        index: u64,
    },
    /// The blob ended before the file's last chunk.
    #[error("the blob ended after {got} of {expected} ciphertext bytes")]
    Truncated {
        /// Ciphertext bytes received.
        got: u64,
        /// The blob's length for this file's size.
        expected: u64,
    },
    /// Bytes follow the file's last chunk.
    #[error("bytes follow the last chunk")]
    ExtraBytes,
    /// The plaintext's SHA-256 is not the one the message carries.
    #[error("the file's SHA-256 does not match the message")]
    DigestMismatch,
    /// The `file` message's plaintext is not a valid file reference (the reason says which
    /// rule it broke).
    #[error("malformed file reference: {0}")]
    MalformedRef(String),
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// The cipher refused its key (fixed lengths: a bug, reported rather than panicking).
    #[error("cryptographic primitive refused its input")]
    Primitive,
}

/// A file's key: 32 random bytes, one per file, wiped when dropped, masked in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(Zeroizing<[u8; FILE_KEY_LEN]>);

impl FileKey {
    /// A fresh key from the operating system's random source.
    pub fn random() -> Result<Self, FileError> {
        let mut key = Zeroizing::new([0u8; FILE_KEY_LEN]);
        getrandom::fill(key.as_mut()).map_err(|e| FileError::Random(e.to_string()))?;
        Ok(Self(key))
    }

    /// A key from its bytes (a received [`FileRef`], a test vector).
    pub fn from_bytes(bytes: [u8; FILE_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key's bytes.
    pub fn expose(&self) -> &[u8; FILE_KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> Result<LessSafeKey, FileError> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, self.0.as_ref())
            .map_err(|_| FileError::Primitive)?;
        Ok(LessSafeKey::new(key))
    }
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(…)")
    }
}

/// How many chunks a file of `size` bytes has: `max(1, ceil(size / C))`.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(FILE_CHUNK_LEN as u64).max(1)
}

/// The blob length (ciphertext) of a file of `size` bytes: `size + 16 · n`; `None` when it
/// does not fit (more chunks than the nonce numbers, or past `u64`).
pub fn sealed_len(size: u64) -> Option<u64> {
    let chunks = chunk_count(size);
    if chunks > MAX_CHUNKS {
        return None;
    }
    size.checked_add(chunks.checked_mul(FILE_TAG_LEN as u64)?)
}

/// The chunk whose sealed bytes contain ciphertext offset `offset` (where a resumed upload
/// must start sealing again), and the ciphertext offset at which that chunk starts.
pub fn chunk_at_offset(offset: u64) -> (u64, u64) {
    let index = offset / SEALED_CHUNK_LEN as u64;
    (index, index * SEALED_CHUNK_LEN as u64)
}

/// Plaintext length of chunk `index` of a file of `size` bytes (0 only for an empty file).
fn plain_chunk_len(size: u64, index: u64) -> usize {
    let start = index.saturating_mul(FILE_CHUNK_LEN as u64);
    let len = size.saturating_sub(start).min(FILE_CHUNK_LEN as u64);
    // At most FILE_CHUNK_LEN, so it fits.
    usize::try_from(len).unwrap_or(FILE_CHUNK_LEN)
}

/// The nonce of chunk `index`: 7 zero bytes, the index as u32 big-endian, the last flag.
fn chunk_nonce(index: u64, last: bool) -> Result<Nonce, FileError> {
    let index = u32::try_from(index).map_err(|_| FileError::Primitive)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce[7..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Ok(Nonce::assume_unique_for_key(nonce))
}

fn checked_chunks(size: u64) -> Result<u64, FileError> {
    sealed_len(size).ok_or(FileError::TooLarge { size })?;
    Ok(chunk_count(size))
}

/// Seals a file's chunks in order, from the first or (to resume an upload) from any chunk.
pub struct ChunkSealer {
    key: LessSafeKey,
    blob: BlobId,
    size: u64,
    chunks: u64,
    next: u64,
}

impl std::fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSealer")
            .field("blob", &self.blob)
            .field("size", &self.size)
            .field("next", &self.next)
            .finish()
    }
}

impl ChunkSealer {
    /// A sealer for a file of `size` bytes uploaded as `blob`, starting at chunk 0.
    pub fn new(key: &FileKey, blob: BlobId, size: u64) -> Result<Self, FileError> {
        Self::starting_at(key, blob, size, 0)
    }

    /// A sealer that starts at chunk `index` (a resumed upload: see [`chunk_at_offset`]).
    pub fn starting_at(
        key: &FileKey,
        blob: BlobId,
        size: u64,
        index: u64,
    ) -> Result<Self, FileError> {
        let chunks = checked_chunks(size)?;
        if index >= chunks {
            return Err(FileError::NoMoreChunks { chunks });
        }
        Ok(Self {
            key: key.cipher()?,
            blob,
            size,
            chunks,
            next: index,
        })
    }

    /// The index of the next chunk to seal.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// Whether every chunk is sealed.
    pub fn is_done(&self) -> bool {
        self.next >= self.chunks
    }

    /// Plaintext bytes the next chunk must have (0 when done, or for an empty file's chunk).
    pub fn next_len(&self) -> usize {
        if self.is_done() {
            0
        } else {
            plain_chunk_len(self.size, self.next)
        }
    }

    /// Seals the next chunk in place (the buffer gets its tag appended; give it
    /// [`FILE_TAG_LEN`] spare capacity to spare a copy) and returns it.
    pub fn seal(&mut self, mut chunk: Vec<u8>) -> Result<Vec<u8>, FileError> {
        if self.is_done() {
            return Err(FileError::NoMoreChunks {
                chunks: self.chunks,
            });
        }
        let expected = plain_chunk_len(self.size, self.next);
        if chunk.len() != expected {
            return Err(FileError::ChunkLength {
                index: self.next,
                expected,
                got: chunk.len(),
            });
        }
        let nonce = chunk_nonce(self.next, self.next + 1 == self.chunks)?;
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(&self.blob.0), &mut chunk)
            .map_err(|_| FileError::Primitive)?;
        self.next += 1;
        Ok(chunk)
    }
}

/// Opens a file's blob in order as its bytes arrive, in pieces of any size, hashing the
/// plaintext. It holds at most one sealed chunk. A download that breaks off resumes at
/// [`ChunkOpener::verified_offset`] after [`ChunkOpener::discard_partial`].
pub struct ChunkOpener {
    key: LessSafeKey,
    blob: BlobId,
    size: u64,
    chunks: u64,
    next: u64,
    /// Bytes of the chunk being received.
    pending: Vec<u8>,
    /// Where a chunk is opened.
    work: Vec<u8>,
    hasher: Sha256,
}

impl std::fmt::Debug for ChunkOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkOpener")
            .field("blob", &self.blob)
            .field("size", &self.size)
            .field("next", &self.next)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ChunkOpener {
    /// An opener for a file of `size` bytes sealed as `blob` under `key`.
    pub fn new(key: &FileKey, blob: BlobId, size: u64) -> Result<Self, FileError> {
        Ok(Self {
            key: key.cipher()?,
            blob,
            size,
            chunks: checked_chunks(size)?,
            next: 0,
            pending: Vec::new(),
            work: Vec::new(),
            hasher: Sha256::new(),
        })
    }

    /// The blob's length for this file.
    pub fn blob_len(&self) -> u64 {
        // Checked in `new`.
        sealed_len(self.size).unwrap_or(u64::MAX)
    }

    /// The ciphertext offset up to which every chunk is opened and verified: where a resumed
    /// download starts.
    pub fn verified_offset(&self) -> u64 {
        self.next.saturating_mul(SEALED_CHUNK_LEN as u64)
    }

    /// Plaintext bytes opened and verified so far.
    pub fn verified_plaintext(&self) -> u64 {
        self.next
            .saturating_mul(FILE_CHUNK_LEN as u64)
            .min(self.size)
    }

    /// Forgets the received bytes of a chunk not yet complete (before resuming a download at
    /// [`ChunkOpener::verified_offset`]).
    pub fn discard_partial(&mut self) {
        self.pending.clear();
    }

    /// Takes the next piece of the blob; appends the plaintext of every chunk it completes to
    /// `plaintext` (only authenticated bytes, in order).
    pub fn feed(&mut self, mut bytes: &[u8], plaintext: &mut Vec<u8>) -> Result<(), FileError> {
        while !bytes.is_empty() {
            if self.next >= self.chunks {
                return Err(FileError::ExtraBytes);
            }
            let sealed = plain_chunk_len(self.size, self.next) + FILE_TAG_LEN;
            let take = (sealed - self.pending.len()).min(bytes.len());
            if self.pending.capacity() < sealed {
                self.pending.reserve_exact(sealed - self.pending.len());
            }
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == sealed {
                self.open_pending(plaintext)?;
            }
        }
        Ok(())
    }

    fn open_pending(&mut self, plaintext: &mut Vec<u8>) -> Result<(), FileError> {
        let index = self.next;
        let last = index + 1 == self.chunks;
        let nonce = chunk_nonce(index, last)?;
        // Opened in a copy: a failed open leaves its buffer unspecified, and the diagnosis
        // needs the bytes as they came.
        self.work.clear();
        self.work.extend_from_slice(&self.pending);
        let opened = match self
            .key
            .open_in_place(nonce, Aad::from(&self.blob.0), &mut self.work)
        {
            Ok(opened) => opened.len(),
            Err(_) => return Err(self.diagnose(index, last)),
        };
        self.hasher.update(&self.work[..opened]);
        plaintext.extend_from_slice(&self.work[..opened]);
        self.pending.clear();
        self.next += 1;
        Ok(())
    }

    /// Why chunk `index` failed: opened again with the other last flag, it tells a blob cut
    /// at a chunk boundary from a tampered one. Runs only after a failure (once per blob).
    fn diagnose(&self, index: u64, last: bool) -> FileError {
        let mut copy = self.pending.clone();
        let retried = chunk_nonce(index, !last).and_then(|nonce| {
            self.key
                .open_in_place(nonce, Aad::from(&self.blob.0), &mut copy)
                .map(|_| ())
                .map_err(|_| FileError::Primitive)
        });
        match (retried, last) {
            (Ok(()), true) => FileError::MissingLastFlag { index },
            (Ok(()), false) => FileError::EarlyLastFlag { index },
            (Err(_), _) => FileError::BadChunk { index },
        }
    }

    /// Whether every chunk arrived and opened.
    pub fn is_complete(&self) -> bool {
        self.next >= self.chunks
    }

    /// Ends the blob: every chunk must have opened (else [`FileError::Truncated`]) and the
    /// plaintext's SHA-256 must be `expected`.
    pub fn finish(self, expected: &[u8; 32]) -> Result<(), FileError> {
        if !self.is_complete() {
            return Err(FileError::Truncated {
                got: self.verified_offset() + self.pending.len() as u64,
                expected: self.blob_len(),
            });
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &expected[..])) {
            return Err(FileError::DigestMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
