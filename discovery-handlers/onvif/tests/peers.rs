//! The onvif handler against independent peers (ipycam virtual cameras, the WSDiscovery
//! publisher, a hostile responder) in network namespaces `vg-onvif-*` joined by a bridge on
//! 10.254.70.0/24 and fd00:254:70::/64. Needs root, `ip`, iptables and the venv made by
//! `tests/peers/onvif/setup.sh`; without them the tests print one line and pass, unless
//! `VERGE_E2E=required`, where they fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate};
use verge_onvif::Onvif;

const SUBNET4: &str = "10.254.70";
const SUBNET6: &str = "fd00:254:70:";
const WAIT: Duration = Duration::from_secs(40);

fn venv_python() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/verge/venv-onvif/bin/python")
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/onvif")
}

fn local_peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Whether the prerequisites are there; fails under VERGE_E2E=required.
fn ready() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    let venv = venv_python().exists();
    if root && ip && venv {
        return true;
    }
    let why = format!("root={root} ip={ip} venv-onvif={venv} (run tests/peers/onvif/setup.sh)");
    if std::env::var("VERGE_E2E").as_deref() == Ok("required") {
        panic!("onvif peer tests need: {why}");
    }
    println!("skipping onvif peer test: {why}");
    false
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v);
}

/// A lab: a handler namespace with bridge `br0` (.1) and camera namespaces on it. Removed on drop.
struct Lab {
    tag: String,
    namespaces: Vec<String>,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let h = format!("vg-onvif-{tag}h");
        let _ = Command::new("ip").args(["netns", "del", &h]).output();
        let mut lab = Lab {
            tag: tag.into(),
            namespaces: Vec::new(),
        };
        lab.add_ns(&h);
        in_ns(
            &h,
            &[
                "ip",
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        );
        in_ns(
            &h,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SUBNET4}.1/24"),
                "dev",
                "br0",
            ],
        );
        in_ns(
            &h,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SUBNET6}:1/64"),
                "dev",
                "br0",
                "nodad",
            ],
        );
        in_ns(&h, &["ip", "link", "set", "br0", "up"]);
        lab
    }

    fn handler_ns(&self) -> String {
        format!("vg-onvif-{}h", self.tag)
    }

    fn add_ns(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.into());
        in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"]);
        in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        in_ns(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// A camera namespace `vg-onvif-<tag>c<k>` with eth0 at .<host> / ::<host>; returns its name.
    fn add_camera_ns(&mut self, k: u8, host: u8) -> String {
        let ns = format!("vg-onvif-{}c{k}", self.tag);
        self.add_ns(&ns);
        let h = self.handler_ns();
        let port = format!("vgo{}{k}", self.tag);
        sh(&[
            "ip", "link", "add", &port, "netns", &h, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        in_ns(&h, &["ip", "link", "set", &port, "master", "br0"]);
        in_ns(&h, &["ip", "link", "set", &port, "up"]);
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SUBNET4}.{host}/24"),
                "dev",
                "eth0",
            ],
        );
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SUBNET6}:{host:x}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"]);
        in_ns(&ns, &["ip", "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        ns
    }

    fn mac(&self, ns: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", "eth0"])
            .output()
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("mac")
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A peer process, killed on drop.
struct Peer {
    child: Child,
    name: String,
}

impl Peer {
    fn start(ns: &str, name: &str, script: &str, args: &[String]) -> Self {
        Self::start_script(ns, name, &peers_dir().join(script), args)
    }

    /// A peer from this crate's own tests/peers/ (the hand-written ones and wrappers).
    fn start_local(ns: &str, name: &str, script: &str, args: &[String]) -> Self {
        Self::start_script(ns, name, &local_peers_dir().join(script), args)
    }

    fn start_script(ns: &str, name: &str, script: &Path, args: &[String]) -> Self {
        let log = std::fs::File::create(format!("/tmp/vg-onvif-{name}.log")).expect("log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(venv_python())
            .arg("-u")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn peer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("READY") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(WAIT).is_err() {
            let _ = child.kill();
            panic!("{name} did not start; see /tmp/vg-onvif-{name}.log");
        }
        Peer {
            child,
            name: name.into(),
        }
    }

    fn camera(ns: &str, name: &str, ip: &str, uuid: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "--ip".into(),
            ip.into(),
            "--uuid".into(),
            uuid.into(),
            "--name".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start(ns, name, "camera.py", &args)
    }

    /// SIGTERM (ipycam sends Bye) and wait.
    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: gone without a Bye.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("stopped peer {}", self.name);
        }
    }
}

/// Captured log output of a handler.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

/// The handler, running in a thread inside the handler namespace.
struct Handler {
    updates: mpsc::Receiver<DiscoveryUpdate>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    last: DiscoveryUpdate,
}

impl Handler {
    fn start(ns: &str, details: &str, props: &[(&str, &str)]) -> Self {
        Self::start_with_logs(ns, details, props, None)
    }

    /// Like `start`, with every tracing event of the handler (all levels, oxvif's and
    /// reqwest's included) written to `logs`.
    fn start_logged(ns: &str, details: &str, props: &[(&str, &str)], logs: &Logs) -> Self {
        Self::start_with_logs(ns, details, props, Some(logs.clone()))
    }

    fn start_with_logs(
        ns: &str,
        details: &str,
        props: &[(&str, &str)],
        logs: Option<Logs>,
    ) -> Self {
        let ns_path = format!("/run/netns/{ns}");
        let request = DiscoveryRequest {
            details: details.to_string(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        };
        let (tx, updates) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("netns");
            use std::os::fd::AsRawFd;
            // Network namespaces are per thread; the runtime's threads are created from this one.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            // The runtime is current-thread, so this thread's default subscriber sees every
            // task of the handler.
            let _logging = logs.map(|logs| {
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::TRACE)
                    .with_ansi(false)
                    .with_writer(move || logs.clone())
                    .finish();
                tracing::subscriber::set_default(subscriber)
            });
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut stream = Onvif::default().discover(request).await.expect("discover");
                let mut stopped = stopped;
                loop {
                    tokio::select! {
                        u = stream.next() => match u {
                            Some(Ok(u)) => { if tx.send(u).is_err() { return; } }
                            other => panic!("stream ended: {other:?}"),
                        },
                        _ = &mut stopped => return,
                    }
                }
            });
        });
        Handler {
            updates,
            stop: Some(stop),
            thread: Some(thread),
            last: DiscoveryUpdate::default(),
        }
    }

    /// Waits for an update satisfying `pred` and returns it.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&DiscoveryUpdate) -> bool) -> DiscoveryUpdate {
        let deadline = Instant::now() + WAIT;
        if pred(&self.last) {
            return self.last.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.updates.recv_timeout(left) {
                Ok(u) => {
                    self.last = u;
                    if pred(&self.last) {
                        return self.last.clone();
                    }
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; last update: {:#?}",
                    self.last
                ),
            }
        }
    }

    /// Asserts that no update within `window` satisfies `pred`.
    fn never(&mut self, window: Duration, what: &str, pred: impl Fn(&DiscoveryUpdate) -> bool) {
        let deadline = Instant::now() + window;
        assert!(!pred(&self.last), "{what}: {:#?}", self.last);
        while let Ok(u) = self
            .updates
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            assert!(!pred(&u), "{what}: {u:#?}");
            self.last = u;
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ids(u: &DiscoveryUpdate) -> Vec<String> {
    let mut v: Vec<String> = u.devices.iter().map(|d| d.id.clone()).collect();
    v.sort();
    v
}

fn props_of<'a>(u: &'a DiscoveryUpdate, id: &str) -> Option<&'a BTreeMap<String, String>> {
    u.devices.iter().find(|d| d.id == id).map(|d| &d.properties)
}

const UUID1: &str = "0a1b2c3d-0000-4000-8000-000000000001";
const UUID2: &str = "0a1b2c3d-0000-4000-8000-000000000002";

#[test]
fn ipv4_multicast_identity_streams_ip_change_and_removal() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("a");
    let cam_ns = lab.add_camera_ns(1, 10);
    let mac = lab.mac(&cam_ns);
    let cam = Peer::camera(
        &cam_ns,
        "cam-a1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &["--serial", "SER-1", "--model", "Model-A"],
    );
    let mut h = Handler::start(&lab.handler_ns(), "probeIntervalSeconds: 2", &[]);
    let started = Instant::now();
    let u = h.wait_for("the camera", |u| props_of(u, UUID1).is_some());
    println!("found over IPv4 multicast in {:?}", started.elapsed());
    let p = props_of(&u, UUID1).expect("props");
    let want: BTreeMap<&str, String> = [
        (
            "ONVIF_DEVICE_SERVICE_URL",
            "http://10.254.70.10:8080/onvif/device_service".to_string(),
        ),
        ("ONVIF_DEVICE_UUID", UUID1.to_string()),
        ("ONVIF_DEVICE_IP_ADDRESS", "10.254.70.10".to_string()),
        ("ONVIF_DEVICE_MAC_ADDRESS", mac.clone()),
        ("ONVIF_MANUFACTURER", "PythonCam".to_string()),
        ("ONVIF_MODEL", "Model-A".to_string()),
        ("ONVIF_SERIAL", "SER-1".to_string()),
        (
            "ONVIF_STREAM_URI",
            "rtsp://10.254.70.10:8554/video_main".to_string(),
        ),
        (
            "ONVIF_STREAM_URI_PROFILE_MAIN",
            "rtsp://10.254.70.10:8554/video_main".to_string(),
        ),
        (
            "ONVIF_STREAM_URI_PROFILE_SUB",
            "rtsp://10.254.70.10:8554/video_sub".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    for (k, v) in &want {
        assert_eq!(p.get(*k), Some(v), "{k} in {p:#?}");
    }
    assert!(!p.get("ONVIF_FIRMWARE").expect("firmware").is_empty());
    // The stream URI is a real RTSP stream.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.handler_ns(),
            "timeout",
            "30",
            "ffprobe",
            "-v",
            "error",
            "-rtsp_transport",
            "tcp",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
        ])
        .arg(&want["ONVIF_STREAM_URI"])
        .output()
        .expect("ffprobe");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("h264"),
        "ffprobe: {out:?}"
    );

    // Same camera (same endpoint UUID) comes back on another address: same id, new properties.
    cam.stop();
    in_ns(
        &cam_ns,
        &["ip", "addr", "del", "10.254.70.10/24", "dev", "eth0"],
    );
    in_ns(
        &cam_ns,
        &["ip", "addr", "add", "10.254.70.11/24", "dev", "eth0"],
    );
    in_ns(
        &cam_ns,
        &["ip", "route", "replace", "224.0.0.0/4", "dev", "eth0"],
    );
    let cam = Peer::camera(
        &cam_ns,
        "cam-a1b",
        "10.254.70.11",
        &format!("urn:uuid:{UUID1}"),
        &["--serial", "SER-1", "--model", "Model-A"],
    );
    let u = h.wait_for("the camera on its new address", |u| {
        props_of(u, UUID1)
            .and_then(|p| p.get("ONVIF_DEVICE_IP_ADDRESS"))
            .map(String::as_str)
            == Some("10.254.70.11")
    });
    assert_eq!(ids(&u), [UUID1]);
    let p = props_of(&u, UUID1).expect("props");
    assert_eq!(p["ONVIF_STREAM_URI"], "rtsp://10.254.70.11:8554/video_main");
    assert_eq!(p["ONVIF_DEVICE_MAC_ADDRESS"], mac);

    // Killed without a Bye: gone once it missed two probe rounds (missedRoundsBeforeLost).
    let killed = Instant::now();
    cam.kill();
    h.wait_for("the camera gone", |u| u.devices.is_empty());
    println!(
        "removed {:?} after SIGKILL (probe interval 2 s)",
        killed.elapsed()
    );
}

#[test]
fn bye_removes_at_once_and_hello_adds_between_probes() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("b");
    let cam_ns = lab.add_camera_ns(1, 10);
    // Long interval: only Hello/Bye can explain changes within the test's waits.
    let mut h = Handler::start(&lab.handler_ns(), "probeIntervalSeconds: 3600", &[]);
    h.wait_for("the first (empty) list", |u| u.devices.is_empty());
    // Give the first round (1 s) time to finish so the camera can only come in through Hello.
    h.never(Duration::from_secs(2), "no camera yet", |u| {
        !u.devices.is_empty()
    });
    let cam = Peer::camera(
        &cam_ns,
        "cam-b1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &[],
    );
    let t = Instant::now();
    h.wait_for("the camera from its Hello", |u| {
        props_of(u, UUID1).is_some()
    });
    println!("Hello → listed in {:?}", t.elapsed());
    let t = Instant::now();
    cam.stop();
    h.wait_for("the camera gone after its Bye", |u| u.devices.is_empty());
    println!("Bye → removed in {:?}", t.elapsed());
}

#[test]
fn unicast_scan_finds_cameras_with_multicast_blocked() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("u");
    let cam_ns = lab.add_camera_ns(1, 10);
    let hns = lab.handler_ns();
    in_ns(
        &hns,
        &[
            "iptables",
            "-A",
            "OUTPUT",
            "-d",
            "224.0.0.0/4",
            "-j",
            "DROP",
        ],
    );
    in_ns(
        &hns,
        &["ip6tables", "-A", "OUTPUT", "-d", "ff00::/8", "-j", "DROP"],
    );
    let _cam = Peer::camera(
        &cam_ns,
        "cam-u1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &[],
    );
    let mut multicast_only = Handler::start(&hns, "probeIntervalSeconds: 1", &[]);
    let mut h = Handler::start(
        &hns,
        "probeIntervalSeconds: 2\nunicastTargets: [10.254.70.0/28]",
        &[],
    );
    let u = h.wait_for("the camera by unicast", |u| props_of(u, UUID1).is_some());
    assert_eq!(
        props_of(&u, UUID1).expect("p")["ONVIF_DEVICE_IP_ADDRESS"],
        "10.254.70.10"
    );
    multicast_only.never(Duration::from_secs(3), "multicast is blocked", |u| {
        !u.devices.is_empty()
    });
}

#[test]
fn ipv6_probe_and_device_service() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("6");
    let cam_ns = lab.add_camera_ns(1, 0x10);
    // ipycam serves IPv4 only: a WSDiscovery publisher answers the IPv6 probe for it, and socat
    // carries its device service to [fd00:254:70::10]:8080.
    let _cam = Peer::camera(
        &cam_ns,
        "cam-61",
        "10.254.70.16",
        &format!("urn:uuid:{UUID1}"),
        &[],
    );
    let mut proxy = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cam_ns,
            "socat",
            "TCP6-LISTEN:8080,bind=[fd00:254:70::10],reuseaddr,fork",
            "TCP4:10.254.70.16:8080",
        ])
        .spawn()
        .expect("socat");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _proxy = Kill(&mut proxy);
    let _publisher = Peer::start(
        &cam_ns,
        "pub-61",
        "publisher.py",
        &[
            "--uuid".into(),
            format!("urn:uuid:{UUID1}"),
            "--xaddr".into(),
            "http://[fd00:254:70::10]:8080/onvif/device_service".into(),
        ],
    );
    let mut h = Handler::start(
        &lab.handler_ns(),
        "ipv4: false\nprobeIntervalSeconds: 2",
        &[],
    );
    let u = h.wait_for("the camera over IPv6", |u| props_of(u, UUID1).is_some());
    let p = props_of(&u, UUID1).expect("p");
    assert_eq!(p["ONVIF_DEVICE_IP_ADDRESS"], "fd00:254:70::10");
    assert_eq!(
        p["ONVIF_DEVICE_SERVICE_URL"],
        "http://[fd00:254:70::10]:8080/onvif/device_service"
    );
    assert_eq!(p["ONVIF_MANUFACTURER"], "PythonCam");
}

#[test]
fn credentials_right_wrong_and_per_uuid() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("p");
    let cam_ns = lab.add_camera_ns(1, 10);
    let _cam = Peer::camera(
        &cam_ns,
        "cam-p1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &["--username", "admin", "--password", "s3cret-pw"],
    );
    let hns = lab.handler_ns();
    let details = "probeIntervalSeconds: 2";
    let mut right = Handler::start(
        &hns,
        details,
        &[
            ("username_default", "admin"),
            ("password_default", "s3cret-pw"),
        ],
    );
    let mut wrong = Handler::start(
        &hns,
        details,
        &[
            ("username_default", "admin"),
            ("password_default", "wrong-pw"),
        ],
    );
    let uuid_key = format!("password_{}", UUID1.replace('-', "_"));
    let user_key = format!("username_{}", UUID1.replace('-', "_"));
    let mut per_uuid = Handler::start(
        &hns,
        details,
        &[
            ("username_default", "admin"),
            ("password_default", "wrong-pw"),
            (&user_key, "admin"),
            (&uuid_key, "s3cret-pw"),
        ],
    );
    let mut none = Handler::start(&hns, details, &[]);

    let u = right.wait_for("the camera with the right password", |u| {
        props_of(u, UUID1).is_some()
    });
    let p = props_of(&u, UUID1).expect("p");
    assert_eq!(p["ONVIF_STREAM_URI"], "rtsp://10.254.70.10:8554/video_main");
    assert!(
        p.values().all(|v| !v.contains("s3cret")),
        "no credentials in properties"
    );
    per_uuid.wait_for("the camera with its per-UUID password", |u| {
        props_of(u, UUID1).is_some()
    });
    let u = wrong.wait_for("a diagnostic naming the camera", |u| {
        !u.diagnostics.is_empty()
    });
    assert!(u.devices.is_empty(), "not described with a wrong password");
    let d = &u.diagnostics[0];
    assert_eq!(d.subject, UUID1);
    assert_eq!(d.severity, "Error");
    assert!(
        d.message.contains(UUID1) && d.message.contains("rejected"),
        "{}",
        d.message
    );
    assert!(!d.message.contains("wrong-pw"), "{}", d.message);
    let u = none.wait_for("a diagnostic asking for credentials", |u| {
        !u.diagnostics.is_empty()
    });
    assert!(u.devices.is_empty() && u.diagnostics[0].message.contains("requires credentials"));
}

#[test]
fn filters_include_and_exclude() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("f");
    let ns1 = lab.add_camera_ns(1, 10);
    let ns2 = lab.add_camera_ns(2, 11);
    let mac1 = lab.mac(&ns1);
    let _c1 = Peer::camera(
        &ns1,
        "cam-f1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &["--model", "M-One"],
    );
    let _c2 = Peer::camera(
        &ns2,
        "Cam2",
        "10.254.70.11",
        &format!("urn:uuid:{UUID2}"),
        &["--model", "M-Two"],
    );
    let hns = lab.handler_ns();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (String::new(), vec![UUID1, UUID2]),
        (
            format!("uuids: {{action: Include, items: [\"urn:uuid:{UUID1}\"]}}"),
            vec![UUID1],
        ),
        (
            format!("uuids: {{action: Exclude, items: [{UUID1}]}}"),
            vec![UUID2],
        ),
        (
            "ipAddresses: {action: Exclude, items: [10.254.70.10]}".into(),
            vec![UUID2],
        ),
        (
            "ipAddresses: {action: Include, items: [10.254.70.10]}".into(),
            vec![UUID1],
        ),
        (
            format!(
                "macAddresses: {{action: Include, items: [\"{}\"]}}",
                mac1.to_uppercase()
            ),
            vec![UUID1],
        ),
        (
            "models: {action: Include, items: [M-Two]}".into(),
            vec![UUID2],
        ),
        (
            "manufacturers: {action: Exclude, items: [PythonCam]}".into(),
            vec![],
        ),
        (
            "scopes: {action: Include, items: [\"onvif://www.onvif.org/name/Cam2\"]}".into(),
            vec![UUID2],
        ),
    ];
    let mut handlers: Vec<(String, Vec<&str>, Handler)> = cases
        .into_iter()
        .map(|(f, want)| {
            let details = format!("probeIntervalSeconds: 2\n{f}");
            let h = Handler::start(&hns, &details, &[]);
            (f, want, h)
        })
        .collect();
    // The unfiltered handler sees both; after that every filtered one has had rounds too.
    let (_, _, all) = &mut handlers[0];
    all.wait_for("both cameras", |u| u.devices.len() == 2);
    for (f, want, h) in handlers.iter_mut() {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        if want.is_empty() {
            h.never(Duration::from_secs(3), f, |u| !u.devices.is_empty());
        } else {
            h.wait_for(f, |u| ids(u) == want);
            h.never(Duration::from_secs(1), f, |u| {
                !u.devices.is_empty() && ids(u) != want
            });
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn odd_publisher_and_hostile_responder() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("x");
    let good = lab.add_camera_ns(1, 10);
    let odd = lab.add_camera_ns(2, 11);
    let bad = lab.add_camera_ns(3, 12);
    let _cam = Peer::camera(
        &good,
        "cam-x1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &[],
    );
    // Odd but legal: only tds:Device, a host name XAddr first, many scopes, wrapped ProbeMatches;
    // its device service is the real camera's.
    let mut odd_args: Vec<String> = vec![
        "--uuid".into(),
        format!("urn:uuid:{UUID2}"),
        "--type".into(),
        "tds:Device".into(),
        "--xaddr".into(),
        "http://camera.invalid/onvif/device_service".into(),
        "--xaddr".into(),
        "http://10.254.70.10:8080/onvif/device_service".into(),
    ];
    for i in 0..40 {
        odd_args.push("--scope".into());
        odd_args.push(format!("onvif://www.onvif.org/location/room{i}"));
    }
    let _odd = Peer::start(&odd, "pub-x2", "publisher.py", &odd_args);
    let _hostile = Peer::start(
        &bad,
        "hostile-x3",
        "hostile.py",
        &["--ip".into(), "10.254.70.12".into()],
    );
    let before = rss_kib();
    let mut h = Handler::start(
        &lab.handler_ns(),
        "probeIntervalSeconds: 2\nrequestTimeoutSeconds: 2",
        &[],
    );
    let t = Instant::now();
    let u = h.wait_for(
        "the good and the odd camera, and diagnostics for the hostile ones",
        |u| ids(u) == [UUID1, UUID2] && u.diagnostics.len() >= 4,
    );
    println!(
        "first full list after {:?}: {} diagnostics",
        t.elapsed(),
        u.diagnostics.len()
    );
    for d in &u.diagnostics {
        assert!(d.subject.starts_with("bad0000"), "{d:?}");
    }
    // More rounds against the hostile side: still answering, memory bounded.
    let t = Instant::now();
    // The odd publisher keeps answering too: it is asked over IPv4 and IPv6 every round.
    for _ in 0..3 {
        h.never(
            Duration::from_secs(2),
            "losing the good or the odd camera",
            |u| ids(u) != [UUID1, UUID2],
        );
    }
    let grown = rss_kib().saturating_sub(before);
    println!(
        "RSS grew {grown} KiB over {:?} of hostile rounds",
        t.elapsed()
    );
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
}

/// Asserts that no property value holds `secret` or any userinfo (`…@host`).
fn assert_no_credentials(p: &BTreeMap<String, String>, secret: &str) {
    for (k, v) in p {
        assert!(!v.contains(secret), "{k}={v} holds the password");
        assert!(!v.contains('@'), "{k}={v} holds userinfo");
    }
}

/// POSTs a SOAP body to `url` from namespace `ns` (the venv's Python: no curl needed) and
/// returns the response text.
fn soap_post(ns: &str, url: &str, action: &str, body: &str) -> String {
    let script = "import sys, urllib.request as u\n\
        r = u.Request(sys.argv[1], data=sys.argv[3].encode(), headers={'Content-Type': \
        'application/soap+xml; charset=utf-8; action=\"%s\"' % sys.argv[2], 'SOAPAction': sys.argv[2]})\n\
        print(u.urlopen(r, timeout=10).read().decode())";
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(venv_python())
        .args(["-c", script, url, action, body])
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn stream_uri_userinfo_never_reaches_properties_or_logs() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("s");
    let cam_ns = lab.add_camera_ns(1, 10);
    // ipycam answering GetStreamUri with rtsp://admin:s3cret-pw@10.254.70.10:8554/... .
    let _cam = Peer::start_local(
        &cam_ns,
        "cam-s1",
        "camera_userinfo.py",
        &[
            "--stream-userinfo".into(),
            "admin:s3cret-pw".into(),
            "--ip".into(),
            "10.254.70.10".into(),
            "--uuid".into(),
            format!("urn:uuid:{UUID1}"),
            "--name".into(),
            "cam-s1".into(),
        ],
    );
    let hns = lab.handler_ns();
    // The peer really hands out the credentials (so what follows is not vacuous).
    let reply = soap_post(
        &hns,
        "http://10.254.70.10:8080/onvif/media_service",
        "http://www.onvif.org/ver10/media/wsdl/GetStreamUri",
        "<s:Envelope xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\"><s:Body>\
         <GetStreamUri xmlns=\"http://www.onvif.org/ver10/media/wsdl\"><ProfileToken>Profile_Main</ProfileToken>\
         </GetStreamUri></s:Body></s:Envelope>",
    );
    assert!(
        reply.contains("rtsp://admin:s3cret-pw@10.254.70.10:8554/video_main"),
        "{reply}"
    );
    let logs = Logs::default();
    let mut h = Handler::start_logged(
        &hns,
        "probeIntervalSeconds: 2",
        &[
            ("username_default", "admin"),
            ("password_default", "s3cret-pw"),
        ],
        &logs,
    );
    let u = h.wait_for("the camera", |u| props_of(u, UUID1).is_some());
    let p = props_of(&u, UUID1).expect("props");
    assert_eq!(p["ONVIF_STREAM_URI"], "rtsp://10.254.70.10:8554/video_main");
    assert_eq!(
        p["ONVIF_STREAM_URI_PROFILE_MAIN"],
        "rtsp://10.254.70.10:8554/video_main"
    );
    assert_eq!(
        p["ONVIF_STREAM_URI_PROFILE_SUB"],
        "rtsp://10.254.70.10:8554/video_sub"
    );
    assert_no_credentials(p, "s3cret-pw");
    assert!(u.diagnostics.iter().all(|d| !d.message.contains("s3cret")));
    // A few more rounds, then the whole log of the handler at trace level.
    h.never(Duration::from_secs(3), "losing the camera", |u| {
        props_of(u, UUID1).is_none()
    });
    drop(h);
    let text = logs.text();
    assert!(text.contains("camera described"), "logs captured: {text}");
    assert!(!text.contains("s3cret-pw"), "password in the logs:\n{text}");
    assert!(!text.contains("admin:"), "userinfo in the logs:\n{text}");
    println!("{} bytes of trace-level logs, no credentials", text.len());
}

const SOAP_PW: &str = "d1gest-Pw!";
const SOAP_MAC: &str = "02:5e:00:00:00:42";

#[test]
fn media2_network_interfaces_and_http_digest_against_soap_responder() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("d");
    let cam_ns = lab.add_camera_ns(1, 10);
    let veth_mac = lab.mac(&cam_ns);
    assert_ne!(veth_mac, SOAP_MAC);
    // Our canned ONVIF replies behind CherryPy's digest auth (see soap_responder.py), found
    // through a WSDiscovery publisher.
    let _soap = Peer::start_local(
        &cam_ns,
        "soap-d1",
        "soap_responder.py",
        &[
            "--ip".into(),
            "10.254.70.10".into(),
            "--mac".into(),
            SOAP_MAC.into(),
            "--username".into(),
            "admin".into(),
            "--password".into(),
            SOAP_PW.into(),
            "--stream-userinfo".into(),
            format!("admin:{SOAP_PW}"),
        ],
    );
    let _publisher = Peer::start(
        &cam_ns,
        "pub-d1",
        "publisher.py",
        &[
            "--uuid".into(),
            format!("urn:uuid:{UUID1}"),
            "--xaddr".into(),
            "http://10.254.70.10:8081/onvif/device_service".into(),
        ],
    );
    let hns = lab.handler_ns();
    let details = "probeIntervalSeconds: 2\nipv6: false";
    let logs = Logs::default();
    let mut right = Handler::start_logged(
        &hns,
        details,
        &[("username_default", "admin"), ("password_default", SOAP_PW)],
        &logs,
    );
    let mut wrong = Handler::start(
        &hns,
        details,
        &[
            ("username_default", "admin"),
            ("password_default", "nope-nope"),
        ],
    );
    let mut none = Handler::start(&hns, details, &[]);

    let u = right.wait_for("the camera through HTTP digest", |u| {
        props_of(u, UUID1).is_some()
    });
    let p = props_of(&u, UUID1).expect("props");
    let want = [
        (
            "ONVIF_DEVICE_SERVICE_URL",
            "http://10.254.70.10:8081/onvif/device_service",
        ),
        // From GetNetworkInterfaces (the enabled interface), not from the ARP table.
        ("ONVIF_DEVICE_MAC_ADDRESS", SOAP_MAC),
        ("ONVIF_MANUFACTURER", "VergeSOAP"),
        ("ONVIF_MODEL", "Media2-Digest"),
        ("ONVIF_FIRMWARE", "2.4.1"),
        ("ONVIF_SERIAL", "SOAP-0042"),
        // Media2 preferred over Media1 (whose only profile is media1_main); userinfo gone.
        ("ONVIF_STREAM_URI", "rtsp://10.254.70.10:8554/main2"),
        ("ONVIF_STREAM_URI_MAIN2", "rtsp://10.254.70.10:8554/main2"),
        ("ONVIF_STREAM_URI_SUB2", "rtsp://10.254.70.10:8554/sub2"),
    ];
    for (k, v) in want {
        assert_eq!(p.get(k).map(String::as_str), Some(v), "{k} in {p:#?}");
    }
    assert!(!p.contains_key("ONVIF_STREAM_URI_MEDIA1_MAIN"), "{p:#?}");
    assert_no_credentials(p, SOAP_PW);

    let u = wrong.wait_for("a diagnostic for the wrong password", |u| {
        !u.diagnostics.is_empty()
    });
    assert!(u.devices.is_empty());
    let d = &u.diagnostics[0];
    assert_eq!((d.subject.as_str(), d.severity.as_str()), (UUID1, "Error"));
    assert!(d.message.contains("rejected"), "{}", d.message);
    assert!(!d.message.contains("nope-nope"), "{}", d.message);
    let u = none.wait_for("a diagnostic asking for credentials", |u| {
        !u.diagnostics.is_empty()
    });
    assert!(u.devices.is_empty() && u.diagnostics[0].message.contains("requires credentials"));
    drop(right);
    let text = logs.text();
    assert!(text.contains("camera described"), "logs captured: {text}");
    assert!(!text.contains(SOAP_PW), "password in the logs:\n{text}");
}

impl Lab {
    /// A second link out of the handler namespace: `name` there at 10.254.<net>.1/24 and
    /// fd00:254:<net>::1/64, its peer in a new namespace that answers nothing.
    fn add_link(&mut self, name: &str, net: u8) {
        let ns = format!("vg-onvif-{}{name}", self.tag);
        self.add_ns(&ns);
        let h = self.handler_ns();
        sh(&[
            "ip", "link", "add", name, "netns", &h, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        for (n, end) in [(&h, name), (&ns, "eth0")] {
            let host = if n == &h { 1 } else { 2 };
            in_ns(
                n,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.254.{net}.{host}/24"),
                    "dev",
                    end,
                ],
            );
            in_ns(
                n,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("fd00:254:{net}::{host}/64"),
                    "dev",
                    end,
                    "nodad",
                ],
            );
            in_ns(n, &["ip", "link", "set", end, "up"]);
        }
    }
}

/// WS-Discovery datagrams (UDP to port 3702) sent out of each interface of `ns`, counted by
/// iptables/ip6tables rules without a target.
struct ProbeCounter {
    ns: String,
    interfaces: Vec<String>,
}

impl ProbeCounter {
    fn new(ns: &str, interfaces: &[&str]) -> Self {
        for tool in ["iptables", "ip6tables"] {
            for i in interfaces {
                in_ns(
                    ns,
                    &[
                        tool, "-A", "OUTPUT", "-o", i, "-p", "udp", "--dport", "3702",
                    ],
                );
            }
        }
        ProbeCounter {
            ns: ns.into(),
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn zero(&self) {
        for tool in ["iptables", "ip6tables"] {
            in_ns(&self.ns, &[tool, "-Z", "OUTPUT"]);
        }
    }

    /// (IPv4, IPv6) datagrams out of `interface` since the last `zero`.
    fn sent(&self, interface: &str) -> (u64, u64) {
        assert!(self.interfaces.iter().any(|i| i == interface));
        let count = |tool: &str| {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.ns, tool, "-S", "OUTPUT", "-v"])
                .output()
                .expect("iptables");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // "-A OUTPUT -o br0 -p udp -m udp --dport 3702 -c <packets> <bytes>"
            text.lines()
                .find(|l| l.contains(&format!("-o {interface} ")))
                .and_then(|l| l.split(" -c ").nth(1))
                .and_then(|c| c.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no counter for {interface}: {text}"))
        };
        (count("iptables"), count("ip6tables"))
    }

    /// Waits (polling under a deadline) until `interface` has sent at least `n` probes per family.
    fn wait_sent(&self, interface: &str, n: u64) -> (u64, u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let c = self.sent(interface);
            if c.0 >= n && c.1 >= n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{interface} sent only {c:?} probes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn interfaces_setting_and_default_route_exclusion() {
    if !ready() {
        return;
    }
    let mut lab = Lab::new("i");
    let cam_ns = lab.add_camera_ns(1, 10);
    let hns = lab.handler_ns();
    // vgoi2 holds the IPv4 default route, vgoi3 the IPv6 one; the camera is on br0 only.
    lab.add_link("vgoi2", 72);
    lab.add_link("vgoi3", 73);
    in_ns(
        &hns,
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.254.72.2",
            "dev",
            "vgoi2",
        ],
    );
    in_ns(
        &hns,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:254:73::2",
            "dev",
            "vgoi3",
        ],
    );
    let probes = ProbeCounter::new(&hns, &["br0", "vgoi2", "vgoi3"]);
    let _cam = Peer::camera(
        &cam_ns,
        "cam-i1",
        "10.254.70.10",
        &format!("urn:uuid:{UUID1}"),
        &[],
    );

    // Default interfaces: br0 probed (IPv4 and IPv6), both default-route links never.
    probes.zero();
    let mut h = Handler::start(&hns, "probeIntervalSeconds: 1", &[]);
    h.wait_for("the camera on the default interfaces", |u| {
        ids(u) == [UUID1]
    });
    // Two rounds at least: two probes (NVT, Device) per family and round.
    let on_br0 = probes.wait_sent("br0", 4);
    drop(h);
    let (v2, v3) = (probes.sent("vgoi2"), probes.sent("vgoi3"));
    println!("default: probes out of br0 {on_br0:?}, vgoi2 {v2:?}, vgoi3 {v3:?}");
    assert_eq!(v2, (0, 0), "probes out of the IPv4 default-route interface");
    assert_eq!(v3, (0, 0), "probes out of the IPv6 default-route interface");

    // interfaces: [br0] — the camera's link — finds it, and nothing goes elsewhere.
    probes.zero();
    let mut h = Handler::start(&hns, "probeIntervalSeconds: 1\ninterfaces: [br0]", &[]);
    h.wait_for("the camera on br0", |u| ids(u) == [UUID1]);
    probes.wait_sent("br0", 2);
    drop(h);
    assert_eq!(probes.sent("vgoi2"), (0, 0));
    assert_eq!(probes.sent("vgoi3"), (0, 0));

    // interfaces: [vgoi2] — named explicitly, so probed although it holds the default route —
    // does not reach the camera; br0 stays silent.
    probes.zero();
    let mut h = Handler::start(&hns, "probeIntervalSeconds: 1\ninterfaces: [vgoi2]", &[]);
    let out = probes.wait_sent("vgoi2", 4);
    h.never(Duration::from_secs(3), "the camera through vgoi2", |u| {
        !u.devices.is_empty()
    });
    drop(h);
    println!("interfaces: [vgoi2]: probes out of vgoi2 {out:?}");
    assert_eq!(probes.sent("br0"), (0, 0), "probes out of br0");
    assert_eq!(probes.sent("vgoi3"), (0, 0), "probes out of vgoi3");
}
