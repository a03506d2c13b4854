//! Clusters: the list users see (`/api/clusters/`, `/api/clusters/active`, open like the reference's and never
//! showing secrets) and the cluster-facing side: registration with the join token, periodic reports, and
//! scheduling results.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode},
    routing::{MethodRouter, get, post},
};
use oakestra_protocol::api::{
    federation::{
        CLUSTER_REGISTER_PATH, ClusterRegistered, ClusterRegistration, DEPLOY_RESULT_PATH, DeployResult,
    },
    shape,
};
use oakestra_protocol::text::Escaped;
use serde_json::{Value, json};

use super::{ApiError, AppState, JsonBody, checked, extract::ClusterAuth};
use crate::{
    Error,
    store::{clusters::NewCluster, new_id, now_ms},
};

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/api/clusters", get(all_clusters)),
        ("/api/clusters/active", get(active_clusters)),
        (CLUSTER_REGISTER_PATH, post(register)),
        ("/api/information/{cluster_id}", post(report)),
        (DEPLOY_RESULT_PATH, post(result)),
    ]
}

async fn list(state: &AppState, only_active: bool) -> Result<Json<Vec<Value>>, ApiError> {
    let all = state.store.clusters().await?;
    let now = now_ms();
    let window = state.engine.liveness_ms();
    Ok(Json(
        all.iter()
            .map(|c| (c, c.is_active(now, window)))
            .filter(|(_, active)| *active || !only_active)
            .map(|(c, active)| c.to_json(active))
            .collect(),
    ))
}

async fn all_clusters(State(state): State<AppState>) -> Result<Json<Vec<Value>>, ApiError> {
    list(&state, false).await
}

async fn active_clusters(State(state): State<AppState>) -> Result<Json<Vec<Value>>, ApiError> {
    list(&state, true).await
}

/// `POST /api/cluster/register` with `Authorization: Bearer <join token>`: registers the cluster (same name, same
/// id) and hands out a fresh per-cluster secret.
async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<ClusterRegistered>, ApiError> {
    let presented = super::extract::bearer_in(&headers);
    if !presented.is_some_and(|t| oakestra_protocol::bearer::same_secret(t, &state.join_token)) {
        let name = body
            .get("cluster_name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        tracing::warn!(%peer, cluster = %Escaped(name), "cluster registration refused: wrong or missing join token");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong join token (Authorization: Bearer <join token>)",
        ));
    }
    let body: ClusterRegistration = checked(body, shape::cluster_registration)?;
    if !oakestra_protocol::naming::is_valid_name(&body.cluster_name) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "cluster_name = {:?}: must be {}",
                body.cluster_name,
                oakestra_protocol::naming::NAME_RULE
            ),
        ));
    }
    if body.manager_port == 0 || body.network_component_port == 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "manager_port and network_component_port: must be 1-65535",
        ));
    }
    let address = match body
        .cluster_address
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        Some(a) if a.len() <= 253 && !a.contains(['/', ' ', '@']) => a.to_owned(),
        Some(a) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("cluster_address = {a:?}: must be a host name or IP address"),
            ));
        }
        // The peer address, with an IPv4-mapped IPv6 address unwrapped (as the reference does).
        None => peer.ip().to_canonical().to_string(),
    };
    let token = new_id()? + &new_id()?;
    let row = state
        .store
        .register_cluster(NewCluster {
            name: body.cluster_name,
            location: body.cluster_location,
            address,
            manager_port: body.manager_port,
            network_port: body.network_component_port,
            token: token.clone(),
        })
        .await?;
    tracing::info!(cluster = %Escaped(&row.name), id = %row.id, address = %Escaped(&row.address), "cluster registered");
    Ok(Json(ClusterRegistered { id: row.id, token }))
}

/// `POST /api/information/<cluster_id>`: the periodic report; only the cluster itself may send it.
async fn report(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Path(cluster_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    if cluster.id != cluster_id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this token belongs to cluster {}, not {cluster_id}", cluster.id),
        ));
    }
    shape::cluster_report(&body)?;
    let Value::Object(body) = body else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the report must be a JSON object",
        ));
    };
    Arc::clone(&state.engine).report(&cluster, body).await?;
    Ok(Json(json!("ok")))
}

/// `POST /api/result/deploy`: the cluster's scheduling result for one instance root placed on it.
///
/// A `root_scheduler` plugin answers on the same path with the plugin token (`{job_id, candidate_id}`).
async fn result(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    if super::addons::require_plugin(state.addons.slots(), &headers).is_ok() {
        return super::addons::plugin_result(&state, &body);
    }
    let ClusterAuth(cluster) = ClusterAuth::from_headers(&headers, &state).await?;
    let body: DeployResult = checked(body, shape::deploy_result)?;
    match state.engine.result(&cluster, &body).await {
        Ok(()) => Ok(Json(json!("ok"))),
        Err(Error::NotFound { what, id }) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{what} {id:?} not found"),
        )
        .with("status", json!("job_not_found"))),
        Err(e) => Err(e.into()),
    }
}
