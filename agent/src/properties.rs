//! Resolves a Configuration's discoveryProperties: literal values, Secret and
//! ConfigMap keys. References default to the Configuration's namespace; other
//! namespaces are refused unless the agent is started with
//! `--allow-cross-namespace-properties` (a deliberate break from Akri, which
//! lets any Configuration author read any namespace's Secrets through the agent).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::Client;
use verge_crds::{DiscoveryProperty, DiscoveryPropertyKeySelector};

/// Why a property could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PropertyError {
    /// Cross-namespace reference while not allowed.
    #[error(
        "property {property}: {kind} {namespace}/{name} is in another namespace; cross-namespace references are disabled"
    )]
    CrossNamespace {
        /// Property name.
        property: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Referenced namespace.
        namespace: String,
        /// Referenced object.
        name: String,
    },
    /// Object or key missing and not optional.
    #[error("property {property}: {kind} {namespace}/{name} has no key {key:?}")]
    Missing {
        /// Property name.
        property: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object.
        name: String,
        /// Key.
        key: String,
    },
    /// The Secret or ConfigMap does not exist (and the property is not optional).
    #[error("property {property}: {kind} {namespace}/{name} not found")]
    NotFound {
        /// Property name.
        property: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object.
        name: String,
    },
    /// Neither value nor valueFrom.
    #[error("property {0} has neither value nor valueFrom")]
    Empty(String),
    /// The API server failed; worth retrying.
    #[error("property {property}: cannot read {kind} {namespace}/{name}: {message}")]
    Api {
        /// Property name.
        property: String,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object.
        name: String,
        /// Error text.
        message: String,
    },
}

impl PropertyError {
    /// Whether retrying later may help (API trouble), as opposed to a wrong Configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, PropertyError::Api { .. })
    }
}

enum Kind {
    Secret,
    ConfigMap,
}

/// Resolves every property of a Configuration in `namespace`.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    properties: &[DiscoveryProperty],
    allow_cross_namespace: bool,
) -> Result<BTreeMap<String, Vec<u8>>, PropertyError> {
    let mut out = BTreeMap::new();
    for p in properties {
        if let Some(v) = &p.value {
            out.insert(p.name.clone(), v.clone().into_bytes());
            continue;
        }
        let Some(from) = &p.value_from else {
            return Err(PropertyError::Empty(p.name.clone()));
        };
        let (kind, selector) = match (&from.secret_key_ref, &from.config_map_key_ref) {
            (Some(s), _) => (Kind::Secret, s),
            (None, Some(c)) => (Kind::ConfigMap, c),
            (None, None) => return Err(PropertyError::Empty(p.name.clone())),
        };
        if let Some(value) = read(
            client,
            namespace,
            &p.name,
            kind,
            selector,
            allow_cross_namespace,
        )
        .await?
        {
            out.insert(p.name.clone(), value);
        }
    }
    Ok(out)
}

async fn read(
    client: &Client,
    own_namespace: &str,
    property: &str,
    kind: Kind,
    sel: &DiscoveryPropertyKeySelector,
    allow_cross_namespace: bool,
) -> Result<Option<Vec<u8>>, PropertyError> {
    let namespace = sel
        .namespace
        .clone()
        .unwrap_or_else(|| own_namespace.to_string());
    let kind_name = match kind {
        Kind::Secret => "Secret",
        Kind::ConfigMap => "ConfigMap",
    };
    if namespace != own_namespace && !allow_cross_namespace {
        return Err(PropertyError::CrossNamespace {
            property: property.to_string(),
            kind: kind_name,
            namespace,
            name: sel.name.clone(),
        });
    }
    let api_err = |e: kube::Error| PropertyError::Api {
        property: property.to_string(),
        kind: kind_name,
        namespace: namespace.clone(),
        name: sel.name.clone(),
        message: e.to_string(),
    };
    let optional = sel.optional.unwrap_or(false);
    let not_found = || PropertyError::NotFound {
        property: property.to_string(),
        kind: kind_name,
        namespace: namespace.clone(),
        name: sel.name.clone(),
    };
    let value: Option<Vec<u8>> = match kind {
        Kind::Secret => {
            let Some(secret) = Api::<Secret>::namespaced(client.clone(), &namespace)
                .get_opt(&sel.name)
                .await
                .map_err(api_err)?
            else {
                return if optional { Ok(None) } else { Err(not_found()) };
            };
            secret
                .data
                .and_then(|d| d.get(&sel.key).map(|b| b.0.clone()))
        }
        Kind::ConfigMap => {
            let Some(c) = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .get_opt(&sel.name)
                .await
                .map_err(api_err)?
            else {
                return if optional { Ok(None) } else { Err(not_found()) };
            };
            c.data
                .and_then(|d| d.get(&sel.key).map(|s| s.clone().into_bytes()))
                .or_else(|| {
                    c.binary_data
                        .and_then(|b| b.get(&sel.key).map(|v| v.0.clone()))
                })
        }
    };
    match value {
        Some(v) => Ok(Some(v)),
        None if optional => Ok(None),
        None => Err(PropertyError::Missing {
            property: property.to_string(),
            kind: kind_name,
            namespace,
            name: sel.name.clone(),
            key: sel.key.clone(),
        }),
    }
}
