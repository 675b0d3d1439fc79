#include "core/torch_io.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/serialize.h>

#include <sstream>

#include "core/error.h"

namespace amaq {

std::string optimizer_bytes(torch::optim::Optimizer& opt) {
  std::ostringstream out;
  torch::save(opt, out);
  return out.str();
}

void load_optimizer(torch::optim::Optimizer& opt, const std::string& bytes, const std::string& what) {
  std::istringstream in(bytes);
  try {
    torch::load(opt, in);
  } catch (const c10::Error& e) {
    throw Error("cannot restore the optimizer from " + what + ": " + e.what_without_backtrace(),
                "the checkpoint belongs to a run with other trainable parameters");
  }
}

std::mutex& rng_mutex() {
  static std::mutex mu;
  return mu;
}

at::Tensor cpu_rng_state() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace amaq
