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

// ---- max |x| -------------------------------------------------------------------------------

template <typename T>
__global__ void max_abs_kernel(const T* x, int64_t n, MaxAbs* out) {
  float m = 0.0f;
  unsigned long long bad = 0, first = ~0ull;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float a = fabsf(to_float(x[i]));
    if (a <= 3.402823466e+38f) {
      m = fmaxf(m, a);
    } else {  // NaN or Inf
      ++bad;
      first = min(first, static_cast<unsigned long long>(i));
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, off));
    bad += __shfl_down_sync(0xffffffffu, bad, off);
    first = min(first, __shfl_down_sync(0xffffffffu, first, off));
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMax(&out->max_bits, __float_as_uint(m));  // non-negative floats order like their bits
    if (bad) {
      atomicAdd(&out->bad, bad);
      atomicMin(&out->first_bad, first);
    }
  }
}

// ---- affine ranges ---------------------------------------------------------------------------

// One block per (row, run of channels sharing a range): token and group granularity.
template <typename T>
__global__ void row_ranges_kernel(const T* x, int64_t rows, int64_t cols, Groups g, float scale, uint16_t* lo16,
                                  uint16_t* hi16) {
  __shared__ float smin[32], smax[32];
  const int64_t per_row = g.per_row(), width = g.r.granularity == 3 ? g.r.group : cols;
  for (int64_t seg = blockIdx.x; seg < rows * per_row; seg += gridDim.x) {
    const int64_t row = seg / per_row, c0 = (seg - row * per_row) * width, c1 = min(cols, c0 + width);
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      const float v = to_float(x[row * cols + c]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    for (int off = 16; off > 0; off /= 2) {
      mn = fminf(mn, __shfl_down_sync(0xffffffffu, mn, off));
      mx = fmaxf(mx, __shfl_down_sync(0xffffffffu, mx, off));
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    if (lane == 0) {
      smin[warp] = mn;
      smax[warp] = mx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < warps; ++w) {
        mn = fminf(mn, smin[w]);
        mx = fmaxf(mx, smax[w]);
      }
      lo16[seg] = half_rounded(mn / scale, false);
      hi16[seg] = half_rounded(mx / scale, true);
    }
    __syncthreads();
  }
}

// One thread per channel: channel granularity.
template <typename T>
__global__ void channel_ranges_kernel(const T* x, int64_t rows, int64_t cols, float scale, uint16_t* lo16,
                                      uint16_t* hi16) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < cols; c += int64_t{gridDim.x} * blockDim.x) {
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t r = 0; r < rows; ++r) {
      const float v = to_float(x[r * cols + c]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    lo16[c] = half_rounded(mn / scale, false);
    hi16[c] = half_rounded(mx / scale, true);
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

// One block-stride over rows, threads over channels: calls store(r, c, code) for every code.
template <typename StoreFn>
__global__ void unpack_kernel(const uint8_t* packed, int64_t nbytes, PackLayout p, int64_t row_bits, StoreFn store) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const int64_t pos = r * row_bits + p.offsets[c], byte = pos >> 3;
      uint32_t v = packed[byte];
      if (byte + 1 < nbytes) v |= static_cast<uint32_t>(packed[byte + 1]) << 8;
      store(r, c, static_cast<uint8_t>((v >> (pos & 7)) & ((1u << p.bits[c]) - 1)));
    }
  }
}

template <typename T>
struct AffineCode {
  const T* x;
  Groups g;
  const uint16_t *lo16, *hi16;
  const uint8_t* bits;
  float scale;
  Rounding rounding;
  uint64_t seed;
  __device__ uint32_t operator()(int64_t r, int64_t c, bool) const {
    const int64_t k = g.of(r, c), i = r * g.cols + c;
    const float lo = half_to_float(lo16[k]) * scale, hi = half_to_float(hi16[k]) * scale;
    const int b = bits[c];
    return quantize_one(to_float(x[i]), lo, step_of(lo, hi, b), b, rounding, seed, static_cast<uint64_t>(i));
  }
};

template <typename T>
struct AffineStore {
  T* out;
  Groups g;
  const uint16_t *lo16, *hi16;
  const uint8_t* bits;
  float scale;
  __device__ void operator()(int64_t r, int64_t c, uint8_t code) const {
    const int64_t k = g.of(r, c);
    const float lo = half_to_float(lo16[k]) * scale, hi = half_to_float(hi16[k]) * scale;
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
  unpack_kernel<<<static_cast<int>(std::min<int64_t>(p.rows, kMaxBlocks)), kThreads, 0, s>>>(packed, nbytes, p, rb, fn);
  return cudaGetLastError();
}

}  // namespace

cudaError_t max_abs(const void* x, DType t, int64_t n, MaxAbs* out, cudaStream_t s) {
  cudaMemsetAsync(out, 0, sizeof(MaxAbs), s);
  cudaMemsetAsync(&out->first_bad, 0xff, sizeof(out->first_bad), s);
  if (n == 0) return cudaGetLastError();
  if (t == DType::kF32)
    max_abs_kernel<<<blocks_for(n), kThreads, 0, s>>>(static_cast<const float*>(x), n, out);
  else
    max_abs_kernel<<<blocks_for(n), kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, out);
  return cudaGetLastError();
}

cudaError_t affine_ranges(const void* x, DType t, const PackLayout& p, RangeLayout r, float scale, uint16_t* lo16,
                          uint16_t* hi16, cudaStream_t s) {
  if (p.rows == 0 || p.cols == 0) return cudaGetLastError();
  const Groups g{r, p.cols};
  const auto run = [&](auto* xt) {
    if (r.granularity == 2) {
      channel_ranges_kernel<<<blocks_for(p.cols), kThreads, 0, s>>>(xt, p.rows, p.cols, scale, lo16, hi16);
    } else {
      const int64_t segs = p.rows * (r.granularity == 3 ? (p.cols + r.group - 1) / r.group : 1);
      const int threads = r.granularity == 3 && r.group <= 64 ? 32 : 128;
      row_ranges_kernel<<<static_cast<int>(std::min(segs, kMaxBlocks)), threads, 0, s>>>(xt, p.rows, p.cols, g, scale,
                                                                                         lo16, hi16);
    }
  };
  if (t == DType::kF32)
    run(static_cast<const float*>(x));
  else
    run(static_cast<const __nv_bfloat16*>(x));
  return cudaGetLastError();
}

cudaError_t affine_quantize_pack(const void* x, DType t, const PackLayout& p, RangeLayout r, float scale,
                                 const uint16_t* lo16, const uint16_t* hi16, int rounding, uint64_t seed, uint32_t* out,
                                 cudaStream_t s) {
  const Groups g{r, p.cols};
  const auto rnd = static_cast<Rounding>(rounding);
  if (t == DType::kF32) {
    return launch_pack(p, AffineCode<float>{static_cast<const float*>(x), g, lo16, hi16, p.bits, scale, rnd, seed}, out,
                       s);
  }
  return launch_pack(
      p, AffineCode<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(x), g, lo16, hi16, p.bits, scale, rnd, seed}, out,
      s);
}

cudaError_t affine_unpack_dequantize(const uint8_t* packed, int64_t nbytes, const PackLayout& p, RangeLayout r,
                                     float scale, const uint16_t* lo16, const uint16_t* hi16, void* out, DType t,
                                     cudaStream_t s) {
  const Groups g{r, p.cols};
  if (t == DType::kF32)
    return launch_unpack(packed, nbytes, p, AffineStore<float>{static_cast<float*>(out), g, lo16, hi16, p.bits, scale},
                         s);
  return launch_unpack(packed, nbytes, p,
                       AffineStore<__nv_bfloat16>{static_cast<__nv_bfloat16*>(out), g, lo16, hi16, p.bits, scale}, s);
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
