//! The HTTP API (axum): the router, shared state, the error type and the JSON body extractor.
//!
//! Every route answers with and without a trailing slash. Errors are JSON `{"message": …}` (plus details such as
//! the SLA problems), also axum's own rejections (a bad path segment or query string, 405, 413): the router's
//! outermost layer is [`oakestra_runtime::server::json_errors`]. A malformed body is a 4xx naming the problem,
//! never a 500.
//!
//! - [`addons`]: the addons API's gate, the routes scheduler plugins call, the marketplace lookup of clusters (the
//!   marketplace and addons manager routes themselves come from `oakestra_addons::api`).
//! - [`auth`]: login, refresh, whoami.
//! - [`apps`]: applications, services, instances, logs.
//! - [`cors`]: which browser origins may call the API; preflights.
//! - [`extract`]: who is calling: the access- and refresh-token extractors, the cluster-secret extractor.
//! - [`clusters`]: the cluster list for users, and the cluster-facing side (registration, reports, results).
//! - [`net`]: the network endpoints clusters use.
//! - [`reference`](mod@reference): the reference's user-facing JSON shapes (`{"$oid": …}` ids, metrics as text), both id forms in.
//! - [`users`]: users and organizations.
//! - [`docs`]: the OpenAPI document and the docs page.

pub mod addons;
pub mod apps;
pub mod auth;
pub mod clusters;
pub mod cors;
pub mod docs;
pub mod extract;
pub mod net;
pub mod reference;
pub mod users;

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRef, FromRequest, Request, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use oakestra_protocol::api::shape::TypeError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::{
    Error,
    auth::Keys,
    engine::Engine,
    hashing::{self, HashError, HashPool},
    store::Store,
    throttle::LoginThrottle,
};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The token-signing key.
    pub keys: Arc<Keys>,
    /// Access-token lifetime.
    pub access_ttl: Duration,
    /// Refresh-token lifetime.
    pub refresh_ttl: Duration,
    /// A hash of a random password, verified against when the user does not exist so that an unknown user name
    /// takes as long as a wrong password.
    pub dummy_hash: Arc<str>,
    /// The orchestrator (scheduling, cluster calls).
    pub engine: Arc<Engine>,
    /// The token clusters register with.
    pub join_token: Arc<str>,
    /// Timeouts and the connection cap of the listener.
    pub http: oakestra_runtime::server::ServerLimits,
    /// The password-hashing pool.
    pub hasher: Arc<HashPool>,
    /// Failed-login limits.
    pub throttle: Arc<LoginThrottle>,
    /// The addons engine (marketplace, manager, monitor, plugin slots).
    pub addons: Arc<oakestra_addons::Addons>,
    /// Browser origins allowed to call the API.
    pub cors: Arc<cors::Origins>,
    /// The bearer token of `GET /metrics`.
    pub metrics_token: Arc<str>,
}

impl FromRef<AppState> for Arc<Keys> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.keys)
    }
}

impl FromRef<AppState> for Arc<crate::store::Generations> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(state.store.generations())
    }
}

/// An error answer: a status and a JSON `{"message": …}` body, optionally with more fields.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable reason.
    pub message: String,
    /// More fields for the body (e.g. `problems`).
    pub details: Map<String, Value>,
    /// A `Retry-After` header (whole seconds, at least 1) for 429 and 503 answers.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            details: Map::new(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.details.insert(key.to_owned(), value);
        self
    }

    /// 403 with the reference's text.
    pub fn not_enough_permissions() -> Self {
        Self::new(StatusCode::FORBIDDEN, "You have not enough permissions!")
    }

    /// 401 for a missing, invalid, expired or wrong-kind token (Oakestra's exact text).
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Missing authentication token")
    }

    /// 401 for a token issued before the user's password or roles changed (or before the user was deleted).
    pub fn token_revoked() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "the token was revoked (the user's password or roles changed, or the user was deleted): log in again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("message".into(), json!(self.message));
        let mut response = (self.status, Json(Value::Object(body))).into_response();
        if let Some(after) = self.retry_after {
            let secs = (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use oakestra_protocol::addr::AddrError;
        match &e {
            Error::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            Error::Conflict { message } => Self::new(StatusCode::CONFLICT, message.clone()),
            Error::BadRequest { message } => Self::new(StatusCode::BAD_REQUEST, message.clone()),
            Error::UnknownUsers { ids } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
                .with("unknown_user_ids", json!(ids)),
            Error::Address(AddrError::Exhausted { .. }) => {
                tracing::error!(error = %e, "address pool exhausted");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Error::Address(_) => Self::new(StatusCode::BAD_REQUEST, e.to_string()),
            _ => {
                tracing::error!(error = %e, "request failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl From<HashError> for ApiError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Saturated { .. } => {
                tracing::warn!(error = %e, "password check refused");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after(hashing::RETRY_AFTER)
            }
            HashError::AddressBusy { .. } => {
                tracing::info!(error = %e, "password check refused");
                Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).retry_after(hashing::RETRY_AFTER)
            }
            HashError::Failed(e) => e.into(),
        }
    }
}

impl From<TypeError> for ApiError {
    /// 422 naming the field, the value and the expected type, also as `field`, `value` and `expected`.
    fn from(e: TypeError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            .with("field", json!(e.field))
            .with("value", e.value.unwrap_or(Value::Null))
            .with("expected", json!(e.expected))
    }
}

/// A cluster's JSON body: type-checked by `check` (see [`oakestra_protocol::api::shape`]), then read by the
/// lenient parser of `T`. A wrong type is a 422 naming the field, the value and the expected type.
pub fn checked<T: DeserializeOwned>(
    body: Value,
    check: fn(&Value) -> Result<(), TypeError>,
) -> Result<T, ApiError> {
    check(&body)?;
    serde_json::from_value(body).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// A JSON body whose rejections (bad syntax, wrong types, wrong content type, too large) become [`ApiError`]s.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Refuse an oversized body from its announced length, before reading (or waiting for) any of it.
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = announced.filter(|&len| len > BODY_LIMIT as u64) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {len} bytes is larger than the limit of {BODY_LIMIT} bytes"),
            ));
        }
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}

/// The router with every route (each also under its trailing-slash form).
pub fn router(state: AppState) -> Router {
    let addons_routes = addons_router(&state);
    let mut router = Router::new();
    let routes = std::iter::once(("/api/health", get(health)))
        .chain(std::iter::once(("/metrics", get(metrics))))
        .chain(auth::routes())
        .chain(addons::routes())
        .chain(apps::routes())
        .chain(clusters::routes())
        .chain(net::routes())
        .chain(users::routes())
        .chain(docs::routes());
    for (path, method) in routes {
        router = router
            .route(path, method.clone())
            .route(&format!("{path}/"), method);
    }
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Outermost: whatever answers an error (a handler, an extractor's rejection, the 405 of a known path)
        // answers JSON.
        .layer(axum::middleware::map_response(oakestra_runtime::server::json_errors))
        .with_state(state.clone())
        .merge(addons_routes)
        // Outermost of all: preflights never reach a route, and every answer (errors, 404s, the addons routes)
        // carries the allow-origin header.
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state.cors), cors::cors))
}

/// The marketplace and addons manager routes alone (also what the reference ports serve).
pub fn addons_router(state: &AppState) -> Router {
    let gate = Arc::new(addons::RootGate {
        keys: Arc::clone(&state.keys),
        generations: Arc::clone(state.store.generations()),
    });
    oakestra_addons::api::router(Arc::clone(&state.addons), gate, None).layer(
        axum::middleware::from_fn_with_state(Arc::clone(&state.cors), cors::cors),
    )
}

/// `GET /metrics`: the Prometheus exposition, for the metrics token only.
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !oakestra_runtime::metrics::endpoint::allowed(&headers, &state.metrics_token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "GET /metrics needs Authorization: Bearer <the token in <data-dir>/metrics.token>",
        ));
    }
    let window = state.engine.liveness_ms();
    let (by_status, clusters) = state.store.instance_counts_and_clusters().await?;
    let now = crate::store::now_ms();
    let active = clusters.iter().filter(|c| c.is_active(now, window)).count();
    let m = state.engine.metrics();
    m.set_instances(&by_status);
    m.set_clusters(active, clusters.len() - active);
    // Root's own slot is always exposed (0 without a plugin), so dashboards and alerts find the series.
    let root_slot = crate::metrics::SlotLabel {
        slot: oakestra_protocol::addons::Slot::RootScheduler.name().into(),
    };
    let _ = m.plugin_delegated.get_or_create(&root_slot);
    let _ = m.plugin_fallbacks.get_or_create(&root_slot);
    if let Some(slots) = state.engine.slots() {
        for (slot, stats) in slots.stats() {
            let label = crate::metrics::SlotLabel {
                slot: slot.name().into(),
            };
            m.plugin_delegated
                .get_or_create(&label)
                .set(i64::try_from(stats.delegated).unwrap_or(i64::MAX));
            m.plugin_fallbacks
                .get_or_create(&label)
                .set(i64::try_from(stats.fallbacks).unwrap_or(i64::MAX));
        }
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            oakestra_runtime::metrics::CONTENT_TYPE,
        )],
        m.render(),
    )
        .into_response())
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}
