//! The HTTP API on the manager port (10100): worker registration, the calls root makes (deploy, undeploy, job
//! updates, authenticated with the per-cluster secret) and the operator's status views.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use oakestra_addons::slots::{RESOURCES_PATH, RESULT_PATH, Slots};
use oakestra_protocol::{
    api::{cluster::REGISTER_PATH, federation::JobUpdate},
    bearer,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{
    engine::{Engine, NodeError, now_ms},
    state::RegisterError,
};

/// Largest request body accepted (a job document with inline files stays well below).
const MAX_BODY: usize = 1024 * 1024;
/// Largest worker registration accepted.
const MAX_REGISTRATION: usize = 64 * 1024;

/// An error answer: a status and `{"message": …}` naming what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"message": self.message}))).into_response()
    }
}

/// Parses a JSON body, or says which part is wrong (400 for bad JSON, 422 for the wrong shape).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
pub(crate) fn bearer_of(headers: &HeaderMap) -> Option<&str> {
    oakestra_runtime::server::bearer(headers)
}

/// Checks `Authorization: Bearer <cluster secret>` (the secret root gave this cluster).
fn root_only(engine: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = bearer_of(headers);
    let Some(identity) = engine.identity() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster has not registered with root yet",
        ));
    };
    match presented {
        Some(token) if bearer::same_secret(token, &identity.token) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong cluster secret")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <cluster secret>",
        )),
    }
}

/// `GET /metrics`: the Prometheus exposition, for the metrics token only.
async fn metrics(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = engine.metrics_token.get().map(String::as_str).unwrap_or_default();
    if !oakestra_runtime::metrics::endpoint::allowed(&headers, token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "GET /metrics needs Authorization: Bearer <the token in <data-dir>/metrics.token>",
        ));
    }
    let m = &engine.metrics;
    {
        let state = engine.state();
        let mut by_status: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for job in state.jobs() {
            for i in job.instances.values() {
                *by_status.entry(i.status.as_str().to_owned()).or_default() += 1;
            }
        }
        let by_status = by_status
            .into_iter()
            .map(|(status, n)| (crate::metrics::StatusLabel { status }, n));
        oakestra_runtime::metrics::set_counts(&m.instances, by_status);
        let alive = state.nodes().filter(|n| n.alive).count();
        let all = state.nodes().count();
        let label = |s: &str| crate::metrics::StateLabel { state: s.into() };
        oakestra_runtime::metrics::set_counts(
            &m.workers,
            [(label("alive"), alive), (label("dead"), all - alive)],
        );
    }
    let connections = engine.broker.embedded().map_or(0, |b| b.connections());
    m.broker_connections
        .set(i64::try_from(connections).unwrap_or(i64::MAX));
    Ok((
        [(header::CONTENT_TYPE, oakestra_runtime::metrics::CONTENT_TYPE)],
        m.render(engine.broker.embedded().map(|b| b.logins())),
    )
        .into_response())
}

/// Refuses anything but the plugin token of a running addons engine.
fn plugin_only(engine: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = bearer_of(headers);
    match (engine.slots(), presented) {
        (Some(slots), Some(t)) if slots.is_plugin_token(t) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or unknown plugin token (scheduler plugins get it as OAK_PLUGIN_TOKEN)",
        )),
    }
}

/// `GET /api/v1/resources/?active=true`: the workers as candidates, for a `cluster_scheduler` plugin.
async fn resources(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    plugin_only(&engine, &headers)?;
    let active_only = query
        .unwrap_or_default()
        .split('&')
        .any(|kv| matches!(kv, "active=true" | "active=True" | "active=1"));
    Ok(Json(engine.state().plugin_candidates(active_only)))
}

/// `POST /api/result/deploy`: a `cluster_scheduler` plugin's answer `{job_id: "<job>/<n>", candidate_id}`.
async fn plugin_result(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    plugin_only(&engine, &headers)?;
    let value: Value = body(&bytes)?;
    let (job_id, answer) = Slots::parse_result(&value).map_err(|rule| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("scheduler result: {rule}"),
        )
    })?;
    let taken = engine.slots().is_some_and(|s| s.deliver(&job_id, answer));
    if taken {
        Ok(Json(json!("ok")))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no placement waits for job {job_id:?}"),
        ))
    }
}

/// The routes, over the shared engine.
pub fn router(engine: Arc<Engine>) -> Router {
    // A registration is a few KiB; its limit is far below the job documents' one.
    let registration = Router::new()
        .route(REGISTER_PATH, post(register))
        .route("/api/node/register/", post(register))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REGISTRATION));
    Router::new()
        .merge(registration)
        .route("/api/service/{job}/{number}", post(deploy).delete(undeploy))
        .route("/api/net/job/update", post(job_update))
        .route("/api/net/job/update/", post(job_update))
        .route("/api/cluster/status", get(status))
        .route("/api/cluster/report", get(report))
        .route("/api/cluster/workers", get(workers))
        .route("/metrics", get(metrics))
        .route(RESOURCES_PATH, get(resources))
        .route(&format!("{RESOURCES_PATH}/"), get(resources))
        .route(RESULT_PATH, post(plugin_result))
        .route(&format!("{RESULT_PATH}/"), post(plugin_result))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        // Outermost: every error answer (405, 413, path and body rejections, …) becomes `{"message": …}`.
        .layer(axum::middleware::map_response(oakestra_runtime::server::json_errors))
        .with_state(engine)
}

async fn register(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    let value: Value = body(&bytes)?;
    let presented = bearer_of(&headers);
    match engine.register_node(value, presented).await {
        Ok(answer) => Ok(Json(serde_json::to_value(answer).unwrap_or(Value::Null))),
        Err(NodeError::Refused(e @ RegisterError::Duplicate { .. })) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(NodeError::Refused(e)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())),
        Err(NodeError::Body(e)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(e @ NodeError::Unauthorized) => Err(ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())),
        Err(NodeError::Internal(e)) => {
            tracing::error!(error = %e, "worker registration failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the registration could not be stored",
            ))
        }
    }
}

/// The instance number of a path: an integer (`-1` only where every instance is meant).
fn number(text: &str) -> Result<i64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("instance number = {text:?}: must be an integer"),
        )
    })
}

async fn deploy(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    Path((job, n)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    root_only(&engine, &headers)?;
    let n = number(&n)?;
    let doc: serde_json::Map<String, Value> = body(&bytes)?;
    engine
        .deploy(&job, n, doc)
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    Ok(Json(json!({"status": "ok"})))
}

async fn undeploy(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    Path((job, n)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    root_only(&engine, &headers)?;
    let n = number(&n)?;
    if engine.delete(&job, n).await {
        Ok(Json(json!({"status": "ok"})))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {job:?} has no instance {n} on this cluster"),
        ))
    }
}

async fn job_update(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    root_only(&engine, &headers)?;
    let update: JobUpdate = body(&bytes)?;
    // The name becomes a topic level (`jobs/<job>/updates_available`): only app.appns.svc.svcns.
    if let Err(e) = update.job_name.parse::<oakestra_protocol::naming::JobName>() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("job_name: {e}"),
        ));
    }
    // Answered at once, like the reference: the refresh from root runs in the background.
    tokio::spawn(Arc::clone(&engine).job_update(update));
    Ok(Json(json!({"message": "ok"})))
}

async fn status(State(engine): State<Arc<Engine>>) -> Json<Value> {
    let identity = engine.identity();
    let state = engine.state();
    let workers = state.nodes().count();
    let active = state.nodes().filter(|n| n.alive).count();
    let jobs = state.jobs().count();
    let instances: usize = state.jobs().map(|j| j.instances.len()).sum();
    let foreign_reports = state.foreign_reports();
    let broker = engine.broker.embedded().map(|b| {
        let counters = b.router().counters();
        json!({
            "connections": b.connections(),
            "denied_publishes": counters.denied_publishes,
            "denied_subscriptions": counters.denied_subscriptions,
            "dropped_queue_full": counters.dropped_queue_full,
            "dropped_offline": counters.dropped_offline,
        })
    });
    Json(json!({
        "cluster_name": engine.root.registration.cluster_name,
        "cluster_id": identity.map(|i| i.id),
        "connected_to_root": engine.connected_to_root.load(Ordering::Relaxed),
        "mqtt_connected": *engine.mqtt_up.borrow(),
        "workers": workers,
        "active_workers": active,
        "jobs": jobs,
        "instances": instances,
        "ignored_foreign_reports": foreign_reports,
        "mqtt_broker": broker,
    }))
}

async fn report(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    root_only(&engine, &headers)?;
    Ok(Json(Value::Object(engine.state().report())))
}

async fn workers(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    root_only(&engine, &headers)?;
    let now = now_ms();
    let state = engine.state();
    let list: Vec<Value> = state
        .nodes()
        .map(|n| {
            json!({
                "id": n.record.id,
                "name": n.record.name,
                "ip": n.ip(),
                "active": n.alive,
                "silent_ms": now.saturating_sub(n.last_seen_ms),
                "subnet": n.record.subnet.as_ref().map(|s| &s.0),
                "subnet_v6": n.record.subnet.as_ref().map(|s| &s.1),
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}
