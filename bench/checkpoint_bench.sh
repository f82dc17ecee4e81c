#!/usr/bin/env bash
# Checkpoint save/restore throughput of a 100M-weight model against the disk's own write speed,
# measured in the same run on the same folder. Usage: bench/checkpoint_bench.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build/bench-checkpoints}"
mkdir -p "$dir"
echo "disk: $(df -h "$dir" | awk 'NR==2 {print $1 " (" $2 ")"}')"
# 256 MiB written and fsync'd: the disk's sequential write speed with the same durability.
dd if=/dev/zero of="$dir/dd.bin" bs=1M count=256 conv=fsync 2>&1 | tail -n 1 | sed 's/^/dd conv=fsync: /'
rm -f "$dir/dd.bin"
build/bin/checkpoint_bench "$dir" --rows 10240 --cols 10240 --repeat 3
