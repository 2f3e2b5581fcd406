//! This device's keys on the server: created and published at signup, the signed prekey
//! rotated when due, one-time prekeys topped up when the server says they run low; and the
//! conversions between the wire's key types and `e2e`'s.

use super::super::{Bundle, DeviceBundle};
use super::{KeyState, Messenger, MessengerError, PREKEY_BATCH, SIGNED_PREKEY_ROTATION};
use crate::e2e::{
    E2eError, IdentityKey, OneTimePrekeyPublic, PrekeyBundle, PrekeyStore, SignedPrekeyPublic,
};
use crate::protocol::ErrorCode;
use crate::protocol::keys::{Bin, IdentityKeyBytes, OneTimePrekey, SignedPrekey};
use crate::unix_now;

impl Messenger {
    /// Makes sure this user has keys and the server has their public halves: creates and
    /// publishes them the first time, rotates the signed prekey when it is due, and tops up
    /// one-time prekeys when the server said they run low.
    ///
    /// A home without keys for an account that already has an identity key on the server
    /// (made in another home) gives [`MessengerError::IdentityElsewhere`]: making new keys
    /// here would replace the account's identity (the server refuses that anyway:
    /// `identity_mismatch`). Such a home is linked as a new device (`client::link`), or the
    /// identity is replaced on purpose (`client::link::replace_identity`, with the password).
    pub async fn ensure_keys(&self) -> Result<(), MessengerError> {
        let me = self.me.as_str().to_owned();
        let device = self.client().device();
        let has_keys = {
            let me = me.clone();
            self.keystore
                .read_async(move |state| match state {
                    Some(existing) if existing.username != me => {
                        Err(MessengerError::OtherUser(existing.username.clone()))
                    }
                    Some(existing) if existing.device != device => {
                        Err(MessengerError::OtherDevice {
                            home: existing.device,
                            connection: device,
                        })
                    }
                    other => Ok(other.is_some()),
                })
                .await??
        };
        if !has_keys {
            match self.client().fetch_identity(self.me.as_str()).await {
                Ok(_) => return Err(MessengerError::IdentityElsewhere(me)),
                Err(e) if e.is_server(ErrorCode::NoKeys) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let now = unix_now();
        let created = self
            .keystore
            .update_async(move |state| -> Result<bool, MessengerError> {
                match state {
                    Some(existing) if existing.username != me => {
                        Err(MessengerError::OtherUser(existing.username.clone()))
                    }
                    Some(_) => Ok(false),
                    None => {
                        let identity = crate::e2e::IdentityKeyPair::generate()?;
                        let prekeys = PrekeyStore::generate(&identity, PREKEY_BATCH)?;
                        *state = Some(KeyState::for_device(&me, device, &identity, prekeys, now));
                        Ok(true)
                    }
                }
            })
            .await?;
        let unpublished = self
            .keystore
            .read_async(|state| state.is_some_and(|s| s.unpublished))
            .await?;
        if created || unpublished {
            return self.publish_all_keys().await;
        }
        let rotate = self
            .keystore
            .update_async(
                move |state| -> Result<Option<SignedPrekey>, MessengerError> {
                    let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                    if now.saturating_sub(state.signed_prekey_rotated_at)
                        < SIGNED_PREKEY_ROTATION.as_secs()
                    {
                        return Ok(None);
                    }
                    let identity = state.identity();
                    let spk = state.prekeys.rotate_signed_prekey(&identity)?;
                    state.signed_prekey_rotated_at = now;
                    Ok(Some(wire_signed(&spk)))
                },
            )
            .await?;
        if let Some(spk) = rotate {
            self.client()
                .publish_keys(None, Some(spk), None, Vec::new())
                .await?;
        }
        match self.client().fetch_identity(self.me.as_str()).await {
            Ok(_) => Ok(()),
            // Keys were made here but never reached the server (a crash in between).
            Err(e) if e.is_server(ErrorCode::NoKeys) => self.publish_all_keys().await,
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes every public key of this device (identity, signed, last-resort and one-time
    /// prekeys): what [`Messenger::ensure_keys`] does for new keys, and what a device just
    /// linked (its keystore made with [`KeyState::linked`]) does before it can receive.
    pub async fn publish_all_keys(&self) -> Result<(), MessengerError> {
        let (identity, spk, last, one_time) = self
            .keystore
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
            .await?
            .ok_or(MessengerError::NoKeys)?;
        self.client()
            .publish_keys(Some(identity), Some(spk), Some(last), one_time)
            .await?;
        self.keystore
            .update_async(|state| -> Result<(), MessengerError> {
                if let Some(state) = state {
                    state.unpublished = false;
                }
                Ok(())
            })
            .await
    }

    pub(crate) async fn top_up_prekeys(&self) -> Result<(), MessengerError> {
        let fresh = self
            .keystore
            .update_async(|state| -> Result<Vec<OneTimePrekey>, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                Ok(state
                    .prekeys
                    .add_one_time_prekeys(PREKEY_BATCH)?
                    .iter()
                    .map(wire_one_time)
                    .collect())
            })
            .await?;
        self.client().publish_keys(None, None, None, fresh).await?;
        Ok(())
    }
}

pub(crate) fn wire_signed(spk: &SignedPrekeyPublic) -> SignedPrekey {
    SignedPrekey {
        id: spk.id,
        key: Bin(spk.key),
        signature: Bin(spk.signature),
    }
}

pub(crate) fn wire_one_time(otp: &OneTimePrekeyPublic) -> OneTimePrekey {
    OneTimePrekey {
        id: otp.id,
        key: Bin(otp.key),
    }
}

/// One device's bundle of a `bundle` reply, with the account's identity key, as `e2e` takes it.
pub(crate) fn device_bundle(
    identity_key: &IdentityKeyBytes,
    bundle: &DeviceBundle,
) -> Result<PrekeyBundle, E2eError> {
    to_bundle(&Bundle {
        username: String::new(),
        identity_key: *identity_key,
        signed_prekey: bundle.signed_prekey.clone(),
        one_time_prekey: bundle.one_time_prekey.clone(),
        last_resort: bundle.last_resort.clone(),
    })
}

/// A bundle as the server handed it out, as `e2e` takes it.
pub(crate) fn to_bundle(bundle: &Bundle) -> Result<PrekeyBundle, E2eError> {
    let signed = |s: &SignedPrekey| SignedPrekeyPublic {
        id: s.id,
        key: s.key.0,
        signature: s.signature.0,
    };
    Ok(PrekeyBundle {
        identity_key: IdentityKey::from_bytes(&bundle.identity_key.0)?,
        signed_prekey: signed(&bundle.signed_prekey),
        one_time_prekey: bundle
            .one_time_prekey
            .as_ref()
            .map(|o| OneTimePrekeyPublic {
                id: o.id,
                key: o.key.0,
            }),
        last_resort_prekey: bundle.last_resort.as_ref().map(signed),
    })
}
