//! End-to-end tests of verge-controller (issue 5) on the real test cluster.
//!
//! Each test runs its own controller as a host process (the binary cargo built next to this
//! test, or `VERGE_CONTROLLER_BIN`) restricted to the test's namespace, with its Lease in that
//! namespace, so tests run in parallel without seeing each other.
//!
//! Most tests write Instances the way the agent does (server-side apply under
//! `verge-agent/<node>/device` and `verge-agent/<node>`) and need no agent: broker Pods requesting
//! `akri.sh/<instance>` stay Pending without one, which is enough to check what the controller
//! creates; node loss is exercised there with a node name that does not exist. The `with_agent`
//! tests run the real agent (`verge-agent run`, namespace-restricted) with its embedded debugEcho
//! handler as a host process on each node (node 2 through `cluster node-exec`), for the full
//! flow: brokers Running with the device's env, Services answering, OFFLINE/ONLINE, property
//! changes, and a node going down and coming back (two-node clusters only; skipped otherwise).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use verge_e2e::controller::{ControllerProcess, controller_bin, free_port};
use verge_e2e::{BROKER_IMAGE, BROKER_PORT, Cluster, report_time, wait_until};

/// How long the controller gets to act on a change.
const ACT: Duration = Duration::from_secs(60);
/// The node every test cluster has.
const NODE: &str = "verge-node-1";

static CRDS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Installs (or updates) the project's CRDs once per test process and waits until they serve.
async fn ensure_crds(c: &Cluster) -> Result<()> {
    CRDS.get_or_try_init(|| async {
        let dir = verge_e2e::repo_root().join("crds");
        let dir = dir.to_string_lossy();
        c.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &dir])
            .await?;
        c.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/configurations.akri.sh",
            "crd/instances.akri.sh",
        ])
        .await?;
        Ok::<(), anyhow::Error>(())
    })
    .await?;
    Ok(())
}

fn akri(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("akri.sh", "v0", kind), plural)
}

fn configurations(c: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.client(), ns, &akri("Configuration", "configurations"))
}

fn instances(c: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.client(), ns, &akri("Instance", "instances"))
}

fn broker_pod_spec(marker: &str) -> Value {
    json!({
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "broker",
            "image": BROKER_IMAGE,
            "imagePullPolicy": "Never",
            "env": [
                {"name": "BROKER_PORT", "value": BROKER_PORT.to_string()},
                {"name": "VERGE_TEST_MARKER", "value": marker},
            ],
            "ports": [{"containerPort": BROKER_PORT, "name": "http"}],
            "resources": {
                "requests": {"{{PLACEHOLDER}}": "1"},
                "limits": {"{{PLACEHOLDER}}": "1"},
            },
        }],
    })
}

fn service_spec(port: u16) -> Value {
    json!({
        "type": "ClusterIP",
        "ports": [{"name": "http", "port": port, "targetPort": BROKER_PORT, "protocol": "TCP"}],
    })
}

fn configuration(name: &str, capacity: i32, broker_spec: Value, port: Option<u16>) -> Value {
    let mut spec = json!({
        "discoveryHandler": {"name": "debugEcho", "discoveryDetails": "descriptions: []"},
        "capacity": capacity,
        "brokerSpec": broker_spec,
    });
    if let Some(port) = port {
        spec["instanceServiceSpec"] = service_spec(port);
        spec["configurationServiceSpec"] = service_spec(port);
    }
    json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {"name": name},
        "spec": spec,
    })
}

async fn apply_configuration(c: &Cluster, ns: &str, cfg: &Value) -> Result<String> {
    c.apply_yaml(Some(ns), &cfg.to_string()).await?;
    let name = cfg["metadata"]["name"].as_str().unwrap_or_default();
    let obj = configurations(c, ns).get(name).await?;
    obj.metadata.uid.context("configuration has no uid")
}

/// Writes an Instance the way the agent on `node` does: the copied fields under
/// `verge-agent/<node>/device` (forced), its node item and slots under `verge-agent/<node>`.
#[allow(clippy::too_many_arguments)]
async fn agent_apply(
    c: &Cluster,
    ns: &str,
    name: &str,
    configuration: &str,
    configuration_uid: &str,
    node: &str,
    capacity: i32,
    properties: &BTreeMap<&str, &str>,
    slots: &[&str],
) -> Result<DynamicObject> {
    let api = instances(c, ns);
    let device = json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Instance",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "akri.sh/v0",
                "kind": "Configuration",
                "name": configuration,
                "uid": configuration_uid,
                "controller": true,
            }],
        },
        "spec": {
            "configurationName": configuration,
            "cdiName": format!("akri.sh/{configuration}=000000"),
            "capacity": capacity,
            "brokerProperties": properties,
            "shared": true,
        },
    });
    api.patch(
        name,
        &PatchParams::apply(&format!("verge-agent/{node}/device")).force(),
        &Patch::Apply(&device),
    )
    .await
    .context("device apply")?;
    let usage: BTreeMap<String, String> = slots
        .iter()
        .map(|s| (format!("{name}-{s}"), node.to_string()))
        .collect();
    let claim = json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Instance",
        "metadata": {"name": name},
        "spec": {"nodes": [node], "deviceUsage": usage},
    });
    api.patch(
        name,
        &PatchParams::apply(&format!("verge-agent/{node}")),
        &Patch::Apply(&claim),
    )
    .await
    .context("node apply (not forced)")
}

fn labels_selector(instance: &str) -> ListParams {
    ListParams::default().labels(&format!("akri.sh/instance={instance}"))
}

async fn broker_pods(c: &Cluster, ns: &str, instance: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(c.client(), ns)
        .list(&labels_selector(instance))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Waits for the single live broker Pod named `name` whose UID differs from `not_uid`.
async fn wait_broker(c: &Cluster, ns: &str, name: &str, not_uid: Option<&str>) -> Result<Pod> {
    let api = Api::<Pod>::namespaced(c.client(), ns);
    wait_until(&format!("broker pod {name}"), ACT, || async {
        let pod = api.get_opt(name).await?;
        Ok(pod.filter(|p| {
            p.metadata.deletion_timestamp.is_none() && p.metadata.uid.as_deref() != not_uid
        }))
    })
    .await
}

fn condition<'a>(obj: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn events(c: &Cluster, ns: &str) -> Result<Vec<Event>> {
    Ok(Api::<Event>::namespaced(c.client(), ns)
        .list(&ListParams::default())
        .await?
        .items)
}

async fn wait_event(c: &Cluster, ns: &str, reason: &str) -> Result<Event> {
    wait_until(&format!("Event {reason}"), ACT, || async {
        Ok(events(c, ns)
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason)))
    })
    .await
}

fn service_port(svc: &Service) -> Option<i32> {
    svc.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port)
}

/// On failure, shows the controller's log before the error.
fn explain<T>(result: Result<T>, controllers: &[&ControllerProcess]) -> Result<T> {
    if result.is_err() {
        for p in controllers {
            eprintln!(
                "--- verge-controller {} log tail:\n{}",
                p.identity,
                p.log_tail()
            );
        }
    }
    result
}

#[tokio::test]
async fn brokers_services_status_and_updates() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-brokers").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller =
        ControllerProcess::start(&c, &ns, "solo", &["--node-loss-delay", "10m"]).await?;
    let result = brokers_services_status_and_updates_body(&c, &ns, &controller).await;
    explain(result, &[&controller])
}

async fn brokers_services_status_and_updates_body(
    c: &Cluster,
    ns: &str,
    controller: &ControllerProcess,
) -> Result<()> {
    let start = Instant::now();
    let cfg_uid = apply_configuration(
        c,
        ns,
        &configuration(
            "cam",
            2,
            json!({"brokerPodSpec": broker_pod_spec("v1")}),
            Some(80),
        ),
    )
    .await?;
    let instance = "cam-a1b2c3";
    let props = BTreeMap::from([("DEBUG_ECHO_DESCRIPTION", "foo")]);
    agent_apply(c, ns, instance, "cam", &cfg_uid, NODE, 2, &props, &[]).await?;

    // One broker Pod for the one node, as Akri names it, with the contract's labels.
    let pod_name = format!("{NODE}-{instance}-pod");
    let pod = wait_broker(c, ns, &pod_name, None).await?;
    report_time("broker Pod created after Instance", start);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get("akri.sh/configuration").map(String::as_str) == Some("cam"),
        "{labels:?}"
    );
    ensure!(
        labels.get("akri.sh/instance").map(String::as_str) == Some(instance),
        "{labels:?}"
    );
    ensure!(
        labels.get("akri.sh/target-node").map(String::as_str) == Some(NODE),
        "{labels:?}"
    );
    ensure!(
        labels.get("controller").map(String::as_str) == Some("akri.sh"),
        "{labels:?}"
    );
    let owner = &pod.metadata.owner_references.clone().unwrap_or_default()[0];
    ensure!(owner.kind == "Instance" && owner.name == instance && owner.controller == Some(true));
    let spec = pod.spec.clone().context("pod spec")?;
    let requests = spec.containers[0]
        .resources
        .clone()
        .and_then(|r| r.requests)
        .unwrap_or_default();
    ensure!(
        requests.contains_key(&format!("akri.sh/{instance}"))
            && !requests.contains_key("{{PLACEHOLDER}}"),
        "placeholder not replaced: {requests:?}"
    );
    let affinity = serde_json::to_value(&spec.affinity)?;
    ensure!(
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchFields"][0]["values"][0]
            == NODE,
        "no node affinity: {affinity}"
    );

    // Services per Instance and per Configuration, with selectors and owners.
    let services = Api::<Service>::namespaced(c.client(), ns);
    let isvc = wait_until("instance service", ACT, || async {
        services
            .get_opt(&format!("{instance}-svc"))
            .await
            .map_err(Into::into)
    })
    .await?;
    let csvc = wait_until("configuration service", ACT, || async {
        services.get_opt("cam-svc").await.map_err(Into::into)
    })
    .await?;
    let selector = isvc
        .spec
        .clone()
        .and_then(|s| s.selector)
        .unwrap_or_default();
    ensure!(
        selector.get("akri.sh/instance").map(String::as_str) == Some(instance),
        "{selector:?}"
    );
    let selector = csvc
        .spec
        .clone()
        .and_then(|s| s.selector)
        .unwrap_or_default();
    ensure!(
        selector.get("akri.sh/configuration").map(String::as_str) == Some("cam"),
        "{selector:?}"
    );
    ensure!(csvc.metadata.owner_references.clone().unwrap_or_default()[0].kind == "Configuration");
    ensure!(isvc.metadata.owner_references.clone().unwrap_or_default()[0].kind == "Instance");

    // Status: the Configuration says the broker is not ready yet (no agent advertises the
    // resource here), the Instance says so too.
    let cfg = wait_until("configuration status", ACT, || async {
        let cfg = configurations(c, ns).get("cam").await?;
        Ok(
            (cfg.data["status"]["instances"] == 1 && condition(&cfg, "BrokersDegraded").is_some())
                .then_some(cfg),
        )
    })
    .await?;
    ensure!(cfg.data["status"]["observedGeneration"] == json!(cfg.metadata.generation));
    let degraded = condition(&cfg, "BrokersDegraded")
        .cloned()
        .unwrap_or_default();
    ensure!(
        degraded["status"] == "True" && degraded["reason"] == "BrokersNotReady",
        "{degraded}"
    );
    let ready = condition(&cfg, "Ready").cloned().unwrap_or_default();
    ensure!(
        ready["status"] == "False" && ready["reason"] == "BrokersDegraded",
        "{ready}"
    );
    let inst = wait_until("instance status", ACT, || async {
        let i = instances(c, ns).get(instance).await?;
        Ok(condition(&i, "BrokersReady").is_some().then_some(i))
    })
    .await?;
    ensure!(
        inst.data["status"]["usedSlots"] == 0,
        "{}",
        inst.data["status"]
    );
    // The controller wrote status only: it owns no spec field of the Instance.
    for entry in inst.metadata.managed_fields.clone().unwrap_or_default() {
        if entry.manager.as_deref() == Some("verge-controller") {
            ensure!(
                entry.subresource.as_deref() == Some("status"),
                "controller owns non-status fields: {entry:?}"
            );
        }
    }
    // `kubectl get akric` shows the status columns.
    let table = c.kubectl(&["get", "akric", "-n", ns]).await?;
    ensure!(
        table.contains("INSTANCES") && table.contains("READY"),
        "{table}"
    );
    let row = table.lines().nth(1).unwrap_or_default();
    ensure!(
        row.contains("False"),
        "printer columns lack the Ready status: {table}"
    );
    println!("kubectl get akric:\n{table}");

    // Metrics of this controller.
    let (code, text) = controller.get("/metrics").await?;
    ensure!(code == 200, "metrics: {code}");
    for name in [
        "verge_controller_leader 1",
        "verge_controller_reconcile_duration_seconds_count{controller=\"instance\"}",
        "verge_controller_reconcile_duration_seconds_count{controller=\"configuration\"}",
        "verge_controller_reconcile_errors",
        "verge_controller_broker_pods",
        "verge_controller_node_removals_total",
    ] {
        ensure!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    ensure!(controller.get("/healthz").await?.0 == 200);
    ensure!(controller.get("/readyz").await?.0 == 200);

    // A deleted broker is recreated.
    let t = Instant::now();
    let pods = Api::<Pod>::namespaced(c.client(), ns);
    pods.delete(&pod_name, &DeleteParams::default()).await?;
    let recreated = wait_broker(c, ns, &pod_name, pod.metadata.uid.as_deref()).await?;
    report_time("deleted broker recreated", t);

    // A changed Service spec: both Services follow.
    let t = Instant::now();
    apply_configuration(
        c,
        ns,
        &configuration(
            "cam",
            2,
            json!({"brokerPodSpec": broker_pod_spec("v1")}),
            Some(8081),
        ),
    )
    .await?;
    wait_until("services on port 8081", ACT, || async {
        let i = services.get(&format!("{instance}-svc")).await?;
        let cs = services.get("cam-svc").await?;
        Ok((service_port(&i) == Some(8081) && service_port(&cs) == Some(8081)).then_some(()))
    })
    .await?;
    report_time(
        "services follow instanceServiceSpec/configurationServiceSpec",
        t,
    );
    // clusterIP was never sent, so the Service kept its allocated address.
    let isvc2 = services.get(&format!("{instance}-svc")).await?;
    ensure!(isvc2.spec.and_then(|s| s.cluster_ip) == isvc.spec.and_then(|s| s.cluster_ip));

    // A changed brokerPodSpec replaces the broker.
    let t = Instant::now();
    apply_configuration(
        c,
        ns,
        &configuration(
            "cam",
            2,
            json!({"brokerPodSpec": broker_pod_spec("v2")}),
            Some(8081),
        ),
    )
    .await?;
    let rolled = wait_until("broker with the new spec", ACT, || async {
        let pod = wait_broker(c, ns, &pod_name, recreated.metadata.uid.as_deref()).await?;
        let env = pod
            .spec
            .clone()
            .and_then(|s| s.containers[0].env.clone())
            .unwrap_or_default();
        Ok(env
            .iter()
            .any(|e| e.name == "VERGE_TEST_MARKER" && e.value.as_deref() == Some("v2"))
            .then_some(pod))
    })
    .await?;
    report_time("brokerPodSpec change rolled the broker", t);
    wait_event(c, ns, "BrokerSpecChanged").await?;

    // Changed Instance properties replace the broker, with an Event.
    let t = Instant::now();
    let props2 = BTreeMap::from([("DEBUG_ECHO_DESCRIPTION", "bar")]);
    agent_apply(c, ns, instance, "cam", &cfg_uid, NODE, 2, &props2, &[]).await?;
    wait_broker(c, ns, &pod_name, rolled.metadata.uid.as_deref()).await?;
    report_time("Instance property change replaced the broker", t);
    wait_event(c, ns, "InstancePropertiesChanged").await?;

    // Capacity bounds the brokers: three nodes, capacity 2.
    for node in ["verge-ghost-a", "verge-ghost-b"] {
        agent_apply(c, ns, instance, "cam", &cfg_uid, node, 2, &props2, &[]).await?;
    }
    let inst = instances(c, ns).get(instance).await?;
    ensure!(inst.data["spec"]["nodes"].as_array().map(Vec::len) == Some(3));
    wait_until("two brokers for capacity 2", ACT, || async {
        Ok((broker_pods(c, ns, instance).await?.len() == 2).then_some(()))
    })
    .await?;
    // Once the controller has judged all three nodes (its status says two are wanted), there
    // are still exactly two.
    wait_until("Instance status counting 2 wanted brokers", ACT, || async {
        let i = instances(c, ns).get(instance).await?;
        let message = condition(&i, "BrokersReady")
            .and_then(|c| c["message"].as_str().map(String::from))
            .unwrap_or_default();
        Ok(message.contains("of 2 brokers").then_some(()))
    })
    .await?;
    let n = broker_pods(c, ns, instance).await?.len();
    ensure!(n == 2, "capacity 2 but {n} brokers");

    // Deleting the Configuration removes everything it owns, with no finalizer anywhere.
    let t = Instant::now();
    configurations(c, ns)
        .delete("cam", &DeleteParams::foreground())
        .await?;
    wait_until("configuration, instance, brokers and services gone", Duration::from_secs(120), || async {
        let left_cfg = configurations(c, ns).get_opt("cam").await?.is_some();
        let left_inst = instances(c, ns).list(&ListParams::default()).await?.items.len();
        let left_pods = Api::<Pod>::namespaced(c.client(), ns)
            .list(&ListParams::default().labels("controller=akri.sh"))
            .await?
            .items
            .len();
        let left_svcs = services.list(&ListParams::default()).await?.items.len();
        if !left_cfg && left_inst == 0 && left_pods == 0 && left_svcs == 0 {
            Ok(Some(()))
        } else {
            Err(anyhow!(
                "left: configuration={left_cfg} instances={left_inst} pods={left_pods} services={left_svcs}"
            ))
        }
    })
    .await?;
    report_time(
        "Configuration deletion removed Instances, brokers and Services",
        t,
    );
    Ok(())
}

#[tokio::test]
async fn lost_node_leaves_instances_without_stealing_fields() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-nodeloss").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(
        &c,
        &ns,
        "solo",
        &["--node-loss-delay", "3s", "--node-check-interval", "1s"],
    )
    .await?;
    let result = lost_node_body(&c, &ns).await;
    explain(result, &[&controller])
}

async fn lost_node_body(c: &Cluster, ns: &str) -> Result<()> {
    let cfg_uid = apply_configuration(
        c,
        ns,
        &configuration(
            "dev",
            3,
            json!({"brokerPodSpec": broker_pod_spec("v1")}),
            None,
        ),
    )
    .await?;
    let ghost = "verge-gone-node";
    let props = BTreeMap::from([("DEBUG_ECHO_DESCRIPTION", "foo")]);
    // Shared by a real node and a node that does not exist; each holds a slot.
    let shared = "dev-aaaaaa";
    agent_apply(c, ns, shared, "dev", &cfg_uid, NODE, 3, &props, &["0"]).await?;
    let t = Instant::now();
    agent_apply(c, ns, shared, "dev", &cfg_uid, ghost, 3, &props, &["1"]).await?;
    // Seen only by the missing node.
    let only = "dev-bbbbbb";
    agent_apply(c, ns, only, "dev", &cfg_uid, ghost, 3, &props, &["0"]).await?;

    let inst = wait_until(
        "lost node removed from the shared Instance",
        ACT,
        || async {
            let i = instances(c, ns).get(shared).await?;
            Ok((i.data["spec"]["nodes"] == json!([NODE])).then_some(i))
        },
    )
    .await?;
    report_time("lost node left the Instance (delay 3s)", t);
    let usage = &inst.data["spec"]["deviceUsage"];
    ensure!(
        usage == &json!({format!("{shared}-0"): NODE}),
        "the lost node's slot should be released and the other kept: {usage}"
    );
    // Nobody took ownership of the agents' fields: verge-controller owns status only, and
    // no manager is "unknown" or a merge patch.
    for entry in inst.metadata.managed_fields.clone().unwrap_or_default() {
        let manager = entry.manager.clone().unwrap_or_default();
        ensure!(
            manager.starts_with("verge-agent/")
                || (manager == "verge-controller"
                    && entry.subresource.as_deref() == Some("status")),
            "unexpected field manager on the Instance: {entry:?}"
        );
        ensure!(
            entry.operation.as_deref() == Some("Apply"),
            "non-apply write: {entry:?}"
        );
    }
    let gone = wait_until(
        "Instance seen only by the lost node deleted",
        ACT,
        || async {
            Ok(instances(c, ns)
                .get_opt(only)
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await;
    gone?;
    // Its broker Pods for the lost node are gone too.
    wait_until("brokers of the lost node deleted", ACT, || async {
        let pods = Api::<Pod>::namespaced(c.client(), ns)
            .list(&ListParams::default().labels(&format!("akri.sh/target-node={ghost}")))
            .await?;
        Ok(pods.items.is_empty().then_some(()))
    })
    .await?;
    // The node comes back: its agent applies again, not forced, and nothing conflicts.
    agent_apply(c, ns, shared, "dev", &cfg_uid, ghost, 3, &props, &["1"])
        .await
        .context("the returning agent's apply conflicted")?;
    let i = instances(c, ns).get(shared).await?;
    ensure!(
        i.data["spec"]["nodes"].as_array().map(Vec::len) == Some(2),
        "{}",
        i.data["spec"]
    );
    Ok(())
}

#[tokio::test]
async fn broker_job_per_instance_and_generation() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-job").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(&c, &ns, "solo", &[]).await?;
    let result = job_body(&c, &ns).await;
    explain(result, &[&controller])
}

fn job_spec(marker: &str) -> Value {
    // No device resource: without an agent the Job still runs, which is what this test checks.
    json!({"brokerJobSpec": {
        "backoffLimit": 0,
        "template": {"spec": {
            "restartPolicy": "Never",
            // Node 1: the two-node test stops node 2's kubelet meanwhile.
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "containers": [{
                "name": "job",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["verge-test-broker", "env"],
                "env": [{"name": "VERGE_TEST_MARKER", "value": marker}],
            }],
        }},
    }})
}

async fn job_body(c: &Cluster, ns: &str) -> Result<()> {
    let t = Instant::now();
    let uid = apply_configuration(c, ns, &configuration("batch", 1, job_spec("g1"), None)).await?;
    let instance = "batch-cccccc";
    agent_apply(
        c,
        ns,
        instance,
        "batch",
        &uid,
        NODE,
        1,
        &BTreeMap::new(),
        &[],
    )
    .await?;
    let generation = configurations(c, ns)
        .get("batch")
        .await?
        .metadata
        .generation
        .unwrap_or(1);
    let jobs = Api::<Job>::namespaced(c.client(), ns);
    let first = format!("{instance}-{generation}-job");
    wait_until(
        &format!("job {first} complete"),
        Duration::from_secs(120),
        || async {
            let Some(job) = jobs.get_opt(&first).await? else {
                return Ok(None);
            };
            let done = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) >= 1;
            Ok(done.then_some(()))
        },
    )
    .await?;
    report_time("broker Job ran to completion", t);
    let job = jobs.get(&first).await?;
    let labels = job.metadata.labels.unwrap_or_default();
    ensure!(
        labels.get("akri.sh/instance").map(String::as_str) == Some(instance),
        "{labels:?}"
    );
    ensure!(job.metadata.owner_references.unwrap_or_default()[0].kind == "Instance");

    // A new Configuration generation gives a new Job; the old one goes.
    apply_configuration(c, ns, &configuration("batch", 1, job_spec("g2"), None)).await?;
    let generation2 = configurations(c, ns)
        .get("batch")
        .await?
        .metadata
        .generation
        .unwrap_or(2);
    ensure!(generation2 > generation);
    let second = format!("{instance}-{generation2}-job");
    wait_until("new job, old gone", ACT, || async {
        let names: Vec<String> = jobs
            .list(&labels_selector(instance))
            .await?
            .items
            .into_iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .filter_map(|j| j.metadata.name)
            .collect();
        Ok((names == vec![second.clone()]).then_some(()))
    })
    .await?;
    let cfg = wait_until("configuration reports the job", ACT, || async {
        let cfg = configurations(c, ns).get("batch").await?;
        let degraded = condition(&cfg, "BrokersDegraded")
            .cloned()
            .unwrap_or_default();
        Ok((degraded["status"] == "False"
            && cfg.data["status"]["observedGeneration"] == generation2)
            .then_some(cfg))
    })
    .await?;
    ensure!(cfg.data["status"]["brokers"] == 1, "{}", cfg.data["status"]);
    Ok(())
}

#[tokio::test]
async fn invalid_broker_spec_becomes_a_condition() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-invalid").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(&c, &ns, "solo", &[]).await?;
    let result = async {
        let mut spec = broker_pod_spec("x");
        spec["containers"][0]["name"] = json!("Not A Valid Name");
        apply_configuration(
            &c,
            &ns,
            &configuration("bad", 1, json!({"brokerPodSpec": spec}), None),
        )
        .await?;
        let cfg = wait_until("InvalidSpec condition", ACT, || async {
            let cfg = configurations(&c, &ns).get("bad").await?;
            let ready = condition(&cfg, "Ready").cloned().unwrap_or_default();
            Ok((ready["reason"] == "InvalidSpec").then_some(ready))
        })
        .await?;
        ensure!(cfg["status"] == "False");
        ensure!(
            cfg["message"]
                .as_str()
                .unwrap_or_default()
                .contains("brokerPodSpec"),
            "{cfg}"
        );
        wait_event(&c, &ns, "InvalidSpec").await?;
        // The controller is still up.
        ensure!(controller.get("/healthz").await?.0 == 200);
        Ok(())
    }
    .await;
    explain(result, &[&controller])
}

/// Lease settings of the failover test: a standby takes over 4s after the leader dies.
const FAST_LEASE: &[&str] = &[
    "--lease-duration",
    "4s",
    "--lease-renew-deadline",
    "3s",
    "--lease-retry-period",
    "500ms",
];

async fn lease_holder(c: &Cluster, ns: &str) -> Result<Option<String>> {
    Ok(Api::<Lease>::namespaced(c.client(), ns)
        .get_opt("verge-controller")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

#[tokio::test]
async fn two_replicas_one_leader_and_failover() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-leader").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let mut a = ControllerProcess::start(&c, &ns, "replica-a", FAST_LEASE).await?;
    // Let replica-a win first, so the test knows whom to kill.
    explain(
        wait_until("replica-a leads", ACT, || async {
            Ok((lease_holder(&c, &ns).await?.as_deref() == Some("replica-a")).then_some(()))
        })
        .await,
        &[&a],
    )?;
    let mut b = ControllerProcess::start(&c, &ns, "replica-b", FAST_LEASE).await?;
    let result = async {
        let uid = apply_configuration(
            &c,
            &ns,
            &configuration(
                "ha",
                1,
                json!({"brokerPodSpec": broker_pod_spec("v1")}),
                None,
            ),
        )
        .await?;
        agent_apply(
            &c,
            &ns,
            "ha-dddddd",
            "ha",
            &uid,
            NODE,
            1,
            &BTreeMap::new(),
            &[],
        )
        .await?;
        wait_broker(&c, &ns, &format!("{NODE}-ha-dddddd-pod"), None).await?;
        // Exactly one acts: every Event comes from the leader, and the standby says it is not leader.
        let (_, metrics_b) = b.get("/metrics").await?;
        ensure!(
            metrics_b.contains("verge_controller_leader 0"),
            "standby claims leadership"
        );
        ensure!(b.get("/readyz").await?.0 == 200, "standby not ready");
        for e in events(&c, &ns).await? {
            if e.reporting_component.as_deref() == Some("verge-controller") {
                ensure!(
                    e.reporting_instance.as_deref() == Some("replica-a"),
                    "event from a standby: {e:?}"
                );
            }
        }

        // Kill the leader without a chance to release the Lease: the standby takes over after
        // the lease duration (4s here).
        let t = Instant::now();
        a.child.start_kill()?;
        a.child.wait().await?;
        wait_until("replica-b leads", ACT, || async {
            Ok((lease_holder(&c, &ns).await?.as_deref() == Some("replica-b")).then_some(()))
        })
        .await?;
        report_time("leader failover after SIGKILL (lease 4s)", t);
        // The new leader acts: a deleted broker comes back.
        let pod_name = format!("{NODE}-ha-dddddd-pod");
        let pod = Api::<Pod>::namespaced(c.client(), &ns)
            .get(&pod_name)
            .await?;
        Api::<Pod>::namespaced(c.client(), &ns)
            .delete(&pod_name, &DeleteParams::default())
            .await?;
        wait_broker(&c, &ns, &pod_name, pod.metadata.uid.as_deref()).await?;
        report_time("new leader recreated a deleted broker", t);
        let (_, metrics_b) = b.get("/metrics").await?;
        ensure!(
            metrics_b.contains("verge_controller_leader 1"),
            "new leader's metric"
        );

        // A graceful stop (SIGTERM) releases the Lease: a third replica takes over without
        // waiting for it to expire, and the stopped one exits 0.
        let mut standby = ControllerProcess::start(&c, &ns, "replica-c", FAST_LEASE).await?;
        wait_until("replica-c up", ACT, || async {
            Ok((standby.get("/readyz").await.ok().map(|r| r.0) == Some(200)).then_some(()))
        })
        .await?;
        let pid = b.child.id().context("replica-b has no pid")?;
        let t = Instant::now();
        verge_e2e::run_ok(
            std::path::Path::new("kill"),
            &["-TERM", &pid.to_string()],
            None,
        )
        .await?;
        let status = tokio::time::timeout(ACT, b.child.wait()).await??;
        ensure!(status.success(), "replica-b exited with {status}");
        wait_until("replica-c leads", ACT, || async {
            Ok((lease_holder(&c, &ns).await?.as_deref() == Some("replica-c")).then_some(()))
        })
        .await?;
        report_time("leader handover after SIGTERM (Lease released)", t);
        standby.child.start_kill()?;
        Ok(())
    }
    .await;
    explain(result, &[&a, &b])
}

/// The node agent (`verge-agent run`) as a host process on node 1, serving only `ns`; killed when
/// dropped. Its device-plugin sockets go to node 1's real kubelet directory.
struct AgentProcess {
    _child: tokio::process::Child,
    availability: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent of `node` (node 1 on the host, other nodes through `cluster node-exec`,
    /// in their mount and network namespaces). `availability` is the debugEcho switch file.
    async fn start(
        c: &Cluster,
        ns: &str,
        node: &str,
        availability: &std::path::Path,
    ) -> Result<Self> {
        let bin = controller_bin()?.with_file_name("verge-agent");
        ensure!(
            bin.exists(),
            "{} not found: build it with `cargo build -p verge-agent` (`cluster images` does)",
            bin.display()
        );
        let dir = std::env::temp_dir().join(format!("verge-e2e-agent-{ns}-{node}"));
        std::fs::create_dir_all(dir.join("handlers"))?;
        if !availability.exists() {
            std::fs::write(availability, "ONLINE")?;
        }
        let log = dir.join("agent.log");
        // Appended: a restarted agent keeps the earlier run's lines for the conflict check.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        let mut command = if node == NODE {
            tokio::process::Command::new(&bin)
        } else {
            let mut cmd = tokio::process::Command::new(verge_e2e::cluster_script());
            cmd.args(["node-exec", node]).arg(&bin);
            cmd
        };
        let child = command
            .arg("run")
            .env("KUBECONFIG", c.kubeconfig())
            .env("NODE_NAME", node)
            .env("WATCH_NAMESPACE", ns)
            .env("DISCOVERY_HANDLERS_DIRECTORY", dir.join("handlers"))
            .env("METRICS_ADDRESS", format!("127.0.0.1:{}", free_port()?))
            .env("DEBUG_ECHO_AVAILABILITY_FILE", availability)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting verge-agent")?;
        Ok(Self {
            _child: child,
            availability: availability.to_path_buf(),
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn set_available(&self, online: bool) -> Result<()> {
        std::fs::write(
            &self.availability,
            if online { "ONLINE" } else { "OFFLINE" },
        )?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn echo_configuration(
    name: &str,
    availability: &std::path::Path,
    port: u16,
    extra: Option<&str>,
) -> Value {
    let mut cfg = configuration(
        name,
        1,
        json!({"brokerPodSpec": broker_pod_spec("agent")}),
        Some(port),
    );
    cfg["metadata"]["annotations"] = json!({"akri.sh/device-grace-period": "0s"});
    cfg["spec"]["discoveryHandler"]["discoveryDetails"] = json!(format!(
        "descriptions: [foo0]\navailabilityFile: {}",
        availability.display()
    ));
    if let Some(extra) = extra {
        cfg["spec"]["brokerProperties"] = json!({"VERGE_EXTRA": extra});
    }
    cfg
}

/// The one Instance of the namespace, once it exists.
async fn wait_instance(c: &Cluster, ns: &str) -> Result<String> {
    wait_until("the agent's Instance", Duration::from_secs(90), || async {
        let items = instances(c, ns).list(&ListParams::default()).await?.items;
        Ok(items
            .into_iter()
            .find(|i| i.metadata.deletion_timestamp.is_none())
            .and_then(|i| i.metadata.name))
    })
    .await
}

/// The Ready broker Pod of `instance` whose log shows `env_line`.
async fn wait_ready_broker_with(
    c: &Cluster,
    ns: &str,
    instance: &str,
    env_line: &str,
) -> Result<String> {
    wait_until(
        &format!("Ready broker of {instance} with {env_line}"),
        Duration::from_secs(120),
        || async {
            for pod in broker_pods(c, ns, instance).await? {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready && c.logs(ns, &name).await?.lines().any(|l| l == env_line) {
                    return Ok(Some(name));
                }
                if !ready {
                    return Err(anyhow!("{name}: {}", verge_e2e::pod_summary(&pod)));
                }
            }
            Ok(None)
        },
    )
    .await
}

async fn get_via(c: &Cluster, ns: &str, url: &str) -> Result<String> {
    wait_until(&format!("GET {url}"), Duration::from_secs(60), || async {
        Ok(Some(
            c.exec(ns, "client", &["verge-test-broker", "get", url])
                .await?,
        ))
    })
    .await
}

#[tokio::test]
async fn with_agent_brokers_run_serve_and_follow_devices() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-agent").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(&c, &ns, "solo", &[]).await?;
    let availability = std::env::temp_dir().join(format!("verge-e2e-availability-{ns}"));
    std::fs::write(&availability, "ONLINE")?;
    let agent = AgentProcess::start(&c, &ns, NODE, &availability).await?;
    let result = with_agent_body(&c, &ns, &agent).await;
    if result.is_err() {
        eprintln!("--- verge-agent log tail:\n{}", agent.log_tail());
    }
    explain(result, &[&controller])
}

async fn with_agent_body(c: &Cluster, ns: &str, agent: &AgentProcess) -> Result<()> {
    // kubelet resource names are per node, not per namespace: a unique Configuration name.
    let suffix: String = ns.chars().rev().take(6).collect();
    let cfg = format!("echo{suffix}");
    let t = Instant::now();
    c.create_pod(
        ns,
        verge_e2e::broker_pod("client", json!({"app": "client"}), Some(NODE)),
    )
    .await?;
    apply_configuration(
        c,
        ns,
        &echo_configuration(&cfg, &agent.availability, 80, None),
    )
    .await?;
    let instance = wait_instance(c, ns).await?;
    report_time("agent created the Instance", t);
    let broker = wait_ready_broker_with(c, ns, &instance, "DEBUG_ECHO_DESCRIPTION=foo0").await?;
    report_time(
        "broker Running+Ready with DEBUG_ECHO_DESCRIPTION from the device plugin",
        t,
    );
    ensure!(
        broker == format!("{NODE}-{instance}-pod"),
        "broker name {broker}"
    );
    c.wait_pod_ready(ns, "client", Duration::from_secs(90))
        .await?;
    for svc in [format!("{instance}-svc"), format!("{cfg}-svc")] {
        let body = get_via(c, ns, &format!("http://{svc}/env/DEBUG_ECHO_DESCRIPTION")).await?;
        ensure!(body.trim() == "foo0", "{svc} answered {body:?}");
    }
    report_time(
        "instance and configuration Services answer HTTP from another pod",
        t,
    );
    let status = wait_until("Configuration Ready", ACT, || async {
        let obj = configurations(c, ns).get(&cfg).await?;
        let ready = condition(&obj, "Ready").cloned().unwrap_or_default();
        Ok((ready["status"] == "True" && obj.data["status"]["brokers"] == 1).then_some(obj))
    })
    .await?;
    ensure!(status.data["status"]["instances"] == 1);
    println!("{}", c.kubectl(&["get", "akric,akrii", "-n", ns]).await?);

    // Devices OFFLINE: Instance, broker and Services go. ONLINE: they come back.
    let t = Instant::now();
    agent.set_available(false)?;
    let services = Api::<Service>::namespaced(c.client(), ns);
    wait_until(
        "everything gone while OFFLINE",
        Duration::from_secs(90),
        || async {
            let insts = instances(c, ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
            let pods = broker_pods(c, ns, &instance).await?.len();
            let svcs = services.list(&ListParams::default()).await?.items.len();
            if insts == 0 && pods == 0 && svcs == 0 {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "left: instances={insts} brokers={pods} services={svcs}"
                ))
            }
        },
    )
    .await?;
    report_time("OFFLINE: Instance, brokers and Services gone", t);
    let t = Instant::now();
    agent.set_available(true)?;
    let back = wait_instance(c, ns).await?;
    ensure!(back == instance, "the same device got another name: {back}");
    wait_ready_broker_with(c, ns, &instance, "DEBUG_ECHO_DESCRIPTION=foo0").await?;
    get_via(
        c,
        ns,
        &format!("http://{instance}-svc/env/DEBUG_ECHO_DESCRIPTION"),
    )
    .await?;
    report_time("ONLINE: broker and Services back", t);

    // New properties reach the device's Instance; the broker is replaced and sees them.
    let t = Instant::now();
    apply_configuration(
        c,
        ns,
        &echo_configuration(&cfg, &agent.availability, 80, Some("two")),
    )
    .await?;
    wait_ready_broker_with(c, ns, &instance, "VERGE_EXTRA=two").await?;
    wait_event(c, ns, "InstancePropertiesChanged").await?;
    report_time(
        "Instance property change: broker replaced with the new env",
        t,
    );
    Ok(())
}

/// Starts node 2's kubelet again when dropped, also when the test fails midway.
struct KubeletBack(&'static str);

impl Drop for KubeletBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(verge_e2e::cluster_script())
            .args(["start", "kubelet", "--node", self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn instance_nodes(c: &Cluster, ns: &str, instance: &str) -> Result<Vec<String>> {
    let obj = instances(c, ns).get(instance).await?;
    Ok(serde_json::from_value(obj.data["spec"]["nodes"].clone()).unwrap_or_default())
}

/// Two nodes, an agent on each, one shared device: stopping node 2's kubelet removes node 2 from
/// the Instance and deletes its broker after the node-loss delay; starting it again brings node 2
/// back without any field-manager conflict. Needs `cluster up --nodes 2`; skips on one node.
#[tokio::test]
async fn with_agents_on_two_nodes_a_lost_node_leaves_and_rejoins() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    const NODE2: &str = "verge-node-2";
    if !c.node_names().await?.iter().any(|n| n == NODE2) {
        eprintln!(
            "verge-e2e: SKIPPING the two-node controller test: no {NODE2} (use `cluster up --nodes 2`)"
        );
        return Ok(());
    }
    // Stopping a kubelet is disruptive: no other process's e2e test runs meanwhile.
    let _serial = verge_e2e::serial().await;
    let ns = c.namespace("ctl-twonodes").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(
        &c,
        &ns,
        "solo",
        &["--node-loss-delay", "5s", "--node-check-interval", "1s"],
    )
    .await?;
    let availability = std::env::temp_dir().join(format!("verge-e2e-availability-{ns}"));
    std::fs::write(&availability, "ONLINE")?;
    let agent1 = AgentProcess::start(&c, &ns, NODE, &availability).await?;
    let mut agent2 = Some(AgentProcess::start(&c, &ns, NODE2, &availability).await?);
    let agent2_log = agent2.as_ref().map(|a| a.log.clone()).unwrap_or_default();
    let logs = [
        ("controller", controller.log.clone()),
        ("agent 1", agent1.log.clone()),
        ("agent 2", agent2_log.clone()),
    ];
    let result = two_nodes_body(&c, &ns, &availability, &mut agent2, &logs).await;
    if result.is_err() {
        eprintln!("--- agent on {NODE}:\n{}", agent1.log_tail());
        let text = std::fs::read_to_string(&agent2_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- agent on {NODE2}:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    // From the node going down on, nothing may conflict. (Before, two kubelets allocating the
    // same free slot at once is settled by the agents' designed 409 on slot claims.)
    let result = result.and_then(|marks| {
        for ((who, path), mark) in logs.iter().zip(marks) {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let conflicts: Vec<&str> = text
                .get(mark..)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.to_ascii_lowercase().contains("conflict"))
                .collect();
            ensure!(
                conflicts.is_empty(),
                "{who} logged conflicts after node 2 went down: {conflicts:#?}"
            );
        }
        Ok(())
    });
    explain(result, &[&controller])
}

/// Returns how long each of `logs` was when node 2 went down.
async fn two_nodes_body(
    c: &Cluster,
    ns: &str,
    availability: &std::path::Path,
    agent2: &mut Option<AgentProcess>,
    logs: &[(&str, PathBuf)],
) -> Result<Vec<usize>> {
    const NODE2: &str = "verge-node-2";
    let suffix: String = ns.chars().rev().take(6).collect();
    let cfg = format!("two{suffix}");
    let mut config = echo_configuration(&cfg, availability, 80, None);
    config["spec"]["capacity"] = json!(2);
    apply_configuration(c, ns, &config).await?;
    let instance = wait_instance(c, ns).await?;
    wait_until(
        "both nodes in the Instance",
        Duration::from_secs(90),
        || async {
            let nodes = instance_nodes(c, ns, &instance).await?;
            Ok((nodes.len() == 2).then_some(()))
        },
    )
    .await?;
    let pods = Api::<Pod>::namespaced(c.client(), ns);
    let node2_broker = format!("{NODE2}-{instance}-pod");
    c.wait_pod_ready(
        ns,
        &format!("{NODE}-{instance}-pod"),
        Duration::from_secs(120),
    )
    .await?;
    c.wait_pod_ready(ns, &node2_broker, Duration::from_secs(120))
        .await?;

    // Node 2 goes down: its kubelet stops and so does its agent (an agent left running would,
    // by design, list its node again, since it still sees the device).
    let marks: Vec<usize> = logs
        .iter()
        .map(|(_, p)| std::fs::read(p).map(|b| b.len()).unwrap_or(0))
        .collect();
    let t = Instant::now();
    verge_e2e::cluster_cmd(&["stop", "kubelet", "--node", NODE2]).await?;
    let kubelet = KubeletBack(NODE2);
    *agent2 = None;
    wait_until(
        "node 2 out of the Instance and its broker gone",
        Duration::from_secs(240),
        || async {
            let nodes = instance_nodes(c, ns, &instance).await?;
            let broker = pods.get_opt(&node2_broker).await?;
            if nodes == vec![NODE.to_string()] && broker.is_none() {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "nodes {nodes:?}, node-2 broker present: {}",
                    broker.is_some()
                ))
            }
        },
    )
    .await?;
    report_time(
        "kubelet stopped: node left the Instance, broker gone (node-loss delay 5s)",
        t,
    );
    // The broker on node 1 is untouched.
    c.wait_pod_ready(
        ns,
        &format!("{NODE}-{instance}-pod"),
        Duration::from_secs(10),
    )
    .await?;

    let t = Instant::now();
    drop(kubelet);
    wait_until("node 2 Ready again", Duration::from_secs(120), || async {
        Ok(c.node_ready(NODE2).await?.then_some(()))
    })
    .await?;
    *agent2 = Some(AgentProcess::start(c, ns, NODE2, availability).await?);
    wait_until(
        "node 2 back in the Instance",
        Duration::from_secs(120),
        || async {
            let nodes = instance_nodes(c, ns, &instance).await?;
            Ok((nodes.len() == 2).then_some(()))
        },
    )
    .await?;
    c.wait_pod_ready(ns, &node2_broker, Duration::from_secs(120))
        .await?;
    report_time(
        "kubelet started: node rejoined and its broker runs again",
        t,
    );
    Ok(marks)
}

/// The next live Pod named `name` with a UID other than `uid`, and when it was first seen.
async fn wait_replacement(c: &Cluster, ns: &str, name: &str, uid: &str) -> Result<(Pod, Instant)> {
    let pod = wait_broker(c, ns, name, Some(uid)).await?;
    Ok((pod, Instant::now()))
}

/// Waits until Pod `name` with `uid` reports phase Failed; returns when that was seen.
async fn wait_failed(c: &Cluster, ns: &str, name: &str, uid: &str) -> Result<Instant> {
    let api = Api::<Pod>::namespaced(c.client(), ns);
    wait_until(&format!("{name} Failed"), ACT, || async {
        let Some(pod) = api.get_opt(name).await? else {
            return Err(anyhow!("{name} vanished before failing"));
        };
        let failed = pod.metadata.uid.as_deref() == Some(uid)
            && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed");
        Ok(failed.then(Instant::now))
    })
    .await
}

#[tokio::test]
async fn failed_and_stuck_brokers_are_replaced() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("ctl-replace").await?;
    let ns = ns.name().to_string();
    ensure_crds(&c).await?;
    let controller = ControllerProcess::start(
        &c,
        &ns,
        "solo",
        &[
            "--failed-backoff-initial",
            "2s",
            "--failed-backoff-max",
            "30s",
            "--pending-timeout",
            "4s",
        ],
    )
    .await?;
    let result = replace_body(&c, &ns).await;
    explain(result, &[&controller])
}

async fn replace_body(c: &Cluster, ns: &str) -> Result<()> {
    // A broker that exits at once (no device resource, so it runs without an agent).
    let crashing = json!({"brokerPodSpec": {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "broker",
            "image": BROKER_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["verge-test-broker", "no-such-command"],
        }],
    }});
    let uid = apply_configuration(c, ns, &configuration("crash", 1, crashing, None)).await?;
    agent_apply(
        c,
        ns,
        "crash-eeeeee",
        "crash",
        &uid,
        NODE,
        1,
        &BTreeMap::new(),
        &[],
    )
    .await?;
    let name = format!("{NODE}-crash-eeeeee-pod");
    let first = wait_broker(c, ns, &name, None).await?;
    let mut uid = first.metadata.uid.clone().unwrap_or_default();
    let mut gaps = Vec::new();
    for _ in 0..2 {
        let failed_at = wait_failed(c, ns, &name, &uid).await?;
        let (next, seen) = wait_replacement(c, ns, &name, &uid).await?;
        gaps.push(seen.duration_since(failed_at));
        uid = next.metadata.uid.clone().unwrap_or_default();
    }
    println!("failed broker replaced after {gaps:?} (backoff 2s, doubling)");
    ensure!(
        gaps[0] >= Duration::from_millis(1500),
        "first replacement too soon: {gaps:?}"
    );
    ensure!(
        gaps[1] >= Duration::from_millis(3500),
        "backoff did not grow: {gaps:?}"
    );
    wait_event(c, ns, "BrokerEnded").await?;
    let inst = instances(c, ns).get("crash-eeeeee").await?;
    let cond = condition(&inst, "BrokersReady")
        .cloned()
        .unwrap_or_default();
    ensure!(cond["status"] == "False", "{cond}");

    // A broker that cannot be scheduled (no agent advertises its device) is replaced after the
    // pending timeout.
    let uid = apply_configuration(
        c,
        ns,
        &configuration(
            "stuck",
            1,
            json!({"brokerPodSpec": broker_pod_spec("s")}),
            None,
        ),
    )
    .await?;
    agent_apply(
        c,
        ns,
        "stuck-ffffff",
        "stuck",
        &uid,
        NODE,
        1,
        &BTreeMap::new(),
        &[],
    )
    .await?;
    let name = format!("{NODE}-stuck-ffffff-pod");
    let t = Instant::now();
    let pending = wait_broker(c, ns, &name, None).await?;
    wait_broker(c, ns, &name, pending.metadata.uid.as_deref()).await?;
    report_time("Pending broker replaced (pending timeout 4s)", t);
    wait_event(c, ns, "BrokerPendingTooLong").await?;
    Ok(())
}
