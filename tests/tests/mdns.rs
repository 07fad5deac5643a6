//! mDNS on the test cluster (issue 11): a python zeroconf publisher announcing a small HTTP
//! server in a device-LAN namespace (`cluster lan-host vg-mdns-1 10.204.0.110 fd00:204::110`),
//! host-process agents with the embedded `mdns` handler on every node (restricted to the LAN
//! interface: `verge-lan` on the host, `lan0` in node namespaces), and the controller. A
//! Configuration gives one shared Instance listing every node; its broker connects to the
//! announced host:port from its env (first address of MDNS_ADDRESSES, MDNS_PORT) and prints what
//! it read and the server's answer before starting the test broker. No multicast leaves by eth0.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::{Api, ListParams};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::protocol::{LanHost, ProtocolConfiguration, ProtocolTest, broker_logs};
use verge_e2e::{repo_root, report_time, wait_until};

const DEADLINE: Duration = Duration::from_secs(120);
const LAN_NS: &str = "vg-mdns-1";
const IP4: &str = "10.204.0.110";
const IP6: &str = "fd00:204::110";
const HTTP_PORT: &str = "8110";
const INSTANCE: &str = "Verge E2E Web";

/// The LAN namespace with an HTTP server and its zeroconf announcement; removed on drop
/// (the processes first: fields drop in order).
struct LanService {
    children: Vec<Child>,
    _lan: LanHost,
}

impl LanService {
    async fn start(python: &Path) -> Result<Self> {
        let mut svc = LanService {
            children: Vec::new(),
            _lan: LanHost::create(LAN_NS, &[IP4, IP6]).await?,
        };
        let http = Command::new("ip")
            .args(["netns", "exec", LAN_NS])
            .arg(python)
            .args(["-m", "http.server", "--bind", IP4, HTTP_PORT])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("http.server")?;
        svc.children.push(http);
        // The service must answer before it is announced: a broker connects once, at start.
        verge_e2e::wait_until(
            "the LAN HTTP server listening",
            Duration::from_secs(60),
            || async {
                Ok(tokio::net::TcpStream::connect(format!("{IP4}:{HTTP_PORT}"))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        let mut publisher = Command::new("ip")
            .args(["netns", "exec", LAN_NS])
            .arg(python)
            .arg(repo_root().join("tests/peers/mdns/publish.py"))
            .args([
                "--name",
                INSTANCE,
                "--type",
                "_http._tcp.local.",
                "--port",
                HTTP_PORT,
                "--host",
                "vg-mdns-e2e.local.",
                "--addr",
                IP4,
                "--addr",
                IP6,
                "--txt",
                "path=/",
                "--txt",
                "model=e2e-1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("publish.py (run tests/peers/mdns/setup.sh)")?;
        let stdout = publisher.stdout.take().context("stdout")?;
        svc.children.push(publisher);
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("publisher start timed out")??;
        ensure!(
            first.as_deref() == Some("ready"),
            "publisher said {first:?}"
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(svc)
    }
}

fn configuration(name: &str) -> ProtocolConfiguration {
    ProtocolConfiguration::new(
        name,
        "mdns",
        "serviceTypes: [_http._tcp]\n\
         interfaces: {action: Include, items: [verge-lan, lan0]}\n\
         instanceNames: {action: Include, items: [\"glob:Verge E2E*\"]}\n",
    )
    .shell(
        r#". /usr/bin/device-env; A=${MDNS_ADDRESSES%%,*}; echo "MDNS-ENV instance=$MDNS_INSTANCE host=$MDNS_HOSTNAME addr=$A port=$MDNS_PORT model=$MDNS_TXT_MODEL"; R=$(printf 'GET / HTTP/1.0\r\n\r\n' | timeout 10 nc $A $MDNS_PORT | head -1); echo "MDNS-CONNECT $R"; exec verge-test-broker"#,
    )
}

#[tokio::test]
async fn mdns_service_becomes_instance_with_connecting_broker() -> Result<()> {
    let Some(t) = ProtocolTest::start("mdns").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let svc = LanService::start(&t.python).await?;
    let (nodes, agents, _controller) = t.agents_on_every_node("mdns").await?;
    let started = Instant::now();
    configuration("mdns-web").apply(c, &ns).await?;

    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    let want_nodes: BTreeSet<String> = nodes.iter().cloned().collect();
    let instances = wait_until("one shared Instance on every node", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await?.items;
        let ok = list.len() == 1
            && list
                .iter()
                .all(|i| i.spec.nodes.iter().cloned().collect::<BTreeSet<_>>() == want_nodes);
        Ok(ok.then_some(list))
    })
    .await?;
    report_time("mDNS Configuration → Instance on all nodes", started);
    let i = &instances[0];
    ensure!(i.spec.shared, "shared");
    let p = &i.spec.broker_properties;
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    ensure!(get("MDNS_INSTANCE") == INSTANCE, "{p:?}");
    ensure!(get("MDNS_SERVICE_TYPE") == "_http._tcp.local.", "{p:?}");
    ensure!(get("MDNS_HOSTNAME") == "vg-mdns-e2e.local.", "{p:?}");
    ensure!(get("MDNS_ADDRESSES") == format!("{IP4},{IP6}"), "{p:?}");
    ensure!(get("MDNS_PORT") == HTTP_PORT, "{p:?}");
    ensure!(
        get("MDNS_TXT_MODEL") == "e2e-1" && get("MDNS_TXT_PATH") == "/",
        "{p:?}"
    );

    let (pod, log) = wait_until(
        "a broker that connected to the service",
        DEADLINE,
        || async {
            let found = broker_logs(c, &ns, "mdns-web", |log| log.contains("MDNS-CONNECT")).await?;
            Ok(found.into_iter().next())
        },
    )
    .await?;
    report_time("Instance → broker connected", started);
    println!("broker log:\n{log}");
    ensure!(
        log.contains(&format!(
            "MDNS-ENV instance={INSTANCE} host=vg-mdns-e2e.local. addr={IP4} port={HTTP_PORT} model=e2e-1"
        )),
        "broker read its env: {log}"
    );
    ensure!(
        log.contains("MDNS-CONNECT HTTP/1.0 200"),
        "broker reached the announced host:port: {log}"
    );
    let env = c
        .exec(&ns, &pod, &["sh", "-c", ". /usr/bin/device-env; env"])
        .await?;
    ensure!(
        env.contains(&format!("MDNS_PORT={HTTP_PORT}")),
        "broker env: {env}"
    );
    c.assert_no_multicast_leak().await?;
    drop(agents);
    drop(svc);
    Ok(())
}
