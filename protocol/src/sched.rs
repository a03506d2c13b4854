//! The placement policy shared by both scheduling tiers: root picks a cluster, a cluster picks a worker.
//!
//! Pure rules: no I/O, no async, no clock reads (time arrives as `u64` milliseconds). The caller turns whatever it
//! knows about clusters or workers into [`Candidate`]s, the job into a [`Demand`] (see [`demand_from_job`] and
//! [`demand_from_job_for_node`]) and calls [`place`]. Capacity handed out but not yet visible in the reports is held
//! in [`Reservations`], so a burst of deployments does not overcommit one candidate (the reference has no such
//! bookkeeping, see `control-plane.md` §5.2).
//!
//! # The rules of [`place`]
//!
//! This is our deliberate policy. The reference ranks by a score whose comparator, as written, reduces to "lowest
//! `cpu_percent` wins"; we rank by fit instead and use the CPU load only to break ties.
//!
//! 1. Candidates whose id is in [`Demand::exclude`] (already tried for this demand) are ignored. If no remaining
//!    candidate is active the answer is [`Refusal::NoActiveCandidate`], unless a `direct` constraint applies (2).
//! 2. `direct` ([`Demand::direct`]): only candidates whose name is listed are considered. None exists →
//!    [`Refusal::DirectTargetNotFound`]; all of them are inactive → [`Refusal::DirectTargetNotActive`]; some
//!    qualify (4) but none has room (5) → [`Refusal::DirectTargetNoCapacity`].
//! 3. `clusters` ([`Demand::allowed`]): only active candidates whose name is listed are considered; none →
//!    [`Refusal::NoQualifiedCandidate`].
//! 4. Qualification, else [`Refusal::NoQualifiedCandidate`]: the candidate offers the demanded virtualization
//!    (`"container"` is `"docker"`, an empty demand means `"docker"`, case is ignored); every demanded CSI driver and
//!    addon; and, if the demand names architectures, at least one of them appears in [`Candidate::per_arch`]. A
//!    candidate without an architecture breakdown (`per_arch` empty) only qualifies for demands that name none.
//!    Architecture names compare case-insensitively, with `x86_64` = `amd64` and `aarch64` = `arm64`.
//! 5. Fit, else [`Refusal::NoCapacity`] (or [`Refusal::DirectTargetNoCapacity`] under `direct`): with
//!    `free = total − reserved` (saturating, per resource) we need `free ≥ need` on vCPUs, memory and GPUs. If the
//!    demand names architectures, at least one of them must also fit: `per_arch[arch] − reserved ≥ need`. The whole
//!    reservation of the candidate is subtracted there, as reservations do not record an architecture
//!    (conservative). If [`Candidate::max_node`] is known, `need ≤ max_node` per resource as well: a cluster of two
//!    2-core workers cannot host a 4-vCPU instance.
//! 6. Ranking among the candidates that fit, with `leftover = free − need`:
//!    - [`Policy::BestFit`] (default): smallest leftover memory, then smallest leftover vCPUs, then lowest
//!      `cpu_percent`, then name, then id. Packs instances tightly and keeps large candidates free for large demands.
//!    - [`Policy::Spread`]: largest leftover memory, then lowest `cpu_percent`, then name, then id.
//!    - [`Policy::FirstFit`]: the first fitting candidate in input order.
//!
//!    Every ranking is total, so the same inputs always give the same answer, whatever the input order (except
//!    for first-fit, whose answer *is* the input order) and even with duplicate names.
//!
//! Reservations count until they are released or [`Reservations::expire`] drops them: call `expire` with the
//! current time before placing.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
};

use serde_json::Value;

use crate::status::Status;

// === Capacity ==================================================================================================

/// An amount of compute: cores, memory and GPUs. Arithmetic saturates, never wraps or panics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// Logical CPU cores.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// GPU count.
    pub gpus: u64,
}

impl Capacity {
    /// Nothing at all.
    pub const ZERO: Capacity = Capacity::new(0, 0, 0);

    /// A capacity from its three resources.
    pub const fn new(vcpus: u64, memory_mib: u64, gpus: u64) -> Self {
        Capacity {
            vcpus,
            memory_mib,
            gpus,
        }
    }

    /// Per-resource sum, saturating at `u64::MAX`.
    #[must_use]
    pub const fn saturating_add(self, other: Capacity) -> Capacity {
        Capacity {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            gpus: self.gpus.saturating_add(other.gpus),
        }
    }

    /// Per-resource difference, saturating at 0.
    #[must_use]
    pub const fn saturating_sub(self, other: Capacity) -> Capacity {
        Capacity {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            gpus: self.gpus.saturating_sub(other.gpus),
        }
    }

    /// Whether `self` is no larger than `room` on every resource (a demand of `self` fits into `room`).
    pub const fn fits_in(self, room: Capacity) -> bool {
        self.vcpus <= room.vcpus && self.memory_mib <= room.memory_mib && self.gpus <= room.gpus
    }

    /// Whether every resource is 0.
    pub const fn is_zero(self) -> bool {
        self.vcpus == 0 && self.memory_mib == 0 && self.gpus == 0
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vcpus / {} MiB / {} gpus",
            self.vcpus, self.memory_mib, self.gpus
        )
    }
}

// === Candidates and demands ====================================================================================

/// A place an instance can go: a cluster (root tier) or a worker (cluster tier), as its latest report describes it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Candidate {
    /// Cluster id or worker id: what the decision names.
    pub id: String,
    /// Cluster name or worker hostname: what `direct` and `clusters` constraints name.
    pub name: String,
    /// Inactive candidates are never chosen; they only let `direct` report
    /// [`Refusal::DirectTargetNotActive`] instead of [`Refusal::DirectTargetNotFound`].
    pub active: bool,
    /// Runtimes offered (`"docker"`, `"unikernel"`, …); `"container"` counts as `"docker"`.
    pub virtualization: Vec<String>,
    /// Current CPU load in percent; only breaks ties.
    pub cpu_percent: f64,
    /// Total logical cores, *available* memory in MiB, GPU count.
    pub total: Capacity,
    /// The same per architecture (`"amd64"`, `"arm64"`, …). Empty: the breakdown is unknown.
    pub per_arch: BTreeMap<String, Capacity>,
    /// The largest single worker of a cluster, if the report says; an instance cannot span workers.
    pub max_node: Option<Capacity>,
    /// CSI drivers offered.
    pub csi_drivers: Vec<String>,
    /// Addons offered (worker `supported_addons`).
    pub addons: Vec<String>,
}

impl Candidate {
    /// The candidate as a scheduler plugin reads it from `GET /api/v1/resources` (the reference resource
    /// abstractor's fields), its name also under `name_field` (`cluster_name` at root, `node_name` at a cluster).
    pub fn resource_document(&self, name_field: &str) -> Value {
        serde_json::json!({
            "_id": self.id,
            "candidate_name": self.name,
            name_field: self.name,
            "active": self.active,
            "vcpus": self.total.vcpus,
            "memory": self.total.memory_mib,
            "vgpus": self.total.gpus,
            "cpu_percent": self.cpu_percent,
            "virtualization": self.virtualization,
            "csi_drivers": self.csi_drivers,
            "supported_addons": self.addons,
        })
    }
}

/// What one instance asks for, and the constraints on where it may go.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Demand {
    /// `"<job_id>/<instance_number>"`: the key of its reservation.
    pub key: String,
    /// `"docker"`, `"unikernel"`, …; `"container"` and `""` mean `"docker"`.
    pub virtualization: String,
    /// vCPUs, memory MiB and GPUs requested; 0 means no requirement.
    pub need: Capacity,
    /// Acceptable architectures; empty means any.
    pub arch: Vec<String>,
    /// CSI drivers the volumes need.
    pub csi_drivers: Vec<String>,
    /// Addons needed.
    pub addons: Vec<String>,
    /// A `direct` constraint: the candidate names allowed (an `"n1;n2"` list already split).
    pub direct: Option<Vec<String>>,
    /// A `clusters` constraint: allow-list of candidate names.
    pub allowed: Option<Vec<String>>,
    /// Candidate ids already tried for this demand; placing again falls back to the next best.
    pub exclude: Vec<String>,
}

// === Policy ====================================================================================================

/// How to choose among the candidates that fit. See the module documentation for the exact order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The tightest fit: least memory (then vCPUs) left over. `"best-fit"`.
    #[default]
    BestFit,
    /// The emptiest candidate: most memory left over. `"spread"`.
    Spread,
    /// The first candidate that fits, in input order. `"first-fit"`.
    FirstFit,
}

impl Policy {
    /// Every policy.
    pub const ALL: [Policy; 3] = [Policy::BestFit, Policy::Spread, Policy::FirstFit];

    /// The configuration spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Policy::BestFit => "best-fit",
            Policy::Spread => "spread",
            Policy::FirstFit => "first-fit",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy name was not one of `best-fit`, `spread`, `first-fit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {value:?} (expected best-fit, spread or first-fit)")]
pub struct UnknownPolicy {
    /// What was given.
    pub value: String,
}

impl FromStr for Policy {
    type Err = UnknownPolicy;
    /// Parses the configuration spelling; surrounding whitespace and case are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownPolicy { value: s.to_owned() })
    }
}

// === Refusal ===================================================================================================

/// Why [`place`] found no candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    /// No candidate (left after the exclusions) is active.
    #[error("no active candidate is left to place the instance on")]
    NoActiveCandidate,
    /// The `direct` constraint names no known candidate.
    #[error("the direct constraint names no known target")]
    DirectTargetNotFound,
    /// Every target the `direct` constraint names is inactive.
    #[error("every target of the direct constraint is inactive")]
    DirectTargetNotActive,
    /// The `direct` targets are active but none has room for the instance.
    #[error("no target of the direct constraint has enough free capacity")]
    DirectTargetNoCapacity,
    /// No active candidate meets the constraints (allow-list, virtualization, architecture, CSI drivers, addons).
    #[error(
        "no active candidate meets the constraints (allow-list, virtualization, architecture, CSI drivers, addons)"
    )]
    NoQualifiedCandidate,
    /// Some candidates qualify but none has room for the instance.
    #[error("no qualified candidate has enough free capacity")]
    NoCapacity,
}

impl Refusal {
    /// The instance status the root tier records when it cannot pick a cluster.
    pub const fn root_status(self) -> Status {
        match self {
            Refusal::NoActiveCandidate | Refusal::DirectTargetNotActive => Status::TargetClusterNotActive,
            Refusal::DirectTargetNotFound => Status::TargetClusterNotFound,
            Refusal::DirectTargetNoCapacity => Status::TargetClusterNoCapacity,
            Refusal::NoQualifiedCandidate | Refusal::NoCapacity => Status::NoActiveClusterWithCapacity,
        }
    }

    /// The instance status a cluster records when it cannot pick a worker.
    pub const fn cluster_status(self) -> Status {
        match self {
            Refusal::NoActiveCandidate | Refusal::NoQualifiedCandidate => Status::NoQualifiedWorkerFound,
            Refusal::DirectTargetNotFound | Refusal::DirectTargetNotActive => Status::NoNodeFound,
            Refusal::DirectTargetNoCapacity | Refusal::NoCapacity => Status::NoWorkerCapacity,
        }
    }
}

// === Reservations ==============================================================================================

/// Capacity promised to placed instances that the candidates' reports do not show yet.
///
/// Each reservation belongs to one candidate and is keyed by [`Demand::key`]; a key holds at most one reservation
/// (reserving it again moves it). Sums per candidate are kept up to date, so [`Reservations::reserved`] is one
/// lookup.
#[derive(Debug, Default, Clone)]
pub struct Reservations {
    /// Candidate id → its reservations.
    by_candidate: HashMap<String, Held>,
    /// Demand key → the candidate id holding it.
    holder: HashMap<String, String>,
}

/// The reservations on one candidate.
#[derive(Debug, Default, Clone)]
struct Held {
    /// Sum of `entries` (saturating).
    sum: Capacity,
    /// Demand key → reservation.
    entries: HashMap<String, Reservation>,
}

impl Held {
    fn recompute(&mut self) {
        self.sum = self
            .entries
            .values()
            .fold(Capacity::ZERO, |acc, r| acc.saturating_add(r.amount));
    }
}

/// One reservation.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    amount: Capacity,
    expires_at_ms: u64,
}

impl Reservations {
    /// No reservations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds `amount` on `candidate_id` for the demand `key` until `now_ms + ttl_ms` (or an earlier release).
    /// An existing reservation under the same key is replaced, wherever it was.
    pub fn reserve(&mut self, candidate_id: &str, key: &str, amount: Capacity, now_ms: u64, ttl_ms: u64) {
        self.release(key);
        let held = self.by_candidate.entry(candidate_id.to_owned()).or_default();
        held.entries.insert(
            key.to_owned(),
            Reservation {
                amount,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
            },
        );
        held.sum = held.sum.saturating_add(amount);
        self.holder.insert(key.to_owned(), candidate_id.to_owned());
    }

    /// Drops the reservation of `key` (its placement now shows in the reports, or the instance is gone). Returns
    /// whether there was one.
    pub fn release(&mut self, key: &str) -> bool {
        let Some(candidate_id) = self.holder.remove(key) else {
            return false;
        };
        if let Some(held) = self.by_candidate.get_mut(&candidate_id) {
            held.entries.remove(key);
            if held.entries.is_empty() {
                self.by_candidate.remove(&candidate_id);
            } else {
                held.recompute();
            }
        }
        true
    }

    /// Drops every reservation on `candidate_id` (the candidate is lost; its instances get rescheduled).
    pub fn release_candidate(&mut self, candidate_id: &str) {
        if let Some(held) = self.by_candidate.remove(candidate_id) {
            for key in held.entries.keys() {
                self.holder.remove(key);
            }
        }
    }

    /// Drops every reservation whose expiry is at or before `now_ms`; returns how many were dropped.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut dropped = 0;
        let holder = &mut self.holder;
        self.by_candidate.retain(|_, held| {
            let before = held.entries.len();
            held.entries.retain(|key, r| {
                let keep = r.expires_at_ms > now_ms;
                if !keep {
                    holder.remove(key);
                }
                keep
            });
            let gone = before - held.entries.len();
            if gone > 0 {
                dropped += gone;
                held.recompute();
            }
            !held.entries.is_empty()
        });
        dropped
    }

    /// The sum of the reservations on `candidate_id` (zero if none).
    pub fn reserved(&self, candidate_id: &str) -> Capacity {
        // Skips hashing the id in the common case of no reservations at all.
        if self.by_candidate.is_empty() {
            return Capacity::ZERO;
        }
        self.by_candidate
            .get(candidate_id)
            .map_or(Capacity::ZERO, |h| h.sum)
    }

    /// The candidate id holding the reservation of `key`, if any.
    pub fn holder(&self, key: &str) -> Option<&str> {
        self.holder.get(key).map(String::as_str)
    }

    /// The number of reservations.
    pub fn len(&self) -> usize {
        self.holder.len()
    }

    /// Whether there are no reservations.
    pub fn is_empty(&self) -> bool {
        self.holder.is_empty()
    }
}

// === Placement =================================================================================================

/// Picks the candidate for `demand` by the rules in the module documentation, counting `reservations` as used.
///
/// The caller usually reserves `demand.need` on the answer right away ([`Reservations::reserve`]).
///
/// # Errors
///
/// A [`Refusal`] saying why nothing fits; [`Refusal::root_status`] and [`Refusal::cluster_status`] turn it into
/// the instance status to record.
pub fn place<'a>(
    candidates: &'a [Candidate],
    demand: &Demand,
    reservations: &Reservations,
    policy: Policy,
) -> Result<&'a Candidate, Refusal> {
    // Counters of the candidates surviving each rule, to name the first rule that left nothing.
    let mut named = 0usize;
    let mut active = 0usize;
    let mut qualified = 0usize;
    let mut best: Option<(&'a Candidate, Capacity)> = None;
    let runtime = demanded_runtime(&demand.virtualization);

    for c in candidates {
        if demand.exclude.contains(&c.id) {
            continue;
        }
        if let Some(direct) = &demand.direct
            && !direct.contains(&c.name)
        {
            continue;
        }
        named += 1;
        if !c.active {
            continue;
        }
        active += 1;
        if let Some(allowed) = &demand.allowed
            && !allowed.contains(&c.name)
        {
            continue;
        }
        if !qualifies(c, demand, runtime) {
            continue;
        }
        qualified += 1;
        let Some(leftover) = fit(c, demand, reservations.reserved(&c.id)) else {
            continue;
        };
        if policy == Policy::FirstFit {
            return Ok(c);
        }
        let better = match best {
            None => true,
            Some((b, b_left)) => rank(policy, c, leftover, b, b_left) == Ordering::Less,
        };
        if better {
            best = Some((c, leftover));
        }
    }

    if let Some((c, _)) = best {
        return Ok(c);
    }
    let direct = demand.direct.is_some();
    Err(if direct && named == 0 {
        Refusal::DirectTargetNotFound
    } else if direct && active == 0 {
        Refusal::DirectTargetNotActive
    } else if active == 0 {
        Refusal::NoActiveCandidate
    } else if qualified == 0 {
        Refusal::NoQualifiedCandidate
    } else if direct {
        Refusal::DirectTargetNoCapacity
    } else {
        Refusal::NoCapacity
    })
}

/// Rule 4: virtualization (`runtime` is the demand's, normalised), CSI drivers, addons and architecture.
fn qualifies(c: &Candidate, d: &Demand, runtime: &str) -> bool {
    if !c
        .virtualization
        .iter()
        .any(|v| offered_runtime(v).eq_ignore_ascii_case(runtime))
    {
        return false;
    }
    let offers = |have: &[String], want: &String| want.is_empty() || have.contains(want);
    if !d.csi_drivers.iter().all(|w| offers(&c.csi_drivers, w)) {
        return false;
    }
    if !d.addons.iter().all(|w| offers(&c.addons, w)) {
        return false;
    }
    d.arch.is_empty()
        || d.arch
            .iter()
            .any(|want| c.per_arch.keys().any(|have| same_arch(have, want)))
}

/// Rule 5: the leftover capacity after placing `d` on `c`, or `None` if it does not fit.
fn fit(c: &Candidate, d: &Demand, reserved: Capacity) -> Option<Capacity> {
    let free = c.total.saturating_sub(reserved);
    if !d.need.fits_in(free) {
        return None;
    }
    if let Some(max) = c.max_node
        && !d.need.fits_in(max)
    {
        return None;
    }
    if !d.arch.is_empty() {
        let arch_fits = d.arch.iter().any(|want| {
            c.per_arch
                .iter()
                .any(|(have, cap)| same_arch(have, want) && d.need.fits_in(cap.saturating_sub(reserved)))
        });
        if !arch_fits {
            return None;
        }
    }
    Some(free.saturating_sub(d.need))
}

/// Rule 6: `Less` when `a` (with leftover `a_left`) ranks before `b`.
fn rank(policy: Policy, a: &Candidate, a_left: Capacity, b: &Candidate, b_left: Capacity) -> Ordering {
    let by_load = || a.cpu_percent.total_cmp(&b.cpu_percent);
    let by_name = || a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id));
    match policy {
        Policy::BestFit => a_left
            .memory_mib
            .cmp(&b_left.memory_mib)
            .then(a_left.vcpus.cmp(&b_left.vcpus))
            .then_with(by_load)
            .then_with(by_name),
        Policy::Spread => b_left
            .memory_mib
            .cmp(&a_left.memory_mib)
            .then_with(by_load)
            .then_with(by_name),
        // Not reached (first-fit returns the first fit); input order keeps the earlier candidate.
        Policy::FirstFit => Ordering::Greater,
    }
}

/// A demanded runtime: `"container"` and `""` are `"docker"`.
fn demanded_runtime(v: &str) -> &str {
    let t = v.trim();
    if t.is_empty() {
        "docker"
    } else {
        offered_runtime(t)
    }
}

/// An offered runtime: `"container"` is `"docker"`.
fn offered_runtime(v: &str) -> &str {
    let t = v.trim();
    if t.eq_ignore_ascii_case("container") {
        "docker"
    } else {
        t
    }
}

/// Architecture names compare case-insensitively, with the kernel spellings of the two common ones accepted.
fn same_arch(a: &str, b: &str) -> bool {
    fn canonical(s: &str) -> &str {
        let t = s.trim();
        if t.eq_ignore_ascii_case("x86_64") || t.eq_ignore_ascii_case("x86-64") {
            "amd64"
        } else if t.eq_ignore_ascii_case("aarch64") {
            "arm64"
        } else {
            t
        }
    }
    canonical(a).eq_ignore_ascii_case(canonical(b))
}

// === Demands from Oakestra job JSON =============================================================================

/// Reads the [`Demand`] of one instance of an Oakestra job (or SLA microservice) for the **root** tier, leniently.
///
/// - `virtualization`: a string (`"container"` → `"docker"`); missing → `"docker"`.
/// - `vcpus`, `memory` (MiB), `vgpus`: numbers or numeric strings; fractions round up (half a core needs a
///   core to exist); negative, missing or garbage → 0.
/// - `arch`: an array of strings (a single string is accepted).
/// - `volumes[].csi_driver`: the CSI drivers needed (non-empty, deduplicated).
/// - `constraints[]`: `{"type":"direct","cluster":"c1;c2"}` → [`Demand::direct`] (split on `;`, trimmed, empties
///   dropped; a direct constraint without `cluster` places anywhere); `{"type":"clusters","allowed":[…]}` →
///   [`Demand::allowed`]; `{"type":"addons","needs":[…]}` → [`Demand::addons`]. Other constraint types
///   (`latency`, `geo`, …) are ignored.
///
/// `key` becomes [`Demand::key`]; [`Demand::exclude`] starts empty.
pub fn demand_from_job(job: &Value, key: String) -> Demand {
    demand_for(job, key, Tier::Root)
}

/// Like [`demand_from_job`], for the **cluster** tier: `direct` reads the constraint's `node` list (worker
/// hostnames) instead of `cluster`, and `clusters` allow-lists are ignored (they name clusters, not workers; root
/// already applied them).
pub fn demand_from_job_for_node(job: &Value, key: String) -> Demand {
    demand_for(job, key, Tier::Cluster)
}

/// Which tier a demand is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Root,
    Cluster,
}

fn demand_for(job: &Value, key: String, tier: Tier) -> Demand {
    let virtualization = match job.get("virtualization").and_then(Value::as_str) {
        Some(v) if !v.trim().is_empty() => demanded_runtime(v).to_owned(),
        _ => "docker".to_owned(),
    };
    let need = Capacity {
        vcpus: quantity(job.get("vcpus")),
        memory_mib: quantity(job.get("memory")),
        gpus: quantity(job.get("vgpus")),
    };
    let mut csi_drivers = Vec::new();
    for vol in job.get("volumes").and_then(Value::as_array).into_iter().flatten() {
        if let Some(d) = vol.get("csi_driver").and_then(Value::as_str) {
            push_unique(&mut csi_drivers, d);
        }
    }
    let mut demand = Demand {
        key,
        virtualization,
        need,
        arch: strings(job.get("arch")),
        csi_drivers,
        ..Demand::default()
    };
    let direct_field = match tier {
        Tier::Root => "cluster",
        Tier::Cluster => "node",
    };
    for c in job
        .get("constraints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match c.get("type").and_then(Value::as_str).map(str::trim) {
            Some("direct") => {
                let names: Vec<String> = match c.get(direct_field) {
                    Some(Value::String(s)) => s
                        .split(';')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    other => strings(other),
                };
                if !names.is_empty() {
                    let list = demand.direct.get_or_insert_with(Vec::new);
                    for n in &names {
                        push_unique(list, n);
                    }
                }
            }
            Some("clusters") if tier == Tier::Root => {
                let list = demand.allowed.get_or_insert_with(Vec::new);
                for n in strings(c.get("allowed")) {
                    push_unique(list, &n);
                }
            }
            Some("addons") => {
                for n in strings(c.get("needs")) {
                    push_unique(&mut demand.addons, &n);
                }
            }
            _ => {}
        }
    }
    demand
}

/// A resource amount: a non-negative number or numeric string, rounded up; anything else is 0.
fn quantity(v: Option<&Value>) -> u64 {
    let x = match v {
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                return u;
            }
            n.as_f64()
        }
        Some(Value::String(s)) => {
            let t = s.trim();
            match t.parse::<u64>() {
                Ok(u) => return u,
                Err(_) => t.parse::<f64>().ok(),
            }
        }
        _ => None,
    };
    match x {
        Some(x) if x.is_finite() && x > 0.0 => ceil_to_u64(x),
        _ => 0,
    }
}

/// `ceil(x)` for a finite positive `x`, saturating at `u64::MAX`.
fn ceil_to_u64(x: f64) -> u64 {
    // 2^64 as a float; every float below it converts exactly after `ceil`.
    const LIMIT: f64 = 18_446_744_073_709_551_616.0;
    let c = x.ceil();
    if c >= LIMIT {
        u64::MAX
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "integral, positive and below 2^64, checked above"
        )]
        let u = c as u64;
        u
    }
}

/// An array of strings (non-strings and empties skipped, trimmed, deduplicated), or a single string.
fn strings(v: Option<&Value>) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Some(Value::String(s)) => push_unique(&mut out, s),
        Some(Value::Array(items)) => {
            for s in items.iter().filter_map(Value::as_str) {
                push_unique(&mut out, s);
            }
        }
        _ => {}
    }
    out
}

/// Appends `s` trimmed unless it is empty or already present.
fn push_unique(list: &mut Vec<String>, s: &str) {
    let t = s.trim();
    if !t.is_empty() && !list.iter().any(|x| x == t) {
        list.push(t.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// An active docker candidate with an amd64 breakdown equal to its total.
    fn cand(id: &str, vcpus: u64, memory_mib: u64) -> Candidate {
        let total = Capacity::new(vcpus, memory_mib, 0);
        Candidate {
            id: id.to_owned(),
            name: format!("name-{id}"),
            active: true,
            virtualization: vec!["docker".to_owned()],
            cpu_percent: 10.0,
            total,
            per_arch: BTreeMap::from([("amd64".to_owned(), total)]),
            ..Candidate::default()
        }
    }

    fn demand(vcpus: u64, memory_mib: u64) -> Demand {
        Demand {
            key: "job/0".to_owned(),
            virtualization: "docker".to_owned(),
            need: Capacity::new(vcpus, memory_mib, 0),
            ..Demand::default()
        }
    }

    fn pick(cands: &[Candidate], d: &Demand) -> Result<String, Refusal> {
        place(cands, d, &Reservations::new(), Policy::BestFit).map(|c| c.id.clone())
    }

    #[test]
    fn capacity_arithmetic_saturates() {
        let a = Capacity::new(2, 100, 1);
        let b = Capacity::new(3, 50, 0);
        assert_eq!(a.saturating_sub(b), Capacity::new(0, 50, 1));
        assert_eq!(
            Capacity::new(u64::MAX, 1, 1).saturating_add(a),
            Capacity::new(u64::MAX, 101, 2)
        );
        assert!(Capacity::new(2, 100, 1).fits_in(a));
        assert!(!Capacity::new(2, 101, 1).fits_in(a));
        assert!(Capacity::ZERO.is_zero() && !a.is_zero());
        assert_eq!(a.to_string(), "2 vcpus / 100 MiB / 1 gpus");
    }

    #[test]
    fn virtualization_must_be_offered() {
        let mut uni = cand("u", 4, 4096);
        uni.virtualization = vec!["unikernel".to_owned()];
        let mut cont = cand("c", 4, 4096);
        cont.virtualization = vec!["container".to_owned()];
        let cands = [uni, cont];
        // "container" on either side is docker.
        assert_eq!(pick(&cands, &demand(1, 100)).unwrap(), "c");
        let mut d = demand(1, 100);
        d.virtualization = "container".to_owned();
        assert_eq!(pick(&cands, &d).unwrap(), "c");
        d.virtualization = "unikernel".to_owned();
        assert_eq!(pick(&cands, &d).unwrap(), "u");
        d.virtualization = "wasm".to_owned();
        assert_eq!(pick(&cands, &d), Err(Refusal::NoQualifiedCandidate));
    }

    #[test]
    fn vcpus_memory_and_gpus_must_fit() {
        let mut gpu = cand("gpu", 8, 8192);
        gpu.total.gpus = 1;
        let cands = [cand("small", 1, 512), gpu];
        assert_eq!(pick(&cands, &demand(1, 512)).unwrap(), "small");
        assert_eq!(pick(&cands, &demand(2, 512)).unwrap(), "gpu");
        assert_eq!(pick(&cands, &demand(1, 513)).unwrap(), "gpu");
        let mut d = demand(1, 100);
        d.need.gpus = 1;
        assert_eq!(pick(&cands, &d).unwrap(), "gpu");
        d.need.gpus = 2;
        assert_eq!(pick(&cands, &d), Err(Refusal::NoCapacity));
        assert_eq!(pick(&cands, &demand(9, 1)), Err(Refusal::NoCapacity));
        assert_eq!(pick(&cands, &demand(1, 8193)), Err(Refusal::NoCapacity));
    }

    #[test]
    fn arch_follows_the_per_arch_breakdown() {
        let mut arm_only = cand("arm", 16, 16_384);
        arm_only.per_arch = BTreeMap::from([("arm64".to_owned(), arm_only.total)]);
        let mut mixed = cand("mixed", 6, 6144);
        mixed.per_arch = BTreeMap::from([
            ("amd64".to_owned(), Capacity::new(2, 2048, 0)),
            ("arm64".to_owned(), Capacity::new(4, 4096, 0)),
        ]);
        let mut unknown = cand("unknown", 64, 65_536);
        unknown.per_arch.clear();

        let mut amd = demand(1, 1024);
        amd.arch = vec!["amd64".to_owned()];
        // amd64 never goes to the arm64-only cluster, nor to the one whose breakdown is unknown.
        assert_eq!(
            pick(&[arm_only.clone(), mixed.clone(), unknown.clone()], &amd).unwrap(),
            "mixed"
        );
        assert_eq!(
            pick(&[arm_only.clone(), unknown.clone()], &amd),
            Err(Refusal::NoQualifiedCandidate)
        );
        // The mixed cluster's amd64 part is too small for 3 vcpus although its total has 6.
        amd.need = Capacity::new(3, 1024, 0);
        assert_eq!(pick(&[mixed.clone()], &amd), Err(Refusal::NoCapacity));

        // Enough arm64 capacity in the mixed cluster: it gets the arm64 job (best fit over the arm-only one).
        let mut arm = demand(4, 4000);
        arm.arch = vec!["arm64".to_owned()];
        assert_eq!(pick(&[arm_only.clone(), mixed.clone()], &arm).unwrap(), "mixed");
        arm.need.memory_mib = 4097;
        assert_eq!(pick(&[arm_only.clone(), mixed.clone()], &arm).unwrap(), "arm");
        // Any of several architectures will do; kernel spellings are accepted.
        let mut either = demand(1, 100);
        either.arch = vec!["riscv64".to_owned(), "aarch64".to_owned()];
        assert_eq!(pick(&[arm_only.clone()], &either).unwrap(), "arm");
        // No arch demanded: the unknown breakdown is fine.
        assert_eq!(pick(&[unknown], &demand(1, 100)).unwrap(), "unknown");
    }

    #[test]
    fn max_node_bounds_a_single_instance() {
        let mut two_by_two = cand("2x2", 4, 8192);
        two_by_two.max_node = Some(Capacity::new(2, 4096, 0));
        let cands = [two_by_two.clone()];
        assert_eq!(pick(&cands, &demand(4, 100)), Err(Refusal::NoCapacity));
        assert_eq!(pick(&cands, &demand(1, 5000)), Err(Refusal::NoCapacity));
        assert_eq!(pick(&cands, &demand(2, 4096)).unwrap(), "2x2");
        let big = cand("big", 4, 8192);
        assert_eq!(pick(&[two_by_two, big], &demand(4, 100)).unwrap(), "big");
    }

    #[test]
    fn direct_constraint() {
        let mut off = cand("off", 8, 8192);
        off.active = false;
        let cands = [cand("a", 8, 8192), cand("b", 1, 100), off];
        let mut d = demand(1, 100);
        // Best fit alone would pick b: naming a proves that direct restricts.
        d.direct = Some(vec!["name-a".to_owned()]);
        assert_eq!(pick(&cands, &d).unwrap(), "a");
        d.direct = Some(vec!["nope".to_owned(), "name-b".to_owned()]);
        assert_eq!(pick(&cands, &d).unwrap(), "b");
        d.direct = Some(vec!["nope".to_owned()]);
        assert_eq!(pick(&cands, &d), Err(Refusal::DirectTargetNotFound));
        d.direct = Some(vec!["name-off".to_owned()]);
        assert_eq!(pick(&cands, &d), Err(Refusal::DirectTargetNotActive));
        d.direct = Some(vec!["name-b".to_owned(), "name-off".to_owned()]);
        d.need = Capacity::new(2, 100, 0);
        assert_eq!(pick(&cands, &d), Err(Refusal::DirectTargetNoCapacity));
        // Without direct the same demand fits elsewhere.
        d.direct = None;
        assert_eq!(pick(&cands, &d).unwrap(), "a");
    }

    #[test]
    fn no_active_candidate() {
        let mut off = cand("off", 8, 8192);
        off.active = false;
        assert_eq!(pick(&[], &demand(1, 1)), Err(Refusal::NoActiveCandidate));
        assert_eq!(
            pick(&[off.clone()], &demand(1, 1)),
            Err(Refusal::NoActiveCandidate)
        );
        // Excluding the only active one leaves none.
        let mut d = demand(1, 1);
        d.exclude = vec!["a".to_owned()];
        assert_eq!(pick(&[off, cand("a", 1, 1)], &d), Err(Refusal::NoActiveCandidate));
    }

    #[test]
    fn allowed_list_restricts_by_name() {
        let cands = [cand("a", 8, 8192), cand("b", 2, 1024), cand("c", 4, 4096)];
        let mut d = demand(1, 100);
        assert_eq!(pick(&cands, &d).unwrap(), "b");
        d.allowed = Some(vec!["name-a".to_owned(), "name-c".to_owned()]);
        assert_eq!(pick(&cands, &d).unwrap(), "c");
        d.allowed = Some(vec!["elsewhere".to_owned()]);
        assert_eq!(pick(&cands, &d), Err(Refusal::NoQualifiedCandidate));
    }

    #[test]
    fn csi_drivers_and_addons_must_be_offered() {
        let mut rich = cand("rich", 8, 8192);
        rich.csi_drivers = vec!["csi.nfs".to_owned(), "csi.ceph".to_owned()];
        rich.addons = vec!["flops".to_owned()];
        let cands = [cand("plain", 2, 1024), rich];
        let mut d = demand(1, 100);
        d.csi_drivers = vec![String::new()]; // an empty driver name is no requirement
        assert_eq!(pick(&cands, &d).unwrap(), "plain");
        d.csi_drivers = vec!["csi.nfs".to_owned()];
        assert_eq!(pick(&cands, &d).unwrap(), "rich");
        d.csi_drivers = vec!["csi.nfs".to_owned(), "csi.other".to_owned()];
        assert_eq!(pick(&cands, &d), Err(Refusal::NoQualifiedCandidate));
        d.csi_drivers.clear();
        d.addons = vec!["flops".to_owned()];
        assert_eq!(pick(&cands, &d).unwrap(), "rich");
        d.addons = vec!["mesh".to_owned()];
        assert_eq!(pick(&cands, &d), Err(Refusal::NoQualifiedCandidate));
    }

    #[test]
    fn reservations_steer_a_burst_and_release_restores() {
        let cands = [cand("a", 2, 1000), cand("b", 4, 4000)];
        let mut res = Reservations::new();
        let first = demand(1, 800);
        let chosen = place(&cands, &first, &res, Policy::BestFit).unwrap();
        assert_eq!(chosen.id, "a");
        res.reserve(&chosen.id, &first.key, first.need, 1_000, 5_000);
        assert_eq!(res.reserved("a"), Capacity::new(1, 800, 0));
        assert_eq!(
            (res.len(), res.is_empty(), res.holder("job/0")),
            (1, false, Some("a"))
        );

        let mut second = demand(1, 800);
        second.key = "job/1".to_owned();
        assert_eq!(place(&cands, &second, &res, Policy::BestFit).unwrap().id, "b");

        assert!(res.release("job/0"));
        assert!(!res.release("job/0"));
        assert_eq!(res.reserved("a"), Capacity::ZERO);
        assert!(res.is_empty());
        assert_eq!(place(&cands, &second, &res, Policy::BestFit).unwrap().id, "a");
    }

    #[test]
    fn reservations_expire_and_move() {
        let mut res = Reservations::new();
        res.reserve("a", "j/0", Capacity::new(1, 100, 0), 0, 1_000);
        res.reserve("a", "j/1", Capacity::new(2, 200, 0), 0, 3_000);
        res.reserve("b", "j/2", Capacity::new(1, 50, 1), 0, 2_000);
        assert_eq!(res.reserved("a"), Capacity::new(3, 300, 0));
        assert_eq!(res.expire(999), 0);
        assert_eq!(res.expire(2_000), 2);
        assert_eq!(res.reserved("a"), Capacity::new(2, 200, 0));
        assert_eq!(res.reserved("b"), Capacity::ZERO);
        assert_eq!(res.len(), 1);
        // Reserving the same key again moves it.
        res.reserve("b", "j/1", Capacity::new(1, 10, 0), 2_000, 1_000);
        assert_eq!(res.reserved("a"), Capacity::ZERO);
        assert_eq!(res.reserved("b"), Capacity::new(1, 10, 0));
        assert_eq!(res.len(), 1);
        // Losing a candidate drops its reservations.
        res.reserve("b", "j/3", Capacity::new(1, 10, 0), 2_000, 1_000);
        res.reserve("c", "j/4", Capacity::new(1, 10, 0), 2_000, 1_000);
        res.release_candidate("b");
        assert_eq!(res.reserved("b"), Capacity::ZERO);
        assert_eq!(
            (res.len(), res.holder("j/3"), res.holder("j/4")),
            (1, None, Some("c"))
        );
        assert_eq!(res.expire(u64::MAX), 1);
        assert!(res.is_empty());
    }

    #[test]
    fn exclude_falls_back_to_the_next_candidate() {
        let cands = [cand("a", 8, 8192), cand("b", 2, 1024), cand("c", 4, 4096)];
        let mut d = demand(1, 100);
        let mut order = Vec::new();
        while let Ok(id) = pick(&cands, &d) {
            order.push(id.clone());
            d.exclude.push(id);
        }
        assert_eq!(order, ["b", "c", "a"]);
        assert_eq!(pick(&cands, &d), Err(Refusal::NoActiveCandidate));
    }

    #[test]
    fn best_fit_packs_spread_spreads_first_fit_keeps_order() {
        let cands = [
            cand("mid", 4, 4096),
            cand("big", 16, 16_384),
            cand("tight", 2, 1024),
        ];
        let d = demand(1, 1000);
        let r = Reservations::new();
        assert_eq!(place(&cands, &d, &r, Policy::BestFit).unwrap().id, "tight");
        assert_eq!(place(&cands, &d, &r, Policy::Spread).unwrap().id, "big");
        assert_eq!(place(&cands, &d, &r, Policy::FirstFit).unwrap().id, "mid");
        // Equal memory: best fit takes fewer leftover vcpus; spread the lower cpu load.
        let mut a = cand("a", 8, 2048);
        let mut b = cand("b", 2, 2048);
        a.cpu_percent = 5.0;
        b.cpu_percent = 50.0;
        let pair = [a, b];
        assert_eq!(place(&pair, &d, &r, Policy::BestFit).unwrap().id, "b");
        assert_eq!(place(&pair, &d, &r, Policy::Spread).unwrap().id, "a");
    }

    #[test]
    fn ties_break_on_cpu_then_name_then_id_whatever_the_order() {
        let mut x = cand("x", 2, 2048);
        let mut y = cand("y", 2, 2048);
        let mut z = cand("z", 2, 2048);
        x.cpu_percent = 30.0;
        y.cpu_percent = 20.0;
        z.cpu_percent = 20.0;
        // Same name for y and z: the id decides.
        y.name = "same".to_owned();
        z.name = "same".to_owned();
        let d = demand(1, 100);
        let r = Reservations::new();
        for policy in [Policy::BestFit, Policy::Spread] {
            for order in [[&x, &y, &z], [&z, &y, &x], [&y, &x, &z], [&z, &x, &y]] {
                let cands: Vec<Candidate> = order.into_iter().cloned().collect();
                assert_eq!(place(&cands, &d, &r, policy).unwrap().id, "y", "{policy}");
            }
        }
        // Lower cpu first: x wins once it is the least loaded.
        x.cpu_percent = 1.0;
        assert_eq!(place(&[y, z, x], &d, &r, Policy::BestFit).unwrap().id, "x");
    }

    #[test]
    fn statuses_follow_the_tier() {
        use Refusal::*;
        let want = [
            (
                NoActiveCandidate,
                Status::TargetClusterNotActive,
                Status::NoQualifiedWorkerFound,
            ),
            (
                DirectTargetNotFound,
                Status::TargetClusterNotFound,
                Status::NoNodeFound,
            ),
            (
                DirectTargetNotActive,
                Status::TargetClusterNotActive,
                Status::NoNodeFound,
            ),
            (
                DirectTargetNoCapacity,
                Status::TargetClusterNoCapacity,
                Status::NoWorkerCapacity,
            ),
            (
                NoQualifiedCandidate,
                Status::NoActiveClusterWithCapacity,
                Status::NoQualifiedWorkerFound,
            ),
            (
                NoCapacity,
                Status::NoActiveClusterWithCapacity,
                Status::NoWorkerCapacity,
            ),
        ];
        for (r, root, cluster) in want {
            assert_eq!(r.root_status(), root, "{r:?}");
            assert_eq!(r.cluster_status(), cluster, "{r:?}");
            assert!(r.root_status().is_negative_scheduling());
            assert!(r.cluster_status().is_negative_scheduling());
            assert!(Status::Requested.can_transition(r.root_status()), "{r:?}");
            assert!(
                Status::ClusterScheduled.can_transition(r.cluster_status()),
                "{r:?}"
            );
            assert!(!r.to_string().is_empty());
        }
        assert_eq!(
            NoCapacity.to_string(),
            "no qualified candidate has enough free capacity"
        );
    }

    #[test]
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        assert_eq!(" Best-Fit ".parse::<Policy>(), Ok(Policy::BestFit));
        assert_eq!(Policy::default(), Policy::BestFit);
        let err = "random".parse::<Policy>().unwrap_err();
        assert_eq!(err.value, "random");
        assert!(err.to_string().contains("best-fit"));
    }

    fn microservices(fixture: &str) -> Vec<Value> {
        let v: Value = serde_json::from_str(fixture).unwrap();
        let mut out: Vec<Value> = v["microservices"].as_array().cloned().unwrap_or_default();
        for app in v["applications"].as_array().into_iter().flatten() {
            out.extend(app["microservices"].as_array().cloned().unwrap_or_default());
        }
        out
    }

    #[test]
    fn demands_from_the_seed_examples() {
        let fixtures = [
            include_str!("../tests/fixtures/seed-clientsrvr.json"),
            include_str!("../tests/fixtures/seed-constraints.json"),
            include_str!("../tests/fixtures/seed-dashboard-nginx.json"),
            include_str!("../tests/fixtures/seed-release-ipv6.json"),
            include_str!("../tests/fixtures/seed-release-oneshot.json"),
            include_str!("../tests/fixtures/seed-release-unikernel.json"),
            include_str!("../tests/fixtures/seed-unikernel.json"),
        ];
        let mut count = 0;
        for f in fixtures {
            for ms in microservices(f) {
                let d = demand_from_job(&ms, format!("job{count}/0"));
                assert_eq!(d.key, format!("job{count}/0"));
                assert!(d.need.memory_mib > 0 && d.need.vcpus > 0, "{ms}");
                let want = if ms["virtualization"] == "unikernel" {
                    "unikernel"
                } else {
                    "docker"
                };
                assert_eq!(d.virtualization, want);
                count += 1;
            }
        }
        assert_eq!(count, 9);

        let edge = microservices(fixtures[1]);
        let detector = demand_from_job(&edge[0], "d/0".to_owned());
        assert_eq!(detector.need, Capacity::new(1, 100, 1));
        assert_eq!(detector.direct, Some(vec!["gpu".to_owned()]));
        assert_eq!(detector.allowed, None);
        let on_node = demand_from_job_for_node(&edge[0], "d/0".to_owned());
        assert_eq!(
            on_node.direct,
            Some(vec!["xavier1".to_owned(), "xavier2".to_owned()])
        );
        let collector = demand_from_job(&edge[1], "c/0".to_owned());
        assert_eq!(collector.need, Capacity::new(1, 50, 0));
        assert_eq!(
            collector.allowed,
            Some(vec!["cluster1".to_owned(), "cluster2".to_owned()])
        );
        assert_eq!(collector.direct, None);
        // The cluster tier ignores allow-lists of clusters.
        assert_eq!(demand_from_job_for_node(&edge[1], "c/0".to_owned()).allowed, None);

        let uni = demand_from_job(&microservices(fixtures[5])[0], "u/0".to_owned());
        assert_eq!(
            (uni.virtualization.as_str(), uni.need.memory_mib),
            ("unikernel", 400)
        );
        assert_eq!(uni.arch, ["amd64"]);
    }

    #[test]
    fn demand_from_job_is_lenient() {
        let job = json!({
            "vcpus": "2.5", "memory": -5, "vgpus": "lots",
            "arch": "arm64",
            "volumes": [{"csi_driver": "csi.nfs"}, {"csi_driver": "csi.nfs"}, {"csi_driver": ""}, {"mount_path": "/x"}],
            "constraints": [
                {"type": "direct", "cluster": " c1; ;c2 ;", "node": ""},
                {"type": "addons", "needs": ["flops", 3, "flops"]},
                {"type": "latency", "threshold": 10},
                "garbage"
            ]
        });
        let d = demand_from_job(&job, "j/1".to_owned());
        assert_eq!(d.virtualization, "docker");
        assert_eq!(d.need, Capacity::new(3, 0, 0));
        assert_eq!(d.arch, ["arm64"]);
        assert_eq!(d.csi_drivers, ["csi.nfs"]);
        assert_eq!(d.direct, Some(vec!["c1".to_owned(), "c2".to_owned()]));
        assert_eq!(d.addons, ["flops"]);
        assert!(d.exclude.is_empty());
        // An empty `node` list means any node of the cluster.
        assert_eq!(demand_from_job_for_node(&job, "j/1".to_owned()).direct, None);

        let d = demand_from_job(
            &json!({"virtualization": "container", "memory": 1e30, "vcpus": 0.25, "vgpus": null}),
            String::new(),
        );
        assert_eq!(d.virtualization, "docker");
        assert_eq!(d.need, Capacity::new(1, u64::MAX, 0));
        let d = demand_from_job(&json!("not an object"), String::new());
        assert_eq!((d.virtualization.as_str(), d.need), ("docker", Capacity::ZERO));
    }

    /// A candidate generated from small numbers, so collisions and ties are frequent.
    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        (
            0u8..12,
            any::<bool>(),
            0u8..3,
            0u64..8,
            0u64..8,
            0u64..3,
            prop::option::of((1u64..8, 1u64..8)),
            0u8..4,
            0u8..101,
        )
            .prop_map(|(n, active, virt, vcpus, mem, gpus, max, arch, cpu)| {
                let total = Capacity::new(vcpus, mem * 512, gpus);
                let per_arch = match arch {
                    0 => BTreeMap::new(),
                    1 => BTreeMap::from([("amd64".to_owned(), total)]),
                    2 => BTreeMap::from([("arm64".to_owned(), total)]),
                    _ => BTreeMap::from([
                        ("amd64".to_owned(), Capacity::new(vcpus / 2, mem * 256, 0)),
                        (
                            "arm64".to_owned(),
                            Capacity::new(vcpus - vcpus / 2, mem * 256, gpus),
                        ),
                    ]),
                };
                Candidate {
                    id: String::new(),
                    name: format!("n{}", n % 6),
                    active,
                    virtualization: match virt {
                        0 => vec!["docker".to_owned()],
                        1 => vec!["unikernel".to_owned()],
                        _ => vec!["container".to_owned(), "unikernel".to_owned()],
                    },
                    cpu_percent: f64::from(cpu),
                    total,
                    per_arch,
                    max_node: max.map(|(v, m)| Capacity::new(v, m * 512, gpus)),
                    ..Candidate::default()
                }
            })
    }

    fn arb_demand() -> impl Strategy<Value = Demand> {
        (0u64..5, 0u64..8, 0u64..2, 0u8..3, any::<bool>(), 0u8..4).prop_map(
            |(vcpus, mem, gpus, arch, uni, direct)| Demand {
                key: "k/0".to_owned(),
                virtualization: if uni { "unikernel" } else { "container" }.to_owned(),
                need: Capacity::new(vcpus, mem * 400, gpus),
                arch: match arch {
                    0 => vec![],
                    1 => vec!["amd64".to_owned()],
                    _ => vec!["arm64".to_owned()],
                },
                direct: (direct == 0).then(|| vec!["n1".to_owned(), "n2".to_owned()]),
                ..Demand::default()
            },
        )
    }

    proptest! {
        #[test]
        fn placement_is_sound_and_order_independent(
            mut cands in proptest::collection::vec(arb_candidate(), 0..12),
            d in arb_demand(),
            reserve_on in proptest::collection::vec((0usize..12, 0u64..4, 0u64..4), 0..6),
            rotate in 0usize..12,
        ) {
            for (i, c) in cands.iter_mut().enumerate() {
                c.id = format!("id{i}");
            }
            let mut res = Reservations::new();
            for (k, (i, v, m)) in reserve_on.iter().enumerate() {
                res.reserve(&format!("id{i}"), &format!("r/{k}"), Capacity::new(*v, m * 512, 0), 0, 10);
            }
            for policy in Policy::ALL {
                let got = place(&cands, &d, &res, policy);
                if let Ok(c) = got {
                    prop_assert!(c.active);
                    prop_assert!(qualifies(c, &d, demanded_runtime(&d.virtualization)));
                    prop_assert!(d.need.fits_in(c.total.saturating_sub(res.reserved(&c.id))));
                    if let Some(direct) = &d.direct {
                        prop_assert!(direct.contains(&c.name));
                    }
                } else {
                    // Nothing was overlooked: no candidate passes every rule.
                    let any_fits = cands.iter().any(|c| {
                        c.active
                            && d.direct.as_ref().is_none_or(|l| l.contains(&c.name))
                            && qualifies(c, &d, demanded_runtime(&d.virtualization))
                            && fit(c, &d, res.reserved(&c.id)).is_some()
                    });
                    prop_assert!(!any_fits, "{got:?}");
                }
                // Same answer in any input order (first-fit is defined by the order).
                if policy != Policy::FirstFit && !cands.is_empty() {
                    let mut rotated = cands.clone();
                    rotated.rotate_left(rotate % cands.len());
                    rotated.reverse();
                    let again = place(&rotated, &d, &res, policy).map(|c| c.id.clone());
                    prop_assert_eq!(got.map(|c| c.id.clone()), again);
                }
            }
            // Excluding the answer never returns it again.
            if let Ok(c) = place(&cands, &d, &res, Policy::BestFit) {
                let mut d2 = d.clone();
                d2.exclude.push(c.id.clone());
                let next = place(&cands, &d2, &res, Policy::BestFit);
                prop_assert!(next.is_ok_and(|n| n.id != c.id) || next.is_err());
            }
            // Releasing everything leaves nothing reserved.
            for k in 0..reserve_on.len() {
                let key = format!("r/{k}");
                prop_assert!(res.release(&key));
            }
            prop_assert!(res.is_empty());
            prop_assert_eq!(res.reserved("id0"), Capacity::ZERO);
        }
    }
}
