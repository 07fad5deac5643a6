//! `scale`: N debugEcho devices on one node: time to all Instances and all resources allocatable,
//! agent RSS, API writes per device, and whether the cost grows linearly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use kube::api::Api;
use verge_crds::naming;

use crate::common::*;
use crate::report::{Plot, Report, Row, Stat, Target};

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Device counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,5000")]
    pub sizes: Vec<usize>,
    /// Longest wait per size for all Instances and resources (and for their removal).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

pub async fn run(ctx: &Ctx, o: &Opts) -> Result<Report> {
    let started = Instant::now();
    let timeout = Duration::from_secs(o.timeout);
    let tracker = InstanceTracker::start(ctx).await?;
    let agent = agent_pod(ctx).await?;
    let file = agent.tmp_dir.join("vg-bench-scale.txt");
    set_online(&file, true)?;
    let mut rows = Vec::new();
    let mut points_inst = Vec::new();
    let mut points_alloc = Vec::new();
    let mut points_writes = Vec::new();
    let mut per_size = Vec::new();
    let mut notes = Vec::new();
    let config_api: Api<verge_crds::Configuration> = Api::namespaced(ctx.client(), NS);
    for &n in &o.sizes {
        let name = format!("vg-bench-s{n}");
        let prefix = format!("{name}-");
        let res_prefix = naming::configuration_resource_name(&prefix);
        let config_res = naming::configuration_resource_name(&name);
        let descs: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        let served = echo_instance_names(&name, &descs).len();
        if served < n {
            notes.push(format!(
                "{n} devices: {} pair(s) of ids share a 3-byte Instance name hash; the agent serves {served} and reports NameConflict, so this size waits for {served} Instances and divides writes by {served}",
                n - served
            ));
        }
        let before = apiserver_writes(&ctx.cluster).await?;

        // Agent RSS sampled through the run.
        let stop = Arc::new(AtomicBool::new(false));
        let cid = agent.container_id.clone();
        let s = stop.clone();
        let sampler = tokio::spawn(async move {
            let mut peak = 0.0f64;
            while !s.load(Ordering::SeqCst) {
                let pids = container_pids(&cid);
                let rss = pids.iter().filter_map(|p| rss_bytes(*p)).sum::<u64>() as f64 / 1048576.0;
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            peak
        });

        let t0 = Instant::now();
        apply(
            &ctx.cluster,
            &echo_configuration(
                &name,
                &descs,
                "/tmp/vg-bench-scale.txt",
                1,
                Some("0s"),
                false,
            ),
        )
        .await?;
        let inst = poll(
            "all Instances",
            t0,
            Duration::from_millis(20),
            timeout,
            || async { Ok((tracker.live(&prefix) >= served).then_some(())) },
        )
        .await;
        let alloc = Kubelet::new(&ctx.node)
            .wait(
                "all resources allocatable",
                t0,
                Duration::from_millis(100),
                timeout,
                |v| {
                    let each = v
                        .iter()
                        .filter(|(r, ids)| r.starts_with(&res_prefix) && !ids.is_empty())
                        .count();
                    each >= served && v.get(&config_res).is_some_and(|ids| ids.len() >= served)
                },
            )
            .await;
        crate::footprint::settle_writes(ctx).await;
        let after = apiserver_writes(&ctx.cluster).await?;
        stop.store(true, Ordering::SeqCst);
        let peak = sampler.await.unwrap_or(0.0);
        let rss_end = container_pids(&agent.container_id)
            .iter()
            .filter_map(|p| rss_bytes(*p))
            .sum::<u64>() as f64
            / 1048576.0;
        let delta = write_delta(&before, &after);
        let total: f64 = delta.values().sum();
        let per_device = total / served.max(1) as f64;
        let breakdown: Vec<serde_json::Value> = delta
            .iter()
            .map(|(k, v)| serde_json::json!({"resource": k.resource, "subresource": k.subresource, "verb": k.verb, "count": v}))
            .collect();
        let inst_s = inst.as_ref().ok().map(|(d, _)| d.as_secs_f64());
        let alloc_s = alloc.as_ref().ok().map(|d| d.as_secs_f64());
        eprintln!(
            "scale {n}: Instances {} s, allocatable {} s, writes {total} ({per_device:.2}/device), agent RSS peak {peak:.1} MiB",
            inst_s
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "TIMEOUT".into()),
            alloc_s
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "TIMEOUT".into()),
        );
        if let Err(e) = &inst {
            notes.push(format!(
                "{n} devices: {e:#} ({} live)",
                tracker.live(&prefix)
            ));
        }
        if let Err(e) = &alloc {
            notes.push(format!("{n} devices: {e:#}"));
        }
        let alloc_target = (n == 1000).then_some(Target {
            stat: Stat::Max,
            limit: 30.0,
        });
        rows.push(Row::with_timeouts(
            format!("{n} devices: all Instances exist"),
            "s",
            inst_s.into_iter().collect(),
            None,
            usize::from(inst_s.is_none()),
        ));
        rows.push(Row::with_timeouts(
            format!("{n} devices: all allocatable"),
            "s",
            alloc_s.into_iter().collect(),
            alloc_target,
            usize::from(alloc_s.is_none()),
        ));
        rows.push(Row::new(
            format!("{n} devices: API writes per device"),
            "writes",
            vec![per_device],
            Some(Target {
                stat: Stat::Max,
                limit: 3.0,
            }),
        ));
        rows.push(Row::new(
            format!("{n} devices: agent RSS peak"),
            "MiB",
            vec![peak],
            None,
        ));
        if let Some(v) = inst_s {
            points_inst.push((n as f64, v));
        }
        if let Some(v) = alloc_s {
            points_alloc.push((n as f64, v));
        }
        points_writes.push((n as f64, per_device));

        // Remove this size before the next; the removal time is reported too.
        let t1 = Instant::now();
        let _ = config_api.delete(&name, &Default::default()).await;
        let gone = poll(
            "Instances removed",
            t1,
            Duration::from_millis(100),
            timeout,
            || async { Ok((tracker.live(&prefix) == 0).then_some(())) },
        )
        .await
        .map(|(d, _)| d.as_secs_f64())
        .ok();
        eprintln!(
            "scale {n}: removed in {}",
            gone.map(|v| format!("{v:.1} s"))
                .unwrap_or_else(|| "TIMEOUT".into())
        );
        per_size.push(serde_json::json!({
            "devices": n, "instances_served": served, "instances_s": inst_s, "allocatable_s": alloc_s, "writes_total": total,
            "writes_per_device": per_device, "writes": breakdown, "agent_rss_peak_mib": peak,
            "agent_rss_end_mib": rss_end, "removal_s": gone,
        }));
    }
    // Growth: exponent b of t ∝ N^b between consecutive sizes (1 = linear).
    let exponents: Vec<serde_json::Value> = points_alloc
        .windows(2)
        .map(|w| {
            let b = (w[1].1 / w[0].1).ln() / (w[1].0 / w[0].0).ln();
            serde_json::json!({"from": w[0].0, "to": w[1].0, "exponent": b, "s_per_1000_devices_at_to": w[1].1 / w[1].0 * 1000.0})
        })
        .collect();
    for e in &exponents {
        notes.push(format!(
            "allocatable time growth {}→{} devices: exponent {:.2} (1 = linear)",
            e["from"],
            e["to"],
            e["exponent"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    notes.push("API writes = increase of apiserver_request_total (group akri.sh, verbs POST/PUT/PATCH/APPLY; server-side apply counts as APPLY) from before the Configuration is applied until the counters stop moving".into());
    let plot = Plot {
        title: "scale: seconds until all Instances / all allocatable vs devices".into(),
        x_label: "devices".into(),
        y_label: "seconds".into(),
        series: vec![
            ("all Instances (s)".into(), points_inst),
            ("all allocatable (s)".into(), points_alloc),
        ],
    };
    let report = Report {
        scenario: "scale".into(),
        started_unix: crate::unix_now(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine(),
        settings: serde_json::json!({"sizes": o.sizes, "timeout_s": o.timeout, "capacity": 1, "node": ctx.node}),
        rows,
        extra: serde_json::json!({"per_size": per_size, "growth": exponents, "writes_per_device": points_writes}),
        notes,
    };
    report.finish(&ctx.out_dir, &plot)?;
    Ok(report)
}
