#!/usr/bin/env bash
# The 1-DOC's numbers, measured on the real thing: scripts/1doc.sh up (release binaries, embedded broker, a private
# containerd) inside a network namespace of its own, then through the public API only
#   1. idle RSS of root-service, cluster-service, NetManager and NodeEngine (registered, no instance, 15 s idle);
#   2. POST /api/service/<id>/instance -> the instance RUNNING at root, with the local nginx image, ONEDOC_BENCH_RUNS
#      times (10): p50, p90 and max; each instance is deleted (and gone) before the next POST.
# Then 1doc.sh down and the namespace is removed. Needs root and what scripts/test.sh installs.
# The environment passes through (CARGO_TARGET_DIR, CARGO_BUILD_JOBS).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs=${ONEDOC_BENCH_RUNS:-10}
[ "$(id -u)" -eq 0 ] || { echo "run as root (1doc.sh creates interfaces and containers)" >&2; exit 1; }

(cd "$repo" && cargo build --release --quiet --bins)
bin=$(cd "${CARGO_TARGET_DIR:-$repo/target}/release" && pwd)
ns=oakbench$$
home=$(mktemp -d /tmp/oakestra-onedoc-bench.XXXXXX)
export OAK_HOME=$home OAK_CONTAINERD=$home/containerd.sock OAK_NO_INSTALL=1 OAK_BIN_DIR=$bin

in_ns() { nsenter --net="/run/netns/$ns" -- "$@"; }
cleanup() {
  in_ns "$repo/scripts/1doc.sh" down >/dev/null 2>&1 || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$home"
}
trap cleanup EXIT

# The namespace gets an underlay with a default route (to nowhere), so the NetManager finds a public address as on
# a real machine. Nothing leaves the namespace.
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add d0 type veth peer name d1
ip -n "$ns" addr add 172.31.251.1/24 dev d0
ip -n "$ns" link set d0 up
ip -n "$ns" link set d1 up
ip -n "$ns" route add default via 172.31.251.254 dev d0

in_ns "$repo/scripts/1doc.sh" up >"$home/up.log" 2>&1 || { cat "$home/up.log"; exit 1; }
echo "1-DOC up in netns $ns (OAK_HOME $home)"

api=http://127.0.0.1:10000
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }
curl_ns() { in_ns curl -sf --max-time 5 "$@"; }

sleep 15
echo "idle RSS (VmRSS, registered, no instance):"
for c in root-service cluster-service NetManager NodeEngine; do
  pid=$(cat "$home/run/$c.pid")
  printf '  %-16s %6.1f MB\n' "$c" "$(awk '/^VmRSS:/ { print $2 / 1024 }' "/proc/$pid/status")"
done

pw=$(cat "$home/admin.password")
token=$(curl_ns "$api/api/auth/login" -H 'Content-Type: application/json' \
  -d "{\"username\":\"Admin\",\"password\":\"$pw\"}" | json '["token"]')
auth=(-H "Authorization: Bearer $token" -H 'Content-Type: application/json')
sla='{"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"bench",
  "application_namespace":"test","application_desc":"","microservices":[{"microserviceID":"",
  "microservice_name":"web","microservice_namespace":"test","virtualization":"container","memory":64,"vcpus":0,
  "code":"localhost/oakestra/nginx:latest","addresses":{"rr_ip":"10.30.60.60"}}]}]}'
service=$(curl_ns "${auth[@]}" "$api/api/application" -d "$sla" | json '[0]["microservices"][0]')

# Seconds since the epoch with nanoseconds, as a float.
now() { date +%s.%N; }
times=()
for ((r = 1; r <= runs; r++)); do
  t0=$(now)
  curl_ns "${auth[@]}" -X POST "$api/api/service/$service/instance" -d '{}' >/dev/null
  for ((i = 0; ; i++)); do
    s=$(curl_ns "${auth[@]}" "$api/api/service/$service" | json '["instance_list"][0]["status"]' 2>/dev/null || true)
    [ "$s" = RUNNING ] && break
    case "$s" in FAILED | DEAD) echo "run $r: the instance is $s" >&2; exit 1 ;; esac
    [ "$i" -lt 1200 ] || { echo "run $r: not RUNNING after 60 s" >&2; exit 1; }
    sleep 0.05
  done
  t=$(python3 -c "print(f'{$(now) - $t0:.3f}')")
  times+=("$t")
  printf '  run %2d: POST instance -> RUNNING %s s\n' "$r" "$t"
  n=$(curl_ns "${auth[@]}" "$api/api/service/$service" | json '["instance_list"][0]["instance_number"]')
  curl_ns "${auth[@]}" -X DELETE "$api/api/service/$service/instance/$n" >/dev/null
  for ((i = 0; i < 600; i++)); do
    left=$(curl_ns "${auth[@]}" "$api/api/service/$service" | json '["instance_list"].__len__()')
    tasks=$(ctr -a "$OAK_CONTAINERD" -n oakestra tasks ls -q | wc -l)
    [ "$left" = 0 ] && [ "$tasks" = 0 ] && break
    sleep 0.05
  done
done
python3 - "${times[@]}" <<'EOF'
import sys
t = sorted(float(x) for x in sys.argv[1:])
pick = lambda p: t[min(len(t) - 1, round(p * (len(t) - 1)))]
print(f"POST instance -> RUNNING over {len(t)} runs: p50 {pick(0.5):.3f} s, p90 {pick(0.9):.3f} s, max {t[-1]:.3f} s")
EOF
