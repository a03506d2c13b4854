//! What every oakestra-rs daemon does with I/O, written once: the HTTP/1.1 JSON client tiers call each other with,
//! the HTTP server of every API listener, waiting for SIGTERM, the log set-up, opening SQLite, owner-only files and
//! the secret files kept in them, Prometheus metrics, and the clock. The contracts themselves (payloads, names, the
//! address plan, the retry back-off) are pure and live in `oakestra-protocol`.
//!
//! # Layout
//! - [`owner_only`]: files and directories only their owner may read (0600/0700), created so or tightened to it.
//! - [`secret`]: random secrets and the token files that keep them.
//! - [`hex`], [`time`]: lowercase hex text; Unix milliseconds and seconds.
//! - `client` (feature `client`): the HTTP/1.1 JSON client (TCP and unix sockets, deadlines, size limits).
//! - `server` (feature `server`): the HTTP/1.1 server of every API listener (header-read, body and idle timeouts,
//!   a connection cap, JSON error bodies).
//! - `signal` (feature `signal`): SIGTERM/SIGINT as a future or a watch, and the usage exit code.
//! - `logging` (feature `logging`): the `tracing` subscriber of every daemon (stderr, optionally a file).
//! - `sqlite` (feature `sqlite`): how the root and cluster stores open SQLite and apply migrations.
//! - `metrics` (feature `metrics`): the Prometheus process collector, text exposition, mirrored counters, MQTT
//!   counters and (with `server`) the worker daemons' token-protected `/metrics` listener.

#[cfg(feature = "client")]
pub mod client;
pub mod hex;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod owner_only;
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "signal")]
pub mod signal;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod time;
