//! The `onvif` discovery handler: ONVIF IP cameras.
//!
//! Cameras are found by WS-Discovery (multicast on IPv4 and IPv6 on the chosen interfaces,
//! unicast to listed hosts and ranges, Hello/Bye heard in between), then described through their
//! device service (oxvif): identity, MAC, media profiles and RTSP stream URIs. The device id is
//! the endpoint UUID, so a camera that changes address stays the same Instance. See README.md.

pub mod camera;
pub mod net;
pub mod redact;
pub mod settings;
pub mod transport;
pub mod wsd;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{
    Device, DeviceStream, Diagnostic, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    DiscoveryUpdate, FilterList, severity,
};

use crate::camera::{Credentials, DescribeError, Description};
use crate::net::{Announcement, ProbePlan, Reply};
use crate::settings::Resolved;
use crate::wsd::Target;

/// Name Configurations use (as in Akri).
pub const HANDLER_NAME: &str = "onvif";

/// Akri's properties.
pub const PROP_SERVICE_URL: &str = "ONVIF_DEVICE_SERVICE_URL";
pub const PROP_UUID: &str = "ONVIF_DEVICE_UUID";
pub const PROP_IP: &str = "ONVIF_DEVICE_IP_ADDRESS";
pub const PROP_MAC: &str = "ONVIF_DEVICE_MAC_ADDRESS";
/// Verge's additions.
pub const PROP_MANUFACTURER: &str = "ONVIF_MANUFACTURER";
pub const PROP_MODEL: &str = "ONVIF_MODEL";
pub const PROP_FIRMWARE: &str = "ONVIF_FIRMWARE";
pub const PROP_SERIAL: &str = "ONVIF_SERIAL";
/// The main (first) profile's RTSP URI; each profile also gets `ONVIF_STREAM_URI_<TOKEN>`.
pub const PROP_STREAM_URI: &str = "ONVIF_STREAM_URI";

/// Cameras described at once.
pub const DESCRIBE_CONCURRENCY: usize = 8;
/// Delay of the probe round that follows a Hello.
pub const HELLO_FOLLOW_UP: Duration = Duration::from_secs(1);
/// Updates buffered per stream; a slow consumer only needs the latest.
const UPDATE_BUFFER: usize = 4;

/// The handler.
#[derive(Clone, Debug)]
pub struct Onvif {
    shared: bool,
}

impl Default for Onvif {
    fn default() -> Self {
        Self { shared: true }
    }
}

impl Onvif {
    /// Cameras are network devices that several nodes can reach: shared.
    pub fn new(shared: bool) -> Self {
        Self { shared }
    }
}

impl DiscoveryHandler for Onvif {
    fn name(&self) -> &str {
        HANDLER_NAME
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let result = Resolved::parse(&request.details).map(|settings| {
            let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
            tokio::spawn(run(settings, request.properties, tx));
            Box::pin(ReceiverStream::new(rx)) as DeviceStream
        });
        async move { result }.boxed()
    }
}

/// Finds credentials for a camera in discoveryProperties: per UUID (Akri's
/// `username_<uuid>` with `-` as `_`), per MAC (`username_mac_<12 hex digits>`), then
/// `username_default`. Names compare case-insensitively; a missing password is empty.
pub fn credentials_for(
    props: &BTreeMap<String, Vec<u8>>,
    id: &str,
    mac: Option<&str>,
) -> Option<Credentials> {
    let get = |name: &str| {
        props
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            })
    };
    let mut suffixes = vec![id.replace('-', "_")];
    if let Some(mac) = mac {
        let hex: String = mac.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        suffixes.push(format!("mac_{}", hex.to_ascii_lowercase()));
    }
    suffixes.push("default".into());
    suffixes.into_iter().find_map(|s| {
        let user = format!("username_{s}");
        get(&user).map(|username| Credentials {
            username,
            password: get(&format!("password_{s}")).unwrap_or_default(),
            source: format!("{user}/password_{s}"),
        })
    })
}

fn norm_mac(m: &str) -> String {
    m.trim().to_ascii_lowercase().replace('-', ":")
}

fn same_ip(a: &str, b: &str) -> bool {
    match (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.trim() == b.trim(),
    }
}

fn passes(f: &Option<FilterList>, value: &str, eq: impl Fn(&str, &str) -> bool) -> bool {
    f.as_ref().is_none_or(|f| f.accepts_with(value, eq))
}

/// The device-service URL to use and its host: the XAddr whose host sent the reply, else the
/// first with an IP address, else the first http(s) XAddr. Userinfo in an XAddr is removed
/// (it would otherwise reach `ONVIF_DEVICE_SERVICE_URL`, diagnostics and logs, and reqwest
/// would send it as HTTP Basic auth); credentials come from discoveryProperties only.
pub fn pick_xaddr(t: &Target, from: IpAddr) -> Option<(String, String)> {
    let parsed: Vec<(String, String)> = t
        .xaddrs
        .iter()
        .filter_map(|x| {
            let x = redact::strip_userinfo(x).ok()?;
            let u = reqwest::Url::parse(&x).ok()?;
            if !matches!(u.scheme(), "http" | "https") {
                return None;
            }
            let host = u
                .host_str()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            Some((x, host))
        })
        .collect();
    // Next best: an address literal (a host name needs DNS, which camera networks often lack).
    parsed
        .iter()
        .find(|(_, h)| same_ip(h, &from.to_string()))
        .or_else(|| parsed.iter().find(|(_, h)| h.parse::<IpAddr>().is_ok()))
        .or_else(|| parsed.first())
        .cloned()
}

/// A camera seen on the network (before description).
#[derive(Clone, Debug)]
struct Seen {
    target: Target,
    url: String,
    ip: String,
}

#[derive(Clone, Debug)]
struct Known {
    url: String,
    result: Result<Description, DescribeError>,
    arp_mac: Option<String>,
}

fn accept_seen(s: &Resolved, id: &str, seen: &Seen) -> bool {
    passes(&s.raw.uuids, id, |item, v| wsd::device_id(item) == v)
        && passes(&s.raw.ip_addresses, &seen.ip, same_ip)
        && s.raw
            .scopes
            .as_ref()
            .is_none_or(|f| f.accepts_any(seen.target.scopes.iter().map(String::as_str)))
}

fn env_suffix(token: &str) -> String {
    token
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn device(id: &str, seen: &Seen, d: &Description, mac: Option<&str>) -> Device {
    let mut p = BTreeMap::new();
    p.insert(PROP_SERVICE_URL.to_string(), seen.url.clone());
    p.insert(PROP_UUID.to_string(), id.to_string());
    p.insert(PROP_IP.to_string(), seen.ip.clone());
    if let Some(mac) = mac {
        p.insert(PROP_MAC.to_string(), mac.to_string());
    }
    p.insert(PROP_MANUFACTURER.to_string(), d.manufacturer.clone());
    p.insert(PROP_MODEL.to_string(), d.model.clone());
    p.insert(PROP_FIRMWARE.to_string(), d.firmware.clone());
    p.insert(PROP_SERIAL.to_string(), d.serial.clone());
    if let Some((_, uri)) = d.streams.first() {
        p.insert(PROP_STREAM_URI.to_string(), uri.clone());
    }
    for (token, uri) in &d.streams {
        p.entry(format!("{PROP_STREAM_URI}_{}", env_suffix(token)))
            .or_insert_with(|| uri.clone());
    }
    Device {
        id: id.to_string(),
        properties: p.into_iter().collect(),
        mounts: Vec::new(),
        device_specs: Vec::new(),
    }
}

fn update(
    s: &Resolved,
    present: &BTreeMap<String, Seen>,
    cache: &BTreeMap<String, Known>,
    extra: &[Diagnostic],
) -> DiscoveryUpdate {
    let mut u = DiscoveryUpdate::default();
    for (id, seen) in present {
        let Some(k) = cache.get(id) else { continue };
        match &k.result {
            Ok(d) => {
                let mac = d
                    .mac
                    .clone()
                    .or_else(|| k.arp_mac.clone())
                    .map(|m| norm_mac(&m));
                let keep = passes(
                    &s.raw.mac_addresses,
                    mac.as_deref().unwrap_or(""),
                    |i, v| norm_mac(i) == v,
                ) && passes(&s.raw.manufacturers, &d.manufacturer, |i, v| {
                    i.eq_ignore_ascii_case(v)
                }) && passes(&s.raw.models, &d.model, |i, v| i.eq_ignore_ascii_case(v));
                if keep {
                    u.devices.push(device(id, seen, d, mac.as_deref()));
                }
            }
            Err(e) => {
                let sev = match e {
                    DescribeError::CredentialsRejected(_) | DescribeError::CredentialsRequired => {
                        severity::ERROR
                    }
                    _ => severity::WARNING,
                };
                u.diagnostics.push(Diagnostic {
                    subject: id.clone(),
                    severity: sev.to_string(),
                    message: format!("camera {id} at {}: {e}", seen.url),
                });
            }
        }
    }
    u.diagnostics.extend(extra.iter().cloned());
    u
}

async fn run(
    s: Resolved,
    props: BTreeMap<String, Vec<u8>>,
    tx: mpsc::Sender<Result<DiscoveryUpdate, DiscoveryError>>,
) {
    let mut present: BTreeMap<String, Seen> = BTreeMap::new();
    // Rounds in a row each present camera has not answered.
    let mut missed: BTreeMap<String, u32> = BTreeMap::new();
    let mut cache: BTreeMap<String, Known> = BTreeMap::new();

    let mut interfaces: Option<Vec<net::Interface>> = None;
    let (_idle_tx, idle_rx) = mpsc::channel(1);
    let mut ann: mpsc::Receiver<Announcement> = idle_rx;
    let mut listening = false;
    let mut next_round = Instant::now();
    let mut extra: Vec<Diagnostic> = Vec::new();
    if tx.send(Ok(DiscoveryUpdate::default())).await.is_err() {
        return;
    }
    let mut last = Some(DiscoveryUpdate::default());
    loop {
        let mut full_round = false;
        tokio::select! {
            _ = tokio::time::sleep_until(next_round) => {
                let multicast = s.ipv4 || s.ipv6;
                let ifs = match s.raw.interfaces.as_deref() {
                    Some([]) => Ok(Vec::new()),
                    names if multicast => net::select_interfaces(names),
                    _ => Ok(Vec::new()),
                };
                extra.clear();
                let ifs = ifs.unwrap_or_else(|e| {
                    extra.push(Diagnostic { subject: "interfaces".into(), severity: severity::WARNING.into(), message: format!("cannot list network interfaces: {e}") });
                    Vec::new()
                });
                if let Some(names) = s.raw.interfaces.as_deref() {
                    for n in names.iter().filter(|n| !ifs.iter().any(|i| &i.name == *n)) {
                        extra.push(Diagnostic { subject: format!("interface {n}"), severity: severity::WARNING.into(), message: format!("interface {n} does not exist or has no address; no multicast on it") });
                    }
                }
                if interfaces.as_ref() != Some(&ifs) {
                    tracing::debug!(interfaces = ?ifs.iter().map(|i| &i.name).collect::<Vec<_>>(), "multicast interfaces");
                    if s.listen_announcements && !ifs.is_empty() {
                        ann = net::announcements(&ifs, s.ipv4, s.ipv6);
                        listening = true;
                    }
                    interfaces = Some(ifs.clone());
                }
                let plan = ProbePlan { interfaces: ifs, ipv4: s.ipv4, ipv6: s.ipv6, unicast: s.unicast.clone(), unicast_burst: s.unicast_concurrency, wait: s.discovery_timeout };
                let round = net::probe_round(&plan).await;
                let answered = seen_map(&s, round.into_values());
                present = keep_missing(present, answered, &mut missed, s.missed_rounds_before_lost);
                next_round = Instant::now() + s.probe_interval;
                full_round = true;
            }
            a = ann.recv(), if listening => match a {
                Some(Announcement::Hello((t, from))) => {
                    // A camera announces itself while it starts; a round shortly after
                    // retries a description that came too early.
                    next_round = next_round.min(Instant::now() + HELLO_FOLLOW_UP);
                    if !t.xaddrs.is_empty() {
                        present.extend(seen_map(&s, std::iter::once((t, from))));
                        full_round = true;
                    }
                }
                Some(Announcement::Bye(endpoint)) => {
                    let id = wsd::device_id(&endpoint);
                    tracing::debug!(%id, "Bye");
                    present.remove(&id);
                    missed.remove(&id);
                }
                None => listening = false,
            },
            _ = tx.closed() => return,
        }
        cache.retain(|id, _| present.contains_key(id));
        let todo: Vec<(String, Seen)> = present
            .iter()
            .filter(|(id, seen)| match cache.get(*id) {
                None => true,
                Some(k) => k.url != seen.url || (full_round && k.result.is_err()),
            })
            .map(|(id, seen)| (id.clone(), seen.clone()))
            .collect();
        let timeout = s.request_timeout;
        let props = &props;
        let described: Vec<(String, Known)> = futures::stream::iter(todo)
            .map(|(id, seen)| async move {
                let ip: Option<IpAddr> = seen.ip.parse().ok();
                let arp_mac = ip.and_then(net::arp_mac);
                let creds = credentials_for(props, &id, arp_mac.as_deref());
                // A whole description is bounded too (a camera answering each call just in time).
                let result = tokio::time::timeout(timeout * 8, camera::describe(&seen.url, creds.as_ref(), timeout))
                    .await
                    .unwrap_or_else(|_| Err(DescribeError::Unreachable("description timed out".into())));
                // The neighbour entry exists once we have talked to the camera.
                let arp_mac = arp_mac.or_else(|| ip.and_then(net::arp_mac));
                match &result {
                    Ok(d) => tracing::info!(%id, url = %seen.url, model = %d.model, streams = d.streams.len(), "camera described"),
                    Err(e) => tracing::warn!(%id, url = %seen.url, error = %e, "camera not described"),
                }
                (id, Known { url: seen.url, result, arp_mac })
            })
            .buffer_unordered(DESCRIBE_CONCURRENCY)
            .collect()
            .await;
        cache.extend(described);
        let u = update(&s, &present, &cache, &extra);
        if last.as_ref() != Some(&u) {
            tracing::debug!(
                devices = u.devices.len(),
                diagnostics = u.diagnostics.len(),
                "device list changed"
            );
            if tx.send(Ok(u.clone())).await.is_err() {
                return;
            }
            last = Some(u);
        }
    }
}

/// The cameras of a probe round, plus those of `before` that have not answered for fewer
/// than `limit` rounds in a row (UDP probes and replies get lost; one silent round should not
/// churn an Instance). `missed` counts the silent rounds per camera.
fn keep_missing(
    before: BTreeMap<String, Seen>,
    mut answered: BTreeMap<String, Seen>,
    missed: &mut BTreeMap<String, u32>,
    limit: u32,
) -> BTreeMap<String, Seen> {
    missed.retain(|id, _| !answered.contains_key(id));
    for (id, seen) in before {
        if answered.contains_key(&id) {
            continue;
        }
        let n = missed.entry(id.clone()).or_insert(0);
        *n += 1;
        if *n < limit {
            tracing::debug!(%id, missed = *n, "camera silent this round; kept");
            answered.insert(id, seen);
        } else {
            missed.remove(&id);
        }
    }
    answered
}

fn seen_map(s: &Resolved, replies: impl Iterator<Item = Reply>) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    for (t, from) in replies {
        let id = wsd::device_id(&t.endpoint);
        if id.is_empty() {
            continue;
        }
        let Some((url, ip)) = pick_xaddr(&t, from) else {
            tracing::debug!(%id, "no usable XAddr");
            continue;
        };
        let seen = Seen { target: t, url, ip };
        if accept_seen(s, &id, &seen) {
            out.insert(id, seen);
        }
    }
    out
}

/// Property names that hold secrets, for tests and reviews: never in Instances or logs.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("password_") || n.starts_with("username_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_camera_survives_fewer_silent_rounds_than_the_limit() {
        let seen = |ip: &str| Seen {
            target: Target::default(),
            url: format!("http://{ip}/onvif/device_service"),
            ip: ip.into(),
        };
        let both: BTreeMap<String, Seen> = [
            ("a".to_string(), seen("10.0.0.1")),
            ("b".to_string(), seen("10.0.0.2")),
        ]
        .into();
        let only_a: BTreeMap<String, Seen> = [("a".to_string(), seen("10.0.0.1"))].into();
        let mut missed = BTreeMap::new();
        // b silent once: kept.
        let p = keep_missing(both.clone(), only_a.clone(), &mut missed, 2);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["a", "b"]);
        // b answers again: the count starts over.
        let p = keep_missing(p, both.clone(), &mut missed, 2);
        assert!(missed.is_empty());
        let p = keep_missing(p, only_a.clone(), &mut missed, 2);
        assert_eq!(p.len(), 2);
        // b silent twice in a row: gone.
        let p = keep_missing(p, only_a.clone(), &mut missed, 2);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["a"]);
        assert!(missed.is_empty());
        // Limit 1: gone at the first silent round.
        let p = keep_missing(both, only_a, &mut missed, 1);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn credentials_by_uuid_mac_and_default() {
        let props: BTreeMap<String, Vec<u8>> = [
            ("username_default", "d"),
            ("password_default", "dp"),
            ("username_aaaa_bbbb", "u"),
            ("password_aaaa_bbbb", "up"),
            ("USERNAME_MAC_0011223344ff", "m"),
            ("password_mac_0011223344ff", "mp"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let c = credentials_for(&props, "aaaa-bbbb", None).expect("uuid");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "up"));
        let c = credentials_for(&props, "cccc", Some("00:11:22:33:44:FF")).expect("mac");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("m", "mp"));
        let c = credentials_for(&props, "cccc", None).expect("default");
        assert_eq!(c.username, "d");
        assert!(!format!("{c:?}").contains("dp"), "Debug shows no password");
        assert!(credentials_for(&BTreeMap::new(), "x", None).is_none());
    }

    #[test]
    fn picks_the_xaddr_the_reply_came_from() {
        let t = Target {
            endpoint: "urn:uuid:1".into(),
            xaddrs: vec![
                "http://10.0.0.9/onvif/device_service".into(),
                "http://[fd00::2]:8080/onvif/device_service".into(),
                "ftp://x".into(),
            ],
            ..Default::default()
        };
        let (url, ip) = pick_xaddr(&t, "fd00::2".parse().expect("ip")).expect("v6");
        assert_eq!(
            (url.as_str(), ip.as_str()),
            ("http://[fd00::2]:8080/onvif/device_service", "fd00::2")
        );
        let (_, ip) = pick_xaddr(&t, "10.9.9.9".parse().expect("ip")).expect("first");
        assert_eq!(ip, "10.0.0.9");
        let named = Target {
            xaddrs: vec!["http://cam.invalid/x".into(), "http://10.0.0.7/x".into()],
            ..Default::default()
        };
        let (_, ip) = pick_xaddr(&named, "10.9.9.9".parse().expect("ip")).expect("literal");
        assert_eq!(ip, "10.0.0.7");
        assert!(pick_xaddr(&Target::default(), "10.0.0.1".parse().expect("ip")).is_none());
        let with_userinfo = Target {
            xaddrs: vec!["http://admin:secret@10.0.0.8:8080/onvif/device_service".into()],
            ..Default::default()
        };
        let (url, ip) = pick_xaddr(&with_userinfo, "10.0.0.8".parse().expect("ip")).expect("x");
        assert_eq!(
            (url.as_str(), ip.as_str()),
            ("http://10.0.0.8:8080/onvif/device_service", "10.0.0.8")
        );
    }

    #[test]
    fn profile_tokens_become_env_names() {
        assert_eq!(env_suffix("Profile_Main"), "PROFILE_MAIN");
        assert_eq!(env_suffix("main-stream 1"), "MAIN_STREAM_1");
    }
}
