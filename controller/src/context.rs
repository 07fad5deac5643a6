//! State shared by every reconcile: the client, settings, Event recorder, metrics and the small
//! in-memory books (failure and error backoff, dry-run results).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use tracing::warn;
use verge_crds::Configuration;

use crate::brokers::Backoff;
use crate::cli::{Args, REPORTER};
use crate::failures::FailureBook;
use crate::metrics::Metrics;

/// Longest Event note kept (the Events API limit is 1 kB).
const MAX_EVENT_NOTE_CHARS: usize = 1000;

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Settings.
    pub args: Args,
    /// Publishes Events on the objects users look at.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-broker failure counts.
    pub failures: FailureBook,
    /// The Configurations the Configuration controller watches (to prune metrics).
    pub configurations: Store<Configuration>,
    /// Consecutive reconcile errors per object, for the error backoff.
    errors: Mutex<HashMap<String, u32>>,
    /// Dry-run findings per Configuration UID, with the generation they were made for.
    validations: Mutex<HashMap<String, (i64, Vec<String>)>>,
    /// Nodes found lost at the last node check; no broker is started on them even if an
    /// agent that still runs there lists its node again.
    lost_nodes: Mutex<BTreeSet<String>>,
}

impl Context {
    /// Builds the context.
    pub fn new(
        client: Client,
        args: Args,
        identity: String,
        metrics: Arc<Metrics>,
        configurations: Store<Configuration>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.to_string(),
                instance: Some(identity),
            },
        );
        Self {
            client,
            args,
            recorder,
            metrics,
            failures: FailureBook::default(),
            configurations,
            errors: Mutex::new(HashMap::new()),
            validations: Mutex::new(HashMap::new()),
            lost_nodes: Mutex::new(BTreeSet::new()),
        }
    }

    /// Backoff for replacing ended brokers.
    pub fn failed_backoff(&self) -> Backoff {
        Backoff {
            initial: self.args.failed_backoff_initial,
            max: self.args.failed_backoff_max,
        }
    }

    /// Backoff for retrying failed reconciles.
    pub fn error_backoff(&self) -> Backoff {
        Backoff {
            initial: self.args.error_backoff_initial,
            max: self.args.error_backoff_max,
        }
    }

    /// Counts one more consecutive error for `key`; returns the count.
    pub fn record_error(&self, key: &str) -> u32 {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let n = errors.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the errors of `key` after a successful reconcile.
    pub fn clear_errors(&self, key: &str) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Dry-run findings for Configuration `uid` at `generation`, if already made.
    pub fn cached_validation(&self, uid: &str, generation: i64) -> Option<Vec<String>> {
        let cache = self.validations.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(uid)
            .filter(|(g, _)| *g == generation)
            .map(|(_, problems)| problems.clone())
    }

    /// Remembers dry-run findings.
    pub fn store_validation(&self, uid: &str, generation: i64, problems: Vec<String>) {
        self.validations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), (generation, problems));
    }

    /// Records the nodes the last node check found lost.
    pub fn set_lost_nodes(&self, nodes: BTreeSet<String>) {
        *self.lost_nodes.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
    }

    /// Whether `node` was lost at the last node check.
    pub fn is_lost(&self, node: &str) -> bool {
        self.lost_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    pub async fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            // The Events API refuses notes over 1 kB.
            note: Some(note.chars().take(MAX_EVENT_NOTE_CHARS).collect()),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            warn!(%error, reason, "could not publish Event");
        }
    }
}
