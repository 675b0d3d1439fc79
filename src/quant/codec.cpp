#include "quant/codec.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>

#include "quant/bitpack.h"
#include "quant/ecsq.h"
#include "quant/entropy.h"
#include "quant/levels.h"
#include "quant/rotation.h"
#if AMAQ_HAVE_CUDA
#include "quant/cuda/codec_cuda.h"
#endif

namespace amaq::quant {
namespace {

at::ScalarType to_scalar(WireDtype d) {
  switch (d) {
    case WireDtype::kF32:
      return at::kFloat;
    case WireDtype::kBF16:
      return at::kBFloat16;
    case WireDtype::kF16:
      return at::kHalf;
  }
  return at::kFloat;
}

WireDtype to_wire(at::ScalarType t) {
  if (t == at::kBFloat16) return WireDtype::kBF16;
  if (t == at::kHalf) return WireDtype::kF16;
  TORCH_CHECK(t == at::kFloat, "codecs take fp32, bf16 or fp16 tensors, got ", t);
  return WireDtype::kF32;
}

void write_header(ByteWriter& w, PacketHeader h, const at::IntArrayRef shape) {
  h.ndim = static_cast<uint8_t>(shape.size());
  w.put(h);
  for (int64_t d : shape) w.put(static_cast<uint32_t>(d));
}

void write_bytes(ByteWriter& w, const at::Tensor& t) {
  if (t.numel() > 0) w.append(t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()));
}

// 4 bits per channel, low nibble first.
void write_bit_map(ByteWriter& w, const at::Tensor& bits) {
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const int64_t C = bits.numel();
  for (int64_t c = 0; c < C; c += 2) w.put(static_cast<uint8_t>(b[c] | (c + 1 < C ? b[c + 1] << 4 : 0)));
}

at::Tensor read_bit_map(ByteReader& r, int64_t C) {
  const uint8_t* p = r.take(static_cast<uint64_t>((C + 1) / 2), "bit map");
  at::Tensor bits = at::empty({C}, at::kByte);
  uint8_t* b = bits.data_ptr<uint8_t>();
  for (int64_t c = 0; c < C; ++c) {
    b[c] = (c % 2 == 0) ? (p[c / 2] & 0xf) : (p[c / 2] >> 4);
    if (b[c] < 1 || b[c] > 8)
      throw PacketError("channel " + std::to_string(c) + " has bit-width " + std::to_string(b[c]) + ", not in 1..8");
  }
  return bits;
}

at::Tensor read_halves(ByteReader& r, int64_t n, const char* what) {
  const uint8_t* p = r.take(static_cast<uint64_t>(n) * 2, what);
  at::Tensor t = at::empty({n}, at::kHalf);
  if (n > 0) std::memcpy(t.data_ptr(), p, static_cast<size_t>(n) * 2);
  if (!t.to(at::kFloat).isfinite().all().item<bool>()) throw PacketError(std::string(what) + " contain NaN or Inf");
  return t;
}

// A packet's G interleaved fp16 (lo, hi) pairs must be finite with lo <= hi. Compared on the bits:
// fp16 magnitudes order like their integers, the sign flips the order, and -0 equals +0.
void check_ranges(const uint8_t* p, int64_t G) {
  for (int64_t g = 0; g < G; ++g) {
    uint16_t lo, hi;
    std::memcpy(&lo, p + 4 * g, 2);
    std::memcpy(&hi, p + 4 * g + 2, 2);
    if ((lo & 0x7c00) == 0x7c00 || (hi & 0x7c00) == 0x7c00) throw PacketError("ranges contain NaN or Inf");
    const auto key = [](uint16_t v) { return (v & 0x8000) ? -static_cast<int>(v & 0x7fff) : static_cast<int>(v); };
    if (key(lo) > key(hi)) throw PacketError("a range has lo > hi");
  }
}

std::string pack(const at::Tensor& codes, const at::Tensor& bits, Impl impl) {
  if (impl == Impl::kRef) return pack_ref(codes, bits);
  std::string out(static_cast<size_t>(packed_bytes(codes.size(0), bits)), '\0');
  pack_fast(codes, bits, reinterpret_cast<uint8_t*>(out.data()));
  return out;
}

at::Tensor unpack(ByteReader& r, int64_t rows, const at::Tensor& bits, Impl impl) {
  const int64_t n = packed_bytes(rows, bits);
  const uint8_t* p = r.take(static_cast<uint64_t>(n), "packed codes");
  return impl == Impl::kRef ? unpack_ref(p, n, rows, bits) : unpack_fast(p, n, rows, bits);
}

// ec=zstd: the codes entropy-coded (entropy.h), or nothing where that is not smaller than the
// `code_bytes` they take packed.
std::string if_smaller(std::string coded, int64_t code_bytes) {
  if (static_cast<int64_t>(coded.size()) + 4 < code_bytes && coded.size() <= UINT32_MAX) return coded;
  return {};
}
std::string entropy_if_smaller(const at::Tensor& codes, const at::Tensor& bits, int64_t code_bytes) {
  return if_smaller(entropy_encode(codes, bits), code_bytes);
}

// The codes of a CPU encoding: `coded` (entropy-coded, with its u32 size) where it is not empty, else packed.
void append_codes(ByteWriter& w, const std::string& coded, const at::Tensor& codes, const at::Tensor& bits, Impl impl) {
  if (!coded.empty()) {
    w.put(static_cast<uint32_t>(coded.size()));
    w.append(coded.data(), coded.size());
  } else if (impl == Impl::kRef) {
    const std::string packed = pack(codes, bits, impl);
    w.append(packed.data(), packed.size());
  } else {  // packed in place
    pack_fast(codes, bits, reinterpret_cast<uint8_t*>(w.grow(static_cast<size_t>(packed_bytes(codes.size(0), bits)))));
  }
}

// The codes that follow the ranges or steps: entropy-coded (kFlagEntropy) or packed.
at::Tensor read_codes(ByteReader& r, const PacketHeader& h, int64_t rows, const at::Tensor& bits, Impl impl) {
  if (!(h.flags & kFlagEntropy)) return unpack(r, rows, bits, impl);
  const auto n = r.get<uint32_t>("entropy-coded size");
  return entropy_decode(r.take(n, "entropy-coded codes"), n, rows, bits);
}

// The range layout a fixed or amaq packet declares for `shape`, checked: a known granularity, a group
// size, and, for a Hadamard-rotated packet, power-of-two groups that divide the channels.
AffineLayout packet_layout(const PacketHeader& h, const std::vector<int64_t>& shape) {
  const int64_t C = shape.back();
  int64_t numel = 1;
  for (auto d : shape) numel *= d;
  if (h.granularity < 1 || h.granularity > 3)
    throw PacketError("granularity " + std::to_string(h.granularity) + " unknown");
  const AffineLayout layout{numel / C, C, static_cast<Granularity>(h.granularity), static_cast<int64_t>(h.group)};
  if (layout.granularity == Granularity::kGroup && layout.group == 0) throw PacketError("group size 0");
  if ((h.flags & kFlagHadamard) &&
      (layout.granularity != Granularity::kGroup || !is_power_of_two(layout.group) || C % layout.group))
    throw PacketError("a Hadamard-rotated packet needs power-of-two range groups that divide the channels");
  return layout;
}

// True for tensors on a GPU, which go through the CUDA kernels; refuses them in a build without.
bool on_gpu(const at::Tensor& x) {
  if (!x.is_cuda()) return false;
#if !AMAQ_HAVE_CUDA
  throw Error("a CUDA tensor reached a codec, but this build has no CUDA kernels",
              "build amaq against a libtorch with CUDA (and nvcc installed), or keep the tensors on the CPU");
#endif
  return true;
}

}  // namespace

bool cuda_codecs_built() {
#if AMAQ_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

double mean_bits(const at::Tensor& bits) {
  return bits.to(at::kDouble).mean().item<double>();
}

Codec::Codec(CodecSpec spec, Impl impl, AqsgdOptions aqsgd) : spec_(spec), impl_(impl) {
  if (spec_.codec == CodecId::kAqsgd) buffer_ = std::make_unique<AqsgdBuffer>(aqsgd.max_memory_bytes, aqsgd.spill_path);
}

Encoded Codec::encode(const at::Tensor& x_in, const EncodeArgs& args) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.dim() <= 4, "codecs take tensors of 1 to 4 dims, got ", x_in.sizes());
  const bool gpu = on_gpu(x_in);
  at::Tensor x = gpu ? x_in.detach().contiguous() : x_in.detach().to(at::kCPU).contiguous();
  // Refuse NaN/Inf before anything goes out (the fast affine quantizers and the non-uniform levels
  // check in their own first pass).
  // (A rotation would spread one NaN over its group: check before it.)
  const bool affine =
      (spec_.codec == CodecId::kFixed || spec_.codec == CodecId::kAmaq) && spec_.levels == LevelKind::kUniform;
  const bool levels = spec_.codec == CodecId::kFixed && spec_.levels != LevelKind::kUniform;
  const bool ecsq = spec_.codec == CodecId::kEcsq;
  const bool checks_itself = affine || ((levels || ecsq) && !spec_.hadamard);
  if (gpu && (!affine || spec_.hadamard)) {
    if (!at::isfinite(x).all().item<bool>()) checked_max_abs(x.to(at::kCPU, at::kFloat).contiguous());  // names them
  } else if (!checks_itself || impl_ == Impl::kRef || (spec_.hadamard && spec_.rounding != Rounding::kNearest)) {
    checked_max_abs(x.scalar_type() == at::kFloat ? x : x.to(at::kFloat));
  }
  Encoded e = encode_dispatch(x, args);
  e.elements = x.numel();
  return e;
}

Encoded Codec::encode_dispatch(const at::Tensor& x, const EncodeArgs& args) {
  switch (spec_.codec) {
    case CodecId::kNone: {
      Encoded e;
      ByteWriter w;
      PacketHeader h;
      h.codec = static_cast<uint8_t>(CodecId::kNone);
      h.dtype = static_cast<uint8_t>(to_wire(x.scalar_type()));
      h.wire_dtype = static_cast<uint8_t>(spec_.dtype);
      write_header(w, h, x.sizes());
      at::Tensor wire = x.to(to_scalar(spec_.dtype)).contiguous();
      write_bytes(w, wire.cpu());
      e.packet = std::move(w.str());
      if (args.want_decoded) e.decoded = wire.to(x.scalar_type());
      return e;
    }
    case CodecId::kFixed: {
      if (spec_.levels != LevelKind::kUniform) return encode_levels(x, args);
      if (spec_.map.empty()) return encode_affine(x, at::full({x.size(-1)}, spec_.bits, at::kByte), args);
      const int64_t C = x.size(-1);
      if (static_cast<int64_t>(spec_.map.size()) != C) {
        throw Error("the fixed codec's map " + spec_.map_path + " has " + std::to_string(spec_.map.size()) +
                        " widths, the tensor has " + std::to_string(C) + " channels",
                    "write one width per channel of the split's hidden size");
      }
      return encode_affine(x, at::from_blob(const_cast<uint8_t*>(spec_.map.data()), {C}, at::kByte).clone(), args);
    }
    case CodecId::kAmaq:
      TORCH_CHECK(args.bits.defined() && args.bits.numel() == x.size(-1),
                  "amaq needs a (C,) bit map, C = ", x.size(-1));
      return encode_affine(x, args.bits.to(at::kByte).contiguous(), args);
    case CodecId::kAqsgd:
      return encode_aqsgd(x, args);
    case CodecId::kEcsq:
      return encode_ecsq(x, args);
  }
  TORCH_CHECK(false, "unknown codec");
}

Encoded Codec::encode_affine(const at::Tensor& x_in, const at::Tensor& bits, const EncodeArgs& args) {
  Encoded e;
  const int64_t C = x_in.size(-1);
  e.layout = AffineLayout{x_in.numel() / C, C, spec_.granularity, spec_.group};
  e.bits = bits;
  // rot=hadamard: what is quantized is each range group rotated (fp32); what is decoded is rotated back.
  // The fast CPU quantizer rotates each group in cache; the other paths rotate a copy first.
  check_rotation_fits(C);
  if (spec_.hadamard) e.rotation_block = spec_.group;
  const bool fused_rotation =
      spec_.hadamard && !x_in.is_cuda() && impl_ == Impl::kFast && spec_.rounding == Rounding::kNearest;
  const at::Tensor x = spec_.hadamard && !fused_rotation ? block_hadamard(x_in, spec_.group) : x_in;
  // What follows the header and map: the interleaved fp16 (lo, hi) pairs, then the packed codes.
  const char* ranges = nullptr;
  const char* codes = nullptr;
  int64_t code_bytes = 0;
  at::Tensor pairs, packed_codes;
#if AMAQ_HAVE_CUDA
  cuda::AffineEncoded g;
#endif
  if (on_gpu(x)) {
#if AMAQ_HAVE_CUDA
    // Fused kernels: the codes exist only packed (e.quant.codes stays undefined).
    g = cuda::affine_encode(x.reshape({e.layout.rows, C}), bits, e.layout, spec_.rounding, args.seed,
                            args.want_decoded);
    e.quant.scale = g.scale;
    e.quant.lo = g.lo;
    e.quant.hi = g.hi;
    if (g.decoded.defined()) e.decoded = g.decoded.view(x.sizes());
    ranges = g.ranges();
    codes = g.codes();
    code_bytes = g.code_bytes;
#endif
  } else {
    at::Tensor x2 = x.to(at::kFloat).reshape({e.layout.rows, C}).contiguous();
    at::Tensor deq;
    if (impl_ == Impl::kRef) {
      e.quant = affine_quantize_ref(x2, bits, e.layout, spec_.rounding, args.seed);
      if (args.want_decoded) deq = affine_dequantize_ref(e.quant, bits, e.layout);
    } else {
      // Packed as they are computed (the entropy coder takes them packed too).
      packed_codes = at::empty({packed_bytes(e.layout.rows, bits)}, at::kByte);
      e.quant = affine_quantize(x2, bits, e.layout, spec_.rounding, args.seed, args.want_decoded ? &deq : nullptr,
                                fused_rotation ? spec_.group : 0, packed_codes.data_ptr<uint8_t>(),
                                args.want_gate_slope ? &e.gate_slope : nullptr);
      codes = static_cast<const char*>(packed_codes.data_ptr());
    }
    if (args.want_decoded) e.decoded = deq.view(x.sizes()).to(x.scalar_type());
    pairs = at::stack({e.quant.lo, e.quant.hi}, 1).contiguous();
    ranges = static_cast<const char*>(pairs.data_ptr());
    code_bytes = packed_bytes(e.layout.rows, bits);
  }

  if (spec_.hadamard && !fused_rotation && e.decoded.defined()) {
    block_hadamard_(e.decoded, spec_.group);  // in place where it can: this copy is the codec's own
    e.decoded = e.decoded.to(x_in.scalar_type()).view(x_in.sizes());
  }

  ByteWriter w;
  PacketHeader h;
  h.codec = static_cast<uint8_t>(spec_.codec);
  h.dtype = static_cast<uint8_t>(to_wire(x_in.scalar_type()));
  h.flags = spec_.hadamard ? kFlagHadamard : 0;
  h.granularity = static_cast<uint8_t>(spec_.granularity);
  h.group = static_cast<uint32_t>(spec_.group);
  h.scale = e.quant.scale;
  // A per-channel map (amaq, or fixed with map=) travels only when it changed.
  const bool uses_map = spec_.codec == CodecId::kAmaq || !spec_.map.empty();
  const bool send_map = uses_map && !(sent_map_.defined() && at::equal(sent_map_, bits));
  if (uses_map) {
    if (send_map) {
      sent_map_ = bits.clone();
      ++sent_map_id_;
      h.flags |= kFlagBitMap;
    }
    h.map_id = sent_map_id_;
  } else {
    h.bits = static_cast<uint8_t>(spec_.bits);
  }
  std::string coded;
  if (spec_.entropy) {
    coded = e.quant.codes.defined() ? entropy_if_smaller(e.quant.codes, bits, code_bytes)
                                    : if_smaller(entropy_encode_packed(reinterpret_cast<const uint8_t*>(codes),
                                                                       code_bytes, e.layout.rows, bits),
                                                 code_bytes);
    if (!coded.empty()) h.flags |= kFlagEntropy;
  }
  w.str().reserve(static_cast<size_t>(256 + x.size(-1) + 4 * e.layout.num_groups() + code_bytes));
  write_header(w, h, x.sizes());
  if (send_map) write_bit_map(w, bits);
  w.append(ranges, static_cast<size_t>(4 * e.layout.num_groups()));
  if (codes && !(h.flags & kFlagEntropy)) {  // packed on the device, or by the CPU encoder
    w.append(codes, static_cast<size_t>(code_bytes));
  } else {
    append_codes(w, coded, e.quant.codes, bits, impl_);
  }
  e.packet = std::move(w.str());
  return e;
}

Encoded Codec::encode_aqsgd(const at::Tensor& x, const EncodeArgs& args) {
  TORCH_CHECK(x.dim() == 3, "aqsgd encodes (B, T, C) activations, got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  TORCH_CHECK(static_cast<int64_t>(args.sample_ids.size()) == B, "aqsgd needs one sample id per batch row");
  const int levels = (1 << (spec_.bits - 1)) - 1;
  at::Tensor xf = x.to(at::kFloat);
  std::vector<uint8_t> kinds(B);
  std::vector<int64_t> delta_rows;
  for (int64_t b = 0; b < B; ++b) {
    kinds[b] = buffer_->contains(args.sample_ids[b]) ? 0 : 1;
    if (!kinds[b]) delta_rows.push_back(b);
  }
  const int64_t nd = static_cast<int64_t>(delta_rows.size());
  // Deltas against the memory, their per-channel max-abs relative to one tensor scale.
  const bool gpu = on_gpu(x);
  at::Tensor deltas = at::empty({nd, T, C}, xf.options());
  std::vector<at::Tensor> memory(nd);  // each delta sample's memory (CPU), fetched once
  for (int64_t i = 0; i < nd; ++i) memory[i] = buffer_->get(args.sample_ids[delta_rows[i]]);
  at::Tensor mem_gpu;  // gpu: the delta samples' memories (nd * T, C), updated there and copied back
  if (gpu && nd) {
    mem_gpu = at::stack(memory).to(x.device()).view({nd * T, C});
    at::sub_out(deltas, xf.index_select(0, at::tensor(delta_rows, at::kLong).to(x.device())), mem_gpu.view({nd, T, C}));
  } else {
    for (int64_t i = 0; i < nd; ++i) {
      at::Tensor slot = deltas[i];
      at::sub_out(slot, xf[delta_rows[i]], memory[i]);
    }
  }
  at::Tensor amax = at::empty({0, C});  // (nd, C) max |d| over tokens, without a full-size |d| temporary
  if (nd) {
    auto [mn, mx] = at::aminmax(deltas, 1);
    amax = at::maximum(mx, mn.neg()).to(at::kCPU).contiguous();
  }
  const float max_abs = nd ? amax.max().item<float>() : 0.0f;
  const float scale = max_abs > 0 ? max_abs : 1.0f;
  at::Tensor amax16 = at::empty({nd, C}, at::kHalf);
  auto* a16 = reinterpret_cast<uint16_t*>(amax16.data_ptr());
  const float* ap = amax.data_ptr<float>();
  std::vector<float> steps(nd * C);  // per (sample, channel), from the stored fp16 as the receiver computes it
  for (int64_t i = 0; i < nd * C; ++i) {
    a16[i] = half_bits_rounded(ap[i] / scale, /*up=*/true);
    steps[i] = sym_step(half_bits_to_float(a16[i]), scale, levels);
  }
  // Codes: round(d / step) + levels, symmetric; the same expression on both paths.
  // The dequantized delta goes straight into the sample's memory: m += (code - levels) * step.
  std::string packed_codes;
  if (gpu) {
#if AMAQ_HAVE_CUDA
    if (nd) {
      at::Tensor step_t = at::from_blob(steps.data(), {nd, C}, at::kFloat);
      packed_codes = cuda::sym_encode(deltas.view({nd * T, C}), step_t, T, spec_.bits, mem_gpu);
      at::Tensor updated = mem_gpu.view({nd, T, C}).cpu();
      for (int64_t i = 0; i < nd; ++i) memory[i].copy_(updated[i]);
    }
#endif
  } else {
    packed_codes = quantize_sym_cpu(deltas, steps, memory, levels);
  }

  Encoded e;
  e.bits = at::full({C}, spec_.bits, at::kByte);
  if (args.want_decoded) e.decoded = at::empty({B, T, C}, at::kFloat);
  ByteWriter w;
  PacketHeader h;
  h.codec = static_cast<uint8_t>(CodecId::kAqsgd);
  h.dtype = h.wire_dtype = static_cast<uint8_t>(to_wire(x.scalar_type()));
  h.bits = static_cast<uint8_t>(spec_.bits);
  h.scale = scale;
  write_header(w, h, x.sizes());
  for (int64_t id : args.sample_ids) w.put(static_cast<uint64_t>(id));
  w.append(kinds.data(), kinds.size());
  write_bytes(w, amax16);
  for (int64_t b = 0; b < B; ++b) {
    if (!kinds[b]) continue;
    at::Tensor full = x[b].to(at::kCPU).contiguous();  // the first pass goes in the input's own precision
    write_bytes(w, full);
    at::Tensor m = full.to(at::kFloat).clone();
    buffer_->put(args.sample_ids[b], m);
    if (args.want_decoded) e.decoded[b].copy_(m);
  }
  for (int64_t i = 0; i < nd; ++i) {
    buffer_->put(args.sample_ids[delta_rows[i]], memory[i]);  // re-inserts it if it was spilled meanwhile
    if (args.want_decoded) e.decoded[delta_rows[i]].copy_(memory[i]);
  }
  w.str() += packed_codes;
  e.packet = std::move(w.str());
  if (args.want_decoded) e.decoded = e.decoded.to(x.device(), x.scalar_type());
  return e;
}

std::string Codec::quantize_sym_cpu(const at::Tensor& deltas, const std::vector<float>& steps,
                                    std::vector<at::Tensor>& memory, int levels) {
  const int64_t nd = deltas.size(0), T = deltas.size(1), C = deltas.size(2);
  at::Tensor codes = at::empty({nd * T, C}, at::kByte);
  const float* dp = deltas.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  std::vector<float*> mem(nd);
  for (int64_t i = 0; i < nd; ++i) mem[i] = memory[i].data_ptr<float>();
  auto quantize_row = [&](int64_t row) {  // row in [0, nd * T)
    const int64_t i = row / T;
    float* mp = mem[i] + (row - i * T) * C;
    for (int64_t c = 0; c < C; ++c) {
      const float step = steps[i * C + c];
      const float d = dp[row * C + c];
      const float q = sym_level(d, step, levels);
      cp[row * C + c] = static_cast<uint8_t>(q + static_cast<float>(levels));
      mp[c] += q * step;
    }
  };
  if (impl_ == Impl::kRef) {
    for (int64_t row = 0; row < nd * T; ++row) quantize_row(row);
  } else {
    at::parallel_for(0, nd * T, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) quantize_row(r);
    });
  }
  return pack(codes, at::full({C}, spec_.bits, at::kByte), impl_);
}

at::Tensor Codec::decode(std::string_view packet, at::Device device, int64_t max_elements) {
  ByteReader r(packet);
  auto h = r.get<PacketHeader>("header");
  if (h.magic != kPacketMagic) throw PacketError("bad magic (not an amaq packet)");
  if (h.version != kPacketVersion)
    throw PacketError("version " + std::to_string(h.version) + ", this build reads version " +
                      std::to_string(kPacketVersion));
  if (h.codec != static_cast<uint8_t>(spec_.codec)) {
    throw PacketError(std::string("codec id ") + std::to_string(h.codec) + ", this side is configured for " +
                      codec_name(spec_.codec));
  }
  if (h.dtype > static_cast<uint8_t>(WireDtype::kF16) || h.wire_dtype > static_cast<uint8_t>(WireDtype::kF16)) {
    throw PacketError("unknown dtype " + std::to_string(std::max(h.dtype, h.wire_dtype)));
  }
  if (h.ndim < 1 || h.ndim > 4) throw PacketError("ndim " + std::to_string(h.ndim) + " not in 1..4");
  const bool affine = spec_.codec == CodecId::kFixed || spec_.codec == CodecId::kAmaq;
  const bool ecsq = spec_.codec == CodecId::kEcsq;
  const bool levels = h.flags & kFlagLevels;
  if (h.flags & ~(kFlagBitMap | kFlagHadamard | kFlagEntropy | kFlagLevels) || (!affine && (h.flags & kFlagEntropy)) ||
      (!affine && !ecsq && (h.flags & kFlagHadamard)) || (ecsq && (h.flags & kFlagBitMap)) ||
      (levels && (spec_.codec != CodecId::kFixed || (h.flags & kFlagBitMap))))
    throw PacketError("flags " + std::to_string(h.flags) + " are not defined for " + codec_name(spec_.codec));
  if (!std::isfinite(h.scale) || !(h.scale > 0)) throw PacketError("scale is not a positive finite number");
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (int i = 0; i < h.ndim; ++i) {
    int64_t d = r.get<uint32_t>("dims");
    if (d != 0 && numel > kMaxPacketElements / d) throw PacketError("shape product exceeds 2^34 elements");
    numel *= d;
    shape.push_back(d);
  }
  if (numel > max_elements)
    throw PacketError("it declares " + std::to_string(numel) + " values, more than the " +
                      std::to_string(max_elements) + " this side expects");
  at::Tensor out = decode_dispatch(r, h, shape, numel, device);
  r.expect_end();
  return out;
}

at::Tensor Codec::decode_dispatch(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape,
                                  int64_t numel, at::Device device) {
  if (spec_.codec != CodecId::kNone) {
    if (shape.back() == 0) throw PacketError("zero channels");
    if (device.is_cuda()) on_gpu(at::empty({0}, at::TensorOptions().device(device)));  // refused without CUDA kernels
  }
  switch (spec_.codec) {  // no default: a new codec without a decoder does not compile cleanly (-Wswitch)
    case CodecId::kNone: {
      at::ScalarType t = to_scalar(static_cast<WireDtype>(h.wire_dtype));
      const uint8_t* p = r.take(static_cast<uint64_t>(numel) * at::elementSize(t), "raw values");
      at::Tensor out = at::empty(shape, t);
      if (numel > 0) std::memcpy(out.data_ptr(), p, static_cast<size_t>(numel) * at::elementSize(t));
      return out.to(device, to_scalar(static_cast<WireDtype>(h.dtype)));
    }
    case CodecId::kFixed:
      if (h.flags & kFlagLevels) return decode_levels(r, h, shape, device);
      return decode_affine(r, h, shape, device);
    case CodecId::kAmaq:
      return decode_affine(r, h, shape, device);
    case CodecId::kAqsgd:
      return decode_aqsgd(r, h, shape, device);
    case CodecId::kEcsq:
      return decode_ecsq(r, h, shape, device);
  }
  throw PacketError("codec id " + std::to_string(h.codec) + " has no decoder");
}

at::Tensor Codec::decode_affine(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape,
                                at::Device device) {
  const int64_t C = shape.back();
  const AffineLayout layout = packet_layout(h, shape);
  at::Tensor bits;
  if (spec_.codec == CodecId::kFixed && spec_.map.empty()) {
    if (h.bits < 1 || h.bits > 8) throw PacketError("bit-width " + std::to_string(h.bits) + " not in 1..8");
    bits = at::full({C}, static_cast<int>(h.bits), at::kByte);
  } else if (h.flags & kFlagBitMap) {
    bits = read_bit_map(r, C);
    recv_map_ = bits;
    recv_map_id_ = h.map_id;
  } else {
    if (!recv_map_.defined() || recv_map_id_ != h.map_id || recv_map_.numel() != C) {
      throw PacketError("packet uses bit map #" + std::to_string(h.map_id) + " but the last map received is #" +
                        std::to_string(recv_map_id_) + " (a packet was lost or the stream restarted)");
    }
    bits = recv_map_;
  }
  AffineQuant q;
  q.scale = h.scale;
  const int64_t G = layout.num_groups();
  const uint8_t* ranges = r.take(static_cast<uint64_t>(4 * G), "ranges");
  check_ranges(ranges, G);
  const at::ScalarType out_type = to_scalar(static_cast<WireDtype>(h.dtype));
  // rot=hadamard: the codes are of rotated groups; dequantized in fp32, rotated back, then cast.
  const bool rotated = h.flags & kFlagHadamard;
  const auto unrotate = [&](at::Tensor t) {  // t: this decode's own tensor, rotated back in place
    if (!rotated) return t.view(shape);
    block_hadamard_(t, layout.group);
    return t.to(out_type).view(shape);
  };
  const bool coded = h.flags & kFlagEntropy;
  if (device.is_cuda() && !coded) {
#if AMAQ_HAVE_CUDA
    const int64_t n = packed_bytes(layout.rows, bits);
    r.take(static_cast<uint64_t>(n), "packed codes");  // right after the ranges: one copy takes both
    return unrotate(
        cuda::affine_decode(ranges, 4 * G + n, q.scale, bits, layout, rotated ? at::kFloat : out_type, device));
#endif
  }
  at::Tensor pairs = at::empty({G, 2}, at::kHalf);
  if (G > 0) std::memcpy(pairs.data_ptr(), ranges, static_cast<size_t>(4 * G));
  q.lo = pairs.select(1, 0).contiguous();
  q.hi = pairs.select(1, 1).contiguous();
  q.codes = read_codes(r, h, layout.rows, bits, impl_);  // entropy-coded codes decode on the CPU
  if (impl_ == Impl::kFast)                              // a rotation undone group by group, in cache
    return affine_dequantize(q, bits, layout, rotated ? layout.group : 0).view(shape).to(device, out_type);
  at::Tensor deq = affine_dequantize_ref(q, bits, layout);
  return (rotated ? unrotate(deq) : deq.view(shape).to(out_type)).to(device);
}

at::Tensor Codec::decode_aqsgd(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape,
                               at::Device device) {
  if (shape.size() != 3) throw PacketError("aqsgd packets carry (B, T, C)");
  if (h.bits < 2 || h.bits > 8) throw PacketError("aqsgd bit-width " + std::to_string(h.bits) + " not in 2..8");
  const int64_t B = shape[0], T = shape[1], C = shape[2];
  const int levels = (1 << (h.bits - 1)) - 1;
  std::vector<int64_t> ids(B);
  for (int64_t b = 0; b < B; ++b) ids[b] = static_cast<int64_t>(r.get<uint64_t>("sample ids"));
  const uint8_t* kinds = r.take(static_cast<uint64_t>(B), "sample kinds");
  std::vector<int64_t> delta_rows;
  for (int64_t b = 0; b < B; ++b) {
    if (kinds[b] > 1) throw PacketError("sample kind " + std::to_string(kinds[b]));
    if (!kinds[b]) {
      if (!buffer_->contains(ids[b]))
        throw PacketError("delta for sample " + std::to_string(ids[b]) + " that this side never saw in full");
      delta_rows.push_back(b);
    }
  }
  const int64_t nd = static_cast<int64_t>(delta_rows.size());
  at::Tensor amax16 = read_halves(r, nd * C, "scales");
  const auto* a16 = reinterpret_cast<const uint16_t*>(amax16.data_ptr());
  at::ScalarType dt = to_scalar(static_cast<WireDtype>(h.wire_dtype));
  at::Tensor out = at::empty({B, T, C}, at::kFloat);
  for (int64_t b = 0; b < B; ++b) {
    if (!kinds[b]) continue;
    const uint8_t* p = r.take(static_cast<uint64_t>(T * C) * at::elementSize(dt), "full sample");
    at::Tensor full = at::empty({T, C}, dt);
    if (T * C > 0) std::memcpy(full.data_ptr(), p, static_cast<size_t>(T * C) * at::elementSize(dt));
    at::Tensor m = full.to(at::kFloat).clone();
    buffer_->put(ids[b], m);
    out[b].copy_(m);
  }
  std::vector<float> steps(nd * C);  // per (delta sample, channel)
  for (int64_t i = 0; i < nd * C; ++i) steps[i] = sym_step(half_bits_to_float(a16[i]), h.scale, levels);
  const at::ScalarType out_type = to_scalar(static_cast<WireDtype>(h.dtype));
  const at::Tensor bits = at::full({C}, static_cast<int>(h.bits), at::kByte);
  if (device.is_cuda()) {
#if AMAQ_HAVE_CUDA
    const int64_t n = packed_bytes(nd * T, bits);
    const uint8_t* p = r.take(static_cast<uint64_t>(n), "packed codes");
    if (nd) {
      std::vector<at::Tensor> memory(nd);
      for (int64_t i = 0; i < nd; ++i) memory[i] = buffer_->get(ids[delta_rows[i]]);
      at::Tensor m = at::stack(memory).to(device).view({nd * T, C});
      cuda::sym_decode(p, n, at::from_blob(steps.data(), {nd, C}, at::kFloat), T, h.bits, m);
      at::Tensor updated = m.view({nd, T, C}).cpu();
      for (int64_t i = 0; i < nd; ++i) {
        buffer_->put(ids[delta_rows[i]], updated[i].clone());
        out[delta_rows[i]].copy_(updated[i]);
      }
    }
    return out.to(device, out_type);
#endif
  }
  at::Tensor codes = unpack(r, nd * T, bits, impl_);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  for (int64_t i = 0; i < nd; ++i) {
    at::Tensor m = buffer_->get(ids[delta_rows[i]]);
    float* mp = m.data_ptr<float>();
    const float* st = steps.data() + i * C;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        const int code = cp[(i * T + t) * C + c];
        if (code > 2 * levels) throw PacketError("aqsgd code " + std::to_string(code) + " out of range");
        mp[t * C + c] += static_cast<float>(code - levels) * st[c];
      }
    }
    buffer_->put(ids[delta_rows[i]], m);
    out[delta_rows[i]].copy_(m);
  }
  return out.to(out_type);
}

void Codec::check_rotation_fits(int64_t channels) const {
  if (spec_.hadamard && channels % spec_.group != 0) {
    throw Error("rot=hadamard with group=" + std::to_string(spec_.group) + " needs a multiple of " +
                    std::to_string(spec_.group) + " channels, the tensor has " + std::to_string(channels),
                "choose a power-of-two group that divides the hidden size, or leave out rot=hadamard");
  }
}

at::Tensor Codec::host_input(const at::Tensor& x) const {
  check_rotation_fits(x.size(-1));
  const at::Tensor h = x.to(at::kCPU, at::kFloat);
  return (spec_.hadamard ? block_hadamard(h, spec_.group) : h).contiguous();
}

void Codec::finish_host_encoding(Encoded& e, at::Tensor& decoded, const at::Tensor& x) const {
  if (decoded.defined()) {
    if (spec_.hadamard) block_hadamard_(decoded, spec_.group);
    e.decoded = decoded.to(x.device(), x.scalar_type()).view(x.sizes());
  }
  e.bits = at::full({x.size(-1)}, spec_.bits, at::kByte);
  if (spec_.hadamard) e.rotation_block = spec_.group;
}

// ecsq: one step from the tensor's RMS (of the rotated groups with rot=hadamard: the same RMS), the
// codes and their levels from ecsq.h; on a GPU through the host.
Encoded Codec::encode_ecsq(const at::Tensor& x_in, const EncodeArgs& args) {
  Encoded e;
  const at::Tensor x = host_input(x_in);
  const double rms = ecsq_rms(x.data_ptr<float>(), x.numel());
  // NaN or Inf makes the sum of squares so: then name them (Codec::encode left the check to this
  // pass, without a rotation); a finite sum that overflowed passes.
  if (!std::isfinite(rms)) checked_max_abs(x);
  PacketHeader h;
  h.codec = static_cast<uint8_t>(CodecId::kEcsq);
  h.dtype = static_cast<uint8_t>(to_wire(x_in.scalar_type()));
  h.flags = spec_.hadamard ? kFlagHadamard : 0;
  h.group = spec_.hadamard ? static_cast<uint32_t>(spec_.group) : 0;
  h.bits = static_cast<uint8_t>(spec_.bits);
  h.scale = ecsq_step(rms, spec_.bits);
  ByteWriter w;
  write_header(w, h, x_in.sizes());
  // The sender's copy only when asked for (gradients go without one).
  at::Tensor deq = args.want_decoded ? at::empty(x.sizes(), at::kFloat) : at::Tensor();
  ecsq_encode(x.data_ptr<float>(), x.numel(), h.scale, spec_.bits, &w.str(),
              deq.defined() ? deq.data_ptr<float>() : nullptr);
  e.packet = std::move(w.str());
  finish_host_encoding(e, deq, x_in);
  return e;
}

at::Tensor Codec::decode_ecsq(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape,
                              at::Device device) {
  const int64_t C = shape.back();
  const bool rotated = h.flags & kFlagHadamard;
  if (rotated && (!is_power_of_two(h.group) || C % h.group != 0))
    throw PacketError("rotation group " + std::to_string(h.group) + " is not a power of two dividing " +
                      std::to_string(C));
  at::Tensor out = at::empty(shape, at::kFloat);
  ecsq_decode(r, out.numel(), h.scale, h.bits, out.data_ptr<float>());
  if (rotated) block_hadamard_(out, h.group);
  return out.to(device, to_scalar(static_cast<WireDtype>(h.dtype)));
}

Encoded Codec::encode_levels(const at::Tensor& x_in, const EncodeArgs& args) {
  Encoded e;
  const int64_t C = x_in.size(-1);
  const at::Tensor x = host_input(x_in).view({-1, C});
  e.layout = AffineLayout{x.size(0), C, spec_.granularity, spec_.group};
  e.bits = at::full({C}, spec_.bits, at::kByte);
  const int64_t code_bytes = packed_bytes(x.size(0), e.bits);
  // The fast quantizer packs its codes as it computes them (the entropy coder takes them packed too).
  at::Tensor packed_codes;
  if (impl_ == Impl::kFast) packed_codes = at::empty({code_bytes}, at::kByte);
  at::Tensor deq;
  const LevelQuant q =
      level_quantize(x, e.layout, spec_.levels, spec_.bits, impl_ == Impl::kFast, args.want_decoded ? &deq : nullptr,
                     packed_codes.defined() ? packed_codes.data_ptr<uint8_t>() : nullptr);
  PacketHeader h;
  h.codec = static_cast<uint8_t>(CodecId::kFixed);
  h.dtype = static_cast<uint8_t>(to_wire(x_in.scalar_type()));
  h.flags = kFlagLevels | (spec_.hadamard ? kFlagHadamard : 0);
  h.granularity = static_cast<uint8_t>(spec_.granularity);
  h.group = static_cast<uint32_t>(spec_.group);
  h.bits = static_cast<uint8_t>(spec_.bits);
  h.scale = q.scale;
  std::string coded;
  if (spec_.entropy && packed_codes.defined())
    coded =
        if_smaller(entropy_encode_packed(packed_codes.data_ptr<uint8_t>(), code_bytes, x.size(0), e.bits), code_bytes);
  else if (spec_.entropy)
    coded = entropy_if_smaller(q.codes, e.bits, code_bytes);
  if (!coded.empty()) h.flags |= kFlagEntropy;
  ByteWriter w;
  w.str().reserve(static_cast<size_t>(256 + 4 * q.levels.size() + 2 * q.step.size() + code_bytes));
  write_header(w, h, x_in.sizes());
  w.append(q.levels.data(), q.levels.size() * sizeof(float));
  w.append(q.step.data(), q.step.size() * sizeof(uint16_t));
  if (coded.empty() && packed_codes.defined())
    w.append(packed_codes.data_ptr(), static_cast<size_t>(code_bytes));
  else
    append_codes(w, coded, q.codes, e.bits, impl_);
  e.packet = std::move(w.str());
  finish_host_encoding(e, deq, x_in);
  return e;
}

at::Tensor Codec::decode_levels(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape,
                                at::Device device) {
  const int64_t C = shape.back();
  const AffineLayout layout = packet_layout(h, shape);
  if (layout.granularity == Granularity::kChannel)
    throw PacketError("non-uniform levels need token or group ranges, granularity is " + std::to_string(h.granularity));
  if (h.bits < 1 || h.bits > 8) throw PacketError("bit-width " + std::to_string(h.bits) + " not in 1..8");
  const bool rotated = h.flags & kFlagHadamard;
  LevelQuant q;
  q.scale = h.scale;
  const int K = 1 << h.bits;
  q.levels.resize(K);
  std::memcpy(q.levels.data(), r.take(static_cast<uint64_t>(K) * sizeof(float), "levels"), K * sizeof(float));
  for (float l : q.levels)
    if (!std::isfinite(l)) throw PacketError("levels contain NaN or Inf");
  const int64_t G = layout.num_groups();
  const uint8_t* steps = r.take(static_cast<uint64_t>(G) * 2, "steps");
  q.step.resize(G);
  if (G > 0) std::memcpy(q.step.data(), steps, static_cast<size_t>(G) * 2);
  for (uint16_t s : q.step)
    if ((s & 0x7c00) == 0x7c00 || (s & 0x8000)) throw PacketError("a step is negative, NaN or Inf");
  const at::Tensor bits = at::full({C}, static_cast<int>(h.bits), at::kByte);
  q.codes = read_codes(r, h, layout.rows, bits, impl_);
  at::Tensor out = level_dequantize(q, layout);
  if (rotated) block_hadamard_(out, layout.group);
  return out.view(shape).to(device, to_scalar(static_cast<WireDtype>(h.dtype)));
}

}  // namespace amaq::quant
