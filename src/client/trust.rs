//! What the user decides about contacts: safety numbers from the identity key they accepted
//! (never from what the server says now), verifying a contact in person, accepting a changed
//! key, starting a session over, and the quarantine and history kept in the home.

use super::keystore::{HistoryEntry, Pinned, Quarantined, Trust};
use super::messenger::OfflineMessenger;
use super::messenger::{Fingerprint, MessengerError, username};
use super::{ClientError, Messenger};
use crate::e2e::{IdentityKey, safety_number};
use crate::protocol::Username;

/// The keys a safety number needs, as the keystore holds them.
struct Known {
    mine: IdentityKey,
    pinned: Option<Pinned>,
    trust: Trust,
}

impl Messenger {
    async fn known(&self, peer: &Username) -> Result<Known, MessengerError> {
        let peer = peer.as_str().to_owned();
        self.keystore()
            .read_async(move |s| {
                s.map(|s| Known {
                    mine: s.identity().public(),
                    pinned: s.pinned.get(&peer).copied(),
                    trust: s.trust_of(&peer),
                })
            })
            .await?
            .ok_or(MessengerError::NoKeys)
    }

    fn number(
        &self,
        mine: &IdentityKey,
        peer: &Username,
        key: &[u8; 32],
    ) -> Result<String, MessengerError> {
        let me = username(self.me())?;
        let key = IdentityKey::from_bytes(key)?;
        Ok(safety_number(&me, mine, peer, &key))
    }

    /// The safety number of this user and `peer`, from the identity key accepted for `peer`.
    /// The server's current answer is compared with it (and reported when it differs); only
    /// when no key was accepted yet does the server's answer become the accepted one (trust on
    /// first use).
    pub async fn fingerprint(&self, peer: &str) -> Result<Fingerprint, MessengerError> {
        let peer = username(peer)?;
        let known = self.known(&peer).await?;
        let server = match self.client().fetch_identity(peer.as_str()).await {
            Ok(key) => Some(key.0),
            Err(e) if is_offline(&e) && known.pinned.is_some() => None,
            Err(e) => return Err(e.into()),
        };
        let pinned = match known.pinned {
            Some(pinned) => pinned,
            None => {
                let Some(key) = server else {
                    return Err(MessengerError::NoSession(peer.as_str().to_owned()));
                };
                let key = IdentityKey::from_bytes(&key)?;
                let name = peer.as_str().to_owned();
                self.keystore()
                    .update_async(move |s| -> Result<(), MessengerError> {
                        let s = s.as_mut().ok_or(MessengerError::NoKeys)?;
                        s.saw_identity(&name, &key);
                        Ok(())
                    })
                    .await?;
                Pinned(*key.as_bytes())
            }
        };
        let changed_to = known.trust.changed_to;
        let server_differs = server.filter(|k| *k != pinned.0 && Some(Pinned(*k)) != changed_to);
        Ok(Fingerprint {
            number: self.number(&known.mine, &peer, &pinned.0)?,
            verified: known.trust.verified,
            changed_to: changed_to
                .map(|k| self.number(&known.mine, &peer, &k.0))
                .transpose()?,
            server_differs: server_differs
                .map(|k| self.number(&known.mine, &peer, &k))
                .transpose()?,
            server_unchecked: server.is_none(),
        })
    }

    /// Marks `peer` verified: the user compared the safety number of the accepted key in
    /// person. Refused while a changed key waits to be accepted, or before any key is known.
    /// Returns the number verified.
    pub async fn verify(&self, peer: &str) -> Result<String, MessengerError> {
        let fingerprint = self.fingerprint(peer).await?;
        if fingerprint.changed_to.is_some() || fingerprint.server_differs.is_some() {
            return Err(MessengerError::KeyInDoubt(peer.to_owned()));
        }
        let name = username(peer)?.as_str().to_owned();
        self.keystore()
            .update_async(move |s| -> Result<(), MessengerError> {
                let s = s.as_mut().ok_or(MessengerError::NoKeys)?;
                s.trust.entry(name).or_default().verified = true;
                Ok(())
            })
            .await?;
        Ok(fingerprint.number)
    }

    /// Accepts the identity key `peer` presents now (the one a message came with, or else the
    /// one the server lists) in place of the accepted one; the contact is then unverified
    /// until `verify`. Returns the new safety number, or `None` if there was no other key to
    /// accept.
    pub async fn trust(&self, peer: &str) -> Result<Option<String>, MessengerError> {
        let peer = username(peer)?;
        let known = self.known(&peer).await?;
        let new = match known.trust.changed_to {
            Some(changed) => changed,
            None => {
                let key = self.client().fetch_identity(peer.as_str()).await?;
                if known.pinned == Some(Pinned(key.0)) {
                    return Ok(None);
                }
                // Checks it is a key at all before accepting it.
                Pinned(*IdentityKey::from_bytes(&key.0)?.as_bytes())
            }
        };
        let name = peer.as_str().to_owned();
        self.keystore()
            .update_async(move |s| -> Result<(), MessengerError> {
                let s = s.as_mut().ok_or(MessengerError::NoKeys)?;
                s.pinned.insert(name.clone(), new);
                s.trust.insert(name.clone(), Trust::default());
                // A session made with another key must not carry on silently.
                let other_key = s.device_sessions.get(&name).is_some_and(|devices| {
                    devices.values().any(|d| {
                        d.active
                            .as_ref()
                            .is_some_and(|session| session.peer_identity().as_bytes() != &new.0)
                    })
                });
                if other_key {
                    s.reset(&name);
                }
                Ok(())
            })
            .await?;
        Ok(Some(self.number(&known.mine, &peer, &new.0)?))
    }
}

impl OfflineMessenger {
    /// Starts over with `peer`: the next message starts a new session from a fresh prekey
    /// bundle (the old session is kept, so what is in flight still opens). Returns whether
    /// there was a session.
    pub async fn reset(&self, peer: &str) -> Result<bool, MessengerError> {
        let name = username(peer)?.as_str().to_owned();
        self.keystore
            .update_async(move |s| -> Result<bool, MessengerError> {
                Ok(s.as_mut().ok_or(MessengerError::NoKeys)?.reset(&name))
            })
            .await
    }

    /// The messages that could not be opened, oldest first.
    pub async fn quarantined(&self) -> Result<Vec<Quarantined>, MessengerError> {
        Ok(self
            .keystore
            .read_async(|s| s.map(|s| s.quarantine.iter().cloned().collect()))
            .await?
            .unwrap_or_default())
    }

    /// Empties the quarantine; returns how many messages it held.
    pub async fn clear_quarantine(&self) -> Result<usize, MessengerError> {
        self.keystore
            .update_async(|s| -> Result<usize, MessengerError> {
                Ok(s.as_mut()
                    .map_or(0, |s| std::mem::take(&mut s.quarantine).len()))
            })
            .await
    }

    /// The last `count` messages of the conversation with `peer`, oldest first.
    pub async fn history(
        &self,
        peer: &str,
        count: usize,
    ) -> Result<Vec<HistoryEntry>, MessengerError> {
        let name = username(peer)?.as_str().to_owned();
        Ok(self
            .keystore
            .read_async(move |s| {
                s.map(|s| {
                    let mut last: Vec<_> = s
                        .history
                        .iter()
                        .rev()
                        .filter(|e| e.peer == name)
                        .take(count)
                        .cloned()
                        .collect();
                    last.reverse();
                    last
                })
            })
            .await?
            .unwrap_or_default())
    }
}

/// Whether `e` means the server could not be asked (rather than that it answered no).
pub fn is_offline(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. }
            | ClientError::ConnectionLost(_)
            | ClientError::Closed { .. }
            | ClientError::Timeout(_)
            | ClientError::Refused(_)
    )
}
