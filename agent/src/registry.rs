//! The handler registry: embedded handlers and external ones that register
//! over `v0.Registration` on the node-local socket. Both kinds are plain
//! `DiscoveryHandler`s from here on.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use verge_device_plugin_proto::v0::register_discovery_handler_request::EndpointType;
use verge_device_plugin_proto::v0::registration_server::{Registration, RegistrationServer};
use verge_device_plugin_proto::v0::{Empty, RegisterDiscoveryHandlerRequest};
use verge_discovery_sdk::{
    DiscoveryHandler, HandlerEndpoint, REGISTRATION_SOCKET_NAME, RemoteHandler, uds,
};

use crate::metrics::{HandlerLabel, Metrics};

/// Mode of the registration socket: owner and group only, so only processes
/// in the handler group (pods with that supplemental group) can register.
const REGISTRATION_SOCKET_MODE: u32 = 0o660;

/// One registered endpoint of a handler.
#[derive(Clone)]
pub struct HandlerInstance {
    /// Where it serves (or `None` for embedded handlers).
    pub endpoint: Option<HandlerEndpoint>,
    /// The handler.
    pub handler: Arc<dyn DiscoveryHandler>,
    /// Registration counter value when registered; a re-registration of the same
    /// endpoint changes it, which restarts discovery streams on that endpoint.
    pub generation: u64,
}

/// Registered handlers, with change notification.
pub struct Registry {
    handlers: Mutex<HashMap<String, Vec<HandlerInstance>>>,
    /// Networks where plain-http handler endpoints are accepted: the node's
    /// own pod CIDRs (and loopback). Anything else must use TLS, because
    /// Discover requests carry values read from Secrets.
    plain_networks: Mutex<Vec<ipnet::IpNet>>,
    client_tls: Mutex<Option<verge_discovery_sdk::tls::ClientTlsConfig>>,
    counter: Mutex<u64>,
    changes: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// Why a registration is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistrationError {
    /// Empty name.
    #[error("handler name is empty")]
    EmptyName,
    /// A UDS endpoint outside the handlers directory.
    #[error("unix endpoint {0} is not inside {1}")]
    OutsideDirectory(String, String),
    /// A network endpoint that is not http(s)://host:port.
    #[error("network endpoint {0:?} is not http(s)://<ip>:<port>")]
    BadNetworkEndpoint(String),
    /// Plain http outside the node's pod network.
    #[error("network endpoint {0} is outside this node's pod network ({1}); use https")]
    PlainOutsidePodNetwork(String, String),
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        Arc::new(Self {
            handlers: Mutex::new(HashMap::new()),
            plain_networks: Mutex::new(vec![
                "127.0.0.0/8"
                    .parse()
                    .unwrap_or_else(|_| unreachable!("valid CIDR")),
                "::1/128"
                    .parse()
                    .unwrap_or_else(|_| unreachable!("valid CIDR")),
            ]),
            client_tls: Mutex::new(None),
            counter: Mutex::new(0),
            changes,
            metrics,
        })
    }

    /// Adds networks (the node's pod CIDRs) where plain-http endpoints are accepted.
    pub fn allow_plain_networks(&self, networks: impl IntoIterator<Item = ipnet::IpNet>) {
        self.plain_networks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(networks);
    }

    /// TLS settings for dialling `https://` handler endpoints registered from now on.
    pub fn set_client_tls(&self, tls: Option<verge_discovery_sdk::tls::ClientTlsConfig>) {
        *self.client_tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// Subscribes to changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn next_generation(&self) -> u64 {
        let mut c = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        *c
    }

    /// Adds an embedded handler.
    pub fn add_embedded(&self, handler: Arc<dyn DiscoveryHandler>) {
        let name = handler.name().to_string();
        let generation = self.next_generation();
        self.insert(
            name,
            HandlerInstance {
                endpoint: None,
                handler,
                generation,
            },
        );
    }

    fn insert(&self, name: String, instance: HandlerInstance) {
        self.metrics
            .handler_registrations
            .get_or_create(&HandlerLabel {
                handler: name.clone(),
            })
            .inc();
        {
            let mut map = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
            let list = map.entry(name).or_default();
            list.retain(|h| h.endpoint != instance.endpoint);
            list.push(instance);
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// Adds (or refreshes) an external handler endpoint.
    pub fn register(
        &self,
        request: RegisterDiscoveryHandlerRequest,
        directory: &Path,
    ) -> Result<(), RegistrationError> {
        if request.name.is_empty() {
            return Err(RegistrationError::EmptyName);
        }
        let endpoint = match EndpointType::try_from(request.endpoint_type)
            .unwrap_or(EndpointType::Uds)
        {
            EndpointType::Uds => {
                let path = PathBuf::from(&request.endpoint);
                // Only sockets in the shared handlers directory: a registration
                // must not make the agent dial arbitrary paths on the node.
                if !path.starts_with(directory) || path.components().any(|c| c.as_os_str() == "..")
                {
                    return Err(RegistrationError::OutsideDirectory(
                        request.endpoint,
                        directory.display().to_string(),
                    ));
                }
                HandlerEndpoint::Uds(path)
            }
            EndpointType::Network => {
                let (plain, rest) = match (
                    request.endpoint.strip_prefix("http://"),
                    request.endpoint.strip_prefix("https://"),
                ) {
                    (Some(rest), _) => (true, rest),
                    (None, Some(rest)) => (false, rest),
                    (None, None) => {
                        return Err(RegistrationError::BadNetworkEndpoint(request.endpoint));
                    }
                };
                let Ok(addr) = rest.trim_end_matches('/').parse::<std::net::SocketAddr>() else {
                    return Err(RegistrationError::BadNetworkEndpoint(request.endpoint));
                };
                if plain {
                    let nets = self
                        .plain_networks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    if !nets.iter().any(|n| n.contains(&addr.ip())) {
                        let list = nets
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(RegistrationError::PlainOutsidePodNetwork(
                            request.endpoint,
                            list,
                        ));
                    }
                }
                HandlerEndpoint::Network(request.endpoint)
            }
        };
        let tls = self
            .client_tls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let remote = RemoteHandler::new(request.name.clone(), request.shared, endpoint.clone())
            .with_tls(tls);
        let generation = self.next_generation();
        tracing::info!(handler = %request.name, %endpoint, shared = request.shared, "handler registered");
        self.insert(
            request.name,
            HandlerInstance {
                endpoint: Some(endpoint),
                handler: Arc::new(remote),
                generation,
            },
        );
        Ok(())
    }

    /// Endpoints of a handler.
    pub fn get(&self, name: &str) -> Vec<HandlerInstance> {
        self.handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}

struct RegistrationService {
    registry: Arc<Registry>,
    directory: PathBuf,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register_discovery_handler(
        &self,
        request: Request<RegisterDiscoveryHandlerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.registry
            .register(request.into_inner(), &self.directory)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }
}

/// Binds the registration socket: mode 0660 and, when given, group `gid`, so
/// only handler pods that carry that supplemental group can register.
pub fn bind(directory: &Path, gid: Option<u32>) -> std::io::Result<tokio::net::UnixListener> {
    std::fs::create_dir_all(directory)?;
    let path = directory.join(REGISTRATION_SOCKET_NAME);
    let listener = uds::bind(&path)?;
    std::fs::set_permissions(
        &path,
        std::fs::Permissions::from_mode(REGISTRATION_SOCKET_MODE),
    )?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&path, None, Some(gid))?;
    }
    tracing::info!(socket = %path.display(), "registration socket ready");
    Ok(listener)
}

/// Serves the Registration service on `listener` (from [`bind`]).
pub async fn serve(
    registry: Arc<Registry>,
    directory: PathBuf,
    listener: tokio::net::UnixListener,
) -> std::io::Result<()> {
    tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(RegistrationService {
            registry,
            directory,
        }))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, endpoint: &str, t: EndpointType) -> RegisterDiscoveryHandlerRequest {
        RegisterDiscoveryHandlerRequest {
            name: name.into(),
            endpoint: endpoint.into(),
            endpoint_type: t as i32,
            shared: true,
        }
    }

    #[test]
    fn endpoints_of_one_name_merge_and_reregistration_replaces() {
        let r = Registry::new(Metrics::new());
        let dir = Path::new("/var/lib/akri");
        let rx = r.subscribe();
        r.register(req("h", "/var/lib/akri/h1.sock", EndpointType::Uds), dir)
            .expect("ok");
        r.register(req("h", "/var/lib/akri/h2.sock", EndpointType::Uds), dir)
            .expect("ok");
        assert_eq!(r.get("h").len(), 2);
        let g1 = r.get("h")[0].generation;
        r.register(req("h", "/var/lib/akri/h1.sock", EndpointType::Uds), dir)
            .expect("ok");
        assert_eq!(r.get("h").len(), 2);
        assert!(
            r.get("h").iter().all(|i| i.generation != g1),
            "re-registration bumps the generation"
        );
        assert!(rx.has_changed().unwrap_or(false));
    }

    #[test]
    fn bad_endpoints_are_refused() {
        let r = Registry::new(Metrics::new());
        let dir = Path::new("/var/lib/akri");
        assert_eq!(
            r.register(req("", "/var/lib/akri/x.sock", EndpointType::Uds), dir),
            Err(RegistrationError::EmptyName)
        );
        assert!(matches!(
            r.register(req("h", "/etc/passwd", EndpointType::Uds), dir),
            Err(RegistrationError::OutsideDirectory(..))
        ));
        assert!(matches!(
            r.register(
                req("h", "/var/lib/akri/../../etc/x", EndpointType::Uds),
                dir
            ),
            Err(RegistrationError::OutsideDirectory(..))
        ));
        assert!(matches!(
            r.register(req("h", "tcp://1.2.3.4:5", EndpointType::Network), dir),
            Err(RegistrationError::BadNetworkEndpoint(_))
        ));
        // Plain http only on the node's pod network (or loopback); TLS anywhere.
        assert!(matches!(
            r.register(req("h", "http://10.0.0.5:8080", EndpointType::Network), dir),
            Err(RegistrationError::PlainOutsidePodNetwork(..))
        ));
        assert!(
            r.register(
                req("h", "https://10.0.0.5:8080", EndpointType::Network),
                dir
            )
            .is_ok()
        );
        assert!(
            r.register(
                req("h", "http://127.0.0.1:8080", EndpointType::Network),
                dir
            )
            .is_ok()
        );
        r.allow_plain_networks(["10.0.0.0/24".parse().expect("cidr")]);
        assert!(
            r.register(req("h", "http://10.0.0.5:8080", EndpointType::Network), dir)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn registration_socket_is_0660_with_the_handler_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("verge-reg-{}", std::process::id()));
        // A gid other than ours, so the chown is visible (the agent runs as root).
        let gid = 4242;
        let _listener = bind(&dir, Some(gid)).expect("bind");
        let meta = std::fs::metadata(dir.join(REGISTRATION_SOCKET_NAME)).expect("socket");
        let chowned = meta.gid();
        let mode = meta.mode() & 0o777;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(mode, 0o660, "mode {mode:o}");
        if running_as_root() {
            assert_eq!(chowned, gid);
        }
    }

    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            })
            .unwrap_or(false)
    }
}
