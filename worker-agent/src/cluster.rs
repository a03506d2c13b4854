//! The worker's link to its cluster: HTTP registration (with a persisted identity so a restart reclaims the same
//! node id) and the MQTT session (client id `<node id>-ne`, QoS 1) that reconnects with back-off and never gives up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::Method;
use oakestra_protocol::api::cluster::{NodeRegistered, NodeRegistration, REGISTER_PATH};
use oakestra_protocol::mqtt::topics::{Topic, TopicId};
use oakestra_protocol::mqtt::worker::{ConnectionLost, DeleteCommand, DeployCommand};
use oakestra_runtime::client;
use oakestra_runtime::metrics::MqttCounters;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// MQTT client-id (and user) suffix of a NodeEngine.
pub const CLIENT_SUFFIX: &str = "-ne";
/// Largest MQTT packet accepted (a deploy carries the whole job document).
const MAX_PACKET: usize = 1 << 20;

/// Why talking to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The HTTP call failed.
    #[error("registration at {url}: {reason}")]
    Register {
        /// The URL called.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The cluster refused the registration.
    #[error("registration at {url} refused with HTTP {status}: {body}")]
    Refused {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The cluster's answer.
        body: String,
    },
    /// The identity file cannot be written.
    #[error("{}: {reason}", path.display())]
    Identity {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Who this worker is to its cluster: kept in `<state dir>/identity.json` (mode 0600) so that a restarted
/// NodeEngine proves it is the same node (id + current secret) and is not refused as a duplicate hostname.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node id the cluster gave.
    pub node_id: String,
    /// The MQTT secret of the current registration.
    pub mqtt_password: String,
    /// The cluster the identity belongs to (`host:port`); another cluster means a fresh registration.
    pub cluster: String,
    /// The cluster broker's port (told to the NetManager, which connects as `<node id>`).
    #[serde(default = "default_mqtt_port")]
    pub mqtt_port: u16,
}

fn default_mqtt_port() -> u16 {
    10003
}

impl Identity {
    /// The file under `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("identity.json")
    }

    /// Reads the identity; a missing or unreadable file is no identity.
    pub fn load(state_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the identity readable by root only.
    pub fn save(&self, state_dir: &Path) -> Result<(), ClusterError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path(state_dir);
        let fail = |e: std::io::Error| ClusterError::Identity {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(fail)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        f.write_all(&body).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        Ok(())
    }
}

/// Registers the node: `POST /api/node/register` with the reference's body, and the cluster's worker join token as
/// `Authorization: Bearer`. With a previous identity for the same cluster the body carries its id and secret (`id`,
/// `token`), which lets the cluster hand the same id back even while the old session still counts as alive (and
/// admits the worker without the join token).
pub async fn register(
    cluster_host: &str,
    cluster_port: u16,
    mut body: NodeRegistration,
    previous: Option<&Identity>,
    join_token: Option<&str>,
) -> Result<NodeRegistered, ClusterError> {
    let url = format!("{}{REGISTER_PATH}", client::base_url(cluster_host, cluster_port));
    if let Some(me) = previous {
        body.id = me.node_id.clone();
        body.extra.insert(
            "token".into(),
            serde_json::Value::String(me.mqtt_password.clone()),
        );
    }
    let answer = client::call(
        Method::POST,
        &url,
        join_token,
        Some(&body),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| ClusterError::Register {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    if !answer.is_success() {
        return Err(ClusterError::Refused {
            url,
            status: answer.status,
            body: answer.body.to_string(),
        });
    }
    let registered: NodeRegistered =
        serde_json::from_value(answer.body.clone()).map_err(|e| ClusterError::Register {
            url: url.clone(),
            reason: format!("unreadable answer {}: {e}", answer.body),
        })?;
    if registered.id.trim().is_empty() || registered.mqtt_broker_port_u16().is_none() {
        return Err(ClusterError::Register {
            url,
            reason: format!("the answer lacks an id or a broker port: {}", answer.body),
        });
    }
    Ok(registered)
}

/// What the session hands the agent.
#[derive(Debug)]
pub enum Inbound {
    /// `nodes/<id>/control/deploy`.
    Deploy(Box<DeployCommand>),
    /// `nodes/<id>/control/delete`.
    Delete(DeleteCommand),
    /// The broker accepted the connection (first time or after an outage).
    Connected,
    /// The broker refused our credentials: the registration is stale (e.g. the cluster restarted without its
    /// database), so the agent must register again.
    Rejected(String),
}

/// The MQTT session of a NodeEngine.
#[derive(Debug, Clone)]
pub struct Session {
    client: AsyncClient,
    node_id: String,
    connected: Arc<AtomicBool>,
}

impl Session {
    /// Connects (in the background) as `<node_id>-ne` and subscribes to the node's control topics after every
    /// connect. Inbound commands arrive on the returned channel; the pump reconnects with back-off (0.5 s doubling
    /// to 30 s) for as long as the session lives. Connections and messages are counted in `counters`.
    pub fn start(
        host: &str,
        port: u16,
        node_id: &str,
        password: &str,
        counters: Arc<MqttCounters>,
    ) -> (
        Self,
        mpsc::UnboundedReceiver<Inbound>,
        tokio::task::JoinHandle<()>,
    ) {
        let user = format!("{node_id}{CLIENT_SUFFIX}");
        let mut options = MqttOptions::new(&user, host, port);
        options
            .set_credentials(&user, password)
            .set_keep_alive(Duration::from_secs(5))
            // The broker keeps our subscriptions and queues QoS 1 commands while we are away.
            .set_clean_session(false)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        // If this connection ends without a DISCONNECT (a crash, a kill, a reset), the broker tells the cluster at
        // once on `nodes/<id>/lost`, instead of the cluster waiting out its worker timeout.
        match TopicId::new(node_id) {
            Ok(id) => {
                let will = serde_json::to_vec(&ConnectionLost::will()).unwrap_or_default();
                options.set_last_will(LastWill::new(
                    Topic::Lost(id).to_string(),
                    will,
                    QoS::AtLeastOnce,
                    false,
                ));
            }
            Err(e) => {
                tracing::warn!(node = %node_id, error = %e, "no last will: the node id is not a topic segment")
            }
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let session = Self {
            client: client.clone(),
            node_id: node_id.to_owned(),
            connected: connected.clone(),
        };
        let deploy_topic = format!("nodes/{node_id}/control/deploy");
        let delete_topic = format!("nodes/{node_id}/control/delete");
        let node = node_id.to_owned();
        let pump = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            connected.store(false, Ordering::Relaxed);
                            let _ = tx.send(Inbound::Rejected(format!("{:?}", ack.code)));
                            tokio::time::sleep(backoff).await;
                            backoff = oakestra_protocol::backoff::double(backoff);
                            continue;
                        }
                        backoff = Duration::from_millis(500);
                        connected.store(true, Ordering::Relaxed);
                        counters.connected();
                        tracing::info!(node = %node, "connected to the cluster broker");
                        for topic in [&deploy_topic, &delete_topic] {
                            if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                                tracing::warn!(node = %node, topic = %topic, error = %e, "cannot subscribe");
                            }
                        }
                        let _ = tx.send(Inbound::Connected);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        counters.message_in();
                        let inbound = if p.topic == deploy_topic {
                            serde_json::from_slice::<DeployCommand>(&p.payload)
                                .map(|c| Inbound::Deploy(Box::new(c)))
                                .map_err(|e| e.to_string())
                        } else if p.topic == delete_topic {
                            serde_json::from_slice::<DeleteCommand>(&p.payload)
                                .map(Inbound::Delete)
                                .map_err(|e| e.to_string())
                        } else {
                            continue;
                        };
                        match inbound {
                            Ok(msg) => {
                                if tx.send(msg).is_err() {
                                    return;
                                }
                            }
                            Err(reason) => tracing::warn!(
                                node = %node, topic = %p.topic, error = %reason,
                                payload = %String::from_utf8_lossy(&p.payload[..p.payload.len().min(512)]),
                                "unreadable command ignored"
                            ),
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => counters.message_out(),
                    Ok(_) => {}
                    Err(e) => {
                        if connected.swap(false, Ordering::Relaxed) {
                            tracing::warn!(node = %node, error = %e, "lost the cluster broker; reconnecting");
                        } else {
                            tracing::debug!(node = %node, error = %e, retry_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "broker unreachable");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = oakestra_protocol::backoff::double(backoff);
                    }
                }
            }
        });
        (session, rx, pump)
    }

    /// Whether the broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The node id the session publishes for.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Publishes a periodic report on `nodes/<id>/<suffix>` only while connected: a report that is stale by the
    /// time the broker is back is worth nothing, and skipping it keeps the queue free for status changes.
    pub fn publish_periodic(&self, suffix: &str, payload: &impl Serialize) {
        if !self.is_connected() {
            return;
        }
        self.publish(suffix, payload);
    }

    /// Queues a QoS 1 publish on `nodes/<id>/<suffix>`; it is delivered once the broker is reachable.
    pub fn publish(&self, suffix: &str, payload: &impl Serialize) {
        let body = match serde_json::to_vec(payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(suffix, error = %e, "cannot encode a report");
                return;
            }
        };
        let topic = format!("nodes/{}/{suffix}", self.node_id);
        if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, body) {
            tracing::warn!(suffix, error = %e, "report dropped: the outgoing queue is full");
        }
    }

    /// Sends DISCONNECT (best effort).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}
