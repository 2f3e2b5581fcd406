//! The account's devices once linked: logging in as one, listing them, removing one, and
//! replacing the account's identity (which removes all but this one); and telling that the
//! server closed a connection because its device was removed.

use super::{DeviceError, wire_one_time, wire_signed};
use crate::client::home::HomeError;
use crate::client::keystore::{DeviceId, KeyState, Keystore};
use crate::client::messenger::PREKEY_BATCH;
use crate::client::{Client, ClientError, unexpected};
use crate::e2e::mls::{MemberId, revoke};
use crate::e2e::{IdentityKeyPair, PrekeyStore};
use crate::protocol::groups::DeviceRevocation;
use crate::protocol::keys::{Bin, SignatureBytes};
use crate::protocol::{CloseCode, DeviceInfo, Password, Reply, Request, SessionToken, Username};

/// A session granted by `login`, with the device it is for.
#[derive(Debug, Clone)]
pub struct DeviceSession {
    /// The account (canonical name).
    pub username: String,
    /// The device logged in.
    pub device: DeviceId,
    /// The session token (keep it secret).
    pub token: SessionToken,
    /// When the token expires (Unix seconds).
    pub expires_at: u64,
}

/// Logs `client` in as `device` of `username` (device 1 when `None`). A removed or unknown
/// device is refused with `unknown_device` ([`ClientError::is_server`]).
pub async fn login_as(
    client: &Client,
    username: &str,
    password: Password,
    device: Option<DeviceId>,
) -> Result<DeviceSession, ClientError> {
    // Through the client's own login, so it knows its device (its messenger checks it).
    let (info, token) = client.login_device(username, password, device).await?;
    Ok(DeviceSession {
        username: info.username,
        device: info.device,
        token,
        expires_at: info.expires_at,
    })
}

/// The account's current devices, by id (the connection's own marked `current`).
pub async fn list_devices(client: &Client) -> Result<Vec<DeviceInfo>, ClientError> {
    match client.request(Request::ListDevices).await? {
        Reply::Devices { devices } => Ok(devices),
        other => Err(unexpected("list_devices", &other)),
    }
}

/// Removes another device of the account (the password is checked again): its tokens stop
/// working, its connections are closed, its waiting messages are gone. No revocation is sent:
/// the device's leaves in groups are removed by the account's other devices
/// ([`crate::client::messenger::Messenger::catch_up`]) or an admin. Prefer
/// [`remove_device_signed`].
pub async fn remove_device(
    client: &Client,
    device: DeviceId,
    password: Password,
) -> Result<(), ClientError> {
    send_removal(client, device, password, None).await
}

/// [`remove_device`] with the removal signed by the account's identity key from `keystore`
/// (docs/PROTOCOL.md 5.5): the server passes the signed revocation to the device's groups,
/// so that any member there may commit the removal of its leaves and every member can check
/// it. Returns the revocation (to put in this device's own removal commits).
pub async fn remove_device_signed(
    client: &Client,
    keystore: &Keystore,
    device: DeviceId,
    password: Password,
) -> Result<DeviceRevocation, DeviceError> {
    let signed = keystore
        .read_async(move |s| {
            s.map(|s| {
                let member = MemberId {
                    user: s.username.clone(),
                    device,
                };
                revoke(&s.identity(), &member)
            })
        })
        .await?;
    let Some(revocation) = signed else {
        return Err(DeviceError::NoKeys("the account".into()));
    };
    send_removal(client, device, password, Some(revocation.signature)).await?;
    Ok(revocation)
}

/// Sends `remove_device` (with a revocation, if given) and waits for the answer.
pub(crate) async fn send_removal(
    client: &Client,
    device: DeviceId,
    password: Password,
    revocation: Option<SignatureBytes>,
) -> Result<(), ClientError> {
    match client
        .request(Request::RemoveDevice {
            device,
            password,
            revocation,
        })
        .await?
    {
        Reply::DeviceRemoved { .. } => Ok(()),
        other => Err(unexpected("remove_device", &other)),
    }
}

/// The account and device whose keys `keystore` holds, if any.
pub async fn home_keys(keystore: &Keystore) -> Result<Option<(String, DeviceId)>, HomeError> {
    keystore
        .read_async(|s| s.map(|s| (s.username.clone(), s.device)))
        .await
}

/// Gives the account a new identity key made here (`replace_identity`, with the password):
/// saves it with fresh prekeys in `keystore` as the keys of `device` (the device `client` is
/// logged in as), keeping the home's pinned contacts, trust decisions, history, outbox,
/// quarantine and unshown messages but none of its sessions (they were made with the old
/// identity). Every other device of the account is removed; returns their ids.
///
/// The new keys are saved before the request, so they are never lost once the server has
/// their public half; if the server refuses, the previous keys are put back. If the
/// connection fails meanwhile, the outcome is unknown and the new keys stay: run it again.
pub async fn replace_identity(
    client: &Client,
    keystore: &Keystore,
    me: &Username,
    device: DeviceId,
    password: Password,
) -> Result<Vec<DeviceId>, DeviceError> {
    let identity = IdentityKeyPair::generate()?;
    let prekeys = PrekeyStore::generate(&identity, PREKEY_BATCH)?;
    let request = Request::ReplaceIdentity {
        password,
        identity_key: Bin(*identity.public().as_bytes()),
        signed_prekey: wire_signed(&prekeys.signed_prekey()),
        last_resort: wire_signed(&prekeys.last_resort_prekey()),
        one_time_prekeys: prekeys
            .one_time_prekeys()
            .iter()
            .map(wire_one_time)
            .collect(),
    };
    let mut fresh =
        KeyState::for_device(me.as_str(), device, &identity, prekeys, crate::unix_now());
    let previous = keystore
        .update_async(move |state| {
            if let Some(old) = state.as_ref().filter(|old| old.username != fresh.username) {
                return Err(DeviceError::OtherUser(old.username.clone()));
            }
            let previous = state.take();
            if let Some(old) = &previous {
                fresh.pinned = old.pinned.clone();
                fresh.trust = old.trust.clone();
                fresh.history = old.history.clone();
                fresh.outbox = old.outbox.clone();
                fresh.quarantine = old.quarantine.clone();
                fresh.unshown = old.unshown.clone();
            }
            *state = Some(fresh);
            Ok(previous)
        })
        .await?;
    match client.request(request).await {
        Ok(Reply::IdentityReplaced { removed }) => Ok(removed),
        Ok(other) => Err(unexpected("replace_identity", &other).into()),
        Err(refused @ ClientError::Server { .. }) => {
            match previous {
                Some(previous) => {
                    keystore
                        .update_async(move |state| -> Result<(), HomeError> {
                            *state = Some(previous);
                            Ok(())
                        })
                        .await?
                }
                None => {
                    let keystore = keystore.clone();
                    tokio::task::spawn_blocking(move || keystore.remove())
                        .await
                        .map_err(|e| HomeError::Task(e.to_string()))??
                }
            }
            Err(refused.into())
        }
        Err(other) => Err(DeviceError::ReplacementUnknown(other)),
    }
}

/// Whether the server closed `client`'s connection because its device was removed from the
/// account (close code 7).
pub fn was_removed(client: &Client) -> bool {
    match client.connection().close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            close.error_code.into_inner() == u64::from(CloseCode::DeviceRemoved.code())
        }
        _ => false,
    }
}
