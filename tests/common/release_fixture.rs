//! The store of release 0.1 kept in `tests/fixtures/`: what a deployed server has on disk
//! before the devices change the store format, for the migration tests to open. Written by
//! `tests/store_migration.rs::write_release_fixture`, which says how and when (never again
//! once the format changed).
//!
//! The archive holds `data/` (the server's data directory), `certs/` (its dev certificates,
//! so [`super::TestServer::start_in`] on the extracted directory serves them) and
//! `homes/alice`, `homes/bob` (the two users' client homes: keystore with their Double
//! Ratchet sessions, and `session.toml` with a session token). The manifest beside it says
//! what is in them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use securefastchat::client::home::{Home, SavedSession};
use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{FjallStore, Store};

/// The archive, relative to the crate root.
pub const ARCHIVE: &str = "tests/fixtures/release-0.1-store.tar.gz";
/// Its manifest (JSON, [`Manifest`]), relative to the crate root.
pub const MANIFEST: &str = "tests/fixtures/release-0.1-store.json";
/// The directories the archive holds, relative to where it is extracted.
pub const CONTENTS: [&str; 3] = ["data", "certs", "homes"];

/// What the fixture holds, as read from the store right after it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// What this is, in words.
    pub about: String,
    /// The crate version that wrote it.
    pub written_by: String,
    /// `meta["store-format"]` as written (u32 BE); `None` if the store wrote none.
    pub store_format: Option<u32>,
    /// Every user's password.
    pub password: String,
    /// alice, then bob.
    pub users: Vec<FixtureUser>,
    /// Every entry of the `meta` keyspace, hex key → hex value (seq counters `seq` 0x00 name:
    /// next seq ‖ epoch, u64 BE each; `seq-epoch`; `store-format`).
    pub meta: Vec<(String, String)>,
    /// Conversation messages the recipient received and acknowledged: their send records
    /// are settled (only the used id is kept).
    pub settled: Vec<SettledMessage>,
    /// The message alice sent to bob and unsent while it was pending.
    pub unsent: UnsentMessage,
    /// bob's pending messages, all from alice, in seq order (the order bob must get them).
    pub pending: Vec<PendingMessage>,
}

/// A user of the fixture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureUser {
    /// The account name.
    pub name: String,
    /// Its id in `user_ids`.
    pub user_id: u32,
    /// Its client home, relative to the extracted directory.
    pub home: String,
    /// The published identity key (hex), as in the store's `keys` record.
    pub identity_key: String,
    /// The published signed prekey's id.
    pub signed_prekey_id: u32,
    /// The published last-resort prekey's id.
    pub last_resort_id: u32,
    /// One-time prekeys the server holds for it (`prekeys` keyspace).
    pub one_time_prekeys: u32,
    /// When the session token in its home's `session.toml` expires (Unix seconds).
    pub session_expires_at: u64,
}

/// A message whose send record is settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettledMessage {
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Message id (hex).
    pub id: String,
    /// Its text.
    pub text: String,
}

/// The unsent message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsentMessage {
    /// Message id (hex).
    pub id: String,
    /// Its text.
    pub text: String,
    /// The seq it had in bob's inbox (the one gap between pending seqs).
    pub seq: u64,
}

/// One of bob's pending messages, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingMessage {
    /// Its seq in bob's inbox.
    pub seq: u64,
    /// Message id (hex).
    pub id: String,
    /// Sender.
    pub from: String,
    /// The sender's `kind`.
    pub kind: String,
    /// When the server stored it.
    pub sent_at: u64,
    /// When it expires (a century after it was sent: the fixture must not age).
    pub expires_at: u64,
    /// Length of the sealed body.
    pub body_len: usize,
    /// SHA-256 of the sealed body (hex).
    pub body_sha256: String,
    /// The text bob's client shows for it.
    pub text: String,
}

/// The path of `relative` (e.g. [`ARCHIVE`]) in the crate.
pub fn in_crate(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

impl Manifest {
    /// Reads the manifest at `path`.
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The user named `name`.
    pub fn user(&self, name: &str) -> &FixtureUser {
        self.users
            .iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no user {name} in the manifest"))
    }
}

/// An extracted copy of the fixture, deleted when dropped.
pub struct Extracted {
    /// The directory holding [`CONTENTS`]; hand it to [`super::TestServer::start_in`].
    pub dir: TempDir,
    /// The manifest.
    pub manifest: Manifest,
}

impl Extracted {
    /// Extracts the committed fixture into a new temporary directory.
    pub fn release() -> Self {
        Self::from(&in_crate(ARCHIVE), &in_crate(MANIFEST))
    }

    /// Extracts `archive` (with its manifest) into a new temporary directory, in memory
    /// (`/dev/shm`) where there is one: what the fixture tests check is content, not
    /// durability, and receiving its 300 messages costs bob's client some 1,200 fsyncs of its
    /// keystore (open, then shown, each a file and a directory sync), which took 20 s on a
    /// busy disk and 4 s in memory.
    pub fn from(archive: &Path, manifest: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sfc-fixture")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        extract(archive, dir.path());
        Self {
            dir,
            manifest: Manifest::read(manifest),
        }
    }

    /// The server's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `name`'s client home.
    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join(&self.manifest.user(name).home)
    }

    /// The session saved in `name`'s home.
    pub fn session(&self, name: &str) -> SavedSession {
        Home::open(self.home(name))
            .unwrap()
            .load_session()
            .unwrap()
            .unwrap_or_else(|| panic!("no session saved in {name}'s home"))
    }
}

/// Extracts a gzipped tar `archive` into `into` with the system `tar`; the files belong to
/// whoever runs the tests, with their modes kept (the data directory must stay 0700).
pub fn extract(archive: &Path, into: &Path) {
    let status = Command::new("tar")
        .args(["--extract", "--gzip", "--no-same-owner", "--file"])
        .arg(archive)
        .arg("--directory")
        .arg(into)
        .status()
        .expect("run tar");
    assert!(
        status.success(),
        "tar could not extract {}",
        archive.display()
    );
}

/// Packs [`CONTENTS`] of `root` into the gzipped tar `archive` (names sorted, owner 0, so the
/// archive depends only on the files).
pub fn pack(root: &Path, archive: &Path) {
    let status = Command::new("tar")
        .args([
            "--create",
            "--gzip",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--file",
        ])
        .arg(archive)
        .arg("--directory")
        .arg(root)
        .args(CONTENTS)
        .status()
        .expect("run tar");
    assert!(
        status.success(),
        "tar could not write {}",
        archive.display()
    );
}

fn name(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

fn keyspace(db: &Database, name: &str) -> Keyspace {
    db.keyspace(name, KeyspaceCreateOptions::default)
        .expect("keyspace")
}

/// `template` completed from what a release-0.1 store (format 2) and homes extracted in `dir`
/// hold: the store's format and `meta`, each user's id, keys, one-time prekey count and saved
/// session, bob's pending messages (their texts looked up in `texts`, by id in hex) and the
/// unsent message's seq (the one gap in bob's seqs). Kept from `template`: what the store
/// cannot tell (names, homes, texts, which messages were settled and unsent). Checks on the
/// way that the pending messages have their send records and the settled and unsent ones
/// none. Opens the store, so it changes `dir`.
pub async fn observe(dir: &Path, template: &Manifest, texts: &HashMap<String, String>) -> Manifest {
    let mut manifest = template.clone();
    let data = dir.join("data");
    let (alice, bob) = (name("alice"), name("bob"));

    // Raw reads first: the store holds the database's lock, and opening it writes to `meta`.
    {
        let db = Database::builder(&data).open().expect("open fjall");
        let meta = keyspace(&db, "meta");
        manifest.meta.clear();
        for entry in meta.iter() {
            let (key, value) = entry.into_inner().expect("read meta");
            manifest.meta.push((hex::encode(&key), hex::encode(&value)));
        }
        manifest.store_format = meta
            .get("store-format")
            .expect("read")
            .map(|v| u32::from_be_bytes(v.as_ref().try_into().expect("a u32 store format")));
        let (ids, prekeys) = (keyspace(&db, "user_ids"), keyspace(&db, "prekeys"));
        for u in &mut manifest.users {
            let id = ids.get(&u.name).expect("read").expect("a user id");
            u.user_id = u32::from_be_bytes(id.as_ref().try_into().expect("a u32 user id"));
            let prefix = [u.name.as_bytes(), &[0]].concat();
            u.one_time_prekeys = prekeys.prefix(prefix).count() as u32;
        }
    }

    let store = FjallStore::open(&data).expect("open the store");
    for u in &mut manifest.users {
        // The store migrated them to the account (identity) and its device 1 (prekeys).
        let identity = store.identity(&name(&u.name)).await.unwrap();
        let keys = store.device_keys(&name(&u.name), 1).await.unwrap();
        let (identity, keys) = (identity.expect("identity"), keys.expect("keys"));
        u.identity_key = hex::encode(identity.0);
        u.signed_prekey_id = keys.signed_prekey.id;
        u.last_resort_id = keys.last_resort.id;
        let saved = Home::open(dir.join(&u.home))
            .unwrap()
            .load_session()
            .unwrap()
            .expect("a saved session");
        assert_eq!(saved.username, u.name);
        u.session_expires_at = saved.expires_at;
    }

    let stored = store.pending(&bob, 1, 0, 10_000).await.unwrap();
    assert!(store.pending(&alice, 1, 0, 10).await.unwrap().is_empty());
    manifest.pending.clear();
    for m in &stored {
        let id = m.id.to_hex();
        let text = texts.get(&id).expect("a message alice sent");
        let record = store.sent(&alice, m.id).await.unwrap();
        assert_eq!(
            record.map(|r| {
                let copies = r.copies.into_iter();
                copies.map(|c| (c.recipient, c.device, c.seq)).collect()
            }),
            Some(vec![(bob.clone(), 1, m.seq)]),
            "the send record of {text}"
        );
        manifest.pending.push(PendingMessage {
            seq: m.seq,
            id,
            from: m.from.as_str().into(),
            kind: m.kind.clone(),
            sent_at: m.sent_at,
            expires_at: m.expires_at,
            body_len: m.body.len(),
            body_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &m.body)),
            text: text.clone(),
        });
    }

    // Seqs follow each other but for the unsent message's.
    let gaps: Vec<u64> = stored
        .windows(2)
        .filter(|pair| pair[1].seq != pair[0].seq + 1)
        .map(|pair| {
            assert_eq!(
                pair[1].seq,
                pair[0].seq + 2,
                "seqs {} {}",
                pair[0].seq,
                pair[1].seq
            );
            pair[0].seq + 1
        })
        .collect();
    assert_eq!(
        gaps.len(),
        1,
        "gaps in bob's seqs where messages went: {gaps:?}"
    );
    manifest.unsent.seq = gaps[0];

    let unsent = MessageId::from_hex(&manifest.unsent.id).expect("hex id");
    assert_eq!(store.sent(&alice, unsent).await.unwrap(), None);
    for m in &manifest.settled {
        let id = MessageId::from_hex(&m.id).expect("hex id");
        let record = store.sent(&name(&m.from), id).await.unwrap();
        assert_eq!(record, None, "{} is settled", m.text);
    }
    store.close().await.unwrap();
    manifest
}

/// The manifest as JSON: pretty, with one line per pending message.
pub fn manifest_json(manifest: &Manifest) -> String {
    let head = Manifest {
        pending: Vec::new(),
        ..manifest.clone()
    };
    let head = serde_json::to_string_pretty(&head).unwrap();
    let lines: Vec<String> = manifest
        .pending
        .iter()
        .map(|m| format!("    {}", serde_json::to_string(m).unwrap()))
        .collect();
    let pending = format!("\"pending\": [\n{}\n  ]", lines.join(",\n"));
    let json = head.replacen("\"pending\": []", &pending, 1);
    assert_eq!(
        serde_json::from_str::<Manifest>(&json).ok().as_ref(),
        Some(manifest)
    );
    json + "\n"
}
