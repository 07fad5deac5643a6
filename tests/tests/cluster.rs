//! Cluster tests that share the cluster peacefully: each works in its own namespace, and they run in
//! parallel. They prove the test cluster itself (issue 3): node readiness, pods from locally built
//! images, logs/exec, Services (CNI + kube-proxy), DNS, the project's CRDs, helm, two nodes, and
//! that no multicast leaves by the default-route interface.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use verge_e2e::{BROKER_PORT, Cluster, broker_pod, helm_path, report_time, run_ok, wait_until};

const POD_TIMEOUT: Duration = Duration::from_secs(90);

/// A Service named `name` selecting pods labelled `app=<app>`, port 80 -> the broker's port.
fn broker_service(name: &str, app: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": BROKER_PORT, "protocol": "TCP"}],
        },
    })
}

async fn create_service(c: &Cluster, ns: &str, svc: serde_json::Value) -> Result<Service> {
    let svc: Service = serde_json::from_value(svc)?;
    Ok(Api::<Service>::namespaced(c.client(), ns)
        .create(&PostParams::default(), &svc)
        .await?)
}

fn cluster_ip(svc: &Service) -> Result<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
        .context("service has no ClusterIP")
}

/// `verge-test-broker get URL` run in `pod`, retried until it answers (Service endpoints and
/// kube-proxy rules follow pod readiness by a moment).
async fn get_from_pod(c: &Cluster, ns: &str, pod: &str, url: &str) -> Result<String> {
    wait_until(
        &format!("GET {url} from {pod}"),
        Duration::from_secs(30),
        || async {
            Ok(Some(
                c.exec(ns, pod, &["verge-test-broker", "get", url]).await?,
            ))
        },
    )
    .await
}

#[tokio::test]
async fn nodes_are_ready() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let start = Instant::now();
    let nodes = c.node_names().await?;
    ensure!(!nodes.is_empty(), "the cluster has no node");
    ensure!(
        nodes.iter().any(|n| n == "verge-node-1"),
        "node verge-node-1 missing: {nodes:?}"
    );
    for n in &nodes {
        ensure!(c.node_ready(n).await?, "node {n} is not Ready");
    }
    report_time(&format!("{} node(s) Ready: {nodes:?}", nodes.len()), start);
    Ok(())
}

#[tokio::test]
async fn broker_pod_runs_with_logs_exec_and_service() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let ns = c.namespace("broker").await?;
    let ns = ns.name().to_string();
    let start = Instant::now();

    c.create_pod(
        &ns,
        broker_pod("server", serde_json::json!({"app": "server"}), None),
    )
    .await?;
    c.create_pod(
        &ns,
        broker_pod("client", serde_json::json!({"app": "client"}), None),
    )
    .await?;
    let svc = create_service(&c, &ns, broker_service("echo", "server")).await?;
    c.wait_pod_ready(&ns, "server", POD_TIMEOUT).await?;
    report_time(
        "pod from localhost/verge/test-broker:dev Running+Ready",
        start,
    );

    // kubectl logs (through the API server and the kubelet): the broker printed its environment.
    let t = Instant::now();
    let logs = c.kubectl(&["logs", "-n", &ns, "server"]).await?;
    ensure!(
        logs.contains("VERGE_TEST_MARKER=server"),
        "kubectl logs lacks the broker's environment: {logs}"
    );
    ensure!(
        c.logs(&ns, "server").await?.contains("BROKER_PORT=8080"),
        "API logs lack the broker's environment"
    );
    // kubectl exec: run the broker binary again inside the container.
    let env = c.exec(&ns, "server", &["verge-test-broker", "env"]).await?;
    ensure!(
        env.contains("VERGE_TEST_MARKER=server"),
        "kubectl exec output unexpected: {env}"
    );
    report_time("kubectl logs + exec", t);

    // ClusterIP Service, from a second pod (CNI + kube-proxy).
    let t = Instant::now();
    c.wait_pod_ready(&ns, "client", POD_TIMEOUT).await?;
    let ip = cluster_ip(&svc)?;
    let body = get_from_pod(&c, &ns, "client", &format!("http://{ip}:80/env")).await?;
    ensure!(
        body.contains("VERGE_TEST_MARKER=server"),
        "the Service answered, but not from the server pod: {body}"
    );
    report_time(&format!("ClusterIP {ip} answered from a second pod"), t);

    // DNS: the Service's name resolves in a pod, and the short name works through the search path.
    let t = Instant::now();
    let fqdn = format!("echo.{ns}.svc.cluster.local");
    let resolved = wait_until(
        &format!("{fqdn} resolving"),
        Duration::from_secs(30),
        || async {
            Ok(Some(
                c.exec(&ns, "client", &["verge-test-broker", "resolve", &fqdn])
                    .await?,
            ))
        },
    )
    .await?;
    ensure!(
        resolved.lines().any(|l| l.trim() == ip),
        "{fqdn} resolved to {resolved:?}, expected {ip}"
    );
    let body = get_from_pod(&c, &ns, "client", "http://echo/healthz").await?;
    ensure!(body.trim() == "ok", "GET http://echo/healthz: {body:?}");
    report_time(&format!("DNS {fqdn} -> {ip}, short name works"), t);

    // The broker exits promptly on SIGTERM as PID 1: deleting the pod takes far less than its
    // 5 s grace period.
    let t = Instant::now();
    c.kubectl(&["delete", "pod", "-n", &ns, "server", "--wait=true"])
        .await?;
    let took = t.elapsed();
    ensure!(
        took < Duration::from_secs(5),
        "deleting the broker pod took {took:?}: SIGTERM not handled promptly?"
    );
    report_time("broker pod deleted (SIGTERM as PID 1)", t);
    report_time("broker pod test total", start);
    Ok(())
}

/// The Akri-format sample Configuration of issue 3.
fn sample_configuration(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "akri.sh/v0",
        "kind": "Configuration",
        "metadata": {"name": name},
        "spec": {
            "discoveryHandler": {
                "name": "debugEcho",
                "discoveryDetails": "descriptions:\n- foo\n- bar\n",
            },
            "capacity": 2,
            "brokerSpec": {
                "brokerPodSpec": {
                    "containers": [{
                        "name": "broker",
                        "image": verge_e2e::BROKER_IMAGE,
                        "imagePullPolicy": "Never",
                        "resources": {
                            "requests": {"{{PLACEHOLDER}}": "1"},
                            "limits": {"{{PLACEHOLDER}}": "1"},
                        },
                    }],
                },
            },
            "instanceServiceSpec": {
                "type": "ClusterIP",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            },
            "configurationServiceSpec": {
                "type": "ClusterIP",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            },
        },
    })
}

#[tokio::test]
async fn crds_apply_and_configuration_round_trips() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let crd_dir = verge_e2e::repo_root().join("crds");
    let mut files: Vec<_> = std::fs::read_dir(&crd_dir)
        .with_context(|| format!("reading {}", crd_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "no CRD manifests (crds/*.yaml) in {}",
        crd_dir.display()
    );
    let dir = crd_dir.to_string_lossy().to_string();

    let t = Instant::now();
    let out = c.kubectl(&["apply", "-f", &dir]).await?;
    report_time(
        &format!("client-side apply of {} CRD file(s)", files.len()),
        t,
    );
    println!("{}", out.trim());
    let t = Instant::now();
    let out = c.kubectl(&["apply", "--server-side", "-f", &dir]).await?;
    report_time("server-side apply of the CRDs", t);
    println!("{}", out.trim());
    for f in &files {
        let out = c
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "-f",
                &f.to_string_lossy(),
            ])
            .await?;
        println!("{}", out.trim());
    }

    // The Configuration round-trip needs the akri.sh Configuration CRD.
    let has_configuration = c
        .kubectl(&["get", "crd", "configurations.akri.sh", "-o", "name"])
        .await
        .is_ok();
    if !has_configuration {
        bail!("crds/ does not define configurations.akri.sh");
    }
    let ns = c.namespace("crd").await?;
    let t = Instant::now();
    let sent = sample_configuration("akri-debug-echo-foo");
    let ar = ApiResource {
        group: "akri.sh".into(),
        version: "v0".into(),
        api_version: "akri.sh/v0".into(),
        kind: "Configuration".into(),
        plural: "configurations".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(c.client(), ns.name(), &ar);
    let obj: DynamicObject = serde_json::from_value(sent.clone())?;
    // The API server may need a moment after Established before it serves the new kind.
    let created = wait_until(
        "creating the sample Configuration",
        Duration::from_secs(30),
        || async { Ok(Some(api.create(&PostParams::default(), &obj).await?)) },
    )
    .await?;
    let fetched = api.get("akri-debug-echo-foo").await?;
    for (what, got) in [("create response", &created), ("get", &fetched)] {
        let got_spec = got.data.get("spec").cloned().unwrap_or_default();
        ensure!(
            got_spec == sent["spec"],
            "the Configuration's spec changed in the API server ({what}):\n sent: {}\n  got: {}",
            sent["spec"],
            got_spec
        );
    }
    // And through kubectl (YAML path), unchanged too.
    let via_kubectl = c
        .kubectl(&[
            "get",
            "configurations.akri.sh",
            "-n",
            ns.name(),
            "akri-debug-echo-foo",
            "-o",
            "json",
        ])
        .await?;
    let via_kubectl: serde_json::Value = serde_json::from_str(&via_kubectl)?;
    ensure!(
        via_kubectl["spec"] == sent["spec"],
        "kubectl shows a different spec: {}",
        via_kubectl["spec"]
    );
    report_time("Akri sample Configuration round-trip", t);
    Ok(())
}

#[tokio::test]
async fn helm_runs() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let t = Instant::now();
    let out = run_ok(&helm_path(), &["version", "--short"], None).await?;
    ensure!(
        out.trim_start().starts_with("v3."),
        "unexpected helm version output: {out}"
    );
    // helm talks to the cluster too (lists releases through the API server).
    let ns = c.namespace("helm").await?;
    run_ok(&helm_path(), &["list", "-n", ns.name()], None).await?;
    report_time(&format!("helm {} version + list", out.trim()), t);
    Ok(())
}

#[tokio::test]
async fn two_nodes_run_a_pod_each() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let nodes = c.node_names().await?;
    if nodes.len() < 2 {
        verge_e2e::uncaptured(&format!(
            "two_nodes_run_a_pod_each: single-node cluster ({nodes:?}); skipped \
             (start with `tests/cluster/cluster up --nodes 2`)"
        ));
        return Ok(());
    }
    let start = Instant::now();
    for n in &nodes {
        ensure!(c.node_ready(n).await?, "node {n} is not Ready");
    }
    let ns = c.namespace("two-nodes").await?;
    let ns = ns.name().to_string();
    for (i, node) in nodes.iter().enumerate() {
        c.create_pod(
            &ns,
            broker_pod(
                &format!("pod-{i}"),
                serde_json::json!({"app": format!("pod-{i}")}),
                Some(node),
            ),
        )
        .await?;
    }
    for (i, node) in nodes.iter().enumerate() {
        let pod = c
            .wait_pod_ready(&ns, &format!("pod-{i}"), POD_TIMEOUT)
            .await?;
        let on = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        ensure!(&on == node, "pod-{i} runs on {on}, expected {node}");
    }
    report_time(&format!("a pod Ready on each of {nodes:?}"), start);

    // Cross-node: the pod on the last node reaches the pod on the first through a Service, by name.
    let t = Instant::now();
    create_service(&c, &ns, broker_service("first", "pod-0")).await?;
    let last = format!("pod-{}", nodes.len() - 1);
    let body = get_from_pod(&c, &ns, &last, "http://first/env/VERGE_TEST_MARKER").await?;
    ensure!(
        body.trim() == "pod-0",
        "cross-node Service answered {body:?}"
    );
    // logs and exec work on the second node's kubelet too.
    let env = c.exec(&ns, &last, &["verge-test-broker", "env"]).await?;
    ensure!(env.contains(&format!("VERGE_TEST_MARKER={last}")));
    ensure!(
        c.logs(&ns, &last)
            .await?
            .contains(&format!("VERGE_TEST_MARKER={last}"))
    );
    report_time(
        "cross-node Service by name + exec/logs on the other node",
        t,
    );
    Ok(())
}

#[tokio::test]
async fn multicast_guard_is_installed_and_clean() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    c.assert_no_multicast_leak().await
}

/// Removes a device-LAN namespace made by `cluster lan-host` when dropped (also on failure).
struct LanHost(String);

impl Drop for LanHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new(verge_e2e::cluster_script())
            .args(["lan-host-del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn device_lan_namespace_gets_host_multicast_not_eth0() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let t = Instant::now();
    let name = format!("vg-e2e-lan-{}", std::process::id() % 100_000);
    verge_e2e::cluster_cmd(&["lan-host", &name, "10.204.0.200/24", "fd00:204::200/64"]).await?;
    let _lan = LanHost(name.clone());
    // A receiver in the namespace joins a group on its LAN interface and prints the first datagram.
    let receiver = "import socket, struct\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('', 5999))\n\
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,\n\
            struct.pack('4s4s', socket.inet_aton('239.255.77.1'), socket.inet_aton('10.204.0.200')))\n\
        s.settimeout(20)\n\
        data, addr = s.recvfrom(100)\n\
        print(data.decode(), addr[0], flush=True)\n";
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &name, "/usr/bin/python3", "-c", receiver])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // The host sends without choosing an interface: the harness routes 224.0.0.0/4 to the LAN.
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        sock.send_to(b"verge-e2e-mcast", "239.255.77.1:5999")
            .await?;
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "no datagram reached {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        status.success() && stdout.trim() == "verge-e2e-mcast 10.204.0.1",
        "receiver in {name}: {status} {stdout:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same over IPv6 (site-local scope group, no interface chosen by the sender).
    let receiver6 = "import socket, struct\n\
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('', 5998))\n\
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,\n\
            socket.inet_pton(socket.AF_INET6, 'ff05::204:77') + struct.pack('@I', socket.if_nametoindex('lan0')))\n\
        s.settimeout(20)\n\
        data, addr = s.recvfrom(100)\n\
        print(data.decode(), addr[0], flush=True)\n";
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &name, "/usr/bin/python3", "-c", receiver6])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let sock6 = tokio::net::UdpSocket::bind("[::]:0").await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        sock6
            .send_to(b"verge-e2e-mcast6", "[ff05::204:77]:5998")
            .await?;
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "no IPv6 datagram reached {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        status.success() && stdout.trim() == "verge-e2e-mcast6 fd00:204::1",
        "IPv6 receiver in {name}: {status} {stdout:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_no_multicast_leak().await?;
    report_time(
        "host multicast (IPv4 + IPv6) reached a device-LAN namespace, none left by eth0",
        t,
    );
    Ok(())
}

/// Removes a file on every node (through `cluster node-exec`) when dropped.
struct NodeFiles(Vec<String>, String);

impl Drop for NodeFiles {
    fn drop(&mut self) {
        for node in &self.0 {
            let _ = std::process::Command::new(verge_e2e::cluster_script())
                .args(["node-exec", node, "rm", "-f", &self.1])
                .status();
        }
    }
}

#[tokio::test]
async fn nodes_have_their_own_host_paths() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let nodes = c.node_names().await?;
    if nodes.len() < 2 {
        verge_e2e::uncaptured(&format!(
            "nodes_have_their_own_host_paths: single-node cluster ({nodes:?}); skipped"
        ));
        return Ok(());
    }
    let t = Instant::now();
    let ns = c.namespace("hostpath").await?;
    let marker = format!("/var/lib/akri/{}", ns.name());
    let _cleanup = NodeFiles(nodes.clone(), marker.clone());
    for node in &nodes {
        verge_e2e::cluster_cmd(&[
            "node-exec",
            node,
            "sh",
            "-c",
            &format!("echo {node} > {marker}"),
        ])
        .await?;
    }
    // Each kubelet has its own device-plugin directory (a different kubelet.sock).
    let mut sockets = std::collections::BTreeSet::new();
    for node in &nodes {
        let id = verge_e2e::cluster_cmd(&[
            "node-exec",
            node,
            "stat",
            "-c",
            "%d:%i",
            "/var/lib/kubelet/device-plugins/kubelet.sock",
        ])
        .await?;
        sockets.insert(id.trim().to_string());
    }
    ensure!(
        sockets.len() == nodes.len(),
        "nodes share /var/lib/kubelet/device-plugins/kubelet.sock: {sockets:?}"
    );
    // A hostPath pod on each node sees that node's /var/lib/akri.
    for (i, node) in nodes.iter().enumerate() {
        let mut pod = broker_pod(
            &format!("reader-{i}"),
            serde_json::json!({"app": "reader"}),
            Some(node),
        );
        pod["spec"]["volumes"] = serde_json::json!([
            {"name": "akri", "hostPath": {"path": "/var/lib/akri", "type": "Directory"}}
        ]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            serde_json::json!([{"name": "akri", "mountPath": "/host/akri", "readOnly": true}]);
        c.create_pod(ns.name(), pod).await?;
    }
    for (i, node) in nodes.iter().enumerate() {
        let pod = format!("reader-{i}");
        c.wait_pod_ready(ns.name(), &pod, POD_TIMEOUT).await?;
        let file = format!("/host/akri/{}", ns.name());
        let seen = c
            .exec(ns.name(), &pod, &["verge-test-broker", "cat", &file])
            .await?;
        ensure!(
            seen.trim() == node,
            "{pod} on {node} read {seen:?} from hostPath /var/lib/akri"
        );
    }
    report_time("per-node /var/lib/kubelet and /var/lib/akri", t);
    Ok(())
}

#[tokio::test]
async fn host_network_pods_reach_services_and_dns() -> Result<()> {
    let Some(c) = Cluster::connect().await else {
        return Ok(());
    };
    let t = Instant::now();
    let nodes = c.node_names().await?;
    let ns = c.namespace("hostnet").await?;
    let ns = ns.name().to_string();
    c.create_pod(
        &ns,
        broker_pod("target", serde_json::json!({"app": "target"}), None),
    )
    .await?;
    create_service(&c, &ns, broker_service("target", "target")).await?;
    // One host-network pod per node (as the agent runs), on a port nothing else uses.
    for (i, node) in nodes.iter().enumerate() {
        let mut pod = broker_pod(
            &format!("hostnet-{i}"),
            serde_json::json!({"app": "hostnet"}),
            Some(node),
        );
        pod["spec"]["hostNetwork"] = serde_json::json!(true);
        pod["spec"]["dnsPolicy"] = serde_json::json!("ClusterFirstWithHostNet");
        let port = 28080 + i as u16;
        pod["spec"]["containers"][0]["env"][0]["value"] = serde_json::json!(port.to_string());
        pod["spec"]["containers"][0]["ports"] = serde_json::json!([{"containerPort": port}]);
        pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = serde_json::json!(port);
        c.create_pod(&ns, pod).await?;
    }
    c.wait_pod_ready(&ns, "target", POD_TIMEOUT).await?;
    for (i, node) in nodes.iter().enumerate() {
        let pod = format!("hostnet-{i}");
        c.wait_pod_ready(&ns, &pod, POD_TIMEOUT).await?;
        // The API server through the `kubernetes` Service (DNAT in OUTPUT, routed to verge-br0).
        let out = c
            .exec(&ns, &pod, &["verge-test-broker", "tcp", "10.203.0.1:443"])
            .await?;
        ensure!(out.starts_with("connected"), "{pod} on {node}: {out}");
        let out = c
            .exec(
                &ns,
                &pod,
                &[
                    "verge-test-broker",
                    "resolve",
                    "kubernetes.default.svc.cluster.local",
                ],
            )
            .await?;
        ensure!(
            out.trim() == "10.203.0.1",
            "{pod} on {node} resolved {out:?}"
        );
        let body = get_from_pod(
            &c,
            &ns,
            &pod,
            &format!("http://target.{ns}.svc.cluster.local/env/VERGE_TEST_MARKER"),
        )
        .await?;
        ensure!(body.trim() == "target", "{pod} on {node} got {body:?}");
    }
    report_time(
        &format!("host-network pods on {nodes:?} reach the API Service, DNS and a ClusterIP"),
        t,
    );
    Ok(())
}
