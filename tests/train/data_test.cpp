// Training data: each format's examples and labels, deterministic order, padding, and bad input
// reported as file:line.
#include "train/data.h"

#include <gtest/gtest.h>

#include <set>

#include "testing.h"

namespace amaq::train {
namespace {

TEST(Data, TextIsPackedIntoWindowsWithLabelsEqualToIds) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("a.txt"), "abcdefghij");
  ByteTokenizer tok;
  Dataset d = Dataset::load(tmp.file("a.txt"), tok, 4);
  ASSERT_EQ(d.examples.size(), 3u);  // abcd efgh ij
  EXPECT_EQ(d.examples[1].ids, (std::vector<int64_t>{'e', 'f', 'g', 'h'}));
  EXPECT_EQ(d.examples[2].ids, (std::vector<int64_t>{'i', 'j'}));
  EXPECT_EQ(d.examples[0].labels, d.examples[0].ids);
  EXPECT_EQ(tok.decode(d.examples[0].ids), "abcd");

  testing::write_bytes(tmp.file("b.jsonl"), "{\"text\":\"ab\"}\n\n{\"text\":\"c\"}\n");
  Dataset j = Dataset::load(tmp.file("b.jsonl"), tok, 16);
  ASSERT_EQ(j.examples.size(), 1u);
  EXPECT_EQ(j.examples[0].ids, (std::vector<int64_t>{'a', 'b', ByteTokenizer::kEos, 'c', ByteTokenizer::kEos}));
}

TEST(Data, InstructionLossOnlyOnTheCompletion) {
  testing::TempDir tmp;
  testing::write_bytes(
      tmp.file("i.jsonl"),
      "{\"prompt\":\"2+2=\",\"completion\":\"4\"}\n{\"prompt\":\"a long prompt\",\"completion\":\"xy\"}\n");
  ByteTokenizer tok;
  Dataset d = Dataset::load(tmp.file("i.jsonl"), tok, 6);
  ASSERT_EQ(d.examples.size(), 2u);
  EXPECT_EQ(d.format, DataFormat::kInstruction);
  EXPECT_EQ(d.examples[0].labels,
            (std::vector<int64_t>{kIgnoreLabel, kIgnoreLabel, kIgnoreLabel, kIgnoreLabel, '4', ByteTokenizer::kEos}));
  // Too long: the prompt's front is cut, the completion kept.
  EXPECT_EQ(tok.decode(d.examples[1].ids), "mptxy");
  EXPECT_EQ(d.examples[1].labels.back(), ByteTokenizer::kEos);
  EXPECT_EQ(d.examples[1].labels[3], 'x');
}

TEST(Data, ClassificationCollectsLabelWords) {
  testing::TempDir tmp;
  testing::write_bytes(
      tmp.file("c.jsonl"),
      "{\"text\":\"good\",\"label\":\"pos\"}\n{\"text\":\"bad\",\"label\":\"neg\"}\n{\"text\":\"ok\",\"label\":1}\n");
  ByteTokenizer tok;
  Dataset d = Dataset::load(tmp.file("c.jsonl"), tok, 32);
  EXPECT_EQ(d.format, DataFormat::kClassification);
  EXPECT_EQ(d.label_words, (std::vector<std::string>{"1", "neg", "pos"}));
  EXPECT_EQ(tok.decode(d.examples[0].ids), "good pos");
  // Too long: the text's tail is cut, its front and the label kept (the label word's loss intact).
  Dataset cut = Dataset::load(tmp.file("c.jsonl"), tok, 6);
  EXPECT_EQ(tok.decode(cut.examples[0].ids), "g pos");
  EXPECT_EQ(cut.examples[0].labels, (std::vector<int64_t>{kIgnoreLabel, ' ', 'p', 'o', 's', ByteTokenizer::kEos}));
  EXPECT_EQ(tok.decode(cut.examples[1].ids), "b neg");
  // A window shorter than the label: what is left of the label, as for an instruction.
  EXPECT_EQ(tok.decode(Dataset::load(tmp.file("c.jsonl"), tok, 3).examples[0].ids), "os");
}

TEST(Data, MalformedInputNamesFileAndLine) {
  testing::TempDir tmp;
  ByteTokenizer tok;
  testing::write_bytes(tmp.file("bad.jsonl"), "{\"text\":\"ok\"}\n{\"text\": 3}\n");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("bad.jsonl"), tok, 8), "bad.jsonl:2", "\"text\"");
  testing::write_bytes(tmp.file("bad2.jsonl"), "{\"prompt\":\"a\",\"completion\":\"b\"}\nnot json\n");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("bad2.jsonl"), tok, 8), "bad2.jsonl:2", "not a JSON object");
  testing::write_bytes(tmp.file("bad3.jsonl"), "{\"question\":\"a\"}\n");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("bad3.jsonl"), tok, 8), "bad3.jsonl:1");
  testing::write_bytes(tmp.file("x.csv"), "a,b\n");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("x.csv"), tok, 8), "unknown data file type");
  testing::write_bytes(tmp.file("empty.txt"), "a");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("empty.txt"), tok, 8), "no training sequence");
  EXPECT_AMAQ_ERROR(Dataset::load(tmp.file("missing.txt"), tok, 8), "missing.txt");
}

TEST(Data, SamplerVisitsEveryExampleOncePerEpochInASeededOrder) {
  Sampler a(10, 7), b(10, 7), c(10, 8);
  std::set<int64_t> epoch0, epoch1;
  std::vector<int64_t> oa, oc;
  for (int64_t p = 0; p < 10; ++p) {
    epoch0.insert(a.at(p));
    oa.push_back(a.at(p));
    oc.push_back(c.at(p));
  }
  for (int64_t p = 10; p < 20; ++p) epoch1.insert(a.at(p));
  EXPECT_EQ(epoch0.size(), 10u);
  EXPECT_EQ(epoch1.size(), 10u);
  EXPECT_NE(oa, oc);
  for (int64_t p : {13, 2, 19, 0}) EXPECT_EQ(a.at(p), b.at(p)) << p;  // position alone decides
}

TEST(Data, BatchesAreRightPaddedWithMaskAndIgnoredLabels) {
  Dataset d;
  d.examples = {{{1, 2, 3}, {1, 2, 3}}, {{4}, {kIgnoreLabel}}};
  Batch b = make_batch(d, {1, 0}, 9, 5);
  EXPECT_EQ(b.ids.sizes(), (std::vector<int64_t>{2, 5}));
  EXPECT_TRUE(at::equal(b.ids[0], at::tensor({4, 9, 9, 9, 9}, at::kLong)));
  EXPECT_TRUE(at::equal(b.mask[1], at::tensor({1, 1, 1, 0, 0}, at::kLong)));
  EXPECT_TRUE(at::equal(b.labels[1], at::tensor({1, 2, 3, -100, -100}, at::kLong)));
  EXPECT_EQ(b.sample_ids, (std::vector<int64_t>{1, 0}));
}

}  // namespace
}  // namespace amaq::train
