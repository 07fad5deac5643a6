//! The agent on the real cluster (issue 4): Instances and kubelet resources
//! from a debugEcho Configuration, honest slots, grace on OFFLINE, adoption on
//! restart, and errors on the Configuration's status. Each test runs its own
//! host-process agent restricted to its namespace.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use verge_crds::{Configuration, Instance, naming};
use verge_e2e::agent::{Agent, ensure_crds, kubelet_allocatable, set_availability};
use verge_e2e::{BROKER_IMAGE, Cluster, report_time, wait_until};

const NODE: &str = "verge-node-1";
/// Generous: outcomes are asserted, times are printed.
const DEADLINE: Duration = Duration::from_secs(90);

fn config_yaml(
    name: &str,
    descriptions: &[&str],
    capacity: u32,
    availability: &str,
    grace: &str,
) -> String {
    let list = descriptions
        .iter()
        .map(|d| format!("        - {d}\n"))
        .collect::<String>();
    format!(
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
  annotations:
    akri.sh/device-grace-period: \"{grace}\"
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptions:
{list}      availabilityFile: {availability}
  capacity: {capacity}
"
    )
}

fn pod_json(name: &str, resource: &str, count: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "consumer"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "broker",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "resources": {"limits": {resource: count.to_string()}},
            }],
        },
    })
}

async fn instances(c: &Cluster, ns: &str, config: &str) -> Result<Vec<Instance>> {
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|i| i.spec.configuration_name == config)
        .collect())
}

async fn wait_instances(c: &Cluster, ns: &str, config: &str, n: usize) -> Result<Vec<Instance>> {
    wait_until(&format!("{n} Instances of {config}"), DEADLINE, || async {
        let list = instances(c, ns, config).await?;
        Ok((list.len() == n).then_some(list))
    })
    .await
}

/// Field managers of an Instance's main resource (not its status), sorted.
fn spec_managers(i: &Instance) -> Vec<String> {
    let mut m: Vec<String> = i
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| e.subresource.is_none())
        .filter_map(|e| e.manager.clone())
        .collect();
    m.sort();
    m.dedup();
    m
}

async fn node_allocatable(c: &Cluster, resource: &str) -> Result<Option<String>> {
    let node = Api::<Node>::all(c.client()).get(NODE).await?;
    Ok(node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get(resource).map(|q| q.0.clone())))
}

async fn pods(c: &Cluster, ns: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(c.client(), ns)
        .list(&ListParams::default())
        .await?
        .items)
}

fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// No pod was ever rejected by kubelet at admission (the symptom of a slot
/// kubelet thought free but the plugin could not give).
async fn assert_no_admission_errors(c: &Cluster, ns: &str) -> Result<()> {
    for p in pods(c, ns).await? {
        let reason = p
            .status
            .as_ref()
            .and_then(|s| s.reason.clone())
            .unwrap_or_default();
        ensure!(
            reason != "UnexpectedAdmissionError",
            "pod {} failed admission",
            p.name_any()
        );
    }
    let events = Api::<Event>::namespaced(c.client(), ns)
        .list(&ListParams::default())
        .await?;
    for e in events.items {
        ensure!(
            e.reason.as_deref() != Some("UnexpectedAdmissionError"),
            "admission error: {:?}",
            e.message
        );
    }
    Ok(())
}

/// The broker prints its environment to its log at start.
async fn env_of(c: &Cluster, ns: &str, pod: &str) -> Result<String> {
    c.logs(ns, pod).await
}

#[tokio::test]
async fn instances_resources_slots_and_env() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-slots").await?;
    let dir = tempfile_dir("slots")?;
    let availability = dir.join("availability");
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    let config = "echo";

    let t0 = Instant::now();
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml(
            config,
            &["a", "b"],
            2,
            &availability.display().to_string(),
            "30s",
        ),
    )
    .await?;
    let list = wait_instances(&c, ns.name(), config, 2).await?;
    report_time("Configuration applied → 2 Instances", t0);
    for i in &list {
        ensure!(i.spec.nodes == [NODE], "nodes {:?}", i.spec.nodes);
        ensure!(i.spec.capacity == 2);
        ensure!(
            i.owner_references()
                .iter()
                .any(|o| o.kind == "Configuration" && o.name == config)
        );
        ensure!(
            i.spec
                .broker_properties
                .contains_key("DEBUG_ECHO_DESCRIPTION")
        );
    }
    // A new Instance is one write: the whole object under the node's unforced manager.
    for i in &list {
        let managers = spec_managers(i);
        ensure!(
            managers == [format!("verge-agent/{NODE}")],
            "{}: a new Instance should have one spec manager, has {managers:?}",
            i.name_any()
        );
    }
    let names: Vec<String> = list.iter().map(|i| i.name_any()).collect();
    for name in &names {
        let resource = naming::instance_resource_name(name);
        wait_until(&format!("kubelet lists {resource}"), DEADLINE, || async {
            Ok((kubelet_allocatable(NODE, &resource).await?.len() == 2).then_some(()))
        })
        .await?;
    }
    report_time("Configuration applied → kubelet lists the resources", t0);
    let config_resource = naming::configuration_resource_name(config);
    wait_until("the Node shows the resources", DEADLINE, || async {
        let per_instance = [
            node_allocatable(&c, &naming::instance_resource_name(&names[0])).await?,
            node_allocatable(&c, &naming::instance_resource_name(&names[1])).await?,
        ];
        let all = node_allocatable(&c, &config_resource).await?;
        Ok(
            (per_instance.iter().all(|a| a.as_deref() == Some("2")) && all.as_deref() == Some("4"))
                .then_some(()),
        )
    })
    .await?;
    report_time(
        "Configuration applied → on the Node (after kubelet's status update)",
        t0,
    );

    // Five pods for four slots: four run, one waits.
    let t1 = Instant::now();
    for i in 0..5 {
        c.create_pod(ns.name(), pod_json(&format!("p{i}"), &config_resource, 1))
            .await?;
    }
    let running = wait_until("4 of 5 pods Running", DEADLINE, || async {
        let ps = pods(&c, ns.name()).await?;
        let running: Vec<String> = ps
            .iter()
            .filter(|p| phase(p) == "Running")
            .map(|p| p.name_any())
            .collect();
        Ok((running.len() == 4).then_some(running))
    })
    .await?;
    report_time("5 pods created → 4 Running", t1);
    let ps = pods(&c, ns.name()).await?;
    let pending: Vec<String> = ps
        .iter()
        .filter(|p| phase(p) == "Pending")
        .map(|p| p.name_any())
        .collect();
    ensure!(
        pending.len() == 1,
        "expected one Pending pod, got {pending:?}"
    );
    for p in &running {
        let env = env_of(&c, ns.name(), p).await?;
        ensure!(
            env.contains("DEBUG_ECHO_DESCRIPTION="),
            "{p} env lacks the device: {env}"
        );
    }
    // deviceUsage records the four claims.
    let used: usize = instances(&c, ns.name(), config)
        .await?
        .iter()
        .map(|i| i.spec.used_slots())
        .sum();
    ensure!(used == 4, "deviceUsage records {used} used slots");

    // Free one slot: the waiting pod gets it.
    let t2 = Instant::now();
    Api::<Pod>::namespaced(c.client(), ns.name())
        .delete(&running[0], &DeleteParams::default())
        .await?;
    let waiting = pending[0].clone();
    wait_until("the Pending pod Running", DEADLINE, || async {
        let p = Api::<Pod>::namespaced(c.client(), ns.name())
            .get(&waiting)
            .await?;
        Ok((phase(&p) == "Running").then_some(()))
    })
    .await?;
    report_time("slot freed (pod deleted) → waiting pod Running", t2);
    assert_no_admission_errors(&c, ns.name()).await?;

    // A pod asking for two devices gets the env of both.
    for p in pods(&c, ns.name()).await? {
        Api::<Pod>::namespaced(c.client(), ns.name())
            .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
            .await?;
    }
    wait_until("all slots free", DEADLINE, || async {
        let used: usize = instances(&c, ns.name(), config)
            .await?
            .iter()
            .map(|i| i.spec.used_slots())
            .sum();
        Ok((used == 0 && pods(&c, ns.name()).await?.is_empty()).then_some(()))
    })
    .await?;
    // Claims and releases applied the usage alone: the device fields survived them because the
    // first claim handed them to the device manager.
    for i in instances(&c, ns.name(), config).await? {
        let managers = spec_managers(&i);
        ensure!(
            managers.contains(&format!("verge-agent/{NODE}/device")),
            "{}: no device manager after claims: {managers:?}",
            i.name_any()
        );
        ensure!(i.spec.capacity == 2 && i.spec.configuration_name == config);
        ensure!(
            i.spec
                .broker_properties
                .contains_key("DEBUG_ECHO_DESCRIPTION")
        );
        ensure!(
            i.owner_references()
                .iter()
                .any(|o| o.kind == "Configuration" && o.name == config)
        );
    }
    c.create_pod(ns.name(), pod_json("two", &config_resource, 2))
        .await?;
    c.wait_pod_ready(ns.name(), "two", DEADLINE).await?;
    let env = env_of(&c, ns.name(), "two").await?;
    for i in &list {
        let hash = naming::hash_of_instance(&i.name_any())
            .unwrap_or_default()
            .to_ascii_uppercase();
        let desc = &i.spec.broker_properties["DEBUG_ECHO_DESCRIPTION"];
        ensure!(
            env.contains(&format!("DEBUG_ECHO_DESCRIPTION_{hash}={desc}")),
            "pod with two devices lacks {desc} ({hash}): {env}"
        );
    }
    assert_no_admission_errors(&c, ns.name()).await?;
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn offline_devices_leave_after_the_grace_and_come_back() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-offline").await?;
    let dir = tempfile_dir("offline")?;
    let availability = dir.join("availability");
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    let grace = Duration::from_secs(3);
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml(
            "flappy",
            &["x", "y"],
            1,
            &availability.display().to_string(),
            "3s",
        ),
    )
    .await?;
    let list = wait_instances(&c, ns.name(), "flappy", 2).await?;
    let resource = naming::instance_resource_name(&list[0].name_any());

    let t = Instant::now();
    set_availability(&availability, false)?;
    wait_until("kubelet no longer offers the device", DEADLINE, || async {
        Ok(kubelet_allocatable(NODE, &resource)
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    report_time("OFFLINE → device unhealthy in kubelet", t);
    wait_instances(&c, ns.name(), "flappy", 0).await?;
    let gone = t.elapsed();
    report_time("OFFLINE → Instances gone (grace 3s)", t);
    ensure!(
        gone >= grace,
        "Instances left after {gone:?}, before the {grace:?} grace"
    );

    let t = Instant::now();
    set_availability(&availability, true)?;
    wait_instances(&c, ns.name(), "flappy", 2).await?;
    report_time("ONLINE → Instances back", t);
    wait_until("kubelet offers the device again", DEADLINE, || async {
        Ok((kubelet_allocatable(NODE, &resource).await?.len() == 1).then_some(()))
    })
    .await?;
    report_time("ONLINE → kubelet offers the device", t);

    // A blip shorter than the grace churns nothing.
    let uids: BTreeSet<String> = instances(&c, ns.name(), "flappy")
        .await?
        .iter()
        .filter_map(|i| i.uid())
        .collect();
    set_availability(&availability, false)?;
    wait_until("kubelet sees the blip", DEADLINE, || async {
        Ok(kubelet_allocatable(NODE, &resource)
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    set_availability(&availability, true)?;
    wait_until(
        "kubelet offers the device after the blip",
        DEADLINE,
        || async { Ok((kubelet_allocatable(NODE, &resource).await?.len() == 1).then_some(())) },
    )
    .await?;
    let after: BTreeSet<String> = instances(&c, ns.name(), "flappy")
        .await?
        .iter()
        .filter_map(|i| i.uid())
        .collect();
    ensure!(
        uids == after,
        "a blip shorter than the grace replaced Instances"
    );
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn malformed_details_give_a_condition_and_an_event() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-malformed").await?;
    let dir = tempfile_dir("malformed")?;
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml(
            "good",
            &["g"],
            1,
            &dir.join("a").display().to_string(),
            "30s",
        ),
    )
    .await?;
    c.apply_yaml(
        Some(ns.name()),
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: bad
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptionz: [x]
  capacity: 1
",
    )
    .await?;
    let t = Instant::now();
    let api: Api<Configuration> = Api::namespaced(c.client(), ns.name());
    let condition = wait_until("a Discovering=False condition on bad", DEADLINE, || async {
        let cfg = api.get("bad").await?;
        Ok(cfg
            .status
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == NODE))
            .and_then(|n| {
                n.conditions
                    .into_iter()
                    .find(|c| c.type_ == "Discovering" && c.status == "False")
            }))
    })
    .await?;
    report_time("malformed discoveryDetails → status condition", t);
    ensure!(
        condition.reason == "InvalidDiscoveryDetails",
        "reason {}",
        condition.reason
    );
    ensure!(
        condition.message.contains("descriptionz"),
        "message {:?}",
        condition.message
    );
    wait_until("an Event on bad", DEADLINE, || async {
        let events = Api::<Event>::namespaced(c.client(), ns.name())
            .list(&ListParams::default())
            .await?;
        Ok(events.items.into_iter().find(|e| {
            e.involved_object.name.as_deref() == Some("bad")
                && e.reason.as_deref() == Some("InvalidDiscoveryDetails")
        }))
    })
    .await
    .context("Event for the malformed Configuration")?;
    // The other Configuration is unaffected.
    wait_instances(&c, ns.name(), "good", 1).await?;
    ensure!(instances(&c, ns.name(), "bad").await?.is_empty());
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn handler_diagnostics_become_a_condition_and_an_event() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-diag").await?;
    let dir = tempfile_dir("diag")?;
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &format!(
            "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: diag
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptions: [cam]
      availabilityFile: {}
      diagnostics:
      - {{subject: cam, severity: Error, message: wrong camera password}}
  capacity: 1
",
            dir.join("a").display()
        ),
    )
    .await?;
    let t = Instant::now();
    let api: Api<Configuration> = Api::namespaced(c.client(), ns.name());
    let condition = wait_until("a HandlerDiagnostics condition", DEADLINE, || async {
        let cfg = api.get("diag").await?;
        Ok(cfg
            .status
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == NODE))
            .and_then(|n| {
                n.conditions
                    .into_iter()
                    .find(|c| c.type_ == "HandlerDiagnostics")
            }))
    })
    .await?;
    report_time("handler diagnostic → status condition", t);
    ensure!(
        condition.message.contains("cam") && condition.message.contains("wrong camera password"),
        "{:?}",
        condition.message
    );
    wait_until("a HandlerDiagnostics Event", DEADLINE, || async {
        let events = Api::<Event>::namespaced(c.client(), ns.name())
            .list(&ListParams::default())
            .await?;
        Ok(events.items.into_iter().find(|e| {
            e.involved_object.name.as_deref() == Some("diag")
                && e.reason.as_deref() == Some("HandlerDiagnostics")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("wrong camera password"))
        }))
    })
    .await?;
    // Diagnostics do not fail discovery: the device is still there.
    wait_instances(&c, ns.name(), "diag", 1).await?;
    agent.stop().await?;
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn agent_restart_adopts_instances_and_keeps_pods() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-restart").await?;
    let dir = tempfile_dir("restart")?;
    let mut agent = Agent::start(NODE, ns.name(), &[]).await?;
    c.apply_yaml(
        Some(ns.name()),
        &config_yaml(
            "keep",
            &["k"],
            1,
            &dir.join("a").display().to_string(),
            "3s",
        ),
    )
    .await?;
    let before = wait_instances(&c, ns.name(), "keep", 1).await?.remove(0);
    let resource = naming::instance_resource_name(&before.name_any());
    c.create_pod(ns.name(), pod_json("user", &resource, 1))
        .await?;
    let pod_before = c.wait_pod_ready(ns.name(), "user", DEADLINE).await?;
    let usage_before = wait_until("the claim recorded", DEADLINE, || async {
        let i = instances(&c, ns.name(), "keep").await?;
        Ok(i.first()
            .filter(|i| i.spec.used_slots() == 1)
            .map(|i| i.spec.device_usage.clone()))
    })
    .await?;

    let t = Instant::now();
    agent.restart().await?;
    agent.wait_up(DEADLINE).await?;
    let label = format!(
        "verge_agent_instances{{configuration=\"{}/keep\"}} 1",
        ns.name()
    );
    wait_until("the new agent rediscovers the device", DEADLINE, || async {
        Ok(agent.metrics().await?.contains(&label).then_some(()))
    })
    .await?;
    report_time("agent restart → device rediscovered", t);
    // Rediscovered means the device is no longer missing, so no grace deadline
    // is pending; an agent that deleted and recreated it shows a new UID below.
    let after = instances(&c, ns.name(), "keep").await?;
    ensure!(after.len() == 1, "Instances after restart: {}", after.len());
    ensure!(after[0].uid() == before.uid(), "Instance was recreated");
    ensure!(
        after[0].spec.device_usage == usage_before,
        "deviceUsage changed: {:?}",
        after[0].spec.device_usage
    );
    let pod_after = Api::<Pod>::namespaced(c.client(), ns.name())
        .get("user")
        .await?;
    ensure!(pod_after.uid() == pod_before.uid(), "pod replaced");
    let restarts: i32 = pod_after
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .map(|s| s.restart_count)
        .sum();
    ensure!(restarts == 0, "pod restarted {restarts} times");
    ensure!(phase(&pod_after) == "Running");
    agent.stop().await?;
    drop(ns);
    Ok(())
}

fn tempfile_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "verge-e2e-{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
