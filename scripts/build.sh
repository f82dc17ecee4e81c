#!/usr/bin/env bash
# Configures and builds tscale into build/ (Release). Extra arguments go to cmake's configure step,
# e.g. scripts/build.sh -DCMAKE_BUILD_TYPE=Debug. JOBS overrides the parallelism; TARGETS, when set,
# builds only those targets (space-separated); BUILD_ARGS goes to the build tool (e.g. "-- -k").
#
# On a CUDA host, against the LibTorch inside an installed PyTorch (with the CUDA kernels of
# server/cuda when nvcc is found):
#   scripts/build.sh --torch-from-python [--deps-prefix DIR] [-DCMAKE_CUDA_ARCHITECTURES=90]
# --torch-from-python finds LibTorch's CMake config with `python3 -c 'import torch; ...'`.
# --deps-prefix DIR uses gRPC, protobuf, Abseil, prometheus-cpp and the rest from Debian packages
# unpacked under DIR (e.g. /opt/deps/usr after `dpkg -x pkg.deb /opt/deps` for each package), for
# hosts without a package registry; see docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${JOBS:-$(nproc)}"
args=()
prefixes=()
torch_cmake=""
deps=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --torch-from-python)
      torch_cmake="$(${PYTHON:-python3} -c 'import torch; print(torch.utils.cmake_prefix_path)')"
      shift ;;
    --deps-prefix)
      deps="${2:?--deps-prefix: expected a folder}"
      shift 2 ;;
    *)
      args+=("$1")
      shift ;;
  esac
done
if [[ -n "$deps" ]]; then
  lib="$deps/lib/$(gcc -print-multiarch)"
  export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$deps/bin:$PATH"
  prefixes+=("$deps")
  # protobuf first: PyTorch's CMake config would otherwise find its own internal copy.
  args+=("-DProtobuf_PROTOC_EXECUTABLE=$deps/bin/protoc" "-DProtobuf_INCLUDE_DIR=$deps/include"
         "-DProtobuf_LIBRARY=$lib/libprotobuf.so")
fi
[[ -n "$torch_cmake" ]] && prefixes+=("$torch_cmake")
[[ -n "$deps" ]] && prefixes+=("$lib/cmake")
if [[ ${#prefixes[@]} -gt 0 ]]; then
  args+=("-DCMAKE_PREFIX_PATH=$(IFS=';'; echo "${prefixes[*]}")")
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" ${args[@]+"${args[@]}"}
if [[ -n "${TARGETS:-}" ]]; then
  # shellcheck disable=SC2086
  cmake --build build -j "$jobs" --target $TARGETS ${BUILD_ARGS:-}
else
  # shellcheck disable=SC2086
  cmake --build build -j "$jobs" ${BUILD_ARGS:-}
fi
echo "build: binaries in build/bin/"
