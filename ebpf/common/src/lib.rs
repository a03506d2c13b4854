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
