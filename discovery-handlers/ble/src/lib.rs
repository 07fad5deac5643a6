//! The `ble` discovery handler: Bluetooth LE peripherals found from their
//! advertisements through BlueZ's D-Bus API (btleplug).
//!
//! See the crate README for the settings, properties and device ids.

pub mod advert;
mod gatt;
mod scan;
pub mod settings;

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest};

pub use advert::{
    PROP_ADAPTER, PROP_ADDRESS, PROP_ADDRESS_TYPE, PROP_GATT_FIRMWARE, PROP_GATT_MANUFACTURER,
    PROP_GATT_MODEL, PROP_GATT_SERIAL, PROP_MANUFACTURER_ID, PROP_NAME, PROP_SERVICE_UUIDS,
};
pub use scan::{DIAGNOSTIC_SUBJECT, RETRY_INTERVAL};
pub use settings::{BleSettings, Compiled};

/// Name Configurations use.
pub const HANDLER_NAME: &str = "ble";
/// Buffered updates per stream; each is a full list, so a slow consumer needs few.
const UPDATE_BUFFER: usize = 4;

/// The handler. Devices are shared: several nodes may hear one peripheral, and
/// the Configuration's capacity (default 1) keeps brokers from fighting over it.
#[derive(Clone, Debug, Default)]
pub struct Ble;

impl Ble {
    /// A handler.
    pub fn new() -> Self {
        Ble
    }

    fn start(&self, request: &DiscoveryRequest) -> Result<DeviceStream, DiscoveryError> {
        let settings = Arc::new(Compiled::parse(&request.details)?);
        let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
        tokio::spawn(scan::run(settings, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

impl DiscoveryHandler for Ble {
    fn name(&self) -> &str {
        HANDLER_NAME
    }

    fn shared(&self) -> bool {
        true
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let result = self.start(&request);
        async move { result }.boxed()
    }
}
