//! `verge-modbus-discovery`: `modbus-tcp` and/or `modbus-rtu` as external `v0` handlers.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, ValueEnum};
use verge_discovery_sdk::DiscoveryHandler;
use verge_discovery_sdk::cli::ServeArgs;
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
    let handlers: Vec<Arc<dyn DiscoveryHandler>> = match args.transport {
        Transport::Tcp => vec![Arc::new(ModbusTcp::default())],
        Transport::Rtu => vec![Arc::new(ModbusRtu::default())],
        Transport::Both => vec![
            Arc::new(ModbusTcp::default()),
            Arc::new(ModbusRtu::default()),
        ],
    };
    // One process, one health endpoint (--health-address): ready once every handler is registered.
    args.serve.serve_all(PROGRAM, handlers).await
}
