#include "quant/cuda/codec_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "core/error.h"
#include "quant/cuda/kernels.h"
#include "quant/packet.h"

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

DevicePack device_pack(const at::Tensor& bits, int64_t rows, const at::Device& device) {
  DevicePack p;
  at::Tensor b = bits.to(at::kCPU, at::kByte).contiguous();
  at::Tensor off = at::zeros({b.numel() + 1}, at::kLong);
  off.slice(0, 1).copy_(b.to(at::kLong).cumsum(0));
  p.bits = b.to(device);
  p.offsets = off.to(device);
  p.layout.rows = rows;
  p.layout.cols = b.numel();
  p.layout.row_bits = off[b.numel()].item<int64_t>();
  p.layout.bits = p.bits.data_ptr<uint8_t>();
  p.layout.offsets = p.offsets.data_ptr<int64_t>();
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
uint16_t* u16(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr());
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

int levels_of(int bits) {
  return (1 << (bits - 1)) - 1;
}

}  // namespace

AffineEncoded affine_encode(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) == layout.rows && x.size(1) == layout.cols,
              "affine_encode takes (rows, cols) on a GPU");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t s = stream_of(x.device());
  const at::Tensor xin = x.to(kernel_type(x.scalar_type())).contiguous();
  const DType t = kernel_dtype(xin.scalar_type());

  at::Tensor stats = at::empty({static_cast<int64_t>(sizeof(MaxAbs))}, at::TensorOptions(at::kByte).device(x.device()));
  check(max_abs(xin.data_ptr(), t, xin.numel(), reinterpret_cast<MaxAbs*>(stats.data_ptr()), s), "max_abs");
  MaxAbs m;
  std::memcpy(&m, stats.cpu().data_ptr(), sizeof m);
  if (m.bad) throw_non_finite(static_cast<int64_t>(m.bad), xin.numel(), static_cast<int64_t>(m.first_bad));
  float max_abs_value;
  std::memcpy(&max_abs_value, &m.max_bits, sizeof max_abs_value);

  AffineEncoded e;
  e.scale = max_abs_value > 0 ? max_abs_value : 1.0f;
  const DevicePack p = device_pack(bits, layout.rows, x.device());
  const auto half = at::TensorOptions(at::kHalf).device(x.device());
  at::Tensor lo = at::empty({layout.num_groups()}, half), hi = at::empty({layout.num_groups()}, half);
  check(affine_ranges(xin.data_ptr(), t, p.layout, ranges_of(layout), e.scale, u16(lo), u16(hi), s), "affine_ranges");
  at::Tensor words = p.words(x.device());
  check(affine_quantize_pack(xin.data_ptr(), t, p.layout, ranges_of(layout), e.scale, u16(lo), u16(hi),
                             static_cast<int>(rounding), seed, static_cast<uint32_t*>(words.data_ptr()), s),
        "affine_quantize_pack");
  // The sender's copy of what goes across: decoded from the very words sent.
  e.decoded = at::empty({layout.rows, layout.cols}, xin.options());
  check(affine_unpack_dequantize(u8(words), p.bytes(), p.layout, ranges_of(layout), e.scale, u16(lo), u16(hi),
                                 e.decoded.data_ptr(), t, s),
        "affine_unpack_dequantize");
  e.decoded = e.decoded.to(x.scalar_type());
  e.packed = to_host(words, p.bytes());
  e.lo = lo.cpu();
  e.hi = hi.cpu();
  return e;
}

at::Tensor affine_decode(const uint8_t* packed, int64_t nbytes, const AffineQuant& q, const at::Tensor& bits,
                         const AffineLayout& layout, at::ScalarType out_type, at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t s = stream_of(device);
  const DevicePack p = device_pack(bits, layout.rows, device);
  TORCH_CHECK(nbytes >= p.bytes(), "packed codes too short");
  const at::Tensor data = to_device(packed, nbytes, device), lo = q.lo.to(device), hi = q.hi.to(device);
  at::Tensor out = at::empty({layout.rows, layout.cols}, at::TensorOptions(kernel_type(out_type)).device(device));
  check(affine_unpack_dequantize(u8(data), nbytes, p.layout, ranges_of(layout), q.scale, u16(lo), u16(hi),
                                 out.data_ptr(), kernel_dtype(out.scalar_type()), s),
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
