//! Network endpoints over TLS: a handler served by `Runner` on `https://127.0.0.1:<port>` and
//! dialled by `RemoteHandler`, with and without the right CA and client certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use verge_discovery_sdk::runner::ServeEndpoint;
use verge_discovery_sdk::{
    Device, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest, DiscoveryUpdate,
    HandlerEndpoint, RemoteHandler, Runner, RunnerConfig, tls,
};

/// One fixed device, for as long as the stream is read.
struct OneDevice;

impl DiscoveryHandler for OneDevice {
    fn name(&self) -> &str {
        "tlsTest"
    }
    fn shared(&self) -> bool {
        false
    }
    fn discover(
        &self,
        _request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        Box::pin(async {
            let device = Device {
                id: "tls-device".into(),
                ..Default::default()
            };
            let first = futures::stream::iter([Ok(DiscoveryUpdate::devices(vec![device]))]);
            Ok(Box::pin(first.chain(futures::stream::pending())) as DeviceStream)
        })
    }
}

/// A CA, and a certificate it signed for `sans`; PEM files written to `dir/<name>.{crt,key}`.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca cert");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write ca");
        Pki {
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, dir: &Path, name: &str, sans: &[&str]) {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Serves `OneDevice` over TLS (client certificates from `client_ca` required when given);
/// returns the URL. The runner finds no agent socket and simply keeps waiting for one.
async fn serve(dir: &Path, client_ca: Option<&Path>) -> String {
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let config = RunnerConfig {
        directory: dir.join("no-agent"),
        endpoint: ServeEndpoint::Network {
            bind: ([127, 0, 0, 1], port).into(),
            advertise: url.clone(),
        },
        tls: Some(
            tls::server_config(&dir.join("server.crt"), &dir.join("server.key"), client_ca)
                .expect("server tls"),
        ),
        ..RunnerConfig::default()
    };
    tokio::spawn(Runner::new(Arc::new(OneDevice), config).run(futures::future::pending()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handler never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    url
}

async fn first_ids(url: &str, tls: tls::ClientTlsConfig) -> Result<Vec<String>, String> {
    let remote = RemoteHandler::new("tlsTest", false, HandlerEndpoint::Network(url.into()))
        .with_connect_timeout(Duration::from_secs(5))
        .with_tls(Some(tls));
    let mut stream = remote
        .discover(DiscoveryRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(update))) => Ok(update.devices.into_iter().map(|d| d.id).collect()),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(None) => Err("stream ended".into()),
        Err(_) => Err("no update within 10s".into()),
    }
}

#[tokio::test]
async fn https_endpoint_with_the_right_ca_is_discovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    Pki::new(d, "ca").issue(d, "server", &["127.0.0.1"]);
    let url = serve(d, None).await;

    let trusted = tls::client_config(Some(&d.join("ca.crt")), None, None).expect("client tls");
    assert_eq!(
        first_ids(&url, trusted).await,
        Ok(vec!["tls-device".into()])
    );

    // A CA that did not sign the handler's certificate must not be trusted.
    let other = tempfile::tempdir().expect("tempdir");
    Pki::new(other.path(), "ca");
    let wrong = tls::client_config(Some(&other.path().join("ca.crt")), None, None).expect("tls");
    let err = first_ids(&url, wrong).await.expect_err("wrong CA accepted");
    assert!(!err.is_empty());
}

#[tokio::test]
async fn mutual_tls_requires_the_agents_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = Pki::new(d, "ca");
    pki.issue(d, "server", &["127.0.0.1"]);
    pki.issue(d, "agent", &["verge-agent"]);
    let url = serve(d, Some(&d.join("ca.crt"))).await;

    let ca = d.join("ca.crt");
    let with_cert = tls::client_config(
        Some(&ca),
        Some(&d.join("agent.crt")),
        Some(&d.join("agent.key")),
    )
    .expect("client tls");
    assert_eq!(
        first_ids(&url, with_cert).await,
        Ok(vec!["tls-device".into()])
    );

    let without_cert = tls::client_config(Some(&ca), None, None).expect("client tls");
    first_ids(&url, without_cert)
        .await
        .expect_err("a client without a certificate was served");
}

#[test]
fn bad_tls_material_is_refused_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    assert!(matches!(
        tls::client_config(Some(&junk), None, None),
        Err(tls::TlsError::NotPem(_))
    ));
    assert!(matches!(
        tls::client_config(None, Some(&junk), None),
        Err(tls::TlsError::CertWithoutKey)
    ));
    assert!(matches!(
        tls::server_config(&dir.path().join("missing.crt"), &junk, None),
        Err(tls::TlsError::Read { .. })
    ));
}

#[tokio::test]
async fn advertising_https_without_a_certificate_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = RunnerConfig {
        directory: dir.path().to_path_buf(),
        endpoint: ServeEndpoint::Network {
            bind: ([127, 0, 0, 1], port).into(),
            advertise: format!("https://127.0.0.1:{port}"),
        },
        ..RunnerConfig::default()
    };
    let err = Runner::new(Arc::new(OneDevice), config)
        .run(futures::future::pending())
        .await
        .expect_err("https without TLS accepted");
    assert!(err.to_string().contains("needs a TLS certificate"), "{err}");
}
