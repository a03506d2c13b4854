//! The deployment descriptor (SLA v2.0): its model, its validation and the port grammar.
//!
//! Two shapes arrive from users: the full SLA (`{"sla_version": "v2.0", "customerID": …, "applications": […]}`)
//! and the dashboard's service list (`{"microservices": […]}`). Both go through [`validate`], which checks the raw
//! JSON and reports **every** problem at once with its JSON path, the offending value and the rule, before the
//! typed model below is built. Unknown fields are kept (in `extra`) and reported as warnings, never dropped.

pub mod ports;
pub mod validate;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use self::validate::{Issue, SlaError, Validated, parse, parse_services, parse_sla};
use crate::naming::{JobName, NameError};

/// The only SLA version accepted.
pub const SLA_VERSION: &str = "v2.0";

/// A full deployment descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sla {
    /// Always `"v2.0"`.
    pub sla_version: String,
    /// The submitting user as the client names it. The API uses the authenticated user instead.
    #[serde(rename = "customerID")]
    pub customer_id: String,
    /// One or more applications.
    pub applications: Vec<Application>,
    /// Free-form arguments (reference field, unused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The dashboard's descriptor: only a list of services for an existing application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    /// The services.
    pub microservices: Vec<Microservice>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Either accepted descriptor shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Descriptor {
    /// `{"sla_version": …, "applications": […]}`.
    Full(Sla),
    /// `{"microservices": […]}`.
    Services(ServiceList),
}

/// One application of an SLA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Application {
    /// Empty for a new application; the id of an existing one when adding services to it.
    #[serde(rename = "applicationID", default)]
    pub application_id: String,
    /// 1–30 ASCII alphanumerics.
    pub application_name: String,
    /// 1–30 ASCII alphanumerics.
    pub application_namespace: String,
    /// Free text.
    #[serde(default)]
    pub application_desc: String,
    /// The services of the application.
    #[serde(default)]
    pub microservices: Vec<Microservice>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Virtualization {
    /// An OCI container. Written `"container"` by users and stored/sent as `"docker"`, as the reference does.
    Container,
    /// A unikernel image run by QEMU.
    Unikernel,
}

impl Virtualization {
    /// The stored (wire) spelling: `docker` or `unikernel`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Virtualization::Container => "docker",
            Virtualization::Unikernel => "unikernel",
        }
    }

    /// Parses the user spelling (`container`), the stored spelling (`docker`) and `unikernel`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "container" | "docker" => Some(Virtualization::Container),
            "unikernel" => Some(Virtualization::Unikernel),
            _ => None,
        }
    }
}

impl Serialize for Virtualization {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Virtualization {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Virtualization::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("virtualization {s:?} must be container or unikernel"))
        })
    }
}

/// One service (microservice) of an application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Microservice {
    /// Empty for a new service.
    #[serde(rename = "microserviceID", default)]
    pub microservice_id: String,
    /// 1–30 ASCII alphanumerics.
    pub microservice_name: String,
    /// 1–30 ASCII alphanumerics.
    pub microservice_namespace: String,
    /// `docker` (container) or `unikernel`.
    pub virtualization: Virtualization,
    /// The command (container) or kernel parameters (unikernel).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    #[serde(default)]
    pub environment: Vec<String>,
    /// Memory in MiB, reserved by the schedulers and enforced as a cgroup limit (0 = no limit).
    #[serde(default)]
    pub memory: u64,
    /// Virtual CPUs, reserved and enforced as a CPU quota (0 = no limit).
    #[serde(default)]
    pub vcpus: u64,
    /// GPUs.
    #[serde(default)]
    pub vgpus: u64,
    /// TPUs (reference field, not implemented there either).
    #[serde(default)]
    pub vtpus: u64,
    /// Minimum inbound bandwidth (not scheduled on, as in the reference).
    #[serde(default)]
    pub bandwidth_in: u64,
    /// Minimum outbound bandwidth (not scheduled on, as in the reference).
    #[serde(default)]
    pub bandwidth_out: u64,
    /// Minimum storage in MiB.
    #[serde(default)]
    pub storage: u64,
    /// An OCI image reference, or comma-separated unikernel `.tar.gz` URLs.
    pub code: String,
    /// Architectures: one per `code` URL for unikernels, a placement filter for containers.
    #[serde(default)]
    pub arch: Vec<String>,
    /// Reference field kept for round trips.
    #[serde(default)]
    pub state: String,
    /// Port mappings `host[:container][/tcp|/udp];…`.
    #[serde(default)]
    pub port: String,
    /// Requested service addresses.
    #[serde(default)]
    pub addresses: Addresses,
    /// Files to add to the instance (reference field).
    #[serde(default)]
    pub added_files: Vec<String>,
    /// Placement constraints.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// A one-shot service that exits 0 is COMPLETED and never redeployed.
    #[serde(default)]
    pub one_shot: bool,
    /// Run privileged (reference field).
    #[serde(default)]
    pub privileged: bool,
    /// CSI volumes.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Connectivity constraints between services (reference field, not enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connectivity: Vec<Value>,
    /// Reference field kept for round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_violation_strategy: Option<String>,
    /// Reference field kept for round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Reference field kept for round trips.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Microservice {
    /// The job name `app.appns.svc.svcns` of this service inside `app`.
    pub fn job_name(&self, app: &Application) -> Result<JobName, NameError> {
        JobName::new(
            &app.application_name,
            &app.application_namespace,
            &self.microservice_name,
            &self.microservice_namespace,
        )
    }

    /// The parsed port mappings (empty when `port` is empty). Validation already rejected bad lists.
    pub fn port_mappings(&self) -> Result<Vec<ports::PortMapping>, Vec<ports::PortError>> {
        ports::parse_port_list(&self.port)
    }

    /// For a unikernel: each `code` URL paired with its architecture, in order.
    pub fn unikernel_images(&self) -> Vec<(&str, &str)> {
        self.code
            .split(',')
            .map(str::trim)
            .zip(self.arch.iter().map(String::as_str))
            .collect()
    }
}

/// Service addresses the user asks for. Empty strings mean "not set".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Addresses {
    /// Round-robin IPv4, inside 10.30.0.0/16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rr_ip: Option<String>,
    /// Round-robin IPv6, inside fdff:2000::/21.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rr_ip_v6: Option<String>,
    /// Closest-instance IPv4, inside 10.30.0.0/16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closest_ip: Option<String>,
    /// Closest-instance IPv6, inside fdff:1000::/21.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closest_ip_v6: Option<String>,
    /// Reference field `instances[{from, to, start}]`, kept verbatim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<Value>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A placement constraint. `type` selects which other fields matter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    /// `direct`, `clusters`, `addons`, `latency` or `geo`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `direct`: eligible worker hostnames, `;`-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `direct`: the cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// `clusters`: the allowed cluster names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    /// `addons`: worker addons the service needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<String>>,
    /// Every other field (`area`, `location`, `threshold`, `rigidness`, `convergence_time`, …), kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Constraint {
    /// The `direct` node list split on `;`, blanks removed.
    pub fn nodes(&self) -> Vec<&str> {
        self.node
            .as_deref()
            .unwrap_or("")
            .split(';')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect()
    }
}

/// A CSI volume to mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// The volume id at the CSI driver.
    pub volume_id: String,
    /// The CSI driver name (the worker must advertise it).
    pub csi_driver: String,
    /// Where to mount it inside the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Driver-specific configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Map<String, Value>>,
    /// Fields we do not know, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
