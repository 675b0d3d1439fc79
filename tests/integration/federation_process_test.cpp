// SplitFed as users run it (ctest label `integration`): one `amaq server`, two `amaq client`
// processes with their own data in one federation. Both finish and end with the same client-side
// LoRA (averaged at the end) and the same server-side adapter (shared).
#include <gtest/gtest.h>

#include <algorithm>

#include "core/fs.h"
#include "core/safetensors.h"
#include "integration/process.h"
#include "testing.h"
#include "train/checkpoint.h"

namespace amaq {
namespace {

using testing::Process;
using testing::slurp;

TEST(IntegrationFederation, TwoClientProcessesOnTheirOwnDataEndWithTheSameAdapters) {
  testing::TempDir tmp;
  const std::string text = testing::english_text(6000);
  std::string reversed = text;
  std::reverse(reversed.begin(), reversed.end());
  testing::write_bytes(tmp.file("a.txt"), text);
  testing::write_bytes(tmp.file("b.txt"), reversed);
  const std::string model = testing::data_path("hf/llama-gqa"), bin = AMAQ_BINARY;
  Process server({bin, "server", "--model", model, "--split", "2", "--listen", "127.0.0.1:0", "--run-dir",
                  tmp.file("server-runs"), "--fwd-codec", "fixed:bits=4", "--bwd-codec", "fixed:bits=8"},
                 tmp.file("server.out"), tmp.file("server.err"));
  const std::string port = testing::wait_for_port(tmp.file("server.out"));
  ASSERT_FALSE(port.empty()) << slurp(tmp.file("server.err"));
  auto client = [&](const std::string& name, const std::string& data) {
    return testing::small_client_args(bin, model, port, tmp.file(name), data,
                                      {"--steps", "5", "--fwd-codec", "fixed:bits=4", "--bwd-codec", "fixed:bits=8",
                                       "--federation", "team", "--fed-clients", "2", "--fed-every", "2"});
  };
  Process a(client("a", tmp.file("a.txt")), tmp.file("a.out"), tmp.file("a.err"));
  Process b(client("b", tmp.file("b.txt")), tmp.file("b.out"), tmp.file("b.err"));
  ASSERT_EQ(a.wait(), 0) << slurp(tmp.file("a.err"));
  ASSERT_EQ(b.wait(), 0) << slurp(tmp.file("b.err"));

  const std::string adapter = "server_adapter/adapter_model.safetensors";
  EXPECT_EQ(slurp(join_path(tmp.file("a"), adapter)), slurp(join_path(tmp.file("b"), adapter)));
  const auto ca = load_safetensors(train::checkpoint_path(tmp.file("a/checkpoints"), 5) + "/state.safetensors"),
             cb = load_safetensors(train::checkpoint_path(tmp.file("b/checkpoints"), 5) + "/state.safetensors");
  int lora = 0;
  for (const auto& [k, t] : ca) {
    if (k.find("lora_") == std::string::npos) continue;
    ++lora;
    EXPECT_TRUE(at::equal(t, cb.at(k))) << k;
  }
  EXPECT_GT(lora, 0);
  // Different data: the losses of the first step differ.
  const auto la = testing::lines_with(tmp.file("a/metrics.jsonl"), "fwd_bits"),
             lb = testing::lines_with(tmp.file("b/metrics.jsonl"), "fwd_bits");
  ASSERT_EQ(la.size(), 5u);
  ASSERT_EQ(lb.size(), 5u);
  EXPECT_NE(la[0]["task_loss"], lb[0]["task_loss"]);
  server.signal(SIGTERM);
  EXPECT_EQ(server.wait(), 0) << slurp(tmp.file("server.err"));
}

}  // namespace
}  // namespace amaq
