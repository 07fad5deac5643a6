//! Prometheus metrics, served as text on `/metrics`. Every metric declared here is registered
//! and exported (Akri declared four and exported one).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Smallest reconcile-duration bucket, in seconds.
const DURATION_BUCKET_START: f64 = 0.005;
/// Growth factor between reconcile-duration buckets.
const DURATION_BUCKET_FACTOR: f64 = 2.0;
/// Number of reconcile-duration buckets (5 ms .. about 20 s).
const DURATION_BUCKET_COUNT: u16 = 13;

/// Labels of the broker gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct BrokerLabels {
    /// Namespace of the Configuration.
    pub namespace: String,
    /// Configuration name.
    pub configuration: String,
    /// Node the broker Pods run on.
    pub node: String,
    /// Pod phase (`Pending`, `Running`, ...).
    pub phase: String,
}

/// Labels per controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `instance` or `configuration`.
    pub controller: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `instance` or `configuration`.
    pub controller: String,
    /// Short error kind.
    pub error: String,
}

/// A node and a Pod phase.
pub type NodePhase = (String, String);

/// Error kinds per controller, exported as zero from the start so that rates work at once.
const ERROR_KINDS: [&str; 3] = ["kube", "missing_field", "brokers"];
/// Controllers, as labelled in metrics.
const CONTROLLERS: [&str; 2] = ["instance", "configuration"];

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        DURATION_BUCKET_START,
        DURATION_BUCKET_FACTOR,
        DURATION_BUCKET_COUNT,
    ))
}

/// All metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Broker Pods per Configuration, node and phase.
    pub broker_pods: Family<BrokerLabels, Gauge>,
    /// Reconcile duration per controller.
    pub reconcile_duration: HistogramFamily,
    /// Reconcile errors per controller and kind.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// Nodes removed from Instances after being lost.
    pub node_removals: Counter,
    /// (node, phase) label pairs of `broker_pods` per (namespace, configuration), to drop
    /// series that vanish.
    broker_series: Mutex<BTreeMap<(String, String), BTreeSet<NodePhase>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("verge_controller");
        let broker_pods = Family::<BrokerLabels, Gauge>::default();
        registry.register(
            "broker_pods",
            "Broker Pods per Configuration, node and phase",
            broker_pods.clone(),
        );
        let reconcile_duration: HistogramFamily =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile, per controller",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, per controller and error kind",
            reconcile_errors.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease, else 0",
            leader.clone(),
        );
        let node_removals = Counter::default();
        registry.register(
            "node_removals",
            "Times a lost node was removed from an Instance",
            node_removals.clone(),
        );
        for controller in CONTROLLERS {
            for error in ERROR_KINDS {
                // Creating the series is the point; the returned handle is not needed.
                let _ = reconcile_errors.get_or_create(&ErrorLabels {
                    controller: controller.to_string(),
                    error: error.to_string(),
                });
            }
        }
        Self {
            registry,
            broker_pods,
            reconcile_duration,
            reconcile_errors,
            leader,
            node_removals,
            broker_series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one reconcile.
    pub fn observe_reconcile(&self, controller: &str, took: Duration, error: Option<&str>) {
        self.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.to_string(),
            })
            .observe(took.as_secs_f64());
        if let Some(error) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: controller.to_string(),
                    error: error.to_string(),
                })
                .inc();
        }
    }

    /// Sets the broker Pods of one Configuration per node and phase; pairs no longer listed
    /// lose their series.
    pub fn set_broker_pods(
        &self,
        namespace: &str,
        configuration: &str,
        counts: &BTreeMap<NodePhase, usize>,
    ) {
        let key = (namespace.to_string(), configuration.to_string());
        let mut series = self.broker_series.lock().unwrap_or_else(|e| e.into_inner());
        let previous = series.remove(&key).unwrap_or_default();
        for pair in previous.iter().filter(|p| !counts.contains_key(*p)) {
            self.broker_pods.remove(&broker_labels(&key, pair));
        }
        for (pair, count) in counts {
            self.broker_pods
                .get_or_create(&broker_labels(&key, pair))
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        if !counts.is_empty() {
            series.insert(key, counts.keys().cloned().collect());
        }
    }

    /// Drops the broker series of Configurations that no longer exist.
    pub fn retain_configurations(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut series = self.broker_series.lock().unwrap_or_else(|e| e.into_inner());
        series.retain(|key, nodes| {
            let keep = exists(&key.0, &key.1);
            if !keep {
                for pair in nodes.iter() {
                    self.broker_pods.remove(&broker_labels(key, pair));
                }
            }
            keep
        });
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn broker_labels(key: &(String, String), pair: &NodePhase) -> BrokerLabels {
    BrokerLabels {
        namespace: key.0.clone(),
        configuration: key.1.clone(),
        node: pair.0.clone(),
        phase: pair.1.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(node: &str, phase: &str) -> NodePhase {
        (node.to_string(), phase.to_string())
    }

    #[test]
    fn every_metric_is_exported() {
        let m = Metrics::new();
        m.set_broker_pods("ns", "cam", &BTreeMap::from([(np("n1", "Running"), 2)]));
        m.observe_reconcile("instance", Duration::from_millis(20), Some("kube"));
        m.observe_reconcile("configuration", Duration::from_millis(3), None);
        m.leader.set(1);
        m.node_removals.inc();
        let text = m.encode().unwrap();
        for line in [
            "verge_controller_broker_pods{namespace=\"ns\",configuration=\"cam\",node=\"n1\",phase=\"Running\"} 2",
            "verge_controller_reconcile_errors_total{controller=\"configuration\",error=\"brokers\"} 0",
            "verge_controller_reconcile_duration_seconds_count{controller=\"instance\"} 1",
            "verge_controller_reconcile_duration_seconds_count{controller=\"configuration\"} 1",
            "verge_controller_reconcile_errors_total{controller=\"instance\",error=\"kube\"} 1",
            "verge_controller_leader 1",
            "verge_controller_node_removals_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn vanished_broker_series_are_dropped() {
        let m = Metrics::new();
        m.set_broker_pods(
            "ns",
            "cam",
            &BTreeMap::from([(np("n1", "Running"), 1), (np("n2", "Pending"), 1)]),
        );
        m.set_broker_pods("ns", "cam", &BTreeMap::from([(np("n2", "Running"), 3)]));
        let text = m.encode().unwrap();
        assert!(!text.contains("node=\"n1\""), "{text}");
        assert!(!text.contains("phase=\"Pending\""), "{text}");
        assert!(text.contains("node=\"n2\",phase=\"Running\"} 3"), "{text}");
        m.retain_configurations(|_, _| false);
        assert!(!m.encode().unwrap().contains("node=\"n2\""));
    }
}
