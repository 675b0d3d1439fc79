#!/usr/bin/env bash
# Copies Debian's Google Benchmark, OpenSSL and htscodecs development files into .carry/ for the GPU machine
# (see tools/ref/README.md). Run from the repository root after scripts/setup.sh.
set -euo pipefail
grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >> .git/info/exclude
rm -rf .carry
mkdir -p .carry/bench/include .carry/bench/lib .carry/ssl/include .carry/ssl/lib
cp -r /usr/include/benchmark .carry/bench/include/
lib=$(readlink -f /usr/lib/x86_64-linux-gnu/libbenchmark.so)
cp "$lib" .carry/bench/lib/libbenchmark.so
cp "$lib" ".carry/bench/lib/$(objdump -p "$lib" | awk '/SONAME/ {print $2}')"
cat > .carry/bench/benchmarkConfig.cmake <<'CMAKE'
# Debian 12's Google Benchmark, carried to a machine that lacks it.
add_library(benchmark::benchmark SHARED IMPORTED)
set_target_properties(benchmark::benchmark PROPERTIES
  IMPORTED_LOCATION "${CMAKE_CURRENT_LIST_DIR}/lib/libbenchmark.so"
  IMPORTED_NO_SONAME TRUE
  INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}/include")
set(benchmark_FOUND TRUE)
CMAKE
cp -r /usr/include/openssl .carry/ssl/include/
cp /usr/include/x86_64-linux-gnu/openssl/* .carry/ssl/include/openssl/
cp -L /usr/lib/x86_64-linux-gnu/libssl.so /usr/lib/x86_64-linux-gnu/libcrypto.so .carry/ssl/lib/
# htscodecs (ecsq's rANS coder; CMakeLists.txt looks in .carry/hts after the system's paths).
mkdir -p .carry/hts/include .carry/hts/lib
cp -r /usr/include/htscodecs .carry/hts/include/
lib=$(readlink -f /usr/lib/x86_64-linux-gnu/libhtscodecs.so)
cp "$lib" .carry/hts/lib/libhtscodecs.so
cp "$lib" ".carry/hts/lib/$(objdump -p "$lib" | awk '/SONAME/ {print $2}')"
du -sh .carry
