//! Tokens without HTTP: the persisted HS256 signing key, issuing and verifying tokens, and the revocation check
//! against the users' token generations. The extractors that guard routes with these live in the HTTP layer
//! (`api::extract`); password hashing is [`crate::hashing`].

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{Error, store::Generations};

/// Length of the HS256 key in bytes.
pub const KEY_LEN: usize = 32;
/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "jwt.key";

/// Which kind of token a JWT is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// Short-lived, accepted by protected routes.
    Access,
    /// Long-lived, accepted only by `POST /api/auth/refresh`.
    Refresh,
}

/// The claims of every token this server issues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User name.
    pub sub: String,
    /// Access or refresh.
    #[serde(rename = "type")]
    pub kind: TokenType,
    /// Roles in `organization`.
    pub roles: Vec<String>,
    /// Organization id.
    pub organization: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires (Unix seconds).
    pub exp: u64,
    /// Unique token id (24 hex digits).
    pub jti: String,
    /// The user's token generation when the token was issued (see [`crate::store::tokens`]); a token whose
    /// generation is not the user's current one is revoked. Tokens from before revocation existed have none.
    #[serde(rename = "gen", default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// Why a presented token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The request carries no bearer token.
    #[error("no bearer token")]
    Missing,
    /// A bad signature, a token outside its time window, a malformed token, or one of the other kind.
    #[error("{0}")]
    Invalid(String),
    /// A well-signed token of an earlier token generation: the user's password or roles changed since it was
    /// issued, or the user is gone.
    #[error("the token of user {user:?} was revoked")]
    Revoked {
        /// The token's user name.
        user: String,
    },
}

/// The HS256 key, loaded from or created at `<data-dir>/jwt.key`.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<hs256 secret>)")
    }
}

impl Keys {
    /// Builds the keys from raw secret bytes.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Tokens are checked to the second: an expired token is refused at once.
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Reads `<data_dir>/jwt.key` (tightening it to 0600 if others may read it), or creates it (32 random bytes,
    /// mode 0600) when absent. Blocking.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(KEY_FILE);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == KEY_LEN => {
                crate::keep_private(&path, oakestra_runtime::owner_only::FILE_MODE)?;
                return Ok(Self::from_secret(&bytes));
            }
            Ok(bytes) => {
                return Err(Error::Corrupt {
                    path,
                    what: format!("signing key has {} bytes, expected {KEY_LEN}", bytes.len()),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let mut secret = [0_u8; KEY_LEN];
        getrandom::fill(&mut secret).map_err(|e| Error::Random(e.to_string()))?;
        write_private(&path, &secret).map_err(io)?;
        tracing::info!(path = %path.display(), "created a new token-signing key");
        Ok(Self::from_secret(&secret))
    }

    /// Signs a token of `kind` for `sub` (whose token generation is `generation`) valid for `ttl` from now.
    pub fn issue(
        &self,
        kind: TokenType,
        sub: &str,
        generation: i64,
        roles: &[String],
        organization: &str,
        ttl: Duration,
    ) -> Result<String, Error> {
        let now = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            kind,
            roles: roles.to_vec(),
            organization: organization.to_owned(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl.as_secs()),
            jti: crate::store::new_id()?,
            generation: Some(generation),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use it to craft expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| Error::Token(e.to_string()))
    }

    /// Verifies signature, time window and kind; returns the claims or why the token is refused
    /// ([`TokenError::Invalid`]).
    pub fn verify(&self, token: &str, kind: TokenType) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if data.claims.kind != kind {
            return Err(TokenError::Invalid(format!(
                "expected a {kind:?} token, got a {:?} token",
                data.claims.kind
            )));
        }
        Ok(data.claims)
    }
}

/// Writes a new file readable by its owner only.
fn write_private(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    oakestra_runtime::time::unix_secs()
}

/// Whether `claims` still hold: the user exists and its token generation is the one the token was issued with.
pub fn is_current(claims: &Claims, generations: &Generations) -> bool {
    claims.generation.is_some() && generations.get(&claims.sub) == claims.generation
}

/// Whether the token holds the `Admin` role.
pub fn is_admin(claims: &Claims) -> bool {
    claims.roles.iter().any(|r| r == "Admin")
}

/// The claims of `token` (the request's bearer token, if any) when it is a valid **access** token of the user's
/// current token generation: what every protected route asks.
pub fn check_access(
    keys: &Keys,
    generations: &Generations,
    token: Option<&str>,
) -> Result<Claims, TokenError> {
    let claims = keys.verify(token.ok_or(TokenError::Missing)?, TokenType::Access)?;
    if !is_current(&claims, generations) {
        return Err(TokenError::Revoked { user: claims.sub });
    }
    Ok(claims)
}

/// The claims of `token` when it is a valid **refresh** token. Its generation is not checked here: a refresh token
/// lives for weeks and is checked rarely, so the caller compares it with the database rather than the in-memory
/// copy of the generations.
pub fn check_refresh(keys: &Keys, token: Option<&str>) -> Result<Claims, TokenError> {
    keys.verify(token.ok_or(TokenError::Missing)?, TokenType::Refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_not_interchangeable() {
        let keys = Keys::from_secret(&[7; KEY_LEN]);
        let t = keys
            .issue(TokenType::Refresh, "u", 7, &[], "o", Duration::from_secs(60))
            .unwrap();
        assert!(keys.verify(&t, TokenType::Access).is_err());
        let c = keys.verify(&t, TokenType::Refresh).unwrap();
        assert_eq!(c.sub, "u");
        assert_eq!(c.generation, Some(7));
        let other = Keys::from_secret(&[8; KEY_LEN]);
        assert!(other.verify(&t, TokenType::Refresh).is_err());
    }

    #[test]
    fn access_needs_a_current_generation() {
        let keys = Keys::from_secret(&[7; KEY_LEN]);
        let generations = Generations::default();
        generations.set("u", 3);
        let issue = |generation| {
            keys.issue(
                TokenType::Access,
                "u",
                generation,
                &[],
                "o",
                Duration::from_secs(60),
            )
            .unwrap()
        };
        assert_eq!(check_access(&keys, &generations, None), Err(TokenError::Missing));
        assert!(matches!(
            check_access(&keys, &generations, Some("not a token")),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(
            check_access(&keys, &generations, Some(&issue(3))).unwrap().sub,
            "u"
        );
        assert_eq!(
            check_access(&keys, &generations, Some(&issue(2))),
            Err(TokenError::Revoked { user: "u".into() })
        );
        let refresh = keys
            .issue(TokenType::Refresh, "u", 3, &[], "o", Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            check_access(&keys, &generations, Some(&refresh)),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(check_refresh(&keys, Some(&refresh)).unwrap().generation, Some(3));
        assert_eq!(check_refresh(&keys, None), Err(TokenError::Missing));
    }
}
