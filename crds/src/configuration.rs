//! The `Configuration` kind: which handler discovers which devices, and what
//! runs next to each device.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::JobSpec;
use k8s_openapi::api::core::v1::{PodSpec, ServiceSpec};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// Capacity when a Configuration does not set one (Akri's default).
pub const DEFAULT_CAPACITY: i32 = 1;

fn default_capacity() -> i32 {
    DEFAULT_CAPACITY
}

/// A Configuration names a discovery handler and its settings; every device
/// the handler finds becomes an Instance and a kubelet resource
/// `akri.sh/<instance>`, and all of them together the resource
/// `akri.sh/<configuration>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "akri.sh",
    version = "v0",
    kind = "Configuration",
    plural = "configurations",
    namespaced,
    shortname = "akric",
    category = "all",
    status = "ConfigurationStatus",
    derive = "PartialEq",
    doc = "Discovery of one kind of device: which handler, with which settings, how many consumers per device, and what runs next to each device.",
    printcolumn(name = "Handler", type_ = "string", json_path = ".spec.discoveryHandler.name", description = "Discovery handler"),
    printcolumn(name = "Capacity", type_ = "integer", json_path = ".spec.capacity", description = "Consumers allowed per device"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances", description = "Devices found (Instances)"),
    printcolumn(name = "Brokers", type_ = "integer", json_path = ".status.brokers", description = "Broker workloads running"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether discovery and brokers are healthy"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 52").message("Configuration names are at most 52 characters, so that akri.sh/<name>-<hash> and <name>-<hash>-svc fit in 63"),
    validation = Rule::new("!self.metadata.name.contains('.')").message("Configuration names must not contain dots: they become kubelet resource, label and Service names"),
)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationSpec {
    /// The discovery handler to use and its settings.
    pub discovery_handler: DiscoveryHandlerInfo,

    /// How many consumers may use one device at once, cluster-wide. Each device
    /// gets this many slots (kubelet device ids).
    #[serde(default = "default_capacity")]
    #[x_kube(validation = Rule::new("self >= 1").message("capacity must be at least 1"))]
    pub capacity: i32,

    /// Workload started for every device: exactly one of brokerPodSpec or brokerJobSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_spec: Option<BrokerSpec>,

    /// Service created for each device, named `<instance>-svc`, selecting that device's brokers.
    /// A core/v1 ServiceSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::optional_embedded_object")]
    pub instance_service_spec: Option<ServiceSpec>,

    /// Service created once for the Configuration, named `<configuration>-svc`, selecting the
    /// brokers of all its devices. A core/v1 ServiceSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::optional_embedded_object")]
    pub configuration_service_spec: Option<ServiceSpec>,

    /// Extra environment variables for brokers, merged into every Instance's brokerProperties.
    /// (An `Option` so that `brokerProperties: {}`, as Akri's chart renders it, round-trips.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_properties: Option<BTreeMap<String, String>>,
}

/// Which discovery handler to run, and what to tell it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryHandlerInfo {
    /// Handler name, e.g. `onvif`, `usb`, `udev`, `modbus`, `ble`, `mdns`, `debugEcho`, or the
    /// name an external handler registers with.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Handler-specific settings as YAML or JSON text, passed to the handler verbatim. See the
    /// handler's documentation for its fields; invalid settings show as a status condition.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub discovery_details: String,

    /// Values the agent resolves (literally, or from Secrets and ConfigMaps in the
    /// Configuration's namespace) and sends to the handler, e.g. camera credentials.
    /// At most 256 entries (bounds the cost of the CEL rules on each entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub discovery_properties: Option<Vec<DiscoveryProperty>>,
}

/// One named value for the discovery handler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.value) && has(self.valueFrom))").message("a discovery property sets either value or valueFrom, not both"))]
pub struct DiscoveryProperty {
    /// Property name as the handler expects it, e.g. `username_default`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[_A-Za-z][_A-Za-z0-9]*$')").message("discovery property names start with a letter or '_' and contain only letters, digits and '_'"))]
    pub name: String,

    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,

    /// Where to read the value from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<DiscoveryPropertySource>,
}

/// A reference to a key of a Secret or a ConfigMap: exactly one of the two.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)").message("valueFrom needs exactly one of secretKeyRef or configMapKeyRef"))]
pub struct DiscoveryPropertySource {
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<DiscoveryPropertyKeySelector>,

    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<DiscoveryPropertyKeySelector>,
}

/// Selects one key of a Secret or ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryPropertyKeySelector {
    /// Name of the Secret or ConfigMap.
    pub name: String,

    /// Its namespace. Unlike Akri (which defaults to `default` and reads any namespace), Verge
    /// defaults to the Configuration's own namespace and refuses other namespaces unless the
    /// chart allows cross-namespace references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// The key whose value to use.
    pub key: String,

    /// When true, a missing object or key leaves the property out instead of failing discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// The workload started for each device.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.brokerPodSpec) != has(self.brokerJobSpec)").message("brokerSpec needs exactly one of brokerPodSpec or brokerJobSpec"))]
pub struct BrokerSpec {
    /// A core/v1 PodSpec: one broker Pod per device and node. A container resource key written
    /// as `{{PLACEHOLDER}}` is replaced by the device's resource name `akri.sh/<instance>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::optional_embedded_object")]
    pub broker_pod_spec: Option<PodSpec>,

    /// A batch/v1 JobSpec: one Job per device, started again when the Configuration changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::optional_embedded_object")]
    pub broker_job_spec: Option<JobSpec>,
}

/// Observed state. The controller owns `observedGeneration`, `conditions` and the counts; each
/// node's agent owns only its own entry in `nodes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationStatus {
    /// The `.metadata.generation` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: `Ready` (discovery and brokers healthy) and `BrokersDegraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of Instances (devices) of this Configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,

    /// Number of broker Pods running (or Jobs active or complete) for this Configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<i32>,

    /// Per-node discovery state; each entry is written only by that node's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeDiscoveryStatus>,
}

/// What one node's agent sees for a Configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDiscoveryStatus {
    /// Node name.
    pub node: String,

    /// Devices the handler currently reports on this node.
    #[serde(default)]
    pub devices: i32,

    /// Handler endpoints registered on this node for this Configuration's handler.
    #[serde(default)]
    pub handler_endpoints: i32,

    /// The Configuration generation this entry reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions on this node: `Discovering`, and problems such as invalid settings, an
    /// unresolvable property, a missing handler or handler diagnostics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl ConfigurationSpec {
    /// The broker PodSpec, if the Configuration has one.
    pub fn broker_pod_spec(&self) -> Option<&PodSpec> {
        self.broker_spec.as_ref()?.broker_pod_spec.as_ref()
    }

    /// Extra broker environment from the Configuration (empty when unset).
    pub fn broker_properties(&self) -> BTreeMap<String, String> {
        self.broker_properties.clone().unwrap_or_default()
    }

    /// The broker JobSpec, if the Configuration has one.
    pub fn broker_job_spec(&self) -> Option<&JobSpec> {
        self.broker_spec.as_ref()?.broker_job_spec.as_ref()
    }
}
