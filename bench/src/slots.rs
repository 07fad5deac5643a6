//! `slots`: a pod holding `akri.sh/<configuration>` is deleted → time until the waiting pod runs;
//! pods rejected at admission along the way (must be zero).

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use verge_crds::naming;

use crate::common::*;
use crate::report::{Plot, Report, Row, Stat, Target};

const CONFIG: &str = "vg-bench-slots";
const POD_LABEL: &str = "verge.dev/bench-slots";
const POLL: Duration = Duration::from_millis(25);
const TIMEOUT: Duration = Duration::from_secs(90);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Handovers to measure.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
}

fn consumer(ctx: &Ctx, name: &str, resource: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {BENCH_LABEL: "true", POD_LABEL: "true"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "nodeSelector": {"kubernetes.io/hostname": ctx.node},
            "containers": [{
                "name": "c", "image": verge_e2e::BROKER_IMAGE, "imagePullPolicy": "Never",
                "resources": {"limits": {resource: "1"}},
            }],
        }
    })
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Pods of the benchmark that kubelet refused (phase Failed, e.g. `UnexpectedAdmissionError`).
fn rejected(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| phase(p) == "Failed")
        .map(|p| {
            format!(
                "{}: {} {}",
                p.metadata.name.as_deref().unwrap_or(""),
                p.status
                    .as_ref()
                    .and_then(|s| s.reason.as_deref())
                    .unwrap_or(""),
                p.status
                    .as_ref()
                    .and_then(|s| s.message.as_deref())
                    .unwrap_or("")
            )
        })
        .collect()
}

pub async fn run(ctx: &Ctx, o: &Opts) -> Result<Report> {
    let started = Instant::now();
    let agent = agent_pod(ctx).await?;
    let file = agent.tmp_dir.join("vg-bench-slots.txt");
    set_online(&file, true)?;
    apply(
        &ctx.cluster,
        &echo_configuration(
            CONFIG,
            &["slot-0".to_string()],
            "/tmp/vg-bench-slots.txt",
            1,
            Some("0s"),
            false,
        ),
    )
    .await?;
    let res = naming::configuration_resource_name(CONFIG);
    let t = Instant::now();
    Kubelet::new(&ctx.node)
        .wait("slot listed", t, Duration::from_millis(50), TIMEOUT, |v| {
            v.get(&res).is_some_and(|i| !i.is_empty())
        })
        .await?;
    poll(
        "Node shows the resource",
        t,
        Duration::from_millis(250),
        TIMEOUT,
        || async { Ok((node_allocatable(ctx, &res).await? >= 1).then_some(())) },
    )
    .await?;

    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let lp = ListParams::default().labels(POD_LABEL);
    let create = |i: usize| {
        let pod: Result<Pod, _> =
            serde_json::from_value(consumer(ctx, &format!("vg-bench-slot-{i}"), &res));
        let pods = pods.clone();
        async move { anyhow::Ok(pods.create(&PostParams::default(), &pod?).await?) }
    };
    create(0).await?;
    ctx.cluster
        .wait_pod_ready(NS, "vg-bench-slot-0", TIMEOUT)
        .await?;

    let mut handover = Vec::new();
    let mut to_gone = Vec::new();
    let mut to_scheduled = Vec::new();
    let mut failures = Vec::new();
    let mut rejections = Vec::new();
    for i in 1..=o.reps {
        let next = format!("vg-bench-slot-{i}");
        let prev = format!("vg-bench-slot-{}", i - 1);
        create(i).await?;
        // The newcomer must be waiting (unschedulable: the only slot is taken) before the holder goes.
        let waiting = poll(
            "newcomer unschedulable",
            Instant::now(),
            POLL,
            TIMEOUT,
            || async {
                let p = pods.get(&next).await?;
                let unsched = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                    });
                Ok(unsched.then_some(()))
            },
        )
        .await;
        if let Err(e) = waiting {
            failures.push(format!("handover {i}: {e:#}"));
            break;
        }
        let t0 = Instant::now();
        pods.delete(&prev, &DeleteParams::default()).await?;
        let mut gone = None;
        let mut scheduled = None;
        let r: Result<Duration> = loop {
            let list = match pods.list(&lp).await {
                Ok(l) => l.items,
                Err(e) if t0.elapsed() > TIMEOUT => break Err(e.into()),
                Err(_) => {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if gone.is_none()
                && !list
                    .iter()
                    .any(|p| p.metadata.name.as_deref() == Some(prev.as_str()))
            {
                gone = Some(t0.elapsed());
            }
            let me = list
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(next.as_str()));
            if scheduled.is_none()
                && me
                    .and_then(|p| p.spec.as_ref())
                    .and_then(|s| s.node_name.as_ref())
                    .is_some()
            {
                scheduled = Some(t0.elapsed());
            }
            for r in rejected(&list) {
                if !rejections.contains(&r) {
                    rejections.push(r);
                }
            }
            match me.map(phase) {
                Some("Running") => break Ok(t0.elapsed()),
                Some("Failed") => break Err(anyhow::anyhow!("{next} failed")),
                None => break Err(anyhow::anyhow!("{next} disappeared")),
                _ => {}
            }
            if t0.elapsed() > TIMEOUT {
                break Err(anyhow::anyhow!("{next} not Running after {TIMEOUT:?}"));
            }
            tokio::time::sleep(POLL).await;
        };
        match r {
            Ok(d) => {
                eprintln!(
                    "slots {i}/{}: handover {:.0} ms (holder gone {:.0} ms, newcomer scheduled {:.0} ms)",
                    o.reps,
                    d.as_secs_f64() * 1000.0,
                    gone.map(|g| g.as_secs_f64() * 1000.0).unwrap_or(f64::NAN),
                    scheduled
                        .map(|g| g.as_secs_f64() * 1000.0)
                        .unwrap_or(f64::NAN)
                );
                handover.push(d.as_secs_f64());
                if let Some(g) = gone {
                    to_gone.push(g.as_secs_f64());
                }
                if let Some(s) = scheduled {
                    to_scheduled.push(s.as_secs_f64());
                }
            }
            Err(e) => {
                eprintln!("slots {i}: {e:#}");
                failures.push(format!("handover {i}: {e:#}"));
                break;
            }
        }
    }
    let all = pods.list(&lp).await?.items;
    for r in rejected(&all) {
        if !rejections.contains(&r) {
            rejections.push(r);
        }
    }
    let rows = vec![
        Row::with_timeouts(
            "pod deleted -> next pod Running (handover)",
            "s",
            handover,
            Some(Target {
                stat: Stat::Max,
                limit: 2.0,
            }),
            failures.len(),
        ),
        Row::new(
            "pod deleted -> holder gone from the API",
            "s",
            to_gone,
            None,
        ),
        Row::new("pod deleted -> next pod scheduled", "s", to_scheduled, None),
        Row::new(
            "pods rejected at admission",
            "pods",
            vec![rejections.len() as f64],
            Some(Target {
                stat: Stat::Max,
                limit: 0.0,
            }),
        ),
    ];
    let mut notes = vec![format!(
        "one device, capacity 1; consumer pods request {res}: 1, terminationGracePeriodSeconds 1, deleted with the default grace"
    )];
    notes.extend(rejections.iter().map(|r| format!("rejected: {r}")));
    notes.extend(failures);
    let plot = Plot {
        title: "slot handover per repetition (s)".into(),
        x_label: "handover".into(),
        y_label: "seconds".into(),
        series: crate::report::per_rep(&rows.iter().take(3).collect::<Vec<_>>()),
    };
    let report = Report {
        scenario: "slots".into(),
        started_unix: crate::unix_now(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine(),
        settings: serde_json::json!({"reps": o.reps, "node": ctx.node}),
        rows,
        extra: serde_json::json!({"rejections": rejections}),
        notes,
    };
    report.finish(&ctx.out_dir, &plot)?;
    Ok(report)
}
