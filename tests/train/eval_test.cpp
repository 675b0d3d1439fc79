// Evaluation: the KV cache against recomputation, and metrics on hand-computable models (a uniform
// model's perplexity is the vocabulary size; a model that always predicts one letter has a known
// classification and generation accuracy).
#include "train/eval.h"

#include <gtest/gtest.h>

#include "core/fs.h"
#include "testing.h"

namespace amaq::train {
namespace {

const std::string kModel = testing::data_path("hf/llama-gqa");

DecoderPart fixture_model() {
  DecoderPart m = full_model(ModelConfig::load(kModel));
  m->load_weights(CheckpointReader(kModel));
  return m;
}

TEST(Eval, KvCacheGivesTheFullForwardsLogitsAndGreedyTokens) {
  DecoderPart m = fixture_model();
  at::NoGradGuard no_grad;
  const std::vector<int64_t> ids{5, 17, 300, 42, 9, 999, 1, 64};
  at::Tensor full = m->forward(at::tensor(ids, at::kLong).view({1, 8}));
  std::vector<KvEntry> cache;
  at::Tensor a =
      m->forward_cached(at::tensor(std::vector<int64_t>(ids.begin(), ids.begin() + 5), at::kLong).view({1, 5}), &cache);
  at::Tensor b = m->forward_cached(at::tensor(std::vector<int64_t>{999}, at::kLong).view({1, 1}), &cache);
  at::Tensor c = m->forward_cached(at::tensor(std::vector<int64_t>{1, 64}, at::kLong).view({1, 2}), &cache);
  EXPECT_TRUE(testing::all_close(at::cat({a, b, c}, 1), full, 1e-5, 1e-5));
  EXPECT_EQ(cache[0].k.size(2), 8);
  const auto fast = greedy_generate(m, ids, 20, -1), slow = greedy_generate_reference(m, ids, 20, -1);
  EXPECT_EQ(fast.size(), 20u);
  EXPECT_EQ(fast, slow);
}

TEST(Eval, UniformModelHasPerplexityEqualToTheVocabulary) {
  DecoderPart m = fixture_model();
  {
    at::NoGradGuard no_grad;
    m->lm_head->weight.zero_();
  }
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("a.txt"), "any text at all, of some length, packed into windows");
  ByteTokenizer tok;
  const auto r = evaluate_model(m, Dataset::load(tmp.file("a.txt"), tok, 16), tok, 2, 4);
  EXPECT_NEAR(r["perplexity"].get<double>(), 1000.0, 1e-3);  // fp32 log-softmax: 1e-6 relative
  EXPECT_EQ(r["tokens"].get<uint64_t>(), 52u - 4u);          // 4 windows, each predicts all but its first token
}

// Attention and MLP outputs zero, embeddings all ones: the final norm sees ones, and the head
// gives letter 'p' a logit of 64 and everything else 0. Greedy output is "ppp...".
DecoderPart always_p() {
  DecoderPart m = fixture_model();
  at::NoGradGuard no_grad;
  for (auto& layer : m->layers) {
    layer->self_attn->o_proj->weight.zero_();
    layer->mlp->down_proj->weight.zero_();
  }
  m->embed_tokens->weight.fill_(1.0);
  m->norm->weight.fill_(1.0);
  m->lm_head->weight.zero_();
  m->lm_head->weight['p'].fill_(1.0);
  return m;
}

TEST(Eval, ClassificationAccuracyOfAKnownPredictor) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("c.jsonl"),
                       "{\"text\":\"great\",\"label\":\"pos\"}\n{\"text\":\"awful\",\"label\":\"neg\"}\n"
                       "{\"text\":\"fine\",\"label\":\"pos\"}\n{\"text\":\"good\",\"label\":\"pos\"}\n");
  ByteTokenizer tok;
  DecoderPart m = always_p();
  const auto r = evaluate_model(m, Dataset::load(tmp.file("c.jsonl"), tok, 64), tok, 3, 4);
  EXPECT_DOUBLE_EQ(r["accuracy"].get<double>(), 0.75);  // it always says "pos"
}

TEST(Eval, GenerationExactAndNumberMatchOfAKnownPredictor) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("g.jsonl"),
                       "{\"prompt\":\"say p: \",\"completion\":\"PPP\"}\n{\"prompt\":\"2+2=\",\"completion\":\"4\"}\n");
  ByteTokenizer tok;
  DecoderPart m = always_p();
  const auto r = evaluate_model(m, Dataset::load(tmp.file("g.jsonl"), tok, 64), tok, 2, 3);
  EXPECT_DOUBLE_EQ(r["exact_match"].get<double>(), 0.5);  // "ppp" matches "PPP" after normalisation
  EXPECT_DOUBLE_EQ(r["number_match"].get<double>(), 0.0);
}

TEST(Eval, AnswerNormalisationAndLastNumber) {
  EXPECT_EQ(normalize_answer("  The\tCat \n sat "), "the cat sat");
  EXPECT_EQ(last_number("so 3 apples, then -12.5 and finally 1,234 left"), "1234");
  EXPECT_EQ(last_number("x = -7."), "-7");
  EXPECT_EQ(last_number("no digits"), "");
}

}  // namespace
}  // namespace amaq::train
