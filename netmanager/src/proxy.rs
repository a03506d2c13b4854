//! The TUN proxy's translation: what happens to one packet leaving a container towards a service address
//! (`outgoing`) and to one packet arriving from a peer worker (`ingoing`), on top of the connection table, the
//! fragment trackers and the current table snapshot. Pure of I/O: the dataplane threads (`dataplane`) and the
//! control task call these with packet buffers.
//!
//! The wire contract is the reference's (§3.4/§3.6 of the behaviour notes): towards the network, dst (service IP)
//! becomes the chosen instance's namespace IP and src (the client's namespace IP) becomes the client's own
//! instance IP; the reply, on the node that originated the flow, gets the service IP back as its source.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use oakestra_ebpf_common::{FlowAction, FlowKey};
use oakestra_protocol::addr::plan::{OVERLAY_V4, OVERLAY_V6};
use rustc_hash::FxHashMap;

use crate::{
    conntrack::{ConnTable, Timeouts},
    frag::{FragKey, FragTracker},
    packet::{self, Headers, L4},
    table::{Published, Snapshot},
};

/// What a table query is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueryKey {
    /// A destination service or instance address nobody has resolved yet.
    Ip(IpAddr),
    /// The job of a local container whose own entry is not in the table yet (by its namespace address).
    LocalSource(IpAddr),
}

/// Why a packet was dropped (counted, never logged per packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a readable IPv4/IPv6 packet.
    Malformed,
    /// Destination outside the overlay ranges.
    NotOverlay,
    /// A protocol the proxy does not translate (only TCP, UDP and ICMP echo are).
    Protocol,
    /// The source is not a local instance.
    UnknownSource,
    /// The chosen instance has no address of the packet's family.
    NoAddress,
    /// An inbound packet for an address that is not local and belongs to no flow of ours.
    NotLocal,
    /// A bounded buffer (pending queries, early fragments, the flow table) is full.
    Full,
}

/// What to do with a packet after translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it in one UDP datagram to this worker.
    Tunnel(SocketAddr),
    /// Write it to the TUN (the kernel delivers it to a local container).
    Local,
    /// Hand it to the inbound path of this same node (the destination instance runs here).
    Loop,
    /// The destination is unknown: the caller parks a copy under this key while the table query runs.
    Miss(QueryKey),
    /// A later fragment that arrived before its first one: a copy is being held.
    Held,
    /// Dropped.
    Drop(Drop),
}

/// Packets waiting for a table query, bounded per key and in total.
#[derive(Debug, Default)]
pub struct Pending {
    queues: FxHashMap<QueryKey, VecDeque<Vec<u8>>>,
    total: usize,
}

/// Per-key and total bounds of [`Pending`].
pub const PENDING_PER_KEY: usize = 32;
/// See [`PENDING_PER_KEY`].
pub const PENDING_TOTAL: usize = 2048;

impl Pending {
    /// Parks a copy of `packet`; `Ok(true)` when it is the first one for `key` (the caller starts the query).
    pub fn hold(&mut self, key: QueryKey, packet: &[u8]) -> Result<bool, Drop> {
        if self.total >= PENDING_TOTAL {
            return Err(Drop::Full);
        }
        let first = !self.queues.contains_key(&key);
        let queue = self.queues.entry(key).or_default();
        if queue.len() >= PENDING_PER_KEY {
            // Keep the newest: a retransmission carries the same data.
            queue.pop_front();
            self.total -= 1;
        }
        queue.push_back(packet.to_vec());
        self.total += 1;
        Ok(first)
    }

    /// Takes every packet parked under `key` (also clears the key, so a later miss starts a new query).
    pub fn take(&mut self, key: &QueryKey) -> Vec<Vec<u8>> {
        let packets: Vec<Vec<u8>> = self.queues.remove(key).map(Vec::from).unwrap_or_default();
        self.total -= packets.len();
        packets
    }

    /// Number of parked packets.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Dataplane counters (relaxed atomics, added per batch).
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the TUN.
    pub tun_rx: AtomicU64,
    /// Bytes of the packets read from the TUN.
    pub tun_rx_bytes: AtomicU64,
    /// Packets written to the TUN.
    pub tun_tx: AtomicU64,
    /// Datagrams received from peers.
    pub udp_rx: AtomicU64,
    /// Bytes of the datagrams received from peers (their payload: the inner packets).
    pub udp_rx_bytes: AtomicU64,
    /// Datagrams sent to peers.
    pub udp_tx: AtomicU64,
    /// Packets dropped.
    pub dropped: AtomicU64,
    /// Packets parked for a table query.
    pub parked: AtomicU64,
    /// New flows.
    pub flows: AtomicU64,
    /// Packets from peers whose offloaded (pseudo-header only) transport checksum was completed here.
    pub checksums: AtomicU64,
    /// Packets from peers longer than the MTU (GSO super-packets) cut into segments here.
    pub segmented: AtomicU64,
}

/// How a fragment series is handled: the first fragment's action, or `None` for "delivered unchanged".
type FragDecision = Option<FlowAction>;

/// Everything the dataplane threads and the control task share.
#[derive(Debug)]
pub struct Shared {
    /// The connection table.
    pub conn: ConnTable,
    /// The published translation table.
    pub table: Published,
    /// Decisions for fragment series leaving containers.
    frag_out: Mutex<FragTracker<FragDecision>>,
    /// Decisions for fragment series arriving from peers.
    frag_in: Mutex<FragTracker<FragDecision>>,
    /// Packets waiting for table queries.
    pub pending: Mutex<Pending>,
    /// This worker's container subnets.
    pub subnet_v4: Ipv4Network,
    /// See [`Self::subnet_v4`].
    pub subnet_v6: Ipv6Network,
    /// Counters.
    pub counters: Counters,
    /// Where misses go: the control task starts the table query (slow path only).
    pub queries: tokio::sync::mpsc::UnboundedSender<QueryKey>,
}

/// Bounds of the connection table and the fragment trackers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Flows (each direction is one entry).
    pub max_flows: usize,
    /// Fragment series remembered at once.
    pub max_frag_series: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flows: 262_144,
            max_frag_series: 4096,
        }
    }
}

fn from16(bytes: [u8; 16], v6: bool) -> IpAddr {
    packet::addr_from_bytes(&bytes, !v6)
}

/// The flow action for a rewrite to `new_src`/`new_dst`, tunnelled to `tunnel` (None: local).
pub fn action(new_src: IpAddr, new_dst: IpAddr, tunnel: Option<SocketAddr>) -> FlowAction {
    let (tunnel_addr, tunnel_port) = match tunnel {
        Some(SocketAddr::V4(a)) => (a.ip().to_ipv6_mapped().octets(), a.port().to_be()),
        Some(SocketAddr::V6(a)) => (a.ip().octets(), a.port().to_be()),
        None => ([0; 16], 0),
    };
    FlowAction {
        new_src: packet::addr_bytes(new_src),
        new_dst: packet::addr_bytes(new_dst),
        tunnel_addr,
        tunnel_port,
        _pad: [0; 2],
    }
}

/// The two connection-table entries of a new flow, as the slow path decides it and writes them (also into the eBPF
/// flow map): `key` is the first packet's (client namespace address → `dialled` address), the client's instance
/// address is `src_inst`, the chosen instance has namespace address `t_ns` and instance address `t_inst` and runs
/// behind `tunnel` (None: on this worker).
///
/// - forward: `key` → src becomes `src_inst`, dst becomes `t_ns`, sent through `tunnel`;
/// - reply: the instance answers from its instance address to the client's namespace address, which must look as
///   if it came from the address the client dialled: (`t_inst` → client, ports swapped) → src becomes `dialled`,
///   dst stays the client, delivered here.
pub fn flow_pair(
    key: &FlowKey,
    dialled: IpAddr,
    src_inst: IpAddr,
    t_ns: IpAddr,
    t_inst: IpAddr,
    tunnel: Option<SocketAddr>,
) -> [(FlowKey, FlowAction); 2] {
    let v4 = key.family == oakestra_ebpf_common::family::V4;
    let client = packet::addr_from_bytes(&key.src_addr, v4);
    let forward = action(src_inst, t_ns, tunnel);
    let reply_key = FlowKey {
        src_addr: packet::addr_bytes(t_inst),
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        ..*key
    };
    [(*key, forward), (reply_key, action(dialled, client, None))]
}

/// Where an action sends the packet (None: deliver on this node).
pub fn action_tunnel(a: &FlowAction) -> Option<SocketAddr> {
    if a.tunnel_port == 0 {
        return None;
    }
    let ip = Ipv6Addr::from(a.tunnel_addr);
    let port = u16::from_be(a.tunnel_port);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    })
}

fn in_overlay(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => OVERLAY_V4.contains(v4),
        IpAddr::V6(v6) => OVERLAY_V6.contains(v6),
    }
}

fn tcp_flags(h: &Headers) -> Option<u8> {
    match h.l4 {
        L4::Tcp { flags, .. } => Some(flags),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// State for a worker whose containers live in `subnet_v4`/`subnet_v6`.
    pub fn new(
        subnet_v4: Ipv4Network,
        subnet_v6: Ipv6Network,
        limits: Limits,
        queries: tokio::sync::mpsc::UnboundedSender<QueryKey>,
    ) -> Self {
        let frag = || Mutex::new(FragTracker::new(limits.max_frag_series, 256, 1 << 20, 30));
        Self {
            conn: ConnTable::new(limits.max_flows, Timeouts::default()),
            table: Published::default(),
            frag_out: frag(),
            frag_in: frag(),
            pending: Mutex::new(Pending::default()),
            subnet_v4,
            subnet_v6,
            counters: Counters::default(),
            queries,
        }
    }

    /// Whether `ip` is a container address on this worker.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.subnet_v4.contains(v4),
            IpAddr::V6(v6) => self.subnet_v6.contains(v6),
        }
    }

    /// Periodic housekeeping: expired flows and fragment series. Returns the number of flows removed.
    pub fn sweep(&self, now: u32) -> usize {
        lock(&self.frag_out).sweep(now);
        lock(&self.frag_in).sweep(now);
        self.conn.sweep(now)
    }

    /// Drops every flow whose destination instance on another worker is no longer in `snap` (after a table
    /// update): the fast path forwards without asking the table, so a removed instance's flows must leave its map
    /// at once. New packets of such flows are balanced again by the slow path. Returns how many were dropped.
    pub fn prune(&self, snap: &Snapshot) -> usize {
        self.conn.retain(|k, a| {
            let dst = from16(a.new_dst, k.family == oakestra_ebpf_common::family::V6);
            self.is_local(dst) || snap.has_ns(dst)
        })
    }

    /// When the fast path last forwarded a packet to any of the namespace addresses `targets` (in `now_secs`
    /// time): the table's usage clocks only see the slow path, so an interest about to expire asks this first.
    pub fn fast_path_last_use(&self, targets: &[IpAddr]) -> Option<u32> {
        if !self.conn.mirrored() || targets.is_empty() {
            return None;
        }
        let wanted: Vec<[u8; 16]> = targets.iter().map(|a| packet::addr_bytes(*a)).collect();
        let mut keys = Vec::new();
        self.conn.for_each(|k, a, _| {
            if keys.len() < 256 && wanted.contains(&a.new_dst) {
                keys.push(*k);
            }
        });
        keys.iter().filter_map(|k| self.conn.mirror_last_seen(k)).max()
    }

    fn verdict_for(&self, a: &FlowAction, new_dst: IpAddr) -> Verdict {
        match action_tunnel(a) {
            Some(to) => Verdict::Tunnel(to),
            None if self.is_local(new_dst) => Verdict::Loop,
            None => Verdict::Local,
        }
    }

    /// Translates one packet read from the TUN (a container's packet to a service, instance or remote namespace
    /// address). Fragments released by a first fragment are appended to `released` for the caller to run through
    /// this function again.
    pub fn outgoing(
        &self,
        snap: &Snapshot,
        now: u32,
        pkt: &mut [u8],
        released: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        let Ok(h) = packet::parse(pkt) else {
            return Verdict::Drop(Drop::Malformed);
        };
        if !in_overlay(h.dst) {
            return Verdict::Drop(Drop::NotOverlay);
        }
        if h.is_later_fragment() {
            return self.later_fragment(&self.frag_out, &h, pkt, now);
        }
        let Some(key) = packet::flow_key(&h) else {
            return Verdict::Drop(Drop::Protocol);
        };
        let v6 = h.dst.is_ipv6();
        let flags = tcp_flags(&h);
        if let Some(a) = self.conn.lookup(&key, now, flags) {
            let new_dst = from16(a.new_dst, v6);
            // A flow stays on its instance while the instance exists; afterwards it is balanced again.
            if snap.by_ns(new_dst, now).is_some() {
                return self.apply(&h, pkt, a, v6, now, &self.frag_out, released);
            }
            self.conn.remove(&key);
        }
        let Some(src) = snap.by_ns(h.src, now) else {
            return if self.is_local(h.src) {
                Verdict::Miss(QueryKey::LocalSource(h.src))
            } else {
                Verdict::Drop(Drop::UnknownSource)
            };
        };
        let Some(src_inst) = src.instance_ip(v6) else {
            return Verdict::Drop(Drop::NoAddress);
        };
        let Some(target) = snap.choose(h.dst, now) else {
            // Not a service address: a direct namespace address of a known instance is forwarded unchanged.
            if let Some(direct) = snap.by_ns(h.dst, now) {
                let a = action(h.src, h.dst, Some(direct.node).filter(|_| !self.is_local(h.dst)));
                return self.verdict_for(&a, h.dst);
            }
            return Verdict::Miss(QueryKey::Ip(h.dst));
        };
        let (Some(t_ns), Some(t_inst)) = (target.ns(v6), target.instance_ip(v6)) else {
            return Verdict::Drop(Drop::NoAddress);
        };
        let tunnel = (!self.is_local(t_ns)).then_some(target.node);
        let [(key, forward), (reply_key, reply)] = flow_pair(&key, h.dst, src_inst, t_ns, t_inst, tunnel);
        if self.conn.insert(key, forward, now, flags).is_err()
            || self.conn.insert(reply_key, reply, now, None).is_err()
        {
            return Verdict::Drop(Drop::Full);
        }
        self.counters.flows.fetch_add(1, Ordering::Relaxed);
        self.apply(&h, pkt, forward, v6, now, &self.frag_out, released)
    }

    /// Translates one packet received from a peer (or looped back from [`Self::outgoing`]): the reply of a flow
    /// this node originated gets its service address back; anything else must be for a local container.
    pub fn ingoing(&self, now: u32, pkt: &mut [u8], released: &mut Vec<Vec<u8>>) -> Verdict {
        let Ok(h) = packet::parse(pkt) else {
            return Verdict::Drop(Drop::Malformed);
        };
        if h.is_later_fragment() {
            return self.later_fragment(&self.frag_in, &h, pkt, now);
        }
        // Before any rewrite: an incremental update of a pseudo-header-only checksum would not give one either.
        if packet::complete_partial_checksum(pkt, &h) {
            self.counters.checksums.fetch_add(1, Ordering::Relaxed);
        }
        let v6 = h.dst.is_ipv6();
        if let Some(key) = packet::flow_key(&h)
            && let Some(a) = self.conn.lookup(&key, now, tcp_flags(&h))
        {
            let new_dst = from16(a.new_dst, v6);
            if !self.is_local(new_dst) {
                return Verdict::Drop(Drop::NotLocal);
            }
            let local = FlowAction { tunnel_port: 0, ..a };
            return match self.apply(&h, pkt, local, v6, now, &self.frag_in, released) {
                Verdict::Loop => Verdict::Local,
                other => other,
            };
        }
        if !self.is_local(h.dst) {
            return Verdict::Drop(Drop::NotLocal);
        }
        if let Some(fk) = FragKey::of(&h) {
            released.extend(lock(&self.frag_in).on_first(fk, None, now));
        }
        Verdict::Local
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one call site per direction; a struct would only rename them"
    )]
    fn apply(
        &self,
        h: &Headers,
        pkt: &mut [u8],
        a: FlowAction,
        v6: bool,
        now: u32,
        frag: &Mutex<FragTracker<FragDecision>>,
        released: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        let (new_src, new_dst) = (from16(a.new_src, v6), from16(a.new_dst, v6));
        if packet::rewrite(pkt, h, new_src, new_dst).is_err() {
            return Verdict::Drop(Drop::Malformed);
        }
        if let Some(fk) = FragKey::of(h) {
            released.extend(lock(frag).on_first(fk, Some(a), now));
        }
        self.verdict_for(&a, new_dst)
    }

    fn later_fragment(
        &self,
        frag: &Mutex<FragTracker<FragDecision>>,
        h: &Headers,
        pkt: &mut [u8],
        now: u32,
    ) -> Verdict {
        let Some(fk) = FragKey::of(h) else {
            return Verdict::Drop(Drop::Malformed);
        };
        let mut tracker = lock(frag);
        match tracker.lookup(&fk, now) {
            Some(Some(a)) => {
                drop(tracker);
                let v6 = h.dst.is_ipv6();
                let (new_src, new_dst) = (from16(a.new_src, v6), from16(a.new_dst, v6));
                if packet::rewrite(pkt, h, new_src, new_dst).is_err() {
                    return Verdict::Drop(Drop::Malformed);
                }
                self.verdict_for(&a, new_dst)
            }
            Some(None) => {
                if self.is_local(h.dst) {
                    Verdict::Local
                } else {
                    Verdict::Drop(Drop::NotLocal)
                }
            }
            None => match tracker.hold(fk, pkt, now) {
                Ok(()) => Verdict::Held,
                Err(_) => Verdict::Drop(Drop::Full),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        sync::Arc,
    };

    use oakestra_ebpf_common::{FlowEntry, family, proto};

    use super::*;
    use crate::{
        conntrack::FlowMirror,
        plumbing::fake::FakeFastPath,
        table::{Instance, Policy, Table},
    };

    const CLIENT_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
    const CLIENT_INST: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 5);
    const SERVER_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 66);
    const SERVER_INST: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 7);
    const RR: Ipv4Addr = Ipv4Addr::new(10, 30, 55, 55);

    fn v4(a: Ipv4Addr) -> IpAddr {
        IpAddr::V4(a)
    }

    /// The client's TCP flow to the service: 10.18.0.2:40000 → 10.30.55.55:80.
    fn client_key() -> FlowKey {
        FlowKey::v4(
            CLIENT_NS.octets(),
            RR.octets(),
            40000u16.to_be(),
            80u16.to_be(),
            proto::TCP,
        )
    }

    #[test]
    fn a_flow_decision_becomes_two_entries_as_the_wire_contract_says() {
        let key = client_key();
        let peer: SocketAddr = "192.168.1.2:50103".parse().unwrap();
        let [(fk, fa), (rk, ra)] = flow_pair(
            &key,
            v4(RR),
            v4(CLIENT_INST),
            v4(SERVER_NS),
            v4(SERVER_INST),
            Some(peer),
        );
        // Forward: the client's instance address to the chosen instance's namespace address, through the tunnel.
        assert_eq!(fk, key);
        assert_eq!(fa.new_src[..4], CLIENT_INST.octets());
        assert_eq!(fa.new_dst[..4], SERVER_NS.octets());
        assert!(fa.new_src[4..].iter().chain(&fa.new_dst[4..]).all(|b| *b == 0));
        assert_eq!(fa.tunnel_addr, FlowAction::v4_mapped([192, 168, 1, 2]));
        assert_eq!(u16::from_be(fa.tunnel_port), 50103);
        assert_eq!(action_tunnel(&fa), Some(peer));
        // Reply: from the instance's own address back to the client, made to look as if from the dialled address.
        assert_eq!(
            rk,
            FlowKey::v4(
                SERVER_INST.octets(),
                CLIENT_NS.octets(),
                80u16.to_be(),
                40000u16.to_be(),
                proto::TCP
            )
        );
        assert_eq!(ra.new_src[..4], RR.octets());
        assert_eq!(ra.new_dst[..4], CLIENT_NS.octets());
        assert!(ra.is_local());
        // The map value the fast path reads: the action behind the last-seen stamp.
        let e = FlowEntry::new(fa, 7);
        assert_eq!((e.last_seen_ns, e.action, e._pad), (7, fa, [0; 4]));

        // IPv6, ICMP echo (ports are the echo id both ways), local target: no tunnel.
        let c6: Ipv6Addr = "fc00::2".parse().unwrap();
        let rr6: Ipv6Addr = "fdff:2000::55".parse().unwrap();
        let k6 = FlowKey::v6(
            c6.octets(),
            rr6.octets(),
            0x1234u16.to_be(),
            0x1234u16.to_be(),
            proto::ICMPV6,
        );
        let s_ns6: Ipv6Addr = "fc00::3".parse().unwrap();
        let s_inst6: Ipv6Addr = "fdff::7".parse().unwrap();
        let c_inst6: Ipv6Addr = "fdff::5".parse().unwrap();
        let [(_, f6), (r6, a6)] = flow_pair(
            &k6,
            IpAddr::V6(rr6),
            IpAddr::V6(c_inst6),
            IpAddr::V6(s_ns6),
            IpAddr::V6(s_inst6),
            None,
        );
        assert!(f6.is_local());
        assert_eq!((f6.new_src, f6.new_dst), (c_inst6.octets(), s_ns6.octets()));
        assert_eq!(r6.family, family::V6);
        assert_eq!((r6.src_addr, r6.dst_addr), (s_inst6.octets(), c6.octets()));
        assert_eq!((r6.src_port, r6.dst_port), (k6.dst_port, k6.src_port));
        assert_eq!((a6.new_src, a6.new_dst), (rr6.octets(), c6.octets()));
    }

    fn instance(job: &str, ns: Ipv4Addr, inst: Ipv4Addr, node: &str, rr: Option<Ipv4Addr>) -> Instance {
        Instance {
            job: Arc::from(job),
            number: 0,
            node: node.parse().unwrap(),
            ns_v4: ns,
            ns_v6: None,
            ip_v4: Some(inst),
            ip_v6: None,
            services: rr
                .map(|a| (Policy::RoundRobin, Some(a), None))
                .into_iter()
                .collect(),
        }
    }

    /// A worker with subnet 10.18.0.0/26 running the client, the server on another worker, the table knowing both,
    /// and the connection table mirrored into a fake flow map.
    fn worker() -> (Shared, Table, Arc<FakeFastPath>) {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Shared::new(
            "10.18.0.0/26".parse().unwrap(),
            "fc00::/120".parse().unwrap(),
            Limits::default(),
            tx,
        );
        let mut table = Table::default();
        table.replace_job(
            "app.t.cli.t",
            vec![instance(
                "app.t.cli.t",
                CLIENT_NS,
                CLIENT_INST,
                "192.168.1.1:50103",
                None,
            )],
        );
        table.replace_job(
            "app.t.srv.t",
            vec![instance(
                "app.t.srv.t",
                SERVER_NS,
                SERVER_INST,
                "192.168.1.2:50103",
                Some(RR),
            )],
        );
        shared.table.publish(table.snapshot());
        let fake = Arc::new(FakeFastPath::default());
        assert!(shared.conn.set_mirror(fake.clone(), 0));
        (shared, table, fake)
    }

    fn syn() -> Vec<u8> {
        let mut pkt = Vec::new();
        etherparse::PacketBuilder::ipv4(CLIENT_NS.octets(), RR.octets(), 64)
            .tcp(40000, 80, 1, 1024)
            .syn()
            .write(&mut pkt, &[])
            .unwrap();
        pkt
    }

    #[test]
    fn the_slow_path_writes_both_directions_into_the_flow_map() {
        let (shared, _table, fake) = worker();
        let mut pkt = syn();
        let snap = shared.table.get();
        let verdict = shared.outgoing(&snap, 1, &mut pkt, &mut Vec::new());
        assert_eq!(verdict, Verdict::Tunnel("192.168.1.2:50103".parse().unwrap()));
        let key = client_key();
        let want = flow_pair(
            &key,
            v4(RR),
            v4(CLIENT_INST),
            v4(SERVER_NS),
            v4(SERVER_INST),
            Some("192.168.1.2:50103".parse().unwrap()),
        );
        assert_eq!(
            *fake.installs.lock().unwrap(),
            [want[0].0, want[1].0],
            "forward, then reply"
        );
        let flows = fake.flows.lock().unwrap();
        assert_eq!(flows[&want[0].0].0, want[0].1);
        assert_eq!(flows[&want[1].0].0, want[1].1);
    }

    #[test]
    fn flows_to_an_instance_that_left_the_table_leave_the_flow_map() {
        let (shared, mut table, fake) = worker();
        let mut pkt = syn();
        let snap = shared.table.get();
        shared.outgoing(&snap, 1, &mut pkt, &mut Vec::new());
        assert_eq!(fake.flows.lock().unwrap().len(), 2);
        // Nothing changes while the server is in the table.
        assert_eq!(shared.prune(&table.snapshot()), 0);
        table.remove_job("app.t.srv.t");
        let snap = table.snapshot();
        assert_eq!(shared.prune(&snap), 1, "the forward entry to the server goes");
        let flows = fake.flows.lock().unwrap();
        assert_eq!(flows.len(), 1);
        // What stays is the reply entry, which delivers to the local client.
        let (_, a) = flows.iter().next().unwrap();
        assert_eq!(a.0.new_dst[..4], CLIENT_NS.octets());
    }

    #[test]
    fn the_fast_path_keeps_a_target_in_use() {
        let (shared, _table, fake) = worker();
        let mut pkt = syn();
        let snap = shared.table.get();
        shared.outgoing(&snap, 1, &mut pkt, &mut Vec::new());
        assert_eq!(
            shared.fast_path_last_use(&[v4(SERVER_NS)]),
            None,
            "nothing forwarded in the kernel yet"
        );
        let key = client_key();
        fake.flows.lock().unwrap().get_mut(&key).unwrap().1 = Some(77);
        assert_eq!(shared.fast_path_last_use(&[v4(SERVER_NS)]), Some(77));
        assert_eq!(fake.last_seen(&key), Some(77));
        assert_eq!(
            shared.fast_path_last_use(&[v4(Ipv4Addr::new(10, 18, 0, 99))]),
            None
        );
    }
}
