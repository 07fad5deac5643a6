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

impl Testbed {
    /// Waits until no socket in the querier namespace holds port 5353: the
    /// handler's daemon thread has finished its shutdown, so anything it would
    /// send on the way out (goodbyes, had it announced anything) has been sent.
    fn wait_mdns_sockets_closed(&self) {
        let end = Instant::now() + DEADLINE;
        loop {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.q,
                    "cat",
                    "/proc/net/udp",
                    "/proc/net/udp6",
                ])
                .output()
                .expect("cat /proc/net/udp");
            let text = String::from_utf8_lossy(&out.stdout);
            // Field 2 is local address:port in hex; 5353 = 0x14E9.
            let bound = text.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":14E9"))
            });
            if !bound {
                return;
            }
            assert!(Instant::now() < end, "the mDNS daemon did not shut down");
            std::thread::sleep(Duration::from_millis(20));
        }
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

// ---------------------------------------------------------------------------
// What the handler puts on the LAN, seen from the peer namespace.

/// One mDNS packet seen on the peer's end of the link.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    v6: bool,
    /// Sent by the querier namespace (the handler): everything on this link
    /// that the peer namespace did not send itself.
    from_querier: bool,
    response: bool,
    authorities: u16,
    questions: Vec<(String, u16)>,
}

/// Counts mDNS packets on the peer's veth with an `AF_PACKET` socket: it sees
/// every frame on the link, so it neither takes port 5353 from the peers nor
/// misses unicast replies, and the kernel's drop counter says whether it kept up.
struct Capture {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Capture {
    fn start(ns: &str, ifname: &str) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ifname = std::ffi::CString::new(ifname).expect("ifname");
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = in_netns(ns, move || {
            // SAFETY: plain socket calls on a descriptor this thread owns; every
            // pointer handed to the kernel points at a live local of the right size.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let index = libc::if_nametoindex(ifname.as_ptr());
                assert!(index > 0, "no interface {ifname:?}");
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                // A flood answered without a limit is tens of thousands of frames in
                // a second: a big buffer, so the count is the handler's, not ours.
                let buf: libc::c_int = 64 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &buf as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                );
                // Wakes the loop to look at the stop flag.
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let _ = ready_tx.send(());
                let mut frame = vec![0u8; 65536];
                loop {
                    // Read on after the stop until the queue is empty (one
                    // receive timeout), so frames sent before the stop all count.
                    let stopping = stop2.load(Ordering::SeqCst);
                    let mut from: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    let n = libc::recvfrom(
                        fd,
                        frame.as_mut_ptr() as *mut libc::c_void,
                        frame.len(),
                        0,
                        &mut from as *mut _ as *mut libc::sockaddr,
                        &mut len,
                    );
                    if n <= 0 {
                        if stopping {
                            break;
                        }
                        continue;
                    }
                    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                    if let Some(s) = parse_frame(&frame[..n as usize], !outgoing) {
                        seen2.lock().expect("lock").push(s);
                    }
                }
                let mut stats: libc::tpacket_stats = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
                libc::getsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                    &mut stats as *mut _ as *mut libc::c_void,
                    &mut len,
                );
                libc::close(fd);
                stats.tp_drops
            }
        });
        ready_rx.recv_timeout(DEADLINE).expect("capture started");
        Capture {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Stops capturing; returns everything seen and the frames the kernel dropped.
    fn finish(mut self) -> (Vec<Seen>, u32) {
        self.stop.store(true, Ordering::SeqCst);
        let drops = self
            .thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or(0);
        (self.snapshot(), drops)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An Ethernet frame carrying UDP to or from port 5353, decoded far enough to
/// tell queries from responses and to name the questions.
fn parse_frame(f: &[u8], from_querier: bool) -> Option<Seen> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (v6, udp) = match ethertype {
        0x0800 if ip.first()? >> 4 == 4 && *ip.get(9)? == 17 => {
            (false, ip.get(usize::from(ip[0] & 0x0f) * 4..)?)
        }
        0x86dd if *ip.get(6)? == 17 => (true, ip.get(40..)?),
        _ => return None,
    };
    let sport = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    if sport != 5353 && dport != 5353 {
        return None;
    }
    let dns = udp.get(8..)?;
    let word = |i: usize| Some(u16::from_be_bytes([*dns.get(i)?, *dns.get(i + 1)?]));
    let flags = word(2)?;
    let mut questions = Vec::new();
    let mut at = 12;
    for _ in 0..word(4)? {
        let (name, next) = dns_name(dns, at)?;
        questions.push((name, word(next)?));
        at = next + 4;
    }
    Some(Seen {
        at: Instant::now(),
        v6,
        from_querier,
        response: flags & 0x8000 != 0,
        authorities: word(8)?,
        questions,
    })
}

/// A (possibly compressed) DNS name at `at`; returns it and the offset after it.
fn dns_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(at)?;
        match len {
            0 => {
                let name = labels.join(".") + ".";
                return Some((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                end.get_or_insert(at + 2);
                at = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(at + 1)?]));
            }
            l => {
                let label = msg.get(at + 1..at + 1 + usize::from(l))?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                at += 1 + usize::from(l);
            }
        }
    }
    None
}

/// The queries the handler sent, per address family and question, with their
/// times relative to `t0`.
fn queries_by_question(seen: &[Seen], t0: Instant) -> BTreeMap<(bool, String, u16), Vec<f64>> {
    let mut by_q: BTreeMap<(bool, String, u16), Vec<f64>> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.from_querier && !s.response) {
        for (name, ty) in &s.questions {
            by_q.entry((s.v6, name.to_lowercase(), *ty & 0x7fff))
                .or_default()
                .push(s.at.saturating_duration_since(t0).as_secs_f64());
        }
    }
    by_q
}

/// RFC 6762 §5.2: "the interval between the first two queries MUST be at least
/// one second, the intervals between successive queries MUST increase by at
/// least a factor of two". Returns the questions that broke it. The tolerance
/// covers the capture's timestamps (taken when the frame is read, not sent).
fn spacing_violations(by_q: &BTreeMap<(bool, String, u16), Vec<f64>>) -> Vec<String> {
    let mut bad = Vec::new();
    for ((v6, name, ty), times) in by_q {
        let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        let mut ok = gaps.first().is_none_or(|g| *g >= 0.95);
        ok &= gaps.windows(2).all(|g| g[1] >= 1.9 * g[0]);
        if !ok {
            bad.push(format!(
                "{} {name} type {ty}: sent at {times:.3?}",
                if *v6 { "IPv6" } else { "IPv4" }
            ));
        }
    }
    bad
}

/// Reads the handler's updates until `until` (a measurement window: what is
/// measured is what happens on the wire meanwhile, so there is no condition to wait on).
fn observe_until(h: &mut Handler, until: Instant) {
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(Ok(l)) = h.updates.recv_timeout(left.min(Duration::from_millis(200))) {
            h.latest = l;
        }
    }
}

/// A shared PTR record (no cache-flush bit: PTRs of a service type are shared,
/// so a querier also lists them as known answers).
fn shared_ptr(owner: &[u8], ttl: u32, target: &[u8]) -> Vec<u8> {
    let mut v = owner.to_vec();
    v.extend_from_slice(&12u16.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&ttl.to_be_bytes());
    v.extend_from_slice(&(target.len() as u16).to_be_bytes());
    v.extend_from_slice(target);
    v
}

#[test]
fn queries_are_rate_limited_also_under_a_ptr_flood() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let capture = Capture::start(&tb.p, &tb.p_if);
    let mut avahi = Avahi::start(&tb);
    avahi.publish("Lan", "_http._tcp", 80, &["path=/"]);

    // Normal browsing: one type, one service, 8 s.
    let normal = Duration::from_secs(8);
    let t0 = Instant::now();
    let mut h = Handler::start(&tb.q, "serviceTypes: [_http._tcp]");
    h.wait("service on the LAN", has("Lan._http._tcp.local."));
    let found = t0.elapsed();
    observe_until(&mut h, t0 + normal);
    let seen = capture.snapshot();
    let by_q = queries_by_question(&seen, t0);
    let sent = |v6: bool| {
        seen.iter()
            .filter(|s| s.from_querier && !s.response && s.v6 == v6)
            .count()
    };
    let (normal_v4, normal_v6) = (sent(false), sent(true));
    println!(
        "normal browse: found in {found:?}; queries in {normal:?}: IPv4 {normal_v4}, IPv6 {normal_v6}; by question {by_q:?}"
    );
    assert_eq!(spacing_violations(&by_q), Vec::<String>::new());
    // §5.2: the first query of a series waits a random 20–120 ms (t0 is taken
    // before the browse starts, so this can only be early, never late).
    let first = by_q.values().flatten().fold(f64::MAX, |a, b| a.min(*b));
    assert!(first >= 0.020, "first query {first:.3} s after the start");
    // §5.2's schedule allows 1 + ⌊log2(8 + 1)⌋ = 4 queries of a question in 8 s
    // (at 0, 1, 3, 7 s). A browse with one service asks two things: the type's
    // PTR, and (only if its records did not all come with the PTR) the instance's
    // SRV and TXT, in one message.
    let ptr_rounds = 1 + (normal.as_secs_f64() + 1.0).log2().floor() as usize;
    for v6 in [false, true] {
        let ptr = by_q
            .get(&(v6, "_http._tcp.local.".to_string(), 12))
            .map_or(0, Vec::len);
        assert!(
            ptr <= ptr_rounds,
            "{ptr} PTR queries in {normal:?}, §5.2 allows {ptr_rounds}"
        );
        assert!(
            sent(v6) <= 2 * ptr_rounds,
            "{} queries in {normal:?} (IPv6: {v6}), §5.2 allows {}",
            sent(v6),
            2 * ptr_rounds
        );
    }

    // The flood: 3000 made-up instances of the browsed type, PTRs only, so every
    // one of them is unresolved (upstream mdns-sd queried each SRV/TXT 4 times,
    // on both families, and again at every browse round).
    let flood = 3000;
    let window = Duration::from_secs(12);
    let t1 = Instant::now();
    let sender = in_netns(&tb.p, move || {
        let s = UdpSocket::bind("10.254.110.2:0").expect("bind");
        let ty = name(&[b"_http", b"_tcp", b"local"]);
        for i in 0..flood {
            let label = format!("flood-{i}");
            let p = response(&[shared_ptr(
                &ty,
                120,
                &name(&[label.as_bytes(), b"_http", b"_tcp", b"local"]),
            )]);
            let _ = s.send_to(&p, "224.0.0.251:5353");
            if i % 50 == 0 {
                // Paced, so the kernel's socket buffers keep it all.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    sender.join().expect("flood");
    let flood_sent = t1.elapsed();
    observe_until(&mut h, t1 + window);
    drop(h);
    tb.wait_mdns_sockets_closed();
    let (seen, drops) = capture.finish();
    assert_eq!(
        drops, 0,
        "the capture dropped frames: the counts would be low"
    );

    let flood_seen: Vec<Seen> = seen.iter().filter(|s| s.at >= t1).cloned().collect();
    let by_q = queries_by_question(&flood_seen, t1);
    let ours = |v6: bool| {
        flood_seen
            .iter()
            .filter(|s| s.from_querier && !s.response && s.v6 == v6)
            .collect::<Vec<_>>()
    };
    let instance_questions = by_q
        .keys()
        .filter(|(_, n, _)| n.starts_with("flood-"))
        .count();
    let mut peak = 0;
    for s in ours(false) {
        let n = ours(false)
            .iter()
            .filter(|o| o.at >= s.at && o.at < s.at + Duration::from_secs(1))
            .count();
        peak = peak.max(n);
    }
    let (v4, v6) = (ours(false).len(), ours(true).len());
    println!(
        "flood of {flood} PTRs sent in {flood_sent:?}; queries in the {window:?} after: IPv4 {v4}, IPv6 {v6} \
         ({:.1}/s per family), peak {peak} in one second (IPv4); {instance_questions} distinct instance questions; \
         most-asked question {:?}",
        v4 as f64 / window.as_secs_f64(),
        by_q.iter()
            .max_by_key(|(_, t)| t.len())
            .map(|(q, t)| (q, t.len())),
    );
    // Per question: §5.2 spacing, whatever path (resolve retries, browse rounds) sent it.
    assert_eq!(spacing_violations(&by_q), Vec::<String>::new());
    // In aggregate: the follow-up budget (a burst, then a steady rate), plus the
    // browse's own PTR queries at §5.2's schedule, each at most
    // `MAX_QUERY_PACKETS` packets long with its known answers. A follow-up query
    // is one packet: it asks for records not in the cache, so it lists no known answers.
    let rounds = 1 + (window.as_secs_f64() + 1.0).log2().floor() as usize;
    let bound = mdns_sd::FOLLOW_UP_QUERY_BURST as usize
        + (mdns_sd::FOLLOW_UP_QUERIES_PER_SEC * window.as_secs_f64()).ceil() as usize
        + rounds * mdns_sd::MAX_QUERY_PACKETS;
    for (family, n) in [("IPv4", v4), ("IPv6", v6)] {
        assert!(
            n <= bound,
            "{family}: {n} queries in {window:?}, bound {bound}"
        );
    }
    assert!(
        peak <= mdns_sd::FOLLOW_UP_QUERY_BURST as usize
            + mdns_sd::FOLLOW_UP_QUERIES_PER_SEC.ceil() as usize
            + 2 * mdns_sd::MAX_QUERY_PACKETS,
        "{peak} queries in one second"
    );
    // Nothing but queries, ever.
    assert!(seen.iter().all(|s| !s.from_querier || !s.response));
}

#[test]
fn never_answers_or_announces() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let capture = Capture::start(&tb.p, &tb.p_if);
    let mut avahi = Avahi::start(&tb);
    avahi.publish("Lan", "_http._tcp", 80, &["path=/"]);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_http._tcp, _ipp._tcp]");
    // Its cache now holds records it could wrongly answer from.
    h.wait("service on the LAN", has("Lan._http._tcp.local."));

    // Ask about everything it knows or is: the browsed types, the instance and its
    // host (from the cache), the machine's own host name, the DNS-SD meta query;
    // as multicast, unicast-response (QU) and legacy unicast (from a random
    // port, to the handler's address: a responder answers those by unicast).
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let avahi_host = avahi.host.clone();
    let p_if = std::ffi::CString::new(tb.p_if.clone()).expect("ifname");
    let asked = in_netns(&tb.p, move || {
        // SAFETY: a valid C string.
        let scope = unsafe { libc::if_nametoindex(p_if.as_ptr()) };
        let group6 = format!("[ff02::fb%{scope}]:5353");
        let mut questions: Vec<(Vec<u8>, u16)> = vec![
            (name(&[b"_http", b"_tcp", b"local"]), 12),
            (name(&[b"_ipp", b"_tcp", b"local"]), 12),
            (name(&[b"_services", b"_dns-sd", b"_udp", b"local"]), 12),
        ];
        for ty in [33, 16, 255] {
            questions.push((name(&[b"Lan", b"_http", b"_tcp", b"local"]), ty));
        }
        for host in [
            avahi_host.trim_end_matches('.'),
            &format!("{machine}.local"),
        ] {
            let labels: Vec<&[u8]> = host.split('.').map(str::as_bytes).collect();
            for ty in [1, 28, 255] {
                questions.push((name(&labels), ty));
            }
        }
        let legacy = UdpSocket::bind("10.254.110.2:0").expect("bind");
        let legacy6 = UdpSocket::bind("[fd00:254:110::2]:0").expect("bind6");
        let mut n = 0;
        for round in 0..3 {
            for (qname, ty) in &questions {
                for qu in [false, true] {
                    let mut p = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
                    p.extend_from_slice(qname);
                    p.extend_from_slice(&ty.to_be_bytes());
                    p.extend_from_slice(&(if qu { 0x8001u16 } else { 1 }).to_be_bytes());
                    for dest in ["224.0.0.251:5353", "10.254.110.1:5353"] {
                        let _ = legacy.send_to(&p, dest);
                        n += 1;
                    }
                    for dest in [group6.as_str(), "[fd00:254:110::1]:5353"] {
                        let _ = legacy6.send_to(&p, dest);
                        n += 1;
                    }
                }
            }
            if round < 2 {
                // Rounds a second apart: a responder's per-record rate limit
                // (RFC 6762 §6) could not hold back a second answer.
                std::thread::sleep(Duration::from_millis(1000));
            }
        }
        n
    });
    let asked = asked.join().expect("queries");
    let t = Instant::now();
    // Responses go out within 20–120 ms, 500 ms for truncated queries (§6); the
    // capture keeps running well past that.
    observe_until(&mut h, t + Duration::from_millis(1500));
    drop(h);
    tb.wait_mdns_sockets_closed();
    let (seen, drops) = capture.finish();
    assert_eq!(drops, 0);
    let ours: Vec<&Seen> = seen.iter().filter(|s| s.from_querier).collect();
    let responses: Vec<&&Seen> = ours.iter().filter(|s| s.response).collect();
    let probes: Vec<&&Seen> = ours.iter().filter(|s| s.authorities > 0).collect();
    let peer_responses = seen
        .iter()
        .filter(|s| !s.from_querier && s.response)
        .count();
    println!(
        "asked {asked} queries; the handler sent {} packets: {} queries, {} responses, {} probes; \
         the peer (avahi) sent {peer_responses} responses",
        ours.len(),
        ours.len() - responses.len(),
        responses.len(),
        probes.len()
    );
    assert!(responses.is_empty(), "the handler answered: {responses:?}");
    assert!(probes.is_empty(), "the handler probed: {probes:?}");
    // The capture does see responses on this link: avahi's.
    assert!(peer_responses > 0, "the capture saw no response at all");
    assert!(
        !ours.is_empty(),
        "the capture saw none of the handler's queries"
    );
}

#[test]
fn subtype_browse_finds_only_the_subtype() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    let mut avahi = Avahi::start(&tb);
    let args = [
        "avahi-publish",
        "-s",
        "--subtype=_printer._sub._http._tcp",
        "Sub Printer",
        "_http._tcp",
        "631",
        "rp=ipp",
    ];
    avahi
        .publishers
        .push(avahi.nsenter(&args).spawn().expect("avahi-publish"));
    avahi.publish("Plain", "_http._tcp", 80, &[]);
    avahi.publish("Other Sub", "_ipp._tcp", 631, &[]);
    let mut all = Handler::start(&tb.q, "serviceTypes: [_http._tcp]");
    let mut sub = Handler::start(&tb.q, "serviceTypes: [_http._tcp]\nsubtypes: [_printer]");
    let mut none = Handler::start(&tb.q, "serviceTypes: [_http._tcp]\nsubtypes: [_scanner]");
    let sub_id = "Sub Printer._http._tcp.local.";
    all.wait("both _http services", |l| {
        has(sub_id)(l) && has("Plain._http._tcp.local.")(l)
    });
    let list = sub.wait("the subtype service", has(sub_id));
    let p = props(device(&list, sub_id));
    assert_eq!(p["MDNS_SERVICE_TYPE"], "_http._tcp.local.");
    assert_eq!(p["MDNS_INSTANCE"], "Sub Printer");
    assert_eq!(p["MDNS_PORT"], "631");
    assert_eq!(p["MDNS_TXT_RP"], "ipp");
    // The plain browse has seen both: the subtype browses have had the same
    // answers (one daemon each, same multicast). Drain what they got since.
    for h in [&mut sub, &mut none] {
        while let Ok(Ok(l)) = h.updates.try_recv() {
            h.latest = l;
        }
    }
    println!(
        "all: {:?}; _printer: {:?}; _scanner: {:?}",
        all.ids(),
        sub.ids(),
        none.ids()
    );
    assert_eq!(sub.ids(), [sub_id]);
    assert!(none.ids().is_empty());
}

#[test]
fn address_change_updates_addresses() {
    if !prerequisites() {
        return;
    }
    let tb = Testbed::new(false);
    sh(&format!(
        "ip -n {} addr add 10.254.110.3/24 dev {}",
        tb.p, tb.p_if
    ));
    let capture = Capture::start(&tb.p, &tb.p_if);
    let mut h = Handler::start(&tb.q, "serviceTypes: [_rtsp._tcp]");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/readdress.py");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &tb.p])
        .arg(python())
        .arg(script)
        .args([
            "--name",
            "Mover",
            "--type",
            "_rtsp._tcp.local.",
            "--port",
            "554",
            "--host",
            "mover.local.",
            "--bind",
            "10.254.110.2",
            "--addr",
            "10.254.110.2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("readdress.py");
    let mut p = ZcPublisher {
        out: BufReader::new(child.stdout.take().expect("stdout")),
        child,
    };
    p.expect_line("ready");
    let id = "Mover._rtsp._tcp.local.";
    let addresses = |want: &'static str| {
        move |l: &[Device]| {
            l.iter().any(|d| {
                d.id == id && d.properties.get("MDNS_ADDRESSES").map(String::as_str) == Some(want)
            })
        }
    };
    h.wait("first address", addresses("10.254.110.2"));
    // RFC 6762 §10.2 flushes only records received more than a second before the
    // cache-flush record ("not part of the same packet burst"): a change made
    // while zeroconf is still repeating its announcements keeps the old address
    // until its TTL, by design. So the change comes once the peer has been quiet
    // for over a second, as it is when a device really moves.
    let end = Instant::now() + DEADLINE;
    loop {
        let last = capture
            .snapshot()
            .iter()
            .filter(|s| !s.from_querier && s.response)
            .map(|s| s.at)
            .max();
        if last.is_some_and(|at| at.elapsed() > Duration::from_millis(1200)) {
            break;
        }
        assert!(Instant::now() < end, "the peer never went quiet");
        std::thread::sleep(Duration::from_millis(100));
    }

    let t = Instant::now();
    p.command("addr 10.254.110.3", "updated");
    let mut updates = Vec::new();
    let end = Instant::now() + DEADLINE;
    while !addresses("10.254.110.3")(&h.latest) {
        let left = end.saturating_duration_since(Instant::now());
        match h.updates.recv_timeout(left) {
            Ok(Ok(l)) => {
                h.latest = l;
                if let Some(d) = h.latest.iter().find(|d| d.id == id) {
                    updates.push((t.elapsed(), props(d)["MDNS_ADDRESSES"].clone()));
                }
                // The device is updated in place: never dropped on the way.
                assert!(has(id)(&h.latest), "removed during the change");
            }
            Ok(Err(e)) => panic!("handler error {e}"),
            Err(_) => panic!("address not updated within {DEADLINE:?}: {updates:?}"),
        }
    }
    println!(
        "address change → updated: {:?} (steps {updates:?})",
        t.elapsed()
    );
    // RFC 6762 §10.2: the old address is flushed one second after the new one
    // arrives with the cache-flush bit; our goodbye grace does not apply to it.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}
