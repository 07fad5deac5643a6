//! Every interval, timeout and path the agent uses, as flags with env vars.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Agent settings. Each has a flag, an env var and a documented default.
#[derive(Args, Debug, Clone)]
pub struct AgentConfig {
    /// Name of the node this agent runs on (the Downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory of the handler registration socket (agent-registration.sock)
    /// and of the handlers' own sockets.
    #[arg(
        long,
        env = "DISCOVERY_HANDLERS_DIRECTORY",
        default_value = "/var/lib/akri"
    )]
    pub discovery_handlers_directory: PathBuf,

    /// Group (numeric gid) given to the registration socket, whose mode is 0660,
    /// so only handler pods with this supplemental group can register.
    #[arg(long, env = "REGISTRATION_SOCKET_GID")]
    pub registration_socket_gid: Option<u32>,

    /// kubelet's device-plugin directory (kubelet.sock and the plugin sockets).
    #[arg(
        long,
        env = "DEVICE_PLUGINS_DIRECTORY",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub device_plugins_directory: PathBuf,

    /// kubelet's pod-resources socket.
    #[arg(
        long,
        env = "POD_RESOURCES_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub pod_resources_socket: PathBuf,

    /// How long a device may be missing from its handler's list before its
    /// Instance is removed. A Configuration can override it with the annotation
    /// `akri.sh/device-grace-period` (e.g. "0s", "2m").
    #[arg(long, env = "DEVICE_GRACE_PERIOD", default_value = "30s", value_parser = duration)]
    pub device_grace_period: Duration,

    /// How often kubelet's pod-resources API is read to reclaim slots of pods
    /// that are gone.
    #[arg(long, env = "SLOT_RECLAIM_INTERVAL", default_value = "500ms", value_parser = duration)]
    pub slot_reclaim_interval: Duration,

    /// A slot allocated less than this long ago is not reclaimed even if
    /// kubelet does not list it yet (kubelet records an allocation only after
    /// Allocate returns and the pod is admitted).
    #[arg(long, env = "ALLOCATION_GRACE", default_value = "10s", value_parser = duration)]
    pub allocation_grace: Duration,

    /// Longest time Allocate waits for kubelet to see the slot's twin device
    /// (the same slot through the other resource) as unhealthy.
    #[arg(long, env = "KUBELET_SYNC_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub kubelet_sync_timeout: Duration,

    /// Longest time Allocate waits to record a claim on a shared device in the
    /// API server (the claim that keeps other nodes off the slot).
    #[arg(long, env = "CLAIM_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub claim_timeout: Duration,

    /// First retry delay of a failed API write.
    #[arg(long, env = "API_BACKOFF_INITIAL", default_value = "200ms", value_parser = duration)]
    pub api_backoff_initial: Duration,

    /// Largest retry delay of a failed API write. Kept short so writes
    /// queued during an API-server outage land soon after it returns.
    #[arg(long, env = "API_BACKOFF_MAX", default_value = "5s", value_parser = duration)]
    pub api_backoff_max: Duration,

    /// API writes in flight at once.
    #[arg(long, env = "API_WRITE_CONCURRENCY", default_value_t = 4)]
    pub api_write_concurrency: usize,

    /// First delay before a discovery stream that ended or failed is opened
    /// again (doubles up to --discovery-backoff-max).
    #[arg(long, env = "DISCOVERY_BACKOFF_INITIAL", default_value = "200ms", value_parser = duration)]
    pub discovery_backoff_initial: Duration,

    /// Largest delay before a discovery stream that ended or failed is opened again.
    #[arg(long, env = "DISCOVERY_BACKOFF_MAX", default_value = "10s", value_parser = duration)]
    pub discovery_backoff_max: Duration,

    /// How often the Configuration status (conditions, per-node entry) is
    /// written at most; changes within one interval are coalesced into one write.
    #[arg(long, env = "STATUS_INTERVAL", default_value = "500ms", value_parser = duration)]
    pub status_interval: Duration,

    #[command(flatten)]
    pub kubelet: KubeletArgs,

    /// How often Secrets and ConfigMaps behind discoveryProperties are read
    /// again, so a rotated credential restarts discovery.
    #[arg(long, env = "PROPERTY_REFRESH_INTERVAL", default_value = "60s", value_parser = duration)]
    pub property_refresh_interval: Duration,

    /// Allow discoveryProperties to reference Secrets and ConfigMaps in other
    /// namespaces than the Configuration's (Akri's behaviour; off by default).
    #[arg(
        long,
        env = "ALLOW_CROSS_NAMESPACE_PROPERTIES",
        default_value_t = false
    )]
    pub allow_cross_namespace_properties: bool,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8090")]
    pub metrics_address: SocketAddr,

    /// Default availability file of the embedded debugEcho handler.
    #[arg(
        long,
        env = "DEBUG_ECHO_AVAILABILITY_FILE",
        default_value = "/tmp/debug-echo-availability.txt"
    )]
    pub debug_echo_availability_file: PathBuf,

    /// Serve only Configurations (and watch only Instances) in this namespace.
    /// Unset: every namespace. Lets several agents share a node in tests.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Disable the embedded debugEcho handler even when compiled in.
    #[arg(long, env = "DISABLE_DEBUG_ECHO", default_value_t = false)]
    pub disable_debug_echo: bool,

    /// Embedded handlers not to offer (names as Configurations use them, e.g.
    /// `ble,onvif`), so an external handler of that name — the chart's
    /// per-protocol DaemonSet — is the only one serving it instead of being
    /// merged with the embedded one.
    #[arg(
        long = "disable-embedded-handler",
        env = "DISABLE_EMBEDDED_HANDLERS",
        value_delimiter = ','
    )]
    pub disable_embedded_handlers: Vec<String>,

    /// This node's pod network(s), where plain-http handler endpoints are
    /// accepted, in addition to the Node's `spec.podCIDRs` (CNIs such as
    /// Calico or Cilium manage pod addresses without filling those in).
    #[arg(
        long = "pod-network-cidr",
        env = "POD_NETWORK_CIDRS",
        value_delimiter = ','
    )]
    pub pod_network_cidrs: Vec<ipnet::IpNet>,

    #[command(flatten)]
    pub handler_tls: HandlerTlsArgs,
}

/// Timings of the agent's calls to kubelet (registration and pod-resources).
#[derive(Args, Debug, Clone, Copy)]
pub struct KubeletArgs {
    /// Timeout of one registration call to kubelet.
    #[arg(long, env = "KUBELET_REGISTER_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub kubelet_register_timeout: Duration,

    /// Registrations sent to kubelet at once (after a kubelet restart every
    /// plugin registers again; kubelet handles them one by one).
    #[arg(long, env = "KUBELET_REGISTER_CONCURRENCY", default_value_t = 16)]
    pub kubelet_register_concurrency: usize,

    /// First retry delay of a failed kubelet registration (doubles up to
    /// --kubelet-register-retry-max).
    #[arg(long, env = "KUBELET_REGISTER_RETRY_INITIAL", default_value = "200ms", value_parser = duration)]
    pub kubelet_register_retry_initial: Duration,

    /// Largest retry delay of a failed kubelet registration.
    #[arg(long, env = "KUBELET_REGISTER_RETRY_MAX", default_value = "10s", value_parser = duration)]
    pub kubelet_register_retry_max: Duration,

    /// Timeout of one pod-resources call.
    #[arg(long, env = "POD_RESOURCES_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub pod_resources_timeout: Duration,

    /// How often Allocate re-reads kubelet's allocatable devices while it
    /// waits for kubelet to take in a device-list update (short: Allocate is
    /// waiting, and kubelet usually takes it in within milliseconds).
    #[arg(long, env = "KUBELET_SYNC_POLL", default_value = "5ms", value_parser = duration)]
    pub kubelet_sync_poll: Duration,
}

impl Default for KubeletArgs {
    fn default() -> Self {
        Self {
            kubelet_register_timeout: Duration::from_secs(5),
            kubelet_register_concurrency: 16,
            kubelet_register_retry_initial: Duration::from_millis(200),
            kubelet_register_retry_max: Duration::from_secs(10),
            pod_resources_timeout: Duration::from_secs(2),
            kubelet_sync_poll: Duration::from_millis(5),
        }
    }
}

/// How the agent dials `https://` handler endpoints (network handlers outside
/// the node's pod network must use TLS).
#[derive(Args, Debug, Clone, Default)]
pub struct HandlerTlsArgs {
    /// CA bundle (PEM) that signs the certificates of https:// handler
    /// endpoints. Unset: the system's trusted roots.
    #[arg(long, env = "HANDLER_TLS_CA_FILE")]
    pub handler_tls_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) presented to handlers that require one
    /// (mutual TLS). Needs --handler-tls-key-file.
    #[arg(long, env = "HANDLER_TLS_CERT_FILE", requires = "handler_tls_key_file")]
    pub handler_tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --handler-tls-cert-file.
    #[arg(long, env = "HANDLER_TLS_KEY_FILE", requires = "handler_tls_cert_file")]
    pub handler_tls_key_file: Option<PathBuf>,
}

impl HandlerTlsArgs {
    /// The client TLS settings, or `None` for the defaults (system roots, no
    /// client certificate). Unreadable or non-PEM files are an error.
    pub fn client_config(
        &self,
    ) -> Result<Option<verge_discovery_sdk::tls::ClientTlsConfig>, verge_discovery_sdk::tls::TlsError>
    {
        if self.handler_tls_ca_file.is_none() && self.handler_tls_cert_file.is_none() {
            return Ok(None);
        }
        verge_discovery_sdk::tls::client_config(
            self.handler_tls_ca_file.as_deref(),
            self.handler_tls_cert_file.as_deref(),
            self.handler_tls_key_file.as_deref(),
        )
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Kubelet {
        #[command(flatten)]
        k: KubeletArgs,
    }

    #[test]
    fn kubelet_defaults_match_the_flags() {
        let parsed = Kubelet::parse_from(["t"]).k;
        let d = KubeletArgs::default();
        assert_eq!(format!("{parsed:?}"), format!("{d:?}"));
    }
}
