#!/usr/bin/env bash
# Runs one libFuzzer target for a bounded time: run_fuzzer.sh BINARY SEED_DIR WORK_DIR [DICT]
# Seconds: TSCALE_FUZZ_SECONDS, else TSCALE_FUZZ_DEFAULT_SECONDS (set by ctest), else 30.
# New inputs go to WORK_DIR/corpus (the seeds in the source tree are only read); a crashing input
# is saved in WORK_DIR as crash-*, leak-*, timeout-* or oom-*, and the exit status is non-zero.
set -euo pipefail
binary=$1
seeds=$2
work=$3
dict=${4:-}
seconds=${TSCALE_FUZZ_SECONDS:-${TSCALE_FUZZ_DEFAULT_SECONDS:-30}}

mkdir -p "$work/corpus"
# UndefinedBehaviorSanitizer: stop at the first report, with its stack.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

args=(
  -max_total_time="$seconds"
  -timeout=30            # one input running longer is a finding
  -rss_limit_mb=4096     # LibTorch and ASan's shadow take much of this before the first input
  -malloc_limit_mb=1024  # no single allocation of a fuzz input may come near this
  -print_final_stats=1
  -artifact_prefix="$work/"
)
if [ -n "$dict" ]; then args+=(-dict="$dict"); fi

echo "fuzz: $(basename "$binary") for ${seconds}s, seeds $seeds"
exec "$binary" "${args[@]}" "$work/corpus" "$seeds"
