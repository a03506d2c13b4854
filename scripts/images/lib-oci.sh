# shellcheck shell=bash
# Helpers for writing OCI images by hand (no registry, no docker/buildah), sourced by scripts/images/build.sh.
# The same approach as scripts/testbed/mk-oci-image.sh, split into reusable steps:
#   oci_default_out                   the default output directory of the image scripts
#   oci_need_value OPT WHAT ARGS...   dies unless OPT (in an argument loop) has a non-empty value
#   oci_platform                      sets OCI_ARCH / OCI_VARIANT for this machine (amd64, arm64, arm/v7)
#   oci_rootfs ROOT                   a skeleton root: the host's usr-merge links (bin -> usr/bin, ...), /dev /etc
#                                     /proc /root /run /sys /tmp (1777)
#   oci_add_file ROOT PATH [MODE]     copies the host's PATH (symlinks followed) to the same path under ROOT
#   oci_add_elf ROOT BINARY...        copies BINARY and every shared library `ldd` names for it, loader included
#   oci_add_libs ROOT BINARY          copies only the shared libraries `ldd` names for BINARY, loader included
#   oci_add_elf_at ROOT BINARY DEST   installs BINARY as ROOT/DEST (mode 0755) plus its libraries (oci_add_libs)
#   oci_add_busybox ROOT              /bin/busybox (must be static) and a /bin/<applet> symlink per applet
#   oci_write ROOT PATH MODE          writes stdin to ROOT/PATH
#   oci_json_str STRING               STRING as a JSON string literal (quotes included)
#   oci_write_layout ROOT OUT NAME CONFIG CREATED_BY
#                                     ROOT as one gzip layer; OUT an OCI image layout (oci-layout, index.json,
#                                     blobs/sha256) and OUT.tar the same as a tar archive for `ctr images import`;
#                                     NAME the full image name, CONFIG the JSON object for the config's "config";
#                                     sets OCI_MANIFEST_DIGEST
#   oci_write_docker_archive ROOT OUT NAME CONFIG CREATED_BY
#                                     ROOT as one uncompressed layer in OUT, a `docker save` archive (manifest.json
#                                     with Config/RepoTags/Layers, the config, <diff id>/layer.tar) that
#                                     `docker load -i` reads (docker 20.10 cannot load OCI layouts); NAME, CONFIG and
#                                     CREATED_BY as for oci_write_layout; sets OCI_IMAGE_ID (the config's digest)
# Deterministic for given inputs: sorted tar, owner 0, mtime $SOURCE_DATE_EPOCH (default 0), gzip -n.
# Errors call oci_die, which prints "$OCI_PROG: message" and exits 1.
# Needs: GNU tar, gzip, sha256sum, ldd, realpath (coreutils).

# Where the image scripts write by default: $XDG_CACHE_HOME/oakestra-rs/images, else /var/cache/oakestra-rs/images
# for root and ~/.cache/oakestra-rs/images for others.
oci_default_out() {
  if [ -n "${XDG_CACHE_HOME:-}" ]; then
    printf '%s\n' "$XDG_CACHE_HOME/oakestra-rs/images"
  elif [ "$(id -u)" -eq 0 ]; then
    printf '%s\n' /var/cache/oakestra-rs/images
  else
    printf '%s\n' "${HOME:?HOME is unset}/.cache/oakestra-rs/images"
  fi
}

# OPTION WHAT ARGS...: dies unless the option (the first of ARGS) has a non-empty value after it.
oci_need_value() {
  if [ $# -lt 4 ] || [ -z "$4" ]; then oci_die "$1 needs $2"; fi
}

oci_die() {
  printf '%s: %s\n' "${OCI_PROG:-lib-oci}" "$*" >&2
  exit 1
}

oci_platform() {
  case "$(uname -m)" in
    x86_64 | amd64) OCI_ARCH=amd64 OCI_VARIANT= ;;
    aarch64 | arm64) OCI_ARCH=arm64 OCI_VARIANT= ;;
    armv7l | armv7*) OCI_ARCH=arm OCI_VARIANT=v7 ;;
    *) oci_die "unsupported machine $(uname -m) (known: x86_64, aarch64, armv7l)" ;;
  esac
}

oci_json_str() {
  local s=$1
  [[ "$s" != *[[:cntrl:]]* ]] || oci_die "control character in JSON string: $s"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

oci_rootfs() {
  local root=$1 top target
  mkdir -p "$root"
  # Mirror the host's usr-merge so that paths found on the host (ldd, PT_INTERP) resolve the same way in the image.
  for top in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$top" ]; then
      target=$(readlink "/$top")
      ln -s "${target#/}" "$root/$top"
      mkdir -p "$root/${target#/}"
    fi
  done
  mkdir -p "$root"/{bin,dev,etc,proc,root,run,sys,tmp}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
}

# ROOT's copy of host PATH: the directory part canonicalised on the host (so /lib/x86_64-linux-gnu/libc.so.6 lands
# in usr/lib/x86_64-linux-gnu when /lib -> usr/lib), the file name kept (a soname symlink becomes a regular file).
oci_add_file() {
  local root=$1 src=$2 mode=${3:-} dir dst
  [ -e "$src" ] || oci_die "$src does not exist"
  dir=$(realpath -e "$(dirname "$src")") || oci_die "cannot resolve $(dirname "$src")"
  dst=$root$dir/$(basename "$src")
  [ -e "$dst" ] && return 0
  mkdir -p "$root$dir"
  cp -L "$src" "$dst"
  [ -z "$mode" ] || chmod "$mode" "$dst"
}

oci_add_elf() {
  local root=$1 bin
  shift
  for bin in "$@"; do
    oci_add_file "$root" "$bin"
    oci_add_libs "$root" "$bin"
  done
}

oci_add_elf_at() {
  local root=$1 bin=$2 dest=$3
  [ -f "$bin" ] || oci_die "$bin does not exist"
  case "$dest" in /*) ;; *) oci_die "$dest is not an absolute path" ;; esac
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$bin" "$root$dest"
  chmod 0755 "$root$dest"
  oci_add_libs "$root" "$bin"
}

oci_add_libs() {
  local root=$1 bin=$2 line lib out
  out=$(ldd "$bin" 2>&1) || oci_die "ldd $bin failed: $out"
  while IFS= read -r line; do
    line=${line#"${line%%[![:space:]]*}"}
    case "$line" in
      *"=> not found"*) oci_die "$bin needs a library the host lacks: $line" ;;
      *" => /"*) lib=${line#* => }; lib=${lib%% (*} ;;       # libc.so.6 => /lib/.../libc.so.6 (0x...)
      /*) lib=${line%% (*} ;;                                  # /lib64/ld-linux-x86-64.so.2 (0x...)
      *" => "* | "" | linux-vdso* | linux-gate* | *"statically linked"*) continue ;;  # vdso: no file
      *) oci_die "unexpected ldd output for $bin: $line" ;;
    esac
    oci_add_file "$root" "$lib"
  done <<<"$out"
}

oci_add_busybox() {
  local root=$1 busybox=/bin/busybox applet
  [ -x "$busybox" ] || oci_die "$busybox is missing: apt-get install busybox-static"
  # A dynamically linked busybox would need libraries in the image: insist on the static one.
  if ldd "$busybox" >/dev/null 2>&1; then
    oci_die "$busybox is not statically linked: apt-get install busybox-static"
  fi
  cp "$busybox" "$root/bin/busybox"
  chmod 0755 "$root/bin/busybox"
  while IFS= read -r applet; do
    case "$applet" in
      "" | busybox) continue ;;
      */*) oci_die "busybox applet name $applet holds a '/'" ;;
    esac
    # Never shadow a real program already in the image (e.g. a Debian binary of the same name).
    [ -e "$root/bin/$applet" ] || [ -L "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done < <("$busybox" --list)
}

oci_write() {
  local root=$1 path=$2 mode=$3
  mkdir -p "$root$(dirname "$path")"
  cat >"$root$path"
  chmod "$mode" "$root$path"
}

# Deterministic tar: names sorted, numeric owner 0, fixed mtime, GNU format (no pax atime/ctime records).
oci_tar() { # DIR ARCHIVE MEMBERS...
  local dir=$1 archive=$2
  shift 2
  tar -C "$dir" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@${SOURCE_DATE_EPOCH:-0}" --format=gnu \
    -cf "$archive" "$@"
}

oci_write_layout() {
  local root=$1 out=${2%/} name=$3 config=$4 created_by=$5
  local last tag work created variant_json diff_id
  local layer_digest layer_size config_digest config_size manifest_digest manifest_size
  local -a members
  [[ "$name" =~ ^[a-z0-9][a-z0-9._/:-]*$ ]] || oci_die "$name is not an image name (lowercase letters, digits, . _ / : -)"
  # The tag follows the last ':' unless a '/' follows it (a ':' before a '/' is a registry port).
  last=${name##*/}
  if [[ "$last" == *:* ]]; then tag=${last##*:}; else tag=latest; name="$name:latest"; fi
  [ -n "$tag" ] || oci_die "$name has an empty tag"
  if [ -e "$out" ] || [ -e "$out.tar" ]; then oci_die "$out or $out.tar already exists"; fi
  [ -n "${OCI_ARCH:-}" ] || oci_platform
  created=$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)

  work=$(mktemp -d "${TMPDIR:-/tmp}/oci-layout.XXXXXX")
  mapfile -t members < <(cd "$root" && find . -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort)
  oci_tar "$root" "$work/layer.tar" "${members[@]}"
  gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
  diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  rm -f "$work/layer.tar"

  mkdir -p "$out/blobs/sha256"
  # Moves FILE into the blob store and prints "DIGEST SIZE".
  _oci_store() {
    local digest length
    digest=$(sha256sum "$1" | cut -d' ' -f1)
    length=$(stat -c %s "$1")
    mv "$1" "$out/blobs/sha256/$digest"
    printf 'sha256:%s %s\n' "$digest" "$length"
  }
  read -r layer_digest layer_size < <(_oci_store "$work/layer.tar.gz")

  variant_json=
  [ -z "${OCI_VARIANT:-}" ] || variant_json=",\"variant\":\"$OCI_VARIANT\""
  printf '%s' "{\"created\":\"$created\",\"architecture\":\"$OCI_ARCH\"$variant_json,\"os\":\"linux\",\
\"config\":$config,\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"$diff_id\"]},\
\"history\":[{\"created\":\"$created\",\"created_by\":$(oci_json_str "$created_by")}]}" >"$work/config.json"
  read -r config_digest config_size < <(_oci_store "$work/config.json")

  printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$layer_digest\",\"size\":$layer_size}]}" \
    >"$work/manifest.json"
  read -r manifest_digest manifest_size < <(_oci_store "$work/manifest.json")
  rm -rf "$work"

  printf '%s\n' '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
  printf '%s\n' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[\
{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest_digest\",\"size\":$manifest_size,\
\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"$tag\"},\
\"platform\":{\"architecture\":\"$OCI_ARCH\",\"os\":\"linux\"$variant_json}}]}" >"$out/index.json"
  oci_tar "$out" "$out.tar" oci-layout index.json blobs
  # shellcheck disable=SC2034 # for the caller
  OCI_MANIFEST_DIGEST=$manifest_digest
}

oci_write_docker_archive() {
  local root=$1 out=$2 name=$3 config=$4 created_by=$5
  local last work created variant_json diff_hex config_hex
  local -a members
  [[ "$name" =~ ^[a-z0-9][a-z0-9._/:-]*$ ]] || oci_die "$name is not an image name (lowercase letters, digits, . _ / : -)"
  last=${name##*/}
  [[ "$last" == *:* ]] || name="$name:latest"
  [ -n "${name##*:}" ] || oci_die "$name has an empty tag"
  [ ! -e "$out" ] || oci_die "$out already exists"
  [ -n "${OCI_ARCH:-}" ] || oci_platform
  created=$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)

  work=$(mktemp -d "${TMPDIR:-/tmp}/docker-archive.XXXXXX")
  mapfile -t members < <(cd "$root" && find . -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort)
  mkdir -p "$work/archive"
  oci_tar "$root" "$work/layer.tar" "${members[@]}"
  diff_hex=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  # The directory of a layer is named after its diff id here (docker save uses a v1 id; load only follows Layers).
  mkdir -p "$work/archive/$diff_hex"
  mv "$work/layer.tar" "$work/archive/$diff_hex/layer.tar"

  variant_json=
  [ -z "${OCI_VARIANT:-}" ] || variant_json=",\"variant\":\"$OCI_VARIANT\""
  printf '%s' "{\"created\":\"$created\",\"architecture\":\"$OCI_ARCH\"$variant_json,\"os\":\"linux\",\
\"config\":$config,\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_hex\"]},\
\"history\":[{\"created\":\"$created\",\"created_by\":$(oci_json_str "$created_by")}]}" >"$work/config.json"
  config_hex=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  mv "$work/config.json" "$work/archive/$config_hex.json"
  printf '%s\n' "[{\"Config\":\"$config_hex.json\",\"RepoTags\":[\"$name\"],\"Layers\":[\"$diff_hex/layer.tar\"]}]" \
    >"$work/archive/manifest.json"
  oci_tar "$work/archive" "$out" manifest.json "$config_hex.json" "$diff_hex"
  rm -rf "$work"
  # shellcheck disable=SC2034 # for the caller
  OCI_IMAGE_ID=sha256:$config_hex
}
