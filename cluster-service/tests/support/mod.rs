//! Shared by the cluster-service integration tests: a temporary data directory, a fake root (a real HTTP server that
//! records every call the cluster makes and answers like root), the real cluster-service started in process, and
//! scripted fake workers: a plain HTTP client for registration and a plain MQTT client for everything else.
//!
//! Everything listens on 127.0.0.1 only.

#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "each test file uses a different part of the support module; a panic is the clearest failure"
)]

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::IntoResponse,
};
use oakestra_cluster_service::{Cli, Config, Running};
use oakestra_protocol::{
    api::cluster::NodeRegistered,
    mqtt::{
        topics::{Topic, TopicId},
        worker::ConnectionLost,
    },
};
use oakestra_runtime::client;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

/// The secret the fake root gives the cluster.
pub const CLUSTER_SECRET: &str = "fake-root-cluster-secret";
/// The cluster id the fake root gives.
pub const CLUSTER_ID: &str = "c0ffee000000000000000001";

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "oakestra-cluster-it-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // Mosquitto started as root drops to user `mosquitto`, which must traverse this directory.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 25 ms for up to `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// === Mosquitto ==================================================================================================

/// A Mosquitto child process, killed on drop.
pub struct Mosquitto {
    child: Child,
    log: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("the mosquitto binary is missing: `apt-get install mosquitto` (the external-broker tests need it)")
        })
}

impl Mosquitto {
    /// Starts Mosquitto in the foreground on 127.0.0.1:`port` over the files in `dir`, and waits until it listens.
    ///
    /// Started as root, Mosquitto drops privileges to user `mosquitto` before it reads the password and ACL files
    /// and writes its pid file. This test keeps that (rather than `user root`) because it is how the packaged
    /// broker runs: the module gives the files to mosquitto's group, the temp dir is world-traversable, and the pid
    /// file lives in a world-writable `run/` subdirectory (Mosquitto writes it after dropping privileges).
    pub async fn start(dir: &Path, port: u16) -> Self {
        let binary = mosquitto_binary();
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 password_file {dir}/passwd\n\
                 acl_file {dir}/acl\n\
                 use_username_as_clientid true\n\
                 pid_file {dir}/run/mosquitto.pid\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type all\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let log = dir.join("mosquitto.log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let mut mosquitto = Self { child, log };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = mosquitto.child.try_wait().unwrap() {
                panic!("mosquitto exited with {status}:\n{}", mosquitto.log_text());
            }
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
            if listening && run.join("mosquitto.pid").is_file() {
                return mosquitto;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto not listening on {port}:\n{}",
                mosquitto.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// === Fake root ==================================================================================================

/// One call the cluster made to root.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub bearer: Option<String>,
    pub body: Value,
}

/// What the fake root answers and records.
#[derive(Debug, Default)]
pub struct RootBook {
    pub calls: Vec<Call>,
    /// Job documents root answers for `/api/net/service/<name>/instances` (by job name).
    pub net_jobs: Vec<Value>,
    /// Marketplace entries root answers for `/api/cluster/marketplace/addons/<id>`.
    pub marketplace: Vec<Value>,
}

/// A fake root on 127.0.0.1:0.
pub struct FakeRoot {
    pub url: String,
    pub book: Arc<Mutex<RootBook>>,
    task: JoinHandle<()>,
}

impl FakeRoot {
    pub async fn start() -> Self {
        let book = Arc::new(Mutex::new(RootBook::default()));
        let app = Router::new().fallback(fake_root).with_state(Arc::clone(&book));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, book, task }
    }

    /// Every recorded call whose path starts with `prefix`.
    pub fn calls(&self, prefix: &str) -> Vec<Call> {
        self.book
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The latest cluster report body.
    pub fn last_report(&self) -> Option<Value> {
        self.calls("/api/information/").last().map(|c| c.body.clone())
    }

    /// The status of instance `n` of job `job_id` in the latest report.
    pub fn reported_status(&self, job_id: &str, n: i64) -> Option<String> {
        let report = self.last_report()?;
        let job = report["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["_id"] == json!(job_id))?;
        let i = job["instance_list"]
            .as_array()?
            .iter()
            .find(|i| i["instance_number"] == json!(n))?;
        i["status"].as_str().map(str::to_owned)
    }

    pub fn add_net_job(&self, job: Value) {
        self.book.lock().unwrap().net_jobs.push(job);
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_root(
    State(book): State<Arc<Mutex<RootBook>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    bytes: Bytes,
) -> impl IntoResponse {
    let path = uri.path().to_owned();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut book = book.lock().unwrap();
    book.calls.push(Call {
        method: method.clone(),
        path: format!(
            "{}{}",
            path,
            uri.query().map(|q| format!("?{q}")).unwrap_or_default()
        ),
        bearer: bearer.clone(),
        body,
    });
    if path == "/api/cluster/register" {
        return (
            StatusCode::OK,
            Json(json!({"id": CLUSTER_ID, "token": CLUSTER_SECRET})),
        );
    }
    if bearer.as_deref() != Some(CLUSTER_SECRET) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"message": "wrong secret"})));
    }
    if path == "/api/net/subnet" {
        return (
            StatusCode::OK,
            Json(json!({"subnet_addr": "10.18.0.64", "subnet_addr_v6": "fc00::100"})),
        );
    }
    if let Some(id) = path.strip_prefix("/api/cluster/marketplace/addons/") {
        return match book.marketplace.iter().find(|e| e["_id"] == json!(id)) {
            Some(e) => (StatusCode::OK, Json(e.clone())),
            None => (StatusCode::NOT_FOUND, Json(json!({"message": "no such addon"}))),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/net/service/") {
        let key = rest.trim_end_matches("/instances").replace('_', ".");
        let key = key.strip_prefix("ip/").unwrap_or(&key).to_owned();
        let found = book.net_jobs.iter().find(|j| {
            j["job_name"] == json!(key)
                || j["service_ip_list"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|s| s["Address"] == json!(key)))
        });
        return match found {
            Some(j) => (StatusCode::OK, Json(j.clone())),
            None => (StatusCode::NOT_FOUND, Json(json!({"message": "no such job"}))),
        };
    }
    (StatusCode::OK, Json(json!({"message": "ok"})))
}

// === The cluster ================================================================================================

/// Flags for a fast test cluster: 1 s worker timeout, 2 s deploy deadline, 0.3 s reports.
pub fn fast_args(root_url: &str, data_dir: &Path) -> Vec<String> {
    [
        "cluster-service",
        "--cluster-name",
        "testcluster",
        "--join-token",
        "test-join-token",
        "--root-url",
        root_url,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--report-interval",
        "0.3",
        "--worker-timeout",
        "1",
        "--deploy-deadline",
        "2",
        "--stale-after",
        "2",
        "--crash-backoff",
        "0.2",
        "--crash-backoff-cap",
        "1",
        "--purge-unconnected-after",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Sets the value of `flag` (one of [`fast_args`]) in `args`.
pub fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let at = args.iter().position(|a| a == flag).unwrap();
    args[at + 1] = value.to_owned();
}

/// Which broker a test runs against.
pub enum BrokerKind {
    Embedded,
    /// A Mosquitto child over `dir` (its config, password and ACL files, `run/mosquitto.pid`) on `port`.
    Mosquitto {
        port: u16,
        dir: TempDir,
        process: Mosquitto,
    },
}

impl BrokerKind {
    /// A fresh Mosquitto on a free port, started over empty password and ACL files that the cluster then fills.
    pub async fn mosquitto() -> Self {
        let dir = TempDir::new();
        let port = free_port();
        for f in ["passwd", "acl"] {
            let path = dir.0.join(f);
            std::fs::write(&path, "").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let process = Mosquitto::start(&dir.0, port).await;
        Self::Mosquitto { port, dir, process }
    }
}

/// Starts the real cluster-service in process with `args` plus the broker flags for `broker`.
pub async fn start_cluster(mut args: Vec<String>, broker: &BrokerKind) -> Running {
    match broker {
        BrokerKind::Embedded => {
            args.push("--mqtt-listen".into());
            args.push(format!("127.0.0.1:{}", free_port()));
        }
        BrokerKind::Mosquitto { port, dir, .. } => {
            let dir = &dir.0;
            for a in [
                "--mqtt-url".to_owned(),
                format!("mqtt://127.0.0.1:{port}"),
                "--mqtt-password-file".to_owned(),
                dir.join("passwd").to_str().unwrap().to_owned(),
                "--mqtt-acl-file".to_owned(),
                dir.join("acl").to_str().unwrap().to_owned(),
                "--mqtt-reload-command".to_owned(),
                format!(
                    "kill -HUP \"$(cat '{}')\"",
                    dir.join("run/mosquitto.pid").display()
                ),
            ] {
                args.push(a);
            }
        }
    }
    let cli = <Cli as clap::Parser>::try_parse_from(args).unwrap();
    let config = Config::from_cli(cli).unwrap();
    let running = oakestra_cluster_service::start(config).await.unwrap();
    let engine = Arc::clone(&running.engine);
    eventually(10, "the cluster's MQTT client to subscribe", || {
        let up = *engine.mqtt_up.borrow();
        async move { up.then_some(()) }
    })
    .await;
    eventually(10, "the cluster to register with root", || {
        let id = engine.identity();
        async move { id.map(|_| ()) }
    })
    .await;
    running
}

/// Calls the cluster's HTTP API.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> client::Response {
    client::call(
        method,
        &format!("http://{addr}{path}"),
        bearer,
        body,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

/// A job document like root sends for instance `n`.
pub fn job_doc(job_id: &str, name: &str, extra: Value) -> Value {
    let mut doc = json!({
        "_id": job_id, "job_name": name, "image": "docker.io/library/nginx:latest", "virtualization": "container",
        "vcpus": 1, "memory": 100, "port": "80", "instance_list": [{"instance_number": 0, "cluster_id": CLUSTER_ID}]
    });
    if let (Value::Object(d), Value::Object(e)) = (&mut doc, extra) {
        d.extend(e);
    }
    doc
}

/// Root's deploy call for instance `n` of `job_id`.
pub async fn deploy(cluster: &Running, job_id: &str, n: i64, doc: &Value) -> client::Response {
    call(
        cluster.addr,
        Method::POST,
        &format!("/api/service/{job_id}/{n}"),
        Some(CLUSTER_SECRET),
        Some(doc),
    )
    .await
}

// === Fake worker ================================================================================================

/// A scripted worker: registered over HTTP, talking MQTT as `<id>-ne`, publishing `information` every 200 ms
/// while alive.
pub struct FakeWorker {
    pub id: String,
    pub password: String,
    pub client: AsyncClient,
    pub inbox: mpsc::UnboundedReceiver<(String, Value)>,
    loops: Vec<JoinHandle<()>>,
}

/// The registration body of a worker named `host`.
pub fn node_body(host: &str, vcpus: i64, memory: i64) -> Value {
    json!({
        "id": "", "host": host, "ip": "192.0.2.10", "port": "3000",
        "system_info": {"kernel_version": "6.18", "architecture": "x86_64", "os_version": "Debian 12", "uptime": "1", "full_stats": ""},
        "cpu_percent": 3.5, "vcpus": vcpus, "architecture": "amd64", "memory_percent": 20.0, "memory": memory,
        "disk_info": {"/": "40"}, "network_info": {}, "gpu_driver": "", "gpu_usage": 0, "vgpus": 0, "gpu_temp": 0,
        "vram_percent": 0, "vram": 0, "virtualization": ["docker"], "supported_addons": [], "csi_drivers": [],
        "Overlay": false, "OverlaySocket": "", "LogDirectory": "/tmp", "NetManagerPort": 0, "ClusterAddress": "127.0.0.1"
    })
}

impl FakeWorker {
    /// Registers `host` with the cluster and connects to its broker.
    pub async fn join(cluster: &Running, host: &str, vcpus: i64, memory: i64) -> Self {
        Self::join_as(cluster, host, vcpus, memory, false).await
    }

    /// [`Self::join`] leaving `nodes/<id>/lost` as the connection's last will, as the NodeEngine does.
    pub async fn join_with_will(cluster: &Running, host: &str, vcpus: i64, memory: i64) -> Self {
        Self::join_as(cluster, host, vcpus, memory, true).await
    }

    async fn join_as(cluster: &Running, host: &str, vcpus: i64, memory: i64, will: bool) -> Self {
        let r = call(
            cluster.addr,
            Method::POST,
            "/api/node/register",
            Some(&cluster.engine.admission.join_token),
            Some(&node_body(host, vcpus, memory)),
        )
        .await;
        assert_eq!(r.status, 200, "registration of {host}: {}", r.body);
        let answer: NodeRegistered = serde_json::from_value(r.body).unwrap();
        let port = answer.mqtt_broker_port_u16().unwrap();
        let password = answer.mqtt_password.clone().unwrap();
        Self::connect_with(
            &answer.id,
            &format!("{}-ne", answer.id),
            &password,
            port,
            will,
            memory,
        )
        .await
    }

    /// Connects as MQTT user (and client id) `user` and subscribes to the node's control topics and the job
    /// broadcasts.
    pub async fn connect(id: &str, user: &str, password: &str, port: u16) -> Self {
        Self::connect_with(id, user, password, port, false, 4000).await
    }

    async fn connect_with(id: &str, user: &str, password: &str, port: u16, will: bool, memory: i64) -> Self {
        let mut options = MqttOptions::new(user, "127.0.0.1", port);
        options
            .set_credentials(user, password)
            .set_keep_alive(Duration::from_secs(5));
        if will {
            let topic = Topic::Lost(TopicId::new(id).unwrap()).to_string();
            let body = serde_json::to_vec(&ConnectionLost::will()).unwrap();
            options.set_last_will(LastWill::new(topic, body, QoS::AtLeastOnce, false));
        }
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, inbox) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
        let pump = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let _ = tx.send((p.topic.clone(), v));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client
            .subscribe(format!("nodes/{id}/control/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe(format!("nodes/{id}/net/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        // Job update notices are read by name (the broker's ACLs refuse wildcards there), for the test jobs.
        client
            .subscribe_many(["app.ns.svc.ns", "net.ns.svc.ns"].map(|job| {
                rumqttc::SubscribeFilter::new(format!("jobs/{job}/updates_available"), QoS::AtLeastOnce)
            }))
            .await
            .unwrap();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), ready.recv())
                .await
                .unwrap()
                .unwrap();
        }
        let mut worker = Self {
            id: id.to_owned(),
            password: password.to_owned(),
            client,
            inbox,
            loops: vec![pump],
        };
        worker.heartbeat(memory);
        worker
    }

    /// Publishes the node information every 200 ms, with `memory` − 100 MiB available (what its own processes use).
    fn heartbeat(&mut self, memory: i64) {
        let client = self.client.clone();
        let topic = Topic::Information(TopicId::new(self.id.clone()).unwrap()).to_string();
        self.loops.push(tokio::spawn(async move {
            loop {
                let info = json!({"ip": "192.0.2.10", "cpu_percent": 5.0, "memory_percent": 20.0, "memory": memory - 100,
                                  "vcpus": 4, "host": "", "architecture": "", "port": ""});
                let _ = client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, serde_json::to_vec(&info).unwrap())
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    /// Publishes `payload` on `nodes/<id>/<suffix>`.
    pub async fn publish(&self, suffix: &str, payload: Value) {
        self.client
            .publish(
                format!("nodes/{}/{suffix}", self.id),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&payload).unwrap(),
            )
            .await
            .unwrap();
    }

    /// Reports an instance status change.
    pub async fn status(&self, job_name: &str, n: i64, status: &str) {
        self.publish(
            "job",
            json!({"sname": job_name, "status": status, "status_detail": "", "instance": n, "publicip": "192.0.2.10"}),
        )
        .await;
    }

    /// Reports resources for the given instances (numbers as strings, as the reference sends them).
    pub async fn resources(&self, instances: &[(&str, i64)]) {
        let services: Vec<Value> = instances
            .iter()
            .map(|(job, n)| {
                json!({"cpu_percent": "1.0", "memory_percent": "0.05", "disk": "4096", "logs": "hello\n",
                       "job_name": job, "virtualization": "docker", "instance": n})
            })
            .collect();
        self.publish("jobs/resources", json!({"services": services}))
            .await;
    }

    /// The next message whose topic ends with `suffix`, within `secs` seconds (others are skipped).
    pub async fn next(&mut self, suffix: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inbox.recv()).await {
                Ok(Some((topic, v))) if topic.ends_with(suffix) => return v,
                Ok(Some(_)) => {}
                _ => panic!("worker {}: no {suffix} within {secs} s", self.id),
            }
        }
    }

    /// The next message whose topic ends with `suffix` and whose `job_name` (or `_id`) is `job`, within `secs`.
    pub async fn next_about(&mut self, suffix: &str, job: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inbox.recv()).await {
                Ok(Some((topic, v)))
                    if topic.ends_with(suffix) && (v["job_name"] == json!(job) || v["_id"] == json!(job)) =>
                {
                    return v;
                }
                Ok(Some(_)) => {}
                _ => panic!("worker {}: no {suffix} about {job} within {secs} s", self.id),
            }
        }
    }

    /// Keeps reporting resources for `instances` every 300 ms (a healthy worker running them).
    pub fn keep_reporting(&mut self, instances: Vec<(String, i64)>) {
        let client = self.client.clone();
        let topic = format!("nodes/{}/jobs/resources", self.id);
        self.loops.push(tokio::spawn(async move {
            loop {
                let services: Vec<Value> = instances
                    .iter()
                    .map(|(job, n)| {
                        json!({"cpu_percent": "1.0", "memory_percent": "0.05", "disk": "4096", "logs": "",
                                           "job_name": job, "virtualization": "docker", "instance": n})
                    })
                    .collect();
                let body = serde_json::to_vec(&json!({"services": services})).unwrap();
                let _ = client.publish(topic.clone(), QoS::AtLeastOnce, false, body).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }

    /// Whether a message whose topic ends with `suffix` arrives within `millis`.
    pub async fn gets_within(&mut self, suffix: &str, millis: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inbox.recv()).await {
                Ok(Some((topic, _))) if topic.ends_with(suffix) => return true,
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
    }

    /// Simulates a crash: it stops publishing and its connection closes without a DISCONNECT.
    pub fn crash(mut self) {
        for l in self.loops.drain(..) {
            l.abort();
        }
    }

    /// Simulates the worker's death: it stops publishing and disconnects.
    pub async fn kill(mut self) {
        for l in self.loops.drain(..) {
            l.abort();
        }
        let _ = self.client.disconnect().await;
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}
