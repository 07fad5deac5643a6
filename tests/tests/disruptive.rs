//! Tests that stop or restart cluster components. They never run concurrently with other tests:
//! cargo runs test binaries one at a time, and inside this binary every test holds
//! `verge_e2e::serial()`. Each test leaves the cluster healthy (it waits for recovery).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use verge_e2e::{Cluster, broker_pod, cluster_cmd, report_time, serial, wait_until};

#[tokio::test]
async fn kubelet_restart_keeps_pods_and_node_ready() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    let ns = c.namespace("kubelet-restart").await?;
    c.create_pod(
        ns.name(),
        broker_pod("survivor", serde_json::json!({"app": "survivor"}), None),
    )
    .await?;
    let before = c
        .wait_pod_ready(ns.name(), "survivor", Duration::from_secs(90))
        .await?;
    let uid = before.metadata.uid.clone().unwrap_or_default();

    let t = Instant::now();
    cluster_cmd(&["restart", "kubelet"]).await?;
    wait_until("verge-node-1 Ready", Duration::from_secs(60), || async {
        Ok(c.node_ready("verge-node-1").await?.then_some(()))
    })
    .await?;
    let after = c
        .wait_pod_ready(ns.name(), "survivor", Duration::from_secs(60))
        .await?;
    ensure!(
        after.metadata.uid.as_deref() == Some(uid.as_str()),
        "the pod was replaced"
    );
    let restarts: i32 = after
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|s| s.restart_count)
        .sum();
    ensure!(
        restarts == 0,
        "the container restarted {restarts} time(s) across a kubelet restart"
    );
    // exec works through the new kubelet once it has synced its pods from the API server
    // (right after a restart it answers "pod does not exist" for a moment).
    let env = wait_until(
        "exec through the restarted kubelet",
        Duration::from_secs(30),
        || async {
            Ok(Some(
                c.exec(ns.name(), "survivor", &["verge-test-broker", "env"])
                    .await?,
            ))
        },
    )
    .await?;
    ensure!(env.contains("VERGE_TEST_MARKER=survivor"));
    report_time("kubelet restart: node Ready again, pod untouched", t);
    Ok(())
}

#[tokio::test]
async fn apiserver_restart_recovers() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    let t = Instant::now();
    cluster_cmd(&["stop", "kube-apiserver", "--kill"]).await?;
    let down = c.node_names().await;
    ensure!(
        down.is_err(),
        "the API server still answered after `cluster stop kube-apiserver --kill`"
    );
    cluster_cmd(&["start", "kube-apiserver"]).await?;
    // A new client: the old one's connections died with the server.
    let c2 = wait_until("API server back", Duration::from_secs(60), || async {
        Ok(Some(Cluster::try_connect().await?))
    })
    .await?;
    wait_until(
        "all components healthy",
        Duration::from_secs(60),
        || async { Ok(Some(cluster_cmd(&["status"]).await?)) },
    )
    .await?;
    for n in c2.node_names().await? {
        wait_until(&format!("{n} Ready"), Duration::from_secs(60), || async {
            Ok(c2.node_ready(&n).await?.then_some(()))
        })
        .await?;
    }
    report_time(
        "kube-apiserver stop/start: API, controllers and nodes healthy",
        t,
    );
    Ok(())
}

#[tokio::test]
async fn containerd_restart_keeps_containers() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    let ns = c.namespace("containerd-restart").await?;
    c.create_pod(
        ns.name(),
        broker_pod("steady", serde_json::json!({"app": "steady"}), None),
    )
    .await?;
    c.wait_pod_ready(ns.name(), "steady", Duration::from_secs(90))
        .await?;
    let t = Instant::now();
    cluster_cmd(&["restart", "containerd"]).await?;
    // The shims outlive containerd: the same container answers exec through the new containerd.
    let env = wait_until(
        "exec after the containerd restart",
        Duration::from_secs(60),
        || async {
            Ok(Some(
                c.exec(ns.name(), "steady", &["verge-test-broker", "env"])
                    .await?,
            ))
        },
    )
    .await?;
    ensure!(env.contains("VERGE_TEST_MARKER=steady"));
    let pod = c
        .wait_pod_ready(ns.name(), "steady", Duration::from_secs(60))
        .await?;
    let restarts: i32 = pod
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|s| s.restart_count)
        .sum();
    ensure!(restarts == 0, "the container restarted {restarts} time(s)");
    report_time("containerd restart: container kept running, exec works", t);
    Ok(())
}

#[tokio::test]
async fn status_reports_a_stopped_component() -> Result<()> {
    if Cluster::connect().await.is_none() {
        return Ok(());
    }
    let _serial = serial().await;
    let t = Instant::now();
    cluster_cmd(&["stop", "kube-scheduler"]).await?;
    let out = verge_e2e::run(&verge_e2e::cluster_script(), &["status"], None).await?;
    let restarted = cluster_cmd(&["start", "kube-scheduler"]).await;
    ensure!(
        !out.status.success()
            && out.stdout.contains("kube-scheduler")
            && out.stdout.contains("STOPPED"),
        "status with the scheduler stopped: {} {}",
        out.status,
        out.stdout
    );
    restarted?;
    cluster_cmd(&["status"]).await?;
    report_time("status: stopped scheduler reported, then healthy again", t);
    Ok(())
}

#[tokio::test]
async fn multicast_counters_still_zero() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    c.assert_no_multicast_leak().await
}
