//! Load for crash tests, at the application's level: sender/receiver pairs of `Messenger`s
//! (each with its own home, as an application has), which reconnect when the server goes and
//! write down every message the server acknowledged and every message shown to a receiver,
//! so a test can check that each acknowledged message was shown exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use securefastchat::client::messenger::{MessengerError, Received};
use securefastchat::client::{Client, ClientOptions, Messenger};
use securefastchat::protocol::{MessageId, Password};
use tokio::task::JoinSet;

use super::PASSWORD;

/// What the load saw: acknowledged (sender, id) and shown (receiver, sender, id, text).
#[derive(Default)]
pub struct Records {
    pub acked: Vec<(String, MessageId)>,
    pub shown: Vec<(String, String, MessageId, String)>,
    files: Option<(std::fs::File, std::fs::File)>,
}

impl Records {
    fn ack(&mut self, from: &str, id: MessageId) {
        if let Some((acked, _)) = self.files.as_mut() {
            let _ = writeln!(acked, "{from}\t{id}");
        }
        self.acked.push((from.to_owned(), id));
    }

    fn show(&mut self, to: &str, from: &str, id: MessageId, text: &str) {
        if let Some((_, shown)) = self.files.as_mut() {
            let _ = writeln!(shown, "{to}\t{from}\t{id}\t{text}");
        }
        self.shown
            .push((to.to_owned(), from.to_owned(), id, text.to_owned()));
    }
}

/// The verdict on [`Records`].
#[derive(Debug)]
pub struct Verdict {
    /// Distinct messages the server acknowledged.
    pub acked: usize,
    /// Messages shown to receivers (with repeats).
    pub shown: usize,
    /// Acknowledged messages never shown.
    pub missing: Vec<(String, MessageId)>,
    /// Messages (by sender and id) shown more than once.
    pub shown_twice: Vec<(String, MessageId)>,
    /// Texts shown more than once (under different ids).
    pub text_twice: Vec<String>,
    /// Shown messages whose sender never heard they were stored (the ack was lost with the
    /// server, the outbox sent them again): allowed.
    pub shown_unacked: usize,
}

impl Records {
    pub fn verdict(&self) -> Verdict {
        let acked: BTreeSet<(String, MessageId)> = self.acked.iter().cloned().collect();
        let mut by_id: BTreeMap<(String, MessageId), usize> = BTreeMap::new();
        let mut by_text: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, from, id, text) in &self.shown {
            *by_id.entry((from.clone(), *id)).or_default() += 1;
            *by_text.entry(text).or_default() += 1;
        }
        Verdict {
            acked: acked.len(),
            shown: self.shown.len(),
            missing: acked
                .iter()
                .filter(|k| !by_id.contains_key(*k))
                .cloned()
                .collect(),
            shown_twice: by_id
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(k, _)| k.clone())
                .collect(),
            text_twice: by_text
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(t, _)| (*t).to_owned())
                .collect(),
            shown_unacked: by_id.keys().filter(|k| !acked.contains(*k)).count(),
        }
    }
}

/// Sender/receiver pairs sending to each other while the test does what it wants to the
/// server (whose address must stay the same).
pub struct Load {
    pub records: Arc<Mutex<Records>>,
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    senders: JoinSet<()>,
    receivers: JoinSet<()>,
    /// Send attempts that failed and were not queued.
    pub send_errors: Arc<AtomicU64>,
}

/// `name` signed up, with keys, sending only (its connection asks for no delivery).
pub async fn sender(options: &ClientOptions, homes: &Path, name: &str) -> Messenger {
    user(options, homes, name, false).await
}

/// A signed-up user with keys, able to reconnect on its own.
async fn user(options: &ClientOptions, homes: &Path, name: &str, deliver: bool) -> Messenger {
    let client = Client::connect(options).await.unwrap();
    let (_, token) = client.signup(name, Password::new(PASSWORD)).await.unwrap();
    let client = if deliver {
        client
    } else {
        // A sender's connection asks for no delivery, as `sfc send` does.
        client.close().await;
        let c = Client::connect(options).await.unwrap();
        c.resume_with(token.clone(), false).await.unwrap();
        c
    };
    let messenger = Messenger::new(client, &homes.join(name), name)
        .unwrap()
        .with_reconnect(options.clone(), token, deliver);
    messenger.ensure_keys().await.unwrap();
    messenger
}

impl Load {
    /// `pairs` senders (`send0`, ...) each writing to its receiver (`recv0`, ...) as fast as one
    /// message at a time allows; homes in `homes`; records also written to `records_dir`
    /// (`acked.txt`: FROM TAB ID; `shown.txt`: TO TAB FROM TAB ID TAB TEXT) if given.
    pub async fn start(
        options: &ClientOptions,
        homes: &Path,
        pairs: usize,
        records_dir: Option<PathBuf>,
    ) -> Self {
        let mut records = Records::default();
        if let Some(dir) = records_dir {
            std::fs::create_dir_all(&dir).unwrap();
            records.files = Some((
                std::fs::File::create(dir.join("acked.txt")).unwrap(),
                std::fs::File::create(dir.join("shown.txt")).unwrap(),
            ));
        }
        let mut load = Self {
            records: Arc::new(Mutex::new(records)),
            stop_sending: Arc::new(AtomicBool::new(false)),
            stop_receiving: Arc::new(AtomicBool::new(false)),
            senders: JoinSet::new(),
            receivers: JoinSet::new(),
            send_errors: Arc::new(AtomicU64::new(0)),
        };
        for p in 0..pairs {
            let receiver = user(options, homes, &format!("recv{p}"), true).await;
            let sender = user(options, homes, &format!("send{p}"), false).await;
            let (records, stop) = (Arc::clone(&load.records), Arc::clone(&load.stop_receiving));
            load.receivers.spawn(receive(receiver, records, stop));
            let (records, stop, errors) = (
                Arc::clone(&load.records),
                Arc::clone(&load.stop_sending),
                Arc::clone(&load.send_errors),
            );
            load.senders
                .spawn(send(sender, format!("recv{p}"), records, stop, errors));
        }
        load
    }

    /// Stops sending (each sender empties its outbox first), waits until every acknowledged
    /// message was shown or `patience` passed, stops the receivers, and returns the verdict.
    pub async fn finish(mut self, patience: Duration) -> Verdict {
        self.stop_sending.store(true, Ordering::Relaxed);
        while let Some(done) = self.senders.join_next().await {
            done.unwrap();
        }
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline
            && !self.records.lock().unwrap().verdict().missing.is_empty()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A little more, for anything shown a second time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop_receiving.store(true, Ordering::Relaxed);
        while let Some(done) = self.receivers.join_next().await {
            done.unwrap();
        }
        self.records.lock().unwrap().verdict()
    }
}

/// Reconnects (however long the server takes to come back) and sends what waits in the outbox,
/// recording what the server took.
async fn reconnect_and_flush(messenger: &Messenger, records: &Mutex<Records>) {
    loop {
        if messenger.disconnected().is_some()
            && let Err(e) = messenger.reconnect_with_backoff(None, |_, _| {}).await
        {
            panic!("{} cannot reconnect: {e}", messenger.me());
        }
        match messenger.flush_outbox().await {
            Ok(flushed) => {
                let mut records = records.lock().unwrap();
                for (_, id) in &flushed.sent {
                    records.ack(messenger.me(), *id);
                }
                if flushed.waiting == 0 {
                    return;
                }
            }
            Err(e) if e.is_disconnected() => {}
            Err(e) => panic!("{}'s outbox: {e}", messenger.me()),
        }
        // Lost again while sending: the connection is closed by the time we look, or soon.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(
    messenger: Messenger,
    to: String,
    records: Arc<Mutex<Records>>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let text = format!("{}-{n}", messenger.me());
        n += 1;
        match messenger.send_text(&to, &text).await {
            Ok((id, _)) => records.lock().unwrap().ack(messenger.me(), id),
            // Sealed into the outbox; it goes with the next flush.
            Err(MessengerError::Queued { .. }) => reconnect_and_flush(&messenger, &records).await,
            Err(e) if e.is_disconnected() => reconnect_and_flush(&messenger, &records).await,
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("{}: send failed: {e}", messenger.me());
                tokio::time::sleep(Duration::from_millis(100)).await;
                reconnect_and_flush(&messenger, &records).await;
            }
        }
    }
    reconnect_and_flush(&messenger, &records).await;
    messenger.close().await;
}

async fn receive(messenger: Messenger, records: Arc<Mutex<Records>>, stop: Arc<AtomicBool>) {
    let me = messenger.me().to_owned();
    while !stop.load(Ordering::Relaxed) {
        let received = messenger
            .receive_reconnecting(Duration::from_millis(200), None, &mut |_| {})
            .await;
        match received {
            Ok(Some(received)) => {
                if let Received::Text { id, from, text, .. } = &received {
                    records.lock().unwrap().show(&me, from, *id, text);
                } else if let Some(what) = received.describe() {
                    panic!("{me}: {what}");
                }
                // Lost with the server: the message comes again and the keystore knows it was
                // kept, so it is not shown twice; nothing to do.
                if let Err(e) = messenger.shown(&received).await
                    && !e.is_disconnected()
                {
                    panic!("{me}: shown: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => panic!("{me}: receive: {e}"),
        }
    }
    messenger.close().await;
}
