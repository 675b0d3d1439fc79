#include "testing.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "core/fs.h"

namespace amaq::testing {

std::string english_text(size_t max_chars) {
  return read_file(data_path("text/english.txt")).substr(0, max_chars);
}

TempDir::TempDir() {
  std::string tmpl = join_path(temp_dir(), "amaq-test-XXXXXX");
  char* p = ::mkdtemp(tmpl.data());
  if (!p) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  try {
    remove_tree(path_);
  } catch (const std::exception&) {  // a test's leftovers must not abort the run
  }
}

::testing::AssertionResult all_close(const at::Tensor& actual, const at::Tensor& expected, double atol, double rtol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  at::Tensor a = actual.detach().to(at::kCPU, at::kDouble).flatten(),
             e = expected.detach().to(at::kCPU, at::kDouble).flatten();
  at::Tensor excess = (a - e).abs() - (atol + rtol * e.abs());
  if (a.isnan().any().item<bool>()) return ::testing::AssertionFailure() << "actual has NaN";
  int64_t worst = excess.argmax().item<int64_t>();
  double w = excess[worst].item<double>();
  if (w <= 0) return ::testing::AssertionSuccess();
  int64_t bad = (excess > 0).sum().item<int64_t>();
  return ::testing::AssertionFailure() << bad << " of " << a.numel() << " elements outside atol " << atol << " rtol "
                                       << rtol << "; worst at flat index " << worst << ": got "
                                       << a[worst].item<double>() << ", expected " << e[worst].item<double>();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

int run_command(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* p = ::popen(full.c_str(), "r");
  if (!p) return -1;
  std::array<char, 4096> buf{};
  output->clear();
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) output->append(buf.data(), n);
  int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

at::Tensor student_t3(at::IntArrayRef sizes, at::Generator& gen) {
  std::vector<int64_t> three{3};
  three.insert(three.end(), sizes.begin(), sizes.end());
  const at::Tensor n = at::randn(sizes, gen), chi = at::randn(three, gen).pow(2).sum(0) / 3;
  return n / chi.sqrt();
}

at::Tensor with_outlier_channels(at::Tensor x, int64_t every, double gain) {
  for (int64_t c = 1; c < x.size(-1); c += every) x.select(-1, c).mul_(gain);
  return x;
}

double nmse(const at::Tensor& approx, const at::Tensor& exact) {
  const at::Tensor e = exact.to(at::kDouble);
  return ((approx.to(at::kDouble) - e).pow(2).sum() / e.pow(2).sum()).item<double>();
}

}  // namespace amaq::testing
