//! Benchmarks for oakestra-rs (`cargo bench -p oakestra-benches`).
//!
//! # Layout
//! - `benches/protocol.rs`: SLA validation and address allocation, the per-request work of root-service.
//! - `benches/scheduler.rs`: placement decisions over 1,000 candidates, with and without live reservations.
//! - `benches/cluster_load.rs`: the real `cluster-service` binary under simulated workers: the report rate it keeps
//!   up with (MQTT processing lag per worker count, CPU, RSS) and how fast it moves an instance off a dead worker
//!   (run it with `benches/cluster-load.sh`).
//!
//! The network benches (packet translation, connection table, the overlay testbed) arrive with the NetManager.

/// Times `f` over `iterations` runs after a short warm-up and returns nanoseconds per run.
pub fn time_ns<T>(iterations: u32, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..iterations.div_ceil(10) {
        std::hint::black_box(f());
    }
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(f());
    }
    start.elapsed().as_secs_f64() * 1e9 / f64::from(iterations.max(1))
}

/// (utime + stime in clock ticks, RSS in KiB) of process `pid`; zeros when it is gone.
pub fn proc_usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
        return (0, 0);
    };
    // Fields after the parenthesised command name: state is field 3; utime, stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (field(11) + field(12), rss)
}

/// Average CPU (% of one core) and the final RSS (MiB) of `pid` over `window` (USER_HZ is 100 on Linux).
pub fn cpu_and_rss(pid: u32, window: std::time::Duration) -> (f64, f64) {
    let (t0, _) = proc_usage(pid);
    let start = std::time::Instant::now();
    std::thread::sleep(window);
    let (t1, rss) = proc_usage(pid);
    let cpu = t1.saturating_sub(t0) as f64 / 100.0 / start.elapsed().as_secs_f64() * 100.0;
    (cpu, rss as f64 / 1024.0)
}

/// The `elapsed_ms` of every "instance started" line of a NodeEngine log (deploy message → instance running).
pub fn started_elapsed_ms(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("instance started"))
        .filter_map(|l| {
            l.split("elapsed_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
