//! The embedded SQLite store (`<data-dir>/root.db`, WAL mode): schema migrations, the default data, and the
//! in-memory address pools that mirror the `addresses` table.
//!
//! rusqlite is synchronous: every public method runs its statement on the blocking thread pool
//! (`tokio::task::spawn_blocking`), never on the async runtime. One mutex guards the connection and the pools
//! together, so an allocation and the row recording it commit (or roll back) as one step, and read-modify-write
//! sequences such as taking the next instance number are atomic.
//!
//! Handlers and the engine call the named [`Store`] methods (each submodule ends with those over its tables): the
//! method that takes the lock and hands out the connection is private to this module, so no SQL runs elsewhere.
//!
//! - [`apps`]: applications, services (jobs) and instances.
//! - [`clusters`]: registered clusters and their reports.
//! - [`net`]: service/instance addresses, worker subnets, interests.
//! - [`tokens`]: token generations (how tokens are revoked) and their in-memory copy.
//! - [`users`]: users, organizations and memberships.

pub mod apps;
pub mod clusters;
pub mod net;
pub mod tokens;
pub mod users;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{Error, hashing::HashPool};

pub use self::{net::Pools, tokens::Generations};

/// The four roles Oakestra knows.
pub const ALL_ROLES: [&str; 4] = [
    "Admin",
    "Organization_Admin",
    "Application_Provider",
    "Infrastructure_Provider",
];
/// The user created at every start if absent.
pub const ADMIN_USER: &str = "Admin";
/// Its password unless `--admin-password` says otherwise.
pub const DEFAULT_ADMIN_PASSWORD: &str = "Admin";
/// The organization created at every start if absent.
pub const ROOT_ORG: &str = "root";

/// Schema migrations, applied in order; the index + 1 is the schema version recorded in `schema_version`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE users (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        email TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL
    );
    CREATE TABLE organizations (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE
    );
    CREATE TABLE memberships (
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        org_id TEXT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
        roles TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(roles)),
        PRIMARY KEY (user_id, org_id)
    );",
    "CREATE TABLE applications (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        namespace TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        owner TEXT NOT NULL,
        organization TEXT NOT NULL DEFAULT '',
        extra TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(extra)),
        created INTEGER NOT NULL,
        UNIQUE (name, namespace, owner)
    );
    CREATE TABLE services (
        id TEXT PRIMARY KEY NOT NULL,
        app_id TEXT NOT NULL REFERENCES applications(id) ON DELETE CASCADE,
        job_name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL CHECK (json_valid(doc)),
        status TEXT NOT NULL,
        status_detail TEXT NOT NULL DEFAULT '',
        next_instance INTEGER NOT NULL DEFAULT 0,
        rr_ip TEXT,
        rr_ip_v6 TEXT,
        created INTEGER NOT NULL
    );
    CREATE INDEX services_app ON services(app_id);
    CREATE TABLE instances (
        service_id TEXT NOT NULL REFERENCES services(id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        cluster_id TEXT,
        status TEXT NOT NULL,
        status_detail TEXT NOT NULL DEFAULT '',
        instance_ip TEXT,
        instance_ip_v6 TEXT,
        tried TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tried)),
        report TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(report)),
        net TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(net)),
        placed INTEGER,
        updated INTEGER NOT NULL,
        PRIMARY KEY (service_id, number)
    );
    CREATE INDEX instances_cluster ON instances(cluster_id);
    CREATE TABLE clusters (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        location TEXT NOT NULL DEFAULT '',
        address TEXT NOT NULL,
        manager_port INTEGER NOT NULL,
        network_port INTEGER NOT NULL,
        token TEXT NOT NULL,
        registered INTEGER NOT NULL,
        last_report INTEGER,
        aggregate TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(aggregate)),
        cpu_history TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(cpu_history)),
        memory_history TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(memory_history))
    );
    CREATE TABLE addresses (
        address TEXT PRIMARY KEY NOT NULL,
        pool TEXT NOT NULL,
        service_id TEXT,
        instance INTEGER,
        cluster_id TEXT,
        worker TEXT
    );
    CREATE INDEX addresses_service ON addresses(service_id, instance);
    CREATE TABLE interests (
        job_name TEXT NOT NULL,
        cluster_id TEXT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        PRIMARY KEY (job_name, cluster_id)
    );",
    // Token revocation (see `tokens`): each user's generation, and the counter they are drawn from.
    "ALTER TABLE users ADD COLUMN token_gen INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE token_generation (
        id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
        last INTEGER NOT NULL
    );
    INSERT INTO token_generation (id, last) VALUES (1, 0);",
];

/// A user as the server sees it. The password hash stays inside the server.
#[derive(Debug, Clone)]
pub struct User {
    /// 24 lowercase hex digits.
    pub id: String,
    /// Unique user name.
    pub name: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    /// The token generation every valid token of this user carries (see [`tokens`]).
    pub token_gen: i64,
}

/// An organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    /// 24 lowercase hex digits.
    pub id: String,
    /// Unique name.
    pub name: String,
}

/// What the store's mutex guards: the connection and the address pools mirroring the `addresses` table.
#[derive(Debug)]
pub struct Inner {
    /// The SQLite connection.
    pub conn: Connection,
    /// The address pools.
    pub pools: Pools,
    /// Every user's token generation; changed together with the rows, under this lock.
    pub generations: Arc<Generations>,
}

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
    /// The same as `Inner::generations`, read without the store's lock.
    generations: Arc<Generations>,
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/root.db` and migrates it. The data directory is created as (or
    /// tightened to) 0700, the database files 0600. Blocking: call it from a blocking context.
    pub fn open_blocking(data_dir: &Path) -> Result<Self, Error> {
        let tightened =
            oakestra_runtime::owner_only::create_private_dir(data_dir).map_err(|source| Error::Io {
                path: data_dir.to_path_buf(),
                source,
            })?;
        if let Some(was) = tightened {
            tracing::warn!(
                path = %data_dir.display(),
                was = format_args!("{was:04o}"),
                "others could read the data directory: tightened its mode to 0700"
            );
        }
        let path = data_dir.join("root.db");
        let db = |source| Error::Db {
            path: path.clone(),
            source,
        };
        let (mut conn, mode) = oakestra_runtime::sqlite::open(&path).map_err(db)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, path = %path.display(), "SQLite refused WAL mode");
        }
        migrate(&mut conn).map_err(db)?;
        let pools = Pools::load(&conn)?;
        let generations = Arc::new(Generations::load(&conn)?);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                conn,
                pools,
                generations: Arc::clone(&generations),
            })),
            path,
            generations,
        })
    }

    /// Every user's current token generation (what access tokens are checked against).
    pub fn generations(&self) -> &Arc<Generations> {
        &self.generations
    }

    /// Opens the store on the blocking pool.
    pub async fn open(data_dir: PathBuf) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir)).await?
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection and pools on the blocking pool, holding the store's lock. Private to the store:
    /// everything outside calls the named methods, so no SQL runs outside this module.
    async fn with<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied statement behind (SQLite rolls it back),
            // and pool changes are only made after the statements they mirror succeeded, so a poisoned lock is
            // safe to reuse.
            let mut guard = inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .await?
    }

    /// Creates the default data if absent: organization `root`, user `Admin` and Admin's membership with all four
    /// roles. With `admin_password` the Admin password is set to it (also when Admin exists; a different password
    /// revokes Admin's tokens, the same one leaves them valid). Returns whether Admin's password is still the
    /// default `Admin`.
    pub async fn ensure_defaults(
        &self,
        admin_password: Option<String>,
        hasher: Arc<HashPool>,
    ) -> Result<bool, Error> {
        let path = self.path.clone();
        self.with(move |inner| {
            let db = |source| Error::Db {
                path: path.clone(),
                source,
            };
            let tx = inner.conn.transaction().map_err(db)?;
            let org_id = match tx
                .query_row("SELECT id FROM organizations WHERE name = ?1", [ROOT_ORG], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
                .map_err(db)?
            {
                Some(id) => id,
                None => {
                    let id = new_id()?;
                    tx.execute(
                        "INSERT INTO organizations (id, name) VALUES (?1, ?2)",
                        params![id, ROOT_ORG],
                    )
                    .map_err(db)?;
                    tracing::info!(org = ROOT_ORG, %id, "created the default organization");
                    id
                }
            };
            let existing = tx
                .query_row(
                    "SELECT id, password_hash FROM users WHERE name = ?1",
                    [ADMIN_USER],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
                .map_err(db)?;
            let mut generation = None;
            let (user_id, hash) = match (existing, admin_password) {
                (Some((id, hash)), Some(pw)) if hasher.verify_blocking(&pw, &hash)? => (id, hash),
                (Some((id, _)), Some(pw)) => {
                    let hash = hasher.hash_blocking(&pw)?;
                    tx.execute(
                        "UPDATE users SET password_hash = ?1 WHERE id = ?2",
                        params![hash, id],
                    )
                    .map_err(db)?;
                    generation = tokens::revoke(&tx, &id)?.map(|(_, g)| g);
                    tracing::info!(
                        user = ADMIN_USER,
                        "Admin password set from --admin-password; Admin's tokens revoked"
                    );
                    (id, hash)
                }
                (Some(existing), None) => existing,
                (None, pw) => {
                    let id = new_id()?;
                    let hash = hasher.hash_blocking(pw.as_deref().unwrap_or(DEFAULT_ADMIN_PASSWORD))?;
                    let g = tokens::next_generation(&tx)?;
                    tx.execute(
                        "INSERT INTO users (id, name, password_hash, email, created_at, token_gen)
                         VALUES (?1, ?2, ?3, '', ?4, ?5)",
                        params![id, ADMIN_USER, hash, now_unix_secs(), g],
                    )
                    .map_err(db)?;
                    generation = Some(g);
                    tracing::info!(user = ADMIN_USER, %id, "created the default user");
                    (id, hash)
                }
            };
            let roles = serde_json::to_string(&ALL_ROLES).unwrap_or_else(|_| "[]".into());
            tx.execute(
                "INSERT OR IGNORE INTO memberships (user_id, org_id, roles) VALUES (?1, ?2, ?3)",
                params![user_id, org_id, roles],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            if let Some(g) = generation {
                inner.generations.set(ADMIN_USER, g);
            }
            hasher.verify_blocking(DEFAULT_ADMIN_PASSWORD, &hash)
        })
        .await
    }

    /// The user called `name`, if any.
    pub async fn user_by_name(&self, name: String) -> Result<Option<User>, Error> {
        let path = self.path.clone();
        self.with(move |inner| {
            inner
                .conn
                .query_row(
                    "SELECT id, name, password_hash, token_gen FROM users WHERE name = ?1",
                    [name],
                    user_from_row,
                )
                .optional()
                .map_err(|source| Error::Db { path, source })
        })
        .await
    }

    /// The user with id `id`, if any.
    pub async fn user_by_id(&self, id: String) -> Result<Option<User>, Error> {
        self.with(move |inner| {
            Ok(inner
                .conn
                .query_row(
                    "SELECT id, name, password_hash, token_gen FROM users WHERE id = ?1",
                    [id],
                    user_from_row,
                )
                .optional()?)
        })
        .await
    }

    /// The organization called `name`, if any.
    pub async fn organization_by_name(&self, name: String) -> Result<Option<Organization>, Error> {
        let path = self.path.clone();
        self.with(move |inner| {
            inner
                .conn
                .query_row(
                    "SELECT id, name FROM organizations WHERE name = ?1",
                    [name],
                    |r| {
                        Ok(Organization {
                            id: r.get(0)?,
                            name: r.get(1)?,
                        })
                    },
                )
                .optional()
                .map_err(|source| Error::Db { path, source })
        })
        .await
    }

    /// The roles `user_id` holds in `org_id`, or `None` when the user is not a member.
    pub async fn roles(&self, user_id: String, org_id: String) -> Result<Option<Vec<String>>, Error> {
        let path = self.path.clone();
        self.with(move |inner| {
            let raw: Option<String> = inner
                .conn
                .query_row(
                    "SELECT roles FROM memberships WHERE user_id = ?1 AND org_id = ?2",
                    params![user_id, org_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|source| Error::Db {
                    path: path.clone(),
                    source,
                })?;
            raw.map(|raw| {
                serde_json::from_str::<Vec<String>>(&raw).map_err(|e| Error::Corrupt {
                    path,
                    what: format!("memberships.roles = {raw:?}: {e}"),
                })
            })
            .transpose()
        })
        .await
    }
}

/// A [`User`] from `SELECT id, name, password_hash, token_gen`.
fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        password_hash: r.get(2)?,
        token_gen: r.get(3)?,
    })
}

/// Applies the migrations the database has not seen yet.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    for version in oakestra_runtime::sqlite::migrate(conn, MIGRATIONS)? {
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

pub use oakestra_runtime::time::now_ms;

/// A fresh id in MongoDB ObjectId shape (24 lowercase hex digits).
pub fn new_id() -> Result<String, Error> {
    oakestra_runtime::secret::object_id().map_err(|e| Error::Random(e.to_string()))
}

/// Current time as seconds since the Unix epoch, stored as text (no calendar crate needed).
fn now_unix_secs() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_object_id_shaped_and_unique() {
        let a = new_id().unwrap();
        let b = new_id().unwrap();
        assert_eq!(a.len(), 24);
        assert!(
            a.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn migrations_are_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, i64::try_from(MIGRATIONS.len()).unwrap());
    }
}
