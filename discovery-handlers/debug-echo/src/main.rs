//! `verge-debug-echo-discovery`: debugEcho as an external `v0` handler.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use verge_debug_echo::{DEFAULT_AVAILABILITY_FILE, DebugEcho};
use verge_discovery_sdk::cli::ServeArgs;

/// Serve the debugEcho discovery handler and register it with the node's agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// Availability file used when a Configuration names none.
    #[arg(long, env = "DEBUG_ECHO_AVAILABILITY_FILE", default_value = DEFAULT_AVAILABILITY_FILE)]
    availability_file: PathBuf,
    /// Declare the devices node-local instead of shared.
    #[arg(long, env = "DEBUG_ECHO_NOT_SHARED")]
    not_shared: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    let args = Args::parse();
    let handler = Arc::new(DebugEcho::new(args.availability_file, !args.not_shared));
    args.serve
        .serve("verge-debug-echo-discovery", handler)
        .await
}
