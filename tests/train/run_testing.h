// Helpers of the tests that run split training end to end in one process: a small run on the
// llama-gqa fixture, the server that matches it, and the run against a server over in-process channels.
#pragma once
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/device.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "quant/spec.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/session.h"
#include "wire/channel.h"
#include "wire/handshake.h"
#include "wire/messages.h"
#include "wire/tcp.h"

namespace amaq::train {

inline const std::string kModel = testing::data_path("hf/llama-gqa");

// Some English text for the byte tokenizer (the fixtures' vocabulary has 1000 ids).
inline std::string corpus() {
  return testing::english_text(6000);
}

inline ClientConfig base_config(const testing::TempDir& tmp, const std::string& name) {
  if (!file_exists(tmp.file("data.txt"))) testing::write_bytes(tmp.file("data.txt"), corpus());
  ClientConfig c;
  c.model = kModel;
  c.split = 2;
  c.run_dir = tmp.file(name);
  c.data = tmp.file("data.txt");
  c.tokenizer = "byte";
  c.batch = 2;
  c.seq_len = 32;
  c.schedule.steps = 20;
  c.schedule.micro_batches = 2;
  c.schedule.lr = 1e-2;
  c.schedule.warmup = 3;
  c.schedule.weight_decay = 0.01;
  c.schedule.clip = 0.5;
  c.quiet = true;
  return c;
}

inline ServerConfig server_for(const ClientConfig& c, const SideOptions& side) {
  ServerConfig s;
  s.model = c.model;
  s.split = c.split;
  s.run_dir = c.run_dir + "-server";
  s.side = side;
  s.fwd_codec = c.fwd_codec;
  s.bwd_codec = c.bwd_codec;
  return s;
}

// A U-shaped run (--tail-split): the client holds layers [0, 1) and [tail_split, 4) of the fixture.
inline ClientConfig tail_config(const testing::TempDir& tmp, const std::string& name, int64_t tail_split = 3) {
  ClientConfig c = base_config(tmp, name);
  c.split = 1;
  c.tail_split = tail_split;
  return c;
}

// The server for a U-shaped client configuration: its split, tail split and four codecs.
inline ServerConfig tail_server_for(const ClientConfig& c) {
  ServerConfig s = server_for(c, c.side);
  s.tail_split = c.tail_split;
  s.tail_fwd_codec = c.tail_fwd_codec;
  s.tail_bwd_codec = c.tail_bwd_codec;
  return s;
}

// An 8-step AMAQ run (the given forward and backward specs), evaluated every 4 steps on a 20%
// validation split: where the device, CUDA-graph and report tests start.
inline ClientConfig amaq_run_config(const testing::TempDir& tmp, const std::string& name, const std::string& fwd,
                                    const std::string& bwd) {
  ClientConfig c = base_config(tmp, name);
  c.schedule.steps = 8;
  c.fwd_codec = quant::CodecSpec::parse(fwd);
  c.bwd_codec = quant::CodecSpec::parse(bwd);
  c.val_fraction = 0.2;
  c.eval_every = 4;
  return c;
}

// A TrainServer behind a TCP server on 127.0.0.1 (a free port), each session on its own thread.
struct TcpTrainServer {
  explicit TcpTrainServer(const ServerConfig& cfg)
      : srv(cfg),
        server(srv.tcp_options(0), [this](wire::Channel& ch, const wire::SessionContext& ctx) { srv.serve(ch, ctx); }) {
  }
  TrainServer srv;
  wire::Server server;
};

// The unsplit model trained with the same data order, accumulation, clipping (torch's
// clip_grad_norm_ over all parameters) and schedule.
inline std::vector<double> unsplit_losses(const ClientConfig& c) {
  ModelConfig mc = ModelConfig::load(c.model);
  DecoderPart full = full_model(mc, compute_options(c.side.device, c.side.dtype));
  full->load_weights(CheckpointReader(c.model));
  if (c.side.full)
    full->set_base_trainable(true);
  else
    load_peft_adapter(full, c.side.init_adapter);
  auto params = full->trainable_parameters();
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(c.schedule.lr).weight_decay(c.schedule.weight_decay));
  ByteTokenizer tok;
  Dataset data = Dataset::load(c.data, tok, c.seq_len);
  Sampler sampler(static_cast<int64_t>(data.examples.size()), c.schedule.seed);
  std::vector<double> out;
  int64_t pos = 0;
  for (int64_t s = 0; s < c.schedule.steps; ++s) {
    opt.zero_grad();
    double loss_sum = 0;
    for (int64_t m = 0; m < c.schedule.micro_batches; ++m) {
      std::vector<int64_t> idx;
      for (int64_t i = 0; i < c.batch; ++i) idx.push_back(sampler.at(pos++));
      Batch b = make_batch(data, idx, tok.eos_id());
      at::Tensor loss = causal_lm_loss(full->forward(b.ids, b.mask), b.labels);
      (loss / static_cast<double>(c.schedule.micro_batches)).backward();
      loss_sum += loss.item<double>();
    }
    if (c.schedule.clip > 0) torch::nn::utils::clip_grad_norm_(params, c.schedule.clip);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(c.schedule.lr_at(s));
    opt.step();
    out.push_back(loss_sum / static_cast<double>(c.schedule.micro_batches));
  }
  return out;
}

// Runs `c` against 127.0.0.1:port over plain TCP.
inline RunResult run_over_tcp(const ClientConfig& c, uint16_t port) {
  return ClientTrainer(c).run(
      [&](std::unique_ptr<wire::Channel>* out) { return wire::connect(wire::ClientOptions("127.0.0.1", port), out); });
}

// Runs `c` against `srv` in this process, one server thread per connection.
inline RunResult run_in_process(TrainServer& srv, const ClientConfig& c) {
  std::vector<std::thread> sessions;
  RunResult r;
  try {
    r = ClientTrainer(c).run([&](std::unique_ptr<wire::Channel>* out) {
      auto [a, b] = wire::make_in_process_pair(srv.max_payload());
      sessions.emplace_back(
          [&srv, ch = std::shared_ptr<wire::Channel>(std::move(b)), id = sessions.size()] { srv.serve(*ch, id); });
      *out = std::move(a);
      return wire::Status::Ok();
    });
  } catch (...) {
    for (auto& t : sessions) t.join();
    throw;
  }
  for (auto& t : sessions) t.join();
  return r;
}

// Runs every config against `srv` at once, a thread each. errors[i] is run i's exception message, or "".
inline std::vector<RunResult> run_concurrently(TrainServer& srv, const std::vector<ClientConfig>& cfgs,
                                               std::vector<std::string>* errors) {
  std::vector<RunResult> results(cfgs.size());
  errors->assign(cfgs.size(), "");
  std::vector<std::thread> clients;
  for (size_t i = 0; i < cfgs.size(); ++i) {
    clients.emplace_back([&, i] {
      try {
        results[i] = run_in_process(srv, cfgs[i]);
      } catch (const std::exception& e) {
        (*errors)[i] = e.what();
      }
    });
  }
  for (auto& t : clients) t.join();
  return results;
}

// budget=auto's choice for one direction, against what its step logged: the smoothed compute and
// link rate allow `hideable` bits per element (90% of the compute at that rate, over the step's
// activation elements, counted here from the configuration: a micro-batch's B x T x hidden, twice in a
// U-shaped run, whose directions carry both cuts' tensors); less the packets' bytes beyond the map
// (ranges, labels, headers: 0 to 2 bits per element at this size), rounded down to a quarter bit and
// clamped to [floor, bmax]. On an idle machine these models' compute hides less than the floor, so
// the choice is the floor; on a loaded one the compute grows and rightly hides more bits.
// auto_choice_range gives the range [lowest, highest] the choice may take.
inline std::pair<double, double> auto_choice_range(double compute_seconds, double bytes_per_second,
                                                   const ClientConfig& c, double floor, double bmax) {
  const double elements = static_cast<double>(c.schedule.micro_batches * c.batch * c.seq_len *
                                              ModelConfig::load(c.model).hidden_size * (c.tail_split > 0 ? 2 : 1));
  const double hideable = 8 * 0.9 * compute_seconds * bytes_per_second / elements;
  const auto pick = [&](double bits) { return std::clamp(std::floor(bits * 4) / 4, floor, bmax); };
  if (hideable >= floor) {
    std::printf("[ auto budget ] the compute (%.3f s, a loaded machine?) hides %.2f bits, above the floor %.0f\n",
                compute_seconds, hideable, floor);
  }
  return {pick(hideable - 2), pick(hideable)};
}

inline void expect_auto_choice(double chosen, double compute_seconds, double bytes_per_second, const ClientConfig& c,
                               double floor, double bmax, const std::string& what) {
  const auto [lo, hi] = auto_choice_range(compute_seconds, bytes_per_second, c, floor, bmax);
  EXPECT_GE(chosen, lo) << what << ": compute " << compute_seconds << " s at " << bytes_per_second << " B/s";
  EXPECT_LE(chosen, hi) << what << ": compute " << compute_seconds << " s at " << bytes_per_second << " B/s";
}

// The most bits the last step's packets may have, one direction of budget=auto (`budget` reads a
// step's record): the bits walk toward each new budget over `decay` = 2 steps, always between where
// they were and the budget, so they stay at or below the largest of the last three choices before it.
inline double auto_bits_ceiling(const std::vector<StepRecord>& steps,
                                const std::function<double(const StepRecord&)>& budget) {
  double most = 0;
  for (size_t k = 2; k <= 4 && k <= steps.size(); ++k) most = std::max(most, budget(steps[steps.size() - k]));
  return most;
}

// Two runs equal step for step (losses, gradient norm, bits each way: bit for bit) and in their
// final evaluation.
inline void expect_same_steps(const RunResult& a, const RunResult& b) {
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t s = 0; s < a.steps.size(); ++s) {
    EXPECT_EQ(b.steps[s].loss, a.steps[s].loss) << "step " << s;
    EXPECT_EQ(b.steps[s].task_loss, a.steps[s].task_loss) << "step " << s;
    EXPECT_EQ(b.steps[s].grad_norm, a.steps[s].grad_norm) << "step " << s;
    EXPECT_EQ(b.steps[s].fwd_bits.mean, a.steps[s].fwd_bits.mean) << "step " << s;
    EXPECT_EQ(b.steps[s].bwd_bits.mean, a.steps[s].bwd_bits.mean) << "step " << s;
  }
  EXPECT_EQ(b.eval.dump(), a.eval.dump());
}

// The run id a client's run directory holds.
inline std::string run_id_of(const std::string& run_dir) {
  return nlohmann::json::parse(read_file(join_path(run_dir, "run.json"))).at("run_id").get<std::string>();
}

// Every tensor of the checkpoints at `step` under two roots (a client's `RUN/checkpoints`, or a
// server's `SERVER_RUN/<run id>`) equal, the RNG state aside.
inline void expect_same_checkpoint(const std::string& a_root, const std::string& b_root, int64_t step) {
  auto a = load_safetensors(checkpoint_path(a_root, step) + "/state.safetensors"),
       b = load_safetensors(checkpoint_path(b_root, step) + "/state.safetensors");
  ASSERT_EQ(a.size(), b.size()) << a_root;
  for (auto& [k, t] : a) {
    if (k != "rng") {
      EXPECT_TRUE(at::equal(t, b.at(k))) << a_root << ": " << k;
    }
  }
}

// The HELLO a client of run `c` sends (codecs from c; a U-shaped run's tail codecs too).
inline wire::Hello hello_for(const ClientConfig& c) {
  const ModelConfig model = ModelConfig::load(c.model);
  wire::Hello hello;
  hello.model_fingerprint = model_fingerprint(model, CheckpointReader(c.model));
  hello.split = c.split;
  hello.fwd_codec = c.fwd_codec.to_string();
  hello.bwd_codec = c.bwd_codec.to_string();
  if (c.tail_split > 0) {  // as the client sends it
    hello.tail_split = c.tail_split;
    hello.tail_fwd_codec = c.tail_fwd_codec.to_string();
    hello.tail_bwd_codec = c.tail_bwd_codec.to_string();
  }
  return hello;
}

// Sends `frame` and waits for the reply: an ERROR reply becomes the status.
inline wire::Status exchange(wire::Channel& ch, const wire::Frame& frame, wire::Frame* reply) {
  wire::Status s = ch.send(frame);
  if (s.ok()) s = ch.receive(reply, std::chrono::seconds(30));
  if (s.ok() && reply->type == wire::MessageType::kError) return wire::parse_error_payload(reply->payload);
  return s;
}

// A scripted (or hostile) client in this process: handshakes with `srv` as `hello`, sends the
// SCHEDULE `schedule`, then runs `then` (when given) on the channel; the server's session ends with it.
inline wire::Status scripted_session(TrainServer& srv, const wire::Hello& hello, const std::string& schedule,
                                     const std::function<wire::Status(wire::Channel&)>& then) {
  auto [a, b] = wire::make_in_process_pair(srv.max_payload());
  std::thread server([&srv, ch = std::shared_ptr<wire::Channel>(std::move(b))] { srv.serve(*ch, 1); });
  wire::HelloAck ack;
  wire::Status s = wire::client_handshake(*a, hello, "", std::chrono::seconds(10), &ack);
  wire::Frame reply;
  if (s.ok())
    s = exchange(
        *a, {wire::MessageType::kControl, 0, wire::ControlMsg{wire::ControlKind::kSchedule, schedule, ""}.encode()},
        &reply);
  if (s.ok() && then) s = then(*a);
  a->close();
  server.join();
  return s;
}

}  // namespace amaq::train
