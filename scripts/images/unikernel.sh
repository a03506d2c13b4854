#!/usr/bin/env bash
# Builds the test guest for the worker's unikernel runtime: a tiny Linux VM (Debian kernel + busybox initramfs)
# packed like Oakestra's reference unikernel tarballs, i.e. a .tar.gz with, at the top level,
#   kernel          the kernel image given to `qemu-system-x86_64 -kernel`
#   initramfs.cpio  newc cpio (gzip-compressed content; QEMU's -initrd and the kernel take both)
#   files1/         the directory NodeEngine shares into the guest over 9p (mount tag fs0);
#                   here files1/index.html = "hello from the oakestra test guest"
#
# Usage: scripts/images/unikernel.sh [--out DIR] [--bzimage] [--force]
#   --out DIR    where to write (default: target/guest-images under the repository root)
#   --bzimage    ship Debian's compressed vmlinuz as `kernel` (8 MB smaller tarball, ~4 s slower boot under TCG)
#   --force      rebuild even if the inputs are unchanged
# Output: DIR/oakestra-guest-amd64.tar.gz (+ .sha256); the sha256 is printed too. Deterministic for given inputs
# (sorted tar, owner 0, mtime $SOURCE_DATE_EPOCH or 0, gzip -n). With unchanged inputs (this script, /bin/busybox,
# kernel package, options) the existing tarball is kept. Needs busybox-static, dpkg-deb, xz-utils and zstd (all
# from scripts/qemu-install.sh); as root it installs a missing busybox-static itself.
#
# Kernel. Default: the current Debian *generic* kernel (the package linux-image-amd64 depends on, e.g.
# linux-image-6.1.0-57-amd64), fetched once with `apt-get download` and cached with the extracted pieces under
# ${OAKESTRA_GUEST_CACHE:-/var/cache/oakestra-rs/guest} (~/.cache/oakestra-rs/guest for non-root), so rebuilds
# work offline. Override the package with OAKESTRA_GUEST_KERNEL_PKG=linux-image-<version>-<flavour>.
#   Why not linux-image-*-cloud-amd64: Debian's cloud kernels (6.1 and 6.12) are built without 9P
#   (`# CONFIG_NET_9P is not set`), so they cannot mount files1. The generic kernel has the 9p modules, but its
#   vmlinuz is XZ-compressed and decompressing it under TCG costs ~4 s; so by default `kernel` is the decompressed
#   ELF vmlinux (CONFIG_PVH=y, so QEMU boots it directly through its PVH entry note), which boots as fast as the
#   LZ4 cloud kernel (~2.5 s to a shell). A cloud kernel given via OAKESTRA_GUEST_KERNEL_PKG still works, without 9p.
#   Modules (insmod-ed in this order; dependencies found from each .ko's `depends=`, compressed .ko.xz/.ko.zst
#   unpacked at build time, built-in ones skipped): virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev
#   virtio virtio_pci failover net_failover virtio_net, then for 9p: 9pnet 9pnet_virtio netfs fscache 9p.
#
# Boot contract (what NodeEngine runs; TCG because /dev/kvm may be PVM-only):
#   qemu-system-x86_64 -accel tcg -m 128 -smp 1 -display none -no-reboot -nodefaults -no-user-config \
#     -serial file:LOG -kernel kernel -initrd initramfs.cpio \
#     -netdev tap,id=tap0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=tap0,mac=02:4f:0a:12:00:02 \
#     [-fsdev local,security_model=passthrough,id=hvirtio0,path=FILES1,readonly=on \
#      -device virtio-9p-pci,fsdev=hvirtio0,mount_tag=fs0] \
#     -append "console=ttyS0 netdev.ipv4_addr=A netdev.ipv4_gw_addr=G netdev.ipv4_subnet_mask=M
#              [netdev.ipv6_addr=A6 netdev.ipv6_gw_addr=G6 netdev.ipv6_prefix_len=P] [-- CMD ARGS...]"
# The guest's /init (busybox sh) then, printing these markers on the serial console:
#   oakestra-guest: up                               proc/sys/devtmpfs mounted, applets installed
#   (loads the modules, lo + eth0 up right after virtio_net; DAD off on eth0 (accept_dad=0; busybox ip has no
#    `nodad`); IPv4 address/prefix from the mask, default route via G; with IPv6: A6/P, default route via G6)
#   oakestra-guest: net ipv4=A ipv6=A6               ("none" for a missing address; printed once eth0's
#                                                     operstate is up, at most 5 s after configuring it)
#   (mounts 9p tag fs0 on /files if present; /www/index.html = /files/index.html, or the built-in text, followed
#    by a line "guest A"; busybox httpd on port 80, IPv4 and IPv6)
#   oakestra-guest: serving http on :80
#   with CMD: runs it (stdin /dev/null, output on the console), prints `oakestra-guest: command exited RC` and
#   powers off (qemu exits, thanks to -no-reboot); without CMD: idles forever (PID 1 never exits).
#   CMD is split by the kernel: words are separated by spaces, double quotes group (`-- sh -c "echo a; exit 3"`).
# Helper in the guest: `fetch URL [TRIES]` retries `timeout 2 wget -q -O - URL` once a second up to TRIES (60)
# times; prints `oakestra-guest: fetched <body on one line>` (rc 0) or `oakestra-guest: fetch failed URL` (rc 1).
# (Not `wget -T 2`: Debian's busybox before 1.36.1-5 is built without FEATURE_WGET_TIMEOUT and segfaults on -T.)
# E.g. `-- fetch http://[fdff:2000::5]/` makes a one-shot guest that fetches a page and stops.
set -euo pipefail
log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out="" bzimage=0 force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
    --bzimage) bzimage=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
out=${out:-$root/target/guest-images}
if [ -n "${OAKESTRA_GUEST_CACHE:-}" ]; then cache=$OAKESTRA_GUEST_CACHE
elif [ "$(id -u)" = 0 ]; then cache=/var/cache/oakestra-rs/guest
else cache=${XDG_CACHE_HOME:-$HOME/.cache}/oakestra-rs/guest
fi
epoch=${SOURCE_DATE_EPOCH:-0}
name=oakestra-guest-amd64
required_mods="virtio_pci virtio_net"
optional_mods="9pnet_virtio 9p"   # 9p support for files1; absent from cloud kernels

# ---- tools ----------------------------------------------------------------------------------------------------
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  [ "$(id -u)" = 0 ] || die "busybox-static is missing (run scripts/qemu-install.sh as root)"
  log "installing busybox-static"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq busybox-static >/dev/null
fi
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -1)
[ -x "$busybox" ] || die "busybox-static installs no /bin/busybox?"
for t in dpkg-deb tar gzip sha256sum; do command -v "$t" >/dev/null || die "$t is missing"; done

# ---- kernel package (cached .deb; apt only when the wanted one is not cached) --------------------------------
mkdir -p "$cache/debs"
# one build at a time per cache (tests may run this concurrently with different --out directories)
if command -v flock >/dev/null; then exec 9> "$cache/.lock"; flock 9; fi
newest_cached() {  # offline fallback: the newest cached generic kernel, else any cached kernel
  { ls -1t "$cache"/debs/linux-image-*_amd64.deb 2>/dev/null | grep -vE -- '-(cloud|rt)-amd64_' || true
    ls -1t "$cache"/debs/linux-image-*_amd64.deb 2>/dev/null || true; } | head -1
}
kpkg=${OAKESTRA_GUEST_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}' || true)
fi
deb=""
if [ -n "$kpkg" ]; then
  deb=$(ls -1t "$cache/debs/${kpkg}"_*_amd64.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    log "downloading $kpkg (once; cached in $cache/debs)"
    dl=$(mktemp -d "$cache/debs/.dl.XXXXXX")
    chmod 0755 "$dl"
    if (cd "$dl" && apt-get -q download "$kpkg" 2>&1 | { grep -v 'unsandboxed' || true; } >&2) &&
       ls "$dl"/*.deb >/dev/null 2>&1; then
      mv "$dl"/*.deb "$cache/debs/"
      deb=$(ls -1t "$cache/debs/${kpkg}"_*_amd64.deb | head -1)
    fi
    rm -rf "$dl"
  fi
fi
if [ -z "$deb" ]; then
  [ -z "${OAKESTRA_GUEST_KERNEL_PKG:-}" ] || die "cannot get $OAKESTRA_GUEST_KERNEL_PKG"
  deb=$(newest_cached || true)
  [ -n "$deb" ] || die "no kernel package: apt-get download ${kpkg:-linux-image-<version>-amd64} failed and $cache/debs is empty"
  warn "using the cached $(basename "$deb")"
fi
kpkg=$(dpkg-deb -f "$deb" Package)
kv=${kpkg#linux-image-}

# ---- up to date? ------------------------------------------------------------------------------------------------
tarball=$out/$name.tar.gz
inputs=$( { sha256sum "${BASH_SOURCE[0]}" "$busybox" | cut -d' ' -f1; basename "$deb"; echo "bzimage=$bzimage epoch=$epoch"; } | sha256sum | cut -d' ' -f1)
stamp=$out/.$name.inputs
if [ "$force" = 0 ] && [ -f "$tarball" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  log "$tarball is up to date (kernel $kv)"
  (cd "$out" && sha256sum "$name.tar.gz")
  exit 0
fi

# ---- kernel + modules, extracted once per kernel into the cache ---------------------------------------------
kc=$cache/$kv
declare -A kopath=() builtin=() seen=()
order=()
moddeps() {  # the depends= field of a .ko (modinfo if present, else the .modinfo strings)
  local d
  if command -v modinfo >/dev/null; then d=$(modinfo -F depends "$1" 2>/dev/null || true)
  else d=$(tr '\0' '\n' < "$1" | sed -n 's/^depends=//p' | head -1)
  fi
  printf '%s\n' "${d//,/ }"
}
resolve() {  # resolve NAME: add NAME's dependencies, then NAME, to order (post-order = insmod order)
  local m=${1//-/_} src dst dep
  [ -z "${seen[$m]:-}" ] || return 0
  seen[$m]=1
  [ -z "${builtin[$m]:-}" ] || return 0
  src=${kopath[$m]:-}
  [ -n "$src" ] || return 1
  dst=$kc.tmp/modules/$m.ko
  # (called in `resolve ... || ...` lists, where set -e is off: check each step)
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -q -dc "$src" > "$dst" ;;
    *.ko.gz) gzip -dc "$src" > "$dst" ;;
    *) false ;;
  esac || die "cannot unpack $src"
  for dep in $(moddeps "$dst"); do resolve "$dep" || die "$m needs $dep, which $kpkg does not have"; done
  order+=("$m")
}
if [ ! -f "$kc/.complete" ]; then
  log "extracting $kv from $(basename "$deb")"
  rm -rf "$kc.tmp" && mkdir -p "$kc.tmp/x" "$kc.tmp/modules"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kc.tmp/x" --wildcards "./boot/vmlinuz-$kv" "./boot/config-$kv" "./lib/modules/$kv/*"
  mdir=$kc.tmp/x/lib/modules/$kv
  while IFS= read -r f; do b=${f##*/}; b=${b%%.ko*}; kopath[${b//-/_}]=$f; done < <(find "$mdir" -name '*.ko*')
  while IFS= read -r f; do b=${f##*/}; b=${b%%.ko*}; builtin[${b//-/_}]=1; done < "$mdir/modules.builtin"
  for m in $required_mods; do resolve "$m" || die "$kpkg has no module $m"; done
  for m in $optional_mods; do resolve "$m" || warn "$kpkg has no $m module: the guest cannot mount files1 (9p)"; done
  printf '%s\n' "${order[@]}" > "$kc.tmp/modules.order"
  cp "$kc.tmp/x/boot/vmlinuz-$kv" "$kc.tmp/vmlinuz"
  cp "$kc.tmp/x/boot/config-$kv" "$kc.tmp/config"
  # the ELF vmlinux inside the bzImage, for PVH boot: try each xz/zstd/gzip magic until an ELF comes out
  if grep -q '^CONFIG_PVH=y' "$kc.tmp/config"; then
    for fmt in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
      for off in $(LC_ALL=C grep -aobUP "${fmt#*:}" "$kc.tmp/vmlinuz" | cut -d: -f1); do
        case ${fmt%%:*} in
          xz) tail -c +$((off + 1)) "$kc.tmp/vmlinuz" | xz -dcq > "$kc.tmp/vmlinux" 2>/dev/null || true ;;
          zstd) tail -c +$((off + 1)) "$kc.tmp/vmlinuz" | zstd -dcq > "$kc.tmp/vmlinux" 2>/dev/null || true ;;
          gzip) tail -c +$((off + 1)) "$kc.tmp/vmlinuz" | gzip -dcq > "$kc.tmp/vmlinux" 2>/dev/null || true ;;
        esac
        [ "$(head -c 4 "$kc.tmp/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && break 2
        rm -f "$kc.tmp/vmlinux"
      done
    done
  fi
  [ -f "$kc.tmp/vmlinux" ] || warn "could not unpack an ELF vmlinux from vmlinuz-$kv; shipping the bzImage"
  rm -rf "$kc.tmp/x" "$kc"
  touch "$kc.tmp/.complete"
  mv "$kc.tmp" "$kc"
fi
mapfile -t order < "$kc/modules.order"

# ---- initramfs --------------------------------------------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
r=$work/root
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,files,www,lib/modules}
cp "$busybox" "$r/bin/busybox"
cp "$kc"/modules/*.ko "$r/lib/modules/" 2>/dev/null || true
cp "$kc/modules.order" "$r/lib/modules/order"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$r/etc/hosts"
printf 'root:x:0:0:root:/:/bin/sh\n' > "$r/etc/passwd"
printf 'root:x:0:\n' > "$r/etc/group"
printf 'hello from the oakestra test guest\n' > "$r/etc/default-index.html"

cat > "$r/init" <<'EOF'
#!/bin/busybox sh
# /init of the oakestra-rs test guest (made by scripts/images/unikernel.sh, which documents the contract).
# Arguments after `--` on the kernel command line arrive here as "$@". PID 1: must never exit.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s
echo "oakestra-guest: up"
echo "oakestra-guest: kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s"
hostname oakestra-guest

link_up() {  # lo and eth0 up as early as possible: eth0 turns operational only ~1 s later (linkwatch)
  [ -z "$linked" ] || return 0
  linked=1
  ip link set lo up
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  [ -e /sys/class/net/eth0 ] || return 0
  echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
  ip link set eth0 up
}
linked=
echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad 2>/dev/null
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || echo "oakestra-guest: insmod $m failed"
  [ "$m" = virtio_net ] && link_up
done
link_up

ip4= gw4= mask= ip6= gw6= plen=
set -f
for w in $(cat /proc/cmdline); do
  case "$w" in
    --) break ;;
    netdev.ipv4_addr=*) ip4=${w#*=} ;;
    netdev.ipv4_gw_addr=*) gw4=${w#*=} ;;
    netdev.ipv4_subnet_mask=*) mask=${w#*=} ;;
    netdev.ipv6_addr=*) ip6=${w#*=} ;;
    netdev.ipv6_gw_addr=*) gw6=${w#*=} ;;
    netdev.ipv6_prefix_len=*) plen=${w#*=} ;;
  esac
done
set +f

prefix_of() {  # 255.255.255.192 -> 26 (a plain number passes through)
  case "$1" in *.*) ;; *) echo "$1"; return ;; esac
  local IFS=. n=0 o
  for o in $1; do
    case "$o" in
      255) n=$((n + 8)) ;; 254) n=$((n + 7)) ;; 252) n=$((n + 6)) ;; 248) n=$((n + 5)) ;;
      240) n=$((n + 4)) ;; 224) n=$((n + 3)) ;; 192) n=$((n + 2)) ;; 128) n=$((n + 1)) ;;
    esac
  done
  echo "$n"
}

if [ -e /sys/class/net/eth0 ]; then
  if [ -n "$ip4" ]; then
    ip addr add "$ip4/$(prefix_of "${mask:-255.255.255.0}")" dev eth0
    [ -n "$gw4" ] && ip route add default via "$gw4" dev eth0
  fi
  if [ -n "$ip6" ]; then
    # busybox ip rejects `nodad` (iproute2 syntax); accept_dad=0 above already makes the address usable at once
    ip -6 addr add "$ip6/${plen:-64}" dev eth0 nodad 2>/dev/null || ip -6 addr add "$ip6/${plen:-64}" dev eth0
    [ -n "$gw6" ] && ip -6 route add default via "$gw6" dev eth0
  fi
else
  echo "oakestra-guest: no eth0"
fi

files=0
mount -t 9p -o trans=virtio,version=9p2000.L fs0 /files 2>/dev/null && files=1
# eth0 has carrier soon after `ip link set up`, but the kernel's linkwatch marks it operational (IFF_RUNNING,
# IPv6 "link becomes ready") up to ~1 s later; answering only from then on avoids an early IPv6 request from
# the host getting no neighbour advertisement (seen in ~1 of 15 boots before this wait)
i=0
while [ -e /sys/class/net/eth0 ] && [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 50 ]; do
  sleep 0.1; i=$((i + 1))
done
echo "oakestra-guest: net ipv4=${ip4:-none} ipv6=${ip6:-none}"

if [ $files = 1 ] && [ -f /files/index.html ]; then
  echo "oakestra-guest: 9p fs0 mounted on /files"
  cat /files/index.html > /www/index.html
else
  [ $files = 1 ] && echo "oakestra-guest: 9p fs0 mounted on /files (no index.html)"
  cat /etc/default-index.html > /www/index.html
fi
[ -n "$(tail -c 1 /www/index.html)" ] && echo >> /www/index.html
echo "guest ${ip4:-none}" >> /www/index.html
# without -f, busybox httpd binds before it daemonizes: listening once it returns. Port only = [::]:80, v4 + v6.
if httpd -p 80 -h /www; then
  echo "oakestra-guest: serving http on :80"
else
  echo "oakestra-guest: httpd failed"
fi

if [ $# -gt 0 ]; then
  "$@" < /dev/null
  rc=$?
  echo "oakestra-guest: command exited $rc"
  sync
  poweroff -f
fi
while :; do sleep 3600; done
EOF

cat > "$r/bin/fetch" <<'EOF'
#!/bin/sh
# fetch URL [TRIES]: GET URL with `wget -q -O -` (2 s timeout), retrying once a second up to TRIES (default 60)
# times. busybox's own `wget -T` segfaults in Debian's build (no FEATURE_WGET_TIMEOUT), hence `timeout 2`.
url=${1:-} tries=${2:-60} i=0
[ -n "$url" ] || { echo "usage: fetch URL [TRIES]" >&2; exit 2; }
while [ "$i" -lt "$tries" ]; do
  if body=$(timeout 2 wget -q -O - "$url" 2>/dev/null); then
    echo "oakestra-guest: fetched $(printf '%s' "$body" | tr '\r\n' '  ')"
    exit 0
  fi
  i=$((i + 1))
  [ "$i" -lt "$tries" ] && sleep 1
done
echo "oakestra-guest: fetch failed $url"
exit 1
EOF
chmod 0755 "$r/init" "$r/bin/fetch" "$r/bin/busybox"
chmod 0644 "$r"/lib/modules/* "$r"/etc/*
chmod 1777 "$r/tmp"

stage=$work/stage
mkdir -p "$stage/files1"
find "$r" -exec touch -h -d "@$epoch" {} +
if command -v cpio >/dev/null; then
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -9 > "$stage/initramfs.cpio"
else
  (cd "$r" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -n -9 > "$stage/initramfs.cpio"
fi
if [ "$bzimage" = 0 ] && [ -f "$kc/vmlinux" ]; then cp "$kc/vmlinux" "$stage/kernel"; else cp "$kc/vmlinuz" "$stage/kernel"; fi
printf 'hello from the oakestra test guest\n' > "$stage/files1/index.html"
chmod 0644 "$stage/kernel" "$stage/initramfs.cpio" "$stage/files1/index.html"
chmod 0755 "$stage/files1"

mkdir -p "$out"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=gnu \
  -cf - kernel initramfs.cpio files1 | gzip -n -6 > "$tarball.tmp"
mv "$tarball.tmp" "$tarball"
printf '%s\n' "$inputs" > "$stamp"
log "$tarball: kernel $kv ($( [ "$bzimage" = 0 ] && [ -f "$kc/vmlinux" ] && echo 'ELF vmlinux, PVH boot' || echo bzImage)),"\
" modules: ${order[*]}, $(du -h "$tarball" | cut -f1)"
(cd "$out" && sha256sum "$name.tar.gz" | tee "$name.tar.gz.sha256")
