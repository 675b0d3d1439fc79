#!/usr/bin/env bash
# What a session with the GPU machine checks, in one call (see tools/ref/README.md):
#   1. amaq builds against PyTorch 2.x's libtorch with CUDA (and with it the CUDA codec glue);
#   2. the unit tests pass there, the CUDA kernel tests among them (also under compute-sanitizer);
#   3. `amaq_bench` times the codecs on CPU and CUDA (JSON); `codecpeer` times the same codec written
#      in PyTorch, eager and under torch.compile (tools/ref/codec_peer.py), in the same call;
#   4. an adapter trained and exported by amaq loads in Python PEFT and gives amaq's logits;
#   5. training throughput beside the HF + PEFT peer (tools/ref/bench_train.sh; the peer is carried in
#      .carry/peers/, copied from ../shared/peers/), results in OUT_DIR/bench-train.jsonl.
# Usage: tools/ref/gpu_checks.sh OUT_DIR [steps...]   (steps: build tests gputests sanitize bench codecpeer
# peft train; default build tests sanitize bench peft). BENCH_FILTER narrows `bench` (a --benchmark_filter). SKIP_INTEGRATION=1 leaves the two-process tests out of `tests`.
# Packages the image lacks may be carried in .carry/ (Google Benchmark, OpenSSL headers, htscodecs).
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR [steps]}
shift
# Logs go to OUT/logs and end up in OUT/logs.tgz (the device tool returns few files); summary.txt stays.
SUMMARY=$OUT/summary.txt
OUT=$OUT/logs
STEPS=${*:-build tests sanitize bench peft}
B=build-gpu
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$SUMMARY"; }
trap 'tar czf "$OUT.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
want() { [[ " $STEPS " == *" $1 "* ]]; }
export LD_LIBRARY_PATH=$PWD/.carry/bench/lib:$PWD/.carry/hts/lib:${LD_LIBRARY_PATH:-}

if want build; then
  extra=()
  [ -d .carry/bench ] && extra+=(-Dbenchmark_DIR=$PWD/.carry/bench)
  if [ ! -f /usr/include/openssl/ssl.h ]; then
    echo "no OpenSSL headers: using the carried ones" | tee -a "$SUMMARY"
    extra+=(-DOPENSSL_ROOT_DIR=$PWD/.carry/ssl -DOPENSSL_INCLUDE_DIR=$PWD/.carry/ssl/include
            -DOPENSSL_SSL_LIBRARY=$PWD/.carry/ssl/lib/libssl.so -DOPENSSL_CRYPTO_LIBRARY=$PWD/.carry/ssl/lib/libcrypto.so)
  fi
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$SUMMARY"
  start=$(date +%s)
  cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')" "${extra[@]}" >"$OUT/configure.log" 2>&1 \
    || { log "configure FAILED"; tail -40 "$OUT/configure.log"; exit 1; }
  grep -E "CUDA codecs|fmt|not found|WARNING" "$OUT/configure.log" | tee -a "$SUMMARY"
  cmake --build $B -j16 --target amaq amaq_tests amaq_bench -- -k 0 >"$OUT/build.log" 2>&1 \
    || { log "build FAILED"; grep -E "error:|FAILED" "$OUT/build.log" | head -60; exit 1; }
  log "build ok in $(( $(date +%s) - start )) s"
fi

if want tests; then
  # tokenizer.json and TOML tests skip there (no PCRE2/ICU or toml++ in the image); Integration runs separately.
  $B/tests/amaq_tests --gtest_brief=1 --gtest_filter='-Integration.*' >"$OUT/tests.log" 2>&1
  log "unit tests rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\]' "$OUT/tests.log" | tr '\n' ' ')"
  grep -E "FAILED|affine:|^\[ bf16" "$OUT/tests.log" | head -30 | tee -a "$SUMMARY"
  if [ -z "${SKIP_INTEGRATION:-}" ]; then
    $B/tests/amaq_tests --gtest_filter='Integration.*' >"$OUT/integration.log" 2>&1
    log "integration rc=$?"
  fi
fi

if want gputests; then
  # The tests that differ on a GPU: models, training and codecs on CUDA (a short subset of `tests`).
  $B/tests/amaq_tests --gtest_filter="${GPUTESTS:-*OnCuda.*:DeviceTraining.*:*Bf16.*:Amaq.*:CudaCodec*:*Split.*:*HfGolden*:SplitRun.Cpu*:SplitRun.Bf16*:SplitRun.Server*:GraphedStep.*}" \
    >"$OUT/gputests.log" 2>&1
  log "GPU tests rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\]' "$OUT/gputests.log" | tr '\n' ' ')"
  grep -E "FAILED|^\[ bf16" "$OUT/gputests.log" | head -30 | tee -a "$SUMMARY"
fi

if want sanitize; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 $B/tests/amaq_tests --gtest_filter='CudaCodec*' >"$OUT/memcheck.log" 2>&1
  log "compute-sanitizer memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log")"
fi

if want bench; then
  $B/amaq_bench --benchmark_out="$(dirname "$SUMMARY")/bench-gpu.json" --benchmark_out_format=json --benchmark_min_time=0.3 \
    --benchmark_filter="${BENCH_FILTER:-.}" >"$OUT/bench.log" 2>&1
  log "bench rc=$?"
  grep -E "^(cuda/|encode|decode|clone|memcpy)" "$OUT/bench.log" | sed -E 's/ +/ /g' | tee -a "$SUMMARY"
fi

if want codecpeer; then
  timeout 400 python3 tools/ref/codec_peer.py >"$(dirname "$SUMMARY")/codec-peer.jsonl" 2>"$OUT/codec-peer.log"
  log "codec peer rc=$?"
  cat "$(dirname "$SUMMARY")/codec-peer.jsonl" >>"$SUMMARY"
fi

if want peft; then
  W=$(mktemp -d)
  python3 - "$W/data.txt" <<'PY'
import random, sys
random.seed(0)
words = "the cat sat on a mat while dogs ran far away from home".split()
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
PY
  M=tests/data/hf/llama-gqa
  $B/amaq train --model $M --split 2 --run-dir "$W/run" --data "$W/data.txt" --tokenizer byte --batch 4 --seq-len 32 --steps 30 \
    --lr 5e-3 --lora-r 4 --lora-alpha 8 --server-lora-r 8 --server-lora-alpha 32 --server-lora-targets q_proj,v_proj,down_proj \
    --fwd-codec amaq:budget=4 --bwd-codec fixed:bits=8 --quiet >"$OUT/peft-train.log" 2>&1 || log "peft: train FAILED"
  $B/amaq export --run-dir "$W/run" --out "$W/adapter" >>"$OUT/peft-train.log" 2>&1 || log "peft: export FAILED"
  cp "$W/adapter/adapter_config.json" "$OUT/exported_adapter_config.json" 2>/dev/null
  python3 tools/ref/check_peft_export.py --model $M --adapter "$W/adapter" --amaq "$B/amaq" --work "$W" >"$OUT/peft.log" 2>&1
  log "peft check rc=$?: $(tail -1 "$OUT/peft.log")"
fi

if want train; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv | tee -a "$SUMMARY"
  tools/ref/bench_train.sh $B .carry/peers/hf_peft_lora_bench.py "$(dirname "$SUMMARY")" ${TRAIN_SHAPES:-llama-160m llama-1b} \
    >"$OUT/bench-train.log" 2>&1
  log "bench-train rc=$?"
  grep -E "FAILED|error" "$OUT/bench-train.log" | head -20 | tee -a "$SUMMARY"
  cat "$(dirname "$SUMMARY")/bench-train.jsonl" >>"$SUMMARY"
  cp /tmp/amaq-bench/*.log "$OUT/" 2>/dev/null
fi
