//! What a NodeEngine costs and how fast it starts instances: the release `NodeEngine`, `root-service` and
//! `cluster-service` binaries against a private containerd + runc, the busybox test image imported locally.
//!
//! 1. Idle cost with no instance: RSS and CPU of the NodeEngine over 10 s (reports every 2 s, the default).
//! 2. 20 instances of one service (`sleep`), deployed through root one after another; for each, the time from the
//!    deploy message reaching the NodeEngine to its task running (the agent's own `elapsed_ms` log field: image
//!    lookup, snapshot, container, task, start) and the end-to-end time from root's API call to RUNNING at root
//!    (scheduling at both tiers and the first resources report included).
//! 3. Idle cost with the 20 instances running (their CPU, memory, disk and log tail are reported every 2 s).
//!
//! Needs `cargo build --release --bins` first (`benches/worker-load.sh` does it). Run as root (containerd, cgroups).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use oakestra_tests::containerd::Containerd;
use oakestra_tests::stack::{IMAGE, Stack, call};
use serde_json::json;

const INSTANCES: usize = 20;

/// Average CPU (% of one core) and the final RSS (MiB) of `pid` over `window`.
async fn measure(pid: u32, window: Duration) -> (f64, f64) {
    tokio::task::spawn_blocking(move || oakestra_benches::cpu_and_rss(pid, window))
        .await
        .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: p of the way from the first to the last sample.
    let last = sorted.len() - 1;
    let i = (0..=last).min_by(|a, b| {
        let target = last as f64 * p;
        (*a as f64 - target).abs().total_cmp(&(*b as f64 - target).abs())
    });
    sorted[i.unwrap_or(last)]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = std::env::temp_dir().join(format!("oakestra-bench-worker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctrd = Containerd::start("bench-worker");
    ctrd.import_test_image("oakestra", IMAGE);
    let stack = Stack::start(&dir).await;
    let mut args = stack.node_engine_args(&ctrd);
    let i = args.iter().position(|a| a == "--report-interval").unwrap();
    args[i + 1] = "2".to_owned();
    let ne = oakestra_tests::harness::Proc::start("NodeEngine", &args, dir.join("ne.log"));
    ne.wait_for_log("connected to the cluster broker", 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, rss0) = measure(ne.pid(), Duration::from_secs(10)).await;

    let job = stack
        .deploy(
            "bench",
            &json!({"cmd": ["sh", "-c", "while true; do sleep 1; done"], "memory": 32}),
        )
        .await;
    let mut requested: BTreeMap<i64, Instant> = BTreeMap::new();
    requested.insert(0, Instant::now());
    for n in 1..INSTANCES {
        let r = call(
            "POST",
            &format!("{}/api/service/{job}/instance", stack.root_url),
            Some(&stack.token),
            Some(&json!({})),
        )
        .await;
        assert_eq!(r.status, 200, "instance {n}: {}", r.body);
        requested.insert(i64::try_from(n).unwrap(), Instant::now());
    }
    let mut running: BTreeMap<i64, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while running.len() < INSTANCES {
        assert!(
            Instant::now() < deadline,
            "only {} of {INSTANCES} RUNNING:\n{}",
            running.len(),
            ne.log()
        );
        let url = format!("{}/api/service/{job}", stack.root_url);
        let r = call("GET", &url, Some(&stack.token), None).await;
        for i in r.body["instance_list"].as_array().cloned().unwrap_or_default() {
            let n = i["instance_number"].as_i64().unwrap_or(-1);
            if i["status"] == json!("RUNNING")
                && !running.contains_key(&n)
                && let Some(t) = requested.get(&n)
            {
                running.insert(n, t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu20, rss20) = measure(ne.pid(), Duration::from_secs(10)).await;

    let mut agent: Vec<f64> = oakestra_benches::started_elapsed_ms(&ne.log());
    agent.sort_by(f64::total_cmp);
    let mut e2e: Vec<f64> = running.values().map(|d| d.as_secs_f64() * 1000.0).collect();
    e2e.sort_by(f64::total_cmp);
    let version = String::from_utf8_lossy(&ctrd.ctr("default", &["version"]).stdout)
        .lines()
        .find(|l| l.trim_start().starts_with("Version"))
        .unwrap_or("")
        .trim()
        .to_owned();
    println!(
        "NodeEngine (release) against containerd {version}, runc, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| state | NodeEngine CPU (one core) | NodeEngine RSS |");
    println!("|---|---|---|");
    println!("| idle, 0 instances | {cpu0:.2} % | {rss0:.1} MiB |");
    println!("| idle, {INSTANCES} instances running | {cpu20:.2} % | {rss20:.1} MiB |");
    println!();
    println!("| {INSTANCES} deploys of a local image | p50 | p90 | max |");
    println!("|---|---|---|---|");
    println!(
        "| deploy message → task running (NodeEngine) | {:.0} ms | {:.0} ms | {:.0} ms |",
        percentile(&agent, 0.5),
        percentile(&agent, 0.9),
        agent.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| root API call → RUNNING at root | {:.0} ms | {:.0} ms | {:.0} ms |",
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.9),
        e2e.last().copied().unwrap_or(f64::NAN)
    );
    drop(ne);
    drop(stack);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}
