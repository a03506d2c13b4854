//! CORS: which browser origins may call the API (`--cors-origins`, default `*` as the reference). Every preflight
//! (`OPTIONS`, any path) is answered 204 with the allowed methods and headers, and every answer, errors included,
//! carries `Access-Control-Allow-Origin` for an allowed origin: the Oakestra dashboard preflights every call.

use std::sync::Arc;

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
/// Longest origin accepted in `--cors-origins`.
const MAX_ORIGIN: usize = 253 + 16;

/// The origins allowed to call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin (`*`).
    Any,
    /// Only these (`scheme://host[:port]`, compared exactly, without a trailing slash).
    Only(Vec<String>),
}

impl Origins {
    /// Parses `*` or a comma-separated list of `http(s)://host[:port]`; the error names the bad entry and the rule.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Self::Any);
        }
        let mut list = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let rest = item
                .strip_prefix("http://")
                .or_else(|| item.strip_prefix("https://"));
            let ok = item.len() <= MAX_ORIGIN
                && rest
                    .is_some_and(|r| !r.is_empty() && !r.contains('/') && !r.contains(char::is_whitespace));
            if !ok {
                return Err(format!(
                    "{item:?}: an origin is http(s)://host[:port] without a path (or use * alone)"
                ));
            }
            list.push(item.to_owned());
        }
        if list.is_empty() {
            return Err("give * or at least one origin".into());
        }
        Ok(Self::Only(list))
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            Self::Any => Some(HeaderValue::from_static("*")),
            Self::Only(list) => {
                let origin = origin?;
                let text = origin.to_str().ok()?;
                list.iter().any(|o| o == text).then(|| origin.clone())
            }
        }
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
    let allowed = origins.allow(request.headers().get(header::ORIGIN));
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
    fn origins_parse_with_readable_errors() {
        assert_eq!(Origins::parse("*").unwrap(), Origins::Any);
        assert_eq!(
            Origins::parse("http://a.example:4200, https://b.example").unwrap(),
            Origins::Only(vec!["http://a.example:4200".into(), "https://b.example".into()])
        );
        for bad in [
            "",
            "a.example",
            "http://a.example/path",
            "ftp://x",
            "http://",
            "*,http://a",
        ] {
            let e = Origins::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn only_listed_origins_are_echoed() {
        let o = Origins::parse("http://a.example").unwrap();
        assert_eq!(
            o.allow(Some(&HeaderValue::from_static("http://a.example")))
                .unwrap(),
            "http://a.example"
        );
        assert!(
            o.allow(Some(&HeaderValue::from_static("http://evil.example")))
                .is_none()
        );
        assert!(o.allow(None).is_none());
        assert_eq!(Origins::Any.allow(None).unwrap(), "*");
    }
}
