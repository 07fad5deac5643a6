//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas are safe: only the
//! holder runs the controllers. Updates use the Lease's resourceVersion (optimistic
//! concurrency), so two candidates can never both win the same round. Expiry is judged by the
//! candidate's own clock from when it last saw the Lease change, as client-go does, so clock
//! skew between machines does not matter.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::info;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a holder is trusted without renewing.
    pub duration: Duration,
    /// Whether a missing Lease is created (else: waited for, as nobody's).
    pub create: bool,
}

/// What a candidate last saw in the Lease and when.
#[derive(Clone, Debug, PartialEq)]
struct Observation {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// Whether `identity` may take the Lease now: nobody holds it, we hold it, or the holder's
/// record has not changed for a whole lease duration.
pub fn may_take(
    holder: Option<&str>,
    identity: &str,
    unchanged_since: Instant,
    duration: Duration,
    now: Instant,
) -> bool {
    match holder {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => now.saturating_duration_since(unchanged_since) >= duration,
    }
}

/// The Lease after `identity` takes or renews it.
pub fn claimed(current: Option<&Lease>, settings: &LeaseSettings, now: Timestamp) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let old = lease.spec.clone().unwrap_or_default();
    let taking = old.holder_identity.as_deref() != Some(settings.identity.as_str());
    let had_holder = old
        .holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(settings.duration.as_secs().max(1)).unwrap_or(i32::MAX),
        ),
        acquire_time: if taking {
            Some(MicroTime(now))
        } else {
            old.acquire_time.clone()
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            old.lease_transitions.unwrap_or(0) + i32::from(taking && had_holder),
        ),
        ..old
    });
    lease
}

/// Takes part in the election for one Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observation>,
}

impl Elector {
    /// A candidate for the Lease behind `api` (namespaced).
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Self {
            api,
            settings,
            observed: None,
        }
    }

    /// Takes or renews the Lease. `Ok(true)`: we hold it now; `Ok(false)`: someone else does.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let current = self.api.get_opt(&self.settings.name).await?;
        if let Some(lease) = &current {
            let spec = lease.spec.clone().unwrap_or_default();
            let record = (spec.holder_identity.clone(), spec.renew_time.clone());
            if self.observed.as_ref().is_none_or(|o| o.record != record) {
                self.observed = Some(Observation { record, at: now });
            }
            let since = self.observed.as_ref().map_or(now, |o| o.at);
            if !may_take(
                spec.holder_identity.as_deref(),
                &self.settings.identity,
                since,
                self.settings.duration,
                now,
            ) {
                return Ok(false);
            }
        }
        if current.is_none() && !self.settings.create {
            // Its owner (the chart) has not created it yet: nobody leads until it exists.
            return Ok(false);
        }
        let lease = claimed(current.as_ref(), &self.settings, Timestamp::now());
        let result = match current {
            None => self.api.create(&PostParams::default(), &lease).await,
            Some(_) => {
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                self.observed = Some(Observation {
                    record: (spec.holder_identity, spec.renew_time),
                    at: now,
                });
                Ok(true)
            }
            // Someone else wrote first (create raced, or the resourceVersion moved on).
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over at once instead of after the
    /// lease duration.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await?;
        info!(
            identity = self.settings.identity,
            "released the leader Lease"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings {
            name: "verge-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            create: true,
        }
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stops_changing_for_a_duration() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        assert!(may_take(None, "b", t0, d, t0));
        assert!(may_take(Some(""), "b", t0, d, t0));
        assert!(may_take(Some("b"), "b", t0, d, t0));
        assert!(!may_take(
            Some("a"),
            "b",
            t0,
            d,
            t0 + Duration::from_secs(14)
        ));
        assert!(may_take(
            Some("a"),
            "b",
            t0,
            d,
            t0 + Duration::from_secs(15)
        ));
    }

    #[test]
    fn claiming_sets_holder_times_and_transitions() {
        let now = Timestamp::now();
        let fresh = claimed(None, &settings("a"), now);
        let spec = fresh.spec.clone().unwrap();
        assert_eq!(fresh.metadata.name.as_deref(), Some("verge-controller"));
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));

        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(2);
        let renewed = claimed(Some(&fresh), &settings("a"), later).spec.unwrap();
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.lease_transitions, Some(0));

        let taken = claimed(Some(&fresh), &settings("b"), later).spec.unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(later)));
        assert_eq!(taken.lease_transitions, Some(1));
    }
}
