//! Watches the availability file and turns its content into device lists.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use verge_discovery_sdk::{Device, DeviceStream, Diagnostic, DiscoveryError, DiscoveryUpdate};

use crate::OFFLINE;

/// Buffered updates per stream; a slow consumer only ever needs the latest.
const UPDATE_BUFFER: usize = 4;

/// Whether the file says the devices are online. A missing or unreadable file
/// means online, as in Akri.
async fn is_online(file: &Path) -> bool {
    match tokio::fs::read_to_string(file).await {
        Ok(content) => content.trim() != OFFLINE,
        Err(_) => true,
    }
}

/// Streams `devices` while the file does not say OFFLINE, and an empty list while it does.
pub fn watch(
    file: PathBuf,
    devices: Vec<Device>,
    diagnostics: Vec<Diagnostic>,
) -> Result<DeviceStream, DiscoveryError> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let Some(file_name) = file.file_name().map(|n| n.to_os_string()) else {
        return Err(DiscoveryError::InvalidSettings(format!(
            "availabilityFile {} names no file",
            file.display()
        )));
    };
    if !dir.is_dir() {
        return Err(DiscoveryError::InvalidSettings(format!(
            "availabilityFile {}: directory {} does not exist",
            file.display(),
            dir.display()
        )));
    }

    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only our file matters; the directory may be busy (/tmp).
        let relevant = match &event {
            Ok(e) => e.paths.iter().any(|p| p.file_name() == Some(&file_name)),
            Err(_) => true,
        };
        if relevant {
            let _ = event_tx.send(());
        }
    })
    .map_err(|e| DiscoveryError::Unavailable(format!("cannot watch {}: {e}", dir.display())))?;
    // Watching the directory (not the file) sees the file being created,
    // replaced by rename, or deleted.
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| DiscoveryError::Unavailable(format!("cannot watch {}: {e}", dir.display())))?;

    let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
    tokio::spawn(async move {
        // The watcher lives as long as this task, which ends when the consumer goes away.
        let _watcher = watcher;
        let mut last: Option<bool> = None;
        loop {
            let online = is_online(&file).await;
            if last != Some(online) {
                last = Some(online);
                let list = if online { devices.clone() } else { Vec::new() };
                tracing::debug!(file = %file.display(), online, "availability changed");
                let update = DiscoveryUpdate {
                    devices: list,
                    diagnostics: diagnostics.clone(),
                };
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                event = event_rx.recv() => if event.is_none() { break },
                _ = tx.closed() => break,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
