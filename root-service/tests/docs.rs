#![allow(clippy::unwrap_used, reason = "tests")]
//! The API description over real TCP on 127.0.0.1:0: the OpenAPI document and the docs page are served, and the
//! document's methods are exactly the ones the router answers.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use oakestra_root_service::Config;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

/// The users and organizations paths the document describes ahead of their routes (being added in parallel):
/// until they are routed, the router answers them with its "not found" fallback.
const PENDING_USERS_PATHS: &[&str] = &[
    "/api/auth/register",
    "/api/permission/{username}",
    "/api/user/{username}",
    "/api/user",
    "/api/users",
    "/api/users/{organization_id}",
    "/api/organization",
    "/api/organization/{id}",
];

/// The methods checked against the router.
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

/// A data directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Self(std::env::temp_dir().join(format!(
            "oakestra-root-docs-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server with its own data directory.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    _dir: TempDir,
}

/// One answer: status, lower-cased head and the body text.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        if self.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.body).unwrap()
        }
    }

    /// Whether this is the router's fallback (no route for the path), not a handler's 404.
    fn is_fallback(&self) -> bool {
        self.status == 404 && self.json()["message"] == "not found"
    }
}

impl Server {
    async fn start() -> Self {
        let dir = TempDir::new();
        let config = Config::new("127.0.0.1:0".parse().unwrap(), &dir.0);
        let state = oakestra_root_service::build_state(&config).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            oakestra_root_service::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    /// One HTTP/1.1 request without credentials over a fresh connection (POST and PUT with an empty JSON body).
    async fn request(&self, method: &str, path: &str) -> Answer {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if matches!(method, "POST" | "PUT" | "PATCH") {
            req.push_str("Content-Type: application/json\r\nContent-Length: 0\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(
            !head.contains("transfer-encoding: chunked"),
            "client cannot read chunked: {head}"
        );
        Answer {
            status: head.split(' ').nth(1).unwrap().parse().unwrap(),
            head,
            body: body.to_owned(),
        }
    }
}

/// The value of a response header in a lower-cased head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

#[tokio::test]
async fn openapi_document_is_served_as_json() {
    let server = Server::start().await;
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
    let server = Server::start().await;
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
    let server = Server::start().await;
    let doc = server.request("GET", "/docs/openapi.json").await.json();
    let paths = doc["paths"].as_object().unwrap();
    let mut checked = 0;
    for (template, item) in paths {
        let pending = PENDING_USERS_PATHS.contains(&template.as_str());
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
            if pending && answer.is_fallback() {
                continue;
            }
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
