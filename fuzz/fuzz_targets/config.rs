//! The server's TOML configuration file: parsed (unknown keys refused) and resolved (values
//! validated) without panicking on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::server::ConfigLayer;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(layer) = toml::from_str::<ConfigLayer>(text) {
        let _ = layer.clone().over(ConfigLayer::default()).resolve();
    }
});
