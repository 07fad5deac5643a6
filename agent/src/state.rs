//! The agent's view of this node: Configurations, their devices, and who holds
//! each capacity slot. Every decision is made here, synchronously, under one
//! lock; effects leave through channels (plugin device lists, Instance writes),
//! so nothing here ever waits on the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use verge_crds::instance::SlotUsage;
use verge_crds::naming;
use verge_device_plugin_proto::v0::Device;
use verge_device_plugin_proto::v1beta1;

use crate::instances::{DesiredInstance, InstanceKey, WriterMsg};

/// `(namespace, name)` of a Configuration.
pub type ConfigKey = (String, String);

/// What the state needs from a Configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigView {
    /// Object uid, for the Instances' ownerReference.
    pub uid: String,
    /// `.metadata.generation`.
    pub generation: i64,
    /// Slots per device.
    pub capacity: usize,
    /// Extra broker env, merged into every Instance's brokerProperties.
    pub broker_properties: BTreeMap<String, String>,
    /// How long a missing device keeps its Instance.
    pub grace: Duration,
    /// Handler name.
    pub handler: String,
    /// Creation time (RFC 3339), which decides name conflicts across namespaces.
    pub created: String,
}

/// A slot this node holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    /// Through which resource.
    pub usage: SlotUsage,
    /// When it was claimed (reclaim waits for kubelet to list it).
    pub since: Instant,
}

/// An Instance as the API server last showed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedInstance {
    /// Device id from the `akri.sh/device-id` annotation.
    pub device_id: Option<String>,
    /// spec.nodes.
    pub nodes: Vec<String>,
    /// spec.deviceUsage.
    pub usage: BTreeMap<String, String>,
    /// spec.brokerProperties.
    pub broker_properties: BTreeMap<String, String>,
    /// spec.capacity.
    pub capacity: i32,
    /// spec.shared.
    pub shared: bool,
}

/// One device of a Configuration on this node.
#[derive(Debug)]
pub struct DeviceEntry {
    /// Handler's device id.
    pub id: String,
    /// Instance hash (6 hex).
    pub hash: String,
    /// The device as last reported; `None` for an Instance adopted at start
    /// whose device the handler has not reported yet.
    pub device: Option<Device>,
    /// Set while the device is missing from the handler's list.
    pub missing_since: Option<Instant>,
    /// When the device was first seen (for the latency metric).
    pub first_seen: Instant,
    /// Slots this node holds.
    pub mine: BTreeMap<usize, Holding>,
    /// Last server copy.
    pub observed: Option<ObservedInstance>,
    /// Whether the Instance write for the current state is already queued or done.
    pub written: bool,
}

impl DeviceEntry {
    fn present(&self) -> bool {
        self.device.is_some() && self.missing_since.is_none()
    }
}

/// Per-Configuration state.
#[derive(Debug, Default)]
pub struct ConfigEntry {
    /// `None` until the Configuration itself has been seen (adopted Instances come first).
    pub view: Option<ConfigView>,
    /// Whether the handler declared its devices shared.
    pub shared: bool,
    /// Instance name → device.
    pub devices: BTreeMap<String, DeviceEntry>,
    /// Problems to report in this node's status entry (name collisions etc.).
    pub conflicts: BTreeSet<String>,
    /// Whether this Configuration lost a name conflict and is not served.
    pub blocked: Option<String>,
}

/// What happened to an allocation request.
#[derive(Debug, PartialEq)]
pub enum ClaimOutcome {
    /// Granted. `wait_for_api` holds the Instance keys whose claim must be
    /// recorded before answering (shared devices); `twins` are (resource,
    /// device id) pairs kubelet must stop seeing as healthy.
    Granted {
        /// Instances whose claim must reach the API server first.
        wait_for_api: Vec<InstanceKey>,
        /// The same slots through the other resource.
        twins: Vec<(String, String)>,
        /// One entry per requested device.
        devices: Vec<AllocatedDevice>,
    },
    /// Refused, with the reason kubelet will report.
    Refused(String),
}

/// A device handed to a container.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocatedDevice {
    /// Instance hash, for the `_<HASH>` env suffix.
    pub hash: String,
    /// Device properties merged with Configuration brokerProperties.
    pub properties: BTreeMap<String, String>,
    /// Handler's device (mounts and device specs).
    pub device: Device,
}

/// Commands to the device-plugin manager.
#[derive(Debug)]
pub enum PluginCommand {
    /// Serve `resource` with devices from the receiver.
    Ensure {
        /// Kubelet resource name.
        resource: String,
        /// Device list to serve.
        devices: watch::Receiver<Vec<v1beta1::Device>>,
    },
    /// Stop serving `resource` (after telling kubelet it has no devices).
    Remove {
        /// Kubelet resource name.
        resource: String,
    },
}

/// Sinks for effects.
pub struct Effects {
    /// To the plugin manager.
    pub plugins: mpsc::UnboundedSender<PluginCommand>,
    /// To the Instance writer.
    pub writes: mpsc::UnboundedSender<WriterMsg>,
    /// Pokes the status writer: this Configuration's node entry changed.
    pub status: mpsc::UnboundedSender<ConfigKey>,
    /// Wakes the grace timer when a device starts missing.
    pub grace: Arc<tokio::sync::Notify>,
}

/// Which resource a kubelet device id belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ResourceKind {
    Instance { config: ConfigKey, instance: String },
    Configuration { config: ConfigKey },
}

/// The node's state.
pub struct AgentState {
    node: String,
    configs: BTreeMap<ConfigKey, ConfigEntry>,
    /// resource name → its kind, to route Allocate and to detect collisions.
    resources: HashMap<String, ResourceKind>,
    /// Published device lists, one per resource.
    publishers: HashMap<String, watch::Sender<Vec<v1beta1::Device>>>,
    effects: Effects,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Why a Configuration cannot be served under its name on this node.
fn conflict_message(other: &ConfigKey) -> String {
    format!(
        "another Configuration named {:?} exists in namespace {:?}; kubelet resource names are per node, so only the older one is served",
        other.1, other.0
    )
}

impl AgentState {
    /// An empty state for `node`.
    pub fn new(
        node: impl Into<String>,
        effects: Effects,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        Self {
            node: node.into(),
            configs: BTreeMap::new(),
            resources: HashMap::new(),
            publishers: HashMap::new(),
            effects,
            metrics,
        }
    }

    /// A Configuration was added or changed. Returns `Err(message)` when it
    /// loses a name conflict and must not be served.
    pub fn upsert_config(&mut self, key: &ConfigKey, view: ConfigView) -> Result<(), String> {
        // Kubelet resource names are per node: two namespaces with one
        // Configuration name would share `akri.sh/<name>`. The older one wins.
        let rival = self
            .configs
            .iter()
            .filter(|(k, e)| {
                k.1 == key.1 && k.0 != key.0 && e.view.is_some() && e.blocked.is_none()
            })
            .find(|(k, e)| {
                let v = e.view.as_ref().map(|v| (&v.created, &k.0));
                v < Some((&view.created, &key.0))
            })
            .map(|(k, _)| k.clone());
        let entry = self.configs.entry(key.clone()).or_default();
        let capacity_changed = entry.view.as_ref().map(|v| v.capacity) != Some(view.capacity);
        let props_changed =
            entry.view.as_ref().map(|v| &v.broker_properties) != Some(&view.broker_properties);
        entry.view = Some(view);
        if let Some(rival) = rival {
            let message = conflict_message(&rival);
            entry.blocked = Some(message.clone());
            let _ = self.effects.status.send(key.clone());
            return Err(message);
        }
        entry.blocked = None;
        if capacity_changed || props_changed {
            for d in entry.devices.values_mut() {
                d.written = false;
            }
        }
        self.ensure_config_resource(key);
        self.sync(key);
        Ok(())
    }

    /// A Configuration was deleted: withdraw everything it had on this node.
    /// Its Instances are removed by garbage collection (ownerReferences).
    pub fn remove_config(&mut self, key: &ConfigKey) {
        if let Some(entry) = self.configs.remove(key) {
            for name in entry.devices.keys() {
                self.remove_resource(&naming::instance_resource_name(name));
            }
            self.remove_resource(&naming::configuration_resource_name(&key.1));
            if let Some(m) = &self.metrics {
                m.instances.remove(&crate::metrics::ConfigurationLabel {
                    configuration: format!("{}/{}", key.0, key.1),
                });
            }
        }
    }

    /// The handler's complete current device list for a Configuration.
    pub fn update_devices(
        &mut self,
        key: &ConfigKey,
        shared: bool,
        devices: Vec<Device>,
        now: Instant,
    ) {
        let node = self.node.clone();
        let Some(entry) = self.configs.get_mut(key) else {
            return;
        };
        if entry.blocked.is_some() {
            return;
        }
        entry.shared = shared;
        let mut seen: BTreeMap<String, Device> = BTreeMap::new();
        let mut collisions = BTreeSet::new();
        for device in devices {
            let name = naming::instance_name(&key.1, &device.id, shared, &node);
            if let Some(first) = seen.get(&name) {
                if first.id != device.id {
                    collisions.insert(format!(
                        "devices {:?} and {:?} map to the same Instance name {name}; only {:?} is served",
                        first.id, device.id, first.id
                    ));
                }
                continue;
            }
            seen.insert(name, device);
        }
        entry.conflicts.retain(|c| !c.starts_with("devices "));
        entry.conflicts.extend(collisions);

        for (name, device) in &seen {
            let hash = naming::hash_of_instance(name)
                .unwrap_or_default()
                .to_string();
            let d = entry
                .devices
                .entry(name.clone())
                .or_insert_with(|| DeviceEntry {
                    id: device.id.clone(),
                    hash,
                    device: None,
                    missing_since: None,
                    first_seen: now,
                    mine: BTreeMap::new(),
                    observed: None,
                    written: false,
                });
            if d.id != device.id {
                continue;
            }
            if d.device.as_ref() != Some(device) || d.missing_since.is_some() {
                d.device = Some(device.clone());
                d.missing_since = None;
                d.written = false;
            }
        }
        let mut started_missing = false;
        for (name, d) in entry.devices.iter_mut() {
            if !seen.contains_key(name) && d.missing_since.is_none() {
                d.missing_since = Some(now);
                started_missing = true;
            }
        }
        self.sync(key);
        if started_missing {
            self.effects.grace.notify_one();
        }
    }

    /// The handler's stream ended (handler gone): its devices start their grace period.
    pub fn handler_lost(&mut self, key: &ConfigKey, now: Instant) {
        if let Some(entry) = self.configs.get_mut(key) {
            for d in entry.devices.values_mut() {
                if d.missing_since.is_none() {
                    d.missing_since = Some(now);
                }
            }
            self.sync(key);
            self.effects.grace.notify_one();
        }
    }

    /// Removes devices whose grace has run out. Returns the next deadline.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let keys: Vec<ConfigKey> = self.configs.keys().cloned().collect();
        for key in keys {
            let Some(entry) = self.configs.get_mut(&key) else {
                continue;
            };
            let grace = entry.view.as_ref().map(|v| v.grace);
            let Some(grace) = grace else { continue };
            let mut gone = Vec::new();
            for (name, d) in &entry.devices {
                if let Some(since) = d.missing_since {
                    let deadline = since + grace;
                    if deadline <= now {
                        gone.push(name.clone());
                    } else {
                        next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    }
                }
            }
            if gone.is_empty() {
                continue;
            }
            for name in &gone {
                entry.devices.remove(name);
                let _ = self.effects.writes.send(WriterMsg::Desired(
                    InstanceKey {
                        namespace: key.0.clone(),
                        name: name.clone(),
                    },
                    DesiredInstance::Leave,
                ));
            }
            for name in &gone {
                self.remove_resource(&naming::instance_resource_name(name));
            }
            self.sync(&key);
        }
        next
    }

    /// Earliest grace deadline, if any device is missing.
    #[cfg(test)]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.configs
            .values()
            .filter_map(|e| {
                let grace = e.view.as_ref()?.grace;
                e.devices
                    .values()
                    .filter_map(|d| d.missing_since.map(|s| s + grace))
                    .min()
            })
            .min()
    }

    /// An Instance as the API server shows it (from the watch).
    pub fn observe_instance(
        &mut self,
        namespace: &str,
        name: &str,
        config: &str,
        observed: ObservedInstance,
        now: Instant,
    ) {
        let key = (namespace.to_string(), config.to_string());
        let mine_on_server: BTreeMap<usize, SlotUsage> = observed
            .usage
            .iter()
            .filter_map(|(slot_id, value)| {
                let usage = SlotUsage::parse(value);
                (usage.node() == Some(self.node.as_str()))
                    .then(|| slot_index(name, slot_id).map(|n| (n, usage)))
                    .flatten()
            })
            .collect();
        let in_nodes = observed.nodes.iter().any(|n| n == &self.node);
        let entry = self.configs.entry(key.clone()).or_default();
        match entry.devices.get_mut(name) {
            Some(d) => {
                if let Some(id) = &observed.device_id
                    && id != &d.id
                {
                    entry.conflicts.insert(format!(
                        "Instance {name} already belongs to device {id:?}; device {:?} maps to the same name and is not served",
                        d.id
                    ));
                }
                // Lost our node entry or a slot behind our back (node-loss
                // cleanup during an outage, or a user edit): write again.
                if d.present() && (!in_nodes || mine_on_server.len() != d.mine.len()) {
                    d.written = false;
                }
                d.observed = Some(observed);
            }
            None if in_nodes => {
                // Adopted on start: keep the Instance (same UID, brokers
                // untouched) until the handler reports the device or the grace runs out.
                let Some(id) = observed.device_id.clone() else {
                    return;
                };
                let hash = naming::hash_of_instance(name)
                    .unwrap_or_default()
                    .to_string();
                let mine = mine_on_server
                    .into_iter()
                    .map(|(n, usage)| (n, Holding { usage, since: now }))
                    .collect();
                entry.devices.insert(
                    name.to_string(),
                    DeviceEntry {
                        id,
                        hash,
                        device: None,
                        missing_since: Some(now),
                        first_seen: now,
                        mine,
                        observed: Some(observed),
                        written: true,
                    },
                );
            }
            None => return,
        }
        if entry.view.is_some() {
            self.sync(&key);
        }
    }

    /// An Instance was deleted in the API server.
    pub fn observe_instance_deleted(&mut self, namespace: &str, name: &str, config: &str) {
        let key = (namespace.to_string(), config.to_string());
        if let Some(d) = self
            .configs
            .get_mut(&key)
            .and_then(|e| e.devices.get_mut(name))
        {
            d.observed = None;
            // Someone else deleted it (kubectl, the controller's Akri clean-up): the
            // writer's memory of the last write is stale.
            let _ = self.effects.writes.send(WriterMsg::Forget(InstanceKey {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }));
            if d.present() {
                // Still here: recreate it.
                d.written = false;
                self.sync(&key);
            }
        }
    }

    /// Resolves kubelet device ids of `resource` to slots and claims them.
    pub fn claim(&mut self, resource: &str, ids: &[String], now: Instant) -> ClaimOutcome {
        let Some(kind) = self.resources.get(resource).cloned() else {
            return ClaimOutcome::Refused(format!("{resource} is not served by this agent"));
        };
        let node = self.node.clone();
        let config = match &kind {
            ResourceKind::Instance { config, .. } | ResourceKind::Configuration { config } => {
                config.clone()
            }
        };
        let Some(entry) = self.configs.get_mut(&config) else {
            return ClaimOutcome::Refused(format!("Configuration of {resource} is gone"));
        };
        let extra = entry
            .view
            .as_ref()
            .map(|v| v.broker_properties.clone())
            .unwrap_or_default();
        let shared = entry.shared;

        // Validate every id first so a refusal claims nothing.
        let mut wanted: Vec<(String, usize, SlotUsage)> = Vec::new();
        for id in ids {
            let Some((instance, slot)) = split_slot_id(id) else {
                return ClaimOutcome::Refused(format!("device id {id:?} is not a slot id"));
            };
            if let ResourceKind::Instance { instance: own, .. } = &kind
                && own != instance
            {
                return ClaimOutcome::Refused(format!("device {id} does not belong to {resource}"));
            }
            let Some(d) = entry.devices.get(instance) else {
                return ClaimOutcome::Refused(format!("device {instance} is no longer present"));
            };
            if !d.present() {
                return ClaimOutcome::Refused(format!(
                    "device {instance} is not currently discovered"
                ));
            }
            let usage = match &kind {
                ResourceKind::Instance { .. } => SlotUsage::Instance { node: node.clone() },
                ResourceKind::Configuration { .. } => SlotUsage::Configuration {
                    vdev: id.clone(),
                    node: node.clone(),
                },
            };
            match d.mine.get(&slot) {
                Some(h) if h.usage == usage => {}
                Some(h) => {
                    return ClaimOutcome::Refused(format!(
                        "slot {id} is already in use on this node ({})",
                        h.usage
                    ));
                }
                None => {
                    if let Some(holder) = held_elsewhere(d, instance, slot, &node) {
                        return ClaimOutcome::Refused(format!("slot {id} is in use by {holder}"));
                    }
                }
            }
            wanted.push((instance.to_string(), slot, usage));
        }

        let mut devices = Vec::new();
        let mut wait = BTreeSet::new();
        let mut twins = Vec::new();
        for (instance, slot, usage) in wanted {
            let Some(d) = entry.devices.get_mut(&instance) else {
                continue;
            };
            let fresh = !d.mine.contains_key(&slot);
            d.mine.insert(
                slot,
                Holding {
                    usage: usage.clone(),
                    since: now,
                },
            );
            if fresh {
                d.written = false;
                if shared {
                    wait.insert(instance.clone());
                }
            }
            let twin_resource = match usage {
                SlotUsage::Instance { .. } => naming::configuration_resource_name(&config.1),
                _ => naming::instance_resource_name(&instance),
            };
            twins.push((twin_resource, naming::slot_id(&instance, slot)));
            if let Some(device) = &d.device {
                let mut properties = extra.clone();
                properties.extend(device.properties.clone());
                devices.push(AllocatedDevice {
                    hash: d.hash.clone(),
                    properties,
                    device: device.clone(),
                });
            }
        }
        self.sync(&config);
        ClaimOutcome::Granted {
            wait_for_api: wait
                .into_iter()
                .map(|name| InstanceKey {
                    namespace: config.0.clone(),
                    name,
                })
                .collect(),
            twins,
            devices,
        }
    }

    /// A claim could not be recorded (another node holds the slot): drop this
    /// node's claims on slots that the server shows held by someone else.
    pub fn claim_failed(&mut self, key: &InstanceKey, since: Instant) {
        let node = self.node.clone();
        for (ckey, entry) in self.configs.iter_mut() {
            if ckey.0 != key.namespace {
                continue;
            }
            if let Some(d) = entry.devices.get_mut(&key.name) {
                d.mine.retain(|_, h| h.since < since);
                let _ = &node;
                d.written = false;
                let ckey = ckey.clone();
                self.sync(&ckey);
                return;
            }
        }
    }

    /// Releases slots kubelet no longer lists. `in_use` holds (resource, device
    /// id) pairs from pod-resources. Returns how many slots were released.
    pub fn reclaim(
        &mut self,
        in_use: &BTreeSet<(String, String)>,
        now: Instant,
        allocation_grace: Duration,
    ) -> usize {
        let mut released = 0;
        let mut touched = Vec::new();
        for (key, entry) in self.configs.iter_mut() {
            let config_resource = naming::configuration_resource_name(&key.1);
            let mut changed = false;
            for (name, d) in entry.devices.iter_mut() {
                let instance_resource = naming::instance_resource_name(name);
                let before = d.mine.len();
                d.mine.retain(|slot, h| {
                    let id = naming::slot_id(name, *slot);
                    let listed = match &h.usage {
                        SlotUsage::Instance { .. } => {
                            in_use.contains(&(instance_resource.clone(), id))
                        }
                        SlotUsage::Configuration { vdev, .. } => {
                            in_use.contains(&(config_resource.clone(), vdev.clone()))
                        }
                        SlotUsage::Free => false,
                    };
                    listed || now.duration_since(h.since) < allocation_grace
                });
                if d.mine.len() != before {
                    released += before - d.mine.len();
                    d.written = false;
                    changed = true;
                }
                // Adopt allocations kubelet has that we forgot (e.g. after a restart
                // while the API server was unreachable).
                if d.present() {
                    let capacity = entry.view.as_ref().map(|v| v.capacity).unwrap_or(0);
                    for slot in 0..capacity {
                        if d.mine.contains_key(&slot) {
                            continue;
                        }
                        let id = naming::slot_id(name, slot);
                        let usage = if in_use.contains(&(instance_resource.clone(), id.clone())) {
                            Some(SlotUsage::Instance {
                                node: self.node.clone(),
                            })
                        } else if in_use.contains(&(config_resource.clone(), id.clone())) {
                            Some(SlotUsage::Configuration {
                                vdev: id,
                                node: self.node.clone(),
                            })
                        } else {
                            None
                        };
                        if let Some(usage) = usage {
                            d.mine.insert(slot, Holding { usage, since: now });
                            d.written = false;
                            changed = true;
                        }
                    }
                }
            }
            if changed {
                touched.push(key.clone());
            }
        }
        for key in touched {
            self.sync(&key);
        }
        released
    }

    /// Publishes device lists and queues Instance writes for a Configuration.
    fn sync(&mut self, key: &ConfigKey) {
        let node = self.node.clone();
        let Some(entry) = self.configs.get_mut(key) else {
            return;
        };
        let Some(view) = entry.view.clone() else {
            return;
        };
        if entry.blocked.is_some() {
            return;
        }
        let shared = entry.shared;
        let mut config_devices = Vec::new();
        let mut new_resources = Vec::new();
        let mut present = 0i64;
        for (name, d) in entry.devices.iter_mut() {
            let present_now = d.present();
            if present_now {
                present += 1;
            }
            let mut instance_devices = Vec::with_capacity(view.capacity);
            for slot in 0..view.capacity {
                let id = naming::slot_id(name, slot);
                let elsewhere = held_elsewhere(d, name, slot, &node).is_some();
                let (via_instance, via_config) = match d.mine.get(&slot).map(|h| &h.usage) {
                    Some(SlotUsage::Instance { .. }) => (true, false),
                    Some(SlotUsage::Configuration { .. }) => (false, true),
                    _ => (false, false),
                };
                let free = !elsewhere && !via_instance && !via_config;
                instance_devices.push(plugin_device(&id, present_now && (free || via_instance)));
                config_devices.push(plugin_device(&id, present_now && (free || via_config)));
            }
            new_resources.push((
                naming::instance_resource_name(name),
                instance_devices,
                name.clone(),
            ));

            if !d.written && d.device.is_some() && d.missing_since.is_none() {
                d.written = true;
                let discovered_at = d.observed.is_none().then_some(d.first_seen);
                let device = d.device.clone().unwrap_or_default();
                let mut properties = view.broker_properties.clone();
                properties.extend(device.properties.clone());
                let usage = d
                    .mine
                    .iter()
                    .map(|(slot, h)| (naming::slot_id(name, *slot), h.usage.to_string()))
                    .collect();
                let _ = self.effects.writes.send(WriterMsg::Desired(
                    InstanceKey {
                        namespace: key.0.clone(),
                        name: name.clone(),
                    },
                    DesiredInstance::Present {
                        configuration: key.1.clone(),
                        configuration_uid: view.uid.clone(),
                        device_id: d.id.clone(),
                        hash: d.hash.clone(),
                        capacity: view.capacity,
                        broker_properties: properties,
                        shared,
                        usage,
                        discovered_at,
                    },
                ));
            }
        }
        if let Some(m) = &self.metrics {
            m.instances
                .get_or_create(&crate::metrics::ConfigurationLabel {
                    configuration: format!("{}/{}", key.0, key.1),
                })
                .set(present);
        }
        for (resource, devices, instance) in new_resources {
            match self.resources.get(&resource) {
                Some(ResourceKind::Instance {
                    config,
                    instance: i,
                }) if config == key && *i == instance => {}
                Some(_) => {
                    if let Some(e) = self.configs.get_mut(key) {
                        e.conflicts.insert(format!(
                            "resource {resource} is already served for another Configuration; device {instance} is not advertised"
                        ));
                    }
                    continue;
                }
                None => {
                    self.resources.insert(
                        resource.clone(),
                        ResourceKind::Instance {
                            config: key.clone(),
                            instance,
                        },
                    );
                }
            }
            self.publish(&resource, devices);
        }
        self.publish(&naming::configuration_resource_name(&key.1), config_devices);
        let _ = self.effects.status.send(key.clone());
    }

    fn ensure_config_resource(&mut self, key: &ConfigKey) {
        let resource = naming::configuration_resource_name(&key.1);
        self.resources
            .entry(resource)
            .or_insert(ResourceKind::Configuration {
                config: key.clone(),
            });
    }

    fn publish(&mut self, resource: &str, devices: Vec<v1beta1::Device>) {
        match self.publishers.get(resource) {
            Some(tx) => {
                tx.send_if_modified(|current| {
                    if *current == devices {
                        false
                    } else {
                        *current = devices;
                        true
                    }
                });
            }
            None => {
                let (tx, rx) = watch::channel(devices);
                self.publishers.insert(resource.to_string(), tx);
                let _ = self.effects.plugins.send(PluginCommand::Ensure {
                    resource: resource.to_string(),
                    devices: rx,
                });
            }
        }
    }

    fn remove_resource(&mut self, resource: &str) {
        self.resources.remove(resource);
        if let Some(tx) = self.publishers.remove(resource) {
            // Tell kubelet the resource is empty before the server goes away,
            // so allocatable drops at once instead of after kubelet's grace.
            tx.send_replace(Vec::new());
            let _ = self.effects.plugins.send(PluginCommand::Remove {
                resource: resource.to_string(),
            });
        }
    }

    /// A per-node summary of a Configuration for its status entry.
    pub fn node_summary(&self, key: &ConfigKey) -> Option<NodeSummary> {
        let entry = self.configs.get(key)?;
        Some(NodeSummary {
            uid: entry.view.as_ref().map(|v| v.uid.clone()),
            generation: entry.view.as_ref().map(|v| v.generation),
            devices: entry.devices.values().filter(|d| d.present()).count(),
            conflicts: entry
                .blocked
                .iter()
                .cloned()
                .chain(entry.conflicts.iter().cloned())
                .collect(),
        })
    }

    /// `instance` or `configuration`, for metrics.
    pub fn resource_kind(&self, resource: &str) -> &'static str {
        match self.resources.get(resource) {
            Some(ResourceKind::Instance { .. }) => "instance",
            _ => "configuration",
        }
    }
}

/// Summary for this node's status entry of a Configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSummary {
    /// Configuration uid (for Events).
    pub uid: Option<String>,
    /// Configuration generation acted on.
    pub generation: Option<i64>,
    /// Devices currently present.
    pub devices: usize,
    /// Problems to report.
    pub conflicts: Vec<String>,
}

fn plugin_device(id: &str, healthy: bool) -> v1beta1::Device {
    v1beta1::Device {
        id: id.to_string(),
        health: if healthy {
            v1beta1::HEALTHY
        } else {
            v1beta1::UNHEALTHY
        }
        .to_string(),
        topology: None,
    }
}

/// Splits `<instance>-<n>` into the instance name and slot index.
pub fn split_slot_id(id: &str) -> Option<(&str, usize)> {
    let (instance, slot) = id.rsplit_once('-')?;
    Some((instance, slot.parse().ok()?))
}

fn slot_index(instance: &str, slot_id: &str) -> Option<usize> {
    let (i, n) = split_slot_id(slot_id)?;
    (i == instance).then_some(n)
}

/// Who else holds a slot according to the last server copy, if anyone.
fn held_elsewhere(d: &DeviceEntry, instance: &str, slot: usize, node: &str) -> Option<String> {
    let observed = d.observed.as_ref()?;
    let value = observed.usage.get(&naming::slot_id(instance, slot))?;
    match SlotUsage::parse(value) {
        SlotUsage::Free => None,
        u if u.node() == Some(node) => None,
        u => Some(u.node().unwrap_or_default().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        state: AgentState,
        plugins: mpsc::UnboundedReceiver<PluginCommand>,
        writes: mpsc::UnboundedReceiver<WriterMsg>,
        lists: HashMap<String, watch::Receiver<Vec<v1beta1::Device>>>,
    }

    impl Harness {
        fn new(node: &str) -> Self {
            let (ptx, plugins) = mpsc::unbounded_channel();
            let (wtx, writes) = mpsc::unbounded_channel();
            let (stx, _srx) = mpsc::unbounded_channel();
            std::mem::forget(_srx);
            Self {
                state: AgentState::new(
                    node,
                    Effects {
                        plugins: ptx,
                        writes: wtx,
                        status: stx,
                        grace: Arc::new(tokio::sync::Notify::new()),
                    },
                    None,
                ),
                plugins,
                writes,
                lists: HashMap::new(),
            }
        }

        fn drain(&mut self) -> Vec<(InstanceKey, DesiredInstance)> {
            while let Ok(cmd) = self.plugins.try_recv() {
                match cmd {
                    PluginCommand::Ensure { resource, devices } => {
                        self.lists.insert(resource, devices);
                    }
                    PluginCommand::Remove { resource } => {
                        self.lists.remove(&resource);
                    }
                }
            }
            let mut out = Vec::new();
            while let Ok(w) = self.writes.try_recv() {
                if let WriterMsg::Desired(k, d) = w {
                    out.push((k, d));
                }
            }
            out
        }

        fn healthy(&self, resource: &str) -> Vec<String> {
            self.lists
                .get(resource)
                .map(|rx| {
                    rx.borrow()
                        .iter()
                        .filter(|d| d.health == v1beta1::HEALTHY)
                        .map(|d| d.id.clone())
                        .collect()
                })
                .unwrap_or_default()
        }

        fn count(&self, resource: &str) -> usize {
            self.lists
                .get(resource)
                .map(|rx| rx.borrow().len())
                .unwrap_or(0)
        }
    }

    fn view(capacity: usize, grace: Duration) -> ConfigView {
        ConfigView {
            uid: "uid-1".into(),
            generation: 1,
            capacity,
            broker_properties: [("EXTRA".to_string(), "x".to_string())].into(),
            grace,
            handler: "debugEcho".into(),
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn dev(id: &str) -> Device {
        Device {
            id: id.into(),
            properties: [("DEBUG_ECHO_DESCRIPTION".to_string(), id.to_string())].into(),
            mounts: vec![],
            device_specs: vec![],
        }
    }

    fn key() -> ConfigKey {
        ("ns".into(), "conf".into())
    }

    #[test]
    fn devices_become_instances_and_resources() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        h.state
            .upsert_config(&key(), view(2, Duration::from_secs(5)))
            .expect("config");
        h.state
            .update_devices(&key(), true, vec![dev("a"), dev("b")], now);
        let writes = h.drain();
        assert_eq!(writes.len(), 2);
        let a = naming::instance_name("conf", "a", true, "n1");
        assert_eq!(
            h.healthy(&naming::instance_resource_name(&a)),
            [format!("{a}-0"), format!("{a}-1")]
        );
        assert_eq!(h.healthy("akri.sh/conf").len(), 4);
        match &writes[0].1 {
            DesiredInstance::Present {
                broker_properties,
                capacity,
                ..
            } => {
                assert_eq!(*capacity, 2);
                assert_eq!(
                    broker_properties.get("EXTRA").map(String::as_str),
                    Some("x")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        // The same list again writes nothing.
        h.state
            .update_devices(&key(), true, vec![dev("a"), dev("b")], now);
        assert!(h.drain().is_empty());
    }

    #[test]
    fn a_slot_taken_through_one_resource_is_unhealthy_through_the_other() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        h.state
            .upsert_config(&key(), view(1, Duration::from_secs(5)))
            .expect("config");
        h.state.update_devices(&key(), false, vec![dev("a")], now);
        h.drain();
        let a = naming::instance_name("conf", "a", false, "n1");
        let slot = format!("{a}-0");
        let outcome = h
            .state
            .claim("akri.sh/conf", std::slice::from_ref(&slot), now);
        let ClaimOutcome::Granted {
            wait_for_api,
            twins,
            devices,
        } = outcome
        else {
            panic!("refused: {outcome:?}");
        };
        assert!(wait_for_api.is_empty(), "not shared: local authority");
        assert_eq!(twins, [(naming::instance_resource_name(&a), slot.clone())]);
        assert_eq!(
            devices[0]
                .properties
                .get("DEBUG_ECHO_DESCRIPTION")
                .map(String::as_str),
            Some("a")
        );
        h.drain();
        assert!(h.healthy(&naming::instance_resource_name(&a)).is_empty());
        assert_eq!(h.healthy("akri.sh/conf"), std::slice::from_ref(&slot));
        // The twin is refused.
        let r = h.state.claim(
            &naming::instance_resource_name(&a),
            std::slice::from_ref(&slot),
            now,
        );
        assert!(matches!(r, ClaimOutcome::Refused(_)), "{r:?}");
        // Claiming again through the same resource is idempotent (kubelet retries).
        assert!(matches!(
            h.state
                .claim("akri.sh/conf", std::slice::from_ref(&slot), now),
            ClaimOutcome::Granted { .. }
        ));
        // kubelet stops listing it → released after the allocation grace.
        let later = now + Duration::from_secs(11);
        assert_eq!(
            h.state
                .reclaim(&BTreeSet::new(), later, Duration::from_secs(10)),
            1
        );
        h.drain();
        assert_eq!(h.healthy(&naming::instance_resource_name(&a)), [slot]);
    }

    #[test]
    fn fresh_claims_survive_until_kubelet_lists_them() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        h.state
            .upsert_config(&key(), view(1, Duration::from_secs(5)))
            .expect("config");
        h.state.update_devices(&key(), false, vec![dev("a")], now);
        let a = naming::instance_name("conf", "a", false, "n1");
        let slot = format!("{a}-0");
        h.state
            .claim("akri.sh/conf", std::slice::from_ref(&slot), now);
        assert_eq!(
            h.state.reclaim(
                &BTreeSet::new(),
                now + Duration::from_secs(1),
                Duration::from_secs(10)
            ),
            0
        );
        let listed = BTreeSet::from([("akri.sh/conf".to_string(), slot)]);
        assert_eq!(
            h.state.reclaim(
                &listed,
                now + Duration::from_secs(60),
                Duration::from_secs(10)
            ),
            0
        );
    }

    #[test]
    fn missing_devices_leave_after_the_grace_only() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        h.state
            .upsert_config(&key(), view(1, Duration::from_secs(5)))
            .expect("config");
        h.state.update_devices(&key(), true, vec![dev("a")], now);
        h.drain();
        let a = naming::instance_name("conf", "a", true, "n1");
        h.state.update_devices(&key(), true, vec![], now);
        assert!(h.drain().is_empty(), "nothing written during the grace");
        assert!(
            h.healthy(&naming::instance_resource_name(&a)).is_empty(),
            "unhealthy while missing"
        );
        assert_eq!(h.state.next_deadline(), Some(now + Duration::from_secs(5)));
        // Back within the grace: nothing churns, healthy again.
        h.state
            .update_devices(&key(), true, vec![dev("a")], now + Duration::from_secs(1));
        let w = h.drain();
        assert_eq!(w.len(), 1, "rewritten once to be sure it is current");
        assert_eq!(h.healthy(&naming::instance_resource_name(&a)).len(), 1);
        h.state
            .update_devices(&key(), true, vec![], now + Duration::from_secs(2));
        h.state.expire(now + Duration::from_secs(7));
        let w = h.drain();
        assert!(matches!(w.as_slice(), [(k, DesiredInstance::Leave)] if k.name == a));
        assert!(!h.lists.contains_key(&naming::instance_resource_name(&a)));
        assert_eq!(h.count("akri.sh/conf"), 0);
    }

    #[test]
    fn slots_held_by_other_nodes_are_unhealthy_here() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        h.state
            .upsert_config(&key(), view(2, Duration::from_secs(5)))
            .expect("config");
        h.state.update_devices(&key(), true, vec![dev("a")], now);
        let a = naming::instance_name("conf", "a", true, "n1");
        h.state.observe_instance(
            "ns",
            &a,
            "conf",
            ObservedInstance {
                device_id: Some("a".into()),
                nodes: vec!["n1".into(), "n2".into()],
                usage: [(format!("{a}-1"), "n2".to_string())].into(),
                capacity: 2,
                shared: true,
                ..Default::default()
            },
            now,
        );
        h.drain();
        assert_eq!(
            h.healthy(&naming::instance_resource_name(&a)),
            [format!("{a}-0")]
        );
        assert_eq!(h.healthy("akri.sh/conf"), [format!("{a}-0")]);
        let r = h.state.claim(
            &naming::instance_resource_name(&a),
            &[format!("{a}-1")],
            now,
        );
        assert!(
            matches!(&r, ClaimOutcome::Refused(m) if m.contains("n2")),
            "{r:?}"
        );
        let ClaimOutcome::Granted { wait_for_api, .. } = h.state.claim(
            &naming::instance_resource_name(&a),
            &[format!("{a}-0")],
            now,
        ) else {
            panic!("refused")
        };
        assert_eq!(
            wait_for_api.len(),
            1,
            "shared claims wait for the API server"
        );
    }

    #[test]
    fn adopted_instances_keep_their_slots_until_the_device_returns() {
        let mut h = Harness::new("n1");
        let now = Instant::now();
        let a = naming::instance_name("conf", "a", true, "n1");
        h.state.observe_instance(
            "ns",
            &a,
            "conf",
            ObservedInstance {
                device_id: Some("a".into()),
                nodes: vec!["n1".into()],
                usage: [(format!("{a}-0"), "n1".to_string())].into(),
                capacity: 2,
                shared: true,
                broker_properties: [("DEBUG_ECHO_DESCRIPTION".to_string(), "a".to_string())].into(),
            },
            now,
        );
        h.state
            .upsert_config(&key(), view(2, Duration::from_secs(30)))
            .expect("config");
        assert!(h.drain().is_empty(), "nothing written on adoption");
        h.state.update_devices(&key(), true, vec![dev("a")], now);
        h.drain();
        assert_eq!(
            h.healthy(&naming::instance_resource_name(&a)),
            [format!("{a}-0"), format!("{a}-1")]
        );
        assert_eq!(
            h.healthy("akri.sh/conf"),
            [format!("{a}-1")],
            "slot 0 is held via the instance resource"
        );
    }

    #[test]
    fn a_configuration_name_used_in_two_namespaces_is_served_once() {
        let mut h = Harness::new("n1");
        let mut older = view(1, Duration::ZERO);
        older.created = "2026-01-01T00:00:00Z".into();
        let mut newer = view(1, Duration::ZERO);
        newer.created = "2026-02-01T00:00:00Z".into();
        h.state
            .upsert_config(&("a".into(), "cam".into()), older)
            .expect("older wins");
        let e = h
            .state
            .upsert_config(&("b".into(), "cam".into()), newer)
            .expect_err("newer loses");
        assert!(e.contains("\"a\""), "{e}");
        h.state.update_devices(
            &("b".into(), "cam".into()),
            true,
            vec![dev("x")],
            Instant::now(),
        );
        assert!(h.drain().is_empty());
    }

    #[test]
    fn two_devices_with_one_instance_name_are_reported_not_merged() {
        // A real collision of the 3-byte BLAKE2b name hash, found by brute
        // force (the birthday bound is ~4,000 ids).
        let mut seen: HashMap<String, String> = HashMap::new();
        let (first, second) = (0..200_000)
            .map(|i| format!("dev-{i}"))
            .find_map(|id| {
                let h = naming::instance_hash(&id, true, "");
                seen.insert(h, id.clone()).map(|prev| (prev, id))
            })
            .expect("a collision within 200,000 ids");
        let mut h = Harness::new("n1");
        h.state
            .upsert_config(&key(), view(1, Duration::from_secs(5)))
            .expect("config");
        h.state.update_devices(
            &key(),
            true,
            vec![dev(&first), dev(&second)],
            Instant::now(),
        );
        let writes = h.drain();
        assert_eq!(writes.len(), 1, "one Instance, not a merge of two devices");
        let summary = h.state.node_summary(&key()).expect("summary");
        assert!(
            summary
                .conflicts
                .iter()
                .any(|c| c.contains(&first) && c.contains(&second)),
            "{:?}",
            summary.conflicts
        );
    }

    #[test]
    fn slot_ids_split() {
        assert_eq!(split_slot_id("conf-abc123-10"), Some(("conf-abc123", 10)));
        assert_eq!(split_slot_id("nohyphen"), None);
        assert_eq!(split_slot_id("x-y"), None);
    }
}
