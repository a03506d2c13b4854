//! The whole control plane with a real worker: `root-service`, `cluster-service` and `NodeEngine` binaries, a
//! private containerd + runc, the busybox test image imported and pushed to a local registry. A user's services go
//! root → cluster → NodeEngine → containerd; statuses and logs come back to root; the NodeEngine restarts and adopts
//! its running instance; an undeploy removes the container.

#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use oakestra_tests::containerd::{Containerd, LocalRegistry};
use oakestra_tests::harness::{Proc, eventually};
use oakestra_tests::procs;
use oakestra_tests::stack::{IMAGE, Stack, call};
use serde_json::{Value, json};

fn ctr_lines(ctrd: &Containerd, args: &[&str]) -> String {
    String::from_utf8_lossy(&ctrd.ctr("oakestra", args).stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_report_survive_a_restart_and_are_removed() {
    let dir = std::env::temp_dir().join(format!("oakestra-worker-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctrd = Containerd::start("worker-e2e");
    let layout = ctrd.import_test_image("oakestra", IMAGE);
    let registry = LocalRegistry::start("worker-e2e");
    let pulled = registry.push(&layout, "e2e/bb");
    let mut stack = Stack::start(&dir).await;
    let mut ne = stack.node_engine(&ctrd, "ne-1.log");

    // A long-running service: RUNNING at root with its log lines, a real 100 MiB cgroup limit.
    let web = stack
        .deploy(
            "web",
            &json!({"vcpus": 1, "cmd": ["sh", "-c", "echo hello-from-$HOSTNAME; while true; do sleep 1; done"]}),
        )
        .await;
    let all = [&stack.root, &stack.cluster, &ne];
    let running = eventually(60, "web RUNNING at root with its log", &all, || async {
        stack.instance(&web).await.filter(|i| {
            i["status"] == json!("RUNNING")
                && i["logs"].as_str().unwrap_or("").contains("hello-from-instance-0")
        })
    })
    .await;
    assert_eq!(running["status"], json!("RUNNING"));
    let task = "web.test.svc.test.instance.0";
    assert!(
        ctr_lines(&ctrd, &["tasks", "ls"]).contains(task),
        "{}",
        ctr_lines(&ctrd, &["tasks", "ls"])
    );
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/oakestra/{task}/memory.limit_in_bytes"
    ))
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/oakestra/{task}/memory.max")))
    .unwrap();
    assert_eq!(limit.trim(), (100 * 1024 * 1024).to_string());
    // vcpus 1 = a CFS quota of one period per period.
    let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/oakestra/{task}/cpu.cfs_quota_us"))
        .map(|q| q.trim().to_owned())
        .or_else(|_| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/oakestra/{task}/cpu.max"))
                .map(|m| m.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap();
    assert_eq!(quota, "100000");
    let app_log = std::fs::read_to_string(dir.join("apps").join(task)).unwrap();
    assert!(app_log.contains("hello-from-instance-0"), "{app_log}");

    // A one-shot service that exits 0 is COMPLETED.
    let once = stack
        .deploy(
            "once",
            &json!({"cmd": ["sh", "-c", "echo done"], "one_shot": true}),
        )
        .await;
    stack.wait_status(&once, "COMPLETED", &all).await;

    // A crash and an OOM kill are reported DEAD with the reason.
    let _crash = stack
        .deploy("crash", &json!({"cmd": ["sh", "-c", "exit 3"]}))
        .await;
    let _hog = stack
        .deploy(
            "hog",
            &json!({"memory": 16, "cmd": ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]}),
        )
        .await;
    eventually(
        60,
        "DEAD reports for the crash and the OOM kill",
        &all,
        || async {
            let log = ne.log();
            let dead = |job: &str, detail: &str| {
                log.lines().any(|l| {
                    l.contains(&format!("job={job}")) && l.contains("status=\"DEAD\"") && l.contains(detail)
                })
            };
            (dead("crash.test.svc.test", "exited with code 3") && dead("hog.test.svc.test", "OOM-killed"))
                .then_some(())
        },
    )
    .await;

    // An image pulled from the local registry over plain HTTP.
    let from_registry = stack
        .deploy(
            "pulled",
            &json!({"code": pulled, "cmd": ["sh", "-c", "echo pulled-ok; sleep 3600"]}),
        )
        .await;
    eventually(60, "the pulled service RUNNING with its log", &all, || async {
        stack.instance(&from_registry).await.filter(|i| {
            i["status"] == json!("RUNNING") && i["logs"].as_str().unwrap_or("").contains("pulled-ok")
        })
    })
    .await;

    // `NodeEngine status` sees the running agent.
    let state = dir.join("ne-state").display().to_string();
    let status = procs::run("NodeEngine", &["status", "--state-dir", &state]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("connected") && text.contains(task),
        "{text}"
    );

    // SIGTERM with the default `--on-stop leave`: the agent exits, the container keeps running.
    let pid_before = ctr_lines(&ctrd, &["tasks", "ls"]);
    assert_eq!(ne.terminate(Duration::from_secs(15)), Some(0), "{}", ne.log());
    let tasks = ctr_lines(&ctrd, &["tasks", "ls"]);
    assert!(
        tasks.lines().any(|l| l.contains(task) && l.contains("RUNNING")),
        "{tasks}"
    );
    let stopped = procs::run("NodeEngine", &["status", "--state-dir", &state]);
    assert_eq!(stopped.status.code(), Some(3), "status of a stopped agent");

    // The restarted agent adopts it: same task (same pid), still RUNNING at root.
    let ne2 = stack.node_engine(&ctrd, "ne-2.log");
    let all2 = [&stack.root, &stack.cluster, &ne2];
    eventually(30, "the restarted agent to adopt web", &all2, || async {
        ne2.log().contains("adopted a running instance").then_some(())
    })
    .await;
    assert_eq!(
        pid_before.lines().find(|l| l.contains(task)),
        ctr_lines(&ctrd, &["tasks", "ls"])
            .lines()
            .find(|l| l.contains(task)),
        "the task was replaced instead of adopted"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.wait_status(&web, "RUNNING", &all2).await;

    // A cluster outage (cluster-service and its broker killed for 4 s) leaves the instance running; the agent
    // reconnects by itself and the instance is RUNNING at root again.
    let connects = |p: &Proc| p.log().matches("connected to the cluster broker").count();
    let before = connects(&ne2);
    stack.restart_cluster(Duration::from_secs(4)).await;
    let tasks = ctr_lines(&ctrd, &["tasks", "ls"]);
    assert!(
        tasks.lines().any(|l| l.contains(task) && l.contains("RUNNING")),
        "{tasks}"
    );
    let all2 = [&stack.root, &stack.cluster, &ne2];
    eventually(60, "the agent to reconnect after the outage", &all2, || async {
        (connects(&ne2) > before).then_some(())
    })
    .await;
    stack.wait_status(&web, "RUNNING", &all2).await;

    // Deleting the instance at root removes task, container and snapshot.
    let r = call(
        "DELETE",
        &format!("{}/api/service/{web}/instance/0", stack.root_url),
        Some(&stack.token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(30, "web's container to be gone", &all2, || async {
        let containers = ctr_lines(&ctrd, &["containers", "ls", "-q"]);
        let snapshots = ctr_lines(&ctrd, &["snapshots", "ls"]);
        (!containers.contains(task) && !snapshots.contains(&format!("{task}-snapshotter"))).then_some(())
    })
    .await;
    assert!(ne2.log().contains("status=\"UNDEPLOYED\""), "{}", ne2.log());

    drop(ne2);
    drop(ne);
    drop(stack);
    drop(registry);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in for the NetManager's local API on a unix socket: records every call and, for `/container/deploy`, the
/// task's state as containerd sees it at that moment (the attach must happen between task create and start).
struct StubNetManager {
    calls: std::sync::Arc<std::sync::Mutex<Vec<(String, Value, String)>>>,
    fail_deploys: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: tokio::task::JoinHandle<()>,
}

impl StubNetManager {
    fn start(socket: &Path, ctr_socket: PathBuf) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let fail_deploys = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, f) = (calls.clone(), fail_deploys.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (c, f, ctr_socket) = (c.clone(), f.clone(), ctr_socket.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0_u8; 4096];
                    let (head, body) = loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some(i) = text.find("\r\n\r\n") {
                            let head = text[..i].to_owned();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if buf.len() >= i + 4 + len {
                                break (
                                    head,
                                    String::from_utf8_lossy(&buf[i + 4..i + 4 + len]).into_owned(),
                                );
                            }
                        }
                    };
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let mut seen = String::new();
                    let mut status = "200 OK";
                    let mut answer = json!({});
                    if path == "/container/deploy" {
                        let out = std::process::Command::new("ctr")
                            .arg("--address")
                            .arg(&ctr_socket)
                            .args(["-n", "oakestra", "tasks", "ls"])
                            .output()
                            .unwrap();
                        seen = String::from_utf8_lossy(&out.stdout).into_owned();
                        if f.load(std::sync::atomic::Ordering::Relaxed) {
                            status = "500 Internal Server Error";
                            answer = json!({"error": "stub says no"});
                        } else {
                            answer = json!({"serviceName": body["serviceName"], "nsAddress": "10.18.0.2", "nsAddressv6": "fc00::2"});
                        }
                    }
                    c.lock().unwrap().push((path, body, seen));
                    let payload = answer.to_string();
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
                        payload.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            calls,
            fail_deploys,
            server,
        }
    }

    fn calls(&self, path: &str) -> Vec<(Value, String)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, b, s)| (b.clone(), s.clone()))
            .collect()
    }
}

impl Drop for StubNetManager {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_is_attached_between_create_and_start_and_orphans_go() {
    let dir = std::env::temp_dir().join(format!("oakestra-worker-overlay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctrd = Containerd::start("worker-overlay");
    ctrd.import_test_image("oakestra", IMAGE);
    let stack = Stack::start(&dir).await;
    let socket = dir.join("netmanager.sock");
    let stub = StubNetManager::start(&socket, ctrd.socket.clone());
    let ne_args = |log: &str, extra: &[&str]| {
        let mut p = stack.node_engine_args(&ctrd);
        let n = p.iter().position(|a| a == "-1").unwrap();
        p[n] = socket.display().to_string();
        p.extend(extra.iter().map(|s| (*s).to_owned()));
        Proc::start("NodeEngine", &p, dir.join(log))
    };
    let ne = ne_args("ne-1.log", &[]);
    let all = [&stack.root, &stack.cluster, &ne];

    // Registration with the NetManager comes first, with the node id.
    eventually(30, "the NetManager registration", &all, || async {
        (!stub.calls("/register").is_empty()).then_some(())
    })
    .await;
    let (register, _) = stub.calls("/register")[0].clone();
    assert_eq!(register["cluster_address"], json!("127.0.0.1"));
    assert!(
        register["client_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{register}"
    );

    // The attach carries the task's pid and the port mappings while the task is created but not started.
    let web = stack
        .deploy(
            "ovl",
            &json!({"port": "8080:80/tcp", "cmd": ["sh", "-c", "sleep 3600"]}),
        )
        .await;
    stack.wait_status(&web, "RUNNING", &all).await;
    let task = "ovl.test.svc.test.instance.0";
    let (attach, tasks_then) = stub.calls("/container/deploy")[0].clone();
    assert_eq!(attach["serviceName"], json!("ovl.test.svc.test"));
    assert_eq!(attach["instanceNumber"], json!(0));
    assert_eq!(attach["portMappings"], json!("8080:80/tcp"));
    let pid = attach["pid"].as_i64().unwrap();
    let line = tasks_then
        .lines()
        .find(|l| l.contains(task))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains(&pid.to_string()) && line.contains("CREATED"),
        "task at attach time: {tasks_then}"
    );

    // A refused attach fails the deploy and leaves nothing behind.
    stub.fail_deploys
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = stack
        .deploy("refused", &json!({"cmd": ["sh", "-c", "sleep 3600"]}))
        .await;
    eventually(60, "FAILED for the refused attach", &all, || async {
        ne.log()
            .lines()
            .any(|l| {
                l.contains("job=refused.test.svc.test")
                    && l.contains("status=\"FAILED\"")
                    && l.contains("overlay attach failed")
            })
            .then_some(())
    })
    .await;
    let _ = refused;
    stub.fail_deploys
        .store(false, std::sync::atomic::Ordering::Relaxed);

    // An orphan: the agent is killed, the job is deleted meanwhile; the restarted agent adopts the container and the
    // cluster, which no longer knows it, has it removed (and detached).
    drop(ne);
    let ovl_app = stack
        .applications()
        .await
        .iter()
        .find(|a| a["application_name"] == json!("ovl"))
        .unwrap()["applicationID"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call(
        "DELETE",
        &format!("{}/api/application/{ovl_app}", stack.root_url),
        Some(&stack.token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        ctr_lines(&ctrd, &["tasks", "ls"]).contains(task),
        "the orphan must still run while the agent is down"
    );
    let ne2 = ne_args("ne-2.log", &["--on-stop", "stop"]);
    let all2 = [&stack.root, &stack.cluster, &ne2];
    eventually(60, "the orphan to be removed", &all2, || async {
        (!ctr_lines(&ctrd, &["containers", "ls", "-q"]).contains(task)).then_some(())
    })
    .await;
    assert!(
        stub.calls("/container/undeploy")
            .iter()
            .any(|(b, _)| b["serviceName"] == json!("ovl.test.svc.test"))
    );

    // `--on-stop stop`: SIGTERM stops and removes the running instances.
    let keep = stack
        .deploy("keep", &json!({"cmd": ["sh", "-c", "sleep 3600"]}))
        .await;
    stack.wait_status(&keep, "RUNNING", &all2).await;
    let mut ne2 = ne2;
    assert_eq!(ne2.terminate(Duration::from_secs(30)), Some(0), "{}", ne2.log());
    let left = ctr_lines(&ctrd, &["containers", "ls", "-q"]);
    assert!(!left.contains("keep.test.svc.test"), "{left}");
    assert!(
        stub.calls("/container/undeploy")
            .iter()
            .any(|(b, _)| b["serviceName"] == json!("keep.test.svc.test"))
    );

    drop(ne2);
    drop(stub);
    drop(stack);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cluster marks an instance RUNNING when a resources report lists it; the NodeEngine sends one as soon as an
/// instance starts instead of at its next periodic report (here a minute away), so RUNNING reaches root at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_instance_is_reported_without_waiting_for_the_next_period() {
    let dir = std::env::temp_dir().join(format!("oakestra-worker-soon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctrd = Containerd::start("worker-soon");
    ctrd.import_test_image("oakestra", IMAGE);
    let stack = Stack::start(&dir).await;
    let mut args = stack.node_engine_args(&ctrd);
    let at = args.iter().position(|a| a == "--report-interval").unwrap();
    args[at + 1] = "60".to_owned();
    let ne = Proc::start("NodeEngine", &args, dir.join("ne.log"));
    let all = [&stack.root, &stack.cluster, &ne];
    stack.wait_active_workers(1, 30, &all).await;
    // The periodic reports went out at the start; the next one is about 60 s away.
    let job = stack.deploy("soon", &json!({"cmd": ["sleep", "3600"]})).await;
    eventually(
        20,
        "RUNNING at root well before the next periodic report",
        &all,
        || async {
            stack
                .instance(&job)
                .await
                .filter(|i| i["status"] == json!("RUNNING"))
        },
    )
    .await;
    drop(ne);
    drop(stack);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An image that cannot be pulled: the worker reports FAILED with the pull error, then its cleanup's UNDEPLOYED; root
/// shows the pull error (not "the instance stopped"), and keeps showing it with the restart count while the cluster
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_shows_its_reason_at_root() {
    let dir = std::env::temp_dir().join(format!("oakestra-worker-pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctrd = Containerd::start("worker-pull");
    let stack = Stack::start(&dir).await;
    let ne = stack.node_engine(&ctrd, "ne.log");
    let all = [&stack.root, &stack.cluster, &ne];
    stack.wait_active_workers(1, 30, &all).await;
    // Nothing listens on port 9 here: the registry refuses the connection.
    let job = stack
        .deploy("pullfail", &json!({"code": "127.0.0.1:9/oakestra/none:latest"}))
        .await;
    let failed = eventually(60, "the pull error at root", &all, || async {
        stack.instance(&job).await.filter(|i| {
            i["status_detail"]
                .as_str()
                .is_some_and(|d| d.contains("127.0.0.1:9"))
        })
    })
    .await;
    let detail = failed["status_detail"].as_str().unwrap().to_owned();
    assert!(!detail.starts_with("the instance stopped"), "{failed}");
    println!("root shows: {} {detail}", failed["status"]);
    // Through the retries the reason stays, with the restart count.
    let again = eventually(60, "a retry that still names the pull error", &all, || async {
        stack.instance(&job).await.filter(|i| {
            let d = i["status_detail"].as_str().unwrap_or_default();
            d.contains("127.0.0.1:9") && (d.contains("restart ") || d.contains("crash loop"))
        })
    })
    .await;
    println!("later: {} {}", again["status"], again["status_detail"]);
    assert!(
        !again["status_detail"]
            .as_str()
            .unwrap()
            .contains("the instance stopped"),
        "{again}"
    );
    drop(ne);
    drop(stack);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}
