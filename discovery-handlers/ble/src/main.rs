//! `verge-ble-discovery`: the `ble` handler as an external `v0` handler.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_ble::Ble;
use verge_discovery_sdk::cli::ServeArgs;

/// Serve the Bluetooth LE discovery handler and register it with the node's agent.
/// BlueZ is reached on the system D-Bus (DBUS_SYSTEM_BUS_ADDRESS, default
/// /run/dbus/system_bus_socket).
#[derive(Parser, Debug)]
// --socket keeps reading $BLE_SOCKET, the variable it had before the shared flags.
#[command(version, mut_arg("socket", |a| a.env("BLE_SOCKET")))]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    Args::parse()
        .serve
        .serve("verge-ble-discovery", Arc::new(Ble::new()))
        .await
}
