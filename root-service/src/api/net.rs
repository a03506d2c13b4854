//! The network endpoints clusters use at root (the reference's root service manager): worker subnets, job
//! resolution by name or by service/instance IP (registering the caller's interest), dropping an interest, and
//! `net_deploy_status`. The caller is identified by its cluster secret, not by its source address (which NAT
//! rewrites: oakestra-net #229/#233).

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{MethodRouter, delete, get, post},
};
use oakestra_protocol::{
    api::{
        federation::{
            NET_DEPLOY_STATUS_PATH, NetDeployStatus, NetJob, SUBNET_PATH, SubnetAllocation,
            unescape_path_segment,
        },
        shape,
    },
    mqtt::net::{InstanceEntry, IpType, ServiceIp},
    text::Escaped,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, JsonBody, checked, extract::ClusterAuth};
use crate::store::{apps::ServiceRow, net::JobLookup};

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        (SUBNET_PATH, get(subnet).delete(release_subnet)),
        ("/api/net/service/{job}/instances", get(job_by_name)),
        ("/api/net/service/ip/{ip}/instances", get(job_by_ip)),
        ("/api/net/interest/{job}", delete(drop_interest)),
        (NET_DEPLOY_STATUS_PATH, post(net_deploy_status)),
    ]
}

/// Query of `GET /api/net/subnet`.
#[derive(Debug, Deserialize)]
struct SubnetQuery {
    /// With it the same worker always gets the same subnet pair.
    worker_id: Option<String>,
}

/// Checks a `worker_id` query value: 1-128 printable ASCII characters.
fn checked_worker(worker: &str) -> Result<(), ApiError> {
    if worker.len() > 128 || !worker.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("worker_id = {worker:?}: must be 1-128 printable ASCII characters"),
        ));
    }
    Ok(())
}

async fn subnet(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Query(query): Query<SubnetQuery>,
) -> Result<Json<SubnetAllocation>, ApiError> {
    let worker = query.worker_id.filter(|w| !w.is_empty());
    if let Some(w) = &worker {
        checked_worker(w)?;
    }
    let (v4, v6) = state.store.worker_subnet(cluster.id.clone(), worker).await?;
    tracing::info!(cluster = %Escaped(&cluster.name), subnet = %v4, subnet_v6 = %v6, "worker subnet handed out");
    Ok(Json(SubnetAllocation {
        subnet_addr: v4,
        subnet_addr_v6: v6,
    }))
}

/// `DELETE /api/net/subnet?worker_id=<id>`: the cluster forgot worker `<id>` (oakestra-rs; the reference never
/// frees a worker subnet), so its subnet pair goes back to the pools. Only the calling cluster's own workers.
async fn release_subnet(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Query(query): Query<SubnetQuery>,
) -> Result<Json<Value>, ApiError> {
    let Some(worker) = query.worker_id.filter(|w| !w.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "worker_id: required (the worker whose subnet is released)".to_owned(),
        ));
    };
    checked_worker(&worker)?;
    let released = state
        .store
        .release_worker_subnets(cluster.id.clone(), worker.clone())
        .await?;
    tracing::info!(cluster = %Escaped(&cluster.name), worker = %Escaped(&worker), released, "worker subnet released");
    Ok(Json(json!({"message": "ok", "released": released})))
}

/// The job as clusters see it: the round-robin addresses and every placed instance with its addresses.
fn net_job(service: &ServiceRow) -> NetJob {
    let rr = ServiceIp {
        ip_type: IpType::RoundRobin,
        address: service.rr_ip.clone().unwrap_or_default(),
        address_v6: service.rr_ip_v6.clone().unwrap_or_default(),
        extra: Map::new(),
    };
    let text = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let instance_list = service
        .instances
        .iter()
        .filter(|i| i.instance_ip.is_some())
        .map(|i| {
            let own = ServiceIp {
                ip_type: IpType::InstanceIp,
                address: i.instance_ip.clone().unwrap_or_default(),
                address_v6: i.instance_ip_v6.clone().unwrap_or_default(),
                extra: Map::new(),
            };
            InstanceEntry {
                instance_number: i.number,
                instance_ip: i.instance_ip.clone(),
                instance_ip_v6: i.instance_ip_v6.clone(),
                namespace_ip: text(&i.net, "namespace_ip"),
                namespace_ip_v6: text(&i.net, "namespace_ip_v6"),
                host_ip: text(&i.net, "host_ip"),
                host_port: i
                    .net
                    .get("host_port")
                    .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))),
                cluster_id: i.cluster_id.clone(),
                worker_id: text(&i.net, "worker_id").or_else(|| text(&i.report, "worker_id")),
                service_ip: vec![rr.clone(), own],
                extra: Map::new(),
            }
        })
        .collect();
    NetJob {
        id: service.id.clone(),
        job_name: service.job_name.clone(),
        service_ip_list: vec![rr],
        instance_list,
        extra: Map::new(),
    }
}

/// Resolves a job, records the cluster's interest and answers with the job.
async fn resolve(
    state: &AppState,
    cluster_id: String,
    lookup: JobLookup,
    what: String,
) -> Result<Json<NetJob>, ApiError> {
    let found = state.store.job_for_cluster(lookup, cluster_id).await?;
    match found {
        Some(service) => Ok(Json(net_job(&service))),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {what}"))),
    }
}

async fn job_by_name(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Path(job): Path<String>,
) -> Result<Json<NetJob>, ApiError> {
    let name = unescape_path_segment(&job);
    resolve(
        &state,
        cluster.id,
        JobLookup::Name(name.clone()),
        format!("named {name:?}"),
    )
    .await
}

async fn job_by_ip(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Path(ip): Path<String>,
) -> Result<Json<NetJob>, ApiError> {
    let text = unescape_path_segment(&ip);
    let addr: IpAddr = text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not an IP address (dots may be written as underscores)"),
        )
    })?;
    resolve(
        &state,
        cluster.id,
        JobLookup::Address(addr),
        format!("with address {addr}"),
    )
    .await
}

async fn drop_interest(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    Path(job): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let name = unescape_path_segment(&job);
    let removed = state
        .store
        .remove_interest(name.clone(), cluster.id.clone())
        .await?;
    if removed {
        Ok(Json(json!({"message": "ok"})))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("cluster {} has no interest in {name:?}", cluster.name),
        ))
    }
}

async fn net_deploy_status(
    State(state): State<AppState>,
    ClusterAuth(cluster): ClusterAuth,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: NetDeployStatus = checked(body, shape::net_deploy_status)?;
    let instances = body
        .instances
        .iter()
        .map(|i| {
            let mut fields = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    fields.insert(k.to_owned(), v);
                }
            };
            put("namespace_ip", i.namespace_ip.clone().map(Value::from));
            put("namespace_ip_v6", i.namespace_ip_v6.clone().map(Value::from));
            put("host_ip", i.host_ip.clone().map(Value::from));
            put("host_port", i.host_port.map(Value::from));
            put("worker_id", i.worker_id.clone().map(Value::from));
            (i.instance_number, fields)
        })
        .collect();
    tracing::debug!(cluster = %Escaped(&cluster.name), job = %Escaped(&body.job_id), "net deploy status");
    Arc::clone(&state.engine)
        .net_deploy_status(&body.job_id, instances)
        .await?;
    Ok(Json(json!({"message": "ok"})))
}
