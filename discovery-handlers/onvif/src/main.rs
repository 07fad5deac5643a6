//! `verge-onvif-discovery`: the onvif handler as an external `v0` handler.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_discovery_sdk::cli::ServeArgs;
use verge_onvif::Onvif;

/// Serve the onvif discovery handler and register it with the node's agent.
#[derive(Parser, Debug)]
// --socket keeps reading $ONVIF_SOCKET, the variable it had before the shared flags.
#[command(version, mut_arg("socket", |a| a.env("ONVIF_SOCKET")))]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    Args::parse()
        .serve
        .serve("verge-onvif-discovery", Arc::new(Onvif::default()))
        .await
}
