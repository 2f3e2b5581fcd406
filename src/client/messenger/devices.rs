//! Sending to every device (`docs/PROTOCOL.md` E14): the prekey bundles of devices without a
//! session, the copies' lists on the wire, and what happens when the server says the lists
//! are stale (`stale_devices`): the sessions with removed devices are dropped, the new devices'
//! bundles fetched, the same message (same id) sealed for them, and sent again.

use std::collections::BTreeMap;

use super::super::copies::{self, Bundles, CopiesError, Destinations, Draft};
use super::super::keystore::{DeviceId, FIRST_DEVICE, KeyState};
use super::super::{ClientError, Copies};
use super::keys::device_bundle;
use super::outbox::{Refusal, body, refusal};
use super::{Messenger, MessengerError, Outgoing, changed_warning, username};
use crate::e2e::PrekeyBundle;
use crate::protocol::Username;

/// Times a message is sealed again for new device lists before it waits for a later flush
/// (each time the server named other lists: devices are being added or removed right now).
const MAX_RESEALS: usize = 3;

/// The copies' lists for the send header: `None` for the one copy of a client from before
/// devices (the recipient's device 1, nothing for one's own), which every server takes.
pub(super) fn wire_copies(out: &Outgoing) -> Option<Copies> {
    let legacy =
        matches!(out.copies.as_slice(), [only] if only.device == FIRST_DEVICE && !only.own);
    (!legacy).then(|| Copies {
        devices: out.devices(),
        own_devices: out.own_devices(),
        lengths: out.copies.iter().map(|c| c.envelope.len() as u64).collect(),
    })
}

/// What a failure to seal a message again means for the outbox.
fn resealing_refusal(e: &MessengerError) -> Refusal {
    match e {
        MessengerError::Client(e) => refusal(e),
        MessengerError::Refused { .. } | MessengerError::E2e(_) => Refusal::Drop,
        _ => Refusal::HoldPeer,
    }
}

/// Maps a failure of [`copies::seal_copies`] for `peer`.
pub(super) fn copies_error(peer: &str, e: CopiesError) -> MessengerError {
    match e {
        CopiesError::Missing(_) => MessengerError::NoSession(peer.to_owned()),
        CopiesError::ForeignOwnDevice { device } => MessengerError::ForeignOwnDevice(device),
        CopiesError::E2e(e) => MessengerError::E2e(e),
    }
}

/// Refuses (with [`MessengerError::VerifiedKeyChanged`]) a peer whose verified identity key
/// changed; else the warning to show while its key differs from the accepted one.
pub(super) fn trust_check(state: &KeyState, peer: &str) -> Result<Option<String>, MessengerError> {
    let trust = state.trust_of(peer);
    if trust.verified && trust.changed_to.is_some() {
        return Err(MessengerError::VerifiedKeyChanged(peer.to_owned()));
    }
    Ok(trust.changed_to.map(|_| changed_warning(peer)))
}

impl Messenger {
    /// The prekey bundles of `user`'s `devices` (all its current devices with keys when
    /// `None`), by device.
    async fn device_bundles(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<BTreeMap<DeviceId, PrekeyBundle>, MessengerError> {
        let fetched = self.client().fetch_bundles(user.as_str(), devices).await?;
        fetched
            .devices
            .iter()
            .map(|d| Ok((d.device, device_bundle(&fetched.identity_key, d)?)))
            .collect()
    }

    /// The prekey bundles of the devices in `missing` (the recipient's, then this account's).
    pub(crate) async fn fetch_bundles(
        &self,
        peer: &Username,
        missing: &Destinations,
    ) -> Result<Bundles, MessengerError> {
        let mut bundles = Bundles::default();
        if !missing.devices.is_empty() {
            bundles.peer = self
                .device_bundles(peer, Some(missing.devices.clone()))
                .await?;
        }
        if !missing.own_devices.is_empty() {
            bundles.own = self
                .device_bundles(&self.me, Some(missing.own_devices.clone()))
                .await?;
        }
        Ok(bundles)
    }

    /// Where a new message to `peer` goes, with the bundles to start the sessions that are
    /// missing: for a peer this client has no session with, every device the server lists
    /// (all their bundles fetched at once); else the devices it knows (corrected by the server
    /// when they are stale).
    pub(super) async fn destinations(
        &self,
        peer: &Username,
    ) -> Result<(Destinations, Bundles), MessengerError> {
        let (mut dest, mut missing, unknown) = {
            let (me, peer) = (self.me.clone(), peer.clone());
            self.keystore
                .read_async(move |s| {
                    let s = s.ok_or(MessengerError::NoKeys)?;
                    let dest = copies::known_destinations(s, &me, &peer);
                    let missing = copies::missing(s, &me, &peer, &dest, &Bundles::default());
                    let unknown = s.known_devices(peer.as_str()).is_empty();
                    Ok::<_, MessengerError>((dest, missing, unknown))
                })
                .await??
        };
        let mut all = BTreeMap::new();
        if unknown {
            all = self.device_bundles(peer, None).await?;
            if all.is_empty() {
                // No device of theirs has keys: nothing could be sealed for them.
                return Err(MessengerError::NoSession(peer.as_str().to_owned()));
            }
            dest.devices = all.keys().copied().collect();
            missing.devices.clear();
        }
        let mut bundles = self.fetch_bundles(peer, &missing).await?;
        bundles.peer.extend(all);
        Ok((dest, bundles))
    }

    /// Sends one queued message; when the server says the device lists are stale, seals it
    /// for the current ones and sends it again (at most [`MAX_RESEALS`] times).
    pub(super) async fn send_one(&self, mut out: Outgoing) -> Result<(), (Refusal, String)> {
        for _ in 0..=MAX_RESEALS {
            let sent = self
                .client()
                .send_copies(&out.to, &out.kind, out.id, wire_copies(&out), &body(&out))
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(ClientError::StaleDevices {
                    devices,
                    own_devices,
                }) => {
                    let dest = Destinations {
                        devices,
                        own_devices,
                    };
                    match self.reseal(&out, dest).await {
                        Ok(Some(resealed)) => out = resealed,
                        // Gone from the outbox: another process on this home sent it.
                        Ok(None) => return Ok(()),
                        Err(e) => return Err((resealing_refusal(&e), e.to_string())),
                    }
                }
                Err(e) => return Err((refusal(&e), e.to_string())),
            }
        }
        Err((
            Refusal::HoldPeer,
            "the devices it is for keep changing; it waits in the outbox".into(),
        ))
    }

    /// Seals the queued message `out` for the devices of `dest` (E14.2): the copies already
    /// sealed for devices still listed go as they are, the sessions with devices no longer
    /// listed are dropped, and the new devices get copies in sessions started from their
    /// bundles. Saves and returns the entry as it now is (`None` if it left the outbox).
    async fn reseal(
        &self,
        out: &Outgoing,
        dest: Destinations,
    ) -> Result<Option<Outgoing>, MessengerError> {
        let peer = username(&out.to)?;
        let sealed = |device: DeviceId, own: bool| {
            out.copies
                .iter()
                .any(|c| c.device == device && c.own == own)
        };
        let mut missing = {
            let (me, peer, dest) = (self.me.clone(), peer.clone(), dest.clone());
            self.keystore
                .read_async(move |s| {
                    s.map(|s| copies::missing(s, &me, &peer, &dest, &Bundles::default()))
                })
                .await?
                .ok_or(MessengerError::NoKeys)?
        };
        missing.devices.retain(|d| !sealed(*d, false));
        missing.own_devices.retain(|d| !sealed(*d, true));
        let bundles = self.fetch_bundles(&peer, &missing).await?;
        let (me, id) = (self.me.clone(), out.id);
        self.keystore
            .update_async(move |state| -> Result<_, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                let Some(entry) = state.outbox.iter().find(|o| o.id == id) else {
                    return Ok(None);
                };
                let already = entry.copies.clone();
                let needs_text = dest
                    .devices
                    .iter()
                    .map(|d| (*d, false))
                    .chain(dest.own_devices.iter().map(|d| (*d, true)))
                    .any(|(d, own)| !already.iter().any(|c| c.device == d && c.own == own));
                // An entry from before devices has no text: the history may still hold it.
                let plaintext = entry
                    .plaintext
                    .clone()
                    .or_else(|| entry.text.clone().map(String::into_bytes))
                    .or_else(|| {
                        state
                            .history
                            .iter()
                            .find(|h| h.outgoing && h.id == id && h.peer == peer.as_str())
                            .map(|h| {
                                h.file
                                    .clone()
                                    .unwrap_or_else(|| h.text.clone().into_bytes())
                            })
                    });
                let plaintext = match plaintext {
                    Some(plaintext) => plaintext,
                    None if !needs_text => Vec::new(),
                    None => {
                        return Err(MessengerError::Refused {
                            id,
                            reason: "queued before devices and no longer in the history, it \
                                     cannot be sealed for the recipient's new devices"
                                .into(),
                        });
                    }
                };
                let draft = Draft {
                    to: &peer,
                    id,
                    plaintext: &plaintext,
                };
                let copies = copies::seal_copies(state, &me, draft, &dest, &bundles, &already)
                    .map_err(|e| copies_error(peer.as_str(), e))?;
                trust_check(state, peer.as_str())?;
                let Some(entry) = state.outbox.iter_mut().find(|o| o.id == id) else {
                    return Ok(None);
                };
                entry.copies = copies;
                Ok(Some(entry.clone()))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::keystore::SealedCopy;
    use crate::protocol::MessageId;

    fn out(copies: &[(DeviceId, bool, usize)]) -> Outgoing {
        Outgoing {
            to: "bob".into(),
            id: MessageId([1; 16]),
            kind: "text".into(),
            copies: copies
                .iter()
                .map(|&(device, own, len)| SealedCopy {
                    device,
                    own,
                    envelope: vec![0; len],
                })
                .collect(),
            text: None,
            plaintext: None,
        }
    }

    /// The one copy for device 1 goes with a header of before devices; anything else lists
    /// every copy, the recipient's then one's own, with their lengths.
    #[test]
    fn the_send_header_lists_the_copies_unless_there_is_only_device_1() {
        assert_eq!(wire_copies(&out(&[(1, false, 83)])), None);
        let listed = wire_copies(&out(&[(1, false, 83), (2, false, 339), (3, true, 90)]));
        assert_eq!(
            listed,
            Some(Copies {
                devices: vec![1, 2],
                own_devices: vec![3],
                lengths: vec![83, 339, 90],
            })
        );
        assert_eq!(
            wire_copies(&out(&[(2, false, 5)])).map(|c| c.devices),
            Some(vec![2])
        );
        let with_own = out(&[(1, false, 4), (2, true, 6)]);
        assert_eq!(body(&with_own).len(), 10);
        assert!(wire_copies(&with_own).is_some());
    }
}
