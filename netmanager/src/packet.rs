//! Packet headers for the TUN proxy: parse raw IPv4/IPv6 packets and rewrite their addresses in place.
//!
//! Parsing uses etherparse's zero-copy header slices. The rewrite is our own: it patches the address bytes and
//! adjusts the IPv4 header checksum and the transport checksum incrementally (RFC 1624, `HC' = ~(~HC + ~m + m')`),
//! so a 1400-byte packet costs a few dozen word operations instead of a re-serialisation and a full checksum.
//!
//! Everything here handles bytes that came from the network or from a container: no input panics, every access is
//! bounds-checked, anything the proxy cannot translate correctly is an error rather than a silently broken packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, TcpHeaderSlice,
    UdpHeaderSlice,
};
use oakestra_ebpf_common::{FlowKey, proto};

/// TCP flag bits as they sit in byte 13 of the TCP header (the `flags` of [`L4::Tcp`]).
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers (connection opening).
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is valid.
    pub const ACK: u8 = 0x10;
    /// The urgent pointer is valid.
    pub const URG: u8 = 0x20;
    /// ECN echo.
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced.
    pub const CWR: u8 = 0x80;
}

/// IPv6 extension headers we walk through to find the transport header.
mod ext {
    /// Hop-by-hop options (must directly follow the fixed header).
    pub const HOP_BY_HOP: u8 = 0;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Destination options.
    pub const DEST_OPTS: u8 = 60;
}

/// More extension headers than this is not a packet a container sends; refuse it instead of walking on.
pub const MAX_IPV6_EXTENSIONS: usize = 8;

/// Size of the fixed IPv6 header.
const IPV6_HEADER_LEN: usize = 40;

/// ICMP message types that carry an echo identifier.
const ICMPV4_ECHO_REPLY: u8 = 0;
const ICMPV4_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Every ICMP and ICMPv6 message starts with these 8 bytes (type, code, checksum, 4 type-specific bytes).
const ICMP_HEADER_LEN: usize = 8;

/// Why a packet cannot be parsed or rewritten. Each variant carries the value that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The buffer ends before a header does.
    #[error("truncated {layer} header: needs {needed} bytes, has {have}")]
    Truncated {
        /// Which header was cut short.
        layer: &'static str,
        /// Bytes that header needs (counted from its own start).
        needed: usize,
        /// Bytes available for it.
        have: usize,
    },
    /// Neither IPv4 nor IPv6.
    #[error("unsupported IP version {0}")]
    Version(u8),
    /// IPv4 internet header length below the minimum of 5 words.
    #[error("IPv4 header length {0} words is below the minimum of 5")]
    Ipv4HeaderLen(u8),
    /// TCP data offset below the minimum of 5 words.
    #[error("TCP data offset {0} words is below the minimum of 5")]
    TcpDataOffset(u8),
    /// The length in the IP header does not fit between the headers and the end of the buffer.
    #[error("IP total length {total} is outside {min}..={buffer} (headers .. buffer length)")]
    TotalLen {
        /// Total length the IP header claims.
        total: usize,
        /// Smallest total length the headers allow.
        min: usize,
        /// Bytes in the buffer.
        buffer: usize,
    },
    /// An IPv6 extension header in a place or repetition we do not handle (hop-by-hop not first, a second
    /// fragment header).
    #[error("IPv6 extension header {0} is not where it may be")]
    Ipv6Extension(u8),
    /// Longer extension header chain than [`MAX_IPV6_EXTENSIONS`].
    #[error("more than {0} IPv6 extension headers")]
    TooManyExtensions(usize),
    /// A routing header with segments left: the transport checksum covers the final destination, not the address
    /// in the IPv6 header, so an incremental update of the header's address would be wrong.
    #[error("IPv6 routing header with {0} segments left")]
    RoutingSegmentsLeft(u8),
    /// The new addresses are not of the packet's family (the proxy never translates between families).
    #[error("address family change: packet is from {packet}, new addresses are {new_src} -> {new_dst}")]
    FamilyMismatch {
        /// Source address of the packet.
        packet: IpAddr,
        /// Requested new source.
        new_src: IpAddr,
        /// Requested new destination.
        new_dst: IpAddr,
    },
    /// The [`Headers`] do not describe this buffer (different version, longer than the buffer, offsets outside it).
    #[error("headers do not match the buffer: {what} {value}")]
    Mismatch {
        /// Which field did not match.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// A first fragment that does not contain its transport checksum, so the rewrite could not keep the
    /// reassembled datagram valid.
    #[error("fragment of a protocol {0} datagram lacks the transport checksum it needs to rewrite")]
    L4HeaderMissing(u8),
}

/// The transport header, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, ports in host byte order, `flags` is the [`tcp_flags`] byte.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// [`tcp_flags`] bits.
        flags: u8,
    },
    /// UDP, ports in host byte order.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP or ICMPv6 echo request (`reply = false`) or reply.
    IcmpEcho {
        /// Echo identifier, host byte order.
        id: u16,
        /// Whether this is the reply.
        reply: bool,
    },
    /// Anything else, and every non-first fragment (its transport header is in another packet).
    Other,
}

/// Where a fragment sits in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragInfo {
    /// Datagram identification: IPv4's 16-bit id widened, or the IPv6 fragment header's 32-bit id.
    pub id: u32,
    /// Offset of this fragment's data in the datagram, in bytes.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// What [`parse`] found in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number after any IPv6 extension headers. For a non-first IPv6 fragment it is the header
    /// that follows the fragment header (the rest of the chain is in the first fragment).
    pub protocol: u8,
    /// The transport header.
    pub l4: L4,
    /// `Some` for a fragment (IPv4 with MF or an offset, IPv6 with a non-atomic fragment header).
    pub frag: Option<FragInfo>,
    /// Offset of the transport header in the buffer (for a non-first fragment: of its data).
    pub l4_offset: usize,
    /// Packet length from the IP header; `<= buf.len()`, bytes beyond it are not part of the packet.
    pub total_len: usize,
}

impl Headers {
    /// Whether this packet is a fragment other than the first one.
    pub fn is_later_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset > 0)
    }
}

/// Parses an IPv4 or IPv6 packet as read from a TUN device without packet-info header.
pub fn parse(buf: &[u8]) -> Result<Headers, PacketError> {
    let Some(first) = buf.first() else {
        return Err(PacketError::Truncated {
            layer: "IP",
            needed: 1,
            have: 0,
        });
    };
    match first >> 4 {
        4 => parse_v4(buf),
        6 => parse_v6(buf),
        v => Err(PacketError::Version(v)),
    }
}

fn parse_v4(buf: &[u8]) -> Result<Headers, PacketError> {
    let ip = Ipv4HeaderSlice::from_slice(buf).map_err(|e| match e {
        etherparse::err::ipv4::HeaderSliceError::Len(l) => PacketError::Truncated {
            layer: "IPv4",
            needed: l.required_len,
            have: l.len,
        },
        etherparse::err::ipv4::HeaderSliceError::Content(c) => match c {
            etherparse::err::ipv4::HeaderError::UnexpectedVersion { version_number } => {
                PacketError::Version(version_number)
            }
            etherparse::err::ipv4::HeaderError::HeaderLengthSmallerThanHeader { ihl } => {
                PacketError::Ipv4HeaderLen(ihl)
            }
        },
    })?;
    let header_len = ip.slice().len();
    let total_len = usize::from(ip.total_len());
    let payload = buf.get(header_len..total_len).ok_or(PacketError::TotalLen {
        total: total_len,
        min: header_len,
        buffer: buf.len(),
    })?;
    // The offset field counts 8-byte units in 13 bits, so the byte offset is at most 65528 and fits.
    let offset = ip.fragments_offset().value().wrapping_mul(8);
    let more = ip.more_fragments();
    let frag = (offset > 0 || more).then_some(FragInfo {
        id: u32::from(ip.identification()),
        offset,
        more,
    });
    let protocol = ip.protocol().0;
    let l4 = if offset > 0 {
        L4::Other
    } else {
        parse_l4(protocol, payload, frag.is_some(), false)?
    };
    Ok(Headers {
        src: IpAddr::V4(Ipv4Addr::from(ip.source())),
        dst: IpAddr::V4(Ipv4Addr::from(ip.destination())),
        protocol,
        l4,
        frag,
        l4_offset: header_len,
        total_len,
    })
}

fn parse_v6(buf: &[u8]) -> Result<Headers, PacketError> {
    let ip = Ipv6HeaderSlice::from_slice(buf).map_err(|e| match e {
        etherparse::err::ipv6::HeaderSliceError::Len(l) => PacketError::Truncated {
            layer: "IPv6",
            needed: l.required_len,
            have: l.len,
        },
        etherparse::err::ipv6::HeaderSliceError::Content(
            etherparse::err::ipv6::HeaderError::UnexpectedVersion { version_number },
        ) => PacketError::Version(version_number),
    })?;
    // A payload length of 0 with a jumbo payload option is not something a TUN with a normal MTU delivers; such
    // a packet then fails below as a truncated extension or transport header.
    let total_len = IPV6_HEADER_LEN + usize::from(ip.payload_length());
    let packet = buf.get(..total_len).ok_or(PacketError::TotalLen {
        total: total_len,
        min: IPV6_HEADER_LEN,
        buffer: buf.len(),
    })?;
    let src = IpAddr::V6(Ipv6Addr::from(ip.source()));
    let dst = IpAddr::V6(Ipv6Addr::from(ip.destination()));

    let mut next = ip.next_header().0;
    let mut offset = IPV6_HEADER_LEN;
    let mut frag: Option<FragInfo> = None;
    let mut walked = 0;
    loop {
        let rest = packet.get(offset..).unwrap_or_default();
        match next {
            ext::HOP_BY_HOP | ext::ROUTING | ext::DEST_OPTS => {
                if next == ext::HOP_BY_HOP && offset != IPV6_HEADER_LEN {
                    return Err(PacketError::Ipv6Extension(next));
                }
                let h = Ipv6RawExtHeaderSlice::from_slice(rest).map_err(|l| PacketError::Truncated {
                    layer: "IPv6 extension",
                    needed: l.required_len,
                    have: l.len,
                })?;
                if next == ext::ROUTING {
                    // Byte 3 of every routing header type is "segments left".
                    let left = h.slice().get(3).copied().unwrap_or(0);
                    if left != 0 {
                        return Err(PacketError::RoutingSegmentsLeft(left));
                    }
                }
                next = h.next_header().0;
                offset += h.slice().len();
            }
            ext::FRAGMENT => {
                if frag.is_some() {
                    return Err(PacketError::Ipv6Extension(next));
                }
                let h = Ipv6FragmentHeaderSlice::from_slice(rest).map_err(|l| PacketError::Truncated {
                    layer: "IPv6 fragment",
                    needed: l.required_len,
                    have: l.len,
                })?;
                next = h.next_header().0;
                offset += h.slice().len();
                let info = FragInfo {
                    id: h.identification(),
                    offset: h.fragment_offset().value().wrapping_mul(8),
                    more: h.more_fragments(),
                };
                if info.offset > 0 {
                    // The rest of the header chain and the transport header are in the first fragment.
                    return Ok(Headers {
                        src,
                        dst,
                        protocol: next,
                        l4: L4::Other,
                        frag: Some(info),
                        l4_offset: offset,
                        total_len,
                    });
                }
                // An atomic fragment (offset 0, no more fragments) is a whole datagram: RFC 6946 says to process
                // it on its own, so it gets no fragment tracking.
                if info.more {
                    frag = Some(info);
                }
            }
            _ => break,
        }
        walked += 1;
        if walked > MAX_IPV6_EXTENSIONS {
            return Err(PacketError::TooManyExtensions(MAX_IPV6_EXTENSIONS));
        }
    }
    let payload = packet.get(offset..).unwrap_or_default();
    let l4 = parse_l4(next, payload, frag.is_some(), true)?;
    Ok(Headers {
        src,
        dst,
        protocol: next,
        l4,
        frag,
        l4_offset: offset,
        total_len,
    })
}

/// Parses the transport header at the start of `payload`. In a first fragment a missing or cut header is
/// [`L4::Other`] (the rewrite then refuses the packet if it needed that header); in a whole packet it is an error.
fn parse_l4(protocol: u8, payload: &[u8], fragment: bool, v6: bool) -> Result<L4, PacketError> {
    let parsed = match protocol {
        proto::TCP => TcpHeaderSlice::from_slice(payload)
            .map(|t| L4::Tcp {
                src_port: t.source_port(),
                dst_port: t.destination_port(),
                flags: tcp_flag_byte(&t),
            })
            .map_err(|e| match e {
                etherparse::err::tcp::HeaderSliceError::Len(l) => PacketError::Truncated {
                    layer: "TCP",
                    needed: l.required_len,
                    have: l.len,
                },
                etherparse::err::tcp::HeaderSliceError::Content(
                    etherparse::err::tcp::HeaderError::DataOffsetTooSmall { data_offset },
                ) => PacketError::TcpDataOffset(data_offset),
            }),
        proto::UDP => UdpHeaderSlice::from_slice(payload)
            .map(|u| L4::Udp {
                src_port: u.source_port(),
                dst_port: u.destination_port(),
            })
            .map_err(|l| PacketError::Truncated {
                layer: "UDP",
                needed: l.required_len,
                have: l.len,
            }),
        proto::ICMP | proto::ICMPV6 if (protocol == proto::ICMPV6) == v6 => {
            match payload.get(..ICMP_HEADER_LEN) {
                Some(&[ty, _code, _c0, _c1, id0, id1, _s0, _s1]) => Ok(match (v6, ty) {
                    (false, ICMPV4_ECHO_REQUEST) | (true, ICMPV6_ECHO_REQUEST) => L4::IcmpEcho {
                        id: u16::from_be_bytes([id0, id1]),
                        reply: false,
                    },
                    (false, ICMPV4_ECHO_REPLY) | (true, ICMPV6_ECHO_REPLY) => L4::IcmpEcho {
                        id: u16::from_be_bytes([id0, id1]),
                        reply: true,
                    },
                    _ => L4::Other,
                }),
                _ => Err(PacketError::Truncated {
                    layer: "ICMP",
                    needed: ICMP_HEADER_LEN,
                    have: payload.len(),
                }),
            }
        }
        _ => Ok(L4::Other),
    };
    match parsed {
        Err(_) if fragment => Ok(L4::Other),
        other => other,
    }
}

fn tcp_flag_byte(t: &TcpHeaderSlice<'_>) -> u8 {
    let bits = [
        (t.fin(), tcp_flags::FIN),
        (t.syn(), tcp_flags::SYN),
        (t.rst(), tcp_flags::RST),
        (t.psh(), tcp_flags::PSH),
        (t.ack(), tcp_flags::ACK),
        (t.urg(), tcp_flags::URG),
        (t.ece(), tcp_flags::ECE),
        (t.cwr(), tcp_flags::CWR),
    ];
    bits.iter()
        .filter(|(set, _)| *set)
        .fold(0, |acc, (_, bit)| acc | bit)
}

/// The connection-table key of a packet: the 5-tuple for TCP and UDP, `(addresses, id, id)` for an ICMP echo so
/// the reply's key is the request's [`FlowKey::reversed`]. `None` for anything without ports, including every
/// non-first fragment.
pub fn flow_key(h: &Headers) -> Option<FlowKey> {
    let (src_port, dst_port) = match h.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        }
        | L4::Udp { src_port, dst_port } => (src_port, dst_port),
        L4::IcmpEcho { id, .. } => (id, id),
        L4::Other => return None,
    };
    if h.is_later_fragment() {
        return None;
    }
    match (h.src, h.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(FlowKey::v4(
            s.octets(),
            d.octets(),
            src_port.to_be(),
            dst_port.to_be(),
            h.protocol,
        )),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(FlowKey::v6(
            s.octets(),
            d.octets(),
            src_port.to_be(),
            dst_port.to_be(),
            h.protocol,
        )),
        _ => None,
    }
}

/// An address in the 16-byte form of [`FlowKey`] and `FlowAction` (IPv4 in the first 4 bytes, rest zero).
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            let [a0, a1, a2, a3] = a.octets();
            out[..4].copy_from_slice(&[a0, a1, a2, a3]);
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The inverse of [`addr_bytes`]: `v4` says which family the bytes hold (from [`FlowKey::family`]).
pub fn addr_from_bytes(bytes: &[u8; 16], v4: bool) -> IpAddr {
    if v4 {
        let [a, b, c, d, ..] = *bytes;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Rewrites the source and destination address of the packet `h` was parsed from, in place, and fixes every
/// checksum that covers them.
///
/// * IPv4 header checksum: incremental update.
/// * TCP, UDP and ICMPv6 checksums: their pseudo-header holds both addresses, so the same delta applies. A UDP
///   checksum of 0 means "none" (IPv4, and IPv6 tunnels per RFC 6935) and stays 0; an updated one that computes
///   to 0 is sent as 0xffff.
/// * ICMPv4 has no pseudo-header: unchanged.
/// * A non-first fragment only gets its IP header changed: the transport checksum covers the whole reassembled
///   datagram and lives in the first fragment, where the delta for the address change is applied once. Since the
///   delta depends only on the old and new addresses, not on the data, that is the correct checksum for the
///   datagram as long as every fragment gets the same rewrite (see `frag`).
///
/// Refuses a family change, and a first fragment whose transport checksum is not in it.
pub fn rewrite(buf: &mut [u8], h: &Headers, new_src: IpAddr, new_dst: IpAddr) -> Result<(), PacketError> {
    let (addr_range, new_addrs, v6) = match (h.src, new_src, new_dst) {
        (IpAddr::V4(_), IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&s.octets());
            bytes[4..8].copy_from_slice(&d.octets());
            (12..20, bytes, false)
        }
        (IpAddr::V6(_), IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut bytes = [0u8; 32];
            bytes[..16].copy_from_slice(&s.octets());
            bytes[16..].copy_from_slice(&d.octets());
            (8..40, bytes, true)
        }
        _ => {
            return Err(PacketError::FamilyMismatch {
                packet: h.src,
                new_src,
                new_dst,
            });
        }
    };
    let packet = buf.get_mut(..h.total_len).ok_or(PacketError::Mismatch {
        what: "total length",
        value: h.total_len,
    })?;
    let version = packet.first().map_or(0, |b| b >> 4);
    if version != if v6 { 6 } else { 4 } {
        return Err(PacketError::Mismatch {
            what: "IP version",
            value: usize::from(version),
        });
    }
    let new_addrs = new_addrs.get(..addr_range.len()).unwrap_or_default();

    // Where the transport checksum is, if this packet carries one that covers the addresses. Found before anything
    // is written, so a refused packet is left untouched.
    let l4_checksum = if h.is_later_fragment() {
        None
    } else {
        let at = match (h.protocol, h.l4) {
            (proto::TCP, L4::Tcp { .. }) => Some(16),
            (proto::UDP, L4::Udp { .. }) => Some(6),
            (proto::TCP | proto::UDP, _) => return Err(PacketError::L4HeaderMissing(h.protocol)),
            (proto::ICMPV6, _) if v6 => Some(2),
            _ => None,
        };
        match at {
            Some(at) => {
                let pos = h.l4_offset.saturating_add(at);
                if pos.saturating_add(2) > packet.len() {
                    return Err(PacketError::L4HeaderMissing(h.protocol));
                }
                Some(pos)
            }
            None => None,
        }
    };

    let old_addrs = packet.get(addr_range.clone()).ok_or(PacketError::Mismatch {
        what: "total length",
        value: h.total_len,
    })?;
    let delta = checksum_delta(old_addrs, new_addrs);
    if let Some(dst) = packet.get_mut(addr_range) {
        dst.copy_from_slice(new_addrs);
    }
    if !v6 {
        // The IPv4 header checksum is at bytes 10..12 (the header is at least 20 bytes, checked above).
        update_checksum(packet, 10, delta, false);
    }
    if let Some(pos) = l4_checksum {
        update_checksum(packet, pos, delta, h.protocol == proto::UDP);
    }
    Ok(())
}

/// One's-complement sum of `~old + new` over the 16-bit words of two equally long address blocks: the `~m + m'`
/// part of RFC 1624 eqn. 3. At most 16 words of at most 2 × 0xffff each, so a `u32` cannot overflow.
fn checksum_delta(old: &[u8], new: &[u8]) -> u32 {
    old.chunks_exact(2)
        .zip(new.chunks_exact(2))
        .map(|(o, n)| {
            let o = u16::from_be_bytes([o.first().copied().unwrap_or(0), o.get(1).copied().unwrap_or(0)]);
            let n = u16::from_be_bytes([n.first().copied().unwrap_or(0), n.get(1).copied().unwrap_or(0)]);
            u32::from(!o) + u32::from(n)
        })
        .sum()
}

/// Folds a one's-complement sum into 16 bits (end-around carry).
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[allow(clippy::cast_possible_truncation, reason = "the loop leaves at most 16 bits")]
    let folded = sum as u16;
    folded
}

/// Applies `delta` to the checksum at `buf[pos..pos + 2]` (does nothing if that is outside `buf`).
///
/// The result is normalised to what a full recomputation gives, so a rewritten packet is byte-identical to one
/// built from scratch: a full one's-complement sum over data that is not all zero is never +0, so its complement
/// is never 0xffff; for UDP the complement 0 is sent as 0xffff because 0 means "no checksum", and a 0 checksum
/// (none) is left alone.
fn update_checksum(buf: &mut [u8], pos: usize, delta: u32, udp: bool) {
    let Some(field) = buf.get_mut(pos..pos.saturating_add(2)) else {
        return;
    };
    let old = u16::from_be_bytes([
        field.first().copied().unwrap_or(0),
        field.get(1).copied().unwrap_or(0),
    ]);
    if udp && old == 0 {
        return;
    }
    let new = !fold(u64::from(!old) + u64::from(delta));
    let new = match (udp, new) {
        (true, 0) => 0xffff,
        (false, 0xffff) => 0,
        (_, v) => v,
    };
    field.copy_from_slice(&new.to_be_bytes());
}

/// The one's-complement sum of `data` as 16-bit big-endian words (an odd last byte padded with zero), added to
/// `initial`, not folded.
fn sum_words(data: &[u8], initial: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum = initial;
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// The pseudo-header sum (not folded) of a transport segment of `l4_len` bytes of `protocol` between the
/// packet's addresses.
fn pseudo_header_sum(h: &Headers, protocol: u8, l4_len: usize) -> u64 {
    let mut sum = sum_words(&addr_bytes(h.src)[..if h.src.is_ipv4() { 4 } else { 16 }], 0);
    sum = sum_words(&addr_bytes(h.dst)[..if h.dst.is_ipv4() { 4 } else { 16 }], sum);
    sum + u64::from(protocol) + l4_len as u64
}

/// Where the transport checksum of a whole (unfragmented) TCP or UDP packet sits, and its segment's bounds.
fn l4_checksum_at(h: &Headers) -> Option<(usize, std::ops::Range<usize>)> {
    if h.frag.is_some() {
        return None;
    }
    let at = match h.l4 {
        L4::Tcp { .. } => 16,
        L4::Udp { .. } => 6,
        _ => return None,
    };
    Some((h.l4_offset + at, h.l4_offset..h.total_len))
}

/// Completes a transport checksum that holds only its pseudo-header sum, in place; returns whether it did.
///
/// That is what a kernel sender leaves in a packet whose checksum it offloads (CHECKSUM_PARTIAL). Such packets
/// reach this worker's TUN path when another worker's eBPF fast path encapsulated them and nothing between the
/// two resolved the offload (veth and virtio links pass it on): the slow path must then finish the checksum, or
/// the container drops the packet. A complete checksum that happens to equal the pseudo-header sum (1 in 65536)
/// is recomputed to the same value, so the test needs no other hint.
pub fn complete_partial_checksum(buf: &mut [u8], h: &Headers) -> bool {
    let Some((at, segment)) = l4_checksum_at(h) else {
        return false;
    };
    let (Some(field), Some(_)) = (buf.get(at..at + 2), buf.get(segment.clone())) else {
        return false;
    };
    let stored = u16::from_be_bytes([field[0], field[1]]);
    let pseudo = pseudo_header_sum(h, h.protocol, segment.len());
    if stored == 0 || stored != fold(pseudo) {
        return false;
    }
    buf[at] = 0;
    buf[at + 1] = 0;
    let mut sum = !fold(sum_words(&buf[segment], pseudo));
    if sum == 0 && matches!(h.l4, L4::Udp { .. }) {
        sum = 0xffff;
    }
    buf[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Cuts a TCP packet longer than `mtu` (a GSO super-packet a kernel fast path sent whole over links that keep
/// offloads) into segments of at most `mtu` bytes, each with its own IP length (and IPv4 id and checksum), TCP
/// sequence number and a complete TCP checksum; FIN and PSH stay on the last segment, CWR on the first. Each
/// segment is handed to `out`. Returns the number of segments.
pub fn segment_tcp(
    pkt: &[u8],
    h: &Headers,
    mtu: usize,
    mut out: impl FnMut(&[u8]),
) -> Result<usize, PacketError> {
    let L4::Tcp { flags, .. } = h.l4 else {
        return Err(PacketError::L4HeaderMissing(h.protocol));
    };
    if h.frag.is_some() {
        return Err(PacketError::L4HeaderMissing(h.protocol));
    }
    let l4 = h.l4_offset;
    let tcp_len = pkt
        .get(l4 + 12)
        .map(|b| usize::from(b >> 4) * 4)
        .filter(|n| *n >= 20)
        .ok_or(PacketError::L4HeaderMissing(h.protocol))?;
    let hdr_len = l4 + tcp_len;
    let payload = pkt
        .get(hdr_len..h.total_len)
        .ok_or(PacketError::L4HeaderMissing(h.protocol))?;
    let mss = mtu.saturating_sub(hdr_len);
    if mss == 0 {
        return Err(PacketError::Mismatch {
            what: "MTU below the headers",
            value: mtu,
        });
    }
    let v6 = h.src.is_ipv6();
    let seq0 = u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]);
    let id0 = if v6 {
        0
    } else {
        u16::from_be_bytes([pkt[4], pkt[5]])
    };
    let chunks = payload.chunks(mss);
    let count = chunks.len();
    let mut seg = Vec::with_capacity(mtu);
    for (i, chunk) in chunks.enumerate() {
        seg.clear();
        seg.extend_from_slice(&pkt[..hdr_len]);
        seg.extend_from_slice(chunk);
        let len = seg.len();
        let offset = u32::try_from(i * mss).unwrap_or(u32::MAX);
        let last = i + 1 == count;
        if v6 {
            let payload_len = u16::try_from(len - 40).unwrap_or(u16::MAX);
            seg[4..6].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            let total = u16::try_from(len).unwrap_or(u16::MAX);
            seg[2..4].copy_from_slice(&total.to_be_bytes());
            let id = id0.wrapping_add(u16::try_from(i).unwrap_or(0));
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            seg[10] = 0;
            seg[11] = 0;
            let check = !fold(sum_words(&seg[..l4], 0));
            seg[10..12].copy_from_slice(&check.to_be_bytes());
        }
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add(offset).to_be_bytes());
        let mut f = flags;
        if !last {
            f &= !(tcp_flags::FIN | tcp_flags::PSH);
        }
        if i > 0 {
            f &= !tcp_flags::CWR;
        }
        seg[l4 + 13] = f;
        seg[l4 + 16] = 0;
        seg[l4 + 17] = 0;
        let sum = !fold(sum_words(&seg[l4..], pseudo_header_sum(h, h.protocol, len - l4)));
        seg[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        out(&seg);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use etherparse::{
        IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader,
        PacketBuilder, SlicedPacket, TransportSlice,
    };
    use proptest::prelude::*;

    use super::*;

    const V4A: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
    const V4B: Ipv4Addr = Ipv4Addr::new(10, 30, 55, 55);
    const V4C: Ipv4Addr = Ipv4Addr::new(172, 16, 3, 9);
    const V4D: Ipv4Addr = Ipv4Addr::new(10, 19, 1, 200);

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect()
    }

    #[derive(Clone, Copy, Debug)]
    enum T {
        Tcp,
        Udp,
        EchoReq,
        EchoRep,
    }

    fn build_v4(src: Ipv4Addr, dst: Ipv4Addr, t: T, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
        let mut out = Vec::new();
        match t {
            T::Tcp => b.tcp(40000, 80, 7, 1024).ack(99).write(&mut out, data),
            T::Udp => b.udp(5353, 53).write(&mut out, data),
            T::EchoReq => b.icmpv4_echo_request(0x1234, 1).write(&mut out, data),
            T::EchoRep => b.icmpv4_echo_reply(0x1234, 1).write(&mut out, data),
        }
        .unwrap();
        out
    }

    fn build_v6(src: Ipv6Addr, dst: Ipv6Addr, t: T, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64);
        let mut out = Vec::new();
        match t {
            T::Tcp => b.tcp(40000, 80, 7, 1024).syn().write(&mut out, data),
            T::Udp => b.udp(5353, 53).write(&mut out, data),
            T::EchoReq => b.icmpv6_echo_request(0x1234, 1).write(&mut out, data),
            T::EchoRep => b.icmpv6_echo_reply(0x1234, 1).write(&mut out, data),
        }
        .unwrap();
        out
    }

    /// Recomputes every checksum of an unfragmented packet with etherparse and asserts the packet carries them.
    fn assert_checksums(pkt: &[u8]) {
        let sliced = SlicedPacket::from_ip(pkt).unwrap();
        let net = sliced.net.as_ref().unwrap();
        match net {
            etherparse::NetSlice::Ipv4(v4) => {
                let hdr = v4.header().to_header();
                assert_eq!(
                    hdr.header_checksum,
                    hdr.calc_header_checksum(),
                    "IPv4 header checksum"
                );
                match sliced.transport.as_ref().unwrap() {
                    TransportSlice::Tcp(t) => {
                        let want = t.to_header().calc_checksum_ipv4(&hdr, t.payload()).unwrap();
                        assert_eq!(t.checksum(), want, "TCP/IPv4 checksum");
                    }
                    TransportSlice::Udp(u) => {
                        if u.checksum() != 0 {
                            let want = u.to_header().calc_checksum_ipv4(&hdr, u.payload()).unwrap();
                            assert_eq!(u.checksum(), want, "UDP/IPv4 checksum");
                        }
                    }
                    TransportSlice::Icmpv4(i) => {
                        let want = i.icmp_type().calc_checksum(i.payload());
                        assert_eq!(i.checksum(), want, "ICMPv4 checksum");
                    }
                    other => panic!("unexpected transport {other:?}"),
                }
            }
            etherparse::NetSlice::Ipv6(v6) => {
                let (s, d) = (v6.header().source(), v6.header().destination());
                match sliced.transport.as_ref().unwrap() {
                    TransportSlice::Tcp(t) => {
                        let want = t.to_header().calc_checksum_ipv6_raw(s, d, t.payload()).unwrap();
                        assert_eq!(t.checksum(), want, "TCP/IPv6 checksum");
                    }
                    TransportSlice::Udp(u) => {
                        let want = u.to_header().calc_checksum_ipv6_raw(s, d, u.payload()).unwrap();
                        assert_eq!(u.checksum(), want, "UDP/IPv6 checksum");
                    }
                    TransportSlice::Icmpv6(i) => {
                        let want = i.icmp_type().calc_checksum(s, d, i.payload()).unwrap();
                        assert_eq!(i.checksum(), want, "ICMPv6 checksum");
                        assert!(i.is_checksum_valid(s, d));
                    }
                    other => panic!("unexpected transport {other:?}"),
                }
            }
            other => panic!("unexpected net {other:?}"),
        }
    }

    /// Rewrites, re-parses, checks the addresses and all checksums, rewrites back and checks the original bytes.
    fn roundtrip(pkt: &[u8], new_src: IpAddr, new_dst: IpAddr) -> Vec<u8> {
        let mut buf = pkt.to_vec();
        let h = parse(&buf).unwrap();
        rewrite(&mut buf, &h, new_src, new_dst).unwrap();
        let h2 = parse(&buf).unwrap();
        assert_eq!((h2.src, h2.dst), (new_src, new_dst));
        assert_eq!(h2.l4, h.l4);
        assert_checksums(&buf);
        let rewritten = buf.clone();
        rewrite(&mut buf, &h2, h.src, h.dst).unwrap();
        assert_eq!(buf, pkt, "rewrite back restores the original bytes");
        rewritten
    }

    #[test]
    fn parses_v4_tcp_udp_and_echo() {
        let p = build_v4(V4A, V4B, T::Tcp, &payload(100));
        let h = parse(&p).unwrap();
        assert_eq!(h.src, IpAddr::V4(V4A));
        assert_eq!(h.dst, IpAddr::V4(V4B));
        assert_eq!(h.protocol, proto::TCP);
        assert_eq!(
            h.l4,
            L4::Tcp {
                src_port: 40000,
                dst_port: 80,
                flags: tcp_flags::ACK
            }
        );
        assert_eq!((h.l4_offset, h.total_len, h.frag), (20, p.len(), None));
        let k = flow_key(&h).unwrap();
        assert_eq!(
            k,
            FlowKey::v4(
                V4A.octets(),
                V4B.octets(),
                40000u16.to_be(),
                80u16.to_be(),
                proto::TCP
            )
        );

        let h = parse(&build_v4(V4A, V4B, T::Udp, b"hi")).unwrap();
        assert_eq!(
            h.l4,
            L4::Udp {
                src_port: 5353,
                dst_port: 53
            }
        );
        let req = parse(&build_v4(V4A, V4B, T::EchoReq, b"ping")).unwrap();
        let rep = parse(&build_v4(V4B, V4A, T::EchoRep, b"ping")).unwrap();
        assert_eq!(
            req.l4,
            L4::IcmpEcho {
                id: 0x1234,
                reply: false
            }
        );
        assert_eq!(
            rep.l4,
            L4::IcmpEcho {
                id: 0x1234,
                reply: true
            }
        );
        assert_eq!(flow_key(&rep).unwrap(), flow_key(&req).unwrap().reversed());
    }

    #[test]
    fn parses_v6_and_echo_keys_reverse() {
        let (a, b) = (v6("fc00::1"), v6("fdff:2000::42"));
        let h = parse(&build_v6(a, b, T::Tcp, &payload(10))).unwrap();
        assert_eq!(h.l4_offset, 40);
        assert_eq!(
            h.l4,
            L4::Tcp {
                src_port: 40000,
                dst_port: 80,
                flags: tcp_flags::SYN
            }
        );
        let req = parse(&build_v6(a, b, T::EchoReq, b"x")).unwrap();
        let rep = parse(&build_v6(b, a, T::EchoRep, b"x")).unwrap();
        assert_eq!(req.protocol, proto::ICMPV6);
        assert_eq!(flow_key(&rep).unwrap(), flow_key(&req).unwrap().reversed());
        assert_eq!(flow_key(&req).unwrap().family, oakestra_ebpf_common::family::V6);
    }

    #[test]
    fn other_icmp_has_no_key() {
        let mut out = Vec::new();
        PacketBuilder::ipv4(V4A.octets(), V4B.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::TimestampRequest(
                etherparse::icmpv4::TimestampMessage {
                    id: 1,
                    seq: 2,
                    originate_timestamp: 3,
                    receive_timestamp: 4,
                    transmit_timestamp: 5,
                },
            ))
            .write(&mut out, &[])
            .unwrap();
        let h = parse(&out).unwrap();
        assert_eq!(h.l4, L4::Other);
        assert_eq!(flow_key(&h), None);
    }

    #[test]
    fn rewrites_all_kinds_with_valid_checksums() {
        for t in [T::Tcp, T::Udp, T::EchoReq, T::EchoRep] {
            for n in [0, 1, 2, 3, 100, 1357] {
                let p = build_v4(V4A, V4B, t, &payload(n));
                roundtrip(&p, IpAddr::V4(V4C), IpAddr::V4(V4D));
                let p = build_v6(v6("fc00::1"), v6("fdff:2000::42"), t, &payload(n));
                roundtrip(
                    &p,
                    IpAddr::V6(v6("fdff::aa:1")),
                    IpAddr::V6(v6("2001:db8::ffff:1")),
                );
            }
        }
    }

    #[test]
    fn icmpv4_checksum_is_untouched() {
        let p = build_v4(V4A, V4B, T::EchoReq, b"abc");
        let out = roundtrip(&p, IpAddr::V4(V4C), IpAddr::V4(V4D));
        assert_eq!(out[22..24], p[22..24]);
    }

    #[test]
    fn udp_v4_without_checksum_stays_without() {
        let mut p = build_v4(V4A, V4B, T::Udp, b"no checksum");
        p[26] = 0;
        p[27] = 0;
        let out = roundtrip(&p, IpAddr::V4(V4C), IpAddr::V4(V4D));
        assert_eq!(out[26..28], [0, 0]);
    }

    #[test]
    fn udp_checksum_that_computes_to_zero_is_sent_as_ffff() {
        // Search a source address for which the new checksum's complement sum is +0: then the UDP checksum
        // must be 0xffff, and a full recomputation (etherparse) must agree.
        let p = build_v4(V4A, V4B, T::Udp, b"zero?");
        let mut found = false;
        for x in 0..=u16::MAX {
            let [hi, lo] = x.to_be_bytes();
            let src = Ipv4Addr::new(10, 18, hi, lo);
            let mut buf = p.clone();
            let h = parse(&buf).unwrap();
            rewrite(&mut buf, &h, IpAddr::V4(src), IpAddr::V4(V4B)).unwrap();
            if buf[26..28] == [0xff, 0xff] {
                assert_checksums(&buf);
                let mut back = buf.clone();
                rewrite(&mut back, &parse(&buf).unwrap(), h.src, h.dst).unwrap();
                assert_eq!(back, p);
                found = true;
                break;
            }
            assert_ne!(buf[26..28], [0, 0]);
        }
        assert!(found, "some source address makes the checksum 0xffff");
    }

    #[test]
    fn ipv4_with_options() {
        let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, V4A.octets(), V4B.octets()).unwrap();
        ip.options = [1, 1, 1, 0, 0x94, 4, 0, 0].into(); // NOPs, end of list, router alert
        let mut p = Vec::new();
        PacketBuilder::ip(IpHeaders::Ipv4(ip, Default::default()))
            .tcp(1, 2, 3, 4)
            .write(&mut p, &payload(77))
            .unwrap();
        let h = parse(&p).unwrap();
        assert_eq!(h.l4_offset, 28);
        assert!(matches!(
            h.l4,
            L4::Tcp {
                src_port: 1,
                dst_port: 2,
                ..
            }
        ));
        roundtrip(&p, IpAddr::V4(V4C), IpAddr::V4(V4D));
    }

    #[test]
    fn ipv6_with_extension_headers() {
        // PadN options fill each header to a multiple of 8 bytes.
        let exts = Ipv6Extensions {
            hop_by_hop_options: Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &[1, 4, 0, 0, 0, 0]).unwrap()),
            destination_options: Some(
                Ipv6RawExtHeader::new_raw(IpNumber(0), &[1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            ),
            ..Default::default()
        };
        let ip = Ipv6Header {
            source: v6("fc00::1").octets(),
            destination: v6("fc00::2").octets(),
            hop_limit: 64,
            ..Default::default()
        };
        for t in [T::Tcp, T::Udp, T::EchoReq] {
            let b = PacketBuilder::ip(IpHeaders::Ipv6(ip.clone(), exts.clone()));
            let mut p = Vec::new();
            match t {
                T::Tcp => b.tcp(5, 6, 7, 8).write(&mut p, &payload(33)),
                T::Udp => b.udp(5, 6).write(&mut p, &payload(33)),
                _ => b.icmpv6_echo_request(9, 1).write(&mut p, &payload(33)),
            }
            .unwrap();
            let h = parse(&p).unwrap();
            assert_eq!(h.l4_offset, 40 + 8 + 16, "{t:?}");
            assert_ne!(h.l4, L4::Other);
            roundtrip(&p, IpAddr::V6(v6("fdff::1")), IpAddr::V6(v6("fdff::2")));
        }
    }

    #[test]
    fn routing_header_with_segments_left_is_refused() {
        // Routing header type 0 layout by hand: next header, length, type, segments left, reserved, addresses.
        let mut p = build_v6(v6("fc00::1"), v6("fc00::2"), T::Udp, b"abc");
        let mut rh = vec![proto::UDP, 2, 0, 1, 0, 0, 0, 0];
        rh.extend_from_slice(&v6("fc00::9").octets());
        p[6] = ext::ROUTING;
        let len = u16::from_be_bytes([p[4], p[5]]) + 24;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p.splice(40..40, rh);
        assert_eq!(parse(&p), Err(PacketError::RoutingSegmentsLeft(1)));
        // With no segments left the destination is final and the packet is ordinary.
        p[43] = 0;
        assert!(matches!(parse(&p).unwrap().l4, L4::Udp { .. }));
    }

    /// Splits an unfragmented IPv4 packet into fragments of `chunk` data bytes (a multiple of 8).
    fn fragment_v4(pkt: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let ihl = usize::from(pkt[0] & 0xf) * 4;
        let data = &pkt[ihl..];
        let mut out = Vec::new();
        for (i, part) in data.chunks(chunk).enumerate() {
            let mut hdr = Ipv4HeaderSlice::from_slice(pkt).unwrap().to_header();
            hdr.identification = 0xbeef;
            hdr.more_fragments = (i + 1) * chunk < data.len();
            hdr.fragment_offset =
                etherparse::IpFragOffset::try_new(u16::try_from(i * chunk / 8).unwrap()).unwrap();
            hdr.set_payload_len(part.len()).unwrap();
            hdr.header_checksum = hdr.calc_header_checksum();
            let mut f = hdr.to_bytes().to_vec();
            f.extend_from_slice(part);
            out.push(f);
        }
        out
    }

    /// Splits an unfragmented IPv6 packet (no extension headers) into fragments with a fragment header.
    fn fragment_v6(pkt: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let data = &pkt[40..];
        let next = pkt[6];
        let mut out = Vec::new();
        for (i, part) in data.chunks(chunk).enumerate() {
            let fh = Ipv6FragmentHeader::new(
                IpNumber(next),
                etherparse::IpFragOffset::try_new(u16::try_from(i * chunk / 8).unwrap()).unwrap(),
                (i + 1) * chunk < data.len(),
                0xdead_beef,
            );
            let mut f = pkt[..40].to_vec();
            f[6] = ext::FRAGMENT;
            f[4..6].copy_from_slice(&u16::try_from(8 + part.len()).unwrap().to_be_bytes());
            f.extend_from_slice(&fh.to_bytes());
            f.extend_from_slice(part);
            out.push(f);
        }
        out
    }

    fn check_fragments(
        whole: &[u8],
        frags: Vec<Vec<u8>>,
        header_len: usize,
        new_src: IpAddr,
        new_dst: IpAddr,
    ) {
        let mut data = Vec::new();
        let mut first_header = Vec::new();
        for (i, mut f) in frags.into_iter().enumerate() {
            let h = parse(&f).unwrap();
            let info = h.frag.unwrap();
            assert_eq!(info.offset as usize, data.len());
            if i == 0 {
                assert_ne!(h.l4, L4::Other);
                assert!(flow_key(&h).is_some());
            } else {
                assert_eq!(h.l4, L4::Other);
                assert_eq!(flow_key(&h), None);
            }
            rewrite(&mut f, &h, new_src, new_dst).unwrap();
            let h2 = parse(&f).unwrap();
            assert_eq!((h2.src, h2.dst), (new_src, new_dst));
            if let (IpAddr::V4(_), 0) = (h2.src, i) {
                let hdr = Ipv4HeaderSlice::from_slice(&f).unwrap().to_header();
                assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
            }
            if i == 0 {
                first_header = f[..header_len].to_vec();
            }
            data.extend_from_slice(&f[h.l4_offset..]);
        }
        // Reassemble into the unfragmented layout of `whole` and check its checksums from scratch.
        let mut re = whole[..header_len].to_vec();
        let addrs = if whole[0] >> 4 == 4 { 12..20 } else { 8..40 };
        re[addrs.clone()].copy_from_slice(&first_header[addrs]);
        if whole[0] >> 4 == 4 {
            re[10] = 0;
            re[11] = 0;
            let c = Ipv4HeaderSlice::from_slice(&re)
                .unwrap()
                .to_header()
                .calc_header_checksum();
            re[10..12].copy_from_slice(&c.to_be_bytes());
        }
        re.extend_from_slice(&data);
        assert_eq!(re.len(), whole.len());
        assert_checksums(&re);
    }

    #[test]
    fn fragments_v4_and_v6() {
        for t in [T::Tcp, T::Udp, T::EchoReq] {
            let whole = build_v4(V4A, V4B, t, &payload(3000));
            let frags = fragment_v4(&whole, 1480);
            assert_eq!(frags.len(), 3);
            check_fragments(&whole, frags, 20, IpAddr::V4(V4C), IpAddr::V4(V4D));
            let whole = build_v6(v6("fc00::1"), v6("fc00::2"), t, &payload(3000));
            let frags = fragment_v6(&whole, 1232);
            check_fragments(
                &whole,
                frags,
                40,
                IpAddr::V6(v6("fdff::7")),
                IpAddr::V6(v6("fdff::8")),
            );
        }
    }

    #[test]
    fn fragment_info_and_ids() {
        let whole = build_v4(V4A, V4B, T::Udp, &payload(100));
        let frags = fragment_v4(&whole, 48);
        let h0 = parse(&frags[0]).unwrap();
        assert_eq!(
            h0.frag,
            Some(FragInfo {
                id: 0xbeef,
                offset: 0,
                more: true
            })
        );
        let h2 = parse(&frags[2]).unwrap();
        assert_eq!(
            h2.frag,
            Some(FragInfo {
                id: 0xbeef,
                offset: 96,
                more: false
            })
        );
        assert_eq!(h2.protocol, proto::UDP);
        let whole = build_v6(v6("fc00::1"), v6("fc00::2"), T::Udp, &payload(100));
        let frags = fragment_v6(&whole, 48);
        let h1 = parse(&frags[1]).unwrap();
        assert_eq!(
            h1.frag,
            Some(FragInfo {
                id: 0xdead_beef,
                offset: 48,
                more: true
            })
        );
        assert_eq!((h1.protocol, h1.l4_offset), (proto::UDP, 48));
        // An atomic fragment is an ordinary packet.
        let atomic = fragment_v6(&whole, 4096).remove(0);
        let h = parse(&atomic).unwrap();
        assert_eq!(h.frag, None);
        assert!(matches!(h.l4, L4::Udp { .. }));
    }

    #[test]
    fn first_fragment_without_transport_checksum_is_refused() {
        // A first fragment with only 8 bytes of TCP: the checksum (bytes 16..18) is in the next fragment.
        let whole = build_v4(V4A, V4B, T::Tcp, &payload(40));
        let mut frags = fragment_v4(&whole, 8);
        let h = parse(&frags[0]).unwrap();
        assert_eq!(h.l4, L4::Other);
        let before = frags[0].clone();
        assert_eq!(
            rewrite(&mut frags[0], &h, IpAddr::V4(V4C), IpAddr::V4(V4D)),
            Err(PacketError::L4HeaderMissing(proto::TCP))
        );
        assert_eq!(frags[0], before, "a refused packet is not modified");
    }

    #[test]
    fn family_change_is_refused() {
        let mut p = build_v4(V4A, V4B, T::Udp, b"x");
        let h = parse(&p).unwrap();
        let err = rewrite(&mut p, &h, IpAddr::V6(v6("::1")), IpAddr::V6(v6("::2"))).unwrap_err();
        assert!(matches!(err, PacketError::FamilyMismatch { .. }));
        let err = rewrite(&mut p, &h, IpAddr::V4(V4C), IpAddr::V6(v6("::2"))).unwrap_err();
        assert!(matches!(err, PacketError::FamilyMismatch { .. }));
        let mut q = build_v6(v6("fc00::1"), v6("fc00::2"), T::Udp, b"x");
        let h = parse(&q).unwrap();
        assert!(rewrite(&mut q, &h, IpAddr::V4(V4C), IpAddr::V4(V4D)).is_err());
    }

    #[test]
    fn headers_from_another_buffer_are_refused() {
        let p = build_v4(V4A, V4B, T::Udp, &payload(100));
        let h = parse(&p).unwrap();
        let mut short = p[..50].to_vec();
        assert!(matches!(
            rewrite(&mut short, &h, IpAddr::V4(V4C), IpAddr::V4(V4D)),
            Err(PacketError::Mismatch { .. })
        ));
        let mut other = build_v6(v6("fc00::1"), v6("fc00::2"), T::Udp, &payload(100));
        assert!(rewrite(&mut other, &h, IpAddr::V4(V4C), IpAddr::V4(V4D)).is_err());
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        assert!(parse(&[]).is_err());
        assert_eq!(parse(&[0x50]), Err(PacketError::Version(5)));
        let p = build_v4(V4A, V4B, T::Tcp, &payload(10));
        for n in 0..p.len() {
            assert!(parse(&p[..n]).is_err(), "prefix of {n} bytes");
        }
        let p = build_v6(v6("fc00::1"), v6("fc00::2"), T::EchoReq, &payload(10));
        for n in 0..p.len() {
            assert!(parse(&p[..n]).is_err(), "prefix of {n} bytes");
        }
        // Total length below the header length.
        let mut p = build_v4(V4A, V4B, T::Udp, b"x");
        p[2] = 0;
        p[3] = 10;
        assert!(matches!(parse(&p), Err(PacketError::TotalLen { total: 10, .. })));
        // Trailing bytes beyond the IP total length are not part of the packet.
        let mut p = build_v4(V4A, V4B, T::Udp, b"x");
        let len = p.len();
        p.extend_from_slice(&[0xee; 5]);
        assert_eq!(parse(&p).unwrap().total_len, len);
    }

    #[test]
    fn addr_bytes_roundtrip() {
        for a in [IpAddr::V4(V4A), IpAddr::V6(v6("fdff::1"))] {
            assert_eq!(addr_from_bytes(&addr_bytes(a), a.is_ipv4()), a);
        }
        assert_eq!(&addr_bytes(IpAddr::V4(V4A))[4..], &[0; 12]);
    }

    fn any_t() -> impl Strategy<Value = T> {
        prop_oneof![Just(T::Tcp), Just(T::Udp), Just(T::EchoReq), Just(T::EchoRep)]
    }

    proptest! {
        #[test]
        fn rewrite_and_back_v4(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), ns in any::<[u8; 4]>(),
                               nd in any::<[u8; 4]>(), t in any_t(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = build_v4(src.into(), dst.into(), t, &data);
            roundtrip(&p, IpAddr::V4(ns.into()), IpAddr::V4(nd.into()));
        }

        #[test]
        fn rewrite_and_back_v6(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), ns in any::<[u8; 16]>(),
                               nd in any::<[u8; 16]>(), t in any_t(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = build_v6(src.into(), dst.into(), t, &data);
            roundtrip(&p, IpAddr::V6(ns.into()), IpAddr::V6(nd.into()));
        }

        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), v6 in any::<bool>(),
                                    ns in any::<[u8; 16]>(), nd in any::<[u8; 16]>()) {
            // Steer half the inputs past the version check so the deeper parsers see garbage too.
            if let Some(b) = bytes.first_mut() {
                *b = (*b & 0x0f) | if v6 { 0x60 } else { 0x40 };
            }
            if let Ok(h) = parse(&bytes) {
                prop_assert!(h.total_len <= bytes.len());
                prop_assert!(h.l4_offset <= h.total_len);
                let _ = flow_key(&h);
                let (s, d) = if v6 {
                    (IpAddr::V6(ns.into()), IpAddr::V6(nd.into()))
                } else {
                    let (a, b) = ([ns[0], ns[1], ns[2], ns[3]], [nd[0], nd[1], nd[2], nd[3]]);
                    (IpAddr::V4(a.into()), IpAddr::V4(b.into()))
                };
                let _ = rewrite(&mut bytes, &h, s, d);
            }
        }

        #[test]
        fn mutated_packets_never_panic(t in any_t(), v6 in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..64),
                                       flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
            let mut p = if v6 {
                build_v6(v6_addr(1), v6_addr(2), t, &data)
            } else {
                build_v4(V4A, V4B, t, &data)
            };
            for (at, val) in flips {
                let n = p.len();
                p[at % n] = val;
            }
            let cut = cut % (p.len() + 1);
            p.truncate(cut);
            if let Ok(h) = parse(&p) {
                let (s, d) = (h.dst, h.src);
                let _ = rewrite(&mut p, &h, s, d);
            }
        }
    }

    fn v6_addr(last: u8) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[0] = 0xfc;
        b[15] = last;
        Ipv6Addr::from(b)
    }

    /// Replaces the transport checksum of `pkt` with its pseudo-header sum, as a kernel sender leaves it when the
    /// checksum is offloaded (CHECKSUM_PARTIAL).
    fn make_partial(pkt: &mut [u8]) {
        let h = parse(pkt).unwrap();
        let (at, segment) = l4_checksum_at(&h).unwrap();
        let pseudo = fold(pseudo_header_sum(&h, h.protocol, segment.len()));
        pkt[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    }

    #[test]
    fn partial_checksums_are_completed_and_complete_ones_left_alone() {
        for (name, mut pkt) in [
            ("tcp4", build_v4(V4A, V4B, T::Tcp, &payload(1000))),
            ("udp4", build_v4(V4A, V4B, T::Udp, &payload(333))),
            (
                "tcp6",
                build_v6(v6("fc00::2"), v6("fdff:2000::55"), T::Tcp, &payload(999)),
            ),
            (
                "udp6",
                build_v6(v6("fc00::2"), v6("fdff:2000::55"), T::Udp, &payload(2)),
            ),
        ] {
            let good = pkt.clone();
            let h = parse(&pkt).unwrap();
            assert!(
                !complete_partial_checksum(&mut pkt, &h),
                "{name}: complete left alone"
            );
            assert_eq!(pkt, good, "{name}");
            make_partial(&mut pkt);
            assert_ne!(pkt, good, "{name}: the test made it partial");
            let h = parse(&pkt).unwrap();
            assert!(
                complete_partial_checksum(&mut pkt, &h),
                "{name}: partial completed"
            );
            assert_eq!(pkt, good, "{name}: byte for byte what a full computation gives");
            assert_checksums(&pkt);
        }
        // ICMP and fragments are not touched.
        let mut icmp = build_v4(V4A, V4B, T::EchoReq, &payload(10));
        let h = parse(&icmp).unwrap();
        assert!(!complete_partial_checksum(&mut icmp, &h));
    }

    #[test]
    fn a_partial_checksum_survives_the_rewrite_once_completed() {
        // What the TUN path does with a packet a peer's fast path sent: complete first, then translate.
        let mut pkt = build_v4(V4C, V4A, T::Tcp, &payload(500));
        make_partial(&mut pkt);
        let h = parse(&pkt).unwrap();
        assert!(complete_partial_checksum(&mut pkt, &h));
        rewrite(&mut pkt, &h, IpAddr::V4(V4B), IpAddr::V4(V4A)).unwrap();
        assert_checksums(&pkt);
    }

    fn tcp_flags_of(seg: &[u8], l4: usize) -> u8 {
        seg[l4 + 13]
    }

    #[test]
    fn super_packets_are_cut_into_mtu_segments_with_their_own_headers() {
        for is_v6 in [false, true] {
            let data = payload(4000);
            let (src, dst) = (v6("fc00::2"), v6("fdff::7"));
            let b = if is_v6 {
                PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            } else {
                PacketBuilder::ipv4(V4A.octets(), V4B.octets(), 64)
            };
            let mut pkt = Vec::new();
            b.tcp(40000, 80, 1_000_000, 1024)
                .ack(5)
                .psh()
                .fin()
                .write(&mut pkt, &data)
                .unwrap();
            // As a fast path sends it: offloaded checksum, one packet of 4000 bytes of data.
            make_partial(&mut pkt);
            let h = parse(&pkt).unwrap();
            let mut segs: Vec<Vec<u8>> = Vec::new();
            let n = segment_tcp(&pkt, &h, 1450, |s| segs.push(s.to_vec())).unwrap();
            assert_eq!(n, segs.len());
            let l4 = if is_v6 { 40 } else { 20 };
            let mss = 1450 - l4 - 20;
            assert_eq!(n, data.len().div_ceil(mss), "v6 {is_v6}");
            let mut joined = Vec::new();
            for (i, seg) in segs.iter().enumerate() {
                assert!(seg.len() <= 1450, "segment {i}: {} bytes", seg.len());
                assert_checksums(seg);
                let sh = parse(seg).unwrap();
                assert_eq!(sh.total_len, seg.len());
                let seq = u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]]);
                assert_eq!(seq, 1_000_000 + u32::try_from(i * mss).unwrap());
                let f = tcp_flags_of(seg, l4);
                let last = i + 1 == n;
                assert_eq!(f & tcp_flags::FIN != 0, last, "FIN on the last segment only");
                assert_eq!(f & tcp_flags::PSH != 0, last, "PSH on the last segment only");
                assert!(f & tcp_flags::ACK != 0);
                if !is_v6 {
                    assert_eq!(
                        u16::from_be_bytes([seg[4], seg[5]]),
                        u16::from_be_bytes([pkt[4], pkt[5]]).wrapping_add(u16::try_from(i).unwrap())
                    );
                }
                joined.extend_from_slice(&seg[l4 + 20..]);
            }
            assert_eq!(joined, data, "the data, in order, once");
        }
        // Not TCP: refused.
        let udp = build_v4(V4A, V4B, T::Udp, &payload(3000));
        let h = parse(&udp).unwrap();
        assert!(segment_tcp(&udp, &h, 1450, |_| {}).is_err());
    }
}
