//! A control stream as a peer sends it: length-prefixed frames read with the server's cap, each
//! body decoded as the server decodes requests and as the client decodes replies. A decoded
//! frame must encode again and decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::protocol::{
    ClientFrame, MAX_CONTROL_FRAME, ServerFrame, decode_body, decode_request, encode_frame,
    read_frame,
};

thread_local! {
    /// One runtime per fuzzing thread: building one per input would dominate the run.
    static RUNTIME: Option<tokio::runtime::Runtime> =
        tokio::runtime::Builder::new_current_thread().build().ok();
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| {
        if let Some(runtime) = runtime {
            runtime.block_on(read_all(data));
        }
    });
});

async fn read_all(data: &[u8]) {
    let mut stream = data;
    let mut body = Vec::new();
    // A small cap for every other frame, so the too-large path is reached too.
    let mut frames = 0u32;
    loop {
        let cap = if frames % 2 == 0 {
            MAX_CONTROL_FRAME
        } else {
            64
        };
        match read_frame(&mut stream, cap, &mut body).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        frames += 1;
        assert!(body.len() <= cap as usize);
        if let Ok(frame) = decode_request(&body) {
            let again = encode_frame(&frame, u32::MAX).expect("a decoded request encodes");
            let back: ClientFrame = decode_body(&again[4..]).expect("and decodes again");
            assert_eq!(back, frame);
        }
        if let Ok(frame) = decode_body::<ServerFrame>(&body) {
            let again = encode_frame(&frame, u32::MAX).expect("a decoded reply encodes");
            let back: ServerFrame = decode_body(&again[4..]).expect("and decodes again");
            assert_eq!(back, frame);
        }
    }
}
