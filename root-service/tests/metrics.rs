//! `GET /metrics` of a real root-service: only with the metrics token, in the text exposition format, with the
//! series an operator needs (instances by status, clusters by liveness, scheduling decisions and their latency,
//! the process's memory and CPU) and values that follow what happened.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use hyper::Method;
use oakestra_runtime::metrics::sample;
use serde_json::json;
use support::{FakeCluster, Server, TempDir, one_service_sla};

#[tokio::test]
async fn metrics_need_their_token_and_follow_the_deployment() {
    let dir = TempDir::new();
    let server = Server::start(support::config(&dir.0, false)).await;
    let token = std::fs::read_to_string(dir.0.join("metrics.token"))
        .unwrap()
        .trim()
        .to_owned();
    let raw = server.raw("GET", "/metrics", None, None).await;
    assert_eq!(raw.status, 401, "{}", raw.body);
    let (status, body) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(&json!({"username": "Admin", "password": "Admin"})),
        )
        .await;
    assert_eq!(status, 200);
    let admin = body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        server.raw("GET", "/metrics", Some(&admin), None).await.status,
        401,
        "a user token is not enough"
    );

    let cluster = FakeCluster::start(&server, "c1").await;
    cluster.report(&server, 4, 8000, json!([])).await;
    let (status, apps) = server
        .post("/api/application", &admin, &one_service_sla("m", 100))
        .await;
    assert_eq!(status, 200, "{apps}");
    let (_, services) = server
        .get(
            &format!("/api/services/{}", apps[0]["applicationID"].as_str().unwrap()),
            &admin,
        )
        .await;
    let id = services[0]["microserviceID"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let (status, body) = server
            .post(&format!("/api/service/{id}/instance"), &admin, &json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
    }

    let answer = server.raw("GET", "/metrics", Some(&token), None).await;
    assert_eq!(answer.status, 200);
    assert!(
        support::header(&answer.head, "content-type")
            .unwrap()
            .starts_with("text/plain"),
        "{}",
        answer.head
    );
    let text = answer.body;
    assert_eq!(
        sample(&text, r#"oakestra_root_clusters{state="active"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"oakestra_root_instances{status="CLUSTER_SCHEDULED"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"oakestra_root_scheduling_decisions_total{outcome="placed"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "oakestra_root_scheduling_decision_seconds_count"),
        Some(2.0),
        "{text}"
    );
    assert!(
        sample(&text, "process_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    assert!(sample(&text, "process_cpu_seconds_total").is_some(), "{text}");
    // Root's scheduler slot is exposed without a plugin (no Docker here), at 0.
    for family in [
        "oakestra_root_plugin_placements",
        "oakestra_root_plugin_fallbacks",
    ] {
        assert_eq!(
            sample(&text, &format!("{family}{{slot=\"root_scheduler\"}}")),
            Some(0.0),
            "{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"));
    server.stop().await;
}
