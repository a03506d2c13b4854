#!/usr/bin/env bash
# 1-DOC: root, cluster and one worker on this machine with one command.
#   ./scripts/1doc.sh [up]      install what is missing, build, start everything, wait until the worker is active
#   ./scripts/1doc.sh install   only install what is missing and build (starts nothing)
#   ./scripts/1doc.sh status    show each component
#   ./scripts/1doc.sh example   log in, register examples/clientsrvr-local.json, deploy it, show the client's log
#   ./scripts/1doc.sh down      stop everything and remove the network state it created
# See --help for the directory layout and the settings (environment variables).
set -euo pipefail
umask 022
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

OAK_HOME=${OAK_HOME:-/var/lib/oakestra-rs/1doc}
OAK_API_PORT=${OAK_API_PORT:-10000}
OAK_CLUSTER_PORT=${OAK_CLUSTER_PORT:-10100}
OAK_MQTT_PORT=${OAK_MQTT_PORT:-10003}
OAK_CONTAINERD=${OAK_CONTAINERD:-/run/containerd/containerd.sock}
OAK_NAMESPACE=${OAK_NAMESPACE:-oakestra}
OAK_BIN_DIR=${OAK_BIN_DIR:-}
OAK_NO_INSTALL=${OAK_NO_INSTALL:-0}
OAK_NO_IMAGES=${OAK_NO_IMAGES:-0}
OAK_WORKER_TIMEOUT=${OAK_WORKER_TIMEOUT:-10}
OAK_NO_UNIKERNEL=${OAK_NO_UNIKERNEL:-0}
OAK_GUEST_PORT=${OAK_GUEST_PORT:-10091}
OAK_ADDONS=${OAK_ADDONS:-0}
OAK_ADMIN_PASSWORD=${OAK_ADMIN_PASSWORD:-}
OAK_DOCKER=${OAK_DOCKER:-/var/run/docker.sock}
OAK_REGISTRY_PORT=${OAK_REGISTRY_PORT:-5000}
OAK_MONITORING=${OAK_MONITORING:-0}
OAK_PROMETHEUS_PORT=${OAK_PROMETHEUS_PORT:-9090}
OAK_NODEENGINE_METRICS_PORT=${OAK_NODEENGINE_METRICS_PORT:-9102}
OAK_NETMANAGER_METRICS_PORT=${OAK_NETMANAGER_METRICS_PORT:-9103}
OAK_SCRAPE_INTERVAL=${OAK_SCRAPE_INTERVAL:-5s}

logs=$OAK_HOME/logs
run=$OAK_HOME/run
data=$OAK_HOME/data
api="http://127.0.0.1:$OAK_API_PORT"
components=(root-service cluster-service NetManager NodeEngine)

log() { printf '==> %s\n' "$*"; }
step() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
Usage: scripts/1doc.sh [up|install|status|example|down|help]

A whole Oakestra on this machine (1-DOC): root-service (API on :$OAK_API_PORT), cluster-service (on :$OAK_CLUSTER_PORT
with its embedded MQTT broker on :$OAK_MQTT_PORT) and one worker (NetManager + NodeEngine, containers through
containerd). Runs as root (the worker creates network interfaces and containers).

  up       installs what is missing (apt: containerd runc nftables iproute2 busybox-static nginx curl ...; a Rust
           toolchain through rustup), builds the four binaries in release mode, builds and imports the local example
           images (scripts/images/build.sh), starts the four processes in the background and waits until the worker
           is active. Prints the API URL, the Admin password and the next command. Running it again restarts nothing
           that is running.
  install  only the first two steps of up: the packages, the toolchain and the release build (e.g. to prepare a
           machine image); starts nothing
  status   each component: running or not, pid, and what it reports
  example [SLA]
           logs in, registers examples/clientsrvr-local.json (curl client + nginx server on 10.30.55.55) or the
           SLA given (e.g. examples/unikernel.json: curl client + a unikernel web server on 10.30.77.77), deploys
           one instance of each, waits for RUNNING and prints the logs (the client's shows the page it fetched)
  Unikernels: when QEMU is installed (up installs it: scripts/qemu-install.sh) the NodeEngine runs with -u=true
  and up builds the test guest (scripts/images/unikernel.sh) and serves it on http://127.0.0.1:$OAK_GUEST_PORT/
  (busybox httpd, "guest-images"), so examples/unikernel.json works offline.

  down     stops the four processes (SIGTERM: the NetManager removes its bridge, TUN, veths and nftables table),
           removes the containers left in the containerd namespace, stops containerd if 1doc started it, and removes
           any network state a killed NetManager left; keeps data and logs

Everything lives under OAK_HOME ($OAK_HOME):
  logs/<component>.log   the logs          data/   databases and state     run/   pid files, NetManager socket
  admin.password         the Admin password (generated at the first start, mode 0600)

Settings (environment): OAK_HOME, OAK_API_PORT (10000), OAK_CLUSTER_PORT (10100), OAK_MQTT_PORT (10003),
OAK_CONTAINERD (containerd socket; containerd is started if nothing answers there), OAK_NAMESPACE (containerd
namespace, oakestra), OAK_WORKER_TIMEOUT (seconds before a silent worker's instances move, 10),
OAK_BIN_DIR (take the binaries from there instead of building), OAK_NO_INSTALL=1 (no apt, no rustup),
OAK_NO_IMAGES=1 (do not build the local example images), OAK_NO_UNIKERNEL=1 (no QEMU, no -u=true),
OAK_GUEST_PORT (where the guest images are served, 10091), OAK_ADMIN_PASSWORD (Admin's password instead of a
generated one; OAK_ADMIN_PASSWORD=Admin, with a loud warning, is for oak-cli, which always logs in as Admin/Admin).

Addons (OAK_ADDONS=1): up also installs docker.io and docker-registry, uses the Docker daemon on OAK_DOCKER
(/var/run/docker.sock; when nothing answers there it starts dockerd with its data under OAK_HOME and uses
run/docker.sock), starts a local registry on 127.0.0.1:OAK_REGISTRY_PORT (5000, "registry"), builds the sample
addon images (scripts/images/addons.sh) and pushes them there, and starts root and cluster with the addons engine on
that daemon. Publish examples/addons/*.json to the marketplace (see the README's Addons section). down removes the
addon containers and stops dockerd and the registry if 1doc started them.

Monitoring (OAK_MONITORING=1): up also installs Debian's prometheus, opens the NodeEngine's and the NetManager's
metrics ports (127.0.0.1:OAK_NODEENGINE_METRICS_PORT, 9102, and :OAK_NETMANAGER_METRICS_PORT, 9103, with the token in
OAK_HOME/metrics.token) and starts prometheus on 127.0.0.1:OAK_PROMETHEUS_PORT (9090), scraping all four daemons every
OAK_SCRAPE_INTERVAL (5s) with scripts/monitoring/prometheus.yml. The Grafana dashboards are
scripts/monitoring/grafana-*.json (README: Monitoring). down stops prometheus; its data stays under data/prometheus.
EOF
}

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (the worker creates network interfaces and containers)"; }

pid_of() { local f="$run/$1.pid"; [ -f "$f" ] && cat "$f"; }
alive() { local p; p=$(pid_of "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# --- install and build -----------------------------------------------------------------------------------------
install_packages() {
  [ "$OAK_NO_INSTALL" = 1 ] && return 0
  local want=(containerd runc nftables iproute2 iptables busybox-static nginx curl ca-certificates gcc libc6-dev
    pkg-config protobuf-compiler python3) missing=()
  # NetManager's eBPF fast path is compiled with bpf-linker, built against LLVM 22.
  [ -n "$OAK_BIN_DIR" ] || [ "${OAKESTRA_SKIP_EBPF:-0}" = 1 ] \
    || want+=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev binutils)
  # Addons: Docker and a local registry for the sample images.
  [ "$OAK_ADDONS" != 1 ] || want+=(docker.io docker-registry)
  # Monitoring: Prometheus scrapes the four daemons.
  [ "$OAK_MONITORING" != 1 ] || want+=(prometheus)
  for p in "${want[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    # Keep Debian's packages (nginx, docker.io, docker-registry) from starting daemons on this host while installing.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 0755 "$policy"; own_policy=1; fi
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
    [ "$own_policy" = 1 ] && rm -f "$policy"
    # Debian enables prometheus.service (0.0.0.0:9090, no authentication) for the next boot: 1doc runs its own.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
  if [ -z "$OAK_BIN_DIR" ] && ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    log "installing a Rust toolchain with rustup (stable, minimal profile)"
    "$repo/scripts/rustup.sh" stable
  fi
  if [ -z "$OAK_BIN_DIR" ] && [ "${OAKESTRA_SKIP_EBPF:-0}" != 1 ]; then
    "$repo/scripts/ebpf-toolchain.sh" --no-apt
  fi
  if [ "$OAK_NO_UNIKERNEL" != 1 ]; then
    "$repo/scripts/qemu-install.sh" >/dev/null || step "QEMU could not be installed: the worker offers containers only"
  fi
}

# QEMU here and unikernels not switched off.
unikernels_on() { [ "$OAK_NO_UNIKERNEL" != 1 ] && command -v "qemu-system-$(uname -m)" >/dev/null; }

build() {
  if [ -n "$OAK_BIN_DIR" ]; then
    bin=$(cd "$OAK_BIN_DIR" && pwd)
  else
    log "building the four binaries (release; the first build takes a few minutes)"
    export PATH="$HOME/.cargo/bin:$PATH"
    # At a terminal cargo's own progress bar shows how far it is; in a log only errors appear.
    local quiet=(--quiet)
    [ -t 2 ] && quiet=()
    (cd "$repo" && cargo build --release "${quiet[@]}" -p oakestra-root-service -p oakestra-cluster-service \
      -p oakestra-worker-agent -p oakestra-netmanager -p oakestra-addons)
    bin=${CARGO_TARGET_DIR:-$repo/target}/release
  fi
  for c in "${components[@]}"; do [ -x "$bin/$c" ] || die "$bin/$c is missing"; done
}

# --- start ------------------------------------------------------------------------------------------------------
# Starts `name` in the background unless it runs; its output goes to logs/<name>.log.
start() {
  local name=$1; shift
  if alive "$name"; then step "$name already running (pid $(pid_of "$name"))"; return 0; fi
  setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$run/$name.pid"
  step "$name started (pid $!), log $logs/$name.log"
}

# Waits up to $1 seconds for `cmd...` to succeed; dies naming $2 and the log to read.
wait_for() {
  local secs=$1 what=$2 logname=$3; shift 3
  local i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive "$logname"; then die "$logname exited while waiting for $what; see $logs/$logname.log"; fi
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for $what; see $logs/$logname.log"
}

containerd_up() {
  if ctr -a "$OAK_CONTAINERD" version >/dev/null 2>&1; then return 0; fi
  log "starting containerd (nothing answers on $OAK_CONTAINERD)"
  local root=$data/containerd
  mkdir -p "$root"
  setsid containerd --address "$OAK_CONTAINERD" --root "$root/root" --state "$root/state" \
    >>"$logs/containerd.log" 2>&1 </dev/null &
  echo $! >"$run/containerd.pid"
  local i
  for ((i = 0; i < 80; i++)); do ctr -a "$OAK_CONTAINERD" version >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "containerd did not come up; see $logs/containerd.log"
}

# The Docker daemon the addons engine uses: OAK_DOCKER if something answers there, else a dockerd of 1doc's own.
docker_sock=
dockerd_up() {
  if docker -H "unix://$OAK_DOCKER" version >/dev/null 2>&1; then docker_sock=$OAK_DOCKER; return 0; fi
  docker_sock=$run/docker.sock
  if docker -H "unix://$docker_sock" version >/dev/null 2>&1; then return 0; fi
  log "starting dockerd (nothing answers on $OAK_DOCKER)"
  mkdir -p "$data/docker" "$run/dockerd"
  # --iptables=false: dockerd's iptables rules set the FORWARD policy to DROP, which would drop the overlay's
  # forwarded packets on this machine. Published ports still work (docker-proxy); addon containers reach this
  # machine over their network's gateway, not the internet.
  start dockerd dockerd --data-root "$data/docker" --exec-root "$run/dockerd" --pidfile "$run/dockerd.docker.pid" \
    -H "unix://$docker_sock" --iptables=false
  wait_for 60 "dockerd" dockerd docker -H "unix://$docker_sock" version
}

registry_up() {
  if curl -sf --max-time 2 "http://127.0.0.1:$OAK_REGISTRY_PORT/v2/" >/dev/null; then return 0; fi
  mkdir -p "$data/registry"
  printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$data/registry" "$OAK_REGISTRY_PORT" >"$data/registry.yml"
  start registry docker-registry serve "$data/registry.yml"
  wait_for 30 "the local registry" registry curl -sf --max-time 2 "http://127.0.0.1:$OAK_REGISTRY_PORT/v2/"
}

addons_up() {
  dockerd_up
  registry_up
  log "building the sample addon images and pushing them to 127.0.0.1:$OAK_REGISTRY_PORT"
  "$repo/scripts/images/addons.sh" --out "$data/images" --scheduler "$bin/oak-sample-scheduler" --load "$docker_sock" \
    >>"$logs/images.log" 2>&1 || die "addon image build failed; see $logs/images.log"
  local img
  for img in addon-hello addon-scheduler; do
    docker -H "unix://$docker_sock" tag "127.0.0.1:5000/oakestra/$img:latest" \
      "127.0.0.1:$OAK_REGISTRY_PORT/oakestra/$img:latest" >>"$logs/images.log" 2>&1
    docker -H "unix://$docker_sock" push "127.0.0.1:$OAK_REGISTRY_PORT/oakestra/$img:latest" >>"$logs/images.log" 2>&1 \
      || die "pushing $img failed; see $logs/images.log"
  done
  addon_flags=(--docker-socket "$docker_sock")
}

# Prometheus on the four daemons' /metrics (OAK_MONITORING=1); the worker's metrics ports are opened by up.
prometheus_up() {
  local cfg=$data/prometheus.yml
  sed -e "s|@DATA@|$data|g" -e "s|@API_PORT@|$OAK_API_PORT|g" -e "s|@CLUSTER_PORT@|$OAK_CLUSTER_PORT|g" \
    -e "s|@NODEENGINE_PORT@|$OAK_NODEENGINE_METRICS_PORT|g" -e "s|@NETMANAGER_PORT@|$OAK_NETMANAGER_METRICS_PORT|g" \
    -e "s|@WORKER_TOKEN@|$OAK_HOME/metrics.token|g" -e "s|@INTERVAL@|$OAK_SCRAPE_INTERVAL|g" \
    "$repo/scripts/monitoring/prometheus.yml" >"$cfg"
  mkdir -p "$data/prometheus"
  local url="http://127.0.0.1:$OAK_PROMETHEUS_PORT"
  if ! alive prometheus && curl -sf --max-time 2 "$url/-/ready" >/dev/null; then
    die "something else already answers on 127.0.0.1:$OAK_PROMETHEUS_PORT (Debian's prometheus.service? systemctl disable --now prometheus), or set OAK_PROMETHEUS_PORT"
  fi
  log "starting prometheus on 127.0.0.1:$OAK_PROMETHEUS_PORT (scrapes root, cluster, NodeEngine, NetManager)"
  start prometheus prometheus --config.file="$cfg" --storage.tsdb.path="$data/prometheus" \
    --web.listen-address="127.0.0.1:$OAK_PROMETHEUS_PORT" --storage.tsdb.retention.time=7d
  wait_for 60 "prometheus" prometheus curl -sf --max-time 2 "$url/-/ready"
  # Ours, with our configuration (not another Prometheus that won the port).
  curl -sf --max-time 2 "$url/api/v1/status/config" | grep -q 'job_name: netmanager' \
    || die "the Prometheus on $url does not run $cfg; see $logs/prometheus.log"
}

cluster_status() { curl -sf --max-time 2 "http://127.0.0.1:$OAK_CLUSTER_PORT/api/cluster/status"; }
worker_active() { cluster_status | grep -q '"active_workers":[1-9]'; }
root_connected() { cluster_status | grep -q '"connected_to_root":true'; }
netmanager_registered() { "$bin/NetManager" status --socket "$run/netmanager.sock" | grep -q '"registered": *true'; }

up() {
  need_root
  local t0=$SECONDS
  install_packages
  build
  mkdir -p "$logs" "$run" "$data"
  chmod 0700 "$OAK_HOME"
  if [ -n "$OAK_ADMIN_PASSWORD" ]; then
    (umask 077; printf '%s\n' "$OAK_ADMIN_PASSWORD" >"$OAK_HOME/admin.password")
    if [ "$OAK_ADMIN_PASSWORD" = Admin ]; then
      printf '\n!!! WARNING: OAK_ADMIN_PASSWORD=Admin: the Admin user has the well-known password "Admin".\n' >&2
      printf '!!! Anyone who reaches port %s can control this Oakestra. Use it only for tools that cannot log in\n' "$OAK_API_PORT" >&2
      printf '!!! otherwise (oak-cli) on a machine nobody else reaches; restart without it to get a random one.\n\n' >&2
    fi
  elif [ ! -s "$OAK_HOME/admin.password" ] || [ "$(cat "$OAK_HOME/admin.password")" = Admin ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$OAK_HOME/admin.password")
  fi
  containerd_up
  if [ "$OAK_NO_IMAGES" != 1 ]; then
    log "building and importing the local example images (localhost/oakestra/nginx, localhost/oakestra/curl)"
    "$repo/scripts/images/build.sh" --out "$data/images" --import "$OAK_NAMESPACE" --address "$OAK_CONTAINERD" \
      >>"$logs/images.log" 2>&1 || die "image build failed; see $logs/images.log"
  fi

  local uk_flags=()
  if unikernels_on; then
    log "building the test guest and serving it on http://127.0.0.1:$OAK_GUEST_PORT/ (unikernels on: -u=true)"
    "$repo/scripts/images/unikernel.sh" --out "$data/guest-images" >>"$logs/images.log" 2>&1 \
      || die "guest image build failed; see $logs/images.log"
    start guest-images busybox httpd -f -p "127.0.0.1:$OAK_GUEST_PORT" -h "$data/guest-images"
    uk_flags=(-u=true)
  fi

  addon_flags=()
  if [ "$OAK_ADDONS" = 1 ]; then addons_up; fi

  # The worker daemons' metrics ports ask for this token (root and cluster keep theirs in their data dirs).
  local nm_metrics=() ne_metrics=()
  if [ "$OAK_MONITORING" = 1 ]; then
    [ -s "$OAK_HOME/metrics.token" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$OAK_HOME/metrics.token")
    nm_metrics=(--metrics-listen "127.0.0.1:$OAK_NETMANAGER_METRICS_PORT" --metrics-token-file "$OAK_HOME/metrics.token")
    ne_metrics=(--metrics-listen "127.0.0.1:$OAK_NODEENGINE_METRICS_PORT" --metrics-token-file "$OAK_HOME/metrics.token")
  fi

  log "starting root-service on :$OAK_API_PORT"
  OAKESTRA_ADMIN_PASSWORD=$(cat "$OAK_HOME/admin.password") start root-service "$bin/root-service" \
    --listen "0.0.0.0:$OAK_API_PORT" --data-dir "$data/root" "${addon_flags[@]}"
  wait_for 30 "root's API" root-service curl -sf --max-time 2 "$api/api/health"

  log "starting cluster-service on :$OAK_CLUSTER_PORT (MQTT :$OAK_MQTT_PORT)"
  start cluster-service "$bin/cluster-service" --cluster-name 1doc --cluster-location "1-DOC" \
    --root-url "$api" --join-token-file "$data/root/join.token" --listen "0.0.0.0:$OAK_CLUSTER_PORT" \
    --advertise-address 127.0.0.1 --mqtt-listen "0.0.0.0:$OAK_MQTT_PORT" --data-dir "$data/cluster" \
    --report-interval 2 --worker-timeout "$OAK_WORKER_TIMEOUT" "${addon_flags[@]}"
  wait_for 30 "the cluster to register at root" cluster-service root_connected

  log "starting the worker (NetManager, NodeEngine)"
  [ -f "$OAK_HOME/netcfg.json" ] || printf '{"NodePublicAddress":"0.0.0.0","NodePublicPort":"50103","ClusterUrl":"127.0.0.1","ClusterMqttPort":"%s"}\n' \
    "$OAK_MQTT_PORT" >"$OAK_HOME/netcfg.json"
  start NetManager "$bin/NetManager" --config "$OAK_HOME/netcfg.json" --socket "$run/netmanager.sock" \
    --state-dir "$data/netmanager" --log-file none "${nm_metrics[@]}"
  wait_for 20 "the NetManager's socket" NetManager test -S "$run/netmanager.sock"
  wait_for 10 "the cluster's worker join token" cluster-service test -s "$data/cluster/worker-join.token"
  OAKESTRA_WORKER_JOIN_TOKEN=$(cat "$data/cluster/worker-join.token") \
    start NodeEngine "$bin/NodeEngine" -a 127.0.0.1 -p "$OAK_CLUSTER_PORT" -n "$run/netmanager.sock" \
    -l "$logs/apps" --conf "$data/nodeengine.conf.json" --containerd "$OAK_CONTAINERD" --namespace "$OAK_NAMESPACE" \
    --state-dir "$data/nodeengine" --log-file none --node-name "$(hostname)-1doc" "${uk_flags[@]}" "${ne_metrics[@]}"
  wait_for 60 "the worker to be active" NodeEngine worker_active
  wait_for 30 "the NetManager to register" NetManager netmanager_registered
  if [ "$OAK_MONITORING" = 1 ]; then prometheus_up; fi

  log "1-DOC is up ($((SECONDS - t0)) s)"
  cat <<EOF

  API         $api   (OpenAPI: $api/api/docs)
  login       user Admin, password $(cat "$OAK_HOME/admin.password")   (also in $OAK_HOME/admin.password)
  workers     join with the token in $data/cluster/worker-join.token:
              sudo $repo/scripts/install-worker.sh --cluster <this machine> --join-token $(cat "$data/cluster/worker-join.token")
  logs, data  $OAK_HOME
$(if [ "$OAK_ADDONS" = 1 ]; then printf '  addons      Docker %s, registry 127.0.0.1:%s; publish examples/addons/*.json (README: Addons)' "$docker_sock" "$OAK_REGISTRY_PORT"; fi)
$(if [ "$OAK_MONITORING" = 1 ]; then printf '  monitoring  Prometheus http://127.0.0.1:%s; Grafana dashboards in %s/scripts/monitoring (README: Monitoring)' "$OAK_PROMETHEUS_PORT" "$repo"; fi)

  next:       sudo $repo/scripts/1doc.sh example      deploys the clientsrvr example and shows the client's log
              sudo $repo/scripts/1doc.sh status       sudo $repo/scripts/1doc.sh down
EOF
}

# --- status -------------------------------------------------------------------------------------------------------
status() {
  local c any=0
  for c in containerd "${components[@]}" guest-images dockerd registry prometheus; do
    if [[ "$c" =~ ^(guest-images|dockerd|registry|prometheus)$ ]] && ! alive "$c"; then continue; fi
    if alive "$c"; then
      any=1
      printf '  %-16s running  pid %s\n' "$c" "$(pid_of "$c")"
    elif [ "$c" = containerd ]; then
      if ctr -a "$OAK_CONTAINERD" version >/dev/null 2>&1; then
        printf '  %-16s running  (not started by 1doc) %s\n' "$c" "$OAK_CONTAINERD"
      else printf '  %-16s stopped\n' "$c"; fi
    else
      printf '  %-16s stopped\n' "$c"
    fi
  done
  if alive root-service; then printf '  root API         %s\n' "$(curl -sf --max-time 2 "$api/api/health" || echo 'not answering')"; fi
  if alive cluster-service; then printf '  cluster          %s\n' "$(cluster_status || echo 'not answering')"; fi
  if alive NetManager; then
    local nm_bin
    nm_bin=$(readlink -f "/proc/$(pid_of NetManager)/exe" 2>/dev/null || true)
    [ -x "$nm_bin" ] && printf '  NetManager       %s\n' \
      "$("$nm_bin" status --socket "$run/netmanager.sock" 2>/dev/null | tr -d '\n' | tr -s ' ' | cut -c1-300)"
  fi
  [ "$any" = 1 ] || printf '  (nothing runs; start it with: sudo %s/scripts/1doc.sh)\n' "$repo"
}

# --- down ---------------------------------------------------------------------------------------------------------
stop() {
  local name=$1 p i
  p=$(pid_of "$name") || return 0
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; step "$name killed (did not stop in 15 s)"
    else step "$name stopped"; fi
  fi
  rm -f "$run/$name.pid"
}

down() {
  need_root
  log "stopping the 1-DOC"
  stop prometheus
  # The worker first (the NetManager removes its interfaces), then the control plane.
  stop NodeEngine
  stop NetManager
  stop cluster-service
  stop root-service
  # Addon containers outlive root and cluster (the monitor adopts them at the next start): remove them.
  local sock c
  for sock in "$OAK_DOCKER" "$run/docker.sock"; do
    if [ -S "$sock" ] && docker -H "unix://$sock" version >/dev/null 2>&1; then
      for c in $(docker -H "unix://$sock" ps -aq --filter label=oak.addon.id 2>/dev/null); do
        docker -H "unix://$sock" rm -f "$c" >/dev/null 2>&1 && step "removed addon container $c"
      done
    fi
  done
  stop registry
  if alive dockerd; then
    # 1doc's own dockerd: its networks go with it (docker0 stays otherwise, and the addon networks' bridges).
    docker -H "unix://$run/docker.sock" network prune -f >/dev/null 2>&1 || true
    stop dockerd
    ip link show docker0 >/dev/null 2>&1 && ip link del docker0 2>/dev/null && step "removed interface docker0"
  fi
  # The NodeEngine leaves its containers running when it stops (a restarted NodeEngine adopts them): remove them.
  if ctr -a "$OAK_CONTAINERD" version >/dev/null 2>&1; then
    local t
    for t in $(ctr -a "$OAK_CONTAINERD" -n "$OAK_NAMESPACE" tasks ls -q 2>/dev/null); do
      ctr -a "$OAK_CONTAINERD" -n "$OAK_NAMESPACE" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
      ctr -a "$OAK_CONTAINERD" -n "$OAK_NAMESPACE" tasks delete -f "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctr -a "$OAK_CONTAINERD" -n "$OAK_NAMESPACE" containers ls -q 2>/dev/null); do
      ctr -a "$OAK_CONTAINERD" -n "$OAK_NAMESPACE" containers delete "$t" >/dev/null 2>&1 && step "removed container $t"
    done
  fi
  stop guest-images
  # Guests outlive their NodeEngine like containers do: stop the QEMUs it left.
  if pkill -TERM -f "qemu-system-.* -kernel $data/nodeengine/unikernel/" 2>/dev/null; then
    sleep 1; step "stopped the unikernel guests"
  fi
  # Their cgroups (rmdir only removes empty ones: guests of other NodeEngines keep theirs).
  local cg
  for cg in /sys/fs/cgroup/oakestra-unikernel/*/ /sys/fs/cgroup/*/oakestra-unikernel/*/; do
    [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true
  done
  stop containerd
  # Network state a killed NetManager may have left: its bridge and TUN, and the veths it recorded.
  local l veths=()
  if [ -s "$data/netmanager/veths.json" ]; then
    mapfile -t veths < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))))' \
      "$data/netmanager/veths.json" 2>/dev/null || true)
  fi
  for l in goProxyBridge goProxyTun "${veths[@]}"; do
    [ -n "$l" ] && ip link show "$l" >/dev/null 2>&1 && ip link del "$l" 2>/dev/null && step "removed interface $l"
  done
  # The unikernel namespaces it recorded.
  if [ -s "$data/netmanager/netns.json" ]; then
    for l in $(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))))' \
      "$data/netmanager/netns.json" 2>/dev/null || true); do
      [ -e "/var/run/netns/$l" ] && ip netns del "$l" 2>/dev/null && step "removed namespace $l"
    done
  fi
  if nft list table inet oakestra >/dev/null 2>&1; then nft delete table inet oakestra && step "removed nftables table inet oakestra"; fi
  log "down (data and logs kept in $OAK_HOME)"
}

# --- example ------------------------------------------------------------------------------------------------------
json_get() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }

example() {
  command -v python3 >/dev/null || die "python3 is needed to read the API's JSON"
  alive root-service || die "the 1-DOC is not running: sudo $repo/scripts/1doc.sh up"
  local sla=${1:-$repo/examples/clientsrvr-local.json} pw token name app app_id ids id i s all
  local -A names
  pw=$(cat "$OAK_HOME/admin.password")
  log "logging in as Admin"
  token=$(curl -sf "$api/api/auth/login" -H 'Content-Type: application/json' \
    -d "{\"username\":\"Admin\",\"password\":\"$pw\"}" | json_get '["token"]') || die "login failed"
  local auth=(-H "Authorization: Bearer $token" -H 'Content-Type: application/json')
  name=$(json_get '["applications"][0]["application_name"]' <"$sla")
  log "registering $name from $(basename "$sla")"
  app=$(curl -sf "${auth[@]}" "$api/api/application" -d @"$sla") || die "registering the application failed"
  # The application just registered (the newest of that name): its id, then its services in reverse SLA order,
  # which deploys the seed's server (listed last) before its client.
  read -r app_id ids <<<"$(printf '%s' "$app" | python3 -c '
import json, sys
app = [a for a in json.load(sys.stdin) if a["application_name"] == sys.argv[1]][-1]
print(app["applicationID"], " ".join(reversed(app["microservices"])))' "$name")"
  for id in $ids; do
    names[$id]=$(curl -sf "${auth[@]}" "$api/api/service/$id" | json_get '["job_name"]')
    curl -sf "${auth[@]}" -X POST "$api/api/service/$id/instance" -d '{}' >/dev/null || die "deploying ${names[$id]} failed"
    step "deployed one instance of ${names[$id]}"
  done
  log "waiting for RUNNING"
  for ((i = 0; ; i++)); do
    all=1
    for id in $ids; do
      s=$(curl -sf "${auth[@]}" "$api/api/service/$id" | json_get '["instance_list"][0]["status"]' 2>/dev/null || echo none)
      case "$s" in
        RUNNING) ;;
        FAILED | DEAD) die "${names[$id]} is $s; see $logs/NodeEngine.log and $logs/cluster-service.log" ;;
        *) all=0 ;;
      esac
    done
    [ "$all" = 1 ] && break
    [ "$i" -lt 240 ] || die "not RUNNING after 120 s; see $logs/NodeEngine.log and $logs/cluster-service.log"
    sleep 0.5
  done
  for id in $ids; do step "${names[$id]}: RUNNING"; done
  # The client fetches its page right after it starts and the log reaches root with the next reports (every 2 s
  # from the worker, then from the cluster): a log is shown once it is non-empty and has not changed for 5 s, so a
  # half-written one (curl's progress meter before the page) is not taken for the whole.
  for id in $ids; do
    s='' stable=0
    for ((i = 0; i < 80 && stable < 10; i++)); do
      sleep 0.5
      now=$(curl -sf "${auth[@]}" "$api/api/service/$id/instance/0/logs" | json_get '["logs"]' 2>/dev/null || true)
      if [ -n "$now" ] && [ "$now" = "$s" ]; then stable=$((stable + 1)); else stable=0; fi
      s=$now
    done
    log "${names[$id]}'s log (GET /api/service/$id/instance/0/logs)"
    printf '%s\n' "$s"
  done
  printf '\nRemove it again: curl -X DELETE -H "Authorization: Bearer <token>" %s/api/application/%s\n' "$api" "$app_id"
}

case "${1:-up}" in
  up) up ;;
  install) need_root; install_packages; build; log "installed; the binaries are in $bin" ;;
  status) status ;;
  down) down ;;
  example) shift; example "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 64 ;;
esac
