//! Desired broker Pods and Jobs of an Instance, and what to do with the ones that exist.
//! Everything here is pure, so the rules are unit-tested without a cluster.
//!
//! Names follow Akri, so users' tooling and habits carry over:
//! - Pod of a shared device: `<node>-<instance>-pod`; of a node-local device: `<instance>-pod`.
//! - Job: `<instance>-<configuration generation>-job` (a new generation gives a new Job). Where that
//!   exceeds the 63 characters a Job name may have (its pods carry it as a label), the
//!   Configuration part of the Instance name is shortened; the 6-hex device hash stays whole.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use blake2::Blake2bVar;
use blake2::digest::{Update, VariableOutput};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    Pod, PodSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde::Serialize;
use verge_crds::Instance;
use verge_crds::naming::{
    CONTROLLER_LABEL_VALUE, LABEL_CONFIGURATION, LABEL_CONTROLLER, LABEL_INSTANCE,
    LABEL_TARGET_NODE, PLACEHOLDER_RESOURCE, instance_resource_name,
};

/// Annotation holding the hash of the Configuration's broker spec a broker was made from; a
/// different hash means the spec changed and the broker is replaced.
pub const ANNOTATION_SPEC_HASH: &str = "verge.dev/broker-spec-hash";
/// Annotation holding the hash of the Instance properties a broker was started with. kubelet
/// keeps a container's Allocate answer (its device env) for the container's whole life, so new
/// properties reach a broker only through a new Pod.
pub const ANNOTATION_PROPERTIES_HASH: &str = "verge.dev/instance-properties-hash";

/// Longest name of an object whose name becomes a label value (Jobs, Services).
pub const MAX_LABEL_NAME_LEN: usize = 63;

/// Bytes of BLAKE2b output used for spec hashes (16 hex characters).
const SPEC_HASH_BYTES: usize = 8;

/// Node label and field used for pinning a broker: the Node object's name.
const NODE_NAME_FIELD: &str = "metadata.name";

/// Hash of any serialisable value: BLAKE2b over its JSON, as hex. k8s-openapi maps are
/// BTreeMaps, so the JSON (and the hash) is stable across processes.
pub fn hash_of<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut hasher = match Blake2bVar::new(SPEC_HASH_BYTES) {
        Ok(h) => h,
        Err(_) => unreachable!("BLAKE2b accepts an {SPEC_HASH_BYTES}-byte output"),
    };
    hasher.update(&json);
    let mut digest = [0u8; SPEC_HASH_BYTES];
    if hasher.finalize_variable(&mut digest).is_err() {
        unreachable!("the buffer has the requested output length");
    }
    hex::encode(digest)
}

/// Hash of what a running broker cannot pick up without a restart: the Instance's
/// brokerProperties (device env injected at Allocate).
pub fn properties_hash(instance: &Instance) -> String {
    hash_of(&instance.spec.broker_properties)
}

/// Name of the broker Pod of `instance` on `node`.
pub fn broker_pod_name(instance: &str, node: &str, shared: bool) -> String {
    let instance = instance.replace('.', "-");
    if shared {
        format!("{node}-{instance}-pod")
    } else {
        format!("{instance}-pod")
    }
}

/// Name of the broker Job of `instance` for Configuration generation `generation`.
pub fn broker_job_name(instance: &str, generation: i64) -> String {
    let instance = instance.replace('.', "-");
    let suffix = format!("-{generation}-job");
    let name = format!("{instance}{suffix}");
    if name.len() <= MAX_LABEL_NAME_LEN {
        return name;
    }
    // Keep the device hash (the unique part) and shorten the Configuration name before it.
    let (config, hash) = instance.rsplit_once('-').unwrap_or(("", instance.as_str()));
    let room = MAX_LABEL_NAME_LEN.saturating_sub(hash.len() + 1 + suffix.len());
    let config: String = config.chars().take(room).collect();
    let config = config.trim_end_matches('-');
    format!("{config}-{hash}{suffix}")
}

/// Labels every broker of `instance` carries (plus the target node for Pods).
pub fn broker_labels(
    instance: &str,
    configuration: &str,
    node: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_CONFIGURATION.to_string(), configuration.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (
            LABEL_CONTROLLER.to_string(),
            CONTROLLER_LABEL_VALUE.to_string(),
        ),
    ]);
    if let Some(node) = node {
        labels.insert(LABEL_TARGET_NODE.to_string(), node.to_string());
    }
    labels
}

/// Owner reference making `instance` the controller of what it owns, so Kubernetes garbage
/// collection removes brokers and Services with the Instance (no finalizers needed).
pub fn instance_owner_reference(instance: &Instance) -> Option<OwnerReference> {
    let mut reference = instance.controller_owner_ref(&())?;
    reference.block_owner_deletion = Some(true);
    Some(reference)
}

/// Replaces `{{PLACEHOLDER}}` resource keys in requests and limits of every container and init
/// container by `resource`, keeping the quantity.
pub fn replace_placeholder(spec: &mut PodSpec, resource: &str) {
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in containers {
        replace_in_container(container, resource);
    }
}

fn replace_in_container(container: &mut Container, resource: &str) {
    let Some(resources) = container.resources.as_mut() else {
        return;
    };
    for map in [resources.requests.as_mut(), resources.limits.as_mut()]
        .into_iter()
        .flatten()
    {
        rename_key(map, PLACEHOLDER_RESOURCE, resource);
    }
}

fn rename_key(map: &mut BTreeMap<String, Quantity>, from: &str, to: &str) {
    if let Some(quantity) = map.remove(from) {
        map.insert(to.to_string(), quantity);
    }
}

/// Adds a required node affinity to exactly `node` (by the Node's name field, which unlike the
/// hostname label cannot differ from the node name). Node selector terms are ORed, so the
/// requirement is added to each of the user's terms rather than as a term of its own.
pub fn pin_to_node(spec: &mut PodSpec, node: &str) {
    let requirement = NodeSelectorRequirement {
        key: NODE_NAME_FIELD.to_string(),
        operator: "In".to_string(),
        values: Some(vec![node.to_string()]),
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let selector = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if selector.node_selector_terms.is_empty() {
        selector
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut selector.node_selector_terms {
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
}

/// The broker Pod of `instance` on `node`, from the Configuration's `pod_spec`.
pub fn desired_pod(instance: &Instance, node: &str, pod_spec: &PodSpec, spec_hash: &str) -> Pod {
    let name = instance.metadata.name.clone().unwrap_or_default();
    let mut spec = pod_spec.clone();
    replace_placeholder(&mut spec, &instance_resource_name(&name));
    pin_to_node(&mut spec, node);
    Pod {
        metadata: ObjectMeta {
            name: Some(broker_pod_name(&name, node, instance.spec.shared)),
            namespace: instance.metadata.namespace.clone(),
            labels: Some(broker_labels(
                &name,
                &instance.spec.configuration_name,
                Some(node),
            )),
            annotations: Some(broker_annotations(instance, spec_hash)),
            owner_references: instance_owner_reference(instance).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The broker Job of `instance` for Configuration generation `generation`.
pub fn desired_job(
    instance: &Instance,
    job_spec: &JobSpec,
    generation: i64,
    spec_hash: &str,
) -> Job {
    let name = instance.metadata.name.clone().unwrap_or_default();
    let labels = broker_labels(&name, &instance.spec.configuration_name, None);
    let mut spec = job_spec.clone();
    if let Some(pod_spec) = spec.template.spec.as_mut() {
        replace_placeholder(pod_spec, &instance_resource_name(&name));
    }
    let template_meta = spec
        .template
        .metadata
        .get_or_insert_with(ObjectMeta::default);
    template_meta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels.clone());
    Job {
        metadata: ObjectMeta {
            name: Some(broker_job_name(&name, generation)),
            namespace: instance.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(broker_annotations(instance, spec_hash)),
            owner_references: instance_owner_reference(instance).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn broker_annotations(instance: &Instance, spec_hash: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANNOTATION_SPEC_HASH.to_string(), spec_hash.to_string()),
        (
            ANNOTATION_PROPERTIES_HASH.to_string(),
            properties_hash(instance),
        ),
    ])
}

/// The nodes that get a broker Pod: at most `capacity` (and one for a node-local device),
/// preferring nodes whose broker already exists so that a full Instance does not shuffle its
/// brokers around, then the remaining nodes in name order.
pub fn broker_nodes(instance: &Instance, nodes_with_brokers: &BTreeSet<String>) -> Vec<String> {
    let limit = if instance.spec.shared {
        usize::try_from(instance.spec.capacity.max(0)).unwrap_or(0)
    } else {
        1
    };
    let nodes: BTreeSet<&String> = instance.spec.nodes.iter().collect();
    let (keep, rest): (Vec<&String>, Vec<&String>) = nodes
        .into_iter()
        .partition(|n| nodes_with_brokers.contains(*n));
    keep.into_iter().chain(rest).take(limit).cloned().collect()
}

/// Why an existing broker is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Its node left the Instance, or the Instance is at capacity without it, or the
    /// Configuration no longer has this kind of broker.
    NotWanted,
    /// The Configuration's broker spec changed.
    SpecChanged,
    /// The Instance's properties changed; the running container still has the old env.
    PropertiesChanged,
    /// It ended (phase Failed or Succeeded) and its backoff has passed.
    Ended { phase: String },
    /// It stayed Pending longer than the pending timeout.
    PendingTooLong { pending_for: Duration },
}

impl Removal {
    /// CamelCase reason for Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Removal::NotWanted => "BrokerNotWanted",
            Removal::SpecChanged => "BrokerSpecChanged",
            Removal::PropertiesChanged => "InstancePropertiesChanged",
            Removal::Ended { .. } => "BrokerEnded",
            Removal::PendingTooLong { .. } => "BrokerPendingTooLong",
        }
    }

    /// Human-readable explanation for Events.
    pub fn message(&self, pod: &str) -> String {
        match self {
            Removal::NotWanted => format!("deleting broker {pod}: no longer wanted"),
            Removal::SpecChanged => format!("replacing broker {pod}: the broker spec changed"),
            Removal::PropertiesChanged => format!(
                "replacing broker {pod}: the Instance's properties changed and a running container keeps the env it started with"
            ),
            Removal::Ended { phase } => format!("replacing broker {pod}: it ended ({phase})"),
            Removal::PendingTooLong { pending_for } => format!(
                "replacing broker {pod}: Pending for {}s",
                pending_for.as_secs()
            ),
        }
    }

    /// Whether the deletion replaces a broker (vs. removing an unwanted one).
    pub fn is_replacement(&self) -> bool {
        !matches!(self, Removal::NotWanted)
    }
}

/// What the Pod reconciler found about one existing broker Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodVerdict {
    /// Leave it alone; it counts as a broker.
    Keep,
    /// Being deleted already; its replacement must wait until the name is free.
    Terminating,
    /// Ended; replace it once its failure backoff has passed.
    Ended { phase: String },
    /// Delete it now.
    Remove(Removal),
}

/// Judges one existing broker Pod against the desired state.
pub fn judge_pod(
    pod: &Pod,
    wanted_names: &BTreeSet<String>,
    spec_hash: &str,
    properties_hash: &str,
    now: Timestamp,
    pending_timeout: Duration,
) -> PodVerdict {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodVerdict::Terminating;
    }
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if !wanted_names.contains(name) {
        return PodVerdict::Remove(Removal::NotWanted);
    }
    let annotation = |key: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    if annotation(ANNOTATION_SPEC_HASH) != Some(spec_hash) {
        return PodVerdict::Remove(Removal::SpecChanged);
    }
    if annotation(ANNOTATION_PROPERTIES_HASH) != Some(properties_hash) {
        return PodVerdict::Remove(Removal::PropertiesChanged);
    }
    let phase = pod_phase(pod);
    match phase {
        "Failed" | "Succeeded" => PodVerdict::Ended {
            phase: phase.to_string(),
        },
        "Pending" => {
            let pending_for = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| duration_between(t.0, now))
                .unwrap_or_default();
            if pending_for > pending_timeout {
                PodVerdict::Remove(Removal::PendingTooLong { pending_for })
            } else {
                PodVerdict::Keep
            }
        }
        _ => PodVerdict::Keep,
    }
}

/// How long a Pending pod has left before it is replaced (for the requeue).
pub fn pending_deadline(pod: &Pod, now: Timestamp, pending_timeout: Duration) -> Option<Duration> {
    if pod_phase(pod) != "Pending" || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    Some(pending_timeout.saturating_sub(duration_between(created, now)))
}

/// Whether a Pod is a broker Pod the controller made directly (its controlling owner is an
/// Instance), as opposed to a Pod of a broker Job, which carries the same labels.
pub fn is_broker_pod(pod: &Pod) -> bool {
    pod.metadata.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.controller == Some(true) && r.kind == Instance::kind(&()))
    })
}

/// The phase of a Pod (`Pending` when the API has not set one yet).
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether a Pod is Running with its Ready condition true.
pub fn pod_ready(pod: &Pod) -> bool {
    pod_phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Non-negative time from `from` to `to`.
pub fn duration_between(from: Timestamp, to: Timestamp) -> Duration {
    let span = to.duration_since(from);
    Duration::try_from(span).unwrap_or_default()
}

/// Capped exponential backoff: `initial * 2^(attempt-1)`, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound.
    pub max: Duration,
}

impl Backoff {
    /// Delay after `attempt` consecutive failures (1 = the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodStatus, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use verge_crds::InstanceSpec;

    pub(crate) fn instance(name: &str, shared: bool, capacity: i32, nodes: &[&str]) -> Instance {
        let mut i = Instance::new(
            name,
            InstanceSpec {
                configuration_name: "cam".into(),
                cdi_name: String::new(),
                capacity,
                broker_properties: BTreeMap::from([("K".to_string(), "v".to_string())]),
                shared,
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                device_usage: BTreeMap::new(),
            },
        );
        i.metadata.namespace = Some("ns".into());
        i.metadata.uid = Some("uid-1".into());
        i
    }

    fn pod_spec() -> PodSpec {
        let placeholder =
            BTreeMap::from([(PLACEHOLDER_RESOURCE.to_string(), Quantity("1".into()))]);
        let container = |name: &str| Container {
            name: name.into(),
            image: Some("broker".into()),
            resources: Some(ResourceRequirements {
                requests: Some(placeholder.clone()),
                limits: Some(placeholder.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        PodSpec {
            containers: vec![container("main")],
            init_containers: Some(vec![container("init")]),
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_akri() {
        assert_eq!(
            broker_pod_name("cam-abc123", "node-a", true),
            "node-a-cam-abc123-pod"
        );
        assert_eq!(
            broker_pod_name("cam-abc123", "node-a", false),
            "cam-abc123-pod"
        );
        assert_eq!(broker_job_name("cam-abc123", 3), "cam-abc123-3-job");
        let long = format!("{}-abc123", "c".repeat(52));
        let job = broker_job_name(&long, 12);
        assert!(job.len() <= MAX_LABEL_NAME_LEN, "{job}");
        assert!(job.ends_with("-abc123-12-job"), "{job}");
    }

    #[test]
    fn pod_has_placeholder_replaced_labels_affinity_and_owner() {
        let i = instance("cam-abc123", true, 2, &["node-a"]);
        let pod = desired_pod(&i, "node-a", &pod_spec(), "h1");
        assert_eq!(pod.metadata.name.as_deref(), Some("node-a-cam-abc123-pod"));
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[LABEL_CONFIGURATION], "cam");
        assert_eq!(labels[LABEL_INSTANCE], "cam-abc123");
        assert_eq!(labels[LABEL_TARGET_NODE], "node-a");
        assert_eq!(labels[LABEL_CONTROLLER], CONTROLLER_LABEL_VALUE);
        let spec = pod.spec.unwrap();
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let r = c.resources.clone().unwrap();
            for map in [r.requests.unwrap(), r.limits.unwrap()] {
                assert_eq!(map.get("akri.sh/cam-abc123"), Some(&Quantity("1".into())));
                assert!(!map.contains_key(PLACEHOLDER_RESOURCE));
            }
        }
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        let field = &terms[0].match_fields.as_ref().unwrap()[0];
        assert_eq!(
            (field.key.as_str(), field.operator.as_str()),
            ("metadata.name", "In")
        );
        assert_eq!(field.values.as_deref(), Some(&["node-a".to_string()][..]));
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Instance", "cam-abc123", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        let annotations = pod.metadata.annotations.unwrap();
        assert_eq!(annotations[ANNOTATION_SPEC_HASH], "h1");
        assert_eq!(annotations[ANNOTATION_PROPERTIES_HASH], properties_hash(&i));
    }

    #[test]
    fn node_pin_is_anded_with_user_terms() {
        let mut spec = pod_spec();
        spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![
                        NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "zone".into(),
                                operator: "In".into(),
                                values: Some(vec!["a".into()]),
                            }]),
                            ..Default::default()
                        },
                        NodeSelectorTerm::default(),
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        pin_to_node(&mut spec, "n1");
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        assert!(terms.iter().all(|t| t.match_fields.as_ref().unwrap()[0].values
            == Some(vec!["n1".to_string()])));
        assert!(terms[0].match_expressions.is_some());
    }

    #[test]
    fn capacity_bounds_the_brokers_and_keeps_existing_ones() {
        let i = instance("cam-abc123", true, 2, &["n3", "n1", "n2"]);
        assert_eq!(broker_nodes(&i, &BTreeSet::new()), vec!["n1", "n2"]);
        let existing = BTreeSet::from(["n3".to_string()]);
        assert_eq!(broker_nodes(&i, &existing), vec!["n3", "n1"]);
        // A node that left the Instance keeps nothing.
        let gone = BTreeSet::from(["n9".to_string()]);
        assert_eq!(broker_nodes(&i, &gone), vec!["n1", "n2"]);
        let local = instance("usb-abc123", false, 5, &["n1"]);
        assert_eq!(broker_nodes(&local, &BTreeSet::new()), vec!["n1"]);
        let none = instance("cam-abc123", true, 3, &[]);
        assert!(broker_nodes(&none, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn job_gets_labels_placeholder_and_generation_name() {
        let i = instance("cam-abc123", true, 1, &["n1"]);
        let job_spec = JobSpec {
            template: k8s_openapi::api::core::v1::PodTemplateSpec {
                metadata: None,
                spec: Some(pod_spec()),
            },
            ..Default::default()
        };
        let job = desired_job(&i, &job_spec, 7, "h");
        assert_eq!(job.metadata.name.as_deref(), Some("cam-abc123-7-job"));
        let spec = job.spec.unwrap();
        let template_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(template_labels[LABEL_INSTANCE], "cam-abc123");
        let requests = spec.template.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap()
            .requests
            .unwrap();
        assert!(requests.contains_key("akri.sh/cam-abc123"));
        assert!(!job.metadata.labels.unwrap().contains_key(LABEL_TARGET_NODE));
    }

    fn existing(name: &str, phase: &str, age: i64, spec_hash: &str, props: &str) -> Pod {
        let now = test_now();
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(now - jiff_seconds(age))),
                annotations: Some(BTreeMap::from([
                    (ANNOTATION_SPEC_HASH.to_string(), spec_hash.to_string()),
                    (ANNOTATION_PROPERTIES_HASH.to_string(), props.to_string()),
                ])),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn test_now() -> Timestamp {
        // A fixed instant, so ages computed by the helper and the test agree exactly.
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn jiff_seconds(s: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(s)
    }

    #[test]
    fn pods_are_judged_by_name_hashes_phase_and_age() {
        let wanted = BTreeSet::from(["p".to_string()]);
        let now = test_now();
        let timeout = Duration::from_secs(60);
        let judge = |pod: &Pod| judge_pod(pod, &wanted, "s", "p1", now, timeout);
        assert_eq!(
            judge(&existing("p", "Running", 5, "s", "p1")),
            PodVerdict::Keep
        );
        assert_eq!(
            judge(&existing("other", "Running", 5, "s", "p1")),
            PodVerdict::Remove(Removal::NotWanted)
        );
        assert_eq!(
            judge(&existing("p", "Running", 5, "old", "p1")),
            PodVerdict::Remove(Removal::SpecChanged)
        );
        assert_eq!(
            judge(&existing("p", "Running", 5, "s", "p0")),
            PodVerdict::Remove(Removal::PropertiesChanged)
        );
        assert_eq!(
            judge(&existing("p", "Failed", 5, "s", "p1")),
            PodVerdict::Ended {
                phase: "Failed".into()
            }
        );
        assert_eq!(
            judge(&existing("p", "Pending", 30, "s", "p1")),
            PodVerdict::Keep
        );
        assert!(matches!(
            judge(&existing("p", "Pending", 90, "s", "p1")),
            PodVerdict::Remove(Removal::PendingTooLong { .. })
        ));
        let mut terminating = existing("p", "Running", 5, "s", "p1");
        terminating.metadata.deletion_timestamp = Some(Time(now));
        assert_eq!(judge(&terminating), PodVerdict::Terminating);
        let left =
            pending_deadline(&existing("p", "Pending", 30, "s", "p1"), now, timeout).unwrap();
        assert_eq!(left, Duration::from_secs(30));
    }

    #[test]
    fn job_pods_are_not_broker_pods() {
        let i = instance("cam-abc123", true, 1, &["n1"]);
        let pod = desired_pod(&i, "n1", &pod_spec(), "h");
        assert!(is_broker_pod(&pod));
        let mut job_pod = pod.clone();
        job_pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: "cam-abc123-1-job".into(),
            uid: "j".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        assert!(!is_broker_pod(&job_pod));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(60),
        };
        assert_eq!(b.delay(1), Duration::from_secs(5));
        assert_eq!(b.delay(2), Duration::from_secs(10));
        assert_eq!(b.delay(4), Duration::from_secs(40));
        assert_eq!(b.delay(5), Duration::from_secs(60));
        assert_eq!(b.delay(500), Duration::from_secs(60));
    }

    #[test]
    fn hashes_are_stable_and_sensitive() {
        let a = instance("cam-abc123", true, 1, &["n1"]);
        let mut b = a.clone();
        assert_eq!(properties_hash(&a), properties_hash(&b));
        b.spec.broker_properties.insert("K".into(), "w".into());
        assert_ne!(properties_hash(&a), properties_hash(&b));
        assert_eq!(hash_of(&pod_spec()).len(), 16);
    }
}
