//! discoveryDetails of the mdns handler, validated into a [`Plan`].

use std::net::IpAddr;

use serde::Deserialize;
use verge_discovery_sdk::{DiscoveryError, FilterList, parse_details};

use crate::filter::{Matcher, NameFilter, passes};
use crate::properties::Service;

/// Service types per Configuration: each one is a browse with its own queries.
pub const MAX_SERVICE_TYPES: usize = 32;
/// Subtypes per Configuration (each multiplies the browses by the service types).
pub const MAX_SUBTYPES: usize = 16;
/// Longest service name label (`_name`): RFC 6335 says 15, real devices use more.
pub const MAX_SERVICE_LABEL: usize = 63;

/// discoveryDetails.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MdnsSettings {
    /// Service types to browse: `_http._tcp`, `_http._tcp.local` or `_http._tcp.local.`.
    #[serde(default)]
    pub service_types: Vec<String>,
    /// Browse only these subtypes (`_printer` → `_printer._sub._http._tcp.local.`).
    #[serde(default)]
    pub subtypes: Vec<String>,
    /// Interface names to use. Absent: every interface except the one(s)
    /// holding a default route. The default-route interface is used only if an
    /// Include list names it.
    #[serde(default)]
    pub interfaces: Option<FilterList>,
    /// Instance names: exact (case-insensitive), `glob:...` or `regex:...`.
    #[serde(default)]
    pub instance_names: Option<FilterList>,
    /// Host names (SRV targets), matched with and without the trailing dot.
    #[serde(default)]
    pub host_names: Option<FilterList>,
    /// TXT keys that must (Include: one of them) or must not (Exclude: any) be present.
    #[serde(default)]
    pub txt_keys: Option<FilterList>,
    /// `key=value` TXT pairs; the value part may be `glob:...` or `regex:...`.
    #[serde(default)]
    pub txt_values: Option<FilterList>,
    /// `IPv4` and/or `IPv6`: addresses of other families are left out, and a
    /// service with no address left is dropped.
    #[serde(default)]
    pub address_families: Option<FilterList>,
    /// Ports (`80`) or inclusive ranges (`8000-8099`).
    #[serde(default)]
    pub ports: Option<FilterList>,
}

/// Which interfaces to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceChoice {
    /// Every interface except the default-route one(s) and the listed ones.
    AllExcept(Vec<String>),
    /// Only these.
    Only(Vec<String>),
}

/// One browse: the query domain and the service type its results belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Browse {
    /// What mdns-sd browses (a type or a subtype domain).
    pub domain: String,
    /// The service type reported in `MDNS_SERVICE_TYPE`.
    pub service_type: String,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Browses to run.
    pub browses: Vec<Browse>,
    /// Interfaces.
    pub interfaces: InterfaceChoice,
    instance_names: Option<NameFilter>,
    host_names: Option<NameFilter>,
    txt_keys: Option<NameFilter>,
    txt_values: Option<TxtValueFilter>,
    families: Option<(bool, bool)>,
    ports: Option<PortFilter>,
}

fn invalid(msg: impl Into<String>) -> DiscoveryError {
    DiscoveryError::InvalidSettings(msg.into())
}

/// `_http._tcp[.local[.]]` → `_http._tcp.local.`.
pub fn normalize_service_type(t: &str) -> Result<String, String> {
    let t = t.trim();
    let base = t
        .strip_suffix(".local.")
        .or_else(|| t.strip_suffix(".local"))
        .unwrap_or(t);
    let mut labels = base.split('.');
    let (Some(name), Some(proto), None) = (labels.next(), labels.next(), labels.next()) else {
        return Err(format!(
            "service type {t:?} must look like _name._tcp or _name._udp (optionally ending in .local.)"
        ));
    };
    let name_ok = name.len() >= 2
        && name.len() <= MAX_SERVICE_LABEL + 1
        && name.starts_with('_')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !name_ok {
        return Err(format!(
            "service type {t:?}: {name:?} must be '_' and 1 to {MAX_SERVICE_LABEL} letters, digits or '-'"
        ));
    }
    if proto != "_tcp" && proto != "_udp" {
        return Err(format!(
            "service type {t:?}: the protocol must be _tcp or _udp, not {proto:?}"
        ));
    }
    Ok(format!("{name}.{proto}.local."))
}

fn normalize_subtype(s: &str) -> Result<String, String> {
    let s = s.trim();
    let s = s.strip_suffix("._sub").unwrap_or(s);
    let ok = !s.is_empty()
        && s.len() <= MAX_SERVICE_LABEL + 1
        && !s.contains('.')
        && s.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(format!(
            "subtype {s:?} must be one printable label without dots, e.g. _printer"
        ));
    }
    Ok(s.to_string())
}

/// Filter on `key=value` TXT pairs.
#[derive(Clone, Debug)]
struct TxtValueFilter {
    include: bool,
    pairs: Vec<(String, Matcher)>,
}

impl TxtValueFilter {
    fn accepts(&self, service: &Service) -> bool {
        let txt = service.unique_txt();
        let listed = self.pairs.iter().any(|(k, m)| {
            txt.iter().any(|e| {
                e.key.eq_ignore_ascii_case(k)
                    && m.matches(&String::from_utf8_lossy(e.value.as_deref().unwrap_or(&[])))
            })
        });
        listed == self.include
    }
}

#[derive(Clone, Debug)]
struct PortFilter {
    include: bool,
    ranges: Vec<(u16, u16)>,
}

fn parse_port_range(item: &str) -> Result<(u16, u16), String> {
    let item = item.trim();
    let (lo, hi) = item.split_once('-').unwrap_or((item, item));
    let parse = |s: &str| {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("ports: {item:?} is not a port or a range like 8000-8099"))
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        return Err(format!("ports: range {item:?} is empty"));
    }
    Ok((lo, hi))
}

impl MdnsSettings {
    /// Parses discoveryDetails text.
    pub fn parse(details: &str) -> Result<Self, DiscoveryError> {
        parse_details(details)
    }

    /// Validates and compiles.
    pub fn plan(&self) -> Result<Plan, DiscoveryError> {
        if self.service_types.is_empty() {
            return Err(invalid(
                "serviceTypes must list at least one service type, e.g. [_http._tcp.local.]",
            ));
        }
        if self.service_types.len() > MAX_SERVICE_TYPES {
            return Err(invalid(format!(
                "serviceTypes: at most {MAX_SERVICE_TYPES} service types"
            )));
        }
        if self.subtypes.len() > MAX_SUBTYPES {
            return Err(invalid(format!("subtypes: at most {MAX_SUBTYPES}")));
        }
        let mut types = Vec::new();
        for t in &self.service_types {
            let n = normalize_service_type(t).map_err(invalid)?;
            if !types.contains(&n) {
                types.push(n);
            }
        }
        let subtypes = self
            .subtypes
            .iter()
            .map(|s| normalize_subtype(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut browses = Vec::new();
        for t in &types {
            if subtypes.is_empty() {
                browses.push(Browse {
                    domain: t.clone(),
                    service_type: t.clone(),
                });
            }
            for s in &subtypes {
                let domain = format!("{s}._sub.{t}");
                if !browses.iter().any(|b: &Browse| b.domain == domain) {
                    browses.push(Browse {
                        domain,
                        service_type: t.clone(),
                    });
                }
            }
        }

        let interfaces = match &self.interfaces {
            None => InterfaceChoice::AllExcept(Vec::new()),
            Some(list) => {
                if list.items.iter().any(|i| i.trim().is_empty()) {
                    return Err(invalid("interfaces: an item is empty"));
                }
                match list.action {
                    verge_discovery_sdk::FilterAction::Include if list.items.is_empty() => {
                        return Err(invalid(
                            "interfaces: an Include list needs at least one interface name",
                        ));
                    }
                    verge_discovery_sdk::FilterAction::Include => {
                        InterfaceChoice::Only(list.items.clone())
                    }
                    verge_discovery_sdk::FilterAction::Exclude => {
                        InterfaceChoice::AllExcept(list.items.clone())
                    }
                }
            }
        };

        let compile = |field: &str, l: &Option<FilterList>| {
            l.as_ref()
                .map(|l| NameFilter::compile(field, l))
                .transpose()
                .map_err(invalid)
        };
        let instance_names = compile("instanceNames", &self.instance_names)?;
        let host_names = compile("hostNames", &self.host_names)?;
        let txt_keys = self
            .txt_keys
            .as_ref()
            .map(|l| NameFilter::compile_with("txtKeys", l, |k| Ok(Matcher::Exact(k.to_string()))))
            .transpose()
            .map_err(invalid)?;
        let txt_values = match &self.txt_values {
            None => None,
            Some(l) => {
                let mut pairs = Vec::new();
                for item in &l.items {
                    let Some((k, v)) = item.split_once('=') else {
                        return Err(invalid(format!("txtValues: {item:?} must be key=value")));
                    };
                    if k.is_empty() {
                        return Err(invalid(format!("txtValues: {item:?} has an empty key")));
                    }
                    let m = match v.strip_prefix("glob:").or(v.strip_prefix("regex:")) {
                        Some(_) => Matcher::parse(v),
                        None => Ok(Matcher::Exact(v.to_string())),
                    }
                    .map_err(|e| invalid(format!("txtValues: {e}")))?;
                    pairs.push((k.to_string(), m));
                }
                Some(TxtValueFilter {
                    include: l.action == verge_discovery_sdk::FilterAction::Include,
                    pairs,
                })
            }
        };
        let families = match &self.address_families {
            None => None,
            Some(l) => {
                let mut v4 = false;
                let mut v6 = false;
                for item in &l.items {
                    match item.to_ascii_lowercase().as_str() {
                        "ipv4" => v4 = true,
                        "ipv6" => v6 = true,
                        _ => {
                            return Err(invalid(format!(
                                "addressFamilies: {item:?} is not IPv4 or IPv6"
                            )));
                        }
                    }
                }
                if l.action == verge_discovery_sdk::FilterAction::Exclude {
                    (v4, v6) = (!v4, !v6);
                }
                Some((v4, v6))
            }
        };
        let ports = match &self.ports {
            None => None,
            Some(l) => Some(PortFilter {
                include: l.action == verge_discovery_sdk::FilterAction::Include,
                ranges: l
                    .items
                    .iter()
                    .map(|i| parse_port_range(i))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?,
            }),
        };
        Ok(Plan {
            browses,
            interfaces,
            instance_names,
            host_names,
            txt_keys,
            txt_values,
            families,
            ports,
        })
    }
}

impl Plan {
    /// The service as it should be reported (addresses of unwanted families
    /// removed), or `None` when a filter drops it.
    pub fn select(&self, mut service: Service) -> Option<Service> {
        if let Some((v4, v6)) = self.families {
            service.addresses.retain(|a| match a {
                IpAddr::V4(_) => v4,
                IpAddr::V6(_) => v6,
            });
        }
        if service.addresses.is_empty() {
            return None;
        }
        if !passes(self.instance_names.as_ref(), service.instance()) {
            return None;
        }
        if let Some(f) = &self.host_names {
            let h = service.hostname.as_str();
            let bare = h.strip_suffix('.').unwrap_or(h);
            let with_dot = format!("{bare}.");
            if !f.accepts_any([bare, with_dot.as_str()]) {
                return None;
            }
        }
        if let Some(f) = &self.txt_keys {
            let keys: Vec<&str> = service
                .unique_txt()
                .iter()
                .map(|e| e.key.as_str())
                .collect();
            if !f.accepts_any(keys) {
                return None;
            }
        }
        if let Some(f) = &self.txt_values
            && !f.accepts(&service)
        {
            return None;
        }
        if let Some(f) = &self.ports {
            let listed = f
                .ranges
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&service.port));
            if listed != f.include {
                return None;
            }
        }
        Some(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::TxtEntry;

    fn plan(yaml: &str) -> Result<Plan, DiscoveryError> {
        MdnsSettings::parse(yaml)?.plan()
    }

    fn svc(name: &str, host: &str, port: u16, addrs: &[&str], txt: &[(&str, &str)]) -> Service {
        Service {
            service_type: "_http._tcp.local.".into(),
            fullname: format!("{name}._http._tcp.local."),
            hostname: host.into(),
            port,
            addresses: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
            txt: txt
                .iter()
                .map(|(k, v)| TxtEntry {
                    key: k.to_string(),
                    value: Some(v.as_bytes().to_vec()),
                })
                .collect(),
        }
    }

    #[test]
    fn types_and_subtypes() {
        let p = plan("serviceTypes: [_http._tcp, _ipp._tcp.local, _coap._udp.local.]").expect("ok");
        let d: Vec<_> = p.browses.iter().map(|b| b.domain.as_str()).collect();
        assert_eq!(
            d,
            ["_http._tcp.local.", "_ipp._tcp.local.", "_coap._udp.local."]
        );
        let p =
            plan("serviceTypes: [_http._tcp]\nsubtypes: [_printer._sub, _scanner]").expect("ok");
        assert_eq!(p.browses[0].domain, "_printer._sub._http._tcp.local.");
        assert_eq!(p.browses[1].service_type, "_http._tcp.local.");
        assert_eq!(p.interfaces, InterfaceChoice::AllExcept(vec![]));
    }

    #[test]
    fn bad_settings_are_named() {
        for (yaml, needle) in [
            ("", "serviceTypes"),
            ("serviceTypes: [http]", "http"),
            ("serviceTypes: [_http._sctp]", "_sctp"),
            ("serviceTypes: [_http._tcp]\nservicetype: x", "servicetype"),
            (
                "serviceTypes: [_a._tcp]\ninstanceNames: {action: Include, items: ['regex:(']}",
                "instanceNames",
            ),
            (
                "serviceTypes: [_a._tcp]\nports: {action: Include, items: ['99999']}",
                "ports",
            ),
            (
                "serviceTypes: [_a._tcp]\naddressFamilies: {action: Include, items: [ipx]}",
                "ipx",
            ),
            (
                "serviceTypes: [_a._tcp]\ntxtValues: {action: Include, items: [novalue]}",
                "key=value",
            ),
            (
                "serviceTypes: [_a._tcp]\ninterfaces: {action: Include, items: []}",
                "interfaces",
            ),
            ("serviceTypes: [_a._tcp]\nsubtypes: [a.b]", "subtype"),
        ] {
            match plan(yaml) {
                Err(DiscoveryError::InvalidSettings(m)) => {
                    assert!(m.contains(needle), "{yaml}: {m}")
                }
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }

    #[test]
    fn filters() {
        let p = plan(
            "serviceTypes: [_http._tcp]
instanceNames: {action: Include, items: ['glob:cam-*', 'Printer [1]']}
hostNames: {action: Exclude, items: [bad.local]}
txtKeys: {action: Include, items: [path]}
txtValues: {action: Exclude, items: ['model=glob:old*']}
addressFamilies: {action: Include, items: [IPv6]}
ports: {action: Include, items: ['80', '8000-8099']}",
        )
        .expect("ok");
        let ok = svc(
            "cam-1",
            "a.local.",
            8080,
            &["10.0.0.1", "fd00::1"],
            &[("PATH", "/"), ("model", "new")],
        );
        let selected = p.select(ok.clone()).expect("kept");
        assert_eq!(
            selected.addresses,
            vec!["fd00::1".parse::<IpAddr>().expect("ip")]
        );
        assert!(
            p.select(svc(
                "Printer [1]",
                "a.local.",
                80,
                &["fd00::1"],
                &[("path", "")]
            ))
            .is_some()
        );
        assert!(
            p.select(svc("door", "a.local.", 80, &["fd00::1"], &[("path", "")]))
                .is_none(),
            "name"
        );
        let mut bad = ok.clone();
        bad.hostname = "BAD.local.".into();
        assert!(p.select(bad).is_none(), "host");
        assert!(
            p.select(svc("cam-2", "a.local.", 80, &["fd00::1"], &[("other", "")]))
                .is_none(),
            "txt key"
        );
        assert!(
            p.select(svc(
                "cam-2",
                "a.local.",
                80,
                &["fd00::1"],
                &[("path", ""), ("model", "old-1")]
            ))
            .is_none(),
            "txt value"
        );
        assert!(
            p.select(svc("cam-2", "a.local.", 81, &["fd00::1"], &[("path", "")]))
                .is_none(),
            "port"
        );
        assert!(
            p.select(svc("cam-2", "a.local.", 80, &["10.0.0.1"], &[("path", "")]))
                .is_none(),
            "family"
        );
    }
}
