//! Regressions: inputs found while fuzzing and writing these properties.

use super::*;

/// `publish_keys` with a prekey written as `[id, key]` or with `bin` keys was accepted: serde
/// takes a positional array (and byte-string field names) for a struct, and the strict decoder
/// only checked the top-level map. The spec says each prekey is a map with string keys.
#[test]
fn regression_prekeys_not_written_as_maps_are_bad_requests() {
    let key = || rmpv::Value::Binary(vec![9; 32]);
    let publish = |field: &str, value: rmpv::Value| {
        let frame = rmpv::Value::Map(vec![
            ("id".into(), 4.into()),
            ("type".into(), "publish_keys".into()),
            (field.into(), value),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &frame).expect("encodes");
        out
    };
    let positional = rmpv::Value::Array(vec![5.into(), key()]);
    let bin_keys = rmpv::Value::Map(vec![
        (rmpv::Value::Binary(b"id".to_vec()), 5.into()),
        (rmpv::Value::Binary(b"key".to_vec()), key()),
    ]);
    let signed_bin_keys = rmpv::Value::Map(vec![
        (rmpv::Value::Binary(b"id".to_vec()), 5.into()),
        ("key".into(), key()),
        ("signature".into(), rmpv::Value::Binary(vec![1; 64])),
    ]);
    for body in [
        publish("one_time_prekeys", rmpv::Value::Array(vec![positional])),
        publish("one_time_prekeys", rmpv::Value::Array(vec![bin_keys])),
        publish("signed_prekey", signed_bin_keys.clone()),
        publish("last_resort", signed_bin_keys),
    ] {
        assert!(
            matches!(
                decode_request(&body),
                Err(securefastchat::protocol::RequestError::Bad { id: 4, .. })
            ),
            "{:?}",
            decode_request(&body)
        );
    }
    // The documented shape still decodes.
    let good = rmpv::Value::Map(vec![("id".into(), 5.into()), ("key".into(), key())]);
    let body = publish("one_time_prekeys", rmpv::Value::Array(vec![good]));
    assert!(decode_request(&body).is_ok());
}

/// The reserved marker 0xc1 ended the nesting scan ("the decoder refuses it"), but rmpv, which
/// `decode_request` uses, reads it as nil and goes on: a frame with 0xc1 before deep nesting
/// passed the check (found by the `nesting` fuzz target, a disagreement with a full decode).
#[test]
fn regression_reserved_marker_does_not_hide_deep_nesting() {
    let mut bytes = vec![0x92, 0xc1];
    bytes.extend(std::iter::repeat_n(0x91, MAX_NESTING));
    bytes.push(0x01);
    assert!(check_nesting(&bytes, MAX_NESTING).is_err());
    // A request with the same nesting in an unknown field is malformed, not decoded.
    let mut frame = vec![0x83, 0xa2, b'i', b'd', 0x01, 0xa4, b't', b'y', b'p', b'e'];
    frame.extend([0xa4, b'p', b'i', b'n', b'g', 0xa1, b'x']);
    frame.extend(&bytes);
    assert!(matches!(
        decode_request(&frame),
        Err(securefastchat::protocol::RequestError::Malformed(_))
    ));
}

/// 0xc1 is never used in MessagePack, but rmpv reads it as nil: a request with it where a
/// value starts (in a field the server ignores) was decoded instead of refused as strict
/// decoders in other languages refuse it.
#[test]
fn a_request_with_the_reserved_marker_is_malformed() {
    // {"id": 1, "type": "hello", "version": 1, "extra": 0xc1}
    let mut frame = vec![0x84, 0xa2, b'i', b'd', 0x01, 0xa4, b't', b'y', b'p', b'e'];
    frame.extend([0xa5, b'h', b'e', b'l', b'l', b'o']);
    frame.extend([0xa7, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x01]);
    frame.extend([0xa5, b'e', b'x', b't', b'r', b'a', 0xc1]);
    assert!(matches!(
        decode_request(&frame),
        Err(securefastchat::protocol::RequestError::Malformed(_))
    ));
    // The same with nil is a request.
    let last = frame.len() - 1;
    frame[last] = 0xc0;
    assert!(
        decode_request(&frame).is_ok(),
        "{:?}",
        decode_request(&frame)
    );
    // Inside a string the byte is only data.
    frame[last] = 0xa1;
    frame.push(0xc1);
    assert!(!matches!(
        decode_request(&frame),
        Err(securefastchat::protocol::RequestError::Malformed(_))
    ));
}
