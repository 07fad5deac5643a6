//! The udev handler against umockdev testbeds (`tests/peers/usb/*.umockdev`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
};
use verge_udev::{HotplugProbe, HotplugSource, Udev};

const ALL: &[&str] = &[
    "webcam.umockdev",
    "serial.umockdev",
    "hub.umockdev",
    "noserial.umockdev",
];
const WEBCAM: &str = "/devices/pci0000:00/0000:00:14.0/usb1/1-1";
const SERIAL: &str = "/devices/pci0000:00/0000:00:14.0/usb1/1-2";
const FIRST_UPDATE: Duration = Duration::from_secs(10);

async fn start(details: &str) -> Result<DeviceStream, DiscoveryError> {
    start_with(Udev::new(), details).await
}

async fn start_with(handler: Udev, details: &str) -> Result<DeviceStream, DiscoveryError> {
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

fn nodes(d: &Device) -> Vec<(&str, &str)> {
    d.device_specs
        .iter()
        .map(|s| (s.host_path.as_str(), s.permissions.as_str()))
        .collect()
}

#[tokio::test]
async fn akri_video_rule_selects_the_webcam_node() {
    if !common::in_testbed("akri_video_rule_selects_the_webcam_node", ALL) {
        return;
    }
    let devices = first("udevRules:\n- 'KERNEL==\"video[0-9]*\"'\n").await;
    let video = format!("{WEBCAM}/1-1:1.0/video4linux/video0");
    assert_eq!(ids(&devices), [video.as_str()]);
    let d = &devices[0];
    assert_eq!(d.properties["UDEV_DEVNODE"], "/dev/video0");
    assert_eq!(d.properties["UDEV_DEVPATH"], video);
    assert_eq!(d.properties.len(), 2, "{:?}", d.properties);
    assert_eq!(nodes(d), [("/dev/video0", "rwm")]);
    assert_eq!(d.device_specs[0].container_path, "/dev/video0");
}

#[tokio::test]
async fn akri_tty_rule_selects_only_the_ftdi_adapter() {
    if !common::in_testbed("akri_tty_rule_selects_only_the_ftdi_adapter", ALL) {
        return;
    }
    // JSON is valid too, as Akri accepts it.
    let devices = first(
        r#"{"udevRules": ["SUBSYSTEM==\"tty\", ATTRS{idVendor}==\"0403\""], "permissions": "rw"}"#,
    )
    .await;
    assert_eq!(
        ids(&devices),
        [format!("{SERIAL}/1-2:1.0/ttyUSB0/tty/ttyUSB0").as_str()]
    );
    assert_eq!(nodes(&devices[0]), [("/dev/ttyUSB0", "rw")]);

    // Every USB serial port, through hubs, with a negative match.
    let devices = first(
        "udevRules:\n- 'SUBSYSTEM==\"tty\", SUBSYSTEMS==\"usb\", ATTRS{idVendor}!=\"2341\"'\n",
    )
    .await;
    let names: Vec<_> = devices
        .iter()
        .map(|d| d.properties["UDEV_DEVNODE"].as_str())
        .collect();
    assert_eq!(names, ["/dev/ttyUSB0", "/dev/ttyUSB1"]);

    // Several rules: any may match; DRIVERS and KERNELS walk the parents.
    let devices = first(
        "udevRules:\n- 'KERNEL==\"ttyACM[0-9]+\", KERNELS==\"1-3\\.1\"'\n- 'SUBSYSTEM==\"hidraw\", DRIVERS==\"usbhid\", ATTRS{idProduct}==\"c31c\"'\n",
    )
    .await;
    let names: Vec<_> = devices
        .iter()
        .map(|d| d.properties["UDEV_DEVNODE"].as_str())
        .collect();
    assert_eq!(names, ["/dev/ttyACM0", "/dev/hidraw0"]);
}

#[tokio::test]
async fn devices_without_a_node_use_their_nearest_ancestors() {
    if !common::in_testbed("devices_without_a_node_use_their_nearest_ancestors", ALL) {
        return;
    }
    let devices = first(
        "udevRules:\n- 'SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_interface\", DRIVER==\"uvcvideo\"'\n",
    )
    .await;
    assert_eq!(
        ids(&devices),
        [format!("{WEBCAM}/1-1:1.0"), format!("{WEBCAM}/1-1:1.1")]
    );
    for d in &devices {
        assert_eq!(d.properties["UDEV_DEVNODE"], "/dev/bus/usb/001/003");
        assert_eq!(nodes(d), [("/dev/bus/usb/001/003", "rwm")]);
    }
    // TAGS walks parents; TAG only the device.
    let devices = first("udevRules:\n- 'TAG==\"uaccess\"'\n").await;
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].properties["UDEV_DEVNODE"], "/dev/video0");
}

#[tokio::test]
async fn group_recursive_makes_one_device_of_the_webcam() {
    if !common::in_testbed("group_recursive_makes_one_device_of_the_webcam", ALL) {
        return;
    }
    let rule = "udevRules:\n- 'ATTRS{idVendor}==\"046d\", ATTRS{idProduct}==\"0825\"'\n";
    let apart = first(rule).await;
    assert_eq!(apart.len(), 4, "{:?}", ids(&apart));
    let grouped = first(&format!("{rule}groupRecursive: true\npermissions: r\n")).await;
    assert_eq!(ids(&grouped), [WEBCAM]);
    let d = &grouped[0];
    assert_eq!(
        nodes(d),
        [("/dev/bus/usb/001/003", "r"), ("/dev/video0", "r")]
    );
    assert_eq!(d.properties["UDEV_DEVPATH"], WEBCAM);
    assert_eq!(d.properties["UDEV_DEVNODE"], "/dev/bus/usb/001/003");
    assert_eq!(d.properties["UDEV_DEVPATH_0"], WEBCAM);
    assert_eq!(d.properties["UDEV_DEVPATH_1"], format!("{WEBCAM}/1-1:1.0"));
    assert_eq!(
        d.properties["UDEV_DEVPATH_2"],
        format!("{WEBCAM}/1-1:1.0/video4linux/video0")
    );
    assert_eq!(d.properties["UDEV_DEVNODE_2"], "/dev/video0");
    assert_eq!(d.properties["UDEV_DEVPATH_3"], format!("{WEBCAM}/1-1:1.1"));
    // The hub and its two devices: each device is its own top when only devices match.
    let hub = first(
        "udevRules:\n- 'SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\", KERNELS==\"1-3\"'\ngroupRecursive: true\n",
    )
    .await;
    assert_eq!(hub.len(), 1, "the hub groups the devices behind it");
    assert_eq!(hub[0].device_specs.len(), 3);
}

#[tokio::test]
async fn refusals_name_the_field_key_or_operator() {
    let cases = [
        (
            "udevRules:\n- 'KERNEL==\"video0\", NAME==\"cam\"'\n",
            "\"NAME\"",
        ),
        ("udevRules:\n- 'KERNEL=\"video0\"'\n", "\"=\""),
        (
            "udevRules:\n- 'SUBSYSTEM==\"tty\", SYMLINK+=\"x\"'\n",
            "SYMLINK",
        ),
        ("udevRules:\n- 'ATTRS{idVendor}:=\"0403\"'\n", "\":=\""),
        (
            "udevRules:\n- 'KERNEL==\"(\"'\n",
            "not a valid regular expression",
        ),
        (
            "udevRules:\n- 'KERNEL==\"x\"'\npermissions: rx\n",
            "permissions",
        ),
        (
            "udevRules:\n- 'KERNEL==\"x\"'\ngroupRecursiv: true\n",
            "groupRecursiv",
        ),
        ("groupRecursive: true\n", "udevRules"),
    ];
    for (details, named) in cases {
        match start(details).await {
            Err(DiscoveryError::InvalidSettings(m)) => {
                assert!(m.contains(named), "{details:?}: {m:?} should name {named}")
            }
            Err(e) => panic!("{details:?}: wrong error {e}"),
            Ok(_) => panic!("{details:?} was accepted"),
        }
    }
}

/// The probe's control file (present or not) decides, whatever the machine has in
/// /run/udev. Under umockdev-run so that a monitor can open whether or not this
/// machine has udevd (the testbed provides it).
#[tokio::test]
async fn the_resync_only_condition_follows_the_control_file() {
    if !common::in_testbed("the_resync_only_condition_follows_the_control_file", ALL) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control");
    std::fs::write(&control, b"").expect("control file");
    let details = "udevRules:\n- 'KERNEL==\"video[0-9]*\"'\nresyncIntervalSeconds: 7\n";

    // Monitor available: devices and no condition.
    let probe = HotplugProbe::ControlPath(control.clone());
    assert_eq!(probe.source(), HotplugSource::Monitor);
    let mut stream = start_with(Udev::with_hotplug_probe(probe), details)
        .await
        .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert_eq!(update.devices.len(), 1);
    assert!(update.diagnostics.is_empty(), "{:?}", update.diagnostics);
    drop(stream);

    // Monitor unavailable: the same devices, and the condition says only the resync
    // runs, naming the file it looked for and the interval.
    let missing = dir.path().join("no-such-dir/control");
    let probe = HotplugProbe::ControlPath(missing.clone());
    assert_eq!(probe.source(), HotplugSource::ResyncOnly);
    let mut stream = start_with(Udev::with_hotplug_probe(probe), details)
        .await
        .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert_eq!(update.devices.len(), 1);
    assert_eq!(update.diagnostics.len(), 1, "{:?}", update.diagnostics);
    let d = &update.diagnostics[0];
    assert_eq!(d.subject, "hotplug");
    assert_eq!(d.severity, "Warning");
    assert!(
        d.message.contains(&missing.display().to_string()),
        "{}",
        d.message
    );
    assert!(d.message.contains("/run/udev"), "{}", d.message);
    assert!(d.message.contains("resync every 7 s"), "{}", d.message);

    // The host probe inside a testbed counts the testbed's uevents.
    assert_eq!(HotplugProbe::Host.source(), HotplugSource::Monitor);
}

async fn until(stream: &mut DeviceStream, want: usize) -> (Vec<Device>, Duration) {
    let started = Instant::now();
    loop {
        let update = next(stream, Duration::from_secs(5)).await;
        if update.devices.len() == want {
            return (update.devices, started.elapsed());
        }
    }
}

#[test]
fn hotplug_through_a_testbed() {
    if std::env::var_os(common::CHILD_ENV).is_some() {
        hotplug_child();
        return;
    }
    let Some(driver) = common::Driver::start() else {
        return;
    };
    driver.run("hotplug_through_a_testbed");
}

#[tokio::main(flavor = "current_thread")]
async fn hotplug_child() {
    // An hour-long resync: only uevents can make these changes visible in time.
    let mut stream = start(
        "udevRules:\n- 'SUBSYSTEM==\"tty\", ATTRS{idVendor}==\"0403\"'\n- 'KERNEL==\"video[0-9]*\"'\nresyncIntervalSeconds: 3600\n",
    )
    .await
    .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert!(update.devices.is_empty(), "{:?}", ids(&update.devices));
    assert!(update.diagnostics.is_empty(), "{:?}", update.diagnostics);

    common::testbed_command(&format!(
        "add {}",
        common::testbed("serial.umockdev").display()
    ));
    let (devices, took) = until(&mut stream, 1).await;
    assert_eq!(devices[0].properties["UDEV_DEVNODE"], "/dev/ttyUSB0");
    println!("serial adapter added → listed in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    common::testbed_command(&format!(
        "add {}",
        common::testbed("webcam.umockdev").display()
    ));
    let (devices, took) = until(&mut stream, 2).await;
    println!("webcam added → listed in {took:?}");
    assert!(
        devices
            .iter()
            .any(|d| d.properties["UDEV_DEVNODE"] == "/dev/video0")
    );

    common::testbed_command(&format!("remove {SERIAL}"));
    let (devices, took) = until(&mut stream, 1).await;
    println!("serial adapter removed → gone in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(devices[0].properties["UDEV_DEVNODE"], "/dev/video0");
}

#[test]
fn the_resync_alone_finds_added_and_removed_devices() {
    if std::env::var_os(common::CHILD_ENV).is_some() {
        resync_child();
        return;
    }
    let Some(driver) = common::Driver::start() else {
        return;
    };
    driver.run("the_resync_alone_finds_added_and_removed_devices");
}

/// Resync interval of the test: short, so it runs in seconds.
const RESYNC: Duration = Duration::from_secs(1);
/// Slack for one scan and the thread's wake-up on a loaded machine.
const MARGIN: Duration = Duration::from_millis(1500);

#[tokio::main(flavor = "current_thread")]
async fn resync_child() {
    // The testbed sends uevents, but the probe finds no control file, so no monitor
    // is opened: each change below can only come from the resync.
    let missing = std::env::temp_dir().join("verge-udev-test-no-udev/control");
    let mut stream = start_with(
        Udev::with_hotplug_probe(HotplugProbe::ControlPath(missing)),
        &format!(
            "udevRules:\n- 'SUBSYSTEM==\"tty\", ATTRS{{idVendor}}==\"0403\"'\nresyncIntervalSeconds: {}\n",
            RESYNC.as_secs()
        ),
    )
    .await
    .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert!(update.devices.is_empty(), "{:?}", ids(&update.devices));
    assert_eq!(update.diagnostics.len(), 1, "{:?}", update.diagnostics);
    assert_eq!(update.diagnostics[0].subject, "hotplug");

    common::testbed_command(&format!(
        "add {}",
        common::testbed("serial.umockdev").display()
    ));
    let (devices, took) = until(&mut stream, 1).await;
    println!("udev, resync only: serial adapter added → listed in {took:?}");
    assert!(took < RESYNC + MARGIN, "{took:?}");
    assert_eq!(devices[0].properties["UDEV_DEVNODE"], "/dev/ttyUSB0");

    common::testbed_command(&format!("remove {SERIAL}"));
    let (_, took) = until(&mut stream, 0).await;
    println!("udev, resync only: serial adapter removed → gone in {took:?}");
    assert!(took < RESYNC + MARGIN, "{took:?}");
}
