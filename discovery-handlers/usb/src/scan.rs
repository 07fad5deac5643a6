//! One enumeration: libusb for descriptors, libudev (sysfs) for strings and nodes.

use std::collections::HashMap;

use crate::matching::UsbFields;
use crate::sysfs;
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

struct SysfsDevice {
    syspath: String,
    devnode: Option<String>,
    serial: Option<String>,
    manufacturer: Option<String>,
    product: Option<String>,
}

fn attr(d: &udev::Device, name: &str) -> Option<String> {
    d.attribute_value(name)
        .and_then(|v| sysfs::clean_string(&v.to_string_lossy()))
}

/// USB devices as sysfs sees them, by kernel name (the port path).
fn sysfs_devices() -> std::io::Result<HashMap<String, SysfsDevice>> {
    let mut e = udev::Enumerator::new()?;
    e.match_subsystem("usb")?;
    e.match_property("DEVTYPE", "usb_device")?;
    let mut out = HashMap::new();
    for d in e.scan_devices()? {
        let name = d.sysname().to_string_lossy().into_owned();
        out.insert(
            name,
            SysfsDevice {
                syspath: d.syspath().to_string_lossy().into_owned(),
                devnode: d.devnode().map(|n| n.to_string_lossy().into_owned()),
                serial: attr(&d, "serial"),
                manufacturer: attr(&d, "manufacturer"),
                product: attr(&d, "product"),
            },
        );
    }
    Ok(out)
}

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

fn speed_name(s: rusb::Speed) -> Option<String> {
    let name = match s {
        rusb::Speed::Low => "low",
        rusb::Speed::Full => "full",
        rusb::Speed::High => "high",
        rusb::Speed::Super => "super",
        rusb::Speed::SuperPlus => "superplus",
        _ => return None,
    };
    Some(name.to_string())
}

/// Enumerates every USB device except root hubs.
pub fn scan() -> Result<Vec<UsbInfo>, String> {
    use rusb::UsbContext;
    // A fresh context per scan: a long-lived one updates its device list from its
    // own event thread, which can lag behind the uevent that made us rescan.
    let context = rusb::Context::new().map_err(|e| format!("libusb: {e}"))?;
    let list = context.devices().map_err(|e| format!("libusb: {e}"))?;
    let sysfs = sysfs_devices().map_err(|e| format!("udev: {e}"))?;
    let nodes = kernel_nodes().map_err(|e| format!("udev: {e}"))?;
    let mut out = Vec::new();
    for device in list.iter() {
        let ports = device.port_numbers().unwrap_or_default();
        if ports.is_empty() {
            continue; // a root hub
        }
        let bus = device.bus_number();
        let port_path = sysfs::port_path(bus, &ports);
        let desc = match device.device_descriptor() {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%port_path, error = %e, "usb: no device descriptor; skipped");
                continue;
            }
        };
        // libusb and udev can disagree for a moment around a plug; the next event
        // or resync sees both.
        let Some(sys) = sysfs.get(&port_path) else {
            tracing::debug!(%port_path, "usb: not in sysfs yet; skipped");
            continue;
        };
        let interfaces = device
            .active_config_descriptor()
            .map(|c| {
                c.interfaces()
                    .flat_map(|i| {
                        i.descriptors()
                            .map(|d| (d.class_code(), d.sub_class_code(), d.protocol_code()))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let prefix = format!("{}/", sys.syspath);
        let mut bound: Vec<KernelNode> = nodes
            .iter()
            .filter(|(path, _)| path.starts_with(&prefix))
            .map(|(_, n)| n.clone())
            .collect();
        bound.sort();
        out.push(UsbInfo {
            fields: UsbFields {
                vendor_id: desc.vendor_id(),
                product_id: desc.product_id(),
                class: (
                    desc.class_code(),
                    desc.sub_class_code(),
                    desc.protocol_code(),
                ),
                interfaces,
                serial: sys.serial.clone(),
                manufacturer: sys.manufacturer.clone(),
                product: sys.product.clone(),
                bus,
                port_path,
                speed: speed_name(device.speed()),
            },
            usbfs: sys
                .devnode
                .clone()
                .or_else(|| Some(format!("/dev/bus/usb/{:03}/{:03}", bus, device.address()))),
            nodes: bound,
        });
    }
    out.sort_by(|a, b| a.fields.port_path.cmp(&b.fields.port_path));
    Ok(out)
}
