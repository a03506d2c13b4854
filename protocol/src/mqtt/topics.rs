//! Every MQTT topic of the worker ⇄ cluster contract: one [`Topic`] enum that builds and parses the exact strings,
//! plus the subscription filters the cluster uses.
//!
//! Topic strings are the wire contract with the reference NodeEngine, NetManager and cluster managers, so they are
//! spelled here once and nowhere else.

use std::{fmt, str::FromStr};

/// The cluster manager's subscription to every worker's 2 s node snapshot.
pub const SUB_NODES_INFORMATION: &str = "nodes/+/information";
/// The cluster manager's subscription to every worker's instance status changes.
pub const SUB_NODES_JOB: &str = "nodes/+/job";
/// The cluster manager's subscription to every worker's per-instance resource reports.
pub const SUB_NODES_JOBS_RESOURCES: &str = "nodes/+/jobs/resources";
/// The cluster service manager's subscription to every NetManager message (the worker id is segment 2).
pub const SUB_NODES_NET: &str = "nodes/+/net/#";
/// The cluster manager's subscription to every worker's last will (an oakestra-rs addition, see [`Topic::Lost`]).
pub const SUB_NODES_LOST: &str = "nodes/+/lost";
/// What the cluster manager subscribes to (the reference subscribes exactly these three).
pub const CLUSTER_MANAGER_SUBSCRIPTIONS: [&str; 3] =
    [SUB_NODES_INFORMATION, SUB_NODES_JOB, SUB_NODES_JOBS_RESOURCES];

/// A topic segment that must not be empty or contain `/`, `+`, `#` or NUL was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A node id or job name cannot be one topic segment.
    #[error("invalid topic segment {value:?}: {reason}")]
    InvalidSegment {
        /// The offending node id or job name.
        value: String,
        /// Why it cannot be a topic segment.
        reason: &'static str,
    },
    /// The string is not one of the contract's topics.
    #[error("unknown topic {topic:?}")]
    Unknown {
        /// The whole topic string as received.
        topic: String,
    },
}

/// A node id or job name validated to be exactly one topic segment.
///
/// Why a newtype: an id holding `/` or a wildcard would address (or, in a filter, subscribe to) other nodes' topics,
/// so the check happens once, where the id enters a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicId(String);

impl TopicId {
    /// Validates `value` as one topic segment.
    pub fn new(value: impl Into<String>) -> Result<Self, TopicError> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("empty")
        } else if value.contains('/') {
            Some("contains '/'")
        } else if value.contains('+') {
            Some("contains the wildcard '+'")
        } else if value.contains('#') {
            Some("contains the wildcard '#'")
        } else if value.contains('\0') {
            // MQTT forbids U+0000 anywhere in a topic name.
            Some("contains NUL")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TopicError::InvalidSegment { value, reason }),
            None => Ok(Self(value)),
        }
    }

    /// The id as written in the topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for TopicId {
    type Error = TopicError;
    fn try_from(value: &str) -> Result<Self, TopicError> {
        Self::new(value)
    }
}

impl TryFrom<String> for TopicId {
    type Error = TopicError;
    fn try_from(value: String) -> Result<Self, TopicError> {
        Self::new(value)
    }
}

/// One topic of the contract. Node topics carry the worker's node id, `UpdatesAvailable` the job name.
/// `W→C` = published by the worker, `C→W` = published by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `nodes/<id>/information` (W→C, every 2 s): [`super::worker::NodeInformation`].
    Information(TopicId),
    /// `nodes/<id>/jobs/resources` (W→C, every 2 s per runtime): [`super::worker::ResourcesReport`].
    JobsResources(TopicId),
    /// `nodes/<id>/job` (W→C, on status change): [`super::worker::JobStatusReport`].
    Job(TopicId),
    /// `nodes/<id>/control/deploy` (C→W): [`super::worker::DeployCommand`].
    ControlDeploy(TopicId),
    /// `nodes/<id>/control/delete` (C→W): [`super::worker::DeleteCommand`].
    ControlDelete(TopicId),
    /// `nodes/<id>/control/error` (C→W): [`super::worker::ControlError`].
    ControlError(TopicId),
    /// `nodes/<id>/net/subnet` (W→C): [`super::net::SubnetRequest`].
    NetSubnet(TopicId),
    /// `nodes/<id>/net/subnetwork/result` (C→W): [`super::net::SubnetResult`].
    NetSubnetworkResult(TopicId),
    /// `nodes/<id>/net/tablequery/request` (W→C): [`super::net::TableQueryRequest`].
    NetTableQueryRequest(TopicId),
    /// `nodes/<id>/net/tablequery/result` (C→W): [`super::net::TableQueryResult`].
    NetTableQueryResult(TopicId),
    /// `nodes/<id>/net/service/deployed` (W→C): [`super::net::ServiceDeployed`].
    NetServiceDeployed(TopicId),
    /// `nodes/<id>/net/service/undeployed` (W→C; subscribed by the reference, never sent).
    NetServiceUndeployed(TopicId),
    /// `nodes/<id>/net/service/address-changed` (W→C): [`super::net::AddressChanged`].
    NetServiceAddressChanged(TopicId),
    /// `nodes/<id>/net/interest/remove` (W→C): [`super::net::InterestRemove`].
    NetInterestRemove(TopicId),
    /// `nodes/<id>/lost` (the broker on the worker's behalf): the NodeEngine's MQTT last will, published by the
    /// broker when the worker's connection ends without a DISCONNECT (crash, kill, reset): [`super::worker::ConnectionLost`].
    /// An oakestra-rs addition (the reference sets no will); a cluster that does not subscribe never sees it.
    Lost(TopicId),
    /// `jobs/<job_name>/updates_available` (C→W broadcast): [`super::net::UpdatesAvailable`].
    UpdatesAvailable(TopicId),
}

/// Builds one node-topic variant from the node id.
type NodeTopicCtor = fn(TopicId) -> Topic;

/// Node topic suffixes (after `nodes/<id>/`) and the variant each one builds, used by the parser. `node_suffix` is the
/// other direction; the round-trip proptest over every variant keeps the two in agreement.
const NODE_TOPICS: [(&str, NodeTopicCtor); 15] = [
    ("information", Topic::Information),
    ("jobs/resources", Topic::JobsResources),
    ("job", Topic::Job),
    ("control/deploy", Topic::ControlDeploy),
    ("control/delete", Topic::ControlDelete),
    ("control/error", Topic::ControlError),
    ("net/subnet", Topic::NetSubnet),
    ("net/subnetwork/result", Topic::NetSubnetworkResult),
    ("net/tablequery/request", Topic::NetTableQueryRequest),
    ("net/tablequery/result", Topic::NetTableQueryResult),
    ("net/service/deployed", Topic::NetServiceDeployed),
    ("net/service/undeployed", Topic::NetServiceUndeployed),
    ("net/service/address-changed", Topic::NetServiceAddressChanged),
    ("net/interest/remove", Topic::NetInterestRemove),
    ("lost", Topic::Lost),
];

impl Topic {
    /// Parses a received topic name. Anything outside the contract (including wildcard filters) is an error.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let unknown = || TopicError::Unknown {
            topic: topic.to_owned(),
        };
        let mut parts = topic.splitn(3, '/');
        let (Some(root), Some(id), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(unknown());
        };
        match root {
            "nodes" => {
                let build = NODE_TOPICS
                    .iter()
                    .find(|(suffix, _)| *suffix == rest)
                    .map(|(_, b)| *b)
                    .ok_or_else(unknown)?;
                Ok(build(TopicId::new(id)?))
            }
            "jobs" if rest == "updates_available" => Ok(Self::UpdatesAvailable(TopicId::new(id)?)),
            _ => Err(unknown()),
        }
    }

    /// The node id for `nodes/<id>/…` topics, `None` for the job broadcast.
    pub fn node_id(&self) -> Option<&TopicId> {
        match self {
            Self::UpdatesAvailable(_) => None,
            _ => Some(self.id()),
        }
    }

    /// The job name of `jobs/<job_name>/updates_available`.
    pub fn job_name(&self) -> Option<&TopicId> {
        match self {
            Self::UpdatesAvailable(job) => Some(job),
            _ => None,
        }
    }

    /// The id segment, whichever kind it is.
    pub fn id(&self) -> &TopicId {
        match self {
            Self::Information(id)
            | Self::JobsResources(id)
            | Self::Job(id)
            | Self::ControlDeploy(id)
            | Self::ControlDelete(id)
            | Self::ControlError(id)
            | Self::NetSubnet(id)
            | Self::NetSubnetworkResult(id)
            | Self::NetTableQueryRequest(id)
            | Self::NetTableQueryResult(id)
            | Self::NetServiceDeployed(id)
            | Self::NetServiceUndeployed(id)
            | Self::NetServiceAddressChanged(id)
            | Self::NetInterestRemove(id)
            | Self::Lost(id)
            | Self::UpdatesAvailable(id) => id,
        }
    }

    /// The part after `nodes/<id>/` for node topics.
    fn node_suffix(&self) -> Option<&'static str> {
        Some(match self {
            Self::Information(_) => "information",
            Self::JobsResources(_) => "jobs/resources",
            Self::Job(_) => "job",
            Self::ControlDeploy(_) => "control/deploy",
            Self::ControlDelete(_) => "control/delete",
            Self::ControlError(_) => "control/error",
            Self::NetSubnet(_) => "net/subnet",
            Self::NetSubnetworkResult(_) => "net/subnetwork/result",
            Self::NetTableQueryRequest(_) => "net/tablequery/request",
            Self::NetTableQueryResult(_) => "net/tablequery/result",
            Self::NetServiceDeployed(_) => "net/service/deployed",
            Self::NetServiceUndeployed(_) => "net/service/undeployed",
            Self::NetServiceAddressChanged(_) => "net/service/address-changed",
            Self::NetInterestRemove(_) => "net/interest/remove",
            Self::Lost(_) => "lost",
            Self::UpdatesAvailable(_) => return None,
        })
    }

    /// Every node topic for `node`, in contract order (useful for ACLs and tests).
    pub fn all_for_node(node: &TopicId) -> Vec<Self> {
        NODE_TOPICS.iter().map(|(_, build)| build(node.clone())).collect()
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node_suffix() {
            Some(suffix) => write!(f, "nodes/{}/{suffix}", self.id()),
            None => write!(f, "jobs/{}/updates_available", self.id()),
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        Self::parse(s)
    }
}

/// `nodes/<id>/#`: every topic of one node (the prefix a per-node broker ACL grants).
pub fn node_prefix_filter(node: &TopicId) -> String {
    format!("nodes/{node}/#")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(s: &str) -> TopicId {
        TopicId::new(s).unwrap()
    }

    #[test]
    fn builds_the_exact_strings() {
        let n = id("64f1a2b3c4d5e6f708192a3b");
        let expected = [
            "information",
            "jobs/resources",
            "job",
            "control/deploy",
            "control/delete",
            "control/error",
            "net/subnet",
            "net/subnetwork/result",
            "net/tablequery/request",
            "net/tablequery/result",
            "net/service/deployed",
            "net/service/undeployed",
            "net/service/address-changed",
            "net/interest/remove",
            "lost",
        ];
        let all = Topic::all_for_node(&n);
        assert_eq!(all.len(), expected.len());
        for (topic, suffix) in all.iter().zip(expected) {
            assert_eq!(
                topic.to_string(),
                format!("nodes/64f1a2b3c4d5e6f708192a3b/{suffix}")
            );
            assert_eq!(topic.node_id(), Some(&n));
        }
        let job = Topic::UpdatesAvailable(id("app.ns.svc.ns"));
        assert_eq!(job.to_string(), "jobs/app.ns.svc.ns/updates_available");
        assert_eq!(job.job_name().map(TopicId::as_str), Some("app.ns.svc.ns"));
        assert_eq!(job.node_id(), None);
        assert_eq!(node_prefix_filter(&n), "nodes/64f1a2b3c4d5e6f708192a3b/#");
    }

    #[test]
    fn parses_received_topics() {
        assert_eq!(
            Topic::parse("nodes/w1/net/service/address-changed"),
            Ok(Topic::NetServiceAddressChanged(id("w1")))
        );
        assert_eq!(
            "nodes/w1/jobs/resources".parse(),
            Ok(Topic::JobsResources(id("w1")))
        );
        assert_eq!(
            Topic::parse("jobs/a.b.c.d/updates_available"),
            Ok(Topic::UpdatesAvailable(id("a.b.c.d")))
        );
    }

    #[test]
    fn rejects_unknown_topics_and_bad_ids() {
        for bad in [
            "",
            "nodes",
            "nodes/w1",
            "nodes/w1/",
            "nodes/w1/informations",
            "nodes/w1/net/#",
            "nodes/+/information",
            "nodes//information",
            "jobs/a/updates",
            "jobs//updates_available",
            "jobs/a/b/updates_available",
            "other/w1/information",
            "/nodes/w1/information",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            Topic::parse("nodes/+/job"),
            Err(TopicError::InvalidSegment {
                value: "+".into(),
                reason: "contains the wildcard '+'"
            })
        );
    }

    #[test]
    fn ids_must_be_one_segment() {
        for bad in ["", "a/b", "a+", "#", "x\0y"] {
            let err = TopicId::new(bad).unwrap_err();
            assert!(matches!(&err, TopicError::InvalidSegment { value, .. } if value == bad));
        }
        // The message names the culprit.
        assert!(TopicId::new("a/b").unwrap_err().to_string().contains("\"a/b\""));
    }

    #[test]
    fn subscription_filters_are_the_references() {
        assert_eq!(
            CLUSTER_MANAGER_SUBSCRIPTIONS,
            ["nodes/+/information", "nodes/+/job", "nodes/+/jobs/resources"]
        );
        assert_eq!(SUB_NODES_NET, "nodes/+/net/#");
        assert_eq!(SUB_NODES_LOST, "nodes/+/lost");
    }

    proptest! {
        #[test]
        fn parse_inverts_display(raw in "[^/+#\u{0}]{1,40}", which in 0usize..16) {
            let tid = TopicId::new(raw).unwrap();
            let topic = if which == 15 {
                Topic::UpdatesAvailable(tid)
            } else {
                Topic::all_for_node(&tid).swap_remove(which)
            };
            prop_assert_eq!(Topic::parse(&topic.to_string()), Ok(topic));
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = Topic::parse(&s);
        }
    }
}
