//! The contracts every oakestra-rs tier shares. Pure data and pure rules: no I/O, no async runtime.
//!
//! # Layout
//! - [`sla`]: the deployment descriptor (SLA v2.0) model, its validation (every problem at once, with JSON paths)
//!   and the port-mapping grammar.
//! - [`status`]: instance and job status strings exactly as Oakestra spells them, with the allowed transitions.
//! - [`naming`]: job names `app.appns.svc.svcns` and task ids `<job>.instance.<n>`.
//! - [`mqtt`]: MQTT topics and JSON payloads, worker ⇄ cluster ([`mqtt::worker`]) and NetManager ⇄ cluster
//!   ([`mqtt::net`]).
//! - [`api`]: HTTP bodies: worker registration at the cluster ([`api::cluster`]), the NetManager local API
//!   ([`api::netmanager`]) and the cluster → root report with its worker aggregation ([`api::root`]).
//! - [`addons`]: the addons contract: marketplace descriptors and their validation, statuses, container naming
//!   and labels, and the plugin slots.
//! - [`addr`]: the overlay address plan, the balancing-policy encoding of IPv6 service addresses and the address
//!   allocators.
//! - [`backoff`]: the retry back-off of every daemon (doubling up to a cap).
//! - [`bearer`]: the `Authorization: Bearer` token and constant-time secret comparison.
//! - [`sched`]: the placement policy both tiers share (root picks a cluster, a cluster picks a worker), with
//!   capacity reservations and the reading of a job's demand.
//! - [`text`]: client-supplied text made safe to log (control and bidi characters escaped, long strings cut).
//! - [`time`]: Unix milliseconds as the reference's ISO 8601 UTC text.
//!
//! What every daemon does with I/O (the HTTP client and server, signals, SQLite, files, metrics, logging) lives in
//! `oakestra-runtime`, beside this crate.
//!
//! Field names on the wire are spelled exactly as the reference implementation spells them (including its
//! inconsistencies, e.g. `MQTT_BROKER_PORT`, `nsAddressv6`), so that Oakestra peers interoperate with ours.

pub mod addons;
pub mod addr;
pub mod api;
pub mod backoff;
pub mod bearer;
pub mod mqtt;
pub mod naming;
pub mod sched;
pub mod serde_util;
pub mod sla;
pub mod status;
#[cfg(test)]
mod test_util;
pub mod text;
pub mod time;
