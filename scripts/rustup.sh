#!/usr/bin/env bash
# Installs rustup and a minimal Rust toolchain into ~/.cargo, as https://sh.rustup.rs does, but fetches rustup-init
# straight from the Rust distribution server (checked against its published SHA-256), so it also works where only
# static.rust-lang.org is reachable. Used by scripts/test.sh, scripts/1doc.sh and scripts/install-worker.sh.
#   scripts/rustup.sh [TOOLCHAIN]    default: stable; does nothing if ~/.cargo/bin/cargo exists
# RUSTUP_DIST_SERVER overrides the server (as it does for rustup itself).
set -euo pipefail
toolchain=${1:-stable}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ -x "$HOME/.cargo/bin/cargo" ] && exit 0
case "$(uname -m)" in
  x86_64) triple=x86_64-unknown-linux-gnu ;;
  aarch64 | arm64) triple=aarch64-unknown-linux-gnu ;;
  armv7l) triple=armv7-unknown-linux-gnueabihf ;;
  *) die "no rustup build for machine type $(uname -m); install Rust by hand (https://rustup.rs)" ;;
esac
command -v curl >/dev/null || die "curl is needed to download rustup-init"
base=${RUSTUP_DIST_SERVER:-https://static.rust-lang.org}/rustup/dist/$triple
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() { curl --proto '=https' --tlsv1.2 -sSfL --retry 3 "$1" -o "$2" || die "cannot download $1"; }
fetch "$base/rustup-init" "$tmp/rustup-init"
fetch "$base/rustup-init.sha256" "$tmp/rustup-init.sha256"
want=$(head -c 64 "$tmp/rustup-init.sha256")
got=$(sha256sum "$tmp/rustup-init" | cut -d' ' -f1)
[ "$want" = "$got" ] || die "rustup-init from $base has SHA-256 $got, the server publishes $want"
chmod 0755 "$tmp/rustup-init"
"$tmp/rustup-init" -y --profile minimal --default-toolchain "$toolchain"
