//! The addons API of a real root-service on 127.0.0.1 with no Docker daemon behind its socket: authentication and
//! roles, descriptor validation with field paths, the 503 naming why Docker cannot be used, and the routes a
//! scheduler plugin calls (plugin token only). The engine against a real dockerd is `tests/tests/addons.rs`.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use hyper::Method;
use serde_json::{Value, json};
use support::{Server, TempDir, login};

fn hello() -> Value {
    json!({"name": "hello", "services": [{"service_name": "hello", "image": "127.0.0.1:5000/oakestra/addon-hello:latest"}]})
}

#[tokio::test]
async fn the_addons_api_guards_validates_and_names_a_missing_docker() {
    let dir = TempDir::new();
    let mut config = support::config(&dir.0, false);
    config.addons.docker_socket = dir.0.join("no-docker.sock");
    let server = Server::start(config).await;
    let admin = login(&server, "Admin", "Admin").await;
    let (status, body) = server
        .post(
            "/api/auth/register",
            &admin,
            &json!({"name": "dev", "password": "dev-password-1"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let dev = login(&server, "dev", "dev-password-1").await;

    // Credentials: none → 401; a user → reads only; an admin → everything.
    for path in [
        "/api/v1/addons",
        "/api/v1/marketplace/addons",
        "/api/v1/addons/slots",
    ] {
        assert_eq!(server.call(Method::GET, path, None, None).await.0, 401, "{path}");
    }
    let (status, body) = server.get("/api/v1/marketplace/addons", &dev).await;
    assert_eq!((status, body), (200, json!([])));
    assert_eq!(
        server.get("/api/v1/marketplace/addons?status=all", &dev).await.0,
        403
    );
    assert_eq!(server.get("/api/v1/addons/slots", &dev).await.0, 403);
    let (status, body) = server.post("/api/v1/marketplace/addons", &dev, &hello()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        server
            .post("/api/v1/addons", &dev, &json!({"marketplace_id": "0".repeat(24)}))
            .await
            .0,
        403
    );

    // Bad descriptors: 422 with every problem's path, value and rule.
    let (status, body) = server
        .post(
            "/api/v1/marketplace/addons",
            &admin,
            &json!({"name": "", "services": [{"service_name": "a b", "image": "x", "labels": {"oak.addon.id": "1"}}], "extra": 1}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let paths: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "extra",
            "name",
            "services[0].service_name",
            "services[0].labels.oak.addon.id"
        ],
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("4 problem(s)"),
        "{body}"
    );
    let answer = server
        .raw("POST", "/api/v1/marketplace/addons", Some(&admin), Some("{nope"))
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let answer = server
        .send(&format!(
            "POST /api/v1/marketplace/addons HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {admin}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}"
        ))
        .await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 415"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A valid descriptor without Docker: 503 naming the socket, and nothing stored.
    let (status, body) = server.post("/api/v1/marketplace/addons", &admin, &hello()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("no-docker.sock"),
        "{body}"
    );
    assert_eq!(
        server
            .get("/api/v1/marketplace/addons?status=all", &admin)
            .await
            .1,
        json!([])
    );
    // Unknown ids are 404s; the core keeps working.
    assert_eq!(
        server
            .post(
                "/api/v1/addons",
                &admin,
                &json!({"marketplace_id": "0".repeat(24)})
            )
            .await
            .0,
        404
    );
    assert_eq!(server.get("/api/v1/addons/not-an-id", &admin).await.0, 404);
    assert_eq!(server.get("/api/applications", &admin).await.0, 200);
    let (status, slots) = server.get("/api/v1/addons/slots", &admin).await;
    assert_eq!(status, 200);
    assert!(slots["root_scheduler"]["plugin"].is_null(), "{slots}");

    // The plugin routes take the plugin token only.
    assert_eq!(server.get("/api/v1/resources?active=true", &admin).await.0, 401);
    let plugin = std::fs::read_to_string(dir.0.join("addons-plugin.token")).unwrap();
    let (status, body) = server.get("/api/v1/resources?active=true", plugin.trim()).await;
    assert_eq!((status, body), (200, json!([])));
    let (status, body) = server
        .post(
            "/api/result/deploy",
            plugin.trim(),
            &json!({"job_id": "abc/0", "candidate_id": "c"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "job_not_found");
    let (status, _) = server
        .post("/api/result/deploy", plugin.trim(), &json!({"job_id": "abc/0"}))
        .await;
    assert_eq!(status, 422);
    server.stop().await;
}
