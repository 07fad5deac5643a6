//! What an advertisement tells about a device, bounded and sanitized; the
//! filters; the properties; and the table of devices heard.
//!
//! Everything here is pure (no Bluetooth stack), so it is unit-tested and fuzzed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use uuid::Uuid;
use verge_discovery_sdk::{Device, FilterAction};

use crate::settings::{AddressKind, Compiled};

/// Property: the device address, `AA:BB:CC:DD:EE:FF`.
pub const PROP_ADDRESS: &str = "BLE_ADDRESS";
/// Property: `public` or `random`.
pub const PROP_ADDRESS_TYPE: &str = "BLE_ADDRESS_TYPE";
/// Property: the advertised local name.
pub const PROP_NAME: &str = "BLE_NAME";
/// Property: advertised service UUIDs, sorted, comma-separated.
pub const PROP_SERVICE_UUIDS: &str = "BLE_SERVICE_UUIDS";
/// Property: manufacturer (company) ids of the manufacturer data, `0x004c`, comma-separated.
pub const PROP_MANUFACTURER_ID: &str = "BLE_MANUFACTURER_ID";
/// Property: the adapter that heard the device (`hci0`).
pub const PROP_ADAPTER: &str = "BLE_ADAPTER";
/// Property (GATT): Device Information manufacturer name.
pub const PROP_GATT_MANUFACTURER: &str = "BLE_MANUFACTURER_NAME";
/// Property (GATT): model number.
pub const PROP_GATT_MODEL: &str = "BLE_MODEL_NUMBER";
/// Property (GATT): serial number.
pub const PROP_GATT_SERIAL: &str = "BLE_SERIAL_NUMBER";
/// Property (GATT): firmware revision.
pub const PROP_GATT_FIRMWARE: &str = "BLE_FIRMWARE_REVISION";

/// Longest name kept (the Bluetooth Core spec limits a device name to 248 bytes).
pub const MAX_NAME_BYTES: usize = 248;
/// Longest manufacturer data kept per company id (an extended advertisement holds 255 bytes).
pub const MAX_DATA_BYTES: usize = 255;
/// Most UUIDs / data entries kept per device; more cannot fit in one advertisement.
pub const MAX_ENTRIES: usize = 64;
/// Longest GATT string kept.
pub const MAX_GATT_STRING: usize = 64;
/// Most devices tracked per Configuration (also those filtered out), so a
/// crowded room or a flood of random addresses cannot grow memory without bound.
pub const MAX_TRACKED_DEVICES: usize = 4096;

/// One advertisement (or a device's current state), bounded and sanitized.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// Address bytes, most significant first.
    pub address: [u8; 6],
    /// Address type, when the stack says.
    pub address_type: Option<AddressKind>,
    /// Local name, sanitized.
    pub name: Option<String>,
    /// Advertised service UUIDs.
    pub services: BTreeSet<Uuid>,
    /// Manufacturer data by company id, each truncated to [`MAX_DATA_BYTES`].
    pub manufacturer_data: BTreeMap<u16, Vec<u8>>,
    /// UUIDs of advertised service data.
    pub service_data: BTreeSet<Uuid>,
    /// Signal strength, if heard in this scan.
    pub rssi: Option<i16>,
}

/// Unbounded input as the Bluetooth stack (or a fuzzer) hands it over.
#[derive(Debug, Clone, Default)]
pub struct RawAdvertisement<'a> {
    /// Address bytes.
    pub address: [u8; 6],
    /// Address type.
    pub address_type: Option<AddressKind>,
    /// Name bytes (not necessarily UTF-8).
    pub name: Option<&'a [u8]>,
    /// Services.
    pub services: Vec<Uuid>,
    /// Manufacturer data.
    pub manufacturer_data: Vec<(u16, &'a [u8])>,
    /// Service data.
    pub service_data: Vec<(Uuid, &'a [u8])>,
    /// RSSI.
    pub rssi: Option<i16>,
}

/// Makes untrusted text safe for a property: lossy UTF-8, control characters
/// and NULs dropped, trimmed, at most `max` bytes (cut on a character boundary).
pub fn sanitize_text(bytes: &[u8], max: usize) -> Option<String> {
    let lossy = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for c in lossy.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    let trimmed = out.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

impl Observation {
    /// Bounds and sanitizes raw advertisement data.
    pub fn from_raw(raw: &RawAdvertisement<'_>) -> Self {
        Observation {
            address: raw.address,
            address_type: raw.address_type,
            name: raw.name.and_then(|n| sanitize_text(n, MAX_NAME_BYTES)),
            services: raw.services.iter().copied().take(MAX_ENTRIES).collect(),
            manufacturer_data: raw
                .manufacturer_data
                .iter()
                .take(MAX_ENTRIES)
                .map(|(id, data)| (*id, data[..data.len().min(MAX_DATA_BYTES)].to_vec()))
                .collect(),
            service_data: raw
                .service_data
                .iter()
                .take(MAX_ENTRIES)
                .map(|(u, _)| *u)
                .collect(),
            rssi: raw.rssi,
        }
    }

    /// From what btleplug reports (maps are iterated in sorted order so
    /// truncation is deterministic).
    pub fn from_parts(
        address: [u8; 6],
        address_type: Option<AddressKind>,
        name: Option<&str>,
        services: &[Uuid],
        manufacturer_data: &HashMap<u16, Vec<u8>>,
        service_data: &HashMap<Uuid, Vec<u8>>,
        rssi: Option<i16>,
    ) -> Self {
        let mut services: Vec<Uuid> = services.to_vec();
        services.sort();
        let mut md: Vec<(u16, &[u8])> = manufacturer_data
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        md.sort_by_key(|(k, _)| *k);
        let mut sd: Vec<(Uuid, &[u8])> = service_data
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        sd.sort_by_key(|(k, _)| *k);
        Self::from_raw(&RawAdvertisement {
            address,
            address_type,
            name: name.map(str::as_bytes),
            services,
            manufacturer_data: md,
            service_data: sd,
            rssi,
        })
    }

    /// `AA:BB:CC:DD:EE:FF`.
    pub fn address_string(&self) -> String {
        format_address(&self.address)
    }

    /// Whether the address is a resolvable private address (random, top bits 01),
    /// which changes every few minutes.
    pub fn is_resolvable_private(&self) -> bool {
        self.address_type == Some(AddressKind::Random) && self.address[0] >> 6 == 0b01
    }

    /// Whether the advertisement passes every configured filter except RSSI
    /// (which needs history, see [`Tracker`]).
    pub fn passes(&self, c: &Compiled) -> bool {
        if let Some(f) = &c.addresses
            && !f.accepts_any([&self.address])
        {
            return false;
        }
        if let Some(f) = &c.address_types
            && !f.accepts_any(self.address_type.as_ref())
        {
            return false;
        }
        if let Some(f) = &c.service_uuids
            && !f.accepts_any(&self.services)
        {
            return false;
        }
        if let Some(f) = &c.service_data_uuids
            && !f.accepts_any(&self.service_data)
        {
            return false;
        }
        if let Some(f) = &c.local_name
            && !f.accepts(self.name.as_deref())
        {
            return false;
        }
        if let Some(f) = &c.manufacturer {
            let listed = f.items.iter().any(|item| {
                self.manufacturer_data
                    .get(&item.id)
                    .is_some_and(|data| data.starts_with(&item.prefix))
            });
            let ok = match f.action {
                FilterAction::Include => listed,
                FilterAction::Exclude => !listed,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// `AA:BB:CC:DD:EE:FF`.
pub fn format_address(a: &[u8; 6]) -> String {
    format!(
        "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
        a[0], a[1], a[2], a[3], a[4], a[5]
    )
}

/// Whether a device counts as in range, given whether it counted before.
/// Without RSSI news, the previous answer stands.
pub fn rssi_present(
    was_present: bool,
    rssi: Option<i16>,
    min: Option<i16>,
    hysteresis: i16,
) -> bool {
    let Some(min) = min else {
        return true;
    };
    match rssi {
        None => was_present,
        Some(r) if was_present => r >= min.saturating_sub(hysteresis),
        Some(r) => r >= min,
    }
}

/// Device Information Service strings read over GATT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInformation {
    /// Manufacturer Name String (0x2A29).
    pub manufacturer: Option<String>,
    /// Model Number String (0x2A24).
    pub model: Option<String>,
    /// Serial Number String (0x2A25).
    pub serial: Option<String>,
    /// Firmware Revision String (0x2A26).
    pub firmware: Option<String>,
}

/// The device id: the address, or, for a device behind a resolvable private
/// address that told us its serial number, an id built from its identity (the
/// address would change every few minutes).
pub fn device_id(obs: &Observation, info: Option<&DeviceInformation>) -> String {
    if obs.is_resolvable_private()
        && let Some(serial) = info.and_then(|i| i.serial.as_deref())
    {
        let part = |s: Option<&str>| {
            s.unwrap_or("")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
        };
        let i = info.cloned().unwrap_or_default();
        return format!(
            "ble-serial-{}-{}-{}",
            part(i.manufacturer.as_deref()),
            part(i.model.as_deref()),
            part(Some(serial))
        );
    }
    obs.address_string()
}

/// The device as the agent sees it.
pub fn to_device(obs: &Observation, adapter: &str, info: Option<&DeviceInformation>) -> Device {
    let mut properties = BTreeMap::new();
    properties.insert(PROP_ADDRESS.to_string(), obs.address_string());
    if let Some(t) = obs.address_type {
        properties.insert(PROP_ADDRESS_TYPE.to_string(), t.as_str().to_string());
    }
    if let Some(n) = &obs.name {
        properties.insert(PROP_NAME.to_string(), n.clone());
    }
    if !obs.services.is_empty() {
        let list: Vec<String> = obs.services.iter().map(Uuid::to_string).collect();
        properties.insert(PROP_SERVICE_UUIDS.to_string(), list.join(","));
    }
    if !obs.manufacturer_data.is_empty() {
        let list: Vec<String> = obs
            .manufacturer_data
            .keys()
            .map(|id| format!("0x{id:04x}"))
            .collect();
        properties.insert(PROP_MANUFACTURER_ID.to_string(), list.join(","));
    }
    properties.insert(PROP_ADAPTER.to_string(), adapter.to_string());
    if let Some(i) = info {
        for (key, value) in [
            (PROP_GATT_MANUFACTURER, &i.manufacturer),
            (PROP_GATT_MODEL, &i.model),
            (PROP_GATT_SERIAL, &i.serial),
            (PROP_GATT_FIRMWARE, &i.firmware),
        ] {
            if let Some(v) = value {
                properties.insert(key.to_string(), v.clone());
            }
        }
    }
    Device {
        id: device_id(obs, info),
        properties,
        mounts: Vec::new(),
        device_specs: Vec::new(),
    }
}

/// GATT enrichment progress of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrichment {
    /// Not asked for, or not started yet.
    NotStarted,
    /// A connection is under way; the device is held back so its id does not change.
    Pending,
    /// Finished: what was read (None if the read failed).
    Done(Option<DeviceInformation>),
}

/// One device heard.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// Latest state.
    pub obs: Observation,
    /// Adapter that first heard it (stable while it stays).
    pub adapter: String,
    /// Last advertisement.
    pub last_seen: Instant,
    /// Whether it counted as in range (RSSI with hysteresis).
    pub in_range: bool,
    /// GATT enrichment.
    pub enrichment: Enrichment,
}

/// The table of devices heard, keyed by address.
#[derive(Debug)]
pub struct Tracker {
    settings: std::sync::Arc<Compiled>,
    devices: BTreeMap<[u8; 6], Tracked>,
}

impl Tracker {
    /// An empty table.
    pub fn new(settings: std::sync::Arc<Compiled>) -> Self {
        Self {
            settings,
            devices: BTreeMap::new(),
        }
    }

    /// Records an advertisement heard at `now` on `adapter`. Returns whether
    /// the device now passes the filters and needs GATT enrichment started.
    pub fn observe(&mut self, obs: Observation, adapter: &str, now: Instant) -> bool {
        if !self.devices.contains_key(&obs.address) && self.devices.len() >= MAX_TRACKED_DEVICES {
            // Make room by forgetting the device heard longest ago.
            if let Some(oldest) = self
                .devices
                .iter()
                .min_by_key(|(_, t)| t.last_seen)
                .map(|(k, _)| *k)
            {
                self.devices.remove(&oldest);
            }
        }
        let s = &self.settings;
        let entry = self.devices.entry(obs.address).or_insert_with(|| Tracked {
            obs: obs.clone(),
            adapter: adapter.to_string(),
            last_seen: now,
            in_range: false,
            enrichment: Enrichment::NotStarted,
        });
        entry.in_range = rssi_present(entry.in_range, obs.rssi, s.min_rssi, s.rssi_hysteresis);
        entry.obs = obs;
        entry.last_seen = now;
        let wanted = s.gatt.is_some()
            && entry.enrichment == Enrichment::NotStarted
            && entry.in_range
            && entry.obs.passes(s);
        if wanted {
            entry.enrichment = Enrichment::Pending;
        }
        wanted
    }

    /// Records the result of a GATT enrichment.
    pub fn enriched(&mut self, address: [u8; 6], info: Option<DeviceInformation>) {
        if let Some(t) = self.devices.get_mut(&address) {
            t.enrichment = Enrichment::Done(info);
        }
    }

    /// Forgets devices not heard for `lostAfter`. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let lost_after = self.settings.lost_after;
        let before = self.devices.len();
        self.devices
            .retain(|_, t| now.saturating_duration_since(t.last_seen) < lost_after);
        before != self.devices.len()
    }

    /// Forgets everything (the adapter went away).
    pub fn clear(&mut self) {
        self.devices.clear();
    }

    /// How long until the next device could expire (for the timer).
    pub fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.devices
            .values()
            .map(|t| (t.last_seen + self.settings.lost_after).saturating_duration_since(now))
            .min()
    }

    /// The devices to report, sorted by id; devices whose GATT read is under
    /// way are held back.
    pub fn devices(&self) -> Vec<Device> {
        let s = &self.settings;
        let mut out: Vec<Device> = self
            .devices
            .values()
            .filter(|t| t.in_range && t.obs.passes(s))
            .filter_map(|t| match &t.enrichment {
                Enrichment::Pending => None,
                Enrichment::NotStarted => {
                    // With GATT on, a device is only reported once its read finished.
                    s.gatt
                        .is_none()
                        .then(|| to_device(&t.obs, &t.adapter, None))
                }
                Enrichment::Done(info) => Some(to_device(&t.obs, &t.adapter, info.as_ref())),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        // Two resolvable addresses of one device resolve to one identity id: report it once.
        out.dedup_by(|a, b| a.id == b.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn obs(addr: u8, name: &str) -> Observation {
        Observation::from_raw(&RawAdvertisement {
            address: [0x11, 0x22, 0x33, 0x44, 0x55, addr],
            address_type: Some(AddressKind::Public),
            name: Some(name.as_bytes()),
            rssi: Some(-60),
            ..Default::default()
        })
    }

    fn tracker(details: &str) -> Tracker {
        Tracker::new(Arc::new(Compiled::parse(details).expect("settings")))
    }

    #[test]
    fn sanitizing() {
        assert_eq!(
            sanitize_text(b"\xff\xfeab\0c\n", 100).as_deref(),
            Some("\u{fffd}\u{fffd}abc")
        );
        assert_eq!(sanitize_text(b"  \0 ", 100), None);
        assert_eq!(sanitize_text("ééé".as_bytes(), 5).as_deref(), Some("éé"));
        let huge = vec![7u8; 100_000];
        let o = Observation::from_raw(&RawAdvertisement {
            manufacturer_data: vec![(1, &huge)],
            name: Some(&huge),
            ..Default::default()
        });
        assert_eq!(o.manufacturer_data[&1].len(), MAX_DATA_BYTES);
        assert!(o.name.is_none(), "all control characters");
    }

    #[test]
    fn filters_each_way() {
        let o = {
            let mut o = obs(1, "Sensor-1");
            o.services
                .insert(crate::settings::parse_uuid("180d").expect("uuid"));
            o.manufacturer_data.insert(0x4c, vec![0x02, 0x15, 0x01]);
            o
        };
        for (details, expected) in [
            ("", true),
            ("serviceUuids: {action: Include, items: ['180d']}", true),
            ("serviceUuids: {action: Include, items: ['180f']}", false),
            ("serviceUuids: {action: Exclude, items: ['180d']}", false),
            (
                "serviceDataUuids: {action: Include, items: ['180d']}",
                false,
            ),
            ("localName: {action: Include, items: [Sensor-1]}", true),
            (
                "localName: {action: Include, items: ['Sensor-*'], match: Glob}",
                true,
            ),
            (
                "localName: {action: Include, items: ['^Lamp'], match: Regex}",
                false,
            ),
            (
                "localName: {action: Exclude, items: ['^Sen'], match: Regex}",
                false,
            ),
            (
                "manufacturerData: {action: Include, items: [{id: 76}]}",
                true,
            ),
            (
                "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '0215'}]}",
                true,
            ),
            (
                "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '0216'}]}",
                false,
            ),
            (
                "manufacturerData: {action: Exclude, items: [{id: 76}]}",
                false,
            ),
            (
                "addresses: {action: Include, items: ['11:22:33:44:55:01']}",
                true,
            ),
            (
                "addresses: {action: Exclude, items: ['11:22:33:44:55:01']}",
                false,
            ),
            ("addressTypes: {action: Include, items: [random]}", false),
        ] {
            let c = Compiled::parse(details).expect(details);
            assert_eq!(o.passes(&c), expected, "{details}");
        }
    }

    #[test]
    fn rssi_hysteresis() {
        assert!(!rssi_present(false, Some(-72), Some(-70), 5));
        assert!(rssi_present(false, Some(-70), Some(-70), 5));
        assert!(rssi_present(true, Some(-74), Some(-70), 5));
        assert!(!rssi_present(true, Some(-76), Some(-70), 5));
        assert!(rssi_present(true, None, Some(-70), 5));
        assert!(!rssi_present(false, None, Some(-70), 5));
        assert!(rssi_present(false, None, None, 5));
    }

    #[test]
    fn rssi_changes_do_not_change_the_list() {
        let mut t = tracker("");
        let now = Instant::now();
        t.observe(obs(1, "a"), "hci0", now);
        let first = t.devices();
        let mut o = obs(1, "a");
        o.rssi = Some(-30);
        o.manufacturer_data.insert(5, vec![1]);
        t.observe(o.clone(), "hci0", now);
        let second = t.devices();
        assert_ne!(first, second, "a new manufacturer id is described");
        o.rssi = Some(-90);
        o.manufacturer_data.insert(5, vec![2, 3]);
        t.observe(o, "hci0", now);
        assert_eq!(second, t.devices(), "RSSI and data bytes are not");
    }

    #[test]
    fn expiry_and_gatt_holdback() {
        let mut t = tracker("lostAfterSeconds: 2\ngatt: {deviceInformation: true}");
        let now = Instant::now();
        assert!(t.observe(obs(1, "a"), "hci0", now));
        assert!(!t.observe(obs(1, "a"), "hci0", now), "started once");
        assert!(t.devices().is_empty(), "held back while reading");
        t.enriched(
            [0x11, 0x22, 0x33, 0x44, 0x55, 1],
            Some(DeviceInformation {
                serial: Some("S1".into()),
                ..Default::default()
            }),
        );
        let d = t.devices();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].properties[PROP_GATT_SERIAL], "S1");
        assert_eq!(
            d[0].id, "11:22:33:44:55:01",
            "public address: the address is the id"
        );
        assert!(!t.expire(now + Duration::from_secs(1)));
        assert!(t.expire(now + Duration::from_secs(2)));
        assert!(t.devices().is_empty());
    }

    #[test]
    fn resolvable_private_address_takes_the_identity() {
        let mut o = obs(1, "a");
        o.address = [0x4a, 1, 2, 3, 4, 5];
        o.address_type = Some(AddressKind::Random);
        let info = DeviceInformation {
            manufacturer: Some("Acme Inc".into()),
            model: Some("M-1".into()),
            serial: Some("SN/9".into()),
            firmware: None,
        };
        assert_eq!(device_id(&o, Some(&info)), "ble-serial-Acme_Inc-M_1-SN_9");
        assert_eq!(device_id(&o, None), "4A:01:02:03:04:05");
        o.address = [0xca, 1, 2, 3, 4, 5];
        assert_eq!(
            device_id(&o, Some(&info)),
            "CA:01:02:03:04:05",
            "static random"
        );
    }

    #[test]
    fn table_is_bounded() {
        let mut t = tracker("");
        let now = Instant::now();
        for i in 0..(MAX_TRACKED_DEVICES as u32 + 10) {
            let b = i.to_be_bytes();
            let mut o = obs(0, "x");
            o.address = [0, 0, b[0], b[1], b[2], b[3]];
            t.observe(o, "hci0", now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(t.devices().len(), MAX_TRACKED_DEVICES);
    }
}
