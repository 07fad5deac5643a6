//! discoveryDetails of `modbus-tcp` and `modbus-rtu`, and their validation
//! into scan plans.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use verge_discovery_sdk::{DiscoveryError, FilterList};

use crate::probe::{Probe, ProbeSetting};

/// Modbus TCP's registered port.
pub const DEFAULT_PORT: u16 = 502;
/// Default number of addresses (hosts and CIDR members) one Configuration may scan.
pub const DEFAULT_MAX_ADDRESSES: usize = 1024;
/// Hard cap of `maxAddresses`: a /16 of IPv4.
pub const MAX_ADDRESSES_LIMIT: usize = 65_536;
/// Default number of TCP connections (or serial lines) scanned at once.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Upper bound of `concurrency`, so a typo cannot exhaust file descriptors.
pub const MAX_CONCURRENCY: usize = 1024;
/// Default connections one scan opens to one `host:port` at the same time.
/// Small devices accept only a handful of connections; gateways with many
/// units behind one address are scanned over this many connections in parallel.
pub const DEFAULT_CONNECTIONS_PER_ENDPOINT: usize = 4;
/// Default timeout of one TCP connect.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default timeout of one TCP request.
pub const DEFAULT_TCP_REQUEST_TIMEOUT_MS: u64 = 1_000;
/// Default timeout of one RTU request (a serial line's units answer within
/// tens of milliseconds; a silent unit costs this much).
pub const DEFAULT_RTU_REQUEST_TIMEOUT_MS: u64 = 200;
/// Default budget of one TCP scan pass.
pub const DEFAULT_TCP_SCAN_BUDGET_S: u64 = 60;
/// Default budget of one RTU scan pass (247 silent units at 200 ms take about 50 s per baud rate).
pub const DEFAULT_RTU_SCAN_BUDGET_S: u64 = 300;
/// Default pause between TCP scans.
pub const DEFAULT_TCP_RESCAN_S: u64 = 60;
/// Default pause between RTU scans: brokers may want the line in between.
pub const DEFAULT_RTU_RESCAN_S: u64 = 300;
/// Default number of serial ports a glob may expand to.
pub const DEFAULT_MAX_PORTS: usize = 64;
/// Highest unicast unit id on a serial line (248–255 are reserved).
pub const MAX_RTU_UNIT: u8 = 247;
/// Most probes per Configuration; each costs a request per unit.
pub const MAX_PROBES: usize = 32;

/// A unit id or an inclusive range `"a-b"`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum UnitIdItem {
    /// One unit id.
    One(u8),
    /// `"1-247"`.
    Range(String),
}

/// Filters on identification and probe results.
#[derive(Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Filters {
    /// VendorName (object 0x00).
    #[serde(default)]
    pub vendors: Option<FilterList>,
    /// ProductCode (object 0x01).
    #[serde(default)]
    pub product_codes: Option<FilterList>,
    /// ModelName (object 0x05).
    #[serde(default)]
    pub models: Option<FilterList>,
    /// Names of the probes that matched.
    #[serde(default)]
    pub probes: Option<FilterList>,
}

/// discoveryDetails of `modbus-tcp`.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    /// IP addresses or host names.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// CIDR ranges, e.g. `10.0.0.0/24` (network and broadcast addresses skipped).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Ports (default `[502]`).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Unit ids (default `[1]`); gateways: `["1-247"]`.
    #[serde(default)]
    pub unit_ids: Vec<UnitIdItem>,
    /// Most addresses scanned (default 1024, at most 65536).
    #[serde(default)]
    pub max_addresses: Option<usize>,
    /// Connections open at once over the whole scan (default 32).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Connections open at once to one host:port (default 4).
    #[serde(default)]
    pub connections_per_endpoint: Option<usize>,
    /// TCP connect timeout (default 1000).
    #[serde(default)]
    pub connect_timeout_millis: Option<u64>,
    /// Timeout of one request (default 1000).
    #[serde(default)]
    pub request_timeout_millis: Option<u64>,
    /// Time one scan pass may take (default 60); units not reached keep their last state.
    #[serde(default)]
    pub scan_budget_seconds: Option<u64>,
    /// Pause between scans (default 60).
    #[serde(default)]
    pub rescan_interval_seconds: Option<u64>,
    /// Identification and probes.
    #[serde(default)]
    pub identification: IdentificationSettings,
    /// Register probes.
    #[serde(default)]
    pub probes: Vec<ProbeSetting>,
    /// Filters.
    #[serde(default)]
    pub filters: Filters,
}

/// Read Device Identification options.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentificationSettings {
    /// Send Read Device Identification at all (default true). When false, the
    /// first probe decides whether a unit exists.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Also read the regular objects (vendor URL, product name, model; default true).
    #[serde(default = "yes")]
    pub regular: bool,
    /// An object id holding a serial number (e.g. a private object 0x80+),
    /// read individually and used in the device id.
    #[serde(default)]
    pub serial_object_id: Option<u8>,
}

fn yes() -> bool {
    true
}

impl Default for IdentificationSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            regular: true,
            serial_object_id: None,
        }
    }
}

/// Parity of a serial line.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity (the Modbus default).
    #[default]
    Even,
    /// Odd parity.
    Odd,
}

/// discoveryDetails of `modbus-rtu`.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RtuSettings {
    /// Serial device paths or globs, e.g. `/dev/ttyUSB*`, `/dev/serial/by-id/*`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Baud rates tried in order; the first that finds a unit on a port wins (default `[19200, 9600]`).
    #[serde(default)]
    pub baud_rates: Vec<u32>,
    /// Parity (default Even, the Modbus default).
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits, 1 or 2 (default 1).
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Unit ids (default `["1-247"]`).
    #[serde(default)]
    pub unit_ids: Vec<UnitIdItem>,
    /// Most serial ports after glob expansion (default 64).
    #[serde(default)]
    pub max_ports: Option<usize>,
    /// Lines scanned at once (default 32); each line sees one transaction at a time.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Timeout of one request (default 200).
    #[serde(default)]
    pub request_timeout_millis: Option<u64>,
    /// Time one scan pass may take (default 300).
    #[serde(default)]
    pub scan_budget_seconds: Option<u64>,
    /// Pause between scans (default 300).
    #[serde(default)]
    pub rescan_interval_seconds: Option<u64>,
    /// Cgroup permissions of the serial device handed to brokers (default `rw`).
    #[serde(default)]
    pub device_permissions: Option<String>,
    /// Identification options.
    #[serde(default)]
    pub identification: IdentificationSettings,
    /// Register probes.
    #[serde(default)]
    pub probes: Vec<ProbeSetting>,
    /// Filters.
    #[serde(default)]
    pub filters: Filters,
}

/// What every scan needs, for either transport.
#[derive(Debug, Clone)]
pub struct Common {
    /// Unit ids in ascending order.
    pub unit_ids: Vec<u8>,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Budget of one scan pass.
    pub scan_budget: Duration,
    /// Pause between scans.
    pub rescan_interval: Duration,
    /// Lines or connections at once.
    pub concurrency: usize,
    /// Identification options.
    pub identification: IdentificationSettings,
    /// Validated probes.
    pub probes: Vec<Probe>,
    /// Filters.
    pub filters: Filters,
}

/// A validated `modbus-tcp` scan.
#[derive(Debug, Clone)]
pub struct TcpPlan {
    /// Literal IPs and CIDR members, deduplicated, in order.
    pub addresses: Vec<IpAddr>,
    /// Host names, resolved at each scan (bounded by `maxAddresses` too).
    pub names: Vec<String>,
    /// Ports.
    pub ports: Vec<u16>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Connections per host:port.
    pub connections_per_endpoint: usize,
    /// Address budget (names count after resolution).
    pub max_addresses: usize,
    /// The rest.
    pub common: Common,
}

/// A validated `modbus-rtu` scan.
#[derive(Debug, Clone)]
pub struct RtuPlan {
    /// Paths and globs, expanded at each scan.
    pub ports: Vec<String>,
    /// Baud rates in order.
    pub baud_rates: Vec<u32>,
    /// Parity.
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    /// Glob expansion cap.
    pub max_ports: usize,
    /// Device spec permissions.
    pub device_permissions: String,
    /// The rest.
    pub common: Common,
}

fn invalid(msg: impl Into<String>) -> DiscoveryError {
    DiscoveryError::InvalidSettings(msg.into())
}

/// Expands unit-id items into a sorted set, refusing ids above `max`.
pub fn unit_ids(items: &[UnitIdItem], default: &[u8], max: u8) -> Result<Vec<u8>, DiscoveryError> {
    let mut set = BTreeSet::new();
    if items.is_empty() {
        set.extend(default.iter().copied());
    }
    for item in items {
        let (lo, hi) = match item {
            UnitIdItem::One(u) => (*u, *u),
            UnitIdItem::Range(text) => {
                let parse = |s: &str| {
                    s.trim().parse::<u8>().map_err(|_| {
                        invalid(format!(
                            "unitIds: {text:?} is not a unit id or a range like \"1-247\""
                        ))
                    })
                };
                match text.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => {
                        let u = parse(text)?;
                        (u, u)
                    }
                }
            }
        };
        if lo > hi {
            return Err(invalid(format!("unitIds: range {lo}-{hi} is backwards")));
        }
        if hi > max {
            return Err(invalid(format!("unitIds: {hi} is above {max}")));
        }
        set.extend(lo..=hi);
    }
    Ok(set.into_iter().collect())
}

fn bounded(
    name: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, DiscoveryError> {
    let v = value.unwrap_or(default);
    if v == 0 || v > max {
        return Err(invalid(format!(
            "{name} must be between 1 and {max}, not {v}"
        )));
    }
    Ok(v)
}

fn millis(name: &str, value: Option<u64>, default: u64) -> Result<Duration, DiscoveryError> {
    let v = value.unwrap_or(default);
    if v == 0 || v > 600_000 {
        return Err(invalid(format!(
            "{name} must be between 1 and 600000, not {v}"
        )));
    }
    Ok(Duration::from_millis(v))
}

fn seconds(
    name: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
) -> Result<Duration, DiscoveryError> {
    let v = value.unwrap_or(default);
    if v < min || v > 86_400 {
        return Err(invalid(format!(
            "{name} must be between {min} and 86400, not {v}"
        )));
    }
    Ok(Duration::from_secs(v))
}

#[allow(clippy::too_many_arguments)]
fn common(
    unit_ids: Vec<u8>,
    request_timeout: Duration,
    scan_budget: Duration,
    rescan_interval: Duration,
    concurrency: usize,
    identification: &IdentificationSettings,
    probes: &[ProbeSetting],
    filters: &Filters,
) -> Result<Common, DiscoveryError> {
    if probes.len() > MAX_PROBES {
        return Err(invalid(format!(
            "at most {MAX_PROBES} probes, not {}",
            probes.len()
        )));
    }
    let mut names = BTreeSet::new();
    let mut validated = Vec::with_capacity(probes.len());
    for p in probes {
        if !names.insert(p.name.clone()) {
            return Err(invalid(format!("probe name {:?} is used twice", p.name)));
        }
        validated.push(Probe::try_from(p.clone()).map_err(|e| invalid(e.to_string()))?);
    }
    if !identification.enabled && validated.is_empty() {
        return Err(invalid(
            "identification is disabled and no probes are set: nothing could find a unit",
        ));
    }
    Ok(Common {
        unit_ids,
        request_timeout,
        scan_budget,
        rescan_interval,
        concurrency,
        identification: identification.clone(),
        probes: validated,
        filters: filters.clone(),
    })
}

impl TcpSettings {
    /// Validates the settings into a plan.
    pub fn plan(&self) -> Result<TcpPlan, DiscoveryError> {
        if self.hosts.is_empty() && self.cidrs.is_empty() {
            return Err(invalid(
                "set hosts or cidrs: modbus-tcp scans only what it is told to",
            ));
        }
        let max_addresses = bounded(
            "maxAddresses",
            self.max_addresses,
            DEFAULT_MAX_ADDRESSES,
            MAX_ADDRESSES_LIMIT,
        )?;
        let mut seen = BTreeSet::new();
        let mut addresses = Vec::new();
        let mut names = Vec::new();
        let mut push = |ip: IpAddr, addresses: &mut Vec<IpAddr>| -> Result<(), DiscoveryError> {
            if seen.insert(ip) {
                addresses.push(ip);
                if addresses.len() > max_addresses {
                    return Err(invalid(format!(
                        "hosts and cidrs hold more than maxAddresses ({max_addresses}) addresses"
                    )));
                }
            }
            Ok(())
        };
        for h in &self.hosts {
            let h = h.trim();
            if h.is_empty() {
                return Err(invalid("hosts: empty host"));
            }
            match h.parse::<IpAddr>() {
                Ok(ip) => push(ip, &mut addresses)?,
                Err(_) => {
                    if h.contains(['/', ' ', ':']) || h.len() > 253 {
                        return Err(invalid(format!(
                            "hosts: {h:?} is neither an IP address nor a host name (CIDRs go in cidrs, ports in ports)"
                        )));
                    }
                    names.push(h.to_string());
                }
            }
        }
        for c in &self.cidrs {
            let net: IpNet = c
                .trim()
                .parse()
                .map_err(|e| invalid(format!("cidrs: {c:?}: {e}")))?;
            // Check the size before expanding, so a /8 is refused without iterating it.
            let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
            if host_bits > 17 || (1usize << host_bits) > max_addresses + 2 {
                return Err(invalid(format!(
                    "cidrs: {c} holds more than maxAddresses ({max_addresses}) addresses"
                )));
            }
            for ip in net.hosts() {
                push(ip, &mut addresses)?;
            }
        }
        let ports = if self.ports.is_empty() {
            vec![DEFAULT_PORT]
        } else {
            let set: BTreeSet<u16> = self.ports.iter().copied().collect();
            if set.contains(&0) {
                return Err(invalid("ports: 0 is not a port"));
            }
            set.into_iter().collect()
        };
        // Unit 0 is broadcast on serial lines but a valid address on TCP (some
        // devices answer only 0 or 255), so all of 0..=255 is allowed here.
        let unit_ids = unit_ids(&self.unit_ids, &[1], u8::MAX)?;
        let common = common(
            unit_ids,
            millis(
                "requestTimeoutMillis",
                self.request_timeout_millis,
                DEFAULT_TCP_REQUEST_TIMEOUT_MS,
            )?,
            seconds(
                "scanBudgetSeconds",
                self.scan_budget_seconds,
                DEFAULT_TCP_SCAN_BUDGET_S,
                1,
            )?,
            seconds(
                "rescanIntervalSeconds",
                self.rescan_interval_seconds,
                DEFAULT_TCP_RESCAN_S,
                1,
            )?,
            bounded(
                "concurrency",
                self.concurrency,
                DEFAULT_CONCURRENCY,
                MAX_CONCURRENCY,
            )?,
            &self.identification,
            &self.probes,
            &self.filters,
        )?;
        Ok(TcpPlan {
            addresses,
            names,
            ports,
            connect_timeout: millis(
                "connectTimeoutMillis",
                self.connect_timeout_millis,
                DEFAULT_CONNECT_TIMEOUT_MS,
            )?,
            connections_per_endpoint: bounded(
                "connectionsPerEndpoint",
                self.connections_per_endpoint,
                DEFAULT_CONNECTIONS_PER_ENDPOINT,
                MAX_CONCURRENCY,
            )?,
            max_addresses,
            common,
        })
    }
}

impl RtuSettings {
    /// Validates the settings into a plan.
    pub fn plan(&self) -> Result<RtuPlan, DiscoveryError> {
        if self.ports.is_empty() {
            return Err(invalid(
                "set ports: serial device paths or globs such as /dev/ttyUSB*",
            ));
        }
        for p in &self.ports {
            if !p.starts_with('/') {
                return Err(invalid(format!("ports: {p:?} is not an absolute path")));
            }
            glob::Pattern::new(p).map_err(|e| invalid(format!("ports: {p:?}: {e}")))?;
        }
        let baud_rates = if self.baud_rates.is_empty() {
            vec![19_200, 9_600]
        } else {
            self.baud_rates.clone()
        };
        if let Some(b) = baud_rates.iter().find(|b| !(50..=4_000_000).contains(*b)) {
            return Err(invalid(format!("baudRates: {b} is not a baud rate")));
        }
        let stop_bits = self.stop_bits.unwrap_or(1);
        if !(1..=2).contains(&stop_bits) {
            return Err(invalid(format!("stopBits must be 1 or 2, not {stop_bits}")));
        }
        let device_permissions = self
            .device_permissions
            .clone()
            .unwrap_or_else(|| "rw".into());
        if device_permissions.is_empty()
            || !device_permissions
                .chars()
                .all(|c| matches!(c, 'r' | 'w' | 'm'))
        {
            return Err(invalid(format!(
                "devicePermissions {device_permissions:?} is not a combination of r, w and m"
            )));
        }
        let unit_ids = unit_ids(
            &self.unit_ids,
            &(1..=MAX_RTU_UNIT).collect::<Vec<_>>(),
            MAX_RTU_UNIT,
        )?;
        if unit_ids.contains(&0) {
            return Err(invalid(
                "unitIds: 0 is the broadcast address on a serial line",
            ));
        }
        let common = common(
            unit_ids,
            millis(
                "requestTimeoutMillis",
                self.request_timeout_millis,
                DEFAULT_RTU_REQUEST_TIMEOUT_MS,
            )?,
            seconds(
                "scanBudgetSeconds",
                self.scan_budget_seconds,
                DEFAULT_RTU_SCAN_BUDGET_S,
                1,
            )?,
            seconds(
                "rescanIntervalSeconds",
                self.rescan_interval_seconds,
                DEFAULT_RTU_RESCAN_S,
                1,
            )?,
            bounded(
                "concurrency",
                self.concurrency,
                DEFAULT_CONCURRENCY,
                MAX_CONCURRENCY,
            )?,
            &self.identification,
            &self.probes,
            &self.filters,
        )?;
        Ok(RtuPlan {
            ports: self.ports.clone(),
            baud_rates,
            parity: self.parity,
            stop_bits,
            max_ports: bounded("maxPorts", self.max_ports, DEFAULT_MAX_PORTS, 4096)?,
            device_permissions,
            common,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_discovery_sdk::parse_details;

    #[test]
    fn tcp_defaults_and_ranges() {
        let s: TcpSettings =
            parse_details("hosts: [10.0.0.5]\ncidrs: [10.0.1.0/30]\nunitIds: [3, \"10-12\"]\n")
                .expect("parse");
        let p = s.plan().expect("plan");
        assert_eq!(p.addresses.len(), 3);
        assert_eq!(p.ports, [DEFAULT_PORT]);
        assert_eq!(p.common.unit_ids, [3, 10, 11, 12]);
        assert_eq!(p.common.concurrency, DEFAULT_CONCURRENCY);
    }

    #[test]
    fn refusals_name_the_field() {
        let e = parse_details::<TcpSettings>("hostz: [a]").expect_err("unknown");
        assert!(e.to_string().contains("hostz"), "{e}");
        let big: TcpSettings = parse_details("cidrs: [10.0.0.0/8]").expect("parse");
        assert!(
            big.plan()
                .expect_err("too big")
                .to_string()
                .contains("maxAddresses")
        );
        let none: TcpSettings = parse_details("ports: [502]").expect("parse");
        assert!(none.plan().is_err());
        let back: TcpSettings = parse_details("hosts: [a]\nunitIds: [\"9-3\"]").expect("parse");
        assert!(
            back.plan()
                .expect_err("backwards")
                .to_string()
                .contains("backwards")
        );
        let rtu: RtuSettings = parse_details("ports: [/dev/ttyS0]\nunitIds: [0]").expect("parse");
        assert!(rtu.plan().is_err());
        let rtu: RtuSettings = parse_details("ports: [/dev/ttyS0]\nstopBits: 3").expect("parse");
        assert!(rtu.plan().is_err());
        let e = parse_details::<TcpSettings>("hosts: [a]\nfilters: {vendorz: {action: Include}}")
            .expect_err("unknown filter");
        assert!(e.to_string().contains("vendorz"), "{e}");
    }

    #[test]
    fn rtu_defaults() {
        let s: RtuSettings = parse_details("ports: [\"/dev/ttyUSB*\"]").expect("parse");
        let p = s.plan().expect("plan");
        assert_eq!(p.common.unit_ids.len(), 247);
        assert_eq!(p.baud_rates, [19_200, 9_600]);
        assert_eq!(p.parity, Parity::Even);
    }
}
