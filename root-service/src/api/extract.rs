//! The extractors that authenticate a request: a user's access or refresh token ([`AccessClaims`],
//! [`RefreshClaims`]) and a registered cluster's secret ([`ClusterAuth`]), plus the answers a refused token gets.
//!
//! The token rules themselves (signature, kind, revocation) are [`crate::auth`]'s; this module only reads the
//! `Authorization` header and turns a refusal into the reference's 401 texts.

use std::sync::Arc;

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderMap, StatusCode, request::Parts},
};
use oakestra_protocol::text::Escaped;

use super::{ApiError, AppState};
use crate::{
    auth::{self, Claims, Keys, TokenError},
    store::{Generations, clusters::ClusterRow},
};

/// The token of an `Authorization: Bearer <token>` header among `headers`, if any.
pub fn bearer_in(headers: &HeaderMap) -> Option<&str> {
    oakestra_runtime::server::bearer(headers)
}

impl From<TokenError> for ApiError {
    /// A missing, invalid, expired or wrong-kind token is Oakestra's "Missing authentication token"; a revoked one
    /// says so.
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Missing | TokenError::Invalid(_) => Self::missing_token(),
            TokenError::Revoked { .. } => Self::token_revoked(),
        }
    }
}

/// A request authenticated with a valid **access** token of the user's current token generation. A missing,
/// invalid or expired token is refused with 401 `{"message":"Missing authentication token"}`, a revoked one (the
/// user's password or roles changed, or the user is gone) with 401 and a message saying so.
#[derive(Debug, Clone)]
pub struct AccessClaims(pub Claims);

impl<S> FromRequestParts<S> for AccessClaims
where
    S: Send + Sync,
    Arc<Keys>: FromRef<S>,
    Arc<Generations>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<Keys>::from_ref(state);
        let generations = Arc::<Generations>::from_ref(state);
        match auth::check_access(&keys, &generations, bearer_in(&parts.headers)) {
            Ok(claims) => Ok(Self(claims)),
            Err(e) => {
                match &e {
                    TokenError::Missing => {}
                    TokenError::Invalid(why) => tracing::debug!(%why, "access token refused"),
                    TokenError::Revoked { user } => {
                        tracing::debug!(user = %Escaped(user), "revoked access token refused");
                    }
                }
                Err(e.into())
            }
        }
    }
}

/// A request carrying a valid **refresh** token (signature, time window, kind). Whether it is still of the user's
/// current token generation is the handler's to check, against the database.
#[derive(Debug, Clone)]
pub struct RefreshClaims(pub Claims);

impl<S> FromRequestParts<S> for RefreshClaims
where
    S: Send + Sync,
    Arc<Keys>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<Keys>::from_ref(state);
        auth::check_refresh(&keys, bearer_in(&parts.headers))
            .map(Self)
            .map_err(|e| {
                if let TokenError::Invalid(why) = &e {
                    tracing::debug!(%why, "refresh token refused");
                }
                e.into()
            })
    }
}

/// A request from a registered cluster: `Authorization: Bearer <its secret>`; anything else is refused with 401.
#[derive(Debug, Clone)]
pub struct ClusterAuth(pub ClusterRow);

impl FromRequestParts<AppState> for ClusterAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers, state).await
    }
}

impl ClusterAuth {
    /// The cluster whose secret `headers` carry, or 401.
    pub async fn from_headers(headers: &HeaderMap, state: &AppState) -> Result<Self, ApiError> {
        let refuse = || ApiError::new(StatusCode::UNAUTHORIZED, "missing or unknown cluster token");
        let token = bearer_in(headers).ok_or_else(refuse)?.to_owned();
        let found = state.store.cluster_by_token(token).await?;
        found.map(ClusterAuth).ok_or_else(refuse)
    }
}
