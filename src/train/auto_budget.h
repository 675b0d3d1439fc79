// amaq:budget=auto (issue 14): the client picks the AMAQ budgets from what it measures of the link
// and of the step's compute, so that each direction's transfer hides under the compute.
//
// What is measured, each step:
//   - the link's rate per direction, from frames whose receiver was already waiting for them
//     (wire::Frame::arrival_seconds: first byte to last, so the spread is the link's, not a
//     buffer's): BACKWARD frames at the client (down), FORWARD frames at the server, which reports
//     their spread in each BACKWARD (up). Frames under kMinSampleBytes are too short to time; one
//     that came whole at once counts as taking kResolutionSeconds (the link is at least that fast),
//     so a link that became fast is seen even when the budgets made the frames small;
//   - the step's compute: the busier side's seconds (client or server), codecs included;
//   - the bytes per element a direction sends beyond its map's bits (range metadata, frame headers,
//     labels), from the step's frames.
// Rates and compute are smoothed over steps (exponentially; a value more than 2x away from the
// running one replaces it), so jitter is smoothed and a link that changes is followed at once. A direction whose frames
// were never waited for keeps up with the compute: its budget is the codec's bmax.
//
// The choice: bits = 8 * margin * compute * rate / elements - overhead, rounded down to a quarter
// bit and clamped to [floor, bmax]; nothing changes during the first warm-up steps.
#pragma once
#include <cstdint>

namespace amaq::train {

/// One optimizer step as the client saw it.
struct LinkSample {
  uint64_t up_bytes = 0, down_bytes = 0;    ///< payload bytes of the timed frames (waited for, >= kMinSampleBytes)
  double up_seconds = 0, down_seconds = 0;  ///< their arrival seconds
  double compute_seconds = 0;               ///< max(client, server) busy seconds of the step
  uint64_t elements = 0;                    ///< activation elements sent (as many gradient elements came back)
  double fwd_bits = 0, bwd_bits = 0;        ///< mean bits of the maps the step travelled with
  uint64_t fwd_bytes = 0, bwd_bytes = 0;    ///< all frame bytes of the step, each direction

  /// Adds one received frame's timing (ignored unless it was timed and is long enough to time).
  void add_up(uint64_t payload_bytes, double arrival_seconds);
  void add_down(uint64_t payload_bytes, double arrival_seconds);
};

struct AutoBudgetOptions {
  double fwd_floor = 3, fwd_max = 8;  ///< the forward codec's floor and bmax
  double bwd_floor = 3, bwd_max = 8;  ///< the backward codec's (ignored when it has no budget)
  double margin = 0.9;                ///< transfer aimed at this share of the compute
  int warmup_steps = 2;               ///< steps only measured
  double smoothing = 0.3;             ///< weight of a new step in the running estimates
};

class AutoBudget {
 public:
  /// Frames shorter than this are not timed; a frame that came whole at once (arrival 0) counts as
  /// taking kResolutionSeconds, so it still says the link is at least that fast.
  static constexpr uint64_t kMinSampleBytes = 4 * 1024;
  static constexpr double kResolutionSeconds = 0.5e-3;

  explicit AutoBudget(const AutoBudgetOptions& options, double fwd_start, double bwd_start);
  /// Feeds one step; true when the chosen budgets changed.
  bool observe(const LinkSample& s);
  /// Whether the warm-up steps are over (the budgets are chosen, not only measured).
  bool choosing() const { return steps_ > o_.warmup_steps; }
  double forward() const { return fwd_; }
  double backward() const { return bwd_; }
  /// The running estimates (0: not measured yet; a direction never waited for stays 0).
  double up_bytes_per_second() const { return up_spb_ > 0 ? 1 / up_spb_ : 0; }
  double down_bytes_per_second() const { return down_spb_ > 0 ? 1 / down_spb_ : 0; }
  double compute_seconds() const { return compute_; }

 private:
  double choose(double seconds_per_byte, double overhead_bits, double floor, double max) const;

  AutoBudgetOptions o_;
  double fwd_, bwd_;
  int64_t steps_ = 0;
  double up_spb_ = 0, down_spb_ = 0;  // seconds per byte, smoothed
  double compute_ = 0;
  double fwd_overhead_ = 0, bwd_overhead_ = 0;  // bits per element beyond the map's
  uint64_t elements_ = 0;
};

}  // namespace amaq::train
