// Helpers shared by the tests: fixture paths, temp dirs, tolerance checks that name the worst element.
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"

namespace amaq::testing {

inline std::string data_path(const std::string& rel) {
  return std::string(AMAQ_TEST_DATA) + "/" + rel;
}

/// The first `max_chars` of a frozen English text (tests/data/text/english.txt, an old copy of the project's
/// docs): training tests need text whose loss curve does not move when the live docs are edited.
std::string english_text(size_t max_chars);

/// A fresh directory under /tmp, removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// |actual - expected| <= atol + rtol * |expected| everywhere; on failure names the worst element.
::testing::AssertionResult all_close(const at::Tensor& actual, const at::Tensor& expected, double atol, double rtol);

/// Student-t(3) values, N / sqrt(chi2_3 / 3), of the given sizes: heavier tails than activations' bulk.
at::Tensor student_t3(at::IntArrayRef sizes, at::Generator& gen);
/// x with every `every`-th channel (last dimension) from channel 1 multiplied by `gain`: the outlier
/// channels real activations have.
at::Tensor with_outlier_channels(at::Tensor x, int64_t every = 37, double gain = 30);
/// ||approx - exact||^2 / ||exact||^2, in double.
double nmse(const at::Tensor& approx, const at::Tensor& exact);

/// Writes `bytes` to a file (no atomicity needed in tests).
void write_bytes(const std::string& path, const std::string& bytes);

/// Runs a shell command, returning its exit status and putting stdout+stderr in `output`.
int run_command(const std::string& cmd, std::string* output);

}  // namespace amaq::testing

/// Expects `stmt` to throw amaq::Error whose message contains every one of the given substrings.
#define EXPECT_AMAQ_ERROR(stmt, ...)                                         \
  do {                                                                       \
    try {                                                                    \
      stmt;                                                                  \
      ADD_FAILURE() << "expected amaq::Error from: " #stmt;                  \
    } catch (const amaq::Error& e_) {                                        \
      for (const char* s_ : {__VA_ARGS__}) {                                 \
        EXPECT_NE(std::string(e_.what()).find(s_), std::string::npos)        \
            << "message lacks '" << s_ << "': " << e_.what();                \
      }                                                                      \
      EXPECT_FALSE(e_.hint().empty()) << "error has no hint: " << e_.what(); \
    }                                                                        \
  } while (0)
