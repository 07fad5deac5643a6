//! USB and udev on the test cluster (issue 8). A umockdev testbed (`tests/peers/usb/testbed.py`
//! under `umockdev-wrapper`) holds an FTDI serial adapter (`e2e-serial.umockdev`: usbfs node
//! `/dev/bus/usb/099/007`, kernel node `/dev/ttyUSB901`) and a webcam that must not match. A
//! host-process agent on verge-node-1 (the host) runs inside the testbed (`LD_PRELOAD` +
//! `UMOCKDEV_DIR`) with the embedded `usb` or `udev` handler, next to the controller. The
//! testbed's device nodes exist only inside the preload, but kubelet and the container runtime
//! look them up on the host, so the test creates matching character devices there (major:minor
//! 1:3, /dev/null's, so nothing real is reachable through them) and removes them on drop. The
//! paths cannot belong to real hardware: Linux numbers USB buses below 64 and `ttyUSB` ports
//! below 512. The broker (tool-broker image) prints the USB properties from its environment and
//! whether each device node is a character device in its container; unplugging the adapter in
//! the testbed then removes the Instance (through the testbed's uevents) and its broker.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use verge_crds::Instance;
use verge_e2e::agent::{Agent, ensure_crds};
use verge_e2e::controller::ControllerProcess;
use verge_e2e::{Cluster, TestNamespace, pod_summary, repo_root, report_time, wait_until};

/// The host is verge-node-1, so its /dev is the one kubelet and containerd use.
const NODE: &str = "verge-node-1";
const DEADLINE: Duration = Duration::from_secs(120);
/// How long the testbed driver may take to start or to answer one command.
const TESTBED_DEADLINE: Duration = Duration::from_secs(20);
const PRELOAD: &str = "libumockdev-preload.so.0";
const AGENT_LOG: &str = "info,verge_agent=debug,verge_usb=debug,verge_udev=debug";
/// An unplug must reach the cluster through the testbed's uevents: the Configurations resync
/// only hourly and set the agent's device grace period to 0, so nothing else removes the
/// Instance this early. Generous against a loaded machine; the handler itself takes < 1 s.
const HOTPLUG_DEADLINE: Duration = Duration::from_secs(15);

/// The adapter of `e2e-serial.umockdev`.
const ADAPTER_DEVPATH: &str = "/devices/pci0000:00/0000:00:14.0/usb99/99-1";
const USBFS_NODE: &str = "/dev/bus/usb/099/007";
const TTY_NODE: &str = "/dev/ttyUSB901";
const SERIAL: &str = "VRGE2E01";
/// The same adapter re-enumerated (`e2e-serial-renumbered.umockdev`): new device number and tty.
const USBFS_NODE_2: &str = "/dev/bus/usb/099/008";
const TTY_NODE_2: &str = "/dev/ttyUSB902";
/// /dev/null's numbers for the host stand-ins.
const STANDIN_MAJOR_MINOR: (u64, u64) = (1, 3);

fn peers() -> PathBuf {
    repo_root().join("tests/peers/usb")
}

/// What the agent needs to run inside a testbed; the error names what is missing.
fn check_prerequisites() -> Result<()> {
    ensure!(
        Path::new("/usr/bin/umockdev-wrapper").exists(),
        "umockdev-wrapper missing (Debian package umockdev)"
    );
    let gi = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import gi; gi.require_version('UMockdev', '1.0')"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(gi, "python3-gi with gir1.2-umockdev-1.0 missing");
    ensure!(
        verge_e2e::agent::agent_binary().exists(),
        "{} missing: run `cargo build --bins`",
        verge_e2e::agent::agent_binary().display()
    );
    Ok(())
}

/// A running umockdev testbed driven by `testbed.py`; stopped (and its root removed) on drop.
struct Testbed {
    child: Child,
    dir: PathBuf,
    root: PathBuf,
}

impl Testbed {
    async fn start(tag: &str, files: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("verge-e2e-usb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut child = Command::new("/usr/bin/umockdev-wrapper")
            .arg("/usr/bin/python3")
            .arg(peers().join("testbed.py"))
            .arg(dir.join("control.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting testbed.py under umockdev-wrapper")?;
        let stdout = child.stdout.take().context("testbed.py stdout")?;
        let mut tb = Testbed {
            child,
            dir,
            root: PathBuf::new(),
        };
        let mut line = String::new();
        tokio::time::timeout(
            TESTBED_DEADLINE,
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("testbed.py printed no root in time")??;
        tb.root = PathBuf::from(line.trim());
        ensure!(
            tb.root.is_dir(),
            "testbed.py printed {line:?}, not a directory"
        );
        for f in files {
            tb.command(&format!("add {}", peers().join(f).display()))
                .await?;
        }
        Ok(tb)
    }

    /// Sends one command to the driver (`add FILE`, `remove DEVPATH`) and expects "ok".
    async fn command(&self, command: &str) -> Result<()> {
        let talk = async {
            let mut s = tokio::net::UnixStream::connect(self.dir.join("control.sock")).await?;
            s.write_all(format!("{command}\n").as_bytes()).await?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).await?;
            anyhow::Ok(answer)
        };
        let answer = tokio::time::timeout(TESTBED_DEADLINE, talk)
            .await
            .with_context(|| format!("testbed command {command:?} timed out"))??;
        ensure!(
            answer.trim() == "ok",
            "testbed command {command:?}: {}",
            answer.trim()
        );
        Ok(())
    }

    /// The agent's environment for running inside this testbed.
    fn env(&self) -> [(&'static str, String); 3] {
        [
            ("LD_PRELOAD", PRELOAD.to_string()),
            ("UMOCKDEV_DIR", self.root.display().to_string()),
            // The handlers' event and device-list lines, for a failure's agent log.
            ("RUST_LOG", AGENT_LOG.to_string()),
        ]
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // "quit" lets the testbed remove its own root; a kill leaves it behind.
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.join("control.sock")) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"quit\n");
            let _ = s.read_to_string(&mut String::new());
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.start_kill();
        if self.root.starts_with(std::env::temp_dir()) && self.root.is_dir() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Character devices created on the host for the testbed's nodes; removed on drop, with the
/// directories created for them.
struct HostNodes {
    nodes: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

fn is_standin(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        let (major, minor) = STANDIN_MAJOR_MINOR;
        m.file_type().is_char_device() && m.rdev() == ((major << 8) | minor)
    })
}

impl HostNodes {
    fn create(paths: &[&str]) -> Result<Self> {
        let mut made = HostNodes {
            nodes: Vec::new(),
            dirs: Vec::new(),
        };
        for path in paths.iter().map(Path::new) {
            if std::fs::symlink_metadata(path).is_ok() {
                // Only a stand-in left by a killed run may be there (the paths are outside
                // what the kernel hands out); anything else is not ours to touch.
                ensure!(
                    is_standin(path),
                    "{} exists on the host and is not a stand-in of this test",
                    path.display()
                );
                made.nodes.push(path.to_path_buf());
                continue;
            }
            let mut missing = Vec::new();
            let mut dir = path.parent();
            while let Some(d) = dir.filter(|d| !d.exists()) {
                missing.push(d.to_path_buf());
                dir = d.parent();
            }
            for d in missing.into_iter().rev() {
                std::fs::create_dir(&d).with_context(|| format!("mkdir {}", d.display()))?;
                made.dirs.push(d);
            }
            let (major, minor) = STANDIN_MAJOR_MINOR;
            let out = std::process::Command::new("mknod")
                .args(["-m", "0666"])
                .arg(path)
                .args(["c", &major.to_string(), &minor.to_string()])
                .output()
                .context("mknod")?;
            if !out.status.success() {
                bail!(
                    "mknod {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            made.nodes.push(path.to_path_buf());
        }
        Ok(made)
    }
}

impl Drop for HostNodes {
    fn drop(&mut self) {
        for n in &self.nodes {
            if is_standin(n) {
                let _ = std::fs::remove_file(n);
            }
        }
        // Deepest first; remove_dir refuses a directory something else put files in.
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A broker that prints `NAME=value` for the given properties (plain names from
/// `/usr/bin/device-env`) and `NODE <path> char|missing` for each node, then serves.
fn broker_yaml(properties: &[&str], nodes_var: &str) -> String {
    let mut script = String::from(". /usr/bin/device-env; ");
    for p in properties {
        script += &format!("echo \"{p}=${p}\"; ");
    }
    script += &format!(
        "for n in $(echo ${nodes_var} | tr , ' '); do if test -c $n; then echo \"NODE $n char\"; \
         else echo \"NODE $n missing\"; fi; done; exec verge-test-broker"
    );
    format!(
        r#"  capacity: 1
  brokerSpec:
    brokerPodSpec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: broker
        image: localhost/verge/tool-broker:dev
        imagePullPolicy: Never
        resources:
          requests: {{"{{{{PLACEHOLDER}}}}": "1"}}
          limits: {{"{{{{PLACEHOLDER}}}}": "1"}}
        command: ["sh", "-c", {script:?}]
"#
    )
}

/// `grace`: the Configuration's device grace period (how long a device may be missing before
/// its Instance goes).
fn usb_configuration(name: &str, grace: &str) -> String {
    format!(
        r#"apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
  annotations:
    akri.sh/device-grace-period: "{grace}"
spec:
  discoveryHandler:
    name: usb
    discoveryDetails: |
      match:
      - vendorId: "0403"
        productId: ["6001", "6015"]
        serial: "VRGE*"
      deviceNodes: [usbfs, tty]
      permissions: rw
      resyncIntervalSeconds: 3600
{}"#,
        broker_yaml(
            &[
                "USB_VENDOR_ID",
                "USB_PRODUCT_ID",
                "USB_SERIAL",
                "USB_MANUFACTURER",
                "USB_PORT_PATH",
                "USB_DEVNODE",
                "USB_TTY",
            ],
            "USB_DEVNODE,$USB_TTY",
        )
    )
}

fn udev_configuration(name: &str) -> String {
    // Akri's documented rule for an FTDI serial adapter, unchanged.
    format!(
        r#"apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {name}
  annotations:
    akri.sh/device-grace-period: "0s"
spec:
  discoveryHandler:
    name: udev
    discoveryDetails: |
      udevRules:
      - 'SUBSYSTEM=="tty", ATTRS{{idVendor}}=="0403"'
      resyncIntervalSeconds: 3600
{}"#,
        broker_yaml(&["UDEV_DEVNODE", "UDEV_DEVPATH"], "UDEV_DEVNODE")
    )
}

/// The one Instance of the namespace, on [`NODE`].
async fn wait_instance(c: &Cluster, ns: &str, agent: &Agent) -> Result<Instance> {
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    let mut list = wait_until("one Instance on the node", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await?.items;
        Ok((list.len() == 1 && list[0].spec.nodes == [NODE.to_string()]).then_some(list))
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    list.pop().context("one Instance")
}

/// The broker pod of `config`, once Running and ready; returns its name and log.
async fn wait_broker(c: &Cluster, ns: &str, config: &str) -> Result<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let selector = format!("akri.sh/configuration={config}");
    let name = wait_until("the broker pod", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        Ok(list.first().and_then(|p| p.metadata.name.clone()))
    })
    .await?;
    c.wait_pod_ready(ns, &name, DEADLINE).await?;
    // The script prints before it execs the broker, which then serves its readiness probe.
    let log = c.logs(ns, &name).await?;
    Ok((name, log))
}

/// Unplugs the adapter in the testbed; waits until its Instance and brokers are gone.
async fn unplug(
    c: &Cluster,
    ns: &str,
    config: &str,
    testbed: &Testbed,
    agent: &Agent,
) -> Result<()> {
    let started = Instant::now();
    testbed
        .command(&format!("remove {ADAPTER_DEVPATH}"))
        .await?;
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    wait_until(
        "the Instance gone after the unplug",
        HOTPLUG_DEADLINE,
        || async {
            Ok(api
                .list(&ListParams::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    report_time(&format!("{config}: unplug → Instance gone"), started);
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let selector = format!("akri.sh/configuration={config}");
    wait_until("the broker gone after the unplug", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        if list.is_empty() {
            return Ok(Some(()));
        }
        bail!(
            "{}",
            list.iter().map(pod_summary).collect::<Vec<_>>().join("; ")
        )
    })
    .await?;
    report_time(&format!("{config}: unplug → broker gone"), started);
    Ok(())
}

/// What every test here starts from: its namespace, the host stand-ins for the device nodes, a
/// testbed, an agent inside it on [`NODE`] and a controller. Fields drop in order: controller and
/// agent stop before the testbed goes; the host nodes and the namespace go last.
struct UsbTest {
    c: Cluster,
    ns: String,
    _controller: ControllerProcess,
    agent: Agent,
    testbed: Testbed,
    _host_nodes: HostNodes,
    _namespace: TestNamespace,
}

impl UsbTest {
    /// `None` without a cluster (the test passes as skipped).
    async fn start(tag: &str, host_nodes: &[&str], testbeds: &[&str]) -> Result<Option<Self>> {
        let Some(c) = Cluster::connect().await else {
            return Ok(None);
        };
        check_prerequisites()?;
        ensure_crds(&c).await?;
        let setup = Instant::now();
        let namespace = c.namespace(tag).await?;
        let ns = namespace.name().to_string();
        let host_nodes = HostNodes::create(host_nodes)?;
        let testbed = Testbed::start(tag, testbeds).await?;
        let env = testbed.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let agent = Agent::start_with_env(NODE, &ns, &[], &env).await?;
        let controller = ControllerProcess::start(&c, &ns, tag, &[]).await?;
        agent.wait_up(DEADLINE).await?;
        report_time(
            &format!("{tag}: namespace, testbed, agent and controller up"),
            setup,
        );
        Ok(Some(UsbTest {
            c,
            ns,
            _controller: controller,
            agent,
            testbed,
            _host_nodes: host_nodes,
            _namespace: namespace,
        }))
    }
}

fn ensure_line(log: &str, line: &str) -> Result<()> {
    ensure!(
        log.lines().any(|l| l.trim() == line),
        "broker output lacks {line:?}:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn usb_adapter_in_a_testbed_gets_a_broker_with_its_properties_and_nodes() -> Result<()> {
    let Some(t) = UsbTest::start(
        "usb",
        &[USBFS_NODE, TTY_NODE],
        &["e2e-serial.umockdev", "webcam.umockdev"],
    )
    .await?
    else {
        return Ok(());
    };
    let UsbTest {
        c,
        ns,
        agent,
        testbed,
        ..
    } = &t;
    let started = Instant::now();
    c.apply_yaml(Some(ns), &usb_configuration("usb-serial", "0s"))
        .await?;

    let instance = wait_instance(c, ns, agent).await?;
    report_time("usb: Configuration → Instance", started);
    ensure!(!instance.spec.shared, "USB devices are not shared");
    let p = &instance.spec.broker_properties;
    for (k, v) in [
        ("USB_VENDOR_ID", "0403"),
        ("USB_PRODUCT_ID", "6001"),
        ("USB_SERIAL", SERIAL),
        ("USB_MANUFACTURER", "FTDI"),
        ("USB_PRODUCT", "FT232R USB UART"),
        ("USB_BUS", "099"),
        ("USB_PORT_PATH", "99-1"),
        ("USB_DEVNODE", USBFS_NODE),
        ("USB_TTY", TTY_NODE),
    ] {
        ensure!(p.get(k).map(String::as_str) == Some(v), "{k}: {p:?}");
    }

    let (pod, log) = wait_broker(c, ns, "usb-serial").await?;
    report_time("usb: Configuration → broker Running", started);
    println!("broker {pod} log:\n{log}");
    for line in [
        "USB_VENDOR_ID=0403".to_string(),
        "USB_PRODUCT_ID=6001".to_string(),
        format!("USB_SERIAL={SERIAL}"),
        "USB_MANUFACTURER=FTDI".to_string(),
        "USB_PORT_PATH=99-1".to_string(),
        format!("USB_DEVNODE={USBFS_NODE}"),
        format!("USB_TTY={TTY_NODE}"),
        format!("NODE {USBFS_NODE} char"),
        format!("NODE {TTY_NODE} char"),
    ] {
        ensure_line(&log, &line)?;
    }
    // The properties as the agent names them (NAME_<INSTANCE HASH>), and the nodes, in the
    // running container.
    let env = c.exec(ns, &pod, &["env"]).await?;
    ensure!(
        env.lines().any(|l| l
            .split_once('=')
            .is_some_and(|(k, v)| k.starts_with("USB_SERIAL_") && v == SERIAL)),
        "container env lacks USB_SERIAL_<hash>={SERIAL}: {env}"
    );
    c.exec(
        ns,
        &pod,
        &[
            "sh",
            "-c",
            &format!("test -c {USBFS_NODE} && test -c {TTY_NODE}"),
        ],
    )
    .await
    .context("device nodes in the running container")?;

    unplug(c, ns, "usb-serial", testbed, agent).await?;
    Ok(())
}

#[tokio::test]
async fn udev_rule_in_a_testbed_gets_a_broker_with_the_tty_node() -> Result<()> {
    let Some(t) = UsbTest::start(
        "udev",
        &[TTY_NODE],
        &["e2e-serial.umockdev", "webcam.umockdev"],
    )
    .await?
    else {
        return Ok(());
    };
    let UsbTest {
        c,
        ns,
        agent,
        testbed,
        ..
    } = &t;
    let started = Instant::now();
    c.apply_yaml(Some(ns), &udev_configuration("udev-tty"))
        .await?;

    let instance = wait_instance(c, ns, agent).await?;
    report_time("udev: Configuration → Instance", started);
    ensure!(!instance.spec.shared, "udev devices are not shared");
    let devpath = format!("{ADAPTER_DEVPATH}/99-1:1.0/ttyUSB901/tty/ttyUSB901");
    let p = &instance.spec.broker_properties;
    ensure!(
        p.get("UDEV_DEVNODE").map(String::as_str) == Some(TTY_NODE),
        "{p:?}"
    );
    ensure!(
        p.get("UDEV_DEVPATH").map(String::as_str) == Some(devpath.as_str()),
        "{p:?}"
    );

    let (pod, log) = wait_broker(c, ns, "udev-tty").await?;
    report_time("udev: Configuration → broker Running", started);
    println!("broker {pod} log:\n{log}");
    ensure_line(&log, &format!("UDEV_DEVNODE={TTY_NODE}"))?;
    ensure_line(&log, &format!("UDEV_DEVPATH={devpath}"))?;
    ensure_line(&log, &format!("NODE {TTY_NODE} char"))?;

    unplug(c, ns, "udev-tty", testbed, agent).await?;
    Ok(())
}

/// Akri's #734: a device that re-enumerates (unplugged and back within the grace period, with a
/// new device number and tty) keeps its Instance, whose properties follow the new nodes, and
/// the controller replaces the broker, since kubelet never changes a running container's devices.
#[tokio::test]
async fn re_enumerated_usb_adapter_keeps_its_instance_and_gets_a_broker_with_the_new_nodes()
-> Result<()> {
    let Some(t) = UsbTest::start(
        "usb-reenum",
        &[USBFS_NODE, TTY_NODE, USBFS_NODE_2, TTY_NODE_2],
        &["e2e-serial.umockdev"],
    )
    .await?
    else {
        return Ok(());
    };
    let UsbTest {
        c,
        ns,
        agent,
        testbed,
        ..
    } = &t;
    let applied = Instant::now();
    c.apply_yaml(Some(ns), &usb_configuration("usb-reenum", "5m"))
        .await?;
    let before = wait_instance(c, ns, agent).await?;
    report_time("usb-reenum: Configuration → Instance", applied);
    let (old_pod, log) = wait_broker(c, ns, "usb-reenum").await?;
    report_time("usb-reenum: Configuration → broker Running", applied);
    ensure_line(&log, &format!("NODE {TTY_NODE} char"))?;
    // The broker's name is derived from the Instance, so its replacement has the same name: tell
    // them apart by uid.
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let old_uid = pods.get(&old_pod).await?.metadata.uid;

    let started = Instant::now();
    testbed
        .command(&format!("remove {ADAPTER_DEVPATH}"))
        .await?;
    testbed
        .command(&format!(
            "add {}",
            peers().join("e2e-serial-renumbered.umockdev").display()
        ))
        .await?;
    let api: Api<Instance> = Api::namespaced(c.client(), ns);
    let name = before.metadata.name.clone().context("Instance name")?;
    let after = wait_until(
        "the Instance with the new nodes",
        HOTPLUG_DEADLINE,
        || async {
            let i = api.get(&name).await?;
            let p = &i.spec.broker_properties;
            let moved = p.get("USB_DEVNODE").map(String::as_str) == Some(USBFS_NODE_2)
                && p.get("USB_TTY").map(String::as_str) == Some(TTY_NODE_2);
            Ok(moved.then_some(i))
        },
    )
    .await?;
    report_time(
        "usb-reenum: re-enumeration → same Instance, new nodes",
        started,
    );
    ensure!(
        after.metadata.uid == before.metadata.uid,
        "the Instance was recreated, not kept"
    );
    ensure!(
        after
            .spec
            .broker_properties
            .get("USB_SERIAL")
            .map(String::as_str)
            == Some(SERIAL),
        "{:?}",
        after.spec.broker_properties
    );

    let selector = "akri.sh/configuration=usb-reenum";
    let new_pod = wait_until("a new broker with the new nodes", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await?
            .items;
        if let Some(old) = list.iter().find(|p| p.metadata.uid == old_uid) {
            bail!("old broker still there: {}", pod_summary(old));
        }
        Ok(list.first().and_then(|p| p.metadata.name.clone()))
    })
    .await?;
    c.wait_pod_ready(ns, &new_pod, DEADLINE).await?;
    report_time("usb-reenum: re-enumeration → new broker Running", started);
    let log = c.logs(ns, &new_pod).await?;
    println!("broker {new_pod} log:\n{log}");
    ensure_line(&log, &format!("USB_DEVNODE={USBFS_NODE_2}"))?;
    ensure_line(&log, &format!("USB_TTY={TTY_NODE_2}"))?;
    ensure_line(&log, &format!("NODE {USBFS_NODE_2} char"))?;
    ensure_line(&log, &format!("NODE {TTY_NODE_2} char"))?;
    // Only the new nodes: the device specs moved, not just the properties.
    c.exec(
        ns,
        &new_pod,
        &[
            "sh",
            "-c",
            &format!("test ! -e {USBFS_NODE} && test ! -e {TTY_NODE}"),
        ],
    )
    .await
    .context("the old nodes must not be in the new broker")?;
    Ok(())
}
