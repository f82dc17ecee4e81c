#!/usr/bin/env bash
# Configures and builds tscale into build/ (Release). Extra arguments go to cmake's configure step,
# e.g. scripts/build.sh -DCMAKE_BUILD_TYPE=Debug. JOBS overrides the parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${JOBS:-$(nproc)}"
cmake -S . -B build -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" "$@"
cmake --build build -j "$jobs"
echo "build: binaries in build/bin/"
