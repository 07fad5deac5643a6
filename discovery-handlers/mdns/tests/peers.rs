//! The mdns handler against independent mDNS responders (avahi, python
//! zeroconf), each test in its own network namespaces joined by a veth pair on
//! 10.254.110.0/24 and fd00:254:110::/64. The handler runs in a thread that
//! entered the querier namespace, so every packet stays off the real network.
//! Needs root, `ip`, `iptables`, avahi and the venv of tests/peers/mdns/setup.sh;
//! without them the tests print one line and pass, except under
//! `VERGE_E2E=required`, where they fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{Device, DiscoveryHandler, DiscoveryRequest};
use verge_mdns::Mdns;

/// Bounds a hang; not the measurement.
const DEADLINE: Duration = Duration::from_secs(20);

fn prerequisites() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for tool in [
        "ip",
        "iptables",
        "avahi-daemon",
        "avahi-publish",
        "dbus-daemon",
        "nsenter",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            missing.push(tool.to_string());
        }
    }
    if !python().exists() {
        missing.push(format!(
            "{} (tests/peers/mdns/setup.sh)",
            python().display()
        ));
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VERGE_E2E").as_deref() == Ok("required") {
        panic!("mdns peer tests need: {}", missing.join(", "));
    }
    println!("skipped: mdns peer tests need {}", missing.join(", "));
    false
}

fn python() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/verge/venv-mdns/bin/python")
}

fn publish_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/mdns/publish.py")
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Querier namespace `q` and peer namespace `p`, on one veth link; with
/// `uplink`, a third namespace `u` behind a second veth that holds q's default route.
struct Testbed {
    q: String,
    p: String,
    u: Option<String>,
    q_if: String,
    p_if: String,
    up_if: String,
    tag: String,
}

impl Testbed {
    fn new(uplink: bool) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 10000);
        let tb = Testbed {
            q: format!("vg-mdns-q{tag}"),
            p: format!("vg-mdns-p{tag}"),
            u: uplink.then(|| format!("vg-mdns-u{tag}")),
            q_if: format!("vgm{tag}q"),
            p_if: format!("vgm{tag}p"),
            up_if: format!("vgm{tag}u"),
            tag,
        };
        let (q, p, qi, pi) = (&tb.q, &tb.p, &tb.q_if, &tb.p_if);
        for ns in [q, p].into_iter().chain(tb.u.as_ref()) {
            sh(&format!(
                "ip netns add {ns} && ip -n {ns} link set lo up && ip netns exec {ns} sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0"
            ));
        }
        sh(&format!(
            "ip link add {qi} type veth peer name {pi} && ip link set {qi} netns {q} && ip link set {pi} netns {p} \
             && ip -n {q} addr add 10.254.110.1/24 dev {qi} && ip -n {q} addr add fd00:254:110::1/64 dev {qi} nodad \
             && ip -n {p} addr add 10.254.110.2/24 dev {pi} && ip -n {p} addr add fd00:254:110::2/64 dev {pi} nodad \
             && ip -n {q} link set {qi} up && ip -n {p} link set {pi} up \
             && ip -n {p} route add 224.0.0.0/4 dev {pi}"
        ));
        if let Some(u) = &tb.u {
            let ui = &tb.up_if;
            sh(&format!(
                "ip link add {ui} type veth peer name {ui}x && ip link set {ui} netns {q} && ip link set {ui}x netns {u} \
                 && ip -n {q} addr add 10.254.111.1/24 dev {ui} && ip -n {q} addr add fd00:254:111::1/64 dev {ui} nodad \
                 && ip -n {u} addr add 10.254.111.2/24 dev {ui}x && ip -n {q} link set {ui} up && ip -n {u} link set {ui}x up \
                 && ip -n {q} route add default via 10.254.111.2 && ip -n {q} -6 route add default via fd00:254:111::2 dev {ui} \
                 && ip netns exec {q} iptables -w -I OUTPUT 1 -o {ui} -d 224.0.0.0/4 -j DROP \
                 && ip netns exec {q} ip6tables -w -I OUTPUT 1 -o {ui} -d ff00::/8 ! -p ipv6-icmp -j DROP"
            ));
        }
        tb
    }

    /// Packets the uplink guard dropped (IPv4 + IPv6).
    fn uplink_multicast(&self) -> u64 {
        let mut total = 0;
        for tool in ["iptables", "ip6tables"] {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &self.q, tool, "-w", "-L", "OUTPUT", "-n", "-v", "-x",
                ])
                .output()
                .expect("iptables");
            for line in String::from_utf8_lossy(&out.stdout).lines().skip(2) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.get(2) == Some(&"DROP") {
                    total += f[0].parse::<u64>().unwrap_or(0);
                }
            }
        }
        total
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in [&self.q, &self.p].into_iter().chain(self.u.as_ref()) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: a valid namespace fd; setns changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The handler, running in a namespace; its device lists arrive on `updates`.
struct Handler {
    updates: mpsc::Receiver<Result<Vec<Device>, String>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    latest: Vec<Device>,
}

impl Handler {
    fn start(ns: &str, details: &str) -> Self {
        let (tx, updates) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let details = details.to_string();
        let thread = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let request = DiscoveryRequest {
                    details,
                    properties: Default::default(),
                };
                let mut stream = match Mdns::default().discover(request).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        item = stream.next() => match item {
                            Some(Ok(u)) => { if tx.send(Ok(u.devices)).is_err() { break } }
                            Some(Err(e)) => { let _ = tx.send(Err(e.to_string())); break }
                            None => break,
                        },
                        _ = &mut stop_rx => break,
                    }
                }
                // Dropping the stream, then the runtime, drops the browse task, whose guard
                // shuts its daemon down.
                drop(stream);
            });
        });
        Handler {
            updates,
            stop: Some(stop),
            thread: Some(thread),
            latest: Vec::new(),
        }
    }

    /// Waits until `pred` holds for the current list; returns it.
    fn wait(&mut self, what: &str, pred: impl Fn(&[Device]) -> bool) -> Vec<Device> {
        let end = Instant::now() + DEADLINE;
        loop {
            if pred(&self.latest) {
                return self.latest.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.updates.recv_timeout(left) {
                Ok(Ok(list)) => self.latest = list,
                Ok(Err(e)) => panic!("{what}: handler error {e}"),
                Err(_) => panic!(
                    "{what}: not within {DEADLINE:?}; last list {:#?}",
                    self.latest
                ),
            }
        }
    }

    fn ids(&self) -> Vec<String> {
        self.latest.iter().map(|d| d.id.clone()).collect()
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

fn has(id: &str) -> impl Fn(&[Device]) -> bool + '_ {
    move |l| l.iter().any(|d| d.id == id)
}

fn device<'a>(list: &'a [Device], id: &str) -> &'a Device {
    list.iter().find(|d| d.id == id).expect("device present")
}

fn props(d: &Device) -> BTreeMap<String, String> {
    d.properties.clone().into_iter().collect()
}

/// avahi-daemon (with its own system bus) in the peer namespace, in a private
/// mount namespace so it cannot meet any other avahi or dbus on the machine.
struct Avahi {
    daemon: Child,
    dir: PathBuf,
    publishers: Vec<Child>,
    host: String,
}

impl Avahi {
    fn start(tb: &Testbed) -> Self {
        let dir = std::env::temp_dir().join(format!("vg-mdns-avahi-{}", tb.tag));
        std::fs::create_dir_all(&dir).expect("dir");
        let host = format!("vgm-avahi-{}", tb.tag);
        std::fs::write(
            dir.join("avahi.conf"),
            format!(
                "[server]\nhost-name={host}\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces={}\nenable-dbus=yes\nratelimit-interval-usec=0\n\
                 [wide-area]\nenable-wide-area=no\n[publish]\npublish-hinfo=no\npublish-workstation=no\n",
                tb.p_if
            ),
        )
        .expect("conf");
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/dbus /run/avahi-daemon; \
             dbus-daemon --system --nofork & echo $! > {d}/dbus.pid; \
             for i in $(seq 100); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.05; done; \
             exec avahi-daemon -f {d}/avahi.conf --no-rlimits --no-chroot",
            d = dir.display()
        );
        let daemon = Command::new("ip")
            .args(["netns", "exec", &tb.p, "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("avahi");
        let avahi = Avahi {
            daemon,
            dir,
            publishers: Vec::new(),
            host: format!("{host}.local."),
        };
        let end = Instant::now() + DEADLINE;
        while !avahi
            .nsenter(&["avahi-daemon", "--check"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < end, "avahi-daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        avahi
    }

    fn nsenter(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.daemon.id().to_string(), "-m", "-n", "--"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// `avahi-publish -s`; returns its index (for [`Avahi::unpublish`]).
    fn publish(&mut self, name: &str, ty: &str, port: u16, txt: &[&str]) -> usize {
        let port = port.to_string();
        let mut args = vec!["avahi-publish", "-s", name, ty, port.as_str()];
        args.extend_from_slice(txt);
        let child = self.nsenter(&args).spawn().expect("avahi-publish");
        self.publishers.push(child);
        self.publishers.len() - 1
    }

    /// Stops one publisher with SIGTERM: avahi withdraws the service with goodbyes.
    fn unpublish(&mut self, i: usize) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.publishers[i].id() as i32, libc::SIGTERM) };
        let _ = self.publishers[i].wait();
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        for p in &mut self.publishers {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("dbus.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            // SAFETY: the dbus-daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A python zeroconf publisher (tests/peers/mdns/publish.py) in a namespace.
struct ZcPublisher {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl ZcPublisher {
    fn start(ns: &str, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(python())
            .arg(publish_script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("publish.py");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut p = ZcPublisher { child, out };
        p.expect_line("ready");
        p
    }

    fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), want, "publish.py said {line:?}");
    }

    fn command(&mut self, cmd: &str, reply: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write");
        stdin.flush().expect("flush");
        self.expect_line(reply);
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ZcPublisher {
    fn drop(&mut self) {
        self.sigkill();
    }
}

#[test]
fn avahi_services_are_found_updated_and_removed_by_goodbye() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut avahi = Avahi::start(&tb);
    let printer = avahi.publish(
        "Test Printer",
        "_http._tcp",
        8080,
        &["path=/x", "model=X1", "Odd-Key.v=1"],
    );
    avahi.publish("Other Type", "_ipp._tcp", 631, &[]);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_http._tcp.local.]");
    let id = "Test Printer._http._tcp.local.";
    let list = h.wait("avahi service", has(id));
    let p = props(device(&list, id));
    assert_eq!(p["MDNS_SERVICE_TYPE"], "_http._tcp.local.");
    assert_eq!(p["MDNS_INSTANCE"], "Test Printer");
    assert_eq!(p["MDNS_HOSTNAME"], avahi.host);
    // avahi publishes the interface's IPv6 address too (publish-aaaa-on-ipv4 is on by default).
    assert_eq!(p["MDNS_ADDRESSES"], "10.254.110.2,fd00:254:110::2");
    assert_eq!(p["MDNS_PORT"], "8080");
    assert_eq!(p["MDNS_TXT_PATH"], "/x");
    assert_eq!(p["MDNS_TXT_MODEL"], "X1");
    assert_eq!(p["MDNS_TXT_ODD_KEY_V"], "1");
    assert_eq!(p.len(), 8, "{p:?}");

    // A second service of the browsed type comes; the _ipp one never does.
    avahi.publish("Second", "_http._tcp", 8081, &[]);
    h.wait("second service", has("Second._http._tcp.local."));
    assert_eq!(h.ids().len(), 2, "only _http services: {:?}", h.ids());

    // Goodbye: avahi-publish withdraws on SIGTERM.
    let t = Instant::now();
    avahi.unpublish(printer);
    h.wait("goodbye removes", |l| !has(id)(l));
    let took = t.elapsed();
    println!("goodbye → removed: {took:?}");
    // The record is kept `GOODBYE_GRACE` (250 ms, our patch of RFC 6762 §10.1's second) after the
    // goodbye: the device must be gone within a second of the publisher leaving.
    assert!(took < Duration::from_millis(1000), "goodbye took {took:?}");
    assert_eq!(h.ids(), ["Second._http._tcp.local."]);
}

#[test]
fn filters_pick_services() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut avahi = Avahi::start(&tb);
    avahi.publish("cam-1", "_rtsp._tcp", 554, &["model=A", "path=/s"]);
    avahi.publish("cam-2", "_rtsp._tcp", 8554, &["model=B"]);
    avahi.publish("Door [7]", "_rtsp._tcp", 80, &["model=old-1"]);
    let base = "serviceTypes: [_rtsp._tcp]\n";
    let mut all = Handler::start(&tb.q, base);
    let cases = [
        (
            "instanceNames: {action: Include, items: ['glob:cam-*']}",
            vec!["cam-1", "cam-2"],
        ),
        (
            "instanceNames: {action: Include, items: ['door [7]']}",
            vec!["Door [7]"],
        ),
        (
            "instanceNames: {action: Exclude, items: ['regex:^cam-[0-9]$']}",
            vec!["Door [7]"],
        ),
        (
            "ports: {action: Include, items: ['500-600', '80']}",
            vec!["Door [7]", "cam-1"],
        ),
        ("txtKeys: {action: Include, items: [PATH]}", vec!["cam-1"]),
        (
            "txtValues: {action: Exclude, items: ['model=glob:old*']}",
            vec!["cam-1", "cam-2"],
        ),
        (
            "hostNames: {action: Exclude, items: ['glob:vgm-avahi-*']}",
            vec![],
        ),
        (
            "addressFamilies: {action: Exclude, items: [IPv4]}",
            vec!["Door [7]", "cam-1", "cam-2"],
        ),
        (
            "addressFamilies: {action: Exclude, items: [IPv4, IPv6]}",
            vec![],
        ),
    ];
    let mut handlers: Vec<(&str, Vec<&str>, Handler)> = cases
        .into_iter()
        .map(|(f, want)| (f, want, Handler::start(&tb.q, &format!("{base}{f}"))))
        .collect();
    all.wait("all three", |l| l.len() == 3);
    for (filter, want, h) in &mut handlers {
        let want: Vec<String> = want
            .iter()
            .map(|n| format!("{n}._rtsp._tcp.local."))
            .collect();
        let got = h.wait(filter, |l| {
            let mut ids: Vec<String> = l.iter().map(|d| d.id.clone()).collect();
            ids.sort();
            ids == want
        });
        assert_eq!(got.len(), want.len(), "{filter}");
    }
    // The negative cases above could pass by not having seen anything yet:
    // once the unfiltered handler has all three, each filtered one has had
    // the same answers (one daemon per handler, same multicast), so re-check
    // after a further round of the unfiltered one.
    for (filter, want, h) in &mut handlers {
        while let Ok(Ok(list)) = h.updates.try_recv() {
            h.latest = list;
        }
        let mut ids = h.ids();
        ids.sort();
        let want: Vec<String> = want
            .iter()
            .map(|n| format!("{n}._rtsp._tcp.local."))
            .collect();
        assert_eq!(ids, want, "{filter}");
        if filter.contains("Exclude, items: [IPv4]") {
            for d in &h.latest {
                assert_eq!(props(d)["MDNS_ADDRESSES"], "fd00:254:110::2", "{filter}");
            }
        }
    }
}

#[test]
fn zeroconf_sigkill_expires_by_ttl_txt_changes_and_goodbye() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_opcua-tcp._tcp]");
    let ttl = 3;
    let args = |name: &'static str| {
        vec![
            "--name",
            name,
            "--type",
            "_opcua-tcp._tcp.local.",
            "--port",
            "4840",
            "--host",
            "plc.local.",
            "--addr",
            "10.254.110.2",
            "--ttl",
            "3",
            "--txt",
            "a=1",
        ]
    };
    let mut killed = ZcPublisher::start(&tb.p, &args("Killed"));
    let mut changing = ZcPublisher::start(&tb.p, &args("Changing"));
    let killed_id = "Killed._opcua-tcp._tcp.local.";
    let changing_id = "Changing._opcua-tcp._tcp.local.";
    let list = h.wait("both", |l| has(killed_id)(l) && has(changing_id)(l));
    assert_eq!(props(device(&list, changing_id))["MDNS_TXT_A"], "1");
    assert_eq!(
        props(device(&list, changing_id))["MDNS_HOSTNAME"],
        "plc.local."
    );

    // TXT change → properties updated.
    let t = Instant::now();
    changing.command("txt a=2 b=3", "updated");
    let list = h.wait("txt change", |l| {
        l.iter().any(|d| {
            d.id == changing_id && d.properties.get("MDNS_TXT_B").map(String::as_str) == Some("3")
        })
    });
    println!("TXT change → updated: {:?}", t.elapsed());
    assert_eq!(props(device(&list, changing_id))["MDNS_TXT_A"], "2");

    // SIGKILL: no goodbye; removed when the records' TTL runs out.
    let t = Instant::now();
    killed.sigkill();
    h.wait("TTL expiry", |l| !has(killed_id)(l));
    let took = t.elapsed();
    println!("SIGKILL with TTL {ttl}s → removed: {took:?}");
    assert!(took <= Duration::from_secs(ttl + 1), "expiry took {took:?}");
    // The live publisher with the same short TTL stays for several TTLs: the
    // querier refreshes its records (at 80 % of the TTL) and it answers.
    let end = Instant::now() + Duration::from_secs(2 * ttl);
    while Instant::now() < end {
        if let Ok(Ok(l)) = h.updates.recv_timeout(Duration::from_millis(100)) {
            h.latest = l;
        }
        assert!(
            h.latest.iter().any(|d| d.id == changing_id),
            "the live one stays"
        );
    }

    // Goodbye from zeroconf.
    let t = Instant::now();
    changing.command("quit", "bye");
    h.wait("goodbye", |l| l.is_empty());
    let took = t.elapsed();
    println!("zeroconf goodbye → removed: {took:?}");
    assert!(took < Duration::from_millis(1000), "goodbye took {took:?}");
}

#[test]
fn ipv6_only_service() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_coap._udp]");
    let v4only = Handler::start(
        &tb.q,
        "serviceTypes: [_coap._udp]\naddressFamilies: {action: Include, items: [IPv4]}",
    );
    let _p = ZcPublisher::start(
        &tb.p,
        &[
            "--name",
            "Six",
            "--type",
            "_coap._udp.local.",
            "--port",
            "5683",
            "--host",
            "six.local.",
            "--addr",
            "fd00:254:110::2",
            "--txt",
            "rt=sensor",
        ],
    );
    let id = "Six._coap._udp.local.";
    let list = h.wait("IPv6-only service", has(id));
    let p = props(device(&list, id));
    assert_eq!(p["MDNS_ADDRESSES"], "fd00:254:110::2");
    assert_eq!(p["MDNS_PORT"], "5683");
    assert_eq!(p["MDNS_TXT_RT"], "sensor");
    assert!(v4only.latest.is_empty());
    while let Ok(Ok(list)) = v4only.updates.try_recv() {
        assert!(list.is_empty(), "IPv4 filter keeps no IPv6-only service");
    }
}

#[test]
fn never_multicasts_out_of_the_default_route_interface() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(true);
    let mut avahi = Avahi::start(&tb);
    avahi.publish("Lan", "_http._tcp", 80, &[]);
    {
        let mut h = Handler::start(&tb.q, "serviceTypes: [_http._tcp]");
        h.wait("service on the LAN", has("Lan._http._tcp.local."));
        // Let a few query rounds (1 s, 2 s) go by.
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Ok(l)) = h.updates.recv_timeout(Duration::from_millis(200)) {
                h.latest = l;
            }
        }
    }
    assert_eq!(
        tb.uplink_multicast(),
        0,
        "multicast out of the default-route interface"
    );

    // The guard does count: an unpatched-style daemon (no initial selection) joins there.
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = in_netns(&tb.q, move || {
        let d = mdns_sd::ServiceDaemon::new().expect("daemon");
        let _rx = d.browse("_http._tcp.local.").expect("browse");
        // Browses until the test has seen its multicast (or given up).
        let _ = stopped.recv_timeout(DEADLINE);
        let _ = d.shutdown();
    });
    let end = Instant::now() + DEADLINE;
    let mut counted = tb.uplink_multicast();
    while counted == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        counted = tb.uplink_multicast();
    }
    let _ = stop.send(());
    handle.join().expect("join");
    assert!(counted > 0, "the guard must see a plain mdns-sd daemon");
}

/// A DNS name in wire format.
fn name(labels: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in labels {
        v.push(l.len() as u8);
        v.extend_from_slice(l);
    }
    v.push(0);
    v
}

fn rr(owner: &[u8], ty: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut v = owner.to_vec();
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&0x8001u16.to_be_bytes()); // IN, cache-flush
    v.extend_from_slice(&ttl.to_be_bytes());
    v.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    v.extend_from_slice(rdata);
    v
}

fn response(answers: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x84, 0, 0, 0];
    v.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0]);
    for a in answers {
        v.extend_from_slice(a);
    }
    v
}

fn hostile_packets() -> Vec<Vec<u8>> {
    let ty = name(&[b"_http", b"_tcp", b"local"]);
    let mut out = Vec::new();
    // Compression loop: a name that points at itself, and two that point at each other.
    let mut p = vec![0, 0, 0x84, 0, 0, 0, 0, 2, 0, 0, 0, 0];
    p.extend_from_slice(&[0xc0, 12]);
    p.extend_from_slice(&[0, 12, 0, 1, 0, 0, 0, 120, 0, 2, 0xc0, 12]);
    out.push(p);
    let mut p = vec![0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    p.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12]);
    out.push(p);
    // Truncated: a PTR whose rdata length runs past the end; a header alone claiming records.
    let mut t = response(&[rr(
        &ty,
        12,
        120,
        &name(&[b"x", b"_http", b"_tcp", b"local"]),
    )]);
    t.truncate(t.len() - 5);
    out.push(t);
    out.push(vec![
        0, 0, 0x84, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    out.push(vec![0xff; 3]);
    // Huge TXT (8 KB of 255-byte strings) plus odd keys, on a complete service.
    let inst = name(&[b"Hostile", b"_http", b"_tcp", b"local"]);
    let host = name(&[b"hostile", b"local"]);
    let mut txt = Vec::new();
    for i in 0..32u8 {
        let mut s = format!("k{i}=").into_bytes();
        s.resize(255, b'v');
        txt.push(255u8);
        txt.extend_from_slice(&s);
    }
    for odd in [
        &b"=novalue"[..],
        b"\xff\xfe=bin",
        b"ke\0y=nul",
        b"a b=space",
    ] {
        txt.push(odd.len() as u8);
        txt.extend_from_slice(odd);
    }
    let mut srv = vec![0, 0, 0, 0, 0x1f, 0x90];
    srv.extend_from_slice(&host);
    out.push(response(&[
        rr(&ty, 12, 120, &inst),
        rr(&inst, 33, 120, &srv),
        rr(&inst, 16, 120, &txt),
        rr(&host, 1, 120, &[10, 254, 110, 2]),
    ]));
    // Random garbage of every length up to 600.
    let mut x: u32 = 0x1234_5678;
    for len in (0..600).step_by(7) {
        out.push(
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect(),
        );
    }
    // A flood of made-up instances of the browsed type.
    for i in 0..3000 {
        let label = format!("flood-{i}");
        out.push(response(&[rr(
            &ty,
            12,
            120,
            &name(&[label.as_bytes(), b"_http", b"_tcp", b"local"]),
        )]));
    }
    out
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

#[test]
fn hostile_packets_do_not_hurt() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_http._tcp]");
    h.wait("first list", |_| true);
    let before = rss_kib();
    let sender = in_netns(&tb.p, || {
        let s = UdpSocket::bind("10.254.110.2:5353").expect("bind 5353");
        let packets = hostile_packets();
        let n = packets.len();
        for (i, p) in packets.iter().enumerate() {
            let _ = s.send_to(p, "224.0.0.251:5353");
            if i % 50 == 0 {
                // Paced, so the kernel's socket buffers do not drop most of it.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        n
    });
    let sent = sender.join().expect("sender");
    // The complete hostile service is found, with sane property names.
    let list = h.wait(
        "hostile but complete service",
        has("Hostile._http._tcp.local."),
    );
    let p = props(device(&list, "Hostile._http._tcp.local."));
    assert_eq!(p["MDNS_PORT"], "8080");
    for (k, v) in &p {
        assert!(
            k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{k}"
        );
        assert!(
            !v.contains('\0') && v.len() <= verge_mdns::properties::MAX_TXT_VALUE_LEN,
            "{k}"
        );
    }
    assert!(p.len() <= 5 + verge_mdns::properties::MAX_TXT_PROPERTIES);
    let grown = rss_kib().saturating_sub(before);
    println!(
        "sent {sent} hostile packets; RSS grew {grown} KiB; devices {}",
        h.latest.len()
    );
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
    assert!(h.latest.len() <= verge_mdns::browse::MAX_SERVICES);

    // Still works: a real publisher is found afterwards.
    let _p = ZcPublisher::start(
        &tb.p,
        &[
            "--name",
            "After",
            "--type",
            "_http._tcp.local.",
            "--port",
            "80",
            "--host",
            "after.local.",
            "--addr",
            "10.254.110.2",
        ],
    );
    h.wait("service after the storm", has("After._http._tcp.local."));
}
