//! Writes Instances with server-side apply (see docs/field-ownership.md).
//!
//! Writes are coalesced per Instance: only the newest desired state is
//! applied, and a failed write is retried with capped exponential backoff, so
//! an API-server outage delays writes without losing any.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use verge_crds::{Instance, naming};

use crate::metrics::Metrics;

/// Annotation holding the handler's device id, so a name collision between two
/// devices is detected instead of merging them.
pub const DEVICE_ID_ANNOTATION: &str = "akri.sh/device-id";

/// `(namespace, name)` of an Instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    /// Namespace (the Configuration's).
    pub namespace: String,
    /// Instance name.
    pub name: String,
}

/// What this node wants an Instance to look like.
#[derive(Clone, Debug, PartialEq)]
pub enum DesiredInstance {
    /// The device is here.
    Present {
        /// Configuration name.
        configuration: String,
        /// Configuration uid.
        configuration_uid: String,
        /// Handler's device id.
        device_id: String,
        /// Instance hash.
        hash: String,
        /// Slots.
        capacity: usize,
        /// Device properties ∪ Configuration brokerProperties.
        broker_properties: BTreeMap<String, String>,
        /// Shared device.
        shared: bool,
        /// Slots this node holds: slot id → usage value.
        usage: BTreeMap<String, String>,
        /// When the handler first reported the device, for a new Instance
        /// (feeds the discovery-to-Instance latency histogram once written).
        discovered_at: Option<Instant>,
    },
    /// The device is gone from this node.
    Leave,
}

/// Messages to the writer; ordered with the state's decisions.
#[derive(Debug)]
pub enum WriterMsg {
    /// Newest desired state.
    Desired(InstanceKey, DesiredInstance),
    /// Answer once everything desired so far for this Instance is written.
    Flush(InstanceKey, oneshot::Sender<Result<(), WriteError>>),
    /// The Instance was deleted by someone else: what was last written is no
    /// longer there, so the next write must not be skipped as unchanged.
    Forget(InstanceKey),
}

/// Why a write failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WriteError {
    /// Another node holds a slot this node tried to claim.
    #[error("slot held by another node: {0}")]
    Conflict(String),
    /// The API server refused or was unreachable.
    #[error("API error: {0}")]
    Api(String),
}

/// Events the writer reports back to the state.
#[derive(Debug)]
pub enum WriterEvent {
    /// A claim conflicted; drop claims made at or after `since`.
    Conflict(InstanceKey, Instant),
}

/// Field manager of the fields an agent copies from the Configuration and handler.
pub fn device_manager(node: &str) -> String {
    format!("verge-agent/{node}/device")
}

/// Field manager of an agent's own `nodes` item and slot claims.
pub fn usage_manager(node: &str) -> String {
    format!("verge-agent/{node}")
}

/// The forced body: fields copied from the Configuration and the handler.
pub fn device_body(key: &InstanceKey, d: &DesiredInstance) -> Option<Value> {
    let DesiredInstance::Present {
        configuration,
        configuration_uid,
        device_id,
        hash,
        capacity,
        broker_properties,
        shared,
        ..
    } = d
    else {
        return None;
    };
    Some(json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Instance",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "annotations": { DEVICE_ID_ANNOTATION: device_id },
            "ownerReferences": [{
                "apiVersion": "akri.sh/v0",
                "kind": "Configuration",
                "name": configuration,
                "uid": configuration_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "configurationName": configuration,
            "cdiName": naming::cdi_name(configuration, hash),
            "capacity": capacity,
            "brokerProperties": broker_properties,
            "shared": shared,
        },
    }))
}

/// The unforced body: this node's `nodes` item and the slots it holds.
/// `None` for Leave: the node releases everything by applying nothing.
pub fn usage_body(key: &InstanceKey, node: &str, d: &DesiredInstance) -> Value {
    match d {
        DesiredInstance::Present { usage, .. } => json!({
            "apiVersion": "akri.sh/v0",
            "kind": "Instance",
            "metadata": { "name": key.name, "namespace": key.namespace },
            "spec": { "nodes": [node], "deviceUsage": usage },
        }),
        DesiredInstance::Leave => json!({
            "apiVersion": "akri.sh/v0",
            "kind": "Instance",
            "metadata": { "name": key.name, "namespace": key.namespace },
        }),
    }
}

struct Pending {
    desired: DesiredInstance,
    /// Bumped on every new desired state, so a write that finishes knows
    /// whether something newer arrived meanwhile.
    version: u64,
    waiters: Vec<oneshot::Sender<Result<(), WriteError>>>,
    attempts: u32,
    not_before: Instant,
    in_flight: bool,
}

/// Writer settings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// This node.
    pub node: String,
    /// First retry delay.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Writes in flight at once.
    pub concurrency: usize,
}

/// A finished write: its key, the desired version it wrote, when it started, and (on success)
/// whether the device manager owns the device fields now.
type WriteFuture =
    Pin<Box<dyn Future<Output = (InstanceKey, u64, Instant, Result<bool, WriteError>)> + Send>>;

/// Runs the writer until the message channel closes.
pub async fn run_writer(
    client: Client,
    config: WriterConfig,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    events: mpsc::UnboundedSender<WriterEvent>,
    metrics: Arc<Metrics>,
) {
    let mut pending: HashMap<InstanceKey, Pending> = HashMap::new();
    // Last bodies that succeeded, to skip identical writes.
    let mut applied: HashMap<InstanceKey, Written> = HashMap::new();
    let mut in_flight: FuturesUnordered<WriteFuture> = FuturesUnordered::new();
    let mut version = 0u64;
    loop {
        // Start every write that is due, up to the concurrency limit.
        let now = Instant::now();
        let mut due: Vec<InstanceKey> = pending
            .iter()
            .filter(|(_, p)| !p.in_flight && p.not_before <= now)
            .map(|(k, _)| k.clone())
            .collect();
        due.sort();
        for key in due {
            if in_flight.len() >= config.concurrency.max(1) {
                break;
            }
            let Some(p) = pending.get_mut(&key) else {
                continue;
            };
            p.in_flight = true;
            let previous = applied.get(&key).cloned();
            in_flight.push(Box::pin(write_one(
                client.clone(),
                config.node.clone(),
                key.clone(),
                p.desired.clone(),
                p.version,
                previous,
                metrics.clone(),
            )));
        }
        // At the concurrency limit nothing can start before a write finishes, so no timer: a due
        // write's timer would fire at once and spin this loop (it did: 180 % CPU at 1,000 devices).
        let next_due = if in_flight.len() >= config.concurrency.max(1) {
            None
        } else {
            pending
                .values()
                .filter(|p| !p.in_flight)
                .map(|p| p.not_before)
                .min()
        };
        let sleep = async {
            match next_due {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(WriterMsg::Desired(key, desired)) => {
                    version += 1;
                    let p = pending.entry(key).or_insert_with(|| Pending {
                        desired: desired.clone(),
                        version,
                        waiters: Vec::new(),
                        attempts: 0,
                        not_before: Instant::now(),
                        in_flight: false,
                    });
                    p.desired = desired;
                    p.version = version;
                    p.not_before = p.not_before.min(Instant::now());
                }
                Some(WriterMsg::Forget(key)) => {
                    applied.remove(&key);
                    // A write in flight may have landed on the object that is now gone: its
                    // success must not be recorded as what the server holds, and it is redone.
                    if let Some(p) = pending.get_mut(&key)
                        && p.in_flight
                    {
                        version += 1;
                        p.version = version;
                    }
                }
                Some(WriterMsg::Flush(key, tx)) => match pending.get_mut(&key) {
                    Some(p) => p.waiters.push(tx),
                    None => { let _ = tx.send(Ok(())); }
                },
            },
            Some((key, written_version, started, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let Some(p) = pending.get_mut(&key) else { continue };
                p.in_flight = false;
                match result {
                    Ok(device_manager_owns) => {
                        if let DesiredInstance::Present { discovered_at: Some(t), .. } = &p.desired
                            && p.version == written_version
                        {
                            metrics.discovery_to_instance.observe(t.elapsed().as_secs_f64());
                        }
                        if let Some(written) = written_for(&key, &config.node, &p.desired, device_manager_owns)
                            && p.version == written_version {
                            applied.insert(key.clone(), written);
                        }
                        if matches!(p.desired, DesiredInstance::Leave) {
                            applied.remove(&key);
                        }
                        if p.version == written_version {
                            for w in p.waiters.drain(..) {
                                let _ = w.send(Ok(()));
                            }
                            pending.remove(&key);
                        } else {
                            p.attempts = 0;
                            p.not_before = Instant::now();
                        }
                    }
                    Err(WriteError::Conflict(m)) => {
                        for w in p.waiters.drain(..) {
                            let _ = w.send(Err(WriteError::Conflict(m.clone())));
                        }
                        // The state drops the conflicting claims and sends a
                        // new desired state; until then, do not retry this one.
                        p.not_before = Instant::now() + config.backoff_initial;
                        let _ = events.send(WriterEvent::Conflict(key.clone(), started));
                    }
                    Err(WriteError::Api(m)) => {
                        // The object may have changed or vanished under us (a
                        // 422 when it was deleted): write it whole next time.
                        applied.remove(&key);
                        p.attempts = p.attempts.saturating_add(1);
                        let backoff = backoff(config.backoff_initial, config.backoff_max, p.attempts);
                        tracing::warn!(instance = %key.name, namespace = %key.namespace, error = %m, retry_in = ?backoff, "Instance write failed");
                        p.not_before = Instant::now() + backoff;
                    }
                }
            },
            _ = sleep => {}
        }
    }
}

/// What the last successful write of an Instance left on the server.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    device: Option<Value>,
    usage: Value,
    /// The device fields are also owned by [`device_manager`]. Until they are, only the
    /// unforced creating apply owns them, so the next apply without them must first hand
    /// them over (see [`apply_present`]).
    device_manager_owns: bool,
}

fn written_for(
    key: &InstanceKey,
    node: &str,
    d: &DesiredInstance,
    device_manager_owns: bool,
) -> Option<Written> {
    matches!(d, DesiredInstance::Present { .. }).then(|| Written {
        device: device_body(key, d),
        usage: usage_body(key, node, d),
        device_manager_owns,
    })
}

/// `initial · 2^(attempts-1)`, capped.
pub fn backoff(initial: Duration, max: Duration, attempts: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

async fn write_one(
    client: Client,
    node: String,
    key: InstanceKey,
    desired: DesiredInstance,
    version: u64,
    previous: Option<Written>,
    metrics: Arc<Metrics>,
) -> (InstanceKey, u64, Instant, Result<bool, WriteError>) {
    let started = Instant::now();
    let api: Api<Instance> = Api::namespaced(client, &key.namespace);
    let result = match &desired {
        DesiredInstance::Present { .. } => {
            apply_present(&api, &node, &key, &desired, previous.as_ref(), &metrics).await
        }
        DesiredInstance::Leave => leave(&api, &node, &key, &metrics).await.map(|()| false),
    };
    (key, version, started, result)
}

fn api_error(metrics: &Metrics, operation: &str, e: &kube::Error) -> WriteError {
    metrics.api_error(operation);
    WriteError::Api(e.to_string())
}

/// Applies a present device. Returns whether [`device_manager`] owns the device fields after it.
///
/// The first write applies the whole object under this node's unforced [`usage_manager`], so
/// the Instance never appears without its node, and costs one request. The forced device-manager
/// apply that lets later usage applies leave the device fields out is deferred to the first
/// write that changes anything: a device that nobody allocates and whose Configuration never
/// changes is written once.
async fn apply_present(
    api: &Api<Instance>,
    node: &str,
    key: &InstanceKey,
    desired: &DesiredInstance,
    previous: Option<&Written>,
    metrics: &Metrics,
) -> Result<bool, WriteError> {
    let Some(device) = device_body(key, desired) else {
        return Ok(previous.is_some_and(|p| p.device_manager_owns));
    };
    let usage = usage_body(key, node, desired);
    match previous {
        None => {
            let mut whole = device.clone();
            if let (Some(spec), Some(extra)) = (
                whole.get_mut("spec").and_then(Value::as_object_mut),
                usage.get("spec").and_then(Value::as_object),
            ) {
                spec.extend(extra.clone());
            }
            match api
                .patch(
                    &key.name,
                    &PatchParams::apply(&usage_manager(node)),
                    &Patch::Apply(&whole),
                )
                .await
            {
                Ok(_) => return Ok(false),
                // Another node (or this one before a restart) wrote different device values:
                // force ours under the device manager, then apply the usage alone.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(api_error(metrics, "apply_instance", &e)),
            }
        }
        Some(p) if p.device.as_ref() == Some(&device) && p.usage == usage => {
            return Ok(p.device_manager_owns);
        }
        Some(_) => {}
    }
    let device_changed = previous.is_none_or(|p| p.device.as_ref() != Some(&device));
    if device_changed || previous.is_some_and(|p| !p.device_manager_owns) {
        let params = PatchParams::apply(&device_manager(node)).force();
        api.patch(&key.name, &params, &Patch::Apply(&device))
            .await
            .map_err(|e| api_error(metrics, "apply_instance", &e))?;
    }
    if previous.map(|p| &p.usage) != Some(&usage) {
        let params = PatchParams::apply(&usage_manager(node));
        match api.patch(&key.name, &params, &Patch::Apply(&usage)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Err(WriteError::Conflict(s.message));
            }
            Err(e) => return Err(api_error(metrics, "apply_instance", &e)),
        }
    }
    Ok(true)
}

/// Attempts at removing this node when the Instance keeps changing under us.
const LEAVE_ATTEMPTS: usize = 5;

async fn leave(
    api: &Api<Instance>,
    node: &str,
    key: &InstanceKey,
    metrics: &Metrics,
) -> Result<(), WriteError> {
    for _ in 0..LEAVE_ATTEMPTS {
        // An apply would create a missing Instance, so look first.
        let Some(current) = api
            .get_opt(&key.name)
            .await
            .map_err(|e| api_error(metrics, "get_instance", &e))?
        else {
            return Ok(());
        };
        let others = current.spec.nodes.iter().any(|n| n != node);
        let target = if others {
            // Every other node listed owns the copied fields too (its first write applied
            // them), so dropping this node's fields keeps them.
            let params = PatchParams::apply(&usage_manager(node));
            match api
                .patch(
                    &key.name,
                    &params,
                    &Patch::Apply(usage_body(key, node, &DesiredInstance::Leave)),
                )
                .await
            {
                Ok(after) if !after.spec.nodes.is_empty() => return Ok(()),
                Ok(after) => after,
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(api_error(metrics, "apply_instance", &e)),
            }
        } else {
            // The last node: delete rather than release, because the release would also drop
            // the copied fields this node alone may own (a required field gone is a 422).
            current
        };
        // Preconditions: a node that joined meanwhile keeps the Instance.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: target.uid(),
                resource_version: target.resource_version(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&key.name, &dp).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            // Changed meanwhile (a status write, a node joining): look again.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_error(metrics, "delete_instance", &e)),
        }
    }
    Err(WriteError::Api(format!(
        "Instance {} changed during {LEAVE_ATTEMPTS} attempts to leave it",
        key.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(5);
        assert_eq!(backoff(i, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(i, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(i, m, 5), Duration::from_millis(1600));
        assert_eq!(backoff(i, m, 30), m);
        assert_eq!(backoff(i, m, u32::MAX), m);
    }

    #[test]
    fn bodies_split_ownership() {
        let key = InstanceKey {
            namespace: "ns".into(),
            name: "conf-abc123".into(),
        };
        let d = DesiredInstance::Present {
            configuration: "conf".into(),
            configuration_uid: "u".into(),
            device_id: "dev".into(),
            hash: "abc123".into(),
            capacity: 2,
            broker_properties: [("K".to_string(), "V".to_string())].into(),
            shared: true,
            usage: [("conf-abc123-0".to_string(), "n1".to_string())].into(),
            discovered_at: None,
        };
        let device = device_body(&key, &d).expect("present");
        assert!(device["spec"].get("nodes").is_none());
        assert!(device["spec"].get("deviceUsage").is_none());
        assert_eq!(device["spec"]["cdiName"], "akri.sh/conf=abc123");
        assert_eq!(device["metadata"]["ownerReferences"][0]["uid"], "u");
        let usage = usage_body(&key, "n1", &d);
        assert_eq!(usage["spec"]["nodes"], json!(["n1"]));
        assert_eq!(usage["spec"]["deviceUsage"]["conf-abc123-0"], "n1");
        assert!(usage["spec"].get("capacity").is_none());
        let leave = usage_body(&key, "n1", &DesiredInstance::Leave);
        assert!(leave.get("spec").is_none());
        assert_eq!(device_manager("n1"), "verge-agent/n1/device");
        assert_eq!(usage_manager("n1"), "verge-agent/n1");
    }
}
