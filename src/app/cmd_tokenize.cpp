// amaq tokenize: JSON strings in, one per line on stdin; one JSON array of ids out per line
// (--decode: the reverse). No special tokens are added unless --add-special.
#include <iostream>
#include <nlohmann/json.hpp>

#include "app/commands.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace amaq::app {

Run add_tokenize(CLI::App& app) {
  struct Args {
    std::string tokenizer;
    bool decode = false, add_special = false;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer.json, tokenizer.model, a model directory, or 'byte'")
      ->required();
  app.add_flag("--decode", a->decode, "read arrays of ids, write JSON strings");
  app.add_flag("--add-special", a->add_special, "prepend the tokenizer's BOS id when encoding");
  return [a] {
    auto tok = load_tokenizer(a->tokenizer);
    std::string line;
    int64_t n = 0;
    while (std::getline(std::cin, line)) {
      ++n;
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      const std::string where = "stdin line " + std::to_string(n);
      if (a->decode) {
        if (!j.is_array()) throw Error(where + ": not a JSON array of ids", "one array per line, e.g. [9906,1917]");
        std::vector<int64_t> ids;
        for (const auto& v : j) {
          if (!v.is_number_integer())
            throw Error(where + ": ids must be integers", "one array per line, e.g. [9906,1917]");
          ids.push_back(v.get<int64_t>());
          if (ids.back() < 0 || ids.back() >= tok->vocab_size()) {
            throw Error(where + ": id " + std::to_string(ids.back()) + " is outside this tokenizer's [0, " +
                            std::to_string(tok->vocab_size()) + ")",
                        "the ids were made with another tokenizer");
          }
        }
        std::cout << nlohmann::json(tok->decode(ids)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                  << "\n";
      } else {
        if (!j.is_string())
          throw Error(where + ": not a JSON string", "one JSON string per line, e.g. \"Hello world\"");
        std::vector<int64_t> ids;
        if (a->add_special && tok->bos_id() >= 0) ids.push_back(tok->bos_id());
        const auto body = tok->encode(j.get<std::string>());
        ids.insert(ids.end(), body.begin(), body.end());
        std::cout << nlohmann::json(ids).dump() << "\n";
      }
    }
    return 0;
  };
}

}  // namespace amaq::app
