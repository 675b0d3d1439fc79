#include "train/eval.h"

#include <cctype>
#include <cmath>

#include "train/session_util.h"

namespace amaq::train {
namespace {

int64_t argmax_last(const at::Tensor& logits) { return logits.select(1, logits.size(1) - 1).argmax(-1).item<int64_t>(); }

at::Tensor as_batch(const std::vector<int64_t>& ids) {
  return at::tensor(ids, at::kLong).view({1, static_cast<int64_t>(ids.size())});
}

// Sum of log p(completion | prompt) over the completion tokens.
double log_likelihood(DecoderPart& model, const std::vector<int64_t>& prompt, const std::vector<int64_t>& completion) {
  std::vector<int64_t> ids = prompt;
  ids.insert(ids.end(), completion.begin(), completion.end());
  std::vector<int64_t> labels(prompt.size(), kIgnoreLabel);
  labels.insert(labels.end(), completion.begin(), completion.end());
  const auto res = detail::score_rows(model->forward(as_batch(ids)), as_batch(labels), 0);
  return -res.rows[0].nll_sum;
}

}  // namespace

std::vector<int64_t> greedy_generate(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new, int64_t eos) {
  at::NoGradGuard no_grad;
  std::vector<KvEntry> cache;
  std::vector<int64_t> out;
  at::Tensor logits = model->forward_cached(as_batch(prompt), &cache);
  for (int64_t i = 0; i < max_new; ++i) {
    const int64_t next = argmax_last(logits);
    out.push_back(next);
    if (next == eos) break;
    logits = model->forward_cached(as_batch({next}), &cache);
  }
  return out;
}

std::vector<int64_t> greedy_generate_reference(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new, int64_t eos) {
  at::NoGradGuard no_grad;
  std::vector<int64_t> seq = prompt, out;
  for (int64_t i = 0; i < max_new; ++i) {
    const int64_t next = argmax_last(model->forward(as_batch(seq)));
    out.push_back(next);
    seq.push_back(next);
    if (next == eos) break;
  }
  return out;
}

std::string normalize_answer(const std::string& s) {
  std::string out;
  bool space = false;
  for (unsigned char c : s) {
    if (std::isspace(c)) {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(static_cast<char>(std::tolower(c)));
  }
  return out;
}

std::string last_number(const std::string& s) {
  std::string best, cur;
  for (size_t i = 0; i <= s.size(); ++i) {
    const char c = i < s.size() ? s[i] : '\0';
    const bool digit = std::isdigit(static_cast<unsigned char>(c));
    if (digit) {
      if (cur.empty() && i > 0 && s[i - 1] == '-') cur.push_back('-');
      cur.push_back(c);
    } else if (!cur.empty() && (c == '.' || c == ',') && i + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      if (c == '.') cur.push_back('.');
    } else if (!cur.empty()) {
      best = cur;
      cur.clear();
    }
  }
  return best;
}

nlohmann::json evaluate_model(DecoderPart& model, const Dataset& data, const Tokenizer& tok, int64_t batch, int64_t max_new) {
  at::NoGradGuard no_grad;
  model->eval();
  const int64_t pad = tok.eos_id() >= 0 ? tok.eos_id() : 0;
  double nll = 0;
  uint64_t tokens = 0, correct = 0;
  const auto n = static_cast<int64_t>(data.examples.size());
  for (int64_t at_row = 0; at_row < n; at_row += batch) {
    std::vector<int64_t> idx;
    for (int64_t i = at_row; i < std::min(n, at_row + batch); ++i) idx.push_back(i);
    Batch b = make_batch(data, idx, pad);
    for (const auto& r : detail::score_rows(model->forward(b.ids, b.mask), b.labels, 0).rows) {
      nll += r.nll_sum;
      tokens += r.tokens;
      correct += r.correct;
    }
  }
  const double loss = tokens ? nll / static_cast<double>(tokens) : 0.0;
  nlohmann::json out{{"examples", n},
                     {"tokens", tokens},
                     {"loss", loss},
                     {"perplexity", std::exp(loss)},
                     {"token_accuracy", tokens ? static_cast<double>(correct) / static_cast<double>(tokens) : 0.0}};
  if (data.format == DataFormat::kLm) return out;

  int64_t right = 0, numbers = 0;
  for (const Example& e : data.examples) {
    size_t split = 0;
    while (split < e.labels.size() && e.labels[split] == kIgnoreLabel) ++split;
    const std::vector<int64_t> prompt(e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(split));
    std::vector<int64_t> gold(e.ids.begin() + static_cast<std::ptrdiff_t>(split), e.ids.end());
    if (!gold.empty() && gold.back() == tok.eos_id()) gold.pop_back();
    const std::string gold_text = tok.decode(gold);
    if (data.format == DataFormat::kClassification) {
      // The label word with the highest log-likelihood after the text wins.
      std::string best;
      double best_ll = -INFINITY;
      for (const std::string& w : data.label_words) {
        auto cand = tok.encode(" " + w);
        if (tok.eos_id() >= 0) cand.push_back(tok.eos_id());
        const double ll = log_likelihood(model, prompt, cand);
        if (ll > best_ll) best_ll = ll, best = w;
      }
      right += " " + best == gold_text;
    } else {
      auto gen = greedy_generate(model, prompt, max_new, tok.eos_id());
      if (!gen.empty() && gen.back() == tok.eos_id()) gen.pop_back();
      const std::string text = tok.decode(gen);
      right += normalize_answer(text) == normalize_answer(gold_text);
      const std::string num = last_number(gold_text);
      numbers += !num.empty() && last_number(text) == num;
    }
  }
  const double denom = static_cast<double>(std::max<int64_t>(1, n));
  if (data.format == DataFormat::kClassification) {
    out["accuracy"] = static_cast<double>(right) / denom;
  } else {
    out["exact_match"] = static_cast<double>(right) / denom;
    out["number_match"] = static_cast<double>(numbers) / denom;
  }
  return out;
}

}  // namespace amaq::train
