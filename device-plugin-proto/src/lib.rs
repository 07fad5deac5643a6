//! Generated gRPC bindings used across Verge.
//!
//! - [`v0`]: the discovery-handler protocol, wire-compatible with Akri's `v0`
//!   (plus Verge's `diagnostics` extension, field 100 of `DiscoverResponse`).
//! - [`v1beta1`]: the kubelet device-plugin API.
//! - [`podresources::v1`]: the kubelet pod-resources API.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod codec;

/// Discovery-handler protocol `v0`.
pub mod v0 {
    tonic::include_proto!("v0");
}

/// kubelet device-plugin API `v1beta1`.
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");

    /// The API version string a plugin sends in `RegisterRequest.version`.
    pub const VERSION: &str = "v1beta1";
    /// Health value of a usable device.
    pub const HEALTHY: &str = "Healthy";
    /// Health value of a device that must not be allocated.
    pub const UNHEALTHY: &str = "Unhealthy";
}

/// kubelet pod-resources API.
pub mod podresources {
    /// Version `v1`.
    pub mod v1 {
        tonic::include_proto!("v1");
    }
}
