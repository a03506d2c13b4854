//! The addons HTTP API, on the tier's listener (and optionally on the reference ports): the marketplace
//! (`/api/v1/marketplace/addons`, root only), the addons manager (`/api/v1/addons`) and the slot report
//! (`/api/v1/addons/slots`). Who may call what is the tier's [`Gate`]: reading needs any credential, publishing,
//! installing, changing and removing need an admin. Errors are JSON `{"message": …}`; descriptor problems are a
//! 422 listing every problem with its field path.

use std::{fmt::Debug, future::Future, pin::Pin, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use oakestra_protocol::addons::{AddonStatus, MarketplaceStatus, parse_spec};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{Addons, store::MarketplaceEntry};

/// Largest request body (a descriptor) accepted.
pub const BODY_LIMIT: usize = 256 * 1024;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Whether the caller may publish, install, change and remove.
    pub admin: bool,
}

/// The tier's authentication: a caller, or the refusal (status and message).
pub trait Gate: Send + Sync + Debug + 'static {
    /// Reads the request's credential.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, (StatusCode, String)>;
}

/// A boxed future of a marketplace lookup.
pub type Lookup = Pin<Box<dyn Future<Output = Result<Option<MarketplaceEntry>, String>> + Send>>;

/// Where installs read marketplace entries from when the tier has no marketplace of its own (a cluster asks root).
pub trait RemoteMarketplace: Send + Sync + Debug + 'static {
    /// The entry `id`, `None` if root does not know it.
    fn entry(&self, id: String) -> Lookup;
}

#[derive(Debug, Clone)]
struct ApiState {
    addons: Arc<Addons>,
    gate: Arc<dyn Gate>,
    remote: Option<Arc<dyn RemoteMarketplace>>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    extra: Map<String, Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            extra: Map::new(),
        }
    }

    fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    fn admin_only() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "You have not enough permissions! (this needs the Admin role)",
        )
    }

    fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} {id:?} not found"))
    }

    fn docker_unavailable(reason: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the addons engine needs Docker, which is unavailable: {reason}"),
        )
        .with("reason", Value::String(reason))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("message".into(), Value::String(self.message));
        (self.status, Json(Value::Object(body))).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        tracing::error!(error = %e, "addons request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    state
        .gate
        .caller(headers)
        .map_err(|(status, message)| ApiError::new(status, message))
}

fn admin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    if caller(state, headers)?.admin {
        Ok(())
    } else {
        Err(ApiError::admin_only())
    }
}

/// Parses a JSON body: 415 unless it is declared `application/json`, 400 when it is not JSON.
fn json_body(headers: &HeaderMap, bytes: &Bytes) -> Result<Value, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = declared.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type = {declared:?}: the body must be application/json"),
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))
}

/// A 24-hex-digit id, or a 404 naming it (ids are never anything else, so nothing else can exist).
fn check_id<'a>(what: &str, id: &'a str) -> Result<&'a str, ApiError> {
    if id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(ApiError::not_found(what, id))
    }
}

/// The addons manager's paths (both tiers).
pub const MANAGER_PATHS: [&str; 3] = ["/api/v1/addons", "/api/v1/addons/slots", "/api/v1/addons/{id}"];
/// The marketplace's paths (root).
pub const MARKETPLACE_PATHS: [&str; 2] = ["/api/v1/marketplace/addons", "/api/v1/marketplace/addons/{id}"];

/// The routes of `plane` (the marketplace only where the tier keeps one, i.e. without `remote`), each also with
/// a trailing slash.
pub fn router(
    addons: Arc<Addons>,
    gate: Arc<dyn Gate>,
    remote: Option<Arc<dyn RemoteMarketplace>>,
) -> Router {
    let with_marketplace = remote.is_none();
    let state = ApiState { addons, gate, remote };
    let mut routes = vec![
        ("/api/v1/addons", get(list_addons).post(install)),
        ("/api/v1/addons/slots", get(slots)),
        (
            "/api/v1/addons/{id}",
            get(get_addon).patch(patch_addon).delete(uninstall),
        ),
    ];
    if with_marketplace {
        routes.push(("/api/v1/marketplace/addons", get(list_entries).post(publish)));
        routes.push((
            "/api/v1/marketplace/addons/{id}",
            get(get_entry).delete(delete_entry),
        ));
    }
    let mut router = Router::new();
    for (path, method) in routes {
        router = router
            .route(path, method.clone())
            .route(&format!("{path}/"), method);
    }
    router
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(
            oakestra_runtime::server::json_errors,
        ))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct EntryQuery {
    name: Option<String>,
    status: Option<String>,
}

async fn list_entries(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<EntryQuery>,
) -> Result<Json<Vec<MarketplaceEntry>>, ApiError> {
    let who = caller(&state, &headers)?;
    let status = match q.status.as_deref() {
        None => Some(MarketplaceStatus::Approved),
        Some("all") => None,
        Some(s) => Some(MarketplaceStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("status = {s:?}: must be under_review, approved, verification_failed or all"),
            )
            .with("field", json!("status"))
        })?),
    };
    if status != Some(MarketplaceStatus::Approved) && !who.admin {
        return Err(ApiError::admin_only());
    }
    Ok(Json(state.addons.store().entries(status, q.name).await?))
}

async fn publish(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let value = json_body(&headers, &body)?;
    let spec = parse_spec(&value).map_err(|problems| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the addon descriptor has {} problem(s): {}",
                problems.len(),
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
        .with("problems", json!(problems))
    })?;
    state
        .addons
        .docker()
        .await
        .map_err(ApiError::docker_unavailable)?;
    let name = spec.name.clone();
    let entry = state.addons.store().publish(spec).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("an addon named {name:?} is already in the marketplace"),
        )
        .with("field", json!("name"))
    })?;
    tracing::info!(addon = %entry.id, name = %entry.spec.name, "addon published: verifying its images");
    state.addons.wake();
    Ok((StatusCode::CREATED, Json(entry)).into_response())
}

async fn get_entry(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<MarketplaceEntry>, ApiError> {
    caller(&state, &headers)?;
    let id = check_id("marketplace addon", &id)?;
    let entry = state.addons.store().entry(id.to_owned()).await?;
    entry
        .map(Json)
        .ok_or_else(|| ApiError::not_found("marketplace addon", id))
}

async fn delete_entry(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&state, &headers)?;
    let id = check_id("marketplace addon", &id)?;
    if state.addons.store().delete_entry(id.to_owned()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("marketplace addon", id))
    }
}

#[derive(Debug, Deserialize)]
struct AddonQuery {
    status: Option<String>,
}

fn parse_status(s: &str) -> Result<AddonStatus, ApiError> {
    AddonStatus::parse(s).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "status = {s:?}: must be one of {}",
                AddonStatus::ALL.map(AddonStatus::as_str).join(", ")
            ),
        )
        .with("field", json!("status"))
    })
}

async fn list_addons(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<AddonQuery>,
) -> Result<Json<Vec<crate::store::Addon>>, ApiError> {
    caller(&state, &headers)?;
    let status = q.status.as_deref().map(parse_status).transpose()?;
    Ok(Json(state.addons.store().addons(status).await?))
}

async fn install(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let value = json_body(&headers, &body)?;
    let Some(marketplace_id) = value.get("marketplace_id").and_then(Value::as_str) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "marketplace_id is required: the id of an approved marketplace addon",
        )
        .with("field", json!("marketplace_id")));
    };
    let marketplace_id = check_id("marketplace addon", marketplace_id)?.to_owned();
    let entry = match &state.remote {
        None => state.addons.store().entry(marketplace_id.clone()).await?,
        Some(remote) => remote.entry(marketplace_id.clone()).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("cannot read the marketplace at root: {e}"),
            )
        })?,
    }
    .ok_or_else(|| ApiError::not_found("marketplace addon", &marketplace_id))?;
    if entry.status != MarketplaceStatus::Approved {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "marketplace addon {marketplace_id} is {}, not approved: only approved addons can be installed",
                entry.status.as_str()
            ),
        )
        .with("status", json!(entry.status)));
    }
    state
        .addons
        .docker()
        .await
        .map_err(ApiError::docker_unavailable)?;
    let addon = state
        .addons
        .store()
        .install(marketplace_id.clone(), entry.spec)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("marketplace addon {marketplace_id} is already installed"),
            )
        })?;
    tracing::info!(addon = %addon.id, name = %addon.spec.name, "addon install requested");
    state.addons.wake();
    Ok((StatusCode::CREATED, Json(addon)).into_response())
}

async fn get_addon(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<crate::store::Addon>, ApiError> {
    caller(&state, &headers)?;
    let id = check_id("addon", &id)?;
    let addon = state.addons.store().addon(id.to_owned()).await?;
    addon.map(Json).ok_or_else(|| ApiError::not_found("addon", id))
}

async fn patch_addon(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<crate::store::Addon>, ApiError> {
    admin(&state, &headers)?;
    let id = check_id("addon", &id)?.to_owned();
    let value = json_body(&headers, &body)?;
    let Value::Object(fields) = value else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be an object with status",
        ));
    };
    for k in fields.keys() {
        if k != "status" && k != "status_details" {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{k}: is not a field that can be changed (status, status_details)"),
            )
            .with("field", json!(k)));
        }
    }
    let status = match fields.get("status") {
        Some(Value::String(s)) => parse_status(s)?,
        other => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "status is required and must be a string",
            )
            .with("field", json!("status"))
            .with("value", other.cloned().unwrap_or(Value::Null)));
        }
    };
    let details = match fields.get("status_details") {
        None => None,
        Some(Value::Object(m)) if m.len() <= 64 => Some(m.clone()),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "status_details must be an object of at most 64 fields",
            )
            .with("field", json!("status_details"))
            .with("value", other.clone()));
        }
    };
    // Installing again starts from a clean slate (no restarts counted, no failed services).
    let details = details.or_else(|| (status == AddonStatus::Installing).then(Map::new));
    if !state
        .addons
        .store()
        .set_addon_status(id.clone(), status, details, None)
        .await?
    {
        return Err(ApiError::not_found("addon", &id));
    }
    state.addons.wake();
    let addon = state.addons.store().addon(id.clone()).await?;
    addon.map(Json).ok_or_else(|| ApiError::not_found("addon", &id))
}

async fn uninstall(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let id = check_id("addon", &id)?.to_owned();
    let addon = state
        .addons
        .store()
        .addon(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found("addon", &id))?;
    if addon.status == AddonStatus::Disabled {
        state.addons.store().delete_addon(id).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    state
        .addons
        .store()
        .set_addon_status(id.clone(), AddonStatus::Disabling, None, None)
        .await?;
    state.addons.wake();
    let addon = state.addons.store().addon(id.clone()).await?;
    Ok(Json(addon).into_response())
}

async fn slots(State(state): State<ApiState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    Ok(Json(state.addons.slots().report()))
}
