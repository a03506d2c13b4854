//! Command-line flags (with environment fallbacks) and the validated [`Config`] built from them.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use oakestra_protocol::sched::Policy;

use crate::{Error, broker::BrokerConfig, state::Timing};

/// What the command line (and the environment) asks for. Turn it into a [`Config`] with [`Config::from_cli`].
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cluster-service",
    version,
    about = "the oakestra-rs cluster orchestrator: cluster manager, MQTT broker, cluster scheduler and network service",
    long_about = None,
    after_help = "One HTTP listener (--listen, default :10100) serves workers (POST /api/node/register), root \
                  (POST/DELETE /api/service/<job>/<n>, POST /api/net/job/update) and operators \
                  (GET /api/cluster/status). Workers talk MQTT to the embedded broker on --mqtt-listen (default \
                  :10003) or to the external broker of --mqtt-url; each worker gets its own MQTT secret at \
                  registration (user <node id> for NetManager, <node id>-ne for NodeEngine).\n\
                  The cluster registers with root using the join token (root prints it and keeps it in \
                  <root data-dir>/join.token) and keeps its id across restarts in <data-dir>/cluster.db.\n\
                  Durations are in seconds and may have fractions (0.5)."
)]
pub struct Cli {
    /// The cluster's name at root (unique per root; the same name always gets the same cluster id).
    #[arg(long, env = "CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: String,

    /// Free-text location, or `LAT,LON,RADIUS_M` as the reference dashboards read it.
    #[arg(long, env = "CLUSTER_LOCATION", value_name = "TEXT", default_value = "")]
    pub cluster_location: String,

    /// Root's API: `http://host:port`, or a bare host (then port 10000).
    #[arg(
        long,
        env = "OAKESTRA_ROOT_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:10000"
    )]
    pub root_url: String,

    /// The join token root hands out (see root-service --help).
    #[arg(
        long,
        env = "OAKESTRA_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,

    /// A file holding the join token (e.g. root's `<data-dir>/join.token` on a 1-DOC machine).
    #[arg(long, env = "OAKESTRA_JOIN_TOKEN_FILE", value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,

    /// Address and port of the HTTP API (workers, root, operators).
    #[arg(
        long,
        env = "OAKESTRA_CLUSTER_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:10100"
    )]
    pub listen: SocketAddr,

    /// The address root uses to call this cluster. Without it root uses the address the registration came from.
    #[arg(long, env = "OAKESTRA_CLUSTER_ADVERTISE", value_name = "HOST")]
    pub advertise_address: Option<String>,

    /// Directory of the database (`cluster.db`); created if missing.
    #[arg(
        long,
        env = "OAKESTRA_CLUSTER_DATA_DIR",
        value_name = "DIR",
        default_value = "/var/lib/oakestra/cluster"
    )]
    pub data_dir: PathBuf,

    /// Seconds between reports to root (a status change also sends one at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0)]
    pub report_interval: f64,

    /// Where the embedded MQTT broker listens (ignored with --mqtt-url).
    #[arg(
        long,
        env = "OAKESTRA_MQTT_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:10003"
    )]
    pub mqtt_listen: SocketAddr,

    /// Use this external broker (e.g. Mosquitto) instead of the embedded one: `mqtt://host:port`.
    #[arg(long, env = "OAKESTRA_MQTT_URL", value_name = "URL")]
    pub mqtt_url: Option<String>,

    /// With --mqtt-url: the Mosquitto `password_file` this service writes (one user per worker program).
    #[arg(long, value_name = "FILE", requires = "mqtt_url")]
    pub mqtt_password_file: Option<PathBuf>,

    /// With --mqtt-url: the Mosquitto `acl_file` this service writes (each worker may only use nodes/<id>/#).
    #[arg(long, value_name = "FILE", requires = "mqtt_url")]
    pub mqtt_acl_file: Option<PathBuf>,

    /// With --mqtt-url: a shell command run after the files change, e.g. `kill -HUP $(cat /run/mosquitto.pid)`.
    #[arg(long, value_name = "COMMAND", requires = "mqtt_url")]
    pub mqtt_reload_command: Option<String>,

    /// Let registered workers connect to the embedded broker without credentials, as reference (Go) NodeEngines
    /// and NetManagers do (they are identified by client id `<node id>` / `<node id>-ne`; the topic ACLs still
    /// apply). Off by default: every worker then needs the secret it got at registration. A compatibility door,
    /// logged loudly at start.
    #[arg(long)]
    pub mqtt_allow_anonymous: bool,

    /// Most MQTT connections the embedded broker holds at once (each worker uses two); more are closed at once.
    #[arg(
        long,
        env = "OAKESTRA_MQTT_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 50_000
    )]
    pub mqtt_max_connections: usize,

    /// The token workers must present to join (`Authorization: Bearer <token>` on POST /api/node/register; the
    /// NodeEngine's --join-token). Without it one is generated at the first start, kept in the database and written
    /// to <data-dir>/worker-join.token (mode 0600); with it, that one replaces the stored token.
    #[arg(
        long,
        env = "OAKESTRA_WORKER_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub worker_join_token: Option<String>,

    /// Let any machine that reaches the API register as a worker without the worker join token, as reference
    /// (Go) NodeEngines do. Off by default; a compatibility door, logged loudly at start.
    #[arg(long, env = "OAKESTRA_OPEN_REGISTRATION")]
    pub open_registration: bool,

    /// Seconds a client has to send a request's line and headers (from their first byte), and its first request
    /// after connecting; slower clients are disconnected.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub header_read_timeout: f64,

    /// Seconds a client has to send a request body, from the end of its headers; a slower one is answered 400 and
    /// disconnected.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub body_read_timeout: f64,

    /// Seconds an HTTP connection may stay open with no request in flight.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub idle_timeout: f64,

    /// HTTP connections served at once; more wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_http_connections: usize,

    /// Port handed to workers as MQTT_BROKER_PORT (default: the broker's port).
    #[arg(long, value_name = "PORT")]
    pub mqtt_advertise_port: Option<u16>,

    /// A worker silent for this many seconds is dead and its instances are rescheduled (the reference waits 30).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub worker_timeout: f64,

    /// A worker whose broker connection dropped without a goodbye (its MQTT last will, e.g. the NodeEngine
    /// crashed or was killed) is dead this many seconds later unless it reports again; the worker timeout still
    /// bounds it. Covers a NodeEngine that restarts at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub lost_grace: f64,

    /// Longest wait for a worker to take an instance (REQUESTED, CLUSTER_SCHEDULED) before trying again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub scheduling_deadline: f64,

    /// Longest time from the deploy command to the first resource report (NODE_SCHEDULED, CREATING, CREATED)
    /// before the instance is placed again.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub deploy_deadline: f64,

    /// A running instance missing from its worker's resource reports this long has failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub stale_after: f64,

    /// First pause before restarting a crashed instance; it doubles per crash in a row.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub crash_backoff: f64,

    /// Longest pause before restarting a crash-looping instance.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub crash_backoff_cap: f64,

    /// A worker dead (silent) for this many seconds is forgotten: its record, MQTT credentials and sessions. It
    /// registers anew (with the join token) if it ever comes back.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600.0)]
    pub purge_dead_after: f64,

    /// A worker that registered but never published anything over MQTT for this many seconds is forgotten.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub purge_unconnected_after: f64,

    /// How workers are ranked: `best-fit` (least memory left over), `spread` (most left over) or `first-fit`.
    #[arg(long, value_name = "POLICY", default_value = "best-fit")]
    pub scheduler_policy: String,

    /// The token an operator presents (Authorization: Bearer) to the cluster's addons manager
    /// (/api/v1/addons). Default: generated once into <data-dir>/addons-admin.token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "OAK_CLUSTER_ADDONS_TOKEN",
        hide_env_values = true
    )]
    pub addons_admin_token: Option<String>,

    /// The bearer token Prometheus presents to `GET /metrics`. Default: generated once into
    /// `<data-dir>/metrics.token` (point Prometheus' `authorization.credentials_file` at it).
    #[arg(long, value_name = "TOKEN", env = "OAK_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// The addons engine (cluster-scoped addons, the cluster_scheduler plugin slot).
    #[command(flatten)]
    pub addons: oakestra_addons::settings::AddonsFlags,
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Cluster name.
    pub cluster_name: String,
    /// Cluster location.
    pub cluster_location: String,
    /// `http://host:port` of root, without a trailing slash.
    pub root_url: String,
    /// The join token.
    pub join_token: String,
    /// HTTP listener.
    pub listen: SocketAddr,
    /// Address root should call.
    pub advertise_address: Option<String>,
    /// Database directory.
    pub data_dir: PathBuf,
    /// Report period.
    pub report_interval: Duration,
    /// The broker.
    pub broker: BrokerConfig,
    /// The port workers are told.
    pub mqtt_advertise_port: Option<u16>,
    /// The worker join token given on the command line (else the stored or a generated one).
    pub worker_join_token: Option<String>,
    /// Workers may register without the join token.
    pub open_registration: bool,
    /// The HTTP listener's timeouts and connection cap.
    pub http: oakestra_runtime::server::ServerLimits,
    /// Self-healing clocks.
    pub timing: Timing,
    /// Worker ranking.
    pub scheduler_policy: Policy,
    /// The addons manager's operator token, if given (else read or generated in the data directory).
    pub addons_admin_token: Option<String>,
    /// The metrics token, if given (else read or generated in the data directory).
    pub metrics_token: Option<String>,
    /// The addons engine.
    pub addons: oakestra_addons::settings::AddonsSettings,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("cluster_name", &self.cluster_name)
            .field("cluster_location", &self.cluster_location)
            .field("root_url", &self.root_url)
            .field("join_token", &"<redacted>")
            .field("listen", &self.listen)
            .field("advertise_address", &self.advertise_address)
            .field("data_dir", &self.data_dir)
            .field("report_interval", &self.report_interval)
            .field("broker", &self.broker)
            .field("open_registration", &self.open_registration)
            .field("timing", &self.timing)
            .field("scheduler_policy", &self.scheduler_policy)
            .field("addons", &self.addons)
            .finish_non_exhaustive()
    }
}

/// Longest duration any flag accepts: one day.
const MAX_SECONDS: f64 = 86_400.0;

/// `value` seconds as milliseconds, if it is in (0, 1 day].
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked to be in (0, 86400] first"
)]
fn millis(value: f64) -> Option<u64> {
    (value.is_finite() && value > 0.0 && value <= MAX_SECONDS)
        .then(|| (value * 1000.0).round().max(1.0) as u64)
}

impl Config {
    /// Validates the flags. Each error names the flag, the offending value and the rule.
    pub fn from_cli(cli: Cli) -> Result<Self, Error> {
        let invalid = |flag: &'static str, value: String, rule: &'static str| Error::InvalidConfig {
            flag,
            value,
            rule,
        };
        let name = cli.cluster_name.trim().to_owned();
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "--cluster-name",
                cli.cluster_name.clone(),
                "must be 1 to 64 printable ASCII characters without spaces",
            ));
        }
        let root_url = root_url(&cli.root_url).ok_or_else(|| {
            invalid(
                "--root-url",
                cli.root_url.clone(),
                "must be http://host:port (or a bare host name or address)",
            )
        })?;
        let join_token = match (&cli.join_token, &cli.join_token_file) {
            (Some(token), _) => token.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(invalid(
                    "--join-token",
                    String::new(),
                    "is required (or --join-token-file): root refuses clusters without its join token",
                ));
            }
        };
        if join_token.is_empty()
            || join_token.len() > 256
            || !join_token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "--join-token",
                "<redacted>".into(),
                "must be 1 to 256 printable ASCII characters without spaces",
            ));
        }
        let worker_join_token = cli.worker_join_token.map(|t| t.trim().to_owned());
        if let Some(token) = &worker_join_token
            && (token.len() < 16 || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "--worker-join-token",
                "<redacted>".into(),
                "must be 16 to 256 printable ASCII characters without spaces",
            ));
        }
        if cli.data_dir.as_os_str().is_empty() {
            return Err(invalid("--data-dir", String::new(), "must not be empty"));
        }
        let seconds = |flag: &'static str, value: f64| {
            millis(value).ok_or_else(|| {
                invalid(
                    flag,
                    value.to_string(),
                    "must be more than 0 and at most 86400 seconds",
                )
            })
        };
        let report_interval = Duration::from_millis(seconds("--report-interval", cli.report_interval)?);
        let timing = Timing {
            worker_timeout_ms: seconds("--worker-timeout", cli.worker_timeout)?,
            lost_grace_ms: seconds("--lost-grace", cli.lost_grace)?,
            scheduling_deadline_ms: seconds("--scheduling-deadline", cli.scheduling_deadline)?,
            deploy_deadline_ms: seconds("--deploy-deadline", cli.deploy_deadline)?,
            stale_after_ms: seconds("--stale-after", cli.stale_after)?,
            backoff_base_ms: seconds("--crash-backoff", cli.crash_backoff)?,
            backoff_cap_ms: seconds("--crash-backoff-cap", cli.crash_backoff_cap)?,
            purge_dead_after_ms: seconds("--purge-dead-after", cli.purge_dead_after)?,
            purge_unconnected_after_ms: seconds("--purge-unconnected-after", cli.purge_unconnected_after)?,
            ..Timing::default()
        };
        if timing.backoff_cap_ms < timing.backoff_base_ms {
            return Err(invalid(
                "--crash-backoff-cap",
                cli.crash_backoff_cap.to_string(),
                "must not be smaller than --crash-backoff",
            ));
        }
        let scheduler_policy = cli.scheduler_policy.parse::<Policy>().map_err(|_| {
            invalid(
                "--scheduler-policy",
                cli.scheduler_policy.clone(),
                "must be best-fit, spread or first-fit",
            )
        })?;
        let broker = match &cli.mqtt_url {
            Some(url) => {
                let (host, port) = mqtt_url(url).ok_or_else(|| {
                    invalid(
                        "--mqtt-url",
                        url.clone(),
                        "must be mqtt://host:port (tcp://host:port also accepted)",
                    )
                })?;
                if cli.mqtt_allow_anonymous {
                    return Err(invalid(
                        "--mqtt-allow-anonymous",
                        "true".into(),
                        "only applies to the embedded broker; configure the external broker itself",
                    ));
                }
                BrokerConfig::External {
                    host,
                    port,
                    password_file: cli.mqtt_password_file,
                    acl_file: cli.mqtt_acl_file,
                    reload_command: cli.mqtt_reload_command,
                }
            }
            None => {
                if cli.mqtt_max_connections == 0 {
                    return Err(invalid(
                        "--mqtt-max-connections",
                        "0".into(),
                        "must be at least 1 (two per worker, plus slack)",
                    ));
                }
                BrokerConfig::Embedded {
                    listen: cli.mqtt_listen,
                    allow_anonymous: cli.mqtt_allow_anonymous,
                    max_connections: cli.mqtt_max_connections,
                }
            }
        };
        if cli.max_http_connections == 0 {
            return Err(invalid(
                "--max-http-connections",
                "0".into(),
                "must be at least 1",
            ));
        }
        let http = oakestra_runtime::server::ServerLimits {
            header_read_timeout: Duration::from_millis(seconds(
                "--header-read-timeout",
                cli.header_read_timeout,
            )?),
            idle_timeout: Duration::from_millis(seconds("--idle-timeout", cli.idle_timeout)?),
            max_connections: cli.max_http_connections,
            body_read_timeout: Duration::from_millis(seconds("--body-read-timeout", cli.body_read_timeout)?),
        };
        let advertise_address = cli
            .advertise_address
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty());
        if let Some(t) = &cli.addons_admin_token
            && (t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "--addons-admin-token",
                "<redacted>".into(),
                "must be 16 to 256 printable ASCII characters",
            ));
        }
        let addons = cli
            .addons
            .validate()
            .map_err(|(flag, value, rule)| invalid(flag, value, rule))?;
        Ok(Self {
            addons_admin_token: cli.addons_admin_token,
            metrics_token: cli.metrics_token,
            addons,
            cluster_name: name,
            cluster_location: cli.cluster_location,
            root_url,
            join_token,
            listen: cli.listen,
            advertise_address,
            data_dir: cli.data_dir,
            report_interval,
            broker,
            mqtt_advertise_port: cli.mqtt_advertise_port,
            worker_join_token,
            open_registration: cli.open_registration,
            http,
            timing,
            scheduler_policy,
        })
    }
}

/// `http://host:port` from a URL or bare host; `None` if it is not plain HTTP.
fn root_url(text: &str) -> Option<String> {
    let text = text.trim().trim_end_matches('/');
    let rest = match text.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return None,
        None => text,
    };
    if rest.is_empty() || rest.contains('/') || rest.chars().any(char::is_whitespace) {
        return None;
    }
    let has_port = match rest.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    Some(if has_port {
        format!("http://{rest}")
    } else if rest.contains(':') && !rest.starts_with('[') {
        format!("http://[{rest}]:10000")
    } else {
        format!("http://{rest}:10000")
    })
}

/// (host, port) of `mqtt://host:port`; the port defaults to 1883.
fn mqtt_url(text: &str) -> Option<(String, u16)> {
    let text = text.trim().trim_end_matches('/');
    let rest = match text.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => rest,
        Some(_) => return None,
        None => text,
    };
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.ends_with(':') => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Some((host.to_owned(), port.parse().ok()?))
        }
        _ => Some((rest.to_owned(), 1883)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec![
            "cluster-service",
            "--cluster-name",
            "c1",
            "--join-token",
            "0123456789abcdef",
        ];
        all.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(all).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.port(), 10100);
        assert_eq!(c.root_url, "http://127.0.0.1:10000");
        assert_eq!(c.report_interval, Duration::from_secs(15));
        assert_eq!(c.timing.worker_timeout_ms, 10_000);
        assert_eq!(c.timing.lost_grace_ms, 3_000);
        assert!(
            matches!(c.broker, BrokerConfig::Embedded { listen, allow_anonymous: false, .. } if listen.port() == 10003)
        );
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn urls() {
        assert_eq!(root_url("root.example").unwrap(), "http://root.example:10000");
        assert_eq!(root_url("http://10.0.0.1:8080/").unwrap(), "http://10.0.0.1:8080");
        assert_eq!(root_url("::1").unwrap(), "http://[::1]:10000");
        assert_eq!(root_url("http://[::1]:9").unwrap(), "http://[::1]:9");
        assert!(root_url("https://x").is_none());
        assert!(root_url("http://x/api").is_none());
        assert_eq!(
            mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(mqtt_url("broker").unwrap(), ("broker".into(), 1883));
        assert!(mqtt_url("mqtt://h:x").is_none());
        assert!(mqtt_url("ws://h:1").is_none());
    }

    #[test]
    fn errors_name_flag_and_value() {
        let e = parse(&["--worker-timeout", "0"]).unwrap_err();
        assert!(e.contains("--worker-timeout") && e.contains('0'), "{e}");
        let e = parse(&["--lost-grace", "0"]).unwrap_err();
        assert!(e.contains("--lost-grace") && e.contains("more than 0"), "{e}");
        assert_eq!(parse(&["--lost-grace", "0.5"]).unwrap().timing.lost_grace_ms, 500);
        let e = parse(&["--scheduler-policy", "random"]).unwrap_err();
        assert!(e.contains("--scheduler-policy") && e.contains("random"), "{e}");
        let e = parse(&["--root-url", "ftp://x"]).unwrap_err();
        assert!(e.contains("--root-url") && e.contains("ftp://x"), "{e}");
        let e = parse(&["--mqtt-url", "mqtt://h:1", "--mqtt-allow-anonymous"]).unwrap_err();
        assert!(e.contains("--mqtt-allow-anonymous"), "{e}");
        let e = Config::from_cli(Cli::try_parse_from(["cluster-service", "--cluster-name", "c"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--join-token"), "{e}");
        let e = parse(&["--worker-timeout", "0.5"]).unwrap();
        assert_eq!(e.timing.worker_timeout_ms, 500);
    }
}
