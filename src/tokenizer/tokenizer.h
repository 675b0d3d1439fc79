// Text <-> token ids. Implementations: byte-level (256 byte ids + specials, for models trained from
// scratch); HF tokenizer.json byte-level BPE and SentencePiece come with issue 6.
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

/// "byte", or a model directory / tokenizer file. Errors name what was looked for.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace amaq
