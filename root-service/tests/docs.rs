#![allow(clippy::unwrap_used, reason = "tests")]
//! The API description over real TCP on 127.0.0.1:0: the OpenAPI document and the docs page are served, and the
//! document's methods are exactly the ones the router answers.

mod support;

use support::{Answer, Server, header};

/// The methods checked against the router.
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

impl Server {
    /// One HTTP/1.1 request without credentials over a fresh connection (POST, PUT and PATCH with an empty JSON
    /// body).
    async fn request(&self, method: &str, path: &str) -> Answer {
        self.raw(method, path, None, None).await
    }
}

impl Answer {
    /// Whether this is the router's fallback (no route for the path), not a handler's 404.
    fn is_fallback(&self) -> bool {
        self.status == 404 && self.json()["message"] == "not found"
    }
}

#[tokio::test]
async fn openapi_document_is_served_as_json() {
    let server = Server::fresh().await;
    let answer = server.request("GET", "/docs/openapi.json").await;
    assert_eq!(answer.status, 200);
    let content_type = header(&answer.head, "content-type").unwrap();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let doc = answer.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc["paths"]["/api/application"]["post"].is_object());
    let slash = server.request("GET", "/docs/openapi.json/").await;
    assert_eq!(slash.status, 200);
    assert_eq!(slash.body, answer.body);
    server.stop().await;
}

#[tokio::test]
async fn docs_page_is_served_as_html() {
    let server = Server::fresh().await;
    for path in ["/api/docs", "/api/docs/"] {
        let answer = server.request("GET", path).await;
        assert_eq!(answer.status, 200, "{path}");
        let content_type = header(&answer.head, "content-type").unwrap();
        assert!(content_type.starts_with("text/html"), "{path}: {content_type}");
        assert!(answer.body.contains("/docs/openapi.json"));
    }
    server.stop().await;
}

/// Every operation of the document is answered by a handler (not 405, not the fallback), and every other method
/// on a described path is 405: the document lists exactly the methods the router serves.
#[tokio::test]
async fn documented_methods_are_the_served_methods() {
    let server = Server::fresh().await;
    let doc = server.request("GET", "/docs/openapi.json").await.json();
    let paths = doc["paths"].as_object().unwrap();
    let mut checked = 0;
    for (template, item) in paths {
        let path = template
            .split('/')
            .map(|seg| match seg {
                "{n}" => "0",
                s if s.starts_with('{') => "x",
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in METHODS {
            let documented = item.get(method.to_ascii_lowercase()).is_some();
            let answer = server.request(method, &path).await;
            let what = format!("{method} {path}: {} {}", answer.status, answer.body);
            if documented {
                assert!(
                    answer.status != 405 && !answer.is_fallback(),
                    "documented but not served: {what}"
                );
                checked += 1;
            } else {
                assert_eq!(answer.status, 405, "served but not documented: {what}");
            }
        }
    }
    assert!(checked >= 30, "only {checked} operations checked");
    server.stop().await;
}
