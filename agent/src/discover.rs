//! `verge-agent discover`: run one discovery handler locally, without a
//! cluster, and print what it finds.
//!
//! ```text
//! verge-agent discover --handler debugEcho --details details.yaml --once
//! verge-agent discover --handler myHandler --endpoint /var/lib/akri/my.sock --details - --json
//! ```
//!
//! The handler is either one embedded in this agent binary (the same set the
//! agent registers at start-up) or an external one reached at `--endpoint`
//! (a unix socket path, or `http(s)://host:port`) through the same client the
//! agent uses. Each device list the handler sends is printed, as a table or as
//! one JSON object per line with `--json`.
//!
//! Exit codes: 0 devices found, 1 none found, 2 bad settings (the handler's
//! InvalidArgument, or a bad flag), 3 the handler is unreachable or failed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser};
use futures::StreamExt;
use verge_discovery_sdk::{
    Device, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate, HandlerEndpoint,
    RemoteHandler,
};

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Exit code: the handler found at least one device.
pub const EXIT_FOUND: u8 = 0;
/// Exit code: the handler found no device (by `--once` or `--timeout`).
pub const EXIT_NONE: u8 = 1;
/// Exit code: bad settings (flags, details, properties, or the handler's InvalidArgument).
pub const EXIT_BAD_SETTINGS: u8 = 2;
/// Exit code: the handler could not be reached or failed.
pub const EXIT_HANDLER_FAILED: u8 = 3;

/// Run one discovery handler locally and print the devices it finds.
#[derive(Args, Debug, Clone)]
pub struct DiscoverArgs {
    /// Handler name: an embedded handler (e.g. debugEcho), or the name of the
    /// external handler at --endpoint.
    #[arg(long)]
    pub handler: String,

    /// discoveryDetails (YAML or JSON) as a file, or `-` for stdin.
    #[arg(long)]
    pub details: String,

    /// A discoveryProperty `name=value` (repeatable).
    #[arg(long = "property", value_name = "NAME=VALUE")]
    pub properties: Vec<String>,

    /// An external handler's endpoint: a unix socket path, or
    /// `http://host:port` / `https://host:port`.
    #[arg(long)]
    pub endpoint: Option<String>,

    /// Whether the external handler's devices are shared (only shown).
    #[arg(long, default_value_t = false)]
    pub shared: bool,

    /// One JSON object per device list instead of a table.
    #[arg(long, default_value_t = false)]
    pub json: bool,

    /// Print the first device list and exit.
    #[arg(long, default_value_t = false)]
    pub once: bool,

    /// Stop after this long (e.g. 10s) and exit by the last list seen.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,

    #[command(flatten)]
    pub tls: crate::config::HandlerTlsArgs,
}

/// Flags the embedded handlers read from the agent's settings (their env vars
/// apply too, as for the agent).
#[derive(Parser, Debug)]
struct EmbeddedSettings {
    #[command(flatten)]
    config: AgentConfig,
}

/// Runs `verge-agent discover`.
pub async fn run(args: DiscoverArgs) -> ExitCode {
    match discover(args).await {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            eprintln!("verge-agent discover: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn bad(message: impl Into<String>) -> Failure {
    (EXIT_BAD_SETTINGS, one_line(&message.into()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read_details(source: &str) -> Result<String, Failure> {
    if source == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| bad(format!("cannot read details from stdin: {e}")))?;
        Ok(s)
    } else {
        std::fs::read_to_string(source).map_err(|e| bad(format!("cannot read {source}: {e}")))
    }
}

fn parse_properties(items: &[String]) -> Result<BTreeMap<String, Vec<u8>>, Failure> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.as_bytes().to_vec())),
            _ => Err(bad(format!("--property {item:?} is not NAME=VALUE"))),
        })
        .collect()
}

/// Parses `--endpoint`: `http(s)://…` is a network endpoint; anything else
/// (optionally prefixed `unix:`) a unix socket path.
pub fn parse_endpoint(s: &str) -> Result<HandlerEndpoint, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        tonic::transport::Endpoint::from_shared(s.to_string())
            .map_err(|e| format!("--endpoint {s:?}: {e}"))?;
        Ok(HandlerEndpoint::Network(s.to_string()))
    } else {
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.is_empty() {
            return Err("--endpoint is empty".to_string());
        }
        Ok(HandlerEndpoint::Uds(PathBuf::from(path)))
    }
}

fn embedded_handler(name: &str) -> Result<Arc<dyn DiscoveryHandler>, Failure> {
    // The same embedded handlers, configured the same way, as `verge-agent run`.
    let settings = EmbeddedSettings::try_parse_from(["verge-agent", "--node-name", "discover"])
        .map_err(|e| bad(format!("agent settings: {e}")))?;
    let registry = Registry::new(Metrics::new());
    crate::add_embedded_handlers(&registry, &settings.config);
    if let Some(found) = registry
        .get(name)
        .into_iter()
        .find(|h| h.endpoint.is_none())
    {
        return Ok(found.handler);
    }
    Err(bad(format!(
        "no embedded handler {name:?} in this agent; give --endpoint for an external handler"
    )))
}

fn failure(e: DiscoveryError) -> Failure {
    let code = if e.is_retryable() {
        EXIT_HANDLER_FAILED
    } else {
        EXIT_BAD_SETTINGS
    };
    (code, one_line(&e.to_string()))
}

async fn discover(args: DiscoverArgs) -> Result<u8, Failure> {
    let details = read_details(&args.details)?;
    let properties = parse_properties(&args.properties)?;
    let handler: Arc<dyn DiscoveryHandler> = match &args.endpoint {
        Some(endpoint) => Arc::new(
            RemoteHandler::new(
                args.handler.clone(),
                args.shared,
                parse_endpoint(endpoint).map_err(bad)?,
            )
            .with_tls(args.tls.client_config().map_err(|e| bad(e.to_string()))?),
        ),
        None => embedded_handler(&args.handler)?,
    };
    let request = DiscoveryRequest {
        details,
        properties,
    };
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let until_deadline = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    // One Ctrl-C listener for the whole run: a listener made anew in each loop turn would miss a
    // Ctrl-C that arrives between two turns (tokio only tells listeners that exist at the time).
    let shutdown = crate_shutdown();
    tokio::pin!(shutdown);

    let mut stream = tokio::select! {
        started = handler.discover(request) => started.map_err(failure)?,
        () = &mut until_deadline => return Err((EXIT_NONE, "no answer from the handler before --timeout".to_string())),
        () = &mut shutdown => return Ok(EXIT_NONE),
    };
    let mut last: Option<DiscoveryUpdate> = None;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = &mut until_deadline => break,
            () = &mut shutdown => break,
        };
        match item {
            Some(Ok(update)) => {
                if last.as_ref() != Some(&update) {
                    print_update(&update, args.json);
                }
                last = Some(update);
                if args.once {
                    break;
                }
            }
            Some(Err(e)) => return Err(failure(e)),
            None => {
                eprintln!("verge-agent discover: the handler ended the stream");
                break;
            }
        }
    }
    Ok(match last {
        Some(u) if !u.devices.is_empty() => EXIT_FOUND,
        _ => EXIT_NONE,
    })
}

async fn crate_shutdown() {
    let _ = tokio::signal::ctrl_c().await;
}

fn print_update(update: &DiscoveryUpdate, json: bool) {
    if json {
        println!("{}", update_json(update));
    } else {
        print!("{}", update_table(update));
    }
}

/// One JSON object for a device list.
pub fn update_json(update: &DiscoveryUpdate) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = update.devices.iter().map(device_json).collect();
    let diagnostics: Vec<serde_json::Value> = update
        .diagnostics
        .iter()
        .map(|d| {
            serde_json::json!({"subject": d.subject, "severity": d.severity, "message": d.message})
        })
        .collect();
    serde_json::json!({
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "devices": devices,
        "diagnostics": diagnostics,
    })
}

fn device_json(d: &Device) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "properties": d.properties.iter().collect::<BTreeMap<_, _>>(),
        "mounts": d.mounts.iter().map(|m| serde_json::json!({
            "containerPath": m.container_path, "hostPath": m.host_path, "readOnly": m.read_only,
        })).collect::<Vec<_>>(),
        "deviceSpecs": d.device_specs.iter().map(|s| serde_json::json!({
            "containerPath": s.container_path, "hostPath": s.host_path, "permissions": s.permissions,
        })).collect::<Vec<_>>(),
    })
}

/// A device list as a table: a header line, then one row per device.
pub fn update_table(update: &DiscoveryUpdate) -> String {
    let mut out = format!(
        "# {} — {} device(s)\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        update.devices.len()
    );
    let width = update
        .devices
        .iter()
        .map(|d| d.id.chars().count())
        .chain(std::iter::once(2))
        .max()
        .unwrap_or(2);
    if !update.devices.is_empty() {
        out.push_str(&format!("{:width$}  PROPERTIES\n", "ID"));
    }
    for d in &update.devices {
        let props: BTreeMap<_, _> = d.properties.iter().collect();
        let props = props
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!("{:width$}  {props}\n", d.id));
    }
    for d in &update.diagnostics {
        out.push_str(&format!("! {} {}: {}\n", d.severity, d.subject, d.message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("/tmp/x.sock"),
            Ok(HandlerEndpoint::Uds("/tmp/x.sock".into()))
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/x.sock"),
            Ok(HandlerEndpoint::Uds("/tmp/x.sock".into()))
        );
        assert_eq!(
            parse_endpoint("http://127.0.0.1:9000"),
            Ok(HandlerEndpoint::Network("http://127.0.0.1:9000".into()))
        );
        assert!(parse_endpoint("").is_err());
    }

    #[test]
    fn properties() {
        let p = parse_properties(&["a=b=c".into(), "x=".into()]).expect("valid");
        assert_eq!(p["a"], b"b=c");
        assert_eq!(p["x"], b"");
        assert_eq!(
            parse_properties(&["novalue".into()]).map_err(|e| e.0),
            Err(EXIT_BAD_SETTINGS)
        );
    }

    #[test]
    fn table() {
        let update = DiscoveryUpdate::devices(vec![Device {
            id: "cam-1".into(),
            properties: [("K".to_string(), "v".to_string())].into(),
            ..Default::default()
        }])
        .with_diagnostic("cam-2", "Error", "wrong password");
        let t = update_table(&update);
        assert!(t.contains("1 device(s)"), "{t}");
        assert!(t.contains("cam-1  K=v"), "{t}");
        assert!(t.contains("! Error cam-2: wrong password"), "{t}");
    }
}
