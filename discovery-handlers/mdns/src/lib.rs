//! The `mdns` discovery handler: services announced over mDNS / DNS-SD
//! (RFC 6762 / 6763) become devices, live.
//!
//! Settings (discoveryDetails), all but `serviceTypes` optional:
//! ```yaml
//! serviceTypes: [_http._tcp.local., _rtsp._tcp]   # browsed types (.local. may be left out)
//! subtypes: [_printer]                            # browse only these subtypes of each type
//! interfaces: {action: Include, items: [lan0]}    # default: all but the default-route interface
//! instanceNames: {action: Include, items: ["glob:cam-*", "regex:^door-[0-9]+$", "Exact Name"]}
//! hostNames: {action: Exclude, items: [old-nvr.local]}
//! txtKeys: {action: Include, items: [path]}
//! txtValues: {action: Include, items: ["model=X1", "fw=glob:2.*"]}
//! addressFamilies: {action: Include, items: [IPv4]}
//! ports: {action: Include, items: ["80", "8000-8099"]}
//! ```
//! A device per resolved service instance, id `<instance>.<service type>`,
//! properties `MDNS_SERVICE_TYPE`, `MDNS_INSTANCE`, `MDNS_HOSTNAME`,
//! `MDNS_ADDRESSES`, `MDNS_PORT` and `MDNS_TXT_<KEY>`. Shared (network devices).
//! See the crate README for every detail.

pub mod browse;
pub mod filter;
pub mod interfaces;
pub mod properties;
pub mod settings;

use futures::FutureExt;
use futures::future::BoxFuture;
use verge_discovery_sdk::{DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest};

pub use settings::{MdnsSettings, Plan};

/// Name Configurations use.
pub const HANDLER_NAME: &str = "mdns";

/// The handler.
#[derive(Clone, Debug)]
pub struct Mdns {
    port: u16,
    shared: bool,
}

impl Default for Mdns {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Mdns {
    /// A handler on the mDNS port. Announced services are reachable from any
    /// node on the link, so devices are shared by default.
    pub fn new(shared: bool) -> Self {
        Self {
            port: mdns_sd::MDNS_PORT,
            shared,
        }
    }

    /// Parses and validates discoveryDetails.
    pub fn plan(details: &str) -> Result<Plan, DiscoveryError> {
        MdnsSettings::parse(details)?.plan()
    }
}

impl DiscoveryHandler for Mdns {
    fn name(&self) -> &str {
        HANDLER_NAME
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let port = self.port;
        // Settings are checked before anything touches the network, so a bad
        // Configuration fails with InvalidArgument and sends no query.
        let result = Self::plan(&request.details).and_then(|plan| browse::start(plan, port));
        async move { result }.boxed()
    }
}
