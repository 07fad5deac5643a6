//! Parsing a USB device's sysfs files. The kernel writes these files, but a device
//! chooses its strings (serial, manufacturer, product) and descriptors, and a
//! sysfs snapshot or testbed can hold anything, so nothing here trusts them.
//!
//! [`parse_device`] is a pure function of the files' contents ([`RawDevice`]), so
//! the fuzz target `usb_sysfs` runs exactly what a scan runs; reading the files is
//! [`read_device`]'s only job.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::descriptors::{self, DescriptorError};
use crate::matching::UsbFields;

/// Longest string property kept; USB string descriptors hold at most 126 characters.
pub const MAX_STRING_LEN: usize = 126;

/// A 16-bit id as sysfs writes it (`046d\n`).
pub fn parse_hex_u16(text: &str) -> Option<u16> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() || t.len() > 4 {
        return None;
    }
    u16::from_str_radix(t, 16).ok()
}

/// An 8-bit class code (`ef\n`).
pub fn parse_hex_u8(text: &str) -> Option<u8> {
    parse_hex_u16(text).and_then(|v| u8::try_from(v).ok())
}

/// A decimal number (`busnum`, `devnum`).
pub fn parse_decimal(text: &str) -> Option<u32> {
    let t = text.trim();
    if t.is_empty() || t.len() > 10 {
        return None;
    }
    t.parse().ok()
}

/// A device-chosen string: trailing newline removed, control characters dropped,
/// at most [`MAX_STRING_LEN`] characters. Empty means absent.
pub fn clean_string(text: &str) -> Option<String> {
    let s: String = text
        .trim_end_matches(['\n', '\r'])
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_STRING_LEN)
        .collect();
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// A string safe inside a device id: printable ASCII without spaces or `:`/`@`
/// (the id's separators); anything else becomes `_`.
pub fn id_component(text: &str) -> String {
    text.chars()
        .take(MAX_STRING_LEN)
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' && c != '@' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The port path of a USB device as the kernel names it (`1-3.1`), checked:
/// bus number, `-`, then dot-separated port numbers.
pub fn parse_port_path(text: &str) -> Option<(u8, Vec<u8>)> {
    let (bus, ports) = text.trim().split_once('-')?;
    let bus: u8 = bus.parse().ok()?;
    let ports = ports
        .split('.')
        .map(|p| p.parse::<u8>().ok())
        .collect::<Option<Vec<_>>>()?;
    if ports.is_empty() || ports.len() > 7 {
        return None;
    }
    Some((bus, ports))
}

/// Formats a port path.
pub fn port_path(bus: u8, ports: &[u8]) -> String {
    let ports: Vec<String> = ports.iter().map(u8::to_string).collect();
    format!("{bus}-{}", ports.join("."))
}

/// Most bytes read from one text attribute: sysfs serves at most a page.
pub const MAX_ATTRIBUTE_LEN: usize = 4096;
/// The `descriptors` file.
pub const DESCRIPTORS: &str = "descriptors";
/// The text attributes of a usb_device that a scan reads.
pub const DEVICE_ATTRIBUTES: &[&str] = &[
    "idVendor",
    "idProduct",
    "bDeviceClass",
    "bDeviceSubClass",
    "bDeviceProtocol",
    "bConfigurationValue",
    "busnum",
    "devnum",
    "devpath",
    "speed",
    "serial",
    "manufacturer",
    "product",
];
/// The attributes of a usb_interface that a scan reads.
pub const INTERFACE_ATTRIBUTES: &[&str] = &[
    "bInterfaceNumber",
    "bInterfaceClass",
    "bInterfaceSubClass",
    "bInterfaceProtocol",
];
/// Highest USB device address.
pub const MAX_DEVNUM: u32 = 127;

/// File name → contents. A missing file has no entry.
pub type Attributes = BTreeMap<String, Vec<u8>>;

/// The contents of a usb_device's sysfs files, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawDevice {
    /// Kernel name, the port path for a device (`1-3.1`), `usbN` for a root hub.
    pub sysname: String,
    /// [`DEVICE_ATTRIBUTES`] that exist.
    pub attributes: Attributes,
    /// The `descriptors` file, if it exists.
    pub descriptors: Option<Vec<u8>>,
    /// [`INTERFACE_ATTRIBUTES`] of each usb_interface below the device.
    pub interfaces: Vec<Attributes>,
}

/// A device as parsed, with what was wrong but could be worked around.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedDevice {
    /// The fields rules look at.
    pub fields: UsbFields,
    /// Device address on its bus (for the usbfs node), if valid.
    pub devnum: Option<u8>,
    /// Non-fatal problems, for a log line and a diagnostic.
    pub problems: Vec<Problem>,
}

/// Why a device cannot be reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Neither the device descriptor nor idVendor/idProduct give the ids.
    #[error(
        "no vendor and product id: descriptors: {descriptors}; idVendor {vendor}, idProduct {product}"
    )]
    NoIds {
        /// Why the descriptor did not help.
        descriptors: String,
        /// idVendor as read.
        vendor: String,
        /// idProduct as read.
        product: String,
    },
    /// busnum is not a bus number.
    #[error("busnum {0} is not a bus number 1-255")]
    Bus(String),
    /// Neither the kernel name nor busnum and devpath form a port path.
    #[error("neither the kernel name {sysname} nor devpath {devpath} is a port path like 1-3.1")]
    PortPath {
        /// Kernel name as read.
        sysname: String,
        /// devpath as read.
        devpath: String,
    },
}

/// Something wrong that the device is still reported despite.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The descriptors file is unusable or partly so.
    #[error("descriptors: {0}")]
    Descriptors(DescriptorError),
    /// The descriptors file is missing.
    #[error("no descriptors file; ids and classes from the text attributes")]
    NoDescriptors,
    /// The descriptors do not contain the active configuration.
    #[error("bConfigurationValue {0} is not among the descriptors' configurations")]
    NoActiveConfiguration(u8),
    /// An attribute holds something unusable; it is left out.
    #[error("{attribute} {value} is not valid; left out")]
    Invalid {
        /// Attribute.
        attribute: &'static str,
        /// Value as read.
        value: String,
    },
    /// A string attribute is not UTF-8.
    #[error("{0} is not UTF-8; invalid bytes replaced")]
    NotUtf8(&'static str),
    /// A string attribute is longer than a USB string can be.
    #[error("{0} is longer than 126 characters; cut")]
    TooLong(&'static str),
    /// The text attribute and the descriptor disagree.
    #[error(
        "{attribute} {value} differs from the device descriptor's {descriptor:04x}; the descriptor is used"
    )]
    Disagrees {
        /// Attribute.
        attribute: &'static str,
        /// Its value as read.
        value: String,
        /// The descriptor's value.
        descriptor: u16,
    },
}

/// A value for a message: without the kernel's newline, at most 40 characters,
/// escaped, quoted; `missing` when absent.
pub fn show(v: Option<&[u8]>) -> String {
    match v {
        None => "missing".into(),
        Some(b) => {
            let text = text(b);
            let mut s: String = text.chars().take(40).collect();
            if text.chars().count() > 40 {
                s.push('…');
            }
            format!("{s:?}")
        }
    }
}

/// A sysfs value as text: one trailing newline dropped (the kernel's, not the value's).
fn text(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b.strip_suffix(b"\n").unwrap_or(b))
}

/// A speed attribute (Mbit/s as the kernel writes it) as a [`crate::matching::SPEEDS`] name.
fn speed_name(text: &str) -> Result<Option<&'static str>, ()> {
    Ok(Some(match text.trim() {
        "1.5" => "low",
        "12" => "full",
        "480" => "high",
        "5000" => "super",
        "10000" | "20000" => "superplus",
        // The kernel's own word for a speed it does not know.
        "unknown" | "" => return Ok(None),
        _ => return Err(()),
    }))
}

/// A device-chosen string attribute: see [`clean_string`]; a non-UTF-8 or overlong
/// value is kept as far as it is readable, and said so.
fn string_attribute(
    attrs: &Attributes,
    name: &'static str,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    let raw = attrs.get(name)?;
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let text = match std::str::from_utf8(raw) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => {
            problems.push(Problem::NotUtf8(name));
            String::from_utf8_lossy(raw)
        }
    };
    if text.chars().filter(|c| !c.is_control()).count() > MAX_STRING_LEN {
        problems.push(Problem::TooLong(name));
    }
    clean_string(&text)
}

/// A hex attribute that may be absent; garbage is a problem, not an error.
fn hex_attribute(
    attrs: &Attributes,
    name: &'static str,
    problems: &mut Vec<Problem>,
) -> Option<u16> {
    let raw = attrs.get(name)?;
    let v = parse_hex_u16(&text(raw));
    if v.is_none() {
        problems.push(Problem::Invalid {
            attribute: name,
            value: show(Some(raw)),
        });
    }
    v
}

/// The contents of a usb_device's files → the device, or why it cannot be reported.
/// `Ok(None)` is a root hub, which is never reported.
pub fn parse_device(raw: &RawDevice) -> Result<Option<ParsedDevice>, DeviceError> {
    let attrs = &raw.attributes;
    let get = |name: &str| attrs.get(name).map(Vec::as_slice);
    let devpath = get("devpath").map(|d| text(d).trim().to_string());
    if raw.sysname.starts_with("usb") || devpath.as_deref() == Some("0") {
        return Ok(None);
    }
    let mut problems = Vec::new();

    let bus = get("busnum")
        .and_then(|b| parse_decimal(&text(b)))
        .and_then(|b| u8::try_from(b).ok())
        .filter(|b| *b > 0)
        .ok_or_else(|| DeviceError::Bus(show(get("busnum"))))?;
    // The kernel name is the port path; busnum-devpath says the same and stands in
    // when the name is odd.
    let from_devpath = devpath
        .as_deref()
        .and_then(|d| parse_port_path(&format!("{bus}-{d}")));
    let path = match (parse_port_path(&raw.sysname), &from_devpath) {
        (Some((b, ports)), _) if b == bus => port_path(b, &ports),
        (_, Some((b, ports))) => port_path(*b, ports),
        _ => {
            return Err(DeviceError::PortPath {
                sysname: show(Some(raw.sysname.as_bytes())),
                devpath: show(get("devpath")),
            });
        }
    };
    // A missing devpath is no problem (the name said it all); a wrong one is.
    if devpath.is_some() && from_devpath.is_none_or(|(b, ports)| port_path(b, &ports) != path) {
        problems.push(Problem::Invalid {
            attribute: "devpath",
            value: show(get("devpath")),
        });
    }

    let parsed = match &raw.descriptors {
        None => {
            problems.push(Problem::NoDescriptors);
            Err(String::from("missing"))
        }
        Some(bytes) => descriptors::parse(bytes).map_err(|e| {
            problems.push(Problem::Descriptors(e.clone()));
            e.to_string()
        }),
    };
    if let Ok(d) = &parsed
        && let Some(p) = &d.problem
    {
        problems.push(Problem::Descriptors(p.clone()));
    }

    // The text attributes are the kernel's copy of the device descriptor: they stand
    // in when the descriptor is unreadable, and a disagreement is worth a word.
    let vendor_attr = hex_attribute(attrs, "idVendor", &mut problems);
    let product_attr = hex_attribute(attrs, "idProduct", &mut problems);
    let class_attrs = ["bDeviceClass", "bDeviceSubClass", "bDeviceProtocol"].map(|name| {
        let raw = attrs.get(name)?;
        let v = parse_hex_u8(&text(raw));
        if v.is_none() {
            problems.push(Problem::Invalid {
                attribute: name,
                value: show(Some(raw)),
            });
        }
        v
    });
    let (vendor_id, product_id, class) = match &parsed {
        Ok(d) => {
            for (attribute, attr, desc) in [
                ("idVendor", vendor_attr, d.device.vendor_id),
                ("idProduct", product_attr, d.device.product_id),
            ] {
                if let Some(a) = attr
                    && a != desc
                {
                    problems.push(Problem::Disagrees {
                        attribute,
                        value: show(get(attribute)),
                        descriptor: desc,
                    });
                }
            }
            (d.device.vendor_id, d.device.product_id, d.device.class)
        }
        Err(why) => match (vendor_attr, product_attr) {
            (Some(v), Some(p)) => (
                v,
                p,
                (
                    class_attrs[0].unwrap_or(0),
                    class_attrs[1].unwrap_or(0),
                    class_attrs[2].unwrap_or(0),
                ),
            ),
            _ => {
                return Err(DeviceError::NoIds {
                    descriptors: why.clone(),
                    vendor: show(get("idVendor")),
                    product: show(get("idProduct")),
                });
            }
        },
    };

    let interfaces = interfaces(raw, parsed.as_ref().ok(), &mut problems);

    let devnum = get("devnum").and_then(|d| {
        let v = parse_decimal(&text(d))
            .filter(|n| (1..=MAX_DEVNUM).contains(n))
            .and_then(|n| u8::try_from(n).ok());
        if v.is_none() {
            problems.push(Problem::Invalid {
                attribute: "devnum",
                value: show(Some(d)),
            });
        }
        v
    });
    let speed = get("speed").and_then(|s| match speed_name(&text(s)) {
        Ok(name) => name.map(str::to_string),
        Err(()) => {
            problems.push(Problem::Invalid {
                attribute: "speed",
                value: show(Some(s)),
            });
            None
        }
    });
    let serial = string_attribute(attrs, "serial", &mut problems);
    let manufacturer = string_attribute(attrs, "manufacturer", &mut problems);
    let product = string_attribute(attrs, "product", &mut problems);
    Ok(Some(ParsedDevice {
        fields: UsbFields {
            vendor_id,
            product_id,
            class,
            interfaces,
            serial,
            manufacturer,
            product,
            bus,
            port_path: path,
            speed,
        },
        devnum,
        problems,
    }))
}

/// Interface classes: from the active configuration's descriptors, else from the
/// interface directories the kernel made for it.
fn interfaces(
    raw: &RawDevice,
    parsed: Option<&descriptors::Descriptors>,
    problems: &mut Vec<Problem>,
) -> Vec<(u8, u8, u8)> {
    let active = raw
        .attributes
        .get("bConfigurationValue")
        .map(|v| text(v).trim().to_string());
    if let Some(d) = parsed {
        let config = match active.as_deref() {
            // Unconfigured: no interfaces exist.
            Some("") => return Vec::new(),
            Some(v) => match v.parse::<u8>() {
                Ok(n) => {
                    let found = d.configurations.iter().find(|c| c.value == n);
                    if found.is_none() && !d.configurations.is_empty() {
                        problems.push(Problem::NoActiveConfiguration(n));
                    }
                    found
                }
                Err(_) => {
                    problems.push(Problem::Invalid {
                        attribute: "bConfigurationValue",
                        value: show(raw.attributes.get("bConfigurationValue").map(Vec::as_slice)),
                    });
                    d.configurations.first()
                }
            },
            None => d.configurations.first(),
        };
        if let Some(c) = config {
            return c.interfaces.iter().map(|i| i.class).collect();
        }
    }
    let mut from_dirs: Vec<(u8, (u8, u8, u8))> = raw
        .interfaces
        .iter()
        .filter_map(|attrs| {
            let mut field = |name: &'static str| {
                let v = attrs.get(name).and_then(|v| parse_hex_u8(&text(v)));
                if v.is_none() {
                    problems.push(Problem::Invalid {
                        attribute: name,
                        value: show(attrs.get(name).map(Vec::as_slice)),
                    });
                }
                v
            };
            Some((
                field("bInterfaceNumber")?,
                (
                    field("bInterfaceClass")?,
                    field("bInterfaceSubClass")?,
                    field("bInterfaceProtocol")?,
                ),
            ))
        })
        .take(descriptors::MAX_INTERFACES)
        .collect();
    from_dirs.sort();
    from_dirs.into_iter().map(|(_, c)| c).collect()
}

/// Reads at most `limit` bytes of `path`; `None` when it cannot be read (missing,
/// permission), since a scan goes on with what it has.
fn read_bounded(path: &Path, limit: usize) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut out = Vec::new();
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    file.take(limit).read_to_end(&mut out).ok()?;
    Some(out)
}

fn read_attributes(dir: &Path, names: &[&str]) -> Attributes {
    names
        .iter()
        .filter_map(|n| {
            Some((
                n.to_string(),
                read_bounded(&dir.join(n), MAX_ATTRIBUTE_LEN)?,
            ))
        })
        .collect()
}

/// Reads a usb_device's files (and those of the interface directories given) for
/// [`parse_device`].
pub fn read_device(syspath: &Path, sysname: &str, interface_dirs: &[&Path]) -> RawDevice {
    RawDevice {
        sysname: sysname.to_string(),
        attributes: read_attributes(syspath, DEVICE_ATTRIBUTES),
        // One byte over the limit, so that an oversized file is seen as one.
        descriptors: read_bounded(
            &syspath.join(DESCRIPTORS),
            descriptors::MAX_DESCRIPTORS_LEN + 1,
        ),
        interfaces: interface_dirs
            .iter()
            .map(|d| read_attributes(d, INTERFACE_ATTRIBUTES))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_contents() {
        assert_eq!(parse_hex_u16("046d\n"), Some(0x046d));
        assert_eq!(parse_hex_u16("0x0403"), Some(0x0403));
        assert_eq!(parse_hex_u16("12345"), None);
        assert_eq!(parse_hex_u16(""), None);
        assert_eq!(parse_hex_u16("zz"), None);
        assert_eq!(parse_hex_u8("ef\n"), Some(0xef));
        assert_eq!(parse_hex_u8("1ef"), None);
        assert_eq!(parse_decimal(" 7\n"), Some(7));
        assert_eq!(parse_decimal("-1"), None);
        assert_eq!(clean_string("Web\u{7}cam\n").as_deref(), Some("Webcam"));
        assert_eq!(clean_string("\n"), None);
        assert_eq!(
            clean_string(&"x".repeat(1000)).map(|s| s.len()),
            Some(MAX_STRING_LEN)
        );
        assert_eq!(id_component("A B:C@é"), "A_B_C__");
        assert_eq!(parse_port_path("1-3.1\n"), Some((1, vec![3, 1])));
        assert_eq!(parse_port_path("usb1"), None);
        assert_eq!(parse_port_path("1-"), None);
        assert_eq!(parse_port_path("1-3.999"), None);
        assert_eq!(port_path(1, &[3, 1]), "1-3.1");
    }

    fn raw(sysname: &str, attrs: &[(&str, &[u8])], descriptors: Option<&[u8]>) -> RawDevice {
        RawDevice {
            sysname: sysname.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            descriptors: descriptors.map(<[u8]>::to_vec),
            interfaces: Vec::new(),
        }
    }

    /// FTDI adapter's descriptors (tests/peers/usb/serial.umockdev).
    const FTDI: &[u8] = &[
        0x12, 0x01, 0x00, 0x02, 0, 0, 0, 0x40, 0x03, 0x04, 0x01, 0x60, 0x00, 0x06, 1, 2, 3, 1,
        0x09, 0x02, 0x12, 0x00, 1, 1, 0, 0x80, 0x32, 0x09, 0x04, 0, 0, 0, 0xff, 0xff, 0xff, 0,
    ];

    #[test]
    fn a_good_device() {
        let d = parse_device(&raw(
            "1-3.1",
            &[
                ("idVendor", b"0403\n"),
                ("idProduct", b"6001\n"),
                ("bConfigurationValue", b"1\n"),
                ("busnum", b"1\n"),
                ("devnum", b"4\n"),
                ("devpath", b"3.1\n"),
                ("speed", b"12\n"),
                ("serial", b"FT12AB34\n"),
            ],
            Some(FTDI),
        ))
        .expect("valid")
        .expect("not a root hub");
        assert_eq!(d.problems, []);
        assert_eq!((d.fields.vendor_id, d.fields.product_id), (0x0403, 0x6001));
        assert_eq!(d.fields.interfaces, [(0xff, 0xff, 0xff)]);
        assert_eq!(d.fields.port_path, "1-3.1");
        assert_eq!(d.fields.speed.as_deref(), Some("full"));
        assert_eq!(d.fields.serial.as_deref(), Some("FT12AB34"));
        assert_eq!(d.devnum, Some(4));
    }

    #[test]
    fn odd_files_are_skipped_or_worked_around() {
        // Root hubs are never devices.
        assert_eq!(
            parse_device(&raw("usb1", &[("busnum", b"1")], None)),
            Ok(None)
        );
        // No usable ids anywhere: skipped, naming both sources.
        let e = parse_device(&raw(
            "1-5",
            &[("idVendor", b"zzzz\n"), ("busnum", b"1\n")],
            Some(b"\xde\xad"),
        ))
        .expect_err("no ids");
        assert!(e.to_string().contains("\"zzzz\""), "{e}");
        assert!(e.to_string().contains("fewer than the 18"), "{e}");
        // busnum out of range, and a port path nothing can give.
        assert!(matches!(
            parse_device(&raw("1-8", &[("busnum", b"300\n")], Some(FTDI))),
            Err(DeviceError::Bus(_))
        ));
        assert!(matches!(
            parse_device(&raw(
                "1-weird",
                &[("busnum", b"1\n"), ("devpath", b"../x\n")],
                Some(FTDI)
            )),
            Err(DeviceError::PortPath { .. })
        ));
        // Text attributes stand in for missing descriptors; odd strings are kept as
        // far as readable; every oddity is named.
        let d = parse_device(&raw(
            "1-7",
            &[
                ("idVendor", b"abcd\n"),
                ("idProduct", b"0001\n"),
                ("busnum", b"1\n"),
                ("devnum", b"999\n"),
                ("devpath", b"7..x\n"),
                ("speed", b"warp\n"),
                ("serial", b"S\xff\n"),
                ("product", &[b'x'; 300]),
            ],
            None,
        ))
        .expect("reported")
        .expect("not a root hub");
        assert_eq!((d.fields.vendor_id, d.fields.product_id), (0xabcd, 1));
        assert_eq!(d.fields.port_path, "1-7");
        assert_eq!(d.fields.serial.as_deref(), Some("S\u{fffd}"));
        assert_eq!(
            d.fields.product.as_ref().map(String::len),
            Some(MAX_STRING_LEN)
        );
        assert_eq!(d.devnum, None);
        assert_eq!(d.fields.speed, None);
        let problems: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
        for named in [
            "no descriptors",
            "devpath",
            "devnum \"999\"",
            "speed",
            "serial is not UTF-8",
            "product is longer",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(named)),
                "{named}: {problems:?}"
            );
        }
        // Descriptors win over disagreeing text attributes, and say so.
        let d = parse_device(&raw(
            "1-2",
            &[("idVendor", b"0404\n"), ("busnum", b"1\n")],
            Some(FTDI),
        ))
        .expect("reported")
        .expect("not a root hub");
        assert_eq!(d.fields.vendor_id, 0x0403);
        assert!(
            matches!(d.problems[..], [Problem::Disagrees { .. }]),
            "{:?}",
            d.problems
        );
    }
}
