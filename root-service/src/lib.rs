//! `root-service`: the oakestra-rs root orchestrator: user API, auth, root scheduler and service-IP allocation.
//!
//! # Layout
//! - [`config`]: the command-line flags (with environment fallbacks) and the validated [`Config`].
//! - [`origins`]: which browser origins may call the API (`--cors-origins`), as pure policy.
//! - [`store`]: the embedded SQLite database (`<data-dir>/root.db`, WAL), migrations, users/organizations and the
//!   default data (`Admin` in `root`), applications/services/instances, clusters, addresses.
//! - [`auth`]: the persisted HS256 key (`<data-dir>/jwt.key`), token issuing and verification, revocation checks
//!   (no HTTP: the extractors are in [`api::extract`]).
//! - [`hashing`]: argon2 password hashing on a small bounded pool (threads, queue, a share per client address).
//! - [`throttle`]: failed-login limits per client address, per user name from an address, and per user name.
//! - [`metrics`]: the Prometheus metrics (`GET /metrics`).
//! - [`plan`]: the engine's decisions as pure functions (placement, refusals, results, maintenance, report
//!   reconciliation), unit-tested without a database or HTTP.
//! - [`engine`]: carries those decisions out: reservations, store writes, calls to clusters, fallback and
//!   rescheduling, reports.
//! - [`api`]: the axum router and handlers, user-facing and cluster-facing on one listener.
//!
//! [`run`] binds the configured address; [`serve`] serves an already bound listener (tests use 127.0.0.1:0).

pub mod api;
pub mod auth;
pub mod config;
pub mod engine;
pub mod hashing;
pub mod metrics;
pub mod origins;
pub mod plan;
pub mod store;
pub mod throttle;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

pub use api::AppState;
pub use config::{Cli, Config};

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag has a value the service cannot use.
    #[error("invalid value {value:?} for {flag}: {rule}")]
    InvalidConfig {
        /// The flag, e.g. `--access-ttl`.
        flag: &'static str,
        /// What was given.
        value: String,
        /// What is allowed.
        rule: &'static str,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("database {}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// A stored file or value is not what the service wrote.
    #[error("{}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Serving stopped with an error.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// Password hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// Token signing failed.
    #[error("token signing failed: {0}")]
    Token(String),
    /// The OS random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// A statement failed.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// An address pool refused (exhausted, or an address outside it).
    #[error("address allocation failed: {0}")]
    Address(oakestra_protocol::addr::AddrError),
    /// The thing asked for does not exist (or is not the caller's).
    #[error("{what} {id:?} not found")]
    NotFound {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The request clashes with what exists (a name or address already taken).
    #[error("{message}")]
    Conflict {
        /// What clashes with what.
        message: String,
    },
    /// Members named in an organization request are no user's.
    #[error("unknown user ids in member: {}", ids.join(", "))]
    UnknownUsers {
        /// The ids that name no user.
        ids: Vec<String>,
    },
    /// The request is malformed in a way the body parser could not see.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
    },
    /// `--cors-origins` is not `*` or a list of origins.
    #[error("invalid value {value:?} for --cors-origins: {rule}")]
    InvalidCors {
        /// What was given.
        value: String,
        /// What is wrong.
        rule: String,
    },
    /// The addons engine could not start.
    #[error("addons: {0}")]
    Addons(String),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Opens the store, creates the default data, loads (or creates) the signing key: everything a server needs.
pub async fn build_state(config: &Config) -> Result<AppState, Error> {
    let store = store::Store::open(config.data_dir.clone()).await?;
    let hasher = Arc::new(hashing::HashPool::start(config.hashing)?);
    let admin_default = store
        .ensure_defaults(config.admin_password.clone(), Arc::clone(&hasher))
        .await?;
    if admin_default {
        tracing::warn!(
            "user Admin still has the default password `Admin`: set one with --admin-password (env OAKESTRA_ADMIN_PASSWORD)"
        );
    }
    let data_dir = config.data_dir.clone();
    let keys = tokio::task::spawn_blocking(move || auth::Keys::load_or_create(&data_dir)).await??;
    let pool = Arc::clone(&hasher);
    let dummy_hash = tokio::task::spawn_blocking(move || {
        let mut pw = [0_u8; 16];
        getrandom::fill(&mut pw).map_err(|e| Error::Random(e.to_string()))?;
        pool.hash_blocking(&pw.iter().map(|b| format!("{b:02x}")).collect::<String>())
    })
    .await??;
    let join_token = match &config.join_token {
        Some(token) => token.clone(),
        None => {
            let data_dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || load_or_create_join_token(&data_dir)).await??
        }
    };
    let engine = Arc::new(engine::Engine::new(
        store.clone(),
        config.scheduler_policy,
        config.liveness_window,
        config.retry_interval,
    ));
    let addons = oakestra_addons::Addons::open(
        oakestra_addons::AddonsConfig::new(
            oakestra_protocol::addons::Plane::Root,
            &config.addons,
            config.listen.port(),
            config.data_dir.clone(),
        ),
        &config.data_dir.join("root.db"),
    )
    .map_err(|e| Error::Addons(e.to_string()))?;
    engine.attach_slots(Arc::clone(addons.slots()));
    let metrics_token = match &config.metrics_token {
        Some(t) => t.clone(),
        None => {
            let data_dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || load_or_create_secret(&data_dir, METRICS_TOKEN_FILE))
                .await??
        }
    };
    Ok(AppState {
        metrics_token: metrics_token.into(),
        cors: Arc::new(config.cors.clone()),
        addons,
        store,
        keys: Arc::new(keys),
        access_ttl: config.access_ttl,
        refresh_ttl: config.refresh_ttl,
        dummy_hash: dummy_hash.into(),
        engine,
        join_token: join_token.into(),
        http: config.http,
        hasher,
        throttle: Arc::new(throttle::LoginThrottle::new(config.login)),
    })
}

/// Tightens the file or directory `path` to `mode` (0600 secrets, 0700 the data directory) if others may read it,
/// logging the mode it had.
pub(crate) fn keep_private(path: &std::path::Path, mode: u32) -> Result<(), Error> {
    let tightened = oakestra_runtime::owner_only::restrict(path, mode).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(was) = tightened {
        tracing::warn!(
            path = %path.display(),
            was = format_args!("{was:04o}"),
            now = format_args!("{:04o}", was & mode),
            "others could read this: tightened its mode"
        );
    }
    Ok(())
}

/// File of the generated metrics token inside the data directory (Prometheus: `authorization.credentials_file`).
pub const METRICS_TOKEN_FILE: &str = "metrics.token";

/// Reads `<data-dir>/<file>`, or creates it (mode 0600) with a random token; logs a mode it had to tighten.
fn token_file(data_dir: &std::path::Path, file: &str) -> Result<oakestra_runtime::secret::TokenFile, Error> {
    let path = data_dir.join(file);
    let loaded = oakestra_runtime::secret::load_or_create(&path, 16, 24).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    if let Some(was) = loaded.tightened_from {
        tracing::warn!(
            path = %path.display(),
            was = format_args!("{was:04o}"),
            now = "0600",
            "others could read this: tightened its mode"
        );
    }
    Ok(loaded)
}

/// Reads `<data-dir>/<file>`, or creates it (mode 0600) with a random token.
fn load_or_create_secret(data_dir: &std::path::Path, file: &str) -> Result<String, Error> {
    let loaded = token_file(data_dir, file)?;
    if loaded.created {
        tracing::info!(file = %data_dir.join(file).display(), "generated a token");
    }
    Ok(loaded.token)
}

/// File of the generated join token inside the data directory.
pub const JOIN_TOKEN_FILE: &str = "join.token";

/// Reads `<data-dir>/join.token`, or creates it (mode 0600) with a random token and logs the token once.
fn load_or_create_join_token(data_dir: &std::path::Path) -> Result<String, Error> {
    let loaded = token_file(data_dir, JOIN_TOKEN_FILE)?;
    let file = data_dir.join(JOIN_TOKEN_FILE);
    if loaded.created {
        tracing::warn!(
            file = %file.display(),
            join_token = %loaded.token,
            "generated the cluster join token: give it to clusters (cluster-service --join-token)"
        );
    } else {
        tracing::info!(file = %file.display(), "clusters join with the token in this file");
    }
    Ok(loaded.token)
}

/// Serves the API on an already bound listener until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "root-service listening");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(
        Arc::clone(&state.engine).run_maintenance(state.engine.retry_interval(), stop_rx.clone()),
    );
    let monitor = tokio::spawn(oakestra_addons::monitor::run(Arc::clone(&state.addons), stop_rx));
    let limits = state.http;
    let served = oakestra_runtime::server::serve(listener, api::router(state), limits, shutdown)
        .await
        .map_err(Error::Serve);
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    let _ = monitor.await;
    served?;
    tracing::info!("root-service stopped");
    Ok(())
}

/// Runs the service described by `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    tracing::info!(?config, "starting root-service");
    let state = build_state(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    if !config.addons.reference_ports {
        return serve(listener, state, shutdown).await;
    }
    // The reference ports serve the marketplace and addons manager routes only, with the same credentials.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut extra = Vec::new();
    for port in [REFERENCE_MARKETPLACE_PORT, REFERENCE_ADDONS_PORT] {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let mut stop = stop_rx.clone();
        let router = api::addons_router(&state);
        let limits = state.http;
        tracing::warn!(%addr, "addons API also served on a reference port");
        extra.push(tokio::spawn(oakestra_runtime::server::serve(
            l,
            router,
            limits,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }
    let result = serve(listener, state, shutdown).await;
    let _ = stop_tx.send(true);
    for t in extra {
        let _ = t.await;
    }
    result
}

/// The reference marketplace manager's port (`--addons-reference-ports`).
pub const REFERENCE_MARKETPLACE_PORT: u16 = 11102;
/// The reference root addons manager's port (`--addons-reference-ports`).
pub const REFERENCE_ADDONS_PORT: u16 = 11101;
