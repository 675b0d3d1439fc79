#include "tokenizer/tokenizer.h"

#include "core/error.h"
#include "core/fs.h"
#include "tokenizer/bpe.h"

namespace amaq {

std::vector<int64_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
  }
  return out;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  auto ends_with = [&](const char* suffix) {
    const std::string s(suffix);
    return spec.size() >= s.size() && spec.compare(spec.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with(".json") && file_exists(spec)) return load_bpe_tokenizer(spec);
  if (ends_with(".model") && file_exists(spec)) return load_sentencepiece_tokenizer(spec);
  if (file_exists(join_path(spec, "tokenizer.json"))) return load_bpe_tokenizer(join_path(spec, "tokenizer.json"));
  if (file_exists(join_path(spec, "tokenizer.model")))
    return load_sentencepiece_tokenizer(join_path(spec, "tokenizer.model"));
  throw Error("no tokenizer found at '" + spec + "' (looked for tokenizer.json and tokenizer.model)",
              "pass --tokenizer byte, a tokenizer file, or a model directory that has one");
}

}  // namespace amaq
