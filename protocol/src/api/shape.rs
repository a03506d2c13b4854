//! Type checks of the JSON bodies clusters send root, run before the lenient parsers of [`super::federation`] and
//! [`super::root`] read them.
//!
//! The lenient parsers accept every JSON type a reference peer is known to send for a field (numbers as strings,
//! `null` for a Go zero value) and fall back to defaults for the rest, so on their own they turn
//! `{"cluster_name": 1}` into a cluster named `1` and a report with `"vcpus": "lots"` into one with no cores. The
//! checks here refuse a wrong type with a [`TypeError`] naming the field (as a path: `jobs[0].instance_list[2].
//! instance_number`), the value and the expected type, while still accepting each shape the reference sends:
//!
//! - an absent field or `null` stands for "not given" wherever the field is optional;
//! - numbers may be sent as strings holding a number (`"cpu_percent": "12.5"`), integers also as integral floats
//!   (`3.0`), and the empty string is the reference's zero value for a missing port;
//! - keys root does not read are not checked (worker documents carry many).

use std::fmt;

use serde_json::{Map, Value};

/// A field of a body has the wrong JSON type (or a required one is missing).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct TypeError {
    /// Where, as a path from the body (`cluster_name`, `jobs[0]._id`).
    pub field: String,
    /// The value found; `None` when the field is missing.
    pub value: Option<Value>,
    /// What the field must be.
    pub expected: &'static str,
}

/// Longest rendering of an offending value in a [`TypeError`]'s message.
const MAX_SHOWN: usize = 120;

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            None => write!(f, "{} is missing: expected {}", self.field, self.expected),
            Some(value) => {
                let mut shown = value.to_string();
                if shown.len() > MAX_SHOWN {
                    let mut end = MAX_SHOWN;
                    while !shown.is_char_boundary(end) {
                        end -= 1;
                    }
                    shown.truncate(end);
                    shown.push('…');
                }
                write!(f, "{} = {shown}: expected {}", self.field, self.expected)
            }
        }
    }
}

/// What a field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string.
    Text,
    /// A string or a number (kept as text by the parser, e.g. a port the reference sends either way).
    TextOrNumber,
    /// An integer: a JSON integer, an integral float, a string holding an integer, or `""` (the reference's zero
    /// value).
    Integer,
    /// A number, or a string holding one (or `""`).
    Number,
    /// A port: a JSON integer from 0 to 65535.
    Port,
    /// A list of strings (numbers are read as their text), or one string.
    Texts,
    /// A list.
    List,
    /// An object.
    Object,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Self::Text => "a string",
            Self::TextOrNumber => "a string or a number",
            Self::Integer => "an integer (or a string holding one)",
            Self::Number => "a number (or a string holding one)",
            Self::Port => "an integer from 0 to 65535",
            Self::Texts => "a list of strings",
            Self::List => "a list",
            Self::Object => "an object",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match (self, value) {
            (Self::Text, Value::String(_))
            | (Self::TextOrNumber, Value::String(_) | Value::Number(_))
            | (Self::List, Value::Array(_))
            | (Self::Object, Value::Object(_)) => true,
            (Self::Integer, Value::Number(n)) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0)
            }
            (Self::Integer, Value::String(s)) => {
                let t = s.trim();
                t.is_empty() || t.parse::<i64>().is_ok()
            }
            (Self::Number, Value::Number(_)) => true,
            (Self::Number, Value::String(s)) => {
                let t = s.trim();
                t.is_empty() || t.parse::<f64>().is_ok_and(f64::is_finite)
            }
            (Self::Port, Value::Number(n)) => n.as_u64().is_some_and(|p| p <= u64::from(u16::MAX)),
            (Self::Texts, Value::String(_)) => true,
            // Numbers too: the aggregation concatenates whatever the workers list, and the parser keeps their text.
            (Self::Texts, Value::Array(items)) => items.iter().all(|i| i.is_string() || i.is_number()),
            _ => false,
        }
    }
}

/// Whether a field must be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Absent or `null` is refused.
    Required,
    /// Absent or `null` means "not given".
    Optional,
}

use Kind::{Integer, List, Number, Object, Port, Text, TextOrNumber, Texts};
use Presence::{Optional, Required};

/// The checks of one object: each field, its kind and whether it must be there.
pub type Fields = [(&'static str, Kind, Presence)];

/// `path` joined with `key`.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `value` (found at `path`) must be an object whose `fields` have their kinds; returns the object.
pub fn check_object<'a>(
    path: &str,
    value: &'a Value,
    fields: &Fields,
) -> Result<&'a Map<String, Value>, TypeError> {
    let Value::Object(object) = value else {
        return Err(TypeError {
            field: if path.is_empty() {
                "the body".into()
            } else {
                path.to_owned()
            },
            value: Some(value.clone()),
            expected: Object.expected(),
        });
    };
    for &(key, kind, presence) in fields {
        match object.get(key) {
            None | Some(Value::Null) if presence == Optional => {}
            None | Some(Value::Null) => {
                return Err(TypeError {
                    field: join(path, key),
                    value: object.get(key).cloned(),
                    expected: kind.expected(),
                });
            }
            Some(v) if kind.admits(v) => {}
            Some(v) => {
                return Err(TypeError {
                    field: join(path, key),
                    value: Some(v.clone()),
                    expected: kind.expected(),
                });
            }
        }
    }
    Ok(object)
}

/// Runs `each` on every element of the list at `object[key]` (absent or `null`: none), with its path.
fn each_element(
    path: &str,
    object: &Map<String, Value>,
    key: &str,
    mut each: impl FnMut(&str, &Value) -> Result<(), TypeError>,
) -> Result<(), TypeError> {
    if let Some(Value::Array(items)) = object.get(key) {
        let at = join(path, key);
        for (n, item) in items.iter().enumerate() {
            each(&format!("{at}[{n}]"), item)?;
        }
    }
    Ok(())
}

/// `POST /api/cluster/register` ([`super::federation::ClusterRegistration`]).
pub fn cluster_registration(body: &Value) -> Result<(), TypeError> {
    check_object(
        "",
        body,
        &[
            ("cluster_name", Text, Required),
            ("cluster_location", Text, Optional),
            ("manager_port", Port, Optional),
            ("network_component_port", Port, Optional),
            ("cluster_address", Text, Optional),
        ],
    )
    .map(drop)
}

/// `POST /api/result/deploy` ([`super::federation::DeployResult`]).
pub fn deploy_result(body: &Value) -> Result<(), TypeError> {
    check_object(
        "",
        body,
        &[
            ("job_id", Text, Required),
            ("instance_number", Integer, Optional),
            ("candidate_id", Text, Optional),
            ("status", Text, Optional),
            ("status_detail", Text, Optional),
        ],
    )
    .map(drop)
}

/// The fields of an instance entry of the network tables ([`crate::mqtt::net::InstanceEntry`]).
const INSTANCE_ENTRY: &Fields = &[
    ("instance_number", Integer, Optional),
    ("instance_ip", Text, Optional),
    ("instance_ip_v6", Text, Optional),
    ("namespace_ip", Text, Optional),
    ("namespace_ip_v6", Text, Optional),
    ("host_ip", Text, Optional),
    ("host_port", Integer, Optional),
    ("cluster_id", Text, Optional),
    ("worker_id", Text, Optional),
    ("service_ip", List, Optional),
];

/// `POST /api/net/service/net_deploy_status` ([`super::federation::NetDeployStatus`]).
pub fn net_deploy_status(body: &Value) -> Result<(), TypeError> {
    let object = check_object(
        "",
        body,
        &[("job_id", Text, Required), ("instances", List, Optional)],
    )?;
    each_element("", object, "instances", |at, item| {
        check_object(at, item, INSTANCE_ENTRY).map(drop)
    })
}

/// The numeric fields of a cluster's aggregate (and of each per-architecture aggregate) root reads.
const AGGREGATE: &Fields = &[
    ("active_nodes", Integer, Optional),
    ("cpu_percent", Number, Optional),
    ("memory_percent", Number, Optional),
    ("vcpus", Number, Optional),
    ("memory", Number, Optional),
    ("vgpus", Number, Optional),
    ("max_node_vcpus", Number, Optional),
    ("max_node_memory", Number, Optional),
];

/// `POST /api/information/<cluster_id>` ([`super::root::ClusterReport`]): the aggregate's fields root reads, each
/// per-architecture aggregate, and every job with its instances.
pub fn cluster_report(body: &Value) -> Result<(), TypeError> {
    let mut top = AGGREGATE.to_vec();
    top.extend_from_slice(&[
        ("virtualization", Texts, Optional),
        ("supported_addons", Texts, Optional),
        ("csi_drivers", List, Optional),
        ("aggregation_per_architecture", Object, Optional),
        ("jobs", List, Optional),
    ]);
    let object = check_object("", body, &top)?;
    if let Some(Value::Object(per_arch)) = object.get("aggregation_per_architecture") {
        for (arch, aggregate) in per_arch {
            check_object(
                &format!("aggregation_per_architecture.{arch}"),
                aggregate,
                AGGREGATE,
            )?;
        }
    }
    each_element("", object, "jobs", |at, job| {
        let job = check_object(
            at,
            job,
            &[
                ("_id", Text, Required),
                ("job_name", Text, Optional),
                ("status", Text, Optional),
                ("status_detail", Text, Optional),
                ("instance_list", List, Optional),
            ],
        )?;
        each_element(at, job, "instance_list", |at, instance| {
            check_object(
                at,
                instance,
                &[
                    ("instance_number", Integer, Required),
                    ("status", Text, Optional),
                    ("status_detail", Text, Optional),
                    ("worker_id", Text, Optional),
                    ("host_ip", Text, Optional),
                    ("host_port", TextOrNumber, Optional),
                    ("publicip", Text, Optional),
                    ("cpu_percent", Number, Optional),
                    ("memory_percent", Number, Optional),
                    ("disk", Number, Optional),
                    ("logs", Text, Optional),
                    ("last_modified_timestamp", Number, Optional),
                ],
            )
            .map(drop)
        })
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::api::{federation, root};

    fn refused(check: fn(&Value) -> Result<(), TypeError>, body: Value) -> TypeError {
        check(&body).expect_err(&body.to_string())
    }

    #[test]
    fn registration_needs_a_string_name_and_integer_ports() {
        let e = refused(cluster_registration, json!({"cluster_name": 1}));
        assert_eq!(e.field, "cluster_name");
        assert_eq!(e.value, Some(json!(1)));
        assert_eq!(e.to_string(), "cluster_name = 1: expected a string");
        let e = refused(cluster_registration, json!({"cluster_location": "x"}));
        assert_eq!(e.to_string(), "cluster_name is missing: expected a string");
        let e = refused(
            cluster_registration,
            json!({"cluster_name": "c", "manager_port": "10100"}),
        );
        assert_eq!(e.field, "manager_port");
        let e = refused(
            cluster_registration,
            json!({"cluster_name": "c", "manager_port": 70000}),
        );
        assert_eq!(e.expected, "an integer from 0 to 65535");
        let e = refused(cluster_registration, json!([1, 2]));
        assert_eq!(e.field, "the body");
        // What our cluster-service sends.
        let ours = federation::ClusterRegistration {
            cluster_name: "c1".into(),
            cluster_location: "48.1,11.6,1000".into(),
            manager_port: 10100,
            network_component_port: 10110,
            cluster_address: None,
            extra: Map::new(),
        };
        cluster_registration(&serde_json::to_value(&ours).unwrap()).unwrap();
        cluster_registration(&json!({"cluster_name": "c1", "cluster_address": null, "x": [1]})).unwrap();
    }

    #[test]
    fn deploy_results_accept_the_reference_spellings() {
        deploy_result(&json!({"job_id": "abc/3", "candidate_id": "w1"})).unwrap();
        deploy_result(&json!({"job_id": "abc", "instance_number": "4", "status": "NO_WORKER_CAPACITY"}))
            .unwrap();
        deploy_result(&json!({"job_id": "abc", "instance_number": 4.0, "status_detail": null})).unwrap();
        let e = refused(deploy_result, json!({"job_id": 7}));
        assert_eq!(e.field, "job_id");
        let e = refused(deploy_result, json!({"job_id": "a", "instance_number": "four"}));
        assert_eq!(
            e.to_string(),
            "instance_number = \"four\": expected an integer (or a string holding one)"
        );
        let e = refused(deploy_result, json!({"job_id": "a", "status": ["x"]}));
        assert_eq!(e.field, "status");
    }

    #[test]
    fn net_deploy_status_checks_every_instance() {
        net_deploy_status(&json!({"job_id": "j", "instances": [
            {"instance_number": 0, "namespace_ip": "10.18.0.3", "host_ip": "192.168.1.2", "host_port": "50103"},
            {"instance_number": "1", "host_port": ""},
        ]}))
        .unwrap();
        net_deploy_status(&json!({"job_id": "j", "instances": null})).unwrap();
        let e = refused(
            net_deploy_status,
            json!({"job_id": "j", "instances": [{}, {"host_ip": 5}]}),
        );
        assert_eq!(e.field, "instances[1].host_ip");
        let e = refused(net_deploy_status, json!({"job_id": "j", "instances": [3]}));
        assert_eq!(e.field, "instances[0]");
        let e = refused(net_deploy_status, json!({"job_id": "j", "instances": {"a": 1}}));
        assert_eq!(e.expected, "a list");
    }

    #[test]
    fn reports_check_the_fields_root_reads() {
        let workers = [json!({
            "vcpus": 4, "memory": 2048, "cpu_percent": "12.5", "memory_percent": 30, "architecture": "amd64",
            "virtualization": ["docker"], "csi_drivers": [{"csi_driver_name": "nfs"}], "system_info": {"k": 1},
        })
        .as_object()
        .unwrap()
        .clone()];
        let mut body = root::aggregate_workers(&workers);
        body.insert(
            "jobs".into(),
            json!([{"_id": "j1", "job_name": "a.b.c.d", "status": "RUNNING", "instance_list": [
                {"instance_number": 0, "status": "RUNNING", "host_port": 50103, "cpu_percent": "3.5"},
                {"instance_number": "1", "host_port": "50104", "publicip": "1.2.3.4"},
            ]}]),
        );
        let mut body = Value::Object(body);
        cluster_report(&body).unwrap();
        body["vcpus"] = json!("lots");
        assert_eq!(refused(cluster_report, body.clone()).field, "vcpus");
        body["vcpus"] = json!("4");
        cluster_report(&body).unwrap();
        body["aggregation_per_architecture"]["amd64"]["memory"] = json!(true);
        assert_eq!(
            refused(cluster_report, body.clone()).field,
            "aggregation_per_architecture.amd64.memory"
        );
        body["aggregation_per_architecture"]["amd64"]["memory"] = json!(2048);
        body["jobs"][0]["instance_list"][1]["instance_number"] = json!(null);
        let e = refused(cluster_report, body.clone());
        assert_eq!(e.field, "jobs[0].instance_list[1].instance_number");
        assert_eq!(e.value, Some(Value::Null));
        body["jobs"][0]["instance_list"][1]["instance_number"] = json!(1);
        body["jobs"][0]["_id"] = json!({"$oid": "x"});
        assert_eq!(refused(cluster_report, body.clone()).field, "jobs[0]._id");
        body["jobs"] = json!("none");
        assert_eq!(refused(cluster_report, body).field, "jobs");
    }

    #[test]
    fn long_values_are_cut_in_the_message() {
        let e = refused(cluster_registration, json!({"cluster_name": ["x".repeat(1000)]}));
        let text = e.to_string();
        assert!(text.len() < 250 && text.contains('…'), "{text}");
    }

    proptest! {
        /// Whatever JSON arrives, the checks answer (never panic), and what they accept the lenient parsers read.
        #[test]
        fn accepted_bodies_parse(name in prop_oneof![Just(json!("c")), Just(json!(1)), Just(json!(null))],
                                 port in prop_oneof![Just(json!(1)), Just(json!("1")), Just(json!(-1)), Just(json!(1.5))],
                                 n in prop_oneof![Just(json!(2)), Just(json!("2")), Just(json!("x")), Just(json!(2.0))]) {
            let reg = json!({"cluster_name": name, "manager_port": port});
            if cluster_registration(&reg).is_ok() {
                prop_assert!(serde_json::from_value::<federation::ClusterRegistration>(reg).is_ok());
            }
            let result = json!({"job_id": "j", "instance_number": n});
            if deploy_result(&result).is_ok() {
                prop_assert!(serde_json::from_value::<federation::DeployResult>(result).is_ok());
            }
            let status = json!({"job_id": "j", "instances": [{"instance_number": n, "host_port": port}]});
            if net_deploy_status(&status).is_ok() {
                prop_assert!(serde_json::from_value::<federation::NetDeployStatus>(status).is_ok());
            }
        }
    }
}
