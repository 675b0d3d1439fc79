#!/usr/bin/env bash
# Makes throw-away TLS material in DIR for tests and benchmarks: a CA, a server certificate for
# 127.0.0.1/localhost and a client certificate signed by it, and a self-signed "rogue" client
# certificate nobody trusts. EC P-256 keys, valid 2 days.
set -euo pipefail
dir=$1
cd "$dir"
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj /CN=amaq-test-ca 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
openssl req $ec -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null
openssl req $ec -keyout client.key -out client.csr -subj /CN=amaq-client 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 2>/dev/null
openssl req -x509 $ec -keyout rogue.key -out rogue.pem -days 2 -subj /CN=rogue 2>/dev/null
