// Codecs on a real split's tensors: the activations a model sends at a split and the gradient that
// comes back under its LM loss, encoded by each codec, with the measured bits per element (every
// packet byte) against the error. Behind `amaq codec-curve` (issue 17: the gain at equal error on
// real activations, not only on Gaussian data).
#pragma once
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace amaq::recipes {

struct SplitTensors {
  at::Tensor activations;  ///< (B, T, C): what the client part sends at the split
  at::Tensor gradients;    ///< (B, T, C): d(LM loss) / d(activations), what comes back
};

/// The first `rows` sequences of `data_path` (at most `seq_len` tokens) through layers [0, split) of
/// the model in `model_dir`, and the gradient of the LM loss of layers [split, L) at the split.
SplitTensors split_tensors(const std::string& model_dir, const std::string& data_path, const Tokenizer& tok,
                           int64_t seq_len, int64_t rows, int64_t split);

struct CodecPoint {
  std::string codec, tensor;  ///< tensor: "activations" or "gradients"
  double bits = 0;            ///< packet bytes x 8 / elements
  double nmse = 0;            ///< |decoded - x|^2 / |x|^2
  nlohmann::json to_json() const;
};

/// Each codec (a spec without state or learned map: none, fixed, ecsq) on both tensors. Throws
/// amaq::Error naming a codec it cannot run this way.
std::vector<CodecPoint> codec_points(const SplitTensors& t, const std::vector<std::string>& codecs);

}  // namespace amaq::recipes
