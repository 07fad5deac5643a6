//! Decoding Read Device Identification objects into an identity.
//!
//! tokio-modbus parses the 0x2B/0x0E frame into `(object id, bytes)` pairs;
//! everything after that (text decoding, bounds, which object means what,
//! merging several responses) is ours and fuzzed.

/// VendorName.
pub const OBJ_VENDOR: u8 = 0x00;
/// ProductCode.
pub const OBJ_PRODUCT_CODE: u8 = 0x01;
/// MajorMinorRevision.
pub const OBJ_REVISION: u8 = 0x02;
/// VendorUrl.
pub const OBJ_VENDOR_URL: u8 = 0x03;
/// ProductName.
pub const OBJ_PRODUCT_NAME: u8 = 0x04;
/// ModelName.
pub const OBJ_MODEL: u8 = 0x05;
/// UserApplicationName.
pub const OBJ_USER_APPLICATION: u8 = 0x06;
/// Longest object value kept (a response holds at most 253 bytes anyway).
pub const MAX_OBJECT_CHARS: usize = 64;

/// What a unit says about itself. Empty strings mean "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    /// Object 0x00.
    pub vendor: String,
    /// Object 0x01.
    pub product_code: String,
    /// Object 0x02.
    pub revision: String,
    /// Object 0x03.
    pub vendor_url: String,
    /// Object 0x04.
    pub product_name: String,
    /// Object 0x05.
    pub model: String,
    /// Object 0x06.
    pub user_application: String,
    /// The object named by `serialObjectId`.
    pub serial: String,
}

/// Turns an object's bytes into printable text: the standard says ASCII, real
/// devices send Latin-1, UTF-8 or NUL padding. Control characters go (they
/// would end up in env vars and logs), whitespace is trimmed, length bounded.
pub fn object_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control() && *c != char::REPLACEMENT_CHARACTER)
        .take(MAX_OBJECT_CHARS)
        .collect();
    cleaned.trim().to_string()
}

impl Identity {
    /// Merges objects from one response into `self`; the first value seen for
    /// an object wins, so a contradictory later response cannot flip it.
    pub fn merge<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (u8, &'a [u8])>,
        serial_id: Option<u8>,
    ) {
        for (id, bytes) in objects {
            let slot = if Some(id) == serial_id {
                Some(&mut self.serial)
            } else {
                match id {
                    OBJ_VENDOR => Some(&mut self.vendor),
                    OBJ_PRODUCT_CODE => Some(&mut self.product_code),
                    OBJ_REVISION => Some(&mut self.revision),
                    OBJ_VENDOR_URL => Some(&mut self.vendor_url),
                    OBJ_PRODUCT_NAME => Some(&mut self.product_name),
                    OBJ_MODEL => Some(&mut self.model),
                    OBJ_USER_APPLICATION => Some(&mut self.user_application),
                    _ => None,
                }
            };
            if let Some(slot) = slot
                && slot.is_empty()
            {
                *slot = object_text(bytes);
            }
        }
    }

    /// Whether the unit gave anything that identifies it.
    pub fn is_empty(&self) -> bool {
        self.vendor.is_empty()
            && self.product_code.is_empty()
            && self.model.is_empty()
            && self.serial.is_empty()
    }

    /// The identity part of a device id: vendor, product code and serial when present.
    pub fn id_part(&self) -> String {
        let mut parts = Vec::new();
        for (key, value) in [
            ("vendor", &self.vendor),
            ("product", &self.product_code),
            ("serial", &self.serial),
        ] {
            if !value.is_empty() {
                parts.push(format!("{key}={value}"));
            }
        }
        parts.join(";")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cleaned_and_bounded() {
        assert_eq!(object_text(b"  ACME\0\0"), "ACME");
        assert_eq!(object_text(b"A\nB\x1b[31m"), "AB[31m");
        assert_eq!(object_text(&[0xff, b'x']), "x");
        assert_eq!(object_text(&[b'a'; 300]).len(), MAX_OBJECT_CHARS);
    }

    #[test]
    fn merge_keeps_first_and_maps_serial() {
        let mut id = Identity::default();
        id.merge(
            [(0u8, &b"ACME"[..]), (1, b"P-1"), (0x80, b"SN9"), (5, b"M5")],
            Some(0x80),
        );
        id.merge([(0u8, &b"Other"[..])], Some(0x80));
        assert_eq!(id.vendor, "ACME");
        assert_eq!(id.serial, "SN9");
        assert_eq!(id.model, "M5");
        assert_eq!(id.id_part(), "vendor=ACME;product=P-1;serial=SN9");
        assert!(Identity::default().is_empty());
    }
}
