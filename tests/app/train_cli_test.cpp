// `amaq train` as a user runs it: options from a TOML file under the flags, the resolved options
// stored in the run directory, both transports, and bad config files named.
#include <gtest/gtest.h>

#include <sstream>

#include "core/fs.h"
#include "testing.h"

namespace amaq {
namespace {

std::string train_cmd(const testing::TempDir& tmp, const std::string& run, const std::string& extra) {
  return std::string(AMAQ_BINARY) + " train --model " + testing::data_path("hf/llama-gqa") + " --split 2 --data " +
         tmp.file("data.txt") + " --run-dir " + tmp.file(run) + " --quiet " + extra;
}

TEST(IntegrationTrainCli, TomlConfigUnderFlagsAndResolvedOptionsStored) {
#if !AMAQ_HAVE_TOML
  GTEST_SKIP() << "this build has no TOML support (toml++ was not found)";
#endif
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("data.txt"), testing::english_text(3000));
  testing::write_bytes(
      tmp.file("run.toml"),
      "steps = 50\nbatch = 2\nseq_len = 32\ntokenizer = \"byte\"\nfwd-codec = \"fixed:bits=4,gran=token\"\n"
      "[lora]\nr = 4\ntargets = [\"q_proj\", \"v_proj\"]\n");
  std::string out;
  ASSERT_EQ(testing::run_command(train_cmd(tmp, "run", "--config " + tmp.file("run.toml") + " --steps 3"), &out), 0)
      << out;
  const std::string cfg = read_file(tmp.file("run/config.toml"));
  EXPECT_NE(cfg.find("steps = \"3\""), std::string::npos) << cfg;  // the flag wins over the file
  EXPECT_NE(cfg.find("lora-r = \"4\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("seq-len = \"32\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("lora-targets = \"q_proj,v_proj\""), std::string::npos) << cfg;
  EXPECT_NE(cfg.find("fwd-codec = \"fixed:bits=4,gran=token\""), std::string::npos) << cfg;
  int step_lines = 0;
  for (size_t p = 0; (p = read_file(tmp.file("run/metrics.jsonl")).find("\"fwd_bits\"", p)) != std::string::npos; ++p)
    ++step_lines;
  EXPECT_EQ(step_lines, 3);

  // The same options over loopback TCP with a token.
  ASSERT_EQ(testing::run_command(
                train_cmd(tmp, "tcp", "--config " + tmp.file("run.toml") + " --steps 2 --transport tcp"), &out),
            0)
      << out;
  EXPECT_TRUE(file_exists(tmp.file("tcp/checkpoints/step-00000002/state.safetensors")));

  testing::write_bytes(tmp.file("typo.toml"), "[lora]\nrank = 4\n");
  EXPECT_NE(testing::run_command(train_cmd(tmp, "typo", "--tokenizer byte --config " + tmp.file("typo.toml")), &out),
            0);
  EXPECT_NE(out.find("lora-rank"), std::string::npos) << out;
  testing::write_bytes(tmp.file("broken.toml"), "steps = = 3\n");
  EXPECT_NE(
      testing::run_command(train_cmd(tmp, "broken", "--tokenizer byte --config " + tmp.file("broken.toml")), &out), 0);
  EXPECT_NE(out.find("not valid TOML"), std::string::npos) << out;
  EXPECT_NE(out.find("line 1"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq

namespace amaq {
namespace {

// The demo end to end at a tenth of its size: three runs over loopback TCP and the side-by-side
// table, AMAQ sending a fraction of bf16's bytes.
TEST(IntegrationDemoCli, ThreeTransportsSideBySide) {
  testing::TempDir tmp;
  std::string out;
  ASSERT_EQ(testing::run_command(std::string(AMAQ_BINARY) + " demo --quiet --dir " + tmp.file("demo") +
                                     " --steps 40 --length 4 --train-examples 300 --val-examples 40 2>/dev/null",
                                 &out),
            0)
      << out;
  for (const char* row : {"\namaq ", "\nbf16 ", "\nfixed-4bit "}) EXPECT_NE(out.find(row), std::string::npos) << out;
  const auto amaq = out.find("\namaq ");
  const std::string line = out.substr(amaq + 1, out.find('\n', amaq + 1) - amaq - 1);
  std::istringstream fields(line);
  std::string name, exact, loss, mb_fwd, mb_bwd, mb_total, vs_bf16;
  fields >> name >> exact >> loss >> mb_fwd >> mb_bwd >> mb_total >> vs_bf16;
  EXPECT_LT(std::stod(vs_bf16), 45.0) << line;
  for (const char* run : {"amaq", "bf16", "fixed-4bit"}) {
    EXPECT_TRUE(file_exists(tmp.file(std::string("demo/") + run + "/summary.txt"))) << run;
  }
}

}  // namespace
// Flags that would hang or poison a run are refused as flags, naming the flag.
TEST(IntegrationTrainCli, AbsurdFlagsAreRefusedByName) {
  std::string out;
  const std::string bin = AMAQ_BINARY;
  EXPECT_NE(testing::run_command(bin + " --threads 100000 init-model --out /nonexistent/x", &out), 0);
  EXPECT_NE(out.find("--threads"), std::string::npos) << out;
  EXPECT_NE(testing::run_command(bin + " train --model m --split 1 --run-dir r --data d --lora-alpha nan", &out), 0);
  EXPECT_NE(out.find("LoRA alpha must be a positive finite number"), std::string::npos) << out;
}

}  // namespace amaq
