//! `verge-udev-discovery`: the udev handler as an external `v0` handler.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_discovery_sdk::cli::ServeArgs;
use verge_udev::Udev;

/// Serve the udev discovery handler and register it with the node's agent.
#[derive(Parser, Debug)]
// --socket keeps reading $UDEV_DISCOVERY_SOCKET, the variable it had before the shared flags.
#[command(version, mut_arg("socket", |a| a.env("UDEV_DISCOVERY_SOCKET")))]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    Args::parse()
        .serve
        .serve("verge-udev-discovery", Arc::new(Udev::new()))
        .await
}
