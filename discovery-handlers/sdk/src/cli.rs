//! Command-line flags every external handler binary shares: where to register, and where and how
//! to serve (a unix socket by default; a TCP address, optionally with TLS, for network handlers).
//!
//! ```no_run
//! use clap::Parser;
//! use verge_discovery_sdk::cli::ServeArgs;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     serve: ServeArgs,
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Args::parse().serve.runner_config()?;
//!     # let _ = config;
//!     Ok(())
//! }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::runner::ServeEndpoint;
use crate::{
    DEFAULT_DISCOVERY_HANDLERS_DIRECTORY, DISCOVERY_HANDLERS_DIRECTORY_ENV, DiscoveryHandler,
    Runner, RunnerConfig,
};

/// Logs of a handler binary: `tracing` to stderr (stdout stays free for output a caller parses),
/// filtered by `RUST_LOG`, `info` by default.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Environment variable a handler pod sets from the downward API (`status.podIP`), used to
/// advertise a network endpoint when `--listen` binds every address.
pub const POD_IP_ENV: &str = "POD_IP";

/// Where to register and how to serve.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Directory of the agent's registration socket.
    #[arg(long, env = DISCOVERY_HANDLERS_DIRECTORY_ENV, default_value = DEFAULT_DISCOVERY_HANDLERS_DIRECTORY)]
    pub directory: PathBuf,

    /// Unix socket to serve on (default: <directory>/<handler name>.sock).
    #[arg(long, env = "DISCOVERY_HANDLER_SOCKET", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,

    /// Serve on this TCP address instead of a unix socket (a NETWORK registration). The agent
    /// accepts plain http only from its node's pod network or loopback; elsewhere give
    /// --tls-cert-file and --tls-key-file.
    #[arg(long, env = "DISCOVERY_HANDLER_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// URL the agent dials (default: from --listen's address, or $POD_IP when it binds every
    /// address; https:// when TLS is on).
    #[arg(long, env = "DISCOVERY_HANDLER_ADVERTISE", requires = "listen")]
    pub advertise: Option<String>,

    /// Serving certificate (PEM) for TLS on --listen.
    #[arg(long, env = "DISCOVERY_HANDLER_TLS_CERT_FILE", requires_all = ["listen", "tls_key_file"])]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert-file.
    #[arg(
        long,
        env = "DISCOVERY_HANDLER_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// Require agents to present a client certificate signed by this CA (PEM): mutual TLS.
    #[arg(
        long,
        env = "DISCOVERY_HANDLER_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_client_ca_file: Option<PathBuf>,
}

/// Why the flags do not make a runner configuration.
#[derive(Debug, thiserror::Error)]
pub enum ServeArgsError {
    /// No address to advertise.
    #[error(
        "--listen {0} binds every address: give --advertise, or set ${POD_IP_ENV} (downward API)"
    )]
    NoAdvertiseAddress(SocketAddr),
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl ServeArgs {
    /// The runner configuration these flags describe.
    pub fn runner_config(&self) -> Result<RunnerConfig, ServeArgsError> {
        let mut config = RunnerConfig {
            directory: self.directory.clone(),
            ..RunnerConfig::default()
        };
        if let Some(socket) = &self.socket {
            config.endpoint = ServeEndpoint::Uds(socket.clone());
        }
        if let Some(bind) = self.listen {
            let scheme = if self.tls_cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            let advertise = match &self.advertise {
                Some(url) => url.clone(),
                None => {
                    let ip = if bind.ip().is_unspecified() {
                        std::env::var(POD_IP_ENV)
                            .ok()
                            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                            .ok_or(ServeArgsError::NoAdvertiseAddress(bind))?
                    } else {
                        bind.ip()
                    };
                    format!("{scheme}://{}", SocketAddr::new(ip, bind.port()))
                }
            };
            config.endpoint = ServeEndpoint::Network { bind, advertise };
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            config.tls = Some(crate::tls::server_config(
                cert,
                key,
                self.tls_client_ca_file.as_deref(),
            )?);
        }
        Ok(config)
    }

    /// Serves `handler` as these flags say until SIGINT or SIGTERM: the rest of an external
    /// handler binary's `main` once it has parsed its flags. Flags that make no configuration
    /// exit with 2 (as clap does for bad flags), a failed runner with 1; `program` names the
    /// binary in the message.
    pub async fn serve(&self, program: &str, handler: Arc<dyn DiscoveryHandler>) -> ExitCode {
        let config = match self.runner_config() {
            Ok(config) => config,
            Err(e) => {
                eprintln!("{program}: {e}");
                return ExitCode::from(2);
            }
        };
        match Runner::new(handler, config).run_until_signal().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{program}: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("h").chain(args.iter().copied())).map(|c| c.serve)
    }

    #[test]
    fn unix_socket_by_default_and_network_when_listening() {
        let config = parse(&["--directory", "/x"])
            .expect("parse")
            .runner_config()
            .expect("config");
        assert_eq!(config.endpoint, ServeEndpoint::DefaultUds);
        assert_eq!(config.directory, PathBuf::from("/x"));

        let config = parse(&["--listen", "10.202.1.7:9000"])
            .expect("parse")
            .runner_config()
            .expect("config");
        assert_eq!(
            config.endpoint,
            ServeEndpoint::Network {
                bind: "10.202.1.7:9000".parse().expect("addr"),
                advertise: "http://10.202.1.7:9000".into(),
            }
        );
        assert!(config.tls.is_none());
    }

    #[test]
    fn contradictory_flags_are_refused() {
        assert!(parse(&["--socket", "/s", "--listen", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--advertise", "http://1.2.3.4:5"]).is_err());
        assert!(parse(&["--listen", "127.0.0.1:1", "--tls-cert-file", "/c"]).is_err());
        assert!(parse(&["--tls-client-ca-file", "/ca"]).is_err());
    }

    #[test]
    fn missing_tls_files_are_an_error_not_a_panic() {
        let args = parse(&[
            "--listen",
            "127.0.0.1:1",
            "--tls-cert-file",
            "/nonexistent/c.pem",
            "--tls-key-file",
            "/nonexistent/k.pem",
        ])
        .expect("parse");
        assert!(matches!(
            args.runner_config(),
            Err(ServeArgsError::Tls(crate::tls::TlsError::Read { .. }))
        ));
    }
}
