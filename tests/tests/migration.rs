//! Migration from Akri (issue 6, item 5): a cluster holding Akri's CRDs (no status subresource,
//! Akri's schema), an Akri Configuration and Akri Instances with `<node>` finalizers becomes a
//! Verge cluster when verge-controller starts: it upgrades the CRDs in place, keeps the user's
//! Configuration (same UID) and reports its status, removes the Akri Instances without their
//! deletion ever hanging, and a Verge agent with debugEcho serves the Configuration.
//!
//! The test replaces the cluster-wide CRDs, so it holds `verge_e2e::serial()` (no other e2e test
//! runs meanwhile) and restores the project's CRDs when it ends, also on failure.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use verge_e2e::agent::{Agent, ensure_crds};
use verge_e2e::controller::ControllerProcess;
use verge_e2e::{Cluster, kubeconfig_path, kubectl_path, repo_root, report_time, wait_until};

const NODE: &str = "verge-node-1";
/// How long the controller and agent get to act.
const ACT: Duration = Duration::from_secs(90);
/// The field manager Akri's Helm chart and agent show up under (plain updates, not applies).
const AKRI_MANAGER: &str = "akri-agent";

fn akri(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("akri.sh", "v0", kind), plural)
}

fn configurations(c: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.client(), ns, &akri("Configuration", "configurations"))
}

fn instances(c: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.client(), ns, &akri("Instance", "instances"))
}

fn fixture(name: &str) -> Result<CustomResourceDefinition> {
    let path = repo_root().join("tests/fixtures/akri").join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Puts the project's CRDs back when dropped (the test replaced them with Akri's).
struct RestoreCrds;

impl Drop for RestoreCrds {
    fn drop(&mut self) {
        let dir = repo_root().join("crds");
        let out = std::process::Command::new(kubectl_path())
            .env("KUBECONFIG", kubeconfig_path())
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(&dir)
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("migration: restoring the CRDs failed: {out:?}");
        }
    }
}

/// Drops every finalizer of the namespace's Instances when dropped, so a failed test never
/// leaves a namespace that cannot be deleted.
struct UnstickInstances(String);

impl Drop for UnstickInstances {
    fn drop(&mut self) {
        let kubectl = |args: &[&str]| {
            std::process::Command::new(kubectl_path())
                .env("KUBECONFIG", kubeconfig_path())
                .args(args)
                .output()
        };
        let Ok(out) = kubectl(&["get", "instances.akri.sh", "-n", &self.0, "-o", "name"]) else {
            return;
        };
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = kubectl(&[
                "patch",
                name,
                "-n",
                &self.0,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
    }
}

/// Replaces a served CRD's spec with Akri's, as if Akri's chart had installed it.
async fn install_akri_crd(c: &Cluster, file: &str) -> Result<()> {
    let akri = fixture(file)?;
    let api: Api<CustomResourceDefinition> = Api::all(c.client());
    let name = akri.metadata.name.clone().context("fixture has no name")?;
    let mut crd = api.get(&name).await?;
    crd.spec = akri.spec;
    // Forget who managed it: the only manager is now Akri's installer.
    crd.metadata.managed_fields = Some(vec![Default::default()]);
    let pp = PostParams {
        field_manager: Some("helm".into()),
        ..PostParams::default()
    };
    api.replace(&name, &pp, &crd).await?;
    Ok(())
}

/// Waits until none of Akri's Instances (by uid) is left: the controller removed them.
async fn wait_akri_instances_removed(api: &Api<DynamicObject>, akri_uids: &[String]) -> Result<()> {
    wait_until("Akri's Instances removed", ACT, || async {
        let left = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|i| {
                i.metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| akri_uids.contains(u))
            })
            .count();
        Ok((left == 0).then_some(()))
    })
    .await
}

/// Both CRDs as Akri's chart leaves them, once the API server serves them so (no status).
async fn install_akri_crds(c: &Cluster) -> Result<()> {
    ensure_crds(c).await?;
    install_akri_crd(c, "configuration-crd.yaml").await?;
    install_akri_crd(c, "instance-crd.yaml").await?;
    wait_until(
        "Akri's CRDs served (no status subresource)",
        ACT,
        || async {
            let gone = !serves_status(c, "instances").await?
                && !serves_status(c, "configurations").await?;
            Ok(gone.then_some(()))
        },
    )
    .await
}

/// Whether `/apis/akri.sh/v0` lists `<plural>/status`.
async fn serves_status(c: &Cluster, plural: &str) -> Result<bool> {
    let raw = c.kubectl(&["get", "--raw", "/apis/akri.sh/v0"]).await?;
    let v: Value = serde_json::from_str(&raw)?;
    Ok(v["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["name"] == format!("{plural}/status")))
}

fn has_status_subresource(crd: &CustomResourceDefinition) -> bool {
    crd.spec
        .versions
        .iter()
        .all(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some()))
}

fn akri_instance(name: &str, cfg: &str, cfg_uid: &str, node: &str, device: &str) -> Value {
    json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Instance",
        "metadata": {
            "name": name,
            "finalizers": [node],
            "ownerReferences": [{
                "apiVersion": "akri.sh/v0",
                "kind": "Configuration",
                "name": cfg,
                "uid": cfg_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "configurationName": cfg,
            "cdiName": format!("akri.sh/{cfg}={}", name.rsplit('-').next().unwrap_or_default()),
            "capacity": 1,
            "brokerProperties": {"DEBUG_ECHO_DESCRIPTION": device},
            "shared": true,
            "nodes": [node],
            "deviceUsage": {format!("{name}-0"): node},
        },
    })
}

#[tokio::test]
async fn akri_cluster_migrates_to_verge() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let _serial = verge_e2e::serial().await;
    let ns_guard = c.namespace("migrate").await?;
    let ns = ns_guard.name().to_string();
    let _restore = RestoreCrds;
    let _unstick = UnstickInstances(ns.clone());
    let result = body(&c, &ns).await;
    if result.is_err() {
        for f in std::fs::read_dir(std::env::temp_dir())?.flatten() {
            let p = f.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name.starts_with(&format!("verge-e2e-controller-{ns}")) {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- {name} tail:\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
    }
    result
}

/// What `akri_objects` created.
struct AkriObjects {
    cfg: String,
    cfg_uid: String,
    /// The Akri Instance whose device the Verge agent finds again (same name).
    found_again: String,
    akri_uids: Vec<String>,
    availability: std::path::PathBuf,
}

/// The user's Configuration as an Akri user applied it, and Akri's Instances with `<node>`
/// finalizers (one being deleted, hanging on its finalizer).
async fn akri_objects(c: &Cluster, ns: &str) -> Result<AkriObjects> {
    // The user's Configuration, as an Akri user applied it (client-side apply).
    let suffix: String = ns.chars().rev().take(6).collect();
    let cfg = format!("akrimig{suffix}");
    let availability = std::env::temp_dir().join(format!("verge-e2e-availability-{ns}"));
    std::fs::write(&availability, "ONLINE")?;
    let configuration = json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {"name": cfg},
        "spec": {
            "discoveryHandler": {
                "name": "debugEcho",
                "discoveryDetails": format!(
                    "descriptions: [foo0]\navailabilityFile: {}",
                    availability.display()
                ),
            },
            "capacity": 1,
            "brokerProperties": {"FROM_AKRI": "yes"},
        },
    });
    c.kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &configuration.to_string())
        .await?;
    let cfg_uid = configurations(c, ns)
        .get(&cfg)
        .await?
        .metadata
        .uid
        .context("Configuration without uid")?;

    // Akri's Instances: the device the Verge agent will find again (same name: same hash),
    // one whose device and node are gone, and one whose deletion already hangs on its finalizer.
    let hash = verge_crds::naming::instance_hash("foo0", true, NODE);
    let found_again = format!("{cfg}-{hash}");
    let gone_device = format!("{cfg}-0a0b0c");
    let deleting = format!("{cfg}-0d0e0f");
    let akri_instances = [
        akri_instance(&found_again, &cfg, &cfg_uid, NODE, "foo0"),
        akri_instance(&gone_device, &cfg, &cfg_uid, "akri-gone-node", "lost"),
        akri_instance(&deleting, &cfg, &cfg_uid, NODE, "bar"),
    ];
    let api = instances(c, ns);
    let pp = PostParams {
        field_manager: Some(AKRI_MANAGER.into()),
        ..PostParams::default()
    };
    let mut akri_uids = Vec::new();
    for inst in &akri_instances {
        let obj: DynamicObject = serde_json::from_value(inst.clone())?;
        let created = api.create(&pp, &obj).await?;
        ensure!(
            created
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| !f.is_empty()),
            "the Akri Instance lost its finalizer on create"
        );
        akri_uids.push(created.metadata.uid.context("no uid")?);
    }
    api.delete(&deleting, &DeleteParams::default()).await?;
    ensure!(
        api.get(&deleting)
            .await?
            .metadata
            .deletion_timestamp
            .is_some(),
        "the Instance being deleted should hang on its <node> finalizer"
    );

    Ok(AkriObjects {
        cfg,
        cfg_uid,
        found_again,
        akri_uids,
        availability,
    })
}

async fn body(c: &Cluster, ns: &str) -> Result<()> {
    let t = Instant::now();
    install_akri_crds(c).await?;
    report_time("migration: Akri-shaped CRDs installed", t);

    let AkriObjects {
        cfg,
        cfg_uid,
        found_again,
        akri_uids,
        availability,
    } = akri_objects(c, ns).await?;
    let api = instances(c, ns);
    report_time(
        "migration: Akri Configuration and 3 Instances with <node> finalizers",
        t,
    );

    // Verge's controller: upgrades the CRDs, then (as leader) removes Akri's Instances.
    let t = Instant::now();
    let controller = ControllerProcess::start(c, ns, "migrate", &[]).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client());
    let upgraded = wait_until("CRDs upgraded by verge-controller", ACT, || async {
        let i = crds.get("instances.akri.sh").await?;
        let cf = crds.get("configurations.akri.sh").await?;
        Ok((has_status_subresource(&i) && has_status_subresource(&cf)).then_some((i, cf)))
    })
    .await?;
    report_time("migration: controller upgraded both CRDs", t);
    for crd in [&upgraded.0, &upgraded.1] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let managers: Vec<String> = crd
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.clone())
            .collect();
        ensure!(
            managers.iter().any(|m| m == "verge-controller-crds"),
            "{name} managers: {managers:?}"
        );
        let ours = verge_crds::all_crds()
            .into_iter()
            .find(|(_, d)| d.metadata.name.as_deref() == Some(&name))
            .context("not one of ours")?
            .1;
        let schema = |c: &CustomResourceDefinition| {
            serde_json::to_value(&c.spec.versions[0].schema).unwrap_or_default()
        };
        ensure!(
            schema(crd) == schema(&ours),
            "{name}: the served schema is not ours"
        );
        ensure!(
            crd.spec.versions[0].additional_printer_columns
                == ours.spec.versions[0].additional_printer_columns,
            "{name}: printer columns are not ours"
        );
    }
    wait_until("the controller's log reports the upgrade", ACT, || async {
        Ok(controller
            .log_text()
            .contains("upgraded CRD to this controller's version")
            .then_some(()))
    })
    .await?;

    wait_akri_instances_removed(&api, &akri_uids).await?;
    report_time("migration: Akri Instances (with <node> finalizers) gone", t);
    let same = configurations(c, ns).get(&cfg).await?;
    ensure!(
        same.metadata.uid.as_deref() == Some(cfg_uid.as_str()),
        "the Configuration was recreated"
    );

    // A Verge agent serves the Configuration: the device's Instance under its old name, new UID.
    let t = Instant::now();
    let availability_env = availability.display().to_string();
    let mut agent = Agent::start_with_env(
        NODE,
        ns,
        &[],
        &[("DEBUG_ECHO_AVAILABILITY_FILE", availability_env.as_str())],
    )
    .await?;
    let instance = wait_until("the Verge agent's Instance", ACT, || async {
        let Some(i) = api.get_opt(&found_again).await? else {
            return Ok(None);
        };
        let nodes = i.data["spec"]["nodes"].clone();
        Ok((nodes == json!([NODE]) && i.metadata.deletion_timestamp.is_none()).then_some(i))
    })
    .await;
    let instance = match instance {
        Ok(i) => i,
        Err(e) => {
            eprintln!("--- agent log:\n{}", agent.log_text());
            return Err(e);
        }
    };
    report_time("migration: Verge agent recreated the device's Instance", t);
    ensure!(
        !akri_uids.contains(instance.metadata.uid.as_ref().context("no uid")?),
        "the Akri Instance survived"
    );
    ensure!(
        instance
            .metadata
            .finalizers
            .as_ref()
            .is_none_or(|f| f.is_empty()),
        "Verge's Instance has finalizers: {:?}",
        instance.metadata.finalizers
    );
    ensure!(
        instance.data["spec"]["brokerProperties"]["FROM_AKRI"] == "yes"
            && instance.data["spec"]["brokerProperties"]["DEBUG_ECHO_DESCRIPTION"] == "foo0",
        "properties: {}",
        instance.data["spec"]["brokerProperties"]
    );
    let status = wait_until("the Configuration's status from Verge", ACT, || async {
        let obj = configurations(c, ns).get(&cfg).await?;
        let conditions = obj.data["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = conditions
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        Ok(ready.then_some(obj))
    })
    .await?;
    ensure!(
        status.metadata.uid.as_deref() == Some(cfg_uid.as_str()),
        "the Configuration was recreated"
    );
    report_time(
        "migration: the Akri Configuration is Ready in Verge's status",
        t,
    );
    // The Verge Instance is deleted without hanging (no finalizer of anyone's).
    agent.stop().await?;

    // A second controller start finds the CRDs current and writes nothing.
    let versions = |c: &(CustomResourceDefinition, CustomResourceDefinition)| {
        (
            c.0.metadata.resource_version.clone(),
            c.1.metadata.resource_version.clone(),
        )
    };
    let before = (
        crds.get("instances.akri.sh").await?,
        crds.get("configurations.akri.sh").await?,
    );
    drop(controller);
    let again = ControllerProcess::start(c, ns, "migrate-again", &[]).await?;
    wait_until("the second controller checked the CRDs", ACT, || async {
        Ok((again.log_text().matches("CRD is current").count() >= 2).then_some(()))
    })
    .await?;
    let after = (
        crds.get("instances.akri.sh").await?,
        crds.get("configurations.akri.sh").await?,
    );
    ensure!(
        versions(&before) == versions(&after),
        "a controller start rewrote current CRDs: {:?} -> {:?}",
        versions(&before),
        versions(&after)
    );
    ensure!(
        !again.log_text().contains("upgraded CRD"),
        "the second controller upgraded again:\n{}",
        again.log_tail()
    );
    Ok(())
}

/// Helm release of the chart-path migration test.
const HELM_RELEASE: &str = "verge-e2e-migrate";

/// Uninstalls the release when dropped (also on failure).
struct HelmRelease(String);

impl Drop for HelmRelease {
    fn drop(&mut self) {
        let _ = std::process::Command::new(verge_e2e::helm_path())
            .env("KUBECONFIG", kubeconfig_path())
            .args([
                "uninstall",
                HELM_RELEASE,
                "-n",
                &self.0,
                "--wait",
                "--timeout",
                "60s",
            ])
            .output();
    }
}

/// The path a user takes (issue 6, item 5): a cluster holding Akri's CRDs, a Configuration
/// and Akri Instances with `<node>` finalizers; `helm upgrade --install` of the Verge chart
/// with the local images. Helm skips `crds/` because the CRDs exist, so the chart's
/// controller — with the chart's own RBAC, not an admin kubeconfig — upgrades them, removes
/// Akri's Instances, and the chart's agents serve the user's Configuration, which keeps its UID.
#[tokio::test]
async fn akri_cluster_migrates_through_helm_upgrade_install() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    if !verge_e2e::helm_path().exists() {
        ensure!(!verge_e2e::required(), "helm is missing");
        return Ok(());
    }
    let _serial = verge_e2e::serial().await;
    let ns_guard = c.namespace("migrate-helm").await?;
    let ns = ns_guard.name().to_string();
    let _restore = RestoreCrds;
    let _unstick = UnstickInstances(ns.clone());

    let t = Instant::now();
    install_akri_crds(&c).await?;
    let AkriObjects {
        cfg,
        cfg_uid,
        found_again,
        akri_uids,
        availability: _,
    } = akri_objects(&c, &ns).await?;
    report_time("migration (helm): Akri CRDs, Configuration, Instances", t);

    let t = Instant::now();
    let release = HelmRelease(ns.clone());
    let chart = repo_root().join("helm/verge").display().to_string();
    let mut args: Vec<String> = [
        "upgrade",
        "--install",
        HELM_RELEASE,
        &chart,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        "180s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sets = verge_e2e::local_image_sets();
    sets.extend([
        format!("agent.watchNamespace={ns}"),
        format!("controller.watchNamespace={ns}"),
        format!(
            "admissionPolicy.namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name={ns}"
        ),
    ]);
    for set in sets {
        args.push("--set".into());
        args.push(set);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    verge_e2e::run_ok(&verge_e2e::helm_path(), &args, None)
        .await
        .context("helm upgrade --install over Akri's objects")?;
    report_time("migration (helm): helm upgrade --install done", t);

    let crds: Api<CustomResourceDefinition> = Api::all(c.client());
    wait_until("CRDs upgraded by the chart's controller", ACT, || async {
        let i = crds.get("instances.akri.sh").await?;
        let cf = crds.get("configurations.akri.sh").await?;
        Ok((has_status_subresource(&i) && has_status_subresource(&cf)).then_some(()))
    })
    .await?;
    report_time("migration (helm): CRDs upgraded", t);
    let api = instances(&c, &ns);
    wait_akri_instances_removed(&api, &akri_uids).await?;
    report_time("migration (helm): Akri Instances gone", t);
    let instance = wait_until("the chart's agents serve the device", ACT, || async {
        let Some(i) = api.get_opt(&found_again).await? else {
            return Ok(None);
        };
        let served = i.data["spec"]["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == NODE))
            && i.metadata.deletion_timestamp.is_none();
        Ok(served.then_some(i))
    })
    .await;
    let instance = match instance {
        Ok(i) => i,
        Err(e) => {
            let logs = c
                .kubectl(&[
                    "logs",
                    "-n",
                    &ns,
                    "-l",
                    "app.kubernetes.io/component=agent",
                    "--tail",
                    "60",
                ])
                .await
                .unwrap_or_default();
            let list = c
                .kubectl(&["get", "instances.akri.sh,pods", "-n", &ns, "-o", "wide"])
                .await
                .unwrap_or_default();
            return Err(e.context(format!("agents' logs:\n{logs}\n{list}")));
        }
    };
    report_time("migration (helm): Verge Instance for the Akri device", t);
    ensure!(
        !akri_uids.contains(instance.metadata.uid.as_ref().context("no uid")?),
        "the Akri Instance survived"
    );
    ensure!(
        instance.data["spec"]["brokerProperties"]["FROM_AKRI"] == "yes",
        "properties: {}",
        instance.data["spec"]["brokerProperties"]
    );
    let status = wait_until("the Configuration Ready in Verge's status", ACT, || async {
        let obj = configurations(&c, &ns).get(&cfg).await?;
        let ready = obj.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        Ok(ready.then_some(obj))
    })
    .await?;
    ensure!(
        status.metadata.uid.as_deref() == Some(cfg_uid.as_str()),
        "the user's Configuration was recreated"
    );
    report_time("migration (helm): the Akri Configuration is Ready", t);

    let t = Instant::now();
    drop(release);
    report_time("migration (helm): helm uninstall", t);
    ensure!(
        t.elapsed() < Duration::from_secs(60),
        "helm uninstall took {:?}",
        t.elapsed()
    );
    let stuck: Vec<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|i| {
            i.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| !f.is_empty())
        })
        .filter_map(|i| i.metadata.name)
        .collect();
    ensure!(
        stuck.is_empty(),
        "Instances with finalizers after uninstall: {stuck:?}"
    );
    Ok(())
}
