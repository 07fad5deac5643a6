//! Bluetooth LE on the test cluster (issue 10): python-dbusmock's BlueZ template on a private
//! system bus (its own dbus-daemon) with one adapter and one advertising peripheral, a
//! host-process agent with the embedded `ble` handler pointed at that bus
//! (`DBUS_SYSTEM_BUS_ADDRESS`), and the controller. A Configuration gives an Instance with the
//! BLE properties, and a broker pod whose environment holds them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, ListParams};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::agent::Agent;
use verge_e2e::controller::ControllerProcess;
use verge_e2e::protocol::{ProtocolConfiguration, ProtocolTest, broker_logs};
use verge_e2e::{report_time, wait_until};

const NODE: &str = "verge-node-1";
const DEADLINE: Duration = Duration::from_secs(120);
const ADDRESS: &str = "C0:FF:EE:00:10:01";
const NAME: &str = "Verge-E2E-Thermo";

/// A private bus with the mocked BlueZ; both processes and the socket go on drop.
struct MockBluez {
    dir: PathBuf,
    address: String,
    children: Vec<Child>,
}

impl MockBluez {
    async fn start(python: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("verge-e2e-ble-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let address = format!("unix:path={}", dir.join("bus").display());
        let mut m = MockBluez {
            dir,
            address,
            children: Vec::new(),
        };
        m.children.push(
            Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile"])
                .arg(format!("--address={}", m.address))
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("dbus-daemon")?,
        );
        let socket = m.dir.join("bus");
        wait_until("the private bus", Duration::from_secs(10), || {
            let ready = socket.exists();
            async move { Ok(ready.then_some(())) }
        })
        .await?;
        m.children.push(
            Command::new(python)
                .args(["-m", "dbusmock", "--system", "--template", "bluez5"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &m.address)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("dbusmock (run tests/peers/ble/setup.sh)")?,
        );
        wait_until("the mocked BlueZ", Duration::from_secs(30), || async {
            Ok(m.call(
                "/org/bluez",
                "org.freedesktop.DBus.Introspectable.Introspect",
                &[],
            )
            .await
            .ok())
        })
        .await?;
        m.call(
            "/org/bluez",
            "org.bluez.Mock.AddAdapter",
            &["hci0", "verge-e2e"],
        )
        .await?;
        m.call(
            "/org/bluez",
            "org.bluez.Mock.AddDevice",
            &["hci0", ADDRESS, NAME],
        )
        .await?;
        let path = format!("/org/bluez/hci0/dev_{}", ADDRESS.replace(':', "_"));
        m.call(
            &path,
            "org.freedesktop.DBus.Mock.UpdateProperties",
            &[
                "org.bluez.Device1",
                "{'UUIDs': <['0000181a-0000-1000-8000-00805f9b34fb']>, 'ManufacturerData': <{uint16 89: <[byte 0x01, 0x02]>}>, 'RSSI': <int16 -55>}",
            ],
        )
        .await?;
        Ok(m)
    }

    async fn call(&self, object: &str, method: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("gdbus")
            .args([
                "call",
                "--system",
                "-d",
                "org.bluez",
                "-o",
                object,
                "-m",
                method,
            ])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .output()
            .await?;
        if !out.status.success() {
            bail!("{method}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for MockBluez {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn configuration(name: &str) -> ProtocolConfiguration {
    ProtocolConfiguration::new(
        name,
        "ble",
        "serviceUuids: {action: Include, items: [\"181a\"]}\n\
         localName: {action: Include, items: [\"Verge-E2E-*\"], match: Glob}\n",
    )
}

#[tokio::test]
async fn ble_peripheral_becomes_instance_with_broker_env() -> Result<()> {
    let Some(t) = ProtocolTest::start("ble").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let bluez = MockBluez::start(&t.python).await?;
    let agent = Agent::start_with_env(
        NODE,
        &ns,
        &[],
        &[("DBUS_SYSTEM_BUS_ADDRESS", &bluez.address)],
    )
    .await?;
    let _controller = ControllerProcess::start(c, &ns, "ble", &[]).await?;
    let started = Instant::now();
    configuration("ble-thermo").apply(c, &ns).await?;

    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    let instances = wait_until("the BLE Instance", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await?.items;
        Ok((list.len() == 1 && list[0].spec.nodes == [NODE.to_string()]).then_some(list))
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    report_time("BLE Configuration → Instance", started);
    let i = &instances[0];
    ensure!(i.spec.shared, "BLE devices are shared");
    let p = &i.spec.broker_properties;
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    ensure!(get("BLE_ADDRESS") == ADDRESS, "{p:?}");
    ensure!(get("BLE_NAME") == NAME, "{p:?}");
    ensure!(get("BLE_ADDRESS_TYPE") == "public", "{p:?}");
    ensure!(
        get("BLE_SERVICE_UUIDS") == "0000181a-0000-1000-8000-00805f9b34fb",
        "{p:?}"
    );
    ensure!(get("BLE_MANUFACTURER_ID") == "0x0059", "{p:?}");
    ensure!(get("BLE_ADAPTER") == "hci0", "{p:?}");

    let log = wait_until("a broker printing the BLE env", DEADLINE, || async {
        let found = broker_logs(c, &ns, "ble-thermo", |log| log.contains("BLE_ADDRESS")).await?;
        Ok(found.into_iter().next().map(|(_, log)| log))
    })
    .await?;
    report_time("Instance → broker with BLE env", started);
    // The agent names each property NAME_<INSTANCE HASH> (Akri's naming).
    for (name, value) in [
        ("BLE_ADDRESS", ADDRESS),
        ("BLE_NAME", NAME),
        ("BLE_ADAPTER", "hci0"),
        ("BLE_MANUFACTURER_ID", "0x0059"),
    ] {
        ensure!(
            log.lines().any(|l| l
                .split_once('=')
                .is_some_and(|(k, v)| k.starts_with(&format!("{name}_")) && v == value)),
            "broker env lacks {name}={value}: {log}"
        );
    }
    drop(agent);
    drop(bluez);
    Ok(())
}

/// `verge-ble-discovery` (the external handler) running on `node`, registered with `agent`.
struct ExternalBle {
    child: Child,
    log: PathBuf,
}

impl ExternalBle {
    fn start(agent: &Agent, bus: &str) -> Result<Self> {
        let bin = verge_e2e::agent::agent_binary().with_file_name("verge-ble-discovery");
        ensure!(
            bin.exists(),
            "{} is missing; run `cargo build --bins`",
            bin.display()
        );
        let log = agent.handlers_dir.with_file_name("ble-handler.log");
        let out = std::fs::File::create(&log)?;
        // Node 2's agent lives in node 2's namespaces; so does its handler. The bus is a
        // filesystem socket, reachable from there like a host's /run/dbus would be.
        let child = Command::new(verge_e2e::cluster_script())
            .args(["node-exec", &agent.node])
            .arg(&bin)
            .args(["--directory", &agent.handlers_dir.display().to_string()])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting verge-ble-discovery")?;
        Ok(ExternalBle { child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ExternalBle {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Issue 10 item 5 ("several nodes may hear one device") and item 6's "embedded and external":
/// node 1's agent runs the embedded handler, node 2's agent has it disabled and gets the device
/// from the standalone `verge-ble-discovery` over the registration socket. Both hear the same
/// peripheral; the Instance lists both nodes, and capacity 1 gives it one broker.
#[tokio::test]
async fn a_peripheral_two_nodes_hear_is_one_instance_with_one_broker() -> Result<()> {
    let Some(t) = ProtocolTest::start("ble").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let nodes = c.node_names().await?;
    if nodes.len() < 2 {
        verge_e2e::uncaptured("ble two-node test: the cluster has one node; skipped");
        ensure!(
            !verge_e2e::required(),
            "VERGE_E2E=required needs a two-node cluster"
        );
        return Ok(());
    }
    let bluez = MockBluez::start(&t.python).await?;
    let bus = [("DBUS_SYSTEM_BUS_ADDRESS", bluez.address.as_str())];
    let _embedded = Agent::start_with_env(&nodes[0], &ns, &[], &bus).await?;
    let external_agent =
        Agent::start_with_env(&nodes[1], &ns, &["--disable-embedded-handler", "ble"], &[]).await?;
    let handler = ExternalBle::start(&external_agent, &bluez.address)?;
    let _controller = ControllerProcess::start(c, &ns, "ble2", &[]).await?;
    let started = Instant::now();
    configuration("ble-shared").apply(c, &ns).await?;

    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    let want: std::collections::BTreeSet<String> = nodes.iter().take(2).cloned().collect();
    let instance = wait_until("one Instance listing both nodes", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await?.items;
        let both = |i: &Instance| {
            i.spec
                .nodes
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                == want
        };
        Ok((list.len() == 1 && both(&list[0])).then(|| list[0].clone()))
    })
    .await
    .with_context(|| {
        format!(
            "node 2 agent log:\n{}\nexternal handler log:\n{}",
            external_agent.log_text(),
            handler.log_text()
        )
    })?;
    report_time("BLE Configuration → one Instance on both nodes", started);
    ensure!(instance.spec.shared, "BLE devices are shared");
    ensure!(
        instance.spec.capacity == 1,
        "capacity {}",
        instance.spec.capacity
    );
    ensure!(
        instance
            .spec
            .broker_properties
            .get("BLE_ADDRESS")
            .map(String::as_str)
            == Some(ADDRESS),
        "{:?}",
        instance.spec.broker_properties
    );
    ensure!(
        external_agent
            .log_text()
            .contains("embedded handler disabled"),
        "node 2's agent still embeds ble"
    );

    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client(), &ns);
    let selector = ListParams::default().labels("akri.sh/configuration=ble-shared");
    let running = wait_until("a Running broker", DEADLINE, || async {
        let list = pods.list(&selector).await?.items;
        Ok(list
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await?;
    report_time("Instance → broker Running", started);
    let claimed = wait_until("the broker's slot recorded", DEADLINE, || async {
        let i = api
            .get(&instance.metadata.name.clone().unwrap_or_default())
            .await?;
        Ok((i.spec.used_slots() == 1).then_some(i))
    })
    .await?;
    let brokers = pods.list(&selector).await?.items;
    ensure!(
        brokers.len() == 1,
        "capacity 1 allows one broker, found {}: {:?}",
        brokers.len(),
        brokers
            .iter()
            .map(verge_e2e::pod_summary)
            .collect::<Vec<_>>()
    );
    ensure!(
        claimed.spec.device_usage.values().any(|u| u.contains(
            running
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("?")
        )),
        "the slot is held by the broker's node: {:?}",
        claimed.spec.device_usage
    );
    drop(handler);
    drop(bluez);
    Ok(())
}
