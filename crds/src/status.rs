//! Status building blocks shared by both kinds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A condition in the shape of `metav1.Condition`, so `kubectl wait
/// --for=condition=Ready` and every tool that reads standard conditions work.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Kind of condition in CamelCase, e.g. `Ready`, `BrokersDegraded`, `DiscoveryFailed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// One of `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable explanation; never contains secret values.
    #[serde(default)]
    pub message: String,
    /// When the condition last changed status (RFC 3339).
    #[schemars(schema_with = "crate::schema::date_time")]
    pub last_transition_time: String,
    /// The `.metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition status values.
pub mod condition_status {
    /// The condition holds.
    pub const TRUE: &str = "True";
    /// The condition does not hold.
    pub const FALSE: &str = "False";
    /// Not known yet.
    pub const UNKNOWN: &str = "Unknown";
}

impl Condition {
    /// Builds a condition; `now` is the RFC 3339 transition time.
    pub fn new(
        type_: impl Into<String>,
        status: impl Into<String>,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now.into(),
            observed_generation: None,
        }
    }

    /// Whether two conditions say the same thing (ignoring the transition time),
    /// so writers keep the old timestamp and avoid needless status writes.
    pub fn same_state(&self, other: &Condition) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

/// Replaces the condition of the same type in `conditions`, keeping its
/// `lastTransitionTime` when the status did not change. Returns whether
/// anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) if existing.same_state(&new) => false,
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conditions = vec![Condition::new("Ready", "True", "A", "m", "t1")];
        assert!(!set_condition(
            &mut conditions,
            Condition::new("Ready", "True", "A", "m", "t2")
        ));
        assert!(set_condition(
            &mut conditions,
            Condition::new("Ready", "True", "B", "m2", "t3")
        ));
        assert_eq!(conditions[0].last_transition_time, "t1");
        assert_eq!(conditions[0].reason, "B");
        assert!(set_condition(
            &mut conditions,
            Condition::new("Ready", "False", "C", "", "t4")
        ));
        assert_eq!(conditions[0].last_transition_time, "t4");
        assert!(set_condition(
            &mut conditions,
            Condition::new("Other", "False", "C", "", "t5")
        ));
        assert_eq!(conditions.len(), 2);
    }
}
