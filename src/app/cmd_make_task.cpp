// `amaq make-task`: the generated tasks as JSONL files (prompt + completion), for training and eval.
#include <fmt/format.h>

#include "app/commands.h"
#include "recipes/demo.h"

namespace amaq::app {

Run add_make_task(CLI::App& app) {
  struct Args {
    std::string kind, out;
    int64_t train = 20000, val = 500;
    uint64_t seed = 0;
    int digits = 3, length = 10;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--kind", a->kind, "word-problems | addition | reversal")
      ->required()
      ->check(CLI::IsMember({"word-problems", "addition", "reversal"}));
  app.add_option("--out", a->out, "directory for train.jsonl and val.jsonl")->required();
  app.add_option("--train", a->train, "training problems")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--val", a->val, "validation problems (disjoint from training)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--seed", a->seed, "seed of the problems")->capture_default_str();
  app.add_option("--digits", a->digits, "addition: digits per operand")->capture_default_str();
  app.add_option("--length", a->length, "reversal: letters per string")->capture_default_str();
  return [a] {
    if (a->kind == "word-problems")
      recipes::write_word_problem_task(a->out, a->train, a->val, a->seed);
    else if (a->kind == "addition")
      recipes::write_addition_task(a->out, a->digits, a->train, a->val, a->seed);
    else
      recipes::write_reversal_task(a->out, a->length, a->train, a->val, a->seed);
    fmt::print("make-task: {} -> {}/train.jsonl ({}), {}/val.jsonl ({}), seed {}\n", a->kind, a->out, a->train, a->out,
               a->val, a->seed);
    return 0;
  };
}

}  // namespace amaq::app
