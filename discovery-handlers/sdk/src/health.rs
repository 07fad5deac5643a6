//! HTTP health endpoint of a handler binary (`--health-address`): `/healthz` answers 200 while
//! every runner of the process serves its `v0` endpoint, `/readyz` 200 once every one of them is
//! also registered with the agent. It exists because handler images are minimal (no shell for an
//! exec probe) and a handler served on a unix socket cannot be probed by kubelet at all; a plain
//! HTTP port can.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// What one runner last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RunnerHealth {
    serving: bool,
    registered: bool,
}

/// Health of the runners of one process, shared between them and the health server. Runners
/// report into it through [`crate::RunnerConfig::health`].
#[derive(Clone, Debug, Default)]
pub struct HealthState {
    runners: Arc<Mutex<BTreeMap<String, RunnerHealth>>>,
}

impl HealthState {
    /// An empty state: neither live nor ready until a runner reports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a runner before it starts, so the process is not ready while that runner has
    /// not registered yet (a binary serving several handlers is ready only when all are).
    pub fn expect(&self, handler: &str) {
        self.update(handler, |_| {});
    }

    pub(crate) fn set_serving(&self, handler: &str, serving: bool) {
        self.update(handler, |h| h.serving = serving);
    }

    pub(crate) fn set_registered(&self, handler: &str, registered: bool) {
        self.update(handler, |h| h.registered = registered);
    }

    fn update(&self, handler: &str, f: impl FnOnce(&mut RunnerHealth)) {
        // A panic elsewhere while holding the lock leaves plain booleans behind, still valid.
        let mut runners = self.runners.lock().unwrap_or_else(PoisonError::into_inner);
        f(runners.entry(handler.to_string()).or_default());
    }

    fn snapshot(&self) -> BTreeMap<String, RunnerHealth> {
        self.runners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every declared runner serves its endpoint (and there is at least one).
    pub fn live(&self) -> bool {
        let runners = self.snapshot();
        !runners.is_empty() && runners.values().all(|h| h.serving)
    }

    /// Live, and every runner is registered with the agent.
    pub fn ready(&self) -> bool {
        let runners = self.snapshot();
        !runners.is_empty() && runners.values().all(|h| h.serving && h.registered)
    }

    /// One line per runner, the body of both endpoints (what a human reading a failed probe
    /// wants to know).
    fn report(&self) -> String {
        let runners = self.snapshot();
        if runners.is_empty() {
            return "no handler started\n".to_string();
        }
        runners
            .iter()
            .map(|(name, h)| {
                format!(
                    "{name}: {}, {}\n",
                    if h.serving { "serving" } else { "not serving" },
                    if h.registered {
                        "registered"
                    } else {
                        "not registered with the agent"
                    }
                )
            })
            .collect()
    }
}

/// Why the health endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The address could not be bound.
    #[error("cannot listen on health address {address}: {source}")]
    Bind {
        /// The address given.
        address: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("health server failed: {0}")]
    Serve(std::io::Error),
}

async fn healthz(State(state): State<HealthState>) -> (StatusCode, String) {
    let code = if state.live() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, state.report())
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    let code = if state.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, state.report())
}

/// Binds `address` now (so a bad address fails the binary at start, not at the first probe)
/// and returns the server, which runs until it is dropped.
pub async fn bind(
    address: SocketAddr,
    state: HealthState,
) -> Result<impl Future<Output = Result<(), HealthError>> + Send, HealthError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| HealthError::Bind { address, source })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    tracing::info!(%address, "serving /healthz and /readyz");
    Ok(async move { axum::serve(listener, app).await.map_err(HealthError::Serve) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_declared_runner_serves_and_is_registered() {
        let state = HealthState::new();
        assert!(!state.live() && !state.ready(), "nothing started");
        state.expect("modbus-tcp");
        state.expect("modbus-rtu");
        state.set_serving("modbus-tcp", true);
        assert!(!state.live(), "modbus-rtu does not serve yet");
        state.set_serving("modbus-rtu", true);
        assert!(state.live() && !state.ready());
        state.set_registered("modbus-tcp", true);
        assert!(!state.ready(), "modbus-rtu is not registered");
        state.set_registered("modbus-rtu", true);
        assert!(state.ready());
        // the agent restarted: not ready until registered again, still live
        state.set_registered("modbus-rtu", false);
        assert!(state.live() && !state.ready());
        assert!(
            state
                .report()
                .contains("modbus-rtu: serving, not registered with the agent"),
            "{}",
            state.report()
        );
    }
}
