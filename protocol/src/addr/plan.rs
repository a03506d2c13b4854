//! The fixed overlay ranges (IPv4 and IPv6), worker subnets with their node-local layout, and IPv4 classification.
//!
//! The ranges are Oakestra's (netmanager reference §1), with two deliberate fixes:
//! - the worker subnet that contains the TUN address (`10.19.1.192/26`, and the `/120` holding `fcef::dead:beef`) is
//!   never a worker subnet here; the reference would hand the TUN address to that worker's 61st container;
//! - the IPv6 semantic (translated) range is `fdff::/16`, not the reference proxy's mistaken `fcef::/21`.
//!
//! The service pool boundaries differ too (see [`SERVICE_V4_FIRST`]); IPv6 balancing blocks live in
//! [`super::policy`].

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use super::AddrError;

// Only called while evaluating the consts below, so a bad prefix is a compile error, never a runtime panic.
const fn v4_net(addr: Ipv4Addr, prefix: u8) -> Ipv4Network {
    match Ipv4Network::new_checked(addr, prefix) {
        Some(net) => net,
        None => panic!("IPv4 prefix longer than 32 bits"),
    }
}

const fn v6_net(addr: Ipv6Addr, prefix: u8) -> Ipv6Network {
    match Ipv6Network::new_checked(addr, prefix) {
        Some(net) => net,
        None => panic!("IPv6 prefix longer than 128 bits"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// IPv4
// ---------------------------------------------------------------------------------------------------------------

/// Everything a worker routes into its TUN device (the reference routes this /12, not the documented 10.0.0.0/8).
pub const OVERLAY_V4: Ipv4Network = v4_net(Ipv4Addr::new(10, 16, 0, 0), 12);

/// The worker's TUN device address (reference default); configured as `10.19.1.254/12`.
pub const TUN_V4: Ipv4Addr = Ipv4Addr::new(10, 19, 1, 254);

/// Prefix length the TUN address is configured with, which yields the connected route for [`OVERLAY_V4`].
pub const TUN_V4_PREFIX: u8 = 12;

/// Every worker gets one /26 (bridge + 61 containers).
pub const WORKER_SUBNET_V4_PREFIX: u8 = 26;

/// The first worker subnet's network address (`10.18.0.0/26`).
pub const WORKER_SUBNETS_V4_FIRST: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 0);

/// The last worker subnet's network address (`10.29.255.192/26`).
pub const WORKER_SUBNETS_V4_LAST: Ipv4Addr = Ipv4Addr::new(10, 29, 255, 192);

/// Number of /26 slots from [`WORKER_SUBNETS_V4_FIRST`] to [`WORKER_SUBNETS_V4_LAST`] (12 × 256 × 4), including the
/// one slot ([`TUN_SUBNET_V4`]) that is never handed out.
pub const WORKER_SUBNET_V4_SLOTS: u32 = 12_288;

/// The /26 that contains [`TUN_V4`]; it lies inside the worker range but is never a worker subnet.
pub const TUN_SUBNET_V4: Ipv4Network = v4_net(Ipv4Addr::new(10, 19, 1, 192), WORKER_SUBNET_V4_PREFIX);

/// Service round-robin addresses and instance addresses share this /16; the TUN proxy translates only this v4 range.
pub const SERVICE_POOL_V4: Ipv4Network = v4_net(Ipv4Addr::new(10, 30, 0, 0), 16);

/// First address our service pool hands out.
///
/// Deliberate difference from the reference, which hands out `10.30.0.0` first and skips every address with a 254
/// or 255 octet: we use the /16 as one contiguous range minus its network and broadcast addresses, which is simpler
/// and gives 65,534 addresses instead of 64,516. Addresses a reference root handed out still classify as service
/// addresses ([`classify_v4`] covers the whole /16), so both can coexist.
pub const SERVICE_V4_FIRST: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 1);

/// Last address our service pool hands out (see [`SERVICE_V4_FIRST`]).
pub const SERVICE_V4_LAST: Ipv4Addr = Ipv4Addr::new(10, 30, 255, 254);

/// Whether `addr` is one our service pool can hand out or accept as a user-chosen `rr_ip`: inside
/// [`SERVICE_POOL_V4`] but not its network or broadcast address.
pub fn service_pool_v4_usable(addr: Ipv4Addr) -> bool {
    (SERVICE_V4_FIRST..=SERVICE_V4_LAST).contains(&addr)
}

const WORKER_V4_BASE: u32 = u32::from_be_bytes(WORKER_SUBNETS_V4_FIRST.octets());
const WORKER_V4_STEP: u32 = 1 << (32 - WORKER_SUBNET_V4_PREFIX);

/// The /26 in worker slot `slot` (0 = `10.18.0.0/26`), the TUN slot included; `None` past the last slot.
pub(crate) fn worker_subnet_v4_at(slot: u32) -> Option<Ipv4Network> {
    if slot >= WORKER_SUBNET_V4_SLOTS {
        return None;
    }
    let base = WORKER_V4_BASE.checked_add(slot.checked_mul(WORKER_V4_STEP)?)?;
    Ipv4Network::new(Ipv4Addr::from(base), WORKER_SUBNET_V4_PREFIX).ok()
}

/// The slot of an aligned /26 inside the worker range (the TUN slot included).
pub(crate) fn worker_subnet_v4_slot(net: Ipv4Network) -> Option<u32> {
    // `Ipv4Network` keeps host bits, so `10.18.0.65/26` must be rejected explicitly rather than masked silently.
    if net.prefix() != WORKER_SUBNET_V4_PREFIX || net.ip() != net.network() {
        return None;
    }
    let offset = u32::from(net.ip()).checked_sub(WORKER_V4_BASE)?;
    let slot = offset / WORKER_V4_STEP;
    (slot < WORKER_SUBNET_V4_SLOTS).then_some(slot)
}

/// Whether `net` is a /26 the plan may hand to a worker: aligned, inside `10.18.0.0 – 10.29.255.255`, not the TUN
/// block.
pub fn is_worker_subnet_v4(net: Ipv4Network) -> bool {
    worker_subnet_v4_slot(net).is_some() && net != TUN_SUBNET_V4
}

/// What an IPv4 destination is, as far as the overlay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V4Class {
    /// In `10.30.0.0/16`: a service round-robin address or an instance address; only the translation table can tell
    /// which, because both come from one pool.
    Service,
    /// In the worker-subnet range `10.18.0.0 – 10.29.255.255`: a container (or bridge) address on some worker.
    WorkerNamespace,
    /// Exactly [`TUN_V4`].
    Tun,
    /// Anything else, including the unused parts of [`OVERLAY_V4`].
    Other,
}

/// Classifies an IPv4 address against the plan.
///
/// Range based on purpose: the rest of [`TUN_SUBNET_V4`] is still [`V4Class::WorkerNamespace`], because a
/// reference root may have given that block to a worker and its containers must stay reachable.
pub fn classify_v4(addr: Ipv4Addr) -> V4Class {
    if addr == TUN_V4 {
        return V4Class::Tun;
    }
    if SERVICE_POOL_V4.contains(addr) {
        return V4Class::Service;
    }
    let raw = u32::from(addr);
    let last = u32::from(WORKER_SUBNETS_V4_LAST).saturating_add(WORKER_V4_STEP - 1);
    if (WORKER_V4_BASE..=last).contains(&raw) {
        V4Class::WorkerNamespace
    } else {
        V4Class::Other
    }
}

/// One worker's IPv4 /26, validated against the plan, with its node-local layout: network, bridge (+1), 61
/// container addresses (+2 ..= +62), broadcast (+63).
///
/// Serialized as CIDR text (`"10.18.0.64/26"`); parsing also accepts the bare network address (`"10.18.0.64"`),
/// the form the reference puts on the wire (`subnet_addr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerSubnetV4(Ipv4Network);

impl WorkerSubnetV4 {
    /// Number of container addresses in one subnet.
    pub const CONTAINER_COUNT: u32 = 61;

    /// Validates that `net` is a worker subnet of the plan ([`is_worker_subnet_v4`]).
    pub fn new(net: Ipv4Network) -> Result<Self, AddrError> {
        if is_worker_subnet_v4(net) {
            Ok(Self(net))
        } else {
            Err(AddrError::NotWorkerSubnet {
                net: IpNetwork::V4(net),
            })
        }
    }

    /// The /26 itself.
    pub fn network(self) -> Ipv4Network {
        self.0
    }

    /// The network address (what the reference sends as `subnet_addr`).
    pub fn network_addr(self) -> Ipv4Addr {
        self.0.ip()
    }

    /// The worker bridge's address, network + 1; containers use it as their default gateway.
    pub fn bridge(self) -> Ipv4Addr {
        self.offset(1)
    }

    /// The first container address, network + 2.
    pub fn first_container(self) -> Ipv4Addr {
        self.offset(2)
    }

    /// The last container address, network + 62 (network + 63 is the broadcast address).
    pub fn last_container(self) -> Ipv4Addr {
        self.offset(62)
    }

    /// Whether `addr` is one of this subnet's 61 container addresses.
    pub fn is_container(self, addr: Ipv4Addr) -> bool {
        (self.first_container()..=self.last_container()).contains(&addr)
    }

    /// The position of this subnet in the plan's slot sequence (0 = `10.18.0.0/26`).
    pub fn slot(self) -> u32 {
        // Validated at construction; 0 is unreachable and harmless.
        worker_subnet_v4_slot(self.0).unwrap_or(0)
    }

    /// For the allocator, which only builds slots it has checked against the TUN slot.
    pub(crate) fn from_slot(slot: u32) -> Option<Self> {
        worker_subnet_v4_at(slot)
            .filter(|net| *net != TUN_SUBNET_V4)
            .map(Self)
    }

    fn offset(self, n: u32) -> Ipv4Addr {
        // The network address is at most 10.29.255.192 and n ≤ 63, so this never saturates.
        Ipv4Addr::from(u32::from(self.0.ip()).saturating_add(n))
    }
}

impl fmt::Display for WorkerSubnetV4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.ip(), self.0.prefix())
    }
}

impl FromStr for WorkerSubnetV4 {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || AddrError::InvalidSubnet { input: s.to_owned() };
        let net = if s.contains('/') {
            Ipv4Network::from_str(s).map_err(|_| invalid())?
        } else {
            let addr = Ipv4Addr::from_str(s).map_err(|_| invalid())?;
            Ipv4Network::new(addr, WORKER_SUBNET_V4_PREFIX).map_err(|_| invalid())?
        };
        Self::new(net)
    }
}

impl TryFrom<String> for WorkerSubnetV4 {
    type Error = AddrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WorkerSubnetV4> for String {
    fn from(subnet: WorkerSubnetV4) -> Self {
        subnet.to_string()
    }
}

impl From<WorkerSubnetV4> for Ipv4Network {
    fn from(subnet: WorkerSubnetV4) -> Self {
        subnet.0
    }
}

impl TryFrom<Ipv4Network> for WorkerSubnetV4 {
    type Error = AddrError;

    fn try_from(net: Ipv4Network) -> Result<Self, Self::Error> {
        Self::new(net)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------------------------------------------

/// The whole Oakestra IPv6 network; the TUN address's /7 gives the connected route into the TUN.
pub const OVERLAY_V6: Ipv6Network = v6_net(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7);

/// The worker's TUN device address (reference default); configured as `fcef::dead:beef/7`.
pub const TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfcef, 0, 0, 0, 0, 0, 0xdead, 0xbeef);

/// Prefix length the TUN address is configured with, which yields the connected route for [`OVERLAY_V6`].
pub const TUN_V6_PREFIX: u8 = 7;

/// Every worker gets one /120 (bridge + 254 containers).
pub const WORKER_SUBNET_V6_PREFIX: u8 = 120;

/// The first worker subnet's network address (`fc00::/120`).
pub const WORKER_SUBNETS_V6_FIRST: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0);

/// The last worker subnet's network address; the next /120 would be in the reserved `fdfe::/16`.
pub const WORKER_SUBNETS_V6_LAST: Ipv6Addr =
    Ipv6Addr::new(0xfdfd, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xff00);

const WORKER_V6_BASE: u128 = u128::from_be_bytes(WORKER_SUBNETS_V6_FIRST.octets());
const WORKER_V6_SHIFT: u32 = 128 - WORKER_SUBNET_V6_PREFIX as u32;

/// Number of /120 slots from `fc00::/120` to [`WORKER_SUBNETS_V6_LAST`], including the TUN slot.
pub const WORKER_SUBNET_V6_SLOTS: u128 =
    ((u128::from_be_bytes(WORKER_SUBNETS_V6_LAST.octets()) - WORKER_V6_BASE) >> WORKER_V6_SHIFT) + 1;

/// The /120 that contains [`TUN_V6`]; it lies inside the worker range but is never a worker subnet.
pub const TUN_SUBNET_V6: Ipv6Network = v6_net(
    Ipv6Addr::new(0xfcef, 0, 0, 0, 0, 0, 0xdead, 0xbe00),
    WORKER_SUBNET_V6_PREFIX,
);

/// Reserved by the reference; never handed out, never translated.
pub const RESERVED_V6: Ipv6Network = v6_net(Ipv6Addr::new(0xfdfe, 0, 0, 0, 0, 0, 0, 0), 16);

/// The IPv6 semantic range the TUN proxy translates: instance addresses and the balancing-policy blocks.
///
/// The reference proxy used `fcef::/21`, which is inside the worker-subnet range and matches no service address;
/// the documented plan (and the root's allocator) use `fdff::/16`.
pub const SEMANTIC_V6: Ipv6Network = v6_net(Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 0), 16);

/// The two /21 blocks instance addresses come from, in allocation order (together they are `fdff::/20`).
pub const INSTANCE_V6_BLOCKS: [Ipv6Network; 2] = [
    v6_net(Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 0), 21),
    v6_net(Ipv6Addr::new(0xfdff, 0x0800, 0, 0, 0, 0, 0, 0), 21),
];

/// The /120 in worker slot `slot` (0 = `fc00::/120`), the TUN slot included; `None` past the last slot.
pub(crate) fn worker_subnet_v6_at(slot: u128) -> Option<Ipv6Network> {
    if slot >= WORKER_SUBNET_V6_SLOTS {
        return None;
    }
    let base = WORKER_V6_BASE.checked_add(slot.checked_shl(WORKER_V6_SHIFT)?)?;
    Ipv6Network::new(Ipv6Addr::from(base), WORKER_SUBNET_V6_PREFIX).ok()
}

/// The slot of an aligned /120 inside the worker range (the TUN slot included).
pub(crate) fn worker_subnet_v6_slot(net: Ipv6Network) -> Option<u128> {
    if net.prefix() != WORKER_SUBNET_V6_PREFIX || net.ip() != net.network() {
        return None;
    }
    let slot = u128::from(net.ip()).checked_sub(WORKER_V6_BASE)? >> WORKER_V6_SHIFT;
    (slot < WORKER_SUBNET_V6_SLOTS).then_some(slot)
}

/// Whether `net` is a /120 the plan may hand to a worker: aligned, inside `fc00:: – fdfd:…:ffff`, not the TUN
/// block.
pub fn is_worker_subnet_v6(net: Ipv6Network) -> bool {
    worker_subnet_v6_slot(net).is_some() && net != TUN_SUBNET_V6
}

/// Whether `addr` is in the worker-subnet range `fc00:: – fdfd:ffff:…:ffff` (TUN block included, like
/// [`classify_v4`]).
pub(crate) fn in_worker_range_v6(addr: Ipv6Addr) -> bool {
    let raw = u128::from(addr);
    let end = u128::from(RESERVED_V6.ip());
    (WORKER_V6_BASE..end).contains(&raw)
}

/// One worker's IPv6 /120, validated against the plan, with its node-local layout: network, bridge (+1), 254
/// container addresses (+2 ..= +255).
///
/// Serialized as CIDR text (`"fc00::100/120"`); parsing also accepts the bare network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerSubnetV6(Ipv6Network);

impl WorkerSubnetV6 {
    /// Number of container addresses in one subnet.
    pub const CONTAINER_COUNT: u32 = 254;

    /// Validates that `net` is a worker subnet of the plan ([`is_worker_subnet_v6`]).
    pub fn new(net: Ipv6Network) -> Result<Self, AddrError> {
        if is_worker_subnet_v6(net) {
            Ok(Self(net))
        } else {
            Err(AddrError::NotWorkerSubnet {
                net: IpNetwork::V6(net),
            })
        }
    }

    /// The /120 itself.
    pub fn network(self) -> Ipv6Network {
        self.0
    }

    /// The network address (what the reference sends as `subnet_addr_v6`).
    pub fn network_addr(self) -> Ipv6Addr {
        self.0.ip()
    }

    /// The worker bridge's address, network + 1.
    pub fn bridge(self) -> Ipv6Addr {
        self.offset(1)
    }

    /// The first container address, network + 2.
    pub fn first_container(self) -> Ipv6Addr {
        self.offset(2)
    }

    /// The last container address, network + 255 (IPv6 has no broadcast address to keep free).
    pub fn last_container(self) -> Ipv6Addr {
        self.offset(255)
    }

    /// Whether `addr` is one of this subnet's 254 container addresses.
    pub fn is_container(self, addr: Ipv6Addr) -> bool {
        (self.first_container()..=self.last_container()).contains(&addr)
    }

    /// The position of this subnet in the plan's slot sequence (0 = `fc00::/120`).
    pub fn slot(self) -> u128 {
        // Validated at construction; 0 is unreachable and harmless.
        worker_subnet_v6_slot(self.0).unwrap_or(0)
    }

    /// For the allocator, which only builds slots it has checked against the TUN slot.
    pub(crate) fn from_slot(slot: u128) -> Option<Self> {
        worker_subnet_v6_at(slot)
            .filter(|net| *net != TUN_SUBNET_V6)
            .map(Self)
    }

    fn offset(self, n: u128) -> Ipv6Addr {
        // The network address is at most fdfd:…:ff00 and n ≤ 255, so this never saturates.
        Ipv6Addr::from(u128::from(self.0.ip()).saturating_add(n))
    }
}

impl fmt::Display for WorkerSubnetV6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.ip(), self.0.prefix())
    }
}

impl FromStr for WorkerSubnetV6 {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || AddrError::InvalidSubnet { input: s.to_owned() };
        let net = if s.contains('/') {
            Ipv6Network::from_str(s).map_err(|_| invalid())?
        } else {
            let addr = Ipv6Addr::from_str(s).map_err(|_| invalid())?;
            Ipv6Network::new(addr, WORKER_SUBNET_V6_PREFIX).map_err(|_| invalid())?
        };
        Self::new(net)
    }
}

impl TryFrom<String> for WorkerSubnetV6 {
    type Error = AddrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WorkerSubnetV6> for String {
    fn from(subnet: WorkerSubnetV6) -> Self {
        subnet.to_string()
    }
}

impl From<WorkerSubnetV6> for Ipv6Network {
    fn from(subnet: WorkerSubnetV6) -> Self {
        subnet.0
    }
}

impl TryFrom<Ipv6Network> for WorkerSubnetV6 {
    type Error = AddrError;

    fn try_from(net: Ipv6Network) -> Result<Self, Self::Error> {
        Self::new(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    #[test]
    fn fixed_ranges_are_the_documented_ones() {
        assert_eq!(OVERLAY_V4, v4("10.16.0.0/12"));
        assert!(OVERLAY_V4.contains(TUN_V4));
        assert_eq!(
            Ipv4Network::new(TUN_V4, TUN_V4_PREFIX).unwrap().network(),
            OVERLAY_V4.ip()
        );
        assert_eq!(SERVICE_POOL_V4, v4("10.30.0.0/16"));
        assert!(TUN_SUBNET_V4.contains(TUN_V4));
        assert_eq!(OVERLAY_V6, v6("fc00::/7"));
        assert_eq!(TUN_V6, "fcef::dead:beef".parse::<Ipv6Addr>().unwrap());
        assert!(TUN_SUBNET_V6.contains(TUN_V6));
        assert_eq!(SEMANTIC_V6, v6("fdff::/16"));
        assert_eq!(INSTANCE_V6_BLOCKS, [v6("fdff::/21"), v6("fdff:800::/21")]);
        assert_eq!(WORKER_SUBNET_V6_SLOTS, 0x1fe << 104);
    }

    #[test]
    fn worker_v4_slots_cover_the_documented_range() {
        assert_eq!(worker_subnet_v4_at(0), Some(v4("10.18.0.0/26")));
        assert_eq!(worker_subnet_v4_at(1), Some(v4("10.18.0.64/26")));
        assert_eq!(
            worker_subnet_v4_at(WORKER_SUBNET_V4_SLOTS - 1),
            Some(v4("10.29.255.192/26"))
        );
        assert_eq!(worker_subnet_v4_at(WORKER_SUBNET_V4_SLOTS), None);
        assert_eq!(
            worker_subnet_v4_slot(v4("10.29.255.192/26")),
            Some(WORKER_SUBNET_V4_SLOTS - 1)
        );
        assert_eq!(worker_subnet_v4_slot(v4("10.30.0.0/26")), None);
        assert_eq!(worker_subnet_v4_slot(v4("10.17.255.192/26")), None);
        assert_eq!(worker_subnet_v4_slot(v4("10.18.0.65/26")), None);
        assert_eq!(worker_subnet_v4_slot(v4("10.18.0.0/24")), None);
        assert!(worker_subnet_v4_slot(TUN_SUBNET_V4).is_some());
        assert!(!is_worker_subnet_v4(TUN_SUBNET_V4));
        assert!(is_worker_subnet_v4(v4("10.19.1.128/26")));
    }

    #[test]
    fn worker_v6_slots_cover_the_documented_range() {
        assert_eq!(worker_subnet_v6_at(0), Some(v6("fc00::/120")));
        assert_eq!(worker_subnet_v6_at(1), Some(v6("fc00::100/120")));
        assert_eq!(
            worker_subnet_v6_at(WORKER_SUBNET_V6_SLOTS - 1),
            Some(v6("fdfd:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"))
        );
        assert_eq!(worker_subnet_v6_at(WORKER_SUBNET_V6_SLOTS), None);
        assert_eq!(worker_subnet_v6_slot(v6("fdfe::/120")), None);
        assert_eq!(worker_subnet_v6_slot(v6("fc00::1/120")), None);
        assert!(!is_worker_subnet_v6(TUN_SUBNET_V6));
        assert!(is_worker_subnet_v6(v6("fcef::dead:bf00/120")));
    }

    #[test]
    fn classify_v4_cases() {
        let c = |s: &str| classify_v4(s.parse().unwrap());
        assert_eq!(c("10.19.1.254"), V4Class::Tun);
        assert_eq!(c("10.19.1.253"), V4Class::WorkerNamespace);
        assert_eq!(c("10.18.0.0"), V4Class::WorkerNamespace);
        assert_eq!(c("10.29.255.255"), V4Class::WorkerNamespace);
        assert_eq!(c("10.30.0.0"), V4Class::Service);
        assert_eq!(c("10.30.255.255"), V4Class::Service);
        assert_eq!(c("10.17.255.255"), V4Class::Other);
        assert_eq!(c("10.31.0.1"), V4Class::Other);
        assert_eq!(c("192.168.1.1"), V4Class::Other);
        assert!(service_pool_v4_usable(Ipv4Addr::new(10, 30, 0, 1)));
        assert!(service_pool_v4_usable(Ipv4Addr::new(10, 30, 255, 254)));
        assert!(!service_pool_v4_usable(Ipv4Addr::new(10, 30, 0, 0)));
        assert!(!service_pool_v4_usable(Ipv4Addr::new(10, 30, 255, 255)));
    }

    #[test]
    fn worker_subnet_v4_layout() {
        let s = WorkerSubnetV4::new(v4("10.18.0.64/26")).unwrap();
        assert_eq!(s.bridge(), Ipv4Addr::new(10, 18, 0, 65));
        assert_eq!(s.first_container(), Ipv4Addr::new(10, 18, 0, 66));
        assert_eq!(s.last_container(), Ipv4Addr::new(10, 18, 0, 126));
        assert_eq!(s.slot(), 1);
        assert!(s.is_container(Ipv4Addr::new(10, 18, 0, 100)));
        assert!(!s.is_container(s.bridge()));
        assert!(!s.is_container(Ipv4Addr::new(10, 18, 0, 127)));
        let count = u32::from(s.last_container()) - u32::from(s.first_container()) + 1;
        assert_eq!(count, WorkerSubnetV4::CONTAINER_COUNT);
    }

    #[test]
    fn worker_subnet_v4_rejects_non_plan_blocks() {
        for bad in [
            "10.19.1.192/26",
            "10.18.0.65/26",
            "10.18.0.0/25",
            "10.30.0.0/26",
            "192.168.0.0/26",
        ] {
            let net = v4(bad);
            assert_eq!(
                WorkerSubnetV4::new(net),
                Err(AddrError::NotWorkerSubnet {
                    net: IpNetwork::V4(net)
                })
            );
        }
    }

    #[test]
    fn worker_subnet_v6_layout() {
        let s = WorkerSubnetV6::new(v6("fc00::100/120")).unwrap();
        assert_eq!(s.bridge(), "fc00::101".parse::<Ipv6Addr>().unwrap());
        assert_eq!(s.first_container(), "fc00::102".parse::<Ipv6Addr>().unwrap());
        assert_eq!(s.last_container(), "fc00::1ff".parse::<Ipv6Addr>().unwrap());
        let count = u128::from(s.last_container()) - u128::from(s.first_container()) + 1;
        assert_eq!(count, u128::from(WorkerSubnetV6::CONTAINER_COUNT));
        assert!(WorkerSubnetV6::new(TUN_SUBNET_V6).is_err());
        assert!(WorkerSubnetV6::new(v6("fdfe::/120")).is_err());
        assert!(WorkerSubnetV6::new(v6("fc00::/112")).is_err());
    }

    #[test]
    fn worker_subnets_parse_and_serialize() {
        let s: WorkerSubnetV4 = "10.18.0.64".parse().unwrap();
        assert_eq!(s, "10.18.0.64/26".parse().unwrap());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"10.18.0.64/26\"");
        assert_eq!(
            serde_json::from_str::<WorkerSubnetV4>("\"10.18.0.64/26\"").unwrap(),
            s
        );
        assert!(serde_json::from_str::<WorkerSubnetV4>("\"10.19.1.192/26\"").is_err());
        assert_eq!(
            "nonsense".parse::<WorkerSubnetV4>(),
            Err(AddrError::InvalidSubnet {
                input: "nonsense".to_owned()
            })
        );
        let s6: WorkerSubnetV6 = "fc00::100".parse().unwrap();
        assert_eq!(s6.to_string(), "fc00::100/120");
        assert_eq!(
            serde_json::from_str::<WorkerSubnetV6>("\"fc00::100/120\"").unwrap(),
            s6
        );
    }
}
