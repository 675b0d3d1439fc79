// The client maps and keeps only its own share of the checkpoint: peak resident memory of loading a
// ClientPart with k = 1 stays well below the full model's weight bytes.
#include <gtest/gtest.h>
#include <malloc.h>

#include <fstream>
#include <string>

#include "core/fs.h"
#include "core/runtime.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"

namespace amaq {
namespace {

bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";  // resets VmHWM to the current RSS (Linux >= 4.0)
  return static_cast<bool>(f);
}

TEST(Memory, ClientPartLoadsOnlyItsShareOfTheCheckpoint) {
  // A checkpoint big enough to dwarf allocator noise: 8 layers of hidden 512, ~113 MB of fp32.
  nlohmann::json j = nlohmann::json::parse(read_file(testing::data_path("hf/llama-gqa/config.json")));
  j["hidden_size"] = 512;
  j["intermediate_size"] = 1536;
  j["num_hidden_layers"] = 8;
  j["num_attention_heads"] = 8;
  j["num_key_value_heads"] = 4;
  j["head_dim"] = 64;
  j["vocab_size"] = 4096;
  ModelConfig config = ModelConfig::from_json(j, "memory test");
  testing::TempDir tmp;
  {
    DecoderPart full = full_model(config);
    NamedTensors weights;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(51);
    for (auto& [name, p] : full->base_weights()) weights.emplace_back(name, at::randn(p.sizes(), gen));
    save_safetensors(tmp.file("model.safetensors"), weights);
    write_file_atomic(tmp.file("config.json"), config.to_json().dump());
  }
  int64_t full_bytes = 0, client_bytes = 0;
  for (auto& [name, bytes] : CheckpointReader(tmp.path()).sizes()) {
    full_bytes += bytes;
    if (name.find("layers.") == std::string::npos || name.find("layers.0.") != std::string::npos) {
      if (name.find("model.norm") == std::string::npos && name != "lm_head.weight") client_bytes += bytes;
    }
  }

  // Peak RSS growth while loading a part; freed heap is returned first so reuse cannot hide growth.
  auto peak_growth = [&](int64_t begin, int64_t end) -> int64_t {
    ::malloc_trim(0);
    if (!reset_peak_rss()) return -1;
    const int64_t before_kb = proc_status_value("VmRSS");
    DecoderPart part(ModelConfig::load(tmp.path()), begin, end);
    part->load_weights(CheckpointReader(tmp.path()));
    return (proc_status_value("VmHWM") - before_kb) * 1024;
  };
  const int64_t full_grew = peak_growth(0, config.num_layers);
  if (full_grew < 0) GTEST_SKIP() << "/proc/self/clear_refs is not writable here";
  const int64_t client_grew = peak_growth(0, 1);
  std::printf("  peak RSS growth: client k=1 %.1f MB (its weights %.1f MB); full model %.1f MB (weights %.1f MB)\n",
              client_grew / 1e6, client_bytes / 1e6, full_grew / 1e6, full_bytes / 1e6);
  // The measurement sees a whole load: the unsplit model grows by at least its weights.
  EXPECT_GE(full_grew, full_bytes * 9 / 10);
  EXPECT_LT(client_grew, full_bytes);
  // Its own weights, plus at most one tensor in flight while loading, plus allocator slack.
  EXPECT_GE(client_grew, client_bytes * 9 / 10);
  EXPECT_LT(client_grew, 2 * client_bytes + (8 << 20));
}

}  // namespace
}  // namespace amaq
