//! NodeEngine ⇄ cluster manager MQTT payloads: the worker's `information`, `jobs/resources` and `job` reports, its
//! `lost` last will, and the cluster's `control/deploy`, `control/delete` and `control/error` commands.
//!
//! Every payload keeps unknown keys in an `extra` map, so a message we forward or re-publish never loses a field a
//! newer peer added (the node snapshot and the deploy command grow with every Oakestra version). The flattened map
//! also makes each type accept only a JSON object, never a positional array.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::serde_util;

/// The `nodes/<id>/information` payload: the worker's dynamic snapshot, sent every 2 s (also refreshes liveness).
///
/// The reference serialises its whole node struct here, so besides the dynamic fields below it also sends the
/// registration fields zero-valued (`"host":""`, `"architecture":""`, `"port":""`, `null` maps). They are kept in
/// [`Self::extra`] untouched. The reference cluster only drops `null`s before patching the node document, so those
/// empty strings overwrite the registration data; a cluster should patch with [`Self::cluster_patch`] instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInformation {
    /// The node's current IP (may change when public-IP discovery is on).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub ip: Option<String>,
    /// Node CPU usage in percent since the previous sample.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub cpu_percent: Option<f64>,
    /// Logical cores.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub vcpus: Option<i64>,
    /// Used memory in percent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub memory_percent: Option<f64>,
    /// Available memory in MiB.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub memory: Option<i64>,
    /// GPU driver name (`""` without a GPU).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub gpu_driver: Option<String>,
    /// GPU temperature in °C.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub gpu_temp: Option<f64>,
    /// GPU usage in percent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub gpu_usage: Option<f64>,
    /// Total VRAM in MiB.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub vram: Option<f64>,
    /// Used VRAM in percent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_f64",
        serialize_with = "serde_util::ser_opt_f64"
    )]
    pub vram_percent: Option<f64>,
    /// Number of GPUs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub vgpus: Option<i64>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Keys that only registration sets; a zero value for one of them in `information` means "not sent", not "cleared".
const REGISTRATION_ONLY_KEYS: [&str; 15] = [
    "id",
    "host",
    "port",
    "architecture",
    "system_info",
    "disk_info",
    "network_info",
    "virtualization",
    "supported_addons",
    "csi_drivers",
    "Overlay",
    "OverlaySocket",
    "LogDirectory",
    "NetManagerPort",
    "ClusterAddress",
];

impl NodeInformation {
    /// The fields a cluster should write into the node document: every `null` dropped (as the reference does) and,
    /// unlike the reference, registration-only fields dropped when they carry Go's zero value (`""`, `0`, `false`,
    /// empty list/map), so a snapshot never erases what registration stored.
    pub fn cluster_patch(&self) -> Result<Map<String, Value>, serde_json::Error> {
        let Value::Object(mut map) = serde_json::to_value(self)? else {
            return Ok(Map::new());
        };
        map.retain(|key, value| {
            let stale_registration = REGISTRATION_ONLY_KEYS.contains(&key.as_str()) && is_zero_value(value);
            !(value.is_null() || stale_registration)
        });
        Ok(map)
    }
}

/// Go's zero value for the JSON type at hand.
fn is_zero_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// The `nodes/<id>/jobs/resources` payload: one entry per instance of one runtime, every 2 s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcesReport {
    /// One entry per running instance (a `null` list reads as empty: Go marshals a nil slice as `null`).
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub services: Vec<ServiceResources>,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One instance's usage in a [`ResourcesReport`]. The reference sends the numbers as **strings**; we write strings
/// and read strings or numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceResources {
    /// CPU percent of the instance (÷ logical cores), as text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub cpu_percent: String,
    /// Memory used as a 0–1 fraction of the node's *available* memory (despite the name), as text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub memory_percent: String,
    /// Disk (snapshot) usage in bytes, as text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub disk: String,
    /// The last 1024 bytes of the instance log.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub logs: String,
    /// `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub job_name: String,
    /// The runtime that runs the instance (`docker`, `unikernel`, …).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub virtualization: String,
    /// The instance number (an int on the wire).
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance: i64,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ServiceResources {
    /// [`Self::cpu_percent`] as a number (`None` when empty or not a number).
    pub fn cpu_percent_f64(&self) -> Option<f64> {
        parse_f64(&self.cpu_percent)
    }

    /// [`Self::memory_percent`] as a number.
    pub fn memory_percent_f64(&self) -> Option<f64> {
        parse_f64(&self.memory_percent)
    }

    /// [`Self::disk`] as a number of bytes.
    pub fn disk_f64(&self) -> Option<f64> {
        parse_f64(&self.disk)
    }
}

fn parse_f64(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The `nodes/<id>/job` payload: an instance changed status on the worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusReport {
    /// The job name `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub sname: String,
    /// The status string exactly as Oakestra spells it (`CREATED`, `FAILED`, `DEAD`, `COMPLETED`, `UNDEPLOYED`, …);
    /// kept as text so an unknown status from a newer worker is still forwarded.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub status: String,
    /// Human-readable detail, e.g. the deploy error.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub status_detail: String,
    /// The instance number.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance: i64,
    /// The worker's IP as others reach it.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub publicip: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl JobStatusReport {
    /// A report with an empty detail.
    pub fn new(
        sname: impl Into<String>,
        instance: i64,
        status: impl Into<String>,
        publicip: impl Into<String>,
    ) -> Self {
        Self {
            sname: sname.into(),
            status: status.into(),
            status_detail: String::new(),
            instance,
            publicip: publicip.into(),
            extra: Map::new(),
        }
    }

    /// The same report with a detail (e.g. the error of a failed deployment).
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.status_detail = detail.into();
        self
    }
}

/// The `nodes/<id>/control/deploy` payload: the cluster's whole job document plus `instance_number`.
///
/// Typed fields are the ones the worker reads; everything else (`applicationID`, `RR_ip`, `instance_list`, SLA
/// fields, …) stays in [`Self::extra`]. Missing or `null` fields read as their zero value, as in the Go worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeployCommand {
    /// The job's id (a Mongo ObjectId rendered as a string).
    #[serde(rename = "_id", default, deserialize_with = "serde_util::string")]
    pub id: String,
    /// `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub job_name: String,
    /// Which instance of the job to start.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// Image reference (container) or image URL (unikernel).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub image: String,
    /// Command override.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub environment: Vec<String>,
    /// The port-mapping string, e.g. `80:8080/tcp;5000/udp`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub port: String,
    /// The runtime: `docker` (the cluster rewrites `container`), `unikernel`, `crosvm`, …
    #[serde(default, deserialize_with = "serde_util::string")]
    pub virtualization: String,
    /// OCI platform override (e.g. `linux/arm64`).
    #[serde(default, deserialize_with = "serde_util::string")]
    pub platform: String,
    /// Requested vCPUs.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub vcpus: i64,
    /// Requested GPUs.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub vgpus: i64,
    /// Requested TPUs.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub vtpus: i64,
    /// Requested memory in MiB.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub memory: i64,
    /// Unikernel images, one per architecture in [`Self::arch`].
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub vm_images: Vec<String>,
    /// Architectures the images are built for.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub arch: Vec<String>,
    /// CSI volume requests, passed through to the CSI plugins.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub volumes: Vec<Value>,
    /// Requested storage in MiB.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub storage: i64,
    /// A one-shot service exits for good (exit 0 ⇒ `COMPLETED`) instead of being reported `DEAD`.
    #[serde(default, deserialize_with = "serde_util::bool")]
    pub one_shot: bool,
    /// Run the container privileged.
    #[serde(default, deserialize_with = "serde_util::bool")]
    pub privileged: bool,
    /// Every other key of the job document, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DeployCommand {
    /// Builds the deploy message from the cluster's job document for one instance (the reference sends the whole
    /// document with `instance_number` set).
    pub fn from_job_document(
        mut job: Map<String, Value>,
        instance_number: i64,
    ) -> Result<Self, serde_json::Error> {
        job.insert("instance_number".to_owned(), Value::from(instance_number));
        serde_json::from_value(Value::Object(job))
    }
}

/// The `nodes/<id>/control/delete` payload: stop one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteCommand {
    /// `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub job_name: String,
    /// The runtime that runs the instance.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub virtualization: String,
    /// The instance to stop.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DeleteCommand {
    /// A delete command for one instance.
    pub fn new(job_name: impl Into<String>, virtualization: impl Into<String>, instance_number: i64) -> Self {
        Self {
            job_name: job_name.into(),
            virtualization: virtualization.into(),
            instance_number,
            extra: Map::new(),
        }
    }
}

/// The `nodes/<id>/control/error` payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    /// Free text.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub message: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ControlError {
    /// The reference's text when a node that never registered publishes.
    pub const NODE_NOT_REGISTERED: &'static str = "Node not registered to the cluster";

    /// `{"message":"Node not registered to the cluster"}`.
    pub fn node_not_registered() -> Self {
        Self {
            message: Self::NODE_NOT_REGISTERED.to_owned(),
            extra: Map::new(),
        }
    }
}

/// The `nodes/<id>/lost` payload: what the NodeEngine leaves with the broker as its last will when it connects. The
/// broker publishes it if the connection ends without a DISCONNECT; a NodeEngine that stops cleanly disconnects, so
/// its will is discarded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionLost {
    /// Free text for whoever watches the topic.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub reason: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ConnectionLost {
    /// The will a NodeEngine leaves.
    pub fn will() -> Self {
        Self {
            reason: "the worker's connection to the broker ended without a DISCONNECT".to_owned(),
            extra: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::test_util::round_trip;

    /// What the reference worker publishes every 2 s: the dynamic fields plus the zero-valued rest of its node struct.
    const INFORMATION: &str = r#"{"id":"","host":"","ip":"192.168.1.5","port":"","system_info":null,
        "cpu_percent":12.5,"vcpus":4,"architecture":"","memory_percent":43.2,"memory":5120,"disk_info":null,
        "network_info":null,"gpu_driver":"","gpu_usage":0,"vgpus":0,"gpu_temp":0,"vram_percent":0,"vram":0,
        "virtualization":null,"supported_addons":null,"csi_drivers":null,"carbon_intensity":0,"Overlay":false,
        "OverlaySocket":"","LogDirectory":"","NetManagerPort":0,"ClusterAddress":""}"#;

    const RESOURCES: &str = r#"{"services":[
        {"cpu_percent":"3.25","memory_percent":"0.0125","disk":"4096","logs":"hello\n","job_name":"app.ns.svc.ns",
         "virtualization":"docker","instance":0},
        {"cpu_percent":"0","memory_percent":"0","disk":"0","logs":"","job_name":"uk.ns.svc.ns",
         "virtualization":"unikernel","instance":2}]}"#;

    const JOB: &str = r#"{"sname":"app.ns.svc.ns","status":"FAILED","status_detail":"image not found",
        "instance":1,"publicip":"192.168.1.5"}"#;

    /// A cluster job document as the cluster manager sends it, with fields the worker does not read.
    const DEPLOY: &str = r#"{"_id":"6650c0ffee0000000000abcd","applicationID":"6650c0ffee0000000000abc0",
        "app_name":"clientsrv","app_ns":"test","service_name":"nginx","service_ns":"test",
        "microserviceID":"6650c0ffee0000000000abcd","job_name":"clientsrv.test.nginx.test",
        "image":"docker.io/library/nginx:latest","cmd":["nginx","-g","daemon off;"],"environment":["A=1","B=two"],
        "port":"80:8080/tcp;5000/udp","virtualization":"docker","platform":"","vcpus":1,"vgpus":0,"vtpus":0,
        "memory":100,"storage":0,"vm_images":[],"arch":["amd64","arm64"],
        "volumes":[{"volume_id":"v1","csi_driver":"nfs.csi.k8s.io","mount_path":"/data","config":{"server":"nas"}}],
        "one_shot":false,"privileged":false,"RR_ip":"10.30.0.2","RR_ip_v6":"fdff:2000::2",
        "addresses":{"rr_ip":"10.30.0.2"},"next_instance_progressive_number":1,
        "instance_list":[{"instance_number":0,"cluster_id":"c1","cluster_location":"48.1,11.6,1000","status":"NODE_SCHEDULED"}],
        "status":"NODE_SCHEDULED","status_detail":"","instance_number":0,"sla_version":"v2.0","constraints":[]}"#;

    const DELETE: &str = r#"{"job_name":"app.ns.svc.ns","virtualization":"docker","instance_number":3}"#;
    const ERROR: &str = r#"{"message":"Node not registered to the cluster"}"#;

    #[test]
    fn information_golden() {
        let info: NodeInformation = round_trip(INFORMATION);
        assert_eq!(info.ip.as_deref(), Some("192.168.1.5"));
        assert_eq!(
            (info.cpu_percent, info.vcpus, info.memory),
            (Some(12.5), Some(4), Some(5120))
        );
        assert_eq!(info.vram, Some(0.0));
        assert_eq!(info.extra["carbon_intensity"], json!(0));
    }

    #[test]
    fn information_patch_keeps_registration_data() {
        let info: NodeInformation = serde_json::from_str(INFORMATION).unwrap();
        let patch = info.cluster_patch().unwrap();
        for gone in [
            "id",
            "host",
            "port",
            "architecture",
            "system_info",
            "Overlay",
            "NetManagerPort",
            "virtualization",
        ] {
            assert!(
                !patch.contains_key(gone),
                "{gone} would overwrite registration data"
            );
        }
        for kept in [
            "ip",
            "cpu_percent",
            "memory",
            "gpu_driver",
            "vram",
            "carbon_intensity",
        ] {
            assert!(patch.contains_key(kept), "{kept} dropped");
        }
        // A real value for a registration key does go through.
        let info: NodeInformation = serde_json::from_str(r#"{"host":"edge-1","Overlay":true}"#).unwrap();
        assert_eq!(
            info.cluster_patch().unwrap(),
            json!({"host":"edge-1","Overlay":true})
                .as_object()
                .unwrap()
                .clone()
        );
    }

    #[test]
    fn information_reads_strings_and_nulls() {
        let info: NodeInformation = serde_json::from_str(
            r#"{"cpu_percent":"7.5","vcpus":"8","memory":2048.0,"vram":null,"ip":null}"#,
        )
        .unwrap();
        assert_eq!(
            (
                info.cpu_percent,
                info.vcpus,
                info.memory,
                info.vram,
                info.ip.clone()
            ),
            (Some(7.5), Some(8), Some(2048), None, None)
        );
        // Absent fields stay absent on the way out.
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"cpu_percent":7.5,"vcpus":8,"memory":2048})
        );
    }

    #[test]
    fn resources_golden_and_accessors() {
        let r: ResourcesReport = round_trip(RESOURCES);
        let s = &r.services[0];
        assert_eq!(
            (s.cpu_percent_f64(), s.memory_percent_f64(), s.disk_f64()),
            (Some(3.25), Some(0.0125), Some(4096.0))
        );
        assert_eq!(r.services[1].instance, 2);
    }

    #[test]
    fn resources_read_numbers_and_write_strings() {
        let r: ResourcesReport = serde_json::from_str(
            r#"{"services":[{"cpu_percent":3.25,"memory_percent":0,"disk":4096,"logs":"","job_name":"a.b.c.d",
                "virtualization":"docker","instance":"1","future":true}]}"#,
        )
        .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["services"][0],
            json!({"cpu_percent":"3.25","memory_percent":"0","disk":"4096","logs":"","job_name":"a.b.c.d",
                   "virtualization":"docker","instance":1,"future":true})
        );
        assert_eq!(
            serde_json::from_str::<ResourcesReport>(r#"{"services":null}"#)
                .unwrap()
                .services
                .len(),
            0
        );
        assert_eq!(
            ServiceResources {
                cpu_percent: "x".into(),
                ..Default::default()
            }
            .cpu_percent_f64(),
            None
        );
    }

    #[test]
    fn job_status_golden() {
        let j: JobStatusReport = round_trip(JOB);
        assert_eq!(
            j,
            JobStatusReport::new("app.ns.svc.ns", 1, "FAILED", "192.168.1.5").with_detail("image not found")
        );
        let lenient: JobStatusReport =
            serde_json::from_str(r#"{"sname":"a.b.c.d","status":"DEAD","instance":"4"}"#).unwrap();
        assert_eq!((lenient.instance, lenient.status_detail.as_str()), (4, ""));
    }

    #[test]
    fn deploy_golden_keeps_every_field() {
        let d: DeployCommand = round_trip(DEPLOY);
        assert_eq!(d.id, "6650c0ffee0000000000abcd");
        assert_eq!(d.job_name, "clientsrv.test.nginx.test");
        assert_eq!(d.cmd, ["nginx", "-g", "daemon off;"]);
        assert_eq!((d.vcpus, d.memory, d.instance_number), (1, 100, 0));
        assert_eq!(d.arch, ["amd64", "arm64"]);
        assert_eq!(d.volumes.len(), 1);
        assert_eq!(d.extra["RR_ip"], json!("10.30.0.2"));
        assert_eq!(d.extra["instance_list"][0]["status"], json!("NODE_SCHEDULED"));
    }

    #[test]
    fn deploy_is_lenient() {
        let d: DeployCommand = serde_json::from_str(
            r#"{"_id":"x","job_name":"a.b.c.d","instance_number":"2","vcpus":"2","memory":512.0,"cmd":null,
                "environment":null,"port":8080,"one_shot":"true","privileged":null}"#,
        )
        .unwrap();
        assert_eq!((d.instance_number, d.vcpus, d.memory), (2, 2, 512));
        assert_eq!(
            (d.port.as_str(), d.one_shot, d.privileged, d.cmd.len()),
            ("8080", true, false, 0)
        );
        let empty: DeployCommand = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, DeployCommand::default());
    }

    #[test]
    fn deploy_from_job_document() {
        let Value::Object(mut job) = serde_json::from_str::<Value>(DEPLOY).unwrap() else {
            unreachable!()
        };
        job.remove("instance_number");
        let d = DeployCommand::from_job_document(job, 5).unwrap();
        assert_eq!(d.instance_number, 5);
        assert_eq!(serde_json::to_value(&d).unwrap()["instance_number"], json!(5));
    }

    #[test]
    fn delete_and_error_golden() {
        assert_eq!(
            round_trip::<DeleteCommand>(DELETE),
            DeleteCommand::new("app.ns.svc.ns", "docker", 3)
        );
        assert_eq!(
            round_trip::<ControlError>(ERROR),
            ControlError::node_not_registered()
        );
        assert_eq!(
            serde_json::to_string(&ControlError::node_not_registered()).unwrap(),
            ERROR
        );
    }

    #[test]
    fn the_will_is_an_object_with_a_reason() {
        let text = serde_json::to_string(&ConnectionLost::will()).unwrap();
        assert!(
            text.starts_with(r#"{"reason":"the worker's connection"#),
            "{text}"
        );
        assert_eq!(round_trip::<ConnectionLost>(&text), ConnectionLost::will());
        assert!(serde_json::from_str::<ConnectionLost>("[]").is_err());
        assert_eq!(serde_json::from_str::<ConnectionLost>("{}").unwrap().reason, "");
    }

    #[test]
    fn malformed_payloads_are_errors() {
        fn all_reject(s: &str) {
            assert!(
                serde_json::from_str::<NodeInformation>(s).is_err(),
                "information accepted {s}"
            );
            assert!(
                serde_json::from_str::<ResourcesReport>(s).is_err(),
                "resources accepted {s}"
            );
            assert!(
                serde_json::from_str::<JobStatusReport>(s).is_err(),
                "job accepted {s}"
            );
            assert!(
                serde_json::from_str::<DeployCommand>(s).is_err(),
                "deploy accepted {s}"
            );
            assert!(
                serde_json::from_str::<DeleteCommand>(s).is_err(),
                "delete accepted {s}"
            );
            assert!(
                serde_json::from_str::<ControlError>(s).is_err(),
                "error accepted {s}"
            );
        }
        for s in ["", "null", "[]", "42", "\"x\"", "{", "{\"a\":"] {
            all_reject(s);
        }
        for golden in [INFORMATION, RESOURCES, JOB, DEPLOY, DELETE, ERROR] {
            all_reject(&golden[..golden.len() - 1]);
        }
        // Wrong types inside an object.
        assert!(serde_json::from_str::<NodeInformation>(r#"{"vcpus":"four"}"#).is_err());
        assert!(serde_json::from_str::<NodeInformation>(r#"{"cpu_percent":[]}"#).is_err());
        assert!(serde_json::from_str::<ResourcesReport>(r#"{"services":{}}"#).is_err());
        assert!(serde_json::from_str::<ResourcesReport>(r#"{"services":[{"instance":1.5}]}"#).is_err());
        assert!(serde_json::from_str::<JobStatusReport>(r#"{"instance":"x"}"#).is_err());
        assert!(serde_json::from_str::<DeployCommand>(r#"{"cmd":"ls"}"#).is_err());
        assert!(serde_json::from_str::<DeployCommand>(r#"{"memory":{}}"#).is_err());
        assert!(serde_json::from_str::<DeployCommand>(r#"{"one_shot":2}"#).is_err());
        assert!(serde_json::from_str::<DeleteCommand>(r#"{"instance_number":true}"#).is_err());
    }

    /// Parses `s` as every payload; true if any accepted it.
    fn parse_all(s: &str) -> bool {
        [
            serde_json::from_str::<NodeInformation>(s).is_ok(),
            serde_json::from_str::<ResourcesReport>(s).is_ok(),
            serde_json::from_str::<JobStatusReport>(s).is_ok(),
            serde_json::from_str::<DeployCommand>(s).is_ok(),
            serde_json::from_str::<DeleteCommand>(s).is_ok(),
            serde_json::from_str::<ControlError>(s).is_ok(),
            serde_json::from_str::<ConnectionLost>(s).is_ok(),
        ]
        .contains(&true)
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_all(&s);
        }

        #[test]
        fn truncated_goldens_are_errors(which in 0usize..6, cut in 0usize..2000) {
            let golden = [INFORMATION, RESOURCES, JOB, DEPLOY, DELETE, ERROR][which];
            let cut = cut % golden.len();
            prop_assert!(!parse_all(&golden[..cut]));
        }

        #[test]
        fn mutated_goldens_never_panic(which in 0usize..6, at in 0usize..2000, b in 0x20u8..0x7f) {
            let golden = [INFORMATION, RESOURCES, JOB, DEPLOY, DELETE, ERROR][which];
            let mut bytes = golden.as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] = b;
            let _ = parse_all(&String::from_utf8(bytes).unwrap());
        }
    }
}
