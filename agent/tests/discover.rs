//! `verge-agent discover` run as a process: against the embedded debugEcho
//! handler, and against debugEcho served externally (unix socket and http)
//! by the SDK's `Runner` in this test process.
#![cfg(feature = "debug-echo")]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use verge_debug_echo::DebugEcho;
use verge_discovery_sdk::runner::ServeEndpoint;
use verge_discovery_sdk::{Runner, RunnerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_verge-agent");

fn discover(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("discover")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verge-agent");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait verge-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Details naming descriptions, with an availability file of the test's own.
fn details(dir: &Path, descriptions: &[&str]) -> PathBuf {
    let path = dir.join("details.yaml");
    let avail = dir.join("availability.txt");
    std::fs::write(&avail, "ONLINE").expect("write availability");
    std::fs::write(
        &path,
        format!(
            "descriptions: [{}]\navailabilityFile: {}\n",
            descriptions.join(", "),
            avail.display()
        ),
    )
    .expect("write details");
    path
}

#[test]
fn embedded_found_prints_table_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = details(dir.path(), &["cam-a", "cam-b"]);
    let out = discover(
        &[
            "--handler",
            "debugEcho",
            "--details",
            d.to_str().expect("utf8"),
            "--once",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("2 device(s)"), "{stdout}");
    assert!(
        stdout.contains("cam-a  DEBUG_ECHO_DESCRIPTION=cam-a"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cam-b  DEBUG_ECHO_DESCRIPTION=cam-b"),
        "{stdout}"
    );
}

#[test]
fn embedded_none_exits_1() {
    let out = discover(
        &[
            "--handler",
            "debugEcho",
            "--details",
            "-",
            "--once",
            "--json",
        ],
        Some("descriptions: []\n"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let line: serde_json::Value =
        serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line");
    assert_eq!(line["devices"], serde_json::json!([]));
}

#[test]
fn embedded_timeout_without_devices_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = details(dir.path(), &["x"]);
    std::fs::write(dir.path().join("availability.txt"), "OFFLINE").expect("write");
    let out = discover(
        &[
            "--handler",
            "debugEcho",
            "--details",
            d.to_str().expect("utf8"),
            "--timeout",
            "300ms",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("0 device(s)"));
}

#[test]
fn bad_settings_exit_2_with_one_line() {
    // The handler's InvalidArgument.
    let out = discover(
        &["--handler", "debugEcho", "--details", "-", "--once"],
        Some("descriptions: 5\n"),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("invalid discovery settings"), "{stderr}");
    assert!(out.stdout.is_empty());

    // Unknown embedded handler, bad property, missing details file.
    for args in [
        &["--handler", "nope", "--details", "-"][..],
        &[
            "--handler",
            "debugEcho",
            "--details",
            "-",
            "--property",
            "novalue",
        ][..],
        &[
            "--handler",
            "debugEcho",
            "--details",
            "/nonexistent/details",
        ][..],
    ] {
        let out = discover(args, Some("descriptions: [a]\n"));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn unreachable_endpoint_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let out = discover(
        &[
            "--handler",
            "x",
            "--endpoint",
            sock.to_str().expect("utf8"),
            "--details",
            "-",
            "--once",
        ],
        Some(""),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

/// debugEcho served by the SDK runner on its own runtime until dropped.
struct External {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl External {
    fn start(dir: &Path, endpoint: ServeEndpoint) -> External {
        let config = RunnerConfig {
            directory: dir.to_path_buf(),
            endpoint,
            ..RunnerConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let handler = Arc::new(DebugEcho::default());
                let _ = Runner::new(handler, config)
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        External {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for External {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn external_unix_socket_live_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("echo.sock");
    let _handler = External::start(dir.path(), ServeEndpoint::Uds(sock.clone()));
    wait_for("the handler's socket", || sock.exists());
    let d = details(dir.path(), &["lamp"]);

    let mut child = Command::new(BIN)
        .args(["discover", "--handler", "debugEcho", "--json", "--endpoint"])
        .arg(&sock)
        .arg("--details")
        .arg(&d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("a line").expect("read");
        serde_json::from_str(&line).expect("JSON line")
    };
    let first = next();
    assert_eq!(first["devices"][0]["id"], "lamp", "{first}");
    assert_eq!(
        first["devices"][0]["properties"]["DEBUG_ECHO_DESCRIPTION"],
        "lamp"
    );
    // Live: the devices vanish while the availability file says OFFLINE.
    std::fs::write(dir.path().join("availability.txt"), "OFFLINE").expect("write");
    let second = next();
    assert_eq!(second["devices"], serde_json::json!([]), "{second}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn external_http_endpoint_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _handler = External::start(
        dir.path(),
        ServeEndpoint::Network {
            bind: ([127, 0, 0, 1], port).into(),
            advertise: url.clone(),
        },
    );
    wait_for("the handler's port", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let d = details(dir.path(), &["net-1"]);
    let out = discover(
        &[
            "--handler",
            "debugEcho",
            "--endpoint",
            &url,
            "--details",
            d.to_str().expect("utf8"),
            "--once",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("net-1  DEBUG_ECHO_DESCRIPTION=net-1"),
        "{stdout}"
    );
}
