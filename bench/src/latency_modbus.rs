//! The polled handler in `latency`: a Modbus TCP unit (pymodbus in a device-LAN namespace, the
//! same peer as the e2e test) starts answering → Instance → kubelet; stops → Instance gone →
//! withdrawn from kubelet, with the handler at its default rescan interval and grace 0.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::process::{Child, Command};
use verge_crds::naming;
use verge_e2e::protocol::{LanHost, venv_python};

use crate::common::*;
use crate::report::Row;

const CONFIG: &str = "vg-bench-modbus";
const LAN_NS: &str = "vg-mb-bench";
const LAN_IP: &str = "10.204.0.95";
const PORT: u16 = 502;
/// modbus-tcp's default `rescanIntervalSeconds`; the Configuration leaves it unset.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(60);
/// One rescan interval, a scan pass and slack.
const STAGE_TIMEOUT: Duration = Duration::from_secs(150);
const POLL: Duration = Duration::from_millis(20);

/// Seconds per completed cycle, and what failed.
#[derive(Default)]
pub struct Figures {
    pub to_instance: Vec<f64>,
    pub to_kubelet: Vec<f64>,
    pub off_instance: Vec<f64>,
    pub off_kubelet: Vec<f64>,
    pub failures: Vec<String>,
}

impl Figures {
    pub fn rows(&self) -> Vec<Row> {
        let n = self.failures.len();
        vec![
            Row::with_timeouts(
                "Modbus unit answers -> Instance exists",
                "s",
                self.to_instance.clone(),
                None,
                n,
            ),
            Row::with_timeouts(
                "Modbus unit answers -> kubelet allocatable",
                "s",
                self.to_kubelet.clone(),
                None,
                n,
            ),
            Row::with_timeouts(
                "Modbus unit silent (grace 0) -> Instance gone",
                "s",
                self.off_instance.clone(),
                None,
                n,
            ),
            Row::with_timeouts(
                "Modbus unit silent (grace 0) -> withdrawn from kubelet",
                "s",
                self.off_kubelet.clone(),
                None,
                n,
            ),
        ]
    }
}

fn configuration() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {
            "name": CONFIG,
            "namespace": NS,
            "labels": {BENCH_LABEL: "true"},
            "annotations": {GRACE_ANNOTATION: "0s"},
        },
        "spec": {
            "discoveryHandler": {
                "name": "modbus-tcp",
                "discoveryDetails": format!("hosts: [{LAN_IP}]\nports: [{PORT}]\nunitIds: [\"1\"]\n"),
            },
            "capacity": 1,
        }
    })
}

/// Starts the pymodbus server with unit 1 and returns once it accepts connections.
async fn start_unit(python: &Path) -> Result<Child> {
    let spec = serde_json::json!({
        "tcp": format!("{LAN_IP}:{PORT}"),
        "missing": "gateway",
        "units": {"1": {"identity": {"0": "Verge", "1": "BENCH-1", "2": "1.0"}, "hr": {"0": [1]}}}
    });
    let child = Command::new("ip")
        .args(["netns", "exec", LAN_NS])
        .arg(python)
        .arg(verge_e2e::repo_root().join("tests/peers/modbus/server.py"))
        .arg(spec.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("pymodbus server (run tests/peers/modbus/setup.sh)")?;
    poll(
        "pymodbus listening",
        Instant::now(),
        POLL,
        Duration::from_secs(30),
        || async {
            Ok(tokio::net::TcpStream::connect((LAN_IP, PORT))
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await?;
    Ok(child)
}

/// The Instance of `CONFIG` created after `t0`, and how long after.
async fn instance_after(t: &InstanceTracker, t0: Instant) -> Result<(String, Duration)> {
    let (_, (name, at)) = poll("Modbus Instance", t0, POLL, STAGE_TIMEOUT, || async {
        let seen = t.seen.lock().unwrap_or_else(|p| p.into_inner());
        Ok(seen
            .iter()
            .filter(|(n, _)| n.starts_with(CONFIG))
            .find_map(|(n, s)| {
                s.created
                    .filter(|c| *c >= t0 && s.deleted.is_none())
                    .map(|c| (n.clone(), c))
            }))
    })
    .await?;
    Ok((name, at - t0))
}

async fn instance_gone(t: &InstanceTracker, name: &str, t0: Instant) -> Result<Duration> {
    let (_, at) = poll(
        "Modbus Instance deleted",
        t0,
        POLL,
        STAGE_TIMEOUT,
        || async { Ok(t.get(name).and_then(|s| s.deleted.filter(|d| *d >= t0))) },
    )
    .await?;
    Ok(at - t0)
}

/// `reps` cycles of the unit answering and going silent.
pub async fn run(ctx: &Ctx, tracker: &InstanceTracker, reps: usize) -> Result<Figures> {
    let python = venv_python("modbus");
    let _lan = LanHost::create(LAN_NS, &[LAN_IP]).await?;
    apply(&ctx.cluster, &configuration()).await?;
    let resource = naming::configuration_resource_name(CONFIG);
    let mut f = Figures::default();
    for rep in 1..=reps {
        let unit = start_unit(&python).await?;
        let t0 = Instant::now();
        let (name, to_instance) = match instance_after(tracker, t0).await {
            Ok(found) => found,
            Err(e) => {
                f.failures.push(format!("modbus cycle {rep}: {e:#}"));
                continue;
            }
        };
        let slot = naming::slot_id(&name, 0);
        let to_kubelet = Kubelet::new(&ctx.node)
            .wait("Modbus slot listed", t0, POLL, STAGE_TIMEOUT, |view| {
                view.get(&resource).is_some_and(|ids| ids.contains(&slot))
            })
            .await;
        drop(unit);
        let t1 = Instant::now();
        let mut kubelet = Kubelet::new(&ctx.node);
        let (off_instance, off_kubelet) = tokio::join!(
            instance_gone(tracker, &name, t1),
            kubelet.wait("Modbus slot withdrawn", t1, POLL, STAGE_TIMEOUT, |view| {
                !view.get(&resource).is_some_and(|ids| ids.contains(&slot))
            }),
        );
        match (to_kubelet, off_instance, off_kubelet) {
            (Ok(b), Ok(c), Ok(d)) => {
                eprintln!(
                    "modbus {rep}/{reps}: instance {:.1} s, kubelet {:.1} s; silent: instance gone {:.1} s, withdrawn {:.1} s",
                    to_instance.as_secs_f64(),
                    b.as_secs_f64(),
                    c.as_secs_f64(),
                    d.as_secs_f64()
                );
                f.to_instance.push(to_instance.as_secs_f64());
                f.to_kubelet.push(b.as_secs_f64());
                f.off_instance.push(c.as_secs_f64());
                f.off_kubelet.push(d.as_secs_f64());
            }
            (b, c, d) => {
                let errs: Vec<String> = [b.err(), c.err(), d.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{e:#}"))
                    .collect();
                f.failures
                    .push(format!("modbus cycle {rep}: {}", errs.join("; ")));
            }
        }
    }
    let configs: kube::Api<verge_crds::Configuration> = kube::Api::namespaced(ctx.client(), NS);
    let _ = configs.delete(CONFIG, &Default::default()).await;
    Ok(f)
}
