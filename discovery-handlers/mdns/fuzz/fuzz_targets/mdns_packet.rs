//! mdns-sd parses every packet the handler receives (we parse none
//! ourselves); this drives its parser through the crate's own fuzz entry
//! point (`unstable-fuzz-api`), which also checks its invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mdns_sd::fuzz_api::parse_packet(data);
});
