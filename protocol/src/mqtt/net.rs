//! NetManager ⇄ cluster service manager MQTT payloads (`nodes/<id>/net/*`) and the `jobs/<job>/updates_available`
//! broadcast.
//!
//! The reference is inconsistent about `host_port`: the NetManager publishes it as a string in `service/deployed` and
//! `address-changed` but expects an int inside `tablequery/result` (and the reference service manager echoes whatever
//! it stored). We write each message exactly as the reference writes it and read both forms. As in
//! [`super::worker`], unknown keys are kept in each payload's `extra` map.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::serde_util;

/// `METHOD` of a [`SubnetRequest`]. Unknown methods are kept verbatim (the reference ignores them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum SubnetMethod {
    /// Ask for this worker's subnet.
    Get,
    /// Release it (accepted by the reference, a no-op there).
    Delete,
    /// Any other text, kept so re-serialisation is lossless.
    Other(String),
}

impl SubnetMethod {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Get => "GET",
            Self::Delete => "DELETE",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for SubnetMethod {
    fn from(s: String) -> Self {
        match s.as_str() {
            "GET" => Self::Get,
            "DELETE" => Self::Delete,
            _ => Self::Other(s),
        }
    }
}

impl From<SubnetMethod> for String {
    fn from(m: SubnetMethod) -> Self {
        match m {
            SubnetMethod::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

/// `nodes/<id>/net/subnet` (W→C): `{"METHOD":"GET"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRequest {
    /// What to do with this worker's subnet.
    #[serde(rename = "METHOD")]
    pub method: SubnetMethod,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl SubnetRequest {
    /// `{"METHOD":"GET"}`.
    pub fn get() -> Self {
        Self {
            method: SubnetMethod::Get,
            extra: Map::new(),
        }
    }

    /// `{"METHOD":"DELETE"}`.
    pub fn delete() -> Self {
        Self {
            method: SubnetMethod::Delete,
            extra: Map::new(),
        }
    }
}

/// `nodes/<id>/net/subnetwork/result` (C→W): the worker's container subnets (first address of each).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetResult {
    /// IPv4 subnet base, e.g. `10.18.0.64`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub address: String,
    /// IPv6 subnet base, e.g. `fc00::100`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub addressv6: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl SubnetResult {
    /// [`Self::address`] parsed (`None` if empty or malformed).
    pub fn address_v4(&self) -> Option<Ipv4Addr> {
        self.address.parse().ok()
    }

    /// [`Self::addressv6`] parsed.
    pub fn address_v6(&self) -> Option<Ipv6Addr> {
        self.addressv6.parse().ok()
    }
}

/// `nodes/<id>/net/tablequery/request` (W→C): resolve a job by name or by one of its service IPs. The unused key is
/// sent as `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableQueryRequest {
    /// Job name `app.appns.svc.svcns`, or `""`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub sname: String,
    /// A service or instance IP (v4 or v6), or `""`.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub sip: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TableQueryRequest {
    /// Query by job name.
    pub fn by_name(job_name: impl Into<String>) -> Self {
        Self {
            sname: job_name.into(),
            ..Self::default()
        }
    }

    /// Query by IP.
    pub fn by_ip(ip: impl Into<String>) -> Self {
        Self {
            sip: ip.into(),
            ..Self::default()
        }
    }

    /// The key the answer's `query_key` echoes: the IP if one was given, else the name.
    pub fn query_key(&self) -> &str {
        if self.sip.is_empty() {
            &self.sname
        } else {
            &self.sip
        }
    }
}

/// `nodes/<id>/net/tablequery/result` (C→W): every instance of the resolved job.
///
/// On a resolution failure the reference still answers, with `instance_list: []` and possibly `app_name: null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableQueryResult {
    /// The job name, `null` when nothing was resolved.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub app_name: Option<String>,
    /// The request's `sip` or `sname`, echoed so the waiting query can be matched.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub query_key: String,
    /// The job's instances.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub instance_list: Vec<InstanceEntry>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TableQueryResult {
    /// Whether this result answers a query for `key`: the reference matches `app_name`, `query_key` or any service
    /// address (v4 or v6).
    pub fn answers(&self, key: &str) -> bool {
        self.app_name.as_deref() == Some(key)
            || self.query_key == key
            || self
                .instance_list
                .iter()
                .flat_map(|i| &i.service_ip)
                .any(|s| s.address == key || s.address_v6 == key)
    }
}

/// One instance in a [`TableQueryResult`]: the service manager's instance document plus `service_ip`.
///
/// Addresses are optional because an instance that is scheduled but not yet deployed has none (the NetManager skips
/// such entries); absent fields stay absent on re-serialisation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceEntry {
    /// The instance number.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// The instance's own service IP (v4).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub instance_ip: Option<String>,
    /// The instance's own service IP (v6).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub instance_ip_v6: Option<String>,
    /// The instance's namespace (real) IP on its worker (v4).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub namespace_ip: Option<String>,
    /// The instance's namespace IP (v6).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub namespace_ip_v6: Option<String>,
    /// The worker's IP, where the tunnel ends.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub host_ip: Option<String>,
    /// The worker's tunnel port: an **int** here (the reference NetManager rejects a string), read from either.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub host_port: Option<i64>,
    /// The cluster running the instance.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub cluster_id: Option<String>,
    /// The worker running the instance (absent until it reported `service/deployed`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub worker_id: Option<String>,
    /// The addresses this instance answers on, one per balancing policy.
    #[serde(default, deserialize_with = "serde_util::or_default")]
    pub service_ip: Vec<ServiceIp>,
    /// Every other key of the instance document, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl InstanceEntry {
    /// [`Self::host_port`] as a port number (`None` if absent or out of range).
    pub fn host_port_u16(&self) -> Option<u16> {
        self.host_port.and_then(|p| u16::try_from(p).ok())
    }
}

/// One address of an instance with its balancing policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIp {
    /// The balancing policy of this address.
    #[serde(rename = "IpType", default)]
    pub ip_type: IpType,
    /// The IPv4 address.
    #[serde(rename = "Address", default, deserialize_with = "serde_util::string")]
    pub address: String,
    /// The IPv6 address.
    #[serde(rename = "Address_v6", default, deserialize_with = "serde_util::string")]
    pub address_v6: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `IpType` of a [`ServiceIp`], spelled as the reference service manager spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum IpType {
    /// `"RR"`: round robin over all instances.
    RoundRobin,
    /// `"Closest"`: the closest instance.
    Closest,
    /// `"InstanceNumber"`: one fixed instance.
    InstanceNumber,
    /// `"instance_ip"`: the instance's own address (what the service manager sends for it).
    #[default]
    InstanceIp,
    /// Any other text; the reference NetManager treats it like an instance address. Kept verbatim.
    Other(String),
}

impl IpType {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::RoundRobin => "RR",
            Self::Closest => "Closest",
            Self::InstanceNumber => "InstanceNumber",
            Self::InstanceIp => "instance_ip",
            Self::Other(s) => s,
        }
    }

    /// The reference NetManager's table code: `InstanceNumber = 0`, `Closest = 1`, `RoundRobin = 2`; every other
    /// string (including `"instance_ip"`) maps to 0.
    pub fn table_code(&self) -> u8 {
        match self {
            Self::RoundRobin => 2,
            Self::Closest => 1,
            Self::InstanceNumber | Self::InstanceIp | Self::Other(_) => 0,
        }
    }
}

impl fmt::Display for IpType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for IpType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "RR" => Self::RoundRobin,
            "Closest" => Self::Closest,
            "InstanceNumber" => Self::InstanceNumber,
            "instance_ip" => Self::InstanceIp,
            _ => Self::Other(s),
        }
    }
}

impl From<IpType> for String {
    fn from(t: IpType) -> Self {
        match t {
            IpType::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

/// `nodes/<id>/net/service/deployed` (W→C): an instance got its namespace addresses on this worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDeployed {
    /// The job name.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub appname: String,
    /// Always [`ServiceDeployed::DEPLOYED`] from the reference.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub status: String,
    /// The instance number.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// Namespace IPv4.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub nsip: String,
    /// Namespace IPv6.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub nsipv6: String,
    /// The worker's IP.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub host_ip: String,
    /// The worker's tunnel port, a **string** on the wire here.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub host_port: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ServiceDeployed {
    /// The only status the reference sends.
    pub const DEPLOYED: &'static str = "DEPLOYED";

    /// A `DEPLOYED` notification.
    pub fn new(
        appname: impl Into<String>,
        instance_number: i64,
        nsip: impl Into<String>,
        nsipv6: impl Into<String>,
        host_ip: impl Into<String>,
        host_port: u16,
    ) -> Self {
        Self {
            appname: appname.into(),
            status: Self::DEPLOYED.to_owned(),
            instance_number,
            nsip: nsip.into(),
            nsipv6: nsipv6.into(),
            host_ip: host_ip.into(),
            host_port: host_port.to_string(),
            extra: Map::new(),
        }
    }

    /// [`Self::host_port`] as a port number.
    pub fn host_port_u16(&self) -> Option<u16> {
        self.host_port.trim().parse().ok()
    }
}

/// `nodes/<id>/net/service/address-changed` (W→C): the worker's IP or tunnel port changed.
///
/// The reference reuses the `service/deployed` message with `status`, `nsip` and `nsipv6` left `""`, so those keys
/// are on the wire too; we write them the same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressChanged {
    /// The job name.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub appname: String,
    /// Always `""` from the reference.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub status: String,
    /// The instance number.
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// Always `""` from the reference.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub nsip: String,
    /// Always `""` from the reference.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub nsipv6: String,
    /// The worker's new IP.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub host_ip: String,
    /// The worker's tunnel port, a **string** on the wire here.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub host_port: String,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AddressChanged {
    /// The notification as the reference NetManager builds it.
    pub fn new(
        appname: impl Into<String>,
        instance_number: i64,
        host_ip: impl Into<String>,
        host_port: u16,
    ) -> Self {
        Self {
            appname: appname.into(),
            instance_number,
            host_ip: host_ip.into(),
            host_port: host_port.to_string(),
            ..Self::default()
        }
    }

    /// [`Self::host_port`] as a port number.
    pub fn host_port_u16(&self) -> Option<u16> {
        self.host_port.trim().parse().ok()
    }
}

/// `nodes/<id>/net/interest/remove` (W→C): this worker no longer needs updates about a job (or a raw IP key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestRemove {
    /// The job name, or the IP string a marker interest was registered for.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub appname: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl InterestRemove {
    /// Drop interest in `appname`.
    pub fn new(appname: impl Into<String>) -> Self {
        Self {
            appname: appname.into(),
            extra: Map::new(),
        }
    }
}

/// `type` of an [`UpdatesAvailable`] broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum UpdateType {
    /// Instances were added or moved.
    Deployment,
    /// Instances were removed.
    Undeployment,
    /// Any other text, kept verbatim (the reference worker ignores the content anyway).
    Other(String),
}

impl UpdateType {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Deployment => "DEPLOYMENT",
            Self::Undeployment => "UNDEPLOYMENT",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for UpdateType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "DEPLOYMENT" => Self::Deployment,
            "UNDEPLOYMENT" => Self::Undeployment,
            _ => Self::Other(s),
        }
    }
}

impl From<UpdateType> for String {
    fn from(t: UpdateType) -> Self {
        match t {
            UpdateType::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

/// `jobs/<job>/updates_available` (C→W): the job's instance table changed; interested workers re-query it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatesAvailable {
    /// What changed.
    #[serde(rename = "type")]
    pub kind: UpdateType,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl UpdatesAvailable {
    /// `{"type":"DEPLOYMENT"}`.
    pub fn deployment() -> Self {
        Self {
            kind: UpdateType::Deployment,
            extra: Map::new(),
        }
    }

    /// `{"type":"UNDEPLOYMENT"}`.
    pub fn undeployment() -> Self {
        Self {
            kind: UpdateType::Undeployment,
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

    const SUBNET_GET: &str = r#"{"METHOD":"GET"}"#;
    const SUBNET_RESULT: &str = r#"{"address":"10.18.0.64","addressv6":"fc00::100"}"#;
    const QUERY_BY_IP: &str = r#"{"sname":"","sip":"10.30.0.2"}"#;
    const QUERY_BY_NAME: &str = r#"{"sname":"shop.prod.cart.prod","sip":""}"#;
    /// A service-manager answer: one deployed instance (with Mongo fields the worker ignores) and one that is only
    /// scheduled.
    const TABLE_RESULT: &str = r#"{"app_name":"shop.prod.cart.prod","query_key":"10.30.0.2","instance_list":[
        {"instance_number":0,"instance_ip":"10.30.0.3","instance_ip_v6":"fdff:2000::3","namespace_ip":"10.18.0.66",
         "namespace_ip_v6":"fc00::102","host_ip":"192.168.1.5","host_port":50103,"cluster_id":"6650c0ffee00000000000001",
         "worker_id":"6650c0ffee00000000000002","status":"RUNNING","cluster_location":"48.1,11.6,1000",
         "service_ip":[{"IpType":"RR","Address":"10.30.0.2","Address_v6":"fdff:2000::2"},
                       {"IpType":"Closest","Address":"10.30.0.4","Address_v6":"fdff:2000::4"},
                       {"IpType":"instance_ip","Address":"10.30.0.3","Address_v6":"fdff:2000::3"}]},
        {"instance_number":1,"instance_ip":"10.30.0.5","instance_ip_v6":"fdff:2000::5","cluster_id":"6650c0ffee00000000000001",
         "service_ip":[{"IpType":"RR","Address":"10.30.0.2","Address_v6":"fdff:2000::2"}]}]}"#;
    const TABLE_MISS: &str = r#"{"app_name":null,"query_key":"10.30.9.9","instance_list":[]}"#;
    const DEPLOYED: &str = r#"{"appname":"shop.prod.cart.prod","status":"DEPLOYED","instance_number":0,
        "nsip":"10.18.0.66","nsipv6":"fc00::102","host_ip":"192.168.1.5","host_port":"50103"}"#;
    const ADDRESS_CHANGED: &str = r#"{"appname":"shop.prod.cart.prod","status":"","instance_number":2,"nsip":"",
        "nsipv6":"","host_ip":"192.168.1.6","host_port":"50104"}"#;
    const INTEREST_REMOVE: &str = r#"{"appname":"shop.prod.cart.prod"}"#;
    const UPDATES: &str = r#"{"type":"UNDEPLOYMENT"}"#;

    #[test]
    fn subnet_goldens() {
        assert_eq!(round_trip::<SubnetRequest>(SUBNET_GET), SubnetRequest::get());
        assert_eq!(serde_json::to_string(&SubnetRequest::get()).unwrap(), SUBNET_GET);
        assert_eq!(
            serde_json::to_string(&SubnetRequest::delete()).unwrap(),
            r#"{"METHOD":"DELETE"}"#
        );
        let other: SubnetRequest = round_trip(r#"{"METHOD":"PUT"}"#);
        assert_eq!(other.method, SubnetMethod::Other("PUT".into()));
        let r: SubnetResult = round_trip(SUBNET_RESULT);
        assert_eq!(r.address_v4(), Some(Ipv4Addr::new(10, 18, 0, 64)));
        assert_eq!(r.address_v6(), "fc00::100".parse().ok());
        assert_eq!(SubnetResult::default().address_v4(), None);
    }

    #[test]
    fn table_query_goldens() {
        let by_ip: TableQueryRequest = round_trip(QUERY_BY_IP);
        assert_eq!(
            (by_ip.clone(), by_ip.query_key()),
            (TableQueryRequest::by_ip("10.30.0.2"), "10.30.0.2")
        );
        let by_name: TableQueryRequest = round_trip(QUERY_BY_NAME);
        assert_eq!(by_name, TableQueryRequest::by_name("shop.prod.cart.prod"));
        assert_eq!(by_name.query_key(), "shop.prod.cart.prod");

        let r: TableQueryResult = round_trip(TABLE_RESULT);
        let first = &r.instance_list[0];
        assert_eq!(first.host_port_u16(), Some(50103));
        assert_eq!(first.extra["status"], json!("RUNNING"));
        let types: Vec<_> = first
            .service_ip
            .iter()
            .map(|s| (s.ip_type.as_str(), s.ip_type.table_code()))
            .collect();
        assert_eq!(types, [("RR", 2), ("Closest", 1), ("instance_ip", 0)]);
        let second = &r.instance_list[1];
        assert_eq!(
            (
                second.namespace_ip.as_deref(),
                second.host_port,
                second.worker_id.as_deref()
            ),
            (None, None, None)
        );
        assert!(r.answers("10.30.0.2") && r.answers("shop.prod.cart.prod") && r.answers("fdff:2000::4"));
        assert!(!r.answers("10.30.0.99"));

        let miss: TableQueryResult = round_trip(TABLE_MISS);
        assert_eq!((miss.app_name, miss.instance_list.len()), (None, 0));
    }

    #[test]
    fn table_result_reads_the_service_managers_string_port() {
        // The reference service manager echoes host_port as it stored it (a string); we read it and write an int.
        let r: TableQueryResult = serde_json::from_str(
            r#"{"app_name":"a.b.c.d","query_key":"a.b.c.d","instance_list":[{"worker_id":"w","instance_number":"0",
                "host_port":"50103","service_ip":[{"IpType":"InstanceNumber","Address":"10.30.0.7","Address_v6":"fdff::7"},
                {"IpType":"Weird","Address":"10.30.0.8"}]}]}"#,
        )
        .unwrap();
        let i = &r.instance_list[0];
        assert_eq!(i.host_port, Some(50103));
        assert_eq!(serde_json::to_value(i).unwrap()["host_port"], json!(50103));
        assert_eq!(i.service_ip[0].ip_type, IpType::InstanceNumber);
        // Unknown policies behave like instance addresses but keep their spelling.
        assert_eq!(
            (
                i.service_ip[1].ip_type.table_code(),
                i.service_ip[1].ip_type.to_string()
            ),
            (0, "Weird".into())
        );
        assert_eq!(
            serde_json::to_value(&i.service_ip[1]).unwrap(),
            json!({"IpType":"Weird","Address":"10.30.0.8","Address_v6":""})
        );
    }

    #[test]
    fn deployed_and_address_changed_goldens() {
        let d: ServiceDeployed = round_trip(DEPLOYED);
        assert_eq!(
            d,
            ServiceDeployed::new(
                "shop.prod.cart.prod",
                0,
                "10.18.0.66",
                "fc00::102",
                "192.168.1.5",
                50103
            )
        );
        assert_eq!(d.host_port_u16(), Some(50103));
        // A numeric port from another peer is read, and written back as the reference's string.
        let n: ServiceDeployed =
            serde_json::from_str(r#"{"appname":"a","host_port":50103,"instance_number":"1"}"#).unwrap();
        assert_eq!((n.host_port.as_str(), n.instance_number), ("50103", 1));
        assert_eq!(serde_json::to_value(&n).unwrap()["host_port"], json!("50103"));

        let a: AddressChanged = round_trip(ADDRESS_CHANGED);
        assert_eq!(
            a,
            AddressChanged::new("shop.prod.cart.prod", 2, "192.168.1.6", 50104)
        );
        assert_eq!(a.host_port_u16(), Some(50104));
        let extra: AddressChanged = round_trip(
            r#"{"appname":"a","status":"","instance_number":0,"nsip":"","nsipv6":"",
            "host_ip":"h","host_port":"1","future":[1,2]}"#,
        );
        assert_eq!(extra.extra["future"], json!([1, 2]));
    }

    #[test]
    fn interest_and_updates_goldens() {
        assert_eq!(
            round_trip::<InterestRemove>(INTEREST_REMOVE),
            InterestRemove::new("shop.prod.cart.prod")
        );
        assert_eq!(
            round_trip::<UpdatesAvailable>(UPDATES),
            UpdatesAvailable::undeployment()
        );
        assert_eq!(
            serde_json::to_string(&UpdatesAvailable::deployment()).unwrap(),
            r#"{"type":"DEPLOYMENT"}"#
        );
        let odd: UpdatesAvailable = round_trip(r#"{"type":"RESCALE"}"#);
        assert_eq!(odd.kind, UpdateType::Other("RESCALE".into()));
    }

    const GOLDENS: [&str; 11] = [
        SUBNET_GET,
        SUBNET_RESULT,
        QUERY_BY_IP,
        QUERY_BY_NAME,
        TABLE_RESULT,
        TABLE_MISS,
        DEPLOYED,
        ADDRESS_CHANGED,
        INTEREST_REMOVE,
        UPDATES,
        r#"{"METHOD":"DELETE"}"#,
    ];

    /// Parses `s` as every payload; true if any accepted it.
    fn parse_all(s: &str) -> bool {
        [
            serde_json::from_str::<SubnetRequest>(s).is_ok(),
            serde_json::from_str::<SubnetResult>(s).is_ok(),
            serde_json::from_str::<TableQueryRequest>(s).is_ok(),
            serde_json::from_str::<TableQueryResult>(s).is_ok(),
            serde_json::from_str::<ServiceDeployed>(s).is_ok(),
            serde_json::from_str::<AddressChanged>(s).is_ok(),
            serde_json::from_str::<InterestRemove>(s).is_ok(),
            serde_json::from_str::<UpdatesAvailable>(s).is_ok(),
        ]
        .contains(&true)
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for s in ["", "null", "[]", "7", "\"GET\"", "{", "{\"METHOD\""] {
            assert!(!parse_all(s), "accepted {s:?}");
        }
        for bad in [r#"{"METHOD":1}"#, r#"{}"#] {
            assert!(serde_json::from_str::<SubnetRequest>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<UpdatesAvailable>(r#"{"type":null}"#).is_err());
        assert!(serde_json::from_str::<TableQueryResult>(r#"{"instance_list":{}}"#).is_err());
        assert!(
            serde_json::from_str::<TableQueryResult>(r#"{"instance_list":[{"host_port":"eighty"}]}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<TableQueryResult>(r#"{"instance_list":[{"service_ip":[{"IpType":2}]}]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<ServiceDeployed>(r#"{"instance_number":"zero"}"#).is_err());
        assert!(serde_json::from_str::<SubnetResult>(r#"{"address":[]}"#).is_err());
        assert!(serde_json::from_str::<InterestRemove>(r#"{"appname":{}}"#).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_all(&s);
        }

        #[test]
        fn truncated_goldens_are_errors(which in 0usize..GOLDENS.len(), cut in 0usize..2000) {
            let golden = GOLDENS[which];
            prop_assert!(!parse_all(&golden[..cut % golden.len()]));
        }

        #[test]
        fn mutated_goldens_never_panic(which in 0usize..GOLDENS.len(), at in 0usize..2000, b in 0x20u8..0x7f) {
            let mut bytes = GOLDENS[which].as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] = b;
            let _ = parse_all(&String::from_utf8(bytes).unwrap());
        }
    }
}
