#!/usr/bin/env bash
# `make run`: the embedded demo. A small model trained from scratch, split, over loopback TCP with
# AMAQ, bf16 and fixed 4-bit transports side by side (`amaq demo --help` for its options).
set -euo pipefail
build=${1:-build}
exec "$build/amaq" demo --dir "$build/demo-run" "${@:2}"
