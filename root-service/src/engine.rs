//! The root orchestrator's moving parts: placing instances on clusters (the shared placement policy plus capacity
//! reservations), deploy/undeploy calls to clusters, fallback to the next cluster when one cannot run an instance,
//! rescheduling when a cluster stops reporting, cluster reports and results, and job-update fan-out to interested
//! clusters.
//!
//! The decisions themselves (which cluster, what a refusal, a result or a report means, what a maintenance round
//! moves) are pure functions in [`crate::plan`]; the engine gathers their inputs from the store, the reservations
//! and the plugin, and carries the decisions out.
//!
//! Calls to clusters run in background tasks with a deadline and a few retries; their failures feed back into
//! placement (an unreachable cluster counts as one that refused), so nothing waits on a dead peer and nothing is
//! left half-placed.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hyper::Method;
use oakestra_addons::slots::{Delegation, PluginAnswer, Slots};
use oakestra_protocol::{
    addons::Slot,
    api::federation::{DeployResult, JOB_UPDATE_PATH, JobUpdate, service_instance_path},
    mqtt::net::UpdateType,
    sched::{self, Candidate, Policy, Reservations},
    status::Status,
    text::Escaped,
};
use oakestra_runtime::client::{self, base_url};
use serde_json::{Map, Value};

use crate::{
    Error,
    plan::{
        self, AfterRefusal, Maintenance, Placement, PlacementDecision, ReportAction, ResultVerdict,
        candidate, instance_key as key,
    },
    store::{
        Store,
        apps::{DeletedInstance, DeletedService, InstanceRow, NetRecorded, ServiceRow},
        clusters::ClusterRow,
        now_ms,
    },
};

/// Deadline of one call to a cluster.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one job-update notification (the reference's).
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per call before giving up.
pub const ATTEMPTS: u32 = 3;

/// The orchestrator; shared as `Arc<Engine>`.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    policy: Policy,
    liveness_ms: i64,
    retry_ms: i64,
    reservations: Mutex<Reservations>,
    /// The addons' plugin slots, once the addons engine is up: a `root_scheduler` plugin places instead.
    slots: std::sync::OnceLock<Arc<Slots>>,
    /// Prometheus metrics.
    metrics: Arc<crate::metrics::RootMetrics>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine over `store`.
    pub fn new(store: Store, policy: Policy, liveness_window: Duration, retry_interval: Duration) -> Self {
        Self {
            store,
            policy,
            liveness_ms: millis(liveness_window),
            retry_ms: millis(retry_interval),
            reservations: Mutex::new(Reservations::default()),
            slots: std::sync::OnceLock::new(),
            metrics: Arc::default(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::RootMetrics> {
        &self.metrics
    }

    /// The plugin slots, once attached.
    pub fn slots(&self) -> Option<&Arc<Slots>> {
        self.slots.get()
    }

    /// Lets a `root_scheduler` plugin in `slots` place instances (the built-in policy stays the fallback).
    pub fn attach_slots(&self, slots: Arc<Slots>) {
        let _ = self.slots.set(slots);
    }

    /// Asks the `root_scheduler` plugin, if one fills the slot, where instance `number` goes. `None`: the built-in
    /// scheduler decides (no plugin, or it could not be used: counted and logged by the slots).
    async fn ask_plugin(&self, service: &ServiceRow, number: i64) -> Option<PluginAnswer> {
        let slots = self.slots.get()?;
        slots.endpoint(Slot::RootScheduler)?;
        let job = Value::Object(service.doc.clone());
        match slots
            .ask(Slot::RootScheduler, &key(&service.id, number), job)
            .await
        {
            Delegation::Answer(answer) => Some(answer),
            Delegation::BuiltIn | Delegation::Fallback(_) => None,
        }
    }

    /// The clusters as a scheduler plugin sees them (the reference resource abstractor's shape), `active_only`
    /// leaving out those that stopped reporting, `name` only the one so named.
    pub async fn resources(&self, active_only: bool, name: Option<String>) -> Result<Vec<Value>, Error> {
        let all = self.store.clusters().await?;
        let now = now_ms();
        Ok(all
            .iter()
            .map(|c| candidate(c, c.is_active(now, self.liveness_ms)))
            .filter(|c| !active_only || c.active)
            .filter(|c| name.as_ref().is_none_or(|n| &c.name == n))
            .map(|c| c.resource_document("cluster_name"))
            .collect())
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The interval of maintenance rounds.
    pub fn retry_interval(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.retry_ms).unwrap_or(u64::MAX))
    }

    /// The liveness window in milliseconds.
    pub fn liveness_ms(&self) -> i64 {
        self.liveness_ms
    }

    fn reservations(&self) -> std::sync::MutexGuard<'_, Reservations> {
        // Reservations are plain bookkeeping; a panic elsewhere cannot leave them inconsistent.
        self.reservations.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many placements currently hold a reservation.
    pub fn reservation_count(&self) -> usize {
        self.reservations().len()
    }

    /// Creates instance `n` (the next number) of `service_id` and schedules it. Returns the instance as it stands
    /// after the scheduling decision.
    pub async fn request_instance(self: &Arc<Self>, service_id: &str) -> Result<InstanceRow, Error> {
        let row = self.store.new_instance(service_id.to_owned()).await?;
        tracing::info!(job = %Escaped(service_id), instance = row.number, "instance requested");
        self.schedule(service_id, row.number, Vec::new()).await
    }

    /// Picks a cluster for instance `number` (excluding `tried`), reserves the capacity, records the placement
    /// and sends the deploy call in the background; or records why no cluster can take it.
    pub async fn schedule(
        self: &Arc<Self>,
        service_id: &str,
        number: i64,
        tried: Vec<String>,
    ) -> Result<InstanceRow, Error> {
        let (service, all) = self.store.service_and_clusters(service_id.to_owned()).await?;
        let Some(service) = service else {
            return Err(Error::NotFound {
                what: "service",
                id: service_id.to_owned(),
            });
        };
        let now = now_ms();
        let candidates: Vec<Candidate> = all
            .iter()
            .map(|c| candidate(c, c.is_active(now, self.liveness_ms)))
            .collect();
        let mut demand = sched::demand_from_job(&Value::Object(service.doc.clone()), key(service_id, number));
        demand.exclude.clone_from(&tried);
        let started = std::time::Instant::now();
        let plugin = self.ask_plugin(&service, number).await;
        let PlacementDecision {
            placement,
            plugin_fallback,
        } = {
            let mut reservations = self.reservations();
            reservations.expire(u64::try_from(now).unwrap_or(0));
            let decision = plan::place(
                &candidates,
                &demand,
                &reservations,
                self.policy,
                plugin.as_ref(),
                &tried,
            );
            // Reserved under the same lock as the decision, so a concurrent placement sees it.
            if let Placement::Cluster(cluster_id) = &decision.placement {
                reservations.reserve(
                    cluster_id,
                    &demand.key,
                    demand.need,
                    u64::try_from(now).unwrap_or(0),
                    u64::try_from(self.liveness_ms.saturating_mul(2)).unwrap_or(u64::MAX),
                );
            }
            decision
        };
        if let (Some(why), Some(slots)) = (plugin_fallback, self.slots.get()) {
            slots.count_fallback(Slot::RootScheduler, &demand.key, &why);
        }
        self.metrics.decided(
            matches!(placement, Placement::Cluster(_)),
            started.elapsed().as_secs_f64(),
        );
        match placement {
            Placement::Cluster(cluster_id) => {
                let placed = self
                    .store
                    .place_instance(service_id.to_owned(), number, cluster_id.clone(), tried)
                    .await;
                let placed = match placed {
                    Ok(row) => row,
                    Err(e) => {
                        self.reservations().release(&demand.key);
                        return Err(e);
                    }
                };
                tracing::info!(job = %Escaped(&service.job_name), instance = number, cluster = %Escaped(&cluster_id), "instance placed");
                if let Some(cluster) = all.into_iter().find(|c| c.id == cluster_id) {
                    let engine = Arc::clone(self);
                    let service_id = service_id.to_owned();
                    tokio::spawn(async move { engine.deploy_to(cluster, service_id, number).await });
                }
                Ok(placed)
            }
            Placement::Unplaced { status, detail } => {
                tracing::info!(job = %Escaped(&service.job_name), instance = number, %status, detail = %Escaped(&detail), "instance not placed");
                self.store
                    .unplace_instance(service_id.to_owned(), number, status, detail, tried)
                    .await?
                    .ok_or_else(|| Error::NotFound {
                        what: "instance",
                        id: key(service_id, number),
                    })
            }
        }
    }

    /// Sends the deploy call for instance `number` to `cluster`; a cluster that does not accept it counts as one
    /// that refused it.
    async fn deploy_to(self: Arc<Self>, cluster: ClusterRow, service_id: String, number: i64) {
        let service = match self.store.service(service_id.clone()).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job = %Escaped(&service_id), instance = number, error = %e, "cannot load the job to deploy");
                return;
            }
        };
        if service.instance(number).and_then(|i| i.cluster_id.as_deref()) != Some(cluster.id.as_str()) {
            return; // Deleted or moved meanwhile.
        }
        let body = service.to_json_for_instance(number);
        let path = service_instance_path(&service_id, number);
        match call_cluster(&cluster, Method::POST, &path, Some(&body), CALL_TIMEOUT).await {
            Ok(()) => {
                tracing::info!(job = %Escaped(&service.job_name), instance = number, cluster = %Escaped(&cluster.name), "deploy sent");
            }
            Err(why) => {
                tracing::warn!(job = %Escaped(&service.job_name), instance = number, cluster = %Escaped(&cluster.name), why = %Escaped(&why), "deploy call failed");
                if let Err(e) = self
                    .cluster_refused(
                        &service_id,
                        number,
                        &cluster.id,
                        &format!("deploy call failed: {why}"),
                    )
                    .await
                {
                    tracing::error!(job = %Escaped(&service_id), instance = number, error = %e, "fallback failed");
                }
            }
        }
    }

    /// `cluster_id` cannot run instance `number`: drop it there and try the next cluster.
    ///
    /// Boxed because it closes the cycle schedule → deploy → refused → schedule, whose future type the compiler
    /// could not otherwise prove `Send`.
    pub fn cluster_refused<'a>(
        self: &'a Arc<Self>,
        service_id: &'a str,
        number: i64,
        cluster_id: &'a str,
        why: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>> {
        Box::pin(async move {
            let (instance, cluster) = self
                .store
                .instance_and_cluster(service_id.to_owned(), number, cluster_id.to_owned())
                .await?;
            let AfterRefusal::Reschedule { exclude } = plan::after_refusal(instance.as_ref(), cluster_id)
            else {
                return Ok(());
            };
            tracing::info!(job = %Escaped(service_id), instance = number, cluster = %Escaped(cluster_id), why = %Escaped(why), "cluster cannot run the instance; trying the next one");
            self.reservations().release(&key(service_id, number));
            if let Some(cluster) = cluster {
                spawn_undeploy(cluster, service_id.to_owned(), number);
            }
            self.schedule(service_id, number, exclude).await.map(|_| ())
        })
    }

    /// Deletes instance `number`: frees its addresses and reservation, undeploys it from its cluster and tells
    /// interested clusters.
    pub async fn delete_instance(self: &Arc<Self>, service: &ServiceRow, number: i64) -> Result<(), Error> {
        let DeletedInstance {
            instance: row,
            cluster,
            interested,
        } = self
            .store
            .delete_instance(service.id.clone(), service.job_name.clone(), number)
            .await?;
        self.reservations().release(&key(&service.id, number));
        if let Some(cluster) = cluster {
            spawn_undeploy(cluster, service.id.clone(), row.number);
        }
        notify(interested, &service.job_name, number, UpdateType::Undeployment);
        tracing::info!(job = %Escaped(&service.job_name), instance = number, "instance deleted");
        Ok(())
    }

    /// Undeploys every instance of services that were just deleted from the store and tells interested clusters.
    pub async fn services_deleted(self: &Arc<Self>, services: Vec<DeletedService>) {
        for (service, interested) in services {
            let mut on: Vec<String> = service
                .instances
                .iter()
                .filter_map(|i| i.cluster_id.clone())
                .collect();
            on.sort();
            on.dedup();
            for instance in &service.instances {
                self.reservations().release(&key(&service.id, instance.number));
            }
            let clusters = self.store.clusters_by_ids(on).await.unwrap_or_default();
            for cluster in clusters {
                spawn_undeploy(cluster, service.id.clone(), -1);
            }
            notify(interested, &service.job_name, -1, UpdateType::Undeployment);
            tracing::info!(job = %Escaped(&service.job_name), "service deleted");
        }
    }

    /// Applies a cluster report: the aggregate (liveness), instance and job statuses, reservations, fallback for
    /// instances the cluster cannot place, and reconciliation (jobs or instances root does not have there are
    /// deleted on the cluster).
    pub async fn report(
        self: &Arc<Self>,
        cluster: &ClusterRow,
        body: Map<String, Value>,
    ) -> Result<(), Error> {
        let mut aggregate = body;
        let jobs = match aggregate.remove("jobs") {
            Some(Value::Array(jobs)) => jobs,
            _ => Vec::new(),
        };
        // The address a cluster registered with never changes through a report.
        aggregate.remove("ip");
        let applied = self
            .store
            .apply_report(cluster.id.clone(), aggregate, jobs)
            .await?;
        for action in plan::reconcile(&applied) {
            match action {
                ReportAction::Release { key } => {
                    self.reservations().release(&key);
                }
                ReportAction::UndeployJob { job_id } => {
                    tracing::info!(cluster = %Escaped(&cluster.name), job = %Escaped(&job_id), "cluster runs a job root does not know; deleting it there");
                    spawn_undeploy(cluster.clone(), job_id, -1);
                }
                ReportAction::UndeployInstance { job_id, number } => {
                    tracing::info!(cluster = %Escaped(&cluster.name), job = %Escaped(&job_id), instance = number, "cluster runs an instance root placed elsewhere; deleting it there");
                    spawn_undeploy(cluster.clone(), job_id, number);
                }
                ReportAction::Refused { job_id, number, why } => {
                    self.cluster_refused(&job_id, number, &cluster.id, &why).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies a cluster's scheduling result for one instance.
    pub async fn result(self: &Arc<Self>, cluster: &ClusterRow, result: &DeployResult) -> Result<(), Error> {
        let (job, number) = result.target();
        let Some(number) = number else {
            return Err(Error::BadRequest {
                message: format!(
                    "job_id {:?}: the instance number is missing (send \"<job_id>/<n>\" or instance_number)",
                    result.job_id
                ),
            });
        };
        let instance = self
            .store
            .instance(job.to_owned(), number)
            .await?
            .filter(|i| i.cluster_id.as_deref() == Some(cluster.id.as_str()))
            .ok_or_else(|| Error::NotFound {
                what: "instance on this cluster",
                id: key(job, number),
            })?;
        match plan::deploy_result(result) {
            ResultVerdict::Refused { why } => self.cluster_refused(job, number, &cluster.id, &why).await,
            ResultVerdict::Scheduled { detail } => {
                self.store
                    .set_instance_status(instance.service_id, number, Status::NodeScheduled, detail)
                    .await
            }
        }
    }

    /// One maintenance round: expire reservations, move instances off clusters that stopped reporting, and retry
    /// instances no cluster could take.
    pub async fn tick(self: &Arc<Self>) -> Result<(), Error> {
        let now = now_ms();
        self.reservations().expire(u64::try_from(now).unwrap_or(0));
        let view = self.store.maintenance_view(now, self.liveness_ms).await?;
        for step in plan::maintenance(now, self.retry_ms, &view) {
            match step {
                Maintenance::Rescue {
                    service_id,
                    number,
                    from,
                } => {
                    tracing::warn!(job = %Escaped(&service_id), instance = number, cluster = %Escaped(&from), "cluster stopped reporting; rescheduling the instance");
                    self.reservations().release(&key(&service_id, number));
                    self.schedule(&service_id, number, vec![from]).await?;
                }
                Maintenance::Retry { service_id, number } => {
                    self.schedule(&service_id, number, Vec::new()).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs [`Self::tick`] every `interval` until `stop` fires.
    pub async fn run_maintenance(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = timer.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::error!(error = %e, "maintenance round failed");
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }

    /// Records a cluster's network report for a job's instances and tells interested clusters.
    pub async fn net_deploy_status(
        self: &Arc<Self>,
        job_id: &str,
        instances: Vec<(i64, Map<String, Value>)>,
    ) -> Result<(), Error> {
        let NetRecorded {
            service,
            interested,
            changed,
        } = self
            .store
            .record_instance_net(job_id.to_owned(), instances)
            .await?;
        for number in changed {
            notify(
                interested.clone(),
                &service.job_name,
                number,
                UpdateType::Deployment,
            );
        }
        Ok(())
    }
}

/// One call to a cluster's manager with retries; `Ok` on a 2xx answer.
async fn call_cluster(
    cluster: &ClusterRow,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(), String> {
    call_with_retries(
        &cluster.address,
        cluster.manager_port,
        &cluster.token,
        method,
        path,
        body,
        timeout,
    )
    .await
}

async fn call_with_retries(
    host: &str,
    port: u16,
    token: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(), String> {
    let url = format!("{}{path}", base_url(host, port));
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match client::call(method.clone(), &url, Some(token), body, timeout).await {
            Ok(r) if r.is_success() => return Ok(()),
            // A 4xx will not change by retrying.
            Ok(r) if (400..500).contains(&r.status) => return Err(format!("HTTP {}: {}", r.status, r.body)),
            Ok(r) => last = format!("HTTP {}: {}", r.status, r.body),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Tells `cluster` to remove instance `number` of `job` (`-1`: all), in the background.
fn spawn_undeploy(cluster: ClusterRow, job: String, number: i64) {
    tokio::spawn(async move {
        let path = service_instance_path(&job, number);
        if let Err(why) = call_cluster(&cluster, Method::DELETE, &path, None, CALL_TIMEOUT).await {
            tracing::warn!(cluster = %Escaped(&cluster.name), job = %Escaped(&job), instance = number, why = %Escaped(&why), "undeploy call failed; the next report reconciles it");
        }
    });
}

/// Sends a job update to each interested cluster's network component, in the background.
fn notify(clusters: Vec<ClusterRow>, job_name: &str, number: i64, kind: UpdateType) {
    for cluster in clusters {
        let update = JobUpdate {
            job_name: job_name.to_owned(),
            instance_number: number,
            kind: kind.clone(),
        };
        tokio::spawn(async move {
            let body = serde_json::to_value(&update).unwrap_or(Value::Null);
            let result = call_with_retries(
                &cluster.address,
                cluster.network_port,
                &cluster.token,
                Method::POST,
                JOB_UPDATE_PATH,
                Some(&body),
                NOTIFY_TIMEOUT,
            )
            .await;
            if let Err(why) = result {
                tracing::warn!(cluster = %Escaped(&cluster.name), job = %Escaped(&update.job_name), why = %Escaped(&why), "job update not delivered");
            }
        });
    }
}
