// The product of a frozen linear layer, y = x W^T (+ b), with its backward dx = dy W. On the CPU in
// fp32 it runs through oneDNN's matmul (where the build found it: Debian's libdnnl-dev), which on
// this 2-core AVX-512 machine computes these shapes at ~500 GFLOP/s against OpenBLAS's ~240: a
// LoRA step is mostly such products. Elsewhere (other dtypes, CUDA, trainable weights, builds
// without oneDNN) it is at::linear. Both give the same values up to float summation order.
#pragma once
#include <ATen/ATen.h>

namespace amaq::functional {

/// x (..., in), weight (out, in) not requiring grad, bias (out) or undefined -> (..., out).
/// Differentiable in x.
at::Tensor frozen_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

/// Whether frozen_linear(x, weight, bias) takes the oneDNN path.
bool frozen_linear_uses_onednn(const at::Tensor& x, const at::Tensor& weight);

}  // namespace amaq::functional
