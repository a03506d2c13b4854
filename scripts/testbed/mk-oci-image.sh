#!/usr/bin/env bash
# Builds a tiny OCI image from Debian's static busybox, without network access, for the registry and containerd tests.
#   scripts/testbed/mk-oci-image.sh OUT NAME
#     OUT   directory to create (must not exist, or be empty): an OCI image layout (oci-layout, index.json, blobs/)
#     NAME  the image name recorded for `ctr images import`, e.g. docker.io/library/bbtest:latest
# Also writes OUT.tar, the same layout as a tar archive with the files at its root. Afterwards both work:
#   ctr -n NS images import OUT.tar          (the image is named NAME)
#   skopeo copy oci:OUT:TAG docker://...     (TAG is NAME's tag, `latest` when NAME has none)
# The image: one gzip layer with /bin/busybox and a /bin symlink per applet, /etc/passwd and /etc/group (root),
# /tmp (1777), /proc, /sys, /dev, /root and /www/index.html; config Cmd ["sh"], WorkingDir "/", a standard PATH.
# Output is deterministic for a given busybox binary (sorted tar, owner 0, mtime 0, gzip without name/time).
# Needs: busybox-static (/bin/busybox), GNU tar, gzip, sha256sum.
set -euo pipefail

die() { printf 'mk-oci-image: %s\n' "$*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 OUT NAME   (e.g. $0 /tmp/bb docker.io/library/bbtest:latest)"
out=${1%/}
name=$2
[ -n "$out" ] || die "OUT must not be empty"
# NAME goes into JSON verbatim: allow only the characters an image reference may hold.
[[ "$name" =~ ^[a-z0-9][a-z0-9._/:-]*$ ]] || die "NAME $name is not an image name (lowercase letters, digits, . _ / : -)"
# The tag is what follows the last ':' when no '/' follows it (a ':' before a '/' is a registry port).
last=${name##*/}
if [[ "$last" == *:* ]]; then tag=${last##*:}; else tag=latest; name="$name:latest"; fi
[ -n "$tag" ] || die "NAME $name has an empty tag"

busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox is missing: apt-get install busybox-static"
# A dynamically linked busybox would not run inside the image: insist on the static one.
if command -v file >/dev/null && ! file -L "$busybox" | grep -q 'statically linked'; then
  die "$busybox is not statically linked: apt-get install busybox-static"
fi

case "$(uname -m)" in
  x86_64 | amd64) arch=amd64 variant= ;;
  aarch64 | arm64) arch=arm64 variant= ;;
  armv7l | armv7*) arch=arm variant=v7 ;;
  *) die "unsupported machine $(uname -m) (known: x86_64, aarch64, armv7l)" ;;
esac

if [ -e "$out" ]; then
  [ -d "$out" ] || die "$out exists and is not a directory"
  [ -z "$(ls -A "$out")" ] || die "$out exists and is not empty"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# --- the root filesystem -----------------------------------------------------------------------------------------
root=$work/rootfs
mkdir -p "$root"/{bin,dev,etc,proc,root,sys,tmp,www}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
while IFS= read -r applet; do
  case "$applet" in
    "" | busybox) continue ;;
    */*) die "busybox applet name $applet holds a '/'" ;;
  esac
  ln -s busybox "$root/bin/$applet"
done < <("$busybox" --list)
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'hello from oakestra-rs\n' >"$root/www/index.html"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/www/index.html"

# Deterministic tar: names sorted, numeric owner 0, mtime 0, GNU format (no pax atime/ctime records).
deterministic_tar() { # DIR ARCHIVE MEMBERS...
  local dir=$1 archive=$2
  shift 2
  tar -C "$dir" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu -cf "$archive" "$@"
}
deterministic_tar "$root" "$work/layer.tar" bin dev etc proc root sys tmp www
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

mkdir -p "$out/blobs/sha256"
# Moves FILE into the blob store and prints "DIGEST SIZE".
store() {
  local digest length
  digest=$(sha "$1")
  length=$(size "$1")
  mv "$1" "$out/blobs/sha256/$digest"
  printf 'sha256:%s %s\n' "$digest" "$length"
}

diff_id="sha256:$(sha "$work/layer.tar")"
read -r layer_digest layer_size < <(store "$work/layer.tar.gz")

# --- config, manifest, index ---------------------------------------------------------------------------------------
variant_json=
[ -z "$variant" ] || variant_json=",\"variant\":\"$variant\""
path='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
printf '%s' "{\"created\":\"1970-01-01T00:00:00Z\",\"architecture\":\"$arch\"$variant_json,\"os\":\"linux\",\
\"config\":{\"Env\":[\"$path\"],\"Cmd\":[\"sh\"],\"WorkingDir\":\"/\"},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"$diff_id\"]},\
\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"scripts/testbed/mk-oci-image.sh (busybox-static)\"}]}" \
  >"$work/config.json"
read -r config_digest config_size < <(store "$work/config.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$layer_digest\",\"size\":$layer_size}]}" \
  >"$work/manifest.json"
read -r manifest_digest manifest_size < <(store "$work/manifest.json")

printf '%s\n' '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
printf '%s\n' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[\
{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest_digest\",\"size\":$manifest_size,\
\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"$tag\"},\
\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"$variant_json}}]}" >"$out/index.json"

deterministic_tar "$out" "$out.tar" oci-layout index.json blobs
printf '%s\n' "$out ($name, manifest $manifest_digest) and $out.tar"
