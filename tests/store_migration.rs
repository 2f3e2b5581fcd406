//! Opening a store written in format 1 (inbox and send records keyed by user names) moves
//! everything to format 2 (keyed by per-user ids) and loses nothing, also when an earlier
//! migration stopped half-way. The format-1 stores here are written with fjall directly, in
//! the layout the earlier server wrote (docs/ARCHITECTURE.md, "Store layout").
//!
//! # The release fixture
//!
//! `tests/fixtures/release-0.1-store.tar.gz` is what release 0.1 (store format 2) leaves on
//! disk, written by that release's own server and clients rather than by hand: a data
//! directory where alice and bob talked both ways (both hold Double Ratchet sessions, the
//! send records of those messages are settled), then alice sent bob 301 messages while he was
//! offline and unsent one, so 300 are pending (more than a delivery batch of 128), with a gap
//! in bob's seqs where the unsent one was; the server's dev certificates; and both client
//! homes (keystore and a saved session token). Messages and sessions last a century, so
//! the fixture does not age. `tests/fixtures/release-0.1-store.json` ([`Manifest`]) lists what
//! the store holds: every pending message's seq, id, body digest and text, the unsent one,
//! the settled ones, the `meta` keyspace (seq counters, format), each user's id and keys.
//! `tests/common/release_fixture.rs` extracts it (system `tar`) and reads a store back into a
//! manifest (`observe`), for any test file (the device tests use the homes too). The writer
//! stops the server cleanly, so fjall's memtables are in tables; the archive is ≈ 310 KB, most
//! of the 64 MiB it unpacks to being fjall's preallocated journal, zeros that gzip away.
//!
//! The tests below check that the fixture holds what its manifest says and that bob's home,
//! connecting to a server on it, gets exactly the 300 pending texts, in order, once each.
//! The migration to format 3 (devices) keeps them passing; its own checks on the fixture and
//! a migration killed half-way are in `tests/store_migration_v3.rs`.
//!
//! Regenerate it only with the code of release 0.1 (store format 2), e.g. to change what it
//! holds before the format changes:
//!
//! ```text
//! SFC_WRITE_STORE_FIXTURE=1 cargo test --test store_migration -- --ignored write_release_fixture
//! ```
//!
//! (without the variable the writer runs and checks itself, and writes nothing into the tree).
//! Never regenerate it once the store format has changed: it is the old format on purpose,
//! what deployed servers hold, and a fixture written by the new code would make the migration
//! test check nothing. The writer refuses to replace it unless the store it wrote is format 2.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::release_fixture::{
    self, Extracted, FixtureUser, Manifest, SettledMessage, UnsentMessage, manifest_json, observe,
};
use common::{PASSWORD, TestServer};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use securefastchat::client::home::{Home, SavedSession};
use securefastchat::client::messenger::{Messenger, Received};
use securefastchat::protocol::{MessageId, Password, Username};
use securefastchat::server::ServerConfig;
use securefastchat::store::{
    AppendHooks, Appended, Copy, FjallStore, NewMessage, Placed, Removal, Store, StoredMessage,
    UserRecord,
};

/// bob's pending messages from alice in the old store: more than one migration chunk.
const MESSAGES: u64 = 5_000;

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

fn id(n: u64) -> MessageId {
    let mut id = [0xa1; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    MessageId(id)
}

fn stored(n: u64, from: &str) -> StoredMessage {
    StoredMessage {
        seq: n,
        id: id(n),
        from: user(from),
        from_device: 1,
        to: None,
        kind: "text".into(),
        sent_at: 1_000 + n,
        expires_at: u64::MAX,
        body: n.to_be_bytes().repeat(4),
    }
}

/// A send record as formats 1 and 2 wrote it.
#[derive(serde::Serialize)]
struct OldSentRecord {
    recipient: Username,
    seq: u64,
    expires_at: u64,
}

fn name_key(name: &str, suffix: &[u8]) -> Vec<u8> {
    [name.as_bytes(), &[0], suffix].concat()
}

fn keyspace(db: &Database, name: &str) -> Keyspace {
    db.keyspace(name, KeyspaceCreateOptions::default)
        .expect("keyspace")
}

/// Writes a format-1 store: accounts alice and bob; bob's inbox holds `MESSAGES` messages
/// from alice (seqs 1..), alice has their send records; "ghost", who has no account, has one
/// message in its inbox. bob's seq counter was stored at a clean stop. The messages from
/// `moved_from` on are in the old keyspaces; those before it were already moved by a
/// migration that stopped (ids alice 1, bob 2).
fn old_store(dir: &std::path::Path, moved_from: u64) {
    let db = Database::builder(dir).open().expect("open fjall");
    let (users, inbox, sent, meta) = (
        keyspace(&db, "users"),
        keyspace(&db, "inbox"),
        keyspace(&db, "sent"),
        keyspace(&db, "meta"),
    );
    for name in ["alice", "bob"] {
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: 7,
        };
        let value = rmp_serde::to_vec_named(&record).expect("encode");
        users.insert(name, value).expect("insert");
    }
    let encode_sent = |n: u64| {
        let record = OldSentRecord {
            recipient: user("bob"),
            seq: n,
            expires_at: u64::MAX,
        };
        rmp_serde::to_vec_named(&record).expect("encode")
    };
    if moved_from > 1 {
        let (ids, names) = (keyspace(&db, "user_ids"), keyspace(&db, "user_names"));
        let (inbox_v2, sent_v2) = (keyspace(&db, "inbox_v2"), keyspace(&db, "sent_v2"));
        for (name, n) in [("alice", 1u32), ("bob", 2)] {
            ids.insert(name, n.to_be_bytes()).expect("insert");
            names.insert(n.to_be_bytes(), name).expect("insert");
        }
        for n in 1..moved_from {
            let message = rmp_serde::to_vec_named(&stored(n, "alice")).expect("encode");
            let inbox_key = [&2u32.to_be_bytes()[..], &n.to_be_bytes()].concat();
            inbox_v2.insert(inbox_key, message).expect("insert");
            let sent_key = [&1u32.to_be_bytes()[..], &id(n).0].concat();
            sent_v2.insert(sent_key, encode_sent(n)).expect("insert");
        }
    }
    for n in moved_from..=MESSAGES {
        let message = rmp_serde::to_vec_named(&stored(n, "alice")).expect("encode");
        inbox
            .insert(name_key("bob", &n.to_be_bytes()), message)
            .expect("insert");
        sent.insert(name_key("alice", &id(n).0), encode_sent(n))
            .expect("insert");
    }
    let ghost = rmp_serde::to_vec_named(&stored(1, "alice")).expect("encode");
    inbox
        .insert(name_key("ghost", &1u64.to_be_bytes()), ghost)
        .expect("insert");
    // bob's next seq, stored in epoch 0 at a clean stop (no running marker).
    let counter = [(MESSAGES + 1).to_be_bytes(), 0u64.to_be_bytes()].concat();
    meta.insert(name_key("seq", b"bob")[..].to_vec(), counter)
        .expect("insert");
    db.persist(PersistMode::SyncAll).expect("persist");
}

/// Everything of `old_store` is readable, deduplicated and removable through the new store.
async fn check_everything_moved(dir: &std::path::Path) {
    let (alice, bob) = (user("alice"), user("bob"));
    {
        let store = FjallStore::open(dir).expect("open the old store");
        let pending = store.pending(&bob, 1, 0, 10_000).await.expect("pending");
        let expected: Vec<StoredMessage> = (1..=MESSAGES).map(|n| stored(n, "alice")).collect();
        assert!(
            pending == expected,
            "bob's inbox differs after the migration"
        );
        let record = store.sent(&alice, id(4_321)).await.expect("sent");
        assert_eq!(
            record.map(|r| r.copies),
            Some(vec![Placed {
                recipient: bob.clone(),
                device: 1,
                seq: 4_321
            }])
        );

        // A resend of a migrated message is a duplicate; a new one follows bob's counter.
        let message = |n: u64| NewMessage {
            sender: alice.clone(),
            sender_device: 1,
            to: bob.clone(),
            id: id(n),
            kind: "text".into(),
            copies: vec![Copy {
                recipient: bob.clone(),
                device: 1,
                body: vec![1; 8],
            }],
            sent_at: 1,
            expires_at: u64::MAX,
        };
        let resend = store.append(message(17), AppendHooks::default()).await;
        assert!(matches!(resend, Ok(Appended::Duplicate)), "{resend:?}");
        let new = store
            .append(message(MESSAGES + 1), AppendHooks::default())
            .await;
        assert!(
            matches!(&new, Ok(Appended::Stored { seqs }) if *seqs == [MESSAGES + 1]),
            "{new:?}"
        );
        let removed = store
            .remove_pending(&bob, 1, vec![1, 2, MESSAGES], Removal::Acknowledged)
            .await
            .expect("remove");
        assert_eq!(removed, 3);

        // The ghost's message is kept, but the ghost is no account.
        let ghost = user("ghost");
        assert_eq!(
            store
                .pending(&ghost, 1, 0, 10)
                .await
                .expect("pending")
                .len(),
            1
        );
        assert_eq!(store.user_exists(&ghost).await.ok(), Some(false));
        assert_eq!(store.user_exists(&bob).await.ok(), Some(true));
    }
    // Reopened: nothing to migrate again, and the changes above stayed.
    {
        let store = FjallStore::open(dir).expect("reopen");
        let pending = store.pending(&bob, 1, 0, 10_000).await.expect("pending");
        assert_eq!(pending.len() as u64, MESSAGES - 3 + 1);
        assert_eq!(pending.first().map(|m| m.seq), Some(3));
        assert_eq!(pending.last().map(|m| m.seq), Some(MESSAGES + 1));
    }
    // The old keyspaces are gone, and the store went on to format 3 (then 4, which moves
    // nothing): each account has its device 1, whose inbox is the account's.
    {
        let store = FjallStore::open(dir).expect("reopen");
        for name in [&alice, &bob] {
            let devices = store.devices(name).await.expect("devices");
            let ids: Vec<(u32, u64)> = devices.iter().map(|d| (d.id, d.added_at)).collect();
            assert_eq!(ids, [(1, 7)], "{name}");
        }
    }
    let db = Database::builder(dir).open().expect("open fjall");
    assert!(!db.keyspace_exists("inbox"));
    assert!(!db.keyspace_exists("sent"));
    let format = keyspace(&db, "meta").get("store-format").expect("read");
    assert_eq!(format.as_deref(), Some(&4u32.to_be_bytes()[..]));
}

#[tokio::test]
async fn a_format_1_store_is_migrated_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_store(dir.path(), 1);
    check_everything_moved(dir.path()).await;
}

#[tokio::test]
async fn a_migration_that_stopped_half_way_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_store(dir.path(), 2_000);
    check_everything_moved(dir.path()).await;
}

#[tokio::test]
async fn a_store_of_an_unknown_format_is_not_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Database::builder(dir.path()).open().expect("open fjall");
        keyspace(&db, "meta")
            .insert("store-format", 5u32.to_be_bytes())
            .expect("insert");
        db.persist(PersistMode::SyncAll).expect("persist");
    }
    let refused = FjallStore::open(dir.path()).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("store format 5")),
        "{refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The release fixture (see the module doc).

/// Messages from alice left pending for bob: more than one delivery batch (128).
const FIXTURE_PENDING: usize = 300;
/// The unsent message was sent (and unsent) just before pending message number this.
const UNSENT_BEFORE: usize = 151;
/// The unsent message's text.
const UNSENT_TEXT: &str = "sent and unsent while bob was away";
/// The conversation before bob went away: (from, to, text).
const CONVERSATION: [(&str, &str, &str); 4] = [
    ("alice", "bob", "hello bob"),
    ("bob", "alice", "hello alice"),
    ("alice", "bob", "how are you?"),
    ("bob", "alice", "fine, and you?"),
];
/// Lifetime of the fixture's messages and sessions: a century, so that it does not age.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How long a test waits for a message that must come.
const WAIT: Duration = Duration::from_secs(10);

fn pending_text(n: usize) -> String {
    format!("pending {n:03}")
}

fn lasting(config: &mut ServerConfig) {
    config.message_ttl = CENTURY;
    config.session_ttl = CENTURY;
}

/// A messenger for `name` in `home` after signup, with the session saved in the home as
/// `sfc login` saves it.
async fn signed_up(server: &TestServer, home: &Path, name: &str) -> Messenger {
    let client = server.client().await;
    let (info, token) = client.signup(name, Password::new(PASSWORD)).await.unwrap();
    Home::open(home)
        .unwrap()
        .save_session(&SavedSession {
            server: server.addr.to_string(),
            username: info.username,
            token,
            expires_at: info.expires_at,
        })
        .unwrap();
    let messenger = Messenger::new(client, home, name).unwrap();
    messenger.ensure_keys().await.unwrap();
    messenger
}

/// A messenger for `name` on the extracted fixture, resuming the session saved in its home.
async fn resumed(server: &TestServer, fixture_dir: &Path, name: &str) -> Messenger {
    let home = fixture_dir.join("homes").join(name);
    let saved = Home::open(&home).unwrap().load_session().unwrap().unwrap();
    let client = server.client().await;
    let info = client.resume(saved.token).await.unwrap();
    assert_eq!(info.username, name);
    let messenger = Messenger::new(client, &home, name).unwrap();
    messenger.ensure_keys().await.unwrap();
    messenger
}

/// The next message, which must be a text: (id, from, text, warning); shown (acknowledged).
async fn next_text(m: &Messenger, wait: Duration) -> (MessageId, String, String, Option<String>) {
    let received = m.receive(wait).await.unwrap().expect("a message");
    let text = match &received {
        Received::Text {
            id,
            from,
            text,
            warning,
            ..
        } => (*id, from.clone(), text.clone(), warning.clone()),
        other => panic!("expected a text, got {other:?}"),
    };
    m.shown(&received).await.unwrap();
    text
}

/// What the release's server and clients were made to write: the manifest's fields that do
/// not come from the store, and the text of every message alice sent bob, by id (hex).
struct Written {
    manifest: Manifest,
    texts: HashMap<String, String>,
}

/// Runs the release's server in `root` (`data`, `certs`) with homes in `root/homes`, has
/// alice and bob talk, leaves `FIXTURE_PENDING` messages pending for bob and one unsent, and
/// stops the server cleanly.
async fn write_release_store(root: tempfile::TempDir) -> (tempfile::TempDir, Written) {
    let server = TestServer::start_in(root, lasting).await;
    let homes = server.dir.path().join("homes");
    let alice = signed_up(&server, &homes.join("alice"), "alice").await;
    let bob = signed_up(&server, &homes.join("bob"), "bob").await;
    let by_name = |name: &str| if name == "alice" { &alice } else { &bob };

    let mut settled = Vec::new();
    for (from, to, text) in CONVERSATION {
        let (id, _) = by_name(from).send_text(to, text).await.unwrap();
        let got = next_text(by_name(to), WAIT).await;
        assert_eq!((got.0, got.1.as_str(), got.2.as_str()), (id, from, text));
        settled.push(SettledMessage {
            from: from.into(),
            to: to.into(),
            id: id.to_hex(),
            text: text.into(),
        });
    }
    bob.close().await;

    let mut texts = HashMap::new();
    let mut unsent = None;
    for n in 1..=FIXTURE_PENDING {
        if n == UNSENT_BEFORE {
            let (id, _) = alice.send_text("bob", UNSENT_TEXT).await.unwrap();
            assert!(alice.client().unsend(id).await.unwrap(), "not unsent");
            unsent = Some(id);
        }
        let text = pending_text(n);
        let (id, _) = alice.send_text("bob", &text).await.unwrap();
        texts.insert(id.to_hex(), text);
    }
    alice.close().await;
    let root = server.stop().await;

    let user = |name: &str| FixtureUser {
        name: name.into(),
        home: format!("homes/{name}"),
        // The rest is read from the store and the home.
        user_id: 0,
        identity_key: String::new(),
        signed_prekey_id: 0,
        last_resort_id: 0,
        one_time_prekeys: 0,
        session_expires_at: 0,
    };
    let manifest = Manifest {
        about: "A store written by release 0.1 of SecureFastChat with its own server and \
                clients (tests/store_migration.rs, write_release_fixture): alice and bob talked \
                both ways, then alice sent bob 301 messages while he was offline and unsent \
                one; bob's 300 pending messages are listed in seq order."
            .into(),
        written_by: format!("securefastchat {}", env!("CARGO_PKG_VERSION")),
        store_format: None,
        password: PASSWORD.into(),
        users: vec![user("alice"), user("bob")],
        meta: Vec::new(),
        settled,
        unsent: UnsentMessage {
            id: unsent.expect("the unsent message").to_hex(),
            text: UNSENT_TEXT.into(),
            seq: 0,
        },
        pending: Vec::new(),
    };
    (root, Written { manifest, texts })
}

/// The manifest lists what `write_release_store` left: the pending texts in order, the
/// unsent message's seq just before pending message `UNSENT_BEFORE`, the conversation settled.
fn check_release_contents(manifest: &Manifest) {
    let texts: Vec<String> = manifest.pending.iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (1..=FIXTURE_PENDING).map(pending_text).collect();
    assert_eq!(texts, expected, "bob's pending messages");
    assert!(manifest.pending.iter().all(|m| m.from == "alice"));
    assert_eq!(
        manifest.pending[UNSENT_BEFORE - 1].seq,
        manifest.unsent.seq + 1
    );
    assert_eq!(manifest.unsent.text, UNSENT_TEXT);
    let settled: Vec<_> = manifest
        .settled
        .iter()
        .map(|m| (m.from.as_str(), m.to.as_str(), m.text.as_str()))
        .collect();
    assert_eq!(settled, CONVERSATION);
}

/// Writes the release fixture (see the module doc). Without `SFC_WRITE_STORE_FIXTURE=1` it
/// writes into a temporary directory and only checks itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the release fixture: only with the code of release 0.1 (module doc)"]
async fn write_release_fixture() {
    let (root, written) = write_release_store(tempfile::tempdir().unwrap()).await;
    let out = tempfile::tempdir().unwrap();
    let (archive, json) = (
        out.path().join("store.tar.gz"),
        out.path().join("store.json"),
    );
    release_fixture::pack(root.path(), &archive);
    drop(root);

    // Described from an extracted copy: the archive itself is what is checked.
    let copy = tempfile::tempdir().unwrap();
    release_fixture::extract(&archive, copy.path());
    let manifest = observe(copy.path(), &written.manifest, &written.texts).await;
    check_release_contents(&manifest);
    std::fs::write(&json, manifest_json(&manifest)).unwrap();
    let size = std::fs::metadata(&archive).unwrap().len();
    eprintln!(
        "archive: {size} bytes, store format {:?}",
        manifest.store_format
    );
    assert!(size < 2 << 20, "the archive is {size} bytes");

    if std::env::var_os("SFC_WRITE_STORE_FIXTURE").is_some_and(|v| v == "1") {
        assert_eq!(
            manifest.store_format,
            Some(2),
            "refusing to replace the release fixture with a store of another format"
        );
        let fixtures = release_fixture::in_crate("tests/fixtures");
        std::fs::create_dir_all(&fixtures).unwrap();
        std::fs::copy(
            &archive,
            release_fixture::in_crate(release_fixture::ARCHIVE),
        )
        .unwrap();
        std::fs::copy(&json, release_fixture::in_crate(release_fixture::MANIFEST)).unwrap();
        eprintln!("wrote {}", release_fixture::ARCHIVE);
    }
}

/// The committed fixture holds what its manifest says: observed again from a fresh copy,
/// the store gives the same manifest (seqs, ids, body digests, keys, counters, send records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_fixture_holds_what_its_manifest_says() {
    let fixture = Extracted::release();
    let texts = fixture
        .manifest
        .pending
        .iter()
        .map(|m| (m.id.clone(), m.text.clone()))
        .collect();
    check_release_contents(&fixture.manifest);
    let observed = observe(fixture.dir.path(), &fixture.manifest, &texts).await;
    let expected = &fixture.manifest;
    assert_eq!(observed.store_format, expected.store_format);
    assert_eq!(observed.users, expected.users);
    assert_eq!(observed.meta, expected.meta);
    assert_eq!(observed.unsent, expected.unsent);
    for (seen, listed) in observed.pending.iter().zip(&expected.pending) {
        assert_eq!(seen, listed);
    }
    assert!(
        observed == *expected,
        "the fixture differs from its manifest"
    );
}

/// A server on the release fixture delivers bob's 300 pending messages to his home, in order,
/// once each, and not the unsent one; afterwards alice and bob go on in their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_the_release_fixture_delivers_every_pending_message_once() {
    let Extracted { dir, manifest } = Extracted::release();
    let server = TestServer::start_in(dir, |_| {}).await;
    let root = server.dir.path().to_owned();
    let bob = resumed(&server, &root, "bob").await;
    let mut got = Vec::new();
    while got.len() < manifest.pending.len() {
        let (id, from, text, warning) = next_text(&bob, WAIT).await;
        assert_eq!((from.as_str(), warning), ("alice", None), "{text}");
        got.push((id.to_hex(), text));
    }
    assert_eq!(bob.receive(Duration::from_millis(500)).await.unwrap(), None);
    let expected: Vec<(String, String)> = manifest
        .pending
        .iter()
        .map(|m| (m.id.clone(), m.text.clone()))
        .collect();
    let first_difference = got.iter().zip(&expected).position(|(g, e)| g != e);
    assert!(
        got == expected,
        "bob got other messages than the pending ones, first at {first_difference:?}"
    );
    assert!(!got.iter().any(|(id, _)| *id == manifest.unsent.id));

    // Both Double Ratchet sessions go on.
    let alice = resumed(&server, &root, "alice").await;
    let (id, _) = alice.send_text("bob", "still there?").await.unwrap();
    let got = next_text(&bob, WAIT).await;
    assert_eq!((got.0, got.2.as_str(), got.3), (id, "still there?", None));
    bob.send_text("alice", "yes").await.unwrap();
    assert_eq!(next_text(&alice, WAIT).await.2, "yes");
    server.stop().await;
}
