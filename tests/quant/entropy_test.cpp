// ec=zstd: entropy-coded codes are lossless (the packet decodes to the sender's copy, which equals the
// plain codec's), shrink packets of peaked code distributions, fall back to plain packed codes where
// they would not shrink, and come within a stated margin of the codes' empirical entropy. Skipped,
// and said so, in a build without libzstd.
#include "quant/entropy.h"

#include <gtest/gtest.h>
#if AMAQ_HAVE_ZSTD
#include <zstd.h>
#endif

#include <cmath>
#include <cstdio>

#include "quant/bitpack.h"
#include "quant/codec.h"
#include "testing.h"

namespace amaq::quant {
namespace {

#define SKIP_WITHOUT_ZSTD() \
  if (!entropy_coding_built()) GTEST_SKIP() << "this build has no libzstd"

at::Tensor gaussian(int64_t rows, int64_t C, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({rows, C}, gen);
}

TEST(EntropyCoding, IsLosslessAndShrinksPeakedCodes) {
  SKIP_WITHOUT_ZSTD();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const at::Tensor x = gaussian(512, 256, 1).view({4, 128, 256});
  for (const char* base : {"fixed:bits=4,group=128", "fixed:bits=3,gran=token", "amaq:budget=4,group=64",
                           "amaq:budget=4,group=64,rot=hadamard"}) {
    SCOPED_TRACE(base);
    const CodecSpec plain = CodecSpec::parse(base), coded = CodecSpec::parse(std::string(base) + ",ec=zstd");
    EncodeArgs args;
    args.bits = at::randint(2, 7, {256}, gen, at::kByte);
    Codec tx(coded), tx_plain(plain), rx(coded);
    for (int pass = 0; pass < 2; ++pass) {  // the second amaq packet carries no map
      const Encoded e = tx.encode(x, args), p = tx_plain.encode(x, args);
      EXPECT_TRUE(static_cast<uint8_t>(e.packet[7]) & kFlagEntropy);
      EXPECT_LT(e.packet.size(), p.packet.size());
      EXPECT_TRUE(at::equal(e.decoded, p.decoded));
      EXPECT_TRUE(at::equal(rx.decode(e.packet), e.decoded));
    }
  }
}

// Codes spread evenly over their levels (uniform data) do not shrink: the packet is the plain one.
TEST(EntropyCoding, CodesThatDoNotShrinkGoPacked) {
  SKIP_WITHOUT_ZSTD();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor x = at::rand({256, 256}, gen) * 2 - 1;
  const Encoded e = Codec(CodecSpec::parse("fixed:bits=4,group=128,ec=zstd")).encode(x);
  const Encoded p = Codec(CodecSpec::parse("fixed:bits=4,group=128")).encode(x);
  EXPECT_EQ(e.packet, p.packet);
  EXPECT_TRUE(at::equal(Codec(CodecSpec::parse("fixed:bits=4,group=128,ec=zstd")).decode(e.packet), e.decoded));
}

TEST(EntropyCoding, MalformedFramesAreRefused) {
  SKIP_WITHOUT_ZSTD();
  const at::Tensor bits = at::full({8}, 3, at::kByte);
  const at::Tensor codes = at::randint(0, 8, {5, 8}, at::kByte);  // odd rows: a padding code per channel
  const std::string frame = entropy_encode(codes, bits);
  const auto* f = reinterpret_cast<const uint8_t*>(frame.data());
  EXPECT_THROW(entropy_decode(f, static_cast<int64_t>(frame.size()), 5, at::full({8}, 5, at::kByte)),
               PacketError);  // another width
  EXPECT_TRUE(at::equal(entropy_decode(f, static_cast<int64_t>(frame.size()), 5, bits), codes));
  EXPECT_THROW(entropy_decode(f, static_cast<int64_t>(frame.size()), 7, bits), PacketError);      // wrong count
  EXPECT_THROW(entropy_decode(f, static_cast<int64_t>(frame.size()) - 3, 5, bits), PacketError);  // cut short
  std::string bad = frame;
  bad[4] = static_cast<char>(bad[4] ^ 0x5a);  // not a zstd frame (after its u32 size)
  EXPECT_THROW(entropy_decode(reinterpret_cast<const uint8_t*>(bad.data()), static_cast<int64_t>(bad.size()), 5, bits),
               PacketError);
  const std::string wide = entropy_encode(at::full({4, 8}, 9, at::kByte), bits);  // 9 does not fit 3 bits
  EXPECT_AMAQ_ERROR(
      entropy_decode(reinterpret_cast<const uint8_t*>(wide.data()), static_cast<int64_t>(wide.size()), 4, bits),
      "exceeds its width");
}

#if AMAQ_HAVE_ZSTD
// A width's stream longer than a chunk (1 MiB) goes as several frames, coded and decoded in parallel;
// one frame fewer, or one more, is refused; codes of widths above 4 (a byte each) round-trip too.
TEST(EntropyCoding, LongStreamsGoAsSeveralFramesAndRoundTrip) {
  SKIP_WITHOUT_ZSTD();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Tensor bits = at::full({2048}, 4, at::kByte);
  bits.narrow(0, 0, 600).fill_(6);  // 600 channels of 6 bits: 1.2 MiB, two frames; the rest 1.4 MiB, two
  const at::Tensor codes = at::minimum(at::randn({2001, 2048}, gen).abs().mul(3), bits.to(at::kFloat).exp2() - 1)
                               .to(at::kByte);  // peaked, as quantized activations are
  const std::string coded = entropy_encode(codes, bits);
  const auto* p = reinterpret_cast<const uint8_t*>(coded.data());
  EXPECT_TRUE(at::equal(entropy_decode(p, static_cast<int64_t>(coded.size()), 2001, bits), codes));
  EXPECT_LT(coded.size(), static_cast<size_t>(2001 * (600 * 6 + 1448 * 4) / 8));
  // The 4-bit channels' frames (the first width present), with their last frame dropped.
  uint32_t n4 = 0;
  std::memcpy(&n4, p, 4);
  const size_t first = ZSTD_findFrameCompressedSize(p + 4, n4);
  ASSERT_LT(first, n4);  // more than one frame
  std::string one_frame = coded.substr(0, 4 + first);
  const auto len = static_cast<uint32_t>(first);
  std::memcpy(one_frame.data(), &len, 4);
  EXPECT_AMAQ_ERROR(entropy_decode(reinterpret_cast<const uint8_t*>(one_frame.data()),
                                   static_cast<int64_t>(one_frame.size()), 2001, at::full({2048}, 4, at::kByte)),
                    "are not 2 zstd frames of 2049024 bytes");
  const std::string wide = entropy_encode(at::full({4, 8}, 40, at::kByte), at::full({8}, 5, at::kByte));
  EXPECT_AMAQ_ERROR(entropy_decode(reinterpret_cast<const uint8_t*>(wide.data()), static_cast<int64_t>(wide.size()), 4,
                                   at::full({8}, 5, at::kByte)),
                    "exceeds its width");
}
#endif

// What the fast encoders hand over, codes already packed: the same bytes as from the codes, whether
// compressed as packed (widths 4 and 8 alone) or unpacked first (others, mixed); an odd count of
// codes; and through the codec, fast packets (packed) equal to the reference's (codes) for fixed,
// levels and amaq with ec=zstd.
TEST(EntropyCoding, PackedCodesCodeToTheBytesOfTheirCodes) {
  SKIP_WITHOUT_ZSTD();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  for (int w : {4, 8, 3, 0}) {  // 0: mixed widths
    for (int64_t rows : {33, 256}) {
      SCOPED_TRACE(::testing::Message() << "width " << w << ", rows " << rows);
      const at::Tensor bits = w ? at::full({127}, w, at::kByte) : at::randint(1, 9, {127}, gen, at::kByte);
      // Peaked codes (zstd shrinks them), each below its channel's 2^bits.
      const at::Tensor top = at::pow(2, bits.to(at::kInt)) - 1;
      const at::Tensor codes =
          at::minimum((at::randn({rows, 127}, gen).abs() * 2).to(at::kInt), top).to(at::kByte).contiguous();
      const std::string packed = pack_ref(codes, bits);
      const std::string coded = entropy_encode(codes, bits);
      EXPECT_EQ(entropy_encode_packed(reinterpret_cast<const uint8_t*>(packed.data()),
                                      static_cast<int64_t>(packed.size()), rows, bits),
                coded);
      EXPECT_TRUE(at::equal(entropy_decode(reinterpret_cast<const uint8_t*>(coded.data()),
                                           static_cast<int64_t>(coded.size()), rows, bits),
                            codes));
    }
  }
  const at::Tensor x = gaussian(301, 256, 7).view({7, 43, 256});
  for (const char* text : {"fixed:bits=4,group=128,ec=zstd", "fixed:bits=8,gran=token,ec=zstd",
                           "fixed:bits=3,group=64,ec=zstd", "fixed:bits=4,levels=lloyd,group=64,ec=zstd",
                           "fixed:bits=4,group=128,rot=hadamard,ec=zstd", "amaq:budget=4,group=64,ec=zstd"}) {
    EncodeArgs args;
    if (std::string(text).rfind("amaq", 0) == 0) args.bits = at::randint(2, 9, {256}, gen, at::kByte);
    const Encoded fast = Codec(CodecSpec::parse(text)).encode(x, args);
    const Encoded ref = Codec(CodecSpec::parse(text), Impl::kRef).encode(x, args);
    EXPECT_TRUE(static_cast<uint8_t>(fast.packet[7]) & kFlagEntropy) << text;
    EXPECT_EQ(fast.packet, ref.packet) << text;
  }
}

// Bits per element after coding against the codes' empirical entropy, and the whole packet against the
// Gaussian rate-distortion bound 0.5 * log2(1 / NMSE) at the NMSE it reached.
TEST(EntropyCoding, ComesWithinATenthOfABitOfTheCodesEntropy) {
  SKIP_WITHOUT_ZSTD();
  const at::Tensor x = gaussian(4096, 1024, 4);
  for (const char* text :
       {"fixed:bits=3,gran=token,ec=zstd", "fixed:bits=4,gran=token,ec=zstd", "fixed:bits=4,group=128,ec=zstd"}) {
    const CodecSpec spec = CodecSpec::parse(text);
    Codec codec(spec, Impl::kRef);  // the reference path keeps the codes
    const Encoded e = codec.encode(x);
    ASSERT_TRUE(static_cast<uint8_t>(e.packet[7]) & kFlagEntropy) << text;
    const double n = static_cast<double>(x.numel());
    const double entropy = code_entropy_bits(e.quant.codes);
    const double coded = 8.0 * static_cast<double>(entropy_encode(e.quant.codes, e.bits).size()) / n;
    const double total = e.bits_per_element(), err = testing::nmse(e.decoded, x), bound = 0.5 * std::log2(1.0 / err);
    std::printf(
        "[ %s ] entropy %.3f, coded %.3f bits/code; packet %.3f bits/element at NMSE %.5f, "
        "Gaussian bound %.3f (+%.3f)\n",
        text, entropy, coded, total, err, bound, total - bound);
    EXPECT_LT(coded, entropy + 0.1) << text;
    EXPECT_LT(total, spec.bits + 0.3) << text;
  }
}

}  // namespace
}  // namespace amaq::quant
