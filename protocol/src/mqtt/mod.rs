//! MQTT topics and payloads between workers (NodeEngine, NetManager) and the cluster.
//!
//! - [`topics`]: every topic string, built and parsed through one [`topics::Topic`] enum, plus the subscription
//!   filters.
//! - [`worker`]: NodeEngine ⇄ cluster manager payloads (`information`, `jobs/resources`, `job`, `control/*`).
//! - [`net`]: NetManager ⇄ cluster service manager payloads (`net/*`, `jobs/<job>/updates_available`).
//!
//! Every payload writes the JSON types the reference writes and reads the types any peer is known to send, so a parse
//! error means the message really is malformed. Parsing never panics; it returns `serde_json::Error`.

pub mod net;
pub mod topics;
pub mod worker;
