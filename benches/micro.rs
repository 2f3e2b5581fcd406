//! Criterion micro-benchmarks of the hot paths under the relay: the control-frame and stream
//! header codec, envelope seal/open in an established session, key agreement, and group-commit
//! inbox writes on the real fjall store.
//!
//! `cargo bench --bench micro [-- [FILTER] [--warm-up-time 1 --measurement-time 3]]`; a group
//! alone with e.g. `-- store/`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use securefastchat::protocol::{
    ClientFrame, DeliverHeader, MAX_CONTROL_FRAME, MAX_STREAM_HEADER, MessageId, Password, Reply,
    Request, SendHeader, ServerFrame, SessionToken, StreamHeader, decode_body, decode_request,
    encode_frame, frame_length,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

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
        },
    };
    let ack = ClientFrame {
        id: 42,
        request: Request::Ack {
            seqs: (1_000..1_032).collect(),
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
    });
    let deliver = StreamHeader::Deliver(DeliverHeader {
        seq: 123_456,
        prev: 123_455,
        id: MessageId([0x22; 16]),
        from: "alice".into(),
        sent_at: 1_900_000_000,
        kind: "text".into(),
        length: 4_096,
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

criterion_group!(benches, frame_codec);
criterion_main!(benches);
