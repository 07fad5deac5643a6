//! The udev handler against umockdev testbeds (`tests/peers/usb/*.umockdev`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
};
use verge_udev::Udev;

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
    Udev::new()
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

#[tokio::test]
async fn without_run_udev_only_the_resync_runs_and_it_says_so() {
    if std::env::var_os(common::CHILD_ENV).is_some() {
        return;
    }
    let mut stream = start("udevRules:\n- 'KERNEL==\"verge-no-such-device\"'\n")
        .await
        .expect("valid");
    let update = next(&mut stream, FIRST_UPDATE).await;
    assert!(update.devices.is_empty());
    let expect = verge_udev::hotplug_source() == verge_udev::HotplugSource::ResyncOnly;
    assert_eq!(
        !update.diagnostics.is_empty(),
        expect,
        "{:?}",
        update.diagnostics
    );
    if expect {
        let d = &update.diagnostics[0];
        assert_eq!(d.subject, "hotplug");
        assert_eq!(d.severity, "Warning");
        assert!(d.message.contains("/run/udev"), "{}", d.message);
    }
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
