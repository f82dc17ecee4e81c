#!/usr/bin/env bash
# The tscale CLI against a real tscale-server process: every command's exit status and key output.
# usage: cli_test.sh PATH/TO/tscale PATH/TO/tscale-server
set -u

TSCALE=${1:?usage: cli_test.sh TSCALE TSCALE_SERVER}
SERVER_BIN=${2:?usage: cli_test.sh TSCALE TSCALE_SERVER}

work=$(mktemp -d "${TMPDIR:-/tmp}/tscale-cli-test.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null
    # A server that ignores SIGTERM for long is a failure of its own; do not hang on it.
    for _ in $(seq 1 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# run EXPECTED_EXIT ARGS...: runs tscale, keeping its stdout and stderr in $work/out and $work/err.
run() {
  local expected=$1
  shift
  "$TSCALE" "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  echo "--- tscale $* (exit $rc)"
  if [ "$rc" -ne "$expected" ]; then
    fail "tscale $*: exit $rc, expected $expected"
    echo "stdout:"; cat "$work/out"
    echo "stderr:"; cat "$work/err"
  fi
}
# out_has / err_has REGEX: the last run's stdout / stderr has a line matching REGEX (grep -E).
out_has() { grep -Eq -- "$1" "$work/out" || { fail "stdout lacks /$1/"; cat "$work/out"; }; }
err_has() { grep -Eq -- "$1" "$work/err" || { fail "stderr lacks /$1/"; cat "$work/err"; }; }

# ---------------------------------------------------------------- the server

"$SERVER_BIN" --listen 127.0.0.1:0 --device cpu --checkpoint-dir "$work/checkpoints" \
  >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
address=
for _ in $(seq 1 600); do
  address=$(sed -n 's/^tscale-server: listening on //p' "$work/server.out")
  [ -n "$address" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "tscale-server exited before listening:"
    cat "$work/server.out" "$work/server.err"
    exit 1
  fi
  sleep 0.1
done
if [ -z "$address" ]; then
  echo "tscale-server did not print its address within 60 s"
  exit 1
fi
echo "server at $address"
export TSCALE_SERVER=$address

# ---------------------------------------------------------------- usage

run 0 --help
out_has '^usage: tscale '
out_has '^  train '
run 0 create --help
out_has '^usage: tscale .*create ID --spec FILE.json'
run 0 help train
out_has '--loss mse.ce'
run 2
err_has '^usage: tscale '
run 2 bogus
err_has "^tscale: unknown command 'bogus'"
run 2 models --bogus
err_has '^tscale: models: unknown option --bogus'
run 2 info
err_has '^tscale: info: missing arguments'
run 2 info a b
err_has '^tscale: info: too many arguments'
run 2 --timeout abc models
err_has '--timeout: expected a number of seconds'
run 2 --retry-seconds -1 models
err_has "^tscale: models: --retry-seconds: expected a number of seconds >= 0, got '-1'"
run 2 train m --steps 0
err_has '^tscale: train: --steps: expected an integer'
run 2 train m --loss hinge
err_has "--loss: expected mse or ce, got 'hinge'"
run 2 create m
err_has '--spec FILE.json is required'
run 2 delete m --steps
err_has 'unknown option --steps'

# ---------------------------------------------------------------- server

run 0 health
out_has '^server: SERVING$'
out_has '^tscale.v1.TernaryTrainer: SERVING$'
run 0 server-info
out_has '^default_device: +cpu$'
out_has '^devices: +cpu'
out_has '^max_message_bytes: +268435456$'
# Every ServerInfo field.
out_has '^pending_pass_ttl_seconds: +600$'
out_has '^max_models: +1024$'
out_has '^max_device_bytes: +0$'
out_has '^device_bytes_in_use: +0$'
out_has '^group: +none$'

# ---------------------------------------------------------------- models

cat >"$work/spec.json" <<'JSON'
{"layers": [
  {"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 32}},
  {"name": "act", "activation": {"kind": "RELU"}},
  {"name": "fc2", "ternary_linear": {"in_features": 32, "out_features": 10}}
]}
JSON
# lowerCamelCase field names parse too.
cat >"$work/camel.json" <<'JSON'
{"layers": [
  {"name": "fc", "ternaryLinear": {"inFeatures": 16, "outFeatures": 4, "groupSize": 8}},
  {"name": "norm", "ternaryRmsNorm": {"dim": 4}}
]}
JSON
echo '{"layers": [{"name": "fc", "ternary_linear": {"in_features": 8, "out_features": 4}}' \
  >"$work/broken.json"
echo '{"layers": [{"name": "fc", "ternary_linear": {"in_features": 8, "out_features": 0}}]}' \
  >"$work/invalid.json"
# A key twice: JSON parsers keep one of the two values without a word.
echo '{"layers": [{"name": "fc", "ternary_linear": {"in_features": 8, "out_features": 4,
  "in_features": 16}}]}' >"$work/duplicate.json"

run 0 create m1 --spec "$work/spec.json" --seed 7
out_has '^model: +m1$'
out_has '^step: +0$'
out_has '^in_features: +64$'
out_has '^out_features: +10$'
out_has '^ternary_params: +2368$'
run 0 create m2 --spec="$work/camel.json" --device cpu
out_has '^groups: +9$'  # 4 rows x 2 groups, and the norm's one
run 1 create m1 --spec "$work/spec.json"
err_has "^tscale: create: ALREADY_EXISTS: ID: a model 'm1' already exists"
run 1 create m3 --spec "$work/broken.json"
err_has '^tscale: create: INVALID_ARGUMENT: --spec: '
run 1 create m3 --spec "$work/invalid.json"
err_has '^tscale: create: INVALID_ARGUMENT: .*out_features'
# The spec's errors name the option that gave it, then the field in the file.
err_has '^tscale: create: INVALID_ARGUMENT: --spec: layers\[0\] \(fc\)\.ternary_linear\.out_features'
run 1 create m3 --spec "$work/duplicate.json"
err_has "^tscale: create: INVALID_ARGUMENT: --spec: .*duplicate.json: duplicate key 'in_features' in layers\[0\]\.ternary_linear"
run 1 info m3
run 1 create m3 --spec "$work/missing.json"
err_has '^tscale: create: NOT_FOUND: --spec: cannot open '

run 0 models
out_has '^ID +DEVICE +STEP +PARAMS +PERSISTENT_BYTES +PENDING_PASSES$'
out_has '^m1 +cpu +0 +2368 +[0-9]+ +0$'
out_has '^m2 +cpu +0 '
# Global options may follow the command.
run 0 models --server "$address" --timeout 30
out_has '^m1 '

run 0 info m1
out_has '^spec: +\{"layers":\[\{"name":"fc1"'
# Numbers print as numbers (proto3's JSON writes int64 as strings).
out_has '"in_features":64,"out_features":32'
run 1 info nope
err_has '^tscale: info: NOT_FOUND: '

# ---------------------------------------------------------------- training

run 0 train m1 --steps 5 --batch 8 --seed 3
out_has '^trained m1: 5 steps \(step 0 -> 5\)'
out_has '^loss \(mse\): first [0-9.e+-]+, last [0-9.e+-]+$'
out_has '^  fc1 +[0-9.e+-]+$'
out_has '^  fc2 +[0-9.e+-]+$'
# Not a terminal: a progress line per 10% of the steps, the last one at 5/5.
err_has '^train: 5/5  step 5  loss '
run 0 info m1
out_has '^step: +5$'
run 0 train m1 --steps 2 --loss ce --batch 4
out_has '^trained m1: 2 steps \(step 5 -> 7\)'
out_has '^loss \(ce\): '
run 0 train m2 --steps=3 --loss=ce
out_has '\(step 0 -> 3\)'
run 1 train nope --steps 1
err_has '^tscale: train: NOT_FOUND: '

run 0 stats m1
out_has '^model m1 at step 7'
out_has '^LAYER +GROUPS +DRIFT_MEAN +DRIFT_MIN +DRIFT_MAX +DRIFT_ABS_MEAN +SATURATED$'
out_has '^fc1 +64 '
out_has '^fc2 +10 '
out_has '^LAYER .*<=\+inf$'
run 0 stats m1 --per-group
out_has '^fc1: log2 S per group \(64\)$'
out_has '^fc2: log2 S per group \(10\)$'
run 1 stats nope
err_has '^tscale: stats: NOT_FOUND: '

# ---------------------------------------------------------------- state

run 0 export m1 "$work/m1.safetensors"
out_has "^exported m1 to $work/m1.safetensors \\([0-9]+ bytes\\)$"
[ -s "$work/m1.safetensors" ] || fail "export wrote no file"
run 0 import "$work/m1.safetensors" --id copy
out_has '^model: +copy$'
out_has '^step: +7$'
run 0 info copy
out_has '^step: +7$'
out_has '^ternary_params: +2368$'
run 1 import "$work/m1.safetensors" --id copy
err_has "^tscale: import: ALREADY_EXISTS: --id: a model 'copy' already exists; --replace replaces it$"
run 0 train copy --steps 1
run 0 import "$work/m1.safetensors" --id copy --replace --device cpu
out_has '^step: +7$'
run 2 import "$work/m1.safetensors"
err_has '--id ID is required'
run 1 import "$work/none.safetensors" --id x
err_has '^tscale: import: NOT_FOUND: '
run 1 export nope "$work/nope.safetensors"
err_has '^tscale: export: NOT_FOUND: '
[ ! -e "$work/nope.safetensors" ] || fail "a failed export left a file"

# Why an export failed: the OS's reason.
run 1 export m1 "$work/no/such/folder/m1.safetensors"
err_has '^tscale: export: INTERNAL: .*No such file or directory'
# To standard output: the file alone, the summary on stderr.
"$TSCALE" export m1 - >"$work/stdout.safetensors" 2>"$work/err"
[ "$?" -eq 0 ] || fail "export m1 - failed: $(cat "$work/err")"
err_has '^exported m1 to standard output \([0-9]+ bytes\)$'
run 0 import "$work/stdout.safetensors" --id from-stdout
out_has '^step: +7$'
run 0 delete from-stdout

# ---------------------------------------------------------------- forward (.npy in, .npy out)

# make_npy FILE ROWS COLS: a float32 .npy of zeros, version 1.
make_npy() {
  local header="{'descr': '<f4', 'fortran_order': False, 'shape': ($2, $3), }"
  while [ $(( (10 + ${#header} + 1) % 64 )) -ne 0 ]; do header="$header "; done
  local len=$(( ${#header} + 1 ))
  { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $((len % 256)))\\x$(printf %02x $((len / 256)))"
    printf '%s\n' "$header"; head -c $(( $2 * $3 * 4 )) /dev/zero; } >"$1"
}
make_npy "$work/in.npy" 3 64
run 0 forward m1 "$work/in.npy" "$work/out.npy"
out_has "^forward m1 at step 7: input \[3, 64\] -> output \[3, 10\], written to $work/out.npy$"
[ "$(head -c 6 "$work/out.npy" | tail -c 5)" = "NUMPY" ] || fail "forward wrote no .npy"
grep -aq "'shape': (3, 10)" "$work/out.npy" || fail "forward's output lacks shape (3, 10)"
[ "$(stat -c %s "$work/out.npy")" -eq $(( 128 + 3 * 10 * 4 )) ] || fail "forward's output size"
"$TSCALE" forward m1 "$work/in.npy" - >"$work/stdout.npy" 2>"$work/err"
cmp -s "$work/stdout.npy" "$work/out.npy" || fail "forward to - differs from forward to a file"
err_has '^forward m1 at step 7: input \[3, 64\] -> output \[3, 10\]$'
make_npy "$work/wrong.npy" 3 63
run 1 forward m1 "$work/wrong.npy" "$work/out2.npy"
err_has '^tscale: forward: INVALID_ARGUMENT: INPUT: expected FP32 \[batch >= 1, 64\], got FP32 \[3, 63\]'
echo 'not an array' >"$work/bad.npy"
run 1 forward m1 "$work/bad.npy" "$work/out2.npy"
err_has '^tscale: forward: INVALID_ARGUMENT: INPUT .*: not a .npy file'
run 1 forward m1 "$work/missing.npy" "$work/out2.npy"
err_has '^tscale: forward: NOT_FOUND: INPUT: cannot open .*No such file or directory'

run 0 delete copy
out_has '^deleted copy$'
run 1 info copy
err_has '^tscale: info: NOT_FOUND: '
run 1 delete copy
err_has '^tscale: delete: NOT_FOUND: '

# ---------------------------------------------------------------- checkpoints

run 0 create c --spec "$work/spec.json" --seed 1
run 0 save c
out_has '^saved c at step 0 as step-00000000 \([0-9]+ bytes, crc32c [0-9a-f]{8}\)$'
run 0 train c --steps 2
run 0 save c
run 0 checkpoints c
out_has '^NAME +STEP +BYTES +CRC32C$'
out_has '^step-00000000 +0 +[0-9]+ +[0-9a-f]{8}$'
out_has '^step-00000002 +2 '
# Rewinding in place would drop step 2: refused, naming the ways on.
run 1 restore c --name step-00000000
err_has '^tscale: restore: FAILED_PRECONDITION: .*step-00000002.*--as NEW_ID.*--discard-newer'
# A branch: c keeps its model and both checkpoints.
run 0 restore c --name step-00000000 --as c0
out_has '^model: +c0$'
out_has '^step: +0$'
run 0 info c
out_has '^step: +2$'
run 0 checkpoints c
out_has '^step-00000002 '
run 0 checkpoints c0
out_has '^step-00000000 +0 '
run 2 restore c --as c1 --discard-newer
err_has '^tscale: restore: --as and --discard-newer'
run 1 restore c --name step-00000000 --as c
err_has "^tscale: restore: INVALID_ARGUMENT: --as: expected an id other than"
run 0 restore c --name step-00000000 --discard-newer
out_has '^model: +c$'
out_has '^step: +0$'
run 0 checkpoints c
[ "$(grep -c '^step-' "$work/out")" -eq 1 ] || fail "restore --discard-newer kept the later checkpoint"
run 1 restore c --name step-00000042
err_has '^tscale: restore: NOT_FOUND: .*step-00000042'
# Deleted without its checkpoints: they go to the trash, the id is free, --deleted brings them back.
run 0 delete c
out_has '^deleted c$'
run 1 checkpoints c
err_has '^tscale: checkpoints: NOT_FOUND: '
run 0 create c --spec "$work/spec.json" --seed 2
run 0 delete c
run 0 restore c --deleted
out_has '^model: +c$'
out_has '^step: +0$'
run 0 delete c0 --delete-checkpoints
out_has '^deleted c0 and its checkpoints$'
run 1 checkpoints c0
err_has '^tscale: checkpoints: NOT_FOUND: '
run 1 restore c0 --deleted
err_has '^tscale: restore: NOT_FOUND: --deleted: '
run 1 save nope
err_has '^tscale: save: NOT_FOUND: '

# ---------------------------------------------------------------- pending passes

run 0 release m1
out_has '^released 0 pending passes of m1; 0 pending$'
run 1 release nope
err_has '^tscale: release: NOT_FOUND: '
run 2 release
err_has '^tscale: release: missing arguments'

# ---------------------------------------------------------------- unreachable server

run 1 --server 127.0.0.1:1 --timeout 5 health
err_has '^tscale: health: UNAVAILABLE: no tscale-server answering at 127.0.0.1:1 \(connection refused\)$'
err_has 'attempt 1 failed \(UNAVAILABLE\); retrying'
# Without a port: 50051 (gRPC alone would take 443). (Nothing listens there during the tests.)
run 1 --server 127.0.0.1 --timeout 3 health
err_has 'no tscale-server answering at 127.0.0.1:50051 \(connection refused\)'
# --retry-seconds 0: no retries at all.
run 1 --server 127.0.0.1:1 --retry-seconds 0 health
if grep -q 'retrying' "$work/err"; then fail "--retry-seconds 0 retried"; cat "$work/err"; fi
# A token in plaintext to another machine: a warning (nothing listens at the TEST-NET address;
# the call fails either way). To this machine (loopback) it stays quiet.
echo "a-token" >"$work/token"
run 1 --server 192.0.2.1:1 --timeout 2 --retry-seconds 0 --auth-token-file "$work/token" health
err_has '^tscale: warning: --auth-token-file: the token goes to 192\.0\.2\.1:1 in plaintext'
run 0 --auth-token-file "$work/token" health
if grep -q 'warning' "$work/err"; then fail "a token to loopback warned"; cat "$work/err"; fi

echo
if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all CLI checks passed"
