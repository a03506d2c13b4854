//! The per-node free-capacity index placement reads: live workers ordered by (free memory, free vCPUs, id), so a
//! best-fit placement starts at the smallest node that can hold the demand and a spread placement at the largest,
//! instead of building a candidate for every worker under the state lock. Pure.
//!
//! The index only orders; the decision stays [`sched::place`]'s: the first node in policy order that qualifies and
//! fits, together with the nodes that tie with it on the ranked keys, go through `sched::place`, which breaks the tie
//! exactly as it would over all workers. Constraints the order cannot help with (`direct`, `clusters`, first-fit)
//! and refusals (to name the rule that left nothing) use the full scan.

use std::{
    collections::{BTreeSet, HashMap},
    ops::Bound,
};

use oakestra_protocol::sched::{self, Candidate, Capacity, Demand, Policy, Refusal, Reservations};

/// Live workers by free capacity.
#[derive(Debug, Default)]
pub struct FreeIndex {
    /// Node → its key in `ordered`.
    keys: HashMap<String, (u64, u64)>,
    /// (free memory MiB, free vCPUs, node id).
    ordered: BTreeSet<(u64, u64, String)>,
}

impl FreeIndex {
    /// Sets `node`'s free capacity; `None` takes it out (dead, forgotten).
    pub fn set(&mut self, node: &str, free: Option<Capacity>) {
        let key = free.map(|f| (f.memory_mib, f.vcpus));
        if self.keys.get(node).copied() == key {
            return;
        }
        if let Some((m, v)) = self.keys.remove(node) {
            self.ordered.remove(&(m, v, node.to_owned()));
        }
        if let Some((m, v)) = key {
            self.keys.insert(node.to_owned(), (m, v));
            self.ordered.insert((m, v, node.to_owned()));
        }
    }

    /// Nodes indexed.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether no node is indexed.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// Chooses a node for `demand` under `policy`, building candidates only for the nodes it visits
    /// (`candidate(id)`); `None` when the ordered walk cannot decide (then the caller scans everything).
    pub fn choose(
        &self,
        demand: &Demand,
        policy: Policy,
        candidate: impl Fn(&str) -> Option<Candidate>,
    ) -> Option<Candidate> {
        if demand.direct.is_some() || demand.allowed.is_some() || policy == Policy::FirstFit {
            return None;
        }
        let need = demand.need.memory_mib;
        let walk: Box<dyn Iterator<Item = &(u64, u64, String)>> = match policy {
            Policy::BestFit => Box::new(
                self.ordered
                    .range((Bound::Included((need, 0, String::new())), Bound::Unbounded)),
            ),
            _ => Box::new(self.ordered.iter().rev()),
        };
        let none = Reservations::new();
        let mut tied: Vec<Candidate> = Vec::new();
        let mut rank_key: Option<(u64, u64)> = None;
        for (memory, vcpus, id) in walk {
            if policy == Policy::Spread && *memory < need {
                break; // Descending: nothing further can hold the demand's memory.
            }
            if let Some((m, v)) = rank_key {
                // Best-fit ranks by leftover memory then vCPUs; spread by leftover memory only.
                let same = match policy {
                    Policy::BestFit => (*memory, *vcpus) == (m, v),
                    _ => *memory == m,
                };
                if !same {
                    break;
                }
            }
            if demand.exclude.contains(id) {
                continue;
            }
            let Some(c) = candidate(id) else { continue };
            if sched::place(std::slice::from_ref(&c), demand, &none, policy).is_ok() {
                rank_key.get_or_insert((*memory, *vcpus));
                tied.push(c);
            }
        }
        match sched::place(&tied, demand, &none, policy) {
            Ok(c) => Some(c.clone()),
            Err(_) => None,
        }
    }
}

/// Why the full scan found no node, or the node it found (for callers that fall back to it).
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
            let mut index = FreeIndex::default();
            for c in &candidates {
                index.set(&c.id, Some(c.total));
            }
            let by_id: HashMap<&str, &Candidate> = candidates.iter().map(|c| (c.id.as_str(), c)).collect();
            let policy = if spread { Policy::Spread } else { Policy::BestFit };
            let d = demand(need.0 * 512, need.1, need.2);
            let scanned = full_scan(&candidates, &d, policy).ok().map(|c| c.id);
            let indexed = index.choose(&d, policy, |id| by_id.get(id).map(|c| (*c).clone())).map(|c| c.id);
            // The index may decline (then the caller scans), but never disagrees.
            if let Some(id) = &indexed {
                prop_assert_eq!(Some(id), scanned.as_ref());
            }
            if scanned.is_some() {
                prop_assert!(indexed.is_some(), "a fitting node exists but the index found none");
            }
        }
    }

    #[test]
    fn updates_move_and_remove_nodes() {
        let mut index = FreeIndex::default();
        index.set("a", Some(Capacity::new(2, 1000, 0)));
        index.set("b", Some(Capacity::new(2, 3000, 0)));
        index.set("a", Some(Capacity::new(2, 4000, 0)));
        assert_eq!(index.len(), 2);
        let c = |id: &str| {
            let mem = if id == "a" { 4000 } else { 3000 };
            Some(candidate(usize::from(id == "b"), mem, 2, 0.0, true)).map(|mut c| {
                c.id = id.to_owned();
                c
            })
        };
        let d = demand(2500, 1, false);
        assert_eq!(index.choose(&d, Policy::BestFit, c).unwrap().id, "b");
        index.set("b", None);
        assert_eq!(index.choose(&d, Policy::BestFit, c).unwrap().id, "a");
        index.set("a", None);
        assert!(index.is_empty());
        assert!(index.choose(&d, Policy::BestFit, c).is_none());
    }
}
