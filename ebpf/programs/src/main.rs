//! The overlay's fast path: two tc classifiers (clsact, direct action) that translate and forward the packets of
//! flows the TUN proxy (NetManager's slow path) already decided, and pass everything else on unchanged.
//!
//! - `oakestra_from_container`, on the ingress of the host end of every container veth: a packet to an overlay
//!   address whose flow is in `FLOWS` gets the flow's addresses (incremental L3/L4 checksum updates), then is
//!   redirected into the destination container's namespace (`bpf_redirect_peer`) when the instance runs here, or
//!   encapsulated in the overlay's wire format (outer IPv4 + UDP to the peer's tunnel port, the rewritten inner
//!   packet as payload, no extra header) and sent out of the underlay (`bpf_redirect` / `bpf_redirect_neigh`).
//! - `oakestra_from_underlay`, on the ingress of the underlay interface: a UDP datagram to the tunnel port holding
//!   exactly one inner packet of a flow in `FLOWS` is decapsulated, translated and redirected into its container.
//!
//! Misses (a flow's first packets, unknown flows), TCP SYN/FIN/RST (so the slow path's connection table follows
//! every flow's state), fragments, IPv4 options, IPv6 extension headers, an IPv6 underlay and anything the routing
//! lookup cannot resolve go to the slow path untouched: it decides and writes both directions of a flow into
//! `FLOWS`, so policy lives in one place.
//!
//! GSO super-packets are forwarded whole: encapsulation uses `bpf_skb_adjust_room` with the UDP-tunnel flags and a
//! fixed GSO size, so the kernel (or the NIC) cuts them into inner packets of the container MTU, each in its own
//! datagram of at most MTU + 28 bytes, exactly as the TUN path sends them.
//!
//! Built only for `bpfel-unknown-none` with nightly and bpf-linker (NetManager's `build.rs` does it through
//! aya-build). On the host the crate still type-checks, so `cargo clippy --workspace` covers it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[allow(unsafe_code)]
mod programs {
    use aya_ebpf::{
        bindings::{
            BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
            BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
            BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK,
            TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
        },
        helpers::{
            bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_ktime_get_coarse_ns,
            bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        },
        macros::{classifier, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::TcContext,
    };
    use oakestra_ebpf_common::{
        Config, FlowAction, FlowEntry, FlowKey, LocalDest, LocalKey, config_flags, family, proto, stat,
    };

    /// Established flows, both directions; NetManager writes them (and sizes the map before loading).
    #[map]
    static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(65_536, 0);
    /// Containers on this worker, by namespace address.
    #[map]
    static LOCALS: HashMap<LocalKey, LocalDest> = HashMap::with_max_entries(1024, 0);
    /// The one [`Config`].
    #[map]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    /// `[packets, bytes]` per [`stat`] slot and CPU.
    #[map]
    static STATS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(stat::COUNT, 0);

    const ETH_HLEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPV4_HLEN: usize = 20;
    const IPV6_HLEN: usize = 40;
    const UDP_HLEN: usize = 8;
    /// Outer IPv4 + UDP: what encapsulation adds.
    const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN;
    const PACKET_HOST: u32 = 0;
    const AF_INET: u8 = 2;
    const TCP_SYN_FIN_RST: u8 = 0x02 | 0x01 | 0x04;
    /// The fast path refreshes a flow's `last_seen_ns` at most this often (a store per packet would bounce the
    /// entry's cache line between CPUs for nothing: expiry works in seconds).
    const TOUCH_NS: u64 = 1_000_000_000;

    /// What [`parse`] learned about an IP packet at a known offset.
    struct Packet {
        /// Offset of the IP header.
        l3: usize,
        /// Offset of the transport header.
        l4: usize,
        v6: bool,
        key: FlowKey,
        /// TCP flags (0 for other protocols).
        tcp_flags: u8,
        /// Length of the IP packet according to its header.
        ip_len: usize,
    }

    /// Why [`parse`] gave up.
    enum Skip {
        /// Not an IP packet the overlay cares about: pass silently.
        NotOurs,
        /// An overlay packet the programs do not handle (fragment, options, extension header, other protocol):
        /// the slow path's business.
        Unhandled,
    }

    fn count(slot: u32, bytes: u32) {
        if let Some(c) = STATS.get_ptr_mut(slot) {
            // SAFETY: the pointer comes from the verifier-checked per-CPU lookup and is used on this CPU only.
            unsafe {
                (*c)[0] += 1;
                (*c)[1] += u64::from(bytes);
            }
        }
    }

    #[inline(always)]
    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    /// Whether an address (16-byte key form) is in the overlay ranges: 10.16.0.0/12 or fc00::/7.
    #[inline(always)]
    fn in_overlay(addr: &[u8; 16], v6: bool) -> bool {
        if v6 {
            addr[0] & 0xfe == 0xfc
        } else {
            addr[0] == 10 && addr[1] & 0xf0 == 0x10
        }
    }

    /// Parses the IP packet at `l3` (the version nibble decides the family) down to its flow key, into `p`.
    /// Addresses are loaded straight into the key: everything here lives on a 512-byte stack.
    #[inline(always)]
    fn parse(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), Skip> {
        let first: u8 = ctx.load(l3).map_err(|_| Skip::NotOurs)?;
        p.l3 = l3;
        let protocol = match first >> 4 {
            4 => {
                let h: [u8; IPV4_HLEN] = ctx.load(l3).map_err(|_| Skip::NotOurs)?;
                p.key.dst_addr[..4].copy_from_slice(&h[16..20]);
                if !in_overlay(&p.key.dst_addr, false) {
                    return Err(Skip::NotOurs);
                }
                // IHL 5 only, no fragment (MF or an offset).
                if h[0] != 0x45 || be16(&h, 6) & 0x3fff != 0 {
                    return Err(Skip::Unhandled);
                }
                p.key.src_addr[..4].copy_from_slice(&h[12..16]);
                p.v6 = false;
                p.l4 = l3 + IPV4_HLEN;
                p.ip_len = usize::from(be16(&h, 2));
                h[9]
            }
            6 => {
                let h: [u8; 8] = ctx.load(l3).map_err(|_| Skip::NotOurs)?;
                // Fixed-size loads: the verifier must see a non-zero length.
                p.key.dst_addr = ctx.load(l3 + 24).map_err(|_| Skip::NotOurs)?;
                if !in_overlay(&p.key.dst_addr, true) {
                    return Err(Skip::NotOurs);
                }
                p.key.src_addr = ctx.load(l3 + 8).map_err(|_| Skip::NotOurs)?;
                p.v6 = true;
                p.l4 = l3 + IPV6_HLEN;
                p.ip_len = IPV6_HLEN + usize::from(be16(&h, 4));
                h[6]
            }
            _ => return Err(Skip::NotOurs),
        };
        let l4h: [u8; 8] = ctx.load(p.l4).map_err(|_| Skip::Unhandled)?;
        p.tcp_flags = 0;
        let (src_port, dst_port) = match protocol {
            proto::TCP => {
                p.tcp_flags = ctx.load(p.l4 + 13).map_err(|_| Skip::Unhandled)?;
                ([l4h[0], l4h[1]], [l4h[2], l4h[3]])
            }
            proto::UDP => ([l4h[0], l4h[1]], [l4h[2], l4h[3]]),
            proto::ICMP | proto::ICMPV6 => {
                // ICMP(v6) echo request or reply only: the key is (addresses, id, id), as the slow path builds it.
                let echo = if p.v6 {
                    protocol == proto::ICMPV6 && (l4h[0] == 128 || l4h[0] == 129)
                } else {
                    protocol == proto::ICMP && (l4h[0] == 8 || l4h[0] == 0)
                };
                if !echo {
                    return Err(Skip::Unhandled);
                }
                ([l4h[4], l4h[5]], [l4h[4], l4h[5]])
            }
            _ => return Err(Skip::Unhandled),
        };
        // The key stores ports in network byte order: the bytes as they are in the packet.
        p.key.src_port = u16::from_ne_bytes(src_port);
        p.key.dst_port = u16::from_ne_bytes(dst_port);
        p.key.protocol = protocol;
        p.key.family = if p.v6 { family::V6 } else { family::V4 };
        Ok(())
    }

    /// Refreshes the flow's `last_seen_ns` when it is more than [`TOUCH_NS`] old.
    #[inline(always)]
    fn touch(entry: *mut FlowEntry, now: u64) {
        // SAFETY: `entry` comes from a verifier-checked map lookup; racing writers store the same kind of value.
        unsafe {
            if now.wrapping_sub((*entry).last_seen_ns) > TOUCH_NS {
                (*entry).last_seen_ns = now;
            }
        }
    }

    /// Offset of the transport checksum in the header, and the `bpf_l4_csum_replace` flags it needs; `None` for
    /// ICMPv4, whose checksum does not cover the addresses.
    #[inline(always)]
    fn l4_checksum(protocol: u8) -> Option<(usize, u64)> {
        match protocol {
            proto::TCP => Some((16, u64::from(BPF_F_PSEUDO_HDR))),
            // A UDP checksum of 0 means "none" and stays 0; an update that computes to 0 is sent as 0xffff.
            proto::UDP => Some((6, u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))),
            proto::ICMPV6 => Some((2, u64::from(BPF_F_PSEUDO_HDR))),
            _ => None,
        }
    }

    /// Writes the action's addresses into the IP header at `p.l3` and updates the IPv4 header checksum and the
    /// transport checksum by the difference (pseudo-header aware, so CHECKSUM_PARTIAL packets stay consistent).
    /// `a` points into the flow map: the addresses are read from there, not copied onto the stack.
    #[inline(always)]
    fn rewrite(ctx: &mut TcContext, p: &Packet, a: &FlowAction) -> Result<(), ()> {
        let l4 = l4_checksum(p.key.protocol);
        if p.v6 {
            if let Some((at, flags)) = l4 {
                // `src_addr, dst_addr` and `new_src, new_dst` are 32 contiguous bytes each.
                // SAFETY: both pointers cover 32 readable bytes (a stack key and a map value); the helper only reads.
                let diff = unsafe {
                    bpf_csum_diff(
                        p.key.src_addr.as_ptr() as *mut u32,
                        32,
                        a.new_src.as_ptr() as *mut u32,
                        32,
                        0,
                    )
                };
                if diff < 0 {
                    return Err(());
                }
                // Size 0: `to` is a precomputed difference (the helper takes its low 32 bits).
                ctx.l4_csum_replace(p.l4 + at, 0, diff as u64, flags)
                    .map_err(|_| ())?;
            }
            ctx.store(p.l3 + 8, &a.new_src, 0).map_err(|_| ())?;
            ctx.store(p.l3 + 24, &a.new_dst, 0).map_err(|_| ())?;
        } else {
            for (at, old, new) in [
                (12usize, &p.key.src_addr, &a.new_src),
                (16usize, &p.key.dst_addr, &a.new_dst),
            ] {
                let o = u32::from_ne_bytes([old[0], old[1], old[2], old[3]]);
                let n = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]);
                if o == n {
                    continue;
                }
                ctx.l3_csum_replace(p.l3 + 10, u64::from(o), u64::from(n), 4)
                    .map_err(|_| ())?;
                if let Some((csum_at, flags)) = l4 {
                    ctx.l4_csum_replace(p.l4 + csum_at, u64::from(o), u64::from(n), flags | 4)
                        .map_err(|_| ())?;
                }
                ctx.store(p.l3 + at, &n, 0).map_err(|_| ())?;
            }
        }
        Ok(())
    }

    /// Sets the Ethernet addresses of the frame (destination first, as on the wire).
    #[inline(always)]
    fn set_macs(ctx: &mut TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(dst);
        macs[6..].copy_from_slice(src);
        ctx.store(0, &macs, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn config() -> Option<Config> {
        match CONFIG.get(0) {
            Some(c) if c.flags & config_flags::ENABLED != 0 => Some(*c),
            _ => None,
        }
    }

    /// The Ethernet type of the frame, if it is IPv4 or IPv6.
    #[inline(always)]
    fn ip_ethertype(ctx: &TcContext) -> Option<u16> {
        let t: [u8; 2] = ctx.load(12).ok()?;
        match u16::from_be_bytes(t) {
            t @ (ETH_P_IP | ETH_P_IPV6) => Some(t),
            _ => None,
        }
    }

    /// Delivers the (already translated) frame into the namespace of the container `dest`.
    #[inline(always)]
    fn deliver(ctx: &mut TcContext, cfg: &Config, dest: &LocalDest) -> i32 {
        if set_macs(ctx, &dest.mac, &cfg.gateway_mac).is_err() {
            count(stat::ERROR, ctx.len());
            return TC_ACT_SHOT as i32;
        }
        // A frame the container sent to the bridge's MAC was classified "for another host" on the veth; the
        // receiving container must see it as its own.
        let _ = ctx.change_type(PACKET_HOST);
        // SAFETY: a plain helper call on an interface index.
        unsafe { bpf_redirect_peer(dest.ifindex, 0) as i32 }
    }

    /// An empty [`Packet`] for [`parse`] to fill.
    #[inline(always)]
    fn packet() -> Packet {
        Packet {
            l3: 0,
            l4: 0,
            v6: false,
            key: FlowKey::default(),
            tcp_flags: 0,
            ip_len: 0,
        }
    }

    /// Packets a container sends (ingress of the host end of its veth).
    #[classifier]
    pub fn oakestra_from_container(mut ctx: TcContext) -> i32 {
        from_container(&mut ctx)
    }

    fn from_container(ctx: &mut TcContext) -> i32 {
        let pass = TC_ACT_OK as i32;
        let Some(cfg) = config() else { return pass };
        if ip_ethertype(ctx).is_none() {
            return pass;
        }
        let mut p = packet();
        match parse(ctx, ETH_HLEN, &mut p) {
            Ok(()) => {}
            Err(Skip::NotOurs) => return pass,
            Err(Skip::Unhandled) => {
                count(stat::MISS_OUT, ctx.len());
                return pass;
            }
        }
        let Some(entry) = FLOWS.get_ptr_mut(&p.key) else {
            count(stat::MISS_OUT, ctx.len());
            return pass;
        };
        if p.tcp_flags & TCP_SYN_FIN_RST != 0 {
            count(stat::PASS_OUT, ctx.len());
            return pass;
        }
        // SAFETY: a verifier-checked map value, valid for this run of the program.
        let action: &FlowAction = unsafe { &(*entry).action };
        if action.tunnel_port == 0 {
            to_local(ctx, &cfg, &p, entry, action)
        } else {
            to_peer(ctx, &cfg, &mut p, entry, action)
        }
    }

    /// The destination instance runs on this worker: translate, apply the receiving side's translation of the
    /// new tuple too (what the slow path does when it loops a packet back to itself), and redirect.
    #[inline(always)]
    fn to_local(
        ctx: &mut TcContext,
        cfg: &Config,
        p: &Packet,
        entry: *mut FlowEntry,
        action: &FlowAction,
    ) -> i32 {
        let inbound = FlowKey {
            src_addr: action.new_src,
            dst_addr: action.new_dst,
            ..p.key
        };
        let second = FLOWS.get_ptr_mut(&inbound);
        let mut last: &FlowAction = action;
        if let Some(e2) = second {
            // SAFETY: a verifier-checked map value, valid for this run of the program.
            let a2 = unsafe { &(*e2).action };
            if a2.tunnel_port == 0 {
                last = a2;
            }
        }
        let dkey = LocalKey {
            addr: last.new_dst,
            family: p.key.family,
            _pad: [0; 3],
        };
        // SAFETY: a verifier-checked map value, copied out.
        let Some(dest) = (unsafe { LOCALS.get(&dkey) }).copied() else {
            count(stat::PASS_OUT, ctx.len());
            return TC_ACT_OK as i32;
        };
        // SAFETY: a plain helper call.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        touch(entry, now);
        if let Some(e2) = second {
            touch(e2, now);
        }
        if rewrite(ctx, p, last).is_err() {
            count(stat::ERROR, ctx.len());
            return TC_ACT_SHOT as i32;
        }
        count(stat::LOCAL, ctx.len());
        deliver(ctx, cfg, &dest)
    }

    /// The destination instance runs on another worker: encapsulate towards it over the IPv4 underlay.
    #[inline(always)]
    fn to_peer(
        ctx: &mut TcContext,
        cfg: &Config,
        p: &mut Packet,
        entry: *mut FlowEntry,
        action: &FlowAction,
    ) -> i32 {
        let pass = TC_ACT_OK as i32;
        let t = &action.tunnel_addr;
        let v4_mapped = t[..10].iter().all(|b| *b == 0) && t[10] == 0xff && t[11] == 0xff;
        if cfg.flags & config_flags::ENCAP_V4 == 0 || !v4_mapped {
            count(stat::PASS_OUT, ctx.len());
            return pass;
        }
        let peer = [t[12], t[13], t[14], t[15]];
        let dport = action.tunnel_port;
        // Spread flows over the receiver's queues and sockets like VXLAN does: a source port from the inner flow's
        // hash (49152-65535). The receiver only looks at the destination port.
        // SAFETY: a plain helper call on this program's skb.
        let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
        let sport = 0xc000u16 | (hash as u16 & 0x3fff);
        // The route and neighbour towards the peer, as if this worker sent the datagram itself.
        // SAFETY: an all-zero lookup structure is the documented starting point.
        let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
        fib.family = AF_INET;
        fib.l4_protocol = proto::UDP;
        fib.sport = sport.to_be();
        fib.dport = dport;
        // A plain packet is checked against the route's MTU with the encapsulation added. A GSO one is left
        // without a length: the helper then checks that its segments fit (the overlay MTU rule of the TUN path,
        // container MTU + 28 <= underlay MTU, is what makes the encapsulated segments fit too).
        // SAFETY: reading a field of this program's own context.
        let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
        if !gso {
            fib.__bindgen_anon_1.tot_len = (p.ip_len + ENCAP_LEN).min(0xffff) as u16;
        }
        fib.ifindex = cfg.underlay_ifindex;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.underlay_v4);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(peer);
        // SAFETY: `fib` is an initialised lookup structure of the size passed.
        let rc = unsafe {
            fib_lookup(
                ctx.skb.skb as *mut _,
                &mut fib,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        };
        let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
        if !resolved && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            count(stat::PASS_OUT, ctx.len());
            return pass;
        }
        let flags =
            u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
        if ctx
            .adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
            .is_err()
        {
            count(stat::PASS_OUT, ctx.len());
            return pass;
        }
        // SAFETY: a plain helper call.
        touch(entry, unsafe { bpf_ktime_get_coarse_ns() });
        p.l3 += ENCAP_LEN;
        p.l4 += ENCAP_LEN;
        if rewrite(ctx, p, action).is_err() || write_outer(ctx, cfg, peer, sport, dport).is_err() {
            count(stat::ERROR, ctx.len());
            return TC_ACT_SHOT as i32;
        }
        count(stat::ENCAP, ctx.len());
        if resolved {
            if set_macs(ctx, &fib.dmac, &fib.smac).is_err() {
                count(stat::ERROR, ctx.len());
                return TC_ACT_SHOT as i32;
            }
            // SAFETY: a plain helper call on an interface index.
            return unsafe { bpf_redirect(fib.ifindex, 0) as i32 };
        }
        // No neighbour entry yet: let the kernel resolve it (and queue the packet meanwhile).
        // SAFETY: a null parameter block of length 0 asks the helper to route by the packet's own headers.
        unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }

    /// Writes the Ethernet type, the outer IPv4 header (DF, TTL 64, checksum) and the UDP header (no checksum,
    /// as IPv4 allows) in front of the inner packet. Lengths are capped at 65535: GSO packets get theirs per
    /// segment from the kernel.
    #[inline(always)]
    fn write_outer(
        ctx: &mut TcContext,
        cfg: &Config,
        peer: [u8; 4],
        sport: u16,
        dport_be: u16,
    ) -> Result<(), ()> {
        let ip_len = (ctx.len() as usize - ETH_HLEN).min(0xffff) as u16;
        let udp_len = ip_len.saturating_sub(IPV4_HLEN as u16);
        let [l0, l1] = ip_len.to_be_bytes();
        let s = cfg.underlay_v4;
        let mut h: [u8; IPV4_HLEN + UDP_HLEN] = [
            0x45,
            0,
            l0,
            l1,
            0,
            0,
            0x40,
            0,
            64,
            proto::UDP,
            0,
            0,
            s[0],
            s[1],
            s[2],
            s[3],
            peer[0],
            peer[1],
            peer[2],
            peer[3],
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < IPV4_HLEN {
            sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = !(sum as u16);
        h[10..12].copy_from_slice(&check.to_be_bytes());
        h[20..22].copy_from_slice(&sport.to_be_bytes());
        h[22..24].copy_from_slice(&dport_be.to_ne_bytes());
        h[24..26].copy_from_slice(&udp_len.to_be_bytes());
        ctx.store(12, &ETH_P_IP.to_be_bytes(), 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN, &h, 0).map_err(|_| ())
    }

    /// Tunnel datagrams from other workers (ingress of the underlay interface).
    #[classifier]
    pub fn oakestra_from_underlay(mut ctx: TcContext) -> i32 {
        from_underlay(&mut ctx)
    }

    fn from_underlay(ctx: &mut TcContext) -> i32 {
        let pass = TC_ACT_OK as i32;
        let Some(cfg) = config() else { return pass };
        if ip_ethertype(ctx) != Some(ETH_P_IP) {
            return pass;
        }
        let Ok(outer) = ctx.load::<[u8; IPV4_HLEN + UDP_HLEN]>(ETH_HLEN) else {
            return pass;
        };
        // UDP to our tunnel port, IHL 5, not a fragment.
        if outer[9] != proto::UDP
            || u16::from_ne_bytes([outer[22], outer[23]]) != cfg.tunnel_port
            || outer[0] != 0x45
            || be16(&outer, 6) & 0x3fff != 0
        {
            return pass;
        }
        // A datagram whose UDP checksum is still offloaded (it holds only the pseudo-header sum: a socket sender
        // on links that keep offloads, veth or virtio) carries the kernel's "checksum from here" mark on the outer
        // header, which decapsulation would leave pointing into the removed bytes: the socket takes it.
        let udp_check = be16(&outer, 26);
        if udp_check != 0 {
            let mut sum: u32 = u32::from(proto::UDP) + u32::from(be16(&outer, 24));
            let mut i = 12;
            while i < 20 {
                sum += u32::from(be16(&outer, i));
                i += 2;
            }
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            if sum as u16 == udp_check {
                count(stat::MISS_IN, ctx.len());
                return pass;
            }
        }
        let inner_at = ETH_HLEN + ENCAP_LEN;
        let mut p = packet();
        if parse(ctx, inner_at, &mut p).is_err() {
            count(stat::MISS_IN, ctx.len());
            return pass;
        }
        let Some(entry) = FLOWS.get_ptr_mut(&p.key) else {
            count(stat::MISS_IN, ctx.len());
            return pass;
        };
        // SAFETY: a verifier-checked map value, valid for this run of the program.
        let action: &FlowAction = unsafe { &(*entry).action };
        let dkey = LocalKey {
            addr: action.new_dst,
            family: p.key.family,
            _pad: [0; 3],
        };
        // SAFETY: a verifier-checked map value, copied out.
        let dest = unsafe { LOCALS.get(&dkey) }.copied();
        // Exactly one inner packet per datagram (a train that GRO merged is the socket's business), a local
        // destination, and no TCP state change.
        let whole = p.ip_len == ctx.len() as usize - inner_at;
        let Some(dest) = dest.filter(|_| whole && p.tcp_flags & TCP_SYN_FIN_RST == 0) else {
            count(stat::PASS_IN, ctx.len());
            return pass;
        };
        let decap = u64::from(
            BPF_F_ADJ_ROOM_FIXED_GSO
                | if p.v6 {
                    BPF_F_ADJ_ROOM_DECAP_L3_IPV6
                } else {
                    BPF_F_ADJ_ROOM_DECAP_L3_IPV4
                },
        );
        if ctx
            .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, decap)
            .is_err()
        {
            count(stat::PASS_IN, ctx.len());
            return pass;
        }
        // SAFETY: a plain helper call.
        touch(entry, unsafe { bpf_ktime_get_coarse_ns() });
        p.l3 = ETH_HLEN;
        p.l4 -= ENCAP_LEN;
        let ethertype = if p.v6 { ETH_P_IPV6 } else { ETH_P_IP };
        if ctx.store(12, &ethertype.to_be_bytes(), 0).is_err() || rewrite(ctx, &p, action).is_err() {
            count(stat::ERROR, ctx.len());
            return TC_ACT_SHOT as i32;
        }
        count(stat::DECAP, ctx.len());
        deliver(ctx, &cfg, &dest)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }
}

/// On the host there is nothing to run; the binary only exists for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
