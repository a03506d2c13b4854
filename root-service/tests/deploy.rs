//! Applications, services, instances, clusters and scheduling over real HTTP: the real router on 127.0.0.1:0 with
//! a temporary data directory, and fake clusters that are real HTTP servers recording what root sends them.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a panic is the clearest failure"
)]

mod support;

use std::collections::BTreeSet;

use axum::http::Method;
use serde_json::{Value, json};
use support::{
    Call, FakeCluster, JOIN_TOKEN, Server, TempDir, clientsrvr, config, eventually, one_service_sla,
};

impl Server {
    /// Logs `user` in; returns the access token.
    async fn login(&self, user: &str, password: &str) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(&json!({"username": user, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "login {user}: {body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn admin(&self) -> String {
        self.login("Admin", "Admin").await
    }
}

fn app_id(apps: &Value, name: &str) -> String {
    apps.as_array()
        .unwrap()
        .iter()
        .find(|a| a["application_name"] == name)
        .unwrap_or_else(|| panic!("no app {name} in {apps}"))["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn services_of(root: &Server, token: &str, app: &str) -> Vec<Value> {
    let (status, body) = root.get(&format!("/api/services/{app}"), token).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

/// Creates the one-service application `app` asking for `memory` MiB and returns its service (job) id.
async fn one_service_job(root: &Server, token: &str, app: &str, memory: u64) -> String {
    let (status, apps) = root
        .post("/api/application", token, &one_service_sla(app, memory))
        .await;
    assert_eq!(status, 200, "{apps}");
    services_of(root, token, &app_id(&apps, app)).await[0]["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn service_named<'a>(services: &'a [Value], name: &str) -> &'a Value {
    services
        .iter()
        .find(|s| s["microservice_name"] == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn is_deploy(call: &Call, job: &str, n: i64) -> bool {
    call.method == Method::POST && call.path == format!("/api/service/{job}/{n}")
}

fn is_undeploy(call: &Call, job: &str, n: i64) -> bool {
    call.method == Method::DELETE && call.path == format!("/api/service/{job}/{n}")
}

#[tokio::test]
async fn clientsrvr_create_deploy_list_delete() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;

    let (status, apps) = root.post("/api/application/", &token, &clientsrvr()).await;
    assert_eq!(status, 200, "{apps}");
    let app = app_id(&apps, "clientsrvr");
    assert_eq!(apps[0]["microservices"].as_array().unwrap().len(), 2);
    assert_eq!(apps[0]["userId"], "Admin");

    let (status, got) = root.get(&format!("/api/application/{app}"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(
        got["application_name"], "clientsrvr",
        "GET application returns the application: {got}"
    );

    let services = services_of(&root, &token, &app).await;
    let nginx = service_named(&services, "nginx");
    let curl = service_named(&services, "curl");
    assert_eq!(nginx["job_name"], "clientsrvr.test.nginx.test");
    assert_eq!(nginx["RR_ip"], "10.30.55.55", "the user's rr_ip is kept");
    assert_eq!(nginx["virtualization"], "docker", "container is stored as docker");
    assert_eq!(nginx["image"], "docker.io/library/nginx:latest");
    assert!(curl["RR_ip"].as_str().unwrap().starts_with("10.30."), "{curl}");
    assert!(
        curl["RR_ip_v6"].as_str().unwrap().starts_with("fdff:2000:"),
        "{curl}"
    );
    let job = nginx["_id"]["$oid"].as_str().unwrap().to_owned();

    // No cluster yet: the instance is recorded with the reference's negative status.
    let (status, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["message"], "ok");
    assert_eq!(r["instance_number"], 0);
    assert_eq!(r["status"], "TargetClusterNotActive");

    let cluster = FakeCluster::start(&root, "c1").await;
    let (status, body) = cluster.report(&root, 4, 8000, json!([])).await;
    assert_eq!(status, 200, "{body}");
    let (status, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["instance_number"], 1);
    assert_eq!(r["status"], "CLUSTER_SCHEDULED");
    assert_eq!(r["cluster_id"], cluster.id.as_str());

    let deploy = cluster
        .wait_for("deploy of instance 1", |c| is_deploy(c, &job, 1))
        .await;
    assert_eq!(
        deploy.bearer.as_deref(),
        Some(cluster.token.as_str()),
        "root presents the cluster's secret"
    );
    assert_eq!(deploy.body["job_name"], "clientsrvr.test.nginx.test");
    assert_eq!(deploy.body["port"], "80:80/tcp");
    let list = deploy.body["instance_list"].as_array().unwrap();
    assert_eq!(list.len(), 1, "only the instance to deploy: {list:?}");
    assert_eq!(list[0]["instance_number"], 1);
    assert!(list[0]["instance_ip"].as_str().unwrap().starts_with("10.30."));

    // The maintenance round retries instance 0 now that a cluster exists? Not within this test's default 15 s
    // interval; the cluster reports instance 1 as running with logs.
    let jobs = json!([{
        "_id": job, "job_name": "clientsrvr.test.nginx.test", "status": "RUNNING",
        "instance_list": [{"instance_number": 1, "status": "RUNNING", "worker_id": "w1",
                           "host_ip": "192.168.1.5", "host_port": 50103, "logs": "hello from nginx"}]
    }]);
    let (status, _) = cluster.report(&root, 4, 7900, jobs).await;
    assert_eq!(status, 200);
    let (status, svc) = root.get(&format!("/api/service/{job}"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(svc["status"], "RUNNING");
    let inst = svc["instance_list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance_number"] == 1)
        .unwrap()
        .clone();
    assert_eq!(inst["status"], "RUNNING");
    assert_eq!(inst["worker_id"], "w1");
    let (status, logs) = root
        .get(&format!("/api/service/{job}/instance/1/logs"), &token)
        .await;
    assert_eq!(status, 200, "{logs}");
    assert_eq!(logs["logs"], "hello from nginx");

    let (status, clusters) = root.call(Method::GET, "/api/clusters/active", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(clusters[0]["cluster_name"], "c1");
    assert_eq!(clusters[0]["active"], true);
    assert_eq!(clusters[0]["memory_in_mb"], 7900);
    assert!(
        !clusters.to_string().contains(&cluster.token),
        "cluster secrets never leave root"
    );

    let (status, _) = root
        .delete(&format!("/api/service/{job}/instance/1"), &token)
        .await;
    assert_eq!(status, 200);
    cluster
        .wait_for("undeploy of instance 1", |c| is_undeploy(c, &job, 1))
        .await;

    let (status, body) = root.delete(&format!("/api/application/{app}"), &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Application Deleted");
    let (status, _) = root.get(&format!("/api/application/{app}"), &token).await;
    assert_eq!(status, 404);
    let (status, _) = root.get(&format!("/api/service/{job}"), &token).await;
    assert_eq!(status, 404);
    // The user-chosen address went back to the pool: another service may take it now.
    let mut again = one_service_sla("again", 100);
    again["applications"][0]["microservices"][0]["addresses"] = json!({"rr_ip": "10.30.55.55"});
    let (status, body) = root.post("/api/application", &token, &again).await;
    assert_eq!(status, 200, "{body}");
    root.stop().await;
}

#[tokio::test]
async fn user_errors_get_clear_4xx() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;

    // No token.
    let (status, body) = root
        .call(Method::POST, "/api/application", None, Some(&clientsrvr()))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "Missing authentication token");

    // A bad SLA: every problem with its path.
    let mut bad = clientsrvr();
    bad["applications"][0]["microservices"][0]["microservice_name"] = json!("not valid!");
    bad["applications"][0]["microservices"][1]["memory"] = json!("lots");
    let (status, body) = root.post("/api/application", &token, &bad).await;
    assert_eq!(status, 422, "{body}");
    let paths: BTreeSet<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains("applications[0].microservices[0].microservice_name"),
        "{body}"
    );
    assert!(
        paths.contains("applications[0].microservices[1].memory"),
        "{body}"
    );

    // Duplicates.
    let (status, _) = root.post("/api/application", &token, &clientsrvr()).await;
    assert_eq!(status, 200);
    let (status, body) = root.post("/api/application", &token, &clientsrvr()).await;
    assert_eq!(status, 409, "{body}");
    // Another application asking for an address another service holds.
    let mut clash = one_service_sla("clash", 100);
    clash["applications"][0]["microservices"][0]["addresses"] = json!({"rr_ip": "10.30.55.55"});
    let (status, body) = root.post("/api/application", &token, &clash).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("10.30.55.55"),
        "{body}"
    );
    // Nothing of the refused application was kept.
    let (_, apps) = root.get("/api/applications", &token).await;
    assert!(
        apps.as_array()
            .unwrap()
            .iter()
            .all(|a| a["application_name"] != "clash"),
        "{apps}"
    );

    // Unknown ids.
    let nope = "0123456789abcdef01234567";
    for path in [
        format!("/api/application/{nope}"),
        format!("/api/service/{nope}"),
        format!("/api/services/{nope}"),
    ] {
        let (status, body) = root.get(&path, &token).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, _) = root
        .post(&format!("/api/service/{nope}/instance"), &token, &json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = root
        .delete(&format!("/api/service/{nope}/instance/0"), &token)
        .await;
    assert_eq!(status, 404);
    let (status, body) = root
        .delete(&format!("/api/service/{nope}/instance/minus"), &token)
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = root.delete(&format!("/api/application/{nope}"), &token).await;
    assert_eq!(status, 404);

    // Not JSON at all, wrong content: 4xx, never 500.
    let (status, _) = root
        .post("/api/application", &token, &json!("just a string"))
        .await;
    assert_eq!(status, 422);
    root.stop().await;
}

#[tokio::test]
async fn services_can_be_added_and_deleted() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let (_, apps) = root
        .post("/api/application", &token, &one_service_sla("base", 100))
        .await;
    let app = app_id(&apps, "base");
    let mut more = one_service_sla("base", 100);
    more["applications"][0]["applicationID"] = json!(app);
    more["applications"][0]["microservices"][0]["microservice_name"] = json!("second");
    let (status, body) = root.post("/api/service", &token, &more).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deployed_services"][0]["service_name"], "second");
    let second = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(services_of(&root, &token, &app).await.len(), 2);
    let (status, body) = root.post("/api/service", &token, &more).await;
    assert_eq!(status, 409, "same job name again: {body}");
    let (status, body) = root
        .call(
            Method::PUT,
            &format!("/api/service/{second}"),
            Some(&token),
            Some(&json!({})),
        )
        .await;
    assert_eq!(status, 501, "{body}");
    let (status, body) = root.delete(&format!("/api/service/{second}"), &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Job deleted");
    assert_eq!(services_of(&root, &token, &app).await.len(), 1);
    let (_, got) = root.get(&format!("/api/application/{app}"), &token).await;
    assert_eq!(got["microservices"].as_array().unwrap().len(), 1, "{got}");

    let (status, body) = root
        .call(
            Method::PUT,
            &format!("/api/application/{app}"),
            Some(&token),
            Some(&json!({"application_desc": "changed"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, got) = root.get(&format!("/api/application/{app}"), &token).await;
    assert_eq!(got["application_desc"], "changed");
    let (status, body) = root
        .call(
            Method::PUT,
            &format!("/api/application/{app}"),
            Some(&token),
            Some(&json!({"application_name": "bad name!"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    root.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_instance_requests_get_fifty_numbers() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let (_, apps) = root
        .post("/api/application", &token, &one_service_sla("many", 10))
        .await;
    let app = app_id(&apps, "many");
    let job = services_of(&root, &token, &app).await[0]["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned();
    let cluster = FakeCluster::start(&root, "big").await;
    cluster.report(&root, 64, 100_000, json!([])).await;
    let root = std::sync::Arc::new(root);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (root, token, job) = (std::sync::Arc::clone(&root), token.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            root.post(&format!("/api/service/{job}/instance"), &token, &json!({}))
                .await
        }));
    }
    let mut numbers = BTreeSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        numbers.insert(body["instance_number"].as_i64().unwrap());
    }
    assert_eq!(numbers, (0..50).collect::<BTreeSet<_>>());
    let (_, svc) = root.get(&format!("/api/service/{job}"), &token).await;
    let list = svc["instance_list"].as_array().unwrap();
    assert_eq!(list.len(), 50, "no update lost");
    let ips: BTreeSet<&str> = list.iter().map(|i| i["instance_ip"].as_str().unwrap()).collect();
    assert_eq!(ips.len(), 50, "distinct instance addresses");
    assert_eq!(svc["next_instance_progressive_number"], 50);
}

#[tokio::test]
async fn restart_keeps_everything() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let (_, apps) = root.post("/api/application", &token, &clientsrvr()).await;
    let app = app_id(&apps, "clientsrvr");
    let cluster = FakeCluster::start(&root, "keep").await;
    cluster.report(&root, 4, 8000, json!([])).await;
    let job = service_named(&services_of(&root, &token, &app).await, "curl")["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["status"], "CLUSTER_SCHEDULED", "{r}");
    let (_, before) = root.get(&format!("/api/service/{job}"), &token).await;
    let (_, subnet_before) = root
        .call(
            Method::GET,
            "/api/net/subnet?worker_id=w1",
            Some(&cluster.token),
            None,
        )
        .await;
    root.stop().await;

    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let (status, after) = root.get(&format!("/api/service/{job}"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(after["instance_list"], before["instance_list"]);
    assert_eq!(after["RR_ip"], before["RR_ip"]);
    let (status, body) = cluster.report(&root, 4, 8000, json!([])).await;
    assert_eq!(status, 200, "the cluster's secret survives a restart: {body}");
    let (_, subnet_after) = root
        .call(
            Method::GET,
            "/api/net/subnet?worker_id=w1",
            Some(&cluster.token),
            None,
        )
        .await;
    assert_eq!(subnet_after, subnet_before, "a worker keeps its subnet");
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["instance_number"], 1, "numbers continue after a restart");
    let (_, svc) = root.get(&format!("/api/service/{job}"), &token).await;
    let ips: BTreeSet<&str> = svc["instance_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "no address handed out twice after a restart: {svc}");
    assert!(!ips.contains(svc["RR_ip"].as_str().unwrap()));
    root.stop().await;
}

#[tokio::test]
async fn cluster_registration_needs_the_join_token_and_keeps_ids() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let body = json!({"cluster_name": "c1", "cluster_location": "x"});
    let (status, _) = root
        .call(Method::POST, "/api/cluster/register", None, Some(&body))
        .await;
    assert_eq!(status, 401);
    let (status, _) = root
        .call(
            Method::POST,
            "/api/cluster/register",
            Some("wrong-token-wrong-token"),
            Some(&body),
        )
        .await;
    assert_eq!(status, 401);
    let (status, first) = root
        .call(
            Method::POST,
            "/api/cluster/register",
            Some(JOIN_TOKEN),
            Some(&body),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = root
        .call(
            Method::POST,
            "/api/cluster/register",
            Some(JOIN_TOKEN),
            Some(&body),
        )
        .await;
    assert_eq!(first["id"], second["id"], "same name, same id");
    assert_ne!(first["token"], second["token"], "a new secret per registration");
    let (status, _) = root
        .call(
            Method::POST,
            "/api/cluster/register",
            Some(JOIN_TOKEN),
            Some(&json!({"cluster_name": "bad name"})),
        )
        .await;
    assert_eq!(status, 422);

    let other = FakeCluster::start(&root, "c2").await;
    let id = first["id"].as_str().unwrap();
    // The old secret was replaced; another cluster's secret does not work for c1.
    for token in [first["token"].as_str().unwrap(), "nonsense"] {
        let (status, _) = root
            .call(
                Method::POST,
                &format!("/api/information/{id}"),
                Some(token),
                Some(&json!({})),
            )
            .await;
        assert_eq!(status, 401);
    }
    let (status, _) = root
        .call(
            Method::POST,
            &format!("/api/information/{id}"),
            Some(&other.token),
            Some(&json!({})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = root
        .call(
            Method::POST,
            &format!("/api/information/{id}"),
            Some(second["token"].as_str().unwrap()),
            Some(&json!({"vcpus": 2})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, all) = root.call(Method::GET, "/api/clusters", None, None).await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (_, active) = root.call(Method::GET, "/api/clusters/active", None, None).await;
    assert_eq!(active.as_array().unwrap().len(), 1, "c2 never reported: {active}");
    root.stop().await;
}

#[tokio::test]
async fn refused_instances_fall_back_to_the_next_cluster() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let job = one_service_job(&root, &token, "fb", 1000).await;
    // Best fit picks the tighter cluster first.
    let tight = FakeCluster::start(&root, "tight").await;
    let roomy = FakeCluster::start(&root, "roomy").await;
    tight.report(&root, 2, 1500, json!([])).await;
    roomy.report(&root, 8, 16000, json!([])).await;
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["cluster_id"], tight.id.as_str(), "best fit: {r}");
    tight.wait_for("deploy", |c| is_deploy(c, &job, 0)).await;

    // The cluster cannot place it: root drops it there and tries the next one.
    let (status, body) = root
        .call(
            Method::POST,
            "/api/result/deploy",
            Some(&tight.token),
            Some(&json!({"job_id": format!("{job}/0"), "status": "NO_WORKER_CAPACITY"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    tight.wait_for("undeploy", |c| is_undeploy(c, &job, 0)).await;
    roomy.wait_for("deploy", |c| is_deploy(c, &job, 0)).await;
    let (_, svc) = root.get(&format!("/api/service/{job}"), &token).await;
    assert_eq!(svc["instance_list"][0]["cluster_id"], roomy.id.as_str());

    // A cluster that fails the deploy call counts as refusing too; with nobody left the status says so.
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["cluster_id"], tight.id.as_str());
    tight
        .wait_for("deploy of instance 1", |c| is_deploy(c, &job, 1))
        .await;
    tight.answer_deploys_with(500);
    roomy.answer_deploys_with(500);
    let (_, r2) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    let n2 = r2["instance_number"].as_i64().unwrap();
    let detail = eventually("instance 2 to run out of clusters", || {
        let (root, token, job) = (&root, &token, &job);
        async move {
            let (_, svc) = root.get(&format!("/api/service/{job}"), token).await;
            let inst = svc["instance_list"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["instance_number"] == n2)
                .cloned()
                .unwrap();
            (inst["status"] == "NoActiveClusterWithCapacity").then(|| inst["status_detail"].clone())
        }
    })
    .await;
    // Instance 1's reservation leaves `tight` too little room; `roomy` was tried and refused.
    assert!(detail.as_str().unwrap().contains(&roomy.id), "{detail}");
    roomy
        .wait_for("undeploy after the failed deploy", |c| is_undeploy(c, &job, n2))
        .await;

    // A result about an instance the cluster does not hold is a 404 with the reference's status.
    let (status, body) = root
        .call(
            Method::POST,
            "/api/result/deploy",
            Some(&tight.token),
            Some(&json!({"job_id": format!("{job}/0"), "status": "NO_WORKER_CAPACITY"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "job_not_found");
    root.stop().await;
}

#[tokio::test]
async fn reservations_spread_a_burst_and_reports_reconcile() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let job = one_service_job(&root, &token, "burst", 3000).await;
    let a = FakeCluster::start(&root, "a").await;
    let b = FakeCluster::start(&root, "b").await;
    a.report(&root, 4, 4000, json!([])).await;
    b.report(&root, 4, 4000, json!([])).await;
    let (_, r0) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    let (_, r1) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_ne!(
        r0["cluster_id"], r1["cluster_id"],
        "the first placement's 3000 MiB stay reserved until reports show them: {r0} {r1}"
    );
    let (_, r2) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r2["status"], "NoActiveClusterWithCapacity", "{r2}");

    // Reconciliation: a job root does not know, and an instance root placed elsewhere, are deleted there.
    let on_a: usize = if r0["cluster_id"] == a.id.as_str() { 0 } else { 1 };
    let stray = 1 - on_a;
    let unknown = "ffffffffffffffffffffffff";
    let jobs = json!([
        {"_id": unknown, "job_name": "x.x.x.x", "status": "RUNNING", "instance_list": []},
        {"_id": job, "job_name": "burst.test.svc.test", "status": "RUNNING", "instance_list": [
            {"instance_number": on_a, "status": "RUNNING"},
            {"instance_number": stray, "status": "RUNNING"}
        ]}
    ]);
    let (status, _) = a.report(&root, 4, 1000, jobs).await;
    assert_eq!(status, 200);
    a.wait_for("delete of the unknown job", |c| is_undeploy(c, unknown, -1))
        .await;
    a.wait_for("delete of the stray instance", |c| {
        is_undeploy(c, &job, i64::try_from(stray).unwrap())
    })
    .await;
    let (_, svc) = root.get(&format!("/api/service/{job}"), &token).await;
    let statuses: Vec<&str> = svc["instance_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[on_a], "RUNNING");
    assert_eq!(
        statuses[stray], "CLUSTER_SCHEDULED",
        "b's instance is not changed by a's report"
    );
    root.stop().await;
}

#[tokio::test]
async fn instances_move_off_a_cluster_that_stops_reporting() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, true)).await;
    let token = root.admin().await;
    let job = one_service_job(&root, &token, "move", 500).await;
    let dying = FakeCluster::start(&root, "dying").await;
    let alive = FakeCluster::start(&root, "alive").await;
    dying.report(&root, 4, 1000, json!([])).await;
    alive.report(&root, 4, 8000, json!([])).await;
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["cluster_id"], dying.id.as_str(), "best fit: {r}");
    // `alive` keeps reporting; `dying` goes silent past the 2 s window.
    let moved = eventually("the instance to move to the live cluster", || {
        let (root, token, job, alive) = (&root, &token, &job, &alive);
        async move {
            alive.report(root, 4, 8000, json!([])).await;
            let (_, svc) = root.get(&format!("/api/service/{job}"), token).await;
            let inst = svc["instance_list"][0].clone();
            (inst["cluster_id"] == alive.id.as_str()).then_some(inst)
        }
    })
    .await;
    assert_eq!(moved["status"], "CLUSTER_SCHEDULED");
    alive
        .wait_for("deploy on the live cluster", |c| is_deploy(c, &job, 0))
        .await;
    root.stop().await;
}

#[tokio::test]
async fn unplaced_instances_are_retried_when_a_cluster_appears() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, true)).await;
    let token = root.admin().await;
    let job = one_service_job(&root, &token, "later", 100).await;
    let (_, r) = root
        .post(&format!("/api/service/{job}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["status"], "TargetClusterNotActive");
    let cluster = FakeCluster::start(&root, "late").await;
    cluster.report(&root, 2, 2000, json!([])).await;
    cluster
        .wait_for("the retried deploy", |c| is_deploy(c, &job, 0))
        .await;
    root.stop().await;
}

#[tokio::test]
async fn network_endpoints_resolve_and_fan_out() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let token = root.admin().await;
    let (_, apps) = root.post("/api/application", &token, &clientsrvr()).await;
    let services = services_of(&root, &token, &app_id(&apps, "clientsrvr")).await;
    let nginx = service_named(&services, "nginx")["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = FakeCluster::start(&root, "neta").await;
    let b = FakeCluster::start(&root, "netb").await;
    a.report(&root, 4, 8000, json!([])).await;

    // Subnets: stable per worker, distinct across workers, never without a cluster secret.
    async fn get(root: &Server, path: &str, token: &str) -> (u16, Value) {
        root.call(Method::GET, path, Some(token), None).await
    }
    let (status, s1) = get(&root, "/api/net/subnet?worker_id=w1", &a.token).await;
    assert_eq!(status, 200, "{s1}");
    assert_eq!(s1["subnet_addr"], "10.18.0.0");
    assert_eq!(s1["subnet_addr_v6"], "fc00::");
    let (_, s1again) = get(&root, "/api/net/subnet?worker_id=w1", &a.token).await;
    assert_eq!(s1, s1again);
    let (_, s2) = get(&root, "/api/net/subnet?worker_id=w2", &a.token).await;
    assert_eq!(s2["subnet_addr"], "10.18.0.64");
    let (status, _) = get(&root, "/api/net/subnet", &token).await;
    assert_eq!(status, 401, "a user token is not a cluster secret");
    // A forgotten worker's subnets go back to the pools, only for the cluster that owns the worker.
    async fn release(root: &Server, path: &str, token: &str) -> (u16, Value) {
        root.call(Method::DELETE, path, Some(token), None).await
    }
    let w2 = "/api/net/subnet?worker_id=w2";
    let (status, r) = release(&root, w2, &b.token).await;
    assert_eq!((status, r["released"].clone()), (200, json!(0)), "{r}");
    let (status, r) = release(&root, w2, &a.token).await;
    assert_eq!((status, r["released"].clone()), (200, json!(2)), "{r}");
    let (_, r) = release(&root, w2, &a.token).await;
    assert_eq!(r["released"], json!(0), "idempotent: {r}");
    let (status, r) = release(&root, "/api/net/subnet", &a.token).await;
    assert_eq!(status, 400, "{r}");
    assert!(r["message"].as_str().unwrap().contains("worker_id"), "{r}");
    let (status, _) = release(&root, "/api/net/subnet?worker_id=w1", &token).await;
    assert_eq!(status, 401);
    // w2 asks again: a pair of its own again, and w1 kept its pair.
    let (_, s2again) = get(&root, "/api/net/subnet?worker_id=w2", &a.token).await;
    assert_ne!(s2again["subnet_addr"], s1["subnet_addr"], "{s2again}");
    let (_, s1still) = get(&root, "/api/net/subnet?worker_id=w1", &a.token).await;
    assert_eq!(s1still, s1);

    let (_, r) = root
        .post(&format!("/api/service/{nginx}/instance"), &token, &json!({}))
        .await;
    assert_eq!(r["status"], "CLUSTER_SCHEDULED");
    // b resolves nginx by name (dots as underscores) and by its round-robin address: both register interest.
    let (status, by_name) = get(
        &root,
        "/api/net/service/clientsrvr_test_nginx_test/instances",
        &b.token,
    )
    .await;
    assert_eq!(status, 200, "{by_name}");
    assert_eq!(by_name["job_name"], "clientsrvr.test.nginx.test");
    assert_eq!(by_name["service_ip_list"][0]["IpType"], "RR");
    assert_eq!(by_name["service_ip_list"][0]["Address"], "10.30.55.55");
    let instance_ip = by_name["instance_list"][0]["instance_ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, by_ip) = get(&root, "/api/net/service/ip/10_30_55_55/instances", &b.token).await;
    assert_eq!(status, 200);
    assert_eq!(by_ip["_id"], nginx.as_str());
    let (_, by_instance_ip) = get(
        &root,
        &format!("/api/net/service/ip/{instance_ip}/instances"),
        &b.token,
    )
    .await;
    assert_eq!(by_instance_ip["_id"], nginx.as_str());
    let (status, _) = get(&root, "/api/net/service/nope_nope_nope_nope/instances", &b.token).await;
    assert_eq!(status, 404);
    let (status, _) = get(&root, "/api/net/service/ip/not_an_ip/instances", &b.token).await;
    assert_eq!(status, 400);

    // a reports where the instance landed: root records it and tells b (interested).
    let (status, body) = root
        .call(
            Method::POST,
            "/api/net/service/net_deploy_status",
            Some(&a.token),
            Some(&json!({"job_id": nginx, "instances": [{
                "instance_number": 0, "namespace_ip": "10.18.0.2", "namespace_ip_v6": "fc00::2",
                "host_ip": "192.168.1.5", "host_port": 50103
            }]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let update = b
        .wait_for("job update", |c| {
            c.method == Method::POST && c.path == "/api/net/job/update"
        })
        .await;
    assert_eq!(update.body["job_name"], "clientsrvr.test.nginx.test");
    assert_eq!(update.body["type"], "DEPLOYMENT");
    assert_eq!(update.bearer.as_deref(), Some(b.token.as_str()));
    let (_, resolved) = get(
        &root,
        "/api/net/service/clientsrvr_test_nginx_test/instances",
        &b.token,
    )
    .await;
    assert_eq!(resolved["instance_list"][0]["namespace_ip"], "10.18.0.2");
    assert_eq!(resolved["instance_list"][0]["host_port"], 50103);

    // Dropping the interest: once, then 404.
    let (status, _) = root
        .call(
            Method::DELETE,
            "/api/net/interest/clientsrvr.test.nginx.test",
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = root
        .call(
            Method::DELETE,
            "/api/net/interest/clientsrvr.test.nginx.test",
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = root
        .call(
            Method::POST,
            "/api/net/service/net_deploy_status",
            Some(&a.token),
            Some(&json!({"job_id": "0123456789abcdef01234567", "instances": []})),
        )
        .await;
    assert_eq!(status, 404);
    root.stop().await;
}

#[tokio::test]
async fn users_see_and_change_only_their_own_applications() {
    let dir = TempDir::new();
    let root = Server::start(config(&dir.0, false)).await;
    let admin = root.admin().await;
    for name in ["alice", "bob"] {
        let (status, body) = root
            .post(
                "/api/auth/register",
                &admin,
                &json!({"name": name, "password": format!("{name}-pw"), "roles": ["Application_Provider"]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let alice = root.login("alice", "alice-pw").await;
    let bob = root.login("bob", "bob-pw").await;

    let (status, apps) = root.post("/api/application", &alice, &clientsrvr()).await;
    assert_eq!(status, 200, "{apps}");
    let app = app_id(&apps, "clientsrvr");
    assert_eq!(apps[0]["userId"], "alice");
    let job = services_of(&root, &alice, &app).await[0]["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_owned();

    // Bob sees nothing of it and can change nothing.
    for path in [
        format!("/api/application/{app}"),
        format!("/api/services/{app}"),
        format!("/api/service/{job}"),
        format!("/api/service/{job}/instance/0/logs"),
    ] {
        let (status, body) = root.get(&path, &bob).await;
        assert_eq!(status, 404, "bob GET {path}: {body}");
    }
    let (status, _) = root
        .post(&format!("/api/service/{job}/instance"), &bob, &json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = root.delete(&format!("/api/service/{job}"), &bob).await;
    assert_eq!(status, 404);
    let (status, _) = root.delete(&format!("/api/application/{app}"), &bob).await;
    assert_eq!(status, 404);
    let (status, body) = root.get("/api/applications", &bob).await;
    assert_eq!(status, 403, "listing everything is Admin-only: {body}");
    assert_eq!(body["message"], "You have not enough permissions!");
    let (status, _) = root.get("/api/services", &bob).await;
    assert_eq!(status, 403);
    let (status, mine) = root.get("/api/applications/bob", &bob).await;
    assert_eq!(status, 200);
    assert_eq!(mine, json!([]));
    let (status, _) = root.get("/api/applications/alice", &bob).await;
    assert_eq!(status, 401, "another user's list");
    // The same names are free for bob: applications are unique per user.
    let (status, body) = root
        .post("/api/application", &bob, &one_service_sla("clientsrvr", 10))
        .await;
    assert_eq!(status, 200, "{body}");

    // Alice and the Admin see hers.
    let (status, mine) = root.get("/api/applications/alice", &alice).await;
    assert_eq!(status, 200);
    assert_eq!(mine.as_array().unwrap().len(), 1);
    let (status, _) = root.get(&format!("/api/application/{app}"), &admin).await;
    assert_eq!(status, 200);
    let (_, all) = root.get("/api/applications", &admin).await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    // A user who owns applications cannot be deleted (they would pass to the next user of that name).
    let (status, body) = root.delete("/api/user/alice", &admin).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = root.delete(&format!("/api/application/{app}"), &alice).await;
    assert_eq!(status, 200);
    let (status, body) = root.delete("/api/user/alice", &admin).await;
    assert_eq!(status, 200, "{body}");
    root.stop().await;
}
