//! root-service + cluster-service as child processes, logged in as Admin, plus the NodeEngine command line for a
//! private containerd: what the worker suites and the worker bench drive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oakestra_runtime::client;
use serde_json::{Value, json};

use crate::containerd::Containerd;
use crate::harness::{Proc, eventually, free_port};

/// The join token the stack's root and cluster share.
pub const JOIN_TOKEN: &str = "worker-test-join-token";
/// The busybox test image (imported into the private containerd).
pub const IMAGE: &str = "docker.io/library/bbtest:latest";

/// One HTTP call; panics on a transport error.
pub async fn call(method: &str, url: &str, bearer: Option<&str>, body: Option<&Value>) -> client::Response {
    client::call(
        method.parse().expect("an HTTP method"),
        url,
        bearer,
        body,
        Duration::from_secs(10),
    )
    .await
    .expect("the HTTP call")
}

/// Logs `user` in at the root API `root_url`, retrying while root starts (20 s at most, failing early if `root`
/// exits); returns the access token.
pub async fn login(root_url: &str, user: &str, password: &str, root: &Proc) -> String {
    let url = format!("{root_url}/api/auth/login");
    let body = eventually(20, "root to accept a login", &[root], || {
        let url = url.clone();
        async move {
            let body = json!({"username": user, "password": password});
            let r = client::call(
                "POST".parse().expect("a method"),
                &url,
                None,
                Some(&body),
                Duration::from_secs(2),
            )
            .await
            .ok()?;
            (r.status == 200).then_some(r.body)
        }
    })
    .await;
    body["token"]
        .as_str()
        .expect("a token in the login answer")
        .to_owned()
}

/// `GET url` with `bearer`, 2 s at most; `None` on a transport error (e.g. the server is restarting).
pub async fn try_get(url: &str, bearer: &str) -> Option<client::Response> {
    client::call::<Value>(
        "GET".parse().expect("an HTTP method"),
        url,
        Some(bearer),
        None,
        Duration::from_secs(2),
    )
    .await
    .ok()
}

/// `root-service` flags: listen on 127.0.0.1:`port`, data in `dir/root`, join token `token`.
pub fn root_args(dir: &Path, port: u16, token: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        dir.join("root").display().to_string(),
        "--join-token".into(),
        token.into(),
    ]
}

/// The worker join token every test cluster is started with (`--worker-join-token`) and every test NodeEngine
/// presents (`--join-token`).
pub const WORKER_JOIN_TOKEN: &str = "test-worker-join-token-5f1c0e9a";

/// `cluster-service` flags: cluster `name` joining the root at `root_url` with `token`, HTTP on 127.0.0.1:`port`,
/// the embedded broker on 127.0.0.1:`mqtt_port`, data in `dir/cluster`, reports to root every 0.5 s, workers
/// joining with [`WORKER_JOIN_TOKEN`].
pub fn cluster_args(
    dir: &Path,
    name: &str,
    root_url: &str,
    token: &str,
    port: u16,
    mqtt_port: u16,
) -> Vec<String> {
    cluster_args_at(dir, name, root_url, token, "127.0.0.1", port, mqtt_port)
}

/// [`cluster_args`] with the cluster manager and the broker listening on (and advertising) `ip`.
pub fn cluster_args_at(
    dir: &Path,
    name: &str,
    root_url: &str,
    token: &str,
    ip: &str,
    port: u16,
    mqtt_port: u16,
) -> Vec<String> {
    [
        "--cluster-name",
        name,
        "--cluster-location",
        "48.1,11.6,1000",
        "--root-url",
        root_url,
        "--join-token",
        token,
        "--listen",
        &format!("{ip}:{port}"),
        "--advertise-address",
        ip,
        "--mqtt-listen",
        &format!("{ip}:{mqtt_port}"),
        "--data-dir",
        &dir.join("cluster").display().to_string(),
        "--report-interval",
        "0.5",
        "--worker-join-token",
        WORKER_JOIN_TOKEN,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

/// A running root and cluster, with Admin's token.
#[derive(Debug)]
pub struct Stack {
    /// The directory holding data dirs and logs.
    pub dir: PathBuf,
    /// root's base URL.
    pub root_url: String,
    /// The cluster manager's HTTP port.
    pub cluster_port: u16,
    /// Admin's bearer token.
    pub token: String,
    /// The root-service process.
    pub root: Proc,
    /// The cluster-service process.
    pub cluster: Proc,
    /// The embedded broker's port.
    pub mqtt_port: u16,
    /// Its command line (for [`Self::restart_cluster`]).
    cluster_args: Vec<String>,
    /// root's command line (for [`Self::restart_root`]).
    root_args: Vec<String>,
    /// Restarts so far (each restarted process logs to a file of its own).
    restarts: u32,
}

impl Stack {
    /// Starts root and cluster (embedded broker) under `dir` and logs in as Admin.
    pub async fn start(dir: &Path) -> Self {
        Self::start_at(dir, "127.0.0.1").await
    }

    /// [`Self::start`] with the cluster manager and its broker on `cluster_ip` (root stays on loopback).
    pub async fn start_at(dir: &Path, cluster_ip: &str) -> Self {
        Self::start_with(dir, cluster_ip, &[]).await
    }

    /// [`Self::start_at`] with `extra` flags for the cluster-service (flags [`cluster_args_at`] does not set).
    pub async fn start_with(dir: &Path, cluster_ip: &str, extra: &[&str]) -> Self {
        let (root_port, cluster_port, mqtt_port) = (free_port(), free_port(), free_port());
        let root_url = format!("http://127.0.0.1:{root_port}");
        let root_args = root_args(dir, root_port, JOIN_TOKEN);
        let root = Proc::start("root-service", &root_args, dir.join("root.log"));
        let mut cluster_args = cluster_args_at(
            dir,
            "workercluster",
            &root_url,
            JOIN_TOKEN,
            cluster_ip,
            cluster_port,
            mqtt_port,
        );
        cluster_args.extend(extra.iter().map(|a| (*a).to_owned()));
        let cluster = Proc::start("cluster-service", &cluster_args, dir.join("cluster.log"));
        let token = login(&root_url, "Admin", "Admin", &root).await;
        Self {
            dir: dir.to_owned(),
            root_url,
            cluster_port,
            token,
            root,
            cluster,
            mqtt_port,
            cluster_args,
            root_args,
            restarts: 0,
        }
    }

    /// Stops root (SIGTERM, as systemd restarts it) and starts it again on the same port and data directory; its
    /// log goes on in `root-<n>.log`. Admin's token stays valid (root's signing key is in its data directory).
    pub async fn restart_root(&mut self) {
        self.root.terminate(Duration::from_secs(10));
        self.restarts += 1;
        let log = self.dir.join(format!("root-{}.log", self.restarts));
        self.root = Proc::start("root-service", &self.root_args, log);
        let url = format!("{}/api/applications", self.root_url);
        let token = self.token.clone();
        eventually(20, "root to answer again", &[&self.root], || {
            let (url, token) = (url.clone(), token.clone());
            async move { (try_get(&url, &token).await?.status == 200).then_some(()) }
        })
        .await;
    }

    /// Kills the cluster-service (SIGKILL: an outage, not a shutdown), waits `down`, starts it again on the same
    /// ports and data directory; its log goes on in `cluster-<n>.log` (`cluster-2.log` for the stack's first restart).
    pub async fn restart_cluster(&mut self, down: Duration) {
        self.cluster.kill();
        tokio::time::sleep(down).await;
        self.restarts += 1;
        let log = self.dir.join(format!("cluster-{}.log", self.restarts + 1));
        self.cluster = Proc::start("cluster-service", &self.cluster_args, log);
    }

    /// The NodeEngine flags for this stack and `ctrd`: no overlay (`-n -1`), state and logs under the stack's directory, 0.5 s reports.
    pub fn node_engine_args(&self, ctrd: &Containerd) -> Vec<String> {
        let d = |x: &str| self.dir.join(x).display().to_string();
        let s = |x: &str| x.to_owned();
        vec![
            s("-a"),
            s("127.0.0.1"),
            s("-p"),
            self.cluster_port.to_string(),
            s("-n"),
            s("-1"),
            s("-l"),
            d("apps"),
            s("--conf"),
            d("no-conf.json"),
            s("--containerd"),
            ctrd.socket.display().to_string(),
            s("--state-dir"),
            d("ne-state"),
            s("--log-file"),
            d("ne-file.log"),
            s("--report-interval"),
            s("0.5"),
            s("--node-name"),
            s("worker-under-test"),
            s("--join-token"),
            s(WORKER_JOIN_TOKEN),
        ]
    }

    /// Starts a NodeEngine with [`Self::node_engine_args`], stderr in `dir/<log>`.
    pub fn node_engine(&self, ctrd: &Containerd, log: &str) -> Proc {
        Proc::start("NodeEngine", &self.node_engine_args(ctrd), self.dir.join(log))
    }

    /// Creates an application `app` with one service (fields of `service` override the defaults) and deploys one instance; returns the job id.
    pub async fn deploy(&self, app: &str, service: &Value) -> String {
        let mut ms = json!({"microserviceID": "", "microservice_name": "svc", "microservice_namespace": "test",
                            "virtualization": "container", "memory": 100, "vcpus": 0, "code": IMAGE});
        for (k, v) in service.as_object().expect("stack") {
            ms[k] = v.clone();
        }
        let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
            "applicationID": "", "application_name": app, "application_namespace": "test", "application_desc": "",
            "microservices": [ms]}]});
        let apps = call(
            "POST",
            &format!("{}/api/application", self.root_url),
            Some(&self.token),
            Some(&sla),
        )
        .await;
        assert_eq!(apps.status, 200, "{}", apps.body);
        let app_id = apps
            .body
            .as_array()
            .expect("stack")
            .iter()
            .find(|a| a["application_name"] == json!(app))
            .expect("stack")["_id"]["$oid"]
            .as_str()
            .expect("stack")
            .to_owned();
        let services = call(
            "GET",
            &format!("{}/api/services/{app_id}", self.root_url),
            Some(&self.token),
            None,
        )
        .await;
        let job = services.body[0]["_id"]["$oid"]
            .as_str()
            .expect("stack")
            .to_owned();
        let r = call(
            "POST",
            &format!("{}/api/service/{job}/instance", self.root_url),
            Some(&self.token),
            Some(&json!({})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        job
    }

    /// Every application root lists for Admin.
    pub async fn applications(&self) -> Vec<Value> {
        let url = format!("{}/api/applications", self.root_url);
        let r = call("GET", &url, Some(&self.token), None).await;
        assert_eq!(r.status, 200, "GET /api/applications: {}", r.body);
        r.body.as_array().cloned().unwrap_or_default()
    }

    /// Deletes every application root lists for Admin (each answered 200).
    pub async fn delete_applications(&self) {
        for app in self.applications().await {
            let id = app["_id"]["$oid"].as_str().expect("an application id");
            let url = format!("{}/api/application/{id}", self.root_url);
            let r = call("DELETE", &url, Some(&self.token), None).await;
            assert_eq!(r.status, 200, "DELETE {url}: {}", r.body);
        }
    }

    /// Every instance of `job` as root lists it (empty if the call fails).
    pub async fn instances(&self, job: &str) -> Vec<Value> {
        let url = format!("{}/api/service/{job}", self.root_url);
        let r = call("GET", &url, Some(&self.token), None).await;
        r.body["instance_list"].as_array().cloned().unwrap_or_default()
    }

    /// Instance 0 of `job` as root shows it.
    pub async fn instance(&self, job: &str) -> Option<Value> {
        let url = format!("{}/api/service/{job}", self.root_url);
        let r = try_get(&url, &self.token).await?;
        let i = r.body["instance_list"].get(0)?.clone();
        Some(i)
    }

    /// Waits up to `secs` for root to count `n` active workers in the cluster.
    pub async fn wait_active_workers(&self, n: usize, secs: u64, procs: &[&Proc]) {
        let want = format!("\"active_nodes\":{n}");
        let url = format!("{}/api/clusters", self.root_url);
        eventually(secs, &format!("{n} active worker(s)"), procs, || async {
            let r = call("GET", &url, Some(&self.token), None).await;
            r.body.to_string().contains(&want).then_some(())
        })
        .await;
    }

    /// Waits up to 60 s for instance 0 of `job` to have `status` at root.
    pub async fn wait_status(&self, job: &str, status: &str, procs: &[&Proc]) -> Value {
        eventually(60, &format!("{job} to be {status} at root"), procs, || async {
            self.instance(job).await.filter(|i| i["status"] == json!(status))
        })
        .await
    }
}
