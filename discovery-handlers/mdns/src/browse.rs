//! One mDNS querier per Discover request, turned into a stream of device lists.

use std::collections::BTreeMap;

use futures::{FutureExt, StreamExt};
use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{Device, DeviceStream, DiscoveryError, DiscoveryUpdate, severity};

use crate::interfaces;
use crate::properties::{Service, TxtEntry};
use crate::settings::{InterfaceChoice, Plan};

/// Services tracked per request. mdns-sd keeps whatever answers its queries,
/// so a flood of made-up instances must stop somewhere; past this, new ones
/// are ignored and a Warning diagnostic says so.
pub const MAX_SERVICES: usize = 1024;
/// Buffered updates per stream; a slow consumer only ever needs the latest.
const UPDATE_BUFFER: usize = 4;

/// Converts mdns-sd's view of a service.
pub fn service_from(service_type: &str, r: &ResolvedService) -> Service {
    Service {
        service_type: service_type.to_string(),
        fullname: r.fullname.clone(),
        hostname: r.host.clone(),
        port: r.port,
        addresses: r.addresses.iter().map(|a| a.to_ip_addr()).collect(),
        txt: r
            .txt_properties
            .iter()
            .map(|p| TxtEntry {
                key: p.key().to_string(),
                value: p.val().map(<[u8]>::to_vec),
            })
            .collect(),
    }
}

/// Starts the querier: browses every planned domain on the planned interfaces.
pub fn start(plan: Plan, port: u16) -> Result<DeviceStream, DiscoveryError> {
    let default = match &plan.interfaces {
        InterfaceChoice::AllExcept(_) => interfaces::default_route_interfaces().map_err(|e| {
            // Without the routing table we cannot know which interface to keep
            // quiet, so we do not start at all.
            DiscoveryError::Unavailable(format!(
                "cannot read the routing table to leave the default-route interface out: {e}"
            ))
        })?,
        InterfaceChoice::Only(_) => Default::default(),
    };
    tracing::info!(
        browses = ?plan.browses.iter().map(|b| &b.domain).collect::<Vec<_>>(),
        interfaces = ?plan.interfaces,
        default_route = ?default,
        "starting mDNS browse"
    );
    let daemon =
        ServiceDaemon::new_with_interfaces(port, interfaces::selections(&plan.interfaces, default))
            .map_err(|e| DiscoveryError::Unavailable(format!("cannot start mDNS: {e}")))?;
    let mut receivers = Vec::new();
    for (i, b) in plan.browses.iter().enumerate() {
        match daemon.browse(&b.domain) {
            Ok(rx) => receivers.push(rx.into_stream().map(move |e| (i, e)).boxed()),
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(DiscoveryError::Unavailable(format!(
                    "cannot browse {}: {e}",
                    b.domain
                )));
            }
        }
    }
    let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
    tokio::spawn(run(plan, DaemonGuard(daemon), receivers, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

type Events = futures::stream::BoxStream<'static, (usize, ServiceEvent)>;

/// Shuts the daemon down when dropped: its thread would otherwise run on
/// (it stops only on an explicit shutdown), also when the task is dropped
/// with its runtime.
struct DaemonGuard(ServiceDaemon);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        // Stops the queries and leaves the multicast groups; announces nothing
        // (we registered nothing).
        if let Err(e) = self.0.shutdown() {
            tracing::debug!(error = %e, "mDNS daemon shutdown");
        }
    }
}

#[derive(Default)]
struct State {
    /// (browse index, fullname) → device.
    services: BTreeMap<(usize, String), Device>,
    overflow: bool,
}

impl State {
    fn apply(&mut self, plan: &Plan, index: usize, event: ServiceEvent) -> bool {
        match event {
            ServiceEvent::ServiceResolved(r) => {
                let Some(browse) = plan.browses.get(index) else {
                    return false;
                };
                let key = (index, r.fullname.clone());
                let service = service_from(&browse.service_type, &r);
                match plan.select(service) {
                    Some(s) => {
                        let device = s.to_device();
                        if self.services.get(&key) == Some(&device) {
                            return false;
                        }
                        if !self.services.contains_key(&key) && self.services.len() >= MAX_SERVICES
                        {
                            if !self.overflow {
                                tracing::warn!(
                                    max = MAX_SERVICES,
                                    "too many mDNS services; ignoring new ones"
                                );
                            }
                            self.overflow = true;
                            return false;
                        }
                        tracing::debug!(id = %device.id, "service resolved");
                        self.services.insert(key, device);
                        true
                    }
                    None => {
                        tracing::debug!(fullname = %r.fullname, "service filtered out");
                        self.services.remove(&key).is_some()
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let removed = self.services.remove(&(index, fullname.clone())).is_some();
                if removed {
                    tracing::debug!(%fullname, "service removed");
                    if self.services.len() < MAX_SERVICES {
                        self.overflow = false;
                    }
                }
                removed
            }
            other => {
                tracing::trace!(event = ?other, "mDNS event");
                false
            }
        }
    }

    fn update(&self) -> DiscoveryUpdate {
        // One device per id even when several subtype browses found it.
        let mut by_id: BTreeMap<&str, &Device> = BTreeMap::new();
        for d in self.services.values() {
            by_id.entry(d.id.as_str()).or_insert(d);
        }
        let mut update = DiscoveryUpdate::devices(by_id.into_values().cloned().collect());
        if self.overflow {
            update = update.with_diagnostic(
                "services",
                severity::WARNING,
                format!("more than {MAX_SERVICES} mDNS services answer; the rest are ignored (narrow the filters)"),
            );
        }
        update
    }
}

async fn run(
    plan: Plan,
    daemon: DaemonGuard,
    receivers: Vec<Events>,
    tx: mpsc::Sender<Result<DiscoveryUpdate, DiscoveryError>>,
) {
    let mut events = futures::stream::select_all(receivers);
    let mut state = State::default();
    let mut error = None;
    if tx.send(Ok(state.update())).await.is_ok() {
        loop {
            let next = tokio::select! {
                e = events.next() => e,
                _ = tx.closed() => break,
            };
            let Some((index, event)) = next else {
                // mdns-sd closes a subscription whose receiver fell behind or
                // when its thread died; the agent restarts discovery for us.
                error = Some(DiscoveryError::Unavailable(
                    "the mDNS querier stopped".to_string(),
                ));
                break;
            };
            let mut changed = state.apply(&plan, index, event);
            // Apply whatever else is already queued before sending one list.
            while let Some(Some((index, event))) = events.next().now_or_never() {
                changed |= state.apply(&plan, index, event);
            }
            if changed && tx.send(Ok(state.update())).await.is_err() {
                break;
            }
        }
    }
    if let Some(e) = error {
        let _ = tx.send(Err(e)).await;
    }
    drop(daemon);
    tracing::debug!("mDNS browse stopped");
}
