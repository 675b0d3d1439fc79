#!/usr/bin/env bash
# Runs the frame/handshake fuzzer for $2 seconds from the committed seeds (copied: libFuzzer writes
# new inputs into its first corpus directory). Exit status is libFuzzer's: non-zero on a finding.
set -euo pipefail
fuzzer=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
seconds=${2:-60}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here"/corpus/* "$work"/
cd "$work"
"$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 "$work" 2>&1 | tail -n 15
