#!/usr/bin/env bash
# Runs the cluster_load bench against the release cluster-service binary: builds it, raises the open-file limit
# (every simulated worker holds two MQTT connections, each with a socket on both sides), widens the ephemeral port
# range for the run (15,000 workers need 30,000 client ports on 127.0.0.1; restored on exit), then runs the bench,
# with the embedded broker and with an external Mosquitto (installed if missing). The environment passes through:
# CARGO_TARGET_DIR, OAKESTRA_BENCH_WORKERS=1000,5000,... (worker counts to step through),
# OAKESTRA_BENCH_BROKERS=embedded,mosquitto, OAKESTRA_BENCH_FAILOVER_RUNS (default 5), CARGO_BUILD_JOBS. Extra
# arguments go to both cargo commands. Needs root for the port range (without it the range stays as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto
fi

# 200000 open files (root may raise the hard limit too), else as many as the hard limit allows.
ulimit -Hn 200000 2>/dev/null || true
hard=$(ulimit -Hn)
want=200000
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    want=$hard
fi
ulimit -n "$want" || echo "cluster-load.sh: cannot raise the open-file limit; it stays $(ulimit -n)" >&2

range_file=/proc/sys/net/ipv4/ip_local_port_range
old_range=$(cat "$range_file")
if echo "10000 65000" >"$range_file" 2>/dev/null; then
    trap 'echo "$old_range" >"$range_file"' EXIT
else
    echo "cluster-load.sh: cannot widen the ephemeral port range ($old_range); large steps may run out of ports" >&2
fi

cargo build --release -p oakestra-cluster-service "$@"
cargo bench -p oakestra-benches --bench cluster_load "$@"
