//! `oak-sample-scheduler`: the sample scheduler plugin (the `addon-scheduler` image), speaking the reference
//! scheduler contract. Policy "most free memory, preferred tag first".
//!
//! # Contract
//! - Environment: `API_PORT` (listen port, default 10004), `ORCHESTRATION_PLANE` (`root` or `cluster`, only
//!   logged), `MANAGER_URL` + `MANAGER_PORT` (the tier answers go to; default 127.0.0.1 and 10000 for root, 10100
//!   for cluster), `RESOURCE_ABSTRACTOR_URL` + `RESOURCE_ABSTRACTOR_PORT` (the tier serving the candidates; default
//!   the manager's), `OAK_PLUGIN_TOKEN` (optional: sent as `Authorization: Bearer` on both outgoing calls), `PREFER`
//!   (optional substring of candidate names).
//! - `GET /status` → 200 `ok`.
//! - `POST /api/calculate/deploy` with the job document (`_id` = the job id, e.g. `abc/0`; at most 1 MiB) → 200 at
//!   once, or 400 `{"message"}` when the body is not JSON or has no string `_id`. Then, in the background:
//!   `GET <resources>/api/v1/resources/?active=true` (a JSON array of candidates `{_id, candidate_name, active,
//!   memory, ...}`, `memory` = free MiB) and `POST <manager>/api/result/deploy` with `{job_id, candidate_id}`, or
//!   `{job_id, status: "NO_ACTIVE_CLUSTER_WITH_CAPACITY"}` when no candidate qualifies. When the candidates cannot be
//!   read, nothing is answered: the tier's slot timeout makes it place with its built-in scheduler.
//! - Policy: among active candidates (`active` missing counts as true), those whose `candidate_name` contains
//!   `PREFER` if any does; of these the one with the most free `memory`, ties broken by the lowest name. (The
//!   built-in best fit prefers the least free memory, so a placement shows which one decided.)
//! - SIGTERM or SIGINT: stops listening and exits 0.

use std::{process::ExitCode, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use oakestra_runtime::client;
use serde_json::{Value, json};

/// Largest job document accepted.
const MAX_BODY: usize = 1024 * 1024;
/// Deadline of each outgoing call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer when no candidate qualifies.
const NO_CANDIDATE: &str = "NO_ACTIVE_CLUSTER_WITH_CAPACITY";

/// What the plugin needs from its environment.
#[derive(Debug)]
struct Config {
    port: u16,
    plane: String,
    manager: String,
    resources: String,
    token: Option<String>,
    prefer: Option<String>,
}

/// A candidate as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
struct Candidate {
    id: String,
    name: String,
    active: bool,
    memory: f64,
}

impl Candidate {
    /// Reads one element of the candidates array; `None` without a string `_id`.
    fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            id: v.get("_id")?.as_str()?.to_owned(),
            name: v
                .get("candidate_name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            active: !matches!(v.get("active"), Some(Value::Bool(false))),
            memory: v.get("memory").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }
}

/// The policy: active candidates, restricted to names containing `prefer` when one does; most free memory wins,
/// ties go to the lowest name.
fn choose<'a>(candidates: &'a [Candidate], prefer: Option<&str>) -> Option<&'a Candidate> {
    let active: Vec<&Candidate> = candidates.iter().filter(|c| c.active).collect();
    let preferred: Vec<&Candidate> = match prefer.filter(|p| !p.is_empty()) {
        Some(p) => active.iter().copied().filter(|c| c.name.contains(p)).collect(),
        None => Vec::new(),
    };
    let pool = if preferred.is_empty() { active } else { preferred };
    pool.into_iter()
        .max_by(|a, b| a.memory.total_cmp(&b.memory).then_with(|| b.name.cmp(&a.name)))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn port(name: &str, default: u16) -> Result<u16, String> {
    match env(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a port number")),
    }
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let plane = env("ORCHESTRATION_PLANE").unwrap_or_else(|| "root".to_owned());
        let manager_host = env("MANAGER_URL").unwrap_or_else(|| "127.0.0.1".to_owned());
        let manager_port = port("MANAGER_PORT", if plane == "cluster" { 10100 } else { 10000 })?;
        let resources_host = env("RESOURCE_ABSTRACTOR_URL").unwrap_or_else(|| manager_host.clone());
        let resources_port = port("RESOURCE_ABSTRACTOR_PORT", manager_port)?;
        Ok(Self {
            port: port("API_PORT", 10004)?,
            plane,
            manager: client::base_url(&manager_host, manager_port),
            resources: client::base_url(&resources_host, resources_port),
            token: env("OAK_PLUGIN_TOKEN"),
            prefer: env("PREFER"),
        })
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "message": message }))).into_response()
}

/// `POST /api/calculate/deploy`: validates the job document, answers at once, decides in the background.
async fn calculate(State(config): State<Arc<Config>>, body: Bytes) -> Response {
    let job: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    let Some(job_id) = job.get("_id").and_then(Value::as_str).map(str::to_owned) else {
        return bad_request("the job document has no string _id".to_owned());
    };
    tokio::spawn(schedule(config, job_id.clone()));
    Json(json!({ "message": "scheduling", "job_id": job_id })).into_response()
}

/// Reads the candidates, picks one and tells the manager.
async fn schedule(config: Arc<Config>, job_id: String) {
    let url = format!("{}/api/v1/resources/?active=true", config.resources);
    let token = config.token.as_deref();
    let answer = match client::call::<()>(Method::GET, &url, token, None, CALL_TIMEOUT).await {
        Ok(r) if r.is_success() => r,
        Ok(r) => {
            tracing::warn!(job = ?job_id, status = r.status, body = %r.body, "candidates refused; not answering");
            return;
        }
        Err(e) => {
            tracing::warn!(job = ?job_id, error = %e, "candidates unreachable; not answering");
            return;
        }
    };
    let Some(list) = answer.body.as_array() else {
        tracing::warn!(job = ?job_id, "the candidates are not a JSON array; not answering");
        return;
    };
    let candidates: Vec<Candidate> = list.iter().filter_map(Candidate::from_json).collect();
    let chosen = choose(&candidates, config.prefer.as_deref());
    let result = match chosen {
        Some(c) => {
            tracing::info!(job = ?job_id, candidate = ?c.id, name = ?c.name, memory = c.memory,
                candidates = candidates.len(), prefer = ?config.prefer, "chose a candidate");
            json!({ "job_id": job_id, "candidate_id": c.id })
        }
        None => {
            tracing::info!(job = ?job_id, candidates = candidates.len(), "no active candidate: {NO_CANDIDATE}");
            json!({ "job_id": job_id, "status": NO_CANDIDATE })
        }
    };
    let url = format!("{}/api/result/deploy", config.manager);
    match client::call(Method::POST, &url, token, Some(&result), CALL_TIMEOUT).await {
        Ok(r) if r.is_success() => tracing::debug!(job = ?job_id, "result delivered"),
        Ok(r) => {
            tracing::warn!(job = ?job_id, status = r.status, body = %r.body, "the manager refused the result")
        }
        Err(e) => tracing::warn!(job = ?job_id, error = %e, "cannot deliver the result"),
    }
}

async fn serve(config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await?;
    tracing::info!(plane = %config.plane, listen = %listener.local_addr()?, manager = %config.manager,
        resources = %config.resources, prefer = ?config.prefer, token = config.token.is_some(),
        "sample scheduler plugin ready (most free memory, preferred tag first)");
    let app = Router::new()
        .route("/status", get(|| async { "ok" }))
        .route("/api/calculate/deploy", post(calculate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(config));
    axum::serve(listener, app)
        .with_graceful_shutdown(oakestra_runtime::signal::shutdown_signal())
        .await
}

fn main() -> ExitCode {
    oakestra_runtime::logging::init("info", None);
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return ExitCode::from(oakestra_runtime::signal::EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("serving failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, name: &str, active: bool, memory: f64) -> Candidate {
        Candidate {
            id: id.into(),
            name: name.into(),
            active,
            memory,
        }
    }

    #[test]
    fn most_free_memory_wins_and_ties_go_to_the_lowest_name() {
        let list = [
            c("1", "b", true, 100.0),
            c("2", "a", true, 4096.0),
            c("3", "c", false, 9999.0),
        ];
        assert_eq!(choose(&list, None).map(|c| c.id.as_str()), Some("2"));
        let tie = [c("1", "zeta", true, 512.0), c("2", "alpha", true, 512.0)];
        assert_eq!(choose(&tie, None).map(|c| c.id.as_str()), Some("2"));
        assert_eq!(choose(&[c("1", "x", false, 1.0)], None), None);
        assert_eq!(choose(&[], Some("edge")), None);
    }

    #[test]
    fn the_preferred_tag_narrows_the_pool_only_when_it_matches() {
        let list = [
            c("1", "edge-small", true, 100.0),
            c("2", "cloud", true, 4096.0),
            c("3", "edge-off", false, 5000.0),
        ];
        assert_eq!(choose(&list, Some("edge")).map(|c| c.id.as_str()), Some("1"));
        assert_eq!(choose(&list, Some("fog")).map(|c| c.id.as_str()), Some("2"));
        assert_eq!(choose(&list, Some("")).map(|c| c.id.as_str()), Some("2"));
    }

    #[test]
    fn candidates_are_read_leniently() {
        let v = json!([{"_id": "a", "candidate_name": "n", "memory": 7}, {"candidate_name": "no id"},
                       {"_id": "b", "active": false, "memory": "lots"}]);
        let list: Vec<Candidate> = v
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Candidate::from_json)
            .collect();
        assert_eq!(list, vec![c("a", "n", true, 7.0), c("b", "", false, 0.0)]);
    }
}
