#!/usr/bin/env bash
# Writes a test CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all
# signed by that CA, into DIR; a server certificate of that CA for another name only
# (elsewhere.pem: DNS:tscale.internal); and a second CA with a client certificate of its own. For
# the TLS tests only: one day of validity, unencrypted keys.
set -euo pipefail
dir="${1:?usage: make_test_certs.sh DIR}"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -keyout ca.key -out ca.pem \
  -subj "/CN=tscale test CA" 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" -subj "/CN=$who" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$who.ext"
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile "$who.ext" -out "$who.pem" 2>/dev/null
done
# A second CA that signed nothing of the above.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -keyout other-ca.key -out other-ca.pem \
  -subj "/CN=another CA" 2>/dev/null
# A client certificate that CA signed: valid, but not for a server that trusts only ca.pem.
openssl req -newkey rsa:2048 -nodes -keyout stranger.key -out stranger.csr -subj "/CN=stranger" \
  2>/dev/null
openssl x509 -req -in stranger.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -days 1 \
  -extfile client.ext -out stranger.pem 2>/dev/null
# A server certificate the CA signed for another name than the test servers' addresses: what a
# client reaching the server through a tunnel or proxy meets.
openssl req -newkey rsa:2048 -nodes -keyout elsewhere.key -out elsewhere.csr -subj "/CN=elsewhere" \
  2>/dev/null
printf 'subjectAltName=DNS:tscale.internal\n' > elsewhere.ext
openssl x509 -req -in elsewhere.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
  -extfile elsewhere.ext -out elsewhere.pem 2>/dev/null
