// Evaluation of a (whole, local) model on a dataset: perplexity for language modelling, accuracy
// through verbalizer words for classification, greedy generation with a KV cache for instruction
// data (exact match after normalisation, and last-number match for arithmetic answers). Inside a
// split run the client evaluates through the server instead (session.h, EVAL messages).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/part.h"
#include "tokenizer/tokenizer.h"
#include "train/data.h"

namespace amaq::train {

/// One batch row's score: the summed next-token NLL over its labelled positions, their count, and
/// how many of them the argmax predicted.
struct RowScore {
  double nll_sum = 0;
  uint32_t tokens = 0, correct = 0;
};
/// logits (B, T, V), labels (B, T) (kIgnoreLabel where no loss is taken) -> B scores.
std::vector<RowScore> score_rows(const at::Tensor& logits, const at::Tensor& labels);

/// Token-level metrics over scored rows: loss, perplexity, token accuracy, exact match (every
/// labelled token of a row predicted), sequences and tokens.
nlohmann::json score_summary(const std::vector<RowScore>& rows);

/// Classification through verbalizer words, the one scorer of local and split evaluation: every
/// label word (and EOS) after every text; the word with the lowest NLL is the answer.
struct LabelWordChoice {
  Dataset candidates;             ///< row i * words + w: text i followed by label word w
  std::vector<std::string> gold;  ///< each text's gold answer as decoded (" word")
  std::vector<std::string> words;
  /// The fraction of texts whose lowest-NLL word is the gold one; `scores` has one row per candidate.
  double accuracy(const std::vector<RowScore>& scores) const;
};
/// The candidates for rows [0, limit) of a classification dataset.
LabelWordChoice label_word_candidates(const Dataset& data, int64_t limit, const Tokenizer& tok);

/// Greedy decoding with the KV cache: at most `max_new` tokens, stopping after `eos` (>= 0).
std::vector<int64_t> greedy_generate(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                     int64_t eos);
/// The same without a cache (the whole sequence again for every token): the slow reference.
std::vector<int64_t> greedy_generate_reference(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                               int64_t eos);

/// Trimmed, lower-cased, inner whitespace collapsed to one space.
std::string normalize_answer(const std::string& s);
/// The last number in `s` ("-12", "3.5"; commas between digits dropped), or "" when there is none.
std::string last_number(const std::string& s);

/// Metrics by the dataset's format: always loss/perplexity/token accuracy over labelled tokens;
/// classification adds `accuracy` (verbalizer scoring); instruction adds `exact_match` and
/// `number_match` from greedy generation.
nlohmann::json evaluate_model(DecoderPart& model, const Dataset& data, const Tokenizer& tok, int64_t batch,
                              int64_t max_new);

}  // namespace amaq::train
