//! `GET /metrics` of the real cluster-service: only with the metrics token, and with values that follow what
//! happened (a worker joined, an instance was placed on it, MQTT messages went both ways).

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use hyper::Method;
use oakestra_runtime::metrics::sample;
use serde_json::json;
use support::{
    BrokerKind, FakeRoot, FakeWorker, TempDir, call, eventually, fast_args, job_doc, set_flag, start_cluster,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_their_token_and_follow_the_cluster() {
    let dir = TempDir::new();
    let root = FakeRoot::start().await;
    let mut args = fast_args(&root.url, &dir.0);
    set_flag(&mut args, "--worker-timeout", "60");
    let cluster = start_cluster(args, &BrokerKind::Embedded).await;
    let token = std::fs::read_to_string(dir.0.join("metrics.token"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        call(cluster.addr, Method::GET, "/metrics", None, None)
            .await
            .status,
        401
    );
    assert_eq!(
        call(cluster.addr, Method::GET, "/metrics", Some("wrong"), None)
            .await
            .status,
        401
    );
    let worker = FakeWorker::join(&cluster, "edge-m", 4, 4000).await;
    let r = support::deploy(&cluster, "job1", 0, &job_doc("job1", "app.ns.svc.ns", json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let text = eventually(10, "the metrics after the placement", || async {
        let r = call(cluster.addr, Method::GET, "/metrics", Some(&token), None).await;
        let text = r.body.as_str().unwrap_or_default().to_owned();
        (sample(
            &text,
            r#"oakestra_cluster_placement_decisions_total{outcome="placed"}"#,
        ) == Some(1.0))
        .then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, r#"oakestra_cluster_workers{state="alive"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"oakestra_cluster_instances{status="NODE_SCHEDULED"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"oakestra_cluster_mqtt_messages_total{direction="in"}"#).unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, r#"oakestra_cluster_mqtt_messages_total{direction="out"}"#).unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "oakestra_cluster_broker_connections").unwrap() >= 1.0,
        "{text}"
    );
    // The worker logged in to the embedded broker; the cluster's own client is in-process and never reconnects.
    assert!(
        sample(&text, "oakestra_cluster_broker_logins_total").unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "oakestra_cluster_mqtt_reconnects_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "oakestra_cluster_deploy_seconds_count"),
        Some(0.0),
        "not running yet: {text}"
    );
    // The worker's first resource report says it runs: one deploy latency observed.
    worker.resources(&[("app.ns.svc.ns", 0)]).await;
    eventually(10, "the deploy latency", || async {
        let r = call(cluster.addr, Method::GET, "/metrics", Some(&token), None).await;
        let text = r.body.as_str().unwrap_or_default().to_owned();
        (sample(&text, "oakestra_cluster_deploy_seconds_count") == Some(1.0)).then_some(())
    })
    .await;
    assert!(
        sample(&text, "process_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    drop(worker);
    cluster.stop().await.unwrap();
}
