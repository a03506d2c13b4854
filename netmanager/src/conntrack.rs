//! The TUN proxy's connection table: `FlowKey` → `FlowAction` with per-flow state and expiry, shared by the
//! dataplane threads, and optionally mirrored into the eBPF fast path's flow map ([`FlowMirror`]).
//!
//! The table is sharded: each shard is a mutex around an Fx-hashed `HashMap`, and a key's shard comes from its hash,
//! so threads working on different flows rarely meet on a lock and every lock is held for one map operation. Keys and
//! actions are the `#[repr(C)]` types of `oakestra-ebpf-common`, so an entry can be mirrored into a BPF hash map as
//! it is (see [`ConnTable::for_each`]).

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use oakestra_ebpf_common::{FlowAction, FlowKey, proto};
use rustc_hash::FxBuildHasher;

use crate::packet::tcp_flags;

/// Upper bound on the number of shards: enough that 2-8 dataplane threads rarely contend.
pub const MAX_SHARDS: usize = 64;

/// A shard should hold at least this many entries, so small tables use fewer shards instead of tiny ones that fill
/// up while the table as a whole is mostly empty.
const MIN_PER_SHARD: usize = 64;

/// Idle time after which an entry expires, in seconds, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP after a SYN, before the handshake's ACK.
    pub tcp_opening: u32,
    /// TCP after an ACK.
    pub tcp_established: u32,
    /// TCP after a FIN or RST.
    pub tcp_closing: u32,
    /// UDP.
    pub udp: u32,
    /// ICMP and ICMPv6 echo.
    pub icmp: u32,
    /// Any other protocol.
    pub other: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_opening: 30,
            tcp_established: 3600,
            tcp_closing: 10,
            udp: 120,
            icmp: 30,
            other: 60,
        }
    }
}

impl Timeouts {
    /// The idle timeout of an entry in `state`.
    pub fn of(&self, state: FlowState) -> u32 {
        match state {
            FlowState::TcpOpening => self.tcp_opening,
            FlowState::TcpEstablished => self.tcp_established,
            FlowState::TcpClosing => self.tcp_closing,
            FlowState::Udp => self.udp,
            FlowState::Icmp => self.icmp,
            FlowState::Other => self.other,
        }
    }
}

/// Where a flow (one direction) is in its life, which decides its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// TCP: a SYN without ACK was seen (or nothing that established the flow yet).
    TcpOpening,
    /// TCP: a plain ACK was seen.
    TcpEstablished,
    /// TCP: a FIN or RST was seen.
    TcpClosing,
    /// UDP.
    Udp,
    /// ICMP/ICMPv6 echo.
    Icmp,
    /// Anything else.
    Other,
}

impl FlowState {
    /// The state of a new entry for `protocol`, after the TCP `flags` of its first packet, if any.
    pub fn initial(protocol: u8, tcp_flags: Option<u8>) -> Self {
        match protocol {
            proto::TCP => match tcp_flags {
                Some(f) => FlowState::TcpOpening.after(f),
                None => FlowState::TcpOpening,
            },
            proto::UDP => FlowState::Udp,
            proto::ICMP | proto::ICMPV6 => FlowState::Icmp,
            _ => FlowState::Other,
        }
    }

    /// The state after a packet with TCP `flags` in this direction (non-TCP states do not change).
    ///
    /// FIN or RST → closing. SYN without ACK → opening, also from closing (a new connection on the same 5-tuple).
    /// ACK without SYN/FIN/RST → established, except from closing: the last ACK of a close must not give the
    /// entry an hour of life. Anything else (SYN-ACK, flag-less) leaves the state as it is.
    pub fn after(self, flags: u8) -> Self {
        use tcp_flags::{ACK, FIN, RST, SYN};
        match self {
            FlowState::TcpOpening | FlowState::TcpEstablished | FlowState::TcpClosing => {
                if flags & (FIN | RST) != 0 {
                    FlowState::TcpClosing
                } else if flags & (SYN | ACK) == SYN {
                    FlowState::TcpOpening
                } else if flags & ACK != 0 && flags & SYN == 0 && self != FlowState::TcpClosing {
                    FlowState::TcpEstablished
                } else {
                    self
                }
            }
            other => other,
        }
    }
}

/// Why an insert failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnTableError {
    /// The key's shard is at its share of the capacity and holds no expired entry.
    #[error("connection table full ({max} flows)")]
    Full {
        /// The table's configured capacity.
        max: usize,
    },
}

/// A copy of the table in the kernel: the eBPF fast path's flow map. The table writes every entry it inserts
/// and deletes every entry it drops; the fast path forwards packets without the table seeing them and says when
/// it last did, which the table's expiry takes into account.
pub trait FlowMirror: Send + Sync + fmt::Debug {
    /// Writes (or overwrites) `key → action`.
    fn install(&self, key: &FlowKey, action: &FlowAction) -> Result<(), String>;
    /// Deletes `key` (absent is fine).
    fn remove(&self, key: &FlowKey);
    /// When the fast path last forwarded a packet of `key`, in [`now_secs`] time; `None` if it has no entry.
    fn last_seen(&self, key: &FlowKey) -> Option<u32>;
}

/// A flow forwarded by the slow path although the mirror has it (LRU eviction in the kernel, or a packet the fast
/// path leaves alone) is written to the mirror again, at most this often.
pub const REMIRROR_SECS: u32 = 2;

/// `mirrored_at` of an entry that is not (or no longer) in the mirror.
const NOT_MIRRORED: u32 = u32::MAX;

/// One entry: the action plus bookkeeping. Kept small and `Copy` so a hit copies 52 bytes out under the lock.
#[derive(Debug, Clone, Copy)]
struct Entry {
    action: FlowAction,
    last_seen: u32,
    state: FlowState,
    /// When the entry was last written to the mirror ([`NOT_MIRRORED`]: never).
    mirrored_at: u32,
}

impl Entry {
    fn expired(&self, now: u32, timeouts: &Timeouts) -> bool {
        // `saturating_sub`: a thread with a slightly older `now` than the one that refreshed the entry sees it as
        // fresh instead of 136 years old.
        now.saturating_sub(self.last_seen) > timeouts.of(self.state)
    }
}

/// One shard: its map, and when a full shard was last scanned for expired entries in vain.
#[derive(Debug)]
struct Shard {
    map: HashMap<FlowKey, Entry, FxBuildHasher>,
    /// The `now` of the last eviction scan that freed nothing. Until the clock moves on, another scan would find
    /// nothing either, and a flood of new flows against a full shard must not cost a full scan per packet.
    futile_scan_at: Option<u32>,
}

impl Shard {
    fn new() -> Self {
        Shard {
            map: HashMap::with_hasher(FxBuildHasher),
            futile_scan_at: None,
        }
    }
}

/// The sharded, thread-safe connection table. See the module documentation.
#[derive(Debug)]
pub struct ConnTable {
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1`; the shard count is a power of two.
    mask: usize,
    per_shard: usize,
    max_flows: usize,
    timeouts: Timeouts,
    mirror: OnceLock<Arc<dyn FlowMirror>>,
    /// Mirror writes that failed (the flow then stays on the slow path).
    mirror_errors: AtomicU64,
}

impl ConnTable {
    /// A table for up to `max_flows` entries, split evenly over the shards (so the key distribution decides when
    /// one shard fills up: give a few percent of headroom over the flows you expect).
    pub fn new(max_flows: usize, timeouts: Timeouts) -> Self {
        let wanted = (max_flows / MIN_PER_SHARD).clamp(1, MAX_SHARDS);
        // The largest power of two not above `wanted`, so the shard is a mask away from the hash.
        let count = 1usize << wanted.ilog2();
        let per_shard = max_flows.div_ceil(count);
        let shards = (0..count).map(|_| Mutex::new(Shard::new())).collect();
        ConnTable {
            shards,
            mask: count - 1,
            per_shard,
            max_flows,
            timeouts,
            mirror: OnceLock::new(),
            mirror_errors: AtomicU64::new(0),
        }
    }

    /// The configured timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.max_flows
    }

    /// Number of shards (a power of two, at most [`MAX_SHARDS`]).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard(&self, key: &FlowKey) -> MutexGuard<'_, Shard> {
        // The map inside the shard indexes buckets with the low bits of the same hash and tags them with the top 7,
        // so the shard takes bits from the middle: keys of one shard still spread over all buckets and tags.
        let h = FxBuildHasher.hash_one(key);
        let index = usize::try_from(h >> 40).unwrap_or(0) & self.mask;
        // In bounds: `mask` is `shards.len() - 1` and the length a power of two.
        lock(&self.shards[index])
    }

    /// The action for `key`, refreshing its last-seen time and advancing the TCP state by `tcp_flags`. An expired
    /// entry counts as absent (and is left for [`ConnTable::sweep`] or a later insert to drop).
    pub fn lookup(&self, key: &FlowKey, now: u32, tcp_flags: Option<u8>) -> Option<FlowAction> {
        let mut shard = self.shard(key);
        let entry = shard.map.get_mut(key)?;
        if !self.alive(key, entry, now) {
            return None;
        }
        entry.last_seen = entry.last_seen.max(now);
        if let Some(flags) = tcp_flags {
            entry.state = entry.state.after(flags);
        }
        // The slow path sees a flow the mirror should carry: written again (rate-limited), in case the kernel's
        // LRU map evicted it.
        if let Some(m) = self.mirror.get()
            && (entry.mirrored_at == NOT_MIRRORED || now.saturating_sub(entry.mirrored_at) >= REMIRROR_SECS)
        {
            entry.mirrored_at = self.mirror_install(m.as_ref(), key, &entry.action, now);
        }
        Some(entry.action)
    }

    /// Whether `entry` is still alive at `now`: not expired, or expired here but refreshed since by the fast path
    /// (whose time is then taken over).
    fn alive(&self, key: &FlowKey, entry: &mut Entry, now: u32) -> bool {
        if !entry.expired(now, &self.timeouts) {
            return true;
        }
        if let Some(seen) = self.mirror.get().and_then(|m| m.last_seen(key))
            && seen > entry.last_seen
        {
            entry.last_seen = seen;
            return !entry.expired(now, &self.timeouts);
        }
        false
    }

    fn mirror_install(&self, m: &dyn FlowMirror, key: &FlowKey, action: &FlowAction, now: u32) -> u32 {
        match m.install(key, action) {
            Ok(()) => now,
            Err(e) => {
                if self.mirror_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "cannot write a flow to the eBPF flow map; such flows stay on the TUN path");
                }
                NOT_MIRRORED
            }
        }
    }

    /// Mirrors every later change into `mirror` (once; a second mirror is refused). Entries already in the table
    /// are written to it now.
    pub fn set_mirror(&self, mirror: Arc<dyn FlowMirror>, now: u32) -> bool {
        if self.mirror.set(mirror).is_err() {
            return false;
        }
        if let Some(m) = self.mirror.get() {
            for shard in self.shards.iter() {
                let mut shard = lock(shard);
                for (k, e) in shard.map.iter_mut() {
                    e.mirrored_at = self.mirror_install(m.as_ref(), k, &e.action, now);
                }
            }
        }
        true
    }

    /// Whether a mirror is set.
    pub fn mirrored(&self) -> bool {
        self.mirror.get().is_some()
    }

    /// When the mirror last saw `key` forwarded (None without a mirror or entry).
    pub fn mirror_last_seen(&self, key: &FlowKey) -> Option<u32> {
        self.mirror.get()?.last_seen(key)
    }

    /// Mirror writes that failed so far.
    pub fn mirror_errors(&self) -> u64 {
        self.mirror_errors.load(Ordering::Relaxed)
    }

    /// The action and state for `key` without refreshing or changing anything (for status queries and tests).
    pub fn peek(&self, key: &FlowKey, now: u32) -> Option<(FlowAction, FlowState)> {
        let shard = self.shard(key);
        let entry = shard.map.get(key)?;
        (!entry.expired(now, &self.timeouts)).then_some((entry.action, entry.state))
    }

    /// Inserts or replaces the entry for `key`, its state from the key's protocol and the packet's `tcp_flags`.
    /// When the key's shard is full its expired entries are dropped first; if none are, the insert fails.
    pub fn insert(
        &self,
        key: FlowKey,
        action: FlowAction,
        now: u32,
        tcp_flags: Option<u8>,
    ) -> Result<(), ConnTableError> {
        let mut entry = Entry {
            action,
            last_seen: now,
            state: FlowState::initial(key.protocol, tcp_flags),
            mirrored_at: NOT_MIRRORED,
        };
        let mut shard = self.shard(&key);
        if shard.map.len() >= self.per_shard && !shard.map.contains_key(&key) {
            if shard.futile_scan_at != Some(now) {
                self.drop_dead(&mut shard, now);
                shard.futile_scan_at = (shard.map.len() >= self.per_shard).then_some(now);
            }
            if shard.map.len() >= self.per_shard {
                return Err(ConnTableError::Full { max: self.max_flows });
            }
        }
        // Written to the mirror under the shard's lock, so a concurrent remove of the same key cannot leave the
        // mirror holding a flow the table forgot.
        if let Some(m) = self.mirror.get() {
            entry.mirrored_at = self.mirror_install(m.as_ref(), &key, &action, now);
        }
        shard.map.insert(key, entry);
        Ok(())
    }

    /// Removes the entry for `key`; whether there was one.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let mut shard = self.shard(key);
        let found = shard.map.remove(key).is_some();
        if found && let Some(m) = self.mirror.get() {
            m.remove(key);
        }
        found
    }

    /// Keeps only the entries `keep` accepts (e.g. drops every flow to an instance that went away); returns how
    /// many were removed. Locks one shard at a time.
    pub fn retain(&self, mut keep: impl FnMut(&FlowKey, &FlowAction) -> bool) -> usize {
        let mirror = self.mirror.get();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.map.len();
            shard.map.retain(|k, e| {
                let keep = keep(k, &e.action);
                if !keep && let Some(m) = mirror {
                    m.remove(k);
                }
                keep
            });
            removed += before - shard.map.len();
        }
        removed
    }

    /// Drops the entries of `shard` that are dead at `now` (from the mirror too).
    fn drop_dead(&self, shard: &mut Shard, now: u32) {
        let mirror = self.mirror.get();
        shard.map.retain(|k, e| {
            let alive = self.alive(k, e, now);
            if !alive && let Some(m) = mirror {
                m.remove(k);
            }
            alive
        });
    }

    /// Drops the entries that expired by `now`, taking the fast path's last-seen times into account; returns how
    /// many.
    pub fn sweep(&self, now: u32) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.map.len();
            self.drop_dead(&mut shard, now);
            removed += before - shard.map.len();
        }
        removed
    }

    /// Number of entries, expired ones included until they are swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| lock(s).map.is_empty())
    }

    /// Calls `f` for every entry (expired ones included until swept), one shard locked at a time. `f` must not call
    /// back into this table: the shard's lock is held while it runs.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowAction, FlowState)) {
        for shard in self.shards.iter() {
            for (k, e) in lock(shard).map.iter() {
                f(k, &e.action, e.state);
            }
        }
    }
}

/// Locks a shard. A panic while a shard was locked cannot leave a map half-updated in a way that matters here
/// (every operation is a single std `HashMap` call), so a poisoned lock is simply taken over.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock the eBPF programs stamp flows with
/// (`bpf_ktime_get_coarse_ns`).
#[allow(unsafe_code)]
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `now_secs`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A `CLOCK_MONOTONIC` time in nanoseconds (as the eBPF programs write it) in [`now_secs`] time.
pub fn secs_of_monotonic_ns(ns: u64) -> u32 {
    // Make sure the epoch is set.
    let _ = now_secs();
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    u32::try_from(secs.saturating_sub(EPOCH.load(Ordering::Relaxed)).max(0)).unwrap_or(u32::MAX)
}

/// Seconds of the coarse monotonic clock at the first call, so [`now_secs`] starts near 0.
static EPOCH: AtomicI64 = AtomicI64::new(i64::MIN);

/// Coarse monotonic seconds since the process first asked (the first call returns 0). Costs a vDSO read of
/// `CLOCK_MONOTONIC_COARSE` (a few ns, no syscall), so the dataplane can call it per batch or even per packet.
#[allow(unsafe_code)]
pub fn now_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; CLOCK_MONOTONIC_COARSE exists on every
    // Linux since 2.6.32, and on failure `ts` stays zero, which only makes time stand still.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
    }
    let secs = ts.tv_sec;
    let epoch = match EPOCH.compare_exchange(i64::MIN, secs, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => secs,
        Err(first) => first,
    };
    u32::try_from(secs.saturating_sub(epoch)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use oakestra_ebpf_common::FlowKey;
    use proptest::prelude::*;

    use super::*;

    fn key(i: u32, protocol: u8) -> FlowKey {
        let [a, b, c, d] = i.to_be_bytes();
        FlowKey::v4(
            [10, a, b, c],
            [10, 99, 0, d],
            40000u16.to_be(),
            80u16.to_be(),
            protocol,
        )
    }

    fn action(i: u8) -> FlowAction {
        FlowAction::local([i; 16], [i.wrapping_add(1); 16])
    }

    #[test]
    fn hits_and_misses() {
        let t = ConnTable::new(1000, Timeouts::default());
        assert!(t.is_empty());
        assert_eq!(t.lookup(&key(1, proto::UDP), 0, None), None);
        t.insert(key(1, proto::UDP), action(1), 0, None).unwrap();
        assert_eq!(t.lookup(&key(1, proto::UDP), 5, None), Some(action(1)));
        assert_eq!(t.lookup(&key(1, proto::UDP).reversed(), 5, None), None);
        assert_eq!(t.lookup(&key(1, proto::TCP), 5, None), None);
        // Replace.
        t.insert(key(1, proto::UDP), action(7), 6, None).unwrap();
        assert_eq!(t.lookup(&key(1, proto::UDP), 6, None), Some(action(7)));
        assert_eq!(t.len(), 1);
        assert!(t.remove(&key(1, proto::UDP)));
        assert!(!t.remove(&key(1, proto::UDP)));
        assert!(t.is_empty());
    }

    #[test]
    fn initial_states() {
        use tcp_flags::*;
        assert_eq!(FlowState::initial(proto::TCP, Some(SYN)), FlowState::TcpOpening);
        assert_eq!(
            FlowState::initial(proto::TCP, Some(SYN | ACK)),
            FlowState::TcpOpening
        );
        assert_eq!(
            FlowState::initial(proto::TCP, Some(ACK | PSH)),
            FlowState::TcpEstablished
        );
        assert_eq!(FlowState::initial(proto::TCP, Some(RST)), FlowState::TcpClosing);
        assert_eq!(FlowState::initial(proto::TCP, None), FlowState::TcpOpening);
        assert_eq!(FlowState::initial(proto::UDP, None), FlowState::Udp);
        assert_eq!(FlowState::initial(proto::ICMP, None), FlowState::Icmp);
        assert_eq!(FlowState::initial(proto::ICMPV6, None), FlowState::Icmp);
        assert_eq!(FlowState::initial(132, None), FlowState::Other);
    }

    #[test]
    fn tcp_state_transitions_and_their_timeouts() {
        use tcp_flags::*;
        let to = Timeouts::default();
        let t = ConnTable::new(1000, to);
        let k = key(1, proto::TCP);
        t.insert(k, action(1), 100, Some(SYN)).unwrap();
        assert_eq!(t.peek(&k, 100).unwrap().1, FlowState::TcpOpening);
        // Opening lives tcp_opening seconds after the last packet.
        assert!(t.peek(&k, 100 + to.tcp_opening).is_some());
        assert!(t.peek(&k, 101 + to.tcp_opening).is_none());
        // A SYN-ACK does not establish; a plain ACK does.
        t.lookup(&k, 110, Some(SYN | ACK)).unwrap();
        assert_eq!(t.peek(&k, 110).unwrap().1, FlowState::TcpOpening);
        t.lookup(&k, 111, Some(ACK | PSH)).unwrap();
        assert_eq!(t.peek(&k, 111).unwrap().1, FlowState::TcpEstablished);
        assert!(t.peek(&k, 111 + to.tcp_established).is_some());
        assert!(t.peek(&k, 112 + to.tcp_established).is_none());
        // FIN closes; the final ACK keeps it closing.
        t.lookup(&k, 200, Some(FIN | ACK)).unwrap();
        t.lookup(&k, 201, Some(ACK)).unwrap();
        assert_eq!(t.peek(&k, 201).unwrap().1, FlowState::TcpClosing);
        assert!(t.peek(&k, 201 + to.tcp_closing).is_some());
        assert_eq!(
            t.lookup(&k, 202 + to.tcp_closing, Some(ACK)),
            None,
            "expired counts as absent"
        );
        // A new SYN on the same tuple reopens (before expiry).
        t.insert(k, action(1), 300, Some(FIN)).unwrap();
        t.lookup(&k, 301, Some(SYN)).unwrap();
        assert_eq!(t.peek(&k, 301).unwrap().1, FlowState::TcpOpening);
        // RST closes from anywhere.
        t.lookup(&k, 302, Some(RST)).unwrap();
        assert_eq!(t.peek(&k, 302).unwrap().1, FlowState::TcpClosing);
        // No flags: no change.
        t.lookup(&k, 303, None).unwrap();
        assert_eq!(t.peek(&k, 303).unwrap().1, FlowState::TcpClosing);
    }

    #[test]
    fn other_protocols_time_out_by_kind() {
        let to = Timeouts {
            tcp_opening: 1,
            tcp_established: 2,
            tcp_closing: 3,
            udp: 4,
            icmp: 5,
            other: 6,
        };
        let t = ConnTable::new(1000, to);
        for (p, secs) in [(proto::UDP, 4), (proto::ICMP, 5), (proto::ICMPV6, 5), (47, 6)] {
            let k = key(9, p);
            t.insert(k, action(2), 10, None).unwrap();
            // Flags on a non-TCP entry change nothing.
            assert!(t.lookup(&k, 10, Some(tcp_flags::FIN)).is_some());
            assert!(t.peek(&k, 10 + secs).is_some(), "protocol {p}");
            assert!(t.peek(&k, 11 + secs).is_none(), "protocol {p}");
        }
        // A lookup refreshes.
        let k = key(10, proto::UDP);
        t.insert(k, action(3), 0, None).unwrap();
        assert!(t.lookup(&k, 4, None).is_some());
        assert!(t.lookup(&k, 8, None).is_some());
        assert!(t.lookup(&k, 13, None).is_none());
        // An older `now` from another thread neither expires nor moves the clock back.
        let k = key(11, proto::UDP);
        t.insert(k, action(3), 100, None).unwrap();
        assert!(t.lookup(&k, 50, None).is_some());
        assert!(t.peek(&k, 104).is_some());
    }

    #[test]
    fn sweep_drops_only_expired() {
        let t = ConnTable::new(1000, Timeouts::default());
        for i in 0..10 {
            t.insert(key(i, proto::UDP), action(1), 0, None).unwrap();
            t.insert(key(i, proto::TCP), action(1), 0, Some(tcp_flags::ACK))
                .unwrap();
        }
        assert_eq!(t.len(), 20);
        assert_eq!(t.sweep(120), 0);
        assert_eq!(t.sweep(121), 10);
        assert_eq!(t.len(), 10);
        assert_eq!(t.sweep(3601), 10);
        assert!(t.is_empty());
    }

    #[test]
    fn capacity_full_and_eviction_of_expired() {
        // 8 flows: one shard of 8.
        let t = ConnTable::new(8, Timeouts::default());
        assert_eq!(t.shard_count(), 1);
        for i in 0..8 {
            t.insert(key(i, proto::UDP), action(1), 0, None).unwrap();
        }
        assert_eq!(
            t.insert(key(8, proto::UDP), action(1), 10, None),
            Err(ConnTableError::Full { max: 8 })
        );
        // Replacing an existing key is fine at capacity.
        t.insert(key(3, proto::UDP), action(2), 10, None).unwrap();
        // Once the others expire, the insert evicts them.
        t.insert(key(8, proto::UDP), action(1), 125, None).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(&key(3, proto::UDP), 125, None), Some(action(2)));

        // Big tables use all shards and split the capacity evenly.
        let big = ConnTable::new(1 << 20, Timeouts::default());
        assert_eq!(big.shard_count(), MAX_SHARDS);
        let mid = ConnTable::new(1000, Timeouts::default());
        assert_eq!(mid.shard_count(), 8);
        assert_eq!(
            ConnTable::new(0, Timeouts::default()).insert(key(0, 6), action(0), 0, None),
            Err(ConnTableError::Full { max: 0 })
        );
    }

    #[test]
    fn retain_removes_matching() {
        let t = ConnTable::new(1000, Timeouts::default());
        for i in 0..30u8 {
            t.insert(key(u32::from(i), proto::UDP), action(i % 3), 0, None)
                .unwrap();
        }
        let gone = action(1);
        assert_eq!(t.retain(|_, a| *a != gone), 10);
        assert_eq!(t.len(), 20);
        let mut seen = 0;
        t.for_each(|_, a, s| {
            assert_ne!(*a, gone);
            assert_eq!(s, FlowState::Udp);
            seen += 1;
        });
        assert_eq!(seen, 20);
    }

    #[test]
    fn concurrent_use_from_four_threads() {
        let t = Arc::new(ConnTable::new(100_000, Timeouts::default()));
        let threads: Vec<_> = (0..4u32)
            .map(|n| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let k = key(n * 1_000_000 + i, proto::UDP);
                        t.insert(k, action(u8::try_from(n).unwrap()), 0, None).unwrap();
                        assert_eq!(t.lookup(&k, 1, None), Some(action(u8::try_from(n).unwrap())));
                        // Also read the other threads' keys, which may or may not be there yet.
                        let other = key(((n + 1) % 4) * 1_000_000 + i, proto::UDP);
                        if let Some(a) = t.lookup(&other, 1, None) {
                            assert_eq!(a, action(u8::try_from((n + 1) % 4).unwrap()));
                        }
                        if i.is_multiple_of(2) {
                            assert!(t.remove(&k));
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.len(), 4 * 2500);
    }

    #[test]
    fn clock_starts_near_zero_and_does_not_go_back() {
        let a = now_secs();
        let b = now_secs();
        assert!(a < 1000, "first reading {a}");
        assert!(b >= a);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8),
        Lookup(u8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..32u8, any::<u8>()).prop_map(|(k, a)| Op::Insert(k, a)),
            (0..32u8).prop_map(Op::Lookup),
            (0..32u8).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec(op(), 1..200)) {
            let t = ConnTable::new(10_000, Timeouts::default());
            let mut model: HashMap<FlowKey, FlowAction> = HashMap::new();
            let k = |i: u8| key(u32::from(i), if i.is_multiple_of(2) { proto::TCP } else { proto::UDP });
            for op in ops {
                match op {
                    Op::Insert(i, a) => {
                        t.insert(k(i), action(a), 0, Some(tcp_flags::ACK)).unwrap();
                        model.insert(k(i), action(a));
                    }
                    Op::Lookup(i) => prop_assert_eq!(t.lookup(&k(i), 0, None), model.get(&k(i)).copied()),
                    Op::Remove(i) => prop_assert_eq!(t.remove(&k(i)), model.remove(&k(i)).is_some()),
                }
                prop_assert_eq!(t.len(), model.len());
            }
            let mut all = Vec::new();
            t.for_each(|k, a, _| all.push((*k, *a)));
            prop_assert_eq!(all.len(), model.len());
            for (k, a) in all {
                prop_assert_eq!(model.get(&k), Some(&a));
            }
        }
    }

    fn mirrored_table(to: Timeouts) -> (ConnTable, Arc<crate::plumbing::fake::FakeFastPath>) {
        let t = ConnTable::new(1000, to);
        let fake = Arc::new(crate::plumbing::fake::FakeFastPath::default());
        assert!(t.set_mirror(fake.clone(), 0));
        assert!(!t.set_mirror(fake.clone(), 0), "one mirror only");
        (t, fake)
    }

    #[test]
    fn the_mirror_follows_inserts_removes_and_retains() {
        let (t, fake) = mirrored_table(Timeouts::default());
        for i in 0..4 {
            t.insert(key(i, proto::UDP), action(u8::try_from(i).unwrap()), 0, None)
                .unwrap();
        }
        assert_eq!(fake.flows.lock().unwrap().len(), 4);
        assert_eq!(fake.flows.lock().unwrap()[&key(2, proto::UDP)].0, action(2));
        assert!(t.remove(&key(0, proto::UDP)));
        assert!(!fake.flows.lock().unwrap().contains_key(&key(0, proto::UDP)));
        assert_eq!(t.retain(|_, a| *a != action(1)), 1);
        assert_eq!(fake.flows.lock().unwrap().len(), 2);
        // Entries there before the mirror was set are written when it is.
        let t2 = ConnTable::new(100, Timeouts::default());
        t2.insert(key(9, proto::TCP), action(9), 0, None).unwrap();
        let fake2 = Arc::new(crate::plumbing::fake::FakeFastPath::default());
        t2.set_mirror(fake2.clone(), 0);
        assert!(fake2.flows.lock().unwrap().contains_key(&key(9, proto::TCP)));
    }

    #[test]
    fn expiry_counts_what_the_fast_path_forwarded() {
        let to = Timeouts {
            udp: 10,
            ..Timeouts::default()
        };
        let (t, fake) = mirrored_table(to);
        let (busy, idle) = (key(1, proto::UDP), key(2, proto::UDP));
        t.insert(busy, action(1), 0, None).unwrap();
        t.insert(idle, action(2), 0, None).unwrap();
        // The fast path carried `busy` at 8 s; the table itself saw neither since 0.
        fake.flows.lock().unwrap().get_mut(&busy).unwrap().1 = Some(8);
        assert_eq!(t.sweep(15), 1, "only the idle flow expires");
        assert!(t.peek(&busy, 15).is_some());
        assert!(
            !fake.flows.lock().unwrap().contains_key(&idle),
            "and leaves the flow map"
        );
        assert!(fake.flows.lock().unwrap().contains_key(&busy));
        // A lookup past the table's own timeout still finds a flow the fast path keeps alive.
        fake.flows.lock().unwrap().get_mut(&busy).unwrap().1 = Some(20);
        assert!(t.lookup(&busy, 25, None).is_some());
        assert_eq!(t.sweep(31), 0);
        assert_eq!(t.sweep(36), 1, "nothing since 25");
        assert!(fake.flows.lock().unwrap().is_empty());
    }

    #[test]
    fn a_flow_the_slow_path_sees_again_is_rewritten_to_the_mirror_at_most_every_few_seconds() {
        let (t, fake) = mirrored_table(Timeouts::default());
        let k = key(1, proto::TCP);
        t.insert(k, action(1), 100, Some(tcp_flags::SYN)).unwrap();
        assert_eq!(fake.installs.lock().unwrap().len(), 1);
        // The kernel evicted it (LRU): the next slow-path hit after REMIRROR_SECS writes it again.
        fake.flows.lock().unwrap().clear();
        t.lookup(&k, 100, None).unwrap();
        assert_eq!(
            fake.installs.lock().unwrap().len(),
            1,
            "not within the same second"
        );
        t.lookup(&k, 100 + REMIRROR_SECS, None).unwrap();
        assert_eq!(fake.installs.lock().unwrap().len(), 2);
        assert!(fake.flows.lock().unwrap().contains_key(&k));
        t.lookup(&k, 101 + REMIRROR_SECS, None).unwrap();
        assert_eq!(fake.installs.lock().unwrap().len(), 2);
    }

    #[test]
    fn kernel_time_converts_to_table_time() {
        let now = now_secs();
        let ns = monotonic_coarse_ns();
        let secs = secs_of_monotonic_ns(ns);
        assert!(secs >= now && secs <= now + 1, "{secs} vs {now}");
        assert_eq!(secs_of_monotonic_ns(0), 0, "before the epoch is 0, not a wrap");
    }
}
