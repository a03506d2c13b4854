//! Registered clusters: registration (upsert by name, so a name keeps its id), per-cluster secrets, the last
//! report's aggregate and the CPU/memory history, and liveness by report freshness. The [`Store`] methods at the
//! end are what handlers and the engine call.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value, json};

use super::{Store, new_id, now_ms};
use crate::Error;

/// How many history points are kept per cluster (as the reference).
pub const HISTORY_LEN: usize = 100;

/// A registered cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRow {
    /// 24 hex digits, stable per name.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text or `LAT,LON,RADIUS_M`.
    pub location: String,
    /// Where root reaches it.
    pub address: String,
    /// Cluster manager port.
    pub manager_port: u16,
    /// Network component port.
    pub network_port: u16,
    /// The per-cluster secret (never shown by the API).
    pub token: String,
    /// Registration time (Unix ms).
    pub registered: i64,
    /// Last report (Unix ms).
    pub last_report: Option<i64>,
    /// The last report's aggregate (without `jobs`).
    pub aggregate: Map<String, Value>,
    /// `{value, timestamp}` CPU history, newest last.
    pub cpu_history: Vec<Value>,
    /// `{value, timestamp}` memory history, newest last.
    pub memory_history: Vec<Value>,
}

impl ClusterRow {
    /// Whether a report arrived within `window_ms` of `now_ms`.
    pub fn is_active(&self, now_ms: i64, window_ms: i64) -> bool {
        self.last_report.is_some_and(|t| t > now_ms - window_ms)
    }

    /// The document `GET /api/clusters/` shows: the aggregate, the reference's compatibility fields, `active`.
    /// The secret is not in it.
    pub fn to_json(&self, active: bool) -> Value {
        let mut doc = self.aggregate.clone();
        let num = |k: &str| doc.get(k).cloned().unwrap_or(json!(0));
        let compat = [
            ("aggregated_cpu_percent", num("cpu_percent")),
            ("memory_in_mb", num("memory")),
            ("total_cpu_cores", num("vcpus")),
            ("total_gpu_cores", num("vgpus")),
        ];
        for (k, v) in compat {
            doc.insert(k.to_owned(), v);
        }
        let last = self.last_report.map(|ms| json!(ms_to_secs(ms)));
        for (k, v) in [
            ("_id", json!(self.id)),
            ("cluster_name", json!(self.name)),
            ("candidate_name", json!(self.name)),
            ("cluster_location", json!(self.location)),
            ("candidate_location", json!(self.location)),
            ("ip", json!(self.address)),
            ("port", json!(self.manager_port.to_string())),
            ("network_component_port", json!(self.network_port)),
            ("active", json!(active)),
            ("last_modified_timestamp", last.unwrap_or(Value::Null)),
            ("cpu_history", json!(self.cpu_history)),
            ("memory_history", json!(self.memory_history)),
        ] {
            doc.insert(k.to_owned(), v);
        }
        Value::Object(doc)
    }
}

fn ms_to_secs(ms: i64) -> f64 {
    // Millisecond timestamps stay exact in an f64 for the next 280,000 years.
    ms as f64 / 1000.0
}

const COLUMNS: &str =
    "id, name, location, address, manager_port, network_port, token, registered, last_report,
    aggregate, cpu_history, memory_history";

fn from_row(r: &Row<'_>) -> rusqlite::Result<ClusterRow> {
    let parse_list = |text: String| serde_json::from_str::<Vec<Value>>(&text).unwrap_or_default();
    Ok(ClusterRow {
        id: r.get(0)?,
        name: r.get(1)?,
        location: r.get(2)?,
        address: r.get(3)?,
        manager_port: r.get(4)?,
        network_port: r.get(5)?,
        token: r.get(6)?,
        registered: r.get(7)?,
        last_report: r.get(8)?,
        aggregate: match serde_json::from_str(&r.get::<_, String>(9)?) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        cpu_history: parse_list(r.get(10)?),
        memory_history: parse_list(r.get(11)?),
    })
}

/// Registers `name` (or re-registers it, keeping its id and data, updating its address, ports and secret).
pub fn register(
    conn: &Connection,
    name: &str,
    location: &str,
    address: &str,
    manager_port: u16,
    network_port: u16,
    token: &str,
) -> Result<ClusterRow, Error> {
    let id = new_id()?;
    conn.execute(
        "INSERT INTO clusters (id, name, location, address, manager_port, network_port, token, registered)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (name) DO UPDATE SET location = excluded.location, address = excluded.address,
           manager_port = excluded.manager_port, network_port = excluded.network_port, token = excluded.token,
           registered = excluded.registered",
        params![
            id,
            name,
            location,
            address,
            manager_port,
            network_port,
            token,
            now_ms()
        ],
    )?;
    by_name(conn, name)?.ok_or_else(|| Error::NotFound {
        what: "cluster",
        id: name.to_owned(),
    })
}

/// The cluster `id`.
pub fn by_id(conn: &Connection, id: &str) -> Result<Option<ClusterRow>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM clusters WHERE id = ?1"),
            [id],
            from_row,
        )
        .optional()?)
}

/// The cluster called `name`.
pub fn by_name(conn: &Connection, name: &str) -> Result<Option<ClusterRow>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM clusters WHERE name = ?1"),
            [name],
            from_row,
        )
        .optional()?)
}

/// The cluster holding `token`.
pub fn by_token(conn: &Connection, token: &str) -> Result<Option<ClusterRow>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM clusters WHERE token = ?1"),
            [token],
            from_row,
        )
        .optional()?)
}

/// Every cluster, by name.
pub fn all(conn: &Connection) -> Result<Vec<ClusterRow>, Error> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM clusters ORDER BY name"))?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Stores a report's aggregate, stamps it and appends to the histories (capped at [`HISTORY_LEN`]).
pub fn record_report(conn: &Connection, id: &str, aggregate: &Map<String, Value>) -> Result<bool, Error> {
    let Some(row) = by_id(conn, id)? else {
        return Ok(false);
    };
    let now = now_ms();
    let stamp = ms_to_secs(now);
    let push = |mut history: Vec<Value>, key: &str| {
        if let Some(v) = aggregate.get(key) {
            history.push(json!({"value": v, "timestamp": stamp}));
        }
        let excess = history.len().saturating_sub(HISTORY_LEN);
        history.drain(..excess);
        Value::Array(history).to_string()
    };
    conn.execute(
        "UPDATE clusters SET aggregate = ?2, last_report = ?3, cpu_history = ?4, memory_history = ?5 WHERE id = ?1",
        params![
            id,
            Value::Object(aggregate.clone()).to_string(),
            now,
            push(row.cpu_history, "cpu_percent"),
            push(row.memory_history, "memory_percent")
        ],
    )?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------------------------
// The store's methods over clusters
// ---------------------------------------------------------------------------------------------------------------

/// A cluster registering (or registering again under its name).
#[derive(Debug, Clone)]
pub struct NewCluster {
    /// Unique name.
    pub name: String,
    /// Free text or `LAT,LON,RADIUS_M`.
    pub location: String,
    /// Where root reaches it.
    pub address: String,
    /// Cluster manager port.
    pub manager_port: u16,
    /// Network component port.
    pub network_port: u16,
    /// Its new per-cluster secret.
    pub token: String,
}

impl Store {
    /// Every cluster, by name.
    pub async fn clusters(&self) -> Result<Vec<ClusterRow>, Error> {
        self.with(|inner| all(&inner.conn)).await
    }

    /// The clusters with these ids (unknown ids are left out).
    pub async fn clusters_by_ids(&self, ids: Vec<String>) -> Result<Vec<ClusterRow>, Error> {
        self.with(move |inner| {
            ids.iter()
                .filter_map(|id| by_id(&inner.conn, id).transpose())
                .collect()
        })
        .await
    }

    /// The cluster holding `token`.
    pub async fn cluster_by_token(&self, token: String) -> Result<Option<ClusterRow>, Error> {
        self.with(move |inner| by_token(&inner.conn, &token)).await
    }

    /// Registers a cluster (see [`register`]).
    pub async fn register_cluster(&self, cluster: NewCluster) -> Result<ClusterRow, Error> {
        self.with(move |inner| {
            register(
                &inner.conn,
                &cluster.name,
                &cluster.location,
                &cluster.address,
                cluster.manager_port,
                cluster.network_port,
                &cluster.token,
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        super::super::migrate(&mut c).unwrap();
        c
    }

    #[test]
    fn same_name_keeps_its_id_and_gets_the_new_secret() {
        let c = conn();
        let a = register(&c, "c1", "here", "10.0.0.1", 10100, 10110, "t1").unwrap();
        let b = register(&c, "c1", "there", "10.0.0.2", 1, 2, "t2").unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(b.address, "10.0.0.2");
        assert!(by_token(&c, "t1").unwrap().is_none());
        assert_eq!(by_token(&c, "t2").unwrap().unwrap().id, a.id);
        let other = register(&c, "c2", "", "10.0.0.3", 1, 2, "t3").unwrap();
        assert_ne!(other.id, a.id);
    }

    #[test]
    fn reports_stamp_liveness_and_cap_history() {
        let c = conn();
        let row = register(&c, "c1", "", "10.0.0.1", 10100, 10110, "t").unwrap();
        assert!(!row.is_active(now_ms(), 30_000));
        let mut agg = Map::new();
        agg.insert("cpu_percent".into(), json!(12.5));
        agg.insert("memory".into(), json!(2048));
        for _ in 0..(HISTORY_LEN + 5) {
            assert!(record_report(&c, &row.id, &agg).unwrap());
        }
        let row = by_id(&c, &row.id).unwrap().unwrap();
        assert!(row.is_active(now_ms(), 30_000));
        assert!(!row.is_active(now_ms() + 31_000, 30_000));
        assert_eq!(row.cpu_history.len(), HISTORY_LEN);
        assert!(row.memory_history.is_empty());
        let doc = row.to_json(true);
        assert_eq!(doc["memory_in_mb"], json!(2048));
        assert_eq!(doc["cluster_name"], json!("c1"));
        assert!(doc.get("token").is_none());
        assert!(!record_report(&c, "nope", &agg).unwrap());
    }
}
