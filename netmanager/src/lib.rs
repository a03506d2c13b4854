//! `NetManager`: the oakestra-rs semantic overlay on a worker.
//!
//! - [`config`]: flags, `/etc/netmanager/netcfg.json`, the validated [`config::Settings`].
//! - [`api`]: the local HTTP API (unix socket) the NodeEngine calls.
//! - [`daemon`]: registration, container attach/detach, table cache, interests, shutdown.
//! - [`session`]: the MQTT session with the cluster.
//! - [`table`]: the translation table and its lock-free snapshots.
//! - [`proxy`]: per-packet translation (pure of I/O).
//! - [`dataplane`]: the TUN/UDP threads.
//! - [`packet`], [`conntrack`], [`frag`], [`udp`]: parsing and rewriting, the connection table, fragment series,
//!   batched UDP.
//! - [`fastpath`]: the eBPF fast path (loader, maps, tc attachments); [`plumbing`]: the seam between the daemon and
//!   every kernel change it makes.
//! - [`netlink`], [`nft`], [`sysctl`]: host plumbing (links, addresses, routes, namespaces; nftables; sysctls).
//! - [`metrics`]: the opt-in Prometheus endpoint (packets, bytes, drops per path, flows, MQTT, process).

pub mod api;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod dataplane;
pub mod fastpath;
pub mod frag;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod packet;
pub mod plumbing;
pub mod proxy;
pub mod session;
pub mod sysctl;
pub mod table;
pub mod udp;

use std::{os::unix::fs::PermissionsExt, sync::Arc, time::Duration};

pub use config::{Cli, Command, Settings};

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener could not be opened.
    #[error("cannot listen on {what}: {reason}")]
    Listen {
        /// The socket path or address.
        what: String,
        /// The OS error.
        reason: String,
    },
    /// The kernel plumbing could not be set up.
    #[error("cannot open the kernel interfaces: {0}")]
    Plumbing(#[from] netlink::PlumbError),
    /// `status`: the daemon did not answer.
    #[error("NetManager is not running or not reachable on {socket}: {reason}")]
    NotRunning {
        /// The socket tried.
        socket: String,
        /// What failed.
        reason: String,
    },
}

/// Runs the daemon until `shutdown` turns true, then removes the network state it created.
pub async fn run(settings: Settings, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), Error> {
    let daemon = daemon::Daemon::new(settings.clone(), plumbing::Kernel::connect()?);
    daemon.cleanup_leftovers().await;
    let socket = settings.socket.clone();
    if let Some(dir) = socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&socket);
    let listen_err = |what: String| {
        move |e: std::io::Error| Error::Listen {
            what,
            reason: e.to_string(),
        }
    };
    let unix = tokio::net::UnixListener::bind(&socket).map_err(listen_err(socket.display().to_string()))?;
    // Only root (and the group) may plumb containers.
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660));
    let router = api::router(daemon.clone());
    let mut servers = Vec::new();
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    servers.push(tokio::spawn(
        axum::serve(unix, router.clone())
            .with_graceful_shutdown(stop(shutdown.clone()))
            .into_future(),
    ));
    if let Some(port) = settings.api_port {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_err(addr.to_string()))?;
        servers.push(tokio::spawn(
            axum::serve(tcp, router)
                .with_graceful_shutdown(stop(shutdown.clone()))
                .into_future(),
        ));
    }
    if let Some((addr, token_file)) = &settings.metrics {
        let token =
            oakestra_runtime::metrics::endpoint::read_token(token_file).map_err(|e| Error::Listen {
                what: format!("metrics on {addr}"),
                reason: e.to_string(),
            })?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_err(format!("metrics on {addr}")))?;
        let metrics = Arc::new(metrics::Metrics::new());
        let source = daemon.clone();
        let router = oakestra_runtime::metrics::endpoint::router(token.into(), move || {
            let (metrics, source) = (Arc::clone(&metrics), source.clone());
            async move { metrics.render(source.traffic().await.as_ref()) }
        });
        tracing::info!(%addr, "serving Prometheus metrics (GET /metrics, bearer token)");
        let limits = oakestra_runtime::server::ServerLimits::default();
        servers.push(tokio::spawn(oakestra_runtime::server::serve(
            tcp,
            router,
            limits,
            stop(shutdown.clone()),
        )));
    }
    tracing::info!(socket = %socket.display(), port = ?settings.api_port, "waiting for NodeEngine registration");
    let _ = shutdown.wait_for(|v| *v).await;
    tracing::info!("shutting down");
    daemon.shutdown().await;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// `NetManager status`: asks the running daemon and returns its state.
pub async fn status(settings: &Settings) -> Result<serde_json::Value, Error> {
    let r = oakestra_runtime::client::call_unix::<()>(
        "GET".parse().unwrap_or_default(),
        &settings.socket,
        api::PATH_STATUS,
        None,
        Duration::from_secs(3),
    )
    .await
    .map_err(|e| Error::NotRunning {
        socket: settings.socket.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(r.body)
}
