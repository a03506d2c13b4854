//! `NodeEngine`: the oakestra-rs worker agent: registers with a cluster, runs its instances through containerd
//! and (with `-u=true`) unikernels through QEMU, attaches them to the overlay, reports metrics and statuses.
//!
//! - [`cli`]: the reference's flags and subcommands, and the effective [`cli::Settings`].
//! - [`config`]: `/etc/oakestra/conf.json` (read leniently, unknown keys kept) and the NetManager (`-n`) setting.
//! - [`cluster`]: registration and the MQTT session.
//! - [`agent`]: deploy, watch, undeploy, adopt, report.
//! - [`runtime`]: the `Runtime` interface the agent drives, over containerd and QEMU.
//! - [`guest`]: unikernel images (picker, cache), QEMU command lines, the KVM probe, QMP.
//! - [`containerd`]: the containerd client (images, containers, tasks, cleanup).
//! - [`registry`]: OCI registry pulls (HTTPS with a plain-HTTP fallback, token and basic auth).
//! - [`spec`]: the OCI runtime spec of an instance (pure).
//! - [`overlay`]: the NetManager calls.
//! - [`metrics`]: node samples, system facts, per-instance cgroup stats and log tails.
//! - [`telemetry`]: the opt-in Prometheus endpoint (instances, deploys, MQTT, node load, process).
//! - [`commands`]: `status`, `logs`, `stop`, `version`.

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod containerd;
pub mod guest;
pub mod metrics;
pub mod overlay;
pub mod registry;
pub mod runtime;
pub mod spec;
pub mod telemetry;

pub use cli::{Cli, Command, Settings};
