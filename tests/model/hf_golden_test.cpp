// The model against HuggingFace transformers + PEFT reference outputs (tests/data/hf, made by
// transformers 5.17 / peft 0.21 in fp32 with eager attention), on the CPU and on CUDA.
#include <gtest/gtest.h>

#include "core/device.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::all_close;
using testing::data_path;

constexpr double kAtol = 1e-4, kRtol = 1e-4;  // the tolerance for fp32 logits and hidden states

// Each fixture on the CPU, and on CUDA where there is a GPU (TF32 off: CUDA fp32 must compute what
// the CPU computes, to rounding).
class HfGolden : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  void SetUp() override {
    const auto& [fixture, device] = GetParam();
    if (device == "cuda") {
      if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU in this build or machine";
      at::globalContext().setAllowTF32CuBLAS(false);
      at::globalContext().setAllowTF32CuDNN(false);
    }
    dir_ = data_path("hf/" + fixture);
    config_ = ModelConfig::load(dir_);
    io_ = load_safetensors(dir_ + "/io.safetensors");
    model_ = full_model(config_, at::TensorOptions().device(parse_device(device)));
    model_->load_weights(CheckpointReader(dir_));
  }
  std::string dir_;
  ModelConfig config_;
  std::map<std::string, at::Tensor> io_;
  DecoderPart model_{nullptr};
};

TEST_P(HfGolden, LogitsAndEveryHiddenStateMatch) {
  model_->eval();
  at::NoGradGuard no_grad;
  std::map<int64_t, at::Tensor> hidden;
  at::Tensor logits = model_->forward(io_.at("input_ids"), {}, &hidden);
  EXPECT_TRUE(all_close(logits, io_.at("logits"), kAtol, kRtol));
  ASSERT_EQ(static_cast<int64_t>(hidden.size()), config_.num_layers + 1);
  for (int64_t i = 0; i <= config_.num_layers; ++i) {
    EXPECT_TRUE(all_close(hidden.at(i), io_.at("hidden_" + std::to_string(i)), kAtol, kRtol)) << "hidden_" << i;
  }
}

TEST_P(HfGolden, LoraLogitsLossAndGradientsMatch) {
  AdapterConfig ac = load_peft_adapter(model_, dir_ + "/adapter");
  model_->train();
  at::Tensor ids = io_.at("input_ids");
  at::Tensor logits = model_->forward(ids);
  at::Tensor loss = causal_lm_loss(logits, ids);
  EXPECT_TRUE(all_close(logits, io_.at("logits_lora"), kAtol, kRtol));
  EXPECT_TRUE(all_close(loss, io_.at("loss_lora").reshape({}), 1e-5, 1e-5));
  loss.backward();

  auto grads = load_safetensors(dir_ + "/grads.safetensors");
  size_t checked = 0;
  for (auto& [name, lin] : model_->linears()) {
    if (!lin->has_lora()) continue;
    for (auto [which, param] : {std::pair{"lora_A", lin->lora_a}, std::pair{"lora_B", lin->lora_b}}) {
      const at::Tensor& ref = grads.at(name + "." + which + ".weight");
      // rtol 1e-3 as the issue asks; atol scaled to the tensor so near-zero entries do not dominate.
      double atol = 1e-4 * ref.abs().max().item<double>();
      EXPECT_TRUE(all_close(param.grad(), ref, atol, 1e-3)) << name << "." << which;
      ++checked;
    }
  }
  EXPECT_EQ(checked, grads.size()) << "every reference gradient has a LoRA parameter";
  EXPECT_EQ(static_cast<int64_t>(checked), 2 * config_.num_layers * static_cast<int64_t>(ac.target_modules.size()));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfGolden,
                         ::testing::Combine(::testing::Values("llama-gqa", "qwen2-tied"),
                                            ::testing::Values("cpu", "cuda")));

}  // namespace
}  // namespace amaq
