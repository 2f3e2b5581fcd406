//! The device requests: listing and removing an account's devices, replacing its identity, and
//! the link exchange through which an existing device registers a new one
//! (docs/PROTOCOL.md 5.5; the state of links in progress is in `server::links`).

use std::time::Instant;

use tracing::info;

use super::{Control, IN_FLIGHT_RETRY, IN_FLIGHT_WHAT, Refusal, account_error, error, store_error};
use crate::protocol::groups::DeviceRevocation;
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey, SignatureBytes, SignedPrekey};
use crate::protocol::{
    CloseCode, DeviceId, DeviceInfo, ErrorCode, LinkConfirm, LinkPake, Password, Reply, Username,
};
use crate::server::accounts::{AccountError, ActiveSession};
use crate::server::directory::check_signatures;
use crate::server::groups::mls::revocation_verifies;
use crate::server::links::{Decision, LinkFailed, valid_device_name};
use crate::server::router::Inbox;
use crate::server::throttle::InFlightSlot;
use crate::store::{DeviceKeys, MAX_DEVICES, StoreError};

/// Largest sealed link payload, its tag included (E13.4).
const MAX_LINK_PAYLOAD: usize = 60_000;
/// Most one-time prekeys in one `replace_identity` (as in `publish_keys`).
const MAX_PREKEYS_PER_REQUEST: usize = 200;

fn link_failed(why: LinkFailed) -> Reply {
    match why {
        LinkFailed::NoSlot => error(ErrorCode::Busy, why.to_string()),
        LinkFailed::NoLink => error(ErrorCode::LinkFailed, why.to_string()),
    }
}

impl Control {
    /// The throttle of a request that checks the password again (`delete_account`,
    /// `remove_device`, `replace_identity`): the address's cap on password work in flight,
    /// then a token of its failed-login bucket, spent before the work (so parallel requests
    /// cannot all pass one check) and kept even when the password is right.
    pub(super) async fn password_gate(&mut self) -> Result<InFlightSlot, Reply> {
        let addr = self.conn.remote_address().ip();
        let Some(in_flight) = self.shared.password_work.enter(addr) else {
            return Err(self
                .refuse(Refusal::new(IN_FLIGHT_WHAT, IN_FLIGHT_RETRY))
                .await);
        };
        if let Err(wait) = self.shared.failed_logins.take(addr, Instant::now()) {
            return Err(self
                .refuse(Refusal::new("password attempts from your address", wait))
                .await);
        }
        Ok(in_flight)
    }

    pub(super) async fn list_devices(&self, me: &Inbox) -> Reply {
        match self.shared.accounts.store().devices(&me.user).await {
            Ok(devices) => Reply::Devices {
                devices: devices
                    .into_iter()
                    .map(|d| DeviceInfo {
                        current: d.id == me.device,
                        device: d.id,
                        name: d.name,
                        added_at: d.added_at,
                        last_seen: d.last_seen,
                    })
                    .collect(),
            },
            Err(e) => store_error(&e),
        }
    }

    /// `remove_device`: checks the password, removes the device, closes its connections and,
    /// with a revocation (checked first against the account's identity key), tells the
    /// device's groups (5.7).
    pub(super) async fn remove_device(
        &mut self,
        session: &ActiveSession,
        device: DeviceId,
        password: Password,
        revocation: Option<SignatureBytes>,
    ) -> Reply {
        if device == session.device {
            return error(
                ErrorCode::BadRequest,
                "a device cannot remove itself: log out, or remove it from another device".into(),
            );
        }
        let revocation = match revocation {
            Some(signature) => {
                let revocation = DeviceRevocation {
                    username: session.username.to_string(),
                    device,
                    signature,
                };
                match self
                    .shared
                    .accounts
                    .store()
                    .identity(&session.username)
                    .await
                {
                    Ok(Some(identity)) if revocation_verifies(&revocation, &identity) => {
                        Some(revocation)
                    }
                    Ok(_) => {
                        return error(
                            ErrorCode::InvalidKeys,
                            "the revocation does not verify with your identity key".into(),
                        );
                    }
                    Err(e) => return store_error(&e),
                }
            }
            None => None,
        };
        let _in_flight = match self.password_gate().await {
            Ok(slot) => slot,
            Err(refused) => return refused,
        };
        let accounts = &self.shared.accounts;
        if let Err(e) = accounts.check_password(&session.username, password).await {
            return account_error(e);
        }
        match accounts.remove_device(session, device).await {
            Ok(()) => {
                self.shared.router.disconnect(
                    &Inbox::new(&session.username, device),
                    CloseCode::DeviceRemoved,
                    "this device was removed from its account",
                );
                info!(device, "device removed");
                if let Some(revocation) = revocation {
                    self.announce_device_removed(session, &revocation).await;
                }
                Reply::DeviceRemoved { device }
            }
            Err(e) => account_error(e),
        }
    }

    pub(super) async fn replace_identity(
        &mut self,
        session: &ActiveSession,
        password: Password,
        identity_key: IdentityKeyBytes,
        keys: DeviceKeys,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Reply {
        if one_time_prekeys.len() > MAX_PREKEYS_PER_REQUEST {
            return error(
                ErrorCode::BadRequest,
                format!("at most {MAX_PREKEYS_PER_REQUEST} one-time prekeys per request"),
            );
        }
        if let Err(why) = check_signatures(&identity_key, &keys) {
            return error(ErrorCode::InvalidKeys, why);
        }
        let _in_flight = match self.password_gate().await {
            Ok(slot) => slot,
            Err(refused) => return refused,
        };
        let accounts = &self.shared.accounts;
        if let Err(e) = accounts.check_password(&session.username, password).await {
            return account_error(e);
        }
        // The other devices first: they hold the old identity's private key. A crash between
        // the two steps leaves them removed and the old identity in place; the client asks again.
        let removed = match accounts.remove_other_devices(session).await {
            Ok(removed) => removed,
            Err(e) => return account_error(e),
        };
        for device in &removed {
            self.shared.router.disconnect(
                &Inbox::new(&session.username, *device),
                CloseCode::DeviceRemoved,
                "the account's identity was replaced",
            );
        }
        let replaced = accounts
            .store()
            .put_keys(
                &session.username,
                session.device,
                Some(identity_key),
                Some(keys),
                one_time_prekeys,
            )
            .await;
        // The store removes any device the steps above missed (one linked meanwhile).
        accounts.device_lists.forget(&session.username);
        match replaced {
            Ok(_) => {
                info!(removed = removed.len(), "identity replaced");
                Reply::IdentityReplaced { removed }
            }
            Err(StoreError::Limit(why)) => error(ErrorCode::BadRequest, why),
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn link_open(&mut self, me: &Inbox, pake: LinkPake) -> Reply {
        match self.shared.accounts.store().devices(&me.user).await {
            Ok(devices) if devices.len() >= MAX_DEVICES => {
                return account_error(AccountError::TooManyDevices);
            }
            Ok(_) => {}
            Err(e) => return store_error(&e),
        }
        let opened = self.shared.links.open(
            &me.user,
            self.conn.stable_id(),
            self.events.clone(),
            pake,
            Instant::now(),
        );
        match opened {
            Ok((slot, _)) => {
                info!(slot, "device link opened");
                Reply::LinkOpened {
                    slot,
                    expires_at: crate::unix_now().saturating_add(self.shared.links.ttl().as_secs()),
                }
            }
            Err(why) => link_failed(why),
        }
    }

    /// A new device joins a link. Each join takes a token of the address's failed-login
    /// bucket: a slot is four digits, and sweeping them must cost what guessing passwords does.
    pub(super) async fn link_join(
        &mut self,
        username: &str,
        slot: u16,
        pake: LinkPake,
        name: String,
    ) -> Reply {
        if !valid_device_name(&name) {
            return error(
                ErrorCode::BadRequest,
                "a device name has 1 to 64 bytes and no control characters".into(),
            );
        }
        let addr = self.conn.remote_address().ip();
        if let Err(wait) = self.shared.failed_logins.take(addr, Instant::now()) {
            return self
                .refuse(Refusal::new("link attempts from your address", wait))
                .await;
        }
        let Ok(account) = Username::parse(username) else {
            return link_failed(LinkFailed::NoLink);
        };
        let joined = self.shared.links.join(
            &account,
            slot,
            self.conn.stable_id(),
            name,
            pake,
            Instant::now(),
        );
        match joined {
            Ok((pake, expires)) => {
                self.linking_until = Some(tokio::time::Instant::from_std(expires));
                Reply::LinkPake { pake }
            }
            Err(why) => link_failed(why),
        }
    }

    /// The new device confirms and waits for the existing device's decision; on acceptance
    /// this connection is authenticated as the new device.
    pub(super) async fn link_confirm(&mut self, confirm: LinkConfirm) -> Reply {
        let waiting = self
            .shared
            .links
            .confirm(self.conn.stable_id(), confirm, Instant::now());
        let (decision, left) = match waiting {
            Ok(waiting) => waiting,
            Err(why) => return link_failed(why),
        };
        match tokio::time::timeout(left, decision).await {
            Ok(Ok(Decision::Accept {
                issued,
                confirm,
                payload,
            })) => {
                let session = issued.session;
                let reply = Reply::Linked {
                    username: session.username.to_string(),
                    device: session.device,
                    token: issued.token,
                    expires_at: session.expires_at,
                    confirm,
                    payload,
                };
                info!(device = session.device, "linked as a new device");
                self.begin_session(session);
                reply
            }
            _ => link_failed(LinkFailed::NoLink),
        }
    }

    pub(super) async fn link_accept(
        &mut self,
        session: &ActiveSession,
        slot: u16,
        confirm: LinkConfirm,
        payload: Vec<u8>,
    ) -> Reply {
        let decided = self.shared.links.decide(
            &session.username,
            self.conn.stable_id(),
            slot,
            Instant::now(),
        );
        let (decision, name) = match decided {
            Ok(decided) => decided,
            Err(why) => return link_failed(why),
        };
        // An oversize payload ends the link like a refusal: no new device could open it.
        if payload.len() > MAX_LINK_PAYLOAD {
            let _ = decision.send(Decision::Refuse);
            return error(
                ErrorCode::BadRequest,
                format!("a sealed link payload has at most {MAX_LINK_PAYLOAD} bytes"),
            );
        }
        let accounts = &self.shared.accounts;
        let issued = match accounts.add_device(&session.username, name).await {
            Ok(issued) => issued,
            Err(e) => return account_error(e),
        };
        let device = issued.session.device;
        if decision
            .send(Decision::Accept {
                issued,
                confirm,
                payload,
            })
            .is_err()
        {
            // The new device left in the meantime: nothing of the link may remain.
            if let Err(e) = accounts.remove_device(session, device).await {
                return account_error(e);
            }
            return link_failed(LinkFailed::NoLink);
        }
        info!(device, "device linked");
        Reply::LinkAccepted { device }
    }

    pub(super) fn link_refuse(&mut self, session: &ActiveSession, slot: u16) -> Reply {
        let decided = self.shared.links.decide(
            &session.username,
            self.conn.stable_id(),
            slot,
            Instant::now(),
        );
        match decided {
            Ok((decision, _)) => {
                // The new device may have left already; the link is over either way.
                let _ = decision.send(Decision::Refuse);
                info!(slot, "device link refused (wrong code)");
                Reply::LinkRefused
            }
            Err(why) => link_failed(why),
        }
    }
}

/// The keys of a `replace_identity` request as the store keeps them.
pub(super) fn device_keys(signed_prekey: SignedPrekey, last_resort: SignedPrekey) -> DeviceKeys {
    DeviceKeys {
        signed_prekey,
        last_resort,
    }
}
