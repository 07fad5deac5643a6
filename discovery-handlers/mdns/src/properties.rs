//! A resolved service, turned into a device: id and `MDNS_*` properties.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use verge_discovery_sdk::Device;

/// `MDNS_SERVICE_TYPE`: the browsed type, e.g. `_http._tcp.local.`.
pub const SERVICE_TYPE_PROPERTY: &str = "MDNS_SERVICE_TYPE";
/// `MDNS_INSTANCE`: the instance name, e.g. `Front door`.
pub const INSTANCE_PROPERTY: &str = "MDNS_INSTANCE";
/// `MDNS_HOSTNAME`: the SRV target, e.g. `cam-1.local.`.
pub const HOSTNAME_PROPERTY: &str = "MDNS_HOSTNAME";
/// `MDNS_ADDRESSES`: comma-separated, IPv4 first, then IPv6 (link-local last).
pub const ADDRESSES_PROPERTY: &str = "MDNS_ADDRESSES";
/// `MDNS_PORT`: the SRV port.
pub const PORT_PROPERTY: &str = "MDNS_PORT";
/// Prefix of one property per TXT key.
pub const TXT_PREFIX: &str = "MDNS_TXT_";
/// TXT keys turned into properties per service; the rest are skipped (logged).
/// A TXT record can hold thousands of tiny keys, each of which would become an
/// env var and a field of the Instance.
pub const MAX_TXT_PROPERTIES: usize = 64;
/// Longest TXT value kept, in bytes; longer values are cut at a character boundary.
pub const MAX_TXT_VALUE_LEN: usize = 1024;

/// One TXT entry as announced: key, and value (`None` for a boolean key without `=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxtEntry {
    /// The key as sent.
    pub key: String,
    /// The value bytes.
    pub value: Option<Vec<u8>>,
}

/// What we know of one service instance, independent of the mDNS library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The configured service type it was found under, `_x._tcp.local.`.
    pub service_type: String,
    /// `<instance>.<service type>`.
    pub fullname: String,
    /// SRV target host.
    pub hostname: String,
    /// SRV port.
    pub port: u16,
    /// Addresses of the host.
    pub addresses: Vec<IpAddr>,
    /// TXT entries in announced order.
    pub txt: Vec<TxtEntry>,
}

impl Service {
    /// The instance label: the fullname without the service type suffix.
    pub fn instance(&self) -> &str {
        let full = self.fullname.as_str();
        let ty = self.service_type.as_str();
        if full.len() > ty.len() + 1 {
            let split = full.len() - ty.len();
            if full.is_char_boundary(split)
                && full[split..].eq_ignore_ascii_case(ty)
                && full[..split].ends_with('.')
            {
                return &full[..split - 1];
            }
        }
        full
    }

    /// TXT entries with duplicate keys dropped: RFC 6763 §6.4 says keys compare
    /// case-insensitively and only the first occurrence counts.
    pub fn unique_txt(&self) -> Vec<&TxtEntry> {
        let mut seen = BTreeSet::new();
        self.txt
            .iter()
            .filter(|e| !e.key.is_empty() && seen.insert(e.key.to_ascii_lowercase()))
            .collect()
    }

    /// Addresses in property order: IPv4 ascending, IPv6 ascending with link-local last.
    pub fn sorted_addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.addresses.clone();
        v.sort_by_key(|a| match a {
            IpAddr::V4(x) => (0u8, u128::from(u32::from(*x))),
            IpAddr::V6(x) if x.is_unicast_link_local() => (2, u128::from(*x)),
            IpAddr::V6(x) => (1, u128::from(*x)),
        });
        v.dedup();
        v
    }

    /// The device: id `<instance>.<service type>` (the DNS-SD fullname, which
    /// the protocol keeps unique on the link and stable across address changes).
    pub fn to_device(&self) -> Device {
        let mut properties = BTreeMap::new();
        properties.insert(SERVICE_TYPE_PROPERTY.to_string(), self.service_type.clone());
        properties.insert(INSTANCE_PROPERTY.to_string(), env_value(self.instance()));
        properties.insert(HOSTNAME_PROPERTY.to_string(), env_value(&self.hostname));
        let addrs: Vec<String> = self
            .sorted_addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        properties.insert(ADDRESSES_PROPERTY.to_string(), addrs.join(","));
        properties.insert(PORT_PROPERTY.to_string(), self.port.to_string());
        for (name, value) in txt_properties(&self.unique_txt()) {
            properties.insert(name, value);
        }
        Device {
            id: self.fullname.clone(),
            properties: properties.into_iter().collect(),
            mounts: Vec::new(),
            device_specs: Vec::new(),
        }
    }
}

/// An env-var name for a TXT key: `MDNS_TXT_` + the key upper-cased, every
/// character outside `[A-Z0-9_]` replaced by `_`.
pub fn env_name(key: &str) -> String {
    let mut out = String::with_capacity(TXT_PREFIX.len() + key.len());
    out.push_str(TXT_PREFIX);
    out.extend(key.chars().map(|c| {
        let c = c.to_ascii_uppercase();
        if c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

/// A value usable as an env var: UTF-8 (invalid bytes replaced), no NUL
/// (the kernel cannot pass it), at most [`MAX_TXT_VALUE_LEN`] bytes.
pub fn env_value_bytes(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_TXT_VALUE_LEN)];
    env_value(&String::from_utf8_lossy(cut))
}

fn env_value(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| *c != '\0').collect();
    if out.len() > MAX_TXT_VALUE_LEN {
        let mut end = MAX_TXT_VALUE_LEN;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// `MDNS_TXT_*` properties for unique TXT entries. Keys that normalise to the
/// same name (`model-name`, `model_name`, `Model.Name`) are disambiguated
/// deterministically: entries are taken in byte order of their original key,
/// the first gets the plain name and each later one the first free
/// `<name>_2`, `<name>_3`, ... So the result depends only on the set of keys,
/// not on the order a responder sent them in.
pub fn txt_properties(entries: &[&TxtEntry]) -> Vec<(String, String)> {
    let mut sorted: Vec<&&TxtEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    if sorted.len() > MAX_TXT_PROPERTIES {
        tracing::debug!(
            keys = sorted.len(),
            kept = MAX_TXT_PROPERTIES,
            "too many TXT keys; the rest are skipped"
        );
        sorted.truncate(MAX_TXT_PROPERTIES);
    }
    // Plain names are reserved first, so a key that happens to be spelled like
    // another's suffixed name (`a_2` next to `a` and `A`) keeps its own name.
    let plain: BTreeSet<String> = sorted.iter().map(|e| env_name(&e.key)).collect();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(sorted.len());
    for e in sorted {
        let base = env_name(&e.key);
        let name = if used.insert(base.clone()) {
            base
        } else {
            let mut n = 2usize;
            loop {
                let candidate = format!("{base}_{n}");
                if !plain.contains(&candidate) && used.insert(candidate.clone()) {
                    break candidate;
                }
                n += 1;
            }
        };
        let value = e.value.as_deref().map(env_value_bytes).unwrap_or_default();
        out.push((name, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(k: &str, v: Option<&str>) -> TxtEntry {
        TxtEntry {
            key: k.to_string(),
            value: v.map(|s| s.as_bytes().to_vec()),
        }
    }

    fn service(txt: Vec<TxtEntry>) -> Service {
        Service {
            service_type: "_http._tcp.local.".into(),
            fullname: "Front.Door._http._tcp.local.".into(),
            hostname: "cam-1.local.".into(),
            port: 8080,
            addresses: vec![
                "fe80::1".parse().expect("ip"),
                "fd00::2".parse().expect("ip"),
                "10.0.0.9".parse().expect("ip"),
                "10.0.0.10".parse().expect("ip"),
            ],
            txt,
        }
    }

    #[test]
    fn properties_and_id() {
        let d = service(vec![entry("path", Some("/x")), entry("Path", Some("/dup"))]).to_device();
        assert_eq!(d.id, "Front.Door._http._tcp.local.");
        let p = |k: &str| d.properties.get(k).cloned();
        assert_eq!(p(INSTANCE_PROPERTY).as_deref(), Some("Front.Door"));
        assert_eq!(
            p(SERVICE_TYPE_PROPERTY).as_deref(),
            Some("_http._tcp.local.")
        );
        assert_eq!(
            p(ADDRESSES_PROPERTY).as_deref(),
            Some("10.0.0.9,10.0.0.10,fd00::2,fe80::1")
        );
        assert_eq!(p(PORT_PROPERTY).as_deref(), Some("8080"));
        assert_eq!(
            p("MDNS_TXT_PATH").as_deref(),
            Some("/x"),
            "first occurrence wins"
        );
        assert_eq!(d.properties.len(), 6);
    }

    #[test]
    fn collisions_are_deterministic() {
        let a = entry("model-name", Some("a"));
        let b = entry("model_name", Some("b"));
        let c = entry("Model.Name", Some("c"));
        let d = entry("model_name_2", Some("d"));
        let one = txt_properties(&[&a, &b, &c, &d]);
        let two = txt_properties(&[&d, &c, &b, &a]);
        assert_eq!(one, two);
        let names: BTreeSet<_> = one.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names.len(), 4, "{one:?}");
        assert!(
            one.contains(&("MDNS_TXT_MODEL_NAME_2".into(), "d".into())),
            "{one:?}"
        );
        assert!(
            one.contains(&("MDNS_TXT_MODEL_NAME".into(), "c".into())),
            "{one:?}"
        );
    }

    #[test]
    fn hostile_values() {
        let bool_key = entry("flag", None);
        let nul = TxtEntry {
            key: "ключ\u{0}".into(),
            value: Some(vec![0, 0xff, b'a']),
        };
        let big = TxtEntry {
            key: "big".into(),
            value: Some(vec![b'x'; 70_000]),
        };
        let out = txt_properties(&[&bool_key, &nul, &big]);
        assert!(out.contains(&("MDNS_TXT_FLAG".into(), String::new())));
        assert!(out.contains(&("MDNS_TXT_BIG".into(), "x".repeat(MAX_TXT_VALUE_LEN))));
        let (n, v) = out
            .iter()
            .find(|(n, _)| n.starts_with("MDNS_TXT__"))
            .expect("key");
        assert!(n.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{n}");
        assert_eq!(v, "\u{fffd}a");
        let many: Vec<TxtEntry> = (0..500)
            .map(|i| entry(&format!("k{i}"), Some("v")))
            .collect();
        let refs: Vec<&TxtEntry> = many.iter().collect();
        assert_eq!(txt_properties(&refs).len(), MAX_TXT_PROPERTIES);
    }

    #[test]
    fn instance_without_matching_suffix_is_the_fullname() {
        let mut s = service(vec![]);
        s.fullname = "weird".into();
        assert_eq!(s.instance(), "weird");
        s.fullname = "ü._http._tcp.local.".into();
        assert_eq!(s.instance(), "ü");
    }
}
