// The split is exact: client part then server part computes what the unsplit model computes, bit
// for bit, forward and backward.
#include <gtest/gtest.h>

#include <set>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::data_path;

struct Loaded {
  ModelConfig config;
  at::Tensor ids;
};

Loaded load_case(const std::string& name) {
  std::string dir = data_path("hf/" + name);
  return {ModelConfig::load(dir), SafetensorsFile(dir + "/io.safetensors").load("input_ids")};
}

DecoderPart with_weights(DecoderPart p, const std::string& name) {
  std::string dir = data_path("hf/" + name);
  p->load_weights(CheckpointReader(dir));
  load_peft_adapter(p, dir + "/adapter");
  return p;
}

std::map<std::string, at::Tensor> lora_grads(DecoderPart& p) {
  std::map<std::string, at::Tensor> out;
  for (auto& [name, lin] : p->linears()) {
    if (!lin->has_lora()) continue;
    out[name + ".A"] = lin->lora_a.grad();
    out[name + ".B"] = lin->lora_b.grad();
  }
  return out;
}

class Split : public ::testing::TestWithParam<std::string> {};

TEST_P(Split, EveryKMatchesTheUnsplitModelBitForBit) {
  auto [config, ids] = load_case(GetParam());
  DecoderPart full = with_weights(full_model(config), GetParam());
  std::map<int64_t, at::Tensor> full_hidden;
  at::Tensor full_logits = full->forward(ids, {}, &full_hidden);
  causal_lm_loss(full_logits, ids).backward();
  auto full_grads = lora_grads(full);

  for (int64_t k = 1; k < config.num_layers; ++k) {
    SCOPED_TRACE("split at k = " + std::to_string(k));
    DecoderPart client = with_weights(client_part(config, k), GetParam());
    DecoderPart server = with_weights(server_part(config, k), GetParam());
    EXPECT_EQ(client->layer_end(), k);
    EXPECT_EQ(server->layer_begin(), k);

    at::Tensor h = client->forward(ids);  // (B, T, C): what crosses the network
    EXPECT_TRUE(at::equal(h, full_hidden.at(k)));
    // The server gets a leaf tensor, as it would from the wire, and hands its gradient back.
    at::Tensor h_server = h.detach().requires_grad_(true);
    at::Tensor logits = server->forward(h_server);
    EXPECT_TRUE(at::equal(logits, full_logits)) << "max |diff| " << (logits - full_logits).abs().max().item<double>();
    causal_lm_loss(logits, ids).backward();
    h.backward(h_server.grad());

    auto grads = lora_grads(client);
    for (auto& [n, g] : lora_grads(server)) grads[n] = g;
    ASSERT_EQ(grads.size(), full_grads.size());
    for (auto& [n, g] : full_grads) EXPECT_TRUE(at::equal(grads.at(n), g)) << n;
  }
}

TEST_P(Split, EachSideHoldsOnlyItsOwnWeights) {
  auto [config, ids] = load_case(GetParam());
  const int64_t k = 2;
  DecoderPart client = client_part(config, k), server = server_part(config, k), full = full_model(config);
  std::set<std::string> c, s, f;
  for (auto& [n, p] : client->base_weights()) c.insert(n);
  for (auto& [n, p] : server->base_weights()) s.insert(n);
  for (auto& [n, p] : full->base_weights()) f.insert(n);
  for (const auto& n : c)
    EXPECT_TRUE(n.find("layers.2.") == std::string::npos && n.find("layers.3.") == std::string::npos) << n;
  for (const auto& n : s)
    EXPECT_TRUE(n.find("layers.0.") == std::string::npos && n.find("layers.1.") == std::string::npos) << n;
  EXPECT_TRUE(c.count("model.embed_tokens.weight"));
  EXPECT_FALSE(c.count("model.norm.weight"));
  EXPECT_TRUE(s.count("model.norm.weight"));
  // Every checkpoint tensor is held by one side (the tied embedding by both).
  std::set<std::string> both = c;
  both.insert(s.begin(), s.end());
  EXPECT_EQ(both, f);
  auto sizes = CheckpointReader(data_path("hf/" + GetParam())).sizes();
  for (const auto& [n, bytes] : sizes) EXPECT_TRUE(f.count(n)) << "checkpoint tensor " << n << " is used by no part";
}

// Full fine-tuning: every base weight trains, and the split gives the unsplit model's gradients.
TEST(SplitFullFinetune, BaseWeightGradientsMatchTheUnsplitModel) {
  const std::string name = "llama-gqa";
  auto [config, ids] = load_case(name);
  CheckpointReader ckpt(data_path("hf/" + name));
  DecoderPart full = full_model(config), client = client_part(config, 2), server = server_part(config, 2);
  for (DecoderPart p : {full, client, server}) {
    p->load_weights(ckpt);
    p->set_base_trainable(true);
  }
  EXPECT_EQ(full->trainable_parameters().size(), full->base_weights().size());
  causal_lm_loss(full->forward(ids), ids).backward();
  at::Tensor h = client->forward(ids);
  at::Tensor hs = h.detach().requires_grad_(true);
  causal_lm_loss(server->forward(hs), ids).backward();
  h.backward(hs.grad());
  std::map<std::string, at::Tensor> split_grads;
  for (DecoderPart p : {client, server}) {
    for (auto& [n, w] : p->base_weights()) split_grads[n] = w.grad();
  }
  for (auto& [n, w] : full->base_weights()) {
    ASSERT_TRUE(w.grad().defined()) << n;
    EXPECT_TRUE(at::equal(split_grads.at(n), w.grad())) << n;
  }
}

TEST(SplitRange, KOutsideOneToLMinusOneIsRefused) {
  ModelConfig config = ModelConfig::load(data_path("hf/llama-gqa"));
  EXPECT_AMAQ_ERROR(client_part(config, 0), "split layer 0", "[1, 3]");
  EXPECT_AMAQ_ERROR(server_part(config, 4), "split layer 4", "[1, 3]");
  EXPECT_AMAQ_ERROR(client_part(config, -1), "split layer -1");
}

// A right-padded batch gives, at its real positions, the logits each sequence gets alone.
TEST_P(Split, RightPaddedBatchMatchesUnpaddedSequences) {
  auto [config, ids] = load_case(GetParam());
  DecoderPart full = with_weights(full_model(config), GetParam());
  full->eval();
  at::NoGradGuard no_grad;
  const int64_t T = ids.size(1), short_len = T - 7;
  at::Tensor batch = ids.clone();
  batch[1].narrow(0, short_len, T - short_len).fill_(0);  // pad id, must not matter
  at::Tensor mask = at::ones_like(batch);
  mask[1].narrow(0, short_len, T - short_len).fill_(0);
  const int64_t k = 2;
  DecoderPart client = with_weights(client_part(config, k), GetParam());
  DecoderPart server = with_weights(server_part(config, k), GetParam());
  at::Tensor logits = server->forward(client->forward(batch, mask), mask);

  at::Tensor alone0 = full->forward(ids.narrow(0, 0, 1));
  at::Tensor alone1 = full->forward(ids.narrow(0, 1, 1).narrow(1, 0, short_len));
  EXPECT_TRUE(testing::all_close(logits.narrow(0, 0, 1), alone0, 1e-5, 1e-5));
  EXPECT_TRUE(testing::all_close(logits.narrow(0, 1, 1).narrow(1, 0, short_len), alone1, 1e-5, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Split, ::testing::Values("llama-gqa", "qwen2-tied"));

// Activation checkpointing recomputes each layer in backward: the same loss and the same LoRA
// gradients as the plain forward, bit for bit, unsplit and on each side of a split; refused with
// LoRA dropout (the recomputation would draw other masks).
TEST(ActivationCheckpointing, GradientsEqualThePlainForwardBitForBit) {
  const std::string name = "llama-gqa";
  auto [config, ids] = load_case(name);
  auto run = [&](DecoderPart p, bool checkpointing) {
    p->set_activation_checkpointing(checkpointing);
    EXPECT_EQ(p->activation_checkpointing(), checkpointing);
    at::Tensor loss = causal_lm_loss(p->forward(ids), ids);
    loss.backward();
    return std::pair{loss.item<double>(), lora_grads(p)};
  };
  auto [loss_plain, plain] = run(with_weights(full_model(config), name), false);
  auto [loss_ckpt, ckpt] = run(with_weights(full_model(config), name), true);
  EXPECT_EQ(loss_ckpt, loss_plain);
  ASSERT_EQ(ckpt.size(), plain.size());
  for (auto& [n, g] : plain) {
    ASSERT_TRUE(ckpt.at(n).defined()) << n;
    EXPECT_TRUE(at::equal(ckpt.at(n), g)) << n;
  }
  // Split, checkpointing on both sides.
  DecoderPart client = with_weights(client_part(config, 2), name), server = with_weights(server_part(config, 2), name);
  client->set_activation_checkpointing(true);
  server->set_activation_checkpointing(true);
  at::Tensor h = client->forward(ids);
  at::Tensor hs = h.detach().requires_grad_(true);
  causal_lm_loss(server->forward(hs), ids).backward();
  h.backward(hs.grad());
  auto split = lora_grads(client);
  for (auto& [n, g] : lora_grads(server)) split[n] = g;
  for (auto& [n, g] : plain) EXPECT_TRUE(at::equal(split.at(n), g)) << n;
  // Without gradients nothing is kept for backward anyway: the plain forward runs.
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(client->forward(ids), h.detach()));
}

TEST(ActivationCheckpointing, IsRefusedWithLoraDropout) {
  auto [config, ids] = load_case("llama-gqa");
  DecoderPart p = full_model(config);
  apply_lora(p, LoRAOptions(4).dropout(0.1), {"q_proj"});
  try {
    p->set_activation_checkpointing(true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("LoRA dropout"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(p->activation_checkpointing());
}

}  // namespace
}  // namespace amaq
