#!/usr/bin/env bash
# Resident memory of one `amaq server` serving N LoRA runs at once (issue 16): the frozen weights of
# the server's layers are held once, so each run adds only what it owns (LoRA, AdamW state, codec
# state, its step's activations). For each N, a fresh server and N clients started together; the
# server's peak RSS (VmHWM) is read from /proc when the runs end, and the steps all runs completed per
# second of wall time (client start-up included).
#
# Usage: tools/shared_server_memory.sh [BUILD_DIR] ["1 4 8 16"]
# Model: hidden 1024, 8 layers, 16 heads / 8 KV, MLP 2816, byte vocabulary; split 2, so the server
# holds 6 layers (283 MB of fp32 weights). Clients: LoRA r=8, batch 2 x 64, 6 steps, one thread each.
set -euo pipefail
BUILD=${1:-build}
COUNTS=${2:-"1 4 8 16"}
AMAQ=$(realpath "$BUILD/amaq")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(realpath "$BUILD")/shared-server-memory
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
"$AMAQ" init-model --out model --hidden 1024 --layers 8 --heads 16 --kv-heads 8 --intermediate 2816 >/dev/null
python3 "$ROOT/tools/ref/word_corpus.py" train.txt

for n in $COUNTS; do
  rm -rf srv clients && mkdir -p srv clients
  "$AMAQ" --threads 2 server --model model --split 2 --listen 127.0.0.1:0 --run-dir srv --exit-after-runs "$n" --max-runs "$n" \
    --max-sessions "$n" >srv/out 2>srv/log &
  spid=$!
  for _ in $(seq 300); do grep -q listening srv/out 2>/dev/null && break; sleep 0.1; done
  port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' srv/out)
  pids=()
  t0=$(date +%s.%N)
  for i in $(seq "$n"); do
    "$AMAQ" --threads 1 client --model model --split 2 --data train.txt --tokenizer byte --steps 6 --batch 2 \
      --seq-len 64 --lora-r 8 --seed "$i" --quiet --run-dir "clients/$i" --connect "127.0.0.1:$port" \
      2>"clients/$i.log" &
    pids+=($!)
  done
  hwm=0
  while kill -0 "$spid" 2>/dev/null; do
    v=$(awk '/VmHWM/ {print $2}' "/proc/$spid/status" 2>/dev/null || true)
    [[ -n "$v" ]] && hwm=$v
    sleep 0.2
  done
  for p in "${pids[@]}"; do wait "$p"; done
  wait "$spid" || true
  awk -v n="$n" -v hwm="$hwm" -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN {
    printf "{\"runs\": %d, \"server_peak_rss_mb\": %d, \"seconds\": %.2f, \"steps_per_second\": %.2f}\n",
           n, hwm / 1024, t1 - t0, 6 * n / (t1 - t0) }'
done | tee "$WORK/../shared_server_memory.jsonl"
