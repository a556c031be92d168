#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in fuzz/ with the stable
# toolchain and runs each for a few seconds; fails on any crash, timeout,
# out-of-memory or build error. Not a substitute for long runs (see the
# fuzzing section of docs/testing.md).
#
# cargo-fuzz needs nightly-only rustc flags (-Z sanitizer, sancov passes);
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them, so no nightly
# toolchain is needed. cargo-fuzz itself is installed if missing (cached in
# ~/.cargo/bin as usual).
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 10)
#   FUZZ_SANITIZER  address (default) or none
#   FUZZ_TARGETS    space-separated subset (default: all targets)
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-10}
SANITIZER=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

# On a machine with rustup, pin stable even where nightly is the default.
CARGO=(cargo)
if command -v rustup > /dev/null 2>&1; then
    CARGO=(cargo +stable)
fi

if ! "${CARGO[@]}" fuzz --version > /dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    "${CARGO[@]}" install cargo-fuzz --locked
fi

start=$(date +%s)
echo "== fuzz build (sanitizer: $SANITIZER)"
nice "${CARGO[@]}" fuzz build -s "$SANITIZER"
built=$(date +%s)

targets=${FUZZ_TARGETS:-$("${CARGO[@]}" fuzz list)}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
for t in $targets; do
    # A fresh corpus each time (seeded from fuzz/seeds/<target> if there is
    # one), so the result does not depend on earlier local runs.
    corpus="$logs/corpus-$t"
    mkdir -p "$corpus"
    if [ -d "seeds/$t" ]; then
        cp seeds/"$t"/* "$corpus"/ 2> /dev/null || true
    fi
    if nice "${CARGO[@]}" fuzz run -s "$SANITIZER" "$t" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_funcs=0 > "$logs/$t.log" 2>&1; then
        echo "   $t: ok ($(awk '$2 == "DONE" { print $1, "runs,", $3, $4, $5, $6 }' "$logs/$t.log"))"
    else
        echo "   $t: FAILED"
        grep -E 'ERROR|panicked|SUMMARY|Test unit written|overflow' "$logs/$t.log" | head -20 || tail -30 "$logs/$t.log"
        failed+=("$t")
    fi
done
end=$(date +%s)
echo "== fuzz smoke: build $((built - start)) s, runs $((end - built)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz smoke FAILED: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
