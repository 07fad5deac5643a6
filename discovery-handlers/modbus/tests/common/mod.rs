//! Peers for the Modbus tests: pymodbus servers, the libmodbus server, socat pty pairs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
};

/// `$HOME/.cache/verge`.
pub fn cache() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/verge")
}

pub fn python() -> PathBuf {
    cache().join("venv-modbus/bin/python")
}

pub fn libmodbus_server() -> PathBuf {
    cache().join("peers/modbus-libmodbus-server")
}

pub fn server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/modbus/server.py")
}

/// Whether the peers are installed; without them the test is skipped with one
/// line, or fails when `VERGE_E2E=required`.
pub fn peers_ready(what: &str) -> bool {
    let mut missing = Vec::new();
    for p in [python(), libmodbus_server()] {
        if !p.exists() {
            missing.push(p.display().to_string());
        }
    }
    if what == "rtu" && !Path::new("/usr/bin/socat").exists() {
        missing.push("/usr/bin/socat".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "modbus peers missing ({}); run tests/peers/modbus/setup.sh",
        missing.join(", ")
    );
    if std::env::var("VERGE_E2E").as_deref() == Ok("required") {
        panic!("{msg}");
    }
    println!("skipped: {msg}");
    false
}

/// A child process killed on drop.
pub struct Peer {
    child: Child,
    pub name: String,
}

impl Peer {
    pub fn spawn(name: &str, cmd: &mut Command) -> Peer {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Peer {
            child,
            name: name.into(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port (bound then released; the peer binds it next).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A pymodbus server with `spec` (see tests/peers/modbus/server.py).
pub fn pymodbus(name: &str, spec: serde_json::Value) -> Peer {
    Peer::spawn(
        name,
        Command::new(python())
            .arg(server_script())
            .arg(spec.to_string()),
    )
}

/// Waits until `port` accepts TCP connections.
pub async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

pub async fn discover(h: &dyn DiscoveryHandler, details: &str) -> DeviceStream {
    h.discover(DiscoveryRequest {
        details: details.into(),
        properties: Default::default(),
    })
    .await
    .unwrap_or_else(|e| panic!("discover: {e}"))
}

/// The next update, failing after `timeout`.
pub async fn next(stream: &mut DeviceStream, timeout: Duration) -> DiscoveryUpdate {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(u))) => u,
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        Ok(None) => panic!("stream ended"),
        Err(_) => panic!("no update within {timeout:?}"),
    }
}

/// Updates until `check` holds, failing after `timeout`.
pub async fn until(
    stream: &mut DeviceStream,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[Device]) -> bool,
) -> Vec<Device> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(u))) => {
                if check(&u.devices) {
                    return u.devices;
                }
                last = u.devices;
            }
            Ok(Some(Err(e))) => panic!("stream error: {e}"),
            Ok(None) => panic!("stream ended"),
            Err(_) => panic!(
                "{what}: not within {timeout:?}; last list: {:#?}",
                ids(&last)
            ),
        }
    }
}

pub fn ids(devices: &[Device]) -> Vec<String> {
    devices.iter().map(|d| d.id.clone()).collect()
}

pub fn prop<'a>(d: &'a Device, k: &str) -> Option<&'a str> {
    d.properties.get(k).map(String::as_str)
}

pub fn by_unit(devices: &[Device], port: u16, unit: u8) -> Option<&Device> {
    devices.iter().find(|d| {
        prop(d, "MODBUS_PORT") == Some(&port.to_string())
            && prop(d, "MODBUS_UNIT_ID") == Some(&unit.to_string())
    })
}
