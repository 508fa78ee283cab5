#!/usr/bin/env bash
# Runs the fuzz targets one after the other, each for FUZZ_TIME seconds (default 600), in one
# process on one core, under `nice -n 19`.
#
#   fuzz/run.sh [target...]            fuzz (default: review pool patch)
#   FUZZ_TIME=30 fuzz/run.sh pool      a short run
#   FUZZ_REPLAY=1 fuzz/run.sh          replay the committed corpus once (regression check)
#
# New inputs go to fuzz/work/<target>/ (not committed); at the end of a run the committed
# corpus and the new inputs are minimized together (libFuzzer -set_cover_merge=1) into a new
# fuzz/corpus/<target>/: review and commit it. A crash leaves its input in
# fuzz/artifacts/<target>/, the run goes on with the next target, and the script fails.
# Reproduce one: fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(review pool patch)
time_each=${FUZZ_TIME:-600}
bin=$(./build.sh "${targets[@]}" | tail -1)
mkdir -p logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t" "corpus/$t"
    dict=()
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
    max_len=2048
    [ "$t" = review ] && max_len=16384 # the captured reviews are up to 9 KB
    common=(-rss_limit_mb=2048 -timeout=10 -max_len=$max_len -print_final_stats=1
        -artifact_prefix="artifacts/$t/" "${dict[@]}")
    log="logs/$t.log"
    if [ -n "${FUZZ_REPLAY:-}" ]; then
        args=(-runs=0 "corpus/$t")
    else
        args=(-max_total_time="$time_each" "work/$t" "corpus/$t")
    fi
    what="for ${time_each}s"
    [ -n "${FUZZ_REPLAY:-}" ] && what="replayed once"
    echo "== $t: corpus/$t ($(ls "corpus/$t" | wc -l) inputs) $what"
    if nice -n 19 "$bin/$t" "${common[@]}" "${args[@]}" >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20 || true
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    if [ -z "${FUZZ_REPLAY:-}" ] && [ "$status" = ok ]; then
        # Minimize: a small set of inputs (old corpus + new) with the same features.
        rm -rf "work/$t.min" && mkdir -p "work/$t.min"
        if nice -n 19 "$bin/$t" -set_cover_merge=1 "${common[@]}" "work/$t.min" "corpus/$t" "work/$t" \
            >"logs/$t.merge.log" 2>&1; then
            rm -rf "corpus/$t" && mv "work/$t.min" "corpus/$t"
        fi
    fi
    echo "   $status: ${runs:-?} executions in ${secs:-?} s, ${cov:-no coverage line}, corpus/$t: $(ls "corpus/$t" | wc -l) inputs, $(du -s --apparent-size -k "corpus/$t" | cut -f1) KiB; log fuzz/$log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
