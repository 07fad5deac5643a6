//! TXT record bytes (length-prefixed strings, as on the wire) → device
//! properties: never a panic, every name a valid env-var name, every value
//! without NUL and within the length cap, and the same result for any order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_mdns::properties::{MAX_TXT_PROPERTIES, MAX_TXT_VALUE_LEN, Service, TxtEntry};

fn entries(data: &[u8]) -> Vec<TxtEntry> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let (s, tail) = tail.split_at(n);
        rest = tail;
        let (key, value) = match s.iter().position(|b| *b == b'=') {
            Some(i) => (&s[..i], Some(s[i + 1..].to_vec())),
            None => (s, None),
        };
        out.push(TxtEntry {
            key: String::from_utf8_lossy(key).into_owned(),
            value,
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let txt = entries(data);
    let mut reversed = txt.clone();
    reversed.reverse();
    let service = |txt| Service {
        service_type: "_http._tcp.local.".into(),
        fullname: "x._http._tcp.local.".into(),
        hostname: "h.local.".into(),
        port: 1,
        addresses: vec!["10.0.0.1".parse().unwrap()],
        txt,
    };
    let a = service(txt).to_device();
    let b = service(reversed).to_device();
    assert!(a.properties.len() <= 5 + MAX_TXT_PROPERTIES);
    for (k, v) in &a.properties {
        assert!(k.bytes().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'), "{k}");
        assert!(!v.contains('\0') && v.len() <= MAX_TXT_VALUE_LEN.max(64));
    }
    // Order matters only through "first occurrence wins" for duplicate keys;
    // without duplicates the result must not depend on the order.
    let unique = {
        let s = service(entries(data));
        s.unique_txt().len() == s.txt.iter().filter(|e| !e.key.is_empty()).count()
    };
    if unique {
        assert_eq!(a.properties, b.properties);
    }
});
