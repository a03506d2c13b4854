//! Users and organizations: registration by an Admin, permissions, profile and password changes, listings, and
//! organization management with the four roles.

use axum::routing::MethodRouter;

use super::AppState;

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    Vec::new()
}
