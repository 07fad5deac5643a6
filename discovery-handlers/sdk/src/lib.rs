//! # Verge discovery-handler SDK
//!
//! A discovery handler turns a protocol's view of the world into a list of
//! devices. Implement [`DiscoveryHandler`] once; the same value then runs
//!
//! - **embedded** in the agent (the agent calls [`DiscoveryHandler::discover`]
//!   directly), or
//! - **external**, served over the `v0` gRPC protocol by [`Runner`], which
//!   registers it with the agent and re-registers whenever the agent restarts.
//!
//! The agent talks to external handlers through [`RemoteHandler`], which
//! implements the same trait, so both paths share one code path.
//!
//! ```no_run
//! use std::sync::Arc;
//! use verge_discovery_sdk::{DiscoveryHandler, Runner, RunnerConfig, RunnerError};
//!
//! /// Serves any handler as an external `v0` handler until SIGTERM.
//! async fn serve(handler: Arc<dyn DiscoveryHandler>) -> Result<(), RunnerError> {
//!     Runner::new(handler, RunnerConfig::from_env()).run_until_signal().await
//! }
//! ```

pub mod cli;
pub mod filter;
pub mod handler;
pub mod health;
pub mod remote;
pub mod runner;
pub mod server;
pub mod settings;
pub mod tls;
pub mod uds;

pub use filter::{FilterAction, FilterList};
pub use handler::{
    DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate, severity,
};
pub use remote::{HandlerEndpoint, RemoteHandler};
pub use runner::{Runner, RunnerConfig, RunnerError};
pub use settings::parse_details;

/// Generated `v0` protocol types, re-exported for handler authors.
pub use verge_device_plugin_proto::v0;
pub use verge_device_plugin_proto::v0::{Device, DeviceSpec, Diagnostic, Mount};

/// Environment variable naming the directory of the registration socket.
pub const DISCOVERY_HANDLERS_DIRECTORY_ENV: &str = "DISCOVERY_HANDLERS_DIRECTORY";
/// Default directory of the registration socket (Akri's chart uses the same).
pub const DEFAULT_DISCOVERY_HANDLERS_DIRECTORY: &str = "/var/lib/akri";
/// File name of the agent's registration socket inside that directory.
pub const REGISTRATION_SOCKET_NAME: &str = "agent-registration.sock";
