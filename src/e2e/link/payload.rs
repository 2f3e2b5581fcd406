//! The link payload (PROTOCOL.md E13): what the existing device hands the new one, a named
//! MessagePack map `{version, username, identity_seed, contacts}`, with its encoder and strict
//! decoder. Sealing it is `link`'s job.
//!
//! The decoder refuses unknown, repeated and missing keys and any other type than documented,
//! like the envelope's: this is a versioned cryptographic format, and a field one side would
//! ignore is a field the other might have meant.

use std::collections::BTreeSet;

use rmpv::Value;
use zeroize::{Zeroize, Zeroizing};

use super::LinkError;
use crate::e2e::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
use crate::protocol::Username;

/// Most pinned contacts one payload carries (a sealed payload then stays below
/// `MAX_LINK_PAYLOAD_LEN`: about 100 bytes per contact).
pub const MAX_LINK_CONTACTS: usize = 500;
/// The only payload version.
const VERSION: u64 = 1;

/// What the existing device transfers: the account's identity and the identities it pinned.
/// Not transferred: sessions, history, outbox, prekeys (the new device makes its own).
#[derive(Debug, Clone)]
pub struct LinkPayload {
    /// The account being linked (the new device refuses a payload for another one).
    pub account: Username,
    /// The account's identity key pair (its seed travels; zeroized on drop, masked in `Debug`).
    pub identity: IdentityKeyPair,
    /// The pinned contacts, each at most once, never the account itself.
    pub contacts: Vec<LinkContact>,
}

/// One pinned contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkContact {
    /// The contact's canonical username.
    pub username: Username,
    /// The identity key pinned for it.
    pub identity_key: IdentityKey,
    /// Whether the user compared safety numbers with it.
    pub verified: bool,
}

impl LinkPayload {
    /// The payload's MessagePack (E13.4), in a buffer wiped when dropped.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, LinkError> {
        encode_payload(self)
    }

    /// Decodes an opened payload strictly (E13.4).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LinkError> {
        decode_payload(bytes)
    }
}

fn malformed(why: impl Into<String>) -> LinkError {
    LinkError::MalformedPayload(why.into())
}

/// The contact rules both sides apply: bounded, no repeats, not the account itself.
fn check_contacts(account: &Username, contacts: &[LinkContact]) -> Result<(), LinkError> {
    if contacts.len() > MAX_LINK_CONTACTS {
        return Err(LinkError::TooManyContacts {
            count: contacts.len(),
            max: MAX_LINK_CONTACTS,
        });
    }
    let mut seen = BTreeSet::new();
    for contact in contacts {
        if &contact.username == account {
            return Err(malformed("the account is listed as its own contact"));
        }
        if !seen.insert(contact.username.as_str()) {
            return Err(malformed("a contact is listed twice"));
        }
    }
    Ok(())
}

/// Named MessagePack, keys in the documented order; the buffer is sized up front so that no
/// reallocation leaves a copy of the seed behind, and it is wiped when dropped.
pub(crate) fn encode_payload(payload: &LinkPayload) -> Result<Zeroizing<Vec<u8>>, LinkError> {
    check_contacts(&payload.account, &payload.contacts)?;
    let mut out = Zeroizing::new(Vec::with_capacity(128 + 128 * payload.contacts.len()));
    let buf: &mut Vec<u8> = &mut out;
    let len = u32::try_from(payload.contacts.len()).map_err(|_| LinkError::Primitive)?;
    let io = |_| LinkError::Primitive;
    rmp::encode::write_map_len(buf, 4).map_err(io)?;
    rmp::encode::write_str(buf, "version").map_err(io)?;
    rmp::encode::write_uint(buf, VERSION).map_err(io)?;
    rmp::encode::write_str(buf, "username").map_err(io)?;
    rmp::encode::write_str(buf, payload.account.as_str()).map_err(io)?;
    rmp::encode::write_str(buf, "identity_seed").map_err(io)?;
    rmp::encode::write_bin(buf, payload.identity.expose_seed()).map_err(io)?;
    rmp::encode::write_str(buf, "contacts").map_err(io)?;
    rmp::encode::write_array_len(buf, len).map_err(io)?;
    for contact in &payload.contacts {
        rmp::encode::write_map_len(buf, 3).map_err(io)?;
        rmp::encode::write_str(buf, "username").map_err(io)?;
        rmp::encode::write_str(buf, contact.username.as_str()).map_err(io)?;
        rmp::encode::write_str(buf, "identity_key").map_err(io)?;
        rmp::encode::write_bin(buf, contact.identity_key.as_bytes()).map_err(io)?;
        rmp::encode::write_str(buf, "verified").map_err(io)?;
        rmp::encode::write_bool(buf, contact.verified).map_err(|_| LinkError::Primitive)?;
    }
    Ok(out)
}

/// A decoded MessagePack tree whose byte strings are wiped when it is dropped (it holds the
/// identity seed).
struct Wiped(Value);

impl Drop for Wiped {
    fn drop(&mut self) {
        fn wipe(value: &mut Value) {
            match value {
                Value::Binary(bytes) => bytes.zeroize(),
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

/// Decodes a payload strictly: one map and nothing after it, exactly the documented keys with
/// their types, version 1, valid usernames and identity keys, the contact rules.
pub(crate) fn decode_payload(bytes: &[u8]) -> Result<LinkPayload, LinkError> {
    let mut rest = bytes;
    // The walk below checks the shape; the depth bound only keeps recursion shallow (rmpv
    // counts a container or a string as two levels).
    let tree = Wiped(
        rmpv::decode::read_value_with_max_depth(&mut rest, 16)
            .map_err(|_| malformed("not a MessagePack value (or nested too deep)"))?,
    );
    if !rest.is_empty() {
        return Err(malformed("bytes follow the MessagePack value"));
    }
    let [version, username, seed, contacts] = fields(
        &tree.0,
        "payload",
        ["version", "username", "identity_seed", "contacts"],
    )?;
    if version.as_u64() != Some(VERSION) {
        return Err(malformed("`version` must be 1"));
    }
    let account = username_of(username, "username")?;
    let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
        bin(seed, "identity_seed")?
            .try_into()
            .map_err(|_| malformed("`identity_seed` must be 32 bytes"))?,
    );
    let Value::Array(items) = contacts else {
        return Err(malformed("`contacts` must be an array"));
    };
    if items.len() > MAX_LINK_CONTACTS {
        return Err(LinkError::TooManyContacts {
            count: items.len(),
            max: MAX_LINK_CONTACTS,
        });
    }
    let mut list = Vec::with_capacity(items.len());
    for item in items {
        let [name, key, verified] =
            fields(item, "contact", ["username", "identity_key", "verified"])?;
        let key: [u8; IDENTITY_KEY_LEN] = bin(key, "identity_key")?
            .try_into()
            .map_err(|_| malformed("`identity_key` must be 32 bytes"))?;
        list.push(LinkContact {
            username: username_of(name, "contact username")?,
            identity_key: IdentityKey::from_bytes(&key)
                .map_err(|_| malformed("a contact's `identity_key` is not a valid key"))?,
            verified: verified
                .as_bool()
                .ok_or_else(|| malformed("`verified` must be a boolean"))?,
        });
    }
    check_contacts(&account, &list)?;
    Ok(LinkPayload {
        account,
        identity: IdentityKeyPair::from_seed(&seed),
        contacts: list,
    })
}

/// The values of a map that has exactly the keys `names` (strings, each once, any order).
fn fields<'a, const N: usize>(
    value: &'a Value,
    what: &str,
    names: [&str; N],
) -> Result<[&'a Value; N], LinkError> {
    let Value::Map(entries) = value else {
        return Err(malformed(format!("`{what}` must be a map")));
    };
    let mut found: [Option<&Value>; N] = [None; N];
    for (key, field) in entries {
        let key = key
            .as_str()
            .ok_or_else(|| malformed(format!("`{what}` has a key that is not a string")))?;
        let index = names
            .iter()
            .position(|name| *name == key)
            .ok_or_else(|| malformed(format!("`{what}` has an unknown key")))?;
        if found[index].replace(field).is_some() {
            return Err(malformed(format!("`{what}` repeats a key")));
        }
    }
    let mut out = [&Value::Nil; N];
    for (slot, (value, name)) in out.iter_mut().zip(found.into_iter().zip(names)) {
        *slot = value.ok_or_else(|| malformed(format!("`{what}` lacks `{name}`")))?;
    }
    Ok(out)
}

fn bin<'a>(value: &'a Value, what: &str) -> Result<&'a [u8], LinkError> {
    match value {
        Value::Binary(bytes) => Ok(bytes),
        _ => Err(malformed(format!("`{what}` must be bin"))),
    }
}

/// A username as sent: a string that is already canonical (folding would make two encodings).
fn username_of(value: &Value, what: &str) -> Result<Username, LinkError> {
    let raw = value
        .as_str()
        .ok_or_else(|| malformed(format!("`{what}` must be a string")))?;
    let name = Username::parse(raw).map_err(|_| malformed(format!("`{what}` is not valid")))?;
    if name.as_str() != raw {
        return Err(malformed(format!("`{what}` is not canonical")));
    }
    Ok(name)
}
