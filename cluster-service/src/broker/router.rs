//! The embedded broker's sessions, subscriptions and retained messages, and the delivery of one published message
//! to the sessions that may read it. No I/O: connections hand packets in and take [`Out`]s from their sink.
//!
//! Every bound is explicit: messages queued per connected client ([`MAX_QUEUED`], like Mosquitto's
//! `max_queued_messages`), per offline persistent session ([`MAX_PENDING`]), subscriptions per client
//! ([`MAX_SUBSCRIPTIONS`]) and retained messages ([`MAX_RETAINED`], [`MAX_RETAINED_BYTES`]). What goes over a bound is
//! dropped and counted in [`Counters`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::{
    acl::{self, Identity, Scope},
    codec::{self, QoS},
};
use crate::mqtt::Message;

/// Messages queued for one connected client before new ones are dropped.
pub const MAX_QUEUED: usize = 1000;
/// QoS 1 messages kept for one offline persistent session; the oldest go first.
pub const MAX_PENDING: usize = 1000;
/// Subscriptions one client may hold.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Retained messages kept in all.
pub const MAX_RETAINED: usize = 10_000;
/// Bytes of retained payloads kept in all.
pub const MAX_RETAINED_BYTES: usize = 16 << 20;

/// A message on its way to one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Topic.
    pub topic: Arc<str>,
    /// Payload (shared by every recipient).
    pub payload: Bytes,
    /// QoS granted to this recipient (0 or 1).
    pub qos: QoS,
    /// Sent because it is retained (on subscribe).
    pub retain: bool,
}

/// What a connection task receives.
#[derive(Debug)]
pub enum Out {
    /// Send this PUBLISH.
    Publish(Outgoing),
    /// Close the connection (taken over by a new one with the same client id, or credentials revoked).
    Close(&'static str),
}

/// A connection's queue of messages to write: a deque that takes no memory while empty (an idle connection costs
/// no buffer) and a wake-up for the connection task.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Out>>,
    notify: Notify,
}

impl Mailbox {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Out>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `out` unless `limit` messages wait already; wakes the connection.
    fn push(&self, out: Out, limit: usize) -> bool {
        let mut queue = self.queue();
        if queue.len() >= limit {
            return false;
        }
        queue.push_back(out);
        drop(queue);
        self.notify.notify_one();
        true
    }

    /// The next message, if any. The deque's memory goes back once a burst has drained.
    pub fn pop(&self) -> Option<Out> {
        let mut queue = self.queue();
        let out = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 16 {
            queue.shrink_to_fit();
        }
        out
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }

    /// Completes after the next push (at once if one happened since the last wait).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// Where a session's messages go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// A network connection's mailbox.
    Conn(Arc<Mailbox>),
    /// The cluster-service's own in-process client.
    Local(mpsc::UnboundedSender<Message>),
}

impl Sink {
    /// A connection sink and its mailbox.
    pub fn conn() -> (Self, Arc<Mailbox>) {
        let mailbox = Arc::new(Mailbox::default());
        (Self::Conn(Arc::clone(&mailbox)), mailbox)
    }

    /// Hands over a message; `false` if it was dropped (queue full or receiver gone).
    fn send(&self, message: Outgoing) -> bool {
        match self {
            Self::Conn(mailbox) => mailbox.push(Out::Publish(message), MAX_QUEUED),
            Self::Local(tx) => tx
                .send(Message {
                    topic: message.topic.to_string(),
                    payload: message.payload,
                })
                .is_ok(),
        }
    }

    fn close(&self, why: &'static str) {
        if let Self::Conn(mailbox) = self {
            mailbox.push(Out::Close(why), usize::MAX);
        }
    }
}

/// One client's session.
#[derive(Debug)]
struct Session {
    identity: Identity,
    clean: bool,
    /// Which connection currently owns it (a takeover makes the old connection's goodbye a no-op).
    generation: u64,
    sink: Option<Sink>,
    /// Filter, granted QoS, scope.
    subscriptions: Vec<(Arc<str>, QoS, Scope)>,
    /// QoS 1 messages kept while a persistent session is offline.
    pending: VecDeque<Outgoing>,
}

/// A subscription in an index: who, with which filter, at which QoS.
#[derive(Debug, Clone)]
struct Entry {
    client: Arc<str>,
    filter: Arc<str>,
    qos: QoS,
}

/// Drops and refusals, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Publishes refused by the ACL.
    pub denied_publishes: u64,
    /// Subscriptions refused by the ACL.
    pub denied_subscriptions: u64,
    /// Messages dropped because a client's queue was full.
    pub dropped_queue_full: u64,
    /// Messages dropped from a full offline session.
    pub dropped_offline: u64,
    /// Retained messages not kept because the store was full.
    pub dropped_retained: u64,
}

/// The result of [`Router::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// The connection's generation, for [`Router::disconnect`].
    pub generation: u64,
    /// Whether a persistent session was resumed (CONNACK's session-present flag).
    pub session_present: bool,
}

/// Sessions, subscription indexes and retained messages.
#[derive(Debug, Default)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    /// Exact topic → subscribers.
    exact: HashMap<Arc<str>, Vec<Entry>>,
    /// The cluster's wildcard filters, compared with every topic.
    everything: Vec<Entry>,
    /// Node id → its workers' wildcard filters, compared only with `nodes/<id>/…`.
    by_node: HashMap<String, Vec<Entry>>,
    retained: HashMap<Arc<str>, (Bytes, QoS)>,
    retained_bytes: usize,
    next_generation: u64,
    counters: Counters,
}

impl Router {
    /// Drops and refusals so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether `client_id` is connected now.
    pub fn online(&self, client_id: &str) -> bool {
        self.sessions.get(client_id).is_some_and(|s| s.sink.is_some())
    }

    /// Sessions held (connected or persisted).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Attaches a connection to the session `client_id`, taking it over from an older connection (which is told to
    /// close). A clean session, or a change of identity, starts from nothing; a persistent one keeps its
    /// subscriptions and gets its pending messages now.
    pub fn connect(&mut self, client_id: &str, identity: Identity, clean: bool, sink: Sink) -> Connected {
        self.next_generation += 1;
        let generation = self.next_generation;
        let resume = self
            .sessions
            .get(client_id)
            .is_some_and(|s| !clean && !s.clean && s.identity == identity);
        if let Some(old) = self.sessions.get(client_id).and_then(|s| s.sink.clone()) {
            old.close("another connection took over the session");
        }
        if resume {
            if let Some(session) = self.sessions.get_mut(client_id) {
                session.generation = generation;
                let pending = std::mem::take(&mut session.pending);
                for message in pending {
                    if !sink.send(message) {
                        self.counters.dropped_queue_full += 1;
                    }
                }
                session.sink = Some(sink);
            }
        } else {
            self.remove_session(client_id);
            self.sessions.insert(
                Arc::from(client_id),
                Session {
                    identity,
                    clean,
                    generation,
                    sink: Some(sink),
                    subscriptions: Vec::new(),
                    pending: VecDeque::new(),
                },
            );
        }
        Connected {
            generation,
            session_present: resume,
        }
    }

    /// The connection `generation` of `client_id` ended; `unacked` are the QoS 1 messages it sent without a PUBACK
    /// (kept for a persistent session). A no-op if a newer connection took the session over.
    pub fn disconnect(&mut self, client_id: &str, generation: u64, unacked: Vec<Outgoing>) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.generation != generation {
            return;
        }
        if session.clean {
            self.remove_session(client_id);
            return;
        }
        session.sink = None;
        for message in unacked.into_iter().rev() {
            session.pending.push_front(message);
        }
        while session.pending.len() > MAX_PENDING {
            session.pending.pop_front();
            self.counters.dropped_offline += 1;
        }
    }

    /// Closes and forgets every session of `node` (its credentials are gone).
    pub fn drop_node(&mut self, node: &str) {
        let ids: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, s)| matches!(&s.identity, Identity::Node(n) if n == node))
            .map(|(id, _)| Arc::clone(id))
            .collect();
        for id in ids {
            if let Some(sink) = self.sessions.get(&id).and_then(|s| s.sink.clone()) {
                sink.close("the node's credentials were revoked");
            }
            self.remove_session(&id);
        }
    }

    fn remove_session(&mut self, client_id: &str) {
        let Some(session) = self.sessions.remove(client_id) else {
            return;
        };
        for (filter, _, scope) in &session.subscriptions {
            self.unindex(client_id, filter, scope);
        }
    }

    fn unindex(&mut self, client_id: &str, filter: &str, scope: &Scope) {
        let keep = |e: &Entry| !(&*e.client == client_id && &*e.filter == filter);
        match scope {
            Scope::Exact => {
                if let Some(list) = self.exact.get_mut(filter) {
                    list.retain(keep);
                    if list.is_empty() {
                        self.exact.remove(filter);
                    }
                }
            }
            Scope::Everything => self.everything.retain(keep),
            Scope::Node(node) => {
                if let Some(list) = self.by_node.get_mut(node) {
                    list.retain(keep);
                    if list.is_empty() {
                        self.by_node.remove(node);
                    }
                }
            }
            Scope::Refused => {}
        }
    }

    /// Subscribes `client_id` to `filters` (checked by the codec); the SUBACK return codes (granted QoS, at most 1,
    /// or 0x80). Retained messages matching a granted filter are sent at once.
    pub fn subscribe(&mut self, client_id: &str, filters: &[(String, QoS)]) -> Vec<u8> {
        let Some((key, session)) = self.sessions.get_key_value(client_id) else {
            return vec![0x80; filters.len()];
        };
        let key = Arc::clone(key);
        let identity = session.identity.clone();
        let mut codes = Vec::with_capacity(filters.len());
        for (filter, requested) in filters {
            let scope = acl::scope(&identity, filter);
            let count = self.sessions.get(client_id).map_or(0, |s| s.subscriptions.len());
            let replaces = self
                .sessions
                .get(client_id)
                .and_then(|s| s.subscriptions.iter().position(|(f, _, _)| **f == **filter));
            if scope == Scope::Refused || (replaces.is_none() && count >= MAX_SUBSCRIPTIONS) {
                self.counters.denied_subscriptions += 1;
                codes.push(0x80);
                continue;
            }
            let qos = (*requested).min(QoS::AtLeastOnce);
            let filter: Arc<str> = Arc::from(filter.as_str());
            if let Some(i) = replaces
                && let Some(session) = self.sessions.get_mut(client_id)
            {
                let (old_filter, _, old_scope) = session.subscriptions.remove(i);
                self.unindex(client_id, &old_filter, &old_scope);
            }
            let entry = Entry {
                client: Arc::clone(&key),
                filter: Arc::clone(&filter),
                qos,
            };
            match &scope {
                Scope::Exact => self.exact.entry(Arc::clone(&filter)).or_default().push(entry),
                Scope::Everything => self.everything.push(entry),
                Scope::Node(node) => self.by_node.entry(node.clone()).or_default().push(entry),
                Scope::Refused => {}
            }
            if let Some(session) = self.sessions.get_mut(client_id) {
                session
                    .subscriptions
                    .push((Arc::clone(&filter), qos, scope.clone()));
            }
            codes.push(qos as u8);
            self.send_retained(client_id, &identity, &filter, &scope, qos);
        }
        codes
    }

    fn send_retained(&mut self, client_id: &str, identity: &Identity, filter: &str, scope: &Scope, qos: QoS) {
        let Some(sink) = self.sessions.get(client_id).and_then(|s| s.sink.clone()) else {
            return;
        };
        let matching: Vec<Outgoing> = match scope {
            Scope::Exact => self
                .retained
                .get_key_value(filter)
                .map(|(topic, (payload, q))| Outgoing {
                    topic: Arc::clone(topic),
                    payload: payload.clone(),
                    qos: (*q).min(qos),
                    retain: true,
                })
                .into_iter()
                .collect(),
            _ => self
                .retained
                .iter()
                .filter(|(topic, _)| codec::matches(filter, topic) && acl::may_read(identity, topic))
                .map(|(topic, (payload, q))| Outgoing {
                    topic: Arc::clone(topic),
                    payload: payload.clone(),
                    qos: (*q).min(qos),
                    retain: true,
                })
                .collect(),
        };
        for message in matching {
            if !sink.send(message) {
                self.counters.dropped_queue_full += 1;
            }
        }
    }

    /// Removes `client_id`'s subscriptions to `filters`.
    pub fn unsubscribe(&mut self, client_id: &str, filters: &[String]) {
        for filter in filters {
            let removed = self.sessions.get_mut(client_id).and_then(|s| {
                s.subscriptions
                    .iter()
                    .position(|(f, _, _)| **f == **filter)
                    .map(|i| s.subscriptions.remove(i))
            });
            if let Some((filter, _, scope)) = removed {
                self.unindex(client_id, &filter, &scope);
            }
        }
    }

    /// Routes a message `from` a client. `false` if the ACL refuses the publish (nothing is delivered or retained).
    /// Each reader gets one copy, at the highest QoS of its matching subscriptions (capped at the message's and 1).
    pub fn publish(&mut self, from: &Identity, topic: &str, payload: Bytes, qos: QoS, retain: bool) -> bool {
        if !acl::may_publish(from, topic) {
            self.counters.denied_publishes += 1;
            return false;
        }
        let topic: Arc<str> = Arc::from(topic);
        if retain {
            self.retain(&topic, &payload, qos);
        }
        let mut targets: Vec<(Arc<str>, QoS)> = Vec::new();
        let mut add = |entry: &Entry| match targets.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &entry.client)) {
            Some((_, q)) => *q = (*q).max(entry.qos),
            None => targets.push((Arc::clone(&entry.client), entry.qos)),
        };
        if let Some(list) = self.exact.get(&topic) {
            list.iter().for_each(&mut add);
        }
        self.everything
            .iter()
            .filter(|e| codec::matches(&e.filter, &topic))
            .for_each(&mut add);
        if let Some(list) = acl::topic_node(&topic).and_then(|node| self.by_node.get(node)) {
            list.iter()
                .filter(|e| codec::matches(&e.filter, &topic))
                .for_each(&mut add);
        }
        let cap = qos.min(QoS::AtLeastOnce);
        for (client, sub_qos) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            let message = Outgoing {
                topic: Arc::clone(&topic),
                payload: payload.clone(),
                qos: sub_qos.min(cap),
                retain: false,
            };
            match &session.sink {
                Some(sink) => self.counters.dropped_queue_full += u64::from(!sink.send(message)),
                None if message.qos == QoS::AtLeastOnce => {
                    session.pending.push_back(message);
                    if session.pending.len() > MAX_PENDING {
                        session.pending.pop_front();
                        self.counters.dropped_offline += 1;
                    }
                }
                None => {}
            }
        }
        true
    }

    fn retain(&mut self, topic: &Arc<str>, payload: &Bytes, qos: QoS) {
        if let Some((old, _)) = self.retained.remove(topic) {
            self.retained_bytes -= old.len();
        }
        if payload.is_empty() {
            return;
        }
        if self.retained.len() >= MAX_RETAINED || self.retained_bytes + payload.len() > MAX_RETAINED_BYTES {
            self.counters.dropped_retained += 1;
            return;
        }
        self.retained_bytes += payload.len();
        self.retained.insert(Arc::clone(topic), (payload.clone(), qos));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn node(id: &str) -> Identity {
        Identity::Node(id.to_owned())
    }

    fn drain(mailbox: &Mailbox) -> Vec<String> {
        let mut topics = Vec::new();
        while let Some(out) = mailbox.pop() {
            match out {
                Out::Publish(m) => topics.push(m.topic.to_string()),
                Out::Close(why) => topics.push(format!("close: {why}")),
            }
        }
        topics
    }

    #[test]
    fn a_worker_only_receives_its_own_topics_even_with_hash() {
        let mut r = Router::default();
        let (sink, mailbox) = Sink::conn();
        r.connect("a-ne", node("a"), true, sink);
        assert_eq!(r.subscribe("a-ne", &[("#".into(), QoS::AtLeastOnce)]), vec![1]);
        assert_eq!(
            r.subscribe("a-ne", &[("nodes/b/control/deploy".into(), QoS::AtLeastOnce)]),
            vec![0x80]
        );
        for topic in [
            "nodes/b/control/deploy",
            "nodes/a/control/deploy",
            "jobs/x/updates_available",
            "other",
        ] {
            assert!(r.publish(
                &Identity::Cluster,
                topic,
                Bytes::from_static(b"{}"),
                QoS::AtLeastOnce,
                false
            ));
        }
        assert_eq!(drain(&mailbox), vec!["nodes/a/control/deploy"]);
        assert_eq!(r.counters().denied_subscriptions, 1);
    }

    #[test]
    fn a_worker_cannot_publish_on_another_node() {
        let mut r = Router::default();
        let (sink, mailbox) = Sink::conn();
        r.connect("b-ne", node("b"), true, sink);
        r.subscribe("b-ne", &[("nodes/b/control/deploy".into(), QoS::AtLeastOnce)]);
        assert!(!r.publish(
            &node("a"),
            "nodes/b/control/deploy",
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            false
        ));
        assert!(drain(&mailbox).is_empty());
        assert_eq!(r.counters().denied_publishes, 1);
    }

    #[test]
    fn the_local_client_gets_worker_reports() {
        let mut r = Router::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.connect("oakestra-cluster", Identity::Cluster, true, Sink::Local(tx));
        r.subscribe(
            "oakestra-cluster",
            &[("nodes/+/information".into(), QoS::AtLeastOnce)],
        );
        assert!(r.publish(
            &node("a"),
            "nodes/a/information",
            Bytes::from_static(b"1"),
            QoS::AtLeastOnce,
            false
        ));
        let m = rx.try_recv().unwrap();
        assert_eq!(
            (m.topic.as_str(), &m.payload[..]),
            ("nodes/a/information", &b"1"[..])
        );
    }

    #[test]
    fn persistent_sessions_keep_subscriptions_and_queue_while_offline() {
        let mut r = Router::default();
        let (sink, _mailbox) = Sink::conn();
        let first = r.connect("a-ne", node("a"), false, sink);
        assert!(!first.session_present);
        r.subscribe("a-ne", &[("nodes/a/control/deploy".into(), QoS::AtLeastOnce)]);
        let unacked = Outgoing {
            topic: Arc::from("nodes/a/control/deploy"),
            payload: Bytes::from_static(b"unacked"),
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        r.disconnect("a-ne", first.generation, vec![unacked]);
        r.publish(
            &Identity::Cluster,
            "nodes/a/control/deploy",
            Bytes::from_static(b"later"),
            QoS::AtLeastOnce,
            false,
        );
        // QoS 0 is not kept for an offline session.
        r.publish(
            &Identity::Cluster,
            "nodes/a/control/deploy",
            Bytes::from_static(b"q0"),
            QoS::AtMostOnce,
            false,
        );
        let (sink, mailbox) = Sink::conn();
        let second = r.connect("a-ne", node("a"), false, sink);
        assert!(second.session_present);
        let payloads: Vec<Bytes> = std::iter::from_fn(|| match mailbox.pop() {
            Some(Out::Publish(m)) => Some(m.payload),
            _ => None,
        })
        .collect();
        assert_eq!(
            payloads,
            vec![Bytes::from_static(b"unacked"), Bytes::from_static(b"later")]
        );
        // A clean connect drops the session.
        let (sink, _mailbox3) = Sink::conn();
        assert!(!r.connect("a-ne", node("a"), true, sink).session_present);
    }

    #[test]
    fn a_takeover_closes_the_old_connection_and_its_goodbye_is_ignored() {
        let mut r = Router::default();
        let (sink, old_mailbox) = Sink::conn();
        let old = r.connect("a", node("a"), true, sink);
        let (sink, mailbox) = Sink::conn();
        let new = r.connect("a", node("a"), true, sink);
        r.subscribe("a", &[("nodes/a/net/subnetwork/result".into(), QoS::AtLeastOnce)]);
        assert_eq!(
            drain(&old_mailbox),
            vec!["close: another connection took over the session"]
        );
        r.disconnect("a", old.generation, Vec::new());
        r.publish(
            &Identity::Cluster,
            "nodes/a/net/subnetwork/result",
            Bytes::from_static(b"{}"),
            QoS::AtLeastOnce,
            false,
        );
        assert_eq!(drain(&mailbox), vec!["nodes/a/net/subnetwork/result"]);
        r.disconnect("a", new.generation, Vec::new());
        assert_eq!(r.sessions(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut r = Router::default();
        let (sink, mailbox) = Sink::conn();
        r.connect("a", node("a"), true, sink);
        r.subscribe("a", &[("nodes/a/x".into(), QoS::AtMostOnce)]);
        for _ in 0..MAX_QUEUED + 5 {
            r.publish(
                &Identity::Cluster,
                "nodes/a/x",
                Bytes::from_static(b"."),
                QoS::AtMostOnce,
                false,
            );
        }
        assert_eq!(mailbox.len(), MAX_QUEUED);
        assert_eq!(r.counters().dropped_queue_full, 5);
    }

    #[test]
    fn retained_messages_are_bounded_and_respect_the_acl() {
        let mut r = Router::default();
        r.publish(
            &node("b"),
            "nodes/b/info",
            Bytes::from_static(b"b"),
            QoS::AtLeastOnce,
            true,
        );
        r.publish(
            &node("a"),
            "nodes/a/info",
            Bytes::from_static(b"a"),
            QoS::AtLeastOnce,
            true,
        );
        let (sink, mailbox) = Sink::conn();
        r.connect("a", node("a"), true, sink);
        r.subscribe("a", &[("#".into(), QoS::AtLeastOnce)]);
        assert_eq!(drain(&mailbox), vec!["nodes/a/info"]);
        // An empty retained payload deletes.
        r.publish(&node("a"), "nodes/a/info", Bytes::new(), QoS::AtLeastOnce, true);
        assert_eq!(r.retained.len(), 1);
        assert_eq!(r.retained_bytes, 1);
    }

    #[test]
    fn dropping_a_node_closes_its_sessions() {
        let mut r = Router::default();
        let (sink, mailbox) = Sink::conn();
        r.connect("a-ne", node("a"), false, sink);
        r.subscribe("a-ne", &[("nodes/a/control/deploy".into(), QoS::AtLeastOnce)]);
        r.drop_node("a");
        assert_eq!(r.sessions(), 0);
        assert!(r.exact.is_empty());
        assert_eq!(
            drain(&mailbox),
            vec!["close: the node's credentials were revoked"]
        );
    }
}
