//! Command line and environment settings. Every interval, timeout and delay the
//! controller uses is here, with its default, so operators can tune it without a rebuild.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "verge-controller";

/// Name the controller reports Events under.
pub const REPORTER: &str = "verge-controller";

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// verge-controller: starts and keeps broker Pods, Jobs and Services for every akri.sh
/// Instance, reports status on Configurations and Instances, and removes lost nodes.
#[derive(Parser, Debug, Clone)]
#[command(name = "verge-controller", version, about)]
pub struct Args {
    /// Address of the HTTP server that serves /healthz, /readyz and /metrics.
    #[arg(long, env = "VERGE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Watch only this namespace (all namespaces when unset). Node loss is then handled only
    /// for Instances in this namespace.
    #[arg(long, env = "VERGE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, env = "VERGE_LEASE_NAME", default_value = "verge-controller")]
    pub lease_name: String,

    /// Namespace of the Lease (the controller's own namespace in the chart).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Create the Lease when it is missing. The chart creates it itself and turns this off:
    /// Helm creates Leases after Deployments, so a controller that created it first made
    /// `helm install` fail with "already exists".
    #[arg(long, env = "VERGE_LEASE_CREATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub lease_create: bool,

    /// Identity written into the Lease; defaults to `<hostname>-<pid>`.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a Lease holder is trusted without a renewal; a standby takes over after this.
    #[arg(long, env = "VERGE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// The leader gives up (and exits) when it could not renew for this long. Must be
    /// shorter than the lease duration so that two leaders never overlap.
    #[arg(long, env = "VERGE_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,

    /// How often the leader renews and a standby retries the Lease.
    #[arg(long, env = "VERGE_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,

    /// A node that is gone or not Ready for this long leaves every Instance and its brokers
    /// are deleted.
    #[arg(long, env = "VERGE_NODE_LOSS_DELAY", default_value = "60s", value_parser = parse_duration)]
    pub node_loss_delay: Duration,

    /// How often node health is checked against the Instances.
    #[arg(long, env = "VERGE_NODE_CHECK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub node_check_interval: Duration,

    /// A broker Pod Pending for longer than this is replaced.
    #[arg(long, env = "VERGE_PENDING_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pending_timeout: Duration,

    /// First delay before a failed broker Pod is replaced; doubles with each further failure.
    #[arg(long, env = "VERGE_FAILED_BACKOFF_INITIAL", default_value = "5s", value_parser = parse_duration)]
    pub failed_backoff_initial: Duration,

    /// Cap of the failed-broker replacement delay.
    #[arg(long, env = "VERGE_FAILED_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub failed_backoff_max: Duration,

    /// First retry delay after a reconcile error; doubles per consecutive error of an object.
    #[arg(long, env = "VERGE_ERROR_BACKOFF_INITIAL", default_value = "1s", value_parser = parse_duration)]
    pub error_backoff_initial: Duration,

    /// Cap of the reconcile error retry delay.
    #[arg(long, env = "VERGE_ERROR_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub error_backoff_max: Duration,

    /// Every object is reconciled again at least this often, even without a change.
    #[arg(long, env = "VERGE_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// How soon to look again while an old broker is still terminating.
    #[arg(long, env = "VERGE_TERMINATING_RECHECK", default_value = "2s", value_parser = parse_duration)]
    pub terminating_recheck: Duration,

    /// Changes arriving within this window are reconciled once (Configurations see a burst of
    /// Pod and Instance events).
    #[arg(long, env = "VERGE_RECONCILE_DEBOUNCE", default_value = "500ms", value_parser = parse_duration)]
    pub reconcile_debounce: Duration,

    /// At start, bring the akri.sh CRDs up to the ones this controller was built with (Helm
    /// never upgrades a chart's CRDs; Akri's lack the status subresource). `false` for
    /// operators who manage the CRDs themselves.
    #[arg(long, env = "VERGE_MANAGE_CRDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_crds: bool,

    /// Log format.
    #[arg(long, env = "VERGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Args {
    /// The Lease holder identity: `--identity`, else `<hostname>-<pid>`.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "verge-controller".to_string());
            format!("{host}-{}", std::process::id())
        })
    }

    /// Checks relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_renew_deadline >= self.lease_duration {
            return Err(format!(
                "--lease-renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
                self.lease_renew_deadline, self.lease_duration
            ));
        }
        if self.lease_retry_period >= self.lease_renew_deadline {
            return Err(format!(
                "--lease-retry-period ({:?}) must be shorter than --lease-renew-deadline ({:?})",
                self.lease_retry_period, self.lease_renew_deadline
            ));
        }
        if self.failed_backoff_initial > self.failed_backoff_max {
            return Err("--failed-backoff-initial exceeds --failed-backoff-max".into());
        }
        if self.error_backoff_initial > self.error_backoff_max {
            return Err("--error-backoff-initial exceeds --error-backoff-max".into());
        }
        Ok(())
    }
}

/// Parses `500ms`, `15s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 15s, 2m or 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults_are_consistent() {
        let args = Args::parse_from(["verge-controller"]);
        assert_eq!(args.validate(), Ok(()));
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert_eq!(args.node_loss_delay, Duration::from_secs(60));
        assert!(args.manage_crds);
        let unmanaged = Args::parse_from(["verge-controller", "--manage-crds=false"]);
        assert!(!unmanaged.manage_crds);
        let bad = Args::parse_from([
            "verge-controller",
            "--lease-duration",
            "5s",
            "--lease-renew-deadline",
            "10s",
        ]);
        assert!(bad.validate().is_err());
    }
}
