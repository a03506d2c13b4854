//! The translation table: every instance this worker knows about (its own and those of the services its containers
//! talk to), indexed by service address and by namespace address, and published as immutable snapshots that the
//! dataplane threads pick up without taking a lock per packet.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
};

use oakestra_protocol::{
    addr::{V6Class, classify_v6},
    mqtt::net::{InstanceEntry, IpType},
    naming::is_valid_name,
};
use rustc_hash::FxHashMap;

/// How an address spreads new flows over the instances answering on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each new flow goes to the next instance in turn.
    RoundRobin,
    /// The closest instance. Without a distance hint this falls back to round robin.
    Closest,
    /// Exactly one instance (an instance's own address).
    Instance,
}

impl Policy {
    /// The policy of an address of type `ip_type` (the reference maps anything unknown to "instance").
    fn of(ip_type: &IpType) -> Self {
        match ip_type {
            IpType::RoundRobin => Self::RoundRobin,
            IpType::Closest => Self::Closest,
            _ => Self::Instance,
        }
    }
}

/// Why a table entry from the cluster was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The job name is not `app.appns.svc.svcns` with 1–30 alphanumerics per part.
    #[error("job name {0:?} is not app.appns.svc.svcns")]
    JobName(String),
    /// A negative instance number.
    #[error("instance number {0} is negative")]
    Number(i64),
    /// A required address is missing or unreadable.
    #[error("field {field} = {value:?} is not an IP address")]
    Address {
        /// The field name as the cluster spells it.
        field: &'static str,
        /// What was there.
        value: String,
    },
    /// Not deployed yet: the worker has not reported its addresses.
    #[error("instance {0} has no namespace address yet")]
    NotDeployed(i64),
}

/// One instance: where it runs and the addresses it answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `app.appns.svc.svcns`.
    pub job: Arc<str>,
    /// The instance number.
    pub number: i64,
    /// The worker's tunnel endpoint.
    pub node: SocketAddr,
    /// Namespace (real) IPv4 address on its worker.
    pub ns_v4: Ipv4Addr,
    /// Namespace IPv6 address (absent for reference unikernels, which report `"<nil>"`).
    pub ns_v6: Option<Ipv6Addr>,
    /// The instance's own service addresses.
    pub ip_v4: Option<Ipv4Addr>,
    /// See [`Self::ip_v4`].
    pub ip_v6: Option<Ipv6Addr>,
    /// Balanced addresses (round robin, closest) the instance answers on.
    pub services: Vec<(Policy, Option<Ipv4Addr>, Option<Ipv6Addr>)>,
}

fn parse_opt<T: std::str::FromStr>(value: Option<&str>) -> Option<T> {
    value.and_then(|v| v.trim().parse().ok())
}

impl Instance {
    /// Reads one instance of `job` from a table-query answer; `default_port` when the entry has no usable port.
    pub fn from_entry(job: &str, e: &InstanceEntry, default_port: u16) -> Result<Self, EntryError> {
        let parts: Vec<&str> = job.split('.').collect();
        if parts.len() != 4 || !parts.iter().all(|p| is_valid_name(p)) {
            return Err(EntryError::JobName(job.to_owned()));
        }
        if e.instance_number < 0 {
            return Err(EntryError::Number(e.instance_number));
        }
        let ns_v4: Ipv4Addr =
            parse_opt(e.namespace_ip.as_deref()).ok_or(EntryError::NotDeployed(e.instance_number))?;
        let host: IpAddr = parse_opt(e.host_ip.as_deref()).ok_or_else(|| EntryError::Address {
            field: "host_ip",
            value: e.host_ip.clone().unwrap_or_default(),
        })?;
        let port = e.host_port_u16().filter(|p| *p != 0).unwrap_or(default_port);
        let mut ip_v4 = parse_opt(e.instance_ip.as_deref());
        let mut ip_v6 = parse_opt(e.instance_ip_v6.as_deref());
        let mut services = Vec::new();
        for s in &e.service_ip {
            let (v4, v6) = (parse_opt(Some(&s.address)), parse_opt(Some(&s.address_v6)));
            match Policy::of(&s.ip_type) {
                Policy::Instance => {
                    ip_v4 = ip_v4.or(v4);
                    ip_v6 = ip_v6.or(v6);
                }
                policy => {
                    if v4.is_some() || v6.is_some() {
                        services.push((policy, v4, v6));
                    }
                }
            }
        }
        Ok(Self {
            job: Arc::from(job),
            number: e.instance_number,
            node: SocketAddr::new(host, port),
            ns_v4,
            ns_v6: parse_opt(e.namespace_ip_v6.as_deref()),
            ip_v4,
            ip_v6,
            services,
        })
    }

    /// The namespace address of the family `v6`.
    pub fn ns(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.ns_v6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.ns_v4))
        }
    }

    /// The instance's own service address of the family `v6`.
    pub fn instance_ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.ip_v6.map(IpAddr::V6)
        } else {
            self.ip_v4.map(IpAddr::V4)
        }
    }
}

/// The instances behind a balanced address: up to three inline (the common case: no pointer to chase per new
/// flow), more on the heap.
#[derive(Debug)]
enum Members {
    Inline { len: u8, idx: [u32; 3] },
    Heap(Box<[u32]>),
}

impl Members {
    fn new(list: Vec<u32>) -> Self {
        match list.as_slice() {
            [a] => Self::Inline {
                len: 1,
                idx: [*a, 0, 0],
            },
            [a, b] => Self::Inline {
                len: 2,
                idx: [*a, *b, 0],
            },
            [a, b, c] => Self::Inline {
                len: 3,
                idx: [*a, *b, *c],
            },
            _ => Self::Heap(list.into_boxed_slice()),
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            Self::Inline { len, idx } => &idx[..usize::from(*len)],
            Self::Heap(list) => list,
        }
    }
}

/// What a destination address resolves to. Everything a new flow needs sits in the hash table's bucket (the
/// members and the round-robin cursor), so resolving an address costs one bucket and one instance slot.
#[derive(Debug)]
enum Target {
    /// Several instances; new flows are spread by `policy`; `next` is the round-robin position shared by all
    /// dataplane threads (carried over into the next snapshot).
    Balanced {
        policy: Policy,
        members: Members,
        next: AtomicUsize,
    },
    /// Exactly one instance.
    One(u32),
}

/// One instance in a snapshot, with its job's usage clock next to it (the dataplane stamps it; the control task
/// reads it for interest expiry).
#[derive(Debug)]
struct Slot {
    instance: Instance,
    used: AtomicU32,
}

/// A map keyed by address, one table per family with integer keys: a lookup compares one integer instead of a
/// 17-byte `IpAddr`, and Fx-hashes integer words, which spread well (its byte-slice path, which `IpAddr` goes
/// through, mapped 60,000 IPv6 addresses differing in their low bytes to 64 distinct low 16 bits).
#[derive(Debug)]
struct AddrMap<V> {
    v4: FxHashMap<u32, V>,
    v6: FxHashMap<u128, V>,
}

impl<V> Default for AddrMap<V> {
    fn default() -> Self {
        Self {
            v4: FxHashMap::default(),
            v6: FxHashMap::default(),
        }
    }
}

impl<V> AddrMap<V> {
    fn get(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => self.v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.v6.get(&u128::from(a)),
        }
    }

    fn insert(&mut self, addr: IpAddr, value: V) {
        match addr {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), value),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), value),
        };
    }
}

/// An immutable view of the table for the dataplane.
#[derive(Debug, Default)]
pub struct Snapshot {
    generation: u64,
    slots: Vec<Slot>,
    by_addr: AddrMap<Target>,
    by_ns: AddrMap<u32>,
    /// The slots of each job (contiguous).
    by_job: FxHashMap<Arc<str>, std::ops::Range<u32>>,
}

impl Snapshot {
    /// Which table version this is.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, index: u32) -> Option<&Slot> {
        self.slots.get(usize::try_from(index).ok()?)
    }

    /// Whether `addr` is a service or instance address this table knows.
    pub fn knows(&self, addr: IpAddr) -> bool {
        self.by_addr.get(addr).is_some()
    }

    /// The instance a new flow to `dst` goes to: round robin over the instances of a balanced address (closest
    /// falls back to round robin: there is no distance hint yet), the instance itself for an instance address.
    /// Marks the job as used at `now`.
    pub fn choose(&self, dst: IpAddr, now: u32) -> Option<&Instance> {
        let index = match self.by_addr.get(dst)? {
            Target::One(i) => *i,
            Target::Balanced { members, next, .. } => {
                let list = members.as_slice();
                let n = next.fetch_add(1, Ordering::Relaxed);
                *list.get(n % list.len().max(1))?
            }
        };
        self.touch(index, now)
    }

    /// Whether an instance has namespace address `ns` (without marking anything as used).
    pub fn has_ns(&self, ns: IpAddr) -> bool {
        self.by_ns.get(ns).is_some()
    }

    /// The instance whose namespace address is `ns` (marks its job as used at `now`).
    pub fn by_ns(&self, ns: IpAddr, now: u32) -> Option<&Instance> {
        let index = *self.by_ns.get(ns)?;
        self.touch(index, now)
    }

    fn touch(&self, index: u32, now: u32) -> Option<&Instance> {
        let slot = self.slot(index)?;
        // One store per second at most: the line is shared by every dataplane thread.
        if slot.used.load(Ordering::Relaxed) != now {
            slot.used.store(now, Ordering::Relaxed);
        }
        Some(&slot.instance)
    }

    /// When the dataplane last carried a packet of `job` in this snapshot.
    fn used(&self, job: &str) -> Option<u32> {
        let range = self.by_job.get(job)?;
        let slots = self
            .slots
            .get(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)?;
        slots.iter().map(|s| s.used.load(Ordering::Relaxed)).max()
    }

    /// The policy new flows to `addr` are spread by (`Instance` for an instance's own address).
    pub fn policy(&self, addr: IpAddr) -> Option<Policy> {
        match self.by_addr.get(addr)? {
            Target::Balanced { policy, .. } => Some(*policy),
            Target::One(_) => Some(Policy::Instance),
        }
    }

    /// The round-robin cursor of `addr`.
    fn cursor(&self, addr: IpAddr) -> Option<usize> {
        match self.by_addr.get(addr)? {
            Target::Balanced { next, .. } => Some(next.load(Ordering::Relaxed)),
            Target::One(_) => None,
        }
    }
}

/// The master copy of the table, owned by the control task. It keeps the last snapshot it built, to carry the
/// round-robin cursors and the usage clocks (which the dataplane moves) into the next one.
#[derive(Debug, Default)]
pub struct Table {
    jobs: BTreeMap<Arc<str>, Vec<Instance>>,
    /// Usage marks set by the control task (a fresh interest counts as used).
    marks: HashMap<Arc<str>, u32>,
    last: Arc<Snapshot>,
    generation: u64,
}

impl Table {
    /// Replaces every instance of `job` (an empty list removes the job's instances but keeps its usage clock).
    pub fn replace_job(&mut self, job: &str, mut instances: Vec<Instance>) {
        instances.sort_by_key(|i| i.number);
        let key: Arc<str> = Arc::from(job);
        let used = self.last_used(job).unwrap_or(0);
        self.marks.insert(key.clone(), used);
        if instances.is_empty() {
            self.jobs.remove(job);
        } else {
            self.jobs.insert(key, instances);
        }
    }

    /// Forgets `job` entirely.
    pub fn remove_job(&mut self, job: &str) {
        self.jobs.remove(job);
        self.marks.remove(job);
    }

    /// The instances of `job`.
    pub fn job(&self, job: &str) -> Option<&[Instance]> {
        self.jobs.get(job).map(Vec::as_slice)
    }

    /// Every job name.
    pub fn job_names(&self) -> impl Iterator<Item = &str> {
        self.jobs.keys().map(|k| &**k)
    }

    /// When `job` last carried a packet (seconds of [`crate::conntrack::now_secs`]); `None` for an unknown job.
    pub fn last_used(&self, job: &str) -> Option<u32> {
        let mark = self.marks.get(job).copied();
        match (mark, self.last.used(job)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sets the usage clock of `job` (a fresh interest counts as used now).
    pub fn mark_used(&mut self, job: &str, now: u32) {
        self.marks.insert(Arc::from(job), now);
    }

    /// Number of instances over all jobs.
    pub fn len(&self) -> usize {
        self.jobs.values().map(Vec::len).sum()
    }

    /// Whether no job has an instance.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Builds the dataplane's view (publish it with [`Published::publish`]). Round-robin cursors and usage clocks
    /// carry over from the previous snapshot, so an update does not restart every address at its first instance.
    pub fn snapshot(&mut self) -> Arc<Snapshot> {
        self.generation += 1;
        let mut snap = Snapshot {
            generation: self.generation,
            ..Snapshot::default()
        };
        // The dataplane's clocks live in the snapshot it reads: fold them into the marks before it is replaced.
        for (job, mark) in &mut self.marks {
            if let Some(used) = self.last.used(job) {
                *mark = (*mark).max(used);
            }
        }
        let mut balanced: FxHashMap<IpAddr, (Policy, Vec<u32>)> = FxHashMap::default();
        for (job, instances) in &self.jobs {
            let used = self.marks.get(job).copied().unwrap_or(0);
            let Ok(first) = u32::try_from(snap.slots.len()) else {
                break;
            };
            for inst in instances {
                let Ok(index) = u32::try_from(snap.slots.len()) else {
                    break;
                };
                // A later entry with the same namespace address replaces the earlier one (the reference's rule).
                snap.by_ns.insert(IpAddr::V4(inst.ns_v4), index);
                if let Some(v6) = inst.ns_v6 {
                    snap.by_ns.insert(IpAddr::V6(v6), index);
                }
                for ip in [inst.instance_ip(false), inst.instance_ip(true)]
                    .into_iter()
                    .flatten()
                {
                    snap.by_addr.insert(ip, Target::One(index));
                }
                for (policy, v4, v6) in &inst.services {
                    for ip in [v4.map(IpAddr::V4), v6.map(IpAddr::V6)].into_iter().flatten() {
                        let slot = balanced.entry(ip).or_insert_with(|| (*policy, Vec::new()));
                        slot.1.push(index);
                    }
                }
                snap.slots.push(Slot {
                    instance: inst.clone(),
                    used: AtomicU32::new(used),
                });
            }
            let end = u32::try_from(snap.slots.len()).unwrap_or(u32::MAX);
            snap.by_job.insert(job.clone(), first..end);
        }
        for (ip, (policy, list)) in balanced {
            let policy = decode_policy(ip, policy);
            let next = self.last.cursor(ip).unwrap_or(0);
            snap.by_addr.insert(
                ip,
                Target::Balanced {
                    policy,
                    members: Members::new(list),
                    next: AtomicUsize::new(next),
                },
            );
        }
        self.last = Arc::new(snap);
        self.last.clone()
    }
}

/// The policy of a balanced address: the table's `IpType`, cross-checked against the IPv6 plan, where the address's
/// /21 block names the policy (`fdff:2000::/21` round robin, `fdff:1000::/21` closest, …). Unknown policies spread
/// like round robin.
pub fn decode_policy(ip: IpAddr, from_table: Policy) -> Policy {
    match ip {
        IpAddr::V6(v6) => match classify_v6(v6) {
            V6Class::Balancing(p) if p.get() == 1 => Policy::Closest,
            V6Class::Balancing(_) => Policy::RoundRobin,
            _ => from_table,
        },
        IpAddr::V4(_) => from_table,
    }
}

/// The current snapshot, shared between the control task (writer) and the dataplane threads (readers).
#[derive(Debug, Default)]
pub struct Published {
    current: RwLock<Arc<Snapshot>>,
    generation: AtomicU64,
}

impl Published {
    /// Makes `snap` current.
    pub fn publish(&self, snap: impl Into<Arc<Snapshot>>) {
        let snap = snap.into();
        let generation = snap.generation;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = snap;
        self.generation.store(generation, Ordering::Release);
    }

    /// The current snapshot.
    pub fn get(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A reader that re-fetches the snapshot only when the generation moved.
    pub fn reader(&self) -> Reader {
        Reader { cached: self.get() }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A dataplane thread's cached snapshot.
#[derive(Debug)]
pub struct Reader {
    cached: Arc<Snapshot>,
}

impl Reader {
    /// The latest snapshot: one atomic load when nothing changed.
    pub fn refresh(&mut self, published: &Published) -> &Snapshot {
        if published.generation() != self.cached.generation {
            self.cached = published.get();
        }
        &self.cached
    }
}

#[cfg(test)]
mod tests {
    use oakestra_protocol::mqtt::net::ServiceIp;

    use super::*;

    fn entry(n: i64, ns: &str, host: &str, inst: &str, rr: &str) -> InstanceEntry {
        InstanceEntry {
            instance_number: n,
            instance_ip: Some(inst.to_owned()),
            instance_ip_v6: Some(format!("fdff::{n}")),
            namespace_ip: Some(ns.to_owned()),
            namespace_ip_v6: Some(format!("fc00::{}", n + 2)),
            host_ip: Some(host.to_owned()),
            host_port: Some(50103),
            service_ip: vec![
                ServiceIp {
                    ip_type: IpType::RoundRobin,
                    address: rr.to_owned(),
                    address_v6: "fdff:2000::55".to_owned(),
                    ..ServiceIp::default()
                },
                ServiceIp {
                    ip_type: IpType::InstanceIp,
                    address: inst.to_owned(),
                    address_v6: format!("fdff::{n}"),
                    ..ServiceIp::default()
                },
            ],
            ..InstanceEntry::default()
        }
    }

    fn table() -> Table {
        let mut t = Table::default();
        let job = "app.ns.srv.ns";
        let list = vec![
            Instance::from_entry(
                job,
                &entry(0, "10.18.0.2", "192.168.1.1", "10.30.0.1", "10.30.55.55"),
                50103,
            )
            .unwrap(),
            Instance::from_entry(
                job,
                &entry(1, "10.18.0.66", "192.168.1.2", "10.30.0.2", "10.30.55.55"),
                50103,
            )
            .unwrap(),
        ];
        t.replace_job(job, list);
        t
    }

    #[test]
    fn round_robin_alternates_and_survives_rebuilds() {
        let mut t = table();
        let snap = t.snapshot();
        let rr: IpAddr = "10.30.55.55".parse().unwrap();
        let picks: Vec<i64> = (0..4).map(|_| snap.choose(rr, 1).unwrap().number).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        let snap2 = t.snapshot();
        assert!(snap2.generation() > snap.generation());
        // The cursor continues where it was.
        assert_eq!(snap2.choose(rr, 1).unwrap().number, 0);
        let v6: IpAddr = "fdff:2000::55".parse().unwrap();
        assert_eq!(snap2.policy(v6), Some(Policy::RoundRobin));
        assert_eq!(snap2.policy("10.30.0.1".parse().unwrap()), Some(Policy::Instance));
        let a = snap2.choose(v6, 1).unwrap().number;
        let b = snap2.choose(v6, 1).unwrap().number;
        assert_ne!(a, b);
    }

    #[test]
    fn many_members_cycle_and_usage_survives_rebuilds() {
        let mut t = Table::default();
        let job = "app.ns.big.ns";
        let list = (0..5)
            .map(|n| {
                let ns = format!("10.18.0.{}", n + 2);
                let inst = format!("10.30.0.{}", n + 1);
                Instance::from_entry(job, &entry(n, &ns, "192.168.1.1", &inst, "10.30.9.9"), 50103).unwrap()
            })
            .collect();
        t.replace_job(job, list);
        let snap = t.snapshot();
        let rr: IpAddr = "10.30.9.9".parse().unwrap();
        let picks: Vec<i64> = (0..7).map(|_| snap.choose(rr, 40).unwrap().number).collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 4, 0, 1]);
        assert_eq!(t.last_used(job), Some(40));
        let snap2 = t.snapshot();
        assert_eq!(snap2.choose(rr, 41).unwrap().number, 2);
        drop((snap, snap2));
        let _ = t.snapshot();
        assert_eq!(
            t.last_used(job),
            Some(41),
            "the dataplane's clock outlives its snapshot"
        );
        t.mark_used(job, 50);
        assert_eq!(t.last_used(job), Some(50));
    }

    #[test]
    fn instance_and_namespace_lookups() {
        let mut t = table();
        let snap = t.snapshot();
        let one = snap.choose("10.30.0.2".parse().unwrap(), 7).unwrap();
        assert_eq!(one.number, 1);
        assert_eq!(one.ns_v4, Ipv4Addr::new(10, 18, 0, 66));
        assert_eq!(t.last_used("app.ns.srv.ns"), Some(7));
        let by_ns = snap.by_ns("fc00::2".parse().unwrap(), 9).unwrap();
        assert_eq!(by_ns.number, 0);
        assert_eq!(by_ns.instance_ip(true), Some("fdff::".parse().unwrap()));
        assert!(snap.choose("10.30.9.9".parse().unwrap(), 1).is_none());
    }

    #[test]
    fn entries_are_validated() {
        let good = entry(0, "10.18.0.2", "192.168.1.1", "10.30.0.1", "10.30.55.55");
        assert!(matches!(
            Instance::from_entry("a.b.c", &good, 1),
            Err(EntryError::JobName(_))
        ));
        let mut pending = good.clone();
        pending.namespace_ip = None;
        assert_eq!(
            Instance::from_entry("a.b.c.d", &pending, 1),
            Err(EntryError::NotDeployed(0))
        );
        let mut nil = good.clone();
        nil.namespace_ip_v6 = Some("<nil>".to_owned());
        nil.host_port = None;
        let i = Instance::from_entry("a.b.c.d", &nil, 4242).unwrap();
        assert_eq!(i.ns_v6, None);
        assert_eq!(i.node.port(), 4242);
        let mut neg = good;
        neg.instance_number = -1;
        assert_eq!(
            Instance::from_entry("a.b.c.d", &neg, 1),
            Err(EntryError::Number(-1))
        );
    }

    #[test]
    fn v6_policy_blocks_decode() {
        assert_eq!(
            decode_policy("fdff:1000::1".parse().unwrap(), Policy::RoundRobin),
            Policy::Closest
        );
        assert_eq!(
            decode_policy("fdff:2000::1".parse().unwrap(), Policy::Closest),
            Policy::RoundRobin
        );
        assert_eq!(
            decode_policy("10.30.1.1".parse().unwrap(), Policy::Closest),
            Policy::Closest
        );
    }

    #[test]
    fn readers_follow_publications() {
        let mut t = table();
        let p = Published::default();
        let mut r = p.reader();
        assert!(r.refresh(&p).is_empty());
        p.publish(t.snapshot());
        assert_eq!(r.refresh(&p).len(), 2);
        t.remove_job("app.ns.srv.ns");
        p.publish(t.snapshot());
        assert!(r.refresh(&p).is_empty());
    }
}
