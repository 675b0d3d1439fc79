#include "tokenizer/bpe.h"

#if AMAQ_HAVE_PCRE2
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#endif

#include "core/error.h"
#include "core/fs.h"

namespace amaq {
namespace {

// Length of the valid UTF-8 sequence at p (0 if invalid).
size_t utf8_len(const unsigned char* p, size_t left) {
  const unsigned char c = p[0];
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || n > left) return 0;
  for (size_t i = 1; i < n; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
  }
  uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
  for (size_t i = 1; i < n; ++i) cp = (cp << 6) | (p[i] & 0x3F);
  if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
      (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;
  return n;
}

#if AMAQ_HAVE_PCRE2

// GPT-2's reversible map from bytes to printable code points, as UTF-8 strings.
struct ByteLevelMap {
  std::string to_char[256];
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteLevelMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const int cp = printable ? b : 256 + n++;
      std::string s;
      if (cp < 0x80)
        s.push_back(static_cast<char>(cp));
      else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      to_char[b] = s;
      to_byte[s] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelMap& byte_map() {
  static const ByteLevelMap m;
  return m;
}

std::string nfc(const std::string& s) {
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) return s;
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* n = unorm2_getNFCInstance(&err);
  int32_t len16 = 0;
  u_strFromUTF8(nullptr, 0, &len16, s.data(), static_cast<int32_t>(s.size()), &err);
  err = U_ZERO_ERROR;
  std::u16string in(static_cast<size_t>(len16), u'\0'), out(static_cast<size_t>(len16) * 3 + 16, u'\0');
  u_strFromUTF8(in.data(), len16, nullptr, s.data(), static_cast<int32_t>(s.size()), &err);
  const int32_t m = unorm2_normalize(n, in.data(), len16, out.data(), static_cast<int32_t>(out.size()), &err);
  if (U_FAILURE(err))
    throw Error(std::string("NFC normalization failed: ") + u_errorName(err), "the text is not valid Unicode");
  std::string r(static_cast<size_t>(m) * 3 + 4, '\0');
  int32_t rlen = 0;
  u_strToUTF8(r.data(), static_cast<int32_t>(r.size()), &rlen, out.data(), m, &err);
  r.resize(static_cast<size_t>(rlen));
  return r;
}

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int code = 0;
    PCRE2_SIZE offset = 0;
    re_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &code,
                        &offset, nullptr);
    if (!re_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(code, msg, sizeof msg);
      throw Error(where + ": the Split regex does not compile at offset " + std::to_string(offset) + ": " +
                      reinterpret_cast<const char*>(msg),
                  "the file is damaged or uses a regex feature PCRE2 lacks");
    }
    pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE);
  }
  ~Regex() { pcre2_code_free(re_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Split behaviour "Isolated": every match is a piece, and so is every gap between matches.
  void split(const std::string& text, std::vector<std::string>* out) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re_, nullptr);
    size_t pos = 0, last = 0;
    while (pos <= text.size()) {
      const int rc = pcre2_match(re_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos, PCRE2_NO_UTF_CHECK,
                                 md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > last) out->push_back(text.substr(last, ov[0] - last));
      if (ov[1] > ov[0]) out->push_back(text.substr(ov[0], ov[1] - ov[0]));
      last = ov[1];
      if (ov[1] == ov[0]) {  // empty match: step one character
        if (ov[1] >= text.size()) break;
        pos = ov[1] + std::max<size_t>(1, utf8_len(reinterpret_cast<const unsigned char*>(text.data()) + ov[1],
                                                   text.size() - ov[1]));
      } else {
        pos = ov[1];
      }
    }
    if (last < text.size()) out->push_back(text.substr(last));
    pcre2_match_data_free(md);
  }

 private:
  pcre2_code* re_ = nullptr;
};

// The GPT-2 pattern a ByteLevel pre-tokenizer applies when use_regex is true.
const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

class BpeTokenizer : public Tokenizer {
 public:
  explicit BpeTokenizer(const std::string& path) : path_(path) {
    nlohmann::json j = nlohmann::json::parse(read_file(path), nullptr, false);
    if (j.is_discarded() || !j.is_object()) throw Error(path + " is not JSON", "pass a HuggingFace tokenizer.json");
    auto field = [&](const nlohmann::json& parent, const char* key, const std::string& name) -> const nlohmann::json& {
      if (!parent.contains(key))
        throw Error(path + ": missing field '" + name + "'", "pass a HuggingFace tokenizer.json");
      return parent[key];
    };
    const auto& model = field(j, "model", "model");
    const std::string type = model.value("type", "");
    if (type != "BPE")
      throw Error(path + ": model.type '" + type + "' is not supported",
                  "amaq reads byte-level BPE tokenizer.json files");
    if (model.value("byte_fallback", false))
      throw Error(path + ": model.byte_fallback is set", "SentencePiece-style BPE: use tokenizer.model");
    if (!model.value("continuing_subword_prefix", nlohmann::json()).is_null() &&
        model["continuing_subword_prefix"] != "") {
      throw Error(path + ": model.continuing_subword_prefix is set", "only byte-level BPE is supported");
    }
    ignore_merges_ = model.value("ignore_merges", false);
    for (const auto& [tok, id] : field(model, "vocab", "model.vocab").items()) {
      if (!id.is_number_integer())
        throw Error(path + ": model.vocab['" + tok + "'] is not an integer", "the file is damaged");
      vocab_[tok] = id.get<int64_t>();
    }
    int64_t rank = 0;
    for (const auto& m : field(model, "merges", "model.merges")) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const auto sp = s.find(' ');
        if (sp == std::string::npos) throw Error(path + ": merge '" + s + "' has no space", "the file is damaged");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0], b = m[1];
      } else {
        throw Error(path + ": model.merges[" + std::to_string(rank) + "] is neither \"a b\" nor [a, b]",
                    "the file is damaged");
      }
      const auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end()) {
        throw Error(path + ": merge '" + a + " " + b + "' uses tokens not in model.vocab", "the file is damaged");
      }
      merges_.emplace(pair_key(ia->second, ib->second), std::make_pair(rank++, im->second));
    }
    // Normalizer: none or NFC.
    const auto& norm = j.value("normalizer", nlohmann::json());
    if (!norm.is_null()) {
      if (norm.value("type", "") != "NFC")
        throw Error(path + ": normalizer type '" + norm.value("type", "?") + "' is not supported",
                    "supported: none, NFC");
      nfc_ = true;
    }
    // Pre-tokenizer: Split (Isolated) and/or ByteLevel, alone or in a Sequence.
    const auto& pre = j.value("pre_tokenizer", nlohmann::json());
    std::vector<nlohmann::json> steps;
    if (pre.is_object() && pre.value("type", "") == "Sequence")
      steps = pre.at("pretokenizers").get<std::vector<nlohmann::json>>();
    else if (pre.is_object())
      steps.push_back(pre);
    bool byte_level = false;
    for (const auto& st : steps) {
      const std::string t = st.value("type", "");
      if (t == "Split") {
        if (st.value("behavior", "") != "Isolated" || st.value("invert", false)) {
          throw Error(path + ": pre_tokenizer Split with behavior '" + st.value("behavior", "?") + "' is not supported",
                      "supported: Isolated");
        }
        if (!st.contains("pattern") || !st["pattern"].contains("Regex"))
          throw Error(path + ": pre_tokenizer Split without pattern.Regex", "");
        regexes_.push_back(std::make_unique<Regex>(st["pattern"]["Regex"].get<std::string>(), path));
      } else if (t == "ByteLevel") {
        byte_level = true;
        add_prefix_space_ = st.value("add_prefix_space", false);
        if (st.value("use_regex", true)) regexes_.push_back(std::make_unique<Regex>(kGpt2Pattern, path));
      } else {
        throw Error(path + ": pre_tokenizer type '" + t + "' is not supported",
                    "supported: Split, ByteLevel, Sequence of them");
      }
    }
    if (!byte_level)
      throw Error(path + ": no ByteLevel pre-tokenizer", "amaq reads byte-level BPE tokenizer.json files");
    const auto& dec = j.value("decoder", nlohmann::json());
    if (!dec.is_null() && dec.value("type", "") != "ByteLevel") {
      throw Error(path + ": decoder type '" + dec.value("type", "?") + "' is not supported", "supported: ByteLevel");
    }
    for (const auto& t : j.value("added_tokens", nlohmann::json::array())) {
      Added a{t.at("content").get<std::string>(), t.at("id").get<int64_t>(), t.value("special", false)};
      if (a.content.empty()) continue;
      added_.push_back(a);
      vocab_size_ = std::max(vocab_size_, a.id + 1);
      if (a.content == "<|end_of_text|>" || a.content == "<|endoftext|>" || a.content == "<|im_end|>")
        eos_ = eos_ < 0 ? a.id : eos_;
      if (a.content == "<|begin_of_text|>") bos_ = a.id;
    }
    std::sort(added_.begin(), added_.end(),
              [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });
    for (const auto& [tok, id] : vocab_) {
      vocab_size_ = std::max(vocab_size_, id + 1);
      id_to_token_[id] = tok;
    }
    for (const Added& a : added_) id_to_token_[a.id] = a.content;
  }

  std::vector<int64_t> encode(std::string_view text_in) const override {
    std::string text = repair_utf8(std::string(text_in));
    std::vector<int64_t> ids;
    // Added tokens first (longest match wins), then the pieces between them.
    size_t pos = 0, seg = 0;
    while (pos <= text.size()) {
      const Added* hit = nullptr;
      if (!added_.empty()) {
        for (size_t at = pos; at < text.size() && !hit; ++at) {
          for (const Added& a : added_) {
            if (text.compare(at, a.content.size(), a.content) == 0) {
              hit = &a;
              pos = at;
              break;
            }
          }
        }
      }
      const size_t end = hit ? pos : text.size();
      encode_segment(text.substr(seg, end - seg), &ids);
      if (!hit) break;
      ids.push_back(hit->id);
      pos += hit->content.size();
      seg = pos;
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    const auto& bm = byte_map();
    for (int64_t id : ids) {
      auto it = id_to_token_.find(id);
      if (it == id_to_token_.end()) continue;
      if (is_added(id)) {
        if (!is_special(id)) out += it->second;
        continue;
      }
      const std::string& tok = it->second;
      for (size_t i = 0; i < tok.size();) {
        const size_t n =
            std::max<size_t>(1, utf8_len(reinterpret_cast<const unsigned char*>(tok.data()) + i, tok.size() - i));
        auto b = bm.to_byte.find(tok.substr(i, n));
        if (b != bm.to_byte.end()) out.push_back(static_cast<char>(b->second));
        i += n;
      }
    }
    return out;
  }

  std::string normalize(std::string_view text) const override {
    const std::string t = repair_utf8(std::string(text));
    return nfc_ ? nfc(t) : t;
  }
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  std::string name() const override { return path_; }

 private:
  struct Added {
    std::string content;
    int64_t id;
    bool special;
  };
  static uint64_t pair_key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }
  bool is_added(int64_t id) const {
    return std::any_of(added_.begin(), added_.end(), [&](const Added& a) { return a.id == id; });
  }
  bool is_special(int64_t id) const {
    return std::any_of(added_.begin(), added_.end(), [&](const Added& a) { return a.id == id && a.special; });
  }

  void encode_segment(const std::string& raw, std::vector<int64_t>* ids) const {
    if (raw.empty()) return;
    std::string text = nfc_ ? nfc(raw) : raw;
    if (add_prefix_space_ && text[0] != ' ') text = " " + text;
    std::vector<std::string> pieces{text};
    for (const auto& re : regexes_) {
      std::vector<std::string> next;
      for (const auto& p : pieces) re->split(p, &next);
      pieces.swap(next);
    }
    for (const auto& p : pieces) bpe_word(p, ids);
  }

  // One pre-token: bytes to byte-level symbols, then merges lowest rank first.
  void bpe_word(const std::string& word, std::vector<int64_t>* ids) const {
    const auto& bm = byte_map();
    std::string mapped;
    for (unsigned char c : word) mapped += bm.to_char[c];
    if (ignore_merges_) {
      auto it = vocab_.find(mapped);
      if (it != vocab_.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = cache_.find(mapped);
      if (it != cache_.end()) {
        ids->insert(ids->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int64_t> sym;
    for (unsigned char c : word) sym.push_back(vocab_.at(bm.to_char[c]));
    while (sym.size() > 1) {
      int64_t best_rank = INT64_MAX, best_id = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto m = merges_.find(pair_key(sym[i], sym[i + 1]));
        if (m != merges_.end() && m->second.first < best_rank)
          best_rank = m->second.first, best_id = m->second.second, best_at = i;
      }
      if (best_id < 0) break;
      // Merge every occurrence of the best pair, left to right.
      const int64_t a = sym[best_at], b = sym[best_at + 1];
      std::vector<int64_t> next;
      for (size_t i = 0; i < sym.size();) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b)
          next.push_back(best_id), i += 2;
        else
          next.push_back(sym[i++]);
      }
      sym.swap(next);
    }
    ids->insert(ids->end(), sym.begin(), sym.end());
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < 100000) cache_.emplace(mapped, sym);
  }

  std::string path_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<int64_t, std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;  // (a, b) -> (rank, merged id)
  std::vector<std::unique_ptr<Regex>> regexes_;
  std::vector<Added> added_;
  bool ignore_merges_ = false, nfc_ = false, add_prefix_space_ = false;
  int64_t vocab_size_ = 0, bos_ = -1, eos_ = -1;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

#endif
}  // namespace

std::string repair_utf8(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = utf8_len(p + i, bytes.size() - i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(bytes, i, n);
      i += n;
    }
  }
  return out;
}

std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& path) {
#if AMAQ_HAVE_PCRE2
  return std::make_unique<BpeTokenizer>(path);
#else
  throw Error("this build has no tokenizer.json support (PCRE2/ICU were not found when it was configured): " + path,
              "install libpcre2-dev and libicu-dev and rebuild, or use --tokenizer byte");
#endif
}

}  // namespace amaq
