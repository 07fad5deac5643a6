//! The `akri.sh/v0` API: [`Configuration`] and [`Instance`], wire-compatible
//! with Akri so existing Configurations apply unchanged, plus the Verge
//! `status` subresources and the naming rules shared by agent and controller.

// kube-derive takes one `printcolumn(...)` per column; clippy sees the
// repeated `type_ = "..."` inside them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod configuration;
pub mod instance;
pub mod naming;
pub mod schema;
pub mod status;

pub use configuration::{
    BrokerSpec, Configuration, ConfigurationSpec, ConfigurationStatus, DiscoveryHandlerInfo,
    DiscoveryProperty, DiscoveryPropertyKeySelector, DiscoveryPropertySource, NodeDiscoveryStatus,
};
pub use instance::{Instance, InstanceSpec, InstanceStatus};
pub use status::Condition;

/// API group of both kinds.
pub const API_GROUP: &str = "akri.sh";
/// API version of both kinds.
pub const API_VERSION: &str = "v0";
/// Prefix of every kubelet resource and label Verge creates.
pub const RESOURCE_PREFIX: &str = "akri.sh";

/// Renders a CRD as YAML, the format checked in under `crds/`.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

/// Every CRD Verge owns, with the file name crdgen writes it to.
pub fn all_crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;
    vec![
        ("akri.sh_configurations.yaml", Configuration::crd()),
        ("akri.sh_instances.yaml", Instance::crd()),
    ]
}
