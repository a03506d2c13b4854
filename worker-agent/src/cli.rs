//! The command line (the reference's flags and subcommands) and the effective [`Settings`]: `conf.json`, then
//! environment, then flags, validated once at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfError, ConfFile, DEFAULT_CLUSTER_PORT, DEFAULT_CONF_PATH, Overlay};
use crate::registry::Credentials;

/// What the command line asks for.
#[derive(Debug, Parser)]
#[command(
    name = "NodeEngine",
    version,
    about = "oakestra-rs worker agent: joins a cluster, runs its instances with containerd, reports metrics",
    long_about = "The oakestra-rs worker agent. NodeEngine joins an Oakestra cluster (HTTP registration, then MQTT as <node id>-ne), runs the \
                  instances the cluster schedules here as containerd containers (namespace `oakestra`), attaches \
                  them to the overlay through the NetManager, and reports node metrics every 2 s.\n\n\
                  Without a subcommand (or with `run`) it runs in the foreground until SIGTERM/SIGINT. Settings come \
                  from /etc/oakestra/conf.json (read leniently; unknown keys are kept), then the environment, then \
                  these flags.",
    after_help = "Examples:\n  NodeEngine -a 192.168.1.10            join the cluster at 192.168.1.10:10100\n  \
                  NodeEngine -a cluster.lan -n -1       no overlay network\n  NodeEngine status\n  \
                  NodeEngine logs -f"
)]
pub struct Cli {
    /// What to do (default: run the agent).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Agent settings.
    #[command(flatten)]
    pub run: RunFlags,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (what the systemd unit starts).
    Run,
    /// Show whether the agent runs, its node id, cluster and instances.
    Status,
    /// Print the agent's log, or an instance's log (`NodeEngine logs <job name or task id>`).
    Logs {
        /// `app.ns.svc.ns` (instance 0 unless `--instance`), or a task id `app.ns.svc.ns.instance.N`.
        target: Option<String>,
        /// The instance number when TARGET is a job name.
        #[arg(long, default_value_t = 0)]
        instance: u32,
        /// Keep printing what is appended.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end to print first.
        #[arg(long, default_value_t = 100)]
        lines: usize,
    },
    /// Stop the running agent (and, with systemd, the nodeengine and netmanager units).
    Stop,
    /// Print the version.
    Version,
}

/// What the agent does with its instances on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnStop {
    /// Leave them running; the next start adopts them (upgrades and restarts do not touch workloads).
    Leave,
    /// Stop and remove them (the reference's behaviour); the cluster reschedules them elsewhere.
    Stop,
}

/// `--unikernel-accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    /// KVM when the probe guest runs on it, else TCG.
    Auto,
    /// KVM without probing.
    Kvm,
    /// TCG (software emulation) always.
    Tcg,
}

/// Flags of the agent.
#[derive(Debug, Clone, Args)]
pub struct RunFlags {
    /// Cluster manager address (host name or IP). Overrides `cluster_address` of conf.json.
    #[arg(
        short = 'a',
        long = "clusterAddr",
        env = "OAKESTRA_CLUSTER_ADDR",
        global = true
    )]
    pub cluster_addr: Option<String>,
    /// Cluster manager port (default 10100). Overrides `cluster_port` of conf.json.
    #[arg(
        short = 'p',
        long = "clusterPort",
        env = "OAKESTRA_CLUSTER_PORT",
        global = true
    )]
    pub cluster_port: Option<u16>,
    /// NetManager: a port, a unix socket path, or -1 for no overlay network. Default from conf.json
    /// (`overlay_network`), i.e. the socket /etc/netmanager/netmanager.sock.
    #[arg(short = 'n', long = "netmanager", allow_hyphen_values = true, global = true)]
    pub netmanager: Option<String>,
    /// Unikernel runtime: `-u`, `-u=true` or `-u true` turn it on. Guests run in QEMU (KVM when a probe guest
    /// really runs on /dev/kvm, else TCG); `virtualization: unikernel` services are then offered.
    #[arg(short = 'u', long = "unikernel", num_args = 0..=1, default_missing_value = "true",
          require_equals = false, env = "OAKESTRA_UNIKERNEL", global = true)]
    pub unikernel: Option<bool>,
    /// How unikernels run: `auto` probes KVM once at start (a tiny guest must really run on /dev/kvm), `kvm`
    /// or `tcg` skip the probe.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto, env = "OAKESTRA_UNIKERNEL_ACCEL", global = true)]
    pub unikernel_accel: AccelChoice,
    /// Seconds an unused unikernel image stays in the cache (images of running guests always stay).
    #[arg(
        long,
        default_value_t = 3600,
        env = "OAKESTRA_UNIKERNEL_CACHE_KEEP",
        global = true
    )]
    pub unikernel_cache_keep: u64,
    /// Largest unikernel tarball downloaded, in MiB.
    #[arg(
        long,
        default_value_t = 512,
        env = "OAKESTRA_UNIKERNEL_MAX_IMAGE_MIB",
        global = true
    )]
    pub unikernel_max_image_mib: u64,
    /// Directory of the instances' logs (`<dir>/<task id>`). Overrides `app_logs` of conf.json.
    #[arg(short = 'l', long = "logs", global = true)]
    pub logs: Option<PathBuf>,
    /// The configuration file.
    #[arg(long, default_value = DEFAULT_CONF_PATH, env = "OAKESTRA_CONF", global = true)]
    pub conf: PathBuf,
    /// containerd's socket.
    #[arg(
        long,
        default_value = "/run/containerd/containerd.sock",
        env = "CONTAINERD_ADDRESS",
        global = true
    )]
    pub containerd: PathBuf,
    /// containerd namespace of the instances.
    #[arg(long, default_value = "oakestra", global = true)]
    pub namespace: String,
    /// containerd snapshotter.
    #[arg(long, default_value = "overlayfs", global = true)]
    pub snapshotter: String,
    /// Where the agent keeps its identity, status and per-instance files.
    #[arg(
        long,
        default_value = "/var/lib/oakestra/nodeengine",
        env = "OAKESTRA_STATE_DIR",
        global = true
    )]
    pub state_dir: PathBuf,
    /// The agent's own log file (also written to stderr; `NodeEngine logs` prints it). `none`: stderr only.
    #[arg(long, default_value = "/var/log/oakestra/nodeengine.log", global = true)]
    pub log_file: PathBuf,
    /// Seconds between node reports (`information` and `jobs/resources`).
    #[arg(long, default_value_t = 2.0, global = true)]
    pub report_interval: f64,
    /// What SIGTERM does to the running instances.
    #[arg(long, value_enum, default_value_t = OnStop::Leave, global = true)]
    pub on_stop: OnStop,
    /// Registry credentials: a JSON file `{"<registry host>": {"username": "...", "password": "..."}}`.
    #[arg(long, env = "OAKESTRA_REGISTRY_AUTH", global = true)]
    pub registry_auth: Option<PathBuf>,
    /// The node name the cluster knows this worker by (default: the hostname).
    #[arg(long, env = "OAKESTRA_NODE_NAME", global = true)]
    pub node_name: Option<String>,
    /// The cluster's worker join token (the cluster writes it to <its data-dir>/worker-join.token). Overrides
    /// `join_token` of conf.json. Needed for the first registration; later ones prove the node's identity with its
    /// saved id and secret.
    #[arg(
        long,
        env = "OAKESTRA_WORKER_JOIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub join_token: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`: instances, deploys and their latency, MQTT messages and
    /// reconnects, node load, process) on this address, e.g. 127.0.0.1:9102. Off by default; needs
    /// --metrics-token-file.
    #[arg(long, env = "OAKESTRA_METRICS_LISTEN", global = true, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The file holding the bearer token `GET /metrics` asks for (at least 16 characters; keep it 0600).
    #[arg(long, env = "OAKESTRA_METRICS_TOKEN_FILE", global = true, value_name = "PATH")]
    pub metrics_token_file: Option<PathBuf>,
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// conf.json is unreadable.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// A value breaks a rule.
    #[error("{field} = {value:?}: {rule}")]
    Invalid {
        /// The flag or key.
        field: &'static str,
        /// The value given.
        value: String,
        /// The rule.
        rule: String,
    },
}

/// The effective configuration of a running agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cluster manager host.
    pub cluster_address: String,
    /// Cluster manager port.
    pub cluster_port: u16,
    /// The NetManager, or off.
    pub overlay: Overlay,
    /// `-u=true` was given: offer unikernels when QEMU is here.
    pub unikernel_requested: bool,
    /// `--unikernel-accel`.
    pub unikernel_accel: AccelChoice,
    /// How long unused unikernel images stay cached.
    pub unikernel_cache_keep: Duration,
    /// Largest unikernel tarball, in bytes.
    pub unikernel_max_image_bytes: u64,
    /// Instance log directory.
    pub app_logs: PathBuf,
    /// containerd socket.
    pub containerd: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// containerd snapshotter.
    pub snapshotter: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// The agent's log file, if any.
    pub log_file: Option<PathBuf>,
    /// Node report period.
    pub report_interval: Duration,
    /// SIGTERM policy.
    pub on_stop: OnStop,
    /// Registry credentials by registry host.
    pub registry_credentials: HashMap<String, Credentials>,
    /// The node's name (hostname).
    pub node_name: String,
    /// The cluster's worker join token, if configured.
    pub join_token: Option<Secret>,
    /// The whole conf.json (sent along in the registration's `virtualization`, kept for unknown keys).
    pub conf: ConfFile,
    /// The opt-in metrics listener and its token file.
    pub metrics: Option<(std::net::SocketAddr, PathBuf)>,
}

fn invalid(field: &'static str, value: impl Into<String>, rule: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field,
        value: value.into(),
        rule: rule.into(),
    }
}

impl Settings {
    /// conf.json (at `flags.conf`), overridden by the flags (clap already merged the environment).
    pub fn resolve(flags: &RunFlags) -> Result<Self, SettingsError> {
        let conf = ConfFile::load(&flags.conf)?;
        Self::from_parts(flags, conf)
    }

    /// [`Self::resolve`] with the file already read.
    pub fn from_parts(flags: &RunFlags, conf: ConfFile) -> Result<Self, SettingsError> {
        let cluster_address = flags
            .cluster_addr
            .clone()
            .unwrap_or_else(|| conf.cluster_address.clone())
            .trim()
            .to_owned();
        if cluster_address.is_empty() || cluster_address == "0.0.0.0" || cluster_address == "::" {
            return Err(invalid(
                "clusterAddr",
                cluster_address,
                "no cluster address: pass -a <host> or set cluster_address in conf.json",
            ));
        }
        if cluster_address.contains('/') || cluster_address.contains(char::is_whitespace) {
            return Err(invalid(
                "clusterAddr",
                cluster_address,
                "a host name or IP, without scheme or path",
            ));
        }
        let cluster_port = flags.cluster_port.unwrap_or(if conf.cluster_port == 0 {
            DEFAULT_CLUSTER_PORT
        } else {
            conf.cluster_port
        });
        if cluster_port == 0 {
            return Err(invalid("clusterPort", "0", "a port is 1 to 65535"));
        }
        let overlay = match &flags.netmanager {
            Some(text) => {
                Overlay::from_flag(text).map_err(|rule| invalid("netmanager", text.clone(), rule))?
            }
            None => Overlay::from_conf(&conf),
        };
        let app_logs = flags
            .logs
            .clone()
            .unwrap_or_else(|| PathBuf::from(&conf.app_logs));
        if !app_logs.is_absolute() {
            return Err(invalid(
                "logs",
                app_logs.display().to_string(),
                "must be an absolute directory",
            ));
        }
        if !flags.state_dir.is_absolute() {
            return Err(invalid(
                "state-dir",
                flags.state_dir.display().to_string(),
                "must be an absolute directory",
            ));
        }
        let ns = &flags.namespace;
        if ns.is_empty()
            || !ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "namespace",
                ns.clone(),
                "letters, digits, '-', '_' and '.' only",
            ));
        }
        if !(flags.report_interval.is_finite() && (0.05..=3600.0).contains(&flags.report_interval)) {
            return Err(invalid(
                "report-interval",
                flags.report_interval.to_string(),
                "seconds between 0.05 and 3600",
            ));
        }
        if !(1..=65536).contains(&flags.unikernel_max_image_mib) {
            return Err(invalid(
                "unikernel-max-image-mib",
                flags.unikernel_max_image_mib.to_string(),
                "MiB between 1 and 65536",
            ));
        }
        let registry_credentials = match &flags.registry_auth {
            Some(path) => read_credentials(path)?,
            None => HashMap::new(),
        };
        let node_name = match &flags.node_name {
            Some(n) if !n.trim().is_empty() => n.trim().to_owned(),
            _ => hostname(),
        };
        let log_file = (flags.log_file.as_os_str() != "none").then(|| flags.log_file.clone());
        let join_token = flags
            .join_token
            .clone()
            .or_else(|| {
                conf.extra
                    .get("join_token")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if let Some(token) = &join_token
            && (token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "join-token",
                "<redacted>",
                "1 to 256 printable ASCII characters without spaces",
            ));
        }
        let metrics = match (flags.metrics_listen, &flags.metrics_token_file) {
            (None, _) => None,
            (Some(addr), Some(path)) => Some((addr, path.clone())),
            (Some(addr), None) => {
                return Err(invalid(
                    "metrics-listen",
                    addr.to_string(),
                    "needs --metrics-token-file: the metrics port asks for a bearer token",
                ));
            }
        };
        Ok(Self {
            cluster_address,
            cluster_port,
            overlay,
            unikernel_requested: flags.unikernel.unwrap_or(false),
            unikernel_accel: flags.unikernel_accel,
            unikernel_cache_keep: Duration::from_secs(flags.unikernel_cache_keep),
            unikernel_max_image_bytes: flags.unikernel_max_image_mib.saturating_mul(1024 * 1024),
            app_logs,
            containerd: flags.containerd.clone(),
            namespace: ns.clone(),
            snapshotter: flags.snapshotter.clone(),
            state_dir: flags.state_dir.clone(),
            log_file,
            report_interval: Duration::from_secs_f64(flags.report_interval),
            on_stop: flags.on_stop,
            registry_credentials,
            node_name,
            join_token: join_token.map(Secret),
            conf,
            metrics,
        })
    }
}

fn read_credentials(path: &Path) -> Result<HashMap<String, Credentials>, SettingsError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        username: String,
        password: String,
    }
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid("registry-auth", shown.clone(), e.to_string()))?;
    let map: HashMap<String, Entry> = serde_json::from_str(&text).map_err(|e| {
        invalid(
            "registry-auth",
            shown.clone(),
            format!("expected {{\"<registry>\": {{\"username\": .., \"password\": ..}}}}: {e}"),
        )
    })?;
    Ok(map
        .into_iter()
        .map(|(k, e)| {
            (
                k,
                Credentials {
                    username: e.username,
                    password: e.password,
                },
            )
        })
        .collect())
}

/// The host name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("NodeEngine").chain(args.iter().copied())).unwrap()
    }

    fn settings(args: &[&str]) -> Result<Settings, SettingsError> {
        Settings::from_parts(&parse(args).run, ConfFile::default())
    }

    #[test]
    fn reference_flags() {
        let c = parse(&[
            "-a", "10.0.0.1", "-p", "10200", "-n", "-1", "-u=true", "-l", "/tmp/x",
        ]);
        assert_eq!(c.run.cluster_addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(c.run.cluster_port, Some(10200));
        assert_eq!(c.run.unikernel, Some(true));
        let s = Settings::from_parts(&c.run, ConfFile::default()).unwrap();
        assert_eq!(s.overlay, Overlay::Off);
        assert_eq!(s.app_logs, PathBuf::from("/tmp/x"));
        assert!(s.unikernel_requested);
        for form in [&["-u"][..], &["-u", "true"], &["-u=true"], &["--unikernel"]] {
            let mut args = vec!["-a", "h"];
            args.extend_from_slice(form);
            assert_eq!(parse(&args).run.unikernel, Some(true), "{form:?}");
        }
        assert_eq!(parse(&["-u=false"]).run.unikernel, Some(false));
        assert_eq!(parse(&["-a", "h"]).run.unikernel, None);
        assert!(Cli::try_parse_from(["NodeEngine", "-u=maybe"]).is_err());
    }

    #[test]
    fn subcommands_take_the_global_flags() {
        let c = parse(&["status", "--state-dir", "/x"]);
        assert!(matches!(c.command, Some(Command::Status)));
        assert_eq!(c.run.state_dir, PathBuf::from("/x"));
        let c = parse(&["logs", "a.b.c.d", "-f"]);
        assert!(matches!(c.command, Some(Command::Logs { follow: true, .. })));
        assert!(matches!(parse(&["run", "-a", "h"]).command, Some(Command::Run)));
    }

    #[test]
    fn settings_merge_conf_and_flags() {
        let conf = ConfFile {
            cluster_address: "192.168.1.5".into(),
            cluster_port: 10300,
            overlay_network: "custom:/run/nm.sock".into(),
            ..ConfFile::default()
        };
        let s = Settings::from_parts(&parse(&[]).run, conf.clone()).unwrap();
        assert_eq!(
            (s.cluster_address.as_str(), s.cluster_port),
            ("192.168.1.5", 10300)
        );
        assert_eq!(s.overlay, Overlay::Socket("/run/nm.sock".into()));
        let s = Settings::from_parts(&parse(&["-a", "other", "-p", "1", "-n", "7777"]).run, conf).unwrap();
        assert_eq!((s.cluster_address.as_str(), s.cluster_port), ("other", 1));
        assert_eq!(s.overlay, Overlay::Port(7777));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let e = settings(&[]).unwrap_err().to_string();
        assert!(e.contains("clusterAddr") && e.contains("-a"), "{e}");
        let e = settings(&["-a", "http://x/"]).unwrap_err().to_string();
        assert!(e.contains("http://x/"), "{e}");
        let e = settings(&["-a", "h", "-l", "rel/dir"]).unwrap_err().to_string();
        assert!(e.contains("rel/dir") && e.contains("absolute"), "{e}");
        let e = settings(&["-a", "h", "--namespace", "a b"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespace"), "{e}");
        let e = settings(&["-a", "h", "--report-interval", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("report-interval"), "{e}");
        let e = settings(&["-a", "h", "-n", "70000"]).unwrap_err().to_string();
        assert!(e.contains("70000"), "{e}");
    }
}
