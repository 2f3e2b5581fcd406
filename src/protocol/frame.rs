//! Length-prefixed MessagePack frames: a `u32` big-endian body length, then the body.
//!
//! The length is checked against the caller's cap before a byte of the body is buffered, and a
//! body must be exactly one MessagePack value (trailing bytes are an error) that nests maps and
//! arrays at most [`MAX_NESTING`] levels deep.

use std::io::Cursor;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::nesting::{MAX_NESTING, TooDeep, check_nesting};

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;

/// Why a frame could not be read, decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more bytes than the cap allows.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced body length.
        len: u32,
        /// The cap in force.
        max: u32,
    },
    /// The stream ended inside a frame (in the prefix or the body).
    #[error("stream ended inside a frame")]
    Truncated,
    /// The body is not a valid encoding of the expected message.
    #[error("undecodable frame body: {0}")]
    Decode(rmp_serde::decode::Error),
    /// The body nests maps and arrays deeper than the protocol allows.
    #[error(transparent)]
    TooDeep(#[from] TooDeep),
    /// The body decoded but bytes were left over after the value.
    #[error("{0} trailing bytes after the frame's MessagePack value")]
    TrailingBytes(usize),
    /// The message could not be encoded (a bug, or a value too large for the cap).
    #[error("cannot encode frame: {0}")]
    Encode(rmp_serde::encode::Error),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(std::io::Error),
}

impl From<rmp_serde::decode::Error> for FrameError {
    fn from(error: rmp_serde::decode::Error) -> Self {
        Self::Decode(error)
    }
}

impl From<rmp_serde::encode::Error> for FrameError {
    fn from(error: rmp_serde::encode::Error) -> Self {
        Self::Encode(error)
    }
}

impl From<std::io::Error> for FrameError {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

/// Encodes `msg` as one frame (prefix and body), refusing bodies larger than `max`.
pub fn encode_frame<T: Serialize>(msg: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(64);
    encode_frame_into(&mut buf, msg, max)?;
    Ok(buf)
}

/// Appends one frame carrying `msg` to `buf` (so several frames can go out in one write). On
/// error `buf` is left as it was.
pub fn encode_frame_into<T: Serialize>(
    buf: &mut Vec<u8>,
    msg: &T,
    max: u32,
) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; LENGTH_PREFIX]);
    if let Err(e) = rmp_serde::encode::write_named(buf, msg) {
        buf.truncate(start);
        return Err(e.into());
    }
    let body_len = buf.len() - start - LENGTH_PREFIX;
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    if len > max {
        buf.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    buf[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads the body length from a complete 4-byte prefix and checks it against `max`.
pub fn frame_length(prefix: [u8; LENGTH_PREFIX], max: u32) -> Result<u32, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body as exactly one MessagePack value of type `T`, nested at most
/// [`MAX_NESTING`] levels deep.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    check_nesting(body, MAX_NESTING)?;
    decode_checked_body(body)
}

/// [`decode_body`] for a body whose nesting the caller has checked.
pub(super) fn decode_checked_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let mut cursor = Cursor::new(body);
    let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor))?;
    let used = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    if used < body.len() {
        return Err(FrameError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}

/// Reads one frame body into `buf` (replacing its contents).
///
/// Returns `Ok(false)` when the stream ends cleanly before a new frame begins, `Ok(true)` when
/// `buf` holds a complete body, and [`FrameError::Truncated`] when it ends mid-frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
    buf: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut filled = 0;
    while filled < LENGTH_PREFIX {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = frame_length(prefix, max)? as usize;
    buf.clear();
    buf.resize(len, 0);
    match reader.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Encodes `msg` and writes it as one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    msg: &T,
    max: u32,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg, max)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u64,
        name: String,
    }

    #[test]
    fn round_trip_uses_a_named_map() {
        let msg = Sample {
            id: 7,
            name: "bob".into(),
        };
        let frame = encode_frame(&msg, 1024).unwrap();
        // fixmap(2) "id" 7 "name" "bob"
        let body = [
            0x82, 0xa2, b'i', b'd', 0x07, 0xa4, b'n', b'a', b'm', b'e', 0xa3, b'b', b'o', b'b',
        ];
        assert_eq!(&frame[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&frame[4..], &body);
        assert_eq!(decode_body::<Sample>(&frame[4..]).unwrap(), msg);
    }

    #[test]
    fn encode_refuses_bodies_over_the_cap() {
        let msg = Sample {
            id: 1,
            name: "x".repeat(100),
        };
        assert!(matches!(
            encode_frame(&msg, 50),
            Err(FrameError::TooLarge { max: 50, .. })
        ));
    }

    #[test]
    fn length_is_checked_before_allocation() {
        let prefix = u32::MAX.to_be_bytes();
        assert!(matches!(
            frame_length(prefix, 1024),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: 1024
            })
        ));
        assert_eq!(frame_length(1024u32.to_be_bytes(), 1024).unwrap(), 1024);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut body = rmp_serde::to_vec_named(&Sample {
            id: 1,
            name: "a".into(),
        })
        .unwrap();
        body.push(0xc0);
        assert!(matches!(
            decode_body::<Sample>(&body),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            decode_body::<Sample>(&[0xc1, 0xff, 0x00]),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            decode_body::<Sample>(&[]),
            Err(FrameError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn read_frame_distinguishes_clean_end_from_truncation() {
        let frame = encode_frame(
            &Sample {
                id: 3,
                name: "c".into(),
            },
            1024,
        )
        .unwrap();
        let mut buf = Vec::new();

        let mut whole = &frame[..];
        assert!(read_frame(&mut whole, 1024, &mut buf).await.unwrap());
        assert_eq!(decode_body::<Sample>(&buf).unwrap().id, 3);
        assert!(!read_frame(&mut whole, 1024, &mut buf).await.unwrap());

        for cut in [1, 3, 4, frame.len() - 1] {
            let mut part = &frame[..cut];
            assert!(
                matches!(
                    read_frame(&mut part, 1024, &mut buf).await,
                    Err(FrameError::Truncated)
                ),
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn read_frame_refuses_oversize_without_reading_the_body() {
        let mut input: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 1, 2, 3];
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut input, 1024, &mut buf).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.capacity() < 1024);
    }
}
