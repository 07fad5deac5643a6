//! `footprint`: agent and controller RSS and CPU idle and with 1,000 Instances; binary and image sizes.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use verge_crds::naming;

use crate::common::*;
use crate::report::{Plot, Report, Row, Stat, Target};

const CONFIG: &str = "vg-bench-fp";
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const LOADED_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Seconds of sampling per state (idle, loaded).
    #[arg(long, default_value_t = 20)]
    pub window: u64,
    /// Instances for the loaded state.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
}

struct Proc {
    label: String,
    container_id: String,
}

async fn components(ctx: &Ctx) -> Result<(Proc, Vec<Proc>)> {
    let agent = agent_pod(ctx).await?;
    let leader = Api::<Lease>::namespaced(ctx.client(), NS)
        .get_opt(&format!("{RELEASE}-controller"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec.and_then(|s| s.holder_identity))
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await?;
    let mut ctrls = Vec::new();
    for p in list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let id = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first().and_then(|c| c.container_id.clone()))
            .unwrap_or_default();
        let role = if !leader.is_empty() && leader.contains(&name) {
            "leader"
        } else {
            "standby"
        };
        ctrls.push(Proc {
            label: format!("controller ({role})"),
            container_id: id
                .rsplit_once("://")
                .map(|(_, i)| i.to_string())
                .unwrap_or(id),
        });
    }
    ctrls.sort_by(|a, b| a.label.cmp(&b.label));
    Ok((
        Proc {
            label: "agent".into(),
            container_id: agent.container_id,
        },
        ctrls,
    ))
}

async fn measure(
    procs: &[&Proc],
    state: &str,
    window: Duration,
    rows: &mut Vec<Row>,
    targets: &dyn Fn(&str, &str) -> Option<f64>,
) {
    let futs = procs
        .iter()
        .map(|p| sample_container(&p.container_id, window, SAMPLE_EVERY));
    let results = futures::future::join_all(futs).await;
    for (p, r) in procs.iter().zip(results) {
        match r {
            Ok((rss, cpu, parts)) => {
                let anon = parts.anon as f64 / 1048576.0;
                let file = parts.file as f64 / 1048576.0;
                eprintln!(
                    "footprint {state}: {}: RSS max {:.1} MiB (at the end: {anon:.1} MiB anonymous, {file:.1} MiB file-backed), CPU {:.2}% of a core",
                    p.label,
                    rss.iter().copied().fold(0.0, f64::max),
                    cpu
                );
                let target = targets(&p.label, state).map(|limit| Target {
                    stat: Stat::Max,
                    limit,
                });
                rows.push(Row::new(
                    format!("{} RSS, {state}", p.label),
                    "MiB",
                    rss,
                    target,
                ));
                rows.push(Row::new(
                    format!("{} RSS anonymous, {state}", p.label),
                    "MiB",
                    vec![anon],
                    None,
                ));
                rows.push(Row::new(
                    format!("{} RSS file-backed (binary, libraries), {state}", p.label),
                    "MiB",
                    vec![file],
                    None,
                ));
                rows.push(Row::new(
                    format!("{} CPU, {state} (avg over window)", p.label),
                    "%core",
                    vec![cpu],
                    None,
                ));
            }
            Err(e) => eprintln!("footprint {state}: {}: {e:#}", p.label),
        }
    }
}

fn size_mib(path: &std::path::Path) -> Option<f64> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.len() as f64 / 1048576.0)
}

pub async fn run(ctx: &Ctx, o: &Opts) -> Result<Report> {
    let started = Instant::now();
    let window = Duration::from_secs(o.window);
    let tracker = InstanceTracker::start(ctx).await?;
    let (agent, ctrls) = components(ctx).await?;
    let targets = |label: &str, state: &str| match (label, state) {
        ("agent", "idle") => Some(10.0),
        ("agent", _) => Some(40.0),
        (l, "idle") if l.starts_with("controller") => Some(15.0),
        _ => None,
    };
    let mut rows = Vec::new();
    let mut all: Vec<&Proc> = vec![&agent];
    all.extend(ctrls.iter());
    measure(&all, "idle", window, &mut rows, &targets).await;

    // Loaded: N Instances on the node (capacity 1, no brokers).
    let a = agent_pod(ctx).await?;
    let file = a.tmp_dir.join("vg-bench-fp.txt");
    set_online(&file, true)?;
    let descs: Vec<String> = (0..o.devices).map(|i| format!("fp-{i}")).collect();
    let t0 = Instant::now();
    apply(
        &ctx.cluster,
        &echo_configuration(CONFIG, &descs, "/tmp/vg-bench-fp.txt", 1, Some("0s"), false),
    )
    .await?;
    let prefix = format!("{CONFIG}-");
    let res_prefix = naming::configuration_resource_name(&prefix);
    // A name-hash collision leaves one Instance for two ids (see `echo_instance_names`).
    let n = echo_instance_names(CONFIG, &descs).len();
    poll(
        "all Instances",
        t0,
        Duration::from_millis(100),
        LOADED_TIMEOUT,
        || async { Ok((tracker.live(&prefix) >= n).then_some(())) },
    )
    .await?;
    Kubelet::new(&ctx.node)
        .wait(
            "all resources",
            t0,
            Duration::from_millis(250),
            LOADED_TIMEOUT,
            |v| {
                v.iter()
                    .filter(|(r, ids)| r.starts_with(&res_prefix) && !ids.is_empty())
                    .count()
                    >= n
            },
        )
        .await?;
    let loaded_after = t0.elapsed().as_secs_f64();
    eprintln!(
        "footprint: {n} Instances and resources after {loaded_after:.1}s; letting writes settle"
    );
    settle_writes(ctx).await;
    let state = format!("{n} Instances");
    let mut loaded_all: Vec<&Proc> = vec![&agent];
    loaded_all.extend(ctrls.iter());
    measure(&loaded_all, &state, window, &mut rows, &targets).await;
    let config_api: Api<verge_crds::Configuration> = Api::namespaced(ctx.client(), NS);
    let _ = config_api.delete(CONFIG, &Default::default()).await;

    // Sizes of the binaries in the images (the profile `cluster images` built) and of the images.
    let target = target_dir();
    let profile = crate::common::image_profile();
    let images = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_default()
        .join(".cache/verge/images");
    let mut sizes = serde_json::Map::new();
    let agent_bin = format!("agent binary ({profile}, in image)");
    let controller_bin = format!("controller binary ({profile}, in image)");
    for (k, p) in [
        (agent_bin.as_str(), target.join(profile).join("verge-agent")),
        (
            controller_bin.as_str(),
            target.join(profile).join("verge-controller"),
        ),
        ("agent image tarball", images.join("agent.tar")),
        ("controller image tarball", images.join("controller.tar")),
    ] {
        let v = size_mib(&p);
        if let Some(v) = v {
            rows.push(Row::new(format!("size: {k}"), "MiB", vec![v], None));
        }
        sizes.insert(k.into(), serde_json::json!({"path": p, "mib": v}));
    }
    let plot = Plot {
        title: "RSS samples (MiB)".into(),
        x_label: "sample (1/s)".into(),
        y_label: "MiB".into(),
        series: crate::report::per_rep(
            &rows
                .iter()
                .filter(|r| r.unit == "MiB" && r.samples.len() > 1)
                .collect::<Vec<_>>(),
        ),
    };
    let report = Report {
        scenario: "footprint".into(),
        started_unix: crate::unix_now(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine(),
        settings: serde_json::json!({"window_s": o.window, "devices": o.devices, "capacity": 1, "node": ctx.node}),
        rows,
        extra: serde_json::json!({"sizes": sizes, "loaded_after_s": loaded_after}),
        notes: vec![
            "RSS = VmRSS summed over the container's processes (/proc, found by container id in /proc/<pid>/cgroup); CPU = (utime+stime) over the window".into(),
            "RSS anonymous / file-backed = RssAnon / RssFile at the end of the window: private memory vs. resident pages of the mapped binary and libraries (shared with the page cache, reclaimable)".into(),
            format!("images carry {profile}-profile binaries (VERGE_IMAGE_PROFILE of tests/cluster/cluster images)"),
        ],
    };
    report.finish(&ctx.out_dir, &plot)?;
    Ok(report)
}

/// Waits until the API server's write counters for akri.sh stop moving (two equal scrapes 2 s
/// apart, at most 60 s), so a measurement window starts after the burst of writes.
pub async fn settle_writes(ctx: &Ctx) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = apiserver_writes(&ctx.cluster).await.ok();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = apiserver_writes(&ctx.cluster).await.ok();
        if now.is_some() && now == last {
            return;
        }
        last = now;
    }
}
