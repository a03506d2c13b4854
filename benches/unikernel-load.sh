#!/usr/bin/env bash
# Runs the unikernel bench (deploy → RUNNING with a cold and a warm image cache, QEMU's idle RSS, NodeEngine RSS
# with 0 and 10 guests) against the release binaries. Needs root, QEMU and the guest image's tools
# (scripts/qemu-install.sh), containerd and runc (scripts/test.sh installs them).
# The environment passes through (CARGO_TARGET_DIR, CARGO_BUILD_JOBS); extra arguments go to both cargo commands.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/qemu-install.sh
cargo build --release --bins "$@"
cargo bench -p oakestra-benches --bench unikernel "$@"
