//! The cluster's embedded SQLite store (`<data-dir>/cluster.db`, WAL mode) with its schema migrations.
//!
//! rusqlite is synchronous: every call runs on the blocking thread pool (`tokio::task::spawn_blocking`), holding
//! the one connection's lock, so read-modify-write sequences are atomic.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rusqlite::{Connection, OptionalExtension, params};

use serde_json::{Map, Value};

use crate::{
    Error,
    state::{Effect, Instance, NodeRecord},
};

/// Everything [`Store::load`] reads back at start.
#[derive(Debug, Default)]
pub struct Saved {
    /// The workers.
    pub nodes: Vec<NodeRecord>,
    /// (id, job name, document) of every job.
    pub jobs: Vec<(String, String, Map<String, Value>)>,
    /// (job id, instance) of every instance.
    pub instances: Vec<(String, Instance)>,
}

/// Schema migrations in order; the index + 1 is the version recorded in `schema_version`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE identity (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );",
    // Rows hold the records as JSON: the service reads them all at start and writes one row per change.
    "CREATE TABLE nodes (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        job_name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL
    );
    CREATE TABLE instances (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, number)
    );",
];

/// The cluster's identity at root: its id and its per-cluster secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cluster id root gave (stable per cluster name).
    pub id: String,
    /// The secret both sides present as `Authorization: Bearer`.
    pub token: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// Creates `dir` (and its parents) if needed and makes it 0700: it holds the database and the worker join token.
/// A directory found with looser permissions is tightened, with a log line.
pub fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "data directory was not private; now 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// The token kept in `path`: the one there (16 characters at least), or a new random one written there (0600).
pub fn load_or_create_secret(path: &Path) -> Result<String, Error> {
    oakestra_runtime::secret::load_or_create(path, 16, 32)
        .map(|t| t.token)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a secret to `path` with mode 0600 (also when the file existed with a looser mode).
pub fn write_secret(path: &Path, text: &str) -> Result<(), Error> {
    oakestra_runtime::secret::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/cluster.db` and migrates it.
    pub async fn open(data_dir: PathBuf) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir)).await?
    }

    fn open_blocking(data_dir: &Path) -> Result<Self, Error> {
        private_dir(data_dir)?;
        let path = data_dir.join("cluster.db");
        let (mut conn, mode) = oakestra_runtime::sqlite::open(&path)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, path = %path.display(), "SQLite refused WAL mode");
        }
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn with<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // SQLite rolls back a statement interrupted by a panic, so a poisoned lock is safe to reuse.
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
        .await?
    }

    /// The identity root gave this cluster, if it registered before.
    pub async fn identity(&self) -> Result<Option<Identity>, Error> {
        self.with(|conn| {
            let get = |key: &str| -> Result<Option<String>, Error> {
                Ok(conn
                    .query_row("SELECT value FROM identity WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?)
            };
            Ok(match (get("cluster_id")?, get("cluster_token")?) {
                (Some(id), Some(token)) => Some(Identity { id, token }),
                _ => None,
            })
        })
        .await
    }

    /// Records the identity root gave.
    pub async fn set_identity(&self, identity: Identity) -> Result<(), Error> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            for (key, value) in [("cluster_id", &identity.id), ("cluster_token", &identity.token)] {
                tx.execute(
                    "INSERT INTO identity (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

impl Store {
    /// A value of the small key-value table (the identity, the cluster's own MQTT secret).
    pub async fn setting(&self, key: &'static str) -> Result<Option<String>, Error> {
        self.with(move |conn| {
            Ok(conn
                .query_row("SELECT value FROM identity WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    /// Sets a value of the key-value table.
    pub async fn set_setting(&self, key: &'static str, value: String) -> Result<(), Error> {
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO identity (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
        .await
    }

    /// Reads every worker, job and instance. A row that no longer parses is logged and skipped, never fatal.
    pub async fn load(&self) -> Result<Saved, Error> {
        self.with(|conn| {
            let mut saved = Saved::default();
            let mut stmt = conn.prepare("SELECT id, record FROM nodes")?;
            for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                let (id, text) = row?;
                match serde_json::from_str(&text) {
                    Ok(record) => saved.nodes.push(record),
                    Err(e) => tracing::error!(node = %id, error = %e, "unreadable worker row skipped"),
                }
            }
            let mut stmt = conn.prepare("SELECT id, job_name, doc FROM jobs")?;
            for row in stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })? {
                let (id, name, text) = row?;
                match serde_json::from_str(&text) {
                    Ok(doc) => saved.jobs.push((id, name, doc)),
                    Err(e) => tracing::error!(job = %id, error = %e, "unreadable job row skipped"),
                }
            }
            let mut stmt = conn.prepare("SELECT job_id, number, body FROM instances")?;
            for row in stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
            })? {
                let (job, number, text) = row?;
                match serde_json::from_str(&text) {
                    Ok(instance) => saved.instances.push((job, instance)),
                    Err(e) => {
                        tracing::error!(job = %job, instance = number, error = %e, "unreadable instance row skipped");
                    }
                }
            }
            Ok(saved)
        })
        .await
    }

    /// Writes the database side of `effects` in one transaction (the others are ignored).
    pub async fn apply(&self, effects: Vec<Effect>) -> Result<(), Error> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            for effect in effects {
                match effect {
                    Effect::SaveNode(record) => {
                        tx.execute(
                            "INSERT INTO nodes (id, name, record) VALUES (?1, ?2, ?3)
                             ON CONFLICT (id) DO UPDATE SET name = excluded.name, record = excluded.record",
                            params![record.id, record.name, json(&record)?],
                        )?;
                    }
                    Effect::SaveJob { id, job_name, doc } => {
                        tx.execute(
                            "INSERT INTO jobs (id, job_name, doc) VALUES (?1, ?2, ?3)
                             ON CONFLICT (id) DO UPDATE SET job_name = excluded.job_name, doc = excluded.doc",
                            params![id, job_name, json(&doc)?],
                        )?;
                    }
                    Effect::DropJob { id } => {
                        tx.execute("DELETE FROM instances WHERE job_id = ?1", [&id])?;
                        tx.execute("DELETE FROM jobs WHERE id = ?1", [&id])?;
                    }
                    Effect::SaveInstance { job_id, instance } => {
                        tx.execute(
                            "INSERT INTO instances (job_id, number, body) VALUES (?1, ?2, ?3)
                             ON CONFLICT (job_id, number) DO UPDATE SET body = excluded.body",
                            params![job_id, instance.instance_number, json(&instance)?],
                        )?;
                    }
                    Effect::DropInstance { job_id, number } => {
                        tx.execute(
                            "DELETE FROM instances WHERE job_id = ?1 AND number = ?2",
                            params![job_id, number],
                        )?;
                    }
                    Effect::DropNode { node, .. } => {
                        tx.execute("DELETE FROM nodes WHERE id = ?1", [&node])?;
                    }
                    _ => {}
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

/// A record as the JSON text of its row.
fn json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| Error::Encode(e.to_string()))
}

/// Applies the migrations the database has not seen yet.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    for version in oakestra_runtime::sqlite::migrate(conn, MIGRATIONS)? {
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}
