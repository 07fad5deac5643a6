//! Match rules over USB device fields: exact values, lists, hex ranges and globs.

use serde::Deserialize;

/// One value or a list, as written in YAML.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(Scalar),
    /// Several; any may match.
    Many(Vec<Scalar>),
}

/// A YAML scalar. Hex fields must be quoted (`"0403"`): an unquoted number is refused;
/// decimal fields (bus) take numbers.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    /// A number.
    Number(u64),
    /// Text.
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

impl OneOrMany {
    fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.text()],
            OneOrMany::Many(v) => v.iter().map(Scalar::text).collect(),
        }
    }
}

/// Hex values and ranges (`"0403"`, `"0x0403"`, `"2340-2345"`, `"*"`).
#[derive(Debug, Clone, PartialEq)]
pub struct HexMatcher(Vec<(u16, u16)>);

/// Why a rule value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// A value that is not hex, a range or `*`.
    #[error("{field}: {value:?} is not a hex value, a range like \"2340-234f\" or \"*\"")]
    BadHex {
        /// Field.
        field: String,
        /// Value.
        value: String,
    },
    /// A range whose end is below its start.
    #[error("{field}: range {value:?} ends before it starts")]
    BadRange {
        /// Field.
        field: String,
        /// Value.
        value: String,
    },
    /// A glob that does not parse.
    #[error("{field}: {value:?} is not a valid glob: {message}")]
    BadGlob {
        /// Field.
        field: String,
        /// Value.
        value: String,
        /// Why.
        message: String,
    },
    /// A hex value written as a YAML number.
    #[error(
        "{field}: write hex values as quoted strings (\"0403\"); YAML read this one as the number {value}"
    )]
    Unquoted {
        /// Field.
        field: String,
        /// The number YAML read.
        value: u64,
    },
    /// An unknown speed name.
    #[error("speed: {0:?} is not one of low, full, high, super, superplus")]
    BadSpeed(String),
    /// A list that is empty, so it could never match.
    #[error("{0}: an empty list matches nothing")]
    Empty(String),
}

fn hex(field: &str, value: &str, max: u16) -> Result<u16, MatchError> {
    let t = value.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u16::from_str_radix(t, 16)
        .ok()
        .filter(|v| *v <= max && !t.is_empty() && t.len() <= 4)
        .ok_or_else(|| MatchError::BadHex {
            field: field.to_string(),
            value: value.to_string(),
        })
}

impl HexMatcher {
    /// Parses a value or list; `max` is 0xff for class codes.
    pub fn parse(field: &str, v: &OneOrMany, max: u16) -> Result<Self, MatchError> {
        // YAML reads 0403 as 403 and 0x0403 as 1027: the digits as written are lost,
        // so an unquoted number is refused rather than guessed.
        let numbers: Vec<&Scalar> = match v {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(l) => l.iter().collect(),
        };
        if let Some(Scalar::Number(n)) = numbers.iter().find(|s| matches!(s, Scalar::Number(_))) {
            return Err(MatchError::Unquoted {
                field: field.to_string(),
                value: *n,
            });
        }
        let items = v.items();
        if items.is_empty() {
            return Err(MatchError::Empty(field.to_string()));
        }
        items
            .iter()
            .map(|item| {
                if item.trim() == "*" {
                    return Ok((0, max));
                }
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (hex(field, a, max)?, hex(field, b, max)?);
                        if b < a {
                            return Err(MatchError::BadRange {
                                field: field.to_string(),
                                value: item.clone(),
                            });
                        }
                        Ok((a, b))
                    }
                    None => {
                        let v = hex(field, item, max)?;
                        Ok((v, v))
                    }
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(HexMatcher)
    }

    /// Whether `v` is listed or in a range.
    pub fn matches(&self, v: u16) -> bool {
        self.0.iter().any(|(a, b)| (*a..=*b).contains(&v))
    }
}

/// Glob patterns on strings (`"FT*"`, `"*Webcam*"`); any may match.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobMatcher(Vec<glob::Pattern>);

impl GlobMatcher {
    /// Parses a value or list.
    pub fn parse(field: &str, v: &OneOrMany) -> Result<Self, MatchError> {
        let items = v.items();
        if items.is_empty() {
            return Err(MatchError::Empty(field.to_string()));
        }
        items
            .iter()
            .map(|item| {
                glob::Pattern::new(item).map_err(|e| MatchError::BadGlob {
                    field: field.to_string(),
                    value: item.clone(),
                    message: e.msg.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(GlobMatcher)
    }

    /// Whether the value exists and matches. A device without the string never matches.
    pub fn matches(&self, v: Option<&str>) -> bool {
        v.is_some_and(|v| self.0.iter().any(|p| p.matches(v)))
    }
}

/// USB speeds by name.
pub const SPEEDS: &[&str] = &["low", "full", "high", "super", "superplus"];

/// One match rule as written; every field given must hold.
#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchRuleSpec {
    /// idVendor.
    pub vendor_id: Option<OneOrMany>,
    /// idProduct.
    pub product_id: Option<OneOrMany>,
    /// bDeviceClass.
    pub device_class: Option<OneOrMany>,
    /// bDeviceSubClass.
    pub device_subclass: Option<OneOrMany>,
    /// bDeviceProtocol.
    pub device_protocol: Option<OneOrMany>,
    /// bInterfaceClass of any interface.
    pub interface_class: Option<OneOrMany>,
    /// bInterfaceSubClass of that same interface.
    pub interface_subclass: Option<OneOrMany>,
    /// bInterfaceProtocol of that same interface.
    pub interface_protocol: Option<OneOrMany>,
    /// Serial number (glob).
    pub serial: Option<OneOrMany>,
    /// Manufacturer string (glob).
    pub manufacturer: Option<OneOrMany>,
    /// Product string (glob).
    pub product: Option<OneOrMany>,
    /// Bus number (decimal, lists and ranges like "1-3").
    pub bus: Option<OneOrMany>,
    /// Port path, e.g. "1-3.*" (glob).
    pub port_path: Option<OneOrMany>,
    /// Speed names.
    pub speed: Option<OneOrMany>,
}

/// A compiled rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatchRule {
    vendor_id: Option<HexMatcher>,
    product_id: Option<HexMatcher>,
    device_class: Option<HexMatcher>,
    device_subclass: Option<HexMatcher>,
    device_protocol: Option<HexMatcher>,
    interface: Option<[Option<HexMatcher>; 3]>,
    serial: Option<GlobMatcher>,
    manufacturer: Option<GlobMatcher>,
    product: Option<GlobMatcher>,
    bus: Option<Vec<(u32, u32)>>,
    port_path: Option<GlobMatcher>,
    speed: Option<Vec<String>>,
}

/// What a rule looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbFields {
    /// idVendor.
    pub vendor_id: u16,
    /// idProduct.
    pub product_id: u16,
    /// Device class, subclass, protocol.
    pub class: (u8, u8, u8),
    /// Class, subclass, protocol of each interface.
    pub interfaces: Vec<(u8, u8, u8)>,
    /// Serial number.
    pub serial: Option<String>,
    /// Manufacturer.
    pub manufacturer: Option<String>,
    /// Product.
    pub product: Option<String>,
    /// Bus number.
    pub bus: u8,
    /// Port path, e.g. `1-3.1`.
    pub port_path: String,
    /// Speed name (see [`SPEEDS`]), if known.
    pub speed: Option<String>,
}

fn decimal_ranges(field: &str, v: &OneOrMany) -> Result<Vec<(u32, u32)>, MatchError> {
    let bad = |item: &str| MatchError::BadHex {
        field: field.to_string(),
        value: item.to_string(),
    };
    v.items()
        .iter()
        .map(|item| {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let a: u32 = a.trim().parse().map_err(|_| bad(item))?;
            let b: u32 = b.trim().parse().map_err(|_| bad(item))?;
            if b < a {
                return Err(MatchError::BadRange {
                    field: field.to_string(),
                    value: item.clone(),
                });
            }
            Ok((a, b))
        })
        .collect()
}

impl MatchRule {
    /// Compiles a rule; `at` names it in errors (`match[2]`).
    pub fn compile(spec: &MatchRuleSpec, at: &str) -> Result<Self, MatchError> {
        let f = |name: &str| format!("{at}.{name}");
        let hex16 = |name: &str, v: &Option<OneOrMany>| {
            v.as_ref()
                .map(|v| HexMatcher::parse(&f(name), v, u16::MAX))
                .transpose()
        };
        let hex8 = |name: &str, v: &Option<OneOrMany>| {
            v.as_ref()
                .map(|v| HexMatcher::parse(&f(name), v, 0xff))
                .transpose()
        };
        let glob = |name: &str, v: &Option<OneOrMany>| {
            v.as_ref()
                .map(|v| GlobMatcher::parse(&f(name), v))
                .transpose()
        };
        let interface = [
            hex8("interfaceClass", &spec.interface_class)?,
            hex8("interfaceSubclass", &spec.interface_subclass)?,
            hex8("interfaceProtocol", &spec.interface_protocol)?,
        ];
        let speed = spec
            .speed
            .as_ref()
            .map(|v| {
                v.items()
                    .into_iter()
                    .map(|s| {
                        let s = s.to_ascii_lowercase();
                        if SPEEDS.contains(&s.as_str()) {
                            Ok(s)
                        } else {
                            Err(MatchError::BadSpeed(s))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Self {
            vendor_id: hex16("vendorId", &spec.vendor_id)?,
            product_id: hex16("productId", &spec.product_id)?,
            device_class: hex8("deviceClass", &spec.device_class)?,
            device_subclass: hex8("deviceSubclass", &spec.device_subclass)?,
            device_protocol: hex8("deviceProtocol", &spec.device_protocol)?,
            interface: interface.iter().any(Option::is_some).then_some(interface),
            serial: glob("serial", &spec.serial)?,
            manufacturer: glob("manufacturer", &spec.manufacturer)?,
            product: glob("product", &spec.product)?,
            bus: spec
                .bus
                .as_ref()
                .map(|v| decimal_ranges(&f("bus"), v))
                .transpose()?,
            port_path: glob("portPath", &spec.port_path)?,
            speed,
        })
    }

    /// Whether every given field holds for `d`.
    pub fn matches(&self, d: &UsbFields) -> bool {
        let hex = |m: &Option<HexMatcher>, v: u16| m.as_ref().is_none_or(|m| m.matches(v));
        let glob =
            |m: &Option<GlobMatcher>, v: Option<&str>| m.as_ref().is_none_or(|m| m.matches(v));
        hex(&self.vendor_id, d.vendor_id)
            && hex(&self.product_id, d.product_id)
            && hex(&self.device_class, d.class.0.into())
            && hex(&self.device_subclass, d.class.1.into())
            && hex(&self.device_protocol, d.class.2.into())
            && self.interface.as_ref().is_none_or(|[c, s, p]| {
                d.interfaces
                    .iter()
                    .any(|i| hex(c, i.0.into()) && hex(s, i.1.into()) && hex(p, i.2.into()))
            })
            && glob(&self.serial, d.serial.as_deref())
            && glob(&self.manufacturer, d.manufacturer.as_deref())
            && glob(&self.product, d.product.as_deref())
            && self
                .bus
                .as_ref()
                .is_none_or(|r| r.iter().any(|(a, b)| (*a..=*b).contains(&u32::from(d.bus))))
            && glob(&self.port_path, Some(&d.port_path))
            && self
                .speed
                .as_ref()
                .is_none_or(|s| d.speed.as_ref().is_some_and(|v| s.contains(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Result<MatchRule, MatchError> {
        let spec: MatchRuleSpec = serde_saphyr::from_str(yaml).expect("yaml");
        MatchRule::compile(&spec, "match[0]")
    }

    fn ftdi() -> UsbFields {
        UsbFields {
            vendor_id: 0x0403,
            product_id: 0x6001,
            interfaces: vec![(0xff, 0xff, 0xff)],
            serial: Some("FT12AB34".into()),
            manufacturer: Some("FTDI".into()),
            product: Some("FT232R USB UART".into()),
            bus: 1,
            port_path: "1-2".into(),
            speed: Some("full".into()),
            ..Default::default()
        }
    }

    #[test]
    fn exact_lists_ranges_and_globs() {
        let d = ftdi();
        assert!(rule("vendorId: \"0403\"").expect("r").matches(&d));
        assert!(rule("vendorId: \"0x0403\"").expect("r").matches(&d));
        assert!(
            rule("vendorId: [\"10c4\", \"0403\"]")
                .expect("r")
                .matches(&d)
        );
        assert!(rule("productId: \"6000-600f\"").expect("r").matches(&d));
        assert!(!rule("productId: \"6010-601f\"").expect("r").matches(&d));
        assert!(
            rule("serial: \"FT*\"\nproduct: \"*UART\"")
                .expect("r")
                .matches(&d)
        );
        assert!(!rule("manufacturer: \"Logi*\"").expect("r").matches(&d));
        assert!(
            rule("interfaceClass: \"ff\"\nspeed: [full, high]")
                .expect("r")
                .matches(&d)
        );
        assert!(!rule("interfaceClass: \"0e\"").expect("r").matches(&d));
        assert!(
            rule("bus: \"1-2\"\nportPath: \"1-*\"")
                .expect("r")
                .matches(&d)
        );
        assert!(!rule("bus: 3").expect("r").matches(&d));
        let mut no_serial = d.clone();
        no_serial.serial = None;
        assert!(!rule("serial: \"*\"").expect("r").matches(&no_serial));
        assert!(rule("deviceClass: \"*\"").expect("r").matches(&d));
    }

    #[test]
    fn bad_values_are_named() {
        let e = rule("vendorId: \"04g3\"").expect_err("hex");
        assert!(e.to_string().contains("match[0].vendorId"), "{e}");
        assert!(matches!(
            rule("productId: \"6010-6001\""),
            Err(MatchError::BadRange { .. })
        ));
        assert!(matches!(
            rule("deviceClass: \"100\""),
            Err(MatchError::BadHex { .. })
        ));
        assert!(matches!(
            rule("serial: \"[\""),
            Err(MatchError::BadGlob { .. })
        ));
        assert!(matches!(rule("speed: warp"), Err(MatchError::BadSpeed(_))));
        assert!(matches!(rule("vendorId: []"), Err(MatchError::Empty(_))));
        assert!(matches!(
            rule("vendorId: 0x0403"),
            Err(MatchError::Unquoted { .. })
        ));
        assert!(matches!(
            rule("productId: [\"6001\", 6015]"),
            Err(MatchError::Unquoted { .. })
        ));
    }
}
