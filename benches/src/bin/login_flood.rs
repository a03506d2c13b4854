//! Login flood against the real `root-service` binary (release build, a child process on 127.0.0.1 with a
//! temporary data directory): while attackers send wrong-password logins as fast as they can, the real Admin logs
//! in from another address (127.0.0.2) every 100 ms, each time on a fresh connection as oak-cli does, and the
//! latency of those logins is measured.
//!
//! Scenarios (each on a fresh root-service, `OAKESTRA_BENCH_SECONDS` of flood, default 10):
//! 1. no flood: the baseline;
//! 2. one attacking address (127.0.0.1), default limits: the failed-login limits answer it 429 before any hashing;
//! 3. one attacking address, failed-login limits lifted: only the hashing pool's share per address protects;
//! 4. 64 attacking addresses (127.0.1.1-64), default limits;
//! 5. 64 attacking addresses, limits lifted: the hashing pool saturates (503 with Retry-After when its queue is
//!    full), the worst case for the legitimate login.
//!
//! Each attacker is `OAKESTRA_BENCH_FLOOD` (default 64) concurrent keep-alive connections sending logins back to
//! back without honouring Retry-After. Printed per scenario: the flood's rate and answers, the legitimate logins'
//! p50/p99/max latency and failures, root's CPU and RSS.
//!
//! Run it with `benches/login-flood.sh` (builds the release binaries first). `OAKESTRA_BENCH_ROOT` points at another
//! root-service binary; `OAKESTRA_BENCH_SCENARIOS=1,2` picks scenarios.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark reports on stdout"
)]
#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const ADMIN_PASSWORD: &str = "bench-admin-password";
const LEGIT_SOURCE: &str = "127.0.0.2";
const LEGIT_PERIOD: Duration = Duration::from_millis(100);
/// Every failed-login limit lifted out of reach.
const NO_LIMITS: &[&str] = &[
    "--login-failures-per-address",
    "1000000",
    "--login-failures-per-user-address",
    "1000000",
    "--login-failures-per-user",
    "1000000",
];

struct Scenario {
    name: &'static str,
    attackers: usize,
    flags: &'static [&'static str],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "no flood",
        attackers: 0,
        flags: &[],
    },
    Scenario {
        name: "1 address, default limits",
        attackers: 1,
        flags: &[],
    },
    Scenario {
        name: "1 address, limits lifted",
        attackers: 1,
        flags: NO_LIMITS,
    },
    Scenario {
        name: "64 addresses, default limits",
        attackers: 64,
        flags: &[],
    },
    Scenario {
        name: "64 addresses, limits lifted",
        attackers: 64,
        flags: NO_LIMITS,
    },
];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The release `root-service` binary (or `OAKESTRA_BENCH_ROOT`).
fn root_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OAKESTRA_BENCH_ROOT") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let target = if target.is_absolute() {
        target
    } else {
        workspace.join(target)
    };
    let path = target.join("release").join("root-service");
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build --release -p oakestra-root-service`",
        path.display()
    );
    path
}

/// A running root-service, killed (and its data directory removed) on drop.
struct Root {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Root {
    async fn start(n: usize, flags: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("oakestra-login-flood-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.join("root.log")).unwrap();
        let child = Command::new(root_binary())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--admin-password",
                ADMIN_PASSWORD,
                "--join-token",
                "bench-join-token-0123456789",
            ])
            .args(flags)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let root = Self { child, addr, dir };
        for _ in 0..200 {
            if let Ok(answer) = request(
                None,
                addr,
                "GET /api/health HTTP/1.1\r\nHost: root\r\nConnection: close\r\n\r\n",
            )
            .await
                && answer == 200
            {
                return root;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(root.dir.join("root.log")).unwrap_or_default();
        panic!("root-service did not come up on {addr}:\n{log}");
    }
}

fn login_request(user: &str, password: &str, close: bool) -> String {
    let body = format!(r#"{{"username":"{user}","password":"{password}"}}"#);
    format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: root\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Connects to `addr` from `source` (any local address if `None`).
async fn connect(source: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request on a fresh connection; the status.
async fn request(source: Option<IpAddr>, addr: SocketAddr, raw: &str) -> std::io::Result<u16> {
    let mut stream = connect(source, addr).await?;
    stream.write_all(raw.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    status_of(&buf)
}

fn status_of(head: &[u8]) -> std::io::Result<u16> {
    let text = String::from_utf8_lossy(head);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))
}

/// Reads one response (with a content-length) from a keep-alive connection; its status and whether the server
/// keeps the connection open.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u16, bool)> {
    buf.clear();
    let mut chunk = [0_u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let open = !head.contains("connection: close");
                return Ok((status_of(&buf[..end])?, open));
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the flood got back: answers by status (0 = connection error).
type Tally = Arc<Mutex<BTreeMap<u16, u64>>>;

/// One attacking connection: wrong-password logins back to back until `stop`, reconnecting when closed.
async fn attacker(source: IpAddr, addr: SocketAddr, stop: Arc<AtomicBool>, tally: Tally, id: usize) {
    let mut buf = Vec::new();
    let mut n = 0_u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = connect(Some(source), addr).await else {
            *tally.lock().unwrap().entry(0).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let raw = login_request("Admin", &format!("guess-{id}-{n}"), false);
            if stream.write_all(raw.as_bytes()).await.is_err() {
                break;
            }
            match read_response(&mut stream, &mut buf).await {
                Ok((status, open)) => {
                    *tally.lock().unwrap().entry(status).or_default() += 1;
                    if !open {
                        break;
                    }
                }
                Err(_) => {
                    *tally.lock().unwrap().entry(0).or_default() += 1;
                    break;
                }
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(n: usize, scenario: &Scenario, seconds: u64, per_attacker: usize) {
    let root = Root::start(n, scenario.flags).await;
    let pid = root.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let tally: Tally = Arc::default();
    let mut flood = Vec::new();
    for a in 0..scenario.attackers {
        let source: IpAddr = if scenario.attackers == 1 {
            "127.0.0.1".parse().unwrap()
        } else {
            format!("127.0.1.{}", a + 1).parse().unwrap()
        };
        for c in 0..per_attacker.div_ceil(scenario.attackers.max(1)).max(1) {
            flood.push(tokio::spawn(attacker(
                source,
                root.addr,
                Arc::clone(&stop),
                Arc::clone(&tally),
                a * 1000 + c,
            )));
        }
    }
    // Let the flood reach its pace (and the limits their steady state) before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tally.lock().unwrap().clone();
    let (cpu0, _) = oakestra_benches::proc_usage(pid);
    let started = Instant::now();
    let legit_source: IpAddr = LEGIT_SOURCE.parse().unwrap();
    let raw = login_request("Admin", ADMIN_PASSWORD, true);
    let mut latencies = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        match request(Some(legit_source), root.addr, &raw).await {
            Ok(200) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
            Ok(status) => *failures.entry(status.to_string()).or_default() += 1,
            Err(e) => *failures.entry(e.kind().to_string()).or_default() += 1,
        }
        if let Some(rest) = LEGIT_PERIOD.checked_sub(t.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    let window = started.elapsed().as_secs_f64();
    let (cpu1, rss) = oakestra_benches::proc_usage(pid);
    let after = tally.lock().unwrap().clone();
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    latencies.sort_by(f64::total_cmp);
    let answers: BTreeMap<u16, u64> = after
        .iter()
        .map(|(status, count)| (*status, count - before.get(status).copied().unwrap_or(0)))
        .filter(|(_, count)| *count > 0)
        .collect();
    let total: u64 = answers.values().sum();
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
    let rate = |count: u64| count as f64 / window;
    let answers_text = if answers.is_empty() {
        "-".to_owned()
    } else {
        answers
            .iter()
            .map(|(status, count)| {
                let status = if *status == 0 {
                    "err".to_owned()
                } else {
                    status.to_string()
                };
                format!("{status}: {:.0}/s", rate(*count))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    #[allow(clippy::cast_precision_loss, reason = "clock ticks")]
    let cpu = cpu1.saturating_sub(cpu0) as f64 / window;
    println!(
        "| {} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {:.1} |",
        scenario.name,
        rate(total),
        answers_text,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        if failures.is_empty() {
            "0".to_owned()
        } else {
            failures
                .iter()
                .map(|(k, v)| format!("{v}× {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        cpu,
        rss as f64 / 1024.0,
    );
}

#[tokio::main]
async fn main() {
    let seconds = env_number("OAKESTRA_BENCH_SECONDS", 10);
    let per_attacker = usize::try_from(env_number("OAKESTRA_BENCH_FLOOD", 64)).unwrap_or(64);
    let chosen: Vec<usize> = std::env::var("OAKESTRA_BENCH_SCENARIOS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| (1..=SCENARIOS.len()).collect());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "login flood against {} ({cores} cores; {seconds} s per scenario; {per_attacker} attacking connections; \
         legitimate login from {LEGIT_SOURCE} every {} ms on a fresh connection)\n",
        root_binary().display(),
        LEGIT_PERIOD.as_millis()
    );
    println!(
        "| scenario | flood answers/s | by status | legit logins | p50 ms | p99 ms | max ms | legit failures | root CPU % | root RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, scenario) in SCENARIOS.iter().enumerate() {
        if chosen.contains(&(n + 1)) {
            run(n + 1, scenario, seconds, per_attacker).await;
        }
    }
}
