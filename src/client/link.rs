//! This account's devices, from the client's side (docs/PROTOCOL.md 5.5 and E13): linking a new
//! device through the server with a short code — the existing device's half ([`open_link`],
//! then [`OpenLink::answer`]) and the new device's ([`join_link`], then [`publish_keys`]) —
//! and (in `devices`) listing, removing and logging in as a device, and replacing the
//! account's identity.
//!
//! The cryptography is `e2e::link`'s; this module drives its states over the `link_*` requests
//! and moves what the payload carries into and out of the home's keystore. The existing device
//! learns that a new device joined from the `link_request` event, which the connection's
//! reader hands over through `LinkRequests`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::home::HomeError;
use super::keystore::{DeviceId, KeyState, Keystore, Pinned, Trust};
use super::messenger::PREKEY_BATCH;
use super::{Client, ClientError, Notices, unexpected};
use crate::e2e::link::{ExistingDevice, JoiningDevice, LinkContact, LinkSecret};
use crate::e2e::{E2eError, IdentityKey, LinkCode, LinkError, LinkPayload, PrekeyStore};
use crate::protocol::keys::Bin;
// The wire forms of prekeys, as the messenger writes them.
use super::messenger::{wire_one_time, wire_signed};
use crate::protocol::{ErrorCode, Reply, Request, SessionToken, Username};

mod devices;

pub use crate::e2e::link::MAX_LINK_CONTACTS;
pub(crate) use devices::send_removal;
pub use devices::{
    DeviceSession, home_keys, list_devices, login_as, remove_device, remove_device_signed,
    replace_identity, was_removed,
};

/// How long an open link waits for the new device: the server lets it lapse after this long
/// (docs/PROTOCOL.md 5.5, step 1).
pub const LINK_WAIT: Duration = Duration::from_secs(300);

/// Most bytes of a device name (docs/PROTOCOL.md 5.5, step 2).
pub const MAX_DEVICE_NAME: usize = 64;

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The server or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The home directory could not be used.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// Making this device's keys failed.
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// A step of the link's cryptography refused what the other side sent (a malformed
    /// message or payload); nothing was saved.
    #[error("the link failed: {0}")]
    Link(LinkError),
    /// The existing device's side: the new device used another code (a typo, or someone
    /// guessing); the link was cancelled.
    #[error(
        "the code typed on the new device does not match the one shown here (a typo, or someone \
         else tried it); nothing was linked. Run `sfc device link` again for a new code"
    )]
    WrongCode,
    /// The server answered `link_failed`: a wrong or expired code, one already used, or the
    /// other device stopped waiting. The server tells these apart to nobody.
    #[error(
        "the link failed: the code is wrong, expired (after 5 minutes) or already used, or the \
         other device stopped waiting; nothing was linked. Run `sfc device link` on a device \
         of the account for a new code"
    )]
    LinkFailed,
    /// The existing device's side: no new device joined before the link lapsed.
    #[error(
        "no new device used the code within 5 minutes; it has expired. Run `sfc device link` \
         again for a new one"
    )]
    Expired,
    /// The new device's side: the existing device's confirmation did not verify, so its
    /// payload was not opened (someone may be in the middle). The server registered the
    /// device all the same.
    #[error(
        "the existing device's answer does not verify (someone may be in the middle); nothing \
         was saved here. The server registered device {device} all the same: remove it from \
         another device with `sfc device remove {device}`"
    )]
    Unverified {
        /// The device the server registered.
        device: DeviceId,
    },
    /// A new device is linked into a home that already holds keys.
    #[error(
        "this home directory already holds the keys of {0}; link the new device into a new, \
         empty home (`--home DIR`)"
    )]
    HomeInUse(String),
    /// The home holds no keys of the logged-in account.
    #[error("no keys of {0} in this home directory: sign up, log in or link this device first")]
    NoKeys(String),
    /// The home holds another account's keys.
    #[error("this home directory holds the keys of {0}; use another --home")]
    OtherUser(String),
    /// The connection failed before the server answered `replace_identity`: the new identity
    /// may or may not be in place. Its keys stay in the home (they must not be lost if the
    /// server has their public half).
    #[error(
        "the connection failed before the server answered ({0}); the new identity may or may \
         not be in place. Its keys are kept in this home: run `sfc login --new-identity` again"
    )]
    ReplacementUnknown(ClientError),
    /// A device name the server would refuse.
    #[error("a device name has 1 to {MAX_DEVICE_NAME} bytes and no control characters")]
    BadDeviceName,
}

impl From<LinkError> for DeviceError {
    fn from(error: LinkError) -> Self {
        match error {
            LinkError::WrongCode => Self::WrongCode,
            other => Self::Link(other),
        }
    }
}

/// Whether `error` means the server refused a link step as `link_failed`.
fn link_failed(error: ClientError) -> DeviceError {
    if error.is_server(ErrorCode::LinkFailed) {
        DeviceError::LinkFailed
    } else {
        DeviceError::Client(error)
    }
}

/// The `link_request` events of a connection (docs/PROTOCOL.md 5.5, step 3), handed from the
/// reader to whoever waits in [`OpenLink::answer`]: the latest one, and a wake-up.
#[derive(Debug, Default)]
pub(super) struct LinkRequests {
    latest: Option<LinkRequest>,
    arrived: Arc<Notify>,
}

/// A new device's request to complete this device's open link.
#[derive(Debug, Clone)]
struct LinkRequest {
    slot: u16,
    name: String,
    pake: [u8; crate::e2e::link::LINK_PAKE_LEN],
    confirm: [u8; crate::e2e::link::LINK_CONFIRM_LEN],
}

/// Called by the connection's reader with a `link_request` event.
pub(super) fn arrived(notices: &Mutex<Notices>, event: Reply) {
    let Reply::LinkRequest {
        slot,
        name,
        pake,
        confirm,
    } = event
    else {
        return;
    };
    if let Ok(mut notices) = notices.lock() {
        notices.link_requests.latest = Some(LinkRequest {
            slot,
            name,
            pake: pake.0,
            confirm: confirm.0,
        });
        // A permit is stored if nobody waits yet: the waiter then finds it at once.
        notices.link_requests.arrived.notify_one();
    }
}

/// Waits for the `link_request` of `slot` until `deadline`, or until the connection ends.
async fn next_request(
    client: &Client,
    slot: u16,
    deadline: tokio::time::Instant,
) -> Result<LinkRequest, DeviceError> {
    loop {
        let arrived = {
            let mut notices = client.notices.lock().map_err(|_| ClientError::Poisoned)?;
            match notices.link_requests.latest.take() {
                Some(request) if request.slot == slot => return Ok(request),
                // For a link this connection no longer has (a new one cancels the old).
                Some(_) | None => Arc::clone(&notices.link_requests.arrived),
            }
        };
        tokio::select! {
            () = arrived.notified() => {}
            () = tokio::time::sleep_until(deadline) => return Err(DeviceError::Expired),
            reason = client.conn.closed() => {
                let server = client.conn.remote_address().to_string();
                return Err(ClientError::from_connection(reason, &server).into());
            }
        }
    }
}

/// A link this (existing) device opened: the code to show, waiting for the new device.
pub struct OpenLink {
    existing: ExistingDevice,
    account: Username,
    code: LinkCode,
    slot: u16,
    expires_at: u64,
    deadline: tokio::time::Instant,
}

impl std::fmt::Debug for OpenLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenLink")
            .field("account", &self.account)
            .field("slot", &self.slot)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The device a link added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedDevice {
    /// Its id within the account.
    pub device: DeviceId,
    /// The name it gave itself.
    pub name: String,
    /// Pinned contacts handed over.
    pub contacts: usize,
    /// Pinned contacts left out (beyond [`MAX_LINK_CONTACTS`]; verified ones go first).
    pub contacts_left_out: usize,
}

/// Opens a link on `client` (logged in as a device of `me`, whose keys `keystore` holds):
/// draws the secret, sends `pake_E`, and returns the code to show.
pub async fn open_link(
    client: &Client,
    keystore: &Keystore,
    me: &Username,
) -> Result<OpenLink, DeviceError> {
    own_keys(keystore, me).await?;
    let secret = LinkSecret::draw()?;
    let (existing, pake) = ExistingDevice::start(&secret, me)?;
    let (slot, expires_at) = match client
        .request(Request::LinkOpen { pake: Bin(pake) })
        .await?
    {
        Reply::LinkOpened { slot, expires_at } => (slot, expires_at),
        other => return Err(unexpected("link_open", &other).into()),
    };
    let code = LinkCode::new(slot, &secret)?;
    Ok(OpenLink {
        existing,
        account: me.clone(),
        code,
        slot,
        expires_at,
        deadline: tokio::time::Instant::now() + LINK_WAIT,
    })
}

impl OpenLink {
    /// The code to show the user: `SSSS-PPPPPP`.
    pub fn code(&self) -> &LinkCode {
        &self.code
    }

    /// When the server lets the link lapse (Unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Waits (at most [`LINK_WAIT`] from the opening) for a new device to join with the code,
    /// checks its confirmation, and only if it proves the code hands over the account's
    /// identity and pinned contacts (`link_accept`); otherwise cancels the link
    /// (`link_refuse`) and says why. `client` must be the connection that opened it.
    pub async fn answer(
        self,
        client: &Client,
        keystore: &Keystore,
    ) -> Result<LinkedDevice, DeviceError> {
        let request = next_request(client, self.slot, self.deadline).await?;
        let decided = async {
            let keys = self.existing.finish(self.slot, &request.pake)?;
            let (payload, left_out) = payload(keystore, &self.account).await?;
            let accept = keys.accept(&request.confirm, &payload)?;
            Ok::<_, DeviceError>((accept, payload.contacts.len(), left_out))
        }
        .await;
        let (accept, contacts, contacts_left_out) = match decided {
            Ok(decided) => decided,
            Err(why) => {
                // The link is over either way; the new device hears `link_failed`.
                let _ = client
                    .request(Request::LinkRefuse { slot: self.slot })
                    .await;
                return Err(why);
            }
        };
        let reply = client
            .request(Request::LinkAccept {
                slot: self.slot,
                confirm: Bin(accept.confirm),
                payload: accept.payload,
            })
            .await
            .map_err(link_failed)?;
        match reply {
            Reply::LinkAccepted { device } => Ok(LinkedDevice {
                device,
                name: request.name,
                contacts,
                contacts_left_out,
            }),
            other => Err(unexpected("link_accept", &other).into()),
        }
    }
}

/// Fails unless `keystore` holds `me`'s keys.
async fn own_keys(keystore: &Keystore, me: &Username) -> Result<(), DeviceError> {
    let holder = keystore
        .read_async(|s| s.map(|s| s.username.clone()))
        .await?;
    match holder {
        Some(holder) if holder == me.as_str() => Ok(()),
        Some(holder) => Err(DeviceError::OtherUser(holder)),
        None => Err(DeviceError::NoKeys(me.as_str().to_owned())),
    }
}

/// What the new device receives: the identity and the pinned contacts (verified ones first,
/// at most [`MAX_LINK_CONTACTS`]); also how many were left out.
async fn payload(keystore: &Keystore, me: &Username) -> Result<(LinkPayload, usize), DeviceError> {
    let me = me.clone();
    keystore
        .read_async(move |state| {
            let state = match state {
                Some(state) if state.username == me.as_str() => state,
                Some(state) => return Err(DeviceError::OtherUser(state.username.clone())),
                None => return Err(DeviceError::NoKeys(me.as_str().to_owned())),
            };
            let mut contacts: Vec<LinkContact> = state
                .pinned
                .iter()
                .filter_map(|(name, pinned)| {
                    // A name or key that does not parse was never pinned by this client;
                    // it is not passed on.
                    let username = Username::parse(name).ok().filter(|u| *u != me)?;
                    let identity_key = IdentityKey::from_bytes(&pinned.0).ok()?;
                    Some(LinkContact {
                        username,
                        identity_key,
                        verified: state.trust_of(name).verified,
                    })
                })
                .collect();
            contacts.sort_by_key(|c| !c.verified);
            let left_out = contacts.len().saturating_sub(MAX_LINK_CONTACTS);
            contacts.truncate(MAX_LINK_CONTACTS);
            let payload = LinkPayload {
                account: me,
                identity: state.identity(),
                contacts,
            };
            Ok((payload, left_out))
        })
        .await?
}

/// This home's part of a completed link: the new device's session.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The account (canonical name).
    pub username: String,
    /// The new device's id.
    pub device: DeviceId,
    /// Its session token (keep it secret).
    pub token: SessionToken,
    /// When the token expires (Unix seconds).
    pub expires_at: u64,
    /// Pinned contacts received.
    pub contacts: usize,
}

/// Whether `name` is a device name the server takes: 1 to 64 bytes, no control characters.
pub fn valid_device_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_DEVICE_NAME && !name.chars().any(char::is_control)
}

/// Links this home as a new device of `account`, with the `code` the existing device shows,
/// on `client` (a connection after `hello`, not logged in): joins the link, proves the code,
/// checks the existing device's answer, then saves the account's identity, the pinned
/// contacts and fresh prekeys (signed by the identity) in `keystore` as the keys of the new
/// device. The connection is then logged in as it; publish the prekeys with
/// [`publish_keys`] once the session is saved.
pub async fn join_link(
    client: &Client,
    keystore: &Keystore,
    account: &Username,
    code: &LinkCode,
    name: &str,
) -> Result<Joined, DeviceError> {
    if !valid_device_name(name) {
        return Err(DeviceError::BadDeviceName);
    }
    let holder = keystore
        .read_async(|s| s.map(|s| s.username.clone()))
        .await?;
    if let Some(holder) = holder {
        return Err(DeviceError::HomeInUse(holder));
    }
    let (joining, pake) = JoiningDevice::start(code, account)?;
    let join = Request::LinkJoin {
        username: account.as_str().to_owned(),
        slot: code.slot(),
        pake: Bin(pake),
        name: name.to_owned(),
    };
    let pake_existing = match client.request(join).await.map_err(link_failed)? {
        Reply::LinkPake { pake } => pake,
        other => return Err(unexpected("link_join", &other).into()),
    };
    let (keys, confirm) = joining.finish(&pake_existing.0)?;
    let confirm = Request::LinkConfirm {
        confirm: Bin(confirm),
    };
    let (username, device, token, expires_at, confirm, sealed) =
        match client.request(confirm).await.map_err(link_failed)? {
            Reply::Linked {
                username,
                device,
                token,
                expires_at,
                confirm,
                payload,
            } => (username, device, token, expires_at, confirm, payload),
            other => return Err(unexpected("link_confirm", &other).into()),
        };
    // The connection is now logged in as the new device.
    client.note_device(device);
    let payload = keys
        .open(&confirm.0, &sealed)
        .map_err(|_| DeviceError::Unverified { device })?;
    let contacts = payload.contacts.len();
    let prekeys = PrekeyStore::generate(&payload.identity, PREKEY_BATCH)?;
    let mut state = KeyState::for_device(
        account.as_str(),
        device,
        &payload.identity,
        prekeys,
        crate::unix_now(),
    );
    for contact in &payload.contacts {
        let peer = contact.username.as_str().to_owned();
        state
            .pinned
            .insert(peer.clone(), Pinned(*contact.identity_key.as_bytes()));
        if contact.verified {
            state.trust.insert(
                peer,
                Trust {
                    verified: true,
                    changed_to: None,
                },
            );
        }
    }
    // Until the server has this device's keys (`publish_keys`), the next command publishes
    // them.
    state.unpublished = true;
    keystore
        .update_async(move |current| match current {
            Some(other) => Err(DeviceError::HomeInUse(other.username.clone())),
            None => {
                *current = Some(state);
                Ok(())
            }
        })
        .await?;
    Ok(Joined {
        username,
        device,
        token,
        expires_at,
        contacts,
    })
}

/// Publishes this device's keys from `keystore` (the account's identity key, which the server
/// checks against the account's, the signed and last-resort prekeys and the one-time
/// prekeys) on `client`, logged in as this device; returns how many one-time prekeys the
/// server holds for it.
pub async fn publish_keys(client: &Client, keystore: &Keystore) -> Result<u32, DeviceError> {
    let keys = keystore
        .read_async(|state| {
            state.map(|s| {
                (
                    Bin(*s.identity().public().as_bytes()),
                    wire_signed(&s.prekeys.signed_prekey()),
                    wire_signed(&s.prekeys.last_resort_prekey()),
                    s.prekeys
                        .one_time_prekeys()
                        .iter()
                        .map(wire_one_time)
                        .collect::<Vec<_>>(),
                )
            })
        })
        .await?;
    let Some((identity, signed, last_resort, one_time)) = keys else {
        return Err(DeviceError::NoKeys("the account".into()));
    };
    let count = client
        .publish_keys(Some(identity), Some(signed), Some(last_resort), one_time)
        .await?;
    keystore
        .update_async(|state| -> Result<(), HomeError> {
            if let Some(state) = state {
                state.unpublished = false;
            }
            Ok(())
        })
        .await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_follow_the_servers_rule() {
        assert!(valid_device_name("laptop"));
        assert!(valid_device_name(&"é".repeat(32)));
        assert!(!valid_device_name(""));
        assert!(!valid_device_name(&"x".repeat(65)));
        assert!(!valid_device_name("tab\there"));
    }
}
