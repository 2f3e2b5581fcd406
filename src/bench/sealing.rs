//! End-to-end sealing for the load: every benchmark message is encrypted by its sender's
//! Double Ratchet sessions and opened by its receivers, as a real client does. Sessions live
//! in memory (a real client also persists them; that disk cost is the client's, not the
//! server's, and is left out so the load generator does not crowd the server off the cores).
//!
//! With devices (PROTOCOL.md E14) a sender holds one session per destination device and seals
//! each message once per device: for each of the recipient's devices, then a copy (E14.3, the
//! addressee in the associated data) for each of its own other devices.

use std::collections::HashMap;
use std::sync::Mutex;

use super::BenchError;
use crate::client::messenger::{to_bundle, wire_one_time, wire_signed};
use crate::client::{Bundle, Client};
use crate::e2e::{E2eError, Envelope, IdentityKeyPair, PrekeyStore, Session};
use crate::protocol::keys::Bin;
use crate::protocol::{Copies, DeviceId, MessageId, Username};

/// One-time prekeys each benchmark device publishes.
const ONE_TIME_PREKEYS: u32 = 4;

fn e2e(what: &str, e: E2eError) -> BenchError {
    BenchError::Setup(format!("{what}: {e}"))
}

fn name(raw: &str) -> Result<Username, BenchError> {
    Username::parse(raw).map_err(|e| BenchError::Setup(format!("bench user name {raw}: {e}")))
}

/// A device's identity (the account's) and prekeys, with the public halves published on the
/// server.
pub(crate) struct Keys {
    me: Username,
    identity: IdentityKeyPair,
    prekeys: PrekeyStore,
}

impl Keys {
    /// Makes an identity and prekeys for `client`'s user (`me`, device 1) and publishes them.
    pub async fn publish(client: &Client, me: &str) -> Result<Self, BenchError> {
        let identity = IdentityKeyPair::generate().map_err(|e| e2e("identity", e))?;
        Self::publish_with(client, me, identity).await
    }

    /// Makes prekeys under the account's `identity` (a linked device received it in the link
    /// payload) and publishes them for `client`'s device.
    pub async fn publish_with(
        client: &Client,
        me: &str,
        identity: IdentityKeyPair,
    ) -> Result<Self, BenchError> {
        let prekeys =
            PrekeyStore::generate(&identity, ONE_TIME_PREKEYS).map_err(|e| e2e("prekeys", e))?;
        client
            .publish_keys(
                Some(Bin(*identity.public().as_bytes())),
                Some(wire_signed(&prekeys.signed_prekey())),
                Some(wire_signed(&prekeys.last_resort_prekey())),
                prekeys
                    .one_time_prekeys()
                    .iter()
                    .map(wire_one_time)
                    .collect(),
            )
            .await?;
        Ok(Self {
            me: name(me)?,
            identity,
            prekeys,
        })
    }

    /// The account's identity key pair (what a link hands to a new device).
    pub fn identity(&self) -> &IdentityKeyPair {
        &self.identity
    }

    /// A session toward `peer`'s device 1 from the bundle the server hands out (X3DH), sending
    /// headers without copies, as a client from before devices does.
    pub async fn seal_to(&self, client: &Client, peer: &str) -> Result<Sealer, BenchError> {
        let bundle = client.fetch_bundle(peer).await?;
        let bundle = to_bundle(&bundle).map_err(|e| e2e("bundle", e))?;
        let session = Session::initiate(&self.identity, &self.me, &name(peer)?, &bundle)
            .map_err(|e| e2e("initiate", e))?;
        Ok(Sealer {
            destinations: Mutex::new(vec![(session, None)]),
            copies: None,
        })
    }

    /// Sessions toward every current device of `peer` and toward `own` (this account's other
    /// devices), from their bundles (X3DH each): the sealer of E14.2. A bundle of one's own
    /// device must carry this account's identity key (E14.2, 5): it is checked here.
    pub async fn seal_to_devices(
        &self,
        client: &Client,
        peer: &str,
        own: &[DeviceId],
    ) -> Result<Sealer, BenchError> {
        let peer_name = name(peer)?;
        let mut destinations = Vec::new();
        let mut devices = Vec::new();
        let mut own_devices = Vec::new();
        let fetched = client.fetch_bundles(peer, None).await?;
        for device in &fetched.devices {
            let bundle = device_bundle(&fetched.identity_key, device)?;
            let session = Session::initiate(&self.identity, &self.me, &peer_name, &bundle)
                .map_err(|e| e2e("initiate", e))?;
            destinations.push((session, None));
            devices.push(device.device);
        }
        if !own.is_empty() {
            let fetched = client
                .fetch_bundles(self.me.as_str(), Some(own.to_vec()))
                .await?;
            if fetched.identity_key.0 != *self.identity.public().as_bytes() {
                return Err(BenchError::Setup(format!(
                    "{}'s own devices came with another identity key",
                    self.me
                )));
            }
            for device in &fetched.devices {
                let bundle = device_bundle(&fetched.identity_key, device)?;
                let session = Session::initiate(&self.identity, &self.me, &self.me, &bundle)
                    .map_err(|e| e2e("initiate own", e))?;
                destinations.push((session, Some(peer_name.clone())));
                own_devices.push(device.device);
            }
            if own_devices != own {
                return Err(BenchError::Setup(format!(
                    "{}: bundles for own devices {own_devices:?}, wanted {own:?}",
                    self.me
                )));
            }
        }
        let lengths = vec![0; destinations.len()];
        Ok(Sealer {
            destinations: Mutex::new(destinations),
            copies: Some(Copies {
                devices,
                own_devices,
                lengths,
            }),
        })
    }

    /// Opens what peers send to this device.
    pub fn opener(self) -> Opener {
        Opener {
            keys: self,
            sessions: HashMap::new(),
        }
    }
}

/// The e2e bundle of one device from a `bundle` reply.
fn device_bundle(
    identity_key: &crate::protocol::keys::IdentityKeyBytes,
    device: &crate::protocol::DeviceBundle,
) -> Result<crate::e2e::PrekeyBundle, BenchError> {
    to_bundle(&Bundle {
        username: String::new(),
        identity_key: *identity_key,
        signed_prekey: device.signed_prekey.clone(),
        one_time_prekey: device.one_time_prekey.clone(),
        last_resort: device.last_resort.clone(),
    })
    .map_err(|e| e2e("bundle", e))
}

/// Seals messages to one peer's devices (and copies to the sender's own); shared by the
/// sender's sends in flight. Each session is paired with the addressee its copies name (`None`:
/// a session with the recipient).
pub(crate) struct Sealer {
    destinations: Mutex<Vec<(Session, Option<Username>)>>,
    /// The header's copy lists (lengths filled per message); `None` sends the legacy header:
    /// one copy, for the recipient's device 1.
    copies: Option<Copies>,
}

impl Sealer {
    /// The wire body carrying `plaintext` under `id` (the envelopes back to back), and the
    /// header's copies for it.
    pub fn seal(
        &self,
        id: MessageId,
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Option<Copies>), BenchError> {
        let mut destinations = self
            .destinations
            .lock()
            .map_err(|_| BenchError::Setup("a sealing session was poisoned".into()))?;
        let mut body = Vec::new();
        let mut lengths = Vec::with_capacity(destinations.len());
        for (session, copy_to) in destinations.iter_mut() {
            let envelope = match copy_to {
                None => session.seal(id.0, plaintext),
                Some(to) => session.seal_copy(id.0, to, plaintext),
            }
            .map_err(|e| e2e("seal", e))?;
            let bytes = envelope.to_bytes().map_err(|e| e2e("envelope", e))?;
            lengths.push(bytes.len() as u64);
            // One copy (always so without copy lists): the body is that envelope itself.
            if body.is_empty() {
                body = bytes;
            } else {
                body.extend_from_slice(&bytes);
            }
        }
        let copies = self.copies.as_ref().map(|copies| Copies {
            devices: copies.devices.clone(),
            own_devices: copies.own_devices.clone(),
            lengths,
        });
        Ok((body, copies))
    }

    /// How many copies each message carries.
    pub fn copies_per_message(&self) -> usize {
        match &self.copies {
            None => 1,
            Some(copies) => copies.devices.len() + copies.own_devices.len(),
        }
    }
}

/// Opens what other devices send to this one: accepts a session on the first envelope from
/// each (user, device), as E14.1 keeps one session per pair of devices; a copy from another
/// device of this account (`to` set) opens under its addressee (E14.3).
pub(crate) struct Opener {
    keys: Keys,
    /// By user, then by device (looked up by `&str`: no allocation per message).
    sessions: HashMap<String, Vec<(DeviceId, Session)>>,
}

impl Opener {
    /// The plaintext of `body` from `from`'s device `from_device` under `id`, a copy of a
    /// message to `to` when `to` is set; an error means the message was altered or
    /// mis-delivered, which a benchmark must not count as delivered.
    pub fn open(
        &mut self,
        (from, from_device): (&str, DeviceId),
        to: Option<&str>,
        id: MessageId,
        body: &[u8],
    ) -> Result<Vec<u8>, BenchError> {
        let envelope = Envelope::from_bytes(body).map_err(|e| e2e("envelope", e))?;
        let to = to.map(name).transpose()?;
        let known = self.sessions.get_mut(from).and_then(|devices| {
            devices
                .iter_mut()
                .find(|(device, _)| *device == from_device)
                .map(|(_, session)| session)
        });
        if let Some(session) = known {
            return match &to {
                None => session.open(id.0, &envelope),
                Some(to) => session.open_copy(id.0, to, &envelope),
            }
            .map_err(|e| e2e("open", e));
        }
        let keys = &mut self.keys;
        let (session, plaintext) = match &to {
            None => Session::accept(
                &keys.identity,
                &mut keys.prekeys,
                &keys.me,
                &name(from)?,
                id.0,
                &envelope,
            ),
            Some(to) => {
                if from != keys.me.as_str() {
                    return Err(BenchError::Setup(format!(
                        "{}: a copy addressed to {to} came from {from}, not from this account",
                        keys.me
                    )));
                }
                Session::accept_copy(
                    &keys.identity,
                    &mut keys.prekeys,
                    &keys.me,
                    to,
                    id.0,
                    &envelope,
                )
            }
        }
        .map_err(|e| e2e("accept", e))?;
        self.sessions
            .entry(from.to_owned())
            .or_default()
            .push((from_device, session));
        Ok(plaintext)
    }
}
