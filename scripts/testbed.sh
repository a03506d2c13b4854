#!/usr/bin/env bash
# A network-namespace testbed by hand: the topology the Rust harness builds (tests/src/netns.rs, `Testbed`), for
# trying things out interactively. Everything lives in namespaces this script creates; the host's own network
# namespace is never touched.
#
#   netns <tag>-lan: bridge lan0 172.31.0.1/24 (the cluster side) ── veth <tag>w<i> ══ eth0 in netns <tag>-w<i>,
#                    172.31.0.<10+i>/24, default route via 172.31.0.1 (worker i, 1-based)
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/testbed.sh up [N] [--tag T]     build (or complete) a testbed with N workers (default 2)
       scripts/testbed.sh down [--tag T]       delete it, killing the processes inside
       scripts/testbed.sh status [--tag T]     show what exists
       scripts/testbed.sh --help

T: [a-z0-9], at most 8 characters (default otb). Needs root. `up` and `down` are idempotent: `up` twice is fine,
`up 2` after `up 3` removes worker 3, `down` with nothing there does nothing.
Run commands inside with `ip netns exec <tag>-w1 <command>` (a worker) or `ip netns exec <tag>-lan <command>`.
EOF
}

die() { printf 'testbed.sh: %s\n' "$*" >&2; exit 1; }

cmd=""; n=2; tag=otb
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag=$2; shift 2 ;;
    --tag=*) tag=${1#--tag=}; shift ;;
    up|down|status) [ -z "$cmd" ] || die "one command at a time"; cmd=$1; shift ;;
    [0-9]*) [ "$cmd" = up ] || die "a worker count goes after 'up'"; n=$1; shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$cmd" ] || { usage >&2; exit 2; }
[[ "$tag" =~ ^[a-z0-9]{1,8}$ ]] || die "tag '$tag': use [a-z0-9], at most 8 characters (it prefixes interface names)"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 200 ]; then die "worker count '$n': 1..200"; fi
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, bridges, veths): run it with sudo"
command -v ip >/dev/null || die "ip (iproute2) is not installed"

lan="$tag-lan"
lan_addr=172.31.0.1
mark=OAKESTRA_TESTBED_PROC

# The lock the Rust harness holds while a testbed of this tag is alive: never build over or tear down a running
# test's namespaces. Taken for this script's run only, removed again (as the harness does) when we are done.
lockfile="/run/oakestra-testbed-$tag.lock"
exec 9>>"$lockfile"
flock -n 9 || die "testbed '$tag' is in use by a running test (lock $lockfile held); try another --tag"
trap 'rm -f "$lockfile"' EXIT

ns_exists() { [ -e "/run/netns/$1" ]; }

# Names of this tag's namespaces: <tag>-lan and <tag>-w<N>, workers in numeric order.
tag_netns() {
  local f
  for f in /run/netns/"$tag"-lan /run/netns/"$tag"-w*; do
    [ -e "$f" ] || continue
    f=${f##*/}
    [[ "$f" =~ ^$tag-(lan|w[0-9]+)$ ]] && printf '%s\n' "$f"
  done | sort -V
}

# Kills what runs in netns $1, then deletes it.
del_netns() {
  local pids
  mapfile -t pids < <(ip netns pids "$1" 2>/dev/null || true)
  [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
  ip netns del "$1"
}

# Processes the Rust harness started for this tag (containers have unnamed namespaces; they carry a marker).
kill_marked() {
  local env pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" != $$ ] || continue
    if tr '\0' '\n' 2>/dev/null <"$env" | grep -q "^$mark=$tag-"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

new_netns() {
  ns_exists "$1" && return 0
  ip netns add "$1"
  ip -n "$1" link set lo up
}

up() {
  new_netns "$lan"
  ip -n "$lan" link show lan0 >/dev/null 2>&1 || ip -n "$lan" link add name lan0 type bridge
  ip -n "$lan" addr replace "$lan_addr/24" dev lan0
  ip -n "$lan" link set lan0 up
  local i w port addr
  for i in $(seq 1 "$n"); do
    w="$tag-w$i"; port="${tag}w$i"; addr="172.31.0.$((10 + i))"
    new_netns "$w"
    if ! ip -n "$lan" link show "$port" >/dev/null 2>&1; then
      # A worker whose LAN end vanished (e.g. the lan netns was deleted by hand) keeps no half of the old pair.
      ip -n "$w" link del eth0 2>/dev/null || true
      ip -n "$lan" link add name "$port" type veth peer name eth0 netns "$w"
    fi
    ip -n "$lan" link set "$port" master lan0 up
    ip -n "$w" addr replace "$addr/24" dev eth0
    ip -n "$w" link set eth0 up
    ip -n "$w" route replace default via "$lan_addr"
  done
  # Workers beyond N from an earlier, bigger `up`.
  local ns
  for ns in $(tag_netns); do
    if [[ "$ns" =~ ^$tag-w([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -gt "$n" ]; then
      del_netns "$ns"
      echo "removed $ns (beyond $n workers)"
    fi
  done

  echo "testbed '$tag' is up: $n worker(s)"
  echo "  $lan  (cluster side)  bridge lan0 $lan_addr/24"
  for i in $(seq 1 "$n"); do
    echo "  $tag-w$i  eth0 172.31.0.$((10 + i))/24, default via $lan_addr  (LAN port ${tag}w$i)"
  done
  cat <<EOF
run commands inside:
  ip netns exec $tag-w1 busybox ping -c 1 $( [ "$n" -ge 2 ] && echo 172.31.0.12 || echo $lan_addr )
  ip netns exec $tag-lan bash          # a shell on the cluster side
  ip -n $tag-w1 addr                   # ip commands without entering
tear it down: $0 down --tag $tag
EOF
}

down() {
  kill_marked
  local ns found=0
  for ns in $(tag_netns); do
    del_netns "$ns"
    echo "deleted netns $ns"
    found=1
  done
  [ "$found" = 1 ] || echo "testbed '$tag': nothing to delete"
}

status() {
  local list ns
  list=$(tag_netns)
  if [ -z "$list" ]; then
    echo "testbed '$tag': not up"
    return 0
  fi
  for ns in $list; do
    echo "== $ns ($(ip netns pids "$ns" 2>/dev/null | wc -l) processes)"
    ip -n "$ns" -br addr | sed 's/^/  /'
    ip -n "$ns" route | sed 's/^/  route: /'
  done
}

"$cmd"
