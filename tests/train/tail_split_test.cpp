// The U-shaped split (--tail-split M): the client holds layers [0, K) and [M, L) with the head and the
// loss, the server [K, M). Uncompressed, it trains as the unsplit model; the server never receives a
// label or the loss mask; resume, export, evaluation and the handshake work as for the two-part split.
#include <gtest/gtest.h>

#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "core/fs.h"
#include "model/part.h"
#include "model/peft.h"
#include "quant/codec.h"
#include "testing.h"
#include "train/eval.h"
#include "train/export.h"
#include "train/run_testing.h"
#include "train/session.h"
#include "wire/channel.h"
#include "wire/handshake.h"
#include "wire/link_emulator.h"
#include "wire/messages.h"

namespace amaq::train {
namespace {

// The U-shaped run of `c` over loopback TCP: its losses are the unsplit model's within `tolerance`.
RunResult expect_ushaped_run_is_unsplit(const ClientConfig& c, double tolerance) {
  TcpTrainServer tcp(tail_server_for(c));
  const RunResult r = run_over_tcp(c, tcp.server.port());
  const std::vector<double> ref = unsplit_losses(c);
  EXPECT_EQ(r.steps.size(), ref.size());
  for (size_t s = 0; s < ref.size() && s < r.steps.size(); ++s) {
    EXPECT_NEAR(r.steps[s].task_loss, ref[s], tolerance) << "step " << s;
  }
  if (!ref.empty()) {
    EXPECT_LT(ref.back(), ref.front() - 0.1);  // it did learn
  }
  return r;
}

TEST(TailSplit, UncompressedUShapedRunReproducesUnsplitTraining) {
  testing::TempDir tmp;
  for (const int64_t m : {3, 4}) {  // the server holds [1, 3); or [1, 4) with only norm and head on the client
    SCOPED_TRACE("tail split " + std::to_string(m));
    ClientConfig c = tail_config(tmp, "run" + std::to_string(m), m);
    c.side.init_adapter = kModel + "/adapter";
    const RunResult r = expect_ushaped_run_is_unsplit(c, 1e-6);
    EXPECT_GT(r.steps.front().grad_norm, c.schedule.clip);  // clipping over the three parts was active
  }
}

// A model with tied embeddings (Qwen2 fixture): the U-shaped client holds the embedding and the head,
// the unsplit model's one matrix, and holds it once (the tail's head is the embedding tensor) unless
// LoRA adapts the head; with LoRA the U-shaped run reproduces the unsplit one.
TEST(TailSplit, ATiedModelsClientHoldsItsOneMatrixOnceUnlessLoRAAdaptsTheHead) {
  testing::TempDir tmp;
  const std::string model = testing::data_path("hf/qwen2-tied");
  const ModelConfig config = ModelConfig::load(model);
  const CheckpointReader ckpt(model);
  SideOptions lora;
  Side side = Side::build(config, ckpt, SideRole::kClient, 1, lora, 1, 0.0, nullptr, 3);
  EXPECT_FALSE(side.tail->lm_head);
  lora.targets = {"q_proj", "lm_head"};
  Side adapted = Side::build(config, ckpt, SideRole::kClient, 1, lora, 1, 0.0, nullptr, 3);
  EXPECT_TRUE(adapted.tail->lm_head);

  ClientConfig c = tail_config(tmp, "tied-lora");
  c.model = model;
  c.side.init_adapter = model + "/adapter";
  expect_ushaped_run_is_unsplit(c, 1e-6);
}

// Full fine-tuning of a model with tied embeddings (Qwen2 fixture): the client holds the embedding
// and the head, which the unsplit model trains as one matrix; so does the U-shaped client (one
// tensor in its checkpoint, and in the merged export), and the run reproduces the unsplit one.
TEST(TailSplit, FullFineTuningOfATiedModelTrainsItsOneMatrixAsUnsplit) {
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "tied");
  c.model = testing::data_path("hf/qwen2-tied");
  c.side.full = true;
  c.schedule.steps = 8;
  c.schedule.lr = 3e-3;
  expect_ushaped_run_is_unsplit(c, 1e-5);
  const auto state = load_safetensors(checkpoint_path(c.run_dir + "/checkpoints", 8) + "/state.safetensors");
  int64_t embeddings = 0, heads = 0;
  for (const auto& [k, t] : state) {
    embeddings += k.find("embed_tokens.weight") != std::string::npos;
    heads += k.find("lm_head") != std::string::npos;
  }
  EXPECT_EQ(embeddings, 1);
  EXPECT_EQ(heads, 0);
  // Merged, the model has the one trained matrix (HF ties the head to it on load).
  export_merged(c.run_dir, tmp.file("merged"), c.run_dir + "-server");
  const auto merged = load_safetensors(tmp.file("merged") + "/model.safetensors");
  EXPECT_EQ(merged.count("lm_head.weight"), 0u);
  EXPECT_TRUE(at::equal(merged.at("model.embed_tokens.weight"), state.at("model.embed_tokens.weight")));
}

// A channel that keeps a copy of every frame it receives (the server's end of the link).
class RecordingChannel : public wire::Channel {
 public:
  explicit RecordingChannel(std::unique_ptr<wire::Channel> inner) : inner_(std::move(inner)) {}
  void close() override { inner_->close(); }
  std::vector<wire::Frame> frames() {
    std::lock_guard<std::mutex> lock(mu_);
    return frames_;
  }

 protected:
  wire::Status send_frame(const wire::Frame& f) override { return inner_->send(f); }
  wire::Status receive_frame(wire::Frame* f, std::chrono::milliseconds timeout) override {
    wire::Status s = inner_->receive(f, timeout);
    if (s.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      frames_.push_back(*f);
    }
    return s;
  }

 private:
  std::unique_ptr<wire::Channel> inner_;
  std::mutex mu_;
  std::vector<wire::Frame> frames_;
};

// Every frame the server receives, from HELLO to BYE, training and evaluation: no FORWARD or EVAL
// carries labels; the mask it gets is the attention mask (ones, then padding), never the loss mask,
// which here hides every prompt token; and no payload holds any row's label ids as bytes.
TEST(TailSplit, TheServerNeverReceivesLabelsOrTheLossMask) {
  testing::TempDir tmp;
  std::string jsonl;
  for (int i = 0; i < 48; ++i) {
    jsonl += nlohmann::json{{"prompt",
                             "Question " + std::to_string(i) + ": what follows " + std::to_string(i * 3) + "? Answer:"},
                            {"completion", " " + std::to_string(i * 3 + 1) + " and then some more words"}}
                 .dump() +
             "\n";
  }
  testing::write_bytes(tmp.file("qa.jsonl"), jsonl);
  ClientConfig c = tail_config(tmp, "private");
  c.data = tmp.file("qa.jsonl");
  c.val_fraction = 0.25;
  c.eval_every = 2;
  c.schedule.steps = 4;
  c.fwd_codec = quant::CodecSpec::parse("amaq:budget=4,decay=4");
  c.bwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  c.tail_fwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  c.tail_bwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  TrainServer srv(tail_server_for(c));
  std::vector<std::shared_ptr<RecordingChannel>> seen;
  std::vector<std::thread> sessions;
  const RunResult r = ClientTrainer(c).run([&](std::unique_ptr<wire::Channel>* out) {
    auto [a, b] = wire::make_in_process_pair(srv.max_payload());
    seen.push_back(std::make_shared<RecordingChannel>(std::move(b)));
    sessions.emplace_back([&srv, ch = seen.back()] { srv.serve(*ch, 1); });
    *out = std::move(a);
    return wire::Status::Ok();
  });
  for (auto& t : sessions) t.join();
  ASSERT_EQ(r.completed_steps, 4);
  ASSERT_TRUE(r.eval.contains("loss"));

  // The label rows of every batch the client trained and evaluated on (the byte tokenizer: ids < 256).
  ByteTokenizer tok;
  const Dataset data = Dataset::load(c.data, tok, c.seq_len);
  std::vector<std::string> needles;
  for (const Example& e : data.examples) {
    std::vector<int64_t> answer;
    for (size_t i = 0; i < e.ids.size(); ++i)
      if (e.labels[i] != kIgnoreLabel) answer.push_back(e.labels[i]);
    ASSERT_GE(answer.size(), 8u);
    for (const size_t width : {2, 8}) {  // as the i16 FORWARD labels would carry them, and as i64
      std::string bytes;
      for (size_t i = 0; i < 8; ++i) bytes.append(reinterpret_cast<const char*>(&answer[i]), width);
      needles.push_back(bytes);
    }
  }
  size_t forwards = 0, evals = 0, tails = 0;
  for (const auto& ch : seen) {
    for (const wire::Frame& f : ch->frames()) {
      for (const std::string& n : needles)
        ASSERT_EQ(f.payload.find(n), std::string::npos) << wire::message_name(f.type);
      ASSERT_TRUE(f.type == wire::MessageType::kHello || f.type == wire::MessageType::kControl ||
                  f.type == wire::MessageType::kForward || f.type == wire::MessageType::kEval ||
                  f.type == wire::MessageType::kTailBackward || f.type == wire::MessageType::kBye)
          << wire::message_name(f.type);
      tails += f.type == wire::MessageType::kTailBackward;
      if (f.type != wire::MessageType::kForward && f.type != wire::MessageType::kEval) continue;
      (f.type == wire::MessageType::kForward ? forwards : evals)++;
      wire::ForwardMsg fm;
      ASSERT_TRUE(wire::ForwardMsg::decode(f.payload, &fm).ok());
      EXPECT_EQ(fm.label_type, wire::LabelType::kNone);
      EXPECT_TRUE(fm.labels.empty());
      // Each row's mask: ones, then padding zeros; a loss mask would start with the prompt's zeros.
      ASSERT_EQ(fm.mask.size(), size_t{fm.batch} * fm.seq);
      for (uint32_t row = 0; row < fm.batch; ++row) {
        const std::string_view m = fm.mask.substr(size_t{row} * fm.seq, fm.seq);
        EXPECT_EQ(m[0], 1);
        const size_t ones = m.find('\0') == std::string_view::npos ? m.size() : m.find('\0');
        for (size_t i = ones; i < m.size(); ++i) EXPECT_EQ(m[i], 0);
      }
    }
  }
  EXPECT_EQ(forwards, 4u * 2);  // 4 steps x 2 micro-batches
  EXPECT_EQ(tails, forwards);
  EXPECT_GT(evals, 0u);
}

// Interrupted after step 4 and resumed in a new server: the uninterrupted serial run's losses, bits,
// evaluation and both sides' checkpoints. With `in_flight` > 1 the interrupted and resumed parts keep
// that many micro-batches in flight (the server answers FORWARDs while earlier micro-batches wait for
// their TAIL_BACKWARD): pipelining changes nothing either.
void expect_tail_resume_matches(const std::string& fwd, const std::string& bwd, const std::string& tail_fwd,
                                const std::string& tail_bwd, int64_t in_flight) {
  SCOPED_TRACE(fwd + " / " + bwd + " / " + tail_fwd + " / " + tail_bwd + ", in flight " + std::to_string(in_flight));
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "whole");
  c.schedule.steps = 8;
  c.schedule.micro_batches = std::max<int64_t>(2, in_flight);
  c.fwd_codec = quant::CodecSpec::parse(fwd);
  c.bwd_codec = quant::CodecSpec::parse(bwd);
  c.tail_fwd_codec = quant::CodecSpec::parse(tail_fwd);
  c.tail_bwd_codec = quant::CodecSpec::parse(tail_bwd);
  c.checkpoint_every = 3;
  c.val_fraction = 0.2;
  c.eval_every = 4;
  TrainServer srv(tail_server_for(c));
  const RunResult whole = run_in_process(srv, c);
  ClientConfig first = c;
  first.run_dir = tmp.file("parts");
  first.in_flight = in_flight;
  first.stop_after = 4;
  const ServerConfig sc = tail_server_for(first);
  {
    TrainServer srv1(sc);
    EXPECT_EQ(run_in_process(srv1, first).completed_steps, 4);
  }
  ClientConfig second = first;
  second.stop_after = -1;
  second.resume = true;
  TrainServer srv2(sc);
  const RunResult resumed = run_in_process(srv2, second);
  ASSERT_EQ(whole.steps.size(), 8u);
  expect_same_steps(whole, resumed);
  expect_same_checkpoint(c.run_dir + "/checkpoints", second.run_dir + "/checkpoints", 8);
  const auto whole_runs = list_subdirs(c.run_dir + "-server"), part_runs = list_subdirs(first.run_dir + "-server");
  ASSERT_EQ(whole_runs.size(), 1u);
  ASSERT_EQ(part_runs.size(), 1u);
  const std::string server_ckpt = join_path(c.run_dir + "-server", whole_runs[0]);
  expect_same_checkpoint(server_ckpt, join_path(first.run_dir + "-server", part_runs[0]), 8);
  // An AMAQ codec at M: the server's checkpoint holds its gates; the client's the tail budget it follows.
  if (quant::CodecSpec::parse(tail_fwd).codec == quant::CodecId::kAmaq) {
    EXPECT_TRUE(
        load_safetensors(join_path(checkpoint_path(server_ckpt, 8), "state.safetensors")).count("tail.amaq.gates"));
  }
}

TEST(TailSplit, ResumedRunEqualsTheUninterruptedOneWithAmaqAtBothCuts) {
  expect_tail_resume_matches("amaq:budget=3,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token",
                             "amaq:budget=4,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token", 1);
}

TEST(TailSplit, InFlightEqualsSerialWithAmaqAtBothCuts) {
  expect_tail_resume_matches("amaq:budget=3,bmin=2,init=8,decay=5,gran=token", "amaq:budget=6,decay=6,gran=token",
                             "amaq:budget=4,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token", 3);
}

TEST(TailSplit, InFlightEqualsSerialWithNoneFixedAndAqsgd) {
  expect_tail_resume_matches("none:fp32", "none:bf16", "fixed:bits=4,gran=token,round=stochastic",
                             "fixed:bits=6,gran=token", 2);
  expect_tail_resume_matches("aqsgd:bits=3", "aqsgd:bits=8", "aqsgd:bits=4", "aqsgd:bits=8", 3);
}

// budget=auto in a U-shaped run: each direction's budget serves both tensors that travel it (up:
// the activations at K and the gradients at M; down: the gradients at K and the activations at M,
// whose gates are on the server, told by BIT_SYNC). Over a 2 Mbit/s link each codec ends at its
// own floor (at what the measured compute hides: expect_auto_choice); over loopback every budget
// stays at bmax.
TEST(TailSplit, AutoBudgetTakesEachDirectionsFloorsOnASlowLinkAndBmaxOnLoopback) {
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "slow");
  c.batch = 8;
  c.seq_len = 64;
  c.schedule.steps = 7;
  c.schedule.warmup = 0;
  c.fwd_codec = c.tail_fwd_codec = quant::CodecSpec::parse("amaq:budget=auto,decay=2");
  c.bwd_codec = c.tail_bwd_codec = quant::CodecSpec::parse("amaq:budget=auto,bmin=4,floor=4,decay=2");
  TcpTrainServer tcp(tail_server_for(c));
  const uint16_t server_port = tcp.server.port();
  wire::LinkEmulator link(0, "127.0.0.1", server_port, wire::LinkSpec::parse("2mbit/4ms"));
  for (const uint16_t port : {link.port(), server_port}) {
    SCOPED_TRACE(port == link.port() ? "2 Mbit/s" : "loopback");
    const bool slow = port == link.port();
    const RunResult r = run_over_tcp(c, port);
    ASSERT_EQ(r.steps.size(), 7u);
    for (const StepRecord& s : r.steps) {
      ASSERT_TRUE(s.auto_budget.has_value()) << s.step;
      ASSERT_TRUE(s.tail_fwd_bits.has_value() && s.tail_bwd_bits.has_value()) << s.step;
      if (s.step < 2) continue;  // warm-up: measured only
      const StepRecord::AutoBudgetRecord& a = *s.auto_budget;
      if (slow) {
        const std::string step = "step " + std::to_string(s.step);
        expect_auto_choice(a.fwd, a.compute_seconds, a.up_bytes_per_second, c, 3, 8, step + " up");
        expect_auto_choice(a.bwd, a.compute_seconds, a.down_bytes_per_second, c, 4, 8, step + " down");
      } else {
        EXPECT_EQ(a.fwd, 8) << s.step;
        EXPECT_EQ(a.bwd, 8) << s.step;
      }
    }
    const StepRecord& last = r.steps.back();
    if (slow) {
      // The packets follow the budgets: both cuts' codecs of a direction, the server's gates at M
      // too, which walk to the budget they were told.
      const double up = auto_bits_ceiling(r.steps, [](auto& s) { return s.auto_budget->fwd; });
      const double down = auto_bits_ceiling(r.steps, [](auto& s) { return s.auto_budget->bwd; });
      EXPECT_LE(last.fwd_bits.mean, up);
      EXPECT_LE(last.tail_bwd_bits->mean, std::max(up, 4.0));  // (its floor is 4)
      EXPECT_LE(last.bwd_bits.mean, down);
      EXPECT_LE(last.tail_fwd_bits->mean, std::max(down, 3.0));
      // Both ends' checkpoints hold the budgets chosen at M, for a resumed run to start from: each
      // direction's last choice within the codec's own range.
      const auto state = [](const std::string& root) {
        return nlohmann::json::parse(read_file(join_path(checkpoint_path(root, 7), "state.json")));
      };
      EXPECT_EQ(state(join_path(c.run_dir, "checkpoints")).at("tail_link").at("bwd_auto_budget").get<double>(),
                std::clamp(last.auto_budget->fwd, 4.0, 8.0));
      const auto server_runs = list_subdirs(c.run_dir + "-server");
      ASSERT_EQ(server_runs.size(), 1u);
      // (The record holds the budget at K, clamped to its floor 4; M's codec clamps the choice to 3.)
      const double told =
          state(join_path(c.run_dir + "-server", server_runs[0])).at("tail_link").at("fwd_auto_budget").get<double>();
      const auto [lo, hi] =
          auto_choice_range(last.auto_budget->compute_seconds, last.auto_budget->down_bytes_per_second, c, 3, 8);
      EXPECT_GE(told, lo);
      EXPECT_LE(told, hi);
    } else {
      EXPECT_GT(last.tail_fwd_bits->mean, 7);
      EXPECT_GT(last.tail_bwd_bits->mean, 7);
    }
    c.run_dir = tmp.file("loopback");
  }
}

// `amaq export`: one PEFT adapter for the whole model (client head and tail, server middle), which
// loaded into the unsplit model gives the run's final evaluation.
TEST(TailSplit, ExportIsOneAdapterThatEvaluatesAsTheRunDid) {
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "export");
  c.schedule.steps = 4;
  c.val_fraction = 0.2;
  TrainServer srv(tail_server_for(c));
  const RunResult r = run_in_process(srv, c);
  export_adapter(c.run_dir, tmp.file("adapter"));
  const auto tensors = load_safetensors(join_path(tmp.file("adapter"), "adapter_model.safetensors"));
  for (int layer = 0; layer < 4; ++layer) {
    EXPECT_TRUE(
        tensors.count("base_model.model.model.layers." + std::to_string(layer) + ".self_attn.q_proj.lora_A.weight"))
        << layer;
  }
  DecoderPart m = full_model(ModelConfig::load(kModel));
  m->load_weights(CheckpointReader(kModel));
  load_peft_adapter(m, tmp.file("adapter"));
  ByteTokenizer tok;
  Dataset val = Dataset::load(c.data, tok, c.seq_len).split_off(c.val_fraction, c.schedule.seed);
  const auto local = evaluate_model(m, val, tok, c.batch, 4);
  EXPECT_NEAR(r.eval["loss"].get<double>(), local["loss"].get<double>(), 1e-5);
}

// The handshake refuses a client whose tail split differs from the server's (or that has none), and
// options a U-shaped run cannot serve are refused by name before anything trains.
TEST(TailSplit, MismatchesAndUnsupportedOptionsAreRefusedByName) {
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "mismatch");
  c.schedule.steps = 1;
  c.schedule.warmup = 0;
  c.retries = 0;
  ServerConfig other = tail_server_for(c);
  other.tail_split = 2;
  TrainServer srv(other);
  EXPECT_AMAQ_ERROR(run_in_process(srv, c), "different tail split: client 3, server 2");
  ClientConfig two_part = c;
  two_part.tail_split = 0;
  two_part.run_dir = tmp.file("two-part");
  EXPECT_AMAQ_ERROR(run_in_process(srv, two_part), "different tail split: client none, server 2");

  ClientConfig bad = c;
  bad.run_dir = tmp.file("bad");
  bad.tail_split = 1;
  EXPECT_AMAQ_ERROR(ClientTrainer(bad).run({}), "tail split 1 is outside [2, 4]");
  bad.tail_split = 3;
  bad.tail_fwd_codec = quant::CodecSpec::parse("amaq:budget=auto");
  EXPECT_AMAQ_ERROR(ClientTrainer(bad).run({}), "but not in --bwd-codec none:fp32: with --tail-split both travel down");
  bad.tail_fwd_codec = c.tail_fwd_codec;
  bad.fwd_codec = quant::CodecSpec::parse("amaq:budget=auto");
  EXPECT_AMAQ_ERROR(ClientTrainer(bad).run({}),
                    "but not in --tail-bwd-codec none:fp32: with --tail-split both travel up");
  ServerConfig graphs = tail_server_for(c);
  graphs.side.cuda_graph = true;
  EXPECT_AMAQ_ERROR(TrainServer{graphs}, "--cuda-graph");
}

// A hostile peer of a U-shaped server: labels in a FORWARD, a TAIL_BACKWARD larger than the
// activations it answers, and one for another micro-batch are each refused by name, and the server
// then trains an honest client's run as if nothing had happened.
TEST(TailSplit, HostileTailMessagesAreRefusedByNameAndTheServerKeepsServing) {
  testing::TempDir tmp;
  ClientConfig c = tail_config(tmp, "honest");
  c.schedule.steps = 2;
  c.schedule.warmup = 0;
  TrainServer srv(tail_server_for(c));
  const ModelConfig model = ModelConfig::load(kModel);
  const int64_t C = model.hidden_size;
  // Handshake and SCHEDULE as a U-shaped client would, then `then` on the channel.
  auto session = [&](const std::string& run_id, const std::function<wire::Status(wire::Channel&)>& then) {
    return scripted_session(srv, hello_for(c), ScheduleRequest{run_id, -1, 1, 4, c.schedule, "", 1}.to_json().dump(),
                            then);
  };
  // Sends a FORWARD of (1, 4, C) zeros (with labels when given); returns the server's reply.
  quant::Codec codec(c.fwd_codec);
  const std::string packet = codec.encode(at::zeros({1, 4, C})).packet;
  const uint8_t mask[4] = {1, 1, 1, 1};
  auto forward = [&](wire::Channel& ch, bool with_labels, wire::Frame* reply) {
    const int16_t labels[4] = {1, 2, 3, 4};
    wire::ForwardMsg fm;
    fm.batch = 1;
    fm.seq = 4;
    fm.mask = std::string_view(reinterpret_cast<const char*>(mask), sizeof mask);
    if (with_labels) {
      fm.label_type = wire::LabelType::kI16;
      fm.labels = std::string_view(reinterpret_cast<const char*>(labels), sizeof labels);
    }
    fm.packet = packet;
    return exchange(ch, {wire::MessageType::kForward, 0, fm.encode()}, reply);
  };
  wire::Status s = session("0123456789abcdef", [&](wire::Channel& ch) {
    wire::Frame reply;
    return forward(ch, true, &reply);
  });
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("labels stay on the client"), std::string::npos) << s.message;

  // After a proper FORWARD, a TAIL_BACKWARD of `rows` x 4 x C values for micro-batch `micro`.
  auto tail_backward = [&](int64_t rows, uint32_t micro) {
    return [&, rows, micro](wire::Channel& ch) {
      wire::Frame reply;
      wire::Status fs = forward(ch, false, &reply);
      if (!fs.ok()) return fs;
      EXPECT_EQ(reply.type, wire::MessageType::kTailForward);
      const std::string big = codec.encode(at::zeros({rows, 4, C})).packet;
      wire::BackwardMsg gm;
      gm.micro_batch = micro;
      gm.packet = big;
      fs = exchange(ch, {wire::MessageType::kTailBackward, 0, gm.encode()}, &reply);
      return fs.ok() ? wire::Status::Fail(wire::ErrorCode::kInternal, "the server took it") : fs;
    };
  };
  s = session("1123456789abcdef", tail_backward(3, 0));
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("more than the " + std::to_string(4 * C)), std::string::npos) << s.message;
  s = session("2123456789abcdef", tail_backward(1, 1));
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("TAIL_BACKWARD for another step or micro-batch"), std::string::npos) << s.message;

  // Micro-batches in flight are bounded by the step's: FORWARDs of micro-batch 0 and 1 each get
  // their TAIL_FORWARD, a third of this 2-micro-batch step, or a repeated one, is refused; a
  // TAIL_BACKWARD with nothing waiting, and a STEP or EVAL while micro-batches wait, are too.
  auto forwards = [&](std::vector<uint32_t> micro, std::optional<wire::Frame> last) {
    return [&, micro, last](wire::Channel& ch) {
      for (const uint32_t m : micro) {
        wire::ForwardMsg fm;
        fm.micro_batch = m;
        fm.batch = 1;
        fm.seq = 4;
        fm.mask = std::string_view(reinterpret_cast<const char*>(mask), sizeof mask);
        fm.packet = packet;
        wire::Frame reply;
        wire::Status fs = exchange(ch, {wire::MessageType::kForward, 0, fm.encode()}, &reply);
        if (!fs.ok()) return fs;
        EXPECT_EQ(reply.type, wire::MessageType::kTailForward);
      }
      if (!last) return wire::Status::Fail(wire::ErrorCode::kInternal, "the server took them all");
      wire::Frame reply;
      wire::Status fs = exchange(ch, *last, &reply);
      return fs.ok() ? wire::Status::Fail(wire::ErrorCode::kInternal, "the server took it") : fs;
    };
  };
  s = session("3123456789abcdef", forwards({0, 1, 2}, std::nullopt));
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("FORWARD for micro-batch 2, beyond the step's 2"), std::string::npos) << s.message;
  s = session("4123456789abcdef", forwards({0, 0}, std::nullopt));
  EXPECT_NE(s.message.find("FORWARD for step 0 micro-batch 0, but the server expects step 0 micro-batch 1"),
            std::string::npos)
      << s.message;
  wire::BackwardMsg empty;
  s = session("5123456789abcdef", forwards({}, wire::Frame{wire::MessageType::kTailBackward, 0, empty.encode()}));
  EXPECT_NE(s.message.find("TAIL_BACKWARD with no micro-batch waiting for it"), std::string::npos) << s.message;
  const std::string step_body = nlohmann::json{{"step", 0}, {"lr", 0.01}, {"coef", 1.0}}.dump();
  s = session("6123456789abcdef",
              forwards({0, 1}, wire::Frame{wire::MessageType::kControl, 0,
                                           wire::ControlMsg{wire::ControlKind::kStep, step_body, ""}.encode()}));
  EXPECT_NE(s.message.find("CONTROL while 2 micro-batch(es) of the step still wait for their TAIL_BACKWARD"),
            std::string::npos)
      << s.message;
  // BIT_SYNC: a budget out of range, and a budget for gates at M this run does not have.
  const auto bit_sync = [](const nlohmann::json& j) {
    return wire::Frame{wire::MessageType::kControl, 0,
                       wire::ControlMsg{wire::ControlKind::kBitSync, j.dump(), ""}.encode()};
  };
  s = session("7123456789abcdef", forwards({}, bit_sync({{"step", 0}, {"budget", 1e9}})));
  EXPECT_NE(s.message.find("BIT_SYNC budget 1000000000.000000 outside [1, 8]"), std::string::npos) << s.message;
  s = session("8123456789abcdef", forwards({}, bit_sync({{"step", 0}, {"tail_fwd_budget", 3}})));
  EXPECT_NE(s.message.find("BIT_SYNC with a tail budget, but this run's tail codec has no budget=auto"),
            std::string::npos)
      << s.message;

  EXPECT_EQ(run_in_process(srv, c).completed_steps, 2);
}

// ecsq at every crossing of a U-shaped run: it trains as the uncompressed run does to within the
// quantization's effect, and each step's packets weigh what its bits say.
TEST(TailSplit, EcsqAtBothCutsTrainsCloseToTheUncompressedRun) {
  testing::TempDir tmp;
  ClientConfig exact = tail_config(tmp, "exact");
  exact.side.init_adapter = kModel + "/adapter";
  exact.schedule.steps = 10;
  TrainServer srv(tail_server_for(exact));
  const RunResult ref = run_in_process(srv, exact);
  ClientConfig c = exact;
  c.run_dir = tmp.file("ecsq");
  c.fwd_codec = c.tail_fwd_codec = quant::CodecSpec::parse("ecsq:bits=5");
  c.bwd_codec = c.tail_bwd_codec = quant::CodecSpec::parse("ecsq:bits=6");
  TrainServer srv_c(tail_server_for(c));
  const RunResult r = run_in_process(srv_c, c);
  ASSERT_EQ(r.steps.size(), ref.steps.size());
  for (size_t s = 0; s < r.steps.size(); ++s) {
    EXPECT_NEAR(r.steps[s].task_loss, ref.steps[s].task_loss, 0.02 * ref.steps[s].task_loss) << s;
    // Both cuts each way: packets of 5 (up: activations at K, gradients at M) and 6 bits (down), about.
    const double up = 8.0 * static_cast<double>(r.steps[s].fwd_packet_bytes) / static_cast<double>(r.steps[s].elements);
    EXPECT_GT(up, 4.0) << s;
    EXPECT_LT(up, 7.5) << s;
  }
  EXPECT_LT(r.steps.back().task_loss, r.steps.front().task_loss - 0.1);
}

}  // namespace
}  // namespace amaq::train
