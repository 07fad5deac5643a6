//! The standalone `verge-modbus-discovery` binary as an external `v0` handler: started with
//! `--transport both`, it serves modbus-tcp and modbus-rtu on their own sockets in its
//! handlers directory, and the agent's client for external handlers (`RemoteHandler`) finds
//! pymodbus units through it and gets its settings refusals as InvalidArgument.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use verge_discovery_sdk::{
    DiscoveryError, DiscoveryHandler, DiscoveryRequest, HandlerEndpoint, RemoteHandler,
};

const BIN: &str = env!("CARGO_BIN_EXE_verge-modbus-discovery");
const WAIT: Duration = Duration::from_secs(20);

async fn wait_socket(path: &Path) {
    let deadline = Instant::now() + WAIT;
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
async fn the_binary_serves_both_transports_to_the_agents_client() {
    if !peers_ready("tcp") {
        return;
    }
    let port = free_port();
    let _server = pymodbus(
        "pymodbus-binary",
        json!({
            "tcp": format!("127.0.0.1:{port}"),
            "missing": "gateway",
            "units": {"1": {"identity": {"0": "ACME", "1": "PB-1", "2": "3.1", "5": "M-B"}}}
        }),
    );
    wait_listening(port).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    // No agent listens in this directory: the binary serves anyway and keeps retrying its
    // registration (the SDK's runner tests cover registering).
    let _handler = Peer::spawn(
        "verge-modbus-discovery",
        Command::new(BIN)
            .args(["--transport", "both", "--directory"])
            .arg(dir.path()),
    );
    let tcp_sock = dir.path().join("modbus-tcp.sock");
    let rtu_sock = dir.path().join("modbus-rtu.sock");
    wait_socket(&tcp_sock).await;
    wait_socket(&rtu_sock).await;
    println!(
        "verge-modbus-discovery: both sockets served after {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let tcp = RemoteHandler::new("modbus-tcp", true, HandlerEndpoint::Uds(tcp_sock));
    let details = format!(
        "hosts: [127.0.0.1]\nports: [{port}]\nunitIds: [\"1-3\"]\nrequestTimeoutMillis: 300\nconnectTimeoutMillis: 500\n"
    );
    let mut stream = discover(&tcp, &details).await;
    let devices = until(&mut stream, WAIT, "unit 1 through the binary", |d| {
        by_unit(d, port, 1).is_some()
    })
    .await;
    assert_eq!(devices.len(), 1, "{:#?}", ids(&devices));
    let unit = by_unit(&devices, port, 1).expect("unit 1");
    assert_eq!(prop(unit, "MODBUS_TRANSPORT"), Some("tcp"));
    assert_eq!(prop(unit, "MODBUS_VENDOR"), Some("ACME"));
    assert_eq!(prop(unit, "MODBUS_PRODUCT_CODE"), Some("PB-1"));
    assert_eq!(prop(unit, "MODBUS_MODEL"), Some("M-B"));

    // Bad settings cross the wire as InvalidArgument, naming the field, on both handlers.
    let refused = |h: &RemoteHandler, details: &str| {
        let h = h.clone();
        let details = details.to_string();
        async move {
            match h
                .discover(DiscoveryRequest {
                    details,
                    properties: Default::default(),
                })
                .await
            {
                Err(DiscoveryError::InvalidSettings(m)) => m,
                Err(e) => panic!("{}: not InvalidSettings: {e}", h.name()),
                Ok(_) => panic!("{}: bad settings accepted", h.name()),
            }
        }
    };
    let m = refused(
        &tcp,
        &format!("hosts: [127.0.0.1]\nports: [{port}]\nunitIds: [\"20-10\"]\n"),
    )
    .await;
    assert!(m.contains("unitIds"), "{m}");
    let rtu = RemoteHandler::new("modbus-rtu", false, HandlerEndpoint::Uds(rtu_sock));
    let m = refused(
        &rtu,
        "ports: [/dev/ttyX]\nbaudRates: [12]\nnoSuchField: 1\n",
    )
    .await;
    assert!(m.contains("noSuchField"), "{m}");
}
