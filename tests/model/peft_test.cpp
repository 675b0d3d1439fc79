// PEFT adapters: the HF-made fixture adapter re-exported unchanged, split export == unsplit export,
// and unsupported adapter features refused.
#include "model/peft.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::data_path;
using testing::TempDir;

class Peft : public ::testing::TestWithParam<std::string> {
 protected:
  std::string dir() const { return data_path("hf/" + GetParam()); }
  ModelConfig config() const { return ModelConfig::load(dir()); }
};

TEST_P(Peft, ReExportOfTheFixtureAdapterHasIdenticalTensors) {
  DecoderPart m = full_model(config());
  AdapterConfig ac = load_peft_adapter(m, dir() + "/adapter");
  TempDir tmp;
  save_peft_adapter({m}, ac, tmp.path());
  auto ref = load_safetensors(dir() + "/adapter/adapter_model.safetensors");
  auto got = load_safetensors(tmp.file("adapter_model.safetensors"));
  ASSERT_EQ(got.size(), ref.size());
  for (const auto& [k, t] : ref) {
    ASSERT_TRUE(got.count(k)) << "missing PEFT key " << k;
    EXPECT_TRUE(at::equal(got.at(k), t)) << k;
  }
}

TEST_P(Peft, ExportedConfigHasEveryFieldPeftNeedsAndReimports) {
  DecoderPart m = full_model(config());
  AdapterConfig ac = load_peft_adapter(m, dir() + "/adapter");
  ac.base_model_name_or_path = "tests/" + GetParam();
  TempDir tmp;
  save_peft_adapter({m}, ac, tmp.path());
  auto j = nlohmann::json::parse(read_file(tmp.file("adapter_config.json")));
  for (const char* field : {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                            "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "use_rslora",
                            "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights"}) {
    EXPECT_TRUE(j.contains(field)) << field;
  }
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  // Every field the fixture (written by PEFT 0.21) sets to a non-default value has the same value.
  auto ref = nlohmann::json::parse(read_file(dir() + "/adapter/adapter_config.json"));
  for (const char* field : {"r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora", "use_dora"}) {
    EXPECT_EQ(j[field], ref[field]) << field;
  }
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_EQ(sorted(j["target_modules"].get<std::vector<std::string>>()),
            sorted(ref["target_modules"].get<std::vector<std::string>>()));

  DecoderPart again = full_model(config());
  AdapterConfig back = load_peft_adapter(again, tmp.path());
  EXPECT_EQ(back.to_json(), ac.to_json());
  auto a = m->linears(), b = again->linears();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].second->has_lora(), b[i].second->has_lora()) << a[i].first;
    if (!a[i].second->has_lora()) continue;
    EXPECT_TRUE(at::equal(a[i].second->lora_a, b[i].second->lora_a)) << a[i].first;
    EXPECT_TRUE(at::equal(a[i].second->lora_b, b[i].second->lora_b)) << a[i].first;
  }
}

TEST_P(Peft, ClientAndServerExportIsOneAdapterForTheWholeModel) {
  DecoderPart c = client_part(config(), 1), s = server_part(config(), 1);
  AdapterConfig ac = load_peft_adapter(c, dir() + "/adapter");
  load_peft_adapter(s, dir() + "/adapter");
  TempDir tmp;
  save_peft_adapter({c, s}, ac, tmp.path());
  auto ref = load_safetensors(dir() + "/adapter/adapter_model.safetensors");
  auto got = load_safetensors(tmp.file("adapter_model.safetensors"));
  ASSERT_EQ(got.size(), ref.size());
  for (const auto& [k, t] : ref) EXPECT_TRUE(got.count(k) && at::equal(got.at(k), t)) << k;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Peft, ::testing::Values("llama-gqa", "qwen2-tied"));

// Per-module ranks and alphas (what `amaq export` writes when the two sides differ) survive a round
// trip: the reloaded model has the same LoRA shapes, scales and logits.
TEST(PeftPatterns, PerModuleRanksAndAlphasRoundTrip) {
  const ModelConfig config = ModelConfig::load(data_path("hf/llama-gqa"));
  AdapterConfig ac;
  ac.r = 4;
  ac.lora_alpha = 8;
  ac.target_modules = {"q_proj", "v_proj", "down_proj"};
  ac.rank_pattern = {{"model.layers.3.self_attn.q_proj", 8}, {"down_proj", 2}};
  ac.alpha_pattern = {{"v_proj", 32}};
  const CheckpointReader weights(data_path("hf/llama-gqa"));
  DecoderPart m = full_model(config);
  m->load_weights(weights);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::NoGradGuard no_grad;
  for (auto& [name, lin] : m->linears()) {
    if (!lora_target_matches(name, ac.target_modules)) continue;
    lin->add_lora(ac.lora_options_for(name));
    lin->lora_a.copy_(at::randn(lin->lora_a.sizes(), gen) * 0.1);
    lin->lora_b.copy_(at::randn(lin->lora_b.sizes(), gen) * 0.1);
  }
  TempDir tmp;
  save_peft_adapter({m}, ac, tmp.path());
  DecoderPart again = full_model(config);
  again->load_weights(weights);
  AdapterConfig back = load_peft_adapter(again, tmp.path());
  EXPECT_EQ(back.to_json(), ac.to_json());
  int64_t checked = 0;
  for (auto& [name, lin] : again->linears()) {
    if (!lin->has_lora()) continue;
    const int64_t want_r = name == "model.layers.3.self_attn.q_proj"     ? 8
                           : name.find("down_proj") != std::string::npos ? 2
                                                                         : 4;
    const double want_alpha = name.find("v_proj") != std::string::npos ? 32 : 8;
    EXPECT_EQ(lin->lora_a.size(0), want_r) << name;
    EXPECT_EQ(lin->lora_options().alpha(), want_alpha) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 12);  // 3 targets x 4 layers
  const at::Tensor ids = at::randint(3, 1000, {2, 11}, gen);
  EXPECT_TRUE(at::equal(again->forward(ids), m->forward(ids)));
  DecoderPart plain = full_model(config);
  plain->load_weights(weights);
  EXPECT_FALSE(at::allclose(plain->forward(ids), m->forward(ids), 1e-3, 1e-3));  // the adapter does something
}

TEST(PeftRefuses, FeaturesAmaqDoesNotImplement) {
  std::string src = data_path("hf/llama-gqa/adapter");
  auto ref = nlohmann::json::parse(read_file(src + "/adapter_config.json"));
  TempDir tmp;
  write_file_atomic(tmp.file("adapter_model.safetensors"), read_file(src + "/adapter_model.safetensors"));
  auto try_with = [&](const char* key, nlohmann::json v) {
    nlohmann::json j = ref;
    j[key] = v;
    write_file_atomic(tmp.file("adapter_config.json"), j.dump());
    DecoderPart m = full_model(ModelConfig::load(data_path("hf/llama-gqa")));
    load_peft_adapter(m, tmp.path());
  };
  EXPECT_AMAQ_ERROR(try_with("use_dora", true), "use_dora");
  EXPECT_AMAQ_ERROR(try_with("rank_pattern", {{"layers\\.3\\..*q_proj", 8}}), "rank_pattern", "regular expression");
  EXPECT_AMAQ_ERROR(try_with("alpha_pattern", {{"q_proj", -1}}), "alpha_pattern", "positive");
  EXPECT_AMAQ_ERROR(try_with("rank_pattern", {{"q_proj", 8}}), "q_proj.lora_A", "shape");  // tensors are r = 4
  EXPECT_AMAQ_ERROR(try_with("peft_type", "IA3"), "peft_type", "IA3");
  EXPECT_AMAQ_ERROR(try_with("r", 8), "lora_A", "shape");  // tensors are r = 4
  EXPECT_AMAQ_ERROR(try_with("target_modules", {"lm_head", "q_proj", "w_gate"}), "lm_head.lora_A");
}

}  // namespace
}  // namespace amaq
