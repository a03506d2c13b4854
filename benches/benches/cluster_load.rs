//! Load and failover of the real `cluster-service` binary (release build, started as a child process), driven by
//! simulated workers and a minimal fake root, all on 127.0.0.1, once with the embedded MQTT broker and once with an
//! external Mosquitto child whose password and ACL files the cluster writes (`OAKESTRA_BENCH_BROKERS`, default
//! `embedded,mosquitto`).
//!
//! 1. Report rate: N workers register over HTTP, connect over MQTT with their own credentials and publish
//!    `information` and `jobs/resources` every 2 s (random phase). Each worker runs one instance: root deploys one
//!    1-vCPU instance per worker (workers offer exactly 1 vCPU, so the scheduler puts one on each), and the worker
//!    reports it in `jobs/resources` from the `control/deploy` on. After a warm-up, a probe worker reports, every
//!    200 ms, an instance the cluster does not know (a fresh number each time) and times the `control/delete` that
//!    comes back: the end-to-end lag through the cluster's MQTT queue. N steps up (`OAKESTRA_BENCH_WORKERS`, a
//!    fresh cluster per step) until p99 ≥ 1 s, a connection fails, or the cluster falls behind while the workers
//!    join or their instances are deployed (its log says it took live workers for dead or lost its own MQTT
//!    connection). Each simulated worker holds two MQTT connections with its own credentials, like a real one: the
//!    NodeEngine's (`<id>-ne`, reporting) and the NetManager's (`<id>`, subscribed to `nodes/<id>/net/#`, idle).
//!    The cluster's RSS is read once started (idle) and during the probe: the difference per worker is the cost of
//!    a worker (its records, its two sessions); with Mosquitto the broker's RSS is shown on its own.
//! 2. Failover: two workers, one instance; the worker running it dies; time until the other receives
//!    `control/deploy`, with the default `--worker-timeout` (10 s) and with 2 s (`OAKESTRA_BENCH_FAILOVER_RUNS`
//!    runs each, default 5, a fresh cluster per run).
//!
//! Needs `cargo build --release -p oakestra-cluster-service` first (`benches/cluster-load.sh` does it, and raises
//! the open-file limit: every worker is one MQTT connection on each side).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    http::{Method, StatusCode, Uri},
};
use oakestra_protocol::api::cluster::NodeRegistered;
use oakestra_runtime::client;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, oneshot},
    task::{JoinHandle, JoinSet},
};

/// The cluster id the fake root hands out.
const CLUSTER_ID: &str = "c0ffee0000000000000000b1";
/// The cluster secret the fake root hands out (root's calls to the cluster carry it).
const CLUSTER_SECRET: &str = "bench-fake-root-cluster-secret";
/// Default worker counts of the report-rate steps.
const DEFAULT_STEPS: &[usize] = &[1000, 5000, 10_000, 12_500, 15_000];
/// How often a worker publishes `information` and `jobs/resources` (the NodeEngine's cadence).
const REPORT_PERIOD: Duration = Duration::from_secs(2);
/// Resolution of the workers' random phases within [`REPORT_PERIOD`].
const SLOT: Duration = Duration::from_millis(10);
/// Number of phase slots in one period.
const SLOTS: usize = 200;
/// Registrations and connections in flight at once with the embedded broker (a login works as soon as the
/// registration is answered).
const CONCURRENCY: usize = 32;
/// The same with Mosquitto, where a new worker's login works only after the cluster's next reload of the broker
/// (at most one per second), so many joins wait at once.
const CONCURRENCY_EXTERNAL: usize = 512;
/// Deploy calls in flight at once, as root sends them one after the other: each holds the cluster's state lock for
/// a placement over every worker, so parallel calls only starve the worker messages.
const DEPLOY_CONCURRENCY: usize = 1;
/// Pause between all workers running their instance and the probe.
const WARMUP: Duration = Duration::from_secs(4);
/// How often the probe reports an unknown instance.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How long the probe runs.
const PROBE_FOR: Duration = Duration::from_secs(10);
/// How long the probe waits for the last deletes before counting them lost.
const PROBE_GRACE: Duration = Duration::from_secs(5);
/// The lag a cluster of this size must stay under.
const LAG_LIMIT: Duration = Duration::from_secs(1);
/// The job every probe report names.
const PROBE_JOB: &str = "bench.probe.svc.default";

// === Small helpers ==============================================================================================

/// A 64-bit LCG (high bits): phases and kill times; seeded from the clock, so every run differs.
struct Lcg(u64);

impl Lcg {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self(u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(1))
    }

    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound.max(1)
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "oakestra-bench-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `count` distinct free ports on 127.0.0.1 (all bound at once, then released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// One HTTP call with a JSON body; the answer, or what went wrong.
async fn http(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<client::Response, String> {
    client::call(method, url, bearer, body, Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())
}

/// `samples` sorted; the value at quantile `q` (nearest rank).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within a short list"
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

// === /proc ======================================================================================================

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process in clock ticks (`self` for this one).
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// A `key:  value kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The soft open-file limit of this process (the cluster child inherits it).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// CPU use of a process between two samples, in percent of one core.
struct CpuWindow {
    pid: String,
    ticks: u64,
    at: Instant,
}

impl CpuWindow {
    fn start(pid: &str) -> Self {
        Self {
            pid: pid.to_owned(),
            ticks: cpu_ticks(pid),
            at: Instant::now(),
        }
    }

    #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
    fn percent(&self, ticks_per_s: f64) -> f64 {
        let used = cpu_ticks(&self.pid).saturating_sub(self.ticks) as f64 / ticks_per_s;
        100.0 * used / self.at.elapsed().as_secs_f64().max(1e-9)
    }
}

// === The fake root and the cluster ==============================================================================

/// Root as far as the cluster needs it: registration answers an identity, everything else 200.
async fn start_fake_root() -> (String, JoinHandle<()>) {
    async fn answer(uri: Uri, _body: Bytes) -> (StatusCode, Json<Value>) {
        if uri.path() == "/api/cluster/register" {
            (
                StatusCode::OK,
                Json(json!({"id": CLUSTER_ID, "token": CLUSTER_SECRET})),
            )
        } else {
            (StatusCode::OK, Json(json!({"message": "ok"})))
        }
    }
    // The cluster's report carries every instance: a few MiB at thousands of workers.
    let app = Router::new().fallback(answer).layer(DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the fake root");
    let url = format!(
        "http://{}",
        listener.local_addr().expect("the fake root's address")
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

/// The release `cluster-service` binary, found like `tests/src/procs.rs` finds binaries.
fn cluster_binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let target = if target.is_absolute() {
        target
    } else {
        workspace.join(target)
    };
    let (profile, build) = if cfg!(debug_assertions) {
        ("debug", "cargo build -p oakestra-cluster-service")
    } else {
        ("release", "cargo build --release -p oakestra-cluster-service")
    };
    let path = target.join(profile).join("cluster-service");
    assert!(
        path.is_file(),
        "{} not found: build it first with `{build}`",
        path.display()
    );
    path
}

/// Which broker the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerMode {
    /// cluster-service's embedded broker.
    Embedded,
    /// A Mosquitto child with the password and ACL files the cluster writes.
    Mosquitto,
}

impl BrokerMode {
    fn label(self) -> &'static str {
        match self {
            Self::Embedded => "embedded broker",
            Self::Mosquitto => "external Mosquitto",
        }
    }
}

fn broker_modes() -> Vec<BrokerMode> {
    let list = std::env::var("OAKESTRA_BENCH_BROKERS").unwrap_or_else(|_| "embedded,mosquitto".into());
    list.split(',')
        .filter(|m| !m.trim().is_empty())
        .map(|m| match m.trim() {
            "embedded" => BrokerMode::Embedded,
            "mosquitto" => BrokerMode::Mosquitto,
            other => panic!("OAKESTRA_BENCH_BROKERS: {other:?} is not embedded or mosquitto"),
        })
        .collect()
}

/// The Mosquitto binary (Debian's `mosquitto` package).
fn mosquitto_binary() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("mosquitto is not installed (apt-get install mosquitto)")
}

/// A running cluster-service child, killed on drop.
struct Cluster {
    child: Child,
    pid: String,
    url: String,
    log: PathBuf,
    /// How far [`Cluster::trouble_counts`] has read the log, and what it counted.
    scanned: Mutex<LogScan>,
    /// The Mosquitto child in [`BrokerMode::Mosquitto`].
    mosquitto: Option<Child>,
    _dir: TempDir,
}

/// Lines of the cluster's log that mean it fell behind.
#[derive(Default, Clone, Copy)]
struct LogScan {
    offset: u64,
    /// "MQTT connection lost": its own MQTT client missed the keep-alive (or the broker dropped it).
    mqtt_drops: usize,
    /// "worker stopped reporting": a worker's messages were not handled within the worker timeout.
    declared_dead: usize,
}

/// The token the simulated workers join with.
const WORKER_JOIN_TOKEN: &str = "bench-worker-join-token-7d2e";

impl Cluster {
    /// Starts the cluster on free ports with `extra` flags and waits until it has registered with root, reported
    /// once and subscribed to its broker.
    async fn start(root_url: &str, extra: &[&str], mode: BrokerMode) -> Self {
        let binary = cluster_binary();
        let dir = TempDir::new("cluster");
        let ports = free_ports(2);
        let log = dir.0.join("cluster.log");
        let d = |name: &str| dir.0.join(name).display().to_string();
        let broker_args: Vec<String> = match mode {
            BrokerMode::Embedded => vec!["--mqtt-listen".into(), format!("127.0.0.1:{}", ports[1])],
            BrokerMode::Mosquitto => vec![
                "--mqtt-url".into(),
                format!("mqtt://127.0.0.1:{}", ports[1]),
                "--mqtt-password-file".into(),
                d("passwd"),
                "--mqtt-acl-file".into(),
                d("acl"),
                "--mqtt-reload-command".into(),
                format!("kill -HUP \"$(cat '{}')\"", d("run/mosquitto.pid")),
            ],
        };
        let child = Command::new(&binary)
            .args([
                "--cluster-name",
                "benchcluster",
                "--join-token",
                "bench-join-token",
                "--root-url",
                root_url,
                "--listen",
                &format!("127.0.0.1:{}", ports[0]),
                "--data-dir",
                &d("data"),
                "--worker-join-token",
                WORKER_JOIN_TOKEN,
            ])
            .args(&broker_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("creating the cluster log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let mosquitto = match mode {
            BrokerMode::Embedded => None,
            BrokerMode::Mosquitto => Some(start_mosquitto(&dir.0, ports[1]).await),
        };
        let mut cluster = Self {
            pid: child.id().to_string(),
            child,
            url: format!("http://127.0.0.1:{}", ports[0]),
            log,
            scanned: Mutex::new(LogScan::default()),
            mosquitto,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = cluster.child.try_wait() {
                panic!("cluster-service exited with {status}:\n{}", cluster.log_tail());
            }
            let status = http(
                Method::GET,
                &format!("{}/api/cluster/status", cluster.url),
                None,
                None,
            )
            .await;
            if let Ok(r) = status
                && r.body["cluster_id"].is_string()
                && r.body["mqtt_connected"] == json!(true)
                && r.body["connected_to_root"] == json!(true)
            {
                // Trouble counts from here on: an external broker started after the cluster makes its first
                // connection attempts fail, which is not the load's doing.
                let baseline = cluster.trouble_counts();
                *cluster.scanned.lock().unwrap_or_else(PoisonError::into_inner) = LogScan {
                    offset: baseline.offset,
                    ..LogScan::default()
                };
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "cluster-service not ready within 30 s:\n{}",
                cluster.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The trouble lines of the log so far (reads only what was appended since the last call).
    fn trouble_counts(&self) -> LogScan {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut scan = self.scanned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(&self.log)
            && file.seek(SeekFrom::Start(scan.offset)).is_ok()
        {
            let _ = file.read_to_end(&mut text);
        }
        // Only whole lines; a line still being written is read next time.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in String::from_utf8_lossy(&text[..whole]).lines() {
            if line.contains("MQTT connection lost") {
                scan.mqtt_drops += 1;
            } else if line.contains("worker stopped reporting") {
                scan.declared_dead += 1;
            }
        }
        scan.offset += u64::try_from(whole).unwrap_or(0);
        *scan
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Root's deploy call for instance `n` of job `job_id` named `name` (1 vCPU, 100 MiB, a container).
    async fn deploy(&self, job_id: &str, name: &str, n: i64) -> Result<(), String> {
        let doc = json!({
            "_id": job_id, "job_name": name, "image": "docker.io/library/nginx:latest",
            "virtualization": "container", "vcpus": 1, "memory": 100, "port": "80",
            "instance_list": [{"instance_number": n, "cluster_id": CLUSTER_ID}]
        });
        let url = format!("{}/api/service/{job_id}/{n}", self.url);
        match http(Method::POST, &url, Some(CLUSTER_SECRET), Some(&doc)).await? {
            r if r.is_success() => Ok(()),
            r => Err(format!("deploy {job_id}/{n}: HTTP {}: {}", r.status, r.body)),
        }
    }
}

impl Cluster {
    /// The Mosquitto child's pid, in [`BrokerMode::Mosquitto`].
    fn broker_pid(&self) -> Option<String> {
        self.mosquitto.as_ref().map(|m| m.id().to_string())
    }
}

/// Starts Mosquitto on 127.0.0.1:`port` over the files the cluster writes into `dir` (waits until they exist and
/// it listens). It drops to user `mosquitto` like the packaged broker; the files are group-readable for it.
async fn start_mosquitto(dir: &Path, port: u16) -> Child {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).expect("creating mosquitto's run dir");
    let _ = std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o777));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(dir.join("passwd").is_file() && dir.join("acl").is_file()) {
        assert!(
            Instant::now() < deadline,
            "the cluster did not write Mosquitto's files within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\nacl_file {d}/acl\n\
             use_username_as_clientid true\nset_tcp_nodelay true\npid_file {d}/run/mosquitto.pid\npersistence false\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\n",
            d = dir.display()
        ),
    )
    .expect("writing mosquitto.conf");
    let mut child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("mosquitto.log")).expect("creating mosquitto.log"))
        .spawn()
        .expect("starting mosquitto");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "mosquitto exited with {status}: {}",
                std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            && run.join("mosquitto.pid").is_file()
        {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto not listening on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(m) = &mut self.mosquitto {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

// === Simulated workers ==========================================================================================

/// What all workers of one run count together.
#[derive(Default)]
struct Counters {
    /// PUBLISH packets written to the broker.
    published: AtomicU64,
    /// Publishes the ticker could not queue (the client's request channel was full).
    dropped: AtomicU64,
    /// Connection errors after the handshake.
    connection_errors: AtomicU64,
    /// `control/deploy` commands received.
    deploys: AtomicU64,
}

/// A control message a worker received: when, on which topic, the payload.
type Received = (Instant, String, Value);

/// One simulated worker: its MQTT client, what it publishes, and its pump task (aborted on drop).
struct Worker {
    id: String,
    client: AsyncClient,
    /// Publishing while true; [`Worker::kill`] clears it.
    alive: AtomicBool,
    /// Its slot within [`REPORT_PERIOD`].
    phase: usize,
    information_topic: String,
    resources_topic: String,
    information: Vec<u8>,
    /// The current `jobs/resources` payload: no services until a `control/deploy` arrives, then that instance.
    resources: Mutex<Vec<u8>>,
    /// When the ticker last queued its reports.
    last_report: Mutex<Option<Instant>>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(pump) = self.pump.lock().unwrap_or_else(PoisonError::into_inner).take() {
            pump.abort();
        }
    }
}

/// Connection attempts before a worker gives up joining (an external broker applies new credentials shortly after
/// its reload, not at once), and the pause between them.
const CONNECT_ATTEMPTS: usize = 100;
const CONNECT_PAUSE: Duration = Duration::from_millis(100);

/// MQTT options for one of a worker's programs.
fn mqtt_options(user: &str, password: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(user, "127.0.0.1", port);
    options
        .set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    options
}

/// The workers' NetManager connections, held by a child process (this bench binary again, with
/// `OAKESTRA_BENCH_ROLE=net-swarm`): each process may hold at most `RLIMIT_NOFILE` sockets, and without
/// CAP_SYS_RESOURCE that limit cannot be raised, so the two connections of 10,000 workers need two processes.
/// Lines `<id> <password> <port>` go to its stdin; it answers `ok` or `err <why>` per line.
struct NetSwarm {
    child: Mutex<Child>,
    stdin: Mutex<std::process::ChildStdin>,
    acked: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    first_error: Arc<Mutex<Option<String>>>,
}

impl NetSwarm {
    fn start() -> Self {
        let exe = std::env::current_exe().expect("the bench's own path");
        let mut child = Command::new(exe)
            .env("OAKESTRA_BENCH_ROLE", "net-swarm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the net-swarm child");
        let stdin = child.stdin.take().expect("its stdin");
        let stdout = child.stdout.take().expect("its stdout");
        let (acked, failed, first_error) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Mutex::new(None)),
        );
        let (a, f, e) = (Arc::clone(&acked), Arc::clone(&failed), Arc::clone(&first_error));
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ok" {
                    a.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                    e.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(line);
                }
            }
        });
        Self {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            acked,
            failed,
            first_error,
        }
    }

    fn add(&self, id: &str, password: &str, port: u16) {
        use std::io::Write as _;
        let _ = writeln!(
            self.stdin.lock().unwrap_or_else(PoisonError::into_inner),
            "{id} {password} {port}"
        );
    }

    /// Waits until `n` connections are up; the first failure otherwise.
    async fn wait(&self, n: usize, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self.failed.load(Ordering::Relaxed) > 0 {
                let first = self
                    .first_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                return Err(format!(
                    "{} NetManager connections failed; first: {}",
                    self.failed.load(Ordering::Relaxed),
                    first.unwrap_or_default()
                ));
            }
            let up = self.acked.load(Ordering::Relaxed);
            if up >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {up} of {n} NetManager connections up within {within:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NetSwarm {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The child side of [`NetSwarm`]: connects each announced NetManager, answers per line, holds the connections
/// until stdin closes.
fn net_swarm() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the swarm's runtime");
    runtime.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let mut held = Vec::new();
        while let Some(line) = rx.recv().await {
            let out = Arc::clone(&out);
            held.push(tokio::spawn(async move {
                use std::io::Write as _;
                let parts: Vec<&str> = line.split_whitespace().collect();
                let result = match parts.as_slice() {
                    [id, password, port] => match port.parse::<u16>() {
                        Ok(port) => connect_net(id, password, port).await.map(Some),
                        Err(e) => Err(format!("bad port {port}: {e}")),
                    },
                    _ => Err(format!("bad line {line:?}")),
                };
                let text = match &result {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("err {e}"),
                };
                {
                    let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
                    let _ = writeln!(out, "{text}");
                    let _ = out.flush();
                }
                // Keep the connection (its pump runs on its own) until the swarm ends.
                if let Ok(Some(connection)) = result {
                    std::future::pending::<()>().await;
                    drop(connection);
                }
            }));
        }
        for task in held {
            task.abort();
        }
    });
}

/// The NetManager-like connection: connects as `<id>`, subscribes to `nodes/<id>/net/#`, then only answers pings.
async fn connect_net(id: &str, password: &str, port: u16) -> Result<(AsyncClient, JoinHandle<()>), String> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(id, password, port), 4);
    client
        .try_subscribe(format!("nodes/{id}/net/#"), QoS::AtLeastOnce)
        .map_err(|e| format!("subscribing {id}: {e}"))?;
    let mut failures = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                if failures >= CONNECT_ATTEMPTS {
                    return Err(format!("connecting {id}: {e}"));
                }
                tokio::time::sleep(CONNECT_PAUSE).await;
            }
        }
    }
    let pump = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    Ok((client, pump))
}

/// A registration body like a NodeEngine sends.
fn node_body(host: &str, vcpus: i64, memory: i64) -> Value {
    json!({
        "id": "", "host": host, "ip": "192.0.2.10", "port": "3000",
        "system_info": {"kernel_version": "6.1.0-18-amd64", "architecture": "x86_64", "os_version": "Debian 12",
                        "uptime": "3600", "full_stats": ""},
        "cpu_percent": 3.5, "vcpus": vcpus, "architecture": "amd64", "memory_percent": 20.0, "memory": memory,
        "disk_info": {"/": "40"}, "network_info": {}, "gpu_driver": "", "gpu_usage": 0, "vgpus": 0, "gpu_temp": 0,
        "vram_percent": 0, "vram": 0, "virtualization": ["docker"], "supported_addons": [], "csi_drivers": [],
        "Overlay": false, "OverlaySocket": "", "LogDirectory": "/tmp", "NetManagerPort": 0, "ClusterAddress": "127.0.0.1"
    })
}

/// A NodeEngine's 2 s snapshot (about 330 bytes): the dynamic fields plus the zero-valued registration fields the
/// reference NodeEngine also sends.
fn information(index: usize, vcpus: i64, memory: i64) -> Vec<u8> {
    let load = index % 60;
    format!(
        "{{\"ip\":\"192.0.2.{}\",\"cpu_percent\":{}.25,\"memory_percent\":{}.5,\"memory\":{memory},\"vcpus\":{vcpus},\
         \"gpu_driver\":\"\",\"gpu_temp\":0,\"gpu_usage\":0,\"vram\":0,\"vram_percent\":0,\"vgpus\":0,\"host\":\"\",\
         \"port\":\"\",\"architecture\":\"\",\"system_info\":null,\"disk_info\":null,\"network_info\":null,\
         \"virtualization\":null,\"Overlay\":false,\"NetManagerPort\":0,\"LogDirectory\":\"\",\"csi_drivers\":null}}",
        1 + index % 250,
        5 + load,
        20 + load / 2,
    )
    .into_bytes()
}

/// A `jobs/resources` payload for one instance (numbers as strings, as the reference sends them).
fn resources(job_name: &str, n: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"services": [{
        "cpu_percent": "1.25", "memory_percent": "0.021", "disk": "40960",
        "logs": "GET / HTTP/1.1 200 612\nGET /healthz HTTP/1.1 200 2\n",
        "job_name": job_name, "virtualization": "docker", "instance": n
    }]}))
    .unwrap_or_default()
}

impl Worker {
    /// Registers `host` with the cluster, connects to its broker as `<id>-ne` and subscribes to the node's control
    /// topics. Received control messages go to `inbox` (if any); a `control/deploy` also becomes the instance the
    /// worker reports.
    #[allow(
        clippy::too_many_arguments,
        reason = "one worker's settings and sinks, each named at the call"
    )]
    async fn join(
        cluster_url: &str,
        host: &str,
        index: usize,
        (vcpus, memory): (i64, i64),
        phase: usize,
        counters: &Arc<Counters>,
        inbox: Option<mpsc::UnboundedSender<Received>>,
        net: Option<&NetSwarm>,
    ) -> Result<Arc<Self>, String> {
        let url = format!("{cluster_url}/api/node/register");
        let r = http(
            Method::POST,
            &url,
            Some(WORKER_JOIN_TOKEN),
            Some(&node_body(host, vcpus, memory)),
        )
        .await?;
        if !r.is_success() {
            return Err(format!("registering {host}: HTTP {}: {}", r.status, r.body));
        }
        let answer: NodeRegistered =
            serde_json::from_value(r.body).map_err(|e| format!("registering {host}: {e}"))?;
        let port = answer
            .mqtt_broker_port_u16()
            .ok_or_else(|| format!("registering {host}: no MQTT port"))?;
        let password = answer
            .mqtt_password
            .ok_or_else(|| format!("registering {host}: no MQTT password"))?;
        let user = format!("{}-ne", answer.id);
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&user, &password, port), 16);
        // Go (the reference NodeEngine) sets TCP_NODELAY on every connection; rumqttc does not by default.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        client
            .try_subscribe(format!("nodes/{}/control/#", answer.id), QoS::AtLeastOnce)
            .map_err(|e| format!("subscribing {host}: {e}"))?;
        let worker = Arc::new(Self {
            information_topic: format!("nodes/{}/information", answer.id),
            resources_topic: format!("nodes/{}/jobs/resources", answer.id),
            id: answer.id,
            client,
            alive: AtomicBool::new(true),
            phase,
            information: information(index, vcpus, memory),
            resources: Mutex::new(br#"{"services":[]}"#.to_vec()),
            last_report: Mutex::new(None),
            pump: Mutex::new(None),
        });
        let (ready_tx, ready) = oneshot::channel();
        let pump = tokio::spawn(pump(
            Arc::downgrade(&worker),
            eventloop,
            Arc::clone(counters),
            inbox,
            ready_tx,
        ));
        *worker.pump.lock().unwrap_or_else(PoisonError::into_inner) = Some(pump);
        match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(format!("connecting {host}: {e}")),
            Ok(Err(_)) => return Err(format!("connecting {host}: the pump stopped")),
            Err(_) => return Err(format!("connecting {host}: no SUBACK within 30 s")),
        }
        if let Some(swarm) = net {
            swarm.add(&worker.id, &password, port);
        }
        Ok(worker)
    }

    /// Queues the worker's two reports (a full request channel counts as dropped).
    fn report(&self, counters: &Counters) {
        let resources = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (topic, payload) in [
            (&self.information_topic, self.information.clone()),
            (&self.resources_topic, resources),
        ] {
            if self
                .client
                .try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        *self.last_report.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// The worker dies: it stops publishing and disconnects. Returns the moment of death.
    fn kill(&self) -> Instant {
        self.alive.store(false, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
        Instant::now()
    }
}

/// Drives one worker's connection: signals `ready` at the first SUBACK (or the first error), counts written
/// publishes, adopts deployed instances and forwards control messages to `inbox`.
async fn pump(
    worker: std::sync::Weak<Worker>,
    mut eventloop: EventLoop,
    counters: Arc<Counters>,
    inbox: Option<mpsc::UnboundedSender<Received>>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut failures = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if p.topic.ends_with("/control/deploy")
                    && let (Some(job), Some(n), Some(w)) = (
                        v["job_name"].as_str(),
                        v["instance_number"].as_i64(),
                        worker.upgrade(),
                    )
                {
                    *w.resources.lock().unwrap_or_else(PoisonError::into_inner) = resources(job, n);
                    counters.deploys.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(inbox) = &inbox {
                    let _ = inbox.send((at, p.topic, v));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if ready.is_some() {
                    failures += 1;
                    if failures < CONNECT_ATTEMPTS {
                        tokio::time::sleep(CONNECT_PAUSE).await;
                        continue;
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(e.to_string()));
                    }
                    return;
                }
                if worker.upgrade().is_none_or(|w| !w.alive.load(Ordering::SeqCst)) {
                    return;
                }
                counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The workers the ticker publishes for, by phase slot.
type Slots = Arc<Mutex<Vec<Vec<Arc<Worker>>>>>;

/// Publishes every live worker's reports once per [`REPORT_PERIOD`], each in its own phase slot: one task for all
/// workers; a worker takes part from the moment it is added to the returned slots (as a NodeEngine reports as soon
/// as it is connected). Abort the task to stop.
fn start_ticker(counters: &Arc<Counters>) -> (Slots, JoinHandle<()>) {
    let slots: Slots = Arc::new(Mutex::new(vec![Vec::new(); SLOTS]));
    let (shared, counters) = (Arc::clone(&slots), Arc::clone(counters));
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SLOT);
        for slot in (0..SLOTS).cycle() {
            ticks.tick().await;
            let slots = shared.lock().unwrap_or_else(PoisonError::into_inner);
            for w in &slots[slot] {
                if w.alive.load(Ordering::SeqCst) {
                    w.report(&counters);
                }
            }
        }
    });
    (slots, task)
}

fn add_to(slots: &Slots, worker: &Arc<Worker>) {
    slots.lock().unwrap_or_else(PoisonError::into_inner)[worker.phase % SLOTS].push(Arc::clone(worker));
}

/// Registers and connects `n` workers (`vcpus`, `memory` each), `lanes_wanted` at a time, with random phases;
/// each starts reporting (joins `slots`) once connected. The workers that joined, and the first error of those that
/// did not (with their count).
async fn join_many(
    cluster_url: &str,
    n: usize,
    size: (i64, i64),
    counters: &Arc<Counters>,
    slots: &Slots,
    swarm: &Arc<NetSwarm>,
    lanes_wanted: usize,
) -> (Vec<Arc<Worker>>, usize, Option<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut rng = Lcg::seeded();
    let phases: Arc<Vec<usize>> = Arc::new(
        (0..n)
            .map(|_| usize::try_from(rng.next(SLOTS as u64)).unwrap_or(0))
            .collect(),
    );
    let mut lanes = JoinSet::new();
    for _ in 0..lanes_wanted.min(n) {
        let (next, phases, counters, slots, url, swarm) = (
            Arc::clone(&next),
            Arc::clone(&phases),
            Arc::clone(counters),
            Arc::clone(slots),
            cluster_url.to_owned(),
            Arc::clone(swarm),
        );
        lanes.spawn(async move {
            let mut joined = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return joined;
                }
                let host = format!("bench-worker-{i:05}");
                let worker =
                    Worker::join(&url, &host, i, size, phases[i], &counters, None, Some(&swarm)).await;
                if let Ok(w) = &worker {
                    add_to(&slots, w);
                }
                joined.push(worker);
            }
        });
    }
    let (mut workers, mut failed, mut first_error) = (Vec::with_capacity(n), 0, None);
    while let Some(lane) = lanes.join_next().await {
        for result in lane.expect("a join lane panicked") {
            match result {
                Ok(w) => workers.push(w),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    (workers, failed, first_error)
}

/// Root deploys instances 0..n of one job, [`DEPLOY_CONCURRENCY`] calls at a time: the slowest call, or the first
/// error.
async fn deploy_many(cluster: &Arc<Cluster>, job_id: &str, name: &str, n: usize) -> Result<Duration, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut lanes = JoinSet::new();
    for _ in 0..DEPLOY_CONCURRENCY.min(n) {
        let (next, cluster, job_id, name) = (
            Arc::clone(&next),
            Arc::clone(cluster),
            job_id.to_owned(),
            name.to_owned(),
        );
        lanes.spawn(async move {
            let mut slowest = Duration::ZERO;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(slowest);
                }
                let t = Instant::now();
                cluster
                    .deploy(&job_id, &name, i64::try_from(i).unwrap_or(0))
                    .await?;
                slowest = slowest.max(t.elapsed());
            }
        });
    }
    let mut result = Ok(Duration::ZERO);
    while let Some(lane) = lanes.join_next().await {
        match (lane.expect("a deploy lane panicked"), &mut result) {
            (Ok(lane), Ok(slowest)) => *slowest = (*slowest).max(lane),
            (Err(e), Ok(_)) => result = Err(e),
            (_, Err(_)) => {}
        }
    }
    result
}

// === 1. Report rate =============================================================================================

/// What the probe measured.
struct Probe {
    lags: Vec<Duration>,
    lost: usize,
    error: Option<String>,
}

/// The probe worker on its own thread and runtime (so the load's tasks do not delay its clock): joins, then
/// every [`PROBE_EVERY`] for [`PROBE_FOR`] reports a fresh unknown instance and times the `control/delete`.
fn spawn_probe(cluster_url: String) -> oneshot::Receiver<Probe> {
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the probe's runtime");
            let probe = runtime.block_on(probe(&cluster_url));
            let _ = done_tx.send(probe);
        })
        .expect("starting the probe thread");
    done
}

async fn probe(cluster_url: &str) -> Probe {
    let counters = Arc::new(Counters::default());
    let (tx, mut inbox) = mpsc::unbounded_channel();
    let worker = match Worker::join(
        cluster_url,
        "bench-probe",
        0,
        (1, 4000),
        0,
        &counters,
        Some(tx),
        None,
    )
    .await
    {
        Ok(w) => w,
        Err(e) => {
            return Probe {
                lags: Vec::new(),
                lost: 0,
                error: Some(e),
            };
        }
    };
    let mut sent: HashMap<i64, Instant> = HashMap::new();
    let mut lags = Vec::new();
    let mut on_delete = |(at, topic, v): Received, sent: &mut HashMap<i64, Instant>| {
        if topic.ends_with("/control/delete")
            && v["job_name"] == json!(PROBE_JOB)
            && let Some(t) = v["instance_number"].as_i64().and_then(|n| sent.remove(&n))
        {
            lags.push(at.saturating_duration_since(t));
        }
    };
    let start = tokio::time::Instant::now();
    let mut next = start;
    let mut number = 0i64;
    while next < start + PROBE_FOR {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                number += 1;
                sent.insert(number, Instant::now());
                let _ = worker.client.try_publish(
                    worker.resources_topic.as_str(), QoS::AtLeastOnce, false, resources(PROBE_JOB, number));
                next += PROBE_EVERY;
            }
            Some(received) = inbox.recv() => on_delete(received, &mut sent),
        }
    }
    let grace = tokio::time::Instant::now() + PROBE_GRACE;
    while !sent.is_empty() {
        match tokio::time::timeout_at(grace, inbox.recv()).await {
            Ok(Some(received)) => on_delete(received, &mut sent),
            _ => break,
        }
    }
    worker.kill();
    lags.sort();
    Probe {
        lags,
        lost: sent.len(),
        error: None,
    }
}

/// One report-rate step.
struct Step {
    workers: usize,
    nominal_rate: f64,
    offered_rate: f64,
    probes: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    lost: usize,
    cluster_cpu: f64,
    rss_mib: f64,
    /// The cluster's RSS right after it started.
    idle_mib: f64,
    /// (RSS during the probe − idle RSS) / workers.
    kib_per_worker: f64,
    /// Mosquitto's RSS, with an external broker.
    broker_rss_mib: Option<f64>,
    bench_cpu: f64,
    join_s: f64,
    deploy_s: f64,
    slowest_deploy: Duration,
    failure: Option<String>,
}

impl Step {
    fn failed(workers: usize, why: String) -> Self {
        Self {
            workers,
            nominal_rate: 0.0,
            offered_rate: 0.0,
            probes: 0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            max: Duration::ZERO,
            lost: 0,
            cluster_cpu: 0.0,
            rss_mib: 0.0,
            idle_mib: 0.0,
            kib_per_worker: 0.0,
            broker_rss_mib: None,
            bench_cpu: 0.0,
            join_s: 0.0,
            deploy_s: 0.0,
            slowest_deploy: Duration::ZERO,
            failure: Some(why),
        }
    }

    fn ok(&self) -> bool {
        self.failure.is_none() && self.lost == 0 && self.probes > 0 && self.p99 < LAG_LIMIT
    }
}

/// What the cluster's log says went wrong so far: its own MQTT connection dropped, or it took live workers for
/// dead (both mean it fell behind on worker messages by more than the keep-alive or the worker timeout).
fn cluster_trouble(cluster: &Cluster, phase: &str) -> Option<String> {
    let LogScan {
        mqtt_drops,
        declared_dead,
        ..
    } = cluster.trouble_counts();
    match (mqtt_drops, declared_dead) {
        (0, 0) => None,
        (0, dead) => Some(format!("{phase}: the cluster took {dead} live workers for dead")),
        (drops, dead) => Some(format!(
            "{phase}: the cluster's own MQTT connection dropped {drops} times; it took {dead} live workers for dead"
        )),
    }
}

/// Completes with [`cluster_trouble`] once there is any (checked every second).
async fn watch_trouble(cluster: &Cluster, phase: &str) -> String {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(why) = cluster_trouble(cluster, phase) {
            return why;
        }
    }
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
async fn load_step(root_url: &str, n: usize, ticks_per_s: f64, mode: BrokerMode) -> Step {
    let cluster = Arc::new(Cluster::start(root_url, &[], mode).await);
    let idle_kib = status_kib(&cluster.pid, "VmRSS");
    let counters = Arc::new(Counters::default());
    let (slots, ticker) = start_ticker(&counters);
    let fail = |why: String, ticker: &JoinHandle<()>, join_s: f64, deploy_s: f64| {
        ticker.abort();
        let mut step = Step::failed(n, why);
        step.rss_mib = status_kib(&cluster.pid, "VmRSS") as f64 / 1024.0;
        (step.join_s, step.deploy_s) = (join_s, deploy_s);
        step
    };

    let swarm = Arc::new(NetSwarm::start());
    let t = Instant::now();
    const JOINING: &str = "while the workers joined";
    let (workers, failed, error) = tokio::select! {
        joined = join_many(&cluster.url, n, (1, 4000), &counters, &slots, &swarm, match mode {
            BrokerMode::Embedded => CONCURRENCY,
            BrokerMode::Mosquitto => CONCURRENCY_EXTERNAL,
        }) => joined,
        why = watch_trouble(&cluster, JOINING) => return fail(why, &ticker, t.elapsed().as_secs_f64(), 0.0),
    };
    let join_s = t.elapsed().as_secs_f64();
    if failed > 0 {
        let why = format!(
            "{failed} of {n} workers could not join; first: {}",
            error.unwrap_or_default()
        );
        return fail(why, &ticker, join_s, 0.0);
    }
    if let Err(why) = swarm.wait(n, Duration::from_secs(120)).await {
        return fail(why, &ticker, join_s, 0.0);
    }
    let join_s = t.elapsed().as_secs_f64();
    if let Some(why) = cluster_trouble(&cluster, JOINING) {
        return fail(why, &ticker, join_s, 0.0);
    }

    // One instance per worker: each offers 1 vCPU, so the scheduler cannot put two on one worker.
    let t = Instant::now();
    const DEPLOYING: &str = "while root deployed one instance per worker";
    let deployed = tokio::select! {
        deployed = deploy_many(&cluster, "6650f0c1a2b3c4d5e6f70001", "bench.load.svc.default", n) => deployed,
        why = watch_trouble(&cluster, DEPLOYING) => Err(why),
    };
    let slowest_deploy = match deployed {
        Ok(slowest) => slowest,
        Err(e) => return fail(e, &ticker, join_s, t.elapsed().as_secs_f64()),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters.deploys.load(Ordering::Relaxed) < n as u64 {
        let trouble = cluster_trouble(&cluster, DEPLOYING);
        if trouble.is_some() || Instant::now() > deadline {
            let why = trouble.unwrap_or_else(|| {
                format!(
                    "only {} of {n} workers received their control/deploy within 120 s",
                    counters.deploys.load(Ordering::Relaxed)
                )
            });
            return fail(why, &ticker, join_s, t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deploy_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(WARMUP).await;
    if let Some(why) = cluster_trouble(&cluster, DEPLOYING) {
        return fail(why, &ticker, join_s, deploy_s);
    }

    let cluster_cpu = CpuWindow::start(&cluster.pid);
    let bench_cpu = CpuWindow::start("self");
    let published = counters.published.load(Ordering::Relaxed);
    let errors_before = counters.connection_errors.load(Ordering::Relaxed);
    let probe = spawn_probe(cluster.url.clone())
        .await
        .expect("the probe thread died");
    let window = cluster_cpu.at.elapsed().as_secs_f64();
    let offered = (counters.published.load(Ordering::Relaxed) - published) as f64 / window;
    let (cluster_cpu, bench_cpu) = (cluster_cpu.percent(ticks_per_s), bench_cpu.percent(ticks_per_s));
    let rss_kib = status_kib(&cluster.pid, "VmRSS");
    let rss_mib = rss_kib as f64 / 1024.0;
    let kib_per_worker = rss_kib.saturating_sub(idle_kib) as f64 / n as f64;
    let broker_rss_mib = cluster
        .broker_pid()
        .map(|pid| status_kib(&pid, "VmRSS") as f64 / 1024.0);
    let errors = counters.connection_errors.load(Ordering::Relaxed) - errors_before;
    let dropped = counters.dropped.load(Ordering::Relaxed);
    ticker.abort();
    drop(workers);

    let failure = probe
        .error
        .or_else(|| cluster_trouble(&cluster, "during the probe"))
        .or_else(|| (errors > 0).then(|| format!("{errors} worker connection errors during the probe")))
        .or_else(|| (dropped > 0).then(|| format!("{dropped} reports could not be queued by the workers")));
    Step {
        workers: n,
        nominal_rate: 2.0 * n as f64 / REPORT_PERIOD.as_secs_f64(),
        offered_rate: offered,
        probes: probe.lags.len() + probe.lost,
        p50: quantile(&probe.lags, 0.50),
        // A lost probe counts as slower than any answered one.
        p99: if probe.lost > 0 {
            PROBE_GRACE
        } else {
            quantile(&probe.lags, 0.99)
        },
        max: if probe.lost > 0 {
            PROBE_GRACE
        } else {
            probe.lags.last().copied().unwrap_or_default()
        },
        lost: probe.lost,
        cluster_cpu,
        rss_mib,
        idle_mib: idle_kib as f64 / 1024.0,
        kib_per_worker,
        broker_rss_mib,
        bench_cpu,
        join_s,
        deploy_s,
        slowest_deploy,
        failure,
    }
}

fn steps() -> Vec<usize> {
    match std::env::var("OAKESTRA_BENCH_WORKERS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| panic!("OAKESTRA_BENCH_WORKERS={list:?}: expected e.g. 100,500,1000"))
            })
            .collect(),
        _ => DEFAULT_STEPS.to_vec(),
    }
}

async fn report_rate(root_url: &str, ticks_per_s: f64, mode: BrokerMode) {
    let limit = open_file_limit();
    println!(
        "cluster_load [{}]: report rate: workers (2 MQTT connections each) publish information + jobs/resources \
         every {} s; probe every {} ms for {} s (open-file limit {limit})",
        mode.label(),
        REPORT_PERIOD.as_secs(),
        PROBE_EVERY.as_millis(),
        PROBE_FOR.as_secs()
    );
    let mut results: Vec<Step> = Vec::new();
    for n in steps() {
        // The cluster holds both connections of every worker (embedded broker); each bench process one of them.
        let cluster_fds = if mode == BrokerMode::Embedded { 2 * n } else { 8 };
        if u64::try_from(cluster_fds.max(n))
            .unwrap_or(u64::MAX)
            .saturating_add(128)
            > limit
        {
            println!(
                "cluster_load: {n} workers ({} MQTT connections) need more than the open-file limit of {limit} \
                 per process: raise `ulimit -n` (benches/cluster-load.sh does, as far as the hard limit and \
                 CAP_SYS_RESOURCE allow); stopping",
                2 * n
            );
            break;
        }
        let step = load_step(root_url, n, ticks_per_s, mode).await;
        println!(
            "cluster_load: {n:>5} workers: joined in {:.1} s, {n} instances deployed in {:.1} s (slowest call {} ms); \
             p99 {} ms, {:.0} % CPU{}",
            step.join_s,
            step.deploy_s,
            ms(step.slowest_deploy),
            ms(step.p99),
            step.cluster_cpu,
            step.failure
                .as_ref()
                .map(|f| format!(" — FAILED: {f}"))
                .unwrap_or_default()
        );
        let ok = step.ok();
        results.push(step);
        // Let the closed connections of this step leave TIME_WAIT-heavy state before the next cluster starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !ok {
            break;
        }
    }

    println!();
    println!(
        "{:>7} {:>10} {:>10} {:>6} {:>9} {:>9} {:>9} {:>5} {:>9} {:>8} {:>9} {:>10} {:>9} {:>9}",
        "workers",
        "nominal/s",
        "offered/s",
        "probes",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lost",
        "cluster%",
        "RSS MiB",
        "KiB/wkr",
        "broker MiB",
        "deploy s",
        "bench%"
    );
    for s in &results {
        let mut line = format!(
            "{:>7} {:>10.0} {:>10.0} {:>6} {:>9} {:>9} {:>9} {:>5} {:>9.1} {:>8.1} {:>9.1} {:>10} {:>9.1} {:>9.1}",
            s.workers,
            s.nominal_rate,
            s.offered_rate,
            s.probes,
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.lost,
            s.cluster_cpu,
            s.rss_mib,
            s.kib_per_worker,
            s.broker_rss_mib
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}")),
            s.deploy_s,
            s.bench_cpu
        );
        if let Some(f) = &s.failure {
            let _ = write!(line, "  FAILED: {f}");
        } else if !s.ok() {
            let _ = write!(line, "  p99 ≥ {} ms", LAG_LIMIT.as_millis());
        }
        println!("{line}");
    }
    match results.iter().filter(|s| s.ok()).max_by_key(|s| s.workers) {
        Some(best) => println!(
            "[{}] largest N with p99 < {} ms: {} workers ({:.0} msgs/s offered; p99 {} ms; cluster-service {:.1} % of \
             one core, RSS {:.1} MiB = idle {:.1} + {:.1} KiB per worker; {} instances deployed in {:.1} s)",
            mode.label(),
            LAG_LIMIT.as_millis(),
            best.workers,
            best.offered_rate,
            ms(best.p99),
            best.cluster_cpu,
            best.rss_mib,
            best.idle_mib,
            best.kib_per_worker,
            best.workers,
            best.deploy_s
        ),
        None => println!(
            "[{}] largest N with p99 < {} ms: none",
            mode.label(),
            LAG_LIMIT.as_millis()
        ),
    }
    if results.last().is_some_and(Step::ok) {
        println!(
            "(every step passed: the limit lies above the last step; add larger steps to OAKESTRA_BENCH_WORKERS)"
        );
    }
}

// === 2. Failover ================================================================================================

/// One failover run: how long from the death (and from the dead worker's last report) to the other's deploy.
enum Failover {
    Measured {
        from_kill: Duration,
        from_last_report: Duration,
    },
    /// The instance moved before the kill: the cluster took a live worker for dead.
    Premature,
}

/// The next `control/deploy` about `job` on `inbox`, within `within`.
async fn next_deploy(
    inbox: &mut mpsc::UnboundedReceiver<Received>,
    job: &str,
    within: Duration,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some((at, topic, v))) if topic.ends_with("/control/deploy") && v["job_name"] == json!(job) => {
                return Some(at);
            }
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

async fn failover_once(
    root_url: &str,
    timeout: Option<f64>,
    run: usize,
    rng: &mut Lcg,
    mode: BrokerMode,
) -> Failover {
    let timeout_arg = timeout.map(|t| t.to_string());
    let extra: Vec<&str> = match &timeout_arg {
        Some(t) => vec!["--worker-timeout", t],
        None => Vec::new(),
    };
    let cluster = Arc::new(Cluster::start(root_url, &extra, mode).await);
    let counters = Arc::new(Counters::default());
    let mut workers = Vec::new();
    let mut inboxes = Vec::new();
    for (i, host) in ["bench-failover-a", "bench-failover-b"].into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let phase = usize::try_from(rng.next(SLOTS as u64)).unwrap_or(0);
        let w = Worker::join(&cluster.url, host, i, (4, 4000), phase, &counters, Some(tx), None)
            .await
            .unwrap_or_else(|e| panic!("failover worker: {e}"));
        workers.push(w);
        inboxes.push(rx);
    }
    let (slots, ticker) = start_ticker(&counters);
    for w in &workers {
        add_to(&slots, w);
    }
    let (job_id, job) = (
        format!("6650f0c1a2b3c4d5e6f8{run:04}"),
        format!("bench.failover{run}.svc.default"),
    );
    cluster
        .deploy(&job_id, &job, 0)
        .await
        .unwrap_or_else(|e| panic!("failover deploy: {e}"));
    let (first, second) = inboxes.split_at_mut(1);
    let chosen = tokio::select! {
        Some(_) = next_deploy(&mut first[0], &job, Duration::from_secs(10)) => 0,
        Some(_) = next_deploy(&mut second[0], &job, Duration::from_secs(10)) => 1,
        else => panic!("no worker received the deploy within 10 s"),
    };
    let other = 1 - chosen;
    // The chosen worker reports the instance (RUNNING at its first report); it dies at a random point of its cycle.
    let before_kill = Duration::from_millis(2500 + rng.next(2000));
    if next_deploy(&mut inboxes[other], &job, before_kill)
        .await
        .is_some()
    {
        ticker.abort();
        return Failover::Premature;
    }
    let killed = workers[chosen].kill();
    let last_report = workers[chosen]
        .last_report
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or(killed);
    let within = Duration::from_secs_f64(timeout.unwrap_or(10.0) + 30.0);
    let moved = next_deploy(&mut inboxes[other], &job, within).await;
    ticker.abort();
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "the instance did not move to {} within {within:?} of the kill",
            workers[other].id
        )
    });
    Failover::Measured {
        from_kill: moved.saturating_duration_since(killed),
        from_last_report: moved.saturating_duration_since(last_report),
    }
}

fn spread(mut v: Vec<Duration>) -> String {
    v.sort();
    let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
    format!(
        "min {} / median {} / max {} s",
        s(v.first().copied().unwrap_or_default()),
        s(quantile(&v, 0.5)),
        s(v.last().copied().unwrap_or_default())
    )
}

async fn failover(root_url: &str, mode: BrokerMode) {
    let runs: usize = std::env::var("OAKESTRA_BENCH_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(5);
    if runs == 0 {
        return;
    }
    let mut rng = Lcg::seeded();
    println!();
    println!(
        "cluster_load [{}]: failover: 2 workers reporting every {} s, one instance; its worker dies at a random \
         point of its cycle; {runs} runs per timeout, a fresh cluster each",
        mode.label(),
        REPORT_PERIOD.as_secs()
    );
    for (label, timeout) in [
        ("--worker-timeout 10 (default)", None),
        ("--worker-timeout 2", Some(2.0)),
    ] {
        let (mut from_kill, mut from_last, mut premature) = (Vec::new(), Vec::new(), 0);
        let mut run = 0;
        while from_kill.len() < runs && run < runs * 4 {
            match failover_once(root_url, timeout, run, &mut rng, mode).await {
                Failover::Measured {
                    from_kill: k,
                    from_last_report: l,
                } => {
                    from_kill.push(k);
                    from_last.push(l);
                }
                Failover::Premature => premature += 1,
            }
            run += 1;
        }
        println!(
            "failover {label:<30} kill → deploy elsewhere: {}  (last report → deploy: {}; {} runs{})",
            spread(from_kill.clone()),
            spread(from_last),
            from_kill.len(),
            if premature > 0 {
                format!(", plus {premature} where a LIVE worker was declared dead before the kill")
            } else {
                String::new()
            }
        );
    }
}

fn main() {
    if std::env::var("OAKESTRA_BENCH_ROLE").as_deref() == Ok("net-swarm") {
        net_swarm();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the bench runtime");
    runtime.block_on(async {
        let ticks_per_s = clock_ticks();
        let (root_url, root) = start_fake_root().await;
        for mode in broker_modes() {
            report_rate(&root_url, ticks_per_s, mode).await;
            failover(&root_url, mode).await;
            println!();
        }
        root.abort();
    });
}
