#include "recipes/outliers.h"

#include <algorithm>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "train/data.h"

namespace amaq::recipes {

nlohmann::json ChannelOutliers::to_json() const {
  return {{"split", split},
          {"mean_ratio", mean_ratio},
          {"max_ratio", max_ratio},
          {"first_token_ratio", first_token_ratio},
          {"top_channels", top}};
}

ChannelOutliers channel_outliers(const at::Tensor& h, const at::Tensor& mask, int64_t split) {
  TORCH_CHECK(h.dim() == 3, "expected an activation (B, T, C), got ", h.sizes());
  at::NoGradGuard no_grad;
  const int64_t B = h.size(0), T = h.size(1), C = h.size(2);
  const at::Tensor a = h.detach().to(at::kCPU, at::kDouble).abs();  // (B, T, C)
  const at::Tensor keep = mask.defined() ? mask.to(at::kCPU).to(at::kBool) : at::ones({B, T}, at::kBool);
  TORCH_CHECK(keep.sizes() == at::IntArrayRef({B, T}), "expected a mask (B, T), got ", mask.sizes());
  const at::Tensor rows = a.reshape({B * T, C}).index({keep.reshape({-1})});  // (N, C)
  TORCH_CHECK(rows.size(0) > 0, "no position to measure: the mask is all padding");
  const at::Tensor mean = rows.mean(0), mx = std::get<0>(rows.max(0));  // (C)
  ChannelOutliers out;
  out.split = split;
  out.mean_ratio = (mean.max() / mean.median()).item<double>();
  out.max_ratio = (mx.max() / mx.median()).item<double>();
  if (T > 1) {
    const at::Tensor first = a.select(1, 0).index({keep.select(1, 0)});
    const at::Tensor rest = a.slice(1, 1).reshape({B * (T - 1), C}).index({keep.slice(1, 1).reshape({-1})});
    if (first.size(0) > 0 && rest.size(0) > 0) out.first_token_ratio = (first.mean() / rest.mean()).item<double>();
  }
  const at::Tensor top = std::get<1>(mean.topk(std::min<int64_t>(3, C)));
  for (int64_t i = 0; i < top.numel(); ++i) out.top.push_back(top[i].item<int64_t>());
  return out;
}

std::vector<ChannelOutliers> boundary_outliers(DecoderPart& full, const at::Tensor& ids, const at::Tensor& mask) {
  TORCH_CHECK(full->has_head(), "expected a whole model (embedding to LM head)");
  at::NoGradGuard no_grad;
  const bool was_training = full->is_training();
  full->eval();
  std::map<int64_t, at::Tensor> hidden;  // HF's output_hidden_states: [k] is the input of layer k
  full->forward(ids, mask, &hidden);
  full->train(was_training);
  std::vector<ChannelOutliers> out;
  const int64_t layers = static_cast<int64_t>(full->layers.size());
  for (int64_t k = 1; k < layers; ++k) out.push_back(channel_outliers(hidden.at(k), mask, k));
  return out;
}

std::vector<ChannelOutliers> boundary_outliers(const std::string& model_dir, const std::string& data_path,
                                               const Tokenizer& tok, int64_t seq_len, int64_t rows) {
  const ModelConfig config = ModelConfig::load(model_dir);
  DecoderPart full = full_model(config);
  full->load_weights(CheckpointReader(model_dir));
  const train::Dataset d = train::Dataset::load(data_path, tok, seq_len);
  if (d.examples.empty()) throw Error(data_path + " holds no example", "give a data file with text in it");
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < std::min<int64_t>(rows, static_cast<int64_t>(d.examples.size())); ++i) idx.push_back(i);
  const train::Batch b = train::make_batch(d, idx, tok.eos_id() >= 0 ? tok.eos_id() : 0);
  return boundary_outliers(full, b.ids, b.mask);
}

int64_t hardest_split(const std::vector<ChannelOutliers>& boundaries) {
  TORCH_CHECK(!boundaries.empty(), "expected at least one boundary");
  return std::max_element(boundaries.begin(), boundaries.end(),
                          [](const auto& a, const auto& b) { return a.mean_ratio < b.mean_ratio; })
      ->split;
}

}  // namespace amaq::recipes
