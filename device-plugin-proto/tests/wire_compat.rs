//! Pins wire compatibility with Akri's `v0` protocol. The golden bytes are
//! derived by hand from the contract's field numbers and wire types
//! (compatibility.md §3), not from our .proto: a renumbered field or a changed
//! type makes these tests fail.
//!
//! Protobuf key = (field_number << 3) | wire_type; wire type 0 = varint,
//! 2 = length-delimited.

use std::collections::BTreeMap;

use prost::Message;
use verge_device_plugin_proto::v0::{
    ByteData, Device, DeviceSpec, Diagnostic, DiscoverRequest, DiscoverResponse, Mount,
    RegisterDiscoveryHandlerRequest, register_discovery_handler_request::EndpointType,
};

/// A length-delimited field: key byte(s), length, payload.
fn ld(key: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(
        payload.len() < 128,
        "single-byte lengths only in these vectors"
    );
    let mut out = key.to_vec();
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn register_request_matches_hand_encoding() {
    let msg = RegisterDiscoveryHandlerRequest {
        name: "onvif".into(),
        endpoint: "/var/lib/akri/onvif.sock".into(),
        endpoint_type: EndpointType::Network as i32,
        shared: true,
    };
    let golden = cat(&[
        ld(&[0x0a], b"onvif"),                    // 1: name, LEN
        ld(&[0x12], b"/var/lib/akri/onvif.sock"), // 2: endpoint, LEN
        vec![0x18, 0x01],                         // 3: endpoint_type, VARINT, NETWORK = 1
        vec![0x20, 0x01],                         // 4: shared, VARINT, true
    ]);
    assert_eq!(hex::encode(msg.encode_to_vec()), hex::encode(&golden));
    assert_eq!(
        RegisterDiscoveryHandlerRequest::decode(golden.as_slice()).expect("decode"),
        msg
    );
    // UDS = 0 is the proto3 default and is not written at all.
    let uds = RegisterDiscoveryHandlerRequest {
        endpoint_type: EndpointType::Uds as i32,
        ..msg
    };
    assert!(!uds.encode_to_vec().windows(2).any(|w| w == [0x18, 0x00]));
}

fn sample_device() -> Device {
    Device {
        id: "d1".into(),
        properties: BTreeMap::from([("K".to_string(), "V".to_string())]),
        mounts: vec![Mount {
            container_path: "/c".into(),
            host_path: "/h".into(),
            read_only: true,
        }],
        device_specs: vec![DeviceSpec {
            container_path: "/dev/x".into(),
            host_path: "/dev/y".into(),
            permissions: "rw".into(),
        }],
    }
}

fn golden_device() -> Vec<u8> {
    cat(&[
        ld(&[0x0a], b"d1"), // Device.id = 1
        // Device.properties = 2: a map entry is a message {key = 1, value = 2}.
        ld(&[0x12], &cat(&[ld(&[0x0a], b"K"), ld(&[0x12], b"V")])),
        // Device.mounts = 3: Mount {container_path = 1, host_path = 2, read_only = 3}.
        ld(
            &[0x1a],
            &cat(&[ld(&[0x0a], b"/c"), ld(&[0x12], b"/h"), vec![0x18, 0x01]]),
        ),
        // Device.device_specs = 4: DeviceSpec {container_path = 1, host_path = 2, permissions = 3}.
        ld(
            &[0x22],
            &cat(&[
                ld(&[0x0a], b"/dev/x"),
                ld(&[0x12], b"/dev/y"),
                ld(&[0x1a], b"rw"),
            ]),
        ),
    ])
}

#[test]
fn discover_response_matches_hand_encoding() {
    let msg = DiscoverResponse {
        devices: vec![sample_device()],
        diagnostics: vec![],
    };
    let golden = ld(&[0x0a], &golden_device()); // DiscoverResponse.devices = 1
    assert_eq!(hex::encode(msg.encode_to_vec()), hex::encode(&golden));
    assert_eq!(
        DiscoverResponse::decode(golden.as_slice()).expect("decode"),
        msg
    );
}

#[test]
fn diagnostics_extension_is_field_100() {
    let msg = DiscoverResponse {
        devices: vec![],
        diagnostics: vec![Diagnostic {
            subject: "d1".into(),
            severity: "Error".into(),
            message: "bad".into(),
        }],
    };
    // Key of field 100, LEN: (100 << 3) | 2 = 802 = varint [0xa2, 0x06].
    let golden = ld(
        &[0xa2, 0x06],
        &cat(&[
            ld(&[0x0a], b"d1"),
            ld(&[0x12], b"Error"),
            ld(&[0x1a], b"bad"),
        ]),
    );
    assert_eq!(hex::encode(msg.encode_to_vec()), hex::encode(&golden));
}

/// An Akri agent knows only `devices`; proto3 skips field 100 for it.
#[test]
fn akri_agents_skip_the_extension() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct AkriDiscoverResponse {
        #[prost(message, repeated, tag = "1")]
        devices: Vec<Device>,
    }
    let ours = DiscoverResponse {
        devices: vec![sample_device()],
        diagnostics: vec![Diagnostic {
            subject: String::new(),
            severity: "Warning".into(),
            message: "no adapter".into(),
        }],
    };
    let akri = AkriDiscoverResponse::decode(ours.encode_to_vec().as_slice()).expect("decode");
    assert_eq!(akri.devices, ours.devices);
}

#[test]
fn discover_request_matches_hand_encoding() {
    let msg = DiscoverRequest {
        discovery_details: "a: 1".into(),
        discovery_properties: BTreeMap::from([
            (
                "p".to_string(),
                ByteData {
                    vec: Some(b"s".to_vec()),
                },
            ),
            ("q".to_string(), ByteData { vec: None }),
        ]),
    };
    let golden = cat(&[
        ld(&[0x0a], b"a: 1"), // discovery_details = 1
        // discovery_properties = 2: entries {key = 1, value = 2: ByteData {vec = 1}}, sorted by key.
        ld(
            &[0x12],
            &cat(&[ld(&[0x0a], b"p"), ld(&[0x12], &ld(&[0x0a], b"s"))]),
        ),
        // An empty ByteData is the entry's default value, so prost leaves it out.
        ld(&[0x12], &ld(&[0x0a], b"q")),
    ]);
    assert_eq!(hex::encode(msg.encode_to_vec()), hex::encode(&golden));
    assert_eq!(
        DiscoverRequest::decode(golden.as_slice()).expect("decode"),
        msg
    );

    // Go's protobuf (Akri's Go handlers) writes the empty value explicitly; it decodes the same.
    let go_form = cat(&[
        ld(&[0x0a], b"a: 1"),
        ld(
            &[0x12],
            &cat(&[ld(&[0x0a], b"p"), ld(&[0x12], &ld(&[0x0a], b"s"))]),
        ),
        ld(&[0x12], &cat(&[ld(&[0x0a], b"q"), ld(&[0x12], b"")])),
    ]);
    assert_eq!(
        DiscoverRequest::decode(go_form.as_slice()).expect("decode"),
        msg
    );
}

/// Maps encode in key order, so one device list always gives the same bytes.
#[test]
fn map_encoding_is_deterministic() {
    let mut a = sample_device();
    a.properties = (0..50)
        .map(|i| (format!("K{i}"), format!("V{i}")))
        .collect();
    let mut b = sample_device();
    b.properties = (0..50)
        .rev()
        .map(|i| (format!("K{i}"), format!("V{i}")))
        .collect();
    assert_eq!(a.encode_to_vec(), b.encode_to_vec());
}
