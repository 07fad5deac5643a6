//! What every scenario shares: the exclusive e2e lock, the chart installation (always removed
//! again), Configurations, the debugEcho availability file inside the agent pod, kubelet's
//! pod-resources view, the API server's request counters and /proc figures of a container.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use verge_crds::naming;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::task::JoinHandle;
use verge_crds::Instance;
use verge_device_plugin_proto::podresources::v1::AllocatableResourcesRequest;
use verge_device_plugin_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use verge_e2e::Cluster;

/// Namespace of the chart release; the agent and controller serve only this one.
pub const NS: &str = "verge-system";
/// Cargo profile of the binaries in the images the benchmarks install: release, as users run it,
/// unless `VERGE_IMAGE_PROFILE` says otherwise (`debug` to compare with the test images).
pub fn image_profile() -> &'static str {
    match std::env::var("VERGE_IMAGE_PROFILE").as_deref() {
        Ok("debug") => "debug",
        _ => "release",
    }
}

/// Helm release name `tests/cluster/cluster install` uses.
pub const RELEASE: &str = "verge";
/// Label on every object the benchmark creates, so cleanup finds them all.
pub const BENCH_LABEL: &str = "verge.dev/bench";
/// Grace-period annotation the agent reads per Configuration.
pub const GRACE_ANNOTATION: &str = "akri.sh/device-grace-period";
/// The machine-wide e2e lock (see `verge_e2e::e2e_lock_path`).
const LOCK_PATH: &str = "/run/lock/verge-e2e.lock";
/// Longest wait for `helm uninstall` and the removal of benchmark objects.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(180);
/// Timeout of one pod-resources call.
const KUBELET_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings every scenario sees.
#[derive(Clone)]
pub struct Ctx {
    pub cluster: Cluster,
    /// Node the agent is pinned to and the devices live on.
    pub node: String,
    /// Where JSON and PNG files go.
    pub out_dir: PathBuf,
}

impl Ctx {
    pub fn client(&self) -> kube::Client {
        self.cluster.client()
    }
}

/// The workspace's target directory: `$CARGO_TARGET_DIR`, else `./target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Holds `/run/lock/verge-e2e.lock` exclusively: no e2e test namespace lives meanwhile.
pub struct ExclusiveLock {
    _file: std::fs::File,
}

pub async fn lock_exclusive() -> Result<ExclusiveLock> {
    tokio::task::spawn_blocking(|| -> Result<ExclusiveLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!("waiting for running e2e tests to finish ({LOCK_PATH})");
                file.lock()
                    .with_context(|| format!("locking {LOCK_PATH}"))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {LOCK_PATH}"));
            }
        }
        Ok(ExclusiveLock { _file: file })
    })
    .await?
}

/// The chart release, installed for one scenario; removed by [`Installation::finish`] or, if a
/// panic skips that, by `Drop` (blocking).
pub struct Installation {
    active: bool,
    log: PathBuf,
}

/// Helm arguments that keep the release off other tests' namespaces and put the agent on `node`.
pub fn base_helm_args(node: &str) -> Vec<String> {
    vec![
        "--wait".into(),
        "--timeout".into(),
        "300s".into(),
        "--set".into(),
        format!("agent.watchNamespace={NS},controller.watchNamespace={NS}"),
        "--set-json".into(),
        format!(
            r#"admissionPolicy.namespaceSelector={{"matchLabels":{{"kubernetes.io/metadata.name":"{NS}"}}}}"#
        ),
        "--set-json".into(),
        format!(
            r#"agent.nodeSelector={{"kubernetes.io/hostname":"{node}","kubernetes.io/os":"linux"}}"#
        ),
    ]
}

impl Installation {
    pub async fn install(out_dir: &Path, helm_args: &[String]) -> Result<Installation> {
        let log = out_dir.join("install.log");
        let started = Instant::now();
        eprintln!(
            "installing the chart: tests/cluster/cluster install {}",
            helm_args.join(" ")
        );
        let args: Vec<&str> = std::iter::once("install")
            .chain(helm_args.iter().map(String::as_str))
            .collect();
        // Marked active before it runs: a half-done install is removed too.
        let inst = Installation {
            active: true,
            log: log.clone(),
        };
        // The profile goes through `env`: setting our own environment is unsound once tokio runs.
        let profile = format!("VERGE_IMAGE_PROFILE={}", image_profile());
        let script = verge_e2e::cluster_script().display().to_string();
        let env_args: Vec<&str> = [profile.as_str(), script.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let out = verge_e2e::run(Path::new("/usr/bin/env"), &env_args, None).await?;
        let _ = std::fs::write(
            &log,
            format!("{}\n--- stderr ---\n{}", out.stdout, out.stderr),
        );
        if !out.status.success() {
            bail!(
                "cluster install failed ({}); log in {}: {}",
                out.status,
                log.display(),
                out.stderr
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        eprintln!("installed in {:.0}s", started.elapsed().as_secs_f64());
        Ok(inst)
    }

    /// Deletes the benchmark's Configurations and pods, waits for their Instances to go, and
    /// uninstalls the release.
    pub async fn finish(mut self, cluster: &Cluster) {
        self.active = false;
        if let Err(e) = cleanup(cluster).await {
            eprintln!("warning: cleanup: {e:#}");
        }
        let out = verge_e2e::run(
            &verge_e2e::helm_path(),
            &[
                "uninstall",
                RELEASE,
                "-n",
                NS,
                "--wait",
                "--timeout",
                "180s",
            ],
            None,
        )
        .await;
        match out {
            Ok(o) if o.status.success() => eprintln!("uninstalled release {RELEASE}"),
            Ok(o) => eprintln!("warning: helm uninstall: {}", o.stderr.trim()),
            Err(e) => eprintln!("warning: helm uninstall: {e:#}"),
        }
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        eprintln!(
            "removing the release after a failure (see {})",
            self.log.display()
        );
        let kubeconfig = verge_e2e::kubeconfig_path();
        let _ = std::process::Command::new(verge_e2e::kubectl_path())
            .env("KUBECONFIG", &kubeconfig)
            .args([
                "delete",
                "configurations.akri.sh,pods",
                "-n",
                NS,
                "-l",
                BENCH_LABEL,
                "--wait=false",
            ])
            .status();
        let _ = std::process::Command::new(verge_e2e::helm_path())
            .env("KUBECONFIG", &kubeconfig)
            .args([
                "uninstall",
                RELEASE,
                "-n",
                NS,
                "--wait",
                "--timeout",
                "180s",
            ])
            .status();
    }
}

/// Removes every benchmark Configuration and pod and waits until their Instances are gone.
pub async fn cleanup(cluster: &Cluster) -> Result<()> {
    let lp = ListParams::default().labels(BENCH_LABEL);
    let configs: Api<verge_crds::Configuration> = Api::namespaced(cluster.client(), NS);
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let _ = configs
        .delete_collection(&DeleteParams::default(), &lp)
        .await;
    let _ = pods
        .delete_collection(&DeleteParams::default().grace_period(0), &lp)
        .await;
    let instances: Api<Instance> = Api::namespaced(cluster.client(), NS);
    verge_e2e::wait_until("benchmark Instances gone", CLEANUP_TIMEOUT, || async {
        let left = instances
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|i| {
                i.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("vg-bench"))
            })
            .count();
        Ok((left == 0).then_some(()))
    })
    .await
}

/// A debugEcho Configuration `name` with `descriptions`, switched by `availability_file` (a path
/// inside the agent container), optionally with a broker pod per device and a grace period.
/// The Instance names `descriptions` give under `configuration`. debugEcho devices are shared and
/// their id is the description; two ids can still share a name when the 3-byte name hash of the
/// Akri contract collides (about one pair in 5,000 ids), and the agent then serves one of them and
/// reports a `NameConflict` condition, so a run waits for the distinct names, not for one per id.
pub fn echo_instance_names(configuration: &str, descriptions: &[String]) -> BTreeSet<String> {
    descriptions
        .iter()
        .map(|d| naming::instance_name(configuration, d, true, ""))
        .collect()
}

pub fn echo_configuration(
    name: &str,
    descriptions: &[String],
    availability_file: &str,
    capacity: u32,
    grace: Option<&str>,
    broker: bool,
) -> serde_json::Value {
    let details = serde_json::json!({
        "descriptions": descriptions,
        "availabilityFile": availability_file,
    });
    let mut annotations = serde_json::Map::new();
    if let Some(g) = grace {
        annotations.insert(GRACE_ANNOTATION.into(), g.into());
    }
    let mut cfg = serde_json::json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {BENCH_LABEL: "true"},
            "annotations": annotations,
        },
        "spec": {
            "discoveryHandler": {
                "name": "debugEcho",
                // YAML is a superset of JSON: the handler parses this string as its settings.
                "discoveryDetails": details.to_string(),
            },
            "capacity": capacity,
        }
    });
    if broker {
        cfg["spec"]["brokerSpec"] = serde_json::json!({"brokerPodSpec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "broker",
                "image": verge_e2e::BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "resources": {"limits": {"{{PLACEHOLDER}}": "1"}},
            }],
        }});
    }
    cfg
}

/// `kubectl apply` of one object.
pub async fn apply(cluster: &Cluster, obj: &serde_json::Value) -> Result<()> {
    cluster
        .kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &obj.to_string(),
        )
        .await
        .map(|_| ())
}

/// The agent pod on `node` (Running, ready) and its /tmp emptyDir as seen from the host.
pub struct AgentPod {
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub tmp_dir: PathBuf,
}

pub async fn agent_pod(ctx: &Ctx) -> Result<AgentPod> {
    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await?;
    for p in list.items {
        let spec_node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if spec_node.as_deref() != Some(ctx.node.as_str())
            || p.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let status = p.status.clone().unwrap_or_default();
        let ready = status
            .container_statuses
            .as_deref()
            .unwrap_or_default()
            .iter()
            .all(|c| c.ready);
        if status.phase.as_deref() != Some("Running") || !ready {
            continue;
        }
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let container_id = status
            .container_statuses
            .as_deref()
            .unwrap_or_default()
            .first()
            .and_then(|c| c.container_id.clone())
            .unwrap_or_default();
        let tmp_dir = verge_e2e::agent::kubelet_dir(&ctx.node)
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~empty-dir/tmp");
        return Ok(AgentPod {
            name: p.metadata.name.clone().unwrap_or_default(),
            uid,
            container_id: strip_runtime(&container_id),
            tmp_dir,
        });
    }
    bail!("no ready agent pod on {}", ctx.node)
}

fn strip_runtime(id: &str) -> String {
    id.rsplit_once("://")
        .map(|(_, i)| i)
        .unwrap_or(id)
        .to_string()
}

/// Writes the availability file atomically (a rename), so the handler never reads it half-written.
pub fn set_online(file: &Path, online: bool) -> Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, if online { "ONLINE" } else { "OFFLINE" })
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("renaming to {}", file.display()))
}

/// kubelet's pod-resources view on one node, over one kept connection.
pub struct Kubelet {
    socket: PathBuf,
    client: Option<PodResourcesListerClient<tonic::transport::Channel>>,
}

impl Kubelet {
    pub fn new(node: &str) -> Self {
        Self {
            socket: verge_e2e::agent::kubelet_dir(node).join("pod-resources/kubelet.sock"),
            client: None,
        }
    }

    /// resource → device ids (`GetAllocatableResources`), `akri.sh/` resources only.
    pub async fn allocatable(&mut self) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                let ch = verge_discovery_sdk::uds::connect(&self.socket, KUBELET_CALL_TIMEOUT)
                    .await
                    .with_context(|| format!("connecting {}", self.socket.display()))?;
                self.client.insert(PodResourcesListerClient::new(ch))
            }
        };
        let resp = tokio::time::timeout(
            KUBELET_CALL_TIMEOUT,
            client.get_allocatable_resources(AllocatableResourcesRequest {}),
        )
        .await;
        let resp = match resp {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                self.client = None;
                return Err(anyhow!("GetAllocatableResources: {e}"));
            }
            Err(_) => {
                self.client = None;
                return Err(anyhow!("GetAllocatableResources timed out"));
            }
        };
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for d in resp.devices {
            if d.resource_name.starts_with("akri.sh/") {
                out.entry(d.resource_name).or_default().extend(d.device_ids);
            }
        }
        Ok(out)
    }

    /// Polls every `every` until `pred` holds for the allocatable view; the time since `t0`.
    pub async fn wait(
        &mut self,
        what: &str,
        t0: Instant,
        every: Duration,
        timeout: Duration,
        pred: impl Fn(&BTreeMap<String, BTreeSet<String>>) -> bool,
    ) -> Result<Duration> {
        let deadline = t0 + timeout;
        let mut last = String::from("condition not met");
        loop {
            match self.allocatable().await {
                Ok(view) if pred(&view) => return Ok(t0.elapsed()),
                Ok(_) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for kubelet: {what}: {last}");
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Polls `check` every `every` until it yields a value; the time since `since` when it did.
pub async fn poll<T, F, Fut>(
    what: &str,
    since: Instant,
    every: Duration,
    timeout: Duration,
    mut check: F,
) -> Result<(Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = since + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok((since.elapsed(), v)),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Quantity of `resource` in the Node's status.allocatable (0 if absent).
pub async fn node_allocatable(ctx: &Ctx, resource: &str) -> Result<i64> {
    let node = Api::<Node>::all(ctx.client()).get(&ctx.node).await?;
    Ok(node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get(resource).map(|q| q.0.parse::<i64>().unwrap_or(0)))
        .unwrap_or(0))
}

/// When each Instance was first seen and when it was deleted, from a watch.
#[derive(Clone, Debug, Default)]
pub struct InstanceSeen {
    pub created: Option<Instant>,
    pub deleted: Option<Instant>,
    pub uid: String,
}

/// A watch on the namespace's Instances, recording times.
pub struct InstanceTracker {
    pub seen: Arc<Mutex<HashMap<String, InstanceSeen>>>,
    task: JoinHandle<()>,
}

impl InstanceTracker {
    /// Starts the watch and waits until its initial list is in.
    pub async fn start(ctx: &Ctx) -> Result<Self> {
        let api: Api<Instance> = Api::namespaced(ctx.client(), NS);
        let seen: Arc<Mutex<HashMap<String, InstanceSeen>>> = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut stream = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                let Ok(ev) = ev else { continue };
                let mut map = s.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    Event::Apply(i) | Event::InitApply(i) => {
                        let name = i.metadata.name.clone().unwrap_or_default();
                        let uid = i.metadata.uid.clone().unwrap_or_default();
                        let e = map.entry(name).or_default();
                        if e.created.is_none() || e.deleted.is_some() || e.uid != uid {
                            *e = InstanceSeen {
                                created: Some(now),
                                deleted: None,
                                uid,
                            };
                        }
                    }
                    Event::Delete(i) => {
                        let name = i.metadata.name.clone().unwrap_or_default();
                        map.entry(name).or_default().deleted = Some(now);
                    }
                    Event::InitDone => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Init => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .map_err(|_| anyhow!("Instance watch did not start within 60s"))??;
        Ok(Self { seen, task })
    }

    pub fn get(&self, name: &str) -> Option<InstanceSeen> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Live Instances whose name starts with `prefix`.
    pub fn live(&self, prefix: &str) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(n, s)| n.starts_with(prefix) && s.created.is_some() && s.deleted.is_none())
            .count()
    }

    /// Deletions seen for names starting with `prefix`.
    pub fn deleted(&self, prefix: &str) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(n, s)| n.starts_with(prefix) && s.deleted.is_some())
            .count()
    }
}

impl Drop for InstanceTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `apiserver_request_total` sample.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestKey {
    pub resource: String,
    pub subresource: String,
    pub verb: String,
}

/// The API server's write counters for `akri.sh` objects: (resource, subresource, verb) → count.
pub async fn apiserver_writes(cluster: &Cluster) -> Result<BTreeMap<RequestKey, f64>> {
    let text = cluster.kubectl(&["get", "--raw", "/metrics"]).await?;
    Ok(parse_request_total(&text))
}

/// Verbs that write (the API server reports server-side apply as `APPLY`).
pub const WRITE_VERBS: [&str; 4] = ["POST", "PUT", "PATCH", "APPLY"];

pub fn parse_request_total(text: &str) -> BTreeMap<RequestKey, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = parse_labels(labels);
        if labels.get("group").map(String::as_str) != Some("akri.sh") {
            continue;
        }
        let verb = labels.get("verb").cloned().unwrap_or_default();
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let key = RequestKey {
            resource: labels.get("resource").cloned().unwrap_or_default(),
            subresource: labels.get("subresource").cloned().unwrap_or_default(),
            verb,
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

fn parse_labels(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.insert(
            key.trim_start_matches(',').trim().to_string(),
            after[..end].to_string(),
        );
        rest = &after[end + 1..];
    }
    out
}

/// Writes counted for a run: increase per key between two scrapes.
pub fn write_delta(
    before: &BTreeMap<RequestKey, f64>,
    after: &BTreeMap<RequestKey, f64>,
) -> BTreeMap<RequestKey, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// PIDs whose cgroup path names `container_id` (the host sees every node's processes).
pub fn container_pids(container_id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    if container_id.is_empty() {
        return pids;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            && cg.contains(container_id)
        {
            pids.push(pid);
        }
    }
    pids
}

/// RSS in bytes of a process (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A process's resident memory split as the kernel counts it: private anonymous memory (heap,
/// stacks) and file-backed pages (the mapped binary and libraries, shared with the page cache and
/// reclaimable). VmRSS is their sum plus shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RssParts {
    pub anon: u64,
    pub file: u64,
}

/// Parses `RssAnon` and `RssFile` (kB) out of a `/proc/<pid>/status` text.
pub fn parse_rss_parts(status: &str) -> Option<RssParts> {
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some(RssParts {
        anon: kb("RssAnon:")? * 1024,
        file: kb("RssFile:")? * 1024,
    })
}

/// [`RssParts`] summed over processes.
pub fn rss_parts(pids: &[u32]) -> RssParts {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| parse_rss_parts(&s))
        .fold(RssParts::default(), |a, b| RssParts {
            anon: a.anon + b.anon,
            file: a.file + b.file,
        })
}

/// utime + stime of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when that fails).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// RSS (MiB) samples every `every`, average CPU (% of one core) and the anonymous/file-backed
/// split at the end of the window, of a container over `window`.
pub async fn sample_container(
    container_id: &str,
    window: Duration,
    every: Duration,
) -> Result<(Vec<f64>, f64, RssParts)> {
    let pids = container_pids(container_id);
    if pids.is_empty() {
        bail!("no process found for container {container_id}");
    }
    let ticks = |pids: &[u32]| pids.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>();
    let rss =
        |pids: &[u32]| pids.iter().filter_map(|p| rss_bytes(*p)).sum::<u64>() as f64 / 1048576.0;
    let t0 = Instant::now();
    let c0 = ticks(&pids);
    let mut samples = vec![rss(&pids)];
    while t0.elapsed() < window {
        tokio::time::sleep(every).await;
        samples.push(rss(&pids));
    }
    let c1 = ticks(&pids);
    let cpu = (c1.saturating_sub(c0)) as f64 / clock_ticks() / t0.elapsed().as_secs_f64() * 100.0;
    Ok((samples, cpu, rss_parts(&pids)))
}

/// `nproc` and total memory (GiB) of this machine, and the cgroup version.
pub fn machine() -> serde_json::Value {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1048576.0)
        .unwrap_or(0.0);
    let cgroup = if Path::new("/sys/fs/cgroup/memory").is_dir() {
        "v1"
    } else {
        "v2"
    };
    serde_json::json!({"nproc": nproc, "mem_gib": (mem_gib * 10.0).round() / 10.0, "cgroup": cgroup})
}

/// kubelet's `nodeStatusUpdateFrequency` from the config the harness writes for `node`.
pub fn node_status_period(node: &str) -> Option<String> {
    let n = node.rsplit('-').next()?;
    let candidates = [
        verge_e2e::state_dir().join(format!("nodes/{node}/kubelet.yaml")),
        verge_e2e::state_dir().join(format!("etc/kubelet-{n}.yaml")),
        verge_e2e::state_dir().join(format!("nodes/{node}/etc/kubelet.yaml")),
    ];
    let found = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .or_else(|| {
            // Search the state directory for any kubelet config of this node.
            let out = std::process::Command::new("grep")
                .args([
                    "-rl",
                    "--include=kubelet*.yaml",
                    "nodeStatusUpdateFrequency",
                ])
                .arg(verge_e2e::state_dir())
                .output()
                .ok()?;
            let files = String::from_utf8_lossy(&out.stdout).to_string();
            let file = files
                .lines()
                .find(|f| f.contains(node))
                .or_else(|| files.lines().next())?
                .to_string();
            std::fs::read_to_string(file).ok()
        })?;
    found
        .lines()
        .find_map(|l| l.trim().strip_prefix("nodeStatusUpdateFrequency:"))
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_descriptions_count_once() {
        // "d2318" and "d2629" share the hash 6db282 (found by the 5,000-device run).
        let descs: Vec<String> = ["d2318", "d2629", "d1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let names = echo_instance_names("vg-bench-s5000", &descs);
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains("vg-bench-s5000-6db282"), "{names:?}");
    }

    #[test]
    fn rss_parts_come_from_status_lines() {
        let status = "Name:\tverge-agent\nVmRSS:\t   19112 kB\nRssAnon:\t    2544 kB\nRssFile:\t   16568 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(
            parse_rss_parts(status),
            Some(RssParts {
                anon: 2544 * 1024,
                file: 16568 * 1024
            })
        );
        assert_eq!(parse_rss_parts("VmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn request_counters_of_akri_writes() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="akri.sh",resource="instances",scope="resource",subresource="",verb="APPLY",version="v0"} 12
apiserver_request_total{code="200",component="apiserver",dry_run="",group="akri.sh",resource="instances",scope="resource",subresource="",verb="APPLY",version="v0"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="akri.sh",resource="configurations",scope="resource",subresource="status",verb="PATCH",version="v0"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="akri.sh",resource="instances",scope="namespace",subresource="",verb="LIST",version="v0"} 40
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 7
"#;
        let m = parse_request_total(text);
        let key = |r: &str, s: &str, v: &str| RequestKey {
            resource: r.into(),
            subresource: s.into(),
            verb: v.into(),
        };
        assert_eq!(m.len(), 2);
        assert_eq!(m[&key("instances", "", "APPLY")], 15.0);
        assert_eq!(m[&key("configurations", "status", "PATCH")], 5.0);
        let mut later = m.clone();
        *later.get_mut(&key("instances", "", "APPLY")).unwrap() += 4.0;
        let d = write_delta(&m, &later);
        assert_eq!(d.values().sum::<f64>(), 4.0);
    }
}
