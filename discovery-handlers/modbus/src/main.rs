//! `verge-modbus-discovery`: `modbus-tcp` and/or `modbus-rtu` as external `v0` handlers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use verge_discovery_sdk::{
    DEFAULT_DISCOVERY_HANDLERS_DIRECTORY, DISCOVERY_HANDLERS_DIRECTORY_ENV, DiscoveryHandler,
    Runner, RunnerConfig,
};
use verge_modbus::{ModbusRtu, ModbusTcp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Rtu,
    Both,
}

/// Serve the Modbus discovery handlers and register them with the node's agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory of the agent's registration socket (each handler serves <directory>/<name>.sock).
    #[arg(long, env = DISCOVERY_HANDLERS_DIRECTORY_ENV, default_value = DEFAULT_DISCOVERY_HANDLERS_DIRECTORY)]
    directory: PathBuf,
    /// Which handlers to serve: modbus-tcp, modbus-rtu or both.
    #[arg(long, env = "MODBUS_TRANSPORTS", value_enum, default_value = "both")]
    transport: Transport,
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
    let mut handlers: Vec<Arc<dyn DiscoveryHandler>> = Vec::new();
    if args.transport != Transport::Rtu {
        handlers.push(Arc::new(ModbusTcp::default()));
    }
    if args.transport != Transport::Tcp {
        handlers.push(Arc::new(ModbusRtu::default()));
    }
    let runs = handlers.into_iter().map(|h| {
        let mut config = RunnerConfig::from_env();
        config.directory = args.directory.clone();
        let name = h.name().to_string();
        async move { (name, Runner::new(h, config).run_until_signal().await) }
    });
    // The first runner to stop (signal or error) ends the process.
    let ((name, result), _, _) = futures::future::select_all(runs.map(Box::pin)).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-modbus-discovery ({name}): {e}");
            ExitCode::FAILURE
        }
    }
}
