// The orthonormal block Hadamard transform applied before quantizing (`rot=hadamard` on fixed and
// amaq; QuaRot, QuEST): each run of `block` channels (a power of two) is multiplied by the
// Walsh-Hadamard matrix H / sqrt(block). H / sqrt(block) is symmetric and its own inverse, so the
// receiver undoes it with the same call. An outlier channel is spread over its block, so the block's
// range no longer has to stretch around it; per-channel widths (amaq) then apply to rotated
// coordinates (docs/amaq.md).
#pragma once
#include <ATen/ATen.h>

namespace amaq::quant {

/// x (..., C) with C a multiple of `block`, a power of two: the fast Walsh-Hadamard transform of
/// every block of the last dimension, in fp32, on x's device. Returns fp32. On the CPU a loop that
/// keeps each block in cache; elsewhere block_hadamard_ops. Both give the same bits.
at::Tensor block_hadamard(const at::Tensor& x, int64_t block);

/// The same in place where y is contiguous fp32 on the CPU (else y becomes block_hadamard(y)): for a
/// tensor the caller owns, such as a decoded one, without a copy.
void block_hadamard_(at::Tensor& y, int64_t block);

/// The same as log2(block) butterfly passes of tensor ops (any device; CUDA uses it).
at::Tensor block_hadamard_ops(const at::Tensor& x, int64_t block);

/// The same by an explicit matrix product with Sylvester's construction: the slow reference.
at::Tensor block_hadamard_ref(const at::Tensor& x, int64_t block);

/// `count` consecutive blocks of `block` floats (a power of two) from src into dst, which may be
/// src; what block_hadamard does to each block, bit for bit. One thread.
void hadamard_blocks(const float* src, float* dst, int64_t count, int64_t block);

bool is_power_of_two(int64_t n);

}  // namespace amaq::quant
