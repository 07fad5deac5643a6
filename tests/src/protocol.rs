//! What the protocol e2e tests (`tests/tests/{mdns,modbus,onvif,ble}.rs`) share: the test's
//! start (cluster, CRDs, namespace, the peer's python), the device-LAN namespace their peers run
//! in, the Configuration they apply and the broker logs they wait for.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::agent::{Agent, ensure_crds};
use crate::controller::ControllerProcess;
use crate::{BROKER_IMAGE, Cluster, TestNamespace, cluster_cmd, cluster_script};

/// Image of the tool broker: the test broker as entrypoint plus busybox applets (`sh`, `nc`,
/// `od`, `timeout`, …) and an `ffprobe` that runs the node's own (see [`ProtocolConfiguration::host_path`]).
pub const TOOL_BROKER_IMAGE: &str = "localhost/verge/tool-broker:dev";

/// The python of a peer's virtualenv, made by `tests/peers/<peer>/setup.sh`:
/// `$VERGE_<PEER>_VENV/bin/python`, by default `~/.cache/verge/venv-<peer>/bin/python`.
pub fn venv_python(peer: &str) -> PathBuf {
    std::env::var_os(format!("VERGE_{}_VENV", peer.to_ascii_uppercase()))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(format!(".cache/verge/venv-{peer}"))
        })
        .join("bin/python")
}

/// Where a protocol test starts: the cluster with the project's CRDs, the test's namespace and
/// the peer's python.
pub struct ProtocolTest {
    /// The test cluster.
    pub cluster: Cluster,
    /// The test's namespace; deleted when dropped.
    pub namespace: TestNamespace,
    /// [`venv_python`] of the peer.
    pub python: PathBuf,
}

impl ProtocolTest {
    /// `None` when there is no cluster (the test passes as skipped, see [`Cluster::connect`]);
    /// an error when the peer's virtualenv is missing. `peer` also prefixes the namespace.
    pub async fn start(peer: &str) -> Result<Option<Self>> {
        let Some(cluster) = Cluster::connect().await else {
            return Ok(None);
        };
        let python = venv_python(peer);
        ensure!(
            python.exists(),
            "{} missing: run tests/peers/{peer}/setup.sh",
            python.display()
        );
        ensure_crds(&cluster).await?;
        let namespace = cluster.namespace(peer).await?;
        Ok(Some(ProtocolTest {
            cluster,
            namespace,
            python,
        }))
    }

    /// An agent on every node and a controller, all serving the test's namespace (kept running
    /// while the returned values live), and the node names.
    pub async fn agents_on_every_node(
        &self,
        controller_tag: &str,
    ) -> Result<(Vec<String>, Vec<Agent>, ControllerProcess)> {
        let ns = self.namespace.name();
        let nodes = self.cluster.node_names().await?;
        let mut agents = Vec::new();
        for node in &nodes {
            agents.push(Agent::start(node, ns, &[]).await?);
        }
        let controller = ControllerProcess::start(&self.cluster, ns, controller_tag, &[]).await?;
        Ok((nodes, agents, controller))
    }
}

/// A device-LAN namespace (`cluster lan-host`), removed (`cluster lan-host-del`) when dropped.
pub struct LanHost {
    name: String,
}

impl LanHost {
    /// Creates namespace `name` on the device LAN with `addresses` (an IPv4 address, optionally
    /// an IPv6 one), first removing what an earlier run may have left.
    pub async fn create(name: &str, addresses: &[&str]) -> Result<Self> {
        let _ = cluster_cmd(&["lan-host-del", name]).await;
        let mut args = vec!["lan-host", name];
        args.extend_from_slice(addresses);
        cluster_cmd(&args).await?;
        Ok(LanHost { name: name.into() })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for LanHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new(cluster_script())
            .args(["lan-host-del", &self.name])
            .output();
    }
}

/// An `akri.sh/v0` Configuration of one discovery handler whose broker pods run one container
/// taking one slot of their Instance (the `{{PLACEHOLDER}}` resource the controller fills in).
#[derive(Clone, Debug)]
pub struct ProtocolConfiguration {
    name: String,
    handler: String,
    details: String,
    capacity: u32,
    image: String,
    command: Option<Vec<String>>,
    env: Vec<(String, String)>,
    host_paths: Vec<HostPath>,
}

#[derive(Clone, Debug)]
struct HostPath {
    volume: String,
    path: String,
    mount_path: String,
}

impl ProtocolConfiguration {
    /// Configuration `name` of handler `handler` with `details` (its discoveryDetails, YAML);
    /// capacity 1, the broker is [`BROKER_IMAGE`] with its own entrypoint.
    pub fn new(name: &str, handler: &str, details: &str) -> Self {
        ProtocolConfiguration {
            name: name.into(),
            handler: handler.into(),
            details: details.into(),
            capacity: 1,
            image: BROKER_IMAGE.into(),
            command: None,
            env: Vec::new(),
            host_paths: Vec::new(),
        }
    }

    /// How many nodes may use one Instance at a time.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// The broker's image.
    pub fn image(mut self, image: &str) -> Self {
        self.image = image.into();
        self
    }

    /// The broker runs `sh -c script` in [`TOOL_BROKER_IMAGE`].
    pub fn shell(mut self, script: &str) -> Self {
        self.image = TOOL_BROKER_IMAGE.into();
        self.command = Some(vec!["sh".into(), "-c".into(), script.into()]);
        self
    }

    /// An environment variable of the broker container.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Mounts the node's directory `path` read-only at `mount_path` as volume `volume`.
    /// The tool broker's `ffprobe` runs the node's, so it needs `/usr` at `/host/usr`.
    pub fn host_path(mut self, volume: &str, path: &str, mount_path: &str) -> Self {
        self.host_paths.push(HostPath {
            volume: volume.into(),
            path: path.into(),
            mount_path: mount_path.into(),
        });
        self
    }

    /// The Configuration's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Configuration as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let mut container = json!({
            "name": "broker",
            "image": self.image,
            "imagePullPolicy": "Never",
            "resources": {
                "requests": {"{{PLACEHOLDER}}": "1"},
                "limits": {"{{PLACEHOLDER}}": "1"},
            },
        });
        if let Some(command) = &self.command {
            container["command"] = json!(command);
        }
        if !self.env.is_empty() {
            container["env"] = self
                .env
                .iter()
                .map(|(name, value)| json!({"name": name, "value": value}))
                .collect();
        }
        let mut pod = json!({"containers": [container]});
        if !self.host_paths.is_empty() {
            pod["containers"][0]["volumeMounts"] = self
                .host_paths
                .iter()
                .map(|h| json!({"name": h.volume, "mountPath": h.mount_path, "readOnly": true}))
                .collect();
            pod["volumes"] = self
                .host_paths
                .iter()
                .map(|h| json!({"name": h.volume, "hostPath": {"path": h.path, "type": "Directory"}}))
                .collect();
        }
        json!({
            "apiVersion": "akri.sh/v0",
            "kind": "Configuration",
            "metadata": {"name": self.name},
            "spec": {
                "discoveryHandler": {"name": self.handler, "discoveryDetails": self.details},
                "capacity": self.capacity,
                "brokerSpec": {"brokerPodSpec": pod},
            },
        })
    }

    /// Applies the Configuration in namespace `ns`.
    pub async fn apply(&self, c: &Cluster, ns: &str) -> Result<String> {
        c.apply_yaml(Some(ns), &self.to_json().to_string()).await
    }
}

/// The broker pods of Configuration `configuration` in `ns` whose log satisfies `accept`, as
/// (pod name, log).
pub async fn broker_logs(
    c: &Cluster,
    ns: &str,
    configuration: &str,
    accept: impl Fn(&str) -> bool,
) -> Result<Vec<(String, String)>> {
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let selector = format!("akri.sh/configuration={configuration}");
    let mut found = Vec::new();
    for p in pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let name = p.metadata.name.unwrap_or_default();
        let log = c.logs(ns, &name).await.unwrap_or_default();
        if accept(&log) {
            found.push((name, log));
        }
    }
    Ok(found)
}
