//! Modbus on the test cluster (issue 9): a pymodbus server in a device-LAN namespace
//! (`cluster lan-host vg-mb-1 10.204.0.90`) with an identified unit 1 and a unit 2 known only
//! by a register probe, a host-process agent with the embedded `modbus-tcp` handler, and the
//! controller. A Configuration gives one Instance per unit; each broker reads holding register 0
//! of its unit with a hand-built Modbus TCP frame (printf | nc | od) from MODBUS_HOST,
//! MODBUS_PORT and MODBUS_UNIT_ID, prints the value, then runs the test broker.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::{Api, ListParams};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::agent::Agent;
use verge_e2e::controller::ControllerProcess;
use verge_e2e::protocol::{LanHost, ProtocolConfiguration, ProtocolTest, broker_logs};
use verge_e2e::{repo_root, report_time, wait_until};

const DEADLINE: Duration = Duration::from_secs(120);
const LAN_NS: &str = "vg-mb-1";
const IP4: &str = "10.204.0.90";
const PORT: u16 = 502;

/// The LAN namespace with the pymodbus server; removed on drop (the server first: fields drop
/// in order).
struct LanServer {
    _child: Child,
    _lan: LanHost,
}

impl LanServer {
    async fn start(python: &Path) -> Result<Self> {
        let lan = LanHost::create(LAN_NS, &[IP4]).await?;
        let spec = serde_json::json!({
            "tcp": format!("{IP4}:{PORT}"),
            "missing": "gateway",
            "units": {
                "1": {"identity": {"0": "Verge", "1": "E2E-1", "2": "1.0", "5": "E2E-Model"}, "hr": {"0": [4242]}},
                "2": {"identity": null, "hr": {"0": [777]}}
            }
        });
        let child = Command::new("ip")
            .args(["netns", "exec", LAN_NS])
            .arg(python)
            .arg(repo_root().join("tests/peers/modbus/server.py"))
            .arg(spec.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("pymodbus server (run tests/peers/modbus/setup.sh)")?;
        let server = LanServer {
            _child: child,
            _lan: lan,
        };
        wait_until(
            "pymodbus listening in the LAN namespace",
            Duration::from_secs(30),
            || async {
                Ok(tokio::net::TcpStream::connect((IP4, PORT))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        Ok(server)
    }
}

fn configuration(name: &str) -> ProtocolConfiguration {
    // Read Holding Registers (0x03), address 0, count 1; the unit id byte as an octal escape.
    // stdin stays open 2 s so nc is still reading when the answer comes.
    let script = r#". /usr/bin/device-env; U=$(printf '%03o' $MODBUS_UNIT_ID); echo "MODBUS-ENV host=$MODBUS_HOST port=$MODBUS_PORT unit=$MODBUS_UNIT_ID vendor=$MODBUS_VENDOR probe=$MODBUS_PROBE"; B=$( (printf "\000\001\000\000\000\006\\$U\003\000\000\000\001"; sleep 2) | timeout 5 nc $MODBUS_HOST $MODBUS_PORT | od -An -tu1); set -- $B; echo "MODBUS-REGISTER bytes=$# value=$(( ${10:-0} * 256 + ${11:-0} ))"; exec verge-test-broker"#;
    let details = format!(
        "hosts: [{IP4}]\n\
         unitIds: [\"1-3\"]\n\
         requestTimeoutMillis: 500\n\
         rescanIntervalSeconds: 5\n\
         probes:\n\
         - {{name: e2e-probe, kind: holdingRegisters, address: 0, expect: [777]}}\n"
    );
    ProtocolConfiguration::new(name, "modbus-tcp", &details).shell(script)
}

#[tokio::test]
async fn modbus_units_become_instances_with_brokers_reading_registers() -> Result<()> {
    let Some(t) = ProtocolTest::start("modbus").await? else {
        return Ok(());
    };
    let (c, ns) = (&t.cluster, t.namespace.name().to_string());
    let server = LanServer::start(&t.python).await?;
    let nodes = c.node_names().await?;
    let node = nodes.first().context("no nodes")?.clone();
    let agent = Agent::start(&node, &ns, &[]).await?;
    let _controller = ControllerProcess::start(c, &ns, "modbus", &[]).await?;
    let started = Instant::now();
    configuration("modbus-e2e").apply(c, &ns).await?;

    let api: Api<Instance> = Api::namespaced(c.client(), &ns);
    let instances = wait_until("two Modbus Instances", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await?.items;
        Ok((list.len() == 2).then_some(list))
    })
    .await?;
    report_time("Modbus Configuration → Instances", started);
    let unit = |u: &str| {
        instances.iter().find(|i| {
            i.spec
                .broker_properties
                .get("MODBUS_UNIT_ID")
                .map(String::as_str)
                == Some(u)
        })
    };
    let i1 = unit("1").context("Instance of unit 1")?;
    let p1 = &i1.spec.broker_properties;
    ensure!(i1.spec.shared, "modbus-tcp devices are shared");
    ensure!(
        p1.get("MODBUS_TRANSPORT").map(String::as_str) == Some("tcp"),
        "{p1:?}"
    );
    ensure!(
        p1.get("MODBUS_HOST").map(String::as_str) == Some(IP4),
        "{p1:?}"
    );
    ensure!(
        p1.get("MODBUS_PORT").map(String::as_str) == Some("502"),
        "{p1:?}"
    );
    ensure!(
        p1.get("MODBUS_VENDOR").map(String::as_str) == Some("Verge"),
        "{p1:?}"
    );
    ensure!(
        p1.get("MODBUS_PRODUCT_CODE").map(String::as_str) == Some("E2E-1"),
        "{p1:?}"
    );
    ensure!(
        p1.get("MODBUS_MODEL").map(String::as_str) == Some("E2E-Model"),
        "{p1:?}"
    );
    let i2 = unit("2").context("Instance of unit 2")?;
    let p2 = &i2.spec.broker_properties;
    ensure!(
        p2.get("MODBUS_PROBE").map(String::as_str) == Some("e2e-probe"),
        "{p2:?}"
    );
    ensure!(!p2.contains_key("MODBUS_VENDOR"), "{p2:?}");

    for (u, value, vendor, probe) in [("1", 4242, "Verge", ""), ("2", 777, "", "e2e-probe")] {
        let (pod, log) = wait_until(
            &format!("broker of unit {u} read its register"),
            DEADLINE,
            || async {
                let found = broker_logs(c, &ns, "modbus-e2e", |log| {
                    log.contains(&format!("unit={u} ")) && log.contains("MODBUS-REGISTER")
                })
                .await?;
                Ok(found.into_iter().next())
            },
        )
        .await?;
        report_time(
            &format!("Instance → broker of unit {u} read a register"),
            started,
        );
        println!("broker {pod} log:\n{log}");
        ensure!(
            log.contains(&format!(
                "MODBUS-ENV host={IP4} port=502 unit={u} vendor={vendor} probe={probe}"
            )),
            "broker env: {log}"
        );
        ensure!(
            log.contains(&format!("MODBUS-REGISTER bytes=11 value={value}")),
            "register read: {log}"
        );
        let env = c
            .exec(&ns, &pod, &["sh", "-c", ". /usr/bin/device-env; env"])
            .await?;
        ensure!(
            env.contains(&format!("MODBUS_UNIT_ID={u}")),
            "broker env: {env}"
        );
        ensure!(env.contains("MODBUS_TRANSPORT=tcp"), "broker env: {env}");
    }
    drop(agent);
    drop(server);
    Ok(())
}
