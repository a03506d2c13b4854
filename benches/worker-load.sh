#!/usr/bin/env bash
# Runs the worker bench (NodeEngine idle cost with 0 and 20 instances, deploy → running time) against the release
# binaries and a private containerd. Needs root, containerd, runc, busybox-static (scripts/test.sh installs them).
# The environment passes through (CARGO_TARGET_DIR, CARGO_BUILD_JOBS); extra arguments go to both cargo commands.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins "$@"
cargo bench -p oakestra-benches --bench worker "$@"
