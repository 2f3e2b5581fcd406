//! Groups as the server knows them: by name (global on a server), created with a GroupInfo
//! for the delivery service, their deliveries processed with the name checked, and their
//! application messages kept in the state, in the same save that used up their keys, until
//! the application has shown them.

use openmls::prelude::*;

use super::cert::Pins;
use super::error::mls;
use super::group::create;
use super::incoming::{Incoming, Parsed, handle, join, parse};
use super::store::KeptMessage;
use super::{MlsDevice, MlsError, MlsGroupId, group_id};

/// Most decrypted messages kept unshown (the oldest are dropped past it).
pub const MAX_UNSHOWN: usize = 10_000;
/// Most bytes of plaintext kept unshown.
pub const MAX_UNSHOWN_BYTES: usize = 16 << 20;

/// A group just created, to register with the server (`create_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedGroup {
    /// Its MLS group id.
    pub id: MlsGroupId,
    /// A signed GroupInfo of it with the ratchet tree (an `MLSMessage`).
    pub group_info: Vec<u8>,
}

/// What the server's deliver header says of a group delivery.
#[derive(Debug, Clone, Copy)]
pub struct GroupDelivery<'a> {
    /// The group's name.
    pub group: &'a str,
    /// The sender's message id.
    pub id: &'a [u8],
    /// The server's sequence number.
    pub seq: u64,
    /// When the server stored it.
    pub sent_at: u64,
}

impl MlsDevice {
    /// Creates a group under `name`, with a GroupInfo for the server. If the server refuses
    /// the name, [`MlsDevice::forget_group`] it.
    pub fn create_named_group(&self, name: &str) -> Result<CreatedGroup, MlsError> {
        self.change(|s| {
            for meta in s.state.header.groups.iter_mut() {
                if meta.name.as_deref() == Some(name) {
                    meta.name = None;
                }
            }
            let id = create(s, Some(name))?;
            let g = s.group(&id)?;
            let info = g
                .export_group_info(s.provider().crypto(), &s.signer, true)
                .map_err(mls)?;
            Ok(CreatedGroup {
                id,
                group_info: info.to_bytes().map_err(mls)?,
            })
        })
    }

    /// The group this device knows under `name` (the last one joined, if several).
    pub fn group_named(&self, name: &str) -> Result<Option<MlsGroupId>, MlsError> {
        self.read(|s| {
            s.state
                .header
                .groups
                .iter()
                .rev()
                .find(|m| m.name.as_deref() == Some(name))
                .map(|m| group_id(&m.id))
                .transpose()
        })
    }

    /// The name of a group, if known.
    pub fn name_of(&self, group: &MlsGroupId) -> Result<Option<String>, MlsError> {
        self.read(|s| Ok(s.state.meta_mut(group)?.name.clone()))
    }

    /// [`MlsDevice::process`] for a delivery of the group named `delivery.group`: a welcome
    /// records the name; any other message must be of the group known by that name; an
    /// application message is kept (see [`MlsDevice::unshown`]) in the same save.
    pub fn process_delivered(
        &self,
        delivery: &GroupDelivery<'_>,
        bytes: &[u8],
        pins: &dyn Pins,
    ) -> Result<Incoming, MlsError> {
        let parsed = parse(bytes)?;
        self.change(|s| match parsed {
            Parsed::Welcome(welcome) => {
                let joined = join(s, welcome, pins)?;
                if let Incoming::Joined { group, .. } = &joined {
                    for meta in s.state.header.groups.iter_mut() {
                        if meta.name.as_deref() == Some(delivery.group) {
                            meta.name = None;
                        }
                    }
                    s.state.meta_mut(group)?.name = Some(delivery.group.to_owned());
                }
                Ok(joined)
            }
            Parsed::Protocol(message) => {
                let id = group_id(message.group_id().as_slice())?;
                let named = s.state.meta_mut(&id)?.name.clone();
                if named.as_deref().is_some_and(|n| n != delivery.group) {
                    return Err(MlsError::Malformed(format!(
                        "a message of another group than {}",
                        delivery.group
                    )));
                }
                let incoming = handle(s, message, pins)?;
                if let Incoming::Message {
                    sender, plaintext, ..
                } = &incoming
                {
                    let unshown = &mut s.state.header.unshown;
                    unshown.push_back(KeptMessage {
                        group: delivery.group.to_owned(),
                        id: delivery.id.to_vec(),
                        from: sender.user.clone(),
                        from_device: sender.device,
                        sent_at: delivery.sent_at,
                        seq: delivery.seq,
                        plaintext: plaintext.clone(),
                    });
                    let mut bytes: usize = unshown.iter().map(|m| m.plaintext.len()).sum();
                    while unshown.len() > MAX_UNSHOWN || bytes > MAX_UNSHOWN_BYTES {
                        match unshown.pop_front() {
                            Some(dropped) => bytes -= dropped.plaintext.len(),
                            None => break,
                        }
                    }
                }
                Ok(incoming)
            }
        })
    }

    /// Group messages decrypted and not shown yet, oldest first.
    pub fn unshown(&self) -> Result<Vec<KeptMessage>, MlsError> {
        self.read(|s| Ok(s.state.header.unshown.iter().cloned().collect()))
    }

    /// The application showed the message `id` of `group`: it leaves the state.
    pub fn shown(&self, group: &str, id: &[u8]) -> Result<(), MlsError> {
        self.change(|s| {
            s.state
                .header
                .unshown
                .retain(|m| !(m.group == group && m.id == id));
            Ok(())
        })
    }

    /// This device's GroupInfo of a group (signed, with the tree).
    pub fn group_info(&self, group: &MlsGroupId) -> Result<Vec<u8>, MlsError> {
        self.read(|s| {
            let g = s.group(group)?;
            let info = g
                .export_group_info(s.provider().crypto(), &s.signer, true)
                .map_err(mls)?;
            info.to_bytes().map_err(mls)
        })
    }
}
