// HF tokenizer.json byte-level BPE, as Llama-3 and Qwen2/2.5/3 ship it: optional NFC normalizer,
// a Split pre-tokenizer (PCRE2, UTF + UCP) and/or ByteLevel, merges by rank, added tokens matched
// in the text before anything else, ByteLevel decoding.
//
// Input that is not valid UTF-8 is first repaired: each invalid byte becomes U+FFFD (as Python's
// errors="replace" does), so any bytes tokenize; decode(encode(s)) == s holds for valid UTF-8.
#pragma once
#include <memory>
#include <string>

#include "tokenizer/tokenizer.h"

namespace amaq {

/// Loads tokenizer.json; refuses what it does not implement, naming the field.
std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& path);

/// `bytes` with every byte that is not part of a valid UTF-8 sequence replaced by U+FFFD.
std::string repair_utf8(const std::string& bytes);

}  // namespace amaq
