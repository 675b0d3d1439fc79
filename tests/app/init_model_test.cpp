// `amaq init-model`: the checkpoint has the requested shape, HF's initialisation, loads and runs;
// bad sizes and an occupied directory are refused.
#include <gtest/gtest.h>

#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"

namespace amaq {
namespace {

TEST(IntegrationInitModelCli, WritesACheckpointOfTheRequestedShapeThatLoadsAndRuns) {
  testing::TempDir tmp;
  const std::string bin = std::string(AMAQ_BINARY) + " init-model --out " + tmp.file("m");
  std::string out;
  ASSERT_EQ(
      testing::run_command(bin + " --hidden 96 --layers 3 --heads 6 --kv-heads 2 --intermediate 200 --seed 4", &out), 0)
      << out;
  EXPECT_NE(out.find("3 layers, hidden 96"), std::string::npos) << out;
  const ModelConfig c = ModelConfig::load(tmp.file("m"));
  EXPECT_EQ(c.hidden_size, 96);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.num_heads, 6);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.intermediate_size, 200);
  EXPECT_GE(c.vocab_size, 256);  // the byte tokenizer's ids
  const auto w = load_safetensors(tmp.file("m/model.safetensors"));
  const at::Tensor q = w.at("model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(q.sizes(), (at::IntArrayRef{96, 96}));
  EXPECT_NEAR(q.std().item<double>(), 0.02, 0.002);  // HF's initializer_range
  EXPECT_TRUE(at::equal(w.at("model.norm.weight"), at::ones({96})));
  DecoderPart m = full_model(c);
  m->load_weights(CheckpointReader(tmp.file("m")));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(61);
  const at::Tensor logits = m->forward(at::randint(0, 256, {1, 9}, gen));
  EXPECT_EQ(logits.sizes(), (at::IntArrayRef{1, 9, c.vocab_size}));
  EXPECT_TRUE(logits.isfinite().all().item<bool>());

  EXPECT_NE(testing::run_command(bin, &out), 0);
  EXPECT_NE(out.find("already holds a model"), std::string::npos) << out;
  EXPECT_NE(testing::run_command(bin + "2 --hidden 100 --heads 6", &out), 0);
  EXPECT_NE(out.find("not a multiple of --heads"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq
