//! kubelet device plugins: one gRPC server per resource, registered with
//! kubelet, recreated and re-registered whenever kubelet restarts.
//!
//! The manager only starts, stops and re-registers servers; what each server
//! lists comes from the state through a `watch` channel, and what `Allocate`
//! answers comes from the [`Allocator`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tonic::{Request, Response, Status};
use verge_device_plugin_proto::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use verge_device_plugin_proto::v1beta1::registration_client::RegistrationClient;
use verge_device_plugin_proto::v1beta1::{
    self, AllocateRequest, AllocateResponse, ContainerPreferredAllocationResponse,
    DevicePluginOptions, Empty, ListAndWatchResponse, PreStartContainerRequest,
    PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
    RegisterRequest,
};
use verge_discovery_sdk::uds;

use crate::config::KubeletArgs;
use crate::metrics::Metrics;
use crate::state::{PluginCommand, split_slot_id};

/// kubelet's registration socket, inside the device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// Answers kubelet's Allocate calls.
pub trait Allocator: Send + Sync + 'static {
    /// Allocates `request`'s devices of `resource`.
    fn allocate(
        &self,
        resource: String,
        request: AllocateRequest,
    ) -> BoxFuture<'static, Result<AllocateResponse, Status>>;
}

/// Socket file name of a resource: `/` is the only character of a resource
/// name that cannot be in a file name, and resource names are unique per node.
pub fn socket_name(resource: &str) -> String {
    format!("{}.sock", resource.replace('/', "_"))
}

struct PluginService {
    resource: String,
    devices: watch::Receiver<Vec<v1beta1::Device>>,
    allocator: Arc<dyn Allocator>,
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<ListStream>, Status> {
        let stream = WatchStream::new(self.devices.clone())
            .map(|devices| Ok(ListAndWatchResponse { devices }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|r| ContainerPreferredAllocationResponse {
                device_i_ds: preferred(
                    &r.available_device_i_ds,
                    &r.must_include_device_i_ds,
                    r.allocation_size,
                ),
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        self.allocator
            .allocate(self.resource.clone(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// Prefers spreading over devices: lowest slot numbers first, so two pods
/// asking for one slot each land on two different devices when they can.
pub fn preferred(available: &[String], must: &[String], size: i32) -> Vec<String> {
    let size = usize::try_from(size).unwrap_or(0);
    let mut out: Vec<String> = must.iter().take(size).cloned().collect();
    let mut rest: Vec<&String> = available.iter().filter(|id| !out.contains(id)).collect();
    rest.sort_by_key(|id| {
        let (instance, slot) = split_slot_id(id).unwrap_or((id.as_str(), usize::MAX));
        (slot, instance.to_string())
    });
    for id in rest {
        if out.len() >= size {
            break;
        }
        out.push(id.clone());
    }
    out
}

struct Server {
    devices: watch::Receiver<Vec<v1beta1::Device>>,
    task: JoinHandle<()>,
}

/// Starts, stops and (re-)registers plugin servers.
pub struct PluginManager {
    dir: PathBuf,
    allocator: Arc<dyn Allocator>,
    metrics: Arc<Metrics>,
    timings: KubeletArgs,
    servers: HashMap<String, Server>,
    /// Resources whose registration failed and is retried.
    unregistered: std::collections::BTreeSet<String>,
    retry_attempts: u32,
}

impl PluginManager {
    /// A manager for plugins in `dir` (kubelet's device-plugin directory).
    pub fn new(
        dir: PathBuf,
        allocator: Arc<dyn Allocator>,
        metrics: Arc<Metrics>,
        timings: KubeletArgs,
    ) -> Self {
        Self {
            dir,
            allocator,
            metrics,
            timings,
            servers: HashMap::new(),
            unregistered: Default::default(),
            retry_attempts: 0,
        }
    }

    /// Runs until the command channel closes or `stop` fires.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<PluginCommand>,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut stop = stop;
        let (kubelet_tx, mut kubelet_rx) = mpsc::unbounded_channel::<()>();
        let _watcher = match self.watch_kubelet(kubelet_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot watch the device-plugin directory; kubelet restarts will not be noticed");
                None
            }
        };
        loop {
            let retry = (!self.unregistered.is_empty()).then(|| {
                crate::instances::backoff(
                    self.timings.kubelet_register_retry_initial,
                    self.timings.kubelet_register_retry_max,
                    self.retry_attempts.max(1),
                )
            });
            tokio::select! {
                _ = &mut stop => break,
                _ = async { match retry { Some(d) => tokio::time::sleep(d).await, None => futures::future::pending().await } } => {
                    self.retry_attempts = self.retry_attempts.saturating_add(1);
                    let pending: Vec<String> = std::mem::take(&mut self.unregistered)
                        .into_iter()
                        .filter(|r| self.servers.contains_key(r))
                        .collect();
                    self.register_all(pending).await;
                    if self.unregistered.is_empty() {
                        self.retry_attempts = 0;
                    }
                }
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(PluginCommand::Ensure { resource, devices }) => {
                        self.start(&resource, devices);
                        self.register_all(vec![resource]).await;
                    }
                    Some(PluginCommand::Remove { resource }) => self.stop(&resource),
                },
                Some(()) = kubelet_rx.recv() => {
                    // Coalesce a burst of events (kubelet deletes every socket at start).
                    while kubelet_rx.try_recv().is_ok() {}
                    tracing::info!("kubelet restarted: recreating and registering {} device plugins", self.servers.len());
                    self.unregistered.clear();
                    self.retry_attempts = 0;
                    let started = std::time::Instant::now();
                    let resources: Vec<String> = self.servers.keys().cloned().collect();
                    for r in &resources {
                        let devices = self.servers.get(r).map(|s| s.devices.clone());
                        if let Some(devices) = devices {
                            self.start(r, devices);
                        }
                    }
                    self.register_all(resources).await;
                    tracing::info!(took = ?started.elapsed(), "device plugins registered again");
                }
            }
        }
        self.shutdown();
    }

    /// Stops every server and removes its socket, so nothing of the agent is
    /// left in kubelet's directory. Instances and slots stay as they are: the
    /// next agent adopts them and registers again.
    pub fn shutdown(&mut self) {
        for (resource, s) in self.servers.drain() {
            s.task.abort();
            let _ = std::fs::remove_file(self.dir.join(socket_name(&resource)));
        }
    }

    /// Sends `()` whenever kubelet's socket is (re)created.
    fn watch_kubelet(
        &self,
        tx: mpsc::UnboundedSender<()>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(e) = event
                    && matches!(e.kind, EventKind::Create(_))
                    && e.paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| n == KUBELET_SOCKET))
                {
                    let _ = tx.send(());
                }
            })?;
        std::fs::create_dir_all(&self.dir).map_err(notify::Error::io)?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }

    fn start(&mut self, resource: &str, devices: watch::Receiver<Vec<v1beta1::Device>>) {
        let path = self.dir.join(socket_name(resource));
        if let Some(old) = self.servers.remove(resource) {
            old.task.abort();
        }
        let listener = match uds::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(resource, socket = %path.display(), error = %e, "cannot create device-plugin socket");
                return;
            }
        };
        let service = PluginService {
            resource: resource.to_string(),
            devices: devices.clone(),
            allocator: self.allocator.clone(),
        };
        let resource_name = resource.to_string();
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await
            {
                tracing::error!(resource = %resource_name, error = %e, "device-plugin server failed");
            }
        });
        self.servers
            .insert(resource.to_string(), Server { devices, task });
        self.metrics.device_plugins.set(self.servers.len() as i64);
    }

    fn stop(&mut self, resource: &str) {
        if let Some(server) = self.servers.remove(resource) {
            // The state has already published an empty list; give the open
            // ListAndWatch stream a moment to deliver it before the server
            // goes, so kubelet drops the resource at once.
            let path = self.dir.join(socket_name(resource));
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                server.task.abort();
                let _ = std::fs::remove_file(path);
            });
            self.metrics.device_plugins.set(self.servers.len() as i64);
        }
    }

    async fn register_all(&mut self, resources: Vec<String>) {
        let kubelet = self.dir.join(KUBELET_SOCKET);
        if !kubelet.exists() {
            tracing::info!("kubelet socket not present yet; plugins register when it appears");
            self.unregistered.extend(resources);
            return;
        }
        let timeout = self.timings.kubelet_register_timeout;
        let failed: Vec<String> = futures::stream::iter(resources)
            .map(|resource| {
                let kubelet = kubelet.clone();
                async move {
                    match register(&kubelet, &resource, timeout).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!(resource, error = %e, "kubelet registration failed; will retry");
                            Some(resource)
                        }
                    }
                }
            })
            .buffer_unordered(self.timings.kubelet_register_concurrency.max(1))
            .filter_map(futures::future::ready)
            .collect()
            .await;
        self.unregistered.extend(failed);
    }
}

async fn register(kubelet: &Path, resource: &str, timeout: Duration) -> Result<(), Status> {
    let channel = uds::connect(kubelet, timeout)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = RegistrationClient::new(channel);
    let mut req = Request::new(RegisterRequest {
        version: v1beta1::VERSION.to_string(),
        endpoint: socket_name(resource),
        resource_name: resource.to_string(),
        options: Some(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }),
    });
    req.set_timeout(timeout);
    client.register(req).await?;
    tracing::debug!(resource, "registered with kubelet");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_are_file_names() {
        assert_eq!(socket_name("akri.sh/cam-abc123"), "akri.sh_cam-abc123.sock");
    }

    #[test]
    fn preferred_spreads_over_devices() {
        let available: Vec<String> = ["a-0", "a-1", "b-0", "b-1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(preferred(&available, &[], 2), ["a-0", "b-0"]);
        assert_eq!(preferred(&available, &["b-1".into()], 2), ["b-1", "a-0"]);
        assert_eq!(preferred(&available, &[], 0), Vec::<String>::new());
        assert_eq!(preferred(&available, &[], -1), Vec::<String>::new());
        assert_eq!(preferred(&available, &[], 9).len(), 4);
    }
}
