//! End-to-end sealing for the load: every benchmark message is encrypted by its sender's
//! Double Ratchet session and opened by its receiver, as a real client does. Sessions live in
//! memory (a real client also persists them; that disk cost is the client's, not the
//! server's, and is left out so the load generator does not crowd the server off the cores).

use std::collections::HashMap;
use std::sync::Mutex;

use super::BenchError;
use crate::client::Client;
use crate::client::messenger::{to_bundle, wire_one_time, wire_signed};
use crate::e2e::{E2eError, Envelope, IdentityKeyPair, PrekeyStore, Session};
use crate::protocol::keys::Bin;
use crate::protocol::{MessageId, Username};

/// One-time prekeys each benchmark user publishes.
const ONE_TIME_PREKEYS: u32 = 4;

fn e2e(what: &str, e: E2eError) -> BenchError {
    BenchError::Setup(format!("{what}: {e}"))
}

fn name(raw: &str) -> Result<Username, BenchError> {
    Username::parse(raw).map_err(|e| BenchError::Setup(format!("bench user name {raw}: {e}")))
}

/// A user's identity and prekeys, with the public halves published on the server.
pub(crate) struct Keys {
    me: Username,
    identity: IdentityKeyPair,
    prekeys: PrekeyStore,
}

impl Keys {
    /// Makes keys for `client`'s user (`me`) and publishes them.
    pub async fn publish(client: &Client, me: &str) -> Result<Self, BenchError> {
        let identity = IdentityKeyPair::generate().map_err(|e| e2e("identity", e))?;
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

    /// A session toward `peer` from the bundle the server hands out (X3DH).
    pub async fn seal_to(&self, client: &Client, peer: &str) -> Result<Sealer, BenchError> {
        let bundle = client.fetch_bundle(peer).await?;
        let bundle = to_bundle(&bundle).map_err(|e| e2e("bundle", e))?;
        let session = Session::initiate(&self.identity, &self.me, &name(peer)?, &bundle)
            .map_err(|e| e2e("initiate", e))?;
        Ok(Sealer(Mutex::new(session)))
    }

    /// Opens what peers send to this user.
    pub fn opener(self) -> Opener {
        Opener {
            keys: self,
            sessions: HashMap::new(),
        }
    }
}

/// Seals messages to one peer; shared by the sender's sends in flight.
pub(crate) struct Sealer(Mutex<Session>);

impl Sealer {
    /// The wire body (an envelope) carrying `plaintext` under `id`.
    pub fn seal(&self, id: MessageId, plaintext: &[u8]) -> Result<Vec<u8>, BenchError> {
        let mut session = self
            .0
            .lock()
            .map_err(|_| BenchError::Setup("a sealing session was poisoned".into()))?;
        let envelope = session.seal(id.0, plaintext).map_err(|e| e2e("seal", e))?;
        envelope.to_bytes().map_err(|e| e2e("envelope", e))
    }
}

/// Opens messages from any peer: accepts a session on the first envelope from each.
pub(crate) struct Opener {
    keys: Keys,
    sessions: HashMap<String, Session>,
}

impl Opener {
    /// The plaintext of `body` from `from` under `id`; an error means the message was altered
    /// or mis-delivered, which a benchmark must not count as delivered.
    pub fn open(&mut self, from: &str, id: MessageId, body: &[u8]) -> Result<Vec<u8>, BenchError> {
        let envelope = Envelope::from_bytes(body).map_err(|e| e2e("envelope", e))?;
        if let Some(session) = self.sessions.get_mut(from) {
            return session.open(id.0, &envelope).map_err(|e| e2e("open", e));
        }
        let keys = &mut self.keys;
        let (session, plaintext) = Session::accept(
            &keys.identity,
            &mut keys.prekeys,
            &keys.me,
            &name(from)?,
            id.0,
            &envelope,
        )
        .map_err(|e| e2e("accept", e))?;
        self.sessions.insert(from.to_owned(), session);
        Ok(plaintext)
    }
}
