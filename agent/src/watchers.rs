//! Watches Configurations (starting, restarting and stopping discovery) and
//! Instances (other nodes' slot usage, adoption on start).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;
use verge_crds::{Configuration, Instance};
use verge_discovery_sdk::DiscoveryRequest;

use crate::config::AgentConfig;
use crate::discovery::{self, DiscoverySpec};
use crate::instances::DEVICE_ID_ANNOTATION;
use crate::properties;
use crate::registry::Registry;
use crate::state::{AgentState, ConfigKey, ConfigView, ObservedInstance};
use crate::status::{Problem, StatusBoard};

/// Annotation on a Configuration overriding the agent's device grace period.
pub const GRACE_ANNOTATION: &str = "akri.sh/device-grace-period";

struct Running {
    fingerprint: u64,
    task: JoinHandle<()>,
}

/// Everything the Configuration watcher needs.
pub struct ConfigWatcher {
    /// API client.
    pub client: Client,
    /// Agent settings.
    pub config: AgentConfig,
    /// Handlers.
    pub registry: Arc<Registry>,
    /// State.
    pub state: Arc<Mutex<AgentState>>,
    /// Discovery status.
    pub board: Arc<StatusBoard>,
    /// Becomes true once the Instance watch has delivered its first full list.
    pub instances_listed: tokio::sync::watch::Receiver<bool>,
}

fn key_of(c: &Configuration) -> ConfigKey {
    (c.namespace().unwrap_or_default(), c.name_any())
}

/// The grace period of a Configuration: its annotation, else the agent default.
pub fn grace_of(c: &Configuration, default: Duration) -> Result<Duration, String> {
    match c.annotations().get(GRACE_ANNOTATION) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|e| {
            format!("annotation {GRACE_ANNOTATION}={v:?} is not a duration (e.g. \"30s\"): {e}")
        }),
    }
}

fn view_of(c: &Configuration, grace: Duration) -> ConfigView {
    ConfigView {
        uid: c.uid().unwrap_or_default(),
        generation: c.metadata.generation.unwrap_or_default(),
        capacity: usize::try_from(c.spec.capacity.max(1)).unwrap_or(1),
        broker_properties: c.spec.broker_properties(),
        grace,
        handler: c.spec.discovery_handler.name.clone(),
        created: c
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
    }
}

impl ConfigWatcher {
    /// Runs forever.
    pub async fn run(mut self) {
        // A device reported before its existing Instance is known would be written as new,
        // and that apply would drop the slots this node's pods hold (after an agent restart).
        // So Instances are adopted first; the Configuration list waits for them.
        if self
            .instances_listed
            .wait_for(|listed| *listed)
            .await
            .is_err()
        {
            return;
        }
        let api: Api<Configuration> = match &self.config.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut running: HashMap<ConfigKey, Running> = HashMap::new();
        let mut known: HashMap<ConfigKey, Configuration> = HashMap::new();
        let mut refresh = tokio::time::interval(self.config.property_refresh_interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut init: Option<Vec<Configuration>> = None;
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    None => return,
                    Some(Err(e)) => tracing::warn!(error = %e, "Configuration watch error; retrying"),
                    Some(Ok(Event::Apply(c))) => {
                        // Status writes (ours and the controller's) also arrive
                        // here; only a new generation or grace annotation
                        // matters, so they cost no Secret reads.
                        let key = key_of(&c);
                        let same = known.get(&key).is_some_and(|old| {
                            old.metadata.generation == c.metadata.generation
                                && old.annotations().get(GRACE_ANNOTATION) == c.annotations().get(GRACE_ANNOTATION)
                                && old.uid() == c.uid()
                        });
                        known.insert(key, c.clone());
                        if !same {
                            self.upsert(&c, &mut running).await;
                        }
                    }
                    Some(Ok(Event::Delete(c))) => {
                        let key = key_of(&c);
                        known.remove(&key);
                        self.delete(&key, &mut running);
                    }
                    Some(Ok(Event::Init)) => init = Some(Vec::new()),
                    Some(Ok(Event::InitApply(c))) => {
                        if let Some(list) = init.as_mut() { list.push(c); }
                    }
                    Some(Ok(Event::InitDone)) => {
                        let list = init.take().unwrap_or_default();
                        // After a watch restart, Configurations missing from the
                        // new list were deleted meanwhile.
                        let present: std::collections::HashSet<ConfigKey> = list.iter().map(key_of).collect();
                        let gone: Vec<ConfigKey> = known.keys().filter(|k| !present.contains(*k)).cloned().collect();
                        for k in gone {
                            known.remove(&k);
                            self.delete(&k, &mut running);
                        }
                        // Older first, so name conflicts resolve the same way on every node.
                        let mut list = list;
                        list.sort_by_key(|c| c.metadata.creation_timestamp.as_ref().map(|t| t.0));
                        for c in list {
                            known.insert(key_of(&c), c.clone());
                            self.upsert(&c, &mut running).await;
                        }
                    }
                },
                _ = refresh.tick() => {
                    // Secrets may have rotated: resolve again; discovery restarts only if a value changed.
                    let with_refs: Vec<Configuration> = known
                        .values()
                        .filter(|c| c.spec.discovery_handler.discovery_properties.iter().flatten().any(|p| p.value_from.is_some()))
                        .cloned()
                        .collect();
                    for c in with_refs {
                        self.upsert(&c, &mut running).await;
                    }
                }
            }
        }
    }

    fn delete(&self, key: &ConfigKey, running: &mut HashMap<ConfigKey, Running>) {
        if let Some(r) = running.remove(key) {
            r.task.abort();
        }
        self.board.remove(key);
        if let Ok(mut s) = self.state.lock() {
            s.remove_config(key);
        }
        tracing::info!(configuration = %format!("{}/{}", key.0, key.1), "Configuration removed");
    }

    fn stop(&self, key: &ConfigKey, running: &mut HashMap<ConfigKey, Running>) {
        if let Some(r) = running.remove(key) {
            r.task.abort();
        }
    }

    async fn upsert(&self, c: &Configuration, running: &mut HashMap<ConfigKey, Running>) {
        let key = key_of(c);
        let label = format!("{}/{}", key.0, key.1);
        let grace = match grace_of(c, self.config.device_grace_period) {
            Ok(g) => g,
            Err(message) => {
                self.board.set(&key, |s| {
                    s.problem = Some(Problem::new("InvalidAnnotation", message.clone()))
                });
                self.config.device_grace_period
            }
        };
        let accepted = match self.state.lock() {
            Ok(mut s) => s.upsert_config(&key, view_of(c, grace)),
            Err(_) => return,
        };
        if let Err(message) = accepted {
            self.stop(&key, running);
            self.board.set(&key, |s| {
                s.problem = Some(Problem::new("NameConflict", message.clone()))
            });
            return;
        }
        let props = c
            .spec
            .discovery_handler
            .discovery_properties
            .clone()
            .unwrap_or_default();
        let resolved = match properties::resolve(
            &self.client,
            &key.0,
            &props,
            self.config.allow_cross_namespace_properties,
        )
        .await
        {
            Ok(p) => p,
            Err(e) if e.is_transient() && running.contains_key(&key) => {
                tracing::warn!(configuration = %label, error = %e, "cannot re-read discoveryProperties; discovery continues with the old values");
                return;
            }
            Err(e) => {
                self.stop(&key, running);
                tracing::warn!(configuration = %label, error = %e, "discoveryProperties cannot be resolved");
                self.board.set(&key, |s| {
                    s.problem = Some(Problem::new("PropertyUnresolved", e.to_string()))
                });
                if let Ok(mut s) = self.state.lock() {
                    s.handler_lost(&key, Instant::now());
                }
                return;
            }
        };
        let request = DiscoveryRequest {
            details: c.spec.discovery_handler.discovery_details.clone(),
            properties: resolved,
        };
        let fingerprint = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.spec.discovery_handler.name.hash(&mut h);
            request.details.hash(&mut h);
            request.properties.hash(&mut h);
            h.finish()
        };
        if running
            .get(&key)
            .is_some_and(|r| r.fingerprint == fingerprint && !r.task.is_finished())
        {
            return;
        }
        if let Some(old) = running.remove(&key) {
            tracing::info!(configuration = %label, "discovery settings changed; restarting discovery");
            old.task.abort();
        } else {
            tracing::info!(configuration = %label, handler = %c.spec.discovery_handler.name, "starting discovery");
        }
        let spec = DiscoverySpec {
            handler: c.spec.discovery_handler.name.clone(),
            request,
        };
        let task = tokio::spawn(discovery::run(
            key.clone(),
            spec,
            self.registry.clone(),
            self.state.clone(),
            self.board.clone(),
            self.config.discovery_backoff_initial,
            self.config.discovery_backoff_max,
        ));
        running.insert(key, Running { fingerprint, task });
    }
}

/// What the state needs from an Instance.
pub fn observed_of(i: &Instance) -> ObservedInstance {
    ObservedInstance {
        device_id: i.annotations().get(DEVICE_ID_ANNOTATION).cloned(),
        nodes: i.spec.nodes.clone(),
        usage: i.spec.device_usage.clone(),
        broker_properties: i.spec.broker_properties.clone(),
        capacity: i.spec.capacity,
        shared: i.spec.shared,
    }
}

/// Feeds every Instance change into the state, and says when the first full list is in.
pub async fn watch_instances(
    client: Client,
    namespace: Option<String>,
    state: Arc<Mutex<AgentState>>,
    listed: tokio::sync::watch::Sender<bool>,
) {
    let api: Api<Instance> = match namespace {
        Some(ns) => Api::namespaced(client, &ns),
        None => Api::all(client),
    };
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // A re-list after a watch error (e.g. "too old resource version") reports
    // what exists, not what was deleted meanwhile: Instances known before and
    // missing from the re-list were deleted in the gap.
    let mut known: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut relisted: BTreeSet<(String, String, String)> = BTreeSet::new();
    let id = |i: &Instance| {
        (
            i.namespace().unwrap_or_default(),
            i.name_any(),
            i.spec.configuration_name.clone(),
        )
    };
    while let Some(ev) = stream.next().await {
        let mut vanished = Vec::new();
        let (apply, delete) = match ev {
            Ok(Event::Apply(i)) => {
                known.insert(id(&i));
                (Some(i), None)
            }
            Ok(Event::InitApply(i)) => {
                relisted.insert(id(&i));
                (Some(i), None)
            }
            Ok(Event::Delete(i)) => {
                known.remove(&id(&i));
                (None, Some(i))
            }
            Ok(Event::InitDone) => {
                vanished = known.difference(&relisted).cloned().collect();
                known = std::mem::take(&mut relisted);
                listed.send_replace(true);
                (None, None)
            }
            Ok(Event::Init) => {
                relisted.clear();
                (None, None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Instance watch error; retrying");
                (None, None)
            }
        };
        let Ok(mut s) = state.lock() else { return };
        for (ns, name, config) in &vanished {
            tracing::info!(instance = %name, namespace = %ns, "Instance deleted while the watch was re-listing");
            s.observe_instance_deleted(ns, name, config);
        }
        if let Some(i) = apply {
            let ns = i.namespace().unwrap_or_default();
            s.observe_instance(
                &ns,
                &i.name_any(),
                &i.spec.configuration_name,
                observed_of(&i),
                Instant::now(),
            );
        }
        if let Some(i) = delete {
            let ns = i.namespace().unwrap_or_default();
            s.observe_instance_deleted(&ns, &i.name_any(), &i.spec.configuration_name);
        }
    }
}
