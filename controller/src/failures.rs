//! Per-broker memory of failures, so a broker that keeps ending is replaced with a capped
//! exponential backoff instead of in a hot loop. Lives in memory only: after a restart or a
//! leader change the count starts again, which at worst costs one short delay.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::brokers::Backoff;

#[derive(Debug)]
struct Entry {
    /// Consecutive endings of brokers under this name.
    attempts: u32,
    /// UID of the ended Pod the current delay was started for.
    uid: String,
    /// When that Pod was first seen ended.
    seen_at: Instant,
}

/// Failure counts keyed by broker (`<namespace>/<pod name>`).
#[derive(Debug, Default)]
pub struct FailureBook {
    entries: Mutex<HashMap<String, Entry>>,
}

impl FailureBook {
    /// Records that the Pod `uid` under `key` has ended. Returns `None` when it may be replaced
    /// now, or how long to wait.
    pub fn ended(&self, key: &str, uid: &str, now: Instant, backoff: &Backoff) -> Option<Duration> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(key.to_string()).or_insert_with(|| Entry {
            attempts: 0,
            uid: String::new(),
            seen_at: now,
        });
        if entry.uid != uid {
            entry.attempts = entry.attempts.saturating_add(1);
            entry.uid = uid.to_string();
            entry.seen_at = now;
        }
        let due = entry.seen_at + backoff.delay(entry.attempts);
        (due > now).then(|| due - now)
    }

    /// Forgets the failures of `key`: its broker has been running long enough to count as healthy.
    pub fn healthy(&self, key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Consecutive failures recorded for `key`.
    #[cfg(test)]
    pub fn attempts(&self, key: &str) -> u32 {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map_or(0, |e| e.attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_new_failure_waits_longer_and_health_resets() {
        let book = FailureBook::default();
        let backoff = Backoff {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(12),
        };
        let t0 = Instant::now();
        assert_eq!(
            book.ended("ns/p", "u1", t0, &backoff),
            Some(Duration::from_secs(5))
        );
        // The same ended Pod seen again does not count twice.
        assert_eq!(
            book.ended("ns/p", "u1", t0 + Duration::from_secs(2), &backoff),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            book.ended("ns/p", "u1", t0 + Duration::from_secs(5), &backoff),
            None
        );
        // Its replacement fails too: twice the delay.
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(
            book.ended("ns/p", "u2", t1, &backoff),
            Some(Duration::from_secs(10))
        );
        assert_eq!(book.attempts("ns/p"), 2);
        // Capped.
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(
            book.ended("ns/p", "u3", t2, &backoff),
            Some(Duration::from_secs(12))
        );
        book.healthy("ns/p");
        assert_eq!(book.attempts("ns/p"), 0);
        assert_eq!(
            book.ended("ns/p", "u4", t2, &backoff),
            Some(Duration::from_secs(5))
        );
    }
}
