//! Files and directories only their owner may read: the daemons' data directories (0700), databases and secrets
//! (0600). [`restrict`] also tightens what already exists with looser modes (an older version, a copy, a umask of
//! 0), so a restart repairs them; it reports the mode it replaced so the caller can log it.
//!
//! On non-Unix systems there are no modes to set and every function only creates what it is asked to.

use std::{io, path::Path};

/// Mode of a private file: owner read and write.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a private directory: owner read, write and search.
pub const DIR_MODE: u32 = 0o700;

/// Removes from `path`'s permissions every bit `mode` does not allow (`0644` with [`FILE_MODE`] becomes `0600`,
/// `0400` stays). Returns the previous permission bits when it changed them, `None` when they were already within
/// `mode` or `path` does not exist.
pub fn restrict(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let current = metadata.permissions().mode() & 0o7777;
        if current & !mode == 0 {
            return Ok(None);
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))?;
        Ok(Some(current))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(None)
    }
}

/// Creates the directory `path` (its missing parents with the default mode) as [`DIR_MODE`], or tightens it to
/// that if it exists. Returns the previous mode when it tightened an existing directory.
pub fn create_private_dir(path: &Path) -> io::Result<Option<u32>> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    match builder.create(path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => restrict(path, DIR_MODE),
        Err(e) => Err(e),
    }
}

/// Creates `path` as an empty [`FILE_MODE`] file if it does not exist (an existing file is left as it is).
pub fn create_private_file(path: &Path) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn set(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn creates_and_tightens() {
        let base = std::env::temp_dir().join(format!("oakestra-owner-only-{}", std::process::id()));
        let dir = base.join("a/data");
        assert_eq!(create_private_dir(&dir).unwrap(), None);
        assert_eq!(mode(&dir), 0o700);
        set(&dir, 0o755);
        assert_eq!(create_private_dir(&dir).unwrap(), Some(0o755));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(create_private_dir(&dir).unwrap(), None, "already tight");

        let file = dir.join("secret");
        create_private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::write(&file, b"kept").unwrap();
        set(&file, 0o644);
        create_private_file(&file).unwrap();
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"kept",
            "an existing file is not truncated"
        );
        assert_eq!(restrict(&file, FILE_MODE).unwrap(), Some(0o644));
        assert_eq!(mode(&file), 0o600);
        set(&file, 0o400);
        assert_eq!(restrict(&file, FILE_MODE).unwrap(), None, "tighter stays");
        assert_eq!(mode(&file), 0o400);
        assert_eq!(restrict(&dir.join("absent"), FILE_MODE).unwrap(), None);
        let _ = std::fs::remove_dir_all(&base);
    }
}
