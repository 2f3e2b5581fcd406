//! Files (PROTOCOL.md E15): what a sender or a server can hand a recipient — the `file` message
//! plaintext (its decoder) and the blob's bytes (the in-order chunk opener, fed in pieces cut
//! from the input, for a file of a size taken from the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::e2e::{ChunkOpener, FileKey, FileRef};
use securefastchat::protocol::BlobId;

fuzz_target!(|data: &[u8]| {
    // The reference decoder: what it accepts encodes back to what it decodes.
    if let Ok(file) = FileRef::from_bytes(data)
        && let Ok(bytes) = file.to_bytes()
    {
        let again = FileRef::from_bytes(&bytes).expect("a reference we encoded decodes");
        assert_eq!(again, file);
    }
    // The opener: a size from the first two bytes (up to 3 chunks and a bit), the rest is the
    // "blob", fed in pieces whose lengths come from the input too. Forged bytes never open.
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let size = u64::from(u16::from_le_bytes(*head)) * 3;
    let key = FileKey::from_bytes([7; 32]);
    let Ok(mut opener) = ChunkOpener::new(&key, BlobId([9; 16]), size) else {
        return;
    };
    let mut plaintext = Vec::new();
    let mut left = rest;
    while !left.is_empty() {
        let cut = usize::from(left[0]).max(1).min(left.len());
        let (piece, after) = left.split_at(cut);
        plaintext.clear();
        if opener.feed(piece, &mut plaintext).is_err() {
            return;
        }
        assert!(plaintext.is_empty(), "forged bytes opened");
        left = after;
    }
    assert!(opener.finish(&[0; 32]).is_err(), "a forged blob passed");
});
