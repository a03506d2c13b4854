//! The NetManager's local HTTP API on its unix socket: paths and request/response bodies, as the reference NodeEngine
//! calls them.
//!
//! Deploys attach an instance's network namespace to the overlay; the same bodies serve containers and unikernels.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::serde_util;

/// Where the NetManager listens by default (the NodeEngine's `overlay_network: "default"`).
pub const DEFAULT_SOCKET_PATH: &str = "/etc/netmanager/netmanager.sock";
/// `POST`: hand the NetManager the node id and cluster address ([`RegisterRequest`]). Must come before any deploy.
pub const PATH_REGISTER: &str = "/register";
/// `POST`: attach a container ([`ContainerDeployRequest`] → [`ContainerDeployResponse`]).
pub const PATH_CONTAINER_DEPLOY: &str = "/container/deploy";
/// `POST`: detach a container ([`UndeployRequest`]).
pub const PATH_CONTAINER_UNDEPLOY: &str = "/container/undeploy";
/// `POST`: legacy alias of [`PATH_CONTAINER_UNDEPLOY`].
pub const PATH_DOCKER_UNDEPLOY: &str = "/docker/undeploy";
/// `POST`: attach a unikernel ([`ContainerDeployRequest`], `pid` ignored).
pub const PATH_UNIKERNEL_DEPLOY: &str = "/unikernel/deploy";
/// `POST`: detach a unikernel ([`UndeployRequest`]).
pub const PATH_UNIKERNEL_UNDEPLOY: &str = "/unikernel/undeploy";
/// `GET` (oakestra-rs only; a reference NetManager answers 404): the daemon's state as JSON, with `registered`
/// and the plumbed `instances` (`job`, `instance`), which a NodeEngine checks to re-attach after a NetManager
/// restart.
pub const PATH_STATUS: &str = "/status";

/// `POST /register` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The worker's node id; the NetManager uses it as its MQTT client id and topic segment.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub client_id: String,
    /// The cluster (MQTT broker) address.
    #[serde(default, deserialize_with = "serde_util::string")]
    pub cluster_address: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /container/deploy` and `/unikernel/deploy` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDeployRequest {
    /// A process inside the instance's network namespace (the NodeEngine sends 0 for unikernels, which ignore it).
    #[serde(default, deserialize_with = "serde_util::i64")]
    pub pid: i64,
    /// The job name `app.appns.svc.svcns` (must have exactly 4 dot-separated parts).
    #[serde(rename = "serviceName", default, deserialize_with = "serde_util::string")]
    pub service_name: String,
    /// The instance number.
    #[serde(rename = "instanceNumber", default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// The port-mapping string, e.g. `80:8080/tcp;5000/udp` (may be empty).
    #[serde(rename = "portMappings", default, deserialize_with = "serde_util::string")]
    pub port_mappings: String,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The 200 answer to a deploy: the namespace addresses the instance got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDeployResponse {
    /// Echo of the request's service name.
    #[serde(rename = "serviceName", default, deserialize_with = "serde_util::string")]
    pub service_name: String,
    /// Namespace IPv4, e.g. `10.18.0.2`.
    #[serde(rename = "nsAddress", default, deserialize_with = "serde_util::string")]
    pub ns_address: String,
    /// Namespace IPv6, e.g. `fc00::2`; the reference's unikernel path sends the text `"<nil>"`.
    #[serde(rename = "nsAddressv6", default, deserialize_with = "serde_util::string")]
    pub ns_address_v6: String,
    /// oakestra-rs extension, only in `/unikernel/deploy` answers: how the guest's NIC is wired (a reference
    /// NetManager leaves it out; a reference NodeEngine ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestNic>,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The guest side of a unikernel attach: the NetManager made the named network namespace `netns` holding the tap
/// `tap`, bridged at layer 2 to the instance's veth, and left the namespace addresses unassigned there: the guest
/// owns them (`nsAddress`/`nsAddressv6` of the answer) with the MAC `mac`, and routes through the gateways.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    /// The named network namespace (`ip netns` name; its file is `/var/run/netns/<netns>`), where QEMU must run.
    pub netns: String,
    /// The tap device inside `netns` that QEMU opens (`-netdev tap,ifname=<tap>,script=no`).
    pub tap: String,
    /// The MAC the guest's NIC must use (`-device virtio-net-pci,mac=<mac>`): the overlay delivers to it.
    pub mac: String,
    /// IPv4 default gateway (the worker bridge), e.g. `10.18.0.1`.
    pub gateway: String,
    /// IPv4 prefix length of the worker subnet (26).
    pub prefix: u8,
    /// IPv6 default gateway, e.g. `fc00::1`.
    pub gateway_v6: String,
    /// IPv6 prefix length (120).
    pub prefix_v6: u8,
    /// The overlay's MTU: the guest's NIC must not send larger frames (QEMU's `host_mtu` tells it so). 0:
    /// unknown.
    #[serde(default)]
    pub mtu: u32,
}

impl ContainerDeployResponse {
    /// [`Self::ns_address`] parsed.
    pub fn ns_ipv4(&self) -> Option<Ipv4Addr> {
        self.ns_address.parse().ok()
    }

    /// [`Self::ns_address_v6`] parsed (`None` for `"<nil>"`).
    pub fn ns_ipv6(&self) -> Option<Ipv6Addr> {
        self.ns_address_v6.parse().ok()
    }
}

/// `POST /container/undeploy`, `/docker/undeploy` and `/unikernel/undeploy` body. The NodeEngine also sends
/// `pid: -1` and `portMappings`; the NetManager only reads the name and number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeployRequest {
    /// The job name.
    #[serde(rename = "serviceName", default, deserialize_with = "serde_util::string")]
    pub service_name: String,
    /// The instance number.
    #[serde(rename = "instanceNumber", default, deserialize_with = "serde_util::i64")]
    pub instance_number: i64,
    /// `-1` from the NodeEngine; absent from other callers.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_i64"
    )]
    pub pid: Option<i64>,
    /// The deploy's port mappings, if the caller sends them.
    #[serde(
        rename = "portMappings",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "serde_util::opt_string"
    )]
    pub port_mappings: Option<String>,
    /// Every other key, verbatim (also makes the type accept only a JSON object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl UndeployRequest {
    /// The minimal body `{serviceName, instanceNumber}`.
    pub fn new(service_name: impl Into<String>, instance_number: i64) -> Self {
        Self {
            service_name: service_name.into(),
            instance_number,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::test_util::round_trip;

    const REGISTER: &str = r#"{"client_id":"6650c0ffee00000000000002","cluster_address":"192.168.1.2"}"#;
    const DEPLOY: &str = r#"{"pid":1234,"serviceName":"app.ns.svc.ns","instanceNumber":0,"portMappings":"80:8080/tcp;5000/udp"}"#;
    const DEPLOYED: &str =
        r#"{"serviceName":"app.ns.svc.ns","nsAddress":"10.18.0.2","nsAddressv6":"fc00::2"}"#;
    const UNDEPLOY_NODE_ENGINE: &str =
        r#"{"serviceName":"app.ns.svc.ns","instanceNumber":0,"pid":-1,"portMappings":""}"#;
    const UNDEPLOY_MINIMAL: &str = r#"{"serviceName":"app.ns.svc.ns","instanceNumber":3}"#;

    #[test]
    fn goldens_round_trip() {
        let r: RegisterRequest = round_trip(REGISTER);
        assert_eq!(r.client_id, "6650c0ffee00000000000002");
        let d: ContainerDeployRequest = round_trip(DEPLOY);
        assert_eq!(
            (d.pid, d.service_name.as_str(), d.port_mappings.as_str()),
            (1234, "app.ns.svc.ns", "80:8080/tcp;5000/udp")
        );
        let ok: ContainerDeployResponse = round_trip(DEPLOYED);
        assert_eq!(
            (ok.ns_ipv4(), ok.ns_ipv6()),
            (Some(Ipv4Addr::new(10, 18, 0, 2)), "fc00::2".parse().ok())
        );
        let u: UndeployRequest = round_trip(UNDEPLOY_NODE_ENGINE);
        assert_eq!((u.pid, u.port_mappings.as_deref()), (Some(-1), Some("")));
        assert_eq!(
            round_trip::<UndeployRequest>(UNDEPLOY_MINIMAL),
            UndeployRequest::new("app.ns.svc.ns", 3)
        );
    }

    #[test]
    fn lenient_reads() {
        let d: ContainerDeployRequest =
            serde_json::from_str(r#"{"pid":"1234","serviceName":"a.b.c.d","instanceNumber":"2"}"#).unwrap();
        assert_eq!(
            (d.pid, d.instance_number, d.port_mappings.as_str()),
            (1234, 2, "")
        );
        assert_eq!(serde_json::to_value(&d).unwrap()["instanceNumber"], json!(2));
        let nil: ContainerDeployResponse = serde_json::from_str(
            r#"{"serviceName":"a.b.c.d","nsAddress":"10.18.0.3","nsAddressv6":"<nil>"}"#,
        )
        .unwrap();
        assert_eq!(nil.ns_ipv6(), None);
    }

    fn parse_all(s: &str) -> bool {
        [
            serde_json::from_str::<RegisterRequest>(s).is_ok(),
            serde_json::from_str::<ContainerDeployRequest>(s).is_ok(),
            serde_json::from_str::<ContainerDeployResponse>(s).is_ok(),
            serde_json::from_str::<UndeployRequest>(s).is_ok(),
        ]
        .contains(&true)
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for s in ["", "null", "[]", "0", "\"x\"", "{", r#"{"pid":"#] {
            assert!(!parse_all(s), "accepted {s:?}");
        }
        assert!(serde_json::from_str::<ContainerDeployRequest>(r#"{"pid":"abc"}"#).is_err());
        assert!(serde_json::from_str::<ContainerDeployRequest>(r#"{"instanceNumber":0.5}"#).is_err());
        assert!(serde_json::from_str::<UndeployRequest>(r#"{"pid":[]}"#).is_err());
        assert!(serde_json::from_str::<RegisterRequest>(r#"{"client_id":{}}"#).is_err());
    }

    #[test]
    fn paths_are_the_references() {
        assert_eq!(
            [
                PATH_REGISTER,
                PATH_CONTAINER_DEPLOY,
                PATH_CONTAINER_UNDEPLOY,
                PATH_DOCKER_UNDEPLOY,
                PATH_UNIKERNEL_DEPLOY,
                PATH_UNIKERNEL_UNDEPLOY,
                DEFAULT_SOCKET_PATH
            ],
            [
                "/register",
                "/container/deploy",
                "/container/undeploy",
                "/docker/undeploy",
                "/unikernel/deploy",
                "/unikernel/undeploy",
                "/etc/netmanager/netmanager.sock"
            ]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_all(&s);
        }

        #[test]
        fn truncated_goldens_are_errors(which in 0usize..5, cut in 0usize..500) {
            let golden = [REGISTER, DEPLOY, DEPLOYED, UNDEPLOY_NODE_ENGINE, UNDEPLOY_MINIMAL][which];
            prop_assert!(!parse_all(&golden[..cut % golden.len()]));
        }
    }
}
