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
