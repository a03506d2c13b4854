#!/usr/bin/env bash
# The README's command one on a fresh Debian 12, by hand (not part of CI: it downloads packages, a toolchain and
# crates, and builds for several minutes). debootstrap makes a minimal bookworm in DIR; a clone of this repository
# (HEAD) goes to /root/oakestra-rs in it; then, chrooted:
#   1. scripts/1doc.sh install   on the host's network (downloads only: apt, rustup, crates; no interface is made);
#   2. scripts/1doc.sh up, status, example, down, and up + down again, inside a network namespace of its own, so
#      everything the 1-DOC creates stays there; what is left in it at the end is listed.
# Usage: scripts/testbed/fresh-debian.sh [DIR]   (default /var/tmp/oakestra-fresh; kept for a faster re-run: the
#        chroot's packages, toolchain and build are reused, its 1-DOC data is not). Remove DIR afterwards by hand.
# Needs root, debootstrap, and the host's apt sources (/etc/apt/sources.list.d/debian.sources); the host's extra CA
# certificates (/usr/local/share/ca-certificates) are copied in, as a machine behind the same proxy would have them.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
R=$(mkdir -p "${1:-/var/tmp/oakestra-fresh}" && cd "${1:-/var/tmp/oakestra-fresh}" && pwd)/root
ns=oakfresh$$
log() { printf '\n=== %s [%s]\n' "$*" "$(date +%T)"; }
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

chrooted() { chroot "$R" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }
in_ns() { nsenter --net="/run/netns/$ns" -- chroot "$R" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }
cleanup() {
  if [ -e "/run/netns/$ns" ]; then
    in_ns /root/oakestra-rs/scripts/1doc.sh down >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
  fi
  umount -R "$R" 2>/dev/null || true
}
trap cleanup EXIT

if [ ! -x "$R/bin/bash" ]; then
  log "debootstrap bookworm (minbase) into $R"
  mkdir -p "$R"
  debootstrap --variant=minbase bookworm "$R" http://deb.debian.org/debian >"$R.debootstrap.log" 2>&1 \
    || { tail -20 "$R.debootstrap.log"; exit 1; }
fi
cp /etc/apt/sources.list.d/debian.sources "$R/etc/apt/sources.list.d/debian.sources"
rm -f "$R/etc/apt/sources.list"
cp /etc/resolv.conf "$R/etc/resolv.conf"
mkdir -p "$R/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
if [ -x "$R/usr/sbin/update-ca-certificates" ]; then chrooted update-ca-certificates >/dev/null 2>&1 || true; fi
if [ -d "$R/root/oakestra-rs/.git" ]; then
  git -C "$R/root/oakestra-rs" fetch -q "$repo" HEAD
  git -C "$R/root/oakestra-rs" reset -q --hard FETCH_HEAD
else
  git clone -q "$repo" "$R/root/oakestra-rs"
fi
rm -rf "$R/var/lib/oakestra-rs"
# runc needs the root of the container host to be a mount point, as it is on a real machine.
mountpoint -q "$R" || mount --bind "$R" "$R"
mountpoint -q "$R/proc" || mount -t proc proc "$R/proc"
mountpoint -q "$R/sys" || mount --rbind /sys "$R/sys"
mountpoint -q "$R/dev" || mount --rbind /dev "$R/dev"

log "before: $(chrooted sh -c 'command -v cargo || echo no cargo'), $(chrooted sh -c 'command -v containerd || echo no containerd')"
log "1doc.sh install"
time chrooted /root/oakestra-rs/scripts/1doc.sh install

ip netns add "$ns"
ip -n "$ns" link set lo up
log "1doc.sh up (in netns $ns, loopback only)"
time in_ns /root/oakestra-rs/scripts/1doc.sh up
log "1doc.sh status"
in_ns /root/oakestra-rs/scripts/1doc.sh status
log "1doc.sh example"
in_ns /root/oakestra-rs/scripts/1doc.sh example
log "1doc.sh down"
in_ns /root/oakestra-rs/scripts/1doc.sh down
log "up and down again"
in_ns /root/oakestra-rs/scripts/1doc.sh up | tail -4
in_ns /root/oakestra-rs/scripts/1doc.sh down
log "left in netns $ns (only lo expected; no nftables table)"
ip -n "$ns" -o link | cut -d' ' -f2
ip netns exec "$ns" nft list tables
log "fresh Debian 12: 1-DOC install, up, example, down all passed"
