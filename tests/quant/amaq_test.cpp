// AMAQ's learnable bit-widths: gradients reach the gates, the regularizer walks the mean down to the
// budget, and the channels a task needs keep more bits than the rest.
#include "quant/amaq.h"

#include <gtest/gtest.h>
#include <torch/optim/adam.h>

#include "quant/affine.h"
#include "quant/codec.h"
#include "quant/link.h"

namespace amaq::quant {
namespace {

EncodeArgs with_bits(const at::Tensor& bits) {
  EncodeArgs a;
  a.bits = bits;
  return a;
}

TEST(Amaq, GatesGetTheirGradientAndActivationsPassStraightThrough) {
  CodecSpec spec = CodecSpec::parse("amaq:budget=4,gran=token");
  AmaqGates gates(64, spec);
  Codec codec(spec);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  at::Tensor x = at::randn({2, 16, 64}, gen).requires_grad_(true);
  Encoded e = codec.encode(x, with_bits(gates->bit_map()));
  at::Tensor y = fake_quant(x, e, gates->bits_continuous());
  EXPECT_TRUE(at::equal(y.detach(), e.decoded));
  // Reconstruction loss: more bits can only help, so every gate's gradient must point up (< 0).
  at::Tensor upstream = 2 * (y - x.detach());
  (y - x.detach()).pow(2).sum().backward();
  EXPECT_TRUE(at::allclose(x.grad(), upstream.detach()));  // straight-through: dL/dx == dL/dy
  at::Tensor g = gates->gates.grad();
  ASSERT_TRUE(g.defined());
  EXPECT_EQ((g < 0).sum().item<int64_t>(), 64) << g;
}

// Three ways to the same gate gradient, bit for bit, at every granularity: the term the fast CPU
// encoder computes while the values are in cache (EncodeArgs::want_gate_slope; ranges along rows
// only), fake_quant's tensor operations on the codes the CPU encoder kept, and, as after the fused
// CUDA encoder, which leaves no codes on the host, on codes recomputed where x is; and without the
// decoded copy, as the sender of activations encodes them.
TEST(Amaq, GateGradientFromTheEncoderOrWithoutHostCodesEqualsTheOneFromTheCodes) {
  for (const std::string gran : {"token", "channel", "group,group=16", "group,group=16,rot=hadamard"}) {
    SCOPED_TRACE(gran);
    CodecSpec spec = CodecSpec::parse("amaq:budget=4,gran=" + gran);
    AmaqGates gates(64, spec);
    {
      at::NoGradGuard no_grad;
      gates->gates.copy_(at::linspace(-3, 3, 64).flip(0));  // every width from bmax down to bmin
    }
    Codec codec(spec);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
    at::Tensor x = at::randn({3, 16, 64}, gen) * at::linspace(0.1, 4.0, 64);
    x[1][2].fill_(0.5);  // a constant token: a step of 0 in its ranges
    EncodeArgs args = with_bits(gates->bit_map());
    args.want_gate_slope = true;
    Encoded fused = codec.encode(x, args);
    EXPECT_EQ(fused.gate_slope.defined(), gran != "channel");
    EXPECT_GE(std::get<0>(at::_unique(fused.bits)).numel(), 5);
    Encoded codes = fused;
    codes.gate_slope = at::Tensor();
    Encoded without = codes;
    without.quant.codes = at::Tensor();
    Encoded no_copy = fused;  // as Link::send_activations encodes: the peer decodes the packet
    no_copy.decoded = at::Tensor();
    at::Tensor up = at::randn({3, 16, 64}, gen);
    std::vector<at::Tensor> grads;
    for (const Encoded* e : {&fused, &codes, &without, &no_copy}) {
      gates->gates.mutable_grad() = at::Tensor();
      const at::Tensor xl = x.clone().requires_grad_(true);
      const at::Tensor y = fake_quant(xl, *e, gates->bits_continuous());
      // Its value: the decoded copy where there is one, else x itself.
      EXPECT_TRUE(at::equal(y.detach(), e->decoded.defined() ? e->decoded : x));
      (y * up).sum().backward();
      EXPECT_TRUE(at::equal(xl.grad(), up));  // straight through
      grads.push_back(gates->gates.grad().clone());
    }
    EXPECT_GT(grads[0].abs().sum().item<double>(), 0.0);
    EXPECT_TRUE(at::equal(grads[0], grads[1])) << (grads[0] - grads[1]).abs().max();
    EXPECT_TRUE(at::equal(grads[1], grads[2])) << (grads[1] - grads[2]).abs().max();
    EXPECT_TRUE(at::equal(grads[0], grads[3])) << (grads[0] - grads[3]).abs().max();
  }
}

// The gates' gradient from the upstream gradient and the encoder's term, without their product:
// bit for bit the sums in the documented order (each column in row order within blocks of 64 rows,
// then the blocks in order), close to double sums, and the same bits on one thread as on several.
TEST(Amaq, ColumnDotsSumEachColumnInRowBlocks) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const at::Tensor a = at::randn({301, 1037}, gen), b = at::randn({301, 1037}, gen);  // runs and blocks with tails
  const at::Tensor got = column_dots(a, b);
  const auto A = a.accessor<float, 2>(), B = b.accessor<float, 2>();
  at::Tensor order = at::zeros({1037}, at::kFloat);
  for (int64_t c = 0; c < 1037; ++c) {
    float sum = 0.0f;
    for (int64_t r0 = 0; r0 < 301; r0 += 64) {
      float block = 0.0f;
      for (int64_t r = r0; r < std::min<int64_t>(301, r0 + 64); ++r) {
        const float product = A[r][c] * B[r][c];
        block = block + product;
      }
      sum = sum + block;
    }
    order[c] = sum;
  }
  EXPECT_TRUE(at::equal(got, order)) << (got - order).abs().max();
  const at::Tensor want = (a.to(at::kDouble) * b.to(at::kDouble)).sum(0);
  EXPECT_LT((got.to(at::kDouble) - want).abs().max().item<double>(), 1e-4 * want.abs().max().item<double>());
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = column_dots(a, b);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, got));
  EXPECT_THROW(column_dots(a, b.narrow(0, 0, 300)), c10::Error);
}

double train_gates(const std::string& spec_text, int steps, std::vector<double>* budget_trace = nullptr,
                   std::vector<double>* mean_trace = nullptr) {
  CodecSpec spec = CodecSpec::parse(spec_text);
  AmaqGates gates(128, spec);
  torch::optim::Adam opt({gates->gates}, torch::optim::AdamOptions(0.05));
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    (gates->beta_at(step) * gates->regularization()).backward();
    opt.step();
    if (spec.mode == BudgetMode::kGuaranteed) gates->project(gates->budget_at(step));
    if (budget_trace) budget_trace->push_back(gates->budget_at(step));
    if (mean_trace) mean_trace->push_back(mean_bits(gates->bit_map()));
  }
  return mean_bits(gates->bit_map());
}

TEST(Amaq, RegularizerAloneWalksTheMeanDownToTheBudget) {
  // The paper's penalty alone keeps pulling: everything ends at b_min.
  EXPECT_EQ(train_gates("amaq:budget=3,bmin=2,mode=penalty,decay=0", 400), 2.0);
  // Stopping at the budget: the mean settles at or below it, and (unlike the penalty alone) the
  // gates stop before b_min.
  double stop = train_gates("amaq:budget=3,bmin=2,mode=stop,decay=0", 400);
  EXPECT_LE(stop, 3.0);
  EXPECT_GT(stop, 2.0);
  // Guaranteed: at every step the map's mean is within the schedule's budget, which walks from 8 to 3.5.
  std::vector<double> budget, mean;
  double end = train_gates("amaq:budget=3.5,bmin=2,init=8,mode=guaranteed,decay=100", 150, &budget, &mean);
  for (size_t i = 0; i < mean.size(); ++i) ASSERT_LE(mean[i], budget[i] + 1e-9) << "step " << i;
  EXPECT_LE(end, 3.5);
  EXPECT_GT(mean[10], 6.0) << "precision starts high and walks down";
}

TEST(Amaq, ProjectionKeepsTheChannelRankingAndHitsFractionalBudgets) {
  CodecSpec spec = CodecSpec::parse("amaq:budget=2.5,bmin=2,bmax=8");
  AmaqGates gates(100, spec);
  {
    at::NoGradGuard g;
    gates->gates.copy_(at::linspace(-3, 3, 100));
  }
  double mean = gates->project(2.5);
  EXPECT_LE(mean, 2.5);
  EXPECT_GE(mean, 2.4);  // distinct gates: the budget is met closely, not by a whole bit
  at::Tensor b = gates->bit_map().to(at::kInt);
  for (int i = 1; i < 100; ++i) EXPECT_GE(b[i].item<int>(), b[i - 1].item<int>());
}

TEST(Amaq, ChannelsTheTaskNeedsKeepMoreBits) {
  // The task reads 4 of 32 channels through a fixed linear probe; the rest only meet the regularizer.
  const int64_t C = 32;
  CodecSpec spec = CodecSpec::parse("amaq:budget=3,bmin=2,bmax=8,init=6,mode=guaranteed,decay=50,gran=token");
  AmaqGates gates(C, spec);
  Codec codec(spec);
  torch::optim::Adam opt({gates->gates}, torch::optim::AdamOptions(0.05));
  at::Tensor w = at::zeros({C, 1});
  const std::vector<int64_t> important = {3, 11, 20, 29};
  for (int64_t c : important) w[c][0] = 1.0;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  for (int step = 0; step < 300; ++step) {
    at::Tensor x = at::randn({8, 16, C}, gen);
    Encoded e = codec.encode(x, with_bits(gates->bit_map()));
    at::Tensor y = fake_quant(x, e, gates->bits_continuous());
    at::Tensor task = (at::matmul(y, w) - at::matmul(x, w)).pow(2).mean();
    opt.zero_grad();
    (task + gates->beta_at(step) * gates->regularization()).backward();
    opt.step();
    gates->project(gates->budget_at(step));
  }
  at::Tensor bits = gates->bit_map().to(at::kDouble);
  at::Tensor mask = at::zeros({C}, at::kBool);
  for (int64_t c : important) mask[c] = true;
  double imp = bits.masked_select(mask).mean().item<double>(),
         rest = bits.masked_select(mask.logical_not()).mean().item<double>();
  std::printf("  important channels %.2f bits, others %.2f, mean %.2f\n", imp, rest, bits.mean().item<double>());
  EXPECT_GE(imp, rest + 2.0);
  EXPECT_LE(bits.mean().item<double>(), 3.0);
}

TEST(Amaq, BackwardMapShiftsTheForwardRankingToItsBudget) {
  at::Tensor fwd = at::tensor({2, 3, 3, 4, 8, 2, 5, 3}, at::kByte);  // mean 3.75
  at::Tensor bwd = shift_bit_map(fwd, 6.0, 2, 8);
  EXPECT_LE(mean_bits(bwd), 6.0);
  EXPECT_GE(mean_bits(bwd), 5.0);
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) {
      if (fwd[i].item<int>() < fwd[j].item<int>()) {
        EXPECT_LE(bwd[i].item<int>(), bwd[j].item<int>());
      }
    }
  }
  EXPECT_EQ(shift_bit_map(fwd, 8.0, 2, 8).min().item<int>(), 8);
}

// budget=auto: the budgets the client chose are where the schedule walks to (the forward gates'
// budget_at, the backward budget sent to the server) and come back from a checkpoint; a codec with
// a set budget is not moved.
TEST(Amaq, AutoBudgetsSteerTheScheduleAndSurviveACheckpoint) {
  const CodecSpec fwd = CodecSpec::parse("amaq:budget=auto,decay=4"),
                  bwd = CodecSpec::parse("amaq:budget=auto,bmin=4,floor=4,decay=4");
  Link link(LinkSide::kClient, fwd, bwd, 32, 0.01);
  EXPECT_TRUE(link.forward_budget_auto() && link.backward_budget_auto());
  EXPECT_EQ(link.forward_target(), 8);
  EXPECT_EQ(link.backward_budget_to_sync(0), 8.0);
  link.set_auto_budgets(3.5, 5);
  EXPECT_EQ(link.forward_target(), 3.5);
  EXPECT_EQ(budget_at(link.forward_spec(), 2), 8 + (3.5 - 8) * 0.5);
  EXPECT_EQ(link.backward_budget_to_sync(4), 5.0);  // reaches the server
  const LinkState st = link.state();
  Link resumed(LinkSide::kClient, fwd, bwd, 32, 0.01);
  std::map<std::string, at::Tensor> tensors(st.tensors.begin(), st.tensors.end());
  resumed.load_state(
      tensors,
      [&](const std::string& name) -> std::optional<std::string> {
        auto it = st.files.find(name);
        return it == st.files.end() ? std::nullopt : std::optional<std::string>(it->second);
      },
      st.fields, "ckpt");
  EXPECT_EQ(resumed.forward_target(), 3.5);
  EXPECT_EQ(resumed.backward_target(), 5);

  Link fixed_budget(LinkSide::kClient, CodecSpec::parse("amaq:budget=4"), CodecSpec::parse("fixed:bits=8"), 32, 0.01);
  fixed_budget.set_auto_budgets(3, 3);
  EXPECT_EQ(fixed_budget.forward_target(), 4);
  EXPECT_FALSE(fixed_budget.forward_budget_auto());
}

}  // namespace
}  // namespace amaq::quant
