//! The client's keystore file (`keystore.msgpack`): a damaged or crafted file must be refused
//! as corrupt, never crash `sfc` or make it allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::client::keystore::KeyState;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = rmp_serde::from_slice::<KeyState>(data) {
        // What the client does first with a loaded keystore.
        let _ = state.identity();
        let _ = rmp_serde::to_vec_named(&state);
    }
});
