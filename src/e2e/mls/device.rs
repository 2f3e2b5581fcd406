//! [`MlsDevice`]: this device as an MLS member, over its state file in the home directory.
//! Opening creates the device's MLS signature key and its certification once; key packages
//! are made here. Every operation runs under the state's lock on a freshly loaded state and
//! saves it before returning what is to be sent, so a failed operation leaves nothing behind.

use std::path::Path;

use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

use super::cert::{self, CIPHERSUITE, MemberId};
use super::error::mls;
use super::key_packages::make_key_package;
use super::store::{Header, State, StateFile, StateLock};
use super::{GroupSummary, MlsError, MlsGroupId};
use crate::e2e::IdentityKeyPair;

/// Most key packages made in one batch (the server takes at most 100 per upload).
pub const MAX_KEY_PACKAGE_BATCH: usize = 100;

/// This device's MLS member: its state file, and who it is.
#[derive(Debug, Clone)]
pub struct MlsDevice {
    file: StateFile,
    member: MemberId,
}

/// Key packages made for upload (TLS-encoded `KeyPackage`s); their private keys are in the
/// device's state.
#[derive(Debug, Clone, Default)]
pub struct KeyPackageBatch {
    /// Key packages to be handed out once each.
    pub one_time: Vec<Vec<u8>>,
    /// The last-resort key package (MLS `LastResort` extension), handed out when no one-time
    /// one is left.
    pub last_resort: Option<Vec<u8>>,
}

/// What an operation on a loaded state gets: the state and the device's signer.
pub(super) struct Session<'a> {
    pub state: &'a mut State,
    pub signer: SignatureKeyPair,
    pub me: &'a MemberId,
}

impl Session<'_> {
    pub fn provider(&self) -> &OpenMlsRustCrypto {
        &self.state.provider
    }

    /// This device's credential with its signature key.
    pub fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.me.identity()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// The group, loaded from openmls's storage.
    pub fn group(&self, id: &MlsGroupId) -> Result<MlsGroup, MlsError> {
        if !self.state.header.groups.iter().any(|g| g.id == id) {
            return Err(MlsError::UnknownGroup);
        }
        MlsGroup::load(self.state.provider.storage(), &GroupId::from_slice(id))
            .map_err(mls)?
            .ok_or(MlsError::UnknownGroup)
    }
}

impl MlsDevice {
    /// Opens the MLS state of `member` in `home`, creating it (a new MLS signature key,
    /// certified by `identity`) the first time. Refuses a state of another account or device,
    /// or one whose certification `identity` did not make.
    pub fn open(
        home: &Path,
        member: MemberId,
        identity: &IdentityKeyPair,
    ) -> Result<Self, MlsError> {
        let file = StateFile::new(home);
        let lock = file.lock()?;
        match file.load(&lock)? {
            Some(state) => {
                let found = MemberId {
                    user: state.header.user.clone(),
                    device: state.header.device,
                };
                if found != member {
                    return Err(MlsError::WrongDevice {
                        expected: member.to_string(),
                        found: found.to_string(),
                    });
                }
                let expected =
                    cert::certify(identity, &member, &state.header.signature_key).to_vec();
                if expected != state.header.certification {
                    return Err(MlsError::Certification {
                        member: member.to_string(),
                        reason: "the state's certification is not by this identity".into(),
                    });
                }
            }
            None => {
                let provider = OpenMlsRustCrypto::default();
                let signer =
                    SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
                signer.store(provider.storage()).map_err(mls)?;
                let certification = cert::certify(identity, &member, signer.public()).to_vec();
                let state = State {
                    header: Header {
                        user: member.user.clone(),
                        device: member.device,
                        signature_key: signer.public().to_vec(),
                        certification,
                        groups: Vec::new(),
                        unshown: Default::default(),
                    },
                    provider,
                };
                file.save(&lock, &state)?;
                tracing::debug!(member = %member, "created the device's MLS state");
            }
        }
        Ok(Self { file, member })
    }

    /// The MLS state of whichever device `home` holds, if it has one (no identity needed:
    /// the certification was checked when it was made).
    pub fn open_existing(home: &Path) -> Result<Option<Self>, MlsError> {
        let file = StateFile::new(home);
        let lock = file.lock()?;
        let Some(state) = file.load(&lock)? else {
            return Ok(None);
        };
        let member = MemberId {
            user: state.header.user,
            device: state.header.device,
        };
        Ok(Some(Self { file, member }))
    }

    /// This device.
    pub fn member(&self) -> &MemberId {
        &self.member
    }

    /// The state file's path (for errors).
    pub(super) fn state_path(&self) -> std::path::PathBuf {
        self.file.path()
    }

    /// Loads the state and the device's signer. Call under the lock.
    fn load(&self, lock: &StateLock) -> Result<(State, SignatureKeyPair), MlsError> {
        let gone = |reason: &str| MlsError::CorruptState {
            path: self.file.path(),
            reason: reason.into(),
        };
        let state = self
            .file
            .load(lock)?
            .ok_or_else(|| gone("the state file is gone"))?;
        let signer = SignatureKeyPair::read(
            state.provider.storage(),
            &state.header.signature_key,
            CIPHERSUITE.signature_algorithm(),
        )
        .ok_or_else(|| gone("the signature key pair is missing"))?;
        Ok((state, signer))
    }

    /// Runs `change` on the freshly loaded state under the lock and saves the state only if
    /// it succeeds: what it returns is safe to send or acknowledge.
    pub(super) fn change<T>(
        &self,
        change: impl FnOnce(&mut Session<'_>) -> Result<T, MlsError>,
    ) -> Result<T, MlsError> {
        let lock = self.file.lock()?;
        let (mut state, signer) = self.load(&lock)?;
        let result = change(&mut Session {
            state: &mut state,
            signer,
            me: &self.member,
        })?;
        self.file.save(&lock, &state)?;
        Ok(result)
    }

    /// Runs `read` on the freshly loaded state under the lock, saving nothing.
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&mut Session<'_>) -> Result<T, MlsError>,
    ) -> Result<T, MlsError> {
        let lock = self.file.lock()?;
        let (mut state, signer) = self.load(&lock)?;
        read(&mut Session {
            state: &mut state,
            signer,
            me: &self.member,
        })
    }

    /// Makes `count` one-time key packages (at most [`MAX_KEY_PACKAGE_BATCH`]) and, if
    /// `last_resort`, a last-resort one; their private keys are saved before they are
    /// returned for upload.
    pub fn key_packages(
        &self,
        count: usize,
        last_resort: bool,
    ) -> Result<KeyPackageBatch, MlsError> {
        if count > MAX_KEY_PACKAGE_BATCH {
            return Err(MlsError::KeyPackage(format!(
                "at most {MAX_KEY_PACKAGE_BATCH} key packages per batch"
            )));
        }
        self.change(|s| {
            let extensions = cert::leaf_extensions(&s.state.header.certification)?;
            let mut batch = KeyPackageBatch::default();
            for _ in 0..count {
                batch
                    .one_time
                    .push(make_key_package(s, &extensions, false)?);
            }
            if last_resort {
                batch.last_resort = Some(make_key_package(s, &extensions, true)?);
            }
            Ok(batch)
        })
    }

    /// The groups this device knows, with their epoch, members and admins.
    pub fn groups(&self) -> Result<Vec<GroupSummary>, MlsError> {
        self.read(|s| {
            let ids: Vec<Vec<u8>> = s.state.header.groups.iter().map(|g| g.id.clone()).collect();
            ids.iter()
                .map(|id| {
                    let id = super::group_id(id)?;
                    GroupSummary::of(&s.group(&id)?)
                })
                .collect()
        })
    }

    /// One group's epoch, members and admins.
    pub fn group(&self, id: &MlsGroupId) -> Result<GroupSummary, MlsError> {
        self.read(|s| GroupSummary::of(&s.group(id)?))
    }
}
