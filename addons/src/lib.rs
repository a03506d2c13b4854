//! The addons subsystem shared by root-service and cluster-service: the marketplace (root), the addons manager and
//! the addons monitor (both tiers), and the plugin slots through which an addon replaces a core scheduler without a
//! restart.
//!
//! # Layout
//! - [`store`]: marketplace entries and installed addons, in the tier's SQLite database (own tables).
//! - [`docker`]: the local Docker daemon through bollard.
//! - [`monitor`]: the engine's loop: image verification, install, disable, active and cleanup checks.
//! - [`slots`]: which plugin fills which slot, and delegating a placement to it.
//! - [`settings`]: the flags both tiers share and their validated form.
//! - [`api`]: the HTTP routes (marketplace, addons manager, slot report) and their errors.
//!
//! The tier builds an [`Addons`] with [`Addons::open`], merges [`api::router`] into its router, spawns
//! [`monitor::run`], and asks [`Addons::slots`] before placing.

pub mod api;
pub mod docker;
pub mod monitor;
pub mod settings;
pub mod slots;
pub mod store;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use oakestra_protocol::addons::Plane;
use tokio::sync::Notify;

use crate::{docker::Docker, slots::Slots, store::AddonStore};

/// Why the addons subsystem failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed.
    #[error("addons database: {0}")]
    Db(String),
    /// A stored record is not what the engine wrote.
    #[error("addons database holds a broken record: {0}")]
    Corrupt(String),
    /// No randomness for ids or tokens.
    #[error("no randomness available: {0}")]
    Random(String),
    /// The plugin token file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How a tier runs its addons engine.
#[derive(Debug, Clone)]
pub struct AddonsConfig {
    /// `root` or `cluster`: container names are `<plane>_<service>`.
    pub plane: Plane,
    /// The Docker daemon's socket.
    pub docker_socket: PathBuf,
    /// How often the monitor checks (it also wakes on every API change).
    pub poll_interval: Duration,
    /// How long a placement waits for a scheduler plugin.
    pub plugin_timeout: Duration,
    /// The tier's API port, handed to plugins as `MANAGER_PORT` and `RESOURCE_ABSTRACTOR_PORT`.
    pub manager_port: u16,
    /// The tier's address as plugins reach it; `None`: the gateway of the plugin's first Docker network.
    pub manager_host: Option<String>,
    /// Where the plugin token is kept (`<dir>/addons-plugin.token`).
    pub data_dir: PathBuf,
}

impl AddonsConfig {
    /// The configuration of `plane` from its validated flags, its API port and its data directory.
    pub fn new(
        plane: Plane,
        settings: &settings::AddonsSettings,
        manager_port: u16,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            plane,
            docker_socket: settings.docker_socket.clone(),
            poll_interval: settings.poll_interval,
            plugin_timeout: settings.plugin_timeout,
            manager_port,
            manager_host: settings.manager_host.clone(),
            data_dir,
        }
    }
}

/// The tier's addons engine; shared as `Arc<Addons>`.
#[derive(Debug)]
pub struct Addons {
    config: AddonsConfig,
    store: AddonStore,
    slots: Arc<Slots>,
    docker: Mutex<Option<Docker>>,
    docker_error: Mutex<Option<String>>,
    wake: Notify,
}

/// File holding the plugin token (0600).
const TOKEN_FILE: &str = "addons-plugin.token";

/// Reads the persisted plugin token, or makes and saves one (so plugins keep working across tier restarts).
fn plugin_token(dir: &Path) -> Result<String, Error> {
    let path = dir.join(TOKEN_FILE);
    oakestra_runtime::secret::load_or_create(&path, 32, 32)
        .map(|t| t.token)
        .map_err(|source| Error::Io { path, source })
}

impl Addons {
    /// Opens the addons tables in the tier's database `db` and reads (or makes) the plugin token.
    pub fn open(config: AddonsConfig, db: &Path) -> Result<Arc<Self>, Error> {
        let store = AddonStore::open(db)?;
        let token = plugin_token(&config.data_dir)?;
        let slots = Arc::new(Slots::new(token, config.plugin_timeout));
        Ok(Arc::new(Self {
            config,
            store,
            slots,
            docker: Mutex::new(None),
            docker_error: Mutex::new(None),
            wake: Notify::new(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &AddonsConfig {
        &self.config
    }

    /// The records.
    pub fn store(&self) -> &AddonStore {
        &self.store
    }

    /// The plugin slots.
    pub fn slots(&self) -> &Arc<Slots> {
        &self.slots
    }

    /// Wakes the monitor now (after an API change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until woken or `limit` passed.
    pub(crate) async fn sleep(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.wake.notified()).await;
    }

    /// The daemon, connecting (again) if needed; the error says why Docker cannot be used.
    pub async fn docker(&self) -> Result<Docker, String> {
        let cached = self.docker.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(d) = cached {
            match d.ping().await {
                Ok(()) => return Ok(d),
                Err(e) => tracing::warn!(error = %e, "Docker stopped answering"),
            }
        }
        let result = Docker::connect(&self.config.docker_socket).await;
        let mut last = self.docker_error.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(d) => {
                if last.take().is_some() {
                    tracing::info!(socket = %self.config.docker_socket.display(), "Docker is available again");
                }
                *self.docker.lock().unwrap_or_else(PoisonError::into_inner) = Some(d.clone());
            }
            Err(e) => {
                if last.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "Docker is unavailable: addons cannot be verified, installed or monitored; the core keeps working");
                }
                *last = Some(e.clone());
                *self.docker.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
        result
    }
}
