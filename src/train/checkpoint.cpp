#include "train/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <algorithm>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace amaq::train {

std::string checkpoint_path(const std::string& root, int64_t step) { return join_path(root, fmt::format("step-{:08d}", step)); }

void write_checkpoint(const std::string& root, int64_t step, const CheckpointFiles& files) {
  make_dirs(root);
  const std::string final_dir = checkpoint_path(root, step);
  const std::string tmp = final_dir + ".tmp." + std::to_string(::getpid());
  remove_tree(tmp);
  make_dirs(tmp);
  for (const auto& [name, bytes] : files) write_file_atomic(join_path(tmp, name), bytes);
  remove_tree(final_dir);
  rename_path(tmp, final_dir);
  sync_dir(root);
}

std::vector<int64_t> list_checkpoints(const std::string& root) {
  std::vector<int64_t> steps;
  for (const std::string& name : list_subdirs(root)) {
    if (name.size() != 13 || name.rfind("step-", 0) != 0) continue;
    if (name.find_first_not_of("0123456789", 5) != std::string::npos) continue;
    steps.push_back(std::stoll(name.substr(5)));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

void prune_checkpoints(const std::string& root, int keep) {
  auto steps = list_checkpoints(root);
  for (size_t i = 0; i + static_cast<size_t>(keep) < steps.size(); ++i) remove_tree(checkpoint_path(root, steps[i]));
}

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

}  // namespace amaq::train
