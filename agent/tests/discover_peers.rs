//! `verge-agent discover` — the real binary, with the handlers its default
//! features embed — against the independent protocol peers of the test-peers
//! notes, started with the scripts under `tests/peers/<proto>/`:
//! pymodbus (modbus-tcp), python-dbusmock's BlueZ template on a private bus
//! (ble), a umockdev testbed (usb, udev), python zeroconf (mdns) and an ipycam
//! virtual camera (onvif). The multicast peers and their discover process run
//! in network namespaces `vg-dsc-*` of the test's own, joined by a veth pair on
//! 10.254.120.0/24 (mdns) or 10.254.121.0/24 (onvif), so no packet reaches a
//! real interface. Each test also gives its handler a bad setting of that
//! protocol and expects exit 2 with a one-line error naming it.
//!
//! Without a prerequisite (root, a peer's venv, umockdev, dbus-daemon, …) a
//! test prints one line and passes, unless `VERGE_E2E=required`, where it fails.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_verge-agent");
/// Every discover run ends by itself after this long, should a test fail to stop it.
const RUN_LIMIT: &str = "120s";
/// How long a test waits for a device (the measurement is printed, not this).
const FIND_LIMIT: Duration = Duration::from_secs(60);
/// How long a peer may take to come up.
const PEER_START: Duration = Duration::from_secs(40);
/// How long a process may take to exit after a signal before it is killed.
const EXIT_LIMIT: Duration = Duration::from_secs(10);
/// Poll period of every condition wait.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Prerequisites

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/verge")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Collects what is missing for one protocol's test.
#[derive(Default)]
struct Needs(Vec<String>);

impl Needs {
    fn root(mut self) -> Self {
        if !is_root() {
            self.0.push("root".into());
        }
        self
    }

    fn programs(mut self, programs: &[&str]) -> Self {
        for p in programs {
            if !have(p) {
                self.0.push((*p).into());
            }
        }
        self
    }

    fn file(mut self, path: &Path, hint: &str) -> Self {
        if !path.exists() {
            self.0.push(format!("{} ({hint})", path.display()));
        }
        self
    }

    /// True when nothing is missing; otherwise fails under `VERGE_E2E=required`
    /// or prints one line and returns false.
    fn met(self, proto: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let msg = format!("discover {proto}: missing {}", self.0.join(", "));
        assert!(
            std::env::var("VERGE_E2E").as_deref() != Ok("required"),
            "{msg} and VERGE_E2E=required"
        );
        println!("skipped: {msg}");
        false
    }
}

// ---------------------------------------------------------------------------
// Processes

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// A process started in a process group of its own (a camera's ffmpeg joins
/// it), ended with its group on drop: SIGTERM, then SIGKILL.
struct Proc {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            child,
            name: name.into(),
            status: None,
        }
    }

    fn signal_group(&self, signal: i32) {
        let Ok(pgid) = i32::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: signals the group this test created; the leader is not reaped
        // yet (see `stop`), so the group id cannot have been reused.
        unsafe { libc::kill(-pgid, signal) };
    }

    /// Whether the leader has exited (a zombie until `wait`, which keeps the
    /// group id ours).
    fn exited(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        match stat {
            Ok(s) => s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    /// Sends `signal` to the group, waits for the leader, kills what is left of
    /// the group and returns the leader's exit status. Never panics (it runs in
    /// `drop`, also while a failed test unwinds).
    fn stop(&mut self, signal: i32) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        self.signal_group(signal);
        let deadline = Instant::now() + EXIT_LIMIT;
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        self.signal_group(libc::SIGKILL);
        match self.child.wait() {
            Ok(status) => self.status = Some(status),
            Err(e) => eprintln!("wait for {}: {e}", self.name),
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.stop(libc::SIGTERM);
        }
    }
}

/// Reads a child's output in a thread, as lines on a channel or into a buffer.
fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn collect(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Ok(mut b) = b.lock() {
                b.push_str(&line);
                b.push('\n');
            }
        }
    });
    buf
}

/// A peer that prints `ready_word` on stdout once it serves; its stderr goes to `log`.
fn start_peer(name: &str, cmd: &mut Command, ready_word: &str, log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).expect("peer log");
    let mut p = Proc::spawn(
        name,
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file),
    );
    let lines = lines_of(p.child.stdout.take().expect("stdout"));
    let deadline = Instant::now() + PEER_START;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(ready_word) => return p,
            Ok(_) => {}
            Err(_) => panic!(
                "{name} did not say {ready_word:?} within {PEER_START:?}; its log:\n{}",
                tail(log)
            ),
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---------------------------------------------------------------------------
// `verge-agent discover`

/// `verge-agent discover <args>`, run through `prefix` (`ip netns exec ns`,
/// `umockdev-run … --`) when given.
fn agent(prefix: &[&str], args: &[&str]) -> Command {
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("discover").args(args);
    cmd
}

/// A discover process streaming `--json` lines.
struct Live {
    proc: Proc,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
    last: Value,
}

impl Live {
    fn start(proto: &str, mut cmd: Command) -> Live {
        cmd.args(["--json", "--timeout", RUN_LIMIT])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut proc = Proc::spawn(&format!("discover {proto}"), &mut cmd);
        let lines = lines_of(proc.child.stdout.take().expect("stdout"));
        let stderr = collect(proc.child.stderr.take().expect("stderr"));
        Live {
            proc,
            lines,
            stderr,
            started,
            last: Value::Null,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reads device lists until one satisfies `pred`; returns it and the time
    /// since the process started.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> (Value, Duration) {
        let deadline = Instant::now() + FIND_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let update: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                    self.last = update;
                    if pred(&self.last) {
                        return (self.last.clone(), self.started.elapsed());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{what}: not within {FIND_LIMIT:?}; last list {:#}; stderr:\n{}",
                    self.last,
                    self.stderr()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{what}: discover exited ({:?}); last list {:#}; stderr:\n{}",
                    self.proc.stop(libc::SIGKILL),
                    self.last,
                    self.stderr()
                ),
            }
        }
    }

    /// Ctrl-C: discover stops and exits by the last list it printed; asserts
    /// that code.
    fn interrupt(mut self, code: i32) {
        let started = Instant::now();
        let status = self.proc.stop(libc::SIGINT);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(code),
            "exit {status:?} {:?} after Ctrl-C; stderr:\n{}",
            started.elapsed(),
            self.stderr()
        );
    }
}

/// A one-shot discover run (`--once` or bad settings), bounded by `--timeout`.
fn run(mut cmd: Command) -> Output {
    cmd.args(["--timeout", RUN_LIMIT])
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .expect("run verge-agent discover")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The single JSON line of a `--once --json` run that found devices.
fn found_once(proto: &str, out: &Output) -> Value {
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "discover {proto}: stdout {stdout}\nstderr {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line with --once: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Runs `handler` once (under `prefix`, with `env`) with `details` written to `dir`, and asserts
/// the refusal: exit 2, nothing on stdout, one line on stderr naming `named`.
fn assert_refuses(
    prefix: &[&str],
    env: &[(&str, &str)],
    dir: &Path,
    handler: &str,
    details: &str,
    named: &str,
) {
    let d = write(dir, "bad.yaml", details);
    let mut cmd = agent(prefix, &["--handler", handler, "--details", &d, "--once"]);
    cmd.envs(env.iter().copied());
    assert_bad_settings(handler, &run(cmd), named);
}

/// Exit 2, nothing on stdout, and one line on stderr naming `named`.
fn assert_bad_settings(proto: &str, out: &Output, named: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "discover {proto} with bad settings: stderr {stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with("verge-agent discover: ") && lines[0].contains(named),
        "discover {proto}: {named:?} not named in {stderr}"
    );
    println!("discover {proto}: bad settings → exit 2: {}", lines[0]);
}

fn devices(update: &Value) -> &[Value] {
    update["devices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn ids(update: &Value) -> Vec<&str> {
    devices(update)
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect()
}

fn device<'a>(update: &'a Value, id: &str) -> Option<&'a Value> {
    devices(update).iter().find(|d| d["id"] == id)
}

fn has(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |u| device(u, id).is_some()
}

/// Asserts each `(property, value)` of a device.
fn assert_props(device: &Value, want: &[(&str, &str)]) {
    for (k, v) in want {
        assert_eq!(
            device["properties"][*k].as_str(),
            Some(*v),
            "{k} in {:#}",
            device["properties"]
        );
    }
}

fn host_paths(device: &Value) -> Vec<&str> {
    device["deviceSpecs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|s| s["hostPath"].as_str())
        .collect()
}

fn report(proto: &str, what: &str, took: Duration) {
    println!("discover {proto}: {what} in {} ms", took.as_millis());
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write details");
    path.to_str().expect("utf-8 temp path").to_string()
}

// ---------------------------------------------------------------------------
// Network namespaces

static NEXT: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces `vg-dsc-<tag>a|b` joined by a veth pair, `<subnet>.1`
/// in a and `<subnet>.2` in b, multicast routed onto the pair. Deleted on
/// drop (those this guard created), also when a test fails.
#[cfg(any(feature = "mdns", feature = "onvif"))]
struct NetPair {
    created: Vec<String>,
    a: String,
    b: String,
}

#[cfg(any(feature = "mdns", feature = "onvif"))]
impl NetPair {
    fn new(subnet: &str) -> NetPair {
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut pair = NetPair {
            created: Vec::new(),
            a: format!("vg-dsc-{tag}a"),
            b: format!("vg-dsc-{tag}b"),
        };
        for ns in [pair.a.clone(), pair.b.clone()] {
            sh(&["ip", "netns", "add", &ns]);
            pair.created.push(ns.clone());
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        // Interface names: at most 15 characters.
        let (ia, ib) = (format!("vgd{tag}a"), format!("vgd{tag}b"));
        sh(&[
            "ip", "link", "add", &ia, "netns", &pair.a, "type", "veth", "peer", "name", &ib,
            "netns", &pair.b,
        ]);
        for (ns, dev, host) in [(&pair.a, &ia, 1), (&pair.b, &ib, 2)] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{subnet}.{host}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", dev]);
        }
        pair
    }

    fn exec(ns: &str) -> [&str; 4] {
        ["ip", "netns", "exec", ns]
    }

    /// `python -u tests/peers/<script>` inside namespace b.
    fn python_in_b(&self, python: &Path, script: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(&Self::exec(&self.b)[1..])
            .arg(python)
            .arg("-u")
            .arg(repo().join("tests/peers").join(script));
        cmd
    }

    /// The MAC of b's end of the pair.
    fn mac_b(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.b, "-o", "link", "show", "type", "veth"])
            .output()
            .expect("ip link");
        text(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("a MAC")
            .to_string()
    }
}

#[cfg(any(feature = "mdns", feature = "onvif"))]
impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

// ---------------------------------------------------------------------------
// modbus-tcp: a pymodbus server on loopback

#[cfg(feature = "modbus")]
#[test]
fn modbus_tcp_units_of_a_pymodbus_server() {
    let python = cache().join("venv-modbus/bin/python");
    let script = repo().join("tests/peers/modbus/server.py");
    if !Needs::default()
        .file(&python, "run tests/peers/modbus/setup.sh")
        .met("modbus-tcp")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let spec = serde_json::json!({
        "tcp": format!("127.0.0.1:{port}"),
        "missing": "gateway",
        "units": {
            "1": {"identity": {"0": "ACME", "1": "PD-1", "2": "1.4", "4": "Flow Meter", "5": "FM-100"},
                  "hr": {"0": [1, 2]}},
            "2": {"identity": {"0": "Zeta", "1": "PD-2", "2": "2.0"}}
        }
    });
    let _server = start_peer(
        "pymodbus",
        Command::new(&python)
            .arg("-u")
            .arg(&script)
            .arg(spec.to_string()),
        "serving",
        &dir.path().join("pymodbus.log"),
    );
    wait_until("pymodbus to listen", PEER_START, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let details = |p: u16| {
        format!(
            "hosts: [127.0.0.1]\nports: [{p}]\nunitIds: [\"1-3\"]\nrequestTimeoutMillis: 300\nconnectTimeoutMillis: 500\n"
        )
    };
    let d = write(dir.path(), "modbus.yaml", &details(port));
    let started = Instant::now();
    let out = run(agent(
        &[],
        &[
            "--handler",
            "modbus-tcp",
            "--details",
            &d,
            "--once",
            "--json",
        ],
    ));
    let took = started.elapsed();
    let update = found_once("modbus-tcp", &out);
    report("modbus-tcp", "2 units (--once, whole run)", took);
    assert_eq!(devices(&update).len(), 2, "{update:#}");
    let unit = |n: &str| {
        devices(&update)
            .iter()
            .find(|d| d["properties"]["MODBUS_UNIT_ID"] == n)
            .unwrap_or_else(|| panic!("unit {n} in {update:#}"))
    };
    let u1 = unit("1");
    let port_s = port.to_string();
    assert_props(
        u1,
        &[
            ("MODBUS_TRANSPORT", "tcp"),
            ("MODBUS_HOST", "127.0.0.1"),
            ("MODBUS_PORT", &port_s),
            ("MODBUS_VENDOR", "ACME"),
            ("MODBUS_PRODUCT_CODE", "PD-1"),
            ("MODBUS_REVISION", "1.4"),
            ("MODBUS_PRODUCT_NAME", "Flow Meter"),
            ("MODBUS_MODEL", "FM-100"),
        ],
    );
    assert_eq!(
        u1["id"],
        format!("vendor=ACME;product=PD-1@tcp://127.0.0.1:{port}/1")
    );
    assert_props(
        unit("2"),
        &[("MODBUS_VENDOR", "Zeta"), ("MODBUS_PRODUCT_CODE", "PD-2")],
    );

    // Nothing listens on another port: none found, exit 1.
    let d = write(dir.path(), "none.yaml", &details(free_port()));
    let out = run(agent(
        &[],
        &[
            "--handler",
            "modbus-tcp",
            "--details",
            &d,
            "--once",
            "--json",
        ],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let none: Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line");
    assert_eq!(none["devices"], serde_json::json!([]));

    assert_refuses(
        &[],
        &[],
        dir.path(),
        "modbus-tcp",
        &format!("hosts: [127.0.0.1]\nports: [{port}]\nunitIds: [\"20-10\"]\n"),
        "unitIds",
    );
}

#[cfg(feature = "modbus")]
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ---------------------------------------------------------------------------
// ble: python-dbusmock's BlueZ template on a private bus

#[cfg(feature = "ble")]
#[test]
fn ble_devices_of_the_mocked_bluez() {
    let python = cache().join("venv-ble/bin/python");
    if !Needs::default()
        .programs(&["dbus-daemon", "gdbus"])
        .file(&python, "run tests/peers/ble/setup.sh")
        .met("ble")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bus");
    let bus = format!("unix:path={}", socket.display());
    let _daemon = Proc::spawn(
        "dbus-daemon",
        Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={bus}"))
            .stdout(Stdio::null())
            // It only complains it may not raise its fd limit.
            .stderr(Stdio::null()),
    );
    wait_until("the bus socket", PEER_START, || socket.exists());
    let _bluez = Proc::spawn(
        "dbusmock",
        Command::new(&python)
            .args(["-m", "dbusmock", "--system", "--template", "bluez5"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("dbusmock.log")).expect("log")),
    );
    let gdbus = |method: &str, args: &[&str]| -> Result<String, String> {
        let out = Command::new("gdbus")
            .args([
                "call",
                "--system",
                "-d",
                "org.bluez",
                "-o",
                "/org/bluez",
                "-m",
            ])
            .arg(method)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        }
    };
    wait_until("the mocked BlueZ", PEER_START, || {
        gdbus("org.freedesktop.DBus.Introspectable.Introspect", &[]).is_ok()
    });
    gdbus("org.bluez.Mock.AddAdapter", &["hci0", "verge-test"]).expect("AddAdapter");
    gdbus(
        "org.bluez.Mock.AddDevice",
        &["hci0", "11:22:33:44:55:01", "Sensor-1"],
    )
    .expect("AddDevice");

    let d = write(dir.path(), "ble.yaml", "");
    let mut cmd = agent(&[], &["--handler", "ble", "--details", &d]);
    cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &bus);
    let mut live = Live::start("ble", cmd);
    let (update, took) = live.wait_for("the known device", has("11:22:33:44:55:01"));
    report("ble", "the known device", took);
    assert_props(
        device(&update, "11:22:33:44:55:01").expect("device"),
        &[
            ("BLE_ADDRESS", "11:22:33:44:55:01"),
            ("BLE_ADDRESS_TYPE", "public"),
            ("BLE_NAME", "Sensor-1"),
            ("BLE_ADAPTER", "hci0"),
        ],
    );
    assert_eq!(update["diagnostics"], serde_json::json!([]), "{update:#}");

    // Live: a device advertised while discover runs is printed as it comes.
    let added = Instant::now();
    gdbus(
        "org.bluez.Mock.AddDevice",
        &["hci0", "11:22:33:44:55:02", "Sensor-2"],
    )
    .expect("AddDevice");
    let (update, _) = live.wait_for("the added device", has("11:22:33:44:55:02"));
    report("ble", "a device added while running", added.elapsed());
    assert_eq!(ids(&update), ["11:22:33:44:55:01", "11:22:33:44:55:02"]);
    // Exit 0: the last list held devices.
    live.interrupt(0);

    assert_refuses(
        &[],
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.as_str())],
        dir.path(),
        "ble",
        "manufacturerData: {action: Include, items: [{id: 76, dataPrefix: '123'}]}\n",
        "dataPrefix",
    );
}

// ---------------------------------------------------------------------------
// usb and udev: an FTDI serial adapter in a umockdev testbed

#[cfg(any(feature = "usb", feature = "udev"))]
fn umockdev_ready(proto: &str) -> bool {
    Needs::default().programs(&["umockdev-run"]).met(proto)
}

/// `umockdev-run --device <testbed> --`.
#[cfg(any(feature = "usb", feature = "udev"))]
fn umockdev_prefix(testbed: &Path) -> [String; 4] {
    [
        "umockdev-run".into(),
        "--device".into(),
        testbed.to_str().expect("utf-8 path").into(),
        "--".into(),
    ]
}

#[cfg(any(feature = "usb", feature = "udev"))]
fn serial_testbed() -> PathBuf {
    repo().join("tests/peers/usb/serial.umockdev")
}

#[cfg(feature = "usb")]
#[test]
fn usb_ftdi_adapter_in_umockdev() {
    if !umockdev_ready("usb") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = umockdev_prefix(&serial_testbed());
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let d = write(dir.path(), "usb.yaml", "match:\n- {vendorId: \"0403\"}\n");
    let started = Instant::now();
    let out = run(agent(
        &prefix,
        &["--handler", "usb", "--details", &d, "--once", "--json"],
    ));
    let took = started.elapsed();
    let update = found_once("usb", &out);
    report("usb", "the adapter (--once, whole run)", took);
    assert_eq!(ids(&update), ["0403:6001:FT12AB34"]);
    let ftdi = &devices(&update)[0];
    assert_props(
        ftdi,
        &[
            ("USB_VENDOR_ID", "0403"),
            ("USB_PRODUCT_ID", "6001"),
            ("USB_SERIAL", "FT12AB34"),
            ("USB_MANUFACTURER", "FTDI"),
            ("USB_PRODUCT", "FT232R USB UART"),
            ("USB_PORT_PATH", "1-2"),
            ("USB_DEVNODE", "/dev/bus/usb/001/004"),
            ("USB_TTY", "/dev/ttyUSB0"),
        ],
    );
    assert_eq!(host_paths(ftdi), ["/dev/bus/usb/001/004", "/dev/ttyUSB0"]);

    assert_refuses(
        &prefix,
        &[],
        dir.path(),
        "usb",
        "match:\n- {vendorId: \"04g3\"}\n",
        "match[0].vendorId",
    );
}

#[cfg(feature = "udev")]
#[test]
fn udev_akri_tty_rule_in_umockdev() {
    if !umockdev_ready("udev") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = umockdev_prefix(&serial_testbed());
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let d = write(
        dir.path(),
        "udev.yaml",
        "udevRules:\n- 'SUBSYSTEM==\"tty\"'\n",
    );
    let started = Instant::now();
    let out = run(agent(
        &prefix,
        &["--handler", "udev", "--details", &d, "--once", "--json"],
    ));
    let took = started.elapsed();
    let update = found_once("udev", &out);
    report("udev", "the tty (--once, whole run)", took);
    let tty = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0";
    assert_eq!(ids(&update), [tty]);
    let d0 = &devices(&update)[0];
    assert_props(
        d0,
        &[("UDEV_DEVNODE", "/dev/ttyUSB0"), ("UDEV_DEVPATH", tty)],
    );
    assert_eq!(host_paths(d0), ["/dev/ttyUSB0"]);

    // An assignment where Akri's rules allow only matches.
    assert_refuses(
        &prefix,
        &[],
        dir.path(),
        "udev",
        "udevRules:\n- 'KERNEL=\"ttyUSB0\"'\n",
        "\"=\"",
    );
}

// ---------------------------------------------------------------------------
// mdns: a python zeroconf publisher, discover in the other namespace

#[cfg(feature = "mdns")]
#[test]
fn mdns_service_of_a_zeroconf_publisher() {
    let python = cache().join("venv-mdns/bin/python");
    if !Needs::default()
        .root()
        .programs(&["ip"])
        .file(&python, "run tests/peers/mdns/setup.sh")
        .met("mdns")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = NetPair::new("10.254.120");
    let _publisher = start_peer(
        "publish.py",
        net.python_in_b(&python, "mdns/publish.py").args([
            "--name",
            "Verge Discover",
            "--type",
            "_http._tcp.local.",
            "--port",
            "8080",
            "--host",
            "vg-dsc-pub.local.",
            "--addr",
            "10.254.120.2",
            "--txt",
            "path=/status",
            "--txt",
            "model=DSC-1",
        ]),
        "ready",
        &dir.path().join("publish.log"),
    );

    let exec = NetPair::exec(&net.a);
    let d = write(dir.path(), "mdns.yaml", "serviceTypes: [_http._tcp]\n");
    let mut live = Live::start(
        "mdns",
        agent(&exec, &["--handler", "mdns", "--details", &d]),
    );
    let id = "Verge Discover._http._tcp.local.";
    let (update, took) = live.wait_for("the zeroconf service", has(id));
    report("mdns", "the service", took);
    assert_props(
        device(&update, id).expect("device"),
        &[
            ("MDNS_SERVICE_TYPE", "_http._tcp.local."),
            ("MDNS_INSTANCE", "Verge Discover"),
            ("MDNS_HOSTNAME", "vg-dsc-pub.local."),
            ("MDNS_ADDRESSES", "10.254.120.2"),
            ("MDNS_PORT", "8080"),
            ("MDNS_TXT_PATH", "/status"),
            ("MDNS_TXT_MODEL", "DSC-1"),
        ],
    );
    assert_eq!(ids(&update), [id]);
    // Exit 0: the last list held devices.
    live.interrupt(0);

    assert_refuses(
        &exec,
        &[],
        dir.path(),
        "mdns",
        "serviceTypes: [_http._tcp]\ntxtValues: {action: Include, items: [novalue]}\n",
        "txtValues",
    );
}

// ---------------------------------------------------------------------------
// onvif: an ipycam virtual camera, discover in the other namespace

#[cfg(feature = "onvif")]
#[test]
fn onvif_ipycam_camera() {
    let python = cache().join("venv-onvif/bin/python");
    if !Needs::default()
        .root()
        .programs(&["ip", "ffmpeg"])
        .file(&python, "run tests/peers/onvif/setup.sh")
        .met("onvif")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = NetPair::new("10.254.121");
    let uuid = "0a1b2c3d-0000-4000-8000-0000000d15c0";
    let _camera = start_peer(
        "camera.py",
        net.python_in_b(&python, "onvif/camera.py").args([
            "--ip",
            "10.254.121.2",
            "--uuid",
            &format!("urn:uuid:{uuid}"),
            "--name",
            "vg-dsc-cam",
            "--model",
            "Model-D",
            "--serial",
            "SER-D1",
        ]),
        "READY",
        &dir.path().join("camera.log"),
    );

    let exec = NetPair::exec(&net.a);
    let d = write(dir.path(), "onvif.yaml", "probeIntervalSeconds: 2\n");
    let mut live = Live::start(
        "onvif",
        agent(&exec, &["--handler", "onvif", "--details", &d]),
    );
    // Described: identity and stream URIs come with the device.
    let (update, took) = live.wait_for("the camera, described", |u| {
        device(u, uuid).is_some_and(|d| d["properties"]["ONVIF_STREAM_URI"].is_string())
    });
    report("onvif", "the camera with its stream URIs", took);
    let mac = net.mac_b();
    assert_props(
        device(&update, uuid).expect("device"),
        &[
            (
                "ONVIF_DEVICE_SERVICE_URL",
                "http://10.254.121.2:8080/onvif/device_service",
            ),
            ("ONVIF_DEVICE_UUID", uuid),
            ("ONVIF_DEVICE_IP_ADDRESS", "10.254.121.2"),
            ("ONVIF_DEVICE_MAC_ADDRESS", &mac),
            ("ONVIF_MANUFACTURER", "PythonCam"),
            ("ONVIF_MODEL", "Model-D"),
            ("ONVIF_SERIAL", "SER-D1"),
            ("ONVIF_STREAM_URI", "rtsp://10.254.121.2:8554/video_main"),
            (
                "ONVIF_STREAM_URI_PROFILE_SUB",
                "rtsp://10.254.121.2:8554/video_sub",
            ),
        ],
    );
    assert_eq!(ids(&update), [uuid]);
    // Exit 0: the last list held devices.
    live.interrupt(0);

    assert_refuses(
        &exec,
        &[],
        dir.path(),
        "onvif",
        "unicastTargets: [not-an-address]\n",
        "unicastTargets",
    );
}
