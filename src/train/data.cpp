#include "train/data.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/fs.h"

namespace amaq::train {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Packs one token stream into seq_len windows (the tail shorter than 2 tokens is dropped).
void pack(const std::vector<int64_t>& stream, int64_t seq_len, std::vector<Example>* out) {
  for (size_t at = 0; at + 1 < stream.size(); at += static_cast<size_t>(seq_len)) {
    const size_t end = std::min(stream.size(), at + static_cast<size_t>(seq_len));
    Example e;
    e.ids.assign(stream.begin() + static_cast<std::ptrdiff_t>(at), stream.begin() + static_cast<std::ptrdiff_t>(end));
    e.labels = e.ids;
    out->push_back(std::move(e));
  }
}

std::string string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    throw Error(where + ": field \"" + key + "\" missing or not a string",
                "every record needs the same fields as the first");
  }
  return it->get<std::string>();
}

}  // namespace

Dataset Dataset::load(const std::string& path, const Tokenizer& tok, int64_t seq_len) {
  if (seq_len < 2)
    throw Error("sequence length " + std::to_string(seq_len) + " is too short", "use --seq-len of at least 2");
  Dataset d;
  const std::string text = read_file(path);
  if (!ends_with(path, ".jsonl")) {
    if (!ends_with(path, ".txt")) throw Error("unknown data file type: " + path, "use .txt (plain text) or .jsonl");
    pack(tok.encode(text), seq_len, &d.examples);
  } else {
    std::vector<int64_t> stream;                             // lm
    std::vector<std::pair<std::string, std::string>> pairs;  // instruction / classification
    size_t line_no = 0, pos = 0;
    bool first = true;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      const std::string line = text.substr(pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = path + ":" + std::to_string(line_no);
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) throw Error(where + ": not a JSON object", "one JSON object per line");
      if (first) {
        if (j.contains("prompt"))
          d.format = DataFormat::kInstruction;
        else if (j.contains("label"))
          d.format = DataFormat::kClassification;
        else if (j.contains("text"))
          d.format = DataFormat::kLm;
        else
          throw Error(where + ": record has none of \"text\", \"prompt\"/\"completion\", \"text\"/\"label\"",
                      "see docs: data formats");
        first = false;
      }
      switch (d.format) {
        case DataFormat::kLm: {
          auto ids = tok.encode(string_field(j, "text", where));
          stream.insert(stream.end(), ids.begin(), ids.end());
          if (tok.eos_id() >= 0) stream.push_back(tok.eos_id());
          break;
        }
        case DataFormat::kInstruction:
          pairs.emplace_back(string_field(j, "prompt", where), string_field(j, "completion", where));
          break;
        case DataFormat::kClassification: {
          const auto it = j.find("label");
          std::string label = it != j.end() && it->is_number_integer() ? std::to_string(it->get<int64_t>())
                                                                       : string_field(j, "label", where);
          pairs.emplace_back(string_field(j, "text", where), label);
          break;
        }
      }
    }
    if (first) throw Error(path + " has no records", "one JSON object per line");
    pack(stream, seq_len, &d.examples);
    if (d.format == DataFormat::kClassification) {
      for (auto& [t, l] : pairs) d.label_words.push_back(l);
      std::sort(d.label_words.begin(), d.label_words.end());
      d.label_words.erase(std::unique(d.label_words.begin(), d.label_words.end()), d.label_words.end());
    }
    for (auto& [prompt, completion] : pairs) {
      Example e;
      e.ids = tok.encode(prompt);
      const size_t n_prompt = e.ids.size();
      auto c = tok.encode(d.format == DataFormat::kClassification ? " " + completion : completion);
      e.ids.insert(e.ids.end(), c.begin(), c.end());
      if (tok.eos_id() >= 0) e.ids.push_back(tok.eos_id());
      e.labels = e.ids;
      std::fill(e.labels.begin(), e.labels.begin() + static_cast<std::ptrdiff_t>(n_prompt), kIgnoreLabel);
      if (static_cast<int64_t>(e.ids.size()) > seq_len) {
        // Keep the completion. An instruction loses its prompt's front (the question is at the end);
        // a text to classify its tail, as a classifier's tokenizer truncates (the front says most:
        // subject, greeting, first sentence), unless the label alone is too long for that.
        const auto cut = static_cast<std::ptrdiff_t>(e.ids.size()) - seq_len;
        const auto from = d.format == DataFormat::kClassification && cut <= static_cast<std::ptrdiff_t>(n_prompt)
                              ? static_cast<std::ptrdiff_t>(n_prompt) - cut
                              : 0;
        e.ids.erase(e.ids.begin() + from, e.ids.begin() + from + cut);
        e.labels.erase(e.labels.begin() + from, e.labels.begin() + from + cut);
      }
      d.examples.push_back(std::move(e));
    }
  }
  for (const Example& e : d.examples) {
    for (int64_t id : e.ids) {
      if (id < 0 || id >= tok.vocab_size())
        throw Error("token id " + std::to_string(id) + " out of range", "tokenizer bug");
    }
  }
  if (d.examples.empty())
    throw Error(path + " yields no training sequence", "the file is empty or shorter than 2 tokens");
  return d;
}

Dataset Dataset::split_off(double fraction, uint64_t seed) {
  if (!(fraction > 0 && fraction < 1)) throw Error("validation fraction must be in (0, 1)", "e.g. --val-fraction 0.1");
  std::vector<int64_t> order(examples.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed ^ 0x5eedf00dULL);
  std::shuffle(order.begin(), order.end(), rng);
  const auto n_val = std::max<size_t>(1, static_cast<size_t>(fraction * static_cast<double>(examples.size())));
  if (n_val >= examples.size())
    throw Error("too few examples to hold out a validation set", "use more data or --val-data");
  std::vector<bool> is_val(examples.size(), false);
  for (size_t i = examples.size() - n_val; i < examples.size(); ++i) is_val[static_cast<size_t>(order[i])] = true;
  Dataset val, train;
  val.format = train.format = format;
  val.label_words = train.label_words = label_words;
  for (size_t i = 0; i < examples.size(); ++i) (is_val[i] ? val : train).examples.push_back(std::move(examples[i]));
  *this = std::move(train);
  return val;
}

Sampler::Sampler(int64_t size, uint64_t seed) : size_(size), seed_(seed) {}

int64_t Sampler::at(int64_t position) const {
  const int64_t epoch = position / size_;
  if (epoch != cached_epoch_) {
    order_.resize(static_cast<size_t>(size_));
    std::iota(order_.begin(), order_.end(), 0);
    std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch));
    std::shuffle(order_.begin(), order_.end(), rng);
    cached_epoch_ = epoch;
  }
  return order_[static_cast<size_t>(position % size_)];
}

Batch make_batch(const Dataset& data, const std::vector<int64_t>& indices, int64_t pad_id, int64_t pad_to) {
  const auto B = static_cast<int64_t>(indices.size());
  int64_t T = pad_to;
  for (int64_t i : indices)
    T = std::max<int64_t>(T, static_cast<int64_t>(data.examples[static_cast<size_t>(i)].ids.size()));
  Batch b;
  b.ids = at::full({B, T}, pad_id, at::kLong);
  b.labels = at::full({B, T}, kIgnoreLabel, at::kLong);
  b.mask = at::zeros({B, T}, at::kLong);
  auto ids = b.ids.accessor<int64_t, 2>(), labels = b.labels.accessor<int64_t, 2>(),
       mask = b.mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    const Example& e = data.examples[static_cast<size_t>(indices[static_cast<size_t>(r)])];
    for (size_t t = 0; t < e.ids.size(); ++t) {
      ids[r][static_cast<int64_t>(t)] = e.ids[t];
      labels[r][static_cast<int64_t>(t)] = e.labels[t];
      mask[r][static_cast<int64_t>(t)] = 1;
    }
  }
  b.sample_ids = indices;
  return b;
}

}  // namespace amaq::train
