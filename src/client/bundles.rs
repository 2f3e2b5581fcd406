//! The key requests: publishing this device's keys, fetching a user's prekey bundles (one per
//! device) and identity key.

use super::{Client, ClientError, DeviceBundle, DeviceId, unexpected};
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey, SignedPrekey};
use crate::protocol::{Reply, Request};

/// A recipient's prekey bundle, as the server handed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Whose bundle.
    pub username: String,
    /// Ed25519 identity key.
    pub identity_key: IdentityKeyBytes,
    /// Current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// A one-time prekey for us alone, if any was left.
    pub one_time_prekey: Option<OneTimePrekey>,
    /// The last-resort prekey, when no one-time prekey was left.
    pub last_resort: Option<SignedPrekey>,
}

/// Prekey bundles of some devices of a user, as the server handed them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundles {
    /// Whose bundles.
    pub username: String,
    /// The account's Ed25519 identity key (one for all its devices).
    pub identity_key: IdentityKeyBytes,
    /// One bundle per device, by id.
    pub devices: Vec<DeviceBundle>,
}

impl Client {
    /// Uploads keys; returns how many one-time prekeys the server holds for us now.
    pub async fn publish_keys(
        &self,
        identity_key: Option<IdentityKeyBytes>,
        signed_prekey: Option<SignedPrekey>,
        last_resort: Option<SignedPrekey>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, ClientError> {
        let request = Request::PublishKeys {
            identity_key,
            signed_prekey,
            last_resort,
            one_time_prekeys,
        };
        match self.request(request).await? {
            Reply::KeysPublished { one_time_prekeys } => Ok(one_time_prekeys),
            other => Err(unexpected("publish_keys", &other)),
        }
    }

    /// Fetches a user's prekey bundle (consuming one of their one-time prekeys).
    pub async fn fetch_bundle(&self, username: &str) -> Result<Bundle, ClientError> {
        match self
            .request(Request::FetchBundle {
                username: username.into(),
                devices: None,
            })
            .await?
        {
            Reply::Bundle {
                username,
                identity_key,
                signed_prekey,
                one_time_prekey,
                last_resort,
                ..
            } => Ok(Bundle {
                username,
                identity_key,
                signed_prekey,
                one_time_prekey,
                last_resort,
            }),
            other => Err(unexpected("fetch_bundle", &other)),
        }
    }

    /// Fetches the prekey bundles of `devices` of a user (every current device with keys when
    /// `None`), consuming one one-time prekey of each.
    pub async fn fetch_bundles(
        &self,
        username: &str,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<DeviceBundles, ClientError> {
        match self
            .request(Request::FetchBundle {
                username: username.into(),
                devices,
            })
            .await?
        {
            Reply::Bundle {
                username,
                identity_key,
                devices,
                ..
            } => Ok(DeviceBundles {
                username,
                identity_key,
                devices,
            }),
            other => Err(unexpected("fetch_bundle", &other)),
        }
    }

    /// Fetches a user's identity key without consuming anything.
    pub async fn fetch_identity(&self, username: &str) -> Result<IdentityKeyBytes, ClientError> {
        match self
            .request(Request::FetchIdentity {
                username: username.into(),
            })
            .await?
        {
            Reply::Identity { identity_key, .. } => Ok(identity_key),
            other => Err(unexpected("fetch_identity", &other)),
        }
    }
}
