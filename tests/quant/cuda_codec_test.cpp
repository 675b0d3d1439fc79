// The CUDA kernels against the reference CPU codecs. Skipped (and said so) where the build has no
// CUDA kernels or the machine no GPU; CI has neither, the GPU machine runs them.
//
// Contract: everything before the codes (header, bit map, fp16 ranges) is byte-identical to the
// reference packet, and a code may differ only where its value lies within a few ulps of a rounding
// boundary; such codes are counted and bounded (the kernels use the same IEEE fp32 operations as the
// CPU without fused multiply-add, so the count is expected to be zero).
#include <gtest/gtest.h>

#include <cmath>

#include "quant/bitpack.h"
#include "quant/codec.h"
#include "testing.h"

namespace amaq::quant {
namespace {

bool have_gpu() {
  return cuda_codecs_built() && at::hasCUDA();
}

#define SKIP_WITHOUT_GPU() \
  if (!have_gpu())         \
  GTEST_SKIP() << (cuda_codecs_built() ? "no CUDA device" : "this build has no CUDA kernels (libtorch without CUDA)")

// Student-t(3)-like data with outlier channels and odd sizes.
at::Tensor activations(int64_t B, int64_t T, int64_t C, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return testing::with_outlier_channels(testing::student_t3({B, T, C}, gen));
}

struct Mismatch {
  int64_t codes = 0;         // codes that differ from the reference
  int64_t off_boundary = 0;  // of those, values not near a rounding boundary (must stay 0)
};

// Compares a CUDA packet with the reference packet of the same input (see the contract above).
Mismatch compare_affine(const std::string& gpu, const Encoded& ref, const at::Tensor& x, Rounding rounding,
                        uint64_t seed, const std::string& what) {
  Mismatch m;
  EXPECT_EQ(gpu.size(), ref.packet.size()) << what;
  if (gpu.size() != ref.packet.size()) return m;
  const int64_t rows = ref.layout.rows, code_bytes = packed_bytes(rows, ref.bits);
  const size_t prefix = ref.packet.size() - static_cast<size_t>(code_bytes);
  EXPECT_EQ(gpu.compare(0, prefix, ref.packet, 0, prefix), 0) << what << ": header or ranges differ";
  const auto* gp = reinterpret_cast<const uint8_t*>(gpu.data()) + prefix;
  const auto* rp = reinterpret_cast<const uint8_t*>(ref.packet.data()) + prefix;
  at::Tensor gc = unpack_ref(gp, code_bytes, rows, ref.bits), rc = unpack_ref(rp, code_bytes, rows, ref.bits);
  at::Tensor diff = (gc != rc).nonzero();
  m.codes = diff.size(0);
  if (m.codes == 0) return m;
  auto [lo, step] = affine_lo_step(ref.quant, ref.bits, ref.layout);
  const at::Tensor x2 = x.to(at::kFloat).reshape({rows, -1});
  for (int64_t k = 0; k < m.codes; ++k) {
    const int64_t r = diff[k][0].item<int64_t>(), c = diff[k][1].item<int64_t>();
    double u = (x2[r][c].item<double>() - lo[r][c].item<double>()) / step[r][c].item<double>();
    if (rounding == Rounding::kStochastic)
      u += stochastic_uniform(seed, static_cast<uint64_t>(r * x2.size(1) + c)) - 0.5;
    const double dist = std::fabs(u - std::floor(u) - 0.5);  // 0 on a round-to-nearest boundary
    if (dist > 1e-5 * std::max(1.0, std::fabs(u))) ++m.off_boundary;
  }
  return m;
}

TEST(CudaCodec, AffinePacketsEqualTheReferenceForEveryVariant) {
  SKIP_WITHOUT_GPU();
  const at::Tensor x = activations(3, 37, 203, 1);
  int64_t total_codes = 0, near_boundary = 0;
  for (const char* gran : {"token", "channel", "group"}) {
    for (const char* round : {"nearest", "stochastic"}) {
      for (int bits = 1; bits <= 8; ++bits) {
        for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
          const std::string text =
              std::string("fixed:bits=") + std::to_string(bits) + ",gran=" + gran + ",group=48,round=" + round;
          const CodecSpec spec = CodecSpec::parse(text);
          Codec ref(spec, Impl::kRef), gpu(spec);
          EncodeArgs args;
          args.seed = 77;
          const at::Tensor xd = x.to(dtype);
          const Encoded e_ref = ref.encode(xd, args), e_gpu = gpu.encode(xd.to(at::kCUDA), args);
          const std::string what = text + " " + std::string(c10::toString(dtype));
          const Mismatch m = compare_affine(e_gpu.packet, e_ref, xd, spec.rounding, args.seed, what);
          EXPECT_EQ(m.off_boundary, 0) << what;
          total_codes += x.numel();
          near_boundary += m.codes;
          // The sender's copy is what a receiver decodes, on either side.
          ASSERT_TRUE(e_gpu.decoded.is_cuda());
          EXPECT_TRUE(at::equal(e_gpu.decoded.cpu(), Codec(spec, Impl::kRef).decode(e_gpu.packet))) << what;
        }
      }
    }
  }
  std::printf("  affine: %lld of %lld codes differ from the reference (all within a rounding-boundary ulp)\n",
              static_cast<long long>(near_boundary), static_cast<long long>(total_codes));
  EXPECT_LE(near_boundary, total_codes / 100000);
}

TEST(CudaCodec, AmaqMixedMapsEqualTheReferenceAndDecodeOnTheGpu) {
  SKIP_WITHOUT_GPU();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (int64_t C : {1, 7, 203, 2048}) {
    const at::Tensor x = activations(2, 29, C, static_cast<uint64_t>(C));
    const at::Tensor bits = at::randint(1, 9, {C}, gen, at::kByte);
    for (const char* gran : {"token", "group"}) {
      const CodecSpec spec = CodecSpec::parse(std::string("amaq:budget=4,gran=") + gran + ",group=64");
      Codec ref(spec, Impl::kRef), gpu(spec), gpu_lean(spec), ref_rx(spec, Impl::kRef), gpu_rx(spec);
      EncodeArgs args, lean;
      args.bits = lean.bits = bits;
      lean.want_decoded = false;              // as training encodes: no sender-side copy
      for (int pass = 0; pass < 2; ++pass) {  // the second packet carries no map
        const Encoded e_ref = ref.encode(x, args), e_gpu = gpu.encode(x.to(at::kCUDA), args);
        const std::string what = "C=" + std::to_string(C) + " " + gran + " pass " + std::to_string(pass);
        EXPECT_EQ(e_gpu.packet, e_ref.packet) << what;
        const Encoded e_lean = gpu_lean.encode(x.to(at::kCUDA), lean);
        EXPECT_EQ(e_lean.packet, e_ref.packet) << what;
        EXPECT_FALSE(e_lean.decoded.defined()) << what;
        const at::Tensor on_gpu = gpu_rx.decode(e_ref.packet, at::kCUDA), on_cpu = ref_rx.decode(e_ref.packet);
        ASSERT_TRUE(on_gpu.is_cuda());
        EXPECT_TRUE(at::equal(on_gpu.cpu(), on_cpu)) << what;
        EXPECT_TRUE(at::equal(e_gpu.decoded.cpu(), on_cpu)) << what;
      }
    }
  }
}

// The benchmark's shape (8 x 512 x 2048, enough groups that every kernel's grid-stride loop turns
// more than once): packets equal the CPU codec's, for a fixed and a mixed map, fp32 and bf16.
TEST(CudaCodec, LargeActivationsGiveTheCpuPacket) {
  SKIP_WITHOUT_GPU();
  const at::Tensor x = activations(8, 512, 2048, 11);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (const char* text : {"fixed:bits=4,group=128", "amaq:budget=4,group=128", "fixed:bits=3,gran=token"}) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      const CodecSpec spec = CodecSpec::parse(text);
      Codec cpu(spec), gpu(spec), rx(spec);
      EncodeArgs args;
      args.bits = at::randint(2, 7, {2048}, gen, at::kByte);
      args.want_decoded = false;
      const at::Tensor xd = x.to(dtype);
      const Encoded e_cpu = cpu.encode(xd, args), e_gpu = gpu.encode(xd.to(at::kCUDA), args);
      const std::string what = std::string(text) + " " + c10::toString(dtype);
      EXPECT_EQ(e_gpu.packet, e_cpu.packet) << what;
      EXPECT_TRUE(at::equal(rx.decode(e_gpu.packet, at::kCUDA).cpu(), Codec(spec).decode(e_cpu.packet))) << what;
    }
  }
}

TEST(CudaCodec, AqsgdSenderAndReceiverStayInStepWithTheReference) {
  SKIP_WITHOUT_GPU();
  const CodecSpec spec = CodecSpec::parse("aqsgd:bits=3");
  Codec ref_tx(spec, Impl::kRef), gpu_tx(spec), ref_rx(spec, Impl::kRef), gpu_rx(spec);
  EncodeArgs args;
  for (int step = 0; step < 4; ++step) {
    // Samples 0-2 come back every step; sample 10 + step is new each time (a mixed batch).
    args.sample_ids = {0, 1, 2, 10 + step};
    const at::Tensor x = activations(4, 33, 129, 100 + static_cast<uint64_t>(step));
    const Encoded e_ref = ref_tx.encode(x, args), e_gpu = gpu_tx.encode(x.to(at::kCUDA), args);
    EXPECT_EQ(e_gpu.packet, e_ref.packet) << "step " << step;
    EXPECT_TRUE(at::equal(e_gpu.decoded.cpu(), e_ref.decoded)) << "step " << step;
    const at::Tensor on_gpu = gpu_rx.decode(e_ref.packet, at::kCUDA), on_cpu = ref_rx.decode(e_ref.packet);
    EXPECT_TRUE(at::equal(on_gpu.cpu(), on_cpu)) << "step " << step;
    EXPECT_TRUE(at::equal(on_cpu, e_ref.decoded)) << "step " << step;
  }
}

TEST(CudaCodec, NanOnTheGpuIsRefusedWithACount) {
  SKIP_WITHOUT_GPU();
  at::Tensor x = activations(2, 8, 64, 5);
  x[1][3][7] = std::nanf("");
  x[1][4][0] = INFINITY;
  for (const char* text : {"fixed:bits=4", "amaq:budget=4", "aqsgd:bits=4", "none:bf16"}) {
    const CodecSpec spec = CodecSpec::parse(text);
    Codec codec(spec);
    EncodeArgs args;
    args.bits = at::full({64}, 4, at::kByte);
    args.sample_ids = {0, 1};
    EXPECT_AMAQ_ERROR(codec.encode(x.to(at::kCUDA), args), "2 NaN/Inf", "first at flat index 711");
  }
}

TEST(CudaCodec, OutOfRangeAqsgdCodesAreRefusedOnTheGpu) {
  SKIP_WITHOUT_GPU();
  const CodecSpec spec = CodecSpec::parse("aqsgd:bits=3");
  Codec tx(spec), rx(spec);
  EncodeArgs args;
  args.sample_ids = {0};
  const at::Tensor x = activations(1, 4, 16, 9);
  rx.decode(tx.encode(x, args).packet, at::kCUDA);
  std::string packet = tx.encode(x * 1.5, args).packet;
  // 3-bit codes all ones: 7 > 2 * levels = 6.
  const size_t code_bytes = static_cast<size_t>(packed_bytes(4, at::full({16}, 3, at::kByte)));
  for (size_t i = packet.size() - code_bytes; i < packet.size(); ++i) packet[i] = static_cast<char>(0xff);
  EXPECT_AMAQ_ERROR(rx.decode(packet, at::kCUDA), "aqsgd codes above 6");
}

}  // namespace
}  // namespace amaq::quant
