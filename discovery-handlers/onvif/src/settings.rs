//! discoveryDetails of the `onvif` handler.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use verge_discovery_sdk::{DiscoveryError, FilterList, parse_details};

/// Akri's default wait for probe replies.
pub const DEFAULT_DISCOVERY_TIMEOUT_SECONDS: u64 = 1;
/// How often the network is probed again (cameras that vanish without `Bye` are noticed then).
pub const DEFAULT_PROBE_INTERVAL_SECONDS: u64 = 10;
/// Per-request limit for device-service calls.
pub const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 5;
/// Unicast probes sent per burst.
pub const DEFAULT_UNICAST_CONCURRENCY: usize = 64;
/// Most addresses a Configuration may scan by unicast (a /20), so a typo like `10.0.0.0/8` is refused.
pub const MAX_UNICAST_ADDRESSES: u64 = 4096;
/// Upper bounds that keep a Configuration from stalling the handler.
pub const MAX_TIMEOUT_SECONDS: u64 = 60;

/// Settings, YAML or JSON. Every field is optional.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OnvifSettings {
    /// Akri: filter on the camera's IP address (the host of its device-service URL).
    #[serde(default)]
    pub ip_addresses: Option<FilterList>,
    /// Akri: filter on the camera's MAC address (case-insensitive, `:` or `-` separated).
    #[serde(default)]
    pub mac_addresses: Option<FilterList>,
    /// Akri: filter on WS-Discovery scopes (a camera passes Include if any scope is listed).
    #[serde(default)]
    pub scopes: Option<FilterList>,
    /// Akri: filter on the endpoint UUID (with or without `urn:uuid:`).
    #[serde(default)]
    pub uuids: Option<FilterList>,
    /// Filter on GetDeviceInformation's manufacturer.
    #[serde(default)]
    pub manufacturers: Option<FilterList>,
    /// Filter on GetDeviceInformation's model.
    #[serde(default)]
    pub models: Option<FilterList>,
    /// Akri: seconds to wait for probe replies in each round (default 1).
    #[serde(default)]
    pub discovery_timeout_seconds: Option<u64>,
    /// Seconds between probe rounds (default 10). Hello/Bye are acted on at once.
    #[serde(default)]
    pub probe_interval_seconds: Option<u64>,
    /// Seconds per device-service request (default 5).
    #[serde(default)]
    pub request_timeout_seconds: Option<u64>,
    /// Interfaces to multicast on; absent: every interface with an address except loopback and
    /// the ones holding a default route; `[]`: no multicast (unicast only).
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
    /// Probe 239.255.255.250 (default true).
    #[serde(default)]
    pub ipv4: Option<bool>,
    /// Probe ff02::c (default true).
    #[serde(default)]
    pub ipv6: Option<bool>,
    /// Hosts and CIDR ranges probed by unicast on port 3702 (for networks without multicast).
    #[serde(default)]
    pub unicast_targets: Vec<String>,
    /// Unicast probes per burst (default 64).
    #[serde(default)]
    pub unicast_concurrency: Option<usize>,
    /// Listen for Hello/Bye on port 3702 of the multicast interfaces (default true).
    #[serde(default)]
    pub listen_announcements: Option<bool>,
    /// Probe rounds in a row a camera may miss before it is gone (default 2; 1 drops it at
    /// the first unanswered round). WS-Discovery is UDP: a busy camera or network loses a
    /// ProbeMatch now and then, and that should not churn its Instance. A Bye removes it at once.
    #[serde(default)]
    pub missed_rounds_before_lost: Option<u32>,
}

/// Default of `missedRoundsBeforeLost`.
pub const DEFAULT_MISSED_ROUNDS_BEFORE_LOST: u32 = 2;
/// Largest `missedRoundsBeforeLost` (longer absences belong to the agent's grace period).
pub const MAX_MISSED_ROUNDS_BEFORE_LOST: u32 = 10;

/// Settings checked and with defaults applied.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub raw: OnvifSettings,
    pub discovery_timeout: Duration,
    pub probe_interval: Duration,
    pub request_timeout: Duration,
    pub ipv4: bool,
    pub ipv6: bool,
    pub unicast: Vec<IpAddr>,
    pub unicast_concurrency: usize,
    pub listen_announcements: bool,
    pub missed_rounds_before_lost: u32,
}

fn seconds(name: &str, v: Option<u64>, default: u64) -> Result<Duration, DiscoveryError> {
    let v = v.unwrap_or(default);
    if v == 0 || v > MAX_TIMEOUT_SECONDS * 60 {
        return Err(DiscoveryError::InvalidSettings(format!(
            "{name} must be between 1 and {}",
            MAX_TIMEOUT_SECONDS * 60
        )));
    }
    Ok(Duration::from_secs(v))
}

/// Expands hosts and CIDRs, refusing more than [`MAX_UNICAST_ADDRESSES`] in total.
pub fn expand_targets(targets: &[String]) -> Result<Vec<IpAddr>, DiscoveryError> {
    let mut out = Vec::new();
    for t in targets {
        let t = t.trim();
        let net: IpNet = if let Ok(ip) = t.parse::<IpAddr>() {
            IpNet::from(ip)
        } else {
            t.parse().map_err(|_| {
                DiscoveryError::InvalidSettings(format!(
                    "unicastTargets: {t:?} is neither an IP address nor a CIDR range"
                ))
            })?
        };
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let size = if host_bits >= 63 {
            u64::MAX
        } else {
            1u64 << host_bits
        };
        if size.saturating_add(out.len() as u64) > MAX_UNICAST_ADDRESSES {
            return Err(DiscoveryError::InvalidSettings(format!(
                "unicastTargets: more than {MAX_UNICAST_ADDRESSES} addresses in total (at {t})"
            )));
        }
        out.extend(net.hosts());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl Resolved {
    /// Parses and checks discoveryDetails.
    pub fn parse(details: &str) -> Result<Self, DiscoveryError> {
        let raw: OnvifSettings = parse_details(details)?;
        let discovery_timeout = seconds(
            "discoveryTimeoutSeconds",
            raw.discovery_timeout_seconds,
            DEFAULT_DISCOVERY_TIMEOUT_SECONDS,
        )?;
        if discovery_timeout > Duration::from_secs(MAX_TIMEOUT_SECONDS) {
            return Err(DiscoveryError::InvalidSettings(format!(
                "discoveryTimeoutSeconds must be at most {MAX_TIMEOUT_SECONDS}"
            )));
        }
        let probe_interval = seconds(
            "probeIntervalSeconds",
            raw.probe_interval_seconds,
            DEFAULT_PROBE_INTERVAL_SECONDS,
        )?;
        let request_timeout = seconds(
            "requestTimeoutSeconds",
            raw.request_timeout_seconds,
            DEFAULT_REQUEST_TIMEOUT_SECONDS,
        )?;
        if request_timeout > Duration::from_secs(MAX_TIMEOUT_SECONDS) {
            return Err(DiscoveryError::InvalidSettings(format!(
                "requestTimeoutSeconds must be at most {MAX_TIMEOUT_SECONDS}"
            )));
        }
        let unicast_concurrency = raw
            .unicast_concurrency
            .unwrap_or(DEFAULT_UNICAST_CONCURRENCY);
        if unicast_concurrency == 0 || unicast_concurrency > 1024 {
            return Err(DiscoveryError::InvalidSettings(
                "unicastConcurrency must be between 1 and 1024".into(),
            ));
        }
        let ipv4 = raw.ipv4.unwrap_or(true);
        let ipv6 = raw.ipv6.unwrap_or(true);
        let unicast = expand_targets(&raw.unicast_targets)?;
        let multicast = !matches!(&raw.interfaces, Some(v) if v.is_empty()) && (ipv4 || ipv6);
        if !multicast && unicast.is_empty() {
            return Err(DiscoveryError::InvalidSettings(
                "nothing to probe: multicast is off (interfaces: [] or ipv4 and ipv6 false) and unicastTargets is empty".into(),
            ));
        }
        let missed_rounds_before_lost = raw
            .missed_rounds_before_lost
            .unwrap_or(DEFAULT_MISSED_ROUNDS_BEFORE_LOST);
        if !(1..=MAX_MISSED_ROUNDS_BEFORE_LOST).contains(&missed_rounds_before_lost) {
            return Err(DiscoveryError::InvalidSettings(format!(
                "missedRoundsBeforeLost must be between 1 and {MAX_MISSED_ROUNDS_BEFORE_LOST}"
            )));
        }
        Ok(Self {
            listen_announcements: raw.listen_announcements.unwrap_or(true),
            missed_rounds_before_lost,
            raw,
            discovery_timeout,
            probe_interval,
            request_timeout,
            ipv4,
            ipv6,
            unicast,
            unicast_concurrency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_akri_fields() {
        let r = Resolved::parse("").expect("empty");
        assert_eq!(r.discovery_timeout, Duration::from_secs(1));
        assert!(r.ipv4 && r.ipv6 && r.unicast.is_empty());
        let r = Resolved::parse(
            "ipAddresses: {action: Include, items: [10.0.0.1]}\nmacAddresses: {action: Exclude, items: []}\nscopes: {action: Include, items: [x]}\nuuids: {action: Exclude, items: [y]}\ndiscoveryTimeoutSeconds: 2\n",
        )
        .expect("akri");
        assert_eq!(r.discovery_timeout, Duration::from_secs(2));
        assert!(r.raw.ip_addresses.is_some() && r.raw.uuids.is_some());
    }

    #[test]
    fn rejects_unknown_and_bad_values() {
        for bad in [
            "ipAdresses: {action: Include, items: []}",
            "discoveryTimeoutSeconds: 0",
            "discoveryTimeoutSeconds: 3600",
            "unicastTargets: [10.0.0.0/8]",
            "unicastTargets: [not-an-ip]",
            "interfaces: []",
            "unicastConcurrency: 0",
        ] {
            assert!(
                matches!(
                    Resolved::parse(bad),
                    Err(DiscoveryError::InvalidSettings(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn expands_targets() {
        let v = expand_targets(&["10.0.0.0/30".into(), "10.0.0.9".into(), "fd00::1".into()])
            .expect("expand");
        let s: Vec<String> = v.iter().map(|i| i.to_string()).collect();
        assert_eq!(s, ["10.0.0.1", "10.0.0.2", "10.0.0.9", "fd00::1"]);
        assert_eq!(
            expand_targets(&["10.0.0.0/20".into()]).expect("20").len(),
            4094
        );
    }
}
