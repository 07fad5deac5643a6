//! The `Instance` kind: one discovered device, its slots and the nodes that see it.

use std::collections::BTreeMap;
use std::fmt;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// One device found by a Configuration's discovery handler. Named
/// `<configuration>-<6 hex>`; advertised to kubelet as `akri.sh/<instance>`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "akri.sh",
    version = "v0",
    kind = "Instance",
    plural = "instances",
    namespaced,
    shortname = "akrii",
    category = "all",
    status = "InstanceStatus",
    derive = "PartialEq",
    doc = "One discovered device: its properties, the nodes that can reach it and who uses each of its capacity slots.",
    printcolumn(
        name = "Config",
        type_ = "string",
        json_path = ".spec.configurationName",
        description = "Owning Configuration"
    ),
    printcolumn(
        name = "Shared",
        type_ = "boolean",
        json_path = ".spec.shared",
        description = "Reachable from several nodes"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".spec.nodes",
        description = "Nodes that see the device"
    ),
    printcolumn(
        name = "Used",
        type_ = "integer",
        json_path = ".status.usedSlots",
        description = "Slots in use"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".spec.capacity",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// Name of the Configuration that discovered this device.
    pub configuration_name: String,

    /// CDI-style device name `akri.sh/<configuration>=<hash>`.
    #[serde(default)]
    pub cdi_name: String,

    /// Number of slots (concurrent consumers), copied from the Configuration.
    #[serde(default = "default_capacity")]
    pub capacity: i32,

    /// Device properties from the handler, merged with the Configuration's brokerProperties.
    /// Each becomes an environment variable in containers that are allocated the device.
    #[serde(default)]
    pub broker_properties: BTreeMap<String, String>,

    /// Whether the device is reachable from several nodes (e.g. an IP camera) or is local to one
    /// node (e.g. USB).
    #[serde(default)]
    pub shared: bool,

    /// Nodes that currently see the device; each node's agent owns its own entry.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub nodes: Vec<String>,

    /// Slot id `<instance>-<n>` → usage: `""` free, `"<node>"` used through the instance
    /// resource on that node, `"C:<vdev>:<node>"` used through the configuration resource.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-map-type" = "granular"))]
    pub device_usage: BTreeMap<String, String>,
}

fn default_capacity() -> i32 {
    crate::configuration::DEFAULT_CAPACITY
}

/// Observed state, owned by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Standard conditions about this device's brokers, e.g. `BrokersReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of slots in `spec.deviceUsage` that are in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_slots: Option<i32>,

    /// Number of broker workloads running for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<i32>,
}

/// Who holds a slot, as encoded in `spec.deviceUsage` values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SlotUsage {
    /// Nobody.
    Free,
    /// A container on `node` through the instance resource `akri.sh/<instance>`.
    Instance { node: String },
    /// A container on `node` through configuration-level virtual device `vdev`.
    Configuration { vdev: String, node: String },
}

impl SlotUsage {
    /// Parses a `deviceUsage` value. Unknown shapes are treated as "used by that
    /// string as a node", which keeps the slot unavailable rather than double-booking it.
    pub fn parse(value: &str) -> Self {
        if value.is_empty() {
            return SlotUsage::Free;
        }
        if let Some(rest) = value.strip_prefix("C:")
            && let Some((vdev, node)) = rest.rsplit_once(':')
        {
            return SlotUsage::Configuration {
                vdev: vdev.to_string(),
                node: node.to_string(),
            };
        }
        SlotUsage::Instance {
            node: value.to_string(),
        }
    }

    /// The node holding the slot, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            SlotUsage::Free => None,
            SlotUsage::Instance { node } | SlotUsage::Configuration { node, .. } => Some(node),
        }
    }

    /// Whether the slot is free.
    pub fn is_free(&self) -> bool {
        matches!(self, SlotUsage::Free)
    }
}

impl fmt::Display for SlotUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotUsage::Free => Ok(()),
            SlotUsage::Instance { node } => f.write_str(node),
            SlotUsage::Configuration { vdev, node } => write!(f, "C:{vdev}:{node}"),
        }
    }
}

impl InstanceSpec {
    /// Number of slots currently held by anyone.
    pub fn used_slots(&self) -> usize {
        self.device_usage
            .values()
            .filter(|v| !SlotUsage::parse(v).is_free())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_usage_round_trips_every_encoding() {
        for (text, usage) in [
            ("", SlotUsage::Free),
            (
                "node-a",
                SlotUsage::Instance {
                    node: "node-a".into(),
                },
            ),
            (
                "C:camera-0:node-a",
                SlotUsage::Configuration {
                    vdev: "camera-0".into(),
                    node: "node-a".into(),
                },
            ),
        ] {
            assert_eq!(SlotUsage::parse(text), usage);
            assert_eq!(usage.to_string(), text);
        }
        assert_eq!(SlotUsage::parse("C:x:n").node(), Some("n"));
    }

    #[test]
    fn used_slots_counts_only_held_slots() {
        let spec = InstanceSpec {
            configuration_name: "c".into(),
            cdi_name: String::new(),
            capacity: 3,
            broker_properties: BTreeMap::new(),
            shared: false,
            nodes: vec![],
            device_usage: [("c-1-0", ""), ("c-1-1", "n"), ("c-1-2", "C:v:n")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(spec.used_slots(), 2);
    }
}
