//! Watches the availability file and turns its content into device lists.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
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

/// Whether an event can mean the file's content changed. Opening and reading it cannot, and must
/// not count: reading the file after every event would itself raise an open event, and the loop
/// would spin at full CPU for as long as the stream lives (inotify reports opens).
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Streams `devices` while the file does not say OFFLINE, and an empty list while it does.
pub fn watch(
    file: PathBuf,
    devices: Vec<Device>,
    diagnostics: Vec<Diagnostic>,
) -> Result<DeviceStream, DiscoveryError> {
    watch_counting(file, devices, diagnostics, Arc::default())
}

/// [`watch`], counting in `reads` how often the file is read.
fn watch_counting(
    file: PathBuf,
    devices: Vec<Device>,
    diagnostics: Vec<Diagnostic>,
    reads: Arc<AtomicU64>,
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
            Ok(e) => {
                may_change_content(&e.kind)
                    && e.paths.iter().any(|p| p.file_name() == Some(&file_name))
            }
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
            reads.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;

    #[test]
    fn only_events_that_can_change_the_content_count() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind};
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(may_change_content(&EventKind::Create(CreateKind::File)));
        assert!(may_change_content(&EventKind::Modify(ModifyKind::Any)));
        assert!(may_change_content(&EventKind::Remove(RemoveKind::File)));
    }

    /// Reading the file raises inotify open events; they must not make the watcher read it again
    /// (that loop once held two agents at full CPU and starved a 2-core test machine).
    #[tokio::test]
    async fn reading_the_file_does_not_wake_the_watcher() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("availability");
        std::fs::write(&file, "ONLINE").expect("write");
        let reads = Arc::new(AtomicU64::new(0));
        let mut stream =
            watch_counting(file.clone(), Vec::new(), Vec::new(), reads.clone()).expect("watch");
        stream.next().await.expect("first update").expect("ok");

        // Others reading the file (brokers, a second agent) must not wake it either.
        for _ in 0..20 {
            std::fs::read_to_string(&file).expect("read");
        }
        // A negative check needs a window: inotify delivers within milliseconds, and a spinning
        // watcher reads the file thousands of times in this time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle_reads = reads.load(Ordering::Relaxed);
        assert!(
            idle_reads <= 2,
            "the watcher read the file {idle_reads} times without any change"
        );

        // A real change still gets through.
        std::fs::write(&file, OFFLINE).expect("write");
        let update = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an update within 5 s")
            .expect("stream open")
            .expect("ok");
        assert!(update.devices.is_empty(), "OFFLINE gives an empty list");
    }
}
