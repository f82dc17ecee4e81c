#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts a tscale server on a free local port, trains
# a ternary MLP on scikit-learn's digits over gRPC from the Python client, and stops the server.
# Extra arguments go to the example (client/python/examples/train_digits.py), e.g.
#   scripts/demo.sh --epochs 3 --hidden 128
# The server's log is build/demo/server.log, the training curves build/demo/digits.png.
# Needs a Debian 12 machine (install-deps uses apt-get: root or sudo when something is missing).
# SKIP_BUILD=1 skips install-deps and build (when the build is up to date); then BUILD_DIR may
# name another build directory than build/ (it needs bin/tscale-server and python/).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${BUILD_DIR:-build}"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if [ "$build_dir" != build ]; then
    echo "demo: BUILD_DIR=$build_dir needs SKIP_BUILD=1 (scripts/build.sh builds into build/)" >&2
    exit 2
  fi
  bash scripts/install-deps.sh
  bash scripts/build.sh
fi

python=/usr/bin/python3  # Debian's: python3-grpcio and friends live there
demo_dir="$build_dir/demo"
log="$demo_dir/server.log"
mkdir -p "$demo_dir"

server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: stopping the server (pid $server_pid)" >&2
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'echo "demo: failed; server log: $log" >&2' ERR

# No --device: the server puts models on CUDA when it has a GPU, else on the CPU.
"$build_dir/bin/tscale-server" --listen 127.0.0.1:0 >"$log" 2>&1 &
server_pid=$!

address=""
for _ in $(seq 1 600); do
  address="$(sed -n 's/^tscale-server: listening on \([^ ]*\).*$/\1/p' "$log" | head -n 1)"
  [ -n "$address" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: the server exited before listening:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$address" ]; then
  echo "demo: the server did not print its listening line within 60 s:" >&2
  cat "$log" >&2
  exit 1
fi
echo "demo: tscale-server (pid $server_pid) listening on $address; log in $log"

export PYTHONPATH="$PWD/$build_dir/python${PYTHONPATH:+:$PYTHONPATH}"
# Wait for health SERVING (standard gRPC health checking).
"$python" - "$address" <<'EOF'
import sys, tscale
with tscale.Client(sys.argv[1], timeout=5) as client:
    client.wait_ready(timeout=60)
    print(f"demo: health {client.health()}; services {', '.join(client.list_services())}")
EOF

"$python" client/python/examples/train_digits.py --server "$address" \
  --plot "$demo_dir/digits.png" "$@"

echo "demo: stopping the server with SIGTERM"
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
if [ "$status" -ne 0 ]; then
  echo "demo: the server exited with status $status; log:" >&2
  cat "$log" >&2
  exit 1
fi
echo "demo: server exited cleanly (status 0); plot in $demo_dir/digits.png"
