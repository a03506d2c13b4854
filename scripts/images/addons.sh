#!/usr/bin/env bash
# Builds the two sample addon images offline, as `docker load` archives (docker 20.10 cannot load OCI layouts):
#   127.0.0.1:5000/oakestra/addon-hello:latest      the sample extension
#       busybox-static applets, /www/index.html holding the line "hello from an oakestra-rs extension",
#       Cmd ["httpd", "-f", "-p", "8080", "-h", "/www"], port 8080/tcp.
#   127.0.0.1:5000/oakestra/addon-scheduler:latest  the sample scheduler plugin
#       the oak-sample-scheduler binary as /usr/local/bin/oak-sample-scheduler + its ldd closure (loader included),
#       Cmd ["/usr/local/bin/oak-sample-scheduler"], port 10004/tcp (its default API_PORT).
# The names point at a local registry on 127.0.0.1:5000: `docker push` them there after loading (docker treats
# registries on 127.0.0.0/8 as insecure, i.e. plain HTTP is fine).
#
# Usage: scripts/images/addons.sh [--out DIR] [--scheduler BIN] [--load SOCKET]
#   --out DIR         where to write (default: $XDG_CACHE_HOME/oakestra-rs/images, or /var/cache/oakestra-rs/images
#                     for root and ~/.cache/oakestra-rs/images for others when XDG_CACHE_HOME is unset)
#   --scheduler BIN   the oak-sample-scheduler binary to package (default: build it with
#                     `cargo build -p oakestra-addons --bin oak-sample-scheduler` and take
#                     ${CARGO_TARGET_DIR:-target}/debug/oak-sample-scheduler)
#   --load SOCKET     afterwards `docker -H unix://SOCKET load -i` both archives and check that both names are listed
#
# Outputs, replacing earlier ones in DIR (each written beside its final name and renamed, so a concurrent reader
# sees the old or the new archive, never half of one):
#   DIR/addon-hello.docker.tar  DIR/addon-scheduler.docker.tar
# Each is a `docker save` archive: manifest.json (Config, RepoTags, Layers), the image config, one uncompressed layer.
#
# Requirements: Debian (12 tested) with busybox-static (as root it is installed with apt-get when missing, the only
# network access), GNU tar, coreutils, ldd; cargo unless --scheduler is given; docker for --load. As root it also
# smoke-tests both images with chroot (the page is there, the scheduler starts and rejects a bad API_PORT).
# Deterministic for given inputs: sorted tar, owner 0, mtime $SOURCE_DATE_EPOCH (default 0).
set -euo pipefail

OCI_PROG=addon-images
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workspace=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/images/lib-oci.sh
. "$here/lib-oci.sh"
die() { oci_die "$@"; }
say() { printf '%s: %s\n' "$OCI_PROG" "$*"; }

HELLO_NAME=127.0.0.1:5000/oakestra/addon-hello:latest
SCHEDULER_NAME=127.0.0.1:5000/oakestra/addon-scheduler:latest
HELLO_LINE='hello from an oakestra-rs extension'

usage() { sed -n '/^# Usage:/,/^#   --load/p' "$0" | sed 's/^# \{0,1\}//'; }

out=$(oci_default_out)
scheduler=
socket=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) oci_need_value "$1" "a directory" "$@"; out=$2; shift 2 ;;
    --scheduler) oci_need_value "$1" "a binary" "$@"; scheduler=$2; shift 2 ;;
    --load) oci_need_value "$1" "a docker socket path" "$@"; socket=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
out=${out%/}
[ -n "$out" ] || die "--out must not be /"

# --- tools, packages and the scheduler binary ----------------------------------------------------------------------
for tool in tar sha256sum ldd realpath find stat date; do
  command -v "$tool" >/dev/null || die "$tool is missing (needs GNU tar, coreutils, findutils, libc-bin)"
done
tar --version 2>/dev/null | grep -q 'GNU tar' || die "tar is not GNU tar (needs --sort=name)"
if [ -n "$socket" ]; then
  command -v docker >/dev/null || die "docker is missing (apt-get install docker.io) and --load needs it"
fi

if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "missing Debian package busybox-static (run as root to install it, or: sudo apt-get install busybox-static)"
  command -v apt-get >/dev/null || die "busybox-static is missing and there is no apt-get to install it"
  say "installing busybox-static: apt-get install -y --no-install-recommends busybox-static"
  if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends busybox-static; then
    say "apt-get install failed; running apt-get update and trying again"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends busybox-static ||
      die "apt-get install busybox-static failed"
  fi
  if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    die "after installing busybox-static: a static /bin/busybox is still missing"
  fi
fi
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || printf 'unknown')

if [ -z "$scheduler" ]; then
  command -v cargo >/dev/null || die "cargo is missing: build the scheduler elsewhere and pass --scheduler BIN"
  say "building oak-sample-scheduler: cargo build -p oakestra-addons --bin oak-sample-scheduler"
  # From the workspace root, so a relative CARGO_TARGET_DIR means the same directory to cargo and to us.
  (cd "$workspace" && cargo build -p oakestra-addons --bin oak-sample-scheduler) || die "building oak-sample-scheduler failed"
  target=${CARGO_TARGET_DIR:-target}
  case "$target" in /*) ;; *) target=$workspace/$target ;; esac
  scheduler=$target/debug/oak-sample-scheduler
fi
if [ ! -f "$scheduler" ] || [ ! -x "$scheduler" ]; then die "$scheduler is not an executable file"; fi
scheduler=$(realpath -e "$scheduler")
scheduler_sum=$(sha256sum "$scheduler" | cut -d' ' -f1)

oci_platform
work=$(mktemp -d "${TMPDIR:-/tmp}/oakestra-addon-images.XXXXXX")
trap 'rm -rf "$work"; rm -f "$out/.addon-hello.docker.tar.$$" "$out/.addon-scheduler.docker.tar.$$"' EXIT
export TMPDIR=$work
umask 022

passwd() {
  oci_write "$1" /etc/passwd 0644 <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  oci_write "$1" /etc/group 0644 <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
}

# --- addon-hello ---------------------------------------------------------------------------------------------------
say "building $HELLO_NAME (busybox-static $busybox_version)"
hroot=$work/hello-root
oci_rootfs "$hroot"
oci_add_busybox "$hroot"
passwd "$hroot"
oci_write "$hroot" /www/index.html 0644 <<EOF
<!DOCTYPE html>
<html>
<head><title>oakestra-rs sample extension</title></head>
<body>
$HELLO_LINE
<p>busybox httpd $busybox_version in $HELLO_NAME, built by oakestra-rs scripts/images/addons.sh.</p>
</body>
</html>
EOF

# --- addon-scheduler -----------------------------------------------------------------------------------------------
say "building $SCHEDULER_NAME ($scheduler, sha256 $scheduler_sum)"
sroot=$work/scheduler-root
oci_rootfs "$sroot"
oci_add_elf_at "$sroot" "$scheduler" /usr/local/bin/oak-sample-scheduler
passwd "$sroot"

# --- smoke tests (root only: chroot) -------------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ] && command -v chroot >/dev/null; then
  chroot "$hroot" /bin/sh -c "grep -qF '$HELLO_LINE' /www/index.html && [ -x /bin/httpd ]" ||
    die "the hello image has no httpd or no page"
  # An invalid API_PORT makes the scheduler exit 64 right after start-up: proof that it loads and runs, without
  # listening on anything.
  rc=0
  env -i API_PORT=invalid "$(command -v chroot)" "$sroot" /usr/local/bin/oak-sample-scheduler >/dev/null 2>&1 || rc=$?
  [ "$rc" -eq 64 ] || die "oak-sample-scheduler does not run inside its image (exit $rc, expected 64)"
  say "smoke tests passed (chroot: the page and httpd, the scheduler starts)"
fi

# --- archives ------------------------------------------------------------------------------------------------------
path_env='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
labels() { # DESCRIPTION
  printf '{"org.opencontainers.image.description":%s,"org.opencontainers.image.source":"oakestra-rs scripts/images/addons.sh"}' \
    "$(oci_json_str "$1")"
}
mkdir -p "$work/out"
oci_write_docker_archive "$hroot" "$work/out/addon-hello.docker.tar" "$HELLO_NAME" \
  "{\"Env\":[\"$path_env\"],\"Cmd\":[\"httpd\",\"-f\",\"-p\",\"8080\",\"-h\",\"/www\"],\"WorkingDir\":\"/\",\
\"ExposedPorts\":{\"8080/tcp\":{}},\"Labels\":$(labels "oakestra-rs sample extension: busybox httpd $busybox_version")}" \
  "scripts/images/addons.sh (busybox-static $busybox_version)"
hello_id=$OCI_IMAGE_ID
oci_write_docker_archive "$sroot" "$work/out/addon-scheduler.docker.tar" "$SCHEDULER_NAME" \
  "{\"Env\":[\"$path_env\"],\"Cmd\":[\"/usr/local/bin/oak-sample-scheduler\"],\"WorkingDir\":\"/\",\
\"ExposedPorts\":{\"10004/tcp\":{}},\"Labels\":$(labels "oakestra-rs sample scheduler plugin (most free memory)")}" \
  "scripts/images/addons.sh (oak-sample-scheduler sha256 $scheduler_sum)"
scheduler_id=$OCI_IMAGE_ID

mkdir -p "$out"
for image in addon-hello addon-scheduler; do
  # Copied next to the final name first (the work directory may be another file system), then renamed.
  cp "$work/out/$image.docker.tar" "$out/.$image.docker.tar.$$"
  mv -f "$out/.$image.docker.tar.$$" "$out/$image.docker.tar"
done
say "wrote $out/addon-hello.docker.tar: $HELLO_NAME, image $hello_id, $(stat -c %s "$out/addon-hello.docker.tar") bytes"
say "wrote $out/addon-scheduler.docker.tar: $SCHEDULER_NAME, image $scheduler_id, $(stat -c %s "$out/addon-scheduler.docker.tar") bytes"

# --- load ----------------------------------------------------------------------------------------------------------
if [ -n "$socket" ]; then
  [ -S "$socket" ] || die "$socket is not a socket (is dockerd running?)"
  for image in addon-hello addon-scheduler; do
    say "docker -H unix://$socket load -i $out/$image.docker.tar"
    docker -H "unix://$socket" load -i "$out/$image.docker.tar" || die "loading $out/$image.docker.tar failed"
  done
  listed=$(docker -H "unix://$socket" images --format '{{.Repository}}:{{.Tag}}') || die "docker images failed"
  for name in "$HELLO_NAME" "$SCHEDULER_NAME"; do
    grep -qxF "$name" <<<"$listed" || die "$name is not listed by docker images after the load"
  done
  say "dockerd at $socket has $HELLO_NAME and $SCHEDULER_NAME"
fi
