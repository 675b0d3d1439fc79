// Asymmetric min/max quantization with a bit-width per channel, shared by the `fixed` and `amaq`
// codecs. Ranges are kept per token, per channel, or per (token, group of g channels).
//
// Exactness contract: a group's range is stored as two fp16 numbers relative to one fp32 tensor
// scale, a power of two (pow2_scale; lo rounded down, hi rounded up, so the range still covers the
// data), and every side
// computes step = (hi - lo) / (2^b - 1) and x' = lo + code * step from those stored numbers in the
// same fp32 operations. So the value the sender's fake-quant uses is bit for bit what the receiver
// decodes. The relative fp16 ranges survive outliers above fp16's 65504 and gradients below 6e-5.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "quant/quant_math.h"

namespace amaq::quant {

enum class Granularity : uint8_t { kToken = 1, kChannel = 2, kGroup = 3 };

struct AffineLayout {
  int64_t rows = 0, cols = 0;
  Granularity granularity = Granularity::kToken;
  int64_t group = 0;  // channels per group, kGroup only

  int64_t groups_per_row() const { return granularity == Granularity::kGroup ? (cols + group - 1) / group : 1; }
  int64_t num_groups() const { return granularity == Granularity::kChannel ? cols : rows * groups_per_row(); }
  int64_t group_of(int64_t r, int64_t c) const {
    switch (granularity) {
      case Granularity::kToken:
        return r;
      case Granularity::kChannel:
        return c;
      case Granularity::kGroup:
        return r * groups_per_row() + c / group;
    }
    return 0;
  }
};

/// What crosses the wire for one tensor.
struct AffineQuant {
  at::Tensor codes;  // (rows, cols) uint8
  at::Tensor lo;     // (num_groups,) fp16, relative to scale
  at::Tensor hi;     // (num_groups,) fp16, relative to scale
  float scale = 1.0f;
};

/// Reference: scalar loops in the most direct form. x (rows, cols) fp32.
AffineQuant affine_quantize_ref(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout,
                                Rounding rounding, uint64_t seed);
at::Tensor affine_dequantize_ref(const AffineQuant& q, const at::Tensor& bits, const AffineLayout& layout);

/// Fast CPU path: the same arithmetic, multi-threaded over rows (or columns for per-channel ranges).
/// With nearest rounding and range groups along rows (token, group), one pass over x, 16 rows at a
/// time while they are in cache: their ranges (and the NaN/Inf), fp16 bounds, codes and, when
/// `decoded` is given, the decoded values (what affine_dequantize returns); a block with groups
/// below fp16's normal range relative to the tensor's scale is encoded again once the scale is
/// known. The inner loops are compiled for AVX-512, AVX2 and plain x86-64 and chosen at run time.
/// rotation_block > 0 (nearest rounding, group ranges of that size, a power of two): each group is
/// Hadamard-rotated in cache (rotation.h) before its range and codes, and `decoded` is rotated back:
/// bit for bit what block_hadamard, this function and block_hadamard_ of the decoded copy give,
/// without the rotated copy (and NaN/Inf are named where they are in x).
/// `packed` (packed_bytes(rows, bits) bytes): the codes are written there as pack_fast packs them,
/// on that path a few rows at a time as they are computed, and q.codes stays undefined.
/// `gate_slope`, on the one-pass path only (else left undefined): each value's term of AMAQ's gate
/// gradient, (code - u) * dstep/db as (rows, cols) fp32, what fake_quant would compute from the
/// codes with tensor operations (bit for bit), computed while the values are in cache.
AffineQuant affine_quantize(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed, at::Tensor* decoded = nullptr, int64_t rotation_block = 0,
                            uint8_t* packed = nullptr, at::Tensor* gate_slope = nullptr);
/// rotation_block > 0 (group ranges of that size): each group rotated back in cache, bit for bit
/// block_hadamard_ of the plain result.
at::Tensor affine_dequantize(const AffineQuant& q, const at::Tensor& bits, const AffineLayout& layout,
                             int64_t rotation_block = 0);

/// sum over rows of a * b, two (rows, cols) fp32 CPU tensors, as (cols,) fp32: AMAQ's gate gradient
/// from the upstream gradient and Encoded::gate_slope without their (rows, cols) product. Each
/// column summed in row order within blocks of 64 rows, then the blocks' sums in order: the same
/// on any number of threads and in every CPU version.
at::Tensor column_dots(const at::Tensor& a, const at::Tensor& b);

/// Per-element range start and step (rows, cols) fp32, from the stored ranges: what the gates'
/// gradient needs.
std::pair<at::Tensor, at::Tensor> affine_lo_step(const AffineQuant& q, const at::Tensor& bits,
                                                 const AffineLayout& layout);

/// max |p[i]| over [0, n) (NaN ignored) and how many values are NaN or Inf (non_finite): one
/// thread, the CPU's widest vectors.
float max_abs_run(const float* p, int64_t n, int64_t* non_finite);
/// max |x| over a contiguous fp32 tensor, multi-threaded; throws amaq::Error naming the count and
/// first index of NaN/Inf values.
float checked_max_abs(const at::Tensor& x);
/// The error checked_max_abs (and the CUDA path) throws for `bad` NaN/Inf values of n.
[[noreturn]] void throw_non_finite(int64_t bad, int64_t n, int64_t first);

/// The fp16 value nearest to v, moved one ulp toward -inf (up = false) or +inf (up = true) when
/// needed so that it does not lie above (below) v; returned as its bits.
uint16_t half_bits_rounded(float v, bool up);
float half_bits_to_float(uint16_t h);
/// half_bits_rounded(v[i] / scale, up) into bits[i] for n values, and v[i] replaced by what that
/// decodes to, half_bits_to_float(bits[i]) * scale: eight at a time by F16C where the CPU has it.
void half_bounds(float* v, int64_t n, float scale, bool up, uint16_t* bits);

}  // namespace amaq::quant
