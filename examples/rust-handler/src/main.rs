//! `verge-example-handler`: a complete external discovery handler in ~100 lines.
//!
//! Handler name `fileGlob`. Every file in `directory` whose name matches
//! `pattern` (`*` matches any run of characters) is one device, e.g. serial
//! adapters with `{directory: /dev, pattern: "ttyUSB*"}`. Device nodes are
//! passed to brokers as device specs, other files as read-only mounts. The
//! directory is watched with `notify`, so devices appear and vanish live.
//! Start: `DISCOVERY_HANDLERS_DIRECTORY=/var/lib/akri verge-example-handler`.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use notify::Watcher;
use verge_discovery_sdk::{
    Device, DeviceSpec, DeviceStream, DiscoveryError, DiscoveryHandler, DiscoveryRequest,
    DiscoveryUpdate, Mount, Runner, RunnerConfig, parse_details,
};

/// The name Configurations use in `spec.discoveryHandler.name`.
const NAME: &str = "fileGlob";

/// discoveryDetails of a Configuration.
#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct Settings {
    directory: PathBuf,
    pattern: String,
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && matches(rest, &tail[i..]))
        }
    }
}

/// The full current device list. A device id must be stable and unique on the
/// node: here the file's name.
fn scan(s: &Settings) -> DiscoveryUpdate {
    let Ok(entries) = std::fs::read_dir(&s.directory) else {
        let dir = s.directory.display().to_string();
        return DiscoveryUpdate::devices(vec![]).with_diagnostic(
            dir,
            "Warning",
            "cannot read the directory",
        );
    };
    let mut devices: Vec<Device> = entries
        .flatten()
        .filter_map(|e| {
            let name = e
                .file_name()
                .into_string()
                .ok()
                .filter(|n| matches(&s.pattern, n))?;
            let path = e.path().display().to_string();
            let is_device = e
                .file_type()
                .is_ok_and(|t| t.is_char_device() || t.is_block_device());
            let (mounts, device_specs) = if is_device {
                (
                    vec![],
                    vec![DeviceSpec {
                        container_path: path.clone(),
                        host_path: path.clone(),
                        permissions: "rw".into(),
                    }],
                )
            } else {
                (
                    vec![Mount {
                        container_path: path.clone(),
                        host_path: path.clone(),
                        read_only: true,
                    }],
                    vec![],
                )
            };
            Some(Device {
                id: name,
                properties: [("FILE_GLOB_PATH".to_string(), path)].into(),
                mounts,
                device_specs,
            })
        })
        .collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    DiscoveryUpdate::devices(devices)
}

struct FileGlob;

impl DiscoveryHandler for FileGlob {
    fn name(&self) -> &str {
        NAME
    }

    fn shared(&self) -> bool {
        false // files on this node
    }

    fn discover(
        &self,
        request: DiscoveryRequest,
    ) -> BoxFuture<'static, Result<DeviceStream, DiscoveryError>> {
        async move {
            // Bad settings fail here, before the stream: the agent sees InvalidArgument.
            let s: Settings = parse_details(&request.details)?;
            if !s.directory.is_absolute() || s.pattern.is_empty() || s.pattern.contains('/') {
                return Err(DiscoveryError::InvalidSettings(
                    "need an absolute `directory` and a `pattern` without '/'".into(),
                ));
            }
            let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
            let mut watcher = notify::recommended_watcher(move |_| {
                let _ = events_tx.send(());
            })
            .map_err(|e| DiscoveryError::Unavailable(format!("cannot watch: {e}")))?;
            watch(&mut watcher, &s.directory)?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let _watcher = watcher; // dropped, and the watch stopped, when the consumer goes
                let mut last = None;
                loop {
                    let update = scan(&s);
                    if last.as_ref() != Some(&update) {
                        if tx.send(Ok(update.clone())).await.is_err() {
                            return;
                        }
                        last = Some(update);
                    }
                    tokio::select! {
                        event = events.recv() => if event.is_none() { return },
                        () = tx.closed() => return,
                    }
                }
            });
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as DeviceStream)
        }
        .boxed()
    }
}

fn watch(watcher: &mut notify::RecommendedWatcher, dir: &Path) -> Result<(), DiscoveryError> {
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| DiscoveryError::Unavailable(format!("cannot watch {}: {e}", dir.display())))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The Runner logs registrations and re-registrations; RUST_LOG=debug for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();
    // Serves on $DISCOVERY_HANDLERS_DIRECTORY/fileGlob.sock, registers on
    // agent-registration.sock there, and re-registers when the agent restarts.
    match Runner::new(Arc::new(FileGlob), RunnerConfig::from_env())
        .run_until_signal()
        .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-example-handler: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn glob() {
        assert!(matches("ttyUSB*", "ttyUSB0"));
        assert!(matches("*.img", "disk.img"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("ttyUSB*", "ttyS0"));
        assert!(!matches("a", "ab"));
    }

    fn request(details: String) -> DiscoveryRequest {
        DiscoveryRequest {
            details,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn live_full_lists_and_bad_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.img"), "").expect("write");
        std::fs::write(dir.path().join("b.txt"), "").expect("write");
        let details = format!("directory: {}\npattern: \"*.img\"", dir.path().display());
        let mut stream = FileGlob.discover(request(details)).await.expect("valid");
        let ids = |u: DiscoveryUpdate| u.devices.into_iter().map(|d| d.id).collect::<Vec<_>>();
        let first = stream.next().await.expect("a list").expect("ok");
        assert_eq!(first.devices[0].mounts.len(), 1);
        assert_eq!(ids(first), ["a.img"]);
        std::fs::write(dir.path().join("c.img"), "").expect("write");
        let next = stream.next().await.expect("a list").expect("ok");
        assert_eq!(ids(next), ["a.img", "c.img"]);

        for bad in [
            "directory: relative\npattern: x",
            "pattern: \"*\"",
            "nope: 1",
        ] {
            let err = FileGlob.discover(request(bad.into())).await.err();
            assert!(
                matches!(err, Some(DiscoveryError::InvalidSettings(_))),
                "{bad}: {err:?}"
            );
        }
    }
}
