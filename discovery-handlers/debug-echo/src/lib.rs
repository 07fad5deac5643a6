//! The `debugEcho` discovery handler, for tests and demos.
//!
//! Settings (discoveryDetails):
//! ```yaml
//! descriptions: [foo0, foo1]   # one device per entry; required
//! availabilityFile: /tmp/x     # optional; Verge extension (default: the handler's file)
//! diagnostics:                 # optional; Verge extension: echoed in every update
//! - {subject: foo0, severity: Warning, message: "simulated problem"}
//! ```
//! Each device has id = its description and one property,
//! `DEBUG_ECHO_DESCRIPTION`. While the availability file contains `OFFLINE`,
//! the device list is empty. The file is watched with inotify, so a change is
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

    fn devices(settings: &DebugEchoSettings) -> Vec<Device> {
        settings
            .descriptions
            .iter()
            .map(|d| Device {
                id: d.clone(),
                properties: [(DESCRIPTION_PROPERTY.to_string(), d.clone())].into(),
                mounts: Vec::new(),
                device_specs: Vec::new(),
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
        availability::watch(file, Self::devices(&settings), diagnostics)
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
