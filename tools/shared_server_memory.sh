#!/usr/bin/env bash
# Resident memory of one `amaq server` serving N LoRA runs at once (issue 16): the frozen weights of
# the server's layers are held once, so each run adds only what it owns (its adapter, their
# gradients, AdamW's moments). For each N, a fresh server; one warm-up run first (it pays the
# one-time costs: the weights' load, the compute thread's pools), then N clients started together.
# The server's resident memory (VmRSS, and its peak VmHWM) is read from /proc at each stage, and the
# target is checked: peak with N runs <= 1.1 x (base + N x owned), where owned is the server's own
# estimate of what a run owns (logged at start) and base = resident after the warm-up run - owned.
# Also the steps the N runs completed per second of wall time (client start-up included).
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

kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }
client() {  # seed port
  "$AMAQ" --threads 1 client --model model --split 2 --data train.txt --tokenizer byte --steps 6 --batch 2 \
    --seq-len 64 --lora-r 8 --seed "$1" --quiet --run-dir "clients/$1" --connect "127.0.0.1:$2" 2>"clients/$1.log"
}

for n in $COUNTS; do
  rm -rf srv clients && mkdir -p srv clients
  "$AMAQ" --threads 2 server --model model --split 2 --listen 127.0.0.1:0 --run-dir srv --max-runs "$n" \
    --max-sessions "$n" >srv/out 2>srv/log &
  spid=$!
  for _ in $(seq 300); do grep -q listening srv/out 2>/dev/null && break; sleep 0.1; done
  port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' srv/out)
  idle=$(kb VmRSS "$spid")
  client 0 "$port"
  warm=$(kb VmRSS "$spid")
  pids=()
  t0=$(date +%s.%N)
  for i in $(seq "$n"); do
    client "$i" "$port" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  t1=$(date +%s.%N)
  peak=$(kb VmHWM "$spid")
  threads=$(kb Threads "$spid")
  owned=$(sed -n 's/.*each run owns about \([0-9.]*\) MB.*/\1/p' srv/log)
  kill "$spid" && wait "$spid" || true
  awk -v n="$n" -v idle="$idle" -v warm="$warm" -v peak="$peak" -v owned="$owned" -v thr="$threads" -v t0="$t0" \
    -v t1="$t1" 'BEGIN {
    idle *= 1.024e-3; warm *= 1.024e-3; peak *= 1.024e-3;
    base = warm - owned; predicted = base + n * owned;
    printf "{\"runs\": %d, \"idle_rss_mb\": %.0f, \"after_warmup_rss_mb\": %.0f, \"peak_rss_mb\": %.0f, ", n, idle, warm, peak
    printf "\"owned_per_run_mb\": %.1f, \"predicted_mb\": %.0f, \"peak_over_predicted\": %.3f, ", owned, predicted, peak / predicted
    printf "\"extra_per_run_mb\": %.1f, \"threads\": %d, \"seconds\": %.2f, \"steps_per_second\": %.2f}\n",
           (n > 0 ? (peak - base) / n : 0), thr, t1 - t0, 6 * n / (t1 - t0) }'
done | tee "$WORK/../shared_server_memory.jsonl"
