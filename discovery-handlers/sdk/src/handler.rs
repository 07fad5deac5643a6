//! The trait every discovery handler implements.

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use futures::future::BoxFuture;
use verge_device_plugin_proto::v0::{Device, Diagnostic, DiscoverRequest, DiscoverResponse};

/// What the agent asks a handler to do: the Configuration's discoveryDetails
/// text and its resolved discoveryProperties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryRequest {
    /// Handler settings, YAML or JSON, verbatim from the Configuration.
    pub details: String,
    /// Resolved discoveryProperties (e.g. credentials read from Secrets).
    pub properties: BTreeMap<String, Vec<u8>>,
}

impl DiscoveryRequest {
    /// A property as UTF-8 text, if present and valid UTF-8.
    pub fn property_str(&self, name: &str) -> Option<&str> {
        self.properties
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

impl From<DiscoverRequest> for DiscoveryRequest {
    fn from(r: DiscoverRequest) -> Self {
        Self {
            details: r.discovery_details,
            properties: r
                .discovery_properties
                .into_iter()
                .filter_map(|(k, v)| v.vec.map(|bytes| (k, bytes)))
                .collect(),
        }
    }
}

impl From<DiscoveryRequest> for DiscoverRequest {
    fn from(r: DiscoveryRequest) -> Self {
        Self {
            discovery_details: r.details,
            discovery_properties: r
                .properties
                .into_iter()
                .map(|(k, v)| (k, verge_device_plugin_proto::v0::ByteData { vec: Some(v) }))
                .collect(),
        }
    }
}

/// One message of a discovery stream: the complete current device list, plus
/// diagnostics the user should see (Verge's `v0` extension, field 100).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiscoveryUpdate {
    /// Every device currently found; replaces the previous list.
    pub devices: Vec<Device>,
    /// Problems worth a status condition, e.g. a wrong camera password.
    pub diagnostics: Vec<Diagnostic>,
}

impl DiscoveryUpdate {
    /// An update with devices and no diagnostics.
    pub fn devices(devices: Vec<Device>) -> Self {
        Self {
            devices,
            diagnostics: Vec::new(),
        }
    }

    /// Adds a diagnostic.
    pub fn with_diagnostic(
        mut self,
        subject: impl Into<String>,
        severity: &str,
        message: impl Into<String>,
    ) -> Self {
        self.diagnostics.push(Diagnostic {
            subject: subject.into(),
            severity: severity.to_string(),
            message: message.into(),
        });
        self
    }
}

impl From<DiscoverResponse> for DiscoveryUpdate {
    fn from(r: DiscoverResponse) -> Self {
        Self {
            devices: r.devices,
            diagnostics: r.diagnostics,
        }
    }
}

impl From<DiscoveryUpdate> for DiscoverResponse {
    fn from(u: DiscoveryUpdate) -> Self {
        Self {
            devices: u.devices,
            diagnostics: u.diagnostics,
        }
    }
}

/// Diagnostic severities.
pub mod severity {
    /// Something stops a device (or all devices) from being found or used.
    pub const ERROR: &str = "Error";
    /// Something looks wrong but discovery goes on.
    pub const WARNING: &str = "Warning";
    /// For information.
    pub const INFO: &str = "Info";
}

/// Why discovery could not start or had to stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The discoveryDetails or discoveryProperties are wrong; retrying will not help.
    /// Sent as gRPC `InvalidArgument`.
    #[error("invalid discovery settings: {0}")]
    InvalidSettings(String),
    /// A resource the handler needs is missing for now (no adapter, a bus down);
    /// the agent retries with backoff. Sent as gRPC `Unavailable`.
    #[error("discovery unavailable: {0}")]
    Unavailable(String),
    /// The handler could not be reached (external handlers only).
    #[error("handler unreachable: {0}")]
    Transport(String),
    /// A bug or an unexpected failure. Sent as gRPC `Internal`.
    #[error("discovery failed: {0}")]
    Internal(String),
}

impl DiscoveryError {
    /// Whether retrying with the same settings can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DiscoveryError::InvalidSettings(_))
    }
}

impl From<DiscoveryError> for tonic::Status {
    fn from(e: DiscoveryError) -> Self {
        match e {
            DiscoveryError::InvalidSettings(m) => tonic::Status::invalid_argument(m),
            DiscoveryError::Unavailable(m) | DiscoveryError::Transport(m) => {
                tonic::Status::unavailable(m)
            }
            DiscoveryError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

impl From<tonic::Status> for DiscoveryError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            tonic::Code::InvalidArgument => DiscoveryError::InvalidSettings(message),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                DiscoveryError::Transport(format!("{:?}: {message}", s.code()))
            }
            _ => DiscoveryError::Internal(format!("{:?}: {message}", s.code())),
        }
    }
}

/// A stream of device lists. It ends when discovery ends; an `Err` item
/// reports why, and the consumer decides whether to start again.
pub type DeviceStream = Pin<Box<dyn Stream<Item = Result<DiscoveryUpdate, DiscoveryError>> + Send>>;

/// A discovery handler: parse settings, then stream device lists.
///
/// `discover` is called once per Configuration (and again whenever its
/// discoveryDetails or discoveryProperties change); dropping the returned
/// stream must stop all work for that request.
pub trait DiscoveryHandler: Send + Sync + 'static {
    /// The name Configurations use in `spec.discoveryHandler.name`.
    fn name(&self) -> &str;

    /// Whether devices are reachable from several nodes (network devices) or
    /// local to this node (USB). Declared at registration.
    fn shared(&self) -> bool;

    /// Validates `request` and starts discovery. Invalid settings must fail
    /// here with [`DiscoveryError::InvalidSettings`], not later in the stream.
    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>>;
}
