//! A small MLS member for the delivery-service tests, on OpenMLS directly (not the client
//! library): one device on a raw connection, its account identity key, its MLS signer and
//! provider, and its groups. It follows docs/PROTOCOL.md 5.7 to the byte.

use std::collections::HashMap;
use std::time::Duration;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::Signer as _;
use securefastchat::protocol::groups::{
    ADMINS_EXTENSION, CERTIFICATION_EXTENSION, certification_tbs, member_identity,
};
use securefastchat::protocol::keys::{Bin, SignedPrekey};
use securefastchat::protocol::{
    DeliverHeader, ErrorCode, MAX_STREAM_HEADER, MessageId, Reply, Request, SendHeader,
    StreamHeader, decode_body, encode_frame, read_frame,
};

use super::TestServer;
use super::raw::Raw;

pub const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;

pub fn capabilities() -> Capabilities {
    Capabilities::builder()
        .ciphersuites(vec![CS])
        .extensions(vec![
            ExtensionType::Unknown(CERTIFICATION_EXTENSION),
            ExtensionType::Unknown(ADMINS_EXTENSION),
            ExtensionType::LastResort,
        ])
        .build()
}

pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .max_past_epochs(2)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// The 0xff01 extension naming `admins`.
pub fn admins_extension(admins: &[&str]) -> Extension {
    let mut sorted: Vec<&str> = admins.to_vec();
    sorted.sort();
    Extension::Unknown(
        ADMINS_EXTENSION,
        UnknownExtension(rmp_serde::to_vec(&sorted).unwrap()),
    )
}

pub fn required_capabilities() -> Extension {
    Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
        &[
            ExtensionType::Unknown(CERTIFICATION_EXTENSION),
            ExtensionType::Unknown(ADMINS_EXTENSION),
        ],
        &[],
        &[CredentialType::Basic],
    ))
}

/// What a member got from its inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// An application message.
    Text {
        group: String,
        from: String,
        text: String,
    },
    /// A welcome: the member joined `group`.
    Joined { group: String },
    /// A commit, merged: the group is now at `epoch`.
    Commit { group: String, epoch: u64 },
    /// The commit that removed this member.
    Removed { group: String },
    /// The server's notice that `user` left.
    Left { group: String, user: String },
}

pub struct Member {
    pub raw: Raw,
    pub name: String,
    pub device: u32,
    pub identity: SignatureKeyPair,
    pub signer: SignatureKeyPair,
    pub provider: OpenMlsRustCrypto,
    pub groups: HashMap<String, MlsGroup>,
    next_id: u64,
    /// Delivery streams read, waiting for their turn in the `prev` chain.
    waiting: HashMap<u64, (DeliverHeader, Vec<u8>)>,
    last_seq: u64,
    /// Ids of the deliveries processed: one delivered again is dropped.
    seen: std::collections::HashSet<MessageId>,
}

impl Member {
    /// A new account `name` (device 1) with its identity and prekeys published.
    pub async fn signup(server: &TestServer, name: &str) -> Self {
        let raw = Raw::signed_up(server, name).await;
        let identity = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let mut member = Self::with(raw, name, 1, identity);
        let prekey = |context: &[u8], id: u32, member: &Member| {
            let key = [id as u8; 32];
            let mut signed = context.to_vec();
            signed.extend_from_slice(&id.to_be_bytes());
            signed.extend_from_slice(&key);
            let signature: [u8; 64] = member.identity.sign(&signed).unwrap().try_into().unwrap();
            SignedPrekey {
                id,
                key: Bin(key),
                signature: Bin(signature),
            }
        };
        let request = Request::PublishKeys {
            identity_key: Some(Bin(member.identity.public().try_into().unwrap())),
            signed_prekey: Some(prekey(b"SFC signed prekey v1", 1, &member)),
            last_resort: Some(prekey(b"SFC last-resort prekey v1", 2, &member)),
            one_time_prekeys: Vec::new(),
        };
        let reply = member.call(request).await;
        assert!(matches!(reply, Reply::KeysPublished { .. }), "{reply:?}");
        member
    }

    fn with(raw: Raw, name: &str, device: u32, identity: SignatureKeyPair) -> Self {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        signer.store(provider.storage()).unwrap();
        Self {
            raw,
            name: name.to_owned(),
            device,
            identity,
            signer,
            provider,
            groups: HashMap::new(),
            next_id: 100,
            waiting: HashMap::new(),
            last_seq: 0,
            seen: std::collections::HashSet::new(),
        }
    }

    /// A new connection of this device (logged in with the password), as after being offline.
    pub async fn reconnect(&mut self, server: &TestServer) {
        let mut raw = Raw::with_hello(server).await;
        let login = Request::Login {
            username: self.name.clone(),
            password: securefastchat::protocol::Password::new(super::PASSWORD),
            device: Some(self.device),
        };
        let reply = raw.call(2, login).await;
        assert!(matches!(reply, Reply::Session { .. }), "{reply:?}");
        self.raw = raw;
        self.waiting.clear();
        self.last_seq = 0;
    }

    pub async fn call(&mut self, request: Request) -> Reply {
        self.next_id += 1;
        self.raw.call(self.next_id, request).await
    }

    /// This device's certification of its MLS signature key.
    pub fn certification(&self) -> Vec<u8> {
        let tbs = certification_tbs(&self.name, self.device, self.signer.public()).unwrap();
        self.identity.sign(&tbs).unwrap()
    }

    fn credential(&self) -> CredentialWithKey {
        let identity = member_identity(&self.name, self.device).into_bytes();
        CredentialWithKey {
            credential: BasicCredential::new(identity).into(),
            signature_key: self.signer.public().into(),
        }
    }

    fn leaf_extensions(&self, certification: Vec<u8>) -> Extensions<LeafNode> {
        Extensions::single(Extension::Unknown(
            CERTIFICATION_EXTENSION,
            UnknownExtension(certification),
        ))
        .unwrap()
    }

    /// A key package of this device (its private keys kept in the provider), TLS-encoded.
    pub fn key_package(&self, last_resort: bool) -> Vec<u8> {
        self.key_package_with(last_resort, self.certification())
    }

    pub fn key_package_with(&self, last_resort: bool, certification: Vec<u8>) -> Vec<u8> {
        let mut builder = KeyPackage::builder()
            .leaf_node_capabilities(capabilities())
            .leaf_node_extensions(self.leaf_extensions(certification));
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CS, &self.provider, &self.signer, self.credential())
            .unwrap();
        bundle.key_package().tls_serialize_detached().unwrap()
    }

    /// Uploads `count` one-time key packages and a last-resort one.
    pub async fn publish_key_packages(&mut self, count: usize) -> Reply {
        let key_packages = (0..count)
            .map(|_| serde_bytes::ByteBuf::from(self.key_package(false)))
            .collect();
        let last_resort = Some(serde_bytes::ByteBuf::from(self.key_package(true)));
        self.call(Request::PublishKeyPackages {
            key_packages,
            last_resort,
        })
        .await
    }

    /// One key package per device of `user`, validated.
    pub async fn fetch_key_packages(&mut self, user: &str) -> Vec<KeyPackage> {
        let reply = self
            .call(Request::FetchKeyPackages {
                username: user.into(),
                devices: None,
            })
            .await;
        let Reply::KeyPackages { devices, .. } = reply else {
            panic!("expected key_packages: {reply:?}");
        };
        devices
            .into_iter()
            .map(|d| {
                KeyPackageIn::tls_deserialize_exact(&d.key_package)
                    .unwrap()
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .unwrap()
            })
            .collect()
    }

    /// Creates `group` alone and registers it with the DS.
    pub async fn create_group(&mut self, group: &str) -> Reply {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CS)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(2)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .capabilities(capabilities())
            .with_leaf_node_extensions(self.leaf_extensions(self.certification()))
            .unwrap()
            .with_group_context_extensions(
                Extensions::from_vec(vec![
                    required_capabilities(),
                    admins_extension(&[&self.name]),
                ])
                .unwrap(),
            )
            .build();
        let group_id: [u8; 16] = MessageId::random().unwrap().0;
        let mls_group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(&group_id),
            self.credential(),
        )
        .unwrap();
        let group_info = mls_group
            .export_group_info(self.provider.crypto(), &self.signer, true)
            .unwrap()
            .to_bytes()
            .unwrap();
        let reply = self
            .call(Request::CreateGroup {
                group: group.into(),
                group_id: Bin(group_id),
                group_info,
            })
            .await;
        if matches!(reply, Reply::GroupCreated { .. }) {
            self.groups.insert(group.to_owned(), mls_group);
        }
        reply
    }

    /// Runs `f` on this member's `group` with its provider and signer.
    pub fn with_group<R>(
        &mut self,
        group: &str,
        f: impl FnOnce(&mut MlsGroup, &OpenMlsRustCrypto, &SignatureKeyPair) -> R,
    ) -> R {
        let mls_group = self.groups.get_mut(group).expect("a group of this member");
        f(mls_group, &self.provider, &self.signer)
    }

    /// An application message of `text` for `group`, not sent.
    pub fn seal(&mut self, group: &str, text: &str) -> Vec<u8> {
        self.with_group(group, |g, provider, signer| {
            g.create_message(provider, signer, text.as_bytes())
                .unwrap()
                .to_bytes()
                .unwrap()
        })
    }

    pub fn epoch(&self, group: &str) -> u64 {
        self.groups[group].epoch().as_u64()
    }

    /// The leaves of `user` in `group`, as this member sees the tree.
    pub fn leaves_of(&self, group: &str, user: &str) -> Vec<LeafNodeIndex> {
        let prefix = format!("{user}/");
        self.groups[group]
            .members()
            .filter(|m| {
                let basic = BasicCredential::try_from(m.credential.clone()).unwrap();
                basic.identity().starts_with(prefix.as_bytes())
            })
            .map(|m| m.index)
            .collect()
    }

    /// Writes one group send and gives its event (`sent` or `send_failed`).
    pub async fn send_raw(
        &mut self,
        group: &str,
        id: MessageId,
        body: &[u8],
        welcome: Option<&[u8]>,
    ) -> Reply {
        let mut bytes = body.to_vec();
        if let Some(welcome) = welcome {
            bytes.extend_from_slice(welcome);
        }
        let header = StreamHeader::Send(SendHeader {
            id,
            to: String::new(),
            kind: "mls".into(),
            length: bytes.len() as u64,
            copies: None,
            group: Some(group.into()),
            welcome: welcome.map(|w| w.len() as u64),
        });
        let mut stream = self.raw.conn.open_uni().await.unwrap();
        let frame = encode_frame(&header, MAX_STREAM_HEADER).unwrap();
        // The server may refuse the stream before it is all written.
        if stream.write_all(&frame).await.is_ok() && stream.write_all(&bytes).await.is_ok() {
            let _ = stream.finish();
        }
        // Other events (key_packages_low) may come first.
        loop {
            let event = self.raw.event().await;
            if matches!(event, Reply::Sent { .. } | Reply::SendFailed { .. }) {
                return event;
            }
        }
    }

    /// Sends a commit (with its welcome); merges it once `sent`, drops it otherwise.
    pub async fn send_commit(
        &mut self,
        group: &str,
        commit: MlsMessageOut,
        welcome: Option<MlsMessageOut>,
    ) -> Reply {
        let id = MessageId::random().unwrap();
        let commit = commit.to_bytes().unwrap();
        let welcome = welcome.map(|w| w.to_bytes().unwrap());
        let reply = self.send_raw(group, id, &commit, welcome.as_deref()).await;
        let provider = &self.provider;
        let mls_group = self.groups.get_mut(group).unwrap();
        match reply {
            Reply::Sent { .. } => mls_group.merge_pending_commit(provider).unwrap(),
            _ => mls_group.clear_pending_commit(provider.storage()).unwrap(),
        }
        reply
    }

    /// Adds `packages` to `group` in one commit.
    pub async fn add(&mut self, group: &str, packages: &[KeyPackage]) -> Reply {
        let provider = &self.provider;
        let signer = &self.signer;
        let mls_group = self.groups.get_mut(group).unwrap();
        let (commit, welcome, _) = mls_group.add_members(provider, signer, packages).unwrap();
        self.send_commit(group, commit, Some(welcome)).await
    }

    /// Removes the leaves `leaves` from `group` in one commit.
    pub async fn remove(&mut self, group: &str, leaves: &[LeafNodeIndex]) -> Reply {
        let provider = &self.provider;
        let signer = &self.signer;
        let mls_group = self.groups.get_mut(group).unwrap();
        let (commit, _, _) = mls_group.remove_members(provider, signer, leaves).unwrap();
        self.send_commit(group, commit, None).await
    }

    /// An empty commit with a path (a key update).
    pub async fn update(&mut self, group: &str) -> Reply {
        let provider = &self.provider;
        let signer = &self.signer;
        let mls_group = self.groups.get_mut(group).unwrap();
        let bundle = mls_group
            .self_update(provider, signer, LeafNodeParameters::default())
            .unwrap();
        let (commit, _, _) = bundle.into_contents();
        self.send_commit(group, commit, None).await
    }

    /// Sends `text` as an application message to `group`.
    pub async fn send_text(&mut self, group: &str, text: &str) -> (MessageId, Reply) {
        let provider = &self.provider;
        let signer = &self.signer;
        let message = self
            .groups
            .get_mut(group)
            .unwrap()
            .create_message(provider, signer, text.as_bytes())
            .unwrap()
            .to_bytes()
            .unwrap();
        let id = MessageId::random().unwrap();
        (id, self.send_raw(group, id, &message, None).await)
    }

    /// The next delivery in the server's order (its `prev` chain), acknowledged.
    pub async fn next_delivery(&mut self) -> (DeliverHeader, Vec<u8>) {
        loop {
            if let Some(found) = self.waiting.remove(&self.last_seq) {
                self.last_seq = found.0.seq;
                let ack = Request::Ack {
                    seqs: vec![found.0.seq],
                    quiet: true,
                };
                self.raw.request(u64::MAX - found.0.seq, ack).await;
                return found;
            }
            let accepted =
                tokio::time::timeout(Duration::from_secs(10), self.raw.conn.accept_uni());
            let mut stream = accepted.await.expect("a delivery in time").unwrap();
            let mut buf = Vec::new();
            assert!(
                read_frame(&mut stream, MAX_STREAM_HEADER, &mut buf)
                    .await
                    .unwrap()
            );
            let StreamHeader::Deliver(header) = decode_body::<StreamHeader>(&buf).unwrap() else {
                panic!("expected a delivery");
            };
            let body = stream.read_to_end(4 << 20).await.unwrap();
            self.waiting.insert(header.prev, (header, body));
        }
    }

    /// Whether a delivery arrives within `wait`.
    pub async fn nothing_within(&mut self, wait: Duration) -> bool {
        if self.waiting.contains_key(&self.last_seq) {
            return false;
        }
        tokio::time::timeout(wait, self.raw.conn.accept_uni())
            .await
            .is_err()
    }

    /// Processes the next delivery.
    pub async fn receive(&mut self) -> Received {
        let (header, body) = loop {
            let (header, body) = self.next_delivery().await;
            if self.seen.insert(header.id) {
                break (header, body);
            }
        };
        let group = header.group.clone().expect("group traffic");
        if header.kind == "group_left" {
            return Received::Left {
                group,
                user: String::from_utf8(body).unwrap(),
            };
        }
        assert_eq!(header.kind, "mls");
        let message = MlsMessageIn::tls_deserialize_exact(&body).unwrap();
        if let MlsMessageBodyIn::Welcome(welcome) = message.extract() {
            let staged =
                StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, None)
                    .unwrap();
            let joined = staged.into_group(&self.provider).unwrap();
            self.groups.insert(group.clone(), joined);
            return Received::Joined { group };
        }
        let message = MlsMessageIn::tls_deserialize_exact(&body).unwrap();
        let protocol = message.try_into_protocol_message().unwrap();
        let provider = &self.provider;
        let mls_group = self.groups.get_mut(&group).expect("a known group");
        let processed = mls_group.process_message(provider, protocol).unwrap();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(text) => Received::Text {
                group,
                from: header.from,
                text: String::from_utf8(text.into_bytes()).unwrap(),
            },
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let removed = staged.self_removed();
                mls_group.merge_staged_commit(provider, *staged).unwrap();
                if removed {
                    Received::Removed { group }
                } else {
                    Received::Commit {
                        epoch: mls_group.epoch().as_u64(),
                        group,
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Tries to open an application message with this member's state (for a removed member).
    pub fn try_open(&mut self, group: &str, body: &[u8]) -> Result<String, String> {
        let message = MlsMessageIn::tls_deserialize_exact(body).map_err(|e| e.to_string())?;
        let protocol = message
            .try_into_protocol_message()
            .map_err(|e| e.to_string())?;
        let provider = &self.provider;
        let mls_group = self.groups.get_mut(group).expect("a group of this member");
        match mls_group.process_message(provider, protocol) {
            Ok(processed) => match processed.into_content() {
                ProcessedMessageContent::ApplicationMessage(text) => {
                    Ok(String::from_utf8_lossy(&text.into_bytes()).into_owned())
                }
                other => Err(format!("{other:?}")),
            },
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The `send_failed` code of a reply (panics on `sent`).
pub fn failure(reply: &Reply) -> (ErrorCode, Option<u64>) {
    match reply {
        Reply::SendFailed { code, epoch, .. } => (*code, *epoch),
        other => panic!("expected send_failed: {other:?}"),
    }
}
