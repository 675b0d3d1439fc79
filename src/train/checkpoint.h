// Checkpoints: a directory `ROOT/step-NNNNNNNN/` of files that appears all at once. Every file is
// written and fsynced inside `step-NNNNNNNN.tmp.PID/`, which is then renamed into place, so a crash
// at any moment leaves either the whole checkpoint or none of it.
#pragma once
#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>

#include <map>
#include <string>
#include <vector>

namespace amaq::train {

using CheckpointFiles = std::map<std::string, std::string>;  // file name -> bytes

std::string checkpoint_path(const std::string& root, int64_t step);
/// Writes `files` as the checkpoint of `step` (replacing one of the same step).
void write_checkpoint(const std::string& root, int64_t step, const CheckpointFiles& files);
/// Complete checkpoints under `root`, ascending by step (missing root: none).
std::vector<int64_t> list_checkpoints(const std::string& root);
/// Removes all but the newest `keep` checkpoints.
void prune_checkpoints(const std::string& root, int keep);

/// An optimizer's state (torch's archive format) as bytes, and back into an optimizer built over
/// the same parameters in the same order.
std::string optimizer_bytes(torch::optim::Optimizer& opt);
void load_optimizer(torch::optim::Optimizer& opt, const std::string& bytes, const std::string& what);

/// The CPU generator's state (uint8 tensor), and restoring it.
at::Tensor cpu_rng_state();
void set_cpu_rng_state(const at::Tensor& state);

}  // namespace amaq::train
