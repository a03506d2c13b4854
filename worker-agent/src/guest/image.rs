//! Unikernel images the reference way: picking the tarball URL for this worker's architecture, and the on-disk
//! cache of downloaded tarballs, keyed by content digest with a URL index, shared by instances and restarts and
//! garbage-collected when unused.
//!
//! A tarball (`.tar.gz`) holds `kernel`, optionally `initramfs.cpio` and a directory `files1/` (or `files/`) that the
//! guest sees over 9p. Layout of the cache directory:
//!
//! ```text
//! <cache>/blobs/<sha256>/kernel, initramfs.cpio, files/…   extracted, complete (renamed into place at the end)
//! <cache>/blobs/<sha256>/.users/<task>                     one lock file per instance using the image
//! <cache>/urls/<sha256 of the URL>                         "<sha256>\n<url>\n": which content a URL gave
//! <cache>/tmp/                                             downloads and extractions in progress
//! ```

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use super::GuestError;
use crate::registry::Registry;

/// Largest tarball downloaded by default (`--unikernel-max-image-mib`).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 512 * 1024 * 1024;
/// Largest total of extracted bytes, as a multiple of the download limit (a gzip bomb stops here).
const EXTRACT_FACTOR: u64 = 4;
/// Most entries a tarball may hold.
const MAX_ENTRIES: usize = 10_000;
/// How long an unused image stays cached by default.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(3600);

/// The Go name of an architecture, as `arch[]` entries and the registration use it (`amd64`, `arm64`, …).
pub fn normalize_arch(arch: &str) -> String {
    match arch.trim().to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "amd64" => "amd64".to_owned(),
        "aarch64" | "arm64" => "arm64".to_owned(),
        "armv7l" | "armhf" | "arm" => "arm".to_owned(),
        other => other.to_owned(),
    }
}

/// The tarball URL for `host_arch` among `code` (comma-separated URLs, aligned with `arch`; the reference's
/// format), or `vm_images` when `code` is empty.
pub fn pick_url(
    code: &str,
    vm_images: &[String],
    arch: &[String],
    host_arch: &str,
) -> Result<String, GuestError> {
    let mut urls: Vec<String> = code
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        urls = vm_images
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
    }
    if urls.is_empty() {
        return Err(GuestError::Image(
            "code is empty: a unikernel service names its kernel tarball URLs in `code` (comma-separated, one per entry of `arch`)".into(),
        ));
    }
    let host = normalize_arch(host_arch);
    let index = if arch.is_empty() {
        if urls.len() > 1 {
            return Err(GuestError::Image(format!(
                "code lists {} URLs but arch is empty: arch must name the architecture of each URL, in order",
                urls.len()
            )));
        }
        0
    } else {
        if arch.len() != urls.len() {
            return Err(GuestError::Image(format!(
                "code lists {} URLs but arch lists {} architectures ({}): they must align one to one",
                urls.len(),
                arch.len(),
                arch.join(", ")
            )));
        }
        arch.iter()
            .position(|a| normalize_arch(a) == host)
            .ok_or_else(|| {
                GuestError::Image(format!(
                    "no image for this worker's architecture {host}: the service offers {}",
                    arch.join(", ")
                ))
            })?
    };
    let url = urls.swap_remove(index);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(GuestError::Image(format!(
            "code URL {url:?}: must be an http:// or https:// URL of a .tar.gz"
        )));
    }
    Ok(url)
}

/// An extracted image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Hex SHA-256 of the tarball.
    pub digest: String,
    /// The image's directory.
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// `initramfs.cpio`, when the tarball has one.
    pub initramfs: Option<PathBuf>,
    /// The 9p files (`files1/` or `files/` of the tarball), when it has them.
    pub files: Option<PathBuf>,
}

impl GuestImage {
    fn at(digest: &str, dir: PathBuf) -> Option<Self> {
        let kernel = dir.join("kernel");
        if !kernel.is_file() {
            return None;
        }
        let initramfs = Some(dir.join("initramfs.cpio")).filter(|p| p.is_file());
        let files = Some(dir.join("files")).filter(|p| p.is_dir());
        Some(Self {
            digest: digest.to_owned(),
            dir,
            kernel,
            initramfs,
            files,
        })
    }
}

/// Download progress: bytes received and, when known, the total.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

/// The image cache.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    max_bytes: u64,
    keep: Duration,
    /// One download per URL at a time: concurrent deploys of a service wait for the first one's download.
    inflight: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

fn url_key(url: &str) -> String {
    oakestra_runtime::hex::encode(&Sha256::digest(url.as_bytes()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ImageCache {
    /// A cache in `dir` that downloads at most `max_bytes` per tarball and keeps unused images for `keep`.
    pub fn new(dir: PathBuf, max_bytes: u64, keep: Duration) -> Self {
        Self {
            dir,
            max_bytes,
            keep,
            inflight: Arc::default(),
        }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_dir(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(digest)
    }

    /// The cached image `url` gave before, if it is still complete.
    pub fn lookup(&self, url: &str) -> Option<GuestImage> {
        let index = std::fs::read_to_string(self.dir.join("urls").join(url_key(url))).ok()?;
        let mut lines = index.lines();
        let digest = lines.next()?.trim();
        if lines.next().map(str::trim) != Some(url) || digest.len() != 64 {
            return None;
        }
        GuestImage::at(digest, self.blob_dir(digest))
    }

    /// The image of `url`: from the cache, or downloaded (reporting `progress`), verified and extracted. Nothing
    /// of a failed download or extraction stays behind.
    pub async fn get(
        &self,
        registry: &Registry,
        url: &str,
        progress: Progress<'_>,
    ) -> Result<(GuestImage, bool), GuestError> {
        let gate = lock(&self.inflight).entry(url.to_owned()).or_default().clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(image) = self.lookup(url) {
            return Ok((image, true));
        }
        let result = self.download(registry, url, progress).await;
        lock(&self.inflight).remove(url);
        result.map(|image| (image, false))
    }

    async fn download(
        &self,
        registry: &Registry,
        url: &str,
        progress: Progress<'_>,
    ) -> Result<GuestImage, GuestError> {
        let tmp = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| GuestError::io(&tmp, &e))?;
        let part = tmp.join(format!("{}.{}.tar.gz", url_key(url), std::process::id()));
        let fail = |e: GuestError| {
            let _ = std::fs::remove_file(&part);
            e
        };
        let mut body = registry
            .download(url, self.max_bytes)
            .await
            .map_err(|e| fail(GuestError::Download(e.to_string())))?;
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(|e| fail(GuestError::io(&part, &e)))?;
        let mut hasher = Sha256::new();
        let mut last_report = 0u64;
        progress(0, body.length());
        loop {
            match body.next_chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                        .await
                        .map_err(|e| fail(GuestError::io(&part, &e)))?;
                    // Progress every 4 MiB: often enough to see it move, rarely enough not to flood the cluster.
                    if body.received() - last_report >= 4 * 1024 * 1024 {
                        last_report = body.received();
                        progress(last_report, body.length());
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(fail(GuestError::Download(e.to_string()))),
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| fail(GuestError::io(&part, &e)))?;
        drop(file);
        progress(body.received(), body.length());
        let digest = oakestra_runtime::hex::encode(&hasher.finalize());
        let cache = self.clone();
        let url_owned = url.to_owned();
        let part_owned = part.clone();
        let image = tokio::task::spawn_blocking(move || cache.install(&url_owned, &part_owned, &digest))
            .await
            .map_err(|e| GuestError::Image(format!("extraction task failed: {e}")));
        let _ = std::fs::remove_file(&part);
        image?
    }

    /// Extracts the downloaded tarball `part` (digest `digest`) into the cache and indexes `url`.
    fn install(&self, url: &str, part: &Path, digest: &str) -> Result<GuestImage, GuestError> {
        let target = self.blob_dir(digest);
        if GuestImage::at(digest, target.clone()).is_none() {
            let staging = self
                .dir
                .join("tmp")
                .join(format!("{digest}.{}.d", std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            let extracted = extract(part, &staging, self.max_bytes.saturating_mul(EXTRACT_FACTOR), url);
            if let Err(e) = extracted {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            let blobs = self.dir.join("blobs");
            std::fs::create_dir_all(&blobs).map_err(|e| GuestError::io(&blobs, &e))?;
            let _ = std::fs::remove_dir_all(&target);
            if let Err(e) = std::fs::rename(&staging, &target) {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(GuestError::io(&target, &e));
            }
        }
        let urls = self.dir.join("urls");
        std::fs::create_dir_all(&urls).map_err(|e| GuestError::io(&urls, &e))?;
        let index = urls.join(url_key(url));
        std::fs::write(&index, format!("{digest}\n{url}\n")).map_err(|e| GuestError::io(&index, &e))?;
        touch(&target);
        GuestImage::at(digest, target.clone()).ok_or_else(|| {
            GuestError::Image(format!(
                "{url}: the tarball has no file `kernel` at its top level"
            ))
        })
    }

    /// Marks `image` as used by `task` (its lock file), so garbage collection keeps it.
    pub fn acquire(&self, image: &GuestImage, task: &str) -> Result<(), GuestError> {
        let users = image.dir.join(".users");
        std::fs::create_dir_all(&users).map_err(|e| GuestError::io(&users, &e))?;
        let lock_file = users.join(task);
        std::fs::write(&lock_file, b"").map_err(|e| GuestError::io(&lock_file, &e))?;
        touch(&image.dir);
        Ok(())
    }

    /// Drops `task`'s locks on every image.
    pub fn release(&self, task: &str) {
        let Ok(blobs) = std::fs::read_dir(self.dir.join("blobs")) else {
            return;
        };
        for blob in blobs.flatten() {
            let lock_file = blob.path().join(".users").join(task);
            if lock_file.exists() {
                let _ = std::fs::remove_file(&lock_file);
                touch(&blob.path());
            }
        }
    }

    /// The tasks holding a lock on some image.
    pub fn users(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(blobs) = std::fs::read_dir(self.dir.join("blobs")) else {
            return out;
        };
        for blob in blobs.flatten() {
            if let Ok(users) = std::fs::read_dir(blob.path().join(".users")) {
                out.extend(
                    users
                        .flatten()
                        .map(|u| u.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        out.sort();
        out
    }

    /// Removes images no instance uses that were last used more than `keep` ago, the URL entries pointing at
    /// removed images, and leftovers of interrupted downloads. `alive` says whether a lock holder still exists
    /// (locks of vanished instances are dropped). Returns the number of images removed.
    pub fn gc(&self, alive: &dyn Fn(&str) -> bool) -> usize {
        let now = SystemTime::now();
        let mut removed = 0;
        if let Ok(blobs) = std::fs::read_dir(self.dir.join("blobs")) {
            for blob in blobs.flatten() {
                let path = blob.path();
                let users = path.join(".users");
                let mut in_use = false;
                if let Ok(entries) = std::fs::read_dir(&users) {
                    for user in entries.flatten() {
                        if alive(&user.file_name().to_string_lossy()) {
                            in_use = true;
                        } else {
                            let _ = std::fs::remove_file(user.path());
                        }
                    }
                }
                let idle = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                if !in_use && idle >= self.keep && std::fs::remove_dir_all(&path).is_ok() {
                    tracing::info!(digest = %blob.file_name().to_string_lossy(), idle_s = idle.as_secs(), "unused unikernel image removed from the cache");
                    removed += 1;
                }
            }
        }
        if let Ok(urls) = std::fs::read_dir(self.dir.join("urls")) {
            for entry in urls.flatten() {
                let digest = std::fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| t.lines().next().map(str::to_owned))
                    .unwrap_or_default();
                if digest.is_empty() || !self.blob_dir(digest.trim()).is_dir() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // Whatever is in tmp/ belongs to a download of this process or of a dead one: only clean it when idle.
        if lock(&self.inflight).is_empty() {
            let _ = std::fs::remove_dir_all(self.dir.join("tmp"));
        }
        removed
    }
}

/// Sets the modification time of `dir` to now (the image's "last used").
fn touch(dir: &Path) {
    let marker = dir.join(".used");
    let _ = std::fs::write(&marker, b"");
    let _ = std::fs::remove_file(&marker);
}

/// Where an entry of the tarball goes inside the image directory: `kernel`, `initramfs.cpio`, `files/<…>` (from
/// `files1/` or `files/`), or nowhere (`None`: ignored). Absolute paths and `..` are errors.
pub fn entry_target(path: &Path) -> Result<Option<PathBuf>, String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "entry {:?} leaves the tarball's directory",
                    path.display().to_string()
                ));
            }
        }
    }
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    Ok(match (first.as_str(), parts.len()) {
        ("kernel", 1) => Some(PathBuf::from("kernel")),
        ("initramfs.cpio", 1) => Some(PathBuf::from("initramfs.cpio")),
        ("files1" | "files", _) => {
            let mut p = PathBuf::from("files");
            p.extend(&parts[1..]);
            Some(p)
        }
        _ => None,
    })
}

/// Extracts the gzip'd tarball `part` into `dest`: regular files and directories only, at most `limit` bytes.
fn extract(part: &Path, dest: &Path, limit: u64, url: &str) -> Result<(), GuestError> {
    let bad = |why: String| GuestError::Image(format!("{url}: {why}"));
    let file = std::fs::File::open(part).map_err(|e| GuestError::io(part, &e))?;
    let mut magic = [0u8; 2];
    std::fs::File::open(part)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|_| bad("not a gzip file (it is empty or shorter than 2 bytes)".into()))?;
    if magic != [0x1f, 0x8b] {
        return Err(bad(format!(
            "not a gzip file (starts with {:02x} {:02x}, expected 1f 8b): the image must be a .tar.gz",
            magic[0], magic[1]
        )));
    }
    std::fs::create_dir_all(dest).map_err(|e| GuestError::io(dest, &e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a readable tar.gz: {e}")))?;
    let mut total = 0u64;
    let mut seen_files1 = false;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| bad(format!("not a readable tar.gz: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let Some(relative) = entry_target(&path).map_err(&bad)? else {
            continue;
        };
        // files1/ wins over files/ (the reference's order).
        if path.components().any(|c| c.as_os_str() == "files1") {
            if !seen_files1 {
                seen_files1 = true;
                let _ = std::fs::remove_dir_all(dest.join("files"));
            }
        } else if seen_files1 && relative.starts_with("files") {
            continue;
        }
        let target = dest.join(&relative);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| GuestError::io(&target, &e))?;
            continue;
        }
        if !kind.is_file() {
            // Links and devices could point outside the image; the guest's files are plain files.
            tracing::debug!(entry = %path.display(), "tarball entry that is not a file or directory skipped");
            continue;
        }
        total = total.saturating_add(entry.size());
        if total > limit {
            return Err(bad(format!("extracts to more than {limit} bytes")));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| GuestError::io(parent, &e))?;
        }
        let mut out = std::fs::File::create(&target).map_err(|e| GuestError::io(&target, &e))?;
        std::io::copy(&mut (&mut entry).take(limit), &mut out)
            .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
    }
    if !dest.join("kernel").is_file() {
        return Err(bad("the tarball has no file `kernel` at its top level".into()));
    }
    Ok(())
}

/// Copies the directory tree `from` to `to` (regular files and directories).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn picks_the_url_aligned_with_the_host_architecture() {
        let code = "http://h/a.tar.gz, http://h/b.tar.gz";
        assert_eq!(
            pick_url(code, &[], &s(&["arm64", "amd64"]), "x86_64").unwrap(),
            "http://h/b.tar.gz"
        );
        assert_eq!(
            pick_url(code, &[], &s(&["aarch64", "x86_64"]), "aarch64").unwrap(),
            "http://h/a.tar.gz"
        );
        // A single URL without arch is taken as is; vm_images stand in for an empty code.
        assert_eq!(
            pick_url("http://h/x.tar.gz", &[], &[], "amd64").unwrap(),
            "http://h/x.tar.gz"
        );
        assert_eq!(
            pick_url("", &s(&["https://h/y.tar.gz"]), &s(&["amd64"]), "amd64").unwrap(),
            "https://h/y.tar.gz"
        );
    }

    #[test]
    fn picking_errors_name_what_is_wrong() {
        let e = pick_url("http://h/a.tar.gz", &[], &s(&["arm64"]), "amd64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("amd64") && e.contains("offers arm64"), "{e}");
        let e = pick_url("http://h/a,http://h/b", &[], &s(&["amd64"]), "amd64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 URLs") && e.contains("1 architectures"), "{e}");
        let e = pick_url("http://h/a,http://h/b", &[], &[], "amd64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("arch is empty"), "{e}");
        let e = pick_url(" , ", &[], &[], "amd64").unwrap_err().to_string();
        assert!(e.contains("code is empty"), "{e}");
        let e = pick_url("ftp://h/a.tar.gz", &[], &s(&["amd64"]), "amd64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp://h/a.tar.gz") && e.contains("http"), "{e}");
    }

    #[test]
    fn tarball_entries_map_to_the_image_layout() {
        let t = |p: &str| entry_target(Path::new(p));
        assert_eq!(t("kernel").unwrap(), Some(PathBuf::from("kernel")));
        assert_eq!(t("./kernel").unwrap(), Some(PathBuf::from("kernel")));
        assert_eq!(
            t("initramfs.cpio").unwrap(),
            Some(PathBuf::from("initramfs.cpio"))
        );
        assert_eq!(t("files1/a/b.txt").unwrap(), Some(PathBuf::from("files/a/b.txt")));
        assert_eq!(t("files/c").unwrap(), Some(PathBuf::from("files/c")));
        assert_eq!(t("README").unwrap(), None);
        assert_eq!(t("sub/kernel").unwrap(), None);
        assert!(t("../kernel").is_err());
        assert!(t("/etc/passwd").is_err());
        assert!(t("files1/../../x").is_err());
    }

    /// A `.tar.gz` with `entries` (name, content; a name ending in `/` is a directory).
    pub(crate) fn tarball(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            if name.ends_with('/') {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_mode(0o755);
                header.set_cksum();
                builder.append_data(&mut header, name, std::io::empty()).unwrap();
            } else {
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                builder.append_data(&mut header, name, *data).unwrap();
            }
        }
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("oak-img-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn install_extracts_indexes_reuses_and_collects() {
        let dir = scratch("install");
        let cache = ImageCache::new(dir.join("cache"), 1 << 20, Duration::ZERO);
        let data = tarball(&[
            ("kernel", b"KERNEL"),
            ("initramfs.cpio", b"CPIO"),
            ("files/", b""),
            ("files/old.txt", b"old"),
            ("files1/", b""),
            ("files1/index.html", b"hello"),
            ("other/ignored", b"x"),
        ]);
        let part = dir.join("a.tar.gz");
        std::fs::write(&part, &data).unwrap();
        let digest = oakestra_runtime::hex::encode(&Sha256::digest(&data));
        let img = cache.install("http://h/a.tar.gz", &part, &digest).unwrap();
        assert_eq!(std::fs::read(&img.kernel).unwrap(), b"KERNEL");
        assert_eq!(std::fs::read(img.initramfs.as_ref().unwrap()).unwrap(), b"CPIO");
        let files = img.files.clone().unwrap();
        assert_eq!(std::fs::read(files.join("index.html")).unwrap(), b"hello");
        assert!(!files.join("old.txt").exists(), "files1/ replaces files/");
        assert!(!img.dir.join("other").exists());
        // The URL index finds it; a second URL with the same content shares the blob.
        assert_eq!(cache.lookup("http://h/a.tar.gz"), Some(img.clone()));
        assert_eq!(cache.lookup("http://h/b.tar.gz"), None);
        let again = cache.install("http://h/b.tar.gz", &part, &digest).unwrap();
        assert_eq!(again.dir, img.dir);
        // In use: kept; released (or its holder gone): collected with its URL entries (keep = 0).
        cache.acquire(&img, "a.b.c.d.instance.0").unwrap();
        assert_eq!(cache.users(), vec!["a.b.c.d.instance.0".to_owned()]);
        assert_eq!(cache.gc(&|_| true), 0);
        assert!(img.dir.is_dir());
        assert_eq!(
            cache.gc(&|_| false),
            1,
            "a lock of a vanished instance does not pin the image"
        );
        assert!(!img.dir.exists());
        assert_eq!(cache.lookup("http://h/a.tar.gz"), None);
        assert!(
            std::fs::read_dir(dir.join("cache/urls"))
                .unwrap()
                .next()
                .is_none()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keep_time_protects_recently_used_images() {
        let dir = scratch("keep");
        let cache = ImageCache::new(dir.join("cache"), 1 << 20, Duration::from_secs(3600));
        let data = tarball(&[("kernel", b"K")]);
        let part = dir.join("a.tar.gz");
        std::fs::write(&part, &data).unwrap();
        let img = cache
            .install(
                "http://h/a",
                &part,
                &oakestra_runtime::hex::encode(&Sha256::digest(&data)),
            )
            .unwrap();
        cache.acquire(&img, "t").unwrap();
        cache.release("t");
        assert!(cache.users().is_empty());
        assert_eq!(cache.gc(&|_| false), 0, "released a moment ago: kept for an hour");
        assert!(img.kernel.is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn broken_tarballs_fail_with_the_reason_and_leave_nothing() {
        let dir = scratch("broken");
        let cache = ImageCache::new(dir.join("cache"), 1024, Duration::ZERO);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("notgz", b"<html>404</html>".to_vec(), "not a gzip file"),
            (
                "nokernel",
                tarball(&[("initramfs.cpio", b"x")]),
                "no file `kernel`",
            ),
            (
                "big",
                tarball(&[("kernel", &[7u8; 5000])]),
                "more than 4096 bytes",
            ),
        ];
        for (name, data, want) in cases {
            let part = dir.join(name);
            std::fs::write(&part, &data).unwrap();
            let e = cache
                .install(
                    &format!("http://h/{name}"),
                    &part,
                    &oakestra_runtime::hex::encode(&Sha256::digest(&data)),
                )
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
            assert_eq!(cache.lookup(&format!("http://h/{name}")), None);
        }
        let blobs: Vec<_> = std::fs::read_dir(dir.join("cache/blobs"))
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(blobs.is_empty(), "nothing half-extracted: {blobs:?}");
        let tmp: Vec<_> = std::fs::read_dir(dir.join("cache/tmp"))
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(tmp.is_empty(), "no staging leftovers: {tmp:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
