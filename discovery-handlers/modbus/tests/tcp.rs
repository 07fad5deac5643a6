//! modbus-tcp against pymodbus servers and the libmodbus server on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use verge_discovery_sdk::DiscoveryHandler;
use verge_modbus::ModbusTcp;

const WAIT: Duration = Duration::from_secs(20);

/// Server A: identified units 1 and 2, a probe-only unit 3, a unit 4 that exists
/// but neither identifies itself nor matches; unknown units get exception 0x0B.
fn server_a(port: u16) -> Peer {
    pymodbus(
        "pymodbus-a",
        json!({
            "tcp": format!("127.0.0.1:{port}"),
            "missing": "gateway",
            "units": {
                "1": {"identity": {"0": "ACME", "1": "PA-1", "2": "1.2", "3": "https://acme.invalid", "4": "Pump", "5": "M-A"},
                      "hr": {"0": [11, 12]}},
                "2": {"identity": {"0": "Other", "1": "PB-2", "2": "2.0", "5": "M-B"}, "hr": {"100": [48879, 1]}},
                "3": {"identity": null, "hr": {"100": [48879, 5]}},
                "4": {"identity": null, "hr": {"100": [1, 2]}}
            }
        }),
    )
}

/// Server B: one identified unit; unknown units stay silent.
fn server_b(port: u16) -> Peer {
    pymodbus(
        "pymodbus-b",
        json!({
            "tcp": format!("127.0.0.1:{port}"),
            "missing": "silent",
            "units": {"1": {"identity": {"0": "ZETA", "1": "PZ-9", "2": "0.1", "5": "Z"}}}
        }),
    )
}

fn details(ports: &[u16], extra: &str) -> String {
    format!(
        "hosts: [127.0.0.1]\nports: {ports:?}\nunitIds: [\"1-6\"]\nrequestTimeoutMillis: 300\nconnectTimeoutMillis: 500\nrescanIntervalSeconds: 1\nprobes:\n- {{name: meter, kind: holdingRegisters, address: 100, count: 2, expect: [48879, 0], mask: [65535, 0]}}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identification_probes_exceptions_silence_and_a_server_going_away() {
    if !peers_ready("tcp") {
        return;
    }
    let (pa, pb) = (free_port(), free_port());
    let _a = server_a(pa);
    let mut b = server_b(pb);
    wait_listening(pa).await;
    wait_listening(pb).await;

    let h = ModbusTcp::default();
    let started = Instant::now();
    let mut stream = discover(&h, &details(&[pa, pb], "")).await;
    let first = next(&mut stream, WAIT).await;
    let took = started.elapsed();
    let devices = first.devices;
    assert_eq!(devices.len(), 4, "{:#?}", ids(&devices));
    // 5 silent units on B at 300 ms, over 4 connections, plus 0x0B answers on A:
    // well under the 12 units × 300 ms a sequential scan of the silences would take.
    assert!(took < Duration::from_secs(3), "first scan took {took:?}");

    let a1 = by_unit(&devices, pa, 1).expect("A unit 1");
    assert_eq!(prop(a1, "MODBUS_TRANSPORT"), Some("tcp"));
    assert_eq!(prop(a1, "MODBUS_HOST"), Some("127.0.0.1"));
    assert_eq!(prop(a1, "MODBUS_VENDOR"), Some("ACME"));
    assert_eq!(prop(a1, "MODBUS_PRODUCT_CODE"), Some("PA-1"));
    assert_eq!(prop(a1, "MODBUS_REVISION"), Some("1.2"));
    assert_eq!(prop(a1, "MODBUS_MODEL"), Some("M-A"));
    assert_eq!(prop(a1, "MODBUS_PRODUCT_NAME"), Some("Pump"));
    assert_eq!(prop(a1, "MODBUS_VENDOR_URL"), Some("https://acme.invalid"));
    assert_eq!(prop(a1, "MODBUS_PROBE"), None, "unit 1 has no register 100");
    assert!(
        a1.id
            .starts_with("vendor=ACME;product=PA-1@tcp://127.0.0.1:"),
        "{}",
        a1.id
    );

    let a2 = by_unit(&devices, pa, 2).expect("A unit 2");
    assert_eq!(prop(a2, "MODBUS_VENDOR"), Some("Other"));
    assert_eq!(
        prop(a2, "MODBUS_PROBE"),
        Some("meter"),
        "masked compare ignores the second register"
    );

    let a3 = by_unit(&devices, pa, 3).expect("probe-only unit 3");
    assert_eq!(prop(a3, "MODBUS_VENDOR"), None);
    assert_eq!(prop(a3, "MODBUS_PROBE"), Some("meter"));
    assert!(a3.id.starts_with("probe=meter@tcp://"), "{}", a3.id);

    assert!(
        by_unit(&devices, pa, 4).is_none(),
        "unit 4 neither identifies nor matches"
    );
    let b1 = by_unit(&devices, pb, 1).expect("B unit 1");
    assert_eq!(prop(b1, "MODBUS_VENDOR"), Some("ZETA"));
    assert_eq!(prop(b1, "MODBUS_UNIT_ID"), Some("1"));

    // The same scan again changes nothing, so nothing is sent.
    assert!(
        tokio::time::timeout(
            Duration::from_millis(2500),
            futures::StreamExt::next(&mut stream)
        )
        .await
        .is_err(),
        "an unchanged list was sent again"
    );

    // B goes away: its unit disappears at the next pass.
    b.kill();
    let gone = Instant::now();
    let after = until(&mut stream, WAIT, "B's unit gone", |d| {
        by_unit(d, pb, 1).is_none()
    })
    .await;
    assert_eq!(after.len(), 3, "{:#?}", ids(&after));
    println!("server gone → device gone in {:?}", gone.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_on_vendor_product_model_and_probe() {
    if !peers_ready("tcp") {
        return;
    }
    let pa = free_port();
    let _a = server_a(pa);
    wait_listening(pa).await;
    let h = ModbusTcp::default();
    let cases: [(&str, &[u8]); 5] = [
        ("filters: {vendors: {action: Include, items: [ACME]}}", &[1]),
        (
            "filters: {productCodes: {action: Exclude, items: [PA-1]}}",
            &[2, 3],
        ),
        ("filters: {models: {action: Include, items: [M-B]}}", &[2]),
        (
            "filters: {probes: {action: Include, items: [meter]}}",
            &[2, 3],
        ),
        (
            "filters: {probes: {action: Exclude, items: [meter]}, vendors: {action: Exclude, items: [Nobody]}}",
            &[1],
        ),
    ];
    for (filter, units) in cases {
        let mut stream = discover(&h, &details(&[pa], filter)).await;
        let devices = next(&mut stream, WAIT).await.devices;
        let mut got: Vec<u8> = devices
            .iter()
            .filter_map(|d| prop(d, "MODBUS_UNIT_ID").and_then(|u| u.parse().ok()))
            .collect();
        got.sort();
        assert_eq!(got, units, "{filter}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmodbus_server_without_identification() {
    if !peers_ready("tcp") {
        return;
    }
    let port = free_port();
    let _s = Peer::spawn(
        "libmodbus",
        std::process::Command::new(libmodbus_server()).args(["127.0.0.1", &port.to_string()]),
    );
    wait_listening(port).await;
    let h = ModbusTcp::default();
    // libmodbus serves one connection at a time: one connection per endpoint.
    let base = format!(
        "hosts: [127.0.0.1]\nports: [{port}]\nunitIds: [1]\nconnectionsPerEndpoint: 1\nrequestTimeoutMillis: 500\n"
    );
    // Identification is refused with IllegalFunction: a unit, but not a device without a probe.
    let mut plain = discover(&h, &base).await;
    assert!(next(&mut plain, WAIT).await.devices.is_empty());
    drop(plain);
    let probed = format!(
        "{base}probes:\n- {{name: libmodbus-lb, kind: holdingRegisters, address: 0, expect: [19522]}}\n- {{name: other, kind: inputRegisters, address: 0, expect: [1]}}\n"
    );
    let mut stream = discover(&h, &probed).await;
    let devices = until(&mut stream, WAIT, "libmodbus unit by probe", |d| {
        !d.is_empty()
    })
    .await;
    assert_eq!(devices.len(), 1);
    let d = &devices[0];
    assert_eq!(prop(d, "MODBUS_PROBE"), Some("libmodbus-lb"));
    assert_eq!(prop(d, "MODBUS_PROBES"), Some("libmodbus-lb"));
    assert_eq!(prop(d, "MODBUS_VENDOR"), None);
    assert_eq!(d.id, format!("probe=libmodbus-lb@tcp://127.0.0.1:{port}/1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_with_the_field() {
    let h = ModbusTcp::default();
    for (details, needle) in [
        ("hostz: [a]", "hostz"),
        ("cidrs: [10.0.0.0/8]", "maxAddresses"),
        (
            "hosts: [a]\nprobes: [{name: x, kind: coils, address: 0, expect: [7]}]",
            "coils",
        ),
        ("hosts: [a]\nidentification: {enabled: false}", "no probes"),
    ] {
        let r = h
            .discover(verge_discovery_sdk::DiscoveryRequest {
                details: details.into(),
                properties: Default::default(),
            })
            .await;
        match r {
            Err(verge_discovery_sdk::DiscoveryError::InvalidSettings(m)) => {
                assert!(m.contains(needle), "{details}: {m}")
            }
            Err(e) => panic!("{details}: wrong error {e}"),
            Ok(_) => panic!("{details}: accepted"),
        }
    }
}
