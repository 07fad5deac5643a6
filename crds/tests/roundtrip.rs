//! Every Akri Configuration and Instance shape from the contract deserialises
//! into our types and serialises back to the same JSON.

use serde_json::Value;
use verge_crds::{Configuration, Instance};

fn sample(name: &str) -> Value {
    let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str) -> T {
    let original = sample(name);
    let typed: T = serde_json::from_value(original.clone())
        .unwrap_or_else(|e| panic!("{name} does not deserialise: {e}"));
    let back = serde_json::to_value(&typed).expect("serialise");
    assert_eq!(
        back,
        original,
        "{name} changed in a round trip:\n{}",
        serde_json::to_string_pretty(&back).unwrap_or_default()
    );
    typed
}

#[test]
fn debug_echo_with_pod_broker_and_both_services() {
    let c: Configuration = assert_round_trip("debug-echo.yaml");
    assert_eq!(c.spec.discovery_handler.name, "debugEcho");
    assert_eq!(c.spec.capacity, 2);
    let pod = c.spec.broker_pod_spec().expect("brokerPodSpec");
    let limits = pod.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert!(limits.contains_key("{{PLACEHOLDER}}"));
    assert!(c.spec.instance_service_spec.is_some());
    assert!(c.spec.configuration_service_spec.is_some());
    assert_eq!(c.spec.broker_properties, Some(Default::default()));
}

#[test]
fn onvif_with_filters_and_credentials_from_secrets() {
    let c: Configuration = assert_round_trip("onvif-secret.yaml");
    let props = c
        .spec
        .discovery_handler
        .discovery_properties
        .as_ref()
        .expect("discoveryProperties");
    assert_eq!(props.len(), 4);
    let secret = props[0]
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secretKeyRef");
    assert_eq!(secret.name, "onvif-auth-secret");
    assert_eq!(secret.namespace.as_deref(), Some("default"));
    assert_eq!(secret.optional, Some(false));
    assert_eq!(props[2].value.as_deref(), Some("camera-admin"));
    let cm = props[3]
        .value_from
        .as_ref()
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("configMapKeyRef");
    assert_eq!(cm.namespace, None);
    assert!(
        c.spec
            .discovery_handler
            .discovery_details
            .contains("discoveryTimeoutSeconds: 2")
    );
    assert_eq!(c.spec.broker_properties().len(), 2);
}

#[test]
fn debug_echo_with_job_broker() {
    let c: Configuration = assert_round_trip("debug-echo-job.yaml");
    assert!(c.spec.broker_pod_spec().is_none());
    let job = c.spec.broker_job_spec().expect("brokerJobSpec");
    assert_eq!(job.backoff_limit, Some(2));
    assert_eq!(c.spec.broker_properties, None);
}

#[test]
fn instance_with_both_usage_encodings() {
    let i: Instance = assert_round_trip("instance.yaml");
    assert_eq!(i.spec.nodes, ["node-a", "node-b"]);
    assert_eq!(i.spec.used_slots(), 2);
}

#[test]
fn defaults_match_akri() {
    let c: Configuration = serde_json::from_value(serde_json::json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {"name": "minimal"},
        "spec": {"discoveryHandler": {"name": "debugEcho"}}
    }))
    .expect("minimal Configuration");
    assert_eq!(c.spec.capacity, 1);
    assert_eq!(c.spec.discovery_handler.discovery_details, "");
    assert!(c.spec.broker_spec.is_none());
}
