//! Names shared by agent and controller, fixed by the Akri contract.

use blake2::Blake2bVar;
use blake2::digest::{Update, VariableOutput};

use crate::RESOURCE_PREFIX;

/// Longest Configuration name: `akri.sh/<name>-<6 hex>` and `<name>-<6 hex>-svc`
/// must fit in 63 characters.
pub const MAX_CONFIGURATION_NAME_LEN: usize = 52;

/// Length in bytes of the BLAKE2b digest that names an Instance (6 hex characters).
const INSTANCE_HASH_BYTES: usize = 3;

/// Label on broker Pods, Jobs and Services: the Configuration.
pub const LABEL_CONFIGURATION: &str = "akri.sh/configuration";
/// Label on broker Pods, Jobs and Services: the Instance.
pub const LABEL_INSTANCE: &str = "akri.sh/instance";
/// Label on broker Pods: the node the broker is pinned to.
pub const LABEL_TARGET_NODE: &str = "akri.sh/target-node";
/// Label on everything the controller creates, with value [`CONTROLLER_LABEL_VALUE`].
pub const LABEL_CONTROLLER: &str = "controller";
/// Value of [`LABEL_CONTROLLER`].
pub const CONTROLLER_LABEL_VALUE: &str = "akri.sh";
/// Resource key in broker specs that stands for the device's resource name.
pub const PLACEHOLDER_RESOURCE: &str = "{{PLACEHOLDER}}";

/// Why a Configuration name cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// Longer than [`MAX_CONFIGURATION_NAME_LEN`].
    #[error(
        "configuration name {name:?} is {len} characters; at most {max} fit resource and Service names"
    )]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    /// Contains a dot.
    #[error(
        "configuration name {0:?} contains a dot; it becomes part of resource, label and Service names"
    )]
    HasDot(String),
}

/// Checks the Configuration-name rules the CRD also enforces with CEL.
pub fn validate_configuration_name(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_CONFIGURATION_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            len: name.len(),
            max: MAX_CONFIGURATION_NAME_LEN,
        });
    }
    if name.contains('.') {
        return Err(NameError::HasDot(name.to_string()));
    }
    Ok(())
}

/// The 6-hex-character hash of a device: BLAKE2b with a 3-byte digest over the
/// device id, followed directly by the node name for devices that are not shared.
pub fn instance_hash(device_id: &str, shared: bool, node: &str) -> String {
    let mut hasher = match Blake2bVar::new(INSTANCE_HASH_BYTES) {
        Ok(h) => h,
        // 3 is within BLAKE2b's 1..=64 output range; this arm cannot run.
        Err(_) => unreachable!("BLAKE2b accepts a {INSTANCE_HASH_BYTES}-byte output"),
    };
    hasher.update(device_id.as_bytes());
    if !shared {
        hasher.update(node.as_bytes());
    }
    let mut digest = [0u8; INSTANCE_HASH_BYTES];
    if hasher.finalize_variable(&mut digest).is_err() {
        unreachable!("the buffer has the requested output length");
    }
    hex::encode(digest)
}

/// Instance name `<configuration>-<hash>`.
pub fn instance_name(configuration: &str, device_id: &str, shared: bool, node: &str) -> String {
    format!("{configuration}-{}", instance_hash(device_id, shared, node))
}

/// The hash part of an Instance name, if it has one.
pub fn hash_of_instance(instance: &str) -> Option<&str> {
    let (_, hash) = instance.rsplit_once('-')?;
    (hash.len() == INSTANCE_HASH_BYTES * 2 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(hash)
}

/// kubelet resource of one device: `akri.sh/<instance>`.
pub fn instance_resource_name(instance: &str) -> String {
    format!("{RESOURCE_PREFIX}/{instance}")
}

/// kubelet resource of all devices of a Configuration: `akri.sh/<configuration>`.
pub fn configuration_resource_name(configuration: &str) -> String {
    format!("{RESOURCE_PREFIX}/{configuration}")
}

/// Device id of slot `n` of an Instance, as kubelet sees it: `<instance>-<n>`.
pub fn slot_id(instance: &str, slot: usize) -> String {
    format!("{instance}-{slot}")
}

/// CDI-style name stored in `Instance.spec.cdiName`: `akri.sh/<configuration>=<hash>`.
pub fn cdi_name(configuration: &str, hash: &str) -> String {
    format!("{RESOURCE_PREFIX}/{configuration}={hash}")
}

/// Service per Instance: `<instance>-svc`.
pub fn instance_service_name(instance: &str) -> String {
    format!("{instance}-svc")
}

/// Service per Configuration: `<configuration>-svc`.
pub fn configuration_service_name(configuration: &str) -> String {
    format!("{configuration}-svc")
}

/// Suffix appended to every env var of a device so one container can hold
/// several: `K_<HASH>` with the instance hash upper-cased.
pub fn env_suffixed(key: &str, instance_hash: &str) -> String {
    format!("{key}_{}", instance_hash.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_from_the_contract() {
        // compatibility.md §2: id `my_local_device` on node `my_node` → e77db4.
        assert_eq!(instance_hash("my_local_device", false, "my_node"), "e77db4");
        assert_eq!(
            instance_name("conf", "my_local_device", false, "my_node"),
            "conf-e77db4"
        );
    }

    #[test]
    fn shared_devices_ignore_the_node() {
        assert_eq!(
            instance_hash("camera-1", true, "node-a"),
            instance_hash("camera-1", true, "node-b")
        );
        assert_ne!(
            instance_hash("usb-1", false, "node-a"),
            instance_hash("usb-1", false, "node-b")
        );
        // Shared hashing is over the id alone, which is the non-shared hash with an empty node.
        assert_eq!(
            instance_hash("camera-1", true, "node-a"),
            instance_hash("camera-1", false, "")
        );
    }

    #[test]
    fn hash_is_six_lowercase_hex() {
        let h = instance_hash("anything", true, "");
        assert_eq!(h.len(), 6);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(hash_of_instance(&format!("my-conf-{h}")), Some(h.as_str()));
        assert_eq!(hash_of_instance("no-hash-here"), None);
    }

    #[test]
    fn derived_names() {
        assert_eq!(instance_resource_name("cam-abc123"), "akri.sh/cam-abc123");
        assert_eq!(configuration_resource_name("cam"), "akri.sh/cam");
        assert_eq!(slot_id("cam-abc123", 2), "cam-abc123-2");
        assert_eq!(cdi_name("cam", "abc123"), "akri.sh/cam=abc123");
        assert_eq!(instance_service_name("cam-abc123"), "cam-abc123-svc");
        assert_eq!(configuration_service_name("cam"), "cam-svc");
        assert_eq!(env_suffixed("ONVIF_X", "abc123"), "ONVIF_X_ABC123");
    }

    #[test]
    fn configuration_name_rules() {
        let longest = "a".repeat(MAX_CONFIGURATION_NAME_LEN);
        assert!(validate_configuration_name(&longest).is_ok());
        // The longest name still yields names that fit 63 characters.
        let instance = instance_name(&longest, "d", true, "");
        assert_eq!(
            instance_resource_name(&instance).len() - "akri.sh/".len(),
            59
        );
        assert!(instance_service_name(&instance).len() <= 63);
        assert!(matches!(
            validate_configuration_name(&format!("{longest}a")),
            Err(NameError::TooLong { len: 53, .. })
        ));
        assert_eq!(
            validate_configuration_name("a.b"),
            Err(NameError::HasDot("a.b".into()))
        );
    }
}
