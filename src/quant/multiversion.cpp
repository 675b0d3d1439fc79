#include "quant/multiversion.h"

#include <c10/util/Exception.h>

namespace amaq::quant {

namespace {

int cpu_lane_width() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
  // The same test the ifuncs of AMAQ_MULTIVERSION make.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 16;
  if (__builtin_cpu_supports("x86-64-v3")) return 8;
  return 4;
#else
  return 4;
#endif
}

}  // namespace

namespace detail {

std::atomic<int> lanes_in_use{0};

int detect_lane_width() {
  const int w = cpu_lane_width();
  lanes_in_use.store(w, std::memory_order_relaxed);
  return w;
}

}  // namespace detail

void force_lane_width(int lanes) {
  TORCH_CHECK(lanes == 0 || lanes == 4 || lanes == 8 || lanes == 16, "lane width must be 0, 4, 8 or 16");
  TORCH_CHECK(lanes <= cpu_lane_width(), "this CPU runs at most ", cpu_lane_width(), " lanes, not ", lanes);
  detail::lanes_in_use.store(lanes ? lanes : cpu_lane_width(), std::memory_order_relaxed);
}

}  // namespace amaq::quant
