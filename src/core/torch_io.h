// Torch state that is not a tensor map: an optimizer's state and the CPU generator, as bytes and
// tensors a checkpoint can hold.
#pragma once
#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>

#include <mutex>
#include <string>

namespace amaq {

/// An optimizer's state (torch's archive format) as bytes, and back into an optimizer built over
/// the same parameters in the same order. `what` names the source in errors.
std::string optimizer_bytes(torch::optim::Optimizer& opt);
void load_optimizer(torch::optim::Optimizer& opt, const std::string& bytes, const std::string& what);

/// Torch's CPU generator is process-wide: code that seeds it and draws (LoRA init), or saves and
/// restores it, holds this.
std::mutex& rng_mutex();
/// The CPU generator's state (uint8 tensor), and restoring it.
at::Tensor cpu_rng_state();
void set_cpu_rng_state(const at::Tensor& state);

}  // namespace amaq
