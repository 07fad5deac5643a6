//! A handler reached over gRPC, behind the same trait as embedded ones.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tonic::transport::{Channel, ClientTlsConfig};
use verge_device_plugin_proto::v0::DiscoverRequest;
use verge_device_plugin_proto::v0::discovery_handler_client::DiscoveryHandlerClient;

use crate::{
    DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate, uds,
};

/// Default time allowed to connect to a handler endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an external handler serves `Discover`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandlerEndpoint {
    /// A unix socket path.
    Uds(PathBuf),
    /// `http://<ip>:<port>` (or `https://` with TLS).
    Network(String),
}

impl std::fmt::Display for HandlerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerEndpoint::Uds(p) => write!(f, "unix:{}", p.display()),
            HandlerEndpoint::Network(u) => f.write_str(u),
        }
    }
}

/// An external handler, as the agent (or `verge-agent discover`) sees it.
#[derive(Clone, Debug)]
pub struct RemoteHandler {
    name: String,
    shared: bool,
    endpoint: HandlerEndpoint,
    connect_timeout: Duration,
    tls: Option<ClientTlsConfig>,
}

impl RemoteHandler {
    /// A handler registered under `name` at `endpoint`.
    pub fn new(name: impl Into<String>, shared: bool, endpoint: HandlerEndpoint) -> Self {
        Self {
            name: name.into(),
            shared,
            endpoint,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
        }
    }

    /// TLS settings for an `https://` endpoint (without them: the system roots, no client
    /// certificate). Ignored for unix sockets and `http://`.
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Changes the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &HandlerEndpoint {
        &self.endpoint
    }

    async fn channel(
        endpoint: HandlerEndpoint,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, DiscoveryError> {
        let result = match &endpoint {
            HandlerEndpoint::Uds(path) => uds::connect(path, timeout).await,
            HandlerEndpoint::Network(uri) => {
                let mut ep = tonic::transport::Endpoint::from_shared(uri.clone())
                    .map_err(|e| DiscoveryError::Transport(format!("{endpoint}: {e}")))?;
                if uri.starts_with("https://") {
                    crate::tls::ensure_crypto_provider();
                    let tls = tls.unwrap_or_else(|| ClientTlsConfig::new().with_enabled_roots());
                    ep = ep
                        .tls_config(tls)
                        .map_err(|e| DiscoveryError::Transport(format!("{endpoint}: {e}")))?;
                }
                ep.connect_timeout(timeout).connect().await
            }
        };
        result.map_err(|e| DiscoveryError::Transport(format!("{endpoint}: {e}")))
    }
}

impl DiscoveryHandler for RemoteHandler {
    fn name(&self) -> &str {
        &self.name
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let endpoint = self.endpoint.clone();
        let timeout = self.connect_timeout;
        let tls = self.tls.clone();
        Box::pin(async move {
            let channel = Self::channel(endpoint, timeout, tls).await?;
            let mut client = DiscoveryHandlerClient::new(channel);
            let response = client.discover(DiscoverRequest::from(request)).await?;
            let stream = response.into_inner().map(|item| {
                item.map(DiscoveryUpdate::from)
                    .map_err(DiscoveryError::from)
            });
            Ok(Box::pin(stream) as DeviceStream)
        })
    }
}
