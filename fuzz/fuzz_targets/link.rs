//! Linking a device (PROTOCOL.md E13): what the other device (or a server in the middle) can
//! send — a SPAKE2 message, a confirmation, a sealed payload — at each step of both sides, the
//! payload decoder itself, and the code as a user types it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::e2e::IdentityKeyPair;
use securefastchat::e2e::link::{
    ExistingDevice, JoiningDevice, LinkCode, LinkPayload, LinkSecret,
};
use securefastchat::protocol::Username;

fuzz_target!(|data: &[u8]| {
    // The payload decoder: what it accepts encodes back to what it decodes.
    if let Ok(payload) = LinkPayload::from_bytes(data)
        && let Ok(bytes) = payload.to_bytes()
    {
        let again = LinkPayload::from_bytes(&bytes).expect("a payload we encoded decodes");
        assert_eq!(again.contacts, payload.contacts);
        assert_eq!(again.account, payload.account);
    }
    // The code as typed.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = LinkCode::parse(text);
    }
    // The protocol steps with peer bytes cut from the input.
    let Ok(account) = Username::parse("alice") else {
        return;
    };
    let Ok(secret) = LinkSecret::new(123_456) else {
        return;
    };
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (first, rest) = data.split_at(split);
    let split = rest.first().map_or(0, |b| usize::from(*b) / 4).min(rest.len());
    let (second, third) = rest.split_at(split);
    if let Ok((existing, _)) = ExistingDevice::start(&secret, &account)
        && let Ok(keys) = existing.finish(4321, first)
    {
        let payload = LinkPayload {
            account: account.clone(),
            identity: IdentityKeyPair::from_seed(&[1; 32]),
            contacts: Vec::new(),
        };
        // A forged confirmation is refused.
        assert!(keys.accept(second, &payload).is_err());
    }
    if let Ok(code) = LinkCode::new(4321, &secret)
        && let Ok((joining, _)) = JoiningDevice::start(&code, &account)
        && let Ok((keys, _confirm)) = joining.finish(first)
    {
        // Without the other side's keys, nothing opens.
        assert!(keys.open(second, third).is_err());
    }
});
