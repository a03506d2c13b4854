//! What unikernels cost on a worker and how fast they start: the release `NodeEngine` (`-u=true`), `root-service`
//! and `cluster-service`, the test guest of `scripts/images/unikernel.sh` served over HTTP on localhost, a private
//! containerd (the container runtime stays registered). The accelerator is whatever the NodeEngine's KVM probe
//! picks, and it is named in the output.
//!
//! 1. NodeEngine idle cost with no guest (RSS, CPU over 10 s).
//! 2. Deploy → RUNNING at root, 10 times with a cold image cache (removed before each deploy: download, checksum,
//!    extraction included) and 10 times warm; plus the NodeEngine's own part (deploy message → QEMU running, its
//!    `elapsed_ms` log field) and deploy → the guest's `serving` line on its console (the guest's boot included).
//! 3. Idle RSS of one guest's QEMU, and the NodeEngine's idle cost with 10 guests running.
//!
//! Needs `cargo build --release --bins` first (`benches/unikernel-load.sh` does it). Run as root.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oakestra_tests::containerd::Containerd;
use oakestra_tests::harness::{Proc, free_port};
use oakestra_tests::procs::workspace_root;
use oakestra_tests::stack::{Stack, call};
use serde_json::{Value, json};

const SAMPLES: usize = 10;
const GUESTS: usize = 10;

/// Average CPU (% of one core) and the final RSS (MiB) of `pid` over `window`.
async fn measure(pid: u32, window: Duration) -> (f64, f64) {
    tokio::task::spawn_blocking(move || oakestra_benches::cpu_and_rss(pid, window))
        .await
        .unwrap()
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Pids of the QEMUs running guests of `prefix`.
fn qemus(prefix: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd =
                String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
            (cmd.contains("qemu-system") && cmd.contains(prefix)).then_some(pid)
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

struct Bench {
    stack: Stack,
    job: String,
    logs: std::path::PathBuf,
    next: i64,
}

impl Bench {
    /// Deploys one more instance; returns (API call → RUNNING at root, API call → `serving` on the console).
    async fn one(&mut self, wait_serving: bool) -> (f64, f64) {
        let n = self.next;
        self.next += 1;
        let started = Instant::now();
        let r = call(
            "POST",
            &format!("{}/api/service/{}/instance", self.stack.root_url, self.job),
            Some(&self.stack.token),
            Some(&json!({})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let mut running = None;
        let log = self.logs.join(format!("ukb.test.guest.test.instance.{n}"));
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "instance {n} not RUNNING"
            );
            if running.is_none() {
                let url = format!("{}/api/service/{}", self.stack.root_url, self.job);
                let doc = call("GET", &url, Some(&self.stack.token), None).await.body;
                let status = doc["instance_list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|i| i["instance_number"] == json!(n))
                    .map(|i| i["status"].clone())
                    .unwrap_or(Value::Null);
                assert!(status != json!("FAILED"), "instance {n} FAILED: {doc}");
                if status == json!("RUNNING") {
                    running = Some(started.elapsed().as_secs_f64() * 1000.0);
                    if !wait_serving {
                        return (running.unwrap_or(f64::NAN), f64::NAN);
                    }
                }
            }
            if running.is_some()
                && std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("oakestra-guest: serving")
            {
                return (
                    running.unwrap_or(f64::NAN),
                    started.elapsed().as_secs_f64() * 1000.0,
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn undeploy(&self, n: i64) {
        let r = call(
            "DELETE",
            &format!("{}/api/service/{}/instance/{n}", self.stack.root_url, self.job),
            Some(&self.stack.token),
            None,
        )
        .await;
        assert!(r.status < 300, "{}", r.body);
        let task = format!("ukb.test.guest.test.instance.{n},");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !qemus(&task).is_empty() {
            assert!(Instant::now() < deadline, "instance {n} still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn run() {
    let dir = std::env::temp_dir().join(format!("oakestra-bench-unikernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let images = dir.join("images");
    let built = Command::new("bash")
        .arg(workspace_root().join("scripts/images/unikernel.sh"))
        .arg("--out")
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let port = free_port();
    let mut http = Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(&images)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ctrd = Containerd::start("bench-uk");
    let stack = Stack::start(&dir).await;
    let mut args = stack.node_engine_args(&ctrd);
    let i = args.iter().position(|a| a == "--report-interval").unwrap();
    args[i + 1] = "2".to_owned();
    args.extend([
        "-u=true".to_owned(),
        "--unikernel-cache-keep".to_owned(),
        "3600".to_owned(),
    ]);
    let ne = Proc::start("NodeEngine", &args, dir.join("ne.log"));
    ne.wait_for_log("connected to the cluster broker", 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, rss0) = measure(ne.pid(), Duration::from_secs(10)).await;
    let state = args[args.iter().position(|a| a == "--state-dir").unwrap() + 1].clone();
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&state).join("status.json")).unwrap())
            .unwrap();
    let accel = status["unikernel_accelerator"]
        .as_str()
        .unwrap_or("none")
        .to_owned();
    let logs = args[args.iter().position(|a| a == "-l").unwrap() + 1].clone();

    let guest = json!({"microservice_name": "guest", "virtualization": "unikernel", "arch": ["amd64"], "memory": 128,
        // vcpus 0: one vCPU each without reserving a core, so ten fit on a small worker.
        "vcpus": 0, "code": format!("http://127.0.0.1:{port}/oakestra-guest-amd64.tar.gz")});
    let job = stack.deploy("ukb", &guest).await;
    let mut bench = Bench {
        stack,
        job,
        logs: logs.into(),
        next: 1,
    };
    // Instance 0 came with the service; let it run, then take it away with its image.
    let cache = Path::new(&state).join("unikernel/cache");
    let deadline = Instant::now() + Duration::from_secs(240);
    while qemus("ukb.test.guest.test.instance.0,").is_empty() {
        assert!(
            Instant::now() < deadline,
            "instance 0 never started:\n{}",
            ne.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bench.undeploy(0).await;

    let (mut cold, mut cold_serving, mut warm, mut warm_serving) = (vec![], vec![], vec![], vec![]);
    for _ in 0..SAMPLES {
        let _ = std::fs::remove_dir_all(&cache);
        let (r, s) = bench.one(true).await;
        cold.push(r);
        cold_serving.push(s);
        bench.undeploy(bench.next - 1).await;
    }
    for _ in 0..SAMPLES {
        let (r, s) = bench.one(true).await;
        warm.push(r);
        warm_serving.push(s);
        bench.undeploy(bench.next - 1).await;
    }
    let mut agent: Vec<f64> = oakestra_benches::started_elapsed_ms(&ne.log());
    let warm_agent: Vec<f64> = agent.split_off(agent.len().saturating_sub(SAMPLES));
    let cold_agent: Vec<f64> = agent.split_off(agent.len().saturating_sub(SAMPLES));

    // Ten guests at once, then the idle costs.
    let first = bench.next;
    for _ in 0..GUESTS {
        bench.one(false).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let guests = qemus("ukb.test.guest.test.instance.");
    assert_eq!(guests.len(), GUESTS, "{guests:?}");
    let one_qemu = oakestra_benches::proc_usage(guests[0]).1 as f64 / 1024.0;
    let qemu_total: f64 = guests
        .iter()
        .map(|p| oakestra_benches::proc_usage(*p).1 as f64 / 1024.0)
        .sum();
    let (cpu10, rss10) = measure(ne.pid(), Duration::from_secs(10)).await;
    for n in first..bench.next {
        bench.undeploy(n).await;
    }

    println!(
        "NodeEngine (release) with -u=true: accelerator {accel}; {} cores; test guest = Debian kernel + busybox initramfs (TCG boots take seconds)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "| {SAMPLES} deploys each | p50 API → RUNNING at root | p50 NodeEngine (message → QEMU running) | p50 API → guest serving |"
    );
    println!("|---|---|---|---|");
    println!(
        "| cold image cache | {:.0} ms | {:.0} ms | {:.0} ms |",
        p50(&mut cold),
        p50(&mut cold_agent.clone()),
        p50(&mut cold_serving)
    );
    println!(
        "| warm image cache | {:.0} ms | {:.0} ms | {:.0} ms |",
        p50(&mut warm),
        p50(&mut warm_agent.clone()),
        p50(&mut warm_serving)
    );
    println!();
    println!("| state | NodeEngine CPU (one core) | NodeEngine RSS |");
    println!("|---|---|---|");
    println!("| idle, 0 guests | {cpu0:.2} % | {rss0:.1} MiB |");
    println!("| idle, {GUESTS} guests running | {cpu10:.2} % | {rss10:.1} MiB |");
    println!();
    println!(
        "one idle guest's QEMU (128 MiB guest): RSS {one_qemu:.1} MiB; {GUESTS} guests' QEMUs: {qemu_total:.0} MiB in total"
    );
    drop(ne);
    let _ = http.kill();
    let _ = http.wait();
    drop(bench);
    drop(ctrd);
    let _ = std::fs::remove_dir_all(&dir);
}
