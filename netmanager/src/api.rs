//! The local HTTP API the NodeEngine calls (unix socket `/etc/netmanager/netmanager.sock`, optionally also
//! 127.0.0.1:<port>): the reference's paths and bodies, JSON errors that name the field, value and rule, and
//! `GET /status` for `NetManager status`.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use oakestra_protocol::api::netmanager::{
    PATH_CONTAINER_DEPLOY, PATH_CONTAINER_UNDEPLOY, PATH_DOCKER_UNDEPLOY, PATH_REGISTER,
    PATH_UNIKERNEL_DEPLOY, PATH_UNIKERNEL_UNDEPLOY,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::daemon::{ApiError, Daemon};

/// `GET`: the daemon's state as JSON.
pub use oakestra_protocol::api::netmanager::PATH_STATUS;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

fn reply(result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_server_error() {
                tracing::warn!(error = %e, "API call failed");
            }
            (status, axum::Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

async fn register(State(d): State<Arc<Daemon>>, body: Bytes) -> Response {
    let r = async {
        d.register(parse(&body)?).await?;
        Ok(json!({}))
    };
    reply(r.await)
}

async fn deploy(d: Arc<Daemon>, body: Bytes, unikernel: bool) -> Response {
    let r = async {
        let resp = d.deploy(parse(&body)?, unikernel).await?;
        serde_json::to_value(resp).map_err(|e| ApiError::Internal(e.to_string()))
    };
    reply(r.await)
}

async fn undeploy(State(d): State<Arc<Daemon>>, body: Bytes) -> Response {
    let r = async {
        d.undeploy(parse(&body)?).await?;
        Ok(json!({}))
    };
    reply(r.await)
}

/// The API's routes.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(PATH_REGISTER, post(register))
        .route(
            PATH_CONTAINER_DEPLOY,
            post(|State(d): State<Arc<Daemon>>, body: Bytes| deploy(d, body, false)),
        )
        .route(
            PATH_UNIKERNEL_DEPLOY,
            post(|State(d): State<Arc<Daemon>>, body: Bytes| deploy(d, body, true)),
        )
        .route(PATH_CONTAINER_UNDEPLOY, post(undeploy))
        .route(PATH_DOCKER_UNDEPLOY, post(undeploy))
        .route(PATH_UNIKERNEL_UNDEPLOY, post(undeploy))
        .route(
            PATH_STATUS,
            get(|State(d): State<Arc<Daemon>>| async move { axum::Json(d.status().await) }),
        )
        .with_state(daemon)
}
