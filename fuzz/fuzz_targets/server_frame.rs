//! What a client decodes from its server: reply and event frames. A hostile or broken server
//! must not crash the client; a decoded frame survives an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::protocol::{ServerFrame, decode_body, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_body::<ServerFrame>(data) {
        let again = encode_frame(&frame, u32::MAX).expect("a decoded frame encodes");
        let back: ServerFrame = decode_body(&again[4..]).expect("and decodes again");
        assert_eq!(back, frame);
    }
});
