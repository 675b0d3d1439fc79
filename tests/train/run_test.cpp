// Split runs end to end in one process (ClientTrainer + TrainServer, the code behind `amaq train`,
// `amaq client` and `amaq server`): uncompressed split training equals the unsplit model's training
// with the same schedule; a run interrupted and resumed equals the uninterrupted one; mismatches
// are refused by name.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/nn/utils/clip_grad.h>
#include <unistd.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <numeric>
#include <thread>

#include "core/device.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "core/svg.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/eval.h"
#include "train/export.h"
#include "train/metrics.h"
#include "train/report.h"
#include "train/run_testing.h"
#include "train/session.h"
#include "train/side.h"
#include "wire/handshake.h"
#include "wire/link_emulator.h"
#include "wire/messages.h"
#include "wire/tcp.h"

namespace amaq::train {
namespace {

TEST(SplitRun, UncompressedSplitOverTcpReproducesUnsplitTraining) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.side.init_adapter = kModel + "/adapter";
  TcpTrainServer tcp(server_for(c, c.side));
  TrainServer& srv = tcp.srv;
  const uint16_t server_port = tcp.server.port();
  RunResult r = run_over_tcp(c, server_port);
  std::vector<double> ref = unsplit_losses(c);
  ASSERT_EQ(r.steps.size(), ref.size());
  for (size_t s = 0; s < ref.size(); ++s) EXPECT_NEAR(r.steps[s].task_loss, ref[s], 1e-6) << "step " << s;
  EXPECT_LT(ref.back(), ref.front() - 0.1);
  // Clipping was active (the test would not notice a missing server norm otherwise).
  EXPECT_GT(r.steps.front().grad_norm, c.schedule.clip);
  EXPECT_EQ(srv.steps_served(), 20u);
}

// bf16 compute with bf16 activations and gradients across the split (none:bf16 sends them as they
// are) is the unsplit bf16 model's training, bit for bit: the split adds no rounding of its own.
// (Clipping is off: torch's clip_grad_norm_ computes the norm in another order than the two sides.)
TEST(SplitRun, Bf16SplitWithBf16PacketsEqualsTheUnsplitBf16Run) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.side.init_adapter = kModel + "/adapter";
  c.side.dtype = "bf16";
  c.schedule.clip = 0;
  c.fwd_codec = quant::CodecSpec::parse("none:bf16");
  c.bwd_codec = quant::CodecSpec::parse("none:bf16");
  TrainServer srv(server_for(c, c.side));
  RunResult r = run_in_process(srv, c);
  std::vector<double> ref = unsplit_losses(c);
  ASSERT_EQ(r.steps.size(), ref.size());
  for (size_t s = 0; s < ref.size(); ++s) EXPECT_EQ(r.steps[s].task_loss, ref[s]) << "step " << s;
  EXPECT_LT(ref.back(), ref.front() - 0.1);
  // And it is bf16 arithmetic: the fp32 run's losses differ.
  ClientConfig f = c;
  f.side.dtype = "fp32";
  std::vector<double> fp32 = unsplit_losses(f);
  EXPECT_NE(fp32, ref);
}

// The common real setup, a CPU client and a GPU server, and both sides on the GPU (the client's AMAQ
// gates then take their gradient from codes recomputed on the GPU): the all-CPU run's losses and
// bits, to rounding (fp32, TF32 off; matrix products sum in another order on the GPU). Skips
// without CUDA.
TEST(SplitRun, CpuClientWithCudaServerAndAllCudaTrainAsAllCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU in this build or machine";
  at::globalContext().setAllowTF32CuBLAS(false);
  testing::TempDir tmp;
  std::vector<RunResult> runs;
  for (const auto& [client, server] : {std::pair{"cpu", "cpu"}, std::pair{"cpu", "cuda"}, std::pair{"cuda", "cuda"}}) {
    ClientConfig c =
        amaq_run_config(tmp, std::string(client) + "-" + server, "amaq:budget=4,decay=4", "amaq:budget=6,decay=4");
    c.side.device = client;
    SideOptions s = c.side;
    s.device = server;
    TrainServer srv(server_for(c, s));
    runs.push_back(run_in_process(srv, c));
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    ASSERT_EQ(runs[r].steps.size(), runs[0].steps.size());
    for (size_t s = 0; s < runs[0].steps.size(); ++s) {
      EXPECT_NEAR(runs[r].steps[s].task_loss, runs[0].steps[s].task_loss, 1e-3) << "run " << r << " step " << s;
      EXPECT_EQ(runs[r].steps[s].fwd_bits.mean, runs[0].steps[s].fwd_bits.mean) << "run " << r << " step " << s;
    }
  }
}

// --server-cuda-graph: the server's micro-batches captured as a CUDA graph train as the eager server
// does (2 micro-batches per step, AMAQ both ways, evaluation between). Refused on the CPU.
TEST(SplitRun, ServerCudaGraphTrainsAsTheEagerServer) {
  testing::TempDir tmp;
  const ClientConfig c = amaq_run_config(tmp, "eager", "amaq:budget=4,decay=4", "amaq:budget=6,decay=4");
  SideOptions s = c.side;
  s.cuda_graph = true;
  if (!cuda_available()) {
    EXPECT_AMAQ_ERROR(TrainServer(server_for(c, s)), "--cuda-graph cannot capture", "on the CPU");
    GTEST_SKIP() << "no CUDA GPU in this build or machine (checked: the CPU is refused)";
  }
  at::globalContext().setAllowTF32CuBLAS(false);
  s.device = "cuda";
  SideOptions eager_side = s;
  eager_side.cuda_graph = false;
  TrainServer eager_srv(server_for(c, eager_side));
  const RunResult eager = run_in_process(eager_srv, c);
  ClientConfig g = c;
  g.run_dir = tmp.file("graphed");
  TrainServer graph_srv(server_for(g, s));
  const RunResult graphed = run_in_process(graph_srv, g);
  ASSERT_EQ(graphed.steps.size(), eager.steps.size());
  double worst = 0;
  for (size_t i = 0; i < eager.steps.size(); ++i) {
    worst = std::max(worst, std::abs(graphed.steps[i].task_loss - eager.steps[i].task_loss));
    EXPECT_EQ(graphed.steps[i].fwd_bits.mean, eager.steps[i].fwd_bits.mean) << "step " << i;
  }
  EXPECT_LE(worst, 1e-6);
  EXPECT_EQ(graphed.eval.dump(), eager.eval.dump());
  std::printf("[ cuda graph ] largest |loss - eager loss| over %zu steps: %.3g\n", eager.steps.size(), worst);
}

// A run interrupted after step 4 and resumed equals the uninterrupted serial run bit for bit (losses,
// bits, evaluation, both sides' final tensors). With `in_flight` > 1 the interrupted and resumed
// parts keep that many micro-batches in flight: pipelining changes nothing either.
void expect_resume_matches(const std::string& fwd, const std::string& bwd, int64_t in_flight = 1) {
  SCOPED_TRACE(fwd + " / " + bwd + ", in flight " + std::to_string(in_flight));
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "whole");
  c.schedule.steps = 10;
  c.schedule.micro_batches = std::max<int64_t>(2, in_flight);
  c.fwd_codec = quant::CodecSpec::parse(fwd);
  c.bwd_codec = quant::CodecSpec::parse(bwd);
  c.checkpoint_every = 3;
  c.val_fraction = 0.2;
  c.eval_every = 4;
  TrainServer srv(server_for(c, c.side));
  RunResult whole = run_in_process(srv, c);

  ClientConfig first = c;
  first.run_dir = tmp.file("parts");
  first.in_flight = in_flight;
  first.stop_after = 4;  // checkpoints at 3 and 4; the resumed run continues from 4
  ServerConfig sc = server_for(first, first.side);
  {
    TrainServer srv1(sc);
    RunResult part = run_in_process(srv1, first);
    EXPECT_EQ(part.completed_steps, 4);
  }
  ClientConfig second = first;
  second.stop_after = -1;
  second.resume = true;
  TrainServer srv2(sc);  // a new server process: only the disk carries over
  RunResult resumed = run_in_process(srv2, second);
  ASSERT_EQ(whole.steps.size(), 10u);
  expect_same_steps(whole, resumed);
  // Both sides' tensors at the last step (the server's under its run id).
  const std::vector<std::string> whole_runs = list_subdirs(c.run_dir + "-server"),
                                 part_runs = list_subdirs(first.run_dir + "-server");
  ASSERT_EQ(whole_runs.size(), 1u);
  ASSERT_EQ(part_runs.size(), 1u);
  expect_same_checkpoint(c.run_dir + "/checkpoints", second.run_dir + "/checkpoints", 10);
  expect_same_checkpoint(join_path(c.run_dir + "-server", whole_runs[0]),
                         join_path(first.run_dir + "-server", part_runs[0]), 10);
}

TEST(SplitRun, ResumedRunEqualsUninterruptedRunWithAmaq) {
  expect_resume_matches("amaq:budget=3,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token");
}

TEST(SplitRun, ResumedRunEqualsUninterruptedRunWithAqsgd) {
  expect_resume_matches("aqsgd:bits=3", "aqsgd:bits=8");
}

// RUN/report.html, written at the end of every run: its plotted series are the metrics' values
// (read back from the SVG), for a run that stopped and resumed, with AMAQ's map as a heatmap whose
// cells are the logged widths; and for an AQ-SGD run.
TEST(Report, ThePagesSeriesAreTheRunsMetricsAcrossAResume) {
  testing::TempDir tmp;
  ClientConfig c =
      amaq_run_config(tmp, "amaq-run", "amaq:budget=3,decay=6,gran=token", "amaq:budget=6,decay=6,gran=token");
  c.checkpoint_every = 2;
  c.stop_after = 5;
  {
    TrainServer srv(server_for(c, c.side));
    run_in_process(srv, c);
  }
  c.stop_after = -1;
  c.resume = true;
  TrainServer srv(server_for(c, c.side));
  run_in_process(srv, c);
  const std::string html = read_file(join_path(c.run_dir, "report.html"));
  const std::vector<StepRecord> steps = read_metrics(join_path(c.run_dir, "metrics.jsonl"));
  ASSERT_EQ(steps.size(), 8u);
  // The first series named after the run is the loss per step; then each figure's own.
  const auto loss = svg::series_values(html, "amaq-run");
  const auto bits = svg::series_values(html, "amaq-run mean");
  const auto fwd_bytes = svg::series_values(html, "amaq-run forward");
  ASSERT_EQ(loss.size(), steps.size());
  ASSERT_EQ(bits.size(), steps.size());
  ASSERT_EQ(fwd_bytes.size(), steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    EXPECT_EQ(loss[i].first, static_cast<double>(steps[i].step + 1));
    EXPECT_EQ(loss[i].second, steps[i].task_loss) << i;
    EXPECT_EQ(bits[i].second, steps[i].fwd_bits.mean) << i;
    EXPECT_EQ(fwd_bytes[i].second, static_cast<double>(steps[i].fwd_wire_bytes) / 1e6) << i;
  }
  EXPECT_LT(steps.back().fwd_bits.mean, steps.front().fwd_bits.mean) << "the map walked down";
  // The heatmap: one row per step, one column per channel (64 <= 128: no binning), the logged widths.
  std::vector<double> cells;
  for (size_t at = html.find("data-v=\""); at != std::string::npos; at = html.find("data-v=\"", at + 1))
    cells.push_back(std::stod(html.substr(at + 8)));
  ASSERT_EQ(cells.size(), 8u * 64u);
  for (size_t r = 0; r < 8; ++r) {
    const std::vector<int64_t> map = decode_bit_map(steps[r].fwd_map);
    ASSERT_EQ(map.size(), 64u);
    for (size_t ch = 0; ch < 64; ++ch) EXPECT_EQ(cells[r * 64 + ch], static_cast<double>(map[ch])) << r << "," << ch;
  }
  for (const char* s : {"validation loss", "Where each step", "fwd_codec", "amaq:budget=3", "run_id"})
    EXPECT_NE(html.find(s), std::string::npos) << s;
  EXPECT_EQ(html.find("<script"), std::string::npos) << "self-contained: no scripts";
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg")) << "no external resources";

  ClientConfig q = base_config(tmp, "aqsgd-run");
  q.schedule.steps = 4;
  q.fwd_codec = quant::CodecSpec::parse("aqsgd:bits=3");
  q.bwd_codec = quant::CodecSpec::parse("aqsgd:bits=8");
  TrainServer qs(server_for(q, q.side));
  run_in_process(qs, q);
  const std::string qhtml = read_file(join_path(q.run_dir, "report.html"));
  EXPECT_EQ(svg::series_values(qhtml, "aqsgd-run").size(), 4u);
  EXPECT_EQ(qhtml.find("data-v=\""), std::string::npos) << "no bit map without AMAQ";
  // Several runs overlaid in one page.
  const std::string both = tmp.file("both.html");
  write_report({c.run_dir, q.run_dir}, both);
  const std::string page = read_file(both);
  EXPECT_EQ(svg::series_values(page, "amaq-run").size(), 8u);
  EXPECT_EQ(svg::series_values(page, "aqsgd-run").size(), 4u);
}

// Micro-batches in flight (3 per step, all 3 sent before the first gradient is awaited), across an
// interruption and a resume, against the serial uninterrupted run: every codec, bit for bit.
TEST(SplitRun, InFlightEqualsSerialWithNone) {
  expect_resume_matches("none:fp32", "none:bf16", 3);
}
TEST(SplitRun, InFlightEqualsSerialWithFixed) {
  expect_resume_matches("fixed:bits=4,gran=token,round=stochastic", "fixed:bits=6,gran=token", 3);
}
TEST(SplitRun, InFlightEqualsSerialWithAmaq) {
  expect_resume_matches("amaq:budget=3,bmin=2,init=8,decay=5,gran=token",
                        "amaq:budget=6,bmin=4,init=8,decay=5,gran=token", 3);
}
TEST(SplitRun, InFlightEqualsSerialWithAqsgd) {
  expect_resume_matches("aqsgd:bits=3", "aqsgd:bits=8", 3);
}

TEST(SplitRun, AmaqLearnsWhileSendingAFractionOfTheBytes) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "amaq");
  c.schedule.steps = 30;
  c.fwd_codec = quant::CodecSpec::parse("amaq:budget=3,bmin=2,init=8,decay=10,gran=token");
  c.bwd_codec = quant::CodecSpec::parse("amaq:budget=6,bmin=4,init=8,decay=10,gran=token");
  TrainServer srv(server_for(c, c.side));
  RunResult amaq = run_in_process(srv, c);
  ClientConfig f = base_config(tmp, "fp32");
  f.schedule.steps = 30;
  TrainServer srv_f(server_for(f, f.side));
  RunResult full = run_in_process(srv_f, f);
  const auto& a = amaq.steps;
  const auto& u = full.steps;
  std::printf("  amaq: loss %.5f -> %.5f (fp32 %.5f -> %.5f), bits fwd %.2f -> %.2f, bwd %.2f -> %.2f\n",
              a.front().task_loss, a.back().task_loss, u.front().task_loss, u.back().task_loss, a.front().fwd_bits.mean,
              a.back().fwd_bits.mean, a.front().bwd_bits.mean, a.back().bwd_bits.mean);
  // At least 80% of the uncompressed run's loss reduction over the same 30 steps.
  EXPECT_LT(a.back().task_loss, a.front().task_loss - 0.8 * (u.front().task_loss - u.back().task_loss));
  EXPECT_LE(a.back().fwd_bits.mean, 3.0);
  EXPECT_GT(a.front().fwd_bits.mean, 6.0);
  EXPECT_LE(a.back().bwd_bits.mean, 6.0);
  EXPECT_LT(a.back().fwd_packet_bytes * 8, u.back().fwd_packet_bytes);  // 32-bit floats vs ~3 bits
  // The wire carries the packets plus exactly the FORWARD/BACKWARD framing (docs/protocol.md):
  // labels in the narrowest integer type for the vocabulary, a mask byte per cell.
  const uint64_t label_bytes = wire::label_bytes(wire::narrowest_label_type(ModelConfig::load(c.model).vocab_size));
  ASSERT_LT(label_bytes, 8u);
  for (const StepRecord& r : a) {
    EXPECT_EQ(r.forward_frame_bytes, r.fwd_packet_bytes + 2 * (24 + 24 + 8 + 8) + (label_bytes + 1) * r.cells)
        << r.step;
    EXPECT_EQ(r.backward_frame_bytes, r.bwd_packet_bytes + 2 * (24 + 8 + 4 + 4 + 8 + 4 + 4 + 4 + 8)) << r.step;
    // Besides the FORWARD frames the client sends one CONTROL STEP per step (and a BIT_SYNC when the
    // backward budget moves): each a 24-byte frame header, an 8-byte control header and a short JSON.
    const uint64_t control = r.fwd_wire_bytes - r.forward_frame_bytes;
    EXPECT_GE(control, 24u + 8 + 20) << r.step;
    EXPECT_LE(control, 2u * (24 + 8 + 100)) << r.step;
  }
  // The learned map is written for the random-map ablation: the same widths shuffled over the
  // channels, sent by the fixed codec, cost exactly the map's mean bits at every step.
  const std::string map_file = join_path(amaq.run_dir, "fwd_bit_map.json");
  const auto widths = nlohmann::json::parse(read_file(map_file)).get<std::vector<int>>();
  ASSERT_EQ(static_cast<int64_t>(widths.size()), ModelConfig::load(c.model).hidden_size);
  const double map_mean = std::accumulate(widths.begin(), widths.end(), 0.0) / static_cast<double>(widths.size());
  EXPECT_LE(map_mean, 3.0);
  ClientConfig r = base_config(tmp, "random-map");
  r.schedule.steps = 5;
  r.fwd_codec = quant::CodecSpec::parse("fixed:map=" + map_file + ",shuffle=7,gran=token");
  TrainServer srv_r(server_for(r, r.side));
  for (const StepRecord& rec : run_in_process(srv_r, r).steps)
    EXPECT_DOUBLE_EQ(rec.fwd_bits.mean, map_mean) << rec.step;
}

// `amaq export --merged`: LoRA merged into the weights gives the base + adapter model's logits; full
// weights are copied from each side's checkpoint (the server's from its own run directory).
TEST(SplitRun, MergedExportEqualsBasePlusAdapterAndCarriesFullWeights) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "lora");
  c.schedule.steps = 4;
  TrainServer srv(server_for(c, c.side));
  run_in_process(srv, c);
  export_adapter(c.run_dir, tmp.file("adapter"));
  export_merged(c.run_dir, tmp.file("merged"));
  DecoderPart merged = full_model(ModelConfig::load(tmp.file("merged")));
  merged->load_weights(CheckpointReader(tmp.file("merged")));
  DecoderPart with_adapter = full_model(ModelConfig::load(kModel));
  with_adapter->load_weights(CheckpointReader(kModel));
  load_peft_adapter(with_adapter, tmp.file("adapter"));
  DecoderPart base = full_model(ModelConfig::load(kModel));
  base->load_weights(CheckpointReader(kModel));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(41);
  const at::Tensor ids = at::randint(3, 250, {2, 16}, gen);
  const at::Tensor want = with_adapter->forward(ids);
  EXPECT_TRUE(testing::all_close(merged->forward(ids), want, 1e-5, 1e-4));
  EXPECT_FALSE(at::allclose(base->forward(ids), want, 1e-4, 1e-4));  // the run trained something

  ClientConfig f = base_config(tmp, "full");
  f.schedule.steps = 3;
  f.side.full = true;
  SideOptions server_side = f.side;
  TrainServer srv_f(server_for(f, server_side));
  run_in_process(srv_f, f);
  EXPECT_AMAQ_ERROR(export_adapter(f.run_dir, tmp.file("nope")), "full weights");
  EXPECT_AMAQ_ERROR(export_merged(f.run_dir, tmp.file("nope")), "server-run-dir");
  export_merged(f.run_dir, tmp.file("merged-full"), f.run_dir + "-server");
  const auto out = load_safetensors(tmp.file("merged-full/model.safetensors"));
  const auto client_ckpt = load_safetensors(checkpoint_path(f.run_dir + "/checkpoints", 3) + "/state.safetensors");
  const std::string run_id = nlohmann::json::parse(read_file(f.run_dir + "/run.json")).at("run_id").get<std::string>();
  const auto server_ckpt = load_safetensors(checkpoint_path(f.run_dir + "-server/" + run_id, 3) + "/state.safetensors");
  const CheckpointReader base_ckpt(kModel);
  for (const char* name : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}) {
    EXPECT_TRUE(at::equal(out.at(name), client_ckpt.at(name))) << name;
    EXPECT_FALSE(at::equal(out.at(name), base_ckpt.load(name, at::kFloat))) << name;
  }
  for (const char* name : {"model.layers.3.mlp.down_proj.weight", "lm_head.weight"}) {
    EXPECT_TRUE(at::equal(out.at(name), server_ckpt.at(name))) << name;
    EXPECT_FALSE(at::equal(out.at(name), base_ckpt.load(name, at::kFloat))) << name;
  }
  EXPECT_TRUE(file_exists(tmp.file("merged-full/config.json")));
}

// A tied model split in two: the client trains the embedding in full, the server's head (its own
// copy) stays as it was, so the merged model has two matrices: written untied (its config says so),
// it loads with each as trained. Where neither side changed them apart (LoRA on both) it stays tied.
TEST(SplitRun, MergedExportOfATiedModelUntiesWhereTheSidesTrainedTheirOwn) {
  testing::TempDir tmp;
  const std::string model = testing::data_path("hf/qwen2-tied");
  const CheckpointReader base(model);
  const at::Tensor embed0 = base.load("model.embed_tokens.weight", at::kFloat);
  ClientConfig c = base_config(tmp, "full-client");
  c.model = model;
  c.schedule.steps = 3;
  c.side.full = true;
  TrainServer srv(server_for(c, SideOptions{}));
  run_in_process(srv, c);
  export_merged(c.run_dir, tmp.file("merged"));
  const auto out = load_safetensors(tmp.file("merged/model.safetensors"));
  const auto client_ckpt = load_safetensors(checkpoint_path(c.run_dir + "/checkpoints", 3) + "/state.safetensors");
  EXPECT_TRUE(at::equal(out.at("model.embed_tokens.weight"), client_ckpt.at("model.embed_tokens.weight")));
  EXPECT_FALSE(at::equal(out.at("model.embed_tokens.weight"), embed0));
  EXPECT_TRUE(at::equal(out.at("lm_head.weight"), embed0));  // the server's frozen head
  const ModelConfig merged_config = ModelConfig::load(tmp.file("merged"));
  EXPECT_FALSE(merged_config.tie_word_embeddings);
  DecoderPart merged = full_model(merged_config);
  merged->load_weights(CheckpointReader(tmp.file("merged")));
  EXPECT_TRUE(at::equal(merged->lm_head->weight, embed0));

  ClientConfig l = base_config(tmp, "lora");
  l.model = model;
  l.schedule.steps = 3;
  TrainServer srv_l(server_for(l, l.side));
  run_in_process(srv_l, l);
  export_merged(l.run_dir, tmp.file("merged-lora"));
  EXPECT_EQ(load_safetensors(tmp.file("merged-lora/model.safetensors")).count("lm_head.weight"), 0u);
  EXPECT_TRUE(ModelConfig::load(tmp.file("merged-lora")).tie_word_embeddings);
}

TEST(SplitRun, MismatchedCodecOrSplitIsRefusedByName) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 2;
  c.schedule.warmup = 0;
  ServerConfig sc = server_for(c, c.side);
  sc.fwd_codec = quant::CodecSpec::parse("fixed:bits=4");
  TrainServer srv(sc);
  EXPECT_AMAQ_ERROR(run_in_process(srv, c), "codec");
  c.run_dir = tmp.file("run2");
  sc.fwd_codec = c.fwd_codec;
  sc.split = 3;
  TrainServer srv3(sc);
  EXPECT_AMAQ_ERROR(run_in_process(srv3, c), "split");
}

// A serial step's time is the client's, the server's and the network's, each measured on its own
// (the server's comes back in BACKWARD): on loopback and through a 100 Mbit/s, 20 ms link, where
// the network is most of it. Codec time is part of each side's and is reported apart.
TEST(SplitRun, StepTimeIsTheSumOfClientServerAndNetworkOnLoopbackAndOverASlowLink) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "loopback");
  c.batch = 8;  // steps of tens of ms on loopback, so that "within 3%" is not a millisecond of scheduling
  c.seq_len = 64;
  c.schedule.steps = 4;
  c.schedule.micro_batches = 2;
  c.schedule.warmup = 0;
  c.in_flight = 1;
  c.fwd_codec = quant::CodecSpec::parse("amaq:budget=4");
  c.bwd_codec = quant::CodecSpec::parse("fixed:bits=8");
  TcpTrainServer tcp(server_for(c, c.side));
  const uint16_t server_port = tcp.server.port();
  wire::LinkEmulator link(0, "127.0.0.1", server_port, wire::LinkSpec::parse("100mbit/20ms"));
  for (const uint16_t port : {server_port, link.port()}) {
    RunResult r = run_over_tcp(c, port);
    ASSERT_EQ(r.steps.size(), 4u);
    for (const StepRecord& s : r.steps) {
      const double parts = s.client_seconds + s.server_seconds + s.network_seconds;
      EXPECT_NEAR(parts, s.step_seconds, 0.03 * s.step_seconds + 1e-3)
          << "port " << port << " step " << s.step << ": client " << s.client_seconds << " server " << s.server_seconds
          << " network " << s.network_seconds;
      EXPECT_GT(s.client_codec_seconds, 0.0);
      EXPECT_LT(s.client_codec_seconds, s.client_seconds);
      EXPECT_GT(s.server_codec_seconds, 0.0);
      EXPECT_LT(s.server_codec_seconds, s.server_seconds);
      // Two micro-batches, each a round trip of at least 20 ms over the slow link.
      if (port == link.port()) {
        EXPECT_GT(s.network_seconds, 0.040);
      }
    }
    c.run_dir = tmp.file("slow-link");
  }
}

// A serial run with budget=auto both ways (backward floor 4, budgets reached in 2 steps) and 32K
// elements per micro-batch: 32 KB at 8 bits, long enough to time.
ClientConfig auto_budget_config(const testing::TempDir& tmp, const std::string& name, int64_t steps) {
  ClientConfig c = base_config(tmp, name);
  c.batch = 8;
  c.seq_len = 64;
  c.schedule.steps = steps;
  c.schedule.warmup = 0;
  c.in_flight = 1;
  c.fwd_codec = quant::CodecSpec::parse("amaq:budget=auto,decay=2");
  c.bwd_codec = quant::CodecSpec::parse("amaq:budget=auto,bmin=4,floor=4,decay=2");
  return c;
}

// amaq:budget=auto over a 2 Mbit/s link measures the link's rate each way within 15% and, as this
// model's compute hides almost nothing, walks both budgets to their floors (to what the compute it
// measured hides: expect_auto_choice), which the packets then keep; over loopback (every frame here
// at once) the budgets stay at bmax.
TEST(SplitRun, AutoBudgetMeasuresTheLinkAndTakesTheFloorOnASlowOne) {
  testing::TempDir tmp;
  ClientConfig c = auto_budget_config(tmp, "slow", 6);
  TcpTrainServer tcp(server_for(c, c.side));
  const uint16_t server_port = tcp.server.port();
  const wire::LinkSpec spec = wire::LinkSpec::parse("2mbit/4ms");
  wire::LinkEmulator link(0, "127.0.0.1", server_port, spec);
  for (const uint16_t port : {link.port(), server_port}) {
    RunResult r = run_over_tcp(c, port);
    ASSERT_EQ(r.steps.size(), 6u);
    for (const StepRecord& s : r.steps) {
      ASSERT_TRUE(s.auto_budget.has_value()) << s.step;
      const StepRecord::AutoBudgetRecord& a = *s.auto_budget;
      if (s.step < 2) {  // warm-up: measured only
        EXPECT_EQ(a.fwd, 8);
        EXPECT_EQ(a.bwd, 8);
        continue;
      }
      if (port == link.port()) {
        const std::string step = "step " + std::to_string(s.step);
        expect_auto_choice(a.fwd, a.compute_seconds, a.up_bytes_per_second, c, 3, 8, step + " forward");
        expect_auto_choice(a.bwd, a.compute_seconds, a.down_bytes_per_second, c, 4, 8, step + " backward");
        EXPECT_NEAR(a.up_bytes_per_second * 8, spec.rate_bits_per_second, 0.15 * spec.rate_bits_per_second);
        EXPECT_NEAR(a.down_bytes_per_second * 8, spec.rate_bits_per_second, 0.15 * spec.rate_bits_per_second);
      } else {
        EXPECT_EQ(a.fwd, 8) << s.step;
        EXPECT_EQ(a.bwd, 8) << s.step;
      }
      EXPECT_GT(a.compute_seconds, 0);
    }
    // The packets follow the budgets.
    EXPECT_LE(r.steps.back().fwd_bits.mean, auto_bits_ceiling(r.steps, [](auto& s) { return s.auto_budget->fwd; }));
    EXPECT_LE(r.steps.back().bwd_bits.mean, auto_bits_ceiling(r.steps, [](auto& s) { return s.auto_budget->bwd; }));
    c.run_dir = tmp.file("loopback");
  }
}

// budget=auto follows a link that changes under a run: on 2 Mbit/s it takes the floors; once the
// link becomes 1 Gbit/s (after step 5), it measures that and goes back to bmax within three steps.
TEST(SplitRun, AutoBudgetFollowsALinkThatChangesUnderTheRun) {
  testing::TempDir tmp;
  ClientConfig c = auto_budget_config(tmp, "changing", 12);
  TcpTrainServer tcp(server_for(c, c.side));
  const uint16_t server_port = tcp.server.port();
  wire::LinkEmulator link(0, "127.0.0.1", server_port, wire::LinkSpec::parse("2mbit/4ms"));
  std::atomic<int64_t> switched_after{-1};
  std::thread changer([&] {  // once 5 steps are logged
    const std::string log = join_path(c.run_dir, "metrics.jsonl");
    for (int i = 0; i < 600; ++i) {
      if (file_exists(log) && read_metrics(log).size() >= 5) {
        link.set_rate(1e9);
        switched_after = static_cast<int64_t>(read_metrics(log).size());
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  RunResult r = run_over_tcp(c, link.port());
  changer.join();
  ASSERT_EQ(r.steps.size(), 12u);
  ASSERT_GE(switched_after, 5);
  ASSERT_LE(switched_after, 9);
  for (const StepRecord& s : r.steps) {
    ASSERT_TRUE(s.auto_budget.has_value());
    if (s.step >= 2 && s.step < 5) {  // on 2 Mbit/s
      const StepRecord::AutoBudgetRecord& a = *s.auto_budget;
      const std::string step = "step " + std::to_string(s.step);
      expect_auto_choice(a.fwd, a.compute_seconds, a.up_bytes_per_second, c, 3, 8, step + " forward");
      expect_auto_choice(a.bwd, a.compute_seconds, a.down_bytes_per_second, c, 4, 8, step + " backward");
      EXPECT_LT(a.up_bytes_per_second * 8, 3e6) << step;
    }
    if (s.step >= switched_after + 3) {
      EXPECT_EQ(s.auto_budget->fwd, 8) << s.step << ", link switched after step " << switched_after;
      EXPECT_EQ(s.auto_budget->bwd, 8) << s.step;
      EXPECT_GT(s.auto_budget->up_bytes_per_second * 8, 100e6) << s.step;
    }
  }
}

TEST(SplitRun, AServerSideThatFailsToBuildIsNamedNotBlamedOnTheLink) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 2;
  c.schedule.warmup = 0;
  // The server's adapter is truncated: its side fails while the client's is fine.
  const std::string adapter = kModel + "/adapter";
  make_dirs(tmp.file("bad-adapter"));
  write_file_atomic(tmp.file("bad-adapter/adapter_config.json"), read_file(adapter + "/adapter_config.json"));
  const std::string weights = read_file(adapter + "/adapter_model.safetensors");
  write_file_atomic(tmp.file("bad-adapter/adapter_model.safetensors"), weights.substr(0, weights.size() / 2));
  SideOptions server_side = c.side;
  server_side.init_adapter = tmp.file("bad-adapter");
  TrainServer srv(server_for(c, server_side));
  try {
    run_in_process(srv, c);
    ADD_FAILURE() << "the run started with a truncated adapter on the server";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("server refused the run"), std::string::npos) << what;
    EXPECT_NE(what.find("adapter_model.safetensors"), std::string::npos) << what;
    EXPECT_EQ(what.find("cannot reach"), std::string::npos) << what;
    EXPECT_EQ(e.hint().find("--connect"), std::string::npos) << e.hint();
  }
}

TEST(SplitRun, ResumeAtAStepTheServerLacksIsRefused) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 4;
  c.stop_after = 2;
  {
    TrainServer srv(server_for(c, c.side));
    run_in_process(srv, c);
  }
  c.resume = true;
  c.stop_after = -1;
  ServerConfig other = server_for(c, c.side);
  other.run_dir = tmp.file("empty-server");
  TrainServer srv(other);
  EXPECT_AMAQ_ERROR(run_in_process(srv, c), "no checkpoint of run", "at step 2", "cannot resume");
  // Starting a fresh run over an existing run directory is refused too.
  c.resume = false;
  EXPECT_AMAQ_ERROR(ClientTrainer(c).run([](std::unique_ptr<wire::Channel>*) { return wire::Status::Ok(); }),
                    "already holds a run", "--resume");
}

TEST(SplitRun, ScheduleWarmsUpThenDecaysByCosine) {
  Schedule s;
  s.steps = 11;
  s.warmup = 2;
  s.lr = 1.0;
  s.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.5);
  EXPECT_DOUBLE_EQ(s.lr_at(1), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(2), 1.0);
  EXPECT_NEAR(s.lr_at(6), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 4.0 / 8.0)), 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_at(10), 0.1);
  nlohmann::json j = s.to_json();
  j["warmup"] = 50;
  EXPECT_AMAQ_ERROR(Schedule::from_json(j), "warmup");
  EXPECT_DOUBLE_EQ(clip_coefficient(16.0, 2.0), 2.0 / (4.0 + 1e-6));
  EXPECT_EQ(clip_coefficient(1.0, 2.0), 1.0);
  EXPECT_EQ(clip_coefficient(100.0, 0.0), 1.0);
}

}  // namespace
}  // namespace amaq::train

namespace amaq::train {
namespace {

// Classification inside a split run: the server scores every label word; the accuracy is that of
// the argmax over words, which the same weights give locally (evaluate_model on the unsplit model).
TEST(SplitRun, ClassificationAccuracyThroughTheServerEqualsLocalEvaluation) {
  testing::TempDir tmp;
  std::string data;
  for (int i = 0; i < 40; ++i)
    data +=
        nlohmann::json{{"text", "item " + std::to_string(i * 7 % 13)}, {"label", i % 3 ? "yes" : "no"}}.dump() + "\n";
  testing::write_bytes(tmp.file("cls.jsonl"), data);
  ClientConfig c = base_config(tmp, "run");
  c.data = c.val_data = tmp.file("cls.jsonl");
  c.schedule.steps = 3;
  c.schedule.warmup = 0;
  c.side.init_adapter = kModel + "/adapter";
  TrainServer srv(server_for(c, c.side));
  RunResult r = run_in_process(srv, c);
  ASSERT_TRUE(r.eval.contains("accuracy"));
  // The same weights, unsplit: base + the adapter from the run's export.
  export_adapter(c.run_dir, tmp.file("adapter"));
  DecoderPart m = full_model(ModelConfig::load(kModel));
  m->load_weights(CheckpointReader(kModel));
  load_peft_adapter(m, tmp.file("adapter"));
  ByteTokenizer tok;
  const auto local = evaluate_model(m, Dataset::load(c.val_data, tok, c.seq_len), tok, 4, 4);
  EXPECT_DOUBLE_EQ(r.eval["accuracy"].get<double>(), local["accuracy"].get<double>());
  EXPECT_NEAR(r.eval["loss"].get<double>(), local["loss"].get<double>(), 1e-5);
}

// A peer that passed the handshake still gets every number checked: a SCHEDULE whose batch x seq_len
// overflows 64 bits is refused (it used to wrap to 0 and pass), and so is a FORWARD whose labels lie
// outside the vocabulary. The session ends with an ERROR naming the cause.
TEST(SplitRun, ServerRefusesOverflowingScheduleAndLabelsOutsideTheVocabulary) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "hostile");
  TrainServer srv(server_for(c, c.side));
  const ModelConfig model = ModelConfig::load(kModel);
  // Handshake as a client would, then `schedule` and (when it is accepted) `then`.
  auto session = [&](const nlohmann::json& schedule, const std::function<wire::Status(wire::Channel&)>& then) {
    return scripted_session(srv, hello_for(c), schedule.dump(), then);
  };
  nlohmann::json schedule{{"run_id", "0123456789abcdef"},
                          {"resume_step", -1},
                          {"schedule", c.schedule.to_json()},
                          {"batch", int64_t{1} << 33},
                          {"seq_len", int64_t{1} << 31}};
  wire::Status s = session(schedule, nullptr);
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("batch x seq_len"), std::string::npos) << s.message;

  schedule["batch"] = 1;
  schedule["seq_len"] = 4;
  schedule["run_id"] = "fedcba9876543210";
  s = session(schedule, [&](wire::Channel& ch) {
    quant::Codec codec(c.fwd_codec);
    const std::string packet = codec.encode(at::zeros({1, 4, model.hidden_size})).packet;
    const int16_t labels[4] = {1, 2, static_cast<int16_t>(model.vocab_size), -100};  // one id past the vocabulary
    wire::ForwardMsg fm;
    fm.batch = 1;
    fm.seq = 4;
    fm.label_type = wire::LabelType::kI16;
    fm.labels = std::string_view(reinterpret_cast<const char*>(labels), sizeof labels);
    fm.packet = packet;
    wire::Frame reply;
    const wire::Status fs = exchange(ch, {wire::MessageType::kForward, 0, fm.encode()}, &reply);
    return fs.ok() ? wire::Status::Fail(wire::ErrorCode::kInternal, "the server accepted the labels") : fs;
  });
  EXPECT_EQ(s.code, wire::ErrorCode::kBadMessage) << s.message;
  EXPECT_NE(s.message.find("labels outside [0, " + std::to_string(model.vocab_size) + ")"), std::string::npos)
      << s.message;
}

// Interrupted checkpoints leave `step-N.tmp.PID` directories: the next checkpoint removes those of
// processes that are gone, and keeps those of live ones (PID 1 here) and every complete checkpoint.
TEST(Checkpoints, TempDirectoriesOfDeadWritersAreRemoved) {
  testing::TempDir tmp;
  const std::string root = tmp.file("ckpt");
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);  // now a PID that no process has
  make_dirs(root + "/step-00000002.tmp." + std::to_string(child));
  make_dirs(root + "/step-00000003.tmp.1");
  write_checkpoint(root, 1, {{"state.json", "{}"}});
  EXPECT_FALSE(file_exists(root + "/step-00000002.tmp." + std::to_string(child)));
  EXPECT_TRUE(file_exists(root + "/step-00000003.tmp.1"));
  EXPECT_EQ(list_checkpoints(root), std::vector<int64_t>{1});
  EXPECT_EQ(remove_stale_temps(root), 0);
}

// A run that stopped before its first checkpoint (here: run.json and a log, as a crash leaves
// them) is started again in the same directory; the old log is kept beside the new one. A run that
// fails while loading its data leaves no run.json at all.
TEST(SplitRun, RunWithoutCheckpointStartsAgainInTheSameDirectory) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 2;
  c.schedule.warmup = 0;
  ClientConfig bad = c;
  bad.data = tmp.file("missing.txt");
  TrainServer srv(server_for(c, c.side));
  EXPECT_AMAQ_ERROR(run_in_process(srv, bad), "missing.txt");
  EXPECT_FALSE(file_exists(c.run_dir + "/run.json"));
  make_dirs(c.run_dir);
  testing::write_bytes(c.run_dir + "/run.json", R"({"run_id": "00000000deadbeef"})");
  testing::write_bytes(c.run_dir + "/metrics.jsonl", R"({"step": 0, "note": "the crashed run"})"
                                                     "\n");
  RunResult r = run_in_process(srv, c);
  EXPECT_EQ(r.completed_steps, 2);
  EXPECT_EQ(r.steps.size(), 2u);
  EXPECT_NE(read_file(c.run_dir + "/metrics.00000000deadbeef.jsonl").find("the crashed run"), std::string::npos);
  EXPECT_EQ(read_file(c.run_dir + "/metrics.jsonl").find("the crashed run"), std::string::npos);
  EXPECT_AMAQ_ERROR(run_in_process(srv, c), "already holds a run");  // with a checkpoint it does not start over
  // Private by default (0700 directories, 0600 files), whatever the umask lets through.
  struct stat st {};
  ASSERT_EQ(::stat(c.run_dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 077, 0u) << std::oct << (st.st_mode & 0777);
  const std::string ckpt_file = checkpoint_path(c.run_dir + "/checkpoints", 2) + "/state.safetensors";
  for (const std::string& f : {c.run_dir + "/run.json", ckpt_file, checkpoint_path(c.run_dir + "/checkpoints", 2)}) {
    ASSERT_EQ(::stat(f.c_str(), &st), 0) << f;
    EXPECT_EQ(st.st_mode & 077, 0u) << f << " " << std::oct << (st.st_mode & 0777);
  }
}

// --resume takes the newest checkpoint that loads: a damaged newest one is skipped (and the run then
// equals the uninterrupted one bit for bit); when none loads, the error names each file and why.
TEST(SplitRun, ResumeSkipsDamagedCheckpointsAndNamesThem) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "whole");
  c.schedule.steps = 6;
  TrainServer srv(server_for(c, c.side));
  RunResult whole = run_in_process(srv, c);

  ClientConfig part = base_config(tmp, "part");
  part.schedule.steps = 6;
  part.checkpoint_every = 2;
  part.stop_after = 5;  // client checkpoints at 2, 4, 5 (the server keeps the same steps)
  ServerConfig sc = server_for(part, part.side);
  {
    TrainServer s1(sc);
    run_in_process(s1, part);
  }
  const std::string ckpt = part.run_dir + "/checkpoints";
  ASSERT_EQ(list_checkpoints(ckpt), (std::vector<int64_t>{2, 4, 5}));
  const std::string newest = checkpoint_path(ckpt, 5) + "/state.safetensors";
  const std::string bytes = read_file(newest);
  testing::write_bytes(newest, bytes.substr(0, bytes.size() / 2));  // truncated
  ClientConfig again = part;
  again.stop_after = -1;
  again.resume = true;
  {
    TrainServer s2(sc);
    RunResult resumed = run_in_process(s2, again);
    ASSERT_EQ(resumed.steps.size(), 6u);
    for (size_t i = 0; i < 6; ++i) EXPECT_EQ(resumed.steps[i].loss, whole.steps[i].loss) << "step " << i;
  }
  // Every checkpoint damaged: the error lists each with its file.
  for (int64_t step : list_checkpoints(ckpt))
    testing::write_bytes(checkpoint_path(ckpt, step) + "/state.json", "{oops");
  TrainServer s3(sc);
  EXPECT_AMAQ_ERROR(run_in_process(s3, again), "can be resumed from", "state.json is damaged");
}

// --seq-len beyond the model's positions is refused before anything runs, unless asked for.
TEST(SplitRun, SeqLenBeyondThePositionsIsRefusedUnlessAskedFor) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "long");
  const int64_t positions = ModelConfig::load(kModel).max_position_embeddings;
  c.seq_len = positions + 1;
  TrainServer srv(server_for(c, c.side));
  const std::string named = "--seq-len " + std::to_string(positions + 1);
  EXPECT_AMAQ_ERROR(run_in_process(srv, c), named.c_str(), "max_position_embeddings", "--beyond-positions");
  EXPECT_FALSE(file_exists(c.run_dir + "/run.json"));
}

}  // namespace
}  // namespace amaq::train
