// Where a side computes and in what precision: the --device / --dtype flags, checked with errors
// that name the cause, and the little a trainer needs from a CUDA device (synchronising, peak
// memory). The CUDA parts live in core/cuda/device_cuda.cpp, built only against a libtorch with CUDA.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>

namespace amaq {

/// "cpu", "cuda" (device 0) or "cuda:N". Throws amaq::Error when the name is not one of these, when
/// this build's libtorch has no CUDA, when no GPU is visible, or when N is past the last GPU.
at::Device parse_device(const std::string& name);
/// "fp32" (also "float32") or "bf16" (also "bfloat16").
at::ScalarType parse_dtype(const std::string& name);
/// Both, as the options a model part is built with.
at::TensorOptions compute_options(const std::string& device, const std::string& dtype);
/// "fp32" / "bf16": the flag's spelling of a dtype.
std::string dtype_flag(at::ScalarType t);

/// Whether this build can compute on CUDA at all (its libtorch has CUDA and a GPU is visible).
bool cuda_available();

/// Waits for the device's queued work (nothing on the CPU).
void synchronize(at::Device device);
/// Peak bytes the caching allocator has handed out on a CUDA device since the last reset; -1 on the
/// CPU.
int64_t peak_memory_bytes(at::Device device);
void reset_peak_memory(at::Device device);

/// A step captured once as a CUDA graph and then replayed, as torch.cuda.graph captures a whole
/// training step: one launch instead of hundreds, where a small model's step is bound by the host
/// launching kernels. `fn` runs `warmup` times on a side stream (so that lazily created state, such
/// as gradients and optimizer moments, exists before capture), then once under capture. It must not
/// wait on the host (no .item()), must take its inputs from and leave its outputs in the same tensors
/// each time, and must update gradients in place. replay() runs the captured kernels again on the
/// current stream. Throws amaq::Error on the CPU or without a CUDA build.
class GraphedStep {
 public:
  GraphedStep(at::Device device, const std::function<void()>& fn, int warmup = 3);
  ~GraphedStep();
  GraphedStep(const GraphedStep&) = delete;
  GraphedStep& operator=(const GraphedStep&) = delete;
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace amaq
