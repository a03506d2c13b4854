//! The cluster's truth in memory: its workers (registration, liveness, latest snapshot), its jobs and their
//! instances, and the instance state machine with self-healing.
//!
//! Pure: every operation takes the wall-clock time in milliseconds and returns the [`Effect`]s the driver
//! ([`crate::engine`]) carries out — MQTT commands to workers, database writes, calls to root — so the whole state
//! machine is unit-tested without a broker, a database or a clock.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use oakestra_protocol::{
    api::{
        cluster::NodeRegistration,
        root::{InstanceReport, JobReport, aggregate_workers},
    },
    mqtt::worker::{DeleteCommand, DeployCommand, JobStatusReport, NodeInformation, ResourcesReport},
    naming::{JobName, NameError},
    sched::{self, Candidate, Capacity, Demand, Policy, Refusal, Reservations},
    status::Status,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::placement::{self, FreeIndex};

/// A last will arriving this long (or longer) after the worker's last message came from the broker's keep-alive
/// running out (1.5 × the workers' 5 s), not from a closed connection: a worker reports every 2 s by default, and a
/// process that dies has its connection closed at once.
pub const WILL_AFTER_SILENCE_MS: u64 = 5_000;

/// The clocks of self-healing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A worker silent for this long is dead (the reference waits 30 s).
    pub worker_timeout_ms: u64,
    /// A worker whose broker connection dropped (its last will arrived) is dead this long afterwards unless it
    /// reports again; never later than the worker timeout.
    pub lost_grace_ms: u64,
    /// Longest time an instance may wait for a worker (`REQUESTED`, `CLUSTER_SCHEDULED`).
    pub scheduling_deadline_ms: u64,
    /// Longest time from the deploy command to the first resource report (`NODE_SCHEDULED`, `CREATING`,
    /// `CREATED`): image pulls over slow links take a while.
    pub deploy_deadline_ms: u64,
    /// A `RUNNING` instance missing from its worker's resource reports for this long has failed.
    pub stale_after_ms: u64,
    /// First pause of the crash-loop back-off; it doubles per consecutive failure.
    pub backoff_base_ms: u64,
    /// Longest pause of the crash-loop back-off.
    pub backoff_cap_ms: u64,
    /// An instance running this long is healthy again: its failure count resets.
    pub stable_after_ms: u64,
    /// Pause before placing again an instance no worker could take.
    pub no_capacity_retry_ms: u64,
    /// A worker dead for this long is forgotten: its record, its MQTT credentials and sessions.
    pub purge_dead_after_ms: u64,
    /// A worker that registered but never published anything for this long is forgotten.
    pub purge_unconnected_after_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            worker_timeout_ms: 10_000,
            lost_grace_ms: 3_000,
            scheduling_deadline_ms: 30_000,
            deploy_deadline_ms: 300_000,
            stale_after_ms: 30_000,
            backoff_base_ms: 2_000,
            backoff_cap_ms: 300_000,
            stable_after_ms: 60_000,
            no_capacity_retry_ms: 15_000,
            purge_dead_after_ms: 3_600_000,
            purge_unconnected_after_ms: 120_000,
        }
    }
}

impl Timing {
    /// How long after its last will a silent worker is dead: the lost grace, never more than the worker timeout.
    pub fn lost_wait_ms(&self) -> u64 {
        self.lost_grace_ms.min(self.worker_timeout_ms)
    }

    /// The pause before restart number `failures` (1 = the first failure).
    pub fn backoff_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        self.backoff_base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_cap_ms)
    }
}

// === Records ===================================================================================================

/// A worker as stored: what it registered with and its MQTT credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id (24 hex digits, like the reference's ObjectIds); also its MQTT topic segment.
    pub id: String,
    /// Its hostname: unique among live workers.
    pub name: String,
    /// The registration (bounded, unknown keys dropped), as compact JSON text: a few hundred bytes per worker in
    /// memory instead of a tree of maps. Stored as a JSON object.
    #[serde(with = "compact_json")]
    pub registration: String,
    /// The `$6$` hash of its MQTT secret.
    pub password_hash: String,
    /// Its overlay subnets (IPv4, IPv6) once root handed them out.
    #[serde(default)]
    pub subnet: Option<(String, String)>,
}

/// A worker with its live state.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// What is persisted.
    pub record: NodeRecord,
    /// The registration merged with every later `information` snapshot (what the report aggregates).
    pub info: Map<String, Value>,
    /// When it last published anything.
    pub last_seen_ms: u64,
    /// Whether it reported within the worker timeout (updated by [`State::tick`]).
    pub alive: bool,
    /// Its last will arrived and it has not reported since (see [`State::connection_lost`]).
    pub connection_lost: bool,
    /// When it registered (or was restored).
    pub registered_ms: u64,
    /// Whether it published anything since it registered (restored workers count as heard).
    pub heard: bool,
}

impl Node {
    fn number(&self, key: &str) -> f64 {
        match self.info.get(key) {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(Value::String(s)) => s.trim().parse().unwrap_or(0.0),
            _ => 0.0,
        }
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.info
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The node's IP as it reported it.
    pub fn ip(&self) -> String {
        self.info
            .get("ip")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

/// One instance of a job on this cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The number root assigned.
    pub instance_number: i64,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// Why, in words.
    #[serde(default)]
    pub status_detail: String,
    /// The worker it is placed on.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// That worker's IP.
    #[serde(default)]
    pub host_ip: Option<String>,
    /// The worker's public IP as it reported it.
    #[serde(default)]
    pub publicip: Option<String>,
    /// CPU use (percent of the node) from the latest resource report.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Memory use from the latest resource report.
    #[serde(default)]
    pub memory_percent: Option<f64>,
    /// Disk use in bytes from the latest resource report.
    #[serde(default)]
    pub disk: Option<f64>,
    /// The last KiB of its log.
    #[serde(default)]
    pub logs: Option<String>,
    /// What the worker's NetManager said about it (`namespace_ip`, `namespace_ip_v6`, `host_port`, …).
    #[serde(default)]
    pub net: Map<String, Value>,
    /// When it entered `status`.
    pub since_ms: u64,
    /// When anything about it last changed or was reported.
    pub last_update_ms: u64,
    /// Consecutive failures (crash loop); reset once it runs for [`Timing::stable_after_ms`].
    #[serde(default)]
    pub failures: u32,
    /// Not placed again before this time (back-off).
    #[serde(default)]
    pub retry_at_ms: u64,
    /// Its worker reported it `DEAD` or `FAILED` itself, so it holds nothing of it any more: placing it again
    /// sends that worker no delete (one racing a new deploy to the same worker would stop the new instance).
    #[serde(default)]
    pub ended_on_worker: bool,
    /// Why it last failed (the worker's reason, or that it stopped), shown in every detail until it runs stably.
    #[serde(default)]
    pub last_failure: Option<String>,
    /// When it was last sent to a worker, until it runs (for the deploy latency; not persisted).
    #[serde(skip)]
    pub placed_ms: Option<u64>,
    /// A scheduler plugin was asked to place it and has not answered yet (not persisted: after a restart the
    /// scheduling deadline places it again).
    #[serde(skip)]
    pub awaiting_plugin: bool,
}

impl Instance {
    fn new(number: i64, now_ms: u64) -> Self {
        Self {
            instance_number: number,
            status: Status::ClusterScheduled,
            status_detail: String::new(),
            worker_id: None,
            host_ip: None,
            publicip: None,
            cpu_percent: None,
            memory_percent: None,
            disk: None,
            logs: None,
            net: Map::new(),
            since_ms: now_ms,
            last_update_ms: now_ms,
            failures: 0,
            retry_at_ms: 0,
            ended_on_worker: false,
            last_failure: None,
            placed_ms: None,
            awaiting_plugin: false,
        }
    }

    /// Sets the status and its detail. Until the instance runs stably again after a failure, every detail also
    /// names the restart and the failure's reason, so a user sees why it is being restarted, not only "creating".
    fn set_status(&mut self, status: Status, detail: impl Into<String>, now_ms: u64) {
        if self.status != status {
            self.since_ms = now_ms;
        }
        let mut detail = detail.into();
        if !status.is_failure()
            && self.failures > 0
            && let Some(why) = &self.last_failure
        {
            let note = format!("restart {} after: {why}", self.failures);
            detail = if detail.is_empty() {
                note
            } else {
                format!("{detail}; {note}")
            };
        }
        self.status = status;
        self.status_detail = detail;
        self.last_update_ms = now_ms;
    }

    fn report(&self) -> InstanceReport {
        InstanceReport {
            instance_number: self.instance_number,
            status: self.status.as_str().to_owned(),
            status_detail: self.status_detail.clone(),
            worker_id: self.worker_id.clone(),
            host_ip: self.host_ip.clone(),
            host_port: self.net.get("host_port").map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            publicip: self.publicip.clone(),
            cpu_percent: self.cpu_percent,
            memory_percent: self.memory_percent,
            disk: self.disk,
            logs: self.logs.clone(),
            #[allow(
                clippy::cast_precision_loss,
                reason = "milliseconds since 1970 fit an f64 exactly"
            )]
            last_modified_timestamp: Some(self.last_update_ms as f64 / 1000.0),
            extra: self
                .net
                .iter()
                .filter(|(k, _)| k.as_str() != "host_port")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// A job (service) with its instances on this cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The id root gave (shared by both tiers).
    pub id: String,
    /// `app.appns.svc.svcns`.
    pub job_name: String,
    /// The job document root sent, without `instance_list`.
    pub doc: Map<String, Value>,
    /// Its instances here, by number.
    pub instances: BTreeMap<i64, Instance>,
}

impl Job {
    fn virtualization(&self) -> String {
        self.doc
            .get("virtualization")
            .and_then(Value::as_str)
            .unwrap_or("docker")
            .to_owned()
    }

    fn demand(&self, number: i64) -> sched::Demand {
        sched::demand_from_job_for_node(&Value::Object(self.doc.clone()), format!("{}/{number}", self.id))
    }

    /// The job status root sees: `RUNNING` only when every instance runs, otherwise the status of the instance
    /// that most needs attention (failed before scheduling before deploying).
    fn summary(&self) -> (String, String) {
        let instances: Vec<&Instance> = self.instances.values().collect();
        if instances.is_empty() {
            return (String::new(), String::new());
        }
        if instances.iter().all(|i| i.status == instances[0].status) {
            let detail = instances
                .iter()
                .map(|i| i.status_detail.as_str())
                .find(|d| !d.is_empty())
                .unwrap_or_default();
            return (instances[0].status.as_str().to_owned(), detail.to_owned());
        }
        let weight = |s: Status| {
            if s.needs_reschedule() {
                0
            } else if s.is_positive_scheduling() {
                1
            } else if s == Status::Running {
                3
            } else {
                2
            }
        };
        let worst = instances
            .iter()
            .min_by_key(|i| (weight(i.status), i.instance_number))
            .copied();
        match worst {
            Some(i) => (
                i.status.as_str().to_owned(),
                format!("instance {}: {}", i.instance_number, i.status_detail),
            ),
            None => (String::new(), String::new()),
        }
    }
}

// === Effects ===================================================================================================

/// What the driver must do after a state change.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the `cluster_scheduler` plugin where instance `number` of `job_id` goes; its answer (or its absence)
    /// goes to [`State::plugin_decided`].
    AskPlugin {
        /// The job id.
        job_id: String,
        /// The instance.
        number: i64,
        /// The job document.
        job: Value,
    },
    /// An instance runs, `millis` after it was sent to its worker (the deploy latency).
    Started {
        /// Milliseconds from the deploy command to the first sign of it running.
        millis: u64,
    },
    /// Publish `control/deploy` to `node`.
    Deploy {
        /// The worker.
        node: String,
        /// The command (the job document plus `instance_number`).
        command: DeployCommand,
    },
    /// Publish `control/delete` to `node`.
    Delete {
        /// The worker.
        node: String,
        /// What to remove.
        command: DeleteCommand,
    },
    /// Publish `control/error` "not registered" to `node`.
    NotRegistered {
        /// The unknown node id.
        node: String,
    },
    /// Persist a worker.
    SaveNode(NodeRecord),
    /// Forget a worker: its database row, its MQTT credentials and broker sessions, and (when it had one) its
    /// subnet pair at root.
    DropNode {
        /// The node id.
        node: String,
        /// Whether root handed it a subnet pair, to be released.
        had_subnet: bool,
    },
    /// Persist a job document.
    SaveJob {
        /// Job id.
        id: String,
        /// Job name.
        job_name: String,
        /// The document.
        doc: Map<String, Value>,
    },
    /// Remove a job and its instances from the database.
    DropJob {
        /// Job id.
        id: String,
    },
    /// Persist an instance.
    SaveInstance {
        /// Job id.
        job_id: String,
        /// The instance.
        instance: Instance,
    },
    /// Remove an instance from the database.
    DropInstance {
        /// Job id.
        job_id: String,
        /// Instance number.
        number: i64,
    },
    /// No worker can take the instance: tell root (`POST /api/result/deploy {job_id: "<job>/<n>", status}`) so it
    /// can try another cluster.
    Refused {
        /// Job id.
        job_id: String,
        /// Instance number.
        number: i64,
        /// The negative scheduling status.
        status: Status,
        /// Why.
        detail: String,
    },
    /// An instance landed on a worker: the network service fetches the job's addresses for its table.
    Placed {
        /// The job name.
        job_name: String,
    },
    /// Something root should hear about before the next periodic report.
    ReportSoon,
}

impl Effect {
    /// Whether the effect is a database write ([`crate::store::Store::apply`] carries those out).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Effect::SaveNode(_)
                | Effect::DropNode { .. }
                | Effect::SaveJob { .. }
                | Effect::DropJob { .. }
                | Effect::SaveInstance { .. }
                | Effect::DropInstance { .. }
        )
    }
}

/// Why a worker registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// `host` is empty.
    #[error("host = {0:?}: a worker registers with its hostname, which must not be empty")]
    NoHost(String),
    /// Another live worker already uses this hostname.
    #[error(
        "host = {host:?}: a live worker (node {id}) already registered with this hostname; give this machine a \
         unique hostname, or wait until the other worker has been silent for {timeout_s} s"
    )]
    Duplicate {
        /// The hostname.
        host: String,
        /// The node holding it.
        id: String,
        /// The worker timeout in seconds.
        timeout_s: u64,
    },
}

/// Why a deploy or delete call from root was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The job document has no usable `job_name`.
    #[error("job_name = {0:?}: the job document must carry its name app.appns.service.servicens")]
    NoJobName(String),
    /// The instance number is negative.
    #[error("instance number = {0}: must be 0 or more (only DELETE accepts -1, meaning every instance)")]
    BadNumber(i64),
    /// The job name breaks the naming rules.
    #[error("job_name: {0}")]
    BadJobName(NameError),
    /// The job id in the path is not an id.
    #[error("job id = {0:?}: must be 1 to 64 letters, digits, '-' or '_'")]
    BadJobId(String),
    /// The job id in the path and the job's name clash with another job.
    #[error("job_name = {name:?} already belongs to job {other}, not {id}")]
    NameTaken {
        /// The name.
        name: String,
        /// The job that has it.
        other: String,
        /// The id in the call.
        id: String,
    },
}

// === State =====================================================================================================

/// The fields of a worker's `information` snapshot the cluster keeps (the reference's dynamic fields).
const INFO_KEYS: [&str; 11] = [
    "ip",
    "cpu_percent",
    "vcpus",
    "memory_percent",
    "memory",
    "gpu_driver",
    "gpu_temp",
    "gpu_usage",
    "vram",
    "vram_percent",
    "vgpus",
];
/// Longest encoded value of one snapshot field.
const MAX_INFO_VALUE: usize = 256;
/// The fields of a worker document that go into the report to root: what root schedules and shows with. The rest
/// (host names, addresses, paths, system details) stays in the cluster, so the report's size does not grow with the
/// number of workers.
const REPORTED_KEYS: [&str; 14] = [
    "cpu_percent",
    "memory_percent",
    "vcpus",
    "memory",
    "vgpus",
    "vram",
    "vram_percent",
    "gpu_temp",
    "gpu_usage",
    "gpu_driver",
    "virtualization",
    "supported_addons",
    "csi_drivers",
    "architecture",
];
/// The tail of an instance's log the cluster keeps (the reference sends 1 KiB).
const MAX_LOGS: usize = 4096;
/// Instances read from one resource report (more than a worker can run).
const MAX_REPORTED_SERVICES: usize = 1024;

/// How long a reconciliation delete for the same (node, job, instance) waits before it is sent again.
const RECONCILE_REPEAT_MS: u64 = 10_000;

/// Workers, jobs and instances.
#[derive(Debug, Default)]
pub struct State {
    /// Self-healing clocks.
    pub timing: Timing,
    /// How workers are chosen.
    pub policy: Policy,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<String, Job>,
    /// Job name → job id.
    names: HashMap<String, String>,
    /// Worker host name → node id.
    hosts: HashMap<String, String>,
    /// (node, job name, instance) → when a reconciliation delete was last sent.
    reconciled: HashMap<(String, String, i64), u64>,
    /// Worker reports about instances placed elsewhere, ignored.
    foreign_reports: u64,
    /// Node → capacity its instances hold (recomputed every tick, raised at each placement).
    held: HashMap<String, Capacity>,
    /// Live workers by free capacity.
    free: FreeIndex,
    /// Set while a `cluster_scheduler` plugin fills the slot: placements are asked of it.
    plugin: Arc<AtomicBool>,
}

impl State {
    /// An empty state with these clocks and policy.
    pub fn new(timing: Timing, policy: Policy) -> Self {
        Self {
            timing,
            policy,
            free: FreeIndex::new(policy),
            ..Self::default()
        }
    }

    /// Restores what the database held. Workers get a full timeout to report again before they count as dead.
    pub fn restore(
        &mut self,
        nodes: Vec<NodeRecord>,
        jobs: Vec<(String, String, Map<String, Value>)>,
        instances: Vec<(String, Instance)>,
        now_ms: u64,
    ) {
        for record in nodes {
            let info = match serde_json::from_str(&record.registration) {
                Ok(Value::Object(map)) => working_set(map),
                _ => Map::new(),
            };
            self.hosts.insert(record.name.clone(), record.id.clone());
            self.nodes.insert(
                record.id.clone(),
                Node {
                    record,
                    info,
                    last_seen_ms: now_ms,
                    alive: true,
                    connection_lost: false,
                    registered_ms: now_ms,
                    heard: true,
                },
            );
        }
        for (id, job_name, doc) in jobs {
            self.names.insert(job_name.clone(), id.clone());
            self.jobs.insert(
                id.clone(),
                Job {
                    id,
                    job_name,
                    doc,
                    instances: BTreeMap::new(),
                },
            );
        }
        for (job_id, mut instance) in instances {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                // The time the service was down is nobody's fault: deadlines restart now.
                instance.since_ms = instance.since_ms.max(now_ms);
                instance.last_update_ms = instance.last_update_ms.max(now_ms);
                job.instances.insert(instance.instance_number, instance);
            }
        }
        self.recompute_held();
    }

    /// Every worker.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// One worker.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// The worker registered under hostname `name`.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.hosts.get(name).and_then(|id| self.nodes.get(id))
    }

    /// Every job.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// One job by id.
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// One job by name.
    pub fn job_by_name(&self, name: &str) -> Option<&Job> {
        self.names.get(name).and_then(|id| self.jobs.get(id))
    }

    // --- workers -----------------------------------------------------------------------------------------------

    /// Registers a worker. A hostname seen before keeps its node id; a hostname held by a *live* worker is refused
    /// unless its connection was lost (last will) or `reclaims` says the newcomer may have it (it sent the node's id
    /// and current secret, or the old worker's NodeEngine is gone from the broker).
    pub fn register(
        &mut self,
        registration: &NodeRegistration,
        body: Map<String, Value>,
        password_hash: String,
        reclaims: impl Fn(&NodeRecord) -> bool,
        new_id: impl FnOnce() -> String,
        now_ms: u64,
    ) -> Result<(String, Vec<Effect>), RegisterError> {
        let host = registration.host.trim();
        if host.is_empty() {
            return Err(RegisterError::NoHost(registration.host.clone()));
        }
        let existing = self.node_by_name(host);
        let id = match existing {
            Some(node) if node.alive && !node.connection_lost && !reclaims(&node.record) => {
                return Err(RegisterError::Duplicate {
                    host: host.to_owned(),
                    id: node.record.id.clone(),
                    timeout_s: self.timing.worker_timeout_ms / 1000,
                });
            }
            Some(node) => node.record.id.clone(),
            None => new_id(),
        };
        let subnet = self.nodes.get(&id).and_then(|n| n.record.subnet.clone());
        let mut registration_map = body;
        registration_map.insert("id".to_owned(), Value::from(id.clone()));
        let record = NodeRecord {
            id: id.clone(),
            name: host.to_owned(),
            registration: Value::Object(registration_map.clone()).to_string(),
            password_hash,
            subnet,
        };
        if let Some(old) = self.nodes.get(&id)
            && old.record.name != host
        {
            self.hosts.remove(&old.record.name);
        }
        self.hosts.insert(host.to_owned(), id.clone());
        self.nodes.insert(
            id.clone(),
            Node {
                record: record.clone(),
                info: working_set(registration_map),
                last_seen_ms: now_ms,
                alive: true,
                connection_lost: false,
                registered_ms: now_ms,
                heard: false,
            },
        );
        self.reindex(&id);
        Ok((id, vec![Effect::SaveNode(record), Effect::ReportSoon]))
    }

    /// Records the subnets root handed out to `node`.
    pub fn set_subnet(&mut self, node: &str, subnet: (String, String)) -> Vec<Effect> {
        match self.nodes.get_mut(node) {
            Some(n) => {
                n.record.subnet = Some(subnet);
                vec![Effect::SaveNode(n.record.clone())]
            }
            None => Vec::new(),
        }
    }

    /// Counts a report by `node` about an instance placed elsewhere (or nowhere), which is ignored; logged the first
    /// time only, so a misbehaving worker cannot flood the log.
    fn foreign_report(&mut self, node: &str, job_name: &str, number: i64, topic: &str) {
        self.foreign_reports += 1;
        if self.foreign_reports == 1 {
            tracing::warn!(node = %node, job = ?job_name, instance = number, topic,
                "a worker reported on an instance that is not placed on it; ignored (further ones are only counted \
                 in GET /api/cluster/status)");
        }
    }

    /// Reports ignored because they were about instances placed on another worker.
    pub fn foreign_reports(&self) -> u64 {
        self.foreign_reports
    }

    /// Marks `node` as heard from. `false` (and a `control/error`) if it is not registered.
    fn seen(&mut self, node: &str, now_ms: u64, effects: &mut Vec<Effect>) -> bool {
        match self.nodes.get_mut(node) {
            Some(n) => {
                n.last_seen_ms = now_ms;
                n.connection_lost = false;
                n.heard = true;
                if !n.alive {
                    n.alive = true;
                    tracing::info!(node = %node, name = %n.record.name, "worker is back");
                    effects.push(Effect::ReportSoon);
                    self.reindex(node);
                }
                true
            }
            None => {
                effects.push(Effect::NotRegistered {
                    node: node.to_owned(),
                });
                false
            }
        }
    }

    /// `nodes/<id>/lost`: the broker published the worker's last will, so its connection ended without a goodbye.
    /// The worker is dead [`Timing::lost_grace_ms`] from now unless it reports again before (a NodeEngine that
    /// restarts at once, or reconnects over a new connection, does). Nothing else changes yet.
    ///
    /// A will that comes [`WILL_AFTER_SILENCE_MS`] or more after the worker's last message is no such evidence:
    /// the broker found the connection silent (its keep-alive ran out: a network cut, the broker's or the
    /// worker's), not closed by a worker process that died, so only the worker timeout applies. A cut shorter than
    /// the timeout then moves nothing.
    pub fn connection_lost(&mut self, node: &str, now_ms: u64) {
        let t = self.timing;
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.alive) else {
            return;
        };
        let silent_ms = now_ms.saturating_sub(n.last_seen_ms);
        if silent_ms >= WILL_AFTER_SILENCE_MS {
            tracing::warn!(node = %node, name = %n.record.name, silent_ms, "worker's broker connection timed out (a network cut?); its instances move only if it stays silent for the worker timeout");
            return;
        }
        // `tick` declares it dead once `now - last_seen > worker_timeout`: move last_seen back so that happens
        // `lost_grace` from now.
        let wait = t.lost_wait_ms();
        let backdated = now_ms.saturating_sub(t.worker_timeout_ms - wait);
        n.last_seen_ms = n.last_seen_ms.min(backdated);
        n.connection_lost = true;
        tracing::warn!(node = %node, name = %n.record.name, grace_ms = wait, "worker's broker connection dropped; its instances move unless it reports within the grace");
    }

    /// `nodes/<id>/information`: the worker's 2 s snapshot.
    pub fn information(&mut self, node: &str, info: &NodeInformation, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if !self.seen(node, now_ms, &mut effects) {
            return effects;
        }
        if let (Ok(patch), Some(n)) = (info.cluster_patch(), self.nodes.get_mut(node)) {
            for (k, v) in patch {
                // Only the snapshot's own fields, each small: unknown keys never grow the worker's document.
                let fits = INFO_KEYS.contains(&k.as_str())
                    && v.to_string().len() <= MAX_INFO_VALUE
                    && (k != "ip"
                        || v.as_str()
                            .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok()));
                if fits {
                    n.info.insert(k, v);
                }
            }
            self.reindex(node);
        }
        effects
    }

    /// `nodes/<id>/jobs/resources`: marks the listed instances `RUNNING`, stores their metrics, and deletes the
    /// ones this cluster does not place on that worker.
    pub fn resources(&mut self, node: &str, report: &ResourcesReport, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if !self.seen(node, now_ms, &mut effects) {
            return effects;
        }
        for service in report.services.iter().take(MAX_REPORTED_SERVICES) {
            let number = service.instance;
            let instance = self
                .names
                .get(&service.job_name)
                .and_then(|id| self.jobs.get_mut(id))
                .and_then(|job| job.instances.get_mut(&number).map(|i| (job.id.clone(), i)));
            match instance {
                Some((job_id, i)) if i.worker_id.as_deref() == Some(node) && !i.status.is_terminal() => {
                    if matches!(
                        i.status,
                        Status::NodeScheduled | Status::Creating | Status::Created
                    ) {
                        i.set_status(Status::Running, "", now_ms);
                        if let Some(placed) = i.placed_ms.take() {
                            effects.push(Effect::Started {
                                millis: now_ms.saturating_sub(placed),
                            });
                        }
                        tracing::info!(job = %service.job_name, instance = number, node = %node, "instance running");
                        effects.push(Effect::SaveInstance {
                            job_id,
                            instance: i.clone(),
                        });
                        effects.push(Effect::ReportSoon);
                    }
                    if i.status == Status::Running {
                        i.cpu_percent = service.cpu_percent_f64();
                        i.memory_percent = service.memory_percent_f64();
                        i.disk = service.disk_f64();
                        i.logs = Some(log_tail(&service.logs).to_owned());
                        i.last_update_ms = now_ms;
                    }
                }
                Some((_, i)) if i.worker_id.as_deref() == Some(node) => {}
                _ => self.reconcile(
                    node,
                    &service.job_name,
                    &service.virtualization,
                    number,
                    now_ms,
                    &mut effects,
                ),
            }
        }
        effects
    }

    /// Tells `node` to remove an instance this cluster does not place there (at most every 10 s per instance).
    fn reconcile(
        &mut self,
        node: &str,
        job_name: &str,
        virtualization: &str,
        number: i64,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let key = (node.to_owned(), job_name.to_owned(), number);
        if let Some(&at) = self.reconciled.get(&key)
            && now_ms.saturating_sub(at) < RECONCILE_REPEAT_MS
        {
            return;
        }
        tracing::info!(node = %node, job = %job_name, instance = number, "worker runs an instance this cluster does not place there; deleting it");
        self.reconciled.insert(key, now_ms);
        effects.push(Effect::Delete {
            node: node.to_owned(),
            command: DeleteCommand::new(job_name, virtualization, number),
        });
    }

    /// `nodes/<id>/job`: a status change the worker observed.
    pub fn job_status(&mut self, node: &str, report: &JobStatusReport, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if !self.seen(node, now_ms, &mut effects) {
            return effects;
        }
        let Ok(status) = report.status.parse::<Status>() else {
            tracing::warn!(node = %node, job = %report.sname, status = %report.status, "unknown status in a job report; ignored");
            return effects;
        };
        let timing = self.timing;
        // Unknown instances are reconciled from resource reports, which name the runtime a delete needs.
        let Some(job) = self.names.get(&report.sname).and_then(|id| self.jobs.get_mut(id)) else {
            return effects;
        };
        let job_id = job.id.clone();
        let Some(i) = job.instances.get_mut(&report.instance) else {
            return effects;
        };
        if i.worker_id.as_deref() != Some(node) {
            // A report from a worker the instance has moved away from (the delete is already on its way), or from a
            // worker speaking about another's instance.
            self.foreign_report(node, &report.sname, report.instance, "job");
            return effects;
        }
        if !report.publicip.is_empty() {
            i.publicip = Some(report.publicip.clone());
        }
        // A worker-side removal nobody asked for is a death like any other.
        let status = if status == Status::Undeployed {
            Status::Dead
        } else {
            status
        };
        if i.status == status
            && status == Status::Creating
            && !report.status_detail.is_empty()
            && !i.status_detail.starts_with(&report.status_detail)
        {
            // Progress while it is created (e.g. `pulling <image>: 12.3 of 45.6 MiB`): root sees it with the next
            // report.
            i.set_status(status, report.status_detail.clone(), now_ms);
            effects.push(Effect::SaveInstance {
                job_id,
                instance: i.clone(),
            });
            return effects;
        }
        if !i.status.can_transition(status) || i.status == status {
            return effects;
        }
        match status {
            Status::Failed | Status::Dead if i.ended_on_worker && i.status.is_failure() => {
                // The same end told twice (a worker reports FAILED with the reason, then the cleanup's UNDEPLOYED):
                // one failure, and the reason stays. Only a reason arriving after a reasonless end replaces it.
                if report.status_detail.is_empty() || i.last_failure.as_deref() != Some(STOPPED) {
                    return effects;
                }
                i.last_failure = Some(report.status_detail.clone());
                let pause = i.retry_at_ms.saturating_sub(now_ms);
                let detail = failure_detail(&report.status_detail, i.failures, pause);
                i.set_status(status, detail, now_ms);
            }
            Status::Failed | Status::Dead => {
                i.ended_on_worker = true;
                i.failures = i.failures.saturating_add(1);
                let pause = timing.backoff_ms(i.failures);
                i.retry_at_ms = now_ms.saturating_add(pause);
                let why = if report.status_detail.is_empty() {
                    STOPPED.to_owned()
                } else {
                    report.status_detail.clone()
                };
                let detail = failure_detail(&why, i.failures, pause);
                tracing::warn!(job = %report.sname, instance = report.instance, node = %node, status = %status, detail = %detail, "instance failed");
                i.last_failure = Some(why);
                i.set_status(status, detail, now_ms);
            }
            _ => {
                if status == Status::Running
                    && let Some(placed) = i.placed_ms.take()
                {
                    effects.push(Effect::Started {
                        millis: now_ms.saturating_sub(placed),
                    });
                }
                i.set_status(status, report.status_detail.clone(), now_ms);
            }
        }
        effects.push(Effect::SaveInstance {
            job_id,
            instance: i.clone(),
        });
        effects.push(Effect::ReportSoon);
        effects
    }

    // --- calls from root ---------------------------------------------------------------------------------------

    /// `POST /api/service/<job>/<n>`: root placed instance `number` of `doc` here. Idempotent: an instance that
    /// already exists is left alone.
    pub fn deploy(
        &mut self,
        job_id: &str,
        number: i64,
        mut doc: Map<String, Value>,
        now_ms: u64,
    ) -> Result<Vec<Effect>, CallError> {
        if number < 0 {
            return Err(CallError::BadNumber(number));
        }
        let job_name = doc
            .get("job_name")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        if job_name.is_empty() {
            return Err(CallError::NoJobName(
                doc.get("job_name").map(Value::to_string).unwrap_or_default(),
            ));
        }
        // The name becomes container, log file and topic names on workers: only app.appns.svc.svcns.
        job_name.parse::<JobName>().map_err(CallError::BadJobName)?;
        if !is_valid_job_id(job_id) {
            return Err(CallError::BadJobId(job_id.to_owned()));
        }
        if let Some(other) = self.names.get(&job_name)
            && other != job_id
        {
            return Err(CallError::NameTaken {
                name: job_name,
                other: other.clone(),
                id: job_id.to_owned(),
            });
        }
        doc.remove("instance_list");
        doc.insert("_id".to_owned(), Value::from(job_id));
        let mut effects = Vec::new();
        let job = self.jobs.entry(job_id.to_owned()).or_insert_with(|| Job {
            id: job_id.to_owned(),
            job_name: job_name.clone(),
            doc: Map::new(),
            instances: BTreeMap::new(),
        });
        if job.doc != doc {
            job.doc = doc;
            effects.push(Effect::SaveJob {
                id: job.id.clone(),
                job_name: job_name.clone(),
                doc: job.doc.clone(),
            });
        }
        self.names.insert(job_name, job_id.to_owned());
        if job.instances.contains_key(&number) {
            return Ok(effects);
        }
        job.instances.insert(number, Instance::new(number, now_ms));
        self.place(job_id, number, now_ms, &mut effects);
        Ok(effects)
    }

    /// `DELETE /api/service/<job>/<n|-1>`: removes the instance (or, for -1, every instance and the job). Whether
    /// anything was there.
    pub fn delete(&mut self, job_id: &str, number: i64) -> (bool, Vec<Effect>) {
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return (false, effects);
        };
        let numbers: Vec<i64> = if number < 0 {
            job.instances.keys().copied().collect()
        } else {
            job.instances.keys().copied().filter(|n| *n == number).collect()
        };
        let found = !numbers.is_empty() || number < 0;
        let virtualization = job.virtualization();
        for n in numbers {
            if let Some(i) = job.instances.remove(&n) {
                if let Some(worker) = i.worker_id {
                    effects.push(Effect::Delete {
                        node: worker,
                        command: DeleteCommand::new(job.job_name.clone(), virtualization.clone(), n),
                    });
                }
                effects.push(Effect::DropInstance {
                    job_id: job_id.to_owned(),
                    number: n,
                });
            }
        }
        if job.instances.is_empty() {
            let name = job.job_name.clone();
            self.jobs.remove(job_id);
            self.names.remove(&name);
            effects.push(Effect::DropJob {
                id: job_id.to_owned(),
            });
        }
        effects.push(Effect::ReportSoon);
        (found, effects)
    }

    // --- scheduling --------------------------------------------------------------------------------------------

    /// The live workers as scheduling candidates, with the capacity already promised to instances counted out:
    /// every placed instance holds its vCPUs and GPUs; one not yet running also holds its memory (a running one's
    /// memory already shows in the worker's reported free memory).
    /// Every worker as a placement candidate (the full scan: constraints by name, first-fit, refusals).
    fn candidates(&self) -> Vec<Candidate> {
        self.nodes.values().map(|n| self.candidate(n)).collect()
    }

    /// The workers as a scheduler plugin sees them (the reference resource abstractor's shape: free capacity,
    /// `active` = alive), `active_only` leaving out dead ones.
    pub fn plugin_candidates(&self, active_only: bool) -> Vec<Value> {
        self.nodes
            .values()
            .map(|n| self.candidate(n))
            .filter(|c| !active_only || c.active)
            .map(|c| c.resource_document("node_name"))
            .collect()
    }

    /// What a worker offers: its reported capacity minus what its instances hold.
    fn candidate(&self, n: &Node) -> Candidate {
        let free = self.free_of(n);
        let arch = n
            .info
            .get("architecture")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .unwrap_or("unknown")
            .to_owned();
        Candidate {
            id: n.record.id.clone(),
            name: n.record.name.clone(),
            active: n.alive,
            virtualization: n.strings("virtualization"),
            cpu_percent: n.number("cpu_percent"),
            total: free,
            per_arch: BTreeMap::from([(arch, free)]),
            max_node: None,
            csi_drivers: n
                .info
                .get("csi_drivers")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|d| {
                            d.get("csi_driver_name")
                                .and_then(Value::as_str)
                                .or_else(|| d.as_str())
                                .map(str::to_owned)
                        })
                        .collect()
                })
                .unwrap_or_default(),
            addons: n.strings("supported_addons"),
        }
    }

    /// A worker's free capacity: what it reports minus what its instances hold.
    fn free_of(&self, n: &Node) -> Capacity {
        let whole = Capacity::new(
            whole_units(n.number("vcpus")),
            whole_units(n.number("memory")),
            whole_units(n.number("vgpus")),
        );
        whole.saturating_sub(self.held.get(&n.record.id).copied().unwrap_or_default())
    }

    /// Puts `node` where its free capacity says in the placement index (out of it while dead or gone).
    fn reindex(&mut self, node: &str) {
        let slot = self.nodes.get(node).filter(|n| n.alive).map(|n| placement::Slot {
            free: self.free_of(n),
            cpu_percent: n.number("cpu_percent"),
            name: n.record.name.clone(),
        });
        self.free.set(node, slot);
    }

    /// Recomputes what every worker's instances hold (an instance being deployed holds its vCPUs and memory; a
    /// running one only its vCPUs, since the worker's reported free memory already counts it), then the index.
    fn recompute_held(&mut self) {
        let mut held: HashMap<String, Capacity> = HashMap::new();
        for job in self.jobs.values() {
            let need = job.demand(0).need;
            for i in job.instances.values() {
                if let Some(w) = i.worker_id.as_deref()
                    && i.status.occupies_worker()
                {
                    let memory = if i.status == Status::Running {
                        0
                    } else {
                        need.memory_mib
                    };
                    let h = held.entry(w.to_owned()).or_default();
                    *h = h.saturating_add(Capacity::new(need.vcpus, memory, need.gpus));
                }
            }
        }
        self.held = held;
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids {
            self.reindex(&id);
        }
    }

    /// Lets a `cluster_scheduler` plugin place instances while `flag` is set (the addons engine sets it while a
    /// plugin fills the slot).
    pub fn set_plugin_flag(&mut self, flag: Arc<AtomicBool>) {
        self.plugin = flag;
    }

    /// Picks a worker for instance `number` and sends it the deploy command, or records why none fits and tells
    /// root. While a scheduler plugin fills the slot, asks it instead ([`Effect::AskPlugin`]); its answer comes back
    /// through [`State::plugin_decided`].
    fn place(&mut self, job_id: &str, number: i64, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.plugin.load(Ordering::Relaxed) {
            let Some(job) = self.jobs.get_mut(job_id) else {
                return;
            };
            let doc = Value::Object(job.doc.clone());
            let Some(i) = job.instances.get_mut(&number) else {
                return;
            };
            if !i.awaiting_plugin {
                i.awaiting_plugin = true;
                i.status_detail = "waiting for the cluster_scheduler plugin".into();
                effects.push(Effect::AskPlugin {
                    job_id: job_id.to_owned(),
                    number,
                    job: doc,
                });
            }
            return;
        }
        self.place_built_in(job_id, number, now_ms, effects);
    }

    /// The plugin's answer for instance `number` of `job_id`: the worker it chose (`Ok(Some)`), none (`Ok(None)`,
    /// recorded as no capacity), or no usable answer (`Err`: the built-in scheduler places). A chosen worker that is
    /// unknown, dead or cannot take the instance also makes the built-in scheduler place; the reason is returned.
    pub fn plugin_decided(
        &mut self,
        job_id: &str,
        number: i64,
        answer: Result<Option<String>, ()>,
        now_ms: u64,
    ) -> (Vec<Effect>, Option<String>) {
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return (effects, None);
        };
        let demand = job.demand(number);
        let Some(i) = job.instances.get_mut(&number) else {
            return (effects, None);
        };
        if !std::mem::take(&mut i.awaiting_plugin) {
            return (effects, None);
        }
        let choice = match answer {
            Err(()) => None,
            Ok(None) => Some(Err(Refusal::NoCapacity)),
            Ok(Some(worker)) => {
                let fits = self.nodes.get(&worker).filter(|n| n.alive).is_some_and(|n| {
                    sched::place(
                        std::slice::from_ref(&self.candidate(n)),
                        &demand,
                        &Reservations::new(),
                        self.policy,
                    )
                    .is_ok()
                });
                if fits {
                    let name = self
                        .nodes
                        .get(&worker)
                        .map(|n| n.record.name.clone())
                        .unwrap_or_default();
                    Some(Ok((worker, name)))
                } else {
                    self.place_built_in(job_id, number, now_ms, &mut effects);
                    return (
                        effects,
                        Some(format!(
                            "the plugin chose worker {worker}, which is unknown, dead or cannot take the instance"
                        )),
                    );
                }
            }
        };
        match choice {
            Some(choice) => self.commit_placement(job_id, number, demand, choice, now_ms, &mut effects),
            None => self.place_built_in(job_id, number, now_ms, &mut effects),
        }
        (effects, None)
    }

    /// The built-in placement: the free-capacity index, or the full scan.
    fn place_built_in(&mut self, job_id: &str, number: i64, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let demand = job.demand(number);
        // The index visits the few workers around the demand's size; only constraints by name, first-fit and
        // refusals (which name the rule that left nothing) scan every worker.
        let indexed = self
            .free
            .choose(&demand, |id| self.nodes.get(id).map(|n| self.candidate(n)));
        let choice = match indexed {
            Some(c) => Ok((c.id, c.name)),
            None => placement::full_scan(&self.candidates(), &demand, self.policy).map(|c| (c.id, c.name)),
        };
        self.commit_placement(job_id, number, demand, choice, now_ms, effects);
    }

    /// Records a placement decision: the deploy command to the chosen worker, or the refusal (told to root).
    fn commit_placement(
        &mut self,
        job_id: &str,
        number: i64,
        demand: Demand,
        choice: Result<(String, String), Refusal>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        if let Ok((worker, _)) = &choice {
            let need = demand.need;
            let h = self.held.entry(worker.clone()).or_default();
            *h = h.saturating_add(need);
            let worker = worker.clone();
            self.reindex(&worker);
        }
        let no_capacity_retry = self.timing.no_capacity_retry_ms;
        let ip = choice
            .as_ref()
            .ok()
            .and_then(|(id, _)| self.nodes.get(id))
            .map(Node::ip);
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let job_name = job.job_name.clone();
        let command = DeployCommand::from_job_document(job.doc.clone(), number);
        let Some(i) = job.instances.get_mut(&number) else {
            return;
        };
        match (choice, command) {
            (Ok((worker, name)), Ok(command)) => {
                i.worker_id = Some(worker.clone());
                i.host_ip = ip;
                i.cpu_percent = None;
                i.memory_percent = None;
                i.set_status(Status::NodeScheduled, format!("sent to worker {name}"), now_ms);
                i.placed_ms = Some(now_ms);
                tracing::info!(job = %job_name, instance = number, node = %worker, name = %name, "instance placed");
                effects.push(Effect::Deploy {
                    node: worker,
                    command,
                });
                effects.push(Effect::Placed { job_name });
            }
            (Err(refusal), _) => {
                let status = refusal.cluster_status();
                let detail = refusal_detail(refusal);
                tracing::warn!(job = %job_name, instance = number, status = %status, "no worker can take the instance");
                i.worker_id = None;
                i.host_ip = None;
                i.retry_at_ms = now_ms.saturating_add(no_capacity_retry);
                i.set_status(status, detail.clone(), now_ms);
                effects.push(Effect::Refused {
                    job_id: job_id.to_owned(),
                    number,
                    status,
                    detail,
                });
            }
            (Ok(_), Err(e)) => {
                i.worker_id = None;
                i.retry_at_ms = now_ms.saturating_add(no_capacity_retry);
                i.set_status(
                    Status::Failed,
                    format!("the job document cannot become a deploy command: {e}"),
                    now_ms,
                );
            }
        }
        effects.push(Effect::SaveInstance {
            job_id: job_id.to_owned(),
            instance: i.clone(),
        });
        effects.push(Effect::ReportSoon);
    }

    /// Sends an instance back to `REQUESTED` (removing it from its old worker) and places it again.
    fn reschedule(&mut self, job_id: &str, number: i64, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let (job_name, virtualization) = (job.job_name.clone(), job.virtualization());
        let Some(i) = job.instances.get_mut(&number) else {
            return;
        };
        let ended_on_worker = std::mem::take(&mut i.ended_on_worker);
        if let Some(old) = i.worker_id.take()
            && !ended_on_worker
        {
            // The old worker may still hold it (e.g. it only looked dead, or missed a deadline); a delete is
            // harmless if not.
            effects.push(Effect::Delete {
                node: old,
                command: DeleteCommand::new(job_name, virtualization, number),
            });
        }
        let detail = i.status_detail.clone();
        i.set_status(Status::Requested, format!("rescheduling: {detail}"), now_ms);
        self.place(job_id, number, now_ms, effects);
    }

    // --- self-healing ------------------------------------------------------------------------------------------

    /// One pass of self-healing: dead workers, per-state deadlines, back-off expiry.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let t = self.timing;
        // Dead workers with why, for the instances' status detail.
        let mut dead: Vec<(String, String)> = Vec::new();
        for n in self.nodes.values_mut() {
            if n.alive && now_ms.saturating_sub(n.last_seen_ms) > t.worker_timeout_ms {
                n.alive = false;
                let why = if n.connection_lost {
                    format!(
                        "worker {}'s broker connection dropped and it did not come back within {} ms",
                        n.record.id,
                        t.lost_wait_ms()
                    )
                } else {
                    format!(
                        "worker {} stopped reporting for {} s",
                        n.record.id,
                        t.worker_timeout_ms / 1000
                    )
                };
                tracing::warn!(node = %n.record.id, name = %n.record.name, why = %why, "worker is dead; rescheduling its instances");
                dead.push((n.record.id.clone(), why));
                effects.push(Effect::ReportSoon);
            }
        }
        self.reconciled
            .retain(|_, at| now_ms.saturating_sub(*at) < RECONCILE_REPEAT_MS);
        self.purge(now_ms, &mut effects);
        self.recompute_held();

        let mut redo = Vec::new();
        for job in self.jobs.values_mut() {
            for i in job.instances.values_mut() {
                let in_state = now_ms.saturating_sub(i.since_ms);
                let worker_dead = i
                    .worker_id
                    .as_ref()
                    .and_then(|w| dead.iter().find(|(id, _)| id == w));
                let failed = if let Some((_, why)) = worker_dead
                    && !i.status.is_terminal()
                    && !i.status.needs_reschedule()
                {
                    Some(why.clone())
                } else {
                    match i.status {
                        Status::Requested | Status::ClusterScheduled
                            if in_state > t.scheduling_deadline_ms =>
                        {
                            Some(format!("not placed within {} s", t.scheduling_deadline_ms / 1000))
                        }
                        Status::NodeScheduled | Status::Creating | Status::Created
                            if in_state > t.deploy_deadline_ms =>
                        {
                            Some(format!(
                                "stuck in {} for {} s on worker {}",
                                i.status,
                                in_state / 1000,
                                i.worker_id.clone().unwrap_or_default()
                            ))
                        }
                        Status::Running if now_ms.saturating_sub(i.last_update_ms) > t.stale_after_ms => {
                            Some(format!(
                                "no resource report from worker {} for {} s",
                                i.worker_id.clone().unwrap_or_default(),
                                t.stale_after_ms / 1000
                            ))
                        }
                        _ => None,
                    }
                };
                if let Some(why) = failed {
                    tracing::warn!(job = %job.job_name, instance = i.instance_number, status = %i.status, why = %why, "instance failed; rescheduling");
                    i.retry_at_ms = now_ms;
                    i.set_status(Status::Failed, why, now_ms);
                }
                if i.status == Status::Running && i.failures > 0 && in_state > t.stable_after_ms {
                    i.failures = 0;
                    i.last_failure = None;
                    effects.push(Effect::SaveInstance {
                        job_id: job.id.clone(),
                        instance: i.clone(),
                    });
                }
                if i.status.needs_reschedule() && now_ms >= i.retry_at_ms {
                    redo.push((job.id.clone(), i.instance_number));
                }
            }
        }
        for (job_id, number) in redo {
            self.reschedule(&job_id, number, now_ms, &mut effects);
        }
        effects
    }

    /// Forgets workers dead for [`Timing::purge_dead_after_ms`] and workers that never published anything within
    /// [`Timing::purge_unconnected_after_ms`] of registering.
    fn purge(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let t = self.timing;
        let gone: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                let dead_long = !n.alive && now_ms.saturating_sub(n.last_seen_ms) > t.purge_dead_after_ms;
                let never = !n.heard && now_ms.saturating_sub(n.registered_ms) > t.purge_unconnected_after_ms;
                dead_long || never
            })
            .map(|n| n.record.id.clone())
            .collect();
        for id in gone {
            if let Some(n) = self.nodes.remove(&id) {
                self.free.set(&id, None);
                self.held.remove(&id);
                if self.hosts.get(&n.record.name) == Some(&id) {
                    self.hosts.remove(&n.record.name);
                }
                tracing::info!(node = %id, name = ?n.record.name, heard = n.heard, "worker forgotten (dead or never connected for too long)");
                effects.push(Effect::DropNode {
                    node: id,
                    had_subnet: n.record.subnet.is_some(),
                });
            }
        }
    }

    // --- reporting ---------------------------------------------------------------------------------------------

    /// The body of the periodic report to root: the aggregate over live workers plus every job.
    pub fn report(&self) -> Map<String, Value> {
        let live: Vec<Map<String, Value>> = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| {
                n.info
                    .iter()
                    .filter(|(k, _)| REPORTED_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect();
        let mut body = aggregate_workers(&live);
        let jobs: Vec<JobReport> = self
            .jobs
            .values()
            .map(|job| {
                let (status, status_detail) = job.summary();
                JobReport {
                    id: job.id.clone(),
                    job_name: job.job_name.clone(),
                    status,
                    status_detail,
                    instance_list: job.instances.values().map(Instance::report).collect(),
                    extra: Map::new(),
                }
            })
            .collect();
        body.insert(
            "jobs".to_owned(),
            serde_json::to_value(jobs).unwrap_or(Value::Array(Vec::new())),
        );
        body
    }

    /// Records what a worker's NetManager said about an instance (`service/deployed`, `address-changed`); the
    /// instance's entry for root's `net_deploy_status`, if the instance is known.
    /// Only `node`, where the instance is placed, may report them: anything else is counted and ignored.
    pub fn instance_net(
        &mut self,
        node: &str,
        job_name: &str,
        number: i64,
        fields: Map<String, Value>,
        now_ms: u64,
    ) -> Option<(String, Vec<Effect>)> {
        let job = self.names.get(job_name).and_then(|id| self.jobs.get_mut(id))?;
        let placed_there = job
            .instances
            .get(&number)
            .is_some_and(|i| i.worker_id.as_deref() == Some(node));
        if !placed_there {
            self.foreign_report(node, job_name, number, "net/service");
            return None;
        }
        let job = self.names.get(job_name).and_then(|id| self.jobs.get_mut(id))?;
        let i = job.instances.get_mut(&number)?;
        for (k, v) in fields {
            i.net.insert(k, v);
        }
        i.last_update_ms = now_ms;
        Some((
            job.id.clone(),
            vec![Effect::SaveInstance {
                job_id: job.id.clone(),
                instance: i.clone(),
            }],
        ))
    }
}

/// The part of a worker document the cluster works with (placement, liveness, the report): the snapshot's fields
/// and the reported ones. The rest of the registration stays in the record only.
fn working_set(mut doc: Map<String, Value>) -> Map<String, Value> {
    doc.retain(|k, _| INFO_KEYS.contains(&k.as_str()) || REPORTED_KEYS.contains(&k.as_str()));
    doc
}

/// A JSON object kept as compact text in memory (see [`NodeRecord::registration`]).
mod compact_json {
    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        serde_json::from_str::<Value>(text)
            .unwrap_or(Value::Null)
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(Value::deserialize(d)?.to_string())
    }
}

/// The last [`MAX_LOGS`] bytes of `logs` (cut at a character boundary).
fn log_tail(logs: &str) -> &str {
    let mut start = logs.len().saturating_sub(MAX_LOGS);
    while !logs.is_char_boundary(start) {
        start += 1;
    }
    &logs[start..]
}

/// Whether `id` can be a job id (root's are 24 hex digits).
pub fn is_valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// A reported amount as a whole number (negative and garbage are 0; fractions round down).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "clamped to [0, 2^53] first; a fraction of a core or MiB is not offered"
)]
fn whole_units(x: f64) -> u64 {
    if x.is_finite() {
        x.clamp(0.0, 9_007_199_254_740_992.0) as u64
    } else {
        0
    }
}

/// The status detail for a refusal.
/// The reason a worker gives no reason for an instance's end.
const STOPPED: &str = "the instance stopped";

/// An end's detail: the reason, and when it is restarted (in a crash loop, the how-manieth failure it is).
fn failure_detail(why: &str, failures: u32, pause_ms: u64) -> String {
    if failures > 1 {
        format!(
            "{why}; crash loop: failure {failures} in a row, restarting in {} s",
            pause_ms.div_ceil(1000)
        )
    } else {
        format!("{why}; restarting in {} s", pause_ms.div_ceil(1000))
    }
}

fn refusal_detail(refusal: Refusal) -> String {
    format!("{refusal} (cluster scheduler)")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;

    const T0: u64 = 1_000_000;

    fn state() -> State {
        State::new(
            Timing {
                worker_timeout_ms: 1_000,
                lost_grace_ms: 300,
                scheduling_deadline_ms: 5_000,
                deploy_deadline_ms: 3_000,
                stale_after_ms: 4_000,
                backoff_base_ms: 1_000,
                backoff_cap_ms: 8_000,
                stable_after_ms: 10_000,
                no_capacity_retry_ms: 2_000,
                purge_dead_after_ms: 20_000,
                purge_unconnected_after_ms: 5_000,
            },
            Policy::BestFit,
        )
    }

    #[test]
    fn workers_dead_or_never_heard_from_are_forgotten() {
        let mut s = state();
        let quiet = join(&mut s, "quiet", 1, 100, T0);
        let talks = join(&mut s, "talks", 1, 100, T0);
        let dies = join(&mut s, "dies", 1, 100, T0);
        for t in [T0 + 100, T0 + 900] {
            alive(&mut s, &talks, t);
            alive(&mut s, &dies, t);
        }
        // Dead after 1 s of silence, but kept: dead workers are forgotten only after 20 s.
        let effects = s.tick(T0 + 2_000);
        assert!(!effects.iter().any(|e| matches!(e, Effect::DropNode { .. })));
        // The one that never published is forgotten after 5 s.
        let mut now = T0 + 2_000;
        while now < T0 + 30_000 {
            now += 500;
            alive(&mut s, &talks, now);
            let dropped: Vec<String> = s
                .tick(now)
                .into_iter()
                .filter_map(|e| match e {
                    Effect::DropNode { node, .. } => Some(node),
                    _ => None,
                })
                .collect();
            if now <= T0 + 5_000 {
                assert!(dropped.is_empty(), "at {now}: {dropped:?}");
            }
            if now == T0 + 5_500 {
                assert_eq!(dropped, vec![quiet.clone()]);
            }
            if now == T0 + 21_000 {
                assert_eq!(dropped, vec![dies.clone()]);
            }
        }
        let left: Vec<&str> = s.nodes().map(|n| n.record.id.as_str()).collect();
        assert_eq!(left, vec![talks.as_str()]);
        assert!(
            Effect::DropNode {
                node: quiet,
                had_subnet: false
            }
            .is_write()
        );
    }

    #[test]
    fn the_report_stays_small_with_ten_thousand_workers() {
        let mut s = state();
        for i in 0..10_000 {
            let host = format!("edge-{i:05}");
            let body = json!({"host": host, "ip": "192.0.2.1", "vcpus": 4, "memory": 4000, "architecture":
                              if i % 3 == 0 { "arm64" } else { "amd64" }, "virtualization": ["docker", "unikernel"],
                              "supported_addons": [format!("addon-{}", i % 100)], "gpu_driver": format!("drv-{i}"),
                              "LogDirectory": format!("/var/log/{i}"), "system_info": {"full_stats": "x".repeat(1000)}});
            let reg: NodeRegistration = serde_json::from_value(body).unwrap();
            let reg = reg.bounded().unwrap();
            let Ok(Value::Object(map)) = serde_json::to_value(&reg) else {
                unreachable!()
            };
            s.register(&reg, map, "hash".into(), |_| false, || format!("id-{i}"), T0)
                .unwrap();
        }
        let report = Value::Object(s.report()).to_string();
        assert!(
            report.len() < 8 * 1024,
            "{} bytes: {}",
            report.len(),
            &report[..500]
        );
        let report: Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["active_nodes"], json!(10_000));
        assert_eq!(report["vcpus"], json!(40_000));
        assert_eq!(report["virtualization"], json!(["docker", "unikernel"]));
        assert_eq!(
            report["aggregation_per_architecture"]["arm64"]["active_nodes"],
            json!(3334)
        );
        assert!(report.get("LogDirectory").is_none() && report.get("system_info").is_none());
    }

    #[test]
    fn snapshots_only_update_their_own_small_fields() {
        let mut s = state();
        let a = join(&mut s, "a", 1, 100, T0);
        let info: NodeInformation = serde_json::from_value(json!({
            "cpu_percent": 12.5, "memory": 50, "ip": "not-an-ip", "gpu_driver": "d".repeat(300),
            "padding": "x".repeat(10_000), "host": "renamed"
        }))
        .unwrap();
        s.information(&a, &info, T0 + 1);
        let n = s.node(&a).unwrap();
        assert_eq!(n.info["cpu_percent"], json!(12.5));
        assert_eq!(n.info["memory"], json!(50));
        assert_eq!(n.info["ip"], json!("192.0.2.1"));
        assert!(!n.info.contains_key("padding") && !n.info.contains_key("gpu_driver"));
        assert!(!n.info.contains_key("host"));
        assert_eq!(n.record.name, "a");
    }

    fn join(s: &mut State, host: &str, vcpus: i64, memory: i64, now: u64) -> String {
        let body = json!({"host": host, "ip": format!("192.0.2.{}", host.len()), "vcpus": vcpus, "memory": memory,
                          "architecture": "amd64", "virtualization": ["docker"]});
        let reg: NodeRegistration = serde_json::from_value(body.clone()).unwrap();
        let Value::Object(map) = body else { unreachable!() };
        let (id, effects) = s
            .register(&reg, map, "hash".into(), |_| false, || format!("id-{host}"), now)
            .unwrap();
        assert!(matches!(effects[0], Effect::SaveNode(_)));
        id
    }

    fn job_doc(name: &str, extra: Value) -> Map<String, Value> {
        let mut doc = json!({"job_name": name, "image": "docker.io/library/nginx:latest", "virtualization": "container",
                             "vcpus": 1, "memory": 100, "instance_list": [{"instance_number": 0}]});
        if let (Value::Object(d), Value::Object(e)) = (&mut doc, extra) {
            d.extend(e);
        }
        let Value::Object(doc) = doc else { unreachable!() };
        doc
    }

    fn deployed_to(effects: &[Effect]) -> Option<String> {
        effects.iter().find_map(|e| match e {
            Effect::Deploy { node, .. } => Some(node.clone()),
            _ => None,
        })
    }

    fn deleted_on(effects: &[Effect]) -> Vec<(String, String, i64)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Delete { node, command } => {
                    Some((node.clone(), command.job_name.clone(), command.instance_number))
                }
                _ => None,
            })
            .collect()
    }

    fn status(s: &State, job: &str, n: i64) -> Status {
        s.job(job).unwrap().instances[&n].status
    }

    fn alive(s: &mut State, node: &str, now: u64) {
        s.information(node, &NodeInformation::default(), now);
    }

    fn resources(s: &mut State, node: &str, job: &str, n: i64, now: u64) -> Vec<Effect> {
        let report: ResourcesReport = serde_json::from_value(json!({"services": [
            {"job_name": job, "instance": n, "cpu_percent": "1.5", "memory_percent": "0.1", "disk": "10", "logs": "hi",
             "virtualization": "docker"}]}))
        .unwrap();
        s.resources(node, &report, now)
    }

    fn job_report(s: &mut State, node: &str, job: &str, n: i64, st: &str, now: u64) -> Vec<Effect> {
        let r = JobStatusReport::new(job, n, st, "198.51.100.1").with_detail("exit code 1");
        s.job_status(node, &r, now)
    }

    #[test]
    fn hostnames_are_identities_and_live_duplicates_are_refused() {
        let mut s = state();
        let id = join(&mut s, "edge1", 4, 1000, T0);
        let reg: NodeRegistration = serde_json::from_value(json!({"host": "edge1"})).unwrap();
        let err = s
            .register(
                &reg,
                Map::new(),
                "h2".into(),
                |_| false,
                || "other".into(),
                T0 + 10,
            )
            .unwrap_err();
        assert!(
            matches!(&err, RegisterError::Duplicate { host, id: held, .. } if host == "edge1" && *held == id)
        );
        assert!(err.to_string().contains("edge1"), "{err}");
        // The same worker proving who it is gets its id back while still live.
        let (again, _) = s
            .register(
                &reg,
                Map::new(),
                "h3".into(),
                |r| r.id == id,
                || "other".into(),
                T0 + 20,
            )
            .unwrap();
        assert_eq!(again, id);
        // Once silent past the timeout, a re-registration (e.g. after a reboot) keeps the id.
        s.tick(T0 + 2_000);
        assert!(!s.node(&id).unwrap().alive);
        let (third, _) = s
            .register(
                &reg,
                Map::new(),
                "h4".into(),
                |_| false,
                || "other".into(),
                T0 + 2_100,
            )
            .unwrap();
        assert_eq!(third, id);
        assert_eq!(s.node(&id).unwrap().record.password_hash, "h4");
        let empty: NodeRegistration = serde_json::from_value(json!({"host": " "})).unwrap();
        assert!(matches!(
            s.register(&empty, Map::new(), "h".into(), |_| false, || "x".into(), T0),
            Err(RegisterError::NoHost(_))
        ));
    }

    #[test]
    fn deploy_places_on_a_fitting_worker_and_the_first_resource_report_means_running() {
        let mut s = state();
        let small = join(&mut s, "small", 1, 50, T0);
        let big = join(&mut s, "big", 4, 4000, T0);
        let effects = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert_eq!(deployed_to(&effects).as_deref(), Some(big.as_str()));
        assert!(effects.iter().any(|e| matches!(e, Effect::SaveJob { .. })));
        let Some(Effect::Deploy { command, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Deploy { .. }))
        else {
            unreachable!()
        };
        assert_eq!(command.instance_number, 0);
        assert_eq!(command.id, "j1");
        assert_eq!(status(&s, "j1", 0), Status::NodeScheduled);
        // A repeated deploy call is idempotent.
        let again = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0 + 1).unwrap();
        assert!(deployed_to(&again).is_none());
        // CREATED, then resources: RUNNING with metrics.
        job_report(&mut s, &big, "a.b.c.d", 0, "CREATED", T0 + 10);
        assert_eq!(status(&s, "j1", 0), Status::Created);
        let effects = resources(&mut s, &big, "a.b.c.d", 0, T0 + 20);
        assert!(effects.iter().any(|e| matches!(e, Effect::SaveInstance { .. })));
        let i = &s.job("j1").unwrap().instances[&0];
        assert_eq!(i.status, Status::Running);
        assert_eq!(i.cpu_percent, Some(1.5));
        assert_eq!(i.publicip.as_deref(), Some("198.51.100.1"));
        // A report from the wrong worker changes nothing and gets a delete.
        let effects = resources(&mut s, &small, "a.b.c.d", 0, T0 + 30);
        assert_eq!(deleted_on(&effects), vec![(small.clone(), "a.b.c.d".into(), 0)]);
        assert_eq!(status(&s, "j1", 0), Status::Running);
        // Another worker's status report or addresses for this instance are ignored and counted.
        job_report(&mut s, &small, "a.b.c.d", 0, "FAILED", T0 + 31);
        assert_eq!(status(&s, "j1", 0), Status::Running);
        let forged = Map::from_iter([("host_ip".to_owned(), json!("203.0.113.66"))]);
        assert!(
            s.instance_net(&small, "a.b.c.d", 0, forged.clone(), T0 + 32)
                .is_none()
        );
        assert_eq!(s.foreign_reports(), 2);
        assert!(s.instance_net(&big, "a.b.c.d", 0, forged, T0 + 33).is_some());
        // The report to root carries the job and its instance.
        let report = s.report();
        assert_eq!(report["active_nodes"], json!(2));
        assert_eq!(report["jobs"][0]["status"], json!("RUNNING"));
        assert_eq!(report["jobs"][0]["instance_list"][0]["worker_id"], json!(big));
    }

    #[test]
    fn unknown_instances_are_deleted_but_not_more_than_every_ten_seconds() {
        let mut s = state();
        let w = join(&mut s, "w", 4, 4000, T0);
        assert_eq!(deleted_on(&resources(&mut s, &w, "x.x.x.x", 3, T0)).len(), 1);
        assert!(deleted_on(&resources(&mut s, &w, "x.x.x.x", 3, T0 + 2_000)).is_empty());
        assert_eq!(
            deleted_on(&resources(&mut s, &w, "x.x.x.x", 3, T0 + 10_001)).len(),
            1
        );
        // Reports from unregistered nodes get the error command and nothing else.
        let effects = resources(&mut s, "ghost", "x.x.x.x", 3, T0);
        assert_eq!(effects, vec![Effect::NotRegistered { node: "ghost".into() }]);
    }

    #[test]
    fn no_fitting_worker_is_refused_to_root_and_capacity_is_held_for_placed_instances() {
        let mut s = state();
        join(&mut s, "w", 2, 4000, T0);
        let doc = || job_doc("a.b.c.d", json!({"vcpus": 2}));
        assert!(deployed_to(&s.deploy("j1", 0, doc(), T0).unwrap()).is_some());
        // The first instance holds both cores although the worker has not reported anything yet.
        let effects = s.deploy("j1", 1, doc(), T0).unwrap();
        assert!(deployed_to(&effects).is_none());
        assert!(effects.iter().any(|e| matches!(e,
            Effect::Refused { job_id, number: 1, status: Status::NoWorkerCapacity, .. } if job_id == "j1")));
        assert_eq!(status(&s, "j1", 1), Status::NoWorkerCapacity);
        // A runtime nobody offers.
        let effects = s
            .deploy(
                "j2",
                0,
                job_doc("u.u.u.u", json!({"virtualization": "unikernel", "vcpus": 0})),
                T0,
            )
            .unwrap();
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Refused {
                status: Status::NoQualifiedWorkerFound,
                ..
            }
        )));
        // A direct node list naming an unknown worker.
        let effects = s
            .deploy(
                "j3",
                0,
                job_doc(
                    "d.d.d.d",
                    json!({"vcpus": 0, "constraints": [{"type": "direct", "node": "nope"}]}),
                ),
                T0,
            )
            .unwrap();
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Refused {
                status: Status::NoNodeFound,
                ..
            }
        )));
        // Bad calls name the problem.
        assert!(matches!(
            s.deploy("j4", -1, doc(), T0),
            Err(CallError::BadNumber(-1))
        ));
        assert!(matches!(
            s.deploy("j4", 0, job_doc("", json!({})), T0),
            Err(CallError::NoJobName(_))
        ));
        for bad in ["../../etc", "a.b.c", "a.b.c.d/e", "a.b.c.+", "a.b.c.#"] {
            let e = s.deploy("j4", 0, job_doc(bad, json!({})), T0).unwrap_err();
            assert!(matches!(e, CallError::BadJobName(_)), "{bad}: {e}");
            assert!(e.to_string().starts_with("job_name: "), "{e}");
        }
        assert!(matches!(
            s.deploy("../j4", 0, job_doc("x.y.z.w", json!({})), T0),
            Err(CallError::BadJobId(_))
        ));
        assert!(matches!(
            s.deploy("j4", 0, doc(), T0),
            Err(CallError::NameTaken { .. })
        ));
    }

    #[test]
    fn a_dead_worker_s_instances_move_to_another_worker() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        let effects = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 100);
        let b = join(&mut s, "b", 4, 4000, T0 + 200);
        // b keeps reporting, a falls silent.
        alive(&mut s, &b, T0 + 900);
        let effects = s.tick(T0 + 1_150);
        assert_eq!(deployed_to(&effects).as_deref(), Some(b.as_str()));
        assert_eq!(deleted_on(&effects), vec![(a.clone(), "a.b.c.d".into(), 0)]);
        let i = &s.job("j1").unwrap().instances[&0];
        assert_eq!(i.status, Status::NodeScheduled);
        assert_eq!(i.failures, 0, "a dead worker is not the instance's fault");
        // Late reports from the old worker do not take the instance back.
        job_report(&mut s, &a, "a.b.c.d", 0, "DEAD", T0 + 1_200);
        assert_eq!(status(&s, "j1", 0), Status::NodeScheduled);
    }

    #[test]
    fn a_lost_connection_moves_instances_after_the_grace_unless_the_worker_reports() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        let effects = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 100);
        let b = join(&mut s, "b", 4, 4000, T0 + 100);

        // a's will arrives, and a reports again within the grace (a NodeEngine restarted at once): nothing moves,
        // and the worker timeout counts from that report again.
        s.connection_lost(&a, T0 + 200);
        alive(&mut s, &a, T0 + 400);
        alive(&mut s, &b, T0 + 600);
        assert!(deployed_to(&s.tick(T0 + 600)).is_none());
        assert!(deployed_to(&s.tick(T0 + 1_300)).is_none());

        // a's will arrives and a stays silent: dead once the grace is over, well before the worker timeout.
        alive(&mut s, &a, T0 + 1_250);
        s.connection_lost(&a, T0 + 1_300);
        alive(&mut s, &b, T0 + 1_500);
        assert!(deployed_to(&s.tick(T0 + 1_550)).is_none(), "within the grace");
        let effects = s.tick(T0 + 1_650);
        assert_eq!(deployed_to(&effects).as_deref(), Some(b.as_str()));
        // A will for a worker already dead, or unknown, changes nothing.
        s.connection_lost(&a, T0 + 1_700);
        s.connection_lost("nobody", T0 + 1_700);
        assert_eq!(status(&s, "j1", 0), Status::NodeScheduled);
    }

    #[test]
    fn a_will_never_makes_a_worker_die_later_than_the_timeout() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 100);
        let b = join(&mut s, "b", 4, 4000, T0 + 100);
        alive(&mut s, &b, T0 + 1_000);
        // Silent since T0 + 100; a will at T0 + 1_000 must not extend its life past T0 + 1_100.
        s.connection_lost(&a, T0 + 1_000);
        let effects = s.tick(T0 + 1_150);
        assert_eq!(deployed_to(&effects).as_deref(), Some(b.as_str()));
    }

    #[test]
    fn a_will_after_a_long_silence_is_a_network_cut_not_a_crash() {
        let timing = Timing {
            worker_timeout_ms: 30_000,
            ..Timing::default()
        };
        let mut s = State::new(timing, Policy::BestFit);
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 100);
        let b = join(&mut s, "b", 4, 4000, T0 + 100);
        // a's keep-alive ran out at the broker 7.5 s into a cut: its will does not start the 3 s grace.
        s.connection_lost(&a, T0 + 100 + 7_500);
        alive(&mut s, &b, T0 + 10_000);
        assert!(
            deployed_to(&s.tick(T0 + 10_700)).is_none(),
            "moved on a keep-alive will"
        );
        // The cut is over: a reports again and keeps its instance.
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 15_000);
        assert!(deployed_to(&s.tick(T0 + 15_100)).is_none());
        assert_eq!(status(&s, "j1", 0), Status::Running);
        // Silent for longer than the worker timeout: dead after all.
        alive(&mut s, &b, T0 + 45_000);
        let effects = s.tick(T0 + 45_100);
        assert_eq!(deployed_to(&effects).as_deref(), Some(b.as_str()));
    }

    #[test]
    fn every_non_terminal_state_has_a_deadline() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let keep = |s: &mut State, now| alive(s, &a, now);
        keep(&mut s, T0 + 900);
        assert!(
            deployed_to(&s.tick(T0 + 1_000)).is_none(),
            "nothing is overdue yet"
        );
        assert_eq!(status(&s, "j1", 0), Status::NodeScheduled);
        keep(&mut s, T0 + 1_800);
        keep(&mut s, T0 + 2_700);
        keep(&mut s, T0 + 3_000);
        // Stuck in NODE_SCHEDULED past the deploy deadline: placed again (here, on the same and only worker).
        let effects = s.tick(T0 + 3_100);
        assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
        assert_eq!(
            deleted_on(&effects).len(),
            1,
            "the old placement is removed first"
        );
        assert_eq!(status(&s, "j1", 0), Status::NodeScheduled);
        // RUNNING without resource reports for the stale window fails and is placed again.
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 3_200);
        for t in (3_300..8_000).step_by(500) {
            keep(&mut s, T0 + t);
        }
        let effects = s.tick(T0 + 7_300);
        assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
        // CLUSTER_SCHEDULED / negative states are retried too: with no worker left, placement is retried after
        // the no-capacity pause.
        let mut s = state();
        let effects = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Refused {
                status: Status::NoQualifiedWorkerFound,
                ..
            }
        )));
        assert!(deployed_to(&s.tick(T0 + 1_000)).is_none());
        let w = join(&mut s, "late", 4, 4000, T0 + 1_500);
        assert_eq!(deployed_to(&s.tick(T0 + 2_001)).as_deref(), Some(w.as_str()));
    }

    #[test]
    fn crash_loops_back_off_exponentially_up_to_the_cap() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let mut now = T0;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            now += 10;
            alive(&mut s, &a, now);
            job_report(&mut s, &a, "a.b.c.d", 0, "DEAD", now);
            let i = s.job("j1").unwrap().instances[&0].clone();
            assert_eq!(i.status, Status::Dead);
            pauses.push(i.retry_at_ms - now);
            // Not before the pause...
            assert!(deployed_to(&s.tick(i.retry_at_ms - 1)).is_none());
            // ...and right after it, with no delete: the worker removed it already, and a delete racing the new
            // deploy to the same worker would stop the new instance.
            now = i.retry_at_ms;
            alive(&mut s, &a, now);
            let effects = s.tick(now);
            assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
            assert!(deleted_on(&effects).is_empty(), "{effects:?}");
        }
        assert_eq!(pauses, vec![1_000, 2_000, 4_000, 8_000, 8_000, 8_000]);
        // The detail says what is going on.
        job_report(&mut s, &a, "a.b.c.d", 0, "FAILED", now + 1);
        let detail = &s.job("j1").unwrap().instances[&0].status_detail;
        assert!(
            detail.contains("crash loop") && detail.contains("exit code 1"),
            "{detail}"
        );
    }

    #[test]
    fn a_scheduler_plugin_places_and_the_built_in_one_is_the_fallback() {
        let mut s = state();
        let small = join(&mut s, "small", 4, 2000, T0);
        let big = join(&mut s, "big", 4, 8000, T0);
        // Built in: best fit, the worker with the least free memory.
        let e = s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert_eq!(deployed_to(&e).as_deref(), Some(small.as_str()));
        let flag = Arc::new(AtomicBool::new(true));
        s.set_plugin_flag(Arc::clone(&flag));
        // With a plugin: it is asked, once, and nothing is deployed until it answers.
        let e = s.deploy("j1", 1, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert!(deployed_to(&e).is_none());
        assert!(
            matches!(&e[..], [Effect::AskPlugin { job_id, number: 1, .. }, ..] if job_id == "j1"),
            "{e:?}"
        );
        let (e, rejected) = s.plugin_decided("j1", 1, Ok(Some(big.clone())), T0 + 1);
        assert_eq!((deployed_to(&e).as_deref(), rejected), (Some(big.as_str()), None));
        assert!(
            s.plugin_decided("j1", 1, Ok(Some(big.clone())), T0 + 2)
                .0
                .is_empty(),
            "one answer counts"
        );
        // No usable answer: the built-in scheduler places.
        s.deploy("j1", 2, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let (e, _) = s.plugin_decided("j1", 2, Err(()), T0 + 3);
        assert_eq!(deployed_to(&e).as_deref(), Some(small.as_str()));
        // A pick that does not exist: built in, and the reason is returned for the fallback counter.
        s.deploy("j1", 3, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let (e, rejected) = s.plugin_decided("j1", 3, Ok(Some("nobody".into())), T0 + 4);
        assert_eq!(deployed_to(&e).as_deref(), Some(small.as_str()));
        assert!(rejected.unwrap().contains("nobody"));
        // The plugin found nothing: recorded as no capacity and told to root.
        s.deploy("j1", 4, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let (e, _) = s.plugin_decided("j1", 4, Ok(None), T0 + 5);
        assert!(
            e.iter().any(|x| matches!(x, Effect::Refused { number: 4, .. })),
            "{e:?}"
        );
        // The slot emptied: built in again, directly.
        flag.store(false, Ordering::Relaxed);
        let e = s.deploy("j1", 5, job_doc("a.b.c.d", json!({})), T0).unwrap();
        assert_eq!(deployed_to(&e).as_deref(), Some(small.as_str()));
        let candidates = s.plugin_candidates(true);
        assert_eq!(candidates.len(), 2);
        assert!(
            candidates
                .iter()
                .all(|c| c["_id"].is_string() && c["memory"].is_u64()),
            "{candidates:?}"
        );
    }

    #[test]
    fn a_failure_s_reason_survives_the_cleanup_report_and_the_restarts() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let pull = "pulling 127.0.0.1:1/none:latest: connection refused";
        let report =
            |status: &str, detail: &str| JobStatusReport::new("a.b.c.d", 0, status, "").with_detail(detail);
        s.job_status(&a, &report("FAILED", pull), T0 + 10);
        // The cleanup's UNDEPLOYED after it: the same end, counted once, the reason kept.
        s.job_status(&a, &report("UNDEPLOYED", ""), T0 + 20);
        let i = s.job("j1").unwrap().instances[&0].clone();
        assert_eq!((i.status, i.failures), (Status::Failed, 1));
        assert!(
            i.status_detail.starts_with(pull) && i.status_detail.contains("restarting in"),
            "{}",
            i.status_detail
        );
        // Placed again after the back-off: the new state's detail still says why, with the restart count.
        let effects = s.tick(i.retry_at_ms);
        assert_eq!(deployed_to(&effects).as_deref(), Some(a.as_str()));
        let detail = &s.job("j1").unwrap().instances[&0].status_detail;
        assert!(
            detail.contains("restart 1 after: ") && detail.contains(pull),
            "{detail}"
        );
        s.job_status(&a, &report("CREATING", ""), i.retry_at_ms + 10);
        let detail = &s.job("j1").unwrap().instances[&0].status_detail;
        assert!(detail.contains(pull), "{detail}");
        // A reasonless end first and the reason after it: the reason wins, still one failure.
        s.job_status(&a, &report("DEAD", ""), i.retry_at_ms + 20);
        s.job_status(&a, &report("FAILED", pull), i.retry_at_ms + 30);
        let i = s.job("j1").unwrap().instances[&0].clone();
        assert_eq!(i.failures, 2);
        assert!(
            i.status_detail.starts_with(pull) && i.status_detail.contains("crash loop: failure 2"),
            "{}",
            i.status_detail
        );
    }

    #[test]
    fn creation_progress_updates_the_detail() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        for (t, detail) in [
            (10, "pulling x"),
            (20, "pulling x: 1.0 of 9.0 MiB"),
            (30, "pulling x: 9.0 of 9.0 MiB"),
        ] {
            let r = JobStatusReport::new("a.b.c.d", 0, "CREATING", "").with_detail(detail);
            let effects = s.job_status(&a, &r, T0 + t);
            assert!(
                effects.iter().any(|e| matches!(e, Effect::SaveInstance { .. })),
                "{detail}"
            );
            assert_eq!(s.job("j1").unwrap().instances[&0].status_detail, detail);
        }
        let i = &s.job("j1").unwrap().instances[&0];
        assert_eq!(
            (i.status, i.since_ms),
            (Status::Creating, T0 + 10),
            "the state's clock is not reset"
        );
    }

    #[test]
    fn completed_one_shot_instances_are_left_alone() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({"one_shot": true})), T0)
            .unwrap();
        resources(&mut s, &a, "a.b.c.d", 0, T0 + 10);
        job_report(&mut s, &a, "a.b.c.d", 0, "COMPLETED", T0 + 20);
        assert_eq!(status(&s, "j1", 0), Status::Completed);
        // Neither time, nor the worker's death, nor a later DEAD report moves it.
        let b = join(&mut s, "b", 4, 4000, T0 + 30);
        for t in (100..20_000).step_by(500) {
            alive(&mut s, &b, T0 + t);
            assert!(deployed_to(&s.tick(T0 + t)).is_none());
        }
        job_report(&mut s, &a, "a.b.c.d", 0, "DEAD", T0 + 20_000);
        assert_eq!(status(&s, "j1", 0), Status::Completed);
        assert_eq!(s.report()["jobs"][0]["status"], json!("COMPLETED"));
    }

    #[test]
    fn deleting_removes_instances_from_workers_and_the_job_with_the_last_one() {
        let mut s = state();
        let a = join(&mut s, "a", 8, 8000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        s.deploy("j1", 1, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let (found, effects) = s.delete("j1", 1);
        assert!(found);
        assert_eq!(deleted_on(&effects), vec![(a.clone(), "a.b.c.d".into(), 1)]);
        assert!(s.job("j1").is_some());
        assert!(!s.delete("j1", 7).0);
        let (found, effects) = s.delete("j1", -1);
        assert!(found);
        assert_eq!(deleted_on(&effects), vec![(a, "a.b.c.d".into(), 0)]);
        assert!(effects.contains(&Effect::DropJob { id: "j1".into() }));
        assert!(s.job("j1").is_none() && s.job_by_name("a.b.c.d").is_none());
        assert!(!s.delete("j1", -1).0);
    }

    #[test]
    fn restored_state_gives_workers_a_fresh_timeout() {
        let mut s = state();
        let a = join(&mut s, "a", 4, 4000, T0);
        s.deploy("j1", 0, job_doc("a.b.c.d", json!({})), T0).unwrap();
        let nodes: Vec<NodeRecord> = s.nodes().map(|n| n.record.clone()).collect();
        let job = s.job("j1").unwrap().clone();
        let mut restored = state();
        let later = T0 + 60_000;
        restored.restore(
            nodes,
            vec![(job.id.clone(), job.job_name.clone(), job.doc.clone())],
            job.instances
                .values()
                .map(|i| ("j1".to_owned(), i.clone()))
                .collect(),
            later,
        );
        assert!(restored.node(&a).unwrap().alive);
        assert!(restored.tick(later + 500).is_empty());
        assert_eq!(status(&restored, "j1", 0), Status::NodeScheduled);
        assert_eq!(restored.job_by_name("a.b.c.d").unwrap().id, "j1");
    }

    #[test]
    fn backoff_is_capped_and_never_overflows() {
        let t = Timing::default();
        assert_eq!(t.backoff_ms(1), 2_000);
        assert_eq!(t.backoff_ms(2), 4_000);
        assert_eq!(t.backoff_ms(100), t.backoff_cap_ms);
        assert_eq!(t.backoff_ms(u32::MAX), t.backoff_cap_ms);
    }
}
