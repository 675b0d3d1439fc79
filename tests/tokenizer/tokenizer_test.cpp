// Tokenizers against the Rust tokenizers library's ids (tests/data/hf/tokenizer-cases.json) for the
// pinned Llama-3 and Qwen3 tokenizer.json files; round trips; random and invalid bytes; malformed
// files; SentencePiece through libsentencepiece.
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "core/fs.h"
#include "testing.h"
#include "tokenizer/bpe.h"

namespace amaq {
namespace {

std::string tokenizer_file(const std::string& name) {
  const std::string path = std::string(AMAQ_SOURCE_DIR) + "/tests/data/tokenizers/" + name + ".json";
  if (!file_exists(path)) ADD_FAILURE() << path << " is missing: run scripts/fetch-tokenizers.sh (make test does)";
  return path;
}

// tokenizer.json needs PCRE2 + ICU; a build configured without them (the GPU machine's image) skips.
#if AMAQ_HAVE_PCRE2
#define SKIP_WITHOUT_PCRE2() (void)0
#else
#define SKIP_WITHOUT_PCRE2() GTEST_SKIP() << "this build has no tokenizer.json support (PCRE2/ICU were not found)"
#endif

class HfTokenizer : public ::testing::TestWithParam<std::string> {};

TEST_P(HfTokenizer, IdsEqualTheRustLibraryAndDecodeRestoresTheText) {
  SKIP_WITHOUT_PCRE2();
  auto tok = load_tokenizer(tokenizer_file(GetParam()));
  const auto cases = nlohmann::json::parse(read_file(testing::data_path("hf/tokenizer-cases.json"))).at(GetParam());
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    const std::string text = c.at("text");
    const auto want = c.at("ids").get<std::vector<int64_t>>();
    EXPECT_EQ(tok->encode(text), want) << "text: " << nlohmann::json(text).dump();
    EXPECT_EQ(tok->decode(tok->encode(text)), text) << "text: " << nlohmann::json(text).dump();
  }
}

TEST_P(HfTokenizer, AddedTokensInTheTextAndRandomBytesHaveDefinedResults) {
  SKIP_WITHOUT_PCRE2();
  auto tok = load_tokenizer(tokenizer_file(GetParam()));
  const std::string special = GetParam() == "llama3" ? "<|end_of_text|>" : "<|endoftext|>";
  auto ids = tok->encode("a" + special + "b");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], tok->eos_id());
  EXPECT_EQ(tok->decode(ids), "ab");  // special tokens are dropped when decoding
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    std::string bytes(static_cast<size_t>(rng() % 64), '\0');
    for (char& ch : bytes) ch = static_cast<char>(rng() % 256);
    if (trial % 3 == 0) bytes += "\xC3\x28 \xF0\x9F\x99 \xED\xA0\x80";  // bad continuation, truncated, surrogate
    const auto got = tok->encode(bytes);
    for (int64_t id : got) ASSERT_TRUE(id >= 0 && id < tok->vocab_size());
    // Invalid sequences become U+FFFD, the normalizer (Qwen: NFC) applies; nothing else changes.
    EXPECT_EQ(tok->decode(got), tok->normalize(bytes));
    if (GetParam() == "llama3") {
      EXPECT_EQ(tok->normalize(bytes), repair_utf8(bytes));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Pinned, HfTokenizer, ::testing::Values("llama3", "qwen3"));

TEST(Tokenizer, QwenNormalizesToNfc) {
  SKIP_WITHOUT_PCRE2();
  auto tok = load_tokenizer(tokenizer_file("qwen3"));
  EXPECT_EQ(tok->normalize("e\xCC\x81"), "\xC3\xA9");  // e + combining acute -> é
  EXPECT_EQ(tok->encode("e\xCC\x81"), tok->encode("\xC3\xA9"));
}

TEST(Tokenizer, RepairUtf8ReplacesEachInvalidByte) {
  EXPECT_EQ(repair_utf8("ok \xC3\xA9"), "ok \xC3\xA9");
  EXPECT_EQ(repair_utf8("a\xFF"
                        "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(repair_utf8("\xE2\x82"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // truncated 3-byte sequence
  EXPECT_EQ(repair_utf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong
}

TEST(Tokenizer, MalformedFilesNameTheField) {
  SKIP_WITHOUT_PCRE2();
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("a.json"), R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("a.json")), "model.type", "WordPiece");
  testing::write_bytes(tmp.file("b.json"), R"({"model": {"type": "BPE", "vocab": {"a": 0}}})");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("b.json")), "model.merges");
  testing::write_bytes(tmp.file("c.json"), R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("c.json")), "merge 'a b'");
  testing::write_bytes(tmp.file("d.json"), "{not json");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("d.json")), "not JSON");
  testing::write_bytes(
      tmp.file("e.json"),
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": {"type": "NFKD"}})");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("e.json")), "normalizer", "NFKD");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.path()), "no tokenizer found");
}

TEST(Tokenizer, ByteTokenizerRoundTripsAnyBytes) {
  ByteTokenizer tok;
  const std::string s("\x00\xFFz\n", 4);
  EXPECT_EQ(tok.encode(s), (std::vector<int64_t>{0, 255, 'z', '\n'}));
  auto ids = tok.encode(s);
  ids.push_back(ByteTokenizer::kEos);
  EXPECT_EQ(tok.decode(ids), s);
}

TEST(Tokenizer, SentencePieceModelTrainedHereRoundTrips) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("corpus.txt"), testing::english_text(1 << 20));
  train_sentencepiece("--input=" + tmp.file("corpus.txt") + " --model_prefix=" + tmp.file("sp") +
                      " --vocab_size=400 --model_type=bpe --character_coverage=1.0 --minloglevel=2");
  auto tok = load_tokenizer(tmp.file("sp.model"));
  EXPECT_EQ(tok->vocab_size(), 400);
  for (const std::string s : {"split fine-tuning of large language models", "The server holds layers [K, L)."}) {
    const auto ids = tok->encode(s);
    EXPECT_LT(ids.size(), s.size());  // merges happened
    EXPECT_EQ(tok->decode(ids), s);
  }
  testing::write_bytes(tmp.file("bad.model"), "not a model");
  EXPECT_AMAQ_ERROR(load_tokenizer(tmp.file("bad.model")), "cannot load SentencePiece model");
}

TEST(Tokenizer, TokenizeCommandEncodesAndDecodesJsonLines) {
  SKIP_WITHOUT_PCRE2();
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("in.jsonl"), "\"Hello world\"\n\"I'm sure\"\n");
  std::string out;
  const std::string bin = std::string(AMAQ_BINARY) + " tokenize --tokenizer " + tokenizer_file("llama3");
  ASSERT_EQ(testing::run_command(bin + " < " + tmp.file("in.jsonl") + " 2>/dev/null", &out), 0) << out;
  EXPECT_EQ(out, "[9906,1917]\n[40,2846,2771]\n");
  testing::write_bytes(tmp.file("ids.jsonl"), out);
  ASSERT_EQ(testing::run_command(bin + " --decode < " + tmp.file("ids.jsonl") + " 2>/dev/null", &out), 0) << out;
  EXPECT_EQ(out, "\"Hello world\"\n\"I'm sure\"\n");
  ASSERT_EQ(testing::run_command(bin + " --add-special < " + tmp.file("in.jsonl") + " 2>/dev/null", &out), 0) << out;
  EXPECT_EQ(out.substr(0, 14), "[128000,9906,1");
  testing::write_bytes(tmp.file("bad.jsonl"), "\"ok\"\n42\n");
  EXPECT_NE(testing::run_command(bin + " < " + tmp.file("bad.jsonl"), &out), 0);
  EXPECT_NE(out.find("line 2"), std::string::npos) << out;
}

TEST(Tokenizer, DecodeRefusesIdsOutsideTheVocabulary) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("ids.jsonl"), "[72,105]\n[72,999999]\n");
  std::string out;
  const std::string bin = std::string(AMAQ_BINARY) + " tokenize --tokenizer byte --decode < " + tmp.file("ids.jsonl");
  EXPECT_NE(testing::run_command(bin, &out), 0) << out;
  EXPECT_NE(out.find("\"Hi\""), std::string::npos) << out;
  EXPECT_NE(out.find("line 2: id 999999 is outside"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq
