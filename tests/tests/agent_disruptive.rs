//! Agent behaviour under faults (issue 4): kubelet restart, an API-server
//! outage, and two nodes sharing a device. These stop or restart cluster
//! components, so they live in their own test binary and hold
//! `verge_e2e::serial()` for their whole run.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use verge_crds::{Instance, naming};
use verge_e2e::agent::{Agent, ensure_crds, kubelet_allocatable, set_availability};
use verge_e2e::{BROKER_IMAGE, Cluster, cluster_cmd, report_time, serial, wait_until};

const NODE: &str = "verge-node-1";
const NODE2: &str = "verge-node-2";
const DEADLINE: Duration = Duration::from_secs(120);
/// How long the API server stays down in the outage test (the figure).
const OUTAGE: Duration = Duration::from_secs(60);

fn config_yaml(name: &str, description: &str, capacity: u32, availability: &str) -> String {
    format!(
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
  annotations:
    akri.sh/device-grace-period: \"2s\"
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptions: [{description}]
      availabilityFile: {availability}
  capacity: {capacity}
"
    )
}

fn pod_json(name: &str, node: &str, resource: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "broker",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "resources": {"limits": {resource: "1"}},
            }],
        },
    })
}

async fn instances(c: &Cluster, ns: &str) -> Result<Vec<Instance>> {
    Ok(Api::<Instance>::namespaced(c.client(), ns)
        .list(&ListParams::default())
        .await?
        .items)
}

fn scratch(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("verge-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .map(|s| s.restart_count)
        .sum()
}

#[tokio::test]
async fn kubelet_restart_reregisters_plugins_within_seconds() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-kubelet").await?;
    let dir = scratch("kubelet")?;
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml("kr", "k", 2, &dir.join("a").display().to_string()),
    )
    .await?;
    let inst = wait_until("an Instance", DEADLINE, || async {
        Ok(instances(&c, ns.name()).await?.into_iter().next())
    })
    .await?;
    let resource = naming::instance_resource_name(&inst.name_any());
    c.create_pod(ns.name(), pod_json("running", NODE, &resource))
        .await?;
    let before = c.wait_pod_ready(ns.name(), "running", DEADLINE).await?;

    let t = Instant::now();
    cluster_cmd(&["restart", "kubelet"]).await?;
    report_time("kubelet restart command returned", t);
    // kubelet's own view: GetAllocatableResources lists the plugin's free slot again.
    wait_until("kubelet lists the plugin again", DEADLINE, || async {
        Ok((!kubelet_allocatable(NODE, &resource)
            .await
            .unwrap_or_default()
            .is_empty())
        .then_some(()))
    })
    .await?;
    report_time(
        "kubelet restarted → plugins registered again (pod-resources)",
        t,
    );
    ensure!(
        agent.log_text().contains("kubelet restarted"),
        "the agent did not notice the restart"
    );
    wait_until("the Node shows the resource", DEADLINE, || async {
        let node = Api::<Node>::all(c.client()).get(NODE).await?;
        let cap = node
            .status
            .and_then(|s| s.capacity)
            .and_then(|a| a.get(&resource).map(|q| q.0.clone()));
        Ok((cap.as_deref() == Some("2")).then_some(()))
    })
    .await?;
    report_time("kubelet restarted → Node shows the resource", t);
    let after = Api::<Pod>::namespaced(c.client(), ns.name())
        .get("running")
        .await?;
    ensure!(after.uid() == before.uid(), "pod replaced");
    ensure!(restarts(&after) == 0, "pod restarted");
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn api_server_outage_keeps_kubelet_served_and_converges() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-outage").await?;
    let dir = scratch("outage")?;
    let availability = dir.join("a");
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml("outage", "o", 1, &availability.display().to_string()),
    )
    .await?;
    let inst = wait_until("an Instance", DEADLINE, || async {
        Ok(instances(&c, ns.name()).await?.into_iter().next())
    })
    .await?;
    let resource = naming::instance_resource_name(&inst.name_any());
    wait_until("kubelet lists the device", DEADLINE, || async {
        Ok((kubelet_allocatable(NODE, &resource).await?.len() == 1).then_some(()))
    })
    .await?;

    cluster_cmd(&["stop", "kube-apiserver"]).await?;
    let t = Instant::now();
    // While the API server is down: kubelet keeps the resource from the agent's local state...
    ensure!(kubelet_allocatable(NODE, &resource).await?.len() == 1);
    // ...and a change happens that the agent must write later.
    set_availability(&availability, false)?;
    wait_until(
        "kubelet sees the device unhealthy (local, no API)",
        DEADLINE,
        || async {
            Ok(kubelet_allocatable(NODE, &resource)
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    let remaining = OUTAGE.saturating_sub(t.elapsed());
    tokio::time::sleep(remaining).await;
    cluster_cmd(&["start", "kube-apiserver"]).await?;
    let back = Instant::now();
    wait_until(
        "the Instance is removed once the API server is back",
        DEADLINE,
        || async { Ok(instances(&c, ns.name()).await?.is_empty().then_some(())) },
    )
    .await?;
    report_time("API server back → pending removal written", back);
    set_availability(&availability, true)?;
    wait_until("the Instance returns", DEADLINE, || async {
        Ok((instances(&c, ns.name()).await?.len() == 1).then_some(()))
    })
    .await?;
    report_time("API server back → device back as an Instance", back);
    let status = cluster_cmd(&["status"]).await?;
    ensure!(
        !status.contains("STOPPED"),
        "a component died during the outage:\n{status}"
    );
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn shared_device_on_two_nodes_holds_capacity() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = serial().await;
    if !c.node_names().await?.iter().any(|n| n == NODE2) {
        println!("[e2e] two-node test skipped: the cluster has one node (`cluster up --nodes 2`)");
        return Ok(());
    }
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-shared").await?;
    let dir = scratch("shared")?;
    let availability = dir.join("a").display().to_string();
    let mut a1 = Agent::start(NODE, ns.name(), &[]).await?;
    let mut a2 = Agent::start(NODE2, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml("shared", "s", 1, &availability),
    )
    .await?;
    let t = Instant::now();
    let inst = wait_until("one Instance listing both nodes", DEADLINE, || async {
        let list = instances(&c, ns.name()).await?;
        Ok((list.len() == 1 && list[0].spec.nodes.len() == 2).then(|| list[0].clone()))
    })
    .await?;
    report_time("shared device → one Instance with both nodes", t);
    ensure!(inst.spec.shared);
    let resource = naming::instance_resource_name(&inst.name_any());
    let slot = naming::slot_id(&inst.name_any(), 0);

    // Node 1 takes the only slot; node 2's kubelet must stop offering it. The
    // cross-node window is the time from node 1's claim reaching the API
    // server until node 2's kubelet no longer offers the slot; poll both
    // tightly to measure it.
    let insts: Api<Instance> = Api::namespaced(c.client(), ns.name());
    c.create_pod(ns.name(), pod_json("first", NODE, &resource))
        .await?;
    let window_deadline = Instant::now() + DEADLINE;
    let mut claimed_at = None;
    let mut window = None;
    while Instant::now() < window_deadline && window.is_none() {
        if claimed_at.is_none()
            && insts
                .get(&inst.name_any())
                .await?
                .spec
                .device_usage
                .get(&slot)
                .map(String::as_str)
                == Some(NODE)
        {
            claimed_at = Some(Instant::now());
        }
        let offered = kubelet_allocatable(NODE2, &resource).await?.contains(&slot);
        if let (Some(t), false) = (claimed_at, offered) {
            window = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let window = window.ok_or_else(|| anyhow::anyhow!("node 2 kept offering the claimed slot"))?;
    // On stderr, uncaptured: CI's log must carry the figure the issue asks to report.
    verge_e2e::uncaptured(&format!(
        "[e2e] cross-node window: claim recorded → node 2 kubelet sees the slot taken: {:.3}s (±0.01s polling)",
        window.as_secs_f64()
    ));
    c.wait_pod_ready(ns.name(), "first", DEADLINE).await?;
    // The Node object catches up at node 2's next status update; then a pod for node 2 waits.
    wait_until("node 2 shows no free slot", DEADLINE, || async {
        let node = Api::<Node>::all(c.client()).get(NODE2).await?;
        let alloc = node
            .status
            .and_then(|s| s.allocatable)
            .and_then(|a| a.get(&resource).map(|q| q.0.clone()));
        Ok((alloc.as_deref() == Some("0")).then_some(()))
    })
    .await?;
    c.create_pod(ns.name(), pod_json("second", NODE2, &resource))
        .await?;
    let pods = Api::<Pod>::namespaced(c.client(), ns.name());
    wait_until(
        "the second pod to be judged unschedulable",
        DEADLINE,
        || async {
            let p = pods.get("second").await?;
            let unschedulable = p
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "PodScheduled" && c.status == "False");
            Ok(unschedulable.then_some(()))
        },
    )
    .await?;
    let p = pods.get("second").await?;
    ensure!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"),
        "second pod should wait for the slot"
    );
    // Freeing the slot on node 1 lets node 2 take it.
    let freed = Instant::now();
    pods.delete("first", &Default::default()).await?;
    wait_until("the first pod gone", DEADLINE, || async {
        Ok(pods.get_opt("first").await?.is_none().then_some(()))
    })
    .await?;
    report_time("delete on node 1 → pod gone", freed);
    wait_until("the slot released", DEADLINE, || async {
        Ok((!insts
            .get(&inst.name_any())
            .await?
            .spec
            .device_usage
            .contains_key(&slot))
        .then_some(()))
    })
    .await?;
    report_time("delete on node 1 → slot released in the Instance", freed);
    wait_until("node 2's kubelet offers the slot", DEADLINE, || async {
        Ok(kubelet_allocatable(NODE2, &resource)
            .await?
            .contains(&slot)
            .then_some(()))
    })
    .await?;
    report_time("delete on node 1 → node 2 kubelet offers the slot", freed);
    c.wait_pod_ready(ns.name(), "second", DEADLINE).await?;
    report_time(
        "delete on node 1 → pod Running on node 2 (after node 2's status update and the scheduler's retry)",
        freed,
    );
    let i = instances(&c, ns.name()).await?;
    ensure!(
        i[0].spec.device_usage.get(&slot).map(String::as_str) == Some(NODE2),
        "usage {:?}",
        i[0].spec.device_usage
    );
    a1.stop().await?;
    a2.stop().await?;
    drop(ns);
    Ok(())
}
