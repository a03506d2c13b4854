#!/usr/bin/env bash
# Runs the login-flood bench (benches/src/bin/login_flood.rs) against the release root-service binary: builds both,
# then floods a fresh root-service per scenario with wrong-password logins while the real Admin logs in from
# another loopback address, and prints the legitimate logins' p50/p99 latency. The environment passes through:
# CARGO_TARGET_DIR, OAKESTRA_BENCH_SECONDS (flood per scenario, default 10), OAKESTRA_BENCH_FLOOD (attacking
# connections, default 64), OAKESTRA_BENCH_SCENARIOS (e.g. 1,2), OAKESTRA_BENCH_ROOT (another root-service binary),
# CARGO_BUILD_JOBS. Extra arguments go to cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

# One connection per attacking connection plus the server's side of each: far below the usual limit, but say so.
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 1024 ] ||
    echo "login-flood.sh: the open-file limit is $(ulimit -n); 64 attackers need a few hundred" >&2

cargo build --release -p oakestra-root-service -p oakestra-benches --bin root-service --bin login_flood "$@"
"${CARGO_TARGET_DIR:-target}/release/login_flood"
