//! Worker → cluster registration over HTTP: the `POST /api/node/register` body ([`NodeRegistration`]) and its answer
//! ([`NodeRegistered`]).
//!
//! The body is the reference NodeEngine's whole node struct. Its last five fields have no JSON tag in Go, so they travel
//! under their Go field names (`Overlay`, `OverlaySocket`, …); we spell them the same way.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::serde_util;

/// Path of the registration endpoint on the cluster manager (port 10100 by default).
pub const REGISTER_PATH: &str = "/api/node/register";

/// The registration body: everything the cluster stores about a worker. Unknown keys (e.g. `carbon_intensity`,
/// `token`) are kept in [`Self::extra`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// Empty on registration; the cluster answers with the node's id.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub id: String,
    /// The hostname. The reference cluster upserts by it (`candidate_name`), so it is the node's identity there.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub host: String,
    /// The worker's IP.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub ip: String,
    /// The worker's port as text (`"3000"` unless `MY_PORT` is set).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub port: String,
    /// Static host facts.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub system_info: SystemInfo,
    /// CPU usage in percent.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub cpu_percent: f64,
    /// Logical cores.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub vcpus: i64,
    /// Go's `GOARCH`: `amd64`, `arm64`, …
    #[serde(default, deserialize_with = "serde_util::string")]
    pub architecture: String,
    /// Used memory in percent.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub memory_percent: f64,
    /// Available memory in MiB.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub memory: i64,
    /// `{"/": used %, "partition_N": …}` (values are strings from the reference), verbatim.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub disk_info: Map<String, Value>,
    /// `{"interface_N": …}`, verbatim.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub network_info: Map<String, Value>,
    /// GPU driver name (`""` without a GPU).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub gpu_driver: String,
    /// GPU usage in percent.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub gpu_usage: f64,
    /// Number of GPUs.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub vgpus: i64,
    /// GPU temperature in °C.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub gpu_temp: f64,
    /// Used VRAM in percent.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub vram_percent: f64,
    /// Total VRAM in MiB.
    #[serde(
        default,
        deserialize_with = "serde_util::f64",
        serialize_with = "serde_util::ser_f64"
    )]
    pub vram: f64,
    /// Runtime names the worker can run (`docker`, `unikernel`, `crosvm`, …).
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub virtualization: Vec<String>,
    /// Addons active on the worker (`imageBuilder`, `FLOps`, …).
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub supported_addons: Vec<String>,
    /// CSI plugins available on the worker.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub csi_drivers: Vec<CsiDriver>,
    /// Whether the worker runs a NetManager (overlay network).
    #[serde(rename = "Overlay", default, deserialize_with = "serde_util::bool")]
    pub overlay: bool,
    /// The NetManager's unix socket.
    #[serde(rename = "OverlaySocket", default, deserialize_with = "serde_util::string")]
    pub overlay_socket: String,
    /// Where instance logs are written.
    #[serde(rename = "LogDirectory", default, deserialize_with = "serde_util::string")]
    pub log_directory: String,
    /// The NetManager's legacy TCP port (0 when it listens on the unix socket).
    #[serde(rename = "NetManagerPort", default, deserialize_with = "serde_util::i64")]
    pub net_manager_port: i64,
    /// The cluster address the worker was configured with.
    #[serde(rename = "ClusterAddress", default, deserialize_with = "serde_util::string")]
    pub cluster_address: String,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `system_info` of a [`NodeRegistration`] (a string map in the reference).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// `uname -r`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub kernel_version: String,
    /// The machine architecture as the OS reports it (`x86_64`, `aarch64`).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub architecture: String,
    /// OS name and version.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub os_version: String,
    /// Uptime as text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub uptime: String,
    /// The full host dump as text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub full_stats: String,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `csi_drivers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiDriver {
    /// The name the plugin reports (`GetPluginInfo`), e.g. `nfs.csi.k8s.io`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub csi_driver_name: String,
    /// The plugin's unix socket.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub csi_driver_endpoint: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The 200 answer to a registration: the node id and the MQTT broker port. The broker *host* is not sent; the worker
/// uses the cluster address it was configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistered {
    /// The node's id (a Mongo ObjectId as text); also the MQTT topic segment and client-id prefix.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub id: String,
    /// The broker port, a **string** on the wire (`"10003"`).
    #[serde(rename = "MQTT_BROKER_PORT", default, deserialize_with = "serde_util::string")]
    pub mqtt_broker_port: String,
    /// oakestra-rs extension: the node's MQTT secret. NetManager connects as user `<id>`, NodeEngine as
    /// `<id>-ne`, both with this password (and the user name as client id). Absent from reference clusters, whose
    /// broker is anonymous.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub mqtt_password: Option<String>,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl NodeRegistered {
    /// The answer for node `id` with the broker on `port`.
    pub fn new(id: impl Into<String>, port: u16) -> Self {
        Self {
            id: id.into(),
            mqtt_broker_port: port.to_string(),
            mqtt_password: None,
            extra: Map::new(),
        }
    }

    /// [`Self::mqtt_broker_port`] as a port number.
    pub fn mqtt_broker_port_u16(&self) -> Option<u16> {
        self.mqtt_broker_port.trim().parse().ok()
    }
}

// === Limits =====================================================================================================

/// Longest host name (DNS's limit).
pub const MAX_HOST_LEN: usize = 253;
/// Longest short text field (architecture, runtime and addon names, GPU driver).
pub const MAX_NAME_LEN: usize = 64;
/// Longest free-text field (paths, versions, `full_stats`).
pub const MAX_TEXT_LEN: usize = 4096;
/// Most entries in a list field (`virtualization`, `supported_addons`, `csi_drivers`).
pub const MAX_LIST_LEN: usize = 32;
/// Most entries in a map field (`disk_info`, `network_info`), and the longest encoded value of one entry.
pub const MAX_MAP_LEN: usize = 64;
/// Longest encoded value in a map field.
pub const MAX_MAP_VALUE_LEN: usize = 256;

/// A registration field outside its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value}: {rule}")]
pub struct LimitError {
    /// The field (a JSON path).
    pub field: String,
    /// The offending value, cut to 80 characters and escaped.
    pub value: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

fn shown(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    let mut text = format!("{cut:?}");
    if cut.len() < value.len() {
        text.push('…');
    }
    text
}

fn limit(field: impl Into<String>, value: &str, rule: &'static str) -> LimitError {
    LimitError {
        field: field.into(),
        value: shown(value),
        rule,
    }
}

/// A host name: letters, digits, `.`, `-`, `_`.
fn is_host_name(text: &str) -> bool {
    (1..=MAX_HOST_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A short name: printable ASCII without spaces.
fn is_name(text: &str) -> bool {
    text.len() <= MAX_NAME_LEN && text.bytes().all(|b| b.is_ascii_graphic())
}

fn check_text(field: &str, text: &str) -> Result<(), LimitError> {
    if text.len() > MAX_TEXT_LEN {
        return Err(limit(field, text, "longer than 4096 bytes"));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(limit(field, text, "control characters are not allowed"));
    }
    Ok(())
}

fn check_map(field: &str, map: &Map<String, Value>) -> Result<(), LimitError> {
    if map.len() > MAX_MAP_LEN {
        return Err(limit(
            field,
            &format!("{} entries", map.len()),
            "at most 64 entries",
        ));
    }
    for (key, value) in map {
        let path = format!("{field}.{key}");
        if !is_name(key) {
            return Err(limit(path, key, "keys are at most 64 printable ASCII characters"));
        }
        let encoded = value.to_string();
        if encoded.len() > MAX_MAP_VALUE_LEN {
            return Err(limit(path, &encoded, "a value is at most 256 bytes of JSON"));
        }
    }
    Ok(())
}

impl NodeRegistration {
    /// The registration as a cluster stores it: every field within its limits, the unknown keys (`extra`, also
    /// those of `system_info` and `csi_drivers`, and the `token` a restarting worker proves itself with) dropped.
    /// The first field out of bounds is named in the error.
    pub fn bounded(&self) -> Result<Self, LimitError> {
        let host = self.host.trim();
        if !is_host_name(host) {
            return Err(limit(
                "host",
                &self.host,
                "a host name of 1 to 253 letters, digits, '.', '-' or '_'",
            ));
        }
        let ip = self.ip.trim();
        if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
            return Err(limit("ip", &self.ip, "an IPv4 or IPv6 address"));
        }
        let port = self.port.trim();
        if !port.is_empty() && port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(limit("port", &self.port, "a port number 1 to 65535"));
        }
        if !is_name(&self.architecture) {
            return Err(limit(
                "architecture",
                &self.architecture,
                "at most 64 printable ASCII characters",
            ));
        }
        if !is_name(&self.gpu_driver) {
            return Err(limit(
                "gpu_driver",
                &self.gpu_driver,
                "at most 64 printable ASCII characters",
            ));
        }
        for (field, list) in [
            ("virtualization", &self.virtualization),
            ("supported_addons", &self.supported_addons),
        ] {
            if list.len() > MAX_LIST_LEN {
                return Err(limit(
                    field,
                    &format!("{} entries", list.len()),
                    "at most 32 entries",
                ));
            }
            if let Some((i, bad)) = list.iter().enumerate().find(|(_, n)| n.is_empty() || !is_name(n)) {
                return Err(limit(
                    format!("{field}[{i}]"),
                    bad,
                    "1 to 64 printable ASCII characters",
                ));
            }
        }
        if self.csi_drivers.len() > MAX_LIST_LEN {
            return Err(limit(
                "csi_drivers",
                &format!("{} entries", self.csi_drivers.len()),
                "at most 32 entries",
            ));
        }
        for (i, csi) in self.csi_drivers.iter().enumerate() {
            if !is_name(&csi.csi_driver_name) {
                return Err(limit(
                    format!("csi_drivers[{i}].csi_driver_name"),
                    &csi.csi_driver_name,
                    "at most 64 printable ASCII characters",
                ));
            }
            check_text(
                &format!("csi_drivers[{i}].csi_driver_endpoint"),
                &csi.csi_driver_endpoint,
            )?;
        }
        for (field, text) in [
            ("system_info.kernel_version", &self.system_info.kernel_version),
            ("system_info.architecture", &self.system_info.architecture),
            ("system_info.os_version", &self.system_info.os_version),
            ("system_info.uptime", &self.system_info.uptime),
            ("system_info.full_stats", &self.system_info.full_stats),
            ("OverlaySocket", &self.overlay_socket),
            ("LogDirectory", &self.log_directory),
            ("ClusterAddress", &self.cluster_address),
        ] {
            check_text(field, text)?;
        }
        check_map("disk_info", &self.disk_info)?;
        check_map("network_info", &self.network_info)?;
        let mut kept = self.clone();
        kept.host = host.to_owned();
        kept.ip = ip.to_owned();
        kept.port = port.to_owned();
        kept.extra = Map::new();
        kept.system_info.extra = Map::new();
        for csi in &mut kept.csi_drivers {
            csi.extra = Map::new();
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::test_util::round_trip;

    #[test]
    fn bounded_drops_unknown_keys_and_names_the_first_bad_field() {
        let r: NodeRegistration = serde_json::from_str(REGISTRATION).unwrap();
        let mut with_extra = r.clone();
        with_extra.extra.insert("token".into(), json!("secret"));
        with_extra
            .extra
            .insert("padding".into(), json!("x".repeat(600 * 1024)));
        let kept = with_extra.bounded().unwrap();
        assert!(kept.extra.is_empty());
        assert_eq!(kept.host, "edge-node-1");
        let bad = |f: &dyn Fn(&mut NodeRegistration)| {
            let mut r = r.clone();
            f(&mut r);
            r.bounded().unwrap_err()
        };
        let e = bad(&|r| r.host = "edge\n\x1b[31mevil".into());
        assert_eq!(e.field, "host");
        assert!(e.value.contains("\\n") && !e.value.contains('\n'), "{e}");
        assert_eq!(bad(&|r| r.host = "h".repeat(254)).field, "host");
        assert_eq!(bad(&|r| r.host = String::new()).field, "host");
        assert_eq!(bad(&|r| r.ip = "1.2.3".into()).field, "ip");
        assert_eq!(bad(&|r| r.port = "70000".into()).field, "port");
        assert_eq!(
            bad(&|r| r.virtualization = vec!["docker".into(); 33]).field,
            "virtualization"
        );
        assert_eq!(
            bad(&|r| r.supported_addons = vec![" ".into()]).field,
            "supported_addons[0]"
        );
        assert_eq!(
            bad(&|r| r.system_info.full_stats = "x".repeat(5000)).field,
            "system_info.full_stats"
        );
        let e = bad(&|r| {
            r.disk_info.insert("/".into(), json!("y".repeat(300)));
        });
        assert_eq!(e.field, "disk_info./");
        assert!(e.to_string().len() < 300, "the error stays short: {e}");
    }

    /// A NodeEngine registration body (with `carbon_intensity`, which newer NodeEngines add).
    const REGISTRATION: &str = r#"{"id":"","host":"edge-node-1","ip":"192.168.1.5","port":"3000",
        "system_info":{"kernel_version":"6.1.0-18-amd64","architecture":"x86_64","os_version":"Debian GNU/Linux 12",
                       "uptime":"86400","full_stats":"cpu: 4 x Intel(R) Celeron(R) J4125"},
        "cpu_percent":3.5,"vcpus":4,"architecture":"amd64","memory_percent":41.7,"memory":9321,
        "disk_info":{"/":"37.2","partition_1":"/boot/efi"},"network_info":{"interface_0":"eth0 192.168.1.5/24"},
        "gpu_driver":"","gpu_usage":0,"vgpus":0,"gpu_temp":0,"vram_percent":0,"vram":0,
        "virtualization":["docker","unikernel"],"supported_addons":["imageBuilder"],
        "csi_drivers":[{"csi_driver_name":"nfs.csi.k8s.io","csi_driver_endpoint":"/var/lib/kubelet/plugins/nfs/csi.sock"}],
        "carbon_intensity":0,"Overlay":true,"OverlaySocket":"/etc/netmanager/netmanager.sock","LogDirectory":"/tmp",
        "NetManagerPort":0,"ClusterAddress":"192.168.1.2"}"#;

    const REGISTERED: &str = r#"{"id":"6650c0ffee00000000000002","MQTT_BROKER_PORT":"10003"}"#;

    #[test]
    fn registration_golden() {
        let r: NodeRegistration = round_trip(REGISTRATION);
        assert_eq!(
            (r.host.as_str(), r.port.as_str(), r.vcpus, r.memory),
            ("edge-node-1", "3000", 4, 9321)
        );
        assert_eq!(r.system_info.kernel_version, "6.1.0-18-amd64");
        assert_eq!(r.csi_drivers[0].csi_driver_name, "nfs.csi.k8s.io");
        assert!(r.overlay);
        assert_eq!(r.overlay_socket, "/etc/netmanager/netmanager.sock");
        assert_eq!(r.extra["carbon_intensity"], json!(0));
        assert_eq!(r.disk_info["/"], json!("37.2"));
    }

    #[test]
    fn registration_is_lenient() {
        let r: NodeRegistration = serde_json::from_str(
            r#"{"host":"h","port":3000,"vcpus":"8","memory":"1024","cpu_percent":"2.5","system_info":null,
                "disk_info":null,"virtualization":null,"Overlay":null,"NetManagerPort":"6000","token":"abc"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.port.as_str(), r.vcpus, r.memory, r.cpu_percent),
            ("3000", 8, 1024, 2.5)
        );
        assert_eq!(
            (r.overlay, r.net_manager_port, r.virtualization.len()),
            (false, 6000, 0)
        );
        assert_eq!(r.extra["token"], json!("abc"));
        // Written back with the reference's types.
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (&v["port"], &v["vcpus"], &v["NetManagerPort"]),
            (&json!("3000"), &json!(8), &json!(6000))
        );
    }

    #[test]
    fn registered_golden() {
        let r: NodeRegistered = round_trip(REGISTERED);
        assert_eq!(r, NodeRegistered::new("6650c0ffee00000000000002", 10003));
        assert_eq!(r.mqtt_broker_port_u16(), Some(10003));
        let n: NodeRegistered = serde_json::from_str(r#"{"id":"x","MQTT_BROKER_PORT":10003}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&n).unwrap()["MQTT_BROKER_PORT"],
            json!("10003")
        );
    }

    fn parse_all(s: &str) -> bool {
        serde_json::from_str::<NodeRegistration>(s).is_ok()
            || serde_json::from_str::<NodeRegistered>(s).is_ok()
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for s in ["", "null", "[]", "1", "\"ok\"", "{", r#"{"id":"#] {
            assert!(!parse_all(s), "accepted {s:?}");
        }
        for bad in [
            r#"{"vcpus":"many"}"#,
            r#"{"cpu_percent":{}}"#,
            r#"{"system_info":"linux"}"#,
            r#"{"disk_info":[]}"#,
            r#"{"csi_drivers":[1]}"#,
            r#"{"Overlay":"maybe"}"#,
            r#"{"virtualization":"docker"}"#,
        ] {
            assert!(serde_json::from_str::<NodeRegistration>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<NodeRegistered>(r#"{"MQTT_BROKER_PORT":[]}"#).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_all(&s);
        }

        #[test]
        fn truncated_goldens_are_errors(which in 0usize..2, cut in 0usize..2000) {
            let golden = [REGISTRATION, REGISTERED][which];
            prop_assert!(!parse_all(&golden[..cut % golden.len()]));
        }
    }
}
