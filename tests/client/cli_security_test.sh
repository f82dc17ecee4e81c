#!/usr/bin/env bash
# The CLI against a tscale-server with TLS, mutual TLS and bearer tokens: health stays open to
# probes, every other call needs the token; a client without the CA, the certificate or the token
# is refused. Usage: cli_security_test.sh TSCALE TSCALE_SERVER MAKE_TEST_CERTS
set -euo pipefail
cli="$1" server="$2" make_certs="$3"
dir="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
bash "$make_certs" "$dir"
echo "token-one" > "$dir/tokens"
echo "token-one" > "$dir/good"
echo "token-two" > "$dir/bad"

"$server" --listen 127.0.0.1:0 --tls-cert "$dir/server.pem" --tls-key "$dir/server.key" \
  --tls-client-ca "$dir/ca.pem" --auth-token-file "$dir/tokens" >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 1 100); do grep -q "listening on" "$dir/out" && break; sleep 0.1; done
addr="$(sed -n 's/^tscale-server: listening on //p' "$dir/out")"
[ -n "$addr" ] || { cat "$dir/err"; exit 1; }
mtls=(--server "$addr" --timeout 5 --tls-ca "$dir/ca.pem" --tls-cert "$dir/client.pem" --tls-key "$dir/client.key")

expect() {  # expect STATUS DESCRIPTION COMMAND...
  local want="$1" what="$2"; shift 2
  local got=0
  "$@" >"$dir/last" 2>&1 || got=$?
  if [ "$got" != "$want" ]; then
    echo "FAIL: $what: exit $got, expected $want"; cat "$dir/last"; exit 1
  fi
  echo "ok: $what"
}
expect 0 "health over mutual TLS without a token" "$cli" "${mtls[@]}" health
expect 0 "models with the token" "$cli" "${mtls[@]}" --auth-token-file "$dir/good" models
expect 1 "models without a token" "$cli" "${mtls[@]}" models
grep -q UNAUTHENTICATED "$dir/last"
expect 1 "models with a wrong token" "$cli" "${mtls[@]}" --auth-token-file "$dir/bad" models
grep -q UNAUTHENTICATED "$dir/last"
expect 1 "no client certificate" "$cli" --server "$addr" --timeout 5 --tls-ca "$dir/ca.pem" \
  --auth-token-file "$dir/good" models
expect 1 "a client certificate from another CA" "$cli" --server "$addr" --timeout 5 \
  --tls-ca "$dir/ca.pem" --tls-cert "$dir/stranger.pem" --tls-key "$dir/stranger.key" \
  --auth-token-file "$dir/good" models
expect 1 "a CA that did not sign the server" "$cli" --server "$addr" --timeout 5 \
  --tls-ca "$dir/other-ca.pem" --tls-cert "$dir/client.pem" --tls-key "$dir/client.key" \
  --auth-token-file "$dir/good" models
expect 1 "plaintext" "$cli" --server "$addr" --timeout 5 --auth-token-file "$dir/good" models

# SIGHUP reads the tokens again.
echo "token-two" > "$dir/tokens"
kill -HUP "$pid"
for _ in $(seq 1 50); do grep -q "SIGHUP" "$dir/err" && break; sleep 0.1; done
expect 0 "the new token after SIGHUP" "$cli" "${mtls[@]}" --auth-token-file "$dir/bad" models
expect 1 "the old token after SIGHUP" "$cli" "${mtls[@]}" --auth-token-file "$dir/good" models

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" = 0 ] || { echo "FAIL: server exit $status"; cat "$dir/err"; exit 1; }
echo "cli security: all checks passed"
