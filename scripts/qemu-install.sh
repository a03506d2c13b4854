#!/usr/bin/env bash
# Installs what the worker's unikernel runtime and scripts/images/unikernel.sh need: QEMU's system emulator
# (qemu-system-x86_64 on amd64, qemu-system-aarch64 on arm64, best effort), busybox-static, cpio, xz-utils and zstd
# (to unpack compressed kernel modules). Idempotent: with everything present it only checks (no apt-get update).
# Run as root (apt). Prints the QEMU version at the end.
#   scripts/qemu-install.sh [--no-apt]
#     --no-apt  only check; fail listing what is missing
#
# Debian 12 (bookworm) trap: a machine may carry qemu-utils 10.x from bookworm-backports, which Breaks
# qemu-system-common (<< 8.0), so a plain `apt-get install qemu-system-x86` (7.2) would remove qemu-img. On bookworm
# the emulator therefore comes from bookworm-backports (10.x); if no apt source names bookworm-backports yet, this
# adds /etc/apt/sources.list.d/bookworm-backports.sources pointing at the mirror of the existing debian.sources.
# Other releases use their own suite. Guests run under TCG (`-accel tcg`): on hosts whose /dev/kvm is PVM-only a
# stock Debian kernel hangs under KVM.
set -euo pipefail
no_apt=0
for a in "$@"; do
  case "$a" in
    --no-apt) no_apt=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) printf 'error: unknown argument %s\n' "$a" >&2; exit 2 ;;
  esac
done
log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
APT=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900)

arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "$arch" in
  amd64|x86_64) qemu_pkg=qemu-system-x86; qemu_bin=qemu-system-x86_64 ;;
  arm64|aarch64) qemu_pkg=qemu-system-arm; qemu_bin=qemu-system-aarch64 ;;
  *) die "unsupported architecture $arch (amd64 and arm64 are)" ;;
esac
codename=$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# the emulator counts as present when its binary runs, whatever package brought it (the Debian packages depend on
# the firmware it needs: seabios, ipxe-qemu for virtio-net's option ROM)
need_qemu=0
command -v "$qemu_bin" >/dev/null && "$qemu_bin" --version >/dev/null 2>&1 || need_qemu=1
missing=()
for p in busybox-static cpio xz-utils zstd; do installed "$p" || missing+=("$p"); done

if [ "$need_qemu" = 0 ] && [ ${#missing[@]} = 0 ]; then
  :
elif [ "$no_apt" = 1 ]; then
  [ "$need_qemu" = 1 ] && missing=("$qemu_pkg" "${missing[@]}")
  die "missing: ${missing[*]} (run scripts/qemu-install.sh as root without --no-apt)"
else
  [ "$(id -u)" = 0 ] || die "run as root to install: ${missing[*]} $([ "$need_qemu" = 1 ] && echo "$qemu_pkg")"
  qemu_target=()
  if [ "$need_qemu" = 1 ] && [ "$codename" = bookworm ]; then
    qemu_target=(-t bookworm-backports)
    has_bpo=0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      grep -v '^[[:space:]]*#' "$f" | grep -q 'bookworm-backports' && { has_bpo=1; break; }
    done
    if [ "$has_bpo" = 0 ]; then
      uri=""
      [ -f /etc/apt/sources.list.d/debian.sources ] &&
        uri=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources | awk '{print $1; exit}')
      [ -n "$uri" ] || [ ! -f /etc/apt/sources.list ] ||
        uri=$(awk '$1=="deb" && $0 ~ / bookworm / {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
      uri=${uri:-http://deb.debian.org/debian}
      log "adding bookworm-backports ($uri) as /etc/apt/sources.list.d/bookworm-backports.sources"
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uri" > /etc/apt/sources.list.d/bookworm-backports.sources
    fi
  fi
  log "apt-get update"
  "${APT[@]}" update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ "$need_qemu" = 1 ]; then
    log "installing $qemu_pkg ${qemu_target[*]}"
    if ! "${APT[@]}" install -y -qq --no-install-recommends "${qemu_target[@]}" "$qemu_pkg" >/dev/null; then
      [ "$qemu_pkg" = qemu-system-arm ] || die "installing $qemu_pkg failed"
      printf 'warning: installing %s failed (arm64 support is best effort)\n' "$qemu_pkg" >&2
    fi
  fi
fi

command -v "$qemu_bin" >/dev/null || die "$qemu_bin is still missing"
log "$("$qemu_bin" --version | head -1)"
