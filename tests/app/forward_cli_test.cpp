// `amaq forward` end to end: the binary, run as a user would, against the HF fixture.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/safetensors.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::data_path;

TEST(IntegrationForwardCli, SplitRunWithAdapterWritesHfLogitsAndHiddenStates) {
  testing::TempDir tmp;
  std::string model = data_path("hf/qwen2-tied"), out;
  std::string cmd = std::string(AMAQ_BINARY) + " forward --model " + model + " --split 3 --ids " + model +
                    "/io.safetensors --out " + tmp.file("o.safetensors") + " --hidden";
  ASSERT_EQ(testing::run_command(cmd, &out), 0) << out;
  auto got = load_safetensors(tmp.file("o.safetensors"));
  auto ref = load_safetensors(model + "/io.safetensors");
  EXPECT_TRUE(testing::all_close(got.at("logits"), ref.at("logits"), 1e-4, 1e-4));
  for (int i = 0; i <= 4; ++i) {
    std::string k = "hidden_" + std::to_string(i);
    EXPECT_TRUE(testing::all_close(got.at(k), ref.at(k), 1e-4, 1e-4)) << k;
  }
  ASSERT_EQ(testing::run_command(cmd + " --adapter " + model + "/adapter", &out), 0) << out;
  EXPECT_TRUE(
      testing::all_close(load_safetensors(tmp.file("o.safetensors")).at("logits"), ref.at("logits_lora"), 1e-4, 1e-4));
}

TEST(IntegrationForwardCli, BadInputExitsWithOneClearError) {
  testing::TempDir tmp;
  std::string model = data_path("hf/llama-gqa"), out;
  auto cfg = nlohmann::json::parse(read_file(model + "/config.json"));
  cfg["rope_parameters"]["rope_type"] = "dynamic";
  write_file_atomic(tmp.file("config.json"), cfg.dump());
  write_file_atomic(tmp.file("model.safetensors"), read_file(model + "/model.safetensors"));
  std::string cmd = std::string(AMAQ_BINARY) + " forward --model " + tmp.path() + " --ids " + model +
                    "/io.safetensors --out " + tmp.file("o.safetensors");
  EXPECT_EQ(testing::run_command(cmd, &out), 2);
  EXPECT_NE(out.find("'dynamic'"), std::string::npos) << out;
  EXPECT_NE(out.find("hint:"), std::string::npos) << out;
  EXPECT_EQ(out.find("terminate"), std::string::npos) << out;

  std::string bytes = read_file(model + "/model.safetensors");
  write_file_atomic(tmp.file("config.json"), read_file(model + "/config.json"));
  write_file_atomic(tmp.file("model.safetensors"), bytes.substr(0, bytes.size() / 2));
  EXPECT_EQ(testing::run_command(cmd, &out), 2);
  EXPECT_NE(out.find("past the end"), std::string::npos) << out;

  write_file_atomic(tmp.file("model.safetensors"), bytes);
  EXPECT_EQ(testing::run_command(cmd + " --split 4", &out), 2);
  EXPECT_NE(out.find("split layer 4"), std::string::npos) << out;

  write_file_atomic(tmp.file("empty.safetensors"), safetensors_bytes({{"input_ids", at::zeros({2, 0}, at::kLong)}}));
  EXPECT_EQ(testing::run_command(std::string(AMAQ_BINARY) + " forward --model " + model + " --ids " +
                                     tmp.file("empty.safetensors") + " --out " + tmp.file("o.safetensors"),
                                 &out),
            2);
  EXPECT_NE(out.find("input_ids is empty"), std::string::npos) << out;
  EXPECT_EQ(out.find("terminate"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq
