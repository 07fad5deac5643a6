//! NETWORK handler endpoints on the real cluster (issues 4 and 12): registration always goes
//! through the node-local socket, discovery is dialled over TCP.
//!
//! - A handler in a pod on the node's pod network registers `http://<pod IP>:<port>` (plain http
//!   is accepted there) and its devices become Instances.
//! - A handler outside the pod network (on the device LAN's host address) must serve TLS: with a
//!   certificate signed by the CA the agent was given, and the agent's client certificate
//!   required (mutual TLS), its devices become Instances; the same handler without TLS is refused
//!   at registration with a message saying to use https.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::agent::{Agent, ensure_crds};
use verge_e2e::controller::free_port;
use verge_e2e::{Cluster, report_time, wait_until};

const NODE: &str = "verge-node-1";
const DEADLINE: Duration = Duration::from_secs(90);
/// The host's address on the harness's device LAN: outside every pod network.
const LAN_HOST: &str = "10.204.0.1";
/// Node 1's pod network in the harness (tests/cluster/README.md).
const POD_NETWORK: &str = "10.202.1.0/24";
const HANDLER_IMAGE: &str = "localhost/verge/debug-echo-discovery:dev";

fn handler_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("verge-debug-echo-discovery"))
        .context("locating the target directory")?;
    ensure!(
        bin.exists(),
        "{} is missing; run `cargo build --workspace --bins`",
        bin.display()
    );
    Ok(bin)
}

fn configuration(name: &str, descriptions: &[&str]) -> String {
    let list: Vec<String> = descriptions.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
spec:
  discoveryHandler:
    name: debugEcho
    discoveryDetails: |
      descriptions: [{}]
  capacity: 1
",
        list.join(", ")
    )
}

async fn instance_names(c: &Cluster, ns: &str) -> Result<BTreeSet<String>> {
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|i| i.name_any())
        .collect())
}

async fn wait_instances(c: &Cluster, ns: &str, n: usize) -> Result<BTreeSet<String>> {
    wait_until(&format!("{n} Instances in {ns}"), DEADLINE, || async {
        let names = instance_names(c, ns).await?;
        Ok((names.len() == n).then_some(names))
    })
    .await
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA (`ca.crt`), a serving certificate for `LAN_HOST` (`server.*`) and an agent client
/// certificate (`agent.*`), all P-256, in `dir`.
fn make_pki(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=verge-e2e-ca",
    ]);
    openssl(dir, &ca)?;
    for (name, ext) in [
        (
            "server",
            format!("subjectAltName=IP:{LAN_HOST}\nextendedKeyUsage=serverAuth\n"),
        ),
        (
            "agent",
            "subjectAltName=DNS:verge-agent\nextendedKeyUsage=clientAuth\n".to_string(),
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, crt, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=verge-e2e"]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        )?;
    }
    Ok(())
}

/// An external debugEcho handler process serving on the device LAN's host address.
struct LanHandler {
    child: Child,
    log: PathBuf,
}

impl LanHandler {
    fn start(agent: &Agent, tag: &str, extra: &[&str]) -> Result<LanHandler> {
        let log = agent
            .handlers_dir
            .with_file_name(format!("{tag}-handler.log"));
        let out = std::fs::File::create(&log)?;
        let listen = format!("{LAN_HOST}:{}", free_port()?);
        let child = Command::new(handler_binary()?)
            .args(["--directory", &agent.handlers_dir.display().to_string()])
            .args(["--listen", &listen])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting verge-debug-echo-discovery")?;
        Ok(LanHandler { child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn tls_handler_outside_the_pod_network() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("net-tls").await?;
    let pki = std::env::temp_dir().join(format!("verge-e2e-pki-{}", ns.name()));
    std::fs::create_dir_all(&pki)?;
    make_pki(&pki)?;
    let file = |n: &str| pki.join(n).display().to_string();

    // The embedded debugEcho is off, so every device comes over the network.
    let agent = Agent::start(
        NODE,
        ns.name(),
        &[
            "--disable-debug-echo",
            "--handler-tls-ca-file",
            &file("ca.crt"),
            "--handler-tls-cert-file",
            &file("agent.crt"),
            "--handler-tls-key-file",
            &file("agent.key"),
        ],
    )
    .await?;
    agent.wait_up(DEADLINE).await?;

    // Plain http from outside the pod network: refused at registration.
    let mut plain = LanHandler::start(&agent, "plain", &[])?;
    let refused = wait_until("the plain-http handler's refusal", DEADLINE, || async {
        Ok(plain
            .log_text()
            .lines()
            .find(|l| l.contains("registration failed") && l.contains("use https"))
            .map(str::to_string))
    })
    .await?;
    println!("[e2e] plain http outside the pod network: {refused}");
    plain.child.kill().await?;

    // TLS with the agent's CA, requiring the agent's client certificate.
    let t = Instant::now();
    let tls = LanHandler::start(
        &agent,
        "tls",
        &[
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-client-ca-file",
            &file("ca.crt"),
        ],
    )?;
    c.apply_yaml(
        Some(ns.name()),
        &configuration("net-tls", &["lan-a", "lan-b"]),
    )
    .await?;
    let names = wait_instances(&c, ns.name(), 2)
        .await
        .with_context(|| format!("handler log:\n{}", tls.log_text()))?;
    report_time("https handler on the device LAN: start → 2 Instances", t);
    ensure!(
        tls.log_text().contains(&format!("https://{LAN_HOST}:")),
        "the handler did not advertise https"
    );
    println!("[e2e] Instances over mutual TLS: {names:?}");

    drop(tls);
    let _ = std::fs::remove_dir_all(&pki);
    Ok(())
}

#[tokio::test]
async fn handler_pod_on_the_pod_network_serves_plain_http() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    ensure_crds(&c).await?;
    let ns = c.namespace("net-pod").await?;
    // The harness's CNI gives node 1 10.202.1.0/24 but leaves the Node's spec.podCIDR empty (as
    // Calico or Cilium do), so the agent is told its pod network.
    let agent = Agent::start(
        NODE,
        ns.name(),
        &["--disable-debug-echo", "--pod-network-cidr", POD_NETWORK],
    )
    .await?;
    agent.wait_up(DEADLINE).await?;

    // The handler pod reaches the agent's registration socket through a hostPath (as the
    // chart's custom handler DaemonSet does with /var/lib/akri) and serves on its pod IP.
    let t = Instant::now();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "net-handler"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "handler",
                "image": HANDLER_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["--directory", "/var/lib/akri", "--listen", "0.0.0.0:9600"],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "RUST_LOG", "value": "info"},
                ],
                // The registration socket is root's (0660); the chart grants a group instead.
                "securityContext": {"runAsUser": 0},
                "volumeMounts": [{"name": "akri", "mountPath": "/var/lib/akri"}],
            }],
            "volumes": [{"name": "akri", "hostPath": {
                "path": agent.handlers_dir.display().to_string(), "type": "Directory"}}],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(c.client(), ns.name());
    pods.create(&Default::default(), &pod).await?;
    c.apply_yaml(
        Some(ns.name()),
        &configuration("net-pod", &["pod-a", "pod-b"]),
    )
    .await?;
    let names = wait_instances(&c, ns.name(), 2).await.with_context(|| {
        format!(
            "agent log tail:\n{}",
            agent
                .log_text()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    report_time("handler pod on the pod network: create → 2 Instances", t);
    // The kubelet reports the pod's IP in its status a moment after the pod is serving.
    let ip = wait_until("the handler pod's IP in its status", DEADLINE, || async {
        Ok(pods.get("net-handler").await?.status.and_then(|s| s.pod_ip))
    })
    .await?;
    ensure!(
        agent.log_text().contains(&format!("http://{ip}:9600")),
        "the agent log does not show the pod-IP endpoint http://{ip}:9600"
    );
    println!("[e2e] Instances from the handler pod at http://{ip}:9600: {names:?}");
    Ok(())
}
