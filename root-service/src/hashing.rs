//! Password hashing (argon2id) on a small bounded pool, so that a flood of logins cannot starve the legitimate
//! ones nor grow without bound.
//!
//! - **Threads**: [`PoolSize::threads`] dedicated threads (default: the machine's cores), each owning one argon2
//!   memory block, allocated at its first job and reused. Allocated per call (as the argon2 crate does), glibc
//!   keeps the freed multi-MiB blocks in per-thread arenas and the resident size grows with every login; one block
//!   per hashing thread keeps it at `threads × 7 MiB`.
//! - **Queue**: at most [`PoolSize::queue`] jobs wait for a thread, one FIFO per client address, served
//!   round-robin across addresses (not in order of arrival), so each address waits for one job of each other
//!   address, however many the others sent. A job that finds the queue full pushes out the newest job of the
//!   "worst" address waiting, ranked by its recent failed checks (a score that halves every 30 s), then by how
//!   many jobs it has waiting, if that address is worse than the job's own; otherwise the job is refused at once
//!   ([`HashError::Saturated`], answered 503 with `Retry-After`). So a login from an address whose checks do not
//!   fail gets a place even while many guessing addresses keep the queue full: a distributed flood mostly competes
//!   with itself. (When every address waiting is as clean as the newcomer, e.g. a flood of fresh addresses each
//!   guessing once, the newcomer can still be refused; the failed-login limits of [`crate::throttle`] and
//!   `Retry-After` are what remains then.)
//! - **Per address**: at most [`PoolSize::per_address`] jobs of one client address (IPv6: its /64) are queued or
//!   running at a time; more are refused at once ([`HashError::AddressBusy`], 429 with `Retry-After`). So a flood
//!   from one address holds a few slots at most and a login from elsewhere waits for a few hashes, not for the
//!   flood. A job's slot is freed when the job has run, not when its request went away: a client that disconnects
//!   cannot queue more work than its slots.
//!
//! The async calls ([`HashPool::hash`], [`HashPool::verify`]) wait on a oneshot channel and hold no thread while
//! they wait; the blocking ones (startup, the store's default data) block their thread.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use argon2::{Argon2, Block};

use crate::Error;

/// Argon2id memory cost in KiB: 7 MiB with 5 passes, one of OWASP's equivalent argon2id settings (the crate's
/// default is 19 MiB × 2). The lower memory keeps the service's resident size small on edge hardware.
pub const ARGON2_MEMORY_KIB: u32 = 7 * 1024;
/// Argon2id passes.
pub const ARGON2_PASSES: u32 = 5;
/// What a refused job's client is told to wait before trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

fn argon2() -> Argon2<'static> {
    let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, 1, None).unwrap_or_default();
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// How big the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    /// Hashing threads (each with its own 7 MiB of argon2 memory).
    pub threads: usize,
    /// Jobs that may wait for a thread.
    pub queue: usize,
    /// Jobs one client address may have queued or running.
    pub per_address: usize,
}

/// Default [`PoolSize::queue`].
pub const DEFAULT_QUEUE: usize = 32;
/// Default [`PoolSize::per_address`].
pub const DEFAULT_PER_ADDRESS: usize = 4;

impl Default for PoolSize {
    /// As many threads as the machine has cores (at most 8), a queue of [`DEFAULT_QUEUE`], [`DEFAULT_PER_ADDRESS`]
    /// per address.
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            queue: DEFAULT_QUEUE,
            per_address: DEFAULT_PER_ADDRESS,
        }
    }
}

/// Why a password could not be hashed or checked.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every thread is busy and the queue is full.
    #[error("password hashing is saturated ({queue} requests are waiting already)")]
    Saturated {
        /// The queue's length.
        queue: usize,
    },
    /// The client address has its share of jobs queued or running already.
    #[error("{address} has {max} password checks in progress already")]
    AddressBusy {
        /// The address (IPv6: its /64 network).
        address: IpAddr,
        /// Jobs one address may have at a time.
        max: usize,
    },
    /// Hashing itself failed (the random source, or the pool stopped).
    #[error(transparent)]
    Failed(#[from] Error),
}

/// One job for a hashing thread: run with that thread's argon2 memory, or (`None`) refused: pushed out of the
/// queue by a fairer claim, it answers [`HashError::Saturated`] without running.
type Job = Box<dyn FnOnce(Option<&mut Vec<Block>>) + Send>;

/// Jobs queued or running, by client address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Whose a queued job is: a client address key, or the server's own (startup work).
type Owner = Option<IpAddr>;

/// A queued job with its place in the order of arrival and its owner's failure score when it was queued.
struct Queued {
    seq: u64,
    /// [`Failures::tenths`] of the owner.
    suspicion: u64,
    job: Job,
}

/// The jobs waiting for a thread: one FIFO per owner, served round-robin across owners.
///
/// A full queue (more than [`PoolSize::queue`] jobs) makes room for a new job by refusing the newest job of the
/// "worst" owner waiting (most recent failed checks, then most jobs waiting, then the newest job) if that owner is
/// worse than the new job's: at least one more recent failed check, or about as many and more jobs waiting.
/// Otherwise the new job is refused. So each address gets its turn whatever the others send, and an address whose
/// checks do not fail is not pushed out by ones whose checks do.
#[derive(Default)]
struct FairQueue {
    queues: HashMap<Owner, VecDeque<Queued>>,
    /// Owners with jobs waiting, in serving order.
    rotation: VecDeque<Owner>,
    len: usize,
    next_seq: u64,
    closed: bool,
}

impl FairQueue {
    /// Queues `job` for `owner`; with `cap`, makes room or refuses. Returns a refused job (ours or the one pushed
    /// out) for the caller to answer outside the lock.
    fn push(&mut self, owner: Owner, suspicion: u64, job: Job, cap: Option<usize>) -> Option<Job> {
        let mut refused = None;
        if let Some(cap) = cap
            && self.len >= cap
        {
            let ours = (suspicion, self.queues.get(&owner).map_or(0, VecDeque::len));
            let worst = self
                .queues
                .iter()
                .filter(|(o, _)| o.is_some())
                .filter_map(|(o, q)| q.back().map(|j| (j.suspicion, q.len(), j.seq, *o)))
                .max();
            let victim = worst
                .filter(|&(s, len, _, _)| s >= ours.0 + 10 || (s + 10 > ours.0 && len > ours.1))
                .map(|(_, _, _, o)| o);
            let Some(victim) = victim else {
                return Some(job);
            };
            refused = self.pop_back(victim);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let queue = self.queues.entry(owner).or_default();
        if queue.is_empty() {
            self.rotation.push_back(owner);
        }
        queue.push_back(Queued { seq, suspicion, job });
        self.len += 1;
        refused
    }

    /// Takes `owner`'s newest job out of the queue.
    fn pop_back(&mut self, owner: Owner) -> Option<Job> {
        let queue = self.queues.get_mut(&owner)?;
        let job = queue.pop_back()?.job;
        if queue.is_empty() {
            self.queues.remove(&owner);
            self.rotation.retain(|o| *o != owner);
        }
        self.len -= 1;
        Some(job)
    }

    /// The next job in round-robin order across owners.
    fn pop(&mut self) -> Option<Job> {
        let owner = self.rotation.pop_front()?;
        let queue = self.queues.get_mut(&owner)?;
        let job = queue.pop_front()?.job;
        if queue.is_empty() {
            self.queues.remove(&owner);
        } else {
            self.rotation.push_back(owner);
        }
        self.len -= 1;
        Some(job)
    }
}

/// The queue and the signal the hashing threads wait on.
#[derive(Default)]
struct Shared {
    queue: Mutex<FairQueue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue> {
        // The queue's invariants hold between statements that cannot panic: a poisoned lock is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How fast an address's failed checks are forgotten: the score halves every this long.
const FAILURE_HALF_LIFE: Duration = Duration::from_secs(30);
/// Most addresses whose failed checks are remembered.
const MAX_REMEMBERED: usize = 10_000;

/// Recent failed password checks by client address: a score that grows by one per failure and halves every
/// [`FAILURE_HALF_LIFE`]. It orders addresses in a full queue only; the failed-login limits are
/// [`crate::throttle`]'s.
#[derive(Debug, Default)]
struct Failures(HashMap<IpAddr, (f64, Instant)>);

impl Failures {
    fn decayed(score: f64, since: Instant, now: Instant) -> f64 {
        let halvings = now.saturating_duration_since(since).as_secs_f64() / FAILURE_HALF_LIFE.as_secs_f64();
        score * 0.5_f64.powf(halvings)
    }

    /// `key`'s score in tenths.
    fn tenths(&self, key: &IpAddr, now: Instant) -> u64 {
        let score = self.0.get(key).map_or(0.0, |&(s, at)| Self::decayed(s, at, now));
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small non-negative score"
        )]
        let tenths = (score * 10.0).round().min(1e9) as u64;
        tenths
    }

    fn add(&mut self, key: IpAddr, now: Instant) {
        if !self.0.contains_key(&key) && self.0.len() >= MAX_REMEMBERED {
            // Forget what has faded, then the tenth with the lowest scores.
            self.0.retain(|_, &mut (s, at)| Self::decayed(s, at, now) >= 0.5);
            if self.0.len() >= MAX_REMEMBERED {
                let mut scores: Vec<f64> = self
                    .0
                    .values()
                    .map(|&(s, at)| Self::decayed(s, at, now))
                    .collect();
                let cut = MAX_REMEMBERED / 10;
                let (_, threshold, _) = scores.select_nth_unstable_by(cut, f64::total_cmp);
                let threshold = *threshold;
                self.0
                    .retain(|_, &mut (s, at)| Self::decayed(s, at, now) > threshold);
            }
        }
        let score = self.0.get(&key).map_or(0.0, |&(s, at)| Self::decayed(s, at, now));
        self.0.insert(key, (score + 1.0, now));
    }
}

/// The pool. Dropping it stops its threads once they finish their current job; queued jobs answer that the pool
/// stopped.
pub struct HashPool {
    shared: Arc<Shared>,
    size: PoolSize,
    per_address: Counts,
    failures: Mutex<Failures>,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        let waiting = {
            let mut queue = self.shared.lock();
            queue.closed = true;
            std::mem::take(&mut queue.queues)
        };
        self.shared.ready.notify_all();
        // Dropping the jobs drops their reply channels: their callers learn that the pool stopped.
        drop(waiting);
    }
}

/// The address a client's jobs are counted under: IPv4 as it is (an IPv4-mapped IPv6 address unwrapped), IPv6 by
/// its /64, the block one subscriber usually holds.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1_u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// One client address's share of the pool, held by its job until the job has run (or was refused).
struct Slot {
    counts: Counts,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// A hashing thread: takes jobs in the queue's order until the pool is dropped.
fn hashing_thread(shared: &Shared) {
    let mut memory = Vec::new();
    loop {
        let job = {
            let mut queue = shared.lock();
            loop {
                if queue.closed {
                    return;
                }
                if let Some(job) = queue.pop() {
                    break job;
                }
                queue = shared.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        job(Some(&mut memory));
    }
}

impl HashPool {
    /// Starts `size.threads` hashing threads (at least one).
    pub fn start(size: PoolSize) -> Result<Self, Error> {
        let shared = Arc::new(Shared::default());
        for n in 0..size.threads.max(1) {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("password-hash-{n}"))
                .spawn(move || hashing_thread(&shared))
                .map_err(|e| Error::Hash(format!("cannot start a password-hashing thread: {e}")))?;
        }
        Ok(Self {
            shared,
            size,
            per_address: Arc::default(),
            failures: Mutex::default(),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        // Each update is one insert or retain: a poisoned lock still holds a consistent map.
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pool's size.
    pub fn size(&self) -> PoolSize {
        self.size
    }

    /// Takes one of `peer`'s slots, if it has one left.
    fn slot(&self, peer: IpAddr) -> Result<Slot, HashError> {
        let key = address_key(peer);
        let mut counts = self.per_address.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key).or_insert(0);
        if *n >= self.size.per_address {
            return Err(HashError::AddressBusy {
                address: key,
                max: self.size.per_address,
            });
        }
        *n += 1;
        Ok(Slot {
            counts: Arc::clone(&self.per_address),
            key,
        })
    }

    /// Queues `job` for `owner` (bounded by the queue's size unless `bounded` is false) and wakes a thread; a
    /// refused job (ours, or the one ours pushed out) is answered here.
    fn submit(&self, owner: Owner, job: Job, bounded: bool) {
        let suspicion = owner.map_or(0, |key| self.failures().tenths(&key, Instant::now()));
        let refused = {
            let mut queue = self.shared.lock();
            if queue.closed {
                Some(job)
            } else {
                queue.push(owner, suspicion, job, bounded.then_some(self.size.queue.max(1)))
            }
        };
        self.shared.ready.notify_one();
        if let Some(job) = refused {
            job(None);
        }
    }

    /// Queues `work` for `peer` (or for nobody's account) and waits for its result without holding a thread.
    async fn run<T: Send + 'static>(
        &self,
        peer: Option<IpAddr>,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let slot = peer.map(|p| self.slot(p)).transpose()?;
        let owner = slot.as_ref().map(|s| s.key);
        let queue = self.size.queue;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let result = memory.map(work).ok_or(HashError::Saturated { queue });
            // Free the slot before answering, so that the client may start its next check at once.
            drop(slot);
            let _ = reply.send(result);
        });
        self.submit(owner, job, true);
        answer.await.map_err(|_| HashError::from(stopped()))?
    }

    /// Queues `work` without a bound (startup work: the default data, the dummy hash) and blocks until it ran. Not
    /// for async code.
    fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            if let Some(memory) = memory {
                let _ = reply.send(work(memory));
            }
        });
        self.submit(None, job, false);
        answer.blocking_recv().map_err(|_| stopped())
    }

    /// Hashes `password` into a PHC string (argon2id, random 16-byte salt, 32-byte output), counting the job
    /// against `peer`'s share.
    pub async fn hash(&self, peer: Option<IpAddr>, password: String) -> Result<String, HashError> {
        let salt = new_salt()?;
        self.run(peer, move |memory| hash_with(memory, &password, &salt))
            .await?
            .map_err(HashError::from)
    }

    /// Whether `password` matches the PHC string `hash`, counting the job against `peer`'s share. A mismatch adds
    /// to `peer`'s failure score, which ranks its later jobs behind others' in a full queue.
    pub async fn verify(
        &self,
        peer: Option<IpAddr>,
        password: String,
        hash: Arc<str>,
    ) -> Result<bool, HashError> {
        let matched = self
            .run(peer, move |memory| verify_with(memory, &password, &hash))
            .await?;
        if let (false, Some(peer)) = (matched, peer) {
            self.failures().add(address_key(peer), Instant::now());
        }
        Ok(matched)
    }

    /// [`Self::hash`] for blocking code (startup, the store's default data).
    pub fn hash_blocking(&self, password: &str) -> Result<String, Error> {
        let salt = new_salt()?;
        let password = password.to_owned();
        self.run_blocking(move |memory| hash_with(memory, &password, &salt))?
    }

    /// [`Self::verify`] for blocking code.
    pub fn verify_blocking(&self, password: &str, hash: &str) -> Result<bool, Error> {
        let (password, hash) = (password.to_owned(), hash.to_owned());
        self.run_blocking(move |memory| verify_with(memory, &password, &hash))
    }
}

fn stopped() -> Error {
    Error::Hash("the password-hashing pool stopped".into())
}

fn new_salt() -> Result<[u8; 16], Error> {
    let mut salt = [0_u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Error::Random(e.to_string()))?;
    Ok(salt)
}

/// The thread's memory, grown to `blocks` on first use; `None` if `blocks` is more than ours (a hash made with
/// other parameters: the crate then allocates for it).
fn memory_for(memory: &mut Vec<Block>, blocks: usize) -> Option<&mut [Block]> {
    let ours = usize::try_from(ARGON2_MEMORY_KIB).unwrap_or(0);
    if blocks > ours {
        return None;
    }
    if memory.len() < ours {
        memory.resize(ours, Block::new());
    }
    memory.get_mut(..blocks)
}

fn hash_with(memory: &mut Vec<Block>, password: &str, salt: &[u8; 16]) -> Result<String, Error> {
    use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
    let hasher = argon2();
    let fail = |e: &dyn std::fmt::Display| Error::Hash(e.to_string());
    let mut out = [0_u8; 32];
    let memory =
        memory_for(memory, hasher.params().block_count()).ok_or_else(|| fail(&"argon2 memory too small"))?;
    hasher
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, memory)
        .map_err(|e| fail(&e))?;
    let phc = PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: ParamsString::try_from(hasher.params()).map_err(|e| fail(&e))?,
        salt: Some(Salt::new(salt).map_err(|e| fail(&e))?),
        hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash` (whatever argon2 parameters it was made with); a malformed
/// hash never matches. The comparison takes the same time wherever the first difference is.
fn verify_with(memory: &mut Vec<Block>, password: &str, hash: &str) -> bool {
    use argon2::password_hash::phc::PasswordHash;
    let Ok(phc) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm), Some(salt), Some(expected)) = (
        argon2::Params::try_from(&phc),
        argon2::Algorithm::try_from(phc.algorithm.as_str()),
        phc.salt,
        phc.hash,
    ) else {
        return false;
    };
    let version = phc
        .version
        .map_or(Ok(argon2::Version::V0x13), argon2::Version::try_from)
        .unwrap_or(argon2::Version::V0x13);
    let blocks = params.block_count();
    let hasher = Argon2::new(algorithm, version, params);
    let mut out = vec![0_u8; expected.len()];
    let computed = match memory_for(memory, blocks) {
        Some(memory) => hasher.hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory),
        None => hasher.hash_password_into(password.as_bytes(), &salt, &mut out),
    };
    computed.is_ok()
        && out
            .iter()
            .zip(expected.as_bytes())
            .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize, queue: usize, per_address: usize) -> HashPool {
        HashPool::start(PoolSize {
            threads,
            queue,
            per_address,
        })
        .unwrap()
    }

    #[test]
    fn hash_and_verify() {
        let pool = pool(1, 4, 4);
        let h = pool.hash_blocking("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{h}");
        // Hashes made with other parameters (e.g. the crate default of earlier versions) still verify.
        use argon2::{PasswordHasher, PasswordVerifier};
        let old = Argon2::default().hash_password(b"pw").unwrap().to_string();
        assert!(pool.verify_blocking("pw", &old).unwrap());
        assert!(!pool.verify_blocking("px", &old).unwrap());
        // Ours is a standard PHC string the crate's own verifier accepts.
        assert!(Argon2::default().verify_password(b"pw", h.as_str()).is_ok());
        assert!(Argon2::default().verify_password(b"px", h.as_str()).is_err());
        assert_ne!(pool.hash_blocking("pw").unwrap(), h, "random salt");
        assert!(pool.verify_blocking("pw", &h).unwrap());
        assert!(!pool.verify_blocking("other", &h).unwrap());
        assert!(!pool.verify_blocking("pw", "not a hash").unwrap());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    /// A job that only says whether it ran (`Some`) or was refused (`None`), as its owner's name.
    fn probe(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Job {
        let log = Arc::clone(log);
        Box::new(move |memory| {
            let what = if memory.is_some() { "ran" } else { "refused" };
            log.lock().unwrap().push(format!("{name} {what}"));
        })
    }

    fn owner(n: u8) -> Owner {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn owners_are_served_round_robin() {
        let log = Arc::default();
        let mut queue = FairQueue::default();
        for name in ["a1", "a2", "a3"] {
            assert!(queue.push(owner(1), 0, probe(name, &log), Some(8)).is_none());
        }
        assert!(queue.push(owner(2), 0, probe("b1", &log), Some(8)).is_none());
        assert!(queue.push(owner(3), 0, probe("c1", &log), Some(8)).is_none());
        let mut memory = Vec::new();
        while let Some(job) = queue.pop() {
            job(Some(&mut memory));
        }
        assert_eq!(
            *log.lock().unwrap(),
            ["a1 ran", "b1 ran", "c1 ran", "a2 ran", "a3 ran"]
        );
        assert_eq!(queue.len, 0);
        assert!(queue.rotation.is_empty() && queue.queues.is_empty());
    }

    /// A full queue makes room for an owner with fewer jobs waiting by refusing the newest job of the owner with
    /// the most; an owner that already has as many waiting as anyone is refused.
    #[test]
    fn a_full_queue_pushes_out_the_heaviest_owner() {
        let log = Arc::default();
        let mut queue = FairQueue::default();
        for name in ["a1", "a2", "a3"] {
            assert!(queue.push(owner(1), 0, probe(name, &log), Some(3)).is_none());
        }
        let refused = queue.push(owner(2), 0, probe("b1", &log), Some(3)).unwrap();
        refused(None);
        let refused = queue.push(owner(3), 0, probe("c1", &log), Some(3)).unwrap();
        refused(None);
        // a1, b1, c1 wait, one each: a fourth owner pushes out the newest of them (c1), b1 is kept.
        let refused = queue.push(owner(4), 0, probe("d1", &log), Some(3)).unwrap();
        refused(None);
        // Owner 4 sending again has as many waiting as anyone: refused itself.
        let refused = queue.push(owner(4), 0, probe("d2", &log), Some(3)).unwrap();
        refused(None);
        let mut memory = Vec::new();
        while let Some(job) = queue.pop() {
            job(Some(&mut memory));
        }
        assert_eq!(
            *log.lock().unwrap(),
            [
                "a3 refused",
                "a2 refused",
                "c1 refused",
                "d2 refused",
                "a1 ran",
                "b1 ran",
                "d1 ran"
            ]
        );
    }

    /// Owners whose checks failed lately are pushed out first, and cannot push out an owner whose checks did not.
    #[test]
    fn a_full_queue_keeps_owners_without_failures() {
        let log = Arc::default();
        let mut queue = FairQueue::default();
        assert!(queue.push(owner(1), 0, probe("clean", &log), Some(2)).is_none());
        assert!(
            queue
                .push(owner(2), 50, probe("guesser", &log), Some(2))
                .is_none()
        );
        // Another guesser pushes out the first (as suspicious, and with a job waiting where it has none)...
        queue
            .push(owner(3), 50, probe("guesser-2", &log), Some(2))
            .unwrap()(None);
        // ... and a fresh address pushes out that one, never the clean owner.
        queue.push(owner(4), 0, probe("fresh", &log), Some(2)).unwrap()(None);
        let mut memory = Vec::new();
        while let Some(job) = queue.pop() {
            job(Some(&mut memory));
        }
        assert_eq!(
            *log.lock().unwrap(),
            ["guesser refused", "guesser-2 refused", "clean ran", "fresh ran"]
        );
        let mut failures = Failures::default();
        let (key, now) = (IpAddr::from([10, 0, 0, 9]), Instant::now());
        failures.add(key, now);
        failures.add(key, now);
        assert_eq!(failures.tenths(&key, now), 20);
        assert_eq!(
            failures.tenths(&key, now + FAILURE_HALF_LIFE),
            10,
            "halves every half-life"
        );
    }

    /// One address gets `per_address` jobs at once and no more; the pool refuses rather than queue beyond its
    /// queue; slots come back when the jobs have run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_address_share_and_queue_are_bounded() {
        let pool = Arc::new(pool(1, 2, 2));
        let hash: Arc<str> = pool.hash(None, "pw".into()).await.unwrap().into();
        let flooder: IpAddr = "10.0.0.1".parse().unwrap();
        let verify = |peer: IpAddr| {
            let (pool, hash) = (Arc::clone(&pool), Arc::clone(&hash));
            tokio::spawn(async move { pool.verify(Some(peer), "wrong".into(), hash).await })
        };
        let first = [verify(flooder), verify(flooder)];
        // Wait until both hold their slots (a fixed sleep lost this race on a loaded machine). One verification
        // takes ~30 ms on the pool's one thread, so the second still holds its slot when the third comes.
        let key = address_key(flooder);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.per_address.lock().unwrap().get(&key).copied().unwrap_or(0) < 2 {
            assert!(
                Instant::now() < deadline,
                "the flooder's two jobs never took their slots"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match verify(flooder).await.unwrap() {
            Err(HashError::AddressBusy { address, max: 2 }) => assert_eq!(address, flooder),
            other => panic!("a third job from the flooder: {other:?}"),
        }
        // Another address still gets in: one job runs, at most two wait.
        let others: Vec<_> = (2..=6)
            .map(|n| verify(format!("10.0.0.{n}").parse().unwrap()))
            .collect();
        let mut saturated = 0;
        for task in first.into_iter().chain(others) {
            match task.await.unwrap() {
                Ok(matched) => assert!(!matched),
                Err(HashError::Saturated { queue: 2 }) => saturated += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            saturated >= 1,
            "seven jobs do not all fit into one thread and a queue of two"
        );
        assert!(
            pool.per_address.lock().unwrap().is_empty(),
            "every slot was returned"
        );
        assert!(pool.verify(Some(flooder), "pw".into(), hash).await.unwrap());
    }
}
