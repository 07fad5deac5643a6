//! Serves a handler as an external `v0` handler and keeps it registered.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use verge_device_plugin_proto::v0::RegisterDiscoveryHandlerRequest;
use verge_device_plugin_proto::v0::register_discovery_handler_request::EndpointType;
use verge_device_plugin_proto::v0::registration_client::RegistrationClient;

use crate::health::HealthState;
use crate::server::DiscoveryService;
use crate::{
    DEFAULT_DISCOVERY_HANDLERS_DIRECTORY, DISCOVERY_HANDLERS_DIRECTORY_ENV, DiscoveryHandler,
    REGISTRATION_SOCKET_NAME, uds,
};

/// Default first delay before retrying a failed registration.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Default cap of the registration retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default interval at which the registration socket is checked for an agent restart.
/// Checking is one `stat` call, so a short interval is cheap and keeps
/// re-registration well within a second of the agent coming back.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// Default timeout of one registration call.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the handler serves `Discover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeEndpoint {
    /// `<directory>/<handler name>.sock`.
    DefaultUds,
    /// A unix socket at this path.
    Uds(PathBuf),
    /// A TCP address to bind, and the `http://<ip>:<port>` URL the agent should dial
    /// (`https://` when [`RunnerConfig::tls`] is set).
    Network {
        /// Address to listen on.
        bind: SocketAddr,
        /// URL registered with the agent.
        advertise: String,
    },
}

/// How the runner serves and registers.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Directory holding the agent's registration socket (and by default ours).
    pub directory: PathBuf,
    /// Where to serve.
    pub endpoint: ServeEndpoint,
    /// First retry delay for registration.
    pub backoff_initial: Duration,
    /// Largest retry delay for registration.
    pub backoff_max: Duration,
    /// How often to look for a restarted agent.
    pub watch_interval: Duration,
    /// Timeout of one registration call.
    pub register_timeout: Duration,
    /// Override of the handler's own `shared` declaration.
    pub shared: Option<bool>,
    /// Serve a network endpoint over TLS (see [`crate::tls::server_config`]). Required by the
    /// agent for endpoints outside its node's pod network.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where to report serving and registration, for a health endpoint
    /// ([`crate::health::bind`]); several runners of one process share one.
    pub health: Option<HealthState>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            directory: PathBuf::from(DEFAULT_DISCOVERY_HANDLERS_DIRECTORY),
            endpoint: ServeEndpoint::DefaultUds,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            shared: None,
            tls: None,
            health: None,
        }
    }
}

impl RunnerConfig {
    /// Defaults, with the directory from `$DISCOVERY_HANDLERS_DIRECTORY`.
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Some(dir) = std::env::var_os(DISCOVERY_HANDLERS_DIRECTORY_ENV) {
            config.directory = PathBuf::from(dir);
        }
        config
    }

    /// The agent's registration socket.
    pub fn registration_socket(&self) -> PathBuf {
        self.directory.join(REGISTRATION_SOCKET_NAME)
    }
}

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The endpoint could not be bound.
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        /// What we tried to bind.
        endpoint: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("discovery server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The settings contradict each other.
    #[error("{0}")]
    Config(String),
}

type ServeFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Serves one handler and keeps it registered with the node's agent.
pub struct Runner {
    handler: Arc<dyn DiscoveryHandler>,
    config: RunnerConfig,
}

impl Runner {
    /// A runner for `handler`.
    pub fn new(handler: Arc<dyn DiscoveryHandler>, config: RunnerConfig) -> Self {
        Self { handler, config }
    }

    /// Runs until SIGINT or SIGTERM, then removes its socket.
    pub async fn run_until_signal(self) -> Result<(), RunnerError> {
        self.run(shutdown_signal()).await
    }

    /// Runs until `shutdown` completes. Open `Discover` streams are dropped at
    /// shutdown rather than drained: they never end by themselves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunnerError> {
        let name = self.handler.name().to_string();
        let shared = self.config.shared.unwrap_or_else(|| self.handler.shared());
        let service = DiscoveryService::new(self.handler.clone()).into_server();
        let mut server = tonic::transport::Server::builder();
        match (&self.config.endpoint, &self.config.tls) {
            (ServeEndpoint::Network { advertise, .. }, Some(tls)) => {
                if !advertise.starts_with("https://") {
                    return Err(RunnerError::Config(format!(
                        "serving TLS but advertising {advertise:?}: advertise https://<ip>:<port>"
                    )));
                }
                server = server.tls_config(tls.clone())?;
            }
            (ServeEndpoint::Network { advertise, .. }, None)
                if advertise.starts_with("https://") =>
            {
                return Err(RunnerError::Config(format!(
                    "advertising {advertise:?} needs a TLS certificate and key"
                )));
            }
            (_, Some(_)) if !matches!(self.config.endpoint, ServeEndpoint::Network { .. }) => {
                return Err(RunnerError::Config(
                    "TLS applies to network endpoints only, not unix sockets".to_string(),
                ));
            }
            _ => {}
        }
        let router = server.add_service(service);

        let (serve, request, socket_path) = match &self.config.endpoint {
            ServeEndpoint::Network { bind, advertise } => {
                let listener = tokio::net::TcpListener::bind(bind)
                    .await
                    .map_err(|source| RunnerError::Bind {
                        endpoint: bind.to_string(),
                        source,
                    })?;
                let request = RegisterDiscoveryHandlerRequest {
                    name: name.clone(),
                    endpoint: advertise.clone(),
                    endpoint_type: EndpointType::Network as i32,
                    shared,
                };
                let serve = Box::pin(router.serve_with_incoming(TcpListenerStream::new(listener)))
                    as ServeFuture;
                (serve, request, None)
            }
            uds_endpoint => {
                let path = match uds_endpoint {
                    ServeEndpoint::Uds(p) => p.clone(),
                    _ => self.config.directory.join(format!("{name}.sock")),
                };
                let listener = uds::bind(&path).map_err(|source| RunnerError::Bind {
                    endpoint: path.display().to_string(),
                    source,
                })?;
                let request = RegisterDiscoveryHandlerRequest {
                    name: name.clone(),
                    endpoint: path.display().to_string(),
                    endpoint_type: EndpointType::Uds as i32,
                    shared,
                };
                let serve = Box::pin(router.serve_with_incoming(UnixListenerStream::new(listener)))
                    as ServeFuture;
                (serve, request, Some(path))
            }
        };
        tracing::info!(handler = %name, endpoint = %request.endpoint, shared, "serving discovery handler");
        // The listener is bound and the server future holds it: connections are accepted from
        // here on, which is what liveness means for a handler.
        if let Some(health) = &self.config.health {
            health.set_serving(&name, true);
        }

        let registration = keep_registered(self.config.clone(), request);
        let result = tokio::select! {
            r = serve => r.map_err(RunnerError::from),
            _ = registration => Ok(()),
            _ = shutdown => {
                tracing::info!(handler = %name, "shutting down");
                Ok(())
            }
        };
        if let Some(health) = &self.config.health {
            health.set_serving(&name, false);
            health.set_registered(&name, false);
        }
        if let Some(path) = socket_path {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// What identifies one incarnation of the agent's socket file: a restarted
/// agent binds a new file, so at least the change time differs even when the
/// filesystem reuses the inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

fn socket_identity(path: &Path) -> Option<SocketIdentity> {
    let m = std::fs::metadata(path).ok()?;
    Some(SocketIdentity {
        dev: m.dev(),
        ino: m.ino(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
    })
}

/// Registers, then re-registers whenever the agent's socket is replaced (the
/// agent restarted and forgot us). Failed attempts back off exponentially up
/// to `backoff_max`. Never returns.
async fn keep_registered(config: RunnerConfig, request: RegisterDiscoveryHandlerRequest) {
    let socket = config.registration_socket();
    let mut registered: Option<SocketIdentity> = None;
    let mut backoff = config.backoff_initial;
    let mut waiting_logged = false;
    let report = |registered: bool| {
        if let Some(health) = &config.health {
            health.set_registered(&request.name, registered);
        }
    };
    loop {
        let current = socket_identity(&socket);
        match current {
            None => {
                if !waiting_logged {
                    tracing::info!(socket = %socket.display(), "waiting for the agent's registration socket");
                    waiting_logged = true;
                }
                registered = None;
                report(false);
            }
            Some(id) if registered != Some(id) => {
                match register(&socket, &request, config.register_timeout).await {
                    Ok(()) => {
                        tracing::info!(handler = %request.name, "registered with the agent");
                        registered = Some(id);
                        report(true);
                        backoff = config.backoff_initial;
                        waiting_logged = false;
                    }
                    Err(e) => {
                        // A new agent socket we are not registered with: the old registration
                        // died with the old agent.
                        report(false);
                        tracing::warn!(handler = %request.name, error = %e, retry_in = ?backoff, "registration failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(config.backoff_max);
                        continue;
                    }
                }
            }
            Some(_) => {}
        }
        tokio::time::sleep(config.watch_interval).await;
    }
}

async fn register(
    socket: &Path,
    request: &RegisterDiscoveryHandlerRequest,
    timeout: Duration,
) -> Result<(), tonic::Status> {
    let channel = uds::connect(socket, timeout)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = RegistrationClient::new(channel);
    let mut req = tonic::Request::new(request.clone());
    req.set_timeout(timeout);
    client.register_discovery_handler(req).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
