//! discoveryDetails text → typed settings → validated plans.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_discovery_sdk::parse_details;
use verge_modbus::settings::{RtuSettings, TcpSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.len() > 4096 {
        return;
    }
    if let Ok(s) = parse_details::<TcpSettings>(text)
        && let Ok(plan) = s.plan()
    {
        assert!(plan.addresses.len() <= plan.max_addresses);
        assert!(!plan.common.unit_ids.is_empty());
    }
    if let Ok(s) = parse_details::<RtuSettings>(text)
        && let Ok(plan) = s.plan()
    {
        assert!(plan.common.unit_ids.iter().all(|u| (1..=247).contains(u)));
    }
});
