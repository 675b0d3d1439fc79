// AMAQ_MULTIVERSION: a hot CPU loop compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and plain
// x86-64, the version picked by the CPU when the program loads (an ifunc), so one binary runs on
// any x86-64 and uses the widest vectors it has. A function so marked must compute the same values
// in every version: the files that use it are built with -ffp-contract=off (no fused multiply-add).
//
// AMAQ_LANE_VERSIONS: the same for a loop written with explicit vectors (GCC's vector extensions).
// Their width must be the version's own: GCC 12 lowers a comparison or select on vectors wider
// than the target's registers to one element at a time (16-lane code ran scalar on AVX2). So such
// a loop is a template over its lane count, `name##_lanes<L>`, marked AMAQ_LANES_INLINE, and
// AMAQ_LANE_VERSIONS(ret, name, (params), (args)) defines `ret name(params)`, which runs it with
// 16 lanes on AVX-512, 8 on AVX2 and 4 (SSE2) otherwise.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace amaq::quant {

template <int L>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * L)));
  typedef int32_t I __attribute__((vector_size(4 * L)));
};

namespace detail {
extern std::atomic<int> lanes_in_use;  // 0 until the CPU is asked
int detect_lane_width();
}  // namespace detail

/// 16, 8 or 4: the lanes of the widest float vectors this CPU runs (AVX-512, AVX2, SSE2); 4
/// where the code is not multiversioned. One load after the first call (the dispatchers run it per
/// range group). 8 or more also means x86-64-v3's F16C and BMI2.
inline int lane_width() {
  const int w = detail::lanes_in_use.load(std::memory_order_relaxed);
  return w ? w : detail::detect_lane_width();
}
/// The lanes AMAQ_LANE_VERSIONS run with from now on, for tests of the narrower versions: at most
/// what the CPU runs (a wider request throws); 0 restores the CPU's own. Not thread-safe.
void force_lane_width(int lanes);

}  // namespace amaq::quant

#define AMAQ_LANES_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define AMAQ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AMAQ_LANE_VERSIONS(ret, name, params, args)                       \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_16 params { \
    return name##_lanes<16> args;                                         \
  }                                                                       \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_8 params {  \
    return name##_lanes<8> args;                                          \
  }                                                                       \
  static ret name##_4 params {                                            \
    return name##_lanes<4> args;                                          \
  }                                                                       \
  ret name params {                                                       \
    switch (::amaq::quant::lane_width()) {                                \
      case 16:                                                            \
        return name##_16 args;                                            \
      case 8:                                                             \
        return name##_8 args;                                             \
      default:                                                            \
        return name##_4 args;                                             \
    }                                                                     \
  }
#else
#define AMAQ_MULTIVERSION
#define AMAQ_LANE_VERSIONS(ret, name, params, args) \
  ret name params {                                 \
    return name##_lanes<4> args;                    \
  }
#endif
