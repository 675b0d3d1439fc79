// CUDA kernels of the codecs (see kernels.h). Built with --fmad=false: the per-element arithmetic
// of quant_math.h must not be contracted into fused multiply-adds, or codes would differ from the
// CPU paths near rounding boundaries.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "quant/cuda/kernels.h"
#include "quant/quant_math.h"

namespace amaq::quant::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float half_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

// As half_bits_rounded on the CPU: __float2half_rn rounds to nearest even like c10::Half.
__device__ __forceinline__ uint16_t half_rounded(float v, bool up) {
  const __half h = __float2half_rn(v);
  return nudge_half(__half_as_ushort(h), __half2float(h), v, up);
}

struct Groups {
  RangeLayout r;
  int64_t cols;
  __device__ __forceinline__ int64_t per_row() const { return r.granularity == 3 ? (cols + r.group - 1) / r.group : 1; }
  __device__ __forceinline__ int64_t of(int64_t row, int64_t c) const {
    switch (r.granularity) {
      case 2:
        return c;
      case 3:
        return row * per_row() + c / r.group;
      default:
        return row;
    }
  }
};

// ---- ranges ----------------------------------------------------------------------------------

// Folds v into a thread's running min, max, max |v| and NaN/Inf count (the first bad index kept).
struct MinMax {
  float mn = INFINITY, mx = -INFINITY, amax = 0.0f;
  unsigned long long bad = 0, first = ~0ull;
  __device__ __forceinline__ void add(float v, int64_t i) {
    if (fabsf(v) <= 3.402823466e+38f) {
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
      amax = fmaxf(amax, fabsf(v));
    } else {
      ++bad;
      first = min(first, static_cast<unsigned long long>(i));
    }
  }
  __device__ __forceinline__ void warp_reduce() {
    for (int off = 16; off > 0; off /= 2) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      bad += __shfl_xor_sync(0xffffffffu, bad, off);
      first = min(first, __shfl_xor_sync(0xffffffffu, first, off));
    }
  }
  // One lane per warp publishes the tensor-wide part: max |x| and the NaN/Inf count.
  __device__ __forceinline__ void publish(MaxAbs* stats) const {
    atomicMax(&stats->max_bits, __float_as_uint(amax));  // non-negative floats order like their bits
    if (bad) {
      atomicAdd(&stats->bad, bad);
      atomicMin(&stats->first_bad, first);
    }
  }
};

// Token and group granularity: one warp per range group (a run of channels of one row), grid-stride
// over groups; each warp keeps its tensor-wide part and publishes it once.
template <typename T>
__global__ void row_minmax_kernel(const T* x, int64_t rows, int64_t cols, int64_t width, float* mn, float* mx,
                                  MaxAbs* stats) {
  const int lane = threadIdx.x & 31;
  const int64_t per_row = (cols + width - 1) / width, groups = rows * per_row;
  const int64_t warp0 = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32,
                warps = gridDim.x * int64_t{blockDim.x} / 32;
  MinMax all;
  for (int64_t g = warp0; g < groups; g += warps) {
    const int64_t row = g / per_row, c0 = (g - row * per_row) * width, c1 = min(cols, c0 + width);
    MinMax m;
    for (int64_t c = c0 + lane; c < c1; c += 32) m.add(to_float(x[row * cols + c]), row * cols + c);
    m.warp_reduce();
    if (lane == 0) {
      mn[g] = m.mn;
      mx[g] = m.mx;
    }
    all.amax = fmaxf(all.amax, m.amax);
    all.bad += m.bad;
    all.first = min(all.first, m.first);
  }
  if (lane == 0) all.publish(stats);
}

// Channel granularity: a block of 32 channels x 8 row lanes reduces its channels over every row.
template <typename T>
__global__ void channel_minmax_kernel(const T* x, int64_t rows, int64_t cols, float* mn, float* mx, MaxAbs* stats) {
  __shared__ float smn[8][33], smx[8][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x / 32;
  const int64_t c = blockIdx.x * int64_t{32} + tx;
  MinMax m;
  if (c < cols)
    for (int64_t r = ty; r < rows; r += 8) m.add(to_float(x[r * cols + c]), r * cols + c);
  smn[ty][tx] = m.mn;
  smx[ty][tx] = m.mx;
  __syncthreads();
  if (ty == 0 && c < cols) {
    float a = smn[0][tx], b = smx[0][tx];
    for (int k = 1; k < 8; ++k) {
      a = fminf(a, smn[k][tx]);
      b = fmaxf(b, smx[k][tx]);
    }
    mn[c] = a;
    mx[c] = b;
  }
  m.warp_reduce();
  if (tx == 0) m.publish(stats);
}

// The tensor scale: the power of two pow2_scale makes of max |x|, as affine.cpp's.
__device__ __forceinline__ float scale_of(const MaxAbs* stats) {
  return pow2_scale(__uint_as_float(stats->max_bits));
}

// Each group's range as the packet's interleaved fp16 (lo, hi) pair relative to the scale: the min
// rounded down, the max rounded up.
__global__ void finish_ranges_kernel(const float* mn, const float* mx, int64_t groups, const MaxAbs* stats,
                                     uint16_t* pairs) {
  const float scale = scale_of(stats);
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    pairs[2 * g] = half_rounded(mn[g] / scale, false);
    pairs[2 * g + 1] = half_rounded(mx[g] / scale, true);
  }
}

// ---- packing ---------------------------------------------------------------------------------

// One thread per output word: finds the first code that touches the word's 32 bits and ORs in every
// code that does, so no atomics and no zeroing are needed. A code that straddles two words is
// computed by both threads; `owner` is true only for the thread whose word holds its first bit.
template <typename CodeFn>
__global__ void pack_words_kernel(PackLayout p, int64_t row_bits, int64_t total_bits, int64_t n_words, CodeFn code_of,
                                  uint32_t* out) {
  for (int64_t w = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; w < n_words; w += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p0 = w * 32, p1 = min(p0 + 32, total_bits);
    int64_t r = p0 / row_bits;
    const int64_t o = p0 - r * row_bits;
    int64_t lo = 0, hi = p.cols - 1;  // the last channel whose offset is <= o
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.offsets[mid] <= o)
        lo = mid;
      else
        hi = mid - 1;
    }
    int64_t c = lo;
    uint64_t word = 0;
    for (int64_t base = r * row_bits + p.offsets[c]; base < p1;) {
      const int b = p.bits[c];
      const uint64_t code = code_of(r, c, base >= p0) & ((1u << b) - 1);
      word |= base >= p0 ? code << (base - p0) : code >> (p0 - base);
      if (++c == p.cols) {
        c = 0;
        if (++r == p.rows) break;
      }
      base = r * row_bits + p.offsets[c];
    }
    out[w] = static_cast<uint32_t>(word);  // bits past 32 belong to the next word
  }
}

// One block per (row, run of kPackChunk channels): the run's packed words are staged in shared
// memory with coalesced loads, then each thread takes its channels' codes from there and calls
// store(r, c, code).
constexpr int kUnpackChunk = 1024;

template <typename StoreFn>
__global__ void unpack_kernel(const uint8_t* packed, int64_t nbytes, PackLayout p, int64_t row_bits, StoreFn store) {
  __shared__ uint32_t sh[kUnpackChunk * 8 / 32 + 2];
  const int64_t chunks = (p.cols + kUnpackChunk - 1) / kUnpackChunk;
  const auto* words = reinterpret_cast<const uint32_t*>(packed);  // 4-byte aligned by the callers
  for (int64_t blk = blockIdx.x; blk < p.rows * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks, c0 = (blk - row * chunks) * kUnpackChunk, c1 = min(p.cols, c0 + kUnpackChunk);
    const int64_t w0 = (row * row_bits + p.offsets[c0]) / 32;
    const int nw = static_cast<int>((row * row_bits + p.offsets[c1] + 31) / 32 - w0);
    for (int i = threadIdx.x; i < nw; i += blockDim.x) {
      const int64_t w = w0 + i;
      if (4 * w + 4 <= nbytes) {
        sh[i] = words[w];
      } else {  // the stream's last, partial word
        uint32_t v = 0;
        for (int64_t k = 4 * w; k < nbytes; ++k) v |= static_cast<uint32_t>(packed[k]) << (8 * (k - 4 * w));
        sh[i] = v;
      }
    }
    __syncthreads();
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      const int64_t pos = row * row_bits + p.offsets[c] - w0 * 32;
      const int k = static_cast<int>(pos >> 5), shift = static_cast<int>(pos & 31);
      uint64_t v = sh[k];
      if (k + 1 < nw) v |= static_cast<uint64_t>(sh[k + 1]) << 32;
      store(row, c, static_cast<uint8_t>((v >> shift) & ((1u << p.bits[c]) - 1)));
    }
    __syncthreads();
  }
}

// Affine quantize + pack: one block per (row, run of kPackChunk channels). Each thread quantizes its
// channels and ORs the codes into the block's words in shared memory; the block then stores its
// words, with an atomic OR for the first and last (which a neighbouring block may share), so the
// output must start zeroed. Optionally writes each value as the receiver will decode it.
constexpr int kPackChunk = 1024;

template <typename T>
__global__ void affine_pack_kernel(const T* x, PackLayout p, Groups g, const MaxAbs* stats, const uint16_t* pairs,
                                   Rounding rounding, uint64_t seed, uint32_t* words, T* decoded) {
  __shared__ uint32_t sh[kPackChunk * 8 / 32 + 2];
  const int64_t chunks = (p.cols + kPackChunk - 1) / kPackChunk;
  const float scale = scale_of(stats);
  for (int64_t blk = blockIdx.x; blk < p.rows * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks, c0 = (blk - row * chunks) * kPackChunk, c1 = min(p.cols, c0 + kPackChunk);
    const int64_t w0 = (row * p.row_bits + p.offsets[c0]) / 32;
    const int nw = static_cast<int>((row * p.row_bits + p.offsets[c1] + 31) / 32 - w0);
    for (int i = threadIdx.x; i < nw; i += blockDim.x) sh[i] = 0;
    __syncthreads();
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      const int64_t k = g.of(row, c), i = row * p.cols + c;
      const float lo = half_to_float(pairs[2 * k]) * scale, hi = half_to_float(pairs[2 * k + 1]) * scale;
      const int b = p.bits[c];
      const float step = step_of(lo, hi, b);
      const uint32_t code = quantize_one(to_float(x[i]), lo, step, b, rounding, seed, static_cast<uint64_t>(i));
      if (decoded) decoded[i] = from_float<T>(dequantize_one(static_cast<uint8_t>(code), lo, step));
      const int64_t pos = row * p.row_bits + p.offsets[c] - w0 * 32;
      const int shift = static_cast<int>(pos & 31);
      atomicOr(&sh[pos >> 5], code << shift);
      if (shift + b > 32) atomicOr(&sh[(pos >> 5) + 1], code >> (32 - shift));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nw; i += blockDim.x) {
      if (i == 0 || i == nw - 1)
        atomicOr(&words[w0 + i], sh[i]);
      else
        words[w0 + i] = sh[i];
    }
    __syncthreads();
  }
}

template <typename T>
struct AffineStore {
  T* out;
  Groups g;
  const uint16_t* pairs;
  const uint8_t* bits;
  float scale;
  __device__ void operator()(int64_t r, int64_t c, uint8_t code) const {
    const int64_t k = g.of(r, c);
    const float lo = half_to_float(pairs[2 * k]) * scale, hi = half_to_float(pairs[2 * k + 1]) * scale;
    out[r * g.cols + c] = from_float<T>(dequantize_one(code, lo, step_of(lo, hi, bits[c])));
  }
};

struct SymCode {
  const float* d;
  const float* steps;
  float* m;
  int64_t T, cols;
  int levels;
  __device__ uint32_t operator()(int64_t r, int64_t c, bool owner) const {
    const int64_t i = r * cols + c;
    const float step = steps[(r / T) * cols + c];
    const float q = sym_level(d[i], step, levels);
    if (owner) m[i] += q * step;
    return static_cast<uint32_t>(q + static_cast<float>(levels));
  }
};

struct SymAccumulate {
  const float* steps;
  float* m;
  int64_t T, cols;
  int levels;
  unsigned long long* bad;
  __device__ void operator()(int64_t r, int64_t c, uint8_t code) const {
    if (code > 2 * levels) {
      atomicAdd(bad, 1ull);
      return;
    }
    m[r * cols + c] += static_cast<float>(code - levels) * steps[(r / T) * cols + c];
  }
};

template <typename CodeFn>
cudaError_t launch_pack(const PackLayout& p, CodeFn fn, uint32_t* out, cudaStream_t s) {
  const int64_t rb = p.row_bits, total = p.rows * rb, words = (total + 31) / 32;
  if (words == 0) return cudaGetLastError();
  pack_words_kernel<<<blocks_for(words), kThreads, 0, s>>>(p, rb, total, words, fn, out);
  return cudaGetLastError();
}

template <typename StoreFn>
cudaError_t launch_unpack(const uint8_t* packed, int64_t nbytes, const PackLayout& p, StoreFn fn, cudaStream_t s) {
  if (p.rows == 0 || p.cols == 0) return cudaGetLastError();
  const int64_t rb = p.row_bits;
  if ((p.rows * rb + 7) / 8 > nbytes) return cudaErrorInvalidValue;
  const int64_t blocks = std::min(p.rows * ((p.cols + kUnpackChunk - 1) / kUnpackChunk), kMaxBlocks);
  unpack_kernel<<<static_cast<int>(blocks), kThreads, 0, s>>>(packed, nbytes, p, rb, fn);
  return cudaGetLastError();
}

}  // namespace

cudaError_t affine_minmax(const void* x, DType t, int64_t rows, int64_t cols, RangeLayout r, float* mn, float* mx,
                          MaxAbs* stats, cudaStream_t s) {
  cudaMemsetAsync(stats, 0, sizeof(MaxAbs), s);
  cudaMemsetAsync(&stats->first_bad, 0xff, sizeof(stats->first_bad), s);
  if (rows == 0 || cols == 0) return cudaGetLastError();
  const auto run = [&](auto* xt) {
    if (r.granularity == 2) {
      channel_minmax_kernel<<<static_cast<int>((cols + 31) / 32), kThreads, 0, s>>>(xt, rows, cols, mn, mx, stats);
    } else {
      const int64_t width = r.granularity == 3 ? r.group : cols, groups = rows * ((cols + width - 1) / width);
      const int64_t blocks = std::min<int64_t>((groups + kThreads / 32 - 1) / (kThreads / 32), 2048);
      row_minmax_kernel<<<static_cast<int>(blocks), kThreads, 0, s>>>(xt, rows, cols, width, mn, mx, stats);
    }
  };
  if (t == DType::kF32)
    run(static_cast<const float*>(x));
  else
    run(static_cast<const __nv_bfloat16*>(x));
  return cudaGetLastError();
}

cudaError_t affine_finish_ranges(const float* mn, const float* mx, int64_t groups, const MaxAbs* stats, uint16_t* pairs,
                                 cudaStream_t s) {
  if (groups == 0) return cudaGetLastError();
  finish_ranges_kernel<<<blocks_for(groups), kThreads, 0, s>>>(mn, mx, groups, stats, pairs);
  return cudaGetLastError();
}

cudaError_t affine_quantize_pack(const void* x, DType t, const PackLayout& p, RangeLayout r, const MaxAbs* stats,
                                 const uint16_t* pairs, int rounding, uint64_t seed, uint32_t* words, void* decoded,
                                 cudaStream_t s) {
  const int64_t nwords = (p.rows * p.row_bits + 31) / 32;
  if (nwords > 0) cudaMemsetAsync(words, 0, static_cast<size_t>(nwords) * 4, s);
  if (p.rows == 0 || p.cols == 0) return cudaGetLastError();
  const Groups g{r, p.cols};
  const auto rnd = static_cast<Rounding>(rounding);
  const int blocks = static_cast<int>(std::min(p.rows * ((p.cols + kPackChunk - 1) / kPackChunk), kMaxBlocks));
  if (t == DType::kF32) {
    affine_pack_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const float*>(x), p, g, stats, pairs, rnd, seed, words,
                                                   static_cast<float*>(decoded));
  } else {
    affine_pack_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), p, g, stats, pairs, rnd, seed,
                                                   words, static_cast<__nv_bfloat16*>(decoded));
  }
  return cudaGetLastError();
}

cudaError_t affine_unpack_dequantize(const uint8_t* packed, int64_t nbytes, const PackLayout& p, RangeLayout r,
                                     float scale, const uint16_t* pairs, void* out, DType t, cudaStream_t s) {
  const Groups g{r, p.cols};
  if (t == DType::kF32)
    return launch_unpack(packed, nbytes, p, AffineStore<float>{static_cast<float*>(out), g, pairs, p.bits, scale}, s);
  return launch_unpack(packed, nbytes, p,
                       AffineStore<__nv_bfloat16>{static_cast<__nv_bfloat16*>(out), g, pairs, p.bits, scale}, s);
}

cudaError_t sym_quantize_pack(const float* d, const float* steps, int64_t T, int levels, const PackLayout& p, float* m,
                              uint32_t* out, cudaStream_t s) {
  return launch_pack(p, SymCode{d, steps, m, T, p.cols, levels}, out, s);
}

cudaError_t sym_unpack_accumulate(const uint8_t* packed, int64_t nbytes, const float* steps, int64_t T, int levels,
                                  const PackLayout& p, float* m, unsigned long long* bad, cudaStream_t s) {
  return launch_unpack(packed, nbytes, p, SymAccumulate{steps, m, T, p.cols, levels, bad}, s);
}

}  // namespace amaq::quant::cuda
