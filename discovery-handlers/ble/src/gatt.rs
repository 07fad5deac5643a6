//! GATT enrichment: connect, read the Device Information Service, disconnect.
//!
//! Bounded in time, and the connection is always closed afterwards so the
//! broker can connect. A device someone else is already connected to (a
//! broker) is left alone.

use std::time::Duration;

use btleplug::api::Peripheral as _;
use btleplug::platform::Peripheral;
use tokio::time::timeout;
use uuid::Uuid;

use crate::advert::{DeviceInformation, MAX_GATT_STRING, sanitize_text};

/// Device Information Service.
pub const DEVICE_INFORMATION_SERVICE: Uuid =
    Uuid::from_u128(0x0000180a_0000_1000_8000_00805f9b34fb);
/// Manufacturer Name String.
pub const MANUFACTURER_NAME: Uuid = Uuid::from_u128(0x00002a29_0000_1000_8000_00805f9b34fb);
/// Model Number String.
pub const MODEL_NUMBER: Uuid = Uuid::from_u128(0x00002a24_0000_1000_8000_00805f9b34fb);
/// Serial Number String.
pub const SERIAL_NUMBER: Uuid = Uuid::from_u128(0x00002a25_0000_1000_8000_00805f9b34fb);
/// Firmware Revision String.
pub const FIRMWARE_REVISION: Uuid = Uuid::from_u128(0x00002a26_0000_1000_8000_00805f9b34fb);
/// Bound of the disconnect that always follows.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the Device Information Service within `limit`. `None` when nothing
/// could be read (not connectable, no such service, timeout).
pub async fn read_device_information(
    peripheral: &Peripheral,
    limit: Duration,
) -> Option<DeviceInformation> {
    match timeout(Duration::from_secs(2), peripheral.is_connected()).await {
        Ok(Ok(false)) => {}
        Ok(Ok(true)) => {
            tracing::info!(device = %peripheral.address(), "already connected (a broker?); GATT read skipped");
            return None;
        }
        _ => return None,
    }
    let result = timeout(limit, read(peripheral)).await;
    // Always disconnect, also after a timeout in the middle of connecting.
    if let Err(e) = timeout(DISCONNECT_TIMEOUT, peripheral.disconnect()).await {
        tracing::warn!(device = %peripheral.address(), error = %e, "GATT disconnect timed out");
    }
    match result {
        Ok(Ok(info)) => Some(info),
        Ok(Err(e)) => {
            tracing::info!(device = %peripheral.address(), error = %e, "GATT read failed");
            None
        }
        Err(_) => {
            tracing::info!(device = %peripheral.address(), ?limit, "GATT read timed out");
            None
        }
    }
}

async fn read(peripheral: &Peripheral) -> Result<DeviceInformation, btleplug::Error> {
    peripheral.connect().await?;
    peripheral.discover_services().await?;
    let characteristics = peripheral.characteristics();
    let mut info = DeviceInformation::default();
    for (uuid, slot) in [
        (MANUFACTURER_NAME, &mut info.manufacturer),
        (MODEL_NUMBER, &mut info.model),
        (SERIAL_NUMBER, &mut info.serial),
        (FIRMWARE_REVISION, &mut info.firmware),
    ] {
        let Some(c) = characteristics
            .iter()
            .find(|c| c.uuid == uuid && c.service_uuid == DEVICE_INFORMATION_SERVICE)
        else {
            continue;
        };
        match peripheral.read(c).await {
            Ok(value) => *slot = sanitize_text(&value, MAX_GATT_STRING),
            Err(e) => tracing::debug!(%uuid, error = %e, "characteristic unreadable"),
        }
    }
    Ok(info)
}
