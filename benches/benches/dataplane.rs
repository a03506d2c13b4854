//! Dataplane micro-benchmarks of the TUN proxy: packet parse/rewrite, connection-table lookups at 10k–1M flows,
//! service-address resolution at 10 and 30k services, the whole per-packet translation of an established flow, and
//! what the slow path pays per new flow to hand it to the eBPF fast path (both directions written into the
//! connection table and, as root, into the kernel's flow map).
//!
//! `cargo bench -p oakestra-benches --bench dataplane`. Every bench reports time per packet or per lookup
//! (`Throughput::Elements(1)`), with short measurement windows so the file runs in well under a minute.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use oakestra_ebpf_common::{FlowAction, FlowKey, proto};
use oakestra_netmanager::conntrack::{ConnTable, Timeouts};
use oakestra_netmanager::packet;
use oakestra_netmanager::proxy::{Limits, Shared, Verdict};
use oakestra_netmanager::table::{Instance, Policy, Table};

/// Payload-bearing packet size for the packet benches (a typical MTU-sized TCP segment).
const PACKET_LEN: usize = 1400;

fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
}

/// Internet checksum of `data` (no etherparse in this crate: the packets are built by hand).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(u16::from_be_bytes([*last, 0]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// A TCP header (ACK|PSH) with a valid checksum for the given pseudo-header prefix, followed by the payload.
fn tcp_segment(pseudo: &[u8], payload_len: usize, src_port: u16) -> Vec<u8> {
    let mut seg = vec![0u8; 20 + payload_len];
    seg[0..2].copy_from_slice(&src_port.to_be_bytes());
    seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
    seg[4..8].copy_from_slice(&1u32.to_be_bytes());
    seg[8..12].copy_from_slice(&1u32.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = 0x18;
    seg[14..16].copy_from_slice(&65535u16.to_be_bytes());
    for (i, b) in seg[20..].iter_mut().enumerate() {
        *b = i.to_le_bytes()[0];
    }
    let c = checksum(&[pseudo, &seg]);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    seg
}

fn tcp_v4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    tcp_v4_from(src, dst, 40000)
}

fn tcp_v4_from(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16) -> Vec<u8> {
    let seg_len = PACKET_LEN - 20;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto::TCP]);
    pseudo.extend_from_slice(&u16::try_from(seg_len).unwrap_or(0).to_be_bytes());
    let seg = tcp_segment(&pseudo, seg_len - 20, src_port);
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto::TCP, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(PACKET_LEN).unwrap_or(0).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&seg);
    ip
}

fn tcp_v6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    tcp_v6_from(src, dst, 40000)
}

fn tcp_v6_from(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16) -> Vec<u8> {
    let seg_len = PACKET_LEN - 40;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::try_from(seg_len).unwrap_or(0).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto::TCP]);
    let seg = tcp_segment(&pseudo, seg_len - 20, src_port);
    let mut ip = vec![0x60, 0, 0, 0, 0, 0, proto::TCP, 64];
    ip[4..6].copy_from_slice(&u16::try_from(seg_len).unwrap_or(0).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&seg);
    ip
}

const V6_SRC: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0x12, 2);
const V6_DST: Ipv6Addr = Ipv6Addr::new(0xfdff, 0x2000, 0, 0, 0, 0, 0, 0x55);

/// A packet bench: name, packet, its address pair, the pair it is translated to.
type Case = (&'static str, Vec<u8>, (IpAddr, IpAddr), (IpAddr, IpAddr));

/// parse + flow_key + rewrite of one packet, translating it back and forth between two address pairs so every
/// iteration does a real rewrite.
fn bench_packet(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet");
    short(&mut group);
    let cases: [Case; 2] = [
        (
            "parse_key_rewrite_tcp_v4_1400",
            tcp_v4(Ipv4Addr::new(10, 18, 0, 2), Ipv4Addr::new(10, 30, 55, 55)),
            (
                Ipv4Addr::new(10, 18, 0, 2).into(),
                Ipv4Addr::new(10, 30, 55, 55).into(),
            ),
            (
                Ipv4Addr::new(10, 19, 3, 7).into(),
                Ipv4Addr::new(10, 18, 1, 9).into(),
            ),
        ),
        (
            "parse_key_rewrite_tcp_v6_1400",
            tcp_v6(V6_SRC, V6_DST),
            (V6_SRC.into(), V6_DST.into()),
            (
                Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0x13, 7).into(),
                Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0x12, 9).into(),
            ),
        ),
    ];
    for (name, mut pkt, original, translated) in cases {
        assert!(
            packet::parse(&pkt).is_ok(),
            "{name}: the hand-built packet parses"
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let h = packet::parse(black_box(&pkt)).ok()?;
                let key = packet::flow_key(&h);
                let (s, d) = if (h.src, h.dst) == original {
                    translated
                } else {
                    original
                };
                packet::rewrite(&mut pkt, &h, s, d).ok()?;
                key
            })
        });
    }
    group.finish();
}

/// xorshift64*: a deterministic pseudo-random sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The `i`-th of a set of distinct keys: the source address is a bijection of `i` (multiplication by an odd
/// constant), the rest looks random. `salt` gives disjoint sets (a different destination range).
fn key(i: u32, salt: u8) -> FlowKey {
    let x = i.wrapping_mul(0x9e37_79b1);
    let y = x.rotate_left(13) ^ 0x5bd1_e995;
    let [y0, y1, y2, y3] = y.to_be_bytes();
    FlowKey::v4(
        x.to_be_bytes(),
        [10, salt, y0, y1],
        u16::from_be_bytes([y2, y3]).to_be(),
        8080u16.to_be(),
        proto::TCP,
    )
}

/// Lookup hits at several table sizes (keys looked up in pseudo-random order, so most lookups touch cold cache
/// lines at the larger sizes, as in real traffic), and a miss.
fn bench_conntrack(c: &mut Criterion) {
    let mut group = c.benchmark_group("conntrack");
    short(&mut group);
    let action = FlowAction::new(
        [1; 16],
        [2; 16],
        FlowAction::v4_mapped([192, 0, 2, 1]),
        50103u16.to_be(),
    );
    for (label, n) in [("10k", 10_000u32), ("100k", 100_000), ("1M", 1_000_000)] {
        // Twice the capacity: the table splits capacity evenly over shards, and random keys do not.
        let table = ConnTable::new(2 * usize::try_from(n).unwrap_or(0), Timeouts::default());
        for i in 0..n {
            if table.insert(key(i, 1), action, 0, Some(0x10)).is_err() {
                panic!("prefill of {n} flows failed at {i}");
            }
        }
        assert_eq!(table.len(), usize::try_from(n).unwrap_or(0));
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ u64::from(n));
        let order: Vec<FlowKey> = (0..n.min(1 << 20))
            .map(|_| key(u32::try_from(rng.next() % u64::from(n)).unwrap_or(0), 1))
            .collect();
        let mut j = 0usize;
        group.bench_function(format!("lookup_hit_{label}"), |b| {
            b.iter(|| {
                j += 1;
                if j >= order.len() {
                    j = 0;
                }
                table.lookup(black_box(&order[j]), 1, Some(0x10))
            })
        });
        if n == 100_000 {
            let misses: Vec<FlowKey> = (0..n).map(|i| key(i, 2)).collect();
            let mut j = 0usize;
            group.bench_function("lookup_miss_100k", |b| {
                b.iter(|| {
                    j += 1;
                    if j >= misses.len() {
                        j = 0;
                    }
                    table.lookup(black_box(&misses[j]), 1, None)
                })
            });
        }
    }
    group.finish();
}

/// The node the bench's remote instances run on.
fn peer() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(192, 0, 2, 2).into(), 50103)
}

/// The round-robin service addresses of the `i`-th bench service.
fn service_ips(i: u32) -> (Ipv4Addr, Ipv6Addr) {
    let [_, _, hi, lo] = i.to_be_bytes();
    (
        Ipv4Addr::new(10, 30, hi, lo),
        Ipv6Addr::new(0xfdff, 0x2000, 0, 0, 0, 0, u16::from(hi), u16::from(lo)),
    )
}

/// The client job: one local instance (namespace 10.18.0.2 / fc00::12:2) with its own instance addresses.
fn client() -> Instance {
    Instance {
        job: Arc::from("bench.test.cli.test"),
        number: 0,
        node: peer(),
        ns_v4: Ipv4Addr::new(10, 18, 0, 2),
        ns_v6: Some(V6_SRC),
        ip_v4: Some(Ipv4Addr::new(10, 31, 0, 1)),
        ip_v6: Some(Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 1)),
        services: Vec::new(),
    }
}

/// A table with the client and `n` services of two remote instances each, behind round-robin v4 and v6 addresses.
fn table_with(n: u32) -> Table {
    let mut table = Table::default();
    table.replace_job("bench.test.cli.test", vec![client()]);
    for i in 0..n {
        let (v4, v6) = service_ips(i);
        let instances = (0..2u32)
            .map(|k| {
                let ns = 2 * i + k;
                let [_, a, b, c] = ns.to_be_bytes();
                let (hi, lo) = (u16::from(a), u16::from_be_bytes([b, c]));
                Instance {
                    job: Arc::from(format!("bench.test.s{i}.test")),
                    number: i64::from(k),
                    node: peer(),
                    ns_v4: Ipv4Addr::new(10, 20 + a, b, c),
                    ns_v6: Some(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0x100 + hi, lo)),
                    ip_v4: Some(Ipv4Addr::new(10, 28 + a, b, c)),
                    ip_v6: Some(Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 1 + hi, lo)),
                    services: vec![(Policy::RoundRobin, Some(v4), Some(v6))],
                }
            })
            .collect();
        table.replace_job(&format!("bench.test.s{i}.test"), instances);
    }
    table
}

/// Service-address resolution (`Snapshot::choose`: the round-robin pick included) and the namespace-address lookup
/// every packet also does, at 10 and 30,000 services, addresses taken in pseudo-random order.
fn bench_services(c: &mut Criterion) {
    let mut group = c.benchmark_group("services");
    short(&mut group);
    for (label, n) in [("10", 10u32), ("30k", 30_000)] {
        let snap = table_with(n).snapshot();
        let mut rng = Rng(0x0bad_cafe ^ u64::from(n));
        let picks: Vec<u32> = (0..65_536)
            .map(|_| u32::try_from(rng.next() % u64::from(n)).unwrap_or(0))
            .collect();
        // (service address, the namespace address of an instance behind it), per family.
        let pairs = |v6: bool| -> Vec<(IpAddr, IpAddr)> {
            picks
                .iter()
                .map(|&i| {
                    let (v4, v6_addr) = service_ips(i);
                    let dst: IpAddr = if v6 { v6_addr.into() } else { v4.into() };
                    let ns = snap.choose(dst, 0).and_then(|t| t.ns(v6));
                    (dst, ns.unwrap_or_else(|| panic!("service {dst} resolves")))
                })
                .collect()
        };
        let (order, order_v6) = (pairs(false), pairs(true));
        let mut j = 0usize;
        group.bench_function(format!("choose_v6_{label}"), |b| {
            b.iter(|| {
                j = (j + 1) & 0xffff;
                snap.choose(black_box(order_v6[j].0), 1).map(|t| t.number)
            })
        });
        group.bench_function(format!("by_ns_v6_{label}"), |b| {
            b.iter(|| {
                j = (j + 1) & 0xffff;
                snap.by_ns(black_box(order_v6[j].1), 1).map(|t| t.number)
            })
        });
        group.bench_function(format!("choose_{label}"), |b| {
            b.iter(|| {
                j = (j + 1) & 0xffff;
                snap.choose(black_box(order[j].0), 1).map(|t| t.number)
            })
        });
        group.bench_function(format!("by_ns_{label}"), |b| {
            b.iter(|| {
                j = (j + 1) & 0xffff;
                snap.by_ns(black_box(order[j].1), 1).map(|t| t.number)
            })
        });
    }
    group.finish();
}

/// The whole outgoing translation of an established flow (`Shared::outgoing`: parse, connection-table hit, instance
/// check, rewrite), v4 and v6, at 10 and 30,000 services; 1,024 flows to pseudo-random services, each packet copied
/// from its template first (the copy of 1,400 B is included, ≈20 ns).
fn bench_translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate");
    short(&mut group);
    let (queries, _rx) = tokio::sync::mpsc::unbounded_channel();
    for (label, n) in [("10", 10u32), ("30k", 30_000)] {
        let shared = Shared::new(
            "10.18.0.0/26".parse().unwrap_or_else(|e| panic!("{e}")),
            "fc00::12:0/120".parse().unwrap_or_else(|e| panic!("{e}")),
            Limits::default(),
            queries.clone(),
        );
        shared.table.publish(table_with(n).snapshot());
        let mut reader = shared.table.reader();
        let mut rng = Rng(0xfeed_beef ^ u64::from(n));
        for v6 in [false, true] {
            let templates: Vec<Vec<u8>> = (0..1024u16)
                .map(|f| {
                    let i = u32::try_from(rng.next() % u64::from(n)).unwrap_or(0);
                    let (d4, d6) = service_ips(i);
                    if v6 {
                        tcp_v6_from(V6_SRC, d6, 20_000 + f)
                    } else {
                        tcp_v4_from(Ipv4Addr::new(10, 18, 0, 2), d4, 20_000 + f)
                    }
                })
                .collect();
            let mut buf = vec![0u8; PACKET_LEN];
            let mut released = Vec::new();
            // The first packet of each flow creates its connection-table entries.
            for t in &templates {
                buf.copy_from_slice(t);
                let verdict = shared.outgoing(reader.refresh(&shared.table), 1, &mut buf, &mut released);
                assert_eq!(verdict, Verdict::Tunnel(peer()), "the bench flow is tunnelled");
            }
            let family = if v6 { "v6" } else { "v4" };
            let mut j = 0usize;
            group.bench_function(format!("outgoing_hit_{family}_{label}"), |b| {
                b.iter(|| {
                    j = (j + 1) & 1023;
                    buf.copy_from_slice(&templates[j]);
                    let snap = reader.refresh(&shared.table);
                    shared.outgoing(snap, 1, black_box(&mut buf), &mut released)
                })
            });
        }
    }
    group.finish();
}

/// Decision → both entries written: `flow_pair` and the two connection-table inserts of a new flow, without and
/// (as root, with the embedded eBPF object) with the kernel flow map mirrored (two `BPF_MAP_UPDATE_ELEM`s more).
/// 16,384 distinct flows in turn, so the maps hold them all and each insert replaces an entry of the same size.
fn bench_install(c: &mut Criterion) {
    use oakestra_netmanager::fastpath::{FastPath, FastPathConfig};
    use oakestra_netmanager::proxy::flow_pair;

    let mut group = c.benchmark_group("install");
    short(&mut group);
    let keys: Vec<FlowKey> = (0..16_384u16)
        .map(|p| {
            FlowKey::v4(
                [10, 18, 0, 2],
                [10, 30, 55, 55],
                (20_000 + p).to_be(),
                80u16.to_be(),
                proto::TCP,
            )
        })
        .collect();
    let dialled = IpAddr::V4(Ipv4Addr::new(10, 30, 55, 55));
    let src_inst = IpAddr::V4(Ipv4Addr::new(10, 30, 0, 5));
    let t_ns = IpAddr::V4(Ipv4Addr::new(10, 18, 0, 130));
    let t_inst = IpAddr::V4(Ipv4Addr::new(10, 30, 0, 7));
    let mut run = |name: &str, table: &ConnTable| {
        let mut j = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                j = (j + 1) & 16_383;
                let [(k, a), (rk, ra)] = flow_pair(&keys[j], dialled, src_inst, t_ns, t_inst, Some(peer()));
                let ok = table.insert(k, a, 1, Some(0x02)).is_ok() && table.insert(rk, ra, 1, None).is_ok();
                black_box(ok)
            })
        });
    };
    run(
        "new_flow_table_only",
        &ConnTable::new(65_536, Timeouts::default()),
    );
    if !rustix::process::getuid().is_root() {
        #[allow(clippy::print_stderr, reason = "a benchmark explains what it skipped")]
        {
            eprintln!("install/new_flow_table_and_bpf: skipped, needs root to load the eBPF maps");
        }
    } else {
        match FastPath::load(&FastPathConfig {
            max_flows: 65_536,
            tunnel_port: 50103,
            underlay_v4: None,
            gateway_mac: [0; 6],
        }) {
            Ok(fast) => {
                let table = ConnTable::new(65_536, Timeouts::default());
                table.set_mirror(Arc::new(fast), 1);
                run("new_flow_table_and_bpf", &table);
            }
            Err(e) => {
                #[allow(clippy::print_stderr, reason = "a benchmark explains what it skipped")]
                {
                    eprintln!(
                        "install/new_flow_table_and_bpf: skipped, the fast path does not load here: {e}"
                    );
                }
            }
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_packet,
    bench_conntrack,
    bench_services,
    bench_translate,
    bench_install
);
criterion_main!(benches);
