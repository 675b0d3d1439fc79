// Codecs on a real split's tensors: the activations are the unsplit model's hidden state at the split,
// the gradient agrees with a finite difference of the loss, and each codec's point is its packet's
// measured size and error.
#include "recipes/codec_curve.h"

#include <gtest/gtest.h>

#include <map>

#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"
#include "train/data.h"

namespace amaq::recipes {
namespace {

TEST(CodecCurve, SplitTensorsAreTheModelsAndPointsAreThePackets) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("text.txt"), testing::english_text(3000));
  const std::string dir = testing::data_path("hf/llama-gqa");
  const ByteTokenizer tok;
  const SplitTensors t = split_tensors(dir, tmp.file("text.txt"), tok, 32, 4, 2);
  ASSERT_EQ(t.activations.dim(), 3);
  EXPECT_EQ(t.activations.sizes(), t.gradients.sizes());

  // The unsplit model's hidden state at layer 2 (HF's output_hidden_states[2]) on the same batch.
  const ModelConfig config = ModelConfig::load(dir);
  DecoderPart full = full_model(config);
  full->load_weights(CheckpointReader(dir));
  full->eval();
  const train::Dataset d = train::Dataset::load(tmp.file("text.txt"), tok, 32);
  const train::Batch b = train::make_batch(d, {0, 1, 2, 3}, tok.eos_id());
  std::map<int64_t, at::Tensor> hidden;
  at::Tensor loss0;
  {
    at::NoGradGuard no_grad;
    loss0 = causal_lm_loss(full->forward(b.ids, b.mask, &hidden), b.labels);
  }
  EXPECT_TRUE(testing::all_close(t.activations, hidden.at(2), 1e-5, 1e-5));

  // <gradient, v> against the loss's central difference along v, through the server's layers.
  DecoderPart server = server_part(config, 2);
  server->load_weights(CheckpointReader(dir));
  server->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor v = at::randn(t.activations.sizes(), gen);
  const double eps = 1e-3;  // small enough for third-order terms, large enough for fp32 losses
  at::NoGradGuard no_grad;
  auto loss_at = [&](double s) {
    return causal_lm_loss(server->forward(t.activations + s * v, b.mask), b.labels).item<double>();
  };
  const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
  const double analytic = (t.gradients * v).sum().item<double>();
  EXPECT_NEAR(analytic, fd, 2e-2 * std::abs(fd) + 1e-4);
  EXPECT_NEAR(loss_at(0), loss0.item<double>(), 1e-5);

  const auto points = codec_points(t, {"none:fp32", "fixed:bits=2,gran=token", "ecsq:bits=4"});
  ASSERT_EQ(points.size(), 6u);
  const double header_bits = 8.0 * (24 + 3 * 4) / static_cast<double>(t.activations.numel());
  EXPECT_NEAR(points[0].bits, 32 + header_bits, 1e-9);
  EXPECT_EQ(points[0].nmse, 0);
  EXPECT_EQ(points[1].tensor, "gradients");
  for (size_t i = 2; i < 4; ++i) {
    EXPECT_GT(points[i].nmse, points[i + 2].nmse) << i;  // 2 bits err more than about 4
    EXPECT_LT(points[i].bits, 3) << i;
  }
  EXPECT_AMAQ_ERROR(codec_points(t, {"amaq:budget=4"}), "learned maps");
}

}  // namespace
}  // namespace amaq::recipes
