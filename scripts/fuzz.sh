#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/): each decoder that reads from the network or a file.
#
#   scripts/fuzz.sh                      every target, 1,000,000 executions each
#   FUZZ_RUNS=100000 scripts/fuzz.sh body envelope
#
# Seeds come from the real code (larder-fuzz-seeds writes them into fuzz/corpus/). New inputs
# the fuzzer finds go to fuzz/work/<target>/ (not committed); a crash is saved under
# fuzz/artifacts/<target>/ and the script stops: copy it to fuzz/regressions/<target>/, where
# `cargo test` replays it (e2e test fuzz_corpus), and fix the code.
#
# cargo-fuzz passes a few -Z flags to rustc; the project's pinned stable toolchain accepts them
# with RUSTC_BOOTSTRAP=1 (no nightly toolchain is needed). No sanitizer: the project's code has
# no `unsafe`, and libFuzzer still catches panics, overflows (debug assertions are on), memory
# beyond the limit below and hangs.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${FUZZ_RUNS:-1000000}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(envelope body ledger_change connect_token agent_request hub_request import_rows config)
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo run -q -p larder-tests --bin larder-fuzz-seeds

cd fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O -a -s none

for t in "${TARGETS[@]}"; do
    mkdir -p "work/$t"
    echo "== $t: $RUNS executions"
    start=$(date +%s)
    # Inputs up to 64 KiB; 1 GiB of memory at most; no single input may take over 10 s.
    status=0
    cargo fuzz run -O -a -s none "$t" "work/$t" "corpus/$t" -- \
        -runs="$RUNS" -max_len=65536 -rss_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 >"work/$t.log" 2>&1 || status=$?
    grep -E "^(stat::|Done|INFO: seed)|panicked|ERROR|SUMMARY" "work/$t.log" || true
    echo "== $t: exit $status in $(( $(date +%s) - start )) s"
    [ "$status" -eq 0 ] || exit "$status"
done
