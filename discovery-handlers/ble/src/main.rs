//! `verge-ble-discovery`: the `ble` handler as an external `v0` handler.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_ble::Ble;
use verge_discovery_sdk::runner::ServeEndpoint;
use verge_discovery_sdk::{
    DEFAULT_DISCOVERY_HANDLERS_DIRECTORY, DISCOVERY_HANDLERS_DIRECTORY_ENV, Runner, RunnerConfig,
};

/// Serve the Bluetooth LE discovery handler and register it with the node's agent.
/// BlueZ is reached on the system D-Bus (DBUS_SYSTEM_BUS_ADDRESS, default
/// /run/dbus/system_bus_socket).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory of the agent's registration socket.
    #[arg(long, env = DISCOVERY_HANDLERS_DIRECTORY_ENV, default_value = DEFAULT_DISCOVERY_HANDLERS_DIRECTORY)]
    directory: PathBuf,
    /// Socket to serve on (default: <directory>/ble.sock).
    #[arg(long, env = "BLE_SOCKET")]
    socket: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = RunnerConfig::from_env();
    config.directory = args.directory;
    if let Some(socket) = args.socket {
        config.endpoint = ServeEndpoint::Uds(socket);
    }
    match Runner::new(Arc::new(Ble::new()), config)
        .run_until_signal()
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-ble-discovery: {e}");
            ExitCode::FAILURE
        }
    }
}
