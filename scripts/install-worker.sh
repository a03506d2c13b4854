#!/usr/bin/env bash
# Installs an Oakestra worker (NodeEngine + NetManager) on this Debian/Ubuntu machine, as root: apt packages, release
# binaries built from this checkout (or taken from --bin-dir), systemd units and default configs. See --help.
#   sudo ./scripts/install-worker.sh --cluster 192.168.1.10          install, point the worker at that cluster
#   ./scripts/install-worker.sh --root /tmp/pkg --no-apt --bin-dir target/release    into a directory (tests, packaging)
#   sudo ./scripts/install-worker.sh --uninstall [--purge]            remove it again
# Idempotent: a second run with the same options changes nothing and says "unchanged" for every item.
# INSTALL_WORKER_JSON_TOOL=python3|jq|none forces the tool that edits existing JSON configs (the tests use it).
set -euo pipefail
# Units, binaries and configs are world-readable whatever the caller's umask (a 077 umask would hide /usr/local/bin).
umask 022
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '\n==> %s  [%s]\n' "$*" "$(date +%T)"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'warning: %s\n' "$*" >&2; }
# One line per installed item: what happened to it, then its path.
item() { printf '  %-10s %s\n' "$1" "$2"; }

usage() {
  cat <<'EOF'
Usage: install-worker.sh [OPTIONS]

Installs an Oakestra worker node (NodeEngine and NetManager) on this Debian/Ubuntu machine. Run as root.

  1. apt packages: containerd runc iproute2 iptables nftables (and, when building, build-essential pkg-config
     protobuf-compiler curl ca-certificates, plus a Rust toolchain through rustup if cargo is missing)
  2. builds NodeEngine and NetManager in release mode from this checkout (or takes them from --bin-dir)
  3. installs them to /usr/local/bin (0755), with links in /bin
  4. writes /etc/systemd/system/nodeengine.service and netmanager.service
  5. writes /etc/oakestra/conf.json and /etc/netmanager/netcfg.json if absent (an existing config is kept; only the
     keys --cluster/--cluster-port name are updated in it)
  6. creates /var/log/oakestra/apps, enables containerd; starts the worker only with --start

Running it again with the same options changes nothing.

Options:
  --cluster ADDR      cluster orchestrator address (conf.json cluster_address, netcfg.json ClusterUrl)
  --cluster-port N    cluster orchestrator port (conf.json cluster_port; default 10100)
  --join-token TOKEN  the cluster's worker join token (the cluster prints where it keeps it:
                      <cluster data-dir>/worker-join.token); written to /etc/oakestra/join.token (mode 0600), which
                      the NodeEngine reads. Also from the environment: OAKESTRA_WORKER_JOIN_TOKEN
  --bin-dir DIR       take NodeEngine and NetManager from DIR instead of building them
  --no-apt            install no packages and no Rust toolchain (everything needed is already there)
  --start             enable and start netmanager and nodeengine (restart them if they run and something changed)
  --unikernel         also run unikernels: installs QEMU (scripts/qemu-install.sh) and starts the NodeEngine with
                      -u=true (drop-in nodeengine.service.d/unikernel.conf: OAKESTRA_UNIKERNEL=true)
  --root DIR          install into DIR instead of / (tests, packaging): no apt, no rustup, no systemctl
  --uninstall         stop and disable the units, remove units, binaries and /bin links; keeps configs and logs
  --purge             with --uninstall: also remove /etc/oakestra, /etc/netmanager and /var/log/oakestra
  -h, --help          this text

Building as root writes root-owned files into this checkout's target/; to avoid that, build as yourself
(cargo build --release -p oakestra-worker-agent -p oakestra-netmanager) and pass --bin-dir target/release.
EOF
}

# --- options -----------------------------------------------------------------------------------------------------
prefix="" root_given=0 no_apt=0 bin_dir="" cluster="" cluster_port="" start=0 uninstall=0 purge=0 unikernel=0
join_token="${OAKESTRA_WORKER_JOIN_TOKEN:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --cluster) [ $# -ge 2 ] || die "--cluster needs an address"; cluster="$2"; shift 2 ;;
    --cluster-port) [ $# -ge 2 ] || die "--cluster-port needs a port"; cluster_port="$2"; shift 2 ;;
    --join-token) [ $# -ge 2 ] || die "--join-token needs the token"; join_token="$2"; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_dir="$2"; shift 2 ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; prefix="$2"; root_given=1; shift 2 ;;
    --no-apt) no_apt=1; shift ;;
    --start) start=1; shift ;;
    --unikernel) unikernel=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# The address lands in JSON configs unescaped: a host name, an IPv4 address or an (optionally bracketed) IPv6 address.
address_re='^[][A-Za-z0-9.:_-]+$'
if [ -n "$cluster" ] && ! [[ "$cluster" =~ $address_re ]]; then
  die "--cluster $cluster is not a host name or IP address"
fi
if [ -n "$join_token" ] && { [ ${#join_token} -gt 256 ] || [[ "$join_token" == *[![:graph:]]* ]]; }; then
  die "--join-token must be 1 to 256 printable ASCII characters without spaces"
fi
if [ -n "$cluster_port" ]; then
  if ! [[ "$cluster_port" =~ ^[0-9]{1,5}$ ]] || [ "$((10#$cluster_port))" -lt 1 ] \
    || [ "$((10#$cluster_port))" -gt 65535 ]; then
    die "--cluster-port $cluster_port is not a port (1-65535)"
  fi
  cluster_port=$((10#$cluster_port))
fi
[ "$purge" = 0 ] || [ "$uninstall" = 1 ] || die "--purge only goes with --uninstall"
if [ "$root_given" = 1 ]; then
  [ -n "$prefix" ] || die "--root needs a directory"
  prefix="$(realpath -m -- "$prefix")"
  [ "$prefix" != / ] || die "--root / is the real system: leave --root out instead"
  [ "$start" = 0 ] || die "--start starts services on this machine; it does not go with --root"
  no_apt=1
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo $0 ...), or install into a directory with --root DIR"
fi

case "${INSTALL_WORKER_JSON_TOOL:-}" in
  '' | python3 | jq | none) ;;
  *) die "INSTALL_WORKER_JSON_TOOL must be python3, jq or none" ;;
esac

# systemctl only on the real system, and only when systemd is the running init.
use_systemd=0
[ "$root_given" = 1 ] || [ ! -d /run/systemd/system ] || use_systemd=1

bin_names=(NodeEngine NetManager)
units=(netmanager.service nodeengine.service)
conf="$prefix/etc/oakestra/conf.json"
netcfg="$prefix/etc/netmanager/netcfg.json"

# --- file helpers (each prints one line: wrote / updated / unchanged ...) ----------------------------------------
# They report through $changed (1 when they changed something) instead of their exit status: a function called as an
# `if` condition runs with `set -e` off, and these must stop the script when a write fails.
changed=0
tmp_file=""
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"; [ -z "$tmp_file" ] || rm -f "$tmp_file"' EXIT

# Puts $src at $dst with $mode, atomically (a temporary file renamed over the old one, so a running binary is never
# written to). Nothing is touched, not even $dst's directory, when $dst already holds the same bytes and mode.
put_file() {
  local src="$1" dst="$2" mode="$3" existed=0
  changed=0
  if [ -f "$dst" ] && [ ! -L "$dst" ] && cmp -s "$src" "$dst"; then
    if [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then item unchanged "$dst"; return; fi
    chmod "$mode" "$dst"
    changed=1
    item "mode $mode" "$dst"
    return
  fi
  if [ -e "$dst" ] || [ -L "$dst" ]; then existed=1; fi
  mkdir -p "$(dirname "$dst")"
  tmp_file="$(mktemp "$(dirname "$dst")/.$(basename "$dst").XXXXXX")"
  cat "$src" >"$tmp_file"
  chmod "$mode" "$tmp_file"
  mv -f "$tmp_file" "$dst"
  tmp_file=""
  changed=1
  if [ "$existed" = 1 ]; then item updated "$dst"; else item wrote "$dst"; fi
}

# put_file for generated text on stdin (staged in a scratch directory outside the install tree).
put_text() {
  local dst="$1" mode="$2"
  cat >"$scratch/text"
  put_file "$scratch/text" "$dst" "$mode"
}

# Sets keys of an existing JSON object file, keeping every other key. Arguments: the file, then triples
# KEY (str|int) VALUE. Prints the new document, or nothing and returns 3 when every key already has its value;
# returns 2 when no tool can edit JSON, 1 when the file is not a JSON object.
json_set() {
  local file="$1" tool="${INSTALL_WORKER_JSON_TOOL:-}"
  shift
  if [ -z "$tool" ]; then
    if command -v python3 >/dev/null && python3 -c 'import json' 2>/dev/null; then tool=python3
    elif command -v jq >/dev/null; then tool=jq
    else tool=none; fi
  fi
  case "$tool" in
    python3)
      python3 - "$file" "$@" <<'EOF'
import json, sys
path, pairs = sys.argv[1], sys.argv[2:]
try:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"{path}: {e}")
if not isinstance(doc, dict):
    sys.exit(f"{path}: not a JSON object")
changed = False
for i in range(0, len(pairs), 3):
    key, kind, value = pairs[i : i + 3]
    value = int(value) if kind == "int" else value
    if doc.get(key) != value or type(doc.get(key)) is not type(value):
        doc[key] = value
        changed = True
if not changed:
    sys.exit(3)
json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
print()
EOF
      ;;
    jq)
      local args=() check="type == \"object\"" set="." i=0
      while [ $# -ge 3 ]; do
        if [ "$2" = int ]; then args+=(--argjson "v$i" "$3"); else args+=(--arg "v$i" "$3"); fi
        check+=" and (.[\"$1\"] == \$v$i)"
        set+=" | .[\"$1\"] = \$v$i"
        i=$((i + 1))
        shift 3
      done
      jq -e 'type == "object"' "$file" >/dev/null 2>&1 || { printf '%s: not a JSON object\n' "$file" >&2; return 1; }
      if jq -e "${args[@]}" "$check" "$file" >/dev/null; then return 3; fi
      jq --indent 2 "${args[@]}" "$set" "$file"
      ;;
    *) return 2 ;;
  esac
}

# Writes a config from stdin when absent; when present, only sets the given keys (triples as for json_set).
put_config() {
  local file="$1" default rc=0 out
  shift
  default="$(cat)"
  if [ ! -e "$file" ]; then
    put_text "$file" 0644 <<<"$default"
    return
  fi
  if [ $# -eq 0 ]; then item unchanged "$file"; return; fi
  # A config that is a symlink (kept in some other place) is edited where it points, the link stays.
  if [ -L "$file" ]; then file="$(readlink -f -- "$file")"; fi
  out="$(json_set "$file" "$@")" || rc=$?
  case "$rc" in
    0) put_text "$file" "$(stat -c %a "$file")" <<<"$out" ;;
    3) item unchanged "$file" ;;
    2)
      item kept "$file"
      warn "neither python3 nor jq is installed, so $file was not edited; set these keys in it yourself:"
      while [ $# -ge 3 ]; do
        if [ "$2" = int ]; then printf '    "%s": %s\n' "$1" "$3" >&2; else printf '    "%s": "%s"\n' "$1" "$3" >&2; fi
        shift 3
      done
      ;;
    *) die "cannot edit $file (not a JSON object?); fix or remove it and run again" ;;
  esac
}

# A symlink $link -> $target (replacing a file or another link there).
put_link() {
  local target="$1" link="$2"
  if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then item unchanged "$link -> $target"; return; fi
  local what=linked
  if [ -e "$link" ] || [ -L "$link" ]; then what=relinked; fi
  mkdir -p "$(dirname "$link")"
  ln -sfn "$target" "$link"
  item "$what" "$link -> $target"
}

put_dir() {
  if [ -d "$1" ]; then item unchanged "$1/"; else mkdir -p "$1"; item created "$1/"; fi
}

remove() {
  if [ -e "$1" ] || [ -L "$1" ]; then rm -rf -- "$1"; item removed "$1"; else item absent "$1"; fi
}

# --- uninstall ---------------------------------------------------------------------------------------------------
if [ "$uninstall" = 1 ]; then
  if [ "$use_systemd" = 1 ]; then
    log "stopping and disabling ${units[*]}"
    for u in nodeengine.service netmanager.service; do
      if [ -e "/etc/systemd/system/$u" ]; then
        systemctl disable --now "$u" || warn "systemctl disable --now $u failed"
      fi
    done
  fi
  log "removing units, binaries and links"
  for u in "${units[@]}"; do remove "$prefix/etc/systemd/system/$u"; done
  [ -e "$prefix/etc/systemd/system/nodeengine.service.d/unikernel.conf" ] \
    && remove "$prefix/etc/systemd/system/nodeengine.service.d/unikernel.conf"
  for b in "${bin_names[@]}"; do
    remove "$prefix/usr/local/bin/$b"
    # /bin/<name> is ours only when it is the link this script made; anything else there is left alone.
    if [ -L "$prefix/bin/$b" ] && [ "$(readlink "$prefix/bin/$b")" = "/usr/local/bin/$b" ]; then
      remove "$prefix/bin/$b"
    elif [ -e "$prefix/bin/$b" ]; then
      item kept "$prefix/bin/$b (not a link made by this script)"
    else
      item absent "$prefix/bin/$b"
    fi
  done
  if [ "$purge" = 1 ]; then
    log "purging configs and logs"
    remove "$prefix/etc/oakestra"
    remove "$prefix/etc/netmanager"
    remove "$prefix/var/log/oakestra"
  else
    printf '\nkept configs and logs (%s, %s, %s); --purge removes them\n' \
      "$conf" "$netcfg" "$prefix/var/log/oakestra"
  fi
  if [ "$use_systemd" = 1 ]; then
    systemctl daemon-reload
    systemctl reset-failed "${units[@]}" 2>/dev/null || true
  fi
  printf '\nuninstalled\n'
  exit 0
fi

# --- 1. packages and toolchain -----------------------------------------------------------------------------------
build=1
[ -z "$bin_dir" ] || build=0

# rustup's stable toolchain into root's home; cargo is then on PATH for the rest of this script.
install_rust() {
  log "installing a Rust toolchain with rustup (stable, minimal profile)"
  "$repo/scripts/rustup.sh" stable
  export PATH="$HOME/.cargo/bin:$PATH"
}

if [ "$no_apt" = 1 ]; then
  log "skipping apt packages and the Rust toolchain (--no-apt${prefix:+, --root})"
else
  if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    die "not a Debian/Ubuntu system: install containerd runc iproute2 iptables nftables yourself and pass --no-apt"
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "apt packages"
  packages=(iproute2 iptables nftables)
  # Docker's containerd.io package bundles runc and conflicts with Debian's containerd and runc: keep whichever is
  # there.
  if command -v containerd >/dev/null \
    || dpkg-query -W -f='${Status}' containerd.io 2>/dev/null | grep -q "install ok installed"; then
    item present "containerd (already installed; not replaced)"
  else
    packages+=(containerd runc)
  fi
  # Building from source: NetManager's eBPF fast path also needs LLVM 22 (for bpf-linker).
  [ "$build" = 0 ] || packages+=(build-essential pkg-config protobuf-compiler curl ca-certificates llvm-22-dev
    libpolly-22-dev libzstd-dev zlib1g-dev binutils)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    item installing "${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${missing[@]}"
  else
    item unchanged "${packages[*]}"
  fi
  if [ "$unikernel" = 1 ]; then
    item checking "QEMU for unikernels (scripts/qemu-install.sh)"
    "$repo/scripts/qemu-install.sh"
  fi
  if [ "$build" = 1 ]; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
    command -v cargo >/dev/null || install_rust
    # The nightly toolchain and bpf-linker that netmanager/build.rs compiles the eBPF programs with.
    if [ "${OAKESTRA_SKIP_EBPF:-0}" != 1 ]; then
      item checking "eBPF toolchain (nightly, rust-src, bpf-linker)"
      "$repo/scripts/ebpf-toolchain.sh" --no-apt
    fi
  fi
fi

# --- 2. binaries -------------------------------------------------------------------------------------------------
if [ "$build" = 1 ]; then
  command -v cargo >/dev/null \
    || die "cargo not found: install Rust (https://rustup.rs), run without --no-apt, or pass --bin-dir"
  log "building NodeEngine and NetManager (release)"
  (cd "$repo" && cargo build --locked --release -p oakestra-worker-agent -p oakestra-netmanager)
  target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$repo/$target" ;; esac
  bin_dir="$target/release"
fi
for b in "${bin_names[@]}"; do
  if [ ! -f "$bin_dir/$b" ] || [ ! -x "$bin_dir/$b" ]; then die "$bin_dir/$b is missing or not executable"; fi
done

# --- 3. install the binaries -------------------------------------------------------------------------------------
log "binaries"
binaries_changed=0
for b in "${bin_names[@]}"; do
  put_file "$bin_dir/$b" "$prefix/usr/local/bin/$b" 0755
  [ "$changed" = 0 ] || binaries_changed=1
  # The reference installs into /bin; the links keep scripts and habits that call /bin/NodeEngine working.
  put_link "/usr/local/bin/$b" "$prefix/bin/$b"
done

# --- 4. systemd units --------------------------------------------------------------------------------------------
log "systemd units"
units_changed=0
# Restart: the reference waits 30 s (RestartSec=30) because its NodeEngine exits whenever the cluster is unreachable.
# Ours retries registration and the broker itself and only exits on a bad configuration or a crash; a crashed
# NodeEngine is back after 1 s, inside the cluster's 3 s lost grace (its MQTT last will starts it), so its instances
# keep running, are adopted and do not move; the NetManager waits 5 s. StartLimitIntervalSec=0: never give up retrying, a
# cluster may be down for hours. KillMode=mixed: SIGTERM to the daemon alone so it stops its workloads and cleans up
# itself; anything left in the unit's cgroup after TimeoutStopSec is killed.
put_text "$prefix/etc/systemd/system/netmanager.service" 0644 <<'EOF'
# Written by oakestra-rs scripts/install-worker.sh; a reinstall overwrites it. Local changes: systemctl edit netmanager
[Unit]
Description=Oakestra NetManager (worker overlay network)
Wants=network-online.target
After=network-online.target
Before=nodeengine.service
StartLimitIntervalSec=0

[Service]
Type=simple
User=root
ExecStart=/usr/local/bin/NetManager --config /etc/netmanager/netcfg.json
# 5 s, not the reference's 30 s: see scripts/install-worker.sh (a worker rejoins soon after its cluster is back).
Restart=always
RestartSec=5
KillMode=mixed
TimeoutStopSec=15

[Install]
WantedBy=multi-user.target
EOF
[ "$changed" = 0 ] || units_changed=1
put_text "$prefix/etc/systemd/system/nodeengine.service" 0644 <<'EOF'
# Written by oakestra-rs scripts/install-worker.sh; a reinstall overwrites it. Local changes: systemctl edit nodeengine
[Unit]
Description=Oakestra NodeEngine (worker agent)
Wants=network-online.target
Wants=containerd.service
After=network-online.target containerd.service netmanager.service
StartLimitIntervalSec=0

[Service]
Type=simple
User=root
# Settings come from /etc/oakestra/conf.json (NodeEngine config ..., or NodeEngine -a <cluster>).
ExecStart=/usr/local/bin/NodeEngine run
# 1 s, not the reference's 30 s: see scripts/install-worker.sh (back within the cluster's lost grace, adopting its instances).
Restart=always
RestartSec=1
KillMode=mixed
TimeoutStopSec=15

[Install]
WantedBy=multi-user.target
EOF
[ "$changed" = 0 ] || units_changed=1
if [ "$unikernel" = 1 ]; then
  put_text "$prefix/etc/systemd/system/nodeengine.service.d/unikernel.conf" 0644 <<'EOF'
# Written by oakestra-rs scripts/install-worker.sh --unikernel: the NodeEngine also runs unikernels (-u=true).
[Service]
Environment=OAKESTRA_UNIKERNEL=true
EOF
fi
[ "$changed" = 0 ] || units_changed=1

# --- 5. directories and configs ----------------------------------------------------------------------------------
log "directories"
put_dir "$prefix/etc/oakestra"
put_dir "$prefix/etc/netmanager"
put_dir "$prefix/var/log/oakestra/apps"

# The worker join token: a secret, so root-only (the NodeEngine reads it from there by default).
[ -z "$join_token" ] || put_text "$prefix/etc/oakestra/join.token" 0600 <<<"$join_token"

log "configs (kept when present)"
conf_keys=() netcfg_keys=()
[ -z "$cluster" ] || { conf_keys+=(cluster_address str "$cluster"); netcfg_keys+=(ClusterUrl str "$cluster"); }
[ -z "$cluster_port" ] || conf_keys+=(cluster_port int "$cluster_port")
# The reference's keys and defaults; the misspelt virutalizaiton_* keys are the on-disk format.
put_config "$conf" "${conf_keys[@]}" <<EOF
{
  "conf_version": "1.0",
  "cluster_address": "${cluster:-0.0.0.0}",
  "cluster_port": ${cluster_port:-10100},
  "cluster_ssl": false,
  "app_logs": "/var/log/oakestra/apps",
  "overlay_network": "default",
  "public_ip": false,
  "overlay_network_port": 0,
  "mqtt_cert_file": "",
  "mqtt_key_file": "",
  "addons": [],
  "virtualizations": [
    {
      "virutalizaiton_name": "containerd",
      "virutalizaiton_runtime": "docker",
      "virutalizaiton_active": true,
      "virutalizaiton_config": []
    }
  ],
  "csi_drivers": []
}
EOF
put_config "$netcfg" "${netcfg_keys[@]}" <<EOF
{
  "NodePublicAddress": "0.0.0.0",
  "NodePublicPort": "50103",
  "ClusterUrl": "${cluster:-0.0.0.0}",
  "ClusterMqttPort": "10003"
}
EOF

# --- 6. services -------------------------------------------------------------------------------------------------
if [ "$use_systemd" = 1 ]; then
  log "systemd"
  if [ "$units_changed" = 1 ]; then systemctl daemon-reload; item reloaded "systemd units"; fi
  if systemctl is-enabled --quiet containerd.service 2>/dev/null && systemctl is-active --quiet containerd.service; then
    item unchanged "containerd.service (enabled, running)"
  elif systemctl enable --now containerd.service; then
    item started "containerd.service"
  else
    warn "could not enable and start containerd.service; NodeEngine needs containerd running"
  fi
  if [ "$start" = 1 ]; then
    for u in "${units[@]}"; do
      if systemctl is-active --quiet "$u"; then
        if [ "$binaries_changed" = 1 ] || [ "$units_changed" = 1 ]; then systemctl restart "$u"; item restarted "$u"
        else item unchanged "$u (running)"; fi
      else
        systemctl enable --now "$u"; item started "$u"
      fi
    done
  elif [ "$binaries_changed" = 1 ] && systemctl is-active --quiet nodeengine.service; then
    warn "nodeengine runs the previous binary: systemctl restart netmanager nodeengine"
  fi
elif [ "$root_given" = 0 ]; then
  warn "systemd is not running here: units written but not loaded; start the daemons yourself"
fi

# --- next steps --------------------------------------------------------------------------------------------------
if [ "$root_given" = 1 ]; then
  printf '\ninstalled into %s\n' "$prefix"
elif [ "$start" = 1 ]; then
  printf '\nworker started; logs: journalctl -u nodeengine -u netmanager -f\n'
else
  cat <<EOF

Installed. Next steps:
  - point the worker at its cluster, if not done with --cluster: NodeEngine -a <cluster address>
    (or edit cluster_address in /etc/oakestra/conf.json and ClusterUrl in /etc/netmanager/netcfg.json)
  - start it:  systemctl start nodeengine   (enable it to start at boot: systemctl enable nodeengine netmanager)
  - logs:      journalctl -u nodeengine -u netmanager -f
EOF
fi
