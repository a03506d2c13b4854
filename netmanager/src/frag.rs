//! Fragment tracking for the TUN proxy: every fragment of an IP datagram gets the translation of its first fragment.
//!
//! Only the first fragment carries ports, so only it can be looked up in the connection table. The proxy remembers
//! the decision made for it under the datagram's identity ([`FragKey`]) and applies it to the later fragments. No
//! reassembly: a later fragment that arrives before its first one is held (a bounded copy) and handed back when the
//! first one shows up. Decisions are kept for a TTL rather than dropped after the last fragment, because fragments
//! may be reordered (the one with `more = false` need not come last).
//!
//! Single-threaded; the proxy wraps it in a mutex if several threads share it.

use std::collections::VecDeque;
use std::net::IpAddr;

use rustc_hash::FxHashMap;

use crate::packet::Headers;

/// The identity of a fragmented datagram. IPv4 (RFC 791) identifies a datagram by addresses, protocol and id; IPv6
/// (RFC 8200) by addresses and id only, so `protocol` is 0 for IPv6 keys: in a fragment with a further extension
/// header after the fragment header, the first fragment's transport protocol and the later fragments' next header
/// differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address of the fragments (before any rewrite).
    pub src: IpAddr,
    /// Destination address of the fragments (before any rewrite).
    pub dst: IpAddr,
    /// Fragment identification.
    pub id: u32,
    /// IPv4 protocol number; 0 for IPv6.
    pub protocol: u8,
}

impl FragKey {
    /// The key of a parsed fragment; `None` when the packet is not a fragment.
    pub fn of(h: &Headers) -> Option<FragKey> {
        let frag = h.frag?;
        Some(FragKey {
            src: h.src,
            dst: h.dst,
            id: frag.id,
            protocol: if h.src.is_ipv4() { h.protocol } else { 0 },
        })
    }
}

/// Why a fragment could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragError {
    /// Already holding fragments of this many datagrams whose first fragment has not arrived.
    #[error("holding fragments of {max} datagrams already")]
    TooManyDatagrams {
        /// The limit.
        max: usize,
    },
    /// Already holding this many fragments.
    #[error("holding {max} fragments already")]
    TooManyPackets {
        /// The limit.
        max: usize,
    },
    /// Holding this fragment would exceed the byte limit.
    #[error("a {len}-byte fragment does not fit in the {max}-byte hold limit")]
    TooManyBytes {
        /// The limit.
        max: usize,
        /// The fragment's length.
        len: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Decision<V> {
    value: V,
    since: u32,
    seq: u64,
}

#[derive(Debug)]
struct Held {
    packets: Vec<Vec<u8>>,
    bytes: usize,
    seq: u64,
}

/// Remembers per-datagram decisions and holds early fragments. See the module documentation.
#[derive(Debug)]
pub struct FragTracker<V: Copy> {
    decisions: FxHashMap<FragKey, Decision<V>>,
    /// Insertion order of decisions (key, seq, time): the oldest is at the front, which makes expiry and eviction
    /// O(1). An entry whose seq no longer matches the map is stale and skipped.
    decision_order: VecDeque<(FragKey, u64, u32)>,
    held: FxHashMap<FragKey, Held>,
    held_order: VecDeque<(FragKey, u64, u32)>,
    held_packets: usize,
    held_bytes: usize,
    max_datagrams: usize,
    max_held_packets: usize,
    max_held_bytes: usize,
    ttl: u32,
    next_seq: u64,
}

impl<V: Copy> FragTracker<V> {
    /// A tracker for at most `max_datagrams` decisions (the oldest is forgotten to make room) and as many datagrams
    /// with held fragments, holding at most `max_held_packets` fragments of at most `max_held_bytes` in total.
    /// Decisions and held fragments live `ttl_secs`.
    pub fn new(max_datagrams: usize, max_held_packets: usize, max_held_bytes: usize, ttl_secs: u32) -> Self {
        FragTracker {
            decisions: FxHashMap::default(),
            decision_order: VecDeque::new(),
            held: FxHashMap::default(),
            held_order: VecDeque::new(),
            held_packets: 0,
            held_bytes: 0,
            max_datagrams,
            max_held_packets,
            max_held_bytes,
            ttl: ttl_secs,
            next_seq: 0,
        }
    }

    fn expired(&self, since: u32, now: u32) -> bool {
        now.saturating_sub(since) > self.ttl
    }

    fn seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Records the decision for a datagram whose first fragment arrived, and returns (and forgets) the later
    /// fragments of it that were held, in arrival order. A repeated first fragment replaces the decision.
    pub fn on_first(&mut self, key: FragKey, value: V, now: u32) -> Vec<Vec<u8>> {
        self.expire_decisions(now);
        if !self.decisions.contains_key(&key) {
            while self.decisions.len() >= self.max_datagrams.max(1) {
                if !self.evict_oldest_decision() {
                    break;
                }
            }
        }
        let seq = self.seq();
        if self.max_datagrams > 0 {
            self.decisions.insert(
                key,
                Decision {
                    value,
                    since: now,
                    seq,
                },
            );
            self.decision_order.push_back((key, seq, now));
            self.compact_decision_order();
        }
        match self.held.remove(&key) {
            Some(h) => {
                self.held_packets -= h.packets.len();
                self.held_bytes -= h.bytes;
                h.packets
            }
            None => Vec::new(),
        }
    }

    /// The decision for a later fragment of `key`'s datagram, if its first fragment was seen within the TTL.
    pub fn lookup(&mut self, key: &FragKey, now: u32) -> Option<V> {
        let d = self.decisions.get(key)?;
        (!self.expired(d.since, now)).then_some(d.value)
    }

    /// Keeps a copy of a later fragment whose first fragment has not arrived yet. Fails (and keeps nothing) when
    /// that would exceed a limit; expired held fragments are dropped first.
    pub fn hold(&mut self, key: FragKey, packet: &[u8], now: u32) -> Result<(), FragError> {
        self.expire_held(now);
        if self.held_packets >= self.max_held_packets {
            return Err(FragError::TooManyPackets {
                max: self.max_held_packets,
            });
        }
        if self.held_bytes.saturating_add(packet.len()) > self.max_held_bytes {
            return Err(FragError::TooManyBytes {
                max: self.max_held_bytes,
                len: packet.len(),
            });
        }
        if !self.held.contains_key(&key) {
            if self.held.len() >= self.max_datagrams {
                return Err(FragError::TooManyDatagrams {
                    max: self.max_datagrams,
                });
            }
            let seq = self.seq();
            self.held.insert(
                key,
                Held {
                    packets: Vec::new(),
                    bytes: 0,
                    seq,
                },
            );
            self.held_order.push_back((key, seq, now));
        }
        if let Some(h) = self.held.get_mut(&key) {
            h.packets.push(packet.to_vec());
            h.bytes += packet.len();
            self.held_packets += 1;
            self.held_bytes += packet.len();
        }
        Ok(())
    }

    /// Forgets decisions and drops held fragments older than the TTL; returns how many decisions and held
    /// fragments went.
    pub fn sweep(&mut self, now: u32) -> usize {
        self.expire_decisions(now) + self.expire_held(now)
    }

    /// Number of remembered decisions (expired ones included until swept).
    pub fn decisions(&self) -> usize {
        self.decisions.len()
    }

    /// Number of held fragments.
    pub fn held_packets(&self) -> usize {
        self.held_packets
    }

    /// Bytes of held fragments.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn expire_decisions(&mut self, now: u32) -> usize {
        let mut removed = 0;
        while let Some(&(key, seq, since)) = self.decision_order.front() {
            if !self.expired(since, now) {
                break;
            }
            self.decision_order.pop_front();
            if self.decisions.get(&key).is_some_and(|d| d.seq == seq) {
                self.decisions.remove(&key);
                removed += 1;
            }
        }
        removed
    }

    /// Forgets the oldest live decision; false if there is none.
    fn evict_oldest_decision(&mut self) -> bool {
        while let Some((key, seq, _)) = self.decision_order.pop_front() {
            if self.decisions.get(&key).is_some_and(|d| d.seq == seq) {
                self.decisions.remove(&key);
                return true;
            }
        }
        false
    }

    /// Repeated first fragments of the same datagram leave stale order entries behind; drop them once they
    /// outnumber the live ones, so the queue stays proportional to the map.
    fn compact_decision_order(&mut self) {
        if self.decision_order.len() > 2 * self.decisions.len() + 16 {
            let decisions = &self.decisions;
            self.decision_order
                .retain(|(k, seq, _)| decisions.get(k).is_some_and(|d| d.seq == *seq));
        }
    }

    fn expire_held(&mut self, now: u32) -> usize {
        let mut dropped = 0;
        while let Some(&(key, seq, since)) = self.held_order.front() {
            if !self.expired(since, now) {
                break;
            }
            self.held_order.pop_front();
            if self.held.get(&key).is_some_and(|h| h.seq == seq)
                && let Some(h) = self.held.remove(&key)
            {
                self.held_packets -= h.packets.len();
                self.held_bytes -= h.bytes;
                dropped += h.packets.len();
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use etherparse::PacketBuilder;

    use super::*;
    use crate::packet::parse;

    fn k(id: u32) -> FragKey {
        FragKey {
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            id,
            protocol: 17,
        }
    }

    #[test]
    fn key_of_parsed_fragments() {
        let mut p = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut p, &[0; 64])
            .unwrap();
        assert_eq!(FragKey::of(&parse(&p).unwrap()), None);
        // Set "more fragments" and an id by hand (the checksum does not matter to the parser).
        p[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
        p[6] = 0x20;
        assert_eq!(FragKey::of(&parse(&p).unwrap()), Some(k(0x4242)));

        // IPv6: protocol 0 whatever follows the fragment header.
        let mut q = Vec::new();
        PacketBuilder::ipv6(Ipv6Addr::LOCALHOST.octets(), Ipv6Addr::LOCALHOST.octets(), 64)
            .udp(1, 2)
            .write(&mut q, &[0; 16])
            .unwrap();
        q[6] = 44;
        q.splice(40..40, [17, 0, 0, 1, 0, 0, 0, 9]);
        q[4..6].copy_from_slice(&(8u16 + 8 + 16).to_be_bytes());
        let h = parse(&q).unwrap();
        let key = FragKey::of(&h).unwrap();
        assert_eq!((key.id, key.protocol), (9, 0));
    }

    #[test]
    fn decision_applies_to_later_fragments_until_ttl() {
        let mut t = FragTracker::new(16, 16, 10_000, 5);
        assert_eq!(t.lookup(&k(1), 0), None);
        assert!(t.on_first(k(1), 'a', 10).is_empty());
        assert_eq!(t.lookup(&k(1), 10), Some('a'));
        // Several lookups: the last fragment does not end the decision (reordering).
        assert_eq!(t.lookup(&k(1), 12), Some('a'));
        assert_eq!(t.lookup(&k(1), 15), Some('a'));
        assert_eq!(t.lookup(&k(1), 16), None);
        assert_eq!(t.lookup(&k(2), 10), None);
        assert_eq!(t.sweep(16), 1);
        assert_eq!(t.decisions(), 0);
    }

    #[test]
    fn repeated_first_fragment_replaces_and_refreshes() {
        let mut t = FragTracker::new(16, 16, 10_000, 5);
        t.on_first(k(1), 1, 0);
        t.on_first(k(1), 2, 4);
        assert_eq!(t.lookup(&k(1), 9), Some(2));
        // The stale order entry from time 0 must not remove the refreshed decision.
        assert_eq!(t.sweep(6), 0);
        assert_eq!(t.lookup(&k(1), 9), Some(2));
        assert_eq!(t.sweep(10), 1);
        // Many repeats do not grow the order queue without bound.
        for i in 0..1000 {
            t.on_first(k(7), i, 20);
        }
        assert!(t.decision_order.len() <= 2 * t.decisions.len() + 17);
        assert_eq!(t.lookup(&k(7), 20), Some(999));
    }

    #[test]
    fn early_fragments_are_returned_in_arrival_order() {
        let mut t = FragTracker::new(16, 16, 10_000, 5);
        t.hold(k(1), b"second", 0).unwrap();
        t.hold(k(2), b"other", 0).unwrap();
        t.hold(k(1), b"third", 1).unwrap();
        assert_eq!((t.held_packets(), t.held_bytes()), (3, 16));
        let early = t.on_first(k(1), (), 2);
        assert_eq!(early, vec![b"second".to_vec(), b"third".to_vec()]);
        assert_eq!((t.held_packets(), t.held_bytes()), (1, 5));
        assert!(t.on_first(k(1), (), 2).is_empty(), "returned once");
        assert_eq!(t.lookup(&k(1), 3), Some(()));
    }

    #[test]
    fn held_fragments_expire() {
        let mut t = FragTracker::<u8>::new(16, 16, 10_000, 5);
        t.hold(k(1), b"late", 0).unwrap();
        t.hold(k(1), b"later", 3).unwrap();
        t.hold(k(2), b"x", 4).unwrap();
        assert_eq!(t.sweep(5), 0);
        // The datagram's TTL counts from its first held fragment.
        assert_eq!(t.sweep(6), 2);
        assert_eq!((t.held_packets(), t.held_bytes()), (1, 1));
        assert!(t.on_first(k(1), 0, 6).is_empty());
        // `hold` itself drops expired fragments before checking the limits.
        let mut t = FragTracker::<u8>::new(16, 1, 10_000, 5);
        t.hold(k(1), b"a", 0).unwrap();
        assert_eq!(t.hold(k(2), b"b", 5), Err(FragError::TooManyPackets { max: 1 }));
        t.hold(k(2), b"b", 6).unwrap();
        assert_eq!(t.on_first(k(2), 0, 6), vec![b"b".to_vec()]);
    }

    #[test]
    fn hold_limits() {
        let mut t = FragTracker::<u8>::new(2, 3, 100, 5);
        t.hold(k(1), &[0; 40], 0).unwrap();
        t.hold(k(2), &[0; 40], 0).unwrap();
        assert_eq!(
            t.hold(k(3), &[0; 1], 0),
            Err(FragError::TooManyDatagrams { max: 2 })
        );
        assert_eq!(
            t.hold(k(1), &[0; 21], 0),
            Err(FragError::TooManyBytes { max: 100, len: 21 })
        );
        t.hold(k(1), &[0; 20], 0).unwrap();
        assert_eq!(
            t.hold(k(2), &[0; 0], 0),
            Err(FragError::TooManyPackets { max: 3 })
        );
        assert_eq!((t.held_packets(), t.held_bytes()), (3, 100));
        // Releasing a datagram frees its share.
        assert_eq!(t.on_first(k(1), 0, 1).len(), 2);
        t.hold(k(3), &[0; 60], 1).unwrap();
        assert_eq!((t.held_packets(), t.held_bytes()), (2, 100));
    }

    #[test]
    fn decisions_are_bounded_by_evicting_the_oldest() {
        let mut t = FragTracker::new(3, 0, 0, 100);
        for i in 0..5 {
            t.on_first(k(i), i, i);
        }
        assert_eq!(t.decisions(), 3);
        assert_eq!(t.lookup(&k(0), 5), None);
        assert_eq!(t.lookup(&k(1), 5), None);
        assert_eq!(t.lookup(&k(2), 5), Some(2));
        assert_eq!(t.lookup(&k(4), 5), Some(4));
        // Replacing a known datagram does not evict another.
        t.on_first(k(2), 20, 6);
        assert_eq!(t.lookup(&k(3), 6), Some(3));
        assert_eq!(t.lookup(&k(2), 6), Some(20));
        // With no room at all nothing is remembered, and nothing breaks.
        let mut none = FragTracker::new(0, 0, 0, 100);
        assert!(none.on_first(k(1), 1, 0).is_empty());
        assert_eq!(none.lookup(&k(1), 0), None);
        assert_eq!(
            none.hold(k(1), b"x", 0),
            Err(FragError::TooManyPackets { max: 0 })
        );
    }
}
