//! The cluster's own MQTT client: subscribes to every worker topic the cluster handles, hands each received message
//! to a channel, and publishes commands.
//!
//! With the embedded broker the client is in-process ([`start_local`]): a session in the broker's router, no
//! socket, so nothing can drop it under a burst. With an external broker it is an MQTT connection as the cluster
//! user ([`start`]), kept up forever: a broker that goes away is retried with capped back-off, and the
//! subscriptions are renewed on every (clean-session) reconnect.

use std::{sync::Arc, time::Duration};

use oakestra_protocol::mqtt::topics::{CLUSTER_MANAGER_SUBSCRIPTIONS, SUB_NODES_LOST, SUB_NODES_NET, Topic};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::{
    broker::{acl::Identity, codec, router::Sink, server::Embedded},
    engine::stopped,
};

/// Largest MQTT packet accepted or sent (a deploy command carries a whole job document).
pub const MAX_PACKET: usize = 1024 * 1024;
/// The user (and client id) the cluster connects as.
pub const CLUSTER_USER: &str = "oakestra-cluster";

/// One message a worker published.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its topic, as received.
    pub topic: String,
    /// Its payload.
    pub payload: bytes::Bytes,
}

/// Publishes to workers; cheap to clone.
#[derive(Debug, Clone)]
pub enum Publisher {
    /// Over an MQTT connection (external broker).
    Remote(AsyncClient),
    /// Straight into the embedded broker's router.
    Local(Arc<Embedded>),
}

impl Publisher {
    /// Publishes `payload` as JSON on `topic` with QoS 1 (what the reference workers subscribe with).
    /// Queued while the broker is away (or, embedded, while the worker's persistent session is offline); an error
    /// means the client is shutting down.
    pub async fn publish<T: Serialize>(&self, topic: &Topic, payload: &T) -> Result<(), String> {
        let body =
            serde_json::to_vec(payload).map_err(|e| format!("encoding the payload for {topic}: {e}"))?;
        match self {
            Self::Remote(client) => client
                .publish(topic.to_string(), QoS::AtLeastOnce, false, body)
                .await
                .map_err(|e| format!("publishing on {topic}: {e}")),
            Self::Local(broker) => {
                broker.router().publish(
                    &Identity::Cluster,
                    &topic.to_string(),
                    body.into(),
                    codec::QoS::AtLeastOnce,
                    false,
                );
                Ok(())
            }
        }
    }

    /// Says goodbye to the broker.
    pub async fn disconnect(&self) {
        if let Self::Remote(client) = self {
            let _ = client.disconnect().await;
        }
    }
}

/// The cluster's client inside the embedded broker: subscribed at once, always up.
pub fn start_local(
    broker: Arc<Embedded>,
) -> (Publisher, mpsc::UnboundedReceiver<Message>, watch::Receiver<bool>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let filters: Vec<(String, codec::QoS)> = subscriptions()
        .into_iter()
        .map(|f| (f, codec::QoS::AtLeastOnce))
        .collect();
    {
        let mut router = broker.router();
        router.connect(CLUSTER_USER, Identity::Cluster, true, Sink::Local(tx));
        router.subscribe(CLUSTER_USER, &filters);
    }
    let (_, up) = watch::channel(true);
    (Publisher::Local(broker), rx, up)
}

/// The filters the cluster subscribes to.
fn subscriptions() -> Vec<String> {
    CLUSTER_MANAGER_SUBSCRIPTIONS
        .iter()
        .chain([&SUB_NODES_NET, &SUB_NODES_LOST])
        .map(|f| (*f).to_owned())
        .collect()
}

/// Connects to `host:port` and starts the connection task. Received messages arrive on the returned channel;
/// `connected` turns true at each CONNACK and false when the connection drops.
pub fn start(
    host: &str,
    port: u16,
    password: &str,
    counters: Arc<oakestra_runtime::metrics::MqttCounters>,
    mut stop: watch::Receiver<bool>,
) -> (Publisher, mpsc::UnboundedReceiver<Message>, watch::Receiver<bool>) {
    let mut options = MqttOptions::new(CLUSTER_USER, host, port);
    options
        .set_credentials(CLUSTER_USER, password)
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    // Small commands go out at once instead of waiting for an ACK (Nagle).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    // Unbounded on purpose: a reader blocked on a full queue stops answering the broker's pings, the broker drops
    // the connection, and the clean-session reconnect loses messages (workers then look dead). The queue drains at
    // the dispatcher's pace; the backlog is logged.
    let (tx, rx) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = watch::channel(false);
    let publisher = Publisher::Remote(client.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = drive(client, eventloop, tx, up_tx, counters) => {}
            () = stopped(&mut stop) => {}
        }
    });
    (publisher, rx, up_rx)
}

/// Polls the connection forever: subscribes after each CONNACK, forwards publishes, backs off on errors.
async fn drive(
    client: AsyncClient,
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Message>,
    up: watch::Sender<bool>,
    counters: Arc<oakestra_runtime::metrics::MqttCounters>,
) {
    let filters: Vec<SubscribeFilter> = subscriptions()
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
        .collect();
    let mut pause = Duration::from_millis(200);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(code = ?ack.code, "connected to the MQTT broker");
                counters.connected();
                pause = Duration::from_millis(200);
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(error = %e, "cannot queue the subscriptions");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::debug!(codes = ?ack.return_codes, "subscribed");
                up.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let message = Message {
                    topic: p.topic,
                    payload: p.payload,
                };
                if tx.send(message).is_err() {
                    return; // The service is stopping.
                }
            }
            Ok(_) => {}
            Err(e) => {
                up.send_replace(false);
                tracing::warn!(error = %e, retry_in = ?pause, "MQTT connection lost");
                tokio::time::sleep(pause).await;
                pause = oakestra_protocol::backoff::doubled(pause, Duration::from_secs(10));
            }
        }
    }
}
