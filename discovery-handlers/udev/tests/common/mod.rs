//! Running a test inside a umockdev testbed (shared by the udev and usb crates' tests).
//!
//! umockdev works through LD_PRELOAD, so a test re-runs its own test binary, filtered
//! to itself, under `umockdev-run` (static testbeds) or with `UMOCKDEV_DIR` of a
//! testbed driven by `tests/peers/usb/testbed.py` (hotplug). The body runs in that
//! child; the parent only checks the child's exit status.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child that runs a test's body.
pub const CHILD_ENV: &str = "VERGE_UMOCKDEV_CHILD";
/// In a hotplug child: the testbed driver's control socket.
pub const CONTROL_ENV: &str = "VERGE_TESTBED_CONTROL";

/// The testbed files.
pub fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/usb")
}

/// A testbed file by name.
pub fn testbed(name: &str) -> PathBuf {
    peers().join(name)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when the prerequisite is there; otherwise fails under `VERGE_E2E=required`
/// or prints one line and returns false.
pub fn prerequisite(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("VERGE_E2E").as_deref() == Ok("required") {
        panic!("{what} is missing and VERGE_E2E=required");
    }
    println!("skipped: {what} is missing");
    false
}

fn child_command(test: &str) -> Command {
    let exe = std::env::current_exe().expect("test executable");
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1");
    cmd
}

/// In the parent: runs `test` under `umockdev-run` with these testbeds, asserts it
/// passed and returns false. In the child: returns true, so the caller runs the body.
pub fn in_testbed(test: &str, files: &[&str]) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    if !prerequisite(
        have("umockdev-run"),
        "umockdev-run (Debian package umockdev)",
    ) {
        return false;
    }
    let mut cmd = Command::new("umockdev-run");
    for f in files {
        cmd.arg("--device").arg(testbed(f));
    }
    let child = child_command(test);
    cmd.arg("--")
        .arg(child.get_program())
        .args(child.get_args());
    cmd.env(CHILD_ENV, "1");
    let status = cmd.status().expect("run umockdev-run");
    assert!(status.success(), "{test} failed inside the testbed");
    false
}

/// The hotplug testbed driver, killed on drop.
pub struct Driver {
    child: Child,
    dir: tempfile::TempDir,
    /// The testbed root, for `UMOCKDEV_DIR`.
    pub root: String,
}

impl Driver {
    /// Starts `testbed.py` under `umockdev-wrapper`.
    pub fn start() -> Option<Self> {
        let ok = have("umockdev-run")
            && std::path::Path::new("/usr/bin/umockdev-wrapper").exists()
            && Command::new("/usr/bin/python3")
                .args(["-c", "import gi; gi.require_version('UMockdev', '1.0')"])
                .status()
                .is_ok_and(|s| s.success());
        if !prerequisite(
            ok,
            "umockdev-wrapper with python3-gi and gir1.2-umockdev-1.0",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control.sock");
        let mut child = Command::new("/usr/bin/umockdev-wrapper")
            .arg("/usr/bin/python3")
            .arg(peers().join("testbed.py"))
            .arg(&control)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start testbed.py");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("testbed root");
        let root = line.trim().to_string();
        assert!(!root.is_empty(), "testbed.py printed no root");
        Some(Self { child, dir, root })
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// In the parent: runs `test` in this testbed and asserts it passed.
    pub fn run(&self, test: &str) {
        let status = child_command(test)
            .env("UMOCKDEV_DIR", &self.root)
            .env("LD_PRELOAD", "libumockdev-preload.so.0")
            .env(CONTROL_ENV, self.control())
            .status()
            .expect("run the test in the testbed");
        assert!(status.success(), "{test} failed inside the testbed");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = send_to(&self.control(), "quit");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_to(control: &std::path::Path, command: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// In a hotplug child: sends a command to the testbed driver and asserts "ok".
pub fn testbed_command(command: &str) {
    let control = std::env::var_os(CONTROL_ENV).expect("control socket");
    let answer = send_to(std::path::Path::new(&control), command).expect("testbed driver");
    assert_eq!(answer, "ok", "testbed command {command:?}");
}
