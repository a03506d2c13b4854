#!/usr/bin/env bash
# Placement latency with a scheduler plugin vs the built-in scheduler, release build: runs the addons end-to-end
# scenario (tests/tests/addons.rs: a private dockerd and registry in a network namespace, root-service, two stand-in
# clusters, the sample plugin in the root_scheduler slot) and prints its measurement: p50/p99 of 100 placements
# (POST /api/service/<id>/instance until root answered with the decision) built in and through the plugin. As root.
# The environment passes through: CARGO_TARGET_DIR, CARGO_BUILD_JOBS. Extra arguments go to cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "addons-placement.sh: run as root (network namespace, dockerd)" >&2; exit 1; }
cargo build --release -p oakestra-root-service -p oakestra-addons --bin root-service --bin oak-sample-scheduler "$@"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release -p oakestra-tests --test addons -- --nocapture 2>&1 | tee "$log" >/dev/null || {
  tail -40 "$log" >&2
  exit 1
}
grep 'placement latency' "$log"
