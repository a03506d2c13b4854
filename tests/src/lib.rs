//! Harness for the cross-binary tests: finding the workspace's binaries and running them as real processes.
//!
//! # Layout
//! - [`procs`]: locate a built binary (`NodeEngine`, `NetManager`, `cluster-service`, `root-service`) and run it.
//!
//! The suites live in `tests/tests/*.rs`. They expect the binaries to be built first (`cargo build --bins`, which
//! `./scripts/test.sh` does) and fail with a message saying so when they are not.

pub mod procs;
