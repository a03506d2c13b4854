//! The MQTT broker workers talk to: the embedded one ([`server`], [`router`], [`codec`], with topic ACLs from
//! [`acl`]), or an external broker (Mosquitto) whose password and ACL files this module writes; and the per-node
//! MQTT credentials.
//!
//! Every node has one secret; its NetManager connects as `<node id>` and its NodeEngine as `<node id>-ne`, each
//! with the client id equal to the user name. [`Credentials`] maps those users (and the cluster's own user) to
//! Mosquitto `$6$` hashes, so the same table serves the embedded broker's logins and Mosquitto's `password_file`.
//!
//! What each mode enforces:
//! - embedded (default): user known, password verifies, client id equals the user; then the topic ACLs of
//!   [`acl`]: a worker publishes only below its own `nodes/<id>/` and reads only that and the job update notices.
//!   The cluster-service's own client is in-process (no socket, nothing to drop under load);
//! - embedded with `allow_anonymous` (compatibility with reference Go workers, which send no credentials): a
//!   registered node's programs may also connect without a login, identified by client id; the ACLs still apply;
//! - external: Mosquitto enforces the password file and the per-user ACL file written here
//!   ([`Credentials::acl_file`]); run it with `use_username_as_clientid true`.
//!
//! Why an own broker rather than rumqttd: rumqttd 0.20 has no topic ACLs, cannot close a client whose credentials
//! were revoked, needs ~150 KB per connection (10,000 workers would take 3 GB) and sets no `TCP_NODELAY`; MQTT 3.1.1
//! is small enough to implement in ~1,500 lines with every bound explicit.

pub mod acl;
pub mod codec;
pub mod router;
pub mod server;

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use sha2::{Digest as _, Sha512};

/// Bytes of salt in a `$6$` hash (what `mosquitto_passwd` uses, and what Mosquitto insists on).
pub const SALT_LEN: usize = 12;
/// Bytes of a SHA-512 digest.
const DIGEST_LEN: usize = 64;
/// Suffix of the NodeEngine's user name.
pub const NODE_ENGINE_SUFFIX: &str = "-ne";
/// Deadline of the external broker's reload command.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest MQTT packet the embedded broker takes.
pub const MAX_PAYLOAD_SIZE: usize = 1 << 20;
/// Longest node id accepted (it becomes a user name, a client id and a topic level).
pub const MAX_NODE_ID_LEN: usize = 128;

/// A Mosquitto `$6$` password hash: `$6$<base64 salt>$<base64 SHA-512(password || salt)>`, with a fresh 12-byte salt
/// and standard padded base64: what `mosquitto_passwd -H sha512` writes and Mosquitto 2.0 reads.
///
/// # Panics
/// If the OS random source fails (no `getrandom` syscall and no `/dev/urandom`): no salt is better than a weak one.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt);
    hash_with_salt(password, &salt)
}

fn hash_with_salt(password: &str, salt: &[u8]) -> String {
    format!(
        "$6${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(digest(password, salt))
    )
}

fn digest(password: &str, salt: &[u8]) -> [u8; DIGEST_LEN] {
    Sha512::new()
        .chain_update(password.as_bytes())
        .chain_update(salt)
        .finalize()
        .into()
}

/// The salt and digest of a well-formed `$6$` hash.
fn parse_hash(hash: &str) -> Option<([u8; SALT_LEN], [u8; DIGEST_LEN])> {
    let (salt, digest) = hash.strip_prefix("$6$")?.split_once('$')?;
    let salt = STANDARD.decode(salt).ok()?.try_into().ok()?;
    let digest = STANDARD.decode(digest).ok()?.try_into().ok()?;
    Some((salt, digest))
}

/// Constant-time check of `password` against a `$6$` hash; a malformed hash matches nothing.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Some((salt, expected)) = parse_hash(hash) else {
        return false;
    };
    let actual = digest(password, &salt);
    // Every byte is looked at whatever the first difference, so the time does not say where it is.
    let diff = actual
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// A fresh random secret: 32 random bytes as 64 lowercase hex chars.
///
/// # Panics
/// If the OS random source fails (see [`hash_password`]).
pub fn new_secret() -> String {
    #[allow(
        clippy::expect_used,
        reason = "a secret without OS randomness must not exist; Linux's getrandom does not fail"
    )]
    oakestra_runtime::secret::random_hex(32).expect("the OS random source failed")
}

fn fill_random(buf: &mut [u8]) {
    #[allow(
        clippy::expect_used,
        reason = "a secret or salt without OS randomness must not exist; Linux's getrandom does not fail"
    )]
    getrandom::fill(buf).expect("the OS random source failed");
}

/// MQTT user names of a node: NetManager connects as `<node id>` and NodeEngine as `<node id>-ne` (the reference's
/// client ids); both use the node's one secret, and the client id must equal the user name.
pub fn node_users(node_id: &str) -> [String; 2] {
    [node_id.to_owned(), format!("{node_id}{NODE_ENGINE_SUFFIX}")]
}

/// Whether `id` can be a node id here: 1 to [`MAX_NODE_ID_LEN`] ASCII letters, digits, `-`, `_` or `.`. Anything
/// else could break a line of Mosquitto's files, a topic level (`/`, `+`, `#`) or a client id rumqttd refuses
/// (`$`). [`Credentials::set_node`] ignores other ids.
pub fn is_valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One MQTT user.
#[derive(Clone)]
struct Account {
    hash: String,
    /// The node the user belongs to; `None` for the cluster's own user.
    node: Option<String>,
}

/// Who may connect: user name → `$6$` hash. Shared by the embedded broker's auth handler and the file writer;
/// cheap to clone (clones share the table).
#[derive(Clone, Default)]
pub struct Credentials {
    users: Arc<RwLock<BTreeMap<String, Account>>>,
    /// Bumped by every change, so a burst of registrations rewrites an external broker's files once, not once each.
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users = self.read();
        f.debug_struct("Credentials")
            .field("users", &users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The table with the cluster's own user (full access to `nodes/#` and `jobs/#`). A user name
    /// [`is_valid_node_id`] would refuse, or a malformed hash, is logged and left out.
    pub fn new(cluster_user: &str, cluster_password_hash: &str) -> Self {
        let credentials = Self::default();
        if !is_valid_node_id(cluster_user) {
            tracing::error!(user = %cluster_user, "cluster MQTT user name refused: not [A-Za-z0-9._-]{{1,128}}");
        } else if parse_hash(cluster_password_hash).is_none() {
            tracing::error!(user = %cluster_user, "cluster MQTT password hash refused: not a `$6$` hash");
        } else {
            credentials.write().insert(
                cluster_user.to_owned(),
                Account {
                    hash: cluster_password_hash.to_owned(),
                    node: None,
                },
            );
        }
        credentials
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Account>> {
        // Every write leaves the map consistent (single insert/retain calls), so a poisoned lock is safe to reuse.
        self.users.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Account>> {
        self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.users.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many changes the table has seen.
    fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Adds (or re-keys) both users of [`node_users`]`(node_id)` with `password_hash`. Logged and ignored: an id
    /// [`is_valid_node_id`] refuses, a malformed hash, or a user name already held by the cluster or another node.
    pub fn set_node(&self, node_id: &str, password_hash: &str) {
        if !is_valid_node_id(node_id) {
            tracing::warn!(node = %node_id, "node MQTT credentials refused: id is not [A-Za-z0-9._-]{{1,128}}");
            return;
        }
        if parse_hash(password_hash).is_none() {
            tracing::warn!(node = %node_id, "node MQTT credentials refused: not a `$6$` hash");
            return;
        }
        let mut users = self.write();
        let names = node_users(node_id);
        if let Some(taken) = names.iter().find(|name| {
            users
                .get(*name)
                .is_some_and(|a| a.node.as_deref() != Some(node_id))
        }) {
            tracing::warn!(node = %node_id, user = %taken, "node MQTT credentials refused: user name already taken");
            return;
        }
        for name in names {
            users.insert(
                name,
                Account {
                    hash: password_hash.to_owned(),
                    node: Some(node_id.to_owned()),
                },
            );
        }
        tracing::debug!(node = %node_id, "node MQTT credentials set");
    }

    /// Removes both users of the node (nothing if it has none). [`Broker::revoke_node`] also closes the node's
    /// open connections on the embedded broker.
    pub fn remove_node(&self, node_id: &str) {
        let mut users = self.write();
        let before = users.len();
        users.retain(|_, account| account.node.as_deref() != Some(node_id));
        if users.len() != before {
            tracing::debug!(node = %node_id, "node MQTT credentials removed");
        }
    }

    /// Who logs in with (`client_id`, `user`, `password`) on the embedded broker, if anyone: the user is known, the
    /// password verifies and the client id equals the user.
    pub fn login(&self, client_id: &str, user: &str, password: &str) -> Option<acl::Identity> {
        if client_id != user {
            return None;
        }
        let account = self.read().get(user)?.clone();
        let identity = match account.node {
            Some(node) => acl::Identity::Node(node),
            None => acl::Identity::Cluster,
        };
        verify_password(&account.hash, password).then_some(identity)
    }

    /// Who an anonymous client is (only with `allow_anonymous`): the node whose NetManager (`<id>`) or NodeEngine
    /// (`<id>-ne`) user equals the client id. Never the cluster.
    pub fn anonymous(&self, client_id: &str) -> Option<acl::Identity> {
        self.read()
            .get(client_id)
            .and_then(|account| account.node.clone())
            .map(acl::Identity::Node)
    }

    /// The Mosquitto password file text (`user:hash` lines, sorted).
    pub fn password_file(&self) -> String {
        self.read()
            .iter()
            .fold(String::new(), |mut text, (user, account)| {
                let _ = writeln!(text, "{user}:{}", account.hash);
                text
            })
    }

    /// The Mosquitto ACL file text: the cluster user gets `topic readwrite nodes/#` and `topic readwrite jobs/#`;
    /// each node user gets `topic readwrite nodes/<node id>/#` and `topic read jobs/+/updates_available` (the same
    /// rules as the embedded broker's [`acl`]; explicit `user` blocks, not
    /// `pattern`s, because NodeEngine's user is `<id>-ne`). Cluster user first, then the node users sorted.
    pub fn acl_file(&self) -> String {
        let users = self.read();
        let mut text =
            String::from("# Written by oakestra cluster-service; rewritten on every credential change.\n");
        for (user, _) in users.iter().filter(|(_, a)| a.node.is_none()) {
            let _ = write!(
                text,
                "\nuser {user}\ntopic readwrite nodes/#\ntopic readwrite jobs/#\n"
            );
        }
        for (user, node) in users
            .iter()
            .filter_map(|(user, a)| a.node.as_ref().map(|node| (user, node)))
        {
            let _ = write!(
                text,
                "\nuser {user}\ntopic readwrite nodes/{node}/#\ntopic read jobs/+/updates_available\n"
            );
        }
        text
    }
}

/// Which broker the cluster runs or uses.
#[derive(Debug, Clone)]
pub enum BrokerConfig {
    /// The embedded broker, listening on `listen` (port 0: a free port picked at start).
    Embedded {
        /// The address the MQTT 3.1.1 listener binds.
        listen: SocketAddr,
        /// Let registered nodes' programs connect without credentials (reference workers); ACLs still apply.
        allow_anonymous: bool,
        /// Connections held at once (two per worker, plus slack).
        max_connections: usize,
    },
    /// An external broker at host:port (from `--mqtt-url mqtt://host:port`). If `password_file`/`acl_file` are
    /// set, they are rewritten atomically on every credential change and then `reload_command` runs via `sh -c`
    /// (e.g. `kill -HUP $(cat /run/mosquitto/mosquitto.pid)`).
    External {
        /// Host the cluster's own client and the workers connect to.
        host: String,
        /// Its port.
        port: u16,
        /// Mosquitto's `password_file`, written by this module.
        password_file: Option<PathBuf>,
        /// Mosquitto's `acl_file`, written by this module.
        acl_file: Option<PathBuf>,
        /// Makes the broker re-read the files.
        reload_command: Option<String>,
    },
}

/// Why the broker could not start or take new credentials.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The embedded broker's address cannot be listened on.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A password or ACL file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The reload command failed.
    #[error("reload command `{command}`: {reason}")]
    Reload {
        /// The command as given.
        command: String,
        /// Exit status and stderr, or why it did not run.
        reason: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Time a new connection has to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The running (embedded) or configured (external) broker.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    credentials: Credentials,
    client_endpoint: (String, u16),
    worker_port: u16,
    embedded: Option<Arc<server::Embedded>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Serialises file rewrites + reloads, so the last change's files are the ones the broker reads last; holds the
    /// credentials version the files on disk reflect.
    rewrite: Arc<tokio::sync::Mutex<Option<u64>>>,
    /// Wakes the external broker's background reloader ([`Broker::credentials_changed_soon`]).
    reload_soon: Arc<tokio::sync::Notify>,
}

/// Shortest pause between two reloads of an external broker by the background reloader: Mosquitto re-reads the
/// whole password and ACL files, single-threaded, so reloading per registration would stall it under a burst.
pub const RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Broker {
    /// Starts the broker.
    ///
    /// Embedded: binds `listen` and serves it on this runtime until [`Broker::stop`]. External: writes the files
    /// once and runs the reload command; a failing reload is only logged here, since the broker may well be started
    /// after the cluster (it then reads the files at its own start).
    pub async fn start(config: BrokerConfig, credentials: Credentials) -> Result<Broker, BrokerError> {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        match config {
            BrokerConfig::Embedded {
                listen,
                allow_anonymous,
                max_connections,
            } => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|source| BrokerError::Bind { addr: listen, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| BrokerError::Bind { addr: listen, source })?;
                let embedded = Arc::new(server::Embedded::new(
                    credentials.clone(),
                    server::Settings {
                        max_packet: MAX_PAYLOAD_SIZE,
                        max_connections,
                        connect_timeout: CONNECT_TIMEOUT,
                        allow_anonymous,
                    },
                ));
                tokio::spawn(server::serve(listener, Arc::clone(&embedded), stop_rx));
                if allow_anonymous {
                    tracing::warn!(%bound, "MQTT: registered workers may connect WITHOUT credentials \
                        (--mqtt-allow-anonymous, for reference Go workers); anyone who learns a node id can act as \
                        that node on its own topics");
                }
                tracing::info!(listen = %bound, allow_anonymous, max_connections, "embedded MQTT broker ready");
                Ok(Broker {
                    config: BrokerConfig::Embedded {
                        listen: bound,
                        allow_anonymous,
                        max_connections,
                    },
                    client_endpoint: (client_host(bound.ip()), bound.port()),
                    worker_port: bound.port(),
                    credentials,
                    embedded: Some(embedded),
                    stop,
                    rewrite: Arc::default(),
                    reload_soon: Arc::default(),
                })
            }
            BrokerConfig::External { ref host, port, .. } => {
                let broker = Broker {
                    client_endpoint: (host.clone(), port),
                    worker_port: port,
                    config,
                    credentials,
                    embedded: None,
                    stop,
                    rewrite: Arc::default(),
                    reload_soon: Arc::default(),
                };
                tokio::spawn(reloader(
                    broker.config.clone(),
                    broker.credentials.clone(),
                    Arc::clone(&broker.rewrite),
                    Arc::clone(&broker.reload_soon),
                    stop_rx,
                ));
                match broker.rewrite_and_reload().await {
                    Err(e @ BrokerError::Reload { .. }) => {
                        tracing::warn!(error = %e, "external MQTT broker not reloaded (not running yet?)");
                    }
                    other => other?,
                }
                tracing::info!(host = %broker.client_endpoint.0, port, "using external MQTT broker");
                Ok(broker)
            }
        }
    }

    /// Stops the embedded broker: the listener closes and every connection ends (their wills are published).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// The embedded broker, for the cluster's in-process client and for statistics; `None` for an external one.
    pub fn embedded(&self) -> Option<&Arc<server::Embedded>> {
        self.embedded.as_ref()
    }

    /// host, port where an MQTT client on this machine reaches the broker (embedded: 127.0.0.1 when listening on
    /// 0.0.0.0, ::1 when on ::, else the listen ip; IPv6 in brackets, since rumqttc joins `host:port` as text).
    pub fn client_endpoint(&self) -> (String, u16) {
        self.client_endpoint.clone()
    }

    /// The port handed to workers as MQTT_BROKER_PORT.
    pub fn worker_port(&self) -> u16 {
        self.worker_port
    }

    /// Who may connect.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Removes a node's MQTT users, closes its connections on the embedded broker and forgets its sessions; an
    /// external broker's files follow with its next reload ([`Broker::credentials_changed_soon`]).
    pub fn revoke_node(&self, node_id: &str) {
        self.credentials.remove_node(node_id);
        if let Some(embedded) = &self.embedded {
            embedded.router().drop_node(node_id);
        }
        self.credentials_changed_soon();
    }

    /// After [`Credentials::set_node`]/[`Credentials::remove_node`]: has an external broker's files rewritten and
    /// reloaded in the background, at most once per [`RELOAD_MIN_INTERVAL`] (a burst of changes is one reload), and
    /// returns at once. The embedded broker reads the shared table at every login, so it needs nothing.
    pub fn credentials_changed_soon(&self) {
        if self.embedded.is_none() {
            self.reload_soon.notify_one();
        }
    }

    /// After [`Credentials::set_node`]/[`Credentials::remove_node`]: for an external broker, rewrites the files
    /// and runs the reload command (Mosquitto applies a SIGHUP asynchronously, shortly after the command
    /// returns). No-op for the embedded broker, which reads the shared table at every login.
    pub async fn credentials_changed(&self) -> Result<(), BrokerError> {
        match self.rewrite_and_reload().await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "external MQTT broker credentials not updated");
                Err(e)
            }
        }
    }

    async fn rewrite_and_reload(&self) -> Result<(), BrokerError> {
        sync_files(&self.config, &self.credentials, &self.rewrite).await
    }
}

/// The external broker's background reloader: after each wake-up, waits out [`RELOAD_MIN_INTERVAL`] since the last
/// reload (changes arriving meanwhile join this one), then writes the files and reloads.
async fn reloader(
    config: BrokerConfig,
    credentials: Credentials,
    written: Arc<tokio::sync::Mutex<Option<u64>>>,
    wake: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::time::sleep_until(last + RELOAD_MIN_INTERVAL).await;
        if let Err(e) = sync_files(&config, &credentials, &written).await {
            tracing::error!(error = %e, "external MQTT broker credentials not updated");
        }
        last = tokio::time::Instant::now();
    }
}

/// Writes the external broker's password and ACL files and runs its reload command, unless the files already hold
/// the credentials' current version.
async fn sync_files(
    config: &BrokerConfig,
    credentials: &Credentials,
    written: &tokio::sync::Mutex<Option<u64>>,
) -> Result<(), BrokerError> {
    let BrokerConfig::External {
        password_file,
        acl_file,
        reload_command,
        ..
    } = config
    else {
        return Ok(());
    };
    if password_file.is_none() && acl_file.is_none() {
        return Ok(());
    }
    let wanted = credentials.version();
    let mut written = written.lock().await;
    if written.is_some_and(|w| w >= wanted) {
        // Another caller wrote (and reloaded) files that already hold this change while we waited.
        return Ok(());
    }
    let version = credentials.version();
    let files: Vec<(PathBuf, String)> = [
        password_file.clone().map(|p| (p, credentials.password_file())),
        acl_file.clone().map(|p| (p, credentials.acl_file())),
    ]
    .into_iter()
    .flatten()
    .collect();
    tokio::task::spawn_blocking(move || {
        let group = mosquitto_gid();
        files
            .iter()
            .try_for_each(|(path, text)| write_atomically(path, text, group))
    })
    .await??;
    if let Some(command) = reload_command {
        run_reload(command).await?;
    }
    *written = Some(version);
    Ok(())
}

/// The host a local client uses for a listen address.
fn client_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("[{}]", Ipv6Addr::LOCALHOST),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

/// The primary group of the `mosquitto` user in `/etc/passwd`, if there is one.
fn mosquitto_gid() -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd
        .lines()
        .find_map(|line| line.strip_prefix("mosquitto:"))
        .and_then(|rest| rest.split(':').nth(2))
        .and_then(|gid| gid.parse().ok())
}

/// Writes `text` to `path` atomically (a temp file in the same directory, renamed over it).
///
/// Mode 0640, readable by Mosquitto: when a `mosquitto` user exists, the file's group becomes its group (the file
/// holds password hashes, so it is not made world-readable when that works). If that chown is not permitted (not
/// root and not in the group), the file gets 0644 instead, with a warning: a Mosquitto running as its own user
/// could not read it otherwise. Without a `mosquitto` user, 0640 with our own group (the broker runs as us).
fn write_atomically(path: &Path, text: &str, mosquitto_gid: Option<u32>) -> Result<(), BrokerError> {
    let io_err = |source| BrokerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "not a file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let tmp_err = |source| BrokerError::Io {
        path: tmp.clone(),
        source,
    };

    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        let mode = match mosquitto_gid {
            Some(gid) => match std::os::unix::fs::chown(&tmp, None, Some(gid)) {
                Ok(()) => 0o640,
                Err(e) => {
                    tracing::warn!(path = %path.display(), gid, error = %e,
                        "cannot give the file to mosquitto's group; making it world-readable (0644)");
                    0o644
                }
            },
            None => 0o640,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(tmp_err(source));
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(source));
    }
    // Make the rename durable; failing to is harmless (the next change rewrites the file).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    tracing::debug!(path = %path.display(), "MQTT broker file written");
    Ok(())
}

/// Runs the reload command with `sh -c`, killed after [`RELOAD_TIMEOUT`].
async fn run_reload(command: &str) -> Result<(), BrokerError> {
    let fail = |reason: String| BrokerError::Reload {
        command: command.to_owned(),
        reason,
    };
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run sh: {e}")))?;
    let output = tokio::time::timeout(RELOAD_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| fail(format!("still running after {RELOAD_TIMEOUT:?}, killed")))?
        .map_err(|e| fail(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(fail(format!("{}: {}", output.status, stderr.trim())));
    }
    tracing::info!(%command, "MQTT broker reloaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's `mosquitto_passwd -H sha512 -b pw alice secret` (mosquitto 2.0.11).
    const MOSQUITTO_HASH: &str = "$6$+w9QjLxVYkhBsFOI$7CHkKnsZlN0NbxVTcGDYL9KCDwRI1na1fW0liDv7ba+S6bh6ZB7LoQmOsRTgBd3h1WB1H7d/40ijHOOUr/QPJw==";

    #[test]
    fn hash_round_trip() {
        let hash = hash_password("s3cret");
        assert!(hash.starts_with("$6$"));
        // 12 salt bytes are 16 base64 chars, 64 digest bytes are 88 with padding.
        let parts: Vec<&str> = hash.split('$').collect();
        assert_eq!(parts.len(), 4, "{hash}");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3].len(), 88);
        assert!(parts[3].ends_with("=="));
        assert!(verify_password(&hash, "s3cret"));
        assert_ne!(hash_password("s3cret"), hash, "fresh salt each time");
    }

    #[test]
    fn wrong_password_fails() {
        let hash = hash_password("s3cret");
        assert!(!verify_password(&hash, "s3cret "));
        assert!(!verify_password(&hash, ""));
        assert!(!verify_password(&hash, "S3cret"));
    }

    #[test]
    fn verifies_mosquitto_passwd_output() {
        assert!(verify_password(MOSQUITTO_HASH, "secret"));
        assert!(!verify_password(MOSQUITTO_HASH, "secreT"));
        let (salt, _) = parse_hash(MOSQUITTO_HASH).unwrap();
        assert_eq!(hash_with_salt("secret", &salt), MOSQUITTO_HASH);
    }

    #[test]
    fn malformed_hashes_fail() {
        let good = hash_password("pw");
        let salt_only = good.rsplit_once('$').unwrap().0.to_owned();
        for bad in [
            "",
            "$6$",
            "$6$$",
            "pw",
            "$7$abc$def",
            "$6$!!!!$????",
            &salt_only,
            &good.replacen("$6$", "$5$", 1),
            &format!("{good}$extra"),
            // A truncated digest: valid base64, wrong length.
            &good[..good.len() - 8],
            // An 8-byte salt (Mosquitto wants 12).
            &format!("$6$AAAAAAAAAAA=${}", good.rsplit_once('$').unwrap().1),
            "$6$\u{e9}\u{e9}$\u{e9}",
        ] {
            assert!(!verify_password(bad, "pw"), "{bad:?} verified");
        }
    }

    #[test]
    fn secrets_are_hex_and_fresh() {
        let a = new_secret();
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(a, new_secret());
    }

    #[test]
    fn node_user_names() {
        assert_eq!(node_users("n1"), ["n1".to_owned(), "n1-ne".to_owned()]);
        assert!(is_valid_node_id("6650a2b1c3d4e5f6a7b8c9d0"));
        assert!(is_valid_node_id("node_1.a-b"));
        for bad in [
            "",
            "a b",
            "a/b",
            "a+",
            "#",
            "$SYS",
            "a:b",
            "a\nuser x",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_node_id(bad), "{bad:?}");
        }
    }

    fn sample() -> Credentials {
        let credentials = Credentials::new("cluster", &hash_with_salt("cpw", &[1; SALT_LEN]));
        credentials.set_node("n2", &hash_with_salt("s2", &[2; SALT_LEN]));
        credentials.set_node("n1", &hash_with_salt("s1", &[3; SALT_LEN]));
        credentials
    }

    impl Credentials {
        fn allows(&self, client_id: &str, user: &str, password: &str) -> bool {
            self.login(client_id, user, password).is_some()
        }
    }

    #[test]
    fn login_rules() {
        let c = sample();
        assert_eq!(c.login("cluster", "cluster", "cpw"), Some(acl::Identity::Cluster));
        assert_eq!(
            c.login("n1-ne", "n1-ne", "s1"),
            Some(acl::Identity::Node("n1".into()))
        );
        assert_eq!(c.anonymous("n1-ne"), Some(acl::Identity::Node("n1".into())));
        assert_eq!(c.anonymous("n1"), Some(acl::Identity::Node("n1".into())));
        assert_eq!(
            c.anonymous("cluster"),
            None,
            "the cluster never connects anonymously"
        );
        assert_eq!(c.anonymous("n7"), None);
        assert!(c.allows("cluster", "cluster", "cpw"));
        assert!(c.allows("n1", "n1", "s1"));
        assert!(c.allows("n1-ne", "n1-ne", "s1"));
        assert!(c.allows("n2-ne", "n2-ne", "s2"));
        assert!(!c.allows("n1", "n1", "s2"), "another node's secret");
        assert!(!c.allows("n2", "n1", "s1"), "client id differs from user");
        assert!(!c.allows("n1", "n1-ne", "s1"), "client id differs from user");
        assert!(!c.allows("n3", "n3", "s1"), "unknown user");
        assert!(!c.allows("", "", ""));
        c.remove_node("n1");
        assert!(!c.allows("n1", "n1", "s1"));
        assert!(!c.allows("n1-ne", "n1-ne", "s1"));
        assert!(c.allows("n2", "n2", "s2"));
        // Re-keying replaces the secret.
        c.set_node("n2", &hash_password("new"));
        assert!(!c.allows("n2", "n2", "s2"));
        assert!(c.allows("n2", "n2", "new"));
    }

    #[test]
    fn refuses_bad_ids_hashes_and_taken_names() {
        let c = sample();
        c.set_node("bad id", &hash_password("x"));
        c.set_node("n9", "plain-text-password");
        c.set_node("cluster", &hash_password("x"));
        c.set_node("n2-ne", &hash_password("x"));
        assert!(!c.password_file().contains("bad id"));
        assert!(!c.password_file().contains("n9"));
        assert!(!c.allows("cluster", "cluster", "x"));
        assert!(c.allows("cluster", "cluster", "cpw"));
        assert!(!c.allows("n2-ne", "n2-ne", "x"));
        assert!(c.allows("n2-ne", "n2-ne", "s2"));
        let empty = Credentials::new("not valid", &hash_password("x"));
        assert_eq!(empty.password_file(), "");
        // Removing the cluster user's name as a node does nothing.
        c.remove_node("cluster");
        assert!(c.allows("cluster", "cluster", "cpw"));
    }

    #[test]
    fn password_file_text() {
        let c = sample();
        let expected = [
            ("cluster", hash_with_salt("cpw", &[1; SALT_LEN])),
            ("n1", hash_with_salt("s1", &[3; SALT_LEN])),
            ("n1-ne", hash_with_salt("s1", &[3; SALT_LEN])),
            ("n2", hash_with_salt("s2", &[2; SALT_LEN])),
            ("n2-ne", hash_with_salt("s2", &[2; SALT_LEN])),
        ]
        .iter()
        .map(|(user, hash)| format!("{user}:{hash}\n"))
        .collect::<String>();
        assert_eq!(c.password_file(), expected);
        assert_eq!(Credentials::default().password_file(), "");
    }

    #[test]
    fn acl_file_text() {
        let text = sample().acl_file();
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "",
                "user cluster",
                "topic readwrite nodes/#",
                "topic readwrite jobs/#",
                "",
                "user n1",
                "topic readwrite nodes/n1/#",
                "topic read jobs/+/updates_available",
                "",
                "user n1-ne",
                "topic readwrite nodes/n1/#",
                "topic read jobs/+/updates_available",
                "",
                "user n2",
                "topic readwrite nodes/n2/#",
                "topic read jobs/+/updates_available",
                "",
                "user n2-ne",
                "topic readwrite nodes/n2/#",
                "topic read jobs/+/updates_available",
            ]
        );
        assert!(!text.contains("pattern"));
    }

    #[test]
    fn debug_hides_hashes() {
        let c = sample();
        let debug = format!("{c:?}");
        assert!(debug.contains("n1-ne"));
        assert!(!debug.contains("$6$"));
    }

    #[test]
    fn client_hosts() {
        assert_eq!(client_host("0.0.0.0".parse().unwrap()), "127.0.0.1");
        assert_eq!(client_host("10.0.0.5".parse().unwrap()), "10.0.0.5");
        assert_eq!(client_host("::".parse().unwrap()), "[::1]");
        assert_eq!(client_host("fe80::1".parse().unwrap()), "[fe80::1]");
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = std::env::temp_dir().join(format!("oakestra-broker-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passwd");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, "new\n", None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert!(!dir.join(".passwd.tmp").exists());
        let missing = dir.join("no-such-dir").join("acl");
        assert!(matches!(
            write_atomically(&missing, "x", None),
            Err(BrokerError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn reload_failures_name_the_command() {
        run_reload("true").await.unwrap();
        let err = run_reload("echo nope >&2; exit 3").await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit 3") && text.contains("nope"), "{text}");
    }
}
