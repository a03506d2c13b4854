//! Password hashing (argon2id) on a small bounded pool, so that a flood of logins cannot starve the legitimate
//! ones nor grow without bound.
//!
//! - **Threads**: [`PoolSize::threads`] dedicated threads (default: the machine's cores), each owning one argon2
//!   memory block, allocated at its first job and reused. Allocated per call (as the argon2 crate does), glibc
//!   keeps the freed multi-MiB blocks in per-thread arenas and the resident size grows with every login; one block
//!   per hashing thread keeps it at `threads × 7 MiB`.
//! - **Queue**: at most [`PoolSize::queue`] jobs wait for a thread. A job that finds the queue full is refused at
//!   once ([`HashError::Saturated`], answered 503 with `Retry-After`) instead of waiting behind it.
//! - **Per address**: at most [`PoolSize::per_address`] jobs of one client address (IPv6: its /64) are queued or
//!   running at a time; more are refused at once ([`HashError::AddressBusy`], 429 with `Retry-After`). So a flood
//!   from one address holds a few slots at most and a login from elsewhere waits for a few hashes, not for the
//!   flood. A job's slot is freed when the job has run, not when its request went away: a client that disconnects
//!   cannot queue more work than its slots.
//!
//! The async calls ([`HashPool::hash`], [`HashPool::verify`]) wait on a oneshot channel and hold no thread while
//! they wait; the blocking ones (startup, the store's default data) block their thread.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, SyncSender, TrySendError},
    },
    time::Duration,
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

/// One job for a hashing thread: it gets that thread's argon2 memory.
type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// Jobs queued or running, by client address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The pool. Dropping the last handle stops its threads once the queued jobs are done.
#[derive(Debug)]
pub struct HashPool {
    jobs: SyncSender<Job>,
    size: PoolSize,
    per_address: Counts,
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

/// One client address's share of the pool, held by its job until the job has run.
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

impl HashPool {
    /// Starts `size.threads` hashing threads (at least one).
    pub fn start(size: PoolSize) -> Result<Self, Error> {
        let (jobs, receiver) = mpsc::sync_channel::<Job>(size.queue.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..size.threads.max(1) {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("password-hash-{n}"))
                .spawn(move || {
                    let mut memory = Vec::new();
                    loop {
                        // Only the waiting thread holds the lock; a job runs after it is released.
                        let job = receiver.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return, // every sender is gone: the pool was dropped
                        }
                    }
                })
                .map_err(|e| Error::Hash(format!("cannot start a password-hashing thread: {e}")))?;
        }
        Ok(Self {
            jobs,
            size,
            per_address: Arc::default(),
        })
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

    /// Queues `work` for `peer` (or for nobody's account) without waiting for room, and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        peer: Option<IpAddr>,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let slot = peer.map(|p| self.slot(p)).transpose()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let result = work(memory);
            // Free the slot before answering, so that the client may start its next check at once.
            drop(slot);
            let _ = reply.send(result);
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(HashError::Saturated {
                    queue: self.size.queue,
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(stopped().into()),
        }
        answer.await.map_err(|_| stopped().into())
    }

    /// Queues `work`, waiting for room in the queue if it is full, and blocks until it ran. Not for async code.
    fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = reply.send(work(memory));
        });
        self.jobs.send(job).map_err(|_| stopped())?;
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

    /// Whether `password` matches the PHC string `hash`, counting the job against `peer`'s share.
    pub async fn verify(
        &self,
        peer: Option<IpAddr>,
        password: String,
        hash: Arc<str>,
    ) -> Result<bool, HashError> {
        self.run(peer, move |memory| verify_with(memory, &password, &hash))
            .await
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
        // Give both time to take their slots.
        tokio::time::sleep(Duration::from_millis(5)).await;
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
        assert!(saturated >= 1, "seven jobs fit in one thread and a queue of two");
        assert!(
            pool.per_address.lock().unwrap().is_empty(),
            "every slot was returned"
        );
        assert!(pool.verify(Some(flooder), "pw".into(), hash).await.unwrap());
    }
}
