//! Harness for the cross-binary tests: finding the workspace's binaries and running them as real processes.
//!
//! # Layout
//! - [`apt`]: the Debian packages a suite needs, installed when missing.
//! - [`harness`]: free ports, child processes killed on drop, `eventually`.
//! - [`incontainer`]: netprobe clients and servers inside a container's network namespace, containers' pids.
//! - [`containerd`]: a private containerd daemon, the busybox test image, a local registry.
//! - [`docker`]: a private dockerd and a local registry inside a test's netns, the sample addon images.
//! - [`stack`]: root + cluster as child processes and the NodeEngine command line.
//! - [`overlaybed`]: a netns testbed with root, cluster and NetManager + NodeEngine workers, and its teardown.
//! - [`procs`]: locate a built binary (`NodeEngine`, `NetManager`, `cluster-service`, `root-service`) and run it.
//!
//! The suites live in `tests/tests/*.rs`. They expect the binaries to be built first (`cargo build --bins`, which
//! `./scripts/test.sh` does) and fail with a message saying so when they are not.

pub mod apt;
pub mod containerd;
pub mod docker;
pub mod harness;
pub mod incontainer;
pub mod netns;
pub mod overlaybed;
pub mod procs;
pub mod stack;
