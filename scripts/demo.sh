#!/usr/bin/env bash
# What `make run` shows until the embedded training demo lands: a real HF checkpoint (the tiny
# Llama fixture) run unsplit and split at every layer, with the split's exactness checked.
set -euo pipefail
build=${1:-build}
model=tests/data/hf/llama-gqa
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$build/amaq" forward --model "$model" --ids "$model/io.safetensors" --out "$out/full.safetensors"
for k in 1 2 3; do
  "$build/amaq" forward --model "$model" --split "$k" --adapter "$model/adapter" --ids "$model/io.safetensors" \
    --out "$out/split$k.safetensors"
done
