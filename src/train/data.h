// Training data: examples of token ids with per-token labels (-100 = no loss), a deterministic
// sampler over epochs, and padded batches.
//
// Formats (chosen by extension and the first record's fields):
//   .txt                     language modelling: the whole text, packed into seq_len windows
//   .jsonl {"text"}          language modelling: texts joined by EOS, packed into seq_len windows
//   .jsonl {"prompt","completion"}  instruction: loss on the completion (+ EOS) only
//   .jsonl {"text","label"}  classification as generation: the label word is the completion
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace amaq::train {

constexpr int64_t kIgnoreLabel = -100;

struct Example {
  std::vector<int64_t> ids;
  std::vector<int64_t> labels;  ///< same length; kIgnoreLabel where no loss is taken
};

enum class DataFormat { kLm, kInstruction, kClassification };

struct Dataset {
  DataFormat format = DataFormat::kLm;
  std::vector<Example> examples;
  std::vector<std::string> label_words;  ///< classification: the distinct labels, sorted
  /// Reads `path` (formats above). Every record is checked; a bad one is reported as file:line.
  static Dataset load(const std::string& path, const Tokenizer& tok, int64_t seq_len);
  /// Moves the last `fraction` (after a seeded shuffle) into the returned validation set.
  Dataset split_off(double fraction, uint64_t seed);
};

/// Example order over epochs: a seeded permutation per epoch. Position p (examples consumed so
/// far) fully determines what comes next, so a checkpoint stores p and nothing else.
class Sampler {
 public:
  Sampler(int64_t size, uint64_t seed);
  int64_t at(int64_t position) const;  ///< example index at global position p

 private:
  int64_t size_;
  uint64_t seed_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> order_;
};

struct Batch {
  at::Tensor ids, labels, mask;     ///< (B, T) int64, int64, int64 0/1; right padded
  std::vector<int64_t> sample_ids;  ///< dataset index of each row
};

/// Rows `indices` of `data`, right padded with `pad_id` to the longest, or to `pad_to` when longer
/// (AQ-SGD keeps a (T, C) memory per sample, so its batches have one fixed length).
Batch make_batch(const Dataset& data, const std::vector<int64_t>& indices, int64_t pad_id, int64_t pad_to = 0);

}  // namespace amaq::train
