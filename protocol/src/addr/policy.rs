//! The IPv6 balancing-policy encoding of `fdff::/16` (Oakestra v0.4.301, "up to 30 balancing policies") and IPv6
//! classification.
//!
//! `fdff::/16` is cut into 32 /21 blocks selected by the 16 bits `h` that follow `fdff` (bytes 2–3, which the
//! reference's byte-oriented description calls the third group; `fdff:2000::` has `h = 0x2000`); `block = h >> 11`:
//! - `fdff:0000::/21` and `fdff:0800::/21` hold instance addresses;
//! - otherwise, with bit `0x0800` of `h` clear the block is policy `h >> 12` (1..=15, `fdff:1000::/21` …
//!   `fdff:f000::/21`), with it set policy `15 + (h >> 12)` (16..=30, `fdff:1800::/21` … `fdff:f800::/21`).
//!
//! Policy 1 is Closest, policy 2 is Round Robin (a user-chosen `rr_ip_v6` must lie in its block); 3..=30 are
//! unnamed. The reference's worker never decodes this; ours can, so a service address alone says how to balance.

use std::{fmt, net::Ipv6Addr};

use ipnetwork::Ipv6Network;
use serde::{Deserialize, Serialize};

use super::{
    AddrError,
    plan::{OVERLAY_V6, SEMANTIC_V6, TUN_V6, in_worker_range_v6},
};

/// A balancing policy number, 1..=30, each owning one /21 of `fdff::/16` ([`policy_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct BalancingPolicy(u8);

impl BalancingPolicy {
    /// Lowest policy number.
    pub const MIN: u8 = 1;
    /// Highest policy number.
    pub const MAX: u8 = 30;
    /// Policy 1: send to the closest instance (reserved by the reference, not implemented there).
    pub const CLOSEST: Self = Self(1);
    /// Policy 2: round robin over the instances; the reference's only implemented policy.
    pub const ROUND_ROBIN: Self = Self(2);

    /// Checks that `number` is in 1..=30.
    pub fn new(number: u8) -> Result<Self, AddrError> {
        if (Self::MIN..=Self::MAX).contains(&number) {
            Ok(Self(number))
        } else {
            Err(AddrError::InvalidPolicy { policy: number })
        }
    }

    /// The policy number.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The policy's name, for the two policies Oakestra names.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::CLOSEST => Some("closest"),
            Self::ROUND_ROBIN => Some("round-robin"),
            _ => None,
        }
    }

    /// All 30 policies in order.
    pub fn all() -> impl Iterator<Item = Self> {
        (Self::MIN..=Self::MAX).map(Self)
    }

    /// The /21 this policy's service addresses come from (same as [`policy_block`]).
    pub fn block(self) -> Ipv6Network {
        policy_block(self)
    }

    /// The policy an address encodes, if it is in one of the 30 balancing blocks.
    pub fn of_addr(addr: Ipv6Addr) -> Option<Self> {
        match classify_v6(addr) {
            V6Class::Balancing(policy) => Some(policy),
            _ => None,
        }
    }
}

impl fmt::Display for BalancingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "policy {}", self.0),
        }
    }
}

impl TryFrom<u8> for BalancingPolicy {
    type Error = AddrError;

    fn try_from(number: u8) -> Result<Self, Self::Error> {
        Self::new(number)
    }
}

impl From<BalancingPolicy> for u8 {
    fn from(policy: BalancingPolicy) -> Self {
        policy.0
    }
}

/// Prefix length of each block of `fdff::/16`.
pub const BLOCK_PREFIX: u8 = 21;

/// Bit of the third group that selects the upper half (policies 16..=30, and the second instance block).
const UPPER_HALF: u16 = 0x0800;

/// The /21 of `fdff::/16` that encodes `policy`.
pub fn policy_block(policy: BalancingPolicy) -> Ipv6Network {
    let n = u16::from(policy.0);
    let group = if n <= 15 {
        n << 12
    } else {
        ((n - 15) << 12) | UPPER_HALF
    };
    let addr = Ipv6Addr::new(0xfdff, group, 0, 0, 0, 0, 0, 0);
    // Both the address and the constant prefix are valid; the fallback only keeps this function panic-free.
    Ipv6Network::new(addr, BLOCK_PREFIX).unwrap_or(SEMANTIC_V6)
}

/// What an IPv6 destination is, as far as the overlay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V6Class {
    /// In `fdff::/21` or `fdff:800::/21`: one instance's address.
    Instance,
    /// In a balancing block of `fdff::/16`: a service address balanced with this policy.
    Balancing(BalancingPolicy),
    /// In `fc00:: – fdfd:ffff:…:ffff`: a container (or bridge) address on some worker.
    WorkerNamespace,
    /// Exactly [`TUN_V6`].
    Tun,
    /// Anything else: the reserved `fdfe::/16` and everything outside `fc00::/7`.
    Other,
}

/// Classifies an IPv6 address against the plan and the policy encoding.
pub fn classify_v6(addr: Ipv6Addr) -> V6Class {
    if addr == TUN_V6 {
        return V6Class::Tun;
    }
    if SEMANTIC_V6.contains(addr) {
        let h = addr.segments()[1];
        if h >> 11 <= 1 {
            return V6Class::Instance;
        }
        // The top nibble of `h` is its first byte's high nibble; reading it from the bytes avoids a narrowing cast.
        let nibble = h.to_be_bytes()[0] >> 4;
        let number = if h & UPPER_HALF == 0 { nibble } else { 15 + nibble };
        // `h >> 11 >= 2` makes the nibble 1..=15, so the number is always 1..=30.
        return BalancingPolicy::new(number).map_or(V6Class::Other, V6Class::Balancing);
    }
    if OVERLAY_V6.contains(addr) && in_worker_range_v6(addr) {
        return V6Class::WorkerNamespace;
    }
    V6Class::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::plan::INSTANCE_V6_BLOCKS;

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn all_thirty_policies_round_trip() {
        let mut blocks = Vec::new();
        for policy in BalancingPolicy::all() {
            let block = policy_block(policy);
            assert_eq!(block.prefix(), 21);
            assert!(SEMANTIC_V6.is_supernet_of(block));
            assert_eq!(
                classify_v6(block.network()),
                V6Class::Balancing(policy),
                "{policy}"
            );
            assert_eq!(
                classify_v6(block.broadcast()),
                V6Class::Balancing(policy),
                "{policy}"
            );
            assert_eq!(BalancingPolicy::of_addr(block.nth(1).unwrap()), Some(policy));
            blocks.push(block);
        }
        assert_eq!(blocks.len(), 30);
        for (i, x) in blocks.iter().enumerate() {
            for y in &blocks[i + 1..] {
                assert!(!x.overlaps(*y));
            }
            for inst in INSTANCE_V6_BLOCKS {
                assert!(!x.overlaps(inst));
            }
        }
    }

    #[test]
    fn documented_blocks() {
        assert_eq!(
            policy_block(BalancingPolicy::CLOSEST),
            "fdff:1000::/21".parse().unwrap()
        );
        assert_eq!(
            policy_block(BalancingPolicy::ROUND_ROBIN),
            "fdff:2000::/21".parse().unwrap()
        );
        assert_eq!(
            policy_block(BalancingPolicy::new(15).unwrap()),
            "fdff:f000::/21".parse().unwrap()
        );
        assert_eq!(
            policy_block(BalancingPolicy::new(16).unwrap()),
            "fdff:1800::/21".parse().unwrap()
        );
        assert_eq!(
            policy_block(BalancingPolicy::new(30).unwrap()),
            "fdff:f800::/21".parse().unwrap()
        );
    }

    #[test]
    fn instance_blocks_classify_as_instance() {
        for block in INSTANCE_V6_BLOCKS {
            assert_eq!(classify_v6(block.network()), V6Class::Instance);
            assert_eq!(classify_v6(block.broadcast()), V6Class::Instance);
        }
        assert_eq!(classify_v6(a("fdff::")), V6Class::Instance);
        assert_eq!(classify_v6(a("fdff:800::1")), V6Class::Instance);
    }

    #[test]
    fn documented_addresses_classify() {
        assert_eq!(
            classify_v6(a("fdff:2000::55:55")),
            V6Class::Balancing(BalancingPolicy::ROUND_ROBIN)
        );
        assert_eq!(
            classify_v6(a("fdff:1000::1")),
            V6Class::Balancing(BalancingPolicy::CLOSEST)
        );
        assert_eq!(
            classify_v6(a("fdff:1800::1")),
            V6Class::Balancing(BalancingPolicy::new(16).unwrap())
        );
        assert_eq!(
            classify_v6(a("fdff:f800::1")),
            V6Class::Balancing(BalancingPolicy::new(30).unwrap())
        );
        assert_eq!(classify_v6(a("fdfe::1")), V6Class::Other);
        assert_eq!(classify_v6(a("fcef::dead:beef")), V6Class::Tun);
        assert_eq!(classify_v6(a("fcef::dead:beee")), V6Class::WorkerNamespace);
        assert_eq!(classify_v6(a("fc00::102")), V6Class::WorkerNamespace);
        assert_eq!(
            classify_v6(a("fdfd:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            V6Class::WorkerNamespace
        );
        assert_eq!(classify_v6(a("fbff::1")), V6Class::Other);
        assert_eq!(classify_v6(a("2001:db8::1")), V6Class::Other);
    }

    #[test]
    fn policy_numbers_are_checked() {
        assert_eq!(
            BalancingPolicy::new(0),
            Err(AddrError::InvalidPolicy { policy: 0 })
        );
        assert_eq!(
            BalancingPolicy::new(31),
            Err(AddrError::InvalidPolicy { policy: 31 })
        );
        assert_eq!(BalancingPolicy::new(2), Ok(BalancingPolicy::ROUND_ROBIN));
        assert_eq!(
            AddrError::InvalidPolicy { policy: 31 }.to_string(),
            "balancing policy 31 is outside 1..=30"
        );
    }

    #[test]
    fn display_and_serde() {
        assert_eq!(BalancingPolicy::ROUND_ROBIN.to_string(), "round-robin");
        assert_eq!(BalancingPolicy::CLOSEST.to_string(), "closest");
        assert_eq!(BalancingPolicy::new(7).unwrap().to_string(), "policy 7");
        assert_eq!(serde_json::to_string(&BalancingPolicy::ROUND_ROBIN).unwrap(), "2");
        assert_eq!(serde_json::from_str::<BalancingPolicy>("30").unwrap().get(), 30);
        assert!(serde_json::from_str::<BalancingPolicy>("31").is_err());
    }
}
