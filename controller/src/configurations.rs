//! The Configuration controller: the `<configuration>-svc` Service, server-side dry-run checks
//! of the embedded specs, and the controller-owned part of the Configuration's status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, instrument, warn};
use verge_crds::naming::{
    CONTROLLER_LABEL_VALUE, LABEL_CONFIGURATION, LABEL_CONTROLLER, LABEL_TARGET_NODE,
    configuration_service_name,
};
use verge_crds::{Configuration, Instance, InstanceSpec};

use crate::brokers::{broker_nodes, desired_job, desired_pod, is_broker_pod, pod_phase, pod_ready};
use crate::cli::FIELD_MANAGER;
use crate::context::Context;
use crate::error::{Error, api_message, is_not_found, is_refusal};
use crate::instances::{object_key, rfc3339_now};
use crate::metrics::NodePhase;
use crate::services::{configuration_service, instance_service, is_ours};
use crate::status::{BrokerTally, ConfigurationFacts, agent_problem, configuration_status};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "configuration";

/// Hash part of the stand-in Instance used to dry-run a Configuration's specs.
const DRY_RUN_HASH: &str = "000000";
/// Node name the stand-in broker is pinned to in dry-runs.
const DRY_RUN_NODE: &str = "verge-dry-run";

/// Reconciles one Configuration.
#[instrument(skip_all, fields(namespace = configuration.namespace().unwrap_or_default(), configuration = configuration.name_any()))]
pub async fn reconcile(
    configuration: Arc<Configuration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&configuration, &ctx).await;
    ctx.metrics.observe_reconcile(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.clear_errors(&object_key(configuration.as_ref()));
    }
    result
}

/// Retries a failed reconcile with a capped exponential backoff per Configuration.
pub fn error_policy(configuration: Arc<Configuration>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.record_error(&object_key(configuration.as_ref()));
    let delay = ctx.error_backoff().delay(attempt);
    warn!(configuration = configuration.name_any(), %error, attempt, ?delay, "configuration reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(configuration: &Configuration, ctx: &Context) -> Result<Action, Error> {
    let namespace = configuration.namespace().ok_or(Error::MissingField {
        kind: "Configuration",
        field: "metadata.namespace",
    })?;
    let name = configuration.name_any();
    if configuration.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes what it owns; recreating a Service now would race it.
        return Ok(Action::await_change());
    }
    let instances: Vec<Instance> = Api::<Instance>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|i| i.spec.configuration_name == name)
        .collect();

    let spec_problems = validate(configuration, &namespace, ctx).await?;
    reconcile_service(configuration, &namespace, !instances.is_empty(), ctx).await?;

    let selector = ListParams::default().labels(&format!(
        "{LABEL_CONFIGURATION}={name},{LABEL_CONTROLLER}={CONTROLLER_LABEL_VALUE}"
    ));
    let mut brokers = BrokerTally::default();
    let mut per_node: BTreeMap<NodePhase, usize> = BTreeMap::new();
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .list(&selector)
        .await?
        .items;
    // Pods of broker Jobs carry the same labels; the Jobs are counted below.
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_broker_pod(p))
    {
        let phase = pod_phase(pod);
        match phase {
            "Running" => brokers.running += 1,
            "Failed" | "Succeeded" => brokers.ended += 1,
            _ => {}
        }
        if pod_ready(pod) {
            brokers.ready += 1;
        }
        if let Some(node) = pod.labels().get(LABEL_TARGET_NODE) {
            *per_node
                .entry((node.clone(), phase.to_string()))
                .or_default() += 1;
        }
    }
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace)
        .list(&selector)
        .await?
        .items;
    for job in jobs
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
    {
        let failed = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
        if failed {
            brokers.ended += 1;
        } else {
            brokers.running += 1;
            brokers.ready += 1;
        }
    }
    brokers.wanted = if configuration.spec.broker_pod_spec().is_some() {
        instances
            .iter()
            .map(|i| {
                let mut usable = i.clone();
                usable.spec.nodes.retain(|n| !ctx.is_lost(n));
                broker_nodes(&usable, &BTreeSet::new()).len()
            })
            .sum()
    } else if configuration.spec.broker_job_spec().is_some() {
        instances
            .iter()
            .filter(|i| !i.spec.nodes.is_empty())
            .count()
    } else {
        0
    };
    // Pods of Instances that are being replaced can briefly exceed what is wanted.
    brokers.ready = brokers.ready.min(brokers.wanted);

    ctx.metrics.set_broker_pods(&namespace, &name, &per_node);
    ctx.metrics.retain_configurations(|ns, cfg| {
        ctx.configurations
            .get(&ObjectRef::<Configuration>::new(cfg).within(ns))
            .is_some()
    });

    let facts = ConfigurationFacts {
        generation: configuration.metadata.generation,
        instances: instances.len(),
        brokers,
        has_broker_spec: configuration.spec.broker_spec.is_some(),
        spec_problems,
        agents_reported: configuration
            .status
            .as_ref()
            .is_some_and(|s| !s.nodes.is_empty()),
        agent_problem: configuration
            .status
            .as_ref()
            .and_then(|s| agent_problem(&s.nodes)),
    };
    let update = configuration_status(configuration.status.as_ref(), &facts, &rfc3339_now());
    if update.changed {
        let body = json!({
            "apiVersion": Configuration::api_version(&()),
            "kind": Configuration::kind(&()),
            "metadata": {"name": name},
            "status": update.status,
        });
        Api::<Configuration>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        debug!("status updated");
    }
    Ok(Action::requeue(ctx.args.resync_interval))
}

async fn reconcile_service(
    configuration: &Configuration,
    namespace: &str,
    has_instances: bool,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let name = configuration_service_name(&configuration.name_any());
    // Like the per-device Services, the Configuration's Service exists only while there is a
    // device behind it.
    match configuration
        .spec
        .configuration_service_spec
        .as_ref()
        .filter(|_| has_instances)
    {
        Some(spec) => {
            let service = configuration_service(configuration, spec);
            match api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&service),
                )
                .await
            {
                Ok(_) => Ok(()),
                // Reported through the dry-run condition; retrying the same spec cannot help.
                Err(e) if is_refusal(&e) => {
                    warn!(service = name, error = %e, "configuration service refused");
                    Ok(())
                }
                Err(e) => Err(Error::Kube(e)),
            }
        }
        None => {
            if let Some(existing) = api.get_opt(&name).await?
                && is_ours(&existing)
            {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => info!(service = name, "configuration service deleted"),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
            Ok(())
        }
    }
}

/// Checks the embedded PodSpec/JobSpec/ServiceSpecs with a server-side dry-run apply of what
/// the controller would create, once per generation. Returns the problems found.
async fn validate(
    configuration: &Configuration,
    namespace: &str,
    ctx: &Context,
) -> Result<Vec<String>, Error> {
    let uid = configuration.metadata.uid.clone().unwrap_or_default();
    let generation = configuration.metadata.generation.unwrap_or_default();
    if let Some(problems) = ctx.cached_validation(&uid, generation) {
        return Ok(problems);
    }
    let name = configuration.name_any();
    // A stand-in Instance without a UID gives brokers without owner references, so the dry-run
    // does not depend on a real Instance.
    let mut sample = Instance::new(
        &format!("{name}-{DRY_RUN_HASH}"),
        InstanceSpec {
            configuration_name: name.clone(),
            cdi_name: String::new(),
            capacity: configuration.spec.capacity,
            broker_properties: BTreeMap::new(),
            shared: true,
            nodes: vec![DRY_RUN_NODE.to_string()],
            device_usage: BTreeMap::new(),
        },
    );
    sample.metadata.namespace = Some(namespace.to_string());

    let mut problems = Vec::new();
    if let Some(spec) = configuration.spec.broker_pod_spec() {
        let pod = desired_pod(&sample, DRY_RUN_NODE, spec, "dry-run");
        dry_run::<Pod>(ctx, namespace, "brokerPodSpec", &pod, &mut problems).await?;
    }
    if let Some(spec) = configuration.spec.broker_job_spec() {
        let job = desired_job(&sample, spec, generation, "dry-run");
        dry_run::<Job>(ctx, namespace, "brokerJobSpec", &job, &mut problems).await?;
    }
    if let Some(spec) = configuration.spec.instance_service_spec.as_ref() {
        let service = instance_service(&sample, spec);
        dry_run::<Service>(
            ctx,
            namespace,
            "instanceServiceSpec",
            &service,
            &mut problems,
        )
        .await?;
    }
    if let Some(spec) = configuration.spec.configuration_service_spec.as_ref() {
        let service = configuration_service(configuration, spec);
        dry_run::<Service>(
            ctx,
            namespace,
            "configurationServiceSpec",
            &service,
            &mut problems,
        )
        .await?;
    }
    if !problems.is_empty() {
        warn!(?problems, "configuration specs refused by the API server");
        ctx.event(
            &configuration.object_ref(&()),
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            problems.join("; "),
        )
        .await;
    }
    ctx.store_validation(&uid, generation, problems.clone());
    Ok(problems)
}

async fn dry_run<K>(
    ctx: &Context,
    namespace: &str,
    field: &str,
    object: &K,
    problems: &mut Vec<String>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
    match api.patch(&name, &params, &Patch::Apply(object)).await {
        Ok(_) => Ok(()),
        Err(e) if is_refusal(&e) => {
            problems.push(format!("{field}: {}", api_message(&e)));
            Ok(())
        }
        Err(e) => Err(Error::Kube(e)),
    }
}
