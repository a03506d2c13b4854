//! NetManager's configuration: the command line (`Cli`), `/etc/netmanager/netcfg.json` read leniently as the
//! reference writes it, the environment, and the validated [`Settings`] all three produce (flags > env > file).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::{Parser, Subcommand};
use oakestra_protocol::{api::netmanager::DEFAULT_SOCKET_PATH, serde_util};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where the reference keeps the NetManager configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/netmanager/netcfg.json";
/// The overlay's UDP port.
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
/// The cluster broker's default port.
pub const DEFAULT_MQTT_PORT: u16 = 10003;
/// MTU of the TUN, the bridge and every container veth (the reference's default; leaves room for 28–48 bytes of
/// UDP/IP underlay headers on a 1500-byte link).
pub const DEFAULT_MTU: u32 = 1450;

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "NetManager",
    version,
    about = "The oakestra-rs semantic overlay on a worker: gives every container a stable service address.",
    long_about = "The oakestra-rs semantic overlay on a worker.\n\n\
        NetManager waits on its local API (a unix socket) until the NodeEngine registers it, then joins the \
        cluster's MQTT broker, obtains this worker's subnet, creates the bridge `goProxyBridge` and the TUN \
        `goProxyTun`, and plumbs every container the NodeEngine deploys: a veth in the container's network \
        namespace with a /26 IPv4 and a /120 IPv6 address. Packets to service addresses (10.30.0.0/16, \
        fdff::/16) go through the TUN proxy, which picks an instance (round robin, one instance per flow) and \
        sends the packet in a UDP datagram to that instance's worker (port 50103).\n\n\
        With the eBPF dataplane (--dataplane auto, the default, or ebpf) the TUN proxy decides each flow's first \
        packets and writes the flow into BPF maps; tc programs on the container veths and the underlay then \
        translate, encapsulate and deliver the flow's later packets in the kernel. `NetManager status` shows \
        which dataplane runs and why.\n\n\
        Settings come from netcfg.json, then the environment, then these flags."
)]
pub struct Cli {
    /// What to do (default: run the daemon).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the daemon (also read by `status`).
    #[command(flatten)]
    pub run: RunFlags,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Ask the running daemon for its state (registration, subnet, instances, flows, counters) and print it.
    Status,
    /// Print the version.
    Version,
}

/// The daemon's flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunFlags {
    /// The configuration file (the reference's netcfg.json).
    #[arg(
        long = "config",
        short = 'c',
        global = true,
        env = "NETMANAGER_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Local API on this unix socket.
    #[arg(long, global = true, env = "NETMANAGER_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also serve the local API on 127.0.0.1:PORT (the reference's older mode, `NetManager -p 6000`).
    #[arg(long, short = 'p', global = true, value_name = "PORT")]
    pub port: Option<u16>,
    /// UDP port the overlay listens on (overrides nothing in netcfg.json: NodePublicPort is what peers are told).
    #[arg(long, global = true, env = "NETMANAGER_TUNNEL_PORT", value_name = "PORT")]
    pub tunnel_port: Option<u16>,
    /// MTU of the TUN, the bridge and the container veths.
    #[arg(long, global = true, env = "TUN_MTU_SIZE", value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// TUN dataplane threads, one TUN queue each (default: one per CPU, at most 8; one when the eBPF fast path
    /// runs, since the TUN proxy then only decides each flow's first packets).
    #[arg(long, global = true, env = "NETMANAGER_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Name of the TUN device.
    #[arg(long, global = true, default_value = "goProxyTun", value_name = "NAME")]
    pub tun_name: String,
    /// Name of the container bridge.
    #[arg(long, global = true, default_value = "goProxyBridge", value_name = "NAME")]
    pub bridge_name: String,
    /// The nftables table NetManager owns (replaced atomically, removed on shutdown).
    #[arg(long, global = true, default_value = "oakestra", value_name = "NAME")]
    pub nft_table: String,
    /// Where NetManager remembers the veths it created (removed after a crash on the next start).
    #[arg(
        long,
        global = true,
        env = "NETMANAGER_STATE_DIR",
        default_value = "/var/lib/oakestra/netmanager",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
    /// Also log to this file (`none`: stderr only).
    #[arg(
        long,
        global = true,
        default_value = "/var/log/oakestra/netmanager.log",
        value_name = "PATH"
    )]
    pub log_file: String,
    /// Debug logging (same as `"Debug": true` in netcfg.json).
    #[arg(long, short = 'D', global = true)]
    pub debug: bool,
    /// Which dataplane forwards established flows: `auto` (eBPF if it loads, else the TUN proxy, with one
    /// warning naming the reason), `ebpf` (refuse to register without it) or `tun` (the TUN proxy only). Also
    /// netcfg.json's "Dataplane".
    #[arg(
        long,
        global = true,
        env = "NETMANAGER_DATAPLANE",
        value_name = "auto|ebpf|tun"
    )]
    pub dataplane: Option<String>,
    /// Capacity of the eBPF flow map (least recently used flows are evicted when it is full; each direction of a
    /// connection takes one entry; about 170 bytes of kernel memory each). Also netcfg.json's "EbpfMaxFlows".
    #[arg(long, global = true, env = "NETMANAGER_EBPF_FLOWS", value_name = "N")]
    pub ebpf_flows: Option<u32>,
    /// Serve Prometheus metrics (`GET /metrics`: packets, bytes and drops per dataplane path, flows, MQTT,
    /// process) on this address, e.g. 127.0.0.1:9103. Off by default; needs --metrics-token-file.
    #[arg(long, global = true, env = "NETMANAGER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// The file holding the bearer token `GET /metrics` asks for (at least 16 characters; keep it 0600).
    #[arg(
        long,
        global = true,
        env = "NETMANAGER_METRICS_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub metrics_token_file: Option<PathBuf>,
}

/// Which dataplane forwards established flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// eBPF when it loads and attaches, else the TUN proxy alone.
    Auto,
    /// eBPF or nothing: registration fails if the fast path cannot run.
    Ebpf,
    /// The TUN proxy alone.
    Tun,
}

impl DataplaneMode {
    fn parse(field: &'static str, text: &str) -> Result<Self, ConfigError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "ebpf" => Ok(Self::Ebpf),
            "tun" => Ok(Self::Tun),
            _ => Err(self::field(field, text, "must be auto, ebpf or tun")),
        }
    }
}

/// Default capacity of the eBPF flow map.
pub const DEFAULT_EBPF_FLOWS: u32 = 65_536;

/// `/etc/netmanager/netcfg.json`. Every field reads leniently (numbers or strings, `null`, missing keys fall back to
/// the default); unknown keys are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetCfg {
    /// The underlay address peers reach this worker on; `0.0.0.0` = detect it.
    #[serde(default = "any", deserialize_with = "serde_util::string")]
    pub node_public_address: String,
    /// The underlay port peers are told (a string on disk).
    #[serde(default = "tunnel_port", deserialize_with = "serde_util::string")]
    pub node_public_port: String,
    /// The cluster (broker) address; the NodeEngine's `/register` overrides it.
    #[serde(default = "any", deserialize_with = "serde_util::string")]
    pub cluster_url: String,
    /// The cluster broker's port (a string on disk).
    #[serde(default = "mqtt_port", deserialize_with = "serde_util::string")]
    pub cluster_mqtt_port: String,
    /// The interface whose address is advertised when there are several candidates.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub default_interface: String,
    /// Debug logging.
    #[serde(default, deserialize_with = "serde_util::bool")]
    pub debug: bool,
    /// Reference option (public IP lookup through a web service): not supported, a warning is logged.
    #[serde(rename = "PublicIPNetworking", default, deserialize_with = "serde_util::bool")]
    pub public_ip_networking: bool,
    /// MQTT TLS client certificate (not supported yet: a warning is logged).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub mqtt_cert: String,
    /// MQTT TLS client key.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub mqtt_key: String,
    /// `auto`, `ebpf` or `tun` (oakestra-rs; the reference has no such key).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub dataplane: String,
    /// Capacity of the eBPF flow map (oakestra-rs).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub ebpf_max_flows: String,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn any() -> String {
    "0.0.0.0".to_owned()
}
fn tunnel_port() -> String {
    DEFAULT_TUNNEL_PORT.to_string()
}
fn mqtt_port() -> String {
    DEFAULT_MQTT_PORT.to_string()
}

impl Default for NetCfg {
    fn default() -> Self {
        Self {
            node_public_address: any(),
            node_public_port: tunnel_port(),
            cluster_url: any(),
            cluster_mqtt_port: mqtt_port(),
            default_interface: String::new(),
            debug: false,
            public_ip_networking: false,
            mqtt_cert: String::new(),
            mqtt_key: String::new(),
            dataplane: String::new(),
            ebpf_max_flows: String::new(),
            extra: Map::new(),
        }
    }
}

/// A setting that cannot work, named with its source, value and rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but is not JSON.
    #[error("{path}: not a JSON object: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A field's value breaks its rule.
    #[error("{field} = {value:?}: {rule}")]
    Field {
        /// Where the value came from (`NodePublicPort`, `--mtu`, …).
        field: &'static str,
        /// The value.
        value: String,
        /// What it must be.
        rule: &'static str,
    },
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The unix socket of the local API.
    pub socket: PathBuf,
    /// Optional TCP port of the local API on 127.0.0.1.
    pub api_port: Option<u16>,
    /// The advertised underlay address; `None` = detect from the routing table.
    pub public_address: Option<IpAddr>,
    /// The advertised underlay port.
    pub public_port: u16,
    /// The port the overlay socket binds.
    pub tunnel_port: u16,
    /// The broker address until `/register` names one.
    pub cluster_url: String,
    /// The broker port unless `/register` names one.
    pub mqtt_port: u16,
    /// Interface preferred when detecting the public address.
    pub default_interface: Option<String>,
    /// MTU of the TUN, the bridge and the veths.
    pub mtu: u32,
    /// Dataplane threads.
    pub workers: usize,
    /// Whether `workers` was given (flag or environment) rather than defaulted.
    pub workers_set: bool,
    /// TUN device name.
    pub tun_name: String,
    /// Bridge name.
    pub bridge_name: String,
    /// Our nftables table.
    pub nft_table: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Log file, if any.
    pub log_file: Option<PathBuf>,
    /// Debug logging.
    pub debug: bool,
    /// The dataplane asked for.
    pub dataplane: DataplaneMode,
    /// Capacity of the eBPF flow map.
    pub ebpf_flows: u32,
    /// The opt-in metrics listener and its token file.
    pub metrics: Option<(SocketAddr, PathBuf)>,
}

fn field(field: &'static str, value: impl Into<String>, rule: &'static str) -> ConfigError {
    ConfigError::Field {
        field,
        value: value.into(),
        rule,
    }
}

fn port(name: &'static str, text: &str) -> Result<u16, ConfigError> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field(name, text, "must be a port number in 1..=65535"))
}

fn interface_name(name: &'static str, value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(field(
            name,
            value,
            "must be 1-15 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

impl NetCfg {
    /// Reads `path`; a missing file gives the defaults (the reference refuses to start; we log and go on).
    pub fn load(path: &Path) -> Result<Option<Self>, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError::Read {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }
}

impl Settings {
    /// Combines the file named by the flags (or the default) with the flags and validates the result.
    pub fn resolve(flags: &RunFlags) -> Result<(Self, bool), ConfigError> {
        let path = flags
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let file = NetCfg::load(&path)?;
        let found = file.is_some();
        Self::from_parts(flags, &file.unwrap_or_default()).map(|s| (s, found))
    }

    /// Validates `file` overridden by `flags`.
    pub fn from_parts(flags: &RunFlags, file: &NetCfg) -> Result<Self, ConfigError> {
        let public_address = match file.node_public_address.trim() {
            "" | "0.0.0.0" | "::" => None,
            text => Some(text.parse::<IpAddr>().map_err(|_| {
                field(
                    "NodePublicAddress",
                    text,
                    "must be an IP address, or 0.0.0.0 to detect it",
                )
            })?),
        };
        let public_port = port("NodePublicPort", &file.node_public_port)?;
        let mqtt_port = port("ClusterMqttPort", &file.cluster_mqtt_port)?;
        let default_interface = match file.default_interface.trim() {
            "" => None,
            name => Some(interface_name("DefaultInterface", name)?),
        };
        let mtu = flags.mtu.unwrap_or(DEFAULT_MTU);
        if !(1280..=65_000).contains(&mtu) {
            return Err(field(
                "--mtu",
                mtu.to_string(),
                "must be in 1280..=65000 (IPv6 needs at least 1280)",
            ));
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = flags.workers.unwrap_or(cores.min(8));
        if !(1..=64).contains(&workers) {
            return Err(field("--workers", workers.to_string(), "must be in 1..=64"));
        }
        let tunnel_port = match flags.tunnel_port {
            Some(0) => return Err(field("--tunnel-port", "0", "must be a port number in 1..=65535")),
            Some(p) => p,
            None => public_port,
        };
        if flags.port == Some(0) {
            return Err(field("--port", "0", "must be a port number in 1..=65535"));
        }
        let table_ok = !flags.nft_table.is_empty()
            && flags
                .nft_table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !table_ok {
            return Err(field(
                "--nft-table",
                flags.nft_table.clone(),
                "must be letters, digits or '_'",
            ));
        }
        let dataplane = match &flags.dataplane {
            Some(text) => DataplaneMode::parse("--dataplane", text)?,
            None => DataplaneMode::parse("Dataplane", &file.dataplane)?,
        };
        let ebpf_flows = match (flags.ebpf_flows, file.ebpf_max_flows.trim()) {
            (Some(n), _) => n,
            (None, "") => DEFAULT_EBPF_FLOWS,
            (None, text) => text
                .parse()
                .map_err(|_| field("EbpfMaxFlows", text, "must be a number in 1024..=16777216"))?,
        };
        if !(1024..=16_777_216).contains(&ebpf_flows) {
            return Err(field(
                if flags.ebpf_flows.is_some() {
                    "--ebpf-flows"
                } else {
                    "EbpfMaxFlows"
                },
                ebpf_flows.to_string(),
                "must be a number in 1024..=16777216",
            ));
        }
        let metrics = match (flags.metrics_listen, &flags.metrics_token_file) {
            (None, _) => None,
            (Some(addr), Some(path)) => Some((addr, path.clone())),
            (Some(addr), None) => {
                return Err(field(
                    "--metrics-listen",
                    addr.to_string(),
                    "needs --metrics-token-file: the metrics port asks for a bearer token",
                ));
            }
        };
        Ok(Self {
            socket: flags
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH)),
            api_port: flags.port,
            public_address,
            public_port,
            tunnel_port,
            cluster_url: file.cluster_url.trim().to_owned(),
            mqtt_port,
            default_interface,
            mtu,
            workers,
            workers_set: flags.workers.is_some(),
            tun_name: interface_name("--tun-name", &flags.tun_name)?,
            bridge_name: interface_name("--bridge-name", &flags.bridge_name)?,
            nft_table: flags.nft_table.clone(),
            state_dir: flags.state_dir.clone(),
            log_file: match flags.log_file.as_str() {
                "" | "none" => None,
                p => Some(PathBuf::from(p)),
            },
            debug: flags.debug || file.debug,
            dataplane,
            ebpf_flows,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> RunFlags {
        Cli::parse_from(["NetManager"]).run
    }

    #[test]
    fn reference_file_reads_with_defaults_and_strings_or_numbers() {
        let file: NetCfg = serde_json::from_str(
            r#"{"NodePublicAddress":"0.0.0.0","NodePublicPort":50103,"ClusterUrl":"10.0.0.5",
                "ClusterMqttPort":"10003","Debug":"true","Extra":1}"#,
        )
        .unwrap();
        let s = Settings::from_parts(&flags(), &file).unwrap();
        assert_eq!(s.public_address, None);
        assert_eq!(s.public_port, 50103);
        assert_eq!(s.tunnel_port, 50103);
        assert_eq!(s.cluster_url, "10.0.0.5");
        assert!(s.debug);
        assert_eq!(s.mtu, DEFAULT_MTU);
        assert_eq!(file.extra.get("Extra"), Some(&Value::from(1)));
        assert_eq!(s.socket, PathBuf::from("/etc/netmanager/netmanager.sock"));
    }

    #[test]
    fn bad_values_name_field_value_and_rule() {
        let file = NetCfg {
            node_public_port: "99999".to_owned(),
            ..NetCfg::default()
        };
        let e = Settings::from_parts(&flags(), &file).unwrap_err().to_string();
        assert!(
            e.contains("NodePublicPort") && e.contains("99999") && e.contains("1..=65535"),
            "{e}"
        );
        let file = NetCfg {
            node_public_address: "not-an-ip".to_owned(),
            ..NetCfg::default()
        };
        let e = Settings::from_parts(&flags(), &file).unwrap_err().to_string();
        assert!(e.contains("NodePublicAddress") && e.contains("not-an-ip"), "{e}");
        let mut f = flags();
        f.mtu = Some(500);
        let e = Settings::from_parts(&f, &NetCfg::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--mtu") && e.contains("500"), "{e}");
        let mut f = flags();
        f.tun_name = "a-name-that-is-far-too-long".to_owned();
        assert!(Settings::from_parts(&f, &NetCfg::default()).is_err());
    }

    #[test]
    fn dataplane_from_file_flag_and_errors() {
        let s = Settings::from_parts(&flags(), &NetCfg::default()).unwrap();
        assert_eq!(s.dataplane, DataplaneMode::Auto);
        assert_eq!(s.ebpf_flows, DEFAULT_EBPF_FLOWS);
        let file: NetCfg = serde_json::from_str(r#"{"Dataplane":"TUN","EbpfMaxFlows":"4096"}"#).unwrap();
        let s = Settings::from_parts(&flags(), &file).unwrap();
        assert_eq!((s.dataplane, s.ebpf_flows), (DataplaneMode::Tun, 4096));
        // The flag wins over the file.
        let cli = Cli::parse_from(["NetManager", "--dataplane", "ebpf", "--ebpf-flows", "2048"]);
        let s = Settings::from_parts(&cli.run, &file).unwrap();
        assert_eq!((s.dataplane, s.ebpf_flows), (DataplaneMode::Ebpf, 2048));
        let bad: NetCfg = serde_json::from_str(r#"{"Dataplane":"xdp"}"#).unwrap();
        let e = Settings::from_parts(&flags(), &bad).unwrap_err().to_string();
        assert!(
            e.contains("Dataplane") && e.contains("xdp") && e.contains("auto, ebpf or tun"),
            "{e}"
        );
        let cli = Cli::parse_from(["NetManager", "--ebpf-flows", "10"]);
        let e = Settings::from_parts(&cli.run, &NetCfg::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ebpf-flows") && e.contains("10") && e.contains("1024"),
            "{e}"
        );
        let bad: NetCfg = serde_json::from_str(r#"{"EbpfMaxFlows":"lots"}"#).unwrap();
        let e = Settings::from_parts(&flags(), &bad).unwrap_err().to_string();
        assert!(e.contains("EbpfMaxFlows") && e.contains("lots"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from([
            "NetManager",
            "-p",
            "6000",
            "--tunnel-port",
            "50200",
            "--workers",
            "2",
            "--log-file",
            "none",
            "status",
        ]);
        assert!(matches!(cli.command, Some(Command::Status)));
        let s = Settings::from_parts(&cli.run, &NetCfg::default()).unwrap();
        assert_eq!(s.api_port, Some(6000));
        assert_eq!(s.tunnel_port, 50200);
        assert_eq!(s.public_port, 50103);
        assert_eq!(s.workers, 2);
        assert_eq!(s.log_file, None);
    }
}
