// Outlier channels of the activation a split sends. At every layer boundary of a model: how far the
// largest channels stand above the median one. A few channels of large magnitude stretch every range
// they share, which is what makes an activation hard to quantize (LLM.int8, SmoothQuant); issue 19
// reports them before and after pretraining and splits where they are worst.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/part.h"
#include "tokenizer/tokenizer.h"

namespace amaq::recipes {

struct ChannelOutliers {
  int64_t split = 0;             ///< the hidden state after layer `split`: what a split there sends
  double mean_ratio = 0;         ///< the largest channel mean |h| / the median channel mean |h|
  double max_ratio = 0;          ///< the same for each channel's largest |h|
  double first_token_ratio = 0;  ///< mean |h| at the first position / mean |h| at the others (0: T = 1)
  std::vector<int64_t> top;      ///< the (up to) three channels of largest mean |h|, largest first

  nlohmann::json to_json() const;
};

/// The statistics of one activation h (B, T, C) over the positions where mask (B, T) is 1 (all when
/// undefined); `split` is recorded as given.
ChannelOutliers channel_outliers(const at::Tensor& h, const at::Tensor& mask, int64_t split);

/// Every boundary 1..L-1 of `full` (a whole model) for token ids (B, T) and mask (B, T).
std::vector<ChannelOutliers> boundary_outliers(DecoderPart& full, const at::Tensor& ids, const at::Tensor& mask);

/// The same for a model directory, over the first `rows` sequences of `seq_len` tokens of a data file
/// (any format `amaq train` reads) tokenized with `tok`.
std::vector<ChannelOutliers> boundary_outliers(const std::string& model_dir, const std::string& data_path,
                                               const Tokenizer& tok, int64_t seq_len, int64_t rows);

/// The boundary whose activation is hardest to quantize: the largest mean_ratio.
int64_t hardest_split(const std::vector<ChannelOutliers>& boundaries);

}  // namespace amaq::recipes
