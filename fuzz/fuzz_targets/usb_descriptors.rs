//! Malformed descriptors: any bytes as a sysfs `descriptors` file go through
//! `descriptors::parse`, the parser every scan runs on it. It must return a result
//! or an error, never panic, loop or keep more than its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_usb::descriptors;

fuzz_target!(|data: &[u8]| {
    match descriptors::parse(data) {
        Ok(d) => {
            assert!(data.len() >= descriptors::DEVICE_DESCRIPTOR_LEN);
            assert!(d.configurations.len() <= descriptors::MAX_CONFIGURATIONS);
            for c in &d.configurations {
                assert!(c.interfaces.len() <= descriptors::MAX_INTERFACES);
                // Nine bytes per interface descriptor, all inside the data.
                assert!(c.interfaces.len() * 9 <= data.len());
            }
            let _ = d.problem.map(|p| p.to_string());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
