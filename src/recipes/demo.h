// What `amaq demo` (and `make run`) needs without any download: a small Llama-style model
// initialised from scratch for the byte tokenizer, and a generated task with a meaningful
// exact-match accuracy.
#pragma once
#include <cstdint>
#include <string>

namespace amaq::recipes {

struct PresetOptions {
  int64_t hidden = 128, layers = 4, heads = 4, kv_heads = 2, intermediate = 352, max_positions = 256;
  int64_t vocab = 0;           ///< 0: the byte tokenizer's; larger for benchmarks of real shapes
  std::string dtype = "fp32";  ///< the stored dtype: fp32 or bf16
};

/// Writes DIR/config.json and DIR/model.safetensors: a Llama with the byte tokenizer's vocabulary
/// (or p.vocab), initialised as HF does (linear and embedding weights N(0, 0.02), norm weights 1),
/// drawn and stored in p.dtype.
void write_preset_model(const std::string& dir, const PresetOptions& p, uint64_t seed);

/// Addition of zero-padded operands with the zero-padded sum written least-significant digit first,
/// the order in which a left-to-right model can carry: {"prompt": "47+38=", "completion": "580"}
/// (085 reversed). Operands have `digits` digits. Writes DIR/train.jsonl and DIR/val.jsonl (disjoint problems).
void write_addition_task(const std::string& dir, int digits, int64_t n_train, int64_t n_val, uint64_t seed);

/// Reversal of a random string of `length` letters from 'a'..'j': {"prompt": "cafbji=",
/// "completion": "ijbfac"}. Exact match needs every position attended precisely. Writes
/// DIR/train.jsonl and DIR/val.jsonl (disjoint strings).
void write_reversal_task(const std::string& dir, int length, int64_t n_train, int64_t n_val, uint64_t seed);

/// Arithmetic word problems from four templates (add, take away, boxes of equal size, add then take
/// away), with names, objects and numbers drawn by `seed`: {"prompt": "Q: Ann has 12 apples and buys 7
/// more. How many apples does Ann have now?\nA: ", "completion": "19"}. Scored by exact match or last
/// number. Writes DIR/train.jsonl and DIR/val.jsonl (disjoint questions).
void write_word_problem_task(const std::string& dir, int64_t n_train, int64_t n_val, uint64_t seed);

}  // namespace amaq::recipes
