//! WS-Discovery datagrams as a camera (or anyone on the LAN) may send them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_onvif::wsd::{self, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::Matches(targets)) = wsd::parse(data) {
        assert!(targets.len() <= wsd::MAX_TARGETS_PER_MESSAGE);
        for t in &targets {
            let _ = wsd::device_id(&t.endpoint);
            let _ = verge_onvif::pick_xaddr(t, std::net::IpAddr::from([10, 0, 0, 1]));
        }
    }
});
