//! The SDK runner serves debugEcho as an external handler: it registers with a
//! (test) agent Registration server, streams devices over `v0`, follows the
//! availability file, re-registers when the agent restarts, and refuses bad
//! settings with InvalidArgument.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use verge_debug_echo::{DESCRIPTION_PROPERTY, DebugEcho};
use verge_device_plugin_proto::v0::register_discovery_handler_request::EndpointType;
use verge_device_plugin_proto::v0::registration_server::{Registration, RegistrationServer};
use verge_device_plugin_proto::v0::{Empty, RegisterDiscoveryHandlerRequest};
use verge_discovery_sdk::{
    DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, HandlerEndpoint,
    RemoteHandler, Runner, RunnerConfig,
};

/// Generous: these bound a hang, they are not the measurement.
const DEADLINE: Duration = Duration::from_secs(20);

struct TestRegistry {
    seen: mpsc::UnboundedSender<RegisterDiscoveryHandlerRequest>,
}

#[tonic::async_trait]
impl Registration for TestRegistry {
    async fn register_discovery_handler(
        &self,
        request: Request<RegisterDiscoveryHandlerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let _ = self.seen.send(request.into_inner());
        Ok(Response::new(Empty {}))
    }
}

/// A Registration server on `<dir>/agent-registration.sock`, stopped by the returned sender.
fn start_registry(
    dir: &Path,
) -> (
    mpsc::UnboundedReceiver<RegisterDiscoveryHandlerRequest>,
    oneshot::Sender<()>,
) {
    let (seen, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listener = verge_discovery_sdk::uds::bind(&dir.join("agent-registration.sock"))
        .expect("bind registration socket");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(TestRegistry { seen }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    (rx, stop_tx)
}

async fn next_update(stream: &mut DeviceStream) -> Vec<String> {
    let update = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an update before the deadline")
        .expect("stream still open")
        .expect("no error");
    update
        .devices
        .iter()
        .map(|d| {
            assert_eq!(d.properties.get(DESCRIPTION_PROPERTY), Some(&d.id));
            d.id.clone()
        })
        .collect()
}

fn request(details: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        details: details.to_string(),
        properties: Default::default(),
    }
}

#[tokio::test]
async fn runner_registers_streams_and_reregisters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut registrations, stop_registry) = start_registry(dir.path());

    let config = RunnerConfig {
        directory: dir.path().to_path_buf(),
        ..RunnerConfig::default()
    };
    let handler = Arc::new(DebugEcho::new(
        dir.path().join("default-availability"),
        true,
    ));
    let (stop_runner, runner_stopped) = oneshot::channel::<()>();
    let runner = tokio::spawn(Runner::new(handler, config).run(async {
        let _ = runner_stopped.await;
    }));

    let started = Instant::now();
    let reg = tokio::time::timeout(DEADLINE, registrations.recv())
        .await
        .expect("registration before the deadline")
        .expect("registry alive");
    println!("registered after {:?}", started.elapsed());
    assert_eq!(reg.name, "debugEcho");
    assert!(reg.shared);
    assert_eq!(reg.endpoint_type, EndpointType::Uds as i32);
    let endpoint = PathBuf::from(&reg.endpoint);
    assert_eq!(endpoint, dir.path().join("debugEcho.sock"));

    // Stream devices through the wire, as the agent will.
    let remote = RemoteHandler::new(
        reg.name.clone(),
        reg.shared,
        HandlerEndpoint::Uds(endpoint.clone()),
    );
    let availability = dir.path().join("availability");
    let details = format!(
        "descriptions:\n- foo0\n- foo1\navailabilityFile: {}\n",
        availability.display()
    );
    let mut stream = remote.discover(request(&details)).await.expect("discover");
    assert_eq!(next_update(&mut stream).await, ["foo0", "foo1"]);

    let t = Instant::now();
    std::fs::write(&availability, "OFFLINE").expect("write");
    assert!(next_update(&mut stream).await.is_empty());
    println!("OFFLINE reached the client after {:?}", t.elapsed());
    let t = Instant::now();
    std::fs::write(&availability, "ONLINE").expect("write");
    assert_eq!(next_update(&mut stream).await, ["foo0", "foo1"]);
    println!("ONLINE reached the client after {:?}", t.elapsed());

    // The agent restarts: a new registration socket appears, and the handler comes back by itself.
    let _ = stop_registry.send(());
    drop(registrations);
    let (mut registrations, _keep) = start_registry(dir.path());
    let t = Instant::now();
    let again = tokio::time::timeout(DEADLINE, registrations.recv())
        .await
        .expect("re-registration before the deadline")
        .expect("registry alive");
    let took = t.elapsed();
    println!("re-registered {took:?} after the registry restarted");
    assert_eq!(again, reg);
    assert!(
        took < Duration::from_secs(1),
        "re-registration took {took:?}"
    );

    // Clean shutdown removes the handler's socket.
    let _ = stop_runner.send(());
    tokio::time::timeout(DEADLINE, runner)
        .await
        .expect("runner stops")
        .expect("runner task")
        .expect("runner result");
    assert!(!endpoint.exists(), "socket left behind");
}

#[tokio::test]
async fn bad_settings_are_invalid_argument_over_the_wire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("echo.sock");
    let config = RunnerConfig {
        directory: dir.path().to_path_buf(),
        endpoint: verge_discovery_sdk::runner::ServeEndpoint::Uds(socket.clone()),
        ..RunnerConfig::default()
    };
    let handler = Arc::new(DebugEcho::new(dir.path().join("a"), true));
    let runner = tokio::spawn(Runner::new(handler, config).run(futures::future::pending()));
    let remote = RemoteHandler::new("debugEcho", true, HandlerEndpoint::Uds(socket.clone()));

    // The socket appears once the runner is listening.
    let deadline = Instant::now() + DEADLINE;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "runner never listened");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for (details, expect) in [
        ("descriptionz: [a]", "descriptionz"),
        ("descriptions: [a, a]", "listed twice"),
        ("descriptions: {a: 1}", "descriptions"),
        ("availabilityFile: /x", "descriptions"),
        (
            "descriptions: [a]\navailabilityFile: /nonexistent-dir/f",
            "does not exist",
        ),
    ] {
        match remote.discover(request(details)).await {
            Err(DiscoveryError::InvalidSettings(m)) => {
                assert!(m.contains(expect), "{details:?}: {m:?} lacks {expect:?}")
            }
            Err(other) => panic!("{details:?}: expected InvalidSettings, got {other:?}"),
            Ok(_) => panic!("{details:?} was accepted"),
        }
    }
    // The handler still serves good requests afterwards.
    let mut stream = remote
        .discover(request(&format!(
            "descriptions: [ok]\navailabilityFile: {}",
            dir.path().join("av").display()
        )))
        .await
        .expect("discover");
    assert_eq!(next_update(&mut stream).await, ["ok"]);
    runner.abort();
}

#[tokio::test]
async fn embedded_and_remote_give_the_same_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handler = DebugEcho::new(dir.path().join("av"), true);
    let mut embedded = handler
        .discover(request("descriptions: [x, y]"))
        .await
        .expect("embedded");
    assert_eq!(next_update(&mut embedded).await, ["x", "y"]);
    let unreachable = RemoteHandler::new(
        "debugEcho",
        true,
        HandlerEndpoint::Uds(dir.path().join("none.sock")),
    )
    .with_connect_timeout(Duration::from_secs(1));
    assert!(matches!(
        unreachable.discover(request("descriptions: [x]")).await,
        Err(DiscoveryError::Transport(_))
    ));
}

#[tokio::test]
async fn diagnostics_cross_the_wire_in_field_100() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("diag.sock");
    let config = RunnerConfig {
        directory: dir.path().to_path_buf(),
        endpoint: verge_discovery_sdk::runner::ServeEndpoint::Uds(socket.clone()),
        ..RunnerConfig::default()
    };
    let handler = Arc::new(DebugEcho::new(dir.path().join("a"), true));
    let runner = tokio::spawn(Runner::new(handler, config).run(futures::future::pending()));
    let deadline = Instant::now() + DEADLINE;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "runner never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let remote = RemoteHandler::new("debugEcho", true, HandlerEndpoint::Uds(socket));
    let details = format!(
        "descriptions: [d]\navailabilityFile: {}\ndiagnostics:\n- {{subject: d, severity: Warning, message: wrong password}}\n",
        dir.path().join("av").display()
    );
    let mut stream = remote.discover(request(&details)).await.expect("discover");
    let update = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("update")
        .expect("open")
        .expect("ok");
    assert_eq!(update.devices.len(), 1);
    assert_eq!(update.diagnostics.len(), 1);
    assert_eq!(update.diagnostics[0].message, "wrong password");
    assert_eq!(update.diagnostics[0].severity, "Warning");
    let bad = remote
        .discover(request(
            "descriptions: [d]\ndiagnostics:\n- {severity: Fatal, message: x}\n",
        ))
        .await;
    assert!(matches!(bad, Err(DiscoveryError::InvalidSettings(m)) if m.contains("Fatal")));
    runner.abort();
}
