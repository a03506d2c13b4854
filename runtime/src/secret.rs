//! Random secrets and the token files daemons keep them in (join, metrics, plugin and operator tokens): read when
//! present and long enough, made otherwise, always owner-only (0600).

use std::{io, path::Path};

use crate::owner_only;

/// `bytes` random bytes from the OS, as lowercase hex (twice as many characters).
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0_u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| io::Error::other(format!("the OS random source failed: {e}")))?;
    Ok(crate::hex::encode(&buf))
}

/// A fresh id in MongoDB ObjectId shape, as Oakestra's documents carry them: 24 lowercase hex digits, 4 bytes of
/// Unix seconds (the low 32 bits, as ObjectIds keep them) and 8 random bytes.
pub fn object_id() -> io::Result<String> {
    let mut bytes = [0_u8; 12];
    let secs = u32::try_from(crate::time::unix_secs() & u64::from(u32::MAX)).unwrap_or(0);
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    getrandom::fill(&mut bytes[4..])
        .map_err(|e| io::Error::other(format!("the OS random source failed: {e}")))?;
    Ok(crate::hex::encode(&bytes))
}

/// A token read from or written to its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    /// The token (without surrounding whitespace).
    pub token: String,
    /// Whether this call made it (the file was missing or held a token shorter than asked for).
    pub created: bool,
    /// The mode an existing file had when it was looser than 0600 (and was tightened), for the caller to log.
    pub tightened_from: Option<u32>,
}

/// The token in `path` if it holds one of at least `min_len` characters (its mode is tightened to 0600 if it was
/// looser); otherwise a new one of `2 * bytes` hex characters, written to `path` (0600, replacing a short one).
pub fn load_or_create(path: &Path, min_len: usize, bytes: usize) -> io::Result<TokenFile> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().len() >= min_len => {
            let tightened_from = owner_only::restrict(path, owner_only::FILE_MODE)?;
            return Ok(TokenFile {
                token: text.trim().to_owned(),
                created: false,
                tightened_from,
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = random_hex(bytes)?;
    write(path, &token)?;
    Ok(TokenFile {
        token,
        created: true,
        tightened_from: None,
    })
}

/// Writes `token` and a newline to `path` with mode 0600 (also when the file existed with a looser mode).
pub fn write(path: &Path, token: &str) -> io::Result<()> {
    owner_only::create_private_file(path)?;
    owner_only::restrict(path, owner_only::FILE_MODE)?;
    std::fs::write(path, format!("{token}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_once_kept_and_replaced_when_short() {
        let dir = std::env::temp_dir().join(format!("oak-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.token");
        let first = load_or_create(&path, 16, 32).unwrap();
        assert!(first.created);
        assert_eq!(first.token.len(), 64);
        assert!(first.token.bytes().all(|b| b.is_ascii_hexdigit()));
        let again = load_or_create(&path, 16, 32).unwrap();
        assert_eq!(
            again,
            TokenFile {
                token: first.token.clone(),
                created: false,
                tightened_from: None
            }
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(load_or_create(&path, 16, 32).unwrap().tightened_from, Some(0o644));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "short\n").unwrap();
        let replaced = load_or_create(&path, 16, 32).unwrap();
        assert!(replaced.created);
        assert_ne!(replaced.token, first.token);
        assert_ne!(random_hex(16).unwrap(), random_hex(16).unwrap());
        let id = object_id().unwrap();
        assert_eq!(id.len(), 24);
        assert_ne!(id, object_id().unwrap());
        let secs = u32::from_str_radix(&id[..8], 16).unwrap();
        assert!(u64::from(secs).abs_diff(crate::time::unix_secs()) < 5, "{id}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
