#include "train/checkpoint.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace amaq::train {

std::string checkpoint_path(const std::string& root, int64_t step) {
  return join_path(root, fmt::format("step-{:08d}", step));
}

void write_checkpoint(const std::string& root, int64_t step, const CheckpointFiles& files) {
  make_dirs(root);
  remove_stale_temps(root);
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

int remove_stale_temps(const std::string& root) {
  int removed = 0;
  for (const std::string& name : list_subdirs(root)) {
    // step-NNNNNNNN.tmp.PID, as write_checkpoint names them
    if (name.size() <= 18 || name.rfind("step-", 0) != 0 || name.compare(13, 5, ".tmp.") != 0) continue;
    const std::string pid_text = name.substr(18);
    if (pid_text.find_first_not_of("0123456789") != std::string::npos || pid_text.size() > 9) continue;
    const auto pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid <= 0 || pid == ::getpid()) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
    remove_tree(join_path(root, name));
    ++removed;
  }
  return removed;
}

namespace {
constexpr const char* kTailPrefix = "tail.";
}  // namespace

void save_side_checkpoint(const std::string& root, int64_t step, Side& side, quant::Link& link, nlohmann::json fields,
                          int keep, quant::Link* tail_link) {
  quant::LinkState ls = link.state();
  NamedTensors tensors = side.state();
  tensors.insert(tensors.end(), ls.tensors.begin(), ls.tensors.end());
  {
    std::lock_guard<std::mutex> lock(rng_mutex());
    tensors.emplace_back("rng", cpu_rng_state());
  }
  fields.update(ls.fields);
  CheckpointFiles files = std::move(ls.files);
  if (tail_link) {
    quant::LinkState tail = tail_link->state();
    for (auto& [name, t] : tail.tensors) tensors.emplace_back(kTailPrefix + name, t);
    for (auto& [name, bytes] : tail.files) files[kTailPrefix + name] = std::move(bytes);
    fields["tail_link"] = tail.fields;
  }
  files["state.safetensors"] = safetensors_bytes(tensors);
  files["optim.pt"] = optimizer_bytes(*side.opt);
  files["state.json"] = fields.dump(2);
  write_checkpoint(root, step, files);
  prune_checkpoints(root, keep);
}

nlohmann::json load_side_checkpoint(const std::string& dir, Side* side, quant::Link& link, quant::Link* tail_link) {
  const std::string state_file = join_path(dir, "state.json");
  nlohmann::json fields = parse_state_file(read_file(state_file), state_file);
  auto tensors = load_safetensors(join_path(dir, "state.safetensors"));
  if (side) {
    side->load_state(tensors, dir);
    load_optimizer(*side->opt, read_file(join_path(dir, "optim.pt")), dir);
  }
  const quant::Link::FileReader read = [&](const std::string& name) -> std::optional<std::string> {
    const std::string path = join_path(dir, name);
    if (!file_exists(path)) return std::nullopt;
    return read_file(path);
  };
  link.load_state(tensors, read, fields, dir);
  if (tail_link) {
    if (!fields.contains("tail_link") || !fields["tail_link"].is_object()) {
      throw Error(join_path(dir, "state.json") + " holds no \"tail_link\"",
                  "the checkpoint is from a run without a tail split: resume it without --tail-split");
    }
    std::map<std::string, at::Tensor> tail;
    for (const auto& [name, t] : tensors)
      if (name.rfind(kTailPrefix, 0) == 0) tail.emplace(name.substr(std::strlen(kTailPrefix)), t);
    const quant::Link::FileReader read_tail = [&](const std::string& name) { return read(kTailPrefix + name); };
    tail_link->load_state(tail, read_tail, fields["tail_link"], dir);
  }
  auto rng = tensors.find("rng");
  if (rng == tensors.end()) {
    throw Error(dir + " holds no generator state", "the checkpoint is incomplete: resume from an earlier one");
  }
  {
    std::lock_guard<std::mutex> lock(rng_mutex());
    set_cpu_rng_state(rng->second);
  }
  return fields;
}

}  // namespace amaq::train
