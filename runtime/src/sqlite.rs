//! The embedded SQLite conventions the root and cluster stores share (feature `sqlite`): how a database is opened
//! (owner-only files, busy timeout, WAL, foreign keys) and how schema migrations are applied and recorded.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::Connection;

use crate::owner_only;

/// Opens (creating if needed) the database at `path`: owner-only files, 5 s busy timeout, WAL journal (a warning
/// is logged by the caller if SQLite refuses it: the returned mode says), foreign keys on, `synchronous = NORMAL`.
///
/// The database is created as a 0600 file before SQLite opens it, so its `-wal` and `-shm` files (which SQLite
/// creates with the database's mode) are 0600 too; existing files with looser modes are tightened to 0600, with a
/// warning naming the file and the mode it had.
pub fn open(path: &Path) -> rusqlite::Result<(Connection, String)> {
    make_private(path)?;
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
    // The -wal and -shm files exist now; they should have the database's mode already.
    make_private(path)?;
    Ok((conn, mode))
}

/// The database file and its `-wal`, `-shm` and `-journal` companions.
fn database_files(path: &Path) -> [PathBuf; 4] {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), with("-wal"), with("-shm"), with("-journal")]
}

/// Creates the database file as 0600 if absent and tightens it and its companions to 0600.
fn make_private(path: &Path) -> rusqlite::Result<()> {
    let failed = |file: &Path, e: std::io::Error| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_PERM),
            Some(format!("{}: cannot make it owner-only: {e}", file.display())),
        )
    };
    owner_only::create_private_file(path).map_err(|e| failed(path, e))?;
    for file in database_files(path) {
        if let Some(was) = owner_only::restrict(&file, owner_only::FILE_MODE).map_err(|e| failed(&file, e))? {
            tracing::warn!(
                file = %file.display(),
                was = format_args!("{was:04o}"),
                now = format_args!("{:04o}", was & owner_only::FILE_MODE),
                "the database file was readable by others: tightened its mode"
            );
        }
    }
    Ok(())
}

/// Applies the `migrations` the database has not seen yet, in order, each in its own transaction; the index + 1 of
/// a migration is the version recorded in `schema_version`. Returns the versions applied.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<Vec<i64>> {
    migrate_in(conn, "schema_version", migrations)
}

/// [`migrate`] with the versions recorded in `version_table`: a subsystem that keeps its own tables in a tier's
/// database (the addons engine) migrates them independently of the tier's schema.
pub fn migrate_in(
    conn: &mut Connection,
    version_table: &str,
    migrations: &[&str],
) -> rusqlite::Result<Vec<i64>> {
    debug_assert!(
        version_table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    );
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (version INTEGER NOT NULL)"
    ))?;
    let current: i64 = conn.query_row(
        &format!("SELECT COALESCE(MAX(version), 0) FROM {version_table}"),
        [],
        |r| r.get(0),
    )?;
    let mut applied = Vec::new();
    for (version, sql) in (1_i64..).zip(migrations) {
        if version <= current {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            &format!("INSERT INTO {version_table} (version) VALUES (?1)"),
            [version],
        )?;
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

    #[cfg(unix)]
    #[test]
    fn open_makes_the_files_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = std::env::temp_dir().join(format!("oakestra-sqlite-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.db");
        let (conn, _) = open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
        let files: Vec<PathBuf> = database_files(&path).into_iter().filter(|f| f.exists()).collect();
        assert!(files.len() >= 2, "the database and its WAL: {files:?}");
        for file in &files {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        // Loosen every file while the connection still holds the WAL (closing it deletes -wal and -shm).
        for file in &files {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let (again, _) = open(&path).unwrap();
        for file in &files {
            assert_eq!(mode(file), 0o600, "{} after a reopen", file.display());
        }
        let n: i64 = again
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        drop((conn, again));
        let _ = std::fs::remove_dir_all(&dir);
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
