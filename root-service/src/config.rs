//! Command-line flags (with environment fallbacks) and the validated [`Config`] built from them.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use oakestra_protocol::sched::Policy;
use oakestra_runtime::server::ServerLimits;

use crate::{Error, hashing::PoolSize, throttle::LoginLimits};

/// Default access-token lifetime: 10 minutes, as Oakestra's token generator uses.
pub const DEFAULT_ACCESS_TTL_SECS: u64 = 600;
/// Default refresh-token lifetime: 30 days, as Oakestra's JWT library defaults to.
pub const DEFAULT_REFRESH_TTL_SECS: u64 = 30 * 24 * 60 * 60;

/// What the command line (and the environment) asks for. Turn it into a [`Config`] with [`Config::from_cli`].
#[derive(Debug, Clone, Parser)]
#[command(
    name = "root-service",
    version,
    about = "the oakestra-rs root orchestrator: user API, auth, root scheduler and service-IP allocation",
    long_about = None,
    after_help = "One listener serves both sides: the user API (/api/auth, /api/application, /api/service, ...) \
                  and the cluster-facing API (/api/cluster/register, /api/information, /api/result/deploy, \
                  /api/net/...). Clusters register with the join token and then use their own per-cluster secret.\n\
                  On first start the user `Admin` (password `Admin` unless --admin-password is given) is created in \
                  organization `root` with all four roles, and a join token is generated into <data-dir>/join.token \
                  unless --join-token is given. The OpenAPI document is at /docs/openapi.json, a docs page at /api/docs."
)]
pub struct Cli {
    /// Address and port the HTTP API (users and clusters) listens on.
    #[arg(
        long,
        env = "OAKESTRA_ROOT_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:10000"
    )]
    pub listen: SocketAddr,

    /// Directory holding the database (`root.db`), the token-signing key (`jwt.key`) and the generated join token
    /// (`join.token`); created if missing. The directory is kept at mode 0700 and the files at 0600 (looser modes
    /// are tightened at start, with a warning).
    #[arg(
        long,
        env = "OAKESTRA_ROOT_DATA_DIR",
        value_name = "DIR",
        default_value = "/var/lib/oakestra/root"
    )]
    pub data_dir: PathBuf,

    /// Sets (or updates) the password of the user `Admin` at start. Without it a new Admin gets the password `Admin`.
    #[arg(
        long,
        env = "OAKESTRA_ADMIN_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub admin_password: Option<String>,

    /// Lifetime of access tokens, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_ACCESS_TTL_SECS)]
    pub access_ttl: u64,

    /// Lifetime of refresh tokens, in seconds (default 30 days).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_REFRESH_TTL_SECS)]
    pub refresh_ttl: u64,

    /// The token clusters present to register (`Authorization: Bearer <token>` on /api/cluster/register), at
    /// least 16 characters. Without it one is generated at first start into `<data-dir>/join.token` and logged.
    #[arg(
        long,
        env = "OAKESTRA_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,

    /// A cluster is active while its last report is younger than this many seconds; instances on a cluster that
    /// stops reporting are rescheduled on other clusters.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_LIVENESS_SECS)]
    pub liveness_window: u64,

    /// How the root scheduler ranks the clusters that fit an instance: `best-fit` (least memory left over),
    /// `spread` (most left over) or `first-fit` (first by name).
    #[arg(long, value_name = "POLICY", default_value = "best-fit")]
    pub scheduler_policy: String,

    /// Seconds between retries of instances no cluster could take (and checks for lost clusters).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_RETRY_SECS)]
    pub retry_interval: u64,

    /// Seconds a client may take to send a request line and headers, counted from their first byte (the first
    /// request of a connection: from the accept). Slower clients are disconnected.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_HEADER_READ_SECS)]
    pub header_read_timeout: u64,

    /// Seconds a client may take to send a request body, counted from the end of its headers. Slower bodies are
    /// answered 400 and the connection is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_BODY_READ_SECS)]
    pub body_read_timeout: u64,

    /// Seconds a keep-alive connection may stay open with no request in flight before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_IDLE_SECS)]
    pub idle_timeout: u64,

    /// Connections served at once; beyond that new connections wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = oakestra_runtime::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Threads hashing passwords (argon2id, 7 MiB of memory each). Default: the number of cores (at most 8).
    #[arg(long, value_name = "N")]
    pub hash_threads: Option<usize>,

    /// Password checks that may wait for a hashing thread (served round-robin across client addresses). When all
    /// are taken, a new check pushes out one of an address with more recent failed checks, or is answered 503 with
    /// Retry-After; it never waits for a place.
    #[arg(long, value_name = "N", default_value_t = crate::hashing::DEFAULT_QUEUE)]
    pub hash_queue: usize,

    /// Password checks one client address (IPv6: its /64) may have waiting or running; more are answered 429 with
    /// Retry-After, so one flooding address cannot make other clients wait.
    #[arg(long, value_name = "N", default_value_t = crate::hashing::DEFAULT_PER_ADDRESS)]
    pub hash_per_address: usize,

    /// Failed logins a minute one client address (IPv6: its /64) may have, for any user names; then its logins
    /// are answered 429 with Retry-After. Successful logins are never counted.
    #[arg(long, value_name = "N", default_value_t = LoginLimits::default().per_address)]
    pub login_failures_per_address: u32,

    /// Failed logins a minute for one user name from one client address.
    #[arg(long, value_name = "N", default_value_t = LoginLimits::default().per_user_address)]
    pub login_failures_per_user_address: u32,

    /// Failed logins a minute for one user name from all addresses; beyond it, only addresses that failed for
    /// that user recently are refused (the user's own address is not locked out).
    #[arg(long, value_name = "N", default_value_t = LoginLimits::default().per_user)]
    pub login_failures_per_user: u32,

    /// Browser origins allowed to call the API (CORS): `*` (any, the reference's default) or a comma-separated list
    /// of `http(s)://host[:port]`, e.g. the dashboard's `http://localhost:4200`.
    #[arg(long, value_name = "ORIGINS", env = "OAK_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,

    /// The bearer token Prometheus presents to `GET /metrics`. Default: generated once into
    /// `<data-dir>/metrics.token` (point Prometheus' `authorization.credentials_file` at it).
    #[arg(long, value_name = "TOKEN", env = "OAK_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// The addons engine.
    #[command(flatten)]
    pub addons: oakestra_addons::settings::AddonsFlags,
}

/// Default `--header-read-timeout`.
pub const DEFAULT_HEADER_READ_SECS: u64 = 10;
/// Default `--idle-timeout`.
pub const DEFAULT_IDLE_SECS: u64 = 60;
/// Default `--body-read-timeout`.
pub const DEFAULT_BODY_READ_SECS: u64 = oakestra_runtime::server::DEFAULT_BODY_READ_TIMEOUT.as_secs();

/// Default liveness window: 30 s, the reference's (two cluster report intervals).
pub const DEFAULT_LIVENESS_SECS: u64 = 30;
/// Default retry interval for unplaced instances: one cluster report interval.
pub const DEFAULT_RETRY_SECS: u64 = 15;

/// The validated configuration of a running root service.
#[derive(Clone)]
pub struct Config {
    /// Where the user API listens.
    pub listen: SocketAddr,
    /// Where the database and the signing key live.
    pub data_dir: PathBuf,
    /// The Admin password to set at start, if any.
    pub admin_password: Option<String>,
    /// Access-token lifetime.
    pub access_ttl: Duration,
    /// Refresh-token lifetime.
    pub refresh_ttl: Duration,
    /// The cluster join token, if set on the command line (else read or created in the data directory).
    pub join_token: Option<String>,
    /// Cluster liveness window.
    pub liveness_window: Duration,
    /// Root scheduling policy.
    pub scheduler_policy: Policy,
    /// Retry interval for unplaced instances.
    pub retry_interval: Duration,
    /// Header-read and idle timeouts and the connection cap of the HTTP listener.
    pub http: ServerLimits,
    /// The password-hashing pool.
    pub hashing: PoolSize,
    /// Failed-login limits.
    pub login: LoginLimits,
    /// The addons engine.
    pub addons: AddonsSettings,
    /// Browser origins allowed to call the API.
    pub cors: crate::origins::Origins,
    /// The metrics token, if given (else read or generated in the data directory).
    pub metrics_token: Option<String>,
}

pub use oakestra_addons::settings::AddonsSettings;

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("join_token", &self.join_token.as_ref().map(|_| "<redacted>"))
            .field("liveness_window", &self.liveness_window)
            .field("scheduler_policy", &self.scheduler_policy)
            .field("retry_interval", &self.retry_interval)
            .field("http", &self.http)
            .field("hashing", &self.hashing)
            .field("login", &self.login)
            .field("addons", &self.addons)
            .field("cors", &self.cors)
            .finish()
    }
}

/// Longest token lifetime accepted: ten years (keeps `exp` far away from any overflow).
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 60 * 60;

impl Config {
    /// A configuration with the defaults, rooted at `data_dir` and listening on `listen` (handy for tests).
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            admin_password: None,
            access_ttl: Duration::from_secs(DEFAULT_ACCESS_TTL_SECS),
            refresh_ttl: Duration::from_secs(DEFAULT_REFRESH_TTL_SECS),
            join_token: None,
            liveness_window: Duration::from_secs(DEFAULT_LIVENESS_SECS),
            scheduler_policy: Policy::BestFit,
            retry_interval: Duration::from_secs(DEFAULT_RETRY_SECS),
            http: ServerLimits {
                header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_SECS),
                idle_timeout: Duration::from_secs(DEFAULT_IDLE_SECS),
                body_read_timeout: Duration::from_secs(DEFAULT_BODY_READ_SECS),
                ..ServerLimits::default()
            },
            hashing: PoolSize::default(),
            login: LoginLimits::default(),
            addons: AddonsSettings::default(),
            cors: crate::origins::Origins::Any,
            metrics_token: None,
        }
    }

    /// Validates the flags. Each error names the flag, the offending value and the rule.
    pub fn from_cli(cli: Cli) -> Result<Self, Error> {
        let invalid = |flag: &'static str, value: String, rule: &'static str| Error::InvalidConfig {
            flag,
            value,
            rule,
        };
        if cli.data_dir.as_os_str().is_empty() {
            return Err(invalid("--data-dir", String::new(), "must not be empty"));
        }
        if let Some(pw) = &cli.admin_password {
            if pw.is_empty() {
                return Err(invalid("--admin-password", String::new(), "must not be empty"));
            }
            if pw.len() > 1024 {
                return Err(invalid(
                    "--admin-password",
                    "<redacted>".into(),
                    "must be at most 1024 bytes",
                ));
            }
        }
        for (flag, value) in [
            ("--access-ttl", cli.access_ttl),
            ("--refresh-ttl", cli.refresh_ttl),
        ] {
            if value == 0 || value > MAX_TTL_SECS {
                return Err(invalid(
                    flag,
                    value.to_string(),
                    "must be between 1 and 315360000 seconds (10 years)",
                ));
            }
        }
        if let Some(token) = &cli.join_token
            && (token.len() < 16 || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "--join-token",
                "<redacted>".into(),
                "must be 16 to 256 printable ASCII characters without spaces",
            ));
        }
        for (flag, value) in [
            ("--liveness-window", cli.liveness_window),
            ("--retry-interval", cli.retry_interval),
        ] {
            if value == 0 || value > 86_400 {
                return Err(invalid(
                    flag,
                    value.to_string(),
                    "must be between 1 and 86400 seconds",
                ));
            }
        }
        for (flag, value) in [
            ("--header-read-timeout", cli.header_read_timeout),
            ("--idle-timeout", cli.idle_timeout),
            ("--body-read-timeout", cli.body_read_timeout),
        ] {
            if value == 0 || value > 3600 {
                return Err(invalid(
                    flag,
                    value.to_string(),
                    "must be between 1 and 3600 seconds",
                ));
            }
        }
        if cli.max_connections == 0 || cli.max_connections > 65_536 {
            return Err(invalid(
                "--max-connections",
                cli.max_connections.to_string(),
                "must be between 1 and 65536",
            ));
        }
        let mut hashing = PoolSize::default();
        for (flag, value, max, rule, slot) in [
            (
                "--hash-threads",
                cli.hash_threads,
                64,
                "must be between 1 and 64",
                &mut hashing.threads,
            ),
            (
                "--hash-queue",
                Some(cli.hash_queue),
                4096,
                "must be between 1 and 4096",
                &mut hashing.queue,
            ),
            (
                "--hash-per-address",
                Some(cli.hash_per_address),
                4096,
                "must be between 1 and 4096",
                &mut hashing.per_address,
            ),
        ] {
            match value {
                Some(n) if n == 0 || n > max => return Err(invalid(flag, n.to_string(), rule)),
                Some(n) => *slot = n,
                None => {}
            }
        }
        for (flag, value) in [
            ("--login-failures-per-address", cli.login_failures_per_address),
            (
                "--login-failures-per-user-address",
                cli.login_failures_per_user_address,
            ),
            ("--login-failures-per-user", cli.login_failures_per_user),
        ] {
            if value == 0 || value > 1_000_000 {
                return Err(invalid(flag, value.to_string(), "must be between 1 and 1000000"));
            }
        }
        let cors = crate::origins::Origins::parse(&cli.cors_origins).map_err(|rule| Error::InvalidCors {
            value: cli.cors_origins.clone(),
            rule,
        })?;
        let addons = cli
            .addons
            .validate()
            .map_err(|(flag, value, rule)| invalid(flag, value, rule))?;
        if addons.reference_ports {
            tracing::warn!(
                "--addons-reference-ports: the marketplace also listens on 0.0.0.0:11102 and the addons manager on 0.0.0.0:11101 (same credentials)"
            );
        }
        let scheduler_policy = cli.scheduler_policy.parse::<Policy>().map_err(|_| {
            invalid(
                "--scheduler-policy",
                cli.scheduler_policy.clone(),
                "must be best-fit, spread or first-fit",
            )
        })?;
        Ok(Self {
            listen: cli.listen,
            data_dir: cli.data_dir,
            admin_password: cli.admin_password,
            access_ttl: Duration::from_secs(cli.access_ttl),
            refresh_ttl: Duration::from_secs(cli.refresh_ttl),
            join_token: cli.join_token,
            liveness_window: Duration::from_secs(cli.liveness_window),
            scheduler_policy,
            retry_interval: Duration::from_secs(cli.retry_interval),
            http: ServerLimits {
                header_read_timeout: Duration::from_secs(cli.header_read_timeout),
                idle_timeout: Duration::from_secs(cli.idle_timeout),
                max_connections: cli.max_connections,
                body_read_timeout: Duration::from_secs(cli.body_read_timeout),
            },
            hashing,
            login: LoginLimits {
                per_address: cli.login_failures_per_address,
                per_user_address: cli.login_failures_per_user_address,
                per_user: cli.login_failures_per_user,
            },
            addons,
            cors,
            metrics_token: cli.metrics_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(std::iter::once("root-service").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:10000");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/oakestra/root"));
        assert_eq!(c.access_ttl, Duration::from_secs(600));
        assert_eq!(c.refresh_ttl, Duration::from_secs(2_592_000));
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.max_connections, 1024);
        assert_eq!((c.hashing.queue, c.hashing.per_address), (32, 4));
        assert_eq!(c.login, LoginLimits::default());
        let c = parse(&["--login-failures-per-address", "7"]).unwrap();
        assert_eq!(c.login.per_address, 7);
        assert!((1..=8).contains(&c.hashing.threads));
        let c = parse(&[
            "--hash-threads",
            "3",
            "--hash-queue",
            "5",
            "--hash-per-address",
            "2",
        ])
        .unwrap();
        assert_eq!(
            c.hashing,
            PoolSize {
                threads: 3,
                queue: 5,
                per_address: 2
            }
        );
        let c = parse(&[
            "--header-read-timeout",
            "3",
            "--idle-timeout",
            "7",
            "--max-connections",
            "9",
        ])
        .unwrap();
        assert_eq!(
            (
                c.http.header_read_timeout,
                c.http.idle_timeout,
                c.http.max_connections
            ),
            (Duration::from_secs(3), Duration::from_secs(7), 9)
        );
    }

    #[test]
    fn errors_name_flag_and_value() {
        let e = parse(&["--listen", "nonsense"]).unwrap_err();
        assert!(e.contains("--listen") && e.contains("nonsense"), "{e}");
        let e = parse(&["--access-ttl", "0"]).unwrap_err();
        assert!(e.contains("--access-ttl") && e.contains('0'), "{e}");
        let e = parse(&["--admin-password", ""]).unwrap_err();
        assert!(e.contains("--admin-password"), "{e}");
        let e = parse(&["--scheduler-policy", "random"]).unwrap_err();
        assert!(e.contains("--scheduler-policy") && e.contains("random"), "{e}");
        let e = parse(&["--join-token", "short"]).unwrap_err();
        assert!(e.contains("--join-token") && !e.contains("short"), "{e}");
        let e = parse(&["--liveness-window", "0"]).unwrap_err();
        assert!(e.contains("--liveness-window"), "{e}");
        let e = parse(&["--header-read-timeout", "0"]).unwrap_err();
        assert!(e.contains("--header-read-timeout") && e.contains('0'), "{e}");
        let e = parse(&["--idle-timeout", "100000"]).unwrap_err();
        assert!(e.contains("--idle-timeout") && e.contains("100000"), "{e}");
        let e = parse(&["--max-connections", "0"]).unwrap_err();
        assert!(e.contains("--max-connections"), "{e}");
        let e = parse(&["--hash-threads", "65"]).unwrap_err();
        assert!(e.contains("--hash-threads") && e.contains("65"), "{e}");
        let e = parse(&["--hash-queue", "0"]).unwrap_err();
        assert!(e.contains("--hash-queue"), "{e}");
        let e = parse(&["--login-failures-per-user", "0"]).unwrap_err();
        assert!(e.contains("--login-failures-per-user"), "{e}");
    }

    #[test]
    fn debug_hides_the_password() {
        let c = parse(&["--admin-password", "s3cret"]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
