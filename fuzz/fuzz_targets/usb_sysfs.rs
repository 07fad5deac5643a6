//! Odd sysfs contents: every attribute parser must return a value or None, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_usb::sysfs;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = sysfs::parse_hex_u16(&text);
    let _ = sysfs::parse_hex_u8(&text);
    let _ = sysfs::parse_decimal(&text);
    if let Some(s) = sysfs::clean_string(&text) {
        assert!(s.chars().count() <= sysfs::MAX_STRING_LEN);
        assert!(!s.chars().any(char::is_control));
    }
    let id = sysfs::id_component(&text);
    assert!(id.chars().all(|c| c.is_ascii_graphic() && c != ':' && c != '@'));
    if let Some((bus, ports)) = sysfs::parse_port_path(&text) {
        assert_eq!(sysfs::parse_port_path(&sysfs::port_path(bus, &ports)), Some((bus, ports)));
    }
});
