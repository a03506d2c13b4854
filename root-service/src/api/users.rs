//! Users and organizations: registration by an Admin, permissions, profile and password changes, listings, and
//! organization management with the four roles.
//!
//! Answers are plain JSON and never carry a password hash. User and organization names are 1–64 characters of
//! `[A-Za-z0-9_.-]`, passwords 1–1024 bytes, roles one of [`ALL_ROLES`]; anything else is a 422 naming it.
//! The default data stays usable: user `Admin` cannot be deleted nor lose the `Admin` role in `root`, and `root`
//! cannot be deleted or renamed (the checks that read rows run in the store, in the same step as the change).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use axum::{
    Json,
    extract::{ConnectInfo, Path, State},
    http::StatusCode,
    routing::{MethodRouter, get, post},
};
use oakestra_protocol::text::Escaped;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, AppState,
    extract::AccessClaims,
    reference::{UserJson, oid},
};
use crate::{
    Error,
    auth::{self, is_admin},
    store::{
        ADMIN_USER, ALL_ROLES,
        users::{
            Member, Membership, NewUser, OrgRef, OrgRow, PasswordSwap, UserListing, UserRow, UserUpdate,
        },
    },
};

/// Longest user or organization name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest password in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest e-mail address in bytes.
pub const MAX_EMAIL_LEN: usize = 320;
/// Longest `created_at` text.
pub const MAX_CREATED_AT_LEN: usize = 64;
/// The role a registered user gets when the request names none.
pub const DEFAULT_ROLE: &str = "Application_Provider";

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/api/auth/register", post(register)),
        ("/api/permission/{username}", get(permission)),
        (
            "/api/user/{username}",
            get(get_user)
                .put(update_user)
                .delete(delete_user)
                .post(change_password),
        ),
        ("/api/user", post(password_reset).put(password_reset)),
        ("/api/users", get(all_users)),
        ("/api/users/{organization_id}", get(organization_users)),
        (
            "/api/organization",
            get(all_organizations).post(create_organization),
        ),
        (
            "/api/organization/{id}",
            get(get_organization)
                .put(update_organization)
                .delete(delete_organization),
        ),
    ]
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, message)
}

fn require_admin(claims: &AccessClaims) -> Result<(), ApiError> {
    if is_admin(&claims.0) {
        Ok(())
    } else {
        Err(ApiError::not_enough_permissions())
    }
}

/// Self or Admin.
fn require_self_or_admin(claims: &AccessClaims, username: &str) -> Result<(), ApiError> {
    if claims.0.sub == username || is_admin(&claims.0) {
        Ok(())
    } else {
        Err(ApiError::not_enough_permissions())
    }
}

/// A user or organization name: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(unprocessable(format!(
            "{what} name {name:?} is invalid: it must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-'"
        )))
    }
}

/// A password: 1–1024 bytes.
pub fn check_password(what: &str, password: &str) -> Result<(), ApiError> {
    if (1..=MAX_PASSWORD_LEN).contains(&password.len()) {
        Ok(())
    } else {
        Err(unprocessable(format!(
            "{what} must be 1 to {MAX_PASSWORD_LEN} bytes long (got {})",
            password.len()
        )))
    }
}

fn check_email(email: &str) -> Result<(), ApiError> {
    if email.len() <= MAX_EMAIL_LEN {
        Ok(())
    } else {
        Err(unprocessable(format!(
            "email must be at most {MAX_EMAIL_LEN} bytes long"
        )))
    }
}

/// Checks every role against [`ALL_ROLES`]; returns them without repetitions, in the given order.
pub fn check_roles(roles: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::with_capacity(roles.len());
    for role in roles {
        if !ALL_ROLES.contains(&role.as_str()) {
            return Err(unprocessable(format!(
                "unknown role {role:?}: roles are {}",
                ALL_ROLES.join(", ")
            ))
            .with("role", json!(role)));
        }
        if !out.contains(&role) {
            out.push(role);
        }
    }
    Ok(out)
}

/// Hashes on the password-hashing pool, counted against the caller's address.
async fn hash(state: &AppState, peer: SocketAddr, password: String) -> Result<String, ApiError> {
    Ok(state.hasher.hash(Some(peer.ip()), password).await?)
}

/// Verifies on the password-hashing pool, counted against the caller's address.
async fn verify(
    state: &AppState,
    peer: SocketAddr,
    password: String,
    hash: String,
) -> Result<bool, ApiError> {
    Ok(state
        .hasher
        .verify(Some(peer.ip()), password, hash.into())
        .await?)
}

fn memberships_json(memberships: &[Membership]) -> Value {
    memberships
        .iter()
        .map(|m| {
            json!({
                "organization_id": m.org_id,
                "organization_name": m.org_name,
                "roles": m.roles,
            })
        })
        .collect()
}

/// The user document: `{_id, name, email, created_at, roles, organizations}`. `roles` are the user's roles in
/// organization `org` (an id or a name; `[]` when not a member), as the reference adds them for the organization
/// in question: the dashboard reads them without a check.
fn user_doc(user: &UserRow, memberships: &HashMap<String, Vec<Membership>>, org: &str) -> Value {
    let mine = memberships.get(&user.id).map_or(&[][..], Vec::as_slice);
    let roles = mine
        .iter()
        .find(|m| m.org_id == org || m.org_name == org)
        .map_or_else(Vec::new, |m| m.roles.clone());
    json!({
        "_id": oid(&user.id),
        "name": user.name,
        "email": user.email,
        "created_at": user.created_at,
        "roles": roles,
        "organizations": memberships_json(mine),
    })
}

/// The organization document: `{_id, name, member: [{user_id, roles}]}`.
fn org_doc(org: &OrgRow) -> Value {
    json!({
        "_id": oid(&org.id),
        "name": org.name,
        "member": org
            .members
            .iter()
            .map(|m| json!({ "user_id": m.user_id, "roles": m.roles }))
            .collect::<Vec<_>>(),
    })
}

/// The documents of the listed users.
fn user_docs(listing: &UserListing, org: &str) -> Vec<Value> {
    listing
        .users
        .iter()
        .map(|u| user_doc(u, &listing.memberships, org))
        .collect()
}

fn unix_secs_text() -> String {
    auth::unix_now().to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// Users

/// Body of `POST /api/auth/register`.
#[derive(Debug, Deserialize)]
pub struct RegisterRequest {
    /// User name.
    pub name: String,
    /// Password.
    pub password: String,
    /// E-mail address.
    #[serde(default)]
    pub email: Option<String>,
    /// Creation time (text or number); default now (Unix seconds).
    #[serde(default)]
    pub created_at: Option<Value>,
    /// Roles in the organization; default `["Application_Provider"]`.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Organization **name** to join; default the caller's organization.
    #[serde(default)]
    pub organization: Option<String>,
}

/// `POST /api/auth/register` (Admin): creates a user with a membership; answers the user with its roles there.
async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    claims: AccessClaims,
    UserJson(body): UserJson<RegisterRequest>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    check_name("user", &body.name)?;
    check_password("password", &body.password)?;
    let email = body.email.unwrap_or_default();
    check_email(&email)?;
    let created_at = match body.created_at {
        None | Some(Value::Null) => unix_secs_text(),
        Some(Value::String(s)) if s.len() <= MAX_CREATED_AT_LEN => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(unprocessable(format!(
                "created_at must be a text of at most {MAX_CREATED_AT_LEN} bytes or a number"
            )));
        }
    };
    let roles = check_roles(body.roles.unwrap_or_else(|| vec![DEFAULT_ROLE.to_owned()]))?;
    let password_hash = hash(&state, peer, body.password).await?;
    let user = NewUser {
        name: body.name,
        password_hash,
        email,
        created_at,
    };
    let organization = match body.organization {
        Some(name) => OrgRef::Name(name),
        None => OrgRef::Id(claims.0.organization.clone()),
    };
    let user = state
        .store
        .register_user(user, organization, roles.clone())
        .await?;
    tracing::info!(by = %Escaped(&claims.0.sub), user = %Escaped(&user.name), roles = ?roles, "user registered");
    Ok(Json(json!({
        "_id": oid(&user.id),
        "name": user.name,
        "email": user.email,
        "created_at": user.created_at,
        "roles": roles,
    })))
}

/// `GET /api/permission/{username}` (self or Admin): `{roles}` in the caller's organization.
async fn permission(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(username): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_self_or_admin(&claims, &username)?;
    let roles = state
        .store
        .user_roles_in(username, claims.0.organization.clone())
        .await?;
    Ok(Json(json!({ "roles": roles.unwrap_or_default() })))
}

/// `GET /api/user/{username}` (self or Admin): the user document.
async fn get_user(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(username): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_self_or_admin(&claims, &username)?;
    let (user, memberships) = state.store.user_with_memberships(username).await?;
    Ok(Json(user_doc(&user, &memberships, &claims.0.organization)))
}

/// Body of `PUT /api/user/{username}`.
#[derive(Debug, Deserialize)]
pub struct UpdateUserRequest {
    /// New e-mail address.
    #[serde(default)]
    pub email: Option<String>,
    /// New password.
    #[serde(default)]
    pub password: Option<String>,
    /// New roles in the caller's organization.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
}

/// `PUT /api/user/{username}` (Admin): sets the e-mail, the password and/or the roles in the caller's organization.
async fn update_user(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    claims: AccessClaims,
    Path(username): Path<String>,
    UserJson(body): UserJson<UpdateUserRequest>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    if let Some(email) = &body.email {
        check_email(email)?;
    }
    let roles = body.roles.map(check_roles).transpose()?;
    let password_hash = match body.password {
        Some(pw) => {
            check_password("password", &pw)?;
            Some(hash(&state, peer, pw).await?)
        }
        None => None,
    };
    let org = claims.0.organization.clone();
    let update = UserUpdate {
        email: body.email,
        password_hash,
        roles: roles.map(|r| (org.clone(), r)),
    };
    state.store.update_user(username.clone(), update).await?;
    tracing::info!(by = %Escaped(&claims.0.sub), user = %Escaped(&username), "user updated");
    Ok(Json(json!({ "message": "ok" })))
}

/// `DELETE /api/user/{username}` (Admin): deletes the user; answers the remaining users.
async fn delete_user(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(username): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    require_admin(&claims)?;
    if username == ADMIN_USER {
        return Err(conflict(format!("user {ADMIN_USER} cannot be deleted")));
    }
    if username == claims.0.sub {
        return Err(conflict("you cannot delete yourself"));
    }
    let remaining = state.store.delete_user(username.clone()).await?;
    tracing::info!(by = %Escaped(&claims.0.sub), user = %Escaped(&username), "user deleted");
    Ok(Json(user_docs(&remaining, &claims.0.organization)))
}

/// Body of `POST /api/user/{username}`.
#[derive(Debug, Deserialize)]
pub struct ChangePasswordRequest {
    /// The current password.
    #[serde(rename = "oldPassword")]
    pub old_password: String,
    /// The new password.
    #[serde(rename = "newPassword")]
    pub new_password: String,
}

/// `POST /api/user/{username}` (self only): changes the caller's password.
async fn change_password(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    claims: AccessClaims,
    Path(username): Path<String>,
    UserJson(body): UserJson<ChangePasswordRequest>,
) -> Result<Json<Value>, ApiError> {
    if claims.0.sub != username {
        return Err(ApiError::not_enough_permissions());
    }
    let bad = |message: &str| ApiError::new(StatusCode::BAD_REQUEST, message);
    if body.new_password == body.old_password {
        return Err(bad("the new password must differ from the old one"));
    }
    check_password("newPassword", &body.new_password)?;
    let old_hash = state
        .store
        .password_hash(username.clone())
        .await?
        .ok_or_else(|| Error::NotFound {
            what: "user",
            id: username.clone(),
        })?;
    // No stored password is longer than the limit, so a longer old password is wrong without hashing it.
    if body.old_password.len() > MAX_PASSWORD_LEN
        || !verify(&state, peer, body.old_password, old_hash.clone()).await?
    {
        tracing::info!(user = %Escaped(&username), "password change refused: wrong old password");
        return Err(bad("the old password is wrong"));
    }
    let new_hash = hash(&state, peer, body.new_password).await?;
    let outcome = state
        .store
        .replace_password_hash(username.clone(), old_hash, new_hash)
        .await?;
    match outcome {
        PasswordSwap::Replaced => {
            tracing::info!(user = %Escaped(&username), "password changed");
            Ok(Json(json!({})))
        }
        PasswordSwap::ChangedMeanwhile => Err(conflict(
            "the password was changed by another request meanwhile; try again",
        )),
        PasswordSwap::NoSuchUser => Err(Error::NotFound {
            what: "user",
            id: username,
        }
        .into()),
    }
}

/// `POST /api/user/` and `PUT /api/user/`: password reset by e-mail, which this server does not offer. Needs no
/// token, as in the reference: whoever forgot a password has none.
async fn password_reset() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "password reset by e-mail is not supported; an Admin can set a new password with \
         PUT /api/user/<name> {\"password\": \"...\"}",
    )
}

/// `GET /api/users/` (Admin): every user.
async fn all_users(
    State(state): State<AppState>,
    claims: AccessClaims,
) -> Result<Json<Vec<Value>>, ApiError> {
    require_admin(&claims)?;
    let listing = state.store.user_listing(None).await?;
    Ok(Json(user_docs(&listing, &claims.0.organization)))
}

/// `GET /api/users/{organization_id}` (Admin): the members of an organization.
async fn organization_users(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(org_id): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    require_admin(&claims)?;
    let listing = state.store.user_listing(Some(org_id.clone())).await?;
    Ok(Json(user_docs(&listing, &org_id)))
}

// ---------------------------------------------------------------------------------------------------------------
// Organizations

/// One member in an organization request.
#[derive(Debug, Deserialize)]
pub struct MemberRequest {
    /// User id.
    pub user_id: String,
    /// Roles; default none.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Body of `POST /api/organization/` and `PUT /api/organization/{id}`.
#[derive(Debug, Deserialize)]
pub struct OrganizationRequest {
    /// Name (required to create).
    #[serde(default)]
    pub name: Option<String>,
    /// Members (replacing the current ones on update).
    #[serde(default)]
    pub member: Option<Vec<MemberRequest>>,
}

/// Checks the roles of every member and that no user appears twice.
fn check_members(members: Vec<MemberRequest>) -> Result<Vec<Member>, ApiError> {
    let mut seen = HashSet::new();
    members
        .into_iter()
        .map(|m| {
            if !seen.insert(m.user_id.clone()) {
                return Err(unprocessable(format!(
                    "user {:?} is listed twice in member",
                    m.user_id
                )));
            }
            Ok(Member {
                roles: check_roles(m.roles)?,
                user_id: m.user_id,
            })
        })
        .collect()
}

/// `GET /api/organization/` (Admin): every organization.
async fn all_organizations(
    State(state): State<AppState>,
    claims: AccessClaims,
) -> Result<Json<Vec<Value>>, ApiError> {
    require_admin(&claims)?;
    let orgs = state.store.organizations().await?;
    Ok(Json(orgs.iter().map(org_doc).collect()))
}

/// `GET /api/organization/{id}` (Admin): one organization.
async fn get_organization(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    let org = state
        .store
        .organization(id.clone())
        .await?
        .ok_or(Error::NotFound {
            what: "organization",
            id,
        })?;
    Ok(Json(org_doc(&org)))
}

/// `POST /api/organization/` (Admin): creates an organization.
async fn create_organization(
    State(state): State<AppState>,
    claims: AccessClaims,
    UserJson(body): UserJson<OrganizationRequest>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    let name = body.name.ok_or_else(|| unprocessable("name is required"))?;
    check_name("organization", &name)?;
    let members = check_members(body.member.unwrap_or_default())?;
    let org = state.store.create_organization(name, members).await?;
    tracing::info!(by = %Escaped(&claims.0.sub), organization = %Escaped(&org.name), id = %org.id, "organization created");
    // The reference answers the new id JSON-encoded inside a JSON string (`"\"<id>\""`), and the dashboard
    // decodes exactly that (it `JSON.parse`s a string answer and builds `_id: {$oid: id}` from it).
    Ok(Json(Value::String(Value::String(org.id).to_string())))
}

/// `PUT /api/organization/{id}` (Admin): renames and/or replaces the members.
async fn update_organization(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
    UserJson(body): UserJson<OrganizationRequest>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    if let Some(name) = &body.name {
        check_name("organization", name)?;
    }
    let members = body.member.map(check_members).transpose()?;
    let org = state.store.update_organization(id, body.name, members).await?;
    tracing::info!(by = %Escaped(&claims.0.sub), organization = %Escaped(&org.name), id = %org.id, "organization updated");
    Ok(Json(org_doc(&org)))
}

/// `DELETE /api/organization/{id}` (Admin): deletes an organization other than `root`.
async fn delete_organization(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&claims)?;
    state.store.delete_organization(id.clone()).await?;
    tracing::info!(by = %Escaped(&claims.0.sub), organization = %Escaped(&id), "organization deleted");
    Ok(Json(json!({ "message": "ok" })))
}
