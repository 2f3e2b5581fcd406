//! One message, sealed once per device (`docs/PROTOCOL.md` E14): once for each of the
//! recipient's devices, in the session with that device, and once for each of this account's
//! other devices, as a copy naming the addressee. Sessions are started from fetched prekey
//! bundles where none exists, and the sessions with devices no longer listed are dropped.
//! Pure functions over the keystore's state: the caller fetches the bundles [`missing`] names
//! and saves the state.

use std::collections::BTreeMap;

use super::keystore::{DeviceId, KeyState, SealedCopy};
use crate::e2e::{E2eError, PrekeyBundle, Session};
use crate::protocol::{MessageId, Username};

/// Where a message goes: the devices the server lists for the recipient, and this account's
/// other devices (without the sending one), each ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// The recipient's devices.
    pub devices: Vec<DeviceId>,
    /// This account's other devices.
    pub own_devices: Vec<DeviceId>,
}

/// Prekey bundles fetched for devices without a session.
#[derive(Debug, Clone, Default)]
pub struct Bundles {
    /// The recipient's, by device.
    pub peer: BTreeMap<DeviceId, PrekeyBundle>,
    /// This account's, by device.
    pub own: BTreeMap<DeviceId, PrekeyBundle>,
}

/// Why a message could not be sealed for every device.
#[derive(Debug, thiserror::Error)]
pub enum CopiesError {
    /// Devices without a session and without a bundle to start one: fetch their bundles and
    /// try again.
    #[error("no session with some devices yet ({0:?})")]
    Missing(Destinations),
    /// A bundle for one of this account's devices names another identity key than this
    /// account's: the server (or someone in the middle) offers a device that is not ours.
    #[error("the server offers device {device} of this account with another identity key")]
    ForeignOwnDevice {
        /// The device.
        device: DeviceId,
    },
    /// Sealing failed.
    #[error(transparent)]
    E2e(#[from] E2eError),
}

/// The devices of `dest` with no active session and no bundle in `bundles`: their bundles
/// must be fetched first (an empty result: nothing is missing).
pub fn missing(
    state: &KeyState,
    me: &Username,
    peer: &Username,
    dest: &Destinations,
    bundles: &Bundles,
) -> Destinations {
    let lacking = |name: &Username, devices: &[DeviceId], fetched: &BTreeMap<_, _>| {
        devices
            .iter()
            .copied()
            .filter(|d| state.active(name.as_str(), *d).is_none() && !fetched.contains_key(d))
            .collect()
    };
    Destinations {
        devices: lacking(peer, &dest.devices, &bundles.peer),
        own_devices: lacking(me, &dest.own_devices, &bundles.own),
    }
}

/// A message to seal: its addressee, id and content.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    /// The recipient (the addressee the copies for this account's devices name).
    pub to: &'a Username,
    /// The message's id.
    pub id: MessageId,
    /// The content (padded when sealed).
    pub plaintext: &'a [u8],
}

/// Seals `draft`, sent by `me`, for every device of `dest`: the recipient's devices first,
/// then this account's other devices (copies naming the recipient), in the order listed. A copy already in `sealed` for the same device is reused as it is (the
/// same bytes go again); the others are sealed in the active session with their device,
/// started from `bundles` where there is none. Sessions with devices `dest` does not list are
/// dropped. A peer bundle's identity key is recorded as seen for `peer` (pinned on first use);
/// comparing it with a verified key is the caller's job.
///
/// On an error nothing is sealed, but the state may have changed: the caller discards it.
pub fn seal_copies(
    state: &mut KeyState,
    me: &Username,
    draft: Draft<'_>,
    dest: &Destinations,
    bundles: &Bundles,
    sealed: &[SealedCopy],
) -> Result<Vec<SealedCopy>, CopiesError> {
    let peer = draft.to;
    let reusable = |device: DeviceId, own: bool| {
        sealed
            .iter()
            .find(|c| c.device == device && c.own == own)
            .cloned()
    };
    let lacking = missing(state, me, peer, dest, bundles);
    let lacking = Destinations {
        devices: lacking
            .devices
            .into_iter()
            .filter(|d| reusable(*d, false).is_none())
            .collect(),
        own_devices: lacking
            .own_devices
            .into_iter()
            .filter(|d| reusable(*d, true).is_none())
            .collect(),
    };
    if !lacking.devices.is_empty() || !lacking.own_devices.is_empty() {
        return Err(CopiesError::Missing(lacking));
    }
    let identity = state.identity();
    state.forget_devices(peer.as_str(), &dest.devices);
    state.forget_devices(me.as_str(), &dest.own_devices);
    let mut copies = Vec::with_capacity(dest.devices.len() + dest.own_devices.len());
    for (devices, own) in [(&dest.devices, false), (&dest.own_devices, true)] {
        let name = if own { me } else { peer };
        for &device in devices {
            if let Some(copy) = reusable(device, own) {
                copies.push(copy);
                continue;
            }
            if state.active(name.as_str(), device).is_none() {
                let fetched = if own { &bundles.own } else { &bundles.peer };
                let Some(bundle) = fetched.get(&device) else {
                    // Checked above; kept as an answer rather than a panic.
                    return Err(CopiesError::Missing(Destinations::default()));
                };
                if own {
                    if bundle.identity_key != identity.public() {
                        return Err(CopiesError::ForeignOwnDevice { device });
                    }
                } else {
                    state.saw_identity(name.as_str(), &bundle.identity_key);
                }
                let session = Session::initiate(&identity, me, name, bundle)?;
                state.activate(name.as_str(), device, session);
            }
            let Some(session) = state.active_mut(name.as_str(), device) else {
                return Err(CopiesError::Missing(Destinations::default()));
            };
            let envelope = if own {
                session.seal_copy(draft.id.0, peer, draft.plaintext)?
            } else {
                session.seal(draft.id.0, draft.plaintext)?
            };
            copies.push(SealedCopy {
                device,
                own,
                envelope: envelope.to_bytes()?,
            });
        }
    }
    Ok(copies)
}

/// Where a message to `peer` goes as far as this client knows: the recipient's devices it
/// holds sessions with (device 1 for a peer it has none with, as every account has), and
/// this account's other devices it holds sessions with. The server corrects the lists when
/// they are stale.
pub fn known_destinations(state: &KeyState, me: &Username, peer: &Username) -> Destinations {
    let mut devices = state.known_devices(peer.as_str());
    if devices.is_empty() {
        devices.push(super::keystore::FIRST_DEVICE);
    }
    let own_devices = state
        .known_devices(me.as_str())
        .into_iter()
        .filter(|d| *d != state.device)
        .collect();
    Destinations {
        devices,
        own_devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::sessions::{self, Origin};
    use crate::e2e::{IdentityKeyPair, PrekeyStore};

    /// Device `device` of `account` (identity from `seed`).
    fn device(account: &str, seed: u8, device: DeviceId) -> (Username, KeyState) {
        let identity = IdentityKeyPair::from_seed(&[seed; 32]);
        let prekeys = PrekeyStore::generate(&identity, 4).unwrap();
        (
            Username::parse(account).unwrap(),
            KeyState::for_device(account, device, &identity, prekeys, 0),
        )
    }

    fn bundle(state: &KeyState) -> PrekeyBundle {
        PrekeyBundle {
            identity_key: state.identity().public(),
            signed_prekey: state.prekeys.signed_prekey(),
            one_time_prekey: state.prekeys.one_time_prekeys().first().cloned(),
            last_resort_prekey: Some(state.prekeys.last_resort_prekey()),
        }
    }

    fn dest(devices: &[DeviceId], own: &[DeviceId]) -> Destinations {
        Destinations {
            devices: devices.to_vec(),
            own_devices: own.to_vec(),
        }
    }

    /// `from` seals `text` to `to` for `dest`, fetching (from `peers` and `own`, by device
    /// id) the bundles [`missing`] names.
    fn send(
        from: &mut (Username, KeyState),
        to: &Username,
        n: u8,
        text: &str,
        dest: &Destinations,
        devices: &[&(Username, KeyState)],
    ) -> (MessageId, Vec<SealedCopy>) {
        let (me, state) = from;
        let lacking = missing(state, me, to, dest, &Bundles::default());
        let mut bundles = Bundles::default();
        for (name, other) in devices {
            if name == to && lacking.devices.contains(&other.device) {
                bundles.peer.insert(other.device, bundle(other));
            }
            if name == me && lacking.own_devices.contains(&other.device) {
                bundles.own.insert(other.device, bundle(other));
            }
        }
        let id = MessageId([n; 16]);
        let draft = Draft {
            to,
            id,
            plaintext: text.as_bytes(),
        };
        let copies = seal_copies(state, me, draft, dest, &bundles, &[]).unwrap();
        (id, copies)
    }

    fn read(
        at: &mut (Username, KeyState),
        from: &(Username, KeyState),
        to: Option<&Username>,
        id: MessageId,
        copy: &SealedCopy,
    ) -> Result<String, E2eError> {
        let origin = Origin {
            peer: &from.0,
            device: from.1.device,
            to,
        };
        let opened = sessions::open(&mut at.1, &at.0, origin, id, &copy.envelope)?;
        Ok(String::from_utf8(opened.plaintext).unwrap())
    }

    /// alice (devices 1, 2) and bob (devices 1, 2): every message reaches every device of the
    /// recipient, and the sender's other device gets a copy naming the recipient, both ways.
    #[test]
    fn one_message_reaches_every_device_and_the_senders_other_devices() {
        let mut a1 = device("alice", 1, 1);
        let mut a2 = device("alice", 1, 2);
        let mut b1 = device("bob", 2, 1);
        let mut b2 = device("bob", 2, 2);
        let (alice, bob) = (a1.0.clone(), b1.0.clone());
        let (id, copies) = send(
            &mut a1,
            &bob,
            1,
            "hi bob",
            &dest(&[1, 2], &[2]),
            &[&a2, &b1, &b2],
        );
        let order: Vec<_> = copies.iter().map(|c| (c.device, c.own)).collect();
        assert_eq!(order, [(1, false), (2, false), (2, true)]);
        assert_eq!(read(&mut b1, &a1, None, id, &copies[0]).unwrap(), "hi bob");
        assert_eq!(read(&mut b2, &a1, None, id, &copies[1]).unwrap(), "hi bob");
        // A copy relabelled by the server does not open (and starts no session); the true
        // addressee opens it.
        let carol = Username::parse("carol").unwrap();
        assert_eq!(
            read(&mut a2, &a1, Some(&carol), id, &copies[2]),
            Err(E2eError::DecryptionFailed)
        );
        assert!(a2.1.known_devices("alice").is_empty());
        assert_eq!(
            read(&mut a2, &a1, Some(&bob), id, &copies[2]).unwrap(),
            "hi bob"
        );
        // A copy is no ordinary message, and only copies come from one's own account.
        assert_eq!(
            read(&mut b1, &a1, Some(&bob), id, &copies[0]),
            Err(E2eError::NotOwnDevice)
        );
        assert_eq!(
            read(&mut a2, &a1, None, id, &copies[2]),
            Err(E2eError::NotOwnDevice)
        );

        // bob answers from device 2: alice's devices 1 and 2, a copy for his device 1.
        let (id, copies) = send(
            &mut b2,
            &alice,
            2,
            "hi alice",
            &dest(&[1, 2], &[1]),
            &[&a1, &a2, &b1],
        );
        assert_eq!(
            read(&mut a1, &b2, None, id, &copies[0]).unwrap(),
            "hi alice"
        );
        assert_eq!(
            read(&mut a2, &b2, None, id, &copies[1]).unwrap(),
            "hi alice"
        );
        assert_eq!(
            read(&mut b1, &b2, Some(&alice), id, &copies[2]).unwrap(),
            "hi alice"
        );
        // Sessions per device pair; the identity stays pinned per account.
        assert_eq!(a1.1.known_devices("bob"), [1, 2]);
        assert_eq!(a1.1.known_devices("alice"), [2]);
        assert_eq!(a2.1.known_devices("bob"), [2]);
        assert!(a2.1.pinned.contains_key("bob") && !a2.1.pinned.contains_key("alice"));

        // Everything goes on in the sessions there are: no bundle is needed any more.
        let (id, copies) = send(&mut a1, &bob, 3, "again", &dest(&[1, 2], &[2]), &[]);
        assert!(
            copies[1].envelope.len() < copies[0].envelope.len(),
            "b2 replied"
        );
        assert_eq!(read(&mut b1, &a1, None, id, &copies[0]).unwrap(), "again");
        assert_eq!(read(&mut b2, &a1, None, id, &copies[1]).unwrap(), "again");
        assert_eq!(
            read(&mut a2, &a1, Some(&bob), id, &copies[2]).unwrap(),
            "again"
        );
    }

    /// The server says the lists were stale (bob removed device 2 and linked device 3, alice
    /// removed her device 2): the sessions with removed devices go, the copy already sealed
    /// for bob's device 1 goes again as it was, and device 3 gets its own.
    #[test]
    fn stale_lists_drop_removed_devices_and_reuse_sealed_copies() {
        let mut a1 = device("alice", 1, 1);
        let a2 = device("alice", 1, 2);
        let mut b1 = device("bob", 2, 1);
        let b2 = device("bob", 2, 2);
        let mut b3 = device("bob", 2, 3);
        let bob = b1.0.clone();
        let (id, first) = send(
            &mut a1,
            &bob,
            1,
            "x",
            &dest(&[1, 2], &[2]),
            &[&a2, &b1, &b2],
        );
        let now = dest(&[1, 3], &[]);
        let lacking = missing(&a1.1, &a1.0, &bob, &now, &Bundles::default());
        assert_eq!(lacking, dest(&[3], &[]));
        let bundles = Bundles {
            peer: BTreeMap::from([(3, bundle(&b3.1))]),
            own: BTreeMap::new(),
        };
        let draft = Draft {
            to: &bob,
            id,
            plaintext: b"x",
        };
        let again = seal_copies(&mut a1.1, &a1.0, draft, &now, &bundles, &first).unwrap();
        assert_eq!(again[0], first[0]);
        assert_eq!((again[1].device, again[1].own), (3, false));
        assert_eq!(again.len(), 2);
        assert_eq!(a1.1.known_devices("bob"), [1, 3]);
        assert!(a1.1.known_devices("alice").is_empty());
        assert_eq!(read(&mut b1, &a1, None, id, &again[0]).unwrap(), "x");
        assert_eq!(read(&mut b3, &a1, None, id, &again[1]).unwrap(), "x");
        // Without the bundle, nothing is sealed and the caller learns what to fetch.
        let mut fresh = device("alice", 1, 1);
        let draft = Draft {
            to: &bob,
            id,
            plaintext: b"x",
        };
        let refused = seal_copies(&mut fresh.1, &a1.0, draft, &now, &Bundles::default(), &[]);
        assert!(matches!(refused, Err(CopiesError::Missing(m)) if m == dest(&[1, 3], &[])));
    }

    /// A bundle offered for one of alice's own devices with another identity key (the server
    /// adding a device of its own) gets nothing sealed for it.
    #[test]
    fn an_own_device_with_another_identity_is_refused() {
        let a1 = device("alice", 1, 1);
        let mallory = device("alice", 9, 2);
        let bob = Username::parse("bob").unwrap();
        let mut state = a1.1;
        let draft = Draft {
            to: &bob,
            id: MessageId([1; 16]),
            plaintext: b"x",
        };
        let bundles = Bundles {
            peer: BTreeMap::new(),
            own: BTreeMap::from([(2, bundle(&mallory.1))]),
        };
        let refused = seal_copies(&mut state, &a1.0, draft, &dest(&[], &[2]), &bundles, &[]);
        assert!(matches!(
            refused,
            Err(CopiesError::ForeignOwnDevice { device: 2 })
        ));
    }

    /// alice's two devices start sessions with each other at the same moment: both settle on
    /// device 1's (the pair that sorts first), and nothing is lost.
    #[test]
    fn two_devices_of_one_account_starting_at_once_settle_on_one_session() {
        let mut a1 = device("alice", 1, 1);
        let mut a2 = device("alice", 1, 2);
        let bob = Username::parse("bob").unwrap();
        let carol = Username::parse("carol").unwrap();
        let (id1, c1) = send(&mut a1, &bob, 1, "one", &dest(&[], &[2]), &[&a2]);
        let (id2, c2) = send(&mut a2, &carol, 2, "two", &dest(&[], &[1]), &[&a1]);
        assert_eq!(read(&mut a2, &a1, Some(&bob), id1, &c1[0]).unwrap(), "one");
        assert_eq!(
            read(&mut a1, &a2, Some(&carol), id2, &c2[0]).unwrap(),
            "two"
        );
        let origin = |s: &(Username, KeyState), d| *s.1.active("alice", d).unwrap().origin();
        assert_eq!(origin(&a1, 2), origin(&a2, 1));
        let (id3, c3) = send(&mut a2, &carol, 3, "three", &dest(&[], &[1]), &[]);
        assert_eq!(
            read(&mut a1, &a2, Some(&carol), id3, &c3[0]).unwrap(),
            "three"
        );
    }
}
