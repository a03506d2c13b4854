//! Golden shape tests: every user-facing route the Oakestra dashboard, `oak-cli` and the Go CLI read answers in the
//! reference's shape (`tests/fixtures/reference/*.json`, see the README there): `_id` as `{"$oid": …}` on
//! applications, services, users and organizations (a plain string on clusters, as the reference serves them),
//! `applicationID`/`microserviceID` plain, instance metrics as text, `host_port` a number, bounded usage histories
//! and the cluster's location on every instance. Ids are accepted in both spellings wherever one comes in, and the
//! root ⇄ cluster documents keep plain string ids.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

mod support;

use axum::http::Method;
use oakestra_protocol::api::root::InstanceReport;
use serde_json::{Map, Value, json};
use support::{FakeCluster, Server, TempDir, config, eventually, login, login_answer};

/// The reference-shaped fixture `name`.
fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/reference/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The JSON kind of a value as a decoder in Go sees it: an integer literal differs from a fraction.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every place where `ours` does not have `reference`'s shape: a missing key, another JSON kind (a fraction where
/// the reference has an integer; an integer is accepted where the reference has a fraction), an empty list where
/// the reference's is not (the check would prove nothing), recursively. `optional` keys may be missing.
fn mismatches(ours: &Value, reference: &Value, path: &str, optional: &[&str], out: &mut Vec<String>) {
    match (ours, reference) {
        (Value::Object(o), Value::Object(r)) => {
            for (key, want) in r {
                let here = format!("{path}.{key}");
                match o.get(key) {
                    Some(got) => mismatches(got, want, &here, optional, out),
                    None if optional.contains(&key.as_str()) => {}
                    None => out.push(format!("{here}: missing (reference: {want})")),
                }
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            if let Some(first) = r.first() {
                if o.is_empty() {
                    out.push(format!("{path}: empty, the reference's holds {first}"));
                }
                for (i, got) in o.iter().enumerate() {
                    mismatches(got, first, &format!("{path}[{i}]"), optional, out);
                }
            }
        }
        (got, want) => {
            let (g, w) = (kind(got), kind(want));
            if g != w && !(g == "integer" && w == "number") {
                out.push(format!("{path}: {g} {got}, the reference has {w} {want}"));
            }
        }
    }
}

/// Fails with every mismatch of `ours` against fixture `name` (or a list of it when `ours` is a list).
fn assert_shape(route: &str, ours: &Value, name: &str, optional: &[&str]) {
    let one = fixture(name);
    let reference = if ours.is_array() { json!([one]) } else { one };
    let mut out = Vec::new();
    mismatches(ours, &reference, "", optional, &mut out);
    assert!(
        out.is_empty(),
        "{route} is not reference-shaped ({name}.json):\n  {}\nanswer: {ours:#}",
        out.join("\n  ")
    );
}

/// `GET path` (200) checked against fixture `name`; returns the answer.
async fn get_shaped(root: &Server, token: &str, path: &str, name: &str, optional: &[&str]) -> Value {
    let (status, body) = root.get(path, token).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    assert_shape(&format!("GET {path}"), &body, name, optional);
    body
}

/// The SLA of the fixture's service: every field the tools read is set.
fn sla() -> Value {
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": "clientsrvr",
            "application_namespace": "test",
            "application_desc": "Simple demo with curl client and Nginx server",
            "microservices": [{
                "microserviceID": "",
                "microservice_name": "nginx",
                "microservice_namespace": "test",
                "virtualization": "container",
                "cmd": ["nginx", "-g", "daemon off;"],
                "environment": ["MODE=demo"],
                "port": "80",
                "memory": 100,
                "vcpus": 1,
                "vgpus": 0,
                "code": "docker.io/library/nginx:latest",
                "addresses": {"rr_ip": "10.30.55.55"}
            }]
        }]
    })
}

/// One instance report exactly as our cluster-service writes it (numbers for usage, the port as text).
fn running_report(worker: &str, cpu: f64, memory: f64) -> Value {
    let report = InstanceReport {
        instance_number: 0,
        status: "RUNNING".into(),
        status_detail: String::new(),
        worker_id: Some(worker.into()),
        host_ip: Some("192.0.2.10".into()),
        host_port: Some("50011".into()),
        publicip: Some("192.0.2.10".into()),
        cpu_percent: Some(cpu),
        memory_percent: Some(memory),
        disk: Some(4096.0),
        logs: Some("ready\n".into()),
        last_modified_timestamp: Some(1_796_396_400.5),
        extra: Map::new(),
    };
    serde_json::to_value(report).unwrap()
}

/// A fake cluster that joined and reported room, and one instance of `job` placed on it: the cluster and root's
/// answer to the placement.
async fn one_instance_on_a_cluster(root: &Server, token: &str, job: &str) -> (FakeCluster, Value) {
    let cluster = FakeCluster::start(root, "edge").await;
    cluster.report(root, 4, 8000, json!([])).await;
    let (status, deployed) = root
        .call(
            Method::POST,
            &format!("/api/service/{job}/instance"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{deployed}");
    (cluster, deployed)
}

#[tokio::test]
async fn every_route_the_tools_read_is_reference_shaped() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;

    // Login: token + refresh_token; the JWT carries sub, roles and organization.
    let tokens = login_answer(&root, "Admin", "Admin").await;
    assert_shape("POST /api/auth/login", &tokens, "login", &["message"]);
    let token = tokens["token"].as_str().unwrap().to_owned();
    let claims = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&base64_url(claims)).unwrap();
    for claim in ["sub", "roles", "organization"] {
        assert!(claims.get(claim).is_some(), "JWT without {claim}: {claims}");
    }

    // Users, permissions and organizations.
    let admin = get_shaped(&root, &token, "/api/user/Admin", "user", &[]).await;
    let admin_id = admin["_id"]["$oid"].as_str().unwrap().to_owned();
    assert_eq!(admin_id.len(), 24);
    get_shaped(&root, &token, "/api/users/", "user", &[]).await;
    get_shaped(&root, &token, "/api/permission/Admin", "permission", &[]).await;
    let orgs = get_shaped(&root, &token, "/api/organization/", "organization", &[]).await;
    let org_id = orgs[0]["_id"]["$oid"].as_str().unwrap().to_owned();
    get_shaped(&root, &token, &format!("/api/users/{org_id}"), "user", &[]).await;
    let (status, bob) = root
        .post(
            "/api/auth/register",
            &token,
            &json!({"name": "bob", "password": "bob-password-1", "email": "bob@example.org"}),
        )
        .await;
    assert_eq!(status, 200, "{bob}");
    assert_shape("POST /api/auth/register", &bob, "user", &[]);
    let (status, org) = root
        .post(
            "/api/organization/",
            &token,
            // The dashboard sends back ids it read: `user_id` as `{"$oid": …}` is accepted.
            &json!({"name": "edge", "member": [{"user_id": bob["_id"], "roles": ["Application_Provider"]}]}),
        )
        .await;
    assert_eq!(status, 200, "{org}");
    // The reference answers the new id JSON-encoded inside a JSON string; the dashboard `JSON.parse`s it.
    assert_shape("POST /api/organization/", &org, "organization_created", &[]);
    let org_id: String = serde_json::from_str(org.as_str().unwrap()).unwrap();
    assert_eq!(org_id.len(), 24, "{org}");
    let edge = get_shaped(
        &root,
        &token,
        &format!("/api/organization/{org_id}"),
        "organization",
        &[],
    )
    .await;
    assert_eq!(edge["member"][0]["user_id"], bob["_id"]["$oid"]);

    // Applications.
    let (status, apps) = root.post("/api/application/", &token, &sla()).await;
    assert_eq!(status, 200, "{apps}");
    assert_shape("POST /api/application/", &apps, "application", &[]);
    let app_id = apps[0]["applicationID"].as_str().unwrap().to_owned();
    assert_eq!(apps[0]["_id"], json!({"$oid": app_id}));
    get_shaped(
        &root,
        &token,
        &format!("/api/applications/{admin_id}"),
        "application",
        &[],
    )
    .await;
    get_shaped(&root, &token, "/api/applications/", "application", &[]).await;
    get_shaped(
        &root,
        &token,
        &format!("/api/application/{app_id}"),
        "application",
        &[],
    )
    .await;
    // The dashboard's PUT sends the document it read back, `_id` object included.
    let mut edited = apps[0].clone();
    edited["application_desc"] = json!("edited by the dashboard");
    let (status, body) = root
        .call(
            Method::PUT,
            &format!("/api/application/{app_id}"),
            Some(&token),
            Some(&edited),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, got) = root.get(&format!("/api/application/{app_id}"), &token).await;
    assert_eq!(got["application_desc"], "edited by the dashboard");

    // Services: POST /api/service/ with the dashboard's form, applicationID as an $oid object.
    let (status, created) = root
        .post(
            "/api/service/",
            &token,
            &json!({"applicationID": {"$oid": app_id}, "microservices": [{
                "microserviceID": "", "microservice_name": "extra", "microservice_namespace": "test",
                "virtualization": "container", "cmd": [], "memory": 50, "vcpus": 1,
                "code": "docker.io/library/busybox:latest"}]}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_shape("POST /api/service/", &created, "services_created", &[]);
    let (_, extra) = root
        .call(
            Method::DELETE,
            &format!("/api/service/{}", created["job_id"].as_str().unwrap()),
            Some(&token),
            None,
        )
        .await;
    assert_shape("DELETE /api/service/<id>", &extra, "message", &[]);

    let (status, services) = root.get(&format!("/api/services/{app_id}"), &token).await;
    assert_eq!(status, 200, "{services}");
    let job = services[0]["microserviceID"].as_str().unwrap().to_owned();
    assert_eq!(services[0]["_id"], json!({"$oid": job}));

    // A cluster runs one instance and reports it, as our cluster-service does.
    let (cluster, deployed) = one_instance_on_a_cluster(&root, &token, &job).await;
    assert_shape("POST /api/service/<id>/instance", &deployed, "message", &[]);
    // The deploy document root sends the cluster keeps a plain string `_id` (a reference worker decodes a string).
    let deploy = cluster
        .wait_for("deploy", |c| {
            c.method == Method::POST && c.path == format!("/api/service/{job}/0")
        })
        .await;
    assert_eq!(deploy.body["_id"], json!(job), "{}", deploy.body);
    assert_eq!(
        deploy.body["instance_list"][0]["cluster_location"],
        "48.1,11.6,1000"
    );
    let samples = [(1.25, 0.5), (2.0, 0.75), (3.5, 1.0)];
    for (cpu, memory) in samples {
        let jobs = json!([{"_id": job, "job_name": "clientsrvr.test.nginx.test", "status": "RUNNING",
                           "instance_list": [running_report("6650c0ffee00000000000004", cpu, memory)]}]);
        let (status, body) = cluster.report(&root, 4, 8000, jobs).await;
        assert_eq!(status, 200, "{body}");
    }

    let service = get_shaped(&root, &token, &format!("/api/service/{job}"), "service", &[]).await;
    let instance = &service["instance_list"][0];
    assert_eq!(instance["cluster_location"], "48.1,11.6,1000");
    assert_eq!(instance["cpu_percent"], "3.5");
    assert_eq!(instance["memory_percent"], "1");
    assert_eq!(instance["disk"], "4096");
    assert_eq!(instance["host_port"], json!(50011));
    let values = |key: &str| -> Vec<Value> {
        instance[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"].clone())
            .collect()
    };
    assert_eq!(values("cpu_history"), [json!("1.25"), json!("2"), json!("3.5")]);
    assert_eq!(
        values("memory_history"),
        [json!("0.5"), json!("0.75"), json!("1")]
    );
    let stamp = instance["cpu_history"][0]["timestamp"].as_str().unwrap();
    assert!(
        stamp.len() == 27 && stamp.as_bytes()[10] == b'T' && stamp.starts_with("20") && stamp.ends_with('Z'),
        "ISO 8601 UTC timestamp: {stamp}"
    );
    get_shaped(&root, &token, &format!("/api/services/{app_id}"), "service", &[]).await;
    get_shaped(&root, &token, "/api/services/", "service", &[]).await;

    // Clusters: a plain string `_id`, and the reference's compatibility fields with integer counts.
    let clusters = get_shaped(&root, &token, "/api/clusters/", "cluster", &[]).await;
    assert_eq!(clusters[0]["_id"], json!(cluster.id));
    get_shaped(&root, &token, "/api/clusters/active", "cluster", &[]).await;

    // Deleting the instance and the application answer the reference's messages.
    let (_, body) = root
        .call(
            Method::DELETE,
            &format!("/api/service/{job}/instance/0"),
            Some(&token),
            None,
        )
        .await;
    assert_shape("DELETE /api/service/<id>/instance/<n>", &body, "message", &[]);
    let (_, body) = root
        .call(
            Method::DELETE,
            &format!("/api/application/{app_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_shape("DELETE /api/application/<id>", &body, "message", &[]);
    cluster.stop();
}

#[tokio::test]
async fn histories_keep_the_last_hundred_samples() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = login(&root, "Admin", "Admin").await;
    let (status, apps) = root.post("/api/application/", &token, &sla()).await;
    assert_eq!(status, 200, "{apps}");
    let job = apps[0]["microservices"][0].as_str().unwrap().to_owned();
    let (cluster, _) = one_instance_on_a_cluster(&root, &token, &job).await;
    for i in 0..105 {
        let mut instance = running_report("w", f64::from(i), 0.5);
        // A reference cluster sends its own (unbounded here) history: root keeps its own instead.
        instance["cpu_history"] = json!(vec![json!({"value": "9", "timestamp": "t"}); 500]);
        let jobs = json!([{"_id": job, "job_name": "clientsrvr.test.nginx.test", "status": "RUNNING",
                           "instance_list": [instance]}]);
        let (status, body) = cluster.report(&root, 4, 8000, jobs).await;
        assert_eq!(status, 200, "{body}");
    }
    let history = eventually("the service", || async {
        let (status, service) = root.get(&format!("/api/service/{job}"), &token).await;
        (status == 200).then(|| service["instance_list"][0]["cpu_history"].clone())
    })
    .await;
    let values: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_str().unwrap())
        .collect();
    assert_eq!(values.len(), 100, "{history}");
    assert_eq!(values[0], "5");
    assert_eq!(values[99], "104");
    cluster.stop();
}

/// Decodes unpadded base64url (a JWT segment).
fn base64_url(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0_u32, 0);
    for c in text.bytes() {
        let v = u32::try_from(ALPHABET.iter().position(|&a| a == c).unwrap()).unwrap();
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    out
}

#[test]
fn the_shape_check_catches_what_breaks_the_tools() {
    let reference = fixture("service");
    let check = |ours: &Value| {
        let mut out = Vec::new();
        mismatches(ours, &reference, "", &[], &mut out);
        out
    };
    assert!(check(&reference).is_empty(), "{:?}", check(&reference));
    // A plain string id (the dashboard reads `_id.$oid`).
    let mut plain = reference.clone();
    plain["_id"] = json!("6650c0ffee00000000000002");
    assert_eq!(check(&plain).len(), 1, "{:?}", check(&plain));
    // A fraction where Go decodes an int, a number where it decodes a string, a missing history.
    let mut typed = reference.clone();
    typed["memory"] = json!(100.0);
    typed["instance_list"][0]["cpu_percent"] = json!(1.25);
    typed["instance_list"][0]
        .as_object_mut()
        .unwrap()
        .remove("memory_history");
    assert_eq!(check(&typed).len(), 3, "{:?}", check(&typed));
    // An empty instance list proves nothing about instances.
    let mut empty = reference.clone();
    empty["instance_list"] = json!([]);
    assert_eq!(check(&empty).len(), 1, "{:?}", check(&empty));
    // More keys and an integer where the reference has a fraction are fine.
    let mut more = reference.clone();
    more["extra"] = json!(1);
    more["instance_list"][0]["last_modified_timestamp"] = json!(1_796_396_400_i64);
    assert!(check(&more).is_empty(), "{:?}", check(&more));
}
