//! Arbitrary advertisement content through sanitizing, every filter, the
//! tracker and the property builder: no panic, bounded output.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use verge_ble::Compiled;
use verge_ble::advert::{
    DeviceInformation, MAX_DATA_BYTES, MAX_ENTRIES, MAX_NAME_BYTES, Observation, RawAdvertisement,
    Tracker, to_device,
};
use verge_ble::settings::AddressKind;

const SETTINGS: &str = "
serviceUuids: {action: Include, items: ['180d', '0000fe95-0000-1000-8000-00805f9b34fb']}
localName: {action: Exclude, items: ['^x+$'], match: Regex}
manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '0215'}, {id: 0}]}
serviceDataUuids: {action: Exclude, items: ['feaa']}
addressTypes: {action: Include, items: [public, random]}
minRssi: -80
";

fn settings() -> &'static [Arc<Compiled>; 2] {
    static S: OnceLock<[Arc<Compiled>; 2]> = OnceLock::new();
    S.get_or_init(|| {
        [
            Arc::new(Compiled::parse(SETTINGS).unwrap_or_default()),
            Arc::new(Compiled::parse("gatt: {deviceInformation: true}").unwrap_or_default()),
        ]
    })
}

/// Reads a length-prefixed slice.
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&n, rest)) = data.split_first() else {
        return &[];
    };
    let n = usize::from(n).min(rest.len());
    let (head, tail) = rest.split_at(n);
    *data = tail;
    head
}

fn uuid(bytes: &[u8]) -> uuid::Uuid {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    uuid::Uuid::from_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut d = data;
    let mut address = [0u8; 6];
    address.copy_from_slice(&{
        let a = take(&mut d);
        let mut x = [0u8; 6];
        for (t, s) in x.iter_mut().zip(a) {
            *t = *s;
        }
        x
    });
    let flags = take(&mut d).first().copied().unwrap_or(0);
    let address_type = match flags % 3 {
        0 => None,
        1 => Some(AddressKind::Public),
        _ => Some(AddressKind::Random),
    };
    let name = (flags & 4 != 0).then(|| take(&mut d));
    let rssi = take(&mut d)
        .first()
        .map(|b| i16::from(*b as i8));
    let mut raw = RawAdvertisement {
        address,
        address_type,
        name,
        rssi,
        ..Default::default()
    };
    // The rest: tagged entries (0 = service, 1 = manufacturer data, 2 = service data).
    while !d.is_empty() {
        let tag = d[0];
        d = &d[1..];
        let body = take(&mut d);
        match tag % 3 {
            0 => raw.services.push(uuid(body)),
            1 => {
                let id = u16::from_le_bytes([
                    body.first().copied().unwrap_or(0),
                    body.get(1).copied().unwrap_or(0),
                ]);
                raw.manufacturer_data.push((id, body.get(2..).unwrap_or(&[])));
            }
            _ => raw.service_data.push((uuid(body), body)),
        }
    }
    let obs = Observation::from_raw(&raw);
    assert!(obs.name.as_ref().is_none_or(|n| n.len() <= MAX_NAME_BYTES));
    assert!(obs.services.len() <= MAX_ENTRIES);
    assert!(obs.manufacturer_data.values().all(|v| v.len() <= MAX_DATA_BYTES));
    let info = DeviceInformation {
        serial: obs.name.clone(),
        ..Default::default()
    };
    let device = to_device(&obs, "hci0", Some(&info));
    assert!(!device.id.is_empty());
    let now = Instant::now();
    for s in settings() {
        let _ = obs.passes(s);
        let mut t = Tracker::new(s.clone());
        if t.observe(obs.clone(), "hci0", now) {
            t.enriched(obs.address, Some(info.clone()));
        }
        let _ = t.devices();
        t.expire(now + Duration::from_secs(3600));
        assert!(t.devices().is_empty());
    }
});
