//! The attacks of issue 18 part 4 ("Tokens and sessions") against a real root-service on 127.0.0.1, each test
//! with its own temporary data directory: tokens that outlive a demotion, password guessing, a login flood that
//! starves everyone else, forged log lines, slow and idle connections, error answers that are not JSON, files
//! readable by others.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use oakestra_root_service::{hashing::PoolSize, throttle::LoginLimits};
use oakestra_runtime::server::ServerLimits;
use serde_json::{Value, json};
use support::{Server, TempDir};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

impl Server {
    /// `POST /api/auth/login` as `user`; the status and the body.
    async fn login(&self, user: &str, password: &str) -> (u16, Value) {
        let body = json!({ "username": user, "password": password }).to_string();
        let answer = self.raw("POST", "/api/auth/login", None, Some(&body)).await;
        (answer.status, answer.json())
    }

    /// Logs in; the access and the refresh token.
    async fn tokens(&self, user: &str, password: &str) -> (String, String) {
        let (status, body) = self.login(user, password).await;
        assert_eq!(status, 200, "login {user}: {body}");
        (
            body["token"].as_str().unwrap().to_owned(),
            body["refresh_token"].as_str().unwrap().to_owned(),
        )
    }

    /// One request with an optional token and JSON body; the status and the body.
    async fn json(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let answer = self.raw(method, path, token, body.as_deref()).await;
        (answer.status, answer.json())
    }

    /// `POST /api/auth/refresh` with `refresh`; the status and the body.
    async fn refresh(&self, refresh: &str) -> (u16, Value) {
        self.json("POST", "/api/auth/refresh", Some(refresh), None).await
    }

    /// Registers `name` (password `<name>-pw`) with `roles`, as `admin`.
    async fn register(&self, admin: &str, name: &str, roles: &[&str]) {
        let body = json!({ "name": name, "password": format!("{name}-pw"), "roles": roles });
        let (status, res) = self
            .json("POST", "/api/auth/register", Some(admin), Some(body))
            .await;
        assert_eq!(status, 200, "register {name}: {res}");
    }
}

/// Fails the test unless the answer is the 401 of a revoked token.
fn assert_revoked(what: &str, (status, body): (u16, Value)) {
    assert_eq!(status, 401, "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("revoked"), "{what}: {body}");
}

/// Everything the `tracing` subscriber of the test's thread writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A login user name with a newline, a forged log line and ANSI colour codes is logged escaped, on one line.
/// (`#[tokio::test]` runs the server on the test's thread, where the capturing subscriber is installed.)
#[tokio::test]
async fn user_supplied_names_are_logged_escaped() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = Server::fresh().await;
    let evil = "mallory\n2030-01-01T00:00:00Z  INFO login username=Admin\x1b[2K\u{202e}";
    let (status, _) = server.login(evil, "wrong").await;
    assert_eq!(status, 401);
    server.stop().await;
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("login refused"))
        .unwrap_or_else(|| panic!("no refusal logged: {text}"));
    assert!(
        line.contains(r"username=mallory\n2030-01-01T00:00:00Z  INFO login username=Admin\u{1b}[2K\u{202e}"),
        "{line}"
    );
    assert!(!text.contains('\x1b') && !text.contains('\u{202e}'), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("2030-01-01")),
        "a forged line: {text}"
    );
}

// === HTTP listener: header-read and idle timeouts, the connection cap ===

/// A server with test-sized listener limits; the data directory lives as long as the returned guard.
async fn server_with(limits: ServerLimits) -> (Server, TempDir) {
    let dir = TempDir::new();
    let mut config = support::config(&dir.0, false);
    config.http = limits;
    (Server::start(config).await, dir)
}

fn limits(header_ms: u64, idle_ms: u64, max_connections: usize) -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(header_ms),
        idle_timeout: Duration::from_millis(idle_ms),
        max_connections,
        ..ServerLimits::default()
    }
}

/// Reads until the server closes the connection (EOF or reset); how long that took from `since`. Fails the test
/// after 10 s.
async fn closed_after(reader: &mut (impl AsyncRead + Unpin), since: Instant) -> Duration {
    let mut buf = [0_u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for 10 s"),
            Ok(Ok(0) | Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length` from a kept-alive connection: the status and the body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(raw[..end].to_vec())
                .unwrap()
                .to_ascii_lowercase();
            let len: usize = support::header(&head, "content-length").unwrap().parse().unwrap();
            if raw.len() >= end + 4 + len {
                let body = String::from_utf8(raw[end + 4..end + 4 + len].to_vec()).unwrap();
                return (head.split(' ').nth(1).unwrap().parse().unwrap(), body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
}

const HEALTH: &[u8] = b"GET /api/health HTTP/1.1\r\nHost: root\r\n\r\n";

/// A partial request line, a head without its blank line, a head dripped in a byte every 50 ms (1.9 s in all)
/// and a silent connection are all cut at the 400 ms header timeout, long before the 5 s idle timeout.
#[tokio::test]
async fn slow_or_partial_heads_are_cut_at_the_header_timeout() {
    let (server, _dir) = server_with(limits(400, 5_000, 64)).await;
    let partial_line = b"GET /api/hea".as_slice();
    let no_blank_line = b"GET /api/health HTTP/1.1\r\nHost: root\r\n".as_slice();
    let mut clients = Vec::new();
    for (what, first) in [
        ("partial request line", partial_line),
        ("head without its end", no_blank_line),
        ("silent connection", b"".as_slice()),
    ] {
        let addr = server.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let start = Instant::now();
            stream.write_all(first).await.unwrap();
            (what, closed_after(&mut stream, start).await)
        }));
    }
    let addr = server.addr;
    clients.push(tokio::spawn(async move {
        let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
        let start = Instant::now();
        let drip = tokio::spawn(async move {
            for byte in b"GET /api/health HTTP/1.1\r\nHost: root\r\nX-Slow: 1\r\n\r\n" {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let took = closed_after(&mut reader, start).await;
        drip.abort();
        ("dripped head", took)
    }));
    for client in clients {
        let (what, took) = client.await.unwrap();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_millis(2_500),
            "{what}: closed after {took:?}"
        );
    }
    // The listener still serves.
    assert_eq!(server.raw("GET", "/api/health", None, None).await.status, 200);
    server.stop().await;
}

/// A keep-alive connection outlives the header timeout while idle, serves the next request, and is closed once
/// it has been idle for the idle timeout.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    let (server, _dir) = server_with(limits(300, 1_200, 64)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for _ in 0..3 {
        stream.write_all(HEALTH).await.unwrap();
        let (status, body) = read_response(&mut stream).await;
        assert_eq!(status, 200, "{body}");
    }
    // Idle for longer than the header timeout but shorter than the idle timeout: still open.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(HEALTH).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    let took = closed_after(&mut stream, Instant::now()).await;
    assert!(
        took >= Duration::from_millis(1_100) && took < Duration::from_millis(3_000),
        "closed after {took:?}"
    );
    server.stop().await;
}

/// With a cap of two connections, a third waits (unanswered) until one of the two closes.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let (server, _dir) = server_with(limits(5_000, 5_000, 2)).await;
    let first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buf = [0_u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "the third connection was served while two were open"
    );
    drop(first);
    let (status, _) = read_response(&mut third).await;
    assert_eq!(status, 200);
    server.stop().await;
}

// === Every error answer is JSON ===

/// Sends `request` as it is on a fresh connection; the status, the lower-cased head and the body.
async fn exchange(server: &Server, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The server may answer (and close) before it has read everything: a failed write is not the test's concern.
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let head = head.to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, body.to_owned())
}

/// The message of a JSON error answer; fails the test if the answer is not one.
fn json_message(what: &str, head: &str, body: &str) -> String {
    assert_eq!(
        support::header(head, "content-type"),
        Some("application/json"),
        "{what}: {head}\n{body}"
    );
    let parsed: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
    let message = parsed["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    assert!(!message.is_empty(), "{what}: {body}");
    message.to_owned()
}

#[tokio::test]
async fn every_error_answer_is_json_with_a_message() {
    let (server, _dir) = server_with(ServerLimits::default()).await;
    let (_, tokens) = server.login("Admin", "Admin").await;
    let admin = tokens["token"].as_str().unwrap().to_owned();
    let cluster = support::FakeCluster::start(&server, "c1").await;
    let big = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: root\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        1_200_000,
        "a".repeat(1_200_000)
    );
    let request = |method: &str, path: &str, headers: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: root\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let bearer = |token: &str| format!("Authorization: Bearer {token}\r\n");
    let json = "Content-Type: application/json\r\n";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "percent-encoded invalid UTF-8 in a path segment",
            request("GET", "/api/user/%FF%FE", &bearer(&admin), ""),
            400,
            "utf-8",
        ),
        ("unknown path", request("GET", "/api/%FF", "", ""), 404, "not found"),
        (
            "method not allowed",
            request("DELETE", "/api/health", "", ""),
            405,
            "Method Not Allowed",
        ),
        (
            "announced body too large",
            b"POST /api/auth/login HTTP/1.1\r\nHost: root\r\nConnection: close\r\nContent-Type: application/json\r\n\
              Content-Length: 2000000\r\n\r\n"
                .to_vec(),
            413,
            "larger than the limit",
        ),
        ("chunked body too large", big.into_bytes(), 413, "length limit"),
        (
            "bad query string",
            request("GET", "/api/net/subnet?worker_id=a&worker_id=b", &bearer(&cluster.token), ""),
            400,
            "query string",
        ),
        (
            "wrong content type",
            request(
                "POST",
                "/api/auth/login",
                "Content-Type: text/plain\r\n",
                r#"{"username":"Admin","password":"Admin"}"#,
            ),
            415,
            "Content-Type",
        ),
        (
            "JSON syntax error",
            request("POST", "/api/auth/login", json, r#"{"username": "#),
            400,
            "EOF",
        ),
        (
            "JSON of the wrong shape",
            request("POST", "/api/auth/login", json, r#"{"username": 1, "password": "x"}"#),
            422,
            "username",
        ),
    ];
    for (what, raw, status, needle) in cases {
        let (got, head, body) = exchange(&server, &raw).await;
        assert_eq!(got, status, "{what}: {head}\n{body}");
        let message = json_message(what, &head, &body);
        assert!(
            message.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: {message:?} does not mention {needle:?}"
        );
        if status == 405 {
            assert!(support::header(&head, "allow").is_some(), "{what}: {head}");
        }
    }
    // A request line hyper cannot parse (a raw non-ASCII byte) is refused before any handler: 400, no body.
    let (got, head, body) = exchange(&server, b"GET /api/\xff HTTP/1.1\r\nHost: root\r\n\r\n").await;
    assert_eq!(got, 400, "{head}");
    assert!(body.is_empty(), "{body}");
    server.stop().await;
}

// === File modes ===

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The data directory is 0700 and the database (with its WAL files), the signing key and the generated join token
/// are 0600: when created, and again after a restart that found them readable by everyone.
#[cfg(unix)]
#[tokio::test]
async fn data_directory_and_secrets_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let base = TempDir::new();
    let dir = base.0.join("root");
    let files = ["root.db", "jwt.key", "join.token"];
    let check = |when: &str| {
        assert_eq!(mode(&dir), 0o700, "{when}: data directory");
        for name in files.iter().chain(&["root.db-wal", "root.db-shm"]) {
            let path = dir.join(name);
            if path.exists() || files.contains(name) {
                assert_eq!(mode(&path), 0o600, "{when}: {name}");
            }
        }
    };
    // Without --join-token, so that the token file is generated.
    let server = Server::start(support::plain_config(&dir)).await;
    assert!(dir.join("root.db-wal").exists(), "the database runs in WAL mode");
    check("fresh");
    // Loosen everything while the server runs (the WAL files exist only while the database is open), then
    // restart on the same directory.
    for name in files.iter().chain(&["root.db-wal", "root.db-shm"]) {
        let path = dir.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    server.stop().await;
    let server = Server::start(support::plain_config(&dir)).await;
    check("after a restart");
    let (status, body) = server.login("Admin", "Admin").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

// === Token revocation ===

/// A demoted user's refresh token no longer gives access tokens (with the old roles or any), nor does its access
/// token open anything; a fresh login carries the new roles.
#[tokio::test]
async fn a_demotion_revokes_refresh_and_access_tokens() {
    let server = Server::fresh().await;
    let (admin, _) = server.tokens("Admin", "Admin").await;
    server.register(&admin, "carol", &["Admin"]).await;
    let (access, refresh) = server.tokens("carol", "carol-pw").await;
    let (status, _) = server.refresh(&refresh).await;
    assert_eq!(status, 200, "before the demotion");
    let (status, res) = server
        .json(
            "PUT",
            "/api/user/carol",
            Some(&admin),
            Some(json!({ "roles": ["Application_Provider"] })),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_revoked("refresh after the demotion", server.refresh(&refresh).await);
    assert_revoked(
        "access token after the demotion",
        server.json("GET", "/api/users/", Some(&access), None).await,
    );
    let (access, refresh) = server.tokens("carol", "carol-pw").await;
    let (status, body) = server.refresh(&refresh).await;
    assert_eq!(status, 200, "{body}");
    let (_, me) = server
        .json(
            "GET",
            "/api/auth/whoami",
            Some(body["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(me["roles"], json!(["Application_Provider"]));
    let (status, _) = server.json("GET", "/api/users/", Some(&access), None).await;
    assert_eq!(status, 403, "the new token has the new roles");
    server.stop().await;
}

/// Changing one's own password revokes the tokens issued before; an e-mail change does not.
#[tokio::test]
async fn a_password_change_revokes_but_an_email_change_does_not() {
    let server = Server::fresh().await;
    let (admin, _) = server.tokens("Admin", "Admin").await;
    server.register(&admin, "bob", &["Application_Provider"]).await;
    let (access, refresh) = server.tokens("bob", "bob-pw").await;
    let (status, res) = server
        .json(
            "PUT",
            "/api/user/bob",
            Some(&admin),
            Some(json!({ "email": "bob@example.org" })),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(
        server.refresh(&refresh).await.0,
        200,
        "an e-mail change keeps the tokens"
    );
    let (status, res) = server
        .json(
            "POST",
            "/api/user/bob",
            Some(&access),
            Some(json!({ "oldPassword": "bob-pw", "newPassword": "bob-pw-2" })),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_revoked(
        "refresh after the password change",
        server.refresh(&refresh).await,
    );
    assert_revoked(
        "access after the password change",
        server.json("GET", "/api/auth/whoami", Some(&access), None).await,
    );
    let (_, refresh) = server.tokens("bob", "bob-pw-2").await;
    assert_eq!(server.refresh(&refresh).await.0, 200);
    server.stop().await;
}

/// An Admin setting a user's password (the reset this server offers) revokes the user's tokens.
#[tokio::test]
async fn a_password_reset_by_an_admin_revokes() {
    let server = Server::fresh().await;
    let (admin, _) = server.tokens("Admin", "Admin").await;
    server.register(&admin, "bob", &["Application_Provider"]).await;
    let (_, refresh) = server.tokens("bob", "bob-pw").await;
    let (status, res) = server
        .json(
            "PUT",
            "/api/user/bob",
            Some(&admin),
            Some(json!({ "password": "reset-pw" })),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_revoked("refresh after the reset", server.refresh(&refresh).await);
    server.stop().await;
}

/// A user deleted and registered again under the same name (and password) is a new user: the old tokens do not
/// match it.
#[tokio::test]
async fn a_recreated_user_does_not_inherit_old_tokens() {
    let server = Server::fresh().await;
    let (admin, _) = server.tokens("Admin", "Admin").await;
    server.register(&admin, "bob", &["Admin"]).await;
    let (access, refresh) = server.tokens("bob", "bob-pw").await;
    let (status, res) = server.json("DELETE", "/api/user/bob", Some(&admin), None).await;
    assert_eq!(status, 200, "{res}");
    let (status, res) = server.refresh(&refresh).await;
    assert_eq!(
        status, 404,
        "a deleted user's refresh is 404, as in the reference: {res}"
    );
    server.register(&admin, "bob", &["Application_Provider"]).await;
    assert_revoked("refresh of the old bob", server.refresh(&refresh).await);
    assert_revoked(
        "access of the old bob",
        server.json("GET", "/api/users/", Some(&access), None).await,
    );
    let (_, refresh) = server.tokens("bob", "bob-pw").await;
    assert_eq!(server.refresh(&refresh).await.0, 200);
    server.stop().await;
}

/// Replacing an organization's members revokes the tokens of the members whose roles there changed, and only
/// theirs; deleting the organization revokes its members' tokens.
#[tokio::test]
async fn organization_membership_changes_revoke() {
    let server = Server::fresh().await;
    let (admin, admin_refresh) = server.tokens("Admin", "Admin").await;
    server.register(&admin, "bob", &["Application_Provider"]).await;
    server.register(&admin, "carol", &["Application_Provider"]).await;
    let (_, users) = server.json("GET", "/api/users/", Some(&admin), None).await;
    let id_of = |name: &str| {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap()["_id"]
            .clone()
    };
    let (bob, carol) = (id_of("bob"), id_of("carol"));
    let (status, org) = server
        .json(
            "POST",
            "/api/organization/",
            Some(&admin),
            Some(json!({ "name": "edge", "member": [
                { "user_id": bob, "roles": ["Admin"] },
                { "user_id": carol, "roles": ["Application_Provider"] },
            ]})),
        )
        .await;
    assert_eq!(status, 200, "{org}");
    let org_id: String = serde_json::from_str(org.as_str().unwrap()).unwrap();
    let login = |user: &'static str| json!({ "username": user, "password": format!("{user}-pw"), "organization_name": "edge" });
    let (_, bob_tokens) = server
        .json("POST", "/api/auth/login", None, Some(login("bob")))
        .await;
    let (_, carol_tokens) = server
        .json("POST", "/api/auth/login", None, Some(login("carol")))
        .await;
    let bob_refresh = bob_tokens["refresh_token"].as_str().unwrap().to_owned();
    let carol_refresh = carol_tokens["refresh_token"].as_str().unwrap().to_owned();
    // Bob is demoted there, carol keeps her roles.
    let (status, res) = server
        .json(
            "PUT",
            &format!("/api/organization/{org_id}"),
            Some(&admin),
            Some(json!({ "member": [
                { "user_id": bob, "roles": ["Application_Provider"] },
                { "user_id": carol, "roles": ["Application_Provider"] },
            ]})),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_revoked("bob after his demotion", server.refresh(&bob_refresh).await);
    assert_eq!(
        server.refresh(&carol_refresh).await.0,
        200,
        "carol's roles did not change"
    );
    assert_eq!(server.refresh(&admin_refresh).await.0, 200, "Admin is no member");
    let (status, res) = server
        .json(
            "DELETE",
            &format!("/api/organization/{org_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_revoked(
        "carol after the organization's deletion",
        server.refresh(&carol_refresh).await,
    );
    server.stop().await;
}

/// Restarting with the same --admin-password keeps Admin's tokens; a different one revokes them.
#[tokio::test]
async fn admin_password_flag_revokes_only_when_it_changes_the_password() {
    let dir = TempDir::new();
    let start = |password: &str| {
        let mut config = support::plain_config(&dir.0);
        config.admin_password = Some(password.to_owned());
        Server::start(config)
    };
    let server = start("first-pw").await;
    let (_, refresh) = server.tokens("Admin", "first-pw").await;
    server.stop().await;
    let server = start("first-pw").await;
    assert_eq!(
        server.refresh(&refresh).await.0,
        200,
        "the same password keeps the tokens"
    );
    server.stop().await;
    let server = start("second-pw").await;
    assert_revoked(
        "refresh after a new --admin-password",
        server.refresh(&refresh).await,
    );
    server.stop().await;
}

/// A token signed with the right key but without a generation (issued before revocation existed) is refused.
#[tokio::test]
async fn tokens_without_a_generation_are_refused() {
    use oakestra_root_service::auth::{Keys, TokenType};
    let dir = TempDir::new();
    let server = Server::on(&dir.0).await;
    let keys = Keys::load_or_create(&dir.0).unwrap();
    let (access, refresh) = server.tokens("Admin", "Admin").await;
    for (token, kind) in [(access, TokenType::Access), (refresh, TokenType::Refresh)] {
        let mut claims = keys.verify(&token, kind).unwrap();
        claims.generation = None;
        let old = keys.sign(&claims).unwrap();
        let answer = match kind {
            TokenType::Access => server.json("GET", "/api/auth/whoami", Some(&old), None).await,
            TokenType::Refresh => server.refresh(&old).await,
        };
        assert_revoked(&format!("{kind:?} token without gen"), answer);
    }
    server.stop().await;
}

// === Password hashing on a bounded pool ===

/// One HTTP/1.1 request from the local address `source` (any 127.0.0.0/8 address works on Linux loopback): the
/// status, the lower-cased head and the body.
async fn request_from(
    server: &Server,
    source: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: root\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        head,
        body.to_owned(),
    )
}

/// A login from `source`: the status, the head and the body.
async fn login_from(server: &Server, source: &str, user: &str, password: &str) -> (u16, String, String) {
    let body = json!({ "username": user, "password": password }).to_string();
    request_from(server, source, "POST", "/api/auth/login", &body).await
}

/// A server whose password hashing runs on `hashing`, with failed-login limits too high to interfere.
async fn server_hashing(hashing: PoolSize) -> (Server, TempDir) {
    let dir = TempDir::new();
    let mut config = support::config(&dir.0, false);
    config.hashing = hashing;
    config.login = LoginLimits {
        per_address: 100_000,
        per_user_address: 100_000,
        per_user: 100_000,
    };
    (Server::start(config).await, dir)
}

/// Fails the test unless the answer is a JSON refusal with a `Retry-After`, naming `limit`.
fn assert_refused(what: &str, (status, head, body): &(u16, String, String), expected: u16, limit: &str) {
    assert_eq!(*status, expected, "{what}: {head}\n{body}");
    let retry: u64 = support::header(head, "retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After: {head}"))
        .parse()
        .unwrap();
    assert!(retry >= 1, "{what}: {head}");
    let message = json_message(what, head, body);
    assert!(
        message.contains(limit),
        "{what}: {message:?} does not name {limit:?}"
    );
}

/// Forty concurrent wrong passwords from one address hold at most its share of the pool (the rest are 429 at
/// once), and a correct login from another address meanwhile is answered without waiting for the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_holds_only_its_share_of_the_hashing_pool() {
    let (server, _dir) = server_hashing(PoolSize {
        threads: 1,
        queue: 4,
        per_address: 2,
    })
    .await;
    let server = Arc::new(server);
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move { login_from(&server, "127.0.0.1", "Admin", "wrong").await })
        })
        .collect();
    let started = Instant::now();
    let (status, _, body) = login_from(&server, "127.0.0.2", "Admin", "Admin").await;
    let legit = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let mut refused = 0;
    for answer in flood {
        let answer = answer.await.unwrap();
        match answer.0 {
            401 => {}
            429 => {
                assert_refused("flood", &answer, 429, "password checks in progress");
                refused += 1;
            }
            other => panic!("flood: {other}: {}", answer.2),
        }
    }
    assert!(refused >= 30, "only {refused} of 40 were refused");
    // One hash is ~30 ms; the flood holds two slots, so the legitimate login waits for two hashes at most.
    assert!(
        legit < Duration::from_secs(1),
        "the legitimate login took {legit:?}"
    );
    Arc::into_inner(server).unwrap().stop().await;
}

/// Sixteen attacking addresses keep the hashing queue full; a login from an address whose checks do not fail still
/// gets a place (pushing out the newest job of an address whose checks do) instead of a 503, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_flood_does_not_keep_other_addresses_out_of_the_queue() {
    let (server, _dir) = server_hashing(PoolSize {
        threads: 1,
        queue: 4,
        per_address: 2,
    })
    .await;
    let server = Arc::new(server);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for a in 1..=16 {
        for _ in 0..3 {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            flood.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(
                        login_from(&server, &format!("127.0.1.{a}"), "Admin", "wrong")
                            .await
                            .0,
                    );
                }
                statuses
            }));
        }
    }
    // Long enough for every attacking address to have failed a few times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        let (status, _, body) = login_from(&server, "127.0.0.2", "Admin", "Admin").await;
        assert_eq!(status, 200, "{body}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for task in flood {
        seen.extend(task.await.unwrap());
    }
    assert!(seen.contains(&503), "the flood did fill the queue: {seen:?}");
    assert!(seen.iter().all(|s| [401, 429, 503].contains(s)), "{seen:?}");
    Arc::into_inner(server).unwrap().stop().await;
}

/// When every thread is busy and the queue is full, a password check is refused with 503 and Retry-After instead
/// of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hashing_queue_answers_503() {
    let (server, _dir) = server_hashing(PoolSize {
        threads: 1,
        queue: 1,
        per_address: 100,
    })
    .await;
    let server = Arc::new(server);
    let logins: Vec<_> = (0..12)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move { login_from(&server, "127.0.0.1", "Admin", "wrong").await })
        })
        .collect();
    let mut saturated = 0;
    for answer in logins {
        let answer = answer.await.unwrap();
        if answer.0 == 503 {
            assert_refused("saturated", &answer, 503, "saturated");
            saturated += 1;
        } else {
            assert_eq!(answer.0, 401, "{}", answer.2);
        }
    }
    assert!(
        saturated >= 1,
        "twelve checks fit into one thread and a queue of one"
    );
    Arc::into_inner(server).unwrap().stop().await;
}

// === Failed-login limits ===

/// A server with failed-login `limits`.
async fn server_limiting(limits: LoginLimits) -> (Server, TempDir) {
    let dir = TempDir::new();
    let mut config = support::config(&dir.0, false);
    config.login = limits;
    (Server::start(config).await, dir)
}

/// Wrong passwords for Admin from 127.0.0.1 run into the per-user-and-address limit, a spray over many user names
/// from there into the per-address limit (429, Retry-After, a message naming the limit), while Admin logs in from
/// 127.0.0.2 as usual; successful logins are never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failed_logins_is_limited_per_address_and_spares_others() {
    let (server, _dir) = server_limiting(LoginLimits::default()).await;
    let server = Arc::new(server);
    for n in 0..5 {
        let (status, _, body) = login_from(&server, "127.0.0.1", "Admin", &format!("guess-{n}")).await;
        assert_eq!(status, 401, "{body}");
    }
    let refused = login_from(&server, "127.0.0.1", "Admin", "guess-5").await;
    assert_refused(
        "the sixth guess",
        &refused,
        429,
        "failed logins for user \"Admin\" from this address (limit: 5 per minute)",
    );
    let spray = {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for round in 0..5 {
                let batch: Vec<_> = (0..16)
                    .map(|n| {
                        let server = Arc::clone(&server);
                        tokio::spawn(async move {
                            login_from(&server, "127.0.0.1", &format!("user-{round}-{n}"), "guess").await
                        })
                    })
                    .collect();
                for task in batch {
                    answers.push(task.await.unwrap());
                }
            }
            answers
        })
    };
    // Meanwhile, the real Admin from another address.
    for _ in 0..5 {
        let (status, _, body) = login_from(&server, "127.0.0.2", "Admin", "Admin").await;
        assert_eq!(status, 200, "{body}");
    }
    let answers = spray.await.unwrap();
    let wrong = answers.iter().filter(|a| a.0 == 401).count();
    let limited = answers.iter().filter(|a| a.0 == 429).count();
    assert_eq!(wrong + limited, answers.len(), "only 401 and 429");
    assert!(
        wrong <= 15 + 4,
        "{wrong} more wrong passwords were checked (limit 20 a minute)"
    );
    let after = login_from(&server, "127.0.0.1", "someone", "x").await;
    assert_refused(
        "after the spray",
        &after,
        429,
        "failed logins from this address (limit: 20 per minute)",
    );
    let (status, _, body) = login_from(&server, "127.0.0.2", "Admin", "Admin").await;
    assert_eq!(status, 200, "{body}");
    // Successes do not count: 30 more from 127.0.0.2 all pass.
    for _ in 0..30 {
        assert_eq!(login_from(&server, "127.0.0.2", "Admin", "Admin").await.0, 200);
    }
    Arc::into_inner(server).unwrap().stop().await;
}

/// Once a user name's failures from all addresses pass its limit, the addresses that failed for it are refused,
/// but an address without failures still logs in (and may even mistype once).
#[tokio::test]
async fn the_per_user_limit_does_not_lock_the_user_out() {
    let (server, _dir) = server_limiting(LoginLimits {
        per_address: 1000,
        per_user_address: 1000,
        per_user: 10,
    })
    .await;
    for n in 0..10 {
        let (status, _, body) = login_from(&server, "127.0.0.1", "Admin", &format!("guess-{n}")).await;
        assert_eq!(status, 401, "{body}");
    }
    let refused = login_from(&server, "127.0.0.1", "Admin", "Admin").await;
    assert_refused(
        "the attacking address",
        &refused,
        429,
        "limit: 10 per minute from all addresses",
    );
    let (status, _, body) = login_from(&server, "127.0.0.2", "Admin", "Admin").await;
    assert_eq!(status, 200, "the user's own address: {body}");
    assert_eq!(login_from(&server, "127.0.0.3", "Admin", "typo").await.0, 401);
    let refused = login_from(&server, "127.0.0.3", "Admin", "Admin").await;
    assert_refused("right after a typo", &refused, 429, "from all addresses");
    // Other user names are not affected.
    let (status, _, _) = login_from(&server, "127.0.0.1", "nobody", "x").await;
    assert_eq!(status, 401);
    server.stop().await;
}

// === Types of the cluster-facing bodies ===

/// Fails the test unless the answer is the 422 of a wrong type at `field`.
fn assert_wrong_type(what: &str, (status, body): &(u16, Value), field: &str, expected: &str) {
    assert_eq!(*status, 422, "{what}: {body}");
    assert_eq!(body["field"], json!(field), "{what}: {body}");
    assert!(
        body["expected"].as_str().unwrap().contains(expected),
        "{what}: {body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(field) && message.contains(expected),
        "{what}: {message}"
    );
}

/// Every cluster-facing body refuses a wrong JSON type with 422 naming the field, the value and the expected type,
/// and still accepts the shapes reference peers send (numbers as strings where they do).
#[tokio::test]
async fn cluster_bodies_refuse_wrong_types() {
    let (server, _dir) = server_with(ServerLimits::default()).await;
    let join = Some(support::JOIN_TOKEN);
    let register = |body: Value| server.json("POST", "/api/cluster/register", join, Some(body));
    let answer = register(json!({"cluster_name": 1})).await;
    assert_wrong_type("numeric cluster name", &answer, "cluster_name", "a string");
    assert_eq!(answer.1["value"], json!(1));
    assert!(
        answer.1["message"].as_str().unwrap().contains("cluster_name = 1"),
        "{}",
        answer.1
    );
    let answer = register(json!({"cluster_name": "c1", "manager_port": "10100"})).await;
    assert_wrong_type("port as a string", &answer, "manager_port", "an integer");
    let answer = register(json!({"cluster_name": "c1", "cluster_address": ["127.0.0.1"]})).await;
    assert_wrong_type("address as a list", &answer, "cluster_address", "a string");
    let (_, clusters) = server.json("GET", "/api/clusters/", None, None).await;
    assert_eq!(clusters, json!([]), "nothing was registered");
    // Without the join token the body's types are not looked at.
    let (status, _) = server
        .json(
            "POST",
            "/api/cluster/register",
            None,
            Some(json!({"cluster_name": 1})),
        )
        .await;
    assert_eq!(status, 401);

    let cluster = support::FakeCluster::start(&server, "c1").await;
    let token = Some(cluster.token.as_str());
    let information = format!("/api/information/{}", cluster.id);
    let report = |body: Value| server.json("POST", &information, token, Some(body));
    // The reference's shapes: percentages and ports as strings, integral floats, nulls.
    let (status, body) = report(json!({
        "cpu_percent": "12.5", "memory_percent": 20, "vcpus": 4, "memory": 2048.0, "active_nodes": 1,
        "virtualization": ["docker"], "csi_drivers": [], "gpu_driver": null,
        "aggregation_per_architecture": {"amd64": {"vcpus": "4", "memory": 2048}},
        "jobs": [{"_id": "0123456789abcdef01234567", "job_name": "a.b.c.d", "status": "RUNNING",
                  "instance_list": [{"instance_number": "0", "status": "RUNNING", "host_port": "50103",
                                     "cpu_percent": 1.5, "logs": "hello"}]}],
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_wrong_type(
        "vcpus",
        &report(json!({"vcpus": "lots"})).await,
        "vcpus",
        "a number",
    );
    assert_wrong_type(
        "job id",
        &report(json!({"jobs": [{"_id": 5}]})).await,
        "jobs[0]._id",
        "a string",
    );
    assert_wrong_type(
        "instance number",
        &report(json!({"jobs": [{"_id": "j", "instance_list": [{"instance_number": [0]}]}]})).await,
        "jobs[0].instance_list[0].instance_number",
        "an integer",
    );
    assert_wrong_type(
        "jobs",
        &report(json!({"jobs": {"_id": "j"}})).await,
        "jobs",
        "a list",
    );

    let result = |body: Value| server.json("POST", "/api/result/deploy", token, Some(body));
    assert_wrong_type(
        "job_id",
        &result(json!({"job_id": 7})).await,
        "job_id",
        "a string",
    );
    assert_wrong_type(
        "status",
        &result(json!({"job_id": "j/0", "status": {"code": 1}})).await,
        "status",
        "a string",
    );
    let (status, body) = result(json!({"job_id": "0123456789abcdef01234567", "instance_number": "0"})).await;
    assert_eq!(status, 404, "well typed, about an unknown instance: {body}");

    let net = |body: Value| server.json("POST", "/api/net/service/net_deploy_status", token, Some(body));
    assert_wrong_type(
        "host_ip",
        &net(json!({"job_id": "j", "instances": [{"instance_number": 0, "host_ip": 5}]})).await,
        "instances[0].host_ip",
        "a string",
    );
    assert_wrong_type(
        "job_id",
        &net(json!({"job_id": null})).await,
        "job_id",
        "a string",
    );
    let (status, body) =
        net(json!({"job_id": "j", "instances": [{"instance_number": "0", "host_port": "50103"}]})).await;
    assert_ne!(status, 422, "the reference's string port is accepted: {body}");
    server.stop().await;
}
