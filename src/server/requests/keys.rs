//! The key directory's requests: `publish_keys` (for the connection's device), `fetch_bundle`
//! (one bundle per device of a user, each one-time prekey handed out once) and
//! `fetch_identity`.

use std::time::Instant;

use super::{Control, PREKEYS_LOW, error, rate_limited, store_error, unknown_user};
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey, SignedPrekey};
use crate::protocol::{DeviceBundle, DeviceId, ErrorCode, Reply, Username};
use crate::server::directory::{KeysRefused, Merged, merge_keys};
use crate::server::router::Inbox;
use crate::store::{MAX_DEVICES, StoreError};

/// Most one-time prekeys in one `publish_keys`.
const MAX_PREKEYS_PER_REQUEST: usize = 200;

impl Control {
    pub(super) async fn no_keys(&self, user: &Username) -> Reply {
        match self.shared.accounts.store().user_exists(user).await {
            Ok(true) => error(
                ErrorCode::NoKeys,
                format!("{user} has not published keys yet"),
            ),
            Ok(false) => unknown_user(),
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn publish_keys(
        &mut self,
        me: &Inbox,
        identity_key: Option<IdentityKeyBytes>,
        signed_prekey: Option<SignedPrekey>,
        last_resort: Option<SignedPrekey>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Reply {
        if one_time_prekeys.len() > MAX_PREKEYS_PER_REQUEST {
            return error(
                ErrorCode::BadRequest,
                format!("at most {MAX_PREKEYS_PER_REQUEST} one-time prekeys per request"),
            );
        }
        let store = self.shared.accounts.store();
        let (stored_identity, existing) = match tokio::try_join!(
            store.identity(&me.user),
            store.device_keys(&me.user, me.device)
        ) {
            Ok(both) => both,
            Err(e) => return store_error(&e),
        };
        let Merged { identity, keys } = match merge_keys(
            stored_identity,
            existing,
            identity_key,
            signed_prekey,
            last_resort,
        ) {
            Ok(merged) => merged,
            Err(KeysRefused::Invalid(why)) => return error(ErrorCode::InvalidKeys, why),
            Err(KeysRefused::IdentityMismatch) => {
                return error(
                    ErrorCode::IdentityMismatch,
                    "this is not the account's identity key; replace_identity changes it".into(),
                );
            }
        };
        match store
            .put_keys(&me.user, me.device, identity, keys, one_time_prekeys)
            .await
        {
            Ok(count) => Reply::KeysPublished {
                one_time_prekeys: count,
            },
            Err(StoreError::Limit(why)) => error(ErrorCode::BadRequest, why),
            Err(StoreError::UnknownDevice(..)) => {
                error(ErrorCode::UnknownDevice, "this device was removed".into())
            }
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn fetch_bundle(
        &mut self,
        me: &Username,
        username: &str,
        devices: Option<Vec<DeviceId>>,
    ) -> Reply {
        let Ok(user) = Username::parse(username) else {
            return unknown_user();
        };
        if let Some(devices) = &devices {
            let mut sorted = devices.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if devices.is_empty() || devices.len() > MAX_DEVICES || sorted.len() != devices.len() {
                return error(
                    ErrorCode::BadRequest,
                    format!("`devices` holds 1 to {MAX_DEVICES} ids, each once"),
                );
            }
        }
        // Taken in one step: a check followed by a spend let concurrent fetches (from the
        // user's other connections) all pass one check.
        if let Err(wait) = self.shared.bundle_fetches.take(me.clone(), Instant::now()) {
            return rate_limited("key bundle fetches", wait);
        }
        let store = self.shared.accounts.store();
        if let Some(asked) = &devices {
            match store.devices(&user).await {
                Ok(current) => {
                    if let Some(missing) =
                        asked.iter().find(|d| !current.iter().any(|c| c.id == **d))
                    {
                        if current.is_empty() {
                            return self.no_keys(&user).await;
                        }
                        return error(
                            ErrorCode::UnknownDevice,
                            format!("{user} has no device {missing}"),
                        );
                    }
                }
                Err(e) => return store_error(&e),
            }
        }
        let taken = match store.take_bundles(&user, devices).await {
            Ok(Some(taken)) if !taken.devices.is_empty() => taken,
            Ok(_) => return self.no_keys(&user).await,
            Err(e) => return store_error(&e),
        };
        let mut bundles = Vec::with_capacity(taken.devices.len());
        for device in taken.devices {
            if device.remaining < PREKEYS_LOW {
                self.shared.router.push_event(
                    &Inbox::new(&user, device.device),
                    Reply::PrekeysLow {
                        remaining: device.remaining,
                    },
                );
            }
            let last_resort = match device.one_time_prekey {
                Some(_) => None,
                None => Some(device.keys.last_resort),
            };
            bundles.push(DeviceBundle {
                device: device.device,
                signed_prekey: device.keys.signed_prekey,
                one_time_prekey: device.one_time_prekey,
                last_resort,
            });
        }
        let Some(first) = bundles.first().cloned() else {
            return self.no_keys(&user).await;
        };
        Reply::Bundle {
            username: user.to_string(),
            identity_key: taken.identity,
            signed_prekey: first.signed_prekey,
            one_time_prekey: first.one_time_prekey,
            last_resort: first.last_resort,
            devices: bundles,
        }
    }

    pub(super) async fn fetch_identity(&self, username: &str) -> Reply {
        let Ok(user) = Username::parse(username) else {
            return unknown_user();
        };
        match self.shared.accounts.store().identity(&user).await {
            Ok(Some(identity_key)) => Reply::Identity {
                username: user.to_string(),
                identity_key,
            },
            Ok(None) => self.no_keys(&user).await,
            Err(e) => store_error(&e),
        }
    }
}
