// safetensors: round trip, sharded checkpoints, and every malformed file refused with a named cause.
#include "core/safetensors.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "testing.h"

namespace amaq {
namespace {

using testing::TempDir;
using testing::write_bytes;

// A file whose header is `header` verbatim, followed by `data_bytes` zero bytes.
std::string raw_file(const std::string& header, size_t data_bytes) {
  std::string out;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripEveryDtype) {
  TempDir tmp;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(71);
  NamedTensors in{
      {"f32", at::randn({3, 5}, gen)},
      {"bf16", at::randn({7}, gen).to(at::kBFloat16)},
      {"f16", at::randn({2, 2, 2}, gen).to(at::kHalf)},
      {"i64", at::arange(10, at::kLong).view({2, 5})},
      {"scalar", at::tensor(3.5)},
      {"empty", at::empty({0, 4})},
  };
  save_safetensors(tmp.file("a.safetensors"), in, {{"format", "pt"}});
  SafetensorsFile f(tmp.file("a.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.names().size(), in.size());
  for (const auto& [name, t] : in) {
    at::Tensor back = f.load(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(back, t)) << name;
  }
  EXPECT_EQ(f.info("bf16").dtype_name, "BF16");
}

TEST(Safetensors, ReadsTheHfFixtureAndItsDtypes) {
  SafetensorsFile f(testing::data_path("hf/llama-gqa/model.safetensors"));
  const TensorInfo& e = f.info("model.embed_tokens.weight");
  EXPECT_EQ(e.dtype, at::kFloat);
  EXPECT_EQ(e.shape, (std::vector<int64_t>{1000, 64}));
}

TEST(Safetensors, ShardedCheckpointLoadsEachTensorFromItsShard) {
  TempDir tmp;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(72);
  at::Tensor a = at::randn({4, 4}, gen), b = at::randn({8}, gen).to(at::kBFloat16);
  save_safetensors(tmp.file("model-00001-of-00002.safetensors"), {{"a", a}});
  save_safetensors(tmp.file("model-00002-of-00002.safetensors"), {{"b", b}});
  nlohmann::json index = {
      {"metadata", {{"total_size", 96}}},
      {"weight_map", {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}}}};
  write_bytes(tmp.file("model.safetensors.index.json"), index.dump());
  CheckpointReader ckpt(tmp.path());
  EXPECT_TRUE(at::equal(ckpt.load("a", at::kFloat), a));
  EXPECT_TRUE(at::equal(ckpt.load("b", at::kFloat), b.to(at::kFloat)));  // converted on load
  EXPECT_EQ(ckpt.sizes().at("b"), 16u);
  EXPECT_AMAQ_ERROR(ckpt.load("c", at::kFloat), "'c'", "missing");
}

TEST(Safetensors, TruncatedFileNamesTheTensorPastTheEnd) {
  TempDir tmp;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(73);
  std::string bytes = safetensors_bytes({{"first", at::randn({16}, gen)}, {"last", at::randn({16}, gen)}});
  write_bytes(tmp.file("t.safetensors"), bytes.substr(0, bytes.size() - 10));
  EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("t.safetensors")), "tensor 'last'", "past the end", "t.safetensors");
}

TEST(Safetensors, HeaderOffsetPastEndOfFile) {
  TempDir tmp;
  auto h = R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16000]}})";
  write_bytes(tmp.file("o.safetensors"), raw_file(h, 16));
  EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("o.safetensors")), "tensor 'w'", "16000", "past the end");
}

TEST(Safetensors, HeaderLengthPastEndOfFile) {
  TempDir tmp;
  std::string bytes = raw_file("{}", 0);
  bytes[0] = '\xff';
  bytes[1] = '\x10';  // claims a 4351-byte header in a 10-byte file
  write_bytes(tmp.file("h.safetensors"), bytes);
  EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("h.safetensors")), "header length", "past the end");
  write_bytes(tmp.file("tiny.safetensors"), "abc");
  EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("tiny.safetensors")), "shorter than its 8-byte header length");
}

TEST(Safetensors, MalformedHeadersAreRefused) {
  TempDir tmp;
  struct Case {
    const char* header;
    size_t data;
    const char* expect;
  } cases[] = {
      {"not json", 0, "not a JSON object"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", 16, "needs 16 bytes"},
      {R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", 16, "negative"},
      {R"({"w":{"dtype":"F32","shape":[4]}})", 16, "needs dtype, shape and data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,0]}})", 16, "begin > end"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
       24, "overlap"},
      {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", 16, "overflows"},
  };
  for (const auto& c : cases) {
    write_bytes(tmp.file("m.safetensors"), raw_file(c.header, c.data));
    EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("m.safetensors")), c.expect);
    EXPECT_AMAQ_ERROR(safetensors_from_bytes(raw_file(c.header, c.data), "a peer's tensors"), "a peer's tensors",
                      c.expect);
  }
}

TEST(Safetensors, BytesReadBackAsTheFileReadsThem) {
  TempDir tmp;
  const NamedTensors tensors{{"a", at::randn({3, 5})},
                             {"b", at::arange(7, at::kLong)},
                             {"c", at::randn({2, 2}).to(at::kBFloat16)},
                             {"empty", at::empty({0, 4})}};
  const std::string bytes = safetensors_bytes(tensors, {{"format", "pt"}});
  write_bytes(tmp.file("t.safetensors"), bytes);
  const auto from_file = load_safetensors(tmp.file("t.safetensors"));
  const auto from_bytes = safetensors_from_bytes(bytes, "t");
  ASSERT_EQ(from_bytes.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(at::equal(from_bytes.at(name), t)) << name;
    EXPECT_TRUE(at::equal(from_bytes.at(name), from_file.at(name))) << name;
    EXPECT_EQ(from_bytes.at(name).scalar_type(), t.scalar_type()) << name;
  }
  EXPECT_AMAQ_ERROR(safetensors_from_bytes(bytes.substr(0, bytes.size() - 1), "a cut message"), "a cut message",
                    "past the end");
  EXPECT_AMAQ_ERROR(safetensors_from_bytes("abc", "three bytes"), "shorter than its 8-byte header length");
}

TEST(Safetensors, UnknownDtypeIsNamed) {
  TempDir tmp;
  write_bytes(tmp.file("d.safetensors"), raw_file(R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4));
  EXPECT_AMAQ_ERROR(SafetensorsFile(tmp.file("d.safetensors")), "tensor 'w'", "unsupported dtype F8_E4M3");
}

TEST(Safetensors, IntegerWeightInACheckpointIsRefused) {
  TempDir tmp;
  save_safetensors(tmp.file("model.safetensors"), {{"model.norm.weight", at::ones({8}, at::kLong)}});
  CheckpointReader ckpt(tmp.path());
  EXPECT_AMAQ_ERROR(ckpt.load("model.norm.weight", at::kFloat), "'model.norm.weight'", "dtype I64", "floating-point");
  EXPECT_AMAQ_ERROR(CheckpointReader(tmp.file("nowhere")), "no model.safetensors");
}

TEST(Fs, AtomicWriteReplacesWholeFile) {
  TempDir tmp;
  write_file_atomic(tmp.file("x"), "old contents");
  write_file_atomic(tmp.file("x"), "new");
  EXPECT_EQ(read_file(tmp.file("x")), "new");
}

TEST(Fs, DirectoriesAreMadeListedMovedAndRemovedWhole) {
  TempDir tmp;
  make_dirs(tmp.file("a/b/c"));
  make_dirs(tmp.file("a/b/c"));  // exists: fine
  make_dirs(tmp.file("a/d"));
  write_file_atomic(tmp.file("a/b/c/f"), "x");
  write_file_atomic(tmp.file("a/file"), "y");
  auto names = list_subdirs(tmp.file("a"));
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"b", "d"}));  // not the file
  EXPECT_TRUE(list_subdirs(tmp.file("missing")).empty());
  rename_path(tmp.file("a/b"), tmp.file("a/e"));
  EXPECT_EQ(read_file(tmp.file("a/e/c/f")), "x");
  EXPECT_AMAQ_ERROR(rename_path(tmp.file("a/nothing"), tmp.file("a/z")), "a/nothing");
  EXPECT_AMAQ_ERROR(make_dirs(tmp.file("a/file/sub")), "a/file");
  remove_tree(tmp.file("a"));
  EXPECT_FALSE(file_exists(tmp.file("a")));
  remove_tree(tmp.file("a"));  // already gone: fine
}

}  // namespace
}  // namespace amaq
