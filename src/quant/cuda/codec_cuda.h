// The ATen side of the CUDA codecs: device tensors in, kernels (kernels.h) on the current stream,
// packet pieces out. Built only when the libtorch in use has CUDA (AMAQ_HAVE_CUDA); codec.cpp
// routes CUDA tensors here and keeps the packet format in one place.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "quant/affine.h"

namespace amaq::quant::cuda {

/// A fixed/amaq tensor quantized on the GPU. What the packet carries after its header (and bit map)
/// comes back in one copy into pinned host memory: the interleaved fp16 (lo, hi) pairs, then the
/// packed codes.
struct AffineEncoded {
  float scale = 1.0f;
  at::Tensor host;  ///< pinned bytes: a stats block, then ranges() and codes()
  int64_t ranges_at = 0, range_bytes = 0, code_bytes = 0;
  at::Tensor lo, hi;   ///< (groups,) fp16 views of the ranges, relative to scale
  at::Tensor decoded;  ///< (rows, cols) on x's device in x's dtype, what the receiver decodes; when asked
  const char* ranges() const { return static_cast<const char*>(host.data_ptr()) + ranges_at; }
  const char* codes() const { return ranges() + range_bytes; }
};

/// x (rows, cols) fp32/bf16/fp16 on a CUDA device; bits (cols,) uint8 on the CPU. Refuses NaN/Inf.
AffineEncoded affine_encode(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed, bool want_decoded);

/// Decodes a packet's ranges and codes (`ranges` host memory: 4 * groups bytes of (lo, hi) pairs, then
/// the packed codes) into (rows, cols) `out_type` values on `device`, in one host-to-device copy. The
/// host bytes may be freed once this returns.
at::Tensor affine_decode(const uint8_t* ranges, int64_t nbytes, float scale, const at::Tensor& bits,
                         const AffineLayout& layout, at::ScalarType out_type, at::Device device);

/// AQ-SGD sender: packs the symmetric codes of the deltas d (rows, C) fp32 on the GPU, with one step per
/// (sample of T rows, channel) in steps (samples, C) fp32, and adds the dequantized deltas into m.
std::string sym_encode(const at::Tensor& d, const at::Tensor& steps, int64_t T, int bits, at::Tensor& m);

/// AQ-SGD receiver: adds the dequantized deltas of `packed` into m (rows, C) fp32 on the GPU; steps on the CPU.
/// Throws PacketError for a code above 2 * levels.
void sym_decode(const uint8_t* packed, int64_t nbytes, const at::Tensor& steps, int64_t T, int bits, at::Tensor& m);

}  // namespace amaq::quant::cuda
