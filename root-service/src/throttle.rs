//! Failed-login limits: in-memory, bounded, counting failures only.
//!
//! Clients such as oak-cli log in before every command, so a login that succeeds is never slowed and never counted.
//! Every failed login (wrong password, unknown user name) is counted in three token buckets, each refilled
//! continuously at its per-minute rate up to the same number:
//!
//! | bucket | default | when it is empty |
//! |---|---|---|
//! | the client address (IPv6: its /64) | 20 failures a minute | every login from that address is refused |
//! | the user name *from* that address | 5 a minute | logins as that user from that address are refused |
//! | the user name from all addresses | 100 a minute | logins as that user are refused **only from addresses whose own bucket for that user is not full**, i.e. that failed for it recently |
//!
//! A refusal is 429 with `Retry-After` (the seconds until the bucket allows the next attempt) and a message naming
//! the limit, answered before any password hashing.
//!
//! Why the per-user limit cannot lock the legitimate user out: it never refuses an address that has not failed for
//! that user recently. An attacker flooding `Admin` from other addresses empties the user's bucket, yet the
//! administrator's own address (with no failures of its own) logs in as usual; a typo of the administrator's
//! during the attack costs at most the refill time of one failure in the per-address-and-user bucket (12 s by
//! default). What the user-wide limit takes from a distributed attacker is the burst: once it is empty, each
//! attacking address gets one guess per refill instead of five at once. Each address is also held to its own
//! per-address limit for all user names together.
//!
//! Bounds: each table keeps at most [`MAX_ENTRIES`] entries. Only failures add entries (a refused or successful
//! login never does), and failures are paced by password hashing. When a table is full, entries that have refilled
//! completely (they remember nothing) are dropped first, then the tenth that failed longest ago. User names are
//! keyed by at most [`MAX_NAME_KEY`] bytes (no user name is longer).

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use oakestra_protocol::text::Escaped;

use crate::hashing::address_key;

/// Most entries one table keeps.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest user-name prefix used as a key (the longest valid user name).
pub const MAX_NAME_KEY: usize = 64;

/// The three limits, in failed logins a minute (each is also its bucket's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures from one client address, for any user names.
    pub per_address: u32,
    /// Failures for one user name from one client address.
    pub per_user_address: u32,
    /// Failures for one user name from all addresses; see the module docs for whom it refuses.
    pub per_user: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_address: 20,
            per_user_address: 5,
            per_user: 100,
        }
    }
}

/// Which limit refused a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Too many failures from the address.
    Address {
        /// The limit, failures a minute.
        per_minute: u32,
    },
    /// Too many failures for the user from the address.
    UserFromAddress {
        /// The user name.
        user: String,
        /// The limit, failures a minute.
        per_minute: u32,
    },
    /// Too many failures for the user from all addresses, and this address failed for it recently.
    User {
        /// The user name.
        user: String,
        /// The limit, failures a minute.
        per_minute: u32,
    },
}

/// A refused login: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: Limit,
    /// How long until that limit allows the next attempt.
    pub retry_after: Duration,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = whole_seconds(self.retry_after);
        match &self.limit {
            Limit::Address { per_minute } => write!(
                f,
                "too many failed logins from this address (limit: {per_minute} per minute); retry in {secs} s"
            ),
            Limit::UserFromAddress { user, per_minute } => write!(
                f,
                "too many failed logins for user {user:?} from this address (limit: {per_minute} per minute); \
                 retry in {secs} s"
            ),
            Limit::User { user, per_minute } => write!(
                f,
                "too many failed logins for user {user:?} (limit: {per_minute} per minute from all addresses) \
                 and a recent one from this address; retry in {secs} s"
            ),
        }
    }
}

/// `d` in whole seconds, rounded up, at least 1 (what `Retry-After` carries).
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// A token bucket: `tokens` failures may still happen, refilled at the table's rate since `updated`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One table of buckets of the same rate.
#[derive(Debug)]
struct Table<K> {
    buckets: HashMap<K, Bucket>,
    per_minute: u32,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(per_minute: u32) -> Self {
        Self {
            buckets: HashMap::new(),
            per_minute: per_minute.max(1),
        }
    }

    fn size(&self) -> f64 {
        f64::from(self.per_minute)
    }

    /// Tokens regained per second.
    fn rate(&self) -> f64 {
        self.size() / 60.0
    }

    /// The tokens of `key`'s bucket at `now` (a full bucket if there is none).
    fn tokens(&self, key: &K, now: Instant) -> f64 {
        self.buckets
            .get(key)
            .map_or(self.size(), |b| self.refilled(b, now))
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.rate()).min(self.size())
    }

    /// How long until `key`'s bucket holds `target` tokens.
    fn time_until(&self, key: &K, now: Instant, target: f64) -> Duration {
        let missing = (target - self.tokens(key, now)).max(0.0);
        Duration::from_secs_f64(missing / self.rate())
    }

    /// Takes one token from `key`'s bucket; whether this emptied it (fewer than one token left, and not before).
    fn take(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= MAX_ENTRIES {
            self.evict(now);
        }
        let before = self.tokens(key, now);
        // Failures that passed the check together may overdraw a little; never more than one refill's worth.
        let after = (before - 1.0).max(-1.0);
        self.buckets.insert(
            key.clone(),
            Bucket {
                tokens: after,
                updated: now,
            },
        );
        before >= 1.0 && after < 1.0
    }

    fn forget(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Makes room: drops the buckets that have refilled completely, then the tenth that failed longest ago.
    fn evict(&mut self, now: Instant) {
        let (size, rate) = (self.size(), self.rate());
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < size
        });
        if self.buckets.len() >= MAX_ENTRIES {
            let mut times: Vec<Instant> = self.buckets.values().map(|b| b.updated).collect();
            let cut = MAX_ENTRIES / 10;
            let (_, oldest_kept, _) = times.select_nth_unstable(cut);
            let threshold = *oldest_kept;
            self.buckets.retain(|_, b| b.updated > threshold);
        }
    }
}

/// A user-name key: at most [`MAX_NAME_KEY`] bytes, cut at a character boundary.
fn name_key(user: &str) -> String {
    let mut end = user.len().min(MAX_NAME_KEY);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user[..end].to_owned()
}

#[derive(Debug)]
struct Tables {
    address: Table<IpAddr>,
    user_address: Table<(String, IpAddr)>,
    user: Table<String>,
}

/// The failed-login limits of one server.
#[derive(Debug)]
pub struct LoginThrottle {
    limits: LoginLimits,
    tables: Mutex<Tables>,
}

impl LoginThrottle {
    /// Empty tables with `limits`.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            tables: Mutex::new(Tables {
                address: Table::new(limits.per_address),
                user_address: Table::new(limits.per_user_address),
                user: Table::new(limits.per_user),
            }),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Every update is a single insert or remove: a poisoned lock holds consistent tables.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a login as `user` from `peer` may be checked now; refused with the limit that says no.
    pub fn check(&self, user: &str, peer: IpAddr) -> Result<(), Refusal> {
        self.check_at(user, peer, Instant::now())
    }

    fn check_at(&self, user: &str, peer: IpAddr, now: Instant) -> Result<(), Refusal> {
        let (address, name) = (address_key(peer), name_key(user));
        let pair = (name.clone(), address);
        let tables = self.tables();
        if tables.address.tokens(&address, now) < 1.0 {
            return Err(Refusal {
                limit: Limit::Address {
                    per_minute: self.limits.per_address,
                },
                retry_after: tables.address.time_until(&address, now, 1.0),
            });
        }
        let pair_tokens = tables.user_address.tokens(&pair, now);
        if pair_tokens < 1.0 {
            return Err(Refusal {
                limit: Limit::UserFromAddress {
                    user: name,
                    per_minute: self.limits.per_user_address,
                },
                retry_after: tables.user_address.time_until(&pair, now, 1.0),
            });
        }
        let pair_failed_recently = pair_tokens < tables.user_address.size();
        if pair_failed_recently && tables.user.tokens(&name, now) < 1.0 {
            let full = tables.user_address.size();
            return Err(Refusal {
                retry_after: tables.user_address.time_until(&pair, now, full),
                limit: Limit::User {
                    user: name,
                    per_minute: self.limits.per_user,
                },
            });
        }
        Ok(())
    }

    /// Counts a failed login as `user` from `peer`.
    pub fn failed(&self, user: &str, peer: IpAddr) {
        self.failed_at(user, peer, Instant::now());
    }

    fn failed_at(&self, user: &str, peer: IpAddr, now: Instant) {
        let (address, name) = (address_key(peer), name_key(user));
        let mut tables = self.tables();
        if tables.address.take(&address, now) {
            tracing::warn!(%address, limit = self.limits.per_address, "failed logins from an address reached the limit");
        }
        if tables.user_address.take(&(name.clone(), address), now) {
            tracing::info!(user = %Escaped(&name), %address, limit = self.limits.per_user_address,
                "failed logins for a user from an address reached the limit");
        }
        if tables.user.take(&name, now) {
            tracing::warn!(user = %Escaped(&name), limit = self.limits.per_user,
                "failed logins for a user from all addresses reached the limit: only addresses without recent failures may try");
        }
    }

    /// A successful login as `user` from `peer`: that address's failures for that user are forgotten (its own
    /// typos do not add up over the day); the address's and the user's totals are kept.
    pub fn succeeded(&self, user: &str, peer: IpAddr) {
        let key = (name_key(user), address_key(peer));
        self.tables().user_address.forget(&key);
    }

    /// Entries in the three tables (address, user from address, user).
    pub fn entries(&self) -> (usize, usize, usize) {
        let tables = self.tables();
        (
            tables.address.buckets.len(),
            tables.user_address.buckets.len(),
            tables.user.buckets.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// [`MAX_ENTRIES`] as a `u32`, to count addresses.
    fn max_entries() -> u32 {
        u32::try_from(MAX_ENTRIES).unwrap()
    }

    fn throttle(per_address: u32, per_user_address: u32, per_user: u32) -> LoginThrottle {
        LoginThrottle::new(LoginLimits {
            per_address,
            per_user_address,
            per_user,
        })
    }

    #[test]
    fn an_address_gets_its_burst_then_waits_for_the_refill() {
        let t = throttle(3, 100, 100);
        let now = Instant::now();
        let a = ip("10.0.0.1");
        for n in 0..3 {
            assert!(t.check_at(&format!("u{n}"), a, now).is_ok());
            t.failed_at(&format!("u{n}"), a, now);
        }
        let refused = t.check_at("anyone", a, now).unwrap_err();
        assert_eq!(refused.limit, Limit::Address { per_minute: 3 });
        assert_eq!(
            whole_seconds(refused.retry_after),
            20,
            "one failure refills in 60/3 s"
        );
        assert!(refused.to_string().contains("limit: 3 per minute"), "{refused}");
        assert!(
            t.check_at("anyone", ip("10.0.0.2"), now).is_ok(),
            "other addresses are not affected"
        );
        assert!(t.check_at("anyone", a, now + Duration::from_secs(20)).is_ok());
    }

    #[test]
    fn a_user_name_is_limited_per_address() {
        let t = throttle(100, 2, 100);
        let now = Instant::now();
        let a = ip("10.0.0.1");
        t.failed_at("bob", a, now);
        t.failed_at("bob", a, now);
        let refused = t.check_at("bob", a, now).unwrap_err();
        assert!(matches!(refused.limit, Limit::UserFromAddress { ref user, per_minute: 2 } if user == "bob"));
        assert!(t.check_at("carol", a, now).is_ok());
        assert!(t.check_at("bob", ip("10.0.0.2"), now).is_ok());
    }

    /// Once a user's total is used up, only addresses that failed for it recently are refused: the legitimate
    /// user's own address is not.
    #[test]
    fn the_user_limit_spares_addresses_without_failures() {
        let t = throttle(1000, 1000, 10);
        let now = Instant::now();
        for n in 0..10 {
            t.failed_at("Admin", ip(&format!("192.0.2.{n}")), now);
        }
        let refused = t.check_at("Admin", ip("192.0.2.1"), now).unwrap_err();
        assert!(
            matches!(refused.limit, Limit::User { per_minute: 10, .. }),
            "{refused}"
        );
        assert!(
            t.check_at("Admin", ip("198.51.100.7"), now).is_ok(),
            "a fresh address may try"
        );
        t.succeeded("Admin", ip("192.0.2.1"));
        assert!(
            t.check_at("Admin", ip("192.0.2.1"), now).is_ok(),
            "a success forgets that address's failures for the user"
        );
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let t = throttle(2, 100, 100);
        let now = Instant::now();
        t.failed_at("a", ip("2001:db8::1"), now);
        t.failed_at("b", ip("2001:db8::ffff:2"), now);
        assert!(t.check_at("c", ip("2001:db8::3"), now).is_err());
        assert!(t.check_at("c", ip("2001:db8:0:1::3"), now).is_ok());
    }

    /// A flood of random names and addresses (one failure each, a millisecond apart, nothing refilled) keeps
    /// every table at its bound, dropping the oldest.
    #[test]
    fn tables_stay_bounded_under_random_names_and_addresses() {
        let t = throttle(1, 1, 1);
        let start = Instant::now();
        for n in 0..(max_entries() * 3) {
            let now = start + Duration::from_millis(u64::from(n));
            let peer = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            t.failed_at(&format!("user-{n}-{}", "x".repeat(100)), peer, now);
        }
        let (a, ua, u) = t.entries();
        assert!(
            a <= MAX_ENTRIES && ua <= MAX_ENTRIES && u <= MAX_ENTRIES,
            "{a} {ua} {u}"
        );
        // The newest failures are the ones kept.
        let last = max_entries() * 3 - 1;
        let tables = t.tables();
        assert!(
            tables
                .address
                .buckets
                .contains_key(&IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + last)))
        );
        assert!(tables.user.buckets.keys().all(|k| k.len() <= MAX_NAME_KEY));
    }

    #[test]
    fn refilled_entries_are_dropped_first() {
        let t = throttle(60, 60, 60);
        let start = Instant::now();
        for n in 0..max_entries() {
            t.failed_at("u", IpAddr::V4(std::net::Ipv4Addr::from(n)), start);
        }
        // A minute later every bucket has refilled: one new failure clears them all.
        t.failed_at("u", ip("10.9.9.9"), start + Duration::from_secs(61));
        assert_eq!(t.entries().0, 1);
    }

    #[test]
    fn name_keys_are_cut_at_a_character_boundary() {
        assert_eq!(name_key("Admin"), "Admin");
        let long = "é".repeat(40);
        let key = name_key(&long);
        assert!(key.len() <= MAX_NAME_KEY && long.starts_with(&key));
    }
}
