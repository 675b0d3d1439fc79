#!/usr/bin/env bash
# Training throughput on the GPU machine, amaq beside the HF transformers + PEFT peer, same card, same
# call (issue: GPU training). Per shape (Llama-3.2-1B's and a 160M one, random init, bf16, LoRA r=16
# alpha=32 on all seven projections, AdamW, batch 8 x 512):
#   peer      ../shared/peers/hf_peft_lora_bench.py, run as it is (copied beside the build, not into git)
#   unsplit   amaq bench-train (the whole model in one process)
#   graph     the same with --cuda-graph (the step captured once as a CUDA graph, then replayed)
#   inproc    amaq train, split at layer 2, both sides in one process, none:bf16 across the split
#   amaq      the same with amaq:budget=4 forward / amaq:budget=6 backward
#   tcp       amaq server + amaq client, two processes over loopback TCP, amaq codecs
#   tcpgraph  the same with the server's micro-batch captured as a CUDA graph (amaq server --cuda-graph)
# Split runs: tokens/s from the median step_seconds of steps 3..12 of the client's metrics.jsonl.
# Results are appended to OUT_DIR/bench-train.jsonl.
# Usage: tools/ref/bench_train.sh BUILD_DIR PEER_SCRIPT OUT_DIR [shapes...]
# (PEER_SCRIPT none skips the peer; AMAQ_BENCH_DEVICE=cpu and the shape tiny try the script here;
# BENCH_RUNS picks runs, default "peer unsplit graph inproc amaq tcp tcpgraph".)
set -u
B=${1:?build dir}
PEER=${2:?peer script}
OUT=${3:?out dir}
shift 3
SHAPES=${*:-llama-160m llama-1b}
W=${AMAQ_BENCH_WORK:-/tmp/amaq-bench}
DEV=${AMAQ_BENCH_DEVICE:-cuda}
RUNS=" ${BENCH_RUNS:-peer unsplit graph inproc amaq tcp tcpgraph} "
want() { [[ "$RUNS" == *" $1 "* ]]; }
mkdir -p "$OUT" "$W"
RESULTS=$OUT/bench-train.jsonl
for i in 1 2 3; do cat tests/data/text/english.txt; done >"$W/data.txt"

shape_flags() {
  case $1 in
    llama-1b) echo "--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --max-positions 4096" ;;
    tiny) echo "--hidden 256 --layers 4 --heads 8 --kv-heads 4 --intermediate 688 --vocab 32000 --max-positions 512" ;;
    llama-160m) echo "--hidden 768 --layers 12 --heads 12 --kv-heads 12 --intermediate 3072 --vocab 32000 --max-positions 4096" ;;
  esac
}

# The median step_seconds of steps 3.. of a metrics.jsonl, as one JSON line.
split_result() {  # name shape metrics.jsonl peak_gb
  python3 - "$@" <<'PY'
import json, statistics, sys
name, shape, path, peak = sys.argv[1:5]
steps = [json.loads(l) for l in open(path) if '"step_seconds"' in l]
t = statistics.median(s["step_seconds"] for s in steps[3:])
tok = steps[-1]["tokens"]
keys = ("client_seconds", "server_seconds", "network_seconds", "client_codec_seconds", "server_codec_seconds")
parts = {k: round(statistics.median(s.get(k, 0) for s in steps[3:]), 4) for k in keys}
print(json.dumps(dict(bench="amaq-train", mode=name, shape=shape, step_s=round(t, 4), tokens_per_s=round(tok / t),
                      peak_gpu_mem_gb=float(peak) if peak else None, fwd_bits=steps[-1]["fwd_bits"]["mean"],
                      fwd_bytes=steps[-1]["fwd_wire_bytes"], bwd_bytes=steps[-1]["bwd_wire_bytes"],
                      loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"], parts=parts)))
PY
}

# The peak GPU memory each process reported (the first such line of each log), summed over processes.
peak_of() {
  for f in "$@"; do grep -m1 -o "peak GPU memory.*: [0-9.]* GB" "$f"; done 2>/dev/null | awk '{s += $(NF-1)} END {if (NR) print s}'
}

COMMON="--split 2 --device $DEV --dtype bf16 --batch 8 --seq-len 512 --steps 13 --lr 1e-4 --lora-r 16 --lora-alpha 32
  --tokenizer byte --data $W/data.txt --val-fraction 0 --eval-every 0 --clip 0"
for shape in $SHAPES; do
  M=$W/$shape
  [ -f "$M/model.safetensors" ] || timeout 300 "$B/amaq" init-model --out "$M" $(shape_flags "$shape") --dtype bf16 \
    >"$OUT/init-$shape.log" 2>&1 || { echo "init-model $shape FAILED"; tail -5 "$OUT/init-$shape.log"; continue; }
  echo "== $shape: peer"
  if [ "$PEER" != none ] && want peer; then
    PYTHONUNBUFFERED=1 timeout 300 python3 "$PEER" "$shape" 8 512 2>"$OUT/peer-$shape.log" | tee -a "$RESULTS"
    [ "${PIPESTATUS[0]}" = 0 ] || tail -5 "$OUT/peer-$shape.log"
  fi
  echo "== $shape: amaq unsplit"
  want unsplit && timeout 300 "$B/amaq" bench-train --model "$M" --device $DEV --dtype bf16 --batch 8 --seq-len 512 --steps 10 \
    --warmup 3 2>"$OUT/unsplit-$shape.log" | sed "s/^{/{\"shape\":\"$shape\",/" | tee -a "$RESULTS" \
    || tail -5 "$OUT/unsplit-$shape.log"
  echo "== $shape: amaq unsplit, CUDA graph"
  want graph && timeout 300 "$B/amaq" bench-train --model "$M" --device $DEV --dtype bf16 --batch 8 --seq-len 512 --steps 10 \
    --warmup 3 --cuda-graph 2>"$OUT/graph-$shape.log" | sed "s/^{/{\"shape\":\"$shape\",\"mode_detail\":\"cuda-graph\",/" \
    | tee -a "$RESULTS" || tail -5 "$OUT/graph-$shape.log"
  for run in inproc amaq; do
    want $run || continue
    echo "== $shape: amaq train ($run)"
    codecs="--fwd-codec none:bf16 --bwd-codec none:bf16"
    [ $run = amaq ] && codecs="--fwd-codec amaq:budget=4 --bwd-codec amaq:budget=6"
    rm -rf "$W/run-$run"
    if timeout 300 "$B/amaq" train --model "$M" --run-dir "$W/run-$run" $COMMON $codecs >"$OUT/$run-$shape.log" 2>&1; then
      split_result "$run" "$shape" "$W/run-$run/metrics.jsonl" "$(peak_of "$OUT/$run-$shape.log")" | tee -a "$RESULTS"
    else
      echo "$run FAILED"; tail -n 8 "$OUT/$run-$shape.log"
    fi
  done
  for run in tcp tcpgraph; do
    want $run || continue
    echo "== $shape: amaq server + client over loopback TCP ($run)"
    graph="" port=7411
    [ $run = tcpgraph ] && graph=--cuda-graph port=7412
    rm -rf "$W/run-$run" "$W/srv-$run"
    "$B/amaq" server --model "$M" --split 2 --run-dir "$W/srv-$run" --listen 127.0.0.1:$port --device $DEV --dtype bf16 \
      --lora-r 16 --lora-alpha 32 --fwd-codec amaq:budget=4 --bwd-codec amaq:budget=6 $graph >"$OUT/$run-server-$shape.log" 2>&1 &
    srv=$!
    sleep 2
    if timeout 300 "$B/amaq" client --connect 127.0.0.1:$port --model "$M" --run-dir "$W/run-$run" $COMMON \
      --fwd-codec amaq:budget=4 --bwd-codec amaq:budget=6 >"$OUT/$run-client-$shape.log" 2>&1; then
      sleep 1
      split_result $run "$shape" "$W/run-$run/metrics.jsonl" \
        "$(peak_of "$OUT/$run-client-$shape.log" "$OUT/$run-server-$shape.log")" | tee -a "$RESULTS"
    else
      echo "$run FAILED"; tail -n 8 "$OUT/$run-client-$shape.log" "$OUT/$run-server-$shape.log"
    fi
    kill $srv 2>/dev/null; wait $srv 2>/dev/null
  done
done
