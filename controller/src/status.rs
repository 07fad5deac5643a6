//! Status the controller owns on Instances and Configurations, computed from what it observed.
//! Pure functions: the reconcilers collect facts, these decide the conditions, and a status is
//! written only when [`StatusUpdate::changed`] says something differs.

use verge_crds::status::{condition_status, set_condition};
use verge_crds::{Condition, ConfigurationStatus, InstanceStatus, NodeDiscoveryStatus};

/// Condition on Instances: are this device's brokers up?
pub const BROKERS_READY: &str = "BrokersReady";
/// Condition on Configurations: is everything healthy?
pub const READY: &str = "Ready";
/// Condition on Configurations: do some devices lack a working broker?
pub const BROKERS_DEGRADED: &str = "BrokersDegraded";

/// What kind of broker a Configuration asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// No brokerSpec.
    None,
    /// brokerPodSpec.
    Pod,
    /// brokerJobSpec.
    Job,
}

/// Counts of brokers of one Instance or of a whole Configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerTally {
    /// Brokers that should exist.
    pub wanted: usize,
    /// Pods Running (or Jobs active or complete): what the `brokers` count shows.
    pub running: usize,
    /// Pods Running and Ready (or Jobs active or complete).
    pub ready: usize,
    /// Pods Failed/Succeeded awaiting replacement, or Jobs failed.
    pub ended: usize,
    /// Problems creating brokers (API refusals), for the condition message.
    pub create_failures: Vec<String>,
}

/// A status to write, and whether it differs from the current one.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate<S> {
    /// The controller-owned part of the status.
    pub status: S,
    /// Whether it differs from what the object has.
    pub changed: bool,
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The Instance's status: its `BrokersReady` condition, used slots and broker count.
pub fn instance_status(
    current: Option<&InstanceStatus>,
    used_slots: usize,
    kind: BrokerKind,
    tally: &BrokerTally,
    has_nodes: bool,
    now: &str,
) -> StatusUpdate<InstanceStatus> {
    let (status, reason, message) = match kind {
        BrokerKind::None => (
            condition_status::TRUE,
            "NoBrokerSpec",
            "the Configuration starts no brokers".to_string(),
        ),
        _ if !tally.create_failures.is_empty() => (
            condition_status::FALSE,
            "BrokerCreateFailed",
            tally.create_failures.join("; "),
        ),
        _ if !has_nodes => (
            condition_status::FALSE,
            "NoNodes",
            "no node currently sees the device".to_string(),
        ),
        _ if tally.ready >= tally.wanted => (
            condition_status::TRUE,
            "BrokersReady",
            format!("{} of {} brokers ready", tally.ready, tally.wanted),
        ),
        _ if tally.ended > 0 => (
            condition_status::FALSE,
            "BrokersFailed",
            format!(
                "{} of {} brokers ready; {} ended and will be replaced",
                tally.ready, tally.wanted, tally.ended
            ),
        ),
        _ => (
            condition_status::FALSE,
            "BrokersNotReady",
            format!("{} of {} brokers ready", tally.ready, tally.wanted),
        ),
    };
    let mut conditions = current.map(|s| s.conditions.clone()).unwrap_or_default();
    let condition_changed = set_condition(
        &mut conditions,
        Condition::new(BROKERS_READY, status, reason, message, now),
    );
    let new = InstanceStatus {
        conditions,
        used_slots: Some(count(used_slots)),
        brokers: Some(count(tally.running)),
    };
    let changed = condition_changed
        || current.is_none_or(|c| c.used_slots != new.used_slots || c.brokers != new.brokers);
    StatusUpdate {
        status: new,
        changed,
    }
}

/// What the Configuration reconciler observed.
#[derive(Clone, Debug, Default)]
pub struct ConfigurationFacts {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Number of Instances.
    pub instances: usize,
    /// Brokers of all Instances.
    pub brokers: BrokerTally,
    /// Whether the Configuration has a brokerSpec.
    pub has_broker_spec: bool,
    /// Problems the server-side dry-run found in the embedded specs.
    pub spec_problems: Vec<String>,
    /// Whether any agent has reported on this Configuration (`status.nodes`).
    pub agents_reported: bool,
    /// A problem the agents report (reason, message), from [`agent_problem`].
    pub agent_problem: Option<(String, String)>,
}

/// Agent node condition: names collide (across namespaces, or device hashes).
const NAME_CONFLICT: &str = "NameConflict";
/// Agent node condition: discovery runs and the handler answers.
const DISCOVERING: &str = "Discovering";

/// The problem the agents' `status.nodes` entries report, if any: a name conflict on any node,
/// or discovery failing on every node that reported (a handler present on only some nodes is
/// normal, so one node failing is not a problem of the Configuration).
pub fn agent_problem(nodes: &[NodeDiscoveryStatus]) -> Option<(String, String)> {
    let condition =
        |n: &NodeDiscoveryStatus, t: &str| n.conditions.iter().find(|c| c.type_ == t).cloned();
    if let Some((node, c)) = nodes.iter().find_map(|n| {
        condition(n, NAME_CONFLICT)
            .filter(|c| c.status == condition_status::TRUE)
            .map(|c| (n.node.clone(), c))
    }) {
        return Some((
            NAME_CONFLICT.to_string(),
            format!("node {node}: {}", c.message),
        ));
    }
    let failing: Vec<(String, Condition)> = nodes
        .iter()
        .filter_map(|n| {
            condition(n, DISCOVERING)
                .filter(|c| c.status == condition_status::FALSE)
                .map(|c| (n.node.clone(), c))
        })
        .collect();
    if !nodes.is_empty() && failing.len() == nodes.len() {
        let message = failing
            .iter()
            .map(|(node, c)| format!("node {node}: {}: {}", c.reason, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        return Some(("DiscoveryFailed".to_string(), message));
    }
    None
}

/// The controller-owned part of a Configuration's status (never `nodes`, which agents own).
pub fn configuration_status(
    current: Option<&ConfigurationStatus>,
    facts: &ConfigurationFacts,
    now: &str,
) -> StatusUpdate<ConfigurationStatus> {
    let tally = &facts.brokers;
    let degraded = facts.has_broker_spec && tally.ready < tally.wanted;
    let degraded_condition = if !facts.has_broker_spec {
        (
            condition_status::FALSE,
            "NoBrokerSpec",
            "the Configuration starts no brokers".to_string(),
        )
    } else if degraded {
        let reason = if !tally.create_failures.is_empty() {
            "BrokerCreateFailed"
        } else if tally.ended > 0 {
            "BrokersFailed"
        } else {
            "BrokersNotReady"
        };
        (
            condition_status::TRUE,
            reason,
            format!("{} of {} brokers ready", tally.ready, tally.wanted),
        )
    } else {
        (
            condition_status::FALSE,
            "AllBrokersReady",
            format!("{} of {} brokers ready", tally.ready, tally.wanted),
        )
    };
    let ready_condition = if !facts.spec_problems.is_empty() {
        (
            condition_status::FALSE,
            "InvalidSpec".to_string(),
            facts.spec_problems.join("; "),
        )
    } else if let Some((reason, message)) = facts.agent_problem.clone() {
        (condition_status::FALSE, reason, message)
    } else if degraded {
        (
            condition_status::FALSE,
            "BrokersDegraded".to_string(),
            format!(
                "{} of {} brokers ready on {} devices",
                tally.ready, tally.wanted, facts.instances
            ),
        )
    } else if facts.instances == 0 && !facts.agents_reported {
        (
            condition_status::UNKNOWN,
            "WaitingForAgents".to_string(),
            "no agent has reported discovery for this Configuration yet".to_string(),
        )
    } else if facts.instances == 0 {
        (
            condition_status::TRUE,
            "NoDevices".to_string(),
            "discovery runs; no device found".to_string(),
        )
    } else {
        (
            condition_status::TRUE,
            "Ready".to_string(),
            format!(
                "{} devices, {} brokers running",
                facts.instances, tally.running
            ),
        )
    };

    let mut conditions = current.map(|s| s.conditions.clone()).unwrap_or_default();
    let mut changed = false;
    let (status, reason, message) = degraded_condition;
    let degraded_condition = (status, reason.to_string(), message);
    for (type_, (status, reason, message)) in [
        (READY, ready_condition),
        (BROKERS_DEGRADED, degraded_condition),
    ] {
        let mut condition = Condition::new(type_, status, reason, message, now);
        condition.observed_generation = facts.generation;
        changed |= set_condition(&mut conditions, condition);
    }
    let new = ConfigurationStatus {
        observed_generation: facts.generation,
        conditions,
        instances: Some(count(facts.instances)),
        brokers: Some(count(tally.running)),
        nodes: Vec::new(),
    };
    changed |= current.is_none_or(|c| {
        c.observed_generation != new.observed_generation
            || c.instances != new.instances
            || c.brokers != new.brokers
    });
    StatusUpdate {
        status: new,
        changed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn instance_status_reports_brokers_and_slots() {
        let tally = BrokerTally {
            wanted: 2,
            running: 2,
            ready: 1,
            ..Default::default()
        };
        let first = instance_status(None, 1, BrokerKind::Pod, &tally, true, "t1");
        assert!(first.changed);
        assert_eq!(first.status.used_slots, Some(1));
        assert_eq!(first.status.brokers, Some(2));
        let c = condition(&first.status.conditions, BROKERS_READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "BrokersNotReady")
        );

        // Same facts later: nothing to write.
        let again = instance_status(Some(&first.status), 1, BrokerKind::Pod, &tally, true, "t2");
        assert!(!again.changed);

        let all = BrokerTally {
            ready: 2,
            ..tally.clone()
        };
        let ready = instance_status(Some(&first.status), 1, BrokerKind::Pod, &all, true, "t3");
        assert!(ready.changed);
        let c = condition(&ready.status.conditions, BROKERS_READY);
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.as_str()),
            ("True", "t3")
        );

        let failed = BrokerTally {
            ended: 1,
            ..tally.clone()
        };
        let s = instance_status(None, 0, BrokerKind::Pod, &failed, true, "t");
        assert_eq!(
            condition(&s.status.conditions, BROKERS_READY).reason,
            "BrokersFailed"
        );
        let refused = BrokerTally {
            create_failures: vec!["denied".into()],
            ..tally
        };
        let s = instance_status(None, 0, BrokerKind::Pod, &refused, true, "t");
        let c = condition(&s.status.conditions, BROKERS_READY);
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("BrokerCreateFailed", "denied")
        );
        let s = instance_status(
            None,
            0,
            BrokerKind::None,
            &BrokerTally::default(),
            true,
            "t",
        );
        assert_eq!(
            condition(&s.status.conditions, BROKERS_READY).status,
            "True"
        );
        let s = instance_status(
            None,
            0,
            BrokerKind::Pod,
            &BrokerTally::default(),
            false,
            "t",
        );
        assert_eq!(
            condition(&s.status.conditions, BROKERS_READY).reason,
            "NoNodes"
        );
    }

    fn node(name: &str, conditions: &[(&str, &str)]) -> NodeDiscoveryStatus {
        NodeDiscoveryStatus {
            node: name.into(),
            conditions: conditions
                .iter()
                .map(|(t, s)| Condition::new(*t, *s, "R", "m", "t"))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn agent_problems_are_a_conflict_anywhere_or_discovery_failing_everywhere() {
        assert_eq!(agent_problem(&[]), None);
        let ok = node("n1", &[("Discovering", "True")]);
        let failing = node("n2", &[("Discovering", "False")]);
        assert_eq!(agent_problem(&[ok.clone(), failing.clone()]), None);
        let (reason, message) = agent_problem(std::slice::from_ref(&failing)).unwrap();
        assert_eq!(
            (reason.as_str(), message.as_str()),
            ("DiscoveryFailed", "node n2: R: m")
        );
        let conflict = node("n3", &[("Discovering", "True"), ("NameConflict", "True")]);
        assert_eq!(agent_problem(&[ok, conflict]).unwrap().0, "NameConflict");
    }

    #[test]
    fn configuration_conditions_tell_what_is_happening() {
        let mut facts = ConfigurationFacts {
            generation: Some(3),
            has_broker_spec: true,
            ..Default::default()
        };
        let s = configuration_status(None, &facts, "t").status;
        assert_eq!(condition(&s.conditions, READY).reason, "WaitingForAgents");
        assert_eq!(condition(&s.conditions, READY).status, "Unknown");
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.nodes.is_empty());

        facts.agents_reported = true;
        let s = configuration_status(None, &facts, "t").status;
        assert_eq!(condition(&s.conditions, READY).reason, "NoDevices");

        facts.instances = 2;
        facts.brokers = BrokerTally {
            wanted: 2,
            running: 2,
            ready: 1,
            ..Default::default()
        };
        let s = configuration_status(None, &facts, "t").status;
        let ready = condition(&s.conditions, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BrokersDegraded")
        );
        let degraded = condition(&s.conditions, BROKERS_DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "BrokersNotReady")
        );
        assert_eq!(degraded.observed_generation, Some(3));
        assert_eq!((s.instances, s.brokers), (Some(2), Some(2)));

        facts.brokers.ready = 2;
        let healthy = configuration_status(Some(&s), &facts, "t2");
        assert!(healthy.changed);
        let ready = condition(&healthy.status.conditions, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Ready")
        );
        assert!(!configuration_status(Some(&healthy.status), &facts, "t3").changed);

        facts.spec_problems = vec!["brokerPodSpec: image required".into()];
        let s = configuration_status(Some(&healthy.status), &facts, "t4").status;
        let ready = condition(&s.conditions, READY);
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            ("InvalidSpec", "brokerPodSpec: image required")
        );

        // Agents' problems show on Ready.
        facts.spec_problems.clear();
        facts.agent_problem = Some(("NameConflict".into(), "node n1: taken".into()));
        let s = configuration_status(Some(&s), &facts, "t5").status;
        assert_eq!(condition(&s.conditions, READY).reason, "NameConflict");
        facts.agent_problem = None;

        // A new generation alone is a change.
        let mut newer = facts.clone();
        newer.generation = Some(4);
        assert!(configuration_status(Some(&s), &newer, "t5").changed);
    }
}
