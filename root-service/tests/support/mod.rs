//! Shared by the root-service integration tests: a temporary data directory, the real server on 127.0.0.1:0, two
//! HTTP clients (the protocol crate's, and a raw HTTP/1.1 one that also returns the response head), and a fake
//! cluster: a real HTTP server that records every call root makes to it and reports to root like a cluster would.
//!
//! A test file adds its own request helpers (login, tokens) in an `impl Server` block of its own.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the support module"
)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::IntoResponse,
};
use oakestra_root_service::Config;
use oakestra_runtime::client;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

/// The join token the tests configure.
pub const JOIN_TOKEN: &str = "test-join-token-0123456789";

/// A data directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Self(std::env::temp_dir().join(format!(
            "oakestra-root-it-{}-{}-{nanos}",
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

/// The default configuration on 127.0.0.1:0 with `dir` as the data directory.
pub fn plain_config(dir: &Path) -> Config {
    Config::new("127.0.0.1:0".parse().unwrap(), dir)
}

/// The test configuration: a join token, and short liveness/retry periods when `fast`.
pub fn config(dir: &Path, fast: bool) -> Config {
    let mut c = plain_config(dir);
    c.join_token = Some(JOIN_TOKEN.to_owned());
    if fast {
        c.liveness_window = Duration::from_secs(2);
        c.retry_interval = Duration::from_millis(300);
    }
    c
}

/// A running root-service; stopped (gracefully) by [`Server::stop`].
pub struct Server {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The data directory when the server owns it ([`Server::fresh`]): removed after the server stopped.
    _dir: Option<TempDir>,
}

/// One answer read by [`Server::raw`]: the status, the lower-cased head and the body text.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The body parsed as JSON (Null if empty).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.body).unwrap()
        }
    }
}

/// The value of a response header in a lower-cased head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

impl Server {
    /// Starts on `config`'s data directory, listening on 127.0.0.1:0.
    pub async fn start(config: Config) -> Self {
        Self::start_owning(config, None).await
    }

    /// Starts with the default configuration on `dir`.
    pub async fn on(dir: &Path) -> Self {
        Self::start(plain_config(dir)).await
    }

    /// Starts with the default configuration on a temporary data directory of its own.
    pub async fn fresh() -> Self {
        let dir = TempDir::new();
        Self::start_owning(plain_config(&dir.0), Some(dir)).await
    }

    /// Starts on `config`, keeping `dir` (the data directory) until the server is dropped.
    async fn start_owning(config: Config, dir: Option<TempDir>) -> Self {
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

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    /// One HTTP/1.1 request over a fresh connection ([`Server::send`]) with a bearer `token` if given, and a JSON
    /// content type and length when there is a body or the method is POST, PUT or PATCH. Fails the test on a
    /// chunked answer, which this client does not decode.
    pub async fn raw(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = token {
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let raw = String::from_utf8(self.send(&req).await).unwrap();
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

    /// Writes `request` as it is over a fresh connection and returns all the server answers (10 s at most).
    pub async fn send(&self, request: &str) -> Vec<u8> {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        raw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One request; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let r = client::call(method, &self.url(path), token, body, Duration::from_secs(20))
            .await
            .unwrap();
        (r.status, r.body)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }
}

/// Logs `user` in (200 expected) and returns root's whole answer (`token`, `refresh_token`).
pub async fn login_answer(server: &Server, user: &str, password: &str) -> Value {
    let (status, body) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(&json!({"username": user, "password": password})),
        )
        .await;
    assert_eq!(status, 200, "login {user}: {body}");
    body
}

/// Logs `user` in and returns the access token.
pub async fn login(server: &Server, user: &str, password: &str) -> String {
    login_answer(server, user, password).await["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The seed's clientsrvr SLA.
pub fn clientsrvr() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../protocol/tests/fixtures/seed-clientsrvr.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A one-service SLA `name.ns.svc.ns` asking for `memory` MiB.
pub fn one_service_sla(app: &str, memory: u64) -> Value {
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": app,
            "application_namespace": "test",
            "application_desc": "",
            "microservices": [{
                "microserviceID": "",
                "microservice_name": "svc",
                "microservice_namespace": "test",
                "virtualization": "container",
                "cmd": [],
                "memory": memory,
                "vcpus": 1,
                "code": "docker.io/library/nginx:latest"
            }]
        }]
    })
}

/// One call root made to a fake cluster.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub bearer: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct FakeState {
    calls: Mutex<Vec<Call>>,
    deploy_status: AtomicU16,
}

/// A fake cluster: records calls; answers deploys with a configurable status (200 by default), everything else
/// with 200.
pub struct FakeCluster {
    pub name: String,
    pub addr: SocketAddr,
    pub id: String,
    pub token: String,
    state: Arc<FakeState>,
    task: JoinHandle<()>,
}

async fn record(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_deploy = method == Method::POST && uri.path().starts_with("/api/service/");
    state.calls.lock().unwrap().push(Call {
        method,
        path: uri.path().to_owned(),
        bearer,
        body,
    });
    let status = if is_deploy {
        StatusCode::from_u16(state.deploy_status.load(Ordering::SeqCst)).unwrap()
    } else {
        StatusCode::OK
    };
    (status, axum::Json(json!({"status": "ok"})))
}

impl FakeCluster {
    /// Starts the fake and registers it with root under `name`.
    pub async fn start(root: &Server, name: &str) -> Self {
        let state = Arc::new(FakeState {
            calls: Mutex::new(Vec::new()),
            deploy_status: AtomicU16::new(200),
        });
        let app = Router::new().fallback(record).with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let (status, body) = root
            .call(
                Method::POST,
                "/api/cluster/register",
                Some(JOIN_TOKEN),
                Some(&json!({
                    "cluster_name": name,
                    "cluster_location": "48.1,11.6,1000",
                    "manager_port": addr.port(),
                    "network_component_port": addr.port(),
                    "cluster_address": "127.0.0.1",
                })),
            )
            .await;
        assert_eq!(status, 200, "register {name}: {body}");
        Self {
            name: name.to_owned(),
            addr,
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
            state,
            task,
        }
    }

    /// Makes deploy calls answer `status`.
    pub fn answer_deploys_with(&self, status: u16) {
        self.state.deploy_status.store(status, Ordering::SeqCst);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Waits until a call matching `pred` arrived (10 s at most) and returns it.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Call) -> bool) -> Call {
        for _ in 0..200 {
            if let Some(c) = self.calls().into_iter().find(|c| pred(c)) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{}: no call {what}; calls: {:#?}", self.name, self.calls());
    }

    /// Sends a report with one amd64 worker of `vcpus` cores and `memory` MiB available, plus `jobs`.
    pub async fn report(&self, root: &Server, vcpus: u64, memory: u64, jobs: Value) -> (u16, Value) {
        let worker = json!({
            "vcpus": vcpus, "memory": memory, "cpu_percent": 10.0, "memory_percent": 20.0,
            "architecture": "amd64", "virtualization": ["docker"], "vgpus": 0,
        });
        let workers = [worker.as_object().unwrap().clone()];
        let mut body = oakestra_protocol::api::root::aggregate_workers(&workers);
        body.insert("jobs".into(), jobs);
        root.call(
            Method::POST,
            &format!("/api/information/{}", self.id),
            Some(&self.token),
            Some(&Value::Object(body)),
        )
        .await
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Polls `f` until it returns `Some` (10 s at most).
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
