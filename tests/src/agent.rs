//! Runs `verge-agent` as a host process for end-to-end tests (the chart runs
//! it as a DaemonSet; see helm/). Each test gets its own agent, restricted to
//! the test's namespace with `--watch-namespace`, its own registration
//! directory and metrics port, so tests run side by side on one node.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use verge_device_plugin_proto::podresources::v1::AllocatableResourcesRequest;
use verge_device_plugin_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;

use crate::{cluster_script, kubeconfig_path, state_dir, wait_until};

/// The dev-profile agent binary (built by `cargo build --bins`, as `.ci/run` does).
pub fn agent_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/verge/target")
        });
    target.join("debug/verge-agent")
}

/// kubelet's directory of `node` as seen from the host.
pub fn kubelet_dir(node: &str) -> PathBuf {
    if node == "verge-node-1" {
        PathBuf::from("/var/lib/kubelet")
    } else {
        state_dir()
            .join("nodes")
            .join(node)
            .join("root/var/lib/kubelet")
    }
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    /// Node it serves.
    pub node: String,
    /// Namespace it watches.
    pub namespace: String,
    /// Its handler directory (registration socket).
    pub handlers_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its metrics URL.
    pub metrics_port: u16,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent for `node`, serving `namespace`.
    pub async fn start(node: &str, namespace: &str, extra_args: &[&str]) -> Result<Agent> {
        Self::start_with_env(node, namespace, extra_args, &[]).await
    }

    /// Like [`Agent::start`], with extra environment variables for the agent
    /// process (e.g. `DBUS_SYSTEM_BUS_ADDRESS` for a mock BlueZ, or
    /// `LD_PRELOAD`/`UMOCKDEV_DIR` for a umockdev testbed).
    pub async fn start_with_env(
        node: &str,
        namespace: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        let base = std::env::temp_dir().join(format!("verge-e2e-agent-{namespace}-{node}"));
        let handlers_dir = base.join("handlers");
        std::fs::create_dir_all(&handlers_dir)?;
        let mut agent = Agent {
            child: None,
            node: node.to_string(),
            namespace: namespace.to_string(),
            log: base.join("agent.log"),
            handlers_dir,
            metrics_port: crate::controller::free_port()?,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> Result<()> {
        let bin = agent_binary();
        if !bin.exists() {
            bail!("{} is missing; run `cargo build --bins`", bin.display());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            self.node.clone(),
            "--watch-namespace".into(),
            self.namespace.clone(),
            "--discovery-handlers-directory".into(),
            self.handlers_dir.display().to_string(),
            "--metrics-address".into(),
            format!("127.0.0.1:{}", self.metrics_port),
            "--device-plugins-directory".into(),
            "/var/lib/kubelet/device-plugins".into(),
        ];
        args.extend(self.extra_args.iter().cloned());
        // Node 1 is the host; other nodes' kubelets live in their own mount
        // and network namespaces, which `cluster node-exec` enters.
        let mut cmd = if self.node == "verge-node-1" {
            Command::new(&bin)
        } else {
            let mut c = Command::new(cluster_script());
            c.arg("node-exec").arg(&self.node).arg(&bin);
            c
        };
        cmd.args(&args)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info,verge_agent=debug")
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
        Ok(())
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .context("agent did not stop within 20s")??;
        }
        Ok(())
    }

    /// Stops and starts it again with the same settings.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the agent's HTTP port (/metrics, /healthz, /readyz) from the host:
    /// (status code, whole response). Node-2 agents listen in node 2's network namespace and
    /// are not reachable this way.
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        Ok((code, out))
    }

    /// The agent's Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self.http_get("/metrics").await?.1)
    }

    /// Waits until the agent serves /metrics (it is up).
    pub async fn wait_up(&self, timeout: Duration) -> Result<()> {
        wait_until("agent metrics endpoint", timeout, || async {
            Ok(self.metrics().await.ok().map(|_| ()))
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Device ids of `resource` that kubelet on `node` lists as allocatable
/// (pod-resources `GetAllocatableResources`).
pub async fn kubelet_allocatable(node: &str, resource: &str) -> Result<BTreeSet<String>> {
    let socket = kubelet_dir(node).join("pod-resources/kubelet.sock");
    let channel = verge_discovery_sdk::uds::connect(&socket, Duration::from_secs(5))
        .await
        .with_context(|| format!("connecting {}", socket.display()))?;
    let resp = PodResourcesListerClient::new(channel)
        .get_allocatable_resources(AllocatableResourcesRequest {})
        .await?
        .into_inner();
    Ok(resp
        .devices
        .into_iter()
        .filter(|d| d.resource_name == resource)
        .flat_map(|d| d.device_ids)
        .collect())
}

/// Writes the debugEcho availability file.
pub fn set_availability(path: &Path, online: bool) -> Result<()> {
    std::fs::write(path, if online { "ONLINE" } else { "OFFLINE" })
        .with_context(|| format!("writing {}", path.display()))
}

/// Installs (or updates) the project's CRDs with a server-side apply, and
/// waits until the API server serves them.
pub async fn ensure_crds(c: &crate::Cluster) -> Result<()> {
    let dir = crate::repo_root().join("crds");
    c.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &dir.display().to_string(),
    ])
    .await?;
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/configurations.akri.sh",
        "crd/instances.akri.sh",
    ])
    .await?;
    Ok(())
}
