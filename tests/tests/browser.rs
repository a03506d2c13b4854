//! A real browser against root-service: headless Chromium, driven through chromedriver (W3C WebDriver over HTTP),
//! loads `tests/browser/dashboard-calls.html` from another origin than the API's and runs the calls the Oakestra
//! dashboard makes (login, read the user, create an application with the dashboard's SLA, list applications, add
//! a service, deploy, list instances, the users page with their roles, create and rename an organization). Everything runs in a network namespace of the test's own, which has only
//! `lo`: the browser cannot reach anything else.
//!
//! root-service allows exactly the page's origin (`--cors-origins http://localhost:<page port>`): from there the
//! page sees its data; the same page served from `http://127.0.0.1:<page port>` (another origin) is refused by the
//! browser.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use oakestra_runtime::client;
use oakestra_tests::{
    harness::Proc,
    netns::{HostSnapshot, Netns, require_root},
    procs::workspace_root,
};
use serde_json::{Value, json};

const ROOT_PORT: u16 = 10000;
const PAGE_PORT: u16 = 8080;
const DRIVER_PORT: u16 = 9515;
const PASSWORD: &str = "browser-test-password-1";

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The browser packages, installed when missing (scripts/test.sh installs them too).
fn ensure_chromium() {
    use oakestra_tests::apt::{ensure, on_path};
    ensure(
        &["chromium", "chromium-driver"],
        || on_path("chromium") && on_path("chromedriver"),
        &[],
    );
}

/// A WebDriver session on chromedriver at 127.0.0.1:[`DRIVER_PORT`] (call from inside the netns).
struct Browser {
    session: String,
}

async fn webdriver(method: &str, path: &str, body: Option<&Value>) -> Value {
    let url = format!("http://127.0.0.1:{DRIVER_PORT}{path}");
    let r = client::call(method.parse().unwrap(), &url, None, body, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
    r.body["value"].clone()
}

impl Browser {
    async fn start(profile: &std::path::Path) -> Self {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let value = webdriver("POST", "/session", Some(&caps)).await;
        Self {
            session: value["sessionId"].as_str().unwrap().to_owned(),
        }
    }

    /// Opens `url` and waits (60 s at most) until the page's title leaves "running"; returns (title, #result text).
    async fn run_page(&self, url: &str) -> (String, String) {
        let s = &self.session;
        webdriver("POST", &format!("/session/{s}/url"), Some(&json!({"url": url}))).await;
        let script = json!({
            "script": "return [document.title, document.getElementById('result').textContent];",
            "args": [],
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = webdriver("POST", &format!("/session/{s}/execute/sync"), Some(&script)).await;
            let title = v[0].as_str().unwrap_or_default().to_owned();
            if title != "running" {
                return (title, v[1].as_str().unwrap_or_default().to_owned());
            }
            assert!(Instant::now() < deadline, "the page did not finish: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn quit(self) {
        webdriver("DELETE", &format!("/session/{}", self.session), None).await;
    }
}

/// Waits until something listens on 127.0.0.1:`port` (call from inside the netns).
async fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} does not listen on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_dashboards_calls_work_from_a_browser_on_another_origin() {
    require_root();
    ensure_chromium();
    let before = HostSnapshot::take();
    let dir = tempfile_dir();
    let ns = Netns::new("oak-browser");

    let allowed = format!("http://localhost:{PAGE_PORT}");
    let root = Proc::start_in(
        ns.name(),
        "root-service",
        &[
            "--listen".into(),
            format!("127.0.0.1:{ROOT_PORT}"),
            "--data-dir".into(),
            dir.join("root").display().to_string(),
            "--admin-password".into(),
            PASSWORD.into(),
            "--cors-origins".into(),
            allowed.clone(),
        ],
        dir.join("root.log"),
    );
    let pages = workspace_root().join("tests/browser");
    let _page_server = Killed(
        ns.command("python3")
            .args([
                "-m",
                "http.server",
                &PAGE_PORT.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&pages)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _driver = Killed(
        ns.command("chromedriver")
            .arg(format!("--port={DRIVER_PORT}"))
            .stdout(std::fs::File::create(dir.join("chromedriver.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let profile = dir.join("profile");
    let query = format!("?api=http://127.0.0.1:{ROOT_PORT}/api&user=Admin&pw={PASSWORD}");
    // The WebDriver client runs on a thread of its own inside the netns (setns is per thread).
    let (ok, refused) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    wait_port(ROOT_PORT, "root-service").await;
                    wait_port(PAGE_PORT, "the page server").await;
                    wait_port(DRIVER_PORT, "chromedriver").await;
                    let browser = Browser::start(&profile).await;
                    let ok = browser
                        .run_page(&format!("{allowed}/dashboard-calls.html{query}"))
                        .await;
                    let refused = browser
                        .run_page(&format!(
                            "http://127.0.0.1:{PAGE_PORT}/dashboard-calls.html{query}"
                        ))
                        .await;
                    browser.quit().await;
                    (ok, refused)
                })
            })
            .join()
            .unwrap_or_else(|_| panic!("the browser thread failed; root log:\n{}", root.log()))
    });

    // From the allowed origin the page sees everything it asked for.
    let (title, text) = ok;
    assert_eq!(
        title,
        "done",
        "the page failed: {text}\nroot log:\n{}",
        root.log()
    );
    let seen: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(seen["user"], "Admin", "{seen}");
    assert_eq!(seen["user_id"].as_str().unwrap().len(), 24, "{seen}");
    let apps = seen["applications"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "{seen}");
    assert_eq!(apps[0]["name"], "browserapp");
    let services = seen["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{seen}");
    assert_eq!(services[0]["name"], "web");
    assert_eq!(services[0]["application"], apps[0]["id"]);
    let instances = seen["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{seen}");
    assert_eq!(instances[0]["instance_number"], 0);
    // No cluster has joined: the instance waits with the reference's status for that, and says why.
    assert!(
        instances[0]["status"].as_str().is_some_and(|s| !s.is_empty()),
        "{seen}"
    );
    assert!(
        instances[0]["status_detail"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{seen}"
    );
    assert_eq!(instances[0]["cpu_points"], 0);
    assert_eq!(seen["clusters"], 0);
    // The users page and the organization editor get what they read.
    let roles = seen["my_roles"].as_array().unwrap();
    assert!(roles.contains(&json!("Admin")), "{seen}");
    assert_eq!(seen["organization_created"], true, "{seen}");
    assert_eq!(seen["organization_renamed"], "browserorg2", "{seen}");

    // The same page from an origin root does not allow: the browser refuses to hand it the answers.
    let (title, text) = refused;
    assert_eq!(title, "error", "a page from another origin got data: {text}");
    assert!(text.contains("Failed to fetch"), "{text}");

    drop(root);
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    before.assert_unchanged(&HostSnapshot::take());
}

/// A fresh directory under the system's temp dir.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oak-browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
