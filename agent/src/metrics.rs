//! Prometheus metrics and the health endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: a Configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigurationLabel {
    /// `<namespace>/<name>`.
    pub configuration: String,
}

/// Label: which kind of resource served an allocation, and its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AllocationLabel {
    /// `instance` or `configuration`.
    pub resource_kind: String,
    /// `ok` or `refused`.
    pub result: String,
}

/// Label: a handler name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabel {
    /// Handler name.
    pub handler: String,
}

/// Label: an API operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// e.g. `apply_instance`, `delete_instance`, `apply_status`.
    pub operation: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Instances per Configuration that this node takes part in.
    pub instances: Family<ConfigurationLabel, Gauge>,
    /// Seconds from a device first appearing in a handler's list to its Instance being written.
    pub discovery_to_instance: Histogram,
    /// Allocate calls answered.
    pub allocations: Family<AllocationLabel, Counter>,
    /// Slots released because kubelet no longer lists their pod.
    pub slot_reclaims: Counter,
    /// Handler registrations received (embedded and external).
    pub handler_registrations: Family<HandlerLabel, Counter>,
    /// Failed API requests.
    pub api_errors: Family<OperationLabel, Counter>,
    /// Device-plugin servers registered with kubelet.
    pub device_plugins: Gauge,
    /// Set when the registration socket and kubelet registration are up.
    pub ready: AtomicBool,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("verge_agent");
        let instances = Family::<ConfigurationLabel, Gauge>::default();
        registry.register(
            "instances",
            "Instances per Configuration on this node",
            instances.clone(),
        );
        // 1 ms … ~16 s.
        let discovery_to_instance = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "discovery_to_instance_seconds",
            "Time from a device appearing in a handler's list to its Instance being written",
            discovery_to_instance.clone(),
        );
        let allocations = Family::<AllocationLabel, Counter>::default();
        registry.register(
            "allocations",
            "Allocate calls answered",
            allocations.clone(),
        );
        let slot_reclaims = Counter::default();
        registry.register(
            "slot_reclaims",
            "Slots released after their pod went away",
            slot_reclaims.clone(),
        );
        let handler_registrations = Family::<HandlerLabel, Counter>::default();
        registry.register(
            "handler_registrations",
            "Discovery handler registrations",
            handler_registrations.clone(),
        );
        let api_errors = Family::<OperationLabel, Counter>::default();
        registry.register(
            "api_errors",
            "Failed Kubernetes API requests",
            api_errors.clone(),
        );
        let device_plugins = Gauge::default();
        registry.register(
            "device_plugins",
            "Device-plugin servers registered with kubelet",
            device_plugins.clone(),
        );
        Arc::new(Self {
            registry,
            instances,
            discovery_to_instance,
            allocations,
            slot_reclaims,
            handler_registrations,
            api_errors,
            device_plugins,
            ready: AtomicBool::new(false),
        })
    }

    /// The registry as Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a failed API request.
    pub fn api_error(&self, operation: &str) {
        self.api_errors
            .get_or_create(&OperationLabel {
                operation: operation.to_string(),
            })
            .inc();
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves /metrics, /healthz and /readyz.
pub async fn serve(address: std::net::SocketAddr, m: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m);
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_metric_is_exported() {
        let m = Metrics::new();
        m.instances
            .get_or_create(&ConfigurationLabel {
                configuration: "ns/c".into(),
            })
            .set(2);
        m.discovery_to_instance.observe(0.01);
        m.allocations
            .get_or_create(&AllocationLabel {
                resource_kind: "instance".into(),
                result: "ok".into(),
            })
            .inc();
        m.slot_reclaims.inc();
        m.handler_registrations
            .get_or_create(&HandlerLabel {
                handler: "debugEcho".into(),
            })
            .inc();
        m.api_error("apply_instance");
        m.device_plugins.set(3);
        let text = m.encode();
        for name in [
            "verge_agent_instances{configuration=\"ns/c\"} 2",
            "verge_agent_discovery_to_instance_seconds_count 1",
            "verge_agent_allocations_total{resource_kind=\"instance\",result=\"ok\"} 1",
            "verge_agent_slot_reclaims_total 1",
            "verge_agent_handler_registrations_total{handler=\"debugEcho\"} 1",
            "verge_agent_api_errors_total{operation=\"apply_instance\"} 1",
            "verge_agent_device_plugins 3",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}
