//! NetManager's MQTT session with the cluster broker: connects as `<node id>` (the node's secret as password when
//! the cluster issued one), keeps the subnet and table-query result subscriptions plus one
//! `jobs/<job>/updates_available` subscription per interest across reconnects, and turns what arrives into
//! [`Inbound`] messages for the control task.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use oakestra_protocol::mqtt::net::{SubnetResult, TableQueryResult};
use oakestra_runtime::metrics::MqttCounters;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::mpsc;

/// Largest MQTT packet accepted (a table-query answer for a job with many instances).
const MAX_PACKET: usize = 4 << 20;

/// What the broker sent.
#[derive(Debug)]
pub enum Inbound {
    /// (Re)connected and subscribed.
    Connected,
    /// The broker refused our credentials.
    Rejected(String),
    /// `nodes/<id>/net/subnetwork/result`.
    Subnet(SubnetResult),
    /// `nodes/<id>/net/tablequery/result`.
    Table(TableQueryResult),
    /// `jobs/<job>/updates_available` (the payload does not matter: the whole job is queried again).
    Update(String),
}

/// The session handle (cheap to clone).
#[derive(Debug, Clone)]
pub struct Session {
    client: AsyncClient,
    node_id: String,
    interests: Arc<Mutex<BTreeSet<String>>>,
    connected: Arc<AtomicBool>,
    counters: Arc<MqttCounters>,
}

fn updates_topic(job: &str) -> String {
    format!("jobs/{job}/updates_available")
}

impl Session {
    /// Connects in the background (reconnecting with back-off from 0.5 s to 30 s) and returns the handle, the
    /// inbound messages and the pump task.
    pub fn start(
        host: &str,
        port: u16,
        node_id: &str,
        password: Option<&str>,
    ) -> (
        Self,
        mpsc::UnboundedReceiver<Inbound>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut options = MqttOptions::new(node_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(5))
            // Subscriptions are re-made on every ConnAck; stale table answers are not worth queueing.
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(p) = password {
            options.set_credentials(node_id, p);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let session = Self {
            client: client.clone(),
            node_id: node_id.to_owned(),
            interests: Arc::default(),
            connected: Arc::default(),
            counters: Arc::default(),
        };
        let subnet_topic = format!("nodes/{node_id}/net/subnetwork/result");
        let table_topic = format!("nodes/{node_id}/net/tablequery/result");
        let interests = session.interests.clone();
        let connected = session.connected.clone();
        let counters = session.counters.clone();
        let node = node_id.to_owned();
        let pump = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            let _ = tx.send(Inbound::Rejected(format!("{:?}", ack.code)));
                            tokio::time::sleep(backoff).await;
                            backoff = oakestra_protocol::backoff::double(backoff);
                            continue;
                        }
                        backoff = Duration::from_millis(500);
                        connected.store(true, Ordering::Relaxed);
                        counters.connected();
                        tracing::info!(node = %node, "connected to the cluster broker");
                        let jobs: Vec<String> = interests
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .iter()
                            .cloned()
                            .collect();
                        let topics = [subnet_topic.clone(), table_topic.clone()]
                            .into_iter()
                            .chain(jobs.iter().map(|j| updates_topic(j)));
                        for topic in topics {
                            if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                                tracing::warn!(node = %node, topic = %topic, error = %e, "cannot subscribe");
                            }
                        }
                        let _ = tx.send(Inbound::Connected);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        counters.message_in();
                        let msg = if p.topic == subnet_topic {
                            serde_json::from_slice(&p.payload).map(Inbound::Subnet)
                        } else if p.topic == table_topic {
                            serde_json::from_slice(&p.payload).map(Inbound::Table)
                        } else if let Some(job) = p
                            .topic
                            .strip_prefix("jobs/")
                            .and_then(|t| t.strip_suffix("/updates_available"))
                        {
                            Ok(Inbound::Update(job.to_owned()))
                        } else {
                            continue;
                        };
                        match msg {
                            Ok(m) => {
                                if tx.send(m).is_err() {
                                    return;
                                }
                            }
                            Err(e) => tracing::warn!(
                                node = %node, topic = %p.topic, error = %e,
                                payload = %String::from_utf8_lossy(&p.payload[..p.payload.len().min(512)]),
                                "unreadable message ignored"
                            ),
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => counters.message_out(),
                    Ok(_) => {}
                    Err(e) => {
                        if connected.swap(false, Ordering::Relaxed) {
                            tracing::warn!(node = %node, error = %e, "lost the cluster broker; reconnecting");
                        } else {
                            tracing::debug!(node = %node, error = %e, "broker unreachable");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = oakestra_protocol::backoff::double(backoff);
                    }
                }
            }
        });
        (session, rx, pump)
    }

    /// Connections and messages so far.
    pub fn counters(&self) -> Arc<MqttCounters> {
        Arc::clone(&self.counters)
    }

    /// Whether the broker connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues a QoS 1 publish on `nodes/<id>/<suffix>`.
    pub fn publish(&self, suffix: &str, payload: &impl Serialize) {
        let body = match serde_json::to_vec(payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(suffix, error = %e, "cannot encode a message");
                return;
            }
        };
        let topic = format!("nodes/{}/{suffix}", self.node_id);
        if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, body) {
            tracing::warn!(suffix, error = %e, "message dropped: the outgoing queue is full");
        }
    }

    /// Subscribes to the updates of `job` (now and after every reconnect). Returns false if already subscribed.
    pub fn add_interest(&self, job: &str) -> bool {
        let added = self
            .interests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(job.to_owned());
        if added {
            let _ = self.client.try_subscribe(updates_topic(job), QoS::AtLeastOnce);
        }
        added
    }

    /// Drops the subscription to the updates of `job`.
    pub fn remove_interest(&self, job: &str) {
        let removed = self
            .interests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(job);
        if removed {
            let _ = self.client.try_unsubscribe(updates_topic(job));
        }
    }

    /// The jobs subscribed to.
    pub fn interests(&self) -> Vec<String> {
        self.interests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Sends DISCONNECT (best effort).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}
