#!/usr/bin/env bash
# Builds two small local OCI images from Debian packages, standing in for the public images of the README's
# "clientsrvr" example on machines that cannot reach a container registry:
#   localhost/oakestra/nginx:latest  for docker.io/library/nginx:latest
#       Debian's nginx (/usr/sbin/nginx) + its ldd closure (loader included), busybox-static applets (/bin/sh, ...),
#       /etc/nginx/nginx.conf: foreground (`daemon off;`), `user root;`, `listen 80; listen [::]:80;`, error log on
#       stderr, access log on stdout, pid /run/nginx.pid, temp paths under /var/lib/nginx;
#       /usr/share/nginx/html/index.html holding the line "Welcome to nginx! (oakestra-rs local image)".
#       Config Cmd ["nginx"] (the daemon setting lives in nginx.conf, so do not add -g 'daemon off;'), port 80/tcp.
#   localhost/oakestra/curl:latest   for docker.io/curlimages/curl:7.82.0
#       Debian's curl (/usr/bin/curl) + its ldd closure, busybox-static applets (sh, sleep, cat, ...), /etc/passwd,
#       /etc/group, /etc/hosts, /etc/nsswitch.conf (hosts: files dns); no CA certificates. Config Cmd ["sh"], so the
#       example's cmd `sh -c "curl 10.30.55.55 ; sleep 5"` runs as is.
#
# Usage: scripts/images/build.sh [--out DIR] [--import NAMESPACE [--address SOCKET]]
#   --out DIR         where to write (default: $XDG_CACHE_HOME/oakestra-rs/images, or /var/cache/oakestra-rs/images
#                     for root and ~/.cache/oakestra-rs/images for others when XDG_CACHE_HOME is unset)
#   --import NS       afterwards import both archives into containerd namespace NS
#                     (`ctr -a SOCKET -n NS images import DIR/<image>.tar`) and check that both names are listed
#   --address SOCKET  containerd's socket for --import (default /run/containerd/containerd.sock)
#
# Outputs, replacing earlier ones in DIR:
#   DIR/nginx/  DIR/curl/        OCI image layouts (oci-layout, index.json, blobs/sha256/...), e.g. for
#                                `skopeo copy oci:DIR/nginx:latest docker://HOST/oakestra/nginx:latest`
#   DIR/nginx.tar  DIR/curl.tar  the same layouts as tar archives: `ctr -n NS images import DIR/nginx.tar`
# Each image is one gzip layer; the index records the full name (io.containerd.image.name) and the tag
# (org.opencontainers.image.ref.name), so the imported image is named exactly as above.
#
# Requirements: Debian (12 tested) with the packages nginx, curl and busybox-static (as root, missing ones are
# installed with apt-get, the only network access; the nginx service is kept from starting while installing),
# GNU tar, gzip, coreutils, ldd; ctr for --import. Runs as any user otherwise; as root it also smoke-tests both
# images with chroot (`nginx -t`, `curl --version`, `sh -c true`).
# Deterministic for given package versions: sorted tar, owner 0, mtime $SOURCE_DATE_EPOCH (default 0), gzip -n.
set -euo pipefail

OCI_PROG=build-images
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/images/lib-oci.sh
. "$here/lib-oci.sh"
die() { oci_die "$@"; }
say() { printf '%s: %s\n' "$OCI_PROG" "$*"; }

NGINX_NAME=localhost/oakestra/nginx:latest
CURL_NAME=localhost/oakestra/curl:latest
WELCOME='Welcome to nginx! (oakestra-rs local image)'

usage() { sed -n '/^# Usage:/,/^#   --address/p' "$0" | sed 's/^# \{0,1\}//'; }

out=$(oci_default_out)
namespace=
address=/run/containerd/containerd.sock
address_set=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) oci_need_value "$1" "a directory" "$@"; out=$2; shift 2 ;;
    --import) oci_need_value "$1" "a containerd namespace" "$@"; namespace=$2; shift 2 ;;
    --address) oci_need_value "$1" "a socket path" "$@"; address=$2; address_set=1; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -z "$address_set" ] || [ -n "$namespace" ] || die "--address only makes sense with --import"
out=${out%/}
[ -n "$out" ] || die "--out must not be /"

# --- tools and packages ------------------------------------------------------------------------------------------
for tool in tar gzip sha256sum ldd realpath find stat date; do
  command -v "$tool" >/dev/null || die "$tool is missing (needs GNU tar, gzip, coreutils, findutils, libc-bin)"
done
tar --version 2>/dev/null | grep -q 'GNU tar' || die "tar is not GNU tar (needs --sort=name)"
if [ -n "$namespace" ]; then
  command -v ctr >/dev/null || die "ctr is missing (apt-get install containerd) and --import needs it"
fi

# package providing a program, for the messages and for apt-get
missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/bin/curl ] || missing+=(curl)
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root to install them, or: sudo apt-get install ${missing[*]})"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  # Keep the nginx package from starting a host nginx on port 80: a policy-rc.d answering 101 (if none exists).
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# temporary, from oakestra-rs scripts/images/build.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  say "installing ${missing[*]}: apt-get install -y --no-install-recommends ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
    say "apt-get install failed; running apt-get update and trying again"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" ||
      die "apt-get install ${missing[*]} failed"
  fi
  if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
  if [ ! -x /usr/sbin/nginx ] || [ ! -x /usr/bin/curl ] || [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    die "after installing ${missing[*]}: /usr/sbin/nginx, /usr/bin/curl or a static /bin/busybox still missing"
  fi
fi

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || printf 'unknown'; }
nginx_version=$(pkg_version nginx)
curl_version=$(pkg_version curl)
busybox_version=$(pkg_version busybox-static)

oci_platform
work=$(mktemp -d "${TMPDIR:-/tmp}/oakestra-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
export TMPDIR=$work
umask 022

# --- files both images share -------------------------------------------------------------------------------------
common_etc() {
  local root=$1
  oci_write "$root" /etc/passwd 0644 <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  oci_write "$root" /etc/group 0644 <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
  oci_write "$root" /etc/nsswitch.conf 0644 <<'EOF'
passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
EOF
  oci_write "$root" /etc/hosts 0644 <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF
  # glibc before 2.34 loads the files/dns NSS modules at run time; later ones have them built in (stubs remain).
  local nss
  for nss in /lib/*-linux-gnu*/libnss_files.so.2 /lib/*-linux-gnu*/libnss_dns.so.2; do
    [ ! -e "$nss" ] || oci_add_elf "$root" "$nss"
  done
}

# --- nginx -------------------------------------------------------------------------------------------------------
say "building $NGINX_NAME (nginx $nginx_version, busybox-static $busybox_version)"
nroot=$work/nginx-root
oci_rootfs "$nroot"
oci_add_elf "$nroot" /usr/sbin/nginx
oci_add_busybox "$nroot"
common_etc "$nroot"
# Compiled-in paths Debian's nginx opens before reading the config (error log, modules): present but unused.
mkdir -p "$nroot"/var/log/nginx "$nroot"/var/lib/nginx "$nroot"/usr/share/nginx/html "$nroot"/etc/nginx
oci_write "$nroot" /etc/nginx/nginx.conf 0644 <<'EOF'
# localhost/oakestra/nginx (oakestra-rs scripts/images/build.sh): foreground, root, port 80, logs to stderr/stdout.
daemon off;
user root;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr notice;

events {
    worker_connections 512;
}

http {
    types {
        text/html                html htm;
        text/plain               txt;
        text/css                 css;
        application/javascript   js;
        application/json         json;
        image/png                png;
        image/svg+xml            svg;
    }
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;

    client_body_temp_path /var/lib/nginx/body;
    proxy_temp_path /var/lib/nginx/proxy;
    fastcgi_temp_path /var/lib/nginx/fastcgi;
    uwsgi_temp_path /var/lib/nginx/uwsgi;
    scgi_temp_path /var/lib/nginx/scgi;

    server {
        listen 80;
        listen [::]:80;
        server_name _;
        root /usr/share/nginx/html;
        index index.html;
        location / {
            try_files $uri $uri/ =404;
        }
    }
}
EOF
oci_write "$nroot" /usr/share/nginx/html/index.html 0644 <<EOF
<!DOCTYPE html>
<html>
<head>
<title>Welcome to nginx!</title>
</head>
<body>
<h1>Welcome to nginx!</h1>
$WELCOME
<p>Debian's nginx $nginx_version in $NGINX_NAME, built by oakestra-rs scripts/images/build.sh.</p>
</body>
</html>
EOF

# --- curl --------------------------------------------------------------------------------------------------------
say "building $CURL_NAME (curl $curl_version, busybox-static $busybox_version)"
croot=$work/curl-root
oci_rootfs "$croot"
oci_add_elf "$croot" /usr/bin/curl
oci_add_busybox "$croot"
common_etc "$croot"

# --- smoke tests (root only: chroot) -----------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ] && command -v chroot >/dev/null; then
  # On copies: nginx -t creates its temp directories and opens the access log (/dev is empty without a runtime).
  cp -a "$nroot" "$work/nginx-check"
  cp -a "$croot" "$work/curl-check"
  : >"$work/nginx-check/dev/stdout"
  chroot "$work/nginx-check" /usr/sbin/nginx -t -q ||
    die "nginx -t failed inside the nginx image (a library or path is missing)"
  chroot "$work/nginx-check" /bin/sh -c true || die "sh does not run inside the nginx image"
  chroot "$work/curl-check" /usr/bin/curl --version >/dev/null || die "curl does not run inside the curl image"
  chroot "$work/curl-check" /bin/sh -c 'sleep 0 && cat /etc/nsswitch.conf >/dev/null' ||
    die "sh, sleep or cat do not run inside the curl image"
  rm -rf "$work/nginx-check" "$work/curl-check"
  say "smoke tests passed (chroot: nginx -t, curl --version, sh -c)"
fi

# --- layouts -----------------------------------------------------------------------------------------------------
path_env='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
labels() { # DESCRIPTION
  printf '{"org.opencontainers.image.description":%s,"org.opencontainers.image.source":"oakestra-rs scripts/images/build.sh"}' \
    "$(oci_json_str "$1")"
}
mkdir -p "$work/out"
oci_write_layout "$nroot" "$work/out/nginx" "$NGINX_NAME" \
  "{\"Env\":[\"$path_env\"],\"Cmd\":[\"nginx\"],\"WorkingDir\":\"/\",\"ExposedPorts\":{\"80/tcp\":{}},\
\"Labels\":$(labels "Debian nginx $nginx_version + busybox-static $busybox_version")}" \
  "scripts/images/build.sh (Debian nginx $nginx_version, busybox-static $busybox_version)"
nginx_digest=$OCI_MANIFEST_DIGEST
oci_write_layout "$croot" "$work/out/curl" "$CURL_NAME" \
  "{\"Env\":[\"$path_env\"],\"Cmd\":[\"sh\"],\"WorkingDir\":\"/\",\
\"Labels\":$(labels "Debian curl $curl_version + busybox-static $busybox_version")}" \
  "scripts/images/build.sh (Debian curl $curl_version, busybox-static $busybox_version)"
curl_digest=$OCI_MANIFEST_DIGEST

# Replace earlier outputs, but only ones that look like ours (an OCI layout), never an unrelated directory.
mkdir -p "$out"
for image in nginx curl; do
  if [ -e "$out/$image" ]; then
    [ -f "$out/$image/oci-layout" ] || die "$out/$image exists and is not an OCI layout; not replacing it"
    rm -rf "${out:?}/$image"
  fi
  rm -f "$out/$image.tar"
  mv "$work/out/$image" "$out/$image"
  mv "$work/out/$image.tar" "$out/$image.tar"
done
say "wrote $out/nginx{,.tar}: $NGINX_NAME, manifest $nginx_digest, $(stat -c %s "$out/nginx.tar") bytes"
say "wrote $out/curl{,.tar}: $CURL_NAME, manifest $curl_digest, $(stat -c %s "$out/curl.tar") bytes"

# --- import ------------------------------------------------------------------------------------------------------
if [ -n "$namespace" ]; then
  [ -S "$address" ] || die "$address is not a socket (is containerd running? use --address)"
  for image in nginx curl; do
    say "ctr -a $address -n $namespace images import $out/$image.tar"
    ctr -a "$address" -n "$namespace" images import "$out/$image.tar" || die "importing $out/$image.tar failed"
  done
  listed=$(ctr -a "$address" -n "$namespace" images ls -q) || die "ctr images ls failed"
  for name in "$NGINX_NAME" "$CURL_NAME"; do
    grep -qxF "$name" <<<"$listed" || die "$name is not listed in namespace $namespace after the import"
  done
  say "namespace $namespace has $NGINX_NAME and $CURL_NAME"
fi
