//! Placement decisions: what the root tier does per instance over 1,000 clusters (or a big cluster over 1,000
//! workers). Prints decisions per second and nanoseconds per decision.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;

use oakestra_benches::time_ns;
use oakestra_protocol::sched::{Candidate, Capacity, Demand, Policy, Reservations, place};

/// Number of candidates and of live reservations.
const CANDIDATES: u64 = 1_000;

/// A small deterministic generator (64-bit LCG, high bits): the same candidates on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// 1,000 candidates with varied size, architecture mix, runtimes, load and (for some) a largest-node bound.
fn candidates() -> Vec<Candidate> {
    let mut rng = Lcg(42);
    (0..CANDIDATES)
        .map(|i| {
            let vcpus = 2 + rng.next(63);
            let memory_mib = 1024 * (2 + rng.next(127));
            let gpus = if rng.next(10) == 0 { 1 + rng.next(4) } else { 0 };
            let total = Capacity::new(vcpus, memory_mib, gpus);
            let per_arch = match rng.next(4) {
                0 => BTreeMap::from([("amd64".to_owned(), total)]),
                1 => BTreeMap::from([("arm64".to_owned(), total)]),
                2 => BTreeMap::from([
                    ("amd64".to_owned(), Capacity::new(vcpus / 2, memory_mib / 2, gpus)),
                    (
                        "arm64".to_owned(),
                        Capacity::new(vcpus - vcpus / 2, memory_mib - memory_mib / 2, 0),
                    ),
                ]),
                _ => BTreeMap::new(),
            };
            let virtualization = match rng.next(3) {
                0 => vec!["docker".to_owned()],
                1 => vec!["docker".to_owned(), "unikernel".to_owned()],
                _ => vec!["unikernel".to_owned()],
            };
            let max_node = (rng.next(2) == 0).then(|| Capacity::new(vcpus.div_ceil(2), memory_mib / 2, gpus));
            Candidate {
                id: format!("6650f0c1a2b3c4d5e6f{i:05}"),
                name: format!("cluster-{i}"),
                active: rng.next(20) != 0,
                virtualization,
                cpu_percent: f64::from(u32::try_from(rng.next(100)).unwrap_or(0)),
                total,
                per_arch,
                max_node,
                csi_drivers: if rng.next(5) == 0 {
                    vec!["csi.nfs".to_owned()]
                } else {
                    Vec::new()
                },
                addons: Vec::new(),
            }
        })
        .collect()
}

/// A typical request: one container, 1 vCPU, 512 MiB, no constraint.
fn typical() -> Demand {
    Demand {
        key: "6650f0c1a2b3c4d5e6f99999/0".to_owned(),
        virtualization: "container".to_owned(),
        need: Capacity::new(1, 512, 0),
        ..Demand::default()
    }
}

fn report(label: &str, ns: f64) {
    println!(
        "sched: {label:<58} {:>12.0} decisions/s {ns:>10.0} ns/decision",
        1e9 / ns
    );
}

fn main() {
    let cands = candidates();
    let demand = typical();
    let none = Reservations::new();

    let ns = time_ns(20_000, || place(&cands, &demand, &none, Policy::BestFit).is_ok());
    report("best-fit, 1,000 candidates, typical demand", ns);

    // 1,000 live reservations spread over the candidates (several on some, none on others).
    let mut held = Reservations::new();
    let mut rng = Lcg(7);
    for k in 0..CANDIDATES {
        let on = &cands[usize::try_from(rng.next(CANDIDATES)).unwrap_or(0)].id;
        held.reserve(on, &format!("job{k}/0"), Capacity::new(1, 256, 0), 0, 60_000);
    }
    let ns = time_ns(20_000, || place(&cands, &demand, &held, Policy::BestFit).is_ok());
    report("best-fit, + 1,000 live reservations", ns);

    let ns = time_ns(20_000, || place(&cands, &demand, &none, Policy::Spread).is_ok());
    report("spread, 1,000 candidates, typical demand", ns);

    let mut arm = typical();
    arm.arch = vec!["arm64".to_owned()];
    arm.csi_drivers = vec!["csi.nfs".to_owned()];
    let ns = time_ns(20_000, || place(&cands, &arm, &held, Policy::BestFit).is_ok());
    report("best-fit, arm64 + CSI demand, + 1,000 reservations", ns);
}
