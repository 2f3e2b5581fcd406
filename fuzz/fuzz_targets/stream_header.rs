//! Message-stream headers: the first frame of every message stream, decoded by the server
//! (`send`) and by the client (`deliver`), with the stream-header cap; a decoded header
//! survives an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::protocol::{MAX_STREAM_HEADER, StreamHeader, decode_body, encode_frame};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_STREAM_HEADER as usize {
        return;
    }
    if let Ok(header) = decode_body::<StreamHeader>(data) {
        let again = encode_frame(&header, u32::MAX).expect("a decoded header encodes");
        let back: StreamHeader = decode_body(&again[4..]).expect("and decodes again");
        assert_eq!(back, header);
    }
});
