//! Continuous scanning through BlueZ (btleplug), turned into device lists.
//!
//! One task per discovery stream: it opens the bus, picks the adapters,
//! starts discovery on each and then reacts to advertisement events. When the
//! bus, BlueZ or the adapters are missing it sends an empty list with a
//! diagnostic and tries again every [`RETRY_INTERVAL`], so a node without
//! Bluetooth shows a status condition instead of a crash loop.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use btleplug::api::{Central, CentralEvent, Manager as _, Peripheral as _, ScanFilter};
use btleplug::platform::{Adapter, Manager, PeripheralId};
use futures::stream::{SelectAll, StreamExt};
use futures::{FutureExt, Stream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use verge_discovery_sdk::{DiscoveryError, DiscoveryUpdate, severity};

use crate::advert::{DeviceInformation, Observation, Tracker};
use crate::gatt;
use crate::settings::{AddressKind, Compiled};

/// Pause between attempts while the bus, BlueZ or an adapter is missing.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How often the adapter list is checked while scanning (adapters unplugged or added).
pub const ADAPTER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Bound of one D-Bus call.
const DBUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// GATT connections at once per stream (a radio connects to one device at a time anyway).
const GATT_CONCURRENCY: usize = 1;
/// Diagnostic subject of adapter problems.
pub const DIAGNOSTIC_SUBJECT: &str = "bluetooth";

type Sender = mpsc::Sender<Result<DiscoveryUpdate, DiscoveryError>>;

/// Why scanning stopped (or could not start).
#[derive(Debug, thiserror::Error)]
enum ScanProblem {
    #[error(
        "cannot reach the system D-Bus ({0}); mount /run/dbus/system_bus_socket into the agent"
    )]
    NoBus(String),
    #[error("BlueZ does not answer on the system D-Bus ({0}); is bluetoothd running?")]
    NoBluez(String),
    #[error("no Bluetooth adapter{0}")]
    NoAdapter(String),
    #[error("Bluetooth scanning stopped: {0}")]
    Lost(String),
    #[error("the set of adapters changed")]
    AdaptersChanged,
    /// The consumer went away.
    #[error("stopped")]
    Stopped,
}

/// One selected adapter.
struct Selected {
    name: String,
    adapter: Adapter,
}

/// Runs discovery until the receiver of `tx` is dropped.
pub async fn run(settings: Arc<Compiled>, tx: Sender) {
    let mut tracker = Tracker::new(settings.clone());
    let mut last: Option<DiscoveryUpdate> = None;
    loop {
        let problem = match open(&settings).await {
            Ok((manager, adapters, names, connection_lost)) => {
                scan(
                    &settings,
                    &manager,
                    adapters,
                    names,
                    connection_lost,
                    &mut tracker,
                    &tx,
                    &mut last,
                )
                .await
            }
            Err(p) => p,
        };
        match problem {
            ScanProblem::Stopped => return,
            // A changed adapter set is not a problem: open again at once.
            ScanProblem::AdaptersChanged => {
                tracing::info!("Bluetooth adapters changed; restarting scan");
                continue;
            }
            p => {
                tracing::warn!(problem = %p, "Bluetooth discovery unavailable; retrying");
                tracker.clear();
                let update = DiscoveryUpdate::devices(Vec::new()).with_diagnostic(
                    DIAGNOSTIC_SUBJECT,
                    severity::ERROR,
                    p.to_string(),
                );
                if !send_if_changed(&tx, &mut last, update).await {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    }
}

/// Sends `update` unless it equals the last one sent, so RSSI-only changes and
/// repeated failures send nothing. Returns false when the consumer is gone.
async fn send_if_changed(
    tx: &Sender,
    last: &mut Option<DiscoveryUpdate>,
    update: DiscoveryUpdate,
) -> bool {
    if last.as_ref() == Some(&update) {
        return true;
    }
    *last = Some(update.clone());
    tx.send(Ok(update)).await.is_ok()
}

async fn call<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match timeout(DBUS_CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {DBUS_CALL_TIMEOUT:?}")),
    }
}

type ConnectionLost = futures::future::BoxFuture<'static, ()>;

/// Connects to the bus and BlueZ, and picks the adapters.
async fn open(
    settings: &Compiled,
) -> Result<(Manager, Vec<Selected>, BTreeSet<String>, ConnectionLost), ScanProblem> {
    // bluez-async's session tells when the bus connection is lost (btleplug's
    // does not) and knows adapter addresses; btleplug does the scanning.
    let (lost, session) = call("connect", bluez_async::BluetoothSession::new())
        .await
        .map_err(ScanProblem::NoBus)?;
    let connection_lost: ConnectionLost = lost.map(|_| ()).boxed();
    let infos = call("list adapters", session.get_adapters())
        .await
        .map_err(ScanProblem::NoBluez)?;
    let manager = call("connect", Manager::new())
        .await
        .map_err(ScanProblem::NoBus)?;
    let adapters = call("list adapters", manager.adapters())
        .await
        .map_err(ScanProblem::NoBluez)?;
    let mut all = BTreeSet::new();
    let mut selected = Vec::new();
    for adapter in adapters {
        let info = call("adapter info", adapter.adapter_info())
            .await
            .map_err(ScanProblem::NoBluez)?;
        // btleplug describes an adapter as "hci0 (usb:v1D6Bp0246d0537)".
        let name = info.split(' ').next().unwrap_or_default().to_string();
        all.insert(name.clone());
        let address = infos
            .iter()
            .find(|i| i.id.to_string() == name)
            .map(|i| i.mac_address.to_string());
        if settings.adapter_selected(&name, address.as_deref()) {
            selected.push(Selected { name, adapter });
        }
    }
    if selected.is_empty() {
        let detail = if all.is_empty() {
            String::new()
        } else {
            format!(
                " matches the adapters setting (present: {})",
                all.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        return Err(ScanProblem::NoAdapter(detail));
    }
    Ok((manager, selected, all, connection_lost))
}

type Events = std::pin::Pin<Box<dyn Stream<Item = (usize, CentralEvent)> + Send>>;

#[allow(clippy::too_many_arguments)]
async fn scan(
    settings: &Arc<Compiled>,
    manager: &Manager,
    adapters: Vec<Selected>,
    names: BTreeSet<String>,
    mut connection_lost: ConnectionLost,
    tracker: &mut Tracker,
    tx: &Sender,
    last: &mut Option<DiscoveryUpdate>,
) -> ScanProblem {
    let mut events: SelectAll<Events> = SelectAll::new();
    for (index, s) in adapters.iter().enumerate() {
        // Subscribe before scanning so no advertisement is missed; btleplug
        // replays the devices BlueZ already knows as DeviceDiscovered first.
        let stream = match call("subscribe", s.adapter.events()).await {
            Ok(stream) => stream,
            Err(e) => return ScanProblem::Lost(format!("{}: {e}", s.name)),
        };
        events.push(Box::pin(stream.map(move |e| (index, e))));
        // BlueZ discovery filters are only a hint (other clients widen them),
        // so nothing is filtered here; the filters apply to every event below.
        if let Err(e) = call("start scan", s.adapter.start_scan(ScanFilter::default())).await {
            return ScanProblem::Lost(format!("{}: {e}", s.name));
        }
        tracing::info!(adapter = %s.name, "scanning for Bluetooth LE advertisements");
    }
    // Devices already known count as heard now, so the first list is sent.
    if !send_if_changed(tx, last, DiscoveryUpdate::devices(tracker.devices())).await {
        return ScanProblem::Stopped;
    }

    let gatt_slots = Arc::new(Semaphore::new(GATT_CONCURRENCY));
    let (gatt_tx, mut gatt_rx) = mpsc::unbounded_channel::<([u8; 6], Option<DeviceInformation>)>();
    let mut gatt_tasks = tokio::task::JoinSet::new();
    let mut adapter_check = tokio::time::interval(ADAPTER_CHECK_INTERVAL);
    adapter_check.tick().await;

    loop {
        let expiry = tracker
            .next_expiry(std::time::Instant::now())
            .unwrap_or(settings.lost_after);
        tokio::select! {
            event = events.next() => {
                let Some((index, event)) = event else {
                    return ScanProblem::Lost("the event stream ended".into());
                };
                let Some(s) = adapters.get(index) else { continue };
                if let Some(id) = advertisement_of(&event) {
                    let peripheral = match call("device", s.adapter.peripheral(id)).await {
                        Ok(p) => p,
                        // The device was removed in between: nothing to do.
                        Err(e) => { tracing::debug!(error = %e, "device vanished"); continue }
                    };
                    let props = match call("device properties", peripheral.properties()).await {
                        Ok(Some(p)) => p,
                        Ok(None) => continue,
                        Err(e) => { tracing::debug!(error = %e, "unreadable device"); continue }
                    };
                    let obs = Observation::from_parts(
                        props.address.into_inner(),
                        props.address_type.map(|t| match t {
                            btleplug::api::AddressType::Public => AddressKind::Public,
                            btleplug::api::AddressType::Random => AddressKind::Random,
                        }),
                        props.local_name.as_deref(),
                        &props.services,
                        &props.manufacturer_data,
                        &props.service_data,
                        props.rssi,
                    );
                    // A device BlueZ remembers from earlier has no RSSI until it is
                    // heard again: only what has an RSSI was heard in this scan.
                    if obs.rssi.is_none() {
                        continue;
                    }
                    let address = obs.address;
                    if tracker.observe(obs, &s.name, std::time::Instant::now())
                        && let Some(g) = settings.gatt
                    {
                        let slots = gatt_slots.clone();
                        let done = gatt_tx.clone();
                        gatt_tasks.spawn(async move {
                            let info = match slots.acquire_owned().await {
                                Ok(_permit) => gatt::read_device_information(&peripheral, g.timeout).await,
                                Err(_) => None,
                            };
                            let _ = done.send((address, info));
                        });
                    }
                }
            }
            Some((address, info)) = gatt_rx.recv() => tracker.enriched(address, info),
            _ = tokio::time::sleep(expiry) => {
                tracker.expire(std::time::Instant::now());
            }
            _ = adapter_check.tick() => {
                match call("list adapters", manager.adapters()).await {
                    Ok(now) => {
                        let mut current = BTreeSet::new();
                        for a in now {
                            if let Ok(info) = call("adapter info", a.adapter_info()).await {
                                current.insert(info.split(' ').next().unwrap_or_default().to_string());
                            }
                        }
                        if current != names {
                            return ScanProblem::AdaptersChanged;
                        }
                    }
                    Err(e) => return ScanProblem::Lost(e),
                }
            }
            _ = &mut connection_lost => return ScanProblem::Lost("the D-Bus connection was lost".into()),
            _ = tx.closed() => {
                for s in &adapters {
                    let _ = call("stop scan", s.adapter.stop_scan()).await;
                }
                return ScanProblem::Stopped;
            }
        }
        if !send_if_changed(tx, last, DiscoveryUpdate::devices(tracker.devices())).await {
            return ScanProblem::Stopped;
        }
    }
}

/// The device an event says was heard advertising. Connection events are not
/// advertisements (our own GATT reads cause them).
fn advertisement_of(event: &CentralEvent) -> Option<&PeripheralId> {
    match event {
        CentralEvent::DeviceDiscovered(id) | CentralEvent::DeviceUpdated(id) => Some(id),
        CentralEvent::ManufacturerDataAdvertisement { id, .. }
        | CentralEvent::ServiceDataAdvertisement { id, .. }
        | CentralEvent::ServicesAdvertisement { id, .. } => Some(id),
        _ => None,
    }
}
