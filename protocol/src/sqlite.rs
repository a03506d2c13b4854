//! The embedded SQLite conventions the root and cluster stores share (feature `sqlite`): how a database is opened
//! (busy timeout, WAL, foreign keys) and how schema migrations are applied and recorded.

use std::{path::Path, time::Duration};

use rusqlite::Connection;

/// Opens (creating if needed) the database at `path`: 5 s busy timeout, WAL journal (a warning is logged by the
/// caller if SQLite refuses it: the returned mode says), foreign keys on, `synchronous = NORMAL`.
pub fn open(path: &Path) -> rusqlite::Result<(Connection, String)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
    Ok((conn, mode))
}

/// Applies the `migrations` the database has not seen yet, in order, each in its own transaction; the index + 1 of
/// a migration is the version recorded in `schema_version`. Returns the versions applied.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<Vec<i64>> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| {
        r.get(0)
    })?;
    let mut applied = Vec::new();
    for (version, sql) in (1_i64..).zip(migrations) {
        if version <= current {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [version])?;
        tx.commit()?;
        applied.push(version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_in_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        let steps = ["CREATE TABLE a (x INTEGER)", "ALTER TABLE a ADD COLUMN y INTEGER"];
        assert_eq!(migrate(&mut conn, &steps[..1]).unwrap(), vec![1]);
        assert_eq!(migrate(&mut conn, &steps).unwrap(), vec![2]);
        assert!(migrate(&mut conn, &steps).unwrap().is_empty());
        conn.execute("INSERT INTO a (x, y) VALUES (1, 2)", []).unwrap();
        assert!(
            migrate(&mut conn, &["NOT SQL"]).unwrap().is_empty(),
            "version 1 is already applied"
        );
        let mut fresh = Connection::open_in_memory().unwrap();
        assert!(migrate(&mut fresh, &["NOT SQL"]).is_err());
        let v: i64 = fresh
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 0, "a failed migration is not recorded");
    }

    #[test]
    fn open_uses_wal_on_a_file() {
        let dir = std::env::temp_dir().join(format!("oakestra-sqlite-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (conn, mode) = open(&dir.join("t.db")).unwrap();
        assert!(mode.eq_ignore_ascii_case("wal"), "{mode}");
        let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert_eq!(fk, 1);
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
