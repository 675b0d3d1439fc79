// CUDA kernels of the codecs, over raw device pointers and a stream. Nothing here includes torch, so
// this part builds with nvcc wherever CUDA is installed (CI included); the ATen glue that calls it
// (quant/cuda/codec_cuda.cpp) is built only against a libtorch that has CUDA.
//
// Every kernel computes what the reference CPU path computes, with the same fp32 operations from
// quant_math.h, and packs codes in the bit stream of bitpack.h: row by row, channel by channel,
// least significant bit first, no padding.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace amaq::quant::cuda {

enum class DType : int { kF32 = 0, kBF16 = 1 };

/// Where codes sit in the packed stream: channel c is bits[c] wide and starts offsets[c] bits into
/// its row; row_bits = offsets[cols] is the row's bit count.
struct PackLayout {
  int64_t rows = 0, cols = 0, row_bits = 0;
  const uint8_t* bits = nullptr;     ///< device, (cols,)
  const int64_t* offsets = nullptr;  ///< device, (cols + 1,)
};

/// Affine range groups: the Granularity values of affine.h (1 token, 2 channel, 3 group of g).
struct RangeLayout {
  int granularity = 1;
  int64_t group = 0;
};

struct MaxAbs {
  unsigned int max_bits;         ///< the largest finite |x|, as float bits
  unsigned long long bad;        ///< NaN/Inf values
  unsigned long long first_bad;  ///< smallest flat index of one (~0ull when none)
};

// An affine (fixed/amaq) encode is three launches on one stream with no host round trip between
// them: affine_minmax, affine_finish_ranges, affine_quantize_pack. The tensor scale (max |x|, 1 when
// that is 0) stays on the device in `stats` until the caller copies everything back at once.

/// Resets `stats`, then per range group the min and max of x (rows, cols) into mn, mx (groups,), and
/// into stats the tensor's max |x| and its NaN/Inf count (NaN/Inf are left out of the ranges).
cudaError_t affine_minmax(const void* x, DType t, int64_t rows, int64_t cols, RangeLayout r, float* mn, float* mx,
                          MaxAbs* stats, cudaStream_t s);

/// The packet's ranges: per group g, pairs[2g] = mn/scale rounded down and pairs[2g+1] = mx/scale
/// rounded up to fp16 (bits), with the scale of stats.
cudaError_t affine_finish_ranges(const float* mn, const float* mx, int64_t groups, const MaxAbs* stats, uint16_t* pairs,
                                 cudaStream_t s);

/// Fused quantize + pack into ceil(packed bytes / 4) little-endian words (zeroed first; the tail of the
/// last word stays zero). With `decoded` non-null, also writes each value as the receiver decodes it
/// ((rows, cols) of type t).
cudaError_t affine_quantize_pack(const void* x, DType t, const PackLayout& p, RangeLayout r, const MaxAbs* stats,
                                 const uint16_t* pairs, int rounding, uint64_t seed, uint32_t* words, void* decoded,
                                 cudaStream_t s);

/// Fused unpack + dequantize of `nbytes` packed bytes (4-byte aligned, as every unpacking kernel reads
/// them) into (rows, cols) values of type t, with the packet's interleaved fp16 (lo, hi) pairs (device)
/// and scale.
cudaError_t affine_unpack_dequantize(const uint8_t* packed, int64_t nbytes, const PackLayout& p, RangeLayout r,
                                     float scale, const uint16_t* pairs, void* out, DType t, cudaStream_t s);

/// AQ-SGD sender, fused: for the deltas d (rows, cols) fp32 of samples of T rows each, with one step per
/// (sample, channel), packs sym_level(d / step) + levels and adds level * step to the memory m (rows, cols).
cudaError_t sym_quantize_pack(const float* d, const float* steps, int64_t T, int levels, const PackLayout& p, float* m,
                              uint32_t* out, cudaStream_t s);

/// AQ-SGD receiver, fused: unpacks the codes and adds (code - levels) * step to the memory m. Codes above
/// 2 * levels are counted into *bad (a malformed packet) and leave m unchanged.
cudaError_t sym_unpack_accumulate(const uint8_t* packed, int64_t nbytes, const float* steps, int64_t T, int levels,
                                  const PackLayout& p, float* m, unsigned long long* bad, cudaStream_t s);

}  // namespace amaq::quant::cuda
