//! kubelet's pod-resources API: which device ids containers hold (to reclaim
//! slots of pods that are gone) and which devices kubelet considers allocatable.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use verge_crds::RESOURCE_PREFIX;
use verge_device_plugin_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use verge_device_plugin_proto::podresources::v1::{
    AllocatableResourcesRequest, ListPodResourcesRequest,
};
use verge_discovery_sdk::uds;

use crate::metrics::Metrics;
use crate::state::AgentState;

/// (resource, device id) pairs.
pub type DeviceSet = BTreeSet<(String, String)>;

/// Errors talking to kubelet.
#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    /// Could not connect.
    #[error("cannot reach kubelet pod-resources at {0}: {1}")]
    Connect(String, String),
    /// The call failed.
    #[error("pod-resources call failed: {0}")]
    Call(#[from] tonic::Status),
}

/// A pod-resources client on a unix socket.
#[derive(Clone, Debug)]
pub struct PodResources {
    socket: PathBuf,
    /// Timeout of one call.
    call_timeout: Duration,
    /// Poll interval while waiting for kubelet to take in a device-list update.
    sync_poll: Duration,
}

impl PodResources {
    /// A client for `socket`.
    pub fn new(socket: PathBuf, call_timeout: Duration, sync_poll: Duration) -> Self {
        Self {
            socket,
            call_timeout,
            sync_poll,
        }
    }

    async fn client(
        &self,
    ) -> Result<PodResourcesListerClient<tonic::transport::Channel>, PodResourcesError> {
        let channel = uds::connect(&self.socket, self.call_timeout)
            .await
            .map_err(|e| {
                PodResourcesError::Connect(self.socket.display().to_string(), e.to_string())
            })?;
        Ok(PodResourcesListerClient::new(channel))
    }

    /// Device ids of Verge resources that containers hold right now.
    pub async fn in_use(&self) -> Result<DeviceSet, PodResourcesError> {
        let mut client = self.client().await?;
        let mut req = tonic::Request::new(ListPodResourcesRequest {});
        req.set_timeout(self.call_timeout);
        let resp = client.list(req).await?.into_inner();
        Ok(resp
            .pod_resources
            .into_iter()
            .flat_map(|p| p.containers)
            .flat_map(|c| c.devices)
            .filter(|d| is_ours(&d.resource_name))
            .flat_map(|d| {
                let r = d.resource_name;
                d.device_ids.into_iter().map(move |id| (r.clone(), id))
            })
            .collect())
    }

    /// Device ids kubelet currently considers healthy and allocatable.
    pub async fn allocatable(&self) -> Result<DeviceSet, PodResourcesError> {
        let mut client = self.client().await?;
        let mut req = tonic::Request::new(AllocatableResourcesRequest {});
        req.set_timeout(self.call_timeout);
        let resp = client.get_allocatable_resources(req).await?.into_inner();
        Ok(resp
            .devices
            .into_iter()
            .filter(|d| is_ours(&d.resource_name))
            .flat_map(|d| {
                let r = d.resource_name;
                d.device_ids.into_iter().map(move |id| (r.clone(), id))
            })
            .collect())
    }

    /// Waits until kubelet no longer lists any of `devices` as allocatable, or
    /// `timeout` passes. Returns whether it got there. Allocate calls this for
    /// a slot's twin device, so kubelet cannot admit a second pod for the same
    /// slot through the other resource.
    pub async fn wait_not_allocatable(
        &self,
        devices: &[(String, String)],
        timeout: Duration,
    ) -> bool {
        if devices.is_empty() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.allocatable().await {
                Ok(now) if devices.iter().all(|d| !now.contains(d)) => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot check kubelet's allocatable devices");
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(self.sync_poll).await;
        }
    }
}

fn is_ours(resource: &str) -> bool {
    resource
        .split_once('/')
        .is_some_and(|(prefix, _)| prefix == RESOURCE_PREFIX)
}

/// Reads pod-resources every `interval` and releases slots no container holds.
pub async fn reclaim_loop(
    client: PodResources,
    state: Arc<Mutex<AgentState>>,
    interval: Duration,
    allocation_grace: Duration,
    metrics: Arc<Metrics>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        ticker.tick().await;
        match client.in_use().await {
            Ok(in_use) => {
                warned = false;
                let released = match state.lock() {
                    Ok(mut s) => s.reclaim(&in_use, Instant::now(), allocation_grace),
                    Err(_) => return,
                };
                if released > 0 {
                    tracing::info!(released, "reclaimed slots of pods that are gone");
                    metrics.slot_reclaims.inc_by(released as u64);
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot read kubelet pod-resources; slots are not reclaimed until it answers");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_akri_resources_count() {
        assert!(is_ours("akri.sh/cam"));
        assert!(!is_ours("nvidia.com/gpu"));
        assert!(!is_ours("akri.sh"));
    }
}
