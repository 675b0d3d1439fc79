// Split training over a channel: with no compression it is the unsplit model's training, step for
// step; with AMAQ it still learns while sending a fraction of the bytes.
#include <gtest/gtest.h>

#include <future>

#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "testing.h"
#include "train/split_step.h"
#include "wire/tcp.h"

namespace amaq::train {
namespace {

using namespace std::chrono_literals;

const std::string kCase = "llama-gqa";

DecoderPart loaded(DecoderPart p) {
  const std::string dir = testing::data_path("hf/" + kCase);
  p->load_weights(CheckpointReader(dir));
  load_peft_adapter(p, dir + "/adapter");
  return p;
}

at::Tensor ids() { return SafetensorsFile(testing::data_path("hf/" + kCase + "/io.safetensors")).load("input_ids"); }

std::vector<double> unsplit_losses(int steps, const OptimOptions& o) {
  ModelConfig c = ModelConfig::load(testing::data_path("hf/" + kCase));
  DecoderPart full = loaded(full_model(c));
  torch::optim::AdamW opt(full->trainable_parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(o.weight_decay));
  std::vector<double> out;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    at::Tensor loss = causal_lm_loss(full->forward(ids()), ids());
    loss.backward();
    opt.step();
    out.push_back(loss.item<double>());
  }
  return out;
}

// Runs `steps` split steps with the client here and the server on another thread.
std::vector<StepStats> split_run(wire::Channel& client_ch, wire::Channel& server_ch, int steps, const std::string& fwd,
                                 const std::string& bwd, const OptimOptions& o) {
  ModelConfig c = ModelConfig::load(testing::data_path("hf/" + kCase));
  auto fs = quant::CodecSpec::parse(fwd), bs = quant::CodecSpec::parse(bwd);
  auto server = std::async(std::launch::async, [&] {
    ServerSide side(loaded(server_part(c, 2)), fs, bs, server_ch, o);
    for (int s = 0; s < steps; ++s) {
      wire::Status st = side.serve(30s);
      if (!st.ok()) return st;
    }
    return wire::Status::Ok();
  });
  ClientSide client(loaded(client_part(c, 2)), fs, bs, client_ch, o);
  std::vector<StepStats> out;
  for (int s = 0; s < steps; ++s) {
    StepStats st;
    wire::Status status = client.step(s, ids(), ids(), {}, {}, &st);
    EXPECT_TRUE(status.ok()) << status.message;
    if (!status.ok()) break;
    out.push_back(st);
  }
  wire::Status ss = server.get();
  EXPECT_TRUE(ss.ok()) << ss.message;
  return out;
}

TEST(SplitTraining, UncompressedSplitReproducesUnsplitTrainingInProcessAndOverTcp) {
  OptimOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.01;
  const int steps = 20;
  std::vector<double> ref = unsplit_losses(steps, o);
  EXPECT_LT(ref.back(), ref.front());

  auto [a, b] = wire::make_in_process_pair(64 << 20);
  auto in_process = split_run(*a, *b, steps, "none:fp32", "none:fp32", o);

  std::promise<wire::Channel*> server_channel;
  std::promise<void> finished;
  auto finished_future = finished.get_future().share();
  wire::Server server(wire::ServerOptions(0), [&](wire::Channel& ch, const wire::SessionContext&) {
    server_channel.set_value(&ch);
    finished_future.wait();  // keep the session (and its channel) alive until the run is over
  });
  std::unique_ptr<wire::Channel> tcp_client;
  ASSERT_TRUE(wire::connect(wire::ClientOptions("127.0.0.1", server.port()), &tcp_client).ok());
  auto over_tcp = split_run(*tcp_client, *server_channel.get_future().get(), steps, "none:fp32", "none:fp32", o);
  finished.set_value();

  ASSERT_EQ(in_process.size(), size_t(steps));
  ASSERT_EQ(over_tcp.size(), size_t(steps));
  for (int s = 0; s < steps; ++s) {
    EXPECT_NEAR(in_process[s].loss, ref[s], 1e-6) << "step " << s;
    EXPECT_NEAR(over_tcp[s].loss, ref[s], 1e-6) << "step " << s;
  }
  // fp32 activations (2 x 24 x 64) forward, their gradients back, plus framing.
  EXPECT_GT(in_process[0].fwd_bytes, 2u * 24 * 64 * 4);
  EXPECT_EQ(in_process[0].fwd_bytes, over_tcp[0].fwd_bytes);
}

TEST(SplitTraining, AmaqLearnsWhileSendingAFractionOfTheBytes) {
  OptimOptions o;
  o.lr = 1e-2;
  auto [a, b] = wire::make_in_process_pair(64 << 20);
  auto amaq = split_run(*a, *b, 30, "amaq:budget=3,bmin=2,init=8,decay=10,gran=token", "fixed:bits=8,gran=token", o);
  auto [c, d] = wire::make_in_process_pair(64 << 20);
  auto full = split_run(*c, *d, 30, "none:fp32", "none:fp32", o);
  ASSERT_EQ(amaq.size(), 30u);
  std::printf("  amaq: loss %.3f -> %.3f (fp32 %.3f -> %.3f), fwd bits %.2f -> %.2f, fwd bytes %lu vs fp32 %lu\n",
              amaq.front().loss, amaq.back().loss, full.front().loss, full.back().loss, amaq.front().fwd_bits,
              amaq.back().fwd_bits, (unsigned long)amaq.back().fwd_bytes, (unsigned long)full[0].fwd_bytes);
  // At least 80% of the uncompressed run's loss reduction over the same 30 steps.
  EXPECT_LT(amaq.back().loss, amaq.front().loss - 0.8 * (full.front().loss - full.back().loss));
  EXPECT_LE(amaq.back().fwd_bits, 3.0);
  EXPECT_GT(amaq.front().fwd_bits, 6.0);
  EXPECT_LT(amaq.back().fwd_bytes, full[0].fwd_bytes);  // labels dominate at this toy size; the packet shrinks ~10x
}

}  // namespace
}  // namespace amaq::train
