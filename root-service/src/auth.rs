//! Password hashing (argon2id), the persisted HS256 signing key, token issuing/verification, and the
//! [`AccessClaims`] extractor guarding protected routes.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use argon2::Argon2;
use axum::{
    extract::{FromRef, FromRequestParts},
    http::request::Parts,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use oakestra_protocol::text::Escaped;
use serde::{Deserialize, Serialize};

use crate::{Error, api::ApiError, store::Generations};

/// Length of the HS256 key in bytes.
pub const KEY_LEN: usize = 32;
/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "jwt.key";

/// Argon2id memory cost in KiB: 7 MiB with 5 passes, one of OWASP's equivalent argon2id settings (the crate's
/// default is 19 MiB × 2). The lower memory keeps the service's resident size small on edge hardware.
pub const ARGON2_MEMORY_KIB: u32 = 7 * 1024;
/// Argon2id passes.
pub const ARGON2_PASSES: u32 = 5;

fn argon2() -> Argon2<'static> {
    let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, 1, None).unwrap_or_default();
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// One job for the hashing thread: it gets the thread's reusable argon2 memory.
type HashJob = Box<dyn FnOnce(&mut [argon2::Block]) + Send>;

/// Runs `f` on the one thread that does all password hashing, with that thread's argon2 memory, and waits.
///
/// Why: argon2 needs a multi-MiB block per hash. Allocated per call (as the crate does), glibc keeps the freed
/// blocks in per-thread arenas and the service's resident size grows with every login. One thread owning one
/// block, allocated once, keeps it at exactly that block.
fn on_hashing_thread<T: Send + 'static>(
    f: impl FnOnce(&mut [argon2::Block]) -> T + Send + 'static,
) -> Result<T, Error> {
    static SENDER: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>>> =
        std::sync::OnceLock::new();
    let sender = SENDER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        std::thread::Builder::new()
            .name("password-hashing".into())
            .spawn(move || {
                let blocks = usize::try_from(ARGON2_MEMORY_KIB).unwrap_or(0);
                let mut memory = vec![argon2::Block::new(); blocks];
                for job in rx {
                    job(&mut memory);
                }
            })
            .ok()
            .map(|_| std::sync::Mutex::new(tx))
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
    let job: HashJob = Box::new(move |memory| {
        let _ = reply_tx.send(f(memory));
    });
    let sent = sender.as_ref().is_some_and(|s| {
        s.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .is_ok()
    });
    if !sent {
        return Err(Error::Hash("the password-hashing thread is not running".into()));
    }
    reply_rx
        .recv()
        .map_err(|_| Error::Hash("the password-hashing thread stopped".into()))
}

/// Hashes a password into a PHC string (argon2id, random 16-byte salt, 32-byte output). Blocks: call it from a
/// blocking context.
pub fn hash_password(password: &str) -> Result<String, Error> {
    use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
    let password = password.to_owned();
    let mut salt = [0_u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Error::Random(e.to_string()))?;
    on_hashing_thread(move |memory| {
        let hasher = argon2();
        let fail = |e: &dyn std::fmt::Display| Error::Hash(e.to_string());
        let mut out = [0_u8; 32];
        let blocks = hasher.params().block_count();
        let memory = memory
            .get_mut(..blocks)
            .ok_or_else(|| fail(&"argon2 memory too small"))?;
        hasher
            .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory)
            .map_err(|e| fail(&e))?;
        let phc = PasswordHash {
            algorithm: argon2::Algorithm::Argon2id.ident(),
            version: Some(argon2::Version::V0x13.into()),
            params: ParamsString::try_from(hasher.params()).map_err(|e| fail(&e))?,
            salt: Some(Salt::new(&salt).map_err(|e| fail(&e))?),
            hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
        };
        Ok(phc.to_string())
    })?
}

/// Whether `password` matches the PHC string `hash` (whatever argon2 parameters it was made with). A malformed
/// hash never matches. Blocks: call it from a blocking context.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::phc::PasswordHash;
    let (password, hash) = (password.to_owned(), hash.to_owned());
    on_hashing_thread(move |memory| {
        let Ok(phc) = PasswordHash::new(&hash) else {
            return false;
        };
        let (Ok(params), Ok(algorithm), Some(salt), Some(expected)) = (
            argon2::Params::try_from(&phc),
            argon2::Algorithm::try_from(phc.algorithm.as_str()),
            phc.salt,
            phc.hash,
        ) else {
            return false;
        };
        let version = phc
            .version
            .map_or(Ok(argon2::Version::V0x13), argon2::Version::try_from)
            .unwrap_or(argon2::Version::V0x13);
        let blocks = params.block_count();
        let hasher = Argon2::new(algorithm, version, params);
        let mut out = vec![0_u8; expected.len()];
        let computed = match memory.get_mut(..blocks) {
            Some(memory) => {
                hasher.hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory)
            }
            // A hash made with more memory than ours (e.g. an older default): let the crate allocate.
            None => hasher.hash_password_into(password.as_bytes(), &salt, &mut out),
        };
        computed.is_ok()
            && out
                .iter()
                .zip(expected.as_bytes())
                .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
    .unwrap_or(false)
}

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
                crate::keep_private(&path, oakestra_protocol::owner_only::FILE_MODE)?;
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

    /// Verifies signature, time window and kind; returns the claims or why the token is refused.
    pub fn verify(&self, token: &str, kind: TokenType) -> Result<Claims, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| e.to_string())?;
        if data.claims.kind != kind {
            return Err(format!(
                "expected a {kind:?} token, got a {:?} token",
                data.claims.kind
            ));
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The bearer token of a request, if it carries one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_in(&parts.headers)
}

/// The token of an `Authorization: Bearer <token>` header among `headers`, if any.
pub fn bearer_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    oakestra_protocol::bearer::token(value)
}

/// Whether `claims` still hold: the user exists and its token generation is the one the token was issued with.
pub fn is_current(claims: &Claims, generations: &Generations) -> bool {
    claims.generation.is_some() && generations.get(&claims.sub) == claims.generation
}

/// A request authenticated with a valid **access** token of the user's current token generation. A missing,
/// invalid or expired token is refused with 401 `{"message":"Missing authentication token"}`, a revoked one (the
/// user's password or roles changed, or the user is gone) with 401 and a message saying so.
#[derive(Debug, Clone)]
pub struct AccessClaims(pub Claims);

impl<S> FromRequestParts<S> for AccessClaims
where
    S: Send + Sync,
    Arc<Keys>: FromRef<S>,
    Arc<Generations>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<Keys>::from_ref(state);
        let token = bearer(parts).ok_or_else(ApiError::missing_token)?;
        let claims = keys.verify(token, TokenType::Access).map_err(|why| {
            tracing::debug!(%why, "access token refused");
            ApiError::missing_token()
        })?;
        if !is_current(&claims, &Arc::<Generations>::from_ref(state)) {
            tracing::debug!(user = %Escaped(&claims.sub), "revoked access token refused");
            return Err(ApiError::token_revoked());
        }
        Ok(AccessClaims(claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{h}");
        // Hashes made with other parameters (e.g. the crate default of earlier versions) still verify.
        use argon2::{PasswordHasher, PasswordVerifier};
        let old = Argon2::default().hash_password(b"pw").unwrap().to_string();
        assert!(verify_password("pw", &old));
        assert!(!verify_password("px", &old));
        // Ours is a standard PHC string the crate's own verifier accepts.
        assert!(Argon2::default().verify_password(b"pw", h.as_str()).is_ok());
        assert!(Argon2::default().verify_password(b"px", h.as_str()).is_err());
        assert_ne!(hash_password("pw").unwrap(), h, "random salt");
        assert!(verify_password("pw", &h));
        assert!(!verify_password("other", &h));
        assert!(!verify_password("pw", "not a hash"));
    }

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
}
