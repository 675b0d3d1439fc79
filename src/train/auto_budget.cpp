#include "train/auto_budget.h"

#include <algorithm>
#include <cmath>

namespace amaq::train {
namespace {

// Adds a received frame's timing to a direction's sums, unless it was not timed or is too short to
// time; a frame that came whole at once counts as kResolutionSeconds.
void add_timed(uint64_t payload_bytes, double arrival_seconds, uint64_t* bytes, double* seconds) {
  if (arrival_seconds < 0 || payload_bytes < AutoBudget::kMinSampleBytes) return;
  *bytes += payload_bytes;
  *seconds += std::max(arrival_seconds, AutoBudget::kResolutionSeconds);
}

// Exponential smoothing that starts at the first value, and starts again at a value more than 2x
// away from the running one: jitter is smoothed, a link that changed is followed at once.
double smooth(double running, double value, double weight) {
  if (running <= 0 || value > 2 * running || 2 * value < running) return value;
  return (1 - weight) * running + weight * value;
}

}  // namespace

void LinkSample::add_up(uint64_t payload_bytes, double arrival_seconds) {
  add_timed(payload_bytes, arrival_seconds, &up_bytes, &up_seconds);
}

void LinkSample::add_down(uint64_t payload_bytes, double arrival_seconds) {
  add_timed(payload_bytes, arrival_seconds, &down_bytes, &down_seconds);
}

AutoBudget::AutoBudget(const AutoBudgetOptions& options, double fwd_start, double bwd_start)
    : o_(options), fwd_(fwd_start), bwd_(bwd_start) {}

double AutoBudget::choose(double seconds_per_byte, double overhead_bits, double floor, double max) const {
  if (seconds_per_byte <= 0 || elements_ == 0) return max;  // never waited for: the link keeps up
  const double bytes = o_.margin * compute_ / seconds_per_byte;
  const double bits = 8 * bytes / static_cast<double>(elements_) - overhead_bits;
  return std::clamp(std::floor(bits * 4) / 4, floor, max);
}

bool AutoBudget::observe(const LinkSample& s) {
  const double w = o_.smoothing;
  if (s.up_bytes > 0) up_spb_ = smooth(up_spb_, s.up_seconds / static_cast<double>(s.up_bytes), w);
  if (s.down_bytes > 0) down_spb_ = smooth(down_spb_, s.down_seconds / static_cast<double>(s.down_bytes), w);
  if (s.compute_seconds > 0) compute_ = smooth(compute_, s.compute_seconds, w);
  if (s.elements > 0) {
    elements_ = s.elements;
    const double n = static_cast<double>(s.elements);
    fwd_overhead_ = std::max(0.0, 8 * static_cast<double>(s.fwd_bytes) / n - s.fwd_bits);
    bwd_overhead_ = std::max(0.0, 8 * static_cast<double>(s.bwd_bytes) / n - s.bwd_bits);
  }
  if (++steps_ <= o_.warmup_steps) return false;
  const double fwd = choose(up_spb_, fwd_overhead_, o_.fwd_floor, o_.fwd_max);
  const double bwd = choose(down_spb_, bwd_overhead_, o_.bwd_floor, o_.bwd_max);
  const bool changed = fwd != fwd_ || bwd != bwd_;
  fwd_ = fwd, bwd_ = bwd;
  return changed;
}

}  // namespace amaq::train
