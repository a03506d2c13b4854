//! The per-node free-capacity index placement reads: live workers kept in the placement policy's own rank order, so
//! a placement visits the workers from the best-ranked one that could hold the demand and stops at the first that
//! fits and qualifies, instead of building a candidate for every worker under the state lock. Pure.
//!
//! The order is [`sched::place`]'s ranking, made a key: best-fit ranks by (free memory, free vCPUs, CPU load, name,
//! id) ascending (the leftover is the free capacity minus the same demand, so it orders alike), spread by (free
//! memory descending, CPU load, name, id). Workers without a free core are left out (a demand for cores skips them
//! anyway). `sched::place` still decides whether the visited worker fits and qualifies. Constraints by name,
//! first-fit, demands for no cores and refusals (to name the rule that left nothing) use the full scan.

use std::collections::{BTreeSet, HashMap};

use oakestra_protocol::sched::{self, Candidate, Capacity, Demand, Policy, Refusal, Reservations};

/// A CPU load that orders like `f64::total_cmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Load(i64);

impl Load {
    fn new(x: f64) -> Self {
        let bits = i64::from_ne_bytes(x.to_bits().to_ne_bytes());
        // The usual total-order trick: flip the magnitude bits of negative numbers.
        Self(bits ^ ((((bits >> 63) as u64) >> 1) as i64))
    }
}

/// A worker's place in the order: the policy's ranking as a key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// Best-fit: free memory; spread: `u64::MAX` − free memory.
    memory: u64,
    /// Best-fit: free vCPUs; spread: 0.
    vcpus: u64,
    load: Load,
    name: String,
    id: String,
}

/// What the index needs to know of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// Its free capacity.
    pub free: Capacity,
    /// Its CPU load in percent (a tie-breaker).
    pub cpu_percent: f64,
    /// Its host name (a tie-breaker).
    pub name: String,
}

/// Live workers in rank order.
#[derive(Debug)]
pub struct FreeIndex {
    policy: Policy,
    keys: HashMap<String, Rank>,
    ordered: BTreeSet<Rank>,
}

impl Default for FreeIndex {
    fn default() -> Self {
        Self::new(Policy::BestFit)
    }
}

impl FreeIndex {
    /// An empty index ordered for `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            keys: HashMap::new(),
            ordered: BTreeSet::new(),
        }
    }

    fn rank(&self, id: &str, slot: &Slot) -> Rank {
        let (memory, vcpus) = match self.policy {
            Policy::Spread => (u64::MAX - slot.free.memory_mib, 0),
            _ => (slot.free.memory_mib, slot.free.vcpus),
        };
        Rank {
            memory,
            vcpus,
            load: Load::new(slot.cpu_percent),
            name: slot.name.clone(),
            id: id.to_owned(),
        }
    }

    /// Sets `node`'s place; `None` takes it out (dead, forgotten). Workers without a free core are left out.
    pub fn set(&mut self, node: &str, slot: Option<Slot>) {
        let rank = slot.filter(|s| s.free.vcpus > 0).map(|s| self.rank(node, &s));
        if self.keys.get(node) == rank.as_ref() {
            return;
        }
        if let Some(old) = self.keys.remove(node) {
            self.ordered.remove(&old);
        }
        if let Some(rank) = rank {
            self.keys.insert(node.to_owned(), rank.clone());
            self.ordered.insert(rank);
        }
    }

    /// Workers indexed.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether no worker is indexed.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The best-ranked worker that fits and qualifies for `demand`, building candidates only for the workers it
    /// visits (`candidate(id)`); `None` when the order cannot decide (then the caller scans everything).
    pub fn choose(
        &self,
        demand: &Demand,
        candidate: impl Fn(&str) -> Option<Candidate>,
    ) -> Option<Candidate> {
        if demand.direct.is_some()
            || demand.allowed.is_some()
            || self.policy == Policy::FirstFit
            || demand.need.vcpus == 0
        {
            return None;
        }
        let need = demand.need.memory_mib;
        let walk: Box<dyn Iterator<Item = &Rank>> = match self.policy {
            Policy::BestFit => Box::new(self.ordered.range(
                Rank {
                    memory: need,
                    vcpus: 0,
                    load: Load(i64::MIN),
                    name: String::new(),
                    id: String::new(),
                }..,
            )),
            _ => Box::new(self.ordered.iter()),
        };
        let none = Reservations::new();
        for rank in walk {
            if self.policy == Policy::Spread && u64::MAX - rank.memory < need {
                break; // Largest first: nothing further holds the demand's memory.
            }
            if demand.exclude.contains(&rank.id) {
                continue;
            }
            let Some(c) = candidate(&rank.id) else { continue };
            if sched::place(std::slice::from_ref(&c), demand, &none, self.policy).is_ok() {
                return Some(c);
            }
        }
        None
    }
}

/// The full scan: every worker through [`sched::place`].
pub fn full_scan(candidates: &[Candidate], demand: &Demand, policy: Policy) -> Result<Candidate, Refusal> {
    sched::place(candidates, demand, &Reservations::new(), policy).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn candidate(i: usize, memory: u64, vcpus: u64, cpu: f64, docker_only: bool) -> Candidate {
        let free = Capacity::new(vcpus, memory, 0);
        Candidate {
            id: format!("n{i:03}"),
            name: format!("host{}", i % 7),
            active: true,
            virtualization: if docker_only {
                vec!["docker".into()]
            } else {
                vec!["docker".into(), "unikernel".into()]
            },
            cpu_percent: cpu,
            total: free,
            per_arch: BTreeMap::from([("amd64".to_owned(), free)]),
            max_node: None,
            csi_drivers: Vec::new(),
            addons: Vec::new(),
        }
    }

    fn slot(c: &Candidate) -> Slot {
        Slot {
            free: c.total,
            cpu_percent: c.cpu_percent,
            name: c.name.clone(),
        }
    }

    fn demand(memory: u64, vcpus: u64, unikernel: bool) -> Demand {
        Demand {
            key: "j/0".into(),
            virtualization: if unikernel {
                "unikernel".into()
            } else {
                "docker".into()
            },
            need: Capacity::new(vcpus, memory, 0),
            ..Demand::default()
        }
    }

    proptest! {
        /// The index picks exactly what the full scan picks, for best-fit and spread.
        #[test]
        fn the_index_agrees_with_the_full_scan(
            nodes in proptest::collection::vec((0u64..8, 0u64..5, 0u8..4, any::<bool>()), 0..40),
            need in (0u64..6, 0u64..4, any::<bool>()),
            spread in any::<bool>(),
        ) {
            let candidates: Vec<Candidate> = nodes
                .iter()
                .enumerate()
                .map(|(i, (m, v, cpu, docker))| candidate(i, m * 512, *v, f64::from(*cpu), *docker))
                .collect();
            let policy = if spread { Policy::Spread } else { Policy::BestFit };
            let mut index = FreeIndex::new(policy);
            for c in &candidates {
                index.set(&c.id, Some(slot(c)));
            }
            let by_id: HashMap<&str, &Candidate> = candidates.iter().map(|c| (c.id.as_str(), c)).collect();
            let d = demand(need.0 * 512, need.1, need.2);
            let scanned = full_scan(&candidates, &d, policy).ok().map(|c| c.id);
            let indexed = index.choose(&d, |id| by_id.get(id).map(|c| (*c).clone())).map(|c| c.id);
            // The index may decline (then the caller scans), but never disagrees.
            if let Some(id) = &indexed {
                prop_assert_eq!(Some(id), scanned.as_ref());
            }
            if scanned.is_some() && d.need.vcpus > 0 {
                prop_assert!(indexed.is_some(), "a fitting node exists but the index found none");
            }
        }
    }

    #[test]
    fn updates_move_and_remove_nodes() {
        let mut index = FreeIndex::new(Policy::BestFit);
        let at = |memory: u64, vcpus: u64| Slot {
            free: Capacity::new(vcpus, memory, 0),
            cpu_percent: 0.0,
            name: "h".into(),
        };
        index.set("a", Some(at(1000, 2)));
        index.set("b", Some(at(3000, 2)));
        index.set("a", Some(at(4000, 2)));
        index.set("c", Some(at(3500, 0)));
        assert_eq!(index.len(), 2, "a worker without a free core is left out");
        let c = |id: &str| {
            let mem = if id == "a" { 4000 } else { 3000 };
            Some(candidate(usize::from(id == "b"), mem, 2, 0.0, true)).map(|mut c| {
                c.id = id.to_owned();
                c
            })
        };
        let d = demand(2500, 1, false);
        assert_eq!(index.choose(&d, c).unwrap().id, "b");
        index.set("b", None);
        assert_eq!(index.choose(&d, c).unwrap().id, "a");
        index.set("a", None);
        index.set("c", None);
        assert!(index.is_empty());
        assert!(index.choose(&d, c).is_none());
    }

    #[test]
    fn loads_order_like_total_cmp() {
        let xs = [-5.0, -0.0, 0.0, 0.5, 12.25, 100.0, f64::INFINITY];
        for w in xs.windows(2) {
            assert!(Load::new(w[0]) < Load::new(w[1]), "{} < {}", w[0], w[1]);
        }
    }
}
