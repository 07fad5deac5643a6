//! Arbitrary discoveryDetails: accepted or refused with InvalidSettings, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_ble::Compiled;

fuzz_target!(|data: &[u8]| {
    // Bounded so one input cannot compile a huge pattern set.
    if data.len() > 4096 {
        return;
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Compiled::parse(text);
    }
});
