#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing (apt packages, rustup components,
# bpf-linker), then runs rustfmt, clippy, every test, and checks the eBPF object NetManager's build.rs embeds.
#   ./scripts/test.sh            everything (what CI runs through .ci/run)
#   OAKESTRA_SKIP_EBPF=1 ./scripts/test.sh   skip the eBPF toolchain; NetManager is built without its fast path and
#                                            the eBPF dataplane tests fail (they need it): for a quick local run only
# Idempotent; with everything installed and built it only re-runs the checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s  [%s]\n' "$*" "$(date +%T)"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi; }

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SKIP_EBPF="${OAKESTRA_SKIP_EBPF:-0}"

# --- system packages -------------------------------------------------------------------------------------------
# gcc/libc6-dev: C code in -sys crates; pkg-config: crate build scripts; the llvm-22 set: bpf-linker (eBPF);
# mosquitto: the cluster-service broker tests run a real Mosquitto as the external broker (they fail without it);
# docker-registry, skopeo, busybox-static: the worker-agent registry tests push a busybox image built by
# scripts/testbed/mk-oci-image.sh to a local registry (they fail without them);
# containerd, runc: the NodeEngine tests start a private containerd (own socket and root) and run real containers;
# protobuf-compiler: containerd-client's build script compiles containerd's protos with protoc;
# nftables: NetManager's host rules (`nft`); iproute2: the netns testbed; iperf3, sockperf: the overlay bench;
# nginx, curl, python3: the 1-DOC test builds the example images (scripts/images/build.sh) and runs scripts/1doc.sh;
# busybox-static also goes into the sample addon images (scripts/images/addons.sh); python3-venv: the oak-cli test
# installs oak-cli from PyPI into a virtualenv of its own; chromium, chromium-driver: the browser test drives a
# headless Chromium through chromedriver; prometheus: the 1-DOC test runs with OAK_MONITORING=1 (1doc.sh starts
# Prometheus inside the test's network namespace).
packages=(gcc libc6-dev pkg-config mosquitto docker-registry skopeo busybox-static containerd runc protobuf-compiler
  nftables iproute2 iperf3 sockperf nginx curl python3 python3-venv chromium chromium-driver prometheus)
# The eBPF build (netmanager/build.rs): LLVM 22 for bpf-linker (scripts/ebpf-toolchain.sh does the rest).
[ "$SKIP_EBPF" = 1 ] || packages+=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev binutils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  # A policy-rc.d keeps Debian's packages (nginx, mosquitto, prometheus, ...) from starting daemons on the host.
  policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod 0755 "$policy" && own_policy=1
  fi
  as_root apt-get -o DPkg::Lock::Timeout=900 update -qq
  as_root apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}"
  [ "$own_policy" = 0 ] || as_root rm -f "$policy"
  # Debian enables prometheus.service (0.0.0.0:9090, no authentication) for the next boot; the tests run their own.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
# docker.io: the addons tests start their own dockerd inside a network namespace of theirs (tests/src/docker.rs).
# Installed with a policy-rc.d that keeps Debian's package from starting a daemon (and a docker0 bridge) on the host.
if ! dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q "install ok installed"; then
  log "installing docker.io (not started on the host)"
  policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod 0755 "$policy" && own_policy=1
  fi
  as_root apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends docker.io \
    || { as_root apt-get -o DPkg::Lock::Timeout=900 update -qq; as_root apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends docker.io; }
  if [ "$own_policy" = 1 ]; then as_root rm -f "$policy"; fi
fi

# --- Rust toolchains ---------------------------------------------------------------------------------------------
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  log "installing a Rust toolchain with rustup (stable, minimal profile)"
  command -v curl >/dev/null || as_root apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends curl ca-certificates
  ./scripts/rustup.sh stable
  export PATH="$HOME/.cargo/bin:$PATH"
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || { log "adding rustup component $c"; rustup component add "$c"; }
done
if [ "$SKIP_EBPF" != 1 ]; then
  ./scripts/ebpf-toolchain.sh --no-apt
fi
# QEMU (qemu-system-x86 from bookworm-backports on Debian 12), cpio: the unikernel tests boot real guests, and
# scripts/images/unikernel.sh packs the test guest (a Debian kernel fetched with apt-get download, cached).
as_root ./scripts/qemu-install.sh
# The kernel package is fetched here, on the host: the tests build the guest inside network namespaces without a
# route to the mirror (then from the cache).
as_root ./scripts/images/unikernel.sh >/dev/null

# --- checks ------------------------------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --locked --workspace --all-targets -- -D warnings

log "building the binaries (the cross-binary tests run them)"
cargo build --locked --bins

log "cargo test"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
set +e
cargo test --locked 2>&1 | tee "$test_log"
test_status=${PIPESTATUS[0]}
set -e
# cargo prints one `test result:` line per test binary; add them up for one closing line.
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$test_log")
if [ "$test_status" -ne 0 ]; then
  printf '\ntests: %d passed, %d failed\n' "$passed" "$failed"
  die "cargo test failed"
fi

if [ "$SKIP_EBPF" != 1 ]; then
  log "checking the eBPF object NetManager embeds (built by netmanager/build.rs)"
  obj=$(ls -t "${CARGO_TARGET_DIR:-target}"/debug/build/oakestra-netmanager-*/out/oakestra-tc 2>/dev/null | head -1)
  [ -n "$obj" ] && [ -s "$obj" ] || die "no eBPF object under ${CARGO_TARGET_DIR:-target}/debug/build/oakestra-netmanager-*/out"
  # Both classifiers and every map; a build that silently produced an empty or partial object fails here.
  syms=$(readelf -sW "$obj")
  for s in oakestra_from_container oakestra_from_underlay FLOWS LOCALS CONFIG STATS; do
    grep -qw "$s" <<<"$syms" || die "eBPF object $obj lacks symbol $s"
  done
  echo "eBPF object ok: $obj ($(stat -c %s "$obj") bytes)"
fi

log "all checks passed"
printf 'tests: %d passed, %d failed\n' "$passed" "$failed"
