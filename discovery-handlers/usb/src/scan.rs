//! One enumeration: libudev lists the USB devices and their kernel nodes; each
//! device's own sysfs files (descriptors, ids, strings) are read and parsed by
//! [`sysfs`], the same code the fuzz target runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sysfs::{self, DeviceError};
use crate::{KernelNode, NodeKind, UsbInfo};

/// Most ancestors walked from a kernel node to its USB interface.
const MAX_DEPTH: usize = 16;

/// Kernel subsystems whose nodes can be handed to brokers.
const NODE_SUBSYSTEMS: &[(&str, NodeKind)] = &[
    ("tty", NodeKind::Tty),
    ("video4linux", NodeKind::Video),
    ("hidraw", NodeKind::Hidraw),
    ("scsi_generic", NodeKind::Sg),
];

/// The interface number of the nearest usb_interface ancestor.
fn interface_of(d: &udev::Device) -> Option<u8> {
    let mut p = d.parent();
    for _ in 0..MAX_DEPTH {
        let cur = p?;
        if cur.devtype().is_some_and(|t| t == "usb_interface") {
            return cur
                .attribute_value("bInterfaceNumber")
                .and_then(|v| sysfs::parse_hex_u8(&v.to_string_lossy()));
        }
        p = cur.parent();
    }
    None
}

/// Kernel nodes with their syspaths.
fn kernel_nodes() -> std::io::Result<Vec<(String, KernelNode)>> {
    let mut out = Vec::new();
    for (subsystem, kind) in NODE_SUBSYSTEMS {
        let mut e = udev::Enumerator::new()?;
        e.match_subsystem(subsystem)?;
        for d in e.scan_devices()? {
            let Some(node) = d.devnode() else { continue };
            out.push((
                d.syspath().to_string_lossy().into_owned(),
                KernelNode {
                    kind: *kind,
                    devnode: node.to_string_lossy().into_owned(),
                    interface: interface_of(&d),
                },
            ));
        }
    }
    Ok(out)
}

/// A device left out of a scan, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Kernel name (`1-3.1`).
    pub sysname: String,
    /// Why.
    pub error: DeviceError,
}

/// One scan's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Devices found, by port path.
    pub devices: Vec<UsbInfo>,
    /// Devices left out.
    pub skipped: Vec<Skipped>,
}

/// Why a scan failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// libudev could not enumerate.
    #[error("udev enumeration failed: {0}")]
    Udev(#[from] std::io::Error),
}

/// Enumerates every USB device except root hubs, from sysfs (through libudev's
/// list of devices). Every file is parsed by [`sysfs::parse_device`]; a device whose
/// files make no sense is skipped with the reason, the rest are still found.
pub fn scan() -> Result<Scan, ScanError> {
    let mut e = udev::Enumerator::new()?;
    e.match_subsystem("usb")?;
    let mut devices = Vec::new();
    let mut interface_dirs: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
    for d in e.scan_devices()? {
        match d.devtype().and_then(|t| t.to_str()) {
            Some("usb_device") => devices.push(d),
            Some("usb_interface") => {
                if let Some(parent) = d.parent() {
                    interface_dirs
                        .entry(parent.syspath().to_path_buf())
                        .or_default()
                        .push(d.syspath().to_path_buf());
                }
            }
            _ => {}
        }
    }
    let nodes = kernel_nodes()?;
    let mut out = Scan::default();
    for d in devices {
        let syspath = d.syspath().to_path_buf();
        let sysname = d.sysname().to_string_lossy().into_owned();
        let dirs: Vec<&Path> = interface_dirs
            .get(&syspath)
            .map(|v| v.iter().map(PathBuf::as_path).collect())
            .unwrap_or_default();
        let raw = sysfs::read_device(&syspath, &sysname, &dirs);
        let parsed = match sysfs::parse_device(&raw) {
            Ok(Some(p)) => p,
            Ok(None) => continue, // a root hub
            Err(error) => {
                out.skipped.push(Skipped { sysname, error });
                continue;
            }
        };
        let f = parsed.fields;
        let prefix = format!("{}/", syspath.to_string_lossy());
        let mut bound: Vec<KernelNode> = nodes
            .iter()
            .filter(|(path, _)| path.starts_with(&prefix))
            .map(|(_, n)| n.clone())
            .collect();
        bound.sort();
        let usbfs = d
            .devnode()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                parsed
                    .devnum
                    .map(|n| format!("/dev/bus/usb/{:03}/{n:03}", f.bus))
            });
        out.devices.push(UsbInfo {
            fields: f,
            usbfs,
            nodes: bound,
            problems: parsed.problems.iter().map(ToString::to_string).collect(),
        });
    }
    out.devices
        .sort_by(|a, b| a.fields.port_path.cmp(&b.fields.port_path));
    out.skipped.sort_by(|a, b| a.sysname.cmp(&b.sysname));
    Ok(out)
}
