//! The `usb` discovery handler: USB devices by descriptor, with the device nodes
//! a broker needs.
//!
//! libudev lists the USB devices; each device's sysfs files give its descriptors
//! (the kernel's copy, so no control transfer disturbs a device in use), ids,
//! strings and the kernel nodes bound to its interfaces. Every file is parsed by
//! our own checked code ([`sysfs`], [`descriptors`]), so a device with odd files is
//! skipped or reported with what is valid, with a diagnostic saying what was wrong.
//! Hotplug comes from a udev monitor plus a periodic resync. See the crate README
//! for the settings.

pub mod descriptors;
pub mod matching;
mod scan;
pub mod sysfs;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use verge_discovery_sdk::{
    Device, DeviceSpec, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    DiscoveryUpdate, FilterList, parse_details, severity,
};
pub use verge_udev::HotplugProbe;

pub use matching::{MatchRule, MatchRuleSpec, UsbFields};
pub use scan::{Scan, ScanError, Skipped, scan};

/// Name Configurations use.
pub const HANDLER_NAME: &str = "usb";
/// Default device-spec permissions: read and write, no mknod.
pub const DEFAULT_PERMISSIONS: &str = "rw";
/// Default interval of the full rescan behind hotplug events.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// USB hub device class.
pub const HUB_CLASS: u8 = 0x09;
/// Most match rules.
pub const MAX_RULES: usize = 256;
/// Most per-device diagnostics in one update, so a bus full of broken devices
/// cannot grow the Configuration's status without bound.
pub const MAX_DEVICE_DIAGNOSTICS: usize = 16;

/// Property names.
pub mod property {
    /// idVendor, 4 hex digits.
    pub const VENDOR_ID: &str = "USB_VENDOR_ID";
    /// idProduct, 4 hex digits.
    pub const PRODUCT_ID: &str = "USB_PRODUCT_ID";
    /// Serial number string.
    pub const SERIAL: &str = "USB_SERIAL";
    /// Manufacturer string.
    pub const MANUFACTURER: &str = "USB_MANUFACTURER";
    /// Product string.
    pub const PRODUCT: &str = "USB_PRODUCT";
    /// bDeviceClass, 2 hex digits.
    pub const CLASS: &str = "USB_CLASS";
    /// Bus number, 3 digits as in /dev/bus/usb.
    pub const BUS: &str = "USB_BUS";
    /// Port path, e.g. `1-3.1`.
    pub const PORT_PATH: &str = "USB_PORT_PATH";
    /// usbfs node `/dev/bus/usb/BBB/DDD`.
    pub const DEVNODE: &str = "USB_DEVNODE";
    /// Bound tty nodes, comma-separated.
    pub const TTY: &str = "USB_TTY";
    /// Bound video4linux nodes, comma-separated.
    pub const VIDEO: &str = "USB_VIDEO";
    /// Bound hidraw nodes, comma-separated.
    pub const HIDRAW: &str = "USB_HIDRAW";
}

/// Kinds of device node a broker can be given.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// `/dev/bus/usb/BBB/DDD` (libusb access to the whole device).
    Usbfs,
    /// `ttyUSB*`, `ttyACM*`.
    Tty,
    /// `video*`.
    Video,
    /// `hidraw*`.
    Hidraw,
    /// `sg*` (SCSI generic, e.g. USB storage).
    Sg,
}

/// Every kind, the default of `deviceNodes`.
pub const ALL_NODE_KINDS: &[NodeKind] = &[
    NodeKind::Usbfs,
    NodeKind::Tty,
    NodeKind::Video,
    NodeKind::Hidraw,
    NodeKind::Sg,
];

/// discoveryDetails of the usb handler.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UsbSettings {
    /// Match rules; a device is found when any matches. Empty: every device.
    #[serde(default, rename = "match")]
    pub match_rules: Vec<MatchRuleSpec>,
    /// Filter on `vvvv:pppp`.
    #[serde(default)]
    pub vendor_product_ids: Option<FilterList>,
    /// Filter on serial numbers.
    #[serde(default)]
    pub serials: Option<FilterList>,
    /// Filter on port paths.
    #[serde(default)]
    pub port_paths: Option<FilterList>,
    /// Which nodes brokers get (default: all kinds).
    #[serde(default)]
    pub device_nodes: Option<Vec<NodeKind>>,
    /// Device-spec permissions (default rw).
    #[serde(default)]
    pub permissions: Option<String>,
    /// One device for a composite device's nodes (default true); false gives one
    /// device per interface with nodes, plus one for the usbfs node.
    #[serde(default)]
    pub group_interfaces: Option<bool>,
    /// Also report hubs (default false).
    #[serde(default)]
    pub include_hubs: bool,
    /// Full rescan interval in seconds.
    #[serde(default)]
    pub resync_interval_seconds: Option<u64>,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct Compiled {
    rules: Vec<MatchRule>,
    vendor_product_ids: Option<FilterList>,
    serials: Option<FilterList>,
    port_paths: Option<FilterList>,
    nodes: BTreeSet<NodeKind>,
    permissions: String,
    group_interfaces: bool,
    include_hubs: bool,
    resync_interval: Duration,
}

fn invalid(m: impl Into<String>) -> DiscoveryError {
    DiscoveryError::InvalidSettings(m.into())
}

/// Parses and checks discoveryDetails.
pub fn compile_settings(details: &str) -> Result<Compiled, DiscoveryError> {
    let s: UsbSettings = parse_details(details)?;
    if s.match_rules.len() > MAX_RULES {
        return Err(invalid(format!("match has more than {MAX_RULES} rules")));
    }
    let rules = s
        .match_rules
        .iter()
        .enumerate()
        .map(|(i, r)| MatchRule::compile(r, &format!("match[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let permissions = s
        .permissions
        .unwrap_or_else(|| DEFAULT_PERMISSIONS.to_string());
    let mut seen = BTreeSet::new();
    if permissions.is_empty()
        || !permissions
            .chars()
            .all(|c| matches!(c, 'r' | 'w' | 'm') && seen.insert(c))
    {
        return Err(invalid(format!(
            "permissions {permissions:?} must combine r, w and m, each at most once"
        )));
    }
    let nodes: BTreeSet<NodeKind> = s
        .device_nodes
        .unwrap_or_else(|| ALL_NODE_KINDS.to_vec())
        .into_iter()
        .collect();
    let resync_interval = match s.resync_interval_seconds {
        None => DEFAULT_RESYNC_INTERVAL,
        Some(0) => return Err(invalid("resyncIntervalSeconds must be at least 1")),
        Some(n) => Duration::from_secs(n.min(24 * 3600)),
    };
    Ok(Compiled {
        rules,
        vendor_product_ids: s.vendor_product_ids,
        serials: s.serials,
        port_paths: s.port_paths,
        nodes,
        permissions,
        group_interfaces: s.group_interfaces.unwrap_or(true),
        include_hubs: s.include_hubs,
        resync_interval,
    })
}

/// A kernel node bound to one of the device's interfaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelNode {
    /// Kind.
    pub kind: NodeKind,
    /// Path, e.g. `/dev/ttyUSB0`.
    pub devnode: String,
    /// bInterfaceNumber of the interface it hangs off, if known.
    pub interface: Option<u8>,
}

/// Everything found about one USB device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbInfo {
    /// The fields rules look at.
    pub fields: UsbFields,
    /// usbfs node.
    pub usbfs: Option<String>,
    /// Bound kernel nodes.
    pub nodes: Vec<KernelNode>,
    /// What was wrong in its sysfs files but did not stop it being reported.
    pub problems: Vec<String>,
}

impl UsbInfo {
    /// `vvvv:pppp:serial` when there is a serial, else `vvvv:pppp@port-path`.
    pub fn id(&self) -> String {
        let f = &self.fields;
        match &f.serial {
            Some(s) => format!(
                "{:04x}:{:04x}:{}",
                f.vendor_id,
                f.product_id,
                sysfs::id_component(s)
            ),
            None => format!("{:04x}:{:04x}@{}", f.vendor_id, f.product_id, f.port_path),
        }
    }
}

impl Compiled {
    /// Whether the device is selected by the rules and filters.
    pub fn selects(&self, d: &UsbInfo) -> bool {
        let f = &d.fields;
        (self.include_hubs || f.class.0 != HUB_CLASS)
            && (self.rules.is_empty() || self.rules.iter().any(|r| r.matches(f)))
            && self.vendor_product_ids.as_ref().is_none_or(|l| {
                l.accepts_with(
                    &format!("{:04x}:{:04x}", f.vendor_id, f.product_id),
                    |item, v| item.eq_ignore_ascii_case(v),
                )
            })
            && self
                .serials
                .as_ref()
                .is_none_or(|l| l.accepts(f.serial.as_deref().unwrap_or("")))
            && self
                .port_paths
                .as_ref()
                .is_none_or(|l| l.accepts(&f.port_path))
    }

    fn spec(&self, path: &str) -> DeviceSpec {
        DeviceSpec {
            container_path: path.to_string(),
            host_path: path.to_string(),
            permissions: self.permissions.clone(),
        }
    }

    fn device(&self, id: String, d: &UsbInfo, usbfs: bool, nodes: &[&KernelNode]) -> Device {
        let f = &d.fields;
        let mut p = BTreeMap::new();
        p.insert(property::VENDOR_ID, format!("{:04x}", f.vendor_id));
        p.insert(property::PRODUCT_ID, format!("{:04x}", f.product_id));
        if let Some(s) = &f.serial {
            p.insert(property::SERIAL, s.clone());
        }
        if let Some(s) = &f.manufacturer {
            p.insert(property::MANUFACTURER, s.clone());
        }
        if let Some(s) = &f.product {
            p.insert(property::PRODUCT, s.clone());
        }
        p.insert(property::CLASS, format!("{:02x}", f.class.0));
        p.insert(property::BUS, format!("{:03}", f.bus));
        p.insert(property::PORT_PATH, f.port_path.clone());
        if let Some(n) = &d.usbfs {
            p.insert(property::DEVNODE, n.clone());
        }
        let mut specs = Vec::new();
        if usbfs && let Some(n) = &d.usbfs {
            specs.push(self.spec(n));
        }
        for (kind, name) in [
            (NodeKind::Tty, property::TTY),
            (NodeKind::Video, property::VIDEO),
            (NodeKind::Hidraw, property::HIDRAW),
            (NodeKind::Sg, ""),
        ] {
            let of_kind: Vec<&str> = nodes
                .iter()
                .filter(|n| n.kind == kind)
                .map(|n| n.devnode.as_str())
                .collect();
            if !name.is_empty() && !of_kind.is_empty() {
                p.insert(name, of_kind.join(","));
            }
            specs.extend(of_kind.iter().map(|n| self.spec(n)));
        }
        Device {
            id,
            properties: p.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            mounts: Vec::new(),
            device_specs: specs,
        }
    }

    /// The `v0` devices for the selected USB devices.
    pub fn devices(&self, found: &[UsbInfo]) -> Vec<Device> {
        let mut out = Vec::new();
        for d in found.iter().filter(|d| self.selects(d)) {
            let mut nodes: Vec<&KernelNode> = d
                .nodes
                .iter()
                .filter(|n| self.nodes.contains(&n.kind))
                .collect();
            nodes.sort();
            nodes.dedup();
            let usbfs = self.nodes.contains(&NodeKind::Usbfs);
            if self.group_interfaces {
                out.push(self.device(d.id(), d, usbfs, &nodes));
                continue;
            }
            if usbfs && d.usbfs.is_some() {
                out.push(self.device(d.id(), d, true, &[]));
            }
            let interfaces: BTreeSet<Option<u8>> = nodes.iter().map(|n| n.interface).collect();
            for i in interfaces {
                let mine: Vec<&KernelNode> =
                    nodes.iter().copied().filter(|n| n.interface == i).collect();
                let suffix = i
                    .map(|i| format!("/if{i}"))
                    .unwrap_or_else(|| "/if?".into());
                out.push(self.device(format!("{}{suffix}", d.id()), d, false, &mine));
            }
        }
        // Two devices with one serial (cloned adapters) would share an id: keep the
        // first and say so, rather than hand one Instance two devices' nodes.
        let mut ids = BTreeSet::new();
        out.retain(|d| {
            let fresh = ids.insert(d.id.clone());
            if !fresh {
                tracing::warn!(id = %d.id, "two USB devices share vendor, product and serial; the second is skipped");
            }
            fresh
        });
        out
    }

    /// Rescan interval.
    pub fn resync_interval(&self) -> Duration {
        self.resync_interval
    }
}

/// The usb handler.
#[derive(Clone, Debug, Default)]
pub struct Usb {
    probe: HotplugProbe,
}

impl Usb {
    /// The handler, deciding on hotplug as the host allows ([`HotplugProbe::Host`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The handler with another hotplug decision (tests force resync-only or monitor).
    pub fn with_hotplug_probe(probe: HotplugProbe) -> Self {
        Self { probe }
    }
}

/// The diagnostics of one scan: every skipped device (Warning) and every selected
/// device reported despite odd files (Info), at most [`MAX_DEVICE_DIAGNOSTICS`].
pub fn scan_diagnostics(scan: &Scan, selected: &[&UsbInfo]) -> Vec<(String, &'static str, String)> {
    let mut out: Vec<(String, &'static str, String)> = scan
        .skipped
        .iter()
        .map(|s| {
            (
                format!("device {}", sysfs::id_component(&s.sysname)),
                severity::WARNING,
                format!("skipped: {}", s.error),
            )
        })
        .chain(selected.iter().filter(|d| !d.problems.is_empty()).map(|d| {
            (
                format!("device {}", d.fields.port_path),
                severity::INFO,
                format!("reported with what is valid: {}", d.problems.join("; ")),
            )
        }))
        .collect();
    if out.len() > MAX_DEVICE_DIAGNOSTICS {
        let more = out.len() - (MAX_DEVICE_DIAGNOSTICS - 1);
        out.truncate(MAX_DEVICE_DIAGNOSTICS - 1);
        out.push((
            "devices".into(),
            severity::WARNING,
            format!("{more} more devices with odd sysfs files (see the handler's log)"),
        ));
    }
    out
}

/// One scan turned into an update, logging each problem once while it lasts
/// (`reported` holds the last scan's), not on every resync.
fn scan_update(
    settings: &Compiled,
    reported: &mut BTreeSet<String>,
) -> Result<DiscoveryUpdate, String> {
    let found = scan().map_err(|e| e.to_string())?;
    let mut now = BTreeSet::new();
    for s in &found.skipped {
        let line = format!("{}: skipped: {}", s.sysname, s.error);
        if !reported.contains(&line) {
            tracing::warn!("usb: {line}");
        }
        now.insert(line);
    }
    for d in &found.devices {
        for p in &d.problems {
            let line = format!("{}: {p}", d.fields.port_path);
            if !reported.contains(&line) {
                tracing::warn!("usb: {line}");
            }
            now.insert(line);
        }
    }
    *reported = now;
    let selected: Vec<&UsbInfo> = found
        .devices
        .iter()
        .filter(|d| settings.selects(d))
        .collect();
    let mut update = DiscoveryUpdate::devices(settings.devices(&found.devices));
    for (subject, level, message) in scan_diagnostics(&found, &selected) {
        update = update.with_diagnostic(subject, level, message);
    }
    Ok(update)
}

impl DiscoveryHandler for Usb {
    fn name(&self) -> &str {
        HANDLER_NAME
    }

    fn shared(&self) -> bool {
        false
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        let probe = self.probe.clone();
        let result = compile_settings(&request.details).map(|settings| {
            let mut reported = BTreeSet::new();
            verge_udev::spawn_watch(HANDLER_NAME, settings.resync_interval, probe, move || {
                scan_update(&settings, &mut reported)
            })
        });
        async move { result }.boxed()
    }
}
