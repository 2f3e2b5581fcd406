//! Fills a data directory with pending messages quickly, through the store the server uses
//! (its group commit, synced appends and quotas), for measuring how long `sfc-server` takes to
//! restart on a big backlog (`scripts/restart-time.sh`).
//!
//! `USERS` recipients get `PER_USER` messages each from one sender; each body is `BYTES` bytes
//! (a sealed 128-byte text is ≈ 240). Then the program either ends the way `kill -9` ends the
//! server (`--kill`: nothing closed, nothing flushed beyond what each append synced) or the way
//! a clean stop does (`Store::close`).
//!
//! ```text
//! cargo run --release --example pending_fill -- DATA_DIR [USERS] [PER_USER] [BYTES] [--kill]
//!                                                         (100, 10000, 240)
//! ```

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{
    AppendHooks, Appended, Copy, FjallStore, NewMessage, Store, StoreOptions, UserRecord,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Appends in flight, enough for group commit to fill its batches.
const IN_FLIGHT: usize = 1024;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kill = args.iter().any(|a| a == "--kill");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--kill").collect();
    let dir = args
        .first()
        .ok_or("usage: pending_fill DATA_DIR [USERS] [PER_USER] [BYTES] [--kill]")?;
    let number = |i: usize, default: u64| -> Result<u64, Error> {
        Ok(match args.get(i) {
            Some(a) => a.parse()?,
            None => default,
        })
    };
    let (users, per_user, bytes) = (number(1, 100)?, number(2, 10_000)?, number(3, 240)?);

    let options = StoreOptions {
        max_pending: per_user.max(1),
        ..StoreOptions::default()
    };
    let path = std::path::PathBuf::from(dir);
    let store = Arc::new(
        tokio::task::spawn_blocking(move || FjallStore::open_with(&path, options)).await??,
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let record = || UserRecord {
        password_hash: String::from("$argon2id$v=19$m=19456,t=2,p=1$not$a-real-hash"),
        created_at: now,
    };
    let sender = Username::parse("filler")?;
    store.create_user(&sender, record()).await?;
    let mut recipients = Vec::new();
    for u in 0..users {
        let name = Username::parse(&format!("pending{u}"))?;
        store.create_user(&name, record()).await?;
        recipients.push(name);
    }

    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut appends = JoinSet::new();
    let mut stored = 0u64;
    let body = vec![0x5a; bytes as usize];
    for i in 0..per_user {
        for recipient in &recipients {
            let permit = Arc::clone(&slots).acquire_owned().await?;
            let message = NewMessage {
                sender: sender.clone(),
                sender_device: 1,
                to: recipient.clone(),
                id: MessageId::random()?,
                kind: String::from("text"),
                copies: vec![Copy {
                    recipient: recipient.clone(),
                    device: 1,
                    body: body.clone(),
                }],
                sent_at: now,
                expires_at: now + 30 * 24 * 3600,
            };
            let store = Arc::clone(&store);
            appends.spawn(async move {
                let appended = store.append(message, AppendHooks::default()).await;
                drop(permit);
                appended
            });
            while let Some(done) = appends.try_join_next() {
                stored += count(done??)?;
            }
        }
        if i % 1000 == 999 {
            eprintln!("{} messages stored", stored);
        }
    }
    while let Some(done) = appends.join_next().await {
        stored += count(done??)?;
    }
    let took = started.elapsed();
    println!(
        "{stored} messages pending in {users} inboxes, stored in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        stored as f64 / took.as_secs_f64()
    );
    if kill {
        // As `kill -9` leaves it: no destructor runs, nothing more is written.
        std::process::abort();
    }
    store.flush().await?;
    Ok(())
}

fn count(appended: Appended) -> Result<u64, Error> {
    match appended {
        Appended::Stored { .. } => Ok(1),
        other => Err(format!("an append was not stored: {other:?}").into()),
    }
}
