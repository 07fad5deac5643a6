//! verge-controller: makes every akri.sh Instance's broker Pods or Job and Services exist as its
//! Configuration declares, reports status, and removes lost nodes from Instances. Two replicas
//! are safe: only the holder of the leader Lease runs the controllers.

mod brokers;
mod cli;
mod configurations;
mod context;
mod crds;
mod error;
mod failures;
mod http;
mod instances;
mod leader;
mod metrics;
mod nodes;
mod services;
mod status;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;
use verge_crds::naming::{CONTROLLER_LABEL_VALUE, LABEL_CONFIGURATION, LABEL_CONTROLLER};
use verge_crds::{Configuration, Instance};

use crate::cli::{Args, LogFormat};
use crate::context::Context;
use crate::http::Health;
use crate::leader::{Elector, LeaseSettings};
use crate::metrics::Metrics;

#[tokio::main]
async fn main() -> ExitCode {
    // When the workspace is built in one go, cargo unifies rustls' features and another crate's
    // aws-lc-rs provider is compiled in beside ring; rustls then cannot choose for kube's client.
    // Err only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Err(message) = args.validate() {
        eprintln!("verge-controller: {message}");
        return ExitCode::from(2);
    }
    init_tracing(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("building the Kubernetes client")?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    info!(addr = %args.http_addr, "serving /healthz, /readyz and /metrics");
    let app = http::router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "HTTP server stopped");
        }
    });

    if args.manage_crds {
        // Before standing for leader, so no term runs against Akri's or outdated CRDs.
        crds::ensure_current_at_startup(&client).await;
    }

    let identity = args.identity();
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &args.lease_namespace),
        LeaseSettings {
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
            create: args.lease_create,
        },
    );
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let shared = Shared {
        client,
        args,
        identity,
        metrics,
        health,
    };
    loop {
        if !stand_by(&shared, &mut elector, shutdown.as_mut()).await {
            return Ok(());
        }
        match lead(&shared, &mut elector, shutdown.as_mut()).await {
            Term::Shutdown => return Ok(()),
            Term::Fatal(e) => return Err(e),
            // Back to standby: the controllers are stopped, a new term starts them afresh.
            Term::Lost(reason) => error!("{reason}; stopped the controllers, standing by"),
        }
    }
}

/// What `run` hands to each leadership term.
struct Shared {
    client: Client,
    args: Args,
    identity: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// How a leadership term ended.
enum Term {
    /// SIGTERM or Ctrl-C.
    Shutdown,
    /// The Lease is gone (taken, or not renewable in time).
    Lost(String),
    /// The controllers stopped by themselves.
    Fatal(anyhow::Error),
}

type Shutdown<'a> = std::pin::Pin<&'a mut (dyn std::future::Future<Output = ()> + Send)>;

/// Waits until this replica holds the Lease. Returns false on shutdown.
async fn stand_by(shared: &Shared, elector: &mut Elector, mut shutdown: Shutdown<'_>) -> bool {
    let args = &shared.args;
    info!(
        identity = shared.identity,
        lease = args.lease_name,
        namespace = args.lease_namespace,
        "waiting to become leader"
    );
    loop {
        let round = tokio::time::timeout(args.lease_renew_deadline, elector.try_acquire_or_renew());
        tokio::select! {
            _ = &mut shutdown => return false,
            result = round => match result {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => shared.health.set_api_reachable(true),
                Ok(Err(e)) => {
                    shared.health.set_api_reachable(false);
                    warn!(error = %e, "Lease round failed");
                }
                Err(_) => {
                    shared.health.set_api_reachable(false);
                    warn!("Lease round timed out");
                }
            },
        }
        tokio::select! {
            _ = &mut shutdown => return false,
            _ = tokio::time::sleep(args.lease_retry_period) => {}
        }
    }
}

/// Runs the controllers while the Lease is renewed.
async fn lead(shared: &Shared, elector: &mut Elector, mut shutdown: Shutdown<'_>) -> Term {
    let args = &shared.args;
    shared.health.set_api_reachable(true);
    shared.metrics.leader.set(1);
    info!(
        identity = shared.identity,
        "became leader; starting controllers"
    );
    let mut controllers = tokio::spawn(run_controllers(
        shared.client.clone(),
        args.clone(),
        shared.identity.clone(),
        shared.metrics.clone(),
    ));
    let mut last_renewal = Instant::now();
    let term = loop {
        tokio::select! {
            _ = &mut shutdown => {
                controllers.abort();
                shared.metrics.leader.set(0);
                if let Err(e) = elector.release().await {
                    warn!(error = %e, "could not release the Lease; a standby takes over when it expires");
                }
                return Term::Shutdown;
            }
            result = &mut controllers => {
                shared.metrics.leader.set(0);
                return Term::Fatal(anyhow::anyhow!("controllers stopped unexpectedly: {result:?}"));
            }
            _ = tokio::time::sleep(args.lease_retry_period) => {
                let round = tokio::time::timeout(args.lease_renew_deadline, elector.try_acquire_or_renew()).await;
                match round {
                    Ok(Ok(true)) => {
                        last_renewal = Instant::now();
                        shared.health.set_api_reachable(true);
                    }
                    Ok(Ok(false)) => break Term::Lost("another replica holds the leader Lease".into()),
                    Ok(Err(_)) | Err(_) => {
                        shared.health.set_api_reachable(false);
                        // Stop before the Lease can expire, so a standby never acts alongside us.
                        if last_renewal.elapsed() >= args.lease_renew_deadline {
                            break Term::Lost(format!(
                                "could not renew the leader Lease for {:?}",
                                args.lease_renew_deadline
                            ));
                        }
                        warn!("Lease renewal failed; retrying");
                    }
                }
            }
        }
    };
    controllers.abort();
    // Wait for the abort to land so nothing of this term still writes when the next begins.
    let _ = controllers.await;
    shared.metrics.leader.set(0);
    term
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The Configuration of a broker (Pod or Job) by its label.
fn configuration_of<K: Resource>(obj: &K) -> Option<ObjectRef<Configuration>> {
    let namespace = obj.meta().namespace.as_deref()?;
    let name = obj.meta().labels.as_ref()?.get(LABEL_CONFIGURATION)?;
    Some(ObjectRef::new(name).within(namespace))
}

async fn run_controllers(client: Client, args: Args, identity: String, metrics: Arc<Metrics>) {
    let ns = args.watch_namespace.clone();
    let akri_sweep = crds::sweep_loop(client.clone(), ns.clone(), args.resync_interval);
    let ns = ns.as_deref();
    let configurations: Api<Configuration> = api(&client, ns);
    let instances: Api<Instance> = api(&client, ns);
    let pods: Api<Pod> = api(&client, ns);
    let jobs: Api<Job> = api(&client, ns);
    let services: Api<Service> = api(&client, ns);
    // Only what the controller made is watched, not every Pod in the cluster.
    let brokers =
        watcher::Config::default().labels(&format!("{LABEL_CONTROLLER}={CONTROLLER_LABEL_VALUE}"));
    let debounce = controller::Config::default().debounce(args.reconcile_debounce);

    let configuration_controller =
        Controller::new(configurations.clone(), watcher::Config::default());
    let ctx = Arc::new(Context::new(
        client,
        args,
        identity,
        metrics,
        configuration_controller.store(),
    ));

    let instance_controller = Controller::new(instances.clone(), watcher::Config::default());
    let seen_generations: Mutex<HashMap<(String, String), i64>> = Mutex::new(HashMap::new());
    let instance_store = instance_controller.store();
    let instance_loop = instance_controller
        .owns(pods.clone(), brokers.clone())
        .owns(jobs.clone(), brokers.clone())
        .owns(services.clone(), brokers.clone())
        // A changed Configuration (broker spec, Service spec) concerns all of its Instances;
        // its status changes (every count, every agent report) do not.
        .watches(
            configurations,
            watcher::Config::default(),
            move |c: Configuration| {
                let namespace = c.namespace();
                let name = c.name_any();
                let generation = c.metadata.generation.unwrap_or_default();
                let key = (namespace.clone().unwrap_or_default(), name.clone());
                let mut seen = seen_generations.lock().unwrap_or_else(|e| e.into_inner());
                if seen.insert(key, generation) == Some(generation) {
                    return Vec::new();
                }
                drop(seen);
                instance_store
                    .state()
                    .into_iter()
                    .filter(|i| i.namespace() == namespace && i.spec.configuration_name == name)
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(debounce.clone())
        .run(instances::reconcile, instances::error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(instance = %object, "reconciled"),
                Err(e) => debug!(error = %e, "instance controller"),
            }
        });

    let configuration_loop = configuration_controller
        .owns(services, brokers.clone())
        .watches(instances, watcher::Config::default(), |i: Instance| {
            let namespace = i.namespace()?;
            Some(ObjectRef::new(&i.spec.configuration_name).within(&namespace))
        })
        .watches(pods, brokers.clone(), |p: Pod| configuration_of(&p))
        .watches(jobs, brokers, |j: Job| configuration_of(&j))
        .with_config(debounce)
        .run(
            configurations::reconcile,
            configurations::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(configuration = %object, "reconciled"),
                Err(e) => debug!(error = %e, "configuration controller"),
            }
        });

    tokio::join!(
        instance_loop,
        configuration_loop,
        nodes::run(ctx),
        akri_sweep
    );
}
