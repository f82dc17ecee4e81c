#!/usr/bin/env bash
# On a CUDA host: builds tscale against the LibTorch of the installed PyTorch (with the CUDA kernels),
# runs every test (the `_cuda` entries included), the GPU golden comparison against the reference on
# the same GPU, and the GPU benchmarks, writing one log per stage into OUTDIR:
#
#   scripts/gpu-check.sh OUTDIR REFERENCE_DIR [build.sh options, e.g. --deps-prefix /opt/deps/usr]
#
# REFERENCE_DIR holds tscale_mini.py, the reference implementation (docs/arithmetic.md, section 9;
# the host's set-up: docs/gpu.md). Stages: env.txt (device, driver, PyTorch), build.log,
# golden.log, ctest.log, layer.txt (layer_step), model.txt (layer_step --model true),
# reference.txt (reference_step.py with the ratios), hot.txt (hot_path: a TrainStep's stages on
# the server's path, on CUDA with the step's CUDA graph and without), rpc.txt (rpc_latency against
# a separate tscale-server on cuda:0, with and without --cuda-graphs, and on cpu).
# STAGES (space-separated, default all: build golden test layer hot rpc) picks some; SECONDS_PER_ROW (default 0.25) is layer_step's and reference_step's
# --seconds. Each stage's exit status is printed; the script's is the first stage that failed.
set -uo pipefail
out="${1:?usage: gpu-check.sh OUTDIR REFERENCE_DIR [build.sh options]}"
ref="${2:?usage: gpu-check.sh OUTDIR REFERENCE_DIR [build.sh options]}"
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
ref="$(cd "$ref" && pwd)"
stages=" ${STAGES:-build golden test layer hot rpc} "
seconds="${SECONDS_PER_ROW:-0.25}"
status=0

# The deps prefix's libraries, for the binaries the stages run (build.sh sets them for the build).
args=("$@")
for ((i = 0; i < ${#args[@]}; ++i)); do
  if [[ "${args[i]}" == --deps-prefix ]]; then
    lib="${args[i + 1]}/lib/$(gcc -print-multiarch)"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="${args[i + 1]}/bin:$PATH"
  fi
done

stage() {  # stage NAME LOG COMMAND...: runs COMMAND with its output in LOG, and reports
  local name="$1" log="$2" start rc
  shift 2
  start=$(date +%s)
  "$@" >"$log" 2>&1
  rc=$?
  echo "gpu-check: $name: exit $rc in $(($(date +%s) - start)) s ($log)"
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nvcc --version | tail -1
  nproc
} >"$out/env.txt" 2>&1

if [[ "$stages" == *" build "* ]]; then
  # The GPU host cannot install Debian's prometheus or python3-yaml: the tests that need them
  # are reported as skipped (tests/CMakeLists.txt), and listed after the test stage.
  stage build "$out/build.log" bash scripts/build.sh --torch-from-python \
    -DTSCALE_SKIP_MISSING_TOOLS=ON "$@"
fi

if [[ "$stages" == *" golden "* ]]; then
  golden="$(mktemp -d)"
  stage golden "$out/golden.log" bash -c "
    set -e
    python3 tests/gpu/reference_golden.py --reference-dir '$ref' --out '$golden' --device cuda
    TSCALE_TEST_DATA='$golden' TSCALE_EXPECT_BITEXACT=1 build/bin/golden_test \
      --gtest_filter='*OnCuda*:-*grad_accum*'"
fi

if [[ "$stages" == *" test "* ]]; then
  # TSCALE_REFERENCE_DIR: e2e_reference_interop runs against the same reference.
  stage test "$out/ctest.log" bash -c "cd build && TSCALE_REFERENCE_DIR='$ref' ctest -j 8 \
    --output-on-failure --timeout 600"
  grep -E "tests passed|\(Skipped\)|\(Failed\)|\(Timeout\)" "$out/ctest.log" | sed 's/^/gpu-check: /'
  # ctest keeps a skipped entry's output only in its own log: the lines where it says why.
  for name in $(grep -oE "[0-9]+ - [A-Za-z0-9_]+ \(Skipped\)" "$out/ctest.log" | awk '{print $3}'); do
    awk -v n="$name" '$0 ~ "^[0-9]+/[0-9]+ Test: "n"$" {on = 1; next}
                      on && /^<end of output>$/ {on = 0} on' build/Testing/Temporary/LastTest.log |
      grep -i "skip" | tail -3 | sed "s/^/gpu-check: $name: /"
  done
fi

if [[ "$stages" == *" layer "* ]]; then
  stage layer_step "$out/layer.txt" build/bin/layer_step --device cuda:0 --seconds "$seconds"
  stage layer_step_model "$out/model.txt" build/bin/layer_step --device cuda:0 \
    --seconds "$seconds" --sizes 4096 --batches 1,16,256 --model true
  stage reference_step "$out/reference.txt" python3 bench/reference_step.py \
    --reference-dir "$ref" --seconds "$seconds" --ours "$out/layer.txt"
fi

if [[ "$stages" == *" hot "* ]]; then
  # The CUDA rows with the step's CUDA graph (the default) and without, one after the other.
  stage hot_path "$out/hot.txt" bash -c "set -e
    for graphs in true false; do
      build/bin/hot_path --device cuda:0 --in 4096 --out 4096 --batch 16 --iters 200 --warmup 20 \
        --cuda-graphs \$graphs
      build/bin/hot_path --device cuda:0 --in 4096 --out 4096 --batch 16 --compute BF16 \
        --iters 200 --warmup 20 --cuda-graphs \$graphs
      build/bin/hot_path --device cuda:0 --in 64 --out 64 --batch 1 --iters 200 --warmup 20 \
        --cuda-graphs \$graphs
    done
    build/bin/hot_path --device cpu --in 64 --out 64 --batch 1 --iters 200 --warmup 20"
fi

if [[ "$stages" == *" rpc "* ]]; then
  rpc() {  # rpc DEVICE IN BATCH [SERVER FLAGS]: rpc_latency against a tscale-server on DEVICE
    local port=$((50900 + RANDOM % 90)) pid rc
    build/bin/tscale-server --listen "127.0.0.1:$port" --device "$1" "${@:4}" \
      >"$logs/server-$1.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      build/bin/tscale --server "127.0.0.1:$port" health >/dev/null 2>&1 && break
      sleep 0.1
    done
    echo "== server on $1, layer $2x$2, batch $3 ${*:4}"
    build/bin/rpc_latency --server "127.0.0.1:$port" --device "$1" --in "$2" --out "$2" \
      --batch "$3" --iters 500 --warmup 50
    rc=$?
    kill -TERM "$pid"
    wait "$pid"
    [[ $rc -eq 0 ]] || cat "$logs/server-$1.log"
    return $rc
  }
  logs="$(mktemp -d)"
  stage rpc "$out/rpc.txt" bash -c "$(declare -f rpc); logs='$logs'; set -e
    ${RPC_RUNS:-rpc cuda:0 4096 16; rpc cuda:0 4096 16 --cuda-graphs false; rpc cuda:0 64 1
      rpc cuda:0 64 1 --cuda-graphs false; rpc cpu 64 1; rpc cpu 1024 16}
    echo '== server in the process, cuda:0, layer 4096x4096, batch 16'
    build/bin/rpc_latency --device cuda:0 --in 4096 --out 4096 --batch 16 --iters 500 --warmup 50"
fi
exit $status
