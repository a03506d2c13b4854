//! The API description: the OpenAPI 3.1 document (`/docs/openapi.json`, written by hand and checked against the
//! router by a test) and a self-contained docs page (`/api/docs`) that renders it without downloading anything.

use axum::{
    http::header,
    response::{Html, IntoResponse},
    routing::{MethodRouter, get},
};

use super::AppState;

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The docs page.
pub const DOCS_PAGE: &str = include_str!("docs.html");

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/docs/openapi.json", get(openapi)),
        ("/api/docs", get(docs_page)),
    ]
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn docs_page() -> Html<&'static str> {
    Html(DOCS_PAGE)
}
