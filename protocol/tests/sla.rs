//! SLA validation against the seed examples and a catalogue of malformed descriptors, through the public API.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic with its message is the failure report"
)]

use oakestra_protocol::sla::{self, Descriptor, SlaError, Virtualization};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// === The seed examples =====================================================================================

#[test]
fn every_seed_example_parses_and_validates() {
    for name in [
        "seed-clientsrvr.json",
        "seed-dashboard-nginx.json",
        "seed-unikernel.json",
        "seed-release-unikernel.json",
        "seed-release-ipv6.json",
        "seed-release-oneshot.json",
        "seed-constraints.json",
    ] {
        let parsed = sla::parse(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            parsed.warnings.is_empty(),
            "{name}: unexpected warnings {:?}",
            parsed.warnings
        );
    }
}

#[test]
fn clientsrvr_model() {
    let sla = sla::parse_sla(&fixture("seed-clientsrvr.json")).unwrap().value;
    assert_eq!(sla.customer_id, "Admin");
    let app = &sla.applications[0];
    assert_eq!(
        (app.application_name.as_str(), app.application_namespace.as_str()),
        ("clientsrvr", "test")
    );
    let [curl, nginx] = app.microservices.as_slice() else {
        panic!("two services expected")
    };
    assert_eq!(
        curl.job_name(app).unwrap().to_string(),
        "clientsrvr.test.curl.test"
    );
    assert_eq!(
        nginx.job_name(app).unwrap().to_string(),
        "clientsrvr.test.nginx.test"
    );
    assert_eq!(curl.cmd, ["sh", "-c", "curl 10.30.55.55 ; sleep 5"]);
    assert_eq!(nginx.virtualization, Virtualization::Container);
    assert_eq!(nginx.addresses.rr_ip.as_deref(), Some("10.30.55.55"));
    assert_eq!(nginx.port_mappings().unwrap().len(), 1);
    assert_eq!((nginx.memory, nginx.vcpus), (100, 1));
    assert!(!curl.one_shot);
}

#[test]
fn container_is_stored_as_docker() {
    let sla = sla::parse_sla(&fixture("seed-clientsrvr.json")).unwrap().value;
    let stored = serde_json::to_value(&sla).unwrap();
    assert_eq!(
        stored["applications"][0]["microservices"][0]["virtualization"],
        "docker"
    );
    // The stored form validates again (a job document round-trips through the validator).
    let again = sla::validate::sla_from_value(stored).unwrap().value;
    assert_eq!(
        again.applications[0].microservices[0].virtualization,
        Virtualization::Container
    );
}

#[test]
fn dashboard_and_release_examples() {
    let Descriptor::Services(list) = sla::parse(&fixture("seed-release-ipv6.json")).unwrap().value else {
        panic!("dashboard form expected")
    };
    assert_eq!(
        list.microservices[0].addresses.rr_ip_v6.as_deref(),
        Some("fdff:2000::55:55")
    );
    let one_shot = sla::parse_services(&fixture("seed-release-oneshot.json"))
        .unwrap()
        .value;
    assert!(one_shot.microservices[0].one_shot);
    let uni = sla::parse_services(&fixture("seed-release-unikernel.json"))
        .unwrap()
        .value;
    let svc = &uni.microservices[0];
    assert_eq!(svc.virtualization, Virtualization::Unikernel);
    assert_eq!(
        svc.unikernel_images(),
        [(
            "https://github.com/oakestra/oakestra/releases/download/alpha-v0.4.301/nginx_amd64.tar.gz",
            "amd64"
        )]
    );
}

#[test]
fn constraint_examples() {
    let sla = sla::parse_sla(&fixture("seed-constraints.json")).unwrap().value;
    let direct = &sla.applications[0].microservices[0].constraints[0];
    assert_eq!(direct.kind, "direct");
    assert_eq!(direct.nodes(), ["xavier1", "xavier2"]);
    assert_eq!(direct.cluster.as_deref(), Some("gpu"));
    let allowed = &sla.applications[0].microservices[1].constraints[0];
    assert_eq!(
        allowed.allowed.as_deref(),
        Some(&["cluster1".to_owned(), "cluster2".to_owned()][..])
    );
}

// === Unknown fields and normalisation ======================================================================

#[test]
fn unknown_fields_are_kept_and_warned() {
    let mut doc: Value = serde_json::from_str(&fixture("seed-clientsrvr.json")).unwrap();
    doc["applications"][0]["microservices"][1]["team"] = json!("vision");
    doc["applications"][0]["labels"] = json!({"tier": "edge"});
    doc["applications"][0]["microservices"][1]["addresses"]["anycast"] = json!(true);
    let v = sla::parse_sla(&doc.to_string()).unwrap();
    let paths: Vec<&str> = v.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "applications[0].labels",
            "applications[0].microservices[1].team",
            "applications[0].microservices[1].addresses.anycast",
        ]
    );
    assert!(v.warnings.iter().all(|w| w.rule == "unknown field, kept as is"));
    let back = serde_json::to_value(&v.value).unwrap();
    assert_eq!(back["applications"][0]["microservices"][1]["team"], "vision");
    assert_eq!(back["applications"][0]["labels"]["tier"], "edge");
    assert_eq!(
        back["applications"][0]["microservices"][1]["addresses"]["anycast"],
        true
    );
}

#[test]
fn harmless_spellings_are_normalised() {
    let mut doc: Value = serde_json::from_str(&fixture("seed-dashboard-nginx.json")).unwrap();
    let svc = &mut doc["microservices"][0];
    svc["memory"] = json!(100.0);
    svc["port"] = Value::Null;
    svc["addresses"] = json!({"rr_ip": "", "rr_ip_v6": "FDFF:2000:0:0:0:0:0:7"});
    let list = sla::parse_services(&doc.to_string()).unwrap().value;
    let svc = &list.microservices[0];
    assert_eq!(svc.memory, 100);
    assert_eq!(svc.port, "");
    assert_eq!(svc.addresses.rr_ip, None);
    assert_eq!(svc.addresses.rr_ip_v6.as_deref(), Some("FDFF:2000:0:0:0:0:0:7"));
}

// === Malformed descriptors =================================================================================

enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
}
use Edit::{Remove, Set};

/// Applies edits (JSON pointers) to a fixture and returns the validation error.
fn refuse(base: &str, edits: Vec<Edit>) -> SlaError {
    let mut doc: Value = serde_json::from_str(&fixture(base)).unwrap();
    for edit in edits {
        match edit {
            Set(ptr, v) => {
                let (parent, key) = ptr.rsplit_once('/').unwrap();
                let target = doc.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
                match target {
                    Value::Object(o) => {
                        o.insert(key.to_owned(), v);
                    }
                    Value::Array(a) => {
                        let i = key.parse::<usize>().unwrap();
                        if i == a.len() { a.push(v) } else { a[i] = v }
                    }
                    _ => panic!("{parent} is not a container"),
                }
            }
            Remove(ptr) => {
                let (parent, key) = ptr.rsplit_once('/').unwrap();
                doc.pointer_mut(parent)
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .remove(key);
            }
        }
    }
    sla::parse(&doc.to_string()).expect_err("descriptor must be refused")
}

const APP: &str = "seed-clientsrvr.json";
const S0: &str = "/applications/0/microservices/0";
const S1: &str = "/applications/0/microservices/1";
const P0: &str = "applications[0].microservices[0]";
const P1: &str = "applications[0].microservices[1]";

fn s0(k: &str) -> &'static str {
    Box::leak(format!("{S0}/{k}").into_boxed_str())
}
fn s1(k: &str) -> &'static str {
    Box::leak(format!("{S1}/{k}").into_boxed_str())
}

/// Each case: base fixture, edits, then the one expected problem (path, part of the rule).
fn cases() -> Vec<(&'static str, Vec<Edit>, String, &'static str)> {
    let p0 = |k: &str| format!("{P0}.{k}");
    let p1 = |k: &str| format!("{P1}.{k}");
    vec![
        (
            APP,
            vec![Set("/applications/0/application_name", json!("client-srvr"))],
            "applications[0].application_name".into(),
            "1-30 ASCII letters or digits",
        ),
        (
            APP,
            vec![Set("/applications/0/application_name", json!("a".repeat(31)))],
            "applications[0].application_name".into(),
            "1-30 ASCII",
        ),
        (
            APP,
            vec![Set("/applications/0/application_namespace", json!(""))],
            "applications[0].application_namespace".into(),
            "1-30 ASCII",
        ),
        (
            APP,
            vec![Set(s1("microservice_name"), json!("my-svc"))],
            p1("microservice_name"),
            "1-30 ASCII letters or digits",
        ),
        (
            APP,
            vec![Remove(s1("microservice_namespace"))],
            p1("microservice_namespace"),
            "is required",
        ),
        (
            APP,
            vec![Set(s1("microservice_name"), json!(42))],
            p1("microservice_name"),
            "must be a string",
        ),
        (
            APP,
            vec![Set(s0("virtualization"), json!("vm"))],
            p0("virtualization"),
            "must be container or unikernel",
        ),
        (
            APP,
            vec![Remove(s0("virtualization"))],
            p0("virtualization"),
            "is required",
        ),
        (APP, vec![Remove(s0("code"))], p0("code"), "is required"),
        (
            APP,
            vec![Set(s0("code"), json!("  "))],
            p0("code"),
            "must not be empty",
        ),
        (
            APP,
            vec![Set(s0("code"), json!("nginx latest"))],
            p0("code"),
            "OCI image reference",
        ),
        (
            APP,
            vec![Set(s0("code"), json!("http://example.com/nginx.tar.gz"))],
            p0("code"),
            "OCI image reference",
        ),
        (
            APP,
            vec![Set(s0("memory"), json!(-1))],
            p0("memory"),
            "whole number from 0 to 1048576 MiB",
        ),
        (
            APP,
            vec![Set(s0("memory"), json!(2_000_000))],
            p0("memory"),
            "at most 1048576 MiB",
        ),
        (
            APP,
            vec![Set(s0("memory"), json!("100"))],
            p0("memory"),
            "whole number",
        ),
        (
            APP,
            vec![Set(s0("memory"), json!(1.5))],
            p0("memory"),
            "whole number",
        ),
        (
            APP,
            vec![Set(s0("vcpus"), json!(5000))],
            p0("vcpus"),
            "at most 1024 vCPUs",
        ),
        (
            APP,
            vec![Set(s0("vgpus"), json!(65))],
            p0("vgpus"),
            "at most 64 GPUs",
        ),
        (
            APP,
            vec![Set(s0("storage"), json!(true))],
            p0("storage"),
            "whole number",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("80:80/sctp"))],
            p1("port"),
            "must be tcp or udp",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("70000"))],
            p1("port"),
            "from 1 to 65535",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("80;80:8080"))],
            p1("port"),
            "already mapped",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("50103:80/udp"))],
            p1("port"),
            "reserved for the overlay",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("abc"))],
            p1("port"),
            "from 1 to 65535",
        ),
        (
            APP,
            vec![Set(s1("port"), json!("1:2:3"))],
            p1("port"),
            "host[:container][/tcp|/udp]",
        ),
        (
            APP,
            vec![Set(s1("port"), json!(80))],
            p1("port"),
            "must be a string",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip"), json!("10.31.0.1"))],
            p1("addresses.rr_ip"),
            "inside the service range 10.30.0.0/16",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip"), json!("10.30.300.1"))],
            p1("addresses.rr_ip"),
            "decimal octets",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip"), json!("10.30.055.55"))],
            p1("addresses.rr_ip"),
            "decimal octets",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip"), json!("10.30"))],
            p1("addresses.rr_ip"),
            "IPv4 address",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip"), json!("10.30.0.0"))],
            p1("addresses.rr_ip"),
            "network or broadcast",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip_v6"), json!("fdff:3000::1"))],
            p1("addresses.rr_ip_v6"),
            "fdff:2000::/21",
        ),
        (
            APP,
            vec![Set(s1("addresses/rr_ip_v6"), json!("10.30.1.1"))],
            p1("addresses.rr_ip_v6"),
            "IPv6 address",
        ),
        (
            APP,
            vec![Set(s1("addresses/closest_ip_v6"), json!("fdff:2000::1"))],
            p1("addresses.closest_ip_v6"),
            "fdff:1000::/21",
        ),
        (
            APP,
            vec![Set(s0("addresses"), json!({"rr_ip": "10.30.55.55"}))],
            p1("addresses.rr_ip"),
            "already requested at applications[0].microservices[0].addresses.rr_ip",
        ),
        (
            APP,
            vec![
                Set(s0("addresses"), json!({"rr_ip_v6": "fdff:2000::55:55"})),
                Set(s1("addresses/rr_ip_v6"), json!("fdff:2000:0:0:0:0:55:55")),
            ],
            p1("addresses.rr_ip_v6"),
            "already requested",
        ),
        (
            APP,
            vec![Set(s1("addresses"), json!("10.30.55.55"))],
            p1("addresses"),
            "must be a JSON object",
        ),
        (
            APP,
            vec![Set(s0("arch"), json!(["x86_64"]))],
            format!("{P0}.arch[0]"),
            "must be one of amd64, arm64",
        ),
        (
            APP,
            vec![Set(s0("environment"), json!(["NOEQUALS"]))],
            format!("{P0}.environment[0]"),
            "KEY=value",
        ),
        (
            APP,
            vec![Set(s0("environment"), json!(["1X=2"]))],
            format!("{P0}.environment[0]"),
            "KEY=value",
        ),
        (
            APP,
            vec![Set(s0("environment"), json!([5]))],
            format!("{P0}.environment[0]"),
            "must be a string",
        ),
        (
            APP,
            vec![Set(s0("cmd"), json!("sh -c 'curl x'"))],
            p0("cmd"),
            "must be a JSON array",
        ),
        (
            APP,
            vec![Set(s0("one_shot"), json!("yes"))],
            p0("one_shot"),
            "true or false",
        ),
        (
            APP,
            vec![Set(s0("constraints"), json!([{"type": "magic"}]))],
            format!("{P0}.constraints[0].type"),
            "must be one of direct, clusters",
        ),
        (
            APP,
            vec![Set(s0("constraints"), json!([{"node": "n1"}]))],
            format!("{P0}.constraints[0].type"),
            "is required",
        ),
        (
            APP,
            vec![Set(s0("constraints"), json!([{"type": "direct"}]))],
            format!("{P0}.constraints[0]"),
            "needs a node list, a cluster or both",
        ),
        (
            APP,
            vec![Set(
                s0("constraints"),
                json!([{"type": "direct", "node": "n1;bad node"}]),
            )],
            format!("{P0}.constraints[0].node"),
            "must be a hostname",
        ),
        (
            APP,
            vec![Set(
                s0("constraints"),
                json!([{"type": "clusters", "allowed": []}]),
            )],
            format!("{P0}.constraints[0].allowed"),
            "at least one cluster",
        ),
        (
            APP,
            vec![Set(s0("constraints"), json!([{"type": "clusters"}]))],
            format!("{P0}.constraints[0].allowed"),
            "is required",
        ),
        (
            APP,
            vec![Set(
                s0("constraints"),
                json!([{"type": "addons", "needs": "gpu"}]),
            )],
            format!("{P0}.constraints[0].needs"),
            "must be a JSON array",
        ),
        (
            APP,
            vec![Set(s0("constraints"), json!({"type": "direct"}))],
            p0("constraints"),
            "must be a JSON array",
        ),
        (
            APP,
            vec![Set(s0("volumes"), json!([{"volume_id": "v1"}]))],
            format!("{P0}.volumes[0].csi_driver"),
            "is required",
        ),
        (
            APP,
            vec![Set(
                s0("volumes"),
                json!([{"volume_id": "v1", "csi_driver": "nfs", "mount_path": "data"}]),
            )],
            format!("{P0}.volumes[0].mount_path"),
            "absolute path",
        ),
        (
            APP,
            vec![Set("/sla_version", json!("v1.0"))],
            "sla_version".into(),
            "deprecated",
        ),
        (
            APP,
            vec![Set("/sla_version", json!("2.0"))],
            "sla_version".into(),
            "must be \"v2.0\"",
        ),
        (
            APP,
            vec![Remove("/sla_version")],
            "sla_version".into(),
            "is required",
        ),
        (
            APP,
            vec![Remove("/customerID")],
            "customerID".into(),
            "is required",
        ),
        (
            APP,
            vec![Set("/applications", json!([]))],
            "applications".into(),
            "at least one application",
        ),
        (
            APP,
            vec![Set("/applications", json!({}))],
            "applications".into(),
            "must be a JSON array",
        ),
        (
            APP,
            vec![Set("/applications/0", json!("clientsrvr"))],
            "applications[0]".into(),
            "must be a JSON object",
        ),
        (
            APP,
            vec![Set(s1("microservice_name"), json!("curl"))],
            p1("microservice_name"),
            "service already defined at applications[0].microservices[0]",
        ),
        (
            APP,
            vec![Set("/applications/1", json!(null))],
            "applications[1]".into(),
            "must be a JSON object",
        ),
        (
            "seed-unikernel.json",
            vec![Set(
                s0("code"),
                json!("https://a.example/k1.tar.gz,https://a.example/k2.tar.gz"),
            )],
            p0("arch"),
            "one arch per comma-separated code URL (2 URL(s), 1 arch entry)",
        ),
        (
            "seed-unikernel.json",
            vec![Remove(s0("arch"))],
            p0("arch"),
            "(1 URL(s), 0 arch entries)",
        ),
        (
            "seed-unikernel.json",
            vec![Set(s0("code"), json!("ftp://a.example/k.tar.gz"))],
            p0("code"),
            "http(s) URL",
        ),
        (
            "seed-dashboard-nginx.json",
            vec![Set("/microservices/0/microservice_namespace", json!("te st"))],
            "microservices[0].microservice_namespace".into(),
            "1-30 ASCII",
        ),
        (
            "seed-dashboard-nginx.json",
            vec![Set("/microservices", json!([]))],
            "microservices".into(),
            "at least one service",
        ),
    ]
}

#[test]
fn malformed_descriptors_name_path_value_and_rule() {
    let cases = cases();
    assert!(cases.len() >= 30);
    for (i, (base, edits, path, rule)) in cases.into_iter().enumerate() {
        let err = refuse(base, edits);
        let problems = err.problems();
        assert_eq!(
            problems.len(),
            1,
            "case {i} ({path}): expected exactly one problem, got {problems:#?}"
        );
        let p = &problems[0];
        assert_eq!(p.path, path, "case {i}: wrong path in {p}");
        assert!(
            p.rule.contains(rule),
            "case {i}: rule {:?} does not mention {rule:?}",
            p.rule
        );
        assert!(
            err.to_string().contains(&path),
            "case {i}: message lacks the path: {err}"
        );
    }
}

#[test]
fn the_offending_value_is_reported() {
    let err = refuse(APP, vec![Set(s1("microservice_name"), json!("my-svc"))]);
    assert_eq!(err.problems()[0].value, json!("my-svc"));
    assert_eq!(
        err.problems()[0].to_string(),
        "applications[0].microservices[1].microservice_name = \"my-svc\": must be 1-30 ASCII letters or digits"
    );
    let err = refuse(APP, vec![Set(s1("port"), json!("80;90:90/sctp"))]);
    assert_eq!(err.problems()[0].value, json!("90:90/sctp"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let err = refuse(
        APP,
        vec![
            Set("/applications/0/application_name", json!("bad name")),
            Set(s0("virtualization"), json!("vm")),
            Set(s0("memory"), json!(-5)),
            Set(s1("port"), json!("0;99999")),
            Set(s1("addresses/rr_ip"), json!("192.168.1.1")),
            Remove(s1("code")),
        ],
    );
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "applications[0].application_name",
            "applications[0].microservices[0].virtualization",
            "applications[0].microservices[0].memory",
            "applications[0].microservices[1].code",
            "applications[0].microservices[1].port",
            "applications[0].microservices[1].port",
            "applications[0].microservices[1].addresses.rr_ip",
        ]
    );
}

#[test]
fn not_json_or_not_an_object() {
    assert!(matches!(
        sla::parse("{\"sla_version\": "),
        Err(SlaError::Syntax { .. })
    ));
    let err = sla::parse("[]").unwrap_err();
    assert_eq!(err.problems()[0].path, "");
    assert!(
        err.to_string().contains("(document) = []: must be a JSON object"),
        "{err}"
    );
    let err = sla::parse("{}").unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["sla_version", "customerID", "applications"]);
}
