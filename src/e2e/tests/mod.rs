//! Conversations between two sessions: the behaviour the client relies on. `conversation`
//! covers ordering, persistence and the prekey life cycle; `attacks` covers replay,
//! tampering, forgery, bounds and identity changes; `padding` covers the size buckets. Byte-exact vectors are in `vectors.rs`.

use super::*;
use crate::protocol::Username;

mod attacks;
mod conversation;
mod devices;
mod padding;

pub(super) struct Party {
    pub(super) name: Username,
    pub(super) identity: IdentityKeyPair,
    pub(super) prekeys: PrekeyStore,
}

pub(super) fn party(name: &str, one_time: u32) -> Party {
    let identity = IdentityKeyPair::generate().unwrap();
    let prekeys = PrekeyStore::generate(&identity, one_time).unwrap();
    Party {
        name: Username::parse(name).unwrap(),
        identity,
        prekeys,
    }
}

/// The bundle a server would hand out: a one-time prekey while any is left, else last resort.
pub(super) fn bundle(p: &Party) -> PrekeyBundle {
    let one_time = p.prekeys.one_time_prekeys().into_iter().next();
    PrekeyBundle {
        identity_key: p.identity.public(),
        signed_prekey: p.prekeys.signed_prekey(),
        last_resort_prekey: one_time.is_none().then(|| p.prekeys.last_resort_prekey()),
        one_time_prekey: one_time,
    }
}

pub(super) fn id(n: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[12..].copy_from_slice(&n.to_be_bytes());
    id
}

/// Alice initiates, Bob accepts her first message; returns both sessions.
pub(super) fn start(alice: &Party, bob: &mut Party) -> (Session, Session) {
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(bob)).unwrap();
    let first = a.seal(id(0), b"hi bob").unwrap();
    let (b, text) = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        id(0),
        &first,
    )
    .unwrap();
    assert_eq!(text, b"hi bob");
    (a, b)
}

pub(super) fn snapshot(s: &Session) -> Vec<u8> {
    rmp_serde::to_vec_named(s).unwrap()
}
