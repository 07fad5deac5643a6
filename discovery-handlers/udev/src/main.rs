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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    Args::parse()
        .serve
        .serve("verge-udev-discovery", Arc::new(Udev::new()))
        .await
}
