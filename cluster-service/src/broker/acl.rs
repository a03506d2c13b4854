//! Who may publish and read which topics on the embedded broker: the cluster everything, a worker (its NetManager
//! `<id>` and its NodeEngine `<id>-ne`) only its own `nodes/<id>/…` and the job update notices
//! `jobs/<job>/updates_available` it subscribes to by name. Pure.
//!
//! Subscriptions are classified once, when they are made, so that delivering a message never has to look at other
//! workers' subscriptions:
//! - an exact filter the client may read is indexed by topic;
//! - a worker's wildcard filter is kept only if it can match inside its own `nodes/<id>/…`, and is then only ever
//!   compared with topics of that node (so `#` from a worker means "everything of mine");
//! - anything else is refused in the SUBACK (0x80).

use super::codec;

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The cluster-service itself: reads and writes everything.
    Cluster,
    /// A worker program of this node (NetManager or NodeEngine).
    Node(String),
}

/// How a subscription is held, if it is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// An exact topic the client may read.
    Exact,
    /// A wildcard filter of the cluster, compared with every topic.
    Everything,
    /// A wildcard filter of a worker, compared only with topics of this node.
    Node(String),
    /// Not allowed.
    Refused,
}

/// The last level of the job update notices workers may subscribe to.
pub const JOB_UPDATES: &str = "updates_available";

/// The node a topic `nodes/<id>/…` is about.
pub fn topic_node(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("nodes/")?;
    let (node, tail) = rest.split_once('/')?;
    (!node.is_empty() && !tail.is_empty()).then_some(node)
}

/// Whether `topic` is a job update notice `jobs/<job>/updates_available`.
fn is_job_update(topic: &str) -> bool {
    topic
        .strip_prefix("jobs/")
        .and_then(|rest| rest.strip_suffix(JOB_UPDATES))
        .and_then(|job| job.strip_suffix('/'))
        .is_some_and(|job| !job.is_empty() && !job.contains('/'))
}

/// Whether `who` may publish on `topic`: the cluster anywhere, a worker only below its own `nodes/<id>/`.
pub fn may_publish(who: &Identity, topic: &str) -> bool {
    match who {
        Identity::Cluster => true,
        Identity::Node(id) => topic_node(topic) == Some(id.as_str()),
    }
}

/// Whether `who` may receive a message on `topic`.
pub fn may_read(who: &Identity, topic: &str) -> bool {
    match who {
        Identity::Cluster => true,
        Identity::Node(id) => topic_node(topic) == Some(id.as_str()) || is_job_update(topic),
    }
}

/// How a (syntactically valid) subscription filter of `who` is held.
pub fn scope(who: &Identity, filter: &str) -> Scope {
    let wildcard = codec::is_wildcard(filter);
    match who {
        Identity::Cluster if wildcard => Scope::Everything,
        Identity::Cluster => Scope::Exact,
        Identity::Node(_) if !wildcard => {
            if may_read(who, filter) {
                Scope::Exact
            } else {
                Scope::Refused
            }
        }
        Identity::Node(id) => {
            if can_match_below(filter, id) {
                Scope::Node(id.clone())
            } else {
                Scope::Refused
            }
        }
    }
}

/// Whether a wildcard filter can match some topic `nodes/<id>/<something>`.
fn can_match_below(filter: &str, id: &str) -> bool {
    let mut levels = filter.split('/');
    for want in ["nodes", id] {
        match levels.next() {
            Some("#") => return true,
            Some(level) if level == "+" || level == want => {}
            _ => return false,
        }
    }
    // At least one more level must exist (a topic is never just `nodes/<id>`).
    levels.next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Identity {
        Identity::Node(id.to_owned())
    }

    #[test]
    fn workers_publish_only_below_their_own_node() {
        let a = node("a1");
        assert!(may_publish(&a, "nodes/a1/information"));
        assert!(may_publish(&a, "nodes/a1/net/tablequery/request"));
        assert!(!may_publish(&a, "nodes/b2/control/deploy"));
        assert!(!may_publish(&a, "nodes/a1"));
        assert!(!may_publish(&a, "nodes/a1x/job"));
        assert!(!may_publish(&a, "jobs/x.y.z.w/updates_available"));
        assert!(!may_publish(&a, "other"));
        assert!(may_publish(&Identity::Cluster, "jobs/x/updates_available"));
    }

    #[test]
    fn workers_read_their_node_and_job_updates() {
        let a = node("a1");
        assert!(may_read(&a, "nodes/a1/control/deploy"));
        assert!(may_read(&a, "jobs/app.ns.svc.ns/updates_available"));
        assert!(!may_read(&a, "jobs/app/other"));
        assert!(!may_read(&a, "jobs//updates_available"));
        assert!(!may_read(&a, "jobs/a/b/updates_available"));
        assert!(!may_read(&a, "nodes/b2/control/deploy"));
    }

    #[test]
    fn subscriptions_are_classified() {
        let a = node("a1");
        assert_eq!(scope(&a, "nodes/a1/control/deploy"), Scope::Exact);
        assert_eq!(scope(&a, "jobs/j/updates_available"), Scope::Exact);
        assert_eq!(scope(&a, "nodes/b2/control/deploy"), Scope::Refused);
        assert_eq!(scope(&a, "#"), Scope::Node("a1".into()));
        assert_eq!(scope(&a, "nodes/+/control/#"), Scope::Node("a1".into()));
        assert_eq!(scope(&a, "nodes/a1/#"), Scope::Node("a1".into()));
        assert_eq!(scope(&a, "+/+/+"), Scope::Node("a1".into()));
        assert_eq!(scope(&a, "nodes/+"), Scope::Refused);
        assert_eq!(scope(&a, "nodes/b2/#"), Scope::Refused);
        assert_eq!(scope(&a, "jobs/#"), Scope::Refused);
        assert_eq!(scope(&a, "jobs/+/updates_available"), Scope::Refused);
        assert_eq!(scope(&Identity::Cluster, "nodes/+/job"), Scope::Everything);
        assert_eq!(scope(&Identity::Cluster, "jobs/j/x"), Scope::Exact);
    }
}
