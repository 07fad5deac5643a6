//! `verge-mdns-discovery`: the mdns handler as an external `v0` handler.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_discovery_sdk::cli::ServeArgs;
use verge_mdns::Mdns;

/// Serve the mdns discovery handler and register it with the node's agent.
#[derive(Parser, Debug)]
// --socket keeps reading $MDNS_SOCKET, the variable it had before the shared flags.
#[command(version, mut_arg("socket", |a| a.env("MDNS_SOCKET")))]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// Declare the devices node-local instead of shared.
    #[arg(long, env = "MDNS_NOT_SHARED")]
    not_shared: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    let args = Args::parse();
    let handler = Arc::new(Mdns::new(!args.not_shared));
    args.serve.serve("verge-mdns-discovery", handler).await
}
