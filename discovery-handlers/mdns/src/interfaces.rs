//! Which interfaces mDNS may use: never the one holding the default route
//! unless a Configuration names it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use mdns_sd::{IfKind, IfPredicate};

use crate::settings::InterfaceChoice;

// `thread-self`, not `/proc/net` (= `/proc/self/net`, the main thread's view):
// the thread that starts a daemon may have entered another network namespace.
const IPV4_ROUTES: &str = "/proc/thread-self/net/route";
const IPV6_ROUTES: &str = "/proc/thread-self/net/ipv6_route";

/// Interfaces holding a default route in `/proc/net/route` text
/// (`Iface Destination Gateway Flags ... Mask ...`, hex, destination and mask 0).
pub fn default_route_interfaces_v4(text: &str) -> BTreeSet<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match (f.first(), f.get(1), f.get(7)) {
                (Some(ifname), Some(&"00000000"), Some(&"00000000")) => Some(ifname.to_string()),
                _ => None,
            }
        })
        .collect()
}

/// Interfaces holding a default route in `/proc/net/ipv6_route` text
/// (destination `::`, prefix length 0; the interface is the last field;
/// unreachable/blackhole entries on `lo` are not routes out).
pub fn default_route_interfaces_v6(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let dest_zero = f[0].bytes().all(|b| b == b'0') && f[0].len() == 32;
            let ifname = f[9];
            (dest_zero && f[1] == "00" && ifname != "lo").then(|| ifname.to_string())
        })
        .collect()
}

/// The current default-route interfaces of this network namespace.
pub fn default_route_interfaces() -> std::io::Result<BTreeSet<String>> {
    let mut set = default_route_interfaces_v4(&std::fs::read_to_string(IPV4_ROUTES)?);
    // A kernel without IPv6 has no such file; that is not an error.
    if let Ok(text) = std::fs::read_to_string(IPV6_ROUTES) {
        set.extend(default_route_interfaces_v6(&text));
    }
    Ok(set)
}

/// The selections handed to the daemon at start, applied in order over
/// "everything enabled" (see the vendored mdns-sd's `new_with_interfaces`).
///
/// For [`InterfaceChoice::AllExcept`] the default-route test is a predicate,
/// evaluated whenever mdns-sd looks at interfaces (at start and at every IP
/// check, every 5 s): a default route that moves to another interface takes
/// that interface out too. If the routing table cannot be read later, the last
/// known set is used.
pub fn selections(
    choice: &InterfaceChoice,
    initial_default: BTreeSet<String>,
) -> Vec<(IfKind, bool)> {
    match choice {
        InterfaceChoice::Only(names) => {
            let mut v = vec![(IfKind::All, false)];
            v.extend(names.iter().map(|n| (IfKind::Name(n.clone()), true)));
            v
        }
        InterfaceChoice::AllExcept(names) => {
            let last = Arc::new(Mutex::new(initial_default));
            let predicate = IfPredicate::new(move |intf| {
                let mut known = match last.lock() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if let Ok(now) = default_route_interfaces() {
                    *known = now;
                }
                known.contains(&intf.name)
            });
            let mut v = vec![(IfKind::Predicate(predicate), false)];
            v.extend(names.iter().map(|n| (IfKind::Name(n.clone()), false)));
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_routes() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
verge-lan\t0000CC0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
        assert_eq!(
            default_route_interfaces_v4(v4),
            BTreeSet::from(["eth0".to_string()])
        );
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1
fd002040000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 verge-lan
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(
            default_route_interfaces_v6(v6),
            BTreeSet::from(["eth1".to_string()])
        );
        assert!(default_route_interfaces_v4("garbage\n\n x").is_empty());
    }
}
