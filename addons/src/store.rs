//! The addons' records in the tier's own SQLite database (root.db or cluster.db, own tables and own migration
//! counter): marketplace entries and installed addons. Every call runs on the blocking pool.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use oakestra_protocol::addons::{AddonSpec, AddonStatus, MarketplaceStatus};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;

/// The addons' schema, versioned in `addons_schema_version` (apart from the tier's `schema_version`).
const MIGRATIONS: &[&str] = &["CREATE TABLE addon_marketplace (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        status_details TEXT NOT NULL DEFAULT '{}',
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE addons (
        id TEXT PRIMARY KEY NOT NULL,
        marketplace_id TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        status_details TEXT NOT NULL DEFAULT '{}',
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );"];

/// A marketplace entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarketplaceEntry {
    /// 24 hex digits.
    #[serde(rename = "_id")]
    pub id: String,
    /// The published descriptor.
    #[serde(flatten)]
    pub spec: AddonSpec,
    /// Review state.
    pub status: MarketplaceStatus,
    /// Why verification failed, and what was checked.
    #[serde(default)]
    pub status_details: Map<String, Value>,
}

/// An installed addon as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Addon {
    /// 24 hex digits.
    #[serde(rename = "_id")]
    pub id: String,
    /// The marketplace entry it was installed from.
    pub marketplace_id: String,
    /// The descriptor, copied at install time.
    #[serde(flatten)]
    pub spec: AddonSpec,
    /// Lifecycle state.
    pub status: AddonStatus,
    /// What the monitor found (failed services, their logs, restarts).
    #[serde(default)]
    pub status_details: Map<String, Value>,
}

/// The addons tables, behind one connection.
#[derive(Debug, Clone)]
pub struct AddonStore {
    conn: Arc<Mutex<Connection>>,
}

/// Current time in milliseconds since the Unix epoch.
pub use oakestra_runtime::time::now_ms;

/// A fresh id in MongoDB ObjectId shape (24 hex digits: 4 bytes of Unix seconds, 8 random bytes).
pub fn new_id() -> Result<String, Error> {
    oakestra_runtime::secret::object_id().map_err(|e| Error::Random(e.to_string()))
}

fn json_text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

fn read_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn corrupt(what: &str, id: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what} {id}: {e}"))
}

fn entry_from(
    (id, spec, status, details): (String, String, String, String),
) -> Result<MarketplaceEntry, Error> {
    Ok(MarketplaceEntry {
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("marketplace entry", &id, e))?,
        status: MarketplaceStatus::parse(&status)
            .ok_or_else(|| corrupt("marketplace entry", &id, &status))?,
        status_details: serde_json::from_str(&details).unwrap_or_default(),
        id,
    })
}

fn addon_from(
    (id, spec, status, details): (String, String, String, String),
    marketplace_id: String,
) -> Result<Addon, Error> {
    Ok(Addon {
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("addon", &id, e))?,
        status: AddonStatus::parse(&status).ok_or_else(|| corrupt("addon", &id, &status))?,
        status_details: serde_json::from_str(&details).unwrap_or_default(),
        marketplace_id,
        id,
    })
}

const ADDON_COLUMNS: &str = "id, spec, status, status_details, marketplace_id";

fn addon_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<((String, String, String, String), String)> {
    Ok((read_entry(row)?, row.get(4)?))
}

impl AddonStore {
    /// Opens the tier's database at `path` (already created by the tier) and applies the addons' migrations.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = |e: rusqlite::Error| Error::Db(format!("{}: {e}", path.display()));
        let (mut conn, _mode) = oakestra_runtime::sqlite::open(path).map_err(db)?;
        for version in oakestra_runtime::sqlite::migrate_in(&mut conn, "addons_schema_version", MIGRATIONS)
            .map_err(db)?
        {
            tracing::info!(version, "applied addons schema migration");
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .map_err(|e| Error::Db(format!("database task failed: {e}")))?
    }

    /// Stores a new entry `under_review`; `None` if the name is taken.
    pub async fn publish(&self, spec: AddonSpec) -> Result<Option<MarketplaceEntry>, Error> {
        let id = new_id()?;
        self.with(move |c| {
            let now = now_ms();
            let done = c.execute(
                "INSERT INTO addon_marketplace (id, name, spec, status, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (name) DO NOTHING",
                params![
                    id,
                    spec.name,
                    json_text(&spec),
                    MarketplaceStatus::UnderReview.as_str(),
                    now
                ],
            )?;
            Ok((done == 1).then(|| MarketplaceEntry {
                id,
                spec,
                status: MarketplaceStatus::UnderReview,
                status_details: Map::new(),
            }))
        })
        .await
    }

    /// Marketplace entries, optionally only those with `status` or named `name`, oldest first.
    pub async fn entries(
        &self,
        status: Option<MarketplaceStatus>,
        name: Option<String>,
    ) -> Result<Vec<MarketplaceEntry>, Error> {
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, spec, status, status_details FROM addon_marketplace
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR name = ?2) ORDER BY created_ms, id",
            )?;
            let rows = stmt
                .query_map(params![status.map(MarketplaceStatus::as_str), name], read_entry)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(entry_from).collect()
        })
        .await
    }

    /// One marketplace entry.
    pub async fn entry(&self, id: String) -> Result<Option<MarketplaceEntry>, Error> {
        self.with(move |c| {
            c.query_row(
                "SELECT id, spec, status, status_details FROM addon_marketplace WHERE id = ?1",
                [&id],
                read_entry,
            )
            .optional()?
            .map(entry_from)
            .transpose()
        })
        .await
    }

    /// Sets an entry's review result; false if it is gone.
    pub async fn set_entry_status(
        &self,
        id: String,
        status: MarketplaceStatus,
        details: Map<String, Value>,
    ) -> Result<bool, Error> {
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE addon_marketplace SET status = ?2, status_details = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, status.as_str(), json_text(&details), now_ms()],
            )? == 1)
        })
        .await
    }

    /// Removes an entry; false if there was none.
    pub async fn delete_entry(&self, id: String) -> Result<bool, Error> {
        self.with(move |c| Ok(c.execute("DELETE FROM addon_marketplace WHERE id = ?1", [&id])? == 1))
            .await
    }

    /// Records an installation `installing`; `None` if that marketplace entry is installed already.
    pub async fn install(&self, marketplace_id: String, spec: AddonSpec) -> Result<Option<Addon>, Error> {
        let id = new_id()?;
        self.with(move |c| {
            let now = now_ms();
            let done = c.execute(
                "INSERT INTO addons (id, marketplace_id, spec, status, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (marketplace_id) DO NOTHING",
                params![
                    id,
                    marketplace_id,
                    json_text(&spec),
                    AddonStatus::Installing.as_str(),
                    now
                ],
            )?;
            Ok((done == 1).then(|| Addon {
                id,
                marketplace_id,
                spec,
                status: AddonStatus::Installing,
                status_details: Map::new(),
            }))
        })
        .await
    }

    /// Installed addons, optionally only those with `status`, oldest first.
    pub async fn addons(&self, status: Option<AddonStatus>) -> Result<Vec<Addon>, Error> {
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {ADDON_COLUMNS} FROM addons WHERE (?1 IS NULL OR status = ?1) ORDER BY created_ms, id"
            ))?;
            let rows = stmt
                .query_map(params![status.map(AddonStatus::as_str)], addon_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(|(r, m)| addon_from(r, m)).collect()
        })
        .await
    }

    /// One installed addon.
    pub async fn addon(&self, id: String) -> Result<Option<Addon>, Error> {
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {ADDON_COLUMNS} FROM addons WHERE id = ?1"),
                [&id],
                addon_row,
            )
            .optional()?
            .map(|(r, m)| addon_from(r, m))
            .transpose()
        })
        .await
    }

    /// Sets an addon's state (and details, when given); `only_if` guards against a concurrent change (e.g. the
    /// monitor must not overwrite a `disabling` the user asked for meanwhile). Returns whether a row changed.
    pub async fn set_addon_status(
        &self,
        id: String,
        status: AddonStatus,
        details: Option<Map<String, Value>>,
        only_if: Option<AddonStatus>,
    ) -> Result<bool, Error> {
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE addons SET status = ?2, status_details = COALESCE(?3, status_details), updated_ms = ?4
                 WHERE id = ?1 AND (?5 IS NULL OR status = ?5)",
                params![
                    id,
                    status.as_str(),
                    details.as_ref().map(json_text),
                    now_ms(),
                    only_if.map(AddonStatus::as_str)
                ],
            )? == 1)
        })
        .await
    }

    /// Removes an addon's record; false if there was none.
    pub async fn delete_addon(&self, id: String) -> Result<bool, Error> {
        self.with(move |c| Ok(c.execute("DELETE FROM addons WHERE id = ?1", [&id])? == 1))
            .await
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Db(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use oakestra_protocol::addons::parse_spec;
    use serde_json::json;

    use super::*;

    fn spec(name: &str) -> AddonSpec {
        parse_spec(&json!({"name": name, "services": [{"service_name": "s", "image": "i"}]})).unwrap()
    }

    #[tokio::test]
    async fn entries_and_addons_persist_with_their_states() {
        let dir = std::env::temp_dir().join(format!("oak-addons-store-{}", new_id().unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let store = AddonStore::open(&path).unwrap();
        let e = store.publish(spec("a")).await.unwrap().unwrap();
        assert!(
            store.publish(spec("a")).await.unwrap().is_none(),
            "a duplicate name is refused"
        );
        assert!(
            store
                .entries(Some(MarketplaceStatus::Approved), None)
                .await
                .unwrap()
                .is_empty()
        );
        store
            .set_entry_status(e.id.clone(), MarketplaceStatus::Approved, Map::new())
            .await
            .unwrap();
        let a = store
            .install(e.id.clone(), e.spec.clone())
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .install(e.id.clone(), e.spec.clone())
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            !store
                .set_addon_status(
                    a.id.clone(),
                    AddonStatus::Active,
                    None,
                    Some(AddonStatus::Disabling)
                )
                .await
                .unwrap(),
            "the guard holds"
        );
        drop(store);
        let store = AddonStore::open(&path).unwrap();
        assert_eq!(
            store
                .entries(Some(MarketplaceStatus::Approved), None)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store.addon(a.id.clone()).await.unwrap().unwrap().status,
            AddonStatus::Installing
        );
        assert!(store.delete_addon(a.id).await.unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
