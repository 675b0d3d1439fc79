// Non-uniform levels for the `fixed` codec (`fixed:bits=B,levels=nf|lloyd`): each range group has
// one step, and an element's code picks the nearest of 2^B levels (in units of that step) from a
// codebook the packet carries. The step is the group's max |x|, so nothing is clipped:
//   nf     QLoRA's NormalFloat levels (quantiles of N(0, 1), an exact zero, scaled to [-1, 1]): a
//          fixed codebook, made for the maxima of normally distributed groups.
//   lloyd  the codebook fitted to the tensor by Lloyd's algorithm (each element to its nearest
//          level, then each level to the mean of its cell, weighted by the groups' squared steps: the
//          squared error of x itself), from NormalFloat, on a fixed sample of the elements. The
//          mean squared error is then (locally) the least any 2^B levels reach over these steps: on
//          N(0, 1) at most 3% above the Lloyd-Max quantizer's (Max, 1960), on heavy tails far below
//          uniform levels', which spend most of their levels on the empty space the outliers open.
//
// Body (after the packet header, flag kFlagLevels, `bits` the width, `scale` the steps' multiplier,
// and the dims):
//   2^bits x f32       the levels, ascending, in units of a group's step
//   groups x fp16      each group's step relative to `scale` (finite, not negative)
//   codes              packed (bitpack.h) or entropy-coded (kFlagEntropy) as for uniform levels
// Decoding is x' = level[code] * (step16 * scale), the same fp32 operations on every side.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "quant/affine.h"

namespace amaq::quant {

enum class LevelKind : uint8_t { kUniform = 0, kNormalFloat = 1, kLloyd = 2 };

/// QLoRA's NormalFloat levels for 2^bits codes (bits 2..8), ascending in [-1, 1], 0 among them.
std::vector<float> normal_float_levels(int bits);

struct LevelQuant {
  std::vector<float> levels;   ///< 2^bits, ascending
  std::vector<uint16_t> step;  ///< one fp16 per range group, relative to scale
  float scale = 1.0f;
  at::Tensor codes;  ///< (rows, cols) uint8
};

/// Quantizes x (rows, cols) fp32 contiguous with range groups along rows (Granularity::kToken or
/// kGroup). `fast`: multi-threaded, the code search vectorised (AMAQ_MULTIVERSION); otherwise the
/// plain reference loops. Both write the same levels, steps and codes. `decoded`, when given,
/// receives what level_dequantize will return. `packed`, when given (fast only), receives the codes
/// packed at `bits` (packed_bytes of them, as pack_fast writes) and `codes` stays undefined.
LevelQuant level_quantize(const at::Tensor& x, const AffineLayout& layout, LevelKind kind, int bits, bool fast,
                          at::Tensor* decoded = nullptr, uint8_t* packed = nullptr);

/// x' (rows, cols) fp32 from the codes, levels and steps.
at::Tensor level_dequantize(const LevelQuant& q, const AffineLayout& layout);

}  // namespace amaq::quant
