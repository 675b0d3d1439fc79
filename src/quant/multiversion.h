// AMAQ_MULTIVERSION: a hot CPU loop compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and plain
// x86-64, the version picked by the CPU when the program loads (an ifunc), so one binary runs on
// any x86-64 and uses the widest vectors it has. A function so marked must compute the same values
// in every version: the files that use it are built with -ffp-contract=off (no fused multiply-add).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define AMAQ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AMAQ_MULTIVERSION
#endif
