//! Criterion micro-benchmarks of the hot paths under the relay: the control-frame and stream
//! header codec, envelope seal/open in an established session, key agreement, and group-commit
//! inbox writes on the real fjall store.
//!
//! `cargo bench --bench micro [-- [FILTER] [--warm-up-time 1 --measurement-time 3]]`; a group
//! alone with e.g. `-- store/`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey};
use securefastchat::e2e::{
    Envelope, IdentityKeyPair, PrekeyBundle, PrekeyStore, Session, verify_signed_prekey,
};
use securefastchat::protocol::{
    ClientFrame, Copies, DeliverHeader, MAX_CONTROL_FRAME, MAX_STREAM_HEADER, MessageId, Password,
    Reply, Request, SendHeader, ServerFrame, SessionToken, StreamHeader, Username, decode_body,
    decode_request, encode_frame, frame_length,
};
use securefastchat::store::{
    AppendHooks, Appended, Copy, Durability, FjallStore, NewMessage, Removal, Store, StoreOptions,
    UserRecord,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

/// The server's allocator (`src/bin/sfc-server.rs`): the store and codec paths measured here
/// run in the server, and under glibc's allocator the store benchmark spent ≈ 12 % of its time
/// in `malloc` and `free` that the server does not pay.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// ---------------------------------------------------------------------------------------------
// Frame codec
// ---------------------------------------------------------------------------------------------

fn encoded<T: Serialize>(msg: &T, max: u32) -> Vec<u8> {
    encode_frame(msg, max).expect("encodable frame")
}

/// What a reader does with a complete frame: check the prefix, then decode the body.
fn decode_frame<T: DeserializeOwned>(frame: &[u8], max: u32) -> T {
    let prefix = frame[..4].try_into().expect("4-byte prefix");
    let len = frame_length(prefix, max).expect("length under the cap") as usize;
    decode_body(&frame[4..4 + len]).expect("decodable body")
}

fn frame_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    let login = ClientFrame {
        id: 3,
        request: Request::Login {
            username: "alice".into(),
            password: Password::new("correct horse battery staple"),
            device: Some(1),
        },
    };
    let ack = ClientFrame {
        id: 42,
        request: Request::Ack {
            seqs: (1_000..1_032).collect(),
            quiet: false,
        },
    };
    for (name, frame) in [("login", &login), ("ack_32", &ack)] {
        let bytes = encoded(frame, MAX_CONTROL_FRAME);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("encode_request/{name}"), |b| {
            b.iter(|| encode_frame(black_box(frame), MAX_CONTROL_FRAME).expect("encodable"))
        });
        group.bench_function(format!("decode_request_serde/{name}"), |b| {
            b.iter(|| decode_frame::<ClientFrame>(black_box(&bytes), MAX_CONTROL_FRAME))
        });
        group.bench_function(format!("decode_request_strict/{name}"), |b| {
            b.iter(|| decode_request(black_box(&bytes[4..])).expect("valid request"))
        });
    }

    let session = ServerFrame {
        id: Some(3),
        reply: Reply::Session {
            username: "alice".into(),
            token: SessionToken::from_bytes([0x7e; 32]),
            expires_at: 1_900_000_000,
            device: 1,
        },
    };
    let sent = ServerFrame {
        id: None,
        reply: Reply::Sent {
            message_id: MessageId([0xab; 16]),
            duplicate: false,
        },
    };
    for (name, frame) in [("session", &session), ("sent", &sent)] {
        let bytes = encoded(frame, MAX_CONTROL_FRAME);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("encode_reply/{name}"), |b| {
            b.iter(|| encode_frame(black_box(frame), MAX_CONTROL_FRAME).expect("encodable"))
        });
        group.bench_function(format!("decode_reply/{name}"), |b| {
            b.iter(|| decode_frame::<ServerFrame>(black_box(&bytes), MAX_CONTROL_FRAME))
        });
    }

    let send = StreamHeader::Send(SendHeader {
        id: MessageId([0x11; 16]),
        to: "bob".into(),
        kind: "text".into(),
        length: 4_096,
        copies: Some(Copies {
            devices: vec![1],
            own_devices: Vec::new(),
            lengths: vec![4_096],
        }),
        group: None,
        welcome: None,
    });
    let deliver = StreamHeader::Deliver(DeliverHeader {
        seq: 123_456,
        prev: 123_455,
        id: MessageId([0x22; 16]),
        from: "alice".into(),
        from_device: 1,
        to: None,
        sent_at: 1_900_000_000,
        kind: "text".into(),
        length: 4_096,
        group: None,
    });
    for (name, header) in [("send", &send), ("deliver", &deliver)] {
        let bytes = encoded(header, MAX_STREAM_HEADER);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("encode_stream_header/{name}"), |b| {
            b.iter(|| encode_frame(black_box(header), MAX_STREAM_HEADER).expect("encodable"))
        });
        group.bench_function(format!("decode_stream_header/{name}"), |b| {
            b.iter(|| decode_frame::<StreamHeader>(black_box(&bytes), MAX_STREAM_HEADER))
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// End-to-end sessions
// ---------------------------------------------------------------------------------------------

struct Party {
    name: Username,
    identity: IdentityKeyPair,
    prekeys: PrekeyStore,
}

fn party(name: &str, seed: u8) -> Party {
    let identity = IdentityKeyPair::from_seed(&[seed; 32]);
    let prekeys = PrekeyStore::generate(&identity, 1).expect("prekeys");
    Party {
        name: Username::parse(name).expect("valid username"),
        identity,
        prekeys,
    }
}

/// The bundle the server hands out while a one-time prekey is left.
fn bundle(p: &Party) -> PrekeyBundle {
    PrekeyBundle {
        identity_key: p.identity.public(),
        signed_prekey: p.prekeys.signed_prekey(),
        one_time_prekey: p.prekeys.one_time_prekeys().into_iter().next(),
        last_resort_prekey: None,
    }
}

fn message_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

/// Alice initiates, Bob accepts, Bob replies and Alice reads it: both ratchets have turned and
/// neither side attaches an initial header any more (the steady state of a conversation).
fn established() -> (Session, Session) {
    let alice = party("alice", 1);
    let mut bob = party("bob", 2);
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob))
        .expect("initiate");
    let first = a.seal(message_id(0), b"hi bob").expect("seal");
    let (mut b, _) = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        message_id(0),
        &first,
    )
    .expect("accept");
    let reply = b.seal(message_id(1), b"hi alice").expect("seal");
    a.open(message_id(1), &reply).expect("open");
    assert!(!a.awaiting_reply());
    (a, b)
}

fn envelopes(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for (label, size) in [("128B", 128usize), ("4KiB", 4096)] {
        let plaintext = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));

        // Seal alone: the sender's chain advances one step per message, no DH.
        let (mut alice, _) = established();
        let mut n = 0u64;
        group.bench_function(format!("seal/{label}"), |b| {
            b.iter(|| {
                n += 1;
                alice
                    .seal(message_id(n), black_box(&plaintext))
                    .expect("seal")
            })
        });

        // Open alone: each envelope is sealed in the (untimed) setup, in order, so every open
        // is the next message of the receiving chain.
        let (mut alice, mut bob) = established();
        let mut sealed = 0u64;
        group.bench_function(format!("open/{label}"), |b| {
            b.iter_batched(
                || {
                    sealed += 1;
                    let env = alice.seal(message_id(sealed), &plaintext).expect("seal");
                    (sealed, env)
                },
                |(n, env): (u64, Envelope)| bob.open(message_id(n), &env).expect("open"),
                BatchSize::SmallInput,
            )
        });

        // The wire form around it: envelope encoding and the strict decoder.
        let (mut alice, _) = established();
        let env = alice.seal(message_id(1), &plaintext).expect("seal");
        let bytes = env.to_bytes().expect("encodable envelope");
        group.bench_function(format!("to_bytes/{label}"), |b| {
            b.iter(|| black_box(&env).to_bytes().expect("encodable"))
        });
        group.bench_function(format!("from_bytes/{label}"), |b| {
            b.iter(|| Envelope::from_bytes(black_box(&bytes)).expect("decodable"))
        });
    }
    group.finish();
}

fn key_agreement(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    let alice = party("alice", 1);
    let bob = party("bob", 2);
    let bob_bundle = bundle(&bob);

    group.bench_function("x3dh_initiate", |b| {
        b.iter(|| {
            Session::initiate(
                &alice.identity,
                &alice.name,
                &bob.name,
                black_box(&bob_bundle),
            )
            .expect("initiate")
        })
    });

    // Accepting consumes the one-time prekey, so each run gets a fresh copy of Bob's store.
    let mut first_session =
        Session::initiate(&alice.identity, &alice.name, &bob.name, &bob_bundle).expect("initiate");
    let first = first_session
        .seal(message_id(0), &[0x5a; 128])
        .expect("seal");
    group.bench_function("x3dh_accept_and_open_first_128B", |b| {
        b.iter_batched(
            || bob.prekeys.clone(),
            |mut prekeys| {
                Session::accept(
                    &bob.identity,
                    &mut prekeys,
                    &bob.name,
                    &alice.name,
                    message_id(0),
                    black_box(&first),
                )
                .expect("accept")
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("x3dh_establish_full_128B", |b| {
        b.iter_batched(
            || bob.prekeys.clone(),
            |mut prekeys| {
                let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bob_bundle)
                    .expect("initiate");
                let first = a.seal(message_id(0), &[0x5a; 128]).expect("seal");
                let (b, _) = Session::accept(
                    &bob.identity,
                    &mut prekeys,
                    &bob.name,
                    &alice.name,
                    message_id(0),
                    &first,
                )
                .expect("accept");
                (a, b)
            },
            BatchSize::SmallInput,
        )
    });

    let secret = [0x42u8; 32];
    let public = x25519_dalek::x25519([0x24; 32], x25519_dalek::X25519_BASEPOINT_BYTES);
    group.bench_function("x25519_dh", |b| {
        b.iter(|| x25519_dalek::x25519(black_box(secret), black_box(public)))
    });

    let spk = bob.prekeys.signed_prekey();
    let ik = bob.identity.public();
    group.bench_function("verify_signed_prekey", |b| {
        b.iter(|| {
            verify_signed_prekey(
                black_box(&ik),
                spk.id,
                black_box(&spk.key),
                black_box(&spk.signature),
            )
            .expect("valid signature")
        })
    });

    // The signature check alone, without the small-order X25519 check verify_signed_prekey adds.
    let signing = SigningKey::from_bytes(&[7; 32]);
    let verifying = signing.verifying_key();
    let message = [0x33u8; 56];
    let signature = signing.sign(&message);
    group.bench_function("ed25519_verify_strict", |b| {
        b.iter(|| {
            verifying
                .verify_strict(black_box(&message), black_box(&signature))
                .expect("valid signature")
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Store: group-commit appends and acks
// ---------------------------------------------------------------------------------------------

/// Rounds of the store benchmark: (concurrent appenders, messages each appends one after the
/// other). Every append waits for its batch's sync, so a batch holds at most one message per
/// appender: 64 in flight (as in `benches/relay.rs`) measures round trips through the group
/// commit as much as the writer; 512 (as the relay's 100 pairs × 8 in flight) lets batches grow
/// to where the writer's own cost per message shows.
const SHAPES: [(usize, usize); 2] = [(64, 16), (512, 4)];
const BODY: usize = 128;

struct Pairs(Vec<(Username, Username)>);

impl Pairs {
    fn new(appenders: usize) -> Self {
        Self(
            (0..appenders)
                .map(|w| {
                    let name = |role: &str| Username::parse(&format!("{role}{w:03}"));
                    (
                        name("sender").expect("valid"),
                        name("recipient").expect("valid"),
                    )
                })
                .collect(),
        )
    }
}

/// Accounts for every name of `pairs` (both ends of a message must have one).
async fn accounts(store: &FjallStore, pairs: &Pairs) {
    for name in pairs.0.iter().flat_map(|(s, r)| [s, r]) {
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: 0,
        };
        store.create_user(name, record).await.expect("account");
    }
}

/// One round: every appender appends its messages (each awaited: durable before the next),
/// then, if `ack`, acknowledges them in one call. Returns the time spent appending and the
/// time spent acking (`Duration::ZERO` for the acks when they are untimed).
async fn round(
    store: &Arc<FjallStore>,
    pairs: &Arc<Pairs>,
    per_appender: usize,
    round_no: u64,
    ack: bool,
) -> (Duration, Duration) {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..pairs.0.len() {
        let (store, pairs) = (Arc::clone(store), Arc::clone(pairs));
        tasks.spawn(async move {
            let (sender, recipient) = &pairs.0[w];
            let mut seqs = Vec::with_capacity(per_appender);
            for i in 0..per_appender {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&round_no.to_be_bytes());
                id[8..].copy_from_slice(&(i as u64).to_be_bytes());
                let appended = store
                    .append(
                        NewMessage {
                            sender: sender.clone(),
                            sender_device: 1,
                            to: recipient.clone(),
                            id: MessageId(id),
                            kind: "text".into(),
                            copies: vec![Copy {
                                recipient: recipient.clone(),
                                device: 1,
                                body: vec![0x5a; BODY],
                            }],
                            sent_at: 0,
                            expires_at: u64::MAX,
                        },
                        AppendHooks::default(),
                    )
                    .await
                    .expect("append");
                let Appended::Stored { seqs: stored } = appended else {
                    panic!("append not stored: {appended:?}");
                };
                seqs.extend(stored);
            }
            (w, seqs)
        });
    }
    // In the order the tasks finish: each keeps its appender's index.
    let mut acks = Vec::with_capacity(pairs.0.len());
    while let Some(done) = tasks.join_next().await {
        acks.push(done.expect("appender task"));
    }
    let appended = start.elapsed();

    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (w, seqs) in acks {
        let (store, pairs) = (Arc::clone(store), Arc::clone(pairs));
        tasks.spawn(async move {
            let removed = store
                .remove_pending(&pairs.0[w].1, 1, seqs, Removal::Acknowledged)
                .await
                .expect("ack");
            assert_eq!(removed, per_appender as u64);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("ack task");
    }
    let acked = if ack { start.elapsed() } else { Duration::ZERO };
    (appended, acked)
}

fn store_group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("store");
    // A round takes milliseconds (a sync per batch): flat sampling, the fewest samples allowed.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    for (label, durability) in [
        ("sync", Durability::Sync),
        ("buffered", Durability::Buffered),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = StoreOptions {
            durability,
            max_pending: u64::MAX,
            ..StoreOptions::default()
        };
        let store = Arc::new(FjallStore::open_with(dir.path(), options).expect("open store"));
        let widest = SHAPES.iter().map(|(appenders, _)| *appenders).max();
        runtime.block_on(accounts(&store, &Pairs::new(widest.unwrap_or(0))));
        let mut round_no = 0u64;
        for (appenders, per_appender) in SHAPES {
            let pairs = Arc::new(Pairs::new(appenders));
            group.throughput(Throughput::Elements((appenders * per_appender) as u64));
            for (what, ack) in [("append", false), ("append_then_ack", true)] {
                let id = format!("{what}/{label}/{appenders}x{per_appender}x{BODY}B");
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        runtime.block_on(async {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                round_no += 1;
                                let (appended, acked) =
                                    round(&store, &pairs, per_appender, round_no, ack).await;
                                total += appended + acked;
                            }
                            total
                        })
                    })
                });
            }
        }
        // Closes the database (joins the writer thread) before its directory goes.
        drop(store);
        drop(dir);
    }
    group.finish();
}

criterion_group!(
    benches,
    frame_codec,
    envelopes,
    key_agreement,
    store_group_commit
);
criterion_main!(benches);
