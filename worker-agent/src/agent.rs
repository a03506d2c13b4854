//! The running agent: turns the cluster's deploy and delete commands into instances of its runtimes (containerd,
//! and QEMU with `-u=true`), watches them until they exit, reports their status and resources and the node's
//! metrics, adopts what a previous run left running, and stops cleanly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oakestra_protocol::api::cluster::{NodeRegistration, SystemInfo};
use oakestra_protocol::mqtt::worker::{
    DeleteCommand, DeployCommand, JobStatusReport, NodeInformation, ResourcesReport, ServiceResources,
};
use oakestra_protocol::naming::TaskId;
use oakestra_protocol::status::Status;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::cli::{AccelChoice, OnStop, Settings};
use crate::cluster::{self, Identity, Inbound, Session};
use crate::containerd::Containerd;
use crate::guest::image::ImageCache;
use crate::guest::qemu::Accel;
use crate::metrics::{self, CpuTracker, NodeSampler};
use crate::overlay::{NetManager, OverlayError};
use crate::runtime::container::ContainerRuntime;
use crate::runtime::unikernel::{self, UnikernelConfig, UnikernelRuntime};
use crate::runtime::{DeployRequest, Ended, Runtime, Runtimes, TaskState};
use crate::telemetry::Telemetry;

/// The virtualization name the containerd runtime registers under (the reference's name for it).
pub const CONTAINER_RUNTIME: &str = crate::runtime::container::NAME;
/// Grace between SIGTERM and SIGKILL when an instance is undeployed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a measured snapshot size is reused: measuring walks the instance's writable layer (in containerd), too
/// much work for every 2 s report.
pub const DISK_USAGE_TTL: Duration = Duration::from_secs(30);
/// Bytes of an instance's log sent with each resources report.
pub const LOG_TAIL_BYTES: u64 = 1024;

/// Labels on our containers: what adoption after a restart needs to know about an instance.
mod label {
    pub const JOB: &str = "oakestra.job_name";
    pub const INSTANCE: &str = "oakestra.instance";
    pub const ONE_SHOT: &str = "oakestra.one_shot";
    pub const PORT: &str = "oakestra.port";
    pub const MEMORY: &str = "oakestra.memory_mib";
    pub const ATTACHED: &str = "oakestra.overlay";
}

/// Why an instance is being stopped by us (not by its own exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// The cluster sent `control/delete`: report `UNDEPLOYED`.
    Undeploy,
    /// The worker is shutting down with `--on-stop stop`: report `DEAD`, so the cluster reschedules.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Deploying,
    Running { pid: u32 },
}

#[derive(Debug)]
struct Instance {
    runtime: Arc<dyn Runtime>,
    job_name: String,
    number: i64,
    one_shot: bool,
    port: String,
    memory_mib: i64,
    attached: bool,
    phase: Phase,
    stop: Option<StopReason>,
    done: watch::Sender<bool>,
}

/// The agent's view of one instance, for `status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    /// Task id.
    pub task: String,
    /// `deploying` or `running`.
    pub phase: String,
    /// Init pid when running (QEMU's for a unikernel).
    pub pid: u32,
    /// The runtime (`docker`, `unikernel`).
    #[serde(default)]
    pub runtime: String,
}

/// What `NodeEngine status` reads (`<state dir>/status.json`, rewritten every report).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatusFile {
    /// The agent's pid.
    pub pid: u32,
    /// The node id.
    pub node_id: String,
    /// The node name.
    pub node_name: String,
    /// `host:port` of the cluster.
    pub cluster: String,
    /// Whether the MQTT session is up.
    pub connected: bool,
    /// The instances.
    pub instances: Vec<InstanceStatus>,
    /// The runtimes (`virtualization` as registered).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// How unikernels run (`kvm` or `tcg`, and why), when the unikernel runtime is on.
    #[serde(default)]
    pub unikernel_accelerator: Option<String>,
    /// Unix seconds of the write.
    pub updated_s: u64,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A directory cannot be created.
    #[error("{}: {reason}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The metrics listener cannot start.
    #[error("metrics on {addr}: {reason}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// What failed.
        reason: String,
    },
}

/// How often the NodeEngine checks that its NetManager still has every instance attached.
const OVERLAY_CHECK: Duration = Duration::from_secs(2);

/// A running instance to attach to the overlay again.
struct Reattach {
    task: String,
    job: String,
    number: i64,
    port: String,
    pid: u32,
    runtime: Arc<dyn Runtime>,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    runtimes: Runtimes,
    /// `kvm`/`tcg` and why, with the unikernel runtime.
    accelerator: Option<(String, String)>,
    netmanager: Option<NetManager>,
    session: Mutex<Option<Session>>,
    /// Who this worker is to the cluster (`None` until it registered); the NetManager is registered with it, and
    /// again after it restarts.
    identity: Mutex<Option<Identity>>,
    public_ip: Mutex<String>,
    instances: Mutex<HashMap<String, Instance>>,
    cpu: Mutex<CpuTracker>,
    /// Last measured snapshot size per task, with the time it was measured.
    disk: Mutex<HashMap<String, (Instant, i64)>>,
    sampler: Mutex<NodeSampler>,
    /// Set when an instance started: the next report goes out now rather than at the next tick, since the cluster
    /// marks an instance `RUNNING` when a resources report lists it.
    report_soon: tokio::sync::Notify,
    /// What the metrics endpoint exposes.
    telemetry: Arc<Telemetry>,
    /// Every status report, for the unit tests' eyes.
    #[cfg(test)]
    reports: Mutex<Vec<(String, i64, Status, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Sleeps `d` unless `shutdown` fires first (then `true`).
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

/// Connects to containerd, retrying with back-off until it answers or `shutdown` fires.
pub async fn connect_runtime(
    settings: &Settings,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Containerd> {
    let registry = crate::registry::Registry::new(settings.registry_credentials.clone());
    let mut backoff = Duration::from_millis(500);
    loop {
        match Containerd::connect(
            &settings.containerd,
            &settings.namespace,
            &settings.snapshotter,
            registry.clone(),
        )
        .await
        {
            Ok(c) => {
                let version = c.version().await.unwrap_or_default();
                tracing::info!(socket = %settings.containerd.display(), version = %version, namespace = %settings.namespace, "containerd connected");
                return Some(c);
            }
            Err(e) => tracing::warn!(error = %e, retry_s = backoff.as_secs_f32(), "containerd not available"),
        }
        if sleep_or_shutdown(backoff, shutdown).await {
            return None;
        }
        backoff = oakestra_protocol::backoff::double(backoff);
    }
}

/// The IP this node uses towards the cluster (what peers reach it at): the source address the kernel picks for the
/// cluster's address. No packet is sent.
pub async fn local_ip_towards(host: &str, port: u16) -> Option<IpAddr> {
    let target = tokio::net::lookup_host((host, port)).await.ok()?.next()?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

impl Agent {
    /// The registration body: the reference's node document.
    fn registration(&self, sample: &metrics::NodeSample, info: &metrics::SystemInfo) -> NodeRegistration {
        let s = &self.settings;
        let (overlay, socket, port) = match &self.netmanager {
            None => (false, String::new(), 0),
            Some(NetManager::Socket(p)) => (true, p.display().to_string(), 0),
            Some(NetManager::Port(p)) => (true, String::new(), i64::from(*p)),
        };
        let gpu = GpuFields::of(&sample.gpus);
        let mut body = NodeRegistration {
            host: s.node_name.clone(),
            ip: lock(&self.public_ip).clone(),
            port: std::env::var("MY_PORT").unwrap_or_else(|_| "3000".into()),
            system_info: SystemInfo {
                kernel_version: info.kernel_version.clone(),
                architecture: std::env::consts::ARCH.to_owned(),
                os_version: info.os_version.clone(),
                uptime: info.uptime_secs.to_string(),
                full_stats: String::new(),
                ..SystemInfo::default()
            },
            cpu_percent: sample.cpu_percent,
            vcpus: sample.vcpus,
            architecture: info.architecture.clone(),
            memory_percent: sample.memory_percent,
            memory: sample.memory_available_mib,
            gpu_driver: gpu.driver,
            gpu_usage: gpu.usage,
            vgpus: gpu.count,
            gpu_temp: gpu.temperature,
            vram: gpu.vram,
            vram_percent: gpu.vram_percent,
            virtualization: self.runtimes.names(),
            overlay,
            overlay_socket: socket,
            log_directory: s.app_logs.display().to_string(),
            net_manager_port: port,
            cluster_address: s.cluster_address.clone(),
            ..NodeRegistration::default()
        };
        for (k, v) in &sample.disk {
            body.disk_info.insert(k.clone(), Value::String(format!("{v:.2}")));
        }
        if let Some((accel, why)) = &self.accelerator {
            // oakestra-rs extension: how this worker's unikernels run (a reference cluster ignores it).
            body.extra
                .insert("unikernel_accelerator".to_owned(), Value::String(accel.clone()));
            body.extra.insert(
                "unikernel_accelerator_reason".to_owned(),
                Value::String(why.clone()),
            );
        }
        body
    }

    /// Registers with the cluster until it accepts (back-off 1 s doubling to 30 s), saves the identity and starts
    /// the MQTT session. `None` when `shutdown` fired first.
    async fn join(
        settings: &Settings,
        body: NodeRegistration,
        mqtt: Arc<oakestra_runtime::metrics::MqttCounters>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(
        Identity,
        Session,
        mpsc::UnboundedReceiver<Inbound>,
        tokio::task::JoinHandle<()>,
    )> {
        let cluster = format!("{}:{}", settings.cluster_address, settings.cluster_port);
        let mut backoff = Duration::from_secs(1);
        loop {
            let previous = Identity::load(&settings.state_dir).filter(|i| i.cluster == cluster);
            match cluster::register(
                &settings.cluster_address,
                settings.cluster_port,
                body.clone(),
                previous.as_ref(),
                settings.join_token.as_ref().map(|t| t.0.as_str()),
            )
            .await
            {
                Ok(answer) => {
                    let port = answer.mqtt_broker_port_u16().unwrap_or(10003);
                    let identity = Identity {
                        node_id: answer.id.clone(),
                        mqtt_password: answer.mqtt_password.clone().unwrap_or_default(),
                        cluster,
                        mqtt_port: port,
                    };
                    if let Err(e) = identity.save(&settings.state_dir) {
                        tracing::warn!(error = %e, "cannot save the node identity; a restart will register anew");
                    }
                    tracing::info!(node = %identity.node_id, broker_port = port, "registered with the cluster");
                    let (session, rx, pump) = Session::start(
                        &settings.cluster_address,
                        port,
                        &identity.node_id,
                        &identity.mqtt_password,
                        mqtt,
                    );
                    return Some((identity, session, rx, pump));
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_s = backoff.as_secs(), "cluster registration failed")
                }
            }
            if sleep_or_shutdown(backoff, shutdown).await {
                return None;
            }
            backoff = oakestra_protocol::backoff::double(backoff);
        }
    }

    /// The node id.
    pub fn node_id(&self) -> String {
        lock(&self.identity)
            .as_ref()
            .map(|i| i.node_id.clone())
            .unwrap_or_default()
    }

    /// The MQTT session (`None` until the cluster accepted the registration).
    fn session(&self) -> Option<Session> {
        lock(&self.session).clone()
    }

    /// Publishes a status change of an instance on `nodes/<id>/job`.
    fn report(&self, job: &str, number: i64, status: Status, detail: &str) {
        tracing::info!(job = %job, instance = number, status = status.as_str(), detail, "instance status");
        #[cfg(test)]
        lock(&self.reports).push((job.to_owned(), number, status, detail.to_owned()));
        self.telemetry.status_reported(status.as_str());
        let msg = JobStatusReport::new(job, number, status.as_str(), lock(&self.public_ip).clone())
            .with_detail(detail);
        match self.session() {
            Some(session) => session.publish("job", &msg),
            None => tracing::warn!(job = %job, "status not sent: not registered with the cluster yet"),
        }
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.settings.state_dir.join("instances").join(id)
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.settings.app_logs.join(id)
    }

    // === Deploy ===================================================================================================

    /// Handles `control/deploy`.
    pub async fn deploy(self: Arc<Self>, cmd: DeployCommand) {
        let job = cmd.job_name.clone();
        let number = cmd.instance_number;
        let task = match task_id(&job, number) {
            Some(t) => t,
            None => {
                let detail = format!(
                    "invalid deploy: job_name {job:?} must be app.appns.svc.svcns and instance_number {number} a non-negative integer"
                );
                self.telemetry.deploy_done(None);
                self.report(&job, number, Status::Failed, &detail);
                return;
            }
        };
        let Some(runtime) = self.runtimes.for_virtualization(&cmd.virtualization) else {
            let hint = if cmd.virtualization.trim() == unikernel::NAME {
                " (start the NodeEngine with -u=true on a machine with QEMU)"
            } else {
                ""
            };
            let detail = format!(
                "virtualization {:?} is not supported by this worker (supported: {}){hint}",
                cmd.virtualization.trim(),
                self.runtimes.names().join(", ")
            );
            self.telemetry.deploy_done(None);
            self.report(&job, number, Status::Failed, &detail);
            return;
        };
        {
            let mut map = lock(&self.instances);
            if let Some(existing) = map.get(&task) {
                // QoS 1 may deliver a command twice; the instance is already on its way.
                tracing::info!(task = %task, phase = ?existing.phase, "deploy for an existing instance ignored");
                if matches!(existing.phase, Phase::Running { .. }) {
                    drop(map);
                    self.report(&job, number, Status::Created, "");
                }
                return;
            }
            let (done, _) = watch::channel(false);
            map.insert(
                task.clone(),
                Instance {
                    runtime: runtime.clone(),
                    job_name: job.clone(),
                    number,
                    one_shot: cmd.one_shot,
                    port: cmd.port.clone(),
                    memory_mib: cmd.memory,
                    attached: self.netmanager.is_some(),
                    phase: Phase::Deploying,
                    stop: None,
                    done,
                },
            );
        }
        let started = Instant::now();
        match self.clone().start_instance(&runtime, &task, &cmd).await {
            Ok(pid) => {
                let stop = {
                    let mut map = lock(&self.instances);
                    map.get_mut(&task).and_then(|i| {
                        i.phase = Phase::Running { pid };
                        i.stop
                    })
                };
                tracing::info!(task = %task, pid, runtime = runtime.name(), elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "instance started");
                self.telemetry.deploy_done(Some(started.elapsed().as_secs_f64()));
                self.report(&job, number, Status::Created, "");
                self.report_soon.notify_one();
                if stop.is_some() {
                    // A delete arrived while we were deploying; the watcher reports once it is gone.
                    let _ = runtime.stop(&task, true).await;
                }
            }
            Err(detail) => {
                tracing::warn!(task = %task, error = %detail, "deploy failed");
                self.telemetry.deploy_done(None);
                // Out of the map first: a watcher already running sees no instance and leaves the report to us.
                let removed = lock(&self.instances).remove(&task);
                if let Err(e) = runtime.remove(&task).await {
                    tracing::warn!(task = %task, error = %e, "cleanup after a failed deploy");
                }
                let attached = removed.as_ref().is_some_and(|i| i.attached);
                if attached && let Some(nm) = &self.netmanager {
                    let _ = nm
                        .detach(&job, number, &cmd.port, runtime.name() == unikernel::NAME)
                        .await;
                }
                let _ = std::fs::remove_dir_all(self.instance_dir(&task));
                let stop = removed.as_ref().and_then(|i| i.stop);
                if let Some(i) = &removed {
                    let _ = i.done.send(true);
                }
                match stop {
                    Some(StopReason::Undeploy) => self.report(&job, number, Status::Undeployed, ""),
                    _ => self.report(&job, number, Status::Failed, &detail),
                }
            }
        }
    }

    /// Create (image, files, overlay attach), watch, start. Returns the main pid, or the error text reported as
    /// the `FAILED` detail. The watcher is running before the instance starts.
    async fn start_instance(
        self: Arc<Self>,
        runtime: &Arc<dyn Runtime>,
        task: &str,
        cmd: &DeployCommand,
    ) -> Result<u32, String> {
        let labels = HashMap::from([
            (label::JOB.to_owned(), cmd.job_name.clone()),
            (label::INSTANCE.to_owned(), cmd.instance_number.to_string()),
            (label::ONE_SHOT.to_owned(), cmd.one_shot.to_string()),
            (label::PORT.to_owned(), cmd.port.clone()),
            (label::MEMORY.to_owned(), cmd.memory.to_string()),
            (label::ATTACHED.to_owned(), self.netmanager.is_some().to_string()),
        ]);
        let log = self.log_path(task);
        // A new instance with the same task id (a redeploy) starts a fresh log; the last one's stays next to it as
        // `<task>.1`, so a crash loop's output is not lost, and the log API never shows an older instance's tail.
        if std::fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
            let mut previous = log.clone().into_os_string();
            previous.push(".1");
            if let Err(e) = std::fs::rename(&log, &previous) {
                tracing::debug!(task = %task, error = %e, "cannot keep the previous instance's log");
            }
        }
        let dir = self.instance_dir(task);
        let me = self.clone();
        let (job, number) = (cmd.job_name.clone(), cmd.instance_number);
        let progress = move |detail: &str| me.report(&job, number, Status::Creating, detail);
        let req = DeployRequest {
            task,
            cmd,
            labels,
            log: &log,
            instance_dir: &dir,
            netmanager: self.netmanager.as_ref(),
            progress: &progress,
        };
        runtime.create(&req).await.map_err(|e| e.to_string())?;
        tokio::spawn(self.clone().watch(runtime.clone(), task.to_owned()));
        runtime.start(task).await.map_err(|e| e.to_string())
    }

    // === Exit and undeploy ========================================================================================

    /// Waits for the instance to end, then cleans up and reports.
    async fn watch(self: Arc<Self>, runtime: Arc<dyn Runtime>, task: String) {
        let ended = runtime.wait(&task).await;
        self.finish(&task, ended).await;
    }

    /// Detach, remove, report: the end of every instance that ran.
    async fn finish(&self, task: &str, ended: Ended) {
        let Some((runtime, job, number, one_shot, port, memory, attached, stop)) =
            lock(&self.instances).get(task).map(|i| {
                (
                    i.runtime.clone(),
                    i.job_name.clone(),
                    i.number,
                    i.one_shot,
                    i.port.clone(),
                    i.memory_mib,
                    i.attached,
                    i.stop,
                )
            })
        else {
            return;
        };
        // Read before the instance is removed: its cgroup goes with it.
        let oom_kills = runtime.usage(task).await.map(|u| u.oom_kills).unwrap_or(0);
        let guest = runtime.name() == unikernel::NAME;
        // A container leaves the overlay before its namespace goes (the reference's order); a guest's QEMU must
        // be gone before the NetManager deletes the namespace its tap lives in.
        let mut deleted_code = None;
        if guest {
            deleted_code = self.remove_from_runtime(&runtime, task).await;
        }
        if attached
            && let Some(nm) = &self.netmanager
            && let Err(e) = nm.detach(&job, number, &port, guest).await
        {
            tracing::warn!(task = %task, error = %e, "overlay detach failed");
        }
        if !guest {
            deleted_code = self.remove_from_runtime(&runtime, task).await;
        }
        let _ = std::fs::remove_dir_all(self.instance_dir(task));
        lock(&self.cpu).forget(task);
        lock(&self.disk).remove(task);
        if let Some(i) = lock(&self.instances).remove(task) {
            let _ = i.done.send(true);
        }
        let ended = Ended {
            code: ended.code.or(deleted_code),
            reason: ended.reason,
        };
        match stop {
            Some(StopReason::Undeploy) => self.report(&job, number, Status::Undeployed, ""),
            Some(StopReason::Shutdown) => self.report(&job, number, Status::Dead, "the worker shut down"),
            None => {
                let (status, detail) = exit_status(&ended, one_shot, oom_kills, memory);
                self.report(&job, number, status, &detail);
            }
        }
    }

    async fn remove_from_runtime(&self, runtime: &Arc<dyn Runtime>, task: &str) -> Option<u32> {
        match runtime.remove(task).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(task = %task, error = %e, "cleanup incomplete");
                None
            }
        }
    }

    /// Handles `control/delete`: a graceful stop (SIGTERM, or QMP `quit` for a guest), then a kill after
    /// [`STOP_GRACE`], then forced removal; reports `UNDEPLOYED`.
    pub async fn undeploy(self: Arc<Self>, cmd: DeleteCommand) {
        let task = match task_id(&cmd.job_name, cmd.instance_number) {
            Some(t) => t,
            None => {
                tracing::warn!(job = %cmd.job_name, instance = cmd.instance_number, "delete for an invalid instance ignored");
                return;
            }
        };
        self.stop_instance(&task, StopReason::Undeploy, &cmd.job_name, cmd.instance_number)
            .await;
    }

    async fn stop_instance(&self, task: &str, reason: StopReason, job: &str, number: i64) {
        let state = {
            let mut map = lock(&self.instances);
            map.get_mut(task).map(|i| {
                if i.stop.is_none() {
                    i.stop = Some(reason);
                }
                (i.runtime.clone(), i.phase, i.done.subscribe())
            })
        };
        let Some((runtime, phase, mut done)) = state else {
            // Not ours (any more): remove leftovers, if any, and confirm. The NetManager's undeploy is idempotent, so
            // a possible attachment is released too.
            for runtime in self.runtimes.all() {
                if let Err(e) = runtime.remove(task).await {
                    tracing::warn!(task = %task, runtime = runtime.name(), error = %e, "cleanup of an unknown instance");
                }
            }
            if let Some(nm) = &self.netmanager {
                for unikernel in [false, true] {
                    if let Err(e) = nm.detach(job, number, "", unikernel).await {
                        tracing::debug!(task = %task, error = %e, "overlay detach of an unknown instance");
                    }
                }
            }
            if reason == StopReason::Undeploy {
                self.report(job, number, Status::Undeployed, "");
            }
            return;
        };
        if phase == Phase::Deploying {
            // The deploy path sees the stop request when it finishes and reports.
            return;
        }
        let wait_done = |d: Duration, done: &mut watch::Receiver<bool>| {
            let mut done = done.clone();
            async move { tokio::time::timeout(d, done.wait_for(|v| *v)).await.is_ok() }
        };
        let _ = runtime.stop(task, false).await;
        if wait_done(STOP_GRACE, &mut done).await {
            return;
        }
        tracing::info!(task = %task, "still running after the graceful stop; killing");
        let _ = runtime.stop(task, true).await;
        if wait_done(STOP_GRACE, &mut done).await {
            return;
        }
        tracing::warn!(task = %task, "the instance does not exit; removing it by force");
        self.finish(task, Ended::default()).await;
    }

    // === Overlay upkeep ==========================================================================================

    /// Every [`OVERLAY_CHECK`], asks the NetManager what it has plumbed and puts back what it lost: a NetManager
    /// that restarted (it removes the veths of its last run, and a clean stop removes them too) is registered again
    /// and every running container is attached again (its network namespace lives on with the container); a
    /// unikernel's tap went with the NetManager's namespace, so its guest is stopped and the cluster starts it
    /// again. A NetManager without the status call (the reference's) is not checked.
    async fn keep_overlay(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(nm) = self.netmanager.clone() else {
            return;
        };
        loop {
            if sleep_or_shutdown(OVERLAY_CHECK, &mut shutdown).await {
                return;
            }
            // Taken before asking: these attached before the NetManager answers, so it must list them.
            let running = self.attached_running();
            let plumbed = match nm.plumbed().await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tracing::info!(
                        "the NetManager has no status call; attachments are not checked after its restarts"
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "NetManager status unavailable; checking again later");
                    continue;
                }
            };
            if !plumbed.registered {
                let Some(id) = lock(&self.identity).clone() else {
                    continue;
                };
                tracing::warn!(node = %id.node_id, "the NetManager restarted: registering it again");
                if let Err(e) = self.register_overlay(&nm, &id).await {
                    tracing::warn!(error = %e, "NetManager registration failed; trying again later");
                    continue;
                }
            }
            for lost in running
                .into_iter()
                .filter(|r| !plumbed.instances.contains(&(r.job.clone(), r.number)))
            {
                self.reattach(&nm, lost).await;
            }
        }
    }

    /// `POST /register` to the NetManager with this worker's cluster identity.
    async fn register_overlay(&self, nm: &NetManager, id: &Identity) -> Result<(), OverlayError> {
        nm.register(
            &id.node_id,
            &self.settings.cluster_address,
            id.mqtt_port,
            &id.mqtt_password,
        )
        .await
    }

    /// Running instances attached to the overlay that are not being stopped.
    fn attached_running(&self) -> Vec<Reattach> {
        lock(&self.instances)
            .iter()
            .filter(|(_, i)| i.attached && i.stop.is_none())
            .filter_map(|(task, i)| match i.phase {
                Phase::Running { pid } if pid > 0 => Some(Reattach {
                    task: task.clone(),
                    job: i.job_name.clone(),
                    number: i.number,
                    port: i.port.clone(),
                    pid,
                    runtime: i.runtime.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Attaches a running container the NetManager lost again, or stops a unikernel whose tap it lost.
    async fn reattach(&self, nm: &NetManager, lost: Reattach) {
        let Reattach {
            task,
            job,
            number,
            port,
            pid,
            runtime,
        } = lost;
        if runtime.name() == unikernel::NAME {
            tracing::warn!(task = %task, "the NetManager lost this guest's network; stopping it to be started again");
            if let Err(e) = runtime.stop(&task, true).await {
                tracing::warn!(task = %task, error = %e, "cannot stop the guest");
            }
            return;
        }
        match nm.attach(pid, &job, number, &port).await {
            Ok(answer) => {
                tracing::info!(task = %task, pid, ip = %answer.ns_address, "attached again after a NetManager restart")
            }
            Err(e) => {
                tracing::warn!(task = %task, pid, error = %e, "cannot attach again; trying at the next check")
            }
        }
    }

    // === Adoption ================================================================================================

    /// Takes over what a previous run left in the runtimes: running instances are watched again, ended ones are
    /// reported and removed, anything that is not ours is removed.
    async fn adopt(self: &Arc<Self>) {
        for runtime in self.runtimes.all() {
            let found = match runtime.list().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(runtime = runtime.name(), error = %e, "cannot list instances to adopt");
                    continue;
                }
            };
            for c in found {
                let job = c.labels.get(label::JOB).cloned().unwrap_or_default();
                let number: Option<i64> = c.labels.get(label::INSTANCE).and_then(|n| n.parse().ok());
                let expected = number.and_then(|n| task_id(&job, n));
                let (Some(number), Some(task)) = (number, expected.filter(|t| *t == c.id)) else {
                    tracing::info!(id = %c.id, runtime = runtime.name(), "removing an instance that is not an Oakestra instance");
                    if let Err(e) = runtime.remove(&c.id).await {
                        tracing::warn!(id = %c.id, error = %e, "cannot remove");
                    }
                    continue;
                };
                let (done, _) = watch::channel(false);
                let flag = |k: &str| c.labels.get(k).is_some_and(|v| v == "true");
                let pid = match c.state {
                    TaskState::Alive { pid } => pid,
                    _ => 0,
                };
                lock(&self.instances).insert(
                    task.clone(),
                    Instance {
                        runtime: runtime.clone(),
                        job_name: job.clone(),
                        number,
                        one_shot: flag(label::ONE_SHOT),
                        port: c.labels.get(label::PORT).cloned().unwrap_or_default(),
                        memory_mib: c
                            .labels
                            .get(label::MEMORY)
                            .and_then(|m| m.parse().ok())
                            .unwrap_or(0),
                        attached: flag(label::ATTACHED),
                        phase: Phase::Running { pid },
                        stop: None,
                        done,
                    },
                );
                match c.state {
                    TaskState::Alive { pid } => {
                        tracing::info!(task = %task, pid, runtime = runtime.name(), "adopted a running instance");
                        tokio::spawn(self.clone().watch(runtime.clone(), task));
                    }
                    TaskState::Stopped { exit_code } => {
                        tracing::info!(task = %task, exit_code, "an instance exited while the agent was away");
                        self.finish(
                            &task,
                            Ended {
                                code: Some(exit_code),
                                reason: None,
                            },
                        )
                        .await;
                    }
                    TaskState::Missing => {
                        tracing::info!(task = %task, "an instance ended while the agent was away");
                        self.finish(
                            &task,
                            Ended {
                                code: None,
                                reason: Some("it ended while the NodeEngine was away".into()),
                            },
                        )
                        .await;
                    }
                }
            }
        }
    }

    // === Reports =================================================================================================

    /// One `information` report.
    async fn report_node(self: &Arc<Self>) {
        let me = self.clone();
        let Ok(sample) = tokio::task::spawn_blocking(move || lock(&me.sampler).sample()).await else {
            return;
        };
        let gpu = GpuFields::of(&sample.gpus);
        self.telemetry
            .node_load(sample.cpu_percent, sample.memory_percent);
        let info = NodeInformation {
            ip: Some(lock(&self.public_ip).clone()),
            cpu_percent: Some(sample.cpu_percent),
            vcpus: Some(sample.vcpus),
            memory_percent: Some(sample.memory_percent),
            memory: Some(sample.memory_available_mib),
            gpu_driver: Some(gpu.driver),
            gpu_temp: Some(gpu.temperature),
            gpu_usage: Some(gpu.usage),
            vram: Some(gpu.vram),
            vram_percent: Some(gpu.vram_percent),
            vgpus: Some(gpu.count),
            ..NodeInformation::default()
        };
        let Some(session) = self.session() else {
            return;
        };
        session.publish_periodic("information", &info);
        let services = self.resources(sample.memory_available_mib).await;
        session.publish_periodic(
            "jobs/resources",
            &ResourcesReport {
                services,
                ..ResourcesReport::default()
            },
        );
    }

    /// Per-instance CPU, memory, disk and log tail of the running instances.
    async fn resources(&self, available_mib: i64) -> Vec<ServiceResources> {
        let running: Vec<(String, String, i64, Arc<dyn Runtime>)> = lock(&self.instances)
            .iter()
            .filter(|(_, i)| matches!(i.phase, Phase::Running { .. }) && i.stop.is_none())
            .map(|(t, i)| (t.clone(), i.job_name.clone(), i.number, i.runtime.clone()))
            .collect();
        let cores = metrics::logical_cores();
        let available_bytes = (available_mib.max(1) as f64) * 1024.0 * 1024.0;
        let mut out = Vec::with_capacity(running.len());
        for (task, job, number, runtime) in running {
            let (cpu, mem) = match runtime.usage(&task).await {
                Some(u) => {
                    let cpu = lock(&self.cpu).percent(&task, u.cpu_ns, Instant::now(), cores);
                    (cpu, u.memory_bytes as f64 / available_bytes)
                }
                None => (0.0, 0.0),
            };
            let disk = self.disk_usage(&runtime, &task).await;
            out.push(ServiceResources {
                cpu_percent: format!("{cpu:.2}"),
                memory_percent: format!("{mem:.6}"),
                disk: disk.to_string(),
                logs: metrics::log_tail(&self.log_path(&task), LOG_TAIL_BYTES),
                job_name: job,
                virtualization: runtime.name().to_owned(),
                instance: number,
                ..ServiceResources::default()
            });
        }
        out
    }

    /// The disk use of `task`, measured at most every [`DISK_USAGE_TTL`].
    async fn disk_usage(&self, runtime: &Arc<dyn Runtime>, task: &str) -> i64 {
        if let Some((at, bytes)) = lock(&self.disk).get(task)
            && at.elapsed() < DISK_USAGE_TTL
        {
            return *bytes;
        }
        let bytes = runtime.disk_usage(task).await;
        lock(&self.disk).insert(task.to_owned(), (Instant::now(), bytes));
        bytes
    }

    fn write_status(&self) {
        let mut instances: Vec<InstanceStatus> = lock(&self.instances)
            .iter()
            .map(|(t, i)| InstanceStatus {
                task: t.clone(),
                phase: match i.phase {
                    Phase::Deploying => "deploying".into(),
                    Phase::Running { .. } => "running".into(),
                },
                pid: match i.phase {
                    Phase::Running { pid } => pid,
                    Phase::Deploying => 0,
                },
                runtime: i.runtime.name().to_owned(),
            })
            .collect();
        instances.sort_by(|a, b| a.task.cmp(&b.task));
        let status = StatusFile {
            pid: std::process::id(),
            node_id: self.node_id(),
            node_name: self.settings.node_name.clone(),
            cluster: format!("{}:{}", self.settings.cluster_address, self.settings.cluster_port),
            connected: self.session().is_some_and(|s| s.is_connected()),
            instances,
            runtimes: self.runtimes.names(),
            unikernel_accelerator: self.accelerator.as_ref().map(|(a, why)| format!("{a} ({why})")),
            updated_s: now_s(),
        };
        let path = self.settings.state_dir.join("status.json");
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::debug!(path = %path.display(), "cannot write the status file");
        }
    }

    /// Starts the metrics listener on `addr` (token from `token_file`) until `shutdown`.
    async fn serve_metrics(
        self: &Arc<Self>,
        addr: std::net::SocketAddr,
        token_file: &Path,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, AgentError> {
        let failed = |reason: String| AgentError::Metrics { addr, reason };
        let token =
            oakestra_runtime::metrics::endpoint::read_token(token_file).map_err(|e| failed(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let me = Arc::clone(self);
        let router = oakestra_runtime::metrics::endpoint::router(token.into(), move || {
            let me = Arc::clone(&me);
            async move {
                let (deploying, running) =
                    lock(&me.instances)
                        .values()
                        .fold((0, 0), |(d, r), i| match i.phase {
                            Phase::Deploying => (d + 1, r),
                            Phase::Running { .. } => (d, r + 1),
                        });
                let connected = me.session().is_some_and(|s| s.is_connected());
                me.telemetry.render(deploying, running, connected)
            }
        });
        tracing::info!(%addr, "serving Prometheus metrics (GET /metrics, bearer token)");
        Ok(tokio::spawn(oakestra_runtime::server::serve(
            listener,
            router,
            oakestra_runtime::server::ServerLimits::default(),
            async move {
                let _ = shutdown.wait_for(|v| *v).await;
            },
        )))
    }

    /// Stops every instance (for `--on-stop stop`), in parallel.
    async fn stop_all(self: &Arc<Self>) {
        let all: Vec<(String, String, i64)> = lock(&self.instances)
            .iter()
            .map(|(t, i)| (t.clone(), i.job_name.clone(), i.number))
            .collect();
        let mut joins = Vec::new();
        for (task, job, number) in all {
            let me = self.clone();
            joins.push(tokio::spawn(async move {
                me.stop_instance(&task, StopReason::Shutdown, &job, number).await;
            }));
        }
        for j in joins {
            let _ = j.await;
        }
    }
}

/// The task id `<job>.instance.<n>` (the container id), if the job name and number are valid.
fn task_id(job: &str, number: i64) -> Option<String> {
    let instance = u32::try_from(number).ok()?;
    Some(
        TaskId {
            job: job.parse().ok()?,
            instance,
        }
        .to_string(),
    )
}

/// The GPU fields of the node reports (the first GPU's figures, as the reference sends them; zeros without one).
#[derive(Debug, Default)]
struct GpuFields {
    driver: String,
    usage: f64,
    count: i64,
    temperature: f64,
    vram: f64,
    vram_percent: f64,
}

impl GpuFields {
    fn of(gpus: &[metrics::Gpu]) -> Self {
        let Some(g) = gpus.first() else {
            return Self::default();
        };
        Self {
            driver: g.driver.clone(),
            usage: g.usage_percent,
            count: i64::try_from(gpus.len()).unwrap_or_default(),
            temperature: g.temperature_c,
            vram: g.memory_total_mib,
            vram_percent: if g.memory_total_mib > 0.0 {
                g.memory_used_mib / g.memory_total_mib * 100.0
            } else {
                0.0
            },
        }
    }
}

/// The status an ended instance is reported with.
fn exit_status(ended: &Ended, one_shot: bool, oom_kills: u64, memory_mib: i64) -> (Status, String) {
    if oom_kills > 0 {
        return (
            Status::Dead,
            format!("OOM-killed: the instance exceeded its memory limit of {memory_mib} MiB"),
        );
    }
    let status = match ended.code {
        Some(0) if one_shot => Status::Completed,
        _ => Status::Dead,
    };
    if let Some(reason) = &ended.reason {
        let detail = if status == Status::Completed {
            String::new()
        } else {
            reason.clone()
        };
        return (status, detail);
    }
    let detail = match ended.code {
        Some(0) if one_shot => String::new(),
        Some(0) => "exited with code 0".into(),
        Some(c) if c > 128 && c < 160 => format!("killed by signal {} (exit code {c})", c - 128),
        Some(c) => format!("exited with code {c}"),
        None => "the task vanished (no exit code)".into(),
    };
    (status, detail)
}

/// The unikernel runtime (`-u=true`): QEMU found, KVM probed, directories made. `None` (with a warning) when
/// this machine cannot run guests; the worker then offers containers only.
pub async fn unikernel_runtime(settings: &Settings) -> Option<UnikernelRuntime> {
    let Some(qemu) = unikernel::find_qemu() else {
        tracing::warn!(
            arch = std::env::consts::ARCH,
            "-u=true but no qemu-system-x86_64/-aarch64 in PATH (scripts/install-worker.sh installs it): unikernels are not offered"
        );
        return None;
    };
    let dir = settings.state_dir.join("unikernel");
    let (accel, reason) = match settings.unikernel_accel {
        AccelChoice::Auto => unikernel::probe_accel(&qemu, &dir).await,
        AccelChoice::Kvm => (Accel::Kvm, "--unikernel-accel kvm".to_owned()),
        AccelChoice::Tcg => (Accel::Tcg, "--unikernel-accel tcg".to_owned()),
    };
    if accel == Accel::Tcg {
        tracing::warn!(reason = %reason, "unikernels run under TCG (software emulation): slower boots and guests than with KVM");
    } else {
        tracing::info!(reason = %reason, "unikernels run with KVM");
    }
    let registry = crate::registry::Registry::new(settings.registry_credentials.clone());
    let cache = ImageCache::new(
        dir.join("cache"),
        settings.unikernel_max_image_bytes,
        settings.unikernel_cache_keep,
    );
    let cfg = UnikernelConfig {
        dir,
        qemu: qemu.clone(),
        arch: std::env::consts::ARCH.to_owned(),
        accel,
        accel_reason: reason,
        vhost: std::path::Path::new("/dev/vhost-net").exists(),
        registry,
        cache,
    };
    match UnikernelRuntime::new(cfg) {
        Ok(r) => {
            tracing::info!(qemu = %qemu.display(), accel = accel.as_str(), "unikernel runtime ready");
            Some(r)
        }
        Err(e) => {
            tracing::warn!(error = %e, "unikernel runtime unavailable");
            None
        }
    }
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run(settings: Settings, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    for dir in [
        &settings.state_dir,
        &settings.app_logs,
        &settings.state_dir.join("instances"),
    ] {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::Dir {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
    }
    let Some(containerd) = connect_runtime(&settings, &mut shutdown).await else {
        return Ok(());
    };
    let mut all: Vec<Arc<dyn Runtime>> = vec![Arc::new(ContainerRuntime::new(containerd))];
    let mut accelerator = None;
    if settings.unikernel_requested
        && let Some(guests) = unikernel_runtime(&settings).await
    {
        let (accel, why) = guests.accel();
        accelerator = Some((accel.as_str().to_owned(), why.to_owned()));
        all.push(Arc::new(guests));
    }
    let ip = local_ip_towards(&settings.cluster_address, settings.cluster_port)
        .await
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    let netmanager = NetManager::from_overlay(&settings.overlay);
    let mut sampler = NodeSampler::new();
    let first = sampler.sample();
    let info = metrics::system_info();
    let agent = Arc::new(Agent {
        settings: settings.clone(),
        runtimes: Runtimes::new(all),
        accelerator,
        netmanager,
        session: Mutex::new(None),
        identity: Mutex::new(None),
        public_ip: Mutex::new(ip),
        instances: Mutex::new(HashMap::new()),
        cpu: Mutex::new(CpuTracker::new()),
        disk: Mutex::new(HashMap::new()),
        sampler: Mutex::new(sampler),
        report_soon: tokio::sync::Notify::new(),
        telemetry: Arc::new(Telemetry::new()),
        #[cfg(test)]
        reports: Mutex::new(Vec::new()),
    });
    let metrics_server = match &settings.metrics {
        Some((addr, token_file)) => Some(agent.serve_metrics(*addr, token_file, shutdown.clone()).await?),
        None => None,
    };
    let body = agent.registration(&first, &info);
    let Some((identity, session, mut inbound, mut pump)) =
        Agent::join(&settings, body, agent.telemetry.mqtt(), &mut shutdown).await
    else {
        return Ok(());
    };
    *lock(&agent.identity) = Some(identity.clone());
    *lock(&agent.session) = Some(session);
    if let Some(nm) = &agent.netmanager {
        let mut backoff = Duration::from_secs(1);
        while let Err(e) = agent.register_overlay(nm, &identity).await {
            tracing::warn!(error = %e, retry_s = backoff.as_secs(), "NetManager registration failed");
            if sleep_or_shutdown(backoff, &mut shutdown).await {
                if let Some(s) = agent.session() {
                    s.disconnect().await;
                }
                return Ok(());
            }
            backoff = oakestra_protocol::backoff::double(backoff);
        }
        tracing::info!("NetManager registered");
    }
    agent.adopt().await;
    let overlay_keeper = tokio::spawn(agent.clone().keep_overlay(shutdown.clone()));
    let mut ticker = tokio::time::interval(settings.report_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = ticker.tick() => {
                agent.report_node().await;
                agent.write_status();
            }
            () = agent.report_soon.notified() => {
                agent.report_node().await;
                agent.write_status();
                // The next periodic report is a whole interval after this one.
                ticker.reset();
            }
            msg = inbound.recv() => match msg {
                Some(Inbound::Deploy(cmd)) => { tokio::spawn(agent.clone().deploy(*cmd)); }
                Some(Inbound::Delete(cmd)) => { tokio::spawn(agent.clone().undeploy(cmd)); }
                Some(Inbound::Connected) => agent.report_node().await,
                Some(Inbound::Rejected(code)) => {
                    tracing::warn!(code = %code, "the broker refused our credentials; registering again");
                    pump.abort();
                    if let Some(s) = agent.session() {
                        s.disconnect().await;
                    }
                    let body = agent.registration(&lock(&agent.sampler).sample(), &info);
                    let Some((identity, session, rx, p)) =
                        Agent::join(&settings, body, agent.telemetry.mqtt(), &mut shutdown).await
                    else {
                        break;
                    };
                    *lock(&agent.identity) = Some(identity);
                    *lock(&agent.session) = Some(session);
                    inbound = rx;
                    pump = p;
                }
                None => break,
            }
        }
    }
    tracing::info!(on_stop = ?settings.on_stop, "shutting down");
    overlay_keeper.abort();
    if settings.on_stop == OnStop::Stop {
        agent.stop_all().await;
    }
    // Let queued status reports leave before saying goodbye.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(session) = agent.session() {
        session.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    pump.abort();
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    let _ = std::fs::remove_file(settings.state_dir.join("status.json"));
    Ok(())
}

/// `status.json` of a running agent, if its pid is alive.
pub fn read_status(state_dir: &Path) -> Option<StatusFile> {
    let text = std::fs::read_to_string(state_dir.join("status.json")).ok()?;
    let status: StatusFile = serde_json::from_str(&text).ok()?;
    Path::new(&format!("/proc/{}", status.pid))
        .exists()
        .then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use oakestra_protocol::mqtt::worker::DeleteCommand;

    const JOB: &str = "app.ns.svc.ns";

    fn ended(code: Option<u32>, reason: Option<&str>) -> Ended {
        Ended {
            code,
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(
            exit_status(&ended(Some(0), None), true, 0, 0).0,
            Status::Completed
        );
        assert_eq!(exit_status(&ended(Some(0), None), false, 0, 0).0, Status::Dead);
        let (s, d) = exit_status(&ended(Some(137), None), false, 1, 32);
        assert_eq!(s, Status::Dead);
        assert!(d.contains("OOM") && d.contains("32 MiB"), "{d}");
        assert!(
            exit_status(&ended(Some(137), None), false, 0, 0)
                .1
                .contains("signal 9")
        );
        assert!(
            exit_status(&ended(Some(3), None), true, 0, 0)
                .1
                .contains("code 3")
        );
        assert_eq!(exit_status(&ended(None, None), true, 0, 0).0, Status::Dead);
        // A guest's own reason wins; a one-shot guest that powered off completes.
        let (s, d) = exit_status(&ended(Some(1), Some("the guest kernel panicked")), true, 0, 0);
        assert_eq!((s, d.as_str()), (Status::Dead, "the guest kernel panicked"));
        let (s, d) = exit_status(&ended(Some(0), Some("the guest powered off")), true, 0, 0);
        assert_eq!((s, d.as_str()), (Status::Completed, ""));
    }

    fn settings(dir: &Path) -> Settings {
        let cli = <crate::Cli as clap::Parser>::try_parse_from([
            "NodeEngine",
            "-a",
            "127.0.0.1",
            "-n",
            "-1",
            "--log-file",
            "none",
            "--state-dir",
            &dir.join("state").display().to_string(),
            "-l",
            &dir.join("logs").display().to_string(),
        ])
        .unwrap();
        Settings::from_parts(&cli.run, crate::config::ConfFile::default()).unwrap()
    }

    fn agent(name: &str) -> (Arc<Agent>, Arc<FakeRuntime>, Arc<FakeRuntime>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("oak-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let containers = Arc::new(FakeRuntime::new("docker"));
        let guests = Arc::new(FakeRuntime::new("unikernel"));
        let agent = Arc::new(Agent {
            settings: settings(&dir),
            runtimes: Runtimes::new(vec![containers.clone(), guests.clone()]),
            accelerator: Some(("tcg".into(), "test".into())),
            netmanager: None,
            session: Mutex::new(None),
            identity: Mutex::new(Some(Identity {
                node_id: "n1".into(),
                mqtt_password: String::new(),
                cluster: String::new(),
                mqtt_port: 10003,
            })),
            public_ip: Mutex::new("127.0.0.1".into()),
            instances: Mutex::new(HashMap::new()),
            cpu: Mutex::new(CpuTracker::new()),
            disk: Mutex::new(HashMap::new()),
            sampler: Mutex::new(NodeSampler::new()),
            report_soon: tokio::sync::Notify::new(),
            telemetry: Arc::new(Telemetry::new()),
            reports: Mutex::new(Vec::new()),
        });
        (agent, containers, guests, dir)
    }

    fn deploy_cmd(virtualization: &str, number: i64) -> DeployCommand {
        DeployCommand {
            job_name: JOB.into(),
            instance_number: number,
            virtualization: virtualization.into(),
            image: "http://h/k.tar.gz".into(),
            one_shot: true,
            ..DeployCommand::default()
        }
    }

    fn statuses(agent: &Agent) -> Vec<(Status, String)> {
        lock(&agent.reports)
            .iter()
            .map(|(_, _, s, d)| (*s, d.clone()))
            .collect()
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn deploys_are_routed_by_virtualization() {
        let (agent, containers, guests, dir) = agent("route");
        // A log left by an earlier instance with the same task id is kept aside, not continued.
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::write(dir.join("logs/app.ns.svc.ns.instance.0"), "earlier instance\n").unwrap();
        agent.clone().deploy(deploy_cmd("unikernel", 0)).await;
        assert!(!dir.join("logs/app.ns.svc.ns.instance.0").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("logs/app.ns.svc.ns.instance.0.1")).unwrap(),
            "earlier instance\n"
        );
        agent.clone().deploy(deploy_cmd("container", 1)).await;
        assert_eq!(
            guests.calls(),
            [
                "create app.ns.svc.ns.instance.0",
                "start app.ns.svc.ns.instance.0"
            ]
        );
        assert_eq!(
            containers.calls(),
            [
                "create app.ns.svc.ns.instance.1",
                "start app.ns.svc.ns.instance.1"
            ]
        );
        let labels = lock(&guests.labels)["app.ns.svc.ns.instance.0"].clone();
        assert_eq!(labels[label::JOB], JOB);
        assert_eq!(labels[label::ONE_SHOT], "true");
        // Progress reached the cluster as CREATING, then CREATED.
        let s = statuses(&agent);
        assert!(s.contains(&(Status::Creating, "creating".into())), "{s:?}");
        assert_eq!(
            s.iter().filter(|(st, _)| *st == Status::Created).count(),
            2,
            "{s:?}"
        );
        // Unknown runtimes fail with the list of what is offered.
        agent.clone().deploy(deploy_cmd("crosvm", 2)).await;
        let (st, detail) = statuses(&agent).pop().unwrap();
        assert_eq!(st, Status::Failed);
        assert!(
            detail.contains("\"crosvm\"") && detail.contains("docker, unikernel"),
            "{detail}"
        );
        assert_eq!(
            agent
                .registration(&NodeSampler::new().sample(), &metrics::system_info())
                .virtualization,
            ["docker", "unikernel"]
        );
        // A guest that powers off as a one-shot completes and is removed.
        guests.end(
            "app.ns.svc.ns.instance.0",
            ended(Some(0), Some("the guest powered off")),
        );
        until("completed", || {
            statuses(&agent).iter().any(|(s, _)| *s == Status::Completed)
        })
        .await;
        assert!(
            guests
                .calls()
                .contains(&"remove app.ns.svc.ns.instance.0".to_owned())
        );
        assert!(!lock(&agent.instances).contains_key("app.ns.svc.ns.instance.0"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_failed_create_reports_the_reason_and_cleans_up() {
        let (agent, _, guests, dir) = agent("fail");
        *lock(&guests.fail_create) =
            Some("no image for this worker's architecture amd64: the service offers arm64".into());
        agent.clone().deploy(deploy_cmd("unikernel", 0)).await;
        let (st, detail) = statuses(&agent).pop().unwrap();
        assert_eq!(st, Status::Failed);
        assert!(detail.contains("offers arm64"), "{detail}");
        assert_eq!(
            guests.calls(),
            [
                "create app.ns.svc.ns.instance.0",
                "remove app.ns.svc.ns.instance.0"
            ]
        );
        assert!(lock(&agent.instances).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_delete_during_the_deploy_wins() {
        let (agent, _, guests, dir) = agent("race");
        let gate = Arc::new(tokio::sync::Notify::new());
        *lock(&guests.create_gate) = Some(gate.clone());
        let deploying = tokio::spawn(agent.clone().deploy(deploy_cmd("unikernel", 0)));
        until("create", || !guests.calls().is_empty()).await;
        // The delete arrives while the image is still downloading: nothing to stop yet.
        agent
            .clone()
            .undeploy(DeleteCommand {
                job_name: JOB.into(),
                instance_number: 0,
                ..DeleteCommand::default()
            })
            .await;
        assert!(!statuses(&agent).iter().any(|(s, _)| *s == Status::Undeployed));
        gate.notify_one();
        deploying.await.unwrap();
        until("undeployed", || {
            statuses(&agent).iter().any(|(s, _)| *s == Status::Undeployed)
        })
        .await;
        let calls = guests.calls();
        assert!(
            calls.contains(&"stop app.ns.svc.ns.instance.0 true".to_owned()),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"remove app.ns.svc.ns.instance.0".to_owned()),
            "{calls:?}"
        );
        assert!(
            !statuses(&agent)
                .iter()
                .any(|(s, _)| *s == Status::Dead || *s == Status::Failed)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn undeploy_stops_gracefully_and_twice_is_harmless() {
        let (agent, _, guests, dir) = agent("undeploy");
        agent.clone().deploy(deploy_cmd("unikernel", 0)).await;
        let delete = DeleteCommand {
            job_name: JOB.into(),
            instance_number: 0,
            ..DeleteCommand::default()
        };
        agent.clone().undeploy(delete.clone()).await;
        until("undeployed", || {
            statuses(&agent).iter().any(|(s, _)| *s == Status::Undeployed)
        })
        .await;
        assert!(
            guests
                .calls()
                .contains(&"stop app.ns.svc.ns.instance.0 false".to_owned())
        );
        assert!(
            !guests
                .calls()
                .contains(&"stop app.ns.svc.ns.instance.0 true".to_owned())
        );
        // A second delete (QoS 1 redelivery) cleans up leftovers in every runtime and confirms again.
        agent.clone().undeploy(delete).await;
        assert_eq!(
            statuses(&agent)
                .iter()
                .filter(|(s, _)| *s == Status::Undeployed)
                .count(),
            2
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn adoption_watches_live_guests_and_reports_gone_ones() {
        let (agent, containers, guests, dir) = agent("adopt");
        let labels = |n: &'static str| {
            vec![
                (label::JOB, JOB),
                (label::INSTANCE, n),
                (label::ONE_SHOT, "false"),
                (label::ATTACHED, "false"),
            ]
        };
        let l0 = labels("0");
        let l1 = labels("1");
        *lock(&guests.found) = vec![
            FakeRuntime::found("app.ns.svc.ns.instance.0", &l0, TaskState::Alive { pid: 77 }),
            FakeRuntime::found("app.ns.svc.ns.instance.1", &l1, TaskState::Missing),
            FakeRuntime::found("stranger", &[], TaskState::Alive { pid: 78 }),
        ];
        agent.adopt().await;
        assert_eq!(containers.calls(), ["list"]);
        let calls = guests.calls();
        assert!(calls.contains(&"remove stranger".to_owned()), "{calls:?}");
        assert!(
            calls.contains(&"remove app.ns.svc.ns.instance.1".to_owned()),
            "{calls:?}"
        );
        let (st, detail) = statuses(&agent).pop().unwrap();
        assert_eq!(st, Status::Dead);
        assert!(detail.contains("while the NodeEngine was away"), "{detail}");
        {
            let map = lock(&agent.instances);
            let i = &map["app.ns.svc.ns.instance.0"];
            assert_eq!(i.phase, Phase::Running { pid: 77 });
            assert_eq!(i.runtime.name(), "unikernel");
        }
        // The adopted guest is watched: its end is reported.
        guests.end(
            "app.ns.svc.ns.instance.0",
            ended(Some(1), Some("the guest reset")),
        );
        until("dead", || {
            statuses(&agent).iter().any(|(_, d)| d == "the guest reset")
        })
        .await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
