#include "tokenizer/tokenizer.h"

#include "core/error.h"
#include "core/fs.h"

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
  for (const char* f : {"tokenizer.json", "tokenizer.model"}) {
    if (file_exists(join_path(spec, f)) || (spec.size() >= std::string(f).size() && spec.rfind(f) == spec.size() - std::string(f).size())) {
      throw Error(std::string(f) + " tokenizers are not implemented yet (" + spec + ")",
                  "use --tokenizer byte with a model whose vocabulary has at least 259 ids");
    }
  }
  throw Error("no tokenizer found at '" + spec + "' (looked for tokenizer.json and tokenizer.model)",
              "pass --tokenizer byte, a tokenizer file, or a model directory that has one");
}

}  // namespace amaq
