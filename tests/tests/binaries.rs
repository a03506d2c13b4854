//! Every binary of the workspace runs, explains itself with `--help`, reports its version, and refuses unusable
//! settings with a clear error; `root-service` serves its API.

#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use oakestra_tests::procs;

/// Binary name and a phrase its `--help` must contain.
const BINARIES: &[(&str, &str)] = &[
    ("NodeEngine", "worker agent"),
    ("NetManager", "semantic overlay"),
    ("cluster-service", "cluster orchestrator"),
    ("root-service", "root orchestrator"),
];

#[test]
fn help_explains_each_binary() {
    for (name, phrase) in BINARIES {
        let out = procs::run(name, &["--help"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help failed: {out:?}");
        assert!(
            stdout.contains("Usage:"),
            "{name} --help has no usage line:\n{stdout}"
        );
        assert!(
            stdout.contains(phrase),
            "{name} --help does not say what it is ({phrase:?}):\n{stdout}"
        );
    }
}

#[test]
fn version_is_the_workspace_version() {
    for (name, _) in BINARIES {
        let out = procs::run(name, &["--version"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --version failed: {out:?}");
        assert!(
            stdout.contains(env!("CARGO_PKG_VERSION")),
            "{name} --version printed {stdout:?}"
        );
    }
}

#[test]
fn netmanager_refuses_bad_settings_and_status_finds_no_daemon() {
    let out = procs::run(
        "NetManager",
        &[
            "--config",
            "/nonexistent/netcfg.json",
            "--mtu",
            "100",
            "--log-file",
            "none",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "NetManager should exit 64: {out:?}");
    assert!(
        stderr.contains("--mtu") && stderr.contains("100"),
        "stderr: {stderr}"
    );
    let out = procs::run(
        "NetManager",
        &[
            "status",
            "--config",
            "/nonexistent/netcfg.json",
            "--socket",
            "/nonexistent/nm.sock",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "status without a daemon exits 3: {out:?}"
    );
    assert!(stderr.contains("not running"), "stderr: {stderr}");
}

#[test]
fn node_engine_refuses_to_run_without_a_cluster() {
    let out = procs::run(
        "NodeEngine",
        &["--conf", "/nonexistent/conf.json", "--log-file", "none"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "NodeEngine should exit 64: {out:?}");
    assert!(
        stderr.contains("clusterAddr") && stderr.contains("-a"),
        "stderr: {stderr}"
    );
    let out = procs::run("NodeEngine", &["-a", "h", "-n", "70000", "--log-file", "none"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(stderr.contains("70000"), "stderr: {stderr}");
}

#[test]
fn root_service_refuses_a_bad_listen_address() {
    let out = procs::run(
        "root-service",
        &["--listen", "nonsense", "--data-dir", "/nonexistent/never-created"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "root-service should exit 64: {out:?}"
    );
    assert!(
        stderr.contains("--listen") && stderr.contains("nonsense"),
        "stderr: {stderr}"
    );
}

#[test]
fn cluster_service_names_the_bad_flag() {
    let out = procs::run(
        "cluster-service",
        &[
            "--cluster-name",
            "c1",
            "--join-token",
            "0123456789abcdef",
            "--worker-timeout",
            "0",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "cluster-service should exit 64: {out:?}"
    );
    assert!(
        stderr.contains("--worker-timeout") && stderr.contains("\"0\""),
        "stderr: {stderr}"
    );
    let out = procs::run("cluster-service", &["--cluster-name", "c1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(stderr.contains("--join-token"), "stderr: {stderr}");
}

#[test]
fn root_service_answers_health() {
    let data_dir = std::env::temp_dir().join(format!("oakestra-binaries-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    // Ask the OS for a free port, release it, hand it to the binary.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(procs::binary("root-service"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("root-service exited early: {status}");
        }
        if let Some(answer) = get(&listen, "/api/health") {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "root-service did not answer on {listen} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""status":"ok""#), "{answer}");
    assert!(answer.contains(env!("CARGO_PKG_VERSION")), "{answer}");
}

/// A plain HTTP/1.1 GET; `None` while nothing listens.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}
