//! One scan pass over Modbus TCP endpoints or RTU serial lines.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_modbus::client::Context;

use crate::settings::{Parity, RtuPlan, TcpPlan};
use crate::unit::{Found, ask};

/// Where a unit lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitAddress {
    /// Modbus TCP.
    Tcp {
        /// Address.
        ip: IpAddr,
        /// Port.
        port: u16,
        /// Unit id.
        unit: u8,
    },
    /// Modbus RTU.
    Rtu {
        /// Serial device path.
        port: String,
        /// Unit id.
        unit: u8,
    },
}

/// A found unit and, on RTU, the baud rate it answered at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// What it is.
    pub found: Found,
    /// RTU only.
    pub baud: Option<u32>,
}

/// What one pass learned.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Units that were asked to the end; their previous state is replaced.
    pub asked: BTreeSet<UnitAddress>,
    /// The devices among them.
    pub found: BTreeMap<UnitAddress, Located>,
    /// Problems worth showing the user (subject, message).
    pub warnings: Vec<(String, String)>,
    /// Whether the scan budget ran out before every unit was asked.
    pub budget_exceeded: bool,
}

type Report = (UnitAddress, Option<Located>);

/// Resolves host names with the connect timeout, bounded by `max_addresses` overall.
async fn endpoints(plan: &TcpPlan, warnings: &mut Vec<(String, String)>) -> Vec<SocketAddr> {
    let mut ips: Vec<IpAddr> = plan.addresses.clone();
    let mut seen: BTreeSet<IpAddr> = ips.iter().copied().collect();
    for name in &plan.names {
        match tokio::time::timeout(
            plan.connect_timeout,
            tokio::net::lookup_host((name.as_str(), 0)),
        )
        .await
        {
            Ok(Ok(addrs)) => {
                for a in addrs {
                    if ips.len() >= plan.max_addresses {
                        warnings.push((
                            name.clone(),
                            format!(
                                "more than maxAddresses ({}) addresses; the rest are not scanned",
                                plan.max_addresses
                            ),
                        ));
                        break;
                    }
                    if seen.insert(a.ip()) {
                        ips.push(a.ip());
                    }
                }
            }
            Ok(Err(e)) => warnings.push((name.clone(), format!("cannot resolve: {e}"))),
            Err(_) => warnings.push((name.clone(), "name resolution timed out".into())),
        }
    }
    ips.iter()
        .flat_map(|ip| plan.ports.iter().map(move |p| SocketAddr::new(*ip, *p)))
        .collect()
}

struct Endpoint {
    addr: SocketAddr,
    queue: Mutex<VecDeque<u8>>,
    /// Set when a connect fails: the remaining units are reported absent without trying.
    dead: AtomicBool,
}

impl Endpoint {
    fn next(&self) -> Option<u8> {
        self.queue.lock().ok()?.pop_front()
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Option<Context> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are single small frames; Nagle would only add latency.
            let _ = stream.set_nodelay(true);
            Some(tokio_modbus::client::tcp::attach(stream))
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "connect failed");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "connect timed out");
            None
        }
    }
}

async fn tcp_worker(
    endpoint: Arc<Endpoint>,
    plan: Arc<TcpPlan>,
    permits: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let Ok(_permit) = permits.acquire_owned().await else {
        return;
    };
    let mut ctx: Option<Context> = None;
    while let Some(unit) = endpoint.next() {
        let address = UnitAddress::Tcp {
            ip: endpoint.addr.ip(),
            port: endpoint.addr.port(),
            unit,
        };
        if endpoint.dead.load(Ordering::Relaxed) {
            let _ = reports.send((address, None));
            continue;
        }
        if ctx.is_none() {
            ctx = connect(endpoint.addr, plan.connect_timeout).await;
            if ctx.is_none() {
                endpoint.dead.store(true, Ordering::Relaxed);
                let _ = reports.send((address, None));
                continue;
            }
        }
        let Some(c) = ctx.as_mut() else { continue };
        let asked = ask(c, unit, &plan.common, Duration::ZERO).await;
        if !asked.link_ok {
            // A late reply would be read as the next request's: start a fresh connection.
            ctx = None;
        }
        let located = asked.found.map(|found| Located { found, baud: None });
        let _ = reports.send((address, located));
    }
}

/// Collects reports until every worker is done or the budget runs out.
async fn collect(
    mut workers: JoinSet<()>,
    mut rx: mpsc::UnboundedReceiver<Report>,
    budget: Duration,
    result: &mut ScanResult,
) {
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        tokio::select! {
            report = rx.recv() => match report {
                Some((address, located)) => {
                    if let Some(l) = located {
                        result.found.insert(address.clone(), l);
                    }
                    result.asked.insert(address);
                }
                // Every sender (one per worker) is gone: the pass is complete.
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                result.budget_exceeded = true;
                workers.abort_all();
                break;
            }
        }
    }
    while workers.join_next().await.is_some() {}
}

/// Scans every endpoint × unit of `plan` once.
pub async fn scan_tcp(plan: Arc<TcpPlan>) -> ScanResult {
    let mut result = ScanResult::default();
    let addrs = endpoints(&plan, &mut result.warnings).await;
    let permits = Arc::new(Semaphore::new(plan.common.concurrency));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut workers = JoinSet::new();
    let per_endpoint = plan
        .connections_per_endpoint
        .min(plan.common.unit_ids.len());
    // Workers start endpoint by endpoint, round-robin over connection slots,
    // so the first permits go to the first connection of every endpoint.
    let endpoints: Vec<Arc<Endpoint>> = addrs
        .into_iter()
        .map(|addr| {
            Arc::new(Endpoint {
                addr,
                queue: Mutex::new(plan.common.unit_ids.iter().copied().collect()),
                dead: AtomicBool::new(false),
            })
        })
        .collect();
    for _slot in 0..per_endpoint {
        for e in &endpoints {
            workers.spawn(tcp_worker(
                e.clone(),
                plan.clone(),
                permits.clone(),
                tx.clone(),
            ));
        }
    }
    drop(tx);
    collect(workers, rx, plan.common.scan_budget, &mut result).await;
    result
}

/// Time a line must stay silent between frames: 3.5 characters of 11 bits,
/// and the spec's fixed 1.75 ms above 19200 baud.
pub fn inter_frame_gap(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1_750)
    } else {
        Duration::from_micros(38_500_000 / u64::from(baud.max(1)))
    }
}

/// Expands the port globs, bounded by `max_ports`.
pub fn serial_ports(plan: &RtuPlan, warnings: &mut Vec<(String, String)>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for pattern in &plan.ports {
        let mut matched = false;
        match glob::glob(pattern) {
            Ok(paths) => {
                for p in paths.flatten() {
                    matched = true;
                    if out.len() >= plan.max_ports {
                        warnings.push((
                            pattern.clone(),
                            format!(
                                "more than maxPorts ({}) serial ports; the rest are not scanned",
                                plan.max_ports
                            ),
                        ));
                        break;
                    }
                    out.insert(p.display().to_string());
                }
            }
            Err(e) => warnings.push((pattern.clone(), e.to_string())),
        }
        if !matched {
            tracing::debug!(pattern, "no serial port matches");
        }
    }
    out.into_iter().collect()
}

fn open_serial(
    path: &str,
    baud: u32,
    plan: &RtuPlan,
) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    use tokio_serial::SerialPortBuilderExt;
    let parity = match plan.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop = if plan.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    tokio_serial::new(path, baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(parity)
        .stop_bits(stop)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
}

/// Scans one line: one transaction at a time, baud rates in order until one
/// finds a unit. Reports every unit of the port at the end, so a pass cut short
/// by the budget leaves the port's previous devices alone.
async fn rtu_line(
    path: String,
    plan: Arc<RtuPlan>,
    permits: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<Report>,
) -> Result<(), String> {
    let Ok(_permit) = permits.acquire_owned().await else {
        return Ok(());
    };
    let mut found: BTreeMap<u8, Located> = BTreeMap::new();
    for &baud in &plan.baud_rates {
        let stream = open_serial(&path, baud, &plan).map_err(|e| format!("cannot open: {e}"))?;
        let mut ctx = tokio_modbus::client::rtu::attach(stream);
        let gap = inter_frame_gap(baud);
        let mut any_present = false;
        for &unit in &plan.common.unit_ids {
            let asked = ask(&mut ctx, unit, &plan.common, gap).await;
            any_present |= asked.present;
            if !asked.link_ok {
                // No transaction ids on a serial line: let a late reply pass before the next request.
                tokio::time::sleep(gap * 2).await;
            }
            if let Some(f) = asked.found {
                found.insert(
                    unit,
                    Located {
                        found: f,
                        baud: Some(baud),
                    },
                );
            }
        }
        drop(ctx);
        if any_present {
            break;
        }
    }
    for &unit in &plan.common.unit_ids {
        let address = UnitAddress::Rtu {
            port: path.clone(),
            unit,
        };
        let _ = reports.send((address, found.remove(&unit)));
    }
    Ok(())
}

/// Scans every serial line of `plan` once.
pub async fn scan_rtu(plan: Arc<RtuPlan>) -> ScanResult {
    let mut result = ScanResult::default();
    let ports = serial_ports(&plan, &mut result.warnings);
    let permits = Arc::new(Semaphore::new(plan.common.concurrency));
    let (tx, rx) = mpsc::unbounded_channel();
    let (warn_tx, mut warn_rx) = mpsc::unbounded_channel();
    let mut workers = JoinSet::new();
    for port in ports {
        let (plan, permits, tx, warn_tx) =
            (plan.clone(), permits.clone(), tx.clone(), warn_tx.clone());
        workers.spawn(async move {
            if let Err(e) = rtu_line(port.clone(), plan, permits, tx).await {
                tracing::warn!(port, error = %e, "serial line not scanned");
                let _ = warn_tx.send((port, e));
            }
        });
    }
    drop(tx);
    drop(warn_tx);
    collect(workers, rx, plan.common.scan_budget, &mut result).await;
    while let Ok(w) = warn_rx.try_recv() {
        result.warnings.push(w);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps() {
        assert_eq!(inter_frame_gap(9_600), Duration::from_micros(4_010));
        assert_eq!(inter_frame_gap(115_200), Duration::from_micros(1_750));
    }
}
