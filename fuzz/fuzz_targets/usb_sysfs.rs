//! Odd sysfs contents: the input becomes the files of one usb_device (and its
//! interfaces) and goes through `sysfs::parse_device`, the function every scan
//! runs on what it read. It must report, skip or call it a root hub, never panic,
//! and what it reports must be bounded and usable in a device id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_usb::sysfs::{self, Attributes, RawDevice};
use verge_usb::{UsbInfo, descriptors};

/// Splits the input on 0xff bytes into the kernel name, then each device file in
/// [`sysfs::DEVICE_ATTRIBUTES`] order (an empty piece is a missing file, so both
/// missing and empty files are reachable: "\x01" alone is kept as empty), then
/// the descriptors, then interface files.
fn raw_device(data: &[u8]) -> RawDevice {
    let mut pieces = data.split(|b| *b == 0xff);
    let file = |p: Option<&[u8]>| match p {
        None | Some([]) => None,
        Some([1]) => Some(Vec::new()),
        Some(b) => Some(b.to_vec()),
    };
    let sysname = String::from_utf8_lossy(pieces.next().unwrap_or_default()).into_owned();
    let attributes: Attributes = sysfs::DEVICE_ATTRIBUTES
        .iter()
        .filter_map(|name| Some((name.to_string(), file(pieces.next())?)))
        .collect();
    let descriptors = file(pieces.next());
    let mut interfaces = Vec::new();
    loop {
        let one: Attributes = sysfs::INTERFACE_ATTRIBUTES
            .iter()
            .filter_map(|name| Some((name.to_string(), file(pieces.next())?)))
            .collect();
        if one.is_empty() || interfaces.len() == 8 {
            break;
        }
        interfaces.push(one);
    }
    RawDevice {
        sysname,
        attributes,
        descriptors,
        interfaces,
    }
}

fuzz_target!(|data: &[u8]| {
    let raw = raw_device(data);
    let Ok(Some(parsed)) = sysfs::parse_device(&raw) else {
        return;
    };
    let f = &parsed.fields;
    for s in [&f.serial, &f.manufacturer, &f.product]
        .into_iter()
        .flatten()
    {
        assert!(!s.is_empty());
        assert!(s.chars().count() <= sysfs::MAX_STRING_LEN);
        assert!(!s.chars().any(char::is_control));
    }
    assert!(f.interfaces.len() <= descriptors::MAX_INTERFACES);
    assert!(f.bus > 0);
    assert!(parsed.devnum.is_none_or(|n| (1..=127).contains(&n)));
    assert_eq!(
        sysfs::parse_port_path(&f.port_path).map(|(b, _)| b),
        Some(f.bus)
    );
    // The id a device gets must stay free of the id's separators in the serial part.
    let info = UsbInfo {
        fields: f.clone(),
        ..Default::default()
    };
    let id = info.id();
    assert!(id.chars().all(|c| c.is_ascii_graphic()), "{id:?}");
    for p in &parsed.problems {
        let _ = p.to_string();
    }
});
