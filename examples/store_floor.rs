//! The floor under the durable-write figure (`cargo bench --bench micro -- store/append/sync`):
//! fjall alone, from one thread, with batches of the benchmark's size and one `SyncData` per
//! batch, and none of SecureFastChat's store around it (no writer and committer threads, no
//! hand-offs, no counters, no encoding).
//!
//! Two workloads, alternated for ROUNDS rounds of SECONDS each:
//! - `one insert`: each message is one insert (a 12-byte key, a 176-byte value), as in the
//!   figure `FACTS.md` gives for fjall (≈ 358k/s in batches of 100);
//! - `as the store`: what the store must do for each message at the least: look its sender's id
//!   up in `sent` (a duplicate is stored at most once), insert the inbox record (recipient id ‖
//!   seq, 12 bytes, the body and its header) and insert the send record (sender id ‖ message id,
//!   20 bytes, where the record is).
//!
//! ```text
//! cargo run --release --example store_floor -- [ROUNDS] [SECONDS] [BATCH]   (3, 3, 512)
//! ```

use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Senders and recipients (the benchmark's 512 appenders, one pair each).
const USERS: u32 = 512;
/// An inbox record's value: a 128-byte body and its header (sender, id, kind, times).
const RECORD_BYTES: usize = 176;
/// A send record's value: the recipient's id and the seq.
const SENT_BYTES: usize = 12;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: u64| -> Result<u64, Error> {
        Ok(match args.get(i) {
            Some(a) => a.parse()?,
            None => default,
        })
    };
    let (rounds, secs, batch) = (number(0, 3)?, number(1, 3)?, number(2, 512)?.max(1));
    let dir = tempfile::tempdir()?;
    let db = Database::builder(dir.path()).open()?;
    let inbox = db.keyspace("inbox", KeyspaceCreateOptions::default)?;
    let sent = db.keyspace("sent", KeyspaceCreateOptions::default)?;
    let mut load = Load {
        db: &db,
        inbox: &inbox,
        sent: &sent,
        next: 0,
    };
    let duration = Duration::from_secs(secs);
    println!("batches of {batch}, one SyncData each, {secs} s per run");
    for round in 1..=rounds {
        for (name, as_store) in [("one insert", false), ("as the store", true)] {
            let rate = load.run(duration, batch as usize, as_store)?;
            println!("round {round} {name:<12} {rate:>9.0} messages/s");
        }
    }
    Ok(())
}

struct Load<'a> {
    db: &'a Database,
    inbox: &'a Keyspace,
    sent: &'a Keyspace,
    /// Messages written so far (every key is new).
    next: u64,
}

impl Load<'_> {
    /// Writes batches for `duration`; returns messages per second.
    fn run(&mut self, duration: Duration, batch: usize, as_store: bool) -> Result<f64, Error> {
        let (record, sent_value) = (vec![0x5a; RECORD_BYTES], vec![0x11; SENT_BYTES]);
        let start = Instant::now();
        let mut written = 0u64;
        while start.elapsed() < duration {
            let mut writes = self.db.batch().durability(Some(PersistMode::SyncData));
            for _ in 0..batch {
                let n = self.next;
                self.next += 1;
                let user = (n % u64::from(USERS)) as u32;
                // The recipient's inbox key: its id, then its next seq.
                let mut key = [0u8; 12];
                key[..4].copy_from_slice(&(USERS + user).to_be_bytes());
                key[4..].copy_from_slice(&(n / u64::from(USERS)).to_be_bytes());
                writes.insert(self.inbox, key, record.as_slice());
                if as_store {
                    // The sender's send record: its id, then the message id.
                    let mut sent_key = [0u8; 20];
                    sent_key[..4].copy_from_slice(&user.to_be_bytes());
                    sent_key[4..12].copy_from_slice(&n.to_be_bytes());
                    sent_key[12..].copy_from_slice(&(n ^ 0x9e37_79b9_7f4a_7c15).to_be_bytes()[..8]);
                    if self.sent.get(sent_key)?.is_some() {
                        return Err("a new message id was found in `sent`".into());
                    }
                    writes.insert(self.sent, sent_key, sent_value.as_slice());
                }
            }
            writes.commit()?;
            written += batch as u64;
        }
        Ok(written as f64 / start.elapsed().as_secs_f64())
    }
}
