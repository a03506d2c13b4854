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
