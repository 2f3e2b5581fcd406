//! Tests of E15 file encryption: the test vectors of docs/PROTOCOL.md E15.5, and every way a blob
//! can be cut, reordered, repeated or altered.

use sha2::{Digest, Sha256};

use super::*;

/// The vectors' key: bytes 0x00, 0x01, …, 0x1f.
fn vector_key() -> FileKey {
    let mut key = [0u8; FILE_KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = i as u8;
    }
    FileKey::from_bytes(key)
}

/// The vectors' blob id: 16 × 0xb1.
const VECTOR_BLOB: BlobId = BlobId([0xb1; 16]);

/// The vectors' plaintext of `size` bytes: byte i is `i mod 251`.
fn vector_plaintext(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Seals `plaintext` chunk by chunk; returns the sealed chunks.
fn seal_all(key: &FileKey, blob: BlobId, plaintext: &[u8]) -> Vec<Vec<u8>> {
    let mut sealer = ChunkSealer::new(key, blob, plaintext.len() as u64).unwrap();
    let mut chunks = Vec::new();
    let mut at = 0;
    while !sealer.is_done() {
        let len = sealer.next_len();
        let mut chunk = Vec::with_capacity(len + FILE_TAG_LEN);
        chunk.extend_from_slice(&plaintext[at..at + len]);
        at += len;
        chunks.push(sealer.seal(chunk).unwrap());
    }
    chunks
}

/// Opens `blob` (fed in pieces of `piece` bytes) as a file of `size` bytes with digest `sha`.
fn open_all(
    key: &FileKey,
    blob: BlobId,
    size: u64,
    sealed: &[u8],
    piece: usize,
    sha: &[u8; 32],
) -> Result<Vec<u8>, FileError> {
    let mut opener = ChunkOpener::new(key, blob, size)?;
    let mut out = Vec::new();
    for part in sealed.chunks(piece.max(1)) {
        opener.feed(part, &mut out)?;
    }
    opener.finish(sha)?;
    Ok(out)
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// (size, blob length, plaintext SHA-256, SHA-256 of each sealed chunk), as in
/// docs/PROTOCOL.md E15.5.
const VECTORS: &[(usize, u64, &str, &[&str])] = &[
    (
        0,
        16,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        &["83843150d5dcda76900f63dd27de6c24636fabae0535488dba78310f413a04aa"],
    ),
    (
        1,
        17,
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        &["37bdf46b07d51c868f4c3803cd58acda044e7215562cf7b2a0df5b5676dac67d"],
    ),
    (
        65_536,
        65_552,
        "4b640d85ab3ba30fd02c9fc9db4a8928f416322ad27022ea58a65aaee68a4df2",
        &["40178ac0f1205e90a4400203e134d3f859d83fb2b0961dd50ed6e968957ce6c8"],
    ),
    (
        65_537,
        65_569,
        "237356e18b503616912abb8ffaed3a72591e397d4ac294c4637917d48a3f529d",
        &[
            "0aa91d7ecfb480c9fa204172b342d10356fcf8f664e04c9750fe973b196c7ae8",
            "0186ea69bde3af6c42f3843a3a00de3c803eac4571b7798411725fd0fa3b381c",
        ],
    ),
];

/// The whole blobs of the two smallest vectors.
const SMALL_BLOBS: [(usize, &str); 2] = [
    (0, "3c3443fb564cc8ddf5accc90f3a26fd7"),
    (1, "69cfbfc9dc42fa5727a1f8e7dbd19c08e6"),
];

#[test]
fn chunk_arithmetic() {
    assert_eq!(chunk_count(0), 1);
    assert_eq!(chunk_count(1), 1);
    assert_eq!(chunk_count(65_536), 1);
    assert_eq!(chunk_count(65_537), 2);
    assert_eq!(sealed_len(0), Some(16));
    assert_eq!(sealed_len(65_537), Some(65_537 + 32));
    assert_eq!(sealed_len(100 << 20), Some((100 << 20) + 1600 * 16));
    assert_eq!(sealed_len((1 << 32) * 65_536), Some((1 << 32) * 65_552));
    assert_eq!(sealed_len((1 << 32) * 65_536 + 1), None);
    assert_eq!(sealed_len(u64::MAX), None);
    assert_eq!(chunk_at_offset(0), (0, 0));
    assert_eq!(chunk_at_offset(65_551), (0, 0));
    assert_eq!(chunk_at_offset(65_552), (1, 65_552));
    assert_eq!(chunk_at_offset(200_000), (3, 196_656));
}

#[test]
fn the_vectors_seal_and_open() {
    let key = vector_key();
    let mut printed = String::new();
    for size in [0usize, 1, 65_536, 65_537] {
        let plaintext = vector_plaintext(size);
        let chunks = seal_all(&key, VECTOR_BLOB, &plaintext);
        let blob: Vec<u8> = chunks.concat();
        assert_eq!(Some(blob.len() as u64), sealed_len(size as u64));
        let digests: Vec<String> = chunks.iter().map(|c| hex::encode(sha(c))).collect();
        printed.push_str(&format!(
            "size {size}: blob length {}, plaintext sha256 {}, chunk sha256 {:?}\n",
            blob.len(),
            hex::encode(sha(&plaintext)),
            digests
        ));
        if size <= 1 {
            printed.push_str(&format!("  blob {}\n", hex::encode(&blob)));
        }
        let opened = open_all(
            &key,
            VECTOR_BLOB,
            size as u64,
            &blob,
            1000,
            &sha(&plaintext),
        );
        assert_eq!(opened.unwrap(), plaintext);
    }
    println!("{printed}");
    for (size, length, plain_sha, chunk_shas) in VECTORS {
        let plaintext = vector_plaintext(*size);
        let chunks = seal_all(&key, VECTOR_BLOB, &plaintext);
        assert_eq!(chunks.concat().len() as u64, *length);
        assert_eq!(hex::encode(sha(&plaintext)), *plain_sha);
        let got: Vec<String> = chunks.iter().map(|c| hex::encode(sha(c))).collect();
        assert_eq!(got, *chunk_shas, "size {size}");
    }
}

#[test]
fn the_small_blobs_are_exact() {
    for (size, blob) in SMALL_BLOBS {
        let sealed = seal_all(&vector_key(), VECTOR_BLOB, &vector_plaintext(size)).concat();
        assert_eq!(hex::encode(sealed), blob);
    }
}

/// The file reference of the 65,537-byte vector, as docs/PROTOCOL.md E15.5 shows it.
fn vector_ref() -> FileRef {
    FileRef {
        blob: VECTOR_BLOB,
        key: vector_key(),
        sha256: sha(&vector_plaintext(65_537)),
        size: 65_537,
        name: "report.pdf".into(),
        content_type: "application/pdf".into(),
    }
}

const VECTOR_REF: &str = "87a4626c6f62c410b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1a36b6579c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa6736861323536c420237356e18b503616912abb8ffaed3a72591e397d4ac294c4637917d48a3f529da473697a65ce00010001a46e616d65aa7265706f72742e706466a474797065af6170706c69636174696f6e2f706466a56368756e6bce00010000";

#[test]
fn the_file_reference_vector_round_trips() {
    let bytes = vector_ref().to_bytes().unwrap();
    println!("file reference: {}", hex::encode(&*bytes));
    assert_eq!(hex::encode(&*bytes), VECTOR_REF);
    assert_eq!(FileRef::from_bytes(&bytes).unwrap(), vector_ref());
    assert!(!format!("{:?}", vector_ref()).contains("000102"));
}

/// A 3-chunk file (the last chunk short) and its sealed chunks.
fn three_chunks() -> (Vec<u8>, Vec<Vec<u8>>) {
    let plaintext = vector_plaintext(2 * FILE_CHUNK_LEN + 1000);
    let chunks = seal_all(&vector_key(), VECTOR_BLOB, &plaintext);
    assert_eq!(chunks.len(), 3);
    (plaintext, chunks)
}

fn open_chunks(size: usize, sealed: &[u8], digest: &[u8; 32]) -> Result<Vec<u8>, FileError> {
    open_all(
        &vector_key(),
        VECTOR_BLOB,
        size as u64,
        sealed,
        4096,
        digest,
    )
}

#[test]
fn every_change_to_the_blob_is_refused() {
    let (plaintext, chunks) = three_chunks();
    let (size, digest) = (plaintext.len(), sha(&plaintext));
    let whole = chunks.concat();
    assert_eq!(open_chunks(size, &whole, &digest).unwrap(), plaintext);

    let mut tampered = whole.clone();
    tampered[SEALED_CHUNK_LEN + 5] ^= 1;
    assert_eq!(
        open_chunks(size, &tampered, &digest),
        Err(FileError::BadChunk { index: 1 })
    );
    let mut tag = whole.clone();
    let last = tag.len() - 1;
    tag[last] ^= 0x80;
    assert_eq!(
        open_chunks(size, &tag, &digest),
        Err(FileError::BadChunk { index: 2 })
    );
    let reordered = [chunks[1].clone(), chunks[0].clone(), chunks[2].clone()].concat();
    assert_eq!(
        open_chunks(size, &reordered, &digest),
        Err(FileError::BadChunk { index: 0 })
    );
    let duplicated = [chunks[0].clone(), chunks[0].clone(), chunks[2].clone()].concat();
    assert_eq!(
        open_chunks(size, &duplicated, &digest),
        Err(FileError::BadChunk { index: 1 })
    );
    // Dropping the middle chunk: the last one arrives where chunk 1 belongs.
    let dropped = [chunks[0].clone(), chunks[2].clone()].concat();
    assert!(matches!(
        open_chunks(size, &dropped, &digest),
        Err(FileError::Truncated { .. } | FileError::BadChunk { index: 1 })
    ));
    // Cut inside a chunk, or at a chunk boundary.
    for cut in [
        whole.len() - 1,
        2 * SEALED_CHUNK_LEN,
        SEALED_CHUNK_LEN + 7,
        0,
    ] {
        assert_eq!(
            open_chunks(size, &whole[..cut], &digest),
            Err(FileError::Truncated {
                got: cut as u64,
                expected: whole.len() as u64
            }),
            "cut at {cut}"
        );
    }
    let mut extra = whole.clone();
    extra.push(0);
    assert_eq!(
        open_chunks(size, &extra, &digest),
        Err(FileError::ExtraBytes)
    );
    let wrong_blob = open_all(
        &vector_key(),
        BlobId([0xb2; 16]),
        size as u64,
        &whole,
        4096,
        &digest,
    );
    assert_eq!(wrong_blob, Err(FileError::BadChunk { index: 0 }));
    let wrong_key = open_all(
        &FileKey::from_bytes([9; 32]),
        VECTOR_BLOB,
        size as u64,
        &whole,
        4096,
        &digest,
    );
    assert_eq!(wrong_key, Err(FileError::BadChunk { index: 0 }));
    assert_eq!(
        open_chunks(size, &whole, &[0; 32]),
        Err(FileError::DigestMismatch)
    );
}

#[test]
fn the_last_flag_catches_a_size_that_lies() {
    // A file of 3 full chunks, cut to 2 and announced as 2 chunks long: chunk 1 is not last.
    let plaintext = vector_plaintext(3 * FILE_CHUNK_LEN);
    let chunks = seal_all(&vector_key(), VECTOR_BLOB, &plaintext);
    let two = [chunks[0].clone(), chunks[1].clone()].concat();
    let short = &plaintext[..2 * FILE_CHUNK_LEN];
    assert_eq!(
        open_chunks(short.len(), &two, &sha(short)),
        Err(FileError::MissingLastFlag { index: 1 })
    );
    // A file of 2 full chunks announced as 3: chunk 1 says it is the last.
    let plaintext = vector_plaintext(2 * FILE_CHUNK_LEN);
    let chunks = seal_all(&vector_key(), VECTOR_BLOB, &plaintext);
    let mut padded = chunks.concat();
    padded.extend_from_slice(&[0; SEALED_CHUNK_LEN]);
    assert_eq!(
        open_chunks(3 * FILE_CHUNK_LEN, &padded, &[0; 32]),
        Err(FileError::EarlyLastFlag { index: 1 })
    );
}

#[test]
fn a_download_resumes_from_the_last_verified_chunk() {
    let (plaintext, chunks) = three_chunks();
    let whole = chunks.concat();
    let mut opener = ChunkOpener::new(&vector_key(), VECTOR_BLOB, plaintext.len() as u64).unwrap();
    let mut out = Vec::new();
    // The connection drops 100 bytes into chunk 1.
    opener
        .feed(&whole[..SEALED_CHUNK_LEN + 100], &mut out)
        .unwrap();
    assert_eq!(out.len(), FILE_CHUNK_LEN);
    assert_eq!(opener.verified_offset(), SEALED_CHUNK_LEN as u64);
    assert_eq!(opener.verified_plaintext(), FILE_CHUNK_LEN as u64);
    opener.discard_partial();
    let from = opener.verified_offset() as usize;
    opener.feed(&whole[from..], &mut out).unwrap();
    assert!(opener.is_complete());
    opener.finish(&sha(&plaintext)).unwrap();
    assert_eq!(out, plaintext);
}

#[test]
fn an_upload_resumes_sealing_from_any_chunk() {
    let (plaintext, chunks) = three_chunks();
    let size = plaintext.len() as u64;
    let held = SEALED_CHUNK_LEN as u64 + 1234;
    let (index, start) = chunk_at_offset(held);
    assert_eq!((index, start), (1, SEALED_CHUNK_LEN as u64));
    let mut sealer = ChunkSealer::starting_at(&vector_key(), VECTOR_BLOB, size, index).unwrap();
    let mut again = Vec::new();
    let mut at = FILE_CHUNK_LEN;
    while !sealer.is_done() {
        let len = sealer.next_len();
        again.push(sealer.seal(plaintext[at..at + len].to_vec()).unwrap());
        at += len;
    }
    assert_eq!(again, chunks[1..]);
    assert_eq!(
        ChunkSealer::starting_at(&vector_key(), VECTOR_BLOB, size, 3).err(),
        Some(FileError::NoMoreChunks { chunks: 3 })
    );
    let mut sealer = ChunkSealer::new(&vector_key(), VECTOR_BLOB, size).unwrap();
    assert_eq!(
        sealer.seal(vec![0; 10]).err(),
        Some(FileError::ChunkLength {
            index: 0,
            expected: FILE_CHUNK_LEN,
            got: 10
        })
    );
    let mut empty = ChunkSealer::new(&vector_key(), VECTOR_BLOB, 0).unwrap();
    assert_eq!(empty.next_len(), 0);
    assert_eq!(empty.seal(Vec::new()).unwrap().len(), FILE_TAG_LEN);
    assert_eq!(
        empty.seal(Vec::new()).err(),
        Some(FileError::NoMoreChunks { chunks: 1 })
    );
}

/// The vector reference's map with `edit` applied to its entries.
fn edited(edit: impl FnOnce(&mut Vec<(rmpv::Value, rmpv::Value)>)) -> Vec<u8> {
    let bytes = vector_ref().to_bytes().unwrap();
    let rmpv::Value::Map(mut entries) = rmpv::decode::read_value(&mut &bytes[..]).unwrap() else {
        panic!("not a map");
    };
    edit(&mut entries);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &rmpv::Value::Map(entries)).unwrap();
    out
}

fn set(entries: &mut [(rmpv::Value, rmpv::Value)], key: &str, value: rmpv::Value) {
    for (k, v) in entries.iter_mut() {
        if k.as_str() == Some(key) {
            *v = value.clone();
        }
    }
}

#[test]
fn file_references_are_decoded_strictly() {
    use rmpv::Value;
    // Unknown keys are ignored.
    let later = edited(|e| e.push(("thumbnail".into(), Value::Binary(vec![1, 2]))));
    assert_eq!(FileRef::from_bytes(&later).unwrap(), vector_ref());
    let malformed = |bytes: &[u8]| {
        matches!(
            FileRef::from_bytes(bytes),
            Err(FileError::MalformedRef(_) | FileError::TooLarge { .. })
        )
    };
    for key in ["blob", "key", "sha256", "size", "name", "type", "chunk"] {
        let missing = edited(|e| e.retain(|(k, _)| k.as_str() != Some(key)));
        assert!(malformed(&missing), "without {key}");
        let nil = edited(|e| set(e, key, Value::Nil));
        assert!(malformed(&nil), "{key} nil");
    }
    let repeated = edited(|e| e.push(("name".into(), "again".into())));
    assert!(malformed(&repeated));
    let bad: Vec<(&str, Value)> = vec![
        ("blob", Value::Binary(vec![0; 15])),
        ("blob", Value::from("b1b1b1b1b1b1b1b1")),
        ("key", Value::Binary(vec![0; 31])),
        ("sha256", Value::Binary(vec![0; 33])),
        ("size", Value::from(-1)),
        ("size", Value::from(u64::MAX)),
        ("name", Value::from("")),
        ("name", Value::from("n".repeat(256))),
        ("name", Value::Binary(b"name".to_vec())),
        ("type", Value::from("t".repeat(128))),
        ("chunk", Value::from(65_535)),
        ("chunk", Value::from(131_072)),
    ];
    for (key, value) in bad {
        let bytes = edited(|e| set(e, key, value.clone()));
        assert!(malformed(&bytes), "{key} = {value:?}");
    }
    let fine = edited(|e| {
        set(e, "name", Value::from("n".repeat(255)));
        set(e, "type", Value::from(""));
    });
    assert!(FileRef::from_bytes(&fine).is_ok());
    let mut trailing = vector_ref().to_bytes().unwrap().to_vec();
    trailing.push(0xc0);
    assert!(malformed(&trailing));
    assert!(malformed(&[0x93, 1, 2, 3]));
    assert!(malformed(&[]));
    let huge = edited(|e| e.push(("pad".into(), Value::Binary(vec![0; MAX_FILE_REF_LEN]))));
    assert!(malformed(&huge));
    let mut invalid_name = edited(|e| set(e, "name", Value::from("ab")));
    let at = invalid_name
        .windows(3)
        .position(|w| w == [0xa2, b'a', b'b'])
        .unwrap();
    invalid_name[at + 1] = 0xff;
    assert!(malformed(&invalid_name));
}
