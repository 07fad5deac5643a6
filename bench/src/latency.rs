//! `latency`: a debugEcho device goes online → Instance → kubelet → Node → broker Running; and
//! offline → Instance gone → withdrawn from kubelet, with grace 0 and with the default grace.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use verge_crds::naming;

use crate::common::*;
use crate::report::{Plot, Report, Row, Stat, Target};

const LAT_CONFIG: &str = "vg-bench-lat";
const GRACE_CONFIG: &str = "vg-bench-grace";
/// Polling periods: kubelet is local and cheap; the API server is shared.
const KUBELET_POLL: Duration = Duration::from_millis(5);
const TRACKER_POLL: Duration = Duration::from_millis(1);
const API_POLL: Duration = Duration::from_millis(50);
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default grace is 30 s (chart `agent.deviceGracePeriod`); allow for it plus slack.
const GRACE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Online/offline cycles with grace 0 (each waits for the Node to drop the resource, ~10-20 s).
    #[arg(long, default_value_t = 8)]
    pub reps: usize,
    /// Offline cycles with the default grace period (each takes the grace period, 30 s).
    #[arg(long, default_value_t = 2)]
    pub grace_reps: usize,
    /// Modbus TCP cycles at the handler's default rescan interval (each takes up to two intervals).
    #[arg(long, default_value_t = 4)]
    pub modbus_reps: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until the Instance appears in the watch after `t0`; its arrival time.
async fn instance_created(t: &InstanceTracker, name: &str, t0: Instant) -> Result<Duration> {
    let (_, at) = poll(
        "Instance created",
        t0,
        TRACKER_POLL,
        STAGE_TIMEOUT,
        || async {
            Ok(t.get(name)
                .and_then(|s| s.created.filter(|c| *c >= t0 && s.deleted.is_none())))
        },
    )
    .await?;
    Ok(at - t0)
}

async fn instance_deleted(
    t: &InstanceTracker,
    name: &str,
    t0: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let (_, at) = poll("Instance deleted", t0, TRACKER_POLL, timeout, || async {
        Ok(t.get(name).and_then(|s| s.deleted.filter(|d| *d >= t0)))
    })
    .await?;
    Ok(at - t0)
}

/// Until kubelet does (`present`) or does not list `id` under `resource`.
async fn kubelet_has(
    node: &str,
    resource: &str,
    id: &str,
    present: bool,
    t0: Instant,
    timeout: Duration,
) -> Result<Duration> {
    Kubelet::new(node)
        .wait("slot listed or not", t0, KUBELET_POLL, timeout, |view| {
            view.get(resource).is_some_and(|ids| ids.contains(id)) == present
        })
        .await
}

async fn broker_running(ctx: &Ctx, instance: &str, t0: Instant) -> Result<Duration> {
    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let lp = ListParams::default().labels(&format!("{}={instance}", naming::LABEL_INSTANCE));
    let (d, _) = poll(
        "broker pod Running",
        t0,
        API_POLL,
        STAGE_TIMEOUT,
        || async {
            let list = pods.list(&lp).await?;
            Ok(list
                .items
                .iter()
                .any(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .then_some(()))
        },
    )
    .await?;
    Ok(d)
}

/// Before a cycle: no broker left and the Node no longer shows the resource.
async fn quiesce(ctx: &Ctx, instance: &str, resource: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let lp = ListParams::default().labels(&format!("{}={instance}", naming::LABEL_INSTANCE));
    let t0 = Instant::now();
    poll("old broker gone", t0, API_POLL, STAGE_TIMEOUT, || async {
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await?;
    poll(
        "Node drops the resource",
        t0,
        Duration::from_millis(200),
        STAGE_TIMEOUT,
        || async { Ok((node_allocatable(ctx, resource).await? == 0).then_some(())) },
    )
    .await?;
    Ok(())
}

pub async fn run(ctx: &Ctx, o: &Opts) -> Result<Report> {
    let started = Instant::now();
    let agent = agent_pod(ctx).await?;
    let tracker = InstanceTracker::start(ctx).await?;
    let period = node_status_period(&ctx.node);
    let desc = vec!["lat-0".to_string()];
    let host_file = agent.tmp_dir.join("vg-bench-lat.txt");
    set_online(&host_file, false)?;
    apply(
        &ctx.cluster,
        &echo_configuration(
            LAT_CONFIG,
            &desc,
            "/tmp/vg-bench-lat.txt",
            1,
            Some("0s"),
            true,
        ),
    )
    .await?;
    let inst = naming::instance_name(LAT_CONFIG, "lat-0", true, &ctx.node);
    let res = naming::configuration_resource_name(LAT_CONFIG);
    let slot = naming::slot_id(&inst, 0);

    let mut to_instance = Vec::new();
    let mut to_kubelet = Vec::new();
    let mut to_node = Vec::new();
    let mut to_broker = Vec::new();
    let mut off_instance = Vec::new();
    let mut off_kubelet = Vec::new();
    let mut failures = Vec::new();
    // Cycle 0 warms up (discovery stream open, broker image cached) and is not counted.
    for rep in 0..=o.reps {
        if let Err(e) = quiesce(ctx, &inst, &res).await {
            failures.push(format!("cycle {rep}: quiesce: {e:#}"));
            continue;
        }
        let t0 = Instant::now();
        set_online(&host_file, true)?;
        let (a, b, c, d) = tokio::join!(
            instance_created(&tracker, &inst, t0),
            kubelet_has(&ctx.node, &res, &slot, true, t0, STAGE_TIMEOUT),
            poll(
                "Node shows the resource",
                t0,
                API_POLL,
                STAGE_TIMEOUT,
                || async { Ok((node_allocatable(ctx, &res).await? >= 1).then_some(())) }
            ),
            broker_running(ctx, &inst, t0),
        );
        let t1 = Instant::now();
        set_online(&host_file, false)?;
        let (e, f) = tokio::join!(
            instance_deleted(&tracker, &inst, t1, STAGE_TIMEOUT),
            kubelet_has(&ctx.node, &res, &slot, false, t1, STAGE_TIMEOUT),
        );
        if rep == 0 {
            eprintln!("latency: warm-up cycle done");
            continue;
        }
        match (a, b, c, d, e, f) {
            (Ok(a), Ok(b), Ok((c, _)), Ok(d), Ok(e), Ok(f)) => {
                eprintln!(
                    "latency {rep}/{}: instance {:.0} ms, kubelet {:.0} ms, node {:.0} ms, broker {:.0} ms; offline: instance gone {:.0} ms, withdrawn {:.0} ms",
                    o.reps,
                    ms(a),
                    ms(b),
                    ms(c),
                    ms(d),
                    ms(e),
                    ms(f)
                );
                to_instance.push(ms(a));
                to_kubelet.push(ms(b));
                to_node.push(ms(c));
                to_broker.push(ms(d));
                off_instance.push(ms(e));
                off_kubelet.push(ms(f));
            }
            (a, b, c, d, e, f) => {
                let errs: Vec<String> = [a.err(), b.err(), c.err(), d.err(), e.err(), f.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{e:#}"))
                    .collect();
                eprintln!("latency {rep}: {}", errs.join("; "));
                failures.push(format!("cycle {rep}: {}", errs.join("; ")));
            }
        }
    }
    if to_instance.is_empty() {
        bail!("no latency cycle completed: {}", failures.join(" | "));
    }
    let timeouts = failures.len();
    let config_api: Api<verge_crds::Configuration> = Api::namespaced(ctx.client(), NS);
    let _ = config_api.delete(LAT_CONFIG, &Default::default()).await;

    // Default grace: the Configuration carries no annotation, the agent's --device-grace-period applies.
    let mut grace_instance = Vec::new();
    let mut grace_kubelet = Vec::new();
    let mut grace_failures = 0;
    if o.grace_reps > 0 {
        let gfile = agent.tmp_dir.join("vg-bench-grace.txt");
        set_online(&gfile, false)?;
        let gdesc = vec!["grace-0".to_string()];
        apply(
            &ctx.cluster,
            &echo_configuration(
                GRACE_CONFIG,
                &gdesc,
                "/tmp/vg-bench-grace.txt",
                1,
                None,
                false,
            ),
        )
        .await?;
        let ginst = naming::instance_name(GRACE_CONFIG, "grace-0", true, &ctx.node);
        let gres = naming::configuration_resource_name(GRACE_CONFIG);
        let gslot = naming::slot_id(&ginst, 0);
        for rep in 1..=o.grace_reps {
            let t0 = Instant::now();
            set_online(&gfile, true)?;
            let up = tokio::join!(
                instance_created(&tracker, &ginst, t0),
                kubelet_has(&ctx.node, &gres, &gslot, true, t0, STAGE_TIMEOUT),
            );
            if let (Err(e), _) | (_, Err(e)) = up {
                grace_failures += 1;
                eprintln!("grace {rep}: online: {e:#}");
                continue;
            }
            let t1 = Instant::now();
            set_online(&gfile, false)?;
            let (e, f) = tokio::join!(
                instance_deleted(&tracker, &ginst, t1, GRACE_TIMEOUT),
                kubelet_has(&ctx.node, &gres, &gslot, false, t1, GRACE_TIMEOUT),
            );
            match (e, f) {
                (Ok(e), Ok(f)) => {
                    eprintln!(
                        "grace {rep}/{}: instance gone {:.2} s, withdrawn {:.2} s",
                        o.grace_reps,
                        e.as_secs_f64(),
                        f.as_secs_f64()
                    );
                    grace_instance.push(e.as_secs_f64());
                    grace_kubelet.push(f.as_secs_f64());
                }
                (e, f) => {
                    grace_failures += 1;
                    eprintln!("grace {rep}: {:?} {:?}", e.err(), f.err());
                }
            }
        }
        let _ = config_api.delete(GRACE_CONFIG, &Default::default()).await;
    }

    let modbus = if o.modbus_reps > 0 {
        match crate::latency_modbus::run(ctx, &tracker, o.modbus_reps).await {
            Ok(f) => f,
            Err(e) => crate::latency_modbus::Figures {
                failures: vec![format!("modbus: {e:#}")],
                ..Default::default()
            },
        }
    } else {
        crate::latency_modbus::Figures::default()
    };

    let period_ms = period
        .as_deref()
        .and_then(|p| p.strip_suffix('s'))
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| s * 1000.0);
    let p95 = |limit| {
        Some(Target {
            stat: Stat::P95,
            limit,
        })
    };
    let rows = vec![
        Row::with_timeouts(
            "online -> Instance exists (watch)",
            "ms",
            to_instance,
            p95(100.0),
            timeouts,
        ),
        Row::with_timeouts(
            "online -> kubelet allocatable (pod-resources)",
            "ms",
            to_kubelet,
            p95(1000.0),
            timeouts,
        ),
        Row::with_timeouts(
            "online -> Node status.allocatable",
            "ms",
            to_node,
            period_ms.map(|l| Target {
                stat: Stat::Max,
                limit: l + 1000.0,
            }),
            timeouts,
        ),
        Row::with_timeouts(
            "online -> broker pod Running",
            "ms",
            to_broker,
            None,
            timeouts,
        ),
        Row::with_timeouts(
            "offline (grace 0) -> Instance gone",
            "ms",
            off_instance,
            None,
            timeouts,
        ),
        Row::with_timeouts(
            "offline (grace 0) -> withdrawn from kubelet",
            "ms",
            off_kubelet,
            p95(1000.0),
            timeouts,
        ),
        Row::with_timeouts(
            "offline (default grace) -> Instance gone",
            "s",
            grace_instance,
            None,
            grace_failures,
        ),
        Row::with_timeouts(
            "offline (default grace) -> withdrawn from kubelet",
            "s",
            grace_kubelet,
            None,
            grace_failures,
        ),
    ];
    let mut notes = vec![
        format!(
            "kubelet nodeStatusUpdateFrequency = {} (read from the harness's kubelet config); the Node target is one period (+1 s of polling slack)",
            period.as_deref().unwrap_or("unknown (default 10s)")
        ),
        "withdrawn = the slot id is gone from akri.sh/<configuration> in GetAllocatableResources"
            .into(),
        format!(
            "Modbus (polled): a unit is found at the next scan, so answers -> Instance is bounded by rescanIntervalSeconds ({} s by default for modbus-tcp, left unset here) plus one scan pass",
            crate::latency_modbus::DEFAULT_RESCAN.as_secs()
        ),
    ];
    notes.extend(failures.iter().cloned());
    notes.extend(modbus.failures.iter().cloned());
    let mut rows = rows;
    rows.extend(modbus.rows());
    let plot = Plot {
        title: "debugEcho online/offline latency per cycle".into(),
        x_label: "cycle".into(),
        y_label: "ms".into(),
        series: crate::report::per_rep(&rows.iter().take(6).collect::<Vec<_>>()),
    };
    let report = Report {
        scenario: "latency".into(),
        started_unix: crate::unix_now(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine(),
        settings: serde_json::json!({
            "reps": o.reps, "grace_reps": o.grace_reps, "modbus_reps": o.modbus_reps, "node": ctx.node,
            "node_status_update_frequency": period,
            "kubelet_poll_ms": KUBELET_POLL.as_millis() as u64, "api_poll_ms": API_POLL.as_millis() as u64,
            "default_grace": "chart agent.deviceGracePeriod (30s)",
        }),
        rows,
        extra: serde_json::json!({}),
        notes,
    };
    report.finish(&ctx.out_dir, &plot)?;
    Ok(report)
}
