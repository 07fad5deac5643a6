//! A private system bus with python-dbusmock's BlueZ template, for tests.
//!
//! Each [`MockBus`] owns its dbus-daemon and dbusmock processes and a temp
//! directory, all removed in `Drop`. The handler reaches the bus through
//! `DBUS_SYSTEM_BUS_ADDRESS`, which is process-wide, so tests take [`LOCK`]
//! for their whole run.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{DeviceStream, DiscoveryUpdate};

/// Serializes tests: the bus address is an environment variable.
pub static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// libdbus reads the system bus address once per process and keeps it, so each
/// test runs its body in a process of its own: called in the test harness, this
/// runs `test` in a child process, asserts it passed and returns false; in that
/// child it returns true.
pub fn in_own_process(test: &str) -> bool {
    const CHILD: &str = "VERGE_BLE_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary");
    let status = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .status()
        .expect("run the test in its own process");
    assert!(status.success(), "{test} failed in its own process");
    false
}

/// The venv made by tests/peers/ble/setup.sh.
pub fn venv() -> PathBuf {
    std::env::var_os("VERGE_BLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/verge/venv-ble")
        })
}

/// Whether the peer is installed; when it is not, fails under
/// `VERGE_E2E=required` and otherwise says so once and lets the test return.
pub fn peer_available() -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("verge_ble=debug")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let ok = venv().join("bin/python").exists()
        && Command::new("dbus-daemon")
            .arg("--version")
            .output()
            .is_ok()
        && Command::new("gdbus").arg("help").output().is_ok();
    if !ok {
        assert!(
            std::env::var("VERGE_E2E").as_deref() != Ok("required"),
            "BLE peer missing: run tests/peers/ble/setup.sh (dbus-daemon, gdbus, {})",
            venv().display()
        );
        eprintln!("skipped: BLE peer missing (run tests/peers/ble/setup.sh)");
    }
    ok
}

/// A private bus, optionally with the mocked BlueZ.
pub struct MockBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    daemon: Option<Child>,
    bluez: Option<Child>,
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl MockBus {
    /// An address with nothing behind it yet; [`MockBus::start_daemon`] brings the bus.
    pub fn unstarted() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("unix:path={}", dir.path().join("bus").display());
        // SAFETY: tests hold LOCK, so no other thread reads the environment meanwhile.
        unsafe { std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &address) };
        MockBus {
            dir,
            address,
            daemon: None,
            bluez: None,
        }
    }

    /// A bus with BlueZ mocked and adapter hci0.
    pub fn with_adapter() -> Self {
        let mut bus = Self::unstarted();
        bus.start_daemon();
        bus.start_bluez();
        bus.add_adapter("hci0");
        bus
    }

    pub fn start_daemon(&mut self) {
        let child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={}", self.address))
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon");
        self.daemon = Some(child);
        let socket = self.dir.path().join("bus");
        wait_until("the bus socket", Duration::from_secs(10), || {
            socket.exists()
        });
    }

    pub fn start_bluez(&mut self) {
        let child = Command::new(venv().join("bin/python"))
            .args(["-m", "dbusmock", "--system", "--template", "bluez5"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdout(Stdio::null())
            .spawn()
            .expect("dbusmock");
        self.bluez = Some(child);
        wait_until("the mocked BlueZ", Duration::from_secs(20), || {
            self.try_call(
                "/org/bluez",
                "org.freedesktop.DBus.Introspectable.Introspect",
                &[],
            )
            .is_ok()
        });
    }

    fn try_call(&self, object: &str, method: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("gdbus")
            .args([
                "call",
                "--system",
                "-d",
                "org.bluez",
                "-o",
                object,
                "-m",
                method,
            ])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Calls a method on the mock; panics with gdbus's message on failure.
    pub fn call(&self, object: &str, method: &str, args: &[&str]) -> String {
        self.try_call(object, method, args)
            .unwrap_or_else(|e| panic!("{method} on {object}: {e}"))
    }

    pub fn add_adapter(&self, name: &str) {
        self.call(
            "/org/bluez",
            "org.bluez.Mock.AddAdapter",
            &[name, "verge-test"],
        );
    }

    /// Adds a device (RSSI -79, public address) and returns its object path.
    pub fn add_device(&self, address: &str, name: &str) -> String {
        self.call(
            "/org/bluez",
            "org.bluez.Mock.AddDevice",
            &["hci0", address, name],
        );
        device_path(address)
    }

    /// Changes Device1 properties (GVariant text, e.g. `{'RSSI': <int16 -50>}`),
    /// as a new advertisement would.
    pub fn update(&self, address: &str, props: &str) {
        self.call(
            &device_path(address),
            "org.freedesktop.DBus.Mock.UpdateProperties",
            &["org.bluez.Device1", props],
        );
    }

    /// Adds a Device Information Service with the given strings to a device.
    pub fn add_device_information(&self, address: &str, values: &[(u16, &str)]) {
        let dev = device_path(address);
        let service = format!("{dev}/service0010");
        self.call(
            "/org/bluez",
            "org.freedesktop.DBus.Mock.AddObject",
            &[
                &service,
                "org.bluez.GattService1",
                &format!(
                    "{{'UUID': <'0000180a-0000-1000-8000-00805f9b34fb'>, 'Primary': <true>, 'Device': <objectpath '{dev}'>}}"
                ),
                // btleplug finds services by introspection, which needs a method.
                "[('Dummy', '', '', '')]",
            ],
        );
        for (i, (uuid, value)) in values.iter().enumerate() {
            let path = format!("{service}/char{:04x}", 0x11 + i);
            self.call(
                "/org/bluez",
                "org.freedesktop.DBus.Mock.AddObject",
                &[
                    &path,
                    "org.bluez.GattCharacteristic1",
                    &format!(
                        "{{'UUID': <'0000{uuid:04x}-0000-1000-8000-00805f9b34fb'>, 'Service': <objectpath '{service}'>, 'Flags': <['read']>}}"
                    ),
                    &format!("[('ReadValue', 'a{{sv}}', 'ay', 'ret = list(b\"{value}\")')]"),
                ],
            );
        }
        self.update(address, "{'ServicesResolved': <true>}");
    }

    /// A Device1 property as gdbus prints it.
    pub fn get(&self, address: &str, property: &str) -> String {
        self.call(
            &device_path(address),
            "org.freedesktop.DBus.Properties.Get",
            &["org.bluez.Device1", property],
        )
    }

    pub fn stop_bluez(&mut self) {
        if let Some(mut c) = self.bluez.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MockBus {
    fn drop(&mut self) {
        self.stop_bluez();
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn device_path(address: &str) -> String {
    format!(
        "/org/bluez/hci0/dev_{}",
        address.replace(':', "_").to_uppercase()
    )
}

/// Waits for an update satisfying `f`, failing on timeout or a stream end/error.
pub async fn next_matching(
    stream: &mut DeviceStream,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&DiscoveryUpdate) -> bool,
) -> DiscoveryUpdate {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        let update = match item {
            Some(Ok(u)) => u,
            Some(Err(e)) => panic!("stream error while waiting for {what}: {e}"),
            None => panic!("stream ended while waiting for {what}"),
        };
        if f(&update) {
            return update;
        }
    }
}

/// The next update, whatever it is.
pub async fn next(stream: &mut DeviceStream, limit: Duration) -> DiscoveryUpdate {
    next_matching(stream, limit, "the next update", |_| true).await
}

/// Ids in an update.
pub fn ids(u: &DiscoveryUpdate) -> Vec<String> {
    u.devices.iter().map(|d| d.id.clone()).collect()
}

pub fn has(u: &DiscoveryUpdate, id: &str) -> bool {
    u.devices.iter().any(|d| d.id == id)
}
