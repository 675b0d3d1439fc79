#!/usr/bin/env bash
# CPU step time of `amaq train` against the plain PyTorch LoRA loop a user would write instead
# (tools/ref/plain_lora_loop.py, Debian's python3-torch), same shapes, side by side; and amaq as two
# processes (server + client over loopback TCP) against one. Rounds are interleaved (peer, one
# process, two processes; the last two swap every round) so that a noisy neighbour hits all three alike.
#
# Usage: tools/cpu_step_bench.sh [BUILD_DIR] [ROUNDS]   (make cpu-bench)
# Shapes (issue 20): 11.9M-parameter Llama (hidden 512, 4 layers, 8 heads / 4 KV, MLP 1376, byte
# vocabulary 259), split 2, batch 8 x 128, LoRA r=8 on every linear layer, AdamW, clip 1, fp32,
# 2 threads. Each run's median step time over steps 6..40; JSON in BUILD_DIR/cpu_step_bench.json.
set -euo pipefail
BUILD=${1:-build}
ROUNDS=${2:-6}
THREADS=${THREADS:-2}
STEPS=40
AMAQ=$(realpath "$BUILD/amaq")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
if ! $PY -c 'import torch' 2>/dev/null; then
  echo "cpu_step_bench: Debian's python3-torch is missing: sudo apt-get install python3-torch (scripts/setup.sh --bench)" >&2
  exit 2
fi
WORK=$(realpath "$BUILD")/cpu-step-bench
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
"$AMAQ" init-model --out model --hidden 512 --layers 4 --heads 8 --kv-heads 4 --intermediate 1376 >/dev/null
$PY "$ROOT/tools/ref/word_corpus.py" train.txt
COMMON=(--model model --split 2 --data train.txt --tokenizer byte --steps $STEPS --batch 8 --seq-len 128 --lr 1e-3
        --lora-r 8 --clip 1 --quiet)

median_step() {  # RUN_DIR -> median seconds per step over steps 6.. (from the run's metrics)
  $PY - "$1" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"fwd_bits"' in l]
print(round(statistics.median(r["tokens"] / r["tokens_per_second"] for r in rows[5:]), 4))
EOF
}

run_one() {
  rm -rf one && "$AMAQ" --threads "$THREADS" train "${COMMON[@]}" --run-dir one
  o=$(median_step one)
}
run_two() {
  rm -rf two srv && mkdir srv
  "$AMAQ" --threads "$THREADS" server --model model --split 2 --listen 127.0.0.1:0 --run-dir srv --exit-after-runs 1 >srv/out 2>srv/log &
  local spid=$!
  for _ in $(seq 100); do grep -q listening srv/out 2>/dev/null && break; sleep 0.1; done
  local port
  port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' srv/out)
  "$AMAQ" --threads "$THREADS" client "${COMMON[@]}" --run-dir two --connect "127.0.0.1:$port"
  wait $spid
  t=$(median_step two)
}

peer=() one=() two=()
for ((i = 1; i <= ROUNDS; i++)); do
  p=$($PY "$ROOT/tools/ref/plain_lora_loop.py" --threads "$THREADS" --steps $STEPS | $PY -c 'import json,sys; print(json.load(sys.stdin)["step_s"])')
  # One and two processes swap places every round, so that neither always runs right after the peer.
  if ((i % 2)); then run_one && run_two; else run_two && run_one; fi
  echo "round $i: plain PyTorch $p s, amaq one process $o s, amaq two processes $t s" >&2
  peer+=("$p") one+=("$o") two+=("$t")
done

$PY - "${peer[*]}" "${one[*]}" "${two[*]}" "$THREADS" <<'EOF' | tee "$WORK/../cpu_step_bench.json"
import json, statistics, sys
peer, one, two = ([float(x) for x in a.split()] for a in sys.argv[1:4])
med = statistics.median
print(json.dumps({
    "bench": "cpu_step", "threads": int(sys.argv[4]), "rounds": len(peer),
    "shape": "llama hidden 512, 4 layers, 8/4 heads, MLP 1376, vocab 259; batch 8 x 128; LoRA r=8 all linear; fp32",
    "plain_pytorch_step_s": med(peer), "amaq_one_process_step_s": med(one), "amaq_two_processes_step_s": med(two),
    "speedup_one_process_vs_plain": round(med([p / o for p, o in zip(peer, one)]), 3),
    "two_processes_vs_one": round(med([t / o for t, o in zip(two, one)]), 3),
    "per_round": {"plain": peer, "one": one, "two": two}}))
EOF
