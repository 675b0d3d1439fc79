// Text <-> token ids. Implementations: byte-level (256 byte ids + specials, for models trained from
// scratch), HF tokenizer.json byte-level BPE (tokenizer/bpe.h), SentencePiece tokenizer.model.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace amaq {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// Ids of `text`, no special tokens added.
  virtual std::vector<int64_t> encode(std::string_view text) const = 0;
  /// Text of `ids`; special tokens are dropped.
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  /// The text as the tokenizer sees it before splitting (invalid UTF-8 repaired, normalizer
  /// applied): decode(encode(s)) == normalize(s) when no special tokens are in s.
  virtual std::string normalize(std::string_view text) const { return std::string(text); }
  /// Ids below this bound (the model's vocabulary must be at least as large).
  virtual int64_t vocab_size() const = 0;
  virtual int64_t bos_id() const { return -1; }  ///< -1: none
  virtual int64_t eos_id() const { return -1; }
  virtual std::string name() const = 0;
};

/// Bytes 0..255 are ids 0..255; 256 = <bos>, 257 = <eos>, 258 = <pad>.
class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int64_t kBos = 256, kEos = 257, kPad = 258, kVocab = 259;
  std::vector<int64_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override { return kVocab; }
  int64_t bos_id() const override { return kBos; }
  int64_t eos_id() const override { return kEos; }
  std::string name() const override { return "byte"; }
};

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& path);
/// Trains a SentencePiece model with the trainer's own flags ("--input=... --model_prefix=...").
void train_sentencepiece(const std::string& args);

/// "byte", a tokenizer.json / tokenizer.model file, or a model directory holding one (tokenizer.json
/// preferred). Errors name what was looked for.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace amaq
