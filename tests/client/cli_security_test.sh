#!/usr/bin/env bash
# The CLI against a tscale-server with TLS, mutual TLS and bearer tokens: health stays open to
# probes, every other call needs the token; a client without the CA, the certificate or the token
# is refused, each case told apart in its own words and not retried; --tls-server-name for a
# certificate of another name; the server's start line about what is on.
# Usage: cli_security_test.sh TSCALE TSCALE_SERVER MAKE_TEST_CERTS
set -euo pipefail
cli="$1" server="$2" make_certs="$3"
dir="$(mktemp -d)"
pid=""
pid2=""
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  [ -n "$pid2" ] && kill -KILL "$pid2" 2>/dev/null
  rm -rf "$dir"
}
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
# has DESCRIPTION REGEX: the last command's output has a line matching REGEX (grep -E).
has() {
  grep -Eq -- "$2" "$dir/last" || { echo "FAIL: $1: no line matching /$2/"; cat "$dir/last"; exit 1; }
}
# not_retried DESCRIPTION: the last command made one attempt (a set-up that cannot work).
not_retried() {
  if grep -q "retrying in" "$dir/last"; then echo "FAIL: $1: retried"; cat "$dir/last"; exit 1; fi
}

# The server says what protects it (the line after the listening line).
for _ in $(seq 1 50); do grep -q "security:" "$dir/out" && break; sleep 0.1; done
grep -q "^tscale-server: security: TLS on (--tls-cert $dir/server.pem), mutual TLS on (client certificates signed by --tls-client-ca $dir/ca.pem), bearer tokens on (--auth-token-file $dir/tokens)$" "$dir/out" \
  || { echo "FAIL: no security line"; cat "$dir/out"; exit 1; }

expect 0 "health over mutual TLS without a token" "$cli" "${mtls[@]}" health
expect 0 "models with the token" "$cli" "${mtls[@]}" --auth-token-file "$dir/good" models
expect 1 "models without a token" "$cli" "${mtls[@]}" models
grep -q UNAUTHENTICATED "$dir/last"
expect 1 "models with a wrong token" "$cli" "${mtls[@]}" --auth-token-file "$dir/bad" models
grep -q UNAUTHENTICATED "$dir/last"
expect 1 "no client certificate" "$cli" --server "$addr" --timeout 5 --tls-ca "$dir/ca.pem" \
  --auth-token-file "$dir/good" models
has "no client certificate" "^tscale: models: UNAVAILABLE: TLS: $addr requires a client certificate \(mutual TLS\): give --tls-cert FILE and --tls-key FILE$"
not_retried "no client certificate"
expect 1 "a client certificate from another CA" "$cli" --server "$addr" --timeout 5 \
  --tls-ca "$dir/ca.pem" --tls-cert "$dir/stranger.pem" --tls-key "$dir/stranger.key" \
  --auth-token-file "$dir/good" models
has "a client certificate from another CA" "^tscale: models: UNAVAILABLE: TLS: $addr refused this client's certificate \(mutual TLS"
not_retried "a client certificate from another CA"
expect 1 "a CA that did not sign the server" "$cli" --server "$addr" --timeout 5 \
  --tls-ca "$dir/other-ca.pem" --tls-cert "$dir/client.pem" --tls-key "$dir/client.key" \
  --auth-token-file "$dir/good" models
has "a CA that did not sign the server" "^tscale: models: UNAVAILABLE: TLS: the certificate of $addr is not signed by a CA this client trusts \(.*\): give the CA that signed it \(--tls-ca FILE\)$"
not_retried "a CA that did not sign the server"
expect 1 "plaintext" "$cli" --server "$addr" --timeout 5 --auth-token-file "$dir/good" models
has "plaintext" "^tscale: models: UNAVAILABLE: TLS: $addr speaks TLS and this client connected in plaintext: use TLS"
not_retried "plaintext"
# (A token to loopback in plaintext: no warning; the token never left this machine.)
if grep -q "warning" "$dir/last"; then echo "FAIL: plaintext to loopback warned"; cat "$dir/last"; exit 1; fi

# A server whose certificate names tscale.internal only, and one in plaintext.
"$server" --listen 127.0.0.1:0 --tls-cert "$dir/elsewhere.pem" --tls-key "$dir/elsewhere.key" \
  >"$dir/out2" 2>"$dir/err2" &
pid2=$!
for _ in $(seq 1 100); do grep -q "security:" "$dir/out2" && break; sleep 0.1; done
addr2="$(sed -n 's/^tscale-server: listening on //p' "$dir/out2")"
[ -n "$addr2" ] || { cat "$dir/err2"; exit 1; }
grep -q "^tscale-server: security: TLS on (--tls-cert $dir/elsewhere.pem), mutual TLS off, bearer tokens off$" "$dir/out2" \
  || { echo "FAIL: no security line"; cat "$dir/out2"; exit 1; }
expect 1 "a certificate without the address's name" "$cli" --server "$addr2" --timeout 5 \
  --tls-ca "$dir/ca.pem" health
has "a certificate without the address's name" "^tscale: health: UNAVAILABLE: TLS: the certificate of $addr2 does not name 127\.0\.0\.1: .*--tls-server-name NAME$"
not_retried "a certificate without the address's name"
expect 0 "--tls-server-name, as through a tunnel" "$cli" --server "$addr2" --timeout 5 \
  --tls-ca "$dir/ca.pem" --tls-server-name tscale.internal health
kill -TERM "$pid2"
wait "$pid2" || true
"$server" --listen 127.0.0.1:0 >"$dir/out2" 2>"$dir/err2" &
pid2=$!
for _ in $(seq 1 100); do grep -q "security:" "$dir/out2" && break; sleep 0.1; done
addr2="$(sed -n 's/^tscale-server: listening on //p' "$dir/out2")"
[ -n "$addr2" ] || { cat "$dir/err2"; exit 1; }
grep -q "^tscale-server: security: TLS off (plaintext), mutual TLS off, bearer tokens off; anyone who can reach the port can use every call$" "$dir/out2" \
  || { echo "FAIL: no security line"; cat "$dir/out2"; exit 1; }
expect 1 "TLS at a plaintext server" "$cli" --server "$addr2" --timeout 5 --tls-ca "$dir/ca.pem" \
  health
has "TLS at a plaintext server" "^tscale: health: UNAVAILABLE: TLS: $addr2 does not speak TLS \(a plaintext server\?\)"
not_retried "TLS at a plaintext server"
kill -TERM "$pid2"
wait "$pid2" || true
pid2=""

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
