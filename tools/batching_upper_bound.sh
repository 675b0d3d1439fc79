#!/usr/bin/env bash
# Would batching several runs' micro-batches into one forward/backward pay (issue 16, S-LoRA-style
# multi-adapter batching)? Its best case, measured with `amaq bench-train`: K runs' micro-batches of
# B sequences cost K steps at batch B when computed one by one, and at most one step at batch K x B
# when batched (less in truth: each row's own LoRA, the gather and scatter, and waiting for the other
# runs' micro-batches to arrive all come on top). One JSON line per model, shape and round:
# separate_s = K x step(B), batched_s = step(K x B), upper_bound_gain = separate_s / batched_s.
#
# Usage: tools/batching_upper_bound.sh [BUILD_DIR] [ROUNDS] [K]
set -euo pipefail
BUILD=${1:-build}
ROUNDS=${2:-3}
K=${3:-4}
AMAQ=$(realpath "$BUILD/amaq")
WORK=$(realpath "$BUILD")/batching-upper-bound
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
# The 11.9M model of the WAN measurements and the 1024-hidden one of the shared-server memory test.
"$AMAQ" init-model --out m12 --hidden 512 --layers 4 --heads 8 --kv-heads 4 --intermediate 1376 >/dev/null
"$AMAQ" init-model --out m1k --hidden 1024 --layers 8 --heads 16 --kv-heads 8 --intermediate 2816 >/dev/null
step_s() {  # model batch seq -> seconds per step
  "$AMAQ" --threads "$(nproc)" bench-train --model "$1" --batch "$2" --seq-len "$3" --steps 10 --warmup 3 \
    --lora-r 8 --lora-alpha 16 2>/dev/null | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_s"])'
}
for round in $(seq "$ROUNDS"); do
  for model in m12 m1k; do
    for shape in "2 64" "2 128" "8 128"; do
      set -- $shape
      one=$(step_s "$model" "$1" "$2")
      batched=$(step_s "$model" $(($1 * K)) "$2")
      python3 -c "import json; s=$K*$one; print(json.dumps({'bench':'batching-upper-bound','round':$round,'model':'$model','runs':$K,'batch':$1,'seq':$2,'separate_s':s,'batched_s':$batched,'upper_bound_gain':s/$batched}))"
    done
  done
done
