//! The Instance controller: broker Pods or a broker Job and the `<instance>-svc` Service for
//! every Instance, and the Instance's status. Each reconcile compares what exists with what the
//! Instance and its Configuration ask for now, whatever event triggered it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service, ServiceSpec};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};
use verge_crds::naming::{
    CONTROLLER_LABEL_VALUE, LABEL_CONTROLLER, LABEL_INSTANCE, LABEL_TARGET_NODE,
    instance_service_name,
};
use verge_crds::{Configuration, Instance};

use crate::brokers::{
    ANNOTATION_PROPERTIES_HASH, ANNOTATION_SPEC_HASH, PodVerdict, Removal, broker_job_name,
    broker_nodes, broker_pod_name, desired_job, desired_pod, duration_between, hash_of,
    is_broker_pod, pending_deadline, pod_phase, pod_ready, properties_hash,
};
use crate::cli::FIELD_MANAGER;
use crate::context::Context;
use crate::error::{Error, api_message, is_not_found, is_refusal};
use crate::services::{instance_service, is_ours};
use crate::status::{BrokerKind, BrokerTally, instance_status};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "instance";

/// The requeue for a Pending broker lands this long after its deadline, so the broker is past
/// the timeout (not a hair before it) when it is judged again.
const PENDING_DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// What one reconcile learned, to set the requeue and the status.
struct Outcome {
    tally: BrokerTally,
    requeue: Duration,
}

impl Outcome {
    fn requeue_within(&mut self, after: Duration) {
        self.requeue = self.requeue.min(after);
    }
}

/// Reconciles one Instance.
#[instrument(skip_all, fields(namespace = instance.namespace().unwrap_or_default(), instance = instance.name_any()))]
pub async fn reconcile(instance: Arc<Instance>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&instance, &ctx).await;
    ctx.metrics.observe_reconcile(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.clear_errors(&object_key(instance.as_ref()));
    }
    result
}

/// Retries a failed reconcile with a capped exponential backoff per Instance.
pub fn error_policy(instance: Arc<Instance>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.record_error(&object_key(instance.as_ref()));
    let delay = ctx.error_backoff().delay(attempt);
    warn!(instance = instance.name_any(), %error, attempt, ?delay, "instance reconcile failed");
    Action::requeue(delay)
}

/// Key of an object in the per-object books (`<kind>/<namespace>/<name>`).
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

async fn reconcile_inner(instance: &Instance, ctx: &Context) -> Result<Action, Error> {
    let namespace = instance.namespace().ok_or(Error::MissingField {
        kind: "Instance",
        field: "metadata.namespace",
    })?;
    let name = instance.name_any();
    if instance.metadata.deletion_timestamp.is_some() {
        // Being deleted (foreground deletion waits for its brokers): start nothing new.
        return Ok(Action::await_change());
    }
    let configurations: Api<Configuration> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(configuration) = configurations
        .get_opt(&instance.spec.configuration_name)
        .await?
    else {
        // Garbage collection removes an Instance whose Configuration is gone; nothing to start.
        debug!("configuration not found; waiting for garbage collection");
        return Ok(Action::requeue(ctx.args.resync_interval));
    };

    let mut outcome = Outcome {
        tally: BrokerTally::default(),
        requeue: ctx.args.resync_interval,
    };
    let kind = match (
        configuration.spec.broker_pod_spec(),
        configuration.spec.broker_job_spec(),
    ) {
        (Some(_), _) => BrokerKind::Pod,
        (None, Some(_)) => BrokerKind::Job,
        (None, None) => BrokerKind::None,
    };
    let mut failures = Vec::new();
    if let Err(e) = reconcile_pods(
        instance,
        &namespace,
        configuration.spec.broker_pod_spec(),
        ctx,
        &mut outcome,
    )
    .await
    {
        failures.push(e);
    }
    let generation = configuration.metadata.generation.unwrap_or_default();
    if let Err(e) = reconcile_jobs(
        instance,
        &namespace,
        configuration.spec.broker_job_spec(),
        generation,
        ctx,
        &mut outcome,
    )
    .await
    {
        failures.push(e);
    }
    reconcile_service(
        instance,
        &namespace,
        configuration.spec.instance_service_spec.as_ref(),
        ctx,
    )
    .await?;

    let now = rfc3339_now();
    let update = instance_status(
        instance.status.as_ref(),
        instance.spec.used_slots(),
        kind,
        &outcome.tally,
        !instance.spec.nodes.is_empty(),
        &now,
    );
    if update.changed {
        let api: Api<Instance> = Api::namespaced(ctx.client.clone(), &namespace);
        let body = json!({
            "apiVersion": Instance::api_version(&()),
            "kind": Instance::kind(&()),
            "metadata": {"name": name},
            "status": update.status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        debug!("status updated");
    }

    if let Some(first) = failures.first() {
        return Err(Error::Brokers {
            count: failures.len(),
            first: first.to_string(),
        });
    }
    if !outcome.tally.create_failures.is_empty() {
        // The API refused the broker; retrying at the error backoff, not the resync, lets a
        // fix elsewhere (a quota, a missing ServiceAccount) take effect soon.
        let attempt = ctx.record_error(&object_key(instance));
        return Ok(Action::requeue(ctx.error_backoff().delay(attempt)));
    }
    Ok(Action::requeue(outcome.requeue))
}

/// RFC 3339 time with whole seconds, as conditions carry it.
pub fn rfc3339_now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn broker_selector(instance: &str) -> ListParams {
    ListParams::default().labels(&format!(
        "{LABEL_INSTANCE}={instance},{LABEL_CONTROLLER}={CONTROLLER_LABEL_VALUE}"
    ))
}

fn annotation<'a, K: Resource>(obj: &'a K, key: &str) -> Option<&'a str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn owned_by(obj: &impl Resource, instance: &Instance) -> bool {
    let uid = instance.metadata.uid.as_deref();
    obj.meta()
        .owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| Some(r.uid.as_str()) == uid))
}

async fn reconcile_pods(
    instance: &Instance,
    namespace: &str,
    pod_spec: Option<&PodSpec>,
    ctx: &Context,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let name = instance.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let pods: Vec<Pod> = api
        .list(&broker_selector(&name))
        .await?
        .items
        .into_iter()
        .filter(is_broker_pod)
        .collect();
    if pod_spec.is_none() && pods.is_empty() {
        return Ok(());
    }
    let spec_hash = pod_spec.map(hash_of).unwrap_or_default();
    let props_hash = properties_hash(instance);
    let now = Timestamp::now();
    let pending_timeout = ctx.args.pending_timeout;

    // Nodes whose broker is current keep it when the Instance is at capacity.
    let current: BTreeSet<String> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && owned_by(*p, instance)
                && annotation(*p, ANNOTATION_SPEC_HASH) == Some(spec_hash.as_str())
                && annotation(*p, ANNOTATION_PROPERTIES_HASH) == Some(props_hash.as_str())
        })
        .filter_map(|p| p.labels().get(LABEL_TARGET_NODE).cloned())
        .collect();
    // An agent that still runs on a lost node may list it again; no broker goes there.
    let mut usable = instance.clone();
    usable.spec.nodes.retain(|n| !ctx.is_lost(n));
    if usable.spec.nodes.len() != instance.spec.nodes.len() {
        // The lost set is from the last node check. A node that came back and was listed
        // again by its agent since then changes no Instance, so nothing else would bring
        // this reconcile back to start its broker.
        outcome.requeue_within(ctx.args.node_check_interval);
    }
    let wanted: BTreeMap<String, String> = match pod_spec {
        Some(_) => broker_nodes(&usable, &current)
            .into_iter()
            .map(|node| (broker_pod_name(&name, &node, instance.spec.shared), node))
            .collect(),
        None => BTreeMap::new(),
    };
    let wanted_names: BTreeSet<String> = wanted.keys().cloned().collect();
    outcome.tally.wanted += wanted.len();

    let mut present = BTreeSet::new();
    let mut failures = Vec::new();
    for pod in &pods {
        let pod_name = pod.name_any();
        present.insert(pod_name.clone());
        let key = format!("{namespace}/{pod_name}");
        let verdict = if owned_by(pod, instance) {
            crate::brokers::judge_pod(
                pod,
                &wanted_names,
                &spec_hash,
                &props_hash,
                now,
                pending_timeout,
            )
        } else if pod.metadata.deletion_timestamp.is_some() {
            PodVerdict::Terminating
        } else {
            // Left over from an earlier Instance of the same name; it blocks the name.
            PodVerdict::Remove(Removal::NotWanted)
        };
        match verdict {
            PodVerdict::Keep => {
                if pod_phase(pod) == "Running" {
                    outcome.tally.running += 1;
                    let running_for = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.start_time.as_ref())
                        .map(|t| duration_between(t.0, now))
                        .unwrap_or_default();
                    if running_for >= ctx.args.failed_backoff_max {
                        ctx.failures.healthy(&key);
                    }
                }
                if pod_ready(pod) {
                    outcome.tally.ready += 1;
                }
                if let Some(left) = pending_deadline(pod, now, pending_timeout) {
                    outcome.requeue_within(left + PENDING_DEADLINE_SLACK);
                }
            }
            PodVerdict::Terminating => outcome.requeue_within(ctx.args.terminating_recheck),
            PodVerdict::Ended { phase } => {
                outcome.tally.ended += 1;
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                match ctx
                    .failures
                    .ended(&key, &uid, Instant::now(), &ctx.failed_backoff())
                {
                    Some(wait) => {
                        debug!(pod = pod_name, ?wait, "ended broker waits for its backoff");
                        outcome.requeue_within(wait);
                    }
                    None => {
                        if let Err(e) =
                            delete_pod(instance, &api, pod, &Removal::Ended { phase }, ctx).await
                        {
                            failures.push(e);
                        }
                        outcome.requeue_within(ctx.args.terminating_recheck);
                    }
                }
            }
            PodVerdict::Remove(removal) => {
                if let Err(e) = delete_pod(instance, &api, pod, &removal, ctx).await {
                    failures.push(e);
                }
                outcome.requeue_within(ctx.args.terminating_recheck);
            }
        }
    }

    if let Some(pod_spec) = pod_spec {
        for (pod_name, node) in wanted.iter().filter(|(n, _)| !present.contains(*n)) {
            let pod = desired_pod(instance, node, pod_spec, &spec_hash);
            match api
                .patch(
                    pod_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&pod),
                )
                .await
            {
                Ok(_) => {
                    info!(pod = pod_name, node, "broker created");
                    ctx.event(
                        &instance.object_ref(&()),
                        EventType::Normal,
                        "BrokerCreated",
                        "CreateBroker",
                        format!("created broker Pod {pod_name} on node {node}"),
                    )
                    .await;
                }
                Err(e) if is_refusal(&e) => {
                    let message = format!("broker Pod {pod_name}: {}", api_message(&e));
                    warn!(pod = pod_name, error = %e, "broker refused by the API server");
                    ctx.event(
                        &instance.object_ref(&()),
                        EventType::Warning,
                        "BrokerCreateFailed",
                        "CreateBroker",
                        message.clone(),
                    )
                    .await;
                    outcome.tally.create_failures.push(message);
                }
                Err(e) => {
                    ctx.event(
                        &instance.object_ref(&()),
                        EventType::Warning,
                        "BrokerCreateFailed",
                        "CreateBroker",
                        format!("broker Pod {pod_name}: {e}"),
                    )
                    .await;
                    failures.push(Error::Kube(e));
                }
            }
        }
    }
    match failures.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn delete_pod(
    instance: &Instance,
    api: &Api<Pod>,
    pod: &Pod,
    removal: &Removal,
    ctx: &Context,
) -> Result<(), Error> {
    let pod_name = pod.name_any();
    // The UID precondition keeps a slow reconcile from deleting a replacement of the same name.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod_name, &params).await {
        Ok(_) => {
            info!(pod = pod_name, reason = removal.reason(), "broker deleted");
            let type_ = match removal {
                Removal::Ended { .. } | Removal::PendingTooLong { .. } => EventType::Warning,
                _ => EventType::Normal,
            };
            let action = if removal.is_replacement() {
                "ReplaceBroker"
            } else {
                "DeleteBroker"
            };
            ctx.event(
                &instance.object_ref(&()),
                type_,
                removal.reason(),
                action,
                removal.message(&pod_name),
            )
            .await;
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 409) => {
            // The UID precondition failed: the Pod was already replaced.
            Ok(())
        }
        Err(e) => {
            ctx.event(
                &instance.object_ref(&()),
                EventType::Warning,
                "BrokerDeleteFailed",
                "DeleteBroker",
                format!("deleting broker Pod {pod_name}: {}", api_message(&e)),
            )
            .await;
            Err(Error::Kube(e))
        }
    }
}

fn job_finished(job: &Job) -> Option<&str> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_.as_str())
}

async fn reconcile_jobs(
    instance: &Instance,
    namespace: &str,
    job_spec: Option<&JobSpec>,
    generation: i64,
    ctx: &Context,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let name = instance.name_any();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let jobs = api.list(&broker_selector(&name)).await?.items;
    if job_spec.is_none() && jobs.is_empty() {
        return Ok(());
    }
    let wanted = job_spec
        .filter(|_| !instance.spec.nodes.is_empty())
        .map(|_| broker_job_name(&name, generation));
    let spec_hash = job_spec.map(hash_of).unwrap_or_default();
    let props_hash = properties_hash(instance);
    outcome.tally.wanted += usize::from(wanted.is_some());

    let mut present = false;
    for job in &jobs {
        let job_name = job.name_any();
        if Some(&job_name) == wanted.as_ref() {
            present = true;
        }
        if job.metadata.deletion_timestamp.is_some() {
            outcome.requeue_within(ctx.args.terminating_recheck);
            continue;
        }
        let removal = if Some(&job_name) != wanted.as_ref() || !owned_by(job, instance) {
            Some(Removal::NotWanted)
        } else if annotation(job, ANNOTATION_PROPERTIES_HASH) != Some(props_hash.as_str()) {
            Some(Removal::PropertiesChanged)
        } else {
            None
        };
        match removal {
            Some(removal) => {
                // Background propagation: a Job's Pods go with it (the API default for Jobs
                // would orphan them).
                match api.delete(&job_name, &DeleteParams::background()).await {
                    Ok(_) => {
                        ctx.event(
                            &instance.object_ref(&()),
                            EventType::Normal,
                            removal.reason(),
                            if removal.is_replacement() {
                                "ReplaceBroker"
                            } else {
                                "DeleteBroker"
                            },
                            removal.message(&job_name),
                        )
                        .await;
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        ctx.event(
                            &instance.object_ref(&()),
                            EventType::Warning,
                            "BrokerDeleteFailed",
                            "DeleteBroker",
                            format!("deleting broker Job {job_name}: {}", api_message(&e)),
                        )
                        .await;
                        return Err(Error::Kube(e));
                    }
                }
                outcome.requeue_within(ctx.args.terminating_recheck);
            }
            None => match job_finished(job) {
                Some("Failed") => outcome.tally.ended += 1,
                _ => {
                    outcome.tally.running += 1;
                    outcome.tally.ready += 1;
                }
            },
        }
    }

    if let (Some(job_spec), Some(job_name), false) = (job_spec, wanted.as_ref(), present) {
        let job = desired_job(instance, job_spec, generation, &spec_hash);
        match api
            .patch(
                job_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&job),
            )
            .await
        {
            Ok(_) => {
                info!(job = job_name, "broker job created");
                ctx.event(
                    &instance.object_ref(&()),
                    EventType::Normal,
                    "BrokerCreated",
                    "CreateBroker",
                    format!("created broker Job {job_name}"),
                )
                .await;
            }
            Err(e) => {
                let message = format!("broker Job {job_name}: {}", api_message(&e));
                ctx.event(
                    &instance.object_ref(&()),
                    EventType::Warning,
                    "BrokerCreateFailed",
                    "CreateBroker",
                    message.clone(),
                )
                .await;
                if is_refusal(&e) {
                    outcome.tally.create_failures.push(message);
                } else {
                    return Err(Error::Kube(e));
                }
            }
        }
    }
    Ok(())
}

async fn reconcile_service(
    instance: &Instance,
    namespace: &str,
    spec: Option<&ServiceSpec>,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let name = instance_service_name(&instance.name_any());
    match spec {
        Some(spec) => {
            let service = instance_service(instance, spec);
            match api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&service),
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_refusal(&e) => {
                    // The Configuration shows the problem (dry-run); the Instance gets an Event.
                    ctx.event(
                        &instance.object_ref(&()),
                        EventType::Warning,
                        "ServiceApplyFailed",
                        "ApplyService",
                        format!("Service {name}: {}", api_message(&e)),
                    )
                    .await;
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
                    Ok(_) => info!(service = name, "instance service deleted"),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
            Ok(())
        }
    }
}
