//! The addons engine's command-line flags, shared by root-service and cluster-service (flattened into each
//! tier's flags), and their validated form.

use std::{path::PathBuf, time::Duration};

/// Default `--addons-poll-interval`.
pub const DEFAULT_POLL_SECS: u64 = 10;
/// Default `--plugin-timeout-ms`.
pub const DEFAULT_PLUGIN_TIMEOUT_MS: u64 = 2000;

/// The addons flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AddonsFlags {
    /// The Docker daemon the addons engine uses (marketplace verification, addon containers, plugins). Without
    /// it the addons API answers 503 naming the reason; the core keeps working.
    #[arg(
        long,
        value_name = "PATH",
        env = "OAK_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub docker_socket: PathBuf,

    /// Seconds between two rounds of the addons monitor (it also runs at once after every addons API change).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_POLL_SECS)]
    pub addons_poll_interval: u64,

    /// Milliseconds a placement waits for a scheduler plugin before the built-in scheduler places instead.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_PLUGIN_TIMEOUT_MS)]
    pub plugin_timeout_ms: u64,

    /// The address plugin containers reach this service at (MANAGER_URL). Default: the gateway of the plugin's
    /// Docker network, where this service answers when it listens on 0.0.0.0.
    #[arg(long, value_name = "HOST")]
    pub addons_manager_host: Option<String>,

    /// Also serve the addons API on the reference's ports (root: marketplace 11102 and addons manager 11101;
    /// cluster: addons manager 11201), for tools that expect them. Same credentials as the main listener.
    #[arg(long, env = "OAK_ADDONS_REFERENCE_PORTS")]
    pub addons_reference_ports: bool,
}

/// How a tier runs its addons engine.
#[derive(Debug, Clone)]
pub struct AddonsSettings {
    /// The Docker daemon's socket.
    pub docker_socket: PathBuf,
    /// Monitor period.
    pub poll_interval: Duration,
    /// How long a placement waits for a scheduler plugin.
    pub plugin_timeout: Duration,
    /// Where plugins reach the tier, if not the Docker network's gateway.
    pub manager_host: Option<String>,
    /// Whether to serve the reference ports too.
    pub reference_ports: bool,
}

impl Default for AddonsSettings {
    fn default() -> Self {
        Self {
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            poll_interval: Duration::from_secs(DEFAULT_POLL_SECS),
            plugin_timeout: Duration::from_millis(DEFAULT_PLUGIN_TIMEOUT_MS),
            manager_host: None,
            reference_ports: false,
        }
    }
}

/// A flag with a value it cannot take: `(flag, value, rule)`.
pub type FlagError = (&'static str, String, &'static str);

impl AddonsFlags {
    /// Checks the values.
    pub fn validate(self) -> Result<AddonsSettings, FlagError> {
        if self.addons_poll_interval == 0 || self.addons_poll_interval > 3600 {
            return Err((
                "--addons-poll-interval",
                self.addons_poll_interval.to_string(),
                "must be between 1 and 3600 seconds",
            ));
        }
        if !(10..=60_000).contains(&self.plugin_timeout_ms) {
            return Err((
                "--plugin-timeout-ms",
                self.plugin_timeout_ms.to_string(),
                "must be between 10 and 60000 milliseconds",
            ));
        }
        if let Some(h) = &self.addons_manager_host
            && (h.is_empty() || h.len() > 253 || h.contains(['/', ' ']))
        {
            return Err((
                "--addons-manager-host",
                h.clone(),
                "must be a host name or an IP address",
            ));
        }
        Ok(AddonsSettings {
            docker_socket: self.docker_socket,
            poll_interval: Duration::from_secs(self.addons_poll_interval),
            plugin_timeout: Duration::from_millis(self.plugin_timeout_ms),
            manager_host: self.addons_manager_host,
            reference_ports: self.addons_reference_ports,
        })
    }
}
