// Errors that reach a user: what went wrong, where, and a hint on how to fix it.
#pragma once
#include <stdexcept>
#include <string>

namespace amaq {

/// A problem with user input (a file, a config, a flag): names the cause and ends with a hint.
class Error : public std::runtime_error {
 public:
  Error(const std::string& what, const std::string& hint)
      : std::runtime_error(hint.empty() ? what : what + "\n  hint: " + hint), hint_(hint) {}
  const std::string& hint() const { return hint_; }

 private:
  std::string hint_;
};

}  // namespace amaq
