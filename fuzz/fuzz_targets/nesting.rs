//! The nesting scanner against a recursive reference: on any bytes, `check_nesting` must agree
//! with a full decode (rmpv, no depth cap) about whether the value nests too deeply, whenever
//! the bytes hold one complete value; and it must never panic or loop on truncated input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::protocol::{MAX_NESTING, check_nesting};

/// Levels of maps and arrays in `value` (a scalar is 0).
fn depth(value: &rmpv::Value) -> usize {
    match value {
        rmpv::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        rmpv::Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&max, bytes)) = data.split_first() else {
        return;
    };
    let max = usize::from(max) % (MAX_NESTING + 2);
    let verdict = check_nesting(bytes, max);
    // The reference decoder recurses, so only ask it about values the scanner let through at
    // the full limit (anything deeper could overflow the reference's stack, not ours).
    if check_nesting(bytes, MAX_NESTING).is_err() {
        assert!(verdict.is_err() || max > MAX_NESTING);
        return;
    }
    let mut rest = bytes;
    if let Ok(value) = rmpv::decode::read_value_with_max_depth(&mut rest, 4 * MAX_NESTING + 8) {
        let deep = depth(&value) > max.min(MAX_NESTING);
        assert_eq!(verdict.is_err(), deep, "max {max}, depth {}", depth(&value));
    }
});
