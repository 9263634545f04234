#!/usr/bin/env bash
# Run the fuzz targets: scripts/fuzz.sh [TARGET|all] [SECONDS]   (defaults: all, 600)
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Seeds are read from fuzz/corpus/<target> and fuzz/regressions/<target>
# (committed, never written to); what the fuzzer learns goes to fuzz/target/work-corpus/<target>
# (git-ignored), kept between runs. Crashes land in fuzz/artifacts/<target>/: add the input to
# fuzz/regressions/<target>/ once fixed, and tests/fuzz_corpus.rs replays it on every cargo test.
set -euo pipefail

cd "$(dirname "$0")/.."
targets=(model_extract request_head chunked config_load prom_text multipart_model)
which=${1:-all}
secs=${2:-600}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

if [[ $which == all ]]; then
    run=("${targets[@]}")
else
    run=("$which")
fi

failed=()
for t in "${run[@]}"; do
    work="fuzz/target/work-corpus/$t"
    mkdir -p "$work" "fuzz/regressions/$t"
    echo "== $t for ${secs}s"
    # One target's crash does not stop the others; the exit status says whether any failed.
    if ! cargo fuzz run "$t" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
        -max_total_time="$secs" -print_final_stats=1; then
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
