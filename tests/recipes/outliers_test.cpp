// Outlier channels at every layer boundary: the statistics on planted data, and on the HF fixture's
// own hidden states (transformers' output_hidden_states) against amaq's forward.
#include "recipes/outliers.h"

#include <gtest/gtest.h>

#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace amaq::recipes {
namespace {

TEST(ChannelOutliers, APlantedChannelAndALoudFirstTokenAreMeasured) {
  at::Tensor h = at::ones({2, 5, 16});
  h.select(2, 7).fill_(-10);  // magnitudes count, not signs
  h.select(1, 0).mul_(4);
  at::Tensor mask = at::ones({2, 5}, at::kLong);
  mask[1][4] = 0;
  h[1][4].fill_(1e6);  // padding: not measured
  const ChannelOutliers o = channel_outliers(h, mask, 3);
  EXPECT_EQ(o.split, 3);
  EXPECT_NEAR(o.mean_ratio, 10.0, 1e-12);
  EXPECT_NEAR(o.max_ratio, 10.0, 1e-12);
  EXPECT_NEAR(o.first_token_ratio, 4.0, 1e-12);
  ASSERT_EQ(o.top.size(), 3u);
  EXPECT_EQ(o.top[0], 7);
  EXPECT_EQ(o.to_json()["top_channels"][0], 7);
  EXPECT_THROW(channel_outliers(h, at::zeros({2, 5}, at::kLong), 1), c10::Error);
}

TEST(BoundaryOutliers, EqualTheStatisticsOfTransformersHiddenStates) {
  const std::string dir = testing::data_path("hf/llama-gqa");
  const ModelConfig config = ModelConfig::load(dir);
  DecoderPart full = full_model(config);
  full->load_weights(CheckpointReader(dir));
  const auto io = load_safetensors(dir + "/io.safetensors");
  const std::vector<ChannelOutliers> ours = boundary_outliers(full, io.at("input_ids"), {});
  ASSERT_EQ(static_cast<int64_t>(ours.size()), config.num_layers - 1);
  for (const ChannelOutliers& o : ours) {
    const ChannelOutliers hf = channel_outliers(io.at("hidden_" + std::to_string(o.split)), {}, o.split);
    EXPECT_NEAR(o.mean_ratio, hf.mean_ratio, 1e-4 * hf.mean_ratio) << "after layer " << o.split;
    EXPECT_NEAR(o.max_ratio, hf.max_ratio, 1e-4 * hf.max_ratio) << "after layer " << o.split;
    EXPECT_NEAR(o.first_token_ratio, hf.first_token_ratio, 1e-4 * hf.first_token_ratio) << "after layer " << o.split;
    EXPECT_EQ(o.top, hf.top) << "after layer " << o.split;
  }
  const int64_t hardest = hardest_split(ours);
  for (const ChannelOutliers& o : ours) EXPECT_LE(o.mean_ratio, ours.at(hardest - 1).mean_ratio);
}

TEST(BoundaryOutliers, FromAModelDirectoryAndAFile) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("text.txt"), testing::english_text(3000));
  const std::string dir = testing::data_path("hf/llama-gqa");
  const auto bounds = boundary_outliers(dir, tmp.file("text.txt"), ByteTokenizer(), 32, 4);
  ASSERT_EQ(static_cast<int64_t>(bounds.size()), ModelConfig::load(dir).num_layers - 1);
  for (size_t i = 0; i < bounds.size(); ++i) {
    EXPECT_EQ(bounds[i].split, static_cast<int64_t>(i) + 1);
    EXPECT_GT(bounds[i].first_token_ratio, 0);  // rows of 32 tokens: a first position and others measured
    EXPECT_EQ(bounds[i].top.size(), 3u);
  }
  testing::write_bytes(tmp.file("empty.txt"), "");
  EXPECT_ANY_THROW(boundary_outliers(dir, tmp.file("empty.txt"), ByteTokenizer(), 32, 4));
}

}  // namespace
}  // namespace amaq::recipes
