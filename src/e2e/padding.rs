//! Padding of message plaintexts to a few size buckets before they are sealed, so that the
//! server, which sees the length of every envelope, learns a bucket and not the length of a
//! text (`docs/PROTOCOL.md` E6.1). The padding is inside the AEAD, so only the sender could
//! have made it wrong, and a wrong one is refused like any other malformed message.
//!
//! A padded plaintext is `0xFF ‖ content ‖ 0x80 ‖ 0x00 × k` (ISO/IEC 7816-4 padding after a
//! format byte), as long as the smallest bucket that holds it. A plaintext that does not start
//! with `0xFF` was sealed by a client from before padding: its content is the whole plaintext.
//! Those clients sealed only UTF-8 text, which never contains the byte `0xFF`, so the two
//! cannot be confused.

use super::E2eError;

/// First byte of a padded plaintext: never part of UTF-8, so no unpadded text starts with it.
pub const PADDED_FORMAT: u8 = 0xFF;
/// The byte that ends the content of a padded plaintext; only zeros follow it.
const CONTENT_END: u8 = 0x80;
/// Longest padded plaintext, in bytes: the largest content (`MAX_PLAINTEXT_LEN`) plus the
/// two framing bytes, rounded up to a whole KiB, so every text that was sealable before
/// padding still is. Its envelope stays below `MAX_ENVELOPE_LEN`.
pub const MAX_PADDED_LEN: usize = 58 * 1024;
const _: () = assert!(super::MAX_PLAINTEXT_LEN + 2 <= MAX_PADDED_LEN);

/// The lengths a padded plaintext takes: the smallest that holds `content + 2` bytes.
pub const PADDING_BUCKETS: [usize; 5] = [256, 1024, 4 * 1024, 16 * 1024, MAX_PADDED_LEN];

/// The length of the padded plaintext of `content_len` bytes of content, or `None` if no
/// bucket holds it.
pub fn padded_len(content_len: usize) -> Option<usize> {
    let needed = content_len.checked_add(2)?;
    PADDING_BUCKETS.into_iter().find(|&b| b >= needed)
}

/// Pads `content` into a new buffer with `spare` bytes of capacity beyond the padded length
/// (room for the AEAD tag, so sealing in place does not reallocate).
pub(crate) fn pad(content: &[u8], spare: usize) -> Result<Vec<u8>, E2eError> {
    let len = padded_len(content.len()).ok_or(E2eError::TooLarge {
        what: "plaintext",
        len: content.len(),
        max: MAX_PADDED_LEN - 2,
    })?;
    let mut out = Vec::with_capacity(len + spare);
    out.push(PADDED_FORMAT);
    out.extend_from_slice(content);
    out.push(CONTENT_END);
    out.resize(len, 0);
    Ok(out)
}

/// The content of a decrypted plaintext: a padded one unpadded in place, an unpadded one
/// (from a client before padding) as it is. Refuses a padded plaintext whose padding is not
/// `0x80` followed only by zeros ([`E2eError::BadPadding`]). Any padded length is accepted,
/// not only the buckets of today, so the buckets may change without a new format.
pub(crate) fn unpad(mut plaintext: Vec<u8>) -> Result<Vec<u8>, E2eError> {
    if plaintext.first() != Some(&PADDED_FORMAT) {
        return Ok(plaintext);
    }
    let end = plaintext
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(E2eError::BadPadding)?;
    if end == 0 || plaintext.get(end) != Some(&CONTENT_END) {
        return Err(E2eError::BadPadding);
    }
    plaintext.truncate(end);
    plaintext.remove(0);
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_pads_to_the_smallest_bucket_that_holds_it_and_back() {
        for len in (0..=300).chain([1022, 1023, 4094, 4095, 16382, 16383, 57_344]) {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let padded = pad(&content, 16).unwrap();
            let bucket = *PADDING_BUCKETS.iter().find(|&&b| b >= len + 2).unwrap();
            assert_eq!(padded.len(), bucket, "content of {len} bytes");
            assert!(padded.capacity() >= bucket + 16);
            assert_eq!(unpad(padded).unwrap(), content);
        }
        assert_eq!(padded_len(254), Some(256));
        assert_eq!(padded_len(255), Some(1024));
        assert_eq!(padded_len(MAX_PADDED_LEN - 2), Some(MAX_PADDED_LEN));
        assert_eq!(padded_len(MAX_PADDED_LEN - 1), None);
        assert!(matches!(
            pad(&vec![0; MAX_PADDED_LEN - 1], 0),
            Err(E2eError::TooLarge { .. })
        ));
    }

    #[test]
    fn content_ending_in_padding_like_bytes_survives() {
        for content in [
            &b"\x80"[..],
            b"\x80\x00",
            b"\x00\x00",
            b"\xff",
            b"a\x80\x00\x80",
        ] {
            assert_eq!(unpad(pad(content, 0).unwrap()).unwrap(), content);
        }
    }

    #[test]
    fn unpadded_plaintexts_from_older_clients_are_returned_as_they_are() {
        for old in [
            &b""[..],
            b"Hello, Bob!",
            "ünïcode \u{80}".as_bytes(),
            b"\x80\x00",
        ] {
            assert_eq!(unpad(old.to_vec()).unwrap(), old);
        }
    }

    #[test]
    fn wrong_padding_is_refused() {
        let bad: [&[u8]; 7] = [
            b"\xff",                 // no end marker at all
            b"\xff\x00\x00",         // zeros only
            b"\xff\x80\x00\x01",     // a non-zero byte after the end marker
            b"\xffabc",              // content without padding
            b"\xffabc\x81\x00",      // a wrong end marker
            b"\xffabc\x80\x00\xff",  // ends in a non-zero byte
            b"\xff\x00\x80\x00\x7f", // 0x7f after the marker
        ];
        for plaintext in bad {
            assert_eq!(
                unpad(plaintext.to_vec()),
                Err(E2eError::BadPadding),
                "{plaintext:02x?}"
            );
        }
        // The smallest padded plaintext: empty content.
        assert_eq!(unpad(b"\xff\x80".to_vec()).unwrap(), b"");
    }
}
