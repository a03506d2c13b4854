//! Instance and job statuses, spelled exactly as Oakestra spells them, and the transitions between them.
//!
//! The strings are a wire contract: they travel in MQTT `job` reports, cluster reports to root and the user API.
//! The transition table is ours: it is the reference's lifecycle plus the rescheduling edges the reference lacks
//! (every non-terminal state can go back to `REQUESTED`, so nothing is stuck forever — Oakestra issue #419).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The lifecycle state of one service instance (and, aggregated, of a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    // Positive scheduling.
    /// The user asked for an instance; no placement yet.
    Requested,
    /// Root picked a cluster.
    ClusterScheduled,
    /// The cluster picked a worker and sent it the deploy command.
    NodeScheduled,
    // Negative scheduling (root tier).
    /// A `direct` constraint names a cluster that does not exist.
    TargetClusterNotFound,
    /// No active cluster (or the `direct` target is inactive).
    TargetClusterNotActive,
    /// The `direct` target cluster has no capacity.
    TargetClusterNoCapacity,
    /// No active cluster has the capacity.
    NoActiveClusterWithCapacity,
    // Negative scheduling (cluster tier).
    /// No worker in the cluster has the capacity.
    NoWorkerCapacity,
    /// No worker satisfies the constraints (virtualization, arch, addons, …).
    NoQualifiedWorkerFound,
    /// A `direct` node list names no known worker.
    NoNodeFound,
    // Deployment.
    /// The worker is creating the instance (pulling, unpacking).
    Creating,
    /// The worker created the instance; it is starting.
    Created,
    /// The instance runs (set by the cluster on the first resource report).
    Running,
    /// The deployment failed or the instance was lost (e.g. its worker died).
    Failed,
    /// The instance exited (non-zero, or zero for a service that is not one-shot).
    Dead,
    /// A one-shot instance exited with code 0. Terminal: never rescheduled.
    Completed,
    /// The instance was removed on request. Terminal.
    Undeployed,
    /// Legacy job status `"0"` that old clusters send when no status was ever set.
    Legacy0,
    /// Legacy job status `"1"`, as above.
    Legacy1,
}

/// The status string was not one of Oakestra's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {value:?}")]
pub struct UnknownStatus {
    /// What was received.
    pub value: String,
}

impl Status {
    /// Every status, in lifecycle order (for tests and documentation).
    pub const ALL: [Status; 19] = [
        Status::Requested,
        Status::ClusterScheduled,
        Status::NodeScheduled,
        Status::TargetClusterNotFound,
        Status::TargetClusterNotActive,
        Status::TargetClusterNoCapacity,
        Status::NoActiveClusterWithCapacity,
        Status::NoWorkerCapacity,
        Status::NoQualifiedWorkerFound,
        Status::NoNodeFound,
        Status::Creating,
        Status::Created,
        Status::Running,
        Status::Failed,
        Status::Dead,
        Status::Completed,
        Status::Undeployed,
        Status::Legacy0,
        Status::Legacy1,
    ];

    /// The exact wire string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "REQUESTED",
            Status::ClusterScheduled => "CLUSTER_SCHEDULED",
            Status::NodeScheduled => "NODE_SCHEDULED",
            Status::TargetClusterNotFound => "TargetClusterNotFound",
            Status::TargetClusterNotActive => "TargetClusterNotActive",
            Status::TargetClusterNoCapacity => "TargetClusterNoCapacity",
            Status::NoActiveClusterWithCapacity => "NoActiveClusterWithCapacity",
            Status::NoWorkerCapacity => "NO_WORKER_CAPACITY",
            Status::NoQualifiedWorkerFound => "NO_QUALIFIED_WORKER_FOUND",
            Status::NoNodeFound => "NO_NODE_FOUND",
            Status::Creating => "CREATING",
            Status::Created => "CREATED",
            Status::Running => "RUNNING",
            Status::Failed => "FAILED",
            Status::Dead => "DEAD",
            Status::Completed => "COMPLETED",
            Status::Undeployed => "UNDEPLOYED",
            Status::Legacy0 => "0",
            Status::Legacy1 => "1",
        }
    }

    /// `REQUESTED`, `CLUSTER_SCHEDULED`, `NODE_SCHEDULED`: a placement is under way.
    pub const fn is_positive_scheduling(self) -> bool {
        matches!(
            self,
            Status::Requested | Status::ClusterScheduled | Status::NodeScheduled
        )
    }

    /// A scheduler could not place the instance; it may be retried.
    pub const fn is_negative_scheduling(self) -> bool {
        matches!(
            self,
            Status::TargetClusterNotFound
                | Status::TargetClusterNotActive
                | Status::TargetClusterNoCapacity
                | Status::NoActiveClusterWithCapacity
                | Status::NoWorkerCapacity
                | Status::NoQualifiedWorkerFound
                | Status::NoNodeFound
        )
    }

    /// `FAILED` and `DEAD`: the instance ended without being asked to (it is placed again after a back-off).
    pub const fn is_failure(self) -> bool {
        matches!(self, Status::Failed | Status::Dead)
    }

    /// `COMPLETED` and `UNDEPLOYED`: nothing happens to the instance any more.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Undeployed)
    }

    /// The instance holds resources on a worker (counted against its capacity).
    pub const fn occupies_worker(self) -> bool {
        matches!(
            self,
            Status::NodeScheduled | Status::Creating | Status::Created | Status::Running
        )
    }

    /// The instance needs a new placement: the self-healing loop sends it back to `REQUESTED`.
    /// `COMPLETED` (one-shot success) is never rescheduled.
    pub const fn needs_reschedule(self) -> bool {
        matches!(self, Status::Failed | Status::Dead) || self.is_negative_scheduling()
    }

    /// Whether `self → to` is an allowed transition. Staying in the same state is always allowed (reports repeat).
    ///
    /// Beyond the reference: any non-terminal state may return to `REQUESTED` (rescheduling after a deadline, a
    /// dead worker or a cluster that cannot place it), and any non-terminal state may become `FAILED`.
    pub fn can_transition(self, to: Status) -> bool {
        use Status::*;
        if self == to {
            return true;
        }
        if self.is_terminal() {
            // A completed one-shot can still be removed; nothing else leaves a terminal state.
            return self == Completed && to == Undeployed;
        }
        if matches!(to, Requested | Failed | Undeployed) {
            return true;
        }
        match self {
            Legacy0 | Legacy1 => true,
            Requested => {
                matches!(
                    to,
                    ClusterScheduled
                        | TargetClusterNotFound
                        | TargetClusterNotActive
                        | TargetClusterNoCapacity
                        | NoActiveClusterWithCapacity
                )
            }
            ClusterScheduled => matches!(
                to,
                NodeScheduled | NoWorkerCapacity | NoQualifiedWorkerFound | NoNodeFound
            ),
            // A fast worker may report CREATED, RUNNING or even the exit before the cluster saw CREATING.
            NodeScheduled | Creating => matches!(to, Creating | Created | Running | Dead | Completed),
            Created => matches!(to, Running | Dead | Completed),
            Running => matches!(to, Dead | Completed),
            // Negative scheduling and FAILED/DEAD only go back to REQUESTED (handled above).
            _ => false,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus { value: s.to_owned() })
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::{Status::*, *};

    #[test]
    fn strings_are_the_reference_spelling() {
        let expected = [
            "REQUESTED",
            "CLUSTER_SCHEDULED",
            "NODE_SCHEDULED",
            "TargetClusterNotFound",
            "TargetClusterNotActive",
            "TargetClusterNoCapacity",
            "NoActiveClusterWithCapacity",
            "NO_WORKER_CAPACITY",
            "NO_QUALIFIED_WORKER_FOUND",
            "NO_NODE_FOUND",
            "CREATING",
            "CREATED",
            "RUNNING",
            "FAILED",
            "DEAD",
            "COMPLETED",
            "UNDEPLOYED",
            "0",
            "1",
        ];
        let got: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(got, expected);
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
        }
    }

    #[test]
    fn unknown_status_names_the_value() {
        let err = "running".parse::<Status>().unwrap_err();
        assert_eq!(err.to_string(), "unknown status \"running\"");
        assert!(serde_json::from_str::<Status>("\"BOGUS\"").is_err());
        assert!(serde_json::from_str::<Status>("3").is_err());
    }

    #[test]
    fn happy_path_is_allowed() {
        let path = [
            Requested,
            ClusterScheduled,
            NodeScheduled,
            Created,
            Running,
            Dead,
            Requested,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_transition(w[1]), "{} -> {}", w[0], w[1]);
        }
        assert!(Running.can_transition(Completed));
        assert!(Completed.can_transition(Undeployed));
    }

    #[test]
    fn terminal_states_stay_terminal() {
        for to in Status::ALL {
            if to != Undeployed && to != Completed {
                assert!(!Completed.can_transition(to), "COMPLETED -> {to}");
            }
            if to != Undeployed {
                assert!(!Undeployed.can_transition(to), "UNDEPLOYED -> {to}");
            }
        }
        assert!(!Completed.needs_reschedule());
    }

    #[test]
    fn every_non_terminal_state_can_be_rescheduled() {
        // The reference's #419: NODE_SCHEDULED (and the other positive states) could never leave.
        for s in Status::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(s.can_transition(Requested), "{s} -> REQUESTED");
            assert!(s.can_transition(Failed), "{s} -> FAILED");
        }
    }

    #[test]
    fn illegal_jumps_are_refused() {
        assert!(!Requested.can_transition(Running));
        assert!(!Requested.can_transition(NodeScheduled));
        assert!(!ClusterScheduled.can_transition(Running));
        assert!(!Running.can_transition(Created));
        assert!(!Dead.can_transition(Running));
        assert!(!NoWorkerCapacity.can_transition(NodeScheduled));
        assert!(!Requested.can_transition(NoWorkerCapacity));
    }

    #[test]
    fn categories_partition_sensibly() {
        for s in Status::ALL {
            assert!(!(s.is_positive_scheduling() && s.is_negative_scheduling()), "{s}");
            assert!(!(s.is_terminal() && s.needs_reschedule()), "{s}");
        }
        assert!(NodeScheduled.occupies_worker());
        assert!(!Requested.occupies_worker());
        assert!(NoWorkerCapacity.needs_reschedule());
    }
}
