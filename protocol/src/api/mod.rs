//! HTTP request and response bodies shared by more than one binary.
//!
//! - [`cluster`]: worker registration at the cluster manager (`POST /api/node/register`).
//! - [`federation`]: root ⇄ cluster: registration, deploy/undeploy and results, root's network endpoints.
//! - [`netmanager`]: the NetManager's local API on its unix socket (`/register`, `/container/deploy`, …).
//! - [`root`]: the cluster's periodic report to root (`POST /api/information/<cluster_id>`): the aggregation of its
//!   worker documents and a typed view of the body.
//! - [`shape`]: type checks of the bodies clusters send root, naming the field, the value and the expected type.
//!
//! Like the MQTT payloads, bodies write the reference's JSON types and read any type a peer is known to send;
//! [`shape`] refuses the types no peer sends before the lenient parsers would read them as defaults.

pub mod cluster;
pub mod federation;
pub mod netmanager;
pub mod root;
pub mod shape;
