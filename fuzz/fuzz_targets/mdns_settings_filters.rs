//! discoveryDetails text → settings → filters applied to a service: never a
//! panic; a plan that accepts a service never grows its address list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_mdns::properties::{Service, TxtEntry};

fuzz_target!(|data: &[u8]| {
    // Small inputs only: the YAML parser is not what this target is about.
    if data.len() > 4096 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(plan) = verge_mdns::Mdns::plan(text) else { return };
    let service = Service {
        service_type: "_http._tcp.local.".into(),
        fullname: "cam-1._http._tcp.local.".into(),
        hostname: "cam.local.".into(),
        port: 8080,
        addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        txt: vec![TxtEntry { key: "model".into(), value: Some(b"X1".to_vec()) }],
    };
    if let Some(s) = plan.select(service) {
        assert!(!s.addresses.is_empty() && s.addresses.len() <= 2);
    }
});
