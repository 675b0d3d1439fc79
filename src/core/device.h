// Where a side computes and in what precision: the --device / --dtype flags, checked with errors
// that name the cause, and the little a trainer needs from a CUDA device (synchronising, peak
// memory). The CUDA parts live in core/cuda/device_cuda.cpp, built only against a libtorch with CUDA.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace amaq
