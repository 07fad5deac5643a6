//! `verge-agent`: the per-node agent.
//!
//! ```text
//! handlers ──Discover──► discovery ──device lists──► state ──► device plugins ──► kubelet
//!                                                        └──► Instance writer ──► API server
//! ```

mod allocate;
mod config;
mod discover;
mod discovery;
mod instances;
mod metrics;
mod plugins;
mod podresources;
mod properties;
mod registry;
mod state;
mod status;
mod watchers;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Parser, Subcommand};
use tokio::sync::{Notify, mpsc};

use crate::allocate::AgentAllocator;
use crate::config::AgentConfig;
use crate::instances::{WriterConfig, WriterEvent};
use crate::metrics::Metrics;
use crate::plugins::PluginManager;
use crate::podresources::PodResources;
use crate::registry::Registry;
use crate::state::{AgentState, Effects};
use crate::status::StatusBoard;

/// Verge node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent on this node.
    Run(Box<AgentConfig>),
    /// Run one discovery handler locally, without a cluster, and print its devices.
    Discover(discover::DiscoverArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs on stderr: stdout carries `discover`'s device lists (`--json` is one object per line).
    verge_discovery_sdk::cli::init_logging();
    // Embedded handlers can bring a second rustls provider (oxvif's reqwest enables aws-lc-rs);
    // with two compiled in, rustls cannot choose for kube's client and panics. Choose ring, as
    // kube and tonic are configured.
    verge_discovery_sdk::tls::ensure_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => match run(*config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "verge-agent failed");
                ExitCode::FAILURE
            }
        },
        Command::Discover(args) => discover::run(args).await,
    }
}

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("cannot serve the registration socket: {0}")]
    Registration(std::io::Error),
    #[error("handler TLS settings: {0}")]
    HandlerTls(#[from] verge_discovery_sdk::tls::TlsError),
}

async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let client = kube::Client::try_default().await?;
    let metrics = Metrics::new();
    let registry = Registry::new(metrics.clone());
    registry.set_client_tls(config.handler_tls.client_config()?);
    registry.allow_plain_networks(config.pod_network_cidrs.iter().copied());
    allow_pod_networks(&client, &config.node_name, &registry).await;
    add_embedded_handlers(&registry, &config);

    let (plugin_tx, plugin_rx) = mpsc::unbounded_channel();
    let (write_tx, write_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    let grace = Arc::new(Notify::new());
    let state = Arc::new(Mutex::new(AgentState::new(
        config.node_name.clone(),
        Effects {
            plugins: plugin_tx,
            writes: write_tx.clone(),
            status: status_tx.clone(),
            grace: grace.clone(),
        },
        Some(metrics.clone()),
    )));
    let board = StatusBoard::new(status_tx);

    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<WriterEvent>();
    tokio::spawn(instances::run_writer(
        client.clone(),
        WriterConfig {
            node: config.node_name.clone(),
            backoff_initial: config.api_backoff_initial,
            backoff_max: config.api_backoff_max,
            concurrency: config.api_write_concurrency,
        },
        write_rx,
        events_tx,
        metrics.clone(),
    ));
    {
        let state = state.clone();
        tokio::spawn(async move {
            while let Some(WriterEvent::Conflict(key, since)) = events_rx.recv().await {
                tracing::info!(instance = %key.name, "slot claim lost to another node");
                if let Ok(mut s) = state.lock() {
                    s.claim_failed(&key, since);
                }
            }
        });
    }

    let pod_resources = PodResources::new(
        config.pod_resources_socket.clone(),
        config.kubelet.pod_resources_timeout,
        config.kubelet.kubelet_sync_poll,
    );
    let allocator = Arc::new(AgentAllocator {
        state: state.clone(),
        writes: write_tx,
        pod_resources: pod_resources.clone(),
        claim_timeout: config.claim_timeout,
        kubelet_sync_timeout: config.kubelet_sync_timeout,
        metrics: metrics.clone(),
    });
    let manager = PluginManager::new(
        config.device_plugins_directory.clone(),
        Arc::new(allocator),
        metrics.clone(),
        config.kubelet,
    );
    let (stop_plugins, plugins_stopped) = tokio::sync::oneshot::channel();
    let plugin_task = tokio::spawn(manager.run(plugin_rx, plugins_stopped));
    tokio::spawn(podresources::reclaim_loop(
        pod_resources,
        state.clone(),
        config.slot_reclaim_interval,
        config.allocation_grace,
        metrics.clone(),
    ));
    tokio::spawn(expire_loop(state.clone(), grace));
    tokio::spawn(status::run_writer(
        client.clone(),
        config.node_name.clone(),
        state.clone(),
        board.clone(),
        status_rx,
        config.status_interval,
        metrics.clone(),
    ));
    let (instances_listed_tx, instances_listed) = tokio::sync::watch::channel(false);
    let instances_listed_ready = instances_listed.clone();
    tokio::spawn(watchers::watch_instances(
        client.clone(),
        config.watch_namespace.clone(),
        state.clone(),
        instances_listed_tx,
    ));
    tokio::spawn(
        watchers::ConfigWatcher {
            client: client.clone(),
            config: config.clone(),
            registry: registry.clone(),
            state: state.clone(),
            board,
            instances_listed,
        }
        .run(),
    );
    {
        let metrics = metrics.clone();
        let address = config.metrics_address;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(address, metrics).await {
                tracing::error!(%address, error = %e, "metrics server failed");
            }
        });
    }
    let listener = registry::bind(
        &config.discovery_handlers_directory,
        config.registration_socket_gid,
    )
    .map_err(AgentError::Registration)?;
    let registration = tokio::spawn(registry::serve(
        registry,
        config.discovery_handlers_directory.clone(),
        listener,
    ));
    // Ready once handlers can register and existing Instances are adopted:
    // before that, a rolling update could replace the previous agent while
    // this one would still recreate what that one served.
    {
        let metrics = metrics.clone();
        let mut listed = instances_listed_ready;
        tokio::spawn(async move {
            if listed.wait_for(|listed| *listed).await.is_ok() {
                metrics
                    .ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("ready: registration socket bound, Instances adopted");
            }
        });
    }
    tracing::info!(node = %config.node_name, "verge-agent running");

    tokio::select! {
        r = registration => if let Ok(Err(e)) = r {
            return Err(AgentError::Registration(e));
        },
        _ = verge_discovery_sdk::runner::shutdown_signal() => {
            // Instances and slots stay as they are: the next agent adopts them.
            tracing::info!("shutting down");
        }
    }
    let _ = stop_plugins.send(());
    let _ = plugin_task.await;
    let _ = std::fs::remove_file(
        config
            .discovery_handlers_directory
            .join(verge_discovery_sdk::REGISTRATION_SOCKET_NAME),
    );
    Ok(())
}

/// Plain-http handler endpoints are accepted only on this node's pod network.
async fn allow_pod_networks(client: &kube::Client, node: &str, registry: &Registry) {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    match nodes.get_opt(node).await {
        Ok(Some(n)) => {
            let cidrs: Vec<ipnet::IpNet> = n
                .spec
                .into_iter()
                .flat_map(|s| {
                    s.pod_cidrs
                        .unwrap_or_default()
                        .into_iter()
                        .chain(s.pod_cidr)
                })
                .filter_map(|c| c.parse().ok())
                .collect();
            tracing::info!(
                ?cidrs,
                "plain-http handler endpoints accepted on the node's pod network"
            );
            registry.allow_plain_networks(cidrs);
        }
        Ok(None) => tracing::warn!(node, "Node not found; network handler endpoints need TLS"),
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read the Node; network handler endpoints need TLS")
        }
    }
}

/// Removes devices whose grace period ran out, waking exactly at the next deadline.
async fn expire_loop(state: Arc<Mutex<AgentState>>, changed: Arc<Notify>) {
    loop {
        let next = match state.lock() {
            Ok(mut s) => s.expire(Instant::now()),
            Err(_) => return,
        };
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = changed.notified() => {}
                }
            }
            None => changed.notified().await,
        }
    }
}

fn add_embedded_handlers(registry: &Registry, config: &AgentConfig) {
    let add = |handler: Arc<dyn verge_discovery_sdk::DiscoveryHandler>| {
        let name = handler.name();
        if config.disable_embedded_handlers.iter().any(|d| d == name) {
            tracing::info!(handler = name, "embedded handler disabled");
        } else {
            registry.add_embedded(handler);
        }
    };
    #[cfg(feature = "debug-echo")]
    if !config.disable_debug_echo {
        add(Arc::new(verge_debug_echo::DebugEcho::new(
            config.debug_echo_availability_file.clone(),
            true,
        )));
    }
    // ONVIF cameras are network devices: shared.
    #[cfg(feature = "onvif")]
    add(Arc::new(verge_onvif::Onvif::new(true)));
    // Announced services are reachable from every node on the link: shared.
    #[cfg(feature = "mdns")]
    add(Arc::new(verge_mdns::Mdns::new(true)));
    // Several nodes may hear one BLE peripheral: shared. Without D-Bus or an
    // adapter it only reports a diagnostic per Configuration, so it is always on.
    #[cfg(feature = "ble")]
    add(Arc::new(verge_ble::Ble::new()));
    // Two names because shared-ness is per registration: Modbus TCP units are
    // reachable from every node (shared), a serial line belongs to this node.
    #[cfg(feature = "modbus")]
    {
        add(Arc::new(verge_modbus::ModbusTcp::new(true)));
        add(Arc::new(verge_modbus::ModbusRtu::new(false)));
    }
    // USB devices hang off this node's own bus: not shared.
    #[cfg(feature = "usb")]
    add(Arc::new(verge_usb::Usb::new()));
    #[cfg(feature = "udev")]
    add(Arc::new(verge_udev::Udev::new()));
    let _ = (add, registry, config);
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The README's flag table is the user's reference: every flag of `run` is in it.
    #[test]
    fn every_run_flag_is_documented() {
        let readme = include_str!("../README.md");
        let cli = super::Cli::command();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let missing: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|long| !["help", "version"].contains(long))
            .filter(|long| !readme.contains(&format!("`--{long}`")))
            .map(str::to_string)
            .collect();
        assert!(missing.is_empty(), "not in agent/README.md: {missing:?}");
    }
}
