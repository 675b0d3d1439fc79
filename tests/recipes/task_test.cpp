// Generated tasks: word problems whose answers follow from their own wording, disjoint and
// seed-determined splits; the `amaq make-task` command.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "core/fs.h"
#include "recipes/demo.h"
#include "testing.h"

namespace amaq::recipes {
namespace {

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// The answer a reader derives from the question's wording and its numbers, in order; `kind` names the wording.
int64_t answer_from_wording(const std::string& q, std::string* kind) {
  std::vector<int64_t> n;
  const std::regex number("[0-9]+");
  for (auto it = std::sregex_iterator(q.begin(), q.end(), number); it != std::sregex_iterator(); ++it)
    n.push_back(std::stoll(it->str()));
  for (const char* k : {"then gives away", "in each box", "away. How many", "more. How many"}) {
    if (q.find(k) == std::string::npos) continue;
    *kind = k;
    if (*kind == "then gives away") return n.at(0) + n.at(1) - n.at(2);
    if (*kind == "in each box") return n.at(0) * n.at(1);
    if (*kind == "away. How many") return n.at(0) - n.at(1);
    return n.at(0) + n.at(1);
  }
  ADD_FAILURE() << "unknown wording: " << q;
  return -1;
}

TEST(Tasks, WordProblemAnswersFollowFromTheirWordingAndSplitsAreDisjoint) {
  testing::TempDir tmp;
  write_word_problem_task(tmp.file("a"), 400, 100, 3);
  const auto train = read_jsonl(tmp.file("a/train.jsonl")), val = read_jsonl(tmp.file("a/val.jsonl"));
  ASSERT_EQ(train.size(), 400u);
  ASSERT_EQ(val.size(), 100u);
  std::set<std::string> prompts, kinds;
  for (const auto* rows : {&train, &val}) {
    for (const auto& r : *rows) {
      const std::string p = r.at("prompt"), c = r.at("completion");
      ASSERT_EQ(p.rfind("Q: ", 0), 0u) << p;
      ASSERT_EQ(p.substr(p.size() - 4), "\nA: ") << p;
      std::string kind;
      EXPECT_EQ(std::to_string(answer_from_wording(p, &kind)), c) << p;
      kinds.insert(kind);
      EXPECT_GE(std::stoll(c), 0) << p;
      EXPECT_TRUE(prompts.insert(p).second) << "repeated: " << p;
    }
  }
  EXPECT_EQ(kinds.size(), 4u);  // every template in use
  write_word_problem_task(tmp.file("b"), 400, 100, 3);
  EXPECT_EQ(read_file(tmp.file("b/train.jsonl")), read_file(tmp.file("a/train.jsonl")));
  write_word_problem_task(tmp.file("c"), 400, 100, 4);
  EXPECT_NE(read_file(tmp.file("c/train.jsonl")), read_file(tmp.file("a/train.jsonl")));
}

TEST(Tasks, MakeTaskCommandWritesTheFiles) {
  testing::TempDir tmp;
  std::string out;
  const std::string bin = std::string(AMAQ_BINARY) + " make-task --out " + tmp.file("t");
  ASSERT_EQ(testing::run_command(bin + " --kind addition --digits 2 --train 50 --val 10 --seed 1", &out), 0) << out;
  EXPECT_EQ(read_jsonl(tmp.file("t/train.jsonl")).size(), 50u);
  const auto v = read_jsonl(tmp.file("t/val.jsonl"));
  ASSERT_EQ(v.size(), 10u);
  const std::string p = v[0].at("prompt"), c = v[0].at("completion");  // "47+38=" -> "580": the sum reversed
  const int64_t sum = std::stoll(p.substr(0, 2)) + std::stoll(p.substr(3, 2));
  EXPECT_EQ(std::stoll(std::string(c.rbegin(), c.rend())), sum) << p << c;
  EXPECT_NE(testing::run_command(bin + " --kind sudoku", &out), 0);
  EXPECT_NE(out.find("sudoku"), std::string::npos) << out;
}

}  // namespace
}  // namespace amaq::recipes
