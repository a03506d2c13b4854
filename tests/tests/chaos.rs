//! Chaos on a running deployment (root): 20 instances on two overlay workers (a server service of 9 instances on
//! each worker, each with a round-robin service IP, and a client on each worker). Then, one after the other:
//! root restarts, cluster-service is killed and restarts, each NodeEngine restarts, each NetManager restarts (its
//! veths go with it; the NodeEngine attaches its containers again), and the broker is cut off for 10 s (an
//! nftables drop of its port in the control plane's namespace). After every step: the same 20 containers with the
//! same pids (none lost, none duplicated, none restarted), root lists exactly those 20 RUNNING, and both service
//! IPs answer from both clients; and once more after the worker timeout has passed since the last step. Worker 1
//! runs the eBPF dataplane, worker 2 the TUN one.
//!
//! The cluster runs with `--worker-timeout 30` (the reference's value): a 10 s cut stays within it, and the
//! broker's keep-alive wills during the cut are not taken for crashed workers.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]
#![allow(clippy::print_stderr, reason = "the test reports the steps it took")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use oakestra_tests::{
    harness::eventually,
    incontainer::{InNetns, probe, serve, tasks},
    overlaybed::OverlayBed,
    stack::{Stack, call},
};
use serde_json::json;

/// The server services: name, service IP, the worker (index) its instances are pinned to.
const SERVERS: [(&str, &str, usize); 2] = [("sa", "10.30.61.1", 0), ("sb", "10.30.61.2", 1)];
/// Instances of each server service.
const SERVER_INSTANCES: usize = 9;
/// How long the broker is cut off.
const CUT: Duration = Duration::from_secs(10);

/// Every instance's container: task id → init pid, over both workers (panics on a task running on both).
fn containers(bed: &OverlayBed) -> BTreeMap<String, u32> {
    let mut all = BTreeMap::new();
    for w in 0..2 {
        for (task, pid) in tasks(&bed.ctrd, &OverlayBed::name(w)) {
            assert!(
                all.insert(task.clone(), pid).is_none(),
                "{task} runs on both workers"
            );
        }
    }
    all
}

/// Every instance root lists for `jobs`, as (job, instance number, status, worker).
async fn listed(stack: &Stack, jobs: &[String]) -> Vec<(String, i64, String, String)> {
    let mut all = Vec::new();
    for job in jobs {
        for i in stack.instances(job).await {
            all.push((
                job.clone(),
                i["instance_number"].as_i64().unwrap_or(-1),
                i["status"].as_str().unwrap_or_default().to_owned(),
                i["worker_id"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    all
}

/// Deploys `count` instances of service `svc` (application `app`) pinned to worker `w`; returns the job id.
async fn deploy(bed: &OverlayBed, app: &str, svc: &str, w: usize, count: usize, rr: Option<&str>) -> String {
    let mut ms = json!({"microservice_name": svc, "memory": 16, "cmd": ["sleep", "3600"],
        "constraints": [{"type": "direct", "node": OverlayBed::name(w)}]});
    if let Some(rr) = rr {
        ms["addresses"] = json!({"rr_ip": rr});
    }
    let job = bed.stack.deploy(app, &ms).await;
    for _ in 1..count {
        let r = call(
            "POST",
            &format!("{}/api/service/{job}/instance", bed.stack.root_url),
            Some(&bed.stack.token),
            Some(&json!({})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    job
}

/// The state every step must leave: root lists exactly `want` instances of `jobs`, all RUNNING, and the
/// containers are exactly `before` (same tasks, same pids).
async fn unchanged(
    bed: &OverlayBed,
    jobs: &[String],
    want: usize,
    before: &BTreeMap<String, u32>,
    step: &str,
) {
    eventually(
        90,
        &format!("after {step}: {want} instances RUNNING at root"),
        &bed.procs(),
        || async {
            let all = listed(&bed.stack, jobs).await;
            (all.len() == want && all.iter().all(|(_, _, s, _)| s == "RUNNING")).then_some(())
        },
    )
    .await;
    let all = listed(&bed.stack, jobs).await;
    let numbers: BTreeSet<(String, i64)> = all.iter().map(|(j, n, _, _)| (j.clone(), *n)).collect();
    assert_eq!(
        numbers.len(),
        want,
        "after {step}: an instance listed twice: {all:?}"
    );
    assert_eq!(&containers(bed), before, "after {step}: the containers changed");
}

/// Both service IPs answer new TCP connections from both clients, with the names of their own servers only.
async fn service_ips_answer(bed: &OverlayBed, clients: &[u32; 2], step: &str) {
    for (svc, rr, _) in SERVERS {
        for (w, pid) in clients.iter().enumerate() {
            eventually(
                60,
                &format!("after {step}: {rr} ({svc}) from the client on w{}", w + 1),
                &bed.procs(),
                || async {
                    let out = probe(*pid, &["tcp-each", rr, "8080", "--count", "6"]);
                    let text = String::from_utf8_lossy(&out.stdout).to_string();
                    let names: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                    (out.status.success()
                        && names.len() == 6
                        && names.iter().all(|n| n.starts_with(&format!("{svc}-"))))
                    .then_some(())
                },
            )
            .await;
        }
    }
}

/// The instances worker `w`'s NetManager has plumbed (0 while it does not answer).
fn plumbed(bed: &OverlayBed, w: usize) -> usize {
    bed.try_netmanager_status(w)
        .and_then(|s| s["instances"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[tokio::test(flavor = "current_thread")]
async fn twenty_instances_survive_restarts_of_every_component_and_a_broker_cut() {
    let started = Instant::now();
    let mut bed = OverlayBed::start("chaos", &["ebpf", "tun"], &["--worker-timeout", "30"]).await;
    bed.stack.wait_active_workers(2, 60, &bed.procs()).await;
    bed.assert_dataplanes();

    let mut jobs = Vec::new();
    for (svc, rr, w) in SERVERS {
        jobs.push(deploy(&bed, &format!("ch{svc}"), svc, w, SERVER_INSTANCES, Some(rr)).await);
    }
    for w in 0..2 {
        jobs.push(deploy(&bed, &format!("chc{w}"), &format!("c{w}"), w, 1, None).await);
    }
    let want = 2 * SERVER_INSTANCES + 2;
    eventually(120, "20 containers running", &bed.procs(), || async {
        (containers(&bed).len() == want).then_some(())
    })
    .await;
    let before = containers(&bed);
    unchanged(&bed, &jobs, want, &before, "the deploy").await;
    let per_worker = |w: usize| tasks(&bed.ctrd, &OverlayBed::name(w)).len();
    assert_eq!(
        (per_worker(0), per_worker(1)),
        (SERVER_INSTANCES + 1, SERVER_INSTANCES + 1)
    );

    // A server in every server container, answering with its task id; one client on each worker.
    let mut servers: Vec<InNetns> = Vec::new();
    let mut clients = [0u32; 2];
    for (task, pid) in &before {
        // Task ids are `<app>.test.<svc>.test.instance.<n>`.
        let svc = task.split('.').nth(2).unwrap_or_default();
        let n = task.rsplit('.').next().unwrap_or_default();
        match svc {
            "c0" => clients[0] = *pid,
            "c1" => clients[1] = *pid,
            _ => servers.push(serve(*pid, &format!("{svc}-{n}"), 8080, 8081)),
        }
    }
    assert!(clients.iter().all(|p| *p > 0), "{before:?}");
    std::thread::sleep(Duration::from_millis(300));
    service_ips_answer(&bed, &clients, "the deploy").await;

    let step = |what: &str| eprintln!("chaos: {what} ({:.0} s in)", started.elapsed().as_secs_f64());

    step("restarting root");
    bed.stack.restart_root().await;
    unchanged(&bed, &jobs, want, &before, "root's restart").await;
    service_ips_answer(&bed, &clients, "root's restart").await;

    step("killing and restarting cluster-service");
    bed.stack.restart_cluster(Duration::from_secs(1)).await;
    bed.stack.wait_active_workers(2, 60, &bed.procs()).await;
    unchanged(&bed, &jobs, want, &before, "cluster-service's restart").await;
    service_ips_answer(&bed, &clients, "cluster-service's restart").await;

    for w in 0..2 {
        step(&format!("restarting w{}'s NodeEngine", w + 1));
        bed.engines[w].terminate(Duration::from_secs(10));
        bed.engines[w] = bed.node_engine(w, "nodeengine-2");
        bed.engines[w].wait_for_log("NetManager registered", 60).await;
        unchanged(&bed, &jobs, want, &before, "a NodeEngine's restart").await;
        service_ips_answer(&bed, &clients, "a NodeEngine's restart").await;
    }

    for w in 0..2 {
        step(&format!("restarting w{}'s NetManager", w + 1));
        bed.restart_netmanager(w, "netmanager-2");
        eventually(
            60,
            &format!("w{}'s containers attached again", w + 1),
            &bed.procs(),
            || async { (plumbed(&bed, w) == SERVER_INSTANCES + 1).then_some(()) },
        )
        .await;
        step(&format!("w{}'s containers are attached again", w + 1));
        unchanged(&bed, &jobs, want, &before, "a NetManager's restart").await;
        service_ips_answer(&bed, &clients, "a NetManager's restart").await;
    }
    for w in 0..2 {
        let log = bed.engines[w].log();
        assert!(log.contains("the NetManager restarted"), "w{}: {log}", w + 1);
    }

    step("cutting the broker off for 10 s");
    let port = bed.stack.mqtt_port.to_string();
    let cut = format!(
        "table inet oakchaos {{ chain input {{ type filter hook input priority -10; tcp dport {port} counter drop; }}; }}"
    );
    let nft = |args: &[&str]| {
        let out = bed.tb.lan.run(&[&["nft"], args].concat());
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    nft(&[&cut]);
    tokio::time::sleep(CUT).await;
    let counted = nft(&["list", "table", "inet", "oakchaos"]);
    nft(&["delete", "table", "inet", "oakchaos"]);
    let dropped: u64 = counted
        .split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the cut dropped nothing: {counted}");
    unchanged(&bed, &jobs, want, &before, "the broker cut").await;
    service_ips_answer(&bed, &clients, "the broker cut").await;
    // The broker noticed the cut (keep-alive wills), and the cluster did not take them for crashes.
    let cluster_log = bed.stack.cluster.log();
    assert!(
        cluster_log.contains("broker connection timed out"),
        "the broker never noticed the cut: {cluster_log}"
    );

    // Every step is over for longer than the worker timeout: whatever a step broke (a worker that never came
    // back, an instance the cluster lost track of) has shown by now.
    step("settling for 35 s (beyond the 30 s worker timeout)");
    tokio::time::sleep(Duration::from_secs(25)).await;
    unchanged(&bed, &jobs, want, &before, "the settling time").await;
    service_ips_answer(&bed, &clients, "the settling time").await;
    let cluster_log = bed.stack.cluster.log();
    assert!(
        !cluster_log.contains("worker is dead"),
        "a worker was declared dead: {cluster_log}"
    );
    bed.stack.wait_active_workers(2, 10, &bed.procs()).await;

    step("cleaning up");
    drop(servers);
    bed.stack.delete_applications().await;
    eventually(60, "every container to be removed", &bed.procs(), || async {
        (0..2)
            .all(|w| tasks(&bed.ctrd, &OverlayBed::name(w)).is_empty())
            .then_some(())
    })
    .await;
    bed.finish();
    step("done");
}
