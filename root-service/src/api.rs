//! The HTTP API (axum): routes, JSON bodies and errors, shared state.
//!
//! Every route answers with and without a trailing slash. Errors are JSON `{"message": …}`; a malformed body is a
//! 4xx naming the problem, never a 500.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRef, FromRequest, Request, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    Error,
    auth::{self, AccessClaims, Keys, TokenType},
    store::{ROOT_ORG, Store},
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
}

impl FromRef<AppState> for Arc<Keys> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.keys)
    }
}

/// An error answer: a status and a JSON `{"message": …}` body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable reason.
    pub message: String,
}

impl ApiError {
    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 401 for a missing, invalid, expired or wrong-kind token (Oakestra's exact text).
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Missing authentication token")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "message": self.message }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
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

/// Body of `POST /api/auth/login`.
#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Organization name (what Oakestra's code reads); default `root`.
    #[serde(default)]
    pub organization_name: Option<String>,
    /// Organization name as Oakestra's schema spells it.
    #[serde(default)]
    pub organization: Option<String>,
}

/// Answer of a successful login.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    /// Access token.
    pub token: String,
    /// Refresh token.
    pub refresh_token: String,
}

/// Answer of a successful refresh.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefreshResponse {
    /// New access token.
    pub token: String,
}

/// Answer of `GET /api/auth/whoami`.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    /// User name.
    pub username: String,
    /// Roles in the organization.
    pub roles: Vec<String>,
    /// Organization id.
    pub organization: String,
}

/// The router with every route (each also under its trailing-slash form).
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, method) in [
        ("/api/health", get(health)),
        ("/api/auth/login", post(login)),
        ("/api/auth/refresh", post(refresh)),
        ("/api/auth/whoami", get(whoami)),
    ] {
        router = router
            .route(path, method.clone())
            .route(&format!("{path}/"), method);
    }
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn login(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let org_name = body
        .organization_name
        .or(body.organization)
        .unwrap_or_else(|| ROOT_ORG.to_owned());
    let user = state.store.user_by_name(body.username.clone()).await?;
    let hash: Arc<str> = user.as_ref().map_or_else(
        || Arc::clone(&state.dummy_hash),
        |u| u.password_hash.as_str().into(),
    );
    let password = body.password;
    let matches = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .map_err(Error::from)?;
    let user = match user {
        Some(user) if matches => user,
        _ => {
            tracing::info!(username = %body.username, "login refused: invalid username or password");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid username or password",
            ));
        }
    };
    let Some(org) = state.store.organization_by_name(org_name.clone()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("organization {org_name:?} not found"),
        ));
    };
    let Some(roles) = state.store.roles(user.id.clone(), org.id.clone()).await? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "user {:?} is not a member of organization {org_name:?}",
                user.name
            ),
        ));
    };
    let token = state
        .keys
        .issue(TokenType::Access, &user.name, &roles, &org.id, state.access_ttl)?;
    let refresh_token =
        state
            .keys
            .issue(TokenType::Refresh, &user.name, &roles, &org.id, state.refresh_ttl)?;
    tracing::info!(username = %user.name, organization = %org.name, "login");
    Ok(Json(LoginResponse { token, refresh_token }))
}

async fn refresh(State(state): State<AppState>, req: Request) -> Result<Json<RefreshResponse>, ApiError> {
    let (parts, _body) = req.into_parts();
    let token = auth::bearer(&parts).ok_or_else(ApiError::missing_token)?;
    let claims = state.keys.verify(token, TokenType::Refresh).map_err(|why| {
        tracing::debug!(%why, "refresh token refused");
        ApiError::missing_token()
    })?;
    if state.store.user_by_name(claims.sub.clone()).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("user {:?} not found", claims.sub),
        ));
    }
    let token = state.keys.issue(
        TokenType::Access,
        &claims.sub,
        &claims.roles,
        &claims.organization,
        state.access_ttl,
    )?;
    Ok(Json(RefreshResponse { token }))
}

async fn whoami(AccessClaims(claims): AccessClaims) -> Json<WhoAmI> {
    Json(WhoAmI {
        username: claims.sub,
        roles: claims.roles,
        organization: claims.organization,
    })
}
