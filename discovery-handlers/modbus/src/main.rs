//! `verge-modbus-discovery`: `modbus-tcp` and/or `modbus-rtu` as external `v0` handlers.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, ValueEnum};
use verge_discovery_sdk::cli::ServeArgs;
use verge_discovery_sdk::{DiscoveryHandler, Runner};
use verge_modbus::{ModbusRtu, ModbusTcp};

const PROGRAM: &str = "verge-modbus-discovery";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Rtu,
    Both,
}

/// Serve the Modbus discovery handlers and register them with the node's agent
/// (each on <directory>/<name>.sock unless --socket or --listen serves the one chosen).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// Which handlers to serve: modbus-tcp, modbus-rtu or both.
    #[arg(long, env = "MODBUS_TRANSPORTS", value_enum, default_value = "both")]
    transport: Transport,
}

#[tokio::main]
async fn main() -> ExitCode {
    verge_discovery_sdk::cli::init_logging();
    let args = Args::parse();
    if args.transport == Transport::Both
        && (args.serve.socket.is_some() || args.serve.listen.is_some())
    {
        // One socket or address cannot serve two handlers.
        Args::command()
            .bin_name(PROGRAM)
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--socket and --listen serve one handler: give --transport tcp or rtu",
            )
            .exit();
    }
    let handlers: [Arc<dyn DiscoveryHandler>; 2] = match args.transport {
        Transport::Tcp => {
            return args
                .serve
                .serve(PROGRAM, Arc::new(ModbusTcp::default()))
                .await;
        }
        Transport::Rtu => {
            return args
                .serve
                .serve(PROGRAM, Arc::new(ModbusRtu::default()))
                .await;
        }
        Transport::Both => [
            Arc::new(ModbusTcp::default()),
            Arc::new(ModbusRtu::default()),
        ],
    };
    let config = match args.serve.runner_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{PROGRAM}: {e}");
            return ExitCode::from(2);
        }
    };
    let runs = handlers.into_iter().map(|h| {
        let config = config.clone();
        let name = h.name().to_string();
        async move { (name, Runner::new(h, config).run_until_signal().await) }
    });
    // The first runner to stop (signal or error) ends the process.
    let ((name, result), _, _) = futures::future::select_all(runs.map(Box::pin)).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{PROGRAM} ({name}): {e}");
            ExitCode::FAILURE
        }
    }
}
