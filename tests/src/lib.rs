//! End-to-end test fixture for the real test cluster built by `tests/cluster/cluster`.
//!
//! A test starts with
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let Some(cluster) = verge_e2e::Cluster::connect().await else { return Ok(()) };
//! let ns = cluster.namespace("my-test").await?;
//! # Ok(()) }
//! ```
//!
//! [`Cluster::connect`] uses `KUBECONFIG`, or the harness's default kubeconfig. With no cluster
//! reachable it prints one line saying why and how to start one, and returns `None` so the test
//! passes as skipped — unless `VERGE_E2E=required`, in which case it panics. Every test works in its
//! own namespace ([`TestNamespace`]), deleted when the guard drops, also on panic.
//!
//! Tests that stop or restart cluster components belong in the `disruptive` test binary and must
//! hold [`serial`] while they run.

pub mod agent;
pub mod controller;
pub mod protocol;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::AsyncWriteExt;

/// Image of the test broker (`verge-test-broker`), imported by `tests/cluster/cluster images`.
pub const BROKER_IMAGE: &str = "localhost/verge/test-broker:dev";
/// Port the test broker serves its environment on.
pub const BROKER_PORT: u16 = 8080;
/// Label put on every namespace the fixture creates.
pub const NAMESPACE_LABEL: &str = "verge.dev/e2e";

/// The repository root (parent of this crate).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Path of the harness entry point, `tests/cluster/cluster`.
pub fn cluster_script() -> PathBuf {
    repo_root().join("tests/cluster/cluster")
}

/// The harness's state directory (`VERGE_CLUSTER_DIR`, default `/var/lib/verge-cluster`).
pub fn state_dir() -> PathBuf {
    std::env::var_os("VERGE_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/verge-cluster"))
}

/// The kubeconfig the harness writes.
pub fn default_kubeconfig() -> PathBuf {
    state_dir().join("admin.kubeconfig")
}

/// `KUBECONFIG` (its first entry) if set, else the harness's default kubeconfig.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v)
            .next()
            .unwrap_or_else(default_kubeconfig),
        _ => default_kubeconfig(),
    }
}

/// Directory holding the cached `kubectl` and `helm` (`$VERGE_CACHE/path`, default
/// `~/.cache/verge/path`).
pub fn tool_dir() -> PathBuf {
    let cache = std::env::var_os("VERGE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/verge")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/verge"));
    cache.join("path")
}

fn tool(name: &str) -> PathBuf {
    let cached = tool_dir().join(name);
    if cached.exists() {
        cached
    } else {
        PathBuf::from(name)
    }
}

/// `kubectl` from the harness cache, or from `PATH`.
pub fn kubectl_path() -> PathBuf {
    tool("kubectl")
}

/// `--set` values that make the chart use the images `cluster images` imports
/// (`localhost/verge/{agent,controller}:dev`, never pulled).
pub fn local_image_sets() -> Vec<String> {
    ["agent", "controller"]
        .iter()
        .flat_map(|c| {
            [
                format!("{c}.image.repository=localhost/verge/{c}"),
                format!("{c}.image.tag=dev"),
                format!("{c}.image.pullPolicy=Never"),
            ]
        })
        .collect()
}

/// `helm` from the harness cache, or from `PATH`.
pub fn helm_path() -> PathBuf {
    tool("helm")
}

/// How long a new namespace may wait for its default ServiceAccount. Generous:
/// right after a control-plane fault test the controller-manager is still
/// re-establishing its watches.
const SERVICE_ACCOUNT_DEADLINE: Duration = Duration::from_secs(120);

/// True when `VERGE_E2E=required`: a missing cluster is then a failure, not a skip.
pub fn required() -> bool {
    std::env::var("VERGE_E2E").is_ok_and(|v| v == "required")
}

/// Writes one line to the process's real stderr, past the test harness's output capture (which
/// only catches the `print!` family), so it shows in CI logs even for passing tests.
pub fn uncaptured(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Reports how long something took: one line on stderr (not captured, see [`uncaptured`]),
/// also appended to `<state dir>/logs/e2e-timings.log` (shown by `cluster logs --tail N`).
pub fn report_time(what: &str, started: Instant) {
    let line = format!("[e2e] {what}: {:.2}s", started.elapsed().as_secs_f64());
    uncaptured(&line);
    let logs = state_dir().join("logs");
    if logs.is_dir() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("e2e-timings.log"))
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Polls `check` every 250 ms until it returns `Ok(Some(v))` or `timeout` passes. An `Err` from
/// `check` does not stop the wait; the last one is reported on timeout.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Output of a finished command.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a program, feeding `stdin` if given, and captures its output (no check of the status).
pub async fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<CmdOutput> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = child.wait_with_output().await?;
    Ok(CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a program and returns its stdout; fails (with stderr) unless it exits 0.
pub async fn run_ok(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = run(program, args, stdin).await?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            out.stderr.trim(),
            if out.stdout.trim().is_empty() {
                String::new()
            } else {
                format!("\nstdout: {}", out.stdout.trim())
            }
        );
    }
    Ok(out.stdout)
}

/// Runs `tests/cluster/cluster ARGS...` and returns its stdout.
pub async fn cluster_cmd(args: &[&str]) -> Result<String> {
    run_ok(&cluster_script(), args, None).await
}

static SKIP_NOTICE: OnceLock<()> = OnceLock::new();
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NS_COUNTER: AtomicU64 = AtomicU64::new(0);
static HOLDS_EXCLUSIVE: AtomicBool = AtomicBool::new(false);

/// The machine-wide e2e lock: every test namespace holds it shared, a disruptive test ([`serial`])
/// exclusively. Inside one `cargo test` run the test binaries already run one after the other;
/// the lock also keeps a disruptive test in one process (or shell, or session) from restarting
/// components under the tests of another process on the same machine.
pub fn e2e_lock_path() -> PathBuf {
    let dir = Path::new("/run/lock");
    if dir.is_dir() {
        dir.join("verge-e2e.lock")
    } else {
        std::env::temp_dir().join("verge-e2e.lock")
    }
}

async fn take_e2e_lock(exclusive: bool) -> Option<std::fs::File> {
    let path = e2e_lock_path();
    let taken = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if exclusive {
            file.lock()?;
        } else {
            file.lock_shared()?;
        }
        Ok(file)
    })
    .await;
    match taken {
        Ok(Ok(file)) => Some(file),
        Ok(Err(e)) => {
            uncaptured(&format!(
                "verge-e2e: warning: cannot lock {}: {e}",
                e2e_lock_path().display()
            ));
            None
        }
        Err(e) => {
            uncaptured(&format!("verge-e2e: warning: lock task failed: {e}"));
            None
        }
    }
}

/// Held by a disruptive test for its whole run (see [`serial`]).
pub struct SerialGuard {
    _file: Option<std::fs::File>,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        HOLDS_EXCLUSIVE.store(false, Ordering::SeqCst);
    }
}

/// Serialises disruptive tests: hold the guard for the whole test. It also takes the machine-wide
/// e2e lock exclusively, so no test namespace of another process is live meanwhile.
pub async fn serial() -> SerialGuard {
    let guard = SERIAL.lock().await;
    let file = take_e2e_lock(true).await;
    HOLDS_EXCLUSIVE.store(true, Ordering::SeqCst);
    SerialGuard {
        _file: file,
        _guard: guard,
    }
}

/// A connection to the test cluster.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// Connects to the test cluster, or returns `None` (after one line saying why) when none is
    /// reachable. Panics instead when `VERGE_E2E=required`.
    pub async fn connect() -> Option<Cluster> {
        match Self::try_connect().await {
            Ok(c) => Some(c),
            Err(e) => {
                let reason = format!("{e:#}");
                if required() {
                    panic!(
                        "VERGE_E2E=required but no test cluster is reachable: {reason} \
                         (start one with `tests/cluster/cluster up`)"
                    );
                }
                SKIP_NOTICE.get_or_init(|| {
                    uncaptured(&format!(
                        "verge-e2e: SKIPPING cluster tests: no test cluster reachable ({reason}); \
                         start one with `tests/cluster/cluster up && tests/cluster/cluster images` \
                         (set VERGE_E2E=required to make this a failure)"
                    ));
                });
                None
            }
        }
    }

    /// Connects, failing with the reason when the cluster is not reachable.
    pub async fn try_connect() -> Result<Cluster> {
        // Built with the whole workspace, rustls has two providers compiled in (see the agent).
        verge_discovery_sdk::tls::ensure_crypto_provider();
        let kubeconfig = kubeconfig_path();
        if !kubeconfig.exists() {
            bail!("no kubeconfig at {}", kubeconfig.display());
        }
        let kc = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", kubeconfig.display()))?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
            .await
            .map_err(|_| anyhow!("API server {server} did not answer within 10s"))?
            .with_context(|| format!("API server {server} not reachable"))?;
        Ok(Cluster { client, kubeconfig })
    }

    /// The Kubernetes client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig in use.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Creates a fresh namespace `e2e-<prefix>-<unique>`, deleted when the guard drops. The guard
    /// holds the machine-wide e2e lock shared (unless this process runs a [`serial`] test), so
    /// disruptive tests elsewhere wait for it.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let shared_lock = if HOLDS_EXCLUSIVE.load(Ordering::SeqCst) {
            None
        } else {
            take_e2e_lock(false).await
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        prefix.truncate(40);
        let name = format!(
            "e2e-{}-{:x}{:x}{n}",
            prefix.trim_matches('-'),
            std::process::id() % 0xfff,
            nanos % 0xfffff
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {NAMESPACE_LABEL: "true"}},
        }))?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        // Pods need the namespace's default ServiceAccount (created by the controller-manager).
        let sa_api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        wait_until(
            &format!("ServiceAccount default in {name}"),
            SERVICE_ACCOUNT_DEADLINE,
            || async { Ok(sa_api.get_opt("default").await?.map(|_| ())) },
        )
        .await?;
        Ok(TestNamespace {
            name,
            client: self.client.clone(),
            _shared_lock: shared_lock,
        })
    }

    /// Names of all nodes, sorted.
    pub async fn node_names(&self) -> Result<Vec<String>> {
        let nodes = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let mut names: Vec<String> = nodes
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether node `name` has condition Ready=True.
    pub async fn node_ready(&self, name: &str) -> Result<bool> {
        let node = Api::<Node>::all(self.client.clone()).get(name).await?;
        Ok(node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    }

    /// Runs `kubectl ARGS...` with this cluster's kubeconfig; returns stdout, fails unless exit 0.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        run_ok(&kubectl_path(), args, None).await
    }

    /// Runs `kubectl ARGS...` with `stdin` fed to it.
    pub async fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        run_ok(&kubectl_path(), args, Some(stdin)).await
    }

    /// `kubectl apply -f -` of `yaml` (into namespace `ns` if given).
    pub async fn apply_yaml(&self, ns: Option<&str>, yaml: &str) -> Result<String> {
        let mut args = vec!["apply", "-f", "-"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.kubectl_stdin(&args, yaml).await
    }

    /// `kubectl exec -n NS POD -- CMD...`; returns stdout.
    pub async fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", "-n", ns, pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args).await
    }

    /// The logs of a pod's (only) container, through the API.
    pub async fn logs(&self, ns: &str, pod: &str) -> Result<String> {
        Ok(Api::<Pod>::namespaced(self.client.clone(), ns)
            .logs(pod, &LogParams::default())
            .await?)
    }

    /// Creates a pod from its JSON form.
    pub async fn create_pod(&self, ns: &str, pod: serde_json::Value) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(pod)?;
        Ok(Api::<Pod>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await?)
    }

    /// Waits until the pod is Running with all containers ready; the error tells why not.
    pub async fn wait_pod_ready(&self, ns: &str, name: &str, timeout: Duration) -> Result<Pod> {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        wait_until(&format!("pod {ns}/{name} ready"), timeout, || async {
            let pod = api.get(name).await?;
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if status.phase.as_deref() == Some("Running") && ready {
                return Ok(Some(pod));
            }
            Err(anyhow!("{}", pod_summary(&pod)))
        })
        .await
    }

    /// Asserts (through `cluster mcast-check`) that no multicast left by the default-route interface.
    pub async fn assert_no_multicast_leak(&self) -> Result<()> {
        let out = run(&cluster_script(), &["mcast-check"], None).await?;
        if !out.status.success() {
            bail!(
                "multicast guard: {}{}",
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        println!("{}", out.stdout.trim());
        Ok(())
    }
}

/// One line about a pod's state: phase, node and each container's waiting/terminated reason.
pub fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let mut s = format!(
        "phase={} node={}",
        status.phase.as_deref().unwrap_or("?"),
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("-")
    );
    for cs in status.container_statuses.unwrap_or_default() {
        let state = cs.state.unwrap_or_default();
        if let Some(w) = state.waiting {
            s += &format!(
                " {}: waiting {} {}",
                cs.name,
                w.reason.unwrap_or_default(),
                w.message.unwrap_or_default()
            );
        } else if let Some(t) = state.terminated {
            s += &format!(
                " {}: terminated {} exit {}",
                cs.name,
                t.reason.unwrap_or_default(),
                t.exit_code
            );
        } else {
            s += &format!(" {}: running ready={}", cs.name, cs.ready);
        }
    }
    for c in status.conditions.unwrap_or_default() {
        if c.status != "True"
            && let Some(m) = c.message
        {
            s += &format!(" [{}: {m}]", c.type_);
        }
    }
    s
}

/// JSON of a pod running the test broker (serving its environment on [`BROKER_PORT`]), with a
/// readiness probe on `/healthz`. `node` pins it to a node by the `kubernetes.io/hostname` label.
pub fn broker_pod(name: &str, labels: serde_json::Value, node: Option<&str>) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "broker",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "env": [
                    {"name": "BROKER_PORT", "value": BROKER_PORT.to_string()},
                    {"name": "VERGE_TEST_MARKER", "value": name},
                ],
                "ports": [{"containerPort": BROKER_PORT, "name": "http"}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": BROKER_PORT},
                    "periodSeconds": 1,
                },
            }],
        },
    });
    if let Some(node) = node {
        pod["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": node});
    }
    pod
}

/// A namespace owned by one test; deleted (without waiting) when dropped, also on panic. On panic
/// it first prints the namespace's pods and events to help the post-mortem.
pub struct TestNamespace {
    name: String,
    client: Client,
    _shared_lock: Option<std::fs::File>,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client (same as the cluster's).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Deletes the namespace now and waits until it is gone.
    pub async fn delete(self, timeout: Duration) -> Result<()> {
        let api = Api::<Namespace>::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::default()).await?;
        let name = self.name.clone();
        wait_until(&format!("namespace {name} deleted"), timeout, || async {
            Ok(api.get_opt(&name).await?.is_none().then_some(()))
        })
        .await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let kubectl = kubectl_path();
        let kubeconfig = kubeconfig_path();
        if std::thread::panicking()
            && let Ok(out) = std::process::Command::new(&kubectl)
                .env("KUBECONFIG", &kubeconfig)
                .args(["get", "pods,events", "-o", "wide", "-n", &self.name])
                .output()
        {
            eprintln!(
                "--- namespace {} at failure:\n{}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::process::Command::new(&kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
