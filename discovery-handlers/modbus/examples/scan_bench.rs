//! Scan benchmark (not a test): 4 pymodbus servers × 247 unit ids, 10 answering
//! units per server, the rest silent; one modbus-tcp pass at each concurrency.
//!
//! `tests/peers/modbus/setup.sh && cargo run --release -p verge-modbus --example scan_bench [-- 16 64]`
//!
//! A silent unit costs one request timeout; with C connections the pass takes
//! about (silent units × timeout) / C, so the time falls with the concurrency
//! and no single slow unit sets it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use verge_discovery_sdk::parse_details;
use verge_modbus::scan::scan_tcp;
use verge_modbus::settings::TcpSettings;

const SERVERS: usize = 4;
const ANSWERING: u8 = 10;
const TIMEOUT_MS: u64 = 200;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let concurrencies: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() { vec![16, 64] } else { args }
    };
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let python = home.join(".cache/verge/venv-modbus/bin/python");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/modbus/server.py");
    if !python.exists() {
        return Err("run tests/peers/modbus/setup.sh first".into());
    }
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    for s in 0..SERVERS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // Answering units spread over the id range: 1, 26, 51, …
        let units: serde_json::Map<String, serde_json::Value> = (0..ANSWERING)
            .map(|i| {
                let unit = 1 + i * 24;
                (
                    unit.to_string(),
                    serde_json::json!({"identity": {"0": format!("Bench{s}"), "1": format!("P{unit}"), "5": "B"}}),
                )
            })
            .collect();
        let spec = serde_json::json!({"tcp": format!("127.0.0.1:{port}"), "missing": "silent", "units": units});
        let child = Command::new(&python)
            .arg(&script)
            .arg(spec.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        servers.push(Kill(child));
        ports.push(port);
    }
    for &port in &ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(format!("server on {port} did not start").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let addresses = SERVERS * 247;
    let silent = addresses - SERVERS * usize::from(ANSWERING);
    println!(
        "{SERVERS} pymodbus servers × 247 unit ids = {addresses} unit addresses, {silent} silent, request timeout {TIMEOUT_MS} ms"
    );
    for c in concurrencies {
        let details = format!(
            "hosts: [127.0.0.1]\nports: {ports:?}\nunitIds: [\"1-247\"]\nconcurrency: {c}\nconnectionsPerEndpoint: {c}\nrequestTimeoutMillis: {TIMEOUT_MS}\nscanBudgetSeconds: 600\n"
        );
        let plan = parse_details::<TcpSettings>(&details)?.plan()?;
        let started = Instant::now();
        let result = scan_tcp(Arc::new(plan)).await;
        let took = started.elapsed();
        let floor = Duration::from_millis(TIMEOUT_MS * silent as u64 / c as u64);
        println!(
            "concurrency {c:>3}: {took:>8.2?} for {} units asked, {} devices found; silent-unit floor (silent × timeout / concurrency) {floor:.2?}; VmHWM {} KiB",
            result.asked.len(),
            result.found.len(),
            vm_hwm_kib().unwrap_or(0)
        );
    }
    Ok(())
}
