//! ONVIF on the test cluster (issue 7): ipycam virtual cameras on the device LAN
//! (`cluster lan-host vg-onvif-camN 10.204.0.7N fd00:204::7N`), host-process agents with the
//! embedded `onvif` handler on both nodes, and the controller. A Configuration gives one
//! Instance per camera, listing both nodes (shared); its broker's env holds ONVIF_STREAM_URI and
//! the broker runs ffprobe on it (never skipped) before starting the test broker. Multicast is
//! limited to the device LAN (`verge-lan` on the host, `lan0` in node 2's namespace); the
//! cameras are also listed as unicast targets.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::protocol::{LanHost, ProtocolConfiguration, ProtocolTest, broker_logs};
use verge_e2e::{repo_root, report_time, wait_until};

const DEADLINE: Duration = Duration::from_secs(120);
const CAMERAS: [(&str, &str, &str, &str); 2] = [
    (
        "vg-onvif-cam1",
        "10.204.0.70",
        "fd00:204::70",
        "0a1b2c3d-0000-4000-8000-0000000e2e01",
    ),
    (
        "vg-onvif-cam2",
        "10.204.0.71",
        "fd00:204::71",
        "0a1b2c3d-0000-4000-8000-0000000e2e02",
    ),
];

/// A device-LAN namespace with an ipycam camera; both removed on drop (the camera first: fields
/// drop in order).
struct LanCamera {
    child: Option<Child>,
    _lan: LanHost,
}

impl LanCamera {
    async fn start(python: &Path, ns: &str, ip4: &str, ip6: &str, uuid: &str) -> Result<Self> {
        Self::start_with(python, ns, ip4, ip6, uuid, &[]).await
    }

    /// Like [`LanCamera::start`], with more ipycam runner arguments (e.g. credentials).
    async fn start_with(
        python: &Path,
        ns: &str,
        ip4: &str,
        ip6: &str,
        uuid: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cam = LanCamera {
            child: None,
            _lan: LanHost::create(ns, &[ip4, ip6]).await?,
        };
        let log = std::fs::File::create(format!("/tmp/verge-e2e-{ns}.log"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(python)
            .arg("-u")
            .arg(repo_root().join("tests/peers/onvif/camera.py"))
            .args([
                "--ip",
                ip4,
                "--uuid",
                &format!("urn:uuid:{uuid}"),
                "--name",
                ns,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting ipycam (run tests/peers/onvif/setup.sh)")?;
        let stdout = child.stdout.take().context("stdout")?;
        cam.child = Some(child);
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(l) = lines.next_line().await? {
                if l.contains("READY") {
                    return Ok(());
                }
            }
            anyhow::bail!("camera exited")
        })
        .await
        .context("camera start timed out")??;
        // Keep draining stdout so the camera never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(cam)
    }
}

fn configuration(name: &str) -> ProtocolConfiguration {
    let targets: Vec<&str> = CAMERAS.iter().map(|c| c.1).collect();
    let uuids: Vec<&str> = CAMERAS.iter().map(|c| c.3).collect();
    let details = format!(
        "interfaces: [verge-lan, lan0]\n\
         unicastTargets: [{targets}]\n\
         uuids: {{action: Include, items: [{uuids}]}}\n\
         probeIntervalSeconds: 3\n",
        targets = targets.join(", "),
        uuids = uuids.join(", "),
    );
    ProtocolConfiguration::new(name, "onvif", &details)
        .shell(r#". /usr/bin/device-env; echo FFPROBE-START; ffprobe -v error -rtsp_transport tcp -show_entries stream=codec_name -of csv=p=0 "$ONVIF_STREAM_URI" && echo FFPROBE-OK && exec verge-test-broker"#)
        // ffprobe in the tool broker runs the node's own (see tests/cluster/lib/ffprobe-host.sh).
        .host_path("host-usr", "/usr", "/host/usr")
}

#[tokio::test]
async fn onvif_cameras_become_instances_with_streaming_brokers() -> Result<()> {
    let Some(t) = ProtocolTest::start("onvif").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let mut cams = Vec::new();
    for (n, ip4, ip6, uuid) in CAMERAS {
        cams.push(LanCamera::start(&t.python, n, ip4, ip6, uuid).await?);
    }
    let (nodes, agents, _controller) = t.agents_on_every_node("onvif").await?;
    let started = Instant::now();
    configuration("onvif-cam").apply(c, &ns).await?;

    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    let want_nodes: BTreeSet<String> = nodes.iter().cloned().collect();
    let instances = wait_until(
        "one Instance per camera, on every node",
        DEADLINE,
        || async {
            let list = api.list(&ListParams::default()).await?.items;
            let ok = list.len() == CAMERAS.len()
                && list
                    .iter()
                    .all(|i| i.spec.nodes.iter().cloned().collect::<BTreeSet<_>>() == want_nodes);
            Ok(ok.then_some(list))
        },
    )
    .await?;
    report_time("ONVIF Configuration → Instances on all nodes", started);
    for i in &instances {
        ensure!(i.spec.shared, "shared");
        let uri = i
            .spec
            .broker_properties
            .get("ONVIF_STREAM_URI")
            .context("ONVIF_STREAM_URI")?;
        ensure!(uri.starts_with("rtsp://10.204.0.7"), "{uri}");
        ensure!(
            !i.spec
                .broker_properties
                .keys()
                .any(|k| k.to_ascii_lowercase().contains("password"))
        );
    }

    let pods: Api<Pod> = Api::namespaced(c.client(), &ns);
    let logs = wait_until(
        "brokers that ran ffprobe on their stream",
        DEADLINE,
        || async {
            let found = broker_logs(c, &ns, "onvif-cam", |log| log.contains("FFPROBE-OK")).await?;
            let logs: Vec<String> = found.into_iter().map(|(_, log)| log).collect();
            Ok((logs.len() >= CAMERAS.len()).then_some(logs))
        },
    )
    .await;
    let logs = match logs {
        Ok(logs) => logs,
        Err(e) => {
            let mut why = String::new();
            let selector = ListParams::default().labels("akri.sh/configuration=onvif-cam");
            for p in pods.list(&selector).await?.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
                let log = c.logs(&ns, &name).await.unwrap_or_default();
                why += &format!("\n--- {name} ({phase}):\n{log}");
            }
            return Err(e.context(format!("broker pods:{why}")));
        }
    };
    report_time("Instances → brokers streamed", started);
    for l in &logs {
        ensure!(l.contains("h264"), "ffprobe output in the broker log: {l}");
    }
    let env = c
        .exec(
            &ns,
            &pods
                .list(&ListParams::default().labels("akri.sh/configuration=onvif-cam"))
                .await?
                .items[0]
                .metadata
                .name
                .clone()
                .unwrap_or_default(),
            &["sh", "-c", ". /usr/bin/device-env; env"],
        )
        .await?;
    ensure!(
        env.contains("ONVIF_STREAM_URI=rtsp://"),
        "broker env: {env}"
    );
    c.assert_no_multicast_leak().await?;
    drop(agents);
    drop(cams);
    Ok(())
}

const AUTH_CAMERA: (&str, &str, &str, &str) = (
    "vg-onvif-auth",
    "10.204.0.72",
    "fd00:204::72",
    "0a1b2c3d-0000-4000-8000-0000000e2e03",
);
const CAMERA_PASSWORD: &str = "s3cret-cam-pw";

fn credentials_secret(password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: camera-creds\nstringData:\n  password: \"{password}\"\n"
    )
}

/// Issue 7: credentials come from discoveryProperties, so from a Secret, through the agent. A
/// camera with auth and a wrong password in the Secret gives a status condition naming the
/// camera and no Instance; the right password (the Secret rotated) describes it. The password
/// is never in the Instance, the Configuration's status, Events or the agent's log.
#[tokio::test]
async fn a_camera_with_auth_is_described_with_the_password_from_a_secret() -> Result<()> {
    let Some(t) = ProtocolTest::start("onvif").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let (name, ip4, ip6, uuid) = AUTH_CAMERA;
    let _cam = LanCamera::start_with(
        &t.python,
        name,
        ip4,
        ip6,
        uuid,
        &["--username", "admin", "--password", CAMERA_PASSWORD],
    )
    .await?;
    let node = "verge-node-1";
    // Secrets are re-read every second here (default 60 s), so the rotation below shows quickly.
    let agent =
        verge_e2e::agent::Agent::start(node, &ns, &["--property-refresh-interval", "1s"]).await?;
    c.apply_yaml(Some(&ns), &credentials_secret("wrong-pw"))
        .await?;
    let details = format!(
        "interfaces: [verge-lan]\nunicastTargets: [{ip4}]\nuuids: {{action: Include, items: [{uuid}]}}\nprobeIntervalSeconds: 2\n"
    );
    let mut cfg = ProtocolConfiguration::new("onvif-auth", "onvif", &details).to_json();
    cfg["spec"]["discoveryHandler"]["discoveryProperties"] = serde_json::json!([
        {"name": "username_default", "value": "admin"},
        {"name": "password_default",
         "valueFrom": {"secretKeyRef": {"name": "camera-creds", "key": "password"}}},
    ]);
    let started = Instant::now();
    c.apply_yaml(Some(&ns), &cfg.to_string()).await?;

    let configs: Api<verge_crds::Configuration> = Api::namespaced(c.client(), &ns);
    let message = wait_until("a condition naming the camera", DEADLINE, || async {
        let cfg = configs.get("onvif-auth").await?;
        Ok(cfg
            .status
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == node))
            .and_then(|n| {
                n.conditions
                    .into_iter()
                    .find(|c| c.type_ == "HandlerDiagnostics")
            })
            .map(|c| c.message)
            .filter(|m| m.contains(uuid)))
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    report_time(
        "wrong password in the Secret → condition naming the camera",
        started,
    );
    ensure!(
        message.contains("rejected"),
        "condition message {message:?}"
    );
    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    ensure!(
        api.list(&ListParams::default()).await?.items.is_empty(),
        "a camera that rejected the credentials was described"
    );

    let t0 = Instant::now();
    c.apply_yaml(Some(&ns), &credentials_secret(CAMERA_PASSWORD))
        .await?;
    let instance = wait_until(
        "the camera described with the right password",
        DEADLINE,
        || async {
            let list = api.list(&ListParams::default()).await?.items;
            Ok(list.into_iter().find(|i| {
                i.spec
                    .broker_properties
                    .get("ONVIF_DEVICE_UUID")
                    .is_some_and(|u| u.contains(uuid))
            }))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    report_time("Secret rotated to the right password → Instance", t0);
    let p = &instance.spec.broker_properties;
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    ensure!(get("ONVIF_MANUFACTURER") == "PythonCam", "{p:?}");
    ensure!(
        get("ONVIF_STREAM_URI").starts_with(&format!("rtsp://{ip4}")),
        "{p:?}"
    );
    wait_until("the condition cleared", DEADLINE, || async {
        let cfg = configs.get("onvif-auth").await?;
        let cleared = cfg
            .status
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == node))
            .is_some_and(|n| {
                !n.conditions
                    .iter()
                    .any(|c| c.type_ == "HandlerDiagnostics" && c.message.contains(uuid))
            });
        Ok(cleared.then_some(()))
    })
    .await?;
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(c.client(), &ns)
        .list(&ListParams::default())
        .await?;
    let status = configs.get("onvif-auth").await?.status;
    for (what, text) in [
        ("the Instance", serde_json::to_string(&instance)?),
        ("the Configuration status", serde_json::to_string(&status)?),
        ("Events", serde_json::to_string(&events.items)?),
        ("the agent log", agent.log_text()),
    ] {
        ensure!(
            !text.contains(CAMERA_PASSWORD) && !text.contains("wrong-pw"),
            "a password is in {what}"
        );
    }
    drop(agent);
    Ok(())
}
