//! The migration to store format 3 (devices). The release fixture (see
//! `tests/store_migration.rs`) becomes device 1 of each account and loses nothing.
//!
//! A migration killed half-way completes on the next open and loses nothing. The store is a
//! format-2 one written with fjall directly, in the layout release 0.1 wrote (`keys`: username → identity and prekeys; `prekeys`: username 0x00 id),
//! large enough for many synced chunks. The migration runs in a child process (this test
//! binary again, running only `migrate_in_child`), which is sent SIGKILL as soon as it logs
//! its first committed chunk of one-time prekeys (after the chunks of devices and of keys): a
//! real crash, in the middle of a step, with everything after it undone.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::release_fixture::Extracted;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use securefastchat::protocol::Username;
use securefastchat::protocol::keys::{Bin, IdentityKeyBytes, SignedPrekey};
use securefastchat::store::{FjallStore, Placed, Store, UserRecord};

/// Accounts in the old store.
const USERS: u32 = 2_000;
/// One-time prekeys per account: 60,000 in all, some fifteen chunks.
const PREKEYS: u32 = 30;
/// Where the child finds the store.
const CHILD_DIR: &str = "SFC_MIGRATION_CHILD_DIR";

/// A `keys` record of format 2.
#[derive(serde::Serialize)]
struct KeysV2 {
    identity_key: IdentityKeyBytes,
    signed_prekey: SignedPrekey,
    last_resort: SignedPrekey,
}

fn name(n: u32) -> String {
    format!("user{n:05}")
}

fn identity(n: u32) -> IdentityKeyBytes {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&n.to_be_bytes());
    Bin(key)
}

fn keyspace(db: &Database, name: &str) -> Keyspace {
    db.keyspace(name, KeyspaceCreateOptions::default)
        .expect("keyspace")
}

fn old_store(dir: &Path) {
    let db = Database::builder(dir).open().expect("open fjall");
    let (users, ids, names, keys, prekeys, meta) = (
        keyspace(&db, "users"),
        keyspace(&db, "user_ids"),
        keyspace(&db, "user_names"),
        keyspace(&db, "keys"),
        keyspace(&db, "prekeys"),
        keyspace(&db, "meta"),
    );
    for n in 1..=USERS {
        let user = name(n);
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: u64::from(n),
        };
        users
            .insert(&user, rmp_serde::to_vec_named(&record).expect("encode"))
            .expect("insert");
        ids.insert(&user, n.to_be_bytes()).expect("insert");
        names.insert(n.to_be_bytes(), &user).expect("insert");
        let signed = |id| SignedPrekey {
            id,
            key: Bin([7; 32]),
            signature: Bin([8; 64]),
        };
        let record = KeysV2 {
            identity_key: identity(n),
            signed_prekey: signed(1),
            last_resort: signed(2),
        };
        keys.insert(&user, rmp_serde::to_vec_named(&record).expect("encode"))
            .expect("insert");
        for id in 0..PREKEYS {
            let key = [user.as_bytes(), &[0], &id.to_be_bytes()].concat();
            prekeys.insert(key, [9u8; 32]).expect("insert");
        }
    }
    meta.insert("store-format", 2u32.to_be_bytes())
        .expect("insert");
    db.persist(PersistMode::SyncAll).expect("persist");
}

/// Run by the parent in a child process: opens (so migrates) the store, logging each chunk.
#[test]
#[ignore = "the child of a_migration_killed_half_way_completes_on_the_next_open"]
fn migrate_in_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("securefastchat=debug"))
        .with_writer(std::io::stderr)
        .init();
    let store = FjallStore::open(Path::new(&dir)).expect("open");
    drop(store);
    eprintln!("child: migrated");
}

/// (format, device records, format-2 `keys` records, format-2 one-time prekeys) on disk.
fn progress(dir: &Path) -> (Option<u32>, usize, usize, usize) {
    let db = Database::builder(dir).open().expect("open fjall");
    let format = keyspace(&db, "meta")
        .get("store-format")
        .expect("read")
        .map(|v| u32::from_be_bytes(v.as_ref().try_into().expect("4 bytes")));
    let devices = keyspace(&db, "devices").iter().count();
    let keys_of = |name: &str| -> Vec<Vec<u8>> {
        let keyspace = keyspace(&db, name);
        let keys = keyspace.iter().map(|e| e.key().expect("read").to_vec());
        keys.collect()
    };
    let old_keys = keys_of("keys").iter().filter(|k| !k.contains(&0)).count();
    let old_length = name(1).len() + 1 + 4;
    let old_prekeys = keys_of("prekeys")
        .iter()
        .filter(|k| k.len() == old_length)
        .count();
    (format, devices, old_keys, old_prekeys)
}

#[tokio::test]
async fn a_migration_killed_half_way_completes_on_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_store(dir.path());

    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["migrate_in_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child");
    let stderr = child.stderr.take().expect("stderr");
    let mut log = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("read the child's log");
        let chunk = line.contains("chunk committed") && line.contains("prekeys");
        log.push(line);
        if chunk {
            // SIGKILL: no destructor, no clean stop.
            child.kill().expect("kill the child");
            break;
        }
    }
    let status = child.wait().expect("wait for the child");
    assert!(!status.success(), "the child was not killed: {log:#?}");

    // Killed between chunks: something moved, not everything, and the format is still 2.
    let (format, devices, old_keys, old_prekeys) = progress(dir.path());
    assert_eq!(format, Some(2), "{log:#?}");
    assert_eq!((devices, old_keys), (2 * USERS as usize, 0), "{log:#?}");
    let all = (USERS * PREKEYS) as usize;
    assert!(
        old_prekeys > 0 && old_prekeys < all,
        "killed with {old_prekeys} of {all} one-time prekeys to move: {log:#?}"
    );
    eprintln!(
        "killed with {devices} device keys written, {old_keys} keys records and \
         {old_prekeys} one-time prekeys still to move"
    );

    // The next open goes on and loses nothing.
    {
        let store = FjallStore::open(dir.path()).expect("open after the kill");
        for n in [1, USERS / 2, USERS] {
            let user = Username::parse(&name(n)).expect("name");
            let ids: Vec<(u32, u64)> = store
                .devices(&user)
                .await
                .expect("devices")
                .iter()
                .map(|d| (d.id, d.added_at))
                .collect();
            assert_eq!(ids, [(1, u64::from(n))], "{user}");
            assert_eq!(
                store.identity(&user).await.expect("identity"),
                Some(identity(n))
            );
            let keys = store
                .device_keys(&user, 1)
                .await
                .expect("keys")
                .expect("kept");
            assert_eq!((keys.signed_prekey.id, keys.last_resort.id), (1, 2));
        }
        store.close().await.expect("close");
    }
    let (format, devices, old_keys, old_prekeys) = progress(dir.path());
    assert_eq!(
        (format, devices, old_keys, old_prekeys),
        (Some(4), 2 * USERS as usize, 0, 0)
    );
    let db = Database::builder(dir.path()).open().expect("open fjall");
    let (keys, prekeys) = (keyspace(&db, "keys"), keyspace(&db, "prekeys"));
    assert_eq!(keys.iter().count(), USERS as usize);
    assert_eq!(prekeys.iter().count(), (USERS * PREKEYS) as usize);
    for n in [1, USERS] {
        let device_1 = [name(n).as_bytes(), &[0], &1u32.to_be_bytes()].concat();
        assert_eq!(prekeys.prefix(&device_1).count(), PREKEYS as usize);
    }
}

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

/// Every key and value of the closed store in `data`, by keyspace.
fn dump(data: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let db = Database::builder(data).open().expect("open fjall");
    let mut all = Vec::new();
    for name in db.list_keyspace_names() {
        for entry in keyspace(&db, &name).iter() {
            let (key, value) = entry.into_inner().expect("read");
            all.push((name.to_string(), key.to_vec(), value.to_vec()));
        }
    }
    all
}

/// Opening the release fixture (format 2) migrates it to format 3 (then 4): each account has device 1
/// only; bob's pending messages (seqs 3..=303 but the unsent 153) are device 1's, with their
/// send records naming that copy; identities, prekeys and every one-time prekey (alice 100,
/// bob 99) are kept, as the account's and device 1's; the saved sessions are device 1's. A
/// second open changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_fixture_becomes_device_1_of_each_account() {
    let fixture = Extracted::release();
    let manifest = &fixture.manifest;
    let data = fixture.data();
    let (alice, bob) = (user("alice"), user("bob"));
    {
        let store = FjallStore::open(&data).expect("open the release store");
        let pending = store.pending(&bob, 1, 0, 10_000).await.expect("pending");
        let seqs: Vec<u64> = pending.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (3..=303).filter(|seq| *seq != 153).collect();
        assert_eq!(seqs, expected);
        for (stored, listed) in pending.iter().zip(&manifest.pending) {
            assert_eq!(stored.id.to_hex(), listed.id);
            assert_eq!((stored.from_device, stored.to.clone()), (1, None));
            let digest = ring::digest::digest(&ring::digest::SHA256, &stored.body);
            assert_eq!(hex::encode(digest), listed.body_sha256, "{}", listed.text);
            let record = store.sent(&alice, stored.id).await.expect("sent");
            let expected = Placed {
                recipient: bob.clone(),
                device: 1,
                seq: stored.seq,
            };
            assert_eq!(record.map(|r| r.copies), Some(vec![expected]));
        }
        assert_eq!(manifest.unsent.seq, 153);
        for name in ["alice", "bob"] {
            let listed = manifest.user(name);
            let account = store
                .user(&user(name))
                .await
                .expect("user")
                .expect("account");
            let devices = store.devices(&user(name)).await.expect("devices");
            assert_eq!(devices.len(), 1, "{name}");
            let first = &devices[0];
            assert_eq!(
                (
                    first.id,
                    first.name.as_str(),
                    first.added_at,
                    first.last_seen
                ),
                (1, "first device", account.created_at, 0)
            );
            let identity = store.identity(&user(name)).await.expect("identity");
            assert_eq!(
                identity.map(|k| hex::encode(k.0)),
                Some(listed.identity_key.clone())
            );
            let keys = store
                .device_keys(&user(name), 1)
                .await
                .expect("keys")
                .expect("keys");
            assert_eq!(
                (keys.signed_prekey.id, keys.last_resort.id),
                (listed.signed_prekey_id, listed.last_resort_id)
            );
            let saved = fixture.session(name);
            let digest = securefastchat::server::accounts::token_digest(&saved.token);
            let session = store
                .session(&digest)
                .await
                .expect("session")
                .expect("kept");
            assert_eq!((session.username.as_str(), session.device), (name, 1));
        }
        store.close().await.expect("close");
    }
    let migrated = dump(&data);
    for name in ["alice", "bob"] {
        let device_1 = [name.as_bytes(), &[0], &1u32.to_be_bytes()].concat();
        let prekeys = migrated
            .iter()
            .filter(|(k, key, _)| k == "prekeys" && key.starts_with(&device_1))
            .count();
        assert_eq!(
            prekeys as u32,
            manifest.user(name).one_time_prekeys,
            "{name}"
        );
        assert_eq!(
            migrated
                .iter()
                .filter(|(k, key, _)| k == "prekeys" && key.starts_with(name.as_bytes()))
                .count(),
            prekeys,
            "no one-time prekey of {name} is left outside device 1"
        );
        assert!(
            migrated
                .iter()
                .all(|(k, key, _)| !(k == "keys" && key.as_slice() == name.as_bytes())),
            "the format-2 keys record of {name} is gone"
        );
    }
    let format = migrated
        .iter()
        .find(|(k, key, _)| k == "meta" && key.as_slice() == b"store-format");
    assert_eq!(
        format.map(|f| f.2.clone()),
        Some(4u32.to_be_bytes().to_vec()),
        "format 3, then 4 (shared bodies, nothing to move)"
    );

    // A second open (and clean close) writes nothing.
    let store = FjallStore::open(&data).expect("reopen");
    assert_eq!(
        store
            .pending(&bob, 1, 0, 10_000)
            .await
            .expect("pending")
            .len(),
        300
    );
    store.close().await.expect("close");
    drop(store);
    assert!(dump(&data) == migrated, "the second open changed the store");
}
