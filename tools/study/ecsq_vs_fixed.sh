#!/usr/bin/env bash
# Entropy-coded scalar quantization against fixed precision at about the same measured bits (issue
# 17): `amaq demo`'s string reversal from scratch (600 steps), activations through each codec,
# gradients through fixed 6-bit (or BWD). Per seed and codec, one line: codec, seed, exact match,
# validation loss, effective forward bits per element (packet and frame bytes), backward bits.
#
# Usage: tools/study/ecsq_vs_fixed.sh [BUILD_DIR] ["1 2 3"] ["ecsq:bits=3 fixed:bits=3,gran=token ..."] [BWD]
set -euo pipefail
BUILD=${1:-build}
SEEDS=${2:-"1 2 3"}
CODECS=${3:-"ecsq:bits=3 fixed:bits=3,gran=token ecsq:bits=2 fixed:bits=2,gran=token"}
BWD=${4:-fixed:bits=6}
AMAQ=$(realpath "$BUILD/amaq")
WORK=$(realpath "$BUILD")/ecsq-vs-fixed
mkdir -p "$WORK"
for s in $SEEDS; do
  for c in $CODECS; do
    dir="$WORK/$(echo "$c-$BWD" | tr ':,=' '___')-s$s"
    rm -rf "$dir"
    "$AMAQ" demo --dir "$dir" --only amaq --quiet --seed "$s" --amaq-fwd "$c" --amaq-bwd "$BWD" >"$dir.log" 2>&1
    summary="$dir/amaq/summary.txt"
    em=$(grep -oE 'exact match [0-9.]+%' "$summary" | grep -oE '[0-9.]+')
    loss=$(grep -oE 'eval at step [0-9]+: loss [0-9.]+' "$summary" | awk '{print $NF}')
    bits=$(grep -E '^effective bits/elem' "$summary" | awk '{print $3, $4}')
    echo "{\"codec\":\"$c\",\"bwd_codec\":\"$BWD\",\"seed\":$s,\"exact_match\":$em,\"val_loss\":$loss,\"bits_fwd\":${bits% *},\"bits_bwd\":${bits#* }}"
  done
done
