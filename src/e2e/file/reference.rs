//! The file reference (PROTOCOL.md E15.4): the plaintext of a `file` message, a MessagePack
//! map `{blob, key, sha256, size, name, type, chunk}`, with its encoder and a strict, bounded
//! decoder (keys of later versions are ignored, as E15.4 says; nothing else is).

use rmpv::Value;
use zeroize::Zeroizing;

use super::{
    FILE_CHUNK_LEN, FILE_KEY_LEN, FileError, FileKey, MAX_FILE_NAME_LEN, MAX_FILE_REF_LEN,
    MAX_FILE_TYPE_LEN, sealed_len,
};
use crate::protocol::BlobId;

/// What a `file` message carries (E15): where the sealed file is, how to open and check it,
/// and what to call it. `name` and `content_type` come from the sender: never use them as a
/// path or print them raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The blob holding the sealed file.
    pub blob: BlobId,
    /// The file's key.
    pub key: FileKey,
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
    /// Plaintext size in bytes.
    pub size: u64,
    /// The sender's name for the file: 1 to 255 bytes of UTF-8, as the sender wrote it.
    pub name: String,
    /// Its content type, `""` if unknown: at most 127 bytes.
    pub content_type: String,
}

fn malformed(why: impl Into<String>) -> FileError {
    FileError::MalformedRef(why.into())
}

impl FileRef {
    /// The blob length of this file.
    pub fn blob_len(&self) -> Option<u64> {
        sealed_len(self.size)
    }

    /// Checks what a reference must satisfy on both sides.
    fn check(&self) -> Result<(), FileError> {
        if self.name.is_empty() || self.name.len() > MAX_FILE_NAME_LEN {
            return Err(malformed(format!(
                "`name` must be 1 to {MAX_FILE_NAME_LEN} bytes"
            )));
        }
        if self.content_type.len() > MAX_FILE_TYPE_LEN {
            return Err(malformed(format!(
                "`type` must be at most {MAX_FILE_TYPE_LEN} bytes"
            )));
        }
        if sealed_len(self.size).is_none() {
            return Err(FileError::TooLarge { size: self.size });
        }
        Ok(())
    }

    /// The `file` message's plaintext: a MessagePack map with the keys in the documented
    /// order, in a buffer wiped when dropped (it holds the key).
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, FileError> {
        self.check()?;
        let mut out = Zeroizing::new(Vec::with_capacity(
            160 + self.name.len() + self.content_type.len(),
        ));
        let buf: &mut Vec<u8> = &mut out;
        let io = |_| FileError::Primitive;
        rmp::encode::write_map_len(buf, 7).map_err(io)?;
        rmp::encode::write_str(buf, "blob").map_err(io)?;
        rmp::encode::write_bin(buf, &self.blob.0).map_err(io)?;
        rmp::encode::write_str(buf, "key").map_err(io)?;
        rmp::encode::write_bin(buf, self.key.expose()).map_err(io)?;
        rmp::encode::write_str(buf, "sha256").map_err(io)?;
        rmp::encode::write_bin(buf, &self.sha256).map_err(io)?;
        rmp::encode::write_str(buf, "size").map_err(io)?;
        rmp::encode::write_uint(buf, self.size).map_err(io)?;
        rmp::encode::write_str(buf, "name").map_err(io)?;
        rmp::encode::write_str(buf, &self.name).map_err(io)?;
        rmp::encode::write_str(buf, "type").map_err(io)?;
        rmp::encode::write_str(buf, &self.content_type).map_err(io)?;
        rmp::encode::write_str(buf, "chunk").map_err(io)?;
        rmp::encode::write_uint(buf, FILE_CHUNK_LEN as u64).map_err(io)?;
        Ok(out)
    }

    /// Decodes a `file` message's plaintext strictly: one map and nothing after it, string
    /// keys each at most once, every documented key with its type and bounds (`chunk` must be
    /// 65,536); keys of later versions are ignored.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FileError> {
        if bytes.len() > MAX_FILE_REF_LEN {
            return Err(malformed(format!(
                "{} bytes exceed the limit of {MAX_FILE_REF_LEN}",
                bytes.len()
            )));
        }
        let mut rest = bytes;
        let tree = WipedValue(
            rmpv::decode::read_value_with_max_depth(&mut rest, 16)
                .map_err(|_| malformed("not a MessagePack value (or nested too deep)"))?,
        );
        if !rest.is_empty() {
            return Err(malformed("bytes follow the MessagePack value"));
        }
        let [blob, key, sha256, size, name, content_type, chunk] = fields(
            &tree.0,
            ["blob", "key", "sha256", "size", "name", "type", "chunk"],
        )?;
        let blob: [u8; 16] = fixed(blob, "blob")?;
        let key: Zeroizing<[u8; FILE_KEY_LEN]> = Zeroizing::new(fixed(key, "key")?);
        let sha256: [u8; 32] = fixed(sha256, "sha256")?;
        let size = size
            .as_u64()
            .ok_or_else(|| malformed("`size` must be an unsigned integer"))?;
        if chunk.as_u64() != Some(FILE_CHUNK_LEN as u64) {
            return Err(malformed(format!("`chunk` must be {FILE_CHUNK_LEN}")));
        }
        let text = |value: &Value, what: &str| {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| malformed(format!("`{what}` must be a UTF-8 string")))
        };
        let file = Self {
            blob: BlobId(blob),
            key: FileKey(key),
            sha256,
            size,
            name: text(name, "name")?,
            content_type: text(content_type, "type")?,
        };
        file.check()?;
        Ok(file)
    }
}

/// A decoded MessagePack tree whose byte strings are wiped when dropped (it holds a file key).
struct WipedValue(Value);

impl Drop for WipedValue {
    fn drop(&mut self) {
        fn wipe(value: &mut Value) {
            match value {
                Value::Binary(bytes) => zeroize::Zeroize::zeroize(bytes),
                Value::Array(items) => items.iter_mut().for_each(wipe),
                Value::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
                    wipe(k);
                    wipe(v);
                }),
                _ => {}
            }
        }
        wipe(&mut self.0);
    }
}

/// The values of the keys `names` in a map whose keys are all strings, each present once;
/// other keys are ignored (E15: a later version may add some).
fn fields<'a, const N: usize>(
    value: &'a Value,
    names: [&str; N],
) -> Result<[&'a Value; N], FileError> {
    let Value::Map(entries) = value else {
        return Err(malformed("not a map"));
    };
    let mut found: [Option<&Value>; N] = [None; N];
    let mut seen = std::collections::BTreeSet::new();
    for (key, field) in entries {
        let key = key
            .as_str()
            .ok_or_else(|| malformed("a key is not a UTF-8 string"))?;
        if !seen.insert(key) {
            return Err(malformed("a key is repeated"));
        }
        if let Some(index) = names.iter().position(|name| *name == key) {
            found[index] = Some(field);
        }
    }
    let mut out = [&Value::Nil; N];
    for (slot, (value, name)) in out.iter_mut().zip(found.into_iter().zip(names)) {
        *slot = value.ok_or_else(|| malformed(format!("`{name}` is missing")))?;
    }
    Ok(out)
}

fn fixed<const N: usize>(value: &Value, what: &str) -> Result<[u8; N], FileError> {
    match value {
        Value::Binary(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("`{what}` must be {N} bytes"))),
        _ => Err(malformed(format!("`{what}` must be bin"))),
    }
}
