//! A real server for integration tests: in-process on 127.0.0.1:0, a temporary fjall
//! directory and rcgen dev certificates.
#![allow(dead_code)]

pub mod cli;
pub mod crash_load;
pub mod metrics;
pub mod mls;
pub mod raw;
pub mod release_fixture;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use securefastchat::client::{Client, ClientOptions};
use securefastchat::protocol::{Password, SessionToken};
use securefastchat::server::{Server, ServerConfig, ServerError, TlsSource};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), tune).await
    }

    /// Starts a server on the data and certificates in `dir` (a restart when reused).
    pub async fn start_in(dir: TempDir, tune: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), dir, tune).await
    }

    /// [`TestServer::start_in`] listening on `addr` (the address of a server that stopped, to
    /// restart it where its clients look for it).
    pub async fn start_at(
        addr: SocketAddr,
        dir: TempDir,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = ServerConfig::new(
            addr,
            dir.path().join("data"),
            TlsSource::Dev {
                dir: dir.path().join("certs"),
            },
        );
        config.shutdown_grace = Duration::from_secs(2);
        tune(&mut config);
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            dir,
            shutdown,
            handle,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("certs").join("ca.crt")
    }

    pub fn options(&self) -> ClientOptions {
        let mut options = ClientOptions::new(self.addr.to_string(), self.ca_file());
        options.request_timeout = Duration::from_secs(10);
        options
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.options()).await.unwrap()
    }

    /// An end-to-end messenger for `name` with its keystore in `home`: signed up (or logged
    /// in) with [`PASSWORD`], its keys published.
    pub async fn messenger(
        &self,
        home: &std::path::Path,
        name: &str,
        signup: bool,
    ) -> securefastchat::client::messenger::Messenger {
        let client = self.client().await;
        if signup {
            client.signup(name, Password::new(PASSWORD)).await.unwrap();
        } else {
            client.login(name, Password::new(PASSWORD)).await.unwrap();
        }
        let messenger =
            securefastchat::client::messenger::Messenger::new(client, home, name).unwrap();
        messenger.ensure_keys().await.unwrap();
        messenger
    }

    /// A client signed up as `name` (and so logged in), with its token.
    pub async fn signed_up(&self, name: &str) -> (Client, SessionToken) {
        let client = self.client().await;
        let (_, token) = client.signup(name, Password::new(PASSWORD)).await.unwrap();
        (client, token)
    }

    /// A new connection resuming the session of `token`.
    pub async fn resumed(&self, token: SessionToken) -> Client {
        let client = self.client().await;
        client.resume(token).await.unwrap();
        client
    }

    /// Graceful shutdown; returns the directory so the server can be started on it again.
    pub async fn stop(self) -> TempDir {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
        self.dir
    }
}
