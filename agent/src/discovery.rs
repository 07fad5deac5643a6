//! One discovery session per Configuration: a `Discover` stream to every
//! endpoint of its handler, merged into one device list for the state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use verge_device_plugin_proto::v0::{Device, Diagnostic};
use verge_discovery_sdk::{DiscoveryError, DiscoveryRequest};

use crate::instances::backoff;
use crate::registry::Registry;
use crate::state::{AgentState, ConfigKey};
use crate::status::{Problem, StatusBoard};

/// What to discover.
#[derive(Clone, Debug)]
pub struct DiscoverySpec {
    /// Handler name.
    pub handler: String,
    /// Request sent to each endpoint.
    pub request: DiscoveryRequest,
}

enum EndpointEvent {
    Devices(usize, Vec<Device>, Vec<Diagnostic>),
    Lost(usize, String),
    Invalid(usize, String),
}

/// Runs until aborted.
pub async fn run(
    key: ConfigKey,
    spec: DiscoverySpec,
    registry: Arc<Registry>,
    state: Arc<Mutex<AgentState>>,
    board: Arc<StatusBoard>,
    backoff_initial: Duration,
    backoff_max: Duration,
) {
    let mut changes = registry.subscribe();
    loop {
        let endpoints = registry.get(&spec.handler);
        let generations: Vec<u64> = endpoints.iter().map(|e| e.generation).collect();
        if endpoints.is_empty() {
            board.set(&key, |s| {
                s.endpoints = 0;
                s.problem = Some(Problem::new(
                    "HandlerNotRegistered",
                    format!(
                        "no discovery handler named {:?} is registered on this node",
                        spec.handler
                    ),
                ));
            });
            if let Ok(mut s) = state.lock() {
                s.handler_lost(&key, Instant::now());
            }
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let shared = endpoints.iter().any(|e| e.handler.shared());
        board.set(&key, |s| {
            s.endpoints = endpoints.len();
            s.problem = None;
        });

        let (tx, mut rx) = mpsc::channel::<EndpointEvent>(16);
        let mut tasks = Vec::new();
        for (idx, instance) in endpoints.iter().enumerate() {
            let tx = tx.clone();
            let handler = instance.handler.clone();
            let request = spec.request.clone();
            tasks.push(tokio::spawn(async move {
                let mut attempts = 0u32;
                loop {
                    match handler.discover(request.clone()).await {
                        Ok(mut stream) => {
                            while let Some(item) = stream.next().await {
                                match item {
                                    Ok(update) => {
                                        attempts = 0;
                                        if tx
                                            .send(EndpointEvent::Devices(
                                                idx,
                                                update.devices,
                                                update.diagnostics,
                                            ))
                                            .await
                                            .is_err()
                                        {
                                            return;
                                        }
                                    }
                                    Err(DiscoveryError::InvalidSettings(m)) => {
                                        let _ = tx.send(EndpointEvent::Invalid(idx, m)).await;
                                        return;
                                    }
                                    Err(e) => {
                                        let _ =
                                            tx.send(EndpointEvent::Lost(idx, e.to_string())).await;
                                        break;
                                    }
                                }
                            }
                            if tx
                                .send(EndpointEvent::Lost(idx, "stream ended".into()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(DiscoveryError::InvalidSettings(m)) => {
                            let _ = tx.send(EndpointEvent::Invalid(idx, m)).await;
                            return;
                        }
                        Err(e) => {
                            if tx
                                .send(EndpointEvent::Lost(idx, e.to_string()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                    attempts = attempts.saturating_add(1);
                    tokio::time::sleep(backoff(backoff_initial, backoff_max, attempts)).await;
                }
            }));
        }
        drop(tx);

        let mut lists: BTreeMap<usize, (Vec<Device>, Vec<Diagnostic>)> = BTreeMap::new();
        let restart = loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break false };
                    match ev {
                        EndpointEvent::Devices(idx, devices, diagnostics) => {
                            lists.insert(idx, (devices, diagnostics));
                            board.set(&key, |s| {
                                s.problem = None;
                                s.diagnostics = lists.values().flat_map(|l| l.1.clone()).collect();
                            });
                        }
                        EndpointEvent::Lost(idx, message) => {
                            tracing::info!(configuration = %format!("{}/{}", key.0, key.1), handler = %spec.handler, error = %message, "discovery stream lost; devices enter their grace period");
                            lists.remove(&idx);
                            if lists.is_empty() {
                                board.set(&key, |s| s.problem = Some(Problem::new("HandlerUnavailable", message.clone())));
                            }
                        }
                        EndpointEvent::Invalid(idx, message) => {
                            lists.remove(&idx);
                            board.set(&key, |s| s.problem = Some(Problem::new("InvalidDiscoveryDetails", message.clone())));
                        }
                    }
                    let merged = merge(&lists);
                    if let Ok(mut s) = state.lock() {
                        s.update_devices(&key, shared, merged, Instant::now());
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() { break false; }
                    let now: Vec<u64> = registry.get(&spec.handler).iter().map(|e| e.generation).collect();
                    if now != generations { break true; }
                }
            }
        };
        for t in tasks {
            t.abort();
        }
        if !restart {
            // Every endpoint refused the settings: wait for a new handler registration.
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Union of every endpoint's list; the first endpoint reporting an id wins.
fn merge(lists: &BTreeMap<usize, (Vec<Device>, Vec<Diagnostic>)>) -> Vec<Device> {
    let mut by_id: BTreeMap<String, Device> = BTreeMap::new();
    for (devices, _) in lists.values() {
        for d in devices {
            by_id.entry(d.id.clone()).or_insert_with(|| d.clone());
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str, v: &str) -> Device {
        Device {
            id: id.into(),
            properties: [("P".to_string(), v.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_merge_by_device_id() {
        let lists = BTreeMap::from([
            (0, (vec![d("a", "0"), d("b", "0")], vec![])),
            (1, (vec![d("b", "1"), d("c", "1")], vec![])),
        ]);
        let merged = merge(&lists);
        let ids: Vec<&str> = merged.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(merged[1].properties["P"], "0");
    }
}
