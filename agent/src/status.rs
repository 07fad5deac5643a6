//! This node's entry in each Configuration's `status.nodes[]`, plus Events.
//! Written with server-side apply under `verge-agent/<node>`, so the entry
//! belongs to this node alone (list-map keyed by node).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;
use tokio::sync::mpsc;
use verge_crds::Configuration;
use verge_crds::status::{Condition, condition_status, set_condition};
use verge_device_plugin_proto::v0::Diagnostic;

use crate::instances::usage_manager;
use crate::metrics::Metrics;
use crate::state::{AgentState, ConfigKey};

/// A reason and message for a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason.
    pub reason: String,
    /// Text for users.
    pub message: String,
}

impl Problem {
    /// A problem.
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// Discovery health of one Configuration on this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiscoveryStatus {
    /// Registered endpoints of its handler.
    pub endpoints: usize,
    /// Why discovery is not working, if it is not.
    pub problem: Option<Problem>,
    /// Handler diagnostics (the `v0` extension).
    pub diagnostics: Vec<Diagnostic>,
}

/// Discovery status of every Configuration, shared by the discovery tasks.
pub struct StatusBoard {
    map: Mutex<HashMap<ConfigKey, DiscoveryStatus>>,
    poke: mpsc::UnboundedSender<ConfigKey>,
}

impl StatusBoard {
    /// A board that pokes `poke` on every change.
    pub fn new(poke: mpsc::UnboundedSender<ConfigKey>) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            poke,
        })
    }

    /// Changes a Configuration's status.
    pub fn set(&self, key: &ConfigKey, f: impl FnOnce(&mut DiscoveryStatus)) {
        let changed = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map.entry(key.clone()).or_default();
            let before = entry.clone();
            f(entry);
            *entry != before
        };
        if changed {
            let _ = self.poke.send(key.clone());
        }
    }

    /// A Configuration's status.
    pub fn get(&self, key: &ConfigKey) -> DiscoveryStatus {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets a deleted Configuration.
    pub fn remove(&self, key: &ConfigKey) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Condition types of a node entry.
pub mod condition_type {
    /// Discovery is running and the handler answers.
    pub const DISCOVERING: &str = "Discovering";
    /// The handler sent diagnostics.
    pub const HANDLER_DIAGNOSTICS: &str = "HandlerDiagnostics";
    /// Names collide (Configuration names across namespaces, device hashes).
    pub const NAME_CONFLICT: &str = "NameConflict";
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Computes this node's conditions for a Configuration, keeping transition times.
pub fn conditions(
    previous: &[Condition],
    devices: usize,
    blocked_or_conflicts: &[String],
    status: &DiscoveryStatus,
    generation: Option<i64>,
) -> Vec<Condition> {
    let t = now();
    let mut out: Vec<Condition> = previous.to_vec();
    let mut discovering = match &status.problem {
        Some(p) => Condition::new(
            condition_type::DISCOVERING,
            condition_status::FALSE,
            &p.reason,
            &p.message,
            &t,
        ),
        None => Condition::new(
            condition_type::DISCOVERING,
            condition_status::TRUE,
            "HandlerConnected",
            format!(
                "{devices} device(s) from {} handler endpoint(s)",
                status.endpoints
            ),
            &t,
        ),
    };
    discovering.observed_generation = generation;
    set_condition(&mut out, discovering);
    if status.diagnostics.is_empty() {
        out.retain(|c| c.type_ != condition_type::HANDLER_DIAGNOSTICS);
    } else {
        let message = status
            .diagnostics
            .iter()
            .map(|d| {
                if d.subject.is_empty() {
                    format!("{}: {}", d.severity, d.message)
                } else {
                    format!("{} {}: {}", d.severity, d.subject, d.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        set_condition(
            &mut out,
            Condition::new(
                condition_type::HANDLER_DIAGNOSTICS,
                condition_status::TRUE,
                "HandlerDiagnostics",
                message,
                &t,
            ),
        );
    }
    if blocked_or_conflicts.is_empty() {
        out.retain(|c| c.type_ != condition_type::NAME_CONFLICT);
    } else {
        set_condition(
            &mut out,
            Condition::new(
                condition_type::NAME_CONFLICT,
                condition_status::TRUE,
                "NameConflict",
                blocked_or_conflicts.join("; "),
                &t,
            ),
        );
    }
    out
}

/// What was last announced as Events: problem, diagnostics, conflicts.
type Announced = (Option<Problem>, Vec<Diagnostic>, Vec<String>);

/// Writes node entries, at most once per `interval` per Configuration.
pub async fn run_writer(
    client: Client,
    node: String,
    state: Arc<Mutex<AgentState>>,
    board: Arc<StatusBoard>,
    mut rx: mpsc::UnboundedReceiver<ConfigKey>,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "verge-agent".into(),
            instance: Some(node.clone()),
        },
    );
    let mut written: HashMap<ConfigKey, serde_json::Value> = HashMap::new();
    let mut conds: HashMap<ConfigKey, Vec<Condition>> = HashMap::new();
    let mut announced: HashMap<ConfigKey, Announced> = HashMap::new();
    let mut dirty: BTreeSet<ConfigKey> = BTreeSet::new();
    loop {
        match rx.recv().await {
            None => return,
            Some(k) => {
                dirty.insert(k);
            }
        }
        // Coalesce a burst (a thousand devices arriving at once is one write).
        tokio::time::sleep(interval).await;
        while let Ok(k) = rx.try_recv() {
            dirty.insert(k);
        }
        let mut failed = BTreeSet::new();
        for key in std::mem::take(&mut dirty) {
            let summary = match state.lock() {
                Ok(s) => s.node_summary(&key),
                Err(_) => return,
            };
            let Some(summary) = summary else {
                written.remove(&key);
                conds.remove(&key);
                announced.remove(&key);
                continue;
            };
            let ds = board.get(&key);
            let previous = conds.get(&key).cloned().unwrap_or_default();
            let c = conditions(
                &previous,
                summary.devices,
                &summary.conflicts,
                &ds,
                summary.generation,
            );
            let entry = json!({
                "node": node,
                "devices": summary.devices,
                "handlerEndpoints": ds.endpoints,
                "observedGeneration": summary.generation,
                "conditions": c,
            });
            let comparable = json!([
                summary.devices,
                ds.endpoints,
                summary.generation,
                strip_times(&c)
            ]);
            if written.get(&key) != Some(&comparable) {
                let body = json!({
                    "apiVersion": "akri.sh/v0",
                    "kind": "Configuration",
                    "metadata": { "name": key.1, "namespace": key.0 },
                    "status": { "nodes": [entry] },
                });
                let api: Api<Configuration> = Api::namespaced(client.clone(), &key.0);
                match api
                    .patch_status(
                        &key.1,
                        &PatchParams::apply(&usage_manager(&node)).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                {
                    Ok(_) => {
                        written.insert(key.clone(), comparable);
                        conds.insert(key.clone(), c);
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        metrics.api_error("apply_configuration_status");
                        tracing::warn!(configuration = %format!("{}/{}", key.0, key.1), error = %e, "status write failed; will retry");
                        failed.insert(key.clone());
                    }
                }
            }
            // Events only on transitions, so a persistent problem is one Event.
            let now_state = (
                ds.problem.clone(),
                ds.diagnostics.clone(),
                summary.conflicts.clone(),
            );
            if announced.get(&key) != Some(&now_state) {
                let reference = ObjectReference {
                    api_version: Some("akri.sh/v0".into()),
                    kind: Some("Configuration".into()),
                    name: Some(key.1.clone()),
                    namespace: Some(key.0.clone()),
                    uid: summary.uid.clone(),
                    ..Default::default()
                };
                let mut events = Vec::new();
                if let Some(p) = &ds.problem
                    && announced.get(&key).and_then(|a| a.0.as_ref()) != Some(p)
                {
                    events.push((p.reason.clone(), p.message.clone()));
                }
                if !ds.diagnostics.is_empty()
                    && announced.get(&key).map(|a| &a.1) != Some(&ds.diagnostics)
                {
                    let text = ds
                        .diagnostics
                        .iter()
                        .map(|d| format!("{} {}: {}", d.severity, d.subject, d.message))
                        .collect::<Vec<_>>()
                        .join("; ");
                    events.push(("HandlerDiagnostics".to_string(), text));
                }
                if !summary.conflicts.is_empty()
                    && announced.get(&key).map(|a| &a.2) != Some(&summary.conflicts)
                {
                    events.push(("NameConflict".to_string(), summary.conflicts.join("; ")));
                }
                for (reason, note) in events {
                    let ev = Event {
                        type_: EventType::Warning,
                        reason,
                        note: Some(format!("node {node}: {note}")),
                        action: "Discover".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        metrics.api_error("publish_event");
                        tracing::debug!(error = %e, "cannot publish event");
                    }
                }
                announced.insert(key.clone(), now_state);
            }
        }
        dirty.extend(failed);
        if !dirty.is_empty() {
            // Retry failed writes on the next round.
            if let Some(k) = dirty.iter().next().cloned() {
                let _ = board.poke_again(&k);
            }
        }
    }
}

fn strip_times(c: &[Condition]) -> Vec<(String, String, String, String)> {
    c.iter()
        .map(|c| {
            (
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
            )
        })
        .collect()
}

impl StatusBoard {
    /// Re-queues a key (after a failed write).
    pub fn poke_again(&self, key: &ConfigKey) -> bool {
        self.poke.send(key.clone()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_problems_and_diagnostics() {
        let ok = DiscoveryStatus {
            endpoints: 1,
            ..Default::default()
        };
        let c = conditions(&[], 2, &[], &ok, Some(3));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, "True");
        assert_eq!(c[0].observed_generation, Some(3));
        let bad = DiscoveryStatus {
            endpoints: 1,
            problem: Some(Problem::new("InvalidDiscoveryDetails", "unknown field `x`")),
            diagnostics: vec![Diagnostic {
                subject: "cam-1".into(),
                severity: "Error".into(),
                message: "wrong password".into(),
            }],
        };
        let c2 = conditions(&c, 0, &["clash".to_string()], &bad, Some(3));
        let find = |t: &str| c2.iter().find(|c| c.type_ == t).cloned();
        assert_eq!(
            find("Discovering").map(|c| c.reason),
            Some("InvalidDiscoveryDetails".into())
        );
        assert!(
            find("HandlerDiagnostics").is_some_and(
                |c| c.message.contains("cam-1") && c.message.contains("wrong password")
            )
        );
        assert!(find("NameConflict").is_some());
        let c3 = conditions(&c2, 2, &[], &ok, Some(3));
        assert_eq!(c3.len(), 1, "cleared conditions go away");
    }
}
