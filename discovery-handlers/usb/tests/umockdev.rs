//! The usb handler against umockdev testbeds (`tests/peers/usb/*.umockdev`).

#[path = "../../udev/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
};
use verge_usb::Usb;

const ALL: &[&str] = &[
    "webcam.umockdev",
    "serial.umockdev",
    "hub.umockdev",
    "noserial.umockdev",
];
const FIRST_UPDATE: Duration = Duration::from_secs(10);

async fn start(details: &str) -> Result<DeviceStream, DiscoveryError> {
    Usb::new()
        .discover(DiscoveryRequest {
            details: details.to_string(),
            properties: BTreeMap::new(),
        })
        .await
}

async fn next(stream: &mut DeviceStream, within: Duration) -> DiscoveryUpdate {
    tokio::time::timeout(within, stream.next())
        .await
        .expect("an update in time")
        .expect("stream open")
        .expect("no error")
}

async fn first(details: &str) -> Vec<Device> {
    let mut stream = start(details).await.expect("valid settings");
    next(&mut stream, FIRST_UPDATE).await.devices
}

fn ids(devices: &[Device]) -> Vec<&str> {
    devices.iter().map(|d| d.id.as_str()).collect()
}

fn nodes(d: &Device) -> Vec<&str> {
    d.device_specs
        .iter()
        .map(|s| s.host_path.as_str())
        .collect()
}

#[test]
fn libusb_and_sysfs_see_the_testbeds() {
    if !common::in_testbed("libusb_and_sysfs_see_the_testbeds", ALL) {
        return;
    }
    let found = verge_usb::scan().expect("scan");
    let paths: Vec<_> = found.iter().map(|d| d.fields.port_path.as_str()).collect();
    assert_eq!(paths, ["1-1", "1-2", "1-3", "1-3.1", "1-3.2", "1-4"]);
    let cam = &found[0];
    assert_eq!(
        (cam.fields.vendor_id, cam.fields.product_id),
        (0x046d, 0x0825)
    );
    assert_eq!(cam.fields.class, (0xef, 0x02, 0x01));
    assert_eq!(cam.fields.interfaces, [(0x0e, 1, 0), (0x0e, 2, 0)]);
    assert_eq!(cam.fields.serial.as_deref(), Some("2F4A6B10"));
    assert_eq!(cam.fields.manufacturer.as_deref(), Some("Logitech"));
    assert_eq!(cam.fields.product.as_deref(), Some("Webcam C270"));
    assert_eq!(cam.fields.bus, 1);
    assert_eq!(cam.usbfs.as_deref(), Some("/dev/bus/usb/001/003"));
    assert_eq!(cam.nodes.len(), 1);
    assert_eq!(cam.nodes[0].devnode, "/dev/video0");
    assert_eq!(cam.nodes[0].interface, Some(0));
    let acm = &found[3];
    assert_eq!(acm.fields.port_path, "1-3.1");
    assert_eq!(acm.nodes[0].devnode, "/dev/ttyACM0");
    assert_eq!(found[4].nodes[0].devnode, "/dev/hidraw0");
    assert_eq!(found[5].fields.serial, None);
}

#[tokio::test]
async fn rules_filters_ids_and_properties() {
    if !common::in_testbed("rules_filters_ids_and_properties", ALL) {
        return;
    }
    // Defaults: every device except hubs, one device per USB device.
    let all = first("").await;
    assert_eq!(
        ids(&all),
        [
            "0403:6001:FT12AB34",
            "046d:0825:2F4A6B10",
            "046d:c31c@1-3.2",
            "1a86:7523@1-4",
            "2341:0043:85734323231351E0A1C2",
        ]
    );
    let ftdi = &all[0];
    let p = &ftdi.properties;
    assert_eq!(p["USB_VENDOR_ID"], "0403");
    assert_eq!(p["USB_PRODUCT_ID"], "6001");
    assert_eq!(p["USB_SERIAL"], "FT12AB34");
    assert_eq!(p["USB_MANUFACTURER"], "FTDI");
    assert_eq!(p["USB_PRODUCT"], "FT232R USB UART");
    assert_eq!(p["USB_CLASS"], "00");
    assert_eq!(p["USB_BUS"], "001");
    assert_eq!(p["USB_PORT_PATH"], "1-2");
    assert_eq!(p["USB_DEVNODE"], "/dev/bus/usb/001/004");
    assert_eq!(p["USB_TTY"], "/dev/ttyUSB0");
    assert_eq!(nodes(ftdi), ["/dev/bus/usb/001/004", "/dev/ttyUSB0"]);
    assert!(ftdi.device_specs.iter().all(|s| s.permissions == "rw"));
    assert_eq!(all[1].properties["USB_VIDEO"], "/dev/video0");
    assert_eq!(all[2].properties["USB_HIDRAW"], "/dev/hidraw0");
    assert!(!all[3].properties.contains_key("USB_SERIAL"));

    // Lists, ranges and globs; only the kernel nodes, read-only.
    let serial = first(
        "match:\n- {vendorId: [\"0403\", \"1a86\"], productId: \"6000-7fff\"}\n- {product: \"Arduino*\"}\ndeviceNodes: [tty]\npermissions: r\n",
    )
    .await;
    assert_eq!(
        ids(&serial),
        [
            "0403:6001:FT12AB34",
            "1a86:7523@1-4",
            "2341:0043:85734323231351E0A1C2"
        ]
    );
    assert_eq!(nodes(&serial[0]), ["/dev/ttyUSB0"]);
    assert_eq!(serial[0].device_specs[0].permissions, "r");
    assert_eq!(nodes(&serial[2]), ["/dev/ttyACM0"]);

    // Interface class, port path behind the hub, filters.
    let behind_hub = first("match:\n- {portPath: \"1-3.*\"}\n").await;
    assert_eq!(behind_hub.len(), 2);
    let video = first("match:\n- {interfaceClass: \"0e\", speed: high}\n").await;
    assert_eq!(ids(&video), ["046d:0825:2F4A6B10"]);
    let excluded = first(
        "vendorProductIds: {action: Exclude, items: [\"046D:C31C\"]}\nserials: {action: Exclude, items: [FT12AB34]}\n",
    )
    .await;
    assert_eq!(excluded.len(), 3, "{:?}", ids(&excluded));
    let hubs = first("includeHubs: true\nmatch:\n- {deviceClass: \"09\"}\n").await;
    assert_eq!(ids(&hubs), ["05e3:0608@1-3"]);
}

#[tokio::test]
async fn composite_devices_grouped_or_per_interface() {
    if !common::in_testbed("composite_devices_grouped_or_per_interface", ALL) {
        return;
    }
    let grouped = first("match:\n- {vendorId: \"046d\", productId: \"0825\"}\n").await;
    assert_eq!(nodes(&grouped[0]), ["/dev/bus/usb/001/003", "/dev/video0"]);
    let apart =
        first("match:\n- {vendorId: \"046d\", productId: \"0825\"}\ngroupInterfaces: false\n")
            .await;
    assert_eq!(
        ids(&apart),
        ["046d:0825:2F4A6B10", "046d:0825:2F4A6B10/if0"]
    );
    assert_eq!(nodes(&apart[0]), ["/dev/bus/usb/001/003"]);
    assert_eq!(nodes(&apart[1]), ["/dev/video0"]);
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_field_named() {
    for (details, named) in [
        ("match:\n- {vendorId: \"04g3\"}\n", "match[0].vendorId"),
        ("match:\n- {vendorID: \"0403\"}\n", "vendorID"),
        ("deviceNodes: [usbfs, disk]\n", "disk"),
        ("permissions: rwx\n", "permissions"),
        ("match:\n- {speed: warp}\n", "warp"),
    ] {
        match start(details).await {
            Err(DiscoveryError::InvalidSettings(m)) => {
                assert!(m.contains(named), "{details:?}: {m:?} should name {named}")
            }
            Err(e) => panic!("{details:?}: wrong error {e}"),
            Ok(_) => panic!("{details:?} was accepted"),
        }
    }
}

async fn until(
    stream: &mut DeviceStream,
    done: impl Fn(&[Device]) -> bool,
) -> (Vec<Device>, Duration) {
    let started = Instant::now();
    loop {
        let update = next(stream, Duration::from_secs(5)).await;
        if done(&update.devices) {
            return (update.devices, started.elapsed());
        }
    }
}

#[test]
fn hotplug_and_re_enumeration() {
    if std::env::var_os(common::CHILD_ENV).is_some() {
        hotplug_child();
        return;
    }
    let Some(driver) = common::Driver::start() else {
        return;
    };
    driver.run("hotplug_and_re_enumeration");
}

#[tokio::main(flavor = "current_thread")]
async fn hotplug_child() {
    const SERIAL: &str = "/devices/pci0000:00/0000:00:14.0/usb1/1-2";
    let add = |f: &str| common::testbed_command(&format!("add {}", common::testbed(f).display()));
    let mut stream = start("resyncIntervalSeconds: 3600\n").await.expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert!(update.devices.is_empty(), "{:?}", ids(&update.devices));

    add("serial.umockdev");
    let (devices, took) = until(&mut stream, |d| d.len() == 1).await;
    println!("usb: adapter plugged → listed in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(devices[0].id, "0403:6001:FT12AB34");
    assert_eq!(nodes(&devices[0]), ["/dev/bus/usb/001/004", "/dev/ttyUSB0"]);

    add("hub.umockdev");
    let (devices, _) = until(&mut stream, |d| d.len() == 3).await;
    assert!(devices.iter().any(|d| d.id == "046d:c31c@1-3.2"));

    common::testbed_command(&format!("remove {SERIAL}"));
    let (devices, took) = until(&mut stream, |d| d.len() == 2).await;
    println!("usb: adapter unplugged → gone in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(devices.iter().all(|d| d.id != "0403:6001:FT12AB34"));

    // Back with a new device number and tty: same id, new nodes.
    add("serial-renumbered.umockdev");
    let (devices, took) = until(&mut stream, |d| d.len() == 3).await;
    println!("usb: re-enumerated adapter → listed in {took:?}");
    let again = devices
        .iter()
        .find(|d| d.id == "0403:6001:FT12AB34")
        .expect("same id after re-enumeration");
    assert_eq!(nodes(again), ["/dev/bus/usb/001/009", "/dev/ttyUSB2"]);
    assert_eq!(again.properties["USB_DEVNODE"], "/dev/bus/usb/001/009");
    assert_eq!(again.properties["USB_TTY"], "/dev/ttyUSB2");
}
