//! The auth API over real TCP on 127.0.0.1:0, each test with its own temporary data directory.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a panic is the clearest failure"
)]

mod support;

use oakestra_root_service::auth::{Claims, Keys, TokenType};
use serde_json::{Value, json};
use support::{Server, TempDir, plain_config};

impl Server {
    /// One HTTP/1.1 request over a fresh connection; returns the status and the body parsed as JSON (Null if none).
    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let answer = self.raw(method, path, token, body).await;
        (answer.status, answer.json())
    }

    async fn login(&self, user: &str, password: &str) -> (u16, Value) {
        let body = json!({ "username": user, "password": password }).to_string();
        self.request("POST", "/api/auth/login", None, Some(&body)).await
    }

    async fn admin_tokens(&self) -> (String, String) {
        let (status, body) = self.login("Admin", "Admin").await;
        assert_eq!(status, 200, "{body}");
        (
            body["token"].as_str().unwrap().to_owned(),
            body["refresh_token"].as_str().unwrap().to_owned(),
        )
    }
}

#[tokio::test]
async fn admin_login_token_opens_protected_route() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let (access, refresh) = server.admin_tokens().await;
    assert_ne!(access, refresh);
    let (status, me) = server
        .request("GET", "/api/auth/whoami", Some(&access), None)
        .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["username"], "Admin");
    assert_eq!(
        me["roles"],
        json!([
            "Admin",
            "Organization_Admin",
            "Application_Provider",
            "Infrastructure_Provider"
        ])
    );
    let org = me["organization"].as_str().unwrap();
    assert_eq!(org.len(), 24, "{org}");
    assert!(
        org.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{org}"
    );
    server.stop().await;
}

#[tokio::test]
async fn login_accepts_organization_fields() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    for field in ["organization_name", "organization"] {
        let body = json!({ "username": "Admin", "password": "Admin", field: "root" }).to_string();
        let (status, res) = server.request("POST", "/api/auth/login", None, Some(&body)).await;
        assert_eq!(status, 200, "{field}: {res}");
        assert!(res.get("password_hash").is_none());
    }
    server.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_401() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    for (user, pw) in [("Admin", "nope"), ("Nobody", "Admin")] {
        let (status, body) = server.login(user, pw).await;
        assert_eq!(status, 401, "{user}: {body}");
        assert_eq!(body, json!({ "message": "invalid username or password" }));
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_organization_is_404() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let body =
        json!({ "username": "Admin", "password": "Admin", "organization_name": "atlantis" }).to_string();
    let (status, res) = server.request("POST", "/api/auth/login", None, Some(&body)).await;
    assert_eq!(status, 404, "{res}");
    assert!(res["message"].as_str().unwrap().contains("atlantis"), "{res}");
    server.stop().await;
}

#[tokio::test]
async fn missing_or_garbage_token_is_401() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let expected = json!({ "message": "Missing authentication token" });
    for token in [None, Some("garbage"), Some("a.b.c")] {
        let (status, body) = server.request("GET", "/api/auth/whoami", token, None).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body, expected);
        let (status, body) = server.request("POST", "/api/auth/refresh", token, None).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body, expected);
    }
    server.stop().await;
}

#[tokio::test]
async fn token_kinds_are_not_interchangeable() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let (access, refresh) = server.admin_tokens().await;
    let (status, _) = server
        .request("GET", "/api/auth/whoami", Some(&refresh), None)
        .await;
    assert_eq!(status, 401, "a refresh token must not open a protected route");
    let (status, _) = server
        .request("POST", "/api/auth/refresh", Some(&access), None)
        .await;
    assert_eq!(status, 401, "an access token must not refresh");
    server.stop().await;
}

#[tokio::test]
async fn refresh_gives_a_working_access_token() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let (access, refresh) = server.admin_tokens().await;
    let (status, body) = server
        .request("POST", "/api/auth/refresh", Some(&refresh), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let new = body["token"].as_str().unwrap();
    assert_ne!(new, access);
    let (status, me) = server.request("GET", "/api/auth/whoami", Some(new), None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["username"], "Admin");
    server.stop().await;
}

#[tokio::test]
async fn expired_token_is_401() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let keys = Keys::load_or_create(&dir.0).unwrap();
    // Crafted tokens carry Admin's current token generation, taken from a real one.
    let (access, _) = server.admin_tokens().await;
    let generation = keys.verify(&access, TokenType::Access).unwrap().generation;
    assert!(generation.is_some());
    let now = oakestra_root_service::auth::unix_now();
    let mut claims = Claims {
        sub: "Admin".into(),
        kind: TokenType::Access,
        roles: vec!["Admin".into()],
        organization: "0".repeat(24),
        iat: now - 100,
        nbf: now - 100,
        exp: now - 10,
        jti: "1".repeat(24),
        generation,
    };
    let expired = keys.sign(&claims).unwrap();
    let (status, _) = server
        .request("GET", "/api/auth/whoami", Some(&expired), None)
        .await;
    assert_eq!(status, 401);
    claims.exp = now + 100;
    let valid = keys.sign(&claims).unwrap();
    let (status, body) = server
        .request("GET", "/api/auth/whoami", Some(&valid), None)
        .await;
    assert_eq!(status, 200, "the same claims with a future exp must pass: {body}");
    claims.kind = TokenType::Refresh;
    claims.exp = now - 10;
    let expired_refresh = keys.sign(&claims).unwrap();
    let (status, _) = server
        .request("POST", "/api/auth/refresh", Some(&expired_refresh), None)
        .await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn tokens_and_users_survive_a_restart() {
    let dir = TempDir::new();
    let first = Server::on(&dir.0).await;
    let (access, _) = first.admin_tokens().await;
    first.stop().await;
    let key_before = std::fs::read(dir.0.join("jwt.key")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join("jwt.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let second = Server::on(&dir.0).await;
    let (status, me) = second
        .request("GET", "/api/auth/whoami", Some(&access), None)
        .await;
    assert_eq!(status, 200, "{me}");
    second.admin_tokens().await;
    second.stop().await;
    assert_eq!(std::fs::read(dir.0.join("jwt.key")).unwrap(), key_before);
}

#[tokio::test]
async fn admin_password_flag_changes_the_password() {
    let dir = TempDir::new();
    let first = Server::on(&dir.0).await;
    first.admin_tokens().await;
    first.stop().await;

    let mut cfg = plain_config(&dir.0);
    cfg.admin_password = Some("correct horse".into());
    let second = Server::start(cfg).await;
    assert_eq!(
        second.login("Admin", "Admin").await.0,
        401,
        "old password must be refused"
    );
    let (status, body) = second.login("Admin", "correct horse").await;
    assert_eq!(status, 200, "{body}");
    second.stop().await;

    // A later start without the flag keeps the changed password.
    let third = Server::on(&dir.0).await;
    assert_eq!(third.login("Admin", "correct horse").await.0, 200);
    third.stop().await;
}

#[tokio::test]
async fn trailing_slash_variants_work() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let (status, health) = server.request("GET", "/api/health/", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        health,
        json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })
    );
    assert_eq!(server.request("GET", "/api/health", None, None).await.0, 200);
    let body = json!({ "username": "Admin", "password": "Admin" }).to_string();
    let (status, tokens) = server
        .request("POST", "/api/auth/login/", None, Some(&body))
        .await;
    assert_eq!(status, 200, "{tokens}");
    let refresh = tokens["refresh_token"].as_str().unwrap();
    let (status, body) = server
        .request("POST", "/api/auth/refresh/", Some(refresh), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = server
        .request(
            "GET",
            "/api/auth/whoami/",
            Some(body["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn malformed_bodies_are_4xx_with_a_message() {
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    for body in [
        "{not json",
        "",
        "[]",
        r#"{"username": "Admin"}"#,
        r#"{"username": 1, "password": "x"}"#,
    ] {
        let (status, res) = server.request("POST", "/api/auth/login", None, Some(body)).await;
        assert!((400..500).contains(&status), "{body:?} gave {status}");
        assert!(
            !res["message"].as_str().unwrap().is_empty(),
            "{body:?} gave {res}"
        );
    }
    let (_, res) = server
        .request("POST", "/api/auth/login", None, Some(r#"{"username": "Admin"}"#))
        .await;
    assert!(res["message"].as_str().unwrap().contains("password"), "{res}");
    // A body announced larger than the limit is refused from its Content-Length, before it is sent.
    let head = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    let raw = server.send(&head).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    server.stop().await;
}
