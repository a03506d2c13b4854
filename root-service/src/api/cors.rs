//! CORS: which browser origins may call the API (`--cors-origins`, default `*` as the reference). Every preflight
//! (`OPTIONS`, any path) is answered 204 with the allowed methods and headers, and every answer, errors included,
//! carries `Access-Control-Allow-Origin` for an allowed origin: the Oakestra dashboard preflights every call.

use std::sync::Arc;

pub use crate::origins::Origins;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// Methods a browser may use.
const METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Request headers a browser may send.
const HEADERS: &str = "Authorization, Content-Type";
/// Seconds a browser may cache a preflight.
const MAX_AGE: &str = "600";

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
fn allow(origins: &Origins, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
    match origins.allowed(origin.and_then(|o| o.to_str().ok()))? {
        "*" => Some(HeaderValue::from_static("*")),
        _ => origin.cloned(),
    }
}

fn decorate(headers: &mut HeaderMap, origins: &Origins, allowed: Option<HeaderValue>) {
    if let Some(value) = allowed {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    if matches!(origins, Origins::Only(_)) {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// The middleware: answers preflights, adds the allow-origin header to every other answer.
pub async fn cors(State(origins): State<Arc<Origins>>, request: Request, next: Next) -> Response {
    let allowed = allow(&origins, request.headers().get(header::ORIGIN));
    if request.method() == Method::OPTIONS {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(HEADERS),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        h.insert(header::ALLOW, HeaderValue::from_static(METHODS));
        decorate(h, &origins, allowed);
        return response;
    }
    let mut response = next.run(request).await;
    decorate(response.headers_mut(), &origins, allowed);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_echoed() {
        let o = Origins::parse("http://a.example").unwrap();
        assert_eq!(
            allow(&o, Some(&HeaderValue::from_static("http://a.example"))).unwrap(),
            "http://a.example"
        );
        assert!(allow(&o, Some(&HeaderValue::from_static("http://evil.example"))).is_none());
        assert!(allow(&o, None).is_none());
        assert_eq!(allow(&Origins::Any, None).unwrap(), "*");
    }
}
