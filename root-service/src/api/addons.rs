//! Root's side of the addons engine: who may use the addons API (access tokens; admins change things), the routes
//! a `root_scheduler` plugin calls (`GET /api/v1/resources`, answers on `POST /api/result/deploy`, both with the
//! plugin token), and the marketplace lookup clusters make for cluster-scoped installs.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{MethodRouter, get},
};
use oakestra_addons::{
    api::{Caller, Gate},
    slots::{RESOURCES_PATH, Slots},
    store::MarketplaceEntry,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, AppState,
    extract::{ClusterAuth, bearer_in},
};
use crate::{
    auth::{self, Keys, is_admin},
    store::Generations,
};

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        (RESOURCES_PATH, get(resources)),
        (
            "/api/cluster/marketplace/addons/{id}",
            get(marketplace_entry_for_cluster),
        ),
    ]
}

/// The addons API's gate on root: a current access token; the `Admin` role for changes.
#[derive(Debug)]
pub struct RootGate {
    /// The token keys.
    pub keys: Arc<Keys>,
    /// Token generations (revocation).
    pub generations: Arc<Generations>,
}

impl Gate for RootGate {
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, (StatusCode, String)> {
        // The same answers as the access-token extractor's, in the addons API's error shape.
        let claims = auth::check_access(&self.keys, &self.generations, bearer_in(headers)).map_err(|e| {
            let refused = ApiError::from(e);
            (refused.status, refused.message)
        })?;
        Ok(Caller {
            admin: is_admin(&claims),
        })
    }
}

/// Refuses anything but the plugin token.
pub fn require_plugin(slots: &Slots, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer_in(headers) {
        Some(t) if slots.is_plugin_token(t) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or unknown plugin token (scheduler plugins get it as OAK_PLUGIN_TOKEN)",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct ResourceQuery {
    active: Option<String>,
    candidate_name: Option<String>,
}

/// `GET /api/v1/resources/?active=true[&candidate_name=]`: the clusters as candidates, for a scheduler plugin.
async fn resources(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ResourceQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    require_plugin(state.addons.slots(), &headers)?;
    let active_only = match q.active.as_deref() {
        None | Some("false" | "False" | "0") => false,
        Some("true" | "True" | "1") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("active = {other:?}: must be true or false"),
            ));
        }
    };
    Ok(Json(state.engine.resources(active_only, q.candidate_name).await?))
}

/// A plugin's answer on `POST /api/result/deploy`, handed to the placement waiting for it.
pub fn plugin_result(state: &AppState, body: &Value) -> Result<Json<Value>, ApiError> {
    let (job_id, answer) = Slots::parse_result(body).map_err(|rule| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("scheduler result: {rule}"),
        )
    })?;
    let taken = state.addons.slots().deliver(&job_id, answer.clone());
    if taken {
        Ok(Json(json!("ok")))
    } else {
        tracing::info!(job = %oakestra_protocol::text::Escaped(&job_id), answer = ?answer, "late or unknown scheduler plugin result ignored");
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no placement waits for job {job_id:?}"),
        )
        .with("status", json!("job_not_found")))
    }
}

/// `GET /api/cluster/marketplace/addons/<id>` for a cluster installing a cluster-scoped addon.
async fn marketplace_entry_for_cluster(
    State(state): State<AppState>,
    _cluster: ClusterAuth,
    Path(id): Path<String>,
) -> Result<Json<MarketplaceEntry>, ApiError> {
    let entry = state.addons.store().entry(id.clone()).await.map_err(|e| {
        tracing::error!(error = %e, "marketplace lookup failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    entry.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("marketplace addon {id:?} not found"),
        )
    })
}
