//! The worker-facing contract with scripted fake workers (plain HTTP + MQTT clients), against the embedded broker
//! and against a real Mosquitto: registration, deploy, status, resource reports, reconciliation, worker death (by
//! silence and by a dropped connection's last will), deadlines, one-shot completion, the network service, and persistence across a restart.

#![allow(clippy::unwrap_used, reason = "tests: a panic is the clearest failure")]

mod support;

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use axum::http::Method;
use oakestra_cluster_service::Running;
use serde_json::{Value, json};
use support::*;

/// Registration: the worker join token, stable ids, 409 for a live duplicate hostname unless its NodeEngine is
/// gone, 422 for a body without a host, secrets per node.
async fn registration(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let cluster = start_cluster(fast_args(&root.url, &dir.0), &broker).await;
    let token = cluster.engine.admission.join_token.clone();
    // The token is in the data directory, readable by root only.
    let file = dir.0.join("worker-join.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&dir.0).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Without the token, or with a wrong one: 401 naming what is missing, and nothing registered.
    for bearer in [None, Some("wrong-token")] {
        let r = call(
            cluster.addr,
            Method::POST,
            "/api/node/register",
            bearer,
            Some(&node_body("intruder", 4, 4000)),
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            r.body["message"].as_str().unwrap().contains("join token"),
            "{}",
            r.body
        );
    }
    assert!(cluster.engine.state().node_by_name("intruder").is_none());

    let a = FakeWorker::join(&cluster, "edge-a", 4, 4000).await;
    assert_eq!(a.id.len(), 24, "ObjectId-shaped id: {}", a.id);
    let dup = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        Some(&token),
        Some(&node_body("edge-a", 4, 4000)),
    )
    .await;
    assert_eq!(dup.status, 409, "{}", dup.body);
    let msg = dup.body["message"].as_str().unwrap();
    assert!(msg.contains("edge-a") && msg.contains(&a.id), "{msg}");
    // The same worker proving its identity (its id and current secret) gets the same id back, even without the
    // join token.
    let mut again = node_body("edge-a", 4, 4000);
    again["id"] = json!(a.id);
    again["token"] = json!(a.password);
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        None,
        Some(&again),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["id"], json!(a.id));
    let port: u16 = r.body["MQTT_BROKER_PORT"].as_str().unwrap().parse().unwrap();
    assert_eq!(port, cluster.engine.mqtt_port);
    assert_ne!(
        r.body["mqtt_password"],
        json!(a.password),
        "a fresh secret per registration"
    );
    // A restarted reference worker (no id, no secret) whose NodeEngine connection is gone gets the same id at
    // once, well within the worker timeout (embedded broker: it sees the connection close; with an external broker
    // only the last will tells, so that case is covered by `connection_loss`).
    if matches!(broker, BrokerKind::Embedded) {
        let id = a.id.clone();
        a.kill().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let r = loop {
            let r = call(
                cluster.addr,
                Method::POST,
                "/api/node/register",
                Some(&token),
                Some(&node_body("edge-a", 4, 4000)),
            )
            .await;
            if r.status != 409 || tokio::time::Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["id"], json!(id));
    }
    let bad = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        Some(&token),
        Some(&json!({"ip": "1.2.3.4"})),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.body["message"].as_str().unwrap().contains("host"),
        "{}",
        bad.body
    );
    // Worker data is bounded: a 600 KiB registration is refused (413, JSON), a bad host name is named (422), and
    // neither reaches the report, which root keeps taking.
    let mut huge = node_body("edge-huge", 4, 4000);
    huge["padding"] = json!("x".repeat(600 * 1024));
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        Some(&token),
        Some(&huge),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    let mut evil = node_body("edge\n\u{1b}[2Jevil", 4, 4000);
    evil["virtualization"] = json!(["docker"]);
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        Some(&token),
        Some(&evil),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().starts_with("host = "),
        "{}",
        r.body
    );
    let mut extra = node_body("edge-extra", 4, 4000);
    extra["padding"] = json!("x".repeat(30 * 1024));
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/node/register",
        Some(&token),
        Some(&extra),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let extra_id = r.body["id"].as_str().unwrap().to_owned();
    let stored = cluster
        .engine
        .state()
        .node(&extra_id)
        .unwrap()
        .record
        .registration
        .clone();
    assert!(
        !stored.contains("padding") && stored.contains("edge-extra"),
        "unknown keys are dropped: {stored}"
    );
    // It never connects over MQTT: forgotten after --purge-unconnected-after (2 s), credentials too.
    eventually(
        6,
        "the unconnected worker and its MQTT users to be forgotten",
        || async {
            let gone = cluster.engine.state().node(&extra_id).is_none()
                && cluster.engine.broker.credentials().anonymous(&extra_id).is_none();
            gone.then_some(())
        },
    )
    .await;
    let report = root.last_report().unwrap();
    assert!(report.to_string().len() < 4096, "{report}");
    let garbage = client_raw(cluster.addr, "/api/node/register", b"{not json").await;
    assert_eq!(garbage, 400);
    // Root-only routes need the cluster secret.
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/service/j1/0",
        None,
        Some(&job_doc("j1", "a.b.c.d", json!({}))),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/service/j1/0",
        Some("wrong"),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/service/j1/x",
        Some(CLUSTER_SECRET),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["message"].as_str().unwrap().contains("\"x\""),
        "{}",
        r.body
    );
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/service/j1/0",
        Some(CLUSTER_SECRET),
        Some(&json!({"image": "x"})),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(
        r.body["message"].as_str().unwrap().contains("job_name"),
        "{}",
        r.body
    );
    let status = call(cluster.addr, Method::GET, "/api/cluster/status", None, None).await;
    assert_eq!(status.body["cluster_id"], json!(CLUSTER_ID));
    let known = cluster.engine.state().nodes().count();
    assert_eq!(status.body["workers"], json!(known), "{}", status.body);
    assert!(known <= 1, "only edge-a may be left: {}", status.body);
    assert_eq!(status.body["ignored_foreign_reports"], json!(0));
    assert_eq!(
        status.body["connected_to_root"],
        json!(true),
        "root keeps taking the reports"
    );
    cluster.stop().await.unwrap();
}

/// A raw POST with an arbitrary body; the status code.
async fn client_raw(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Deploy → CREATED → resources ⇒ RUNNING at root; reconciliation; undeploy; no capacity ⇒ root is told.
async fn lifecycle(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let cluster = start_cluster(fast_args(&root.url, &dir.0), &broker).await;
    let mut w = FakeWorker::join(&cluster, "edge-a", 4, 4000).await;

    let r = deploy(&cluster, "job1", 0, &job_doc("job1", "app.ns.svc.ns", json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cmd = w.next("control/deploy", 5).await;
    assert_eq!(cmd["_id"], json!("job1"));
    assert_eq!(cmd["job_name"], json!("app.ns.svc.ns"));
    assert_eq!(cmd["instance_number"], json!(0));
    assert_eq!(cmd["image"], json!("docker.io/library/nginx:latest"));
    eventually(5, "NODE_SCHEDULED at root", || async {
        (root.reported_status("job1", 0)? == "NODE_SCHEDULED").then_some(())
    })
    .await;

    w.status("app.ns.svc.ns", 0, "CREATED").await;
    w.resources(&[("app.ns.svc.ns", 0)]).await;
    eventually(5, "RUNNING at root", || async {
        (root.reported_status("job1", 0)? == "RUNNING").then_some(())
    })
    .await;
    let report = root.last_report().unwrap();
    let instance = &report["jobs"][0]["instance_list"][0];
    assert_eq!(instance["worker_id"], json!(w.id));
    assert_eq!(instance["publicip"], json!("192.0.2.10"));
    assert_eq!(instance["logs"], json!("hello\n"));
    assert_eq!(report["active_nodes"], json!(1));
    assert_eq!(report["vcpus"], json!(4));
    assert_eq!(
        root.calls("/api/information/").last().unwrap().bearer.as_deref(),
        Some(CLUSTER_SECRET)
    );

    // An instance the cluster does not know gets a delete.
    w.resources(&[("app.ns.svc.ns", 0), ("ghost.ns.svc.ns", 7)]).await;
    let del = w.next("control/delete", 5).await;
    assert_eq!(del["job_name"], json!("ghost.ns.svc.ns"));
    assert_eq!(del["instance_number"], json!(7));

    // No worker fits 64 cores: root hears NO_WORKER_CAPACITY for "<job>/<n>".
    let r = deploy(
        &cluster,
        "job2",
        0,
        &job_doc("job2", "big.ns.svc.ns", json!({"vcpus": 64})),
    )
    .await;
    assert_eq!(r.status, 200);
    let refused = eventually(5, "the refusal at root", || async {
        root.calls("/api/result/deploy")
            .into_iter()
            .find(|c| c.body["job_id"] == json!("job2/0"))
    })
    .await;
    assert_eq!(refused.body["status"], json!("NO_WORKER_CAPACITY"));
    assert_eq!(refused.bearer.as_deref(), Some(CLUSTER_SECRET));

    // Root removes instance 0: the worker gets the delete and the job disappears from the report.
    let r = call(
        cluster.addr,
        Method::DELETE,
        "/api/service/job1/0",
        Some(CLUSTER_SECRET),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let del = w.next("control/delete", 5).await;
    assert_eq!(del["job_name"], json!("app.ns.svc.ns"));
    assert_eq!(del["instance_number"], json!(0));
    assert_eq!(del["virtualization"], json!("container"));
    eventually(5, "job1 gone from the report", || async {
        let r = root.last_report()?;
        (!r["jobs"].as_array()?.iter().any(|j| j["_id"] == json!("job1"))).then_some(())
    })
    .await;
    let r = call(
        cluster.addr,
        Method::DELETE,
        "/api/service/job1/-1",
        Some(CLUSTER_SECRET),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    cluster.stop().await.unwrap();
}

/// Deploys instance 0 of `job1` (`app.ns.svc.ns`), which lands on `worker` (the only one), and has it report the
/// instance until root hears it is RUNNING.
async fn run_job1_on(cluster: &Running, root: &FakeRoot, worker: &mut FakeWorker) {
    deploy(cluster, "job1", 0, &job_doc("job1", "app.ns.svc.ns", json!({}))).await;
    worker.next("control/deploy", 5).await;
    worker.resources(&[("app.ns.svc.ns", 0)]).await;
    eventually(5, "RUNNING", || async {
        (root.reported_status("job1", 0)? == "RUNNING").then_some(())
    })
    .await;
}

/// Worker death ⇒ its instance is rescheduled on another worker; a stuck NODE_SCHEDULED is rescheduled; a
/// crash-looping instance backs off; a COMPLETED one-shot is left alone.
async fn self_healing(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let cluster = start_cluster(fast_args(&root.url, &dir.0), &broker).await;
    let mut a = FakeWorker::join(&cluster, "edge-a", 4, 4000).await;

    // Worker death.
    run_job1_on(&cluster, &root, &mut a).await;
    let mut b = FakeWorker::join(&cluster, "edge-b", 4, 4000).await;
    let killed_at = tokio::time::Instant::now();
    a.kill().await;
    let cmd = b.next("control/deploy", 5).await;
    let took = killed_at.elapsed();
    assert_eq!(cmd["_id"], json!("job1"));
    b.keep_reporting(vec![("app.ns.svc.ns".to_owned(), 0)]);
    assert!(
        took >= Duration::from_millis(900),
        "rescheduled before the 1 s worker timeout: {took:?}"
    );
    eventually(5, "the new placement at root", || async {
        let r = root.last_report()?;
        (r["jobs"][0]["instance_list"][0]["worker_id"] == json!(b.id)).then_some(())
    })
    .await;

    // Stuck in NODE_SCHEDULED (the worker never answers): placed again after the 2 s deploy deadline.
    deploy(
        &cluster,
        "job2",
        0,
        &job_doc("job2", "stuck.ns.svc.ns", json!({})),
    )
    .await;
    b.next_about("control/deploy", "job2", 5).await;
    let first = tokio::time::Instant::now();
    b.next_about("control/delete", "stuck.ns.svc.ns", 5).await;
    b.next_about("control/deploy", "job2", 5).await;
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "too early: {:?}",
        first.elapsed()
    );

    // Crash loop: each DEAD report is answered later than the one before, and the detail says so.
    let mut gaps = Vec::new();
    for _ in 0..3 {
        b.status("stuck.ns.svc.ns", 0, "DEAD").await;
        let t = tokio::time::Instant::now();
        b.next_about("control/deploy", "job2", 5).await;
        gaps.push(t.elapsed());
    }
    assert!(gaps[2] > gaps[0], "back-off does not grow: {gaps:?}");
    b.status("stuck.ns.svc.ns", 0, "DEAD").await;
    let detail = eventually(5, "the crash-loop detail", || async {
        let r = root.last_report()?;
        let job = r["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["_id"] == json!("job2"))?
            .clone();
        let d = job["instance_list"][0]["status_detail"].as_str()?.to_owned();
        d.contains("crash loop").then_some(d)
    })
    .await;
    assert!(detail.contains("restarting in"), "{detail}");

    // one_shot: RUNNING then COMPLETED, and nothing happens afterwards.
    deploy(
        &cluster,
        "job3",
        0,
        &job_doc("job3", "once.ns.svc.ns", json!({"one_shot": true})),
    )
    .await;
    let cmd = b.next_about("control/deploy", "job3", 5).await;
    assert_eq!(cmd["one_shot"], json!(true));
    b.resources(&[("once.ns.svc.ns", 0)]).await;
    b.status("once.ns.svc.ns", 0, "COMPLETED").await;
    eventually(5, "COMPLETED", || async {
        (root.reported_status("job3", 0)? == "COMPLETED").then_some(())
    })
    .await;
    let r = call(
        cluster.addr,
        Method::DELETE,
        "/api/service/job2/-1",
        Some(CLUSTER_SECRET),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    // Longer than every deadline (2 s deploy, 2 s stale): no new deploy for job3.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some((topic, v))) = tokio::time::timeout(Duration::from_millis(300), b.inbox.recv()).await {
            assert!(
                !(topic.ends_with("control/deploy") && v["_id"] == json!("job3")),
                "a COMPLETED one-shot was deployed again"
            );
        }
    }
    assert_eq!(root.reported_status("job3", 0).as_deref(), Some("COMPLETED"));
    cluster.stop().await.unwrap();
}

/// A worker whose connection drops without a goodbye (its last will): its instances move once the lost grace is
/// over, long before the worker timeout (30 s here) would have moved them.
async fn connection_loss(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let mut args = fast_args(&root.url, &dir.0);
    set_flag(&mut args, "--worker-timeout", "30");
    args.extend(["--lost-grace".to_owned(), "0.5".to_owned()]);
    let cluster = start_cluster(args, &broker).await;
    let mut a = FakeWorker::join_with_will(&cluster, "edge-a", 4, 4000).await;
    run_job1_on(&cluster, &root, &mut a).await;
    let mut b = FakeWorker::join_with_will(&cluster, "edge-b", 4, 4000).await;
    let crashed_at = tokio::time::Instant::now();
    a.crash();
    // Within 10 s: only the will can have moved it (the worker timeout is 30 s).
    let cmd = b.next("control/deploy", 10).await;
    let took = crashed_at.elapsed();
    assert_eq!(cmd["_id"], json!("job1"));
    assert!(
        took >= Duration::from_millis(400),
        "rescheduled before the 0.5 s grace: {took:?}"
    );
    b.kill().await;
    cluster.stop().await.unwrap();
}

/// The network service: subnets, table queries (resolved through root), addresses forwarded, interests, updates.
async fn network(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    root.add_net_job(json!({
        "_id": "job9", "job_name": "net.ns.svc.ns",
        "service_ip_list": [{"IpType": "RR", "Address": "10.30.0.5", "Address_v6": "fdff:2000::5"}],
        "instance_list": [{"instance_number": 0, "instance_ip": "10.30.0.6", "host_ip": "192.0.2.20", "host_port": 50103,
                           "service_ip": [{"IpType": "RR", "Address": "10.30.0.5", "Address_v6": "fdff:2000::5"}]}]
    }));
    let dir = TempDir::new();
    let mut args = fast_args(&root.url, &dir.0);
    args.extend(["--purge-dead-after".to_owned(), "1".to_owned()]);
    let cluster = start_cluster(args, &broker).await;
    let mut w = FakeWorker::join(&cluster, "edge-a", 4, 4000).await;

    w.publish("net/subnet", json!({"METHOD": "GET"})).await;
    let subnet = w.next("net/subnetwork/result", 5).await;
    assert_eq!(subnet, json!({"address": "10.18.0.64", "addressv6": "fc00::100"}));
    assert_eq!(root.calls("/api/net/subnet").len(), 1);
    assert!(root.calls("/api/net/subnet")[0].path.contains(&w.id));
    // Asked again: the stored subnet, without asking root.
    w.publish("net/subnet", json!({"METHOD": "GET"})).await;
    assert_eq!(w.next("net/subnetwork/result", 5).await, subnet);
    assert_eq!(root.calls("/api/net/subnet").len(), 1);

    w.publish(
        "net/tablequery/request",
        json!({"sname": "net.ns.svc.ns", "sip": ""}),
    )
    .await;
    let result = w.next("net/tablequery/result", 5).await;
    assert_eq!(result["app_name"], json!("net.ns.svc.ns"));
    assert_eq!(result["query_key"], json!("net.ns.svc.ns"));
    assert_eq!(result["instance_list"][0]["instance_ip"], json!("10.30.0.6"));
    // By IP: answered from the cache (root is asked once in all).
    w.publish("net/tablequery/request", json!({"sname": "", "sip": "10.30.0.5"}))
        .await;
    let by_ip = w.next("net/tablequery/result", 5).await;
    assert_eq!(by_ip["app_name"], json!("net.ns.svc.ns"));
    assert_eq!(by_ip["query_key"], json!("10.30.0.5"));
    assert_eq!(root.calls("/api/net/service/").len(), 1);
    // Unknown: an empty instance_list, like the reference.
    w.publish(
        "net/tablequery/request",
        json!({"sname": "nope.ns.svc.ns", "sip": ""}),
    )
    .await;
    let none = w.next("net/tablequery/result", 5).await;
    assert_eq!(none["instance_list"], json!([]));

    // The worker's NetManager reports a placed instance's addresses: stored and forwarded to root.
    deploy(&cluster, "job1", 0, &job_doc("job1", "app.ns.svc.ns", json!({}))).await;
    w.next("control/deploy", 5).await;
    w.publish(
        "net/service/deployed",
        json!({"appname": "app.ns.svc.ns", "status": "DEPLOYED", "instance_number": 0, "nsip": "10.18.0.66",
               "nsipv6": "fc00::102", "host_ip": "192.0.2.10", "host_port": "50103"}),
    )
    .await;
    let forwarded = eventually(5, "net_deploy_status at root", || async {
        root.calls("/api/net/service/net_deploy_status")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(forwarded.body["job_id"], json!("job1"));
    assert_eq!(
        forwarded.body["instances"][0]["namespace_ip"],
        json!("10.18.0.66")
    );
    assert_eq!(forwarded.body["instances"][0]["host_port"], json!(50103));
    assert_eq!(forwarded.body["instances"][0]["worker_id"], json!(w.id));
    eventually(5, "namespace_ip in the report", || async {
        let r = root.last_report()?;
        (r["jobs"][0]["instance_list"][0]["namespace_ip"] == json!("10.18.0.66")).then_some(())
    })
    .await;

    // The instance's host address changes: root hears it and the workers are told to refresh.
    w.publish(
        "net/service/address-changed",
        json!({"appname": "app.ns.svc.ns", "status": "", "instance_number": 0, "nsip": "", "nsipv6": "",
               "host_ip": "192.0.2.99", "host_port": "50104"}),
    )
    .await;
    let changed = eventually(5, "the changed address at root", || async {
        root.calls("/api/net/service/net_deploy_status")
            .into_iter()
            .nth(1)
    })
    .await;
    assert_eq!(changed.body["instances"][0]["host_ip"], json!("192.0.2.99"));
    assert_eq!(changed.body["instances"][0]["host_port"], json!(50104));
    assert_eq!(
        changed.body["instances"][0]["namespace_ip"],
        Value::Null,
        "not part of an address change"
    );
    let update = w.next("jobs/app.ns.svc.ns/updates_available", 5).await;
    assert_eq!(update, json!({"type": "DEPLOYMENT"}));

    // Root says the job changed: the workers hear it on jobs/<job>/updates_available.
    let r = call(
        cluster.addr,
        Method::POST,
        "/api/net/job/update",
        Some(CLUSTER_SECRET),
        Some(&json!({"job_name": "net.ns.svc.ns", "instance_number": 0, "type": "UNDEPLOYMENT"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let update = w.next("jobs/net.ns.svc.ns/updates_available", 5).await;
    assert_eq!(update, json!({"type": "UNDEPLOYMENT"}));

    // The last interested worker lets go: root is told.
    w.publish("net/interest/remove", json!({"appname": "net.ns.svc.ns"}))
        .await;
    let dropped = eventually(5, "the interest removal at root", || async {
        root.calls("/api/net/interest/").into_iter().next()
    })
    .await;
    assert_eq!(dropped.method, Method::DELETE);
    assert_eq!(dropped.path, "/api/net/interest/net.ns.svc.ns");

    // The worker dies and is forgotten (--purge-dead-after 1 s here): root gets its subnet pair back.
    let id = w.id.clone();
    w.kill().await;
    let released = eventually(15, "the subnet released at root", || async {
        root.calls("/api/net/subnet")
            .into_iter()
            .find(|c| c.method == Method::DELETE)
    })
    .await;
    assert_eq!(released.path, format!("/api/net/subnet?worker_id={id}"));
    assert!(
        cluster.engine.state().node(&id).is_none(),
        "the worker is forgotten"
    );
    cluster.stop().await.unwrap();
}

/// A restarted cluster keeps its id, workers, jobs and subnets.
async fn persistence(broker: BrokerKind) {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let mut args = fast_args(&root.url, &dir.0);
    // Long enough that the worker stays alive across the restart.
    set_flag(&mut args, "--worker-timeout", "5");
    let cluster = start_cluster(args.clone(), &broker).await;
    let mut w = FakeWorker::join(&cluster, "edge-a", 4, 4000).await;
    w.publish("net/subnet", json!({"METHOD": "GET"})).await;
    w.next("net/subnetwork/result", 5).await;
    deploy(&cluster, "job1", 0, &job_doc("job1", "app.ns.svc.ns", json!({}))).await;
    w.next("control/deploy", 5).await;
    w.resources(&[("app.ns.svc.ns", 0)]).await;
    eventually(5, "RUNNING", || async {
        (root.reported_status("job1", 0)? == "RUNNING").then_some(())
    })
    .await;
    cluster.stop().await.unwrap();
    let registrations = root.calls("/api/cluster/register").len();

    let cluster = start_cluster(args, &broker).await;
    assert_eq!(
        root.calls("/api/cluster/register").len(),
        registrations,
        "the id was kept, no new registration"
    );
    let workers = call(
        cluster.addr,
        Method::GET,
        "/api/cluster/workers",
        Some(CLUSTER_SECRET),
        None,
    )
    .await;
    assert_eq!(workers.body[0]["id"], json!(w.id));
    assert_eq!(workers.body[0]["subnet"], json!("10.18.0.64"));
    let report = call(
        cluster.addr,
        Method::GET,
        "/api/cluster/report",
        Some(CLUSTER_SECRET),
        None,
    )
    .await;
    assert_eq!(report.body["jobs"][0]["_id"], json!("job1"));
    assert_eq!(
        report.body["jobs"][0]["instance_list"][0]["status"],
        json!("RUNNING")
    );
    // The worker's secret still works on the broker (the embedded one is a new broker on a new port here).
    let port = cluster.engine.mqtt_port;
    let again = FakeWorker::connect(&w.id, &format!("{}-ne", w.id), &w.password, port).await;
    again.resources(&[("app.ns.svc.ns", 0)]).await;
    w.kill().await;
    cluster.stop().await.unwrap();
}

/// Runs each scenario against the embedded broker (`embedded::<name>`) and against a Mosquitto child
/// (`mosquitto::<name>`).
macro_rules! on_both_brokers {
    ($($name:ident),*) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::BrokerKind::Embedded).await;
                }
            )*
        }
        mod mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::BrokerKind::mosquitto().await).await;
                }
            )*
        }
    };
}

on_both_brokers!(
    registration,
    lifecycle,
    self_healing,
    connection_loss,
    network,
    persistence
);

/// Sends raw `bytes` and returns what comes back before the server closes (or `limit` passes).
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], limit: Duration) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, s.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The HTTP listener: every error answer is JSON `{"message": …}` (unknown route, 405, 413, a path that is not
/// UTF-8), and a client that sends its headers too slowly is disconnected (`--header-read-timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_and_slow_clients_are_cut() {
    let root = FakeRoot::start().await;
    let dir = TempDir::new();
    let mut args = fast_args(&root.url, &dir.0);
    args.extend(["--header-read-timeout".to_owned(), "1".to_owned()]);
    let cluster = start_cluster(args, &BrokerKind::Embedded).await;
    let mut oversized =
        b"POST /api/node/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\nConnection: close\r\n\r\n".to_vec();
    oversized.extend(std::iter::repeat_n(b' ', 200_000));
    let cases: [(&[u8], &str); 4] = [
        (b"GET /api/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404"),
        (b"PUT /api/cluster/status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "405"),
        (&oversized, "413"),
        (b"POST /api/service/%FF%FE/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", "400"),
    ];
    for (request, status) in cases {
        let (answer, _) = raw_exchange(cluster.addr, request, Duration::from_secs(5)).await;
        let request = &request[..request.len().min(120)];
        let head = answer.lines().next().unwrap_or_default();
        assert!(
            head.contains(status),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    // Half a request head, then silence: closed after the 1 s header-read timeout.
    let t = std::time::Instant::now();
    let (_, closed) = raw_exchange(
        cluster.addr,
        b"GET /api/cluster/status HTTP/1.1\r\nHo",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "a half-sent request was held open for 5 s");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    cluster.stop().await.unwrap();
}
