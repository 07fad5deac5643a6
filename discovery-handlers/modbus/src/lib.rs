//! Modbus discovery handlers.
//!
//! Two handler names, because shared-ness is declared per registration:
//! - `modbus-tcp` (shared): Modbus TCP hosts, CIDR ranges, ports and unit ids;
//!   any node on the network reaches the same units.
//! - `modbus-rtu` (not shared): serial lines of this node (paths or globs);
//!   the serial device node is handed to brokers as a device spec.
//!
//! A unit is identified by Read Device Identification (0x2B/0x0E, basic and
//! regular objects) and classified by register probes from the settings.
//! Silence or a gateway exception (0x0A, 0x0B) means no unit; exceptions such
//! as 0x01–0x04 mean a unit without that function, which is a device when a
//! probe matches. See the README for settings and properties.

pub mod ident;
pub mod probe;
pub mod scan;
pub mod settings;
pub mod unit;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{
    Device, DeviceSpec, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    DiscoveryUpdate, parse_details, severity,
};

use crate::scan::{Located, ScanResult, UnitAddress};
use crate::settings::{Common, Filters, RtuPlan, RtuSettings, TcpPlan, TcpSettings};

/// Name of the Modbus TCP handler.
pub const TCP_HANDLER_NAME: &str = "modbus-tcp";
/// Name of the Modbus RTU handler.
pub const RTU_HANDLER_NAME: &str = "modbus-rtu";
/// Buffered updates per stream; the consumer only ever needs the latest.
const UPDATE_BUFFER: usize = 4;

/// Property names.
pub mod properties {
    /// `tcp` or `rtu`.
    pub const TRANSPORT: &str = "MODBUS_TRANSPORT";
    /// TCP: IP address.
    pub const HOST: &str = "MODBUS_HOST";
    /// TCP: port.
    pub const PORT: &str = "MODBUS_PORT";
    /// RTU: serial device path (also the device spec's path in the container).
    pub const SERIAL_PORT: &str = "MODBUS_SERIAL_PORT";
    /// RTU: baud rate the unit answered at.
    pub const BAUD: &str = "MODBUS_BAUD";
    /// RTU: parity (`None`, `Even`, `Odd`).
    pub const PARITY: &str = "MODBUS_PARITY";
    /// RTU: stop bits.
    pub const STOP_BITS: &str = "MODBUS_STOP_BITS";
    /// Unit id.
    pub const UNIT_ID: &str = "MODBUS_UNIT_ID";
    /// VendorName.
    pub const VENDOR: &str = "MODBUS_VENDOR";
    /// ProductCode.
    pub const PRODUCT_CODE: &str = "MODBUS_PRODUCT_CODE";
    /// MajorMinorRevision.
    pub const REVISION: &str = "MODBUS_REVISION";
    /// ModelName.
    pub const MODEL: &str = "MODBUS_MODEL";
    /// ProductName.
    pub const PRODUCT_NAME: &str = "MODBUS_PRODUCT_NAME";
    /// VendorUrl.
    pub const VENDOR_URL: &str = "MODBUS_VENDOR_URL";
    /// The object named by serialObjectId.
    pub const SERIAL: &str = "MODBUS_SERIAL";
    /// First probe (in settings order) that matched.
    pub const PROBE: &str = "MODBUS_PROBE";
    /// Every probe that matched, comma-separated.
    pub const PROBES: &str = "MODBUS_PROBES";
}

/// Whether a found unit passes the filters.
pub fn passes(filters: &Filters, found: &unit::Found) -> bool {
    let id = found.identity.clone().unwrap_or_default();
    let ok = |f: &Option<verge_discovery_sdk::FilterList>, v: &str| {
        f.as_ref().is_none_or(|f| f.accepts(v))
    };
    ok(&filters.vendors, &id.vendor)
        && ok(&filters.product_codes, &id.product_code)
        && ok(&filters.models, &id.model)
        && filters
            .probes
            .as_ref()
            .is_none_or(|f| f.accepts_any(found.matched.iter().map(String::as_str)))
}

/// The device for a found unit.
pub fn device(address: &UnitAddress, located: &Located, rtu: Option<&RtuPlan>) -> Device {
    use properties as p;
    let mut props = BTreeMap::new();
    let (address_part, unit) = match address {
        UnitAddress::Tcp { ip, port, unit } => {
            props.insert(p::TRANSPORT, "tcp".to_string());
            props.insert(p::HOST, ip.to_string());
            props.insert(p::PORT, port.to_string());
            (
                format!("tcp://{}/{unit}", std::net::SocketAddr::new(*ip, *port)),
                *unit,
            )
        }
        UnitAddress::Rtu { port, unit } => {
            props.insert(p::TRANSPORT, "rtu".to_string());
            props.insert(p::SERIAL_PORT, port.clone());
            if let Some(b) = located.baud {
                props.insert(p::BAUD, b.to_string());
            }
            if let Some(plan) = rtu {
                props.insert(p::PARITY, format!("{:?}", plan.parity));
                props.insert(p::STOP_BITS, plan.stop_bits.to_string());
            }
            (format!("rtu://{port}/{unit}"), *unit)
        }
    };
    props.insert(p::UNIT_ID, unit.to_string());
    let mut id = address_part;
    if let Some(identity) = &located.found.identity {
        for (key, value) in [
            (p::VENDOR, &identity.vendor),
            (p::PRODUCT_CODE, &identity.product_code),
            (p::REVISION, &identity.revision),
            (p::MODEL, &identity.model),
            (p::PRODUCT_NAME, &identity.product_name),
            (p::VENDOR_URL, &identity.vendor_url),
            (p::SERIAL, &identity.serial),
        ] {
            if !value.is_empty() {
                props.insert(key, value.clone());
            }
        }
        let part = identity.id_part();
        if !part.is_empty() {
            id = format!("{part}@{id}");
        }
    }
    if let Some(first) = located.found.matched.first() {
        props.insert(p::PROBE, first.clone());
        props.insert(p::PROBES, located.found.matched.join(","));
        if located.found.identity.is_none() {
            id = format!("probe={first}@{id}");
        }
    }
    let device_specs = match (address, rtu) {
        (UnitAddress::Rtu { port, .. }, Some(plan)) => vec![DeviceSpec {
            container_path: port.clone(),
            host_path: port.clone(),
            permissions: plan.device_permissions.clone(),
        }],
        _ => Vec::new(),
    };
    Device {
        id,
        properties: props.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        mounts: Vec::new(),
        device_specs,
    }
}

/// Keeps the last known state of every unit and turns it into device lists.
#[derive(Default)]
struct Known {
    units: BTreeMap<UnitAddress, Located>,
}

impl Known {
    fn apply(&mut self, result: &ScanResult) {
        for a in &result.asked {
            self.units.remove(a);
        }
        for (a, l) in &result.found {
            self.units.insert(a.clone(), l.clone());
        }
    }

    fn devices(&self, filters: &Filters, rtu: Option<&RtuPlan>) -> Vec<Device> {
        let mut devices: Vec<Device> = self
            .units
            .iter()
            .filter(|(_, l)| passes(filters, &l.found))
            .map(|(a, l)| device(a, l, rtu))
            .collect();
        devices.sort_by(|a, b| a.id.cmp(&b.id));
        devices
    }
}

enum Plan {
    Tcp(Arc<TcpPlan>),
    Rtu(Arc<RtuPlan>),
}

impl Plan {
    fn common(&self) -> &Common {
        match self {
            Plan::Tcp(p) => &p.common,
            Plan::Rtu(p) => &p.common,
        }
    }

    async fn scan(&self) -> ScanResult {
        match self {
            Plan::Tcp(p) => scan::scan_tcp(p.clone()).await,
            Plan::Rtu(p) => scan::scan_rtu(p.clone()).await,
        }
    }
}

/// Scans, sends the list when it changed, waits, repeats, until the consumer goes away.
fn run(plan: Plan) -> DeviceStream {
    let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
    tokio::spawn(async move {
        let mut known = Known::default();
        let mut last: Option<(Vec<Device>, Vec<verge_discovery_sdk::Diagnostic>)> = None;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = plan.scan() => r,
                _ = tx.closed() => break,
            };
            known.apply(&result);
            let rtu = match &plan {
                Plan::Rtu(p) => Some(p.as_ref()),
                Plan::Tcp(_) => None,
            };
            let devices = known.devices(&plan.common().filters, rtu);
            let mut update = DiscoveryUpdate::devices(devices);
            for (subject, message) in &result.warnings {
                update =
                    update.with_diagnostic(subject.clone(), severity::WARNING, message.clone());
            }
            if result.budget_exceeded {
                update = update.with_diagnostic(
                    "",
                    severity::WARNING,
                    format!(
                        "scan budget of {:?} ran out; units not reached keep their last state",
                        plan.common().scan_budget
                    ),
                );
            }
            tracing::debug!(
                asked = result.asked.len(),
                found = result.found.len(),
                took = ?started.elapsed(),
                "modbus scan pass done"
            );
            let current = (update.devices.clone(), update.diagnostics.clone());
            if last.as_ref() != Some(&current) {
                last = Some(current);
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(plan.common().rescan_interval) => {}
                _ = tx.closed() => break,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The `modbus-tcp` handler.
#[derive(Clone, Debug)]
pub struct ModbusTcp {
    shared: bool,
}

impl Default for ModbusTcp {
    fn default() -> Self {
        Self { shared: true }
    }
}

impl ModbusTcp {
    /// A handler; Modbus TCP units are reachable from every node, so shared by default.
    pub fn new(shared: bool) -> Self {
        Self { shared }
    }
}

impl DiscoveryHandler for ModbusTcp {
    fn name(&self) -> &str {
        TCP_HANDLER_NAME
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let plan = parse_details::<TcpSettings>(&request.details).and_then(|s| s.plan());
        async move { Ok(run(Plan::Tcp(Arc::new(plan?)))) }.boxed()
    }
}

/// The `modbus-rtu` handler (not shared by default).
#[derive(Clone, Debug, Default)]
pub struct ModbusRtu {
    shared: bool,
}

impl ModbusRtu {
    /// A handler; serial lines belong to one node, so not shared by default.
    pub fn new(shared: bool) -> Self {
        Self { shared }
    }
}

impl DiscoveryHandler for ModbusRtu {
    fn name(&self) -> &str {
        RTU_HANDLER_NAME
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let plan = parse_details::<RtuSettings>(&request.details).and_then(|s| s.plan());
        async move { Ok(run(Plan::Rtu(Arc::new(plan?)))) }.boxed()
    }
}
