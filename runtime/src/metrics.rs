//! Prometheus metrics every daemon shares (feature `metrics`): the process collector (resident memory, CPU time,
//! threads, open files, read from `/proc/self` at each scrape), the text exposition of a registry, counters that
//! mirror totals kept elsewhere ([`Mirror`]), an MQTT client's connection and message counts ([`MqttCounters`]),
//! and (with feature `server` too) the token-protected `/metrics` listener of the worker daemons ([`endpoint`]).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

pub use prometheus_client;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// A label set with one `status` label (an instance status as Oakestra spells it).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status.
    pub status: String,
}

/// A label set with one `state` label (`active`/`inactive`, `alive`/`dead`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: String,
}

/// A label set with one `outcome` label (`placed` or `refused`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: String,
}

impl OutcomeLabel {
    /// `placed` or `refused`.
    pub fn of(placed: bool) -> Self {
        Self {
            outcome: if placed { "placed" } else { "refused" }.into(),
        }
    }
}

/// Sets `family` to exactly the counts in `rows`, dropping series `rows` no longer has: the numbers a daemon counts
/// at each scrape (instances by status, workers by liveness).
pub fn set_counts<L>(family: &Family<L, Gauge>, rows: impl IntoIterator<Item = (L, usize)>)
where
    L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    family.clear();
    for (labels, n) in rows {
        family
            .get_or_create(&labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// A label set with one `slot` label (a plugin slot's name).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabel {
    /// The slot.
    pub slot: String,
}

/// A label set with one `direction` label (`in` or `out`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// The direction.
    pub direction: String,
}

/// A label set with a `path` and a `direction` label (a dataplane path and `egress`/`ingress`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathDirectionLabel {
    /// The path.
    pub path: String,
    /// The direction.
    pub direction: String,
}

/// A label set with one `path` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// The path.
    pub path: String,
}

/// A label set with one `phase` label (an instance's phase on a worker: `deploying`, `running`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// The phase.
    pub phase: String,
}

/// A label set with one `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// Counters whose totals are kept elsewhere (atomics on a hot path, a BPF map): [`Mirror::observe`] at scrape time
/// adds what a total grew by since the highest total seen, so the exposed series is a true counter. A lower total
/// (a failed read that came back as 0) adds nothing, so nothing is ever counted twice.
#[derive(Debug)]
pub struct Mirror<L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static> {
    family: Family<L, Counter>,
    seen: Mutex<HashMap<L, u64>>,
}

impl<L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static> Default for Mirror<L> {
    fn default() -> Self {
        Self {
            family: Family::default(),
            seen: Mutex::default(),
        }
    }
}

impl<L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static> Mirror<L> {
    /// Registers the counter family as `name` (the exposition adds `_total`).
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }

    /// Brings the series `labels` up to `total`.
    pub fn observe(&self, labels: &L, total: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let highest = seen.entry(labels.clone()).or_insert(0);
        let grew = total.saturating_sub(*highest);
        *highest = (*highest).max(total);
        // Create the series even at 0, so a scrape shows every documented series from the start.
        self.family.get_or_create(labels).inc_by(grew);
    }
}

/// One unlabelled counter whose total is kept elsewhere: [`Mirror`] without labels.
#[derive(Debug, Default)]
pub struct MirrorCounter {
    counter: Counter,
    seen: Mutex<u64>,
}

impl MirrorCounter {
    /// Registers the counter as `name` (the exposition adds `_total`).
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.counter.clone());
    }

    /// Brings the counter up to `total` (a lower total adds nothing).
    pub fn observe(&self, total: u64) {
        let mut highest = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        self.counter.inc_by(total.saturating_sub(*highest));
        *highest = (*highest).max(total);
    }
}

/// The metrics of a daemon's MQTT session with its cluster, mirrored from [`MqttCounters`] at each scrape:
/// `<prefix>_mqtt_connected`, `<prefix>_mqtt_connections_total`, `<prefix>_mqtt_reconnects_total` and
/// `<prefix>_mqtt_messages_total{direction}`.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    connected: Gauge,
    connections: MirrorCounter,
    reconnects: MirrorCounter,
    messages: Mirror<DirectionLabel>,
}

impl MqttMetrics {
    /// Registers the four metrics as `<prefix>_mqtt_…` (e.g. `oakestra_worker`).
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let me = Self::default();
        registry.register(
            format!("{prefix}_mqtt_connected"),
            "1 while the MQTT session with the cluster broker is up",
            me.connected.clone(),
        );
        me.connections.register(
            registry,
            &format!("{prefix}_mqtt_connections"),
            "Successful connections to the cluster broker",
        );
        me.reconnects.register(
            registry,
            &format!("{prefix}_mqtt_reconnects"),
            "Connections to the cluster broker after the first",
        );
        me.messages.register(
            registry,
            &format!("{prefix}_mqtt_messages"),
            "MQTT PUBLISH packets, by direction (in, out)",
        );
        me
    }

    /// Takes a reading: whether the session is up now, and its counters.
    pub fn observe(&self, connected: bool, counters: &MqttCounters) {
        self.connected.set(i64::from(connected));
        self.connections.observe(counters.connects());
        self.reconnects.observe(counters.reconnects());
        for (direction, count) in [("in", counters.messages_in()), ("out", counters.messages_out())] {
            self.messages.observe(
                &DirectionLabel {
                    direction: direction.into(),
                },
                count,
            );
        }
    }
}

/// An MQTT client's connection and message counts (cheap atomics the client's event loop bumps).
#[derive(Debug, Default)]
pub struct MqttCounters {
    connects: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
}

impl MqttCounters {
    /// A successful CONNACK.
    pub fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// A PUBLISH received.
    pub fn message_in(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A PUBLISH sent.
    pub fn message_out(&self) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful connections so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Connections after the first: how often the session had to come back.
    pub fn reconnects(&self) -> u64 {
        self.connects().saturating_sub(1)
    }

    /// PUBLISH packets received.
    pub fn messages_in(&self) -> u64 {
        self.messages_in.load(Ordering::Relaxed)
    }

    /// PUBLISH packets sent.
    pub fn messages_out(&self) -> u64 {
        self.messages_out.load(Ordering::Relaxed)
    }
}

/// The value of sample `series` (its name with its labels, exactly as exposed) in an exposition `text`, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Linux reports CPU times in /proc in USER_HZ, which is 100 on every architecture it exposes to user space.
const USER_HZ: f64 = 100.0;

/// The process's own resource use.
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    rss: Gauge,
    cpu: Counter<f64, AtomicU64>,
    threads: Gauge,
    fds: Gauge,
    /// CPU seconds already counted.
    counted: Mutex<f64>,
}

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessSample {
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// User + system CPU time in seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
}

/// Reads `/proc/self/status`, `/proc/self/stat` and `/proc/self/fd`; missing pieces read as 0.
pub fn process_sample() -> ProcessSample {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state field.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    #[allow(
        clippy::cast_precision_loss,
        reason = "CPU seconds as a float, as Prometheus wants them"
    )]
    let cpu_seconds = (ticks(11) + ticks(12)) as f64 / USER_HZ;
    ProcessSample {
        rss_bytes: field("VmRSS:").saturating_mul(1024),
        cpu_seconds,
        threads: field("Threads:"),
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
    }
}

impl ProcessMetrics {
    /// Registers the `process_*` metrics in `registry`.
    pub fn register(registry: &mut Registry) -> std::sync::Arc<Self> {
        let me = std::sync::Arc::new(Self::default());
        registry.register("process_resident_memory_bytes", "Resident memory", me.rss.clone());
        registry.register("process_cpu_seconds", "User and system CPU time", me.cpu.clone());
        registry.register("process_threads", "Threads", me.threads.clone());
        registry.register("process_open_fds", "Open file descriptors", me.fds.clone());
        me
    }

    /// Takes a new reading (call before encoding).
    pub fn update(&self) {
        let s = process_sample();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.rss.set(gauge(s.rss_bytes));
        self.threads.set(gauge(s.threads));
        self.fds.set(gauge(s.open_fds));
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if s.cpu_seconds > *counted {
            self.cpu.inc_by(s.cpu_seconds - *counted);
            *counted = s.cpu_seconds;
        }
    }
}

/// The registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The opt-in `/metrics` listener of the worker daemons (NodeEngine, NetManager): `GET /metrics` with
/// `Authorization: Bearer <token>`, everything else 404, behind the shared listener's limits.
#[cfg(feature = "server")]
pub mod endpoint {
    use std::{path::Path, sync::Arc};

    use axum::{
        Router,
        http::{HeaderMap, StatusCode, header},
        response::{IntoResponse, Response},
        routing::get,
    };

    /// Shortest token accepted.
    pub const MIN_TOKEN_LEN: usize = 16;

    /// Whether a request to `GET /metrics` presents `token` (an empty `token` admits nobody): the one check of every
    /// daemon's metrics, the worker listener's and root's and the cluster's routes alike.
    pub fn allowed(headers: &HeaderMap, token: &str) -> bool {
        !token.is_empty()
            && crate::server::bearer(headers)
                .is_some_and(|t| oakestra_protocol::bearer::same_secret(t, token))
    }

    /// Why a token file cannot be used.
    #[derive(Debug, thiserror::Error)]
    pub enum TokenError {
        /// The file cannot be read.
        #[error("metrics token file {path}: {source}")]
        Read {
            /// The file.
            path: String,
            /// The error.
            source: std::io::Error,
        },
        /// The file holds too short a token.
        #[error(
            "metrics token file {path}: the token has {len} characters, at least {MIN_TOKEN_LEN} are needed"
        )]
        TooShort {
            /// The file.
            path: String,
            /// Its length.
            len: usize,
        },
    }

    /// Reads the bearer token from `path` (surrounding whitespace ignored; at least [`MIN_TOKEN_LEN`] characters).
    pub fn read_token(path: &Path) -> Result<String, TokenError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: shown.clone(),
            source,
        })?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort {
                path: shown,
                len: token.len(),
            });
        }
        Ok(token.to_owned())
    }

    /// The router: `GET /metrics` answers what `render` gives to the bearer of `token`, 401 to anyone else.
    pub fn router<F, Fut>(token: Arc<str>, render: F) -> Router
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = String> + Send + 'static,
    {
        let handler = move |headers: HeaderMap| {
            let (token, render) = (Arc::clone(&token), render.clone());
            async move {
                if !allowed(&headers, &token) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        "GET /metrics needs Authorization: Bearer <the metrics token>\n",
                    )
                        .into_response();
                }
                let body = render().await;
                Response::builder()
                    .header(header::CONTENT_TYPE, super::CONTENT_TYPE)
                    .body(axum::body::Body::from(body))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
        };
        Router::new()
            .route("/metrics", get(handler))
            .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
    }

    #[cfg(test)]
    mod tests {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use super::*;

        /// One request with `auth` as the Authorization header (if any); the status and the body.
        async fn get(addr: std::net::SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let header = auth
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
            (status, raw.split_once("\r\n\r\n").unwrap().1.to_owned())
        }

        #[tokio::test]
        async fn only_the_token_reads_the_metrics() {
            let token = "0123456789abcdef0123";
            let router = router(token.into(), || async { "m_total 1\n# EOF\n".to_owned() });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router).await });
            for auth in [
                None,
                Some("Bearer wrong-token-0123456789"),
                Some("Basic 0123456789abcdef0123"),
                Some("Bearer 0123456789abcdef012"),
            ] {
                let (status, body) = get(addr, "/metrics", auth).await;
                assert_eq!(status, 401, "{auth:?}: {body}");
                assert!(!body.contains("m_total"), "{auth:?}: {body}");
            }
            // The scheme is case-insensitive (RFC 7235), as on root's and the cluster's /metrics.
            for auth in ["Bearer 0123456789abcdef0123", "bearer 0123456789abcdef0123"] {
                let (status, body) = get(addr, "/metrics", Some(auth)).await;
                assert_eq!((status, body.as_str()), (200, "m_total 1\n# EOF\n"), "{auth}");
            }
            let (status, _) = get(addr, "/other", Some("Bearer 0123456789abcdef0123")).await;
            assert_eq!(status, 404);
        }

        #[test]
        fn token_files_are_read_and_checked() {
            let dir = std::env::temp_dir().join(format!("oak-metrics-token-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("t");
            std::fs::write(&path, "  0123456789abcdef0123\n").unwrap();
            assert_eq!(read_token(&path).unwrap(), "0123456789abcdef0123");
            std::fs::write(&path, "short\n").unwrap();
            assert!(matches!(
                read_token(&path),
                Err(TokenError::TooShort { len: 5, .. })
            ));
            assert!(matches!(
                read_token(&dir.join("missing")),
                Err(TokenError::Read { .. })
            ));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_follow_totals_and_never_count_twice() {
        let mut registry = Registry::default();
        let mirror: Mirror<PathLabel> = Mirror::default();
        mirror.register(&mut registry, "t_packets", "test");
        let proxy = PathLabel { path: "proxy".into() };
        mirror.observe(&proxy, 0);
        assert_eq!(
            sample(&render(&registry), "t_packets_total{path=\"proxy\"}"),
            Some(0.0)
        );
        mirror.observe(&proxy, 10);
        mirror.observe(&proxy, 15);
        assert_eq!(
            sample(&render(&registry), "t_packets_total{path=\"proxy\"}"),
            Some(15.0)
        );
        // A failed read comes back as a lower total: nothing is added, the next good read adds only the growth.
        mirror.observe(&proxy, 0);
        assert_eq!(
            sample(&render(&registry), "t_packets_total{path=\"proxy\"}"),
            Some(15.0)
        );
        mirror.observe(&proxy, 20);
        assert_eq!(
            sample(&render(&registry), "t_packets_total{path=\"proxy\"}"),
            Some(20.0)
        );
    }

    #[test]
    fn mqtt_reconnects_are_connects_after_the_first() {
        let c = MqttCounters::default();
        assert_eq!(c.reconnects(), 0);
        c.connected();
        assert_eq!(c.reconnects(), 0);
        c.connected();
        c.connected();
        c.message_in();
        c.message_out();
        c.message_out();
        assert_eq!(
            (c.connects(), c.reconnects(), c.messages_in(), c.messages_out()),
            (3, 2, 1, 2)
        );
    }

    #[test]
    fn the_process_reads_itself() {
        let s = process_sample();
        assert!(s.rss_bytes > 1024 * 1024, "{s:?}");
        assert!(s.threads >= 1 && s.open_fds >= 3, "{s:?}");
        let mut registry = Registry::default();
        let m = ProcessMetrics::register(&mut registry);
        m.update();
        let text = render(&registry);
        for name in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_threads ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
