//! WS-Discovery over UDP: multicast probes on chosen interfaces (IPv4 and IPv6), unicast
//! probes to listed hosts, and a Hello/Bye listener.
//!
//! oxvif's discovery binds every IPv4 interface and knows no IPv6, no interface choice and no
//! streaming of results, so the sockets are set up here with socket2; what comes back is parsed
//! by [`crate::wsd`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::wsd::{self, Message, ProbeType, Target, WSD_PORT, WSD_V4, WSD_V6};

/// Multicast stays on the link: cameras beyond a router are reached by unicast targets.
pub const MULTICAST_HOPS: u32 = 1;
/// Distinct cameras kept from one probe round; more replies than this are dropped.
pub const MAX_TARGETS_PER_ROUND: usize = 1024;
/// Pause between unicast bursts.
pub const UNICAST_BURST_PAUSE: Duration = Duration::from_millis(5);

/// An interface multicast probes go out on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub v4: Vec<Ipv4Addr>,
    pub has_v6: bool,
    /// A global IPv6 address to send from (replies to it need no scope id); link-local otherwise.
    pub v6_source: Option<Ipv6Addr>,
}

/// Interfaces holding a default route (IPv4 or IPv6), from this thread's network namespace.
pub fn default_route_interfaces() -> BTreeSet<String> {
    // thread-self: the calling thread's namespace (tests run the handler in a namespace thread).
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mut out = default_routes_v4(&read("/proc/thread-self/net/route"));
    out.extend(default_routes_v6(&read("/proc/thread-self/net/ipv6_route")));
    out
}

/// Interfaces of the IPv4 default routes (destination and mask 0) in `/proc/net/route`.
pub fn default_routes_v4(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect()
}

/// Interfaces of the IPv6 default routes (::/0) in `/proc/net/ipv6_route`, leaving out the
/// kernel's `unreachable` default on `lo`.
pub fn default_routes_v6(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo")
                .then(|| f[9].to_string())
        })
        .collect()
}

/// The interfaces to multicast on: the named ones, or by default every up, non-loopback
/// interface with an address except those holding a default route.
pub fn select_interfaces(names: Option<&[String]>) -> io::Result<Vec<Interface>> {
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    for i in if_addrs::get_if_addrs()? {
        if i.is_loopback() {
            continue;
        }
        let Some(index) = i.index else { continue };
        let e = by_name.entry(i.name.clone()).or_insert_with(|| Interface {
            name: i.name.clone(),
            index,
            v4: Vec::new(),
            has_v6: false,
            v6_source: None,
        });
        match i.addr {
            if_addrs::IfAddr::V4(a) => e.v4.push(a.ip),
            if_addrs::IfAddr::V6(a) => {
                e.has_v6 = true;
                let link_local = a.ip.is_unicast_link_local();
                if !link_local && e.v6_source.is_none() {
                    e.v6_source = Some(a.ip);
                }
            }
        }
    }
    Ok(match names {
        Some(names) => by_name
            .into_values()
            .filter(|i| names.iter().any(|n| n == &i.name))
            .collect(),
        None => {
            let defaults = default_route_interfaces();
            by_name
                .into_values()
                .filter(|i| !defaults.contains(&i.name))
                .collect()
        }
    })
}

fn probes() -> [String; 2] {
    [
        wsd::probe_message(
            &uuid::Uuid::new_v4().to_string(),
            ProbeType::NetworkVideoTransmitter,
        ),
        wsd::probe_message(&uuid::Uuid::new_v4().to_string(), ProbeType::Device),
    ]
}

fn udp(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn multicast_v4_socket(ip: Ipv4Addr) -> io::Result<UdpSocket> {
    let s = udp(Domain::IPV4)?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(ip, 0)).into())?;
    s.set_multicast_if_v4(&ip)?;
    s.set_multicast_ttl_v4(MULTICAST_HOPS)?;
    s.set_multicast_loop_v4(false)?;
    UdpSocket::from_std(s.into())
}

fn multicast_v6_socket(index: u32, source: Option<Ipv6Addr>) -> io::Result<UdpSocket> {
    let s = udp(Domain::IPV6)?;
    s.set_only_v6(true)?;
    let source = source.unwrap_or(Ipv6Addr::UNSPECIFIED);
    s.bind(&SocketAddr::from(SocketAddrV6::new(source, 0, 0, 0)).into())?;
    s.set_multicast_if_v6(index)?;
    s.set_multicast_hops_v6(MULTICAST_HOPS)?;
    s.set_multicast_loop_v6(false)?;
    UdpSocket::from_std(s.into())
}

fn unicast_socket(v6: bool) -> io::Result<UdpSocket> {
    let (domain, addr) = if v6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    };
    let s = udp(domain)?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// One probe round's plan.
#[derive(Clone, Debug, Default)]
pub struct ProbePlan {
    pub interfaces: Vec<Interface>,
    pub ipv4: bool,
    pub ipv6: bool,
    pub unicast: Vec<IpAddr>,
    pub unicast_burst: usize,
    pub wait: Duration,
}

/// A reply: the target and the address it came from.
pub type Reply = (Target, IpAddr);

async fn collect(sock: UdpSocket, deadline: Instant, tx: mpsc::Sender<Reply>) {
    let mut buf = vec![0u8; wsd::MAX_DATAGRAM];
    loop {
        let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await else {
            return;
        };
        let Ok((len, from)) = r else { continue };
        let Some(data) = buf.get(..len) else { continue };
        match wsd::parse(data) {
            Ok(Message::Matches(targets)) => {
                for t in targets {
                    if tx.send((t, from.ip())).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Message::Hello(t)) => {
                if tx.send((t, from.ip())).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%from, error = %e, "ignoring a reply that is not WS-Discovery")
            }
        }
    }
}

/// Sends the probes of `plan` and collects replies for `plan.wait`. Returns targets by endpoint
/// (at most [`MAX_TARGETS_PER_ROUND`]).
pub async fn probe_round(plan: &ProbePlan) -> BTreeMap<String, Reply> {
    let deadline = Instant::now() + plan.wait;
    let [nvt, dev] = probes();
    let mut sockets = Vec::new();
    for i in &plan.interfaces {
        if plan.ipv4 {
            for ip in &i.v4 {
                match multicast_v4_socket(*ip) {
                    Ok(s) => {
                        let to = SocketAddr::from((WSD_V4, WSD_PORT));
                        for p in [&nvt, &dev] {
                            if let Err(e) = s.send_to(p.as_bytes(), to).await {
                                tracing::debug!(interface = %i.name, error = %e, "IPv4 probe not sent");
                            }
                        }
                        sockets.push(s);
                    }
                    Err(e) => {
                        tracing::debug!(interface = %i.name, error = %e, "no IPv4 probe socket")
                    }
                }
            }
        }
        if plan.ipv6 && i.has_v6 {
            match multicast_v6_socket(i.index, i.v6_source) {
                Ok(s) => {
                    let to = SocketAddr::from(SocketAddrV6::new(WSD_V6, WSD_PORT, 0, i.index));
                    for p in [&nvt, &dev] {
                        if let Err(e) = s.send_to(p.as_bytes(), to).await {
                            tracing::debug!(interface = %i.name, error = %e, "IPv6 probe not sent");
                        }
                    }
                    sockets.push(s);
                }
                Err(e) => tracing::debug!(interface = %i.name, error = %e, "no IPv6 probe socket"),
            }
        }
    }
    if !plan.unicast.is_empty() {
        let v4 = plan
            .unicast
            .iter()
            .any(IpAddr::is_ipv4)
            .then(|| unicast_socket(false));
        let v6 = plan
            .unicast
            .iter()
            .any(IpAddr::is_ipv6)
            .then(|| unicast_socket(true));
        let v4 = v4.and_then(|s| {
            s.map_err(|e| tracing::warn!(error = %e, "no IPv4 unicast socket"))
                .ok()
        });
        let v6 = v6.and_then(|s| {
            s.map_err(|e| tracing::warn!(error = %e, "no IPv6 unicast socket"))
                .ok()
        });
        // Sent in bursts so a /20 does not flood the network or the socket buffer at once.
        for (n, ip) in plan.unicast.iter().enumerate() {
            let sock = if ip.is_ipv4() {
                v4.as_ref()
            } else {
                v6.as_ref()
            };
            if let Some(s) = sock {
                for p in [&nvt, &dev] {
                    if let Err(e) = s
                        .send_to(p.as_bytes(), SocketAddr::new(*ip, WSD_PORT))
                        .await
                    {
                        tracing::trace!(%ip, error = %e, "unicast probe not sent");
                    }
                }
            }
            if (n + 1) % plan.unicast_burst.max(1) == 0 {
                tokio::time::sleep(UNICAST_BURST_PAUSE).await;
            }
        }
        sockets.extend(v4);
        sockets.extend(v6);
    }
    let (tx, mut rx) = mpsc::channel(64);
    let collectors: Vec<_> = sockets
        .into_iter()
        .map(|s| collect(s, deadline, tx.clone()))
        .collect();
    drop(tx);
    let gather = async {
        let mut out = BTreeMap::new();
        while let Some((t, from)) = rx.recv().await {
            if out.len() >= MAX_TARGETS_PER_ROUND && !out.contains_key(&t.endpoint) {
                continue;
            }
            out.insert(t.endpoint.clone(), (t, from));
        }
        out
    };
    let (_, out) = tokio::join!(futures::future::join_all(collectors), gather);
    out
}

/// A Hello or Bye heard between probes.
#[derive(Clone, Debug)]
pub enum Announcement {
    Hello(Reply),
    Bye(String),
}

fn listener_v4(interfaces: &[Interface]) -> io::Result<UdpSocket> {
    let s = udp(Domain::IPV4)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, WSD_PORT)).into())?;
    let mut joined = 0;
    for i in interfaces {
        for ip in &i.v4 {
            match s.join_multicast_v4(&WSD_V4, ip) {
                Ok(()) => joined += 1,
                Err(e) => {
                    tracing::debug!(interface = %i.name, error = %e, "cannot join the IPv4 group")
                }
            }
        }
    }
    if joined == 0 {
        return Err(io::Error::other("no interface joined 239.255.255.250"));
    }
    UdpSocket::from_std(s.into())
}

fn listener_v6(interfaces: &[Interface]) -> io::Result<UdpSocket> {
    let s = udp(Domain::IPV6)?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, WSD_PORT)).into())?;
    let mut joined = 0;
    for i in interfaces.iter().filter(|i| i.has_v6) {
        match s.join_multicast_v6(&WSD_V6, i.index) {
            Ok(()) => joined += 1,
            Err(e) => {
                tracing::debug!(interface = %i.name, error = %e, "cannot join the IPv6 group")
            }
        }
    }
    if joined == 0 {
        return Err(io::Error::other("no interface joined ff02::c"));
    }
    UdpSocket::from_std(s.into())
}

async fn listen(sock: UdpSocket, tx: mpsc::Sender<Announcement>) {
    let mut buf = vec![0u8; wsd::MAX_DATAGRAM];
    loop {
        let r = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = tx.closed() => return,
        };
        let Ok((len, from)) = r else { continue };
        let Some(data) = buf.get(..len) else { continue };
        let a = match wsd::parse(data) {
            Ok(Message::Hello(t)) => Announcement::Hello((t, from.ip())),
            Ok(Message::Bye { endpoint }) => Announcement::Bye(endpoint),
            _ => continue,
        };
        // A flood of announcements is dropped rather than queued without bound.
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(a) {
            return;
        }
    }
}

/// Starts Hello/Bye listeners on the given interfaces; they stop when the receiver is dropped.
pub fn announcements(
    interfaces: &[Interface],
    ipv4: bool,
    ipv6: bool,
) -> mpsc::Receiver<Announcement> {
    let (tx, rx) = mpsc::channel(64);
    if ipv4 {
        match listener_v4(interfaces) {
            Ok(s) => {
                tokio::spawn(listen(s, tx.clone()));
            }
            Err(e) => tracing::info!(error = %e, "not listening for IPv4 Hello/Bye"),
        }
    }
    if ipv6 {
        match listener_v6(interfaces) {
            Ok(s) => {
                tokio::spawn(listen(s, tx.clone()));
            }
            Err(e) => tracing::info!(error = %e, "not listening for IPv6 Hello/Bye"),
        }
    }
    rx
}

/// The MAC of an on-link IPv4 neighbour, from this thread's ARP table. Cameras that do not
/// implement GetNetworkInterfaces (or refuse it) still get a MAC this way.
pub fn arp_mac(ip: IpAddr) -> Option<String> {
    let IpAddr::V4(ip) = ip else { return None };
    let table = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    parse_arp(&table, ip)
}

fn parse_arp(table: &str, ip: Ipv4Addr) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (addr, flags, mac) = (f.first()?, f.get(2)?, f.get(3)?);
        (addr.parse::<Ipv4Addr>().ok()? == ip && *flags != "0x0" && *mac != "00:00:00:00:00:00")
            .then(|| mac.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_tables() {
        // From `ip route add default via 10.254.72.2 dev vgoi2` in a namespace with br0.
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  vgoi2\t00000000\t0248FE0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  br0\t0046FE0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  vgoi2\t0048FE0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            default_routes_v4(v4).into_iter().collect::<Vec<_>>(),
            ["vgoi2"]
        );
        let z = "00000000000000000000000000000000";
        let v6 = format!(
            "fd002540007300000000000000000000 40 {z} 00 {z} 00000100 00000001 00000000 00000001    vgoi3\n\
             {z} 00 {z} 00 fd002540007300000000000000000002 00000400 00000001 00000000 00000003    vgoi3\n\
             {z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo\n"
        );
        assert_eq!(
            default_routes_v6(&v6).into_iter().collect::<Vec<_>>(),
            ["vgoi3"]
        );
        assert!(default_routes_v4("garbage\n1 2 3").is_empty());
        assert!(default_routes_v6("").is_empty());
    }

    #[test]
    fn arp_table() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.0.0.2         0x1         0x2         AA:bb:cc:dd:ee:ff     *        eth0\n\
                 10.0.0.3         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 0, 0, 2)).as_deref(),
            Some("aa:bb:cc:dd:ee:ff")
        );
        assert_eq!(parse_arp(t, Ipv4Addr::new(10, 0, 0, 3)), None);
        assert_eq!(parse_arp("garbage", Ipv4Addr::new(10, 0, 0, 3)), None);
    }
}
