//! discoveryDetails of the `ble` handler, and their compiled (validated) form.

use std::collections::BTreeSet;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use regex::{RegexSet, RegexSetBuilder};
use serde::Deserialize;
use uuid::Uuid;
use verge_discovery_sdk::{DiscoveryError, FilterAction, FilterList, parse_details};

/// Default time after which a device that has not advertised is gone.
pub const DEFAULT_LOST_AFTER_SECONDS: u64 = 30;
/// Default RSSI hysteresis (dB) below `minRssi` before a present device counts as gone.
pub const DEFAULT_RSSI_HYSTERESIS: u8 = 5;
/// Default time bound of one GATT enrichment (connect, read, disconnect).
pub const DEFAULT_GATT_TIMEOUT_SECONDS: u64 = 10;
/// Upper bound of `lostAfterSeconds` (one day): larger values are surely a mistake.
const MAX_LOST_AFTER_SECONDS: u64 = 86_400;
/// Upper bound of `gatt.timeoutSeconds`.
const MAX_GATT_TIMEOUT_SECONDS: u64 = 120;
/// Compiled size limit of a name regex (the `regex` crate's default is 10 MiB).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Longest data prefix worth matching (a legacy advertisement holds at most 31 bytes,
/// an extended one 255).
pub const MAX_DATA_PREFIX: usize = 255;

/// The Bluetooth SIG base UUID that 16- and 32-bit UUIDs are short for.
const BASE_UUID_SUFFIX: u128 = 0x0000_0000_0000_1000_8000_0080_5f9b_34fb;

/// discoveryDetails of `ble`. Every filter is optional; absent filters keep everything.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BleSettings {
    /// Adapters to scan on, by name (`hci0`) or address; absent = all.
    #[serde(default)]
    pub adapters: Option<FilterList>,
    /// A device that has not advertised for this long is gone (default 30).
    #[serde(default)]
    pub lost_after_seconds: Option<u64>,
    /// Advertised service UUIDs (16-bit `180d`, 32-bit or full 128-bit).
    #[serde(default)]
    pub service_uuids: Option<FilterList>,
    /// Advertised local name.
    #[serde(default)]
    pub local_name: Option<NameFilter>,
    /// Manufacturer-specific data: company id and optional data prefix.
    #[serde(default)]
    pub manufacturer_data: Option<ManufacturerFilter>,
    /// UUIDs of advertised service data.
    #[serde(default)]
    pub service_data_uuids: Option<FilterList>,
    /// Device addresses (`AA:BB:CC:DD:EE:FF`, any case).
    #[serde(default)]
    pub addresses: Option<FilterList>,
    /// Address types: `public` or `random`.
    #[serde(default)]
    pub address_types: Option<FilterList>,
    /// Minimum RSSI (dBm) for a device to count as present.
    #[serde(default)]
    pub min_rssi: Option<i16>,
    /// A present device stays present until its RSSI falls below `minRssi - rssiHysteresis`.
    #[serde(default)]
    pub rssi_hysteresis: Option<u8>,
    /// Optional GATT enrichment.
    #[serde(default)]
    pub gatt: Option<GattSettings>,
}

/// How name filter items are compared.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum NameMatch {
    /// Items are exact names.
    #[default]
    Exact,
    /// Items are glob patterns (`Sensor-*`).
    Glob,
    /// Items are regular expressions (unanchored unless written with `^…$`).
    Regex,
}

/// A filter over the advertised local name.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NameFilter {
    /// Include or Exclude.
    pub action: FilterAction,
    /// Names or patterns.
    #[serde(default)]
    pub items: Vec<String>,
    /// Exact (default), Glob or Regex.
    #[serde(default, rename = "match")]
    pub match_kind: NameMatch,
}

/// A filter over manufacturer-specific data.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManufacturerFilter {
    /// Include or Exclude.
    pub action: FilterAction,
    /// Company ids with optional data prefixes.
    #[serde(default)]
    pub items: Vec<ManufacturerItem>,
}

/// One manufacturer filter item.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManufacturerItem {
    /// Bluetooth SIG company identifier (e.g. 76 = 0x004C, Apple).
    pub id: u16,
    /// Hex bytes the data must start with (`0215`, `02:15`, `02 15`).
    #[serde(default)]
    pub data_prefix: Option<String>,
}

/// GATT enrichment settings.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GattSettings {
    /// Read the Device Information Service (manufacturer, model, serial, firmware).
    #[serde(default)]
    pub device_information: bool,
    /// Bound of one enrichment, connect to disconnect (default 10).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// A set filter compiled from `{action, items}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFilter<T: Ord> {
    /// Include or Exclude.
    pub action: FilterAction,
    /// The parsed items.
    pub items: BTreeSet<T>,
}

impl<T: Ord> SetFilter<T> {
    /// With Include, one listed value is enough; with Exclude, any listed value drops.
    pub fn accepts_any<'a>(&self, values: impl IntoIterator<Item = &'a T>) -> bool
    where
        T: 'a,
    {
        let listed = values.into_iter().any(|v| self.items.contains(v));
        match self.action {
            FilterAction::Include => listed,
            FilterAction::Exclude => !listed,
        }
    }
}

/// Compiled name filter.
#[derive(Debug, Clone)]
pub struct CompiledNameFilter {
    action: FilterAction,
    matcher: NameMatcher,
}

#[derive(Debug, Clone)]
enum NameMatcher {
    Exact(BTreeSet<String>),
    Glob(GlobSet),
    Regex(RegexSet),
}

impl CompiledNameFilter {
    /// Whether a device with this name (or none) passes.
    pub fn accepts(&self, name: Option<&str>) -> bool {
        let listed = name.is_some_and(|n| match &self.matcher {
            NameMatcher::Exact(items) => items.contains(n),
            NameMatcher::Glob(set) => set.is_match(n),
            NameMatcher::Regex(set) => set.is_match(n),
        });
        match self.action {
            FilterAction::Include => listed,
            FilterAction::Exclude => !listed,
        }
    }
}

/// Compiled manufacturer filter item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManufacturerMatch {
    /// Company id.
    pub id: u16,
    /// Data prefix (empty: any data).
    pub prefix: Vec<u8>,
}

/// Compiled manufacturer filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledManufacturerFilter {
    /// Include or Exclude.
    pub action: FilterAction,
    /// Items.
    pub items: Vec<ManufacturerMatch>,
}

/// The address type of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressKind {
    /// A public (IEEE-assigned) address.
    Public,
    /// A random address (static, resolvable or not).
    Random,
}

impl AddressKind {
    /// The property value.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressKind::Public => "public",
            AddressKind::Random => "random",
        }
    }
}

/// GATT settings in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GattConfig {
    /// Bound of one enrichment.
    pub timeout: Duration,
}

/// Validated settings, ready to apply to observations.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Adapter filter, compared with names and addresses (case-insensitive).
    pub adapters: Option<FilterList>,
    /// Absence time after which a device is gone.
    pub lost_after: Duration,
    /// Service UUID filter.
    pub service_uuids: Option<SetFilter<Uuid>>,
    /// Name filter.
    pub local_name: Option<CompiledNameFilter>,
    /// Manufacturer filter.
    pub manufacturer: Option<CompiledManufacturerFilter>,
    /// Service data UUID filter.
    pub service_data_uuids: Option<SetFilter<Uuid>>,
    /// Address filter.
    pub addresses: Option<SetFilter<[u8; 6]>>,
    /// Address type filter.
    pub address_types: Option<SetFilter<AddressKind>>,
    /// Minimum RSSI.
    pub min_rssi: Option<i16>,
    /// RSSI hysteresis (dB).
    pub rssi_hysteresis: i16,
    /// GATT enrichment, when asked for.
    pub gatt: Option<GattConfig>,
}

impl Default for Compiled {
    fn default() -> Self {
        Compiled {
            adapters: None,
            lost_after: Duration::from_secs(DEFAULT_LOST_AFTER_SECONDS),
            service_uuids: None,
            local_name: None,
            manufacturer: None,
            service_data_uuids: None,
            addresses: None,
            address_types: None,
            min_rssi: None,
            rssi_hysteresis: i16::from(DEFAULT_RSSI_HYSTERESIS),
            gatt: None,
        }
    }
}

fn invalid(message: String) -> DiscoveryError {
    DiscoveryError::InvalidSettings(message)
}

/// Parses a UUID as written in settings: full 128-bit, or 16/32-bit hex
/// (optionally `0x`-prefixed) short for the Bluetooth base UUID.
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    let t = text.trim();
    let short = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if (short.len() == 4 || short.len() == 8) && short.bytes().all(|b| b.is_ascii_hexdigit()) {
        let value = u32::from_str_radix(short, 16).ok()?;
        return Some(Uuid::from_u128(
            (u128::from(value) << 96) | BASE_UUID_SUFFIX,
        ));
    }
    Uuid::parse_str(t).ok()
}

/// Parses `AA:BB:CC:DD:EE:FF` (or with `-`), any case.
pub fn parse_address(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.trim().split([':', '-']);
    for slot in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses hex bytes, ignoring `:`, `-`, spaces and a `0x` prefix.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: Vec<u8> = t
        .bytes()
        .filter(|b| !matches!(b, b':' | b'-' | b' '))
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("{text:?} has an odd number of hex digits"));
    }
    if digits.len() / 2 > MAX_DATA_PREFIX {
        return Err(format!("{text:?} is longer than {MAX_DATA_PREFIX} bytes"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).map_err(|_| format!("{text:?} is not hex"))?;
            u8::from_str_radix(s, 16).map_err(|_| format!("{text:?} is not hex"))
        })
        .collect()
}

fn uuid_filter(
    field: &str,
    f: Option<FilterList>,
) -> Result<Option<SetFilter<Uuid>>, DiscoveryError> {
    f.map(|f| {
        let items = f
            .items
            .iter()
            .map(|i| {
                parse_uuid(i).ok_or_else(|| {
                    invalid(format!(
                        "{field}: {i:?} is not a UUID (16-bit like 180d, or 128-bit)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SetFilter {
            action: f.action,
            items,
        })
    })
    .transpose()
}

impl Compiled {
    /// Parses and validates discoveryDetails.
    pub fn parse(details: &str) -> Result<Self, DiscoveryError> {
        Self::new(parse_details::<BleSettings>(details)?)
    }

    /// Validates settings.
    pub fn new(s: BleSettings) -> Result<Self, DiscoveryError> {
        let lost_after_seconds = s.lost_after_seconds.unwrap_or(DEFAULT_LOST_AFTER_SECONDS);
        if !(1..=MAX_LOST_AFTER_SECONDS).contains(&lost_after_seconds) {
            return Err(invalid(format!(
                "lostAfterSeconds: {lost_after_seconds} is not between 1 and {MAX_LOST_AFTER_SECONDS}"
            )));
        }
        let local_name = s
            .local_name
            .map(|f| -> Result<CompiledNameFilter, DiscoveryError> {
                let matcher = match f.match_kind {
                    NameMatch::Exact => NameMatcher::Exact(f.items.iter().cloned().collect()),
                    NameMatch::Glob => {
                        let mut b = GlobSetBuilder::new();
                        for i in &f.items {
                            b.add(
                                Glob::new(i)
                                    .map_err(|e| invalid(format!("localName: glob {i:?}: {e}")))?,
                            );
                        }
                        NameMatcher::Glob(
                            b.build()
                                .map_err(|e| invalid(format!("localName: globs: {e}")))?,
                        )
                    }
                    NameMatch::Regex => NameMatcher::Regex(
                        RegexSetBuilder::new(&f.items)
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                            .map_err(|e| invalid(format!("localName: regex: {e}")))?,
                    ),
                };
                Ok(CompiledNameFilter {
                    action: f.action,
                    matcher,
                })
            })
            .transpose()?;
        let manufacturer = s
            .manufacturer_data
            .map(|f| -> Result<CompiledManufacturerFilter, DiscoveryError> {
                let items = f
                    .items
                    .iter()
                    .map(|i| {
                        let prefix = match &i.data_prefix {
                            Some(p) => parse_hex(p).map_err(|e| {
                                invalid(format!("manufacturerData: id {}: dataPrefix {e}", i.id))
                            })?,
                            None => Vec::new(),
                        };
                        Ok(ManufacturerMatch { id: i.id, prefix })
                    })
                    .collect::<Result<_, DiscoveryError>>()?;
                Ok(CompiledManufacturerFilter {
                    action: f.action,
                    items,
                })
            })
            .transpose()?;
        let addresses = s
            .addresses
            .map(|f| -> Result<SetFilter<[u8; 6]>, DiscoveryError> {
                let items = f
                    .items
                    .iter()
                    .map(|i| {
                        parse_address(i).ok_or_else(|| {
                            invalid(format!("addresses: {i:?} is not a Bluetooth address"))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(SetFilter {
                    action: f.action,
                    items,
                })
            })
            .transpose()?;
        let address_types = s
            .address_types
            .map(|f| -> Result<SetFilter<AddressKind>, DiscoveryError> {
                let items = f
                    .items
                    .iter()
                    .map(|i| match i.to_ascii_lowercase().as_str() {
                        "public" => Ok(AddressKind::Public),
                        "random" => Ok(AddressKind::Random),
                        _ => Err(invalid(format!(
                            "addressTypes: {i:?} is not public or random"
                        ))),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(SetFilter {
                    action: f.action,
                    items,
                })
            })
            .transpose()?;
        if let Some(a) = &s.adapters
            && a.items.iter().any(|i| i.trim().is_empty())
        {
            return Err(invalid("adapters: an item is empty".into()));
        }
        let gatt = match s.gatt {
            Some(g) if g.device_information => {
                let t = g.timeout_seconds.unwrap_or(DEFAULT_GATT_TIMEOUT_SECONDS);
                if !(1..=MAX_GATT_TIMEOUT_SECONDS).contains(&t) {
                    return Err(invalid(format!(
                        "gatt.timeoutSeconds: {t} is not between 1 and {MAX_GATT_TIMEOUT_SECONDS}"
                    )));
                }
                Some(GattConfig {
                    timeout: Duration::from_secs(t),
                })
            }
            _ => None,
        };
        Ok(Compiled {
            adapters: s.adapters,
            lost_after: Duration::from_secs(lost_after_seconds),
            service_uuids: uuid_filter("serviceUuids", s.service_uuids)?,
            local_name,
            manufacturer,
            service_data_uuids: uuid_filter("serviceDataUuids", s.service_data_uuids)?,
            addresses,
            address_types,
            min_rssi: s.min_rssi,
            rssi_hysteresis: i16::from(s.rssi_hysteresis.unwrap_or(DEFAULT_RSSI_HYSTERESIS)),
            gatt,
        })
    }

    /// Whether an adapter (by name and, when known, address) is selected.
    pub fn adapter_selected(&self, name: &str, address: Option<&str>) -> bool {
        let Some(f) = &self.adapters else {
            return true;
        };
        let eq = |item: &str, v: &str| item.trim().eq_ignore_ascii_case(v);
        let listed = f
            .items
            .iter()
            .any(|i| eq(i, name) || address.is_some_and(|a| eq(i, a)));
        match f.action {
            FilterAction::Include => listed,
            FilterAction::Exclude => !listed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c = Compiled::parse("").expect("empty");
        assert_eq!(
            c.lost_after,
            Duration::from_secs(DEFAULT_LOST_AFTER_SECONDS)
        );
        assert!(c.gatt.is_none());
        let e = Compiled::parse("lostAfterSecond: 3").expect_err("unknown");
        assert!(e.to_string().contains("lostAfterSecond"), "{e}");
        let e = Compiled::parse("localName: {action: Include, items: [a], mach: Glob}")
            .expect_err("unknown nested");
        assert!(e.to_string().contains("mach"), "{e}");
    }

    #[test]
    fn invalid_values_are_named() {
        for (details, needle) in [
            ("serviceUuids: {action: Include, items: [xyz]}", "xyz"),
            (
                "addresses: {action: Include, items: ['11:22:33']}",
                "11:22:33",
            ),
            (
                "addressTypes: {action: Include, items: [resolvable]}",
                "resolvable",
            ),
            (
                "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '021'}]}",
                "odd",
            ),
            (
                "localName: {action: Include, items: ['(('], match: Regex}",
                "regex",
            ),
            (
                "localName: {action: Include, items: ['[a'], match: Glob}",
                "glob",
            ),
            ("lostAfterSeconds: 0", "lostAfterSeconds"),
            (
                "gatt: {deviceInformation: true, timeoutSeconds: 0}",
                "timeoutSeconds",
            ),
        ] {
            let e = Compiled::parse(details).expect_err(details);
            assert!(
                matches!(&e, DiscoveryError::InvalidSettings(m) if m.contains(needle)),
                "{details}: {e}"
            );
        }
    }

    #[test]
    fn uuids_addresses_hex() {
        let heart = parse_uuid("180d").expect("short");
        assert_eq!(heart.to_string(), "0000180d-0000-1000-8000-00805f9b34fb");
        assert_eq!(parse_uuid("0x180D"), Some(heart));
        assert_eq!(
            parse_uuid("0000180D-0000-1000-8000-00805F9B34FB"),
            Some(heart)
        );
        assert_eq!(parse_uuid("18"), None);
        assert_eq!(
            parse_address("aa:BB:cc:dd:ee:0f"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f])
        );
        assert_eq!(parse_address("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_address("aaa:bb:cc:dd:ee:f"), None);
        assert_eq!(parse_hex("02:15 aB").expect("hex"), [0x02, 0x15, 0xab]);
        assert!(parse_hex("zz").is_err());
        assert!(parse_hex("0").is_err());
        assert_eq!(parse_hex("").expect("empty"), Vec::<u8>::new());
    }

    #[test]
    fn adapter_selection() {
        let c = Compiled::parse("adapters: {action: Include, items: [hci1, '00:01:02:03:04:05']}")
            .expect("parse");
        assert!(c.adapter_selected("hci1", None));
        assert!(c.adapter_selected("hci0", Some("00:01:02:03:04:05")));
        assert!(!c.adapter_selected("hci0", Some("00:01:02:03:04:06")));
        assert!(Compiled::default().adapter_selected("hci9", None));
    }
}
