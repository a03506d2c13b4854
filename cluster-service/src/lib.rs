//! `cluster-service`: the oakestra-rs cluster orchestrator: cluster manager, MQTT broker, cluster scheduler and
//! network service, in one process.
//!
//! - [`config`]: flags and environment, validated into a [`Config`];
//! - [`store`]: the embedded SQLite database (`<data-dir>/cluster.db`): identity, workers, jobs, instances;
//! - [`root_link`]: registration with root (join token, back-off, re-registration keeping the id) and the report;
//! - [`broker`]: the embedded MQTT broker or an external one, and per-worker MQTT credentials;
//! - [`mqtt`]: the cluster's own MQTT client;
//! - [`state`]: workers, jobs, instances, the instance state machine, scheduling and self-healing (pure);
//! - [`placement`]: the per-node free-capacity index placement walks (pure);
//! - [`engine`]: the driver that feeds [`state`] and carries out its effects;
//! - [`net`]: the cluster network service (subnets, table queries, interests, job updates);
//! - [`addons`]: the cluster's addons engine: the operator token of its addons manager and marketplace lookups
//!   at root (the engine itself is `oakestra_addons`);
//! - [`api`]: the HTTP API on the manager port;
//! - [`metrics`]: the Prometheus metrics (`GET /metrics`);
//! - [`memory`]: allocator settings (few arenas, trimming after bursts).

pub mod addons;
pub mod api;
pub mod broker;
pub mod config;
pub mod engine;
pub mod memory;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod placement;
pub mod root_link;
pub mod state;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

pub use config::{Cli, Config};
use oakestra_protocol::api::federation::ClusterRegistration;
use serde_json::Map;
use tokio::sync::watch;

use crate::{
    broker::{Broker, Credentials},
    engine::{Engine, now_ms},
    root_link::RootLink,
    state::State,
    store::Store,
};

/// Why the service stopped (or did not start).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable is invalid.
    #[error("{flag} = {value:?}: {rule}")]
    InvalidConfig {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// The rule it breaks.
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
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Serving HTTP failed.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    /// A database statement failed.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A record could not be encoded for the database.
    #[error("encoding a record: {0}")]
    Encode(String),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Root could not be reached.
    #[error("calling root: {0}")]
    Call(#[from] oakestra_runtime::client::ClientError),
    /// Root answered with an error.
    #[error("{url}: root answered HTTP {status}: {body}")]
    Root {
        /// The URL called.
        url: String,
        /// The status.
        status: u16,
        /// The answer body.
        body: String,
    },
    /// The addons engine could not start.
    #[error("addons: {0}")]
    Addons(String),
    /// The MQTT broker could not start or take credentials.
    #[error("MQTT broker: {0}")]
    Broker(#[from] broker::BrokerError),
}

/// The reference cluster addons manager's port (`--addons-reference-ports`).
pub const REFERENCE_ADDONS_PORT: u16 = 11201;

/// A started service: its addresses and a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The shared engine (tests inspect it).
    pub engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Stops the background tasks, the embedded broker and the HTTP server, and waits for the server to finish.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.send_replace(true);
        self.engine.publisher.disconnect().await;
        self.engine.broker.stop();
        match self.server.await {
            Ok(result) => result,
            Err(e) => Err(Error::Task(e)),
        }
    }
}

/// The key of the cluster's own MQTT secret in the settings table.
const MQTT_SECRET: &str = "mqtt_secret";
/// The key of the worker join token in the settings table.
const WORKER_JOIN_TOKEN: &str = "worker_join_token";
/// The file in the data directory that holds the worker join token (for scripts such as `1doc.sh`).
pub const WORKER_JOIN_TOKEN_FILE: &str = "worker-join.token";

/// Starts everything: database, broker, MQTT client, HTTP API, self-healing and the link to root.
pub async fn start(config: Config) -> Result<Running, Error> {
    let store = Store::open(config.data_dir.clone()).await?;
    let saved = store.load().await?;
    let mut state = State::new(config.timing, config.scheduler_policy);
    let node_hashes: Vec<(String, String)> = saved
        .nodes
        .iter()
        .map(|n| (n.id.clone(), n.password_hash.clone()))
        .collect();
    tracing::info!(
        workers = saved.nodes.len(),
        jobs = saved.jobs.len(),
        instances = saved.instances.len(),
        "restored the cluster database"
    );
    state.restore(saved.nodes, saved.jobs, saved.instances, now_ms());

    let secret = match store.setting(MQTT_SECRET).await? {
        Some(s) => s,
        None => {
            let s = broker::new_secret();
            store.set_setting(MQTT_SECRET, s.clone()).await?;
            s
        }
    };
    let worker_token = match (&config.worker_join_token, store.setting(WORKER_JOIN_TOKEN).await?) {
        (Some(given), stored) => {
            if stored.as_deref() != Some(given.as_str()) {
                store.set_setting(WORKER_JOIN_TOKEN, given.clone()).await?;
            }
            given.clone()
        }
        (None, Some(stored)) => stored,
        (None, None) => {
            let token = broker::new_secret();
            store.set_setting(WORKER_JOIN_TOKEN, token.clone()).await?;
            token
        }
    };
    let token_file = config.data_dir.join(WORKER_JOIN_TOKEN_FILE);
    store::write_secret(&token_file, &worker_token)?;
    if config.open_registration {
        tracing::warn!(
            "OPEN REGISTRATION: any machine that reaches the cluster API may register as a worker without \
            the join token (--open-registration, for reference Go workers)"
        );
    }
    tracing::info!(file = %token_file.display(), "workers join with the token in this file (NodeEngine --join-token)");
    let credentials = Credentials::new(mqtt::CLUSTER_USER, &broker::hash_password(&secret));
    for (id, hash) in &node_hashes {
        credentials.set_node(id, hash);
    }
    let broker = Broker::start(config.broker.clone(), credentials).await?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(Error::Serve)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(metrics::ClusterMetrics::default());
    let (publisher, messages, mqtt_up) = match broker.embedded() {
        Some(embedded) => mqtt::start_local(Arc::clone(embedded)),
        None => {
            let (host, port) = broker.client_endpoint();
            mqtt::start(&host, port, &secret, Arc::clone(&metrics.mqtt), stop_rx.clone())
        }
    };
    let mqtt_port = config.mqtt_advertise_port.unwrap_or_else(|| broker.worker_port());
    let root = RootLink {
        root_url: config.root_url.clone(),
        join_token: config.join_token.clone(),
        registration: ClusterRegistration {
            cluster_name: config.cluster_name.clone(),
            cluster_location: config.cluster_location.clone(),
            manager_port: addr.port(),
            // One listener serves the network component's routes too.
            network_component_port: addr.port(),
            cluster_address: config.advertise_address.clone(),
            extra: Map::new(),
        },
        store: store.clone(),
    };
    let admission = engine::Admission {
        join_token: worker_token,
        open: config.open_registration,
    };
    let engine = Arc::new(Engine::new(
        state, store, publisher, broker, root, mqtt_port, mqtt_up, admission, metrics,
    ));

    tokio::spawn(Arc::clone(&engine).dispatch(messages));
    // Self-healing runs often enough that a dead worker (by silence or by a lost connection) is found within a
    // quarter of its deadline.
    let t = config.timing;
    let tick = Duration::from_millis((t.worker_timeout_ms.min(t.lost_grace_ms) / 4).clamp(50, 1000));
    tokio::spawn(Arc::clone(&engine).maintain(tick, stop_rx.clone()));
    tokio::spawn(Arc::clone(&engine).report_to_root(config.report_interval, stop_rx.clone()));

    let addons = oakestra_addons::Addons::open(
        oakestra_addons::AddonsConfig::new(
            oakestra_protocol::addons::Plane::Cluster,
            &config.addons,
            addr.port(),
            config.data_dir.clone(),
        ),
        &config.data_dir.join("cluster.db"),
    )
    .map_err(|e| Error::Addons(e.to_string()))?;
    engine.attach_slots(Arc::clone(addons.slots()));
    let metrics_token = match &config.metrics_token {
        Some(t) => t.clone(),
        None => store::load_or_create_secret(&config.data_dir.join("metrics.token"))?,
    };
    let _ = engine.metrics_token.set(metrics_token);
    tokio::spawn(oakestra_addons::monitor::run(
        Arc::clone(&addons),
        stop_rx.clone(),
    ));
    let gate: Arc<dyn oakestra_addons::api::Gate> = Arc::new(addons::ClusterGate::load(
        config.addons_admin_token.clone(),
        &config.data_dir,
    )?);
    let remote: Arc<dyn oakestra_addons::api::RemoteMarketplace> = Arc::new(addons::RootMarketplace {
        engine: Arc::clone(&engine),
    });
    let addons_router =
        || oakestra_addons::api::router(Arc::clone(&addons), Arc::clone(&gate), Some(Arc::clone(&remote)));
    if config.addons.reference_ports {
        let ref_addr = SocketAddr::from(([0, 0, 0, 0], REFERENCE_ADDONS_PORT));
        let l = tokio::net::TcpListener::bind(ref_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: ref_addr,
                source,
            })?;
        tracing::warn!(addr = %ref_addr, "addons API also served on the reference port");
        let mut stop = stop_rx.clone();
        let (router, limits) = (addons_router(), config.http);
        tokio::spawn(async move {
            oakestra_runtime::server::serve(l, router, limits, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        });
    }
    let app = api::router(Arc::clone(&engine)).merge(addons_router());
    let mut server_stop = stop_rx;
    let limits = config.http;
    let server = tokio::spawn(async move {
        oakestra_runtime::server::serve(listener, app, limits, async move {
            let _ = server_stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(Error::Serve)
    });
    tracing::info!(%addr, mqtt_port, "cluster-service listening");
    Ok(Running {
        addr,
        engine,
        stop: stop_tx,
        server,
    })
}

/// Runs until `shutdown` completes, then stops cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    tracing::info!(?config, "starting cluster-service");
    let running = start(config).await?;
    shutdown.await;
    running.stop().await
}
