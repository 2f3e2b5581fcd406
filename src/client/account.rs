//! The requests about the account and its session: signup, login (as a device), resume,
//! whoami, logout, account deletion, and the account's devices (list, remove).

use std::sync::atomic::Ordering;

use super::{Client, ClientError, DeviceId, unexpected};
use crate::protocol::{DeviceInfo, Password, Reply, Request, SessionToken};

/// A session as the server granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The account's canonical name.
    pub username: String,
    /// The connection's device of the account (1 for a server from before devices).
    pub device: DeviceId,
    /// When the token expires, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Client {
    /// Signup step one: whether `username` is valid and free (the folded name is returned).
    pub async fn check_username(&self, username: &str) -> Result<(String, bool), ClientError> {
        match self
            .request(Request::CheckUsername {
                username: username.into(),
            })
            .await?
        {
            Reply::UsernameStatus {
                username,
                available,
            } => Ok((username, available)),
            other => Err(unexpected("check_username", &other)),
        }
    }

    /// Signup step two: creates the account; the connection is then logged in.
    pub async fn signup(
        &self,
        username: &str,
        password: Password,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        let reply = self
            .request(Request::Signup {
                username: username.into(),
                password,
            })
            .await?;
        self.logged_in(session_reply("signup", reply))
    }

    /// Logs in with a password as device 1; returns the session and its token (keep it
    /// secret).
    pub async fn login(
        &self,
        username: &str,
        password: Password,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        self.login_device(username, password, None).await
    }

    /// Logs in with a password as `device` of the account (device 1 when `None`); a removed
    /// or unknown device is refused (`unknown_device`).
    pub async fn login_device(
        &self,
        username: &str,
        password: Password,
        device: Option<DeviceId>,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        let reply = self
            .request(Request::Login {
                username: username.into(),
                password,
                device,
            })
            .await?;
        self.logged_in(session_reply("login", reply))
    }

    /// Restores a session with a token from an earlier login.
    pub async fn resume(&self, token: SessionToken) -> Result<SessionInfo, ClientError> {
        self.resume_with(token, true).await
    }

    /// [`Client::resume`], choosing whether this connection receives the user's messages
    /// (`false` leaves delivery with whichever connection has it, e.g. a running chat).
    pub async fn resume_with(
        &self,
        token: SessionToken,
        deliver: bool,
    ) -> Result<SessionInfo, ClientError> {
        match self.request(Request::Resume { token, deliver }).await? {
            Reply::Resumed {
                username,
                device,
                expires_at,
            } => {
                self.device.store(device, Ordering::Relaxed);
                Ok(SessionInfo {
                    username,
                    device,
                    expires_at,
                })
            }
            other => Err(unexpected("resume", &other)),
        }
    }

    /// Records the device of a successful signup or login.
    fn logged_in(
        &self,
        reply: Result<(SessionInfo, SessionToken), ClientError>,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        if let Ok((info, _)) = &reply {
            self.device.store(info.device, Ordering::Relaxed);
        }
        reply
    }

    /// Notes that this connection is logged in as `device` now (a `linked` answer, which the
    /// login methods above do not see).
    pub(crate) fn note_device(&self, device: DeviceId) {
        self.device.store(device, Ordering::Relaxed);
    }

    /// The device of the account this connection is logged in as (1 before it is).
    pub fn device(&self) -> DeviceId {
        self.device.load(Ordering::Relaxed)
    }

    /// Revokes this connection's session token everywhere.
    pub async fn logout(&self) -> Result<(), ClientError> {
        match self.request(Request::Logout).await? {
            Reply::LoggedOut => Ok(()),
            other => Err(unexpected("logout", &other)),
        }
    }

    /// Deletes this connection's account for good (the password is checked again): its keys,
    /// sessions and pending messages go, and the server holds the name for a while so no one
    /// else can take it. Returns the deleted account's name; the connection is then
    /// unauthenticated.
    pub async fn delete_account(&self, password: Password) -> Result<String, ClientError> {
        match self.request(Request::DeleteAccount { password }).await? {
            Reply::AccountDeleted { username } => Ok(username),
            other => Err(unexpected("delete_account", &other)),
        }
    }

    /// Who is logged in on this connection.
    pub async fn whoami(&self) -> Result<SessionInfo, ClientError> {
        match self.request(Request::Whoami).await? {
            Reply::Whoami {
                username,
                device,
                expires_at,
            } => Ok(SessionInfo {
                username,
                device,
                expires_at,
            }),
            other => Err(unexpected("whoami", &other)),
        }
    }

    /// The account's current devices, by id (`current` marks this connection's).
    pub async fn list_devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        match self.request(Request::ListDevices).await? {
            Reply::Devices { devices } => Ok(devices),
            other => Err(unexpected("list_devices", &other)),
        }
    }

    /// Removes another device of the account (the password is checked again); its
    /// connections are closed and its inbox is gone. Returns the removed device.
    pub async fn remove_device(
        &self,
        device: DeviceId,
        password: Password,
    ) -> Result<DeviceId, ClientError> {
        match self
            .request(Request::RemoveDevice {
                device,
                password,
                revocation: None,
            })
            .await?
        {
            Reply::DeviceRemoved { device } => Ok(device),
            other => Err(unexpected("remove_device", &other)),
        }
    }
}

fn session_reply(request: &str, reply: Reply) -> Result<(SessionInfo, SessionToken), ClientError> {
    match reply {
        Reply::Session {
            username,
            device,
            token,
            expires_at,
        } => Ok((
            SessionInfo {
                username,
                device,
                expires_at,
            },
            token,
        )),
        other => Err(unexpected(request, &other)),
    }
}
