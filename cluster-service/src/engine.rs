//! The driver around [`State`]: turns MQTT messages, HTTP calls and clock ticks into state changes, and carries out
//! the resulting [`Effect`]s (MQTT commands, database writes, calls to root, early reports).

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::Duration,
};

use hyper::Method;
use oakestra_protocol::{
    api::{
        cluster::{NodeRegistered, NodeRegistration},
        federation::{DEPLOY_RESULT_PATH, DeployResult},
    },
    bearer,
    mqtt::{
        topics::{Topic, TopicId},
        worker::{ControlError, JobStatusReport, NodeInformation, ResourcesReport},
    },
};
use oakestra_runtime::client;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, watch};

use crate::{
    broker::{self, Broker},
    mqtt::{Message, Publisher},
    net::NetCache,
    root_link::{CALL_TIMEOUT, Delivery, RootLink},
    state::{CallError, Effect, RegisterError, State},
    store::{Identity, Store},
};

/// How often freed heap memory is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Milliseconds since 1970 (the clock every state decision uses).
pub fn now_ms() -> u64 {
    u64::try_from(oakestra_runtime::time::now_ms()).unwrap_or(0)
}

/// Who may register as a worker.
#[derive(Clone)]
pub struct Admission {
    /// The worker join token.
    pub join_token: String,
    /// Registration without the token is allowed (reference workers).
    pub open: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("join_token", &"<redacted>")
            .field("open", &self.open)
            .finish()
    }
}

/// Everything the service shares between its tasks.
#[derive(Debug)]
pub struct Engine {
    state: Mutex<State>,
    /// The database.
    pub store: Store,
    /// MQTT commands to workers.
    pub publisher: Publisher,
    /// The broker and its credentials.
    pub broker: Broker,
    /// The way to root.
    pub root: RootLink,
    identity: RwLock<Option<Identity>>,
    report_soon: Notify,
    /// The network service's cache of resolved jobs and interests.
    pub(crate) net: Mutex<NetCache>,
    /// The broker port told to workers.
    pub mqtt_port: u16,
    /// Whether the MQTT client is connected and subscribed.
    pub mqtt_up: watch::Receiver<bool>,
    /// Whether the last report reached root.
    pub connected_to_root: std::sync::atomic::AtomicBool,
    /// Who may register as a worker.
    pub admission: Admission,
    /// The addons' plugin slots, once the addons engine is up: a `cluster_scheduler` plugin places instead.
    slots: std::sync::OnceLock<Arc<oakestra_addons::slots::Slots>>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::ClusterMetrics>,
    /// The bearer token of `GET /metrics`.
    pub metrics_token: std::sync::OnceLock<String>,
}

/// Why a worker registration failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Refused by the registration rules.
    #[error(transparent)]
    Refused(#[from] RegisterError),
    /// The body is not a node document.
    #[error("the body is not a node document: {0}")]
    Body(String),
    /// Neither the worker join token nor the node's own id and secret were presented.
    #[error(
        "a worker registers with the cluster's worker join token (Authorization: Bearer <token>; NodeEngine \
         --join-token, from <cluster data-dir>/worker-join.token), or with its node id and current secret"
    )]
    Unauthorized,
    /// The node could not be saved.
    #[error(transparent)]
    Internal(#[from] crate::Error),
}

impl Engine {
    /// Assembles the engine.
    #[allow(clippy::too_many_arguments, reason = "one call site (start), each part named")]
    pub fn new(
        state: State,
        store: Store,
        publisher: Publisher,
        broker: Broker,
        root: RootLink,
        mqtt_port: u16,
        mqtt_up: watch::Receiver<bool>,
        admission: Admission,
        metrics: Arc<crate::metrics::ClusterMetrics>,
    ) -> Self {
        Self {
            state: Mutex::new(state),
            store,
            publisher,
            broker,
            root,
            identity: RwLock::new(None),
            report_soon: Notify::new(),
            net: Mutex::new(NetCache::default()),
            mqtt_port,
            mqtt_up,
            connected_to_root: std::sync::atomic::AtomicBool::new(false),
            admission,
            slots: std::sync::OnceLock::new(),
            metrics,
            metrics_token: std::sync::OnceLock::new(),
        }
    }

    /// Lets a `cluster_scheduler` plugin in `slots` place instances (the built-in policy stays the fallback).
    pub fn attach_slots(&self, slots: Arc<oakestra_addons::slots::Slots>) {
        self.state()
            .set_plugin_flag(slots.filled_flag(oakestra_protocol::addons::Slot::ClusterScheduler));
        let _ = self.slots.set(slots);
    }

    /// The plugin slots, if the addons engine runs.
    pub fn slots(&self) -> Option<&Arc<oakestra_addons::slots::Slots>> {
        self.slots.get()
    }

    /// Asks the `cluster_scheduler` plugin where an instance goes and carries out the decision (or the built-in
    /// scheduler's, when the plugin cannot be used).
    fn ask_plugin(
        self: Arc<Self>,
        job_id: String,
        number: i64,
        job: Value,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        use oakestra_addons::slots::{Delegation, PluginAnswer};
        use oakestra_protocol::addons::Slot;
        Box::pin(async move {
            let answer = match self.slots.get() {
                Some(slots) => match slots
                    .ask(Slot::ClusterScheduler, &format!("{job_id}/{number}"), job)
                    .await
                {
                    Delegation::Answer(PluginAnswer::Candidate(worker)) => Ok(Some(worker)),
                    Delegation::Answer(PluginAnswer::Refused(status)) => {
                        tracing::info!(job = %job_id, instance = number, status = %status, "the cluster_scheduler plugin found no worker");
                        Ok(None)
                    }
                    Delegation::BuiltIn | Delegation::Fallback(_) => Err(()),
                },
                None => Err(()),
            };
            let (effects, rejected) = self.state().plugin_decided(&job_id, number, answer, now_ms());
            if let (Some(reason), Some(slots)) = (rejected, self.slots.get()) {
                slots.count_fallback(Slot::ClusterScheduler, &format!("{job_id}/{number}"), &reason);
            }
            self.apply(effects).await;
        })
    }

    /// The state, locked. Never held across an `.await`.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The identity root gave, once registered.
    pub fn identity(&self) -> Option<Identity> {
        self.identity
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_identity(&self, identity: Identity) {
        *self.identity.write().unwrap_or_else(PoisonError::into_inner) = Some(identity);
    }

    /// Carries out `effects`: database writes in one transaction first (so a command never refers to state a
    /// crash would lose), then MQTT commands, root calls and early reports.
    pub async fn apply(self: &Arc<Self>, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let writes: Vec<Effect> = effects.iter().filter(|e| e.is_write()).cloned().collect();
        if !writes.is_empty()
            && let Err(e) = self.store.apply(writes).await
        {
            tracing::error!(error = %e, "cannot write the cluster database");
        }
        for effect in effects {
            match effect {
                Effect::Started { millis } => {
                    // Display only: milliseconds of a deploy fit a float exactly.
                    #[allow(
                        clippy::cast_precision_loss,
                        reason = "seconds as a float, as Prometheus wants them"
                    )]
                    self.metrics.deploy_seconds.observe(millis as f64 / 1000.0);
                }
                Effect::AskPlugin { job_id, number, job } => {
                    tokio::spawn(Arc::clone(self).ask_plugin(job_id, number, job));
                }
                Effect::Deploy { node, command } => {
                    self.metrics.decided(true);
                    self.publish(&node, Topic::ControlDeploy, &command).await;
                }
                Effect::Delete { node, command } => {
                    self.publish(&node, Topic::ControlDelete, &command).await;
                }
                Effect::NotRegistered { node } => {
                    self.publish(&node, Topic::ControlError, &ControlError::node_not_registered())
                        .await;
                }
                Effect::Refused {
                    job_id,
                    number,
                    status,
                    detail,
                } => {
                    self.metrics.decided(false);
                    let engine = Arc::clone(self);
                    tokio::spawn(async move {
                        engine
                            .tell_root_refused(&job_id, number, status.as_str(), &detail)
                            .await;
                    });
                }
                Effect::Placed { job_name } => {
                    let engine = Arc::clone(self);
                    tokio::spawn(async move { engine.prefetch(&job_name).await });
                }
                Effect::ReportSoon => self.report_soon.notify_one(),
                Effect::DropNode { node, had_subnet } => {
                    self.broker.revoke_node(&node);
                    if had_subnet {
                        let engine = Arc::clone(self);
                        tokio::spawn(async move { engine.release_subnet(&node).await });
                    }
                }
                // Written above.
                Effect::SaveNode(_)
                | Effect::SaveJob { .. }
                | Effect::DropJob { .. }
                | Effect::SaveInstance { .. }
                | Effect::DropInstance { .. } => {}
            }
        }
    }

    /// Tells root that forgotten worker `node` no longer needs its subnet pair (`DELETE /api/net/subnet`). A failure
    /// is logged: the pair stays taken at root, as it would with a reference root.
    async fn release_subnet(&self, node: &str) {
        let path = format!(
            "{}?worker_id={node}",
            oakestra_protocol::api::federation::SUBNET_PATH
        );
        match self.call_root::<()>(Method::DELETE, &path, None).await {
            Ok(r) if r.is_success() => tracing::info!(node = %node, "worker subnet released at root"),
            Ok(r) => {
                tracing::warn!(node = %node, status = r.status, "root did not release the worker subnet")
            }
            Err(why) => tracing::warn!(node = %node, %why, "cannot release the worker subnet at root"),
        }
    }

    /// Publishes a node command; failures are logged (the self-healing deadlines catch lost commands).
    pub(crate) async fn publish<T: serde::Serialize>(
        &self,
        node: &str,
        topic: fn(TopicId) -> Topic,
        payload: &T,
    ) {
        let topic = match TopicId::new(node) {
            Ok(id) => topic(id),
            Err(e) => {
                tracing::error!(node = %node, error = %e, "node id cannot be a topic segment");
                return;
            }
        };
        match self.publisher.publish(&topic, payload).await {
            Ok(()) => self.metrics.message(false),
            Err(e) => tracing::error!(node = %node, error = %e, "cannot publish"),
        }
    }

    /// Tells root that no worker here can take instance `number`, so root tries another cluster.
    async fn tell_root_refused(&self, job_id: &str, number: i64, status: &str, detail: &str) {
        let body = DeployResult {
            job_id: format!("{job_id}/{number}"),
            instance_number: Some(number),
            candidate_id: None,
            status: Some(status.to_owned()),
            status_detail: Some(detail.to_owned()),
        };
        match self
            .call_root(Method::POST, DEPLOY_RESULT_PATH, Some(&body))
            .await
        {
            Ok(_) => {
                tracing::info!(job = %job_id, instance = number, status, "told root the cluster cannot place the instance")
            }
            Err(why) => {
                tracing::warn!(job = %job_id, instance = number, %why, "cannot tell root; retrying locally")
            }
        }
    }

    /// One authenticated call to root; the answer body on 2xx, a description otherwise.
    pub(crate) async fn call_root<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<client::Response, String> {
        let Some(identity) = self.identity() else {
            return Err("not registered with root yet".to_owned());
        };
        let url = format!("{}{path}", self.root.root_url);
        match client::call(method, &url, Some(&identity.token), body, CALL_TIMEOUT).await {
            Ok(r) if r.is_success() => Ok(r),
            Ok(r) => Err(format!("{url}: HTTP {}: {}", r.status, r.body)),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }

    // --- inputs ------------------------------------------------------------------------------------------------

    /// Handles one message from a worker. Garbage is logged and dropped; nothing here can panic the service.
    pub async fn on_message(self: &Arc<Self>, message: Message) {
        self.metrics.message(true);
        let topic = match Topic::parse(&message.topic) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(topic = %message.topic, error = %e, "ignoring a message outside the contract");
                return;
            }
        };
        let now = now_ms();
        let node = topic.id().as_str().to_owned();
        let effects = match &topic {
            Topic::Information(_) => match decode::<NodeInformation>(&topic, &message.payload) {
                Some(info) => self.state().information(&node, &info, now),
                None => return,
            },
            Topic::JobsResources(_) => match decode::<ResourcesReport>(&topic, &message.payload) {
                Some(report) => self.state().resources(&node, &report, now),
                None => return,
            },
            Topic::Job(_) => match decode::<JobStatusReport>(&topic, &message.payload) {
                Some(report) => self.state().job_status(&node, &report, now),
                None => return,
            },
            Topic::Lost(_) => {
                self.state().connection_lost(&node, now);
                return;
            }
            Topic::NetSubnet(_)
            | Topic::NetTableQueryRequest(_)
            | Topic::NetServiceDeployed(_)
            | Topic::NetServiceAddressChanged(_)
            | Topic::NetInterestRemove(_)
            | Topic::NetServiceUndeployed(_) => {
                self.on_net(&topic, &message.payload).await;
                return;
            }
            // Our own commands and results, echoed because we subscribe to `nodes/+/net/#`.
            _ => return,
        };
        self.apply(effects).await;
    }

    /// `POST /api/node/register`: a stable id per hostname, a fresh MQTT secret, the broker port.
    ///
    /// Admitted with the worker join token (`bearer`), with the node's own id and current secret (`id`, `token` in
    /// the body: a restarting worker), or by anyone with `--open-registration`. A hostname held by a live worker
    /// is given to the newcomer only if it proves to be that worker, or if the old worker's NodeEngine is no longer
    /// connected (it restarted: its connection closed, or its last will arrived).
    pub async fn register_node(
        self: &Arc<Self>,
        body: Value,
        bearer: Option<&str>,
    ) -> Result<NodeRegistered, NodeError> {
        let Value::Object(map) = body else {
            return Err(NodeError::Body(format!("expected a JSON object, got {body}")));
        };
        let raw: NodeRegistration =
            serde_json::from_value(Value::Object(map)).map_err(|e| NodeError::Body(e.to_string()))?;
        // Unknown keys are dropped and every field bounded before anything is stored or logged.
        let registration = raw.bounded().map_err(|e| NodeError::Body(e.to_string()))?;
        let claimed_id = raw.id.clone();
        let token = raw
            .extra
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let proves = |record: &crate::state::NodeRecord| {
            !token.is_empty()
                && record.id == claimed_id
                && broker::verify_password(&record.password_hash, &token)
        };
        let with_token = bearer.is_some_and(|b| bearer::same_secret(b, &self.admission.join_token));
        let known = self.state().node(&claimed_id).is_some_and(|n| proves(&n.record));
        if !(with_token || known || self.admission.open) {
            tracing::warn!(host = ?registration.host, ip = ?registration.ip,
                "worker registration without the join token refused");
            return Err(NodeError::Unauthorized);
        }
        let secret = broker::new_secret();
        let hash = broker::hash_password(&secret);
        let stored = match serde_json::to_value(&registration) {
            Ok(Value::Object(stored)) => stored,
            _ => Map::new(),
        };
        let (id, effects) = self.state().register(
            &registration,
            stored,
            hash.clone(),
            |record| proves(record) || self.node_engine_offline(&record.id),
            new_node_id,
            now_ms(),
        )?;
        self.broker.credentials().set_node(&id, &hash);
        // An external broker takes them with its next reload, within about a second; the worker retries its login.
        self.broker.credentials_changed_soon();
        self.apply(effects).await;
        tracing::info!(node = %id, name = ?registration.host, ip = ?registration.ip, "worker registered");
        let mut answer = NodeRegistered::new(id, self.mqtt_port);
        answer.mqtt_password = Some(secret);
        Ok(answer)
    }

    /// Whether the embedded broker holds no connection of the node's NodeEngine (`false` when unknown: with an
    /// external broker only the last will tells).
    fn node_engine_offline(&self, node: &str) -> bool {
        self.broker.embedded().is_some_and(|embedded| {
            !embedded
                .router()
                .online(&format!("{node}{}", broker::NODE_ENGINE_SUFFIX))
        })
    }

    /// `POST /api/service/<job>/<n>` from root.
    pub async fn deploy(
        self: &Arc<Self>,
        job_id: &str,
        number: i64,
        doc: Map<String, Value>,
    ) -> Result<(), CallError> {
        let effects = self.state().deploy(job_id, number, doc, now_ms())?;
        self.apply(effects).await;
        Ok(())
    }

    /// `DELETE /api/service/<job>/<n|-1>` from root; whether anything was there.
    pub async fn delete(self: &Arc<Self>, job_id: &str, number: i64) -> bool {
        let (found, effects) = self.state().delete(job_id, number);
        self.apply(effects).await;
        found
    }

    // --- loops -------------------------------------------------------------------------------------------------

    /// Handles worker messages until the channel closes.
    pub async fn dispatch(self: Arc<Self>, mut messages: mpsc::UnboundedReceiver<Message>) {
        let mut warned_at = 0usize;
        while let Some(message) = messages.recv().await {
            self.on_message(message).await;
            // Say so once per tenfold growth of the backlog (the queue is unbounded so the MQTT reader never stalls).
            let backlog = messages.len();
            if backlog >= 10_000 && backlog >= warned_at.saturating_mul(10) {
                tracing::warn!(
                    backlog,
                    "worker messages are arriving faster than they are handled"
                );
                warned_at = backlog;
            } else if backlog < 100 {
                warned_at = 0;
            }
        }
    }

    /// Self-healing: one [`State::tick`] per `period` until `stop`.
    pub async fn maintain(self: Arc<Self>, period: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_trim = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stopped(&mut stop) => return,
            }
            let effects = self.state().tick(now_ms());
            self.apply(effects).await;
            if last_trim.elapsed() >= TRIM_EVERY {
                last_trim = tokio::time::Instant::now();
                tokio::task::spawn_blocking(crate::memory::trim);
            }
        }
    }

    /// Registers with root (retrying until it answers), then reports every `period` and soon after each status
    /// change, until `stop`.
    pub async fn report_to_root(self: Arc<Self>, period: Duration, mut stop: watch::Receiver<bool>) {
        let Some(mut identity) = self.root.ensure_registered(&mut stop).await else {
            return;
        };
        tracing::info!(cluster = %self.root.registration.cluster_name, id = %identity.id, "cluster identity");
        self.set_identity(identity.clone());
        let mut connected = None;
        loop {
            let started = tokio::time::Instant::now();
            let body = self.state().report();
            let delivery = self.root.report(&mut identity, &body).await;
            if delivery == Delivery::Reregistered {
                self.set_identity(identity.clone());
            }
            let ok = !matches!(delivery, Delivery::Failed(_));
            if connected != Some(ok) {
                match &delivery {
                    Delivery::Failed(why) => tracing::warn!(%why, "cannot report to root"),
                    _ => tracing::info!("reporting to root"),
                }
                connected = Some(ok);
            }
            self.connected_to_root
                .store(ok, std::sync::atomic::Ordering::Relaxed);
            let took = started.elapsed();
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = self.report_soon.notified() => {
                    // Coalesce a burst of changes into one report; a big report (thousands of instances) waits
                    // longer, so a deploy burst is not slowed by reports of itself.
                    tokio::time::sleep(Duration::from_millis(100).max(took * 4)).await;
                }
                () = stopped(&mut stop) => return,
            }
        }
    }
}

/// Completes once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Decodes a worker or NetManager payload; a bad one is logged with its topic and dropped.
pub(crate) fn decode<T: DeserializeOwned>(topic: &Topic, payload: &[u8]) -> Option<T> {
    match serde_json::from_slice(payload) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(topic = %topic, error = %e, "unreadable payload dropped");
            None
        }
    }
}

/// A fresh node id: 24 random hex digits, shaped like the reference's Mongo ObjectIds.
fn new_node_id() -> String {
    oakestra_runtime::secret::random_hex(12).unwrap_or_else(|_| {
        // Practically unreachable (the OS RNG failed); fall back to the clock, still unique per registration.
        format!("{:024x}", now_ms())
    })
}
