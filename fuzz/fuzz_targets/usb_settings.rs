//! Hostile discoveryDetails (match rules with hex ranges, globs, lists): compiling
//! must refuse or accept, never panic, and a compiled rule must evaluate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_usb::{UsbFields, UsbInfo, compile_settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > 4096 {
        return;
    }
    if let Ok(settings) = compile_settings(text) {
        let info = UsbInfo {
            fields: UsbFields {
                vendor_id: 0x0403,
                product_id: 0x6001,
                serial: Some("FT12AB34".into()),
                port_path: "1-3.1".into(),
                interfaces: vec![(0xff, 0xff, 0xff)],
                ..Default::default()
            },
            ..Default::default()
        };
        let _ = settings.devices(&[info]);
    }
});
