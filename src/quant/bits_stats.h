// What metrics report of the widths that crossed the link (kept apart so that train/metrics.h
// does not pull in the codecs).
#pragma once

namespace amaq::quant {

/// Mean, smallest and largest bit-width per element of what crossed the link.
struct BitsStats {
  double mean = 0, min = 0, max = 0;
};

}  // namespace amaq::quant
