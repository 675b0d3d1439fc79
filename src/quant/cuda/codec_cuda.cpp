#include "quant/cuda/codec_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "quant/cuda/kernels.h"
#include "quant/packet.h"
#include "quant/quant_math.h"

namespace amaq::quant::cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string("CUDA kernel ") + what + " failed: " + cudaGetErrorString(e),
                "check the GPU with nvidia-smi, or run this side on the CPU");
  }
}

cudaStream_t stream_of(const at::Device& d) {
  return c10::cuda::getCurrentCUDAStream(d.index()).stream();
}

// The bit map and each channel's bit offset in a row, on the device.
struct DevicePack {
  at::Tensor bits, offsets;
  PackLayout layout;
  int64_t bytes() const { return (layout.rows * layout.row_bits + 7) / 8; }
  at::Tensor words(const at::Device& d) const {
    return at::empty({(bytes() + 3) / 4}, at::TensorOptions(at::kInt).device(d));
  }
};

// Maps change rarely (fixed: never; amaq: when the bit map is synced), so the last few per thread stay
// on the device and a step costs no host-to-device copy for them. Never freed: the cache may outlive
// the CUDA runtime at exit.
DevicePack device_pack(const at::Tensor& bits, int64_t rows, const at::Device& device) {
  struct Entry {
    int device;
    std::vector<uint8_t> key;
    DevicePack pack;
  };
  static thread_local auto* cache = new std::vector<Entry>();
  const at::Tensor b = bits.to(at::kCPU, at::kByte).contiguous();
  const auto* bp = b.data_ptr<uint8_t>();
  Entry* hit = nullptr;
  for (Entry& e : *cache) {
    if (e.device == device.index() && e.key.size() == static_cast<size_t>(b.numel()) &&
        std::equal(e.key.begin(), e.key.end(), bp))
      hit = &e;
  }
  if (!hit) {
    if (cache->size() >= 8) cache->erase(cache->begin());
    Entry e{device.index(), std::vector<uint8_t>(bp, bp + b.numel()), {}};
    at::Tensor off = at::zeros({b.numel() + 1}, at::kLong);
    off.slice(0, 1).copy_(b.to(at::kLong).cumsum(0));
    e.pack.bits = b.to(device);
    e.pack.offsets = off.to(device);
    e.pack.layout.cols = b.numel();
    e.pack.layout.row_bits = off[b.numel()].item<int64_t>();
    e.pack.layout.bits = e.pack.bits.data_ptr<uint8_t>();
    e.pack.layout.offsets = e.pack.offsets.data_ptr<int64_t>();
    cache->push_back(std::move(e));
    hit = &cache->back();
  }
  DevicePack p = hit->pack;
  p.layout.rows = rows;
  return p;
}

RangeLayout ranges_of(const AffineLayout& l) {
  return RangeLayout{static_cast<int>(l.granularity), l.group};
}
DType kernel_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::kBF16 : DType::kF32;
}
// The kernels read and write fp32 and bf16; fp16 goes through fp32.
at::ScalarType kernel_type(at::ScalarType t) {
  return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}
uint8_t* u8(const at::Tensor& t) {
  return static_cast<uint8_t*>(t.data_ptr());
}

std::string to_host(const at::Tensor& words, int64_t nbytes) {
  at::Tensor h = words.cpu();
  return std::string(static_cast<const char*>(h.data_ptr()), static_cast<size_t>(nbytes));
}

at::Tensor to_device(const uint8_t* p, int64_t n, const at::Device& d) {
  return at::from_blob(const_cast<uint8_t*>(p), {n}, at::kByte).to(d);
}

int64_t round4(int64_t n) {
  return (n + 3) / 4 * 4;
}

int levels_of(int bits) {
  return (1 << (bits - 1)) - 1;
}

}  // namespace

AffineEncoded affine_encode(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed, bool want_decoded) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) == layout.rows && x.size(1) == layout.cols,
              "affine_encode takes (rows, cols) on a GPU");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t s = stream_of(x.device());
  const at::Tensor xin = x.to(kernel_type(x.scalar_type())).contiguous();
  const DType t = kernel_dtype(xin.scalar_type());
  const DevicePack p = device_pack(bits, layout.rows, x.device());
  const RangeLayout rl = ranges_of(layout);
  const int64_t G = layout.num_groups();

  // One device block laid out as the host copy: stats, ranges, codes.
  AffineEncoded e;
  e.ranges_at = round4(static_cast<int64_t>(sizeof(MaxAbs)));
  e.range_bytes = 4 * G;
  e.code_bytes = p.bytes();
  const int64_t total = e.ranges_at + e.range_bytes + round4(e.code_bytes);
  const auto on = at::TensorOptions().device(x.device());
  at::Tensor dev = at::empty({total}, on.dtype(at::kByte)), minmax = at::empty({2 * G}, on.dtype(at::kFloat));
  auto* stats = reinterpret_cast<MaxAbs*>(dev.data_ptr());
  auto* pairs = reinterpret_cast<uint16_t*>(u8(dev) + e.ranges_at);
  auto* words = reinterpret_cast<uint32_t*>(u8(dev) + e.ranges_at + e.range_bytes);
  float* mn = minmax.data_ptr<float>();
  check(affine_minmax(xin.data_ptr(), t, layout.rows, layout.cols, rl, mn, mn + G, stats, s), "affine_minmax");
  check(affine_finish_ranges(mn, mn + G, G, stats, pairs, s), "affine_finish_ranges");
  if (want_decoded) e.decoded = at::empty({layout.rows, layout.cols}, xin.options());
  check(affine_quantize_pack(xin.data_ptr(), t, p.layout, rl, stats, pairs, static_cast<int>(rounding), seed, words,
                             want_decoded ? e.decoded.data_ptr() : nullptr, s),
        "affine_quantize_pack");
  e.host = at::empty({total}, at::TensorOptions(at::kByte).pinned_memory(true));
  check(cudaMemcpyAsync(e.host.data_ptr(), dev.data_ptr(), static_cast<size_t>(total), cudaMemcpyDeviceToHost, s),
        "the copy of the packet to the host");
  check(cudaStreamSynchronize(s), "affine encode");

  MaxAbs m;
  std::memcpy(&m, e.host.data_ptr(), sizeof m);
  if (m.bad) throw_non_finite(static_cast<int64_t>(m.bad), xin.numel(), static_cast<int64_t>(m.first_bad));
  float max_abs_value;
  std::memcpy(&max_abs_value, &m.max_bits, sizeof max_abs_value);
  e.scale = pow2_scale(max_abs_value);
  const at::Tensor halves = e.host.slice(0, e.ranges_at, e.ranges_at + e.range_bytes).view(at::kHalf).view({G, 2});
  e.lo = halves.select(1, 0);
  e.hi = halves.select(1, 1);
  if (want_decoded) e.decoded = e.decoded.to(x.scalar_type());
  return e;
}

at::Tensor affine_decode(const uint8_t* ranges, int64_t nbytes, float scale, const at::Tensor& bits,
                         const AffineLayout& layout, at::ScalarType out_type, at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t s = stream_of(device);
  const DevicePack p = device_pack(bits, layout.rows, device);
  const int64_t range_bytes = 4 * layout.num_groups();
  TORCH_CHECK(nbytes >= range_bytes + p.bytes(), "packed codes too short");
  at::Tensor data = at::empty({nbytes}, at::TensorOptions(at::kByte).device(device));
  check(cudaMemcpyAsync(data.data_ptr(), ranges, static_cast<size_t>(nbytes), cudaMemcpyHostToDevice, s),
        "the copy of the packet to the device");
  at::Tensor out = at::empty({layout.rows, layout.cols}, at::TensorOptions(kernel_type(out_type)).device(device));
  check(affine_unpack_dequantize(u8(data) + range_bytes, nbytes - range_bytes, p.layout, ranges_of(layout), scale,
                                 reinterpret_cast<const uint16_t*>(data.data_ptr()), out.data_ptr(),
                                 kernel_dtype(out.scalar_type()), s),
        "affine_unpack_dequantize");
  return out.to(out_type);
}

std::string sym_encode(const at::Tensor& d, const at::Tensor& steps, int64_t T, int bits, at::Tensor& m) {
  TORCH_CHECK(d.is_cuda() && d.scalar_type() == at::kFloat && d.is_contiguous() && d.dim() == 2,
              "sym_encode takes (rows, C) fp32 on a GPU");
  TORCH_CHECK(m.sizes() == d.sizes() && m.is_contiguous() && m.scalar_type() == at::kFloat && m.device() == d.device(),
              "memory must match d");
  const c10::cuda::CUDAGuard guard(d.device());
  const DevicePack p = device_pack(at::full({d.size(1)}, bits, at::kByte), d.size(0), d.device());
  const at::Tensor st = steps.to(d.device(), at::kFloat).contiguous();
  at::Tensor words = p.words(d.device());
  check(sym_quantize_pack(d.data_ptr<float>(), st.data_ptr<float>(), T, levels_of(bits), p.layout, m.data_ptr<float>(),
                          static_cast<uint32_t*>(words.data_ptr()), stream_of(d.device())),
        "sym_quantize_pack");
  return to_host(words, p.bytes());
}

void sym_decode(const uint8_t* packed, int64_t nbytes, const at::Tensor& steps, int64_t T, int bits, at::Tensor& m) {
  TORCH_CHECK(m.is_cuda() && m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2,
              "sym_decode takes (rows, C) fp32 on a GPU");
  const c10::cuda::CUDAGuard guard(m.device());
  const DevicePack p = device_pack(at::full({m.size(1)}, bits, at::kByte), m.size(0), m.device());
  TORCH_CHECK(nbytes >= p.bytes(), "packed codes too short");
  const at::Tensor data = to_device(packed, nbytes, m.device()), st = steps.to(m.device(), at::kFloat).contiguous();
  at::Tensor bad = at::zeros({1}, at::TensorOptions(at::kLong).device(m.device()));
  check(sym_unpack_accumulate(u8(data), nbytes, st.data_ptr<float>(), T, levels_of(bits), p.layout, m.data_ptr<float>(),
                              reinterpret_cast<unsigned long long*>(bad.data_ptr()), stream_of(m.device())),
        "sym_unpack_accumulate");
  const int64_t n = bad.item<int64_t>();
  if (n > 0) throw PacketError(std::to_string(n) + " aqsgd codes above " + std::to_string(2 * levels_of(bits)));
}

}  // namespace amaq::quant::cuda
