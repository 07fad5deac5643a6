//! `--health-address`: a handler started through the shared CLI flags answers `/healthz` 200
//! while it serves and `/readyz` 200 only once a (test) agent has registered it, 503 again when
//! the agent's socket goes away, and stops answering when it shuts down. A binary serving two
//! handlers (verge-modbus-discovery) is ready only once both are registered, and removes both
//! sockets at shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use verge_device_plugin_proto::v0::registration_server::{Registration, RegistrationServer};
use verge_device_plugin_proto::v0::{Empty, RegisterDiscoveryHandlerRequest};
use verge_discovery_sdk::cli::ServeArgs;
use verge_discovery_sdk::{DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest};

/// Generous: these bound a hang, they are not the measurement.
const DEADLINE: Duration = Duration::from_secs(20);

/// Discovers nothing: only serving and registering matter here.
struct Idle(&'static str);

impl DiscoveryHandler for Idle {
    fn name(&self) -> &str {
        self.0
    }
    fn shared(&self) -> bool {
        false
    }
    fn discover(
        &self,
        _request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        Box::pin(async { Ok(Box::pin(futures::stream::pending()) as DeviceStream) })
    }
}

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `GET path` over HTTP/1.1: the status code, or the connection error (the server is not up).
async fn get(address: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    // "HTTP/1.1 200 OK"
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))
}

/// Polls `path` until it answers `code`: the state changes in another task, so there is no
/// event to wait on from outside, only the endpoint itself.
async fn wait_for(address: SocketAddr, path: &str, code: u16) -> Duration {
    let started = Instant::now();
    loop {
        let got = get(address, path).await;
        if matches!(got, Ok(c) if c == code) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{path} did not answer {code} within {DEADLINE:?}: last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::test]
async fn healthz_while_serving_readyz_once_registered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let args = Cli::try_parse_from([
        "handler",
        "--directory",
        &dir.path().display().to_string(),
        "--health-address",
        &address.to_string(),
    ])
    .expect("flags")
    .serve;
    let (stop, stopped) = oneshot::channel::<()>();
    let handler = tokio::spawn(async move {
        args.run(vec![Arc::new(Idle("healthTest"))], async {
            let _ = stopped.await;
        })
        .await
    });

    // No agent yet: serving, so live, but not registered, so not ready.
    let live_after = wait_for(address, "/healthz", 200).await;
    println!("/healthz 200 after {live_after:?}");
    assert_eq!(get(address, "/readyz").await.expect("readyz"), 503);
    assert_eq!(get(address, "/nothing").await.expect("404"), 404);

    // The agent appears: the handler registers, and becomes ready.
    let (mut registrations, stop_registry) = start_registry(dir.path());
    let reg = tokio::time::timeout(DEADLINE, registrations.recv())
        .await
        .expect("registration before the deadline")
        .expect("registry alive");
    assert_eq!(reg.name, "healthTest");
    let ready_after = wait_for(address, "/readyz", 200).await;
    println!("/readyz 200 {ready_after:?} after the registration arrived");
    assert_eq!(get(address, "/healthz").await.expect("healthz"), 200);

    // The agent goes away (its socket with it): no longer ready, still live.
    let _ = stop_registry.send(());
    std::fs::remove_file(dir.path().join("agent-registration.sock")).expect("remove socket");
    wait_for(address, "/readyz", 503).await;
    assert_eq!(get(address, "/healthz").await.expect("healthz"), 200);

    // Shutdown ends the runner and the health server with it, and removes the handler socket.
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, handler)
        .await
        .expect("stopped before the deadline")
        .expect("task")
        .expect("clean shutdown");
    assert!(
        get(address, "/healthz").await.is_err(),
        "health server still up"
    );
    assert!(!dir.path().join("healthTest.sock").exists());
}

#[tokio::test]
async fn a_health_address_in_use_fails_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("addr");
    let args = Cli::try_parse_from([
        "handler",
        "--directory",
        &dir.path().display().to_string(),
        "--health-address",
        &address.to_string(),
    ])
    .expect("flags")
    .serve;
    let result = tokio::time::timeout(
        DEADLINE,
        args.run(vec![Arc::new(Idle("healthTest"))], std::future::pending()),
    )
    .await
    .expect("an error before the deadline, not a handler that runs without its probe port");
    let err = result.expect_err("address in use");
    assert!(
        err.to_string()
            .contains(&format!("cannot listen on health address {address}")),
        "{err}"
    );
}

/// A Registration server that accepts only the handlers named in `accept` (the others get
/// Unavailable and keep retrying), reporting every accepted registration.
struct Selective {
    accept: Vec<&'static str>,
    seen: mpsc::UnboundedSender<String>,
}

#[tonic::async_trait]
impl Registration for Selective {
    async fn register_discovery_handler(
        &self,
        request: Request<RegisterDiscoveryHandlerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.into_inner().name;
        if !self.accept.contains(&name.as_str()) {
            return Err(Status::unavailable("not yet"));
        }
        let _ = self.seen.send(name);
        Ok(Response::new(Empty {}))
    }
}

#[tokio::test]
async fn two_handlers_are_ready_only_when_both_are_registered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let args = Cli::try_parse_from([
        "handler",
        "--directory",
        &dir.path().display().to_string(),
        "--health-address",
        &address.to_string(),
    ])
    .expect("flags")
    .serve;
    // The registry accepts only `first`: `second` keeps failing its registration.
    let (seen, mut accepted) = mpsc::unbounded_channel();
    let listener = verge_discovery_sdk::uds::bind(&dir.path().join("agent-registration.sock"))
        .expect("bind registration socket");
    let (stop_registry, registry_stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Selective {
                accept: vec!["first"],
                seen,
            }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = registry_stopped.await;
            }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let handler = tokio::spawn(async move {
        args.run(
            vec![Arc::new(Idle("first")), Arc::new(Idle("second"))],
            async {
                let _ = stopped.await;
            },
        )
        .await
    });

    wait_for(address, "/healthz", 200).await;
    let first = tokio::time::timeout(DEADLINE, accepted.recv())
        .await
        .expect("first registered before the deadline")
        .expect("registry alive");
    assert_eq!(first, "first");
    assert_eq!(
        get(address, "/readyz").await.expect("readyz"),
        503,
        "ready although `second` is not registered"
    );
    for name in ["first", "second"] {
        assert!(dir.path().join(format!("{name}.sock")).exists());
    }

    let _ = stop_registry.send(());
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, handler)
        .await
        .expect("stopped before the deadline")
        .expect("task")
        .expect("clean shutdown");
    for name in ["first", "second"] {
        assert!(
            !dir.path().join(format!("{name}.sock")).exists(),
            "{name}.sock left behind"
        );
    }
}
