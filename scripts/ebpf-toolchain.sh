#!/usr/bin/env bash
# Installs what building NetManager's eBPF fast path needs (netmanager/build.rs compiles ebpf/programs for
# bpfel-unknown-none): Debian's LLVM 22 development files, rustup's nightly toolchain with rust-src, and bpf-linker
# built against LLVM 22. Idempotent: with everything present it only checks. Run as root (apt); needs rustup.
# Used by scripts/test.sh, scripts/1doc.sh and scripts/install-worker.sh.
#   scripts/ebpf-toolchain.sh [--no-apt]
set -euo pipefail
no_apt=0
[ "${1:-}" = --no-apt ] && no_apt=1
log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if [ "$no_apt" = 0 ]; then
  packages=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev binutils)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages for the eBPF build: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
command -v rustup >/dev/null || die "rustup is needed (scripts/rustup.sh installs it)"
rustup toolchain list | grep -q '^nightly' \
  || { log "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal; }
rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' \
  || { log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly; }
if ! command -v bpf-linker >/dev/null; then
  [ -x /usr/lib/llvm-22/bin/llvm-config ] || die "LLVM 22 is missing (apt-get install llvm-22-dev libpolly-22-dev)"
  log "building bpf-linker against LLVM 22 (a few minutes, once)"
  PATH="/usr/lib/llvm-22/bin:$PATH" LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22
fi
