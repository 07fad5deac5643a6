//! A tiny broker for cluster tests.
//!
//! * `verge-test-broker` (no arguments): prints its environment (sorted, one `KEY=VALUE` a line),
//!   then serves it over HTTP on `BROKER_PORT` (default 8080): `GET /` or `/env` gives the whole
//!   environment, `/env/NAME` one value (404 if unset), `/healthz` gives `ok`. SIGTERM or SIGINT
//!   end it at once with status 0, also as PID 1 in a container.
//! * `verge-test-broker env`: prints the environment and exits.
//! * `verge-test-broker get URL`: HTTP GET of an `http://host[:port]/path` URL (the host is resolved
//!   with the system resolver, so Service names work in a pod); prints the body; exits 1 unless 200.
//! * `verge-test-broker resolve NAME`: prints the addresses NAME resolves to; exits 1 if none.
//! * `verge-test-broker cat PATH`: prints a file (e.g. from a hostPath volume).
//! * `verge-test-broker tcp HOST:PORT`: opens a TCP connection (5 s timeout), prints `connected ADDR`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(5);

fn env_text() -> String {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("env") => {
            print!("{}", env_text());
            Ok(())
        }
        Some("get") => match args.get(1) {
            Some(url) => get(url).map(|body| print!("{body}")),
            None => Err("usage: verge-test-broker get URL".to_string()),
        },
        Some("tcp") => match args.get(1) {
            Some(target) => tcp(target),
            None => Err("usage: verge-test-broker tcp HOST:PORT".to_string()),
        },
        Some("cat") => match args.get(1) {
            Some(path) => std::fs::read_to_string(path)
                .map(|text| print!("{text}"))
                .map_err(|e| format!("read {path}: {e}")),
            None => Err("usage: verge-test-broker cat PATH".to_string()),
        },
        Some("resolve") => match args.get(1) {
            Some(name) => resolve(name),
            None => Err("usage: verge-test-broker resolve NAME".to_string()),
        },
        Some(other) => Err(format!(
            "unknown command {other:?} (commands: serve, env, get URL, resolve NAME, cat PATH, tcp HOST:PORT)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-test-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> Result<(), String> {
    let port = match std::env::var("BROKER_PORT") {
        Ok(p) => p
            .parse::<u16>()
            .map_err(|e| format!("BROKER_PORT={p:?}: {e}"))?,
        Err(_) => DEFAULT_PORT,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
        let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .await
            .map_err(|e| format!("listen on port {port}: {e}"))?;
        print!("{}", env_text());
        println!("verge-test-broker: serving the environment on port {port}");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => { tokio::spawn(handle(stream)); }
                    Err(e) => eprintln!("verge-test-broker: accept: {e}"),
                },
            }
        }
        println!("verge-test-broker: signal received, exiting");
        Ok(())
    })
}

async fn handle(mut stream: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read until the end of the request head (or the buffer is full).
    while len < buf.len() {
        let read = tokio::time::timeout(TIMEOUT, stream.read(&mut buf[len..])).await;
        match read {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/" | "/env" => ("200 OK", env_text()),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        p if p.starts_with("/env/") => match std::env::var(&p["/env/".len()..]) {
            Ok(v) => ("200 OK", format!("{v}\n")),
            Err(_) => ("404 Not Found", "not set\n".to_string()),
        },
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn resolve(name: &str) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = (name, 0)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {name}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{name} resolved to no address"));
    }
    let mut ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    ips.sort();
    ips.dedup();
    for ip in ips {
        println!("{ip}");
    }
    Ok(())
}

fn tcp(target: &str) -> Result<(), String> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolved to no address"))?;
    TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    println!("connected {addr}");
    Ok(())
}

fn get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|e| format!("bad port in {url}: {e}"))?,
        ),
        None => (authority, 80),
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolved to no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response from {addr}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.to_string())
}
