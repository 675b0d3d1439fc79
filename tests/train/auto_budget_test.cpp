// budget=auto's choice against the arithmetic it stands for: at the chosen budget a step's bytes
// cross the link within the compute (times the margin), and a quarter bit more would not; floors
// and bmax bound it; it follows a link that changes, and leaves a link it never waited for at bmax.
#include "train/auto_budget.h"

#include <gtest/gtest.h>

#include <cmath>

namespace amaq::train {
namespace {

constexpr uint64_t kElements = 8 * 128 * 512;  // the WAN runs' step: 8 x 128 tokens, hidden 512
constexpr double kOverhead = 0.3;              // bits per element beyond the map's (metadata, headers)

// One step over a link of `up` / `down` bytes per second, with maps of `bits` each way.
LinkSample step_over(double up, double down, double compute, double fwd_bits, double bwd_bits) {
  LinkSample s;
  s.elements = kElements;
  s.fwd_bits = fwd_bits, s.bwd_bits = bwd_bits;
  s.fwd_bytes = static_cast<uint64_t>(kElements * (fwd_bits + kOverhead) / 8);
  s.bwd_bytes = static_cast<uint64_t>(kElements * (bwd_bits + kOverhead) / 8);
  s.compute_seconds = compute;
  // Four frames each way, of which the receiver waited for one (the others were buffered: untimed).
  s.add_up(s.fwd_bytes / 4, static_cast<double>(s.fwd_bytes / 4) / up);
  s.add_down(s.bwd_bytes / 4, static_cast<double>(s.bwd_bytes / 4) / down);
  for (int i = 0; i < 3; ++i) s.add_up(s.fwd_bytes / 4, -1), s.add_down(s.bwd_bytes / 4, -1);
  return s;
}

// Seconds a step's bytes at `bits` take over `rate`.
double transfer(double bits, double rate) {
  return kElements * (bits + kOverhead) / 8 / rate;
}

TEST(AutoBudget, ChoosesTheMostBitsWhoseTransferHidesUnderTheCompute) {
  AutoBudgetOptions o;
  o.fwd_floor = 2, o.bwd_floor = 4;
  AutoBudget ab(o, 8, 8);
  const double rate = 10e6 / 8, compute = 0.35;  // 10 Mbit/s
  for (int i = 0; i < o.warmup_steps; ++i) {
    EXPECT_FALSE(ab.observe(step_over(rate, rate, compute, 8, 8)));
    EXPECT_EQ(ab.forward(), 8);
  }
  EXPECT_TRUE(ab.observe(step_over(rate, rate, compute, 8, 8)));
  EXPECT_NEAR(ab.up_bytes_per_second(), rate, rate * 1e-6);
  EXPECT_NEAR(ab.compute_seconds(), compute, 1e-12);
  for (double b : {ab.forward(), ab.backward()}) {
    EXPECT_LE(transfer(b, rate), o.margin * compute) << b;
    EXPECT_GT(transfer(b + 0.25, rate), o.margin * compute) << b;
    EXPECT_EQ(b * 4, std::floor(b * 4)) << b;  // quarter bits
  }
  EXPECT_LT(ab.forward(), 8);
  EXPECT_GT(ab.forward(), 2);
}

TEST(AutoBudget, FloorsBmaxAndALinkThatChanges) {
  AutoBudgetOptions o;
  o.fwd_floor = 3, o.bwd_floor = 4, o.fwd_max = 8, o.bwd_max = 7;
  AutoBudget ab(o, 8, 7);
  // 1 Mbit/s: far too slow for any budget to hide; the floors hold.
  for (int i = 0; i < 3; ++i) ab.observe(step_over(1e6 / 8, 1e6 / 8, 0.2, 8, 7));
  EXPECT_EQ(ab.forward(), 3);
  EXPECT_EQ(ab.backward(), 4);
  // The link becomes 1 Gbit/s: at the next step every budget is back at bmax.
  int steps = 0;
  while ((ab.forward() < 8 || ab.backward() < 7) && steps < 20) {
    ab.observe(step_over(1e9 / 8, 1e9 / 8, 0.2, ab.forward(), ab.backward()));
    ++steps;
  }
  EXPECT_EQ(ab.forward(), 8);
  EXPECT_EQ(ab.backward(), 7);
  EXPECT_EQ(steps, 1);
  // An asymmetric link: a slow uplink lowers only the forward budget.
  AutoBudget asym(o, 8, 7);
  for (int i = 0; i < 3; ++i) asym.observe(step_over(5e6 / 8, 1e9 / 8, 0.2, 8, 7));
  EXPECT_LT(asym.forward(), 8);
  EXPECT_EQ(asym.backward(), 7);
}

TEST(AutoBudget, ADirectionNeverWaitedForKeepsBmaxAndShortFramesAreNotTimed) {
  LinkSample s;
  s.add_up(AutoBudget::kMinSampleBytes - 1, 0.5);  // too short to time
  s.add_down(1 << 20, -1);                         // buffered before it was asked for
  EXPECT_EQ(s.up_bytes, 0u);
  EXPECT_EQ(s.down_bytes, 0u);
  s.add_down(1 << 20, 0.25);
  EXPECT_EQ(s.down_bytes, 1u << 20);
  EXPECT_EQ(s.down_seconds, 0.25);
  s.add_up(AutoBudget::kMinSampleBytes, 0);  // came whole at once: at least this fast
  EXPECT_EQ(s.up_bytes, AutoBudget::kMinSampleBytes);
  EXPECT_EQ(s.up_seconds, AutoBudget::kResolutionSeconds);

  AutoBudgetOptions o;
  AutoBudget ab(o, 8, 8);
  LinkSample untimed = step_over(1e6, 1e6, 0.2, 8, 8);
  untimed.up_bytes = untimed.down_bytes = 0;
  for (int i = 0; i < 4; ++i) ab.observe(untimed);
  EXPECT_EQ(ab.forward(), 8);
  EXPECT_EQ(ab.backward(), 8);
  EXPECT_EQ(ab.up_bytes_per_second(), 0);
}

}  // namespace
}  // namespace amaq::train
