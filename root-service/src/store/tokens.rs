//! Token generations: how tokens are revoked.
//!
//! Every user row holds a `token_gen`, and every token root issues carries its user's generation in the `gen`
//! claim. A token is honoured only while the claim equals the user's current generation, so giving the user a new
//! generation revokes every token issued before: root does that when the password changes (by the user or an
//! Admin), when the roles change (by `PUT /api/user/<name>`, or by replacing or deleting an organization's
//! members), and the generation goes with the row when the user is deleted.
//!
//! Generations come from one counter for the whole database (`token_generation`), never reset and never reused:
//! a user deleted and registered again under the same name gets a generation no earlier token carries. Users that
//! existed before the column did have generation 0, which no counter value equals; tokens issued before the claim
//! existed carry none and are refused (those users log in once more).
//!
//! Refresh tokens are checked against the database. Access tokens are checked on every request against
//! [`Generations`], an in-memory copy of every user's generation, kept in step under the store's lock by the
//! functions that change one; reads take a read lock and never wait for the database.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use rusqlite::{Connection, OptionalExtension};

use crate::Error;

/// The current generation of every user, by user name.
#[derive(Debug, Default)]
pub struct Generations(RwLock<HashMap<String, i64>>);

impl Generations {
    /// Every user's generation as the database holds it.
    pub fn load(conn: &Connection) -> Result<Self, Error> {
        let all = conn
            .prepare("SELECT name, token_gen FROM users")?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<rusqlite::Result<HashMap<_, _>>>()?;
        Ok(Self(RwLock::new(all)))
    }

    /// The current generation of the user called `name`; `None` if there is no such user.
    pub fn get(&self, name: &str) -> Option<i64> {
        // A panic while writing cannot leave a half-written map entry: each write is one insert or remove.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
    }

    /// Records that `name` now has `generation`. Call it after the change is committed, under the store's lock.
    pub fn set(&self, name: &str, generation: i64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), generation);
    }

    /// Records that the user called `name` is gone.
    pub fn remove(&self, name: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

/// A generation no user has had yet: the next value of the database's counter. Call it inside the transaction
/// that stores it.
pub fn next_generation(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row(
        "UPDATE token_generation SET last = last + 1 WHERE id = 1 RETURNING last",
        [],
        |r| r.get(0),
    )?)
}

/// Gives the user `user_id` a new generation, revoking its tokens; returns its name and the new generation (`None`
/// if there is no such user). Call it inside a transaction, then [`Generations::set`] after the commit.
pub fn revoke(conn: &Connection, user_id: &str) -> Result<Option<(String, i64)>, Error> {
    let generation = next_generation(conn)?;
    Ok(conn
        .query_row(
            "UPDATE users SET token_gen = ?2 WHERE id = ?1 RETURNING name",
            rusqlite::params![user_id, generation],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .map(|name| (name, generation)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_never_reused() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO users (id, name, password_hash, created_at) VALUES ('u1', 'bob', 'h', '0')",
            [],
        )
        .unwrap();
        let gens = Generations::load(&conn).unwrap();
        assert_eq!(gens.get("bob"), Some(0), "rows from before the column");
        let (name, first) = revoke(&conn, "u1").unwrap().unwrap();
        assert_eq!(name, "bob");
        let second = revoke(&conn, "u1").unwrap().unwrap().1;
        assert!(first > 0 && second > first, "{first} {second}");
        assert_eq!(revoke(&conn, "nobody").unwrap(), None);
        let third = next_generation(&conn).unwrap();
        assert!(third > second, "a failed revoke still used a value: {third}");
        gens.set("bob", second);
        assert_eq!(gens.get("bob"), Some(second));
        gens.remove("bob");
        assert_eq!(gens.get("bob"), None);
    }
}
