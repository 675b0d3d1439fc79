// `amaq train` as a user runs it: options from a TOML file under the flags, the resolved options
// stored in the run directory, both transports, and bad config files named.
#include <gtest/gtest.h>

#include "core/fs.h"
#include "testing.h"

namespace amaq {
namespace {

std::string train_cmd(const testing::TempDir& tmp, const std::string& run, const std::string& extra) {
  return std::string(AMAQ_BINARY) + " train --model " + testing::data_path("hf/llama-gqa") + " --split 2 --data " +
         tmp.file("data.txt") + " --run-dir " + tmp.file(run) + " --quiet " + extra;
}

TEST(TrainCli, TomlConfigUnderFlagsAndResolvedOptionsStored) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("data.txt"), read_file(std::string(AMAQ_SOURCE_DIR) + "/README.md").substr(0, 3000));
  testing::write_bytes(tmp.file("run.toml"),
                       "steps = 50\nbatch = 2\nseq_len = 32\ntokenizer = \"byte\"\nfwd-codec = \"fixed:bits=4,gran=token\"\n"
                       "[lora]\nr = 4\ntargets = [\"q_proj\", \"v_proj\"]\n");
  std::string out;
  ASSERT_EQ(testing::run_command(train_cmd(tmp, "run", "--config " + tmp.file("run.toml") + " --steps 3"), &out), 0) << out;
  const std::string cfg = read_file(tmp.file("run/config.toml"));
  EXPECT_NE(cfg.find("steps = \"3\""), std::string::npos) << cfg;  // the flag wins over the file
  EXPECT_NE(cfg.find("lora-r = \"4\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("seq-len = \"32\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("lora-targets = \"q_proj,v_proj\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("fwd-codec = \"fixed:bits=4,gran=token\""), std::string::npos) << cfg;
  int step_lines = 0;
  for (size_t p = 0; (p = read_file(tmp.file("run/metrics.jsonl")).find("\"fwd_bits\"", p)) != std::string::npos; ++p) ++step_lines;
  EXPECT_EQ(step_lines, 3);

  // The same options over loopback TCP with a token.
  ASSERT_EQ(testing::run_command(train_cmd(tmp, "tcp", "--config " + tmp.file("run.toml") + " --steps 2 --transport tcp"), &out), 0)
      << out;
  EXPECT_TRUE(file_exists(tmp.file("tcp/checkpoints/step-00000002/state.safetensors")));

  testing::write_bytes(tmp.file("typo.toml"), "[lora]\nrank = 4\n");
  EXPECT_NE(testing::run_command(train_cmd(tmp, "typo", "--tokenizer byte --config " + tmp.file("typo.toml")), &out), 0);
  EXPECT_NE(out.find("lora-rank"), std::string::npos) << out;
  testing::write_bytes(tmp.file("broken.toml"), "steps = = 3\n");
  EXPECT_NE(testing::run_command(train_cmd(tmp, "broken", "--tokenizer byte --config " + tmp.file("broken.toml")), &out), 0);
  EXPECT_NE(out.find("not valid TOML"), std::string::npos) << out;
  EXPECT_NE(out.find("line 1"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq
