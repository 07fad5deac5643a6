//! A verge-controller host process for e2e tests, restricted to one namespace
//! (its Lease there too), so tests run side by side without seeing each other.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, ensure};

use crate::Cluster;

pub fn controller_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VERGE_CONTROLLER_BIN") {
        return Ok(PathBuf::from(path));
    }
    // This test runs from <target>/debug/deps; cargo puts the binary in <target>/debug.
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("verge-controller"))
        .context("locating the target directory")?;
    ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build -p verge-controller` (or `cargo test --workspace`)",
        bin.display()
    );
    Ok(bin)
}

/// A verge-controller host process; killed when dropped.
pub struct ControllerProcess {
    /// The process (tests kill it to exercise failover).
    pub child: tokio::process::Child,
    /// Its leader-election identity.
    pub identity: String,
    /// Port of its /metrics, /healthz and /readyz on 127.0.0.1.
    pub http_port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl ControllerProcess {
    /// Starts a controller watching `ns`; `extra` are more flags.
    pub async fn start(c: &Cluster, ns: &str, identity: &str, extra: &[&str]) -> Result<Self> {
        let http_port = free_port()?;
        let log = std::env::temp_dir().join(format!("verge-e2e-controller-{ns}-{identity}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let http_addr = format!("127.0.0.1:{http_port}");
        let mut args = vec![
            "--watch-namespace",
            ns,
            "--lease-namespace",
            ns,
            "--identity",
            identity,
            "--http-addr",
            &http_addr,
            "--reconcile-debounce",
            "200ms",
        ];
        // Lenient enough that a slow, busy API server does not cost the leadership mid-test;
        // the failover test passes shorter ones.
        if !extra.contains(&"--lease-duration") {
            args.extend_from_slice(&[
                "--lease-duration",
                "10s",
                "--lease-renew-deadline",
                "8s",
                "--lease-retry-period",
                "1s",
            ]);
        }
        args.extend_from_slice(extra);
        let child = tokio::process::Command::new(controller_bin()?)
            .args(&args)
            .env("KUBECONFIG", c.kubeconfig())
            .env("RUST_LOG", "info,verge_controller=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting verge-controller")?;
        Ok(Self {
            child,
            identity: identity.to_string(),
            http_port,
            log,
        })
    }

    /// GET `path` from its HTTP endpoint: (status, whole response).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.http_port, path).await
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A minimal HTTP/1.1 GET against 127.0.0.1:`port`.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((code, text))
}
