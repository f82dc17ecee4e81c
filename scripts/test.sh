#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test; ends with ctest's summary.
#
# Options (before any arguments for ctest, which go to the main run):
#   --sanitize  also build build-asan (-DTSCALE_SANITIZE=ON: ASan + UBSan) and run every test
#               but the deploy checks there (unit, integration, client, reliability, and the e2e
#               tests against the instrumented tscale-server)
#   --fuzz      also build build-fuzz (clang, -DTSCALE_FUZZ=ON) and run each libFuzzer target for
#               TSCALE_FUZZ_SECONDS (default 30) from its seed corpus
#   --images    also build the cpu and demo images with buildah and run them with podman
#               (scripts/images.sh: the image checks, each Kubernetes variant, compose as a pod);
#               needs root. Not part of .ci/run: it adds 13-16 minutes on 2 cores
#   --long      long runs: exports TSCALE_LONG=1 (load and soak tests run longer) and fuzz targets
#               run TSCALE_FUZZ_SECONDS (default 300 here) each
# Every stage runs even when an earlier one failed; the exit status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=0
fuzz=0
images=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --fuzz) fuzz=1 ;;
    --images) images=1 ;;
    --long)
      export TSCALE_LONG=1
      export TSCALE_FUZZ_SECONDS=${TSCALE_FUZZ_SECONDS:-300}
      ;;
    *) break ;;
  esac
  shift
done

jobs="${JOBS:-$(nproc)}"
failed=()
stage() {  # stage NAME COMMAND...: runs a stage, records its failure, prints its time
  local name=$1 start=$SECONDS
  shift
  echo "=== test.sh: $name"
  if "$@"; then
    echo "=== test.sh: $name passed in $((SECONDS - start)) s"
  else
    echo "=== test.sh: $name FAILED after $((SECONDS - start)) s"
    failed+=("$name")
  fi
}

main_tests() {
  bash scripts/build.sh && (cd build && ctest --output-on-failure -j "$jobs" "$@")
}

# RelWithDebInfo: sanitizer reports name files and lines. ctest in these builds sets the
# sanitizers' options (see TSCALE_SANITIZE in CMakeLists.txt).
sanitizer_tests() {
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTSCALE_SANITIZE=ON &&
    cmake --build build-asan -j "$jobs" &&
    (cd build-asan && ctest --output-on-failure -j "$jobs" -LE deploy)
}

fuzz_tests() {
  cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
      -DTSCALE_FUZZ=ON -DTSCALE_BUILD_TESTS=OFF &&
    cmake --build build-fuzz -j "$jobs" --target safetensors_fuzz tensor_proto_fuzz spec_fuzz \
      import_state_fuzz &&
    (cd build-fuzz && ctest --output-on-failure -j "$jobs" -L fuzz)
}

if [ "$images" = 1 ]; then bash scripts/install-deps.sh --images; else bash scripts/install-deps.sh; fi
stage "tests" main_tests "$@"
if [ "$sanitize" = 1 ]; then stage "sanitizer tests (build-asan)" sanitizer_tests; fi
if [ "$fuzz" = 1 ]; then stage "fuzzing (build-fuzz)" fuzz_tests; fi
if [ "$images" = 1 ]; then stage "images (build-images)" bash scripts/images.sh; fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}"
  exit 1
fi
echo "test.sh: all stages passed"
