//! Addons against a real dockerd and a local registry, both inside a network namespace this test creates, with
//! root-service as a child process in the same namespace:
//! - the marketplace: publish → `under_review` → `approved` (also on the reference ports 11102/11101); a missing image → `verification_failed` with the
//!   reason; bad descriptors → 422 with field paths; a non-admin → 403; installing an unapproved addon → 409;
//! - the engine: the sample extension runs with its declared ports, labels and network → `active`; killed, it is
//!   restarted once, killed again it is `failed` with its log; disabled, its container is gone; its record deleted
//!   while it runs, the cleanup check removes it;
//! - hot swap: with two clusters, the sample scheduler plugin installed in the `root_scheduler` slot decides the next
//!   placements (root not restarted); its container stopped, placements fall back to the built-in scheduler within
//!   one timeout; uninstalled, the built-in scheduler is back. Prints the placement latency (p50/p99 of 100
//!   placements) with the plugin and built in.

#![allow(clippy::unwrap_used, clippy::print_stderr, reason = "tests")]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use oakestra_runtime::client;
use oakestra_tests::{
    docker::{Dockerd, HELLO_IMAGE, HELLO_TEXT, Registry, SCHEDULER_IMAGE, addon_images, hello_page},
    harness::{Proc, eventually, free_port},
    netns::{Netns, output_ok, require_root},
    stack::login,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const JOIN: &str = "addons-test-join-token";

async fn call(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> client::Response {
    client::call(method.parse().unwrap(), url, token, body, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// root-service in the test's namespace.
struct Root {
    url: String,
    admin: String,
    proc: Proc,
    args: Vec<String>,
    dir: PathBuf,
    restarts: u32,
}

impl Root {
    async fn start(netns: &str, dir: &Path, socket: &Path) -> Self {
        let port = free_port();
        let args: Vec<String> = [
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
            &dir.join("root").display().to_string(),
            "--join-token",
            JOIN,
            "--docker-socket",
            &socket.display().to_string(),
            "--addons-poll-interval",
            "1",
            "--plugin-timeout-ms",
            "2000",
            "--liveness-window",
            "20",
            "--addons-reference-ports",
        ]
        .map(str::to_owned)
        .to_vec();
        let proc = Proc::start_in_net(netns, "root-service", &args, dir.join("root.log"));
        let url = format!("http://127.0.0.1:{port}");
        let admin = login(&url, "Admin", "Admin", &proc).await;
        Self {
            url,
            admin,
            proc,
            args,
            dir: dir.to_owned(),
            restarts: 0,
        }
    }

    async fn restart(&mut self, netns: &str, between: impl FnOnce()) {
        self.proc.terminate(Duration::from_secs(10));
        between();
        self.restarts += 1;
        let log = self.dir.join(format!("root-{}.log", self.restarts));
        self.proc = Proc::start_in_net(netns, "root-service", &self.args, log);
        self.admin = login(&self.url, "Admin", "Admin", &self.proc).await;
    }

    async fn get(&self, path: &str) -> client::Response {
        call("GET", &format!("{}{path}", self.url), Some(&self.admin), None).await
    }

    async fn post(&self, path: &str, body: &Value) -> client::Response {
        call(
            "POST",
            &format!("{}{path}", self.url),
            Some(&self.admin),
            Some(body),
        )
        .await
    }

    /// Waits until `GET path` satisfies `pred` and returns the body.
    async fn wait(&self, what: &str, secs: u64, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.get(path).await;
            if r.status == 200 && pred(&r.body) {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; last: {} {}\nroot log:\n{}",
                r.status,
                r.body,
                tail(&self.proc.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A stand-in cluster: registered and reporting like a cluster-service, answering root's calls with 200.
struct FakeCluster {
    id: String,
    task: tokio::task::JoinHandle<()>,
}

async fn answer_ok(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0_u8; 4096];
            // Read the head and the announced body, then answer 200.
            loop {
                let Ok(n) = s.read(&mut chunk).await else { return };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let body = r#"{"status":"ok"}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        });
    }
}

impl FakeCluster {
    async fn start(root: &Root, name: &str, memory_mib: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(answer_ok(listener));
        let r = call(
            "POST",
            &format!("{}/api/cluster/register", root.url),
            Some(JOIN),
            Some(
                &json!({"cluster_name": name, "cluster_location": "48.1,11.6,1000", "manager_port": port,
                         "network_component_port": port, "cluster_address": "127.0.0.1"}),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "register {name}: {}", r.body);
        let id = r.body["id"].as_str().unwrap().to_owned();
        let secret = r.body["token"].as_str().unwrap().to_owned();
        let worker = json!({"vcpus": 8, "memory": memory_mib, "cpu_percent": 10.0, "memory_percent": 20.0,
                            "architecture": "amd64", "virtualization": ["docker"], "vgpus": 0});
        let workers = [worker.as_object().unwrap().clone()];
        let mut body = oakestra_protocol::api::root::aggregate_workers(&workers);
        body.insert("jobs".into(), json!([]));
        let url = format!("{}/api/information/{id}", root.url);
        let body = Value::Object(body);
        let task = tokio::spawn(async move {
            loop {
                let _ = client::call(
                    "POST".parse().unwrap(),
                    &url,
                    Some(&secret),
                    Some(&body),
                    Duration::from_secs(2),
                )
                .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Self { id, task }
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates an application with one service (`memory` MiB) and returns the service id.
async fn service(root: &Root, app: &str, memory: u64) -> String {
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
        "applicationID": "", "application_name": app, "application_namespace": "test", "application_desc": "",
        "microservices": [{"microserviceID": "", "microservice_name": "svc", "microservice_namespace": "test",
                           "virtualization": "container", "memory": memory, "vcpus": 0,
                           "code": "docker.io/library/nginx:latest"}]}]});
    let apps = root.post("/api/application", &sla).await;
    assert_eq!(apps.status, 200, "{}", apps.body);
    let app_id = apps
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["application_name"] == json!(app))
        .unwrap()["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned();
    let services = root.get(&format!("/api/services/{app_id}")).await;
    services.body[0]["_id"]["$oid"].as_str().unwrap().to_owned()
}

/// Requests one more instance of `job` and returns the cluster root placed it on, with the request's duration.
async fn place(root: &Root, job: &str) -> (String, Duration) {
    let before = root.get(&format!("/api/service/{job}")).await.body["instance_list"]
        .as_array()
        .map_or(0, Vec::len);
    let started = Instant::now();
    let r = root
        .post(&format!("/api/service/{job}/instance"), &json!({}))
        .await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    let list = root.get(&format!("/api/service/{job}")).await.body["instance_list"].clone();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), before + 1, "{list:?}");
    let newest = list
        .iter()
        .max_by_key(|i| i["instance_number"].as_i64().unwrap_or(0))
        .unwrap();
    (newest["cluster_id"].as_str().unwrap_or_default().to_owned(), took)
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let rank = (p * samples.len()).div_ceil(100);
    samples[rank.clamp(1, samples.len()) - 1]
}

fn docker(d: &Dockerd, args: &[&str]) -> String {
    output_ok(d.cli().args(args))
}

fn inspect(d: &Dockerd, name: &str) -> Option<Value> {
    let out = d.cli().args(["inspect", name]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.get(0).cloned()
}

async fn scenario(ns: String, dir: PathBuf) {
    let dockerd = Dockerd::start(&ns, &dir.join("docker"));
    let _registry = Registry::start(&ns, &dir.join("registry"));
    let (hello_tar, scheduler_tar) = addon_images();
    for (tar, name) in [(&hello_tar, HELLO_IMAGE), (&scheduler_tar, SCHEDULER_IMAGE)] {
        dockerd.load(tar);
        docker(&dockerd, &["push", name]);
        docker(&dockerd, &["rmi", name]);
    }
    let mut root = Root::start(&ns, &dir, &dockerd.socket()).await;
    let base = root.url.clone();
    let api = |p: &str| format!("{base}{p}");

    // --- The marketplace.
    let bad = root
        .post(
            "/api/v1/marketplace/addons",
            &json!({"name": "bad name", "services": [{"service_name": "x", "image": "", "ports": {"80": "http"}}]}),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    let paths: Vec<&str> = bad.body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    for p in ["name", "services[0].image", "services[0].ports.80"] {
        assert!(paths.contains(&p), "{p} not in {paths:?}");
    }
    let made = root
        .post(
            "/api/auth/register",
            &json!({"name": "dev", "password": "dev-password-1"}),
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let dev = login(&root.url, "dev", "dev-password-1", &root.proc).await;
    let hello = json!({
        "name": "hello", "description": "the sample extension",
        "services": [{"service_name": "hello", "image": HELLO_IMAGE,
                      "command": "sh -c 'echo hello extension up; exec httpd -f -p 8080 -h /www'",
                      "ports": {"8080": "127.0.0.1:18080"}, "labels": {"team": "edge"},
                      "environment": {"GREETING": "hi"}, "networks": ["hello-net"]}],
        "networks": [{"name": "hello-net"}]
    });
    let denied = call(
        "POST",
        &api("/api/v1/marketplace/addons"),
        Some(&dev),
        Some(&hello),
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(call("GET", &api("/api/v1/addons"), None, None).await.status, 401);
    let published = root.post("/api/v1/marketplace/addons", &hello).await;
    assert_eq!(published.status, 201, "{}", published.body);
    assert_eq!(published.body["status"], "under_review");
    let hello_id = published.body["_id"].as_str().unwrap().to_owned();
    assert_eq!(
        root.post("/api/v1/marketplace/addons", &hello).await.status,
        409,
        "a duplicate name"
    );
    let missing = root
        .post(
            "/api/v1/marketplace/addons",
            &json!({"name": "ghost", "services": [{"service_name": "ghost", "image": "127.0.0.1:5000/oakestra/no-such-image:v1"}]}),
        )
        .await;
    assert_eq!(missing.status, 201, "{}", missing.body);
    let ghost_id = missing.body["_id"].as_str().unwrap().to_owned();
    let ghost = root
        .wait(
            "the missing image to fail verification",
            60,
            &format!("/api/v1/marketplace/addons/{ghost_id}"),
            |b| b["status"] == "verification_failed",
        )
        .await;
    let reason = ghost["status_details"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("image missing") && reason.contains("no-such-image"),
        "{reason}"
    );
    let unapproved = root
        .post("/api/v1/addons", &json!({"marketplace_id": ghost_id}))
        .await;
    assert_eq!(unapproved.status, 409, "{}", unapproved.body);
    root.wait(
        "hello to be approved",
        60,
        &format!("/api/v1/marketplace/addons/{hello_id}"),
        |b| b["status"] == "approved",
    )
    .await;
    let listed = call("GET", &api("/api/v1/marketplace/addons"), Some(&dev), None).await;
    let names: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello"], "only approved addons are listed by default");
    assert_eq!(
        call(
            "GET",
            &api("/api/v1/marketplace/addons?status=all"),
            Some(&dev),
            None
        )
        .await
        .status,
        403
    );

    // The reference ports (--addons-reference-ports) serve the addons routes only, with the same credentials.
    for port in [11102, 11101] {
        let url = format!("http://127.0.0.1:{port}");
        let r = call(
            "GET",
            &format!("{url}/api/v1/marketplace/addons?status=all"),
            Some(&root.admin),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{port}: {}", r.body);
        assert_eq!(r.body.as_array().map(Vec::len), Some(2), "{port}: {}", r.body);
        assert_eq!(
            call("GET", &format!("{url}/api/v1/addons"), None, None)
                .await
                .status,
            401,
            "{port}"
        );
        assert_eq!(
            call("GET", &format!("{url}/api/applications"), Some(&root.admin), None)
                .await
                .status,
            404
        );
    }

    // --- The engine: install, restart once, fail with the log, disable.
    let installed = root
        .post("/api/v1/addons", &json!({"marketplace_id": hello_id}))
        .await;
    assert_eq!(installed.status, 201, "{}", installed.body);
    let addon_id = installed.body["_id"].as_str().unwrap().to_owned();
    let addon_path = format!("/api/v1/addons/{addon_id}");
    root.wait("hello to be active", 90, &addon_path, |b| b["status"] == "active")
        .await;
    let c = inspect(&dockerd, "root_hello").expect("the container root_hello");
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(c["Config"]["Labels"]["oak.addon.id"], json!(addon_id));
    assert_eq!(c["Config"]["Labels"]["oak.service.name"], "hello");
    assert_eq!(c["Config"]["Labels"]["team"], "edge");
    assert!(
        c["NetworkSettings"]["Networks"].get("hello-net").is_some(),
        "{}",
        c["NetworkSettings"]
    );
    assert_eq!(
        c["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"],
        "18080"
    );
    let page = eventually(20, "the extension's page", &[&root.proc], hello_page).await;
    assert!(page.contains(HELLO_TEXT), "{page}");
    let first_pid = c["State"]["Pid"].as_i64().unwrap();
    docker(&dockerd, &["kill", "root_hello"]);
    root.wait("one restart", 30, &addon_path, |b| {
        b["status_details"]["restarts"]["hello"] == 1
    })
    .await;
    let again = eventually(20, "the restarted container", &[&root.proc], || async {
        let c = inspect(&dockerd, "root_hello")?;
        (c["State"]["Running"] == true && c["State"]["Pid"].as_i64() != Some(first_pid)).then_some(c)
    })
    .await;
    assert_eq!(again["State"]["Running"], true);
    assert_eq!(root.get(&addon_path).await.body["status"], "active");
    docker(&dockerd, &["kill", "root_hello"]);
    let failed = root
        .wait("hello to fail", 30, &addon_path, |b| b["status"] == "failed")
        .await;
    let entry = &failed["status_details"]["failed_services"][0];
    assert_eq!(entry["service_name"], "hello");
    assert!(
        entry["logs"].as_str().unwrap().contains("hello extension up"),
        "{entry}"
    );
    // Install again (PATCH), then disable.
    let patched = call(
        "PATCH",
        &api(&addon_path),
        Some(&root.admin),
        Some(&json!({"status": "installing"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    root.wait("hello active again", 60, &addon_path, |b| b["status"] == "active")
        .await;
    let disabling = call("DELETE", &api(&addon_path), Some(&root.admin), None).await;
    assert_eq!(disabling.status, 200, "{}", disabling.body);
    root.wait("hello disabled", 30, &addon_path, |b| b["status"] == "disabled")
        .await;
    assert!(
        inspect(&dockerd, "root_hello").is_none(),
        "the container is gone once disabled"
    );
    assert_eq!(
        call("DELETE", &api(&addon_path), Some(&root.admin), None)
            .await
            .status,
        204
    );
    assert_eq!(root.get(&addon_path).await.status, 404);

    // --- Cleanup: the record deleted (root stopped) while the container runs.
    let installed = root
        .post("/api/v1/addons", &json!({"marketplace_id": hello_id}))
        .await;
    let addon_id = installed.body["_id"].as_str().unwrap().to_owned();
    root.wait("hello active", 60, &format!("/api/v1/addons/{addon_id}"), |b| {
        b["status"] == "active"
    })
    .await;
    let db = dir.join("root").join("root.db");
    // From here on the monitor polls rarely: API changes still wake it at once, and a stopped plugin stays
    // stopped for the fallback checks below (a 1 s round could restart it first).
    let poll = root
        .args
        .iter()
        .position(|a| a == "--addons-poll-interval")
        .unwrap()
        + 1;
    root.args[poll] = "60".into();
    root.restart(&ns, || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        assert_eq!(
            conn.execute("DELETE FROM addons WHERE id = ?1", [&addon_id])
                .unwrap(),
            1
        );
    })
    .await;
    eventually(
        30,
        "the cleanup check to remove the orphaned container",
        &[&root.proc],
        || async { inspect(&dockerd, "root_hello").is_none().then_some(()) },
    )
    .await;

    // --- Hot swap of the root scheduler.
    let small = FakeCluster::start(&root, "small", 4000).await;
    let big = FakeCluster::start(&root, "big", 64000).await;
    root.wait("two active clusters", 20, "/api/clusters/active", |b| {
        b.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    let job = service(&root, "hotswap", 10).await;
    let mut builtin = Vec::new();
    for _ in 0..100 {
        let (cluster, took) = place(&root, &job).await;
        assert_eq!(
            cluster, small.id,
            "best fit picks the cluster with the least free memory"
        );
        builtin.push(took);
    }
    let root_pid = root.proc.pid();
    let plugin = root
        .post(
            "/api/v1/marketplace/addons",
            &json!({"name": "most-free-memory", "services": [{"service_name": "root_scheduler", "image": SCHEDULER_IMAGE}]}),
        )
        .await;
    assert_eq!(plugin.status, 201, "{}", plugin.body);
    let plugin_entry = plugin.body["_id"].as_str().unwrap().to_owned();
    root.wait(
        "the plugin approved",
        60,
        &format!("/api/v1/marketplace/addons/{plugin_entry}"),
        |b| b["status"] == "approved",
    )
    .await;
    let installed = root
        .post("/api/v1/addons", &json!({"marketplace_id": plugin_entry}))
        .await;
    let plugin_addon = installed.body["_id"].as_str().unwrap().to_owned();
    root.wait("the plugin in its slot", 60, "/api/v1/addons/slots", |b| {
        !b["root_scheduler"]["plugin"].is_null()
    })
    .await;
    // The plugin's HTTP server may need a moment after the container started.
    eventually(20, "a placement by the plugin", &[&root.proc], || async {
        (place(&root, &job).await.0 == big.id).then_some(())
    })
    .await;
    let mut delegated = Vec::new();
    for _ in 0..100 {
        let (cluster, took) = place(&root, &job).await;
        assert_eq!(
            cluster, big.id,
            "the plugin picks the cluster with the most free memory"
        );
        delegated.push(took);
    }
    // Root was not restarted: the same process still runs, and its log shows one start.
    assert!(
        Path::new(&format!("/proc/{root_pid}")).exists(),
        "root's process is gone"
    );
    assert_eq!(
        root.proc.log().matches("root-service listening").count(),
        1,
        "root started once"
    );
    let slots = root.get("/api/v1/addons/slots").await.body;
    assert!(
        slots["root_scheduler"]["stats"]["delegated"].as_u64().unwrap() >= 100,
        "{slots}"
    );
    eprintln!(
        "placement latency over 100 placements: built-in p50 {:?} p99 {:?}; plugin p50 {:?} p99 {:?}",
        percentile(&mut builtin, 50),
        percentile(&mut builtin, 99),
        percentile(&mut delegated, 50),
        percentile(&mut delegated, 99)
    );
    // The plugin frozen: no answer, so the placement falls back after the timeout (2 s).
    docker(&dockerd, &["pause", "root_scheduler"]);
    let (cluster, took) = place(&root, &job).await;
    assert_eq!(cluster, small.id, "the built-in scheduler placed");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    let slots = root.get("/api/v1/addons/slots").await.body;
    assert_eq!(slots["root_scheduler"]["stats"]["fallbacks"], 1, "{slots}");
    docker(&dockerd, &["unpause", "root_scheduler"]);
    assert_eq!(place(&root, &job).await.0, big.id, "the plugin again");
    // The plugin stopped: the next placement falls back at once (connection refused), well within one timeout.
    docker(&dockerd, &["stop", "-t", "1", "root_scheduler"]);
    let (cluster, took) = place(&root, &job).await;
    assert_eq!(cluster, small.id, "the built-in scheduler placed");
    assert!(
        took < Duration::from_millis(2000 + 1500),
        "fallback within one timeout: {took:?}"
    );
    let slots = root.get("/api/v1/addons/slots").await.body;
    assert_eq!(slots["root_scheduler"]["stats"]["fallbacks"], 2, "{slots}");
    // Uninstalled: the built-in scheduler again, for good.
    let r = call(
        "DELETE",
        &api(&format!("/api/v1/addons/{plugin_addon}")),
        Some(&root.admin),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    root.wait(
        "the plugin disabled",
        30,
        &format!("/api/v1/addons/{plugin_addon}"),
        |b| b["status"] == "disabled",
    )
    .await;
    root.wait("the slot empty", 10, "/api/v1/addons/slots", |b| {
        b["root_scheduler"]["plugin"].is_null()
    })
    .await;
    assert_eq!(place(&root, &job).await.0, small.id);
    assert!(inspect(&dockerd, "root_scheduler").is_none());
    drop((small, big));
    root.proc.terminate(Duration::from_secs(10));
}

#[test]
fn addons_marketplace_engine_and_hot_swap() {
    require_root();
    let ns = Netns::new("oak-addons");
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = std::env::temp_dir().join(format!("oak-addons-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (name, d) = (ns.name().to_owned(), dir.clone());
    // Everything of the scenario (its sockets, the processes it starts) lives in the test's namespace: a thread of
    // its own enters it and runs the runtime there.
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(scenario(name, d));
            })
            .join()
    });
    drop(ns);
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
