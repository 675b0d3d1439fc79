// config.json parsing: the fixtures, rope variants, and what is refused.
#include "model/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/safetensors.h"
#include "model/layers.h"
#include "model/part.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::data_path;

nlohmann::json fixture_json(const std::string& name) {
  return nlohmann::json::parse(read_file(data_path("hf/" + name + "/config.json")));
}

TEST(Config, ParsesTheFixtures) {
  ModelConfig l = ModelConfig::load(data_path("hf/llama-gqa"));
  EXPECT_EQ(l.arch, Arch::kLlama);
  EXPECT_EQ(l.num_layers, 4);
  EXPECT_EQ(l.num_kv_heads, 2);
  EXPECT_EQ(l.head_dim, 16);
  EXPECT_FALSE(l.qkv_bias);
  EXPECT_FALSE(l.tie_word_embeddings);
  ModelConfig q = ModelConfig::load(data_path("hf/qwen2-tied"));
  EXPECT_EQ(q.arch, Arch::kQwen2);
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_TRUE(q.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(q.rope.theta, 1e6);
  // Parameter count from the config equals the checkpoint's element count.
  for (auto* name : {"llama-gqa", "qwen2-tied"}) {
    int64_t n = 0;
    for (auto& [k, bytes] : CheckpointReader(data_path(std::string("hf/") + name)).sizes()) n += bytes / 4;
    EXPECT_EQ(ModelConfig::load(data_path(std::string("hf/") + name)).num_parameters(), n) << name;
  }
}

TEST(Config, ToJsonRoundTrips) {
  ModelConfig q = ModelConfig::load(data_path("hf/qwen2-tied"));
  ModelConfig back = ModelConfig::from_json(q.to_json(), "round trip");
  EXPECT_EQ(back.to_json(), q.to_json());
}

TEST(Config, LegacyRopeThetaAndScalingFields) {
  nlohmann::json j = fixture_json("llama-gqa");
  j.erase("rope_parameters");
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 64}};
  ModelConfig c = ModelConfig::from_json(j, "test");
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 64);
}

// Llama 3.1's frequency scaling, written out element by element in double precision.
TEST(Config, Llama3RopeMatchesAScalarReference) {
  RopeConfig r;
  r.type = "llama3";
  r.theta = 500000.0;
  r.factor = 8.0;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position_embeddings = 64;  // small so all three bands occur with head_dim 16
  const int64_t d = 16;
  at::Tensor got = functional::rope_inv_freq(r, d);
  int bands[3] = {0, 0, 0};
  for (int64_t i = 0; i < d / 2; ++i) {
    double f = 1.0 / std::pow(r.theta, 2.0 * i / d);
    double wavelen = 2 * M_PI / f, low = 64 / 1.0, high = 64 / 4.0, want;
    if (wavelen < high) {
      want = f, bands[0]++;
    } else if (wavelen > low) {
      want = f / r.factor, bands[2]++;
    } else {
      double s = (64 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - s) * f / r.factor + s * f, bands[1]++;
    }
    EXPECT_NEAR(got[i].item<double>(), want, 1e-6 * want) << "frequency " << i;
  }
  EXPECT_GT(bands[0], 0);
  EXPECT_GT(bands[1], 0);
  EXPECT_GT(bands[2], 0);
}

TEST(Config, RefusesWhatItCannotRun) {
  nlohmann::json base = fixture_json("llama-gqa");
  auto with = [&](const char* key, nlohmann::json v) {
    nlohmann::json j = base;
    j[key] = v;
    return j;
  };
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("rope_parameters", {{"rope_type", "yarn"}, {"factor", 4.0}}), "cfg"),
                    "cfg", "rope_type", "'yarn'");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("architectures", {"GPT2LMHeadModel"}), "cfg"), "GPT2LMHeadModel");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("hidden_act", "gelu"), "cfg"), "hidden_act", "gelu");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("num_key_value_heads", 3), "cfg"), "num_key_value_heads");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("hidden_size", "64"), "cfg"), "hidden_size", "positive integer");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("quantization_config", {{"quant_method", "gptq"}}), "cfg"),
                    "quantization_config");
  // Absurd sizes are refused by name before anything is allocated.
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("num_hidden_layers", 1000000000), "cfg"), "num_hidden_layers",
                    "1000000000", "more than the 1024");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("vocab_size", int64_t{1} << 40), "cfg"), "vocab_size", "more than");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(with("hidden_size", 1 << 20), "cfg"), "hidden_size", "more than");
  nlohmann::json j = base;
  j.erase("vocab_size");
  EXPECT_AMAQ_ERROR(ModelConfig::from_json(j, "cfg"), "vocab_size", "missing");
  testing::TempDir tmp;
  EXPECT_AMAQ_ERROR(ModelConfig::load(tmp.path()), "no config.json");
}

TEST(Config, MistralSlidingWindowMasksOldKeys) {
  nlohmann::json j = fixture_json("llama-gqa");
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = 4;
  ModelConfig c = ModelConfig::from_json(j, "mistral");
  EXPECT_EQ(c.layer_window, std::vector<int64_t>(4, 4));
  at::Tensor bias = functional::attention_bias({}, 1, 8, 4, at::kFloat, at::kCPU)[0][0];
  for (int64_t i = 0; i < 8; ++i) {
    for (int64_t k = 0; k < 8; ++k) {
      bool visible = k <= i && i - k < 4;
      EXPECT_EQ(bias[i][k].item<float>() == 0.0f, visible) << i << "," << k;
    }
  }
  // With the window at least as long as the sequence, Mistral computes what Llama computes.
  j["sliding_window"] = 4096;
  DecoderPart m = full_model(ModelConfig::from_json(j, "mistral")),
              l = full_model(ModelConfig::load(data_path("hf/llama-gqa")));
  CheckpointReader ckpt(data_path("hf/llama-gqa"));
  m->load_weights(ckpt);
  l->load_weights(ckpt);
  at::Tensor ids = SafetensorsFile(data_path("hf/llama-gqa/io.safetensors")).load("input_ids");
  EXPECT_TRUE(at::equal(m->forward(ids), l->forward(ids)));
}

TEST(Config, CheckpointThatDisagreesWithConfigNamesTheTensor) {
  nlohmann::json j = fixture_json("llama-gqa");
  j["intermediate_size"] = 128;
  DecoderPart m = full_model(ModelConfig::from_json(j, "cfg"));
  EXPECT_AMAQ_ERROR(m->load_weights(CheckpointReader(data_path("hf/llama-gqa"))), "mlp", "shape [172, 64]",
                    "[128, 64]");
  j = fixture_json("llama-gqa");
  j["num_hidden_layers"] = 6;
  DecoderPart deeper = full_model(ModelConfig::from_json(j, "cfg"));
  EXPECT_AMAQ_ERROR(deeper->load_weights(CheckpointReader(data_path("hf/llama-gqa"))), "model.layers.4.", "missing");
  // Checked against the weights' shapes before a part is built: layer count and embedding shape.
  const CheckpointReader ckpt(data_path("hf/llama-gqa"));
  EXPECT_AMAQ_ERROR(check_config_matches_weights(ModelConfig::from_json(j, "cfg"), ckpt), "num_hidden_layers 6",
                    "layers 0..3");
  j = fixture_json("llama-gqa");
  j["vocab_size"] = 4000;
  EXPECT_AMAQ_ERROR(check_config_matches_weights(ModelConfig::from_json(j, "cfg"), ckpt), "vocab_size 4000",
                    "[1000, 64]");
  check_config_matches_weights(ModelConfig::from_json(fixture_json("llama-gqa"), "cfg"), ckpt);  // the real one fits
}

}  // namespace
}  // namespace amaq
