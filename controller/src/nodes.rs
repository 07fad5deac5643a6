//! Node loss: a node that is gone, or not Ready, for longer than the configured delay leaves
//! every Instance, and its brokers are deleted.
//!
//! An Instance whose only node is the lost one is deleted (with uid and resourceVersion
//! preconditions). Otherwise the node is removed by a server-side apply of an *empty* object under that
//! node's agent field manager (`verge-agent/<node>`, not forced). Server-side apply then drops
//! exactly the fields that manager owned alone (its `spec.nodes` item and the `deviceUsage`
//! slots it held), and the controller takes ownership of nothing. When the node returns, its
//! agent applies under the same manager again and nothing conflicts (Akri's unattributed merge
//! patch here is what broke its agent's applies, Akri #801).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};
use verge_crds::Instance;
use verge_crds::naming::{CONTROLLER_LABEL_VALUE, LABEL_CONTROLLER, LABEL_TARGET_NODE};

use crate::brokers::duration_between;
use crate::context::Context;
use crate::error::{Error, is_not_found};

/// Field manager of the agent on `node` for its `nodes` item and slot claims.
pub fn agent_field_manager(node: &str) -> String {
    format!("verge-agent/{node}")
}

/// The empty apply body that releases everything a manager owns on Instance `name`.
pub fn release_body(name: &str) -> Value {
    json!({
        "apiVersion": Instance::api_version(&()),
        "kind": Instance::kind(&()),
        "metadata": {"name": name},
    })
}

/// Since when a node has been unusable, if it is: the Ready condition's last transition when
/// Ready is not True. `None` for a Ready node.
pub fn unready_since(node: &Node) -> Option<Timestamp> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => Some(
            c.last_transition_time
                .as_ref()
                .map_or_else(Timestamp::now, |t| t.0),
        ),
        // A node that never reported is treated as unready since it was created.
        None => Some(
            node.metadata
                .creation_timestamp
                .as_ref()
                .map_or_else(Timestamp::now, |t| t.0),
        ),
    }
}

/// Remembers when referenced nodes were first seen missing, and since when this leader has
/// been watching.
#[derive(Debug)]
pub struct NodeTracker {
    missing_since: HashMap<String, Timestamp>,
    /// Start of this leadership term. Nothing counts as lost for longer than the leader has
    /// watched: after a control-plane outage every node may look unready since long ago while
    /// kubelets are only about to report again, and acting on that would empty every Instance.
    watching_since: Timestamp,
}

impl NodeTracker {
    /// A tracker that starts watching at `now`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            missing_since: HashMap::new(),
            watching_since: now,
        }
    }

    /// The referenced nodes that have been gone or unready for longer than `delay`.
    pub fn lost_nodes(
        &mut self,
        referenced: &BTreeSet<String>,
        nodes: &HashMap<String, Node>,
        now: Timestamp,
        delay: std::time::Duration,
    ) -> Vec<String> {
        self.missing_since
            .retain(|n, _| referenced.contains(n) && !nodes.contains_key(n));
        let mut lost = Vec::new();
        for name in referenced {
            let since = match nodes.get(name) {
                Some(node) => unready_since(node),
                None => Some(*self.missing_since.entry(name.clone()).or_insert(now)),
            };
            if let Some(since) = since
                && duration_between(since.max(self.watching_since), now) > delay
            {
                lost.push(name.clone());
            }
        }
        lost
    }
}

/// Checks nodes every `--node-check-interval` until the process ends.
pub async fn run(ctx: Arc<Context>) {
    let mut tracker = NodeTracker::new(Timestamp::now());
    let mut interval = tokio::time::interval(ctx.args.node_check_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(error) = check(&ctx, &mut tracker).await {
            warn!(%error, "node check failed");
        }
    }
}

fn instances_api(ctx: &Context) -> Api<Instance> {
    match &ctx.args.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

async fn check(ctx: &Context, tracker: &mut NodeTracker) -> Result<(), Error> {
    let instances = instances_api(ctx).list(&ListParams::default()).await?.items;
    let referenced: BTreeSet<String> = instances
        .iter()
        .flat_map(|i| i.spec.nodes.iter().cloned())
        .collect();
    let nodes: HashMap<String, Node> = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect();
    // Every known node is judged, not only referenced ones, so that a lost node an agent lists
    // again gets no broker while it stays lost.
    let candidates: BTreeSet<String> = referenced.iter().chain(nodes.keys()).cloned().collect();
    let lost = tracker.lost_nodes(
        &candidates,
        &nodes,
        Timestamp::now(),
        ctx.args.node_loss_delay,
    );
    ctx.set_lost_nodes(lost.iter().cloned().collect());
    for node in lost.iter().filter(|n| referenced.contains(*n)) {
        remove_node(ctx, node, &instances).await?;
    }
    Ok(())
}

async fn remove_node(ctx: &Context, node: &str, instances: &[Instance]) -> Result<(), Error> {
    info!(node, "node lost; removing it from its Instances");
    let manager = agent_field_manager(node);
    let mut touched_namespaces = BTreeSet::new();
    for instance in instances
        .iter()
        .filter(|i| i.spec.nodes.iter().any(|n| n == node))
    {
        let Some(namespace) = instance.namespace() else {
            continue;
        };
        let name = instance.name_any();
        let api: Api<Instance> = Api::namespaced(ctx.client.clone(), &namespace);
        touched_namespaces.insert(namespace.clone());
        // The lost node is the only one: delete the Instance as listed rather than release,
        // because the release would also drop the copied fields that node's manager may own
        // alone (an agent's first write applies them under it), which the API refuses (422).
        let sole = instance.spec.nodes.iter().all(|n| n == node);
        let updated = if sole {
            instance.clone()
        } else {
            // Not forced: releasing fields never conflicts, and a forced apply could take fields.
            match api
                .patch(
                    &name,
                    &PatchParams::apply(&manager),
                    &Patch::Apply(release_body(&name)),
                )
                .await
            {
                Ok(updated) => updated,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(Error::Kube(e)),
            }
        };
        ctx.metrics.node_removals.inc();
        if !sole && updated.spec.nodes.iter().any(|n| n == node) {
            // Another manager also owns this item (e.g. an old unattributed patch): say so
            // rather than steal it.
            ctx.event(
                &instance.object_ref(&()),
                EventType::Warning,
                "NodeNotReleased",
                "RemoveNode",
                format!(
                    "node {node} is lost but stays in spec.nodes: a field manager other than {manager} owns it"
                ),
            )
            .await;
            continue;
        }
        ctx.event(
            &instance.object_ref(&()),
            EventType::Normal,
            "NodeLost",
            "RemoveNode",
            format!(
                "node {node} was gone or not Ready for over {}s; removed from the Instance",
                ctx.args.node_loss_delay.as_secs()
            ),
        )
        .await;
        if sole || updated.spec.nodes.is_empty() {
            // The resourceVersion precondition keeps an agent that just re-added a node from
            // losing its Instance (a 409 here is retried at the next node check).
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: updated.metadata.resource_version.clone(),
                    uid: updated.metadata.uid.clone(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => info!(instance = name, "deleted Instance left without nodes"),
                Err(e) if is_not_found(&e) => {}
                Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 409) => {
                    info!(instance = name, "Instance changed meanwhile; kept");
                }
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    // The node cannot confirm a graceful deletion, so its brokers are removed at once; a kubelet
    // that comes back kills containers whose Pods no longer exist.
    let selector = ListParams::default().labels(&format!(
        "{LABEL_TARGET_NODE}={node},{LABEL_CONTROLLER}={CONTROLLER_LABEL_VALUE}"
    ));
    for namespace in touched_namespaces {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        for pod in pods.list(&selector).await?.items {
            let name = pod.name_any();
            match pods
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await
            {
                Ok(_) => info!(pod = name, node, "deleted broker of lost node"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::SignedDuration;
    use std::time::Duration;

    fn node(name: &str, ready: &str, since: Timestamp) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                last_transition_time: Some(Time(since)),
                ..Default::default()
            }]),
            ..Default::default()
        });
        n
    }

    #[test]
    fn nothing_is_lost_before_the_leader_watched_for_the_delay() {
        let now = Timestamp::now();
        let delay = Duration::from_secs(60);
        let long_ago = now - SignedDuration::from_secs(3600);
        let nodes: HashMap<String, Node> = [node("n1", "Unknown", long_ago)]
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let referenced = BTreeSet::from(["n1".to_string()]);
        let mut tracker = NodeTracker::new(now);
        assert!(
            tracker
                .lost_nodes(&referenced, &nodes, now, delay)
                .is_empty()
        );
        let later = now + SignedDuration::from_secs(61);
        assert_eq!(
            tracker.lost_nodes(&referenced, &nodes, later, delay),
            vec!["n1"]
        );
    }

    #[test]
    fn release_body_is_empty_apart_from_identity() {
        let body = release_body("cam-abc123");
        assert_eq!(
            body,
            json!({"apiVersion": "akri.sh/v0", "kind": "Instance", "metadata": {"name": "cam-abc123"}})
        );
        assert_eq!(agent_field_manager("node-a"), "verge-agent/node-a");
    }

    #[test]
    fn nodes_are_lost_after_the_delay() {
        let now = Timestamp::now();
        let ago = |s: i64| now - SignedDuration::from_secs(s);
        let delay = Duration::from_secs(60);
        let nodes: HashMap<String, Node> = [
            node("ready", "True", ago(1000)),
            node("flapping", "Unknown", ago(30)),
            node("down", "Unknown", ago(61)),
            node("notready", "False", ago(120)),
        ]
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect();
        let referenced: BTreeSet<String> = ["ready", "flapping", "down", "notready", "deleted"]
            .into_iter()
            .map(String::from)
            .collect();
        let mut tracker = NodeTracker::new(ago(10_000));
        assert_eq!(
            tracker.lost_nodes(&referenced, &nodes, now, delay),
            vec!["down", "notready"]
        );
        // A deleted node counts from when it was first seen missing.
        let later = now + SignedDuration::from_secs(61);
        let lost = tracker.lost_nodes(&referenced, &nodes, later, delay);
        assert!(lost.contains(&"deleted".to_string()), "{lost:?}");
        assert!(lost.contains(&"flapping".to_string()), "{lost:?}");
        assert!(!lost.contains(&"ready".to_string()));
        // A node no longer referenced is forgotten.
        let mut only_ready = BTreeSet::new();
        only_ready.insert("ready".to_string());
        assert!(
            tracker
                .lost_nodes(&only_ready, &nodes, later, delay)
                .is_empty()
        );
        assert!(tracker.missing_since.is_empty());
    }
}
