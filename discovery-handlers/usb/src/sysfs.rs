//! Parsing sysfs attribute text. The kernel writes these files, but a device
//! chooses its strings (serial, manufacturer, product), so nothing here trusts them.

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
}
