//! `restart`: kubelet restart → resources advertised again; agent restart → Instances intact
//! (same UIDs) and time until the new agent is ready.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use verge_crds::{Instance, naming};

use crate::common::*;
use crate::report::{Plot, Report, Row, Stat, Target};

const CONFIG: &str = "vg-bench-rst";
const DEVICES: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// kubelet restarts.
    #[arg(long, default_value_t = 3)]
    pub kubelet_reps: usize,
    /// Agent pod deletions.
    #[arg(long, default_value_t = 3)]
    pub agent_reps: usize,
}

fn all_listed(
    v: &BTreeMap<String, std::collections::BTreeSet<String>>,
    prefix: &str,
    config_res: &str,
) -> bool {
    v.iter()
        .filter(|(r, ids)| r.starts_with(prefix) && !ids.is_empty())
        .count()
        >= DEVICES
        && v.get(config_res).is_some_and(|ids| ids.len() >= DEVICES)
}

async fn uids(ctx: &Ctx) -> Result<BTreeMap<String, String>> {
    Ok(Api::<Instance>::namespaced(ctx.client(), NS)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|m| Some((m.metadata.name?, m.metadata.uid?)))
        .filter(|(n, _)| n.starts_with(CONFIG))
        .collect())
}

/// Identity of the file at `p`: the inode number alone is not enough, because the filesystem
/// hands a recreated socket the number its predecessor just freed (restarts 2 and 3 of the first
/// run waited for a change that had happened).
fn inode(p: &std::path::Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

pub async fn run(ctx: &Ctx, o: &Opts) -> Result<Report> {
    let started = Instant::now();
    let tracker = InstanceTracker::start(ctx).await?;
    let agent = agent_pod(ctx).await?;
    set_online(&agent.tmp_dir.join("vg-bench-rst.txt"), true)?;
    let descs: Vec<String> = (0..DEVICES).map(|i| format!("r{i}")).collect();
    apply(
        &ctx.cluster,
        &echo_configuration(CONFIG, &descs, "/tmp/vg-bench-rst.txt", 1, None, false),
    )
    .await?;
    let prefix = naming::configuration_resource_name(&format!("{CONFIG}-"));
    let config_res = naming::configuration_resource_name(CONFIG);
    let mut kubelet = Kubelet::new(&ctx.node);
    kubelet
        .wait(
            "all listed",
            Instant::now(),
            Duration::from_millis(50),
            TIMEOUT,
            |v| all_listed(v, &prefix, &config_res),
        )
        .await?;
    let before = uids(ctx).await?;
    if before.len() != DEVICES {
        bail!("expected {DEVICES} Instances, found {}", before.len());
    }
    let sock = verge_e2e::agent::kubelet_dir(&ctx.node).join("device-plugins/kubelet.sock");

    let mut from_sock = Vec::new();
    let mut from_cmd = Vec::new();
    let mut notes = Vec::new();
    for rep in 1..=o.kubelet_reps {
        let old = inode(&sock);
        let t0 = Instant::now();
        let node_arg = format!("kubelet@{}", ctx.node);
        let args = ["restart", node_arg.as_str()];
        let restart = verge_e2e::cluster_cmd(&args);
        // kubelet.sock replaced = the new kubelet's registration service is up.
        let sock_up = poll(
            "kubelet.sock recreated",
            t0,
            Duration::from_millis(2),
            TIMEOUT,
            || async {
                Ok(inode(&sock)
                    .filter(|i| Some(*i) != old)
                    .map(|_| Instant::now()))
            },
        );
        let (restart, sock_up) = tokio::join!(restart, sock_up);
        if let Err(e) = restart {
            notes.push(format!("kubelet restart {rep}: {e:#}"));
            continue;
        }
        let sock_at = match sock_up {
            Ok((_, at)) => at,
            Err(e) => {
                notes.push(format!("kubelet restart {rep}: {e:#}"));
                continue;
            }
        };
        match kubelet
            .wait(
                "resources advertised again",
                sock_at,
                Duration::from_millis(10),
                TIMEOUT,
                |v| all_listed(v, &prefix, &config_res),
            )
            .await
        {
            Ok(d) => {
                let total = t0.elapsed();
                eprintln!(
                    "restart kubelet {rep}/{}: advertised {:.2} s after kubelet.sock, {:.2} s after the restart began",
                    o.kubelet_reps,
                    d.as_secs_f64(),
                    total.as_secs_f64()
                );
                from_sock.push(d.as_secs_f64());
                from_cmd.push(total.as_secs_f64());
            }
            Err(e) => notes.push(format!("kubelet restart {rep}: {e:#}")),
        }
    }
    let kubelet_failures = o.kubelet_reps - from_sock.len();

    let pods: Api<Pod> = Api::namespaced(ctx.client(), NS);
    let mut ready = Vec::new();
    let mut readvertised = Vec::new();
    let deletions_before = tracker.deleted(CONFIG);
    for rep in 1..=o.agent_reps {
        let old = agent_pod(ctx).await?;
        let t0 = Instant::now();
        pods.delete(&old.name, &DeleteParams::default()).await?;
        let new = poll(
            "new agent ready",
            t0,
            Duration::from_millis(100),
            TIMEOUT,
            || async { Ok(agent_pod(ctx).await.ok().filter(|a| a.uid != old.uid)) },
        )
        .await;
        let (d, _) = match new {
            Ok(v) => v,
            Err(e) => {
                notes.push(format!("agent restart {rep}: {e:#}"));
                continue;
            }
        };
        let adv = kubelet
            .wait(
                "resources advertised",
                t0,
                Duration::from_millis(20),
                TIMEOUT,
                |v| all_listed(v, &prefix, &config_res),
            )
            .await;
        eprintln!(
            "restart agent {rep}/{}: new pod ready after {:.2} s; resources listed after {:?}",
            o.agent_reps,
            d.as_secs_f64(),
            adv.as_ref().map(|d| d.as_secs_f64()).ok()
        );
        ready.push(d.as_secs_f64());
        if let Ok(a) = adv {
            readvertised.push(a.as_secs_f64());
        }
    }
    let after = uids(ctx).await?;
    let same = after == before;
    let deleted = tracker.deleted(CONFIG) - deletions_before;
    notes.push(format!(
        "Instances after {} agent restarts: {} of {DEVICES} with the same UID; {deleted} deletions seen by the watch",
        o.agent_reps,
        before.iter().filter(|(n, u)| after.get(*n) == Some(*u)).count()
    ));
    notes.push("kubelet restart: measured from the moment kubelet.sock is recreated (the new kubelet accepts registrations) until GetAllocatableResources lists every resource again".into());
    let rows = vec![
        Row::with_timeouts(
            "kubelet restart: kubelet.sock -> all resources advertised",
            "s",
            from_sock,
            Some(Target {
                stat: Stat::Max,
                limit: 2.0,
            }),
            kubelet_failures,
        ),
        Row::new(
            "kubelet restart: restart command -> all advertised",
            "s",
            from_cmd,
            None,
        ),
        Row::new("agent pod deleted -> new agent Ready", "s", ready, None),
        Row::new(
            "agent pod deleted -> all resources listed",
            "s",
            readvertised,
            None,
        ),
        Row::new(
            "Instances intact after agent restarts (1 = same UIDs, no deletion)",
            "bool",
            vec![if same && deleted == 0 { 1.0 } else { 0.0 }],
            None,
        ),
    ];
    let plot = Plot {
        title: "restarts per repetition (s)".into(),
        x_label: "repetition".into(),
        y_label: "seconds".into(),
        series: crate::report::per_rep(&rows.iter().take(3).collect::<Vec<_>>()),
    };
    let report = Report {
        scenario: "restart".into(),
        started_unix: crate::unix_now(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine(),
        settings: serde_json::json!({"kubelet_reps": o.kubelet_reps, "agent_reps": o.agent_reps, "devices": DEVICES, "node": ctx.node}),
        rows,
        extra: serde_json::json!({"instances_same_uids": same, "instance_deletions": deleted}),
        notes,
    };
    report.finish(&ctx.out_dir, &plot)?;
    Ok(report)
}
