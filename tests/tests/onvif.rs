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
