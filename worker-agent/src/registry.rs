//! The OCI distribution (registry v2) pull client: image references, platform selection, registry auth, and
//! digest-verified manifest, config and layer downloads.
//!
//! One [`Registry`] serves every pull of a worker: it holds the per-registry credentials, the TLS configuration
//! (rustls with the Mozilla roots), which scheme each registry answered on, and the bearer tokens it was given.
//! [`Registry::resolve`] turns an [`ImageRef`] into the small JSON documents of one platform's image (index,
//! manifest, config), each checked against its digest; [`Registry::fetch_blob`] streams a layer as a [`BlobStream`]
//! that checks size and sha256 digest after the last chunk.
//!
//! Transport: HTTPS first, falling back to plain HTTP when the server answers the TLS handshake in plain HTTP (as
//! containerd does); plain HTTP always for `localhost`, `127.0.0.0/8` and `::1`. One connection per request, a
//! connect timeout and an idle timeout per chunk (never a deadline on a whole transfer). Redirects are followed,
//! and the registry's `Authorization` header never goes to another origin.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    HeaderMap, Request, StatusCode, Uri,
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{
        ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, LOCATION, USER_AGENT,
        WWW_AUTHENTICATE,
    },
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::JoinHandle,
};

/// Media type of an OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a Docker manifest list (schema 2).
pub const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a Docker image manifest (schema 2).
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MEDIA_TYPE_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Largest index, manifest or config read (they are small JSON documents; layers are streamed instead).
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;
/// Default limit on connecting (TCP and TLS handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on waiting for an answer's head or for the next chunk of a body.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Most bytes of a registry's error answer kept for an error message.
const MAX_ERROR_TEXT: usize = 1024;
/// How long a bearer token without `expires_in` is used (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a bearer token is used, whatever the token service says.
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 60 * 60;
/// Docker Hub's registry API host behind the `docker.io` name.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const USER_AGENT_VALUE: &str = concat!("oakestra-rs-NodeEngine/", env!("CARGO_PKG_VERSION"));

/// Why a reference could not be parsed or an image could not be pulled. Each variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The text is not an image reference.
    #[error("invalid image reference {value:?}: {rule}")]
    InvalidReference {
        /// The text given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The text is not a platform (`os/architecture[/variant]`).
    #[error("invalid platform {value:?}: {rule}")]
    InvalidPlatform {
        /// The text given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// A digest is malformed or uses an algorithm other than sha256.
    #[error("unsupported digest {digest:?}: {rule}")]
    InvalidDigest {
        /// The digest.
        digest: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Connecting, the TLS handshake, sending or receiving failed.
    #[error("GET {url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server answered the TLS handshake in plain HTTP (it serves `http://`, not `https://`).
    #[error("GET {url}: the server gave an HTTP answer to the TLS handshake (it speaks plain HTTP)")]
    PlainHttpServer {
        /// The `https://` URL tried.
        url: String,
    },
    /// Nothing arrived within the timeout.
    #[error("GET {url}: nothing received for {after:?} while waiting for {waiting_for}")]
    Timeout {
        /// The URL.
        url: String,
        /// What was awaited (connection, answer, next chunk).
        waiting_for: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The registry does not know the image, tag or blob.
    #[error("{what} not found: GET {url} answered 404: {answer}")]
    NotFound {
        /// The image (and blob digest) asked for.
        what: String,
        /// The URL.
        url: String,
        /// The registry's answer text.
        answer: String,
    },
    /// The registry refused access (no or wrong credentials).
    #[error("registry {registry} refused access to repository {repository}: {detail}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// Why, with the registry's answer text.
        detail: String,
    },
    /// The registry answered with an unexpected status.
    #[error("GET {url} answered {status}: {answer}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The registry's answer text.
        answer: String,
    },
    /// More redirects than allowed, or a redirect without a usable `Location`.
    #[error("GET {url}: {reason}")]
    Redirect {
        /// The URL that redirected.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A JSON document is larger than [`MAX_JSON_BYTES`].
    #[error("GET {url}: the document is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The content does not hash to the digest it was asked for by.
    #[error("GET {url}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The digest expected.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The content is not as long as its descriptor says.
    #[error("GET {url}: content has {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The URL.
        url: String,
        /// The size expected.
        expected: u64,
        /// The bytes that arrived (so far).
        actual: u64,
    },
    /// The image has a Docker schema 1 manifest, which is not supported.
    #[error(
        "image {image} has a Docker schema 1 manifest ({media_type}), which is not supported: push it again with a current client (schema 2 or OCI)"
    )]
    Schema1 {
        /// The image.
        image: String,
        /// The media type seen.
        media_type: String,
    },
    /// A document has a media type this client cannot use.
    #[error("image {image}: unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// The image.
        image: String,
        /// The media type seen.
        media_type: String,
        /// Which document (manifest, index entry, config).
        what: &'static str,
    },
    /// The image index has no entry for the platform asked for.
    #[error("image {image} has no manifest for platform {wanted}; it offers: {offered}")]
    NoMatchingPlatform {
        /// The image.
        image: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        offered: String,
    },
    /// A manifest, index or token answer is not what the protocol says it is.
    #[error("GET {url}: invalid {what}: {reason}")]
    InvalidDocument {
        /// The URL.
        url: String,
        /// Which document.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The blob stream was used again after it failed.
    #[error("GET {url}: the blob stream already failed")]
    StreamFailed {
        /// The URL.
        url: String,
    },
}

// --- image references ----------------------------------------------------------------------------------------------

/// What an image reference points at: a tag or a content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag, e.g. `latest`.
    Tag(String),
    /// A digest, `sha256:` and 64 lowercase hex digits.
    Digest(String),
}

impl Reference {
    /// The tag or digest as it goes into a `/v2/<name>/manifests/<reference>` URL.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(tag) => tag,
            Reference::Digest(digest) => digest,
        }
    }
}

/// A `docker.io/library/nginx:latest`-style reference, normalised like docker and containerd do: `nginx` is
/// `docker.io/library/nginx:latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry, `host[:port]`; `docker.io` for Docker Hub.
    pub registry: String,
    /// The repository path, e.g. `library/nginx`.
    pub repository: String,
    /// The tag or digest.
    pub reference: Reference,
}

impl ImageRef {
    /// Parses and normalises a reference: `nginx` → `docker.io/library/nginx:latest`, `127.0.0.1:5000/a/b:v1` →
    /// registry `127.0.0.1:5000`, `localhost/x` → registry `localhost`, `name@sha256:…` → a digest reference (a
    /// tag given with a digest is dropped: the digest decides). The first path component is the registry when it
    /// holds a `.` or `:`, is `localhost`, or has uppercase letters.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let bad = |rule: &str| RegistryError::InvalidReference {
            value: text.to_owned(),
            rule: rule.to_owned(),
        };
        if text.is_empty() {
            return Err(bad("an image reference must not be empty"));
        }
        if text.chars().any(char::is_whitespace) {
            return Err(bad("an image reference must not contain whitespace"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (text, None),
        };
        if let Some(digest) = digest {
            check_digest(digest).map_err(|e| match e {
                RegistryError::InvalidDigest { rule, .. } => bad(&format!("digest {digest:?}: {rule}")),
                other => other,
            })?;
        }
        // A ':' after the last '/' starts the tag; one before it belongs to the registry's port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|rule| bad(&format!("tag {tag:?}: {rule}")))?;
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first, remainder)
            }
            _ => ("docker.io", name),
        };
        check_registry_host(registry).map_err(|rule| bad(&format!("registry {registry:?}: {rule}")))?;
        let registry = if registry == "index.docker.io" {
            "docker.io"
        } else {
            registry
        };
        let repository = if registry == "docker.io" && !path.is_empty() && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        check_repository(&repository).map_err(|rule| bad(&format!("repository {repository:?}: {rule}")))?;
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad(
                "the name (registry and repository) must be at most 255 characters",
            ));
        }
        let reference = match (digest, tag) {
            (Some(digest), _) => Reference::Digest(digest.to_owned()),
            (None, Some(tag)) => Reference::Tag(tag.to_owned()),
            (None, None) => Reference::Tag("latest".to_owned()),
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            repository,
            reference,
        })
    }

    /// The full normalised name, e.g. `docker.io/library/nginx:latest` or `docker.io/library/nginx@sha256:…`.
    pub fn name(&self) -> String {
        match &self.reference {
            Reference::Tag(tag) => format!("{}/{}:{tag}", self.registry, self.repository),
            Reference::Digest(digest) => format!("{}/{}@{digest}", self.registry, self.repository),
        }
    }

    /// The same repository at another tag or digest.
    pub fn with_reference(&self, reference: Reference) -> Self {
        ImageRef {
            reference,
            ..self.clone()
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(text)
    }
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok {
        return Err("a tag starts with a letter, digit or '_'");
    }
    if tag.len() > 128 {
        return Err("a tag has at most 128 characters");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("a tag holds only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn check_registry_host(registry: &str) -> Result<(), &'static str> {
    let (host, port) = split_host_port(registry);
    if host.is_empty() {
        return Err("the registry host must not be empty");
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(address) = inner.strip_suffix(']') else {
            return Err("an IPv6 registry address is written [address]");
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("the bracketed registry address is not an IPv6 address");
        }
    } else if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        || host.starts_with(['.', '-'])
        || host.ends_with(['.', '-'])
    {
        return Err(
            "a registry host holds letters, digits, '.' and '-' and starts and ends with a letter or digit",
        );
    }
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
    {
        return Err("the registry port must be a number from 0 to 65535");
    }
    Ok(())
}

/// Splits `host[:port]` (IPv6 hosts in brackets) into the host (brackets kept) and the port text.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => {
                let (host, rest) = authority.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (authority, None),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    }
}

fn check_repository(repository: &str) -> Result<(), &'static str> {
    if repository.is_empty() {
        return Err("the repository must not be empty");
    }
    for component in repository.split('/') {
        check_path_component(component)?;
    }
    Ok(())
}

/// One repository path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn check_path_component(component: &str) -> Result<(), &'static str> {
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return Err("path components must not be empty (no leading, trailing or double '/')");
    };
    if bytes.iter().any(u8::is_ascii_uppercase) {
        return Err("repository names must be lowercase");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.iter().all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-')) {
        return Err(
            "repository names hold only lowercase letters, digits and the separators '.', '_', '__', '-'",
        );
    }
    if !alnum(first) || !alnum(last) {
        return Err("each path component starts and ends with a lowercase letter or digit");
    }
    for separator in component.split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        let ok = separator.is_empty()
            || separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return Err("separators are '.', '_', '__' or a run of '-', never mixed");
        }
    }
    Ok(())
}

/// Checks that `digest` is `sha256:` and 64 lowercase hex digits (the only algorithm this client verifies).
fn check_digest(digest: &str) -> Result<(), RegistryError> {
    let bad = |rule| RegistryError::InvalidDigest {
        digest: digest.to_owned(),
        rule,
    };
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(bad("a digest is algorithm:hex, e.g. sha256:<64 hex digits>"));
    };
    if algorithm != "sha256" {
        return Err(bad("only sha256 digests are supported"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad("a sha256 digest has exactly 64 lowercase hex digits"));
    }
    Ok(())
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", oakestra_runtime::hex::encode(&Sha256::digest(data)))
}

// --- platforms -----------------------------------------------------------------------------------------------------

/// An OS/architecture pair with an optional variant, in Go's names (`linux/amd64`, `linux/arm64/v8`,
/// `linux/arm/v7`), as image indexes list them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Platform {
    /// The operating system, e.g. `linux`.
    pub os: String,
    /// The CPU architecture in Go's names: `amd64`, `arm64`, `arm`, …
    pub architecture: String,
    /// The architecture variant, e.g. `v8` for arm64, `v7` for arm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on: `linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`, … (Go's names).
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Parses `os/architecture[/variant]`, e.g. `linux/arm64/v8`; common aliases (`x86_64`, `aarch64`, `armhf`)
    /// become Go's names.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let bad = |rule: &str| RegistryError::InvalidPlatform {
            value: text.to_owned(),
            rule: rule.to_owned(),
        };
        let parts: Vec<&str> = text.split('/').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad("a platform is os/architecture or os/architecture/variant"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(bad("os, architecture and variant must not be empty"));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return Err(bad(
                    "os, architecture and variant hold only letters, digits, '_', '-' and '.'",
                ));
            }
        }
        let os = parts[0].to_ascii_lowercase();
        let given_variant = parts.get(2).map(|v| v.to_ascii_lowercase());
        let (architecture, variant) = normalize_architecture(&parts[1].to_ascii_lowercase(), given_variant);
        Ok(Platform {
            os,
            architecture,
            variant,
        })
    }

    /// Whether an index entry for `offered` can run here: same OS and architecture, and the same variant when this
    /// platform names one (an arm64 entry without a variant counts as `v8`, an arm entry without one as `v7`).
    pub fn matches(&self, offered: &Platform) -> bool {
        let (architecture, variant) = normalize_architecture(
            &offered.architecture.to_ascii_lowercase(),
            offered.variant.clone(),
        );
        if !offered.os.eq_ignore_ascii_case(&self.os) || architecture != self.architecture {
            return false;
        }
        let Some(wanted) = &self.variant else {
            return true;
        };
        let variant = variant.or_else(|| default_variant(&architecture).map(str::to_owned));
        variant.as_deref() == Some(wanted.as_str())
    }
}

/// Go's architecture name for common aliases, with the variant an alias implies.
fn normalize_architecture(architecture: &str, variant: Option<String>) -> (String, Option<String>) {
    match architecture {
        "x86_64" | "x86-64" => ("amd64".to_owned(), variant),
        "aarch64" => ("arm64".to_owned(), variant),
        "armhf" => ("arm".to_owned(), variant.or_else(|| Some("v7".to_owned()))),
        "armel" => ("arm".to_owned(), variant.or_else(|| Some("v6".to_owned()))),
        "i386" | "i686" => ("386".to_owned(), variant),
        other => (other.to_owned(), variant),
    }
}

fn default_variant(architecture: &str) -> Option<&'static str> {
    match architecture {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = RegistryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Platform::parse(text)
    }
}

// --- descriptors and documents -------------------------------------------------------------------------------------

/// Credentials for one registry (username and password or access token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An OCI content descriptor: what a piece of content is, its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The content's media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The content's digest, `sha256:…`.
    pub digest: String,
    /// The content's size in bytes.
    pub size: i64,
    /// Annotations, e.g. `org.opencontainers.image.ref.name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform, for entries of an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The size as `u64`, or an error for a negative size.
    fn size_u64(&self, url: &str, what: &'static str) -> Result<u64, RegistryError> {
        u64::try_from(self.size).map_err(|_| RegistryError::InvalidDocument {
            url: url.to_owned(),
            what,
            reason: format!("descriptor {} has a negative size {}", self.digest, self.size),
        })
    }
}

/// One platform's image as a registry describes it: the verified small JSON documents and the layers to fetch.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What the reference points at: an index (manifest list) or a manifest.
    pub target: Descriptor,
    /// The index (when the reference points at one), the manifest and the config, each with its exact bytes,
    /// checked against its digest and size.
    pub blobs: Vec<(Descriptor, Bytes)>,
    /// The platform's manifest.
    pub manifest: Descriptor,
    /// The image config.
    pub config: Descriptor,
    /// The layers, base first, to fetch with [`Registry::fetch_blob`].
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct IndexDocument {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ManifestDocument {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ManifestKind {
    Index,
    Manifest,
}

/// What a fetched manifest document is: from its `mediaType` field, else the `Content-Type`, else its shape.
fn manifest_kind(
    image: &ImageRef,
    content_type: Option<&str>,
    body: &[u8],
    url: &str,
) -> Result<(ManifestKind, String), RegistryError> {
    let peek: Peek = serde_json::from_slice(body).map_err(|e| RegistryError::InvalidDocument {
        url: url.to_owned(),
        what: "manifest",
        reason: format!("not JSON: {e}"),
    })?;
    let header = content_type
        .map(|value| value.split(';').next().unwrap_or_default().trim().to_owned())
        .filter(|value| !value.is_empty() && value != "application/json" && value != "text/plain");
    let media_type = match (peek.media_type.filter(|m| !m.is_empty()), header) {
        (Some(field), _) => field,
        (None, Some(header)) => header,
        (None, None) if peek.schema_version == Some(1) => MEDIA_TYPE_DOCKER_SCHEMA1.to_owned(),
        (None, None) if peek.manifests.is_some() => MEDIA_TYPE_OCI_INDEX.to_owned(),
        (None, None) if peek.config.is_some() => MEDIA_TYPE_OCI_MANIFEST.to_owned(),
        (None, None) => String::new(),
    };
    match media_type.as_str() {
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST => Ok((ManifestKind::Index, media_type)),
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => Ok((ManifestKind::Manifest, media_type)),
        MEDIA_TYPE_DOCKER_SCHEMA1 | MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED => Err(RegistryError::Schema1 {
            image: image.name(),
            media_type,
        }),
        _ if peek.schema_version == Some(1) => Err(RegistryError::Schema1 {
            image: image.name(),
            media_type,
        }),
        _ => Err(RegistryError::UnsupportedMediaType {
            image: image.name(),
            media_type,
            what: "the manifest",
        }),
    }
}

/// The entry of an index for `platform`: the first that [`Platform::matches`] (a lone entry without platform
/// information is taken as is: there is nothing to choose), or an error listing what is offered.
pub fn select_platform<'a>(
    image: &ImageRef,
    manifests: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, RegistryError> {
    if let [only] = manifests
        && only.platform.is_none()
    {
        return Ok(only);
    }
    if let Some(found) = manifests.iter().find(|entry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|offered| platform.matches(offered))
    }) {
        return Ok(found);
    }
    let offered: Vec<String> = manifests
        .iter()
        .map(|entry| match &entry.platform {
            Some(p) => p.to_string(),
            None => format!("(no platform: {})", entry.digest),
        })
        .collect();
    Err(RegistryError::NoMatchingPlatform {
        image: image.name(),
        wanted: platform.to_string(),
        offered: if offered.is_empty() {
            "nothing (the index is empty)".to_owned()
        } else {
            offered.join(", ")
        },
    })
}

// --- WWW-Authenticate ----------------------------------------------------------------------------------------------

/// One challenge of a `WWW-Authenticate` header: the scheme (lowercase) and its parameters (names lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value into its challenges, e.g. `Bearer realm="…",service="…",scope="…"`.
/// Lenient: malformed parts are skipped, never a panic.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut rest = header.trim_start();
    while !rest.is_empty() {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        let token_len = rest
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(rest.len());
        if token_len == 0 {
            // A stray '=' or similar: skip one character and go on.
            let mut chars = rest.chars();
            chars.next();
            rest = chars.as_str();
            continue;
        }
        let token = &rest[..token_len];
        let after = rest[token_len..].trim_start_matches([' ', '\t']);
        if let Some(value_text) = after.strip_prefix('=')
            && !value_text.starts_with('=')
        {
            // `name=value`: a parameter of the current challenge.
            let (value, remaining) = parse_param_value(value_text.trim_start_matches([' ', '\t']));
            if let Some(current) = challenges.last_mut() {
                current.params.insert(token.to_ascii_lowercase(), value);
            }
            rest = remaining;
        } else if after.starts_with('=') {
            // token68 (`Basic abc==`): not used by registries; skip the `=` padding.
            rest = after.trim_start_matches('=');
        } else {
            challenges.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
            rest = after;
        }
    }
    challenges
}

/// Reads a quoted string (with `\` escapes) or a token; returns it and the text after it.
fn parse_param_value(text: &str) -> (String, &str) {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return (value, &quoted[i + 1..]),
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                other => value.push(other),
            }
        }
        // Unterminated: take everything.
        (value, "")
    } else {
        let end = text.find([',', ' ', '\t']).unwrap_or(text.len());
        (text[..end].to_owned(), &text[end..])
    }
}

// --- the client ----------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

#[derive(Debug)]
struct Token {
    value: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct AuthState {
    /// Bearer tokens per (registry, scope).
    tokens: HashMap<(String, String), Token>,
    /// Registries that asked for basic credentials.
    basic: HashSet<String>,
}

struct Inner {
    credentials: HashMap<String, Credentials>,
    /// The TLS configuration, or why it could not be built (reported at the first HTTPS connection).
    tls: Result<Arc<rustls::ClientConfig>, String>,
    /// The scheme each registry answered on.
    schemes: Mutex<HashMap<String, Scheme>>,
    auth: Mutex<AuthState>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Plain HTTP for loopback registries (always, except in tests of the HTTPS fallback).
    plain_http_for_loopback: bool,
}

/// The pull client: per-registry credentials, the TLS configuration, and what it learnt about each registry
/// (scheme, tokens). Cheap to clone; clones share that state.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut registries: Vec<&String> = self.inner.credentials.keys().collect();
        registries.sort();
        f.debug_struct("Registry")
            .field("credentials_for", &registries)
            .field("tls", &self.inner.tls.is_ok())
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// The registry name credentials are filed under: `https://index.docker.io/v1/`, `index.docker.io` and
/// `registry-1.docker.io` all mean `docker.io`.
fn normalize_registry_key(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | DOCKER_HUB_API_HOST => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

/// The host serving a registry's API (`docker.io` is served by `registry-1.docker.io`).
fn api_host(registry: &str) -> &str {
    if registry == "docker.io" {
        DOCKER_HUB_API_HOST
    } else {
        registry
    }
}

/// Whether a registry is on this machine: `localhost`, `127.0.0.0/8` or `::1` (any port).
fn is_loopback_registry(registry: &str) -> bool {
    let (host, _) = split_host_port(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4: Ipv4Addr| v4.is_loopback())
        }
        Err(_) => false,
    }
}

fn default_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An answer whose head arrived; the body is still to be read.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    url: String,
    driver: Driver,
}

/// The task driving one HTTP connection; aborted when the answer (or blob stream) is dropped.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a request goes: scheme, host for connecting and SNI, port, `Host` header, request target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    scheme: Scheme,
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            Some(other) => return Err(format!("unsupported scheme {other:?}")),
            None => return Err("not an absolute URL".to_owned()),
        };
        let authority = uri.authority().ok_or("the URL has no host")?;
        let host = authority.host();
        if host.is_empty() {
            return Err("the URL has no host".to_owned());
        }
        let port = match authority.port_u16() {
            Some(port) => port,
            None if scheme == Scheme::Https => 443,
            None => 80,
        };
        // The authority without any `user:password@` part, for the `Host` header.
        let host_port = authority
            .as_str()
            .rsplit('@')
            .next()
            .unwrap_or(authority.as_str());
        Ok(Target {
            scheme,
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
            authority: host_port.to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    fn origin(&self) -> (Scheme, &str, u16) {
        (self.scheme, &self.host, self.port)
    }

    fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority,
            self.path_and_query
        )
    }

    /// Resolves a `Location` value against this URL: absolute, scheme-relative, absolute-path or relative-path.
    fn join(&self, location: &str) -> Result<Target, String> {
        // `scheme:` (letters, digits, `+.-`, before any '/', '?' or '#') makes an absolute URL; parse refuses
        // schemes other than http and https.
        let has_scheme = location.split_once(':').is_some_and(|(scheme, _)| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
        });
        if has_scheme {
            return Target::parse(location);
        }
        let scheme = self.scheme.as_str();
        if let Some(rest) = location.strip_prefix("//") {
            return Target::parse(&format!("{scheme}://{rest}"));
        }
        if location.starts_with('/') {
            return Target::parse(&format!("{scheme}://{}{location}", self.authority));
        }
        let path = self.path_and_query.split('?').next().unwrap_or("/");
        let directory = path.rfind('/').map_or("/", |i| &path[..=i]);
        Target::parse(&format!("{scheme}://{}{directory}{location}", self.authority))
    }
}

/// A TCP stream that remembers the first bytes the server sent, to tell a plain-HTTP answer to a TLS handshake.
struct Sniff {
    inner: TcpStream,
    head: [u8; 5],
    seen: usize,
}

impl AsyncRead for Sniff {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let fresh = buf.filled().get(before..).unwrap_or_default();
            let want = this.head.len() - this.seen;
            let take = want.min(fresh.len());
            this.head[this.seen..this.seen + take].copy_from_slice(&fresh[..take]);
            this.seen += take;
        }
        poll
    }
}

impl AsyncWrite for Sniff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The first `limit` bytes of an error answer's text, for an error message.
fn clip(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    if text.is_empty() {
        return "(empty answer)".to_owned();
    }
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn percent_encode(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn basic_authorization(credentials: &Credentials) -> Option<HeaderValue> {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn bearer_authorization(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    /// Seconds; read leniently (a negative, fractional or huge value must not fail the pull).
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl Registry {
    /// A client with credentials per registry host (`docker.io`, `ghcr.io`, `127.0.0.1:5000`, …; Docker Hub's
    /// aliases such as `index.docker.io` mean `docker.io`), trusting the Mozilla root certificates.
    pub fn new(credentials: HashMap<String, Credentials>) -> Self {
        let credentials = credentials
            .into_iter()
            .map(|(registry, credentials)| (normalize_registry_key(&registry), credentials))
            .collect();
        Registry {
            inner: Arc::new(Inner {
                credentials,
                tls: default_tls_config(),
                schemes: Mutex::new(HashMap::new()),
                auth: Mutex::new(AuthState::default()),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                plain_http_for_loopback: true,
            }),
        }
    }

    /// The same client with another TLS configuration (e.g. trusting a private CA). Call before the first pull.
    pub fn with_tls_config(self, config: Arc<rustls::ClientConfig>) -> Self {
        self.rebuild(|inner| inner.tls = Ok(config))
    }

    /// The same client with other timeouts: `connect` for TCP and TLS, `idle` for each wait on an answer or the
    /// next chunk of a body. Call before the first pull.
    pub fn with_timeouts(self, connect: Duration, idle: Duration) -> Self {
        self.rebuild(|inner| {
            inner.connect_timeout = connect;
            inner.idle_timeout = idle;
        })
    }

    fn rebuild(self, change: impl FnOnce(&mut Inner)) -> Self {
        let inner = &self.inner;
        let mut fresh = Inner {
            credentials: inner.credentials.clone(),
            tls: inner.tls.clone(),
            schemes: Mutex::new(lock(&inner.schemes).clone()),
            auth: Mutex::new(AuthState::default()),
            connect_timeout: inner.connect_timeout,
            idle_timeout: inner.idle_timeout,
            plain_http_for_loopback: inner.plain_http_for_loopback,
        };
        change(&mut fresh);
        Registry {
            inner: Arc::new(fresh),
        }
    }

    /// Fetches what `image` points at and, for an index, the manifest for `platform`, then the config: each
    /// verified against its digest (for a tag, against `Docker-Content-Digest` when the registry sends one).
    pub async fn resolve(&self, image: &ImageRef, platform: &Platform) -> Result<Resolved, RegistryError> {
        let mut blobs = Vec::new();
        let (target_kind, target, target_bytes) = self.fetch_manifest(image, &image.reference, None).await?;
        let (manifest, manifest_bytes) = match target_kind {
            ManifestKind::Manifest => (target.clone(), target_bytes),
            ManifestKind::Index => {
                let url = self.describe_url(image, &format!("manifests/{}", target.digest));
                let index: IndexDocument =
                    serde_json::from_slice(&target_bytes).map_err(|e| RegistryError::InvalidDocument {
                        url: url.clone(),
                        what: "image index",
                        reason: e.to_string(),
                    })?;
                blobs.push((target.clone(), target_bytes));
                let entry = select_platform(image, &index.manifests, platform)?.clone();
                check_digest(&entry.digest)?;
                let expected_size = entry.size_u64(&url, "image index")?;
                if expected_size > MAX_JSON_BYTES {
                    return Err(RegistryError::TooLarge {
                        url,
                        limit: MAX_JSON_BYTES,
                    });
                }
                let (kind, mut fetched, bytes) = self
                    .fetch_manifest(
                        image,
                        &Reference::Digest(entry.digest.clone()),
                        Some(expected_size),
                    )
                    .await?;
                if kind == ManifestKind::Index {
                    return Err(RegistryError::UnsupportedMediaType {
                        image: image.name(),
                        media_type: fetched.media_type,
                        what: "an index entry (nested indexes are not supported)",
                    });
                }
                fetched.platform = entry.platform.clone();
                fetched.annotations = entry.annotations.clone();
                (fetched, bytes)
            }
        };
        let manifest_url = self.describe_url(image, &format!("manifests/{}", manifest.digest));
        let document: ManifestDocument =
            serde_json::from_slice(&manifest_bytes).map_err(|e| RegistryError::InvalidDocument {
                url: manifest_url.clone(),
                what: "image manifest",
                reason: e.to_string(),
            })?;
        blobs.push((manifest.clone(), manifest_bytes));
        let config = document.config;
        if config.media_type != MEDIA_TYPE_OCI_CONFIG && config.media_type != MEDIA_TYPE_DOCKER_CONFIG {
            return Err(RegistryError::UnsupportedMediaType {
                image: image.name(),
                media_type: config.media_type,
                what: "the config (not a container image)",
            });
        }
        for layer in &document.layers {
            check_digest(&layer.digest)?;
            layer.size_u64(&manifest_url, "image manifest")?;
        }
        let config_bytes = self.fetch_small_blob(image, &config).await?;
        blobs.push((config.clone(), config_bytes));
        tracing::info!(
            image = %image,
            platform = %platform,
            target = %target.digest,
            manifest = %manifest.digest,
            layers = document.layers.len(),
            "resolved image"
        );
        Ok(Resolved {
            target,
            blobs,
            manifest,
            config,
            layers: document.layers,
        })
    }

    /// Starts downloading the blob `desc` of `image`'s repository; the stream checks size and digest at its end.
    pub async fn fetch_blob(&self, image: &ImageRef, desc: &Descriptor) -> Result<BlobStream, RegistryError> {
        check_digest(&desc.digest)?;
        let path = format!("/v2/{}/blobs/{}", image.repository, desc.digest);
        let expected_size = desc.size_u64(&self.describe_url(image, &path), "descriptor")?;
        let answer = self.registry_get(image, &path, None).await?;
        let answer = expect_ok(
            image,
            answer,
            &format!("blob {} of {}", desc.digest, image.name()),
            self.inner.idle_timeout,
        )
        .await?;
        if let Some(length) = content_length(&answer.headers)
            && length != expected_size
        {
            return Err(RegistryError::SizeMismatch {
                url: answer.url,
                expected: expected_size,
                actual: length,
            });
        }
        tracing::debug!(image = %image, digest = %desc.digest, size = expected_size, url = %answer.url, "fetching blob");
        Ok(BlobStream {
            body: answer.body,
            hasher: Sha256::new(),
            expected_digest: desc.digest.clone(),
            expected_size,
            received: 0,
            url: answer.url,
            idle_timeout: self.inner.idle_timeout,
            state: StreamState::Streaming,
            _driver: answer.driver,
        })
    }

    /// Starts a plain GET of `url` (http or https with this client's TLS roots, redirects followed, no
    /// credentials): for files that are not registry blobs, such as unikernel tarballs. A body larger than `limit`
    /// bytes fails the stream; 404 and other non-200 answers fail here, with the server's text.
    pub async fn download(&self, url: &str, limit: u64) -> Result<Download, RegistryError> {
        let target = Target::parse(url).map_err(|reason| RegistryError::Transport {
            url: url.to_owned(),
            reason,
        })?;
        let mut answer = self.get_following(target, None, None).await?;
        if answer.status != StatusCode::OK {
            let text = read_error_text(&mut answer, self.inner.idle_timeout).await;
            if answer.status == StatusCode::NOT_FOUND {
                return Err(RegistryError::NotFound {
                    what: "file".to_owned(),
                    url: answer.url,
                    answer: text,
                });
            }
            return Err(RegistryError::Status {
                url: answer.url,
                status: answer.status.as_u16(),
                answer: text,
            });
        }
        let length = content_length(&answer.headers);
        if length.is_some_and(|l| l > limit) {
            return Err(RegistryError::TooLarge {
                url: answer.url,
                limit,
            });
        }
        Ok(Download {
            body: answer.body,
            length,
            limit,
            received: 0,
            url: answer.url,
            idle_timeout: self.inner.idle_timeout,
            _driver: answer.driver,
        })
    }

    /// A URL for error messages before the scheme is known.
    fn describe_url(&self, image: &ImageRef, path: &str) -> String {
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/v2/{}/{path}", image.repository)
        };
        format!(
            "{}://{}{path}",
            self.scheme_for(&image.registry).as_str(),
            api_host(&image.registry)
        )
    }

    /// Fetches a manifest or index by tag or digest, verifies it and says what it is.
    async fn fetch_manifest(
        &self,
        image: &ImageRef,
        reference: &Reference,
        expected_size: Option<u64>,
    ) -> Result<(ManifestKind, Descriptor, Bytes), RegistryError> {
        let path = format!("/v2/{}/manifests/{}", image.repository, reference.as_str());
        let accept = [
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_LIST,
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST,
        ]
        .join(", ");
        let answer = self.registry_get(image, &path, Some(&accept)).await?;
        let what = image.with_reference(reference.clone()).name();
        let mut answer = expect_ok(image, answer, &format!("image {what}"), self.inner.idle_timeout).await?;
        let bytes = read_limited(&mut answer, MAX_JSON_BYTES, self.inner.idle_timeout).await?;
        let actual = sha256_digest(&bytes);
        let expected = match reference {
            Reference::Digest(digest) => Some(digest.clone()),
            Reference::Tag(_) => answer
                .headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
                .filter(|v| v.starts_with("sha256:")),
        };
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(RegistryError::DigestMismatch {
                url: answer.url,
                expected,
                actual,
            });
        }
        let size = bytes.len() as u64;
        if let Some(expected) = expected_size
            && expected != size
        {
            return Err(RegistryError::SizeMismatch {
                url: answer.url,
                expected,
                actual: size,
            });
        }
        let content_type = answer.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let (kind, media_type) = manifest_kind(image, content_type, &bytes, &answer.url)?;
        let descriptor = Descriptor {
            media_type,
            digest: actual,
            size: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            annotations: BTreeMap::new(),
            platform: None,
        };
        tracing::debug!(image = %what, digest = %descriptor.digest, media_type = %descriptor.media_type, "fetched manifest");
        Ok((kind, descriptor, bytes))
    }

    /// Fetches a small blob (the config) whole, verifying size and digest.
    async fn fetch_small_blob(&self, image: &ImageRef, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        check_digest(&desc.digest)?;
        let path = format!("/v2/{}/blobs/{}", image.repository, desc.digest);
        let expected_size = desc.size_u64(&self.describe_url(image, &path), "descriptor")?;
        if expected_size > MAX_JSON_BYTES {
            return Err(RegistryError::TooLarge {
                url: self.describe_url(image, &path),
                limit: MAX_JSON_BYTES,
            });
        }
        let answer = self.registry_get(image, &path, None).await?;
        let mut answer = expect_ok(
            image,
            answer,
            &format!("blob {} of {}", desc.digest, image.name()),
            self.inner.idle_timeout,
        )
        .await?;
        let bytes = read_limited(&mut answer, MAX_JSON_BYTES, self.inner.idle_timeout).await?;
        let size = bytes.len() as u64;
        if size != expected_size {
            return Err(RegistryError::SizeMismatch {
                url: answer.url,
                expected: expected_size,
                actual: size,
            });
        }
        let actual = sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                url: answer.url,
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    fn scheme_for(&self, registry: &str) -> Scheme {
        if self.inner.plain_http_for_loopback && is_loopback_registry(registry) {
            return Scheme::Http;
        }
        lock(&self.inner.schemes)
            .get(registry)
            .copied()
            .unwrap_or(Scheme::Https)
    }

    /// The `Authorization` header for a registry request: a cached bearer token for the scope, else basic
    /// credentials when the registry asked for them.
    fn authorization_for(&self, registry: &str, scope: &str) -> Option<HeaderValue> {
        let mut auth = lock(&self.inner.auth);
        let key = (registry.to_owned(), scope.to_owned());
        match auth.tokens.get(&key) {
            Some(token) if token.expires > Instant::now() => return bearer_authorization(&token.value),
            Some(_) => {
                auth.tokens.remove(&key);
            }
            None => {}
        }
        if auth.basic.contains(registry) {
            return self.inner.credentials.get(registry).and_then(basic_authorization);
        }
        None
    }

    /// GET `path` on `image`'s registry: scheme choice with the plain-HTTP fallback, then authentication on 401.
    async fn registry_get(
        &self,
        image: &ImageRef,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Answer, RegistryError> {
        let scope = format!("repository:{}:pull", image.repository);
        let mut authenticated = false;
        loop {
            let authorization = self.authorization_for(&image.registry, &scope);
            let answer = self
                .get_with_fallback(&image.registry, path, accept, authorization.as_ref())
                .await?;
            if answer.status != StatusCode::UNAUTHORIZED {
                return Ok(answer);
            }
            if authenticated {
                let mut answer = answer;
                let text = read_error_text(&mut answer, self.inner.idle_timeout).await;
                return Err(RegistryError::Unauthorized {
                    registry: image.registry.clone(),
                    repository: image.repository.clone(),
                    detail: if self.inner.credentials.contains_key(&image.registry) {
                        format!("the credentials were not accepted: {text}")
                    } else {
                        format!("no credentials are configured for this registry: {text}")
                    },
                });
            }
            authenticated = true;
            self.authenticate(image, &scope, answer).await?;
        }
    }

    /// Answers a 401: fetches a bearer token or switches the registry to basic credentials.
    async fn authenticate(
        &self,
        image: &ImageRef,
        scope: &str,
        mut answer: Answer,
    ) -> Result<(), RegistryError> {
        let challenges: Vec<Challenge> = answer
            .headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let credentials = self.inner.credentials.get(&image.registry);
        let unauthorized = |detail: String| RegistryError::Unauthorized {
            registry: image.registry.clone(),
            repository: image.repository.clone(),
            detail,
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = bearer.params.get("realm") else {
                return Err(unauthorized(format!(
                    "the Bearer challenge names no realm: {:?}",
                    answer.headers.get(WWW_AUTHENTICATE)
                )));
            };
            let mut query = Vec::new();
            if let Some(service) = bearer.params.get("service") {
                query.push(format!("service={}", percent_encode(service)));
            }
            let challenge_scope = bearer.params.get("scope").map_or(scope, String::as_str);
            query.push(format!("scope={}", percent_encode(challenge_scope)));
            let separator = if realm.contains('?') { '&' } else { '?' };
            let url = format!("{realm}{separator}{}", query.join("&"));
            let token = self.fetch_token(image, &url, credentials).await?;
            lock(&self.inner.auth)
                .tokens
                .insert((image.registry.clone(), scope.to_owned()), token);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if credentials.is_none() {
                let text = read_error_text(&mut answer, self.inner.idle_timeout).await;
                return Err(unauthorized(format!(
                    "the registry asks for basic credentials and none are configured for it: {text}"
                )));
            }
            tracing::debug!(registry = %image.registry, "registry asks for basic credentials");
            lock(&self.inner.auth).basic.insert(image.registry.clone());
            return Ok(());
        }
        let text = read_error_text(&mut answer, self.inner.idle_timeout).await;
        Err(unauthorized(format!(
            "answered 401 without a usable WWW-Authenticate challenge ({:?}): {text}",
            answer.headers.get(WWW_AUTHENTICATE)
        )))
    }

    /// GETs a bearer token from the realm (with basic credentials when there are some).
    async fn fetch_token(
        &self,
        image: &ImageRef,
        url: &str,
        credentials: Option<&Credentials>,
    ) -> Result<Token, RegistryError> {
        let target = Target::parse(url).map_err(|reason| RegistryError::InvalidDocument {
            url: url.to_owned(),
            what: "token realm",
            reason,
        })?;
        let authorization = credentials.and_then(basic_authorization);
        tracing::debug!(registry = %image.registry, realm = %target.url(), with_credentials = credentials.is_some(), "fetching a bearer token");
        let mut answer = self.get_following(target, None, authorization.as_ref()).await?;
        if !answer.status.is_success() {
            let text = read_error_text(&mut answer, self.inner.idle_timeout).await;
            return Err(RegistryError::Unauthorized {
                registry: image.registry.clone(),
                repository: image.repository.clone(),
                detail: format!(
                    "the token service {} answered {}: {text}",
                    answer.url,
                    answer.status.as_u16()
                ),
            });
        }
        let bytes = read_limited(&mut answer, MAX_JSON_BYTES, self.inner.idle_timeout).await?;
        let parsed: TokenAnswer =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::InvalidDocument {
                url: answer.url.clone(),
                what: "token answer",
                reason: e.to_string(),
            })?;
        let value = if parsed.token.is_empty() {
            parsed.access_token
        } else {
            parsed.token
        };
        if value.is_empty() {
            return Err(RegistryError::InvalidDocument {
                url: answer.url,
                what: "token answer",
                reason: "it holds neither `token` nor `access_token`".to_owned(),
            });
        }
        // A token service's `expires_in` is capped at a day (and a huge one never overflows the clock).
        let lifetime = parsed
            .expires_in
            .and_then(|value| value.as_u64())
            .filter(|&secs| secs > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, |secs| {
                Duration::from_secs(secs.min(MAX_TOKEN_LIFETIME_SECS))
            });
        // Renew a little early so a token never expires between the check and the request.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let now = Instant::now();
        Ok(Token {
            value,
            expires: now.checked_add(lifetime.saturating_sub(margin)).unwrap_or(now),
        })
    }

    /// GET on a registry's API host with its remembered scheme; an HTTPS attempt answered in plain HTTP is
    /// retried over `http://` and the registry remembered as plain HTTP.
    async fn get_with_fallback(
        &self,
        registry: &str,
        path: &str,
        accept: Option<&str>,
        authorization: Option<&HeaderValue>,
    ) -> Result<Answer, RegistryError> {
        let scheme = self.scheme_for(registry);
        let host = api_host(registry);
        let url = format!("{}://{host}{path}", scheme.as_str());
        let target = Target::parse(&url).map_err(|reason| RegistryError::Transport {
            url: url.clone(),
            reason,
        })?;
        match self.get_following(target, accept, authorization).await {
            Err(RegistryError::PlainHttpServer { url: failed }) if failed == url => {
                tracing::warn!(registry, url = %url, "registry answered the TLS handshake in plain HTTP; using http:// for it");
                lock(&self.inner.schemes).insert(registry.to_owned(), Scheme::Http);
                let url = format!("http://{host}{path}");
                let target =
                    Target::parse(&url).map_err(|reason| RegistryError::Transport { url, reason })?;
                self.get_following(target, accept, authorization).await
            }
            Err(other) => Err(other),
            Ok(answer) => {
                lock(&self.inner.schemes).insert(registry.to_owned(), scheme);
                Ok(answer)
            }
        }
    }

    /// GET `target`, following redirects; `authorization` goes only to `target`'s own origin.
    async fn get_following(
        &self,
        target: Target,
        accept: Option<&str>,
        authorization: Option<&HeaderValue>,
    ) -> Result<Answer, RegistryError> {
        let origin = target.clone();
        let mut current = target;
        for _ in 0..=MAX_REDIRECTS {
            let same_origin = current.origin() == origin.origin();
            let answer = self
                .get_once(&current, accept, authorization.filter(|_| same_origin))
                .await?;
            if !answer.status.is_redirection() || answer.status == StatusCode::NOT_MODIFIED {
                return Ok(answer);
            }
            let location = answer
                .headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| RegistryError::Redirect {
                    url: answer.url.clone(),
                    reason: format!(
                        "answered {} without a usable Location header",
                        answer.status.as_u16()
                    ),
                })?;
            let next = current.join(location).map_err(|reason| RegistryError::Redirect {
                url: answer.url.clone(),
                reason: format!("bad Location {location:?}: {reason}"),
            })?;
            tracing::debug!(from = %answer.url, to = %next.url(), status = answer.status.as_u16(), "following redirect");
            current = next;
        }
        Err(RegistryError::Redirect {
            url: origin.url(),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// One GET on a fresh connection; returns when the answer's head has arrived.
    async fn get_once(
        &self,
        target: &Target,
        accept: Option<&str>,
        authorization: Option<&HeaderValue>,
    ) -> Result<Answer, RegistryError> {
        let url = target.url();
        let (mut sender, driver) = self.connect(target, &url).await?;
        let mut request = Request::builder()
            .method("GET")
            .uri(target.path_and_query.as_str())
            .header(HOST, target.authority.as_str())
            .header(USER_AGENT, USER_AGENT_VALUE);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| RegistryError::Transport {
                url: url.clone(),
                reason: format!("cannot build the request: {e}"),
            })?;
        let idle = self.inner.idle_timeout;
        let response = match tokio::time::timeout(idle, sender.send_request(request)).await {
            Err(_) => {
                return Err(RegistryError::Timeout {
                    url,
                    waiting_for: "the answer",
                    after: idle,
                });
            }
            Ok(Err(e)) => {
                return Err(RegistryError::Transport {
                    url,
                    reason: format!("request failed: {e}"),
                });
            }
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        tracing::debug!(url = %url, status = parts.status.as_u16(), "registry answered");
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            url,
            driver,
        })
    }

    /// Opens a connection (TCP, TLS for https) and starts its HTTP/1.1 driver.
    async fn connect(
        &self,
        target: &Target,
        url: &str,
    ) -> Result<(SendRequest<Empty<Bytes>>, Driver), RegistryError> {
        let timeout = self.inner.connect_timeout;
        let timed_out = || RegistryError::Timeout {
            url: url.to_owned(),
            waiting_for: "the connection",
            after: timeout,
        };
        let transport = |reason: String| RegistryError::Transport {
            url: url.to_owned(),
            reason,
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((target.host.as_str(), target.port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| transport(format!("connect to {}:{}: {e}", target.host, target.port)))?;
        let _ = tcp.set_nodelay(true);
        match target.scheme {
            Scheme::Http => handshake(tcp, url).await,
            Scheme::Https => {
                let config = self.inner.tls.clone().map_err(transport)?;
                let server_name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| transport(format!("{:?} is not a TLS server name: {e}", target.host)))?;
                let sniff = Sniff {
                    inner: tcp,
                    head: [0; 5],
                    seen: 0,
                };
                let connecting = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, sniff)
                    .into_fallible();
                match tokio::time::timeout(timeout, connecting).await {
                    Err(_) => Err(timed_out()),
                    Ok(Ok(tls)) => handshake(tls, url).await,
                    Ok(Err((error, sniff))) => {
                        if sniff.head[..sniff.seen].starts_with(b"HTTP/") {
                            Err(RegistryError::PlainHttpServer { url: url.to_owned() })
                        } else {
                            Err(transport(format!("TLS handshake with {}: {error}", target.host)))
                        }
                    }
                }
            }
        }
    }
}

/// HTTP/1.1 handshake over an open stream; the connection is driven by a task until the [`Driver`] is dropped.
async fn handshake<S>(stream: S, url: &str) -> Result<(SendRequest<Empty<Bytes>>, Driver), RegistryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| RegistryError::Transport {
            url: url.to_owned(),
            reason: format!("HTTP handshake: {e}"),
        })?;
    // The connection's own error surfaces through the request or the body; nothing to do with it here.
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, Driver(task)))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Passes a 200 answer through; turns 404 into [`RegistryError::NotFound`] (naming `what`) and anything else
/// into [`RegistryError::Status`], both with the registry's answer text.
async fn expect_ok(
    image: &ImageRef,
    mut answer: Answer,
    what: &str,
    idle: Duration,
) -> Result<Answer, RegistryError> {
    if answer.status == StatusCode::OK {
        return Ok(answer);
    }
    let text = read_error_text(&mut answer, idle).await;
    if answer.status == StatusCode::NOT_FOUND {
        return Err(RegistryError::NotFound {
            what: what.to_owned(),
            url: answer.url,
            answer: text,
        });
    }
    tracing::debug!(image = %image, url = %answer.url, status = answer.status.as_u16(), "unexpected registry answer");
    Err(RegistryError::Status {
        url: answer.url,
        status: answer.status.as_u16(),
        answer: text,
    })
}

/// Reads a whole body of at most `limit` bytes, with `idle` as the limit on each wait.
async fn read_limited(answer: &mut Answer, limit: u64, idle: Duration) -> Result<Bytes, RegistryError> {
    if content_length(&answer.headers).is_some_and(|length| length > limit) {
        return Err(RegistryError::TooLarge {
            url: answer.url.clone(),
            limit,
        });
    }
    let mut collected = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, answer.body.frame()).await {
            Err(_) => {
                return Err(RegistryError::Timeout {
                    url: answer.url.clone(),
                    waiting_for: "the next chunk of the answer",
                    after: idle,
                });
            }
            Ok(None) => return Ok(Bytes::from(collected)),
            Ok(Some(Err(e))) => {
                return Err(RegistryError::Transport {
                    url: answer.url.clone(),
                    reason: format!("reading the answer: {e}"),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (collected.len() + data.len()) as u64 > limit {
                return Err(RegistryError::TooLarge {
                    url: answer.url.clone(),
                    limit,
                });
            }
            collected.extend_from_slice(&data);
        }
    }
}

/// The start of an error answer's text; a failure to read it is described instead.
async fn read_error_text(answer: &mut Answer, idle: Duration) -> String {
    match read_limited(answer, 64 * 1024, idle).await {
        Ok(bytes) => clip(&bytes),
        Err(RegistryError::TooLarge { .. }) => "(answer too long to show)".to_owned(),
        Err(e) => format!("(answer unreadable: {e})"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Streaming,
    Finished,
    Failed,
}

/// A blob being downloaded: chunks as they arrive; after the last one, the size and sha256 digest are checked.
pub struct BlobStream {
    body: Incoming,
    hasher: Sha256,
    expected_digest: String,
    expected_size: u64,
    received: u64,
    url: String,
    idle_timeout: Duration,
    state: StreamState,
    _driver: Driver,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("url", &self.url)
            .field("expected_digest", &self.expected_digest)
            .field("expected_size", &self.expected_size)
            .field("received", &self.received)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A file being downloaded by [`Registry::download`].
pub struct Download {
    body: Incoming,
    length: Option<u64>,
    limit: u64,
    received: u64,
    url: String,
    idle_timeout: Duration,
    _driver: Driver,
}

impl fmt::Debug for Download {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Download")
            .field("url", &self.url)
            .field("length", &self.length)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// The next non-empty data chunk of `body` (`None` at its end), waiting at most `idle` for each frame; `what`
/// names the body in errors, `received` is how much of it arrived before.
async fn next_data(
    body: &mut Incoming,
    idle: Duration,
    url: &str,
    what: &'static str,
    received: u64,
) -> Result<Option<Bytes>, RegistryError> {
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(RegistryError::Timeout {
                    url: url.to_owned(),
                    waiting_for: what,
                    after: idle,
                });
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => {
                return Err(RegistryError::Transport {
                    url: url.to_owned(),
                    reason: format!("reading {what} after {received} bytes: {e}"),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            return Ok(Some(data));
        }
    }
}

impl Download {
    /// The next chunk, or `None` at the end (which must match `Content-Length` when the server sent one).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        let next = next_data(
            &mut self.body,
            self.idle_timeout,
            &self.url,
            "the next chunk of the file",
            self.received,
        )
        .await?;
        let Some(data) = next else {
            return match self.length {
                Some(expected) if expected != self.received => Err(RegistryError::SizeMismatch {
                    url: self.url.clone(),
                    expected,
                    actual: self.received,
                }),
                _ => Ok(None),
            };
        };
        self.received = self.received.saturating_add(data.len() as u64);
        if self.received > self.limit {
            return Err(RegistryError::TooLarge {
                url: self.url.clone(),
                limit: self.limit,
            });
        }
        Ok(Some(data))
    }

    /// `Content-Length`, when the server sent it.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The URL the file came from (after redirects).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl BlobStream {
    /// The next chunk, or `None` once the whole blob arrived and its size and digest match the descriptor. Any
    /// error (transport, idle timeout, too many bytes, size or digest mismatch) ends the stream: the chunks already
    /// returned must be discarded.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        match self.state {
            StreamState::Streaming => {}
            StreamState::Finished => return Ok(None),
            StreamState::Failed => {
                return Err(RegistryError::StreamFailed {
                    url: self.url.clone(),
                });
            }
        }
        let result = self.advance().await;
        match &result {
            Err(_) => self.state = StreamState::Failed,
            Ok(None) => self.state = StreamState::Finished,
            Ok(Some(_)) => {}
        }
        result
    }

    async fn advance(&mut self) -> Result<Option<Bytes>, RegistryError> {
        let next = next_data(
            &mut self.body,
            self.idle_timeout,
            &self.url,
            "the next chunk of the blob",
            self.received,
        )
        .await?;
        let Some(data) = next else {
            return self.finish().map(|()| None);
        };
        self.received = self.received.saturating_add(data.len() as u64);
        if self.received > self.expected_size {
            return Err(RegistryError::SizeMismatch {
                url: self.url.clone(),
                expected: self.expected_size,
                actual: self.received,
            });
        }
        self.hasher.update(&data);
        Ok(Some(data))
    }

    fn finish(&mut self) -> Result<(), RegistryError> {
        if self.received != self.expected_size {
            return Err(RegistryError::SizeMismatch {
                url: self.url.clone(),
                expected: self.expected_size,
                actual: self.received,
            });
        }
        let actual = format!(
            "sha256:{}",
            oakestra_runtime::hex::encode(&std::mem::take(&mut self.hasher).finalize())
        );
        if actual != self.expected_digest {
            return Err(RegistryError::DigestMismatch {
                url: self.url.clone(),
                expected: self.expected_digest.clone(),
                actual,
            });
        }
        tracing::debug!(url = %self.url, digest = %actual, size = self.received, "blob verified");
        Ok(())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The size the descriptor promised.
    pub fn expected_size(&self) -> u64 {
        self.expected_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(registry: &str, repository: &str, tag: &str) -> ImageRef {
        ImageRef {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            reference: Reference::Tag(tag.to_owned()),
        }
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn image_references_normalise_like_docker() {
        let cases = [
            ("nginx", tag("docker.io", "library/nginx", "latest")),
            ("nginx:1.25", tag("docker.io", "library/nginx", "1.25")),
            ("docker.io/nginx", tag("docker.io", "library/nginx", "latest")),
            (
                "index.docker.io/library/nginx:x",
                tag("docker.io", "library/nginx", "x"),
            ),
            ("oakestra/app", tag("docker.io", "oakestra/app", "latest")),
            ("ghcr.io/o/a/b:v1.2_3-x", tag("ghcr.io", "o/a/b", "v1.2_3-x")),
            ("127.0.0.1:5000/a/b:v1", tag("127.0.0.1:5000", "a/b", "v1")),
            ("127.0.0.1:5000/a/b", tag("127.0.0.1:5000", "a/b", "latest")),
            ("localhost/x", tag("localhost", "x", "latest")),
            ("localhost:5000/x:y", tag("localhost:5000", "x", "y")),
            ("[::1]:5000/x", tag("[::1]:5000", "x", "latest")),
            ("Registry/x", tag("Registry", "x", "latest")),
            (
                "a.b/c__d/e-----f/g.h_i",
                tag("a.b", "c__d/e-----f/g.h_i", "latest"),
            ),
            // Without a '/', `localhost:5000` is a Docker Hub repository with a tag, as for docker.
            ("localhost:5000", tag("docker.io", "library/localhost", "5000")),
        ];
        for (text, want) in cases {
            let got = ImageRef::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
        }
        let pinned = ImageRef::parse(&format!("nginx@{DIGEST}")).unwrap();
        assert_eq!(pinned.reference, Reference::Digest(DIGEST.to_owned()));
        assert_eq!(pinned.name(), format!("docker.io/library/nginx@{DIGEST}"));
        // A tag next to a digest is dropped: the digest decides.
        let both = ImageRef::parse(&format!("127.0.0.1:5000/a:v1@{DIGEST}")).unwrap();
        assert_eq!(both.name(), format!("127.0.0.1:5000/a@{DIGEST}"));
        assert_eq!(
            ImageRef::parse("nginx").unwrap().name(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            "busybox:1".parse::<ImageRef>().unwrap().to_string(),
            "docker.io/library/busybox:1"
        );
    }

    #[test]
    fn bad_image_references_name_the_value_and_the_rule() {
        let cases = [
            ("", "must not be empty"),
            ("Nginx", "lowercase"),
            ("docker.io/Library/nginx", "lowercase"),
            ("nginx ", "whitespace"),
            ("nginx:", "tag"),
            ("nginx:-x", "tag"),
            ("nginx:a/b", "port"),
            ("a//b", "must not be empty"),
            ("a/b/", "must not be empty"),
            ("example.com/", "the repository must not be empty"),
            ("_a", "starts and ends"),
            ("a-", "starts and ends"),
            ("a._b", "never mixed"),
            ("a___b", "never mixed"),
            ("a$b", "only lowercase letters"),
            ("nginx@sha256:abc", "64 lowercase hex"),
            ("nginx@md5:0123", "only sha256"),
            ("nginx@latest", "algorithm:hex"),
            (
                "nginx@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                "64 lowercase hex",
            ),
            ("host:99999/x", "port"),
            ("host:/x", "port"),
            ("-host.io/x", "registry host"),
            ("[::1/x", "IPv6"),
            ("[zz]:5/x", "IPv6"),
        ];
        for (text, rule) in cases {
            match ImageRef::parse(text) {
                Err(e @ RegistryError::InvalidReference { .. }) => {
                    let message = e.to_string();
                    assert!(message.contains(&format!("{text:?}")), "{text}: {message}");
                    assert!(
                        message.contains(rule),
                        "{text}: {message} should mention {rule:?}"
                    );
                }
                other => panic!("{text:?} should be refused, got {other:?}"),
            }
        }
        let long = format!("example.com/{}", "a".repeat(250));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn platforms_parse_print_and_match() {
        let host = Platform::host();
        assert_eq!(host.os, std::env::consts::OS);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.to_string(), "linux/amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(host.to_string(), "linux/arm64/v8");
        }
        let arm64 = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(arm64.variant.as_deref(), Some("v8"));
        assert_eq!(arm64.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/x86_64").unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/aarch64").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("linux/armhf").unwrap().to_string(),
            "linux/arm/v7"
        );
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/arm64/v8/x",
            "linux/am d64",
        ] {
            match Platform::parse(bad) {
                Err(e @ RegistryError::InvalidPlatform { .. }) => {
                    assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
                }
                other => panic!("{bad:?} should be refused, got {other:?}"),
            }
        }
        let offered = |text: &str| {
            let mut parts = text.split('/');
            Platform {
                os: parts.next().unwrap().to_owned(),
                architecture: parts.next().unwrap().to_owned(),
                variant: parts.next().map(str::to_owned),
            }
        };
        // arm64 without a variant is v8; a wanted platform without a variant takes any.
        assert!(arm64.matches(&offered("linux/arm64")));
        assert!(arm64.matches(&offered("linux/arm64/v8")));
        assert!(!arm64.matches(&offered("linux/arm64/v9")));
        assert!(!arm64.matches(&offered("linux/amd64")));
        assert!(!arm64.matches(&offered("windows/arm64")));
        let any_arm = Platform::parse("linux/arm").unwrap();
        assert!(any_arm.matches(&offered("linux/arm/v6")));
        let arm7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(arm7.matches(&offered("linux/arm")));
        assert!(!arm7.matches(&offered("linux/arm/v6")));
        assert!(
            Platform::parse("linux/amd64")
                .unwrap()
                .matches(&offered("linux/x86_64"))
        );
    }

    #[test]
    fn www_authenticate_challenges_parse() {
        let parsed = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].scheme, "bearer");
        assert_eq!(parsed[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(parsed[0].params["service"], "registry.docker.io");
        assert_eq!(parsed[0].params["scope"], "repository:library/nginx:pull");

        let parsed = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].scheme, "basic");
        assert_eq!(parsed[0].params["realm"], "Registry Realm");

        // Two challenges in one value, spaces around '=', a token value, escapes, mixed case names.
        let parsed = parse_challenges(
            r#"Basic realm="a, b", BEARER Realm = "https://x/t?a=1" , service=svc, error="invalid_token", note="say \"hi\"""#,
        );
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed[0].params["realm"], "a, b");
        assert_eq!(parsed[1].scheme, "bearer");
        assert_eq!(parsed[1].params["realm"], "https://x/t?a=1");
        assert_eq!(parsed[1].params["service"], "svc");
        assert_eq!(parsed[1].params["note"], "say \"hi\"");

        // Garbage never panics.
        for junk in [
            "",
            "=",
            "==,,",
            "Bearer",
            "Bearer realm=\"unterminated",
            "Basic dXNlcjpwYXNz==",
            "x=y",
            "Ä=ö, =\"\\",
        ] {
            let _ = parse_challenges(junk);
        }
        assert_eq!(parse_challenges("Basic dXNlcjpwYXNz==")[0].scheme, "basic");
        assert_eq!(
            parse_challenges("Bearer realm=\"unterminated")[0].params["realm"],
            "unterminated"
        );
    }

    fn entry(digest_char: char, platform: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: MEDIA_TYPE_OCI_MANIFEST.to_owned(),
            digest: format!("sha256:{}", digest_char.to_string().repeat(64)),
            size: 10,
            annotations: BTreeMap::new(),
            platform: platform.map(|p| {
                let mut parts = p.split('/');
                Platform {
                    os: parts.next().unwrap().to_owned(),
                    architecture: parts.next().unwrap().to_owned(),
                    variant: parts.next().map(str::to_owned),
                }
            }),
        }
    }

    #[test]
    fn index_entries_are_selected_by_platform() {
        let image = ImageRef::parse("nginx").unwrap();
        let index = [
            entry('0', None),
            entry('1', Some("linux/amd64")),
            entry('2', Some("linux/arm/v6")),
            entry('3', Some("linux/arm/v7")),
            entry('4', Some("linux/arm64")),
            entry('5', Some("unknown/unknown")),
        ];
        let pick =
            |p: &str| select_platform(&image, &index, &Platform::parse(p).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").unwrap(), index[1].digest);
        assert_eq!(pick("linux/arm/v7").unwrap(), index[3].digest);
        assert_eq!(pick("linux/arm").unwrap(), index[2].digest);
        assert_eq!(pick("linux/arm64/v8").unwrap(), index[4].digest);
        match pick("linux/s390x") {
            Err(e @ RegistryError::NoMatchingPlatform { .. }) => {
                let message = e.to_string();
                assert!(message.contains("docker.io/library/nginx:latest"), "{message}");
                assert!(message.contains("linux/s390x"), "{message}");
                assert!(
                    message.contains("linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64, unknown/unknown"),
                    "{message}"
                );
            }
            other => panic!("expected no match, got {other:?}"),
        }
        let lone = [entry('9', None)];
        assert_eq!(
            select_platform(&image, &lone, &Platform::host()).unwrap().digest,
            lone[0].digest
        );
        match select_platform(&image, &[], &Platform::host()) {
            Err(e) => assert!(e.to_string().contains("empty"), "{e}"),
            Ok(d) => panic!("empty index matched {d:?}"),
        }
        // Docker manifest list entries deserialise with their platform.
        let list: IndexDocument = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[
            {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","size":7,"digest":"sha256:aa","platform":{"architecture":"arm64","os":"linux","variant":"v8","os.features":[]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            list.manifests[0].platform.as_ref().unwrap().to_string(),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn manifest_kinds_come_from_the_document_the_header_or_the_shape() {
        let image = ImageRef::parse("nginx").unwrap();
        let kind = |header: Option<&str>, body: &str| manifest_kind(&image, header, body.as_bytes(), "u");
        assert_eq!(
            kind(None, r#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#)
                .unwrap()
                .0,
            ManifestKind::Index
        );
        assert_eq!(
            kind(
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                "{}"
            )
            .unwrap()
            .0,
            ManifestKind::Manifest
        );
        assert_eq!(
            kind(Some("application/json"), r#"{"manifests":[]}"#).unwrap().0,
            ManifestKind::Index
        );
        assert_eq!(
            kind(None, r#"{"schemaVersion":2,"config":{}}"#).unwrap().0,
            ManifestKind::Manifest
        );
        assert!(matches!(
            kind(
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                r#"{"schemaVersion":1}"#
            ),
            Err(RegistryError::Schema1 { .. })
        ));
        assert!(matches!(
            kind(None, r#"{"schemaVersion":1,"fsLayers":[]}"#),
            Err(RegistryError::Schema1 { .. })
        ));
        assert!(matches!(
            kind(Some("application/vnd.example+json"), "{}"),
            Err(RegistryError::UnsupportedMediaType { .. })
        ));
        assert!(matches!(
            kind(None, "not json"),
            Err(RegistryError::InvalidDocument { .. })
        ));
    }

    #[test]
    fn urls_and_redirect_locations_resolve() {
        let t = Target::parse("https://registry-1.docker.io/v2/library/nginx/blobs/x?a=b").unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            (Scheme::Https, "registry-1.docker.io", 443)
        );
        assert_eq!(t.path_and_query, "/v2/library/nginx/blobs/x?a=b");
        let v6 = Target::parse("http://[::1]:5000/v2/").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.authority.as_str()),
            ("::1", 5000, "[::1]:5000")
        );
        assert_eq!(
            t.join("https://cdn.example/x?sig=1").unwrap().url(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(t.join("//cdn.example/y").unwrap().url(), "https://cdn.example/y");
        assert_eq!(
            t.join("/v2/other").unwrap().url(),
            "https://registry-1.docker.io/v2/other"
        );
        assert_eq!(
            t.join("sibling").unwrap().url(),
            "https://registry-1.docker.io/v2/library/nginx/blobs/sibling"
        );
        assert!(t.join("ftp://x/").is_err());
        assert!(Target::parse("/relative").is_err());
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(normalize_registry_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_registry_key("ghcr.io"), "ghcr.io");
        for local in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback_registry(local), "{local}");
        }
        for remote in ["docker.io", "10.0.0.1:5000", "[::2]:5000", "localhost.example"] {
            assert!(!is_loopback_registry(remote), "{remote}");
        }
        assert_eq!(percent_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        let credentials = Credentials {
            username: "u".to_owned(),
            password: "secret".to_owned(),
        };
        assert!(!format!("{credentials:?}").contains("secret"));
        let registry = Registry::new(HashMap::from([(
            "https://index.docker.io/v1/".to_owned(),
            credentials,
        )]));
        assert!(!format!("{registry:?}").contains("secret"));
        assert!(registry.inner.credentials.contains_key("docker.io"));
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn the_client_and_its_futures_can_move_between_threads() {
        // The containerd runtime spawns pulls on tokio's multi-threaded runtime.
        let registry = Registry::new(HashMap::new());
        let image = ImageRef::parse("nginx").unwrap();
        let platform = Platform::host();
        let desc = entry('a', None);
        assert_send(&registry);
        assert_send(&registry.resolve(&image, &platform));
        assert_send(&registry.fetch_blob(&image, &desc));
        fn stream_is_send(stream: &mut BlobStream) {
            assert_send(&stream.next_chunk());
        }
        let _ = stream_is_send;
    }

    // --- against a scripted HTTP server ---------------------------------------------------------------------------

    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request the mock server saw: path and headers (names lowercase).
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: HashMap<String, String>,
    }

    /// What the mock answers: status, headers, body; a body of `STALL` sends the head and then nothing.
    type Reply = (u16, Vec<(&'static str, String)>, Vec<u8>);

    /// Answers a request, given the mock's own address.
    type Handler = Arc<dyn Fn(SocketAddr, &Seen) -> Reply + Send + Sync>;

    struct Mock {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        tls_attempts: Arc<Mutex<usize>>,
        task: JoinHandle<()>,
    }

    impl Drop for Mock {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Mock {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// A one-request-per-connection HTTP/1.1 server on 127.0.0.1 that answers a TLS ClientHello the way Go's
    /// HTTP server does (`400 Bad Request` in plain text).
    async fn mock(handler: impl Fn(SocketAddr, &Seen) -> Reply + Send + Sync + 'static) -> Mock {
        mock_with(None, handler).await
    }

    /// The mock over TLS with `acceptor` (then a ClientHello is just a handshake).
    async fn mock_with(
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        handler: impl Fn(SocketAddr, &Seen) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tls_attempts = Arc::new(Mutex::new(0));
        let handler: Handler = Arc::new(handler);
        let (seen2, tls2) = (seen.clone(), tls_attempts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (handler, seen, tls, acceptor) =
                    (handler.clone(), seen2.clone(), tls2.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_one(socket, addr, handler, seen, Some(tls)).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(socket).await {
                                serve_one(stream, addr, handler, seen, None).await;
                            }
                        }
                    }
                });
            }
        });
        Mock {
            addr,
            seen,
            tls_attempts,
            task,
        }
    }

    /// Serves one request on `socket`; with `tls_attempts`, a TLS ClientHello gets Go's plain-HTTP `400`.
    async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
        mut socket: S,
        addr: SocketAddr,
        handler: Handler,
        seen: Arc<Mutex<Vec<Seen>>>,
        tls_attempts: Option<Arc<Mutex<usize>>>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0_u8; 4096];
        loop {
            let n = socket.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(attempts) = &tls_attempts
                && buf[0] == 0x16
            {
                *attempts.lock().unwrap() += 1;
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines.next().unwrap().split(' ').nth(1).unwrap().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let request = Seen { path, headers };
        seen.lock().unwrap().push(request.clone());
        let (status, headers, body) = handler(addr, &request);
        let stall = body == b"STALL";
        let mut out = format!("HTTP/1.1 {status} Whatever\r\n");
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let length = if stall { 100 } else { body.len() };
        out.push_str(&format!("Content-Length: {length}\r\nConnection: close\r\n\r\n"));
        let _ = socket.write_all(out.as_bytes()).await;
        if stall {
            let _ = socket.write_all(b"partial").await;
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let _ = socket.write_all(&body).await;
        let _ = socket.shutdown().await;
    }

    fn json(body: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(body).unwrap()
    }

    fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": sha256_digest(data), "size": data.len()})
    }

    /// Without the loopback shortcut, so the mock (on 127.0.0.1) is first tried over HTTPS.
    fn client(credentials: HashMap<String, Credentials>) -> Registry {
        Registry::new(credentials).rebuild(|inner| inner.plain_http_for_loopback = false)
    }

    async fn read_all(mut stream: BlobStream) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn pulls_through_http_fallback_bearer_auth_and_a_cross_origin_redirect() {
        let layer = b"layer bytes".to_vec();
        let layer_digest = sha256_digest(&layer);
        let cdn_layer = layer.clone();
        let cdn = mock(move |_, _| (200, vec![], cdn_layer.clone())).await;
        let cdn_addr = cdn.addr;

        let config =
            json(&serde_json::json!({"architecture": "arm64", "os": "linux", "config": {"Cmd": ["sh"]}}));
        let manifest = json(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": descriptor(MEDIA_TYPE_OCI_CONFIG, &config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
        }));
        let mut arm = descriptor(MEDIA_TYPE_OCI_MANIFEST, &manifest);
        arm["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
        let other = serde_json::json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": DIGEST, "size": 5,
            "platform": {"os": "linux", "architecture": "amd64"}});
        let index = json(
            &serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [other, arm]}),
        );
        let (manifest_digest, config_digest) = (sha256_digest(&manifest), sha256_digest(&config));
        let (index2, manifest2, config2, layer_digest2) = (
            index.clone(),
            manifest.clone(),
            config.clone(),
            layer_digest.clone(),
        );
        let registry = mock(move |me, request| {
            let authorized = request.headers.get("authorization").map(String::as_str) == Some("Bearer tok-1");
            let path = request.path.as_str();
            if path.starts_with("/token?") {
                assert_eq!(
                    path, "/token?service=mock&scope=repository%3Atest%2Fapp%3Apull",
                    "token query"
                );
                // base64("alice:pw")
                let basic = request.headers.get("authorization").map(String::as_str);
                return if basic == Some("Basic YWxpY2U6cHc=") {
                    (200, vec![], br#"{"token":"tok-1","expires_in":1e300}"#.to_vec())
                } else {
                    (401, vec![], b"bad credentials".to_vec())
                };
            }
            if !authorized {
                let challenge = format!(
                    r#"Bearer realm="http://{me}/token",service="mock",scope="repository:test/app:pull""#
                );
                return (
                    401,
                    vec![("WWW-Authenticate", challenge)],
                    b"{\"errors\":[]}".to_vec(),
                );
            }
            let typed = |media_type: &str, body: &Vec<u8>| {
                (200, vec![("Content-Type", media_type.to_owned())], body.clone())
            };
            if path == "/v2/test/app/manifests/v1" {
                typed(MEDIA_TYPE_OCI_INDEX, &index2)
            } else if path == format!("/v2/test/app/manifests/{}", sha256_digest(&manifest2)) {
                typed(MEDIA_TYPE_OCI_MANIFEST, &manifest2)
            } else if path == format!("/v2/test/app/blobs/{}", sha256_digest(&config2)) {
                (200, vec![], config2.clone())
            } else if path == format!("/v2/test/app/blobs/{layer_digest2}") {
                (
                    307,
                    vec![("Location", format!("http://{cdn_addr}/blob?sig=1"))],
                    vec![],
                )
            } else {
                (
                    404,
                    vec![],
                    b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}".to_vec(),
                )
            }
        })
        .await;

        let credentials = Credentials {
            username: "alice".to_owned(),
            password: "pw".to_owned(),
        };
        let name = format!("{}/test/app", registry.addr);
        let pull = client(HashMap::from([(
            name.split('/').next().unwrap().to_owned(),
            credentials,
        )]));
        let image = ImageRef::parse(&format!("{name}:v1")).unwrap();
        let resolved = pull
            .resolve(&image, &Platform::parse("linux/arm64/v8").unwrap())
            .await
            .unwrap();
        assert_eq!(resolved.target.digest, sha256_digest(&index));
        assert_eq!(resolved.target.media_type, MEDIA_TYPE_OCI_INDEX);
        assert_eq!(resolved.manifest.digest, manifest_digest);
        assert_eq!(resolved.manifest.platform.as_ref().unwrap().architecture, "arm64");
        assert_eq!(resolved.config.digest, config_digest);
        let blob_digests: Vec<&str> = resolved.blobs.iter().map(|(d, _)| d.digest.as_str()).collect();
        assert_eq!(
            blob_digests,
            [sha256_digest(&index), manifest_digest, config_digest.clone()]
        );
        assert_eq!(resolved.blobs[2].1, config);
        assert_eq!(resolved.layers.len(), 1);
        // One HTTPS attempt, then plain HTTP remembered for the registry.
        assert_eq!(*registry.tls_attempts.lock().unwrap(), 1);
        assert_eq!(pull.scheme_for(&image.registry), Scheme::Http);

        let got = read_all(pull.fetch_blob(&image, &resolved.layers[0]).await.unwrap())
            .await
            .unwrap();
        assert_eq!(got, layer);
        // The CDN got the redirect target without the registry's token.
        let cdn_seen = cdn.seen();
        assert_eq!(cdn_seen.len(), 1);
        assert_eq!(cdn_seen[0].path, "/blob?sig=1");
        assert!(!cdn_seen[0].headers.contains_key("authorization"), "{cdn_seen:?}");
        // One token fetch served every request; every request after the first carried it.
        let seen = registry.seen();
        assert_eq!(
            seen.iter().filter(|r| r.path.starts_with("/token")).count(),
            1,
            "{seen:?}"
        );
        assert_eq!(*registry.tls_attempts.lock().unwrap(), 1);

        // An unknown tag names the image; a wrong platform lists the offered ones.
        let missing = image.with_reference(Reference::Tag("nope".to_owned()));
        match pull.resolve(&missing, &Platform::host()).await {
            Err(e @ RegistryError::NotFound { .. }) => {
                assert!(e.to_string().contains(&missing.name()), "{e}");
                assert!(e.to_string().contains("MANIFEST_UNKNOWN"), "{e}");
            }
            other => panic!("expected not found, got {other:?}"),
        }
        match pull
            .resolve(&image, &Platform::parse("linux/riscv64").unwrap())
            .await
        {
            Err(e @ RegistryError::NoMatchingPlatform { .. }) => {
                assert!(e.to_string().contains("linux/amd64, linux/arm64"), "{e}");
            }
            other => panic!("expected no platform, got {other:?}"),
        }

        // Wrong credentials: the token service refuses, naming registry and repository.
        let wrong = client(HashMap::from([(
            image.registry.clone(),
            Credentials {
                username: "alice".to_owned(),
                password: "nope".to_owned(),
            },
        )]));
        match wrong.resolve(&image, &Platform::host()).await {
            Err(e @ RegistryError::Unauthorized { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&image.registry) && message.contains("test/app"),
                    "{message}"
                );
                assert!(message.contains("bad credentials"), "{message}");
            }
            other => panic!("expected unauthorized, got {other:?}"),
        }
    }

    fn stall_digest() -> String {
        sha256_digest(b"stall")
    }

    #[tokio::test]
    async fn basic_auth_schema1_and_blob_verification() {
        let good = b"good blob".to_vec();
        let registry = mock(move |_, request| {
            let path = request.path.as_str();
            if request.headers.get("authorization").map(String::as_str) != Some("Basic Ym9iOnNlY3JldA==") {
                return (
                    401,
                    vec![("WWW-Authenticate", r#"Basic realm="Registry Realm""#.to_owned())],
                    b"{}".to_vec(),
                );
            }
            match path {
                "/v2/old/manifests/latest" => (
                    200,
                    vec![("Content-Type", MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED.to_owned())],
                    br#"{"schemaVersion":1,"name":"old"}"#.to_vec(),
                ),
                _ if path == format!("/v2/app/blobs/{}", stall_digest()) => (200, vec![], b"STALL".to_vec()),
                _ if path.starts_with("/v2/app/blobs/") => (200, vec![], good.clone()),
                _ => (404, vec![], b"unknown".to_vec()),
            }
        })
        .await;
        let host = registry.addr.to_string();
        // No credentials: refused, naming the registry and the repository.
        let anonymous = client(HashMap::new());
        let image = ImageRef::parse(&format!("{host}/old")).unwrap();
        match anonymous.resolve(&image, &Platform::host()).await {
            Err(e @ RegistryError::Unauthorized { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&host) && message.contains("repository old"),
                    "{message}"
                );
                assert!(message.contains("none are configured"), "{message}");
            }
            other => panic!("expected unauthorized, got {other:?}"),
        }
        let credentials = Credentials {
            username: "bob".to_owned(),
            password: "secret".to_owned(),
        };
        let pull = client(HashMap::from([(host.clone(), credentials)]))
            .with_timeouts(Duration::from_secs(5), Duration::from_millis(300));
        match pull.resolve(&image, &Platform::host()).await {
            Err(e @ RegistryError::Schema1 { .. }) => assert!(e.to_string().contains("schema 1"), "{e}"),
            other => panic!("expected schema 1, got {other:?}"),
        }
        let app = ImageRef::parse(&format!("{host}/app")).unwrap();
        let desc = |digest: String, size: usize| Descriptor {
            media_type: "application/octet-stream".to_owned(),
            digest,
            size: size as i64,
            annotations: BTreeMap::new(),
            platform: None,
        };
        let ok = read_all(
            pull.fetch_blob(&app, &desc(sha256_digest(b"good blob"), 9))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(ok, b"good blob");
        // Right size, wrong digest: the last chunk fails, and the stream stays failed.
        let mut stream = pull.fetch_blob(&app, &desc(DIGEST.to_owned(), 9)).await.unwrap();
        let mut outcome = stream.next_chunk().await;
        while let Ok(Some(_)) = outcome {
            outcome = stream.next_chunk().await;
        }
        match outcome {
            Err(RegistryError::DigestMismatch { expected, actual, .. }) => {
                assert_eq!(expected, DIGEST);
                assert_eq!(actual, sha256_digest(b"good blob"));
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert!(matches!(
            stream.next_chunk().await,
            Err(RegistryError::StreamFailed { .. })
        ));
        // A size that the Content-Length contradicts fails before streaming.
        assert!(matches!(
            pull.fetch_blob(&app, &desc(DIGEST.to_owned(), 3)).await,
            Err(RegistryError::SizeMismatch {
                expected: 3,
                actual: 9,
                ..
            })
        ));
        // Bad descriptors are refused before any request.
        assert!(matches!(
            pull.fetch_blob(&app, &desc("sha512:00".to_owned(), 3)).await,
            Err(RegistryError::InvalidDigest { .. })
        ));
        // A server that stops sending trips the idle timeout (per chunk, not a deadline on the whole transfer).
        let mut stream = pull.fetch_blob(&app, &desc(stall_digest(), 100)).await.unwrap();
        assert_eq!(stream.next_chunk().await.unwrap().unwrap(), &b"partial"[..]);
        match stream.next_chunk().await {
            Err(RegistryError::Timeout {
                waiting_for, after, ..
            }) => {
                assert!(waiting_for.contains("next chunk"), "{waiting_for}");
                assert_eq!(after, Duration::from_millis(300));
            }
            other => panic!("expected an idle timeout, got {other:?}"),
        }
    }

    /// A self-signed certificate for `127.0.0.1` and `localhost` (valid until 2126) and its key: test-only material,
    /// made with `openssl req -x509` for these tests and used nowhere else.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIB3zCCAYWgAwIBAgIUW3K82CJ1+irz/k/3JEi7eytrQbowCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZb2FrZXN0cmEtcnMgcmVnaXN0cnkgdGVzdDAgFw0yNjExMjIw
MzA0MDJaGA8yMTI2MTAyOTAzMDQwMlowJDEiMCAGA1UEAwwZb2FrZXN0cmEtcnMg
cmVnaXN0cnkgdGVzdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABG/baP2ft/F1
5gbxXOUB1JvA0mcTynfQWk6wLJJYLasoVMDsFm+sekJLE3jGhS3K9yN0blItYnK7
EMqXzNN6k8OjgZIwgY8wHQYDVR0OBBYEFNb2MuBDt3K+R28e1oIqUMe42+2YMB8G
A1UdIwQYMBaAFNb2MuBDt3K+R28e1oIqUMe42+2YMBoGA1UdEQQTMBGHBH8AAAGC
CWxvY2FsaG9zdDAMBgNVHRMBAf8EAjAAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMA4G
A1UdDwEB/wQEAwIHgDAKBggqhkjOPQQDAgNIADBFAiBvns1kwc8vmkT0uSdD4dwq
mniSuf1LnWNcB//tB1PLQgIhAN7ky+rnlEa/j1aWov3xTQiz1CQKITURx9RxxseE
ewEk
-----END CERTIFICATE-----
";
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6cwwfzP/fVTiC8yd
7kfe59mfwmPW8jqVThQJtLLnQo6hRANCAARv22j9n7fxdeYG8VzlAdSbwNJnE8p3
0FpOsCySWC2rKFTA7BZvrHpCSxN4xoUtyvcjdG5SLWJyuxDKl8zTepPD
-----END PRIVATE KEY-----
";

    #[tokio::test]
    async fn pulls_over_https_and_refuses_an_untrusted_certificate() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let cert = CertificateDer::from_pem_slice(TEST_CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(TEST_KEY.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let config = json(&serde_json::json!({"architecture": "amd64", "os": "linux"}));
        let manifest = json(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "config": descriptor(MEDIA_TYPE_DOCKER_CONFIG, &config), "layers": [],
        }));
        let (manifest2, config2) = (manifest.clone(), config.clone());
        let registry = mock_with(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
            move |_, request| match request.path.as_str() {
                "/v2/secure/manifests/latest" => (
                    200,
                    vec![
                        ("Content-Type", MEDIA_TYPE_DOCKER_MANIFEST.to_owned()),
                        ("Docker-Content-Digest", sha256_digest(&manifest2)),
                    ],
                    manifest2.clone(),
                ),
                _ => (200, vec![], config2.clone()),
            },
        )
        .await;
        let image = ImageRef::parse(&format!("{}/secure", registry.addr)).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let trusting = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let pull = client(HashMap::new()).with_tls_config(Arc::new(trusting));
        let resolved = pull.resolve(&image, &Platform::host()).await.unwrap();
        assert_eq!(resolved.manifest.digest, sha256_digest(&manifest));
        assert_eq!(resolved.manifest.media_type, MEDIA_TYPE_DOCKER_MANIFEST);
        assert_eq!(resolved.config.media_type, MEDIA_TYPE_DOCKER_CONFIG);
        assert!(resolved.layers.is_empty());
        assert_eq!(pull.scheme_for(&image.registry), Scheme::Https);

        // The Mozilla roots do not trust the test certificate: a TLS error, and no plain-HTTP retry.
        match client(HashMap::new()).resolve(&image, &Platform::host()).await {
            Err(RegistryError::Transport { url, reason }) => {
                assert!(url.starts_with("https://127.0.0.1:"), "{url}");
                assert!(reason.contains("TLS handshake"), "{reason}");
            }
            other => panic!("expected a TLS failure, got {other:?}"),
        }
        assert_eq!(
            registry.seen().len(),
            2,
            "only the trusted client's requests got through"
        );
    }
}
