//! The delivery service's requests (docs/PROTOCOL.md 5.7) on a [`Client`]: key packages,
//! creating, leaving and describing groups, and group message streams.

use super::super::{Client, ClientError, SendOutcome, streams, unexpected};
use crate::protocol::keys::{Bin, IdentityKeyBytes};
use crate::protocol::{DeviceKeyPackage, GroupSummary, MessageId, Reply, Request};

/// Key packages of a user's devices, as the server handed them out (each one-time one is
/// gone from the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeyPackages {
    /// Whose.
    pub username: String,
    /// Their identity key (each key package must be certified by it).
    pub identity_key: IdentityKeyBytes,
    /// One per device.
    pub devices: Vec<DeviceKeyPackage>,
}

impl Client {
    /// Uploads key packages of this device (one-time ones, and a last-resort one); returns how
    /// many one-time ones the server holds now and whether it holds a last-resort one.
    /// Nothing to upload asks only for these counts.
    pub async fn publish_key_packages(
        &self,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<(u32, bool), ClientError> {
        let request = Request::PublishKeyPackages {
            key_packages: key_packages
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect(),
            last_resort: last_resort.map(serde_bytes::ByteBuf::from),
        };
        match self.request(request).await? {
            Reply::KeyPackagesPublished {
                key_packages,
                last_resort,
            } => Ok((key_packages, last_resort)),
            other => Err(unexpected("publish_key_packages", &other)),
        }
    }

    /// Fetches one key package per device of `username` (all its devices with key packages,
    /// or `devices`), using up one-time ones.
    pub async fn fetch_key_packages(
        &self,
        username: &str,
        devices: Option<Vec<u32>>,
    ) -> Result<FetchedKeyPackages, ClientError> {
        let request = Request::FetchKeyPackages {
            username: username.into(),
            devices,
        };
        match self.request(request).await? {
            Reply::KeyPackages {
                username,
                identity_key,
                devices,
            } => Ok(FetchedKeyPackages {
                username,
                identity_key,
                devices,
            }),
            other => Err(unexpected("fetch_key_packages", &other)),
        }
    }

    /// Registers a group the caller created: its name, MLS group id and GroupInfo. Returns the
    /// name as the server folded it.
    pub async fn create_group(
        &self,
        group: &str,
        group_id: [u8; 16],
        group_info: Vec<u8>,
    ) -> Result<String, ClientError> {
        let request = Request::CreateGroup {
            group: group.into(),
            group_id: Bin(group_id),
            group_info,
        };
        match self.request(request).await? {
            Reply::GroupCreated { group, .. } => Ok(group),
            other => Err(unexpected("create_group", &other)),
        }
    }

    /// Leaves a group: the server stops delivering it to all of this user's devices.
    pub async fn leave_group(&self, group: &str) -> Result<(), ClientError> {
        match self
            .request(Request::LeaveGroup {
                group: group.into(),
            })
            .await?
        {
            Reply::GroupLeft { .. } => Ok(()),
            other => Err(unexpected("leave_group", &other)),
        }
    }

    /// The delivery service's view of a group this device is in.
    pub async fn group_info(&self, group: &str) -> Result<GroupSummary, ClientError> {
        match self
            .request(Request::GroupInfo {
                group: group.into(),
            })
            .await?
        {
            Reply::Group(summary) => Ok(summary),
            other => Err(unexpected("group_info", &other)),
        }
    }

    /// The groups this device is in, as the delivery service knows them.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        match self.request(Request::ListGroups).await? {
            Reply::Groups { groups } => Ok(groups),
            other => Err(unexpected("list_groups", &other)),
        }
    }

    /// Sends one group message stream (an MLS message; a commit followed by its welcome of
    /// `welcome` bytes) and waits until the server has ordered and stored it, or refused it
    /// (`stale_epoch` for a commit another one beat).
    pub async fn send_group(
        &self,
        group: &str,
        kind: &str,
        id: MessageId,
        body: &[u8],
        welcome: Option<u64>,
    ) -> Result<SendOutcome, ClientError> {
        self.send_on_stream(
            id,
            streams::send_group_stream(&self.conn, group, kind, id, body, welcome),
        )
        .await
    }
}
