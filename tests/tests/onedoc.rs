//! The 1-DOC end to end: `scripts/1doc.sh up` in a network namespace of the test's own, with only loopback in it
//! and its own containerd; then only the public API: log in, register the seed's clientsrvr application with the
//! local images, deploy both services, see RUNNING and the page the client fetched from 10.30.55.55 in its log; a
//! one-shot service completes and is not redeployed; deleting the applications removes every container and veth;
//! `1doc.sh example` does the walkthrough again; with `OAK_ADDONS=1` (1doc's own dockerd and registry in the
//! namespace) the sample extension is published, approved, installed and serves its page; with `OAK_MONITORING=1`
//! a real Prometheus scrapes all four daemons: every target is up, every series the README documents and every
//! metric the Grafana dashboards use exists, and the overlay's packet counters saw the walkthrough's traffic;
//! `1doc.sh down` removes the rest (addon containers, docker0 and the addon networks included), and the host's
//! namespace is unchanged.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use oakestra_tests::{
    docker::{HELLO_TEXT, hello_page},
    netns::{HostSnapshot, Netns, require_root},
    procs::{binary, workspace_root},
    stack::call,
};
use serde_json::{Value, json};

/// Runs `scripts/1doc.sh <cmd>` inside `ns` (entered with nsenter, which keeps the host's /sys and its cgroup
/// mounts visible to containerd and runc; `ip netns exec` would remount /sys).
fn onedoc(ns: &Netns, home: &Path, cmd: &str) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(workspace_root().join("scripts/1doc.sh"))
        .args(cmd.split_whitespace())
        .env("OAK_HOME", home)
        .env("OAK_CONTAINERD", home.join("containerd.sock"))
        .env("OAK_NO_INSTALL", "1")
        .env("OAK_BIN_DIR", binary("root-service").parent().unwrap())
        // Addons on: 1doc's own dockerd (nothing answers on OAK_DOCKER) and registry, inside the namespace.
        .env("OAK_ADDONS", "1")
        .env("OAK_DOCKER", home.join("no-docker.sock"))
        // Monitoring on: Debian's prometheus scrapes the four daemons every second.
        .env("OAK_MONITORING", "1")
        .env("OAK_SCRAPE_INTERVAL", "1s")
        .output()
        .unwrap()
}

/// Pids of the QEMUs whose command line names a file under `dir` (the 1-DOC's guests).
fn qemus_under(dir: &Path) -> Vec<u32> {
    oakestra_tests::procs::qemus_with(&dir.display().to_string())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Stops the 1-DOC whatever happens to the test.
struct Down<'a>(&'a Netns, PathBuf);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = onedoc(self.0, &self.1, "down");
    }
}

/// The last lines of every log of the 1-DOC, for a failure message.
fn logs(home: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(home.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = body.lines().rev().take(15).collect();
        out += &format!("--- {}\n", entry.path().display());
        for l in tail.iter().rev() {
            out += l;
            out.push('\n');
        }
    }
    out
}

async fn until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    home: &Path,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}\n{}",
            logs(home)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Api {
    url: String,
    token: String,
}

impl Api {
    async fn get(&self, path: &str) -> Value {
        let r = call("GET", &format!("{}{path}", self.url), Some(&self.token), None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.body
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        let r = call(
            "POST",
            &format!("{}{path}", self.url),
            Some(&self.token),
            Some(body),
        )
        .await;
        assert_eq!(r.status, 200, "POST {path}: {}", r.body);
        r.body
    }

    /// Registers `sla` and returns (application id, service ids by microservice name).
    async fn register(&self, sla: &Value) -> (String, Vec<(String, String)>) {
        let name = sla["applications"][0]["application_name"].clone();
        let apps = self.post("/api/application", sla).await;
        let app = apps
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["application_name"] == name)
            .unwrap();
        let id = app["_id"]["$oid"].as_str().unwrap().to_owned();
        let services = self.get(&format!("/api/services/{id}")).await;
        let list = services
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["microservice_name"].as_str().unwrap().to_owned(),
                    s["_id"]["$oid"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (id, list)
    }

    async fn instances(&self, service: &str) -> Vec<Value> {
        let r = call(
            "GET",
            &format!("{}/api/service/{service}", self.url),
            Some(&self.token),
            None,
        )
        .await;
        r.body["instance_list"].as_array().cloned().unwrap_or_default()
    }

    async fn status_is(&self, service: &str, status: &str) -> Option<()> {
        let list = self.instances(service).await;
        (list.len() == 1 && list[0]["status"] == json!(status)).then_some(())
    }
}

fn ctr(home: &Path, args: &[&str]) -> String {
    let o = Command::new("ctr")
        .arg("-a")
        .arg(home.join("containerd.sock"))
        .args(["-n", "oakestra"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Interfaces of `ns` other than loopback.
fn extra_links(ns: &Netns) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        })
        .filter(|n| n != "lo")
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn one_doc_runs_the_seed_walkthrough_and_cleans_up() {
    require_root();
    ensure_prometheus();
    let host_before = HostSnapshot::take();
    // Only loopback, no route anywhere: a machine without any network still runs a whole 1-DOC (the NetManager
    // takes 127.0.0.1 as its public address, since the cluster is on this machine). Detecting the address from
    // the default route is what the overlay and failover suites' workers do.
    let ns = Netns::new("onedoc");
    let home = std::env::temp_dir().join(format!("oakestra-1doc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);

    let up = onedoc(&ns, &home, "up");
    let _down = Down(&ns, home.clone());
    let up_text = text(&up);
    assert!(
        up.status.success(),
        "1doc.sh up failed:\n{up_text}\n{}",
        logs(&home)
    );
    assert!(up_text.contains("1-DOC is up"), "{up_text}");
    assert!(up_text.contains("http://127.0.0.1:10000"), "{up_text}");
    let password = std::fs::read_to_string(home.join("admin.password"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(up_text.contains(&password), "the password is printed: {up_text}");
    println!("1doc.sh up:\n{up_text}");
    let status = text(&onedoc(&ns, &home, "status"));
    for c in ["root-service", "cluster-service", "NetManager", "NodeEngine"] {
        assert!(
            status.lines().any(|l| l.contains(c) && l.contains("running")),
            "{c} in:\n{status}"
        );
    }
    assert!(status.contains("\"active_workers\":1"), "{status}");

    // From here on: the public API only, from inside the namespace.
    ns.enter_current_thread();
    let url = "http://127.0.0.1:10000".to_owned();
    let wrong = call(
        "POST",
        &format!("{url}/api/auth/login"),
        None,
        Some(&json!({"username": "Admin", "password": "Admin"})),
    )
    .await;
    assert_eq!(
        wrong.status, 401,
        "the default password is not accepted: {}",
        wrong.body
    );
    let login = call(
        "POST",
        &format!("{url}/api/auth/login"),
        None,
        Some(&json!({"username": "Admin", "password": password})),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let api = Api {
        url,
        token: login.body["token"].as_str().unwrap().to_owned(),
    };

    // The seed's walkthrough with the local images.
    let sla: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/clientsrvr-local.json")).unwrap(),
    )
    .unwrap();
    let (app, services) = api.register(&sla).await;
    let id = |name: &str| services.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let (nginx, curl) = (id("nginx"), id("curl"));
    for s in [&nginx, &curl] {
        api.post(&format!("/api/service/{s}/instance"), &json!({})).await;
    }
    for s in [&nginx, &curl] {
        until(120, &format!("{s} RUNNING"), &home, || {
            api.status_is(s, "RUNNING")
        })
        .await;
    }
    let page = until(60, "the page in the client's log", &home, || async {
        let r = api.get(&format!("/api/service/{curl}/instance/0/logs")).await;
        let logs = r["logs"].as_str().unwrap_or_default().to_owned();
        logs.contains("Welcome to nginx!").then_some(logs)
    })
    .await;
    println!("the client's log:\n{page}");
    assert!(page.contains("oakestra-rs local image"), "{page}");

    let (series, packets) = monitoring_sees_everything(&home).await;
    println!("Prometheus: 4 targets up, {series} series checked, {packets} overlay packets");

    // A one-shot service completes and stays completed.
    let once = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
        "applicationID": "", "application_name": "once", "application_namespace": "test",
        "application_desc": "", "microservices": [{
            "microserviceID": "", "microservice_name": "job", "microservice_namespace": "test",
            "virtualization": "container", "memory": 32, "vcpus": 0, "one_shot": true,
            "code": "localhost/oakestra/curl:latest", "cmd": ["sh", "-c", "echo one-shot done"]}]}]});
    let (once_app, once_services) = api.register(&once).await;
    let job = once_services[0].1.clone();
    api.post(&format!("/api/service/{job}/instance"), &json!({}))
        .await;
    until(120, "the one-shot instance COMPLETED", &home, || {
        api.status_is(&job, "COMPLETED")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = api.instances(&job).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        after[0]["status"],
        json!("COMPLETED"),
        "not redeployed: {after:?}"
    );

    // Deleting the applications removes every instance, container and veth.
    assert!(
        !extra_links(&ns).iter().all(|l| l.starts_with("goProxy")),
        "veths exist while running"
    );
    for a in [&app, &once_app] {
        let r = call(
            "DELETE",
            &format!("{}/api/application/{a}", api.url),
            Some(&api.token),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "DELETE application {a}: {}", r.body);
    }
    until(60, "no containers and no veths left", &home, || async {
        let containers = ctr(&home, &["containers", "ls", "-q"]);
        let links = extra_links(&ns);
        // docker0 is 1doc's dockerd's (OAK_ADDONS=1), removed by `down`.
        (containers.trim().is_empty() && links.iter().all(|l| l.starts_with("goProxy") || l == "docker0"))
            .then_some(())
    })
    .await;

    // The same walkthrough through `1doc.sh example`, the command `up` recommends.
    let example = onedoc(&ns, &home, "example");
    let example_text = text(&example);
    assert!(
        example.status.success(),
        "1doc.sh example failed:\n{example_text}\n{}",
        logs(&home)
    );
    assert!(
        example_text.contains("clientsrvr.test.nginx.test: RUNNING"),
        "{example_text}"
    );
    assert!(
        example_text.contains("Welcome to nginx! (oakestra-rs local image)"),
        "{example_text}"
    );

    // The unikernel example: 1doc.sh runs the NodeEngine with -u=true and serves the test guest itself.
    let sla = workspace_root().join("examples/unikernel.json");
    let uk = onedoc(&ns, &home, &format!("example {}", sla.display()));
    let uk_text = text(&uk);
    assert!(
        uk.status.success(),
        "1doc.sh example unikernel.json failed:\n{uk_text}\n{}",
        logs(&home)
    );
    assert!(
        uk_text.contains("unikernel.test.guest.test: RUNNING"),
        "{uk_text}"
    );
    assert!(
        uk_text.contains("hello from the oakestra test guest") && uk_text.contains("guest 10.18."),
        "the curl client's log shows the guest's page: {uk_text}"
    );
    let guest_dir = home.join("data/nodeengine/unikernel");
    assert!(!qemus_under(&guest_dir).is_empty(), "a QEMU for the guest");

    // Addons (OAK_ADDONS=1): 1doc's dockerd and registry hold the sample images; the extension is published,
    // verified, installed and serves its page, and is still running when `down` comes.
    let descriptor: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/addons/hello-extension.json")).unwrap(),
    )
    .unwrap();
    let r = call(
        "POST",
        &format!("{}/api/v1/marketplace/addons", api.url),
        Some(&api.token),
        Some(&descriptor),
    )
    .await;
    assert_eq!(r.status, 201, "publish: {}", r.body);
    let entry = r.body["_id"].as_str().unwrap().to_owned();
    until(60, "the sample extension approved", &home, || async {
        (api.get(&format!("/api/v1/marketplace/addons/{entry}")).await["status"] == "approved").then_some(())
    })
    .await;
    let r = call(
        "POST",
        &format!("{}/api/v1/addons", api.url),
        Some(&api.token),
        Some(&json!({"marketplace_id": entry})),
    )
    .await;
    assert_eq!(r.status, 201, "install: {}", r.body);
    let addon = r.body["_id"].as_str().unwrap().to_owned();
    until(60, "the sample extension active", &home, || async {
        (api.get(&format!("/api/v1/addons/{addon}")).await["status"] == "active").then_some(())
    })
    .await;
    let page = until(30, "the extension's page", &home, hello_page).await;
    assert!(page.contains(HELLO_TEXT), "{page}");

    // `down` stops everything and removes the network state, also with the example's containers still running.
    let down = onedoc(&ns, &home, "down");
    assert!(down.status.success(), "{}", text(&down));
    assert!(extra_links(&ns).is_empty(), "{:?}", extra_links(&ns));
    let nft = ns.run(&["nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&nft.stdout).contains("oakestra"));
    let status = text(&onedoc(&ns, &home, "status"));
    assert!(!status.contains("running"), "{status}");
    assert!(qemus_under(&guest_dir).is_empty(), "guests left after down");
    assert!(text(&down).contains("removed addon container"), "{}", text(&down));
    host_before.assert_unchanged(&HostSnapshot::take());
    let _ = std::fs::remove_dir_all(&home);
}

/// Debian's prometheus, installed when missing (scripts/test.sh installs it too; 1doc.sh runs with OAK_NO_INSTALL=1
/// here); its system service stays off.
fn ensure_prometheus() {
    oakestra_tests::apt::ensure(
        &["prometheus"],
        || oakestra_tests::apt::on_path("prometheus"),
        &["prometheus"],
    );
}

/// Every metric name the README's metrics reference lists (histograms as their `_bucket` series).
fn documented_series() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("### Metrics reference")
        .nth(1)
        .expect("README has a Metrics reference section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let section = section.split("\n### ").next().unwrap_or(section);
    let mut names = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let name = line[3..].split('`').next().unwrap().to_owned();
        let kind = line.split('|').nth(2).unwrap_or_default().trim().to_owned();
        names.push(if kind == "histogram" {
            format!("{name}_bucket")
        } else {
            name
        });
    }
    assert!(names.len() >= 30, "the reference lists the metrics: {names:?}");
    names
}

/// Every metric name the Grafana dashboards' queries use.
fn grafana_series() -> Vec<String> {
    let mut names = Vec::new();
    for file in ["grafana-control-plane.json", "grafana-worker.json"] {
        let text = std::fs::read_to_string(workspace_root().join("scripts/monitoring").join(file)).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        // Rows may hold their panels (a collapsed row does).
        let mut panels: Vec<Value> = dashboard["panels"].as_array().unwrap().clone();
        let nested: Vec<Value> = panels
            .iter()
            .flat_map(|p| p["panels"].as_array().cloned().unwrap_or_default())
            .collect();
        panels.extend(nested);
        for panel in &panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if (word.starts_with("oakestra_") || word.starts_with("process_"))
                        && !names.iter().any(|n| n == word)
                    {
                        names.push(word.to_owned());
                    }
                }
            }
        }
    }
    assert!(names.len() >= 30, "the dashboards query the metrics: {names:?}");
    names
}

/// Prometheus (OAK_MONITORING=1) scrapes all four daemons, and sees every documented and every dashboard series.
/// Returns how many series it checked and the overlay's packet count.
async fn monitoring_sees_everything(home: &Path) -> (usize, f64) {
    let prometheus = "http://127.0.0.1:9090";
    let targets = until(60, "all four Prometheus targets up", home, || async {
        let r = call("GET", &format!("{prometheus}/api/v1/targets"), None, None).await;
        let active = r.body["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (active.len() == 4 && up == 4).then_some(active)
    })
    .await;
    // The worker's metrics ports ask for the token like root's and the cluster's do.
    for port in [9102, 9103] {
        let r = call("GET", &format!("http://127.0.0.1:{port}/metrics"), None, None).await;
        assert_eq!(r.status, 401, "port {port} without a token: {}", r.body);
    }
    let jobs: Vec<&str> = targets
        .iter()
        .map(|t| t["labels"]["job"].as_str().unwrap())
        .collect();
    for job in ["root-service", "cluster-service", "nodeengine", "netmanager"] {
        assert!(jobs.contains(&job), "{job} in {jobs:?}");
    }
    let mut wanted = documented_series();
    wanted.extend(grafana_series());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = call(
            "GET",
            &format!("{prometheus}/api/v1/label/__name__/values"),
            None,
            None,
        )
        .await;
        let names: Vec<String> = serde_json::from_value(r.body["data"].clone()).unwrap_or_default();
        let missing: Vec<&String> = wanted.iter().filter(|w| !names.contains(w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "series Prometheus never saw: {missing:?}\nit has: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The walkthrough's curl → nginx went over the overlay: the NetManager counted its packets.
    let packets = until(30, "the overlay's packets counted", home, || async {
        let q = "sum(oakestra_netmanager_packets_total)";
        let r = call("GET", &format!("{prometheus}/api/v1/query?query={q}"), None, None).await;
        let value = r.body["data"]["result"][0]["value"][1]
            .as_str()?
            .parse::<f64>()
            .ok()?;
        (value > 0.0).then_some(value)
    })
    .await;
    (wanted.len(), packets)
}
