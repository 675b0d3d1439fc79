#include "train/eval.h"

#include <cctype>
#include <cmath>

namespace amaq::train {
namespace {

int64_t argmax_last(const at::Tensor& logits) {
  return logits.select(1, logits.size(1) - 1).argmax(-1).item<int64_t>();
}

at::Tensor as_batch(const std::vector<int64_t>& ids) {
  return at::tensor(ids, at::kLong).view({1, static_cast<int64_t>(ids.size())});
}

// The answer part of an example: its ids from the first labelled position on.
size_t answer_start(const Example& e) {
  size_t p = 0;
  while (p < e.labels.size() && e.labels[p] == kIgnoreLabel) ++p;
  return p;
}

std::string gold_text(const Example& e, const Tokenizer& tok) {
  std::vector<int64_t> gold(e.ids.begin() + static_cast<std::ptrdiff_t>(answer_start(e)), e.ids.end());
  if (!gold.empty() && gold.back() == tok.eos_id()) gold.pop_back();
  return tok.decode(gold);
}

}  // namespace

std::vector<RowScore> score_rows(const at::Tensor& logits, const at::Tensor& labels) {
  at::Tensor lp = at::log_softmax(logits.slice(1, 0, -1).to(at::kFloat), -1);  // (B, T-1, V)
  at::Tensor target = labels.to(logits.device()).slice(1, 1);
  at::Tensor valid = target != kIgnoreLabel;
  at::Tensor safe = at::where(valid, target, at::zeros_like(target));
  at::Tensor nll = -lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid;
  at::Tensor hit = (lp.argmax(-1) == target) & valid;
  at::Tensor nll_sum = nll.to(at::kDouble).sum(1).cpu().contiguous(), tokens = valid.sum(1).cpu().contiguous(),
             correct = hit.sum(1).cpu().contiguous();
  std::vector<RowScore> out(static_cast<size_t>(logits.size(0)));
  for (size_t r = 0; r < out.size(); ++r) {
    out[r] = {nll_sum.data_ptr<double>()[r], static_cast<uint32_t>(tokens.data_ptr<int64_t>()[r]),
              static_cast<uint32_t>(correct.data_ptr<int64_t>()[r])};
  }
  return out;
}

nlohmann::json score_summary(const std::vector<RowScore>& rows) {
  double nll = 0;
  uint64_t tokens = 0, correct = 0, exact = 0;
  for (const RowScore& r : rows) {
    nll += r.nll_sum;
    tokens += r.tokens;
    correct += r.correct;
    exact += r.tokens > 0 && r.correct == r.tokens;
  }
  const double loss = tokens ? nll / static_cast<double>(tokens) : 0.0;
  return {{"loss", loss},
          {"perplexity", std::exp(loss)},
          {"token_accuracy", tokens ? static_cast<double>(correct) / static_cast<double>(tokens) : 0.0},
          {"exact_match", rows.empty() ? 0.0 : static_cast<double>(exact) / static_cast<double>(rows.size())},
          {"sequences", rows.size()},
          {"tokens", tokens}};
}

LabelWordChoice label_word_candidates(const Dataset& data, int64_t limit, const Tokenizer& tok) {
  LabelWordChoice c;
  c.words = data.label_words;
  for (int64_t i = 0; i < limit; ++i) {
    const Example& e = data.examples[static_cast<size_t>(i)];
    const size_t p = answer_start(e);
    c.gold.push_back(gold_text(e, tok));
    for (const std::string& w : c.words) {
      Example x;
      x.ids.assign(e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(p));
      x.labels.assign(p, kIgnoreLabel);
      auto word = tok.encode(" " + w);
      if (tok.eos_id() >= 0) word.push_back(tok.eos_id());
      x.ids.insert(x.ids.end(), word.begin(), word.end());
      x.labels.insert(x.labels.end(), word.begin(), word.end());
      c.candidates.examples.push_back(std::move(x));
    }
  }
  return c;
}

double LabelWordChoice::accuracy(const std::vector<RowScore>& scores) const {
  const size_t W = words.size();
  TORCH_CHECK(scores.size() == gold.size() * W, "expected ", gold.size() * W, " candidate scores, got ", scores.size());
  int64_t right = 0;
  for (size_t i = 0; i < gold.size(); ++i) {
    size_t best = 0;
    for (size_t w = 1; w < W; ++w) best = scores[i * W + w].nll_sum < scores[i * W + best].nll_sum ? w : best;
    right += " " + words[best] == gold[i];
  }
  return gold.empty() ? 0.0 : static_cast<double>(right) / static_cast<double>(gold.size());
}

std::vector<int64_t> greedy_generate(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                     int64_t eos) {
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

std::vector<int64_t> greedy_generate_reference(DecoderPart& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                               int64_t eos) {
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
    } else if (!cur.empty() && (c == '.' || c == ',') && i + 1 < s.size() &&
               std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      if (c == '.') cur.push_back('.');
    } else if (!cur.empty()) {
      best = cur;
      cur.clear();
    }
  }
  return best;
}

nlohmann::json evaluate_model(DecoderPart& model, const Dataset& data, const Tokenizer& tok, int64_t batch,
                              int64_t max_new) {
  at::NoGradGuard no_grad;
  model->eval();
  const int64_t pad = tok.eos_id() >= 0 ? tok.eos_id() : 0;
  // Rows [0, limit) of `d`, batch by batch.
  const auto local = [&](const Dataset& d, int64_t limit, std::vector<RowScore>* out) {
    for (int64_t at_row = 0; at_row < limit; at_row += batch) {
      std::vector<int64_t> idx;
      for (int64_t i = at_row; i < std::min(limit, at_row + batch); ++i) idx.push_back(i);
      Batch b = make_batch(d, idx, pad);
      for (const RowScore& r : score_rows(model->forward(b.ids, b.mask), b.labels)) out->push_back(r);
    }
  };
  const auto n = static_cast<int64_t>(data.examples.size());
  std::vector<RowScore> rows;
  local(data, n, &rows);
  const nlohmann::json s = score_summary(rows);
  nlohmann::json out{{"examples", n},
                     {"tokens", s["tokens"]},
                     {"loss", s["loss"]},
                     {"perplexity", s["perplexity"]},
                     {"token_accuracy", s["token_accuracy"]}};
  if (data.format == DataFormat::kLm) return out;
  if (data.format == DataFormat::kClassification) {
    const LabelWordChoice choice = label_word_candidates(data, n, tok);
    std::vector<RowScore> scores;
    local(choice.candidates, static_cast<int64_t>(choice.candidates.examples.size()), &scores);
    out["accuracy"] = choice.accuracy(scores);
    return out;
  }
  int64_t right = 0, numbers = 0;
  for (const Example& e : data.examples) {
    const std::vector<int64_t> prompt(e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(answer_start(e)));
    const std::string gold = gold_text(e, tok);
    auto gen = greedy_generate(model, prompt, max_new, tok.eos_id());
    if (!gen.empty() && gen.back() == tok.eos_id()) gen.pop_back();
    const std::string text = tok.decode(gen);
    right += normalize_answer(text) == normalize_answer(gold);
    const std::string num = last_number(gold);
    numbers += !num.empty() && last_number(text) == num;
  }
  const double denom = static_cast<double>(std::max<int64_t>(1, n));
  out["exact_match"] = static_cast<double>(right) / denom;
  out["number_match"] = static_cast<double>(numbers) / denom;
  return out;
}

}  // namespace amaq::train
