//! `#[repr(C)]` map keys and values shared by the eBPF programs and NetManager. `no_std`, plain old data only.
//!
//! The TUN proxy's connection table and the eBPF fast path speak these types, so an established flow can be
//! mirrored into a BPF map without translation. Rules for every type here: explicit-width integers only (no
//! `bool`, no enums), fields ordered so there is no implicit padding (the kernel compares keys byte for byte, and
//! padding bytes would be uninitialised), addresses and ports in network byte order as they sit in the packet.
#![no_std]

/// IP protocol numbers as they appear in the IPv4 `protocol` / IPv6 `next header` field.
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Address family tag stored in [`FlowKey::family`].
pub mod family {
    /// IPv4: only the first 4 bytes of each address are used, the rest are zero.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// One direction of a flow: the 5-tuple plus address family. 40 bytes, no padding.
///
/// IPv4 addresses occupy the first 4 bytes of the 16-byte arrays and the rest must be zero, so one map serves both
/// families. For ICMP echo, `src_port` holds the echo identifier and `dst_port` is zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub src_addr: [u8; 16],
    /// Destination address, network byte order.
    pub dst_addr: [u8; 16],
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// [`proto`] number.
    pub protocol: u8,
    /// [`family`] tag.
    pub family: u8,
    /// Always zero; makes the tail padding explicit so keys compare byte for byte.
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// An IPv4 key from addresses and ports in network byte order.
    pub const fn v4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, protocol: u8) -> Self {
        let mut src_addr = [0u8; 16];
        let mut dst_addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            src_addr[i] = src[i];
            dst_addr[i] = dst[i];
            i += 1;
        }
        FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            protocol,
            family: family::V4,
            _pad: [0; 2],
        }
    }

    /// An IPv6 key from addresses and ports in network byte order.
    pub const fn v6(src: [u8; 16], dst: [u8; 16], src_port: u16, dst_port: u16, protocol: u8) -> Self {
        FlowKey {
            src_addr: src,
            dst_addr: dst,
            src_port,
            dst_port,
            protocol,
            family: family::V6,
            _pad: [0; 2],
        }
    }

    /// The key of the reply direction (addresses and ports swapped).
    pub const fn reversed(&self) -> Self {
        FlowKey {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// What to do with a packet of a known flow: rewrite it to these addresses and, if `tunnel_port` is not zero, send
/// it inside a UDP datagram to `tunnel_addr`:`tunnel_port` (the worker that hosts the destination). 52 bytes, no
/// padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowAction {
    /// New source address (network byte order; IPv4 in the first 4 bytes).
    pub new_src: [u8; 16],
    /// New destination address.
    pub new_dst: [u8; 16],
    /// Underlay address of the worker that hosts the destination, always 16 bytes: an IPv6 address, or an
    /// IPv4-mapped one (`::ffff:a.b.c.d`, see [`FlowAction::v4_mapped`]) for an IPv4 underlay. Unlike the flow
    /// addresses, no family tag says which, so the mapped form is what tells them apart. Ignored when
    /// `tunnel_port` is zero.
    pub tunnel_addr: [u8; 16],
    /// UDP port of the tunnel on that worker, network byte order; 0 = deliver locally (no tunnel).
    pub tunnel_port: u16,
    /// Always zero; makes the tail padding explicit so map values compare byte for byte.
    pub _pad: [u8; 2],
}

impl FlowAction {
    /// An action from its parts (addresses and port in network byte order, as stored).
    pub const fn new(new_src: [u8; 16], new_dst: [u8; 16], tunnel_addr: [u8; 16], tunnel_port: u16) -> Self {
        FlowAction {
            new_src,
            new_dst,
            tunnel_addr,
            tunnel_port,
            _pad: [0; 2],
        }
    }

    /// An action that rewrites the addresses and delivers the packet on this worker.
    pub const fn local(new_src: [u8; 16], new_dst: [u8; 16]) -> Self {
        Self::new(new_src, new_dst, [0; 16], 0)
    }

    /// Whether the packet stays on this worker (no tunnel).
    pub const fn is_local(&self) -> bool {
        self.tunnel_port == 0
    }

    /// `::ffff:a.b.c.d`: how an IPv4 underlay address is stored in [`FlowAction::tunnel_addr`].
    pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]
    }
}

/// A flow-map value: the action of [`FlowAction`] plus when the fast path last forwarded a packet of the flow.
/// 64 bytes, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowEntry {
    /// `CLOCK_MONOTONIC` nanoseconds (the kernel's coarse clock) of the last packet the fast path forwarded;
    /// written by the programs at most about once a second, read by NetManager's expiry sweep.
    pub last_seen_ns: u64,
    /// What to do with the flow's packets.
    pub action: FlowAction,
    /// Always zero.
    pub _pad: [u8; 4],
}

impl FlowEntry {
    /// An entry for `action`, last seen at `now_ns`.
    pub const fn new(action: FlowAction, now_ns: u64) -> Self {
        FlowEntry {
            last_seen_ns: now_ns,
            action,
            _pad: [0; 4],
        }
    }
}

/// Key of the local-instance map: a container's namespace address on this worker. 20 bytes, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LocalKey {
    /// The address (IPv4 in the first 4 bytes, rest zero), network byte order.
    pub addr: [u8; 16],
    /// [`family`] tag.
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

impl LocalKey {
    /// The key of an IPv4 namespace address.
    pub const fn v4(a: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = a[0];
        addr[1] = a[1];
        addr[2] = a[2];
        addr[3] = a[3];
        LocalKey {
            addr,
            family: family::V4,
            _pad: [0; 3],
        }
    }

    /// The key of an IPv6 namespace address.
    pub const fn v6(addr: [u8; 16]) -> Self {
        LocalKey {
            addr,
            family: family::V6,
            _pad: [0; 3],
        }
    }
}

/// Where a local container is: the host end of its veth (the programs redirect to its peer) and the MAC address of
/// the container's end (the destination MAC a frame must carry). 12 bytes, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LocalDest {
    /// Interface index of the host end of the veth.
    pub ifindex: u32,
    /// MAC address of the container's end.
    pub mac: [u8; 6],
    /// Always zero.
    pub _pad: [u8; 2],
}

/// The fast path's settings (a one-element array map written by NetManager before any program is attached).
/// 20 bytes, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// Interface index of the underlay (the route lookup for encapsulated packets is made out of it).
    pub underlay_ifindex: u32,
    /// The overlay's UDP port on this worker (network byte order): underlay packets to it are decapsulated.
    pub tunnel_port: u16,
    /// [`config_flags`] bits.
    pub flags: u16,
    /// This worker's IPv4 underlay address (the source of encapsulated packets), network byte order.
    pub underlay_v4: [u8; 4],
    /// MAC address of the container bridge: the source MAC of frames delivered to containers (the gateway they
    /// talk to).
    pub gateway_mac: [u8; 6],
    /// Always zero.
    pub _pad: [u8; 2],
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// The programs may translate and forward (clear: every packet goes to the slow path).
    pub const ENABLED: u16 = 1;
    /// `underlay_v4` and `underlay_ifindex` are set: flows to other workers over an IPv4 underlay are
    /// encapsulated in the kernel.
    pub const ENCAP_V4: u16 = 2;
}

/// Slots of the per-CPU statistics array; each slot holds `[packets, bytes]`.
pub mod stat {
    /// From a container, translated and redirected into a container on this worker.
    pub const LOCAL: u32 = 0;
    /// From a container, translated, encapsulated and sent to another worker.
    pub const ENCAP: u32 = 1;
    /// From another worker, decapsulated, translated and redirected into a container.
    pub const DECAP: u32 = 2;
    /// From a container to an overlay address, not in the flow map: left to the slow path (the TUN).
    pub const MISS_OUT: u32 = 3;
    /// A tunnel datagram whose inner flow is not in the flow map: left to the slow path (the UDP socket).
    pub const MISS_IN: u32 = 4;
    /// From a container, in the flow map but not handled here (TCP SYN/FIN/RST, fragment, options, IPv6
    /// underlay, no route or neighbour, too big): left to the slow path.
    pub const PASS_OUT: u32 = 5;
    /// From another worker, in the flow map but not handled here: left to the slow path.
    pub const PASS_IN: u32 = 6;
    /// A helper failed after the packet was changed: dropped.
    pub const ERROR: u32 = 7;
    /// Number of slots.
    pub const COUNT: u32 = 8;
}

/// Names of the maps and programs in the object, as NetManager looks them up.
pub mod names {
    /// `LruHashMap<FlowKey, FlowEntry>`: established flows, both directions.
    pub const FLOWS: &str = "FLOWS";
    /// `HashMap<LocalKey, LocalDest>`: containers on this worker.
    pub const LOCALS: &str = "LOCALS";
    /// `Array<Config>` of one element.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<[u64; 2]>` of [`super::stat::COUNT`] slots.
    pub const STATS: &str = "STATS";
    /// tc ingress of the host end of every container veth (packets the container sends).
    pub const FROM_CONTAINER: &str = "oakestra_from_container";
    /// tc ingress of the underlay interface (tunnel datagrams from other workers).
    pub const FROM_UNDERLAY: &str = "oakestra_from_underlay";
}

// SAFETY (all four): `#[repr(C)]` plain old data made of integers and byte arrays with no implicit padding (the
// layout tests below check the sizes), so every bit pattern is a valid value and the bytes can be copied to and
// from the kernel as they are.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalDest {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Sum of field sizes == struct size: nothing the kernel would compare is left uninitialised.
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(align_of::<FlowKey>(), 2);
        assert_eq!(size_of::<FlowAction>(), 16 + 16 + 16 + 2 + 2);
        assert_eq!(size_of::<FlowAction>(), 52);
        assert_eq!(align_of::<FlowAction>(), 2);
        assert_eq!(size_of::<FlowEntry>(), 8 + 52 + 4);
        assert_eq!(align_of::<FlowEntry>(), 8);
        assert_eq!(size_of::<LocalKey>(), 16 + 1 + 3);
        assert_eq!(size_of::<LocalDest>(), 4 + 6 + 2);
        assert_eq!(size_of::<Config>(), 4 + 2 + 2 + 4 + 6 + 2);
        assert_eq!(align_of::<Config>(), 4);
    }

    #[test]
    fn v4_keys_zero_the_tail_and_reverse() {
        let k = FlowKey::v4(
            [10, 18, 0, 2],
            [10, 30, 55, 55],
            40000u16.to_be(),
            80u16.to_be(),
            proto::TCP,
        );
        assert_eq!(&k.src_addr[..4], &[10, 18, 0, 2]);
        assert!(k.src_addr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.family, family::V4);
        let r = k.reversed();
        assert_eq!(r.src_addr, k.dst_addr);
        assert_eq!(r.dst_port, k.src_port);
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn actions_are_local_without_a_tunnel_port() {
        let local = FlowAction::local([1; 16], [2; 16]);
        assert!(local.is_local());
        assert_eq!(local._pad, [0; 2]);
        let mapped = FlowAction::v4_mapped([192, 0, 2, 7]);
        assert_eq!(mapped, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]);
        let tunnelled = FlowAction::new([1; 16], [2; 16], mapped, 50103u16.to_be());
        assert!(!tunnelled.is_local());
        assert_eq!(u16::from_be(tunnelled.tunnel_port), 50103);
    }
}
