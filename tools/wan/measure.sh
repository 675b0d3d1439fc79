#!/usr/bin/env bash
# Split training over an emulated slow link (amaq emulate-link, a user-space relay: rate,
# round-trip time, bounded queue), as a user would run it: `amaq server`, the relay, `amaq client`.
# The 11.9M-parameter Llama of the issue (hidden 512, 4 layers, 8/4 heads, MLP 1376, byte
# vocabulary), split 2, batch 8 x 128, 2 threads. One JSON line per (link, codec, in-flight) run:
# median seconds per step over steps 3.., bytes per step each way, and the network's share.
#
# Usage: tools/wan/measure.sh [BUILD_DIR] [STEPS] [LINKS] [CODECS] [IN_FLIGHT]
#   LINKS  e.g. "100mbit/20ms 1gbit/2ms 10mbit/40ms"; CODECS e.g. "none:bf16 fixed:bits=4 amaq:budget=4"
# LOSS=0.01 runs each link at the packet level instead (amaq emulate-link --netns: two network
# namespaces joined by TUN devices, the kernels' own TCP, random loss each way; needs root): the
# server in one namespace, the client in the other.
# PIN=1 (default) gives the server core 1 and the client core 0, one thread each: two machines, as
# far as one 2-core machine can be. PIN=0 lets both use both cores with 2 threads each (then their
# compute contends whenever it overlaps, which micro-batches in flight make it do).
set -euo pipefail
BUILD=${1:-build}
STEPS=${2:-12}
LINKS=${3:-"100mbit/20ms"}
CODECS=${4:-"none:bf16 fixed:bits=4 amaq:budget=4 aqsgd:bits=4"}
IN_FLIGHT=${5:-"1 2"}
MICRO=${MICRO:-4}
PIN=${PIN:-1}
LOSS=${LOSS:-}
# EVAL=N: hold out 5% of the data and evaluate every N steps; each line then carries the validation
# loss against the training time spent to reach it (steps' own seconds, evaluations not counted).
EVAL=${EVAL:-0}
BATCH=${BATCH:-2}  # sequences per micro-batch: 4 x 2 = the issue's 8 x 128 per step
# SPLIT=K (default 2); TAIL=M: a U-shaped split (the client also holds layers [M, 4), the head and
# the loss), each cut with the run's codecs.
SPLIT=${SPLIT:-2}
TAIL=${TAIL:-}
AMAQ=$(realpath "$BUILD/amaq")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=/usr/bin/python3
WORK=$(realpath "$BUILD")/wan
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
"$AMAQ" init-model --out model --hidden 512 --layers 4 --heads 8 --kv-heads 4 --intermediate 1376 >/dev/null
$PY "$ROOT/tools/ref/word_corpus.py" train.txt

if [ "$PIN" = 1 ]; then
  SERVER=(taskset -c 1 "$AMAQ" --threads 1) CLIENT=(taskset -c 0 "$AMAQ" --threads 1)
else
  SERVER=("$AMAQ" --threads 2) CLIENT=("$AMAQ" --threads 2)
fi

wait_port() {  # FILE -> the port printed as "listening on 127.0.0.1:PORT"
  for _ in $(seq 200); do grep -q listening "$1" 2>/dev/null && break; sleep 0.05; done
  sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$1"
}

for link in $LINKS; do
  for codec in $CODECS; do
    bwd=$codec
    case $codec in
      amaq:*budget=auto*) bwd="amaq:budget=auto,bmin=4,floor=4${codec##*budget=auto}" ;;  # its own floor, the same decay
      amaq:*) bwd="amaq:budget=6,bmin=4" ;;
      aqsgd:*) bwd="fixed:bits=8" ;;
    esac
    for k in $IN_FLIGHT; do
      run="run-${link//\//_}-${codec//[:=,]/_}-k$k"
      cut=(--split "$SPLIT")
      [ -n "$TAIL" ] && cut+=(--tail-split "$TAIL" --tail-fwd-codec "$codec" --tail-bwd-codec "$bwd")
      rm -rf "$run" srv && mkdir srv
      if [ -n "$LOSS" ]; then
        ns=amaq-wan-$$
        "$AMAQ" emulate-link --netns "$ns" --link "$link" --loss "$LOSS" >link.out 2>link.log &
        lpid=$!
        for _ in $(seq 200); do grep -q ready link.out 2>/dev/null && break; sleep 0.05; done
        ip netns exec "$ns-b" "${SERVER[@]}" server --model model "${cut[@]}" --listen 10.211.0.2:0 --insecure \
          --run-dir srv --exit-after-runs 1 --fwd-codec "$codec" --bwd-codec "$bwd" >srv/out 2>srv/log &
        spid=$!
        for _ in $(seq 200); do grep -q listening srv/out 2>/dev/null && break; sleep 0.05; done
        target="10.211.0.2:$(sed -n 's/.*10.211.0.2:\([0-9]*\).*/\1/p' srv/out)"
        client=(ip netns exec "$ns-a" "${CLIENT[@]}")
      else
        "${SERVER[@]}" server --model model "${cut[@]}" --listen 127.0.0.1:0 --run-dir srv --exit-after-runs 1 \
          --fwd-codec "$codec" --bwd-codec "$bwd" >srv/out 2>srv/log &
        spid=$!
        sport=$(wait_port srv/out)
        "$AMAQ" emulate-link --to "127.0.0.1:$sport" --link "$link" >link.out 2>link.log &
        lpid=$!
        target="127.0.0.1:$(wait_port link.out)"
        client=("${CLIENT[@]}")
      fi
      "${client[@]}" client --model model "${cut[@]}" --data train.txt --tokenizer byte --steps "$STEPS" \
        --batch "$BATCH" --seq-len 128 --micro-batches "$MICRO" --lr 1e-3 --lora-r 8 --clip 1 --quiet --retries 0 \
        --fwd-codec "$codec" --bwd-codec "$bwd" --in-flight "$k" --run-dir "$run" --connect "$target" \
        $([ "$EVAL" -gt 0 ] && echo "--val-fraction 0.05 --eval-every $EVAL --eval-batches 4") 2>client.log
      wait $spid
      kill $lpid && wait $lpid || true
      $PY - "$run" "$link" "$codec" "$k" "$MICRO" "$PIN" "${LOSS:-0}" "$SPLIT" "${TAIL:-0}" <<'PY'
import json, statistics, sys
run, link, codec, k, micro, pin, loss, split, tail = sys.argv[1:]
lines = [json.loads(l) for l in open(run + "/metrics.jsonl")]
all_rows = [r for r in lines if "fwd_bits" in r]
elapsed = {}  # step -> training seconds until it completed
t = 0.0
for r in all_rows:
    t += r["step_seconds"]
    elapsed[r["step"] + 1] = t
evals = [[r["eval"]["step"], round(elapsed.get(r["eval"]["step"], 0.0), 3), round(r["eval"]["loss"], 4)]
         for r in lines if "eval" in r and "loss" in r["eval"]]
rows = all_rows[2:]
med = statistics.median
step = med(r["tokens"] / r["tokens_per_second"] for r in rows)
print(json.dumps({"link": link, "loss": float(loss), "codec": codec, "in_flight": int(k), "micro_batches": int(micro), "pinned": pin == "1",
                  "split": int(split), **({"tail_split": int(tail)} if tail != "0" else {}),
                  "fwd_bits": round(med(r["fwd_bits"]["mean"] for r in rows), 2),
                  "step_s": round(step, 4),
                  "network_share": round(med(r["network_seconds"] for r in rows) / step, 3),
                  "client_s": round(med(r["client_seconds"] for r in rows), 4),
                  "server_s": round(med(r["server_seconds"] for r in rows), 4),
                  "fwd_bytes": int(med(r["fwd_wire_bytes"] for r in rows)),
                  "bwd_bytes": int(med(r["bwd_wire_bytes"] for r in rows)),
                  "bwd_bits": round(med(r["bwd_bits"]["mean"] for r in rows), 2),
                  "loss_last": round(rows[-1]["loss"], 4),
                  "evals": evals,
                  # budget=auto: the budgets chosen after each step, and the last step's estimates
                  **({"auto_budgets": [[r["auto_budget"]["fwd"], r["auto_budget"]["bwd"]] for r in all_rows],
                      "auto_last": all_rows[-1]["auto_budget"]} if "auto_budget" in all_rows[-1] else {})}))
PY
    done
  done
done
