//! Command-line flags every external handler binary shares: where to register, and where and how
//! to serve (a unix socket by default; a TCP address, optionally with TLS, for network handlers),
//! and an optional HTTP health endpoint for kubelet probes (`--health-address`).
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

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::health::HealthState;
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

    /// Serve HTTP /healthz (200 while the handler serves) and /readyz (200 once it is
    /// registered with the agent) on this address, for kubelet probes: a handler on a unix
    /// socket cannot be probed otherwise, and handler images have no shell for exec probes.
    #[arg(long, env = "DISCOVERY_HANDLER_HEALTH_ADDRESS")]
    pub health_address: Option<SocketAddr>,
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

/// Why [`ServeArgs::run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The flags make no configuration.
    #[error(transparent)]
    Args(#[from] ServeArgsError),
    /// The health endpoint could not start, or failed.
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    /// A handler's runner failed.
    #[error("{handler}: {source}")]
    Runner {
        /// The handler whose runner failed.
        handler: String,
        /// Why.
        source: crate::RunnerError,
    },
    /// No handler was given to serve.
    #[error("no handler to serve")]
    NoHandler,
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
        self.serve_all(program, vec![handler]).await
    }

    /// [`Self::serve`] for a binary serving several handlers (each on its default socket),
    /// with one health endpoint for all of them: ready once every one is registered.
    pub async fn serve_all(
        &self,
        program: &str,
        handlers: Vec<Arc<dyn DiscoveryHandler>>,
    ) -> ExitCode {
        match self.run(handlers, crate::runner::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ ServeError::Args(_)) => {
                eprintln!("{program}: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("{program}: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// Serves `handlers` (and the health endpoint, with --health-address) until `shutdown`
    /// completes or the first runner stops.
    pub async fn run(
        &self,
        handlers: Vec<Arc<dyn DiscoveryHandler>>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        if handlers.is_empty() {
            return Err(ServeError::NoHandler);
        }
        let mut config = self.runner_config()?;
        let health = match self.health_address {
            Some(address) => {
                let state = HealthState::new();
                for h in &handlers {
                    state.expect(h.name());
                }
                config.health = Some(state.clone());
                Some(crate::health::bind(address, state).await?)
            }
            None => None,
        };
        // One stop for every runner: the caller's shutdown, or the first runner to end (one
        // handler failing ends the process). Each runner then removes its own socket; dropping
        // the others' futures instead would leave their sockets behind.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let runs = handlers.into_iter().map(|h| {
            let config = config.clone();
            let stop = stop.clone();
            let mut stopped = stopped.clone();
            let name = h.name().to_string();
            async move {
                let result = Runner::new(h, config)
                    .run(async move {
                        // Err: every sender is gone, which is a stop as well.
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
                stop.send_replace(true);
                result.map_err(|source| ServeError::Runner {
                    handler: name,
                    source,
                })
            }
        });
        let runners = futures::future::join_all(runs);
        tokio::pin!(runners);
        let health = async move {
            match health {
                Some(server) => server.await,
                None => std::future::pending().await,
            }
        };
        let first_error = |results: Vec<Result<(), ServeError>>| {
            results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
        };
        tokio::select! {
            results = &mut runners => first_error(results),
            () = shutdown => {
                stop.send_replace(true);
                first_error(runners.await)
            }
            r = health => {
                stop.send_replace(true);
                first_error(runners.await)?;
                r.map_err(ServeError::from)
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
    fn health_address_is_optional_and_must_be_an_address() {
        assert_eq!(parse(&[]).expect("parse").health_address, None);
        assert_eq!(
            parse(&["--health-address", "0.0.0.0:8091"])
                .expect("parse")
                .health_address,
            Some("0.0.0.0:8091".parse().expect("addr"))
        );
        assert!(parse(&["--health-address", "8091"]).is_err());
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
