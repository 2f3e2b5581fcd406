//! Property tests of every wire type: encode then decode gives the value back (frames, requests,
//! replies and events, stream headers, envelopes, key bundles), and the decoders a peer or a
//! local file reaches never panic, on arbitrary bytes nor on valid encodings with a few bytes
//! changed. The cargo-fuzz targets in `fuzz/` run the same decoders for longer; inputs they
//! found are kept here as regression tests.
//!
//! `SFC_WRITE_FUZZ_SEEDS=1 cargo test --test properties write_fuzz_seeds -- --ignored` writes
//! real encodings of every type into `fuzz/corpus/<target>/` to seed the fuzzers.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use securefastchat::client::keystore::KeyState;
use securefastchat::e2e::{
    Envelope, Header, IdentityKeyPair, InitialHeader, OneTimePrekeyPublic, PrekeyBundle,
    PrekeyStore, SignedPrekeyPublic,
};
use securefastchat::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use securefastchat::protocol::{
    ClientFrame, Copies, DeliverHeader, DeviceBundle, DeviceInfo, ErrorCode, MAX_CONTROL_FRAME,
    MAX_NESTING, MAX_STREAM_HEADER, MessageId, Password, Reply, Request, SendHeader, ServerFrame,
    SessionToken, StreamHeader, check_nesting, decode_body, decode_request, encode_frame,
    read_frame,
};
use securefastchat::server::ConfigLayer;

// ---------------------------------------------------------------------------------------------
// Strategies: written here, not derived on the library's types.

/// Short text, any Unicode, including the empty string.
fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.chars().take(40).collect())
}

fn message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

fn signed_prekey() -> impl Strategy<Value = SignedPrekey> {
    (any::<u32>(), any::<[u8; 32]>(), vec(any::<u8>(), 64)).prop_map(|(id, key, sig)| {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&sig);
        SignedPrekey {
            id,
            key: Bin(key),
            signature: Bin(signature),
        }
    })
}

fn one_time_prekey() -> impl Strategy<Value = OneTimePrekey> {
    (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, key)| OneTimePrekey { id, key: Bin(key) })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), option::of(text()))
            .prop_map(|(version, client)| Request::Hello { version, client }),
        text().prop_map(|username| Request::CheckUsername { username }),
        (text(), text()).prop_map(|(username, p)| Request::Signup {
            username,
            password: Password::new(p),
        }),
        (text(), text(), option::of(any::<u32>())).prop_map(|(username, p, device)| {
            Request::Login {
                username,
                password: Password::new(p),
                device,
            }
        }),
        (any::<[u8; 32]>(), any::<bool>()).prop_map(|(t, deliver)| Request::Resume {
            token: SessionToken::from_bytes(t),
            deliver,
        }),
        Just(Request::Logout),
        Just(Request::Whoami),
        Just(Request::Ping),
        (
            option::of(any::<[u8; 32]>()),
            option::of(signed_prekey()),
            option::of(signed_prekey()),
            vec(one_time_prekey(), 0..4),
        )
            .prop_map(|(identity, signed_prekey, last_resort, one_time_prekeys)| {
                Request::PublishKeys {
                    identity_key: identity.map(Bin),
                    signed_prekey,
                    last_resort,
                    one_time_prekeys,
                }
            }),
        (text(), option::of(vec(any::<u32>(), 0..4)))
            .prop_map(|(username, devices)| Request::FetchBundle { username, devices }),
        text().prop_map(|username| Request::FetchIdentity { username }),
        (vec(any::<u64>(), 0..8), any::<bool>())
            .prop_map(|(seqs, quiet)| Request::Ack { seqs, quiet }),
        message_id().prop_map(|message_id| Request::Unsend { message_id }),
        text().prop_map(|username| Request::Online { username }),
        Just(Request::ListDevices),
        (any::<u32>(), text()).prop_map(|(device, p)| Request::RemoveDevice {
            device,
            password: Password::new(p),
            revocation: None,
        }),
        (
            text(),
            any::<[u8; 32]>(),
            signed_prekey(),
            signed_prekey(),
            vec(one_time_prekey(), 0..3),
        )
            .prop_map(
                |(p, identity, signed_prekey, last_resort, one_time_prekeys)| {
                    Request::ReplaceIdentity {
                        password: Password::new(p),
                        identity_key: Bin(identity),
                        signed_prekey,
                        last_resort,
                        one_time_prekeys,
                    }
                }
            ),
        any::<[u8; 33]>().prop_map(|pake| Request::LinkOpen { pake: Bin(pake) }),
        (text(), any::<u16>(), any::<[u8; 33]>(), text()).prop_map(
            |(username, slot, pake, name)| Request::LinkJoin {
                username,
                slot,
                pake: Bin(pake),
                name,
            }
        ),
        any::<[u8; 32]>().prop_map(|c| Request::LinkConfirm { confirm: Bin(c) }),
        (any::<u16>(), any::<[u8; 32]>(), vec(any::<u8>(), 0..64)).prop_map(
            |(slot, c, payload)| Request::LinkAccept {
                slot,
                confirm: Bin(c),
                payload,
            }
        ),
        any::<u16>().prop_map(|slot| Request::LinkRefuse { slot }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    (any::<u64>(), request()).prop_map(|(id, request)| ClientFrame { id, request })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode as E;
    proptest::sample::select(vec![
        E::MalformedFrame,
        E::FrameTooLarge,
        E::TruncatedFrame,
        E::UnknownRequest,
        E::BadRequest,
        E::HelloRequired,
        E::UnsupportedVersion,
        E::NotAuthenticated,
        E::AlreadyAuthenticated,
        E::InvalidUsername,
        E::WeakPassword,
        E::UsernameTaken,
        E::InvalidCredentials,
        E::InvalidToken,
        E::RateLimited,
        E::Busy,
        E::Internal,
        E::UnknownUser,
        E::NoKeys,
        E::InvalidKeys,
        E::InboxFull,
        E::MessageTooLarge,
        E::NotAllowed,
        E::StorageUnavailable,
        E::SenderQuota,
        E::SendRateLimited,
        E::StaleDevices,
        E::UnknownDevice,
        E::IdentityMismatch,
        E::TooManyDevices,
        E::LinkFailed,
        E::Unknown,
    ])
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u64>(), text(), any::<u32>()).prop_map(|(version, server, max_frame)| {
            Reply::Hello {
                version,
                server,
                max_frame,
            }
        }),
        (text(), any::<bool>()).prop_map(|(username, available)| Reply::UsernameStatus {
            username,
            available
        }),
        (text(), any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(
            |(username, t, expires_at, device)| Reply::Session {
                username,
                token: SessionToken::from_bytes(t),
                expires_at,
                device,
            }
        ),
        (text(), any::<u64>(), any::<u32>()).prop_map(|(username, expires_at, device)| {
            Reply::Resumed {
                username,
                expires_at,
                device,
            }
        }),
        Just(Reply::LoggedOut),
        (text(), any::<u64>(), any::<u32>()).prop_map(|(username, expires_at, device)| {
            Reply::Whoami {
                username,
                expires_at,
                device,
            }
        }),
        Just(Reply::Pong),
        any::<u32>().prop_map(|one_time_prekeys| Reply::KeysPublished { one_time_prekeys }),
        (
            text(),
            any::<[u8; 32]>(),
            signed_prekey(),
            option::of(one_time_prekey()),
            option::of(signed_prekey()),
            vec(device_bundle(), 0..3),
        )
            .prop_map(
                |(username, identity, signed_prekey, one_time_prekey, last_resort, devices)| {
                    Reply::Bundle {
                        username,
                        identity_key: Bin(identity),
                        signed_prekey,
                        one_time_prekey,
                        last_resort,
                        devices,
                    }
                }
            ),
        (text(), any::<[u8; 32]>()).prop_map(|(username, k)| Reply::Identity {
            username,
            identity_key: Bin(k),
        }),
        any::<u64>().prop_map(|removed| Reply::Acked { removed }),
        any::<bool>().prop_map(|deleted| Reply::Unsent { deleted }),
        (text(), any::<bool>()).prop_map(|(username, online)| Reply::Presence { username, online }),
        (message_id(), any::<bool>()).prop_map(|(message_id, duplicate)| Reply::Sent {
            message_id,
            duplicate
        }),
        (
            option::of(message_id()),
            error_code(),
            text(),
            option::of(vec(any::<u32>(), 0..4)),
            option::of(vec(any::<u32>(), 0..4)),
        )
            .prop_map(|(message_id, code, message, devices, own_devices)| {
                Reply::SendFailed {
                    message_id,
                    code,
                    message,
                    devices,
                    own_devices,
                    epoch: None,
                }
            }),
        vec(device_info(), 0..4).prop_map(|devices| Reply::Devices { devices }),
        any::<u32>().prop_map(|device| Reply::DeviceRemoved { device }),
        vec(any::<u32>(), 0..4).prop_map(|removed| Reply::IdentityReplaced { removed }),
        (any::<u16>(), any::<u64>())
            .prop_map(|(slot, expires_at)| Reply::LinkOpened { slot, expires_at }),
        any::<[u8; 33]>().prop_map(|pake| Reply::LinkPake { pake: Bin(pake) }),
        (any::<u16>(), text(), any::<[u8; 33]>(), any::<[u8; 32]>()).prop_map(
            |(slot, name, pake, c)| Reply::LinkRequest {
                slot,
                name,
                pake: Bin(pake),
                confirm: Bin(c),
            }
        ),
        any::<u32>().prop_map(|device| Reply::LinkAccepted { device }),
        Just(Reply::LinkRefused),
        (
            (text(), any::<u32>(), any::<[u8; 32]>(), any::<u64>()),
            (any::<[u8; 32]>(), vec(any::<u8>(), 0..64)),
        )
            .prop_map(
                |((username, device, t, expires_at), (c, payload))| Reply::Linked {
                    username,
                    device,
                    token: SessionToken::from_bytes(t),
                    expires_at,
                    confirm: Bin(c),
                    payload,
                }
            ),
        any::<u32>().prop_map(|remaining| Reply::PrekeysLow { remaining }),
        (error_code(), text()).prop_map(|(code, message)| Reply::Error { code, message }),
    ]
}

fn device_bundle() -> impl Strategy<Value = DeviceBundle> {
    (
        any::<u32>(),
        signed_prekey(),
        option::of(one_time_prekey()),
        option::of(signed_prekey()),
    )
        .prop_map(
            |(device, signed_prekey, one_time_prekey, last_resort)| DeviceBundle {
                device,
                signed_prekey,
                one_time_prekey,
                last_resort,
            },
        )
}

fn device_info() -> impl Strategy<Value = DeviceInfo> {
    (
        any::<u32>(),
        text(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(device, name, added_at, last_seen, current)| DeviceInfo {
            device,
            name,
            added_at,
            last_seen,
            current,
        })
}

fn copies() -> impl Strategy<Value = Option<Copies>> {
    option::of(
        (vec(any::<u32>(), 0..4), vec(any::<u32>(), 0..4)).prop_flat_map(|(devices, own)| {
            let n = devices.len() + own.len();
            vec(0..u32::MAX as u64, n).prop_map(move |lengths| Copies {
                devices: devices.clone(),
                own_devices: own.clone(),
                lengths,
            })
        }),
    )
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    (option::of(any::<u64>()), reply()).prop_map(|(id, reply)| ServerFrame { id, reply })
}

fn stream_header() -> impl Strategy<Value = StreamHeader> {
    prop_oneof![
        (message_id(), text(), text(), any::<u64>(), copies()).prop_map(
            |(id, to, kind, length, copies)| {
                // A header's `length` is the sum of its copies' lengths.
                let length = copies
                    .as_ref()
                    .map_or(length, |c| c.lengths.iter().sum::<u64>());
                StreamHeader::Send(SendHeader {
                    id,
                    to,
                    kind,
                    length,
                    copies,
                    group: None,
                    welcome: None,
                })
            }
        ),
        (
            (any::<u64>(), any::<u64>(), message_id()),
            (text(), any::<u64>(), text(), any::<u64>()),
            (any::<u32>(), option::of(text())),
        )
            .prop_map(
                |((seq, prev, id), (from, sent_at, kind, length), (from_device, to))| {
                    StreamHeader::Deliver(DeliverHeader {
                        seq,
                        prev,
                        id,
                        from,
                        from_device,
                        to,
                        sent_at,
                        kind,
                        length,
                        group: None,
                    })
                }
            ),
    ]
}

/// A valid identity key: the public half of a key pair from a seed.
fn identity_key() -> impl Strategy<Value = securefastchat::e2e::IdentityKey> {
    any::<[u8; 32]>().prop_map(|seed| IdentityKeyPair::from_seed(&seed).public())
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let initial = (
        identity_key(),
        any::<[u8; 32]>(),
        any::<u32>(),
        option::of(any::<u32>()),
    )
        .prop_map(
            |(identity_key, ephemeral_key, signed_prekey_id, one_time_prekey_id)| InitialHeader {
                identity_key,
                ephemeral_key,
                signed_prekey_id,
                one_time_prekey_id,
            },
        );
    let header = (any::<[u8; 32]>(), any::<u32>(), any::<u32>()).prop_map(|(dh, pn, n)| Header {
        dh,
        pn,
        n,
    });
    // The ciphertext is at least the 16-byte tag; the decoder refuses anything shorter.
    (option::of(initial), header, vec(any::<u8>(), 16..200)).prop_map(
        |(initial, header, ciphertext)| Envelope {
            initial,
            header,
            ciphertext,
        },
    )
}

fn signed_prekey_public() -> impl Strategy<Value = SignedPrekeyPublic> {
    signed_prekey().prop_map(|s| SignedPrekeyPublic {
        id: s.id,
        key: s.key.0,
        signature: s.signature.0,
    })
}

fn prekey_bundle() -> impl Strategy<Value = PrekeyBundle> {
    (
        identity_key(),
        signed_prekey_public(),
        option::of((any::<u32>(), any::<[u8; 32]>())),
        option::of(signed_prekey_public()),
    )
        .prop_map(
            |(identity_key, signed_prekey, one_time, last_resort_prekey)| PrekeyBundle {
                identity_key,
                signed_prekey,
                one_time_prekey: one_time.map(|(id, key)| OneTimePrekeyPublic { id, key }),
                last_resort_prekey,
            },
        )
}

/// A valid encoding with a few bytes overwritten, inserted, removed, or the end cut off.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    vec((0..4u8, 0..len, any::<u8>()), 1..4).prop_map(move |edits| {
        let mut bytes = valid.clone();
        for (op, at, byte) in edits {
            let at = at.min(bytes.len());
            match op {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        bytes
    })
}

fn body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let frame = encode_frame(value, u32::MAX).expect("encodes");
    frame[4..].to_vec()
}

// ---------------------------------------------------------------------------------------------
// The decoders as a peer (or a local file) reaches them; each must return, never panic.

/// Every decoder that takes a frame body or a file's bytes, on the same input.
fn decode_everything(bytes: &[u8]) {
    let _ = decode_request(bytes);
    let _ = decode_body::<ClientFrame>(bytes);
    let _ = decode_body::<ServerFrame>(bytes);
    let _ = decode_body::<StreamHeader>(bytes);
    let _ = Envelope::from_bytes(bytes);
    let _ = rmp_serde::from_slice::<PrekeyBundle>(bytes);
    let _ = rmp_serde::from_slice::<KeyState>(bytes);
    let _ = check_nesting(bytes, MAX_NESTING);
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Ok(layer) = toml::from_str::<ConfigLayer>(text)
    {
        let _ = layer.resolve();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip_through_the_strict_decoder(frame in client_frame()) {
        let body = body(&frame);
        prop_assert_eq!(decode_request(&body), Ok(frame.clone()));
        prop_assert_eq!(decode_body::<ClientFrame>(&body).ok(), Some(frame));
    }

    #[test]
    fn replies_and_events_round_trip(frame in server_frame()) {
        prop_assert_eq!(decode_body::<ServerFrame>(&body(&frame)).ok(), Some(frame));
    }

    #[test]
    fn stream_headers_round_trip(header in stream_header()) {
        prop_assert_eq!(decode_body::<StreamHeader>(&body(&header)).ok(), Some(header));
    }

    #[test]
    fn envelopes_round_trip(envelope in envelope()) {
        let bytes = envelope.to_bytes().expect("encodes");
        prop_assert_eq!(Envelope::from_bytes(&bytes), Ok(envelope));
    }

    #[test]
    fn key_bundles_round_trip(bundle in prekey_bundle()) {
        let bytes = rmp_serde::to_vec_named(&bundle).expect("encodes");
        prop_assert_eq!(rmp_serde::from_slice::<PrekeyBundle>(&bytes).ok(), Some(bundle));
    }

    /// Frames back to back on one stream come out one by one, whole, in order.
    #[test]
    fn frames_round_trip_on_a_stream(frames in vec(client_frame(), 0..6)) {
        let mut stream = Vec::new();
        for frame in &frames {
            stream.extend(encode_frame(frame, MAX_CONTROL_FRAME).expect("encodes"));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let read = runtime.block_on(async {
            let mut input = stream.as_slice();
            let mut body = Vec::new();
            let mut read = Vec::new();
            while read_frame(&mut input, MAX_CONTROL_FRAME, &mut body).await.expect("reads") {
                read.push(decode_request(&body).expect("decodes"));
            }
            read
        });
        prop_assert_eq!(read, frames);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..300)) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_requests(
        bytes in client_frame().prop_flat_map(|f| mutated(body(&f)))
    ) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_replies(
        bytes in server_frame().prop_flat_map(|f| mutated(body(&f)))
    ) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_stream_headers(
        bytes in stream_header().prop_flat_map(|h| mutated(body(&h)))
    ) {
        prop_assume!(bytes.len() <= MAX_STREAM_HEADER as usize);
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_envelopes(
        bytes in envelope().prop_flat_map(|e| mutated(e.to_bytes().expect("encodes")))
    ) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_bundles(
        bytes in prekey_bundle().prop_flat_map(|b| mutated(rmp_serde::to_vec_named(&b).expect("encodes")))
    ) {
        decode_everything(&bytes);
    }
}

proptest! {
    // A key store is slow to make (prekeys, one signature each): fewer cases.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_mutated_keystores(
        bytes in Just(keystore_bytes()).prop_flat_map(mutated)
    ) {
        decode_everything(&bytes);
    }

    #[test]
    fn config_files_with_a_few_bytes_changed_are_parsed_or_refused(
        bytes in mutated(CONFIG_EXAMPLE.as_bytes().to_vec())
    ) {
        decode_everything(&bytes);
    }
}

/// A server configuration file with every key.
const CONFIG_EXAMPLE: &str = r#"listen = "127.0.0.1:4433"
data = "data"
certs = "certs"
max_connections = 1000
session_ttl_secs = 2592000
password_workers = 2
failed_logins_per_minute = 30
signups_per_minute = 20
bundle_fetches_per_minute = 60
message_ttl_secs = 604800
max_message_bytes = 65536
max_pending = 10000
durability = "sync"
"#;

/// A real keystore file, as `sfc` writes it.
fn keystore_bytes() -> Vec<u8> {
    let identity = IdentityKeyPair::from_seed(&[5; 32]);
    let prekeys = PrekeyStore::generate(&identity, 2).expect("prekeys");
    let state = KeyState::new("alice", &identity, prekeys, 1_700_000_000);
    rmp_serde::to_vec_named(&state).expect("encodes")
}

// ---------------------------------------------------------------------------------------------
// Seeds for the fuzzers.

/// Writes real encodings of every type into `fuzz/corpus/<target>/seed-*`, deterministically
/// (a fixed proptest seed). Only when asked: the corpora are committed, minimised.
#[test]
#[ignore = "writes fuzz seed files; run with SFC_WRITE_FUZZ_SEEDS=1 and --ignored"]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    if std::env::var_os("SFC_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut sample = |strategy: &dyn Fn(&mut TestRunner) -> Vec<u8>, n: usize| {
        (0..n).map(|_| strategy(&mut runner)).collect::<Vec<_>>()
    };
    let mut gen_body = |s: BoxedStrategy<Vec<u8>>, n: usize| {
        sample(
            &|r: &mut TestRunner| s.new_tree(r).expect("tree").current(),
            n,
        )
    };
    let requests = gen_body(client_frame().prop_map(|f| body(&f)).boxed(), 60);
    let replies = gen_body(server_frame().prop_map(|f| body(&f)).boxed(), 60);
    let headers = gen_body(stream_header().prop_map(|h| body(&h)).boxed(), 30);
    let envelopes = gen_body(
        envelope()
            .prop_map(|e| e.to_bytes().expect("encodes"))
            .boxed(),
        30,
    );
    let bundles = gen_body(
        prekey_bundle()
            .prop_map(|b| rmp_serde::to_vec_named(&b).expect("encodes"))
            .boxed(),
        20,
    );
    // A stream of frames: the bodies above with their prefixes, a few per file.
    let streams: Vec<Vec<u8>> = requests
        .chunks(3)
        .zip(replies.chunks(3))
        .map(|(reqs, reps)| {
            let mut stream = Vec::new();
            for b in reqs.iter().chain(reps) {
                stream.extend_from_slice(&(b.len() as u32).to_be_bytes());
                stream.extend_from_slice(b);
            }
            stream
        })
        .collect();
    let nesting: Vec<Vec<u8>> = requests
        .iter()
        .chain(&envelopes)
        .enumerate()
        .map(|(i, b)| [&[(i % 18) as u8][..], b].concat())
        .collect();
    let keys: Vec<Vec<u8>> = requests
        .iter()
        .chain(&replies)
        .chain(&bundles)
        .cloned()
        .collect();
    let sets: [(&str, Vec<Vec<u8>>); 9] = [
        ("frame", streams),
        ("request", requests.clone()),
        ("server_frame", replies),
        ("stream_header", headers),
        ("envelope", envelopes),
        ("keys", keys),
        ("nesting", nesting),
        ("config", vec![CONFIG_EXAMPLE.as_bytes().to_vec()]),
        ("keystore", vec![keystore_bytes()]),
    ];
    for (target, inputs) in sets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), input).expect("write seed");
        }
    }
}

#[path = "properties/link.rs"]
mod link;
#[path = "properties/regressions.rs"]
mod regressions;
