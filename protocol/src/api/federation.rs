//! The root ⇄ cluster HTTP contract: cluster registration, deploy/undeploy calls and their results, and the
//! network endpoints a cluster's service manager uses at root (worker subnets, job resolution, interests,
//! `net_deploy_status`), with the root → cluster job-update notification.
//!
//! Paths and bodies are the reference's (`/api/information/<id>`, `/api/result/deploy`, `/api/service/<job>/<n>`,
//! `/api/net/...`) except registration: the reference uses a two-step insecure gRPC call on port 50052; ours is one
//! HTTP call on root's API port carrying a join token, answered with the cluster id and a per-cluster secret that
//! both sides then present (`Authorization: Bearer <secret>`) on every call in either direction.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    mqtt::net::{InstanceEntry, ServiceIp, UpdateType},
    serde_util,
};

/// `POST`: a cluster registers (or re-registers) with root. `Authorization: Bearer <join token>`.
pub const CLUSTER_REGISTER_PATH: &str = "/api/cluster/register";
/// `POST`: a cluster reports the result of scheduling one instance ([`DeployResult`]).
pub const DEPLOY_RESULT_PATH: &str = "/api/result/deploy";
/// `GET`: a cluster asks for a worker subnet ([`SubnetAllocation`]); `?worker_id=<id>` makes the answer stable per
/// worker.
pub const SUBNET_PATH: &str = "/api/net/subnet";
/// `POST`: a cluster tells root where instances of a job landed in the overlay ([`NetDeployStatus`]).
pub const NET_DEPLOY_STATUS_PATH: &str = "/api/net/service/net_deploy_status";
/// `POST` on the cluster's network component: root tells a cluster that a job it is interested in changed
/// ([`JobUpdate`]).
pub const JOB_UPDATE_PATH: &str = "/api/net/job/update";
/// Default cluster-manager port a cluster registers with.
pub const DEFAULT_MANAGER_PORT: u16 = 10100;
/// Default network-component port a cluster registers with.
pub const DEFAULT_NETWORK_PORT: u16 = 10110;

/// `POST /api/information/<cluster_id>`: the periodic cluster report.
pub fn information_path(cluster_id: &str) -> String {
    format!("/api/information/{cluster_id}")
}

/// `POST` (deploy instance `n`, body = the job document holding only that instance) or `DELETE` (undeploy; `n = -1`
/// means every instance) on the cluster manager.
pub fn service_instance_path(job_id: &str, instance_number: i64) -> String {
    format!("/api/service/{job_id}/{instance_number}")
}

/// `GET`: resolve a job by name at root and register the caller's interest in it. The reference spells the dots of
/// the job name as underscores in the path.
pub fn job_by_name_path(job_name: &str) -> String {
    format!("/api/net/service/{}/instances", job_name.replace('.', "_"))
}

/// `GET`: resolve the job owning a service or instance IP (v4 dots spelled as underscores, as the reference does).
pub fn job_by_ip_path(ip: &str) -> String {
    format!("/api/net/service/ip/{}/instances", ip.replace('.', "_"))
}

/// `DELETE`: the caller is no longer interested in updates of a job.
pub fn interest_path(job_name: &str) -> String {
    format!("/api/net/interest/{job_name}")
}

/// Undoes the reference's `.` → `_` path spelling of job names and IPv4 addresses.
pub fn unescape_path_segment(segment: &str) -> String {
    segment.replace('_', ".")
}

/// Body of [`CLUSTER_REGISTER_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRegistration {
    /// The cluster's name: its identity (the same name always gets the same id).
    #[serde(deserialize_with = "serde_util::string")]
    pub cluster_name: String,
    /// Free text or `LAT,LON,RADIUS_M`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub cluster_location: String,
    /// The cluster manager's port (root calls it to deploy and undeploy).
    #[serde(default = "default_manager_port")]
    pub manager_port: u16,
    /// The cluster network component's port (root calls it with job updates).
    #[serde(default = "default_network_port")]
    pub network_component_port: u16,
    /// The address root reaches the cluster at; absent = the address the registration came from.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub cluster_address: Option<String>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_manager_port() -> u16 {
    DEFAULT_MANAGER_PORT
}

fn default_network_port() -> u16 {
    DEFAULT_NETWORK_PORT
}

/// Answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRegistered {
    /// The cluster id (24 hex digits), stable per cluster name.
    pub id: String,
    /// The per-cluster secret both sides present as `Authorization: Bearer` from now on. A re-registration
    /// replaces it.
    pub token: String,
}

/// Body of [`DEPLOY_RESULT_PATH`] as a cluster sends it about one instance root asked it to run.
///
/// The reference's scheduler posts `{job_id, candidate_id}` or `{job_id, status}`; clusters put `"<job>/<n>"` in
/// `job_id`. Both spellings are read: `instance_number` or a `/<n>` suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployResult {
    /// The job id, or `"<job_id>/<instance_number>"`.
    #[serde(deserialize_with = "serde_util::string")]
    pub job_id: String,
    /// The instance number, when not in `job_id`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub instance_number: Option<i64>,
    /// The chosen worker, on success.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub candidate_id: Option<String>,
    /// The negative scheduling status, on failure (`NO_WORKER_CAPACITY`, …).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub status: Option<String>,
    /// Human-readable detail.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub status_detail: Option<String>,
}

impl DeployResult {
    /// The job id and instance number this result is about (`None` for the number when neither spelling has it).
    pub fn target(&self) -> (&str, Option<i64>) {
        if let Some((job, n)) = self.job_id.split_once('/')
            && let Ok(n) = n.parse::<i64>()
        {
            return (job, Some(n));
        }
        (self.job_id.as_str(), self.instance_number)
    }
}

/// Answer of [`SUBNET_PATH`]: one worker subnet in both families.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetAllocation {
    /// The /26 network address, e.g. `10.18.0.64`.
    #[serde(deserialize_with = "serde_util::string")]
    pub subnet_addr: String,
    /// The /120 network address, e.g. `fc00::100`.
    #[serde(deserialize_with = "serde_util::string")]
    pub subnet_addr_v6: String,
}

/// Body of [`NET_DEPLOY_STATUS_PATH`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetDeployStatus {
    /// The job id.
    #[serde(deserialize_with = "serde_util::string")]
    pub job_id: String,
    /// The instances the sending cluster placed in the overlay (namespace IPs, host IP and port).
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub instances: Vec<InstanceEntry>,
}

/// A job as root's network side describes it to clusters (answer of [`job_by_name_path`] / [`job_by_ip_path`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetJob {
    /// The job id.
    #[serde(rename = "_id", default, deserialize_with = "serde_util::string")]
    pub id: String,
    /// `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub job_name: String,
    /// The service's own addresses (round robin, …).
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub service_ip_list: Vec<ServiceIp>,
    /// Every instance with its addresses; entries have `service_ip` filled in.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub instance_list: Vec<InstanceEntry>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Body of [`JOB_UPDATE_PATH`] (root → cluster network component).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUpdate {
    /// `app.appns.svc.svcns`.
    #[serde(deserialize_with = "serde_util::string")]
    pub job_name: String,
    /// The instance that changed; `-1` = the whole job.
    #[serde(deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// Deployment (re-fetch) or undeployment (drop).
    #[serde(rename = "type")]
    pub kind: UpdateType,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Serialises and parses back, expecting the same value.
    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let text = serde_json::to_string(v).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), v, "{text}");
    }

    #[test]
    fn registration_defaults_ports_and_keeps_extra() {
        let r: ClusterRegistration = serde_json::from_value(
            json!({"cluster_name": "c1", "cluster_location": "48.1,11.5,1000", "x": 1}),
        )
        .unwrap();
        assert_eq!(r.manager_port, 10100);
        assert_eq!(r.network_component_port, 10110);
        assert_eq!(r.cluster_address, None);
        assert_eq!(r.extra.get("x"), Some(&json!(1)));
        round_trip(&r);
        assert!(serde_json::from_value::<ClusterRegistration>(json!({"cluster_location": "x"})).is_err());
    }

    #[test]
    fn deploy_result_reads_both_spellings() {
        let a: DeployResult =
            serde_json::from_value(json!({"job_id": "abc/3", "candidate_id": "w1"})).unwrap();
        assert_eq!(a.target(), ("abc", Some(3)));
        let b: DeployResult = serde_json::from_value(
            json!({"job_id": "abc", "instance_number": "4", "status": "NO_WORKER_CAPACITY"}),
        )
        .unwrap();
        assert_eq!(b.target(), ("abc", Some(4)));
        assert_eq!(b.status.as_deref(), Some("NO_WORKER_CAPACITY"));
        let c: DeployResult = serde_json::from_value(json!({"job_id": "abc/x"})).unwrap();
        assert_eq!(c.target(), ("abc/x", None));
        round_trip(&b);
    }

    #[test]
    fn paths_escape_dots_like_the_reference() {
        assert_eq!(job_by_name_path("a.b.c.d"), "/api/net/service/a_b_c_d/instances");
        assert_eq!(
            job_by_ip_path("10.30.0.1"),
            "/api/net/service/ip/10_30_0_1/instances"
        );
        assert_eq!(unescape_path_segment("10_30_0_1"), "10.30.0.1");
        assert_eq!(service_instance_path("j", -1), "/api/service/j/-1");
        assert_eq!(information_path("c"), "/api/information/c");
    }

    #[test]
    fn job_update_and_net_job_round_trip() {
        let u: JobUpdate = serde_json::from_value(
            json!({"job_name": "a.b.c.d", "instance_number": 0, "type": "UNDEPLOYMENT"}),
        )
        .unwrap();
        assert_eq!(u.kind, UpdateType::Undeployment);
        round_trip(&u);
        let j: NetJob = serde_json::from_value(json!({
            "_id": "j1", "job_name": "a.b.c.d",
            "service_ip_list": [{"IpType": "RR", "Address": "10.30.0.1", "Address_v6": "fdff:2000::1"}],
            "instance_list": [{"instance_number": 0, "instance_ip": "10.30.0.2", "host_port": "50103"}]
        }))
        .unwrap();
        assert_eq!(j.instance_list[0].host_port, Some(50103));
        round_trip(&j);
    }
}
