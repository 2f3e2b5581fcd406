//! The server's strict request decoder on one frame body. What it accepts, serde's decoder of
//! the same type must accept with the same value, and it must survive an encode/decode round
//! trip; what it refuses must be classified (an id to echo whenever the body had one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::protocol::{
    ClientFrame, Request, RequestError, decode_body, decode_request, encode_frame,
};

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(frame) => {
            // `ack` is decoded by hand; everything else comes from serde after the shape check.
            if !matches!(frame.request, Request::Ack { .. }) {
                let serde: ClientFrame = decode_body(data).expect("serde accepts what we accept");
                assert_eq!(serde, frame);
            }
            let again = encode_frame(&frame, u32::MAX).expect("a decoded request encodes");
            assert_eq!(decode_request(&again[4..]), Ok(frame));
        }
        Err(
            RequestError::Malformed(_) | RequestError::Unknown { .. } | RequestError::Bad { .. },
        ) => {}
    }
});
