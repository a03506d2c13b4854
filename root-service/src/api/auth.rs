//! Login, token refresh and whoami.
//!
//! A login passes the failed-login limits ([`crate::throttle`], keyed by the TCP peer address, never a header)
//! before its password is checked on the hashing pool ([`crate::hashing`]); only failures are counted.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json,
    extract::{ConnectInfo, State},
    http::StatusCode,
    routing::{MethodRouter, get, post},
};
use oakestra_protocol::text::Escaped;
use serde::{Deserialize, Serialize};

use super::{
    ApiError, AppState, JsonBody,
    extract::{AccessClaims, RefreshClaims},
};
use crate::{api::users::MAX_PASSWORD_LEN, auth::TokenType, store::ROOT_ORG};

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/api/auth/login", post(login)),
        ("/api/auth/refresh", post(refresh)),
        ("/api/auth/whoami", get(whoami)),
    ]
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

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let org_name = body
        .organization_name
        .or(body.organization)
        .unwrap_or_else(|| ROOT_ORG.to_owned());
    if let Err(refusal) = state.throttle.check(&body.username, peer.ip()) {
        tracing::debug!(
            username = %Escaped(&body.username),
            %peer,
            reason = %Escaped(&refusal.to_string()),
            "login refused by a failed-login limit"
        );
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, refusal.to_string())
            .retry_after(refusal.retry_after));
    }
    let user = state.store.user_by_name(body.username.clone()).await?;
    let hash: Arc<str> = user.as_ref().map_or_else(
        || Arc::clone(&state.dummy_hash),
        |u| u.password_hash.as_str().into(),
    );
    // No stored password is longer than the limit: a longer one is wrong without hashing it.
    let matches = body.password.len() <= MAX_PASSWORD_LEN
        && state.hasher.verify(Some(peer.ip()), body.password, hash).await?;
    let user = match user {
        Some(user) if matches => {
            state.throttle.succeeded(&user.name, peer.ip());
            user
        }
        _ => {
            state.throttle.failed(&body.username, peer.ip());
            tracing::info!(username = %Escaped(&body.username), "login refused: invalid username or password");
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
    let issue = |kind, ttl| {
        state
            .keys
            .issue(kind, &user.name, user.token_gen, &roles, &org.id, ttl)
    };
    let token = issue(TokenType::Access, state.access_ttl)?;
    let refresh_token = issue(TokenType::Refresh, state.refresh_ttl)?;
    tracing::info!(username = %Escaped(&user.name), organization = %Escaped(&org.name), "login");
    Ok(Json(LoginResponse { token, refresh_token }))
}

async fn refresh(
    State(state): State<AppState>,
    RefreshClaims(claims): RefreshClaims,
) -> Result<Json<RefreshResponse>, ApiError> {
    let Some(user) = state.store.user_by_name(claims.sub.clone()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("user {:?} not found", claims.sub),
        ));
    };
    // The database, not the in-memory copy: a refresh token lives for weeks and is checked rarely.
    if claims.generation != Some(user.token_gen) {
        tracing::info!(user = %Escaped(&claims.sub), "revoked refresh token refused");
        return Err(ApiError::token_revoked());
    }
    let token = state.keys.issue(
        TokenType::Access,
        &claims.sub,
        user.token_gen,
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
