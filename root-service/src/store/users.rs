//! Users, organizations and memberships (the roles a user holds in an organization).
//!
//! Users are global; roles live in the `memberships` rows, which the database deletes with their user or
//! organization. Nothing here returns a password hash except [`password_hash`], which the password change needs.
//! Policy (who may do what, which names and roles are valid) is the API's; the functions only refuse what the
//! schema would (an unknown row: [`Error::NotFound`], a taken name: [`Error::Conflict`]). The [`Store`] methods at
//! the end are what handlers call: each is one step under the store's lock, and they also keep the default data
//! usable (organization [`ROOT_ORG`] keeps its name and user [`ADMIN_USER`] with the `Admin` role), because that
//! check must see the same rows the change then writes.
//!
//! The functions that change a password or roles, or delete a user, also revoke the user's tokens (a new token
//! generation, see [`super::tokens`]) in the same transaction and record it in the [`Generations`] they are given.

use std::collections::{BTreeSet, HashMap};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    ADMIN_USER, ROOT_ORG, Store, new_id,
    tokens::{self, Generations},
};
use crate::Error;

/// A user without its password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// 24 lowercase hex digits.
    pub id: String,
    /// Unique user name.
    pub name: String,
    /// E-mail address (may be empty).
    pub email: String,
    /// Creation time as given at registration (default: Unix seconds).
    pub created_at: String,
}

/// One organization a user belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Organization id.
    pub org_id: String,
    /// Organization name.
    pub org_name: String,
    /// The user's roles there.
    pub roles: Vec<String>,
}

/// One member of an organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// User id.
    pub user_id: String,
    /// The user's roles in the organization.
    pub roles: Vec<String>,
}

/// An organization with its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgRow {
    /// 24 lowercase hex digits.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Members, in user-name order.
    pub members: Vec<Member>,
}

/// A user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Unique user name.
    pub name: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    /// E-mail address (may be empty).
    pub email: String,
    /// Creation time.
    pub created_at: String,
}

/// What an update of a user changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    /// New e-mail address.
    pub email: Option<String>,
    /// New password hash.
    pub password_hash: Option<String>,
    /// New roles in an organization (organization id, roles); makes the user a member if it was not.
    pub roles: Option<(String, Vec<String>)>,
}

/// Parses a `memberships.roles` column.
fn parse_roles(conn: &Connection, raw: &str) -> Result<Vec<String>, Error> {
    serde_json::from_str(raw).map_err(|e| Error::Corrupt {
        path: conn.path().unwrap_or_default().into(),
        what: format!("memberships.roles = {raw:?}: {e}"),
    })
}

fn roles_text(roles: &[String]) -> String {
    serde_json::Value::from(roles).to_string()
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: r.get(0)?,
        name: r.get(1)?,
        email: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// The user called `name`, if any.
pub fn user(conn: &Connection, name: &str) -> Result<Option<UserRow>, Error> {
    Ok(conn
        .query_row(
            "SELECT id, name, email, created_at FROM users WHERE name = ?1",
            [name],
            user_from_row,
        )
        .optional()?)
}

/// Every user (`org = None`) or the members of organization `org`, in name order.
pub fn users(conn: &Connection, org: Option<&str>) -> Result<Vec<UserRow>, Error> {
    let rows = match org {
        None => conn
            .prepare("SELECT id, name, email, created_at FROM users ORDER BY name")?
            .query_map([], user_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        Some(org) => conn
            .prepare(
                "SELECT u.id, u.name, u.email, u.created_at FROM users u
                 JOIN memberships m ON m.user_id = u.id WHERE m.org_id = ?1 ORDER BY u.name",
            )?
            .query_map([org], user_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    Ok(rows)
}

/// The memberships of every user (`user_id = None`) or of one user, keyed by user id, in organization-name order.
pub fn memberships(
    conn: &Connection,
    user_id: Option<&str>,
) -> Result<HashMap<String, Vec<Membership>>, Error> {
    let mut stmt = conn.prepare(
        "SELECT m.user_id, o.id, o.name, m.roles FROM memberships m JOIN organizations o ON o.id = m.org_id
         WHERE ?1 IS NULL OR m.user_id = ?1 ORDER BY o.name",
    )?;
    let rows = stmt
        .query_map([user_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out: HashMap<String, Vec<Membership>> = HashMap::new();
    for (user, org_id, org_name, raw) in rows {
        let roles = parse_roles(conn, &raw)?;
        out.entry(user).or_default().push(Membership {
            org_id,
            org_name,
            roles,
        });
    }
    Ok(out)
}

/// The roles `user_id` holds in `org_id`, or `None` when it is not a member.
pub fn roles_in(conn: &Connection, user_id: &str, org_id: &str) -> Result<Option<Vec<String>>, Error> {
    let raw: Option<String> = conn
        .query_row(
            "SELECT roles FROM memberships WHERE user_id = ?1 AND org_id = ?2",
            params![user_id, org_id],
            |r| r.get(0),
        )
        .optional()?;
    raw.map(|raw| parse_roles(conn, &raw)).transpose()
}

/// Applies the generations of a committed transaction to `gens`.
fn record(gens: &Generations, revoked: &[(String, i64)]) {
    for (name, generation) in revoked {
        gens.set(name, *generation);
    }
}

/// Creates `user` with a membership in `org_id` holding `roles`, with a token generation no earlier user had. A
/// taken name is a conflict.
pub fn create_user(
    conn: &mut Connection,
    gens: &Generations,
    user: &NewUser,
    org_id: &str,
    roles: &[String],
) -> Result<UserRow, Error> {
    let tx = conn.transaction()?;
    let taken: Option<String> = tx
        .query_row("SELECT id FROM users WHERE name = ?1", [&user.name], |r| r.get(0))
        .optional()?;
    if taken.is_some() {
        return Err(Error::Conflict {
            message: "Username already exists".into(),
        });
    }
    let id = new_id()?;
    let generation = tokens::next_generation(&tx)?;
    tx.execute(
        "INSERT INTO users (id, name, password_hash, email, created_at, token_gen) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, user.name, user.password_hash, user.email, user.created_at, generation],
    )?;
    tx.execute(
        "INSERT INTO memberships (user_id, org_id, roles) VALUES (?1, ?2, ?3)",
        params![id, org_id, roles_text(roles)],
    )?;
    tx.commit()?;
    gens.set(&user.name, generation);
    Ok(UserRow {
        id,
        name: user.name.clone(),
        email: user.email.clone(),
        created_at: user.created_at.clone(),
    })
}

/// Applies `update` to the user called `name`; a new password or new roles revoke the user's tokens.
pub fn update_user(
    conn: &mut Connection,
    gens: &Generations,
    name: &str,
    update: &UserUpdate,
) -> Result<(), Error> {
    let tx = conn.transaction()?;
    let id: String = tx
        .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| Error::NotFound {
            what: "user",
            id: name.to_owned(),
        })?;
    if let Some(email) = &update.email {
        tx.execute("UPDATE users SET email = ?1 WHERE id = ?2", params![email, id])?;
    }
    if let Some(hash) = &update.password_hash {
        tx.execute(
            "UPDATE users SET password_hash = ?1 WHERE id = ?2",
            params![hash, id],
        )?;
    }
    if let Some((org_id, roles)) = &update.roles {
        tx.execute(
            "INSERT INTO memberships (user_id, org_id, roles) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id, org_id) DO UPDATE SET roles = excluded.roles",
            params![id, org_id, roles_text(roles)],
        )?;
    }
    let revoked = if update.password_hash.is_some() || update.roles.is_some() {
        tokens::revoke(&tx, &id)?
    } else {
        None
    };
    tx.commit()?;
    record(gens, revoked.as_slice());
    Ok(())
}

/// Deletes the user called `name` (its memberships and its token generation go with it).
pub fn delete_user(conn: &Connection, gens: &Generations, name: &str) -> Result<(), Error> {
    // Applications are owned by user name: a user registered later under the same name would inherit them.
    let owned: i64 = conn.query_row(
        "SELECT COUNT(*) FROM applications WHERE owner = ?1",
        [name],
        |r| r.get(0),
    )?;
    if owned > 0 {
        return Err(Error::Conflict {
            message: format!("user {name:?} still owns {owned} application(s): delete them first"),
        });
    }
    match conn.execute("DELETE FROM users WHERE name = ?1", [name])? {
        0 => Err(Error::NotFound {
            what: "user",
            id: name.to_owned(),
        }),
        _ => {
            gens.remove(name);
            Ok(())
        }
    }
}

/// The password hash of the user called `name`, if the user exists.
pub fn password_hash(conn: &Connection, name: &str) -> Result<Option<String>, Error> {
    Ok(conn
        .query_row("SELECT password_hash FROM users WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Sets the password hash of `name` to `new` if it still is `old`, revoking the user's tokens; whether it was set.
pub fn replace_password_hash(
    conn: &mut Connection,
    gens: &Generations,
    name: &str,
    old: &str,
    new: &str,
) -> Result<bool, Error> {
    let tx = conn.transaction()?;
    let id: Option<String> = tx
        .query_row(
            "UPDATE users SET password_hash = ?1 WHERE name = ?2 AND password_hash = ?3 RETURNING id",
            params![new, name, old],
            |r| r.get(0),
        )
        .optional()?;
    let Some(id) = id else {
        return Ok(false);
    };
    let revoked = tokens::revoke(&tx, &id)?;
    tx.commit()?;
    record(gens, revoked.as_slice());
    Ok(true)
}

/// The ids in `ids` that are no user's.
pub fn missing_users(conn: &Connection, ids: &[&str]) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare("SELECT 1 FROM users WHERE id = ?1")?;
    let mut missing = Vec::new();
    for id in ids {
        if !stmt.exists([id])? {
            missing.push((*id).to_owned());
        }
    }
    Ok(missing)
}

/// The id of the user called `name`, if any.
pub fn user_id(conn: &Connection, name: &str) -> Result<Option<String>, Error> {
    Ok(conn
        .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?)
}

fn members(conn: &Connection, org_id: &str) -> Result<Vec<Member>, Error> {
    let rows = conn
        .prepare(
            "SELECT m.user_id, m.roles FROM memberships m JOIN users u ON u.id = m.user_id
             WHERE m.org_id = ?1 ORDER BY u.name",
        )?
        .query_map([org_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(user_id, raw)| {
            Ok(Member {
                user_id,
                roles: parse_roles(conn, &raw)?,
            })
        })
        .collect()
}

/// The organization with id `id`, if any.
pub fn organization(conn: &Connection, id: &str) -> Result<Option<OrgRow>, Error> {
    let name: Option<String> = conn
        .query_row("SELECT name FROM organizations WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    name.map(|name| {
        Ok(OrgRow {
            id: id.to_owned(),
            members: members(conn, id)?,
            name,
        })
    })
    .transpose()
}

/// The id of the organization called `name`, if any.
pub fn organization_id(conn: &Connection, name: &str) -> Result<Option<String>, Error> {
    Ok(conn
        .query_row("SELECT id FROM organizations WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Every organization, in name order.
pub fn organizations(conn: &Connection) -> Result<Vec<OrgRow>, Error> {
    let rows = conn
        .prepare("SELECT id, name FROM organizations ORDER BY name")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(id, name)| {
            Ok(OrgRow {
                members: members(conn, &id)?,
                id,
                name,
            })
        })
        .collect()
}

fn name_taken(conn: &Connection, name: &str, except: Option<&str>) -> Result<(), Error> {
    match organization_id(conn, name)? {
        Some(id) if Some(id.as_str()) != except => Err(Error::Conflict {
            message: format!("organization {name:?} already exists"),
        }),
        _ => Ok(()),
    }
}

fn insert_members(conn: &Connection, org_id: &str, members: &[Member]) -> Result<(), Error> {
    let mut stmt = conn.prepare("INSERT INTO memberships (user_id, org_id, roles) VALUES (?1, ?2, ?3)")?;
    for m in members {
        stmt.execute(params![m.user_id, org_id, roles_text(&m.roles)])?;
    }
    Ok(())
}

/// Creates an organization called `name` with `members` (existing, distinct users). A taken name is a conflict.
pub fn create_organization(conn: &mut Connection, name: &str, members: &[Member]) -> Result<OrgRow, Error> {
    let tx = conn.transaction()?;
    name_taken(&tx, name, None)?;
    let id = new_id()?;
    tx.execute(
        "INSERT INTO organizations (id, name) VALUES (?1, ?2)",
        params![id, name],
    )?;
    insert_members(&tx, &id, members)?;
    let org = organization(&tx, &id)?.ok_or_else(|| Error::NotFound {
        what: "organization",
        id: id.clone(),
    })?;
    tx.commit()?;
    Ok(org)
}

/// The roles of every member of `org_id`, by user id.
fn member_roles(conn: &Connection, org_id: &str) -> Result<HashMap<String, Vec<String>>, Error> {
    Ok(members(conn, org_id)?
        .into_iter()
        .map(|m| (m.user_id, m.roles))
        .collect())
}

/// Renames organization `id` and/or replaces its members (existing, distinct users). Every user whose roles there
/// change (added, removed, or different roles) has its tokens revoked.
pub fn update_organization(
    conn: &mut Connection,
    gens: &Generations,
    id: &str,
    name: Option<&str>,
    members: Option<&[Member]>,
) -> Result<OrgRow, Error> {
    let tx = conn.transaction()?;
    let not_found = || Error::NotFound {
        what: "organization",
        id: id.to_owned(),
    };
    if organization(&tx, id)?.is_none() {
        return Err(not_found());
    }
    if let Some(name) = name {
        name_taken(&tx, name, Some(id))?;
        tx.execute(
            "UPDATE organizations SET name = ?1 WHERE id = ?2",
            params![name, id],
        )?;
    }
    let mut revoked = Vec::new();
    if let Some(members) = members {
        let before = member_roles(&tx, id)?;
        tx.execute("DELETE FROM memberships WHERE org_id = ?1", [id])?;
        insert_members(&tx, id, members)?;
        let after = member_roles(&tx, id)?;
        let everyone: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for user_id in everyone {
            if before.get(user_id) != after.get(user_id) {
                revoked.extend(tokens::revoke(&tx, user_id)?);
            }
        }
    }
    let org = organization(&tx, id)?.ok_or_else(not_found)?;
    tx.commit()?;
    record(gens, &revoked);
    Ok(org)
}

/// Deletes organization `id` (its memberships go with it), revoking the tokens of its members.
pub fn delete_organization(conn: &mut Connection, gens: &Generations, id: &str) -> Result<(), Error> {
    let tx = conn.transaction()?;
    let mut revoked = Vec::new();
    for user_id in member_roles(&tx, id)?.keys() {
        revoked.extend(tokens::revoke(&tx, user_id)?);
    }
    match tx.execute("DELETE FROM organizations WHERE id = ?1", [id])? {
        0 => Err(Error::NotFound {
            what: "organization",
            id: id.to_owned(),
        }),
        _ => {
            tx.commit()?;
            record(gens, &revoked);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The store's methods over users and organizations
// ---------------------------------------------------------------------------------------------------------------

/// Which organization a new user joins.
#[derive(Debug, Clone)]
pub enum OrgRef {
    /// The organization with this name.
    Name(String),
    /// The organization with this id (the caller's, from its token).
    Id(String),
}

/// Users with every membership of every user (what the user documents are built from).
#[derive(Debug, Clone, Default)]
pub struct UserListing {
    /// The users, in name order.
    pub users: Vec<UserRow>,
    /// Every user's memberships, by user id.
    pub memberships: HashMap<String, Vec<Membership>>,
}

/// How a password change that expected a given current hash ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordSwap {
    /// The hash was the expected one and is replaced.
    Replaced,
    /// Another request changed the password since the old one was checked.
    ChangedMeanwhile,
    /// The user is gone.
    NoSuchUser,
}

fn listing(conn: &Connection, org: Option<&str>) -> Result<UserListing, Error> {
    Ok(UserListing {
        users: users(conn, org)?,
        memberships: memberships(conn, None)?,
    })
}

/// [`Error::UnknownUsers`] naming the member ids that are no user's.
fn require_known_members(conn: &Connection, members: &[Member]) -> Result<(), Error> {
    let ids: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    let missing = missing_users(conn, &ids)?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnknownUsers { ids: missing })
    }
}

fn organization_not_found(id: String) -> Error {
    Error::NotFound {
        what: "organization",
        id,
    }
}

fn user_not_found(name: String) -> Error {
    Error::NotFound {
        what: "user",
        id: name,
    }
}

impl Store {
    /// Creates `user` as a member of organization `org` with `roles`; [`Error::NotFound`] naming the organization as
    /// given when it does not exist.
    pub async fn register_user(
        &self,
        user: NewUser,
        org: OrgRef,
        roles: Vec<String>,
    ) -> Result<UserRow, Error> {
        self.with(move |inner| {
            let (org_id, shown) = match org {
                OrgRef::Name(name) => (organization_id(&inner.conn, &name)?, name),
                OrgRef::Id(id) => (organization(&inner.conn, &id)?.map(|o| o.id), id),
            };
            let org_id = org_id.ok_or_else(|| organization_not_found(shown))?;
            create_user(&mut inner.conn, &inner.generations, &user, &org_id, &roles)
        })
        .await
    }

    /// The roles of user `name` in organization `org_id` (`None`: not a member); [`Error::NotFound`] for an
    /// unknown user.
    pub async fn user_roles_in(&self, name: String, org_id: String) -> Result<Option<Vec<String>>, Error> {
        self.with(move |inner| {
            let user = user(&inner.conn, &name)?.ok_or_else(|| user_not_found(name))?;
            roles_in(&inner.conn, &user.id, &org_id)
        })
        .await
    }

    /// User `name` with its memberships; [`Error::NotFound`] for an unknown user.
    pub async fn user_with_memberships(
        &self,
        name: String,
    ) -> Result<(UserRow, HashMap<String, Vec<Membership>>), Error> {
        self.with(move |inner| {
            let user = user(&inner.conn, &name)?.ok_or_else(|| user_not_found(name))?;
            let memberships = memberships(&inner.conn, Some(&user.id))?;
            Ok((user, memberships))
        })
        .await
    }

    /// Applies `update` to user `name`. New roles need an existing organization ([`Error::NotFound`]) and may not
    /// take the `Admin` role in [`ROOT_ORG`] from [`ADMIN_USER`] ([`Error::Conflict`]).
    pub async fn update_user(&self, name: String, update: UserUpdate) -> Result<(), Error> {
        self.with(move |inner| {
            if let Some((org_id, roles)) = &update.roles {
                let org = organization(&inner.conn, org_id)?
                    .ok_or_else(|| organization_not_found(org_id.clone()))?;
                if name == ADMIN_USER && org.name == ROOT_ORG && !roles.iter().any(|r| r == "Admin") {
                    return Err(Error::Conflict {
                        message: format!(
                            "user {ADMIN_USER} must keep the Admin role in organization {ROOT_ORG}"
                        ),
                    });
                }
            }
            update_user(&mut inner.conn, &inner.generations, &name, &update)
        })
        .await
    }

    /// Deletes user `name`; answers the users that remain.
    pub async fn delete_user(&self, name: String) -> Result<UserListing, Error> {
        self.with(move |inner| {
            delete_user(&inner.conn, &inner.generations, &name)?;
            listing(&inner.conn, None)
        })
        .await
    }

    /// The password hash of user `name`, if the user exists.
    pub async fn password_hash(&self, name: String) -> Result<Option<String>, Error> {
        self.with(move |inner| password_hash(&inner.conn, &name)).await
    }

    /// Replaces user `name`'s password hash if it still is `old` (see [`PasswordSwap`]).
    pub async fn replace_password_hash(
        &self,
        name: String,
        old: String,
        new: String,
    ) -> Result<PasswordSwap, Error> {
        self.with(move |inner| {
            if replace_password_hash(&mut inner.conn, &inner.generations, &name, &old, &new)? {
                return Ok(PasswordSwap::Replaced);
            }
            Ok(match user_id(&inner.conn, &name)? {
                Some(_) => PasswordSwap::ChangedMeanwhile,
                None => PasswordSwap::NoSuchUser,
            })
        })
        .await
    }

    /// Every user, or the members of organization `org_id` ([`Error::NotFound`] when it does not exist).
    pub async fn user_listing(&self, org_id: Option<String>) -> Result<UserListing, Error> {
        self.with(move |inner| {
            if let Some(id) = &org_id
                && organization(&inner.conn, id)?.is_none()
            {
                return Err(organization_not_found(id.clone()));
            }
            listing(&inner.conn, org_id.as_deref())
        })
        .await
    }

    /// Every organization.
    pub async fn organizations(&self) -> Result<Vec<OrgRow>, Error> {
        self.with(|inner| organizations(&inner.conn)).await
    }

    /// The organization `id`, if any.
    pub async fn organization(&self, id: String) -> Result<Option<OrgRow>, Error> {
        self.with(move |inner| organization(&inner.conn, &id)).await
    }

    /// Creates organization `name` with `members`, all of whom must be users ([`Error::UnknownUsers`]).
    pub async fn create_organization(&self, name: String, members: Vec<Member>) -> Result<OrgRow, Error> {
        self.with(move |inner| {
            require_known_members(&inner.conn, &members)?;
            create_organization(&mut inner.conn, &name, &members)
        })
        .await
    }

    /// Renames organization `id` and/or replaces its members ([`Error::UnknownUsers`] for members that are no
    /// user's). [`ROOT_ORG`] keeps its name and [`ADMIN_USER`] with the `Admin` role ([`Error::Conflict`]).
    pub async fn update_organization(
        &self,
        id: String,
        name: Option<String>,
        members: Option<Vec<Member>>,
    ) -> Result<OrgRow, Error> {
        self.with(move |inner| {
            let current =
                organization(&inner.conn, &id)?.ok_or_else(|| organization_not_found(id.clone()))?;
            if current.name == ROOT_ORG {
                if name.as_deref().is_some_and(|n| n != ROOT_ORG) {
                    return Err(Error::Conflict {
                        message: format!("organization {ROOT_ORG} cannot be renamed"),
                    });
                }
                if let Some(members) = &members {
                    let admin_id = user_id(&inner.conn, ADMIN_USER)?;
                    let keeps_admin = members.iter().any(|m| {
                        Some(&m.user_id) == admin_id.as_ref() && m.roles.iter().any(|r| r == "Admin")
                    });
                    if admin_id.is_some() && !keeps_admin {
                        return Err(Error::Conflict {
                            message: format!(
                                "organization {ROOT_ORG} must keep user {ADMIN_USER} with the Admin role"
                            ),
                        });
                    }
                }
            }
            if let Some(members) = &members {
                require_known_members(&inner.conn, members)?;
            }
            update_organization(
                &mut inner.conn,
                &inner.generations,
                &id,
                name.as_deref(),
                members.as_deref(),
            )
        })
        .await
    }

    /// Deletes organization `id`; [`ROOT_ORG`] cannot be deleted ([`Error::Conflict`]).
    pub async fn delete_organization(&self, id: String) -> Result<(), Error> {
        self.with(move |inner| {
            let org = organization(&inner.conn, &id)?.ok_or_else(|| organization_not_found(id.clone()))?;
            if org.name == ROOT_ORG {
                return Err(Error::Conflict {
                    message: format!("organization {ROOT_ORG} cannot be deleted"),
                });
            }
            delete_organization(&mut inner.conn, &inner.generations, &id)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        crate::store::migrate(&mut conn).unwrap();
        conn
    }

    fn new_user(name: &str) -> NewUser {
        NewUser {
            name: name.into(),
            password_hash: "h".into(),
            email: String::new(),
            created_at: "0".into(),
        }
    }

    #[test]
    fn memberships_cascade_with_user_and_organization() {
        let mut conn = conn();
        let gens = Generations::default();
        let org = create_organization(&mut conn, "o", &[]).unwrap();
        let roles = vec!["Admin".to_owned()];
        let bob = create_user(&mut conn, &gens, &new_user("bob"), &org.id, &roles).unwrap();
        assert_eq!(roles_in(&conn, &bob.id, &org.id).unwrap(), Some(roles));
        assert!(matches!(
            create_user(&mut conn, &gens, &new_user("bob"), &org.id, &[]),
            Err(Error::Conflict { .. })
        ));
        let created = gens.get("bob").unwrap();
        delete_organization(&mut conn, &gens, &org.id).unwrap();
        assert!(
            gens.get("bob").unwrap() > created,
            "losing the membership revokes"
        );
        assert_eq!(roles_in(&conn, &bob.id, &org.id).unwrap(), None);
        let org2 = create_organization(
            &mut conn,
            "p",
            &[Member {
                user_id: bob.id.clone(),
                roles: vec![],
            }],
        )
        .unwrap();
        assert_eq!(org2.members.len(), 1);
        delete_user(&conn, &gens, "bob").unwrap();
        assert_eq!(gens.get("bob"), None);
        assert!(organization(&conn, &org2.id).unwrap().unwrap().members.is_empty());
        assert!(matches!(
            delete_user(&conn, &gens, "bob"),
            Err(Error::NotFound { .. })
        ));
    }
}
