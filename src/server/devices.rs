//! The account operations on devices: checking the password again for a sensitive request,
//! registering a linked device, removing one, and replacing the identity (which removes every
//! other device). The link exchange that precedes a registration is in `links`.

use super::accounts::{AccountError, Accounts, ActiveSession, IssuedSession};
use crate::protocol::{DeviceId, MAX_PASSWORD_LEN, Password, Username};
use crate::store::StoreError;

impl Accounts {
    /// Checks `password` against `user`'s account (one argon2 run on the pool, like a login):
    /// for requests that act on the whole account (deleting it, removing a device, replacing the
    /// identity), so a stolen session token alone cannot.
    pub async fn check_password(
        &self,
        user: &Username,
        password: Password,
    ) -> Result<(), AccountError> {
        if password.len() > MAX_PASSWORD_LEN {
            return Err(AccountError::InvalidCredentials);
        }
        let stored = self.store().user(user).await?.map(|u| u.password_hash);
        if self.passwords.verify(password, stored).await? {
            Ok(())
        } else {
            Err(AccountError::InvalidCredentials)
        }
    }

    /// Registers a new device of `user` named `name` (its link succeeded) and gives it a
    /// session.
    pub async fn add_device(
        &self,
        user: &Username,
        name: String,
    ) -> Result<IssuedSession, AccountError> {
        let added = self.store().add_device(user, name, crate::unix_now()).await;
        self.device_lists.forget(user);
        let device = match added {
            Ok(device) => device,
            Err(StoreError::Limit(_)) => return Err(AccountError::TooManyDevices),
            Err(e) => return Err(e.into()),
        };
        self.issue_session(user.clone(), device).await
    }

    /// Removes `device` of `session`'s account: its inbox, prekeys and sessions go, and every
    /// live connection using one of its sessions loses it at once. The caller has checked the
    /// password and that `device` is not the session's own.
    pub async fn remove_device(
        &self,
        session: &ActiveSession,
        device: DeviceId,
    ) -> Result<(), AccountError> {
        let removed = self.store().remove_device(&session.username, device).await;
        self.device_lists.forget(&session.username);
        let Some(digests) = removed? else {
            return Err(AccountError::UnknownDevice);
        };
        for digest in &digests {
            self.revoke_live(digest);
        }
        Ok(())
    }

    /// Removes every device of `session`'s account but its own; returns their ids. Used when
    /// the identity is replaced: the other devices hold the old identity's private key.
    pub async fn remove_other_devices(
        &self,
        session: &ActiveSession,
    ) -> Result<Vec<DeviceId>, AccountError> {
        let mut removed = Vec::new();
        for device in self.store().devices(&session.username).await? {
            if device.id == session.device {
                continue;
            }
            match self.remove_device(session, device.id).await {
                Ok(()) => removed.push(device.id),
                // Removed in the meantime by another request: gone all the same.
                Err(AccountError::UnknownDevice) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}
