//! Akri's `udev` discovery handler, drop-in compatible.
//!
//! Settings (discoveryDetails), as Akri users write them:
//! ```yaml
//! udevRules:                  # required; a device is found when any rule matches
//! - 'KERNEL=="video[0-9]*"'
//! - 'SUBSYSTEM=="tty", ATTRS{idVendor}=="0403"'
//! groupRecursive: false       # parent and child devices that both match form one device
//! permissions: rwm            # of the device specs; any of r, w, m (default rwm)
//! resyncIntervalSeconds: 30   # Verge extension: full rescan interval besides hotplug events
//! ```
//! A device's id is its devpath (for a group, the topmost member's). Properties:
//! `UDEV_DEVPATH`, `UDEV_DEVNODE` (and `_0`, `_1`, … per member of a group). Every
//! member's device node is a device spec; a device without one uses its nearest
//! ancestor's. Devices are not shared.

pub mod rules;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use verge_discovery_sdk::{
    Device, DeviceSpec, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    parse_details,
};

pub use rules::{DeviceView, Rule, RuleError, parse_rule};
pub use watch::{HotplugProbe, HotplugSource, UDEV_CONTROL_PATH, hotplug_source, spawn_watch};

/// Name Configurations use (Akri's).
pub const HANDLER_NAME: &str = "udev";
/// Property: the device's devpath.
pub const DEVPATH_PROPERTY: &str = "UDEV_DEVPATH";
/// Property: the device node handed to brokers.
pub const DEVNODE_PROPERTY: &str = "UDEV_DEVNODE";
/// Default device-spec permissions (Akri's).
pub const DEFAULT_PERMISSIONS: &str = "rwm";
/// Default interval of the full rescan that backs up hotplug events.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Most rules in one Configuration.
pub const MAX_RULES: usize = 256;

/// discoveryDetails of the udev handler.
#[derive(Deserialize, Debug, Default, PartialEq, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UdevSettings {
    /// Rules; a device is found when any of them matches.
    #[serde(default)]
    pub udev_rules: Vec<String>,
    /// Group matching parent/child devices into one device.
    #[serde(default)]
    pub group_recursive: bool,
    /// Permissions of the device specs (`r`, `w`, `m` combinations).
    #[serde(default)]
    pub permissions: Option<String>,
    /// Full rescan interval in seconds (Verge extension).
    #[serde(default)]
    pub resync_interval_seconds: Option<u64>,
}

/// Settings checked and compiled.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The rules.
    pub rules: Vec<Rule>,
    /// groupRecursive.
    pub group_recursive: bool,
    /// Device-spec permissions.
    pub permissions: String,
    /// Rescan interval.
    pub resync_interval: Duration,
}

/// Checks `permissions`: a non-empty combination of r, w and m, each once.
pub fn check_permissions(p: &str) -> Result<(), DiscoveryError> {
    let mut seen = BTreeSet::new();
    let ok = !p.is_empty()
        && p.chars()
            .all(|c| matches!(c, 'r' | 'w' | 'm') && seen.insert(c));
    if ok {
        Ok(())
    } else {
        Err(DiscoveryError::InvalidSettings(format!(
            "permissions {p:?} must combine r, w and m, each at most once (e.g. rw, rwm)"
        )))
    }
}

/// Parses and checks discoveryDetails.
pub fn compile_settings(details: &str) -> Result<Compiled, DiscoveryError> {
    let s: UdevSettings = parse_details(details)?;
    if s.udev_rules.is_empty() {
        return Err(DiscoveryError::InvalidSettings(
            "udevRules must list at least one rule, e.g. 'KERNEL==\"video[0-9]*\"'".into(),
        ));
    }
    if s.udev_rules.len() > MAX_RULES {
        return Err(DiscoveryError::InvalidSettings(format!(
            "udevRules has more than {MAX_RULES} rules"
        )));
    }
    let rules = s
        .udev_rules
        .iter()
        .enumerate()
        .map(|(i, text)| {
            parse_rule(text).map_err(|e| {
                DiscoveryError::InvalidSettings(format!("udevRules[{i}] {text:?}: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let permissions = s
        .permissions
        .unwrap_or_else(|| DEFAULT_PERMISSIONS.to_string());
    check_permissions(&permissions)?;
    let resync_interval = match s.resync_interval_seconds {
        None => DEFAULT_RESYNC_INTERVAL,
        Some(0) => {
            return Err(DiscoveryError::InvalidSettings(
                "resyncIntervalSeconds must be at least 1".into(),
            ));
        }
        Some(n) => Duration::from_secs(n.min(24 * 3600)),
    };
    Ok(Compiled {
        rules,
        group_recursive: s.group_recursive,
        permissions,
        resync_interval,
    })
}

/// A device that matched: its devpath and the node brokers get (its own or its
/// nearest ancestor's).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// devpath.
    pub devpath: String,
    /// Device node, if the device or an ancestor has one.
    pub devnode: Option<String>,
}

/// Whether `child` lies below `parent` in the device tree.
fn is_below(child: &str, parent: &str) -> bool {
    child.len() > parent.len()
        && child.starts_with(parent)
        && child.as_bytes().get(parent.len()) == Some(&b'/')
}

/// Turns matched devices into `v0` devices, grouping parent/child matches when asked.
pub fn build_devices(mut found: Vec<Found>, group: bool, permissions: &str) -> Vec<Device> {
    found.sort();
    found.dedup();
    let mut groups: Vec<Vec<Found>> = Vec::new();
    for f in found {
        // Sorted by devpath, so a parent always comes before its children.
        let top = groups.iter_mut().find(|g| {
            group
                && g.first()
                    .is_some_and(|top| is_below(&f.devpath, &top.devpath))
        });
        match top {
            Some(g) => g.push(f),
            None => groups.push(vec![f]),
        }
    }
    groups
        .into_iter()
        .filter_map(|members| {
            let top = members.first()?.clone();
            let mut properties = BTreeMap::new();
            properties.insert(DEVPATH_PROPERTY.to_string(), top.devpath.clone());
            if let Some(n) = &top.devnode {
                properties.insert(DEVNODE_PROPERTY.to_string(), n.clone());
            }
            let mut nodes = BTreeSet::new();
            let mut device_specs = Vec::new();
            let grouped = group && members.len() > 1;
            for (i, m) in members.iter().enumerate() {
                if grouped {
                    properties.insert(format!("{DEVPATH_PROPERTY}_{i}"), m.devpath.clone());
                    if let Some(n) = &m.devnode {
                        properties.insert(format!("{DEVNODE_PROPERTY}_{i}"), n.clone());
                    }
                }
                if let Some(n) = &m.devnode
                    && nodes.insert(n.clone())
                {
                    device_specs.push(DeviceSpec {
                        container_path: n.clone(),
                        host_path: n.clone(),
                        permissions: permissions.to_string(),
                    });
                }
            }
            Some(Device {
                id: top.devpath,
                properties: properties.into_iter().collect(),
                mounts: Vec::new(),
                device_specs,
            })
        })
        .collect()
}

/// The udev handler.
#[derive(Clone, Debug, Default)]
pub struct Udev {
    probe: HotplugProbe,
}

impl Udev {
    /// The handler, deciding on hotplug as the host allows ([`HotplugProbe::Host`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The handler with another hotplug decision (tests force resync-only or monitor).
    pub fn with_hotplug_probe(probe: HotplugProbe) -> Self {
        Self { probe }
    }
}

impl DiscoveryHandler for Udev {
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
        let result = compile_settings(&request.details).and_then(|s| watch::start(s, probe));
        async move { result }.boxed()
    }
}
