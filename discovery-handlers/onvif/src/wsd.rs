//! WS-Discovery messages: the Probe we send and a tolerant parser for what cameras send back.
//!
//! XML is read with oxvif's namespace-stripping DOM (`oxvif::soap::XmlNode`, quick-xml, no
//! recursion). oxvif's own ProbeMatch/Hello extraction is private and tied to its IPv4-only
//! sockets, so the message layer is here; it accepts what cameras in the field send (a
//! ProbeMatch without its ProbeMatches wrapper, as ipycam does; any namespace prefix; a
//! missing or wrong Action header) and bounds everything it keeps.

use std::net::{Ipv4Addr, Ipv6Addr};

use oxvif::soap::XmlNode;

/// WS-Discovery's UDP port.
pub const WSD_PORT: u16 = 3702;
/// IPv4 multicast group.
pub const WSD_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// IPv6 link-local multicast group.
pub const WSD_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xc);
/// Largest datagram we read (the UDP maximum).
pub const MAX_DATAGRAM: usize = 65_535;
/// Targets kept from one message; a flood of matches in one datagram is cut here.
pub const MAX_TARGETS_PER_MESSAGE: usize = 64;
/// Entries kept per list (XAddrs, Scopes, Types) and the longest entry kept.
pub const MAX_LIST_ENTRIES: usize = 32;
pub const MAX_ENTRY_LEN: usize = 512;

/// What a Probe asks for. WS-Discovery matches all listed types, so each is probed separately
/// (devices that advertise only `tds:Device` are still found).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeType {
    NetworkVideoTransmitter,
    Device,
}

/// A SOAP 1.2 WS-Discovery (2005/04, the version ONVIF uses) Probe.
pub fn probe_message(message_id: &str, probe: ProbeType) -> String {
    let types = match probe {
        ProbeType::NetworkVideoTransmitter => {
            r#"<d:Types xmlns:dn="http://www.onvif.org/ver10/network/wsdl">dn:NetworkVideoTransmitter</d:Types>"#
        }
        ProbeType::Device => {
            r#"<d:Types xmlns:tds="http://www.onvif.org/ver10/device/wsdl">tds:Device</d:Types>"#
        }
    };
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" "#,
            r#"xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" "#,
            r#"xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery">"#,
            "<s:Header>",
            "<a:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/Probe</a:Action>",
            "<a:MessageID>urn:uuid:{id}</a:MessageID>",
            "<a:To>urn:schemas-xmlsoap-org:ws:2005:04:discovery</a:To>",
            "</s:Header>",
            "<s:Body><d:Probe>{types}</d:Probe></s:Body>",
            "</s:Envelope>"
        ),
        id = message_id,
        types = types
    )
}

/// A discovered WS-Discovery target (one camera).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// EndpointReference/Address, e.g. `urn:uuid:…`.
    pub endpoint: String,
    pub types: Vec<String>,
    pub scopes: Vec<String>,
    /// Device-service URLs.
    pub xaddrs: Vec<String>,
}

/// A parsed WS-Discovery message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// ProbeMatch(es) or ResolveMatch(es).
    Matches(Vec<Target>),
    Hello(Target),
    Bye {
        endpoint: String,
    },
    /// A Probe, Resolve or anything else we do not act on.
    Other,
}

/// Why a datagram was not a WS-Discovery message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsdError {
    #[error("datagram of {0} bytes is larger than {MAX_DATAGRAM}")]
    TooLarge(usize),
    #[error("datagram is not UTF-8")]
    NotUtf8,
    #[error("datagram is not XML: {0}")]
    NotXml(String),
}

fn list(node: &XmlNode, name: &str) -> Vec<String> {
    node.child(name)
        .map(|n| {
            n.text()
                .split_whitespace()
                .filter(|s| s.len() <= MAX_ENTRY_LEN)
                .take(MAX_LIST_ENTRIES)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint(node: &XmlNode) -> Option<String> {
    let e = node.path(&["EndpointReference", "Address"])?.text().trim();
    (!e.is_empty() && e.len() <= MAX_ENTRY_LEN).then(|| e.to_string())
}

fn target(node: &XmlNode) -> Option<Target> {
    Some(Target {
        endpoint: endpoint(node)?,
        types: list(node, "Types"),
        scopes: list(node, "Scopes"),
        xaddrs: list(node, "XAddrs"),
    })
}

/// Parses one datagram. Never panics; anything unexpected is an error or `Other`.
pub fn parse(datagram: &[u8]) -> Result<Message, WsdError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(WsdError::TooLarge(datagram.len()));
    }
    let text = std::str::from_utf8(datagram).map_err(|_| WsdError::NotUtf8)?;
    // Some stacks put a BOM or NULs around the XML.
    let text = text.trim_matches(|c: char| c == '\u{feff}' || c == '\0' || c.is_whitespace());
    let root = XmlNode::parse(text).map_err(|e| WsdError::NotXml(e.to_string()))?;
    let body = root.child("Body").unwrap_or(&root);
    let mut matches = Vec::new();
    for wrapper in ["ProbeMatches", "ResolveMatches"] {
        if let Some(w) = body.child(wrapper) {
            for name in ["ProbeMatch", "ResolveMatch"] {
                matches.extend(w.children_named(name).filter_map(target));
            }
        }
    }
    // Cameras that leave out the wrapper (ipycam) put the match straight into the Body.
    for name in ["ProbeMatch", "ResolveMatch"] {
        matches.extend(body.children_named(name).filter_map(target));
    }
    if !matches.is_empty() {
        matches.truncate(MAX_TARGETS_PER_MESSAGE);
        return Ok(Message::Matches(matches));
    }
    if let Some(hello) = body.child("Hello") {
        return Ok(target(hello).map_or(Message::Other, Message::Hello));
    }
    if let Some(bye) = body.child("Bye") {
        return Ok(endpoint(bye).map_or(Message::Other, |endpoint| Message::Bye { endpoint }));
    }
    Ok(Message::Other)
}

/// The device id for an endpoint address: the UUID without `urn:uuid:`, lower case. Endpoints
/// that are not UUID URNs are used as they are, lower case, with anything unprintable dropped.
pub fn device_id(endpoint: &str) -> String {
    let e = endpoint.trim();
    let lower = e.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("urn:uuid:")
        .or_else(|| lower.strip_prefix("uuid:"))
        .unwrap_or(&lower);
    rest.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_ENTRY_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPYCAM: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope" xmlns:wsa="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery">
<soap:Header><wsa:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/ProbeMatch</wsa:Action></soap:Header>
<soap:Body><d:ProbeMatch>
<d:EndpointReference><wsa:Address>urn:uuid:AAAA-bbbb</wsa:Address></d:EndpointReference>
<d:Types>dn:NetworkVideoTransmitter tds:Device</d:Types>
<d:Scopes>onvif://www.onvif.org/name/Cam onvif://www.onvif.org/Profile/Streaming</d:Scopes>
<d:XAddrs>http://10.0.0.2:8080/onvif/device_service</d:XAddrs>
</d:ProbeMatch></soap:Body></soap:Envelope>"#;

    #[test]
    fn probe_match_without_wrapper() {
        let Ok(Message::Matches(m)) = parse(IPYCAM.as_bytes()) else {
            panic!("not matches")
        };
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].endpoint, "urn:uuid:AAAA-bbbb");
        assert_eq!(m[0].xaddrs, ["http://10.0.0.2:8080/onvif/device_service"]);
        assert_eq!(m[0].scopes.len(), 2);
        assert_eq!(device_id(&m[0].endpoint), "aaaa-bbbb");
    }

    #[test]
    fn wrapped_matches_hello_bye_and_probe() {
        let wrapped = IPYCAM
            .replace("<d:ProbeMatch>", "<d:ProbeMatches><d:ProbeMatch>")
            .replace("</d:ProbeMatch>", "</d:ProbeMatch></d:ProbeMatches>");
        assert!(matches!(parse(wrapped.as_bytes()), Ok(Message::Matches(m)) if m.len() == 1));
        let hello = IPYCAM.replace("ProbeMatch", "Hello");
        assert!(matches!(parse(hello.as_bytes()), Ok(Message::Hello(t)) if t.xaddrs.len() == 1));
        let bye = IPYCAM.replace("ProbeMatch", "Bye");
        assert!(
            matches!(parse(bye.as_bytes()), Ok(Message::Bye { endpoint }) if endpoint == "urn:uuid:AAAA-bbbb")
        );
        let probe = probe_message("x", ProbeType::Device);
        assert_eq!(parse(probe.as_bytes()), Ok(Message::Other));
    }

    #[test]
    fn garbage_is_an_error_or_other() {
        for g in [
            &b""[..],
            b"\xff\xfe",
            b"<a>",
            b"<a></b>",
            b"not xml at all",
            b"<Envelope><Body><ProbeMatch/></Body></Envelope>",
            b"<Envelope><Body><ProbeMatch><EndpointReference><Address></Address></EndpointReference></ProbeMatch></Body></Envelope>",
        ] {
            assert!(!matches!(parse(g), Ok(Message::Matches(_))), "{g:?}");
        }
        let huge = vec![b'a'; MAX_DATAGRAM + 1];
        assert_eq!(parse(&huge), Err(WsdError::TooLarge(MAX_DATAGRAM + 1)));
        // oxvif's parser is lenient about unclosed elements; what matters is no panic, no match.
        let deep = "<a>".repeat(20_000);
        assert!(!matches!(parse(deep.as_bytes()), Ok(Message::Matches(_))));
    }

    #[test]
    fn many_matches_are_bounded() {
        let one = "<ProbeMatch><EndpointReference><Address>urn:uuid:1</Address></EndpointReference></ProbeMatch>";
        let msg = format!(
            "<Envelope><Body><ProbeMatches>{}</ProbeMatches></Body></Envelope>",
            one.repeat(500)
        );
        assert!(
            matches!(parse(msg.as_bytes()), Ok(Message::Matches(m)) if m.len() == MAX_TARGETS_PER_MESSAGE)
        );
    }
}
