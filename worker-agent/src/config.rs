//! The worker's configuration: `/etc/oakestra/conf.json` read leniently (unknown keys kept, no size limit, the
//! reference's misspelt keys as the on-disk format), the command-line flags that override it, and the validated
//! [`Settings`] both produce.

use std::path::{Path, PathBuf};

use oakestra_protocol::serde_util;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where the reference keeps the worker configuration.
pub const DEFAULT_CONF_PATH: &str = "/etc/oakestra/conf.json";
/// The cluster manager's default port.
pub const DEFAULT_CLUSTER_PORT: u16 = 10100;
/// NetManager's local API socket.
pub const DEFAULT_NETMANAGER_SOCKET: &str = "/etc/netmanager/netmanager.sock";

/// `/etc/oakestra/conf.json`. Every field reads leniently (a number where text is expected, `null`, a missing key
/// all fall back to the default) and every unknown key survives a read-modify-write in [`Self::extra`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfFile {
    /// Format version (`"1.0"`).
    #[serde(default = "conf_version", deserialize_with = "serde_util::string")]
    pub conf_version: String,
    /// The cluster's address.
    #[serde(default = "any_address", deserialize_with = "serde_util::string")]
    pub cluster_address: String,
    /// The cluster manager's port.
    #[serde(default = "cluster_port", deserialize_with = "lenient_port")]
    pub cluster_port: u16,
    /// Whether the cluster manager speaks HTTPS.
    #[serde(default, deserialize_with = "serde_util::bool")]
    pub cluster_ssl: bool,
    /// Where instance logs go.
    #[serde(default = "app_logs", deserialize_with = "serde_util::string")]
    pub app_logs: String,
    /// `default` (start NetManager), `custom:<socket>`, anything else: no overlay.
    #[serde(default = "overlay_default", deserialize_with = "serde_util::string")]
    pub overlay_network: String,
    /// Whether to advertise the public IP.
    #[serde(default, deserialize_with = "serde_util::bool")]
    pub public_ip: bool,
    /// NetManager's legacy TCP port (0: the unix socket).
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub overlay_network_port: i64,
    /// MQTT client certificate (TLS brokers).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub mqtt_cert_file: String,
    /// MQTT client key.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub mqtt_key_file: String,
    /// Add-ons (`imageBuilder`, `FLOps`), verbatim.
    #[serde(default, deserialize_with = "lax")]
    pub addons: Vec<Value>,
    /// Runtimes, in the reference's misspelt on-disk keys.
    #[serde(default = "default_virtualizations", deserialize_with = "lax")]
    pub virtualizations: Vec<Virtualization>,
    /// CSI plugins, verbatim (`{csi_driver_name, csi_driver_endpoint}`).
    #[serde(default, deserialize_with = "lax")]
    pub csi_drivers: Vec<Value>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One runtime entry of `virtualizations` (keys spelt as the reference writes them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Virtualization {
    /// `containerd`, `unikernel`, …
    #[serde(
        rename = "virutalizaiton_name",
        default,
        deserialize_with = "serde_util::string"
    )]
    pub name: String,
    /// `docker`, `qemu`, …
    #[serde(
        rename = "virutalizaiton_runtime",
        default,
        deserialize_with = "serde_util::string"
    )]
    pub runtime: String,
    /// Whether it is on.
    #[serde(
        rename = "virutalizaiton_active",
        default,
        deserialize_with = "serde_util::bool"
    )]
    pub active: bool,
    /// Runtime options, verbatim.
    #[serde(rename = "virutalizaiton_config", default, deserialize_with = "lax")]
    pub config: Vec<Value>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn conf_version() -> String {
    "1.0".to_owned()
}
fn any_address() -> String {
    "0.0.0.0".to_owned()
}
fn cluster_port() -> u16 {
    DEFAULT_CLUSTER_PORT
}
fn app_logs() -> String {
    "/tmp".to_owned()
}
fn overlay_default() -> String {
    "default".to_owned()
}
fn default_virtualizations() -> Vec<Virtualization> {
    vec![Virtualization {
        name: "containerd".to_owned(),
        runtime: "docker".to_owned(),
        active: true,
        config: Vec::new(),
        extra: Map::new(),
    }]
}

/// Any value of the wrong shape (or `null`) reads as the default: a hand-edited file never stops the worker.
fn lax<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let value = Value::deserialize(d)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// A port as a number or numeric string; anything else (or out of range) is the default 10100.
fn lenient_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = serde_util::i64(d)?;
    Ok(u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_CLUSTER_PORT))
}

impl Default for ConfFile {
    fn default() -> Self {
        Self {
            conf_version: conf_version(),
            cluster_address: any_address(),
            cluster_port: DEFAULT_CLUSTER_PORT,
            cluster_ssl: false,
            app_logs: app_logs(),
            overlay_network: overlay_default(),
            public_ip: false,
            overlay_network_port: 0,
            mqtt_cert_file: String::new(),
            mqtt_key_file: String::new(),
            addons: Vec::new(),
            virtualizations: default_virtualizations(),
            csi_drivers: Vec::new(),
            extra: Map::new(),
        }
    }
}

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The file exists but cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a JSON object.
    #[error("{}: not a JSON object ({reason}); fix or remove it (the defaults are used when it is missing)", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

impl ConfFile {
    /// Parses the text of a configuration file. Empty text (or only whitespace) is the defaults.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let value: Value = serde_json::from_str(text).map_err(|e| ConfError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !value.is_object() {
            return Err(ConfError::Parse {
                path: path.to_path_buf(),
                reason: format!("found {}", kind(&value)),
            });
        }
        let mut conf: Self = serde_json::from_value(value).map_err(|e| ConfError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // `null` or "" where a path or address belongs means the default (an empty `overlay_network` does not: the
        // reference reads it as "no overlay").
        for (field, default) in [
            (&mut conf.app_logs, app_logs()),
            (&mut conf.cluster_address, any_address()),
            (&mut conf.conf_version, conf_version()),
        ] {
            if field.trim().is_empty() {
                *field = default;
            }
        }
        Ok(conf)
    }

    /// Reads `path`; a missing file is the defaults (the reference writes them on first start).
    pub fn load(path: &Path) -> Result<Self, ConfError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How the worker reaches its NetManager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// No overlay network: instances get only the host's network.
    Off,
    /// NetManager's unix socket.
    Socket(PathBuf),
    /// NetManager's legacy TCP port on localhost.
    Port(u16),
}

impl Overlay {
    /// The overlay `conf.json` asks for (`overlay_network`, `overlay_network_port`).
    pub fn from_conf(conf: &ConfFile) -> Self {
        let mode = conf.overlay_network.trim();
        if let Some(socket) = mode.strip_prefix("custom:") {
            return Self::Socket(PathBuf::from(socket));
        }
        if mode != "default" {
            return Self::Off;
        }
        match u16::try_from(conf.overlay_network_port) {
            Ok(port) if port > 0 => Self::Port(port),
            _ => Self::Socket(PathBuf::from(DEFAULT_NETMANAGER_SOCKET)),
        }
    }

    /// The `-n` flag: `-1` (or any negative number) turns the overlay off, a number is a port, anything else a socket
    /// path.
    pub fn from_flag(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(
                "-n = \"\": give a NetManager port, a socket path, or -1 to turn the overlay off".to_owned(),
            );
        }
        if let Ok(n) = text.parse::<i64>() {
            return match n {
                n if n < 0 => Ok(Self::Off),
                0 => Ok(Self::Socket(PathBuf::from(DEFAULT_NETMANAGER_SOCKET))),
                n => u16::try_from(n)
                    .map(Self::Port)
                    .map_err(|_| format!("-n = {n}: a port must be 1 to 65535 (or -1 for no overlay)")),
            };
        }
        Ok(Self::Socket(PathBuf::from(text)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;

    fn parse(v: &Value) -> ConfFile {
        ConfFile::parse(&v.to_string(), Path::new("conf.json")).unwrap()
    }

    #[test]
    fn reference_file_reads_and_keeps_unknown_keys() {
        let text = json!({
            "conf_version": "1.0", "cluster_address": "192.168.1.10", "cluster_port": 10100, "cluster_ssl": false,
            "app_logs": "/var/log/oakestra/apps", "overlay_network": "default", "public_ip": false,
            "overlay_network_port": 0, "mqtt_cert_file": "", "mqtt_key_file": "",
            "addons": [{"addon_name": "imageBuilder", "addon_active": false, "addon_config": []}],
            "virtualizations": [{"virutalizaiton_name": "containerd", "virutalizaiton_runtime": "docker",
                                 "virutalizaiton_active": true, "virutalizaiton_config": []}],
            "csi_drivers": [], "carbon": {"x": 1}
        });
        let conf = parse(&text);
        assert_eq!(conf.cluster_address, "192.168.1.10");
        assert_eq!(conf.virtualizations[0].runtime, "docker");
        assert!(conf.virtualizations[0].active);
        assert_eq!(conf.extra["carbon"], json!({"x": 1}));
        // Written back, the misspelt keys and the unknown key are still there.
        let back = serde_json::to_value(&conf).unwrap();
        assert_eq!(
            back["virtualizations"][0]["virutalizaiton_runtime"],
            json!("docker")
        );
        assert_eq!(back["carbon"], json!({"x": 1}));
        assert_eq!(parse(&back), conf);
    }

    #[test]
    fn lenient_fields_and_no_size_limit() {
        let conf =
            parse(&json!({"cluster_port": "10200", "cluster_ssl": "true", "app_logs": null, "addons": "x"}));
        assert_eq!(conf.cluster_port, 10200);
        assert!(conf.cluster_ssl);
        assert_eq!(conf.app_logs, "/tmp");
        assert!(conf.addons.is_empty());
        assert_eq!(parse(&json!({"cluster_port": 70000})).cluster_port, 10100);
        // The reference reads 2048 bytes and resets a longer file; ours reads it all.
        let big = json!({"cluster_address": "10.0.0.1", "padding": "x".repeat(100_000)});
        assert_eq!(parse(&big).cluster_address, "10.0.0.1");
        assert_eq!(
            ConfFile::parse("  \n", Path::new("c")).unwrap(),
            ConfFile::default()
        );
        let err = ConfFile::parse("[1]", Path::new("/etc/oakestra/conf.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/oakestra/conf.json") && err.contains("an array"),
            "{err}"
        );
        let err = ConfFile::parse("{nope", Path::new("c")).unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
        assert_eq!(
            ConfFile::load(Path::new("/nonexistent/conf.json")).unwrap(),
            ConfFile::default()
        );
    }

    #[test]
    fn overlay_from_conf_and_flag() {
        let mut conf = ConfFile::default();
        assert_eq!(
            Overlay::from_conf(&conf),
            Overlay::Socket(DEFAULT_NETMANAGER_SOCKET.into())
        );
        conf.overlay_network_port = 6000;
        assert_eq!(Overlay::from_conf(&conf), Overlay::Port(6000));
        conf.overlay_network = "custom:/run/nm.sock".into();
        assert_eq!(Overlay::from_conf(&conf), Overlay::Socket("/run/nm.sock".into()));
        conf.overlay_network = String::new();
        assert_eq!(Overlay::from_conf(&conf), Overlay::Off);
        assert_eq!(Overlay::from_flag("-1").unwrap(), Overlay::Off);
        assert_eq!(Overlay::from_flag("6000").unwrap(), Overlay::Port(6000));
        assert_eq!(
            Overlay::from_flag("/tmp/nm.sock").unwrap(),
            Overlay::Socket("/tmp/nm.sock".into())
        );
        assert!(Overlay::from_flag("70000").unwrap_err().contains("70000"));
    }
}
