//! kubelet device plugins: one socket per resource, registered with kubelet,
//! recreated and re-registered whenever kubelet restarts.
//!
//! Every socket feeds its connections into one shared gRPC server; each
//! connection carries the [`Plugin`] of the socket it arrived on, so one
//! service answers for every resource. A server per resource cost ~7 KiB
//! each (its router and serve task), which at 1,000 Instances is 7 MiB.
//!
//! The manager only opens, closes and re-registers sockets; what each
//! resource lists comes from the state through a `watch` channel, and what
//! `Allocate` answers comes from the [`Allocator`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{UnboundedReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
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

/// Pause after a failed `accept` (e.g. out of file descriptors) before the
/// next, so a persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long a removed resource's socket stays open after its empty device
/// list was published, so kubelet's open `ListAndWatch` stream delivers it
/// and kubelet drops the resource at once rather than after its grace.
const REMOVE_LINGER: Duration = Duration::from_millis(100);

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

/// One resource as a connection to its socket sees it.
#[derive(Clone)]
struct Plugin {
    resource: Arc<str>,
    devices: watch::Receiver<Vec<v1beta1::Device>>,
    /// Cancelled when the socket is closed or replaced: ends its streams.
    closed: CancellationToken,
}

/// A connection accepted on a resource's socket, tagged with that resource
/// (tonic hands [`Connected::connect_info`] to every request as an extension).
struct PluginConnection {
    io: UnixStream,
    plugin: Plugin,
}

impl Connected for PluginConnection {
    type ConnectInfo = Plugin;

    fn connect_info(&self) -> Plugin {
        self.plugin.clone()
    }
}

impl AsyncRead for PluginConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PluginConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Incoming = mpsc::UnboundedSender<io::Result<PluginConnection>>;

/// The service behind every socket.
struct PluginService {
    allocator: Arc<dyn Allocator>,
}

fn plugin_of<T>(request: &Request<T>) -> Result<&Plugin, Status> {
    request
        .extensions()
        .get::<Plugin>()
        .ok_or_else(|| Status::internal("connection has no device-plugin resource"))
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

    async fn list_and_watch(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<ListStream>, Status> {
        let plugin = plugin_of(&request)?;
        let stream = WatchStream::new(plugin.devices.clone())
            .map(|devices| Ok(ListAndWatchResponse { devices }))
            .take_until(plugin.closed.clone().cancelled_owned());
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
        let resource = plugin_of(&request)?.resource.to_string();
        self.allocator
            .allocate(resource, request.into_inner())
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

/// Hands every connection on `listener` to the shared server, tagged with `plugin`.
async fn accept(listener: UnixListener, plugin: Plugin, incoming: Incoming) {
    loop {
        match listener.accept().await {
            Ok((io, _)) => {
                let connection = PluginConnection {
                    io,
                    plugin: plugin.clone(),
                };
                if incoming.send(Ok(connection)).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(resource = %plugin.resource, error = %e, "accepting a kubelet connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
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

/// An open resource socket.
struct Socket {
    devices: watch::Receiver<Vec<v1beta1::Device>>,
    closed: CancellationToken,
    accept: JoinHandle<()>,
}

impl Socket {
    /// Stops accepting and ends the resource's streams; the caller removes the file.
    fn close(self) {
        self.closed.cancel();
        self.accept.abort();
    }
}

/// Opens, closes and (re-)registers resource sockets.
pub struct PluginManager {
    dir: PathBuf,
    allocator: Arc<dyn Allocator>,
    metrics: Arc<Metrics>,
    timings: KubeletArgs,
    sockets: HashMap<String, Socket>,
    /// Connections from every socket to the shared server.
    incoming: Incoming,
    incoming_rx: Option<mpsc::UnboundedReceiver<io::Result<PluginConnection>>>,
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
        let (incoming, incoming_rx) = mpsc::unbounded_channel();
        Self {
            dir,
            allocator,
            metrics,
            timings,
            sockets: HashMap::new(),
            incoming,
            incoming_rx: Some(incoming_rx),
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
        let server = self.incoming_rx.take().map(|incoming| {
            let service = DevicePluginServer::new(PluginService {
                allocator: self.allocator.clone(),
            });
            tokio::spawn(async move {
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(UnboundedReceiverStream::new(incoming))
                    .await
                {
                    tracing::error!(error = %e, "device-plugin server failed");
                }
            })
        });
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
                        .filter(|r| self.sockets.contains_key(r))
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
                    tracing::info!("kubelet restarted: recreating and registering {} device plugins", self.sockets.len());
                    self.unregistered.clear();
                    self.retry_attempts = 0;
                    let started = std::time::Instant::now();
                    let resources: Vec<String> = self.sockets.keys().cloned().collect();
                    for r in &resources {
                        let devices = self.sockets.get(r).map(|s| s.devices.clone());
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
        if let Some(server) = server {
            server.abort();
        }
    }

    /// Closes every socket and removes its file, so nothing of the agent is
    /// left in kubelet's directory. Instances and slots stay as they are: the
    /// next agent adopts them and registers again.
    pub fn shutdown(&mut self) {
        for (resource, socket) in self.sockets.drain() {
            socket.close();
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
        if let Some(old) = self.sockets.remove(resource) {
            old.close();
        }
        let listener = match uds::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(resource, socket = %path.display(), error = %e, "cannot create device-plugin socket");
                self.metrics.device_plugins.set(self.sockets.len() as i64);
                return;
            }
        };
        let plugin = Plugin {
            resource: resource.into(),
            devices: devices.clone(),
            closed: CancellationToken::new(),
        };
        let closed = plugin.closed.clone();
        let accept = tokio::spawn(accept(listener, plugin, self.incoming.clone()));
        self.sockets.insert(
            resource.to_string(),
            Socket {
                devices,
                closed,
                accept,
            },
        );
        self.metrics.device_plugins.set(self.sockets.len() as i64);
    }

    fn stop(&mut self, resource: &str) {
        if let Some(socket) = self.sockets.remove(resource) {
            // The state has already published an empty list; give the open
            // ListAndWatch stream a moment to deliver it before the socket
            // goes, so kubelet drops the resource at once.
            let path = self.dir.join(socket_name(resource));
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                tokio::time::sleep(REMOVE_LINGER).await;
                socket.close();
                let _ = std::fs::remove_file(path);
            });
            self.metrics.device_plugins.set(self.sockets.len() as i64);
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

    use verge_device_plugin_proto::v1beta1::device_plugin_client::DevicePluginClient;

    struct EchoAllocator;

    impl Allocator for EchoAllocator {
        fn allocate(
            &self,
            resource: String,
            _: AllocateRequest,
        ) -> BoxFuture<'static, Result<AllocateResponse, Status>> {
            Box::pin(async move { Err(Status::failed_precondition(resource)) })
        }
    }

    fn devices(prefix: &str, n: usize) -> Vec<v1beta1::Device> {
        (0..n)
            .map(|i| v1beta1::Device {
                id: format!("{prefix}-{i}"),
                health: v1beta1::HEALTHY.into(),
                topology: None,
            })
            .collect()
    }

    /// Polls `condition` (a file appearing or going) until it holds, failing after 10 s.
    async fn wait_for(condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn client(dir: &Path, resource: &str) -> DevicePluginClient<tonic::transport::Channel> {
        let channel = uds::connect(&dir.join(socket_name(resource)), Duration::from_secs(5))
            .await
            .expect("connect to the plugin socket");
        DevicePluginClient::new(channel)
    }

    /// The shared server answers each socket with its own resource, including a
    /// list far above the codec's initial buffer, and a removed resource's
    /// stream ends and its socket goes.
    #[tokio::test]
    async fn one_server_answers_every_socket_with_its_own_resource() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manager = PluginManager::new(
            dir.path().to_path_buf(),
            Arc::new(EchoAllocator),
            Metrics::new(),
            KubeletArgs::default(),
        );
        let (commands, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let manager = tokio::spawn(manager.run(rx, stopped));
        // 20,000 devices encode to ~400 KiB: above the initial buffer and the yield threshold.
        let (big_tx, big) = watch::channel(devices("big", 20_000));
        let (small_tx, small) = watch::channel(devices("small", 2));
        for (resource, devices) in [("akri.sh/big", big), ("akri.sh/small", small)] {
            commands
                .send(PluginCommand::Ensure {
                    resource: resource.into(),
                    devices,
                })
                .expect("manager runs");
        }
        let socket = dir.path().join(socket_name("akri.sh/small"));
        wait_for(|| socket.exists()).await;

        let mut big_stream = client(dir.path(), "akri.sh/big")
            .await
            .list_and_watch(Empty {})
            .await
            .expect("ListAndWatch big")
            .into_inner();
        let mut small_client = client(dir.path(), "akri.sh/small").await;
        let mut small_stream = small_client
            .list_and_watch(Empty {})
            .await
            .expect("ListAndWatch small")
            .into_inner();
        let first = big_stream.message().await.expect("big list").expect("one");
        assert_eq!(first.devices, devices("big", 20_000));
        let first = small_stream
            .message()
            .await
            .expect("small list")
            .expect("one");
        assert_eq!(first.devices, devices("small", 2));

        small_tx.send_replace(devices("small", 3));
        let next = small_stream.message().await.expect("update").expect("one");
        assert_eq!(next.devices, devices("small", 3));
        let refused = small_client
            .allocate(AllocateRequest::default())
            .await
            .expect_err("EchoAllocator refuses");
        assert_eq!(
            refused.message(),
            "akri.sh/small",
            "Allocate names the socket's resource"
        );

        small_tx.send_replace(Vec::new());
        commands
            .send(PluginCommand::Remove {
                resource: "akri.sh/small".into(),
            })
            .expect("manager runs");
        let last = small_stream
            .message()
            .await
            .expect("empty list")
            .expect("one");
        assert!(last.devices.is_empty());
        assert!(
            small_stream.message().await.expect("clean end").is_none(),
            "the removed resource's stream ends"
        );
        wait_for(|| !socket.exists()).await;

        big_tx.send_replace(devices("big", 1));
        let next = big_stream
            .message()
            .await
            .expect("big update")
            .expect("one");
        assert_eq!(
            next.devices,
            devices("big", 1),
            "the other resource is served on"
        );

        stop.send(()).expect("manager runs");
        manager.await.expect("manager stops");
        assert!(!dir.path().join(socket_name("akri.sh/big")).exists());
    }

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
