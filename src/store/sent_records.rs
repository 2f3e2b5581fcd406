//! The two kinds of value under a `sent_v2` key (sender id ‖ message id).
//!
//! While its message is pending, a send record names every copy's recipient, device and inbox
//! seq ([`SentRecord`]): `unsend` needs them. A message of one copy to device 1 (every message
//! from before devices, and still the usual one) is written in the form of store format 2,
//! `{recipient, seq, expires_at}`, which reads back as that one copy; others as `{copies:
//! [{recipient, device, seq}], expires_at}`. Once a copy leaves its inbox (acknowledged,
//! unsent or expired) the writer replaces the record, in the batch that removes the copy, with a
//! *settled* marker that holds only its expiry: a resend of the id is still answered as a
//! duplicate until then, but nothing left on disk says to whom the message went, so acknowledged
//! messages leave no sender–recipient pair behind (docs/SECURITY.md, the contact graph).

use serde::{Deserialize, Serialize};

use super::{Placed, SentRecord, StoreError};
use crate::protocol::{MessageId, Username};

/// A settled send record: the id was sent and its message is gone from the inbox. (The
/// format; [`settled`] writes it without serde, and a test checks the two agree.)
#[cfg(test)]
#[derive(Debug, Serialize)]
struct Settled {
    /// When the marker expires (the message's own expiry).
    expires_at: u64,
}

/// Any kind of value, as read back: the copies' fields are absent in a settled one.
#[derive(Deserialize)]
struct AnySent {
    #[serde(default)]
    copies: Option<Vec<Placed>>,
    #[serde(default)]
    recipient: Option<Username>,
    #[serde(default)]
    seq: Option<u64>,
    expires_at: u64,
}

/// A pending record of one copy to device 1, in the form of store format 2.
#[derive(Serialize)]
struct OneCopy<'a> {
    recipient: &'a Username,
    seq: u64,
    expires_at: u64,
}

/// A pending record of any other message.
#[derive(Serialize)]
struct Copies<'a> {
    copies: &'a [Placed],
    expires_at: u64,
}

/// An upper bound on a one-copy record's encoding beyond the recipient's name (47 bytes at
/// most; a test checks it).
const ONE_COPY_OVERHEAD: usize = 64;

/// The stored form of the pending send record of a message of one copy, to `recipient`'s
/// device 1 (see the module doc).
pub(super) fn encode_one(
    recipient: &Username,
    seq: u64,
    expires_at: u64,
) -> Result<Vec<u8>, StoreError> {
    // Sized up front: growing the buffer field by field cost more than the encoding.
    let mut out = Vec::with_capacity(ONE_COPY_OVERHEAD + recipient.as_str().len());
    let one = OneCopy {
        recipient,
        seq,
        expires_at,
    };
    rmp_serde::encode::write_named(&mut out, &one)?;
    Ok(out)
}

/// The stored form of a pending send record (see the module doc).
pub(super) fn encode(record: &SentRecord) -> Result<Vec<u8>, StoreError> {
    if let [only] = record.copies.as_slice()
        && only.device == 1
    {
        return encode_one(&only.recipient, only.seq, record.expires_at);
    }
    let copies = Copies {
        copies: &record.copies,
        expires_at: record.expires_at,
    };
    Ok(rmp_serde::to_vec_named(&copies)?)
}

/// What the writer reads of an inbox entry it removes: enough to find its send record.
#[derive(Deserialize)]
pub(super) struct Origin {
    /// The sender's id for the message (absent from an entry with a shared record).
    #[serde(default)]
    pub id: Option<MessageId>,
    /// The sender (idem).
    #[serde(default)]
    pub from: Option<Username>,
    /// The message's expiry, kept by the settled marker.
    pub expires_at: u64,
    /// The shared body the entry references, if any (see `shared_bodies`).
    #[serde(default, with = "serde_bytes")]
    pub shared: Option<super::shared_bodies::BodyKey>,
}

fn decode(bytes: &[u8]) -> Result<AnySent, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyspace: "sent",
        reason: e.to_string(),
    })
}

/// The value of a settled marker expiring at `expires_at`: a `Settled` as a MessagePack
/// map, written field by field into a buffer of its final size (one is written per
/// acknowledged message; through `rmp_serde`, growing its buffer, it cost ≈ 2,700 instructions,
/// 1.6 % of a relayed message). A test checks it is what `rmp_serde` writes.
pub(super) fn settled(expires_at: u64) -> Result<Vec<u8>, StoreError> {
    // fixmap(1), fixstr(10) "expires_at", and a u64 in 9 bytes at most.
    let mut out = Vec::with_capacity(1 + 1 + SETTLED_FIELD.len() + 9);
    let encoding = |e: rmp::encode::ValueWriteError| {
        StoreError::Encode(rmp_serde::encode::Error::InvalidValueWrite(e))
    };
    rmp::encode::write_map_len(&mut out, 1).map_err(encoding)?;
    rmp::encode::write_str(&mut out, SETTLED_FIELD).map_err(encoding)?;
    rmp::encode::write_uint(&mut out, expires_at).map_err(encoding)?;
    Ok(out)
}

/// The one field of `Settled`, by name.
const SETTLED_FIELD: &str = "expires_at";

/// The pending send record in `bytes`, or `None` for a settled marker.
pub(super) fn pending_record(bytes: &[u8]) -> Result<Option<SentRecord>, StoreError> {
    let any = decode(bytes)?;
    Ok(match (any.copies, any.recipient, any.seq) {
        (Some(copies), _, _) => Some(SentRecord {
            copies,
            expires_at: any.expires_at,
        }),
        (None, Some(recipient), Some(seq)) => Some(SentRecord {
            copies: vec![Placed {
                recipient,
                device: 1,
                seq,
            }],
            expires_at: any.expires_at,
        }),
        _ => None,
    })
}

/// When the record or marker in `bytes` expires.
pub(super) fn expires_at(bytes: &[u8]) -> Result<u64, StoreError> {
    Ok(decode(bytes)?.expires_at)
}

/// The origin of the inbox entry in `bytes`.
pub(super) fn origin(bytes: &[u8]) -> Result<Origin, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyspace: "inbox",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredMessage;

    #[test]
    fn a_settled_marker_names_no_recipient_and_keeps_its_expiry() {
        let bob = Username::parse("bob").unwrap();
        let placed = |device, seq| Placed {
            recipient: bob.clone(),
            device,
            seq,
        };
        let record = SentRecord {
            copies: vec![placed(1, 7)],
            expires_at: 99,
        };
        let pending = encode(&record).unwrap();
        assert_eq!(pending_record(&pending).unwrap(), Some(record.clone()));
        assert_eq!(expires_at(&pending).unwrap(), 99);
        // The one-copy form is that of store format 2, whose records read back as it.
        #[derive(Serialize)]
        struct Format2 {
            recipient: Username,
            seq: u64,
            expires_at: u64,
        }
        let old = Format2 {
            recipient: bob.clone(),
            seq: 7,
            expires_at: 99,
        };
        assert_eq!(pending, rmp_serde::to_vec_named(&old).unwrap());
        assert!(pending.capacity() <= ONE_COPY_OVERHEAD + 32);

        let several = SentRecord {
            copies: vec![placed(1, 7), placed(2, 3), placed(5, 1)],
            expires_at: 99,
        };
        let bytes = encode(&several).unwrap();
        assert_eq!(pending_record(&bytes).unwrap(), Some(several));
        assert_eq!(expires_at(&bytes).unwrap(), 99);
        let elsewhere = SentRecord {
            copies: vec![placed(2, 3)],
            expires_at: 99,
        };
        let bytes = encode(&elsewhere).unwrap();
        assert_eq!(pending_record(&bytes).unwrap(), Some(elsewhere));

        let marker = settled(99).unwrap();
        assert!(!marker.windows(3).any(|w| w == b"bob"));
        assert_eq!(pending_record(&marker).unwrap(), None);
        assert_eq!(expires_at(&marker).unwrap(), 99);
    }

    #[test]
    fn a_settled_marker_is_what_serde_writes() {
        for expires_at in [
            0,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            4_000_000_000,
            u64::MAX,
        ] {
            let marker = settled(expires_at).unwrap();
            assert_eq!(
                marker,
                rmp_serde::to_vec_named(&Settled { expires_at }).unwrap()
            );
            assert_eq!(marker.capacity(), 21, "sized up front");
        }
    }

    #[test]
    fn the_origin_is_read_from_a_stored_message() {
        let message = StoredMessage {
            seq: 3,
            id: MessageId([5; 16]),
            from: Username::parse("alice").unwrap(),
            from_device: 2,
            to: None,
            kind: "text".into(),
            sent_at: 1,
            expires_at: 2,
            body: vec![9; 1000],
        };
        let origin = origin(&rmp_serde::to_vec_named(&message).unwrap()).unwrap();
        assert_eq!(
            (
                origin.id,
                origin.from.as_ref().map(Username::as_str),
                origin.expires_at
            ),
            (Some(MessageId([5; 16])), Some("alice"), 2)
        );
    }
}
