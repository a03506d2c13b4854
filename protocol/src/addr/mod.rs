//! The overlay address plan: fixed ranges ([`plan`]), the IPv6 balancing-policy encoding ([`policy`]) and the
//! address allocators every tier uses ([`alloc`]).
//!
//! Who uses what: the root hands out service/instance addresses and worker subnets, a worker's NetManager hands out
//! container addresses inside its subnet, and the TUN proxy classifies destination addresses. All of them agree on
//! the ranges defined here, which are the reference's ranges except where [`plan`] documents a deliberate fix.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

pub mod alloc;
pub mod plan;
pub mod policy;

pub use alloc::{
    AddressSpace, InstanceIpv6Pool, NodeAddressV4Pool, NodeAddressV6Pool, PolicyIpv6Pool, Pool,
    ServiceIpv4Pool, WorkerSubnetV4Pool, WorkerSubnetV6Pool,
};
pub use plan::{
    V4Class, WorkerSubnetV4, WorkerSubnetV6, classify_v4, is_worker_subnet_v4, is_worker_subnet_v6,
    service_pool_v4_usable,
};
pub use policy::{BalancingPolicy, V6Class, classify_v6, policy_block};

/// Everything that can go wrong when validating or allocating overlay addresses.
///
/// Pool names are the `name()` of the pool's [`AddressSpace`], e.g. `service-v4` or `worker-subnet-v4`; for subnet
/// pools the offending `addr` is the subnet's network address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Every address of the pool is in use.
    #[error("address pool {pool} is exhausted")]
    Exhausted { pool: &'static str },
    /// The address is not one the pool can hand out (outside its range, or permanently excluded).
    #[error("address {addr} is not in address pool {pool}")]
    OutOfPool { addr: IpAddr, pool: &'static str },
    /// `reserve` of an address that is already allocated or reserved.
    #[error("address {addr} is already in use in address pool {pool}")]
    AlreadyUsed { addr: IpAddr, pool: &'static str },
    /// `free` of an address that is not allocated.
    #[error("address {addr} is not allocated in address pool {pool}")]
    NotAllocated { addr: IpAddr, pool: &'static str },
    /// A persisted allocation cursor does not fit the pool it is restored into.
    #[error("cursor {cursor} is outside address pool {pool}")]
    CursorOutOfRange { cursor: u128, pool: &'static str },
    /// The network is not a worker subnet of the plan (wrong prefix, not aligned, outside the range, or the block
    /// that holds the TUN address).
    #[error("{net} is not a worker subnet of the address plan")]
    NotWorkerSubnet { net: IpNetwork },
    /// The text is not a worker subnet in CIDR or bare-network-address notation.
    #[error("{input:?} is not a worker subnet")]
    InvalidSubnet { input: String },
    /// Balancing policies are numbered 1 to 30.
    #[error("balancing policy {policy} is outside 1..=30")]
    InvalidPolicy { policy: u8 },
}
