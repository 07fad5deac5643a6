//! The `debugEcho` discovery handler, for tests and demos.
//!
//! Settings (discoveryDetails):
//! ```yaml
//! descriptions: [foo0, foo1]   # one device per entry; required
//! availabilityFile: /tmp/x     # optional; Verge extension (default: the handler's file)
//! diagnostics:                 # optional; Verge extension: echoed in every update
//! - {subject: foo0, severity: Warning, message: "simulated problem"}
//! echoPropertyDigests: true    # optional; Verge extension (default false)
//! ```
//! Each device has id = its description and one property,
//! `DEBUG_ECHO_DESCRIPTION`. While the availability file contains `OFFLINE`,
//! the device list is empty. With `echoPropertyDigests`, every device also
//! carries `DEBUG_ECHO_PROPERTY_<NAME>` = `sha256:<hex>` of each resolved
//! discoveryProperty — enough to check that a Secret or ConfigMap value reached
//! the handler without copying the value itself into Instances. The file is watched with inotify, so a change is
//! reported at once instead of at the next poll.

mod availability;

use std::path::PathBuf;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use verge_discovery_sdk::{
    Device, DeviceStream, Diagnostic, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    parse_details, severity,
};

/// Name Configurations use.
pub const HANDLER_NAME: &str = "debugEcho";
/// Property holding the device's description.
pub const DESCRIPTION_PROPERTY: &str = "DEBUG_ECHO_DESCRIPTION";
/// Akri's availability file.
pub const DEFAULT_AVAILABILITY_FILE: &str = "/tmp/debug-echo-availability.txt";
/// Prefix of the property digests `echoPropertyDigests` adds.
pub const PROPERTY_DIGEST_PREFIX: &str = "DEBUG_ECHO_PROPERTY_";
/// File content that hides every device.
pub const OFFLINE: &str = "OFFLINE";

/// discoveryDetails of debugEcho.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DebugEchoSettings {
    /// One device per description.
    pub descriptions: Vec<String>,
    /// Availability file for this Configuration only (so tests do not share one switch).
    #[serde(default)]
    pub availability_file: Option<PathBuf>,
    /// Diagnostics to send with every update (exercises the `v0` diagnostics extension).
    #[serde(default)]
    pub diagnostics: Vec<DiagnosticSetting>,
    /// Add a SHA-256 digest of every resolved discoveryProperty to each device.
    #[serde(default)]
    pub echo_property_digests: bool,
}

/// One diagnostic to echo.
#[derive(Deserialize, Debug, Default, PartialEq, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticSetting {
    /// What it is about.
    #[serde(default)]
    pub subject: String,
    /// `Error`, `Warning` or `Info`.
    pub severity: String,
    /// Text.
    pub message: String,
}

/// `DEBUG_ECHO_PROPERTY_<NAME>`, the name upper-cased with anything but
/// letters and digits as `_`, so it is a valid environment variable name.
pub fn property_digest_name(name: &str) -> String {
    let normalised: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{PROPERTY_DIGEST_PREFIX}{normalised}")
}

/// `sha256:<hex>` of a property value.
pub fn property_digest(value: &[u8]) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(value)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The handler.
#[derive(Clone, Debug)]
pub struct DebugEcho {
    default_availability_file: PathBuf,
    shared: bool,
}

impl Default for DebugEcho {
    fn default() -> Self {
        Self::new(PathBuf::from(DEFAULT_AVAILABILITY_FILE), true)
    }
}

impl DebugEcho {
    /// A handler whose Configurations default to `availability_file`. debugEcho
    /// devices stand in for network devices, so they are shared by default.
    pub fn new(default_availability_file: PathBuf, shared: bool) -> Self {
        Self {
            default_availability_file,
            shared,
        }
    }

    fn devices(settings: &DebugEchoSettings, request: &DiscoveryRequest) -> Vec<Device> {
        let digests: Vec<(String, String)> = if settings.echo_property_digests {
            request
                .properties
                .iter()
                .map(|(name, value)| (property_digest_name(name), property_digest(value)))
                .collect()
        } else {
            Vec::new()
        };
        settings
            .descriptions
            .iter()
            .map(|d| {
                let mut properties: std::collections::BTreeMap<String, String> =
                    digests.iter().cloned().collect();
                properties.insert(DESCRIPTION_PROPERTY.to_string(), d.clone());
                Device {
                    id: d.clone(),
                    properties,
                    mounts: Vec::new(),
                    device_specs: Vec::new(),
                }
            })
            .collect()
    }

    fn start(&self, request: &DiscoveryRequest) -> Result<DeviceStream, DiscoveryError> {
        let settings: DebugEchoSettings = parse_details(&request.details)?;
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = settings.descriptions.iter().find(|d| !seen.insert(*d)) {
            return Err(DiscoveryError::InvalidSettings(format!(
                "description {dup:?} is listed twice; each description is one device"
            )));
        }
        let file = settings
            .availability_file
            .clone()
            .unwrap_or_else(|| self.default_availability_file.clone());
        for d in &settings.diagnostics {
            if ![severity::ERROR, severity::WARNING, severity::INFO].contains(&d.severity.as_str())
            {
                return Err(DiscoveryError::InvalidSettings(format!(
                    "diagnostic severity {:?} is not Error, Warning or Info",
                    d.severity
                )));
            }
        }
        let diagnostics = settings
            .diagnostics
            .iter()
            .map(|d| Diagnostic {
                subject: d.subject.clone(),
                severity: d.severity.clone(),
                message: d.message.clone(),
            })
            .collect();
        availability::watch(file, Self::devices(&settings, request), diagnostics)
    }
}

impl DiscoveryHandler for DebugEcho {
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
        let result = self.start(&request);
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_digests_only_when_asked() {
        let request = DiscoveryRequest {
            details: "descriptions: [a]\nechoPropertyDigests: true\n".into(),
            properties: [("user-name".to_string(), b"abc".to_vec())].into(),
        };
        let settings: DebugEchoSettings = parse_details(&request.details).expect("settings");
        let devices = DebugEcho::devices(&settings, &request);
        // FIPS 180-2's SHA-256 test vector for "abc".
        assert_eq!(
            devices[0].properties.get("DEBUG_ECHO_PROPERTY_USER_NAME"),
            Some(
                &"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
                    .to_string()
            )
        );
        assert_eq!(
            devices[0].properties.get(DESCRIPTION_PROPERTY),
            Some(&"a".to_string())
        );
        let plain: DebugEchoSettings = parse_details("descriptions: [a]").expect("settings");
        let devices = DebugEcho::devices(&plain, &request);
        assert_eq!(
            devices[0].properties.len(),
            1,
            "{:?}",
            devices[0].properties
        );
    }
}
