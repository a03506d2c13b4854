//! Root's address bookkeeping: the in-memory pools (service/instance IPv4, round-robin and instance IPv6, worker
//! subnets) mirrored row by row in the `addresses` table, and cluster interests in jobs.
//!
//! The table is the truth: pools are rebuilt from it at start. Every allocation is recorded in the same
//! transaction as the row that uses it; callers free pool entries only after their transaction committed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use oakestra_protocol::addr::{
    AddrError,
    alloc::{InstanceIpv6Pool, PolicyIpv6Pool, ServiceIpv4Pool, WorkerSubnetV4Pool, WorkerSubnetV6Pool},
    plan::{WorkerSubnetV4, WorkerSubnetV6},
    policy::BalancingPolicy,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{
    Store,
    apps::{self, ServiceRow},
    clusters::{self, ClusterRow},
};
use crate::Error;

/// Which pool an `addresses` row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Service round-robin and instance IPv4 (one pool, as in the reference).
    ServiceV4,
    /// Round-robin service IPv6.
    RoundRobinV6,
    /// Instance IPv6.
    InstanceV6,
    /// Worker subnets, IPv4.
    SubnetV4,
    /// Worker subnets, IPv6.
    SubnetV6,
}

impl PoolKind {
    /// The `addresses.pool` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceV4 => "service_v4",
            Self::RoundRobinV6 => "rr_v6",
            Self::InstanceV6 => "instance_v6",
            Self::SubnetV4 => "subnet_v4",
            Self::SubnetV6 => "subnet_v6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::ServiceV4,
            Self::RoundRobinV6,
            Self::InstanceV6,
            Self::SubnetV4,
            Self::SubnetV6,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// The address pools.
#[derive(Debug)]
pub struct Pools {
    /// Service and instance IPv4, `10.30.0.0/16`.
    pub service_v4: ServiceIpv4Pool,
    /// Round-robin service IPv6, `fdff:2000::/21`.
    pub rr_v6: PolicyIpv6Pool,
    /// Instance IPv6, `fdff::/20`.
    pub instance_v6: InstanceIpv6Pool,
    /// Worker /26 subnets.
    pub subnet_v4: WorkerSubnetV4Pool,
    /// Worker /120 subnets.
    pub subnet_v6: WorkerSubnetV6Pool,
}

impl Pools {
    /// Empty pools.
    pub fn new() -> Self {
        Self {
            service_v4: ServiceIpv4Pool::new(),
            rr_v6: PolicyIpv6Pool::new(BalancingPolicy::ROUND_ROBIN),
            instance_v6: InstanceIpv6Pool::new(),
            subnet_v4: WorkerSubnetV4Pool::new(),
            subnet_v6: WorkerSubnetV6Pool::new(),
        }
    }

    /// Pools holding every address recorded in the `addresses` table.
    pub fn load(conn: &Connection) -> Result<Self, Error> {
        let mut pools = Self::new();
        let mut stmt = conn.prepare("SELECT address, pool FROM addresses")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (address, pool) = row?;
            let kind = PoolKind::parse(&pool).ok_or_else(|| corrupt(&address, &pool))?;
            pools.mark(kind, &address).map_err(|_| corrupt(&address, &pool))?;
        }
        Ok(pools)
    }

    /// Marks `address` used in `kind` (restoring from the table, or taking a user-chosen address).
    pub fn mark(&mut self, kind: PoolKind, address: &str) -> Result<(), AddrError> {
        let invalid = || AddrError::InvalidSubnet {
            input: address.to_owned(),
        };
        match kind {
            PoolKind::ServiceV4 => self.service_v4.reserve(address.parse().map_err(|_| invalid())?),
            PoolKind::RoundRobinV6 => self.rr_v6.reserve(address.parse().map_err(|_| invalid())?),
            PoolKind::InstanceV6 => self.instance_v6.reserve(address.parse().map_err(|_| invalid())?),
            PoolKind::SubnetV4 => self
                .subnet_v4
                .reserve(WorkerSubnetV4::try_from(address.to_owned())?),
            PoolKind::SubnetV6 => self
                .subnet_v6
                .reserve(WorkerSubnetV6::try_from(address.to_owned())?),
        }
    }

    /// Returns `address` to `kind`'s pool; unknown or already-free addresses are ignored (freeing is idempotent).
    pub fn release(&mut self, kind: PoolKind, address: &str) {
        let _ = match kind {
            PoolKind::ServiceV4 => address
                .parse::<Ipv4Addr>()
                .map_or(Ok(()), |a| self.service_v4.free(a)),
            PoolKind::RoundRobinV6 => address.parse::<Ipv6Addr>().map_or(Ok(()), |a| self.rr_v6.free(a)),
            PoolKind::InstanceV6 => address
                .parse::<Ipv6Addr>()
                .map_or(Ok(()), |a| self.instance_v6.free(a)),
            PoolKind::SubnetV4 => {
                WorkerSubnetV4::try_from(address.to_owned()).map_or(Ok(()), |a| self.subnet_v4.free(a))
            }
            PoolKind::SubnetV6 => {
                WorkerSubnetV6::try_from(address.to_owned()).map_or(Ok(()), |a| self.subnet_v6.free(a))
            }
        };
    }

    /// Takes the next free address of `kind`, as text (subnets as their network address).
    pub fn take(&mut self, kind: PoolKind) -> Result<String, AddrError> {
        Ok(match kind {
            PoolKind::ServiceV4 => self.service_v4.allocate()?.to_string(),
            PoolKind::RoundRobinV6 => self.rr_v6.allocate()?.to_string(),
            PoolKind::InstanceV6 => self.instance_v6.allocate()?.to_string(),
            PoolKind::SubnetV4 => self.subnet_v4.allocate()?.network_addr().to_string(),
            PoolKind::SubnetV6 => self.subnet_v6.allocate()?.network_addr().to_string(),
        })
    }
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

fn corrupt(address: &str, pool: &str) -> Error {
    Error::Corrupt {
        path: "root.db".into(),
        what: format!("addresses row {address:?} in pool {pool:?} does not fit the address plan"),
    }
}

/// Who an address belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// The service (for service and instance addresses).
    pub service_id: Option<String>,
    /// The instance number (instance addresses).
    pub instance: Option<i64>,
    /// The cluster (worker subnets).
    pub cluster_id: Option<String>,
    /// The worker (worker subnets).
    pub worker: Option<String>,
}

/// Addresses taken during one transaction; given back to the pools if the transaction does not commit.
#[derive(Debug, Default)]
pub struct Taken(Vec<(PoolKind, String)>);

impl Taken {
    /// Gives every taken address back (after a failed transaction).
    pub fn undo(self, pools: &mut Pools) {
        for (kind, address) in self.0 {
            pools.release(kind, &address);
        }
    }
}

/// Allocates the next address of `kind` for `owner` and records it in `tx`.
pub fn allocate(
    tx: &Transaction<'_>,
    pools: &mut Pools,
    taken: &mut Taken,
    kind: PoolKind,
    owner: &Owner,
) -> Result<String, Error> {
    let address = pools.take(kind).map_err(Error::Address)?;
    taken.0.push((kind, address.clone()));
    record(tx, kind, &address, owner)?;
    Ok(address)
}

/// Records a user-chosen `address` for `owner`: 409 when another owner holds it.
pub fn claim(
    tx: &Transaction<'_>,
    pools: &mut Pools,
    taken: &mut Taken,
    kind: PoolKind,
    address: &str,
    owner: &Owner,
) -> Result<(), Error> {
    let holder: Option<Option<String>> = tx
        .query_row(
            "SELECT service_id FROM addresses WHERE address = ?1",
            [address],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(holder) = holder {
        return Err(Error::Conflict {
            message: format!(
                "address {address} is already used by service {}",
                holder.unwrap_or_else(|| "(a worker subnet)".into())
            ),
        });
    }
    pools.mark(kind, address).map_err(|e| Error::BadRequest {
        message: format!("address {address}: {e}"),
    })?;
    taken.0.push((kind, address.to_owned()));
    record(tx, kind, address, owner)
}

fn record(tx: &Transaction<'_>, kind: PoolKind, address: &str, owner: &Owner) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO addresses (address, pool, service_id, instance, cluster_id, worker)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            address,
            kind.as_str(),
            owner.service_id,
            owner.instance,
            owner.cluster_id,
            owner.worker
        ],
    )?;
    Ok(())
}

/// Deletes the address rows of a service (`instance = None`: all of them, service and instance addresses) or of
/// one instance, returning them so the caller frees them from the pools after committing.
pub fn remove_owned(
    tx: &Transaction<'_>,
    service_id: &str,
    instance: Option<i64>,
) -> Result<Vec<(PoolKind, String)>, Error> {
    let mut freed = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT address, pool FROM addresses WHERE service_id = ?1 AND (?2 IS NULL OR instance = ?2)",
        )?;
        let rows = stmt.query_map(params![service_id, instance], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for row in rows {
            let (address, pool) = row?;
            if let Some(kind) = PoolKind::parse(&pool) {
                freed.push((kind, address));
            }
        }
    }
    tx.execute(
        "DELETE FROM addresses WHERE service_id = ?1 AND (?2 IS NULL OR instance = ?2)",
        params![service_id, instance],
    )?;
    Ok(freed)
}

/// The worker subnet pair of `(cluster_id, worker)`: the one already recorded, or a new one. Without a worker id
/// every call hands out a new pair (the reference's behaviour).
pub fn subnet_for(
    conn: &mut Connection,
    pools: &mut Pools,
    cluster_id: &str,
    worker: Option<&str>,
) -> Result<(String, String), Error> {
    if let Some(worker) = worker {
        let mut stmt = conn.prepare(
            "SELECT address, pool FROM addresses WHERE cluster_id = ?1 AND worker = ?2 AND pool IN ('subnet_v4', 'subnet_v6')",
        )?;
        let rows = stmt
            .query_map(params![cluster_id, worker], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let v4 = rows
            .iter()
            .find(|(_, p)| p == "subnet_v4")
            .map(|(a, _)| a.clone());
        let v6 = rows
            .iter()
            .find(|(_, p)| p == "subnet_v6")
            .map(|(a, _)| a.clone());
        if let (Some(v4), Some(v6)) = (v4, v6) {
            return Ok((v4, v6));
        }
    }
    let owner = Owner {
        cluster_id: Some(cluster_id.to_owned()),
        worker: worker.map(str::to_owned),
        ..Owner::default()
    };
    let tx = conn.transaction()?;
    let mut taken = Taken::default();
    let result = (|| {
        if let Some(worker) = worker {
            // A half pair (one family lost) is replaced whole.
            tx.execute(
                "DELETE FROM addresses WHERE cluster_id = ?1 AND worker = ?2",
                params![cluster_id, worker],
            )?;
        }
        let v4 = allocate(&tx, pools, &mut taken, PoolKind::SubnetV4, &owner)?;
        let v6 = allocate(&tx, pools, &mut taken, PoolKind::SubnetV6, &owner)?;
        Ok::<_, Error>((v4, v6))
    })();
    match result.and_then(|pair| tx.commit().map(|()| pair).map_err(Error::from)) {
        Ok(pair) => Ok(pair),
        Err(e) => {
            taken.undo(pools);
            Err(e)
        }
    }
}

/// Gives `worker`'s subnet pair (of cluster `cluster_id`) back to the pools; returns how many subnets were freed
/// (0 when it had none: releasing is idempotent).
pub fn release_subnets(
    conn: &mut Connection,
    pools: &mut Pools,
    cluster_id: &str,
    worker: &str,
) -> Result<usize, Error> {
    let tx = conn.transaction()?;
    let rows = {
        let mut stmt = tx.prepare(
            "SELECT address, pool FROM addresses WHERE cluster_id = ?1 AND worker = ?2 AND pool IN ('subnet_v4', 'subnet_v6')",
        )?;
        stmt.query_map(params![cluster_id, worker], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    tx.execute(
        "DELETE FROM addresses WHERE cluster_id = ?1 AND worker = ?2 AND pool IN ('subnet_v4', 'subnet_v6')",
        params![cluster_id, worker],
    )?;
    tx.commit()?;
    for (address, pool) in &rows {
        if let Some(kind) = PoolKind::parse(pool) {
            pools.release(kind, address);
        }
    }
    Ok(rows.len())
}

/// Records that `cluster_id` wants updates about `job_name`.
pub fn add_interest(conn: &Connection, job_name: &str, cluster_id: &str) -> Result<(), Error> {
    conn.execute(
        "INSERT OR IGNORE INTO interests (job_name, cluster_id) VALUES (?1, ?2)",
        params![job_name, cluster_id],
    )?;
    Ok(())
}

/// Drops `cluster_id`'s interest in `job_name`; whether there was one.
pub fn remove_interest(conn: &Connection, job_name: &str, cluster_id: &str) -> Result<bool, Error> {
    Ok(conn.execute(
        "DELETE FROM interests WHERE job_name = ?1 AND cluster_id = ?2",
        params![job_name, cluster_id],
    )? > 0)
}

/// The clusters interested in `job_name`.
pub fn interested(conn: &Connection, job_name: &str) -> Result<Vec<String>, Error> {
    let mut stmt =
        conn.prepare("SELECT cluster_id FROM interests WHERE job_name = ?1 ORDER BY cluster_id")?;
    let rows = stmt.query_map([job_name], |r| r.get(0))?;
    Ok(rows.collect::<Result<Vec<String>, _>>()?)
}

/// The clusters interested in `job_name`.
pub fn interested_clusters(conn: &Connection, job_name: &str) -> Result<Vec<ClusterRow>, Error> {
    interested(conn, job_name)?
        .iter()
        .filter_map(|id| clusters::by_id(conn, id).transpose())
        .collect()
}

/// The service owning `ip` (as its round-robin or instance address), with the instance number for instance
/// addresses. Any spelling of an IPv6 address matches.
pub fn owner_of_ip(conn: &Connection, ip: IpAddr) -> Result<Option<(String, Option<i64>)>, Error> {
    Ok(conn
        .query_row(
            "SELECT service_id, instance FROM addresses WHERE address = ?1 AND service_id IS NOT NULL",
            [ip.to_string()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()?)
}

// ---------------------------------------------------------------------------------------------------------------
// The store's methods over addresses and interests
// ---------------------------------------------------------------------------------------------------------------

/// How a cluster names the job it asks about.
#[derive(Debug, Clone)]
pub enum JobLookup {
    /// By job name.
    Name(String),
    /// By one of its service or instance addresses.
    Address(IpAddr),
}

impl Store {
    /// The worker subnet pair of `(cluster_id, worker)` (see [`subnet_for`]).
    pub async fn worker_subnet(
        &self,
        cluster_id: String,
        worker: Option<String>,
    ) -> Result<(String, String), Error> {
        self.with(move |inner| subnet_for(&mut inner.conn, &mut inner.pools, &cluster_id, worker.as_deref()))
            .await
    }

    /// Gives `worker`'s subnet pair back to the pools (see [`release_subnets`]); how many subnets were freed.
    pub async fn release_worker_subnets(&self, cluster_id: String, worker: String) -> Result<usize, Error> {
        self.with(move |inner| release_subnets(&mut inner.conn, &mut inner.pools, &cluster_id, &worker))
            .await
    }

    /// The job `lookup` names, recording `cluster_id`'s interest in it in the same step.
    pub async fn job_for_cluster(
        &self,
        lookup: JobLookup,
        cluster_id: String,
    ) -> Result<Option<ServiceRow>, Error> {
        self.with(move |inner| {
            let service = match lookup {
                JobLookup::Name(name) => apps::service_by_job_name(&inner.conn, &name)?,
                JobLookup::Address(ip) => match owner_of_ip(&inner.conn, ip)? {
                    Some((service_id, _)) => apps::service(&inner.conn, &service_id)?,
                    None => None,
                },
            };
            if let Some(s) = &service {
                add_interest(&inner.conn, &s.job_name, &cluster_id)?;
            }
            Ok(service)
        })
        .await
    }

    /// Drops `cluster_id`'s interest in `job_name`; whether there was one.
    pub async fn remove_interest(&self, job_name: String, cluster_id: String) -> Result<bool, Error> {
        self.with(move |inner| remove_interest(&inner.conn, &job_name, &cluster_id))
            .await
    }
}
