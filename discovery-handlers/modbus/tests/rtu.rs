//! modbus-rtu over a socat pty pair against a pymodbus RTU server.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use verge_modbus::ModbusRtu;

async fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_units_found_with_the_serial_device_spec() {
    if !peers_ready("rtu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server_end = dir.path().join("line0-server");
    let client_end = dir.path().join("ttyVG0");
    let _socat = Peer::spawn(
        "socat",
        Command::new("socat").args([
            format!("pty,raw,echo=0,link={}", server_end.display()),
            format!("pty,raw,echo=0,link={}", client_end.display()),
        ]),
    );
    wait_for(&server_end).await;
    wait_for(&client_end).await;
    // Parity None: this machine's pty driver refuses PARENB (tcsetattr EINVAL).
    let _server = pymodbus(
        "pymodbus-rtu",
        json!({
            "rtu": server_end.display().to_string(), "baud": 19200, "parity": "N", "missing": "silent",
            "units": {
                "2": {"identity": {"0": "SerialCo", "1": "S-2", "2": "3.1", "5": "RS"}},
                "5": {"identity": null, "co": {"0": [1, 0, 1]}},
                "6": {"identity": null}
            }
        }),
    );
    let h = ModbusRtu::default();
    let details = format!(
        "ports: [\"{}/tty*\"]\nbaudRates: [19200]\nparity: None\nunitIds: [\"1-7\"]\nrequestTimeoutMillis: 250\nrescanIntervalSeconds: 1\nprobes:\n- {{name: relay3, kind: coils, address: 0, expect: [1, 0, 1]}}\n",
        dir.path().display()
    );
    let mut stream = discover(&h, &details).await;
    // The server may still be starting at the first pass: wait for both units.
    let devices = until(&mut stream, Duration::from_secs(30), "two RTU units", |d| {
        d.len() == 2
    })
    .await;
    let port = client_end.display().to_string();
    let unit = |u: &str| {
        devices
            .iter()
            .find(|d| prop(d, "MODBUS_UNIT_ID") == Some(u))
            .unwrap_or_else(|| panic!("unit {u}"))
    };
    let u2 = unit("2");
    assert_eq!(prop(u2, "MODBUS_TRANSPORT"), Some("rtu"));
    assert_eq!(prop(u2, "MODBUS_SERIAL_PORT"), Some(port.as_str()));
    assert_eq!(prop(u2, "MODBUS_BAUD"), Some("19200"));
    assert_eq!(prop(u2, "MODBUS_PARITY"), Some("None"));
    assert_eq!(prop(u2, "MODBUS_VENDOR"), Some("SerialCo"));
    assert_eq!(prop(u2, "MODBUS_MODEL"), Some("RS"));
    assert_eq!(u2.id, format!("vendor=SerialCo;product=S-2@rtu://{port}/2"));
    assert_eq!(u2.device_specs.len(), 1);
    assert_eq!(u2.device_specs[0].host_path, port);
    assert_eq!(u2.device_specs[0].container_path, port);
    assert_eq!(u2.device_specs[0].permissions, "rw");
    let u5 = unit("5");
    assert_eq!(prop(u5, "MODBUS_PROBE"), Some("relay3"));
    assert_eq!(prop(u5, "MODBUS_VENDOR"), None);
    assert_eq!(u5.device_specs.len(), 1);
}
