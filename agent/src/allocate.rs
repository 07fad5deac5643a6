//! Answers kubelet's Allocate: claims the slots, records shared claims in the
//! API server, makes sure kubelet sees the slots' twins as taken, and returns
//! every device's properties as env plus its mounts and device nodes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use verge_crds::naming;
use verge_device_plugin_proto::v1beta1::{
    self, AllocateRequest, AllocateResponse, ContainerAllocateResponse,
};

use crate::instances::{WriteError, WriterMsg};
use crate::metrics::{AllocationLabel, Metrics};
use crate::plugins::Allocator;
use crate::podresources::PodResources;
use crate::state::{AgentState, AllocatedDevice, ClaimOutcome};

/// The agent's allocator.
pub struct AgentAllocator {
    /// State.
    pub state: Arc<Mutex<AgentState>>,
    /// To the Instance writer (same channel as the state, so flushes are ordered after claims).
    pub writes: mpsc::UnboundedSender<WriterMsg>,
    /// kubelet's pod-resources.
    pub pod_resources: PodResources,
    /// Longest wait for a shared claim to reach the API server.
    pub claim_timeout: Duration,
    /// Longest wait for kubelet to see the twins as unhealthy.
    pub kubelet_sync_timeout: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Builds a container's answer: env `K=V` and `K_<HASH>=V` for every property
/// of every device (so a container holding several devices sees all of them),
/// mounts and device specs.
pub fn container_response(devices: &[AllocatedDevice]) -> ContainerAllocateResponse {
    let mut envs = BTreeMap::new();
    let mut mounts = Vec::new();
    let mut specs: Vec<v1beta1::DeviceSpec> = Vec::new();
    for d in devices {
        for (k, v) in &d.properties {
            envs.insert(k.clone(), v.clone());
            envs.insert(naming::env_suffixed(k, &d.hash), v.clone());
        }
        for m in &d.device.mounts {
            let mount = v1beta1::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                read_only: m.read_only,
            };
            if !mounts.contains(&mount) {
                mounts.push(mount);
            }
        }
        for s in &d.device.device_specs {
            if !specs.iter().any(|x| x.container_path == s.container_path) {
                specs.push(v1beta1::DeviceSpec {
                    container_path: s.container_path.clone(),
                    host_path: s.host_path.clone(),
                    permissions: s.permissions.clone(),
                });
            }
        }
    }
    ContainerAllocateResponse {
        envs,
        mounts,
        devices: specs,
        annotations: BTreeMap::new(),
        cdi_devices: Vec::new(),
    }
}

impl AgentAllocator {
    async fn allocate_one(
        &self,
        resource: &str,
        ids: Vec<String>,
    ) -> Result<ContainerAllocateResponse, Status> {
        let started = Instant::now();
        let outcome = match self.state.lock() {
            Ok(mut s) => s.claim(resource, &ids, started),
            Err(_) => return Err(Status::internal("agent state poisoned")),
        };
        let (wait_for_api, twins, devices) = match outcome {
            ClaimOutcome::Refused(m) => return Err(Status::failed_precondition(m)),
            ClaimOutcome::Granted {
                wait_for_api,
                twins,
                devices,
            } => (wait_for_api, twins, devices),
        };
        for key in wait_for_api {
            let (tx, rx) = oneshot::channel();
            let _ = self.writes.send(WriterMsg::Flush(key.clone(), tx));
            let result = match tokio::time::timeout(self.claim_timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(WriteError::Api("writer stopped".into())),
                Err(_) => Err(WriteError::Api(format!(
                    "the claim was not recorded within {:?}",
                    self.claim_timeout
                ))),
            };
            if let Err(e) = result {
                if let Ok(mut s) = self.state.lock() {
                    s.claim_failed(&key, started);
                }
                return Err(Status::unavailable(format!(
                    "shared device {}: cannot claim its slot: {e}",
                    key.name
                )));
            }
        }
        if !self
            .pod_resources
            .wait_not_allocatable(&twins, self.kubelet_sync_timeout)
            .await
        {
            tracing::warn!(
                resource,
                ?twins,
                "kubelet did not confirm the slots' twin devices as taken in time"
            );
        }
        tracing::info!(resource, devices = ?ids, took = ?started.elapsed(), "allocated");
        Ok(container_response(&devices))
    }
}

impl Allocator for Arc<AgentAllocator> {
    fn allocate(
        &self,
        resource: String,
        request: AllocateRequest,
    ) -> BoxFuture<'static, Result<AllocateResponse, Status>> {
        let this = self.clone();
        Box::pin(async move {
            let kind = match this.state.lock() {
                Ok(s) => s.resource_kind(&resource),
                Err(_) => "configuration",
            };
            let mut container_responses = Vec::new();
            for c in request.container_requests {
                let r = this.allocate_one(&resource, c.devices_ids).await;
                let result = if r.is_ok() { "ok" } else { "refused" };
                this.metrics
                    .allocations
                    .get_or_create(&AllocationLabel {
                        resource_kind: kind.into(),
                        result: result.into(),
                    })
                    .inc();
                match r {
                    Ok(resp) => container_responses.push(resp),
                    Err(e) => {
                        tracing::warn!(resource, error = %e.message(), "allocation refused");
                        return Err(e);
                    }
                }
            }
            Ok(AllocateResponse {
                container_responses,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_device_plugin_proto::v0::{Device, DeviceSpec, Mount};

    fn dev(hash: &str, desc: &str) -> AllocatedDevice {
        AllocatedDevice {
            hash: hash.into(),
            properties: [("DEBUG_ECHO_DESCRIPTION".to_string(), desc.to_string())].into(),
            device: Device {
                id: desc.into(),
                properties: Default::default(),
                mounts: vec![Mount {
                    container_path: "/c".into(),
                    host_path: "/h".into(),
                    read_only: true,
                }],
                device_specs: vec![DeviceSpec {
                    container_path: format!("/dev/{desc}"),
                    host_path: format!("/dev/{desc}"),
                    permissions: "rw".into(),
                }],
            },
        }
    }

    #[test]
    fn several_devices_give_all_their_env() {
        let r = container_response(&[dev("aaaaaa", "a"), dev("bbbbbb", "b")]);
        assert_eq!(r.envs["DEBUG_ECHO_DESCRIPTION_AAAAAA"], "a");
        assert_eq!(r.envs["DEBUG_ECHO_DESCRIPTION_BBBBBB"], "b");
        assert!(r.envs.contains_key("DEBUG_ECHO_DESCRIPTION"));
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.mounts.len(), 1, "identical mounts are given once");
    }
}
