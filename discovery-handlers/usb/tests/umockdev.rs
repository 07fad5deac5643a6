//! The usb handler against umockdev testbeds (`tests/peers/usb/*.umockdev`).

#[path = "../../udev/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
};
use verge_usb::{HotplugProbe, Usb};

const ALL: &[&str] = &[
    "webcam.umockdev",
    "serial.umockdev",
    "hub.umockdev",
    "noserial.umockdev",
];
const FIRST_UPDATE: Duration = Duration::from_secs(10);

async fn start(details: &str) -> Result<DeviceStream, DiscoveryError> {
    start_with(Usb::new(), details).await
}

async fn start_with(handler: Usb, details: &str) -> Result<DeviceStream, DiscoveryError> {
    handler
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
    let scan = verge_usb::scan().expect("scan");
    assert_eq!(scan.skipped, []);
    let found = scan.devices;
    let paths: Vec<_> = found.iter().map(|d| d.fields.port_path.as_str()).collect();
    assert_eq!(paths, ["1-1", "1-2", "1-3", "1-3.1", "1-3.2", "1-4"]);
    assert!(found.iter().all(|d| d.problems.is_empty()), "{found:?}");
    // libusb (what brokers use on the usbfs node) sees the same devices, ids,
    // classes and addresses as our own parsing of the sysfs files.
    {
        use rusb::UsbContext;
        let context = rusb::Context::new().expect("libusb");
        let mut libusb: Vec<(String, u16, u16, u8, Vec<u8>)> = context
            .devices()
            .expect("libusb devices")
            .iter()
            .filter_map(|d| {
                let ports = d.port_numbers().ok().filter(|p| !p.is_empty())?;
                let desc = d.device_descriptor().ok()?;
                let config = d.active_config_descriptor().ok()?;
                let classes = config
                    .interfaces()
                    .flat_map(|i| i.descriptors().map(|d| d.class_code()).collect::<Vec<_>>())
                    .collect();
                Some((
                    verge_usb::sysfs::port_path(d.bus_number(), &ports),
                    desc.vendor_id(),
                    desc.product_id(),
                    d.address(),
                    classes,
                ))
            })
            .collect();
        libusb.sort();
        let ours: Vec<(String, u16, u16, u8, Vec<u8>)> = found
            .iter()
            .map(|d| {
                let address = d
                    .usbfs
                    .as_deref()
                    .and_then(|n| n.rsplit('/').next())
                    .and_then(|n| n.parse().ok())
                    .expect("usbfs node");
                (
                    d.fields.port_path.clone(),
                    d.fields.vendor_id,
                    d.fields.product_id,
                    address,
                    d.fields.interfaces.iter().map(|i| i.0).collect(),
                )
            })
            .collect();
        assert_eq!(libusb, ours);
    }
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

/// The hand-written hostile testbed, next to the good ones.
fn hostile() -> String {
    format!(
        "{}/tests/testbeds/hostile.umockdev",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[tokio::test]
async fn hostile_sysfs_contents_are_skipped_or_described_with_what_is_valid() {
    let hostile = hostile();
    if !common::in_testbed(
        "hostile_sysfs_contents_are_skipped_or_described_with_what_is_valid",
        &[&hostile, "webcam.umockdev", "serial.umockdev"],
    ) {
        return;
    }
    let mut stream = start("").await.expect("valid settings");
    let update = next(&mut stream, FIRST_UPDATE).await;
    let long_serial = format!("1234:5678:{}", "A".repeat(126));
    // The good devices, and every odd one that still has ids and a port path.
    assert_eq!(
        ids(&update.devices),
        [
            "0403:6001:FT12AB34",
            "046d:0825:2F4A6B10",
            "046d:c31c@1-9",
            long_serial.as_str(),
            "abcd:0001:S_(F_",
        ]
    );
    let by_id = |id: &str| update.devices.iter().find(|d| d.id == id).expect("listed");
    // The good devices are exactly as without the hostile ones.
    let ftdi = by_id("0403:6001:FT12AB34");
    assert_eq!(nodes(ftdi), ["/dev/bus/usb/001/004", "/dev/ttyUSB0"]);
    assert_eq!(ftdi.properties["USB_PRODUCT"], "FT232R USB UART");
    assert_eq!(
        by_id("046d:0825:2F4A6B10").properties["USB_VIDEO"],
        "/dev/video0"
    );

    // 1-6: garbage after the device descriptor, 5000-character serial, non-UTF-8
    // product, empty manufacturer, devnum 999, unknown speed: ids from the
    // descriptor, serial cut to 126 characters, invalid bytes replaced, no usbfs
    // node (no valid address, no DEVNAME), the manufacturer absent.
    let odd = by_id(&long_serial);
    let p = &odd.properties;
    assert_eq!(p["USB_SERIAL"], "A".repeat(126));
    assert_eq!(p["USB_PRODUCT"], "\u{fffd}\u{fffd}Webca\u{fffd}");
    assert!(!p.contains_key("USB_MANUFACTURER"), "{p:?}");
    assert!(!p.contains_key("USB_DEVNODE"), "{p:?}");
    assert_eq!(p["USB_PORT_PATH"], "1-6");
    assert!(odd.device_specs.is_empty());
    // 1-7: no descriptors file: ids and class from the text attributes; non-UTF-8
    // serial kept as far as readable (the id keeps only safe characters); weird
    // devpath: the port path from the kernel name.
    let text_only = by_id("abcd:0001:S_(F_");
    assert_eq!(text_only.properties["USB_SERIAL"], "S\u{fffd}(F\u{fffd}");
    assert_eq!(text_only.properties["USB_CLASS"], "02");
    assert_eq!(text_only.properties["USB_PORT_PATH"], "1-7");
    assert_eq!(nodes(text_only), ["/dev/bus/usb/001/021"]);
    // 1-9: nothing but busnum and the descriptors: still a device.
    let bare = by_id("046d:c31c@1-9");
    assert_eq!(bare.properties["USB_DEVNODE"], "/dev/bus/usb/001/024");
    assert!(!bare.properties.contains_key("USB_SERIAL"));

    // The diagnostics say what was wrong, per device.
    let diag = |subject: &str| {
        update
            .diagnostics
            .iter()
            .find(|d| d.subject == subject)
            .unwrap_or_else(|| panic!("a diagnostic for {subject}: {:?}", update.diagnostics))
    };
    for (subject, severity, says) in [
        ("device 1-5", "Warning", "idVendor \"zzzz\""),
        ("device 1-5", "Warning", "fewer than the 18"),
        (
            "device 1-8",
            "Warning",
            "busnum \"300\" is not a bus number",
        ),
        ("device 1-weird", "Warning", "devpath \"../../x\""),
        ("device 1-6", "Info", "serial is longer than 126"),
        ("device 1-6", "Info", "product is not UTF-8"),
        ("device 1-6", "Info", "devnum \"999\""),
        ("device 1-6", "Info", "speed \"warp\""),
        ("device 1-6", "Info", "bInterfaceClass \"not-hex\""),
        (
            "device 1-6",
            "Info",
            "configuration descriptor 0 at byte 18",
        ),
        ("device 1-7", "Info", "no descriptors file"),
        ("device 1-7", "Info", "devpath \"7..x/../..\""),
        ("device 1-7", "Info", "serial is not UTF-8"),
    ] {
        let d = diag(subject);
        assert_eq!(d.severity, severity, "{d:?}");
        assert!(
            d.message.contains(says),
            "{subject}: {:?} should say {says:?}",
            d.message
        );
    }
    assert_eq!(update.diagnostics.len(), 5, "{:?}", update.diagnostics);
    // 1-6 is still matched by the interface class its interface directory gives
    // (its descriptors hold no configuration).
    let by_interface = first("match:\n- {vendorId: \"1234\", interfaceClass: \"ff\"}\n").await;
    assert_eq!(ids(&by_interface), [long_serial.as_str()]);

    // The parsed view agrees: the three skipped devices, each with its reason.
    let scan = verge_usb::scan().expect("scan");
    let skipped: Vec<(&str, String)> = scan
        .skipped
        .iter()
        .map(|s| (s.sysname.as_str(), s.error.to_string()))
        .collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert_eq!(
        skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["1-5", "1-8", "1-weird"]
    );
}

#[test]
fn the_resync_alone_finds_plugs_and_unplugs() {
    if std::env::var_os(common::CHILD_ENV).is_some() {
        resync_child();
        return;
    }
    let Some(driver) = common::Driver::start() else {
        return;
    };
    driver.run("the_resync_alone_finds_plugs_and_unplugs");
}

/// Resync interval of the test: short, so it runs in seconds.
const RESYNC: Duration = Duration::from_secs(1);
/// Slack for one scan and the thread's wake-up on a loaded machine.
const MARGIN: Duration = Duration::from_millis(1500);

#[tokio::main(flavor = "current_thread")]
async fn resync_child() {
    // No udev monitor, although the testbed sends uevents: the probe finds no
    // control file, so every change below can only come from the resync.
    let missing = std::env::temp_dir().join("verge-usb-test-no-udev/control");
    let handler = Usb::with_hotplug_probe(HotplugProbe::ControlPath(missing));
    let mut stream = start_with(
        handler,
        &format!("resyncIntervalSeconds: {}\n", RESYNC.as_secs()),
    )
    .await
    .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert!(update.devices.is_empty(), "{:?}", ids(&update.devices));
    assert_eq!(update.diagnostics.len(), 1, "{:?}", update.diagnostics);
    assert_eq!(update.diagnostics[0].subject, "hotplug");
    assert!(
        update.diagnostics[0].message.contains("resync every 1 s"),
        "{}",
        update.diagnostics[0].message
    );

    common::testbed_command(&format!(
        "add {}",
        common::testbed("serial.umockdev").display()
    ));
    let (devices, took) = until(&mut stream, |d| d.len() == 1).await;
    println!("usb, resync only: adapter plugged → listed in {took:?}");
    assert!(took < RESYNC + MARGIN, "{took:?}");
    assert_eq!(devices[0].id, "0403:6001:FT12AB34");

    common::testbed_command("remove /devices/pci0000:00/0000:00:14.0/usb1/1-2");
    let (_, took) = until(&mut stream, <[Device]>::is_empty).await;
    println!("usb, resync only: adapter unplugged → gone in {took:?}");
    assert!(took < RESYNC + MARGIN, "{took:?}");
}
