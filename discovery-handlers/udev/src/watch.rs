//! Scanning with libudev and following hotplug through a udev monitor.
//!
//! libudev objects are not `Send`, so each Discover request gets one thread that
//! owns its enumerator and monitor and hands complete device lists to the async
//! side through a channel. Dropping the stream closes the channel and the thread
//! ends within [`POLL_SLICE`].

use std::ffi::{CString, OsStr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{Device, DeviceStream, DiscoveryError, DiscoveryUpdate, severity};

use crate::rules::{DeviceView, MAX_PARENT_DEPTH};
use crate::{Compiled, Found, build_devices};

/// The file libudev checks to decide whether udevd runs; without it a udev
/// monitor receives nothing (sd-device disables it), so only the resync finds changes.
pub const UDEV_CONTROL_PATH: &str = "/run/udev/control";
/// Set by umockdev for a program running in a testbed.
pub const UMOCKDEV_DIR_ENV: &str = "UMOCKDEV_DIR";
/// How often the thread looks whether its stream was dropped.
pub const POLL_SLICE: Duration = Duration::from_millis(200);
/// How long events are collected after the first one before rescanning: a plug
/// is a burst of uevents (device, interfaces, tty/video children).
pub const EVENT_SETTLE: Duration = Duration::from_millis(50);
/// Most events drained before rescanning anyway, so a storm cannot starve scans.
const MAX_BURST: usize = 10_000;
/// Updates buffered towards the agent.
const CHANNEL_DEPTH: usize = 4;
/// Diagnostic subject of the hotplug condition.
pub const HOTPLUG_SUBJECT: &str = "hotplug";

/// How changes are noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugSource {
    /// udev monitor events, plus the resync.
    Monitor,
    /// Only the periodic resync.
    ResyncOnly,
}

/// How the watch decides whether udev events can reach it.
///
/// Injectable because the answer otherwise depends on the machine (whether it has
/// `/run/udev`), and tests must force both modes; the default is what production uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HotplugProbe {
    /// libudev's own test on [`UDEV_CONTROL_PATH`]; a umockdev testbed also counts,
    /// since it delivers its uevents without udevd.
    #[default]
    Host,
    /// The same test on this path instead, with no testbed exception: with a missing
    /// path the watch runs on the resync alone even inside a testbed.
    ControlPath(PathBuf),
}

impl HotplugProbe {
    /// The file whose presence means udev events arrive.
    pub fn control_path(&self) -> &Path {
        match self {
            HotplugProbe::Host => Path::new(UDEV_CONTROL_PATH),
            HotplugProbe::ControlPath(p) => p,
        }
    }

    /// Whether udev events can reach us: the same test libudev makes (`access(2)`,
    /// so umockdev's preload answers it as libudev would see it).
    pub fn source(&self) -> HotplugSource {
        // A path with a NUL byte cannot exist.
        let present = match CString::new(self.control_path().as_os_str().as_bytes()) {
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            Ok(path) => (unsafe { libc::access(path.as_ptr(), libc::F_OK) }) == 0,
            Err(_) => false,
        };
        let testbed = *self == HotplugProbe::Host && std::env::var_os(UMOCKDEV_DIR_ENV).is_some();
        if present || testbed {
            HotplugSource::Monitor
        } else {
            HotplugSource::ResyncOnly
        }
    }
}

/// Whether udev events can reach us on this host ([`HotplugProbe::Host`]).
pub fn hotplug_source() -> HotplugSource {
    HotplugProbe::Host.source()
}

fn text(s: Option<&OsStr>) -> Option<String> {
    s.map(|s| s.to_string_lossy().into_owned())
}

/// A libudev device as seen by the rules.
pub struct UdevDevice(pub udev::Device);

impl DeviceView for UdevDevice {
    fn sysname(&self) -> Option<String> {
        text(Some(self.0.sysname()))
    }
    fn devpath(&self) -> Option<String> {
        text(Some(self.0.devpath()))
    }
    fn subsystem(&self) -> Option<String> {
        text(self.0.subsystem())
    }
    fn driver(&self) -> Option<String> {
        // The uevent's DRIVER first: libudev's driver() reads the `driver` symlink and,
        // when it is missing (umockdev testbeds, some sysfs snapshots), also drops the
        // DRIVER property it had read from the uevent.
        text(self.0.property_value("DRIVER")).or_else(|| text(self.0.driver()))
    }
    fn attribute(&self, name: &str) -> Option<String> {
        // sysfs attributes end with a newline that is not part of the value.
        text(self.0.attribute_value(name)).map(|v| v.trim_end_matches('\n').to_string())
    }
    fn property(&self, name: &str) -> Option<String> {
        text(self.0.property_value(name))
    }
    fn tags(&self) -> Vec<String> {
        text(self.0.property_value("TAGS"))
            .map(|t| {
                t.split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn parent(&self) -> Option<Self> {
        self.0.parent().map(UdevDevice)
    }
}

/// The device node of `device` or of its nearest ancestor that has one.
pub fn nearest_devnode(device: &udev::Device) -> Option<String> {
    if let Some(n) = device.devnode() {
        return Some(n.to_string_lossy().into_owned());
    }
    let mut parent = device.parent();
    for _ in 0..MAX_PARENT_DEPTH {
        let p = parent?;
        if let Some(n) = p.devnode() {
            return Some(n.to_string_lossy().into_owned());
        }
        parent = p.parent();
    }
    None
}

/// One full scan: every device any rule matches.
pub fn scan(settings: &Compiled) -> std::io::Result<Vec<Device>> {
    let mut enumerator = udev::Enumerator::new()?;
    let mut found = Vec::new();
    for device in enumerator.scan_devices()? {
        let view = UdevDevice(device);
        if settings.rules.iter().any(|r| r.matches(&view)) {
            found.push(Found {
                devpath: view.0.devpath().to_string_lossy().into_owned(),
                devnode: nearest_devnode(&view.0),
            });
        }
    }
    Ok(build_devices(
        found,
        settings.group_recursive,
        &settings.permissions,
    ))
}

/// Starts discovery for compiled settings.
pub fn start(settings: Compiled, probe: HotplugProbe) -> Result<DeviceStream, DiscoveryError> {
    let resync = settings.resync_interval;
    Ok(spawn_watch("udev", resync, probe, move || {
        scan(&settings)
            .map(DiscoveryUpdate::devices)
            .map_err(|e| format!("udev enumeration failed: {e}"))
    }))
}

/// Waits until `fd` is readable or `timeout` passes.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Runs `scan` now, after every burst of udev events and every `resync`, and
/// streams each result whose devices or diagnostics differ from the last one's.
/// `scan` may add diagnostics of its own (the usb handler's skipped devices); the
/// hotplug one is added here. `probe` decides whether a udev monitor is opened.
/// Shared with the usb handler.
pub fn spawn_watch<F>(
    name: &'static str,
    resync: Duration,
    probe: HotplugProbe,
    mut scan: F,
) -> DeviceStream
where
    F: FnMut() -> Result<DiscoveryUpdate, String> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_DEPTH);
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-watch"))
        .spawn(move || {
            let monitor = match probe.source() {
                HotplugSource::Monitor => match udev::MonitorBuilder::new().and_then(|b| b.listen())
                {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "{name}: cannot open a udev monitor; resync only");
                        None
                    }
                },
                HotplugSource::ResyncOnly => None,
            };
            let diagnostic = monitor.is_none().then(|| {
                format!(
                    "no udev events ({} is missing: mount the host's /run/udev read-only and use the host network); plugs and unplugs are found by the resync every {} s",
                    probe.control_path().display(),
                    resync.as_secs()
                )
            });
            if let Some(d) = &diagnostic {
                tracing::warn!("{name}: {d}");
            }
            let mut last: Option<DiscoveryUpdate> = None;
            let mut next_resync = Instant::now();
            let mut dirty = true;
            loop {
                if tx.is_closed() {
                    return;
                }
                if dirty || Instant::now() >= next_resync {
                    dirty = false;
                    next_resync = Instant::now() + resync;
                    match scan() {
                        Ok(mut update) => {
                            update.devices.sort_by(|a, b| a.id.cmp(&b.id));
                            if let Some(d) = &diagnostic {
                                update = update.with_diagnostic(
                                    HOTPLUG_SUBJECT,
                                    severity::WARNING,
                                    d.clone(),
                                );
                            }
                            if last.as_ref() != Some(&update) {
                                tracing::debug!(count = update.devices.len(), "{name}: device list changed");
                                if tx.blocking_send(Ok(update.clone())).is_err() {
                                    return;
                                }
                                last = Some(update);
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(DiscoveryError::Unavailable(e)));
                            return;
                        }
                    }
                }
                let wait = next_resync
                    .saturating_duration_since(Instant::now())
                    .min(POLL_SLICE);
                match &monitor {
                    Some(m) => {
                        if readable(m.as_raw_fd(), wait) {
                            // Drain the burst until it has been quiet for EVENT_SETTLE.
                            let mut events = m.iter().count();
                            while events < MAX_BURST && readable(m.as_raw_fd(), EVENT_SETTLE) {
                                events += m.iter().count();
                            }
                            tracing::debug!(events, "{name}: udev events");
                            dirty = true;
                        }
                    }
                    None => std::thread::sleep(wait),
                }
            }
        });
    if let Err(e) = spawned {
        let (etx, erx) = tokio::sync::mpsc::channel(1);
        let _ = etx.try_send(Err(DiscoveryError::Internal(format!(
            "cannot start the {name} watch thread: {e}"
        ))));
        return Box::pin(ReceiverStream::new(erx));
    }
    Box::pin(ReceiverStream::new(rx))
}
