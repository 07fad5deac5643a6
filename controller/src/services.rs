//! Desired Services: `<instance>-svc` per Instance and `<configuration>-svc` per Configuration,
//! built from the Configuration's ServiceSpecs. Applied with server-side apply, so fields the
//! user did not set (clusterIP, nodePorts, ...) are never sent and stay whatever the API server
//! allocated, while a changed spec (e.g. a new port) replaces what the controller applied before.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use verge_crds::naming::{
    CONTROLLER_LABEL_VALUE, LABEL_CONFIGURATION, LABEL_CONTROLLER, LABEL_INSTANCE,
    configuration_service_name, instance_service_name,
};
use verge_crds::{Configuration, Instance};

use crate::brokers::instance_owner_reference;

/// Service for one Instance, selecting its brokers by `akri.sh/instance`.
pub fn instance_service(instance: &Instance, spec: &ServiceSpec) -> Service {
    let name = instance.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        (LABEL_INSTANCE.to_string(), name.clone()),
        (
            LABEL_CONFIGURATION.to_string(),
            instance.spec.configuration_name.clone(),
        ),
        (
            LABEL_CONTROLLER.to_string(),
            CONTROLLER_LABEL_VALUE.to_string(),
        ),
    ]);
    build(
        instance_service_name(&name),
        instance.metadata.namespace.clone(),
        labels,
        (LABEL_INSTANCE, &name),
        spec,
        instance_owner_reference(instance),
    )
}

/// Service for a whole Configuration, selecting the brokers of all its Instances by
/// `akri.sh/configuration`.
pub fn configuration_service(configuration: &Configuration, spec: &ServiceSpec) -> Service {
    let name = configuration.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        (LABEL_CONFIGURATION.to_string(), name.clone()),
        (
            LABEL_CONTROLLER.to_string(),
            CONTROLLER_LABEL_VALUE.to_string(),
        ),
    ]);
    let owner = configuration.controller_owner_ref(&()).map(|mut r| {
        r.block_owner_deletion = Some(true);
        r
    });
    build(
        configuration_service_name(&name),
        configuration.metadata.namespace.clone(),
        labels,
        (LABEL_CONFIGURATION, &name),
        spec,
        owner,
    )
}

fn build(
    name: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    selector: (&str, &str),
    spec: &ServiceSpec,
    owner: Option<OwnerReference>,
) -> Service {
    let mut spec = spec.clone();
    // The broker label narrows whatever the user selects, so the Service never reaches pods
    // of other devices.
    spec.selector
        .get_or_insert_with(BTreeMap::new)
        .insert(selector.0.to_string(), selector.1.to_string());
    Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace,
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Whether an existing Service was made by the controller (and may be deleted by it).
pub fn is_ours(service: &Service) -> bool {
    service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CONTROLLER))
        .is_some_and(|v| v == CONTROLLER_LABEL_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServicePort;
    use verge_crds::{ConfigurationSpec, DiscoveryHandlerInfo, InstanceSpec};

    fn spec() -> ServiceSpec {
        ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(BTreeMap::from([("app".to_string(), "x".to_string())])),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn instance_service_selects_the_instance_and_is_owned_by_it() {
        let mut i = Instance::new(
            "cam-abc123",
            InstanceSpec {
                configuration_name: "cam".into(),
                cdi_name: String::new(),
                capacity: 1,
                broker_properties: BTreeMap::new(),
                shared: true,
                nodes: vec![],
                device_usage: BTreeMap::new(),
            },
        );
        i.metadata.namespace = Some("ns".into());
        i.metadata.uid = Some("u".into());
        let svc = instance_service(&i, &spec());
        assert_eq!(svc.metadata.name.as_deref(), Some("cam-abc123-svc"));
        assert_eq!(svc.metadata.namespace.as_deref(), Some("ns"));
        let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        assert_eq!(selector[LABEL_INSTANCE], "cam-abc123");
        assert_eq!(selector["app"], "x");
        let labels = svc.metadata.labels.clone().unwrap();
        assert_eq!(labels[LABEL_INSTANCE], "cam-abc123");
        assert_eq!(labels[LABEL_CONFIGURATION], "cam");
        assert!(is_ours(&svc));
        let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Instance", Some(true))
        );
        // Nothing the user left unset is sent (clusterIP stays the API server's).
        let json = serde_json::to_value(&svc).unwrap();
        assert!(json["spec"].get("clusterIP").is_none());
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["kind"], "Service");
    }

    #[test]
    fn configuration_service_selects_the_configuration() {
        let mut c = Configuration::new(
            "cam",
            ConfigurationSpec {
                discovery_handler: DiscoveryHandlerInfo {
                    name: "debugEcho".into(),
                    ..Default::default()
                },
                capacity: 1,
                broker_spec: None,
                instance_service_spec: None,
                configuration_service_spec: Some(spec()),
                broker_properties: None,
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("u".into());
        let svc = configuration_service(&c, &spec());
        assert_eq!(svc.metadata.name.as_deref(), Some("cam-svc"));
        let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        assert_eq!(selector[LABEL_CONFIGURATION], "cam");
        assert!(
            !svc.metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(LABEL_INSTANCE)
        );
        let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Configuration", "cam")
        );
    }
}
