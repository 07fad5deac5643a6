//! The `ble` handler against python-dbusmock's BlueZ on a private system bus.

mod common;

use std::time::{Duration, Instant};

use common::*;
use verge_ble::{
    Ble, DIAGNOSTIC_SUBJECT, PROP_ADAPTER, PROP_ADDRESS, PROP_ADDRESS_TYPE, PROP_GATT_FIRMWARE,
    PROP_GATT_MANUFACTURER, PROP_GATT_MODEL, PROP_GATT_SERIAL, PROP_MANUFACTURER_ID, PROP_NAME,
    PROP_SERVICE_UUIDS,
};
use verge_discovery_sdk::{DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest};

const WAIT: Duration = Duration::from_secs(15);

async fn discover(details: &str) -> DeviceStream {
    Ble::new()
        .discover(DiscoveryRequest {
            details: details.to_string(),
            properties: Default::default(),
        })
        .await
        .expect("discover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_known_at_start_and_added_while_scanning() {
    if !in_own_process("devices_known_at_start_and_added_while_scanning") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    bus.add_device("11:22:33:44:55:01", "Sensor-1");
    let mut s = discover("").await;
    let u = next_matching(&mut s, WAIT, "the known device", |u| {
        has(u, "11:22:33:44:55:01")
    })
    .await;
    let d = &u.devices[0];
    assert_eq!(d.properties[PROP_ADDRESS], "11:22:33:44:55:01");
    assert_eq!(d.properties[PROP_ADDRESS_TYPE], "public");
    assert_eq!(d.properties[PROP_NAME], "Sensor-1");
    assert_eq!(d.properties[PROP_ADAPTER], "hci0");
    assert!(u.diagnostics.is_empty(), "{:?}", u.diagnostics);

    bus.add_device("11:22:33:44:55:02", "Sensor-2");
    let u = next_matching(&mut s, WAIT, "the added device", |u| {
        has(u, "11:22:33:44:55:02")
    })
    .await;
    assert_eq!(ids(&u), ["11:22:33:44:55:01", "11:22:33:44:55:02"]);
}

/// One filter case: `excluded` is advertised first, then `included`; once
/// (btleplug reports name and address-type changes only with another change, as
/// an advertisement brings, so those updates carry an RSSI too)
/// `included` is listed, `excluded` has been processed, so its absence counts.
struct Case {
    details: &'static str,
    excluded: (&'static str, &'static str),
    included: (&'static str, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_includes_and_excludes() {
    if !in_own_process("each_filter_includes_and_excludes") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let cases = [
        Case {
            details: "serviceUuids: {action: Include, items: ['180d']}",
            excluded: (
                "{'UUIDs': <['0000180f-0000-1000-8000-00805f9b34fb']>}",
                "A0",
            ),
            included: (
                "{'UUIDs': <['0000180d-0000-1000-8000-00805f9b34fb']>}",
                "A1",
            ),
        },
        Case {
            details: "serviceUuids: {action: Exclude, items: ['180f']}",
            excluded: (
                "{'UUIDs': <['0000180f-0000-1000-8000-00805f9b34fb']>}",
                "A2",
            ),
            included: (
                "{'UUIDs': <['0000180d-0000-1000-8000-00805f9b34fb']>}",
                "A3",
            ),
        },
        Case {
            details: "localName: {action: Include, items: ['Sensor-*'], match: Glob}",
            excluded: ("{'Name': <'Lamp-1'>, 'RSSI': <int16 -60>}", "A4"),
            included: ("{'Name': <'Sensor-9'>, 'RSSI': <int16 -60>}", "A5"),
        },
        Case {
            details: "localName: {action: Exclude, items: ['^Lamp'], match: Regex}",
            excluded: ("{'Name': <'Lamp-1'>, 'RSSI': <int16 -60>}", "A6"),
            included: ("{'Name': <'Sensor-9'>, 'RSSI': <int16 -60>}", "A7"),
        },
        Case {
            details: "localName: {action: Include, items: [Exact-Name]}",
            excluded: ("{'Name': <'Exact-Name-2'>, 'RSSI': <int16 -60>}", "A8"),
            included: ("{'Name': <'Exact-Name'>, 'RSSI': <int16 -60>}", "A9"),
        },
        Case {
            details: "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '02 15'}]}",
            excluded: (
                "{'ManufacturerData': <{uint16 76: <[byte 0x02, 0x16]>}>}",
                "B0",
            ),
            included: (
                "{'ManufacturerData': <{uint16 76: <[byte 0x02, 0x15, 0xaa]>}>}",
                "B1",
            ),
        },
        Case {
            details: "manufacturerData: {action: Exclude, items: [{id: 89}]}",
            excluded: ("{'ManufacturerData': <{uint16 89: <[byte 0x01]>}>}", "B2"),
            included: ("{'ManufacturerData': <{uint16 76: <[byte 0x01]>}>}", "B3"),
        },
        Case {
            details: "serviceDataUuids: {action: Include, items: ['fe95']}",
            excluded: (
                "{'ServiceData': <{'0000feaa-0000-1000-8000-00805f9b34fb': <[byte 0x01]>}>}",
                "B4",
            ),
            included: (
                "{'ServiceData': <{'0000fe95-0000-1000-8000-00805f9b34fb': <[byte 0x01]>}>}",
                "B5",
            ),
        },
        Case {
            details: "minRssi: -70",
            excluded: ("{'RSSI': <int16 -75>}", "B6"),
            included: ("{'RSSI': <int16 -65>}", "B7"),
        },
        Case {
            details: "addressTypes: {action: Exclude, items: [random]}",
            excluded: ("{'AddressType': <'random'>, 'RSSI': <int16 -60>}", "B8"),
            included: ("{'AddressType': <'public'>, 'RSSI': <int16 -60>}", "B9"),
        },
        Case {
            details: "addresses: {action: Include, items: ['aa:00:00:00:00:c1']}",
            excluded: ("{'RSSI': <int16 -50>}", "C0"),
            included: ("{'RSSI': <int16 -50>}", "C1"),
        },
    ];
    for case in &cases {
        let mut s = discover(case.details).await;
        // The stream's first list (devices from earlier cases) is sent once scanning runs.
        next(&mut s, WAIT).await;
        let excluded = format!("AA:00:00:00:00:{}", case.excluded.1);
        let included = format!("AA:00:00:00:00:{}", case.included.1);
        bus.add_device(&excluded, "x");
        bus.update(&excluded, case.excluded.0);
        bus.add_device(&included, "x");
        bus.update(&included, case.included.0);
        let u = next_matching(&mut s, WAIT, case.details, |u| has(u, &included)).await;
        assert!(!has(&u, &excluded), "{}: {:?}", case.details, ids(&u));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rssi_hysteresis_keeps_a_device_at_the_edge() {
    if !in_own_process("rssi_hysteresis_keeps_a_device_at_the_edge") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let mut s = discover("minRssi: -70\nrssiHysteresis: 5").await;
    next(&mut s, WAIT).await;
    let edge = "11:22:33:44:55:E1";
    bus.add_device(edge, "edge");
    bus.update(edge, "{'RSSI': <int16 -68>}");
    next_matching(&mut s, WAIT, "the device in range", |u| has(u, edge)).await;
    // Below minRssi but within the hysteresis: still present. A sentinel heard
    // afterwards proves the weak advertisement was processed.
    bus.update(edge, "{'RSSI': <int16 -73>}");
    let sentinel = "11:22:33:44:55:E2";
    bus.add_device(sentinel, "sentinel");
    bus.update(sentinel, "{'RSSI': <int16 -40>}");
    let u = next_matching(&mut s, WAIT, "the sentinel", |u| has(u, sentinel)).await;
    assert!(has(&u, edge), "within hysteresis: {:?}", ids(&u));
    bus.update(edge, "{'RSSI': <int16 -76>}");
    let u = next_matching(&mut s, WAIT, "the weak device gone", |u| !has(u, edge)).await;
    assert!(has(&u, sentinel));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_described_fields_change_the_list() {
    if !in_own_process("only_described_fields_change_the_list") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let addr = "11:22:33:44:55:C3";
    bus.add_device(addr, "Changing");
    let mut s = discover("").await;
    next_matching(&mut s, WAIT, "the device", |u| has(u, addr)).await;

    bus.update(addr, "{'ManufacturerData': <{uint16 76: <[byte 0x01]>}>}");
    let u = next(&mut s, WAIT).await;
    assert_eq!(u.devices[0].properties[PROP_MANUFACTURER_ID], "0x004c");

    // RSSI and manufacturer data bytes are not described: no new list for them.
    bus.update(addr, "{'RSSI': <int16 -30>}");
    bus.update(
        addr,
        "{'ManufacturerData': <{uint16 76: <[byte 0x09, 0x09, 0x09]>}>}",
    );
    bus.update(addr, "{'RSSI': <int16 -90>}");
    // A new service UUID is: the very next list must be the one that has it.
    bus.update(
        addr,
        "{'UUIDs': <['0000180d-0000-1000-8000-00805f9b34fb']>}",
    );
    let u = next(&mut s, WAIT).await;
    assert_eq!(
        u.devices[0]
            .properties
            .get(PROP_SERVICE_UUIDS)
            .map(String::as_str),
        Some("0000180d-0000-1000-8000-00805f9b34fb"),
        "a list was sent for an RSSI or data-only change"
    );
    // The name is described too.
    bus.update(addr, "{'Name': <'Renamed'>, 'RSSI': <int16 -50>}");
    let u = next(&mut s, WAIT).await;
    assert_eq!(u.devices[0].properties[PROP_NAME], "Renamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_lost_after_the_timeout() {
    if !in_own_process("a_silent_device_is_lost_after_the_timeout") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let silent = "11:22:33:44:55:D1";
    let chatty = "11:22:33:44:55:D2";
    bus.add_device(silent, "silent");
    bus.add_device(chatty, "chatty");
    let mut s = discover("lostAfterSeconds: 2").await;
    next_matching(&mut s, WAIT, "both devices", |u| {
        has(u, silent) && has(u, chatty)
    })
    .await;
    let last_heard = Instant::now();
    // The chatty one keeps advertising (RSSI updates) while the silent one expires.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = bus.address.clone();
    let stopper = stop.clone();
    let advertiser = std::thread::spawn(move || {
        let mut rssi = -50i16;
        while !stopper.load(std::sync::atomic::Ordering::Relaxed) {
            rssi = if rssi == -50 { -51 } else { -50 };
            let _ = std::process::Command::new("gdbus")
                .args(["call", "--system", "-d", "org.bluez", "-o"])
                .arg(device_path("11:22:33:44:55:D2"))
                .args([
                    "-m",
                    "org.freedesktop.DBus.Mock.UpdateProperties",
                    "org.bluez.Device1",
                ])
                .arg(format!("{{'RSSI': <int16 {rssi}>}}"))
                .env("DBUS_SYSTEM_BUS_ADDRESS", &addr)
                .output();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let u = next_matching(&mut s, WAIT, "the silent device gone", |u| !has(u, silent)).await;
    let gone_after = last_heard.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = advertiser.join();
    assert!(
        has(&u, chatty),
        "an advertising device stays: {:?}",
        ids(&u)
    );
    assert!(
        gone_after >= Duration::from_millis(1500) && gone_after < Duration::from_secs(5),
        "lost after {gone_after:?}, expected about 2 s"
    );
    eprintln!(
        "silent device lost {gone_after:?} after its last advertisement (lostAfterSeconds: 2)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatt_reads_device_information_and_disconnects() {
    if !in_own_process("gatt_reads_device_information_and_disconnects") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let public = "11:22:33:44:55:F1";
    // A resolvable private address (random, top bits 01) with a serial: the id is the identity.
    let private = "4A:22:33:44:55:F2";
    bus.add_device(public, "Thermo");
    bus.add_device_information(
        public,
        &[
            (0x2a29, "Acme"),
            (0x2a24, "T-100"),
            (0x2a25, "SN123"),
            (0x2a26, "1.2.3"),
        ],
    );
    bus.add_device(private, "Phone");
    bus.update(private, "{'AddressType': <'random'>, 'RSSI': <int16 -60>}");
    bus.add_device_information(private, &[(0x2a29, "Acme"), (0x2a25, "SN999")]);
    let started = Instant::now();
    let mut s = discover("gatt: {deviceInformation: true, timeoutSeconds: 5}").await;
    let u = next_matching(&mut s, WAIT, "both enriched devices", |u| {
        u.devices.len() == 2
    })
    .await;
    eprintln!("two GATT reads done in {:?}", started.elapsed());
    let d = u
        .devices
        .iter()
        .find(|d| d.id == public)
        .unwrap_or_else(|| panic!("{:?}", ids(&u)));
    assert_eq!(d.properties[PROP_GATT_MANUFACTURER], "Acme");
    assert_eq!(d.properties[PROP_GATT_MODEL], "T-100");
    assert_eq!(d.properties[PROP_GATT_SERIAL], "SN123");
    assert_eq!(d.properties[PROP_GATT_FIRMWARE], "1.2.3");
    assert!(has(&u, "ble-serial-Acme--SN999"), "{:?}", ids(&u));
    for addr in [public, private] {
        assert!(
            bus.get(addr, "Connected").contains("false"),
            "{addr} left connected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bus_no_bluez_no_adapter_then_recovery() {
    if !in_own_process("no_bus_no_bluez_no_adapter_then_recovery") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let mut bus = MockBus::unstarted();
    let mut s = discover("").await;
    let diagnosis = |u: &verge_discovery_sdk::DiscoveryUpdate, needle: &str| {
        u.devices.is_empty()
            && u.diagnostics.len() == 1
            && u.diagnostics[0].subject == DIAGNOSTIC_SUBJECT
            && u.diagnostics[0].severity == "Error"
            && u.diagnostics[0].message.contains(needle)
    };
    let u = next(&mut s, WAIT).await;
    assert!(diagnosis(&u, "D-Bus"), "{u:?}");
    bus.start_daemon();
    let u = next(&mut s, WAIT).await;
    assert!(diagnosis(&u, "BlueZ"), "{u:?}");
    bus.start_bluez();
    let u = next(&mut s, WAIT).await;
    assert!(diagnosis(&u, "no Bluetooth adapter"), "{u:?}");
    bus.add_adapter("hci0");
    bus.add_device("11:22:33:44:55:B1", "Back");
    let u = next_matching(&mut s, WAIT, "recovery", |u| has(u, "11:22:33:44:55:B1")).await;
    assert!(u.diagnostics.is_empty(), "{u:?}");
    // BlueZ going away is reported again, and the devices go with it.
    bus.stop_bluez();
    let u = next_matching(&mut s, WAIT, "BlueZ gone", |u| !u.diagnostics.is_empty()).await;
    assert!(u.devices.is_empty(), "{u:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_advertisements_do_not_break_discovery() {
    if !in_own_process("malformed_advertisements_do_not_break_discovery") {
        return;
    }
    let _guard = LOCK.lock().await;
    if !peer_available() {
        return;
    }
    let bus = MockBus::with_adapter();
    let mut s = discover("").await;
    next(&mut s, WAIT).await;
    let hostile = "11:22:33:44:55:66";
    bus.add_device(hostile, "x");
    let huge = "a".repeat(100_000);
    bus.update(
        hostile,
        &format!(
            "{{'ManufacturerData': <{{uint16 65535: <b'{huge}'>, uint16 0: <@ay []>, uint16 1: <[byte 0x01, 0x02, 0x03]>}}>, \
             'Name': <'\\u0001\\u001b[31mbad\\u0007name\\u00ff'>, \
             'ServiceData': <{{'not-a-uuid': <[byte 0x01]>, '0000fe95-0000-1000-8000-00805f9b34fb': <@ay []>}}>, \
             'UUIDs': <['0000180d-0000-1000-8000-00805f9b34fb', 'garbage']>}}"
        ),
    );
    let good = "11:22:33:44:55:77";
    bus.add_device(good, "good");
    let u = next_matching(&mut s, WAIT, "the good device after the hostile one", |u| {
        has(u, good)
    })
    .await;
    if let Some(d) = u.devices.iter().find(|d| d.id == hostile) {
        let name = &d.properties[PROP_NAME];
        assert!(!name.chars().any(char::is_control), "{name:?}");
        assert!(name.len() <= 248);
    }
    // Still alive: a later change is reported.
    bus.update(good, "{'Name': <'still-good'>}");
    bus.update(good, "{'RSSI': <int16 -20>}");
    next_matching(&mut s, WAIT, "the rename", |u| {
        u.devices
            .iter()
            .any(|d| d.properties.get(PROP_NAME).map(String::as_str) == Some("still-good"))
    })
    .await;
}

#[tokio::test]
async fn invalid_settings_are_refused_up_front() {
    let e = Ble::new()
        .discover(DiscoveryRequest {
            details: "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '123'}]}"
                .into(),
            properties: Default::default(),
        })
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, DiscoveryError::InvalidSettings(m) if m.contains("odd")));
}
