// One server, many runs: LoRA runs share one copy of the server part's frozen weights, and a run on
// a shared server trains exactly as it does on a server of its own while others train beside it.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <thread>
#include <tuple>

#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/run_testing.h"
#include "train/session.h"
#include "train/side.h"
#include "wire/handshake.h"

namespace amaq::train {
namespace {

TEST(SharedWeights, PartsPointAtOneCopyAndComputeAsWithTheirOwn) {
  const ModelConfig config = ModelConfig::load(kModel);
  const CheckpointReader ckpt(kModel);
  DecoderPart owner = server_part(config, 2);
  owner->load_weights(ckpt);
  std::map<std::string, at::Tensor> shared;
  for (auto& [name, t] : owner->base_weights()) shared.emplace(name, t);

  DecoderPart own = server_part(config, 2), a{nullptr}, b{nullptr};
  own->load_weights(ckpt);
  {
    // What a server run builds: parts whose base weights have no storage of their own until shared.
    UnfilledBaseWeights placeholders(UnfilledBaseWeights::Storage::kPlaceholder);
    a = server_part(config, 2);
    b = server_part(config, 2);
  }
  for (auto& [name, t] : a->base_weights()) {
    EXPECT_EQ(t.sizes(), shared.at(name).sizes()) << name;
    EXPECT_LE(t.storage().nbytes(), t.element_size()) << name;
  }
  a->share_base_weights(shared);
  b->share_base_weights(shared);
  for (auto& [name, t] : a->base_weights()) EXPECT_EQ(t.data_ptr(), shared.at(name).data_ptr()) << name;

  torch::manual_seed(5);
  const at::Tensor h = at::randn({2, 8, config.hidden_size});
  const at::Tensor expected = own->forward(h);
  EXPECT_TRUE(at::equal(a->forward(h), expected));

  // LoRA trains on `a`: the shared weights stay frozen, and `b` computes as before.
  apply_lora(a, LoRAOptions(4), {"all-linear"});
  for (auto& p : a->trainable_parameters()) p.data().normal_(0, 0.1);
  a->forward(h).pow(2).mean().backward();
  for (auto& [name, t] : a->base_weights()) {
    EXPECT_FALSE(t.requires_grad()) << name;
    EXPECT_FALSE(t.grad().defined()) << name;
  }
  EXPECT_TRUE(at::equal(b->forward(h), expected));

  const ModelConfig other = ModelConfig::load(testing::data_path("hf/qwen2-tied"));
  DecoderPart wrong = server_part(other, 1);
  EXPECT_AMAQ_ERROR(wrong->share_base_weights(shared), "shared base weight", "same model, split");
}

// Four clients of different codecs, client ranks and seeds train at the same time against one server
// that serves each with its own codecs; each run's losses, bits, evaluation and both sides' final
// tensors equal, bit for bit, those of the same run alone on a server of its own.
TEST(SharedServer, ConcurrentRunsOfDifferentCodecsAndRanksTrainAsOnDedicatedServers) {
  struct Spec {
    std::string name, fwd, bwd;
    int64_t client_rank;
    uint64_t seed;
  };
  const std::vector<Spec> specs = {
      {"none", "none:fp32", "none:fp32", 8, 1},
      {"fixed", "fixed:bits=4", "fixed:bits=8", 4, 2},
      {"amaq", "amaq:budget=3,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token", 16, 3},
      {"aqsgd", "aqsgd:bits=3", "aqsgd:bits=8", 2, 4},
  };
  testing::TempDir tmp;
  std::vector<ClientConfig> alone, together;
  for (const Spec& sp : specs) {
    ClientConfig c = base_config(tmp, sp.name + "-alone");
    c.schedule.steps = 6;
    c.schedule.seed = sp.seed;
    c.side.lora_r = sp.client_rank;
    c.fwd_codec = quant::CodecSpec::parse(sp.fwd);
    c.bwd_codec = quant::CodecSpec::parse(sp.bwd);
    c.val_fraction = 0.2;
    c.eval_every = 3;
    c.checkpoint_every = 3;
    alone.push_back(c);
    c.run_dir = tmp.file(sp.name + "-together");
    together.push_back(c);
  }
  const SideOptions server_side = base_config(tmp, "x").side;

  std::vector<RunResult> alone_results;
  for (const ClientConfig& c : alone) {
    TrainServer own(server_for(c, server_side));
    alone_results.push_back(run_in_process(own, c));
  }

  ServerConfig sc = server_for(together[0], server_side);
  sc.run_dir = tmp.file("shared-server");
  sc.fwd_codec = sc.bwd_codec = quant::CodecSpec::parse("none:fp32");
  sc.client_codecs = true;
  TrainServer shared(sc);
  std::vector<std::string> errors;
  const std::vector<RunResult> together_results = run_concurrently(shared, together, &errors);
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    ASSERT_EQ(errors[i], "");
    ASSERT_EQ(alone_results[i].steps.size(), 6u);
    expect_same_steps(alone_results[i], together_results[i]);
    expect_same_checkpoint(alone[i].run_dir + "/checkpoints", together[i].run_dir + "/checkpoints", 6);
    expect_same_checkpoint(join_path(alone[i].run_dir + "-server", run_id_of(alone[i].run_dir)),
                           join_path(sc.run_dir, run_id_of(together[i].run_dir)), 6);
  }
}

// --max-runs 1: of two clients started together, one trains and the other is told the server is
// busy, asks again with back-off and trains once the first has ended; both runs equal their runs on
// servers of their own.
TEST(SharedServer, ARunBeyondMaxRunsWaitsForOneToEndAndThenTrains) {
  testing::TempDir tmp;
  std::vector<ClientConfig> cfgs;
  for (int i = 0; i < 2; ++i) {
    ClientConfig c = base_config(tmp, "run" + std::to_string(i));
    c.schedule.steps = 4;
    c.schedule.seed = 10 + i;
    cfgs.push_back(c);
  }
  ServerConfig sc = server_for(cfgs[0], cfgs[0].side);
  sc.run_dir = tmp.file("shared-server");
  sc.max_runs = 1;
  TrainServer srv(sc);
  std::vector<std::string> errors;
  const std::vector<RunResult> results = run_concurrently(srv, cfgs, &errors);
  const TrainServer::Admissions a = srv.status().admissions;
  EXPECT_EQ(a.peak, 1);
  EXPECT_GE(a.busy, 1);
  EXPECT_EQ(a.live, 0);
  EXPECT_EQ(a.live_bytes, 0u);
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(errors[i], "");
    ClientConfig alone = cfgs[i];
    alone.run_dir = tmp.file("alone" + std::to_string(i));
    TrainServer own(server_for(alone, alone.side));
    const RunResult r = run_in_process(own, alone);
    ASSERT_EQ(r.steps.size(), 4u);
    expect_same_steps(r, results[i]);
  }
}

// A run that alone needs more than --run-memory-budget is refused by name (not told to retry); a
// LoRA run within it trains. The estimate is the side's trained tensors, their gradients and AdamW's
// moments: here a full server side's own weights.
TEST(SharedServer, ARunOverTheMemoryBudgetIsRefusedByName) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 2;
  c.schedule.warmup = 0;
  c.busy_wait = 0;
  SideOptions full = c.side;
  full.full = true;
  const ModelConfig mc = ModelConfig::load(kModel);
  const uint64_t lora = owned_bytes_estimate(mc, SideRole::kServer, c.split, c.side),
                 whole = owned_bytes_estimate(mc, SideRole::kServer, c.split, full);
  uint64_t weights = 0;
  DecoderPart part = server_part(mc, c.split);
  for (auto& [name, t] : part->base_weights()) weights += static_cast<uint64_t>(t.numel()) * 4;
  EXPECT_EQ(whole, 4 * weights);  // fp32 weights and gradients, two fp32 moments
  ASSERT_LT(lora, whole / 2);

  ServerConfig sc = server_for(c, full);
  sc.run_memory_budget = whole / 2;
  {
    TrainServer srv(sc);
    EXPECT_AMAQ_ERROR(run_in_process(srv, c), "--run-memory-budget", "train LoRA on the server side");
    EXPECT_EQ(srv.status().admissions.over_budget, 1);
  }
  c.run_dir = tmp.file("lora");
  sc = server_for(c, c.side);
  sc.run_memory_budget = whole / 2;
  TrainServer srv(sc);
  EXPECT_EQ(run_in_process(srv, c).completed_steps, 2);
}

// With --client-codecs the server still refuses, by name, codecs it cannot serve; a client of this
// build never sends them, so the HELLO is written by hand.
TEST(SharedServer, ACodecTheServerCannotServeIsRefusedByName) {
  testing::TempDir tmp;
  ServerConfig sc = server_for(base_config(tmp, "bad"), SideOptions{});
  sc.client_codecs = true;
  TrainServer srv(sc);
  for (const auto& [fwd, bwd, why] :
       {std::tuple{"fixed:bits=4", "amaq:budget=4", "an amaq backward codec needs"},
        std::tuple{"fixed:bits=99", "none:fp32", "bits"}, std::tuple{"zip:level=9", "none:fp32", "zip"}}) {
    SCOPED_TRACE(fwd + std::string(" / ") + bwd);
    auto [client, server] = wire::make_in_process_pair(srv.max_payload());
    std::thread session([&srv, ch = server.get()] { srv.serve(*ch, 1); });
    wire::Hello hello;
    hello.model_fingerprint = model_fingerprint(ModelConfig::load(kModel), CheckpointReader(kModel));
    hello.split = sc.split;
    hello.fwd_codec = fwd;
    hello.bwd_codec = bwd;
    hello.client_nonce = std::string(32, 'n');
    wire::HelloAck ack;
    const wire::Status s = wire::client_handshake(*client, hello, "", std::chrono::seconds(10), &ack);
    session.join();
    EXPECT_EQ(s.code, wire::ErrorCode::kCodecMismatch) << s.message;
    EXPECT_NE(s.message.find("codecs this server cannot serve"), std::string::npos) << s.message;
    EXPECT_NE(s.message.find(why), std::string::npos) << s.message;
  }
}

}  // namespace
}  // namespace amaq::train
