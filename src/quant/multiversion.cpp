#include "quant/multiversion.h"

#include <c10/util/Exception.h>

namespace amaq::quant {

namespace {

int cpu_lane_width() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
  // The same test the ifuncs of AMAQ_MULTIVERSION make, once.
  static const int lanes = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 16;
    if (__builtin_cpu_supports("x86-64-v3")) return 8;
    return 4;
  }();
  return lanes;
#else
  return 4;
#endif
}

int forced_lanes = 0;

}  // namespace

int lane_width() {
  return forced_lanes ? forced_lanes : cpu_lane_width();
}

void force_lane_width(int lanes) {
  TORCH_CHECK(lanes == 0 || lanes == 4 || lanes == 8 || lanes == 16, "lane width must be 0, 4, 8 or 16");
  TORCH_CHECK(lanes <= cpu_lane_width(), "this CPU runs at most ", cpu_lane_width(), " lanes, not ", lanes);
  forced_lanes = lanes;
}

}  // namespace amaq::quant
