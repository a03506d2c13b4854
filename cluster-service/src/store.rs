//! The cluster's embedded SQLite store (`<data-dir>/cluster.db`, WAL mode) with its schema migrations.
//!
//! rusqlite is synchronous: every call runs on the blocking thread pool (`tokio::task::spawn_blocking`), holding
//! the one connection's lock, so read-modify-write sequences are atomic.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

/// Schema migrations in order; the index + 1 is the version recorded in `schema_version`.
const MIGRATIONS: &[&str] = &["CREATE TABLE identity (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );"];

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

impl Store {
    /// Opens (creating if needed) `<data_dir>/cluster.db` and migrates it.
    pub async fn open(data_dir: PathBuf) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir)).await?
    }

    fn open_blocking(data_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("cluster.db");
        let (mut conn, mode) = oakestra_protocol::sqlite::open(&path)?;
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

/// Applies the migrations the database has not seen yet.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    for version in oakestra_protocol::sqlite::migrate(conn, MIGRATIONS)? {
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}
