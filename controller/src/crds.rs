//! Keeps the `akri.sh` CRDs current and takes a cluster over from Akri.
//!
//! Helm installs a chart's `crds/` on the first install only and never upgrades them, and a
//! cluster that ran Akri holds Akri's CRDs (no status subresource, a looser schema). So every
//! replica, before it stands for leader, compares the served CRDs with the ones it was built
//! with and server-side applies ours (forced, field manager [`CRD_FIELD_MANAGER`]) when they
//! differ. The comparison is semantic (schema, subresources, printer columns, names, versions),
//! not a marker annotation: a marker would stay behind when someone applies an older CRD by hand.
//!
//! Akri's Instances cannot be taken over in place: Akri's agent wrote them with unattributed
//! updates and blocks their deletion with finalizers named after nodes (`<node>`) that only
//! Akri's agent removes. Their `nodes` and `deviceUsage` entries are owned by no Verge agent,
//! so Verge agents' per-node applies would conflict with them, and their slot claims are stale.
//! The leader therefore deletes such Instances (after dropping the node finalizers, so deletion
//! never hangs); Verge agents recreate, under the same names, the ones whose devices they still
//! see — as Akri itself does on every agent restart. Configurations are never touched.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};
use verge_crds::Instance;

/// Field manager of the controller's CRD applies.
pub const CRD_FIELD_MANAGER: &str = "verge-controller-crds";

/// Bound on every API call made here.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at startup before the controller carries on with the CRDs as they are.
const STARTUP_ATTEMPTS: u32 = 5;

/// First delay between startup attempts; doubles per attempt.
const STARTUP_RETRY_INITIAL: Duration = Duration::from_secs(1);

/// Instances listed per page by the sweep (bounded memory on big clusters).
const SWEEP_PAGE_SIZE: u32 = 200;

/// Attempts per Instance when it changes between read and write.
const CONFLICT_ATTEMPTS: u32 = 5;

/// Finalizers of the garbage collector, which are not domain-qualified either but are not Akri's.
const GC_FINALIZERS: [&str; 2] = ["orphan", "foregroundDeletion"];

/// Why the CRDs could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A call to the Kubernetes API failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// A call took longer than [`CALL_TIMEOUT`].
    #[error("{0}: timed out after {CALL_TIMEOUT:?}")]
    Timeout(String),
    /// The applied CRD still differs from ours.
    #[error("{name} still differs after the apply: {differences}")]
    StillDiffers {
        /// CRD name.
        name: String,
        /// What differs.
        differences: String,
    },
}

impl CrdError {
    /// Whether retrying cannot help (RBAC refusal, invalid object).
    fn is_refusal(&self) -> bool {
        match self {
            CrdError::Kube { source, .. } => crate::error::is_refusal(source),
            CrdError::StillDiffers { .. } => true,
            CrdError::Timeout(_) => false,
        }
    }
}

async fn call<T>(
    what: impl Into<String>,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CrdError> {
    let what = what.into();
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(CrdError::Kube { what, source }),
        Err(_) => Err(CrdError::Timeout(what)),
    }
}

/// The CRDs this controller was built with.
pub fn desired() -> Vec<CustomResourceDefinition> {
    verge_crds::all_crds()
        .into_iter()
        .map(|(_, crd)| crd)
        .collect()
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `None` and an empty list are the same to the API server.
fn list_value<T: serde::Serialize>(v: &Option<Vec<T>>) -> Value {
    match v {
        Some(items) if !items.is_empty() => to_value(items),
        _ => Value::Null,
    }
}

/// What in the served CRD differs from `desired`; empty when it is current. Fields the API
/// server fills in by default (`listKind`, `conversion`, ...) are not compared.
pub fn differences(
    served: &CustomResourceDefinition,
    desired: &CustomResourceDefinition,
) -> Vec<String> {
    let mut out = Vec::new();
    let (s, d) = (&served.spec, &desired.spec);
    if s.group != d.group {
        out.push(format!("group is {:?}, not {:?}", s.group, d.group));
    }
    if s.scope != d.scope {
        out.push(format!("scope is {:?}, not {:?}", s.scope, d.scope));
    }
    if s.names.kind != d.names.kind || s.names.plural != d.names.plural {
        out.push("kind or plural name differs".into());
    }
    if d.names.singular.is_some() && s.names.singular != d.names.singular {
        out.push("singular name differs".into());
    }
    if list_value(&s.names.short_names) != list_value(&d.names.short_names) {
        out.push("short names differ".into());
    }
    if list_value(&s.names.categories) != list_value(&d.names.categories) {
        out.push("categories differ".into());
    }
    let served_names: Vec<&str> = s.versions.iter().map(|v| v.name.as_str()).collect();
    let desired_names: Vec<&str> = d.versions.iter().map(|v| v.name.as_str()).collect();
    if served_names != desired_names {
        out.push(format!(
            "versions are {served_names:?}, not {desired_names:?}"
        ));
    }
    for dv in &d.versions {
        if let Some(sv) = s.versions.iter().find(|v| v.name == dv.name) {
            version_differences(sv, dv, &mut out);
        }
    }
    out
}

fn version_differences(
    s: &CustomResourceDefinitionVersion,
    d: &CustomResourceDefinitionVersion,
    out: &mut Vec<String>,
) {
    let v = &d.name;
    if s.served != d.served || s.storage != d.storage {
        out.push(format!("{v}: served/storage flags differ"));
    }
    let status = |x: &CustomResourceDefinitionVersion| {
        x.subresources
            .as_ref()
            .and_then(|r| r.status.as_ref())
            .is_some()
    };
    if status(s) != status(d) {
        out.push(format!(
            "{v}: {} status subresource",
            if status(s) { "unexpected" } else { "no" }
        ));
    }
    let scale = |x: &CustomResourceDefinitionVersion| {
        to_value(&x.subresources.as_ref().and_then(|r| r.scale.as_ref()))
    };
    if scale(s) != scale(d) {
        out.push(format!("{v}: scale subresource differs"));
    }
    let schema = |x: &CustomResourceDefinitionVersion| {
        to_value(
            &x.schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref()),
        )
    };
    if schema(s) != schema(d) {
        out.push(format!("{v}: schema differs"));
    }
    if list_value(&s.additional_printer_columns) != list_value(&d.additional_printer_columns) {
        out.push(format!("{v}: printer columns differ"));
    }
    if list_value(&s.selectable_fields) != list_value(&d.selectable_fields) {
        out.push(format!("{v}: selectable fields differ"));
    }
    if s.deprecated.unwrap_or(false) != d.deprecated.unwrap_or(false) {
        out.push(format!("{v}: deprecation differs"));
    }
}

/// Brings one CRD up to `desired`. Returns what was changed (empty: it was current).
async fn ensure_one(
    api: &Api<CustomResourceDefinition>,
    desired: &CustomResourceDefinition,
) -> Result<Vec<String>, CrdError> {
    let name = desired.name_any();
    let served = call(format!("reading CRD {name}"), api.get_opt(&name)).await?;
    let changes = match &served {
        Some(served) => differences(served, desired),
        None => vec!["absent".to_string()],
    };
    if changes.is_empty() {
        return Ok(changes);
    }
    let params = PatchParams::apply(CRD_FIELD_MANAGER).force();
    let applied = call(
        format!("applying CRD {name}"),
        api.patch(&name, &params, &Patch::Apply(desired)),
    )
    .await?;
    let left = differences(&applied, desired);
    if !left.is_empty() {
        return Err(CrdError::StillDiffers {
            name,
            differences: left.join("; "),
        });
    }
    Ok(changes)
}

/// Brings every CRD up to ours; logs what changed.
pub async fn ensure_current(client: &Client) -> Result<(), CrdError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in desired() {
        let changes = ensure_one(&api, &crd).await?;
        if changes.is_empty() {
            info!(crd = crd.name_any(), "CRD is current");
        } else {
            info!(
                crd = crd.name_any(),
                changes = changes.join("; "),
                "upgraded CRD to this controller's version"
            );
        }
    }
    Ok(())
}

/// [`ensure_current`] with retries for transient failures. A refusal (no RBAC for CRDs, an
/// invalid object) or running out of attempts is logged and the controller carries on: the
/// CRDs may be managed by someone else.
pub async fn ensure_current_at_startup(client: &Client) {
    let mut delay = STARTUP_RETRY_INITIAL;
    for attempt in 1..=STARTUP_ATTEMPTS {
        match ensure_current(client).await {
            Ok(()) => return,
            Err(e) if e.is_refusal() || attempt == STARTUP_ATTEMPTS => {
                warn!(
                    error = %e,
                    "could not bring the akri.sh CRDs up to date; carrying on with the served ones \
                     (run with --manage-crds=false if you manage them yourself)"
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "CRD check failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
    }
}

/// Finalizers named after a node, as Akri's agent sets on Instances: not domain-qualified
/// (every finalizer Verge or a well-behaved controller uses has a `/`) and not the garbage
/// collector's.
pub fn akri_node_finalizers(finalizers: &[String]) -> Vec<String> {
    finalizers
        .iter()
        .filter(|f| !f.contains('/') && !GC_FINALIZERS.contains(&f.as_str()))
        .cloned()
        .collect()
}

/// Whether an Instance was written by Akri rather than by Verge agents: it carries a `<node>`
/// finalizer, or some manager wrote its `spec` with a plain update. Verge agents and the
/// controller only ever server-side apply Instance specs.
pub fn written_by_akri(meta: &ObjectMeta) -> bool {
    let finalizers = meta.finalizers.as_deref().unwrap_or_default();
    if !akri_node_finalizers(finalizers).is_empty() {
        return true;
    }
    meta.managed_fields.iter().flatten().any(|m| {
        m.operation.as_deref() == Some("Update")
            && m.subresource.as_deref().unwrap_or_default().is_empty()
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
    })
}

/// Deletes every Akri-written Instance in `namespace` (all when `None`), dropping its node
/// finalizers first. Returns how many were removed.
pub async fn sweep_akri_instances(
    client: &Client,
    namespace: Option<&str>,
) -> Result<usize, CrdError> {
    let api: Api<Instance> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut removed = 0;
    let mut params = ListParams::default().limit(SWEEP_PAGE_SIZE);
    loop {
        let page = call("listing Instances", api.list_metadata(&params)).await?;
        for item in &page.items {
            if written_by_akri(&item.metadata)
                && remove_akri_instance(client, &item.metadata).await?
            {
                removed += 1;
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(removed),
        }
    }
}

/// How one removal attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Removal {
    Removed,
    Gone,
    /// Changed since read (the controller writes Instance status): read again and retry.
    Conflict,
}

fn api_code(e: &CrdError) -> Option<u16> {
    match e {
        CrdError::Kube {
            source: kube::Error::Api(s),
            ..
        } => Some(s.code),
        _ => None,
    }
}

/// Removes one Akri Instance, reading it again when it changed meanwhile. Returns whether this
/// call removed it.
async fn remove_akri_instance(client: &Client, listed: &ObjectMeta) -> Result<bool, CrdError> {
    let (Some(name), Some(ns)) = (&listed.name, &listed.namespace) else {
        return Ok(false);
    };
    let api: Api<Instance> = Api::namespaced(client.clone(), ns);
    let mut meta = listed.clone();
    for _ in 0..CONFLICT_ATTEMPTS {
        match remove_once(&api, &meta).await? {
            Removal::Removed => return Ok(true),
            Removal::Gone => return Ok(false),
            Removal::Conflict => {
                let fresh = call(
                    format!("reading Instance {ns}/{name}"),
                    api.get_metadata_opt(name),
                )
                .await?;
                match fresh {
                    Some(fresh) if written_by_akri(&fresh.metadata) => meta = fresh.metadata,
                    _ => return Ok(false),
                }
            }
        }
    }
    warn!(instance = %name, namespace = %ns, "Instance written by Akri kept changing; the next sweep retries");
    Ok(false)
}

async fn remove_once(api: &Api<Instance>, meta: &ObjectMeta) -> Result<Removal, CrdError> {
    let (Some(name), Some(ns), Some(uid)) = (&meta.name, &meta.namespace, &meta.uid) else {
        return Ok(Removal::Gone);
    };
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    let akri = akri_node_finalizers(&finalizers);
    if !akri.is_empty() {
        let kept: Vec<&String> = finalizers.iter().filter(|f| !akri.contains(f)).collect();
        // The resourceVersion makes the patch conditional: a finalizer added meanwhile stays.
        let patch =
            json!({"metadata": {"resourceVersion": meta.resource_version, "finalizers": kept}});
        let result = call(
            format!("removing node finalizers of Instance {ns}/{name}"),
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
        match result.as_ref().err().map(api_code) {
            None => {}
            Some(Some(404)) => return Ok(Removal::Gone),
            Some(Some(409)) => return Ok(Removal::Conflict),
            Some(_) => return result.map(|_| Removal::Gone),
        }
    }
    if meta.deletion_timestamp.is_none() {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let result = call(
            format!("deleting Instance {ns}/{name}"),
            api.delete(name, &dp),
        )
        .await;
        match result.as_ref().err().map(api_code) {
            None => {}
            // Gone, or replaced by a new Instance of the same name (uid precondition).
            Some(Some(404 | 409)) => return Ok(Removal::Gone),
            Some(_) => return result.map(|_| Removal::Gone),
        }
    }
    info!(
        instance = %name,
        namespace = %ns,
        finalizers = ?akri,
        "removed an Instance written by Akri; Verge agents recreate it when they discover the device"
    );
    Ok(Removal::Removed)
}

/// Runs [`sweep_akri_instances`] now and then every `interval`, for one leadership term.
pub async fn sweep_loop(client: Client, namespace: Option<String>, interval: Duration) {
    loop {
        match sweep_akri_instances(&client, namespace.as_deref()).await {
            Ok(0) => {}
            Ok(n) => info!(count = n, "removed Instances written by Akri"),
            Err(e) => warn!(error = %e, "sweep for Akri-written Instances failed; retrying later"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn fixture(name: &str) -> CustomResourceDefinition {
        let path = format!(
            "{}/../tests/fixtures/akri/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn ours(name: &str) -> CustomResourceDefinition {
        desired()
            .into_iter()
            .find(|c| c.name_any() == name)
            .unwrap_or_else(|| panic!("no CRD {name}"))
    }

    #[test]
    fn our_crds_are_current_against_themselves_and_the_generated_files() {
        for (file, crd) in verge_crds::all_crds() {
            assert!(differences(&crd, &crd).is_empty());
            let path = format!("{}/../crds/{file}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let generated: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
            assert_eq!(
                differences(&generated, &crd),
                Vec::<String>::new(),
                "{file}"
            );
        }
    }

    #[test]
    fn server_defaults_are_not_differences() {
        let desired = ours("instances.akri.sh");
        let mut served = desired.clone();
        served.spec.names.list_kind = Some("InstanceList".into());
        served.spec.conversion = Some(Default::default());
        served.metadata.resource_version = Some("42".into());
        served.spec.versions[0].selectable_fields = Some(Vec::new());
        assert!(differences(&served, &desired).is_empty());
    }

    #[test]
    fn akri_instance_crd_lacks_status_and_our_schema() {
        let diff = differences(&fixture("instance-crd.yaml"), &ours("instances.akri.sh"));
        assert!(
            diff.iter().any(|d| d == "v0: no status subresource"),
            "{diff:?}"
        );
        assert!(diff.iter().any(|d| d == "v0: schema differs"), "{diff:?}");
        assert!(
            diff.iter().any(|d| d == "v0: printer columns differ"),
            "{diff:?}"
        );
    }

    #[test]
    fn akri_configuration_crd_lacks_status_and_our_schema() {
        let diff = differences(
            &fixture("configuration-crd.yaml"),
            &ours("configurations.akri.sh"),
        );
        assert!(
            diff.iter().any(|d| d == "v0: no status subresource"),
            "{diff:?}"
        );
        assert!(diff.iter().any(|d| d == "v0: schema differs"), "{diff:?}");
    }

    #[test]
    fn an_older_schema_or_extra_version_is_a_difference() {
        let desired = ours("configurations.akri.sh");
        let mut older = desired.clone();
        if let Some(props) = older.spec.versions[0]
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
        {
            props.remove("status");
        }
        assert_eq!(differences(&older, &desired), vec!["v0: schema differs"]);
        let mut extra = desired.clone();
        let mut v1 = extra.spec.versions[0].clone();
        v1.name = "v1".into();
        v1.storage = false;
        extra.spec.versions.push(v1);
        assert_eq!(
            differences(&extra, &desired),
            vec![r#"versions are ["v0", "v1"], not ["v0"]"#]
        );
        let mut unserved = desired.clone();
        unserved.spec.versions[0].subresources = None;
        assert_eq!(
            differences(&unserved, &desired),
            vec!["v0: no status subresource"]
        );
    }

    #[test]
    fn node_finalizers_are_akri_s_and_qualified_ones_are_not() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            akri_node_finalizers(&f(&[
                "node-a",
                "example.com/keep",
                "orphan",
                "foregroundDeletion"
            ])),
            f(&["node-a"])
        );
        assert!(akri_node_finalizers(&f(&["kubernetes.io/pvc-protection"])).is_empty());
    }

    fn managed(
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
        fields: Value,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: subresource.map(Into::into),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn akri_written_instances_are_recognised() {
        let spec = json!({"f:spec": {"f:nodes": {}}});
        let verge = ObjectMeta {
            managed_fields: Some(vec![
                managed("verge-agent/node-a", "Apply", None, spec.clone()),
                managed("verge-agent/node-a/device", "Apply", None, spec.clone()),
                managed(
                    "verge-controller",
                    "Apply",
                    Some("status"),
                    json!({"f:status": {}}),
                ),
                // A label added with kubectl is an update, but not of the spec.
                managed(
                    "kubectl-label",
                    "Update",
                    None,
                    json!({"f:metadata": {"f:labels": {}}}),
                ),
            ]),
            ..Default::default()
        };
        assert!(!written_by_akri(&verge));
        let updated = ObjectMeta {
            managed_fields: Some(vec![managed("akri-agent", "Update", None, spec)]),
            ..Default::default()
        };
        assert!(written_by_akri(&updated));
        let finalized = ObjectMeta {
            finalizers: Some(vec!["node-b".into()]),
            ..Default::default()
        };
        assert!(written_by_akri(&finalized));
        assert!(!written_by_akri(&ObjectMeta::default()));
    }
}
