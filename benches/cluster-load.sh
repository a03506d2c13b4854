#!/usr/bin/env bash
# Runs the cluster_load bench against the release cluster-service binary: builds it, raises the open-file limit
# (every simulated worker is one MQTT connection on each side), then runs the bench. The environment passes
# through: CARGO_TARGET_DIR, OAKESTRA_BENCH_WORKERS=100,500,... (worker counts to step through),
# OAKESTRA_BENCH_FAILOVER_RUNS (default 5), CARGO_BUILD_JOBS. Extra arguments go to both cargo commands.
set -euo pipefail
cd "$(dirname "$0")/.."

# As many open files as the hard limit allows, up to 65536.
hard=$(ulimit -Hn)
want=65536
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    want=$hard
fi
ulimit -n "$want" || echo "cluster-load.sh: cannot raise the open-file limit; it stays $(ulimit -n)" >&2

cargo build --release -p oakestra-cluster-service "$@"
cargo bench -p oakestra-benches --bench cluster_load "$@"
