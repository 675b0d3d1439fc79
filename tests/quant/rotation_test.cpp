// rot=hadamard: the fast block Walsh-Hadamard transform against Sylvester's matrix, packets that
// decode to the sender's copy, the identity "rotated codec on x = plain codec on Hx", the AMAQ gate
// gradient under that identity, and what rotation does to the error (NMSE) on Gaussian data and on
// heavy-tailed data with outlier channels.
#include "quant/rotation.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "quant/amaq.h"
#include "quant/codec.h"
#include "testing.h"

namespace amaq::quant {
namespace {

at::Tensor gaussian(int64_t rows, int64_t C, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({rows, C}, gen);
}

at::Tensor heavy_tailed(int64_t rows, int64_t C, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return testing::with_outlier_channels(testing::student_t3({rows, C}, gen));
}

EncodeArgs with_map(const at::Tensor& bits) {
  EncodeArgs a;
  a.bits = bits;
  return a;
}

TEST(BlockHadamard, MatchesSylvestersMatrixAndIsItsOwnInverse) {
  const at::Tensor x = gaussian(6, 256, 1).view({2, 3, 256}) * 3;
  for (int64_t block : {1, 2, 8, 16, 32, 64, 128, 256}) {
    SCOPED_TRACE(block);
    const at::Tensor fast = block_hadamard(x, block), ref = block_hadamard_ref(x, block);
    EXPECT_EQ(fast.sizes(), x.sizes());
    EXPECT_TRUE(at::equal(fast, block_hadamard_ops(x, block)));  // the CPU loop and the device path agree
    at::Tensor in_place = x.clone();
    block_hadamard_(in_place, block);
    EXPECT_TRUE(at::equal(in_place, fast));
    EXPECT_LT((fast - ref).abs().max().item<double>(), 1e-5 * x.abs().max().item<double>());
    EXPECT_LT((block_hadamard(fast, block) - x).abs().max().item<double>(), 1e-5 * x.abs().max().item<double>());
    EXPECT_NEAR(fast.pow(2).sum().item<double>(), x.pow(2).sum().item<double>(), 1e-4 * x.pow(2).sum().item<double>());
  }
  EXPECT_THROW(block_hadamard(x, 96), c10::Error);
  EXPECT_THROW(block_hadamard(x, 512), c10::Error);
}

TEST(BlockHadamard, SpecsAndShapesThatCannotRotateAreRefusedByName) {
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:bits=4,gran=token,rot=hadamard"), "power-of-two group");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:bits=4,group=96,rot=hadamard"), "power-of-two group");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("aqsgd:bits=4,rot=hadamard"), "'rot' is not an option");
  EXPECT_EQ(CodecSpec::parse("amaq:budget=4,rot=hadamard").to_string().find("rot=hadamard") != std::string::npos, true);
  EXPECT_EQ(CodecSpec::parse("fixed:bits=4").to_string().find("rot"), std::string::npos);  // unchanged canonical form
  Codec codec(CodecSpec::parse("fixed:bits=4,group=128,rot=hadamard"));
  EXPECT_AMAQ_ERROR(codec.encode(gaussian(4, 200, 2)), "needs a multiple of 128 channels");
  at::Tensor x = gaussian(4, 128, 3);
  x[2][5] = std::nanf("");  // counted and placed in x, not in its rotation (which spreads it over 128)
  EXPECT_AMAQ_ERROR(codec.encode(x), "1 NaN/Inf", "first at flat index 261");
}

// Decoding gives the sender's copy exactly, for fixed and a mixed AMAQ map, fp32 and bf16; the flag
// makes the packet self-describing (a receiver configured without rotation decodes it too).
TEST(BlockHadamard, PacketsDecodeToTheSendersCopy) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (const char* text : {"fixed:bits=4,group=64,rot=hadamard", "amaq:budget=4,group=32,rot=hadamard",
                           "ecsq:bits=4,group=64,rot=hadamard"}) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(std::string(text) + " " + c10::toString(dtype));
      const CodecSpec spec = CodecSpec::parse(text);
      const at::Tensor x = heavy_tailed(40, 256, 4).view({2, 20, 256}).to(dtype);
      EncodeArgs args;
      args.bits = at::randint(2, 7, {256}, gen, at::kByte);
      const Encoded e = Codec(spec).encode(x, args);
      EXPECT_EQ(e.rotation_block, spec.group);
      // The fast quantizer rotates each group in cache, the reference a rotated copy: the same bytes.
      const Encoded r = Codec(spec, Impl::kRef).encode(x, args);
      EXPECT_EQ(r.packet, e.packet);
      EXPECT_TRUE(at::equal(r.decoded, e.decoded));
      EXPECT_EQ(e.decoded.scalar_type(), dtype);
      EXPECT_TRUE(at::equal(Codec(spec).decode(e.packet), e.decoded));
      EXPECT_TRUE(at::equal(Codec(spec, Impl::kRef).decode(e.packet), e.decoded));
      // Without the sender's copy (how gradients are sent): the same packet, nothing decoded.
      EncodeArgs bare = args;
      bare.want_decoded = false;
      const Encoded b = Codec(spec).encode(x, bare);
      EXPECT_EQ(b.packet, e.packet);
      EXPECT_FALSE(b.decoded.defined());
      CodecSpec plain = spec;
      plain.hadamard = false;
      EXPECT_TRUE(at::equal(Codec(plain).decode(e.packet), e.decoded));
      EXPECT_LT(testing::nmse(e.decoded.to(at::kFloat), x.to(at::kFloat)), 0.05);
    }
  }
}

// The rotated codec on x quantizes exactly what the plain codec quantizes on Hx: the packets differ in
// the flag alone. And AMAQ's gate gradient through fake_quant is the plain one with the rotated
// upstream gradient: d loss / d bits meets the error in rotated coordinates.
TEST(BlockHadamard, RotatedCodecOnXIsThePlainCodecOnHx) {
  const CodecSpec rot = CodecSpec::parse("amaq:budget=4,group=64,rot=hadamard");
  CodecSpec plain = rot;
  plain.hadamard = false;
  AmaqGates gates(128, rot);
  const at::Tensor x = heavy_tailed(48, 128, 5).view({3, 16, 128});
  const at::Tensor hx = block_hadamard(x, 64);
  const Encoded er = Codec(rot).encode(x, with_map(gates->bit_map()));
  const Encoded ep = Codec(plain).encode(hx, with_map(gates->bit_map()));
  ASSERT_EQ(er.packet.size(), ep.packet.size());
  std::string a = er.packet, b = ep.packet;
  EXPECT_EQ(static_cast<uint8_t>(a[7]) & kFlagHadamard, kFlagHadamard);
  a[7] = b[7] = 0;  // PacketHeader::flags
  EXPECT_EQ(a, b);

  const at::Tensor up = gaussian(48, 128, 6).view({3, 16, 128});
  gates->gates.mutable_grad() = at::Tensor();
  (fake_quant(x, er, gates->bits_continuous()) * up).sum().backward();
  const at::Tensor g_rot = gates->gates.grad().clone();
  gates->gates.mutable_grad() = at::Tensor();
  (fake_quant(hx, ep, gates->bits_continuous()) * block_hadamard(up, 64)).sum().backward();
  const at::Tensor g_plain = gates->gates.grad().clone();
  EXPECT_GT(g_rot.abs().sum().item<double>(), 0.0);
  EXPECT_LT((g_rot - g_plain).abs().max().item<double>(), 1e-4 * g_plain.abs().max().item<double>());
}

// What rotation does to the error of fixed 3- and 4-bit codes with groups of 128. Gaussian data stays
// iid Gaussian under an orthonormal rotation, so the error must stay about the same (within 15%). An
// outlier channel 30x the others stretches its group's range about 30x; rotated, its energy spreads
// over the 128 coordinates and the range shrinks several-fold, so the error must at least halve.
TEST(BlockHadamard, RotationCutsTheErrorOfOutlierChannelsAndKeepsGaussianError) {
  for (int bits : {3, 4}) {
    const std::string base = "fixed:bits=" + std::to_string(bits) + ",group=128";
    Codec plain(CodecSpec::parse(base)), rot(CodecSpec::parse(base + ",rot=hadamard"));
    const at::Tensor g = gaussian(1024, 1024, 7), h = heavy_tailed(1024, 1024, 8);
    const double g0 = testing::nmse(plain.encode(g).decoded, g), g1 = testing::nmse(rot.encode(g).decoded, g);
    const double h0 = testing::nmse(plain.encode(h).decoded, h), h1 = testing::nmse(rot.encode(h).decoded, h);
    std::printf(
        "[ rot=hadamard, %d bits, group 128 ] NMSE Gaussian %.5f -> %.5f, heavy-tailed with outliers %.5f -> %.5f\n",
        bits, g0, g1, h0, h1);
    EXPECT_NEAR(g1, g0, 0.15 * g0);
    EXPECT_LT(h1, 0.5 * h0);
  }
}

}  // namespace
}  // namespace amaq::quant
