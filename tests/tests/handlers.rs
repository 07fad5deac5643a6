//! External discovery handlers against a real agent (issue 12): the Rust
//! example (`examples/rust-handler`, on the SDK) and the Python example
//! (`examples/python-handler`, grpcio, a `v0` proto transcribed from the
//! contract) each run as processes, register with a host-process agent and
//! produce Instances and broker pods (started by a host-process controller)
//! whose environment holds the device's properties; killed, their devices stay
//! through the grace; restarted,
//! they re-register within a second and the same Instances are kept; when the
//! agent restarts they re-register within 2 s on their own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::agent::{Agent, ensure_crds};
use verge_e2e::controller::ControllerProcess;
use verge_e2e::{BROKER_IMAGE, Cluster, repo_root, report_time, wait_until};

const NODE: &str = "verge-node-1";
const DEADLINE: Duration = Duration::from_secs(90);
/// The Configurations' grace (annotation `akri.sh/device-grace-period`).
const GRACE: &str = "20s";
/// How long a killed handler stays down (well inside the grace).
const DOWN_FOR: Duration = Duration::from_secs(3);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/verge/target")
        })
}

fn venv_python() -> PathBuf {
    std::env::var_os("VERGE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/verge/venv")
        })
        .join("bin/python")
}

/// How to start one example handler.
struct HandlerSpec {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
}

/// A running handler process; its stderr goes to `log`.
struct Handler {
    spec: HandlerSpec,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Handler {
    fn start(spec: HandlerSpec, dir: &Path, log: PathBuf) -> Result<Handler> {
        let mut h = Handler {
            spec,
            dir: dir.to_path_buf(),
            log,
            child: None,
        };
        h.spawn()?;
        Ok(h)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.spec.program)
            .args(&self.spec.args)
            .env("DISCOVERY_HANDLERS_DIRECTORY", &self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.spec.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash: the handler gets no chance to clean up.
    async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Still the same process (not exited).
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} handler log ---\n{}",
                self.spec.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The agent's log without ANSI colour sequences.
fn agent_log(agent: &Agent) -> String {
    let text = agent.log_text();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Number of registrations of `handler` in the agent's log so far.
fn registrations(agent: &Agent, handler: &str) -> usize {
    let needle = format!("handler={handler} ");
    agent_log(agent)
        .lines()
        .filter(|l| l.contains("handler registered") && l.contains(&needle))
        .count()
}

fn sockets_ready(agent: &Agent) -> usize {
    agent
        .log_text()
        .matches("registration socket ready")
        .count()
}

/// Waits (polling the agent's log every 20 ms) until `count` exceeds `before`.
async fn wait_log(
    what: &str,
    timeout: Duration,
    before: usize,
    count: impl Fn() -> usize,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if count() > before {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn instance_uids(c: &Cluster, ns: &str, config: &str) -> Result<BTreeSet<String>> {
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|i| i.spec.configuration_name == config)
        .filter_map(|i| i.uid())
        .collect())
}

async fn wait_instances(c: &Cluster, ns: &str, config: &str, n: usize) -> Result<BTreeSet<String>> {
    wait_until(&format!("{n} Instances of {config}"), DEADLINE, || async {
        let uids = instance_uids(c, ns, config).await?;
        Ok((uids.len() == n).then_some(uids))
    })
    .await
}

fn configuration(name: &str, handler: &str, details: &str) -> String {
    let details: String = details.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
  annotations:
    akri.sh/device-grace-period: \"{GRACE}\"
spec:
  discoveryHandler:
    name: {handler}
    discoveryDetails: |
{details}  capacity: 1
  brokerSpec:
    brokerPodSpec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: broker
        image: {BROKER_IMAGE}
        imagePullPolicy: Never
        resources:
          requests: {{\"{{{{PLACEHOLDER}}}}\": \"1\"}}
          limits: {{\"{{{{PLACEHOLDER}}}}\": \"1\"}}
"
    )
}

/// Waits until `config` has `n` Running broker pods whose logs (the test broker prints its
/// environment) hold `property`; returns the pods' names.
async fn wait_brokers(
    c: &Cluster,
    ns: &str,
    config: &str,
    n: usize,
    property: &str,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let selector = format!("akri.sh/configuration={config}");
    wait_until(
        &format!("{n} Running brokers of {config} with {property} in their env"),
        DEADLINE,
        || async {
            let mut ready = Vec::new();
            for pod in pods.list(&ListParams::default().labels(&selector)).await? {
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let name = pod.name_any();
                if running
                    && c.logs(ns, &name)
                        .await
                        .unwrap_or_default()
                        .lines()
                        // NAME_<INSTANCE HASH>=…: the agent suffixes every property (Akri's naming).
                        .any(|l| l.starts_with(&format!("{property}_")) && l.contains('='))
                {
                    ready.push(name);
                }
            }
            Ok((ready.len() == n).then_some(ready))
        },
    )
    .await
}

/// The whole story for one handler. `add_device` makes the handler find one
/// more device (proving discovery is live again after a restart).
async fn handler_lifecycle(
    c: &Cluster,
    label: &str,
    spec: HandlerSpec,
    details: &str,
    property: &str,
    add_device: impl Fn() -> Result<()>,
) -> Result<()> {
    ensure_crds(c).await?;
    let ns = c.namespace(&format!("handlers-{label}")).await?;
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    agent.wait_up(DEADLINE).await?;
    let controller = ControllerProcess::start(c, ns.name(), "ctl", &[]).await?;
    let name = spec.name;
    let log = agent
        .handlers_dir
        .with_file_name(format!("{label}-handler.log"));

    // Register and produce Instances.
    let t = Instant::now();
    let mut handler = Handler::start(spec, &agent.handlers_dir, log)?;
    wait_log("the handler's registration", DEADLINE, 0, || {
        registrations(&agent, name)
    })
    .await?;
    report_time(&format!("{label}: start → registered"), t);
    c.apply_yaml(Some(ns.name()), &configuration("ext", name, details))
        .await?;
    let uids = wait_instances(c, ns.name(), "ext", 2).await?;
    report_time(&format!("{label}: start → 2 Instances"), t);
    let brokers = wait_brokers(c, ns.name(), "ext", 2, property)
        .await
        .with_context(|| format!("controller log:\n{}", controller.log_tail()))?;
    report_time(
        &format!("{label}: start → 2 brokers Running with {property}"),
        t,
    );

    // Killed: the devices stay through the grace.
    handler.kill().await?;
    let killed = Instant::now();
    while killed.elapsed() < DOWN_FOR {
        let now = instance_uids(c, ns.name(), "ext").await?;
        ensure!(
            now == uids,
            "Instances changed {:?} after the handler was killed (grace {GRACE})",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Restarted: re-registered within a second, same Instances kept.
    add_device()?;
    let before = registrations(&agent, name);
    let t = Instant::now();
    handler.spawn()?;
    let registered = wait_log(
        "re-registration of the restarted handler",
        DEADLINE,
        before,
        || registrations(&agent, name),
    )
    .await?;
    let took = registered - t;
    report_time(&format!("{label}: handler restart → re-registered"), t);
    ensure!(
        took <= Duration::from_secs(1),
        "re-registration took {took:?} (> 1s)"
    );
    let now = wait_instances(c, ns.name(), "ext", 3).await?;
    report_time(
        &format!("{label}: handler restart → new device's Instance"),
        t,
    );
    ensure!(
        now.is_superset(&uids),
        "Instances replaced after the handler restart: {uids:?} → {now:?}"
    );
    ensure!(
        killed.elapsed() < Duration::from_secs(20),
        "the test outlasted the grace; the kept Instances prove nothing"
    );
    let uids = now;

    // Agent restarted: the same handler process re-registers within 2 s.
    let before = registrations(&agent, name);
    let ready_before = sockets_ready(&agent);
    let t = Instant::now();
    agent.restart().await?;
    let ready = wait_log(
        "the new agent's registration socket",
        DEADLINE,
        ready_before,
        || sockets_ready(&agent),
    )
    .await?;
    let registered = wait_log(
        "re-registration with the new agent",
        DEADLINE,
        before,
        || registrations(&agent, name),
    )
    .await?;
    report_time(
        &format!("{label}: agent restart → handler re-registered"),
        t,
    );
    let took = registered.saturating_duration_since(ready);
    uncaptured_line(&format!(
        "[e2e] {label}: agent socket ready → handler re-registered: {:.2}s",
        took.as_secs_f64()
    ));
    ensure!(
        took <= Duration::from_secs(2),
        "the handler re-registered {took:?} after the agent's socket was ready (> 2s)"
    );
    ensure!(handler.running(), "the handler process did not survive");
    agent.wait_up(DEADLINE).await?;
    // Discovery flows through the new agent: one more device, old ones kept.
    add_device()?;
    let now = wait_instances(c, ns.name(), "ext", 4).await?;
    report_time(
        &format!("{label}: agent restart → new device's Instance"),
        t,
    );
    ensure!(
        now.is_superset(&uids),
        "Instances replaced after the agent restart: {uids:?} → {now:?}"
    );
    // Every device has its broker, and the first brokers were never replaced.
    let all = wait_brokers(c, ns.name(), "ext", 4, property).await?;
    report_time(&format!("{label}: agent restart → 4 brokers Running"), t);
    ensure!(
        brokers.iter().all(|b| all.contains(b)),
        "brokers replaced across the restarts: {brokers:?} → {all:?}"
    );

    handler.kill().await?;
    agent.stop().await?;
    drop(ns);
    Ok(())
}

fn uncaptured_line(line: &str) {
    verge_e2e::uncaptured(line);
}

/// A fresh directory for a test's files.
fn scratch(label: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "verge-e2e-handlers-{label}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn rust_example_handler_lifecycle() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let program = target_dir().join("debug/verge-example-handler");
    ensure!(
        program.exists(),
        "{} is missing; run `cargo build --workspace --bins`",
        program.display()
    );
    let files = scratch("rust")?;
    for f in ["a.dev", "b.dev", "ignored.txt"] {
        std::fs::write(files.join(f), "")?;
    }
    let details = format!("directory: {}\npattern: \"*.dev\"", files.display());
    let next = std::sync::atomic::AtomicU32::new(0);
    let add = || -> Result<()> {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(files.join(format!("new{n}.dev")), "")?;
        Ok(())
    };
    let spec = HandlerSpec {
        name: "fileGlob",
        program,
        args: vec![],
    };
    let result = handler_lifecycle(&c, "rust", spec, &details, "FILE_GLOB_PATH", add).await;
    let _ = std::fs::remove_dir_all(&files);
    result
}

#[tokio::test]
async fn python_example_handler_lifecycle() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let python = venv_python();
    ensure!(
        python.exists(),
        "the Python example's venv is missing ({}): run examples/python-handler/setup.sh",
        python.display()
    );
    let script = repo_root().join("examples/python-handler/handler.py");
    let files = scratch("python")?;
    let inventory = files.join("inventory.txt");
    std::fs::write(&inventory, "# site cameras\n10.9.0.1\n10.9.0.2\n")?;
    let details = format!("{{\"inventoryFile\": \"{}\"}}", inventory.display());
    let next = std::sync::atomic::AtomicU32::new(3);
    let add = || -> Result<()> {
        use std::io::Write;
        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut f = std::fs::OpenOptions::new().append(true).open(&inventory)?;
        writeln!(f, "10.9.0.{n}")?;
        Ok(())
    };
    let spec = HandlerSpec {
        name: "inventory",
        program: python,
        args: vec![script.display().to_string()],
    };
    let result = handler_lifecycle(&c, "python", spec, &details, "INVENTORY_ADDRESS", add).await;
    let _ = std::fs::remove_dir_all(&files);
    result
}
