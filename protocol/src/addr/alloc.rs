//! Address allocators: one next-fit [`Pool`] over an index space ([`AddressSpace`]), and the concrete pools of the
//! plan (service v4, instance v6, policy v6, worker subnets v4/v6, container addresses v4/v6).
//!
//! Why next-fit: `allocate` continues after the last address it handed out and wraps around only once the end is
//! reached, so a freed address is reused as late as possible. Remote proxies cache service→instance translations
//! and flows for a while; handing a just-freed address straight to a new owner would deliver those stale flows to
//! the wrong container. (The reference never reclaims addresses at all; we do, but late.)
//!
//! The pool stores indices, not addresses: a `BTreeSet` of used indices, a set of permanently excluded indices (the
//! worker subnet holding the TUN address) and the cursor. Finding the next free index walks the sets only across
//! runs of consecutive taken indices, so it stays cheap in the 2^107-address IPv6 spaces.
//!
//! Persistence: a store saves [`Pool::iter_used`] and [`Pool::cursor`], and rebuilds with [`Pool::reserve`] and
//! [`Pool::set_cursor`].

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    AddrError,
    plan::{
        INSTANCE_V6_BLOCKS, SERVICE_V4_FIRST, SERVICE_V4_LAST, TUN_SUBNET_V4, TUN_SUBNET_V6,
        WORKER_SUBNET_V4_SLOTS, WORKER_SUBNET_V6_SLOTS, WorkerSubnetV4, WorkerSubnetV6,
        worker_subnet_v4_slot, worker_subnet_v6_slot,
    },
    policy::{BalancingPolicy, policy_block},
};

/// A finite, ordered set of addresses (or subnets) numbered `0..capacity()`; what a [`Pool`] allocates from.
pub trait AddressSpace {
    /// What the pool hands out: an address or a subnet.
    type Addr: Copy + Ord + fmt::Debug;

    /// Pool name used in errors, e.g. `service-v4`.
    fn name(&self) -> &'static str;

    /// Number of indices, excluded ones included.
    fn capacity(&self) -> u128;

    /// The address at `index`; `None` when `index >= capacity()` or the index has no representable address (the
    /// TUN slot of the worker-subnet spaces, which their pools exclude).
    fn nth(&self, index: u128) -> Option<Self::Addr>;

    /// The index of `addr`, `None` when it is not in the space.
    fn index_of(&self, addr: Self::Addr) -> Option<u128>;

    /// The IP address to report in errors (a subnet's network address).
    fn ip_of(addr: Self::Addr) -> IpAddr;
}

/// A next-fit allocator over an [`AddressSpace`]; see the module docs for the reuse policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool<S> {
    space: S,
    used: BTreeSet<u128>,
    excluded: BTreeSet<u128>,
    cursor: u128,
}

impl<S: AddressSpace> Pool<S> {
    /// An empty pool over `space` with the cursor at index 0 and nothing excluded.
    pub fn from_space(space: S) -> Self {
        Self {
            space,
            used: BTreeSet::new(),
            excluded: BTreeSet::new(),
            cursor: 0,
        }
    }

    /// Permanently removes `index` from what the pool can hand out.
    fn excluding(mut self, index: u128) -> Self {
        if index < self.space.capacity() {
            self.excluded.insert(index);
        }
        self
    }

    /// The space this pool allocates from.
    pub fn space(&self) -> &S {
        &self.space
    }

    /// The pool's name, as used in errors.
    pub fn name(&self) -> &'static str {
        self.space.name()
    }

    /// How many addresses the pool can hand out in total (the space minus excluded indices).
    pub fn capacity(&self) -> u128 {
        self.space.capacity().saturating_sub(len_u128(&self.excluded))
    }

    /// How many addresses are allocated or reserved.
    pub fn used_count(&self) -> u128 {
        len_u128(&self.used)
    }

    /// How many addresses are still available.
    pub fn free_count(&self) -> u128 {
        self.capacity().saturating_sub(self.used_count())
    }

    /// Whether the pool can ever hand out `addr` (in the space and not excluded).
    pub fn contains(&self, addr: S::Addr) -> bool {
        self.index_in_pool(addr).is_some()
    }

    /// Whether `addr` is currently allocated or reserved.
    pub fn is_used(&self, addr: S::Addr) -> bool {
        self.space.index_of(addr).is_some_and(|i| self.used.contains(&i))
    }

    /// Hands out the first free address at or after the cursor, wrapping around once; the cursor moves past it.
    pub fn allocate(&mut self) -> Result<S::Addr, AddrError> {
        let exhausted = AddrError::Exhausted {
            pool: self.space.name(),
        };
        // A full pool answers at once instead of walking every used index.
        if self.free_count() == 0 {
            return Err(exhausted);
        }
        let index = self
            .next_free_from(self.cursor)
            .ok_or_else(|| exhausted.clone())?;
        // `nth` only fails for excluded indices, which `next_free_from` never returns.
        let addr = self.space.nth(index).ok_or(exhausted)?;
        self.used.insert(index);
        let next = index.saturating_add(1);
        self.cursor = if next >= self.space.capacity() { 0 } else { next };
        Ok(addr)
    }

    /// Marks a specific address as used: a user-chosen address (`rr_ip`) or state rebuilt from a database. The
    /// cursor does not move; `allocate` simply skips the address.
    pub fn reserve(&mut self, addr: S::Addr) -> Result<(), AddrError> {
        let index = self.index_in_pool(addr).ok_or_else(|| self.out_of_pool(addr))?;
        if self.used.insert(index) {
            Ok(())
        } else {
            Err(AddrError::AlreadyUsed {
                addr: S::ip_of(addr),
                pool: self.space.name(),
            })
        }
    }

    /// Returns an allocated or reserved address to the pool. It is handed out again only after the cursor has come
    /// round (next-fit).
    pub fn free(&mut self, addr: S::Addr) -> Result<(), AddrError> {
        let index = self.index_in_pool(addr).ok_or_else(|| self.out_of_pool(addr))?;
        if self.used.remove(&index) {
            Ok(())
        } else {
            Err(AddrError::NotAllocated {
                addr: S::ip_of(addr),
                pool: self.space.name(),
            })
        }
    }

    /// Every used address in index order, for persistence.
    pub fn iter_used(&self) -> impl Iterator<Item = S::Addr> + '_ {
        self.used.iter().filter_map(|&i| self.space.nth(i))
    }

    /// The next `n` addresses `allocate` would hand out, in order, without allocating them (e.g. the root's public
    /// "available IPs" query).
    pub fn peek_free(&self, n: usize) -> Vec<S::Addr> {
        let mut out = Vec::new();
        let capacity = self.space.capacity();
        let mut from = self.cursor;
        let mut wrapped = false;
        while out.len() < n {
            let end = if wrapped { self.cursor } else { capacity };
            match self.first_free_in(from, end) {
                Some(index) => {
                    out.extend(self.space.nth(index));
                    from = index.saturating_add(1);
                }
                None if !wrapped => {
                    wrapped = true;
                    from = 0;
                }
                None => break,
            }
        }
        out
    }

    /// The index `allocate` starts searching from.
    pub fn cursor(&self) -> u128 {
        self.cursor
    }

    /// Restores a persisted cursor; it must be an index of the space.
    pub fn set_cursor(&mut self, cursor: u128) -> Result<(), AddrError> {
        if cursor < self.space.capacity() || cursor == 0 {
            self.cursor = cursor;
            Ok(())
        } else {
            Err(AddrError::CursorOutOfRange {
                cursor,
                pool: self.space.name(),
            })
        }
    }

    fn index_in_pool(&self, addr: S::Addr) -> Option<u128> {
        self.space.index_of(addr).filter(|i| !self.excluded.contains(i))
    }

    fn out_of_pool(&self, addr: S::Addr) -> AddrError {
        AddrError::OutOfPool {
            addr: S::ip_of(addr),
            pool: self.space.name(),
        }
    }

    /// First free index at or after `start`, else the first free index before it.
    fn next_free_from(&self, start: u128) -> Option<u128> {
        self.first_free_in(start, self.space.capacity())
            .or_else(|| self.first_free_in(0, start))
    }

    /// First index in `start..end` that is neither used nor excluded. Each round skips a whole run of consecutive
    /// taken indices, so the cost is bounded by the taken indices passed over, never by the size of the space.
    fn first_free_in(&self, start: u128, end: u128) -> Option<u128> {
        let mut candidate = start;
        while candidate < end {
            let past_used = skip_run(&self.used, candidate);
            let past_excluded = skip_run(&self.excluded, past_used);
            if past_excluded == candidate {
                return Some(candidate);
            }
            candidate = past_excluded;
        }
        None
    }
}

/// The first index at or after `from` that is not in the run of consecutive members of `set` starting at `from`.
fn skip_run(set: &BTreeSet<u128>, from: u128) -> u128 {
    let mut next = from;
    for &i in set.range(from..) {
        if i != next {
            break;
        }
        next = next.saturating_add(1);
    }
    next
}

fn len_u128(set: &BTreeSet<u128>) -> u128 {
    // usize → u128 only widens.
    set.len() as u128
}

// ---------------------------------------------------------------------------------------------------------------
// Index arithmetic shared by the concrete spaces: a contiguous run of `len` addresses starting at `first`.
// ---------------------------------------------------------------------------------------------------------------

fn v4_nth(first: Ipv4Addr, len: u32, index: u128) -> Option<Ipv4Addr> {
    let i = u32::try_from(index).ok().filter(|i| *i < len)?;
    u32::from(first).checked_add(i).map(Ipv4Addr::from)
}

fn v4_index(first: Ipv4Addr, len: u32, addr: Ipv4Addr) -> Option<u128> {
    let offset = u32::from(addr).checked_sub(u32::from(first))?;
    (offset < len).then_some(u128::from(offset))
}

fn v6_nth(first: Ipv6Addr, len: u128, index: u128) -> Option<Ipv6Addr> {
    if index >= len {
        return None;
    }
    u128::from(first).checked_add(index).map(Ipv6Addr::from)
}

fn v6_index(first: Ipv6Addr, len: u128, addr: Ipv6Addr) -> Option<u128> {
    let offset = u128::from(addr).checked_sub(u128::from(first))?;
    (offset < len).then_some(offset)
}

fn v6_after(addr: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(addr).saturating_add(n))
}

// ---------------------------------------------------------------------------------------------------------------
// Service IPv4
// ---------------------------------------------------------------------------------------------------------------

/// `10.30.0.1 ..= 10.30.255.254`: service round-robin and instance IPv4 addresses (one shared pool, as in the
/// reference; see [`SERVICE_V4_FIRST`] for how our bounds differ).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceV4Space;

const SERVICE_V4_LEN: u32 =
    u32::from_be_bytes(SERVICE_V4_LAST.octets()) - u32::from_be_bytes(SERVICE_V4_FIRST.octets()) + 1;

impl AddressSpace for ServiceV4Space {
    type Addr = Ipv4Addr;

    fn name(&self) -> &'static str {
        "service-v4"
    }

    fn capacity(&self) -> u128 {
        u128::from(SERVICE_V4_LEN)
    }

    fn nth(&self, index: u128) -> Option<Ipv4Addr> {
        v4_nth(SERVICE_V4_FIRST, SERVICE_V4_LEN, index)
    }

    fn index_of(&self, addr: Ipv4Addr) -> Option<u128> {
        v4_index(SERVICE_V4_FIRST, SERVICE_V4_LEN, addr)
    }

    fn ip_of(addr: Ipv4Addr) -> IpAddr {
        IpAddr::V4(addr)
    }
}

/// Service round-robin and instance IPv4 addresses, first `10.30.0.1`.
pub type ServiceIpv4Pool = Pool<ServiceV4Space>;

impl Pool<ServiceV4Space> {
    /// An empty service pool.
    pub fn new() -> Self {
        Self::from_space(ServiceV4Space)
    }
}

impl Default for Pool<ServiceV4Space> {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Instance IPv6
// ---------------------------------------------------------------------------------------------------------------

/// Instance IPv6 addresses: `fdff::/21` then `fdff:800::/21`, which are adjacent, so one run from `fdff::1` to
/// `fdff:fff:ffff:ffff:ffff:ffff:ffff:ffff`.
///
/// The reference starts at `fdff::` and counts only the low 80 bits of each block; we skip the all-zero address
/// (like every other pool here) and use the whole blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceV6Space;

const INSTANCE_V6_FIRST: Ipv6Addr = Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 1);

impl InstanceV6Space {
    fn len() -> u128 {
        let last = INSTANCE_V6_BLOCKS[1].broadcast();
        (u128::from(last) - u128::from(INSTANCE_V6_FIRST)).saturating_add(1)
    }
}

impl AddressSpace for InstanceV6Space {
    type Addr = Ipv6Addr;

    fn name(&self) -> &'static str {
        "instance-v6"
    }

    fn capacity(&self) -> u128 {
        Self::len()
    }

    fn nth(&self, index: u128) -> Option<Ipv6Addr> {
        v6_nth(INSTANCE_V6_FIRST, Self::len(), index)
    }

    fn index_of(&self, addr: Ipv6Addr) -> Option<u128> {
        v6_index(INSTANCE_V6_FIRST, Self::len(), addr)
    }

    fn ip_of(addr: Ipv6Addr) -> IpAddr {
        IpAddr::V6(addr)
    }
}

/// Instance IPv6 addresses, first `fdff::1`.
pub type InstanceIpv6Pool = Pool<InstanceV6Space>;

impl Pool<InstanceV6Space> {
    /// An empty instance pool.
    pub fn new() -> Self {
        Self::from_space(InstanceV6Space)
    }
}

impl Default for Pool<InstanceV6Space> {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Balancing-policy IPv6
// ---------------------------------------------------------------------------------------------------------------

/// One balancing policy's /21, from block + 1 to the end of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyV6Space {
    policy: BalancingPolicy,
}

// Pool names must be `&'static str` for `AddrError`, so the 30 names are spelled out.
const POLICY_POOL_NAMES: [&str; 30] = [
    "closest-v6",
    "round-robin-v6",
    "policy-3-v6",
    "policy-4-v6",
    "policy-5-v6",
    "policy-6-v6",
    "policy-7-v6",
    "policy-8-v6",
    "policy-9-v6",
    "policy-10-v6",
    "policy-11-v6",
    "policy-12-v6",
    "policy-13-v6",
    "policy-14-v6",
    "policy-15-v6",
    "policy-16-v6",
    "policy-17-v6",
    "policy-18-v6",
    "policy-19-v6",
    "policy-20-v6",
    "policy-21-v6",
    "policy-22-v6",
    "policy-23-v6",
    "policy-24-v6",
    "policy-25-v6",
    "policy-26-v6",
    "policy-27-v6",
    "policy-28-v6",
    "policy-29-v6",
    "policy-30-v6",
];

impl PolicyV6Space {
    /// The policy whose block this space covers.
    pub fn policy(self) -> BalancingPolicy {
        self.policy
    }

    fn first(self) -> Ipv6Addr {
        v6_after(policy_block(self.policy).network(), 1)
    }

    fn len(self) -> u128 {
        // A /21 has 2^107 addresses; the network address itself is not handed out.
        policy_block(self.policy).size().saturating_sub(1)
    }
}

impl AddressSpace for PolicyV6Space {
    type Addr = Ipv6Addr;

    fn name(&self) -> &'static str {
        usize::from(self.policy.get())
            .checked_sub(1)
            .and_then(|i| POLICY_POOL_NAMES.get(i))
            .copied()
            .unwrap_or("policy-v6")
    }

    fn capacity(&self) -> u128 {
        self.len()
    }

    fn nth(&self, index: u128) -> Option<Ipv6Addr> {
        v6_nth(self.first(), self.len(), index)
    }

    fn index_of(&self, addr: Ipv6Addr) -> Option<u128> {
        v6_index(self.first(), self.len(), addr)
    }

    fn ip_of(addr: Ipv6Addr) -> IpAddr {
        IpAddr::V6(addr)
    }
}

/// Service IPv6 addresses of one balancing policy, e.g. Round Robin from `fdff:2000::1` upward.
pub type PolicyIpv6Pool = Pool<PolicyV6Space>;

impl Pool<PolicyV6Space> {
    /// An empty pool over `policy`'s block.
    pub fn new(policy: BalancingPolicy) -> Self {
        Self::from_space(PolicyV6Space { policy })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Worker subnets
// ---------------------------------------------------------------------------------------------------------------

/// The 12,288 IPv4 /26 worker slots `10.18.0.0/26 ..= 10.29.255.192/26`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSubnetV4Space;

impl AddressSpace for WorkerSubnetV4Space {
    type Addr = WorkerSubnetV4;

    fn name(&self) -> &'static str {
        "worker-subnet-v4"
    }

    fn capacity(&self) -> u128 {
        u128::from(WORKER_SUBNET_V4_SLOTS)
    }

    fn nth(&self, index: u128) -> Option<WorkerSubnetV4> {
        WorkerSubnetV4::from_slot(u32::try_from(index).ok()?)
    }

    fn index_of(&self, addr: WorkerSubnetV4) -> Option<u128> {
        Some(u128::from(addr.slot()))
    }

    fn ip_of(addr: WorkerSubnetV4) -> IpAddr {
        IpAddr::V4(addr.network_addr())
    }
}

/// IPv4 worker subnets, first `10.18.0.0/26`; the TUN block `10.19.1.192/26` is never handed out, so the pool
/// holds 12,287.
pub type WorkerSubnetV4Pool = Pool<WorkerSubnetV4Space>;

impl Pool<WorkerSubnetV4Space> {
    /// An empty pool with the TUN block excluded.
    pub fn new() -> Self {
        let pool = Self::from_space(WorkerSubnetV4Space);
        match worker_subnet_v4_slot(TUN_SUBNET_V4) {
            Some(slot) => pool.excluding(u128::from(slot)),
            None => pool,
        }
    }
}

impl Default for Pool<WorkerSubnetV4Space> {
    fn default() -> Self {
        Self::new()
    }
}

/// The IPv6 /120 worker slots `fc00::/120 ..= fdfd:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSubnetV6Space;

impl AddressSpace for WorkerSubnetV6Space {
    type Addr = WorkerSubnetV6;

    fn name(&self) -> &'static str {
        "worker-subnet-v6"
    }

    fn capacity(&self) -> u128 {
        WORKER_SUBNET_V6_SLOTS
    }

    fn nth(&self, index: u128) -> Option<WorkerSubnetV6> {
        WorkerSubnetV6::from_slot(index)
    }

    fn index_of(&self, addr: WorkerSubnetV6) -> Option<u128> {
        Some(addr.slot())
    }

    fn ip_of(addr: WorkerSubnetV6) -> IpAddr {
        IpAddr::V6(addr.network_addr())
    }
}

/// IPv6 worker subnets, first `fc00::/120`; the /120 holding the TUN address is never handed out.
pub type WorkerSubnetV6Pool = Pool<WorkerSubnetV6Space>;

impl Pool<WorkerSubnetV6Space> {
    /// An empty pool with the TUN block excluded.
    pub fn new() -> Self {
        let pool = Self::from_space(WorkerSubnetV6Space);
        match worker_subnet_v6_slot(TUN_SUBNET_V6) {
            Some(slot) => pool.excluding(slot),
            None => pool,
        }
    }
}

impl Default for Pool<WorkerSubnetV6Space> {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Container addresses inside one worker subnet
// ---------------------------------------------------------------------------------------------------------------

/// The 61 container addresses of one IPv4 worker subnet (network + 2 ..= network + 62).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeV4Space {
    subnet: WorkerSubnetV4,
}

impl NodeV4Space {
    /// The subnet the addresses belong to.
    pub fn subnet(self) -> WorkerSubnetV4 {
        self.subnet
    }
}

impl AddressSpace for NodeV4Space {
    type Addr = Ipv4Addr;

    fn name(&self) -> &'static str {
        "node-v4"
    }

    fn capacity(&self) -> u128 {
        u128::from(WorkerSubnetV4::CONTAINER_COUNT)
    }

    fn nth(&self, index: u128) -> Option<Ipv4Addr> {
        v4_nth(
            self.subnet.first_container(),
            WorkerSubnetV4::CONTAINER_COUNT,
            index,
        )
    }

    fn index_of(&self, addr: Ipv4Addr) -> Option<u128> {
        v4_index(
            self.subnet.first_container(),
            WorkerSubnetV4::CONTAINER_COUNT,
            addr,
        )
    }

    fn ip_of(addr: Ipv4Addr) -> IpAddr {
        IpAddr::V4(addr)
    }
}

/// A worker's IPv4 container addresses.
pub type NodeAddressV4Pool = Pool<NodeV4Space>;

impl Pool<NodeV4Space> {
    /// An empty pool over `subnet`'s container addresses.
    pub fn new(subnet: WorkerSubnetV4) -> Self {
        Self::from_space(NodeV4Space { subnet })
    }
}

/// The 254 container addresses of one IPv6 worker subnet (network + 2 ..= network + 255).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeV6Space {
    subnet: WorkerSubnetV6,
}

impl NodeV6Space {
    /// The subnet the addresses belong to.
    pub fn subnet(self) -> WorkerSubnetV6 {
        self.subnet
    }
}

impl AddressSpace for NodeV6Space {
    type Addr = Ipv6Addr;

    fn name(&self) -> &'static str {
        "node-v6"
    }

    fn capacity(&self) -> u128 {
        u128::from(WorkerSubnetV6::CONTAINER_COUNT)
    }

    fn nth(&self, index: u128) -> Option<Ipv6Addr> {
        v6_nth(self.subnet.first_container(), self.capacity(), index)
    }

    fn index_of(&self, addr: Ipv6Addr) -> Option<u128> {
        v6_index(self.subnet.first_container(), self.capacity(), addr)
    }

    fn ip_of(addr: Ipv6Addr) -> IpAddr {
        IpAddr::V6(addr)
    }
}

/// A worker's IPv6 container addresses.
pub type NodeAddressV6Pool = Pool<NodeV6Space>;

impl Pool<NodeV6Space> {
    /// An empty pool over `subnet`'s container addresses.
    pub fn new(subnet: WorkerSubnetV6) -> Self {
        Self::from_space(NodeV6Space { subnet })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::addr::{
        plan::{SERVICE_POOL_V4, TUN_V4, TUN_V6, classify_v4, is_worker_subnet_v4, is_worker_subnet_v6},
        policy::{V6Class, classify_v6},
    };

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn subnet_v4(s: &str) -> WorkerSubnetV4 {
        s.parse().unwrap()
    }

    fn subnet_v6(s: &str) -> WorkerSubnetV6 {
        s.parse().unwrap()
    }

    const TUN_SLOT_V4: u32 = 1031;

    #[test]
    fn first_values() {
        let mut service = ServiceIpv4Pool::new();
        assert_eq!(service.capacity(), 65_534);
        assert_eq!(service.allocate().unwrap(), v4("10.30.0.1"));
        assert_eq!(service.allocate().unwrap(), v4("10.30.0.2"));
        assert_eq!(service.space().nth(65_533), Some(v4("10.30.255.254")));

        let mut workers = WorkerSubnetV4Pool::new();
        assert_eq!(workers.capacity(), 12_287);
        assert_eq!(workers.allocate().unwrap(), subnet_v4("10.18.0.0/26"));
        assert_eq!(workers.allocate().unwrap(), subnet_v4("10.18.0.64/26"));

        let mut workers6 = WorkerSubnetV6Pool::new();
        assert_eq!(workers6.capacity(), WORKER_SUBNET_V6_SLOTS - 1);
        assert_eq!(workers6.allocate().unwrap(), subnet_v6("fc00::/120"));
        assert_eq!(workers6.allocate().unwrap(), subnet_v6("fc00::100/120"));

        let subnet = subnet_v4("10.18.0.64/26");
        let mut node = NodeAddressV4Pool::new(subnet);
        assert_eq!(subnet.bridge(), v4("10.18.0.65"));
        assert_eq!(node.capacity(), 61);
        assert_eq!(node.allocate().unwrap(), v4("10.18.0.66"));
        assert_eq!(node.space().nth(60), Some(v4("10.18.0.126")));

        let mut node6 = NodeAddressV6Pool::new(subnet_v6("fc00::100/120"));
        assert_eq!(node6.capacity(), 254);
        assert_eq!(node6.allocate().unwrap(), v6("fc00::102"));
        assert_eq!(node6.space().nth(253), Some(v6("fc00::1ff")));

        let mut instance = InstanceIpv6Pool::new();
        assert_eq!(instance.allocate().unwrap(), v6("fdff::1"));
        assert_eq!(instance.capacity(), (1 << 108) - 1);
        assert_eq!(instance.space().nth((1 << 107) - 1), Some(v6("fdff:800::")));

        let mut rr = PolicyIpv6Pool::new(BalancingPolicy::ROUND_ROBIN);
        assert_eq!(rr.name(), "round-robin-v6");
        assert_eq!(rr.allocate().unwrap(), v6("fdff:2000::1"));
        assert_eq!(rr.capacity(), (1 << 107) - 1);
        assert_eq!(
            PolicyIpv6Pool::new(BalancingPolicy::new(30).unwrap()).name(),
            "policy-30-v6"
        );
    }

    #[test]
    fn tun_block_v4_is_never_returned() {
        let mut pool = WorkerSubnetV4Pool::new();
        let mut seen = BTreeSet::new();
        for _ in 0..12_287 {
            let subnet = pool.allocate().unwrap();
            assert_ne!(subnet.network(), TUN_SUBNET_V4);
            assert!(!subnet.network().contains(TUN_V4));
            assert!(seen.insert(subnet));
        }
        assert_eq!(
            pool.allocate(),
            Err(AddrError::Exhausted {
                pool: "worker-subnet-v4"
            })
        );
        assert_eq!(seen.last(), Some(&subnet_v4("10.29.255.192/26")));
        assert_eq!(pool.used_count(), pool.capacity());
    }

    #[test]
    fn tun_block_v6_is_skipped() {
        let mut pool = WorkerSubnetV6Pool::new();
        let tun_slot = worker_subnet_v6_slot(TUN_SUBNET_V6).unwrap();
        pool.set_cursor(tun_slot - 1).unwrap();
        assert_eq!(pool.allocate().unwrap(), subnet_v6("fcef::dead:bd00/120"));
        assert_eq!(pool.allocate().unwrap(), subnet_v6("fcef::dead:bf00/120"));
        // The last slot, then wrap-around to the first.
        pool.set_cursor(WORKER_SUBNET_V6_SLOTS - 1).unwrap();
        assert_eq!(
            pool.allocate().unwrap(),
            subnet_v6("fdfd:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120")
        );
        assert_eq!(pool.allocate().unwrap(), subnet_v6("fc00::/120"));
        assert!(!pool.allocate().unwrap().network().contains(TUN_V6));
    }

    #[test]
    fn errors_carry_the_offending_value() {
        let mut service = ServiceIpv4Pool::new();
        for bad in ["10.30.0.0", "10.30.255.255", "10.31.0.1"] {
            assert_eq!(
                service.reserve(v4(bad)),
                Err(AddrError::OutOfPool {
                    addr: IpAddr::V4(v4(bad)),
                    pool: "service-v4"
                })
            );
        }
        service.reserve(v4("10.30.0.1")).unwrap();
        let used = Err(AddrError::AlreadyUsed {
            addr: IpAddr::V4(v4("10.30.0.1")),
            pool: "service-v4",
        });
        assert_eq!(service.reserve(v4("10.30.0.1")), used);
        assert_eq!(
            service.free(v4("10.30.0.9")),
            Err(AddrError::NotAllocated {
                addr: IpAddr::V4(v4("10.30.0.9")),
                pool: "service-v4"
            })
        );
        assert_eq!(
            service.free(v4("10.30.0.0")),
            Err(AddrError::OutOfPool {
                addr: IpAddr::V4(v4("10.30.0.0")),
                pool: "service-v4"
            })
        );
        assert_eq!(
            service.set_cursor(65_534),
            Err(AddrError::CursorOutOfRange {
                cursor: 65_534,
                pool: "service-v4"
            })
        );
        assert_eq!(
            AddrError::Exhausted { pool: "node-v4" }.to_string(),
            "address pool node-v4 is exhausted"
        );
        assert_eq!(
            AddrError::OutOfPool {
                addr: IpAddr::V4(v4("10.30.0.0")),
                pool: "service-v4"
            }
            .to_string(),
            "address 10.30.0.0 is not in address pool service-v4"
        );

        let mut node = NodeAddressV4Pool::new(subnet_v4("10.18.0.64/26"));
        for bad in ["10.18.0.64", "10.18.0.65", "10.18.0.127", "10.18.0.128"] {
            assert!(
                matches!(node.reserve(v4(bad)), Err(AddrError::OutOfPool { .. })),
                "{bad}"
            );
        }
        let mut rr = PolicyIpv6Pool::new(BalancingPolicy::ROUND_ROBIN);
        assert!(matches!(
            rr.reserve(v6("fdff:1000::1")),
            Err(AddrError::OutOfPool { .. })
        ));
        assert!(matches!(
            rr.reserve(v6("fdff:2000::")),
            Err(AddrError::OutOfPool { .. })
        ));
        rr.reserve(v6("fdff:2000::55:55")).unwrap();
        assert!(rr.is_used(v6("fdff:2000::55:55")));
    }

    #[test]
    fn next_fit_reuses_freed_addresses_late() {
        let mut node = NodeAddressV4Pool::new(subnet_v4("10.18.0.0/26"));
        let first = node.allocate().unwrap();
        let second = node.allocate().unwrap();
        node.free(first).unwrap();
        // The cursor is past `first`: the next allocations go forward.
        assert_eq!(node.allocate().unwrap(), v4("10.18.0.4"));
        assert_eq!(node.peek_free(2), vec![v4("10.18.0.5"), v4("10.18.0.6")]);
        while node.free_count() > 1 {
            node.allocate().unwrap();
        }
        // Only after the cursor comes round is `first` handed out again.
        assert_eq!(node.allocate().unwrap(), first);
        assert!(node.is_used(second));
        assert_eq!(node.allocate(), Err(AddrError::Exhausted { pool: "node-v4" }));
        assert!(node.peek_free(3).is_empty());
    }

    #[test]
    fn persistence_round_trip() {
        let mut pool = ServiceIpv4Pool::new();
        for _ in 0..5 {
            pool.allocate().unwrap();
        }
        pool.free(v4("10.30.0.3")).unwrap();
        pool.reserve(v4("10.30.7.7")).unwrap();
        let used: Vec<_> = pool.iter_used().collect();
        assert_eq!(used.len(), 5);
        let mut restored = ServiceIpv4Pool::new();
        for addr in &used {
            restored.reserve(*addr).unwrap();
        }
        restored.set_cursor(pool.cursor()).unwrap();
        assert_eq!(restored, pool);
        assert_eq!(restored.allocate(), pool.allocate());
    }

    #[test]
    fn huge_spaces_allocate_fast_past_long_runs() {
        let mut rr = PolicyIpv6Pool::new(BalancingPolicy::ROUND_ROBIN);
        let last = rr.capacity() - 1;
        rr.set_cursor(last).unwrap();
        assert_eq!(
            rr.allocate().unwrap(),
            v6("fdff:27ff:ffff:ffff:ffff:ffff:ffff:ffff")
        );
        // Wrapped round to the block start.
        assert_eq!(rr.allocate().unwrap(), v6("fdff:2000::1"));
        for i in 1..1_000u128 {
            rr.reserve(rr.space().nth(i).unwrap()).unwrap();
        }
        assert_eq!(rr.allocate().unwrap(), rr.space().nth(1_000).unwrap());
        assert_eq!(rr.peek_free(1), vec![rr.space().nth(1_001).unwrap()]);
    }

    // ----- property tests -----

    #[derive(Debug, Clone)]
    enum Op {
        Allocate,
        /// Free the n-th live address (modulo how many are live).
        FreeLive(usize),
        /// Reserve the address this many indices after the cursor.
        ReserveNear(u128),
        /// Free the address this many indices after the cursor, live or not.
        FreeNear(u128),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Allocate),
            2 => any::<usize>().prop_map(Op::FreeLive),
            1 => (0u128..8).prop_map(Op::ReserveNear),
            1 => (0u128..8).prop_map(Op::FreeNear),
        ]
    }

    fn count<T>(set: &BTreeSet<T>) -> u128 {
        u128::try_from(set.len()).unwrap()
    }

    fn near<S: AddressSpace>(pool: &Pool<S>, offset: u128) -> Option<S::Addr> {
        let capacity = pool.space().capacity();
        pool.space().nth(pool.cursor().checked_add(offset)? % capacity)
    }

    /// Runs `ops` against `pool` and a model set, checking that no live address is ever handed out twice and every
    /// handed-out address satisfies `valid` (inside the range, not excluded).
    fn run_ops<S: AddressSpace>(
        mut pool: Pool<S>,
        ops: &[Op],
        valid: impl Fn(S::Addr) -> bool,
    ) -> Result<(), TestCaseError> {
        let mut live: BTreeSet<S::Addr> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Allocate => match pool.allocate() {
                    Ok(addr) => {
                        prop_assert!(valid(addr), "{addr:?} is outside its range");
                        prop_assert!(live.insert(addr), "{addr:?} handed out twice");
                    }
                    Err(AddrError::Exhausted { .. }) => prop_assert_eq!(count(&live), pool.capacity()),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
                Op::FreeLive(n) => {
                    if let Some(&addr) = live.iter().nth(n % live.len().max(1)) {
                        prop_assert_eq!(pool.free(addr), Ok(()));
                        live.remove(&addr);
                    }
                }
                Op::ReserveNear(offset) => {
                    if let Some(addr) = near(&pool, *offset) {
                        let result = pool.reserve(addr);
                        if live.insert(addr) {
                            prop_assert_eq!(result, Ok(()));
                        } else {
                            let already_used = matches!(result, Err(AddrError::AlreadyUsed { .. }));
                            prop_assert!(already_used, "reserve of a live address gave {:?}", result);
                        }
                    }
                }
                Op::FreeNear(offset) => {
                    if let Some(addr) = near(&pool, *offset) {
                        let result = pool.free(addr);
                        if live.remove(&addr) {
                            prop_assert_eq!(result, Ok(()));
                        } else {
                            let not_allocated = matches!(result, Err(AddrError::NotAllocated { .. }));
                            prop_assert!(not_allocated, "free of a free address gave {:?}", result);
                        }
                    }
                }
            }
            prop_assert_eq!(pool.used_count(), count(&live));
        }
        let used: BTreeSet<S::Addr> = pool.iter_used().collect();
        prop_assert_eq!(used, live);
        Ok(())
    }

    fn worker_subnet_v4() -> impl Strategy<Value = WorkerSubnetV4> {
        (0..WORKER_SUBNET_V4_SLOTS).prop_filter_map("TUN slot", WorkerSubnetV4::from_slot)
    }

    fn worker_subnet_v6() -> impl Strategy<Value = WorkerSubnetV6> {
        (0..WORKER_SUBNET_V6_SLOTS).prop_filter_map("TUN slot", WorkerSubnetV6::from_slot)
    }

    fn config(cases: u32) -> ProptestConfig {
        // No regression files: they would land in the source tree, which other people are editing.
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn random_ops_never_duplicate(
            subnet4 in worker_subnet_v4(),
            subnet6 in worker_subnet_v6(),
            policy in 1u8..=30,
            start in 0u128..64,
            ops in prop::collection::vec(op(), 1..150),
        ) {
            // Small pools, exercised through exhaustion and wrap-around.
            let node4 = NodeAddressV4Pool::new(subnet4);
            run_ops(node4, &ops, |a| subnet4.is_container(a) && a != subnet4.bridge())?;
            let node6 = NodeAddressV6Pool::new(subnet6);
            run_ops(node6, &ops, |a| subnet6.is_container(a) && a != subnet6.bridge())?;

            // Large pools, with the cursor placed where exclusion and wrap-around matter.
            let mut workers4 = WorkerSubnetV4Pool::new();
            workers4.set_cursor(u128::from(TUN_SLOT_V4) - start % 8).unwrap();
            run_ops(workers4, &ops, |s| is_worker_subnet_v4(s.network()) && s.network() != TUN_SUBNET_V4)?;
            let mut workers6 = WorkerSubnetV6Pool::new();
            workers6.set_cursor(worker_subnet_v6_slot(TUN_SUBNET_V6).unwrap() - start % 8).unwrap();
            run_ops(workers6, &ops, |s| is_worker_subnet_v6(s.network()) && s.network() != TUN_SUBNET_V6)?;

            let mut service = ServiceIpv4Pool::new();
            service.set_cursor(65_533 - start).unwrap();
            run_ops(service, &ops, |a| {
                SERVICE_POOL_V4.contains(a)
                    && a != SERVICE_POOL_V4.network()
                    && a != SERVICE_POOL_V4.broadcast()
                    && classify_v4(a) == crate::addr::plan::V4Class::Service
            })?;

            let policy = BalancingPolicy::new(policy).unwrap();
            let mut balanced = PolicyIpv6Pool::new(policy);
            balanced.set_cursor(balanced.space().capacity() - 1 - start).unwrap();
            run_ops(balanced, &ops, |a| {
                classify_v6(a) == V6Class::Balancing(policy) && a != policy_block(policy).network()
            })?;

            let mut instance = InstanceIpv6Pool::new();
            instance.set_cursor(instance.space().capacity() - 1 - start).unwrap();
            run_ops(instance, &ops, |a| classify_v6(a) == V6Class::Instance && a != v6("fdff::"))?;
        }

        #[test]
        fn freed_address_is_next_when_pool_is_full(subnet in worker_subnet_v4(), pick in 0usize..61, start in 0u128..61) {
            let mut pool = NodeAddressV4Pool::new(subnet);
            pool.set_cursor(start).unwrap();
            let all: Vec<Ipv4Addr> = (0..61).map(|_| pool.allocate().unwrap()).collect();
            let victim = all[pick];
            pool.free(victim).unwrap();
            prop_assert_eq!(pool.allocate(), Ok(victim));
            prop_assert_eq!(pool.allocate(), Err(AddrError::Exhausted { pool: "node-v4" }));
        }

        #[test]
        fn exactly_capacity_allocations_succeed(
            subnet4 in worker_subnet_v4(),
            subnet6 in worker_subnet_v6(),
            start4 in 0u128..61,
            start6 in 0u128..254,
            reserved in prop::collection::btree_set(0u128..61, 0..20),
        ) {
            let mut node4 = NodeAddressV4Pool::new(subnet4);
            node4.set_cursor(start4).unwrap();
            for &i in &reserved {
                node4.reserve(node4.space().nth(i).unwrap()).unwrap();
            }
            let mut got = BTreeSet::new();
            for _ in 0..(61 - reserved.len()) {
                prop_assert!(got.insert(node4.allocate().unwrap()));
            }
            prop_assert_eq!(node4.allocate(), Err(AddrError::Exhausted { pool: "node-v4" }));
            prop_assert_eq!(node4.used_count(), node4.capacity());

            let mut node6 = NodeAddressV6Pool::new(subnet6);
            node6.set_cursor(start6).unwrap();
            let mut got6 = BTreeSet::new();
            for _ in 0..254 {
                prop_assert!(got6.insert(node6.allocate().unwrap()));
            }
            prop_assert_eq!(node6.allocate(), Err(AddrError::Exhausted { pool: "node-v6" }));
        }

        #[test]
        fn reserved_addresses_are_never_allocated(
            subnet in worker_subnet_v4(),
            reserved in prop::collection::btree_set(0u128..61, 1..40),
            service_reserved in prop::collection::btree_set(0u128..64, 1..32),
        ) {
            let mut node = NodeAddressV4Pool::new(subnet);
            let reserved: BTreeSet<Ipv4Addr> = reserved.iter().map(|&i| node.space().nth(i).unwrap()).collect();
            for &addr in &reserved {
                node.reserve(addr).unwrap();
            }
            while let Ok(addr) = node.allocate() {
                prop_assert!(!reserved.contains(&addr));
            }
            prop_assert_eq!(node.used_count(), 61);

            let mut service = ServiceIpv4Pool::new();
            let service_reserved: BTreeSet<Ipv4Addr> =
                service_reserved.iter().map(|&i| service.space().nth(i).unwrap()).collect();
            for &addr in &service_reserved {
                service.reserve(addr).unwrap();
            }
            for _ in 0..96 {
                let addr = service.allocate().unwrap();
                prop_assert!(!service_reserved.contains(&addr));
            }
        }
    }
}
