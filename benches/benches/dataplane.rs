//! Dataplane micro-benchmarks: packet parse/rewrite and connection-table lookups of the TUN proxy.
//!
//! `cargo bench -p oakestra-benches --bench dataplane`. Every bench reports time per packet or per lookup
//! (`Throughput::Elements(1)`), with short measurement windows so the file runs in well under a minute.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use oakestra_ebpf_common::{FlowAction, FlowKey, proto};
use oakestra_netmanager::conntrack::{ConnTable, Timeouts};
use oakestra_netmanager::packet;

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
fn tcp_segment(pseudo: &[u8], payload_len: usize) -> Vec<u8> {
    let mut seg = vec![0u8; 20 + payload_len];
    seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
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
    let seg_len = PACKET_LEN - 20;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto::TCP]);
    pseudo.extend_from_slice(&u16::try_from(seg_len).unwrap_or(0).to_be_bytes());
    let seg = tcp_segment(&pseudo, seg_len - 20);
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
    let seg_len = PACKET_LEN - 40;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::try_from(seg_len).unwrap_or(0).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto::TCP]);
    let seg = tcp_segment(&pseudo, seg_len - 20);
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

criterion_group!(benches, bench_packet, bench_conntrack);
criterion_main!(benches);

// service table and full translation benches: added with the proxy
