//! `verge-bench`: benchmarks of the chart-installed Verge on the test cluster
//! (`tests/cluster/cluster`). Each scenario takes the machine-wide e2e lock exclusively, installs
//! the chart (release `verge` in `verge-system`, agent pinned to one node), measures, writes
//! `<target>/bench/<scenario>.json` and `.png`, prints a table, and always uninstalls.
//!
//! ```sh
//! cargo run --release -p verge-bench -- latency        # or footprint, scale, slots, restart, all
//! ```

mod common;
mod footprint;
mod latency;
mod latency_modbus;
mod report;
mod restart;
mod scale;
mod slots;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use common::{Ctx, Installation, base_helm_args, lock_exclusive};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks of Verge on the test cluster (tests/cluster)")]
struct Cli {
    /// Node the agent is pinned to and the devices appear on.
    #[arg(long, default_value = "verge-node-1", global = true)]
    node: String,
    /// Output directory (default: `$CARGO_TARGET_DIR/bench`, else `./target/bench`).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Agent memory limit for the run (the chart's default, 64Mi, would OOM-kill at thousands of devices).
    #[arg(long, default_value = "1Gi", global = true)]
    agent_memory_limit: String,
    /// Extra `helm` arguments for the install (repeat), e.g. `--helm-arg=--set --helm-arg=controller.replicas=1`.
    #[arg(long = "helm-arg", global = true, allow_hyphen_values = true)]
    helm_args: Vec<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// Device online/offline → Instance → kubelet → Node → broker.
    Latency(latency::Opts),
    /// RSS and CPU idle and with 1,000 Instances; binary and image sizes.
    Footprint(footprint::Opts),
    /// 10 … 5,000 devices on one node.
    Scale(scale::Opts),
    /// Slot handover between pods; admission rejections.
    Slots(slots::Opts),
    /// kubelet and agent restarts.
    Restart(restart::Opts),
    /// Every scenario with its defaults, one after the other.
    All,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Latency(_) => "latency",
            Scenario::Footprint(_) => "footprint",
            Scenario::Scale(_) => "scale",
            Scenario::Slots(_) => "slots",
            Scenario::Restart(_) => "restart",
            Scenario::All => "all",
        }
    }

    async fn measure(&self, ctx: &Ctx) -> Result<()> {
        match self {
            Scenario::Latency(o) => latency::run(ctx, o).await.map(|_| ()),
            Scenario::Footprint(o) => footprint::run(ctx, o).await.map(|_| ()),
            Scenario::Scale(o) => scale::run(ctx, o).await.map(|_| ()),
            Scenario::Slots(o) => slots::run(ctx, o).await.map(|_| ()),
            Scenario::Restart(o) => restart::run(ctx, o).await.map(|_| ()),
            Scenario::All => bail!("`all` is expanded before it runs"),
        }
    }
}

/// One scenario: exclusive lock, install, measure, uninstall (also on error or Ctrl-C), unlock.
async fn run_one(cli: &Cli, ctx: &Ctx, scenario: &Scenario) -> Result<()> {
    eprintln!("== {} ==", scenario.name());
    let lock = lock_exclusive().await?;
    let mut args = base_helm_args(&ctx.node);
    args.extend([
        "--set".into(),
        format!("agent.resources.limits.memory={}", cli.agent_memory_limit),
    ]);
    if matches!(scenario, Scenario::Latency(o) if o.modbus_reps > 0) {
        // The polled-handler part needs the embedded modbus-tcp handler.
        args.extend(["--set".into(), "modbus.discovery.enabled=true".into()]);
    }
    args.extend(cli.helm_args.iter().cloned());
    let result = match Installation::install(&ctx.out_dir, &args).await {
        Ok(install) => {
            let r = tokio::select! {
                r = scenario.measure(ctx) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            };
            install.finish(&ctx.cluster).await;
            r
        }
        Err(e) => Err(e),
    };
    drop(lock);
    result.with_context(|| format!("scenario {}", scenario.name()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let out_dir = cli
        .out
        .clone()
        .unwrap_or_else(|| common::target_dir().join("bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let cluster = verge_e2e::Cluster::try_connect()
        .await
        .context("no test cluster (tests/cluster/cluster up)")?;
    let ctx = Ctx {
        cluster,
        node: cli.node.clone(),
        out_dir,
    };
    let scenarios = match &cli.scenario {
        Scenario::All => vec![
            Scenario::Latency(latency::Opts {
                reps: 8,
                grace_reps: 2,
                modbus_reps: 4,
            }),
            Scenario::Footprint(footprint::Opts {
                window: 20,
                devices: 1000,
            }),
            Scenario::Scale(scale::Opts {
                sizes: vec![10, 100, 1000, 5000],
                timeout: 300,
            }),
            Scenario::Slots(slots::Opts { reps: 10 }),
            Scenario::Restart(restart::Opts {
                kubelet_reps: 3,
                agent_reps: 3,
            }),
        ],
        s => vec![s.clone()],
    };
    let mut failed = Vec::new();
    for s in &scenarios {
        // The lock is released between scenarios so waiting e2e tests can run.
        if let Err(e) = run_one(&cli, &ctx, s).await {
            eprintln!("error: {e:#}");
            failed.push(s.name());
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
