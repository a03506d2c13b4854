#!/usr/bin/env bash
# Runs the cargo-fuzz targets of tests/fuzz for a bounded time each (not part of CI):
#   ./scripts/fuzz.sh                 every target, FUZZ_SECONDS (default 600) each
#   ./scripts/fuzz.sh mqtt_codec sla  only these
# Installs what it needs (the nightly toolchain, cargo-fuzz). Corpora grow in tests/fuzz/corpus/<target> (seeded
# from examples/ for the JSON targets); a crash lands in tests/fuzz/artifacts/<target>/ and fails the run: turn it
# into a regression test next to the code it broke. NetManager is built without its eBPF object (the fuzzing flags
# must not reach the BPF build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked

seconds="${FUZZ_SECONDS:-600}"
all=(sla mqtt_payloads mqtt_codec packet_translation netmanager_api cluster_bodies)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
export OAKESTRA_SKIP_EBPF=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/tests/fuzz/target}"

for t in sla cluster_bodies mqtt_payloads netmanager_api; do
    mkdir -p "tests/fuzz/corpus/$t"
    for f in examples/*.json; do cp -n "$f" "tests/fuzz/corpus/$t/" 2>/dev/null || true; done
done

failed=()
for t in "${targets[@]}"; do
    printf '\n==> fuzzing %s for %s s  [%s]\n' "$t" "$seconds" "$(date +%T)"
    mkdir -p "tests/fuzz/corpus/$t"
    if ! cargo +nightly fuzz run --fuzz-dir tests/fuzz "$t" "tests/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
    fi
done
echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (see tests/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, ${seconds} s each, no crash"
