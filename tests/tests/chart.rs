//! The Helm chart (`helm/verge`): its CRDs are the generated ones, it lints and renders, the
//! cluster accepts what it renders, and a release installed with the locally built images gives
//! Instances, brokers and Services, upgrades in place, refuses invalid Configurations and
//! uninstalls without leftovers. Every cluster test holds `verge_e2e::serial()`: a chart-installed
//! agent and admission policy must not meet other tests' host-process agents.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use verge_e2e::{
    BROKER_IMAGE, BROKER_PORT, Cluster, helm_path, kubeconfig_path, kubectl_path, repo_root,
    report_time, run, run_ok, serial, uncaptured, wait_until,
};

const RELEASE: &str = "verge-e2e-chart";

fn chart_dir() -> PathBuf {
    repo_root().join("helm/verge")
}

fn chart() -> String {
    chart_dir().display().to_string()
}

async fn helm(args: &[&str]) -> Result<String> {
    run_ok(&helm_path(), args, None).await
}

/// `helm` must be there when the e2e tests are required; otherwise a missing helm skips.
fn have_helm() -> bool {
    let p = helm_path();
    let found = p.is_absolute() && p.exists()
        || std::process::Command::new(&p)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !verge_e2e::required(),
            "VERGE_E2E=required but helm is missing (tests/cluster/cluster build)"
        );
        uncaptured("verge-e2e: SKIPPING chart test: no helm (tests/cluster/cluster build)");
    }
    found
}

#[test]
fn chart_crds_are_the_generated_crds() -> Result<()> {
    let root = repo_root();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("crds"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            names.push(path.file_name().unwrap().to_owned());
        }
    }
    ensure!(!names.is_empty(), "no crds/*.yaml");
    let mut chart_names: Vec<_> = std::fs::read_dir(chart_dir().join("crds"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    chart_names.sort();
    ensure!(
        names == chart_names,
        "helm/verge/crds holds {chart_names:?}, crds/ holds {names:?}; copy crds/*.yaml to helm/verge/crds/"
    );
    for name in &names {
        let generated = std::fs::read(root.join("crds").join(name))?;
        let copy = std::fs::read(chart_dir().join("crds").join(name))?;
        ensure!(
            generated == copy,
            "helm/verge/crds/{} differs from crds/{0}: run `cp crds/*.yaml helm/verge/crds/`",
            name.to_string_lossy()
        );
    }
    Ok(())
}

#[tokio::test]
async fn chart_lints_and_schema_rejects_misspelt_values() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    let lint = run(&helm_path(), &["lint", "--strict", &chart()], None).await?;
    ensure!(
        lint.status.success()
            && !lint.stdout.contains("[WARNING]")
            && !lint.stdout.contains("[ERROR]"),
        "helm lint: {}{}",
        lint.stdout,
        lint.stderr
    );
    for (set, expected) in [
        (
            "agent.imag.tag=x",
            "additional properties 'imag' not allowed",
        ),
        ("agent.metricsPort=abc", "want integer"),
        (
            "debugEcho.configuration.capacit=2",
            "additional properties 'capacit' not allowed",
        ),
        (
            "onvif.configuration.discoveryDetails.ipAdresses.action=Include",
            "additional properties 'ipAdresses' not allowed",
        ),
        (
            "controller.logFormat=xml",
            "value must be one of 'text', 'json'",
        ),
        (
            "modbus.configuration.discoveryHandlerName=modbus",
            "value must be one of 'modbus-tcp', 'modbus-rtu'",
        ),
        (
            "ble.configuration.discoveryDetails.minRsi=-70",
            "additional properties 'minRsi' not allowed",
        ),
    ] {
        let out = run(
            &helm_path(),
            &["template", "t", &chart(), "--set", set],
            None,
        )
        .await?;
        ensure!(!out.status.success(), "--set {set} was accepted");
        ensure!(
            out.stderr.contains(expected),
            "--set {set}: expected {expected:?} in: {}",
            out.stderr
        );
    }
    Ok(())
}

/// The agent's host access follows the enabled protocols: host network for multicast (onvif,
/// mdns) and uevents (usb, udev), /run/udev for uevents, the system D-Bus only for ble.
#[tokio::test]
async fn agent_host_access_follows_enabled_protocols() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    for (block, host_network, run_udev, run_dbus) in [
        ("debugEcho", false, false, false),
        ("modbus", false, false, false),
        ("ble", false, false, true),
        ("onvif", true, false, false),
        ("mdns", true, false, false),
        ("usb", true, true, false),
        ("udev", true, true, false),
    ] {
        let set = format!("{block}.discovery.enabled=true");
        let out = run(
            &helm_path(),
            &[
                "template",
                "t",
                &chart(),
                "--set",
                &set,
                "--show-only",
                "templates/agent.yaml",
            ],
            None,
        )
        .await?;
        ensure!(out.status.success(), "{set}: {}", out.stderr);
        let agent = out.stdout;
        for (what, expected, present) in [
            (
                "hostNetwork",
                host_network,
                agent.contains("hostNetwork: true"),
            ),
            (
                "/run/udev",
                run_udev,
                agent.contains("mountPath: /run/udev"),
            ),
            (
                "/run/dbus",
                run_dbus,
                agent.contains("mountPath: /run/dbus"),
            ),
        ] {
            ensure!(
                present == expected,
                "--set {set}: {what} expected {expected}, rendered {present}:\n{agent}"
            );
        }
    }
    Ok(())
}

/// The protocol handlers' chart blocks (each creates a Configuration when enabled).
const PROTOCOL_BLOCKS: [&str; 6] = ["onvif", "usb", "udev", "modbus", "ble", "mdns"];

/// `helm template t <chart> --set ...` parsed into its documents (helm only, no cluster).
async fn render(sets: &[String]) -> Result<Vec<serde_json::Value>> {
    let chart = chart();
    let mut args = vec!["template", "t", chart.as_str()];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let out = helm(&args).await?;
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&out).context("parsing helm template's output")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The DaemonSet called `name` among `docs`.
fn daemonset<'a>(docs: &'a [serde_json::Value], name: &str) -> Result<&'a serde_json::Value> {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
        .with_context(|| format!("no DaemonSet {name} rendered"))
}

fn daemonset_names(docs: &[serde_json::Value]) -> Vec<String> {
    let mut names: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// What a pod of a DaemonSet gets from the node: host network, and the hostPaths it mounts
/// (path, read-only) into its first container.
#[derive(Debug, PartialEq, Eq)]
struct HostAccess {
    host_network: bool,
    host_paths: Vec<(String, bool)>,
}

fn host_access(ds: &serde_json::Value) -> HostAccess {
    let pod = &ds["spec"]["template"]["spec"];
    let empty = Vec::new();
    let volumes = pod["volumes"].as_array().unwrap_or(&empty);
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap_or(&empty);
    let mut host_paths: Vec<(String, bool)> = volumes
        .iter()
        .filter_map(|v| {
            let path = v["hostPath"]["path"].as_str()?;
            let mount = mounts.iter().find(|m| m["name"] == v["name"])?;
            Some((path.to_string(), mount["readOnly"] == true))
        })
        .collect();
    host_paths.sort();
    HostAccess {
        host_network: pod["hostNetwork"] == true,
        host_paths,
    }
}

fn args(ds: &serde_json::Value) -> Vec<String> {
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A probe of the handler container: `(path, port name)`.
fn probe(ds: &serde_json::Value, which: &str) -> Option<(String, String)> {
    let p = &ds["spec"]["template"]["spec"]["containers"][0][which]["httpGet"];
    Some((
        p["path"].as_str()?.to_string(),
        p["port"].as_str()?.to_string(),
    ))
}

/// The agent's host paths that are always mounted, whatever protocols are enabled.
fn agent_base_paths() -> Vec<(String, bool)> {
    vec![
        ("/var/lib/akri".to_string(), false),
        ("/var/lib/kubelet/device-plugins".to_string(), false),
        ("/var/lib/kubelet/pod-resources".to_string(), true),
    ]
}

/// With `<block>.discovery.image.repository` set, the protocol's standalone handler runs as its
/// own DaemonSet with exactly that protocol's host access, registering over the agent's socket
/// directory (with the socket's group), probed on its health port; the agent stops embedding it
/// (`--disable-embedded-handler`) and loses the host access it had only for it.
#[tokio::test]
async fn protocol_handler_daemonsets_take_over_the_host_access() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    let handlers_dir = ("/var/lib/akri".to_string(), false);
    let run_udev = ("/run/udev".to_string(), true);
    let run_dbus = ("/run/dbus".to_string(), true);
    for (block, binary_args, disabled, host_network, paths, port) in [
        ("onvif", vec![], vec!["onvif"], true, vec![], 8091),
        (
            "usb",
            vec![],
            vec!["usb"],
            true,
            vec![run_udev.clone()],
            8092,
        ),
        (
            "udev",
            vec![],
            vec!["udev"],
            true,
            vec![run_udev.clone()],
            8093,
        ),
        (
            "modbus",
            vec!["--transport=tcp"],
            vec!["modbus-tcp"],
            false,
            vec![],
            8094,
        ),
        (
            "ble",
            vec![],
            vec!["ble"],
            false,
            vec![run_dbus.clone()],
            8095,
        ),
        ("mdns", vec![], vec!["mdns"], true, vec![], 8096),
    ] {
        let image = format!("example.com/verge-{block}-discovery");
        let docs = render(&[
            format!("{block}.discovery.enabled=true"),
            format!("{block}.discovery.image.repository={image}"),
            format!("{block}.discovery.args[0]=--extra"),
        ])
        .await?;
        let name = format!("t-verge-{block}-discovery");
        ensure!(
            daemonset_names(&docs) == ["t-verge-agent".to_string(), name.clone()],
            "{block}: expected the agent and {name} only, rendered {:?}",
            daemonset_names(&docs)
        );
        let ds = daemonset(&docs, &name)?;
        let pod = &ds["spec"]["template"]["spec"];
        let container = &pod["containers"][0];

        let mut expected_paths = vec![handlers_dir.clone()];
        expected_paths.extend(paths);
        expected_paths.sort();
        let got = host_access(ds);
        ensure!(
            got == HostAccess {
                host_network,
                host_paths: expected_paths.clone()
            },
            "{block}: handler host access {got:?}, expected host network {host_network}, {expected_paths:?}"
        );
        if host_network {
            ensure!(
                pod["dnsPolicy"] == "ClusterFirstWithHostNet",
                "{block}: {pod}"
            );
        }
        ensure!(
            container["image"] == format!("{image}:0.1.0").as_str(),
            "{block}: image {} (the tag defaults to the appVersion)",
            container["image"]
        );
        let health = format!("--health-address=0.0.0.0:{port}");
        let mut expected_args: Vec<&str> = binary_args.clone();
        expected_args.push(&health);
        expected_args.push("--extra");
        ensure!(
            args(ds) == expected_args,
            "{block}: handler args {:?}, expected {expected_args:?}",
            args(ds)
        );
        ensure!(
            container["ports"][0]["name"] == "health"
                && container["ports"][0]["containerPort"] == port,
            "{block}: ports {}",
            container["ports"]
        );
        for (which, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            ensure!(
                probe(ds, which) == Some((path.to_string(), "health".to_string())),
                "{block}: {which} {}",
                container[which]
            );
        }
        // registers over the agent's 0660 socket: its group, and the handlers directory
        ensure!(
            pod["securityContext"]["supplementalGroups"] == serde_json::json!([2000]),
            "{block}: {}",
            pod["securityContext"]
        );
        ensure!(
            container["env"].as_array().is_some_and(|env| env
                .iter()
                .any(|e| e["name"] == "DISCOVERY_HANDLERS_DIRECTORY"
                    && e["value"] == "/var/lib/akri")),
            "{block}: env {}",
            container["env"]
        );
        ensure!(
            pod["automountServiceAccountToken"] == false
                && container["securityContext"]["readOnlyRootFilesystem"] == true
                && container["securityContext"]["allowPrivilegeEscalation"] == false
                && container["securityContext"]["capabilities"]["drop"]
                    == serde_json::json!(["ALL"]),
            "{block}: not hardened: {pod}"
        );

        let agent = daemonset(&docs, "t-verge-agent")?;
        let disable: Vec<String> = args(agent)
            .into_iter()
            .filter(|a| a.starts_with("--disable-embedded-handler"))
            .collect();
        let expected_disable: Vec<String> = disabled
            .iter()
            .map(|h| format!("--disable-embedded-handler={h}"))
            .collect();
        ensure!(
            disable == expected_disable,
            "{block}: agent {disable:?}, expected {expected_disable:?}"
        );
        let got = host_access(agent);
        ensure!(
            got == HostAccess {
                host_network: false,
                host_paths: agent_base_paths()
            },
            "{block}: the agent kept host access it no longer needs: {got:?}"
        );
    }
    Ok(())
}

/// The agent loses only the access of the protocol that moved out: an embedded protocol that
/// needs the same access keeps it.
#[tokio::test]
async fn agent_keeps_the_host_access_of_protocols_still_embedded() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    let run_udev = ("/run/udev".to_string(), true);
    for (sets, host_network, extra_paths, disabled) in [
        // usb moves out, udev stays embedded: the agent still needs uevents
        (
            vec![
                "usb.discovery.enabled=true",
                "usb.discovery.image.repository=u",
                "udev.discovery.enabled=true",
            ],
            true,
            vec![run_udev.clone()],
            vec!["--disable-embedded-handler=usb"],
        ),
        // onvif moves out, mdns stays embedded: still multicast, no /run/udev
        (
            vec![
                "onvif.discovery.enabled=true",
                "onvif.discovery.image.repository=o",
                "mdns.discovery.enabled=true",
            ],
            true,
            vec![],
            vec!["--disable-embedded-handler=onvif"],
        ),
        // everything out: the agent has no host access beyond its own paths
        (
            vec![
                "onvif.discovery.enabled=true",
                "onvif.discovery.image.repository=o",
                "mdns.discovery.enabled=true",
                "mdns.discovery.image.repository=m",
                "ble.discovery.enabled=true",
                "ble.discovery.image.repository=b",
            ],
            false,
            vec![],
            vec![
                "--disable-embedded-handler=ble",
                "--disable-embedded-handler=mdns",
                "--disable-embedded-handler=onvif",
            ],
        ),
        // an image without discovery.enabled runs nothing and disables nothing
        (
            vec!["onvif.discovery.image.repository=o"],
            false,
            vec![],
            vec![],
        ),
    ] {
        let sets: Vec<String> = sets.into_iter().map(str::to_string).collect();
        let docs = render(&sets).await?;
        let agent = daemonset(&docs, "t-verge-agent")?;
        let mut host_paths = agent_base_paths();
        host_paths.extend(extra_paths);
        host_paths.sort();
        let got = host_access(agent);
        ensure!(
            got == HostAccess {
                host_network,
                host_paths: host_paths.clone()
            },
            "{sets:?}: agent {got:?}, expected host network {host_network}, {host_paths:?}"
        );
        let disable: Vec<String> = args(agent)
            .into_iter()
            .filter(|a| a.starts_with("--disable-embedded-handler"))
            .collect();
        ensure!(disable == disabled, "{sets:?}: agent {disable:?}");
    }
    Ok(())
}

/// Every block's `discovery` refuses misspelt and mistyped keys, clashing health ports are
/// refused at render time, and the chart lints clean with every handler external.
#[tokio::test]
async fn handler_blocks_refuse_misspelt_values_and_port_clashes() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    let mut cases: Vec<(Vec<String>, String)> = Vec::new();
    for block in PROTOCOL_BLOCKS.iter().chain(&["custom"]) {
        cases.push((
            vec![format!("{block}.discovery.imag.repository=x")],
            "additional properties 'imag' not allowed".into(),
        ));
        cases.push((
            vec![format!("{block}.discovery.image.repositry=x")],
            "additional properties 'repositry' not allowed".into(),
        ));
        cases.push((
            vec![format!("{block}.discovery.healthPrt=8091")],
            "additional properties 'healthPrt' not allowed".into(),
        ));
        cases.push((
            vec![format!("{block}.discovery.healthPort=abc")],
            format!("at '/{block}/discovery/healthPort': got string"),
        ));
        cases.push((
            vec![format!("{block}.discovery.image.pullPolicy=Sometimes")],
            "value must be one of 'Always', 'IfNotPresent', 'Never'".into(),
        ));
    }
    for (block, other) in [("onvif", "mdns"), ("usb", "udev"), ("modbus", "ble")] {
        cases.push((
            vec![
                format!("{block}.discovery.enabled=true"),
                format!("{block}.discovery.image.repository=x"),
                format!("{block}.discovery.healthPort=8090"),
            ],
            format!("{block}.discovery.healthPort 8090 is also agent.metricsPort"),
        ));
        cases.push((
            vec![
                format!("{block}.discovery.enabled=true"),
                format!("{block}.discovery.image.repository=x"),
                format!("{other}.discovery.enabled=true"),
                format!("{other}.discovery.image.repository=y"),
                format!("{block}.discovery.healthPort=9000"),
                format!("{other}.discovery.healthPort=9000"),
            ],
            "healthPort 9000 is also".into(),
        ));
    }
    for (sets, expected) in cases {
        let mut args = vec!["template".to_string(), "t".into(), chart()];
        for s in &sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&helm_path(), &args, None).await?;
        ensure!(!out.status.success(), "{sets:?} was accepted");
        ensure!(
            out.stderr.contains(&expected),
            "{sets:?}: expected {expected:?} in: {}",
            out.stderr
        );
    }

    let mut lint = vec!["lint".to_string(), "--strict".into(), chart()];
    for block in PROTOCOL_BLOCKS {
        for set in [
            format!("{block}.discovery.enabled=true"),
            format!("{block}.discovery.image.repository=example.com/verge-{block}-discovery"),
            format!("{block}.configuration.enabled=true"),
        ] {
            lint.push("--set".into());
            lint.push(set);
        }
    }
    let lint: Vec<&str> = lint.iter().map(String::as_str).collect();
    let out = run(&helm_path(), &lint, None).await?;
    ensure!(
        out.status.success()
            && !out.stdout.contains("[WARNING]")
            && !out.stdout.contains("[ERROR]"),
        "helm lint with every handler external: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// The custom handler gets probes only with `custom.discovery.healthPort` (Akri's handlers,
/// which this block runs unchanged, serve no health endpoint), through an environment variable
/// an image that does not know it ignores.
#[tokio::test]
async fn custom_handler_probes_follow_its_health_port() -> Result<()> {
    if !have_helm() {
        return Ok(());
    }
    let base: Vec<String> = [
        "custom.discovery.enabled=true",
        "custom.discovery.name=h",
        "custom.discovery.image.repository=example.com/h",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    let docs = render(&base).await?;
    let ds = daemonset(&docs, "t-verge-custom-discovery")?;
    ensure!(
        probe(ds, "livenessProbe").is_none() && probe(ds, "readinessProbe").is_none(),
        "probes without a health port: {ds}"
    );
    let mut sets = base.clone();
    sets.push("custom.discovery.healthPort=8097".into());
    let docs = render(&sets).await?;
    let ds = daemonset(&docs, "t-verge-custom-discovery")?;
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    ensure!(
        container["env"]
            .as_array()
            .is_some_and(|env| env
                .iter()
                .any(|e| e["name"] == "DISCOVERY_HANDLER_HEALTH_ADDRESS"
                    && e["value"] == "0.0.0.0:8097")),
        "env {}",
        container["env"]
    );
    ensure!(
        container["ports"][0]["containerPort"] == 8097,
        "{}",
        container["ports"]
    );
    for (which, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        ensure!(
            probe(ds, which) == Some((path.to_string(), "health".to_string())),
            "{which} {}",
            container[which]
        );
    }
    ensure!(
        host_access(ds)
            == HostAccess {
                host_network: false,
                host_paths: vec![("/var/lib/akri".to_string(), false)]
            },
        "custom handler host access {:?}",
        host_access(ds)
    );
    Ok(())
}

/// Values enabling every block the chart has (monitoring aside: it needs the Prometheus
/// Operator's CRDs, which the test cluster does not have; it is rendered separately).
fn every_block(ns: &str) -> Vec<String> {
    [
        "debugEcho.configuration.enabled=true",
        "debugEcho.configuration.name=chart-all-echo",
        "debugEcho.configuration.brokerPod.image.repository=localhost/verge/test-broker",
        "debugEcho.configuration.brokerPod.image.tag=dev",
        "debugEcho.configuration.instanceService.enabled=true",
        "debugEcho.configuration.configurationService.enabled=true",
        "debugEcho.configuration.brokerProperties.A=b",
        "custom.discovery.enabled=true",
        "custom.discovery.name=myhandler",
        "custom.discovery.image.repository=example.com/handler",
        "custom.configuration.enabled=true",
        "custom.configuration.name=chart-all-custom",
        "custom.configuration.discoveryDetails.x=1",
        "custom.configuration.discoveryProperties[0].name=password",
        "custom.configuration.discoveryProperties[0].valueFrom.secretKeyRef.name=s",
        "custom.configuration.discoveryProperties[0].valueFrom.secretKeyRef.key=k",
        "custom.configuration.brokerJob.image.repository=localhost/verge/test-broker",
        "custom.configuration.instanceService.enabled=true",
        "agent.tolerations[0].operator=Exists",
        "agent.priorityClassName=system-node-critical",
    ]
    .into_iter()
    .map(str::to_string)
    .chain(PROTOCOL_BLOCKS.iter().flat_map(|block| {
        [
            format!("{block}.discovery.enabled=true"),
            format!("{block}.configuration.enabled=true"),
            format!("{block}.configuration.name=chart-all-{block}"),
        ]
    }))
    .chain([
        format!("agent.watchNamespace={ns}"),
        format!("controller.watchNamespace={ns}"),
    ])
    .collect()
}

async fn template(ns: &str, sets: &[String]) -> Result<String> {
    let chart = chart();
    let mut args = vec!["template", RELEASE, &chart, "-n", ns];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    helm(&args).await
}

#[tokio::test]
async fn chart_renders_manifests_the_cluster_accepts() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    if !have_helm() {
        return Ok(());
    }
    let _serial = serial().await;
    let ns = c.namespace("chart-render").await?;
    let every_block_external: Vec<String> = every_block(ns.name())
        .into_iter()
        .chain(PROTOCOL_BLOCKS.iter().map(|block| {
            format!("{block}.discovery.image.repository=example.com/verge-{block}-discovery")
        }))
        .collect();
    for (what, sets) in [
        ("defaults", vec![]),
        ("every block", every_block(ns.name())),
        ("every block, handlers external", every_block_external),
    ] {
        let manifests = template(ns.name(), &sets).await?;
        let out = c
            .kubectl_stdin(
                &["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"],
                &manifests,
            )
            .await
            .with_context(|| format!("server dry-run of the {what} rendering"))?;
        for kind in [
            "daemonset.apps",
            "deployment.apps",
            "validatingadmissionpolicy",
        ] {
            ensure!(out.contains(kind), "{what}: no {kind} in: {out}");
        }
        if what.starts_with("every block") {
            ensure!(
                out.matches("configuration.akri.sh/").count() == 2 + PROTOCOL_BLOCKS.len(),
                "expected a Configuration per block: {out}"
            );
            ensure!(
                out.contains("daemonset.apps/verge-e2e-chart-custom-discovery"),
                "{out}"
            );
        }
        if what == "every block, handlers external" {
            for block in PROTOCOL_BLOCKS {
                ensure!(
                    out.contains(&format!("daemonset.apps/verge-e2e-chart-{block}-discovery")),
                    "{what}: no {block} handler DaemonSet in: {out}"
                );
            }
        }
    }
    let monitors = template(
        ns.name(),
        &[
            "metrics.podMonitor.enabled=true".into(),
            "metrics.serviceMonitor.enabled=true".into(),
        ],
    )
    .await?;
    ensure!(
        monitors.matches("kind: PodMonitor").count() == 2,
        "{monitors}"
    );
    ensure!(
        monitors.matches("kind: ServiceMonitor").count() == 2,
        "{monitors}"
    );
    Ok(())
}

/// Uninstalls the release when dropped (a failed test must not leave cluster-scoped objects).
struct Release {
    ns: String,
    armed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(helm_path())
                .env("KUBECONFIG", kubeconfig_path())
                .args([
                    "uninstall",
                    RELEASE,
                    "-n",
                    &self.ns,
                    "--wait",
                    "--timeout",
                    "60s",
                ])
                .output();
        }
    }
}

fn install_args(ns: &str, config: &str, descriptions: &[&str]) -> Vec<String> {
    let (repo, tag) = BROKER_IMAGE.rsplit_once(':').unwrap();
    let b = "debugEcho.configuration";
    let mut sets = verge_e2e::local_image_sets();
    sets.extend([
        format!("agent.watchNamespace={ns}"),
        format!("controller.watchNamespace={ns}"),
        format!("{b}.enabled=true"),
        format!("{b}.name={config}"),
        format!("{b}.brokerPod.image.repository={repo}"),
        format!("{b}.brokerPod.image.tag={tag}"),
        format!("{b}.brokerPod.image.pullPolicy=Never"),
        format!("{b}.instanceService.enabled=true"),
        format!("{b}.instanceService.targetPort={BROKER_PORT}"),
        format!("{b}.configurationService.enabled=true"),
        format!("{b}.configurationService.targetPort={BROKER_PORT}"),
        format!(
            "{b}.discoveryDetails.descriptions={{{}}}",
            descriptions.join(",")
        ),
    ]);
    sets.push(format!(
        "admissionPolicy.namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name={ns}"
    ));
    let mut args = vec![
        "upgrade".to_string(),
        "--install".into(),
        RELEASE.into(),
        chart(),
        "-n".into(),
        ns.into(),
        "--wait".into(),
        "--timeout".into(),
        "180s".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s);
    }
    args
}

async fn get_json(c: &Cluster, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    Ok(serde_json::from_str(&c.kubectl(&a).await?)?)
}

fn items(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Instances of the Configuration, and broker pods Running, once there are `n` of each kind
/// expected (brokers: one per Instance per node, both nodes see every debugEcho device).
async fn wait_devices(c: &Cluster, ns: &str, config: &str, n: usize) -> Result<()> {
    let nodes = c.node_names().await?.len();
    let sel = format!("akri.sh/configuration={config}");
    wait_until(
        &format!(
            "{n} Instances with {} Running brokers and Services",
            n * nodes
        ),
        Duration::from_secs(120),
        || async {
            let inst = items(&get_json(c, &["instances.akri.sh", "-n", ns]).await?);
            let pods = items(&get_json(c, &["pods", "-n", ns, "-l", &sel]).await?);
            let running = pods
                .iter()
                .filter(|p| {
                    p["status"]["phase"] == "Running"
                        && p["metadata"]["deletionTimestamp"].is_null()
                })
                .count();
            let svcs =
                items(&get_json(c, &["services", "-n", ns, "-l", "controller=akri.sh"]).await?);
            Ok((inst.len() == n
                && running == n * nodes
                && pods.len() == n * nodes
                && svcs.len() == n + 1)
                .then_some(()))
        },
    )
    .await
}

/// RSS of the chart's containers from the kubelet's stats/summary API, per pod.
async fn container_rss(c: &Cluster, ns: &str) -> Result<Vec<(String, String, u64)>> {
    let mut out = Vec::new();
    for node in c.node_names().await? {
        let raw = c
            .kubectl(&[
                "get",
                "--raw",
                &format!("/api/v1/nodes/{node}/proxy/stats/summary"),
            ])
            .await?;
        let summary: serde_json::Value = serde_json::from_str(&raw)?;
        for pod in summary["pods"].as_array().into_iter().flatten() {
            if pod["podRef"]["namespace"] != ns {
                continue;
            }
            for ctr in pod["containers"].as_array().into_iter().flatten() {
                let name = ctr["name"].as_str().unwrap_or_default();
                if name != "agent" && name != "controller" {
                    continue;
                }
                if let Some(rss) = ctr["memory"]["rssBytes"].as_u64() {
                    out.push((
                        pod["podRef"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        name.to_string(),
                        rss,
                    ));
                }
            }
        }
    }
    Ok(out)
}

fn mib(q: &str) -> Result<u64> {
    match q.strip_suffix("Mi") {
        Some(n) => Ok(n.parse::<u64>()? << 20),
        None => bail!("memory request {q} is not in Mi"),
    }
}

#[tokio::test]
async fn chart_install_upgrade_refuse_uninstall() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    if !have_helm() {
        return Ok(());
    }
    let _serial = serial().await;
    let ns = c.namespace("chart").await?;
    let ns_name = ns.name().to_string();
    let suffix: String = ns_name
        .chars()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let config = format!("chart-echo-{suffix}").replace("--", "-");
    // Helm does not upgrade crds/: the same server-side apply `cluster install` does.
    c.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &chart_dir().join("crds").display().to_string(),
    ])
    .await?;

    // install
    let t = Instant::now();
    let mut release = Release {
        ns: ns_name.clone(),
        armed: true,
    };
    let args = install_args(&ns_name, &config, &["foo0", "foo1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    helm(&args).await.context("helm install")?;
    wait_devices(&c, &ns_name, &config, 2).await?;
    report_time("chart: helm install to 2 Instances with Running brokers", t);

    // securityContexts the chart sets, on the running pods
    let agents = items(
        &get_json(
            &c,
            &[
                "pods",
                "-n",
                &ns_name,
                "-l",
                "app.kubernetes.io/component=agent",
            ],
        )
        .await?,
    );
    let controllers = items(
        &get_json(
            &c,
            &[
                "pods",
                "-n",
                &ns_name,
                "-l",
                "app.kubernetes.io/component=controller",
            ],
        )
        .await?,
    );
    ensure!(
        agents.len() == c.node_names().await?.len(),
        "one agent per node: {}",
        agents.len()
    );
    ensure!(
        controllers.len() == 2,
        "two controller replicas: {}",
        controllers.len()
    );
    for p in agents.iter().chain(&controllers) {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        ensure!(p["status"]["phase"] == "Running", "{name} not Running");
        let sc = &p["spec"]["containers"][0]["securityContext"];
        ensure!(
            sc["readOnlyRootFilesystem"] == true,
            "{name}: root FS not read-only: {sc}"
        );
        ensure!(sc["allowPrivilegeEscalation"] == false, "{name}: {sc}");
        ensure!(
            sc["capabilities"]["drop"] == serde_json::json!(["ALL"]),
            "{name}: {sc}"
        );
        ensure!(
            p["spec"]["hostNetwork"].is_null() || p["spec"]["hostNetwork"] == false,
            "{name} on host network"
        );
        let probes = &p["spec"]["containers"][0];
        ensure!(
            probes["livenessProbe"]["httpGet"]["path"] == "/healthz",
            "{name}: liveness"
        );
        ensure!(
            probes["readinessProbe"]["httpGet"]["path"] == "/readyz",
            "{name}: readiness"
        );
    }
    for p in &controllers {
        ensure!(
            p["spec"]["securityContext"]["runAsNonRoot"] == true,
            "controller may run as root"
        );
    }
    for p in &agents {
        let vols: Vec<&str> = p["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        ensure!(
            vols == [
                "/var/lib/kubelet/device-plugins",
                "/var/lib/kubelet/pod-resources",
                "/var/lib/akri"
            ],
            "agent hostPaths: {vols:?}"
        );
    }

    // least-privilege RBAC still lets them do their work: nothing refused in their logs
    for p in agents.iter().chain(&controllers) {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        let log = c.logs(&ns_name, name).await?;
        ensure!(
            !log.contains("forbidden") && !log.contains("Forbidden"),
            "{name} was refused by RBAC:\n{log}"
        );
    }

    // memory within the requests
    let requests: Vec<(String, u64)> = [("agent", &agents), ("controller", &controllers)]
        .iter()
        .map(|(n, pods)| {
            let q = pods[0]["spec"]["containers"][0]["resources"]["requests"]["memory"]
                .as_str()
                .unwrap_or_default();
            Ok((n.to_string(), mib(q)?))
        })
        .collect::<Result<_>>()?;
    let expected = agents.len() + controllers.len();
    let rss = wait_until(
        "kubelet stats for every chart container",
        Duration::from_secs(90),
        || async {
            let r = container_rss(&c, &ns_name).await?;
            Ok((r.len() == expected).then_some(r))
        },
    )
    .await?;
    for (pod, ctr, bytes) in &rss {
        let req = requests
            .iter()
            .find(|(n, _)| n == ctr)
            .map(|r| r.1)
            .unwrap_or(0);
        uncaptured(&format!(
            "[e2e] chart: {pod} ({ctr}) RSS {:.1} MiB, request {} MiB",
            *bytes as f64 / 1048576.0,
            req >> 20
        ));
        ensure!(*bytes <= req, "{pod}: RSS {bytes} above the request {req}");
    }

    // an invalid Configuration is refused with a message a user understands
    let bad = format!(
        r#"{{"apiVersion":"akri.sh/v0","kind":"Configuration","metadata":{{"name":"{config}-bad","namespace":"{ns_name}"}},
        "spec":{{"discoveryHandler":{{"name":"debugEcho","discoveryDetails":"descriptions: [x]"}},
        "brokerSpec":{{"brokerPodSpec":{{"containers":[{{"name":"b","image":"{BROKER_IMAGE}"}}]}}}}}}}}"#
    );
    let out = run(&kubectl_path(), &["apply", "-f", "-"], Some(&bad)).await?;
    ensure!(
        !out.status.success(),
        "a broker without the device was accepted: {}",
        out.stdout
    );
    ensure!(
        out.stderr
            .contains("a broker must use the device it is started for")
            && out.stderr.contains("{{PLACEHOLDER}}"),
        "unclear refusal: {}",
        out.stderr
    );
    // An empty handler name is refused by the CRD schema; a blank one by the admission policy.
    for (name, expected) in [
        (
            "",
            "spec.discoveryHandler.name in body should be at least 1 chars long",
        ),
        (
            " ",
            "spec.discoveryHandler.name must name a discovery handler",
        ),
    ] {
        let cfg = format!(
            r#"{{"apiVersion":"akri.sh/v0","kind":"Configuration","metadata":{{"name":"{config}-bad","namespace":"{ns_name}"}},
            "spec":{{"discoveryHandler":{{"name":"{name}","discoveryDetails":""}}}}}}"#
        );
        let out = run(&kubectl_path(), &["apply", "-f", "-"], Some(&cfg)).await?;
        ensure!(!out.status.success(), "handler name {name:?} was accepted");
        ensure!(
            out.stderr.contains(expected),
            "unclear refusal: {}",
            out.stderr
        );
    }
    let none = items(&get_json(&c, &["configurations.akri.sh", "-n", &ns_name]).await?);
    ensure!(none.len() == 1, "refused Configurations exist: {none:?}");

    // upgrade: a new discoveryDetails takes effect on the same Configuration
    let uid = |v: serde_json::Value| {
        v["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = uid(get_json(&c, &["configurations.akri.sh", &config, "-n", &ns_name]).await?);
    ensure!(!before.is_empty(), "no Configuration uid");
    let t = Instant::now();
    let args = install_args(&ns_name, &config, &["foo0", "foo1", "foo2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    helm(&args).await.context("helm upgrade")?;
    wait_devices(&c, &ns_name, &config, 3).await?;
    report_time(
        "chart: helm upgrade (3 descriptions) to 3 Instances with Running brokers",
        t,
    );
    let after = uid(get_json(&c, &["configurations.akri.sh", &config, "-n", &ns_name]).await?);
    ensure!(
        before == after,
        "the upgrade recreated the Configuration ({before} -> {after})"
    );

    // uninstall: within 60 s, nothing left
    let t = Instant::now();
    helm(&[
        "uninstall",
        RELEASE,
        "-n",
        &ns_name,
        "--wait",
        "--timeout",
        "60s",
    ])
    .await
    .context("helm uninstall")?;
    release.armed = false;
    let left = Duration::from_secs(60).saturating_sub(t.elapsed());
    wait_until(
        "no akri.sh objects, brokers or chart pods left",
        left,
        || async {
            let akri = items(
                &get_json(
                    &c,
                    &["configurations.akri.sh,instances.akri.sh", "-n", &ns_name],
                )
                .await?,
            );
            let pods = items(&get_json(&c, &["pods", "-n", &ns_name]).await?);
            Ok((akri.is_empty() && pods.is_empty()).then_some(()))
        },
    )
    .await?;
    report_time("chart: helm uninstall until nothing is left", t);
    let rest = items(
        &get_json(
            &c,
            &[
                "all,leases,serviceaccounts,roles,rolebindings",
                "-n",
                &ns_name,
            ],
        )
        .await?,
    );
    let leftovers: Vec<String> = rest
        .iter()
        .filter(|o| {
            o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
                || o["metadata"]["labels"]["controller"] == "akri.sh"
                || o["kind"] == "Lease"
                || o["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
        })
        .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
        .collect();
    ensure!(leftovers.is_empty(), "left after uninstall: {leftovers:?}");
    let cluster_scoped = items(
        &get_json(
            &c,
            &[
                "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
                "-l",
                &format!("app.kubernetes.io/instance={RELEASE}"),
            ],
        )
        .await?,
    );
    ensure!(
        cluster_scoped.is_empty(),
        "cluster-scoped objects left: {:?}",
        cluster_scoped
            .iter()
            .map(|o| o["metadata"]["name"].clone())
            .collect::<Vec<_>>()
    );
    ns.delete(Duration::from_secs(60)).await?;
    Ok(())
}
