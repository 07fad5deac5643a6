//! The agent's discoveryProperties (issue 4, item 2) on the real cluster: literal values,
//! Secret and ConfigMap keys, `optional`, cross-namespace refusal, an unresolved reference that
//! recovers when its Secret appears, and discovery restarting when a Secret value or
//! discoveryDetails change. debugEcho's `echoPropertyDigests` shows what reached the handler
//! (SHA-256 digests, never the values). Also: /readyz and /metrics on the live agent.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use sha2::Digest;
use verge_crds::{Configuration, Instance, naming};
use verge_e2e::agent::{Agent, ensure_crds};
use verge_e2e::{BROKER_IMAGE, Cluster, report_time, wait_until};

const NODE: &str = "verge-node-1";
/// Generous: outcomes are asserted, times are printed.
const DEADLINE: Duration = Duration::from_secs(90);
/// The agent re-reads referenced Secrets this often in this test (default 60 s).
const REFRESH: &str = "1s";

fn digest(value: &str) -> String {
    let hex: String = sha2::Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn secret_yaml(name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\nstringData:\n  {key}: \"{value}\"\n"
    )
}

/// A debugEcho Configuration echoing property digests, with `properties` as YAML list items.
fn config_yaml(name: &str, descriptions: &str, availability: &str, properties: &str) -> String {
    format!(
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptions: {descriptions}
      availabilityFile: {availability}
      echoPropertyDigests: true
    discoveryProperties:
{properties}
  capacity: 1
"
    )
}

async fn instances(api: &Api<Instance>, config: &str) -> Result<Vec<Instance>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|i| i.spec.configuration_name == config)
        .collect())
}

/// The condition of `config` on this node with reason `reason`, if set.
async fn condition_message(
    api: &Api<Configuration>,
    config: &str,
    reason: &str,
) -> Result<Option<String>> {
    let cfg = api.get(config).await?;
    Ok(cfg
        .status
        .and_then(|s| s.nodes.into_iter().find(|n| n.node == NODE))
        .and_then(|n| {
            n.conditions
                .into_iter()
                .find(|c| c.reason == reason && c.status == "False")
        })
        .map(|c| c.message))
}

#[tokio::test]
async fn discovery_properties_resolve_refuse_and_restart_discovery() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-props").await?;
    let ns_name = ns.name().to_string();
    let dir = std::env::temp_dir().join(format!("verge-e2e-props-{ns_name}"));
    std::fs::create_dir_all(&dir)?;
    let availability = dir.join("availability").display().to_string();
    let agent = Agent::start(NODE, &ns_name, &["--property-refresh-interval", REFRESH]).await?;

    c.apply_yaml(
        Some(&ns_name),
        &secret_yaml("creds", "password", "s3cret-1"),
    )
    .await?;
    c.apply_yaml(
        Some(&ns_name),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: site\ndata:\n  zone: north\n",
    )
    .await?;
    let started = Instant::now();
    c.apply_yaml(
        Some(&ns_name),
        &config_yaml(
            "props",
            "[p]",
            &availability,
            "    - name: PLAIN
      value: literal
    - name: PASSWORD
      valueFrom:
        secretKeyRef: {name: creds, key: password}
    - name: ZONE
      valueFrom:
        configMapKeyRef: {name: site, key: zone}
    - name: OPTIONAL
      valueFrom:
        secretKeyRef: {name: absent, key: x, optional: true}
    - name: OPTIONAL_KEY
      valueFrom:
        configMapKeyRef: {name: site, key: no-such-key, optional: true}",
        ),
    )
    .await?;
    let api: Api<Instance> = Api::namespaced(c.client(), &ns_name);
    let want = |k: &str, v: &str| (format!("DEBUG_ECHO_PROPERTY_{k}"), digest(v));
    let first = wait_until(
        "the Instance with resolved properties",
        DEADLINE,
        || async {
            let list = instances(&api, "props").await?;
            Ok(list.into_iter().find(|i| {
                let p = &i.spec.broker_properties;
                [
                    want("PLAIN", "literal"),
                    want("PASSWORD", "s3cret-1"),
                    want("ZONE", "north"),
                ]
                .iter()
                .all(|(k, v)| p.get(k) == Some(v))
            }))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    report_time(
        "Configuration with Secret/ConfigMap properties → Instance",
        started,
    );
    let p = &first.spec.broker_properties;
    ensure!(
        !p.contains_key("DEBUG_ECHO_PROPERTY_OPTIONAL")
            && !p.contains_key("DEBUG_ECHO_PROPERTY_OPTIONAL_KEY"),
        "optional references that do not resolve are left out: {p:?}"
    );
    let whole = serde_json::to_string(&first)?;
    ensure!(
        !whole.contains("s3cret"),
        "the Secret's value is in the Instance"
    );

    // A rotated Secret restarts discovery (read again every REFRESH).
    let t = Instant::now();
    c.apply_yaml(
        Some(&ns_name),
        &secret_yaml("creds", "password", "s3cret-2"),
    )
    .await?;
    let (k, v) = want("PASSWORD", "s3cret-2");
    wait_until(
        "the rotated password reaches the handler",
        DEADLINE,
        || async {
            let list = instances(&api, "props").await?;
            Ok(list
                .into_iter()
                .find(|i| i.spec.broker_properties.get(&k) == Some(&v)))
        },
    )
    .await?;
    report_time("Secret rotated → Instance properties updated", t);

    // Changed discoveryDetails restart discovery too: a second description is a second device,
    // and the first device keeps its Instance.
    let t = Instant::now();
    c.apply_yaml(
        Some(&ns_name),
        &config_yaml(
            "props",
            "[p, q]",
            &availability,
            "    - name: PLAIN\n      value: literal",
        ),
    )
    .await?;
    let after = wait_until("two Instances after the edit", DEADLINE, || async {
        let list = instances(&api, "props").await?;
        Ok((list.len() == 2
            && list.iter().all(|i| {
                !i.spec
                    .broker_properties
                    .contains_key("DEBUG_ECHO_PROPERTY_PASSWORD")
            }))
        .then_some(list))
    })
    .await?;
    report_time("discoveryDetails edited → discovery restarted", t);
    ensure!(
        after.iter().any(|i| i.uid() == first.uid()),
        "the unchanged device was given a new Instance"
    );

    // Another namespace's Secret is refused (agent default), with a condition and an Event;
    // "props" keeps working.
    let cfgs: Api<Configuration> = Api::namespaced(c.client(), &ns_name);
    let t = Instant::now();
    c.apply_yaml(
        Some(&ns_name),
        &config_yaml(
            "foreign",
            "[f]",
            &availability,
            "    - name: STOLEN
      valueFrom:
        secretKeyRef: {name: creds, namespace: kube-system, key: password}",
        ),
    )
    .await?;
    let message = wait_until(
        "a PropertyUnresolved condition on foreign",
        DEADLINE,
        || async { condition_message(&cfgs, "foreign", "PropertyUnresolved").await },
    )
    .await?;
    report_time("cross-namespace reference → condition", t);
    ensure!(
        message.contains("kube-system/creds") && message.contains("another namespace"),
        "message {message:?}"
    );
    wait_until("an Event on foreign", DEADLINE, || async {
        let events = Api::<Event>::namespaced(c.client(), &ns_name)
            .list(&ListParams::default())
            .await?;
        Ok(events.items.into_iter().find(|e| {
            e.involved_object.name.as_deref() == Some("foreign")
                && e.reason.as_deref() == Some("PropertyUnresolved")
        }))
    })
    .await?;
    ensure!(instances(&api, "foreign").await?.is_empty());
    ensure!(instances(&api, "props").await?.len() == 2);

    // A required Secret that does not exist yet: condition, then Instances once it exists.
    c.apply_yaml(
        Some(&ns_name),
        &config_yaml(
            "later",
            "[l]",
            &availability,
            "    - name: TOKEN
      valueFrom:
        secretKeyRef: {name: later-token, key: token}",
        ),
    )
    .await?;
    let message = wait_until(
        "a PropertyUnresolved condition on later",
        DEADLINE,
        || async { condition_message(&cfgs, "later", "PropertyUnresolved").await },
    )
    .await?;
    ensure!(
        message.contains("later-token") && message.contains("not found"),
        "message {message:?}"
    );
    let t = Instant::now();
    c.apply_yaml(
        Some(&ns_name),
        &secret_yaml("later-token", "token", "t0k3n"),
    )
    .await?;
    let (k, v) = want("TOKEN", "t0k3n");
    wait_until(
        "later's Instance once its Secret exists",
        DEADLINE,
        || async {
            let list = instances(&api, "later").await?;
            Ok(list
                .into_iter()
                .find(|i| i.spec.broker_properties.get(&k) == Some(&v)))
        },
    )
    .await?;
    report_time("missing Secret created → Instance", t);
    wait_until("later's condition cleared", DEADLINE, || async {
        Ok(condition_message(&cfgs, "later", "PropertyUnresolved")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    ensure!(
        !agent.log_text().contains("s3cret") && !agent.log_text().contains("t0k3n"),
        "a Secret's value is in the agent's log"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    drop(ns);
    Ok(())
}

#[tokio::test]
async fn readiness_and_metrics_are_live() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("agent-metrics").await?;
    let ns_name = ns.name().to_string();
    let dir = std::env::temp_dir().join(format!("verge-e2e-metrics-{ns_name}"));
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let agent = Agent::start(NODE, &ns_name, &[]).await?;
    wait_until("/readyz 200", DEADLINE, || async {
        Ok(agent
            .http_get("/readyz")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|_| ()))
    })
    .await?;
    report_time("agent start → ready", t);
    // Ready means handlers can register.
    ensure!(
        agent.handlers_dir.join("agent-registration.sock").exists(),
        "ready before the registration socket exists"
    );
    let (code, _) = agent.http_get("/healthz").await?;
    ensure!(code == 200, "/healthz {code}");

    c.apply_yaml(
        Some(&ns_name),
        &config_yaml(
            "m",
            "[m1, m2]",
            &dir.join("availability").display().to_string(),
            "    - name: PLAIN\n      value: x",
        ),
    )
    .await?;
    // Two devices turned into Instances: the gauge, two latency observations (each taken when
    // its Instance write lands, so after the gauge moves), and one plugin per Instance plus
    // the Configuration's. Labelled counters appear with their first sample, so allocations,
    // reclaims and registrations are shown below by causing them.
    let label = format!("verge_agent_instances{{configuration=\"{ns_name}/m\"}} 2");
    let value = |body: &str, name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let t = Instant::now();
    let body = wait_until("metrics for two Instances", DEADLINE, || async {
        let (_, body) = agent.http_get("/metrics").await?;
        let done = body.contains(&label)
            && value(&body, "verge_agent_discovery_to_instance_seconds_count")
                .is_some_and(|n| n >= 2.0)
            && value(&body, "verge_agent_device_plugins") == Some(3.0);
        Ok(done.then_some(body))
    })
    .await?;
    report_time("Configuration → metrics show 2 Instances, 3 plugins", t);
    ensure!(
        body.contains("# TYPE verge_agent_slot_reclaims counter"),
        "slot reclaims are not exported:\n{body}"
    );

    // An allocation, then its reclaim when the pod goes.
    let resource = naming::configuration_resource_name("m");
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "user"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "broker",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "Never",
                "resources": {"limits": {resource.as_str(): "1"}},
            }],
        },
    });
    c.create_pod(&ns_name, pod).await?;
    c.wait_pod_ready(&ns_name, "user", DEADLINE).await?;
    let allocated =
        "verge_agent_allocations_total{resource_kind=\"configuration\",result=\"ok\"} 1";
    wait_until("an allocation counted", DEADLINE, || async {
        let (_, body) = agent.http_get("/metrics").await?;
        Ok(body.contains(allocated).then_some(()))
    })
    .await?;
    let t = Instant::now();
    Api::<Pod>::namespaced(c.client(), &ns_name)
        .delete("user", &DeleteParams::default())
        .await?;
    wait_until("a slot reclaim counted", DEADLINE, || async {
        let (_, body) = agent.http_get("/metrics").await?;
        Ok(value(&body, "verge_agent_slot_reclaims_total")
            .is_some_and(|n| n >= 1.0)
            .then_some(()))
    })
    .await?;
    // Includes the pod's termination and the agent's allocation grace (10 s from Allocate).
    report_time("pod deleted → slot reclaim counted", t);

    // An external handler's registration is counted per handler name (on top of the embedded
    // debugEcho's own).
    let registrations = "verge_agent_handler_registrations_total{handler=\"debugEcho\"}";
    let (_, body) = agent.http_get("/metrics").await?;
    let before = value(&body, registrations).unwrap_or(0.0);
    let bin = verge_e2e::agent::agent_binary().with_file_name("verge-debug-echo-discovery");
    let mut handler = tokio::process::Command::new(&bin)
        .args(["--directory", &agent.handlers_dir.display().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_until("a handler registration counted", DEADLINE, || async {
        let (_, body) = agent.http_get("/metrics").await?;
        Ok((value(&body, registrations).unwrap_or(0.0) > before).then_some(()))
    })
    .await?;
    let _ = handler.start_kill();
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    drop(ns);
    Ok(())
}
