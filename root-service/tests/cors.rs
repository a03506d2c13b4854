//! CORS as the Oakestra dashboard needs it, against a real root-service on 127.0.0.1: every preflight is a 204 with
//! the allowed methods and headers (any path, never 405), and every answer (errors and the addons routes included)
//! carries `Access-Control-Allow-Origin`; with `--cors-origins` set, only the listed origins are echoed.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use oakestra_root_service::api::cors::Origins;
use support::{Server, TempDir, header};

/// Sends `method path` with an `Origin` header (and a bearer token if given); returns the status and the lower-cased
/// head.
async fn with_origin(server: &Server, method: &str, path: &str, origin: &str, extra: &str) -> (u16, String) {
    let raw = server
        .send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nOrigin: {origin}\r\n{extra}Content-Length: 0\r\n\r\n"
        ))
        .await;
    let text = String::from_utf8(raw).unwrap();
    let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), head)
}

#[tokio::test]
async fn any_origin_by_default_on_every_answer() {
    let server = Server::fresh().await;
    let dash = "http://localhost:4200";
    let preflight = "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization,content-type\r\n";
    for path in [
        "/api/applications/",
        "/api/application/",
        "/api/auth/login",
        "/api/v1/addons",
        "/no/such/path",
    ] {
        let (status, head) = with_origin(&server, "OPTIONS", path, dash, preflight).await;
        assert_eq!(status, 204, "{path}: {head}");
        assert_eq!(header(&head, "access-control-allow-origin"), Some("*"), "{path}");
        let methods = header(&head, "access-control-allow-methods").unwrap();
        for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            assert!(methods.contains(&m.to_ascii_lowercase()), "{path}: {methods}");
        }
        let headers = header(&head, "access-control-allow-headers").unwrap();
        assert!(
            headers.contains("authorization") && headers.contains("content-type"),
            "{headers}"
        );
    }
    // Answers of every kind carry the header: success, 401, 404, 405 and the addons routes.
    for (method, path, want) in [
        ("GET", "/api/health", 200),
        ("GET", "/api/applications", 401),
        ("GET", "/no/such/path", 404),
        ("PUT", "/api/health", 405),
        ("GET", "/api/v1/addons", 401),
        ("GET", "/api/v1/marketplace/addons", 401),
    ] {
        let (status, head) = with_origin(&server, method, path, dash, "").await;
        assert_eq!(status, want, "{method} {path}: {head}");
        assert_eq!(
            header(&head, "access-control-allow-origin"),
            Some("*"),
            "{method} {path}: {head}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn listed_origins_are_echoed_and_others_are_not() {
    let dir = TempDir::new();
    let mut config = support::config(&dir.0, false);
    config.cors = Origins::parse("http://dash.example:8080").unwrap();
    let server = Server::start(config).await;
    let (status, head) = with_origin(&server, "GET", "/api/health", "http://dash.example:8080", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        Some("http://dash.example:8080")
    );
    assert!(
        header(&head, "vary").is_some_and(|v| v.contains("origin")),
        "{head}"
    );
    let (status, head) = with_origin(&server, "GET", "/api/health", "http://evil.example", "").await;
    assert_eq!(status, 200);
    assert!(header(&head, "access-control-allow-origin").is_none(), "{head}");
    let (status, head) = with_origin(&server, "OPTIONS", "/api/health", "http://evil.example", "").await;
    assert_eq!(
        status, 204,
        "a preflight is still answered, without the allow-origin header"
    );
    assert!(header(&head, "access-control-allow-origin").is_none(), "{head}");
    server.stop().await;
}
